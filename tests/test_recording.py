"""Recordings: the Recorder sink, reading (also while being written), SIGKILL, `vramtop record`, failures."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import wait_for
from recording_helpers import PEAK_STEP, STEPS, fake_msg, real_recording

import vramtop_agent
from vramtop.errors import UserError
from vramtop.recording import Recording
from vramtop_agent.recorder import RECORDING_SCHEMA_VERSION, Recorder, RecorderError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "agent"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# ---------------------------------------------------------------------- the format


def test_real_recording_has_every_table_and_reads_back():
    rec = Recording.open(real_recording())
    counts = rec.verify()
    assert counts["steps"] == STEPS
    assert counts["samples"] >= STEPS  # 20 Hz over >= 10 steps of >= 60 ms
    c = rec.counts()
    assert c["sessions"] == 1
    s = rec.sessions()[0]
    assert s.pid == os.getpid() and s.model_class.startswith("PeftModelForCausalLM")
    assert s.hello["type"] == "hello"
    # The columns are the message's fields (what sqlite3 / pandas users query).
    db = sqlite3.connect(real_recording())
    for blocks, total, _msg in db.execute("SELECT parameters+gradients+optimizer+activations+other, total, msg"
                                           " FROM samples"):
        assert blocks == total
    meta = dict(db.execute("SELECT key, value FROM meta"))
    assert meta["format"] == "vramtop-recording" and int(meta["schema_version"]) == RECORDING_SCHEMA_VERSION
    assert {r[0] for r in db.execute("SELECT type FROM events")} >= {"hello", "phase", "bye"}
    steps = rec.steps()
    assert [m["step"] for m in steps] == list(range(STEPS))
    assert max(steps, key=lambda m: m["peak"])["step"] == PEAK_STEP
    # Messages come back in the order the agent sent them.
    msgs = rec.messages()
    assert msgs[0]["type"] == "hello" and msgs[-1]["type"] == "bye"
    eseqs = [m["eseq"] for m in msgs if "eseq" in m]
    assert eseqs == sorted(eseqs)
    rec.close()


def test_every_written_column_reads_back_the_device_too(tmp_path):
    """The writer's tables and the reader's column lists come from one declaration
    (vramtop_agent.recording_tables): a column written is a column read (the reader once missed `device`)."""
    from vramtop.recording import SAMPLE_COLUMNS, STEP_COLUMNS

    path = str(tmp_path / "device.vramtop")
    rec = Recorder(path)
    rec.send(fake_msg("sample", 1000.0, device="cuda:1"))
    rec.send(fake_msg("step", 1000.5, step=3))
    rec.close()
    with Recording.open(path) as r:
        [row] = r.sample_rows()
        assert dict(zip(SAMPLE_COLUMNS, row))["device"] == "cuda:1"
        [step] = r.step_rows()
        assert dict(zip(STEP_COLUMNS, step))["step"] == 3
    db = sqlite3.connect(path)
    for table, read in (("samples", SAMPLE_COLUMNS), ("steps", STEP_COLUMNS)):
        written = [c[1] for c in db.execute(f"PRAGMA table_info({table})") if c[1] != "msg"]
        assert list(read) == written
    db.close()


def test_closed_recording_is_one_file():
    path = real_recording()
    assert not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") == 0


def test_hello_stored_once_per_change_and_sessions_per_agent(tmp_path):
    path = str(tmp_path / "s.vramtop")
    rec = Recorder(path)
    t = time.time()
    for i in range(5):
        rec.send(fake_msg("hello", t + i, eseq=i + 1, start_time=t))  # re-sent every second, same but t/eseq
        rec.send(fake_msg("sample", t + i + 0.5, seq=i))
    rec.send(fake_msg("hello", t + 6, pid=777, start_time=t + 6))
    rec.send(fake_msg("sample", t + 6.5, pid=777))
    rec.close()
    r = Recording.open(path)
    assert len(r.events(("hello",))) == 2
    sessions = r.sessions()
    assert [(s.pid, s.rank) for s in sessions] == [(4242, 0), (777, 0)]
    assert len(list(r.samples(session=sessions[1].id))) == 1
    # A recording can be appended to (another rank, a restarted job).
    rec2 = Recorder(path)
    rec2.send(fake_msg("sample", t + 8, pid=999))
    rec2.close()
    assert len(Recording.open(path).sessions()) == 3


def test_recorder_refuses_foreign_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("my notes")
    with pytest.raises(RecorderError):
        Recorder(str(text))
    assert text.read_text() == "my notes"
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(RecorderError):
        Recorder(str(other))


def test_path_placeholders(tmp_path):
    rec = Recorder(str(tmp_path / "run-{rank}-{pid}.vramtop"))
    rec.close()
    assert os.path.basename(rec.path) == f"run-0-{os.getpid()}.vramtop"


def test_commits_while_running_and_a_reader_sees_them(tmp_path):
    """A recording being written can be opened (read-only, WAL) and shows what was committed."""
    path = str(tmp_path / "live.vramtop")
    rec = Recorder(path, commit_interval=0.05)
    t = time.time()
    rec.send(fake_msg("hello", t))
    for i in range(10):
        rec.send(fake_msg("sample", t + i * 0.1, seq=i, step=i // 3))
        time.sleep(0.01)
    time.sleep(0.06)
    rec.send(fake_msg("sample", t + 1.0, seq=10, step=3))  # triggers the commit
    reader = Recording.open(path)
    assert reader.counts()["samples"] == 11
    assert reader.span()[1] == pytest.approx(t + 1.0)
    rec.send(fake_msg("sample", t + 1.1, seq=11, step=3))
    rec.flush()
    assert reader.counts()["samples"] == 12  # the same reader follows the writer
    reader.verify()
    rec.close()
    reader.close()


# ---------------------------------------------------------------------- failures never reach the job


def test_disk_full_is_counted_then_given_up_and_the_file_stays_intact(tmp_path):
    path = str(tmp_path / "full.vramtop")
    rec = Recorder(path, commit_interval=0.0, max_failures=3)
    t = time.time()
    rec.send(fake_msg("hello", t))
    for i in range(5):
        rec.send(fake_msg("sample", t + i, seq=i))
    written = rec.written
    # SQLITE_FULL is what a full disk gives; a page cap produces the same error here.
    pages = rec._db.execute("PRAGMA page_count").fetchone()[0]
    rec._db.execute(f"PRAGMA max_page_count={pages}")
    big = fake_msg("sample", t + 10, seq=99, junk="x" * 200_000)
    errors = []
    for i in range(6):
        try:
            rec.send(dict(big, seq=100 + i))
        except RecorderError as exc:
            errors.append(str(exc))
    assert len(errors) == 3 and "full" in errors[0] and "stopped after 3 failures" in errors[-1]
    assert rec.disabled
    rec.send(fake_msg("sample", t + 20, seq=200))  # quiet now
    rec.close()
    r = Recording.open(path)
    r.verify()
    assert written == 6  # the hello and 5 samples, committed before the disk filled up
    assert len(list(r.samples())) == 5  # all there


def test_recorder_failures_are_counted_by_the_agent_never_raised(tmp_path):
    import torch

    path = str(tmp_path / "a.vramtop")
    rec = Recorder(path, commit_interval=0.0, max_failures=2)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[rec], sample_hz=50)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    time.sleep(0.1)
    os.remove(path)  # the file is gone: SQLite would write into an unlinked inode
    for _ in range(20):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.01)
    time.sleep(0.2)
    agent.stop()
    assert rec.disabled and "removed" in (rec.last_failure or "")
    assert agent.errors >= 1 and "sink-Recorder" in agent._error_counts
    assert agent._error_counts["sink-Recorder"] == 1  # gave up at once: nothing to write to


def test_bad_record_path_does_not_stop_the_job(tmp_path):
    import torch

    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = torch.nn.Linear(4, 4)
    agent = vramtop_agent.watch(model, publish=False, record=str(blocker / "sub" / "r.vramtop"))
    model(torch.randn(2, 4)).sum().backward()
    agent.stop()
    assert agent._error_counts["recorder"] == 1


# ---------------------------------------------------------------------- a real job, killed


JOB = textwrap.dedent("""
    import sys, time, torch
    import vramtop_agent
    from vramtop.tiny import add_lora, build_model, make_batch
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    agent = vramtop_agent.watch(model, opt, endpoint=sys.argv[1])  # records through VRAMTOP_RECORD
    print("ready", flush=True)
    i = 0
    while True:
        b = make_batch(model, batch=2, seq_len=32, seed=i)
        model(**b).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        i += 1
        time.sleep(0.02)
""")


def test_sigkilled_job_loses_at_most_a_second_and_record_cli_flushes_on_ctrl_c(tmp_path, free_tcp_endpoint):
    inproc = str(tmp_path / "inproc.vramtop")
    outside = str(tmp_path / "outside.vramtop")
    script = tmp_path / "job.py"
    script.write_text(JOB)
    job = subprocess.Popen([sys.executable, str(script), free_tcp_endpoint], env=_env(VRAMTOP_RECORD=inproc),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recorder = None
    try:
        assert job.stdout.readline().strip() == "ready", job.stderr.read()
        recorder = subprocess.Popen([sys.executable, "-m", "vramtop", "record", free_tcp_endpoint, "-o", outside],
                                    env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        # The job's own recording can be opened and read while it is being written.
        def steps_in(path, n):
            with Recording.open(path) as r:
                return r.counts()["steps"] >= n

        wait_for(lambda: steps_in(inproc, 5), 60, "5 recorded steps", interval=0.1, ignore=(UserError,))
        live = Recording.open(inproc)
        from vramtop.report import analyze

        assert analyze(live)["steps"]["count"] >= 5
        wait_for(lambda: os.path.exists(outside) and steps_in(outside, 5), 60, "vramtop record to record 5 steps",
                 interval=0.1, ignore=(UserError,))
        live_before = live.counts()["samples"]

        # Ctrl-C on `vramtop record`: a clean end, everything flushed.
        int_t = time.time()
        recorder.send_signal(signal.SIGINT)
        out, err = recorder.communicate(timeout=20)
        assert recorder.returncode == 0, err
        assert "interrupted" in err
        with Recording.open(outside) as r:
            assert r.verify()["samples"] > 0
            assert r.span()[1] >= int_t - 0.6
            assert r.sessions()[0].pid == job.pid
            assert r.meta["writer"] == "vramtop record"

        time.sleep(1.2)
        kill_t = time.time()
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=20)
    finally:
        for p in (job, recorder):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert live.counts()["samples"] > live_before  # the open reader keeps following
    live.close()
    with Recording.open(inproc) as r:
        counts = r.verify()
        last = max(s["t"] for s in r.samples())
        print(f"SIGKILL: the last sample was {kill_t - last:.2f} s before the kill")
        assert kill_t - last <= 1.0, f"the last {kill_t - last:.2f} s before the kill were lost"
        assert counts["steps"] >= 5
        assert not r.events(("bye",))  # killed: no goodbye


def test_record_cli_refuses_to_overwrite(tmp_path):
    from vramtop.cli import main

    out = tmp_path / "x.vramtop"
    out.write_text("")
    assert main(["record", "tcp://127.0.0.1:9", "-o", str(out)]) == 2
