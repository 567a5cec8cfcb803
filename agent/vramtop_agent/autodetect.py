"""Find a training job's root module without being told (zero-code use).

The root is the module whose forward is one training forward pass. Nobody
passes it to us under `vramtop run`, `python -m vramtop_agent` or
`VRAMTOP=1`, so PyTorch's process-wide module hooks watch every module call
until one qualifies:

- it is the outermost call: no other module's forward is running on this
  thread (a depth counter kept by a global pre hook and an always-called
  global post hook);
- autograd is recording (`torch.is_grad_enabled()`): evaluation, generation
  and `torch.no_grad()` forwards are not training;
- it has a parameter that requires grad: a frozen teacher or reference model
  run with grad enabled, a loss module, or a parameter-free preprocessing
  module is not the model being trained.

Wrappers are handled by taking the outermost qualifying module as it is:
DistributedDataParallel, DataParallel, FSDP (1: the root FullyShardedDataParallel;
2: the `fully_shard`ed model itself), DeepSpeedEngine, accelerate's prepared
model (the same module with a wrapped `forward`) and torch.compile's
OptimizedModule are all outermost, own the inner model's parameters and
enclose its whole forward, so their pre/post hooks mark the forward phase
correctly. `unwrap()` gives the inner model where a description needs it
(introspect.py names "DistributedDataParallel(LlamaForCausalLM)").

Cost: until the root is found every module call goes through PyTorch's
slow hook path plus two tiny Python calls; the hooks are removed at the
first qualifying call, after which there is no cost at all.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from vramtop_agent.hooks import remove_hooks

if TYPE_CHECKING:
    from types import FrameType

_COMPILE_HOOK_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"

# Attributes through which a wrapper holds the module it wraps.
_WRAPPED_ATTRS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_CLASSES = {
    "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine",
    "OptimizedModule", "CheckpointWrapper", "OffloadWrapper", "PipelineEngine",
}


def unwrap(module, limit: int = 8):
    """The model inside known wrappers (DDP, DP, FSDP1, DeepSpeed, torch.compile); the module itself otherwise."""
    for _ in range(limit):
        inner = unwrap_once(module)
        if inner is module:
            break
        module = inner
    return module


def wrappers(module, limit: int = 8) -> list[str]:
    """Class names of the wrappers around the model, outermost first."""
    out = []
    for _ in range(limit):
        inner = unwrap_once(module)
        if inner is module:
            break
        out.append(type(module).__name__)
        module = inner
    return out


def unwrap_once(module):
    if type(module).__name__ not in _WRAPPER_CLASSES:
        return module
    for attr in _WRAPPED_ATTRS:
        cand = getattr(module, attr, None)
        if cand is not None and cand is not module and hasattr(cand, "named_parameters"):
            return cand
    return module


def _has_trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _call_kwargs(args) -> dict:
    """The keyword arguments of the module call being hooked.

    Global forward pre hooks only receive positional args; HF models are
    called with keywords (`model(**batch)`), and the batch shape lives there.
    They are read once, from Module._call_impl's frame, when the root is
    found; anything unexpected yields {}.
    """
    try:
        frame: FrameType | None = sys._getframe(2)
        for _ in range(3):
            if frame is None:
                break
            if frame.f_code.co_name in ("inner", "_call_impl"):
                loc = frame.f_locals
                if loc.get("args") is args and isinstance(loc.get("kwargs"), dict):
                    return dict(loc["kwargs"])
            frame = frame.f_back
    except Exception:
        pass
    return {}


def _warning_filters() -> list[Any]:
    """warnings.filters: a list at runtime, typeshed calls it a Sequence (it means "do not mutate")."""
    return cast("list[Any]", warnings.filters)


class RootDetector:
    """Calls `on_found(module, args, kwargs)` once, at the first call of the root module, then unhooks.

    `on_found` runs inside the global forward pre hook of that call, before the
    module's own pre hooks and its forward: hooks it registers on the module
    itself miss this call's pre hooks (PyTorch iterates a snapshot) but not its
    post hooks. Exceptions from `on_found` are passed to `on_error` (or
    swallowed): a detector never disturbs the job.
    """

    _filter: tuple[Any, ...] | None  # set by install(); read with getattr, so never set is fine

    def __init__(self, on_found: Callable, on_error: Callable | None = None):
        self._on_found = on_found
        self._on_error = on_error
        self._local = threading.local()
        self._handles: list = []
        self._lock = threading.Lock()
        self.done = False

    def install(self) -> RootDetector:
        import torch
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._grad_enabled = torch.is_grad_enabled
        self._compiling = torch.compiler.is_compiling
        self._handles = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post, always_call=True),
        ]
        # torch.compile(model) warns on every call while any global module hook exists; ours only lives
        # until the first training forward and must not put a line on the job's stderr.
        self._filter = ("ignore", re.compile(_COMPILE_HOOK_WARNING), UserWarning, None, 0)
        _warning_filters().insert(0, self._filter)
        getattr(warnings, "_filters_mutated", lambda: None)()  # re-read the filters (CPython caches them)
        return self

    def remove(self) -> None:
        filt, self._filter = getattr(self, "_filter", None), None
        if filt is not None:
            with contextlib.suppress(ValueError):
                _warning_filters().remove(filt)
                getattr(warnings, "_filters_mutated", lambda: None)()  # re-read the filters (CPython caches them)
        handles, self._handles = self._handles, []
        remove_hooks(handles)

    def _pre(self, module, args):
        if self._compiling():
            return None  # traced inside a compiled region: be nothing there
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        if depth or self.done:
            return None
        try:
            if not self._grad_enabled() or not _has_trainable(module):
                return None
            with self._lock:
                if self.done:
                    return None
                self.done = True
            self.remove()
            local.depth = 0
            self._on_found(module, args, _call_kwargs(args))
        except Exception as exc:
            if self._on_error is not None:
                try:
                    self._on_error(exc)
                except Exception:
                    pass
        return None

    def _post(self, module, args, output):
        if self._compiling():
            return None
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth > 0:
            local.depth = depth - 1
        return None


def watch_root(agent) -> RootDetector:
    """Attach the first training forward's root module to `agent` (an Agent created without a model)."""

    def found(module, args, kwargs):
        if agent.closed or agent.model is not None:
            return  # stopped, or someone attached a model explicitly meanwhile
        agent.attach_model(module)
        # The hooks attach_model just registered miss this call's pre hooks: replay the agent's.
        agent.mark_forward_start(module, args, kwargs)

    det = RootDetector(found, on_error=lambda exc: agent.report_error("autodetect", exc)).install()
    agent.adopt_hook(det)  # Agent.stop() removes it like any hook handle
    return det


def swap_root_detector(agent, detector_class: type[RootDetector]) -> None:
    """Replace the agent's RootDetector (watch_root) by a `detector_class` one with the same callbacks."""
    for old in agent.take_hooks(lambda handle: isinstance(handle, RootDetector)):
        old.remove()
        agent.adopt_hook(detector_class(old._on_found, on_error=old._on_error).install())


def watched_by_agent(module) -> bool:
    """True when some Agent already hooks this module or one inside it (an explicit `watch(model)`)."""
    try:
        for m in module.modules():
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                for h in hooks.values():
                    owner = getattr(h, "__self__", None)
                    if owner is not None and type(owner).__name__ == "Agent" \
                            and type(owner).__module__ == "vramtop_agent.agent" and not owner.closed:
                        return True
    except Exception:
        return False
    return False


def defer_to_closure(agent, optimizer, args, kwargs):
    """`optimizer.step(closure)` runs forward and backward inside the step (Lightning's automatic
    optimization, LBFGS): the optimizer phase starts when the closure returns, not when step() is entered.

    Called from the agent's global optimizer step pre hook; returns replacement (args, kwargs) whose
    closure marks the optimizer phase after each call, or None when there is no closure.
    """
    try:
        # (the hook gets step()'s own arguments: args[0] is the optimizer, a positional closure args[1])
        closure = kwargs.get("closure") if kwargs else None
        in_kwargs = closure is not None
        if closure is None and len(args) > 1:
            closure = args[1]
        if closure is None or not callable(closure):
            return None
        def closure_then_update(*a, **k):
            # After every evaluation: LBFGS(max_iter > 1) runs the closure several times inside one step(),
            # and each forward ends the optimizer phase the last evaluation began. The step ends when
            # step() returns (one step, an evaluation a micro-step).
            result = closure(*a, **k)
            agent.mark_optimizer_start(optimizer)
            return result

        if in_kwargs:
            kwargs = dict(kwargs)
            kwargs["closure"] = closure_then_update
        else:
            args = (args[0], closure_then_update, *tuple(args)[2:])
        return tuple(args), kwargs
    except Exception as exc:
        agent.report_error("optimizer-pre", exc)
        return None
