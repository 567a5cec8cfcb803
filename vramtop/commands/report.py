"""`vramtop report run.vramtop [--html report.html]`: the postmortem of a recording."""

from __future__ import annotations

import argparse
import json
import os
import sys

from vramtop import budget
from vramtop.commands.common import add_session, add_verb
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "report", run,
        help="postmortem of a recording: the peak, an OOM, advice",
        description="Where and when the peak was, which block, what grew before an OOM, and what to do; "
        "--html also writes a page with plots (no script, no external resources).",
    )
    p.add_argument("recording", help="a .vramtop file (may still be being written)")
    p.add_argument("--html", metavar="FILE", help="also write an HTML report with plots")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON instead of text")
    add_session(p, "which session of the file (default: the one with an OOM, else the newest)")
    budget.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    limits = budget.from_args(args)
    code = _report(args)
    if limits is None:
        return code
    v = budget.check_recording(args.recording, limits, args.session)
    budget.write_verdict(v, args.verdict)
    for line in budget.breach_lines(v):
        print(line, file=sys.stderr)
    return code or v["exit_code"]


def _report(args: argparse.Namespace) -> int:
    from vramtop.recording import finish, reading
    from vramtop.report import analyze, render_html, render_text

    with reading(args.recording, args.session) as rec:
        a = analyze(rec, args.session)
        if args.json:
            out = dict(a)
            out["memory"] = {k: v for k, v in a["memory"].items() if k != "points"}
            print(json.dumps(out, indent=2, default=str))
        else:
            sys.stdout.write(render_text(a))
        if args.html:
            page = render_html(a, rec)
            try:
                with open(args.html, "w", encoding="utf-8") as fh:
                    fh.write(page)
            except OSError as exc:
                raise UserError(f"cannot write {args.html}: {exc.strerror or exc}") from None
            print(f"wrote {os.path.abspath(args.html)}", file=sys.stderr)
        code = finish(rec)
    return code
