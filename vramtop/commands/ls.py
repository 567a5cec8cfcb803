"""`vramtop ls`: the vramtop agents running on this machine."""

from __future__ import annotations

import argparse
import json
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the vramtop agents on this machine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vramtop_agent import discovery

    agents = discovery.list_agents()
    if args.json:
        print(json.dumps(agents))
        return 0
    if not agents:
        print("no vramtop agents running on this machine")
        return 0
    now = time.time()
    print(f"{'PID':>7} {'RANK':>4} {'LOCAL':>5} {'NODE':<16} {'AGE':>7}  {'ENDPOINT':<40} CMDLINE")
    for a in agents:
        age = now - (a.get("start_time") or now)
        cmd = " ".join(a.get("cmdline") or [])
        print(f"{a['pid']:>7} {a.get('rank', 0):>4} {a.get('local_rank', 0):>5} {str(a.get('node', ''))[:16]:<16} "
              f"{age:>6.0f}s  {a['endpoint']:<40} {cmd[:60]}")
    return 0
