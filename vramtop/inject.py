"""Start (or stop) the vramtop agent inside a running Python process that was started without it.

`vramtop attach PID` / `vramtop record PID` / `vramtop detach PID` use this.
What happens, in order:
1. `probe(pid)`: the process exists, belongs to this user, is CPython
   3.10+ and has torch loaded (from /proc/PID/exe and /proc/PID/maps; nothing
   is injected to find out). Anything else is refused with one line.
2. A bootstrap file (mode 0600, in the per-user runtime directory) is
   written; the job will `exec` it. It catches everything, imports
   vramtop_agent (adding this vramtop's agent directory to the job's
   sys.path when the job cannot import it) and calls
   `vramtop_agent._inject_boot.run`, which writes a status file back.
3. The job is made to run one line that execs the bootstrap:
   - Python >= 3.14: `sys.remote_exec(pid, file)` (PEP 768), run by the
     target's own interpreter executable;
   - Python 3.10-3.13 on x86-64: our ptrace injector (ptrace_call.py) queues
     `PyRun_SimpleString(line)` as a pending call, which the job's main
     thread runs between two bytecodes, holding the GIL;
   - elsewhere (or VRAMTOP_INJECTOR=gdb): the same pending call through
     `gdb -p PID -batch` with a timeout.
4. The status file says what happened: the agent's endpoint, "already
   running" (injecting twice reuses the agent), or why not (pyzmq missing in
   the job's environment, ...).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vramtop.errors import UserError

MIN_VERSION, REMOTE_EXEC_VERSION = (3, 10), (3, 14)
RETRIES = 30  # seconds of "still importing torch" before giving up
_LIBPYTHON = re.compile(r"libpython(\d+)\.(\d+)")
_PYEXE = re.compile(r"python(\d+)\.(\d+)$")
ALTERNATIVES = ("or start the job with `vramtop run -- CMD`, `VRAMTOP=1` or `vramtop_agent.watch(model)` "
                "(docs/attach.md)")


class InjectRefused(UserError):
    """The process must not or cannot be injected (not Python, no torch, unsupported): nothing was done."""


class InjectBlocked(UserError):
    """Injection is not possible from here (ptrace denied, no debugger): the NVML view is still useful."""


@dataclass
class Target:
    pid: int
    exe: str
    version: tuple[int, int]
    libpython: str  # the file that exports the C API: libpython3.X.so, or the executable itself
    cmdline: list[str]


def probe(pid: int) -> Target:
    """What `pid` is, or InjectRefused / InjectBlocked with one line saying why it will not be injected."""
    if not os.path.exists(f"/proc/{pid}"):
        raise InjectRefused(f"no process with pid {pid}")
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/maps") as fh:
            maps = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = [c.decode(errors="replace") for c in fh.read().split(b"\0") if c]
    except PermissionError:
        raise InjectBlocked(f"process {pid} belongs to another user: run vramtop as that user, "
                            f"{ALTERNATIVES}") from None
    except FileNotFoundError:
        raise InjectRefused(f"no process with pid {pid}") from None
    if uid != os.getuid():
        raise InjectBlocked(f"process {pid} belongs to uid {uid}, not to you: run vramtop as that user, "
                            f"{ALTERNATIVES}")
    paths = {line.split(maxsplit=5)[5] for line in maps.splitlines() if len(line.split(maxsplit=5)) == 6}
    name = os.path.basename(exe.replace(" (deleted)", ""))
    lib = next((p for p in sorted(paths) if _LIBPYTHON.search(os.path.basename(p))), None)
    match = _LIBPYTHON.search(os.path.basename(lib)) if lib else _PYEXE.search(name)
    if match is None:
        raise InjectRefused(f"process {pid} ({name}) is not a Python interpreter: nothing injected")
    version = (int(match.group(1)), int(match.group(2)))
    if version < MIN_VERSION:
        raise InjectRefused(f"process {pid} runs Python {version[0]}.{version[1]}; injection needs 3.10 or newer: "
                            f"nothing injected; {ALTERNATIVES}")
    if not any("libtorch" in os.path.basename(p) or "/torch/_C" in p for p in paths):
        raise InjectRefused(f"process {pid} ({one_line(cmdline, 60)}) has not imported torch: nothing injected")
    return Target(pid, exe, version, lib or exe, cmdline)


def one_line(cmdline: list[str], limit: int) -> str:
    """A command line fit for a one-line message (`python -c` code has newlines)."""
    text = re.sub(r"\s+", " ", " ".join(cmdline)).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------- the bootstrap

_BOOT = '''# vramtop: bootstrap run once inside pid {pid} by `vramtop {verb}`. Never raises into the job.
def _vramtop_boot():
    import sys
    status = {status!r}
    try:
        try:
            import vramtop_agent._inject_boot as boot
        except ImportError:
            sys.path.append({agent_dir!r})  # appended: the job's own packages still win
            import vramtop_agent._inject_boot as boot
        boot.run({action!r}, status)
    except BaseException as exc:
        try:
            import json, os
            fd = os.open(status + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({{"ok": False, "reason": "vramtop_agent could not be loaded in the job: "
                           + type(exc).__name__ + ": " + str(exc)[:300]}}, fh)
            os.replace(status + ".tmp", status)
        except BaseException:
            pass
_vramtop_boot()
del _vramtop_boot
'''

# Runs in the job's __main__ namespace (PyRun_SimpleString): it must bind no name there.
_LINE = "try:\n exec(compile(__import__('pathlib').Path({path!r}).read_text(),{path!r},'exec')," \
        "{{'__name__':'__vramtop_boot__'}})\nexcept BaseException:\n pass\n"


def agent_dir() -> str:
    """The directory holding this vramtop's vramtop_agent package (put on the job's sys.path if needed)."""
    import vramtop_agent

    return str(Path(vramtop_agent.__file__).resolve().parent.parent)


def write_bootstrap(pid: int, action: str, verb: str) -> tuple[Path, Path]:
    """(bootstrap file, status file), both in the per-user 0700 runtime directory; the bootstrap is 0600."""
    from vramtop_agent import discovery

    d = discovery.runtime_dir()
    stem = f"inject-{pid}-{secrets.token_hex(4)}"
    boot, status = d / f"{stem}.py", d / f"{stem}.status"
    fd = os.open(boot, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(_BOOT.format(pid=pid, verb=verb, status=str(status), agent_dir=agent_dir(), action=action))
    return boot, status


# ---------------------------------------------------------------------- running it in the job


def method(target: Target, environ=None) -> str:
    env = os.environ if environ is None else environ
    forced = env.get("VRAMTOP_INJECTOR", "").strip().lower()
    if target.version >= REMOTE_EXEC_VERSION:
        return "remote_exec"
    if forced in ("gdb", "ptrace"):
        return forced
    from vramtop import ptrace_call

    return "ptrace" if ptrace_call.supported() else "gdb"


def _symbols(target: Target) -> dict[str, int]:
    from vramtop import elf_symbols

    maps = elf_symbols.mapped_files(target.pid)
    libc = next((p for p in maps if re.match(r"libc(-[\d.]+)?\.so", os.path.basename(p))), None)
    if libc is None:
        raise InjectRefused(f"process {target.pid} has no glibc mapped: nothing injected")
    try:
        syms = elf_symbols.resolve(target.pid, target.libpython, {"Py_AddPendingCall", "PyRun_SimpleString"}, maps)
        syms.update(elf_symbols.resolve(target.pid, libc, {"mmap"}, maps))
    except (elf_symbols.SymbolError, OSError) as exc:
        raise InjectRefused(f"cannot find the Python C API in process {target.pid} ({exc}): nothing injected") \
            from None
    return syms


def _ptrace_denied_line(pid: int, detail: str) -> str:
    scope = None
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        pass
    if scope and scope != "0":
        fix = (f"kernel.yama.ptrace_scope is {scope}: `sudo sysctl kernel.yama.ptrace_scope=0`"
               + (" (3 cannot be lowered without a reboot)" if scope == "3" else ""))
    else:
        fix = "this process lacks CAP_SYS_PTRACE (a container: `docker run --cap-add=SYS_PTRACE`)"
    return f"cannot trace process {pid} ({detail}): {fix}; {ALTERNATIVES}"


def _run_ptrace(target: Target, line: str, timeout_s: float) -> None:
    syms = _symbols(target)
    src = Path(str(write_line_file(target.pid, line)))
    try:
        # Own session: a Ctrl-C or SIGKILL of the viewer's group cannot cut the few milliseconds
        # during which a thread of the job is borrowed.
        proc = subprocess.run(
            [sys.executable, "-m", "vramtop.ptrace_call", str(target.pid), hex(syms["mmap"]),
             hex(syms["Py_AddPendingCall"]), hex(syms["PyRun_SimpleString"]), str(src)],
            capture_output=True, text=True, timeout=timeout_s + 20, start_new_session=True)
    finally:
        src.unlink(missing_ok=True)
    out = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 3:
        raise InjectBlocked(_ptrace_denied_line(target.pid, out.removeprefix("denied: ")))
    if proc.returncode != 0:
        detail = out.removeprefix("failed: ") or proc.stderr.strip()[-300:]
        raise UserError(f"injection into process {target.pid} failed, the job was left as it was: {detail}")


def write_line_file(pid: int, line: str) -> Path:
    from vramtop_agent import discovery

    path = discovery.runtime_dir() / f"inject-{pid}-{secrets.token_hex(4)}.line"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(line)
    return path


def gdb_command(pid: int, line: str) -> list[str]:
    """`gdb -batch` queueing the same pending call as the ptrace injector (used where that one is not)."""
    c_string = line.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return ["gdb", "-p", str(pid), "-batch", "-nx", "-q",
            "-ex", "set confirm off", "-ex", "set unwindonsignal on",
            "-ex", f'call (int)Py_AddPendingCall((void*)&PyRun_SimpleString, (void*)"{c_string}")',
            "-ex", "detach", "-ex", "quit"]


def _run_gdb(target: Target, line: str, timeout_s: float) -> None:
    if shutil.which("gdb") is None:
        raise InjectBlocked(f"gdb is not installed (it injects into Python {target.version[0]}.{target.version[1]} "
                            f"here): install gdb (apt-get install gdb), {ALTERNATIVES}")
    try:
        # Killing gdb (the timeout) makes the kernel detach it: the job is never left stopped.
        proc = subprocess.run(gdb_command(target.pid, line), capture_output=True, text=True, timeout=timeout_s,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        raise UserError(f"gdb did not finish within {timeout_s:g}s; it was stopped and the job detached") from None
    text = proc.stdout + proc.stderr
    if "ptrace: Operation not permitted" in text:
        raise InjectBlocked(_ptrace_denied_line(target.pid, "ptrace: Operation not permitted"))
    if not re.search(r"^\$1 = 0$", proc.stdout, re.M):
        tail = " ".join(text.strip().splitlines()[-2:])[-300:]
        raise UserError(f"gdb could not inject into process {target.pid}: {tail}")


def _run_remote_exec(target: Target, boot: Path, timeout_s: float) -> None:
    code = f"import sys; sys.remote_exec({target.pid}, {str(boot)!r})"
    try:
        proc = subprocess.run([target.exe, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"sys.remote_exec into process {target.pid} failed: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if "PermissionError" in last or "Operation not permitted" in last:
            raise InjectBlocked(_ptrace_denied_line(target.pid, last))
        raise UserError(f"sys.remote_exec into process {target.pid} failed: {last}")


def run_in(target: Target, action: str, verb: str, timeout_s: float = 30.0, say=None) -> dict:
    """Make the job run the bootstrap for `action` ("prepare" | "start" | "stop"); the status it wrote back."""
    boot, status = write_bootstrap(target.pid, action, verb)
    how = method(target)
    try:
        if how == "remote_exec":
            _run_remote_exec(target, boot, timeout_s)
        else:
            line = _LINE.format(path=str(boot))
            (_run_gdb if how == "gdb" else _run_ptrace)(target, line, timeout_s)
        return wait_status(target.pid, status, timeout_s, say)
    finally:
        if status.exists() or not _alive(target.pid):
            boot.unlink(missing_ok=True)
            status.unlink(missing_ok=True)
        # else: the job has not run the queued line yet; it still needs the file (it stays 0600).


def wait_status(pid: int, status: Path, timeout_s: float, say=None) -> dict:
    deadline = time.monotonic() + timeout_s
    warned = False
    while time.monotonic() < deadline:
        if status.exists():
            try:
                return json.loads(status.read_text())
            except (OSError, ValueError):
                pass  # being replaced: read again
        if not _alive(pid):
            raise UserError(f"process {pid} exited before the agent started")
        if not warned and say and time.monotonic() > deadline - timeout_s + 3:
            say(f"vramtop: waiting for process {pid} to run the agent's bootstrap (its main thread runs it "
                "between two bytecodes)")
            warned = True
        time.sleep(0.05)
    raise UserError(f"process {pid}'s main thread has not run Python code for {timeout_s:g}s (a long C call, or "
                    "blocked): the agent starts when it does; run the command again then")


def _alive(pid: int) -> bool:
    from vramtop.live_source import pid_alive

    return pid_alive(pid)


def describe(target: Target) -> str:
    """What will happen, for the confirmation question."""
    cmd = one_line(target.cmdline, 80)
    how = {"remote_exec": "sys.remote_exec (PEP 768)", "ptrace": "ptrace: one idle thread paused for milliseconds",
           "gdb": "gdb: the process paused for well under a second"}[method(target)]
    return (f"process {target.pid} ({cmd}) runs Python {target.version[0]}.{target.version[1]} with torch and no "
            f"vramtop agent. vramtop will start one inside it ({how}); the agent finds the model at its next "
            f"training forward and the optimizer at its next step; steps before that are not known. It stays until "
            f"the job ends or `vramtop detach {target.pid}`.")


def confirm(target: Target, yes: bool, stream=None) -> None:
    """Ask before touching someone's job; --yes skips the question (required without a terminal)."""
    stream = stream or sys.stderr
    print(f"vramtop: {describe(target)}", file=stream, flush=True)
    if yes:
        return
    if not sys.stdin or not sys.stdin.isatty():
        raise UserError("not injecting without confirmation: pass --yes (or --no-inject)")
    try:
        answer = input("Inject the vramtop agent? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise UserError("nothing injected", exit_code=1)


def start_agent(pid: int, yes: bool, verb: str, say=None) -> dict:
    """Probe, confirm, inject; the status dict (`endpoint`, `already`) of the running agent. Raises UserError."""
    target = probe(pid)
    confirm(target, yes)
    status = run_in(target, "prepare", verb, say=say)  # imports, off the training thread
    if status.get("ok"):
        status = run_in(target, "start", verb, say=say)
    for _ in range(RETRIES):
        if status.get("ok") or not status.get("retry"):
            break
        time.sleep(1.0)  # the job was inside `import torch`: nothing was started, ask again
        status = run_in(target, "start", verb, say=say)
    if not status.get("ok"):
        raise InjectRefused(f"process {pid}: {status.get('reason') or 'the agent did not start'}")
    return status


def stop_agent(pid: int) -> dict:
    target = probe(pid)
    status = run_in(target, "stop", "detach")
    if not status.get("ok"):
        raise UserError(f"process {pid}: {status.get('reason') or 'the agent did not stop'}")
    return status
