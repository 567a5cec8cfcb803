"""Recording: the agent's stream written to one SQLite file (WAL mode).

The format is documented in docs/recording-format.md. In short: every wire
message becomes one row, with the fields a reader queries on as columns and
the full message as a msgpack BLOB (never pickle: a recording is untrusted
input for whoever opens it). Tables: meta, sessions, samples, steps, events,
allocator_snapshots.

A Recorder is a sink of the Agent: the agent's sampler thread calls
`send(msg)` (about 10 times a second) and `close()` at stop. Rows are batched
in memory and committed at least every `commit_interval` seconds (0.25 s), so
a SIGKILLed job loses at most the last commit interval plus one sample
period. WAL with synchronous=NORMAL survives a killed process (only a power
loss can drop the last commits); readers can open the file while it is
being written.

Failures never reach the training job. `send()` raises RecorderError when a
commit fails (disk full, file removed, I/O error); the Agent counts and
reports it. After `max_failures` consecutive failures the recorder gives up:
it raises one last time and then drops everything quietly. What was
committed before stays intact (SQLite transactions are atomic). A busy file
(another rank writing the same recording) is not a failure: rows wait for
the next commit.

The path may contain {pid}, {rank} and {host}: `VRAMTOP_RECORD=run-{rank}.vramtop`
gives each rank its own file. Several writers may also share one file; each
process adds its own sessions.
"""

from __future__ import annotations

import atexit
import os
import socket
import sqlite3
import threading
import time
import weakref
from typing import Any

import msgpack

from vramtop_agent.creep import CreepWatch
from vramtop_agent.recording_tables import create_statements, insert_sql
from vramtop_agent.schema import BLOCK_KEYS, SCHEMA_VERSION

FORMAT_NAME = "vramtop-recording"
# Bump RECORDING_SCHEMA_VERSION on every change of the tables. Bump
# COMPATIBLE_VERSION only when an older reader would misread the new file
# (a column changing meaning, a table removed); adding columns or tables
# keeps it, so older readers still open newer files and ignore what they
# do not know.
# 2: `creep` events (vramtop_agent.creep) in the events table; a format-1 reader skips and reports them.
RECORDING_SCHEMA_VERSION = 2
COMPATIBLE_VERSION = 1

SQLITE_MAGIC = b"SQLite format 3\x00"


# The row tuples of _sample_row, _step_row and _event_row follow these columns (recording_tables.TABLES).
_INSERT_SAMPLE = insert_sql("samples")
_INSERT_STEP = insert_sql("steps")
_INSERT_EVENT = insert_sql("events")
_INSERT_SNAPSHOT = insert_sql("allocator_snapshots")
_INSERT_SESSION = insert_sql("sessions", ("pid", "rank", "start_time", "first_t", "last_t"))

SEGMENTS_FORMAT = "vramtop-segments/1"  # msgpack list of segment maps, see docs/recording-format.md


class RecorderError(RuntimeError):
    """Recording failed; the Agent counts and reports it, the job never sees it."""


def pack(obj: Any) -> bytes:
    """msgpack with a fallback that turns unknown objects (numpy scalars, dtypes) into plain values."""
    return msgpack.packb(obj, use_bin_type=True, default=_plain)


def _plain(obj: Any) -> Any:
    for cast in (int, float):
        try:
            if hasattr(obj, "item"):
                v = obj.item()
                if isinstance(v, (int, float, str, bool)):
                    return v
            return cast(obj)
        except Exception:
            continue
    return str(obj)


def expand_path(path: str, pid: int | None = None, rank: int | None = None) -> str:
    """Fill {pid}, {rank} and {host} in a recording path."""
    path = os.fspath(path)
    if "{" not in path:
        return path
    values = {
        "pid": os.getpid() if pid is None else pid,
        "rank": int(os.environ.get("RANK", "0") or 0) if rank is None else rank,
        "host": socket.gethostname(),
    }
    for key, value in values.items():
        path = path.replace("{" + key + "}", str(value))
    return path


_I64 = (1 << 63) - 1


def _int(x: Any) -> int | None:
    """A column integer: SQLite holds 64-bit signed; anything else is stored as NULL (the BLOB keeps it)."""
    if type(x) is int:  # (the usual case first: this runs for several columns of every row)
        return x if -_I64 <= x <= _I64 else None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    if isinstance(x, float):
        if x != x or abs(x) > 9e18:
            return None
        x = int(x)
    return x if -_I64 <= x <= _I64 else None


def _num(x: Any) -> float | None:
    if type(x) is float:
        return x if x - x == 0.0 else None  # (nan and inf give nan)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:
        return None
    return x if x == x and abs(x) != float("inf") else None


def _str(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def _dict(x: Any) -> dict:
    """A nested wire object, or {} where the message has something else (or nothing) there."""
    return x if isinstance(x, dict) else {}


_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()
_ATEXIT_SET = False


def _forget_after_fork() -> None:
    # A forked child's copies of the parent's recorders must never write: their rows are the parent's.
    _LIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _flush_all_at_exit() -> None:
    for rec in list(_LIVE):
        try:
            rec.flush(timeout=1.0)
        except Exception:
            pass


class Recorder:
    """A sink that writes wire messages to a recording file."""

    def __init__(
        self,
        path: str,
        *,
        writer: str = "agent",
        commit_interval: float = 0.25,
        max_failures: int = 5,
        max_pending: int = 100_000,
        busy_timeout_ms: int = 200,
    ):
        global _ATEXIT_SET
        self.path = os.path.abspath(expand_path(path))
        self.commit_interval = float(commit_interval)
        self.max_failures = int(max_failures)
        self.max_pending = int(max_pending)
        self.failures = 0  # consecutive
        self.total_failures = 0
        self.last_failure: str | None = None
        self.disabled = False
        self.dropped = 0  # rows never written (pending overflow, or given up)
        self.written = 0
        self.unwritable = 0  # messages skipped because msgpack could not encode them
        self.closed = False
        self._pid = os.getpid()  # a forked child's copy writes nothing (see _mine)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict]] = []
        self._last_commit = time.monotonic()
        # (pid, rank) -> [session id, start_time, hello signature]
        self._sessions: dict[tuple[int, int], list] = {}
        # (pid, rank) -> CreepWatch: a recording gets its `creep` events from the writer, whichever it is
        self._creep: dict[tuple, CreepWatch] = {}

        self._check_existing(self.path)
        parent = os.path.dirname(self.path)
        if parent and not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000.0, check_same_thread=False,
                             isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={max(int(busy_timeout_ms), 2000)}")  # setup may wait longer
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            self._init_schema(db, writer)
            db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        except Exception as exc:
            try:
                db.execute("ROLLBACK")
            except Exception:
                pass
            db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise RecorderError(f"cannot record to {self.path}: {exc}") from None
            raise
        self._db = db
        st = os.stat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        self._rseq = self._max_rseq()
        _LIVE.add(self)
        if not _ATEXIT_SET:
            atexit.register(_flush_all_at_exit)
            _ATEXIT_SET = True

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _check_existing(path: str) -> None:
        """Refuse to write into a file that is not a recording (never clobber a user's file)."""
        try:
            size = os.path.getsize(path)
        except OSError:
            return
        if size == 0:
            return
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head != SQLITE_MAGIC:
            raise RecorderError(f"{path} exists and is not a vramtop recording; not overwriting it")

    def _init_schema(self, db: sqlite3.Connection, writer: str) -> None:
        """Inside the BEGIN IMMEDIATE transaction opened by __init__."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise RecorderError(f"{self.path} is an SQLite database but not a vramtop recording; not writing to it")
        if "meta" in tables:
            meta: dict[str, str] = dict(db.execute("SELECT key, value FROM meta").fetchall())  # TEXT NOT NULL
            if meta.get("format") != FORMAT_NAME:
                raise RecorderError(f"{self.path} is not a vramtop recording; not writing to it")
            try:
                compat = int(meta.get("compatible_version", meta.get("schema_version", "0")))
            except ValueError:
                compat = 1 << 30
            if compat > RECORDING_SCHEMA_VERSION:
                raise RecorderError(f"{self.path} was written by a newer vramtop (format {compat}); not appending")
        for stmt in create_statements():
            db.execute(stmt)
        now = repr(time.time())
        defaults = {
            "format": FORMAT_NAME,
            "schema_version": str(RECORDING_SCHEMA_VERSION),
            "compatible_version": str(COMPATIBLE_VERSION),
            "wire_schema_version": str(SCHEMA_VERSION),
            "created": now,
            "writer": writer,
            "writer_version": _agent_version(),
            "hostname": socket.gethostname(),
        }
        db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", list(defaults.items()))
        # Appending to an older file adds what this version writes: say so.
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
                   (str(RECORDING_SCHEMA_VERSION), RECORDING_SCHEMA_VERSION))
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_opened', ?)", (now,))
        db.execute("COMMIT")

    def _max_rseq(self) -> int:
        best = 0
        for table in ("samples", "steps", "events"):
            row = self._db.execute(f"SELECT max(rseq) FROM {table}").fetchone()
            if row and row[0] is not None:
                best = max(best, int(row[0]))
        return best

    # ------------------------------------------------------------------ sink API

    def send(self, msg: dict) -> None:
        """Queue one message; commit when the interval has passed. Raises RecorderError on a failed commit."""
        self.send_many([msg])

    def send_many(self, msgs: list[dict]) -> None:
        """Queue every message; a failed commit is raised once the rest are queued (Sink interface).

        The agent's I/O thread hands a batch per tick, and everything here holds the GIL the training
        thread needs: one lock for the batch, and the creep detector only sees what it folds."""
        if self.disabled or self.closed or not self._mine():
            return
        with self._lock:
            pending = self._pending
            for msg in msgs:
                if not isinstance(msg, dict):
                    self.unwritable += 1
                    self.dropped += 1
                    continue
                kind = msg.get("type", "")
                if len(pending) >= self.max_pending:
                    pending.pop(0)
                    self.dropped += 1
                pending.append((kind, msg))
                if kind != "phase" or (msg.get("phase") == "optimizer" and msg.get("edge") == "end"):
                    for event in self._creep_events(msg):
                        pending.append(("creep", event))
            if time.monotonic() - self._last_commit >= self.commit_interval:
                self._commit_locked()

    def _creep_events(self, msg: dict) -> list[dict]:
        key = (msg.get("pid"), msg.get("rank"))
        watch = self._creep.get(key)
        if watch is None:
            watch = self._creep[key] = CreepWatch(track_current=False)
        try:
            return watch.feed(msg)
        except Exception:  # detection is a bonus: it never costs the recording
            return []

    def flush(self, timeout: float | None = None) -> None:
        """Commit what is pending now (callable from any thread)."""
        if self.disabled or self.closed or not self._mine():
            return
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            self._commit_locked()
        finally:
            self._lock.release()

    def close(self) -> None:
        """Commit, checkpoint the WAL into the main file and close. Never raises."""
        if not self._mine():
            return  # a forked child: the connection and the rows are the parent's
        with self._lock:
            if self.closed:
                return
            try:
                if not self.disabled:
                    try:
                        self._commit_locked()
                    except RecorderError:
                        pass
                if not self.disabled:
                    try:
                        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except Exception:
                        pass
            finally:
                self.closed = True
                try:
                    self._db.close()
                except Exception:
                    pass
                _LIVE.discard(self)

    def _mine(self) -> bool:
        return os.getpid() == self._pid

    # ------------------------------------------------------------------ writing

    def _file_gone(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._ino

    def _commit_locked(self) -> None:
        self._last_commit = time.monotonic()
        if not self._pending:
            return
        if self._file_gone():
            # SQLite would go on writing into the unlinked inode: nobody could ever read it.
            n = len(self._pending)
            self._pending.clear()
            self._give_up(f"recording file {self.path} was removed or replaced; {n} rows dropped")
        batch = self._pending
        self._pending = []
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                self._pending = batch + self._pending  # another writer holds the file: next time
                return
            self._pending = batch
            self._failed(exc)
            return
        try:
            n = self._write_batch(db, batch)
            db.execute("COMMIT")
        except BaseException as exc:
            try:
                db.execute("ROLLBACK")
            except Exception:
                pass
            if not isinstance(exc, Exception):  # KeyboardInterrupt & co: keep the rows, let it through
                for key in [k for k, v in self._sessions.items() if v[3]]:
                    del self._sessions[key]
                self._pending = batch + self._pending
                raise
            # Sessions inserted in the rolled-back transaction no longer exist.
            for key in [k for k, v in self._sessions.items() if v[3]]:
                del self._sessions[key]
            for v in self._sessions.values():
                v[2] = None  # the hello update was rolled back too: store it again
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                self._pending = batch + self._pending
                return
            if isinstance(exc, sqlite3.OperationalError):
                # Disk full, I/O error: keep the rows for a retry (space may come back), within the pending cap.
                self._pending = (batch + self._pending)[-self.max_pending:]
            else:
                self.dropped += len(batch)  # rows SQLite refuses would fail every retry: drop them
            self._failed(exc)
            return
        for v in self._sessions.values():
            v[3] = False
        self.written += n
        self.failures = 0

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.total_failures += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"
        if self.failures >= self.max_failures:
            self._give_up(f"recording to {self.path} stopped after {self.failures} failures: {self.last_failure}")
        raise RecorderError(f"recording to {self.path} failed ({self.failures}/{self.max_failures}): "
                            f"{self.last_failure}")

    def _give_up(self, why: str) -> None:
        self.disabled = True
        self.dropped += len(self._pending)
        self._pending = []
        self.last_failure = why
        try:
            self._db.close()
        except Exception:
            pass
        _LIVE.discard(self)
        raise RecorderError(why)

    def _next_rseq(self) -> int:
        self._rseq += 1
        return self._rseq

    def _write_batch(self, db: sqlite3.Connection, batch: list[tuple[str, dict]]) -> int:
        samples, steps, events = [], [], []
        snapshots: list[tuple[int, dict]] = []  # (index into events, oom msg)
        last_t: dict[int, float] = {}
        for kind, msg in batch:
            sid = self._session_for(db, msg)
            t = _num(msg.get("t")) or 0.0
            last_t[sid] = max(last_t.get(sid, t), t)
            try:
                if kind == "sample":
                    samples.append(self._sample_row(sid, t, msg))
                elif kind == "step":
                    steps.append(self._step_row(sid, t, msg))
                elif kind == "hello":
                    row = self._hello_row(db, sid, t, msg)
                    if row is not None:
                        events.append(row)
                elif kind == "oom" and isinstance(msg.get("segments"), list):
                    body = {k: v for k, v in msg.items() if k != "segments"}
                    body["segments_stored"] = True
                    segs = pack(msg["segments"])
                    events.append(self._event_row(sid, t, kind, body))
                    snapshots.append((len(events) - 1, {"step": msg.get("step"), "packed": segs}))
                else:
                    events.append(self._event_row(sid, t, kind, msg))
            except (TypeError, ValueError, OverflowError):
                self.unwritable += 1  # a message msgpack cannot carry: skip it, keep the batch
                self.dropped += 1
        if samples:
            db.executemany(_INSERT_SAMPLE, samples)
        if steps:
            db.executemany(_INSERT_STEP, steps)
        if events:
            if snapshots:
                for i, row in enumerate(events):
                    cur = db.execute(_INSERT_EVENT, row)
                    for idx, msg in snapshots:
                        if idx == i:
                            db.execute(
                                _INSERT_SNAPSHOT,
                                (row[1], row[2], cur.lastrowid, _int(msg.get("step")), SEGMENTS_FORMAT,
                                 msg["packed"]))
            else:
                db.executemany(_INSERT_EVENT, events)
        for sid, t in last_t.items():
            db.execute("UPDATE sessions SET last_t = max(coalesce(last_t, 0), ?) WHERE id = ?", (t, sid))
        return len(samples) + len(steps) + len(events)

    # ------------------------------------------------------------------ rows

    def _session_for(self, db: sqlite3.Connection, msg: dict) -> int:
        pid, rank = msg.get("pid"), msg.get("rank")
        if type(pid) is int and type(rank) is int and msg.get("type") != "hello":
            entry = self._sessions.get((pid, rank))  # (every row asks: the known session first)
            if entry is not None:
                return entry[0]
        pid, rank = _int(pid) or 0, _int(rank) or 0
        key = (pid, rank)
        entry = self._sessions.get(key)
        if msg.get("type") == "hello" and entry is not None and entry[1] is not None:
            start = _num(msg.get("start_time"))
            if start is not None and abs(start - entry[1]) > 1e-6:
                entry = None  # same pid/rank, new agent: a new session
        if entry is None:
            start = _num(msg.get("start_time")) if msg.get("type") == "hello" else None
            t = _num(msg.get("t"))
            cur = db.execute(_INSERT_SESSION,
                             (pid, rank, start, t, t))
            # [id, start_time, hello signature, created in the open transaction]
            entry = [cur.lastrowid, start, None, True]
            self._sessions[key] = entry
        return entry[0]

    def _hello_row(self, db: sqlite3.Connection, sid: int, t: float, msg: dict):
        """Update the session's metadata; store the hello as an event only when it changed."""
        entry = self._sessions[(_int(msg.get("pid")) or 0, _int(msg.get("rank")) or 0)]
        sig = pack({k: v for k, v in msg.items() if k not in ("t", "eseq")})
        if sig == entry[2]:
            return None
        entry[2] = sig
        if entry[1] is None:
            entry[1] = _num(msg.get("start_time"))
        model = _dict(msg.get("model"))
        cmd = msg.get("cmdline")
        cmdline = " ".join(str(c) for c in cmd) if isinstance(cmd, (list, tuple)) else None
        db.execute(
            "UPDATE sessions SET host=?, cmdline=?, device=?, device_name=?, device_total=?, model_class=?,"
            " params_total=?, params_trainable=?, start_time=?, hello=? WHERE id=?",
            (_str(msg.get("host")), cmdline, _str(msg.get("device")), _str(msg.get("device_name")),
             _int(msg.get("device_total")), _str(model.get("class")), _int(model.get("params_total")),
             _int(model.get("params_trainable")), _num(msg.get("start_time")), pack(msg), sid))
        return self._event_row(sid, t, "hello", msg)

    def _sample_row(self, sid: int, t: float, msg: dict) -> tuple:
        blocks = _dict(msg.get("blocks"))
        vals = [_int(blocks.get(k)) for k in BLOCK_KEYS]
        total = sum(v for v in vals if v is not None)
        cuda = _dict(msg.get("cuda"))
        host = _dict(msg.get("host"))
        return (self._next_rseq(), sid, t, _int(msg.get("seq")), _int(msg.get("step")), _str(msg.get("phase")),
                _str(msg.get("device")), *vals, total, _int(cuda.get("allocated")), _int(cuda.get("reserved")),
                _int(host.get("rss")), pack(msg))

    def _step_row(self, sid: int, t: float, msg: dict) -> tuple:
        peaks = _dict(msg.get("peaks"))
        pb = _dict(msg.get("peak_blocks"))
        batch = msg.get("batch")
        if not isinstance(batch, (list, tuple)):
            batch = []
        return (self._next_rseq(), sid, t, _int(msg.get("step")), _num(msg.get("step_time")),
                _int(msg.get("micro_steps")), _int(batch[0]) if len(batch) > 0 else None,
                _int(batch[1]) if len(batch) > 1 else None,
                _int(peaks.get("forward")), _int(peaks.get("backward")), _int(peaks.get("optimizer")),
                _int(msg.get("peak")), _str(msg.get("peak_phase")), _int(msg.get("end_of_forward")),
                _int(msg.get("backward_spike")), *[_int(pb.get(k)) for k in BLOCK_KEYS], pack(msg))

    def _event_row(self, sid: int, t: float, kind: str, msg: dict) -> tuple:
        return (self._next_rseq(), sid, t, kind, _int(msg.get("eseq")), _int(msg.get("step")),
                _str(msg.get("phase")), pack(msg))


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _agent_version() -> str:
    try:
        from vramtop_agent import __version__

        return __version__
    except Exception:
        return "?"
