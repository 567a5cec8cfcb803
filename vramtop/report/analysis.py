"""What a recording says, as plain data: `analyze(rec)` -> a dict of numbers and short strings.

Pure reading: nothing here formats for a terminal or a page (vramtop/report/text.py and
page.py do). Tests and `vramtop report --json` read the dict directly.
"""

from __future__ import annotations

import statistics
from typing import Any

from vramtop import creep_report
from vramtop.recording import SAMPLE_COLUMNS, STEP_COLUMNS, Recording, Session
from vramtop.report.advice import advice
from vramtop.report.numbers import as_int, pct
from vramtop_agent.vocabulary import BLOCK_KEYS

MAX_POINTS = 800


def analyze(rec: Recording, session: int | None = None) -> dict:
    """Everything the report says, as plain data."""
    sessions = rec.sessions()
    if session is None:
        session = _default_session(rec, sessions)
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
    a["job"] = _job(hello, sess, t0)
    byes = rec.events(("bye",), session=session)
    a["ended"] = byes[-1].get("reason") if byes else None
    a["peak"] = _peak_summary(rec, session, t0)
    steps = [dict(zip(STEP_COLUMNS, r)) for r in rec.step_rows(session)]
    a["steps"] = _step_summary(steps)
    a["memory"] = _sample_summary(rec, session)  # device-side numbers over the run
    a["creep"] = creep_report.summarize(rec, session)
    a["ooms"] = [_oom_summary(rec, e, steps, session, t0) for e in rec.ooms(session)]
    est = hello.get("estimate") if isinstance(hello.get("estimate"), dict) else None
    a["estimate"] = ({"peak": as_int(est.get("peak")), "peak_allocated": as_int(est.get("peak_allocated"))}
                     if est else None)
    a["gap"] = _gap(est, rec, session, a) if est else None
    a["advice"] = advice(a)
    a["problems"] = rec.problem_line()
    return a


def _default_session(rec: Recording, sessions: list[Session]) -> int | None:
    """The session of the latest OOM when there is one, else the newest run's (vramtop.replay)."""
    from vramtop.replay import newest_session

    ooms_all = rec.ooms()
    session = None
    if ooms_all:
        pid, rank = ooms_all[-1]["pid"], ooms_all[-1]["rank"]
        session = next((s.id for s in reversed(sessions) if s.pid == pid and s.rank == rank), None)
    if session is None:
        session = newest_session(sessions)
    return session


def _job(hello: dict, sess: Session | None, t0: float | None) -> dict:
    model = hello.get("model") or {}
    return {
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


def _peak_summary(rec: Recording, session: int | None, t0: float | None) -> dict | None:
    peak = rec.peak(session)
    if peak is None:
        return None
    total = sum(v or 0 for v in peak.blocks.values())
    blocks = {k: int(peak.blocks.get(k) or 0) for k in BLOCK_KEYS}
    largest = max(BLOCK_KEYS, key=lambda k: blocks[k]) if total else None
    return {
        "level": peak.level, "t": peak.t, "offset": (peak.t - t0) if (peak.t is not None and t0) else None,
        "step": peak.step, "phase": peak.phase, "blocks": blocks, "source": peak.source,
        "largest": largest, "largest_share": pct(blocks[largest], total) if largest else 0.0,
    }


def _gap(est: dict, rec: Recording, session: int | None, a: dict) -> dict | None:
    """The estimator's gap analysis (vramtop/gap.py) at the peak step, when the job published an estimate."""
    from vramtop import gap  # loads the estimator: only for a job that published an estimate

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
    out.update(_growth(steps))
    return out


def _growth(steps: list[dict]) -> dict:
    """Growth from step to step with the same input shape: something keeps tensors alive."""
    shape = (steps[-1].get("batch"), steps[-1].get("seq_len"))
    same = [s for s in steps if (s.get("batch"), s.get("seq_len")) == shape]
    if len(same) < 6:
        return {}
    k = max(len(same) // 4, 2)
    early = statistics.median(s["peak"] or 0 for s in same[1:k + 1])  # step 0 allocates optimizer state
    late = statistics.median(s["peak"] or 0 for s in same[-k:])
    return {"growth": int(late - early),
            "growth_per_step": (late - early) / max(same[-1]["step"] - same[1]["step"], 1)}


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
    last = rec.sample_at(float("inf"), session)
    if on_cuda:
        gaps = [(p["reserved"] or 0) - (p["allocated"] or 0) for p in pts if p["reserved"] is not None]
        out["max_reserved"] = max((p["reserved"] or 0) for p in pts)
        out["max_cache"] = max(gaps) if gaps else None
        cuda = (last or {}).get("cuda") or {}
        out["alloc_retries"] = cuda.get("alloc_retries")
        out["num_ooms"] = cuda.get("ooms")
    else:
        out["max_rss"] = max((p["rss"] or 0) for p in pts)
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
    ref_blocks = _oom_reference(rec, e, steps, session, out)
    grew = sorted(((k, blocks[k] - ref_blocks[k]) for k in BLOCK_KEYS), key=lambda kv: -kv[1])
    out["grew"] = [(k, d) for k, d in grew if d > 0]
    segs = e.get("segments")
    if isinstance(segs, list) and segs:
        out["segments"] = _segment_summary(segs)
    return out


def _oom_reference(rec: Recording, e: dict, steps: list[dict], session: int | None, out: dict) -> dict:
    """What grew is measured against the previous step's peak (same phase of the loop, one step
    earlier), else the run's start; says which in out["compared_to"]."""
    before = [s for s in steps if s["step"] is not None and s["step"] < e["step"]]
    if before:
        ref = before[-1]
        out["compared_to"] = f"the peak of step {ref['step']}"
        if ref.get("batch"):
            out["ref_batch"] = [ref["batch"], ref["seq_len"]]
        return {k: int(ref.get(f"peak_{k}") or 0) for k in BLOCK_KEYS}
    span = rec.span(session)
    first = rec.sample_at(span[0], session) if span else None
    out["compared_to"] = "the start of the run"
    return {k: int((first or {}).get("blocks", {}).get(k) or 0) for k in BLOCK_KEYS}


def _segment_summary(segs: list) -> dict:
    total = sum(as_int(s.get("total_size")) for s in segs if isinstance(s, dict))
    allocated = sum(as_int(s.get("allocated_size")) for s in segs if isinstance(s, dict))
    largest_free = 0
    free_blocks = 0
    for s in segs:
        if not isinstance(s, dict):
            continue
        for b in s.get("blocks") or ():
            if isinstance(b, dict) and str(b.get("state", "")).startswith("inactive"):
                free_blocks += 1
                largest_free = max(largest_free, as_int(b.get("size")))
    return {"count": len(segs), "reserved": total, "allocated": allocated, "free_in_segments": total - allocated,
            "largest_free_block": largest_free, "free_blocks": free_blocks}
