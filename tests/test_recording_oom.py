"""OOM postmortem: an injected allocation failure is recorded, and the job fails exactly as without vramtop."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vramtop_agent
from vramtop.recording import Recording
from vramtop_agent import oom
from vramtop_agent.oom import convert_segments, parse_requested

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
           "1.13 GiB is free. Of the allocated memory 75.50 GiB is allocated by PyTorch")


class FailingNet(torch.nn.Module):
    """A real net whose forward hits an (injected) allocation failure on one call."""

    def __init__(self, fail_at=None, message=MESSAGE):
        super().__init__()
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 32)
        self.calls = 0
        self.fail_at = fail_at
        self.message = message

    def forward(self, x):
        self.calls += 1
        h = self.a(x).relu()
        if self.calls == self.fail_at:
            raise torch.OutOfMemoryError(self.message)
        return self.b(h)


def test_parse_requested():
    assert parse_requested(MESSAGE) == 2 << 30
    assert parse_requested("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; ...)") == 20 << 20
    cpu_message = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1234567 bytes."
    assert parse_requested(cpu_message) == 1234567
    assert parse_requested("something else") is None
    assert parse_requested("Tried to allocate 1,024.00 KiB") == 1 << 20


def test_oom_in_forward_is_recorded_and_the_same_exception_reaches_the_caller(tmp_path):
    path = str(tmp_path / "oom.vramtop")
    net = FailingNet(fail_at=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    caught = None
    with pytest.raises(torch.OutOfMemoryError) as info, vramtop_agent.watch(net, opt, publish=False, record=path):
        for _ in range(5):
            try:
                net(torch.randn(16, 32)).sum().backward()
            except torch.OutOfMemoryError as exc:
                caught = exc
                raise
            opt.step()
            opt.zero_grad()
    assert info.value is caught  # the very same object, untouched
    assert str(info.value) == MESSAGE
    r = Recording.open(path)
    [event] = r.ooms()
    assert event["step"] == 2 and event["phase"] == "forward"
    assert event["requested"] == 2 << 30
    assert event["message"] == MESSAGE
    assert event["where"] == "forward"  # seen by the always-called forward hook
    assert event["blocks"]["parameters"] == sum(p.numel() * 4 for p in net.parameters())
    assert "cuda" not in event and "segments" not in event  # CPU: absent, never faked
    assert r.events(("bye",))[-1]["reason"] == "exception"
    r.verify()


def test_caught_oom_leaves_the_agent_tracking_phases(tmp_path, list_sink):
    """A job that catches the OOM and retries with a smaller batch goes on being measured correctly."""
    net = FailingNet(fail_at=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    agent = vramtop_agent.watch(net, opt, publish=False, sinks=[list_sink])
    for batch in (16, 64, 8, 8):
        try:
            net(torch.randn(batch, 32)).sum().backward()
        except torch.OutOfMemoryError:
            continue
        opt.step()
        opt.zero_grad()
    agent.stop()
    assert agent._fwd_depth == 0 and agent.errors == 0
    [event] = list_sink.of("oom")
    assert event["batch"] == [64, 32]
    steps = list_sink.of("step")
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert all(s["peaks"]["backward"] > 0 for s in steps)


JOB = textwrap.dedent("""
    import os, sys, time, torch
    WHERE, AGENT, REC = sys.argv[1], sys.argv[2] == "1", sys.argv[3]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)
            self.n = 0
        def forward(self, x):
            self.n += 1
            h = self.lin(x).relu()
            if self.n == 3 and WHERE == "forward":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
            if self.n == 3 and WHERE == "backward":
                h = Fail.apply(h)
            return h

    class Fail(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1
        @staticmethod
        def backward(ctx, g):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB.")

    def train(net, opt):
        for i in range(5):
            net(torch.randn(8, 32)).sum().backward()
            opt.step(); opt.zero_grad()

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    if AGENT:
        import vramtop_agent
        vramtop_agent.watch(net, opt, publish=False, record=REC)  # no `with`: the excepthook path
    train(net, opt)
""")


def _run(tmp_path, where, agent):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    rec = str(tmp_path / f"{where}.vramtop")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "agent")])
    p = subprocess.run([sys.executable, str(script), where, "1" if agent else "0", rec], env=env,
                       capture_output=True, text=True, timeout=120)
    return p, rec


def _user_frames(stderr):
    """The traceback without PyTorch's own frames (hooks change which internal lines run)."""
    lines = stderr.strip().splitlines()
    out = []
    skip = False
    for line in lines:
        if line.startswith('  File "'):
            skip = "/torch/" in line or "vramtop" in line
        if not skip:
            out.append(line)
    return out


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_uncaught_oom_job_fails_exactly_as_without_vramtop(tmp_path, where):
    bare, _ = _run(tmp_path, where, agent=False)
    watched, rec = _run(tmp_path, where, agent=True)
    assert bare.returncode == watched.returncode == 1
    assert _user_frames(watched.stderr) == _user_frames(bare.stderr)
    assert watched.stderr.strip().splitlines()[-1] == bare.stderr.strip().splitlines()[-1]
    assert watched.stdout == bare.stdout == ""
    r = Recording.open(rec)
    [event] = r.ooms()
    assert event["step"] == 2 and event["phase"] == where
    assert event["requested"] == (2 << 30 if where == "forward" else 512 << 20)
    assert event["where"] == ("forward" if where == "forward" else "top")
    assert r.events(("bye",))[-1]["reason"] == "oom"  # the excepthook stopped the agent: all flushed
    r.verify()


def test_segments_are_plain_and_bounded():
    raw = {"segments": [
        {"device": 0, "address": 1 << 40, "total_size": 20 << 20, "allocated_size": 8 << 20, "active_size": 8 << 20,
         "requested_size": 8 << 20, "stream": 0, "segment_type": "large", "is_expandable": False,
         "frames": [{"filename": "x.py", "line": 1, "name": "f"}],
         "blocks": [{"address": (1 << 40) + i * 4096, "size": 2 << 20, "requested_size": 2 << 20,
                     "state": "active_allocated" if i % 2 else "inactive",
                     "frames": [{"filename": "train.py", "line": i, "name": "forward"}] * 20,
                     "weird": object()} for i in range(10)]},
        {"device": 1, "total_size": 1, "blocks": []},  # another device: left out
        "junk",
    ]}
    segs = convert_segments(raw["segments"], device_index=0)
    assert len(segs) == 1
    assert segs[0]["total_size"] == 20 << 20 and "frames" not in segs[0]
    assert len(segs[0]["blocks"]) == 10 and len(segs[0]["blocks"][0]["frames"]) == oom.MAX_FRAMES_PER_BLOCK
    assert "weird" not in segs[0]["blocks"][0]
    from vramtop_agent.recorder import pack

    pack(segs)  # msgpack-able as is
    small = convert_segments(raw["segments"], device_index=0, budget=400)
    assert small[0]["blocks"] == [] and small[0]["blocks_omitted"] == 10


def test_oom_event_with_segments_roundtrips_through_a_recording(tmp_path):
    from recording_helpers import fake_msg

    from vramtop_agent.recorder import Recorder

    path = str(tmp_path / "segs.vramtop")
    rec = Recorder(path)
    segs = [{"total_size": 4 << 20, "allocated_size": 1 << 20,
             "blocks": [{"size": 1 << 20, "state": "active_allocated"}, {"size": 3 << 20, "state": "inactive"}]}]
    rec.send(fake_msg("oom", 1000.0, segments=segs, cuda={"allocated": 1 << 20, "reserved": 4 << 20}))
    rec.close()
    r = Recording.open(path)
    [event] = r.ooms()
    assert event["segments"] == segs
    assert r.counts()["allocator_snapshots"] == 1
