"""Phases and their peaks, from a real tiny fine-tune."""

import torch
from conftest import train_steps

import vramtop_agent
from vramtop.tiny import add_lora, build_model, make_batch

EDGES = [("forward", "start"), ("backward", "start"), ("backward", "end"), ("optimizer", "start"),
         ("optimizer", "end")]


def _watched(list_sink, grad_accum=1, steps=3, **agent_opts):
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], **agent_opts)
    b = make_batch(model, 2, 64)
    for _ in range(steps):
        for _ in range(grad_accum):
            model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    agent.stop()
    return agent, list_sink


def test_phases_come_in_order_every_step(list_sink):
    agent, sink = _watched(list_sink, sample_hz=0)
    edges = [(m["step"], m["phase"], m["edge"]) for m in sink.of("phase")]
    assert len(edges) == 3 * len(EDGES)
    for step in range(3):
        assert [(p, e) for s, p, e in edges if s == step] == EDGES
    steps = sink.of("step")
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert all(s["micro_steps"] == 1 and s["batch"] == [2, 64] for s in steps)
    assert all(s["step_time"] and s["step_time"] > 0 for s in steps)


def test_gradient_accumulation_makes_micro_steps(list_sink):
    agent, sink = _watched(list_sink, grad_accum=3, steps=2, sample_hz=0)
    steps = sink.of("step")
    assert [s["micro_steps"] for s in steps] == [3, 3]
    fwd_starts = [m for m in sink.of("phase") if m["phase"] == "forward" and m["edge"] == "start"]
    assert len(fwd_starts) == 6


def test_backward_peak_is_at_least_end_of_forward_and_breakdown_adds_up(list_sink):
    agent, sink = _watched(list_sink, sample_hz=0)
    for s in sink.of("step"):
        assert s["peaks"]["backward"] >= s["end_of_forward"] > 0
        assert s["backward_spike"] == s["peaks"]["backward"] - s["end_of_forward"]
        assert s["peak"] == max(s["peaks"].values())
        # On CPU the level is the bookkeeping itself: the breakdown at the peak is the peak.
        assert sum(s["peak_blocks"].values()) == s["peak"]
        assert s["eof_blocks"]["activations"] > 0
        # The optimizer step runs after backward freed the activations.
        assert s["peaks"]["optimizer"] < s["end_of_forward"]


def test_samples_never_exceed_their_steps_peak(list_sink):
    agent, sink = _watched(list_sink, steps=6, sample_hz=200)
    samples = sink.of("sample")
    peaks = {s["step"]: s["peak"] for s in sink.of("step")}
    inside = [x for x in samples if x["phase"] in ("forward", "backward", "optimizer") and x["step"] in peaks]
    assert inside, "the sampler took no sample during a phase"
    for x in inside:
        assert sum(x["blocks"].values()) <= peaks[x["step"]]


def test_exception_in_a_hook_is_counted_and_the_job_goes_on(list_sink, monkeypatch):
    model = build_model(vocab_size=512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0)

    def broken(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(agent, "_edge", broken)
    out = train_steps(model, opt, make_batch(model, 1, 16), steps=2)
    assert torch.isfinite(out.loss)
    assert agent.errors >= 4
    assert "injected" in agent.last_error
    agent.stop()
    errors = list_sink.of("error")
    assert errors and errors[0]["message"] == "RuntimeError: injected"


def test_stop_removes_every_hook():
    model = build_model(vocab_size=512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = vramtop_agent.watch(model, opt, publish=False)
    agent.stop()
    train_steps(model, opt, make_batch(model, 1, 16), steps=1)
    assert agent.step == 0 and not model._forward_pre_hooks and not model._forward_hooks


def test_a_forward_that_raises_leaves_no_hooks_behind(list_sink):
    model = build_model(vocab_size=512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0)
    bad = {"input_ids": torch.full((1, 8), 10_000)}  # out-of-range token ids: the embedding raises
    try:
        model(**bad)
    except IndexError:
        pass
    # Our saved-tensor hooks were popped: nothing is left on autograd's hook stack.
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    train_steps(model, opt, make_batch(model, 1, 16), steps=2)
    agent.stop()
    assert [s["step"] for s in list_sink.of("step")] == [0, 1]
    forward_starts = [m for m in list_sink.of("phase") if m["phase"] == "forward" and m["edge"] == "start"]
    assert len(forward_starts) == 3  # the failed forward and the two that trained
    assert agent.snapshot()["blocks"]["activations"] == 0


def test_a_stopped_agent_lets_its_model_go():
    """Nothing global (hooks, probes, excepthooks) keeps the agent, and so the model, alive."""
    import gc
    import weakref

    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    agent = vramtop_agent.watch(model, opt)
    train_steps(model, opt, make_batch(model, 1, 16), steps=2)
    agent.stop()
    refs = weakref.ref(model), weakref.ref(agent)
    del model, opt, agent
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_backward_start_is_found_in_a_nested_output_beside_none_and_other_objects(list_sink):
    """A model may return its loss inside dicts and tuples next to None, ints and objects such as a cache
    (an HF ModelOutput holds loss, logits and past_key_values): the walk finds the tensors and nothing else,
    and every step's backward start is seen, whichever output the backward starts from."""
    from vramtop_agent.agent import _output_tensors

    class Cache:  # not a tensor, not a container: skipped
        grad_fn = None

    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return {"out": (None, 3, {"logits": y}), "cache": Cache(), "frozen": x}

    model = Nested()
    x = torch.randn(2, 4)
    out = model(x)
    assert [t is out["out"][2]["logits"] for t in _output_tensors(out)] == [True, False]
    assert _output_tensors(out)[1] is x
    assert _output_tensors(Cache()) == [] and _output_tensors(None) == []

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0)
    for _ in range(3):
        model(x)["out"][2]["logits"].pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    agent.stop()
    edges = [(m["step"], m["phase"], m["edge"]) for m in list_sink.of("phase")]
    assert [(p, e) for s, p, e in edges if s == 2] == EDGES
    assert [s["micro_steps"] for s in list_sink.of("step")] == [1, 1, 1]
    assert agent.errors == 0
