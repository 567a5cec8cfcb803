"""Creep detection (vramtop_agent.creep): the detector on exact series, and real jobs that leak or do not."""

from __future__ import annotations

import os
import random

import pytest
from alarm_helpers import leak_bytes, start_record_job

from vramtop.cli import main
from vramtop.recording import Recording
from vramtop.state import SessionState
from vramtop_agent.creep import CreepWatch, detect

MiB = 1 << 20


def _phase_end(step: int, level: int, t: float = 0.0) -> dict:
    return {"v": 1, "type": "phase", "t": t or float(step), "pid": 1, "rank": 0, "eseq": step, "step": step,
            "phase": "optimizer", "edge": "end", "level": level}


def _feed(levels) -> tuple[CreepWatch, list[dict]]:
    watch, events = CreepWatch(), []
    watch.device_total = 24 << 30
    for step, level in enumerate(levels):
        events += watch.feed(_phase_end(step, level))
    return watch, events


def test_steady_leak_is_found_with_its_slope():
    base, leak = 3 << 30, 12 * MiB
    rng = random.Random(0)
    watch, events = _feed([base + leak * s + rng.randint(-MiB // 4, MiB // 4) for s in range(60)])
    assert len(events) == 1
    ev = events[0]
    assert ev["series"] == "allocated" and ev["step"] <= 10 + 12 + 1
    assert abs(ev["slope"] - leak) / leak < 0.02
    # the card is 24 GiB: what is left, at 12 MiB a step
    assert ev["steps_to_full"] == pytest.approx(((24 << 30) - (base + leak * ev["step"])) / ev["slope"], rel=0.02)
    assert [c.series for c in watch.current()] == ["allocated"]


@pytest.mark.parametrize("name, levels", [
    # optimizer state created at step 1, then flat
    ("optimizer state at step 1", [1 << 30] + [(1 << 30) + 200 * MiB] * 200),
    # the allocator grows through the first steps, then settles
    ("allocator warm-up", [(1 << 30) + min(s, 14) * 40 * MiB for s in range(200)]),
    # one longer batch at step 60 takes a new segment for good
    ("one-off jump", [(1 << 30) + (300 * MiB if s >= 60 else 0) for s in range(200)]),
    # noise around a flat level
    ("noise", [(1 << 30) + random.Random(1).randint(-8 * MiB, 8 * MiB) for _ in range(200)]),
    # ever-longer batches, rarer and rarer: the allocator's cache settles (steps 2, 4, 7, 12, 30, 90)
    ("cache settling", [(1 << 30) + 64 * MiB * sum(s >= j for j in (2, 4, 7, 12, 30, 90)) for s in range(200)]),
    # a sawtooth: a cache that fills and is emptied every 20 steps
    ("sawtooth", [(1 << 30) + (s % 20) * 4 * MiB for s in range(200)]),
])
def test_healthy_patterns_raise_no_alarm(name, levels):
    watch, events = _feed(levels)
    assert events == [], name
    assert watch.current() == []


def test_one_event_per_series_then_it_stops_when_the_leak_stops():
    levels = [(1 << 30) + 4 * MiB * s for s in range(50)] + [(1 << 30) + 200 * MiB] * 60
    watch, events = _feed(levels)
    assert len(events) == 1 and watch.current() == []  # the event stays in the record; the line goes


def test_detect_needs_enough_points():
    assert detect("allocated", [(s, s * MiB * 10) for s in range(10, 20)]) is None


def _creep_events(path: str) -> list[dict]:
    with Recording.open(path) as rec:
        return rec.events(("creep",))


@pytest.fixture(scope="module")
def real_jobs(tmp_path_factory):
    """The leaking job and the healthy one, run side by side under `vramtop run --record`."""
    d = tmp_path_factory.mktemp("creep")
    paths = {"leak": str(d / "leak.vramtop"), "ok": str(d / "ok.vramtop")}
    env_dir = os.environ.get("VRAMTOP_RUNTIME_DIR")
    os.environ["VRAMTOP_RUNTIME_DIR"] = str(d)  # the autouse fixture is per test; these jobs outlive one
    try:
        procs = {
            "leak": start_record_job(paths["leak"], "--steps", "130", "--leak", "--batch", "2", "--seq-len", "64",
                                     "--sleep", "0.15"),
            "ok": start_record_job(paths["ok"], "--steps", "200", "--batch", "2", "--seq-len", "32", "--sleep", "0.02"),
        }
    finally:
        if env_dir is None:
            os.environ.pop("VRAMTOP_RUNTIME_DIR", None)
        else:
            os.environ["VRAMTOP_RUNTIME_DIR"] = env_dir
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = (p.returncode, stdout, stderr, paths[name])
    return out


def test_real_leak_is_recorded_and_seen_by_the_viewer(real_jobs, capsys):
    """Keeping each step's logits: the recording gets a creep event with the leak's slope; a viewer fed
    the same stream (SessionState, as replay does) finds it too."""
    rc, stdout, stderr, path = real_jobs["leak"]
    assert rc == 0, stderr[-2000:]
    truth = leak_bytes(stdout)
    events = _creep_events(path)
    assert [e["series"] for e in events] == ["rss"], events  # a CPU job: host RSS
    ev = events[0]
    assert ev["step"] <= 125
    assert abs(ev["slope"] - truth) / truth < 0.10, (ev["slope"], truth)
    st = SessionState()
    rec = Recording.open(path)
    try:
        for msg in rec.messages():
            if msg["type"] != "creep":
                st.apply(msg)
    finally:
        rec.close()
    assert st.creep_events["rss"]["step"] == ev["step"]
    assert st.creep_events["rss"]["slope"] == ev["slope"]

    # The report's section says the same.
    code = main(["report", path])
    text = capsys.readouterr().out
    assert code == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("CREEP"))
    assert line.startswith("CREEP     rss +") and f"first seen at step {ev['step']}" in line


def test_healthy_run_has_no_creep_over_200_steps(real_jobs, capsys):
    rc, _, stderr, path = real_jobs["ok"]
    assert rc == 0, stderr[-2000:]
    assert _creep_events(path) == []
    assert main(["report", path]) == 0
    assert "CREEP     none" in capsys.readouterr().out
    rec = Recording.open(path)
    try:
        assert len(rec.step_rows()) == 200  # every step was recorded
    finally:
        rec.close()


def test_a_format_1_recording_gets_its_creep_recomputed(real_jobs, tmp_path, capsys):
    """A file from before creep events (format 1): the report runs the same detection over its stream."""
    import shutil
    import sqlite3

    src = real_jobs["leak"][3]
    path = str(tmp_path / "old.vramtop")
    shutil.copyfile(src, path)
    recorded = _creep_events(src)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM events WHERE type = 'creep'")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    assert _creep_events(path) == []
    assert main(["report", path, "--json"]) == 0
    import json

    again = json.loads(capsys.readouterr().out)["creep"]
    assert [(e["series"], e["step"], e["slope"]) for e in again] == \
        [(e["series"], e["step"], e["slope"]) for e in recorded]
