"""The live gap: rows with causes, ranked advice, and the calibrated what-if."""

from __future__ import annotations

import pytest

from vramtop import gap
from vramtop_agent.estimator import Setup, estimate, get_preset

GIB = 2**30


@pytest.fixture(scope="module")
def big():
    """Full fp32 fine-tuning of Llama-3-8B, batch 4 x 2048, no checkpointing: everything to advise."""
    return estimate(get_preset("llama-3-8b"), Setup(method="full", weight_dtype="fp32", batch=4, seq_len=2048))


def test_matching_blocks_have_no_cause(big):
    rows = gap.gap_rows(big, dict(big.blocks), cuda={"reserved": 100 * GIB, "allocated": 95 * GIB})
    by = {r.block: r for r in rows}
    for block in ("parameters", "gradients", "optimizer", "activations", "other"):
        assert by[block].difference == 0 and by[block].cause is None
    assert by["allocator slack"].actual == 5 * GIB and by["allocator slack"].cause is None  # 5% is no fragmentation


def test_causes_in_plain_words(big):
    measured = dict(big.blocks, activations=int(2.4 * big.blocks["activations"]), gradients=0,
                    parameters=big.blocks["parameters"] * 2)
    rows = {r.block: r for r in gap.gap_rows(
        big, measured, cuda={"reserved": 100 * GIB, "allocated": 69 * GIB},
        nvml={"process_used": 100 * GIB + int(1.1 * GIB)}, batch=[4, 2048])}
    assert rows["activations"].cause.startswith("activations 2.4x the estimate: gradient checkpointing is off")
    assert rows["gradients"].cause.startswith("no gradients right now")
    assert rows["parameters"].cause.startswith("parameters 2x the estimate")
    assert rows["allocator slack"].cause == ("reserved - allocated is 31% of reserved: fragmentation; "
                                             "try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    assert rows["non-PyTorch"].cause.startswith("non-PyTorch 1.10 GiB: CUDA context and library workspaces")


def test_batch_mismatch_is_named(big):
    measured = dict(big.blocks, activations=big.blocks["activations"] // 4)
    row = next(r for r in gap.gap_rows(big, measured, batch=[1, 2048]) if r.block == "activations")
    assert "1x2048" in row.cause and "4x2048" in row.cause


def test_advice_order_savings_and_costs(big):
    items = gap.advice(big, card_bytes=80 * GIB)
    keys = [i["key"] for i in items]
    assert keys == [k for k in gap.ADVICE_ORDER if k in keys]          # the seeds' order
    assert keys[:3] == ["bf16", "micro-batch", "grad-ckpt"]
    assert all(i["saving"] > 0 and i["cost"] for i in items)
    assert sorted(i["rank"] for i in items) == list(range(1, len(items) + 1))
    by_saving = sorted(items, key=lambda i: -i["saving"])
    assert [i["rank"] for i in by_saving] == list(range(1, len(items) + 1))
    ckpt = next(i for i in items if i["key"] == "grad-ckpt")
    assert "20-30% slower" in ckpt["cost"]
    # The predicted saving is the re-estimated peak difference, not a rule of thumb.
    after = estimate(get_preset("llama-3-8b"), Setup(method="full", weight_dtype="fp32", batch=4, seq_len=2048,
                                                     grad_ckpt=True))
    assert ckpt["saving"] == big.peak - after.peak
    assert all(i["fits"] is (i["new_peak"] <= 80 * GIB) for i in items)


def test_advice_skips_what_is_already_done():
    est = estimate(get_preset("llama-2-7b"), Setup(method="qlora", batch=1, seq_len=1024, grad_ckpt=True,
                                                   optimizer="paged-adamw-8bit"))
    keys = [i["key"] for i in gap.advice(est)]
    assert "grad-ckpt" not in keys and "micro-batch" not in keys and "bf16" not in keys
    assert "8bit-optimizer" not in keys and "lora" not in keys


def _steps(est_dict, points, act_scale=1.0, extra=0):
    """Step summaries as the agent writes them, from estimates with a known distortion."""
    out = []
    for b, s in points:
        e = gap.reestimate(est_dict, batch=b, seq_len=s)
        acts = int(act_scale * e["blocks"]["activations"])
        out.append({"batch": [b, s], "eof_blocks": dict(e["blocks"], activations=acts),
                    "peak": e["peak_allocated"] + (acts - e["blocks"]["activations"]) + extra})
    return out


def test_calibration_recovers_a_known_scale():
    est = estimate(get_preset("llama-2-7b"), Setup(method="lora", batch=1, seq_len=512)).to_dict()
    steps = _steps(est, [(1, 512), (2, 512), (2, 1024)], act_scale=1.3, extra=200 * 2**20)
    cal = gap.calibrate(est, steps)
    assert cal.act_scale == pytest.approx(1.3, rel=1e-3) and cal.points == 3
    assert cal.peak_offset == pytest.approx(200 * 2**20, rel=1e-3)
    w = gap.what_if(est, {"batch": 4, "seq_len": 2048}, steps=steps, card_bytes=24 * GIB)
    raw = gap.reestimate(est, batch=4, seq_len=2048)
    assert w["predicted_activations"] == pytest.approx(1.3 * raw["blocks"]["activations"], rel=1e-3)
    assert w["predicted_peak"] == pytest.approx(
        raw["peak"] + 0.3 * raw["blocks"]["activations"] + 200 * 2**20, rel=1e-3)
    assert w["fits"] is (w["predicted_peak"] <= 24 * GIB)


def test_what_if_unchanged_reproduces_the_measurement():
    est = estimate(get_preset("mistral-7b"), Setup(method="qlora", batch=2, seq_len=1024, grad_ckpt=True)).to_dict()
    fewer_acts = dict(est["blocks"], activations=int(est["blocks"]["activations"] * 0.9))
    steps = [{"batch": [2, 1024], "eof_blocks": fewer_acts,
              "peak": est["peak_allocated"] + 123_456_789}]
    w = gap.what_if(est, {}, steps=steps)
    assert w["predicted_peak_allocated"] == pytest.approx(steps[0]["peak"], abs=2)
    assert "ratio" in w["calibration"]["notes"][0]


def test_what_if_changes_method_rank_and_checkpointing():
    est = estimate(get_preset("llama-3-8b"), Setup(method="full", batch=1, seq_len=2048)).to_dict()
    lora = gap.what_if(est, {"method": "lora", "lora_rank": 64, "grad_ckpt": True})
    qlora = gap.what_if(est, {"method": "qlora", "grad_ckpt": True})
    ckpt = gap.what_if(est, {"grad_ckpt": True}, card_bytes=80 * GIB)
    assert qlora["predicted_peak"] < lora["predicted_peak"] < ckpt["predicted_peak"]
    # Full fine-tuning with fp32 masters peaks in the optimizer step: checkpointing cannot lower that.
    assert est["peak_phase"] == "optimizer" and ckpt["predicted_peak"] <= est["peak"]
    assert ckpt["predicted_activations"] < est["blocks"]["activations"] / 5
    assert qlora["estimate"]["setup"]["weight_dtype"] == "nf4"
    assert "fits" in ckpt
    # Without checkpointing QLoRA's activations are fp32 (prepare_model_for_kbit_training upcasts the
    # embeddings, and Linear4bit returns its input dtype), so they outgrow bf16 LoRA's.
    q_acts = gap.what_if(est, {"method": "qlora"})["predicted_activations"]
    l_acts = gap.what_if(est, {"method": "lora"})["predicted_activations"]
    assert q_acts > 1.5 * l_acts
    with pytest.raises(ValueError, match="cannot change 'vocab_size'"):
        gap.what_if(est, {"vocab_size": 10})


def test_live_cpu_run_gap_and_what_if():
    """A real run whose model keeps more than the estimator knows (a tanh after every MLP, which
    saves its output): the gap names the activations, and the what-if calibrated on two measured
    sizes predicts a third size's activations and real peak."""
    torch = pytest.importorskip("torch")
    from test_estimator_accuracy import measure  # the same measurement as the accuracy matrix

    from vramtop.tiny import build_model, make_batch
    from vramtop_agent.estimator import describe_live

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(num_hidden_layers=2, attn_implementation="sdpa")
        for layer in model.model.layers:
            layer.mlp.register_forward_hook(lambda mod, args, out: torch.tanh(out))
        runs = {}
        for b, s in ((2, 64), (2, 128), (4, 128)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            runs[(b, s)] = measure(model, opt, make_batch(model, b, s))
        desc, setup = describe_live(model, opt, [2, 64])
    finally:
        torch.set_num_threads(before)
    est = estimate(desc, setup)
    first = runs[(2, 64)]
    rows = {r.block: r for r in gap.gap_rows(est, first["blocks"], eof_blocks=first["step"]["eof_blocks"],
                                             step=first["step"], batch=[2, 64])}
    assert rows["parameters"].difference == rows["optimizer"].difference == rows["gradients"].difference == 0
    assert rows["activations"].difference == 2 * 2 * 64 * 128 * 4  # one fp32 tanh output per layer
    assert "phase edges" in rows["peak"].cause  # CPU: the agent misses transients; the estimate does not
    steps = [runs[(2, 64)]["step"], runs[(2, 128)]["step"]]
    w = gap.what_if(est, {"batch": 4, "seq_len": 128}, steps=steps)
    truth = runs[(4, 128)]
    assert w["predicted_activations"] == pytest.approx(truth["step"]["eof_blocks"]["activations"], rel=0.01)
    raw = gap.reestimate(est.to_dict(), batch=4, seq_len=128)
    assert raw["blocks"]["activations"] < truth["step"]["eof_blocks"]["activations"]  # uncalibrated: too low
    assert abs(w["predicted_peak"] - truth["real_peak"]) <= 0.10 * truth["real_peak"]
