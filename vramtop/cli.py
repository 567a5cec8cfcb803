"""The `vramtop` command: one argparse parser, one module per verb.

Each verb lives in `vramtop/commands/<verb>.py` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed args and returning an exit code. Verbs import their heavy
dependencies (textual, torch) inside `func`, so `vramtop --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vramtop import __version__
from vramtop.errors import UserError

# Order is the order shown in --help.
VERBS = ["attach", "inject", "detach", "run", "ls", "record", "replay", "report", "diff", "export", "estimate", "demo",
         "metrics"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vramtop",
        description=("Where a training job's GPU memory goes: parameters, gradients, optimizer states, "
                     "activations, live."),
    )
    parser.add_argument("--version", action="version", version=f"vramtop {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb in VERBS:
        try:
            module = importlib.import_module(f"vramtop.commands.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vramtop.commands.{verb}":
                continue  # verb not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # Bare `vramtop`: attach to whatever is running here.
        args = parser.parse_args(["attach", *(argv or [])])
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"vramtop: {exc}", file=sys.stderr)
        return exc.exit_code
    except PermissionError as exc:  # e.g. a runtime directory someone else owns (vramtop_agent.discovery)
        print(f"vramtop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """`vramtop report --json | head`: the reader closed the pipe. That is how such a pipeline ends,
    not an error: no traceback, and stdout pointed at /dev/null so that the interpreter's final
    flush does not fail again. 141 = 128 + SIGPIPE, what a shell reports for a writer that a
    closed pipe ended."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
