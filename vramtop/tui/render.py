"""Pure rendering: SessionState -> Rich renderables. No app, no terminal.

Each function takes the state (and the width it may use) and returns a Rich
object, so the TUI stays a thin shell and tests can check what a panel says.
"""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from vramtop.state import SessionState, activations_note, size
from vramtop_agent.schema import BLOCK_KEYS, PHASES

COLORS = {
    "parameters": "#4e79a7",
    "gradients": "#f28e2b",
    "optimizer": "#e15759",
    "activations": "#59a14f",
    "other": "#b07aa1",
    "cache": "#edc948",
    "nonpytorch": "#9c755f",
    "process": "#9c755f",
    "others": "#79706e",
    "free": "#3a3a3a",
}
PHASE_STYLE = {"forward": ("F", "#59a14f"), "backward": ("B", "#e15759"), "optimizer": ("O", "#4e79a7"),
               "idle": ("·", "#666666")}


def _finite(n) -> bool:
    return isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n)


def _text(x, limit: int = 80, default: str = "?") -> str:
    """A string field from the stream, cut to `limit` characters; anything else is `default`."""
    if not isinstance(x, str):
        return default
    return x if len(x) <= limit else x[:limit - 1] + "…"


def fmt_bytes(n: float | None) -> str:
    if not _finite(n):
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}" if n < 100 else f"{sign}{n:.0f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} TiB"


def fmt_count(n: int | None) -> str:
    if not _finite(n):
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if n / div < 10 else f"{n / div:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------- header


def header(state: SessionState, source: str = "") -> Text:
    h = state.hello or {}
    s = state.sample or {}
    model = h.get("model") or {}
    conn = state.connection()
    conn_style = {"live": "bold green", "stale": "bold yellow", "waiting": "yellow", "ended": "bold red",
                  "gone": "bold red"}[conn]
    conn_text = conn
    since = state.seconds_since_frame()
    if conn == "stale" and since is not None:
        conn_text = f"stale: no data for {since:.0f}s"
    elif conn == "ended":
        conn_text = f"agent ended ({_text((state.bye or {}).get('reason'), 40)})"
    elif conn == "gone":
        conn_text = "process exited"
    t = Text(no_wrap=True, overflow="ellipsis")  # three lines, each cut rather than wrapped
    cmd = " ".join(c for c in (h.get("cmdline") or []) if isinstance(c, str))
    if len(cmd) > 60:
        cmd = cmd[:57] + "..."
    t.append("vramtop ", style="bold")
    t.append(f"pid {s.get('pid', h.get('pid', '-'))}", style="bold cyan")
    t.append(f"@{_text(h.get('host'), 40)}")
    world = h.get("world_size", 1)
    if _finite(world) and world > 1:
        t.append(f"  rank {h.get('rank', 0)}/{world}")
    t.append(f"  {cmd}", style="dim")
    t.append("  [")
    t.append(conn_text, style=conn_style)
    t.append("]")
    if source:
        t.append(f"  {source}", style="dim")
    t.append("\n")
    dev = _text(h.get("device") or s.get("device"), 40)
    name = _text(h.get("device_name"), 60, "")
    t.append("device ", style="dim")
    t.append(f"{dev}" + (f" ({name})" if name and dev.startswith("cuda") else ""), style="bold")
    t.append("  model ", style="dim")
    t.append(_text(model.get("class"), 60), style="bold")
    if model:
        t.append(f"  {_text(model.get('summary') or model.get('method'), 60)}", style="magenta")
        t.append(f"  params {fmt_count(model.get('params_trainable'))} trainable / {fmt_count(model.get('params_total'))}")
        t.append(f"  {_text(model.get('dtype'), 30)}")
        if model.get("grad_ckpt"):
            t.append("  grad-ckpt", style="cyan")
    t.append("\n")
    batch = s.get("batch")
    last = state.last_step()
    t.append("batch×seq ", style="dim")
    t.append("×".join(str(x) for x in batch) if batch else "-", style="bold")
    t.append("  step ", style="dim")
    t.append(str(s.get("step", "-")), style="bold")
    injected = h.get("injected")
    if isinstance(injected, dict):  # started mid-run by `vramtop attach PID`: nothing known before it
        first = injected.get("first_step")
        t.append(f" (injected: steps before {first} unknown)" if isinstance(first, int) else
                 " (injected: waiting for the next optimizer step)", style="yellow")
    t.append("  phase ", style="dim")
    ph = _text(s.get("phase"), 20, "-")
    t.append(ph, style=PHASE_STYLE.get(ph, ("", "white"))[1])
    t.append("  step time ", style="dim")
    t.append(f"{last['step_time'] * 1000:.0f} ms" if last and _finite(last.get("step_time")) else "-", style="bold")
    dropped = size(s.get("dropped")) or 0
    t.append("  dropped ", style="dim")
    t.append(f"{dropped + state.missed_events}", style="bold red" if dropped + state.missed_events else "")
    if state.rejected_frames:
        t.append(f"  rejected {state.rejected_frames}", style="bold red")
    if size(s.get("errors")):
        t.append(f"  agent errors {s['errors']}", style="bold red")
    return t


# --------------------------------------------------------------------- stack


def stack(state: SessionState, width: int) -> Group | Text:
    segs = [x for x in state.segments()]
    if not segs:
        return Text("waiting for the first sample…", style="dim")
    total = state.device_total() or sum(x.nbytes for x in segs)
    width = max(width, 20)
    sizes = [x.nbytes for x in segs]
    denom = max(total, sum(sizes), 1)
    bar = _bar(sizes, [x.key for x in segs], width, denom)
    # The same, zoomed to what this process uses: a small model on a big card is otherwise a sliver.
    mine = [x for x in segs if x.key in (*BLOCK_KEYS, "cache")]
    zoom = _bar([x.nbytes for x in mine], [x.key for x in mine], width, sum(x.nbytes for x in mine))
    table = Table.grid(padding=(0, 2))
    for _ in range(4):
        table.add_column()
    row: list = []
    split = (state.sample or {}).get("params_split")
    split = split if isinstance(split, dict) else {}
    for seg in segs:
        pct = 100.0 * seg.nbytes / denom
        cell = Text()
        cell.append("■ ", style=COLORS.get(seg.key, "white"))
        cell.append(f"{seg.label} ", style="bold")
        cell.append(f"{fmt_bytes(seg.nbytes)} {pct:.1f}%")
        if seg.key == "parameters" and split:
            cell.append(f"\n  trainable {fmt_bytes(split.get('trainable'))} · frozen {fmt_bytes(split.get('frozen'))}",
                        style="dim")
            if split.get("quantized"):
                cell.append(f" · 4/8-bit {fmt_bytes(split.get('quantized'))}", style="dim")
        if seg.key == "activations":
            note = activations_note(state.sample or {}, fmt_bytes)  # tracked (where) or derived
            if note:
                cell.append(f"\n  {note}", style="dim")
        row.append(cell)
        if len(row) == 4:
            table.add_row(*row)
            row = []
    if row:
        table.add_row(*row, *[""] * (4 - len(row)))
    title = Text()
    title.append("Memory ", style="bold")
    title.append(f"of {fmt_bytes(total)} ", style="dim")
    title.append("(device)" if state.on_cuda else "(host RAM)", style="dim")
    zoom_title = Text("zoom: reserved by PyTorch (the blocks + cache/frag)" if state.on_cuda
                      else "zoom: the tensors vramtop tracks", style="dim")
    return Group(title, bar, zoom_title, zoom, table)


def _bar(sizes: list[int], keys: list[str], width: int, denom: int) -> Text:
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
        bar.append("█" * n, style=COLORS.get(key, "white"))
    return bar


# --------------------------------------------------------------------- fragmentation


def fragmentation(state: SessionState, width: int = 40) -> Group | Text:
    s = state.sample
    if s is None:
        return Text("")
    t = Text()
    t.append("Allocator\n", style="bold")
    cuda = s.get("cuda") if state.on_cuda else None
    if cuda:
        reserved, allocated = size(cuda.get("reserved")) or 0, size(cuda.get("allocated")) or 0
        frag = (reserved - allocated) / reserved if reserved else 0.0
        t.append(f"reserved  {fmt_bytes(reserved)}\nallocated {fmt_bytes(allocated)}\n")
        t.append(f"cache/frag {fmt_bytes(reserved - allocated)} ({100 * frag:.0f}% of reserved)\n",
                 style="bold yellow" if frag > 0.3 else "")
        t.append(f"inactive split {fmt_bytes(cuda.get('inactive_split'))}\n")
        t.append(f"alloc retries {cuda.get('alloc_retries', 0)}", style="bold red" if cuda.get("alloc_retries") else "")
        t.append(f"   OOMs {cuda.get('ooms', 0)}\n", style="bold red" if cuda.get("ooms") else "")
        t.append(f"peak allocated {fmt_bytes(cuda.get('peak_allocated'))}\n")
        nv = s.get("nvml") if isinstance(s.get("nvml"), dict) else None
        if nv:
            t.append(f"NVML used {fmt_bytes(nv.get('used'))} of {fmt_bytes(nv.get('total'))}")
            if "process_used" in nv:
                t.append(f" (this process {fmt_bytes(nv['process_used'])})")
            t.append("\n")
        series = [(p.reserved or 0, p.allocated) for p in state.history]
        t.append(_spark([r for r, _ in series], width), style=COLORS["cache"])
        t.append(" reserved\n", style="dim")
        t.append(_spark([a for _, a in series], width), style=COLORS["activations"])
        t.append(" allocated\n", style="dim")
    else:
        host = s.get("host") if isinstance(s.get("host"), dict) else {}
        tracked = state.tracked()
        t.append("CPU: no caching allocator to inspect\n", style="dim")
        t.append(f"process RSS {fmt_bytes(host.get('rss'))}\n")
        t.append(f"tracked tensors {fmt_bytes(tracked)}\n")
        t.append(f"host available {fmt_bytes(host.get('available'))} of {fmt_bytes(host.get('total'))}\n")
        t.append(_spark([p.allocated for p in state.history], width), style=COLORS["activations"])
        t.append(" tracked\n", style="dim")
    if state.errors:
        e = state.errors[-1]
        t.append(f"agent error ({_text(e.get('where'), 30)}): {_text(e.get('message'), 80)}\n", style="red")
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


def phases(state: SessionState, rows: int = 8) -> Group | Text:
    table = Table(title="Phase peaks per step", title_style="bold", expand=True, box=None, padding=(0, 1))
    table.add_column("step", justify="right")
    for label in ("fwd peak", "bwd peak", "opt peak"):
        table.add_column(label, justify="right")
    table.add_column("spike", justify="right")
    table.add_column("time", justify="right")
    table.add_column("top", justify="left")
    steps = list(state.steps)[-rows:]
    if not steps:
        return Text("Phase peaks per step\nno step finished yet", style="dim")
    for st in steps:
        pb = st["peak_blocks"]
        top = max(BLOCK_KEYS, key=lambda k: size(pb.get(k)) or 0)
        table.add_row(
            str(st["step"]),
            *[fmt_bytes(st["peaks"].get(p)) for p in PHASES],
            "+" + fmt_bytes(st["backward_spike"]),
            f"{st['step_time'] * 1000:.0f}ms" if _finite(st.get("step_time")) else "-",
            Text(top[:5], style=COLORS[top]),
        )
    last = steps[-1]
    pb = last["peak_blocks"]
    detail = Text()
    detail.append(f"step {last['step']} peak {fmt_bytes(last['peak'])} in {_text(last['peak_phase'], 20)}: ",
                  style="bold")
    for k in BLOCK_KEYS:
        detail.append("■", style=COLORS[k])
        detail.append(f"{k[:5]} {fmt_bytes(pb.get(k))}  ")
    return Group(table, detail)


# --------------------------------------------------------------------- timeline


def timeline(state: SessionState, width: int, height: int = 8) -> Group | Text:
    pts = list(state.history)
    title = Text()
    title.append("Timeline ", style="bold")
    on_cuda = state.on_cuda
    title.append("allocated", style=COLORS["activations"])
    if on_cuda:
        title.append(" / reserved", style=COLORS["cache"])
    else:
        title.append(" (tracked tensors)", style="dim")
    title.append("  phases: ", style="dim")
    for p in ("forward", "backward", "optimizer"):
        ch, st = PHASE_STYLE[p]
        title.append(f"{ch}={p} ", style=st)
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
                line.append("█", style=COLORS["activations"])
            elif p.reserved is not None and p.reserved >= level:
                line.append("▒", style=COLORS["cache"])
            elif p.allocated >= level - top / height:
                frac = (p.allocated - (level - top / height)) / (top / height)
                line.append(_SPARK[max(1, min(8, int(frac * 8)))], style=COLORS["activations"])
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

