"""The what-if dialog: change batch, seq len, LoRA rank, method or checkpointing; see the predicted peak.

The widgets only: the prediction is `gap.what_if`, calibrated on the measured
steps, and its text is gap_render.prediction_text. Styles: vramtop.tcss.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Select, Static, Switch

from vramtop.state import SessionState
from vramtop.tui.gap_render import prediction_text


class WhatIfScreen(ModalScreen[None]):
    """Change batch, seq len, LoRA rank, method or checkpointing; see the predicted peak."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Close"),
                Binding("tab", "app.focus_next", "Next field")]

    def __init__(self, state: SessionState):
        super().__init__()
        self.state = state
        self.est = (state.hello or {}).get("estimate") or {}
        self.setup = self.est.get("setup") or {}

    def compose(self) -> ComposeResult:
        s = self.setup
        with Vertical():
            yield Static("[b]What if…[/b] (predictions calibrated on the measured steps)")
            for key, label, value in (("batch", "micro-batch", s.get("batch", 1)),
                                      ("seq_len", "seq len", s.get("seq_len", 512)),
                                      ("lora_rank", "LoRA rank", s.get("lora_rank") or 8)):
                with Horizontal():
                    yield Static(label, classes="label")
                    yield Input(str(value), id=f"wi-{key}", type="integer")
            with Horizontal():
                yield Static("method", classes="label")
                yield Select([(m, m) for m in ("full", "lora", "qlora")], value=s.get("method", "full"),
                             id="wi-method", allow_blank=False)
            with Horizontal():
                yield Static("grad ckpt", classes="label")
                yield Switch(bool(s.get("grad_ckpt")), id="wi-grad_ckpt")
                yield Static(_on_off(bool(s.get("grad_ckpt"))), id="wi-ckpt-state")
            yield Static(id="wi-result")
        yield Footer()

    def on_mount(self) -> None:
        self._predict()

    def on_input_changed(self, _event) -> None:
        self._predict()

    def on_select_changed(self, _event) -> None:
        self._predict()

    def on_switch_changed(self, event) -> None:
        self.query_one("#wi-ckpt-state", Static).update(_on_off(event.value))
        self._predict()

    def changes(self) -> dict:
        out: dict = {}
        for key in ("batch", "seq_len", "lora_rank"):
            raw = self.query_one(f"#wi-{key}", Input).value
            if raw.strip().isdigit() and int(raw) > 0:
                out[key] = int(raw)
        method = self.query_one("#wi-method", Select).value
        if isinstance(method, str):
            out["method"] = method
        out["grad_ckpt"] = self.query_one("#wi-grad_ckpt", Switch).value
        if out.get("method") == "full":
            out.pop("lora_rank", None)
        return {k: v for k, v in out.items() if self.setup.get(k) != v}

    def _predict(self) -> None:
        from vramtop import gap

        result = self.query_one("#wi-result", Static)
        if not self.est:
            result.update("no estimate from the agent yet")
            return
        try:
            out = gap.what_if(self.est, self.changes(), steps=list(self.state.steps)[-50:],
                              card_bytes=self.state.device_total())
        except Exception as exc:
            result.update(Text(f"cannot predict that: {exc}", style="red"))
            return
        self.prediction = out
        result.update(prediction_text(out, on_cuda=self.state.on_cuda))


def _on_off(value: bool) -> Text:
    return Text("on", style="bold green") if value else Text("off", style="bold")
