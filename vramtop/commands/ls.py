"""`vramtop ls [HOST]`: the vramtop agents running on this machine, or on HOST over ssh."""

from __future__ import annotations

import argparse
import json
import sys
import time

from vramtop.commands.common import add_remote_vramtop, add_verb, refuse_remote_vramtop
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "ls", run,
        help="list the vramtop agents on this machine (or on HOST over ssh)",
        description="List the running vramtop agents: pid, rank, local rank, node, GPU, endpoint, age, command. "
        "With HOST (user@host, ssh://user@host:port or an ssh config alias) run `vramtop ls --json` there "
        "through your own ssh (keys, agent and ~/.ssh/config as usual; never a password prompt).",
    )
    p.add_argument("host", nargs="?", help="list the agents on this host over ssh")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plain", action="store_true",
                   help="list this machine's PyTorch processes that run no agent (what `vramtop attach` can "
                   "inject into; docs/attach.md)")
    add_remote_vramtop(p, "HOST")


def local_agents() -> list[dict]:
    """This machine's agents, with the GPU each holds memory on (from NVML, when there is a driver)."""
    from vramtop_agent import discovery

    agents = discovery.list_agents()
    if agents:
        from vramtop.gpus import list_gpus, pid_gpus

        report = list_gpus()
        on = pid_gpus(report)
        names = {g.index: g.name for g in report.gpus}
        for a in agents:
            pid = a.get("pid")
            idx = on.get(pid) if isinstance(pid, int) else None
            if idx:
                a["gpu"] = ",".join(str(i) for i in idx)
                a["gpu_name"] = names.get(idx[0], "")
    return agents


def gpu_cell(a: dict) -> str:
    if a.get("gpu") is not None:
        return f"gpu {a['gpu']}"
    dev = a.get("device")
    return str(dev) if dev else "-"


def age_cell(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.0f}d"


def table(agents: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'PID':>8} {'RANK':>5} {'LOCAL':>5} {'NODE':<16} {'GPU':<10} {'AGE':>6}  {'ENDPOINT':<44} CMDLINE"]
    for a in agents:
        age = now - (a.get("start_time") or now)
        rank = a.get("rank", 0)
        ws = a.get("world_size") or 1
        rank_s = f"{rank}/{ws}" if ws > 1 else str(rank)
        cmd = " ".join(a.get("cmdline") or [])
        node = str(a.get("node") or a.get("host") or "")[:16]
        lines.append(f"{a['pid']:>8} {rank_s:>5} {a.get('local_rank', 0):>5} {node:<16} "
                     f"{gpu_cell(a)[:10]:<10} {age_cell(age):>6}  {a['endpoint']:<44} {cmd[:70]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.plain:
        if args.host:
            raise UserError("--plain lists this machine (over ssh, `vramtop attach HOST` uses it)")
        from vramtop.attach_inject import plain_torch_processes

        plain = plain_torch_processes()
        if args.json:
            print(json.dumps(plain))
        for p in [] if args.json else plain:
            print(f"{p['pid']:>8}  {' '.join(p['cmdline'])[:100]}")
        return 0
    if args.host:
        from vramtop.remote import parse_host, remote_ls

        host = parse_host(args.host)
        agents = remote_ls(host, args.remote_vramtop)
        where = str(host)
    else:
        refuse_remote_vramtop(args)
        agents = local_agents()
        where = "this machine"
    if args.json:
        print(json.dumps(agents))
        return 0
    if not agents:
        print(f"no vramtop agents running on {where}")
        return 0
    # The ages are relative to this machine's clock; a remote node's clock may differ by a little.
    print(table(agents))
    sys.stdout.flush()
    return 0
