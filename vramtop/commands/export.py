"""`vramtop export run.vramtop --format csv|json|perfetto [-o FILE]`.

- csv: one row per sample (or per step with `--what steps`): time, step, phase, the five blocks, their
  total, allocated / reserved (CUDA), RSS. Bytes are integers.
- json: the whole recording as decoded messages: {"meta", "sessions", "samples", "steps", "events"},
  written as a stream (a 24-hour recording never sits in memory at once).
- perfetto: Chrome trace JSON (opens in ui.perfetto.dev and chrome://tracing): counter tracks of the
  blocks and of the allocator, slices for the forward / backward / optimizer phases and the steps,
  an instant event per OOM. Timestamps are microseconds since the Unix epoch, the same clock the
  agent stamps messages with, so the tracks can be lined up with a torch.profiler trace.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import IO

from vramtop.commands.common import add_session, add_verb
from vramtop.errors import UserError
from vramtop_agent.vocabulary import BLOCK_KEYS, PHASES


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "export", run,
        help="export a recording as CSV, JSON or a Perfetto / Chrome trace",
        description="Convert a recording for pandas, spreadsheets or ui.perfetto.dev.",
    )
    p.add_argument("recording", help="a .vramtop file")
    p.add_argument("--format", "-f", choices=("csv", "json", "perfetto"), default="csv")
    p.add_argument("-o", "--output", default="-", help="output file (default: standard output)")
    p.add_argument("--what", choices=("samples", "steps"), default="samples", help="csv: which table (default samples)")
    add_session(p, "only this session")


def run(args: argparse.Namespace) -> int:
    from vramtop.recording import finish, reading

    with reading(args.recording, args.session) as rec:
        if args.output == "-":
            fh = sys.stdout
            close = False
        else:
            try:
                fh = open(args.output, "w", encoding="utf-8", newline="")
            except OSError as exc:
                raise UserError(f"cannot write {args.output}: {exc.strerror or exc}") from None
            close = True
        try:
            if args.format == "csv":
                export_csv(rec, fh, args.what, args.session)
            elif args.format == "json":
                export_json(rec, fh, args.session)
            else:
                export_perfetto(rec, fh, args.session)
        finally:
            if close:
                fh.close()
        code = finish(rec)
    return code


def _cell(v):
    # Strings come from the recording: keep spreadsheets from evaluating them as formulas.
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def export_csv(rec, fh: IO[str], what: str = "samples", session: int | None = None) -> int:
    from vramtop.recording import SAMPLE_COLUMNS, STEP_COLUMNS

    w = csv.writer(fh, lineterminator="\n")
    if what == "steps":
        cols = [c for c in STEP_COLUMNS if c not in ("id", "rseq")]
        idx = [STEP_COLUMNS.index(c) for c in cols]
        rows = rec.step_rows(session)
    else:
        cols = [c for c in SAMPLE_COLUMNS if c not in ("id", "rseq")]
        idx = [SAMPLE_COLUMNS.index(c) for c in cols]
        rows = rec.iter_sample_rows(session=session)
    w.writerow(cols)
    n = 0
    for r in rows:
        w.writerow([_cell(r[i]) for i in idx])
        n += 1
    return n


def export_json(rec, fh: IO[str], session: int | None = None) -> None:
    def dump(x) -> str:
        return json.dumps(x, separators=(",", ":"), default=str)

    fh.write('{"meta":' + dump(rec.meta) + ',\n"sessions":[')
    sessions = [s for s in rec.sessions() if session is None or s.id == session]
    fh.write(",".join(dump(s.__dict__) for s in sessions))
    for name, it in (("samples", rec.samples(session=session)), ("steps", rec.steps(session)),
                     ("events", rec.events(session=session))):
        fh.write(f'],\n"{name}":[\n')
        first = True
        for msg in it:
            fh.write(("" if first else ",\n") + dump(msg))
            first = False
    fh.write("]}\n")


def perfetto_events(rec, session: int | None = None):
    """Chrome trace events (dicts), in no particular order."""
    sessions = [s for s in rec.sessions() if session is None or s.id == session]
    by_id = {s.id: s for s in sessions}
    for s in sessions:
        hello = s.hello or {}
        model = (hello.get("model") or {}).get("class") or s.model_class or "training job"
        yield {"ph": "M", "name": "process_name", "pid": s.pid, "args": {"name": f"vramtop: {model} (rank {s.rank})"}}
        for tid, name in ((1, "memory"), (2, "phases"), (3, "steps")):
            yield {"ph": "M", "name": "thread_name", "pid": s.pid, "tid": tid, "args": {"name": name}}

    def us(t: float) -> float:
        return round(t * 1e6, 1)

    from vramtop.recording import SAMPLE_COLUMNS

    c = {k: i for i, k in enumerate(SAMPLE_COLUMNS)}
    for r in rec.iter_sample_rows(session=session):
        sess = by_id.get(r[c["session"]])
        pid = sess.pid if sess else 0
        ts = us(r[c["t"]])
        yield {"ph": "C", "name": "blocks", "pid": pid, "tid": 1, "ts": ts,
               "args": {k: r[c[k]] or 0 for k in BLOCK_KEYS}}
        if r[c["allocated"]] is not None:
            yield {"ph": "C", "name": "allocator", "pid": pid, "tid": 1, "ts": ts,
                   "args": {"allocated": r[c["allocated"]], "reserved_unallocated":
                            max((r[c["reserved"]] or 0) - r[c["allocated"]], 0)}}
        if r[c["rss"]] is not None:
            yield {"ph": "C", "name": "process RSS", "pid": pid, "tid": 1, "ts": ts, "args": {"rss": r[c["rss"]]}}

    # Phases: a phase runs from its start edge to its end edge or the next start, whichever comes first.
    open_phase: dict[int, tuple[str, float, int]] = {}
    for e in rec.events(("phase",), session=session):
        pid = e["pid"]
        cur = open_phase.get(pid)
        if e["edge"] == "start":
            if cur is not None:
                yield _slice(pid, 2, cur[0], cur[1], e["t"], {"step": cur[2]})
            open_phase[pid] = (e["phase"], e["t"], e["step"])
        elif cur is not None and cur[0] == e["phase"]:
            yield _slice(pid, 2, cur[0], cur[1], e["t"], {"step": cur[2]})
            open_phase.pop(pid, None)
    for pid, (name, t0, step) in open_phase.items():  # cut short by an OOM, a kill or the end of the file
        end = max((s.last_t or t0) for s in sessions if s.pid == pid) if any(s.pid == pid for s in sessions) else t0
        yield _slice(pid, 2, name, t0, max(end, t0), {"step": step, "unfinished": True})
    prev_end: dict[int, float] = {}
    for st in rec.steps(session):
        pid = st["pid"]
        start = prev_end.get(pid)
        if start is None and isinstance(st.get("step_time"), (int, float)):
            start = st["t"] - st["step_time"]
        if start is not None:
            yield _slice(pid, 3, f"step {st['step']}", start, st["t"], {
                "peak": st["peak"], "peak_phase": st["peak_phase"],
                **{f"{p}_peak": st["peaks"].get(p) for p in PHASES}})
        prev_end[pid] = st["t"]
    for e in rec.events(("oom", "error", "bye"), session=session):
        args = {"step": e.get("step"), "phase": e.get("phase")}
        if e["type"] == "oom":
            args.update(requested=e.get("requested"), message=str(e.get("message", ""))[:500])
            name = "OOM"
        elif e["type"] == "error":
            args.update(where=e.get("where"), message=str(e.get("message", ""))[:500])
            name = "vramtop agent error"
        else:
            args = {"reason": e.get("reason")}
            name = "agent stopped"
        yield {"ph": "i", "s": "p", "name": name, "pid": e["pid"], "tid": 2, "ts": us(e["t"]), "args": args}


def _slice(pid: int, tid: int, name: str, t0: float, t1: float, args: dict) -> dict:
    return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": round(t0 * 1e6, 1),
            "dur": round(max(t1 - t0, 0.0) * 1e6, 1), "args": args}


def export_perfetto(rec, fh: IO[str], session: int | None = None) -> None:
    fh.write('{"displayTimeUnit":"ms","otherData":{"generator":"vramtop export","clock":"unix epoch microseconds"},'
             '"traceEvents":[\n')
    first = True
    for ev in perfetto_events(rec, session):
        fh.write(("" if first else ",\n") + json.dumps(ev, separators=(",", ":"), default=str))
        first = False
    fh.write("\n]}\n")
