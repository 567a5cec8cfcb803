"""Shared by the alarm tests (budgets, diff, creep, alerts): real jobs under `vramtop run`, real recordings."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LEAK_JOB = os.path.join(HERE, "leak_job.py")


def _env(env: dict | None = None) -> dict:
    full_env = dict(os.environ if env is None else env)
    # glibc would otherwise serve big tensors from a heap whose holes make RSS move by more or less
    # than what is kept: with a fixed mmap threshold every kept tensor is its own mapping.
    full_env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return full_env


def vramtop(*args: str, env: dict | None = None, timeout: float = 300, stdin: str | None = None):
    """Run the real CLI in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "vramtop", *args], capture_output=True, text=True, env=_env(env),
                          timeout=timeout, input=stdin)


def start_record_job(path: str, *job_args: str) -> subprocess.Popen:
    """record_job() started in the background (two jobs side by side: their sleeps overlap)."""
    return subprocess.Popen([sys.executable, "-m", "vramtop", "run", "--no-tui", "--record", path, "--",
                             sys.executable, LEAK_JOB, *job_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


def record_job(path: str, *job_args: str, extra: tuple = ()) -> subprocess.CompletedProcess:
    """`vramtop run --no-tui --record PATH [extra] -- python leak_job.py ARGS`: a real recording."""
    return vramtop("run", "--no-tui", "--record", path, *extra, "--", sys.executable, LEAK_JOB, *job_args)


def leak_bytes(stdout: str) -> int:
    for line in stdout.splitlines():
        if line.startswith("LEAK_BYTES "):
            return int(line.split()[1])
    raise AssertionError(f"no LEAK_BYTES in {stdout!r}")
