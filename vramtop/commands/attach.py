"""`vramtop attach [PID | ENDPOINT]`: the live dashboard of one training process."""

from __future__ import annotations

import argparse

from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attach",
        help="open the live dashboard of a training process",
        description="Attach to a vramtop agent. With no TARGET, find the agents running on this machine: "
        "attach to the only one, let you pick among several, or wait for one to start.",
    )
    p.add_argument("target", nargs="?", help="a PID, or an endpoint such as tcp://127.0.0.1:5555 or ipc:///path")
    p.add_argument("--refresh", type=float, default=4.0, metavar="HZ", help="screen refreshes per second (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.refresh <= 0 or args.refresh > 60:
        raise UserError("--refresh must be between 0 and 60 Hz")
    return attach(args.target, refresh_hz=args.refresh)


def attach(target: str | None, refresh_hz: float = 4.0) -> int:
    from vramtop.sources import LiveSource
    from vramtop.tui.app import VramtopApp

    source = LiveSource(target)
    VramtopApp(source, refresh_hz=refresh_hz).run()
    return 0


def attach_pid(pid: int, refresh_hz: float = 4.0) -> int:
    """Attach to the agent inside process `pid` (waits for it to start publishing)."""
    return attach(str(pid), refresh_hz=refresh_hz)
