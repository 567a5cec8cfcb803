"""What the framework callbacks share: starting (or reusing) the agent, driving phases, log metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vramtop_agent.schema import BLOCK_KEYS, PHASES

if TYPE_CHECKING:
    from vramtop_agent.agent import Agent

MIB = float(1 << 20)
PREFIX = "vramtop/"


def start_agent(model, optimizer=None, **options) -> tuple[Agent, bool]:
    """An agent watching `model`: the zero-code one if VRAMTOP=1 already started it here, else a new one.

    Returns (agent, created): `created` tells whether the caller owns it (and stops it).
    """
    from vramtop_agent import _autostart

    agent = _autostart.current_agent()
    if agent is not None:
        if agent.model is not model and model is not None:
            agent.attach_model(model)
        if optimizer is not None and agent.optimizer is not optimizer:
            agent.attach_optimizer(optimizer)
        return agent, False
    import vramtop_agent

    return vramtop_agent.watch(model, optimizer, **options), True


def attach_optimizer(agent, optimizer) -> None:
    from vramtop_agent.introspect import unwrap_optimizer

    if optimizer is None:
        return
    core = unwrap_optimizer(optimizer)
    if agent.optimizer is not core:
        agent.attach_optimizer(core)


def plain(value: Any) -> Any:
    """A value msgpack and every logger can carry (enums, dtypes and the like become strings)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    inner = getattr(value, "value", None)  # enums (OptimizerNames, FSDPOption, ...)
    if type(inner) in (bool, int, float, str):
        return inner
    for cast in (bool, int, float, str):  # other subclasses of the plain types
        if isinstance(value, cast):
            return cast(value)
    return str(value)


class StepWindow:
    """Phase peaks over the steps completed since the last time metrics were logged."""

    def __init__(self) -> None:
        self._last_step = -1

    def peaks(self, agent) -> dict[str, Any] | None:
        steps = [s for s in list(agent.steps) if s.get("step", -1) > self._last_step]
        if not steps:
            return None
        self._last_step = max(s.get("step", -1) for s in steps)
        # Ints per phase and "peak", the blocks dict at the peak, its step_time (float or None): wire step values.
        out: dict[str, Any] = {p: max(int(s["peaks"].get(p, 0)) for s in steps) for p in PHASES}
        best = max(steps, key=lambda s: s.get("peak", 0))
        out["peak"] = int(best.get("peak", 0))
        out["backward_spike"] = max(int(s.get("backward_spike", 0)) for s in steps)
        out["peak_blocks"] = dict(best.get("peak_blocks") or {})
        out["step_time"] = best.get("step_time")
        return out


def log_metrics(agent, window: StepWindow) -> dict[str, float]:
    """In MiB: vramtop/<block>_mib and total_mib now; over the steps since the last call,
    vramtop/peak_<phase>_mib, peak_mib, backward_spike_mib and at_peak_<block>_mib (the blocks at that peak)."""
    out: dict[str, float] = {}
    level, blocks = agent.read_level()
    for key in BLOCK_KEYS:
        out[f"{PREFIX}{key}_mib"] = blocks.get(key, 0) / MIB
    out[f"{PREFIX}total_mib"] = level / MIB
    peaks = window.peaks(agent)
    if peaks is not None:
        for phase in PHASES:
            out[f"{PREFIX}peak_{phase}_mib"] = peaks[phase] / MIB
        out[f"{PREFIX}peak_mib"] = peaks["peak"] / MIB
        out[f"{PREFIX}backward_spike_mib"] = peaks["backward_spike"] / MIB
        for key in BLOCK_KEYS:
            if key in peaks["peak_blocks"]:
                out[f"{PREFIX}at_peak_{key}_mib"] = peaks["peak_blocks"][key] / MIB
    if agent.cuda_index is not None:
        try:
            import torch

            out[f"{PREFIX}reserved_mib"] = torch.cuda.memory_reserved(agent.cuda_index) / MIB
        except Exception:
            pass
    return out


# Driving the forward phase from a framework hook (the root module's own hooks do it when it is called).

def forward_start(agent, module, batch=None) -> None:
    args = (batch,) if batch is not None and hasattr(batch, "shape") else ()
    kwargs = batch if isinstance(batch, dict) else {}
    if not args and not kwargs and isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "shape"):
        args = (batch[0],)
    agent.mark_forward_start(module, args, kwargs)
