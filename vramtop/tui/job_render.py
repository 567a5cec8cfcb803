"""The job overview, rendered: JobState in, Rich Text out. No app, no terminal.

What the overview (vramtop.tui.job_view) draws, as pure functions, like
render.py for one rank: one fixed-width line per rank (a compact stack bar at
the rank's last step peak, all bars on one scale so a heavier rank is a
longer bar, then per block the most it held during its last step, the step
peak, step, step time and connection state), the header above them and the
imbalance panel below. Per block, the largest and smallest rank are coloured
when they differ by 10% or more (and 1 MiB, see vramtop.job_state).
"""

from __future__ import annotations

from rich.text import Text

from vramtop.job_state import JobState
from vramtop.tui.render import stack_bar
from vramtop_agent.vocabulary import BLOCK_KEYS, COLOURS, LABELS, fmt_bytes

BAR_WIDTH = 16
HI_STYLE = "bold white on #a1262b"  # the largest rank of an imbalanced block
LO_STYLE = "bold black on #76b7b2"  # the smallest
# What each compared metric is called in the table's header and in the imbalance panel.
METRIC_LABELS = {**{k: LABELS[k] for k in BLOCK_KEYS}, "peak": "step peak", "step_time": "step time"}
# Fixed widths, since cells are updated in place as numbers grow.
_BLOCK_WIDTHS = {"parameters": 10, "gradients": 10, "optimizer": 10, "activations": 11, "other": 9}
# (key, label, width)
COLUMNS = (("rank", "rank", 6), ("node", "node", 12), ("pid", "pid", 8), ("stack", "stack at step peak", BAR_WIDTH),
           *((k, METRIC_LABELS[k], _BLOCK_WIDTHS[k]) for k in BLOCK_KEYS), ("peak", METRIC_LABELS["peak"], 9),
           ("step", "step", 7), ("step_time", METRIC_LABELS["step_time"], 9), ("state", "state", 7))
_RIGHT_ALIGNED = {"pid", *BLOCK_KEYS, "peak", "step", "step_time"}
# Columns given up first when the screen is narrower than the whole table (the rest of a rank's
# identity stays in its rank number; pid and node are one Enter away).
DROP_ORDER = ("pid", "node", "stack")
_CONNECTION_STYLE = {"live": "green", "stale": "yellow", "waiting": "yellow"}  # anything else: bold red


def rank_cells(job: JobState, key: str, imb: dict, scale: int, width: int = BAR_WIDTH, values: dict | None = None,
               world_size: int | None = -1) -> dict[str, Text]:
    """The overview's cells for one rank (column key -> Text). `values`, `world_size`: precomputed, for speed."""
    values = job.values(key) if values is None else values
    cells: dict[str, Text] = {}
    ws = job.world_size() if world_size == -1 else world_size
    rank = job.rank(key)
    cells["rank"] = Text(f"{rank}/{ws}" if ws and ws > 1 else str(rank), style="bold")
    cells["node"] = Text(job.node(key)[:16])
    cells["pid"] = Text(str(job.pid(key) or "-"))
    sizes = [int(values["peak_blocks"].get(k) or 0) for k in BLOCK_KEYS]
    bar = stack_bar(sizes, list(BLOCK_KEYS), width, max(scale, 1)) if any(sizes) else Text()
    if bar.cell_len < width:
        bar.append("·" * (width - bar.cell_len), style=COLOURS["free"])  # the part this rank does not use
    cells["stack"] = bar
    for metric in (*BLOCK_KEYS, "peak"):
        cells[metric] = _flagged(fmt_bytes(values.get(metric)), metric, key, imb)
    cells["step"] = Text(str(values.get("step")) if values.get("step") is not None else "-")
    step_time = values.get("step_time")
    cells["step_time"] = _flagged(f"{step_time * 1000:.0f} ms" if step_time else "-", "step_time", key, imb)
    conn = values["connection"]
    cells["state"] = Text(conn, style=_CONNECTION_STYLE.get(conn, "bold red"))
    return cells


def _flagged(text: str, metric: str, key: str, imb: dict) -> Text:
    """The cell, coloured when this rank is the largest or smallest of an imbalanced metric."""
    i = imb.get(metric)
    if i is not None and i.flagged:
        if key == i.max_key:
            return Text(text, style=HI_STYLE)
        if key == i.min_key:
            return Text(text, style=LO_STYLE)
    return Text(text)


def bar_scale(job: JobState, keys: list[str] | None = None, vals: dict | None = None) -> int:
    """One scale for every rank's bar: the largest sum of blocks."""
    best = 0
    for k in keys if keys is not None else job.keys():
        values = vals[k] if vals is not None else job.values(k)
        best = max(best, sum(int(values["peak_blocks"].get(b) or 0) for b in BLOCK_KEYS))
    return best


def columns_for(width: int | None) -> tuple:
    """The columns that fit in `width` cells (all of them when width is None)."""
    cols = COLUMNS
    for key in DROP_ORDER:
        if width is None or sum(w for _, _, w in cols) + len(cols) - 1 <= width:
            break
        cols = tuple(c for c in cols if c[0] != key)
    return cols


def line(cells: dict[str, Text], cols: tuple = COLUMNS) -> Text:
    """One fixed-width line of the overview table from a row's cells (or the header's)."""
    out = Text(no_wrap=True, overflow="crop")
    for i, (col, _, width) in enumerate(cols):
        cell = cells[col].copy()
        cell.truncate(width, overflow="ellipsis")
        if col in _RIGHT_ALIGNED:
            out.append(" " * (width - cell.cell_len))
            out.append_text(cell)
        else:
            out.append_text(cell)
            out.append(" " * (width - cell.cell_len))
        if i < len(cols) - 1:
            out.append(" ")
    return out


def header_line(cols: tuple = COLUMNS) -> Text:
    t = line({col: Text(label) for col, label, _ in COLUMNS}, cols)
    t.stylize("bold")
    return t


def overview_rows(job: JobState, cache: dict | None = None, width: int | None = None
                  ) -> tuple[list[str], list[Text], dict]:
    """(keys in rank order, one line per rank, imbalance) for the whole job: what the overview draws.

    With `cache` (a dict kept between calls), a rank's line is rebuilt only when
    what it shows changed: its step, its last step summary, its connection state,
    the bar scale, or whether it is the max/min of an imbalanced metric. Lines
    change at the step rate, not at the sample rate. `width`: the cells available (columns_for).
    """
    cols = columns_for(width)
    keys = job.keys()
    vals = {k: job.values(k) for k in keys}
    imb = job.imbalance(keys=keys, values=vals)
    scale = bar_scale(job, keys, vals)
    ws = job.world_size()
    flags = tuple((m, i.max_key, i.min_key) for m, i in imb.items() if i.flagged)
    lines = []
    for k in keys:
        values = vals[k]
        last = job.members[k].last_step()
        signature = (values["step"], id(last), values["connection"], scale, ws, job.node(k), job.pid(k), cols,
                     tuple(f for f in flags if k in (f[1], f[2])))
        hit = cache.get(k) if cache is not None else None
        if hit is not None and hit[0] == signature:
            lines.append(hit[1])
            continue
        rendered = line(rank_cells(job, k, imb, scale, values=values, world_size=ws), cols)
        if cache is not None:
            cache[k] = (signature, rendered)
        lines.append(rendered)
    return keys, lines, imb


def imbalance_text(job: JobState, imb: dict | None = None) -> Text:
    imb = job.imbalance() if imb is None else imb
    t = Text()
    t.append("Imbalance across ranks ", style="bold")
    t.append("(the most each block held during each rank's last step; max vs min across ranks)\n", style="dim")
    if not imb:
        t.append("needs two ranks with data\n", style="dim")
        return t
    for metric in (*BLOCK_KEYS, "peak", "step_time"):
        i = imb.get(metric)
        if i is None:
            continue
        if metric == "step_time":
            hi, lo, spread = f"{i.max * 1000:.0f} ms", f"{i.min * 1000:.0f} ms", f"{i.spread * 1000:.0f} ms"
        else:
            hi, lo, spread = fmt_bytes(i.max), fmt_bytes(i.min), fmt_bytes(i.spread)
        label = METRIC_LABELS[metric]
        if i.spread == 0:
            text = f"{label:>11}  {hi} on every rank"
        else:
            text = (f"{label:>11}  max {hi} (rank {job.rank(i.max_key)}) vs min {lo} "
                    f"(rank {job.rank(i.min_key)}): {spread}, {100 * i.ratio:.0f}% of max")
        if i.flagged:
            t.append("▲ " + text + "\n", style="bold red")
        else:
            t.append("  " + text + "\n", style="dim")
    return t


def job_header(job: JobState, where: str = "") -> Text:
    t = Text()
    t.append("vramtop job ", style="bold")
    ws = job.world_size()
    n = len(job.members)
    t.append(f"{n} rank{'s' if n != 1 else ''}", style="bold cyan")
    if ws and ws > 1:
        t.append(f" of world size {ws}")
    nodes = sorted({job.node(k) for k in job.members})
    if nodes:
        t.append(f"  on {len(nodes)} node{'s' if len(nodes) != 1 else ''}: {', '.join(nodes)[:60]}", style="dim")
    live = job.live_count()
    t.append(f"  live {live}/{n}", style="green" if live == n and n else "yellow")
    slowest, fastest = job.step_range()
    if slowest is not None:
        t.append("  step ", style="dim")
        t.append(f"{slowest}" if slowest == fastest else f"{slowest}..{fastest}",
                 style="bold" if slowest == fastest else "bold yellow")
    if where:
        t.append(f"  {where}", style="dim")
    t.append("\nEnter or click: drill into a rank   Esc (in a rank): back to all ranks", style="dim")
    return t
