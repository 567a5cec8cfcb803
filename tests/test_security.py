"""Security: private endpoints, consent to go beyond loopback, CURVE, no pickle, untrusted discovery files.

What is promised is in docs/security.md; each promise has a test here.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import zmq
from helpers import TcpForwarder, collect, types_of

import vramtop_agent
from vramtop.cli import main as cli_main
from vramtop.errors import UserError
from vramtop.live_source import LiveSource
from vramtop.state import SessionState
from vramtop.subscriber import Subscriber
from vramtop.tui import render
from vramtop_agent import curve, discovery, lifecycle
from vramtop_agent.publisher import EndpointError, check_bind_endpoint
from vramtop_agent.schema import SchemaError, decode, encode

ROOT = Path(__file__).resolve().parent.parent


class SecretiveModel(torch.nn.Module):
    """Its class name is a marker: it is in every hello, so plaintext on the wire is easy to spot."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---------------------------------------------------------------------- where the agent listens


def test_default_endpoint_is_an_ipc_socket_in_a_private_directory(runtime_dir):
    agent = vramtop_agent.watch(SecretiveModel())
    try:
        assert agent.endpoint.startswith("ipc://")
        sock_path = agent.endpoint[len("ipc://"):]
        d = discovery.runtime_dir()
        assert Path(sock_path).parent == d
        assert _mode(d) == 0o700 and os.lstat(d).st_uid == os.getuid()
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode) and _mode(sock_path) == 0o600
        info = d / f"{os.getpid()}-0.json"
        assert _mode(info) == 0o600 and os.lstat(info).st_uid == os.getuid()
    finally:
        agent.stop()
    assert not (d / f"{os.getpid()}-0.json").exists()  # stop removes the discovery file


@pytest.mark.parametrize("where", ["xdg", "tmp"])
def test_default_runtime_dirs_are_0700_whatever_the_umask(monkeypatch, tmp_path, where):
    monkeypatch.delenv("VRAMTOP_RUNTIME_DIR")
    if where == "xdg":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        expected = tmp_path / "vramtop"
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        expected = tmp_path / f"vramtop-{os.getuid()}"
    old = os.umask(0)
    try:
        assert discovery.runtime_dir() == expected
    finally:
        os.umask(old)
    assert _mode(expected) == 0o700
    os.chmod(expected, 0o755)  # loosened by hand: tightened again on the next use
    discovery.runtime_dir()
    assert _mode(expected) == 0o700


def test_an_explicit_ipc_endpoint_elsewhere_is_0600_too(tmp_path):
    path = tmp_path / "job.sock"
    agent = vramtop_agent.watch(SecretiveModel(), endpoint=f"ipc://{path}")
    try:
        assert _mode(path) == 0o600
    finally:
        agent.stop()


def test_tcp_is_loopback_unless_explicitly_allowed():
    for ok in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://127.0.0.2:1", "tcp://[::1]:5555",
               "ipc:///tmp/x.sock"):
        assert check_bind_endpoint(ok) == ok
    for bad in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://[::]:5555", "tcp://eth0:5555", "tcp://10.0.0.1:1",
                "tcp://127.0.0.1.evil.example:1", "tcp://:5555", "ipc://@abstract-name"):
        with pytest.raises(EndpointError, match="allow_remote=True"):
            check_bind_endpoint(bad)
    for bad in ("inproc://x", "udp://127.0.0.1:1", "ws://127.0.0.1:1", "pgm://eth0;239.1.1.1:5555", "127.0.0.1:5"):
        with pytest.raises(EndpointError, match="unsupported"):
            check_bind_endpoint(bad)
    with pytest.raises(ValueError, match="not loopback"):
        vramtop_agent.watch(SecretiveModel(), endpoint="tcp://0.0.0.0:0")


def test_binding_beyond_loopback_prints_a_warning_even_with_warnings_off(runtime_dir):
    script = ("import vramtop_agent, torch\n"
              "a = vramtop_agent.watch(torch.nn.Linear(2, 2), endpoint='tcp://0.0.0.0:0', allow_remote=True)\n"
              "print(a.endpoint, flush=True); a.stop()\n")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VRAMTOP_RUNTIME_DIR": str(runtime_dir)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tcp://0.0.0.0:")
    assert "vramtop: warning:" in r.stderr and "anyone who can reach it can read the stream" in r.stderr


# ---------------------------------------------------------------------- CURVE


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    r = subprocess.run([sys.executable, "-m", "vramtop_agent.curve", "keys", str(d), "agent"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    viewer_pub, viewer_sec = curve.write_keypair(d, "viewer")
    return {"agent_pub": d / "agent.key", "agent_sec": d / "agent.key_secret",
            "viewer_pub": viewer_pub, "viewer_sec": viewer_sec}


def test_key_files_are_zeromq_certificates_and_the_secret_one_is_private(keys, tmp_path):
    assert _mode(keys["agent_sec"]) == 0o600
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(keys["agent_sec"]))  # pyzmq's own tools read them
    assert zmq.curve_public(secret) == public == curve.load_key(keys["agent_pub"])
    assert curve.load_key(keys["agent_sec"], secret=True) == secret
    with pytest.raises(curve.CurveKeyError, match="no secret key"):
        curve.load_key(keys["agent_pub"], secret=True)
    os.chmod(keys["agent_sec"], 0o644)
    with pytest.raises(curve.CurveKeyError, match="chmod 600"):
        curve.load_key(keys["agent_sec"], secret=True)
    with pytest.raises(curve.CurveKeyError, match="cannot read"):
        curve.load_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("not a certificate")
    with pytest.raises(curve.CurveKeyError, match="not a CURVE certificate"):
        curve.load_key(tmp_path / "junk.key")
    r = subprocess.run([sys.executable, "-m", "vramtop_agent.curve", "keys", str(keys["agent_pub"].parent), "agent"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not overwriting" in r.stderr


def _stream_through_tap(agent, **sub_kwargs):
    tap = TcpForwarder(int(agent.endpoint.rsplit(":", 1)[1]), keep=True)  # what a network observer sees
    sub = Subscriber(f"tcp://127.0.0.1:{tap.port}", **sub_kwargs)
    try:
        got = collect(sub, lambda g: {"hello", "sample"} <= types_of(g))
    finally:
        sub.close()
        tap.stop()
    return got, bytes(tap.seen)


def test_curve_end_to_end_encrypts_and_a_viewer_without_the_key_gets_nothing(keys, free_tcp_endpoint):
    agent = vramtop_agent.watch(SecretiveModel(), endpoint=free_tcp_endpoint, sample_hz=50,
                                curve_secret_key=str(keys["agent_sec"]))
    try:
        got, wire = _stream_through_tap(agent, curve_server_key=str(keys["agent_pub"]))
        assert {"hello", "sample"} <= types_of(got)
        assert next(m for m in got if m["type"] == "hello")["model"]["class"] == "SecretiveModel"
        assert len(wire) > 1000 and b"SecretiveModel" not in wire  # encrypted on the wire
        assert discovery.list_agents()[0].get("curve") is True  # a local viewer is told it needs the key
        # No key, or the key of another agent: no handshake, nothing at all.
        for kwargs in ({}, {"curve_server_key": zmq.curve_keypair()[0]}):
            sub = Subscriber(agent.endpoint, **kwargs)
            try:
                assert collect(sub, lambda g: bool(g), timeout=1.5) == []
            finally:
                sub.close()
    finally:
        agent.stop()
    # Without CURVE the same stream is plaintext: the check above means something.
    plain = vramtop_agent.watch(SecretiveModel(), endpoint="tcp://127.0.0.1:0", sample_hz=50)
    try:
        got, wire = _stream_through_tap(plain)
        assert b"SecretiveModel" in wire
    finally:
        plain.stop()


def test_curve_client_keys_admit_only_the_listed_viewers(keys):
    agent = vramtop_agent.watch(SecretiveModel(), endpoint="tcp://127.0.0.1:0", sample_hz=50,
                                curve_secret_key=str(keys["agent_sec"]),
                                curve_client_keys=[str(keys["viewer_pub"])])
    try:
        listed = Subscriber(agent.endpoint, curve_server_key=str(keys["agent_pub"]),
                            curve_client_key=str(keys["viewer_sec"]))
        stranger = Subscriber(agent.endpoint, curve_server_key=str(keys["agent_pub"]))  # right server key, unlisted
        try:
            assert {"hello", "sample"} <= types_of(collect(listed, lambda g: {"hello", "sample"} <= types_of(g)))
            assert collect(stranger, lambda g: bool(g), timeout=1.5) == []
        finally:
            listed.close()
            stranger.close()
    finally:
        agent.stop()
    with pytest.raises(ValueError, match="needs curve_secret_key"):
        vramtop_agent.watch(SecretiveModel(), curve_client_keys=[str(keys["viewer_pub"])])


def test_remote_bind_with_curve_says_it_is_encrypted(keys, capfd):
    agent = vramtop_agent.watch(SecretiveModel(), endpoint="tcp://0.0.0.0:0", allow_remote=True,
                                curve_secret_key=str(keys["agent_sec"]))
    try:
        port = agent.endpoint.rsplit(":", 1)[1]
        sub = Subscriber(f"tcp://127.0.0.1:{port}", curve_server_key=str(keys["agent_pub"]))
        try:
            assert "hello" in types_of(collect(sub, lambda g: "hello" in types_of(g)))
        finally:
            sub.close()
    finally:
        agent.stop()
    err = capfd.readouterr().err
    assert "encrypted with CURVE" in err and "anyone who can reach it" not in err


def test_attach_key_options_fail_with_one_line(keys, capsys):
    assert cli_main(["attach", "--server-key", "/nonexistent.key", "tcp://127.0.0.1:5555"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("vramtop: cannot read the CURVE key file") and "\n" not in err
    assert cli_main(["attach", "--client-key", str(keys["viewer_sec"]), "tcp://127.0.0.1:5555"]) != 0
    assert "--client-key needs --server-key" in capsys.readouterr().err
    assert cli_main(["attach", "--server-key", str(keys["agent_pub"])]) != 0
    assert "need a PID or ENDPOINT" in capsys.readouterr().err
    with pytest.raises(UserError, match="chmod 600"):
        os.chmod(keys["viewer_sec"], 0o640)
        Subscriber("tcp://127.0.0.1:5555", curve_server_key=str(keys["agent_pub"]),
                   curve_client_key=str(keys["viewer_sec"]))


# ---------------------------------------------------------------------- no pickle, ever


class Boom:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture
def pickle_tripwire(monkeypatch):
    """Any call to an unpickler in this process fails the test (the payloads below would run code)."""
    calls = []

    def trip(*a, **k):
        calls.append(a)
        raise AssertionError("something unpickled outside data")

    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, trip)
    monkeypatch.setattr(pickle, "Unpickler", trip)
    return calls


def test_a_pickle_payload_is_rejected_and_never_loaded(tmp_path, pickle_tripwire):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Boom(str(marker)))
    # (1) straight into decode: as a whole frame, behind a topic byte, as bytes in a field.
    for frame in (payload, b"E" + payload, b"S" + payload, b"E" + pickle.dumps({"v": 1, "type": "bye"})):
        with pytest.raises(SchemaError):
            decode(frame)
    hello = {"v": 1, "type": "hello", "t": time.time(), "pid": 1, "rank": 0, "eseq": 1, "host": "h",
             "cmdline": ["x"], "start_time": 1.0, "agent_version": "0", "device": "cpu", "sample_hz": 10.0,
             "model": {"class": "M", "blob": payload}, "payload": payload}
    msg = decode(encode(hello))  # accepted: the bytes stay bytes
    assert msg["payload"] == payload and isinstance(msg["model"]["blob"], bytes)
    state = SessionState()
    state.apply(msg)
    render.header(state)
    # (2) over a real socket to the viewer's Subscriber.
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/evil.sock"
    pub.bind(endpoint)
    sub = Subscriber(endpoint)
    try:
        got = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            pub.send(encode(dict(hello, eseq=2)))
            got = sub.poll(50)
        assert got
        for frame in (payload, b"E" + payload, b"S" + payload):
            pub.send(frame)
        pub.send(encode(dict(hello, eseq=3)))
        got = collect(sub, lambda g: any(m.get("eseq") == 3 for m in g))
        assert any(m.get("eseq") == 3 for m in got)
        collect(sub, lambda g: sub.rejected >= 2, timeout=5)  # the samples socket is a connection of its own
        assert sub.rejected == 2  # the frame without a topic byte is not even subscribed to
        assert "not msgpack" in (sub.last_rejection or "") or "not a map" in (sub.last_rejection or "")
    finally:
        sub.close()
        pub.close(linger=0)
    assert not marker.exists() and pickle_tripwire == []


UNSAFE = re.compile(r"\bimport\s+(c?pickle|_pickle|marshal|shelve|dill|jsonpickle)\b|\bfrom\s+(c?pickle|_pickle|"
                    r"marshal|shelve|dill)\s+import|pickle\.(loads?|Unpickler)|marshal\.loads?|torch\.load\(|"
                    r"yaml\.(unsafe_)?load\(|np\.load\(|numpy\.load\(|\beval\(|\bexec\(")


# The one exec that is meant: `vramtop attach PID` makes the job exec the bootstrap file vramtop itself
# wrote (0600, in the per-user 0700 runtime dir; docs/attach.md). Nothing received from a socket or a file
# of the job's reaches it.
INJECTED_LINE = {("vramtop/inject.py",
                  """_LINE = "try:\\n exec(compile(__import__('pathlib').Path({path!r}).read_text(),"""
                  """{path!r},'exec')," \\""")}


def test_no_code_path_can_unpickle_or_evaluate_outside_data():
    offenders = []
    for base in (ROOT / "vramtop", ROOT / "agent" / "vramtop_agent"):
        for path in base.rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if UNSAFE.search(code) and (str(path.relative_to(ROOT)), line.strip()) not in INJECTED_LINE:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


# ---------------------------------------------------------------------- the runtime directory and its files


def _foreign_dir(tmp_path) -> Path:
    """A directory owned by another user: made so as root, else one that root owns."""
    if os.geteuid() == 0:
        d = tmp_path / "foreign"
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
        return d
    return Path("/")


def test_a_symlinked_or_foreign_runtime_dir_is_refused(tmp_path, monkeypatch, capsys):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    for bad in (link, _foreign_dir(tmp_path)):
        monkeypatch.setenv("VRAMTOP_RUNTIME_DIR", str(bad))
        for create in (True, False):
            with pytest.raises(discovery.UnsafeRuntimeDir, match="not a directory owned by this user"):
                discovery.runtime_dir(create=create)
        monkeypatch.setattr(lifecycle, "_said", set())
        agent = vramtop_agent.watch(SecretiveModel())  # the job runs on: a non-publishing agent, one line
        try:
            assert agent.endpoint is None and not agent._info_written
        finally:
            agent.stop()
        said = capsys.readouterr().err
        assert said.startswith("vramtop: agent not publishing") and "refusing" in said and said.count("\n") == 1
        with pytest.raises(PermissionError):
            discovery.list_agents()
        source = LiveSource(None, rescan_s=0)
        assert source.poll() == [] and "not a directory owned by this user" in source.status
        assert cli_main(["ls"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("vramtop: ") and "refusing" in err and err.count("\n") == 1


def test_discovery_files_that_are_not_ours_or_not_well_formed_are_ignored(runtime_dir, tmp_path, capsys):
    d = discovery.runtime_dir()
    me = os.getpid()
    good = discovery.make_info("ipc:///tmp/good.sock", 0, 0, 1)
    bad_values = [
        {"pid": str(me)}, {"pid": True}, {"pid": -1}, {"endpoint": 5}, {"endpoint": "http://x"},
        {"endpoint": "tcp://" + "x" * 2000}, {"rank": "0"}, {"world_size": None}, {"start_time": "yesterday"},
        {"proc_start": [1]}, {"cmdline": "python train.py"}, {"cmdline": ["python", 3]}, {"host": {"a": 1}},
    ]
    for i, change in enumerate(bad_values):
        (d / f"{me}-{100 + i}.json").write_text(json.dumps({**good, "rank": 100 + i, **change}))
    (d / f"{me}-200.json").write_text("[1, 2, 3]")
    (d / f"{me}-201.json").write_text("[" * 20_000 + "]" * 20_000)  # RecursionError in json
    (d / f"{me}-202.json").write_bytes(b"\xff\xfe{not json")
    (d / f"{me}-203.json").write_text(json.dumps({**good, "rank": 203, "pad": "x" * 70_000}))  # too big
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({**good, "rank": 204}))
    (d / f"{me}-204.json").symlink_to(target)
    os.mkfifo(d / f"{me}-205.json")  # reading it would block forever
    if os.geteuid() == 0:
        planted = d / f"{me}-206.json"
        planted.write_text(json.dumps({**good, "rank": 206}))
        os.chown(planted, 65534, 65534)
    discovery.write_info({**good, "rank": 7})
    agents = discovery.list_agents()
    assert [(a["pid"], a["rank"]) for a in agents] == [(me, 7)]
    assert len(list(d.glob("*.json"))) >= len(bad_values) + 6  # ignored, not deleted (only stale ones are)
    assert cli_main(["ls", "--json"]) == 0
    assert [a["rank"] for a in json.loads(capsys.readouterr().out)] == [7]
    assert cli_main(["ls"]) == 0
    capsys.readouterr()
