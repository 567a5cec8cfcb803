"""Estimate by executing: the real architecture on the meta device, one training step, every storage counted.

The formula path (`activations.py`) knows two graphs by hand. This path knows any model
transformers can build: it builds the model from its config on the meta device (shapes and
dtypes, no memory), applies the real PEFT adapters, stands in for bitsandbytes 4-bit weights
with real `Linear4bit` modules whose packed weights and quant-state constants have their true
sizes (bitsandbytes' own fake kernels make the 16-bit dequantized weight of each matmul), and
runs two training steps (forward, backward, the real torch optimizer) under a dispatch mode
that sees every tensor an op creates and learns, through a weak reference to its storage,
when it is freed. So:

- parameters, gradients, optimizer states are the storages of `model.parameters()`, their
  `.grad` and `optimizer.state` (quant-state constants count with the parameters);
- activations are the storages autograd saved during forward (saved_tensors_hooks), minus
  those blocks, still alive at the end of forward: the agent's definition;
- the phase peaks are the highest sum of live storages in each phase of the second step
  (the first one creates the optimizer states), temporaries included;
- peak_reserved replays the same allocation sequence through the caching-allocator model
  (`allocator.py`).

torch's meta kernel of `_grouped_mm` (transformers' default experts implementation) accepts
bf16 only; the recorder answers it with the output shape for any dtype.

Data-dependent ops cannot run on the meta device. Two occur in training: `nonzero`/`where`
in mixture-of-experts routing, answered with the routing assumption (`balanced`: every expert
gets tokens·top_k/experts tokens; `worst`: the top_k experts get every token), and `.item()`,
answered with False for a test, 0 for an index, 1.0 for a float (the optimizer's step count).

torch, transformers and peft are imported only when this runs (the agent never imports it
at import time: the formula path stays torch-free).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from vramtop_agent.estimator import seq2seq

if TYPE_CHECKING:   # for annotations only: this module imports torch when it runs, never at import time
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from vramtop_agent.estimator.setup import Setup

ROUTINGS = ("balanced", "worst")
# model_type -> (config key of the expert count, config key of top-k); the MoE families transformers builds.
_MOE_KEYS = (("num_local_experts", "num_experts_per_tok"), ("num_experts", "num_experts_per_tok"),
             ("n_routed_experts", "num_experts_per_tok"))


_MEMO: dict = {}   # op + input metadata -> output metadata (see _memo_call)


class ExecutionError(ValueError):
    """This model or setup cannot be executed on the meta device (one line for the user)."""


def available(light: bool = False) -> bool:
    """torch, transformers and peft importable. `light` (processes that only estimate: the CLI, the agent's
    estimator subprocess): imported the cheap way, see `_light_imports`."""
    try:
        with _light_imports() if light else contextlib.nullcontext():
            import torch  # noqa: F401

            import_bitsandbytes(light)   # before transformers and peft, which import it
            import transformers  # noqa: F401

            with _one_models_scan() if light else contextlib.nullcontext():
                import peft  # noqa: F401
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _light_imports() -> Iterator[None]:
    """No cyclic garbage collection while torch, transformers and peft import, then their objects frozen out of
    every later collection: ~3,000 modules' objects would otherwise be walked by dozens of collections while
    they import, and again by each full collection after (the last one at exit), about a fifth of a cold
    estimate's CPU time. Only in a process that has not imported torch yet (the CLI, the agent's estimator
    subprocess): a frozen object is never collected, which a long-lived process that imported torch itself
    (a test session, a training job) should not be subjected to. The estimate runs with the collector on;
    its numbers do not depend on it."""
    import gc
    import sys

    if "torch" in sys.modules:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _one_models_scan() -> Iterator[None]:
    """transformers' package init reads every file under transformers/models for its `__all__` (~2,600 files)
    through an lru_cache'd `create_import_structure_from_path(folder)`; transformers/models/__init__.py then
    calls it again with its own file name, which the function turns into the same folder, but the cache sees a
    new argument and reads every file again. While peft imports (it is what first imports transformers.models),
    a file is passed to the cache as its folder, so the second scan is the first one's result."""
    import os
    from pathlib import Path

    try:
        from transformers.utils import import_utils
    except ImportError:
        yield
        return
    scan = getattr(import_utils, "create_import_structure_from_path", None)
    if scan is None or not hasattr(scan, "cache_info"):   # not the lru_cache'd function this was written for
        yield
        return

    def by_folder(module_path: Any) -> Any:
        return scan(Path(os.path.dirname(module_path)) if os.path.isfile(module_path) else module_path)

    # A plain function stands in for the lru_cache wrapper (what mypy sees) until peft is imported.
    import_utils.create_import_structure_from_path = by_folder  # type: ignore[assignment]
    try:
        yield
    finally:
        import_utils.create_import_structure_from_path = scan


_BNB_NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _drop_bnb_noise(record: logging.LogRecord) -> bool:
    """bitsandbytes logs a warning at import when the optional `kernels` package is missing: it is about
    its CPU matmul speed, not this estimate. Only that message is dropped."""
    return not str(record.msg).startswith(_BNB_NOISE)


def _no_compile(*_args: object, **_kwargs: object) -> NoReturn:
    raise RuntimeError("torch.compile skipped while vramtop's estimator imports bitsandbytes")


def import_bitsandbytes(light: bool = False) -> ModuleType | None:
    """Import bitsandbytes (None when it is not installed) without its kernels-community warning.

    `light`: bitsandbytes wraps its CPU kernels in torch.compile at import, which imports dynamo and
    inductor (most of a cold estimate's time); the estimator never calls those kernels (meta tensors
    dispatch to bitsandbytes' fake kernels). bitsandbytes' own wrapper falls back to the uncompiled
    function when torch.compile raises, so it is made to raise while the import runs. Only for
    processes that do nothing but estimate: elsewhere the user's bitsandbytes is left as it loads."""
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    import torch

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    log.addFilter(_drop_bnb_noise)
    compile_ = torch.compile
    if light:
        torch.compile = _no_compile   # restored below; see the docstring
    try:
        import bitsandbytes
    except ImportError:
        return None
    finally:
        torch.compile = compile_
        log.removeFilter(_drop_bnb_noise)
    return bitsandbytes


# ------------------------------------------------------------------ the recorder


def _recorder_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class Recorder(TorchDispatchMode):
        """Live storages by identity, their bytes, the level and its peak, and the alloc/free sequence."""

        def __init__(self, moe=None, routing="balanced", allocator=None):
            super().__init__()
            self.live: dict = {}
            self._refs: dict = {}
            self.level = self.peak = 0
            self.moe = moe                # (experts, top_k) or None
            self.routing = routing
            self.allocator = allocator
            self._routed = 0
            self.memo = False   # on for the training steps only (building depends on the default dtype)

        # -- storages
        def note(self, t) -> None:
            st = t.untyped_storage()
            key = st._cdata
            if key in self.live:
                return
            n = st.nbytes()
            self.live[key] = n
            self.level += n
            if self.level > self.peak:
                self.peak = self.level
            self._refs[key] = weakref.ref(st, functools.partial(self._freed, key))
            if self.allocator is not None:
                self.allocator.malloc(key, n)

        def _freed(self, key: int, _ref: object = None) -> None:
            self.level -= self.live.pop(key, 0)
            self._refs.pop(key, None)
            if self.allocator is not None:
                self.allocator.free(key)

        def attach(self, allocator) -> None:
            self.allocator = allocator
            for key, n in self.live.items():
                allocator.malloc(key, n)

        def reset_peak(self) -> None:
            self.peak = self.level
            if self.allocator is not None:
                self.allocator.reset_peaks()

        # -- ops
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten._local_scalar_dense.default:   # .item(): a bool test, an index, a step count
                t = args[0]
                return False if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 0)
            if func in (aten.nonzero.default, aten.nonzero_static.default) and args[0].is_meta:
                out = self._route(args[0])
            elif func is aten._grouped_mm.default and args[0].is_meta:
                out = _grouped_mm_meta(*args, **kwargs)
            elif self.memo:
                out = _memo_call(func, args, kwargs)
            else:
                out = func(*args, **kwargs)
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and not t.is_sparse:
                    with contextlib.suppress(Exception):
                        self.note(t)
            return out

        def _route(self, mask):
            """nonzero() of a routing mask, under the routing assumption."""
            n = mask.numel()
            experts, top_k = self.moe or (1, 1)
            if mask.dim() == 1:      # which experts were hit (MoE loops over them)
                count = min(n, experts if self.routing == "balanced" else top_k)
            elif self.routing == "worst":
                count = n // max(top_k, 1)
            else:
                share, rest = divmod(n, max(experts, 1))
                count = share + (1 if self._routed % max(experts, 1) < rest else 0)
                self._routed += 1
            return torch.zeros((count, mask.dim()), dtype=torch.long, device=mask.device)

    def _memo_call(func, args, kwargs):
        """Meta kernels are Python (torch._refs): ~1 ms an op. Every layer repeats the previous layer's ops
        on the same shapes, so a functional op's outputs are remembered by its inputs' metadata and made
        with empty_strided next time. Views and in-place ops (outputs sharing an input's storage) always run."""
        key = _signature(func, args, kwargs)
        spec = _MEMO.get(key) if key is not None else None
        if spec is not None:
            many, leaves = spec
            made = [torch.empty_strided(sh, st, dtype=dt, device="meta") if sh is not None else val
                    for sh, st, dt, val in leaves]
            return many(made) if many else made[0]
        out = func(*args, **kwargs)
        if key is None or len(_MEMO) > 200_000:
            return out
        many = type(out) if isinstance(out, (tuple, list)) else None
        leaves = list(out) if many else [out]
        inputs = {x.untyped_storage()._cdata for x in _flat((args, kwargs)) if isinstance(x, torch.Tensor)}
        spec_leaves: list[tuple] = []
        for t in leaves:
            if isinstance(t, torch.Tensor):
                if (type(t) is not torch.Tensor or not t.is_meta or t.storage_offset() or t.requires_grad
                        or t.untyped_storage()._cdata in inputs):
                    return out
                spec_leaves.append((tuple(t.shape), t.stride(), t.dtype, None))
            elif t is None or isinstance(t, (int, float, bool)):
                spec_leaves.append((None, None, None, t))
            else:
                return out
        if many is not None and many not in (tuple, list):
            return out
        _MEMO[key] = (many, spec_leaves)
        return out

    def _flat(x):
        if isinstance(x, (list, tuple)):
            for y in x:
                yield from _flat(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from _flat(y)
        else:
            yield x

    _PLAIN = (int, float, bool, str, torch.dtype, torch.device, torch.layout, torch.memory_format)

    def _signature(func, args, kwargs):
        parts = [func, torch.get_default_dtype()]
        for x in _flat((args, kwargs)):
            if isinstance(x, torch.Tensor):
                if type(x) is not torch.Tensor or not x.is_meta:
                    return None
                parts.append((tuple(x.shape), x.stride(), x.dtype, x.storage_offset(), x.requires_grad))
            elif x is None or isinstance(x, _PLAIN):
                parts.append((type(x), x))
            else:
                return None
        if kwargs:
            parts.append(tuple(kwargs))
        return tuple(parts)

    def _grouped_mm_meta(a, b, offs=None, bias=None, out_dtype=None):
        """torch's meta kernel of _grouped_mm accepts bf16 only; CPU and GPU kernels take fp32 too."""
        shape: tuple[int, ...]
        if a.dim() == 2 and b.dim() == 3:
            shape = (a.shape[0], b.shape[-1])
        elif a.dim() == 2 and b.dim() == 2:
            shape = (offs.shape[0], a.shape[0], b.shape[1])
        elif a.dim() == 3 and b.dim() == 3:
            shape = (a.shape[0], a.shape[1], b.shape[-1])
        else:
            shape = (a.shape[1], b.shape[-1])
        return torch.empty(shape, dtype=out_dtype or a.dtype, device=a.device)

    return Recorder


# ------------------------------------------------------------------ building the model


def _hf_config(cfg: dict, setup):
    from transformers import AutoConfig

    cfg = dict(cfg)
    mtype = cfg.pop("model_type", None)
    if not mtype:
        raise ExecutionError("config.json has no model_type: cannot build the architecture")
    for key in ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                "quantization_config", "auto_map"):
        cfg.pop(key, None)
    try:
        config = AutoConfig.for_model(mtype, **cfg)
    except Exception as exc:
        raise ExecutionError(f"transformers cannot build model_type {mtype!r}: {exc}") from None
    config._attn_implementation = "eager" if setup.attn == "eager" else "sdpa"
    config.use_cache = False
    seq2seq.prepare_config(config)
    return config


def _moe(config) -> tuple | None:
    d = config.to_dict()
    for experts_key, topk_key in _MOE_KEYS:
        if d.get(experts_key) and d.get(topk_key):
            return int(d[experts_key]), int(d[topk_key])
    text = d.get("text_config")
    if isinstance(text, dict):
        for experts_key, topk_key in _MOE_KEYS:
            if text.get(experts_key) and text.get(topk_key):
                return int(text[experts_key]), int(text[topk_key])
    return None


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _build(config: Any, setup: Setup) -> PreTrainedModel:
    import torch

    base = setup.odtype if setup.quantized else setup.wdtype
    auto, kind = seq2seq.auto_class(config)
    with torch.device("meta"):
        try:
            model = auto.from_config(config, dtype=_torch_dtype(base))
        except Exception as exc:
            if config._attn_implementation == "eager" or "attention implementation" not in str(exc):
                first = str(exc).split(". ")[0].splitlines()[0]
                raise ExecutionError(f"cannot build {type(config).__name__} as {kind}: {first}") from None
            # Some architectures (Gemma 2's soft-capping) have no SDPA path: transformers runs them eagerly.
            config._attn_implementation = "eager"
            model = auto.from_config(config, dtype=_torch_dtype(base))
            model._vramtop_note = f"{type(config).__name__[:-6]} has no SDPA attention: eager attention assumed"
    seq2seq.keep_fp32(model, setup)
    if setup.quantized:
        _quantize_4bit(model, setup)
    return model


def _quantize_4bit(model: PreTrainedModel, setup: Setup) -> None:
    """Every nn.Linear but the output head becomes a bitsandbytes Linear4bit whose packed weight and
    quant state have their real sizes (what transformers' bnb quantizer loads)."""
    import torch

    if setup.wdtype not in ("nf4", "fp4"):
        raise ExecutionError("execution models 4-bit (nf4/fp4) quantization; use --engine formula for int8")
    bnb = import_bitsandbytes()
    if bnb is None:
        raise ExecutionError("QLoRA execution needs bitsandbytes installed (pip install bitsandbytes)")
    head = model.get_output_embeddings()
    compute = _torch_dtype(setup.cdtype)
    keep = seq2seq.not_quantized(model)
    for prefix, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            if seq2seq.skip_quantizing(f"{prefix}.{child_name}" if prefix else child_name, keep):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute, compress_statistics=setup.double_quant,
                                  quant_type=setup.wdtype, device="meta")
            q.weight = _packed(bnb, child.weight.shape, setup, q)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.detach().to(compute), requires_grad=False)
            setattr(mod, child_name, q)
    # Flags transformers and PEFT read (set by from_pretrained(load_in_4bit=True)); nn.Module's
    # __setattr__ is typed for tensors and modules only.
    model.is_loaded_in_4bit = True  # type: ignore[assignment]
    model.is_quantized = True  # type: ignore[assignment]


def _packed(bnb, shape, setup, module):
    import torch

    meta: dict[str, Any] = {"device": "meta"}
    n = shape[0] * shape[1]
    blocks = -(-n // 64)
    code = torch.empty(16, dtype=torch.float32, **meta)
    if setup.double_quant:
        state2 = bnb.functional.QuantState(absmax=torch.empty(-(-blocks // 256), dtype=torch.float32, **meta),
                                           code=torch.empty(256, dtype=torch.float32, **meta), blocksize=256,
                                           dtype=torch.float32)
        qs = bnb.functional.QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, **meta), shape=torch.Size(shape),
                                       code=code, blocksize=64, quant_type=setup.wdtype,
                                       dtype=_torch_dtype(setup.cdtype),
                                       offset=torch.empty((), dtype=torch.float32, **meta), state2=state2)
    else:
        qs = bnb.functional.QuantState(absmax=torch.empty(blocks, dtype=torch.float32, **meta), shape=torch.Size(shape),
                                       code=code, blocksize=64, quant_type=setup.wdtype,
                                       dtype=_torch_dtype(setup.cdtype))
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, **meta)
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, blocksize=64,
                             compress_statistics=setup.double_quant, quant_type=setup.wdtype,
                             module=module, bnb_quantized=True)


def _prepare(model: PreTrainedModel, setup: Setup) -> nn.Module:
    """kbit preparation, checkpointing, input grads, then the adapters (PEFT's order)."""
    import torch

    if setup.quantized and setup.kbit_prep:
        for p in model.parameters():   # peft.prepare_model_for_kbit_training's cast
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
    input_grads = setup.input_grads if setup.input_grads is not None else (setup.quantized and setup.grad_ckpt)
    if setup.method != "full":
        for p in model.parameters():
            p.requires_grad_(False)
    if setup.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if input_grads:
        model.enable_input_require_grads()
    trained = _lora(model, setup) if setup.method != "full" else model
    trained.train()
    return trained


def _lora(model: PreTrainedModel, setup: Setup) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(setup.lora_targets) if setup.lora_targets else ("all-linear" if setup.method == "qlora" else None)
    if targets == ["all-linear"]:
        targets = "all-linear"
    extra = getattr(setup, "modules_to_save", None)
    cfg = LoraConfig(r=setup.lora_rank, lora_alpha=16, lora_dropout=setup.lora_dropout, target_modules=targets,
                     task_type=seq2seq.task_type(model), modules_to_save=list(extra) if extra else None)
    try:
        return get_peft_model(model, cfg, autocast_adapter_dtype=setup.lora_dtype == "fp32")
    except ValueError as exc:
        raise ExecutionError(f"LoRA: {str(exc).splitlines()[0]}") from None


def _optimizer(params: Sequence[torch.Tensor], setup: Setup) -> torch.optim.Optimizer | None:
    import torch

    foreach = setup.foreach if setup.foreach is not None else setup.device.startswith("cuda")
    name = setup.optimizer
    if name in ("adamw", "paged-adamw", "adamw-8bit", "paged-adamw-8bit"):
        # 8-bit and paged states are not torch tensors of the allocator: counted from the formula (see execute()).
        return torch.optim.AdamW(params, lr=1e-4, foreach=foreach) if name == "adamw" else None
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=foreach)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-3, foreach=foreach)
    return None


# ------------------------------------------------------------------ sdpa kernel choice


@contextlib.contextmanager
def _meta_patches(setup: Setup) -> Iterator[None]:
    """On the meta device torch's SDPA dispatcher picks the math kernel (s² matrices); a real
    CPU picks its flash kernel and a GPU flash / memory-efficient: call what the device would."""
    import torch
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention
    aten = torch.ops.aten
    cuda = setup.device.startswith("cuda")

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # CPU: dropout, or a mask that trains (T5's relative-position bias), sends torch to the math kernel.
        cpu_math = not cuda and (dropout_p > 0 or (attn_mask is not None and attn_mask.requires_grad))
        if not q.is_meta or cpu_math:
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        if not cuda:
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                    attn_mask=attn_mask, scale=scale)[0]
        if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        if k.shape[-3] != q.shape[-3]:   # the memory-efficient kernel has no GQA: K/V are repeated
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p, is_causal,
                                                            scale=scale)[0]

    orig_autocast = torch.autocast

    class autocast(torch.autocast):  # noqa: N801 - stands in for torch.autocast (still the original here)
        """torch.autocast(device_type="meta") raises; PEFT's expert-parameter LoRA uses the weight's device."""

        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    torch.autocast = autocast  # type: ignore[misc]  # patched for the step, restored below
    try:
        with seq2seq.no_padding():
            yield
    finally:
        F.scaled_dot_product_attention = orig
        torch.autocast = orig_autocast  # type: ignore[misc]


# ------------------------------------------------------------------ one training step


class Measured:
    """What the executed step showed (bytes)."""

    def __init__(self):
        self.parameters = self.gradients = self.optimizer = self.activations = 0
        self.params_trainable = self.params_frozen = self.params_quantized = 0
        self.params_by_dtype: dict = {}
        self.buffers = self.inputs = self.start = self.end_of_forward = 0
        self.phase_peaks: dict = {}
        self.reserved_phase_peaks: dict = {}
        self.allocated_rounded = 0
        self.rounded_phase_peaks: dict = {}
        self.trainable_numels: list = []
        self.peak_reserved = 0
        self.moe = None
        self.extrapolated = False
        self.notes: list = []
        self.largest_grad = 0             # optimizer-in-backward: the largest gradient alive at a hook
        self.host_parts: dict = {}        # --offload: bytes on the host, not the device


def run_step(config: dict, setup: Setup, routing: str = "balanced") -> Measured:
    """Build, prepare and train `config` for two steps on the meta device; measure the second."""
    import torch

    from vramtop_agent.estimator.allocator import CachingAllocator

    if routing not in ROUTINGS:
        raise ExecutionError(f"unknown routing {routing!r}: use one of {', '.join(ROUTINGS)}")
    hf = _hf_config(config, setup)
    moe = _moe(hf)
    alloc = CachingAllocator() if setup.device.startswith("cuda") else None
    compiled = _compiled() if setup.compile else None
    rec = (compiled.recorder_class(_recorder_class()) if compiled else _recorder_class())(moe=moe, routing=routing)
    m = Measured()
    m.moe = moe
    with rec, _meta_patches(setup):
        with torch.device("meta"):   # only while building: the device mode's per-call cost is too high for the steps
            model = _prepare(_build(hf, setup), setup)
        if compiled:
            model = compiled.compile_model(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ExecutionError("nothing to train: no parameter requires grad")
        opt = _device_optimizer(params, setup, m)
        if alloc is not None:
            # From here on, as if the weights had been loaded straight into place (building on the meta
            # device allocates and frees full-size weights that a real from_pretrained never has).
            rec.attach(alloc)
        if hf.is_encoder_decoder:
            batch = seq2seq.batch(setup)
        else:
            ids = torch.zeros((setup.batch, setup.seq_len), dtype=torch.long, device="meta")
            batch = {"input_ids": ids, "labels": ids.clone()}
        rec.memo = True
        _warm_up(model, opt, setup)
        m.start = rec.level
        _one_step(model, opt, batch, setup, rec, m)
        _blocks(model, opt, batch, m)
        base = getattr(model, "base_model", model)
        note = getattr(base, "_vramtop_note", None) or getattr(model, "_vramtop_note", None)
        if note:
            m.notes.append(note)
    if alloc is not None:
        m.peak_reserved = alloc.peak_reserved
    if setup.offload and "optimizer" in setup.offload:
        _host_optimizer(params, setup, m)
    return m


def _compiled() -> ModuleType:
    from vramtop_agent.estimator import compiled

    return compiled


class _InBackward:
    """Optimizer-in-backward: one optimizer per trainable parameter, stepped (and its gradient freed) by a
    post-accumulate-grad hook as soon as that gradient is complete (the PyTorch tutorial's pattern)."""

    def __init__(self, opts: dict[nn.Parameter, torch.optim.Optimizer | None], m: Measured) -> None:
        self.opts = opts
        self.m = m
        for p in opts:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self.m.largest_grad = max(self.m.largest_grad, p.grad.untyped_storage().nbytes())
        opt = self.opts[p]  # type: ignore[index]  # the hook is called with the parameter itself
        if opt is not None:
            opt.step()
        p.grad = None

    @property
    def state(self) -> dict:
        return {p: st for opt in self.opts.values() if opt is not None for p, st in opt.state.items()}

    def step(self) -> None:   # the warm-up's step: creates every parameter's states
        for opt in self.opts.values():
            if opt is not None:
                opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.opts:
            p.grad = None


def _device_optimizer(params: list[nn.Parameter], setup: Setup, m: Measured) -> Any:
    """The optimizer as it lives on the device: one per parameter in backward, none when offloaded."""
    if setup.offload and "optimizer" in setup.offload:
        return None
    if setup.optim_in_backward:
        return _InBackward({p: _optimizer([p], setup) for p in params}, m)
    return _optimizer(params, setup)


def _host_optimizer(params: list[nn.Parameter], setup: Setup, m: Measured) -> None:
    """--offload optimizer (ZeRO-Offload's layout): the host keeps an fp32 master copy of every trainable
    weight, an fp32 copy of its gradient, and the optimizer states of an fp32 step; the device only
    copies the updated weights back. States: torch's optimizer run on meta fp32 masters (outside the
    recorder, so none of it counts on the device)."""
    import torch

    masters = [torch.empty(p.shape, dtype=torch.float32, device="meta") for p in params]
    for t in masters:
        t.grad = torch.empty_like(t)
    opt = _optimizer(masters, setup.with_(foreach=False))
    if opt is not None:
        opt.step()
    n = sum(t.numel() for t in masters)
    m.host_parts.update(master_weights=4 * n, gradients=4 * n, optimizer_states=_sum_storages(_opt_tensors(opt)))


def _warm_up(model: nn.Module, opt: torch.optim.Optimizer | None, setup: Setup) -> None:
    """The first step only creates the optimizer's states (lazily, in step()): give every trainable
    parameter a gradient and step, without the forward and backward a real first step would run."""
    import torch

    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p)
    if opt is not None:
        opt.step()
    if setup.grad_accum <= 1:   # with accumulation the previous micro-batches' gradients are alive
        for p in model.parameters():
            p.grad = None


def _one_step(model: nn.Module, opt: Any, batch: dict[str, torch.Tensor], setup: Setup,
              rec: Any, m: Measured | None) -> None:
    import torch

    saved: dict = {}
    host: dict = {}   # --offload activations: id of the packed record -> bytes on the host
    offload = bool(setup.offload and "activations" in setup.offload)

    def pack(t):
        st = t.untyped_storage()
        saved[st._cdata] = weakref.ref(st)
        if offload:   # torch.autograd.graph.save_on_cpu: a host copy of the tensor, the device one let go
            record = _Offloaded(tuple(t.shape), t.dtype, t.device)
            host[id(record)] = t.numel() * t.element_size()
            weakref.finalize(record, host.pop, id(record), 0)
            return record
        return t

    def unpack(x):   # save_on_cpu copies the host tensor back to the device when backward needs it
        return torch.empty(x.shape, dtype=x.dtype, device=x.device) if isinstance(x, _Offloaded) else x

    rec.reset_peak()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if setup.loss == "chunked":
            out, loss = _trunk(model, batch), None
        else:
            out = model(**batch)
            loss = out.loss
    if m is not None:
        m.phase_peaks["forward"] = rec.peak
        m.end_of_forward = rec.level
        _reserved(rec, m, "forward")
        static = _static_keys(model, opt)
        m.activations = sum(rec.live.get(k, 0) for k, ref in saved.items() if ref() is not None and k not in static)
        if offload:
            m.host_parts["activations"] = sum(host.values())
    saved.clear()   # the forward's weak references are not needed through backward
    rec.reset_peak()
    if loss is None:
        _chunked_loss_backward(model, out, batch["labels"], setup.loss_chunk)
    else:
        loss.backward()
    if m is not None:
        m.phase_peaks["backward"] = rec.peak
        _reserved(rec, m, "backward")
    rec.reset_peak()
    if opt is not None and not setup.optim_in_backward:
        opt.step()
    if m is not None:
        m.phase_peaks["optimizer"] = rec.peak
        _reserved(rec, m, "optimizer")
        m.gradients = _sum_storages(p.grad for p in model.parameters() if p.grad is not None)
        if setup.optim_in_backward:
            m.gradients = m.largest_grad
        m.optimizer = _sum_storages(_opt_tensors(opt))
    del out, loss
    if setup.grad_accum <= 1 or m is not None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                p.grad = None


class _Offloaded:
    """A saved tensor moved to the host: its shape, dtype and home device (no data on the meta device)."""

    __slots__ = ("shape", "dtype", "device", "__weakref__")

    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device


def _causal_lm(model: nn.Module) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _trunk(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """--loss chunked, forward: the decoder stack only (its last hidden state); no logits yet."""
    lm = _causal_lm(model)
    trunk = lm.get_decoder() if callable(getattr(lm, "get_decoder", None)) else None
    if trunk is None or trunk is lm:
        trunk = getattr(lm, lm.base_model_prefix, None)
    if trunk is None:
        raise ExecutionError(f"--loss chunked: cannot find the decoder stack of {type(lm).__name__}")
    out = trunk(input_ids=batch["input_ids"])
    return out[0]


def _chunked_loss_backward(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> None:
    """--loss chunked, backward: the output layer and cross-entropy on `chunk` tokens at a time, each chunk's
    backward run at once into a detached copy of the hidden states (so one chunk's logits exist at a time),
    then one backward through the decoder stack. The mean over all tokens, as transformers' loss."""
    import torch
    import torch.nn.functional as F

    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    h = hidden.detach().flatten(0, 1).requires_grad_(True)
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:].flatten()   # transformers' shifted labels
    count = labels.shape[0] * (labels.shape[1] - 1)
    for i in range(0, h.shape[0], chunk):
        logits = head(h[i:i + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = F.cross_entropy(logits, targets[i:i + chunk], ignore_index=-100, reduction="sum") / count
        del logits
        loss.backward()
        del loss
    grad = h.grad
    if grad is None:   # no chunk had a target: nothing flows back
        return
    hidden.backward(grad.view_as(hidden))


def _reserved(rec, m, phase) -> None:
    if rec.allocator is not None:
        m.reserved_phase_peaks[phase] = rec.allocator.peak_reserved
        m.rounded_phase_peaks[phase] = rec.allocator.peak_allocated
        m.allocated_rounded = max(m.allocated_rounded, rec.allocator.peak_allocated)


def _opt_tensors(opt: Any) -> list[torch.Tensor]:
    """The state tensors of a torch optimizer or an _InBackward (None: no optimizer on the device)."""
    import torch

    if opt is None:
        return []
    return [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


def _quant_tensors(p: nn.Parameter) -> list[torch.Tensor]:
    qs = getattr(p, "quant_state", None)
    if qs is None:
        return []
    out = [t for t in (qs.absmax, qs.code, qs.offset) if t is not None]
    if qs.state2 is not None:
        out += [qs.state2.absmax, qs.state2.code]
    return out


def _static_keys(model: nn.Module, opt: Any) -> set[int]:
    keys = set()
    for p in model.parameters():
        for t in [p, *_quant_tensors(p)] + ([p.grad] if p.grad is not None else []):
            keys.add(t.untyped_storage()._cdata)
    for t in _opt_tensors(opt):
        keys.add(t.untyped_storage()._cdata)
    return keys


def _sum_storages(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def _blocks(model: nn.Module, opt: torch.optim.Optimizer | None, batch: dict[str, torch.Tensor], m: Measured) -> None:
    from vramtop_agent.estimator.units import norm_dtype

    seen: dict = {}
    for p in model.parameters():
        tensors = [p, *_quant_tensors(p)]
        nbytes = 0
        for t in tensors:
            st = t.untyped_storage()
            if st._cdata not in seen:
                seen[st._cdata] = st.nbytes()
                nbytes += st.nbytes()
        if type(p).__name__ == "Params4bit":
            m.params_quantized += nbytes
            dt = str(getattr(p, "quant_type", "nf4"))
        else:
            dt = norm_dtype(p.dtype)
        m.params_by_dtype[dt] = m.params_by_dtype.get(dt, 0) + nbytes
        if p.requires_grad:
            m.trainable_numels.append(p.numel())
            m.params_trainable += nbytes
        else:
            m.params_frozen += nbytes
    m.parameters = sum(seen.values())
    m.buffers = _sum_storages(b for b in model.buffers() if b.untyped_storage()._cdata not in seen)
    m.inputs = _sum_storages(batch.values())


# ------------------------------------------------------------------ the estimate


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Config keys that make layers differ in ways the period of `layer_types` does not show.
_IRREGULAR_KEYS = ("mlp_only_layers", "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step",
                   "no_rope_layers", "full_attn_idxs")


def layer_plan(config: dict) -> tuple[int, int] | None:
    """(layers, period) when the layers repeat with a known period, else None (execute them all)."""
    key = next((k for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
    if key is None:
        return None
    for k in _IRREGULAR_KEYS:
        v = config.get(k)
        if v not in (None, [], 0, 1) or (k == "mlp_only_layers" and v):
            return None
    types = config.get("layer_types")
    period = 1
    if isinstance(types, list) and types:
        period = next(p for p in range(1, len(types) + 1)
                      if all(types[i] == types[i % p] for i in range(len(types))))
    elif config.get("model_type") in ("gemma3_text", "gemma3"):
        period = int(config.get("sliding_window_pattern") or 6)
    elif config.get("model_type") == "gemma2":
        period = 2
    return int(config[key]), period


def with_layers(config: dict, n: int) -> dict:
    cfg = dict(config)
    key = next(k for k in _LAYER_KEYS if isinstance(config.get(k), int))
    cfg[key] = n
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:n]
    return cfg


def measure(config: dict, setup, routing: str = "balanced", exact: bool = False) -> Measured:
    """Execute the model, or (deep models with repeating layers) two truncations of it, 2 and 3 periods
    deep, and extend the difference linearly: every layer of a period adds the same tensors, so blocks
    and phase peaks are exact whenever the layer count is a whole number of periods."""
    hf = _hf_config(config, setup)
    if seq2seq.check(hf, setup):
        return seq2seq.measure(config, hf, setup, routing, exact)
    plan = None if exact else layer_plan(config)
    if plan is None or plan[0] <= 3 * plan[1]:
        return run_step(config, setup, routing)
    layers, period = plan
    a = run_step(with_layers(config, 2 * period), setup, routing)
    b = run_step(with_layers(config, 3 * period), setup, routing)
    return _extend(a, b, (layers - 2 * period) / period)


def _extend(a: Measured, b: Measured, k: float) -> Measured:
    out = Measured()
    for name, va in vars(a).items():
        vb = getattr(b, name)
        if isinstance(va, dict):
            keys = list(va) + [key for key in vb if key not in va]
            setattr(out, name, {key: _lin(va.get(key, 0), vb.get(key, 0), k) for key in keys})
        elif name == "trainable_numels":
            per_period = vb[len(va):] if vb[:len(va)] == va else []
            whole = int(k)
            out.trainable_numels = list(va) + per_period * whole
        elif isinstance(va, int):
            setattr(out, name, _lin(va, vb, k))
        else:
            setattr(out, name, va)
    # Reserved grows by whole segments, not smoothly: extend the slack above the allocated peak instead,
    # never below the smaller of the two measured slacks.
    slack_a, slack_b = a.peak_reserved - a.allocated_rounded, b.peak_reserved - b.allocated_rounded
    if a.peak_reserved:
        slack = max(_lin(slack_a, slack_b, k), min(slack_a, slack_b), 0)
        out.peak_reserved = out.allocated_rounded + slack
    out.extrapolated = True
    return out


def _lin(a: int, b: int, k: float) -> int:
    return int(round(a + (b - a) * k))


def execute(config: dict, setup, routing: str = "balanced", name: str | None = None, card: str | None = None,
            exact: bool = False):
    """An `Estimate` of `config` (a config.json dict) under `setup`, by executing one training step."""
    from vramtop_agent.estimator.device import device_overhead
    from vramtop_agent.estimator.estimate import Estimate
    from vramtop_agent.estimator.model_desc import describe_any
    from vramtop_agent.estimator.setup import validate

    setup = validate(setup)
    if setup.world_size > 1:
        raise ExecutionError("execution covers one device; use --engine formula for ZeRO/DDP sharding")
    with _quiet():
        m = measure(config, setup, routing, exact)
    cuda = setup.device.startswith("cuda")
    opt_extra, paged = optimizer_only(setup, m.trainable_numels)
    if setup.masters and m.optimizer:
        # Mixed precision: an fp32 master copy of each 16-bit trainable weight, and fp32 states (torch's
        # optimizer ran on the 16-bit weights here, so its states are half that size).
        opt_extra += 4 * sum(m.trainable_numels) + m.optimizer
    optimizer = m.optimizer + opt_extra + paged
    phase_peaks = {k: v + opt_extra for k, v in (m.rounded_phase_peaks if cuda else m.phase_peaks).items()}
    accum = m.gradients if setup.grad_accum > 1 else 0
    eof = m.end_of_forward + opt_extra
    rest = max(m.end_of_forward - m.parameters - m.optimizer - m.activations - accum, 0)
    buffers = min(m.buffers, rest)
    inputs = min(m.inputs, rest - buffers)
    peak_alloc = max(phase_peaks.values())
    reserved = (m.peak_reserved + _round_up(opt_extra)) if cuda else peak_alloc
    overhead = device_overhead(setup, card)
    other_parts = {"buffers": buffers, "inputs": inputs, "held_outputs": rest - buffers - inputs,
                   "ddp_buckets": 0, "cuda_context": overhead["cuda_context"], "allocator_overhead": 0}
    device_parts = {"reserved": reserved, **overhead, "paged_optimizer": paged}
    desc = describe_any(config, name=name)
    blocks = {"parameters": m.parameters, "gradients": m.gradients, "optimizer": optimizer,
              "activations": m.activations, "other": sum(other_parts.values())}
    est = Estimate(
        blocks=blocks, peak=sum(device_parts.values()), phase_peaks=phase_peaks, terms=[], setup=setup, model=desc,
        end_of_forward=eof,
        params_split={"trainable": m.params_trainable, "frozen": m.params_frozen, "quantized": m.params_quantized},
        params_by_dtype=dict(m.params_by_dtype), other_parts=other_parts, engine="execute",
        peak_reserved=reserved, device_parts=device_parts,
        assumptions=_assumptions(m, routing, setup), host_parts=dict(m.host_parts),
    )
    est.terms = _terms(est, m)
    return est


def optimizer_only(setup, numels) -> tuple[int, int]:
    """bitsandbytes optimizer states (not executed: no meta kernels): (in the allocator, paged/managed)."""
    from vramtop_agent.estimator.weights import OPT8_BLOCK, OPT8_MIN_SIZE, OPT8_QMAP_BYTES

    opt = setup.optimizer
    if opt == "paged-adamw":
        return 0, sum(8 * n for n in numels)
    if opt not in ("adamw-8bit", "paged-adamw-8bit"):
        return 0, 0
    total = sum(2 * n + 8 * -(-n // OPT8_BLOCK) if n >= OPT8_MIN_SIZE else 8 * n for n in numels)
    total += OPT8_QMAP_BYTES if any(n >= OPT8_MIN_SIZE for n in numels) else 0
    return (0, total) if opt.startswith("paged") else (total, 0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' deprecation and config warnings are about the user's future code, not this estimate."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _round_up(n: int) -> int:
    return -(-n // (2 << 20)) * (2 << 20)


def _assumptions(m, routing, setup) -> list:
    out = list(m.notes)
    if m.moe:
        experts, top_k = m.moe
        out.append(f"mixture of experts ({experts} experts, top-{top_k}): {routing} routing"
                   + (" (every expert gets tokens·top_k/experts tokens)" if routing == "balanced"
                      else " (the top_k experts get every token: the most one expert can hold)"))
    if m.extrapolated:
        out.append("deep model: 2 and 3 layer periods executed, the rest extended linearly (layers repeat)")
    out += _setting_notes(setup)
    if setup.device.startswith("cuda"):
        out.append("reserved memory from the caching-allocator model (defaults, one stream; not yet fitted on a GPU)")
    return out


def _setting_notes(setup: Setup) -> list[str]:
    out = []
    if setup.loss == "chunked":
        out.append(f"chunked loss: output layer + fp32 cross-entropy on {setup.loss_chunk} tokens at a time, each "
                   f"chunk's backward at once; the full b·s·V logits never exist")
    if setup.optim_in_backward:
        out.append("optimizer in backward: one optimizer per parameter, stepped by a post-accumulate-grad hook "
                   "that frees the gradient (gradients block = the largest single gradient)")
    if setup.compile:
        out.append(_compiled().NOTE)
    offload = setup.offload or ()
    if "activations" in offload:
        out.append("activations offloaded (torch.autograd.graph.save_on_cpu): every saved tensor copied to host "
                   "RAM in forward, copied back when backward needs it")
    if "optimizer" in offload:
        out.append("optimizer offloaded (ZeRO-Offload layout): fp32 master weights, fp32 gradient copies and states "
                   "in host RAM, the step on the CPU; gradients stay on the device until backward ends")
    return out


def _terms(est, m) -> list:
    s = est.setup
    t = [("parameters: trainable", est.params_split["trainable"], "storages of the parameters that train"),
         ("parameters: frozen", est.params_split["frozen"], "frozen weights"
          + (" incl. packed 4-bit weights and their quantization constants" if s.quantized else ""))]
    for dt, nbytes in sorted(est.params_by_dtype.items(), key=lambda kv: -kv[1]):
        t.append((f"parameters: {dt}", nbytes, f"parameters stored as {dt}"))
    t.append(("gradients", est.blocks["gradients"], "the .grad of every trainable parameter after backward"))
    t.append(("optimizer states", est.blocks["optimizer"], f"{s.optimizer} state tensors after its step"))
    t.append(("activations", est.blocks["activations"],
              "storages autograd saved in forward, alive when backward starts (executed, not modelled)"))
    for key, label in (("held_outputs", "logits and loss returned by the model"), ("inputs", "input ids and labels"),
                       ("buffers", "module buffers (rotary tables...)")):
        t.append((f"other: {key.replace('_', ' ')}", est.other_parts[key], label))
    for phase, peak in est.phase_peaks.items():
        t.append((f"peak allocated: {phase}", peak,
                  f"highest sum of live storages during {phase}, temporaries included"))
    t.append(("peak reserved", est.peak_reserved, "peak allocated + caching-allocator rounding and segment slack"))
    for key, nbytes in est.device_parts.items():
        if key != "reserved" and nbytes:
            t.append((f"device: {key.replace('_', ' ')}", nbytes, _DEVICE_WHY.get(key, key)))
    for key, nbytes in est.host_parts.items():
        t.append((f"host RAM: {key.replace('_', ' ')}", nbytes, _HOST_WHY.get(key, key)))
    return t


_HOST_WHY = {
    "activations": "saved tensors copied to the host in forward (save_on_cpu), all alive when backward starts",
    "master_weights": "fp32 copy of every trainable weight the host optimizer updates",
    "gradients": "fp32 copy of every gradient, for the host optimizer",
    "optimizer_states": "the optimizer's states for the fp32 host step",
}


_DEVICE_WHY = {
    "cuda_context": "CUDA driver context and loaded kernels (outside torch's allocator)",
    "workspaces": "cuBLAS/cuBLASLt workspaces (and NCCL buffers with more than one rank)",
    "paged_optimizer": "paged optimizer states in CUDA managed memory (resident unless memory runs short)",
}


def _main() -> int:
    """`python -m vramtop_agent.estimator.execute` < {"config": ..., "setup": ...}: the agent's subprocess."""
    import json
    import sys

    from vramtop_agent.estimator.setup import Setup

    req = json.load(sys.stdin)
    available(light=True)
    fields = dict(req["setup"])
    for key in ("lora_targets", "modules_to_save", "offload"):
        if fields.get(key):
            fields[key] = tuple(fields[key])
    try:
        est = execute(req["config"], Setup(**fields), routing=req.get("routing", "balanced"), name=req.get("name"))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    json.dump(est.to_dict(), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
