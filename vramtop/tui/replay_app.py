"""The dashboard over a recording: VramtopApp plus playback keys.

Everything shown is the live app's (same SessionState, same panels); this
subclass only adds the keys and starts a fresh SessionState whenever the
ReplaySource reports a seek (`take_reset()`).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import ScrollableContainer, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from vramtop.errors import UserError
from vramtop.replay import ReplaySource
from vramtop.state import SessionState
from vramtop.tui.app import VramtopApp
from vramtop.tui.header import HeaderContext


class GotoScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Go to[/b]  a step (120), a time from the start (+90s, 1:30, 2h), peak, oom")
            yield Input(placeholder="step or time", id="goto")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ReplayApp(VramtopApp):
    TITLE = "vramtop replay"
    BINDINGS = [
        Binding("space", "toggle_pause", "Play/pause"),
        Binding("plus,equals_sign", "faster", "Speed", key_display="+/-"),
        Binding("minus", "slower", "Slower", show=False),
        Binding("left", "skip(-10)", "-10s", show=False),
        Binding("right", "skip(10)", "+10s", show=False),
        Binding("left_square_bracket", "step(-1)", "Prev step", show=False),
        Binding("right_square_bracket", "step(1)", "Next step", show=False),
        Binding("p", "peak", "Peak"),
        Binding("o", "oom", "OOM"),
        Binding("g", "goto", "Go to"),
        Binding("home", "edge('start')", "Start", show=False),
        Binding("end", "edge('end')", "End", show=False),
    ]

    source: ReplaySource  # set by VramtopApp.__init__: here always a recording's

    def __init__(self, source: ReplaySource, refresh_hz: float = 4.0, pump_hz: float = 10.0):
        super().__init__(source, state=self._fresh_state(source), refresh_hz=refresh_hz, pump_hz=pump_hz)

    @staticmethod
    def _fresh_state(source: ReplaySource) -> SessionState:
        # The recording's event numbers have gaps that are no loss (see SessionState): drops come
        # only from the samples' own `dropped`, as the live view showed them.
        return SessionState(clock=source.now, count_event_gaps=False)

    def header_context(self) -> HeaderContext:
        return HeaderContext(source=self.source.describe, mode="replay", paused=not self.source.clock.playing)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "pick_agent":  # no live agents in a recording
            return False
        return super().check_action(action, parameters)

    def on_mount(self) -> None:
        # A focused scroll container's bindings (home/end/left/right) would swallow the playback keys;
        # the panels still scroll with the mouse.
        for widget in self.query(ScrollableContainer):
            widget.can_focus = False
        self.set_focus(None)

    def _pump(self) -> None:
        if self.source.take_reset():
            self.state = self._fresh_state(self.source)
        super()._pump()

    def _do(self, fn, *args) -> None:
        try:
            fn(*args)
        except UserError as exc:
            self.notify(str(exc), severity="warning")
            return
        self._pump()
        self._refresh_view()

    # ------------------------------------------------------------------ actions

    def action_toggle_pause(self) -> None:
        self.source.clock.toggle()
        self._refresh_view()

    def action_faster(self) -> None:
        self.source.clock.faster()
        self._refresh_view()

    def action_slower(self) -> None:
        self.source.clock.slower()
        self._refresh_view()

    def action_skip(self, seconds: float) -> None:
        self._do(self.source.skip, float(seconds))

    def action_step(self, delta: int) -> None:
        self._do(self.source.step_relative, int(delta))

    def action_peak(self) -> None:
        self._do(self.source.jump_peak)

    def action_oom(self) -> None:
        self._do(self.source.jump_oom)

    def action_edge(self, which: str) -> None:
        self._do(self.source.goto, which)

    def action_pick_agent(self) -> None:
        self.notify("replaying a recording: no live agents to pick", severity="information")

    def action_goto(self) -> None:
        def done(value: str | None) -> None:
            if value:
                self._do(self.source.goto, value)

        self.push_screen(GotoScreen(), done)
