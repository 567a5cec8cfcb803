"""`vramtop demo`: a real tiny fine-tune in a subprocess, with the dashboard attached."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from vramtop.commands.common import add_verb
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "demo", run, help="run a tiny LoRA fine-tune and watch it live",
                 description="Starts a small Llama (random weights, PEFT LoRA on q/v, AdamW) training in a "
                 "subprocess with the agent inside, and attaches the dashboard to it. Needs torch, "
                 "transformers and peft.")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default: until you quit)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-ckpt", action="store_true", help="enable gradient checkpointing")
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    p.add_argument("--sleep", type=float, default=0.05, help="pause between steps (seconds)")
    p.add_argument("--no-tui", action="store_true", help="only run the job and print its progress")
    p.add_argument("--screenshot", metavar="SVG", help="save the dashboard as SVG after --after seconds, then quit")
    p.add_argument("--after", type=float, default=12.0, help="seconds before --screenshot is taken")


def _check_deps() -> None:
    missing = []
    for mod in ("torch", "transformers", "peft"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise UserError(f"the demo needs {', '.join(missing)}: pip install 'torch' 'transformers' 'peft'")


def run(args: argparse.Namespace) -> int:
    _check_deps()
    cmd = [sys.executable, "-m", "vramtop.demo_train", "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--sleep", str(args.sleep)]
    if args.grad_ckpt:
        cmd.append("--grad-ckpt")
    if args.full:
        cmd.append("--full")
    if args.no_tui:
        return subprocess.call(cmd)
    # The job's output would scribble over the dashboard.
    # A file, not a pipe, for stderr: a full pipe would block the job.
    log = tempfile.TemporaryFile()
    child = subprocess.Popen(cmd + ["--quiet"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        return _watch(child, args, log)
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def _watch(child: subprocess.Popen, args: argparse.Namespace, log) -> int:
    from vramtop.live_source import LiveSource
    from vramtop.tui.app import VramtopApp

    source = LiveSource(str(child.pid))
    app = VramtopApp(source)
    if args.screenshot:
        def _shoot() -> None:
            path = os.path.abspath(args.screenshot)
            app.save_screenshot(filename=os.path.basename(path), path=os.path.dirname(path))
            app.exit()

        app.call_later(lambda: app.set_timer(args.after, _shoot))
    app.run()
    if child.poll() not in (None, 0):
        log.seek(0)
        err = log.read().decode(errors="replace").strip().splitlines()
        raise UserError(f"the demo job failed: {err[-1] if err else 'exit code ' + str(child.returncode)}")
    return 0
