"""A symbolic autograd: sizes only, no data, no torch.

Activation memory is not a property of the architecture alone: it is the set
of tensors autograd *saves* for backward, and what autograd saves depends on
which inputs of each op require grad (a frozen linear layer does not keep its
input; a mul keeps its other operand only if this one needs a gradient). The
closed-form formulas (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", sec. 4.1: 34·s·b·h + 5·a·s²·b per
layer in 16-bit) assume one fixed implementation with every op trainable.
To match what HF transformers really keeps for full, LoRA and QLoRA runs, the
model code in `activations.py` is replayed here op by op with the same
saving rules as PyTorch's derivatives.yaml, storages are reference-counted
like the caching allocator sees them, and backward is replayed in reverse so
the peak (loss spike, gradients growing while activations shrink,
checkpoint recomputation) comes out of the same walk.

Everything is counted in bytes of whole storages: two views of one storage
count once, exactly as the agent deduplicates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class Storage:
    """One allocation. Alive while Python holds it or a graph node saved it."""

    __slots__ = ("nbytes", "tag", "py", "saves", "alive", "kind")

    def __init__(self, nbytes: int, tag: str, kind: str = "act"):
        self.nbytes = int(nbytes)
        self.tag = tag
        self.py = 0        # Python references (locals, returned outputs)
        self.saves = 0     # graph nodes that saved it for backward
        self.alive = False
        self.kind = kind   # "act" | "param" | "grad" | "input"


class Sym:
    """A symbolic tensor: element count, bytes per element, requires_grad, storage."""

    __slots__ = ("numel", "itemsize", "rg", "st", "is_param", "name")

    def __init__(self, numel: int, itemsize: int, rg: bool, st: Storage, is_param: bool = False, name: str = ""):
        self.numel = int(numel)
        self.itemsize = int(itemsize)
        self.rg = rg
        self.st = st
        self.is_param = is_param
        self.name = name

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class Node:
    """One autograd node: what it saved, which inputs get a gradient."""

    tag: str
    inputs: list              # Sym inputs that require grad (grads flow to these)
    outputs: list             # Sym outputs
    saved: list               # Storage saved for backward (activations)
    passthrough: bool = False  # backward hands the incoming gradient on unchanged (add, view, contiguous)
    bwd_extra: int = 0        # transient bytes inside this node's backward (e.g. a dequantized weight)
    region: int | None = None  # checkpoint region id


@dataclass
class Region:
    """A gradient-checkpointed block: nodes whose saved tensors are dropped at forward."""

    rid: int
    nodes: list = field(default_factory=list)
    recomputed: bool = False


class Graph:
    """Forward recorder + backward replayer with a running allocation level."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.level = 0            # bytes alive (activations, transients, activation grads, param grads)
        self.peak = 0
        self.phase_peak = {"forward": 0, "backward": 0}
        self.phase = "forward"
        self.param_grad_bytes = 0
        # ZeRO-2/3: each rank keeps 1/N of every gradient (reduce-scattered as backward goes).
        self.grad_divisor = 1
        self._region: Region | None = None
        self._regions: list[Region] = []
        self._param_grads: dict[int, Storage] = {}

    # ----------------------------------------------------------- allocation

    def _alloc(self, st: Storage) -> None:
        if not st.alive:
            st.alive = True
            self.level += st.nbytes
            self._note()

    def _maybe_free(self, st: Storage) -> None:
        if st.alive and st.py <= 0 and st.saves <= 0:
            st.alive = False
            self.level -= st.nbytes

    def _note(self, extra: int = 0) -> None:
        lvl = self.level + extra
        if lvl > self.peak:
            self.peak = lvl
        if lvl > self.phase_peak[self.phase]:
            self.phase_peak[self.phase] = lvl

    def new(self, numel: int, itemsize: int, tag: str, rg: bool = False, kind: str = "act") -> Sym:
        """A fresh tensor held by one Python reference."""
        st = Storage(numel * itemsize, tag, kind)
        st.py = 1
        self._alloc(st)
        return Sym(numel, itemsize, rg, st)

    def param(self, numel: int, itemsize: int, trainable: bool, name: str = "") -> Sym:
        """A parameter: its storage is static memory, never an activation."""
        st = Storage(numel * itemsize, name, "param")
        return Sym(numel, itemsize, trainable, st, is_param=True, name=name)

    def input(self, numel: int, itemsize: int, tag: str) -> Sym:
        """A batch tensor that exists before forward (counted with the static inputs)."""
        st = Storage(numel * itemsize, tag, "input")
        return Sym(numel, itemsize, False, st)

    def keep(self, x: Sym) -> Sym:
        """One more Python reference (e.g. `residual = hidden_states`)."""
        x.st.py += 1
        return x

    def drop(self, *xs: Sym) -> None:
        """A Python reference goes away (a local is rebound or goes out of scope)."""
        for x in xs:
            if x is None or x.st.kind in ("param", "input"):
                continue
            x.st.py -= 1
            self._maybe_free(x.st)

    # ----------------------------------------------------------- recording

    def op(self, tag: str, inputs: list, out_numel: int, out_itemsize: int, save: Sequence[Sym] = (),
           save_out: bool = False, passthrough: bool = False, fwd_extra: int = 0, bwd_extra: int = 0) -> Sym:
        """Record an op. `save` lists the inputs autograd keeps *given* the
        requires_grad pattern (callers apply each op's rule); `save_out` keeps
        the output (softmax, rsqrt, tanh). `fwd_extra` is a transient inside
        the op, freed before it returns (e.g. a dequantized weight)."""
        rg = any(i.rg for i in inputs)
        out = self.new(out_numel, out_itemsize, tag, rg)
        if fwd_extra:
            self._note(fwd_extra)
        if rg:
            self._record(tag, inputs, [out], list(save) + ([out] if save_out else []), passthrough, bwd_extra)
        return out

    def record(self, tag: str, inputs: list, outputs: list, save: list, passthrough: bool = False,
               bwd_extra: int = 0) -> None:
        """Record a node whose outputs were created separately (multi-output ops)."""
        rg = any(i.rg for i in inputs)
        for o in outputs:
            o.rg = rg
        if rg:
            self._record(tag, inputs, outputs, save, passthrough, bwd_extra)

    def _record(self, tag, inputs, outputs, save, passthrough, bwd_extra) -> None:
        saved = []
        seen = set()
        for s in save:
            st = s.st if isinstance(s, Sym) else s
            if st.kind == "param" or id(st) in seen:
                continue  # weights saved by a layer are parameters, not activations
            seen.add(id(st))
            saved.append(st)
        node = Node(tag, [i for i in inputs if i.rg], outputs, saved, passthrough, bwd_extra,
                    self._region.rid if self._region else None)
        if self._region is None:
            for st in saved:
                st.saves += 1
        else:
            # Inside a checkpointed block the saved tensors are not kept (the
            # checkpoint's own saved_tensors_hooks pack a placeholder); they come
            # back when backward recomputes the block.
            self._region.nodes.append(node)
        self.nodes.append(node)

    # ----------------------------------------------------------- checkpointing

    def begin_checkpoint(self, inputs: list) -> None:
        """torch.utils.checkpoint (non-reentrant): the region's tensor inputs are
        saved by a no-op Function *outside* the region; everything the region's
        own ops save is dropped and recomputed in backward."""
        region = Region(len(self._regions))
        self._regions.append(region)
        saver = Node("checkpoint inputs", [i for i in inputs if i.rg] or [], [], [], passthrough=True)
        for x in inputs:
            if x.st.kind != "param":
                saver.saved.append(x.st)
                x.st.saves += 1
        self.nodes.append(saver)
        self._region = region

    def end_checkpoint(self) -> None:
        self._region = None

    # ----------------------------------------------------------- queries

    def saved_storages(self) -> dict[int, Storage]:
        """Storages held by graph nodes right now (the activations block)."""
        out: dict[int, Storage] = {}
        for node in self.nodes:
            for st in node.saved:
                if st.saves > 0 and st.kind != "param":
                    out[id(st)] = st
        return out

    def saved_bytes_by_tag(self) -> dict[str, int]:
        """Activations at this moment, attributed to the first node that saved each storage."""
        by: dict[str, int] = {}
        counted: set = set()
        for node in self.nodes:
            for st in node.saved:
                if st.saves > 0 and id(st) not in counted:
                    counted.add(id(st))
                    by[node.tag] = by.get(node.tag, 0) + st.nbytes
        return by

    # ----------------------------------------------------------- backward

    def backward(self, loss: Sym, grad_accum_existing: bool = False) -> None:
        """Replay autograd's engine: nodes in reverse creation order, gradients
        allocated when produced and freed when consumed, saved tensors
        released after their node ran, checkpointed regions recomputed on
        first use. `grad_accum_existing`: parameter grads already exist
        (gradient accumulation), so new ones are transient and added in place."""
        self.phase = "backward"
        grads: dict[int, Storage] = {}   # id(Sym) -> grad storage
        seed = Storage(loss.nbytes, "grad of loss", "grad")
        self._alloc(seed)
        seed.py = 1
        grads[id(loss)] = seed
        regions_by_id = {r.rid: r for r in self._regions}

        for node in reversed(self.nodes):
            out_grads = [grads.get(id(o)) for o in node.outputs]
            if node.outputs and not any(out_grads):
                continue  # not on the path to the loss
            if node.region is not None:
                region = regions_by_id[node.region]
                if not region.recomputed:
                    # Recompute the whole block's forward: its saved tensors come back at once.
                    region.recomputed = True
                    for n in region.nodes:
                        for st in n.saved:
                            st.saves += 1
                            self._alloc(st)
            new_grads: list[Storage] = []
            transient = 0
            if node.passthrough:
                # The incoming gradient object is handed to every input unchanged.
                g = next((g for g in out_grads if g is not None), None)
                for inp in node.inputs:
                    if g is None:
                        break
                    if inp.is_param:
                        transient += self._param_grad(inp, grad_accum_existing)
                    elif id(inp) in grads:
                        transient += g.nbytes  # summed into the existing buffer
                    else:
                        g.py += 1
                        grads[id(inp)] = g
            else:
                for inp in node.inputs:
                    if inp.is_param:
                        transient += self._param_grad(inp, grad_accum_existing)
                        continue
                    if id(inp) in grads:
                        transient += inp.nbytes  # computed, then added into the buffer, then freed
                        continue
                    gst = Storage(inp.nbytes, f"grad of {node.tag}", "grad")
                    gst.py = 1
                    self._alloc(gst)
                    grads[id(inp)] = gst
                    new_grads.append(gst)
            self._note(transient + node.bwd_extra)
            # The node ran: its saved tensors and the gradients it consumed go away.
            for st in node.saved:
                st.saves -= 1
                self._maybe_free(st)
            for o, g in zip(node.outputs, out_grads):
                if g is not None:
                    g.py -= 1
                    self._maybe_free(g)
                    grads.pop(id(o), None)
        for g in list(grads.values()):
            g.py = 0
            self._maybe_free(g)

    def _param_grad(self, p: Sym, accumulate: bool) -> int:
        """AccumulateGrad: the first gradient is stolen into .grad (stays), a later one is added in place."""
        nbytes = -(-p.nbytes // self.grad_divisor)
        if accumulate or id(p.st) in self._param_grads:
            return nbytes
        st = Storage(nbytes, f"grad {p.name}", "grad")
        st.py = 1  # held by .grad
        self._param_grads[id(p.st)] = st
        self._alloc(st)
        self.param_grad_bytes += st.nbytes
        return 0
