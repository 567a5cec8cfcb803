"""The whole job on one screen: one compact stack row per rank, imbalance highlighted, drill-down.

JobApp is the single-process dashboard (VramtopApp) with a job overview
screen pushed on top of it:
- the overview (OverviewScreen) lists every rank: a compact stack bar (the
  breakdown at the rank's last step peak, all bars on one scale so a heavier
  rank is a longer bar), then per block the most it held during the rank's
  last step (see vramtop.job_state), the step peak, step, step time and
  connection state (the live numbers are one Enter away). Per block, the largest and smallest
  rank are coloured when they differ by 10% or more (and 1 MiB); the panel
  below says by how much;
- Enter (or a click on a rank's line) drills into that rank: the
  overview is popped and the dashboard underneath shows the rank's own
  SessionState, live; Escape brings the overview back.
The rendering functions here are pure (JobState in, Rich out), like render.py.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from vramtop.job_state import JobState
from vramtop.state import SessionState
from vramtop.tui import render
from vramtop.tui.app import VramtopApp
from vramtop_agent.schema import BLOCK_KEYS

BAR_WIDTH = 16
HI_STYLE = "bold white on #a1262b"  # the largest rank of an imbalanced block
LO_STYLE = "bold black on #76b7b2"  # the smallest
# (key, label, width): fixed widths, since cells are updated in place as numbers grow.
COLUMNS = (("rank", "rank", 6), ("node", "node", 12), ("pid", "pid", 8), ("stack", "stack at step peak", BAR_WIDTH),
           ("parameters", "parameters", 10), ("gradients", "gradients", 10), ("optimizer", "optimizer", 10),
           ("activations", "activations", 11), ("other", "other", 9), ("peak", "step peak", 9),
           ("step", "step", 7), ("step_time", "step time", 9), ("state", "state", 7))
_SHORT = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer",
          "activations": "activations", "other": "other", "peak": "step peak", "step_time": "step time"}


# --------------------------------------------------------------------- pure rendering


def rank_cells(job: JobState, key: str, imb: dict, scale: int, width: int = BAR_WIDTH, v: dict | None = None,
               world_size: int | None = -1) -> dict[str, Text]:
    """The overview's cells for one rank (column key -> Text). `v`, `world_size`: precomputed, for speed."""
    v = job.values(key) if v is None else v
    cells: dict[str, Text] = {}
    ws = job.world_size() if world_size == -1 else world_size
    r = job.rank(key)
    cells["rank"] = Text(f"{r}/{ws}" if ws and ws > 1 else str(r), style="bold")
    cells["node"] = Text(job.node(key)[:16])
    cells["pid"] = Text(str(job.pid(key) or "-"))
    sizes = [int(v["peak_blocks"].get(k) or 0) for k in BLOCK_KEYS]
    bar = render._bar(sizes, list(BLOCK_KEYS), width, max(scale, 1)) if any(sizes) else Text()
    if bar.cell_len < width:
        bar.append("·" * (width - bar.cell_len), style="#3a3a3a")
    cells["stack"] = bar
    for metric in (*BLOCK_KEYS, "peak"):
        cells[metric] = _flag(render.fmt_bytes(v.get(metric)), metric, key, imb)
    cells["step"] = Text(str(v.get("step")) if v.get("step") is not None else "-")
    st = v.get("step_time")
    cells["step_time"] = _flag(f"{st * 1000:.0f} ms" if st else "-", "step_time", key, imb)
    conn = v["connection"]
    cells["state"] = Text(conn, style={"live": "green", "stale": "yellow", "waiting": "yellow"}.get(conn, "bold red"))
    return cells


def _flag(text: str, metric: str, key: str, imb: dict) -> Text:
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
        v = vals[k] if vals is not None else job.values(k)
        best = max(best, sum(int(v["peak_blocks"].get(b) or 0) for b in BLOCK_KEYS))
    return best


# Columns given up first when the screen is narrower than the whole table (the rest of a rank's
# identity stays in its rank number; pid and node are one Enter away).
DROP_ORDER = ("pid", "node", "stack")


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
        if col in _RIGHT:
            out.append(" " * (width - cell.cell_len))
            out.append_text(cell)
        else:
            out.append_text(cell)
            out.append(" " * (width - cell.cell_len))
        if i < len(cols) - 1:
            out.append(" ")
    return out


_RIGHT = {"pid", "parameters", "gradients", "optimizer", "activations", "other", "peak", "step", "step_time"}


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
        v = vals[k]
        st = job.members[k]
        last = st.last_step()
        sig = (v["step"], id(last), v["connection"], scale, ws, job.node(k), job.pid(k), cols,
               tuple(f for f in flags if k in (f[1], f[2])))
        hit = cache.get(k) if cache is not None else None
        if hit is not None and hit[0] == sig:
            lines.append(hit[1])
            continue
        ln = line(rank_cells(job, k, imb, scale, v=v, world_size=ws), cols)
        if cache is not None:
            cache[k] = (sig, ln)
        lines.append(ln)
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
            hi, lo, spread = render.fmt_bytes(i.max), render.fmt_bytes(i.min), render.fmt_bytes(i.spread)
        if i.spread == 0:
            text = f"{_SHORT[metric]:>11}  {hi} on every rank"
        else:
            text = (f"{_SHORT[metric]:>11}  max {hi} (rank {job.rank(i.max_key)}) vs min {lo} "
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
    lo, hi = job.steps()
    if lo is not None:
        t.append("  step ", style="dim")
        t.append(f"{lo}" if lo == hi else f"{lo}..{hi}", style="bold" if lo == hi else "bold yellow")
    if where:
        t.append(f"  {where}", style="dim")
    t.append("\nEnter or click: drill into a rank   Esc (in a rank): back to all ranks", style="dim")
    return t


# --------------------------------------------------------------------- widgets


class RankTable(Static, can_focus=True):
    """The ranks, one line each, with a cursor: Enter or a click drills into the rank.

    One Text for the whole table (not a DataTable of cells): with 64 ranks
    refreshed 4 times a second, per-cell rendering cost more than everything
    else in the viewer; and it is re-rendered only when a line changed.
    """

    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("pageup", "move(-10)", show=False),
        Binding("pagedown", "move(10)", show=False),
        Binding("home", "move(-1000000)", show=False),
        Binding("end", "move(1000000)", show=False),
        Binding("enter", "select", "Drill into rank"),
    ]
    CURSOR_STYLE = "reverse"

    class Selected(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    def __init__(self, **kwargs):
        super().__init__("", **kwargs)
        self.keys: list[str] = []
        self.lines: list[Text] = []
        self.cursor = 0
        self._shown: Text | None = None
        self.columns: tuple = COLUMNS

    @property
    def cursor_key(self) -> str | None:
        return self.keys[self.cursor] if 0 <= self.cursor < len(self.keys) else None

    def set_rows(self, keys: list[str], lines: list[Text], columns: tuple = COLUMNS) -> None:
        if columns != self.columns:
            self.columns, self.lines = columns, []  # a resize: redraw with the header's new columns
        if keys == self.keys and len(lines) == len(self.lines) and all(a is b for a, b in zip(lines, self.lines)):
            return  # the same line objects (overview_rows' cache): nothing to redraw
        current = self.cursor_key
        self.keys, self.lines = keys, lines
        if current in keys:
            self.cursor = keys.index(current)
        self.cursor = max(0, min(self.cursor, len(keys) - 1))
        self._draw()

    def _draw(self) -> None:
        rows = []
        for i, ln in enumerate(self.lines):
            if i == self.cursor and self.has_focus:
                ln = ln.copy()
                ln.stylize(self.CURSOR_STYLE)
            elif i % 2:
                ln = ln.copy()
                ln.stylize("on #1c1c1c")
            rows.append(ln)
        text = Text("\n", no_wrap=True).join([header_line(self.columns), *rows]) if rows else Text("waiting for the ranks…",
                                                                                      style="dim")
        if text != self._shown:  # identical content: no re-render at all
            self._shown = text
            self.update(text)

    def action_move(self, delta: int) -> None:
        if not self.keys:
            return
        self.cursor = max(0, min(self.cursor + delta, len(self.keys) - 1))
        self._draw()
        self.scroll_visible_line(self.cursor + 1)

    def scroll_visible_line(self, y: int) -> None:
        from textual.geometry import Region

        parent = self.parent
        if parent is not None and hasattr(parent, "scroll_to_region"):
            parent.scroll_to_region(Region(0, y, 1, 1), animate=False)

    def action_select(self) -> None:
        if self.cursor_key is not None:
            self.post_message(self.Selected(self.cursor_key))

    def on_click(self, event) -> None:
        row = event.y - 1  # the header is line 0
        if 0 <= row < len(self.keys):
            self.cursor = row
            self._draw()
            self.post_message(self.Selected(self.keys[row]))

    def on_focus(self) -> None:
        self._draw()

    def on_blur(self) -> None:
        self._draw()


class OverviewScreen(Screen):
    CSS = """
    OverviewScreen { layout: vertical; }
    #job-header { height: 2; padding: 0 1; background: $boost; }
    #ranks-scroll { height: 1fr; padding: 0 1; }
    #ranks { width: auto; height: auto; }
    #imbalance { height: auto; max-height: 10; padding: 0 1; }
    #status { height: 1; padding: 0 1; color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="job-header")
        with VerticalScroll(id="ranks-scroll"):
            yield RankTable(id="ranks")
        yield Static(id="imbalance")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self._lines: dict = {}  # overview_rows' cache
        self.set_interval(1.0 / self.app.refresh_hz, self.refresh_rows)
        self.refresh_rows()
        self.query_one(RankTable).focus()

    def refresh_rows(self) -> None:
        app = self.app
        if getattr(app, "paused", False):
            return
        job: JobState = app.job
        full = self.query_one("#ranks-scroll").size.width
        width = full - 2 if full > 2 else None  # its padding; None before the first layout
        keys, lines, imb = overview_rows(job, self._lines, width)
        self.query_one(RankTable).set_rows(keys, lines, columns_for(width))
        _update(self.query_one("#job-header", Static), job_header(job, app.job_source.describe))
        _update(self.query_one("#imbalance", Static), imbalance_text(job, imb))
        _update(self.query_one("#status", Static), Text(app.job_source.status))

    def on_rank_table_selected(self, event: RankTable.Selected) -> None:
        self.app.drill(event.key)


def _update(widget: Static, content: Text) -> None:
    """Static.update only when the content changed (an update re-renders the widget)."""
    if getattr(widget, "_vramtop_shown", None) != content:
        widget._vramtop_shown = content
        widget.update(content)


class _RankView:
    """What the dashboard underneath reads as its `source`: the drilled-into rank of the job."""

    choices: list = []

    def __init__(self, app: "JobApp"):
        self.app = app

    @property
    def describe(self) -> str:
        job = self.app.job
        key = self.app.current
        if key is None:
            return ""
        ws = job.world_size()
        return f"rank {job.rank(key)}" + (f" of {ws}" if ws else "") + f" · {self.app.job_source.describe} · Esc: all ranks"

    @property
    def status(self) -> str:
        return self.app.job_source.status

    @status.setter
    def status(self, value: str) -> None:
        self.app.job_source.status = value

    def poll(self) -> list:
        return []

    def close(self) -> None:
        self.app.job_source.close()


class JobApp(VramtopApp):
    TITLE = "vramtop job"
    BINDINGS = [Binding("escape", "overview", "All ranks")]

    def __init__(self, source, refresh_hz: float = 4.0, pump_hz: float = 10.0, job: JobState | None = None):
        self.job_source = source
        self.job = job or JobState()
        self.current: str | None = None
        super().__init__(_RankView(self), state=SessionState(), refresh_hz=refresh_hz, pump_hz=pump_hz)

    def on_mount(self) -> None:
        super().on_mount()
        self.install_screen(OverviewScreen(), name="overview")
        self.push_screen("overview")

    @property
    def on_overview(self) -> bool:
        return isinstance(self.screen, OverviewScreen)

    def _pump(self) -> None:
        try:
            msgs = self.job_source.poll()
        except Exception as exc:  # a source bug must not kill the view
            self.job_source.status = f"error reading the streams: {exc}"
            return
        for key, msg in msgs:
            self.job.apply(key, msg)
        for key, m in self.job_source.members.items():
            if key not in self.job.infos:
                self.job.add(key, m.info)  # rank, node, world size from the listing, before the first hello
        for key in self.job_source.gone:
            st = self.job.members.get(key)
            if st is not None and st.hello is not None:
                st.process_gone = True
        if self.current is not None and self.current in self.job.members:
            self.state = self.job.members[self.current]

    def _refresh_view(self) -> None:
        if self.screen is self.screen_stack[0]:  # the dashboard's widgets live on the default screen
            super()._refresh_view()

    def drill(self, key: str) -> None:
        if key not in self.job.members:
            return
        self.current = key
        self.state = self.job.members[key]
        if self.on_overview:
            self.pop_screen()
        self.call_after_refresh(self._refresh_view)

    def action_overview(self) -> None:
        if not self.on_overview:
            self.push_screen("overview")

    def action_pick_agent(self) -> None:
        self.action_overview()
