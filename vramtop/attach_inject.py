"""`vramtop attach` on jobs started without vramtop: find them, ask, inject, then show them.

The viewer side of vramtop/inject.py for the attach verb. Refusals (not
Python, no torch) end with one line; a blocked injection (ptrace denied, no
debugger) prints its line and opens the GPU view (NVML), which needs no agent.
"""

from __future__ import annotations

import os
import sys
import time

from vramtop.errors import UserError

_LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch", "accelerate", "deepspeed")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def agents_of(pid: int) -> list[dict]:
    from vramtop_agent import discovery

    return [a for a in discovery.list_agents() if a.get("pid") == pid]


def wait_agent(pid: int, timeout_s: float = 10.0) -> dict | None:
    """The discovery entry of the agent in `pid` once it is written (None if it does not appear in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = agents_of(pid)
        if found:
            return found[0]
        time.sleep(0.05)
    return None


def attach_injecting(pid: int, yes: bool = False, refresh_hz: float = 4.0) -> int:
    """`vramtop attach PID`: its agent's dashboard, injecting one first when the job has none."""
    from vramtop import inject
    from vramtop.commands.attach import attach

    if agents_of(pid) or starts_its_own_agent(pid):
        return attach(str(pid), refresh_hz=refresh_hz)
    try:
        status = inject.start_agent(pid, yes, "attach", say=_say)
    except inject.InjectBlocked as exc:
        _say(f"vramtop: {exc}")
        _say("vramtop: showing the GPUs and their processes instead (NVML)")
        return _node_view(refresh_hz)
    _say(f"vramtop: {'reusing the agent already running' if status.get('already') else 'agent started'} "
         f"in process {pid}")
    info = wait_agent(pid, 5.0)
    if info is None and status.get("endpoint"):
        return attach(status["endpoint"], refresh_hz=refresh_hz)  # the job uses another runtime directory
    return attach(str(pid), refresh_hz=refresh_hz)


def _node_view(refresh_hz: float) -> int:
    from vramtop.gpus import NodeSource
    from vramtop.tui.app import VramtopApp

    VramtopApp(NodeSource(), refresh_hz=refresh_hz).run()
    return 0


_ENV_KEYS = (b"RANK", b"WORLD_SIZE", b"LOCAL_RANK", b"VRAMTOP", b"VRAMTOP_RECORD", b"PYTHONPATH")


def _env_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            items = fh.read().split(b"\0")
    except OSError:
        return {}
    env = {}
    for item in items:
        key, sep, value = item.partition(b"=")
        if sep and key in _ENV_KEYS:
            env[key.decode()] = value.decode(errors="replace")
    return env


def starts_its_own_agent(pid: int) -> bool:
    """Started under `vramtop run`, VRAMTOP=1 or VRAMTOP_RECORD: its agent appears at its first training
    forward; wait for it instead of injecting a second one."""
    from vramtop_agent import _autostart

    env = _env_of(pid)
    return _autostart.enabled(env) or "vramtop_agent/_boot" in env.get("PYTHONPATH", "")


def plain_torch_processes() -> list[dict]:
    """This user's Python processes that have imported torch and run no agent: launchers and their
    workers (DataLoader, subprocesses of a rank) left out. Oldest first."""
    import psutil

    from vramtop import inject

    with_agent = {a.get("pid") for a in _all_agents()}
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, dict] = {}
    for proc in psutil.process_iter(["pid", "ppid", "uids", "create_time"]):
        pid = proc.info["pid"]
        if pid in me or pid in with_agent or (proc.info["uids"] and proc.info["uids"].real != os.getuid()):
            continue
        try:
            target = inject.probe(pid)
        except UserError:
            continue
        if any(part in _LAUNCHERS or os.path.basename(part) in _LAUNCHERS for part in target.cmdline[:3]):
            continue
        env = _env_of(pid)
        found[pid] = {"pid": pid, "ppid": proc.info["ppid"], "cmdline": target.cmdline,
                      "rank": _int(env.get("RANK")), "world_size": _int(env.get("WORLD_SIZE")) or 1,
                      "create_time": proc.info["create_time"]}
    plain = [p for p in found.values() if p["ppid"] not in found]  # a worker's parent is itself listed
    return sorted(plain, key=lambda p: (p["create_time"], p["rank"] or 0))


def _all_agents() -> list[dict]:
    from vramtop_agent import discovery

    try:
        return discovery.list_agents()
    except PermissionError:
        return []


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _choose(plain: list[dict], yes: bool) -> list[dict]:
    """The processes the user picks from the list (interactive), or all of one job with --yes."""
    if not plain:
        return []
    _say("vramtop: no vramtop agent here; these processes run PyTorch without one:")
    for i, p in enumerate(plain, 1):
        rank = f"rank {p['rank']}/{p['world_size']}  " if p["world_size"] > 1 else ""
        _say(f"  {i}) pid {p['pid']}  {rank}{_one_line(p['cmdline'])}")
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            answer = input("Inject the vramtop agent into which? (numbers, a = all, Enter = none) ").strip().lower()
        except EOFError:
            answer = ""
        if answer in ("a", "all"):
            return plain
        return [plain[int(n) - 1] for n in answer.replace(",", " ").split() if n.isdigit() and 0 < int(n) <= len(plain)]
    if not yes:
        raise UserError("not injecting without confirmation: pass a PID and --yes, or --no-inject")
    if len({p["world_size"] for p in plain}) != 1 or (len(plain) > 1 and plain[0]["world_size"] < 2):
        raise UserError("several unrelated PyTorch processes: pass the PID to attach to")
    return plain


def _one_line(cmdline: list[str]) -> str:
    from vramtop.inject import one_line

    return one_line(cmdline, 70)


def offer_plain(yes: bool = False) -> list[dict]:
    """No agent here: list the plain PyTorch processes, let the user choose, inject; the agents started.

    --yes without a terminal picks every listed process when they are the ranks of one job (or the only
    one), and refuses a guess otherwise.
    """
    from vramtop import inject

    plain = plain_torch_processes()
    chosen = _choose(plain, yes)
    agents = []
    for p in chosen:
        try:
            inject.start_agent(p["pid"], True, "attach", say=_say)  # choosing was the confirmation
        except UserError as exc:
            _say(f"vramtop: {exc}")
            continue
        info = wait_agent(p["pid"], 5.0)
        if info is not None:
            agents.append(info)
    return agents


def _remote(host, args: str, remote_vramtop: str | None, timeout: float = 120.0) -> str:
    """`vramtop ARGS` on `host` over ssh; its stdout, or UserError with the last line it printed."""
    import subprocess

    from vramtop.remote import ls_command

    try:
        proc = subprocess.run(ls_command(host, remote_vramtop, args), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise UserError(f"{host}: no answer from `vramtop {args.split()[0]}` within {timeout:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"{host}: {last.removeprefix('vramtop: ')}")
    return proc.stdout


def offer_plain_remote(host, remote_vramtop: str | None, yes: bool = False) -> list[dict]:
    """`vramtop attach HOST` with no agent there: the same picker over ssh; the agents then listed there."""
    import json

    from vramtop.commands.attach import list_hosts

    try:
        plain = json.loads(_remote(host, "ls --plain --json", remote_vramtop, timeout=60).strip().splitlines()[-1])
    except (ValueError, IndexError):
        return []
    chosen = _choose(plain, yes)
    for p in chosen:
        try:
            _say(_remote(host, f"inject {int(p['pid'])} --yes", remote_vramtop).strip())
        except UserError as exc:
            _say(f"vramtop: {exc}")
    deadline = time.monotonic() + 10
    while chosen:
        agents = [a for a in list_hosts([host], remote_vramtop) if a.get("pid") in {p["pid"] for p in chosen}]
        if len(agents) == len(chosen) or time.monotonic() > deadline:
            return agents
        time.sleep(0.3)
    return []
