"""`vramtop run [--record PATH] [--no-tui] -- CMD ARGS`: start a job with the agent injected, and watch it.

The command runs unchanged, with this environment added:
  VRAMTOP=1                the agent starts in every Python process of the job that trains
                           (vramtop_agent._autostart: root module and optimizer found automatically)
  VRAMTOP_RECORD=PATH      with --record: the stream is recorded to PATH
  PYTHONPATH=<_boot>:...   a sitecustomize that starts the agent and then runs any sitecustomize
                           it shadows, for interpreters where vramtop's .pth is not installed
  VRAMTOP_AGENT_PATH       where this vramtop_agent lives, for an interpreter that cannot import it

The dashboard attaches to the job's first agent (in the child or, under
torchrun / accelerate launch, in one of its descendants), which appears at the
first training forward; until then, and again once the dashboard is closed,
the job's output (kept in a log file while the dashboard owns the terminal)
is shown. Without a terminal, with --no-tui or with --record, the job keeps
the terminal and vramtop just waits. The child's exit status is vramtop's
(128+N when a signal N ended it); SIGTERM/SIGHUP received by vramtop are
passed on to the child (whose agent then closes its recording with its
goodbye). Ctrl-C at the terminal reaches the child directly (the terminal
signals its whole foreground process group), so vramtop does not pass it on
again; a SIGINT that cannot have come from that terminal (vramtop has none,
or the child is not in its foreground group: a supervisor's `kill -INT`) is
passed on, each time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from vramtop import alerts, budget
from vramtop.commands.common import add_refresh, add_verb, check_refresh
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "run", run,
        help="run a training command with the agent injected, and watch it",
        description="Run CMD with the vramtop agent injected (no code change: the model and optimizer are found "
        "automatically) and open the dashboard on it. The exit status is CMD's.",
        epilog="example: vramtop run -- python train.py --lr 1e-4    |    vramtop run --record run.vramtop -- "
        "torchrun --nproc-per-node 2 train.py",
    )
    p.add_argument("--record", metavar="PATH", help="record the job's stream to PATH instead of showing the dashboard "
                   "({rank}, {pid}, {host} are filled in per process)")
    p.add_argument("--append", action="store_true", help="with --record: add this run to an existing recording "
                   "(as `vramtop record --append`) instead of refusing")
    p.add_argument("--no-tui", action="store_true",
                   help="do not open the dashboard (attach later with `vramtop attach`)")
    add_refresh(p, "dashboard")
    budget.add_arguments(p)
    alerts.add_arguments(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")


def boot_dir() -> str:
    """The directory holding vramtop's sitecustomize.py (and nothing else importable)."""
    import vramtop_agent

    return os.path.join(os.path.dirname(os.path.abspath(vramtop_agent.__file__)), "_boot")


def child_env(base: dict | None = None, record: str | None = None) -> dict:
    """The environment of the watched command."""
    import vramtop_agent

    env = dict(os.environ if base is None else base)
    env["VRAMTOP"] = "1"
    if record:
        env["VRAMTOP_RECORD"] = os.path.abspath(record)
    boot = boot_dir()
    old = env.get("PYTHONPATH", "")
    parts = [p for p in old.split(os.pathsep) if p and os.path.abspath(p) != boot]
    env["PYTHONPATH"] = os.pathsep.join([boot, *parts])
    env["VRAMTOP_AGENT_PATH"] = os.path.dirname(os.path.dirname(os.path.abspath(vramtop_agent.__file__)))
    return env


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.command or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UserError("nothing to run: vramtop run -- python train.py ARGS")
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        raise UserError(f"command not found: {cmd[0]}", exit_code=127)
    return cmd


def exit_status(returncode: int) -> int:
    """A shell's convention: a child killed by signal N gives 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace) -> int:
    """The job's exit status; with a budget, EXIT_OVER_BUDGET when the job succeeded but went over it."""
    limits = budget.from_args(args)
    if limits is None:
        return _run(args, args.record)
    # The verdict is read from a recording: the user's, or one of our own for the job's lifetime.
    tmp = None
    record = args.record
    if not record:
        tmp = tempfile.mkdtemp(prefix="vramtop-budget-")
        record = os.path.join(tmp, "run.vramtop")
    try:
        rc = _run(args, record)
        return budget.finish_run(record, limits, args.verdict, rc)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, record: str | None) -> int:
    cmd = _command(args)
    check_refresh(args)
    if args.record:
        from vramtop.run_record import check_target

        check_target(args.record, append=args.append)
    env = child_env(record=record)
    monitor = alerts.from_args(args)
    show = not (args.no_tui or args.record) and sys.stdin.isatty() and sys.stdout.isatty()
    log_path = None
    popen_kw: dict = {}
    if show:
        # The dashboard owns the terminal: the job's output goes to a log (in the runtime dir, removed
        # after a clean end), shown again once it closes.
        from vramtop.run_record import log_dir

        fd, log_path = tempfile.mkstemp(prefix="vramtop-run-", suffix=".log", dir=log_dir())
        popen_kw = {"stdin": subprocess.DEVNULL, "stdout": fd, "stderr": subprocess.STDOUT}
    try:
        child = subprocess.Popen(cmd, env=env, **popen_kw)
    except OSError as exc:
        raise UserError(f"cannot run {cmd[0]}: {exc.strerror or exc}", exit_code=126) from None
    finally:
        if popen_kw:
            os.close(popen_kw["stdout"])

    forwarded = []
    for signame in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, signame, None)
        if sig is None:
            continue
        try:
            forwarded.append((sig, signal.signal(sig, lambda s, f: _forward(child, s))))
        except (ValueError, OSError):  # not the main thread, or not settable
            pass
    # Without a dashboard, --on-alert still watches the job's stream (from this process, not the job's).
    watcher = None if show or not monitor.on_alert else alerts.StreamAlerts(
        monitor, lambda: (find_job_agent(child.pid) or {}).get("endpoint")).start()
    try:
        if log_path is not None:  # set exactly when the dashboard shows
            return exit_status(_run_with_dashboard(child, log_path, args.refresh, monitor))
        if args.record:
            from vramtop.run_record import announce, recorded

            started = announce(args.record, child.pid)
            status = exit_status(_wait(child))
            recorded(args.record, started)
            return status
        return exit_status(_wait(child))
    finally:
        if watcher is not None:
            watcher.stop()
        for sig, previous in forwarded:
            try:
                signal.signal(sig, previous)
            except (ValueError, OSError, TypeError):
                pass


def _forward(child: subprocess.Popen, sig: int) -> None:
    try:
        if child.poll() is None:
            child.send_signal(sig)
    except Exception:
        pass


def find_job_agent(pid: int) -> dict | None:
    """The oldest live agent in process `pid` or one of its descendants (torchrun, accelerate launch)."""
    from vramtop_agent import discovery

    agents = discovery.list_agents()
    if not agents:
        return None
    family = {pid}
    try:
        import psutil

        family |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except Exception:
        pass
    mine = [a for a in agents if a.get("pid") in family]
    mine.sort(key=lambda a: (a.get("rank") or 0, a.get("start_time") or 0))
    return mine[0] if mine else None


def _run_with_dashboard(child: subprocess.Popen, log_path: str, refresh_hz: float, monitor=None) -> int:
    """Show the job's output until its agent appears, the dashboard while it is open, the output again after."""
    out = _LogFollower(log_path)
    print(f"vramtop: started pid {child.pid}; the dashboard opens at its first training step "
          f"(job output: {log_path})", file=sys.stderr)
    try:
        info = None
        try:
            while child.poll() is None and info is None:
                out.pump()
                info = find_job_agent(child.pid)
                if info is None:
                    _sleep(0.2, child)
        except KeyboardInterrupt:  # from the terminal the job got it too; else pass it on. See how it ends.
            return _wait(child, out, interrupts=_on_interrupt(child, 0))
        if info is not None and child.poll() is None:
            from vramtop.commands.attach import attach_pid

            out.skip()  # what the job printed under the dashboard stays in the log
            try:
                attach_pid(int(info["pid"]), refresh_hz=refresh_hz, monitor=monitor)
            except UserError as exc:  # e.g. the job ended meanwhile
                print(f"vramtop: {exc}", file=sys.stderr)
            if child.poll() is None:
                print(f"vramtop: dashboard closed; pid {child.pid} keeps running, its output follows "
                      "(Ctrl-C interrupts it)", file=sys.stderr)
        return _wait(child, out)
    finally:
        out.pump()
        out.close()
        if child.poll() == 0:
            from vramtop.run_record import remove_log

            remove_log(log_path)
        else:
            print(f"vramtop: the job's output is in {log_path}", file=sys.stderr)


def _sleep(seconds: float, child: subprocess.Popen) -> None:
    try:
        child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


class _LogFollower:
    """Copies what the job appends to its log onto our stdout (`tail -f`)."""

    def __init__(self, path: str):
        self._fh = open(path, "rb")

    def pump(self) -> None:
        try:
            data = self._fh.read()
            if data:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
        except Exception:
            pass

    def skip(self) -> None:
        try:
            self._fh.seek(0, os.SEEK_END)
        except Exception:
            pass

    def close(self) -> None:
        try:
            self._fh.close()
        except Exception:
            pass


def _wait(child: subprocess.Popen, out: _LogFollower | None = None, interrupts: int = 0) -> int:
    """Wait for the child. Ctrl-C already reached it through the terminal: keep waiting for its exit,
    and escalate only when Ctrl-C is pressed again (SIGTERM, then SIGKILL)."""
    while True:
        try:
            if out is None:
                return child.wait()
            out.pump()
            rc = child.wait(timeout=0.2)
            out.pump()
            return rc
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            interrupts = _on_interrupt(child, interrupts)


def _on_interrupt(child: subprocess.Popen, interrupts: int) -> int:
    """A SIGINT reached vramtop. From the terminal the child has it too: escalate only on repeats."""
    if not terminal_reaches(child):
        _forward(child, signal.SIGINT)  # a supervisor signalled vramtop alone
        return interrupts
    interrupts += 1
    if interrupts == 2:
        _forward(child, signal.SIGTERM)
    elif interrupts >= 3:
        try:
            child.kill()
        except Exception:
            pass
    return interrupts


def terminal_reaches(child: subprocess.Popen) -> bool:
    """True when the child is in the foreground process group of vramtop's controlling terminal,
    i.e. when a Ctrl-C typed there was delivered to the child as well."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return False  # no controlling terminal: the SIGINT came from a process
    try:
        return os.tcgetpgrp(fd) == os.getpgid(child.pid)
    except OSError:
        return False
    finally:
        os.close(fd)
