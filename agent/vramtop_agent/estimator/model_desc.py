"""What the estimator needs to know about a model: architecture numbers only.

Two families cover the presets and most decoder checkpoints:
- "llama": RMSNorm, rotary positions, SwiGLU MLP, separate q/k/v/o projections
  (Llama 2/3, Mistral, Qwen2 with q/k/v bias),
- "gpt2": LayerNorm, learned positions, GELU MLP, fused qkv (Conv1D), dropout.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from vramtop_agent.estimator.seq2seq import encoder_decoder


@dataclass(frozen=True)
class Linear:
    name: str       # module name inside a layer, as PEFT's target_modules sees it
    fan_in: int
    fan_out: int
    bias: bool


@dataclass(frozen=True)
class ModelDesc:
    name: str
    arch: str                   # "llama" | "gpt2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_positions: int = 4096
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    padded_vocab: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def layer_linears(self) -> list[Linear]:
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        if self.arch == "gpt2":
            return [Linear("c_attn", h, 3 * h, True), Linear("attn.c_proj", h, h, True),
                    Linear("c_fc", h, i, True), Linear("mlp.c_proj", i, h, True)]
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        return [
            Linear("q_proj", h, q, self.qkv_bias), Linear("k_proj", h, kv, self.qkv_bias),
            Linear("v_proj", h, kv, self.qkv_bias), Linear("o_proj", q, h, self.o_bias),
            Linear("gate_proj", h, i, self.mlp_bias), Linear("up_proj", h, i, self.mlp_bias),
            Linear("down_proj", i, h, self.mlp_bias),
        ]

    def linear_names(self) -> list[str]:
        return [lin.name.split(".")[-1] for lin in self.layer_linears()]

    def param_count(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        per_layer = sum(lin.fan_in * lin.fan_out + (lin.fan_out if lin.bias else 0) for lin in self.layer_linears())
        norms = 2 * h * (2 if self.arch == "gpt2" else 1)
        total = self.num_layers * (per_layer + norms) + v * h + h * (2 if self.arch == "gpt2" else 1)
        if not self.tie_word_embeddings:
            total += v * h
        if self.arch == "gpt2":
            total += self.max_positions * h
        return total

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra", None)
        return d


# Llama-style families whose HF forward is exactly the graph activations.py replays.
FORMULA_TYPES = ("llama", "mistral", "qwen2")


def from_hf_config(cfg: dict, name: str | None = None) -> ModelDesc:
    """A ModelDesc from the numbers of a transformers config.json (or config.to_dict())."""
    if not isinstance(cfg, dict):
        raise ValueError("config is not a JSON object")
    if "text_config" in cfg and "hidden_size" not in cfg and isinstance(cfg["text_config"], dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    mtype = str(cfg.get("model_type") or "").lower()
    name = name or cfg.get("_name_or_path") or mtype or "model"
    if mtype == "gpt2" or ("n_embd" in cfg and "n_layer" in cfg):
        h = _int(cfg, "n_embd")
        heads = _int(cfg, "n_head")
        return ModelDesc(
            name=name, arch="gpt2", vocab_size=_int(cfg, "vocab_size"), hidden_size=h,
            intermediate_size=int(cfg.get("n_inner") or 4 * h), num_layers=_int(cfg, "n_layer"),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads, tie_word_embeddings=True,
            max_positions=int(cfg.get("n_positions") or 1024),
            hidden_act=str(cfg.get("activation_function") or "gelu_new"),
            attention_dropout=float(cfg.get("attn_pdrop") or 0.0),
            resid_dropout=float(cfg.get("resid_pdrop") or 0.0),
            embd_dropout=float(cfg.get("embd_pdrop") or 0.0),
        )
    if encoder_decoder(cfg):
        raise ValueError(f"{name}: {mtype or 'this'} is an encoder-decoder model: the formula engine models "
                         f"decoder-only Llama-style models and GPT-2; use --engine execute (torch, transformers "
                         f"and peft installed)")
    if mtype and mtype not in FORMULA_TYPES:
        raise ValueError(f"{name}: the formula models {', '.join(FORMULA_TYPES)} and gpt2, not {mtype!r} "
                         f"(the execution engine covers it)")
    h = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads")
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    act = str(cfg.get("hidden_act") or "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{name}: hidden_act {act!r} is not a SwiGLU model; supported: llama-style and gpt2")
    qkv_bias = bool(cfg.get("attention_bias", False)) or mtype in ("qwen2",)
    return ModelDesc(
        name=name, arch="llama", vocab_size=_int(cfg, "vocab_size"), hidden_size=h,
        intermediate_size=_int(cfg, "intermediate_size"), num_layers=_int(cfg, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_positions=int(cfg.get("max_position_embeddings") or 4096), hidden_act="silu",
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
    )


def describe_any(cfg: dict, name: str | None = None) -> ModelDesc:
    """For the execution path: the formula's description when it knows the family, otherwise the
    numbers for display only (arch = the config's model_type; the formula is never run on it)."""
    try:
        return from_hf_config(cfg, name=name)
    except ValueError:
        pass
    if "text_config" in cfg and isinstance(cfg["text_config"], dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    get = lambda *keys, default=0: next((int(cfg[k]) for k in keys if isinstance(cfg.get(k), int)), default)  # noqa: E731
    h = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", default=1)
    return ModelDesc(
        name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model"),
        arch=str(cfg.get("model_type") or "unknown"), vocab_size=get("vocab_size"), hidden_size=h,
        intermediate_size=get("intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim", default=4 * h),
        num_layers=get("num_hidden_layers", "n_layer", "num_layers", "encoder_layers"), num_heads=heads,
        num_kv_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", "d_kv", default=h // max(heads, 1)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_positions=get("max_position_embeddings", "n_positions", "max_seq_len", default=0),
        hidden_act=str(cfg.get("hidden_act") or cfg.get("hidden_activation") or ""),
    )


def _int(cfg: dict, key: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"config has no positive integer {key!r}")
    return v


def load_config(path: str) -> ModelDesc:
    """A config.json file, or a directory holding one."""
    from vramtop_agent.estimator.model_source import read_config  # one reader of config.json files

    cfg = read_config(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    return from_hf_config(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))) or path)
