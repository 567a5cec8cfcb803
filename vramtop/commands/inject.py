"""`vramtop inject PID`: start the agent inside a running job started without vramtop, and return.

What `vramtop attach PID` does before opening the dashboard (docs/attach.md),
for scripts and for `vramtop attach HOST`, which runs it on the node over ssh.
"""

from __future__ import annotations

import argparse
import sys

from vramtop.commands.common import add_verb
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "inject", run,
        help="start the agent inside a running PyTorch job started without vramtop (no dashboard)",
        description="Inject the vramtop agent into process PID (CPython 3.10+ with torch loaded) and print its "
        "endpoint; `vramtop attach PID` or `vramtop record PID` then reach it, `vramtop detach PID` stops it.",
    )
    p.add_argument("pid", type=int, help="the process id of the job")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask first")


def run(args: argparse.Namespace) -> int:
    from vramtop import inject

    if args.pid <= 0:
        raise UserError("PID must be positive")
    status = inject.start_agent(args.pid, args.yes, "inject",
                                say=lambda m: print(m, file=sys.stderr, flush=True))
    state = "already running" if status.get("already") else "started"
    print(f"vramtop: agent {state} in process {args.pid}: {status.get('endpoint') or 'waiting for its first forward'}")
    return 0
