"""The dashboard's layout, pinned: SVG screenshots of the real Textual app fed from canned streams.

Each test renders the app (App.run_test, a fixed clock, tests/canned.py) at a
terminal size and compares `export_screenshot()` with the committed baseline
in tests/snapshots/NAME.svg. A layout change therefore shows up as a changed
SVG in review. To accept a change, regenerate the baselines and look at them:

    VRAMTOP_UPDATE_SNAPSHOTS=1 python -m pytest -q tests/test_snapshots.py

On a mismatch the test prints the screen's text, line by line, both ways.
"""

from __future__ import annotations

import difflib
import html
import os
import re
import types
from pathlib import Path

import pytest
from canned import T0, CannedSource, cpu_stream, cuda_stream, fixed_clock

from vramtop.source import KeyedSource
from vramtop.state import SessionState
from vramtop.tui.app import VramtopApp

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("VRAMTOP_UPDATE_SNAPSHOTS") == "1"
SIZES = [(80, 24), (120, 40), (200, 50)]


def svg_lines(svg: str) -> list[str]:
    """The screen's text rows from a Textual SVG (for a readable diff)."""
    rows: dict[float, list] = {}
    for m in re.finditer(r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(float(m.group(2)), []).append((float(m.group(1)), html.unescape(m.group(3))))
    out = []
    for y in sorted(rows):
        line = ""
        for x, t in sorted(rows[y]):
            line = line.ljust(int(round(x / 12.2))) + t.replace("\xa0", " ")
        out.append(line.rstrip())
    return out


def assert_snapshot(name: str, svg: str) -> None:
    path = SNAPSHOTS / f"{name}.svg"
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg, encoding="utf-8")
        return
    assert path.exists(), f"no baseline {path}: run with VRAMTOP_UPDATE_SNAPSHOTS=1 and review the SVG"
    expected = path.read_text(encoding="utf-8")
    if svg != expected:
        diff = "\n".join(difflib.unified_diff(svg_lines(expected), svg_lines(svg), "baseline", "now", lineterm=""))
        raise AssertionError(f"{name}: the screen differs from {path.name} "
                             f"(VRAMTOP_UPDATE_SNAPSHOTS=1 to accept):\n{diff or '(same text, styles differ)'}")


async def _shot(app, size, keys=(), settle=None) -> str:
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.1)
        for key in keys:
            await pilot.press(key)
            await pilot.pause(0.1)
        if settle is not None:
            await settle(pilot)
        app._refresh_view()
        await pilot.pause(0.1)
        # On a loaded machine a style can land a frame late (seen under the full suite on 2 cores): take the
        # screen once two looks a pause apart agree.
        shot = app.export_screenshot()
        for _ in range(20):
            await pilot.pause(0.1)
            again = app.export_screenshot()
            if again == shot:
                break
            shot = again
        return shot


def _app(msgs) -> VramtopApp:
    return VramtopApp(CannedSource(msgs), state=SessionState(clock=fixed_clock(msgs)))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("run", ["cpu", "cuda"])
async def test_dashboard(run, size):
    msgs = cpu_stream() if run == "cpu" else cuda_stream()
    assert_snapshot(f"dashboard-{run}-{size[0]}x{size[1]}", await _shot(_app(msgs), size))


async def test_too_small_terminal_says_so():
    svg = await _shot(_app(cpu_stream()), (59, 19))
    text = "\n".join(svg_lines(svg))
    assert "terminal too small (needs 60×20" in text
    assert "Memory" not in text and "step 11" not in text
    assert_snapshot("too-small-59x19", svg)


async def test_compact_layout_shows_the_step_line_and_cycles_panels():
    """At 80×24 the header's three lines, the bar and the phase-peaks line are all on screen; Tab
    brings the other panels (the test for bug 2: the header used to wrap and push the step line away)."""
    app = _app(cpu_stream())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        app._refresh_view()
        await pilot.pause(0.1)
        lines = svg_lines(app.export_screenshot())
        assert lines[0].lstrip().startswith("vramtop pid 4242")
        assert lines[2].lstrip().startswith("batch×seq 4×128  step 11  phase")
        assert "dropped 0" in lines[2]
        assert any(ln.lstrip().startswith("step 11 peak") for ln in lines)
        assert all(len(ln) <= 80 for ln in lines)
        assert app.panel == "phases"
        for expected in ("timeline", "gap", "frag", "phases"):
            await pilot.press("tab")
            await pilot.pause(0.05)
            assert app.panel == expected
            assert app.query_one(f"#{expected}").display
        await pilot.press("3")
        assert app.panel == "gap"


async def test_what_if_dialog():
    msgs = cuda_stream()

    async def settle(pilot):
        from textual.widgets import Input

        for inp in pilot.app.screen.query(Input):
            inp.cursor_blink = False  # a blinking cursor would make the screenshot depend on timing
        for _ in range(50):
            if getattr(pilot.app.screen, "prediction", None) is not None:
                break
            await pilot.pause(0.1)
        await pilot.pause(0.2)

    svg = await _shot(_app(msgs), (80, 24), keys=("w",), settle=settle)
    text = "\n".join(svg_lines(svg))
    assert "esc Close" in text and "grad ckpt" in text and " off" in text
    assert "predicted peak" in text and "parameters" in text and "activations" in text
    assert_snapshot("what-if-cuda-80x24", svg)


class _JobSource(KeyedSource):
    """Two ranks' canned streams, as JobApp pulls them."""

    def __init__(self, streams: dict[str, list[dict]]):
        self._streams = streams
        self.members = {k: types.SimpleNamespace(info={"rank": s[0]["rank"], "pid": s[0]["pid"], "world_size": 2,
                                                        "node": s[0]["host"]}) for k, s in streams.items()}
        self.gone: list = []
        self.status = "2 agents"
        self.describe = "job"

    def poll(self):
        out = [(k, m) for k, msgs in self._streams.items() for m in msgs]
        self._streams = {k: [] for k in self._streams}
        return out

    def close(self):
        pass


async def test_job_view_two_ranks():
    from vramtop.job_state import JobState
    from vramtop.tui.job_view import JobApp

    streams = {"r0": cuda_stream(pid=5000, rank=0, world_size=2),
               "r1": cuda_stream(pid=5001, rank=1, world_size=2, scale=1.3, host="gpu-node2")}
    now = max(m["t"] for s in streams.values() for m in s) + 0.5
    app = JobApp(_JobSource(streams), job=JobState(clock=lambda: now))

    async def settle(pilot):
        pilot.app.screen.refresh_rows()
        await pilot.pause(0.1)

    svg = await _shot(app, (120, 40), settle=settle)
    text = "\n".join(svg_lines(svg))
    assert "2 ranks of world size 2" in text and "▲ activations" in text
    assert_snapshot("job-two-ranks-120x40", svg)


@pytest.fixture
def cpu_recording(tmp_path):
    from vramtop_agent.recorder import Recorder

    path = tmp_path / "run.vramtop"
    rec = Recorder(str(path))
    for msg in cpu_stream(with_bye=True):
        rec.send(msg)
    rec.close()
    return str(path)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
async def test_replay(cpu_recording, size):
    from vramtop.recording import Recording
    from vramtop.replay import PlaybackClock, ReplaySource
    from vramtop.tui.replay_app import ReplayApp

    rec = Recording.open(cpu_recording)
    start, end = rec.span()
    wall = lambda: 0.0  # noqa: E731 - playback does not move: the screen is the one at the seek
    clock = PlaybackClock(start, end, playing=False, now=wall)
    source = ReplaySource(rec, clock=clock, wall=wall)
    source.seek_step(8)
    source.message = ""
    svg = await _shot(ReplayApp(source), size)
    lines = svg_lines(svg)
    assert "[paused]" in lines[0] and "[live]" not in lines[0]
    assert "dropped 0" in "\n".join(lines)
    assert_snapshot(f"replay-cpu-{size[0]}x{size[1]}", svg)


def test_canned_streams_follow_the_schema():
    """The CUDA stream is built, not recorded: keep it a stream an agent could send."""
    msgs = cuda_stream()
    assert msgs[0]["type"] == "hello" and msgs[0]["t"] == T0
    for m in msgs:
        if m["type"] == "sample":
            c, nv = m["cuda"], m["nvml"]
            assert c["allocated"] == sum(m["blocks"].values()) <= c["reserved"] <= nv["process_used"] <= nv["used"]
