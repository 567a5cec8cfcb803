"""GPU truth: check what the agent reports against what CUDA says, on real fine-tunes.

    python bench/gpu_validate.py                 # everything, ~4-8 minutes on one H100
    python bench/gpu_validate.py --quick         # the tiny model only (~1 minute)
    pytest -m gpu tests/test_gpu.py              # the same, as a test (skips without CUDA)

Configurations: the tiny Llama of the demo (full fine-tune, LoRA) and a
~1.1B-parameter Llama built from a config (TinyLlama-1.1B's shape, random
weights, bf16): full, LoRA, QLoRA (bitsandbytes NF4; skipped, with the reason,
when bitsandbytes has no usable CUDA build). Nothing is downloaded.

Checks, each printed as one PASS/FAIL/SKIP line:
- at every sample taken with agent.snapshot() on the training thread (before
  and in the middle of forward, after forward, after backward, after the
  optimizer step, after zero_grad) and in the middle of backward (autograd's
  thread): the four blocks + other == torch.cuda.memory_allocated(), read
  independently right after; the four blocks alone <= allocated (the agent
  clamps other at 0, so this is what makes the sum meaningful); the
  parameters / gradients / optimizer blocks equal independent sums of the
  tensors' distinct storages; and right after optimizer.step() +
  zero_grad(set_to_none=True), when no transient exists, `other` is small;
- allocator and driver consistency: reserved >= allocated, active >=
  allocated, inactive_split <= reserved - allocated, NVML used <= total, and
  NVML's figure for this process >= reserved (when the driver shows it);
- phase peaks: the agent's forward / backward / optimizer peaks of a step
  equal max_memory_allocated() bracketing each phase of a separate identical
  step (reset_peak_memory_stats at each boundary), within 1 MiB;
- OOM: one forced with torch.cuda.set_per_process_memory_fraction is
  recorded (an "oom" event with the bytes requested, the blocks and the
  allocator's segment map, whose sizes add up to reserved), and stored in a
  recording;
- overhead: median step time (with a CUDA sync) with the agent at default
  settings, with torch.profiler(profile_memory=True) and with
  torch.cuda.memory._record_memory_history(), each over the same steps
  without any of them, interleaved in one run (RATIO lines).

Exit status: 0 when every check ran passed, 1 when one failed, 2 without CUDA.
Rows stream as they come (a run cut short still shows what it checked);
--json writes them too. On CUDA the NVML checks read the driver right after
each sample (the agent caches NVML for a second, while reserved is fresh).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "agent"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

MiB = 1 << 20
FOUR = ("parameters", "gradients", "optimizer", "activations")
BLOCKS = (*FOUR, "other")
PHASES = ("forward", "backward", "optimizer")
CONFIGS = ("tiny-full", "tiny-lora", "1b-full", "1b-lora", "1b-qlora")
# Rough H100 seconds per part, so that a part that would overrun the budget is skipped, not cut.
COST_S = {"tiny-full": 15, "tiny-lora": 45, "oom": 20, "1b-full": 45, "1b-lora": 75, "1b-qlora": 70}
OVERHEAD_MODES = ("bare", "agent", "agent-record", "agent-track-every-step", "profiler", "memory-history")

# A ~1.1B-parameter Llama (TinyLlama-1.1B's shape), built from the config with random weights.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                tie_word_embeddings=False, attn_implementation="sdpa")


# ---------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_validate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only")
    p.add_argument("--only", default=None, metavar="CONFIGS",
                   help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=4, help="agent-measured training steps per configuration (>= 3)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the 1B runs")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length of the 1B runs")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the overhead measurement")
    p.add_argument("--overhead-steps", type=int, default=8, help="timed steps per mode and round")
    p.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    p.add_argument("--no-oom", action="store_true", help="skip the forced OOM")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget (default 450): a part whose usual cost would overrun it is skipped, "
                   "with a SKIP line; order: tiny runs, the OOM, the 1B runs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be at least 3 (the first steps warm the allocator and create optimizer state)")
    if args.rounds < 1 or args.overhead_steps < 2:
        p.error("--rounds must be >= 1 and --overhead-steps >= 2")
    if args.only:
        chosen = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = [c for c in chosen if c not in CONFIGS]
        if unknown:
            p.error(f"unknown configuration(s) {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
        args.configs = chosen
    else:
        args.configs = [c for c in CONFIGS if not (args.quick and c.startswith("1b"))]
    return args


# ---------------------------------------------------------------------- the report


class Report:
    """PASS / FAIL / SKIP / INFO / RATIO rows, printed as they come."""

    def __init__(self, out=None):
        self.rows: list[dict] = []
        self.out = out if out is not None else sys.stdout

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.rows.append({"status": status, "name": name, "detail": detail})
        print(f"{status:<5} {name:<62} {detail}".rstrip(), file=self.out, flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.add("PASS" if ok else "FAIL", name, detail)
        return bool(ok)

    def skip(self, name: str, why: str) -> None:
        self.add("SKIP", name, why)

    def info(self, name: str, detail: str) -> None:
        self.add("INFO", name, detail)

    def ratio(self, name: str, value: float, detail: str = "") -> None:
        shown = f"{value:.3f}x" if math.isfinite(value) else "n/a"
        self.add("RATIO", name, shown + (f"  {detail}" if detail else ""))

    @contextlib.contextmanager
    def guard(self, name: str):
        """A part that raises is one FAIL line (with the reason), never the end of the run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the run goes on
            self.add("FAIL", name, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            traceback.print_exc(file=sys.stderr)

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    def exit_code(self) -> int:
        if self.count("FAIL"):
            return 1
        return 0 if self.count("PASS") else 1

    def summary(self) -> str:
        return (f"{self.count('PASS')} passed, {self.count('FAIL')} failed, {self.count('SKIP')} skipped"
                + "".join(f"\n  {r['status']} {r['name']}: {r['detail']}" for r in self.rows if r["status"] == "RATIO"))


class Tally:
    """One check over many samples: one line, N/N, with the worst case."""

    def __init__(self):
        self.results: dict[str, list] = {}

    def add(self, name: str, ok: bool, detail: str, where: str) -> None:
        r = self.results.setdefault(name, [0, 0, None, detail])
        r[3] = detail  # shown when all pass: the latest sample
        r[1] += 1
        if ok:
            r[0] += 1
        elif r[2] is None:
            r[2] = f"first failure at {where}: {detail}"

    def report(self, report: Report, prefix: str) -> None:
        for name, (good, total, failure, detail) in self.results.items():
            report.check(f"{prefix}: {name}", good == total,
                         f"{good}/{total} samples" + (f"; {failure}" if failure else f"; e.g. {detail}"))


# ---------------------------------------------------------------------- pure checks (tested on CPU)


def fmt(n) -> str:
    return f"{n / MiB:.1f} MiB" if isinstance(n, (int, float)) else str(n)


def sample_checks(sample: dict, allocated_now: int | None = None,
                  other_limit: int | None = None, nvml: dict | None = None) -> list[tuple[str, bool, str]]:
    """Consistency of one agent sample taken on a CUDA device: (check, ok, detail) triples.

    allocated_now: torch.cuda.memory_allocated() read right after the sample, on the same thread.
    other_limit: when given, `other` must not exceed it (a moment without transients).
    nvml: the driver's numbers read right after the sample (the agent's own are cached for up to a
          second, while reserved is read fresh); default: the sample's.
    """
    out: list[tuple[str, bool, str]] = []
    blocks = sample.get("blocks") or {}
    cuda = sample.get("cuda")
    if not isinstance(cuda, dict):
        return [("allocator stats in the sample", False, f"no 'cuda' map (device {sample.get('device')!r})")]
    four = sum(int(blocks.get(k, 0)) for k in FOUR)
    total = four + int(blocks.get("other", 0))
    alloc, reserved = int(cuda["allocated"]), int(cuda["reserved"])
    out.append(("four blocks + other == memory_allocated",
                total == alloc and (allocated_now is None or total == allocated_now),
                f"blocks {total} B, sample's allocated {alloc} B, memory_allocated() {allocated_now} B"))
    out.append(("four blocks <= allocated (other >= 0 before the clamp)", four <= alloc,
                f"four {fmt(four)}, allocated {fmt(alloc)}, other {fmt(alloc - four)}"))
    out.append(("reserved >= allocated", reserved >= alloc, f"reserved {fmt(reserved)}, allocated {fmt(alloc)}"))
    if "active" in cuda:
        out.append(("active >= allocated", int(cuda["active"]) >= alloc,
                    f"active {fmt(cuda['active'])}, allocated {fmt(alloc)}"))
    if "inactive_split" in cuda:
        out.append(("inactive_split <= reserved - allocated", int(cuda["inactive_split"]) <= reserved - alloc,
                    f"inactive split {fmt(cuda['inactive_split'])}, cache {fmt(reserved - alloc)}"))
    nv = nvml if nvml is not None else sample.get("nvml")
    if isinstance(nv, dict) and "total" in nv and "used" in nv:
        out.append(("NVML used <= total", nv["used"] <= nv["total"],
                    f"used {fmt(nv['used'])}, total {fmt(nv['total'])}"))
        if "process_used" in nv:
            out.append(("NVML process use >= reserved", nv["process_used"] >= reserved,
                        f"process {fmt(nv['process_used'])}, reserved {fmt(reserved)}"))
    if other_limit is not None:
        other = int(blocks.get("other", 0))
        out.append(("other small when no transient exists", other <= other_limit,
                    f"other {fmt(other)} (limit {fmt(other_limit)}) of allocated {fmt(alloc)}"))
    return out


def other_limit_for(allocated: int) -> int:
    """What `other` may hold with no transients: inputs, buffers, a cuBLAS workspace per thread (256 MiB + 1%).

    Loose on purpose: a missed block (optimizer states, stale gradients, a kept activation) is
    gigabytes on the 1B runs; the exact per-block checks catch the small ones.
    """
    return 256 * MiB + allocated // 100


def storage_sum(tensors) -> int:
    """Bytes of distinct storages, keyed by (device, data pointer): not the agent's key."""
    seen: dict = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def quant_extras(param) -> list:
    """bitsandbytes' block constants kept beside a 4/8-bit weight (independently of the agent's code)."""
    out = []
    qs = getattr(param, "quant_state", None)
    if qs is not None:
        for owner in (qs, getattr(qs, "state2", None)):
            for name in ("absmax", "code", "offset"):
                v = getattr(owner, name, None) if owner is not None else None
                if v is not None and hasattr(v, "untyped_storage"):
                    out.append(v)
    scb = getattr(param, "SCB", None)
    if scb is not None and hasattr(scb, "untyped_storage"):
        out.append(scb)
    return out


def reference_blocks(model, optimizer, device: str | None = None) -> dict:
    """parameters / gradients / optimizer from the tensors themselves, with the agent's precedence.

    `device`: count only tensors there, as the sample's `blocks` do (AdamW keeps its `step`
    counters on the CPU, so they belong to the sample's devices["cpu"], not to the GPU's blocks).
    """
    params = list(model.parameters())
    if device is not None:
        here = lambda ts: [t for t in ts if t is not None and str(t.device) == device]  # noqa: E731
    else:
        here = lambda ts: ts  # noqa: E731
    p_tensors = params + [q for p in params for q in quant_extras(p)]
    p_keys = {(str(t.device), t.untyped_storage().data_ptr()) for t in p_tensors}

    def outside(ts):
        return [t for t in ts if t is not None and (str(t.device), t.untyped_storage().data_ptr()) not in p_keys]

    grads = outside([p.grad for p in params])
    g_keys = {(str(t.device), t.untyped_storage().data_ptr()) for t in grads}
    states = [v for st in optimizer.state.values() if isinstance(st, dict) for v in st.values()
              if hasattr(v, "untyped_storage")]
    states = [t for t in outside(states) if (str(t.device), t.untyped_storage().data_ptr()) not in g_keys]
    return {"parameters": storage_sum(here(p_tensors)), "gradients": storage_sum(here(grads)),
            "optimizer": storage_sum(here(states))}


def reference_checks(sample: dict, ref: dict) -> list[tuple[str, bool, str]]:
    blocks = sample.get("blocks") or {}
    return [(f"{k} == distinct storages' bytes", int(blocks.get(k, -1)) == ref[k],
             f"agent {blocks.get(k)} B, reference {ref[k]} B") for k in ("parameters", "gradients", "optimizer")]


def peak_checks(agent_peaks: dict, bracket_peaks: dict, tol: int = MiB) -> list[tuple[str, bool, str]]:
    out = []
    for p in PHASES:
        a, b = agent_peaks.get(p), bracket_peaks.get(p)
        both = isinstance(a, int) and isinstance(b, int)
        out.append((f"{p} peak == max_memory_allocated", both and abs(a - b) <= tol,
                    f"agent {fmt(a)}, bracketed {fmt(b)}, diff {a - b if both else '?'} B (tolerance {fmt(tol)})"))
    return out


def oom_checks(event: dict | None, model_param_bytes: int | None = None) -> list[tuple[str, bool, str]]:
    if event is None:
        return [("an oom event was emitted", False, "none")]
    out = [("an oom event was emitted", True, f"phase {event.get('phase')}, where {event.get('where')}")]
    req = event.get("requested")
    out.append(("it carries the bytes requested", isinstance(req, int) and req > 0, f"requested {fmt(req)}"))
    segs = event.get("segments")
    out.append(("it carries the allocator's segment map", isinstance(segs, list) and len(segs) > 0,
                f"{len(segs) if isinstance(segs, list) else 'no'} segments"))
    cuda = event.get("cuda") or {}
    if isinstance(segs, list) and segs and "reserved" in cuda:
        total = sum(int(s.get("total_size") or 0) for s in segs)
        out.append(("segment sizes add up to reserved", total == cuda["reserved"],
                    f"segments {fmt(total)}, reserved {fmt(cuda['reserved'])}"))
    if model_param_bytes is not None:
        got = (event.get("blocks") or {}).get("parameters")
        out.append(("its blocks hold the parameters", got == model_param_bytes,
                    f"event {got} B, model {model_param_bytes} B"))
    return out


def overhead_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median step time of each mode over the bare one's."""
    base = statistics.median(times["bare"]) if times.get("bare") else float("nan")
    return {m: (statistics.median(ts) / base if ts and base > 0 else float("nan"))
            for m, ts in times.items() if m != "bare"}


# ---------------------------------------------------------------------- CUDA drivers


class ListSink:
    def __init__(self):
        self.messages: list[dict] = []

    def send(self, msg):
        self.messages.append(msg)

    def close(self):
        pass

    def of(self, kind):
        return [m for m in self.messages if m.get("type") == kind]


def _free():
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _bnb_usable() -> str | None:
    """None when bitsandbytes can quantize on this GPU, else why not."""
    try:
        import torch
        from bitsandbytes.functional import quantize_4bit

        q, state = quantize_4bit(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
        torch.cuda.synchronize()
        return None if q.is_cuda else "quantize_4bit did not run on CUDA"
    except Exception as exc:  # noqa: BLE001
        first_line = str(exc).splitlines()[0][:120] if str(exc) else ""
        return f"bitsandbytes is not usable on CUDA here ({type(exc).__name__}: {first_line})"


def build(config: str, args):
    """(model, optimizer, batch) on cuda:0 for one configuration."""
    import torch

    from vramtop.tiny import add_lora, build_model, llama_config, make_batch

    dev = torch.device("cuda", 0)
    if config.startswith("tiny"):
        model = build_model(vocab_size=512)
        if config == "tiny-lora":
            model = add_lora(model, rank=8)
        model.to(dev)
        batch = make_batch(model, 4, 128, device=dev)
    else:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        cfg = llama_config(**LLAMA_1B)
        if config == "1b-qlora":
            model = _qlora_1b(cfg)
        else:
            with torch.device(dev):
                model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.config.use_cache = False
        if config in ("1b-lora", "1b-qlora"):
            model = add_lora(model, rank=16)
        batch = make_batch(model, args.batch, args.seq_len, device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    return model, opt, batch


def _qlora_1b(cfg):
    """Random bf16 weights saved once, loaded back in NF4 by transformers + bitsandbytes (the QLoRA path)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="vramtop-1b-") as d:
        with torch.device("cuda", 0):
            LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
        _free()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, torch_dtype=torch.bfloat16,
                                                 device_map={"": 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _middle_layer(model):
    import torch

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if layers:
        return layers[len(layers) // 2]
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return mods[len(mods) // 2]


def validate_config(config: str, args, report: Report) -> None:
    import torch

    import vramtop_agent

    t0 = time.time()
    model, opt, batch = build(config, args)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for g in opt.param_groups for p in g["params"])
    report.info(f"{config}: built", f"{n_params / 1e9:.3f}B parameters, {n_train / 1e6:.1f}M trainable, "
                f"batch {list(batch['input_ids'].shape)}, in {time.time() - t0:.1f}s")
    sink = ListSink()
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[sink])
    tally, ref_tally = Tally(), Tally()
    others: list[int] = []
    lock = threading.Lock()

    from vramtop_agent import devices

    fresh_nvml = getattr(devices, "_nvml_stats", devices.nvml_stats)  # uncached where the agent caches it

    def take(where: str, fresh=None, quiet_moment=False):
        s = agent.snapshot(fresh=fresh)
        now = torch.cuda.memory_allocated(0)
        nv = fresh_nvml(0)
        with lock:
            for name, ok, detail in sample_checks(s, now, other_limit_for(now) if quiet_moment else None, nv):
                tally.add(name, ok, detail, where)
            if quiet_moment:
                others.append(int(s["blocks"]["other"]))
        return s

    def mid_forward(module, args, output):
        take("mid-forward")
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if torch.is_tensor(out) and out.requires_grad:
            # Fires on autograd's thread, inside backward: the agent's gradient cache, as its sampler uses it.
            out.register_hook(lambda grad: take("mid-backward", fresh=False) and None)
        return None  # a forward hook that returns something replaces the module's output

    mid = _middle_layer(model)
    hooks = []
    try:
        hooks.append(mid.register_forward_hook(mid_forward))
        for step in range(args.steps):
            if step == args.steps - 1:  # the last step runs as the bracketed one will: no hooks of ours
                for h in hooks:
                    h.remove()
                hooks = []
            take(f"step {step} before forward")
            out = model(**batch)
            take(f"step {step} after forward")
            out.loss.backward()
            s = take(f"step {step} after backward")
            for name, ok, detail in reference_checks(s, reference_blocks(model, opt, s.get("device"))):
                ref_tally.add(name, ok, detail, f"step {step} after backward")
            opt.step()
            take(f"step {step} after optimizer step")
            opt.zero_grad(set_to_none=True)
            del out
            s = take(f"step {step} after zero_grad", quiet_moment=step >= 1)
            for name, ok, detail in reference_checks(s, reference_blocks(model, opt, s.get("device"))):
                ref_tally.add(name, ok, detail, f"step {step} after zero_grad")
        torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
        agent.stop()
    tally.report(report, config)
    ref_tally.report(report, config)
    if len(others) >= 2:
        report.check(f"{config}: other stable from step to step (no block missed)",
                     max(others) - min(others) <= 8 * MiB, f"after zero_grad: {', '.join(fmt(o) for o in others)}")
    steps = sink.of("step")
    report.check(f"{config}: one step summary per optimizer step", len(steps) == args.steps,
                 f"{len(steps)} of {args.steps}")

    # Phase peaks: the agent's last step against our own bracketing of an identical step, agent gone.
    with report.guard(f"{config}: phase peaks"):
        torch.cuda.synchronize()
        bracket = {}
        torch.cuda.reset_peak_memory_stats(0)
        out = model(**batch)
        bracket["forward"] = torch.cuda.max_memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        out.loss.backward()
        bracket["backward"] = torch.cuda.max_memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        opt.step()
        bracket["optimizer"] = torch.cuda.max_memory_allocated(0)
        opt.zero_grad(set_to_none=True)
        del out
        last = steps[-1]
        for name, ok, detail in peak_checks(last["peaks"], bracket):
            report.check(f"{config}: {name}", ok, detail)
        report.check(f"{config}: step peak == max of the phase peaks", last["peak"] == max(last["peaks"].values()),
                     f"peak {fmt(last['peak'])} in {last['peak_phase']}")
        step_ms = f"{last['step_time'] * 1000:.0f} ms" if last.get("step_time") else "-"
        report.info(f"{config}: last step",
                    f"fwd {fmt(last['peaks']['forward'])}, bwd {fmt(last['peaks']['backward'])}, "
                    f"opt {fmt(last['peaks']['optimizer'])}, backward spike {fmt(last['backward_spike'])}, {step_ms}")
    with report.guard(f"{config}: derived activations"):
        derived_checks(config, model, opt, batch, report)
    if not args.no_overhead and config in ("tiny-lora", "1b-lora"):
        if time.time() - START > args.budget_s:
            report.skip(f"{config}: overhead", "time budget spent")
        else:
            with report.guard(f"{config}: overhead"):
                measure_overhead(config, model, opt, batch, args, report)
    # take() closes over `agent`: rebinding it (not del) drops the stopped agent's hold on the model.
    agent = None
    del model, opt, batch, sink
    _free()


def derived_checks(config: str, model, opt, batch, report: Report, steps: int = 10) -> None:
    """Steps between tracked ones derive activations from the allocator: within 1 % of the next tracked step.
    Samples come from the training thread (edge), not from a sampler thread."""
    import torch

    import vramtop_agent

    sink = ListSink()
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[sink], track_every=3, sample_hz=50)
    try:
        for _ in range(steps):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    finally:
        agent.stop()
    summaries = sink.of("step")
    sources = [s.get("activations_source") for s in summaries]
    report.check(f"{config}: tracked and derived steps both ran", "tracked" in sources and "derived" in sources,
                 " ".join(str(x)[0] for x in sources))
    checks = [s["derived_check"] for s in summaries if s.get("derived_check")]
    report.check(f"{config}: a tracked step checked the derivation", bool(checks), f"{len(checks)} checks")
    for c in checks:
        err = abs(c["derived"] - c["tracked"]) / max(c["tracked"], 1)
        report.check(f"{config}: derived activations within 1% of the next tracked step", err <= 0.01,
                     f"derived {fmt(c['derived'])}, tracked {fmt(c['tracked'])} ({err:.2%})")
    samples = sink.of("sample")
    edge = sum(1 for s in samples if s.get("source") == "edge")
    report.check(f"{config}: samples taken on the training thread (edge samples)",
                 bool(samples) and edge >= 0.9 * len(samples), f"{edge} of {len(samples)} are edge samples")


def timed_steps(model, opt, batch, n: int) -> list[float]:
    """Wall time of n training steps, each between two CUDA synchronisations (its GPU work counted in it).

    Also bench/gpu_overhead.py's timer.
    """
    import torch

    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def measure_overhead(config: str, model, opt, batch, args, report: Report) -> None:
    import torch

    import vramtop_agent

    def steps(n: int) -> list[float]:
        return timed_steps(model, opt, batch, n)[1:]  # the first step of a block pays the mode's start-up

    def run(mode: str) -> list[float]:
        n = args.overhead_steps + 1
        if mode == "bare":
            return steps(n)
        if mode.startswith("agent"):
            options = {"agent-record": {"record": os.path.join(tempfile.mkdtemp(prefix="vramtop-ovh-"), "r.vramtop")},
                       "agent-track-every-step": {"track_every": 1}}.get(mode, {})
            agent = vramtop_agent.watch(model, opt, **options)  # default: publishing, 10 Hz edge sampling
            try:
                steps(3)  # a new agent tracks its first steps: not the steady state measured here
                return steps(n)
            finally:
                agent.stop()
        if mode == "profiler":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True):
                return steps(n)
        torch.cuda.memory._record_memory_history(max_entries=100_000)
        try:
            return steps(n)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    steps(2)
    times: dict[str, list[float]] = {m: [] for m in OVERHEAD_MODES}
    for r in range(args.rounds):
        k = r % len(OVERHEAD_MODES)
        for mode in OVERHEAD_MODES[k:] + OVERHEAD_MODES[:k]:  # interleaved, rotating the order
            times[mode] += run(mode)
            _free_cache_only()
    ratios = overhead_ratios(times)
    base = statistics.median(times["bare"])
    report.info(f"{config}: bare step (median)", f"{base * 1000:.2f} ms over {len(times['bare'])} steps")
    labels = {"agent": "vramtop agent (default settings)", "agent-record": "vramtop agent, recording on",
              "agent-track-every-step": "vramtop agent, activations tracked every step",
              "profiler": "torch.profiler(profile_memory=True)",
              "memory-history": "cuda.memory._record_memory_history"}
    for mode, ratio in ratios.items():
        report.ratio(f"{config}: {labels[mode]} / bare", ratio,
                     f"median {statistics.median(times[mode]) * 1000:.2f} ms")


def _free_cache_only():
    gc.collect()


def validate_oom(report: Report) -> None:
    """A real OOM, forced with set_per_process_memory_fraction, recorded with its segment map."""
    import torch

    import vramtop_agent
    from vramtop.tiny import build_model, make_batch

    oom_py = ROOT / "agent" / "vramtop_agent" / "oom.py"
    if not oom_py.exists():
        report.skip("oom: recorded with its segment map", "not implemented (no vramtop_agent/oom.py)")
        return
    from vramtop.recording import Recording

    dev = torch.device("cuda", 0)
    model = build_model(vocab_size=512).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    param_bytes = storage_sum(list(model.parameters()))
    sink = ListSink()
    caught = None
    with tempfile.TemporaryDirectory(prefix="vramtop-oom-") as d:
        path = os.path.join(d, "oom.vramtop")
        total = torch.cuda.get_device_properties(0).total_memory
        with vramtop_agent.watch(model, opt, publish=False, sinks=[sink], record=path):
            model(**make_batch(model, 2, 64, device=dev)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _free()
            limit = torch.cuda.memory_reserved(0) + 256 * MiB
            torch.cuda.set_per_process_memory_fraction(min(limit / total, 1.0), 0)
            try:
                # eager attention on 256 x 1024 tokens: GiBs of scores in the first layer's forward
                model(**make_batch(model, 256, 1024, device=dev)).loss.backward()
            except torch.OutOfMemoryError as exc:
                caught = str(exc)  # not the exception: its traceback would keep the failed forward's tensors
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, 0)
        report.check("oom: set_per_process_memory_fraction raised OutOfMemoryError", caught is not None,
                     caught.splitlines()[0][:120] if caught else "no OOM at all")
        events = sink.of("oom")
        for name, ok, detail in oom_checks(events[0] if events else None, param_bytes):
            report.check(f"oom: {name}", ok, detail)
        if events:
            report.check("oom: exactly one event for one OOM", len(events) == 1, f"{len(events)} events")
            with report.guard("oom: stored in the recording"):
                rec = Recording.open(path)
                try:
                    stored = rec.ooms()
                    ok = bool(stored) and stored[0].get("segments") == events[0].get("segments")
                    report.check("oom: stored in the recording with its segment map", ok,
                                 f"{len(stored)} oom event(s), {rec.counts().get('allocator_snapshots')} snapshot(s)")
                finally:
                    rec.close()
    del model, opt
    _free()


# ---------------------------------------------------------------------- main


START = time.time()


def environment(report: Report) -> bool:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        report.skip("CUDA", f"torch is not importable: {exc}")
        return False
    report.info("torch", f"{torch.__version__} (CUDA build {torch.version.cuda})")
    if not torch.cuda.is_available():
        report.skip("CUDA", "torch.cuda.is_available() is False: nothing validated (run this on a GPU machine)")
        return False
    props = torch.cuda.get_device_properties(0)
    report.info("device",
                f"{props.name}, {props.total_memory / 2 ** 30:.1f} GiB, capability {props.major}.{props.minor}")
    from vramtop_agent import devices

    nv = devices.nvml_stats(0)
    report.info("NVML", "unavailable" if nv is None else
                f"total {fmt(nv.get('total'))}, used {fmt(nv.get('used'))}, "
                f"process use {'shown' if 'process_used' in nv else 'hidden by the driver/container'}")
    return True


def main(argv: list[str] | None = None) -> int:
    global START
    args = parse_args(argv)
    START = time.time()
    report = Report()
    print("vramtop GPU validation: " + ", ".join(args.configs), flush=True)
    if not environment(report):
        return 2
    import torch

    torch.manual_seed(0)
    # The OOM goes right after the small runs: cheap, and not starved by the 1B ones.
    parts = [c for c in args.configs if c.startswith("tiny")] + ["oom"] + [c for c in args.configs
                                                                         if not c.startswith("tiny")]
    for part in parts:
        if part == "oom" and args.no_oom:
            report.skip("oom", "--no-oom")
            continue
        left = args.budget_s - (time.time() - START)
        cost = COST_S.get(part, 30) - (30 if args.no_overhead and part in ("tiny-lora", "1b-lora") else 0)
        if cost > left:
            report.skip(part, f"not started: about {cost}s of work, {max(left, 0):.0f}s of the "
                        f"{args.budget_s:.0f}s budget left (--budget-s)")
            continue
        if part == "1b-qlora":
            why = _bnb_usable()
            if why:
                report.skip(part, why)
                continue
        with report.guard(f"{part}: run"):
            if part == "oom":
                validate_oom(report)
            else:
                validate_config(part, args, report)
        _free()
    print(f"\n{report.summary()}\n(wall time {time.time() - START:.0f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report.rows, indent=1))
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
