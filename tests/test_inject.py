"""`vramtop attach/record PID` on jobs started without vramtop: the agent injected into a running interpreter.

Everything is real: the job is `tests/inject_job.py` (a tiny Llama with PEFT LoRA that imports nothing of
vramtop) or a torchrun gloo job, started with plain `python`; the viewer is `python -m vramtop` in a pty or a
subprocess; the injection uses ptrace on the live process. Byte counts are checked against the job's own
tensors (it writes them to truth.json), losses against a bare run of the same script.

Injection needs ptrace: as root, or with kernel.yama.ptrace_scope=0 (.ci/run sets it). Under CI=true a
machine that forbids it fails these tests instead of skipping them.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import helpers
import pytest
from helpers import agent_of, job_env

from vramtop import inject
from vramtop.errors import UserError
from vramtop.subscriber import Subscriber
from vramtop_agent import discovery

HERE = Path(__file__).parent
JOB = HERE / "inject_job.py"


def _ptrace_allowed() -> str | None:
    """None when this machine lets us trace our own processes, else why not."""
    if sys.platform != "linux":
        return "not Linux"
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        scope = "0"
    if scope != "0" and os.getuid() != 0:
        return f"kernel.yama.ptrace_scope is {scope} (set it to 0, as .ci/run does)"
    return None


@pytest.fixture(autouse=True)
def _needs_ptrace():
    why = _ptrace_allowed()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"injection cannot run here: {why}")
        pytest.skip(why)


class PlainJob:
    """tests/inject_job.py in a subprocess: no vramtop in it until we inject."""

    def __init__(self, out: Path, code: int = 0, steps: int | None = None, pause: float = 0.02):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        env = job_env(STEP_PAUSE=str(pause), **({"STEPS": str(steps)} if steps else {}))
        self.proc = subprocess.Popen([sys.executable, str(JOB), str(out), str(code)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid

    def truth(self, timeout: float = 120.0) -> dict:
        path = self.out / "truth.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the job never finished its first step"
            time.sleep(0.1)
        return json.loads(path.read_text())

    def finish(self, timeout: float = 120.0, stop: bool = True) -> tuple[int, list[float], str]:
        if stop:
            (self.out / "stop").write_text("")
        out, err = self.proc.communicate(timeout=timeout)
        losses = [float(line.split()[2]) for line in out.splitlines() if line.startswith("loss ")]
        return self.proc.returncode, losses, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def plain_jobs(tmp_path):
    started: list[PlainJob] = []

    def start(name: str = "job", **kw) -> PlainJob:
        job = PlainJob(tmp_path / name, **kw)
        started.append(job)
        return job

    yield start
    for job in started:
        job.kill()


def bare_losses(tmp_path: Path, steps: int) -> list[float]:
    job = PlainJob(tmp_path / "bare", steps=steps, pause=0.0)
    code, losses, err = job.finish(timeout=300, stop=False)
    assert code == 0, err
    return losses


def vramtop(*args, timeout: float = 120.0, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramtop", *args], capture_output=True, text=True,
                          timeout=timeout, env=job_env(**env), stdin=subprocess.DEVNULL)


class Pty:
    """`python -m vramtop ARGS` on a real terminal (160x50), its output drained by a thread (a full pty
    would block the app)."""

    def __init__(self, *args, **env):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "vramtop", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=job_env(TERM="xterm-256color", COLUMNS="160", LINES="50", **env),
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.seen = b""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                r, _, _ = select.select([self.master], [], [], 0.2)
                if r:
                    data = os.read(self.master, 65536)
                    if not data:
                        return
                    self.seen += data
            except (OSError, ValueError):
                return

    def expect(self, needle: str | re.Pattern, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.seen.decode(errors="replace")
            found = needle.search(text) if isinstance(needle, re.Pattern) else (needle in text or None)
            if found:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} never appeared; last output: {self.seen[-800:]!r}")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def quit(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.send("q")  # again if the app was not reading keys yet
                try:
                    return self.proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
            raise AssertionError(f"the viewer did not quit; last output: {self.seen[-800:]!r}")
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)
        try:
            os.close(self.master)
        except OSError:
            pass


def collect(endpoint: str, until, timeout: float = 120.0) -> list[dict]:
    """Every message (every sample too) from the agent at `endpoint` until until(messages) holds."""
    sub = Subscriber(endpoint, every_sample=True)
    try:
        return helpers.collect(sub, until, timeout, strict=True)
    finally:
        sub.close()


def _optimizer_starts(msgs):
    return [m for m in msgs if m["type"] == "phase" and m["phase"] == "optimizer" and m["edge"] == "start"]


# ---------------------------------------------------------------------- attach on a plain LoRA job


def test_attach_injects_into_a_plain_lora_job_byte_exact(plain_jobs, tmp_path):
    job = plain_jobs(code=7)
    truth = job.truth()
    view = Pty("attach", str(job.pid), "--yes")
    try:
        view.expect("will start one inside it")
        # The header marks the session: the steps before the first whole one are unknown, not zero.
        view.expect(re.compile(r"injected: steps before \d+ unknown"))
        info = agent_of(job.pid)
        got = collect(info["endpoint"], lambda ms: len(_optimizer_starts(ms)) >= 2 and any(
            m["type"] == "step" for m in ms) and any(m["type"] == "hello" and m.get("optimizer") for m in ms))
        assert view.quit() == 0
    finally:
        view.close()
    hello = [m for m in got if m["type"] == "hello"][-1]
    assert hello["model"]["class"] == "PeftModelForCausalLM(LlamaForCausalLM)"  # the root, not a layer
    assert hello["optimizer"]["class"] == "AdamW"
    first = hello["injected"]["first_step"]
    assert isinstance(first, int) and first >= 1
    assert all(m["step"] >= first for m in got if m["type"] in ("step", "phase"))  # no partial step shown
    for m in _optimizer_starts(got):  # when the step begins, every block is there: byte-exact
        assert m["blocks"]["parameters"] == truth["parameters"]
        assert m["blocks"]["gradients"] == truth["gradients"]
        assert m["blocks"]["optimizer"] == truth["optimizer"]
    samples = [m for m in got if m["type"] == "sample"]
    assert samples and all(s["blocks"]["parameters"] == truth["parameters"] for s in samples)
    assert all(s["blocks"]["optimizer"] == truth["optimizer"] for s in samples)  # never a zero before it is known
    # Quitting the viewer leaves the agent running quietly.
    assert agent_of(job.pid, timeout=2)["pid"] == job.pid
    code, losses, err = job.finish()
    assert code == 7, err
    assert "Traceback" not in err, err
    assert losses == bare_losses(tmp_path, len(losses))  # the job computed exactly what it computes alone


def test_injecting_twice_reuses_the_agent_and_detach_removes_every_hook(plain_jobs, tmp_path):
    job = plain_jobs(code=3)
    truth = job.truth()
    first = vramtop("record", str(job.pid), "--yes", "-o", str(tmp_path / "a.vramtop"), "--duration", "2")
    assert first.returncode == 0, first.stderr
    assert "agent started in process" in first.stderr
    endpoint = agent_of(job.pid)["endpoint"]
    again = inject.start_agent(job.pid, yes=True, verb="attach")  # the same code path as attach
    assert again["already"] and again["endpoint"] == endpoint
    second = vramtop("record", str(job.pid), "--yes", "-o", str(tmp_path / "b.vramtop"), "--duration", "1")
    assert second.returncode == 0 and "agent started" not in second.stderr, second.stderr  # found, not injected
    got = collect(endpoint, lambda ms: len(_optimizer_starts(ms)) >= 1)
    assert _optimizer_starts(got)[0]["blocks"]["optimizer"] == truth["optimizer"]

    from vramtop.recording import open_recording

    with open_recording(str(tmp_path / "a.vramtop")) as rec:
        (session,) = rec.sessions()
        assert session.hello["injected"]["at"] > 0

    out = vramtop("detach", str(job.pid))
    assert out.returncode == 0 and "stopped and its hooks were removed" in out.stdout, out
    assert all(i["pid"] != job.pid for i in discovery.list_agents())
    out = vramtop("detach", str(job.pid))
    assert out.returncode == 0 and "no injected agent" in out.stdout, out
    code, losses, err = job.finish()
    assert code == 3, err
    hooks = json.loads((job.out / "hooks.json").read_text())
    assert hooks == {"forward_pre": 0, "forward": 0, "opt_pre": 0, "opt_post": 0, "model_hooks": 0}
    assert "Traceback" not in err


# ---------------------------------------------------------------------- torchrun

DDP_JOB = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 16), torch.randn(4, 2)
    out = sys.argv[1]
    open(os.path.join(out, "ready-" + os.environ["RANK"]), "w").close()
    stop = torch.zeros(1)
    while True:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        stop[0] = float(os.path.exists(os.path.join(out, "stop")))
        dist.all_reduce(stop)  # both ranks stop at the same step
        if stop.item():
            break
        time.sleep(0.05)
    dist.destroy_process_group()
""")


def test_torchrun_ranks_are_offered_and_injected(tmp_path):
    import psutil

    script = tmp_path / "ddp.py"
    script.write_text(DDP_JOB)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=job_env())
    view = None
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ranks = {int(p.environ()["RANK"]): p.pid for p in psutil.Process(launcher.pid).children()}
        assert set(ranks) == {0, 1}
        # `vramtop attach` with no argument: no agent here, so it lists the plain PyTorch processes.
        view = Pty("attach")
        text = view.expect("Inject the vramtop agent into which?")
        listed = dict(re.findall(r"(\d+)\) pid (\d+)  rank", text))
        numbers = {int(pid): n for n, pid in listed.items()}
        assert ranks[0] in numbers and ranks[1] in numbers, text  # both ranks offered
        assert launcher.pid not in numbers  # the launcher trains nothing
        view.send(f"{numbers[ranks[0]]} {numbers[ranks[1]]}\r")
        agents = {r: agent_of(pid, timeout=60) for r, pid in ranks.items()}
        assert {a["world_size"] for a in agents.values()} == {2}
        view.expect(re.compile(r"rank\s*1"))  # the job view of both ranks
        assert view.quit() == 0
        # Attaching to one rank's PID reuses its agent; its stream is rank 1 of 2.
        got = collect(agents[1]["endpoint"], lambda ms: any(m["type"] == "step" for m in ms) and any(
            m["type"] == "hello" and m.get("model") for m in ms))
        hello = [m for m in got if m["type"] == "hello"][-1]
        assert hello["rank"] == 1 and hello["world_size"] == 2 and hello["injected"]["first_step"] >= 1
        assert hello["model"]["class"] == "DistributedDataParallel(Sequential)"
        again = inject.start_agent(ranks[1], yes=True, verb="attach")
        assert again["already"] and again["endpoint"] == agents[1]["endpoint"]
        (tmp_path / "stop").write_text("")
        out, err = launcher.communicate(timeout=120)
        assert launcher.returncode == 0, err[-2000:]
    finally:
        if view is not None:
            view.close()
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
            launcher.communicate()


# ---------------------------------------------------------------------- refusals and blocks


NO_TORCH = "import time\nwhile True:\n    time.sleep(0.01)\n"
COUNTING = "import sys, time\nsys.modules['zmq'] = None\nimport torch\nwhile True:\n    time.sleep(0.01)\n"


@pytest.mark.parametrize("kind", ["sleep", "python-without-torch"])
def test_refuses_what_is_not_a_pytorch_job_and_leaves_it_alone(kind, tmp_path):
    cmd = ["sleep", "120"] if kind == "sleep" else [sys.executable, "-c", NO_TORCH]
    target = subprocess.Popen(cmd)
    try:
        time.sleep(0.5)
        for verb in (["attach"], ["record", "-o", str(tmp_path / "r.vramtop")]):
            out = vramtop(*verb, str(target.pid), "--yes")
            assert out.returncode != 0
            line = out.stderr.strip()
            assert len(line.splitlines()) == 1 and "Traceback" not in line, line
            expect = "is not a Python interpreter" if kind == "sleep" else "has not imported torch"
            assert expect in line and "nothing injected" in line, line
        assert target.poll() is None  # unharmed
        assert open(f"/proc/{target.pid}/stat").read().split(") ")[1][0] in "SR"  # not left stopped
    finally:
        target.kill()
        target.wait()


def test_missing_dependency_in_the_job_is_named(tmp_path):
    target = subprocess.Popen([sys.executable, "-c", COUNTING], env=job_env())
    try:
        deadline = time.monotonic() + 120
        while not any("libtorch" in line for line in open(f"/proc/{target.pid}/maps")):
            assert time.monotonic() < deadline and target.poll() is None
            time.sleep(0.2)
        time.sleep(0.5)
        out = vramtop("attach", str(target.pid), "--yes")
        assert out.returncode != 0
        assert "pyzmq is not installed in the job's environment" in out.stderr, out.stderr
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_confirmation_is_required_without_a_terminal(plain_jobs):
    job = plain_jobs()
    job.truth()
    out = vramtop("attach", str(job.pid))
    assert out.returncode != 0 and "pass --yes" in out.stderr, out.stderr
    assert all(i["pid"] != job.pid for i in discovery.list_agents())  # nothing injected


@pytest.mark.parametrize("block", ["gdb-missing", "other-user"])
def test_blocked_injection_says_why_and_shows_the_gpus(block, tmp_path):
    if block == "other-user" and os.getuid() != 0:
        pytest.skip("starting another user's process needs root")
    env = {}
    if block == "gdb-missing":
        bare = tmp_path / "bin"
        bare.mkdir()
        env = {"VRAMTOP_INJECTOR": "gdb", "PATH": str(bare)}
        target = subprocess.Popen([sys.executable, "-c", COUNTING.replace("sys.modules['zmq'] = None", "")])
    else:
        target = subprocess.Popen(["sleep", "120"], preexec_fn=lambda: os.setuid(65534))
    view = None
    try:
        if block == "gdb-missing":
            deadline = time.monotonic() + 120
            while not any("libtorch" in line for line in open(f"/proc/{target.pid}/maps")):
                assert time.monotonic() < deadline and target.poll() is None
                time.sleep(0.2)
        else:
            time.sleep(0.5)
        view = Pty("attach", str(target.pid), "--yes", **env)
        view.expect("gdb is not installed" if block == "gdb-missing" else "belongs to uid 65534")
        view.expect("vramtop run")  # the zero-code alternatives
        # the GPU view
        view.expect(re.compile(r"No NVIDIA driver|GPUs on this machine|no vramtop agent on this machine"))
        assert view.quit() == 0
        assert target.poll() is None
    finally:
        if view is not None:
            view.close()
        target.kill()
        target.wait()


def test_viewer_sigkilled_during_injection_the_job_runs_on(plain_jobs, tmp_path):
    job = plain_jobs(code=5)
    job.truth()
    view = Pty("attach", str(job.pid), "--yes")
    try:
        view.expect("will start one inside it")  # printed just before the injection starts
        os.killpg(view.proc.pid, signal.SIGKILL)
        view.proc.wait(10)
    finally:
        view.close()
    time.sleep(2)
    assert job.proc.poll() is None
    code, losses, err = job.finish()
    assert code == 5, err
    assert "Traceback" not in err
    assert losses == bare_losses(tmp_path, len(losses))


# ---------------------------------------------------------------------- dispatch (no process needed)


def _target(version, exe=sys.executable) -> inject.Target:
    return inject.Target(pid=os.getpid(), exe=exe, version=version, libpython=exe, cmdline=["python"])


def test_version_dispatch():
    assert inject.method(_target((3, 14)), {}) == "remote_exec"
    assert inject.method(_target((3, 15)), {"VRAMTOP_INJECTOR": "gdb"}) == "remote_exec"
    assert inject.method(_target((3, 11)), {"VRAMTOP_INJECTOR": "gdb"}) == "gdb"
    import platform

    expected = "ptrace" if platform.machine() == "x86_64" else "gdb"
    assert inject.method(_target((3, 10)), {}) == expected


def test_remote_exec_reports_an_interpreter_without_it():
    # This interpreter (< 3.14) has no sys.remote_exec: the branch must say so in one line. The 3.14 path
    # itself did not run here (no 3.14 interpreter on this machine).
    with pytest.raises(UserError, match="sys.remote_exec into process .* failed: AttributeError"):
        inject._run_remote_exec(_target((3, 14)), Path(os.devnull), timeout_s=60)


def test_injected_line_and_gdb_command_are_well_formed(tmp_path):
    boot = tmp_path / "it's \"odd\".py"
    line = inject._LINE.format(path=str(boot))
    code = compile(line, "<line>", "exec")  # what PyRun_SimpleString will run, in the job's __main__
    assert code.co_names and "f" not in code.co_names  # it reads the file without binding a name there
    namespace = {"__builtins__": __builtins__}
    boot.write_text("ran = True\n")
    exec(code, namespace)
    assert set(namespace) == {"__builtins__"}  # __main__ is left as it was
    cmd = inject.gdb_command(123, line)
    call = next(c for c in cmd if c.startswith("call "))
    assert call.startswith('call (int)Py_AddPendingCall((void*)&PyRun_SimpleString, (void*)"')
    assert '\\"odd\\"' in call and "\n" not in call


# ---------------------------------------------------------------------- the agent's side


HIDE_VRAMTOP = textwrap.dedent("""
    import sys, time
    # This job's environment cannot import vramtop_agent (as if vramtop were installed elsewhere).
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("agent")]
    try:
        import vramtop_agent
        print("importable", flush=True)
    except ImportError:
        print("not importable", flush=True)
    import torch
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    while True:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.02)
""")


def test_agent_directory_is_added_when_the_job_cannot_import_it(tmp_path):
    target = subprocess.Popen([sys.executable, "-c", HIDE_VRAMTOP], stdout=subprocess.PIPE, text=True, env=job_env())
    try:
        assert target.stdout.readline().strip() == "not importable"
        deadline = time.monotonic() + 120
        while not any("libtorch" in line for line in open(f"/proc/{target.pid}/maps")):
            assert time.monotonic() < deadline and target.poll() is None
            time.sleep(0.2)
        out = vramtop("record", str(target.pid), "--yes", "-o", str(tmp_path / "r.vramtop"), "--duration", "0.5")
        assert out.returncode == 0 and "agent started" in out.stderr, out.stderr
        info = agent_of(target.pid)
        # A SUB socket misses what was published before it connected: wait for the next hello too.
        got = collect(info["endpoint"], lambda ms: any(m["type"] == "step" for m in ms)
                      and any(m["type"] == "hello" and m.get("model") for m in ms))
        assert [m for m in got if m["type"] == "hello" and m.get("model")][-1]["model"]["class"] == "Linear"
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_injected_mid_forward_the_root_is_still_the_outermost_module(tmp_path):
    """The bootstrap can run inside a forward whose outer modules took PyTorch's hook-free fast path:
    the root must still be the outermost module, and the first step reported a whole one."""
    import torch

    from vramtop_agent import _inject_boot
    from vramtop_agent.autodetect import RootDetector

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    status = tmp_path / "status.json"
    fired = []

    def mid_forward(module, args):  # where a pending call can land: between two bytecodes of a forward
        if not fired:
            fired.append(True)
            _inject_boot.run("start", str(status))

    handle = model[1].register_forward_pre_hook(mid_forward)
    try:
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        result = json.loads(status.read_text())
        assert result["ok"] and not result["already"], result
        agent = _inject_boot.injected_agent()
        assert agent.model is model  # not model[2], which a depth counter started mid-forward would pick
        assert agent.optimizer is opt and agent.injected["first_step"] == 1
        assert [s["step"] for s in agent.steps] == [1]  # step 0 began before the optimizer was known
        assert _inject_boot.start()["already"]  # twice: the same agent
    finally:
        handle.remove()
        _inject_boot.run("stop", str(status))
    assert json.loads(status.read_text()) == {"ok": True, "stopped": True, "pid": os.getpid()}
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    assert not m._global_forward_pre_hooks and not m._global_forward_hooks
    assert not o._global_optimizer_pre_hooks and not o._global_optimizer_post_hooks
    assert not any(isinstance(h, RootDetector) for h in agent._hooks)


@pytest.mark.parametrize("injected, shown", [
    ({"at": 1.0}, "(injected: waiting for the next optimizer step)"),
    ({"at": 1.0, "first_step": 1}, "step 7 (injected: steps before 1 unknown)"),
    (None, None),
])
def test_header_marks_an_injected_session(injected, shown):
    from vramtop.state import SessionState
    from vramtop.tui import render

    state = SessionState(clock=lambda: 100.0)
    hello = {"v": 1, "type": "hello", "t": 99.0, "pid": 1, "rank": 0, "eseq": 1, "host": "h", "cmdline": ["x"],
             "start_time": 1.0, "agent_version": "0.1.0", "device": "cpu", "sample_hz": 10.0}
    if injected:
        hello["injected"] = injected
    state.apply(hello)
    state.apply({"v": 1, "type": "sample", "t": 99.5, "pid": 1, "rank": 0, "seq": 1, "step": 7, "phase": "idle",
                 "device": "cpu", "blocks": dict.fromkeys(("parameters", "gradients", "optimizer", "activations",
                                                           "other"), 0)})
    text = render.header(state).plain
    if shown:
        assert shown in text
    else:
        assert "injected" not in text


def test_attach_over_ssh_offers_the_plain_job_and_injects_there(tmp_path, tmp_path_factory):
    """`vramtop attach HOST` with no agent there: the picker lists the host's plain PyTorch processes
    (`vramtop ls --plain` over ssh), `vramtop inject PID` runs there, then the dashboard opens."""
    sys.path.insert(0, str(HERE))
    from sshd_server import start_sshd

    sshd = start_sshd(tmp_path_factory.mktemp("sshd"))
    job = PlainJob(tmp_path / "job")
    job.proc.kill()  # restarted below with the remote's runtime dir, where `vramtop ls` there looks
    job.proc.communicate()
    env = job_env(STEP_PAUSE="0.02", VRAMTOP_RUNTIME_DIR=str(sshd.remote_runtime_dir))
    job.proc = subprocess.Popen([sys.executable, str(JOB), str(job.out), "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    job.pid = job.proc.pid
    view = None
    try:
        job.truth()
        view = Pty("attach", sshd.alias, "--remote-vramtop", str(Path(sys.executable).with_name("vramtop")),
                   VRAMTOP_SSH=sshd.ssh_env)
        text = view.expect("Inject the vramtop agent into which?")
        listed = {int(pid): n for n, pid in re.findall(r"(\d+)\) pid (\d+)", text)}
        assert job.pid in listed, text
        view.send(f"{listed[job.pid]}\r")
        view.expect(re.compile(r"injected: steps before \d+ unknown"))
        assert view.quit() == 0
        assert any(p.name.startswith(f"{job.pid}-") for p in sshd.remote_runtime_dir.glob("*.json"))
        code, _, err = job.finish()
        assert code == 0 and "Traceback" not in err, err
    finally:
        if view is not None:
            view.close()
        job.kill()
        sshd.stop()


def test_ptrace_refusal_line_says_what_to_change():
    line = inject._ptrace_denied_line(4242, "Operation not permitted")
    assert line.startswith("cannot trace process 4242 (Operation not permitted): ")
    assert ("ptrace_scope" in line) or ("CAP_SYS_PTRACE" in line)
    assert "vramtop run" in line and "\n" not in line


def test_a_job_that_starts_its_own_agent_is_waited_for_not_injected(tmp_path):
    """VRAMTOP=1 (or `vramtop run`): the job's agent appears at its first training forward."""
    out = tmp_path / "job"
    out.mkdir()
    job = subprocess.Popen([sys.executable, str(JOB), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env={**job_env(), "VRAMTOP": "1"})
    try:
        rec = vramtop("record", str(job.pid), "--yes", "-o", str(tmp_path / "r.vramtop"), "--duration", "1")
        assert rec.returncode == 0, rec.stderr
        assert "will start one inside it" not in rec.stderr and "agent started" not in rec.stderr
        hello = [a for a in discovery.list_agents() if a["pid"] == job.pid]
        assert hello  # the job's own agent
        from vramtop.recording import open_recording

        with open_recording(str(tmp_path / "r.vramtop")) as r:
            assert all("injected" not in s.hello for s in r.sessions())
    finally:
        (out / "stop").write_text("")
        job.wait(60)
