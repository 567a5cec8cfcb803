"""What several test files need, written once.

- Independent reference sums: computed from the tensors, not with the agent's code.
- Waiting: a condition in the Textual pilot's loop (`until`), or in plain time (`wait_for`, `agent_of`).
- Screens: the text of a Textual app's screenshot (`screen_text`).
- Processes and sockets: a job's environment without the caller's vramtop settings (`job_env`), a free
  loopback port (`free_port`), a TCP forwarder that can be cut and that can keep what it carried
  (`TcpForwarder`), and message collection from a real subscriber (`collect`).

Nothing here fakes vramtop: the helpers drive and observe real processes, sockets and apps.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

# ---------------------------------------------------------------------- reference sums


def storage_bytes(tensors):
    """Distinct storages' bytes, keyed by data pointer (a different key than the agent's)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer):
    out = []
    for state in optimizer.state.values():
        out += [v for v in state.values() if hasattr(v, "untyped_storage")]
    return out


# ---------------------------------------------------------------------- waiting


async def until(pilot, cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
                interval: float = 0.1, detail: Callable[[], str] | None = None) -> None:
    """Let the app run (pilot.pause) until cond() holds; AssertionError naming `what` (and detail()) if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(interval)
        if cond():
            return
    raise AssertionError(f"{what}: not met in {timeout:.0f} s" + (f" ({detail()})" if detail else ""))


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", interval: float = 0.05,
             ignore: tuple[type[BaseException], ...] = ()):
    """Poll until predicate() is truthy and return its value; an exception in `ignore` counts as not yet.

    AssertionError naming `what` on timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def agent_of(pid: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> dict:
    """The discovery entry of the agent in process `pid`, once it appears.

    With `proc`, a job that ends before its agent appears fails at once, with its output.
    """
    from vramtop_agent import discovery

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for info in discovery.list_agents():
            if info["pid"] == pid:
                return info
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job ended before its agent appeared: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no agent in pid {pid}")


# ---------------------------------------------------------------------- screens


def screen_text(app) -> str:
    """The app's screen as plain text: the SVG screenshot without tags and entities, runs of blanks as one."""
    text = re.sub(r"<[^>]+>", "", app.export_screenshot()).replace("&#160;", " ").replace("&amp;", "&")
    return re.sub(r"[ \t]+", " ", text)


# ---------------------------------------------------------------------- processes and sockets


def job_env(**extra: str) -> dict:
    """The environment for a job in a subprocess: this one's, less the caller's VRAMTOP* settings.

    VRAMTOP_RUNTIME_DIR stays (each test has its own, so discovery sees only the test's agents).
    Unbuffered output and one thread: the tests read the job's output as it comes, on a shared box.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMTOP") or k == "VRAMTOP_RUNTIME_DIR"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback TCP port nothing listens on (free when asked; a test binds it soon after)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def collect(sub, until: Callable[[list[dict]], Any], timeout: float = 10.0, strict: bool = False) -> list[dict]:
    """Poll a Subscriber until until(messages so far) holds; returns the messages.

    strict: a timeout is an AssertionError (naming the last types seen); otherwise what came is returned,
    for tests whose point is that something does not arrive.
    """
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += sub.poll(50)
        if until(got):
            return got
    if strict:
        raise AssertionError(f"timed out; got {[m['type'] for m in got][-20:]}")
    return got


def types_of(msgs: list[dict]) -> set[str]:
    return {m["type"] for m in msgs}


class TcpForwarder:
    """A TCP forwarder on loopback: a tunnel or a network path that a test can cut, or a tap on the wire.

    port=0 picks a free port (self.port); a fixed port lets a test start a forwarder again where the
    last one was. keep=True keeps a copy of every byte coming back from the target in self.seen: what a
    network observer sees of the target's stream. stop() cuts every connection.
    """

    def __init__(self, target_port: int, port: int = 0, keep: bool = False):
        self.target_port, self.keep = target_port, keep
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.socks: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                a.close()
                continue
            self.socks += [a, b]
            threading.Thread(target=self._pipe, args=(a, b, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(b, a, self.keep), daemon=True).start()

    def _pipe(self, src, dst, keep):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if keep:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side closed: close the other, as a real path would
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self):
        self.stopped = True
        for s in [self.listener, *self.socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
