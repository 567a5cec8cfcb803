"""The report as one self-contained HTML page: report.html (beside this file) filled with
string.Template. Every value put into it is escaped here or built by vramtop/report/svg.py."""

from __future__ import annotations

import string
from importlib import resources

from vramtop.recording import STEP_COLUMNS, Recording
from vramtop.report.analysis import MAX_POINTS
from vramtop.report.svg import COLORS, esc, fmt_tick, svg_bars, svg_lines, svg_stacked
from vramtop.report.text import fmt_offset, render_text
from vramtop_agent.vocabulary import PHASES, fmt_bytes


def _template() -> string.Template:
    return string.Template(resources.files("vramtop.report").joinpath("report.html").read_text(encoding="utf-8"))


def render_html(a: dict, rec: Recording) -> str:
    job = a["job"]
    t0 = (a.get("span") or (0.0, 0.0))[0]
    pts = a["memory"].get("points") or []
    third_title, third = _allocator_plot(a, pts, t0)
    title = f"vramtop report: {job.get('model') or 'run'}"
    ooms = "".join(f"<li>OOM at step {esc(o['step'])} in {esc(o['phase'])}: "
                   f"tried to allocate {esc(fmt_bytes(o.get('requested')))}</li>" for o in a["ooms"])
    return _template().substitute(
        title=esc(title),
        cmdline=esc(job.get("cmdline") or ""),
        summary=_summary(a.get("peak") or {}),
        ooms=f"<ul>{ooms}</ul>" if ooms else "",
        stacked=svg_stacked(pts, t0, _marks(a)),
        steps=_steps_plot(rec, a["session"]),
        third_title=esc(third_title),
        third=third,
        advice="".join(f"<li>{esc(x)}</li>" for x in a["advice"]),
        text=esc(render_text(a)),
    )


def _summary(p: dict) -> str:
    if not p:
        return "<p>No samples.</p>"
    return (f"<p><b>Peak {esc(fmt_bytes(p.get('level')))}</b> at step {esc(p.get('step'))} ({esc(p.get('phase'))}), "
            f"{esc(fmt_offset(p.get('offset')))} into the recording; largest block: <b>{esc(p.get('largest'))}</b> "
            f"({p.get('largest_share', 0):.0f}%).</p>")


def _marks(a: dict) -> list[tuple[float, str, str]]:
    """The peak and each OOM, as dashed lines on the stacked plot."""
    marks = []
    if a.get("peak") and a["peak"].get("t"):
        marks.append((a["peak"]["t"], f"peak {fmt_bytes(a['peak']['level'])}", "#222"))
    for o in a["ooms"]:
        marks.append((o["t"], "OOM", "#d00"))
    return marks


def _steps_plot(rec: Recording, session: int | None) -> str:
    """Bars while a bar per step stays readable, lines beyond."""
    xs, series = _step_series(rec, session)
    if len(xs) <= 150:
        return svg_bars(xs, series, "phase peaks per step")
    return svg_lines(xs, series, "step", lambda v: f"{v:.0f}", "phase peaks per step", integer_x=True)


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


def _allocator_plot(a: dict, pts: list[dict], t0: float) -> tuple[str, str]:
    """(title, SVG): reserved vs allocated on CUDA, tracked tensors vs process RSS on a CPU run."""
    if a["memory"].get("on_cuda"):
        series = [("allocated", COLORS["allocated"], [p["allocated"] for p in pts]),
                  ("reserved", COLORS["reserved"], [p["reserved"] for p in pts])]
        title = "Reserved vs allocated"
    else:
        series = [("tracked tensors", COLORS["allocated"], [p["total"] for p in pts]),
                  ("process RSS", COLORS["rss"], [p["rss"] for p in pts])]
        title = "Tracked tensors vs process RSS (CPU run: no allocator)"
    return title, svg_lines([p["t"] - t0 for p in pts], series, "time into the recording", fmt_tick, title)
