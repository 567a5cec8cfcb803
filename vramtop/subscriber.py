"""The viewer's end of the wire: two SUB sockets on one agent endpoint.

Samples arrive on a socket with ZMQ_CONFLATE, which keeps only the newest
frame: a viewer that falls behind skips to the present instead of replaying
stale state. Events (hello, phase edges, step summaries, errors, OOM) arrive
on a second socket with a deep queue, since each of them matters. Every
frame is size-capped and validated; a bad frame is counted and dropped, never
raised.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from vramtop.errors import UserError
from vramtop_agent.schema import MAX_FRAME_BYTES, TOPIC_EVENT, TOPIC_SAMPLE, SchemaError, decode


def check_endpoint(endpoint: str) -> str:
    """A connectable endpoint, or a UserError that says what is wrong with it."""
    if endpoint.startswith("ipc://"):
        if len(endpoint) <= len("ipc://"):
            raise UserError(f"empty ipc path in {endpoint!r}")
        return endpoint
    if endpoint.startswith("tcp://"):
        parts = urlsplit(endpoint)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or not 0 < port < 65536:
            raise UserError(f"bad endpoint {endpoint!r}: expected tcp://HOST:PORT")
        return endpoint
    raise UserError(f"bad endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc:///path")


class Subscriber:
    def __init__(self, endpoint: str, curve_server_key: bytes | None = None, max_frame: int = MAX_FRAME_BYTES):
        import zmq

        self.endpoint = check_endpoint(endpoint)
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self.max_frame = max_frame
        self._samples = self._socket(TOPIC_SAMPLE, conflate=True, curve_server_key=curve_server_key)
        self._events = self._socket(TOPIC_EVENT, conflate=False, curve_server_key=curve_server_key)
        self._poller = zmq.Poller()
        self._poller.register(self._samples, zmq.POLLIN)
        self._poller.register(self._events, zmq.POLLIN)
        self.rejected = 0
        self.last_rejection: str | None = None

    def _socket(self, topic: bytes, conflate: bool, curve_server_key: bytes | None):
        zmq = self._zmq
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        # A peer that sends a larger frame is disconnected by libzmq before we allocate it.
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        if conflate:
            sock.setsockopt(zmq.CONFLATE, 1)  # must precede connect
        else:
            sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if curve_server_key is not None:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = curve_server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.connect(self.endpoint)
        return sock

    def poll(self, timeout_ms: int = 0, max_events: int = 5000) -> list[dict]:
        """Decoded messages ready now (events first, in order; then the newest sample)."""
        zmq = self._zmq
        out: list[dict] = []
        ready = dict(self._poller.poll(timeout_ms))
        if self._events in ready:
            for _ in range(max_events):
                try:
                    frame = self._events.recv(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._take(frame, out)
        if self._samples in ready:
            try:
                self._take(self._samples.recv(zmq.NOBLOCK, copy=True), out)
            except zmq.Again:
                pass
        return out

    def _take(self, frame: bytes, out: list[dict]) -> None:
        try:
            out.append(decode(frame, self.max_frame))
        except SchemaError as exc:
            self.rejected += 1
            self.last_rejection = str(exc)

    def close(self) -> None:
        for sock in (self._samples, self._events):
            try:
                sock.close(linger=0)
            except Exception:
                pass
