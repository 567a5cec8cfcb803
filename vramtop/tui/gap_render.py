"""The estimate beside the measurement and the advice, rendered: SessionState in, Rich out.

A thin view over vramtop.gap: the rows come from `gap.gap_rows`, the advice
from `gap.advice` (memoized in GapModel: it re-runs the estimator for each
option), the what-if's prediction from `gap.what_if` (the dialog itself is
vramtop.tui.gap_view). Pure, like render.py: no app, no terminal.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from vramtop.state import SessionState
from vramtop.tui.render import pack, text_field
from vramtop_agent.vocabulary import BLOCK_KEYS, COLOURS, LABELS, fmt_bytes


class GapModel:
    """Caches the advice so a 4 Hz refresh does not re-run the estimator."""

    def __init__(self) -> None:
        self._key: tuple[object, str, int] | None = None  # what the cached advice was computed from
        self._advice: list = []

    def rows(self, state: SessionState) -> list:
        from vramtop import gap

        est = (state.hello or {}).get("estimate")
        if not est or state.sample is None:
            return []
        last = state.last_step()
        s = state.sample
        return gap.gap_rows(est, s["blocks"], eof_blocks=(last or {}).get("eof_blocks"), step=last,
                            cuda=s.get("cuda"), nvml=s.get("nvml"), batch=s.get("batch"))

    def advice(self, state: SessionState) -> list:
        from vramtop import gap

        est = (state.hello or {}).get("estimate")
        if not est:
            return []
        # The agent re-sends its hello (and so a new estimate object) every second: key on what the
        # estimate says, not on its identity, and re-calibrate every 20 steps.
        key = (est.get("peak"), repr(est.get("setup")), len(state.steps) // 20)
        if key != self._key:
            self._key = key
            try:
                self._advice = gap.advice(est, steps=list(state.steps)[-50:], card_bytes=state.device_total())
            except Exception as exc:  # an estimate the estimator cannot re-run: say so, don't crash
                self._advice = [{"action": f"(advice unavailable: {exc})", "saving": 0, "cost": ""}]
        return self._advice


MIN_SAVING = 1024 ** 2  # advice that saves less than this (or 1% of the peak) is noise, not advice
MIN_SAVING_FRACTION = 0.01


def worth_trying(advice: list, peak: int | None) -> list:
    """The advice items whose saving is meaningful on this run (not "8-bit AdamW: -64 B")."""
    floor = max(MIN_SAVING, MIN_SAVING_FRACTION * (peak or 0))
    return [a for a in advice if (a.get("saving") or 0) >= floor]


def _hanging(first: str, body: Text) -> Table:
    """`first` then `body`, wrapped lines indented under the body rather than under `first`."""
    grid = Table.grid(padding=0, expand=True)
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1)
    grid.add_row(first, body)
    return grid


def render_gap(state: SessionState, model: GapModel) -> Group | Text:
    est = (state.hello or {}).get("estimate")
    rows = model.rows(state)
    if not rows:
        model_info = (state.hello or {}).get("model") or {}
        if state.hello is not None and not est and model_info and len(state.steps) >= 2:
            # The agent estimates at the first forward: after two steps without one, none is coming.
            return Text(f"Estimate vs actual: no estimate for this model ({text_field(model_info.get('class'), 60)}: "
                        "the estimator describes transformer language models)", style="dim")
        return Text("Estimate vs actual: waiting for the agent's estimate (needs a model it can describe)",
                    style="dim")
    table = Table(title="Estimate vs actual", title_style="bold", box=None, expand=True, padding=(0, 1))
    table.add_column("block")
    table.add_column("estimate", justify="right")
    table.add_column("actual", justify="right")
    table.add_column("difference", justify="right")
    causes = []
    for r in rows:
        style = "bold yellow" if r.cause else ""
        table.add_row(r.block, fmt_bytes(r.estimate), fmt_bytes(r.actual),
                      Text(("+" if r.difference > 0 else "") + fmt_bytes(r.difference), style=style))
        if r.cause:
            causes.append(r.cause)
    parts: list = [table]
    if not state.on_cuda and any(r.block == "gradients" and r.difference for r in rows):
        causes.append("gradients: the live value, mid-step. On CPU the step's peak is taken at the phase edges, "
                      "where this run's gradients are already freed (zero_grad) or not yet all computed")
    for c in causes[:4]:
        parts.append(_hanging("• ", Text(c, style="yellow")))
    advice = worth_trying(model.advice(state), (state.last_step() or {}).get("peak"))
    where = "the card" if state.on_cuda else "host RAM"
    if advice:
        parts.append(Text("What to try (in this order; saving on this run):", style="bold"))
        for item in advice[:5]:
            t = Text(f"{item['action']}: ")
            t.append(f"-{fmt_bytes(item['saving'])}", style="green")
            if item.get("fits") is not None:
                t.append(f" fits {where}" if item["fits"] else f" still too big for {where}",
                         style="green" if item["fits"] else "red")
            t.append(f"  ({item['cost']})", style="dim")
            parts.append(_hanging("  ", t))
    parts.append(Text("w: what-if", style="dim"))
    return Group(*parts)


def prediction_text(out: dict, on_cuda: bool = True, width: int = 74) -> Text:
    """The what-if's predicted peak and the blocks it is made of (activations calibrated on the run)."""
    blocks = dict((out.get("estimate") or {}).get("blocks") or {})
    blocks["activations"] = out.get("predicted_activations", blocks.get("activations"))
    t = Text()
    t.append(f"predicted peak {fmt_bytes(out['predicted_peak'])}", style="bold")
    if "fits" in out:
        where = "the card" if on_cuda else "host RAM"
        t.append(f"  fits {where}" if out["fits"] else f"  does NOT fit {where}",
                 style="bold green" if out["fits"] else "bold red")
        t.append(f" (headroom {fmt_bytes(out['headroom'])})", style="dim")
    items = []
    for key in BLOCK_KEYS:
        if key in blocks:
            item = Text("■ ", style=COLOURS[key])
            item.append(f"{LABELS[key]} {fmt_bytes(blocks[key])}", style="default")
            items.append(item)
    return Text("\n").join([t, *pack(items, width)])
