"""The whole job on one screen: one compact stack row per rank, imbalance highlighted, drill-down.

JobApp is the single-process dashboard (VramtopApp) with a job overview
screen pushed on top of it:
- the overview (OverviewScreen) lists every rank, one line each, and the
  imbalance across them (what the lines and panels say: vramtop.tui.job_render);
- Enter (or a click on a rank's line) drills into that rank: the
  overview is popped and the dashboard underneath shows the rank's own
  SessionState, live; Escape brings the overview back.
This module is the widgets only; everything they show is rendered by job_render.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.geometry import Region
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Static

from vramtop.job_state import JobState
from vramtop.source import KeyedSource, Source
from vramtop.state import SessionState
from vramtop.tui.app import VramtopApp
from vramtop.tui.job_render import COLUMNS, columns_for, header_line, imbalance_text, job_header, overview_rows


class RankTable(Static, can_focus=True):
    """The ranks, one line each, with a cursor: Enter or a click drills into the rank.

    One Text for the whole table (not a DataTable of cells): with 64 ranks
    refreshed 4 times a second, per-cell rendering cost more than everything
    else in the viewer; and it is re-rendered only when a line changed. The
    columns it shows are those that fit its own width (job_render.columns_for).
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
    # Styled in vramtop.tcss: the line under the cursor, and every other line (easier to follow across).
    COMPONENT_CLASSES = {"rank-table--cursor", "rank-table--stripe"}

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
        self._line_cache: dict = {}  # overview_rows' cache: a rank's line is rebuilt only when it changed

    @property
    def cursor_key(self) -> str | None:
        return self.keys[self.cursor] if 0 <= self.cursor < len(self.keys) else None

    def show(self, job: JobState) -> dict:
        """Draw the job's ranks in the columns that fit this widget; returns the imbalance (for its panel)."""
        width = self.content_size.width or None  # None before the first layout: every column
        keys, lines, imb = overview_rows(job, self._line_cache, width)
        self.set_rows(keys, lines, columns_for(width))
        return imb

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
        cursor = self.get_component_rich_style("rank-table--cursor", partial=True)
        stripe = self.get_component_rich_style("rank-table--stripe", partial=True)
        rows = []
        for i, ln in enumerate(self.lines):
            if i == self.cursor and self.has_focus:
                ln = ln.copy()
                ln.stylize(cursor)
            elif i % 2:
                ln = ln.copy()
                ln.stylize(stripe)
            rows.append(ln)
        if rows:
            text = Text("\n", no_wrap=True).join([header_line(self.columns), *rows])
        else:
            text = Text("waiting for the ranks…", style="dim")
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
        """Scroll the container the table sits in so that line `y` (0: the header) is on screen."""
        if isinstance(self.parent, Widget):
            self.parent.scroll_to_region(Region(0, y, 1, 1), animate=False)

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


class QuietStatic(Static):
    """A Static that re-renders only when what it shows changed (an update re-renders the widget)."""

    def __init__(self, **kwargs):
        super().__init__("", **kwargs)
        self._shown: Text | None = None

    def show(self, content: Text) -> None:
        if content != self._shown:
            self._shown = content
            self.update(content)


class OverviewScreen(Screen):
    """Every rank of the job, the imbalance across them and the sources' status (styles: vramtop.tcss)."""

    app: JobApp

    def compose(self) -> ComposeResult:
        yield QuietStatic(id="job-header")
        with VerticalScroll(id="ranks-scroll"):
            yield RankTable(id="ranks")
        yield QuietStatic(id="imbalance")
        yield QuietStatic(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1.0 / self.app.refresh_hz, self.refresh_rows)
        self.refresh_rows()
        self.query_one(RankTable).focus()

    def refresh_rows(self) -> None:
        app = self.app
        if app.paused:
            return
        job = app.job
        imb = self.query_one(RankTable).show(job)
        self.query_one("#job-header", QuietStatic).show(job_header(job, app.job_source.describe))
        self.query_one("#imbalance", QuietStatic).show(imbalance_text(job, imb))
        self.query_one("#status", QuietStatic).show(Text(app.job_source.status))

    def on_rank_table_selected(self, event: RankTable.Selected) -> None:
        self.app.drill(event.key)


class RankView(Source):
    """What the dashboard underneath reads as its `source`: the drilled-into rank of the job.

    It has no stream of its own: JobApp pumps the job source and swaps the rank's
    SessionState into the dashboard; the header and footer come from here.
    """

    def __init__(self, app: JobApp):
        self.app = app

    @property
    def describe(self) -> str:
        job = self.app.job
        key = self.app.current
        if key is None:
            return ""
        ws = job.world_size()
        of = f" of {ws}" if ws else ""
        return f"rank {job.rank(key)}{of} · {self.app.job_source.describe} · Esc: all ranks"

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

    def __init__(self, source: KeyedSource, refresh_hz: float = 4.0, pump_hz: float = 10.0,
                 job: JobState | None = None):
        self.job_source = source
        self.job = job or JobState()
        self.current: str | None = None
        super().__init__(RankView(self), state=SessionState(), refresh_hz=refresh_hz, pump_hz=pump_hz)

    def on_mount(self) -> None:
        # No super().on_mount(): Textual calls VramtopApp.on_mount itself after this one (it dispatches
        # a message to every class of the MRO that handles it), and calling it here too would start
        # its pump and refresh timers twice.
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
        if self.screen_stack and self.screen is self.screen_stack[0]:  # the dashboard's widgets: default screen
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
