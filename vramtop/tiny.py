"""A tiny Llama built from a config with random weights: the demo's and the tests' model.

Nothing is downloaded: the architecture comes from a LlamaConfig and the
weights are random, so it runs anywhere transformers is installed.
"""

from __future__ import annotations

from typing import Any

TINY_LLAMA = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def llama_config(**overrides: Any):
    from transformers import LlamaConfig

    cfg: dict[str, Any] = dict(TINY_LLAMA)
    cfg.update(overrides)
    cfg.setdefault("attn_implementation", "eager")
    attn = cfg.pop("attn_implementation")
    config = LlamaConfig(**cfg)
    config._attn_implementation = attn
    return config


def build_model(seed: int = 0, dtype=None, **overrides: Any):
    """A LlamaForCausalLM with random weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides))
    if dtype is not None:
        model = model.to(dtype)
    return model


def add_lora(model, rank: int = 8, targets=("q_proj", "v_proj"), dropout: float = 0.0, alpha: int = 16):
    """PEFT LoRA on the given projections; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_batch(model, batch: int = 2, seq_len: int = 64, seed: int = 0, device=None):
    """Random token ids with labels = inputs (causal LM loss)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    if device is not None:
        ids = ids.to(device)
    return {"input_ids": ids, "labels": ids.clone()}
