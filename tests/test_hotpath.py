"""The agent's hot path (issue 11): tracked vs derived activations, per-module attribution, edge sampling.

Real tiny models on CPU, a real list sink; activations checked against an independent saved-tensor count.
"""

import math
import threading
import time

import torch
from torch import nn

import vramtop_agent
from vramtop.tiny import build_model, make_batch


def _independent_saved_bytes(model, batch) -> int:
    """Distinct storages autograd saves in one forward, parameters excluded (our own hooks, no agent)."""
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s._cdata] = (s.nbytes(), t)
        return t

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(n for k, (n, _) in saved.items() if k not in params)


def _step(model, opt, batch):
    out = model(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_tracked_steps_are_exact_derived_steps_say_so_and_a_new_shape_is_tracked(list_sink):
    model = build_model(vocab_size=256)
    opt = torch.optim.AdamW(model.parameters())
    small, big = make_batch(model, 2, 32), make_batch(model, 2, 64)
    expected_small = _independent_saved_bytes(model, small)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0, track_every=3)
    for _ in range(6):
        _step(model, opt, small)
    _step(model, opt, big)
    _step(model, opt, big)
    agent.stop()
    steps = list_sink.of("step")
    sources = [s["activations_source"] for s in steps]
    # The first three steps, then one in three (step 5); step 6 is a new shape: tracked; step 7 is not.
    assert sources == ["tracked", "tracked", "tracked", "derived", "derived", "tracked", "tracked", "derived"]
    for s in steps[:6]:
        assert s["eof_blocks"]["activations"] == expected_small  # derived on CPU: the tracked value, exactly
    assert steps[6]["eof_blocks"]["activations"] > expected_small
    assert steps[7]["eof_blocks"]["activations"] == steps[6]["eof_blocks"]["activations"]
    check = steps[5]["derived_check"]  # a tracked step checks the derivation it replaces
    assert check == {"tracked": expected_small, "derived": expected_small}


def test_snapshot_says_whether_activations_are_tracked():
    model = build_model(vocab_size=256)
    opt = torch.optim.AdamW(model.parameters())
    batch = make_batch(model, 2, 32)
    agent = vramtop_agent.watch(model, opt, publish=False, sample_hz=0, track_every=100)
    for _ in range(3):
        _step(model, opt, batch)
    out = model(**batch)  # step 3: derived
    snap = agent.snapshot()
    out.loss.backward()
    agent.stop()
    assert snap["activations_source"] == "derived"
    assert snap["blocks"]["activations"] == _independent_saved_bytes(model, batch)
    assert "activations_by_module" not in snap


def test_attribution_sums_to_the_tracked_total_and_the_head_grows_with_vocab_batch_seq():
    heads = {}
    for vocab, b, s in [(256, 2, 32), (1024, 2, 32), (1024, 4, 64)]:
        model = build_model(vocab_size=vocab)
        agent = vramtop_agent.watch(model, publish=False, sample_hz=0)
        out = model(**make_batch(model, b, s))
        snap = agent.snapshot()
        by_module = snap["activations_by_module"]
        assert snap["activations_source"] == "tracked"
        assert sum(by_module.values()) == snap["blocks"]["activations"] > 0
        assert {"embed_tokens", "layers.0", "layers.1", "lm_head"} <= set(k.split("model.")[-1] for k in by_module)
        heads[(vocab, b, s)] = by_module["lm_head"]
        out.loss.backward()
        agent.stop()
    # logits + loss: at least one float32 vocab x batch x seq tensor more for each growth
    assert heads[(1024, 2, 32)] - heads[(256, 2, 32)] >= (1024 - 256) * 2 * 32 * 4
    assert heads[(1024, 4, 64)] >= 4 * heads[(1024, 2, 32)] * 0.9


def test_samples_come_from_the_training_thread_and_a_stuck_job_still_shows_alive(list_sink):
    torch.manual_seed(0)

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.stall = 0.0

        def forward(self, x):
            time.sleep(self.stall)  # one long op (releases the GIL, as a long kernel wait would)
            return self.lin(x)

    model = Slow()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=20)
    trainer = threading.current_thread().name
    for _ in range(40):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.005)
    steady = list(list_sink.of("sample"))
    model.stall = 2.5
    model(x).sum().backward()
    agent.stop()
    stuck = list_sink.of("sample")[len(steady):]
    steady = [s for s in steady if s["step"] >= 5]  # (before the first forward the I/O thread ticks: alive)
    assert steady and all(s["source"] == "edge" for s in steady)  # no sampler thread in steady state
    assert any(s["source"] == "tick" and s["phase"] == "forward" for s in stuck)  # alive while stuck
    assert trainer == "MainThread"


def test_eval_forwards_with_grad_on_are_not_micro_steps(list_sink):
    model = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0)
    for _ in range(2):
        model.eval()
        model(x)
        model(x)
        model.train()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert agent.snapshot()["blocks"]["activations"] == 0  # the dropped graphs freed their saved tensors
    agent.stop()
    assert [s["micro_steps"] for s in list_sink.of("step")] == [1, 1]


def test_two_optimizers_are_both_counted_and_a_rebuilt_one_is_followed():
    from helpers import optimizer_tensors, storage_bytes

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(8, 16)
    o1 = torch.optim.AdamW(model[0].parameters())
    o2 = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    agent = vramtop_agent.watch(model, publish=False, sample_hz=0)
    for _ in range(3):
        model(x).sum().backward()
        o1.step()
        o2.step()
        o1.zero_grad()
        o2.zero_grad()
    snap = agent.snapshot()
    assert snap["blocks"]["optimizer"] == storage_bytes(optimizer_tensors(o1) + optimizer_tensors(o2)) > 0
    assert agent.step == 3
    o1 = o2 = None  # rebuilt: the agent lets the old ones go and follows the new one
    o3 = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        model(x).sum().backward()
        o3.step()
        o3.zero_grad()
    assert agent.step == 5
    assert agent.snapshot()["blocks"]["optimizer"] == storage_bytes(optimizer_tensors(o3))
    agent.stop()


def test_another_threads_optimizer_is_not_adopted():
    watched = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    agent = vramtop_agent.watch(watched, publish=False, sample_hz=0)

    def other_thread():
        other(torch.randn(2, 4)).sum().backward()
        other_opt.step()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert agent.optimizer is None
    agent.stop()


def test_the_viewer_says_where_the_activations_are_or_that_they_are_derived():
    from vramtop.state import activations_note

    def fmt(n):
        return f"{n // 2**20} MiB"

    by_module = {"embed_tokens": 2**20, "layers.0": 5 * 2**20, "layers.1": 5 * 2**20, "lm_head": 3 * 2**20}
    assert activations_note({"activations_source": "tracked", "activations_by_module": by_module}, fmt) == \
        "tracked · layers.0-1 10 MiB · lm_head 3 MiB · embed_tokens 1 MiB"
    assert activations_note({"activations_source": "derived"}, fmt) == "derived"
    assert activations_note({}, fmt) == ""  # an older agent: nothing said


def _grad_hooks(params) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in params)


def test_gradients_are_exact_at_backward_end_on_an_untracked_step_with_no_hook_per_parameter(list_sink):
    from helpers import storage_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params)
    x = torch.randn(8, 16)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0, track_every=100)

    backwards = 0

    def backward_end_gradients() -> int:
        nonlocal backwards
        backwards += 1
        deadline = time.monotonic() + 10
        while True:  # the I/O thread hands the queued phase events to the sink
            ends = [m for m in list_sink.of("phase") if (m["phase"], m["edge"]) == ("backward", "end")]
            if len(ends) >= backwards or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert len(ends) == backwards
        return ends[-1]["blocks"]["gradients"]

    for _ in range(3):  # tracked: the per-parameter hooks are there while they are
        model(x).sum().backward()
        assert _grad_hooks(params) == len(params)
        assert backward_end_gradients() == storage_bytes([p.grad for p in params]) > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):  # untracked: no Python per parameter in backward, and the gradients are exact
        model(x).sum().backward()
        assert _grad_hooks(params) == 0
        assert backward_end_gradients() == storage_bytes([p.grad for p in params]) > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
    # Gradients as views of one flat buffer (DDP's buckets): accumulated in place, the buffer counts once.
    flat = torch.zeros(sum(p.numel() for p in params))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    model(x).sum().backward()
    assert backward_end_gradients() == flat.untyped_storage().nbytes() == storage_bytes([p.grad for p in params])
    # Only part of the gradients gone before the next forward: the rest are still counted, exactly.
    opt.step()
    for p in params[:2]:
        p.grad = None
    model(x).sum().backward()
    assert backward_end_gradients() == storage_bytes([p.grad for p in params])
    agent.stop()
    assert [s["activations_source"] for s in list_sink.of("step")] == ["tracked"] * 3 + ["derived"] * 3
    assert agent.errors == 0, agent.last_error
    assert _grad_hooks(params) == 0


def test_a_fault_in_the_gradient_read_is_contained(list_sink, monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0, track_every=100)

    def broken(*_args):
        raise RuntimeError("injected fault in the gradient read")

    monkeypatch.setattr(agent.acct, "read_grads", broken)
    losses = []
    for _ in range(5):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    agent.stop()
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]  # the job trained on
    assert agent._error_counts["grad-read"] == 5 and "injected fault" in agent.last_error
    # The rest of the step went on: every backward ended, every step was summarized.
    assert [s["step"] for s in list_sink.of("step")] == [0, 1, 2, 3, 4]
    assert [e["where"] for e in list_sink.of("error")] == ["grad-read"] * 5


def _tracked_steps(policy, now: list, steps: range, seconds_per_step: float, shape=(4, 128)) -> list[int]:
    tracked = []
    for step in steps:
        if policy.begin_forward(step, list(shape), True):
            tracked.append(step)
        policy.learn({"activations": 1}, None, ("backward", "start"))  # the shape is known once tracked
        policy.end_step()
        now[0] += seconds_per_step
    return tracked


def test_the_default_tracking_schedule_is_one_step_in_20_or_one_every_10_s_whichever_is_rarer():
    from vramtop_agent.tracking import TrackingPolicy

    # Fast steps (1/64 s): 20 steps are 0.3 s, so the 10 s floor decides: one tracked step in 640.
    now = [0.0]
    fast = TrackingPolicy(clock=lambda: now[0])
    assert _tracked_steps(fast, now, range(0, 2000), 1 / 64) == [0, 1, 2, 642, 1282, 1922]
    fast.changed()  # a new model or optimizer: the next step is tracked at once, whatever the interval
    assert _tracked_steps(fast, now, range(2000, 2002), 1 / 64) == [2000]
    # A new input shape is tracked at once, too.
    assert _tracked_steps(fast, now, range(2002, 2004), 1 / 64, shape=(4, 256)) == [2002]
    # Slow steps (2 s): 10 s pass in 5 steps, so "one in 20" decides.
    now = [0.0]
    slow = TrackingPolicy(clock=lambda: now[0])
    assert _tracked_steps(slow, now, range(0, 60), 2.0) == [0, 1, 2, 22, 42]
    # An explicit `every` is taken as it is: no time floor.
    now = [0.0]
    explicit = TrackingPolicy(every=20, clock=lambda: now[0])
    assert _tracked_steps(explicit, now, range(0, 60), 1 / 64) == [0, 1, 2, 22, 42]


def test_watch_without_track_every_gets_the_default_schedule_and_the_env_overrides_it(monkeypatch):
    model = nn.Linear(4, 4)
    agent = vramtop_agent.watch(model, publish=False)
    assert (agent.tracking.every, agent.tracking.interval_s) == (20, 10.0)
    agent.stop()
    monkeypatch.setenv("VRAMTOP_TRACK_EVERY", "5")
    agent = vramtop_agent.watch(nn.Linear(4, 4), publish=False)
    assert (agent.tracking.every, agent.tracking.interval_s) == (5, 0.0)
    agent.stop()


def test_a_gradient_reread_reuses_sizes_only_while_every_gradient_is_a_tensor_of_its_own(list_sink, monkeypatch):
    """Between full reads, a backward's gradients are re-read without a storage lookup each, when the same
    parameters have gradients, none a view. Exact on every step: a gradient missing, or views of a padded
    flat buffer set up mid-run, take the full read at once, as does the full-read interval gone by."""
    from helpers import storage_bytes

    from vramtop_agent.accounting import Accountant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    x = torch.randn(8, 16)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0, track_every=1000)

    def step(before_backward=None) -> int:
        """The gradient block as read at backward end; asserts it equals the gradients' own storages."""
        loss = model(x).sum()
        if before_backward:
            before_backward()
        loss.backward()
        read = agent.acct.grads.totals().get("cpu", 0)
        assert read == storage_bytes([p.grad for p in params if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return read

    for _ in range(3):  # tracked: full reads
        step()
    reused = agent.acct.reused_reads
    for _ in range(4):  # untracked: the first re-read is full, the next ones reuse its sizes
        assert step() > 0
    assert agent.acct.reused_reads == reused + 3

    want = sum(p.numel() for p in params) * 4
    params[0].requires_grad_(False)  # a parameter without a gradient: a full read at once
    reused = agent.acct.reused_reads
    assert step() == want - params[0].numel() * 4
    assert agent.acct.reused_reads == reused
    params[0].requires_grad_(True)
    step()

    padded = want + 4096  # a bucket larger than its gradients (alignment): its storage counts, once

    def views_of_one_buffer():
        flat = torch.zeros(padded // 4)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    reused = agent.acct.reused_reads
    for _ in range(3):  # views: a full read at once, and every read stays full while they are views
        assert step(views_of_one_buffer) == padded
    assert agent.acct.reused_reads == reused
    for _ in range(2):  # plain gradients again: a full read, then re-reads
        step()
    assert agent.acct.reused_reads == reused + 1
    monkeypatch.setattr(Accountant, "GRAD_FULL_READ_S", 0.0)  # the interval gone by: full reads only
    reused = agent.acct.reused_reads
    for _ in range(3):
        step()
    assert agent.acct.reused_reads == reused
    agent.stop()
    assert agent.errors == 0


def test_the_forward_start_sees_what_zero_grad_left_freed_kept_or_held_by_the_job(list_sink):
    """At a forward start the gradients zero_grad freed are gone, told from the weak references to the
    tensors the last read found (no parameter touched); a gradient the job still holds, or one zero_grad
    zeroed in place, keeps the exact per-parameter check."""
    from helpers import storage_bytes

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(8, 16)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0, track_every=100)

    def forward_starts(n: int) -> list:
        deadline = time.monotonic() + 10
        while True:  # the I/O thread hands the queued phase events to the sink
            starts = [m for m in list_sink.of("phase") if (m["phase"], m["edge"]) == ("forward", "start")]
            if len(starts) >= n or time.monotonic() > deadline:
                return starts

    held = None
    expected = []
    # Steps 0-2 tracked, 3-6 not. How each step's zero_grad leaves the gradients for the next forward:
    for how in ["freed", "freed", "freed", "freed", "one held", "kept", "freed"]:
        model(x).sum().backward()
        opt.step()
        if how == "one held":
            held = params[1].grad  # the job keeps a gradient (a logging hook, a norm for later)
        opt.zero_grad(set_to_none=how != "kept")
        expected.append(storage_bytes([p.grad for p in params if p.grad is not None]))
    model(x).sum().backward()  # the forward after the last zero_grad
    starts = forward_starts(len(expected) + 1)
    agent.stop()
    got = [m["blocks"]["gradients"] for m in starts[1:]]
    assert got == expected
    assert expected[-3] == 0 and expected[-2] == storage_bytes(params) and held is not None
    assert agent.errors == 0, agent.last_error


def test_the_slow_host_readings_are_renewed_by_the_io_thread_not_at_a_phase_edge(list_sink, monkeypatch):
    """Host RSS and memory (psutil, ~0.5 ms of /proc parsing) are read once a second by the I/O thread,
    within a tick of their cache entry expiring: a sample taken at a phase edge on the training thread
    finds them cached, and every sample still carries them."""
    from vramtop_agent import devices

    readers = []
    real = devices._host_stats
    monkeypatch.setattr(devices, "_host_stats", lambda: readers.append(threading.get_ident()) or real())
    monkeypatch.delitem(devices._slow_cache, "host", raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 32)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=20)
    time.sleep(0.3)  # (the I/O thread's first tick)
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        time.sleep(0.005)
    agent.stop()
    edge_samples = [m for m in list_sink.of("sample") if m["source"] == "edge"]
    assert len(edge_samples) > 10 and all(m["host"]["rss"] > 0 for m in edge_samples)
    assert readers and threading.get_ident() not in readers  # never on the training thread
    assert len(readers) <= 5  # about once a second (2.8 s), not once a tick (56 ticks)
    assert agent.errors == 0, agent.last_error


def _train_until(step, done, timeout_s: float = 20.0) -> int:
    """Call step() until done() (or the timeout): the derivation's schedule is in seconds, not steps."""
    deadline = time.monotonic() + timeout_s
    n = 0
    while not done() and time.monotonic() < deadline:
        step()
        n += 1
    assert done(), "timed out"
    return n


def test_a_regular_jobs_gradients_are_derived_between_checks_and_equal_the_tensors(list_sink, monkeypatch):
    """Once every backward for GRAD_CHECK_S found the gradients as the last full read left them, the
    backward ends between checks take that state without looking at the parameters, and the forward starts
    after them what the read ones found: freed by zero_grad for the first micro-step, kept by gradient
    accumulation for the later ones. For a regular job that is the exact value at every edge; samples and
    steps say which were derived."""
    from conftest import ListSink
    from helpers import storage_bytes

    from vramtop_agent.accounting import Accountant

    monkeypatch.setattr(Accountant, "GRAD_CHECK_S", 0.05)
    for micro in (1, 3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.01)
        x = torch.randn(8, 16)
        sink = ListSink()
        agent = vramtop_agent.watch(model, opt, publish=False, sinks=[sink], sample_hz=50, track_every=1000)
        acct = agent.acct
        expected: list[tuple[str, int]] = []  # (edge, gradient bytes of the tensors there), in order

        def grads_now() -> int:
            return storage_bytes([p.grad for p in params if p.grad is not None])  # noqa: B023

        def step() -> None:
            for _ in range(micro):  # noqa: B023
                expected.append(("forward start", grads_now()))  # noqa: B023
                model(x).sum().backward()  # noqa: B023
                expected.append(("backward end", grads_now()))  # noqa: B023
                assert acct.grads.totals().get("cpu", 0) == grads_now()  # noqa: B023 (the ledger there)
            opt.step()  # noqa: B023
            opt.zero_grad(set_to_none=True)  # noqa: B023

        _train_until(step, lambda: acct.derived_reads >= 300)  # noqa: B023 (a few edge samples among them)
        agent.stop()
        assert not acct._grads_irregular
        edges = {("forward", "start"): "forward start", ("backward", "end"): "backward end"}
        got = [(edges[m["phase"], m["edge"]], m["blocks"]["gradients"]) for m in sink.of("phase")
               if (m["phase"], m["edge"]) in edges]
        assert got == expected, micro
        assert {s["gradients_source"] for s in sink.of("step")} == {"read", "derived"}
        assert "derived" in {s["gradients_source"] for s in sink.of("sample")}
        assert agent.errors == 0, agent.last_error


def test_a_check_that_finds_other_gradients_makes_every_later_backward_a_read(list_sink, monkeypatch):
    """An expert that gets no tokens in some steps (its parameters get no gradient): between two checks the
    derived block is the last check's, the next check finds the difference, and from then on every backward
    end is read, exact, until the parameter set changes."""
    from helpers import storage_bytes

    from vramtop_agent.accounting import Accountant

    monkeypatch.setattr(Accountant, "GRAD_CHECK_S", 0.05)

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.route_b = True

        def forward(self, x):
            return self.a(x) + (self.b(x) if self.route_b else 0)

    torch.manual_seed(0)
    model = Experts()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    x = torch.randn(4, 8)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0, track_every=1000)
    acct = agent.acct
    calls = [0]

    def step(check: bool = False) -> None:
        calls[0] += 1
        model.route_b = calls[0] % 2 == 0 or not check_routing[0]
        model(x).sum().backward()
        if check:
            assert acct.grads.totals().get("cpu", 0) == storage_bytes([p.grad for p in params if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)

    check_routing = [False]
    _train_until(step, lambda: acct.derived_reads >= 10)  # both experts every step: derived
    check_routing[0] = True  # expert b only every other step
    _train_until(step, lambda: acct._grads_irregular)
    derived = acct.derived_reads
    for _ in range(20):
        step(check=True)
    assert acct.derived_reads == derived
    assert {s["gradients_source"] for s in list(agent.steps)[-20:]} == {"read"}
    # Another parameter set (an expert added): its gradients are checked again, and derived once regular.
    model.c = nn.Linear(8, 8)
    params = list(model.parameters())
    check_routing[0] = False
    opt.add_param_group({"params": model.c.parameters()})
    _train_until(step, lambda: acct.derived_reads > derived + 5)
    agent.stop()
    assert agent.errors == 0, agent.last_error
