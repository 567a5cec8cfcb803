"""`vramtop replay run.vramtop`: the dashboard over a recording, with playback keys."""

from __future__ import annotations

import argparse
import sys

from vramtop.commands.common import add_session, add_verb
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "replay", run,
        help="replay a recording in the dashboard",
        description="Play a recording (vramtop record, or VRAMTOP_RECORD in the job) back in the live dashboard. "
        "Keys: space play/pause, +/- speed, left/right 10 s, [/] previous/next step, p peak, o OOM, g go to.",
    )
    p.add_argument("recording", help="a .vramtop file (may still be being written)")
    p.add_argument("--speed", type=float, default=1.0, help="playback speed (default 1x)")
    p.add_argument("--start", default=None, metavar="POS",
                   help="where to start: a step (120), a time from the start (+90s, 1:30), peak or oom")
    add_session(p, "which session of the file (default: the newest)")
    p.add_argument("--paused", action="store_true", help="start paused")


def run(args: argparse.Namespace) -> int:
    from vramtop.recording import Recording
    from vramtop.replay import ReplaySource

    if not args.speed > 0:
        raise UserError("--speed must be positive")
    rec = Recording.open(args.recording)
    source = ReplaySource(rec, session=args.session, speed=args.speed, playing=not args.paused)
    if args.start:
        source.goto(args.start)
    from vramtop.tui.replay_app import ReplayApp

    ReplayApp(source).run()
    line = rec.problem_line()
    if line:
        print(f"vramtop: {line}", file=sys.stderr)
        return 2
    return 0
