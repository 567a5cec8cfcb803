"""What kind of training this is, read from the live model and optimizer.

`describe_model(model)` is the hello message's `model` map. Besides the
basics (class, parameter counts, dtype, method, grad_ckpt) it names what
changes the memory picture, each key present only when detected:

  lora      PEFT LoRA: adapters, ranks, alpha, targets (module names that carry
            adapters), modules_to_save, DoRA / rsLoRA, adapter parameter count.
  quant     bitsandbytes weights: Linear4bit/Params4bit (bits 4, type nf4|fp4,
            double_quant, blocksize, compute_dtype, storage dtype) or
            Linear8bitLt/Int8Params (bits 8, threshold, has_fp16_weights);
            `modules` and `params` (logical weights) quantized. The bytes, packed
            weights plus absmax and quantization-map constants, are in every
            sample's params_split.quantized (accounting.py).
  autocast  the autocast dtype seen inside the first training forward
            ("bfloat16", "float16", or "off"); absent until that forward ran.
  sharding  DDP / DataParallel / FSDP (strategy) / FSDP2 (fully_shard) /
            DeepSpeed (ZeRO stage), with `wrappers` naming the outer classes.
  summary   one short line for a header: "QLoRA r=8 q_proj,v_proj · nf4 dq · grad-ckpt".

Nothing here imports peft, bitsandbytes, deepspeed or accelerate: classes are
recognised by name and attributes, so describing never pulls in a library
the job does not use. `describe_optimizer(opt)` is the hello's `optimizer` map.
"""

from __future__ import annotations

import collections
import sys
import time
import weakref
from typing import Any

from vramtop_agent.autodetect import unwrap, wrappers

# ----------------------------------------------------------------------------- parameters


def _qs_numel(p) -> int:
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return p.numel()


def logical_numel(p) -> int:
    """Weights a parameter stands for: a quantized Params4bit packs two 4-bit weights per byte."""
    if type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None:
        return _qs_numel(p)
    return p.numel()


def _dtype_label(p) -> str:
    kind = type(p).__name__
    if kind == "Params4bit" and getattr(p, "quant_state", None) is not None:
        return str(getattr(p, "quant_type", None) or getattr(p.quant_state, "quant_type", "4bit"))
    if kind == "Int8Params":
        return "int8"
    return str(p.dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- LoRA


def _lora_info(model, adapter_params: int = 0) -> dict | None:
    ranks: collections.Counter = collections.Counter()
    alphas: set = set()
    targets: set = set()
    adapters: set = set()
    dora = False
    layers = 0
    save: list[str] = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if kind == "ModulesToSaveWrapper":
            save.append(name.rsplit(".", 1)[-1])
            continue
        lora_a = m._modules.get("lora_A") if hasattr(m, "_modules") else None
        if lora_a is None or not hasattr(lora_a, "items"):
            continue
        r = m.__dict__.get("r")
        layer_has = False
        for adapter, sub in lora_a.items():
            rank = r.get(adapter) if isinstance(r, dict) else None
            if rank is None:
                w = getattr(sub, "weight", None)
                rank = int(w.shape[0]) if w is not None and w.dim() == 2 else None
            if rank is None:
                continue
            ranks[int(rank)] += 1
            adapters.add(str(adapter))
            layer_has = True
            alpha = m.__dict__.get("lora_alpha")
            if isinstance(alpha, dict) and adapter in alpha:
                alphas.add(alpha[adapter])
            use_dora = m.__dict__.get("use_dora")
            if isinstance(use_dora, dict) and use_dora.get(adapter):
                dora = True
        if layer_has:
            layers += 1
            targets.add(name.rsplit(".", 1)[-1])
    if not layers:
        return None
    info: dict[str, Any] = {
        "adapters": sorted(adapters),
        "ranks": sorted(ranks),
        "alpha": sorted(float(a) for a in alphas if isinstance(a, (int, float))),
        "targets": sorted(targets),
        "layers": layers,
        "modules_to_save": sorted(set(save)),
        "adapter_params": adapter_params,
    }
    if dora:
        info["dora"] = True
    cfgs = getattr(model, "peft_config", None)
    if isinstance(cfgs, dict):
        for cfg in cfgs.values():
            if getattr(cfg, "use_rslora", False):
                info["rslora"] = True
            mts = getattr(cfg, "modules_to_save", None)
            if mts and not info["modules_to_save"]:
                info["modules_to_save"] = sorted(str(x) for x in mts)
    return info


# ----------------------------------------------------------------------------- quantization


def _quant_info(model) -> dict | None:
    configs: collections.Counter = collections.Counter()
    modules = 0
    params = 0
    seen: set = set()
    cfg: tuple[tuple[str, object], ...]  # (key, value) pairs: the Counter key, then the info dict
    for m in model.modules():
        # The module that owns the weight (bnb Linear4bit/Linear8bitLt), not a PEFT wrapper forwarding `.weight`.
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is None or id(w) in seen:
            continue
        kind = type(w).__name__
        if kind == "Params4bit":
            seen.add(id(w))
            qs = getattr(w, "quant_state", None)
            compute = getattr(m, "compute_dtype", None)
            cfg = (
                ("bits", 4),
                ("type", str(getattr(w, "quant_type", None) or getattr(qs, "quant_type", "?"))),
                ("double_quant", bool(getattr(qs, "nested", False) if qs is not None
                                      else getattr(w, "compress_statistics", False))),
                ("blocksize", int(getattr(qs, "blocksize", None) or getattr(w, "blocksize", 0) or 0)),
                ("compute_dtype", str(compute).replace("torch.", "") if compute is not None else None),
                ("storage", str(w.dtype).replace("torch.", "")),
                ("quantized", qs is not None),
            )
        elif kind == "Int8Params":
            seen.add(id(w))
            state = getattr(m, "state", None)
            cfg = (
                ("bits", 8),
                ("type", "int8"),
                ("threshold", float(getattr(state, "threshold", 0.0) or 0.0)),
                ("has_fp16_weights", bool(getattr(state, "has_fp16_weights", getattr(w, "has_fp16_weights", False)))),
            )
        else:
            continue
        configs[cfg] += 1
        modules += 1
        params += logical_numel(w)
    if not modules:
        return None
    (best, _), = configs.most_common(1)
    info = dict(best)
    info["modules"] = modules
    info["params"] = params
    if len(configs) > 1:
        info["mixed"] = True
    return info


# ----------------------------------------------------------------------------- gradient checkpointing


def _grad_ckpt(model) -> bool:
    hf = None
    for m in model.modules():
        # HF sets `gradient_checkpointing = True` on the modules it checkpoints (an instance attribute).
        if m.__dict__.get("gradient_checkpointing") is True:
            return True
        # torch.distributed.algorithms._checkpoint.checkpoint_wrapper (FSDP activation checkpointing)
        if type(m).__name__ == "CheckpointWrapper":
            return True
        if hf is None and getattr(type(m), "is_activation_checkpointing", None) is not None:
            hf = m
    if hf is not None:  # transformers >= 5: PreTrainedModel.is_activation_checkpointing
        try:
            return hf.is_activation_checkpointing is True
        except Exception:
            return False
    return False


# ----------------------------------------------------------------------------- autocast


class _AutocastProbe:
    """One-shot forward pre hook inside the model: reads the autocast state the forward really runs under.

    Installed on the first submodule with parameters, so that autocast entered
    by a wrapper around `forward` (accelerate's `prepare`) counts as well as an
    autocast context around the model call (HF Trainer, Lightning precision).
    """

    def __init__(self, model, on_result=None):
        self.result: str | None = None
        # Weakly: _PROBES is a WeakKeyDictionary keyed by the model, and a strong
        # callback to the agent (which holds the model) would keep the key alive forever.
        self.on_result = weakref.WeakMethod(on_result) if hasattr(on_result, "__self__") else (
            (lambda f=on_result: f) if on_result is not None else None)
        self._handle = None
        target = model
        # Below a compiled wrapper a hook would be traced (a graph break); the wrapper's own hooks run eagerly.
        for m in (() if type(model).__name__ == "OptimizedModule" else model.modules()):
            if m is not model and any(True for _ in m.parameters(recurse=False)):
                target = m
                break
        dev = "cpu"
        for p in model.parameters():
            dev = p.device.type
            break
        self._device_type = dev
        self._handle = target.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        try:
            import torch

            if torch.compiler.is_compiling():
                return None  # traced inside a compiled module: be nothing there
            if not torch.is_grad_enabled():
                return None
            dt = self._device_type if self._device_type in ("cuda", "cpu", "xpu", "mps", "hpu") else "cuda"
            if torch.is_autocast_enabled(dt):
                self.result = str(torch.get_autocast_dtype(dt)).replace("torch.", "")
            else:
                self.result = "off"
        except Exception:
            self.result = None
        self.remove()
        callback = self.on_result() if self.on_result is not None else None
        self.on_result = None
        if self.result is not None and callback is not None:
            try:
                callback()  # e.g. the agent re-sends its hello with the autocast dtype
            except Exception:
                pass
        return None

    def remove(self) -> None:
        h, self._handle = self._handle, None
        if h is not None:
            try:
                h.remove()
            except Exception:
                pass


_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def autocast_dtype(model, install: bool = True, on_result=None) -> str | None:
    """The autocast dtype seen inside the model's first training forward; None until it ran.

    The first call installs the probe; `on_result()` is called once it has read the dtype.
    """
    try:
        probe = _PROBES.get(model)
    except TypeError:
        return None
    if probe is None:
        if not install:
            return None
        try:
            probe = _PROBES[model] = _AutocastProbe(model, on_result)
        except Exception:
            return None
    return probe.result


# ----------------------------------------------------------------------------- sharding


def _isinstance_named(obj, module_name: str, attr: str) -> bool:
    mod = sys.modules.get(module_name)
    cls = getattr(mod, attr, None) if mod is not None else None
    try:
        return cls is not None and isinstance(obj, cls)
    except TypeError:
        return False


def _sharding_info(model) -> dict | None:
    outer = wrappers(model)
    info: dict[str, Any] | None = None
    fsdp1 = fsdp2 = 0
    strategy = None
    ds_stage = None
    for m in model.modules():
        kind = type(m).__name__
        if kind == "FullyShardedDataParallel":
            fsdp1 += 1
            if strategy is None:
                st = getattr(m, "sharding_strategy", None)
                strategy = getattr(st, "name", None) or (str(st) if st is not None else None)
        elif _isinstance_named(m, "torch.distributed.fsdp", "FSDPModule") or \
                _isinstance_named(m, "torch.distributed._composable.fsdp", "FSDPModule"):
            fsdp2 += 1
        elif kind == "DeepSpeedEngine" and ds_stage is None:
            try:
                ds_stage = int(m.zero_optimization_stage())
            except Exception:
                ds_stage = -1
    if fsdp1:
        info = {"kind": "fsdp", "units": fsdp1}
        if strategy:
            info["strategy"] = strategy
    elif fsdp2:
        info = {"kind": "fsdp2", "units": fsdp2}
    elif ds_stage is not None:
        info = {"kind": "deepspeed"}
        if ds_stage >= 0:
            info["zero_stage"] = ds_stage
    else:
        for p in model.parameters():
            if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
                info = {"kind": "deepspeed", "zero_stage": 3}
            break
    if info is None and outer:
        if "DistributedDataParallel" in outer:
            info = {"kind": "ddp"}
        elif "DataParallel" in outer:
            info = {"kind": "dp"}
    if info is not None and outer:
        info["wrappers"] = outer
    return info


# ----------------------------------------------------------------------------- the model map


def _class_name(model) -> str:
    outer = type(model).__name__
    core = unwrap(model)
    # PEFT: PeftModel.base_model (LoraModel).model is the user's model.
    base = getattr(core, "base_model", None)
    if getattr(core, "peft_config", None) is not None and base is not None and base is not core:
        core = getattr(base, "model", base)
    inner = type(core).__name__
    return outer if inner == outer else f"{outer}({inner})"


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_AGE_S = 30.0


def describe_model(model, on_change=None, max_age: float = MAX_AGE_S) -> dict:
    """The hello message's `model` map (see the module docstring).

    The hello is re-sent every second; walking a 7B model's modules costs tens of
    milliseconds, so a description is reused for `max_age` seconds (or until the
    autocast probe reports). `on_change()` is called when something only a
    training forward reveals (autocast) becomes known.
    """
    now = time.monotonic()
    ac = autocast_dtype(model, on_result=on_change)
    try:
        cached = _CACHE.get(model)
    except TypeError:
        cached = None
    if cached is not None and now - cached[0] < max_age and cached[1].get("autocast") == ac:
        return dict(cached[1])
    info = _describe(model, ac)
    try:
        _CACHE[model] = (now, info)
    except TypeError:
        pass
    return dict(info)


def _describe(model, ac: str | None) -> dict:
    total = trainable = adapter_params = 0
    dtypes: collections.Counter = collections.Counter()
    seen: set = set()
    has_lora_names = False
    has_4bit = False
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
        dtypes[_dtype_label(p)] += n
        if type(p).__name__ == "Params4bit":
            has_4bit = True
        if "lora_" in name:
            has_lora_names = True
            adapter_params += p.numel()
    lora = _lora_info(model, adapter_params) if has_lora_names else None
    quant = _quant_info(model)
    method = "qlora" if has_4bit else ("lora" if (lora or has_lora_names) else "full")
    info: dict[str, Any] = {
        "class": _class_name(model),
        "params_total": total,
        "params_trainable": trainable,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "method": method,
        "grad_ckpt": _grad_ckpt(model),
    }
    if lora:
        info["lora"] = lora
    if quant:
        info["quant"] = quant
    if ac is not None:
        info["autocast"] = ac
    shard = _sharding_info(model)
    if shard:
        info["sharding"] = shard
    info["summary"] = summary(info)
    return info


def summary(info: dict) -> str:
    parts = []
    lora = info.get("lora")
    method = info.get("method")
    if lora:
        ranks = "/".join(str(r) for r in lora.get("ranks", []))
        name = "QLoRA" if method == "qlora" else ("DoRA" if lora.get("dora") else "LoRA")
        targets = ",".join(lora.get("targets", [])[:6]) + ("…" if len(lora.get("targets", [])) > 6 else "")
        parts.append(f"{name} r={ranks} {targets}".strip())
        if lora.get("modules_to_save"):
            parts.append("+save " + ",".join(lora["modules_to_save"]))
    elif method == "full":
        parts.append("full" if info.get("params_trainable") == info.get("params_total") else "partial")
    quant = info.get("quant")
    if quant:
        if quant.get("bits") == 4:
            parts.append(f"{quant.get('type')}{' dq' if quant.get('double_quant') else ''}")
        else:
            parts.append("int8")
    if info.get("grad_ckpt"):
        parts.append("grad-ckpt")
    ac = info.get("autocast")
    if ac and ac != "off":
        parts.append(f"autocast {ac}")
    shard = info.get("sharding")
    if shard:
        kind = shard.get("kind")
        if kind == "deepspeed" and "zero_stage" in shard:
            parts.append(f"ZeRO-{shard['zero_stage']}")
        elif kind == "fsdp" and shard.get("strategy"):
            parts.append(f"FSDP {shard['strategy']}")
        else:
            parts.append(str(kind).upper())
    return " · ".join(parts)


# ----------------------------------------------------------------------------- optimizer


def unwrap_optimizer(opt, limit: int = 6):
    """The torch optimizer inside accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer, etc."""
    for _ in range(limit):
        inner = None
        for attr in ("optimizer", "_optimizer", "optim"):
            cand = getattr(opt, attr, None)
            if cand is not None and cand is not opt and hasattr(cand, "param_groups") and hasattr(cand, "state"):
                inner = cand
                break
        if inner is None:
            return opt
        opt = inner
    return opt


def describe_optimizer(opt) -> dict:
    """The hello message's `optimizer` map: class, state_dtype, and bits/paged/zero when they apply."""
    outer = type(opt).__name__
    core = unwrap_optimizer(opt)
    info: dict[str, Any] = {"class": type(core).__name__}
    if core is not opt:
        info["wrapper"] = outer
    mod = type(core).__module__ or ""
    if mod.startswith("bitsandbytes"):
        info["library"] = "bitsandbytes"
        args = getattr(core, "args", None)
        bits = getattr(args, "optim_bits", None)
        if isinstance(bits, int):
            info["bits"] = bits
        info["paged"] = bool(getattr(core, "is_paged", False))
    if outer == "ZeroRedundancyOptimizer" or type(core).__name__ == "ZeroRedundancyOptimizer":
        info["zero"] = 1
    name = type(core).__name__
    if name.startswith("DeepSpeedZeroOptimizer"):
        info["zero"] = 3 if name.endswith("Stage3") else (2 if getattr(core, "partition_gradients", False) else 1)
    try:
        best = None
        for state in list(core.state.values())[:4]:
            if isinstance(state, dict):
                for v in state.values():
                    if hasattr(v, "dtype") and hasattr(v, "numel") and (best is None or v.numel() > best.numel()):
                        best = v
        if best is not None:
            info["state_dtype"] = str(best.dtype).replace("torch.", "")
    except Exception:
        pass
    return info
