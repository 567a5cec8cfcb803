"""The whole job on one screen: one compact stack row per rank, imbalance highlighted, drill-down.

JobApp is the single-process dashboard (VramtopApp) with a job overview
screen pushed on top of it:
- the overview (OverviewScreen) lists every rank: a compact stack bar (the
  breakdown at the rank's last step peak, all bars on one scale so a heavier
  rank is a longer bar), then per block the most it held during the rank's
  last step (see vramtop.job_state), the step peak, the allocated level now,
  step, step time and connection state. Per block, the largest and smallest
  rank are coloured when they differ by 10% or more (and 1 MiB); the panel
  below says by how much;
- Enter (or a click on the highlighted row) drills into that rank: the
  overview is popped and the dashboard underneath shows the rank's own
  SessionState, live; Escape brings the overview back.
The rendering functions here are pure (JobState in, Rich out), like render.py.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from vramtop.job_state import JobState
from vramtop.state import SessionState
from vramtop.tui import render
from vramtop.tui.app import VramtopApp
from vramtop_agent.schema import BLOCK_KEYS

BAR_WIDTH = 24
HI_STYLE = "bold white on #a1262b"  # the largest rank of an imbalanced block
LO_STYLE = "bold black on #76b7b2"  # the smallest
# (key, label, width): fixed widths, since cells are updated in place as numbers grow.
COLUMNS = (("rank", "rank", 6), ("node", "node", 14), ("pid", "pid", 8), ("stack", "stack at step peak", BAR_WIDTH),
           ("parameters", "params", 9), ("gradients", "grads", 9), ("optimizer", "optim", 9),
           ("activations", "activ", 9), ("other", "other", 9), ("peak", "step peak", 9), ("now", "now", 9),
           ("step", "step", 7), ("step_time", "step time", 9), ("state", "state", 7))
_SHORT = {"parameters": "params", "gradients": "grads", "optimizer": "optim", "activations": "activ",
          "other": "other", "peak": "step peak", "step_time": "step time"}


# --------------------------------------------------------------------- pure rendering


def rank_cells(job: JobState, key: str, imb: dict, scale: int, width: int = BAR_WIDTH) -> dict[str, Text]:
    """The overview's cells for one rank (column key -> Text)."""
    v = job.values(key)
    cells: dict[str, Text] = {}
    ws = job.world_size()
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
    cells["now"] = Text(render.fmt_bytes(v.get("now")), style="dim")
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


def bar_scale(job: JobState, keys: list[str] | None = None) -> int:
    """One scale for every rank's bar: the largest sum of blocks."""
    best = 0
    for k in keys if keys is not None else job.keys():
        v = job.values(k)
        best = max(best, sum(int(v["peak_blocks"].get(b) or 0) for b in BLOCK_KEYS))
    return best


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
            line = f"{_SHORT[metric]:>9}  {hi} on every rank"
        else:
            line = (f"{_SHORT[metric]:>9}  max {hi} (rank {job.rank(i.max_key)}) vs min {lo} "
                    f"(rank {job.rank(i.min_key)}): {spread}, {100 * i.ratio:.0f}% of max")
        if i.flagged:
            t.append("▲ " + line + "\n", style="bold red")
        else:
            t.append("  " + line + "\n", style="dim")
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
    t.append(f"  live {job.live_count()}/{n}", style="green" if job.live_count() == n and n else "yellow")
    lo, hi = job.steps()
    if lo is not None:
        t.append("  step ", style="dim")
        t.append(f"{lo}" if lo == hi else f"{lo}..{hi}", style="bold" if lo == hi else "bold yellow")
    if where:
        t.append(f"  {where}", style="dim")
    t.append("\nEnter: drill into a rank   Esc (in a rank): back to all ranks", style="dim")
    return t


# --------------------------------------------------------------------- screens


class OverviewScreen(Screen):
    CSS = """
    OverviewScreen { layout: vertical; }
    #job-header { height: 2; padding: 0 1; background: $boost; }
    #ranks { height: 1fr; }
    #imbalance { height: auto; max-height: 10; padding: 0 1; }
    #status { height: 1; padding: 0 1; color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="job-header")
        table = DataTable(id="ranks", cursor_type="row", zebra_stripes=True)
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        yield Static(id="imbalance")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self._order: list[str] = []
        self.set_interval(1.0 / self.app.refresh_hz, self.refresh_rows)
        self.refresh_rows()
        self.query_one(DataTable).focus()

    def refresh_rows(self) -> None:
        app = self.app
        if getattr(app, "paused", False):
            return
        job: JobState = app.job
        table = self.query_one(DataTable)
        keys = job.keys()
        imb = job.imbalance(keys=keys)
        scale = bar_scale(job, keys)
        if keys != self._order:
            current = self._cursor_key(table)
            table.clear()
            for k in keys:
                c = rank_cells(job, k, imb, scale)
                table.add_row(*[c[col] for col, _, _ in COLUMNS], key=k)
            self._order = keys
            if current in keys:
                table.move_cursor(row=keys.index(current))
        else:
            for k in keys:
                c = rank_cells(job, k, imb, scale)
                for col, _, _ in COLUMNS:
                    table.update_cell(k, col, c[col])
        self.query_one("#job-header", Static).update(job_header(job, app.job_source.describe))
        self.query_one("#imbalance", Static).update(imbalance_text(job, imb))
        self.query_one("#status", Static).update(app.job_source.status)

    @staticmethod
    def _cursor_key(table: DataTable) -> str | None:
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:
            return None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.app.drill(event.row_key.value)


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
