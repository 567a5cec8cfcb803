"""Categorize the tensors of a training job into the four blocks, per device.

Every tensor is counted by its storage, once: tied weights, views (weight.t()
saved by a linear layer) and tensors shared between blocks are deduplicated
by the storage's identity. Precedence when a storage belongs to two blocks:
parameters > gradients > optimizer > activations (a saved view of a weight is
a parameter, not an activation).

`other` is what the allocator holds beyond the four blocks: on CUDA it is
torch.cuda.memory_allocated minus the four (temporaries, activation
gradients, inputs, buffers); on CPU, where there is no allocator counter, it
is the model's buffers (the only other tensors we can see without hooking
every allocation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from vramtop_agent.schema import BLOCK_KEYS


def storage_key(t):
    """(identity, bytes, device) of a tensor's storage.

    `_cdata` is the address of the StorageImpl: unique while the storage
    lives, and it works on the meta device, where data_ptr() is always 0.
    """
    s = t.untyped_storage()
    return s._cdata, s.nbytes(), device_name(t.device)


_DEV_NAMES: dict = {}  # torch.device -> "cuda:0"; str(device) is slow on the hot path


def device_name(d) -> str:
    name = _DEV_NAMES.get(d)
    if name is None:
        name = _DEV_NAMES[d] = _dev(d)
    return name


def _dev(device) -> str:
    return str(device) if device.index is not None or device.type == "cpu" else f"{device.type}:0"


def _quant_state_tensors(param) -> list:
    """bitsandbytes Params4bit keep their block constants beside the packed weight."""
    qs = getattr(param, "quant_state", None)
    if qs is None:  # bitsandbytes Int8Params keep their per-row scales (SCB) beside the int8 weight
        scb = getattr(param, "SCB", None)
        return [scb] if scb is not None and hasattr(scb, "untyped_storage") else []
    out = []
    for name in ("absmax", "code", "offset"):
        v = getattr(qs, name, None)
        if v is not None and hasattr(v, "untyped_storage"):
            out.append(v)
    nested = getattr(qs, "state2", None)
    if nested is not None:
        for name in ("absmax", "code"):
            v = getattr(nested, name, None)
            if v is not None and hasattr(v, "untyped_storage"):
                out.append(v)
    return out


@dataclass
class Breakdown:
    """Bytes per block and device, plus the split of parameters."""

    devices: dict = field(default_factory=dict)  # device -> {block: bytes}
    trainable: int = 0
    frozen: int = 0
    quantized: int = 0  # bytes of quantized (4/8-bit) frozen weights incl. their constants
    param_keys: set = field(default_factory=set)

    def add(self, dev: str, block: str, nbytes: int) -> None:
        blocks = self.devices.get(dev)
        if blocks is None:
            blocks = self.devices[dev] = dict.fromkeys(BLOCK_KEYS, 0)
        blocks[block] += nbytes

    def blocks(self, dev: str) -> dict:
        return dict(self.devices.get(dev) or dict.fromkeys(BLOCK_KEYS, 0))

    def total(self, dev: str) -> int:
        return sum(self.blocks(dev).values())


class Accountant:
    """Categorizes on demand from caches that the right threads keep fresh.

    Walking `model.parameters()` costs more than everything else in a sample
    (named_modules recursion), so parameters, optimizer states and gradients
    are cached as (storage key, bytes, device) tuples:
    - parameters: refreshed at most once a second (and on attach), from any
      thread; their storages only change when a job swaps them (FSDP).
    - optimizer states: refreshed at the optimizer-step edges and when a
      caller asks for `fresh` numbers, i.e. on the training thread.
    - gradients: autograd assigns `param.grad` from C++ without the GIL, so
      reading `p.grad` from another Python thread while a backward pass runs
      races on the tensor's refcount and corrupts memory (reproduced with
      torch 2.13). Only the training thread (`fresh=True`) and autograd's own
      threads (post-accumulate-grad hooks, `note_grad`) read `p.grad`; the
      sampler thread uses what they leave in the cache.
    Activations are counted incrementally by the SavedTensorTracker.
    """

    PARAM_REFRESH_S = 1.0

    def __init__(self, model=None, optimizer=None, saved=None):
        self.model = model
        self.optimizer = optimizer
        self.saved = saved
        self._grads: dict[int, tuple] = {}  # id(param) -> storage_key(param.grad)
        self._params: list = []  # (key, nbytes, dev, trainable, quant extras)
        self._param_objs: list = []
        self._params_at = -1e9
        self._opt: list = []  # storage keys of optimizer state tensors
        self.param_keys: frozenset = frozenset()

    def invalidate(self) -> None:
        """The model or optimizer changed: rebuild every cache on next use."""
        self._params_at = -1e9
        self._opt = []
        self._grads = {}

    # ------------------------------------------------------------------ caches

    def param_objects(self) -> list:
        params = list(self.model.parameters()) if self.model is not None else []
        opt = self.optimizer
        if opt is not None:
            # Parameters the optimizer trains but the model does not own (rare, but count them).
            known = {id(p) for p in params}
            for group in list(opt.param_groups):
                for p in group.get("params", ()):
                    if id(p) not in known:
                        params.append(p)
                        known.add(id(p))
        return params

    def refresh_params(self) -> None:
        import time

        objs = self.param_objects()
        entries = []
        for p in objs:
            extras = []
            for q in _quant_state_tensors(p):
                try:
                    extras.append(storage_key(q))
                except Exception:
                    pass
            entries.append((*storage_key(p), bool(p.requires_grad), extras, p.dtype.itemsize == 1))
        self._param_objs = objs
        self._params = entries
        # The parameter part of every breakdown, computed once per refresh.
        bd = Breakdown()
        seen: set = set()
        for key, nbytes, dev, trainable, extras, one_byte in entries:
            if key not in seen:
                seen.add(key)
                bd.add(dev, "parameters", nbytes)
                if trainable:
                    bd.trainable += nbytes
                else:
                    bd.frozen += nbytes
                    if extras or one_byte:
                        bd.quantized += nbytes
            for qkey, qbytes, qdev in extras:
                if qkey not in seen:
                    seen.add(qkey)
                    bd.add(qdev, "parameters", qbytes)
                    bd.frozen += qbytes
                    bd.quantized += qbytes
        self._param_bd = bd
        self.param_keys = frozenset(seen)
        self._params_at = time.monotonic()

    def _maybe_refresh_params(self) -> None:
        import time

        if time.monotonic() - self._params_at > self.PARAM_REFRESH_S:
            self.refresh_params()

    def refresh_optimizer(self) -> None:
        opt = self.optimizer
        entries = []
        if opt is not None:
            for state in list(opt.state.values()):
                if isinstance(state, dict):
                    for v in list(state.values()):
                        if hasattr(v, "untyped_storage"):
                            try:
                                entries.append(storage_key(v))
                            except Exception:
                                pass
        self._opt = entries

    def note_grad(self, param) -> None:
        """Post-accumulate-grad hook: runs on the thread that just wrote param.grad."""
        g = param.grad
        if g is None:
            self._grads.pop(id(param), None)
        else:
            self._grads[id(param)] = storage_key(g)

    def refresh_grads(self) -> None:
        """Re-read every .grad; call only where no backward pass can be running."""
        grads = {}
        for p in self._param_objs:
            g = p.grad
            if g is not None:
                try:
                    grads[id(p)] = storage_key(g)
                except Exception:
                    pass
        self._grads = grads

    # ------------------------------------------------------------------ breakdown

    def breakdown(self, fresh: bool = False) -> Breakdown:
        """Bytes per block and device. `fresh`: re-read grads and optimizer state (training thread only)."""
        self._maybe_refresh_params()
        if fresh:
            self.refresh_grads()
            self.refresh_optimizer()
        pbd = self._param_bd
        bd = Breakdown(devices={d: dict(b) for d, b in pbd.devices.items()}, trainable=pbd.trainable,
                       frozen=pbd.frozen, quantized=pbd.quantized)
        seen = set(self.param_keys)
        bd.param_keys = self.param_keys
        for block, entries in (("gradients", list(self._grads.values())), ("optimizer", self._opt)):
            for key, nbytes, dev in entries:
                if key not in seen:
                    seen.add(key)
                    bd.add(dev, block, nbytes)
        if self.saved is not None:
            for dev, nbytes in self.saved.live(seen).items():
                bd.add(dev, "activations", nbytes)
        if self.model is not None:
            # CPU has no allocator counter: its buffers are the "other" we can see.
            for key, nbytes, dev in self._buffers():
                if key not in seen:
                    seen.add(key)
                    bd.add(dev, "other", nbytes if dev == "cpu" else 0)
        return bd

    def _buffers(self) -> list:
        cached = getattr(self, "_buffer_cache", None)
        if cached is not None and cached[0] == self._params_at:
            return cached[1]
        entries = []
        for b in self.model.buffers():
            try:
                entries.append(storage_key(b))
            except Exception:
                pass
        self._buffer_cache = (self._params_at, entries)
        return entries


def sum_unique(tensors: Iterable) -> int:
    """Reference sum used by tests and tools: distinct storages' bytes."""
    seen, total = set(), 0
    for t in tensors:
        key, nbytes, _ = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total
