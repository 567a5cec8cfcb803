"""Pure rendering: SessionState -> Rich renderables. No app, no terminal.

Each function takes the state (and the width it may use) and returns a Rich
object, so the TUI stays a thin shell and tests can check what a panel says.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from vramtop.state import SessionState, activations_note, byte_count, dict_field
from vramtop_agent.vocabulary import BLOCK_KEYS, COLOURS, PHASE_STYLE, PHASES, fmt_bytes, is_number


def text_field(x, limit: int = 80, default: str = "?") -> str:
    """A string field from the stream, cut to `limit` characters; anything else is `default`."""
    if not isinstance(x, str):
        return default
    return x if len(x) <= limit else x[:limit - 1] + "…"


def fmt_count(n: int | None) -> str:
    if n is None or not is_number(n):
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if n / div < 10 else f"{n / div:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------- header


def header(state: SessionState, source: str = "", width: int | None = None, ctx=None) -> Text:
    """The three header lines (vramtop.tui.header), joined; each cut to `width` with "…"."""
    from vramtop.tui.header import HeaderContext, header_lines

    ctx = ctx or HeaderContext(source=source)
    return Text("\n", no_wrap=True, overflow="ellipsis").join(header_lines(state, ctx, width))


# --------------------------------------------------------------------- stack

NA_CPU = "n/a on CPU (no caching allocator)"


def legend_items(state: SessionState) -> list[Text]:
    """One item per bar segment ("■ label size pct"), then the parameters' trainable/frozen split."""
    segs = state.segments()
    total = state.device_total() or sum(x.nbytes for x in segs)
    denom = max(total, sum(x.nbytes for x in segs), 1)
    items = []
    for seg in segs:
        cell = Text()
        cell.append("■ ", style=COLOURS.get(seg.key, "white"))
        cell.append(f"{seg.label} ", style="bold")
        pct = 100.0 * seg.nbytes / denom
        cell.append(fmt_bytes(seg.nbytes) + (f" {pct:.1f}%" if pct >= 0.05 else ""))  # "0.0%" says nothing
        items.append(cell)
    split = (state.sample or {}).get("params_split")
    if isinstance(split, dict) and split:
        t = Text(f"parameters: trainable {fmt_bytes(split.get('trainable'))} · frozen {fmt_bytes(split.get('frozen'))}",
                 style="dim")
        if split.get("quantized"):
            t.append(f" · 4/8-bit {fmt_bytes(split.get('quantized'))}", style="dim")
        items.append(t)
    note = activations_note(state.sample or {}, fmt_bytes)  # tracked (and where) or derived
    if note:
        items.append(Text(f"activations: {note}", style="dim"))
    return items


def pack(items: list[Text], width: int, gap: int = 2, columns: bool = False) -> list[Text]:
    """Lay items out on as few lines of `width` cells as they fit, never breaking an item.

    columns=True aligns them in equal columns (the wide layout); an item wider than the
    line is cut with "…".
    """
    width = max(width, 10)
    items = [i.copy() for i in items]
    for i in items:
        if i.cell_len > width:
            i.truncate(width, overflow="ellipsis")
    lines: list[Text] = []
    if columns and items:
        col = max(i.cell_len for i in items) + gap
        per_line = max(1, (width + gap) // col)
        for k in range(0, len(items), per_line):
            line = Text(no_wrap=True)
            for j, item in enumerate(items[k:k + per_line]):
                if j:
                    line.append(" " * (col - items[k + j - 1].cell_len))
                line.append_text(item)
            lines.append(line)
        return lines
    line = Text(no_wrap=True)
    for item in items:
        if line.cell_len and line.cell_len + gap + item.cell_len > width:
            lines.append(line)
            line = Text(no_wrap=True)
        if line.cell_len:
            line.append(" " * gap)
        line.append_text(item)
    if line.cell_len:
        lines.append(line)
    return lines


def stack(state: SessionState, width: int, compact: bool = False) -> Group | Text:
    """The card-wide bar and its legend; the zoom on what this process uses unless `compact`."""
    segs = [x for x in state.segments()]
    if not segs:
        return Text("waiting for the first sample…", style="dim")
    total = state.device_total() or sum(x.nbytes for x in segs)
    width = max(width, 20)
    sizes = [x.nbytes for x in segs]
    denom = max(total, sum(sizes), 1)
    bar = stack_bar(sizes, [x.key for x in segs], width, denom)
    title = Text(no_wrap=True, overflow="ellipsis")
    title.append("Memory ", style="bold")
    title.append(f"of {fmt_bytes(total)} ", style="dim")
    title.append("(device)" if state.on_cuda else "(host RAM)", style="dim")
    legend = pack(legend_items(state), width, columns=not compact)
    if compact:
        return Group(title, bar, *legend)
    # The same, zoomed to what this process uses: a small model on a big card is otherwise a sliver.
    mine = [x for x in segs if x.key in (*BLOCK_KEYS, "cache")]
    zoom = stack_bar([x.nbytes for x in mine], [x.key for x in mine], width, sum(x.nbytes for x in mine))
    zoom_title = Text("zoom: reserved by PyTorch (the blocks + cache/frag)" if state.on_cuda
                      else "zoom: the tensors vramtop tracks", style="dim")
    return Group(title, bar, zoom_title, zoom, *legend)


# --------------------------------------------------------------------- now: the latest step's phase peaks


def spike_text(state: SessionState, step: dict) -> str:
    """The backward spike, or why there is none to show (CPU: no allocator peak to see it)."""
    if not state.on_cuda:
        return NA_CPU
    return "+" + fmt_bytes(step.get("backward_spike"))


def now_lines(state: SessionState, width: int) -> Text:
    """The latest step: its peak and phase peaks, then its blocks at the peak, packed into `width`."""
    last = state.last_step()
    if last is None:
        t = Text("Phase peaks: no step finished yet (they appear after the first optimizer step)",
                 style="dim", no_wrap=True, overflow="ellipsis")
        t.truncate(max(width, 1), overflow="ellipsis")
        return t
    peaks = last.get("peaks") or {}
    items = [Text(f"step {last.get('step')} peak {fmt_bytes(last.get('peak'))} in "
                  f"{text_field(last.get('peak_phase'), 20)}", style="bold")]
    for phase, short in (("forward", "fwd"), ("backward", "bwd"), ("optimizer", "opt")):
        item = Text(f"{short} ", style=PHASE_STYLE[phase][1])
        item.append(fmt_bytes(peaks.get(phase)))
        items.append(item)
    spike = Text("backward spike ", style="dim")
    spike.append("+" + fmt_bytes(last.get("backward_spike")) if state.on_cuda else "n/a on CPU")
    items.append(spike)
    if is_number(last.get("step_time")):
        items.append(Text(f"{last['step_time'] * 1000:.0f} ms", style="dim"))
    pb = last.get("peak_blocks") or {}
    blocks = [Text("at the peak:", style="dim")]
    for k in BLOCK_KEYS:
        item = Text("■ ", style=COLOURS[k])
        item.append(f"{k} {fmt_bytes(pb.get(k))}")
        blocks.append(item)
    return Text("\n", no_wrap=True).join([*pack(items, width), *pack(blocks, width)])


def stack_bar(sizes: list[int], keys: list[str], width: int, denom: int) -> Text:
    """A bar of exactly `width` cells, largest-remainder rounded; non-trivial parts get a cell."""
    denom = max(denom, sum(sizes), 1)
    raw = [n * width / denom for n in sizes]
    cells = [int(r) for r in raw]
    for i, n in enumerate(sizes):
        if n > 0 and cells[i] == 0 and raw[i] > 0.05:
            cells[i] = 1
    while sum(cells) > width:
        j = max(range(len(cells)), key=lambda i: cells[i])
        cells[j] -= 1
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    k = 0
    while sum(cells) < width and order and sum(sizes) >= denom:
        cells[order[k % len(order)]] += 1
        k += 1
    bar = Text()
    for key, n in zip(keys, cells):
        bar.append("█" * n, style=COLOURS.get(key, "white"))
    return bar


# --------------------------------------------------------------------- fragmentation


def fragmentation(state: SessionState, width: int = 50) -> Group | Text:
    """The allocator's numbers and sparklines of its history; the sparklines and their labels fill `width`."""
    s = state.sample
    if s is None:
        return Text("")
    spark = max(width - len(" allocated"), 10)  # the longest label after a sparkline
    t = Text()
    t.append("Allocator\n", style="bold")
    cuda = s.get("cuda") if state.on_cuda else None
    if cuda:
        reserved, allocated = byte_count(cuda.get("reserved")) or 0, byte_count(cuda.get("allocated")) or 0
        frag = (reserved - allocated) / reserved if reserved else 0.0
        t.append(f"reserved  {fmt_bytes(reserved)}\nallocated {fmt_bytes(allocated)}\n")
        t.append(f"cache/frag {fmt_bytes(reserved - allocated)} ({100 * frag:.0f}% of reserved)\n",
                 style="bold yellow" if frag > 0.3 else "")
        t.append(f"inactive split {fmt_bytes(cuda.get('inactive_split'))}\n")
        t.append(f"alloc retries {cuda.get('alloc_retries', 0)}", style="bold red" if cuda.get("alloc_retries") else "")
        t.append(f"   OOMs {cuda.get('ooms', 0)}\n", style="bold red" if cuda.get("ooms") else "")
        t.append(f"peak allocated {fmt_bytes(cuda.get('peak_allocated'))}\n")
        nv = dict_field(s, "nvml")
        if nv:
            t.append(f"NVML used {fmt_bytes(nv.get('used'))} of {fmt_bytes(nv.get('total'))}")
            if "process_used" in nv:
                t.append(f" (this process {fmt_bytes(nv['process_used'])})")
            t.append("\n")
        series = [(p.reserved or 0, p.allocated) for p in state.history]
        t.append(_spark([r for r, _ in series], spark), style=COLOURS["cache"])
        t.append(" reserved\n", style="dim")
        t.append(_spark([a for _, a in series], spark), style=COLOURS["activations"])
        t.append(" allocated\n", style="dim")
    else:
        host = dict_field(s, "host")
        tracked = state.tracked()
        t.append(f"fragmentation {NA_CPU}\n", style="dim")
        t.append(f"process RSS {fmt_bytes(host.get('rss'))}\n")
        t.append(f"tracked tensors {fmt_bytes(tracked)}\n")
        t.append(f"host available {fmt_bytes(host.get('available'))} of {fmt_bytes(host.get('total'))}\n")
        t.append(_spark([p.allocated for p in state.history], spark), style=COLOURS["activations"])
        t.append(" tracked\n", style="dim")
    if state.errors:
        e = state.errors[-1]
        t.append(f"agent error ({text_field(e.get('where'), 30)}): {text_field(e.get('message'), 80)}\n", style="red")
    return t


_SPARK = " ▁▂▃▄▅▆▇█"


def _spark(values: list, width: int) -> str:
    width = max(width, 8)
    vals = list(values)[-width:]
    if not vals:
        return ""
    lo, hi = 0, max(vals) or 1
    return "".join(_SPARK[min(8, int(round(8 * (v - lo) / (hi - lo or 1))))] for v in vals)


# --------------------------------------------------------------------- phases


def phases(state: SessionState, rows: int = 8, width: int = 80) -> Group | Text:
    """The last `rows` steps' phase peaks; narrower than 70 cells: short labels, no "largest" column."""
    narrow = width < 70
    table = Table(title="Phase peaks per step", title_style="bold", expand=True, box=None, padding=(0, 1))
    table.add_column("step", justify="right")
    labels = ("fwd", "bwd", "opt") if narrow else ("forward", "backward", "optimizer")
    for label in labels:
        table.add_column(label, justify="right", no_wrap=True)
    spike = state.on_cuda or not narrow
    if spike:
        table.add_column("spike" if narrow else "bwd spike", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    if not narrow:
        table.add_column("largest", justify="left", no_wrap=True)
    steps = list(state.steps)[-max(rows, 1):]
    if not steps:
        return Text("Phase peaks per step\nno step finished yet", style="dim")
    for st in steps:
        pb = st["peak_blocks"]
        top = max(BLOCK_KEYS, key=lambda k: byte_count(pb.get(k)) or 0)
        cells: list[str | Text] = [str(st["step"]), *[fmt_bytes(st["peaks"].get(p)) for p in PHASES]]
        if spike:
            cells.append("+" + fmt_bytes(st["backward_spike"]) if state.on_cuda else "n/a")
        cells.append(f"{st['step_time'] * 1000:.0f}ms" if is_number(st.get("step_time")) else "-")
        if not narrow:
            cells.append(Text(top, style=COLOURS[top]))
        table.add_row(*cells)
    parts: list = [table]
    if not state.on_cuda:
        parts.append(Text(f"backward spike: {NA_CPU}", style="dim"))
    return Group(*parts)


# --------------------------------------------------------------------- timeline


def timeline(state: SessionState, width: int, height: int = 8) -> Group | Text:
    pts = list(state.history)
    title = Text(no_wrap=True, overflow="ellipsis")
    title.append("Timeline ", style="bold")
    on_cuda = state.on_cuda
    title.append("allocated", style=COLOURS["activations"])
    if on_cuda:
        title.append(" / reserved", style=COLOURS["cache"])
    else:
        title.append(" (tracked tensors)", style="dim")
    title.append("  ", style="dim")
    for phase, short in (("forward", "fwd"), ("backward", "bwd"), ("optimizer", "opt")):
        ch, st = PHASE_STYLE[phase]
        title.append(f"{ch}={short} ", style=st)
    title.rstrip()
    if title.cell_len > width:
        title.truncate(max(width, 1), overflow="ellipsis")
    if not pts:
        return Group(title, Text("no samples yet", style="dim"))
    width = max(width - 10, 10)
    pts = pts[-width:]
    top = max(max(p.allocated, p.reserved or 0) for p in pts) or 1
    height = max(height, 3)
    lines = []
    for row in range(height, 0, -1):
        level = top * row / height
        line = Text()
        label = fmt_bytes(level) if row in (height, (height + 1) // 2) else ""
        line.append(f"{label:>9} ", style="dim")
        for p in pts:
            if p.allocated >= level:
                line.append("█", style=COLOURS["activations"])
            elif p.reserved is not None and p.reserved >= level:
                line.append("▒", style=COLOURS["cache"])
            elif p.allocated >= level - top / height:
                frac = (p.allocated - (level - top / height)) / (top / height)
                line.append(_SPARK[max(1, min(8, int(frac * 8)))], style=COLOURS["activations"])
            else:
                line.append(" ")
        lines.append(line)
    marks = Text(" " * 10)
    for p in pts:
        ch, st = PHASE_STYLE.get(p.phase, ("?", "white")) if isinstance(p.phase, str) else ("?", "white")
        marks.append(ch, style=st)
    span = pts[-1].t - pts[0].t
    axis = Text(f"{'':>10}{'-' + format(span, '.0f') + 's':<{max(len(pts) - 3, 1)}}now", style="dim")
    return Group(title, *lines, marks, axis)

