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

import itertools
import operator
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vramtop_agent.ledger import StorageLedger, latest_version
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
    param_keys: frozenset = field(default_factory=frozenset)

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
    """Categorizes from incremental caches that the right threads keep current.

    Edge work is incremental: what changes rarely is cached and invalidated
    cheaply, so a phase edge costs a few dict copies, not a walk of every
    parameter and optimizer state.
    - parameters: the set is rebuilt when a parameter is registered anywhere
      (PyTorch's global registration hook: a replaced parameter is dropped at
      once) and re-checked at most once a second on the training thread (a
      storage swapped under `p.data = ...`, as FSDP does): by C-level maps
      over the parameters and buffers the last walk found, with a walk of the
      module tree only when something differs, a module or buffer was
      registered, or 10 s have passed (`module._parameters[name] = p`, as some
      loaders write, fires no hook).
    - gradients: a ledger (ledger.py), filled by one pass over the watched
      parameters when a backward ends (`read_grads`, from autograd's
      end-of-backward callback) and, on tracked steps only, by the
      post-accumulate-grad hooks as each gradient lands (`note_grad`): no
      Python runs per parameter during an untracked backward. Autograd
      assigns `param.grad` from C++ without the GIL, so reading `p.grad` from
      another Python thread while a backward pass runs races on the tensor's
      refcount and corrupts memory (reproduced with torch 2.13): only the
      watched model's training thread (`sync`/`fresh`), the end-of-backward
      callback (no node of that backward is running any more) and those hooks
      read `.grad`, and only for the watched model's parameters. At a forward
      start the training thread drops the entries `zero_grad` set to None.
    - optimizer states: a ledger per adopted optimizer, re-walked when the
      number of states changes (the first step, new parameters) and at most
      once a second otherwise (states are updated in place between).
    - the model and the optimizers are held weakly: a job that drops or
      rebuilds them gets their memory back.
    Activations are counted incrementally by the SavedTensorTracker.

    The breakdown itself is cached: every source above carries a version that
    changes with its content, and `assemble` recomputes only when one did (a
    phase edge of an untracked step usually finds nothing new).
    """

    PARAM_REFRESH_S = 1.0
    PARAM_WALK_S = 10.0  # the module tree is walked again at least this often (writes no hook sees)
    OPT_REFRESH_S = 1.0
    GRAD_FULL_READ_S = 1.0  # re-reads that reuse the last full read's storage sizes, for at most this long
    # A job whose gradients every backward has found as the last full read left them, for this long, has
    # them derived between checks this far apart (read_grads): each look at every parameter costs a
    # launch-bound step about 0.3 % (bench/bench_agent.py).
    GRAD_CHECK_S = 1.0

    def __init__(self, model=None, optimizer=None, saved=None):
        self._model_ref = None
        self._opt_refs: list = []  # weakrefs, oldest first
        self.saved = saved
        self.grads = StorageLedger(global_latest=False)  # owner: id(param); in the breakdown's key by itself
        self._grad_params: dict = {}  # id(param) -> weakref(param), params that have a grad entry
        self._grad_params_shared: dict | None = None  # the re-read's dict, shared with _plain_grads: copy to change
        # Weak references to the gradient tensors the last read found, one per `_grad_params` entry, and the
        # list each one's death appends it to (None when the entries changed since): when that list is as
        # long as the first, zero_grad freed them all (sync_grads).
        self._grad_refs: tuple[list, list] | None = None
        self._opt_ledgers: dict = {}  # id(optimizer) -> (ledger, n states, monotonic time of the walk, its print)
        self._params_at = -1e9
        self._walked_at = -1e9
        self._module_ids: frozenset = frozenset()  # id() of the model's modules at the last walk (registrations)
        # What the once-a-second re-check compares: the last walk's parameters and buffers (weakly) and what
        # it read of them, and how many module or buffer registrations the process had seen by then; None
        # when every re-check must walk (quantized weights).
        self._params_print: tuple | None = None
        self._params_dirty = True
        # Bumped by every invalidation: a refresh that raced one (the I/O thread
        # refreshing while the training thread adopts the model) stays dirty.
        self._params_gen = 0
        self._param_refs: list = []  # weakrefs to the parameter objects
        # (weakrefs, ids, device names) of every parameter: what read_grads walks
        self._grad_slots: tuple[list, list, list] = ([], [], [])
        self._grad_devices: frozenset = frozenset()
        self._plain_grads: tuple | None = None  # what read_grads may reuse from its last full read
        # Derived gradients (read_grads): since when every check found them as the last full read left them
        # (None: not regular, or not yet checked), and the last check (the state it found, its time).
        self._grads_regular_since: float | None = None
        self._grads_checked: tuple | None = None
        self._grads_irregular = False  # a check found them otherwise: read at every backward from then on
        self._bwd_derived = False  # the last backward end was derived: no weak references for sync_grads
        # What a forward start found after a read backward, for the first micro-step of an optimizer step
        # (True) and for the later ones (False): "freed" (zero_grad(set_to_none)) or "kept".
        self._forward_start_found: dict[bool, str] = {}
        self.grads_derived = False  # the gradient block now comes from a derived backward end
        self.derived_reads = 0  # backward ends derived (tests, bench)
        self.reused_reads = 0  # gradient reads that reused the last full read's sizes (tests, bench)
        self._grads_named_version = -1  # the gradient ledger's version when a re-read filled it with names
        self._params_version = 0  # bumped when refresh_params found another parameter set or layout
        self._bd_key: tuple | None = None  # the versions the cached breakdown was assembled from
        self._bd: Breakdown | None = None
        self._by_content: dict[tuple, Breakdown] = {}  # recent breakdowns by what they were made of
        self._by_key: dict[tuple, Breakdown] = {}  # recent breakdowns by the versions they were made from
        self._param_ids: frozenset = frozenset()
        self._param_bd = Breakdown()
        self.param_keys: frozenset = frozenset()
        self._buffer_entries: list = []
        _watch_registrations(self)
        self.model = model
        if optimizer is not None:
            self.add_optimizer(optimizer)

    # ------------------------------------------------------------------ what is watched

    @property
    def model(self):
        ref = self._model_ref
        return ref() if ref is not None else None

    @model.setter
    def model(self, model) -> None:
        self._model_ref = weakref.ref(model) if model is not None else None
        self.invalidate()

    def optimizers(self) -> list:
        """The adopted optimizers still alive, oldest first."""
        out = []
        for ref in self._opt_refs:
            opt = ref()
            if opt is not None:
                out.append(opt)
        return out

    @property
    def optimizer(self):
        """The newest adopted optimizer still alive (the one a hello describes)."""
        for ref in reversed(self._opt_refs):
            opt = ref()
            if opt is not None:
                return opt
        return None

    @optimizer.setter
    def optimizer(self, opt) -> None:
        if opt is not None:
            self.add_optimizer(opt)

    def has_optimizer(self, opt) -> bool:
        """True when `opt` is adopted (O(1): the ledgers are keyed by id, and a dead optimizer's is removed)."""
        return id(opt) in self._opt_ledgers

    def add_optimizer(self, opt) -> bool:
        """Count this optimizer's states too; False when it was already counted."""
        if self.has_optimizer(opt):
            return False
        key = id(opt)

        self_ref = weakref.ref(self)  # the optimizer's weakref callback must not keep the accountant alive

        def gone(_ref, self_ref=self_ref, key=key):
            acct = self_ref()
            if acct is not None:
                acct._opt_ledgers.pop(key, None)
                acct._opt_refs = [r for r in acct._opt_refs if r() is not None]
                acct.mark_params_dirty()

        self._opt_refs.append(weakref.ref(opt, gone))
        self._opt_ledgers[key] = (StorageLedger(), -1, -1e9, None)
        self.mark_params_dirty()
        return True

    def steps_params_of_model(self, opt) -> bool:
        """True when `opt` trains a parameter of the watched model."""
        if self._params_dirty or not self._param_ids:
            self.refresh_params()
        ids = self._model_param_ids
        for group in list(opt.param_groups):
            for p in group.get("params", ()):
                if id(p) in ids:
                    return True
        return False

    def mark_params_dirty(self) -> None:
        """The parameter set may have changed: re-walk it on next use (any thread)."""
        self._params_gen += 1
        self._params_dirty = True

    def invalidate(self) -> None:
        """The model or an optimizer changed: rebuild every cache on next use."""
        self.mark_params_dirty()
        self.forget_breakdown()
        self.grads.clear()
        self._grad_params = {}
        self._grad_refs = None
        self._plain_grads = None
        self._not_regular(irregular=False)
        self._forward_start_found = {}
        for key, (ledger, _, _, _) in list(self._opt_ledgers.items()):
            self._opt_ledgers[key] = (ledger, -1, -1e9, None)

    # ------------------------------------------------------------------ parameters

    def param_objects(self) -> list:
        model = self.model
        params = list(model.parameters()) if model is not None else []
        self._model_param_ids = frozenset(id(p) for p in params)
        known = set(self._model_param_ids)
        for opt in self.optimizers():
            # Parameters the optimizer trains but the model does not own (rare, but count them).
            for group in list(opt.param_groups):
                for p in group.get("params", ()):
                    if id(p) not in known:
                        params.append(p)
                        known.add(id(p))
        return params

    def recheck_params(self) -> None:
        """The periodic re-check (training thread): the full walk only when the parameters and buffers the
        last walk found are not all still there on the same storages of the same sizes."""
        now = time.monotonic()
        if self._params_dirty or now - self._walked_at > self.PARAM_WALK_S or not self._params_unchanged():
            self.refresh_params()
        else:
            self._params_at = now

    def _params_unchanged(self) -> bool:
        printed = self._params_print
        if printed is None or printed[0] != _REGISTRATIONS[0]:  # (a module or buffer registered since)
            return False
        _, refs, buffer_refs, last = printed
        try:
            params = list(map(_call, refs))
            buffers = list(map(_call, buffer_refs))
            if any(map(_is, params, _NONES)) or any(map(_is, buffers, _NONES)):
                return False
            return self._print_params(params, buffers) == last
        except Exception:
            return False

    def _print_params(self, params: list, buffers: list) -> tuple:
        """What a re-check compares (C-level maps): storages, their sizes, requires_grad, optimizer groups."""
        storages = list(map(_untyped_storage, params + buffers))
        groups = [len(g.get("params", ())) for opt in self.optimizers() for g in list(opt.param_groups)]
        return (list(map(_cdata, storages)), list(map(_storage_nbytes, storages)),
                list(map(_get_requires_grad, params)), groups)

    def refresh_params(self) -> None:
        """Walk the model's (and the optimizers') parameters and the model's buffers."""
        if not _FAST_BOUND:
            _bind_fast_paths()
        gen = self._params_gen
        registrations = _REGISTRATIONS[0]
        objs = self.param_objects()
        bd = Breakdown()
        seen: set = set()
        quantized = False
        for p in objs:
            key, nbytes, dev = storage_key(p)
            if key not in seen:
                seen.add(key)
                bd.add(dev, "parameters", nbytes)
                if p.requires_grad:
                    bd.trainable += nbytes
                else:
                    bd.frozen += nbytes
                    if p.dtype.itemsize == 1 or _quant_state_tensors(p):
                        bd.quantized += nbytes
            for q in _quant_state_tensors(p):
                quantized = True
                try:
                    qkey, qbytes, qdev = storage_key(q)
                except Exception:
                    continue
                if qkey not in seen:
                    seen.add(qkey)
                    bd.add(qdev, "parameters", qbytes)
                    bd.frozen += qbytes
                    bd.quantized += qbytes
        refs = [weakref.ref(p) for p in objs]
        self._param_refs = refs
        # What read_grads walks, as parallel lists for its C-level maps (grad.device == p.device).
        self._grad_slots = (refs, [id(p) for p in objs], [device_name(p.device) for p in objs])
        self._plain_grads = None
        self._grad_devices = frozenset(self._grad_slots[2])
        self._param_ids = frozenset(id(p) for p in objs)
        # A replaced parameter's gradient is no longer ours.
        for pid in [pid for pid in self._grad_params if pid not in self._param_ids]:
            self._owned_grad_params().pop(pid, None)
            self.grads.drop(pid)
        model = self.model
        entries = []
        buffers = []
        self._module_ids = frozenset(map(id, model.modules())) if model is not None else frozenset()
        _share_watched_modules()
        if model is not None:
            for b in model.buffers():
                try:
                    entries.append(storage_key(b))
                    buffers.append(b)
                except Exception:
                    pass
        try:  # (bitsandbytes keeps part of a weight beside it: such a model is walked at every re-check)
            self._params_print = None if quantized else (
                registrations, refs, [weakref.ref(b) for b in buffers], self._print_params(objs, buffers))
        except Exception:
            self._params_print = None
        keys = frozenset(seen)
        old = self._param_bd
        if (keys != self.param_keys or entries != self._buffer_entries or bd.devices != old.devices
                or (bd.trainable, bd.frozen, bd.quantized) != (old.trainable, old.frozen, old.quantized)):
            # Something changed (the once-a-second re-walk usually finds nothing): a new breakdown then.
            self._param_bd = bd
            self.param_keys = keys
            self._buffer_entries = entries
            self._params_version += 1
            self._not_regular(irregular=False)  # (another parameter set: its gradients are checked again)
        if self.saved is not None:
            self.saved.exclude = self.param_keys
        self._params_dirty = gen != self._params_gen
        self._params_at = self._walked_at = time.monotonic()

    def _maybe_refresh_params(self, training_thread: bool) -> None:
        if self._params_dirty:
            self.refresh_params()
        elif training_thread and time.monotonic() - self._params_at > self.PARAM_REFRESH_S:
            self.recheck_params()

    # ------------------------------------------------------------------ gradients

    def note_grad(self, param) -> None:
        """Post-accumulate-grad hook (tracked steps): runs on the thread that just wrote param.grad."""
        g = param.grad
        pid = id(param)
        self._bwd_derived = self.grads_derived = False
        if g is None:
            self._owned_grad_params().pop(pid, None)
            self.grads.drop(pid)
            return
        if pid not in self._grad_params:
            self._owned_grad_params()[pid] = weakref.ref(param)
        s = g.untyped_storage()
        self.grads.set(pid, s._cdata, s.nbytes(), device_name(g.device))

    def read_grads(self, full: bool = False) -> None:
        """Read every watched parameter's .grad once, in one pass, or derive them (below).

        At the end of a backward (autograd's final callback: no node of it is
        running) or on the training thread with no backward running. Builds
        the whole gradient ledger in one go; when it finds what the ledger
        already holds (the per-parameter hooks of a tracked step saw every
        gradient land, or `zero_grad(set_to_none=False)` kept the tensors)
        the ledger, and so the cached breakdown, stay as they are.

        This runs once per backward on the training thread of a launch-bound
        job, so the per-parameter work is done by C-level `map`s over method
        descriptors rather than by a Python loop body per parameter. Between
        full reads (`full`, and at least once a second) a re-read that finds
        the same parameters with gradients, none a view (of a bucket), keeps
        the last full read's totals without looking up every storage, when
        that read found each gradient a tensor owning exactly its storage:
        such a gradient is a new allocation of the same bytes (zero_grad
        freed the last one). A gradient's shape and dtype are its parameter's
        (autograd and the `.grad` setter refuse others), so its size changes
        only with the model, which the parameter walk re-reads (at least once
        a second, and that ends the reuse). Anything else takes the full read.

        Derived: once every backward for GRAD_CHECK_S has found the gradients
        as the last full read left them (a dense model's do, step after step),
        a backward end between checks (GRAD_CHECK_S apart, and every full read)
        takes that state without looking at the parameters (`grads_derived`:
        samples and steps say so). A check that finds them otherwise (an MoE
        expert that got no tokens, a gradient dropped or made a view by the
        job) makes every later backward a read, until the parameter set
        changes. Tracked steps and `full` always read.
        """
        refs, pids, devs = self._grad_slots
        checked = self._grads_checked
        plain = self._plain_grads
        if not full and checked is not None and plain is not None and checked[0] is plain:
            now = time.monotonic()
            since = self._grads_regular_since
            if since is not None and now - checked[1] < self.GRAD_CHECK_S and now - since >= self.GRAD_CHECK_S:
                self._grad_params = self._grad_params_shared = plain[3]
                self._grad_refs = None
                self._bwd_derived = self.grads_derived = True
                self.derived_reads += 1
                self._take_plain(plain)
                return
        self._bwd_derived = self.grads_derived = False
        try:
            grads = list(map(_get_grad, map(_call, refs)))  # (one C-level pass)
        except AttributeError:  # a parameter died since the last walk (its weakref gave None): skip it
            params = list(map(_call, refs))
            keep = [i for i, p in enumerate(params) if p is not None]
            refs, pids, devs = [refs[i] for i in keep], [pids[i] for i in keep], [devs[i] for i in keep]
            grads = list(map(_get_grad, [params[i] for i in keep]))
        plain = self._plain_grads
        if plain is not None and plain[0] is not pids:
            plain = None  # (another parameter set: not comparable)
        if plain is not None and not full and time.monotonic() - plain[4] < self.GRAD_FULL_READ_S:
            # Which parameters have a gradient, and that none is a view (of a bucket: its storage, not its
            # size, counts), is checked here; not the sizes: a gradient's shape and dtype are its parameter's
            # (autograd and the .grad setter refuse others), and each attribute read per gradient costs a
            # launch-bound step about half a percent (bench/bench_agent.py).
            weak = None
            if plain[7]:  # every parameter had a gradient: one pass makes the weak references and finds a None
                dead: list = []
                try:
                    weak = list(map(_weakref, grads, itertools.repeat(dead.append))), dead
                except TypeError:  # (a None: weakref.ref refuses it)
                    weak = None
                same = weak is not None
                live = grads
            else:
                present = list(map(_is_not, grads, _NONES))
                same = present == plain[1]
                live = list(itertools.compress(grads, present)) if same else []
                if same:
                    weak = _weakrefs(live)
            if same and not any(map(_is_not, map(_get_base, live), _NONES)):
                self._grad_params = self._grad_params_shared = plain[3]
                self._grad_refs = weak
                self.reused_reads += 1
                self._take_plain(plain)
                self._checked_regular()
                return
            self._not_regular(irregular=True)  # (the same parameters, other gradients: read from now on)
        if any(map(_is, grads, _NONES)):  # (not `None in grads`: that would compare tensors with ==)
            keep = [i for i, g in enumerate(grads) if g is not None]
            refs, pids_kept, devs = [refs[i] for i in keep], [pids[i] for i in keep], [devs[i] for i in keep]
            grads_kept = [grads[i] for i in keep]
        else:
            pids_kept, grads_kept = pids, grads
        storages = list(map(_untyped_storage, grads_kept))
        keys = list(map(_cdata, storages))
        self._grad_params = dict(zip(pids_kept, refs))
        self._grad_refs = _weakrefs(grads_kept)
        if not self.grads.holds_bulk(pids_kept, keys):
            sizes = list(map(_storage_nbytes, storages))
            # Views of one buffer (DDP's gradient buckets, tied weights): the storage counts once.
            shared = len(set(keys)) != len(keys)
            if not shared and len(self._grad_devices) == 1:
                totals = {devs[0]: sum(sizes)} if devs else {}
            else:
                totals = {}
                for n, d in (dict(zip(keys, zip(sizes, devs))).values() if shared else zip(sizes, devs)):
                    totals[d] = totals.get(d, 0) + n
            self.grads.replace_bulk(pids_kept, keys, sizes, devs, totals)
        self._plain_grads = self._plain_read(pids, grads, pids_kept, keys, devs)
        if plain is not None and (list(map(_is_not, grads, _NONES)) != plain[1]
                                  or any(map(_is_not, map(_get_base, grads_kept), _NONES))):
            self._not_regular(irregular=True)  # (a full read found other gradients than the last one)

    def _take_plain(self, plain: tuple) -> None:
        """The gradient ledger as the full read behind `plain` left it (a re-read, or a derived one)."""
        if self.grads.version == plain[6]:
            return  # (unchanged since that read: nothing to do)
        if plain[6] < 0:  # the first re-read of this full read's state: a new version for it
            self.grads.replace_bulk(*plain[5])
            self._plain_grads = (*plain[:6], self.grads.version, plain[7])
        else:  # the same state again: its version again (the cached breakdown still holds)
            owners, keys, sizes, devs, totals, keyset = plain[5]
            self.grads.replace_bulk(owners, keys, sizes, devs, totals, keyset, version=plain[6])
        self._grads_named_version = self.grads.version

    def _checked_regular(self) -> None:
        """A re-read found the gradients as the last full read left them."""
        if self._grads_irregular:
            return
        now = time.monotonic()
        if self._grads_regular_since is None:
            self._grads_regular_since = now
        self._grads_checked = (self._plain_grads, now)

    def _not_regular(self, irregular: bool) -> None:
        """Stop deriving gradients: for good (`irregular`: a check found them other than derived) or until
        the next checks (another parameter set, model or optimizer)."""
        self._grads_regular_since = None
        self._grads_checked = None
        self._grads_irregular = irregular
        if irregular:
            self._forward_start_found = {}

    def _plain_read(self, pids: list, grads: list, pids_kept: list, keys: list, devs: list) -> tuple | None:
        """What a later re-read may reuse from this full read, or None when these gradients are not each
        a tensor owning exactly its storage (views, shared storages, padding): then every read is full."""
        live = [g for g in grads if g is not None]
        if any(map(_is_not, map(_get_base, live), _NONES)) or len(set(keys)) != len(keys):
            return None
        nbytes = list(map(_get_nbytes, live))
        bulk = self.grads._bulk
        if bulk is None or bulk[2] != nbytes:
            return None  # a storage larger than its tensor: its size can't be told from the tensor
        # The ledger keeps this read's storage keys: later re-reads reuse them as names only (negative:
        # never a live storage's address, so no false overlap with parameters, states or saved tensors).
        names = [-1 - i for i in range(len(keys))]
        state = (pids_kept, names, bulk[2], devs, dict(self.grads.totals()), frozenset(names))
        present = list(map(_is_not, grads, _NONES))
        return (pids, present, nbytes, dict(self._grad_params), time.monotonic(), state, -1, all(present))

    def sync_grads(self, first_micro_step: bool = True) -> None:
        """Drop the gradients that are gone (zero_grad(set_to_none)); training thread only, no backward running.

        Looks only at the parameters that have a gradient entry: after `zero_grad()` all of them are gone
        and the ledger is emptied at once. That case, every step's, is told without touching a parameter:
        the weak references to the gradient tensors the last read found are all dead (zero_grad freed
        them). A gradient assigned by hand between zero_grad and this forward (`p.grad = t`) is then seen
        at the next read, as one assigned after a backward is.

        After a derived backward end (read_grads: no weak references were made) the forward start is
        derived too: what the forward starts after read backwards found, for the first micro-step of an
        optimizer step (`first_micro_step`) or a later one (gradient accumulation keeps them). Found
        otherwise at a read one (some freed and some kept, or not as before), the job's gradients are read
        from then on."""
        held = self._grad_params
        if not held:
            return
        if self._bwd_derived:
            self._bwd_derived = False
            found = self._forward_start_found.get(first_micro_step)
            if found == "freed":
                self._grad_params = {}
                self._grad_refs = None
                self.grads.clear()
                return
            if found == "kept":
                return
        refs = self._grad_refs
        if refs is not None and len(refs[1]) == len(refs[0]):  # every one died: nothing touched but two lists
            self._found_at_forward_start(first_micro_step, "freed")
            self._grad_params = {}
            self._grad_refs = None
            self.grads.clear()
            return
        try:
            grads = list(map(_get_grad, map(_call, held.values())))  # (one C-level pass)
        except AttributeError:  # a parameter died: its gradient with it
            grads = [None if p is None else p.grad for p in map(_call, held.values())]
        gone_n = sum(map(_is, grads, _NONES))
        if not gone_n:
            self._found_at_forward_start(first_micro_step, "kept")
            return
        if gone_n == len(grads):
            self._found_at_forward_start(first_micro_step, "freed")
            self._grad_params = {}
            self._grad_refs = None
            self.grads.clear()
            return
        self._found_at_forward_start(first_micro_step, None)
        held = self._owned_grad_params()
        for pid, g in zip(list(held), grads):
            if g is None:
                held.pop(pid, None)
                self.grads.drop(pid)

    def _found_at_forward_start(self, first_micro_step: bool, found: str | None) -> None:
        """What a forward start found of the gradients (None: some freed, some kept)."""
        before = self._forward_start_found.get(first_micro_step)
        if found is None or (before is not None and before != found):
            self._not_regular(irregular=True)
        else:
            self._forward_start_found[first_micro_step] = found

    def _owned_grad_params(self) -> dict:
        """`_grad_params` to change in place (a re-read shares the full read's dict with later re-reads)."""
        self._grad_refs = None  # (they no longer match the entries one to one)
        if self._grad_params is self._grad_params_shared:
            self._grad_params = dict(self._grad_params)
        return self._grad_params

    def refresh_grads(self) -> None:
        """Re-read every .grad of the watched parameters; training thread only, no backward running."""
        self.read_grads(full=True)

    # ------------------------------------------------------------------ optimizer states

    def sync_optimizers(self, force: bool = False) -> None:
        """Re-walk an optimizer's states when their number changed, or once a second (training thread)."""
        now = time.monotonic()
        for opt in self.optimizers():
            ledger, n, at, printed = self._opt_ledgers.get(id(opt), (None, -1, 0.0, None))
            if ledger is None:
                continue
            count = len(opt.state)
            if force or count != n or now - at > self.OPT_REFRESH_S:
                self._opt_ledgers[id(opt)] = (ledger, count, now, _walk_states(opt, ledger, printed))

    refresh_optimizer = sync_optimizers

    # ------------------------------------------------------------------ breakdown

    def breakdown(self, fresh: bool = False, training_thread: bool | None = None) -> Breakdown:
        """Bytes per block and device.

        `fresh` (training thread only, no backward running): re-read every
        gradient and optimizer state. Otherwise the caches are used as they are.
        """
        if training_thread is None:
            training_thread = fresh
        self._maybe_refresh_params(training_thread)
        if fresh:
            self.refresh_grads()
            self.sync_optimizers(force=True)
        return self.assemble()

    def assemble(self) -> Breakdown:
        """The breakdown from the caches as they are (any thread).

        Cached: recomputed only when a source changed (its version). The
        result is shared with the cache: read it, never change it.
        """
        saved = self.saved
        # (the gradient ledger goes back to its earlier versions as its content does: see ledger.py)
        key = (self._params_version, self.grads.version, latest_version(), saved.version if saved is not None else 0)
        bd = self._bd
        if bd is not None and key == self._bd_key:
            return bd
        bd = self._by_key.get(key)
        if bd is not None:
            self._bd, self._bd_key = bd, key
            return bd
        ledgers = [entry[0] for entry in list(self._opt_ledgers.values())]
        content = self._content_key(ledgers)
        bd = self._by_content.get(content) if content is not None else None
        if bd is None:
            bd = self._assemble(ledgers)
            if content is not None:
                if len(self._by_content) >= 8:
                    self._by_content.clear()
                self._by_content[content] = bd
        if len(self._by_key) >= 8:
            self._by_key.clear()
        self._by_key[key] = bd
        self._bd, self._bd_key = bd, key
        return bd

    def forget_breakdown(self) -> None:
        """Assemble the next breakdown from the sources again (nothing cached is reused)."""
        self._bd_key = None
        self._by_key = {}
        self._by_content = {}

    def _content_key(self, ledgers: list[StorageLedger]) -> tuple | None:
        """What the breakdown depends on, by content rather than by version; None when it cannot be said cheaply.

        The gradient ledger gets new storages every step (emptied by zero_grad, refilled at backward end), so
        its version changes twice a step while the breakdown only alternates between two values. When no
        gradient storage is also a parameter, optimizer state or saved tensor (the usual case), the gradients
        contribute their totals per device and nothing else.
        """
        grads = self.grads
        gkeys = grads.keys()
        # (filled with names by a re-read: new storages of their own, see read_grads, so no overlap)
        if gkeys and grads.version != self._grads_named_version:
            if not gkeys.isdisjoint(self.param_keys):
                return None
            for ledger in ledgers:
                if not gkeys.isdisjoint(ledger.keys()):
                    return None
            if self.saved is not None and not gkeys.isdisjoint(self.saved._live.keys()):
                return None
        return (self._params_version, self.saved.version if self.saved is not None else 0,
                tuple(ledger.version for ledger in ledgers), tuple(grads.totals().items()))

    def _assemble(self, ledgers: list[StorageLedger]) -> Breakdown:
        pbd = self._param_bd
        bd = Breakdown(devices={d: dict(b) for d, b in pbd.devices.items()}, trainable=pbd.trainable,
                       frozen=pbd.frozen, quantized=pbd.quantized)
        pkeys = self.param_keys
        bd.param_keys = pkeys
        gkeys = self.grads.keys()
        for dev, nbytes in self.grads.totals(pkeys).items():
            if nbytes:
                bd.add(dev, "gradients", nbytes)
        opt_keys: list = []
        for ledger in ledgers:
            for dev, nbytes in ledger.totals(pkeys, gkeys, *opt_keys).items():
                if nbytes:
                    bd.add(dev, "optimizer", nbytes)
            opt_keys.append(ledger.keys())
        if self.saved is not None:
            for dev, nbytes in self.saved.live(gkeys, *opt_keys).items():
                if nbytes:
                    bd.add(dev, "activations", nbytes)
        # CPU has no allocator counter: the model's buffers are the "other" we can see.
        for key, nbytes, dev in self._buffer_entries:
            if key not in pkeys:
                bd.add(dev, "other", nbytes if dev == "cpu" else 0)
        return bd


_call = weakref.ref.__call__  # (operator.call is 3.11+)
_weakref = weakref.ref
_is = operator.is_
_is_not = operator.is_not
_get_base = operator.attrgetter("_base")
_get_nbytes = operator.attrgetter("nbytes")
_NONES = itertools.repeat(None)
_get_grad = operator.attrgetter("grad")
_get_requires_grad = operator.attrgetter("requires_grad")
_cdata = operator.attrgetter("_cdata")


def _weakrefs(tensors: list) -> tuple[list, list] | None:
    """Weak references to these tensors (one C-level pass) and the list their deaths append them to (a C
    method as the callback: no Python runs when zero_grad frees a gradient), or None where a tensor type
    refuses weak references."""
    dead: list = []
    try:
        return list(map(weakref.ref, tensors, itertools.repeat(dead.append))), dead
    except TypeError:
        return None


def _py_untyped_storage(t: Any) -> Any:
    return t.untyped_storage()


def _py_storage_nbytes(s: Any) -> int:
    return s.nbytes()


_untyped_storage: Callable[[Any], Any] = _py_untyped_storage
_storage_nbytes: Callable[[Any], int] = _py_storage_nbytes


_FAST_BOUND = False


def _bind_fast_paths() -> None:
    """C-level method descriptors for read_grads' maps (torch is imported only once a model is watched)."""
    global _untyped_storage, _storage_nbytes, _FAST_BOUND
    try:
        import torch

        _untyped_storage = torch.Tensor.untyped_storage
        _storage_nbytes = torch.UntypedStorage.nbytes
    except Exception:
        pass
    _FAST_BOUND = True


def _walk_states(opt, ledger: StorageLedger, last: tuple | None = None) -> tuple | None:
    """Put the optimizer's state tensors in the ledger; returns what a later walk compares with (`last`).

    Once a second on the training thread, over hundreds of states: the usual finding, the same tensors
    on the same storages of the same sizes, is told by C-level maps, and leaves the ledger (and its
    version, so every cached breakdown) as it is."""
    try:
        states = [s for s in list(opt.state.values()) if isinstance(s, dict)]
        tensors = [v for v in itertools.chain.from_iterable(map(dict.values, states)) if hasattr(v, "untyped_storage")]
        storages = list(map(_untyped_storage, tensors))
        printed: tuple | None = (list(map(id, tensors)), list(map(_cdata, storages)),
                                 list(map(_storage_nbytes, storages)))
    except Exception:  # (a state that has no storage to read: the walk below skips it)
        printed = None
    if printed is not None and printed == last:
        return printed
    ledger.clear()
    for state in list(opt.state.values()):
        if isinstance(state, dict):
            for v in list(state.values()):
                if hasattr(v, "untyped_storage"):
                    try:
                        s = v.untyped_storage()
                        ledger.set(id(v), s._cdata, s.nbytes(), device_name(v.device))
                    except Exception:
                        pass
    return printed


_ACCOUNTANTS: weakref.WeakSet = weakref.WeakSet()
_REGISTRATION_HOOK: list | None = None  # the hooks' handles, once registered
_REGISTRATIONS = [0]  # module and buffer registrations on a watched model's modules: a re-check walks after one
_WATCHED_MODULES: frozenset = frozenset()  # ids of every watched model's modules, as their last walks found them


def _share_watched_modules() -> None:
    """The module ids the registration hook counts: every live accountant's, as its last walk found them."""
    global _WATCHED_MODULES
    _WATCHED_MODULES = frozenset().union(*(a._module_ids for a in list(_ACCOUNTANTS)))


def _watch_registrations(acct: Accountant) -> None:
    """Process-wide registration hooks: a parameter registered anywhere marks every accountant's parameter
    set stale (walked at the next edge); a module or buffer registered on one of a watched model's modules
    makes the next once-a-second re-check a walk (some models re-register a buffer in every forward: not
    a walk a step). Registrations on other modules are not counted: transformers builds a new ModuleList
    of the layers in every forward, and counting its four registrations made every re-check a walk."""
    global _REGISTRATION_HOOK
    _ACCOUNTANTS.add(acct)
    if _REGISTRATION_HOOK is not None:
        return
    try:
        from torch import compiler as torch_compiler
        from torch.nn.modules import module as torch_module
    except Exception:
        return

    def registered(module, name, value):
        for a in list(_ACCOUNTANTS):
            a.mark_params_dirty()
        return None

    def module_or_buffer_registered(module, name, value):
        # (Not while Dynamo traces a forward that registers: a side effect there would change the
        # compiled graph. A module that died and whose id a new one took: one walk too many.)
        if not torch_compiler.is_compiling() and id(module) in _WATCHED_MODULES:
            _REGISTRATIONS[0] += 1
        return None

    handles = []
    for register, hook in (("register_module_parameter_registration_hook", registered),
                           ("register_module_module_registration_hook", module_or_buffer_registered),
                           ("register_module_buffer_registration_hook", module_or_buffer_registered)):
        fn = getattr(torch_module, register, None)
        if fn is not None:
            handles.append(fn(hook))
    _REGISTRATION_HOOK = handles


def sum_unique(tensors: Iterable) -> int:
    """Reference sum used by tests and tools: distinct storages' bytes."""
    seen, total = set(), 0
    for t in tensors:
        key, nbytes, _ = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total
