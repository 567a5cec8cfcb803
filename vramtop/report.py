"""The postmortem of a recording: where and when the peak was, what grew before an OOM, what to do.

`analyze()` turns a Recording into a plain dict (numbers and short strings;
tests and `--json` read it), `render_text()` prints it for a terminal and
`render_html()` writes a self-contained page with inline SVG plots (no
script, no external resource):

- the blocks stacked over time (parameters, gradients, optimizer,
  activations, other), with the peak and any OOM marked;
- each step's forward / backward / optimizer peak;
- reserved vs allocated (CUDA) or tracked tensors vs process RSS (CPU).

Everything taken from the file is untrusted: text is stripped of control
characters for the terminal and HTML-escaped for the page.
"""

from __future__ import annotations

import html
import math
import statistics
import time
from typing import Any

from vramtop import creep_report
from vramtop.recording import SAMPLE_COLUMNS, STEP_COLUMNS, Recording, clean
from vramtop_agent.schema import BLOCK_KEYS, PHASES
from vramtop_agent.vocabulary import COLOURS as BLOCK_COLORS
from vramtop_agent.vocabulary import PHASE_STYLE, fmt_bytes

# The dashboard's block colours, so the report and the TUI read alike.
COLORS = {
    **{k: BLOCK_COLORS[k] for k in BLOCK_KEYS},
    "forward": PHASE_STYLE["forward"][1],
    "backward": PHASE_STYLE["backward"][1],
    "optimizer_phase": PHASE_STYLE["optimizer"][1],
    "reserved": BLOCK_COLORS["cache"],
    "allocated": "#4e79a7",
    "rss": BLOCK_COLORS["process"],
}
MAX_POINTS = 800


def fmt_offset(seconds: float | None) -> str:
    if not isinstance(seconds, (int, float)) or seconds != seconds or abs(seconds) > 1e12:
        return "-"
    seconds = max(float(seconds), 0.0)
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    frac = seconds - int(seconds)
    return f"{h:d}:{m:02d}:{s:02d}.{int(frac * 10)}" if h else f"{m:d}:{s:02d}.{int(frac * 10)}"


def fmt_tick(seconds: float) -> str:
    """Short time-axis labels: 12.5s, 3:20, 4:48h."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m}:{s:02d}"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}:{rem // 60:02d}h"


def _when(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


# ---------------------------------------------------------------------- analysis


def analyze(rec: Recording, session: int | None = None) -> dict:
    """Everything the report says, as plain data."""
    sessions = rec.sessions()
    if session is None:
        # The session of the latest OOM when there is one, else the newest run's (vramtop.replay).
        from vramtop.replay import newest_session

        ooms_all = rec.ooms()
        if ooms_all:
            pid, rank = ooms_all[-1]["pid"], ooms_all[-1]["rank"]
            session = next((s.id for s in reversed(sessions) if s.pid == pid and s.rank == rank), None)
        if session is None:
            session = newest_session(sessions)
    sess = next((s for s in sessions if s.id == session), None)
    hello = (sess.hello if sess else None) or {}
    span = rec.span(session)
    t0 = span[0] if span else None
    a: dict[str, Any] = {
        "file": rec.path,
        "session": session,
        "sessions": len(sessions),
        "counts": rec.counts(),
        "span": span,
        "duration": (span[1] - span[0]) if span else None,
        "notes": list(rec.notes),
    }
    model = hello.get("model") or {}
    a["job"] = {
        "pid": sess.pid if sess else None,
        "rank": sess.rank if sess else None,
        "host": hello.get("host"),
        "cmdline": " ".join(str(c) for c in hello.get("cmdline") or []),
        "device": hello.get("device") or (sess.device if sess else None),
        "device_name": hello.get("device_name"),
        "device_total": hello.get("device_total"),
        "model": model.get("class"),
        "method": model.get("method"),
        "dtype": model.get("dtype"),
        "params_total": model.get("params_total"),
        "params_trainable": model.get("params_trainable"),
        "grad_ckpt": model.get("grad_ckpt"),
        "optimizer": (hello.get("optimizer") or {}).get("class"),
        "start_time": hello.get("start_time") or t0,
    }
    byes = rec.events(("bye",), session=session)
    a["ended"] = byes[-1].get("reason") if byes else None

    # Peak.
    peak = rec.peak(session)
    if peak is not None:
        total = sum(v or 0 for v in peak.blocks.values())
        blocks = {k: int(peak.blocks.get(k) or 0) for k in BLOCK_KEYS}
        largest = max(BLOCK_KEYS, key=lambda k: blocks[k]) if total else None
        a["peak"] = {
            "level": peak.level, "t": peak.t, "offset": (peak.t - t0) if (peak.t is not None and t0) else None,
            "step": peak.step, "phase": peak.phase, "blocks": blocks, "source": peak.source,
            "largest": largest, "largest_share": _pct(blocks[largest], total) if largest else 0.0,
        }
    else:
        a["peak"] = None

    # Steps.
    srows = rec.step_rows(session)
    idx = {c: i for i, c in enumerate(STEP_COLUMNS)}
    steps = [{c: r[i] for c, i in idx.items()} for r in srows]
    a["steps"] = _step_summary(steps)

    # Samples: device-side numbers over the run.
    a["memory"] = _sample_summary(rec, session)

    a["creep"] = creep_report.summarize(rec, session)

    # OOMs.
    a["ooms"] = [_oom_summary(rec, e, steps, session, t0) for e in rec.ooms(session)]

    est = hello.get("estimate") if isinstance(hello.get("estimate"), dict) else None
    a["estimate"] = {"peak": _i(est.get("peak")), "peak_allocated": _i(est.get("peak_allocated"))} if est else None
    a["gap"] = _gap(est, rec, session, a) if est else None
    a["advice"] = advice(a)
    a["problems"] = rec.problem_line()
    return a


def _gap(est: dict, rec: Recording, session: int | None, a: dict) -> dict | None:
    """The estimator's gap analysis (vramtop/gap.py) at the peak step, when the job published an estimate."""
    try:
        from vramtop import gap
    except ImportError:
        return None
    out: dict[str, Any] = {}
    steps = rec.steps(session, last=200)
    peak = a.get("peak") or {}
    peak_step = next((s for s in steps if s.get("step") == peak.get("step")), steps[-1] if steps else None)
    try:
        if peak_step is not None:
            rows = gap.gap_rows(est, peak_step.get("peak_blocks") or {}, eof_blocks=peak_step.get("eof_blocks"),
                                step=peak_step, batch=peak_step.get("batch"))
            out["rows"] = [{"block": r.block, "cause": r.cause} for r in rows if r.cause]
    except Exception:  # an estimate from another vramtop version, or a damaged one: skip the comparison
        out["rows"] = []
    try:
        items = gap.advice(est, steps=steps or None, card_bytes=a["job"].get("device_total"))
        out["advice"] = [{k: it.get(k) for k in ("action", "saving", "new_peak", "cost", "fits")} for it in items[:4]]
    except Exception:
        out["advice"] = []
    return out


def _step_summary(steps: list[dict]) -> dict:
    if not steps:
        return {"count": 0}
    times = [s["step_time"] for s in steps if isinstance(s.get("step_time"), (int, float))]
    peaks = [s["peak"] or 0 for s in steps]
    spikes = [s["backward_spike"] or 0 for s in steps]
    worst = max(steps, key=lambda s: s["peak"] or 0)
    out = {
        "count": len(steps),
        "first": steps[0]["step"],
        "last": steps[-1]["step"],
        "median_time": statistics.median(times) if times else None,
        "median_peak": int(statistics.median(peaks)),
        "max_peak": int(worst["peak"] or 0),
        "max_step": worst["step"],
        "max_phase": worst["peak_phase"],
        "max_batch": [worst["batch"], worst["seq_len"]] if worst.get("batch") else None,
        "median_backward_spike": int(statistics.median(spikes)),
    }
    # Growth from step to step with the same input shape: something keeps tensors alive.
    shape = (steps[-1].get("batch"), steps[-1].get("seq_len"))
    same = [s for s in steps if (s.get("batch"), s.get("seq_len")) == shape]
    if len(same) >= 6:
        k = max(len(same) // 4, 2)
        early = statistics.median(s["peak"] or 0 for s in same[1:k + 1])  # step 0 allocates optimizer state
        late = statistics.median(s["peak"] or 0 for s in same[-k:])
        out["growth"] = int(late - early)
        out["growth_per_step"] = (late - early) / max(same[-1]["step"] - same[1]["step"], 1)
    return out


def _bucketed(rec: Recording, session: int | None, max_points: int = MAX_POINTS) -> list[dict]:
    """Samples, reduced to at most max_points: in each time bucket, the sample with the highest level."""
    return [dict(zip(SAMPLE_COLUMNS, r)) for r in rec.sample_buckets(max_points, session)]


def _sample_summary(rec: Recording, session: int | None) -> dict:
    pts = _bucketed(rec, session)
    out: dict[str, Any] = {"points": pts}
    if not pts:
        return out
    on_cuda = any(p["allocated"] is not None for p in pts)
    out["on_cuda"] = on_cuda
    if on_cuda:
        gaps = [(p["reserved"] or 0) - (p["allocated"] or 0) for p in pts if p["reserved"] is not None]
        out["max_reserved"] = max((p["reserved"] or 0) for p in pts)
        out["max_cache"] = max(gaps) if gaps else None
        last = rec.sample_at(float("inf"), session)
        cuda = (last or {}).get("cuda") or {}
        out["alloc_retries"] = cuda.get("alloc_retries")
        out["num_ooms"] = cuda.get("ooms")
    else:
        out["max_rss"] = max((p["rss"] or 0) for p in pts)
        last = rec.sample_at(float("inf"), session)
        host = (last or {}).get("host") or {}
        out["host_available"] = host.get("available")  # advice compares with it: "host RAM", not a card
    first = pts[0]
    out["first_blocks"] = {k: first[k] or 0 for k in BLOCK_KEYS}
    return out


def _oom_summary(rec: Recording, e: dict, steps: list[dict], session: int | None, t0: float | None) -> dict:
    blocks = {k: int(e["blocks"].get(k) or 0) for k in BLOCK_KEYS}
    out: dict[str, Any] = {
        "t": e["t"], "offset": (e["t"] - t0) if t0 else None, "step": e["step"], "phase": e["phase"],
        "requested": e.get("requested"), "message": e.get("message", "")[:300], "blocks": blocks,
        "total": sum(blocks.values()), "exception": e.get("exception"), "batch": e.get("batch"),
    }
    cuda = e.get("cuda") or {}
    if cuda:
        out["allocated"], out["reserved"] = cuda.get("allocated"), cuda.get("reserved")
    # What grew: against the previous step's peak (same phase of the loop, one step earlier), else the run's start.
    before = [s for s in steps if s["step"] is not None and s["step"] < e["step"]]
    if before:
        ref = before[-1]
        ref_blocks = {k: int(ref.get(f"peak_{k}") or 0) for k in BLOCK_KEYS}
        out["compared_to"] = f"the peak of step {ref['step']}"
        if ref.get("batch"):
            out["ref_batch"] = [ref["batch"], ref["seq_len"]]
    else:
        first = rec.sample_at(rec.span(session)[0], session) if rec.span(session) else None
        ref_blocks = {k: int((first or {}).get("blocks", {}).get(k) or 0) for k in BLOCK_KEYS}
        out["compared_to"] = "the start of the run"
    grew = sorted(((k, blocks[k] - ref_blocks[k]) for k in BLOCK_KEYS), key=lambda kv: -kv[1])
    out["grew"] = [(k, d) for k, d in grew if d > 0]
    segs = e.get("segments")
    if isinstance(segs, list) and segs:
        out["segments"] = _segment_summary(segs)
    return out


def _i(x: Any) -> int:
    """An integer from untrusted data (0 when it is not a finite number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or abs(x) == float("inf"):
        return 0
    return int(x)


def _segment_summary(segs: list) -> dict:
    total = sum(_i(s.get("total_size")) for s in segs if isinstance(s, dict))
    allocated = sum(_i(s.get("allocated_size")) for s in segs if isinstance(s, dict))
    largest_free = 0
    free_blocks = 0
    for s in segs:
        if not isinstance(s, dict):
            continue
        for b in s.get("blocks") or ():
            if isinstance(b, dict) and str(b.get("state", "")).startswith("inactive"):
                free_blocks += 1
                largest_free = max(largest_free, _i(b.get("size")))
    return {"count": len(segs), "reserved": total, "allocated": allocated, "free_in_segments": total - allocated,
            "largest_free_block": largest_free, "free_blocks": free_blocks}


# ---------------------------------------------------------------------- advice


def advice(a: dict) -> list[str]:
    """Plain rules over the analysis, then the estimator's gap analysis (vramtop/gap.py) when the job
    published an estimate: the blocks that differ from it and why, and what to try with its saving."""
    out: list[str] = []
    job, peak, steps, mem = a["job"], a.get("peak"), a["steps"], a["memory"]
    blocks = (peak or {}).get("blocks") or {}
    total = sum(blocks.values()) or 0
    share = {k: _pct(blocks.get(k, 0), total) for k in BLOCK_KEYS}
    full_ft = job.get("method") in (None, "full")
    if a["ooms"]:
        o = a["ooms"][0]
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
    g = a.get("gap") or {}
    ref = max((peak or {}).get("level") or 0, 1)
    gap_items = [it for it in g.get("advice", []) if _i(it.get("saving")) >= 0.02 * ref]
    # With the estimator's quantified options, the plain per-block rules below would repeat them.
    rules = not gap_items
    if rules and share.get("activations", 0) >= 40:
        msg = f"Activations are {share['activations']:.0f}% of the peak"
        if not job.get("grad_ckpt"):
            msg += ": enable gradient checkpointing (model.gradient_checkpointing_enable())"
            msg += ", or lower the micro-batch / sequence length and use gradient accumulation."
        else:
            msg += " even with gradient checkpointing: lower the micro-batch or sequence length (gradient accumulation keeps the effective batch)."
        out.append(msg)
    if rules and share.get("optimizer", 0) >= 25:
        msg = f"Optimizer states are {share['optimizer']:.0f}% of the peak"
        if full_ft:
            msg += ": LoRA trains a fraction of the weights; otherwise an 8-bit optimizer (bitsandbytes AdamW8bit) " \
                   "or sharding the states (FSDP / ZeRO) cuts them."
        else:
            msg += ": an 8-bit optimizer (bitsandbytes AdamW8bit) halves or quarters them."
        out.append(msg)
    if rules and share.get("parameters", 0) >= 50 and job.get("dtype") == "float32":
        out.append(f"Parameters are {share['parameters']:.0f}% of the peak in float32: load the model in bfloat16"
                   + (" (or 4-bit, QLoRA, for the frozen base)." if not full_ft else "."))
    if rules and share.get("gradients", 0) >= 25 and full_ft:
        out.append(f"Gradients are {share['gradients']:.0f}% of the peak: LoRA, or freezing layers, removes most of them.")
    if mem.get("on_cuda") and mem.get("max_cache") and peak and mem["max_cache"] > 0.2 * max(peak["level"], 1):
        out.append(f"Up to {fmt_bytes(mem['max_cache'])} sat reserved but unallocated (cache/fragmentation): "
                   "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True usually returns most of it.")
    if mem.get("alloc_retries"):
        out.append(f"The allocator had to free its cache and retry {mem['alloc_retries']} times: memory is "
                   "at the edge; expandable_segments or a slightly smaller batch avoids the stalls.")
    growth = steps.get("growth")
    if growth and steps.get("median_peak") and growth > 0.05 * steps["median_peak"]:
        out.append(f"The step peak grew by {fmt_bytes(growth)} over the run with the same input shape: something keeps "
                   "tensors from step to step (a loss kept for logging without .item(), a list of outputs, "
                   "a growing cache).")
    est = a.get("estimate")
    if est and peak and est.get("peak_allocated"):
        ratio = peak["level"] / max(est["peak_allocated"], 1)
        if ratio > 1.25:
            out.append(f"The measured peak is {ratio:.1f}x the estimate ({fmt_bytes(est['peak_allocated'])}): "
                       "look at the block that differs most (vramtop estimate shows the formula's terms).")
    for row in g.get("rows", []):
        out.append(f"Estimate vs measured, {row['block']}: {row['cause']}")
    for item in gap_items:
        out.append(_try_line(item, a))
    if not out:
        out.append("Nothing stands out: no block dominates and memory did not grow over the run.")
    return out


def _try_line(item: dict, a: dict) -> str:
    """One "Try:" line. The peak after the change is the MEASURED peak less the predicted saving (the
    estimate's own peak may be far from what this run did); a card is named only on CUDA, and a CPU
    run is compared with the host RAM that was available."""
    measured = _i((a.get("peak") or {}).get("level"))
    saving = _i(item.get("saving"))
    after = max(measured - saving, 0) if measured else _i(item.get("new_peak"))
    mem, job = a.get("memory") or {}, a.get("job") or {}
    if mem.get("on_cuda"):
        card = job.get("device_total")
        where = "" if not card else (", fits the card" if after <= card else ", still too big for the card")
    else:
        avail = mem.get("host_available")
        where = f"; host RAM had {fmt_bytes(avail)} available" if avail else ""
    return (f"Try: {item['action']}: saves about {fmt_bytes(saving)} (peak {fmt_bytes(after)} instead of "
            f"{fmt_bytes(measured)}{where}); cost: {item['cost']}.")


# ---------------------------------------------------------------------- text


def render_text(a: dict) -> str:
    lines: list[str] = []
    job = a["job"]
    head = f"vramtop report: {clean(a['file'], 120)}"
    lines.append(head)
    lines.append("=" * min(len(head), 78))
    start = job.get("start_time")
    when = _when(start)
    lines.append(f"job       pid {job.get('pid')} on {clean(job.get('host') or '?', 60)}, started {when}, "
                 f"recorded {fmt_offset(a.get('duration'))}")
    if job.get("cmdline"):
        lines.append(f"command   {clean(job['cmdline'], 100)}")
    dev = clean(job.get("device") or "?", 30)
    if job.get("device_name") and dev.startswith("cuda"):
        dev += f" ({clean(job['device_name'], 40)})"
    if job.get("device_total"):
        dev += f", {fmt_bytes(job['device_total'])}"
    lines.append(f"device    {dev}")
    if job.get("model"):
        pt, pa = job.get("params_trainable"), job.get("params_total")
        lines.append(f"model     {clean(job['model'], 60)}  {clean(job.get('method') or '?', 10)}  "
                     f"{clean(job.get('dtype') or '?', 10)}  trainable {pt if pt is not None else '?'}"
                     f" / {pa if pa is not None else '?'} params"
                     + (f"  optimizer {clean(job['optimizer'], 30)}" if job.get("optimizer") else "")
                     + ("  grad-ckpt" if job.get("grad_ckpt") else ""))
    ended = a.get("ended")
    lines.append("ended     " + (clean(ended, 60) if ended else "no goodbye: the process was killed, or is still running"))
    c = a["counts"]
    lines.append(f"data      {c.get('samples', 0)} samples, {c.get('steps', 0)} steps, {c.get('events', 0)} events"
                 + (f", {a['sessions']} sessions (showing {a['session']})" if a["sessions"] > 1 else ""))
    lines.append("")

    p = a.get("peak")
    if p:
        lines.append(f"PEAK      {fmt_bytes(p['level'])} at step {p['step']} ({p['phase']}), "
                     f"{fmt_offset(p.get('offset'))} into the recording")
        total = sum(p["blocks"].values()) or 1
        for k in sorted(BLOCK_KEYS, key=lambda k: -p["blocks"][k]):
            mark = "  <- largest" if k == p.get("largest") else ""
            lines.append(f"  {k:<12} {fmt_bytes(p['blocks'][k]):>11}  {_pct(p['blocks'][k], total):5.1f}%{mark}")
        if job.get("device_total"):
            lines.append(f"  = {_pct(p['level'], job['device_total']):.0f}% of the device's {fmt_bytes(job['device_total'])}")
    else:
        lines.append("PEAK      no samples in the recording")
    s = a["steps"]
    if s.get("count"):
        lines.append("")
        mt = f"{s['median_time'] * 1000:.0f} ms" if s.get("median_time") else "-"
        lines.append(f"STEPS     {s['count']} (steps {s['first']}..{s['last']}), median step time {mt}, "
                     f"median peak {fmt_bytes(s['median_peak'])}, highest {fmt_bytes(s['max_peak'])} at step "
                     f"{s['max_step']} ({s['max_phase']})"
                     + (f" with input {s['max_batch'][0]}x{s['max_batch'][1]}" if s.get("max_batch") else ""))
        lines.append(f"          median backward spike above the end of forward: {fmt_bytes(s['median_backward_spike'])}")
        if s.get("growth") is not None:
            lines.append(f"          step peak change over the run (same input shape): {fmt_bytes(s['growth'])}")
    m = a["memory"]
    if m.get("on_cuda"):
        lines.append(f"ALLOCATOR max reserved {fmt_bytes(m.get('max_reserved'))}, max reserved-but-free "
                     f"{fmt_bytes(m.get('max_cache'))}, alloc retries {m.get('alloc_retries', '-')}, "
                     f"OOMs {m.get('num_ooms', '-')}")
    elif m.get("points"):
        lines.append(f"PROCESS   max RSS {fmt_bytes(m.get('max_rss'))} (CPU run: no allocator statistics)")
    lines += creep_report.lines(a.get("creep") or [], s.get("count") or 0)
    for i, o in enumerate(a["ooms"]):
        lines.append("")
        req = f", tried to allocate {fmt_bytes(o['requested'])}" if o.get("requested") else ""
        lines.append(f"OOM{'' if len(a['ooms']) == 1 else f' #{i + 1}'}       step {o['step']} in {o['phase']}"
                     f", {fmt_offset(o.get('offset'))} into the recording{req}")
        lines.append(f"  {clean(o['message'], 150)}")
        lines.append(f"  in use: {fmt_bytes(o['total'])} tracked"
                     + (f", {fmt_bytes(o.get('allocated'))} allocated / {fmt_bytes(o.get('reserved'))} reserved"
                        if o.get("reserved") is not None else ""))
        if o.get("grew"):
            lines.append(f"  grew since {o['compared_to']}: "
                         + ", ".join(f"{k} +{fmt_bytes(d)}" for k, d in o["grew"]))
        seg = o.get("segments")
        if seg:
            lines.append(f"  allocator: {seg['count']} segments, {fmt_bytes(seg['reserved'])} reserved, "
                         f"{fmt_bytes(seg['free_in_segments'])} free inside them, largest free block "
                         f"{fmt_bytes(seg['largest_free_block'])}")
    if a.get("estimate") and a["estimate"].get("peak_allocated"):
        lines.append("")
        lines.append(f"ESTIMATE  the estimator expected a peak of {fmt_bytes(a['estimate']['peak_allocated'])} "
                     f"allocated ({fmt_bytes(a['estimate'].get('peak'))} "
                     f"{'on the card' if a['memory'].get('on_cuda') else 'of host RAM'})")
    lines.append("")
    lines.append("ADVICE")
    for line in a["advice"]:
        lines.append(f"  - {line}")
    for note in a.get("notes") or []:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- HTML / SVG

W, H = 860, 260
ML, MR, MT, MB = 70, 20, 20, 40


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    unit = 1
    for u in (1 << 10, 1 << 20, 1 << 30, 1 << 40):
        if v >= u:
            unit = u
    scaled = v / unit
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200, 250, 300, 400,
                 500, 600, 800, 1000, 1024):
        if scaled <= step:
            return step * unit
    return v  # pragma: no cover


def _axes(x_max: float, y_max: float, x_label: str, x_fmt, integer_x: bool = False) -> list[str]:
    out = [f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="#fafafa" stroke="#ccc"/>']
    for i in range(5):
        v = y_max * i / 4
        y = H - MB - (H - MT - MB) * i / 4
        out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_e(fmt_bytes(v))}</text>')
    if integer_x:  # steps: whole numbers only, each once (not 0, 0, 1, 1, 2 over a short run)
        every = max(1, math.ceil(x_max / 5))
        ticks = [float(v) for v in range(0, int(x_max) + 1, every)]
    else:
        ticks = [x_max * i / 5 for i in range(6)]
    for v in ticks:
        x = ML + (W - ML - MR) * v / max(x_max, 1e-9)
        out.append(f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle" class="tick">{_e(x_fmt(v))}</text>')
    out.append(f'<text x="{(ML + W - MR) / 2:.0f}" y="{H - 6}" text-anchor="middle" class="label">{_e(x_label)}</text>')
    return out


def _legend(items: list[tuple[str, str]]) -> str:
    parts = []
    x = ML
    for name, color in items:
        parts.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="13" class="tick">{_e(name)}</text>')
        x += 16 + 7 * len(name) + 14
    return "".join(parts)


def svg_stacked(points: list[dict], t0: float, marks: list[tuple[float, str, str]]) -> str:
    if not points:
        return "<p>No samples.</p>"
    xs = [p["t"] - t0 for p in points]
    x_max = max(xs[-1], 1e-3)
    tops = [sum((p[k] or 0) for k in BLOCK_KEYS) for p in points]
    y_max = _nice_max(max(tops))
    pw, ph = W - ML - MR, H - MT - MB

    def X(x):
        return ML + pw * x / x_max

    def Y(y):
        return H - MB - ph * y / y_max

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
           'aria-label="memory blocks stacked over time">', _legend([(k, COLORS[k]) for k in BLOCK_KEYS])]
    out += _axes(x_max, y_max, "time into the recording", fmt_tick)
    base = [0.0] * len(points)
    for k in BLOCK_KEYS:
        upper = [b + (p[k] or 0) for b, p in zip(base, points)]
        if len(points) == 1:
            xs_draw, up, lo = [xs[0], xs[0] + x_max * 0.01], upper * 2, base * 2
        else:
            xs_draw, up, lo = xs, upper, base
        pts = [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(xs_draw, up)]
        pts += [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(reversed(xs_draw), reversed(lo))]
        out.append(f'<polygon points="{" ".join(pts)}" fill="{COLORS[k]}" fill-opacity="0.85"><title>{_e(k)}</title></polygon>')
        base = upper
    for t, label, color in marks:
        x = X(min(max(t - t0, 0), x_max))
        out.append(f'<line x1="{x:.1f}" y1="{MT}" x2="{x:.1f}" y2="{H - MB}" stroke="{color}" stroke-width="1.5" '
                   f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{MT + 12}" class="mark" fill="{color}">{_e(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_lines(xs: list[float], series: list[tuple[str, str, list]], x_label: str, x_fmt, aria: str,
              dots: bool = False, integer_x: bool = False) -> str:
    vals = [v for _, _, ys in series for v in ys if v is not None]
    if not xs or not vals:
        return "<p>No data.</p>"
    x_lo, x_hi = min(xs), max(xs)
    x_span = max(x_hi - x_lo, 1e-3)
    y_max = _nice_max(max(vals))
    pw, ph = W - ML - MR, H - MT - MB

    def X(x):
        return ML + pw * (x - x_lo) / x_span

    def Y(y):
        return H - MB - ph * y / y_max

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" aria-label="{_e(aria)}">',
           _legend([(n, c) for n, c, _ in series])]
    out += _axes(x_span, y_max, x_label, lambda v: x_fmt(v + x_lo), integer_x)
    for i, (name, color, ys) in enumerate(series):
        pts = [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" '
                   f'stroke-width="{_line_width(i, len(series))}"><title>{_e(name)}</title></polyline>')
        if dots and len(pts) <= 200:
            for pt in pts:
                cx, cy = pt.split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2.2" fill="{color}"/>')
    out.append("</svg>")
    return "".join(out)


def _line_width(i: int, n: int) -> str:
    """Earlier series drawn wider: a forward-peak line equal to the backward one drawn over it still shows."""
    return f"{1.6 + 1.6 * (n - 1 - i) / max(n - 1, 1):.1f}"


def _step_series(rec: Recording, session: int | None, max_points: int = MAX_POINTS):
    rows = rec.step_rows(session)
    idx = {c: i for i, c in enumerate(STEP_COLUMNS)}
    if len(rows) > max_points:
        per = -(-len(rows) // max_points)
        rows = [max(rows[i:i + per], key=lambda r: r[idx["peak"]] or 0) for i in range(0, len(rows), per)]
    xs = [float(r[idx["step"]] or 0) for r in rows]
    series = [(f"{ph} peak", _phase_color(ph), [r[idx[f"{ph}_peak"]] for r in rows]) for ph in PHASES]
    return xs, series


def _phase_color(ph: str) -> str:
    return COLORS["optimizer_phase"] if ph == "optimizer" else COLORS[ph]


def svg_bars(xs: list[float], series: list[tuple[str, str, list]], aria: str) -> str:
    """Grouped bars: one group per step, one bar per phase."""
    vals = [v for _, _, ys in series for v in ys if v is not None]
    if not xs or not vals:
        return "<p>No steps.</p>"
    y_max = _nice_max(max(vals))
    pw, ph = W - ML - MR, H - MT - MB
    n = len(xs)
    group = pw / n
    bar = max(group * 0.8 / len(series), 0.5)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" aria-label="{_e(aria)}">',
           _legend([(name, c) for name, c, _ in series])]
    out += _axes(1.0, y_max, "step", lambda v: "")
    every = max(1, -(-n // 12))
    for i, x in enumerate(xs):
        gx = ML + group * i + group * 0.1
        for j, (name, color, ys) in enumerate(series):
            y = ys[i]
            if y is None:
                continue
            h = ph * y / y_max
            out.append(f'<rect x="{gx + j * bar:.1f}" y="{H - MB - h:.1f}" width="{bar:.2f}" height="{h:.1f}" '
                       f'fill="{color}"><title>step {x:.0f} {_e(name)}: {_e(fmt_bytes(y))}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{ML + group * (i + 0.5):.1f}" y="{H - MB + 16}" text-anchor="middle" '
                       f'class="tick">{x:.0f}</text>')
    out.append("</svg>")
    return "".join(out)


def render_html(a: dict, rec: Recording) -> str:
    job = a["job"]
    t0 = (a.get("span") or (0.0, 0.0))[0]
    pts = a["memory"].get("points") or []
    marks = []
    if a.get("peak") and a["peak"].get("t"):
        marks.append((a["peak"]["t"], f"peak {fmt_bytes(a['peak']['level'])}", "#222"))
    for o in a["ooms"]:
        marks.append((o["t"], "OOM", "#d00"))
    stacked = svg_stacked(pts, t0, marks)
    xs, series = _step_series(rec, a["session"])
    if len(xs) <= 150:
        steps_svg = svg_bars(xs, series, "phase peaks per step")
    else:
        steps_svg = svg_lines(xs, series, "step", lambda v: f"{v:.0f}", "phase peaks per step", integer_x=True)
    if a["memory"].get("on_cuda"):
        alloc_series = [("allocated", COLORS["allocated"], [p["allocated"] for p in pts]),
                        ("reserved", COLORS["reserved"], [p["reserved"] for p in pts])]
        third_title = "Reserved vs allocated"
    else:
        alloc_series = [("tracked tensors", COLORS["allocated"], [p["total"] for p in pts]),
                        ("process RSS", COLORS["rss"], [p["rss"] for p in pts])]
        third_title = "Tracked tensors vs process RSS (CPU run: no allocator)"
    third = svg_lines([p["t"] - t0 for p in pts], alloc_series, "time into the recording", fmt_tick, third_title)
    text = render_text(a)
    p = a.get("peak") or {}
    title = f"vramtop report: {job.get('model') or 'run'}"
    ooms = "".join(f"<li>OOM at step {_e(o['step'])} in {_e(o['phase'])}: "
                   f"tried to allocate {_e(fmt_bytes(o.get('requested')))}</li>" for o in a["ooms"])
    adv = "".join(f"<li>{_e(x)}</li>" for x in a["advice"])
    summary = (f"<p><b>Peak {_e(fmt_bytes(p.get('level')))}</b> at step {_e(p.get('step'))} ({_e(p.get('phase'))}), "
               f"{_e(fmt_offset(p.get('offset')))} into the recording; largest block: <b>{_e(p.get('largest'))}</b> "
               f"({p.get('largest_share', 0):.0f}%).</p>") if p else "<p>No samples.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 900px; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; }}
svg {{ width: 100%; height: auto; }} .tick {{ font-size: 10px; fill: #555; }}
.label {{ font-size: 11px; fill: #333; }} .mark {{ font-size: 10px; }}
pre {{ background: #f4f4f4; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>{_e(title)}</h1>
<p>{_e(job.get('cmdline') or '')}</p>
{summary}
{f"<ul>{ooms}</ul>" if ooms else ""}
<h2>Memory blocks over time</h2>
{stacked}
<h2>Phase peaks per step</h2>
{steps_svg}
<h2>{_e(third_title)}</h2>
{third}
<h2>Advice</h2>
<ul>{adv}</ul>
<h2>Full report</h2>
<pre>{_e(text)}</pre>
</body></html>
"""
