"""Memory budgets: check a run's measured peaks (or an estimate) against limits, for CI.

Pure functions over a Recording (or an estimate's dict); the verbs (`vramtop run --budget`,
`vramtop report --budget`, `vramtop estimate --budget`) are thin wrappers. See
docs/budgets-and-alerts.md.

What is measured (per session of the recording, i.e. per rank):
  device     (default) what the card must hold: on CUDA the allocator's reserved memory
             (its peak between samples when the agent reports one) plus what lies outside
             PyTorch (NVML's per-process figure minus reserved: the CUDA context, library
             workspaces); on CPU the tracked blocks, as `allocated`.
  allocated  memory PyTorch allocated: the steps' phase peaks and the samples' levels.
  blocks     each block's peak (`--budget-block activations=12GiB`), from the steps' peak
             blocks and the samples.

The verdict is a JSON-able dict (`verdict_json`); `breach_lines` says one line per breach: which
block, which step and phase, by how much. EXIT_OVER_BUDGET is the exit status when a budget is
exceeded (2 stays the usage/bad-input status).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from vramtop.errors import UserError
from vramtop_agent.vocabulary import BLOCK_KEYS

EXIT_OVER_BUDGET = 3
EXIT_NOTHING_MEASURED = 4
VERDICT_VERSION = 1
MEASURES = ("device", "allocated")


@dataclass
class Budget:
    total: int | None = None                    # bytes for the measure, None: no overall budget
    label: str | None = None                    # "rtx4090" or "22GiB" as given
    blocks: dict = field(default_factory=dict)  # block -> bytes
    measure: str = "device"


def parse(total: str | None, blocks: list[str] | None = None, measure: str = "device") -> Budget:
    """'22GiB' or a card name ('rtx4090'), and ['activations=12GiB', ...] -> Budget. Raises UserError."""
    from vramtop_agent.estimator.units import card_bytes, parse_bytes

    b = Budget(measure=measure)
    if measure not in MEASURES:
        raise UserError(f"--budget-measure must be one of {', '.join(MEASURES)}")
    if total:
        try:
            b.label, b.total = card_bytes(total)
        except ValueError as exc:
            raise UserError(f"--budget: {exc}") from None
    for item in blocks or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or key not in BLOCK_KEYS:
            raise UserError(f"--budget-block {item!r}: expected BLOCK=SIZE with BLOCK one of {', '.join(BLOCK_KEYS)}")
        try:
            b.blocks[key] = parse_bytes(value)
        except ValueError as exc:
            raise UserError(f"--budget-block {item!r}: {exc}") from None
    if b.total is None and not b.blocks:
        raise UserError("no budget given: --budget SIZE|CARD and/or --budget-block BLOCK=SIZE")
    return b


def add_arguments(p: argparse.ArgumentParser, with_verdict: bool = True) -> None:
    """The budget options, shared by run, report and estimate."""
    p.add_argument("--budget", metavar="SIZE|CARD", default=None,
                   help="fail (exit 3) when the peak exceeds SIZE (22GiB) or a card (rtx4090, a100-80g, ...)")
    p.add_argument("--budget-block", metavar="BLOCK=SIZE", action="append", default=[],
                   help="a budget for one block, e.g. activations=12GiB (repeatable)")
    p.add_argument("--budget-measure", choices=MEASURES, default="device",
                   help="device: reserved + non-PyTorch (default); allocated: PyTorch's allocations")
    if with_verdict:
        p.add_argument("--verdict", metavar="FILE", default=None, help="write the budget verdict as JSON to FILE")


def from_args(args: argparse.Namespace) -> Budget | None:
    if not getattr(args, "budget", None) and not getattr(args, "budget_block", None):
        if getattr(args, "verdict", None):
            raise UserError("--verdict needs --budget or --budget-block")
        return None
    return parse(args.budget, args.budget_block, args.budget_measure)


# ---------------------------------------------------------------- measuring


def _peak(level, step, phase) -> dict:
    return {"bytes": int(level), "step": step, "phase": phase}


def _better(cur: dict | None, level, step, phase) -> dict | None:
    if level is None:
        return cur
    if cur is None or int(level) > cur["bytes"]:
        return _peak(level, step, phase)
    return cur


def measure_session(rec, session: int) -> dict:
    """The session's peaks: device, allocated, and each block, with step and phase."""
    from vramtop.recording import SAMPLE_COLUMNS, STEP_COLUMNS

    on_cuda = False
    device = None
    for s in rec.samples(session=session):
        cuda = s.get("cuda")
        if not isinstance(cuda, dict):
            continue
        on_cuda = True
        reserved = max(int(cuda["reserved"]), int(cuda.get("peak_reserved") or 0))
        used = (s.get("nvml") or {}).get("process_used")
        outside = max(int(used) - int(cuda["reserved"]), 0) if isinstance(used, int) else 0
        device = _better(device, reserved + outside, s.get("step"), s.get("phase"))
    allocated = None
    blocks: dict = {k: None for k in BLOCK_KEYS}
    for row in rec.step_rows(session=session):
        d = dict(zip(STEP_COLUMNS, row))
        allocated = _better(allocated, d["peak"], d["step"], d["peak_phase"])
        for k in BLOCK_KEYS:
            blocks[k] = _better(blocks[k], d[f"peak_{k}"], d["step"], d["peak_phase"])
    for row in rec.iter_sample_rows(session=session):
        d = dict(zip(SAMPLE_COLUMNS, row))
        level = d["allocated"] if d["allocated"] is not None else d["total"]
        allocated = _better(allocated, level, d["step"], d["phase"])
        for k in BLOCK_KEYS:
            blocks[k] = _better(blocks[k], d[k], d["step"], d["phase"])
    return {"on_cuda": on_cuda, "device": device if on_cuda else allocated, "allocated": allocated,
            "blocks": blocks}


# ---------------------------------------------------------------- verdict


def check(measured: dict, budget: Budget, label: str = "") -> list[dict]:
    """The breaches of one measured session (or estimate)."""
    out = []
    if budget.total is not None:
        peak = measured.get(budget.measure)
        if peak is not None and peak["bytes"] > budget.total:
            out.append({"what": budget.measure, "budget": budget.total, "budget_label": budget.label, **peak,
                        "over": peak["bytes"] - budget.total, "session": label})
    for k, limit in budget.blocks.items():
        peak = (measured.get("blocks") or {}).get(k)
        if peak is not None and peak["bytes"] > limit:
            out.append({"what": k, "budget": limit, "budget_label": None, **peak, "over": peak["bytes"] - limit,
                        "session": label})
    return out


def verdict(source: str, sessions: dict[str, dict], budget: Budget) -> dict:
    """{'ok', 'breaches', 'budget', 'measured'}: the machine-readable verdict (docs/budgets-and-alerts.md)."""
    breaches = [b for label, m in sessions.items() for b in check(m, budget, label)]
    return {
        "verdict_version": VERDICT_VERSION,
        "source": source,
        "ok": not breaches and bool(sessions),
        "measured_anything": bool(sessions),
        "exit_code": exit_code_of(breaches, bool(sessions)),
        "budget": {"total": budget.total, "label": budget.label, "measure": budget.measure,
                   "blocks": dict(budget.blocks)},
        "breaches": breaches,
        "measured": sessions,
    }


def exit_code_of(breaches: list, measured: bool) -> int:
    if breaches:
        return EXIT_OVER_BUDGET
    return 0 if measured else EXIT_NOTHING_MEASURED


def check_recording(path: str, budget: Budget, session: int | None = None) -> dict:
    """The verdict of a recording: every session (rank) unless one is named."""
    from vramtop.recording import reading

    with reading(path, session) as rec:
        sessions = {}
        for s in rec.sessions():
            if session is not None and s.id != session:
                continue
            m = measure_session(rec, s.id)
            if m["allocated"] is not None:
                sessions[f"{os.path.basename(path)}#{s.id} (pid {s.pid}, rank {s.rank})"] = m
    return verdict(path, sessions, budget)


def finish_run(record: str, budget: Budget, verdict_path: str | None, job_status: int) -> int:
    """After `vramtop run --budget`: the verdict of the job's recording(s) ({rank} files too), said
    and written. The job's own failure status wins over the budget's."""
    import glob
    import re
    import sys

    pattern = re.sub(r"\{(rank|pid|host)\}", "*", record)
    paths = sorted(glob.glob(pattern)) if pattern != record else [record]
    sessions: dict = {}
    for path in paths:
        if os.path.exists(path):
            sessions.update(check_recording(path, budget)["measured"])
    v = verdict(record, sessions, budget)
    v["job_exit_code"] = job_status
    write_verdict(v, verdict_path)
    for line in breach_lines(v):
        print(line, file=sys.stderr)
    return job_status or v["exit_code"]


def check_estimate(est: dict, budget: Budget) -> dict:
    """The verdict of an estimate (`Estimate.to_dict()`): its peak stands for the device measure."""
    phase = est.get("peak_phase")
    m = {"on_cuda": True, "device": _peak(est["peak"], None, phase),
         "allocated": _peak(est["peak_allocated"], None, phase),
         "blocks": {k: _peak(v, None, None) for k, v in est["blocks"].items()}}
    return verdict("estimate", {"estimate": m}, budget)


def finish_estimate(est: dict, budget: Budget, verdict_path: str | None, text: str | None) -> int:
    """`vramtop estimate --budget`: the estimate (text), or with --json the verdict, and the breach lines."""
    import sys

    v = check_estimate(est, budget)
    write_verdict(v, verdict_path)
    print(text if text is not None else json.dumps(v))
    for line in breach_lines(v):
        print(line, file=sys.stderr)
    return v["exit_code"]


# ---------------------------------------------------------------- saying it


def _gib(n: int) -> str:
    from vramtop_agent.vocabulary import fmt_bytes

    return fmt_bytes(n)


def _is_card(label) -> bool:
    from vramtop_agent.estimator.units import GPUS_MIB

    return isinstance(label, str) and label in GPUS_MIB


def breach_lines(v: dict) -> list[str]:
    """One line per breach, then one summary line."""
    lines = []
    for b in v["breaches"]:
        where = []
        if b.get("step") is not None:
            where.append(f"step {b['step']}")
        if b.get("phase"):
            where.append(str(b["phase"]))
        at = f" at {', '.join(where)}" if b.get("step") is not None else (f" in {b['phase']}" if b.get("phase") else "")
        limit = b["budget_label"] if _is_card(b.get("budget_label")) else None
        budget = _gib(b["budget"]) + (f" ({limit})" if limit else "")
        who = f" [{b['session']}]" if b.get("session") and len(v["measured"]) > 1 else ""
        lines.append(f"vramtop: over budget: {b['what']} peaked at {_gib(b['bytes'])}{at}, "
                     f"{_gib(b['over'])} over the {budget} budget{who}")
    if not v["measured_anything"]:
        lines.append("vramtop: budget: nothing was measured (the job never reached a training step)")
    elif v["ok"]:
        m = v["budget"]["measure"]
        peak = max(s[m]["bytes"] for s in v["measured"].values() if s.get(m))
        lines.append(f"vramtop: within budget ({m} peak {_gib(peak)})")
    return lines


def write_verdict(v: dict, path: str | None) -> None:
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(v, fh, indent=2)
            fh.write("\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
