"""The live gap: the estimate beside the measurement, why they differ, what to try, what if.

Pure functions over plain dicts (the estimate as `Estimate.to_dict()` puts it
on the wire, the agent's blocks/step summaries/allocator stats), so the TUI,
`vramtop report` and the tests call them the same way. Nothing here imports
torch; re-estimating a changed setup runs the pure-Python estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vramtop_agent.estimator import BLOCKS, ModelDesc, Setup, fmt_bytes
from vramtop_agent.estimator import estimate as run_estimate

# A difference is worth a sentence when it is this large, relatively and absolutely.
REL_THRESHOLD = 0.10
ABS_THRESHOLD = 1 << 20
FRAGMENTATION_THRESHOLD = 0.20


# ---------------------------------------------------------------- estimate dicts


def as_dict(est) -> dict:
    """An Estimate or its to_dict() form -> the dict form."""
    return est.to_dict() if hasattr(est, "to_dict") else est


def rebuild(est: dict) -> tuple[ModelDesc, Setup]:
    """The model and setup an estimate dict was computed for."""
    m = dict(est["model"])
    s = dict(est["setup"])
    if s.get("lora_targets") is not None:
        s["lora_targets"] = tuple(s["lora_targets"])
    known = set(Setup.__dataclass_fields__)
    return ModelDesc(**{k: v for k, v in m.items() if k in ModelDesc.__dataclass_fields__}), \
        Setup(**{k: v for k, v in s.items() if k in known})


def reestimate(est: dict, model_changes: dict | None = None, **setup_changes) -> dict:
    arch = (est.get("model") or {}).get("arch")
    if est.get("engine") == "execute" and arch not in ("llama", "gpt2"):
        # Executing takes seconds: too slow for a live panel's many variants. Say where to get it instead.
        raise ValueError(f"re-estimating a {arch} model means executing it: run `vramtop estimate` with the "
                         f"new settings")
    model, setup = rebuild(est)
    if model_changes:
        model = ModelDesc(**{**model.to_dict(), **model_changes})
    return run_estimate(model, setup.with_(**setup_changes)).to_dict()


# ---------------------------------------------------------------- gap rows


@dataclass
class GapRow:
    block: str
    estimate: int
    actual: int
    difference: int
    cause: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.actual / self.estimate if self.estimate else None

    def to_dict(self) -> dict:
        return {"block": self.block, "estimate": self.estimate, "actual": self.actual,
                "difference": self.difference, "ratio": self.ratio, "cause": self.cause}


def _large(est: int, act: int) -> bool:
    diff = abs(act - est)
    return diff > ABS_THRESHOLD and diff > REL_THRESHOLD * max(est, 1)


def gap_rows(estimate, blocks: dict, *, eof_blocks: dict | None = None, step: dict | None = None,
             cuda: dict | None = None, nvml: dict | None = None, batch: list | None = None) -> list[GapRow]:
    """Estimate vs measurement per block, with the likely cause of each large difference.

    blocks:     the agent's current blocks (sample["blocks"]);
    eof_blocks: blocks at the end of forward of the last step (activations are compared there,
                because the estimate's activations are the end-of-forward ones);
    step:       the last step summary (its "peak" is compared with the estimated allocated peak);
    cuda, nvml: allocator stats and driver numbers, when on CUDA;
    batch:      [batch, seq_len] of the last forward input.
    """
    est = as_dict(estimate)
    setup = est["setup"]
    rows = []
    for block in BLOCKS:
        actual = blocks.get(block)
        if block == "activations" and eof_blocks is not None:
            actual = eof_blocks.get("activations")
        if actual is None:
            continue
        e = int(est["blocks"][block])
        if block == "other" and not cuda:
            # Without an allocator counter (CPU) the agent's "other" is the buffers only.
            e = int(est["other_parts"].get("buffers", 0))
        row = GapRow(block, e, int(actual), int(actual) - e)
        if _large(e, int(actual)):
            row.cause = _cause(block, e, int(actual), setup, batch, blocks)
        rows.append(row)
    if step and step.get("peak") is not None:
        e = int(est["peak_allocated"])
        a = int(step["peak"])
        row = GapRow("peak", e, a, a - e)
        if _large(e, a):
            row.cause = _peak_cause(e, a, step, setup, cuda)
        rows.append(row)
    if cuda and cuda.get("reserved"):
        slack = int(cuda["reserved"]) - int(cuda.get("allocated", 0))
        row = GapRow("allocator slack", int(est["other_parts"].get("allocator_overhead", 0)), slack,
                     slack - int(est["other_parts"].get("allocator_overhead", 0)))
        frac = slack / int(cuda["reserved"])
        if frac > FRAGMENTATION_THRESHOLD:
            row.cause = (f"reserved - allocated is {frac:.0%} of reserved: fragmentation; "
                         f"try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
        rows.append(row)
    if nvml and nvml.get("process_used") is not None and cuda and cuda.get("reserved") is not None:
        non_torch = int(nvml["process_used"]) - int(cuda["reserved"])
        e = int(est["other_parts"].get("cuda_context", 0))
        row = GapRow("non-PyTorch", e, non_torch, non_torch - e)
        if non_torch > 0:
            row.cause = (f"non-PyTorch {fmt_bytes(non_torch)}: CUDA context and library workspaces"
                         + (" (cuBLAS/cuDNN/NCCL workspaces, other libraries' allocations)"
                            if non_torch > 2 * e else ""))
        rows.append(row)
    return rows


def _cause(block: str, e: int, a: int, setup: dict, batch, blocks: dict) -> str:
    ratio = a / e if e else float("inf")
    times = f"{ratio:.1f}x the estimate" if e else "not in the estimate"
    if block == "activations":
        if batch and len(batch) >= 2 and (batch[0], batch[1]) != (setup["batch"], setup["seq_len"]):
            return (f"activations {times}: the run's batch x seq is {batch[0]}x{batch[1]}, "
                    f"the estimate assumed {setup['batch']}x{setup['seq_len']}")
        if a > e and not setup["grad_ckpt"] and ratio > 1.5:
            return (f"activations {times}: gradient checkpointing is off, and something keeps more than the "
                    "model's own ops (extra outputs such as output_hidden_states, custom layers, a loss kept "
                    "with its graph)")
        if a > e and setup["grad_ckpt"]:
            return (f"activations {times}: checkpointing looks inactive "
                    "(use_cache=True or model.train() missing disables it in HF)")
        if a > e:
            return (f"activations {times}: tensors saved beyond the model's layers "
                    "(extra outputs, custom ops, tensors with grad history kept across steps)")
        return (f"activations {times}: fused kernels or frozen parts save less than modelled "
                "(Liger/flash kernels, partial freezing)")
    if block == "parameters":
        if 1.8 < ratio < 2.2:
            return "parameters 2x the estimate: weights are in fp32, not 16-bit (load with torch_dtype=torch.bfloat16)"
        if 0.45 < ratio < 0.55:
            return "parameters half the estimate: weights are 16-bit where the estimate assumed fp32"
        return (f"parameters {times}: modules the estimate does not know "
                "(value head, extra adapters, untied or tied embeddings)")
    if block == "gradients":
        if a == 0:
            return "no gradients right now: they exist between backward and zero_grad()"
        if e == 0 or ratio > 4:
            return f"gradients {times}: more weights train than the setup says (is the base model frozen?)"
        if 1.8 < ratio < 2.2:
            return "gradients 2x the estimate: fp32 gradients for 16-bit weights"
        return f"gradients {times}: the trainable set differs from the estimate's"
    if block == "optimizer":
        if a == 0:
            return "no optimizer state yet: it is created at the first optimizer.step()"
        if setup.get("optimizer", "").startswith("paged") and a < e:
            return "paged optimizer states live in CUDA managed memory, outside torch's allocator counters"
        if 1.8 < ratio < 2.2:
            return "optimizer 2x the estimate: states kept in fp32 for 16-bit weights"
        return f"optimizer {times}: the optimizer or its state dtype differs from the estimate's"
    if block == "other":
        if a > e:
            return f"other {times}: temporaries, activation gradients, inputs and outputs held by the training loop"
        return f"other {times}"
    return f"{block} {times}"


def _peak_cause(e: int, a: int, step: dict, setup: dict, cuda: dict | None) -> str:
    phase = step.get("peak_phase") or "?"
    ratio = a / e if e else float("inf")
    if a > e and phase == "backward":
        return (f"peak {ratio:.1f}x the estimate, in backward: larger transients than modelled "
                f"(loss over a large vocabulary, eager attention's s^2 gradients, recomputation)")
    if a > e and phase == "optimizer":
        return (f"peak {ratio:.1f}x the estimate, in the optimizer step: "
                "foreach temporaries or states created at the first step")
    if a < e and not cuda:
        return ("peak below the estimate: on CPU the agent sees tensors at phase edges only, "
                "not the transients inside a phase")
    return f"peak {ratio:.1f}x the estimate, in {phase}"


# ---------------------------------------------------------------- what-if


@dataclass
class Calibration:
    """Measured activations ~ act_scale * estimated activations + act_offset; the rest of the
    peak the estimate does not explain is carried as peak_offset."""

    act_scale: float = 1.0
    act_offset: float = 0.0
    peak_offset: float = 0.0
    points: int = 0
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"act_scale": self.act_scale, "act_offset": self.act_offset, "peak_offset": self.peak_offset,
                "points": self.points, "notes": list(self.notes)}


def calibrate(estimate, steps: list[dict]) -> Calibration:
    """Fit the estimate to the measured steps.

    Each step needs "batch" ([b, s]) and "eof_blocks" (activations at the end of forward);
    "peak" (allocated) is used for the residual. With one distinct batch x seq the scale is a
    plain ratio; with several, a least-squares line through (estimated, measured) activations.
    """
    est = as_dict(estimate)
    cal = Calibration()
    pts = []
    cache: dict = {}
    for st in steps:
        batch = st.get("batch")
        eof = st.get("eof_blocks") or {}
        if not batch or len(batch) < 2 or eof.get("activations") is None:
            continue
        key = (int(batch[0]), int(batch[1]))
        if key not in cache:
            cache[key] = reestimate(est, batch=key[0], seq_len=key[1])
        e = cache[key]
        pts.append((e["blocks"]["activations"], int(eof["activations"]), e["peak_allocated"], st.get("peak")))
    if not pts:
        cal.notes.append("no measured step with batch and activations: uncalibrated")
        return cal
    cal.points = len(pts)
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    if len(set(xs)) >= 2:
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        cal.act_scale = sxy / sxx if sxx else 1.0
        cal.act_offset = my - cal.act_scale * mx
    else:
        cal.act_scale = (sum(ys) / len(ys)) / xs[0] if xs[0] else 1.0
        cal.notes.append("one batch x seq measured: activations scaled by a ratio")
    if str(est["setup"].get("device", "cuda")).startswith("cpu"):
        # The agent's CPU peak is sampled at phase edges (no allocator counter), so it misses
        # the transients the estimate includes: only the activations are calibrated there.
        cal.notes.append("CPU run: peak taken from the estimate, activations calibrated")
        return cal
    residuals = []
    for x, _y, epeak, mpeak in pts:
        if mpeak is None:
            continue
        predicted = epeak + (cal.act_scale - 1.0) * x + cal.act_offset
        residuals.append(int(mpeak) - predicted)
    if residuals:
        cal.peak_offset = sum(residuals) / len(residuals)
    return cal


_WHAT_IF_KEYS = ("batch", "seq_len", "lora_rank", "method", "grad_ckpt", "optimizer", "attn", "grad_accum",
                 "weight_dtype", "compute_dtype", "master_weights", "lora_targets", "world_size", "zero")


def _calibrated(new: dict, cal: Calibration) -> tuple[float, float, int]:
    """(activations, allocated peak, peak with context) of an estimate dict, moved onto the measurement."""
    acts = new["blocks"]["activations"]
    calibrated_acts = cal.act_scale * acts + cal.act_offset
    allocated = new["peak_allocated"] + (calibrated_acts - acts) + cal.peak_offset
    extra = new["peak"] - new["peak_allocated"]   # CUDA context + allocator overhead
    return calibrated_acts, allocated, int(round(allocated + extra))


def what_if(estimate, changes: dict, *, steps: list[dict] | None = None, card_bytes: int | None = None,
            calibration: Calibration | None = None, model_changes: dict | None = None) -> dict:
    """Predicted peak after changing the setup (batch, seq_len, lora_rank, method, grad_ckpt, ...),
    calibrated on the measured steps so that, unchanged, it reproduces the measured peak."""
    est = as_dict(estimate)
    unknown = [k for k in changes if k not in _WHAT_IF_KEYS]
    if unknown:
        raise ValueError(f"cannot change {unknown[0]!r} in a what-if (try one of {', '.join(_WHAT_IF_KEYS)})")
    cal = calibration or (calibrate(est, steps) if steps else Calibration())
    changes = dict(changes)
    quantized = est["setup"]["weight_dtype"] in ("nf4", "fp4", "int8")
    if changes.get("method") == "qlora" and not quantized and "weight_dtype" not in changes:
        changes["weight_dtype"] = "nf4"
    if changes.get("method") in ("full", "lora") and quantized and "weight_dtype" not in changes:
        changes.update(weight_dtype="bf16", other_dtype=None)
    if "weight_dtype" in changes and "compute_dtype" not in changes:
        changes["compute_dtype"] = None  # follow the new weights
    if "other_dtype" not in changes and "weight_dtype" in changes:
        changes["other_dtype"] = None
    new = reestimate(est, model_changes, **changes)
    acts, allocated, peak = _calibrated(new, cal)
    out = {
        "changes": {k: v for k, v in changes.items() if v is not None},
        "estimate": new,
        "predicted_activations": int(round(acts)),
        "predicted_peak_allocated": int(round(allocated)),
        "predicted_peak": peak,
        "calibration": cal.to_dict(),
    }
    if card_bytes:
        out["card_bytes"] = int(card_bytes)
        out["fits"] = peak <= card_bytes
        out["headroom"] = int(card_bytes - peak)
    return out


# ---------------------------------------------------------------- advice

# The order the seeds recommend trying them, with what each costs.
ADVICE_ORDER = ("bf16", "micro-batch", "grad-ckpt", "8bit-optimizer", "lora", "offload", "smaller-model")
_COSTS = {
    "bf16": "needs bf16 hardware (Ampere+); with fp32 master weights accuracy is unchanged",
    "micro-batch": "same effective batch via gradient accumulation; slower when the GPU is no longer saturated",
    "grad-ckpt": "~20-30% slower steps (one extra forward per layer in backward)",
    "8bit-optimizer": "bitsandbytes dependency; accuracy on par with 32-bit AdamW (Dettmers et al. 2022)",
    "lora": ("trains a low-rank update only: usually close to full fine-tuning, not always; "
             "QLoRA adds dequantization time"),
    "offload": "optimizer step on the CPU: step time bound by PCIe and host memory bandwidth",
    "smaller-model": "lower quality: the last resort",
}


def advice(estimate, *, steps: list[dict] | None = None, card_bytes: int | None = None,
           calibration: Calibration | None = None) -> list[dict]:
    """What to try, in the seeds' order, each with its predicted saving on this run and its cost.

    Each item: {"key", "action", "changes", "saving", "new_peak", "cost", "rank"} where rank
    orders the items by saving (1 = saves most); "fits" is added when a card is given. Items that
    do not apply (already bf16, checkpointing already on...) or save nothing are left out.
    """
    est = as_dict(estimate)
    s = est["setup"]
    model = est["model"]
    cal = calibration or (calibrate(est, steps) if steps else Calibration())
    base = what_if(est, {}, calibration=cal)["predicted_peak"]
    options: list[tuple[str, str, dict, dict | None]] = []
    if s["method"] != "qlora" and s["weight_dtype"] == "fp32":
        options.append(("bf16", "train in bf16" + (" with fp32 master weights" if s["method"] == "full" else ""),
                        {"weight_dtype": "bf16", "master_weights": s["method"] == "full"}, None))
    if s["batch"] > 1:
        options.append(("micro-batch", f"micro-batch 1 with gradient accumulation {s['batch'] * s['grad_accum']}",
                        {"batch": 1, "grad_accum": s["batch"] * s["grad_accum"]}, None))
    if not s["grad_ckpt"]:
        options.append(("grad-ckpt", "turn on gradient checkpointing", {"grad_ckpt": True}, None))
    if s["optimizer"] in ("adamw", "paged-adamw", "adafactor", "sgd-momentum"):
        options.append(("8bit-optimizer", "8-bit paged AdamW (bitsandbytes)", {"optimizer": "paged-adamw-8bit"}, None))
    if s["method"] == "full":
        options.append(("lora", "LoRA (rank 16, all linear layers) instead of full fine-tuning",
                        {"method": "lora", "lora_rank": 16, "lora_targets": ("all-linear",), "master_weights": False},
                        None))
    elif s["method"] == "lora":
        options.append(("lora", "QLoRA: quantize the frozen base to NF4", {"method": "qlora"}, None))
    if s["optimizer"] not in ("sgd", "none") and est["blocks"]["optimizer"] > 0:
        options.append(("offload", "offload optimizer states and master weights to the CPU (ZeRO-Offload)",
                        {"optimizer": "none", "master_weights": False}, None))
    if model["num_layers"] > 1:
        options.append(("smaller-model", f"a model half as deep ({model['num_layers'] // 2} layers)", {},
                        {"num_layers": model["num_layers"] // 2}))
    out: list[dict[str, Any]] = []  # one JSON-ready record per option (report --json prints them as they are)
    for key, action, changes, model_changes in options:
        new = what_if(est, changes, calibration=cal, model_changes=model_changes)["predicted_peak"]
        item: dict[str, Any] = {"key": key, "action": action, "changes": changes, "saving": int(base - new),
                                "new_peak": int(new), "cost": _COSTS[key]}
        if card_bytes:
            item["fits"] = new <= card_bytes
        if item["saving"] > 0:
            out.append(item)
    for rank, item in enumerate(sorted(out, key=lambda i: -i["saving"]), start=1):
        item["rank"] = rank
    out.sort(key=lambda i: ADVICE_ORDER.index(i["key"]))
    return out
