"""The recording's tables, declared once (docs/recording-format.md).

The writer's CREATE TABLE and INSERT statements (vramtop_agent.recorder) and
the reader's column lists and SQL types (vramtop.recording) are all derived
from TABLES, so a column cannot be written under one name and read under
another, or written and never read. The order of a table's columns is the
order of the values in the writer's row tuples.
"""

from __future__ import annotations

from vramtop_agent.vocabulary import BLOCK_KEYS

# table -> ((column, SQL declaration), ...); the first word of a declaration is the column's type.
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "meta": (
        ("key", "TEXT PRIMARY KEY"),
        ("value", "TEXT NOT NULL"),
    ),
    "sessions": (
        ("id", "INTEGER PRIMARY KEY"),
        ("pid", "INTEGER NOT NULL"),
        ("rank", "INTEGER NOT NULL"),
        ("host", "TEXT"),
        ("cmdline", "TEXT"),
        ("device", "TEXT"),
        ("device_name", "TEXT"),
        ("device_total", "INTEGER"),
        ("model_class", "TEXT"),
        ("params_total", "INTEGER"),
        ("params_trainable", "INTEGER"),
        ("start_time", "REAL"),
        ("first_t", "REAL"),
        ("last_t", "REAL"),
        ("hello", "BLOB"),
    ),
    "samples": (
        ("id", "INTEGER PRIMARY KEY"),
        ("rseq", "INTEGER NOT NULL"),
        ("session", "INTEGER NOT NULL"),
        ("t", "REAL NOT NULL"),
        ("seq", "INTEGER"),
        ("step", "INTEGER"),
        ("phase", "TEXT"),
        ("device", "TEXT"),
        *((k, "INTEGER") for k in BLOCK_KEYS),
        ("total", "INTEGER"),
        ("allocated", "INTEGER"),
        ("reserved", "INTEGER"),
        ("rss", "INTEGER"),
        ("msg", "BLOB NOT NULL"),
    ),
    "steps": (
        ("id", "INTEGER PRIMARY KEY"),
        ("rseq", "INTEGER NOT NULL"),
        ("session", "INTEGER NOT NULL"),
        ("t", "REAL NOT NULL"),
        ("step", "INTEGER"),
        ("step_time", "REAL"),
        ("micro_steps", "INTEGER"),
        ("batch", "INTEGER"),
        ("seq_len", "INTEGER"),
        ("forward_peak", "INTEGER"),
        ("backward_peak", "INTEGER"),
        ("optimizer_peak", "INTEGER"),
        ("peak", "INTEGER"),
        ("peak_phase", "TEXT"),
        ("end_of_forward", "INTEGER"),
        ("backward_spike", "INTEGER"),
        *((f"peak_{k}", "INTEGER") for k in BLOCK_KEYS),
        ("msg", "BLOB NOT NULL"),
    ),
    "events": (
        ("id", "INTEGER PRIMARY KEY"),
        ("rseq", "INTEGER NOT NULL"),
        ("session", "INTEGER NOT NULL"),
        ("t", "REAL NOT NULL"),
        ("type", "TEXT NOT NULL"),
        ("eseq", "INTEGER"),
        ("step", "INTEGER"),
        ("phase", "TEXT"),
        ("msg", "BLOB NOT NULL"),
    ),
    "allocator_snapshots": (
        ("id", "INTEGER PRIMARY KEY"),
        ("session", "INTEGER NOT NULL"),
        ("t", "REAL NOT NULL"),
        ("event", "INTEGER"),
        ("step", "INTEGER"),
        ("format", "TEXT NOT NULL"),
        ("data", "BLOB NOT NULL"),
    ),
}

# (index, table, columns): the queries readers make by time, step and peak.
INDEXES = (
    ("samples_t", "samples", "t"),
    ("samples_step", "samples", "step"),
    ("samples_total", "samples", "total DESC, t"),
    ("steps_t", "steps", "t"),
    ("steps_step", "steps", "step"),
    ("steps_peak", "steps", "peak DESC, t"),
    ("events_t", "events", "t"),
    ("events_type", "events", "type"),
    ("events_step", "events", "step"),
)


def columns(table: str) -> tuple[str, ...]:
    return tuple(name for name, _ in TABLES[table])


def column_types() -> dict[str, str]:
    """column -> INTEGER / REAL / TEXT / BLOB; a name means the same type in every table."""
    out: dict[str, str] = {}
    for cols in TABLES.values():
        for name, decl in cols:
            kind = decl.split()[0]
            if out.setdefault(name, kind) != kind:
                raise AssertionError(f"column {name} declared {out[name]} and {kind}")
    return out


def create_statements() -> list[str]:
    """Every CREATE TABLE / CREATE INDEX, in order (IF NOT EXISTS: appending to a file runs them again)."""
    out = []
    for table, cols in TABLES.items():
        body = ",\n".join(f"    {name} {decl}" for name, decl in cols)
        out.append(f"CREATE TABLE IF NOT EXISTS {table} (\n{body}\n)")
    out += [f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({cols})" for name, table, cols in INDEXES]
    return out


def insert_sql(table: str, cols: tuple[str, ...] | None = None) -> str:
    """INSERT of the given columns, by default every column but the row id (in declaration order)."""
    cols = cols or tuple(c for c in columns(table) if c != "id")
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({','.join('?' * len(cols))})"
