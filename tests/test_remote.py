"""Remote nodes over a real sshd on loopback: `vramtop ls HOST`, attach through a tunnel, a dropped tunnel.

The "remote" is this machine reached only through ssh (tests/sshd_server.py):
its sessions have their own VRAMTOP_RUNTIME_DIR, where a real training job
(vramtop.demo_train) publishes, and the viewer's own runtime dir (set per
test by conftest) never sees that agent directly.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import free_port, screen_text, until
from sshd_server import start_sshd

from vramtop.cli import main
from vramtop.errors import UserError
from vramtop.job_source import JobSource
from vramtop.remote import RemoteSource, parse_host, remote_ls
from vramtop.state import SessionState
from vramtop.subscriber import Subscriber
from vramtop.tui.app import VramtopApp

VRAMTOP = str(Path(sys.executable).with_name("vramtop"))  # the remote's vramtop: not on its ssh PATH


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_job(sshd):
    """A real LoRA fine-tune on "the remote", publishing into the remote's runtime dir."""
    child = subprocess.Popen(
        [sys.executable, "-m", "vramtop.demo_train", "--steps", "100000", "--batch", "1", "--seq-len", "32",
         "--sleep", "0.05", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "VRAMTOP_RUNTIME_DIR": str(sshd.remote_runtime_dir)},
    )
    deadline = time.time() + 90
    while not list(sshd.remote_runtime_dir.glob(f"{child.pid}-*.json")):
        if child.poll() is not None or time.time() > deadline:
            child.kill()
            pytest.fail("the remote training job did not start its agent")
        time.sleep(0.1)
    yield child
    child.kill()
    child.wait()


@pytest.fixture
def ssh_env(sshd, monkeypatch):
    monkeypatch.setenv("VRAMTOP_SSH", sshd.ssh_env)
    monkeypatch.delenv("VRAMTOP_REMOTE_VRAMTOP", raising=False)
    return sshd


def _run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_over_ssh_json_table_and_url_forms(ssh_env, remote_job, capsys):
    code, out, _ = _run_cli(capsys, "ls", ssh_env.alias, "--json", "--remote-vramtop", VRAMTOP)
    assert code == 0
    [agent] = json.loads(out)
    assert agent["pid"] == remote_job.pid and agent["ssh_host"] == ssh_env.alias
    assert agent["endpoint"].startswith("ipc://" + str(ssh_env.remote_runtime_dir))
    assert agent["device"] == "cpu" and agent["rank"] == 0 and "demo_train" in " ".join(agent["cmdline"])
    # ssh://user@host:port, through the same user's ssh: the same table columns.
    code, out, _ = _run_cli(capsys, "ls", ssh_env.url, "--remote-vramtop", VRAMTOP)
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:6] == ["PID", "RANK", "LOCAL", "NODE", "GPU", "AGE"] and "ENDPOINT" in header
    assert row.split()[0] == str(remote_job.pid) and "cpu" in row and "demo_train" in row
    # Here, on "the laptop", nothing runs: the agent is reachable only through ssh.
    code, out, _ = _run_cli(capsys, "ls", "--json")
    assert code == 0 and json.loads(out) == []


def test_unreachable_host_or_missing_vramtop_is_one_clear_line(ssh_env, capsys):
    closed = f"ssh://{ssh_env.user}@127.0.0.1:{free_port()}"
    for argv in (["ls", closed], ["attach", closed]):
        code, out, err = _run_cli(capsys, *argv)
        assert code != 0 and out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"vramtop: cannot reach {closed} over ssh:") and "refused" in err
    # The remote's non-interactive PATH has no vramtop (and its python3 no vramtop module).
    code, _, err = _run_cli(capsys, "ls", ssh_env.alias)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"vramtop: vramtop is not installed on {ssh_env.alias}")
    # A host that looks like an ssh option is refused before ssh runs.
    with pytest.raises(UserError):
        parse_host("-oProxyCommand=touch /tmp/x")


@pytest.mark.asyncio
async def test_attach_through_the_tunnel_survives_a_killed_ssh(ssh_env, remote_job):
    agents = remote_ls(ssh_env.alias, VRAMTOP)
    source = RemoteSource(ssh_env.alias, agents, remote_vramtop=VRAMTOP)
    app = VramtopApp(source, refresh_hz=10)
    # The same stream, read directly on "the remote" (same machine): what the tunnel must deliver.
    direct = Subscriber(agents[0]["endpoint"])
    direct_state = SessionState()
    try:
        async with app.run_test(size=(180, 50)) as pilot:
            await until(pilot, lambda: app.state.sample is not None and app.state.hello is not None,
                         what="first sample through the tunnel")
            for m in direct.poll(1000):
                direct_state.apply(m)
            s = app.state.sample
            assert s["pid"] == remote_job.pid
            assert s["blocks"]["parameters"] == (direct_state.sample or s)["blocks"]["parameters"] > 0
            app._refresh_view()
            text = screen_text(app)
            assert f"pid {remote_job.pid}" in text and "via ssh vt-remote" in text and "tunnel up" in text
            assert "[live]" in text

            # Nothing listens on TCP: the local end is a unix socket in a private directory.
            tunnel = source.tunnel
            local = tunnel.forwards[0][0]
            assert stat.S_ISSOCK(os.stat(local).st_mode)
            assert stat.S_IMODE(os.stat(os.path.dirname(local)).st_mode) == 0o700
            ssh_proc = psutil.Process(tunnel.proc.pid)
            assert not [c for c in ssh_proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]

            # Drop the tunnel: the view notices, ssh is started again, samples resume.
            first_ssh = tunnel.proc.pid
            seq_before = s["seq"]
            os.kill(first_ssh, signal.SIGKILL)
            await until(pilot, lambda: tunnel.proc is not None and tunnel.proc.pid != first_ssh and tunnel.up,
                         what="tunnel re-established")
            await until(pilot, lambda: app.state.sample["seq"] > seq_before + 5, what="samples resumed")
            assert tunnel.restarts == 1
            assert app.state.connection() == "live" and app.state.sample["pid"] == remote_job.pid
            app._refresh_view()
            assert "re-established 1x" in screen_text(app)
            second_ssh = tunnel.proc.pid
            await pilot.press("q")
    finally:
        direct.close()
    assert not os.path.exists(local)  # close() removed the socket and ended ssh
    assert not psutil.pid_exists(second_ssh)
    assert remote_job.poll() is None  # the job noticed nothing


def test_one_job_view_over_two_host_spellings(ssh_env, remote_job):
    """JobSource: one ssh per host, each carrying its members' forwards; both streams arrive."""
    hosts = [parse_host(ssh_env.alias), parse_host(ssh_env.url)]
    agents = [a for h in hosts for a in remote_ls(h, VRAMTOP)]
    assert len(agents) == 2 and {a["ssh_host"] for a in agents} == {h.spec for h in hosts}
    src = JobSource(agents, hosts=hosts, remote_vramtop=VRAMTOP, rescan_s=None)
    try:
        got: dict[str, int] = {}
        deadline = time.time() + 30
        while time.time() < deadline and not (len(got) == 2 and min(got.values()) >= 3):
            for key, msg in src.poll(100):
                if msg["type"] == "sample":
                    assert msg["pid"] == remote_job.pid
                    got[key] = got.get(key, 0) + 1
        assert len(got) == 2 and min(got.values()) >= 3, got
        assert len(src.tunnels) == 2 and all(t.up for t in src.tunnels)
    finally:
        src.close()


def test_tcp_agent_and_the_picker_through_ssh(ssh_env, remote_job, monkeypatch, free_tcp_endpoint):
    """Two agents on the host: the picker's choices; the tcp one is reached by a socket-to-127.0.0.1:PORT forward."""
    import torch

    import vramtop_agent

    monkeypatch.setenv("VRAMTOP_RUNTIME_DIR", str(ssh_env.remote_runtime_dir))  # this agent lives on "the remote"
    agent = vramtop_agent.watch(torch.nn.Linear(256, 256), endpoint=free_tcp_endpoint, sample_hz=20)
    try:
        agents = remote_ls(ssh_env.alias, VRAMTOP)
        assert {a["pid"] for a in agents} == {remote_job.pid, os.getpid()}
        src = RemoteSource(ssh_env.alias, agents, remote_vramtop=VRAMTOP)
        try:
            assert len(src.choices) == 2 and "pick one" in src.status and src.sub is None
            src.choose(next(a for a in agents if a["endpoint"].startswith("tcp://")))
            assert src.tunnel.forwards[0][1] == "127.0.0.1:" + free_tcp_endpoint.rsplit(":", 1)[1]
            got = []
            deadline = time.time() + 30
            while time.time() < deadline and not [m for m in got if m["type"] == "sample"]:
                got += src.poll()
                time.sleep(0.05)
            sample = [m for m in got if m["type"] == "sample"][-1]
            assert sample["pid"] == os.getpid()
            assert sample["blocks"]["parameters"] == agent.snapshot()["blocks"]["parameters"]
        finally:
            src.close()
    finally:
        agent.stop()


def test_a_killed_viewer_leaves_no_ssh_behind(ssh_env, remote_job, tmp_path):
    """SIGKILL the viewer (no close()): its tunnel's ssh ends by itself."""
    script = tmp_path / "viewer.py"
    script.write_text(
        "import sys, time\n"
        "from vramtop.remote import RemoteSource\n"
        f"src = RemoteSource({ssh_env.alias!r}, remote_vramtop={VRAMTOP!r})\n"
        "deadline = time.time() + 30\n"
        "while time.time() < deadline and not (src.tunnel and src.tunnel.up):\n"
        "    src.poll(); time.sleep(0.05)\n"
        "print(src.tunnel.proc.pid, flush=True)\n"
        "time.sleep(60)\n")
    viewer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        ssh_pid = int(viewer.stdout.readline())
        ssh = psutil.Process(ssh_pid)
        assert "ssh" in ssh.name()
        viewer.kill()
        viewer.wait()
        ssh.wait(timeout=15)  # raises TimeoutExpired if the tunnel outlived its viewer
    finally:
        if viewer.poll() is None:
            viewer.kill()
