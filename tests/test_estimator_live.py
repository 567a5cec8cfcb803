"""The live estimate follows the job: re-estimated when the model, the optimizer or the input shape
becomes known or changes (issue 14, bug 1), and any transformers model gets one (the execution path,
in a subprocess), not only the formula's Llama/GPT-2."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import vramtop_agent  # noqa: E402
from vramtop.tiny import build_model, make_batch  # noqa: E402


def _step(model, opt, batch):
    model(**batch).loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_optimizer_found_after_the_first_forward_is_re_estimated():
    """Zero-code: the agent sees the model's first forward before any optimizer has stepped."""
    torch.set_num_threads(1)
    model = build_model(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(model, 2, 32)
    agent = vramtop_agent.watch(model, publish=False)   # no optimizer given: adopted when it steps
    try:
        _step(model, opt, batch)
        first = agent.estimate
        assert first is not None and first["blocks"]["optimizer"] == 0 and first["setup"]["optimizer"] == "none"
        _step(model, opt, batch)   # the optimizer is known now: the next forward re-estimates
        second = agent.estimate
        states = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values())
        assert second["setup"]["optimizer"] == "adamw" and second["blocks"]["optimizer"] == states
        _step(model, opt, make_batch(model, 3, 16))   # a new input shape: re-estimated again
        assert agent.estimate["setup"]["batch"] == 3 and agent.estimate["setup"]["seq_len"] == 16
    finally:
        agent.stop()


def test_a_model_the_formula_does_not_know_gets_an_executed_estimate():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 512, (2, 32))
    batch = {"input_ids": ids, "labels": ids.clone()}
    agent = vramtop_agent.watch(model, opt, publish=False)
    try:
        _step(model, opt, batch)
        deadline = time.time() + 240
        while agent.estimate is None and time.time() < deadline:
            _step(model, opt, batch)
            time.sleep(0.5)
        est = agent.estimate
        assert est is not None, "no executed estimate within 240 s"
        assert est["engine"] == "execute" and est["model"]["arch"] == "gemma2"
        params = sum(p.untyped_storage().nbytes() for p in model.parameters())
        assert est["blocks"]["parameters"] == params
        assert est["blocks"]["optimizer"] == sum(t.untyped_storage().nbytes() for s in opt.state.values()
                                                 for t in s.values())
    finally:
        agent.stop()


def test_what_if_on_an_executed_estimate_says_where_to_get_it():
    from vramtop import gap
    from vramtop_agent.estimator import Setup
    from vramtop_agent.estimator.execute import execute

    cfg = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    est = execute(cfg, Setup(method="lora", seq_len=32, device="cpu")).to_dict()
    with pytest.raises(ValueError, match="run `vramtop estimate` with the new settings"):
        gap.what_if(est, {"batch": 4})
