"""Built-in model presets: the architecture numbers of each config.json, nothing else.

Numbers are copied from the models' published config.json files on the
Hugging Face Hub (meta-llama/Llama-2-7b-hf, meta-llama/Meta-Llama-3-8B,
meta-llama/Meta-Llama-3-70B, Qwen/Qwen2.5-7B, mistralai/Mistral-7B-v0.1,
openai-community/gpt2, google/flan-t5-base, google/flan-t5-large, google/flan-t5-xl,
google-t5/t5-base, google-t5/t5-large, facebook/bart-large). No weights are involved.
The encoder-decoder ones (T5, BART) run on the execution engine only.
"""

from __future__ import annotations

import re

from vramtop_agent.estimator.model_desc import ModelDesc, from_hf_config

_CONFIGS = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=8192, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                 n_inner=None, activation_function="gelu_new", attn_pdrop=0.1, resid_pdrop=0.1,
                 embd_pdrop=0.1),
}

# T5 v1.1 / Flan-T5: gated-GELU feed-forward, a config that says tie_word_embeddings false (the original T5
# scales the decoder's output instead), vocabulary 32128, relative positions (n_positions is informational).
_T5 = dict(model_type="t5", vocab_size=32128, d_kv=64, relative_attention_num_buckets=32,
           relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6, n_positions=512,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, is_encoder_decoder=True)
_FLAN = dict(_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
_CONFIGS.update({
    "flan-t5-base": dict(_FLAN, d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "flan-t5-large": dict(_FLAN, d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    "flan-t5-xl": dict(_FLAN, d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    "t5-base": dict(_T5, d_model=768, d_ff=3072, num_heads=12, num_layers=12),
    "t5-large": dict(_T5, d_model=1024, d_ff=4096, num_heads=16, num_layers=24),
    "bart-large": dict(model_type="bart", vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
                       encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                       decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="gelu", dropout=0.1,
                       attention_dropout=0.1, activation_dropout=0.1, scale_embedding=False, pad_token_id=1,
                       bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, is_encoder_decoder=True),
})

_ALIASES = {
    "llama2-7b": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b", "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "llama2-13b": "llama-2-13b",
    "llama-3.1-8b": "llama-3-8b", "llama3-8b": "llama-3-8b", "meta-llama-3-8b": "llama-3-8b",
    "llama-3.1-70b": "llama-3-70b", "llama3-70b": "llama-3-70b", "meta-llama-3-70b": "llama-3-70b",
    "qwen2.5-7b-instruct": "qwen2.5-7b", "qwen-2.5-7b": "qwen2.5-7b",
    "mistral-7b-v0.1": "mistral-7b", "mistral-7b-instruct": "mistral-7b",
    "gpt2-small": "gpt2", "gpt-2": "gpt2", "gpt-2-small": "gpt2", "openai-community/gpt2": "gpt2",
    "google/flan-t5-base": "flan-t5-base", "google/flan-t5-large": "flan-t5-large", "google/flan-t5-xl": "flan-t5-xl",
    "google-t5/t5-base": "t5-base", "google-t5/t5-large": "t5-large", "facebook/bart-large": "bart-large",
}

PRESET_NAMES = tuple(_CONFIGS)


def _key(name: str) -> str:
    return re.sub(r"\s+", "-", name.strip().lower())


def preset_config(name: str) -> dict | None:
    """The config.json numbers of a preset, or None."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key.split("/")[-1] in _CONFIGS and key not in _CONFIGS:
        key = key.split("/")[-1]
    cfg = _CONFIGS.get(key)
    return dict(cfg) if cfg is not None else None


def get_preset(name: str) -> ModelDesc:
    cfg = preset_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}: use a config.json path or one of {', '.join(PRESET_NAMES)}")
    key = _ALIASES.get(_key(name), _key(name)).split("/")[-1]
    return from_hf_config(cfg, name=key)
