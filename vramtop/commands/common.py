"""What several verbs share: the parser of a verb, and the options that more than one verb declares,
with their checks. The help texts say what the option does for that verb, so each caller words it;
the flag, its metavar, type, default and error messages are declared here once."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from vramtop.errors import UserError


def add_verb(sub: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int], *,
             help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The verb's parser, with `run(args) -> exit code` as what `vramtop NAME` calls (vramtop/cli.py)."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    p.set_defaults(func=run)
    return p


def add_refresh(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--refresh", type=float, default=4.0, metavar="HZ",
                   help=f"{what} refreshes per second (default 4)")


def check_refresh(args: argparse.Namespace) -> None:
    if args.refresh <= 0 or args.refresh > 60:
        raise UserError("--refresh must be between 0 and 60 Hz")


def add_remote_vramtop(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--remote-vramtop", metavar="CMD", default=None,
                   help=f"how to run vramtop on {where} (default: vramtop, else python3 -m vramtop; "
                   "or set VRAMTOP_REMOTE_VRAMTOP)")


def refuse_remote_vramtop(args: argparse.Namespace) -> None:
    """--remote-vramtop given where no host is."""
    if args.remote_vramtop:
        raise UserError("--remote-vramtop needs a HOST")


def add_curve_keys(p: argparse.ArgumentParser, server_help: str, client_help: str) -> None:
    """--server-key / --client-key: the CURVE key files of an agent that encrypts its stream (docs/security.md)."""
    p.add_argument("--server-key", metavar="FILE", default=None, help=server_help)
    p.add_argument("--client-key", metavar="FILE", default=None, help=client_help)


def check_curve_keys(server_key: str | None, client_key: str | None) -> None:
    if client_key and not server_key:
        raise UserError("--client-key needs --server-key (the agent's public key)")


def add_session(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--session", type=int, default=None, help=help)
