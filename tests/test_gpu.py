"""bench/gpu_validate.py: its CPU-side parts here (arguments, the report, the checks fed with real CPU data
and with the shapes CUDA gives), and the whole validation on a CUDA device (`pytest -m gpu`; skipped here).

No CUDA is mocked: the check functions are pure and take what agent.snapshot() and torch return.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch

import vramtop_agent
from vramtop_agent import oom

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_validate", ROOT / "bench" / "gpu_validate.py")
gv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gv)

MiB = 1 << 20
GIB = 1 << 30


# ---------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_validation_passes_on_this_device(capsys):
    # The tiny model and the OOM, in under a minute; `python bench/gpu_validate.py` adds the 1B runs and the
    # overhead ratios.
    code = gv.main(["--quick", "--no-overhead", "--budget-s", "55"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, "\n".join(line for line in out.splitlines() if line.startswith("FAIL"))


# ---------------------------------------------------------------------- arguments and report


def test_arguments():
    a = gv.parse_args([])
    assert a.configs == list(gv.CONFIGS) and a.steps == 4 and a.budget_s == 450
    assert gv.parse_args(["--quick"]).configs == ["tiny-full", "tiny-lora"]
    assert gv.parse_args(["--only", "1b-qlora, tiny-full"]).configs == ["1b-qlora", "tiny-full"]
    for bad in (["--only", "2b-full"], ["--steps", "2"], ["--rounds", "0"], ["--overhead-steps", "1"]):
        with pytest.raises(SystemExit):
            gv.parse_args(bad)


def test_without_cuda_the_script_says_so_and_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a CUDA device here")
    assert gv.main(["--quick"]) == 2
    out = capsys.readouterr().out
    assert "SKIP  CUDA" in out and "nothing validated" in out


def test_report_rows_and_exit_code():
    buf = io.StringIO()
    r = gv.Report(out=buf)
    r.check("a", True, "fine")
    r.skip("b", "why")
    r.ratio("c", 1.0234, "median 1.00 ms")
    assert r.exit_code() == 0
    with r.guard("d"):
        raise RuntimeError("boom\nsecond line")
    assert r.exit_code() == 1
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("PASS  a") and lines[1].startswith("SKIP  b") and "1.023x" in lines[2]
    assert lines[3].startswith("FAIL  d") and "RuntimeError: boom" in lines[3] and "second" not in lines[3]
    assert "1 passed, 1 failed, 1 skipped" in r.summary()
    assert gv.Report(out=io.StringIO()).exit_code() == 1  # nothing ran: not a pass
    t = gv.Tally()
    t.add("x", True, "d1", "s0")
    t.add("x", False, "d2", "s1")
    buf2 = io.StringIO()
    t.report(gv.Report(out=buf2), "cfg")
    assert buf2.getvalue().startswith("FAIL  cfg: x") and "1/2 samples; first failure at s1: d2" in buf2.getvalue()


# ---------------------------------------------------------------------- the checks


def _cuda_sample(**over):
    blocks = {"parameters": 14 * GIB, "gradients": 2 * GIB, "optimizer": 4 * GIB, "activations": 20 * GIB + GIB // 2,
              "other": GIB // 2}
    s = {"device": "cuda:0", "blocks": blocks, "devices": {"cuda:0": blocks},
         "cuda": {"allocated": 41 * GIB, "reserved": 50 * GIB, "active": 41 * GIB, "inactive_split": GIB},
         "nvml": {"total": 80 * GIB, "used": 53 * GIB, "process_used": 51 * GIB}}
    for path, value in over.items():
        head, _, key = path.partition("__")
        s[head][key] = value
    return s


def _failed(checks):
    return {name for name, ok, _ in checks if not ok}


def test_sample_checks_pass_on_a_consistent_cuda_sample_and_name_each_inconsistency():
    assert _failed(gv.sample_checks(_cuda_sample(), 41 * GIB, gv.other_limit_for(41 * GIB))) == set()
    assert _failed(gv.sample_checks(_cuda_sample(), 41 * GIB + 512)) == {"four blocks + other == memory_allocated"}
    # The agent clamps other at 0: four blocks over allocated shows as a sum that no longer matches.
    over = _cuda_sample(blocks__activations=22 * GIB, blocks__other=0)
    assert _failed(gv.sample_checks(over, 41 * GIB)) == {"four blocks + other == memory_allocated",
                                                         "four blocks <= allocated (other >= 0 before the clamp)"}
    assert "reserved >= allocated" in _failed(gv.sample_checks(_cuda_sample(cuda__reserved=40 * GIB)))
    assert "inactive_split <= reserved - allocated" in _failed(
        gv.sample_checks(_cuda_sample(cuda__inactive_split=10 * GIB)))
    assert "active >= allocated" in _failed(gv.sample_checks(_cuda_sample(cuda__active=GIB)))
    assert "NVML used <= total" in _failed(gv.sample_checks(_cuda_sample(nvml__used=81 * GIB)))
    assert "NVML process use >= reserved" in _failed(gv.sample_checks(_cuda_sample(nvml__process_used=49 * GIB)))
    assert "other small when no transient exists" in _failed(gv.sample_checks(_cuda_sample(), None, 100 * MiB))


def test_sample_checks_on_a_real_cpu_sample_say_there_is_no_allocator():
    model = torch.nn.Linear(8, 8)
    agent = vramtop_agent.watch(model, publish=False)
    try:
        checks = gv.sample_checks(agent.snapshot(), None)
    finally:
        agent.stop()
    assert checks == [("allocator stats in the sample", False, "no 'cuda' map (device 'cpu')")]


@pytest.mark.parametrize("lora", [False, True])
def test_reference_blocks_agree_with_the_agent_on_a_real_cpu_step(lora):
    """The script's independent sums (data-pointer keyed) against the agent's, where both exist: on CPU."""
    from vramtop.tiny import add_lora, build_model, make_batch

    model = build_model(vocab_size=512)
    if lora:
        model = add_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    agent = vramtop_agent.watch(model, opt, publish=False)
    try:
        batch = make_batch(model, 2, 16)
        for _ in range(2):
            out = model(**batch)
            out.loss.backward()
            after_backward = gv.reference_checks(agent.snapshot(), gv.reference_blocks(model, opt))
            opt.step()
            opt.zero_grad(set_to_none=True)
        after_zero = gv.reference_checks(agent.snapshot(), gv.reference_blocks(model, opt))
    finally:
        agent.stop()
    assert _failed(after_backward) == set() and _failed(after_zero) == set()
    ref = gv.reference_blocks(model, opt)
    assert ref["gradients"] == 0 and ref["optimizer"] > 0
    assert gv.quant_extras(next(model.parameters())) == []


def test_peak_checks():
    same = {"forward": 10 * MiB, "backward": 30 * MiB, "optimizer": 12 * MiB}
    assert _failed(gv.peak_checks(same, dict(same))) == set()
    assert _failed(gv.peak_checks(same, {**same, "backward": 30 * MiB + 4096})) == set()  # within 1 MiB
    assert _failed(gv.peak_checks(same, {**same, "backward": 40 * MiB})) == {"backward peak == max_memory_allocated"}
    assert _failed(gv.peak_checks(same, {})) == {f"{p} peak == max_memory_allocated" for p in gv.PHASES}


def test_oom_checks_on_a_real_event_and_on_the_cuda_shape(list_sink):
    net = torch.nn.Linear(8, 8)
    agent = vramtop_agent.watch(net, publish=False, sinks=[list_sink], sample_hz=0)
    oom.record(agent, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."), "forward")
    agent.stop()
    [event] = list_sink.of("oom")
    params = sum(p.numel() * 4 for p in net.parameters())
    failed = _failed(gv.oom_checks(event, params))
    assert failed == {"it carries the allocator's segment map"}  # CPU: no allocator, no segments (never faked)
    cuda_event = dict(event, cuda={"reserved": 6 * MiB},
                      segments=[{"total_size": 2 * MiB, "blocks": []}, {"total_size": 4 * MiB, "blocks": []}])
    assert _failed(gv.oom_checks(cuda_event, params)) == set()
    assert "segment sizes add up to reserved" in _failed(gv.oom_checks(dict(cuda_event, cuda={"reserved": 8 * MiB})))
    assert _failed(gv.oom_checks(None)) == {"an oom event was emitted"}


def test_overhead_ratios_are_medians_over_bare():
    r = gv.overhead_ratios({"bare": [1.0, 1.0, 5.0], "agent": [1.01, 1.02, 1.03], "profiler": [2.0, 2.0, 9.0]})
    assert r == {"agent": pytest.approx(1.02), "profiler": pytest.approx(2.0)}
