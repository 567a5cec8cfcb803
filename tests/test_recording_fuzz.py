"""Bad input: truncated, corrupt, foreign and newer files, and hostile BLOBs, are refused cleanly (UserError)."""

import os
import pickle
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recording_helpers import copy_of, fake_msg, real_recording

from vramtop.cli import main
from vramtop.errors import UserError
from vramtop.recording import Recording
from vramtop.replay import ReplaySource
from vramtop.report import analyze, render_html, render_text
from vramtop_agent.recorder import Recorder, RecorderError

# VRAMTOP_FUZZ_EXAMPLES=500 for a deeper run than CI's.
FUZZ = settings(max_examples=int(os.environ.get("VRAMTOP_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_everything(path):
    """What the commands do with a file; only UserError may come out."""
    rec = Recording.open(path)
    try:
        a = analyze(rec)
        render_text(a)
        render_html(a, rec)
        src = ReplaySource(rec, playing=False)
        src.poll()
        src.jump_peak()
        src.poll()
        rec.verify()
    finally:
        rec.close()


def _bytes():
    if "_b" not in _bytes.__dict__:
        with open(real_recording(), "rb") as fh:
            _bytes._b = fh.read()
    return _bytes._b


@FUZZ
@given(cut=st.floats(min_value=0.0, max_value=0.9999))
def test_every_truncation_is_rejected(cut):
    data = _bytes()
    n = int(len(data) * cut)
    path = copy_of(real_recording(), "trunc.vramtop")
    with open(path, "wb") as fh:
        fh.write(data[:n])
    with pytest.raises(UserError) as info:
        _read_everything(path)
    msg = str(info.value)
    assert "\n" not in msg and ("truncated" in msg or "not a" in msg or "empty" in msg or "damaged" in msg), msg


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0.0, 0.9999), st.binary(min_size=1, max_size=64)), min_size=1, max_size=8))
def test_corrupt_bytes_give_a_user_error_or_a_clean_read(edits):
    data = bytearray(_bytes())
    for where, junk in edits:
        i = int(where * len(data))
        data[i:i + len(junk)] = junk
    path = copy_of(real_recording(), "corrupt.vramtop")
    with open(path, "wb") as fh:
        fh.write(bytes(data[:len(_bytes())]))
    try:
        _read_everything(path)
    except UserError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_foreign_bytes_are_not_a_recording(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("f") / "x.vramtop"
    path.write_bytes(data)
    with pytest.raises(UserError):
        _read_everything(str(path))


@FUZZ
@given(blob=st.binary(max_size=512))
def test_fuzzed_blobs_are_skipped_and_counted(blob):
    path = copy_of(real_recording(), "blob.vramtop")
    db = sqlite3.connect(path)
    db.execute("UPDATE samples SET msg = ? WHERE id = (SELECT min(id) FROM samples)", (blob,))
    db.commit()
    db.close()
    rec = Recording.open(path)
    n = rec.counts()["samples"]
    got = list(rec.samples())
    assert len(got) in (n - 1, n)  # skipped, unless the bytes happen to be a valid sample
    if len(got) == n - 1:
        assert rec.problem_line() and "sample" in rec.problem_line()
    rec.close()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vramtop-pwned-by-pickle",))


def test_pickle_in_a_blob_is_rejected_not_loaded(tmp_path):
    marker = "/tmp/vramtop-pwned-by-pickle"
    if os.path.exists(marker):
        os.remove(marker)
    path = copy_of(real_recording(), "pickle.vramtop")
    db = sqlite3.connect(path)
    payload = pickle.dumps(Evil())
    db.execute("UPDATE samples SET msg = ? WHERE id = (SELECT min(id) FROM samples)", (payload,))
    db.execute("UPDATE events SET msg = ? WHERE type = 'bye'", (pickle.dumps(Evil(), protocol=0),))
    db.execute("UPDATE sessions SET hello = ?", (payload,))
    db.commit()
    db.close()
    rec = Recording.open(path)
    assert len(list(rec.samples())) == rec.counts()["samples"] - 1
    assert rec.events(("bye",)) == []
    with pytest.raises(UserError) as info:
        rec.verify()
    assert "pickle" in str(info.value) or "msgpack" in str(info.value)
    assert not os.path.exists(marker)
    # The CLI shows what it could read and says what it skipped, on one line, exit status 2.
    assert main(["report", path]) == 2


def test_foreign_sqlite_and_newer_versions(tmp_path):
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="not a vramtop recording"):
        Recording.open(str(other))
    plain = tmp_path / "plain.sqlite"
    sqlite3.connect(plain).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(UserError, match="not a vramtop recording"):
        Recording.open(str(plain))

    # A newer but compatible file is read, with a note; an incompatible one is refused, not misread.
    newer = copy_of(real_recording(), "newer.vramtop")
    db = sqlite3.connect(newer)
    db.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    db.commit()
    r = Recording.open(newer)
    assert r.notes and "newer" in r.notes[0]
    r.verify()
    r.close()
    db.execute("UPDATE meta SET value = '7' WHERE key = 'compatible_version'")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="newer vramtop") as info:
        Recording.open(newer)
    assert "\n" not in str(info.value)
    assert main(["report", newer]) == 2
    with pytest.raises(RecorderError, match="newer vramtop"):
        Recorder(newer)  # and nothing appends to it either


def test_messages_from_a_newer_wire_schema_are_reported_not_misread(tmp_path):
    path = str(tmp_path / "wire.vramtop")
    rec = Recorder(path)
    rec.send(fake_msg("sample", 1.0, seq=1))
    rec.send(fake_msg("sample", 2.0, seq=2, v=99))
    rec.close()
    r = Recording.open(path)
    assert [m["seq"] for m in r.samples()] == [1]
    assert "newer wire schema" in r.problem_line()


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Recording.open(str(tmp_path / "nope.vramtop"))
    (tmp_path / "empty.vramtop").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        Recording.open(str(tmp_path / "empty.vramtop"))
    assert main(["report", str(tmp_path / "nope.vramtop")]) == 2
    assert main(["replay", str(tmp_path / "empty.vramtop")]) == 2
    assert main(["export", str(tmp_path / "nope.vramtop")]) == 2


_num = st.one_of(st.integers(-(2 ** 63), 2 ** 64 - 1), st.floats(allow_nan=True, allow_infinity=True))
_blocks = st.fixed_dictionaries({k: _num for k in ("parameters", "gradients", "optimizer", "activations", "other")})


@FUZZ
@given(ts=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6), blocks=_blocks,
       step=st.integers(-(2 ** 63), 2 ** 63 - 1), text=st.text(max_size=30))
def test_absurd_but_schema_valid_values_never_crash_a_reader(tmp_path_factory, ts, blocks, step, text):
    """What a buggy or hostile agent could send through `vramtop record`: only UserError may come out."""
    from vramtop_agent.schema import SchemaError, validate

    path = str(tmp_path_factory.mktemp("v") / "v.vramtop")
    rec = Recorder(path, commit_interval=0.0)
    for t in ts:
        for kind in ("hello", "sample", "step", "phase", "oom", "bye"):
            msg = fake_msg(kind, t, blocks=blocks, step=step, phase=text or "forward")
            if kind == "hello":
                msg.update(cmdline=[text], model={"class": text, "params_total": step}, estimate={"peak": text})
            if kind == "oom":
                msg["segments"] = [{"total_size": blocks["other"], "blocks": [{"size": text, "state": "inactive"}]}]
            try:
                validate(msg)
            except SchemaError:
                continue
            try:
                rec.send(msg)
            except Exception:
                pass  # the agent counts these; here only the reader is under test
    rec.close()
    try:
        _read_everything(path)
    except UserError:
        pass
