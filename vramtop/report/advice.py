"""The report's advice: plain rules over the analysis (vramtop/report/analysis.py), then the
estimator's gap analysis (vramtop/gap.py) when the job published an estimate."""

from __future__ import annotations

from vramtop.report.numbers import as_int, pct
from vramtop_agent.vocabulary import BLOCK_KEYS, fmt_bytes


def advice(a: dict) -> list[str]:
    """Plain rules over the analysis, then the estimator's gap analysis (vramtop/gap.py) when the job
    published an estimate: the blocks that differ from it and why, and what to try with its saving."""
    peak = a.get("peak")
    g = a.get("gap") or {}
    ref = max((peak or {}).get("level") or 0, 1)
    gap_items = [it for it in g.get("advice", []) if as_int(it.get("saving")) >= 0.02 * ref]
    out = _oom_lines(a["ooms"])
    # With the estimator's quantified options, the plain per-block rules would repeat them.
    if not gap_items:
        out += _block_lines(a["job"], peak)
    out += _allocator_lines(a["memory"], peak)
    out += _growth_lines(a["steps"])
    out += _estimate_lines(a.get("estimate"), peak)
    out += [f"Estimate vs measured, {row['block']}: {row['cause']}" for row in g.get("rows", [])]
    out += [_try_line(item, a) for item in gap_items]
    return out or ["Nothing stands out: no block dominates and memory did not grow over the run."]


def _oom_lines(ooms: list[dict]) -> list[str]:
    """What the first OOM points at: fragmentation, or an input larger than the step before's."""
    if not ooms:
        return []
    out = []
    o = ooms[0]
    seg = o.get("segments")
    req = o.get("requested")
    if seg and req and seg["free_in_segments"] >= req > seg["largest_free_block"]:
        out.append(f"Fragmentation: {fmt_bytes(seg['free_in_segments'])} was free inside reserved segments but "
                   f"no single block of {fmt_bytes(req)}; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.")
    if o.get("grew"):
        k, d = o["grew"][0]
        if o.get("batch") and o.get("ref_batch") and list(o["batch"]) != list(o["ref_batch"]):
            out.append(f"The OOM step's input was {'x'.join(map(str, o['batch']))} against "
                       f"{'x'.join(map(str, o['ref_batch']))} before: {k} grew by {fmt_bytes(d)}; "
                       "cap the batch or sequence length (bucket long sequences, or lower the batch for them).")
    return out


def _block_lines(job: dict, peak: dict | None) -> list[str]:
    """One rule per block that dominates the peak."""
    blocks = (peak or {}).get("blocks") or {}
    total = sum(blocks.values()) or 0
    share = {k: pct(blocks.get(k, 0), total) for k in BLOCK_KEYS}
    full_ft = job.get("method") in (None, "full")
    out = []
    if share.get("activations", 0) >= 40:
        msg = f"Activations are {share['activations']:.0f}% of the peak"
        if not job.get("grad_ckpt"):
            msg += ": enable gradient checkpointing (model.gradient_checkpointing_enable())"
            msg += ", or lower the micro-batch / sequence length and use gradient accumulation."
        else:
            msg += (" even with gradient checkpointing: lower the micro-batch or sequence length "
                    "(gradient accumulation keeps the effective batch).")
        out.append(msg)
    if share.get("optimizer", 0) >= 25:
        msg = f"Optimizer states are {share['optimizer']:.0f}% of the peak"
        if full_ft:
            msg += ": LoRA trains a fraction of the weights; otherwise an 8-bit optimizer (bitsandbytes AdamW8bit) " \
                   "or sharding the states (FSDP / ZeRO) cuts them."
        else:
            msg += ": an 8-bit optimizer (bitsandbytes AdamW8bit) halves or quarters them."
        out.append(msg)
    if share.get("parameters", 0) >= 50 and job.get("dtype") == "float32":
        out.append(f"Parameters are {share['parameters']:.0f}% of the peak in float32: load the model in bfloat16"
                   + (" (or 4-bit, QLoRA, for the frozen base)." if not full_ft else "."))
    if share.get("gradients", 0) >= 25 and full_ft:
        out.append(f"Gradients are {share['gradients']:.0f}% of the peak: "
                   "LoRA, or freezing layers, removes most of them.")
    return out


def _allocator_lines(mem: dict, peak: dict | None) -> list[str]:
    out = []
    if mem.get("on_cuda") and mem.get("max_cache") and peak and mem["max_cache"] > 0.2 * max(peak["level"], 1):
        out.append(f"Up to {fmt_bytes(mem['max_cache'])} sat reserved but unallocated (cache/fragmentation): "
                   "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True usually returns most of it.")
    if mem.get("alloc_retries"):
        out.append(f"The allocator had to free its cache and retry {mem['alloc_retries']} times: memory is "
                   "at the edge; expandable_segments or a slightly smaller batch avoids the stalls.")
    return out


def _growth_lines(steps: dict) -> list[str]:
    growth = steps.get("growth")
    if growth and steps.get("median_peak") and growth > 0.05 * steps["median_peak"]:
        return [f"The step peak grew by {fmt_bytes(growth)} over the run with the same input shape: something keeps "
                "tensors from step to step (a loss kept for logging without .item(), a list of outputs, "
                "a growing cache)."]
    return []


def _estimate_lines(est: dict | None, peak: dict | None) -> list[str]:
    if est and peak and est.get("peak_allocated"):
        ratio = peak["level"] / max(est["peak_allocated"], 1)
        if ratio > 1.25:
            return [f"The measured peak is {ratio:.1f}x the estimate ({fmt_bytes(est['peak_allocated'])}): "
                    "look at the block that differs most (vramtop estimate shows the formula's terms)."]
    return []


def _try_line(item: dict, a: dict) -> str:
    """One "Try:" line. The peak after the change is the MEASURED peak less the predicted saving (the
    estimate's own peak may be far from what this run did); a card is named only on CUDA, and a CPU
    run is compared with the host RAM that was available."""
    measured = as_int((a.get("peak") or {}).get("level"))
    saving = as_int(item.get("saving"))
    after = max(measured - saving, 0) if measured else as_int(item.get("new_peak"))
    mem, job = a.get("memory") or {}, a.get("job") or {}
    if mem.get("on_cuda"):
        card = job.get("device_total")
        where = "" if not card else (", fits the card" if after <= card else ", still too big for the card")
    else:
        avail = mem.get("host_available")
        where = f"; host RAM had {fmt_bytes(avail)} available" if avail else ""
    return (f"Try: {item['action']}: saves about {fmt_bytes(saving)} (peak {fmt_bytes(after)} instead of "
            f"{fmt_bytes(measured)}{where}); cost: {item['cost']}.")

