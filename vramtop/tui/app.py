"""The Textual dashboard: a thin view over SessionState.

Two timers: `_pump` drains the source into the state (10 Hz), `_refresh_view`
re-renders the panels from it (4 Hz). All formatting is in render.py (the
header's fields in header.py); which widgets a terminal size shows is
layout.py: from 80×24 the header, the card's bar, the latest step's phase
peaks and one panel at a time (Tab, 1-4), from 120×36 every panel, below
60×20 a line that says so. Each panel (Panel) hands its renderer the width of
its own content region, and renderers cut their lines to it: Textual would
otherwise wrap them. Styles: vramtop.tcss. The source is a vramtop.source.Source.
The agent never learns whether a viewer exists, so quitting (or crashing) here
changes nothing in the training job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from vramtop.alerts import AlertMonitor
from vramtop.source import Source
from vramtop.state import SessionState
from vramtop.tui import alerts_view, layout, render
from vramtop.tui.gap_render import GapModel, render_gap
from vramtop.tui.gap_view import WhatIfScreen
from vramtop.tui.header import HeaderContext


class Panel(Static):
    """One part of the dashboard: what a renderer (render.py and friends) makes of the state.

    `draw` gives the renderer the width this panel has to fill: its own content
    region, whatever layout it sits in. A renderer that fails on odd data (the
    stream is outside input) says so in its panel instead of ending the dashboard.
    """

    def draw(self, fn, *args, **kwargs) -> None:
        # Before the first layout a panel has no size yet: the screen's width, less the padding.
        width = self.content_size.width or max(self.app.size.width - 2, 20)
        self.show(fn, *args, width=max(width, 20), **kwargs)

    def show(self, fn, *args, **kwargs) -> None:
        try:
            content = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            content = Text(f"{self.id}: cannot show this data ({type(exc).__name__}: {exc})"[:300], style="red")
        self.update(content)


class AgentPicker(ModalScreen[dict | None]):
    """Shown when several agents run on this machine."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, agents: list[dict]):
        super().__init__()
        self.agents = agents

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Several vramtop agents are running: pick one[/b]")
            options = []
            for i, a in enumerate(self.agents):
                cmd = " ".join(a.get("cmdline") or [])[:70]
                # Text, not markup: a command line may hold "[" (and discovery files are outside data).
                options.append(Option(Text(f"pid {a['pid']}  rank {a.get('rank', 0)}  {cmd}"), id=str(i)))
            yield OptionList(*options)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.agents[event.option_index])  # the options are the agents, in order

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class VramtopApp(App):
    TITLE = "vramtop"
    ENABLE_COMMAND_PALETTE = False  # its footer entry would crowd out the dashboard's own keys at 80 columns
    # Every screen's and dialog's styles. A path from here: Textual would resolve a bare name beside the
    # file of whichever subclass runs (a test's or bench's own app).
    CSS_PATH = Path(__file__).with_name("vramtop.tcss")
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("space", "toggle_pause", "Pause view"),
        Binding("tab", "cycle_panel(1)", "Panel", priority=True),
        Binding("shift+tab", "cycle_panel(-1)", "Previous panel", show=False, priority=True),
        *[Binding(str(i), f"show_panel('{p.id}')", p.title, show=False) for i, p in enumerate(layout.PANELS, 1)],
        Binding("up", "scroll_panels(-1)", "Scroll", show=False),
        Binding("down", "scroll_panels(1)", "Scroll", show=False),
        Binding("pageup", "scroll_panels(-10)", "Scroll", show=False),
        Binding("pagedown", "scroll_panels(10)", "Scroll", show=False),
        Binding("s", "save_svg", "Save SVG"),
        Binding("a", "pick_agent", "Agents"),
        Binding("w", "what_if", "What-if"),
    ]
    SCREENSHOT_DIR = "vramtop-screenshots"  # under the working directory, or $VRAMTOP_SCREENSHOTS

    def __init__(self, source: Source, state: SessionState | None = None, refresh_hz: float = 4.0,
                 pump_hz: float = 10.0, alerts: AlertMonitor | None = None):
        super().__init__()
        self.alerts = alerts or AlertMonitor()  # the banner; --on-alert runs its command
        self.source = source
        self.state = state or SessionState()
        self.refresh_hz = refresh_hz
        self.pump_hz = pump_hz
        self.paused = False
        self._picker_open = False
        self.last_screenshot: str | None = None
        self.gap_model = GapModel()
        self.mode = "compact"
        self.panel = layout.PANELS[0].id  # the panel shown in the compact layout

    def compose(self) -> ComposeResult:
        yield Panel(id="header")
        yield Panel(id="alerts")
        yield Panel(id="stack")
        yield Panel(id="now")
        yield Panel(id="tabs")
        with Horizontal(id="middle"):
            with VerticalScroll(id="left"):
                for p in layout.PANELS:
                    if p.column == "left":
                        yield Panel(id=p.id)
            with VerticalScroll(id="side"):
                for p in layout.PANELS:
                    if p.column == "side":
                        yield Panel(id=p.id)
        yield Static(id="toosmall")
        yield Static(id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.set_interval(1.0 / self.pump_hz, self._pump)
        self.set_interval(1.0 / self.refresh_hz, self._refresh_view)
        self._apply_layout()
        self._pump()
        self._refresh_view()

    def on_resize(self, _event) -> None:
        if not self.screen_stack or not self.screen_stack[0].query("#header"):
            return  # not composed yet (or already torn down)
        self._apply_layout()
        self.call_after_refresh(self._refresh_view)

    # ------------------------------------------------------------------ layout

    def _widget(self, selector: str, kind=None):
        """A widget of the dashboard itself (the default screen), whatever dialog is on top."""
        base = self.screen_stack[0]
        return base.query_one(selector, kind) if kind else base.query_one(selector)

    def _apply_layout(self) -> None:
        """Show the widgets of the layout for this terminal size (vramtop.tui.layout)."""
        width, height = self.size
        self.mode = layout.mode_for(width, height)
        small, wide = self.mode == "too_small", self.mode == "wide"
        for wid in ("#header", "#stack", "#now", "#middle", "#status"):
            self._widget(wid).display = not small
        self._widget("#toosmall").display = small
        self._widget("#tabs").display = self.mode == "compact"
        for p in layout.PANELS:
            self._widget(f"#{p.id}").display = wide or p.id == self.panel
        shown = {p.column for p in layout.PANELS if wide or p.id == self.panel}
        self._widget("#left").display = not small and "left" in shown
        self._widget("#side").display = not small and "side" in shown
        # Compact: the one panel gets the whole middle; the timeline fills it.
        self._widget("#timeline").styles.height = 14 if wide else "1fr"
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Keys that do nothing in this layout are not offered (and not shown in the footer)."""
        if action == "cycle_panel":  # in a dialog, Tab is the dialog's (next field)
            return self.mode == "compact" and self.screen is self.screen_stack[0]
        return True

    def header_context(self) -> HeaderContext:
        return HeaderContext(source=self.source.describe, mode="live", paused=self.paused)

    # ------------------------------------------------------------------ data

    def _pump(self) -> None:
        try:
            msgs = self.source.poll()
        except Exception as exc:  # a source bug must not kill the view
            self.source.status = f"error reading the stream: {exc}"
            return
        for msg in msgs:
            try:
                self.state.apply(msg)
            except Exception as exc:  # noqa: BLE001 - a validated frame the model still cannot fold: count it
                self.state.reject(f"{msg.get('type')} frame not applied: {type(exc).__name__}: {exc}"[:200])
        if msgs:
            try:
                self.alerts.update(self.state)
            except Exception as exc:  # noqa: BLE001 - an alert bug must not stop the dashboard
                self.alerts.failures.append(f"alerts: {type(exc).__name__}: {exc}"[:200])
        rejected, reason = self.source.rejected
        if rejected > self.state.rejected_frames:
            self.state.rejected_frames, self.state.last_rejection = rejected, reason
        # Asked even before the first hello: in discovery mode it is what detaches from a job that died
        # early and looks for its next incarnation.
        if self.source.process_gone():
            self.state.process_gone = True
        choices = self.source.choices
        if choices and not self._picker_open:
            self._picker_open = True
            self.push_screen(AgentPicker(list(choices)), self._picked)

    def _picked(self, info: dict | None) -> None:
        self._picker_open = False
        if info is not None:
            self.state = SessionState()
            self.source.choose(info)
        else:
            self.source.choices = []

    # ------------------------------------------------------------------ view

    def _refresh_view(self) -> None:
        if self.paused or not self.screen_stack or not self.screen_stack[0].query("#header"):
            return  # not composed yet, or torn down while a timer was due
        if layout.mode_for(*self.size) != self.mode:  # a resize the resize event saw too early
            self._apply_layout()
        if self.mode == "too_small":
            self._widget("#toosmall", Static).update(layout.too_small(*self.size))
            return
        st = self.state
        wide = self.mode == "wide"
        self._render_header()
        self._widget("#alerts", Panel).show(alerts_view.render, st, self.alerts)
        self._widget("#alerts").display = alerts_view.has_content(st, self.alerts)  # no blank line
        self._widget("#stack", Panel).draw(self._stack, st, compact=not wide)
        self._widget("#now", Panel).draw(render.now_lines, st)
        if not wide:
            self._widget("#tabs", Panel).draw(layout.tab_line, self.panel)
        timeline = self._widget("#timeline", Panel)
        if timeline.display:  # its chart: its own height less the title, phase marks, axis and a spare line
            timeline.draw(render.timeline, st, height=max(timeline.content_size.height - 4, 4))
        self._widget("#frag", Panel).draw(render.fragmentation, st)
        # The phase table's rows: as many as the middle has (in the compact layout it is the only panel there).
        rows = 8 if wide else max(self._widget("#middle").size.height - 3, 2)
        self._widget("#phases", Panel).draw(render.phases, st, rows)
        self._widget("#gap", Panel).show(render_gap, st, self.gap_model)
        status = self.source.status
        if st.last_rejection:
            status += f"  | last rejected frame: {st.last_rejection}"
        # Text, not markup: the status quotes rejected frames, i.e. whatever a peer sent.
        self._widget("#status", Static).update(Text(str(status), no_wrap=True, overflow="ellipsis"))

    def _stack(self, st: SessionState, *, width: int, compact: bool):
        """The memory bar; before a first sample, what the source shows instead (NodeSource: the GPUs)."""
        idle = self.source.idle_view() if st.sample is None else None
        return idle if idle is not None else render.stack(st, width, compact)

    def _render_header(self) -> None:
        self._widget("#header", Panel).draw(render.header, self.state, "", ctx=self.header_context())

    # ------------------------------------------------------------------ actions

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self._render_header()  # the frozen view says it is frozen
        if not self.paused:
            self._refresh_view()

    def action_cycle_panel(self, delta: int) -> None:
        if self.screen is not self.screen_stack[0]:  # a dialog: Tab moves between its fields
            self.screen.focus_next() if delta > 0 else self.screen.focus_previous()
            return
        self.action_show_panel(layout.next_panel(self.panel, delta))

    def action_show_panel(self, panel_id: str) -> None:
        self.panel = panel_id
        self._apply_layout()
        was, self.paused = self.paused, False  # a paused view still switches panels
        self._refresh_view()
        self.paused = was

    def action_scroll_panels(self, lines: int) -> None:
        """The panels that overflow (the estimate's advice at 80×24) scroll with the arrow keys."""
        for column in ("#left", "#side"):
            box = self._widget(column)
            if box.display:
                box.scroll_relative(y=lines, animate=False)

    def screenshot_dir(self) -> str:
        return os.environ.get("VRAMTOP_SCREENSHOTS") or os.path.join(os.getcwd(), self.SCREENSHOT_DIR)

    def action_save_svg(self) -> None:
        folder = self.screenshot_dir()
        try:
            os.makedirs(folder, exist_ok=True)
            name = f"vramtop-{time.strftime('%Y%m%d-%H%M%S')}.svg"
            self.last_screenshot = self.save_screenshot(filename=name, path=folder)
        except OSError as exc:
            self.notify(f"cannot save the screenshot in {folder}: {exc.strerror or exc}", severity="error")
            return
        self.notify(f"saved {self.last_screenshot}")

    def action_what_if(self) -> None:
        if (self.state.hello or {}).get("estimate"):
            self.push_screen(WhatIfScreen(self.state))
        else:
            self.notify("no estimate from the agent yet")

    def action_pick_agent(self) -> None:
        agents = self.source.list_agents()  # this machine's, or the host's for a RemoteSource
        if agents and not self._picker_open:
            self._picker_open = True
            self.push_screen(AgentPicker(agents), self._picked)

    def on_unmount(self) -> None:
        try:
            self.source.close()
        except Exception:
            pass
