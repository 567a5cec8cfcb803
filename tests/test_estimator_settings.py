"""Training settings the execution engine runs as they are, each against a real CPU run implemented here:
chunked cross-entropy, optimizer-in-backward, activation offloading (save_on_cpu) and optimizer offloading.

The real runs are written independently of the engine (their own loops and hooks). On the CPU the "device"
is torch's CPU allocator, which the profiler sees; what a setting moves to the host goes into numpy arrays,
which the profiler does not see, so the real peak is the device's and the numpy bytes are the host's.
Compared: gradients and optimizer states byte for byte, host bytes byte for byte, the peak within 3%.
"""

from __future__ import annotations

import tempfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_estimator_accuracy import _alive_at_step_start, _allocation_peak  # noqa: E402
from test_estimator_execute import BATCH, FAMILIES, SEQ, _real_model, _setup  # noqa: E402

from vramtop_agent.accounting import sum_unique  # noqa: E402
from vramtop_agent.estimator import Setup, SetupError, estimate, from_hf_config  # noqa: E402
from vramtop_agent.estimator.execute import execute  # noqa: E402

PEAK_TOLERANCE = 0.03
CHUNK = 24   # tokens per loss chunk: 64 tokens in the batch -> chunks of 24, 24, 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: why one thread


class _States:
    """What _alive_at_step_start reads of an optimizer (`.state`), for several optimizers at once."""

    def __init__(self, *opts):
        self.state = {p: st for opt in opts for p, st in opt.state.items()}


def _model(family: str, method: str, tmp: str):
    model = _real_model(FAMILIES[family], method, tmp)
    if method != "full":
        from peft import LoraConfig, get_peft_model

        targets = _setup(family, method, False).lora_targets
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM",
                                                 target_modules=list(targets) if targets else "all-linear"))
    model.train()
    return model


def _batch():
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def _grads(model) -> int:
    return sum_unique([p.grad for p in model.parameters() if p.grad is not None])


def _states(*opts) -> int:
    return sum_unique([v for opt in opts for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])


def _check_peak(est, real: int, case: str) -> None:
    assert abs(est.peak_allocated - real) <= PEAK_TOLERANCE * real, (
        f"{case}: peak measured {real}, estimated {est.peak_allocated} ({(est.peak_allocated - real) / real:+.1%})")


# ------------------------------------------------------------------ chunked cross-entropy


def _chunked_step(model, batch, chunk):
    """The decoder stack, then logits + loss `chunk` tokens at a time into a detached hidden state,
    each chunk's backward at once, then one backward through the stack."""
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=batch["input_ids"]).last_hidden_state
    h = hidden.detach().flatten(0, 1).requires_grad_(True)
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1).flatten()
    count = labels.shape[0] * (labels.shape[1] - 1)
    cap = getattr(lm.config, "final_logit_softcapping", None)

    def chunk_loss(i):   # the chunk's logits die on return: only what the loss saved lives into backward
        logits = lm.lm_head(h[i:i + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, targets[i:i + chunk], ignore_index=-100, reduction="sum") / count

    for i in range(0, h.shape[0], chunk):
        chunk_loss(i).backward()
    hidden.backward(h.grad.view_as(hidden))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_chunked_loss_matches_a_real_run(family, method):
    setup = _setup(family, method, False).with_(loss="chunked", loss_chunk=CHUNK)
    est = execute(FAMILIES[family], setup)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(family, method, tmp)
        batch = _batch()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        grads = []

        def step():
            _chunked_step(model, batch, CHUNK)
            opt.step()
            grads.append(_grads(model))
            opt.zero_grad(set_to_none=True)

        step()
        real = _alive_at_step_start(model, opt, batch) + _allocation_peak(step)
    case = f"{family} {method} chunked loss"
    assert est.blocks["gradients"] == grads[-1] and est.blocks["optimizer"] == _states(opt), case
    _check_peak(est, real, case)
    full = execute(FAMILIES[family], _setup(family, method, False))
    assert est.peak_allocated < full.peak_allocated   # the full b·s·V fp32 logits are gone


# ------------------------------------------------------------------ optimizer in backward


@pytest.mark.parametrize("method", ["full", "lora"])
def test_optimizer_in_backward_matches_a_real_run(method):
    setup = _setup("llama", method, False).with_(optim_in_backward=True)
    est = execute(FAMILIES["llama"], setup)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model("llama", method, tmp)
        batch = _batch()
        params = [p for p in model.parameters() if p.requires_grad]
        opts = {p: torch.optim.AdamW([p], lr=1e-4) for p in params}
        largest = []

        def hook(p):
            largest.append(p.grad.untyped_storage().nbytes())
            opts[p].step()
            opts[p].zero_grad(set_to_none=True)

        for p in params:
            p.register_post_accumulate_grad_hook(hook)

        def step():
            out = model(**batch)   # held through backward, as a training loop holds its outputs
            out.loss.backward()

        step()
        real = _alive_at_step_start(model, _States(*opts.values()), batch) + _allocation_peak(step)
    assert est.blocks["optimizer"] == _states(*opts.values())
    assert est.blocks["gradients"] == max(largest)
    _check_peak(est, real, f"llama {method} optimizer in backward")


# ------------------------------------------------------------------ offloading


def _to_host(t):
    """save_on_cpu's pack, with the host copy in numpy (outside torch's allocator)."""
    return t.detach().numpy().copy()


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_activation_offload_matches_a_real_run(method):
    setup = _setup("llama", method, False).with_(offload=("activations",))
    est = execute(FAMILIES["llama"], setup)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model("llama", method, tmp)
        batch = _batch()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        host = []

        def step():
            packed = []

            def pack(t):
                packed.append(_to_host(t))
                return packed[-1]

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda a: torch.from_numpy(a).clone()):
                out = model(**batch)
            host.append(sum(a.nbytes for a in packed))
            packed.clear()   # the graph holds its own references to the host copies
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        real = _alive_at_step_start(model, opt, batch) + _allocation_peak(step)
    assert est.host_parts == {"activations": host[-1]} and est.host == host[-1]
    _check_peak(est, real, f"llama {method} activations offloaded")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_optimizer_offload_matches_a_real_run(method):
    """The host keeps fp32 masters, fp32 gradient copies and AdamW's states, steps there (numpy AdamW),
    and writes the new weights back in place; the device holds weights, gradients until backward ends,
    activations."""
    import numpy as np

    setup = _setup("llama", method, False).with_(offload=("optimizer",))
    est = execute(FAMILIES["llama"], setup)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model("llama", method, tmp)
        batch = _batch()
        params = [p for p in model.parameters() if p.requires_grad]
        masters = [_to_host(p).astype(np.float32) for p in params]
        m1 = [np.zeros_like(w) for w in masters]
        m2 = [np.zeros_like(w) for w in masters]
        grads = [np.zeros_like(w) for w in masters]
        device_grads = []

        def step():
            out = model(**batch)
            out.loss.backward()
            device_grads.append(_grads(model))
            for p, w, a, b, g in zip(params, masters, m1, m2, grads, strict=True):
                g[...] = p.grad.numpy()
                p.grad = None
                a[...] = 0.9 * a + 0.1 * g
                b[...] = 0.999 * b + 0.001 * g * g
                w -= 1e-4 * a / (np.sqrt(b) + 1e-8)
                p.data.copy_(torch.from_numpy(w))

        step()
        real = _alive_at_step_start(model, _States(), batch) + _allocation_peak(step)
    nbytes = sum(w.nbytes for w in masters)
    assert est.blocks["optimizer"] == 0 and est.blocks["gradients"] == device_grads[-1]
    assert est.host_parts["master_weights"] == nbytes and est.host_parts["gradients"] == nbytes
    # torch's host AdamW: exp_avg + exp_avg_sq (the numpy pair) + a 4-byte step count per tensor.
    assert est.host_parts["optimizer_states"] == 2 * nbytes + 4 * len(params)
    _check_peak(est, real, f"llama {method} optimizer offloaded")


# ------------------------------------------------------------------ setup checks


def test_settings_the_formula_cannot_model_are_refused_by_it():
    desc = from_hf_config(FAMILIES["llama"])
    for change in (dict(loss="chunked"), dict(optim_in_backward=True), dict(offload=("activations",))):
        with pytest.raises(SetupError, match="--engine execute"):
            estimate(desc, Setup(device="cpu", **change))


@pytest.mark.parametrize("change,message", [
    (dict(loss="fused"), "unknown loss"),
    (dict(offload=("weights",)), "unknown offload"),
    (dict(optim_in_backward=True, grad_accum=2), "cannot accumulate"),
    (dict(offload=("optimizer",), optimizer="paged-adamw-8bit"), "torch optimizer"),
])
def test_impossible_settings_are_one_line_errors(change, message):
    with pytest.raises(SetupError, match=message):
        execute(FAMILIES["llama"], Setup(device="cpu", **change))
