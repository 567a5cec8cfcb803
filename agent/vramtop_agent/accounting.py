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
    return s._cdata, s.nbytes(), _dev(t.device)


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
    """Walks a model, its optimizer and the saved-tensor tracker on demand.

    Gradients need care: autograd assigns `param.grad` from C++ without the
    GIL, so reading `p.grad` from another Python thread while a backward pass
    runs races on the tensor's refcount and corrupts memory (reproduced with
    torch 2.13). Only the training thread and autograd's own threads read
    `p.grad`: at phase edges (`fresh=True`) and in post-accumulate-grad hooks;
    the sampler thread uses the cache they leave behind.
    """

    def __init__(self, model=None, optimizer=None, saved=None):
        self.model = model
        self.optimizer = optimizer
        self.saved = saved
        self._grads: dict[int, tuple] = {}  # id(param) -> storage_key(param.grad)

    def note_grad(self, param) -> None:
        """Post-accumulate-grad hook: runs on the thread that just wrote param.grad."""
        g = param.grad
        if g is None:
            self._grads.pop(id(param), None)
        else:
            self._grads[id(param)] = storage_key(g)

    def refresh_grads(self, params=None) -> None:
        """Re-read every .grad; call only where no backward pass can be running."""
        grads = {}
        for p in params if params is not None else self._params():
            g = p.grad
            if g is not None:
                try:
                    grads[id(p)] = storage_key(g)
                except Exception:
                    pass
        self._grads = grads

    def _params(self) -> list:
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

    def breakdown(self, fresh: bool = False) -> Breakdown:
        bd = Breakdown()
        seen: set = set()
        params = self._params()
        opt = self.optimizer

        for p in params:
            key, nbytes, dev = storage_key(p)
            extra = _quant_state_tensors(p)
            if key not in seen:
                seen.add(key)
                bd.add(dev, "parameters", nbytes)
                if p.requires_grad:
                    bd.trainable += nbytes
                else:
                    bd.frozen += nbytes
                    if extra or p.dtype.itemsize == 1:
                        bd.quantized += nbytes
            for q in extra:
                qkey, qbytes, qdev = storage_key(q)
                if qkey not in seen:
                    seen.add(qkey)
                    bd.add(qdev, "parameters", qbytes)
                    bd.frozen += qbytes
                    bd.quantized += qbytes
        bd.param_keys = set(seen)

        if fresh:
            self.refresh_grads(params)
        for key, nbytes, dev in list(self._grads.values()):
            if key not in seen:
                seen.add(key)
                bd.add(dev, "gradients", nbytes)

        if opt is not None:
            for state in list(opt.state.values()):
                if isinstance(state, dict):
                    for v in list(state.values()):
                        if hasattr(v, "untyped_storage"):
                            _count(bd, seen, v, "optimizer")

        if self.saved is not None:
            for dev, nbytes in self.saved.live(seen, storage_key).items():
                bd.add(dev, "activations", nbytes)

        if self.model is not None:
            for b in self.model.buffers():
                bd.devices.setdefault(_dev(b.device), dict.fromkeys(BLOCK_KEYS, 0))
                if b.device.type == "cpu":
                    _count(bd, seen, b, "other")
        return bd


def _count(bd: Breakdown, seen: set, t, block: str) -> None:
    try:
        key, nbytes, dev = storage_key(t)
    except Exception:
        return
    if key in seen:
        return
    seen.add(key)
    bd.add(dev, block, nbytes)


def sum_unique(tensors: Iterable) -> int:
    """Reference sum used by tests and tools: distinct storages' bytes."""
    seen, total = set(), 0
    for t in tensors:
        key, nbytes, _ = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total
