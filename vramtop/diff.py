"""Run-to-run diff: two recordings (or two sessions of one), block by block and phase by phase.

Pure over Recording objects; `vramtop diff` (vramtop/commands/diff.py) only parses and prints.

For each run: the steps compared (warm-up left out: the first WARMUP_STEPS steps, or none when the
run is shorter), the peak and the steady state (the median over those steps) of every block at the
step's peak, of every phase's peak and of the step peak. The likely cause of a difference is said
in the words of the live gap (vramtop/gap.py): batch x seq, dtype, method, checkpointing, optimizer,
trainable parameters, library versions, from the runs' hellos and steps.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter

from vramtop.errors import UserError
from vramtop_agent.vocabulary import BLOCK_KEYS, PHASES

WARMUP_STEPS = 3
# A difference smaller than this (and than 1 % of the larger value) is noise, not a change.
SAME_BYTES = 64 * 1024


def parse_target(text: str) -> tuple[str, int | None]:
    """'run.vramtop' or 'run.vramtop#2' (session 2) -> (path, session)."""
    if os.path.exists(text) or "#" not in text:
        return text, None
    path, _, sid = text.rpartition("#")
    if not sid.isdigit():
        raise UserError(f"{text}: expected FILE or FILE#SESSION (a session number)")
    return path, int(sid)


def _median(xs: list[int]) -> int:
    return int(statistics.median(xs)) if xs else 0


def _mode(values):
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


def summarize(rec, session: int | None) -> dict:
    """One run's numbers and setup."""
    from vramtop.recording import STEP_COLUMNS

    sess = rec.session(session)
    if sess is None:
        raise UserError(f"{rec.path}: no session in the recording")
    rows = [dict(zip(STEP_COLUMNS, r)) for r in rec.step_rows(session=sess.id)]
    rows = [r for r in rows if r["peak"] is not None]
    if not rows:
        raise UserError(f"{rec.path}#{sess.id}: no training step recorded, nothing to compare")
    steady = rows[WARMUP_STEPS:] if len(rows) > WARMUP_STEPS else rows
    series = {"peak": [r["peak"] for r in rows]}
    for p in PHASES:
        series[f"{p} peak"] = [r[f"{p}_peak"] or 0 for r in rows]
    for k in BLOCK_KEYS:
        series[k] = [r[f"peak_{k}"] or 0 for r in rows]
    first = steady[0]["step"]
    numbers = {}
    for name, values in series.items():
        numbers[name] = {"peak": max(values), "steady": _median(values[len(rows) - len(steady):])}
    hello = sess.hello or {}
    model, opt = hello.get("model") or {}, hello.get("optimizer") or {}
    batch = _mode((r["batch"], r["seq_len"]) for r in steady if r["batch"] is not None)
    setup = {
        "batch x seq": f"{batch[0]}x{batch[1]}" if batch else None,
        "micro-steps per step": _mode(r["micro_steps"] for r in steady),
        "dtype": model.get("dtype"),
        "method": model.get("method"),
        "checkpointing": model.get("grad_ckpt"),
        "optimizer": opt.get("class"),
        "trainable parameters": model.get("params_trainable"),
        "parameters": model.get("params_total"),
        "model": model.get("class"),
        "torch": hello.get("torch_version"),
        "agent": hello.get("agent_version"),
        "device": hello.get("device_name") or hello.get("device"),
    }
    return {"file": rec.path, "session": sess.id, "steps": [first, steady[-1]["step"]],
            "all_steps": [rows[0]["step"], rows[-1]["step"]], "numbers": numbers, "setup": setup}


# Which setting can move which number, most likely first (the live gap's reasoning, vramtop/gap.py).
_CAUSES = {
    "activations": ("batch x seq", "checkpointing", "micro-steps per step", "dtype", "method", "model", "torch"),
    "other": ("batch x seq", "micro-steps per step", "dtype", "torch", "device"),
    "parameters": ("dtype", "method", "parameters", "model"),
    "gradients": ("trainable parameters", "method", "dtype", "model"),
    "optimizer": ("optimizer", "trainable parameters", "method", "dtype"),
}
_PEAK_CAUSES = ("batch x seq", "checkpointing", "dtype", "method", "optimizer", "trainable parameters",
                "micro-steps per step", "model", "torch", "agent")
_WHY = {
    "batch x seq": "activations grow with batch x seq",
    "checkpointing": "checkpointing keeps only the layer inputs",
    "dtype": "bytes per element",
    "method": "LoRA/QLoRA drop the frozen weights' gradients and optimizer states",
    "optimizer": "the optimizer's states per trainable weight",
    "trainable parameters": "gradients and optimizer states follow the trainable set",
    "micro-steps per step": "gradient accumulation",
    "torch": "a library version",
    "agent": "a library version",
}


def changed_settings(a: dict, b: dict) -> dict:
    return {k: (a["setup"].get(k), b["setup"].get(k)) for k in a["setup"]
            if a["setup"].get(k) != b["setup"].get(k)}


def cause(name: str, delta: int, changes: dict) -> str:
    """The likely cause of a difference, in plain words."""
    if delta == 0:
        return ""
    base = name.replace(" peak", "") if name.endswith(" peak") else name
    order = _CAUSES.get(base, _PEAK_CAUSES)
    for key in order:
        if key in changes:
            old, new = changes[key]
            why = _WHY.get(key)
            return f"{key} {old} -> {new}" + (f" ({why})" if why else "")
    if base in ("activations", "other") or name.endswith("peak"):
        return "same setup: the data (sequence lengths), the code path or the allocator differ"
    return "same setup: the model or how it is loaded differs"


def _same(x: int, y: int) -> bool:
    return abs(x - y) <= max(SAME_BYTES, 0.01 * max(x, y))


def compare(a: dict, b: dict) -> dict:
    """Row per number: A, B, the difference and its likely cause (peak and steady state)."""
    changes = changed_settings(a, b)
    rows = []
    for name in a["numbers"]:
        na, nb = a["numbers"][name], b["numbers"].get(name, {"peak": 0, "steady": 0})
        row = {"name": name}
        for kind in ("peak", "steady"):
            d = nb[kind] - na[kind]
            row[kind] = {"a": na[kind], "b": nb[kind], "diff": d, "same": _same(na[kind], nb[kind])}
        d = row["peak"]["diff"] if not row["peak"]["same"] else row["steady"]["diff"]
        row["cause"] = "" if row["peak"]["same"] and row["steady"]["same"] else cause(name, d, changes)
        rows.append(row)
    return {"a": a, "b": b, "changes": {k: list(v) for k, v in changes.items()}, "rows": rows}


def diff_files(target_a: str, target_b: str) -> dict:
    from vramtop.recording import reading

    out = []
    for target in (target_a, target_b):
        path, session = parse_target(target)
        with reading(path, session) as rec:
            out.append(summarize(rec, session))
    return compare(*out)


def render_text(d: dict) -> str:
    from vramtop_agent.vocabulary import fmt_bytes

    a, b = d["a"], d["b"]
    lines = [f"A: {a['file']}#{a['session']}  steps {a['steps'][0]}-{a['steps'][1]} (of {a['all_steps'][0]}-"
             f"{a['all_steps'][1]}; the first {WARMUP_STEPS} are warm-up)",
             f"B: {b['file']}#{b['session']}  steps {b['steps'][0]}-{b['steps'][1]} (of {b['all_steps'][0]}-"
             f"{b['all_steps'][1]})"]
    if d["changes"]:
        lines.append("changed: " + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in d["changes"].items()))
    else:
        lines.append("changed: nothing in the setup the agents reported")
    lines.append("")
    lines.append(f"{'':<16}{'peak A':>12}{'peak B':>12}{'diff':>12}  {'steady A':>12}{'steady B':>12}{'diff':>12}")
    for r in d["rows"]:
        p, s = r["peak"], r["steady"]

        def signed(x: dict) -> str:
            return "=" if x["same"] else ("+" if x["diff"] > 0 else "-") + fmt_bytes(abs(x["diff"]))

        lines.append(f"{r['name']:<16}{fmt_bytes(p['a']):>12}{fmt_bytes(p['b']):>12}{signed(p):>12}  "
                     f"{fmt_bytes(s['a']):>12}{fmt_bytes(s['b']):>12}{signed(s):>12}")
    causes = [(r["name"], r["cause"]) for r in d["rows"] if r["cause"]]
    if causes:
        lines.append("")
        lines.append("likely causes:")
        lines += [f"  {name}: {why}" for name, why in causes]
    return "\n".join(lines) + "\n"
