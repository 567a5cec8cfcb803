"""--compile: the model trained under `torch.compile` (default inductor backend), estimated on the meta device.

The engine's model is wrapped in `torch.compile` with a backend that is inductor up to its code generation:
dynamo's graphs (and graph breaks), AOTAutograd's joint forward+backward graph with inductor's
decompositions, inductor's joint-graph passes and its partitioner (`min_cut_rematerialization_partition`),
so what autograd saves is what inductor's partitioner chose: the forward graph's saved outputs reach the
engine's saved-tensor hooks through the compiled function's `save_for_backward`, as they do in a real run.
Instead of inductor's kernels, the partitioned forward and backward graphs run op by op on the meta device
under the engine's recorder.

Three things stand between meta tensors and inductor, each handled here:
- dynamo does not trace under a dispatch mode unless it declares `ignore_compile_internals`: the recorder
  is off while compiling and on while the compiled graphs run;
- torch registers Python meta kernels for some composite ops (`nll_loss`, `dropout`, ...); under the Python
  dispatcher that tracing uses they shadow the composite's autograd on the meta device, and the loss's
  backward vanished from the joint graph. They are hidden while the backend traces;
- inductor leaves meta tensors alone (its pattern matcher skips them): the joint graph's fake tensors are
  relabelled as CPU tensors while inductor's passes and partitioner run, and back to meta afterwards.

What is approximated: inductor's kernels, their fusion and its memory planning. An element-wise op (or a
view) whose every consumer reads it inside a loop (another element-wise op or a reduction) is taken to be
fused into its consumers: its output is never allocated, and the tensors it reads stay alive until the
consumer that inlines it runs. An element-wise kernel writes its output in a buffer it reads that dies with it
and has the output's size and dtype (inductor's in-place reuse; in backward, of the saved tensors AOTAutograd
donates). Everything else (matmuls, attention kernels, reductions, scatters, graph outputs) is allocated as
the graph runs, in the partitioner's order, and freed after its last use. Not modelled: inductor's
reordering of a graph for peak memory (it changes backward peaks with checkpointing by a few percent either
way), its multi-output kernels, the CUDA backend's own fusion choices.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from vramtop_agent.estimator.execute import ExecutionError

NOTE = ("torch.compile (inductor, default mode, static shapes): what is saved for backward comes from "
        "inductor's own partitioner (min-cut recomputation on the joint graph); its kernels are not generated: "
        "element-wise chains are taken as fused and written in place where inductor can, its reordering for peak "
        "memory is not modelled (peaks approximate, a few percent with checkpointing)")

_FUSED = [0]   # > 0 while an op that inductor would fuse away runs: its outputs are not counted
_RAN = [0]     # compiled graphs run since the last reset (0 after a forward: dynamo fell back to eager)
_RECORDER: list = [None]   # the recorder in use (in-place reuse moves bytes between its storages)


class CompileError(ExecutionError):
    """torch.compile could not trace the model on the meta device (one line for the user)."""


def recorder_class(base: type) -> type:
    """The engine's recorder, on while compiled graphs run (off while dynamo compiles), blind to fused ops."""

    class CompiledRecorder(base):
        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

        def __enter__(self) -> Any:
            _RECORDER[0] = self
            return super().__enter__()

        def __exit__(self, *exc: Any) -> Any:
            _RECORDER[0] = None
            return super().__exit__(*exc)

        def note(self, t: Any) -> None:
            if not _FUSED[0]:
                super().note(t)

        def adopt(self, old: Any, new: Any) -> None:
            """`new` is written in `old`'s buffer (inductor's in-place reuse): old's bytes become new's, freed
            when new is."""
            key, st = old.untyped_storage()._cdata, new.untyped_storage()
            if key not in self.live or st._cdata in self.live:
                self.note(new)
                return
            self.level -= self.live.pop(key)
            self._refs.pop(key, None)   # the dropped weak reference never calls back
            if self.allocator is not None:
                self.allocator.free(key)
            self.note(new)

    return CompiledRecorder


def compile_model(model: Any) -> Any:
    """`torch.compile(model)` with the estimating backend; dynamo's failures become one line."""
    import torch

    compiled: Any = torch.compile(model, backend=_backend, dynamic=False)
    inner = compiled.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        from torch._dynamo.exc import TorchDynamoException

        _RAN[0] = 0
        # Every estimate builds a new model: without a higher limit dynamo would stop compiling after 8
        # and run the rest eagerly.
        with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20):
            try:
                out = inner(*args, **kwargs)
            except TorchDynamoException as exc:
                raise CompileError(f"torch.compile cannot trace this model on the meta device: "
                                   f"{_first_line(exc)}") from None
        if not _RAN[0]:
            raise CompileError("torch.compile ran this model eagerly (no graph was compiled): "
                               "nothing to estimate under --compile")
        return out

    compiled.forward = forward
    return compiled


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("backend="):
            return line[:300]
    return type(exc).__name__


# ------------------------------------------------------------------ the backend


def _backend(gm: Any, example_inputs: Any) -> Any:
    """inductor's compile_fx up to code generation: its decompositions, joint passes and partitioner."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch import config as functorch_config
    from torch._inductor import compile_fx
    from torch._inductor import config as inductor_config

    # Constant folding evaluates the constant part of the joint graph with real kernels: on the meta device
    # it folds everything. What it folds are constants (never saved), so it is left out.
    with functorch_config.patch(unlift_effect_tokens=True, force_non_lazy_backward_lowering=True), \
            inductor_config.patch(joint_graph_constant_folding=False), _composite_meta_kernels_hidden():
        return aot_autograd(fw_compiler=_runner, bw_compiler=_runner,
                            decompositions=compile_fx.select_decomp_table(), partition_fn=_partition,
                            keep_inference_input_mutations=True)(gm, example_inputs)


@contextlib.contextmanager
def _composite_meta_kernels_hidden() -> Iterator[None]:
    """Python meta kernels registered for composite ops run instead of the composite (and its autograd) when
    the Python dispatcher sees a meta tensor; hidden, the composite decomposes as it does on a real device."""
    import torch
    from torch._decomp import global_decomposition_table

    meta = torch._C.DispatchKey.Meta
    hidden: dict = {}
    for table in ("meta", "post_autograd", "pre_autograd"):
        for op in global_decomposition_table[table]:
            if (isinstance(op, torch._ops.OpOverload) and op not in hidden and meta in op.py_kernels
                    and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")):
                hidden[op] = op.py_kernels.pop(meta)
                op._dispatch_cache.clear()
    try:
        yield
    finally:
        for op, fn in hidden.items():
            op.py_kernels[meta] = fn
            op._dispatch_cache.clear()


def _fakes(graphs: list, extra: Any = ()) -> list:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree

    out = [t for t in extra if isinstance(t, FakeTensor)]
    for gm in graphs:
        for node in gm.graph.nodes:
            out += [t for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, FakeTensor)]
    return out


def _partition(gm: Any, joint_inputs: Any, **kwargs: Any) -> tuple:
    """inductor's partition_fn (joint-graph passes, then the min-cut partitioner) on the joint graph relabelled
    as CPU tensors (inductor skips meta ones); the two graphs it returns relabelled back to meta."""
    import torch
    from torch._inductor import compile_fx
    from torch.utils import _pytree as pytree

    cpu, meta = torch.device("cpu"), torch.device("meta")
    relabelled = [t for t in _fakes([gm], joint_inputs) if t.fake_device == meta]
    for t in relabelled:
        t.fake_device = cpu
    try:
        fw, bw = compile_fx.partition_fn(gm, joint_inputs, **kwargs)
    finally:
        for t in relabelled:
            t.fake_device = meta
    for t in _fakes([fw, bw]):
        if t.fake_device == cpu:
            t.fake_device = meta
    for g in (fw, bw):   # ops the passes inserted were told the CPU: they run on the meta device
        for node in g.graph.nodes:
            node.args, node.kwargs = pytree.tree_map_only(torch.device, lambda _: meta, (node.args, node.kwargs))
        g.recompile()
    return fw, bw


def _runner(gm: Any, example_inputs: Any) -> Callable:
    """The partitioned graph, run op by op under the recorder with inductor's fusion approximated."""
    from torch._dynamo.backends.debugging import boxed_nop

    _approximate_fusion(gm, _donated(gm))
    gm.recompile()
    run = boxed_nop(gm, example_inputs)

    def counted(args: list) -> Any:
        _RAN[0] += 1
        return run(args)

    counted._boxed_call = True  # type: ignore[attr-defined]  # AOTAutograd's calling convention
    return counted


# ------------------------------------------------------------------ inductor's fusion, approximated


def _loop_ops() -> set:
    """Ops inductor lowers to loops (fusible into their consumers) without the pointwise tag."""
    import torch

    aten, prims = torch.ops.aten, torch.ops.prims
    return {aten.constant_pad_nd.default, prims.iota.default, aten.scalar_tensor.default, aten.full.default,
            aten.gather.default, aten.index.Tensor, aten._unsafe_index.Tensor, aten._to_copy.default,
            aten.slice_scatter.default, aten.select_scatter.default, aten._unsafe_view.default}


def _tags(target: Any) -> tuple:
    return tuple(getattr(target, "tags", ()))


def _donated(gm: Any) -> set:
    """The backward graph's inputs AOTAutograd donates to inductor (saved tensors nothing else holds): inductor
    may write its outputs in their buffers."""
    from torch._inductor.utils import get_donated_idxs

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not any(n.name.startswith("tangents") for n in placeholders):
        return set()
    return {placeholders[i] for i in get_donated_idxs() or () if i < len(placeholders)}


def _approximate_fusion(gm: Any, donated: set) -> None:
    """Mark the ops inductor would fuse away, keep what they read alive until their consumer runs, and let a
    kernel write its output in a same-sized buffer that dies with it (see the module docstring)."""
    import torch

    loops = _loop_ops()
    pointwise, reduction = torch.Tag.pointwise, torch.Tag.reduction

    def is_view(node: Any) -> bool:
        return bool(getattr(node.target, "is_view", False))

    def fusible(node: Any) -> bool:
        return node.op == "call_function" and (pointwise in _tags(node.target) or node.target in loops
                                               or is_view(node))

    def reads_in_loop(node: Any) -> bool:
        return node.op == "call_function" and not is_view(node) and (
            pointwise in _tags(node.target) or reduction in _tags(node.target) or node.target in loops)

    nodes = list(gm.graph.nodes)
    fused: set = set()
    for node in reversed(nodes):
        if fusible(node) and all(reads_in_loop(u) or u in fused for u in node.users):
            fused.add(node)
    reads: dict = {}   # node -> the allocated tensors it reads, through fused ops
    keep: dict = {}
    for node in nodes:
        inputs = node.all_input_nodes
        reads[node] = set().union(*(reads[a] if a in fused else {a} for a in inputs)) if inputs else set()
        if node not in fused and node.op == "call_function":
            keep[node] = reads[node] - set(inputs)
    owner: dict = {}   # node -> the node whose buffer it is (views share their base's)
    last: dict = {}    # buffer owner -> index of its last reader
    for i, node in enumerate(nodes):
        owner[node] = owner.get(node.args[0], node) if is_view(node) and node.args else node
        for a in set(node.all_input_nodes) | keep.get(node, set()):
            last[owner.get(a, a)] = i
    taken: set = set()
    for i, node in enumerate(nodes):
        if node in fused:
            node.target = _wrap(node.target, fused=True)
            continue
        into = None
        if node.op == "call_function" and (pointwise in _tags(node.target) or node.target in loops):
            into = _reusable(node, reads[node], owner, last, i, fused, donated, taken)
        if into is not None:
            taken.add(into)
            node.target = _wrap(node.target, into=True)
            node.kwargs = {**node.kwargs, "_into": into}
        if keep.get(node):
            if into is None:
                node.target = _wrap(node.target)
            node.kwargs = {**node.kwargs, "_keep": tuple(keep[node])}


def _reusable(node: Any, reads: set, owner: dict, last: dict, index: int, fused: set, donated: set,
              taken: set) -> Any:
    """A buffer this kernel reads, dying here, of its output's size and dtype: inductor writes in it."""
    import torch

    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return None
    for a in sorted(reads, key=lambda n: n.name):
        buf = owner.get(a, a)
        val = buf.meta.get("val")
        if (buf in taken or buf in fused or last.get(buf) != index or not isinstance(val, torch.Tensor)
                or (buf.op == "placeholder" and buf not in donated) or buf.op not in ("placeholder", "call_function")
                or getattr(buf.target, "is_view", False)):
            continue
        if val.dtype == out.dtype and val.untyped_storage().nbytes() == out.untyped_storage().nbytes():
            return buf
    return None


def _wrap(op: Any, fused: bool = False, into: bool = False) -> Callable:
    """op, run so the recorder sees what inductor would allocate. `fused`: not at all. `_keep` (extra
    arguments): tensors a fused op reads are read when this op, which inlines it, runs (the graph frees a value
    after its last use). `_into`: the output is written in that tensor's buffer."""

    def wrapped(*args: Any, _keep: tuple = (), _into: Any = None, **kwargs: Any) -> Any:
        if not (fused or into):
            return op(*args, **kwargs)
        _FUSED[0] += 1
        try:
            out = op(*args, **kwargs)
        finally:
            _FUSED[0] -= 1
        if into and _RECORDER[0] is not None:
            _RECORDER[0].adopt(_into, out)
        return out

    wrapped.__name__ = ("fused_" if fused else "inplace_" if into else "keeping_") + str(op).replace(".", "_")
    return wrapped
