"""Which layout the dashboard uses at a terminal size, and its panels. Pure: no widgets.

- "too_small" below MIN_SIZE: one line that says so, nothing else (a broken
  layout would be worse than none);
- "compact" (80×24 up to WIDE_SIZE): header, the card-wide bar with a packed
  legend, the latest step's phase peaks, and ONE of the panels below, chosen
  with Tab or its number key (the tab line above it names them);
- "wide" (WIDE_SIZE and up): every panel at once, in two columns, and the
  bar's zoom on what the process itself uses.

To add a panel: append a Panel here and give the app a Static with its id
(see VramtopApp.compose); the column says where it goes in the wide layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

MIN_SIZE = (60, 20)
WIDE_SIZE = (120, 36)


@dataclass(frozen=True)
class Panel:
    id: str  # the widget's id in the app
    title: str  # its name on the tab line
    column: str  # "left" | "side": where it goes in the wide layout


PANELS: list[Panel] = [
    Panel("phases", "Phase peaks", "side"),
    Panel("timeline", "Timeline", "left"),
    Panel("gap", "Estimate", "left"),
    Panel("frag", "Allocator", "side"),
]


def mode_for(width: int, height: int) -> str:
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        return "too_small"
    if width >= WIDE_SIZE[0] and height >= WIDE_SIZE[1]:
        return "wide"
    return "compact"


def too_small(width: int, height: int) -> Text:
    return Text(f"terminal too small (needs {MIN_SIZE[0]}×{MIN_SIZE[1]}, this one is {width}×{height}): "
                "enlarge it, or press q to quit", style="bold yellow")


def tab_line(current: str, width: int) -> Text:
    """The panels' names, the shown one highlighted: what Tab cycles through."""
    t = Text(no_wrap=True, overflow="ellipsis")
    for i, panel in enumerate(PANELS, start=1):
        if i > 1:
            t.append(" │ ", style="dim")
        style = "bold reverse" if panel.id == current else "dim"
        t.append(f" {i} {panel.title} ", style=style)
    for hint in ("  Tab: next panel  ↑↓: scroll", "  Tab ↑↓", ""):
        if t.cell_len + len(hint) <= width:
            break
    t.append(hint, style="dim")
    if t.cell_len > width:
        t.truncate(max(width, 1), overflow="ellipsis")
    return t


def next_panel(current: str, delta: int = 1) -> str:
    ids = [p.id for p in PANELS]
    i = ids.index(current) if current in ids else 0
    return ids[(i + delta) % len(ids)]
