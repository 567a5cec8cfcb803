"""`vramtop diff A.vramtop B.vramtop [--json]`: what changed in memory between two runs, and why."""

from __future__ import annotations

import argparse
import json
import sys

from vramtop.commands.common import add_verb


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "diff", run,
        help="compare two recordings: per block and phase, peak and steady state, with the likely cause",
        description="Compare two recordings (or two sessions of one: run.vramtop#2): each block at the step's "
        "peak, each phase's peak and the step peak, as peak and steady state (median after warm-up), the "
        "difference and its likely cause (batch x seq, dtype, method, checkpointing, optimizer, versions).",
        epilog="example: vramtop diff before.vramtop after.vramtop    |    vramtop diff run.vramtop#1 run.vramtop#2",
    )
    p.add_argument("a", metavar="A", help="a recording, optionally FILE#SESSION")
    p.add_argument("b", metavar="B", help="the recording to compare with A")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (bytes)")


def run(args: argparse.Namespace) -> int:
    from vramtop.diff import diff_files, render_text

    d = diff_files(args.a, args.b)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        sys.stdout.write(render_text(d))
    return 0
