"""Activations: the tensors autograd keeps for the backward pass.

A saved_tensors_hooks pair wraps every tensor autograd saves in a small
holder. Autograd owns the holder and drops it when the graph node is freed
(during backward, or when the graph is discarded), so the set of live holders
is exactly the set of tensors currently saved for backward. Storage
resolution is deferred to `live()` (called by the sampler / at phase edges),
keeping the per-op cost in the training thread to one allocation and one
weak-set insertion.
"""

from __future__ import annotations

import weakref
from typing import Iterable


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class SavedTensorTracker:
    def __init__(self) -> None:
        self._live: "weakref.WeakSet[_Saved]" = weakref.WeakSet()
        self._ctx = None
        self.enabled = True

    # Hook pair handed to torch.autograd.graph.saved_tensors_hooks.
    def pack(self, t):
        holder = _Saved(t)
        self._live.add(holder)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.t

    def enter(self) -> None:
        """Start tracking (called at the root module's forward pre-hook)."""
        if self._ctx is not None or not self.enabled:
            return
        import torch

        ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        ctx.__enter__()
        self._ctx = ctx

    def exit(self) -> None:
        """Stop tracking new saves (forward post-hook); already saved tensors stay tracked."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def tensors(self) -> list:
        # list() of a WeakSet can race with the training thread's adds; retry.
        for _ in range(5):
            try:
                return [h.t for h in list(self._live)]
            except RuntimeError:
                continue
        return []

    def live(self, exclude: set, storage_key) -> dict[str, int]:
        """Bytes per device of distinct live saved storages not in `exclude`."""
        return dedup_bytes(self.tensors(), exclude, storage_key)


def dedup_bytes(tensors: Iterable, exclude: set, storage_key) -> dict[str, int]:
    seen: set = set()
    out: dict[str, int] = {}
    for t in tensors:
        try:
            key, nbytes, dev = storage_key(t)
        except Exception:
            continue  # e.g. a tensor subclass without a storage
        if key in exclude or key in seen:
            continue
        seen.add(key)
        out[dev] = out.get(dev, 0) + nbytes
    return out
