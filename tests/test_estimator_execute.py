"""The execution path against real CPU training runs of six architecture families.

The estimator builds each tiny config on the meta device and executes one training step
(agent/vramtop_agent/estimator/execute.py); here the same config is built for real on the CPU,
trained under the agent, and compared:
- parameters, gradients, optimizer states, activations: byte for byte (the agent's measurement);
- the peak: within 3% of the CPU allocator's real peak (torch.profiler alloc/free events on top
  of what was alive when the step started; see test_estimator_accuracy.measure).
"""

from __future__ import annotations

import tempfile
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_estimator_accuracy import _set_ckpt, measure  # noqa: E402

from vramtop_agent.estimator import Setup, estimate, from_hf_config  # noqa: E402
from vramtop_agent.estimator.execute import execute  # noqa: E402

PEAK_TOLERANCE = 0.03
_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
_TIED = {**_COMMON, "tie_word_embeddings": True}
FAMILIES = {
    "llama": dict(model_type="llama", **_COMMON),
    "qwen2": dict(model_type="qwen2", **_COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=16, **_COMMON),
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=16, **_TIED),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=16, **_TIED),
    "phi3": dict(model_type="phi3", pad_token_id=0, **_COMMON),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_COMMON),
}
LORA_TARGETS = {"gpt_neox": ("query_key_value", "dense"), "phi3": ("qkv_proj", "o_proj"),
                "mixtral": ("q_proj", "v_proj")}
BATCH, SEQ = 2, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: why one thread


def _real_model(cfg: dict, method: str, tmpdir: str, attn: str = "eager", auto: str = "AutoModelForCausalLM"):
    """The real model of a tiny config (`auto`: transformers' class that builds it), 4-bit as transformers loads
    it for QLoRA (saved, reloaded with bitsandbytes NF4, prepared for kbit training)."""
    import transformers
    from transformers import AutoConfig

    auto_class = getattr(transformers, auto)
    cfg = dict(cfg)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf._attn_implementation = attn
    hf.use_cache = False
    torch.manual_seed(0)
    model = auto_class.from_config(hf)
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        model.save_pretrained(tmpdir)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = auto_class.from_pretrained(tmpdir, quantization_config=bnb, device_map="cpu",
                                           attn_implementation=attn)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _setup(family: str, method: str, ckpt: bool) -> Setup:
    targets = LORA_TARGETS.get(family, ("q_proj", "v_proj", "o_proj")) if method == "lora" else None
    return Setup(method=method, lora_rank=4, lora_targets=targets, weight_dtype=None if method == "qlora" else "fp32",
                 compute_dtype="fp32", master_weights=False, batch=BATCH, seq_len=SEQ, grad_ckpt=ckpt, attn="eager",
                 device="cpu", input_grads=False)


def _train_real(family: str, method: str, ckpt: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = _real_model(FAMILIES[family], method, tmp)
        if method != "full":
            from peft import LoraConfig, get_peft_model

            targets = _setup(family, method, ckpt).lora_targets
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM",
                                                     target_modules=list(targets) if targets else "all-linear"))
        _set_ckpt(model, ckpt)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        return measure(model, opt, {"input_ids": ids, "labels": ids.clone()})


def _compare(family: str, method: str, ckpt: bool) -> list[str]:
    est = execute(FAMILIES[family], _setup(family, method, ckpt))
    problems, _ = compare_with_real(f"{family} {method} ckpt={'on' if ckpt else 'off'}", est,
                                    lambda: _train_real(family, method, ckpt))
    return problems


def compare_with_real(case: str, est, train) -> tuple[list[str], str]:
    """An estimate against a real run (`train()`, measured by test_estimator_accuracy.measure): the three
    state blocks and the end-of-forward activations byte for byte, the peak within PEAK_TOLERANCE. Returns
    the problems and a one-line summary."""
    got = train()
    problems = [f"{case}: {block} measured {got['blocks'][block]} != estimated {est.blocks[block]}"
                for block in ("parameters", "gradients", "optimizer") if got["blocks"][block] != est.blocks[block]]
    acts = got["step"]["eof_blocks"]["activations"]
    if acts != est.blocks["activations"]:
        problems.append(f"{case}: activations measured {acts} != estimated {est.blocks['activations']}")
    real = got["real_peak"]
    if abs(est.peak_allocated - real) > PEAK_TOLERANCE * real:
        # The reference, not the estimate, has been seen to vary: once in a loaded full-suite run the real
        # Mixtral peak from the profiler's events came out 533 KB (11%) below its usual value, which every
        # other run reproduces to within 12 bytes. Cause not found yet (see the stop-9 note): measure the
        # real run once more before calling the estimate wrong, and say so.
        again = train()["real_peak"]
        warnings.warn(f"{case}: real peak {real} re-measured as {again}", stacklevel=2)
        real = again
    err = (est.peak_allocated - real) / real
    if abs(err) > PEAK_TOLERANCE:
        problems.append(f"{case}: peak measured {real}, estimated {est.peak_allocated} ({err:+.1%})")
    line = (f"{case}: params {est.blocks['parameters']} grads {est.blocks['gradients']} optim "
            f"{est.blocks['optimizer']} acts {est.blocks['activations']} (real {acts}); peak {est.peak_allocated} "
            f"vs real {real} ({err:+.2%})")
    return problems, line


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mixtral"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_family_matches_a_real_run(family, method):
    problems = []
    for ckpt in (False, True):
        problems += _compare(family, method, ckpt)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_mixture_of_experts_with_balanced_routing(method):
    """Mixtral: the real router sends each of 64 tokens to 2 of 4 experts; every saved tensor of an expert
    grows with its tokens, so when every expert is hit the total equals balanced routing's, byte for byte."""
    problems = []
    for ckpt in (False, True):
        problems += _compare("mixtral", method, ckpt)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("family,layers", [("llama", 7), ("gemma2", 8)])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_deep_models_are_extended_from_two_and_three_periods_exactly(family, layers, method):
    """Layers repeat (gemma2: sliding/global pairs), so executing 2 and 3 periods and extending
    linearly gives the same bytes as executing every layer."""
    cfg = dict(FAMILIES[family], num_hidden_layers=layers)
    setup = _setup(family, method, True)
    fast, full = execute(cfg, setup), execute(cfg, setup, exact=True)
    assert any("extended linearly" in a for a in fast.assumptions)
    assert not any("extended linearly" in a for a in full.assumptions)
    assert fast.blocks == full.blocks
    assert fast.phase_peaks == full.phase_peaks


def test_formula_and_execution_agree_on_llama_and_gpt2():
    """The hand-written graph (formula path) and the executed model give the same bytes."""
    for cfg, setup in (
        (FAMILIES["llama"], _setup("llama", "lora", False)),
        (FAMILIES["llama"], _setup("llama", "full", True)),
        (dict(model_type="gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
              attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0), Setup(method="full", weight_dtype="fp32",
                                                                     master_weights=False, batch=BATCH, seq_len=SEQ,
                                                                     attn="eager", device="cpu")),
    ):
        formula, executed = estimate(from_hf_config(cfg), setup), execute(cfg, setup)
        for block in ("parameters", "gradients", "optimizer", "activations"):
            assert formula.blocks[block] == executed.blocks[block], (cfg["model_type"], block)
        assert abs(formula.peak_allocated - executed.peak_allocated) <= 0.03 * executed.peak_allocated


def test_70b_estimate_allocates_nothing_real():
    """Meta execution of Llama-3-70B QLoRA at 2k tokens: tens of GB predicted, a few MB of host memory used.
    (Its speed is a bench: bench/bench_estimator.py.)"""
    import resource
    import tracemalloc

    from vramtop_agent.estimator.presets import preset_config

    cfg = preset_config("llama-3-70b")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        est = execute(cfg, Setup(method="qlora", seq_len=2048, grad_ckpt=True))
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert est.peak_allocated > 40 * 2**30 and est.blocks["parameters"] > 35 * 2**30
    assert traced_peak < 64 * 2**20 and rss_growth < 256 * 2**20
    assert est.peak_reserved >= est.peak_allocated and est.device > est.peak_reserved


def test_remembered_op_results_never_leak_between_estimates():
    """The op memo is keyed by input metadata and the default dtype: an fp16 LoRA estimate is the same
    before and after a QLoRA one (whose build casts to fp32) in the same process."""
    from vramtop_agent.estimator import execute as engine

    cfg = dict(FAMILIES["llama"])
    lora = Setup(method="lora", weight_dtype="fp16", batch=BATCH, seq_len=SEQ, device="cpu")
    engine._MEMO.clear()
    cold = execute(cfg, lora)
    execute(cfg, Setup(method="qlora", batch=BATCH, seq_len=SEQ, device="cpu"))
    warm = execute(cfg, lora)
    assert warm.blocks == cold.blocks and warm.phase_peaks == cold.phase_peaks
    assert set(warm.params_by_dtype) == {"fp16", "fp32"}   # fp16 base, fp32 adapters


_LIGHT_PROBE = """
import gc, sys
from vramtop_agent.estimator.execute import available
assert available(light=True)
import transformers.models as models
from transformers.utils import import_utils
scan = import_utils.create_import_structure_from_path
assert scan.cache_info().hits >= 1, scan.cache_info()       # models/ read once: the second reading was a hit
assert gc.isenabled() and gc.get_freeze_count() > 100_000, gc.get_freeze_count()
# A second, independent reading of models/ (the restored function, a key it has not cached) gives the same namespace.
again = import_utils._LazyModule("transformers.models", models.__file__,
                                 import_utils.define_import_structure(models.__file__))
assert again._class_to_module == models._class_to_module and again._modules == models._modules
assert sorted(again.__all__) == sorted(models.__all__)
assert again._object_missing_backend == models._object_missing_backend
print("ok")
"""


def test_light_imports_read_transformers_models_once_and_freeze_only_a_fresh_process():
    """available(light=True), what the CLI calls in a fresh process: transformers' models/ folder is read once
    instead of twice, with the same lazy namespace as a reading of its own; the reading function is put back;
    the collector is on again, the imported objects frozen out of it. A process that had imported torch before
    (this one) gets nothing frozen: a frozen object is never collected."""
    import gc
    import subprocess
    import sys

    from vramtop_agent.estimator.execute import available

    done = subprocess.run([sys.executable, "-c", _LIGHT_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    frozen = gc.get_freeze_count()
    assert available(light=True) and gc.get_freeze_count() == frozen and gc.isenabled()
