"""Reading a recording (see docs/recording-format.md), also one still being written.

A recording is untrusted input: it may come from another machine, be
truncated by a full disk, or be something else entirely. So:

- the file is opened read-only (`mode=ro`; WAL files are read concurrently
  with a writer, never modified);
- message BLOBs are decoded with msgpack only (no pickle, no extension types)
  and validated against the wire schema; a row that fails is skipped and
  counted, never loaded;
- a file that is not a recording, or one written by a newer, incompatible
  vramtop, is refused with a UserError (one line); a damaged file yields what
  can be read, and `problems` says what was skipped (one line via
  `problem_line()`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from vramtop.errors import UserError
from vramtop_agent import recording_tables
from vramtop_agent.recorder import FORMAT_NAME, RECORDING_SCHEMA_VERSION, SQLITE_MAGIC
from vramtop_agent.recording_tables import column_types, columns
from vramtop_agent.schema import SCHEMA_VERSION, SchemaError, unpack_strict, validate
from vramtop_agent.vocabulary import BLOCK_KEYS, is_number

MAX_BLOB_BYTES = 64 * 1024 * 1024
# What a damaged file can make the sqlite3 module raise: its own errors, undecodable text (also in
# SQLite's error messages), and absurd sizes.
DB_ERRORS = (sqlite3.Error, UnicodeDecodeError, ValueError, OverflowError, MemoryError)
TABLES = tuple(recording_tables.TABLES)

# The column lists come from the writer's declaration (vramtop_agent.recording_tables); the message BLOB
# is read with samples() / steps(), not with the row tuples.
SAMPLE_COLUMNS = tuple(c for c in columns("samples") if c != "msg")
STEP_COLUMNS = tuple(c for c in columns("steps") if c != "msg")
SESSION_COLUMNS = columns("sessions")
_TYPES = column_types()


def _sel(*cols: str) -> str:
    """Column list with types enforced by SQLite (the file may hold anything in any column)."""
    out = []
    for c in cols:
        kind = _TYPES[c]
        if kind == "BLOB":
            out.append(c)
        elif c == "t":
            out.append("coalesce(CAST(t AS REAL), 0.0)")
        else:
            out.append(f"CAST({c} AS {kind})")
    return ", ".join(out)


def unpack_blob(blob: Any) -> Any:
    """msgpack only (the wire schema's strict decoder: no extension types), no pickle, bounded size.
    Raises ValueError."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError("not a BLOB")
    blob = bytes(blob)
    if len(blob) > MAX_BLOB_BYTES:
        raise ValueError("BLOB too large")
    if blob[:1] == b"\x80" and len(blob) > 2 and blob[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise ValueError("a pickle, not msgpack (refused)")
    try:
        return unpack_strict(blob)
    except SchemaError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class Session:
    id: int
    pid: int
    rank: int
    host: str | None = None
    cmdline: str | None = None
    device: str | None = None
    device_name: str | None = None
    device_total: int | None = None
    model_class: str | None = None
    params_total: int | None = None
    params_trainable: int | None = None
    start_time: float | None = None
    first_t: float | None = None
    last_t: float | None = None
    hello: dict | None = None


@dataclass
class Peak:
    level: int
    t: float | None
    step: int | None
    phase: str | None
    blocks: dict = field(default_factory=dict)
    session: int | None = None
    source: str = "samples"  # "samples" (the sampled level) or "steps" (a step's phase peak)


def _header_problem(path: str, head: bytes, size: int) -> str | None:
    """A truncation the SQLite header reveals (only meaningful when no WAL holds newer pages)."""
    if len(head) < 100:
        return f"truncated ({size} bytes)"
    page_size = struct.unpack(">H", head[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return "corrupt header (page size)"
    change, pages, valid_for = (struct.unpack(">I", head[o:o + 4])[0] for o in (24, 28, 92))
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        return None
    if change == valid_for and pages and size < pages * page_size:
        return f"truncated ({size} of {pages * page_size} bytes)"
    if size % page_size:
        return f"truncated ({size} bytes is not a whole number of pages)"
    return None


class Recording:
    """A read-only view of one recording file."""

    def __init__(self, path: str, db: sqlite3.Connection, meta: dict, notes: list[str],
                 problems: collections.Counter):
        self.path = path
        self.db = db
        self.meta = meta
        self.notes = notes  # informational (written by a newer vramtop, read without the WAL, ...)
        self.problems = problems  # reason -> count of things skipped
        self.schema_version = int(meta.get("schema_version", "0") or 0)
        self._tables = self._existing_tables()
        self._snapshots_cache: dict[int, list | None] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str) -> Recording:
        path = os.fspath(path)
        name = os.path.basename(path) or path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if not os.path.isfile(path):
            raise UserError(f"{path}: not a file")
        if st.st_size == 0:
            raise UserError(f"{name}: empty file, not a vramtop recording")
        try:
            with open(path, "rb") as fh:
                head = fh.read(100)
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if head[:16] != SQLITE_MAGIC[: len(head[:16])] or len(head) < 16:
            raise UserError(f"{name}: not a vramtop recording (not an SQLite database)")
        problems: collections.Counter = collections.Counter()
        notes: list[str] = []
        hp = _header_problem(path, head, st.st_size)
        if hp:
            if len(head) < 100:
                raise UserError(f"{name}: not a readable recording: {hp}")
            problems[hp] += 1
        db = cls._connect(path, notes)
        try:
            try:
                names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            except DB_ERRORS as exc:
                raise UserError(f"{name}: not a readable recording ({_one_line(exc)})") from None
            if "meta" not in names:
                raise UserError(f"{name}: not a vramtop recording (an SQLite database without vramtop's tables)")
            try:
                meta = {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
            except DB_ERRORS as exc:
                raise UserError(f"{name}: not a readable recording ({_one_line(exc)})") from None
            if meta.get("format") != FORMAT_NAME:
                raise UserError(f"{name}: not a vramtop recording (format {meta.get('format', '?')[:40]!r})")
            try:
                version = int(meta.get("schema_version", ""))
                compat = int(meta.get("compatible_version", str(version)))
            except ValueError:
                raise UserError(f"{name}: damaged recording (no format version)") from None
            if compat > RECORDING_SCHEMA_VERSION:
                raise UserError(
                    f"{name}: recorded by a newer vramtop (recording format {version}, needs a reader of format "
                    f">= {compat}; this vramtop reads format {RECORDING_SCHEMA_VERSION}): upgrade vramtop")
            if version > RECORDING_SCHEMA_VERSION:
                notes.append(f"recorded by a newer vramtop (format {version}); what it added is ignored")
            if version < 1:
                raise UserError(f"{name}: damaged recording (format version {version})")
        except BaseException:
            db.close()
            raise
        rec = cls(path, db, meta, notes, problems)
        missing = [t for t in TABLES if t not in rec._tables]
        if missing:
            problems[f"missing tables: {', '.join(missing)}"] += 1
        return rec

    @staticmethod
    def _connect(path: str, notes: list[str]) -> sqlite3.Connection:
        uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=2.0)
            db.text_factory = _text
            db.execute("PRAGMA query_only=1")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except DB_ERRORS as exc:
            if "unable to open" not in str(exc) and "readonly" not in str(exc):
                raise UserError(f"{os.path.basename(path)}: not a readable recording ({_one_line(exc)})") from None
        # A WAL file we may not open read-write (read-only directory): read the main file alone.
        try:
            db = sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False)
            db.text_factory = _text
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            notes.append("read without its -wal file (no write access to its directory): "
                         "the last seconds may be missing")
            return db
        except DB_ERRORS as exc:
            raise UserError(f"{os.path.basename(path)}: cannot open ({_one_line(exc)})") from None

    def close(self) -> None:
        try:
            self.db.close()
        except Exception:
            pass

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _existing_tables(self) -> set:
        try:
            return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except DB_ERRORS:
            return set()

    # ------------------------------------------------------------------ problems

    def problem_line(self) -> str | None:
        """One line describing what was skipped, or None when the file read cleanly."""
        if not self.problems:
            return None
        parts = [f"{reason}" + (f" ({n}x)" if n > 1 else "") for reason, n in self.problems.most_common(3)]
        more = len(self.problems) - 3
        if more > 0:
            parts.append(f"{more} more kinds")
        return f"{os.path.basename(self.path)}: damaged recording, showing what could be read: " + "; ".join(parts)

    def _problem(self, reason: str) -> None:
        self.problems[reason[:160]] += 1

    def _query(self, sql: str, params: tuple = (), chunk: int = 2000) -> Iterator[tuple]:
        """Rows of a query; a damaged page ends it (counted), never raises."""
        table = next((t for t in TABLES if f"FROM {t}" in sql), None)
        if table is not None and table not in self._tables:
            return
        try:
            cur = self.db.execute(sql, params)
            while True:
                rows = cur.fetchmany(chunk)
                if not rows:
                    return
                yield from rows
        except DB_ERRORS as exc:
            self._problem(f"unreadable {table or 'data'}: {_one_line(exc)}")

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        for row in self._query(sql, params):
            return row
        return None

    def _decode(self, blob: Any, what: str) -> dict | None:
        try:
            msg = unpack_blob(blob)
        except ValueError as exc:
            self._problem(f"{what}: {exc}")
            return None
        try:
            return validate(msg)
        except SchemaError as exc:
            text = str(exc)
            if "newer than" in text:
                self._problem(f"{what}: written with a newer wire schema than {SCHEMA_VERSION}")
            else:
                self._problem(f"{what}: invalid message ({text[:80]})")
            return None

    # ------------------------------------------------------------------ metadata

    def sessions(self) -> list[Session]:
        out = []
        for row in self._query(f"SELECT {_sel(*SESSION_COLUMNS)} FROM sessions ORDER BY id"):
            s = Session(**dict(zip(SESSION_COLUMNS, row)))
            if s.hello is not None:
                s.hello = self._decode(s.hello, "session hello")
            out.append(s)
        return out

    def session(self, session: int | None = None) -> Session | None:
        sessions = self.sessions()
        if session is None:
            return sessions[0] if sessions else None
        return next((s for s in sessions if s.id == session), None)

    def span(self, session: int | None = None) -> tuple[float, float] | None:
        """(first t, last t) of the recorded data."""
        lo: float | None = None
        hi: float | None = None
        for table in ("samples", "steps", "events"):
            # Walk the t index from each end (min and max in one query, or with a WHERE, scan the table).
            if session is None:
                first = self._one(f"SELECT t FROM {table} ORDER BY t LIMIT 1")
                last = self._one(f"SELECT t FROM {table} ORDER BY t DESC LIMIT 1")
            else:
                first = self._one(f"SELECT t FROM {table} WHERE session = ? ORDER BY t LIMIT 1", (session,))
                last = self._one(f"SELECT t FROM {table} WHERE session = ? ORDER BY t DESC LIMIT 1", (session,))
            row = (first[0], last[0]) if first and last else None
            a, b = (_f(row[0]), _f(row[1])) if row else (None, None)
            if a is not None and b is not None:
                lo = a if lo is None else min(lo, a)
                hi = b if hi is None else max(hi, b)
        return None if lo is None or hi is None else (lo, hi)  # both set together

    def counts(self) -> dict[str, int]:
        out = {}
        for table in ("sessions", "samples", "steps", "events", "allocator_snapshots"):
            row = self._one(f"SELECT count(*) FROM {table}")
            out[table] = int(row[0]) if row else 0
        return out

    # ------------------------------------------------------------------ samples

    def _where(self, session, t0, t1, extra: str = "", after: bool = False) -> tuple[str, tuple]:
        conds, params = [], []
        if t0 is not None:
            conds.append("t > ?" if after else "t >= ?")
            params.append(float(t0))
        if t1 is not None:
            conds.append("t <= ?")
            params.append(float(t1))
        if session is not None:
            conds.append("session = ?")
            params.append(int(session))
        if extra:
            conds.append(extra)
        return (" WHERE " + " AND ".join(conds)) if conds else "", tuple(params)

    def iter_sample_rows(self, t0: float | None = None, t1: float | None = None,
                         session: int | None = None) -> Iterator[tuple]:
        """Column tuples (SAMPLE_COLUMNS) in time order, without decoding messages: for plots and exports."""
        where, params = self._where(session, t0, t1)
        return self._query(f"SELECT {_sel(*SAMPLE_COLUMNS)} FROM samples{where} ORDER BY t, rseq", params)

    def sample_rows(self, t0: float | None = None, t1: float | None = None, session: int | None = None) -> list[tuple]:
        return list(self.iter_sample_rows(t0, t1, session))

    def sample_buckets(self, n: int, session: int | None = None) -> list[tuple]:
        """At most about n column tuples over the whole run: in each time bucket, the sample with the
        highest total (peaks survive the reduction). Grouped inside SQLite: a day of samples stays on disk."""
        span = self.span(session)
        if span is None:
            return []
        where, params = self._where(session, None, None)
        count = self._one(f"SELECT count(*) FROM samples{where}", params)
        if not count or count[0] <= n:
            return self.sample_rows(session=session)
        width = (span[1] - span[0]) / max(n, 1) or 1.0
        rows = self._query(f"SELECT {_sel(*SAMPLE_COLUMNS)}, max(total) FROM samples{where}"
                           f" GROUP BY CAST((t - ?) / ? AS INTEGER) ORDER BY t", params + (span[0], width))
        return [r[:-1] for r in rows]

    def samples(self, t0: float | None = None, t1: float | None = None, session: int | None = None,
                limit: int | None = None) -> Iterator[dict]:
        where, params = self._where(session, t0, t1)
        lim = f" LIMIT {int(limit)}" if limit else ""
        for (blob,) in self._query(f"SELECT msg FROM samples{where} ORDER BY t, rseq{lim}", params):
            msg = self._decode(blob, "sample")
            if msg is not None:
                yield msg

    def sample_at(self, t: float, session: int | None = None) -> dict | None:
        """The last sample at or before t (the first one when t precedes them all)."""
        where, params = self._where(session, None, t)
        for (blob,) in self._query(f"SELECT msg FROM samples{where} ORDER BY t DESC LIMIT 1", params):
            return self._decode(blob, "sample")
        where, params = self._where(session, t, None)
        for (blob,) in self._query(f"SELECT msg FROM samples{where} ORDER BY t LIMIT 1", params):
            return self._decode(blob, "sample")
        return None

    # ------------------------------------------------------------------ steps and events

    def step_rows(self, session: int | None = None, t0: float | None = None, t1: float | None = None) -> list[tuple]:
        where, params = self._where(session, t0, t1)
        return list(self._query(f"SELECT {_sel(*STEP_COLUMNS)} FROM steps{where} ORDER BY t, rseq", params))

    def steps(self, session: int | None = None, t0: float | None = None, t1: float | None = None,
              last: int | None = None) -> list[dict]:
        where, params = self._where(session, t0, t1)
        if last:
            sql = (f"SELECT msg FROM (SELECT msg, t, rseq FROM steps{where} ORDER BY t DESC, rseq DESC"
                   f" LIMIT {int(last)}) ORDER BY t, rseq")
        else:
            sql = f"SELECT msg FROM steps{where} ORDER BY t, rseq"
        out = []
        for (blob,) in self._query(sql, params):
            msg = self._decode(blob, "step")
            if msg is not None:
                out.append(msg)
        return out

    def step_start(self, step: int, session: int | None = None) -> float | None:
        """When step `step` began: its first sample (or the previous step's end)."""
        where, params = self._where(session, None, None, "step >= ?")
        row = self._one(f"SELECT t FROM samples{where} ORDER BY step, t LIMIT 1", params + (int(step),))
        cands: list[float] = []
        if row and (t := _f(row[0])) is not None:
            cands.append(t)
        where, params = self._where(session, None, None, "step = ?")
        row = self._one(f"SELECT min(t) FROM events{where} AND type = 'phase'", params + (int(step) ,))
        if row and (t := _f(row[0])) is not None:
            cands.append(t)
        return min(cands) if cands else None

    def events(self, types: tuple[str, ...] | None = None, session: int | None = None,
               t0: float | None = None, t1: float | None = None) -> list[dict]:
        extra = ""
        params_extra: tuple = ()
        if types:
            extra = "type IN (" + ",".join("?" * len(types)) + ")"
            params_extra = tuple(types)
        where, params = self._where(session, t0, t1, extra)
        # _where puts the extra condition last, so its parameters follow.
        out = []
        for eid, blob in self._query(f"SELECT id, msg FROM events{where} ORDER BY t, rseq", params + params_extra):
            msg = self._event(eid, blob)
            if msg is not None:
                out.append(msg)
        return out

    def _event(self, eid: int, blob: Any) -> dict | None:
        """One stored event; an OOM gets its allocator segment map back from its own table."""
        msg = self._decode(blob, "event")
        if msg is not None and msg.get("type") == "oom" and msg.get("segments_stored"):
            segs = self._segments_for(eid)
            if segs is not None:
                msg["segments"] = segs
        return msg

    def ooms(self, session: int | None = None) -> list[dict]:
        return self.events(("oom",), session=session)

    def _segments_for(self, event_id: int) -> list | None:
        if event_id in self._snapshots_cache:
            return self._snapshots_cache[event_id]
        segs = None
        for fmt, blob in self._query("SELECT format, data FROM allocator_snapshots WHERE event = ?", (event_id,)):
            if fmt != "vramtop-segments/1":
                self._problem(f"allocator snapshot in unknown format {str(fmt)[:30]!r}")
                continue
            try:
                data = unpack_blob(blob)
            except ValueError as exc:
                self._problem(f"allocator snapshot: {exc}")
                continue
            if isinstance(data, list):
                segs = data
        self._snapshots_cache[event_id] = segs
        return segs

    def messages(self, t0: float | None = None, t1: float | None = None, session: int | None = None,
                 phases: bool = True, after: bool = False, with_rseq: bool = False,
                 tables: tuple[str, ...] = ("samples", "steps", "events")) -> list:
        """Every recorded message in [t0, t1] (or (t0, t1] with `after`), in the order the recorder
        received them (replay). With `with_rseq`, (rseq, message) pairs."""
        where, params = self._where(session, t0, t1, after=after)
        rows: list[tuple[int, str, Any, int]] = []
        if "samples" in tables:
            for rseq, blob in self._query(f"SELECT rseq, msg FROM samples{where}", params):
                rows.append((rseq, "sample", blob, 0))
        if "steps" in tables:
            for rseq, blob in self._query(f"SELECT rseq, msg FROM steps{where}", params):
                rows.append((rseq, "step", blob, 0))
        if "events" in tables:
            ewhere, eparams = self._where(session, t0, t1, "" if phases else "type != 'phase'", after=after)
            for rseq, eid, blob in self._query(f"SELECT rseq, id, msg FROM events{ewhere}", eparams):
                rows.append((rseq, "event", blob, eid))
        rows.sort(key=lambda r: r[0])
        out: list = []
        for rseq, what, blob, eid in rows:
            msg = self._decode(blob, what)
            if msg is None:
                continue
            if eid and msg.get("type") == "oom" and msg.get("segments_stored"):
                segs = self._segments_for(eid)
                if segs is not None:
                    msg["segments"] = segs
            out.append((rseq, msg) if with_rseq else msg)
        return out

    def last_events(self, types: tuple[str, ...], before: float, session: int | None = None,
                    limit: int = 50) -> list[tuple[int, dict]]:
        """The newest `limit` events of these types at or before `before`, oldest first, as (rseq, msg)."""
        extra = "type IN (" + ",".join("?" * len(types)) + ")"
        where, params = self._where(session, None, before, extra)
        rows = list(self._query(f"SELECT rseq, id, msg FROM events{where} ORDER BY t DESC, rseq DESC"
                                f" LIMIT {int(limit)}", params + tuple(types)))
        out = []
        for rseq, eid, blob in reversed(rows):
            msg = self._event(eid, blob)
            if msg is not None:
                out.append((rseq, msg))
        return out

    def last_steps(self, before: float, session: int | None = None, limit: int = 200) -> list[tuple[int, dict]]:
        where, params = self._where(session, None, before)
        rows = list(self._query(f"SELECT rseq, msg FROM steps{where} ORDER BY t DESC, rseq DESC LIMIT {int(limit)}",
                                params))
        out = []
        for rseq, blob in reversed(rows):
            msg = self._decode(blob, "step")
            if msg is not None:
                out.append((rseq, msg))
        return out

    # ------------------------------------------------------------------ peaks

    def peak(self, session: int | None = None) -> Peak | None:
        """The highest memory level recorded: a step's phase peak when steps exist, else the highest sample."""
        where, params = self._where(session, None, None)
        best: Peak | None = None
        columns = _sel("id", "t", "step", "phase", "session", "total", *BLOCK_KEYS)
        row = self._one(f"SELECT {columns} FROM samples{where} ORDER BY total DESC, t LIMIT 1", params)
        if row and row[5] is not None:
            # `total` is the blocks' sum; on CUDA "other" is allocated minus the four, so total >= allocated.
            best = Peak(int(row[5]), row[1], row[2], row[3], dict(zip(BLOCK_KEYS, row[6:11])), row[4], "samples")
        columns = _sel("t", "step", "peak_phase", "session", "peak", *("peak_" + k for k in BLOCK_KEYS))
        srow = self._one(f"SELECT {columns} FROM steps{where} ORDER BY peak DESC, t LIMIT 1", params)
        if srow and srow[4] is not None and (best is None or srow[4] >= best.level):
            blocks = dict(zip(BLOCK_KEYS, srow[5:10]))
            # When, within the step: its highest sample, else the step's end.
            t = srow[0]
            inner = self._one("SELECT t FROM samples WHERE step = ? AND session = ? ORDER BY total DESC LIMIT 1",
                              (srow[1], srow[3]))
            if inner and _f(inner[0]) is not None:
                t = _f(inner[0])
            best = Peak(int(srow[4]), t, srow[1], srow[2], blocks, srow[3], "steps")
        return best

    # ------------------------------------------------------------------ checking

    def verify(self, quick_check: bool = True) -> dict[str, int]:
        """Read and decode everything; raise UserError (one line) if anything was damaged. For tests and tools."""
        if quick_check:
            try:
                res = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
                if res != ["ok"]:
                    self._problem("integrity check failed: " + _one_line(" / ".join(map(str, res))))
            except DB_ERRORS as exc:
                self._problem(f"integrity check failed: {_one_line(exc)}")
        counts: collections.Counter[str] = collections.Counter()
        self.sessions()
        for _ in self.samples():
            counts["samples"] += 1
        counts["steps"] = len(self.steps())
        counts["events"] = len(self.events())
        for _ in self._query("SELECT id FROM allocator_snapshots"):
            counts["allocator_snapshots"] += 1
        for eid, in self._query("SELECT event FROM allocator_snapshots"):
            if eid is not None:
                self._segments_for(eid)
        line = self.problem_line()
        if line:
            raise UserError(line)
        return dict(counts)


# What a nonsensical (but msgpack-valid) value can raise in the commands; they turn it into damaged().
DATA_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, ZeroDivisionError)


def open_recording(path: str) -> Recording:
    return Recording.open(path)


def _f(x: Any) -> float | None:
    return float(x) if is_number(x) else None


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _one_line(exc: Any) -> str:
    text = str(exc).replace("\n", " ").strip()
    return text[:160] or type(exc).__name__


def clean(text: Any, limit: int = 200) -> str:
    """A string from a recording, safe to print on a terminal (no control or escape characters)."""
    s = str(text if text is not None else "")
    s = "".join(ch if (ch.isprintable() or ch == " ") else "?" for ch in s)
    return s[:limit]


def damaged(path: str, exc: BaseException):
    """A UserError for data that passed validation but still made no sense (a hand-edited file)."""
    from vramtop.errors import UserError

    return UserError(f"{path}: damaged recording ({type(exc).__name__}: {str(exc)[:100]})")


@contextlib.contextmanager
def reading(path: str, session: int | None = None) -> Iterator[Recording]:
    """A recording opened for a command: the session checked, damage turned into one line, closed after."""
    rec = Recording.open(path)
    try:
        if session is not None and rec.session(session) is None:
            raise UserError(f"{path}: no session {session}")
        yield rec
    except DATA_ERRORS as exc:
        raise damaged(path, exc) from None
    finally:
        rec.close()


def finish(rec: Recording) -> int:
    """The exit code of a command that read `rec`: 2, with the problem said once, when part was unreadable."""
    import sys

    line = rec.problem_line()
    if line:
        print(f"vramtop: {line}", file=sys.stderr)
        return 2
    return 0
