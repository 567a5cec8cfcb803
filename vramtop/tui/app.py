"""The Textual dashboard: a thin view over SessionState.

Two timers: `_pump` drains the source into the state (10 Hz), `_refresh_view`
re-renders the panels from it (4 Hz). All formatting is in render.py. The
agent never learns whether a viewer exists, so quitting (or crashing) here
changes nothing in the training job.
"""

from __future__ import annotations

import os
import time

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from vramtop.alerts import AlertMonitor
from vramtop.state import SessionState
from vramtop.tui import alerts_view, render
from vramtop.tui.gap_view import GapModel, WhatIfScreen, render_gap


class AgentPicker(ModalScreen[dict | None]):
    """Shown when several agents run on this machine."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    DEFAULT_CSS = """
    AgentPicker { align: center middle; }
    AgentPicker > Vertical { width: 90%; height: auto; max-height: 80%; border: round $accent; padding: 0 1; }
    """

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
        self.dismiss(self.agents[int(event.option.id)])

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class VramtopApp(App):
    TITLE = "vramtop"
    CSS = """
    Screen { layout: vertical; }
    #header { height: 3; padding: 0 1; background: $boost; }
    #alerts { height: auto; padding: 0 1; }
    #stack { height: auto; padding: 0 1; margin-top: 1; }
    #middle { height: 1fr; }
    #left { width: 3fr; }
    #timeline { height: 14; padding: 0 1; }
    #gap { height: auto; padding: 0 1; }
    #side { width: 2fr; }
    #frag { height: auto; padding: 0 1; }
    #phases { height: auto; padding: 0 1; }
    #status { height: 1; padding: 0 1; color: $text-muted; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("space", "toggle_pause", "Pause view"),
        Binding("s", "save_svg", "Save SVG"),
        Binding("a", "pick_agent", "Agents"),
        Binding("w", "what_if", "What-if"),
    ]

    def __init__(self, source, state: SessionState | None = None, refresh_hz: float = 4.0, pump_hz: float = 10.0,
                 alerts: AlertMonitor | None = None):
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

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield Static(id="alerts")
        yield Static(id="stack")
        with Horizontal(id="middle"):
            with VerticalScroll(id="left"):
                yield Static(id="timeline")
                yield Static(id="gap")
            with VerticalScroll(id="side"):
                yield Static(id="frag")
                yield Static(id="phases")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1.0 / self.pump_hz, self._pump)
        self.set_interval(1.0 / self.refresh_hz, self._refresh_view)
        self._pump()
        self._refresh_view()

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
        rejected, reason = getattr(self.source, "rejected", (0, None))
        if rejected > self.state.rejected_frames:
            self.state.rejected_frames, self.state.last_rejection = rejected, reason
        gone = getattr(self.source, "process_gone", None)
        # Asked even before the first hello: in discovery mode it is what detaches from a job that died
        # early and looks for its next incarnation.
        if gone is not None and gone():
            self.state.process_gone = True
        choices = getattr(self.source, "choices", None)
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
        if self.paused:
            return
        st = self.state
        self._panel("#header", render.header, st, getattr(self.source, "describe", ""))
        self._panel("#alerts", alerts_view.render, st, self.alerts)
        self.query_one("#alerts", Static).display = alerts_view.has_content(st, self.alerts)  # no blank line
        width = self.query_one("#stack", Static).size.width or self.size.width
        idle = getattr(self.source, "idle_view", None) if st.sample is None else None  # NodeSource: the GPUs (NVML)
        if idle:
            self._panel("#stack", idle)
        else:
            self._panel("#stack", render.stack, st, max(width - 2, 20))
        tl = self.query_one("#timeline", Static)
        self._panel("#timeline", render.timeline, st, max(tl.size.width - 2, 20), max(tl.size.height - 4, 4))
        side = self.query_one("#side")
        self._panel("#frag", render.fragmentation, st, max(side.size.width - 12, 10))
        self._panel("#phases", render.phases, st)
        self._panel("#gap", render_gap, st, self.gap_model)
        status = getattr(self.source, "status", "")
        if st.last_rejection:
            status += f"  | last rejected frame: {st.last_rejection}"
        if self.paused:
            status = "[paused] " + status
        # Text, not markup: the status quotes rejected frames, i.e. whatever a peer sent.
        self.query_one("#status", Static).update(Text(str(status)))

    def _panel(self, widget_id: str, fn, *args) -> None:
        """Render one panel. A renderer that fails on odd data (the stream is outside input) says so
        in its panel instead of ending the dashboard."""
        try:
            content = fn(*args)
        except Exception as exc:  # noqa: BLE001
            content = Text(f"{widget_id[1:]}: cannot show this data ({type(exc).__name__}: {exc})"[:300], style="red")
        self.query_one(widget_id, Static).update(content)

    # ------------------------------------------------------------------ actions

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self.query_one("#status", Static).update(Text("[paused]" if self.paused else ""))

    def action_save_svg(self) -> None:
        name = f"vramtop-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        self.last_screenshot = self.save_screenshot(filename=name, path=os.getcwd())
        self.notify(f"saved {self.last_screenshot}")

    def action_what_if(self) -> None:
        if (self.state.hello or {}).get("estimate"):
            self.push_screen(WhatIfScreen(self.state))
        else:
            self.notify("no estimate from the agent yet")

    def action_pick_agent(self) -> None:
        from vramtop_agent import discovery

        agents = getattr(self.source, "list_agents", discovery.list_agents)()  # RemoteSource lists its host
        if agents and not self._picker_open:
            self._picker_open = True
            self.push_screen(AgentPicker(agents), self._picked)

    def on_unmount(self) -> None:
        try:
            self.source.close()
        except Exception:
            pass
