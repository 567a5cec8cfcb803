"""Save the dashboard of the demo fine-tune as SVG, headless (for a GPU box without a terminal).

    python bench/gpu_screenshot.py OUT.svg [--seconds 25] [--full]

Starts `python -m vramtop.demo_train` (CUDA when present), attaches the real
app under App.run_test() and saves what it shows after --seconds, at 170×52
(every panel) and again at 80×24 (the compact layout) as OUT-80x24.svg. Prints
the last sample's blocks and allocator numbers so the picture can be checked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time


async def _shoot(pid: int, out: str, seconds: float) -> None:
    from vramtop.live_source import LiveSource
    from vramtop.tui.app import VramtopApp

    app = VramtopApp(LiveSource(str(pid)))
    async with app.run_test(size=(170, 52)) as pilot:
        deadline = time.time() + seconds
        while time.time() < deadline:
            await pilot.pause(0.5)
        app._refresh_view()
        await pilot.pause(0.3)
        app.save_screenshot(filename=os.path.basename(out), path=os.path.dirname(os.path.abspath(out)))
        await pilot.resize_terminal(80, 24)  # the same moment in the layout an 80×24 terminal gets
        await pilot.pause(0.5)
        app._refresh_view()
        await pilot.pause(0.3)
        small = os.path.splitext(os.path.abspath(out))[0] + "-80x24.svg"
        app.save_screenshot(filename=os.path.basename(small), path=os.path.dirname(small))
        print("saved", out, "and", small, "layout", app.mode)
        s = app.state.sample or {}
        print("steps seen", len(app.state.steps), "connection", app.state.connection())
        print("blocks", s.get("blocks"))
        print("cuda", s.get("cuda"))
        print("nvml", s.get("nvml"))
        if app.state.steps:
            print("last step", {k: app.state.steps[-1][k] for k in ("step", "peaks", "end_of_forward", "peak")})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "vramtop.demo_train", "--quiet", "--sleep", "0.05", "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--size", args.size]
    if args.full:
        cmd.append("--full")
    child = subprocess.Popen(cmd)
    try:
        asyncio.run(_shoot(child.pid, args.out, args.seconds))
    finally:
        child.kill()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
