"""What the panels say where a number does not exist, for non-LM models, and the keys' side effects."""

from __future__ import annotations

import pytest
from canned import CannedSource, cpu_stream, cuda_stream, fixed_clock

from vramtop.state import SessionState
from vramtop.tui import render
from vramtop.tui.gap_render import GapModel, render_gap, worth_trying


def _state(msgs) -> SessionState:
    st = SessionState(clock=fixed_clock(msgs))
    for m in msgs:
        st.apply(m)
    return st


def _plain(renderable, width=120) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_cpu_says_not_available_instead_of_zero():
    st = _state(cpu_stream())
    now = render.now_lines(st, 200).plain
    assert "backward spike n/a on CPU" in now and "+0 B" not in now
    assert "fragmentation n/a on CPU (no caching allocator)" in render.fragmentation(st).plain
    phases = _plain(render.phases(st))
    assert "+0 B" not in phases and "n/a on CPU (no caching allocator)" in phases
    assert "host RAM" in render.stack(st, 100).renderables[0].plain


def test_cuda_shows_the_spike_and_full_words():
    st = _state(cuda_stream())
    assert "backward spike +2.52 GiB" in render.now_lines(st, 200).plain
    phases = _plain(render.phases(st, width=120))
    assert "activations" in phases and "activ " not in phases and "+2.52 GiB" in phases


def test_a_model_that_takes_no_token_ids():
    msgs = [m for m in cpu_stream() if m["type"] != "hello"]
    hello = next(m for m in cpu_stream() if m["type"] == "hello")
    hello = dict(hello, model={"class": "ResNet", "params_total": 11_000_000, "params_trainable": 11_000_000,
                               "dtype": "float32", "method": "full"}, estimate=None)
    for m in msgs:
        if m["type"] == "sample":
            m["batch"] = [8, 3, 224, 224]
    st = _state([hello, *msgs])
    header = render.header(st).plain
    assert "input 8×3×224×224" in header and "batch×seq" not in header
    assert "no estimate for this model (ResNet" in _plain(render_gap(st, GapModel()))


def test_advice_below_a_meaningful_saving_is_dropped():
    items = [{"action": "8-bit AdamW", "saving": 64}, {"action": "checkpointing", "saving": 13 << 20}]
    assert [i["action"] for i in worth_trying(items, peak=22 << 20)] == ["checkpointing"]
    # 1% of a 80 GiB peak is the floor on a big run
    assert worth_trying([{"action": "x", "saving": 300 << 20}], peak=80 << 30) == []


def test_header_says_ended_after_the_job_ends():
    st = _state(cpu_stream(with_bye=True))
    line3 = render.header(st).plain.splitlines()[2]
    assert "phase ended" in line3


@pytest.mark.asyncio
async def test_pause_shows_in_the_header_and_s_saves_into_a_named_folder(tmp_path, monkeypatch):
    from vramtop.tui.app import VramtopApp

    monkeypatch.setenv("VRAMTOP_SCREENSHOTS", str(tmp_path / "shots"))
    msgs = cpu_stream()
    app = VramtopApp(CannedSource(msgs), state=SessionState(clock=fixed_clock(msgs)))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        await pilot.press("space")
        await pilot.pause(0.1)
        assert "[paused]" in app.query_one("#header").render().plain.splitlines()[0]
        await pilot.press("s")
        await pilot.pause(0.1)
        assert app.last_screenshot and app.last_screenshot.startswith(str(tmp_path / "shots"))
        assert (tmp_path / "shots").is_dir() and list((tmp_path / "shots").glob("vramtop-*.svg"))
        await pilot.press("space")
        await pilot.pause(0.1)
        assert "[live]" in app.query_one("#header").render().plain.splitlines()[0]


def test_report_speaks_of_the_measured_peak_and_host_ram_on_cpu(tmp_path):
    import re

    from vramtop.recording import Recording
    from vramtop.report import analyze, render_html, render_text, svg_lines
    from vramtop_agent.recorder import Recorder

    path = str(tmp_path / "cpu.vramtop")
    rec = Recorder(path)
    for m in cpu_stream(with_bye=True):
        rec.send(m)
    rec.close()
    r = Recording.open(path)
    a = analyze(r)
    text = render_text(a)
    measured = a["peak"]["level"]
    tries = [ln for ln in text.splitlines() if "Try:" in ln]
    assert tries and all("the card" not in ln and "host RAM had" in ln for ln in tries)
    assert all(f"instead of {render.fmt_bytes(measured)}" in ln for ln in tries)
    assert "of host RAM)" in text and "on the card" not in text
    page = render_html(a, r)
    assert "<ul></ul>" not in page  # no OOM: no empty list
    # Steps: whole-number ticks, each once; the first (forward) line is drawn wider than the ones over it.
    svg = svg_lines([0, 1, 2], [("forward peak", "#0f0", [5, 5, 5]), ("backward peak", "#f00", [5, 5, 5])],
                    "step", lambda v: f"{v:.0f}", "steps", integer_x=True)
    assert re.findall(r'class="tick">(\d+)</text>', svg) == ["0", "1", "2"]
    widths = [float(w) for w in re.findall(r'stroke-width="([\d.]+)"', svg)]
    assert widths[0] > widths[1]
