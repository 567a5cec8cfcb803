"""`vramtop detach PID`: stop the agent that `vramtop attach PID` injected into a job, and remove its hooks.

Quitting the dashboard leaves an injected agent running quietly (it costs
about what `vramtop run` costs, and a later attach is instant); this stops
it. Agents the job started itself (watch(), `vramtop run`, VRAMTOP=1) are
left alone.
"""

from __future__ import annotations

import argparse

from vramtop.commands.common import add_verb
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "detach", run,
        help="stop an agent that `vramtop attach PID` injected, removing its hooks",
        description="Stop the vramtop agent injected into process PID by `vramtop attach PID` or "
        "`vramtop record PID`: its hooks are removed and its socket closed; the job runs on as before.",
    )
    p.add_argument("pid", type=int, help="the process id of the job")


def run(args: argparse.Namespace) -> int:
    from vramtop import inject

    if args.pid <= 0:
        raise UserError("PID must be positive")
    status = inject.stop_agent(args.pid)
    if status.get("stopped"):
        print(f"vramtop: the agent in process {args.pid} stopped and its hooks were removed")
    else:
        print(f"vramtop: process {args.pid} has no injected agent: nothing to stop")
    return 0
