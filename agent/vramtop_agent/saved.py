"""Activations: the tensors autograd keeps for the backward pass.

On a tracked step a saved_tensors_hooks pair is pushed around the root
module's forward. Its pack hook returns a small holder; autograd owns the
holder and drops it when the graph node is freed (during backward, or the
moment a graph is discarded), so the live holders are exactly the tensors
currently saved for backward.

Two rules keep the job unchanged:
- The holder never refers to the tensor autograd handed us: an op that saves
  its own output (ReLU, sigmoid, softmax, exp, ...) would otherwise make a
  cycle output -> grad_fn -> holder -> output that only a backward breaks, and
  a graph dropped without backward would never be freed. The holder keeps a
  detached alias instead (same storage, no grad_fn): autograd keeps that
  storage alive anyway, and dropping the graph frees it by refcount, at once.
- PyTorch applies only the innermost hook pair. When the job has a pair of its
  own in force (`save_on_cpu`, activation offloading), ours calls the job's
  pack inside and the job's unpack inside ours, so the job's hooks run exactly
  as often as without vramtop; what we count is what the job's pack returned,
  on the device where it now lives (the host, for offloaded activations).

The bytes are kept incrementally, per storage: the first holder of a storage
adds its bytes to its device's total and to the current module's total
(attribution), the last one's `__del__` takes them away. A sample reads a
few small dicts; the training thread pays one storage lookup per saved
tensor, on tracked steps only.
"""

from __future__ import annotations

from vramtop_agent.accounting import device_name

ROOT_UNIT = "(before first module)"


class _Saved:
    __slots__ = ("packed", "key", "tracker", "unpack")

    def __init__(self, packed, key, tracker, unpack=None):
        self.packed = packed
        self.key = key
        self.tracker = tracker
        self.unpack = unpack

    def __del__(self):
        # Runs once per saved tensor in backward: the release is inlined.
        tracker = self.tracker
        if tracker is None:
            return
        try:
            live = tracker._live
            entry = live.get(self.key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del live[self.key]
                    _count(tracker, entry, -entry[1])
        except Exception:
            pass  # interpreter shutdown, or the entry went away


def _count(tracker, entry, delta: int) -> None:
    tracker.version += 1  # the accountant's cached breakdown is stale now
    dev, unit = entry[2], entry[3]
    totals = tracker._device_bytes
    totals[dev] = totals.get(dev, 0) + delta
    units = tracker._unit_bytes
    units[unit] = units.get(unit, 0) + delta


def _first_tensor(packed):
    """The tensor inside what a job's pack hook returned (a tensor, or a short tuple such as save_on_cpu's)."""
    if hasattr(packed, "untyped_storage"):
        return packed
    if isinstance(packed, (tuple, list)):
        for item in packed[:4]:
            if hasattr(item, "untyped_storage"):
                return item
    return None


class SavedTensorTracker:
    def __init__(self, storage_key=None) -> None:
        # storage key -> [holders, nbytes, device, unit]
        self._live: dict = {}
        self._device_bytes: dict = {}  # torch.device -> bytes of live saved storages
        self._unit_bytes: dict = {}  # module name -> bytes (attribution on tracked steps)
        self._pushed = False
        self.enabled = True
        self.unit = ROOT_UNIT  # set by the agent's per-module pre hooks on tracked steps
        self.exclude: frozenset = frozenset()  # parameter storages: never activations
        self.job_hooks_seen = 0  # forwards during which the job had its own hook pair (chained)
        self.version = 0  # bumped whenever the live bytes change

    # ------------------------------------------------------------------ hooks

    def _add(self, t):
        """Count a storage; its key, or None when it is not ours to count."""
        try:
            s = t.untyped_storage()
            key = s._cdata
        except Exception:
            return None  # a tensor subclass without a storage
        if key in self.exclude:
            return None  # a saved view of a weight is a parameter
        live = self._live
        entry = live.get(key)
        if entry is None:
            entry = live[key] = [1, s.nbytes(), t.device, self.unit]
            _count(self, entry, entry[1])
        else:
            entry[0] += 1
        return key

    def pack(self, t):
        key = self._add(t)
        return _Saved(t.detach(), key, self if key is not None else None)

    @staticmethod
    def unpack(holder):
        return holder.packed

    def _chained(self, job_pack, job_unpack):
        def pack(t):
            packed = job_pack(t)  # the job's own hook, exactly once per saved tensor, as without us
            inner = _first_tensor(packed)
            key = self._add(inner) if inner is not None else None
            # `packed` is the job's: holding it is what autograd would do without us.
            return _Saved(packed, key, self if key is not None else None, job_unpack)

        def unpack(holder):
            return holder.unpack(holder.packed)

        return pack, unpack

    # ------------------------------------------------------------------ forward

    def enter(self) -> bool:
        """Start tracking (root module's forward pre-hook on a tracked step). False when hooks are off."""
        if self._pushed or not self.enabled:
            return False
        from torch._C import _autograd

        job = _autograd._top_saved_tensors_default_hooks(False)
        if job:
            self.job_hooks_seen += 1
            pair = self._chained(*job)
        else:
            pair = (self.pack, self.unpack)
        try:
            _autograd._push_saved_tensors_default_hooks(*pair)
        except RuntimeError:
            return False  # the job disabled saved-tensor hooks here: nothing to track, nothing to break
        self._pushed = True
        self.unit = ROOT_UNIT
        return True

    def exit(self) -> None:
        """Stop tracking new saves (forward post-hook); already saved tensors stay tracked."""
        if self._pushed:
            self._pushed = False
            from torch._C import _autograd

            _autograd._pop_saved_tensors_default_hooks()

    def hot_functions(self) -> list:
        """What runs inside a compiled forward (compile_guard.py marks it skip)."""
        import vramtop_agent.accounting as acc

        pack, unpack = self._chained(None, None)
        return [self.pack, self.unpack, self._add, pack, unpack, _Saved.__init__, _Saved.__del__, _count,
                _first_tensor, acc.device_name, acc._dev]

    @property
    def tracking(self) -> bool:
        return self._pushed

    # ------------------------------------------------------------------ reading

    def total(self, dev_name: str) -> int:
        return sum(v for d, v in list(self._device_bytes.items()) if device_name(d) == dev_name)

    def live(self, *exclude) -> dict[str, int]:
        """Bytes per device of live saved storages, less those in the sets `exclude` (gradients, optimizer)."""
        out: dict[str, int] = {}
        for d, v in list(self._device_bytes.items()):
            if v:
                name = device_name(d)
                out[name] = out.get(name, 0) + v
        overlap: set = set()
        for keys in exclude:
            if keys:
                overlap |= self._live.keys() & keys  # C-level, over the smaller side: usually empty
        for key in overlap:
            entry = self._live.get(key)
            if entry is not None:
                name = device_name(entry[2])
                out[name] = out.get(name, 0) - entry[1]
        return out

    def by_unit(self) -> dict[str, int]:
        """Bytes of live saved storages per top-level module (only modules holding some)."""
        return {u: v for u, v in list(self._unit_bytes.items()) if v > 0}

    def entries(self) -> list:
        """(key, nbytes, device) of every distinct live saved storage."""
        for _ in range(5):
            try:
                return [(k, e[1], device_name(e[2])) for k, e in list(self._live.items())]
            except RuntimeError:  # resized by another thread mid-copy
                continue
        return []

