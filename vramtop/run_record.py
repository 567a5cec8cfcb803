"""`vramtop run --record PATH`: what the user is told about the recording, and where the job's log lives.

Kept out of commands/run.py (which is about starting and signalling the job).
- check_target: an existing recording is refused unless --append, as `vramtop record` does (a run
  appended silently used to hide behind the older run in `report`).
- announce / recorded: a PATH with {pid}, {rank} or {host} is a template filled in by each recording
  process; the files it became are named once the job ends (not the template).
- log_dir / remove_log: the dashboard's job log goes in the per-user runtime dir and is removed when
  the job ends cleanly (it is kept, and named, otherwise).
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time

from vramtop.errors import UserError

_FIELDS = re.compile(r"\{(pid|rank|host)\}")


def is_template(path: str) -> bool:
    return bool(_FIELDS.search(path))


def check_target(path: str, append: bool = False) -> None:
    if is_template(path) or append:
        return
    if os.path.exists(path):
        raise UserError(f"{path} exists: choose another name or pass --append to add this run to it")


def announce(path: str, pid: int) -> float:
    where = os.path.abspath(path)
    if is_template(path):
        print(f"vramtop: recording pid {pid} (and the processes it starts) to {where}, with {{pid}}, {{rank}} "
              "and {host} filled in by each process; the files are named when the job ends", file=sys.stderr)
    else:
        print(f"vramtop: recording pid {pid} to {where}", file=sys.stderr)
    return time.time()


def files_made(path: str, since: float) -> list[str]:
    """The recordings a template became: the files matching it written since `since`."""
    pattern = _FIELDS.sub("*", glob.escape(os.path.abspath(path)))
    out = []
    for f in sorted(glob.glob(pattern)):
        try:
            if os.path.getmtime(f) >= since - 1:
                out.append(f)
        except OSError:
            pass
    return out


def recorded(path: str, since: float) -> None:
    if not is_template(path):
        return
    made = files_made(path, since)
    if made:
        print(f"vramtop: recorded {', '.join(made)}", file=sys.stderr)
    else:
        print(f"vramtop: no recording was written to {os.path.abspath(path)} (no process of the job trained?)",
              file=sys.stderr)


def log_dir() -> str | None:
    try:
        from vramtop_agent import discovery

        return str(discovery.runtime_dir())
    except Exception:  # no usable runtime dir: the system's temp dir, as before
        return None


def remove_log(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
