"""The estimator without torch: formulas, presets, configs, setups, the output format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vramtop_agent.estimator import (
    BLOCKS,
    PHASES,
    Setup,
    SetupError,
    estimate,
    from_hf_config,
    get_preset,
    load_config,
    parse_bytes,
)
from vramtop_agent.estimator.units import card_bytes
from vramtop_agent.estimator.weights import inventory, tensor_bytes, weight_bytes

GIB = 2**30


def test_importable_without_torch():
    code = ("import sys, vramtop_agent.estimator as e; "
            "from vramtop_agent.estimator import execute, live, allocator, device, model_source; "
            "e.estimate(e.get_preset('llama-2-7b'), e.Setup(method='qlora')); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_presets_have_the_published_parameter_counts():
    # Totals from the model cards (tied embeddings counted once).
    expected = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496,
                "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_241_732_096, "gpt2": 124_439_808}
    for name, n in expected.items():
        assert get_preset(name).param_count() == n, name


def test_preset_names_and_aliases():
    assert get_preset("Llama-2-7B").name == "llama-2-7b"
    assert get_preset("meta-llama/Llama-2-7b-hf").hidden_size == 4096
    assert get_preset("gpt2-small").arch == "gpt2"
    with pytest.raises(ValueError, match="unknown model 'llama-9'"):
        get_preset("llama-9")


def test_nf4_double_quant_is_4_127_bits_per_weight():
    p = inventory(get_preset("llama-2-7b"), Setup(method="qlora"))
    q = next(t for t in p if t.name == "layers.0.q_proj")
    bits = 8 * tensor_bytes(q, Setup(method="qlora")) / q.numel
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.001)  # 4.127
    no_dq = 8 * tensor_bytes(q, Setup(method="qlora", double_quant=False)) / q.numel
    assert no_dq == pytest.approx(4.5, abs=0.001)  # one fp32 absmax per 64 weights


def test_qlora_keeps_embeddings_norms_and_lm_head_unquantized():
    setup = Setup(method="qlora")
    inv = {t.name: t for t in inventory(get_preset("llama-2-7b"), setup)}
    assert inv["embed_tokens"].dtype == "fp32"      # prepare_model_for_kbit_training casts them to fp32
    assert inv["lm_head"].dtype == "fp32"
    assert inv["layers.0.input_layernorm"].dtype == "fp32"
    assert inv["layers.0.down_proj"].dtype == "nf4"
    without_prep = {t.name: t for t in inventory(get_preset("llama-2-7b"), Setup(method="qlora", kbit_prep=False))}
    assert without_prep["lm_head"].dtype == "bf16"


def test_mixed_precision_adamw_is_16_bytes_per_parameter():
    """ZeRO paper (Rajbhandari et al. 2020): 2 (bf16 weights) + 2 (grads) + 4 (fp32 master) + 8 (Adam)."""
    model = get_preset("llama-2-7b")
    wb = weight_bytes(model, Setup(method="full", weight_dtype="bf16"))  # masters on by default
    n = model.param_count()
    assert wb.parameters + wb.gradients + wb.optimizer == 16 * n
    assert wb.master_weights == 4 * n
    pure = weight_bytes(model, Setup(method="full", weight_dtype="bf16", master_weights=False))
    assert pure.optimizer == 4 * n  # states in bf16, as torch's AdamW does for bf16 params


def test_lora_optimizer_state_follows_rank_and_targets():
    model = get_preset("llama-2-7b")
    qv = weight_bytes(model, Setup(method="lora", lora_rank=16))
    # q and v: (4096*16 + 16*4096) each, 32 layers, fp32 adapters, two AdamW moments.
    per_layer = 2 * (4096 * 16 + 16 * 4096)
    assert qv.optimizer_states == 32 * per_layer * 4 * 2
    assert qv.gradients == 32 * per_layer * 4
    all_lin = weight_bytes(model, Setup(method="lora", lora_rank=16, lora_targets=("all-linear",)))
    assert all_lin.gradients > 3 * qv.gradients
    with pytest.raises(SetupError, match="'qkv_proj' is not a linear layer"):
        weight_bytes(model, Setup(method="lora", lora_targets=("qkv_proj",)))


def test_zero_stages_shard_optimizer_then_gradients_then_parameters():
    model = get_preset("llama-3-8b")
    base = estimate(model, Setup(method="full", seq_len=512))
    z1 = estimate(model, Setup(method="full", seq_len=512, world_size=8, zero=1))
    z2 = estimate(model, Setup(method="full", seq_len=512, world_size=8, zero=2))
    z3 = estimate(model, Setup(method="full", seq_len=512, world_size=8, zero=3))
    assert z1.blocks["optimizer"] == pytest.approx(base.blocks["optimizer"] / 8, rel=1e-6)
    assert z1.blocks["gradients"] == base.blocks["gradients"]
    assert z2.blocks["gradients"] == pytest.approx(base.blocks["gradients"] / 8, rel=1e-6)
    assert z3.blocks["parameters"] == pytest.approx(base.blocks["parameters"] / 8, rel=1e-6)
    assert z3.peak < z2.peak < z1.peak < base.peak


def test_eager_attention_adds_the_fp32_score_matrix():
    model = get_preset("llama-2-7b")
    kw = dict(method="full", batch=1, seq_len=2048, master_weights=False)
    sdpa = estimate(model, Setup(attn="sdpa", **kw))
    eager = estimate(model, Setup(attn="eager", **kw))
    s2 = model.num_layers * model.num_heads * 2048 * 2048
    # Per layer: the fp32 softmax output (4 bytes), and its bf16 copy (2 bytes) kept by the value matmul.
    assert eager.activations_by_term["attention softmax"] == 4 * s2
    assert eager.activations_by_term["attention values"] >= 2 * s2
    assert "attention softmax" not in sdpa.activations_by_term
    # Everything else is the same size either way (q, k, v, the attention output; SDPA adds a b·heads·s lse).
    assert eager.blocks["activations"] - sdpa.blocks["activations"] == pytest.approx(6 * s2, rel=0.001)


def test_full_bf16_activations_match_the_korthikanti_structure():
    """Korthikanti et al. 2022 eq. 1 gives s·b·h·34 bytes per layer (16-bit, no s² term with flash).
    HF Llama keeps a different set (fp32 RMSNorm copies, SwiGLU, no GELU/bias terms); the
    estimate must land in the same range, not equal it."""
    model = get_preset("llama-2-7b")
    est = estimate(model, Setup(method="full", batch=1, seq_len=4096, attn="sdpa"))
    per_layer_tokens = 4096 * model.hidden_size
    layers = est.blocks["activations"] - est.activations_by_term["loss"]
    per_layer = layers / model.num_layers / per_layer_tokens
    assert 30 < per_layer < 50


def test_checkpointing_keeps_only_layer_inputs():
    model = get_preset("llama-2-7b")
    est = estimate(model, Setup(method="full", batch=2, seq_len=1024, grad_ckpt=True))
    assert est.activations_by_term["checkpoint inputs"] == model.num_layers * 2 * 1024 * 4096 * 2
    off = estimate(model, Setup(method="full", batch=2, seq_len=1024))
    assert est.blocks["activations"] < off.blocks["activations"] / 5
    # Recomputation happens in backward: the backward peak rises above the end of forward by about a layer.
    assert est.phase_peaks["backward"] > est.end_of_forward


def test_loss_spike_is_12_to_16_bytes_per_logit():
    """Issue: ~10-16 bytes x b x s x vocab; 4 GB per 8k tokens for a 128k vocabulary."""
    model = get_preset("llama-3-8b")
    s = 8192
    est = estimate(model, Setup(method="lora", batch=1, seq_len=s, grad_ckpt=True))
    logits = s * model.vocab_size
    spike = est.phase_peaks["backward"] - est.end_of_forward
    # At the peak (log_softmax's backward): bf16 logits held by the output (2), the saved fp32
    # log-softmax (4), its incoming gradient (4) and the gradient it produces (4) = 14 bytes/logit.
    at_peak = spike + est.activations_by_term["loss"] + est.other_parts["held_outputs"]
    assert 10 * logits <= at_peak <= 16 * logits
    assert spike == pytest.approx(8 * logits, rel=0.01)
    assert est.activations_by_term["loss"] == pytest.approx(4 * logits, rel=0.01)  # fp32 log-softmax ~ 4.2 GB


def test_lora_dropout_keeps_a_copy_of_every_adapted_input():
    model = get_preset("llama-2-7b")
    tokens_h = 1024 * 4096

    def extra(**kw):
        kw.update(method="lora", batch=1, seq_len=1024, lora_targets=("q_proj", "v_proj"))
        return (estimate(model, Setup(lora_dropout=0.05, **kw)).blocks["activations"]
                - estimate(model, Setup(**kw)).blocks["activations"])

    # fp32 base: without dropout q's and v's adapters share the norm output; with it each keeps its
    # own dropped copy (4 bytes) plus a CUDA bool mask (1 byte). Layer 0's input needs no grad: no masks.
    assert extra(weight_dtype="fp32") == (31 * (2 * 4 + 2 * 1 - 4) + (2 * 4 - 4)) * tokens_h
    # bf16 base, fp32 adapters: PEFT already casts a separate fp32 copy per adapter; dropout adds the masks.
    assert extra(weight_dtype="bf16") == 31 * 2 * 1 * tokens_h


def test_phase_peaks_and_blocks_are_consistent():
    est = estimate(get_preset("mistral-7b"), Setup(method="qlora", batch=2, seq_len=1024, grad_ckpt=True))
    assert set(est.blocks) == set(BLOCKS) and set(est.phase_peaks) == set(PHASES)
    # Three peaks: allocated (phases) <= reserved (whole 2 MiB segments) < device (+ context + workspaces).
    assert est.peak_allocated == max(est.phase_peaks.values())
    assert est.peak_allocated <= est.peak_reserved < est.peak_allocated + 24 * 2**20
    assert est.peak == est.device == (est.peak_reserved + est.other_parts["cuda_context"]
                                      + est.device_parts["workspaces"])
    assert est.phase_peaks["forward"] >= est.end_of_forward - est.other_parts["cuda_context"] - 1
    assert all(isinstance(t[0], str) and isinstance(t[1], int) and t[2] for t in est.terms)
    names = [t[0] for t in est.terms]
    assert "parameters: quantization constants" in names and "other: CUDA context" in names


def test_to_dict_is_plain_and_json_ready():
    d = estimate(get_preset("gpt2"), Setup(method="full", seq_len=1024)).to_dict()
    assert set(d) >= {"blocks", "peak", "phase_peaks", "terms", "setup"}
    assert json.loads(json.dumps(d)) == d
    assert all(isinstance(v, int) for v in d["blocks"].values())


def test_gpt2_preset_estimates():
    est = estimate(get_preset("gpt2"), Setup(method="full", weight_dtype="fp32", batch=8, seq_len=1024,
                                             attn="eager", master_weights=False))
    # GPT-2 small fp32 AdamW: 124M x 16 bytes, plus activations dominated by its 12 x s² scores.
    assert est.blocks["parameters"] == 4 * 124_439_808
    assert est.blocks["optimizer"] == 8 * 124_439_808
    assert est.activations_by_term["attention dropout"] > 0  # attn_pdrop = 0.1


def test_hf_config_json(tmp_path):
    cfg = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    desc = load_config(str(path))
    assert desc.qkv_bias and not desc.o_bias and desc.tie_word_embeddings
    assert load_config(str(tmp_path)).hidden_size == 64  # a directory works too
    # q/k/v biases counted: 2 layers x (64 + 32 + 32)
    no_bias = from_hf_config({**cfg, "model_type": "llama"})
    assert desc.param_count() - no_bias.param_count() == 2 * (64 + 32 + 32)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"model_type": "llama", "hidden_size": 64}', "no positive integer 'num_attention_heads'"),
    ('{"model_type": "bert", "hidden_size": 64, "intermediate_size": 1, "num_hidden_layers": 1, '
     '"num_attention_heads": 1, "vocab_size": 5, "hidden_act": "gelu"}',
     "the formula models llama, mistral, qwen2 and gpt2, not .bert."),
])
def test_bad_config_json(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_config(str(path))


@pytest.mark.parametrize("setup,message", [
    (Setup(method="full", weight_dtype="nf4"), "full fine-tuning cannot train nf4"),
    (Setup(method="qlora", weight_dtype="bf16"), "QLoRA needs a quantized base"),
    (Setup(optimizer="lion"), "unknown optimizer 'lion'"),
    (Setup(batch=0), "batch must be at least 1"),
    (Setup(method="lora", lora_rank=0), "LoRA rank must be at least 1"),
    (Setup(zero=4), "ZeRO stage"),
])
def test_impossible_setups_are_refused(setup, message):
    with pytest.raises(SetupError, match=message):
        estimate(get_preset("llama-2-7b"), setup)


def test_sizes_and_cards():
    assert parse_bytes("24GiB") == 24 * GIB
    assert parse_bytes("80 GB") == 80 * 10**9
    assert card_bytes("rtx4090")[1] == 24564 * 2**20
    assert card_bytes("A100-80G")[1] == 81920 * 2**20
    with pytest.raises(ValueError, match="unknown card"):
        card_bytes("rtx9999")


def test_optimizer_aliases_and_8bit_states():
    model = get_preset("llama-2-7b")
    adam = estimate(model, Setup(method="full", optimizer="adamw_torch", master_weights=False, seq_len=128))
    eight = estimate(model, Setup(method="full", optimizer="adamw_8bit", master_weights=False, seq_len=128))
    n = model.param_count()
    assert adam.blocks["optimizer"] == 4 * n  # bf16 states
    # 2 bytes per weight + fp32 absmax per 256 (+ the 32-bit norms): just over 2 bytes per weight.
    assert 2 * n < eight.blocks["optimizer"] < 2.05 * n


def test_paged_optimizer_states_are_on_the_device_but_not_allocated():
    """Paged optimizers keep their states in CUDA managed memory: nvidia-smi sees them, torch's counters don't."""
    model = get_preset("llama-2-7b")
    plain = estimate(model, Setup(method="lora", optimizer="adamw-8bit"))
    paged = estimate(model, Setup(method="lora", optimizer="paged-adamw-8bit"))
    states = paged.blocks["optimizer"]
    assert states == plain.blocks["optimizer"] > 0
    assert paged.peak_allocated == plain.peak_allocated - states
    assert paged.device_parts["paged_optimizer"] == states
    assert paged.device >= paged.peak_reserved + states


def test_caching_allocator_model_rounds_splits_and_reuses():
    from vramtop_agent.estimator.allocator import CachingAllocator

    a = CachingAllocator()
    a.malloc("x", 100)                  # small pool: 512 B block in a new 2 MiB segment
    assert (a.allocated, a.reserved) == (512, 2 << 20)
    a.malloc("y", 3 << 20)              # large, under 10 MiB: a 20 MiB segment, split
    assert (a.allocated, a.reserved) == (512 + (3 << 20), (2 << 20) + (20 << 20))
    a.free("y")
    a.malloc("z", 15 << 20)             # fits the merged free 20 MiB block: no new segment
    assert a.reserved == (22 << 20)
    a.malloc("w", 6 << 20)              # 5 MiB left there, too small: a new 20 MiB segment
    assert a.reserved == (42 << 20) and a.peak_reserved == a.reserved
    a.malloc("mid", 11 << 20)           # best fit: the 14 MiB left beside w, no new segment
    assert a.reserved == (42 << 20)
    a.malloc("big", (15 << 20) + 1)     # >= 10 MiB and nothing free fits: its own segment, rounded to 2 MiB
    assert a.reserved == (42 << 20) + (16 << 20)
    for key in ("x", "z", "w", "mid", "big"):
        a.free(key)
    assert a.allocated == 0 and a.reserved == (58 << 20)   # segments are kept
