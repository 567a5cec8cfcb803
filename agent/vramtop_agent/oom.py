"""OOM postmortem: catch torch.OutOfMemoryError on its way out and record it.

Three places see an OOM, whichever comes first records it (once per
exception object):

- a forward hook with `always_call=True` on the root module: PyTorch calls
  it while the exception propagates out of forward (`sys.exc_info()` holds
  it); the hook also unwinds the agent's forward bookkeeping, so a job that
  catches the OOM and retries with a smaller batch keeps correct phases;
- `Agent.__exit__` (the `with vramtop_agent.watch(...)` form);
- `sys.excepthook` / `threading.excepthook`, chained to the previous hooks:
  OOMs from backward or the optimizer step, which no module hook sees.

The event (schema type "oom") carries step, phase, the bytes requested
(parsed from the message), the message, the blocks at that moment, the
allocator stats (CUDA) and the allocator's segment map
(torch.cuda.memory._snapshot(), converted to plain lists and maps that
msgpack carries; never pickle). With a recording, the memory_viz snapshot
file (PyTorch's own pickle format, for https://pytorch.org/memory_viz) is
written beside it; vramtop never reads it back.

The job then fails exactly as it would have without vramtop: every hook
here returns normally, the excepthook chain ends in the previous hook (the
traceback and exit status are Python's own), and nothing here raises.
"""

from __future__ import annotations

import re
import sys
import threading
import weakref
from typing import Any

from vramtop_agent.schema import BLOCK_KEYS

_AGENTS: weakref.WeakSet = weakref.WeakSet()
_INSTALLED = False
_prev_excepthook = None
_prev_threading_excepthook = None

# Segment maps are capped so that the event fits a wire frame (schema.MAX_FRAME_BYTES).
SEGMENT_BUDGET_BYTES = 2_500_000
MAX_FRAMES_PER_BLOCK = 8

_UNITS = {"b": 1, "bytes": 1, "byte": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4}
_REQ_RE = re.compile(r"tried to allocate\s+([0-9][0-9.,]*)\s*([KMGT]i?B|bytes?|B)?", re.IGNORECASE)


# ---------------------------------------------------------------------- recognising


def is_oom(exc: BaseException | None) -> bool:
    """torch.OutOfMemoryError (CUDA, XPU, MPS), or an allocator failure reported as RuntimeError."""
    if exc is None:
        return False
    torch = sys.modules.get("torch")
    if torch is not None:
        cls = getattr(torch, "OutOfMemoryError", None) \
            or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
        if cls is not None and isinstance(exc, cls):
            return True
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)[:2000]
        return ("out of memory" in text.lower() and "CUDA" in text) or "DefaultCPUAllocator: can't allocate" in text \
            or "MPS backend out of memory" in text
    return False


def find_oom(exc: BaseException | None) -> BaseException | None:
    """The OOM in an exception or its cause/context chain (a wrapper that re-raises still counts)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        if is_oom(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def parse_requested(message: str) -> int | None:
    """Bytes from "Tried to allocate 2.00 GiB" (CUDA) or "you tried to allocate 1234 bytes" (CPU)."""
    m = _REQ_RE.search(message or "")
    if not m:
        return None
    try:
        value = float(m.group(1).replace(",", ""))
    except ValueError:
        return None
    unit = (m.group(2) or "bytes").lower()
    return int(round(value * _UNITS.get(unit, 1)))


# ---------------------------------------------------------------------- installing


def install(agent) -> None:
    """Register an agent; chain the process-wide exception hooks once."""
    global _INSTALLED, _prev_excepthook, _prev_threading_excepthook
    _AGENTS.add(agent)
    if _INSTALLED:
        return
    _INSTALLED = True
    _prev_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    _prev_threading_excepthook = threading.excepthook
    threading.excepthook = _threading_excepthook


def forward_raised(agent, exc: BaseException) -> None:
    """The watched forward raised `exc` (an always-called forward hook saw it): record it if it is an OOM."""
    try:
        oom = find_oom(exc)
        if oom is not None:
            record(agent, oom, "forward")
            # forward will not reach the agent's post hook: unwind its bookkeeping.
            agent.abandon_forward("oom-unwind")
    except Exception as err:  # pragma: no cover - never disturb the job
        try:
            agent.report_error("oom", err)
        except Exception:
            pass


def model_hooks(agent, model) -> list:
    """An always-called forward hook on the root module; marked as a model hook of the agent. (The agent's
    own always-called forward hook does this where it can: one hook less on every forward.)"""
    ref = weakref.ref(agent)

    def hook(module, args, result):
        if result is not None:
            return None  # forward returned normally
        exc = sys.exc_info()[1]
        if exc is None:
            return None
        a = ref()
        if a is not None:
            forward_raised(a, exc)
        return None

    h = model.register_forward_hook(hook, always_call=True)
    h._vramtop_model = True
    return [h]


def on_exception(agent, exc: BaseException | None) -> None:
    """Called from Agent.__exit__ before it stops: record an OOM on its way out."""
    try:
        oom = find_oom(exc)
        if oom is not None:
            record(agent, oom, "exit")
    except Exception as err:
        try:
            agent.report_error("oom", err)
        except Exception:
            pass


def _interactive() -> bool:
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def _excepthook(exc_type, exc, tb) -> None:
    try:
        _at_top(exc, main_thread=True)
    except Exception:
        pass
    prev = _prev_excepthook if _prev_excepthook is not None else sys.__excepthook__
    prev(exc_type, exc, tb)


def _threading_excepthook(args) -> None:
    try:
        _at_top(args.exc_value, main_thread=False)
    except Exception:
        pass
    prev = _prev_threading_excepthook if _prev_threading_excepthook is not None else threading.__excepthook__
    prev(args)


def _at_top(exc: BaseException | None, main_thread: bool) -> None:
    """An exception reached the top of a thread: record an OOM and get everything to disk."""
    oom = find_oom(exc)
    for agent in list(_AGENTS):
        if agent.closed:
            continue
        if oom is not None:
            record(agent, oom, "top")
        if main_thread and not _interactive():
            # The interpreter is about to exit: a last message, sinks flushed and closed.
            reason = "oom" if oom is not None else f"exception: {type(exc).__name__}"
            agent.stop(reason)
        elif oom is not None:
            agent.drain()


# ---------------------------------------------------------------------- recording


def record(agent, exc: BaseException, where: str) -> bool:
    """Queue the "oom" event for this exception (once per agent). Returns True when queued."""
    if agent.closed:
        return False
    marks = getattr(exc, "_vramtop_oom_recorded", ())
    if id(agent) in marks:
        return False
    try:
        # A mark on the exception object itself (any exception type, so not a declared attribute).
        setattr(exc, "_vramtop_oom_recorded", (*marks, id(agent)))  # noqa: B010
    except Exception:
        pass
    fields = agent.run_guarded("oom", build_event, agent, exc, where)
    if fields is None:
        return False
    agent.emit_event(fields)
    return True


def build_event(agent, exc: BaseException, where: str) -> dict:
    message = str(exc)
    level_blocks = agent.run_guarded("oom-blocks", agent.read_level)
    blocks = dict(level_blocks[1]) if level_blocks else dict.fromkeys(BLOCK_KEYS, 0)
    fields: dict[str, Any] = {
        "type": "oom",
        "step": int(agent.step),
        "phase": _phase_from_traceback(exc) or str(agent.phase),
        "requested": parse_requested(message),
        "message": message[:8000],
        "blocks": {k: int(blocks.get(k, 0)) for k in BLOCK_KEYS},
        "exception": type(exc).__name__,
        "where": where,
        "device": agent.device,
    }
    if agent.batch:
        fields["batch"] = list(agent.batch)
    idx = agent.cuda_index
    if idx is not None:
        from vramtop_agent import devices

        stats = agent.run_guarded("oom-cuda", devices.cuda_stats, idx)
        if stats:
            fields["cuda"] = stats
        full = agent.run_guarded("oom-memory-stats", _memory_stats, idx)
        if full:
            fields["memory_stats"] = full
        segs = agent.run_guarded("oom-segments", segments, idx)
        if segs is not None:
            fields["segments"] = segs
        path = agent.run_guarded("oom-memory-viz", _dump_memory_viz, agent)
        if path:
            fields["memory_viz"] = path
    return fields


def _phase_from_traceback(exc: BaseException) -> str | None:
    """Where the exception was raised, from the frames it passed (innermost wins).

    The agent's phase lags when the failure comes before its next edge (an OOM
    in the loss's backward, before the gradient reaches the model's output).
    """
    phase = None
    tb = exc.__traceback__
    n = 0
    while tb is not None and n < 500:
        code = tb.tb_frame.f_code
        fname = code.co_filename.replace("\\", "/")
        if "/torch/" in fname:
            if code.co_name == "backward" and ("/torch/autograd/" in fname or fname.endswith("/torch/_tensor.py")):
                phase = "backward"
            elif "/torch/optim/" in fname:
                phase = "optimizer"
            elif fname.endswith("/torch/nn/modules/module.py") and code.co_name in ("_call_impl", "_wrapped_call_impl"):
                phase = phase if phase == "backward" else "forward"
        tb = tb.tb_next
        n += 1
    return phase


def _memory_stats(idx: int) -> dict:
    import torch

    return {str(k): v for k, v in torch.cuda.memory_stats(idx).items() if isinstance(v, (int, float))}


def segments(device_index: int | None = None) -> list | None:
    import torch

    if not torch.cuda.is_available():
        return None
    snap = torch.cuda.memory._snapshot(device_index)
    return convert_segments(snap.get("segments", []) if isinstance(snap, dict) else snap, device_index)


def convert_segments(raw: Any, device_index: int | None = None, budget: int = SEGMENT_BUDGET_BYTES) -> list:
    """The allocator's segment list as plain maps (ints, strings, lists), bounded in size.

    Each segment keeps its scalar fields (address, total_size, allocated_size,
    active_size, requested_size, stream, segment_type, is_expandable, ...)
    and its blocks (size, requested_size, state, address, and up to 8 stack
    frames when memory history was being recorded). When the whole map would
    exceed `budget` bytes, frames go first, then the blocks of the smallest
    segments (their counts stay in `blocks_omitted`).
    """
    from vramtop_agent.recorder import pack

    segs = []
    for seg in raw if isinstance(raw, (list, tuple)) else []:
        if not isinstance(seg, dict):
            continue
        if device_index is not None and isinstance(seg.get("device"), int) and seg["device"] != device_index:
            continue
        out = {str(k): _scalar(v) for k, v in seg.items() if k not in ("blocks", "frames") and _is_scalar(v)}
        blocks = []
        for b in seg.get("blocks") or ():
            if not isinstance(b, dict):
                continue
            nb = {str(k): _scalar(v) for k, v in b.items() if k != "frames" and _is_scalar(v)}
            frames = b.get("frames")
            if isinstance(frames, (list, tuple)) and frames:
                nb["frames"] = [_frame(f) for f in frames[:MAX_FRAMES_PER_BLOCK] if isinstance(f, dict)]
            blocks.append(nb)
        out["blocks"] = blocks
        segs.append(out)
    if len(pack(segs)) <= budget:
        return segs
    for s in segs:
        for b in s["blocks"]:
            b.pop("frames", None)
    size = len(pack(segs))
    if size <= budget:
        return segs
    for s in sorted(segs, key=lambda s: s.get("total_size") or 0):
        if size <= budget:
            break
        before = len(pack(s["blocks"]))
        s["blocks_omitted"] = len(s["blocks"])
        s["blocks"] = []
        size -= before
    return segs


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _scalar(v: Any) -> Any:
    if isinstance(v, str):
        return v[:500]
    if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < (1 << 64):
        return str(v)
    return v


def _frame(f: dict) -> dict:
    return {str(k): _scalar(v) for k, v in f.items() if _is_scalar(v)}


def _dump_memory_viz(agent) -> str | None:
    """PyTorch's own snapshot (a pickle, for memory_viz) beside the recording. Written, never read."""
    import torch

    rec = agent.recorder
    if rec is None or not rec.path or not torch.cuda.is_available():
        return None
    path = f"{rec.path}.oom-step{int(agent.step)}.memory_viz.pickle"
    torch.cuda.memory._dump_snapshot(path)
    return path
