"""Real PUB -> SUB round trips over ipc and tcp, with schema validation."""

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import zmq
from conftest import train_steps
from helpers import collect, types_of

import vramtop_agent
from vramtop.errors import UserError
from vramtop.live_source import LiveSource
from vramtop.state import SessionState
from vramtop.subscriber import Subscriber, check_endpoint
from vramtop.tiny import add_lora, build_model, make_batch
from vramtop_agent import discovery
from vramtop_agent.schema import BLOCK_KEYS, SchemaError, decode, decode_many, encode


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_round_trip_carries_valid_messages(transport, free_tcp_endpoint):
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    endpoint = free_tcp_endpoint if transport == "tcp" else None
    agent = vramtop_agent.watch(model, opt, endpoint=endpoint, sample_hz=50)
    assert agent.endpoint.startswith(transport + "://")
    sub = Subscriber(agent.endpoint)
    try:
        time.sleep(0.3)  # PUB drops frames sent before the subscription arrives
        b = make_batch(model, 2, 32)
        got = []
        for _ in range(20):
            train_steps(model, opt, b, 1)
            got += sub.poll(20)
            if {"hello", "sample", "step", "phase"} <= types_of(got):
                break
        got += collect(sub, lambda g: {"hello", "sample", "step", "phase"} <= types_of(got + g), timeout=20.0,
                       strict=True)
    finally:
        agent.stop()
        sub.close()
    sample = [m for m in got if m["type"] == "sample"][-1]
    assert set(sample["blocks"]) == set(BLOCK_KEYS)
    assert sample["blocks"]["parameters"] == agent.snapshot()["blocks"]["parameters"]
    hello = [m for m in got if m["type"] == "hello"][-1]
    assert hello["model"]["method"] == "lora" and hello["pid"] == os.getpid()
    assert hello["model"]["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sub.rejected == 0


def test_ipc_socket_lives_in_a_private_directory(runtime_dir):
    agent = vramtop_agent.watch(build_model(vocab_size=512))
    try:
        d = discovery.runtime_dir()
        assert oct(os.stat(d).st_mode & 0o777) == oct(0o700)
        [info] = discovery.list_agents()
        assert info["pid"] == os.getpid() and info["endpoint"] == agent.endpoint
        path = d / f"{os.getpid()}-0.json"
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    finally:
        agent.stop()
    assert discovery.list_agents() == []  # stop removes the discovery file


def test_binding_beyond_loopback_needs_consent():
    with pytest.raises(ValueError, match="not loopback"):
        vramtop_agent.watch(endpoint="tcp://0.0.0.0:0")


def test_stale_discovery_files_are_ignored_and_cleaned(runtime_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = discovery.make_info("ipc:///nowhere", 0, 0, 1)
    info["pid"] = dead.pid
    path = discovery.write_info(info)
    assert path.exists()
    assert discovery.list_agents() == []
    assert not path.exists()


def test_viewer_reconnects_after_disconnect(free_tcp_endpoint):
    agent = vramtop_agent.watch(build_model(vocab_size=512), endpoint=free_tcp_endpoint, sample_hz=50)
    try:
        sub = Subscriber(agent.endpoint)
        collect(sub, lambda g: "sample" in types_of(g), timeout=20.0, strict=True)
        sub.close()
        sub = Subscriber(agent.endpoint)  # a new viewer on the same agent
        collect(sub, lambda g: {"sample", "hello"} <= types_of(g), timeout=20.0, strict=True)
        sub.close()
    finally:
        agent.stop()


def test_dead_agent_is_shown_as_gone(runtime_dir):
    script = (
        "import time, vramtop_agent\n"
        "from vramtop.tiny import build_model\n"
        "a = vramtop_agent.watch(build_model(vocab_size=512), sample_hz=20)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env={**os.environ, "VRAMTOP_RUNTIME_DIR": str(runtime_dir)})
    try:
        assert child.stdout.readline().strip() == b"ready"
        source = LiveSource(str(child.pid))
        state = SessionState()
        deadline = time.time() + 20
        while state.sample is None and time.time() < deadline:
            for m in source.poll():
                state.apply(m)
            time.sleep(0.05)
        assert state.connection() == "live"
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert source.process_gone()
        state.process_gone = True
        assert state.connection() == "gone"
        source.poll()  # frames already queued may still arrive; nothing raises
    finally:
        if child.poll() is None:
            child.kill()


def test_malformed_frames_are_rejected_with_a_reason():
    good = {"v": 1, "type": "bye", "t": 1.0, "pid": 1, "rank": 0, "eseq": 1, "reason": "x"}
    assert decode(encode(good)) == good
    bad = [
        b"",
        b"X" + msgpack.packb(good),
        b"E" + b"\xc1garbage",
        b"E" + msgpack.packb({**good, "v": 99}),
        b"E" + msgpack.packb({**good, "type": "nope"}),
        b"E" + msgpack.packb({k: v for k, v in good.items() if k != "reason"}),
        b"S" + msgpack.packb(good),
        b"E" + msgpack.packb([1, 2, 3]),
        b"E" + msgpack.packb(msgpack.ExtType(1, b"x")),
        b"E" + b"\x80" * (5 * 1024 * 1024),
    ]
    for frame in bad:
        with pytest.raises(SchemaError):
            decode(frame)
    with pytest.raises(SchemaError, match="newer"):
        decode(b"E" + msgpack.packb({**good, "v": 99}))


def test_bad_endpoints_get_one_clear_line():
    for endpoint in ("localhost:5555", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "http://x", "ipc://"):
        with pytest.raises(UserError):
            check_endpoint(endpoint)


def test_event_batches_round_trip_and_bad_items_are_counted_one_by_one():
    from vramtop_agent.schema import decode_many, encode_events

    base = {"v": 1, "t": 1.0, "pid": 1, "rank": 0}
    events = [{**base, "type": "bye", "eseq": i, "reason": f"r{i}"} for i in range(1, 4)]
    [frame] = encode_events(events)
    assert decode_many(frame) == (events, [])
    with pytest.raises(SchemaError, match="decode_many"):
        decode(frame)
    bad = b"E" + msgpack.packb([events[0], {"type": "bye"}, events[2]])
    good, reasons = decode_many(bad)
    assert good == [events[0], events[2]] and len(reasons) == 1
    big = [{**e, "reason": "x" * 400_000} for e in events]
    assert len(encode_events(big)) == 2  # split to stay near the 1 MiB batch target
    # A batch is encoded in one call; the frame is the one an event at a time builds (an array of the maps).
    one_by_one = b"E" + msgpack.Packer(use_bin_type=True).pack_array_header(3) + b"".join(
        msgpack.packb(e, use_bin_type=True) for e in events)
    assert frame == one_by_one
    refused: list[str] = []  # an object msgpack cannot take: that event goes as text, the batch as one frame
    [frame] = encode_events([events[0], {**base, "type": "bye", "eseq": 9, "reason": object()}, events[2]], refused)
    got = decode_many(frame)[0]
    assert [m["eseq"] for m in got] == [1, 9, 3] and got[1]["reason"].startswith("<object") and refused == []


def test_a_tick_of_events_is_one_frame(free_tcp_endpoint):
    """Many phase events between two samples reach the viewer in very few frames."""
    model = build_model(vocab_size=512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = vramtop_agent.watch(model, opt, endpoint=free_tcp_endpoint, sample_hz=5)
    raw = zmq.Context.instance().socket(zmq.SUB)
    raw.setsockopt(zmq.SUBSCRIBE, b"E")
    raw.connect(agent.endpoint)
    try:
        # The subscription is live once the agent's once-a-second hello arrives (a loaded box
        # can take longer than any fixed sleep): only then do the counted events start.
        deadline = time.monotonic() + 30
        while not raw.poll(100):
            assert time.monotonic() < deadline, "no hello reached the subscriber"
        while raw.poll(0):
            raw.recv()
        started = time.monotonic()
        train_steps(model, opt, make_batch(model, 1, 8), steps=10)  # 50 phase edges + 10 steps
        time.sleep(0.6)
        frames, events = 0, 0
        while raw.poll(200):
            frame = raw.recv()
            frames += 1
            events += len(decode_many(frame)[0])
        ticks = (time.monotonic() - started) * 5 + 1  # sample_hz=5: the I/O thread's ticks in the window
    finally:
        raw.close(linger=0)
        agent.stop()
    assert events >= 60
    # At most one frame per tick, however slow the box makes the steps (an unloaded run: ~3 frames).
    assert frames <= ticks, (frames, events, ticks)
