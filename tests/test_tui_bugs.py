"""One test per bug of issue 14 that the dashboard, replay and the CLI had (bug 2, the header that
wrapped at 80 columns, is tests/test_snapshots.py::test_compact_layout_shows_the_step_line_and_cycles_panels)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from canned import cpu_stream, cuda_stream

from vramtop.recording import Recording
from vramtop.source import KeyedSource
from vramtop.state import SessionState
from vramtop.tui import render

TRAIN = textwrap.dedent("""
    import sys, torch
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 16), torch.randn(4, 2)
    for _ in range(int(sys.argv[1])):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
""")


def _vramtop(*args, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("VRAMTOP", "VRAMTOP_RECORD")}
    return subprocess.run([sys.executable, "-m", "vramtop", *args], capture_output=True, text=True, env=env,
                          timeout=kw.pop("timeout", 120), **kw)


def _record(path, msgs):
    from vramtop_agent.recorder import Recorder

    rec = Recorder(str(path))
    for m in msgs:
        rec.send(m)
    rec.close()
    return str(path)


def test_header_lines_are_cut_not_wrapped():
    """Bug 2, the pure half: every header line fits the width it is given, ending in "…" when cut."""
    from vramtop.tui.header import HeaderContext, header_lines

    state = SessionState(clock=lambda: 1e10)
    for m in cpu_stream():
        state.apply(m)
    for width in (60, 80, 120):
        lines = header_lines(state, HeaderContext(source="replay a-long-recording-name.vramtop"), width)
        assert len(lines) == 3 and all(ln.cell_len <= width for ln in lines)
        assert lines[2].plain.startswith("batch×seq 4×128  step 11  phase")
    assert header_lines(state, None, 60)[1].plain.endswith("…")


def test_replay_does_not_count_the_recordings_event_gaps_as_drops(tmp_path):
    """Bug 3: the recorder stores repeated hellos once, so the recording's eseq has gaps; none is a drop."""
    from vramtop.replay import PlaybackClock, ReplaySource
    from vramtop.tui.replay_app import ReplayApp

    # The agent re-sends its hello every second, each with its own eseq; the recorder keeps one copy.
    stream, hello, n = [], None, 0
    for m in cpu_stream(with_bye=True):
        if m["type"] == "hello":
            hello = m
        if m["type"] == "step" and hello is not None:
            stream.append(dict(hello, t=m["t"] - 0.001))
        stream.append(dict(m))
    for m in stream:
        if "eseq" in m:
            n += 1
            m["eseq"] = n
    path = _record(tmp_path / "r.vramtop", stream)
    rec = Recording.open(path)
    eseqs = [m["eseq"] for m in rec.messages() if "eseq" in m]
    assert any(b > a + 1 for a, b in zip(eseqs, eseqs[1:])), "the recording should have eseq gaps"
    wall = lambda: 0.0  # noqa: E731
    start, end = rec.span()
    source = ReplaySource(rec, clock=PlaybackClock(start, end, playing=False, now=wall), wall=wall)
    source.goto("end")
    app = ReplayApp(source)  # the state the replay dashboard starts from
    assert source.take_reset()
    for m in source.poll():
        app.state.apply(m)
    assert app.state.missed_events == 0
    assert "dropped 0" in render.header(app.state).plain
    live = SessionState()  # the same gaps on a live stream are lost frames
    for m in rec.messages():
        live.apply(m)
    assert live.missed_events > 0


def test_a_closed_pipe_ends_quietly(tmp_path):
    """Bug 4: `vramtop export ... | head -1`: no BrokenPipeError traceback."""
    msgs = cpu_stream()
    many = list(msgs)
    for k in range(1, 15):  # enough rows to overflow the pipe's buffer
        many += [dict(m, t=m["t"] + 30 * k, seq=m.get("seq", 0) + 1000 * k) for m in msgs if m["type"] == "sample"]
    path = _record(tmp_path / "big.vramtop", many)
    for fmt in ("csv", "json"):
        proc = subprocess.Popen([sys.executable, "-m", "vramtop", "export", path, "--format", fmt],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.readline()
        proc.stdout.close()  # what `head -1` does
        err = proc.stderr.read().decode()
        rc = proc.wait(timeout=60)
        assert "Traceback" not in err and "BrokenPipeError" not in err, err
        assert rc in (0, 141), (rc, err)


def test_run_record_refuses_an_existing_recording_and_readers_take_the_newest_session(tmp_path):
    """Bug 5: `vramtop run --record` agrees with `vramtop record` (no silent append), and report and
    replay show the newest session of a file by default."""
    from vramtop.replay import ReplaySource
    from vramtop.report import analyze

    old = cpu_stream()
    new = [dict(m, pid=4343, t=m["t"] + 3600, **({"start_time": m["start_time"] + 3600} if "start_time" in m else {}))
           for m in old]
    path = _record(tmp_path / "two.vramtop", old + new)
    res = _vramtop("run", "--record", path, "--", sys.executable, "-c", "pass")
    assert res.returncode != 0 and "exists" in res.stderr and "--append" in res.stderr
    assert "Traceback" not in res.stderr
    rec = Recording.open(path)
    sessions = rec.sessions()
    assert len(sessions) == 2
    newest = max(sessions, key=lambda s: s.id)
    assert newest.pid == 4343
    assert analyze(rec)["session"] == newest.id
    assert ReplaySource(rec).session == newest.id


def test_attach_to_nothing_says_so_while_waiting(tmp_path):
    """Bug 6: an endpoint where nothing listens: the status line says so instead of "attached to"."""
    from vramtop.live_source import LiveSource

    for endpoint, expected in ((f"ipc://{tmp_path}/no-such.sock", "no socket at"),
                               ("tcp://127.0.0.1:1", "connection refused")):
        source = LiveSource(endpoint)
        try:
            deadline = time.time() + 10
            while time.time() < deadline and expected not in source.status:
                source.poll()
                time.sleep(0.05)
            assert expected in source.status and "waiting" in source.status, source.status
        finally:
            source.close()


@pytest.mark.slow
def test_run_record_template_names_the_files_it_made(tmp_path):
    """Bug 7: `vramtop run --record 'run-{pid}-{rank}.vramtop'` names the file it created, not the template."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    template = str(tmp_path / "run-{pid}-{rank}.vramtop")
    res = _vramtop("run", "--record", template, "--", sys.executable, str(script), "3", cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr
    made = sorted(p for p in os.listdir(tmp_path) if p.endswith(".vramtop"))
    assert len(made) == 1 and "{" not in made[0]
    assert f"recorded {tmp_path / made[0]}" in res.stderr


# ---------------------------------------------------------------- issue 16: the job view's timers ran twice


class _TwoRanks(KeyedSource):
    """Two ranks' canned streams, handed over once."""

    def __init__(self):
        self._msgs = [(f"r{rank}", m) for rank in (0, 1)
                      for m in cuda_stream(pid=6000 + rank, rank=rank, world_size=2)]
        self.status = "2 agents"

    def poll(self, timeout_ms: int = 0):
        out, self._msgs = self._msgs, []
        return out


async def test_job_view_starts_each_timer_once():
    """Textual runs on_mount for every class in the MRO: a JobApp.on_mount that also called
    super().on_mount() started the dashboard's pump and refresh timers twice (twice the work, and two
    pumps racing over one source)."""
    from vramtop.tui.job_view import JobApp

    intervals: list[str] = []

    class CountingJobApp(JobApp):
        def set_interval(self, interval, callback=None, **kwargs):
            intervals.append(callback.__name__)
            return super().set_interval(interval, callback, **kwargs)

    app = CountingJobApp(_TwoRanks())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        assert len(app.job.members) == 2  # the pump ran
        assert sorted(intervals) == ["_pump", "_refresh_view"]
