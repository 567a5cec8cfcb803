"""Fill the estimator's inputs from a live torch model and optimizer.

Called once per run by the in-process agent. Everything is read, nothing is
changed, and nothing raises: what cannot be told is left out (None for the
model description, defaults for the setup fields) so the agent can still
publish what it knows. torch is imported lazily (only the caller has it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from vramtop_agent.estimator.model_desc import ModelDesc, from_hf_config
from vramtop_agent.estimator.setup import Setup
from vramtop_agent.estimator.units import norm_dtype

if TYPE_CHECKING:   # annotations only: torch is the caller's, never imported here at import time
    import torch
    from torch import nn

    Optimizer = torch.optim.Optimizer
    Batch = int | list[int] | tuple[int, ...] | None   # rows, or the agent's [rows, seq_len]

T = TypeVar("T")

_ATTN = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash", "flash_attention_3": "flash",
         "flex_attention": "sdpa"}


def describe_live(model: nn.Module, optimizer: Optimizer | None = None, batch: Batch = None,
                  seq_len: int | None = None) -> tuple[ModelDesc | None, Setup | None]:
    """(model_desc, setup) of a running job. `batch` may be an int or the agent's [batch, seq_len]."""
    if isinstance(batch, (list, tuple)):
        if len(batch) >= 2 and seq_len is None:
            seq_len = batch[1]
        rows = batch[0] if batch else None
    else:
        rows = batch
    desc = _safe(lambda: _model_desc(model))
    setup = _safe(lambda: _setup(model, optimizer, rows, seq_len))
    return desc, setup


def _safe(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception:
        return None


def _config(model: nn.Module) -> object | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        base = getattr(getattr(model, "base_model", None), "model", None)
        cfg = getattr(base, "config", None)
    return cfg


def _model_desc(model: nn.Module) -> ModelDesc | None:
    cfg = _config(model)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    return from_hf_config(cfg.to_dict(), name=getattr(cfg, "_name_or_path", None) or type(model).__name__)


def _setup(model: nn.Module, optimizer: Optimizer | None, batch: int | None, seq_len: int | None) -> Setup:
    kw: dict = {}
    lora = _lora(model)
    quant = _quant(model)
    if quant:
        kw.update(quant)
        kw["method"] = "qlora" if lora else "lora"
    else:
        kw["method"] = "lora" if lora else "full"
    if lora:
        kw.update(lora)
    base_dtype = _base_linear_dtype(model)
    if base_dtype and not quant:
        kw["weight_dtype"] = base_dtype
    # transformers models only (nn.Module declares no get_input_embeddings); _safe answers None for others
    emb = _safe(lambda: model.get_input_embeddings().weight.dtype)  # type: ignore[operator]
    if emb is not None:
        kw["other_dtype"] = norm_dtype(emb)
    kw["master_weights"] = False  # torch optimizers keep states in the parameter's dtype, no separate copy
    kw["grad_ckpt"] = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    kw["input_grads"] = any(getattr(m, "_require_grads_hook", None) is not None for m in model.modules())
    cfg = _config(model)
    impl = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    if impl in _ATTN:
        kw["attn"] = _ATTN[impl]
    dev = next((p.device for p in model.parameters()), None)
    kw["device"] = "cuda" if dev is not None and dev.type == "cuda" else (dev.type if dev is not None else "cuda")
    if optimizer is not None:
        kw.update(_optimizer(optimizer))
    else:
        kw["optimizer"] = "none"
    if batch:
        kw["batch"] = int(batch)
    if seq_len:
        kw["seq_len"] = int(seq_len)
    kw.update(_distributed(model))
    return Setup(**kw)


def _lora(model: nn.Module) -> dict | None:
    """Rank, targets, dropout and dtype of PEFT LoRA adapters (read from the modules themselves)."""
    ranks, targets, drops, dtypes = set(), [], set(), set()
    for name, mod in model.named_modules():
        la = getattr(mod, "lora_A", None)
        if la is None or not hasattr(la, "items") or not len(la):
            continue
        for adapter, lin in la.items():
            w = getattr(lin, "weight", None)
            if w is None:
                continue
            ranks.add(int(w.shape[0]))
            dtypes.add(norm_dtype(w.dtype))
            drops_mod = getattr(mod, "lora_dropout", None)  # an nn.ModuleDict: Dropout or Identity per adapter
            drop = drops_mod[adapter] if drops_mod is not None and adapter in drops_mod else None
            drops.add(float(getattr(drop, "p", 0.0) or 0.0))
        leaf = name.split(".")[-1]
        if leaf not in targets:
            targets.append(leaf)
    if not ranks:
        return None
    return {"lora_rank": max(ranks), "lora_targets": tuple(targets), "lora_dropout": max(drops or {0.0}),
            "lora_dtype": dtypes.pop() if len(dtypes) == 1 else "fp32"}


def _quant(model: nn.Module) -> dict | None:
    """bitsandbytes Params4bit (NF4/FP4, double quant) or Int8Params in the model."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        kind = type(w).__name__
        if kind == "Params4bit":
            qs = getattr(w, "quant_state", None)
            qtype = getattr(qs, "quant_type", None) or getattr(w, "quant_type", "nf4")
            out = {"weight_dtype": "fp4" if qtype == "fp4" else "nf4",
                   "double_quant": bool(getattr(qs, "nested", False) or getattr(w, "compress_statistics", False))}
            cd = getattr(mod, "compute_dtype", None)
            if cd is not None:
                out["compute_dtype"] = norm_dtype(cd)
            return out
        if kind == "Int8Params":
            return {"weight_dtype": "int8"}
    return None


def _base_linear_dtype(model: nn.Module) -> str | None:
    """Dtype of the first linear weight inside the decoder layers (not embeddings or adapters)."""
    for name, mod in model.named_modules():
        if "lora_" in name or "layers" not in name and ".h." not in name:
            continue
        w = getattr(mod, "weight", None)
        if w is not None and getattr(w, "ndim", 0) == 2 and w.is_floating_point():
            return norm_dtype(w.dtype)
    return None


def _optimizer(opt: Optimizer | None) -> dict:
    cls = type(opt).__name__.lower()
    defaults = getattr(opt, "defaults", {}) or {}
    if "paged" in cls:
        name = "paged-adamw-8bit" if "8bit" in cls else "paged-adamw"
    elif "8bit" in cls:
        name = "adamw-8bit"
    elif cls in ("adamw", "adam"):
        name = "adamw"
    elif cls == "sgd":
        name = "sgd-momentum" if defaults.get("momentum", 0) else "sgd"
    elif cls == "adafactor":
        name = "adafactor"
    else:
        name = "none"
    out: dict[str, str | bool] = {"optimizer": name}
    if defaults.get("fused"):
        out["foreach"] = False
    elif defaults.get("foreach") is not None:
        out["foreach"] = bool(defaults["foreach"])
    return out


def _distributed(model: nn.Module) -> dict:
    out: dict = {}
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            out["world_size"] = int(dist.get_world_size())
    except Exception:
        pass
    if type(model).__name__ == "FullyShardedDataParallel":
        out["zero"] = 3
    return out


# ------------------------------------------------------------------ keeping the live estimate current


def estimate_key(model: nn.Module, optimizer: Optimizer | None, batch: Batch) -> tuple:
    """What the live estimate depends on: which model, which optimizer, which input shape. The agent
    re-estimates whenever this changes (the optimizer is often found after the first forward)."""
    shape = tuple(batch) if isinstance(batch, (list, tuple)) else batch
    return (id(model), id(optimizer), shape)


_running: dict = {}   # the one execution subprocess per process: {"key": ..., "proc": Popen}


def live_estimate(model: nn.Module, optimizer: Optimizer | None, batch: Batch,
                  publish: Callable[[dict], object], key: object = None) -> str | None:
    """Estimate the running job and hand the result (Estimate.to_dict()) to `publish`.

    Llama-style and GPT-2 models get the formula (a few ms, on this thread). Any other model with a
    transformers config is executed on the meta device in a subprocess at low priority, so the job
    never runs the execution's dispatch mode or its global patches; a daemon thread waits for it and
    publishes. Returns the engine used, or None when nothing can be estimated."""
    from vramtop_agent.estimator.estimate import estimate

    desc, setup = describe_live(model, optimizer, batch)
    if setup is None:
        return None
    if desc is not None:
        publish(estimate(desc, setup).to_dict())
        return "formula"
    config = _safe(lambda: _config_json(model))
    if config is None:
        return None
    _start_execution(config, setup, publish, key)
    return "execute"


def _config_json(model: nn.Module) -> dict | None:
    import json

    cfg = _config(model)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        return None
    return json.loads(cfg.to_json_string(use_diff=False))


def _start_execution(config: dict, setup: Setup, publish: Callable[[dict], object], key: object) -> None:
    import json
    import os
    import subprocess
    import sys
    import threading

    old = _running.get("proc")
    if old is not None and old.poll() is None:
        old.kill()   # a newer model/optimizer/shape: the old answer is no longer wanted
    payload = json.dumps({"config": config, "setup": setup.to_dict()})
    env = dict(os.environ, VRAMTOP="0", VRAMTOP_RECORD="", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    # Low priority, set by the child itself (preexec_fn is unsafe in a process with threads).
    code = ("import os, runpy\nif hasattr(os, 'nice'): os.nice(10)\n"
            "runpy.run_module('vramtop_agent.estimator.execute', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    _running.update(key=key, proc=proc)

    def wait() -> None:
        try:
            out, _ = proc.communicate(payload, timeout=600)
        except Exception:
            proc.kill()
            return
        if proc.returncode == 0 and _running.get("proc") is proc:
            with _quiet_errors():
                publish(json.loads(out))

    threading.Thread(target=wait, name="vramtop-estimate", daemon=True).start()


class _quiet_errors:  # noqa: N801 - a tiny context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True
