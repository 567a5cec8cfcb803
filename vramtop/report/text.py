"""The report for a terminal: `render_text(analysis)` -> plain lines (analysis from vramtop/report/analysis.py).

Text from the recording is untrusted: `clean()` strips control characters and bounds its length.
"""

from __future__ import annotations

import time
from typing import Any

from vramtop import creep_report
from vramtop.recording import clean
from vramtop.report.numbers import pct
from vramtop_agent.vocabulary import BLOCK_KEYS, fmt_bytes, is_number


def fmt_offset(seconds: float | None) -> str:
    if seconds is None or not is_number(seconds) or abs(seconds) > 1e12:
        return "-"
    seconds = max(float(seconds), 0.0)
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    frac = seconds - int(seconds)
    return f"{h:d}:{m:02d}:{s:02d}.{int(frac * 10)}" if h else f"{m:d}:{s:02d}.{int(frac * 10)}"


def _when(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def render_text(a: dict) -> str:
    lines = _job_lines(a)
    lines.append("")
    lines += _peak_lines(a["job"], a.get("peak"))
    s = a["steps"]
    lines += _step_lines(s)
    lines += _memory_lines(a["memory"])
    lines += creep_report.lines(a.get("creep") or [], s.get("count") or 0)
    for i, o in enumerate(a["ooms"]):
        lines += _oom_lines(o, "" if len(a["ooms"]) == 1 else f" #{i + 1}")
    lines += _estimate_lines(a)
    lines.append("")
    lines.append("ADVICE")
    lines += [f"  - {line}" for line in a["advice"]]
    lines += [f"note: {note}" for note in a.get("notes") or []]
    return "\n".join(lines) + "\n"


def _job_lines(a: dict) -> list[str]:
    """The title, then what ran where, how it ended and how much the file holds."""
    job = a["job"]
    head = f"vramtop report: {clean(a['file'], 120)}"
    lines = [head, "=" * min(len(head), 78)]
    when = _when(job.get("start_time"))
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
    lines.append("ended     " + (clean(ended, 60) if ended
                                 else "no goodbye: the process was killed, or is still running"))
    c = a["counts"]
    lines.append(f"data      {c.get('samples', 0)} samples, {c.get('steps', 0)} steps, {c.get('events', 0)} events"
                 + (f", {a['sessions']} sessions (showing {a['session']})" if a["sessions"] > 1 else ""))
    return lines


def _peak_lines(job: dict, p: dict | None) -> list[str]:
    if not p:
        return ["PEAK      no samples in the recording"]
    lines = [f"PEAK      {fmt_bytes(p['level'])} at step {p['step']} ({p['phase']}), "
             f"{fmt_offset(p.get('offset'))} into the recording"]
    total = sum(p["blocks"].values()) or 1
    for k in sorted(BLOCK_KEYS, key=lambda k: -p["blocks"][k]):
        mark = "  <- largest" if k == p.get("largest") else ""
        lines.append(f"  {k:<12} {fmt_bytes(p['blocks'][k]):>11}  {pct(p['blocks'][k], total):5.1f}%{mark}")
    if job.get("device_total"):
        device = job["device_total"]
        lines.append(f"  = {pct(p['level'], device):.0f}% of the device's {fmt_bytes(device)}")
    return lines


def _step_lines(s: dict) -> list[str]:
    if not s.get("count"):
        return []
    mt = f"{s['median_time'] * 1000:.0f} ms" if s.get("median_time") else "-"
    lines = ["", f"STEPS     {s['count']} (steps {s['first']}..{s['last']}), median step time {mt}, "
                 f"median peak {fmt_bytes(s['median_peak'])}, highest {fmt_bytes(s['max_peak'])} at step "
                 f"{s['max_step']} ({s['max_phase']})"
                 + (f" with input {s['max_batch'][0]}x{s['max_batch'][1]}" if s.get("max_batch") else ""),
             f"          median backward spike above the end of forward: {fmt_bytes(s['median_backward_spike'])}"]
    if s.get("growth") is not None:
        lines.append(f"          step peak change over the run (same input shape): {fmt_bytes(s['growth'])}")
    return lines


def _memory_lines(m: dict) -> list[str]:
    if m.get("on_cuda"):
        return [f"ALLOCATOR max reserved {fmt_bytes(m.get('max_reserved'))}, max reserved-but-free "
                f"{fmt_bytes(m.get('max_cache'))}, alloc retries {m.get('alloc_retries', '-')}, "
                f"OOMs {m.get('num_ooms', '-')}"]
    if m.get("points"):
        return [f"PROCESS   max RSS {fmt_bytes(m.get('max_rss'))} (CPU run: no allocator statistics)"]
    return []


def _oom_lines(o: dict, number: str) -> list[str]:
    req = f", tried to allocate {fmt_bytes(o['requested'])}" if o.get("requested") else ""
    lines = ["", f"OOM{number}       step {o['step']} in {o['phase']}"
                 f", {fmt_offset(o.get('offset'))} into the recording{req}",
             f"  {clean(o['message'], 150)}",
             f"  in use: {fmt_bytes(o['total'])} tracked"
             + (f", {fmt_bytes(o.get('allocated'))} allocated / {fmt_bytes(o.get('reserved'))} reserved"
                if o.get("reserved") is not None else "")]
    if o.get("grew"):
        lines.append(f"  grew since {o['compared_to']}: "
                     + ", ".join(f"{k} +{fmt_bytes(d)}" for k, d in o["grew"]))
    seg = o.get("segments")
    if seg:
        lines.append(f"  allocator: {seg['count']} segments, {fmt_bytes(seg['reserved'])} reserved, "
                     f"{fmt_bytes(seg['free_in_segments'])} free inside them, largest free block "
                     f"{fmt_bytes(seg['largest_free_block'])}")
    return lines


def _estimate_lines(a: dict) -> list[str]:
    if not (a.get("estimate") and a["estimate"].get("peak_allocated")):
        return []
    return ["", f"ESTIMATE  the estimator expected a peak of {fmt_bytes(a['estimate']['peak_allocated'])} "
                f"allocated ({fmt_bytes(a['estimate'].get('peak'))} "
                f"{'on the card' if a['memory'].get('on_cuda') else 'of host RAM'})"]
