"""The dashboard's alert banner and creep line: a pure renderer over the model and the AlertMonitor."""

from __future__ import annotations

from rich.text import Text

from vramtop.alerts import creep_text

_STYLE = {"oom": "bold white on red", "creep": "bold black on yellow", "headroom": "bold white on red",
          "retries": "bold black on yellow", "fragmentation": "black on yellow"}


def has_content(state, monitor) -> bool:
    return bool(monitor.active or state.creep.creeping or monitor.failures)


def render(state, monitor) -> Text:
    """One line per alert that holds now; the creep line whenever a series creeps (also below the
    alert threshold of the monitor); nothing on a healthy run."""
    out = Text()
    shown_creep = False
    for a in monitor.active:
        if out:
            out.append("\n")
        out.append(f" {a.kind.upper()} ", style=_STYLE.get(a.kind, "bold"))
        out.append(f" {a.message}")
        shown_creep |= a.kind == "creep"
    if not shown_creep:
        for c in state.creep.current():
            if out:
                out.append("\n")
            out.append(" CREEP ", style=_STYLE["creep"])
            out.append(f" {creep_text(c)}")
    if monitor.failures:
        out.append(("\n" if out else "") + monitor.failures[-1], style="red")
    return out
