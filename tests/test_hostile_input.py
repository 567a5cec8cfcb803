"""Hostile input to the viewer: random, truncated, oversized and mutated frames.

The seeds are real frames from a real agent (a few training steps of a small
model, one caught hook error, one OOM event) plus a CUDA-shaped sample (no GPU
here). Hypothesis mutates them at the byte level and at the value level
(negative and huge sizes, NaN/inf, deep nesting, long strings, markup, wrong
types in nested maps, missing keys) and every frame goes through what the
viewer does: schema.decode, SessionState.apply and every render function,
printed by a real Rich console. Zero crashes; every refused frame counted and
shown. A real PUB socket checks the same over the wire, and that an oversized
frame costs the viewer nothing but the frames in flight.

VRAMTOP_FUZZ_EXAMPLES=2000 for a deeper run than CI's. With atheris installed,
bench/fuzz_frames.py runs a coverage-guided fuzzer on the same target (a short
run is part of this file; skipped without atheris).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from conftest import ListSink
from helpers import screen_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

import vramtop_agent
from vramtop.live_source import LiveSource
from vramtop.state import SessionState
from vramtop.subscriber import Subscriber
from vramtop.tui import render
from vramtop_agent import oom
from vramtop_agent.schema import MAX_FRAME_BYTES, SchemaError, decode, encode

FUZZ = settings(max_examples=int(os.environ.get("VRAMTOP_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
GIB = 1024 ** 3


# ---------------------------------------------------------------------- seeds: real frames


def _real_messages() -> list[dict]:
    if "_msgs" in _real_messages.__dict__:
        return _real_messages._msgs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    opt = torch.optim.AdamW(model.parameters())
    sink = ListSink()
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[sink], sample_hz=200)
    x = torch.randn(8, 32)
    for _ in range(3):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        agent._flush(agent.snapshot())
    agent.report_error("fuzz-seed", RuntimeError("a caught hook error"))
    oom.record(agent, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "top")
    agent.stop()
    msgs = [m for m in sink.messages]
    blocks = {"parameters": 14 * GIB, "gradients": 2 * GIB, "optimizer": 4 * GIB, "activations": 20 * GIB,
              "other": GIB}
    cuda = next(m for m in msgs if m["type"] == "sample").copy()
    cuda.update({"device": "cuda:0", "blocks": blocks, "devices": {"cuda:0": blocks},
                 "cuda": {"allocated": 41 * GIB, "reserved": 50 * GIB, "active": 41 * GIB, "inactive_split": GIB,
                          "alloc_retries": 2, "ooms": 0, "peak_allocated": 45 * GIB, "peak_reserved": 50 * GIB},
                 "nvml": {"total": 80 * GIB, "used": 53 * GIB, "process_used": 51 * GIB}})
    msgs.append(cuda)
    kinds = {m["type"] for m in msgs}
    assert {"hello", "sample", "phase", "step", "error", "oom", "bye"} <= kinds, kinds
    for m in msgs:
        decode(encode(m))  # the seeds themselves are valid
    _real_messages._msgs = msgs
    return msgs


def _real_frames() -> list[bytes]:
    return [encode(m) for m in _real_messages()]


# ---------------------------------------------------------------------- the viewer's path


def render_all(state: SessionState) -> str:
    """Every panel, printed by a real console (Rich may fail only when it lays a renderable out)."""
    console = Console(file=io.StringIO(), width=140, color_system="truecolor", force_terminal=True)
    for r in (render.header(state, "fuzz"), render.stack(state, 120), render.fragmentation(state, 40),
              render.phases(state), render.timeline(state, 120, 8)):
        console.print(r)
    state.connection()
    state.last_step()
    state.peak_step()
    return console.file.getvalue()


def feed(state: SessionState, frame: bytes) -> bool:
    """What Subscriber._take + the app's pump do with one frame. True when accepted."""
    try:
        msg = decode(frame)
    except SchemaError as exc:
        state.reject(str(exc))
        return False
    state.apply(msg)
    return True


# ---------------------------------------------------------------------- hostile values


def _deep(n: int, kind: str) -> bytes:
    """msgpack bytes of n nested lists/maps (packb itself refuses to build them)."""
    if kind == "list":
        return b"\x91" * n + b"\x00"
    return b"\x81\xa1k" * n + b"\x00"


DEEP = "\x00deep\x00"  # placeholder replaced by raw nested msgpack bytes after packing

HOSTILE = st.one_of(
    st.sampled_from([-1, -(2 ** 63), 2 ** 64 - 1, 2 ** 63, 2 ** 53 + 1, 0, 1]),
    st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
    st.text(max_size=40),
    st.sampled_from(["x" * 200_000, "[/bold]", "[@click=app.quit]click[/]", "\x1b[2J\x1b[H", "\u202e" * 50,
                     "\ud7ff", "cuda:0", "forward", "hello"]),
    st.binary(max_size=40),
    st.none(),
    st.booleans(),
    st.lists(st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1), max_size=12),
    st.dictionaries(st.text(max_size=8), st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1), max_size=6),
    st.just({"allocated": 1}),  # a nested map missing its sibling keys (cuda without reserved)
    st.sampled_from([DEEP + "list", DEEP + "map"]),
)


def _mutate(data, msg: dict) -> dict:
    """Replace, delete or add one value somewhere in the (nested) message."""
    msg = msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False)  # a deep copy
    node = msg
    for _ in range(data.draw(st.integers(0, 3), label="depth")):
        children = [k for k, v in (node.items() if isinstance(node, dict) else enumerate(node))
                    if isinstance(v, (dict, list)) and v]
        if not children:
            break
        node = node[data.draw(st.sampled_from(sorted(children, key=str)), label="into")]
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]) if keys else st.just("add"), label="action")
    if action == "add" or not keys:
        if isinstance(node, dict):
            node[data.draw(st.text(max_size=12), label="new key")] = data.draw(HOSTILE, label="new value")
        else:
            node.append(data.draw(HOSTILE, label="new item"))
    else:
        key = data.draw(st.sampled_from(keys), label="key")
        if action == "delete":
            del node[key]
        else:
            node[key] = data.draw(HOSTILE, label="value")
    return msg


def _pack(msg: dict, topic: bytes) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    for kind in ("list", "map"):
        placeholder = msgpack.packb(DEEP + kind, use_bin_type=True)
        body = body.replace(placeholder, _deep(1100 if kind == "list" else 900, kind))
    return topic + body


# ---------------------------------------------------------------------- decode + apply + render


def _feed_drawn(data, draw_frame) -> tuple[SessionState, int]:
    """1-6 frames from draw_frame(data) through decode, apply and every render: the state, and how many were refused."""
    state = SessionState()
    rejected = 0
    for _ in range(data.draw(st.integers(1, 6), label="frames")):
        rejected += not feed(state, draw_frame(data))
        render_all(state)
    return state, rejected


def _mutated_message(data) -> bytes:
    """A real message, mutated at the value level half the time, under a topic that may not match it."""
    seed = data.draw(st.sampled_from(_real_messages()), label="seed")
    msg = _mutate(data, seed) if data.draw(st.booleans(), label="mutate") else seed
    topic = data.draw(st.sampled_from([b"S" if msg.get("type") == "sample" else b"E", b"S", b"E"]), label="topic")
    return _pack(msg, topic)


def _mutated_frame(data, frames: list[bytes]) -> bytes:
    """One of the real frames truncated, bit-flipped, with bytes inserted or deleted, or spliced with another."""
    frame = bytearray(data.draw(st.sampled_from(frames), label="seed"))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]), label="how")
    if how == "truncate":
        frame = frame[:data.draw(st.integers(0, max(len(frame) - 1, 0)), label="cut")]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            i = data.draw(st.integers(0, len(frame) - 1), label="at")
            frame[i] = data.draw(st.integers(0, 255), label="byte")
    elif how == "insert":
        i = data.draw(st.integers(0, len(frame)), label="at")
        frame[i:i] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
    elif how == "delete":
        i = data.draw(st.integers(0, len(frame) - 1), label="at")
        del frame[i:i + data.draw(st.integers(1, 16), label="n")]
    else:
        other = data.draw(st.sampled_from(frames), label="other")
        frame = frame[:data.draw(st.integers(0, len(frame)), label="cut")] + other[
            data.draw(st.integers(0, len(other)), label="from"):]
    return bytes(frame)


@FUZZ
@given(data=st.data())
def test_mutated_real_messages_never_crash_the_view(data):
    state, rejected = _feed_drawn(data, _mutated_message)
    assert state.rejected_frames == rejected
    assert (f"rejected {rejected}" in render.header(state).plain) == (rejected > 0)


@FUZZ
@given(data=st.data())
def test_byte_level_mutations_and_truncations_of_real_frames(data):
    frames = _real_frames()
    state, rejected = _feed_drawn(data, lambda d: _mutated_frame(d, frames))
    assert state.rejected_frames == rejected


@FUZZ
@given(frames=st.lists(st.one_of(st.binary(max_size=200), st.binary(max_size=64).map(lambda b: b"E" + b),
                                 st.binary(max_size=64).map(lambda b: b"S" + b)), min_size=1, max_size=8))
def test_random_bytes(frames):
    state = SessionState()
    for f in frames:
        feed(state, f)
        render_all(state)
    assert state.rejected_frames <= len(frames)


def test_semantically_hostile_values_that_used_to_pass_are_refused():
    sample = next(m for m in _real_messages() if m["type"] == "sample" and m["device"] == "cuda:0")
    hello = next(m for m in _real_messages() if m["type"] == "hello")
    step = next(m for m in _real_messages() if m["type"] == "step")

    def edit(msg, path, value):
        msg = msgpack.unpackb(msgpack.packb(msg), raw=False)
        node = msg
        for k in path[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return msg

    refused = [
        edit(sample, ["blocks", "parameters"], -1),
        edit(sample, ["blocks", "activations"], math.nan),
        edit(sample, ["blocks", "other"], math.inf),
        edit(sample, ["cuda", "allocated"], KeyError),
        edit(sample, ["cuda", "reserved"], None),
        edit(sample, ["nvml", "total"], -(2 ** 63)),
        edit(sample, ["host", "rss"], -5),
        edit(sample, ["t"], math.nan),
        edit(sample, ["batch"], [[1] * 3] * 3),
        edit(sample, ["batch"], list(range(100))),
        edit(hello, ["cmdline"], ["python", 3, None]),
        edit(hello, ["start_time"], math.inf),
        edit(step, ["step_time"], math.nan),
        edit(step, ["peaks", "backward"], -1),
        edit(step, ["peak_blocks", "gradients"], math.inf),
    ]
    for msg in refused:
        with pytest.raises(SchemaError):
            decode(encode(msg))
    # Values that stay legal are shown without trouble: huge sizes, None sizes, strange strings, deep extras.
    state = SessionState()
    for msg in (edit(hello, ["model"], {"class": ["x"] * 3, "params_total": "many", "method": 7, "dtype": None}),
                edit(hello, ["host"], "h" * 100_000),
                edit(hello, ["device"], "[/bold]cuda:0"),
                edit(sample, ["blocks", "parameters"], 2 ** 64 - 1),
                edit(sample, ["params_split", "trainable"], None),
                edit(sample, ["cuda", "inactive_split"], None),
                edit(sample, ["phase"], "[@click=app.quit]x"),
                edit(step, ["peak_blocks", "optimizer"], None),
                edit(step, ["peak_phase"], "p" * 10_000)):
        state.apply(decode(encode(msg)))
        out = render_all(state)
    assert "h" * 41 not in out  # long strings are cut


def test_deep_nesting_is_refused_or_harmless():
    hello = next(m for m in _real_messages() if m["type"] == "hello")
    state = SessionState()
    for depth, kind in ((100, "list"), (900, "map"), (1100, "list"), (100_000, "list")):
        msg = dict(hello, model={"class": "M", "extra": DEEP + kind})
        frame = _pack(msg, b"E").replace(_deep(1100 if kind == "list" else 900, kind), _deep(depth, kind))
        feed(state, frame)
        render_all(state)
    assert state.rejected_frames >= 2  # msgpack's own limit (1024 levels) refuses the deepest


# ---------------------------------------------------------------------- over a real socket


@pytest.fixture
def hostile_pub(tmp_path):
    """A PUB socket that plays a hostile agent, and a viewer Subscriber connected to it."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 0)
    endpoint = f"ipc://{tmp_path}/hostile.sock"
    pub.bind(endpoint)
    yield pub, endpoint
    pub.close(linger=0)


class Marker:
    """Valid frames with increasing eseq, to know what got through."""

    def __init__(self):
        self.eseq = 0

    def frame(self) -> bytes:
        self.eseq += 1
        return encode({"v": 1, "type": "error", "t": time.time(), "pid": 4242, "rank": 0, "eseq": self.eseq,
                       "where": "marker", "message": str(self.eseq), "count": 1})


def _sync(pub, sub, state, marker, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.send(marker.frame())
        for m in sub.poll(30):
            state.apply(m)
            if m.get("where") == "marker":
                return int(m["message"])
    raise AssertionError("the subscriber never received a marker")


@pytest.fixture
def viewer(hostile_pub):
    """A viewer Subscriber on the hostile PUB, its state and the marker, once a marker got through."""
    pub, endpoint = hostile_pub
    sub = Subscriber(endpoint)
    state = SessionState()
    marker = Marker()
    try:
        _sync(pub, sub, state, marker)
        yield pub, sub, state, marker
    finally:
        sub.close()


def test_fuzzed_frames_over_a_real_socket_are_counted_and_the_stream_goes_on(viewer):
    pub, sub, state, marker = viewer
    import random

    rnd = random.Random(7)
    frames = _real_frames()
    bad = []
    for i in range(300):
        f = bytearray(rnd.choice(frames))
        if i % 3 == 0:
            f = f[:rnd.randrange(1, len(f))]
        elif i % 3 == 1:
            for _ in range(rnd.randint(1, 6)):
                f[rnd.randrange(1, len(f))] = rnd.randrange(256)
        else:
            f = bytearray(rnd.randbytes(rnd.randint(1, 300)))
        f[0:1] = b"E"  # the events socket keeps every frame: the count must be exact
        try:
            decode(bytes(f))
        except SchemaError:
            bad.append(bytes(f))
    bad += [b"E" + msgpack.packb({"v": 1, "type": "[/bold][@click=app.quit]x", "t": 1.0, "pid": 1, "rank": 0}),
            b"E" + msgpack.packb(msgpack.ExtType(42, b"payload")), b"E", b"E\xc1"]
    for f in bad:
        pub.send(f)
    last = marker.eseq + 1
    pub.send(marker.frame())
    deadline = time.monotonic() + 20
    seen = set()
    while last not in seen and time.monotonic() < deadline:
        for m in sub.poll(50):
            state.apply(m)
            if m.get("where") == "marker":
                seen.add(int(m["message"]))
    assert last in seen
    assert sub.rejected == len(bad)
    state.rejected_frames, state.last_rejection = sub.rejected, sub.last_rejection
    assert f"rejected {len(bad)}" in render.header(state).plain
    assert state.missed_events == 0  # nothing good was lost among the bad


def test_an_oversized_frame_is_refused_and_the_viewer_keeps_receiving(viewer):
    pub, sub, state, marker = viewer
    # Events socket: refused by libzmq before it is allocated; the viewer reconnects.
    pub.send(b"E" + b"\x00" * (MAX_FRAME_BYTES + 1))
    before = marker.eseq
    assert _sync(pub, sub, state, marker, timeout=10) > before
    # Samples socket (conflated): the same, and samples flow again.
    pub.send(b"S" + b"\x00" * (MAX_FRAME_BYTES + 1))
    sample = next(m for m in _real_messages() if m["type"] == "sample")
    deadline = time.monotonic() + 10
    got = []
    while not got and time.monotonic() < deadline:
        pub.send(encode(dict(sample, pid=4242, t=time.time())))
        got = [m for m in sub.poll(30) if m["type"] == "sample"]
    assert got, "no sample after an oversized sample frame"
    assert sub.reconnects >= 2
    # What was lost while reconnecting shows as missed events ("dropped" in the header); nothing raised.
    assert "dropped" in render.header(state).plain
    # Just under the cap is still a frame (refused as a bad message, counted).
    pub.send(b"E" + b"\x00" * (MAX_FRAME_BYTES - 1))
    n = sub.rejected
    deadline = time.monotonic() + 10
    while sub.rejected == n and time.monotonic() < deadline:
        sub.poll(50)
    assert sub.rejected == n + 1
    # The cap is also decode()'s own, for frames that do not come through ZeroMQ (recordings, tools).
    with pytest.raises(SchemaError, match="exceeds"):
        decode(b"E" + msgpack.packb({"x": "y" * MAX_FRAME_BYTES}))


async def test_the_dashboard_shows_rejections_as_text_not_markup(hostile_pub):
    from vramtop.tui.app import VramtopApp

    pub, endpoint = hostile_pub
    app = VramtopApp(LiveSource(endpoint), refresh_hz=10)
    hostile_type = "[/bold][@click=app.quit]boom"
    async with app.run_test(size=(260, 40)) as pilot:
        deadline = time.monotonic() + 20
        while app.state.rejected_frames < 3 and time.monotonic() < deadline:
            pub.send(b"E" + msgpack.packb({"v": 1, "type": hostile_type, "t": 1.0, "pid": 1, "rank": 0}))
            await pilot.pause(0.1)
        assert app.state.rejected_frames >= 3
        await pilot.pause(0.3)
        app._refresh_view()
        text = screen_text(app)
        assert "rejected" in text and "[/bold][@click=app.quit]boom" in text
        assert app.is_running
        await pilot.press("q")


async def test_a_panel_that_cannot_render_a_frame_costs_that_panel_not_the_dashboard(hostile_pub):
    """hello.estimate is a free-form map (the estimator's); the estimate panel fails on a broken one."""
    from vramtop.tui.app import VramtopApp

    pub, endpoint = hostile_pub
    hello = next(m for m in _real_messages() if m["type"] == "hello")
    sample = next(m for m in _real_messages() if m["type"] == "sample")
    app = VramtopApp(LiveSource(endpoint), refresh_hz=10)
    async with app.run_test(size=(200, 50)) as pilot:
        deadline = time.monotonic() + 20
        while app.state.sample is None and time.monotonic() < deadline:
            pub.send(encode(dict(hello, pid=4243, estimate={"blocks": 5, "setup": None})))
            pub.send(encode(dict(sample, pid=4243)))
            await pilot.pause(0.1)
        assert app.state.hello["estimate"] == {"blocks": 5, "setup": None}
        await pilot.pause(0.3)
        app._refresh_view()
        text = screen_text(app)
        assert "gap: cannot show this data" in text
        assert "pid 4243" in text and app.is_running
        await pilot.press("q")


# ---------------------------------------------------------------------- atheris (optional)


def test_a_short_atheris_run(tmp_path):
    pytest.importorskip("atheris")
    script = Path(__file__).parent.parent / "bench" / "fuzz_frames.py"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = subprocess.run([sys.executable, str(script), str(corpus), "-runs=3000", "-max_len=4096",
                        "-rss_limit_mb=4096"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Done 3000 runs" in r.stderr
