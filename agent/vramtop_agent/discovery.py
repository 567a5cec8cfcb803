"""Where agents announce themselves so a viewer on the same machine finds them.

Each agent writes `<runtime dir>/<pid>-<rank>.json` (pid, host, cmdline,
ranks, endpoint, start time) and binds its ipc socket in the same directory.
A second agent of the same process and rank (a watch() of another model, see
lifecycle.py) uses `<pid>-<rank>-<slot>`, and its map carries "slot".
The directory is per user and mode 0700, so other users can neither read the
stream nor plant a fake agent. A file whose process is gone (or whose pid was
reused by another process) is stale: readers ignore and remove it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

# Keep ipc paths short: sun_path is limited to ~107 bytes.
_IPC_NAME = "{pid}-{rank}{slot}.sock"
_INFO_NAME = "{pid}-{rank}{slot}.json"
# The command line as published: bounded so the discovery file stays under the readers' 64 KiB
# even with every character JSON-escaped (\uXXXX, 6 bytes), and always valid UTF-8.
MAX_ARG_CHARS = 1024
MAX_CMDLINE_CHARS = 8192


def _names(pid, rank, slot) -> dict:
    return {"pid": pid, "rank": rank, "slot": f"-{slot}" if slot else ""}


def runtime_dir(create: bool = True) -> Path:
    """The per-user directory (mode 0700) for sockets and discovery files."""
    override = os.environ.get("VRAMTOP_RUNTIME_DIR")
    if override:
        path = Path(override)
    else:
        base = os.environ.get("XDG_RUNTIME_DIR")
        if base and os.path.isdir(base) and os.access(base, os.W_OK):
            path = Path(base) / "vramtop"
        else:
            path = Path(tempfile.gettempdir()) / f"vramtop-{os.getuid()}"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_dir(path)
        if stat.S_IMODE(path.lstat().st_mode) != 0o700:
            os.chmod(path, 0o700)
    elif os.path.lexists(path):
        _check_dir(path)  # a viewer must not read discovery files that another user planted
    return path


class UnsafeRuntimeDir(PermissionError):
    """The runtime directory is a symlink or belongs to someone else: refused."""


def _check_dir(path: Path) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UnsafeRuntimeDir(f"{path} is not a directory owned by this user: refusing to use it "
                               "(remove it, or set VRAMTOP_RUNTIME_DIR)")


def ipc_endpoint(pid: int, rank: int, slot: int = 0) -> str:
    return "ipc://" + str(runtime_dir() / _IPC_NAME.format(**_names(pid, rank, slot)))


def process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def write_info(info: dict) -> Path:
    """Atomically write this agent's discovery file (mode 0600).

    The temporary file gets a fresh random name, opened O_EXCL|O_NOFOLLOW: whatever sits at a
    guessable path (a symlink to a file of ours) is never opened, let alone truncated.
    """
    d = runtime_dir()
    path = d / _INFO_NAME.format(**_names(info["pid"], info.get("rank", 0), info.get("slot", 0)))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = d / f".{path.stem}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"cannot create a temporary file in {d}")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def safe_argv(argv=None) -> list[str]:
    """sys.argv as valid UTF-8 text of bounded size: what discovery files and hellos carry.

    Bytes that are not UTF-8 (kept by Python as lone surrogates) become U+FFFD; a long argument
    is cut with a note, and arguments past MAX_CMDLINE_CHARS are summarized in a last element.
    """
    import sys

    argv = list(sys.argv if argv is None else argv)
    out: list[str] = []
    used = 0
    for i, arg in enumerate(argv):
        text = to_text(arg)
        if len(text) > MAX_ARG_CHARS:
            text = text[:MAX_ARG_CHARS] + f"…[+{len(text) - MAX_ARG_CHARS} chars]"
        if used + len(text) > MAX_CMDLINE_CHARS:
            out.append(f"…[+{len(argv) - i} more arguments]")
            break
        out.append(text)
        used += len(text)
    return out


def to_text(value) -> str:
    """Any str (or bytes) as a str that encodes to UTF-8: undecodable bytes become U+FFFD."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    value = str(value)
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:  # lone surrogates: one U+FFFD each, as bytes.decode(errors="replace") gives
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)


def make_info(endpoint: str, rank: int, local_rank: int, world_size: int, slot: int = 0) -> dict:
    import sys

    pid = os.getpid()
    info = {
        "pid": pid,
        "host": socket.gethostname(),
        "node": to_text(os.environ.get("SLURMD_NODENAME") or socket.gethostname()),
        "cmdline": safe_argv() if sys.argv and sys.argv != [""] else [sys.executable],
        "rank": rank,
        "local_rank": local_rank,
        "world_size": world_size,
        "endpoint": endpoint,
        "start_time": time.time(),
        "proc_start": process_start_time(pid),
    }
    if slot:
        info["slot"] = slot
    return info


def _alive(info: dict) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    started = process_start_time(pid)
    if started is None:
        return False
    recorded = info.get("proc_start")
    # A reused pid belongs to a process created after the agent's.
    return not isinstance(recorded, (int, float)) or abs(started - recorded) < 2.0


def list_agents(clean: bool = True) -> list[dict]:
    """Live agents on this machine, oldest first. Removes stale files when `clean`."""
    d = runtime_dir(create=False)
    if not d.is_dir():
        return []
    agents = []
    for path in sorted(d.glob("*.json")):
        info = read_info(path)
        if info is None:
            continue
        if _alive(info):
            agents.append(info)
        elif clean:
            remove_files(info, d)
    agents.sort(key=lambda i: (i.get("start_time") or 0, i.get("rank") or 0))
    return agents


_MAX_INFO_BYTES = 64 * 1024


def read_info(path: Path) -> dict | None:
    """One discovery file, or None when it is not a well-formed one of ours.

    Refused: symlinks, anything but a regular file (a FIFO would block the read), files of another
    owner, files over 64 KiB, and JSON whose fields have the wrong types (see `check_info`).
    """
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > _MAX_INFO_BYTES:
            return None
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_INFO_BYTES + 1)
        return check_info(json.loads(raw))
    except (OSError, ValueError, RecursionError):
        return None


def check_info(info) -> dict | None:
    """A discovery map with the types readers rely on, or None (also for `vramtop ls --json` output)."""
    if not isinstance(info, dict):
        return None

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    endpoint = info.get("endpoint")
    if not is_int(info.get("pid")) or info["pid"] <= 0:
        return None
    if not isinstance(endpoint, str) or len(endpoint) > 1024 or not endpoint.startswith(("ipc://", "tcp://")):
        return None
    for key, default in (("rank", 0), ("local_rank", 0), ("world_size", 1)):
        if not is_int(info.setdefault(key, default)):
            return None
    if "slot" in info and not (is_int(info["slot"]) and 0 <= info["slot"] < 1000):
        return None
    for key in ("start_time", "proc_start"):
        if info.get(key) is not None and not is_num(info[key]):
            return None
    for key in ("host", "node"):
        if info.get(key) is not None and not isinstance(info[key], str):
            return None
    cmdline = info.get("cmdline")
    if cmdline is not None and not (isinstance(cmdline, list) and all(isinstance(c, str) for c in cmdline)):
        return None
    return info


def remove_files(info: dict, d: Path | None = None) -> None:
    try:
        d = d or runtime_dir(create=False)
    except PermissionError:
        return
    names = _names(info.get("pid"), info.get("rank", 0), info.get("slot", 0))
    for name in (_INFO_NAME, _IPC_NAME):
        try:
            (d / name.format(**names)).unlink()
        except OSError:
            pass
