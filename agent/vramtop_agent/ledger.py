"""Incremental per-device byte totals of a set of storages, each owned by one or more tensors.

The phase edges of every step need the gradient and optimizer blocks; summing
hundreds of storages there each time was a third of a launch-bound step. A
ledger keeps the sums as owners come and go: `set(owner, key, nbytes, dev)`
is O(1), reading the totals is a copy of a dict with one entry per device.
Storages shared by two owners (gradients as views of one bucket) count once.

`version` changes whenever the totals may have: a reader that caches what it
derived from the ledger (the Accountant's breakdown) recomputes only then.

Writers: one thread at a time in practice (the training thread, or autograd's
thread during backward). Readers on other threads copy small dicts, which is
atomic under the GIL.
"""

from __future__ import annotations

import itertools

_VERSIONS = itertools.count(1)  # one sequence for every ledger: two ledgers never show the same version


class StorageLedger:
    __slots__ = ("_owners", "_storages", "_totals", "version")

    def __init__(self) -> None:
        self._owners: dict = {}  # owner -> storage key
        self._storages: dict = {}  # storage key -> [owners, nbytes, device name]
        self._totals: dict[str, int] = {}  # device name -> bytes
        self.version = next(_VERSIONS)  # a new value at every change

    def set(self, owner, key, nbytes: int, dev: str) -> None:
        old = self._owners.get(owner)
        if old == key:
            return
        self.version = next(_VERSIONS)
        if old is not None:
            self._release(old)
        self._owners[owner] = key
        entry = self._storages.get(key)
        if entry is None:
            self._storages[key] = [1, nbytes, dev]
            self._totals[dev] = self._totals.get(dev, 0) + nbytes
        else:
            entry[0] += 1

    def drop(self, owner) -> None:
        key = self._owners.pop(owner, None)
        if key is not None:
            self.version = next(_VERSIONS)
            self._release(key)

    def _release(self, key) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del self._storages[key]
            self._totals[entry[2]] = self._totals.get(entry[2], 0) - entry[1]

    def clear(self) -> None:
        self._owners, self._storages, self._totals = {}, {}, {}
        self.version = next(_VERSIONS)

    def replace(self, owners: dict, storages: dict, totals: dict[str, int]) -> None:
        """Take over a whole state built elsewhere (one pass over many owners, no per-owner calls)."""
        self._owners, self._storages, self._totals = owners, storages, totals
        self.version = next(_VERSIONS)

    def holds(self, owners: dict, storages: dict) -> bool:
        """True when the ledger already holds exactly this state (a re-read that found nothing new)."""
        return owners == self._owners and storages == self._storages

    def owners(self) -> list:
        return list(self._owners)

    def keys(self):
        """The storage keys (a live view: intersect it, do not iterate it from another thread)."""
        return self._storages.keys()

    def totals(self, *less) -> dict[str, int]:
        """Bytes per device, without the storages in any of the sets `less` (blocks that take precedence)."""
        out = dict(self._totals)
        overlap: set = set()
        for keys in less:
            if keys:
                overlap |= self._storages.keys() & keys  # C-level over the smaller side; usually empty
        if overlap:
            for key in overlap:
                entry = self._storages.get(key)
                if entry is not None:
                    out[entry[2]] = out.get(entry[2], 0) - entry[1]
        return out

    def __len__(self) -> int:
        return len(self._owners)
