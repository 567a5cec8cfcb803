"""Incremental per-device byte totals of a set of storages, each owned by one or more tensors.

The phase edges of every step need the gradient and optimizer blocks; summing
hundreds of storages there each time was a third of a launch-bound step. A
ledger keeps the sums as owners come and go: `set(owner, key, nbytes, dev)`
is O(1), reading the totals is a copy of a dict with one entry per device.
Storages shared by two owners (gradients as views of one bucket) count once.

`version` changes whenever the totals may have: a reader that caches what it
derived from the ledger (the Accountant's breakdown) recomputes only then.
A ledger made with `global_latest=False` (the gradients: emptied by zero_grad
and refilled by the backward every step) is left out of `latest_version()`,
and goes back to a version it had when it goes back to that content (empty,
or a state the caller names), so a reader caching by version finds its
earlier result instead of recomputing twice a step.

Writers: one thread at a time in practice (the training thread, or autograd's
thread during backward). Readers on other threads copy small dicts, which is
atomic under the GIL.

`replace_bulk` takes a whole state as parallel lists (the gradient read at
every backward end): the per-storage tables are built only if a writer later
needs them (a tracked step's per-gradient hooks, a partial zero_grad), so an
untracked step pays for a set and a sum, not for a dict entry per storage.
Readers never build them: they use the key set and totals set with the lists.
"""

from __future__ import annotations

import itertools

_VERSIONS = itertools.count(1)  # one sequence for every ledger: two ledgers never show the same version
_LATEST = [0]  # the newest version any ledger took: one read tells a cache whether any ledger changed


def latest_version() -> int:
    return _LATEST[0]


class StorageLedger:
    __slots__ = ("_owners", "_storages", "_totals", "_bulk", "_keyset", "version", "_global", "_empty_version")

    def __init__(self, global_latest: bool = True) -> None:
        self._owners: dict = {}  # owner -> storage key
        self._storages: dict = {}  # storage key -> [owners, nbytes, device name]
        self._totals: dict[str, int] = {}  # device name -> bytes
        self._bulk: tuple | None = None  # (owners, keys, nbytes, devices) lists not yet in the tables
        self._keyset: set | frozenset | None = None  # the storage keys while _bulk is pending
        self._global = global_latest
        self.version = self._empty_version = self._new_version()  # a new value at every change

    def _new_version(self) -> int:
        version = next(_VERSIONS)
        if self._global:
            _LATEST[0] = version
        return version

    def replace_bulk(self, owners: list, keys: list, sizes: list, devs: list, totals: dict[str, int],
                     keyset: frozenset | None = None, version: int | None = None) -> None:
        """Take over a whole state given as parallel lists (keys may repeat: views of one storage), and its
        totals (copied: the ledger changes its own). `keyset`, set(keys) when the caller has it already.
        `version`: the version this ledger had right after it last took this very state (not global only)."""
        self._keyset = keyset if keyset is not None else set(keys)
        self._bulk = (owners, keys, sizes, devs)
        self._totals = dict(totals)
        self.version = version if version is not None and not self._global else self._new_version()

    def holds_bulk(self, owners: list, keys: list) -> bool:
        """True when the ledger holds exactly these owners on these storages (nothing new)."""
        bulk = self._bulk
        if bulk is not None:
            return bulk[0] == owners and bulk[1] == keys
        return len(owners) == len(self._owners) and dict(zip(owners, keys)) == self._owners

    def _tables(self) -> None:
        """Build the per-storage tables from a pending bulk state (writers only)."""
        bulk = self._bulk
        if bulk is None:
            return
        owners: dict = {}
        storages: dict = {}
        for owner, key, nbytes, dev in zip(*bulk):
            owners[owner] = key
            entry = storages.get(key)
            if entry is None:
                storages[key] = [1, nbytes, dev]
            else:
                entry[0] += 1
        self._owners, self._storages = owners, storages
        self._bulk = self._keyset = None

    def set(self, owner, key, nbytes: int, dev: str) -> None:
        self._tables()
        old = self._owners.get(owner)
        if old == key:
            return
        self.version = self._new_version()
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
        self._tables()
        key = self._owners.pop(owner, None)
        if key is not None:
            self.version = self._new_version()
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
        self._bulk = self._keyset = None
        self.version = self._new_version() if self._global else self._empty_version

    def owners(self) -> list:
        bulk = self._bulk
        if bulk is not None:
            return list(dict.fromkeys(bulk[0]))
        return list(self._owners)

    def keys(self):
        """The storage keys (a set, or a live view: intersect it, do not iterate it from another thread)."""
        keyset = self._keyset
        return keyset if keyset is not None else self._storages.keys()

    def totals(self, *less) -> dict[str, int]:
        """Bytes per device, without the storages in any of the sets `less` (blocks that take precedence)."""
        out = dict(self._totals)
        bulk, mine = self._bulk, self.keys()
        overlap: set = set()
        for keys in less:
            if keys:
                overlap |= mine & keys  # C-level over the smaller side; usually empty
        if overlap:
            table = self._storages if bulk is None else {k: (0, n, d) for k, n, d in zip(*bulk[1:])}
            for key in overlap:
                entry = table.get(key)
                if entry is not None:
                    out[entry[2]] = out.get(entry[2], 0) - entry[1]
        return out

    def __len__(self) -> int:
        bulk = self._bulk
        return len(set(bulk[0])) if bulk is not None else len(self._owners)
