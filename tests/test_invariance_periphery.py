"""Job invariance at the agent's edges (issue 10, items 6-10): fork, start-up failures, two agents in one
process, odd metadata, exit and signals. Every job is a real training script in a real subprocess, run bare
and watched through tests/invariance.py; recordings are read back with sqlite3 and msgpack directly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import time

import msgpack
import pytest
import torch
from helpers import wait_for
from invariance import RECORDING_NAME, assert_invariant, compare, launch, run_script, write_script

import vramtop_agent
from vramtop_agent import discovery

# A tiny deterministic job. Steps come from argv[1]; the rest of argv is only carried along.
MODEL = """
import os, sys, torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 16), torch.randn(8, 2)
def step():
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward(); opt.step(); opt.zero_grad()
    vt_loss(loss)
def runtime_files():
    d = os.environ.get("VRAMTOP_RUNTIME_DIR")
    return sorted(n for n in os.listdir(d)) if d and os.path.isdir(d) else []
"""


def _recording(path):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        sessions = db.execute("SELECT id, pid, hello FROM sessions ORDER BY id").fetchall()
        events = [(sid, kind, msgpack.unpackb(blob, raw=False))
                  for sid, kind, blob in db.execute("SELECT session, type, msg FROM events ORDER BY rseq")]
        step_msgs = [msgpack.unpackb(r[0], raw=False) for r in db.execute("SELECT msg FROM steps ORDER BY rseq")]
        steps = [m["step"] for m in step_msgs]
        samples = db.execute("SELECT count(*), min(t), max(t) FROM samples").fetchone()
    finally:
        db.close()
    eseqs = sorted([m["eseq"] for _, _, m in events] + [m["eseq"] for m in step_msgs])
    return {"sessions": sessions, "events": events, "steps": steps, "samples": samples, "eseqs": eseqs}


def _left(res):
    """What a run left besides torch's own TMPDIR cache (a bare run leaves that too)."""
    return [f for f in res.leftovers if "torchinductor_" not in f]


def _byes(rec):
    return [m.get("reason") for _, kind, m in rec["events"] if kind == "bye"]


# ---------------------------------------------------------------------------- 6: fork

FORK = MODEL + """
with vt_watch(model, opt):
    for i in range(6):
        step()
        if i == 2:
            pid = os.fork()
            if pid == 0:  # the child trains once on its own copy, leaves the with block and exits normally
                torch.nn.functional.mse_loss(model(x), y).backward()
                break
            os.waitpid(pid, 0)
            if VT_MODE != "bare":
                open("files.txt", "w").write(" ".join(runtime_files()))
if pid == 0:
    sys.exit(0)
"""


def test_a_forked_child_touches_nothing_of_the_parent(tmp_path):
    runs = assert_invariant(tmp_path, FORK, modes=("watch", "record"), watch_options={"record": RECORDING_NAME},
                            allow_files=("files.txt",))
    for mode in ("watch", "record"):
        res = runs[mode]
        # After the child exited, the parent's discovery file and socket are still there.
        files = (res.workdir / "files.txt").read_text().split()
        assert any(f.endswith(".json") for f in files) and any(f.endswith(".sock") for f in files), (mode, files)
        rec = _recording(res.recording)
        assert len(rec["sessions"]) == 1, (mode, rec["sessions"])  # the child wrote no session of its own
        assert _byes(rec) == ["finished"], (mode, _byes(rec))  # one goodbye, the parent's, at its real end
        assert rec["steps"] == list(range(6)), (mode, rec["steps"])


# ---------------------------------------------------------------------------- 7: start-up never kills the job

PLAIN = MODEL + """
with vt_watch(model, opt):
    for i in range(int(sys.argv[1])):
        step()
"""


def _foreign_dir(path):
    path.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        return path
    return "/"  # owned by root


def test_watch_degrades_to_one_line_instead_of_raising(tmp_path):
    script = write_script(tmp_path, PLAIN)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    not_publishing = r"^vramtop: agent not publishing, viewers cannot attach \("
    plain_tcp = r"^vramtop: warning: vramtop agent publishes on tcp://127\.0\.0\.1:\d+ without CURVE"
    not_listed = r"^vramtop: agent publishes on tcp://\S+ but is not listed for `vramtop ls`"
    cases = {
        "foreign": ({"VRAMTOP_RUNTIME_DIR": str(_foreign_dir(tmp_path / "foreign"))}, {}, [not_publishing]),
        "file": ({"VRAMTOP_RUNTIME_DIR": str(blocker)}, {}, [not_publishing]),
        "uncreatable": ({"VRAMTOP_RUNTIME_DIR": str(blocker / "rt")}, {}, [not_publishing]),
        # tcp needs no directory: it publishes (and is found by its endpoint), saying it is not listed.
        "tcp-foreign": ({"VRAMTOP_RUNTIME_DIR": str(tmp_path / "foreign")}, {"endpoint": "tcp://127.0.0.1:0"},
                        [plain_tcp, not_listed]),
        "port-in-use": ({}, {"endpoint": f"tcp://127.0.0.1:{port}"}, [not_publishing]),
    }
    try:
        bare = run_script(tmp_path, script, ["4"])
        started = {name: launch(tmp_path, script, ["4"], "watch", opts, env, tag=name)
                   for name, (env, opts, _) in cases.items()}
        for name, job in started.items():
            res = job.result()
            problems = compare(bare, res, extra_stderr=cases[name][2])
            assert not problems, (name, problems, res.describe())
    finally:
        busy.close()


def test_wrong_options_still_raise_at_watch(runtime_dir):
    with pytest.raises(ValueError, match="not loopback"):
        vramtop_agent.watch(torch.nn.Linear(2, 2), endpoint="tcp://0.0.0.0:0")


# ---------------------------------------------------------------------------- 8: two agents in one process

NESTED = MODEL + """
import vramtop_agent
if VT_MODE == "record":  # the zero-code agent is running: the script's own watch() joins it
    step()
    agent = vramtop_agent.watch(model, opt)
    for i in range(3):
        step()
    agent.stop()
    open("files.txt", "w").write(" ".join(runtime_files()))
    for i in range(2):
        step()
else:
    with vt_watch(model, opt) as outer:
        step()
        with vt_watch(model, opt) as inner:
            if VT_MODE == "watch":
                assert inner is outer
            for i in range(3):
                step()
        if VT_MODE == "watch":
            open("files.txt", "w").write(" ".join(runtime_files()))
        for i in range(2):
            step()
"""


def test_nested_and_repeated_watch_share_one_agent(tmp_path):
    runs = assert_invariant(tmp_path, NESTED, modes=("watch", "record"), watch_options={"record": RECORDING_NAME},
                            allow_files=("files.txt",))
    for mode in ("watch", "record"):
        res = runs[mode]
        files = (res.workdir / "files.txt").read_text().split()
        assert len([f for f in files if f.endswith(".json")]) == 1, (mode, files)  # the inner stop hid nothing
        rec = _recording(res.recording)
        assert len(rec["sessions"]) == 1, (mode, rec["sessions"])
        assert rec["steps"] == list(range(6)), (mode, rec["steps"])  # hooks ran once per step
        assert _byes(rec) == ["finished"], (mode, _byes(rec))


def test_watch_of_an_unrelated_model_gets_its_own_socket(runtime_dir):
    m1, m2 = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)  # the agent holds models weakly: the job keeps them
    a = vramtop_agent.watch(m1)
    b = vramtop_agent.watch(m2)
    try:
        assert a is not b and a.endpoint != b.endpoint
        assert sorted(p.name for p in runtime_dir.iterdir()) == sorted(
            [f"{os.getpid()}-0.json", f"{os.getpid()}-0.sock", f"{os.getpid()}-0-1.json", f"{os.getpid()}-0-1.sock"])
        assert {i["endpoint"] for i in discovery.list_agents()} == {a.endpoint, b.endpoint}
        b.stop()
        assert [i["endpoint"] for i in discovery.list_agents()] == [a.endpoint]
    finally:
        a.stop()
        b.stop()
    assert list(runtime_dir.iterdir()) == []


# ---------------------------------------------------------------------------- 9: odd metadata

ARGV = MODEL + """
with vt_watch(model, opt):
    for i in range(int(sys.argv[1])):
        step()
        if i == 1 and VT_MODE != "bare":
            from vramtop_agent import discovery
            found = [a for a in discovery.list_agents() if a["pid"] == os.getpid()]
            open("files.txt", "w").write(str(len(found)))
"""


def test_undecodable_and_huge_argv_reach_viewers_and_recordings(tmp_path):
    odd = os.fsdecode(b"--name=caf\xe9-\xff")  # not UTF-8: Python keeps the bytes as lone surrogates
    huge = "--blob=" + "x" * (100 * 1024)
    runs = assert_invariant(tmp_path, ARGV, args=["4", odd, huge], modes=("watch", "record", "module"),
                            watch_options={"record": RECORDING_NAME}, allow_files=("files.txt",))
    for mode in ("watch", "record"):
        res = runs[mode]
        assert (res.workdir / "files.txt").read_text() == "1", mode  # the discovery file is readable
        rec = _recording(res.recording)
        hellos = [m for _, kind, m in rec["events"] if kind == "hello"]
        assert hellos and hellos[-1]["model"] and hellos[-1]["device"] == "cpu", mode
        cmdline = hellos[-1]["cmdline"]
        assert cmdline[2] == "--name=caf\ufffd-\ufffd" and len(json.dumps(cmdline)) < 16 * 1024, cmdline[:3]
        assert [m for _, kind, m in rec["events"] if kind == "error"] == [], mode
        phases = [m["step"] for _, kind, m in rec["events"] if kind == "phase"]
        assert [phases.count(i) for i in range(4)] == [phases.count(0)] * 4 and phases.count(0) >= 4, phases
        assert rec["steps"] == list(range(4)) and _byes(rec) == ["finished"], mode


def test_one_unencodable_event_never_costs_the_batch():
    from vramtop_agent.schema import decode_many, encode_events

    refused = []
    frames = encode_events([{"type": "hello", "cmdline": ["a\udcff"], "v": 1},
                            {"type": "phase", "x": object()}, {"type": "step", "step": 1, "big": 1 << 70}], refused)
    msgs = [m for f in frames for m in msgpack.unpackb(f[1:], raw=False)]
    assert [m["type"] for m in msgs] == ["hello", "phase"] and msgs[0]["cmdline"] == ["a\ufffd"]
    assert len(refused) == 1 and "'step'" in refused[0]
    assert decode_many  # the viewer's reader of these frames


# ---------------------------------------------------------------------------- 10: smaller ones

def test_write_info_never_follows_a_planted_symlink(runtime_dir):
    victim = runtime_dir.parent / "victim.txt"
    victim.write_text("precious")
    for name in (f"{os.getpid()}-0.tmp", f".{os.getpid()}-0.tmp"):
        (runtime_dir / name).symlink_to(victim)
    agent = vramtop_agent.watch(torch.nn.Linear(2, 2))
    try:
        assert victim.read_text() == "precious"
        assert [i["pid"] for i in discovery.list_agents()] == [os.getpid()]
    finally:
        agent.stop()


@pytest.mark.parametrize("hz", [math.inf, math.nan, -5.0, 1e9])
def test_sample_rate_is_bounded(hz, list_sink):
    agent = vramtop_agent.Agent(torch.nn.Linear(2, 2), publish=False, sinks=[list_sink], sample_hz=hz)
    try:
        assert 0 <= agent.sample_hz <= 100  # inf made the sampler thread spin
        time.sleep(0.5)
    finally:
        agent.stop()
    assert len(list_sink.of("sample")) <= 0.5 * 100 + 5


LOOP = MODEL + """
import signal, time
with vt_watch(model, opt):
    i = 0
    while True:
        step()
        i += 1
        if i == 3:
            open("ready", "w").close()
        time.sleep(0.01)
"""


def test_polite_signals_to_vramtop_run_close_the_recording(tmp_path):
    script = write_script(tmp_path, LOOP)
    jobs = {sig: launch(tmp_path, script, [], "run_record", tag=sig.name, allow_files=("ready",))
            for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig, job in jobs.items():
        wait_for(lambda job=job: (job.workdir / "ready").exists() and (job.workdir / RECORDING_NAME).exists(), 90)
        time.sleep(0.5)  # a few samples and steps recorded
        job.send_signal(sig)
    for sig, job in jobs.items():
        res = job.result(60)
        assert res.returncode == 128 + sig, res.describe()
        rec = _recording(res.recording)
        assert _byes(rec) == [f"signal {sig.name}"], (sig, _byes(rec))
        assert len(rec["steps"]) >= 3 and rec["steps"] == list(range(len(rec["steps"])))
        assert _left(res) == [], res.leftovers


INTERRUPTIBLE = MODEL + """
import time
try:
    for i in range(3):
        step()
    open("ready", "w").close()
    time.sleep(60)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""


def test_a_supervisors_sigint_reaches_the_job(tmp_path):
    job = launch(tmp_path, INTERRUPTIBLE, [], "run", allow_files=("ready",), new_session=True)
    wait_for(lambda: (job.workdir / "ready").exists(), 90)
    job.send_signal(signal.SIGINT)  # vramtop alone, as a supervisor (no terminal) would
    res = job.result(60)
    assert res.returncode == 3 and "interrupted" in res.stdout, res.describe()
    assert _left(res) == []


UNSTOPPED = MODEL + """
agent = vt_watch(model, opt)  # watch() kept running: no stop(), no with block
for i in range(3):
    step()
"""


def test_watch_without_stop_leaves_nothing_behind(tmp_path):
    runs = assert_invariant(tmp_path, UNSTOPPED, modes=("watch",), watch_options={"record": RECORDING_NAME})
    assert _byes(_recording(runs["watch"].recording)) == ["finished"]
