"""A headless viewer for the fault tests (not a test module): LiveSource -> SessionState -> render.

    python tests/fault_viewer.py TARGET

Prints `live` once it has a hello and a sample, then keeps folding the stream
and rendering every panel (as the TUI does) until it is killed.
"""

import sys
import time

from vramtop.live_source import LiveSource
from vramtop.state import SessionState
from vramtop.tui import render


def main() -> int:
    source = LiveSource(sys.argv[1])
    state = SessionState()
    announced = False
    while True:
        for msg in source.poll():
            state.apply(msg)
        if source.process_gone():
            state.process_gone = True
        render.header(state)
        render.stack(state, 100)
        render.phases(state)
        if not announced and state.hello is not None and state.sample is not None:
            print("live", flush=True)
            announced = True
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
