"""Replay (clock, source, the TUI under Pilot), report (text and HTML) and export of a real recording."""

import csv
import io
import json
import re

import pytest
from recording_helpers import PEAK_STEP, STEPS, fake_msg, real_recording

from vramtop.cli import main
from vramtop.errors import UserError
from vramtop.recording import Recording
from vramtop.replay import PlaybackClock, ReplaySource, parse_position
from vramtop.report import analyze, render_html, render_text
from vramtop.state import SessionState

# ---------------------------------------------------------------------- the clock


class FakeWall:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_clock_plays_pauses_speeds_seeks_and_clamps():
    wall = FakeWall()
    c = PlaybackClock(1000.0, 1060.0, now=wall)
    wall.now += 2
    assert c.position() == pytest.approx(1002.0)
    c.set_speed(4)
    wall.now += 1
    assert c.position() == pytest.approx(1006.0)
    c.pause()
    wall.now += 10
    assert c.position() == pytest.approx(1006.0)
    c.seek(1050)
    c.play()
    wall.now += 100
    assert c.position() == 1060.0 and c.at_end
    c.play()  # play at the end starts over
    assert c.position() == 1000.0
    assert c.faster() == 8.0 and c.slower() == 4.0
    c.seek(-5)
    assert c.position() == 1000.0
    c.extend(1100.0)
    assert c.end == 1100.0
    with pytest.raises(UserError):
        c.set_speed(0)


def test_parse_position():
    assert parse_position("120") == ("step", 120)
    assert parse_position("step 7") == ("step", 7)
    assert parse_position("+90s") == ("offset", 90)
    assert parse_position("1m30s") == ("offset", 90)
    assert parse_position("1:30") == ("offset", 90)
    assert parse_position("01:00:05") == ("offset", 3605)
    assert parse_position("2h") == ("offset", 7200)
    assert parse_position("peak") == ("peak", 0)
    with pytest.raises(UserError):
        parse_position("yesterday")


# ---------------------------------------------------------------------- the source


def _source(**kw):
    wall = FakeWall()
    return ReplaySource(Recording.open(real_recording()), wall=wall, **kw), wall


def _feed(src, state):
    if src.take_reset():
        state = SessionState(clock=src.now)
    for m in src.poll():
        state.apply(m)
    return state


def test_playing_feeds_every_message_once_in_order():
    src, wall = _source(speed=1.0)
    state = SessionState(clock=src.now)
    seen, windows = [], []
    while not src.clock.at_end:
        if src.take_reset():
            state = SessionState(clock=src.now)
        msgs = src.poll()
        seen += msgs
        windows += [[m["t"] for m in msgs]] if msgs else []
        for m in msgs:
            state.apply(m)
        wall.now += 0.05
    last = src.poll()
    seen += last
    for m in last:
        state.apply(m)
    all_msgs = src.rec.messages()
    # Every message exactly once. Replay hands them out by time window; within a window in the
    # order the recorder received them. A message stamped earlier but received later (an event
    # queued behind a sample on a loaded machine) moves to its time's window, so only the
    # multiset is compared, plus the time order across windows.
    assert sorted(map(repr, seen)) == sorted(map(repr, all_msgs))
    assert len(seen) == len(all_msgs)
    assert all(max(a) <= min(b) for a, b in zip(windows, windows[1:]))
    assert len(state.steps) == STEPS
    assert state.connection() == "ended"
    assert state.peak_step()["step"] == PEAK_STEP


def test_seeks_rebuild_the_state_a_live_viewer_would_have():
    src, wall = _source(playing=False)
    state = _feed(src, SessionState())
    assert state.hello is not None
    src.jump_peak()
    state = _feed(src, state)
    peak = src.rec.peak()
    assert state.sample["t"] <= peak.t + 1e-9
    assert state.sample["step"] == PEAK_STEP
    assert [s["step"] for s in state.steps] == list(range(PEAK_STEP))  # steps finished by then
    src.seek_step(3)
    state = _feed(src, state)
    assert state.sample["step"] in (2, 3) and len(state.steps) == 3
    src.step_relative(+2)
    state = _feed(src, state)
    assert len(state.steps) == 5
    src.goto("end")
    state = _feed(src, state)
    assert state.bye is not None and len(state.steps) == STEPS
    with pytest.raises(UserError, match="no OOM"):
        src.jump_oom()
    with pytest.raises(UserError, match="no step 999"):
        src.seek_step(999)


def test_jump_to_oom(tmp_path):
    from vramtop_agent.recorder import Recorder

    path = str(tmp_path / "oom.vramtop")
    rec = Recorder(path)
    rec.send(fake_msg("hello", 10.0))
    for i in range(50):
        rec.send(fake_msg("sample", 10.0 + i * 0.1, seq=i, step=i // 10))
    rec.send(fake_msg("oom", 13.05, step=3))
    rec.close()
    src = ReplaySource(Recording.open(path), wall=FakeWall(), playing=False)
    src.jump_oom()
    state = _feed(src, SessionState())
    assert state.ooms and state.ooms[0]["step"] == 3
    assert state.sample["t"] == pytest.approx(13.0)


async def test_replay_drives_the_tui_and_seeks():
    from vramtop.tui.replay_app import ReplayApp

    src = ReplaySource(Recording.open(real_recording()), playing=False)
    app = ReplayApp(src)
    async with app.run_test(size=(140, 45)) as pilot:
        await pilot.pause(0.2)
        assert app.state.hello is not None
        await pilot.press("p")
        await pilot.pause(0.2)
        assert app.state.sample["step"] == PEAK_STEP
        assert "peak" in src.status
        await pilot.press("g")
        await pilot.pause(0.1)
        await pilot.press("3", "enter")
        await pilot.pause(0.2)
        assert len(app.state.steps) == 3
        await pilot.press("right_square_bracket")
        await pilot.pause(0.2)
        assert len(app.state.steps) == 4
        await pilot.press("plus", "plus")
        assert src.clock.speed == 4.0
        await pilot.press("space")
        assert src.clock.playing
        await pilot.press("end")
        await pilot.pause(0.3)
        assert app.state.bye is not None
        assert app.state.connection() == "ended"
        await pilot.press("space")  # pause, so that the position is exact
        assert not src.clock.playing
        await pilot.press("home")
        await pilot.pause(0.1)
        assert app.state.bye is None and src.clock.position() == src.clock.start
        await pilot.press("o")  # no OOM in this recording: a notice, no crash
        await pilot.pause(0.1)
        header = str(app.query_one("#header").render())
        assert "replay real.vramtop" in header


# ---------------------------------------------------------------------- report


def test_report_finds_the_peak_step_and_block():
    rec = Recording.open(real_recording())
    a = analyze(rec)
    assert a["peak"]["step"] == PEAK_STEP
    assert a["peak"]["largest"] == "activations"
    assert a["steps"]["max_step"] == PEAK_STEP and a["steps"]["max_batch"] == [6, 64]
    assert a["ended"] == "finished" and a["ooms"] == []
    text = render_text(a)
    assert f"at step {PEAK_STEP}" in text and "<- largest" in text
    assert "gradient checkpointing" in text  # activations dominate the LoRA run's peak
    page = render_html(a, rec)
    assert page.count("<svg") == 3
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=""", page, re.I)  # nothing external
    assert "@import" not in page and "url(" not in page


def test_report_of_an_oom_says_what_grew(tmp_path):
    from vramtop_agent.recorder import Recorder

    path = str(tmp_path / "grew.vramtop")
    rec = Recorder(path)
    rec.send(fake_msg("hello", 10.0, cmdline=["<script>alert(1)</script>", "\x1b[31mred"]))
    small = {"parameters": 1000, "gradients": 1000, "optimizer": 2000, "activations": 3000, "other": 10}
    big = dict(small, activations=30_000)
    for i in range(4):
        rec.send(fake_msg("step", 10.0 + i, step=i, blocks=small))
    rec.send(fake_msg("oom", 14.5, step=4, blocks=big, batch=[8, 64]))
    rec.send(fake_msg("bye", 14.6, reason="oom"))
    rec.close()
    r = Recording.open(path)
    a = analyze(r)
    [o] = a["ooms"]
    assert o["grew"][0] == ("activations", 27_000) and o["compared_to"] == "the peak of step 3"
    text = render_text(a)
    assert "tried to allocate 2.00 GiB" in text and "activations +26.4 KiB" in text
    assert "\x1b" not in text
    page = render_html(a, r)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_report_uses_the_estimators_gap_analysis_when_the_job_published_an_estimate(tmp_path):
    import time

    import torch

    import vramtop_agent
    from vramtop.tiny import add_lora, build_model, make_batch
    from vramtop_agent.estimator import describe_live, estimate

    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    md, setup = describe_live(model, opt, batch=2, seq_len=32)
    path = str(tmp_path / "est.vramtop")
    agent = vramtop_agent.watch(model, opt, publish=False, record=path)
    agent.estimate = estimate(md, setup).to_dict()
    for i in range(3):
        model(**make_batch(model, 2, 32, seed=i)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    time.sleep(1.1)  # the hello is re-sent every second: the next one carries the estimate
    agent.stop()
    a = analyze(Recording.open(path))
    assert a["estimate"]["peak_allocated"] > 0
    assert a["gap"] is not None and a["gap"]["advice"]
    assert any(line.startswith("Try: ") for line in a["advice"])


def test_report_cli(tmp_path, capsys):
    html = tmp_path / "r.html"
    assert main(["report", real_recording(), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "PEAK" in out and "ADVICE" in out
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", real_recording(), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak"]["step"] == PEAK_STEP


# ---------------------------------------------------------------------- export


def test_export_csv_json_perfetto(tmp_path, capsys):
    rec = Recording.open(real_recording())
    n = rec.counts()["samples"]
    assert main(["export", real_recording()]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == n
    assert all(int(r["total"]) == sum(int(r[k]) for k in ("parameters", "gradients", "optimizer", "activations",
                                                           "other")) for r in rows)
    assert main(["export", real_recording(), "--what", "steps"]) == 0
    steps = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(s["step"]) for s in steps] == list(range(STEPS))

    out = tmp_path / "r.json"
    assert main(["export", real_recording(), "-f", "json", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["samples"]) == n and len(doc["steps"]) == STEPS and doc["meta"]["format"] == "vramtop-recording"

    trace = tmp_path / "trace.json"
    assert main(["export", real_recording(), "-f", "perfetto", "-o", str(trace)]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    counters = [e for e in events if e["ph"] == "C" and e["name"] == "blocks"]
    assert len(counters) == n
    assert set(counters[0]["args"]) == {"parameters", "gradients", "optimizer", "activations", "other"}
    slices = [e for e in events if e["ph"] == "X"]
    assert {"forward", "backward", "optimizer"} <= {e["name"] for e in slices}
    assert sum(1 for e in slices if e["name"].startswith("step ")) >= STEPS - 1
    assert all(e["dur"] >= 0 for e in slices)
    t0 = rec.span()[0]
    assert abs(counters[0]["ts"] / 1e6 - t0) < 5  # unix-epoch microseconds, like the agent's clock


def test_report_and_export_of_a_file_being_written(tmp_path, capsys):
    from vramtop_agent.recorder import Recorder

    path = str(tmp_path / "live.vramtop")
    rec = Recorder(path)
    rec.send(fake_msg("hello", 10.0))
    for i in range(30):
        rec.send(fake_msg("sample", 10.0 + i * 0.1, seq=i, step=i // 10))
    rec.flush()
    try:
        assert main(["report", path]) == 0
        assert "no goodbye" in capsys.readouterr().out
        assert main(["export", path]) == 0
        assert len(capsys.readouterr().out.strip().splitlines()) == 31
    finally:
        rec.close()
