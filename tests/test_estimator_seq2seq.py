"""Encoder-decoder models (T5, Flan-T5, mT5, BART) in the execution engine, against real CPU training runs.

Same method as test_estimator_execute.py: the tiny config is built for real on the CPU (QLoRA: saved,
then loaded through transformers' bitsandbytes NF4 + double-quant loader), trained under the agent with
the encoder's input_ids (SEQ tokens) and the decoder's labels (TARGET tokens, a different length so a
mix-up shows), and compared with `execute()` of the same config:
- parameters, gradients, optimizer states, activations: byte for byte;
- the peak: within 3 % of the CPU allocator's real peak (profiler alloc/free events on top of what was
  alive when the step started).
"""

from __future__ import annotations

import json
import tempfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_estimator_accuracy import _set_ckpt, measure  # noqa: E402
from test_estimator_execute import _real_model as real_model  # noqa: E402
from test_estimator_execute import compare_with_real  # noqa: E402

from vramtop.cli import main  # noqa: E402
from vramtop_agent.estimator import Setup, SetupError, estimate  # noqa: E402
from vramtop_agent.estimator.execute import execute  # noqa: E402
from vramtop_agent.estimator.model_desc import from_hf_config  # noqa: E402

BATCH, SEQ, TARGET = 2, 32, 16
# Tiny copies of: Flan-T5 (gated GELU, tie_word_embeddings false so no output scaling, dropout 0.1 as
# published; eager attention), T5 v1.0 (ReLU, the decoder's output scaled by d_model^-0.5; no dropout, so
# SDPA takes its CPU flash kernel with the relative-position bias as its mask unless the bias trains),
# mT5 (T5 v1.1's code under another model_type) and BART (learned positions, GELU, an all-ones decoder mask
# that transformers checks before skipping the causal mask).
MODELS = {
    "flan": dict(model_type="t5", vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                 num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, is_encoder_decoder=True),
    "v1": dict(model_type="t5", vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2,
               num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, is_encoder_decoder=True),
    "bart": dict(model_type="bart", vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 max_position_embeddings=64, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, is_encoder_decoder=True),
}
MODELS["mt5"] = dict(MODELS["flan"], model_type="mt5")
LORA_TARGETS = {"flan": ("q", "v", "o", "wi_0", "wo"), "v1": ("q", "k", "v", "wi"), "mt5": ("q", "v"),
                "bart": ("q_proj", "v_proj", "fc1")}
ATTN = {"flan": "eager", "v1": "sdpa", "mt5": "sdpa", "bart": "sdpa"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: why one thread


def _setup(variant: str, method: str, ckpt: bool) -> Setup:
    targets = LORA_TARGETS[variant] if method == "lora" else None
    return Setup(method=method, lora_rank=4, lora_targets=targets, weight_dtype=None if method == "qlora" else "fp32",
                 compute_dtype="fp32", master_weights=False, batch=BATCH, seq_len=SEQ, target_len=TARGET,
                 grad_ckpt=ckpt, attn=ATTN[variant], device="cpu", input_grads=False)


def _real_model(cfg: dict, method: str, tmpdir: str, attn: str = "eager"):
    return real_model(cfg, method, tmpdir, attn, auto="AutoModelForSeq2SeqLM")


def _batch():
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(2, 512, (BATCH, SEQ), generator=gen),
            "labels": torch.randint(2, 512, (BATCH, TARGET), generator=gen)}


def _train_real(variant: str, method: str, ckpt: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = _real_model(MODELS[variant], method, tmp, ATTN[variant])
        if method != "full":
            from peft import LoraConfig, get_peft_model

            targets = _setup(variant, method, ckpt).lora_targets
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, task_type="SEQ_2_SEQ_LM",
                                                     target_modules=list(targets) if targets else "all-linear"))
        _set_ckpt(model, ckpt)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return measure(model, opt, _batch())


def _compare(variant: str, method: str, ckpt: bool) -> tuple[list[str], str]:
    est = execute(MODELS[variant], _setup(variant, method, ckpt))
    return compare_with_real(f"{variant} {method} ckpt={'on' if ckpt else 'off'}", est,
                             lambda: _train_real(variant, method, ckpt))


@pytest.mark.parametrize("variant,method", [(v, m) for v in ("flan", "v1", "bart") for m in ("full", "lora", "qlora")]
                         + [("mt5", "lora")])
def test_seq2seq_matches_a_real_run(variant, method):
    problems, lines = [], []
    for ckpt in (False, True):
        p, line = _compare(variant, method, ckpt)
        problems += p
        lines.append(line)
    print("\n".join(lines))
    assert not problems, "\n".join(problems)


def test_t5_qlora_keeps_the_feed_forward_output_unquantized():
    """transformers' 4-bit loader leaves T5's `wo` (its `_keep_in_fp32_modules`) a plain Linear: the
    estimate's 4-bit bytes (packed weights + quantization constants) are the real load's, and its fp32
    bytes include every `wo`."""
    from test_estimator_accuracy import _alive_at_step_start

    with tempfile.TemporaryDirectory() as tmp:
        real = _real_model(MODELS["flan"], "qlora", tmp)
    kinds = {name.rsplit(".", 1)[-1]: type(mod).__name__ for name, mod in real.named_modules()
             if name.startswith("encoder.block.0.layer.1.DenseReluDense.")}
    assert kinds["wo"] == "Linear" and kinds["wi_0"] == "Linear4bit"
    quantized = [p for p in real.parameters() if type(p).__name__ == "Params4bit"]
    plain = [p for p in real.parameters() if type(p).__name__ != "Params4bit"]
    nf4 = _alive_at_step_start(_Holder(quantized), _Holder([]), {})
    fp32 = sum({p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in plain}.values())
    est = execute(MODELS["flan"], Setup(method="qlora", batch=1, seq_len=8, target_len=8, device="cpu"))
    assert est.params_by_dtype == {"nf4": nf4, "fp32": fp32 + est.params_split["trainable"]}
    wo = sum(m.weight.numel() * 4 for n, m in real.named_modules() if n.endswith(".wo"))
    assert wo and est.params_by_dtype["fp32"] > wo


class _Holder:
    """What _alive_at_step_start reads: `.parameters()`, `.buffers()` of a model, `.state` of an optimizer."""

    def __init__(self, params):
        self._params = params
        self.state: dict = {}

    def parameters(self):
        return iter(self._params)

    def buffers(self):
        return iter(())


def test_fp16_weights_keep_t5s_wo_in_fp32_as_from_pretrained_does():
    """from_pretrained(dtype=float16) loads T5's `wo` in fp32 (`_keep_in_fp32_modules`); the estimate's
    parameter bytes by dtype are the real load's."""
    from transformers import AutoModelForSeq2SeqLM

    with tempfile.TemporaryDirectory() as tmp:
        _real_model(MODELS["flan"], "full", tmp).save_pretrained(tmp)
        real = AutoModelForSeq2SeqLM.from_pretrained(tmp, dtype=torch.float16)
    by_dtype: dict = {}
    for p in real.parameters():
        key = {torch.float16: "fp16", torch.float32: "fp32"}[p.dtype]
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    assert by_dtype.get("fp32", 0) > 0
    est = execute(MODELS["flan"], Setup(method="full", weight_dtype="fp16", master_weights=False, batch=1, seq_len=16,
                                    target_len=8, device="cpu"))
    assert est.params_by_dtype == by_dtype


# ------------------------------------------------------------------ two stacks, deep


@pytest.mark.parametrize("enc,dec", [(8, 8), (8, 4)])
def test_deep_t5_is_extended_from_scaled_copies_exactly(enc, dec):
    """8+8 layers: 2+2 and 3+3 executed; 8+4: 4+2 and 6+3 (the depths' ratio kept). Both extend to the
    same bytes as executing every layer, peaks included."""
    cfg = dict(MODELS["flan"], num_layers=enc, num_decoder_layers=dec)
    for method, ckpt in (("full", False), ("qlora", True)):
        setup = _setup("flan", method, ckpt)
        fast, full = execute(cfg, setup), execute(cfg, setup, exact=True)
        assert any("extended linearly" in a for a in fast.assumptions)
        assert not any("extended linearly" in a for a in full.assumptions)
        assert fast.blocks == full.blocks, (enc, dec, method)
        assert fast.phase_peaks == full.phase_peaks, (enc, dec, method)


# ------------------------------------------------------------------ the CLI


def _run(capsys, *argv):
    code = main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_estimates_a_t5_config_directory_and_extends_its_depth_exactly(capsys, tmp_path):
    cfg = dict(MODELS["flan"], num_layers=6, num_decoder_layers=6)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    argv = [str(tmp_path), "--method", "lora", "--seq-len", "64", "--target-len", "24", "--grad-ckpt"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "seq 64 -> target 24" in out and "assumption: encoder-decoder" in out and "device (nvidia-smi)" in out
    code, out, _ = _run(capsys, *argv, "--json")
    d = json.loads(out)
    assert code == 0 and d["engine"] == "execute" and d["setup"]["target_len"] == 24
    assert any("extended linearly" in a for a in d["assumptions"])
    exact = execute(cfg, Setup(method="lora", seq_len=64, target_len=24, grad_ckpt=True), exact=True)
    assert d["blocks"] == exact.blocks and d["peak_allocated"] == exact.peak_allocated
    assert d["peak_reserved"] >= d["peak_allocated"]


def test_cli_target_len_defaults_and_moves_the_estimate(capsys):
    """A T5 preset without lengths: encoder 512, decoder 128 (what a T5 fine-tune usually cuts at); a longer
    target costs more."""
    code, out, _ = _run(capsys, "flan-t5-base", "--method", "lora", "--json")
    d = json.loads(out)
    assert code == 0 and (d["setup"]["seq_len"], d["setup"]["target_len"]) == (512, 128)
    code, out, _ = _run(capsys, "flan-t5-base", "--method", "lora", "--target-len", "512", "--json")
    assert json.loads(out)["peak_allocated"] > d["peak_allocated"]
    # bf16 weights as this transformers builds them, + PEFT's default T5 targets q and v in fp32: rank 8 x
    # (768 in + 768 out) in each of 72 attention blocks (encoder self, decoder self and cross, 12 layers each).
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from vramtop_agent.estimator.presets import preset_config

    cfg = preset_config("flan-t5-base")
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert d["blocks"]["parameters"] == 2 * sum(p.numel() for p in model.parameters()) + 4 * 72 * 8 * 1536


def _t5_params(cfg: dict) -> int:
    """T5's parameter count from its config numbers, the output layer counted when the config unties it."""
    d, ff, inner, v = cfg["d_model"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"], cfg["vocab_size"]
    dense = (3 if cfg.get("feed_forward_proj", "relu").startswith("gated") else 2) * d * ff
    enc = 4 * d * inner + dense + 2 * d
    dec = 8 * d * inner + dense + 3 * d
    layers = cfg["num_layers"], cfg.get("num_decoder_layers") or cfg["num_layers"]
    head = 0 if cfg.get("tie_word_embeddings", True) else v * d
    return v * d + head + layers[0] * enc + layers[1] * dec + 2 * 32 * cfg["num_heads"] + 2 * d


def test_seq2seq_presets_have_the_published_parameter_counts():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from vramtop_agent.estimator.presets import preset_config

    published = {"flan-t5-base": 247_577_856, "flan-t5-large": 783_150_080, "flan-t5-xl": 2_849_757_184,
                 "t5-base": 222_903_552, "t5-large": 737_668_096}
    for name, n in published.items():
        assert _t5_params(preset_config(name)) == n, name
    cfg = preset_config("facebook/bart-large")
    with torch.device("meta"):
        bart = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert sum(p.numel() for p in bart.parameters()) == 406_291_456


@pytest.mark.parametrize("argv,message", [
    (["llama-2-7b", "--target-len", "64"], "--target-len applies to encoder-decoder models"),
    (["flan-t5-base", "--target-len", "0"], "target len must be at least 1"),
    (["flan-t5-base", "--loss", "chunked"], "--loss chunked is executed for causal LMs"),
    (["flan-t5-base", "--compile"], "--compile is executed for causal LMs"),
    (["flan-t5-base", "--engine", "formula"], "encoder-decoder model: the formula engine"),
])
def test_seq2seq_mistakes_are_one_line_errors(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_the_formula_engine_refuses_t5_pointing_to_execute():
    with pytest.raises(ValueError, match="--engine execute"):
        estimate(from_hf_config(MODELS["flan"]), Setup(device="cpu"))
    with pytest.raises(SetupError, match="target len"):
        execute(MODELS["flan"], Setup(device="cpu", target_len=-1))
