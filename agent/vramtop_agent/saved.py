"""Activations: the tensors autograd keeps for the backward pass.

A saved_tensors_hooks pair wraps every tensor autograd saves in a small
holder. Autograd owns the holder and drops it when the graph node is freed
(during backward, or when the graph is discarded), so the live holders are
exactly the tensors currently saved for backward.

The bytes are kept incrementally, per storage: a holder adds its storage on
creation (refcount 0 -> 1 adds the bytes) and removes it in `__del__`. A
sample then reads a small dict instead of resolving hundreds of storages, and
the training thread pays one storage lookup per saved tensor.
"""

from __future__ import annotations

from vramtop_agent.accounting import device_name


class _Saved:
    __slots__ = ("t", "key", "tracker")

    def __init__(self, t, key, tracker):
        self.t = t
        self.key = key
        self.tracker = tracker

    def __del__(self):
        # Inlined _release: this runs once per saved tensor in backward.
        try:
            live = self.tracker._live
            entry = live.get(self.key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del live[self.key]
        except Exception:
            pass  # interpreter shutdown, or the entry went away


class SavedTensorTracker:
    def __init__(self, storage_key) -> None:
        self._storage_key = storage_key
        # storage key -> [holders, nbytes, device]
        self._live: dict = {}
        self._ctx = None
        self.enabled = True

    # Hook pair handed to torch.autograd.graph.saved_tensors_hooks.
    def pack(self, t):
        # The hot path (once per saved tensor): the storage's identity and size, the
        # device as torch gives it; naming the device waits until someone reads.
        try:
            s = t.untyped_storage()
            key = s._cdata
        except Exception:
            return t  # a tensor subclass without a storage: not ours to count
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, s.nbytes(), t.device]
        else:
            entry[0] += 1
        return _Saved(t, key, self)

    @staticmethod
    def unpack(holder):
        return holder.t if type(holder) is _Saved else holder

    def _release(self, key) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self._live[key]

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

    def entries(self) -> list:
        """(key, nbytes, device) of every distinct live saved storage."""
        for _ in range(5):
            try:
                return [(k, e[1], device_name(e[2])) for k, e in list(self._live.items())]
            except RuntimeError:  # resized by another thread mid-copy
                continue
        return []

    def live(self, exclude: set) -> dict[str, int]:
        """Bytes per device of live saved storages not in `exclude` (parameters, ...)."""
        out: dict[str, int] = {}
        for key, nbytes, dev in self.entries():
            if key not in exclude:
                out[dev] = out.get(dev, 0) + nbytes
        return out
