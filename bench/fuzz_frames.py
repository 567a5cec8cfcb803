"""Coverage-guided fuzzing of the viewer's input path with atheris (optional: `pip install atheris`).

    python bench/fuzz_frames.py -runs=200000          # or -max_total_time=600
    python bench/fuzz_frames.py corpus_dir/ -max_total_time=600

Target: one frame through what `vramtop attach` does with it: schema.decode
(size cap, msgpack without extension types, validation), SessionState.apply
and every render function printed by a Rich console. Anything but a
SchemaError is a crash: atheris stops and writes the input as crash-*.

The seeds are real frames from a real agent (tests/test_hostile_input.py
builds the same ones), so the fuzzer starts from valid messages and mutates
toward the corners. The hypothesis tests in tests/test_hostile_input.py run
in CI; this is the deeper, slower companion (a short run of it is a test
when atheris is installed).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from vramtop.state import SessionState
    from vramtop.tui import render
    from vramtop_agent.schema import SchemaError, decode

from rich.console import Console  # noqa: E402  (not instrumented: not ours)


def _seeds() -> list[bytes]:
    os.environ.setdefault("VRAMTOP_RUNTIME_DIR", tempfile.mkdtemp(prefix="vramtop-fuzz-"))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_hostile_input import _real_frames  # noqa: E402

    return _real_frames()


STATE = SessionState()
CONSOLE = Console(file=io.StringIO(), width=120, force_terminal=True)


def one_frame(data: bytes) -> None:
    global STATE
    try:
        msg = decode(data)
    except SchemaError as exc:
        STATE.reject(str(exc))
        return
    STATE.apply(msg)
    for r in (render.header(STATE), render.stack(STATE, 100), render.fragmentation(STATE, 40),
              render.phases(STATE), render.timeline(STATE, 100, 6)):
        CONSOLE.print(r)
    CONSOLE.file.seek(0)
    CONSOLE.file.truncate()
    if len(STATE.history) > 500:  # keep each run cheap
        STATE = SessionState()


def main() -> None:
    argv = list(sys.argv)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:
        corpus = [tempfile.mkdtemp(prefix="vramtop-fuzz-corpus-")]
        argv.append(corpus[0])
    if os.path.isdir(corpus[0]) and not os.listdir(corpus[0]):  # an empty corpus starts from real frames
        for i, frame in enumerate(_seeds()):
            with open(os.path.join(corpus[0], f"seed-{i}"), "wb") as fh:
                fh.write(frame)
    atheris.Setup(argv, one_frame)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
