"""The viewer's end of the wire: two SUB sockets on one agent endpoint.

Samples arrive on a socket with ZMQ_CONFLATE, which keeps only the newest
frame: a viewer that falls behind skips to the present instead of replaying
stale state. Events (hello, phase edges, step summaries, errors, OOM) arrive
on a second socket with a deep queue, since each of them matters. Every
frame is size-capped and validated; a bad frame is counted and dropped, never
raised.

A frame over the cap never reaches Python: libzmq (ZMQ_MAXMSGSIZE) drops the
connection instead of allocating it, and treats that as a protocol error after
which it does not reconnect. A monitor on each socket sees the disconnect and
connects again, so one oversized frame costs the frames in flight (visible as
an `eseq` gap: "dropped"), never the rest of the stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from vramtop.errors import UserError
from vramtop_agent.schema import MAX_FRAME_BYTES, TOPIC_EVENT, TOPIC_SAMPLE, SchemaError, decode_many

if TYPE_CHECKING:  # pyzmq is imported when a Subscriber is made, not with this module
    import zmq


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
    """curve_server_key: the agent's CURVE public key (Z85, or its `.key` file): the stream is encrypted
    and only that agent is accepted. curve_client_key: this viewer's `.key_secret` file or a
    (public, secret) pair, for an agent that lists its viewers (curve_client_keys); by default a
    fresh key pair. See vramtop_agent.curve and docs/security.md."""

    def __init__(self, endpoint: str, curve_server_key=None, max_frame: int = MAX_FRAME_BYTES,
                 curve_client_key=None, every_sample: bool = False):
        import zmq

        self.endpoint = check_endpoint(endpoint)
        self._zmq = zmq
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.max_frame = max_frame
        self._curve = None
        if curve_server_key is not None:
            from vramtop_agent import curve

            try:
                server = curve.load_key(curve_server_key)
                if curve_client_key is None:
                    client = zmq.curve_keypair()
                elif isinstance(curve_client_key, (tuple, list)):
                    client = tuple(curve_client_key)
                else:
                    client = curve.load_keypair(curve_client_key)
            except curve.CurveKeyError as exc:
                raise UserError(str(exc)) from None
            self._curve = (server, *client)
        elif curve_client_key is not None:
            raise UserError("a client key needs the agent's public key too (--server-key)")
        # A dashboard wants the newest sample; a recorder (every_sample) wants them all.
        self.every_sample = every_sample
        self._samples = self._socket(TOPIC_SAMPLE, conflate=not every_sample)
        self._events = self._socket(TOPIC_EVENT, conflate=False)
        self._poller = zmq.Poller()
        self._poller.register(self._samples, zmq.POLLIN)
        self._poller.register(self._events, zmq.POLLIN)
        self._monitors: dict[zmq.Socket[bytes], zmq.Socket[bytes]] = {}  # monitor socket -> the socket it watches
        # Connection events too: a viewer waiting on an endpoint where nothing listens says so (status()).
        events = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
        for sock in (self._samples, self._events):
            mon = sock.get_monitor_socket(events)
            self._monitors[mon] = sock
            self._poller.register(mon, zmq.POLLIN)
        self.rejected = 0
        self.last_rejection: str | None = None
        self.reconnects = 0  # connections dropped (agent gone, network, an oversized frame) and made again
        self.connected: bool | None = None  # None: not known yet; False: connecting failed, retrying
        self.frames = 0  # frames received, good or bad

    def _socket(self, topic: bytes, conflate: bool):
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
        if self._curve is not None:
            server, public, secret = self._curve
            sock.curve_serverkey = server
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.connect(self.endpoint)
        return sock

    @property
    def sockets(self) -> tuple[zmq.Socket[bytes], ...]:
        """Every socket this subscriber polls (its two SUB sockets and their monitors): one of them
        readable means poll() has something to do. A caller polling many subscribers at once
        (vramtop.job_source) registers these in its own poller."""
        return tuple(s for s, _ in self._poller.sockets)

    def poll(self, timeout_ms: int = 0, max_events: int = 5000) -> list[dict]:
        """Decoded messages ready now (events first, in order; then the newest sample)."""
        zmq = self._zmq
        out: list[dict] = []
        ready = dict(self._poller.poll(timeout_ms))
        for mon, sock in self._monitors.items():
            if mon in ready:
                self._reconnect(mon, sock)
        if self._events in ready:
            for _ in range(max_events):
                try:
                    frame = self._events.recv(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._take(frame, out)
        if self._samples in ready:
            for _ in range(max_events if self.every_sample else 1):
                try:
                    self._take(self._samples.recv(zmq.NOBLOCK, copy=True), out)
                except zmq.Again:
                    break
        return out

    def _reconnect(self, mon, sock) -> None:
        zmq = self._zmq
        from zmq.utils.monitor import recv_monitor_message

        disconnected = False
        while True:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            except Exception:  # a malformed monitor message: not ours to die of
                break
            kind = event.get("event")
            disconnected |= kind == zmq.EVENT_DISCONNECTED
            if kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_DISCONNECTED):
                self.connected = False
        if disconnected:
            try:  # disconnect first: connecting twice would deliver every frame twice
                sock.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass
            sock.connect(self.endpoint)
            self.reconnects += 1

    def waiting_for(self) -> str | None:
        """Why nothing arrives yet, for the status line: None once the agent is there (or not known)."""
        if self.frames:
            return None
        if self.endpoint.startswith("ipc://"):
            import os

            path = self.endpoint[len("ipc://"):]
            if not os.path.exists(path):
                return f"no socket at {path} yet (is the agent running?): waiting"
        if self.connected is False:
            what = "connection refused" if self.endpoint.startswith("tcp://") else "cannot connect"
            return f"nothing at {self.endpoint} yet ({what}): waiting"
        return None

    def _take(self, frame: bytes, out: list[dict]) -> None:
        self.frames += 1
        try:
            good, bad = decode_many(frame, self.max_frame)
        except SchemaError as exc:
            good, bad = [], [str(exc)]
        out.extend(good)
        if bad:
            self.rejected += len(bad)
            self.last_rejection = bad[-1]

    def close(self) -> None:
        for mon, sock in self._monitors.items():
            try:
                sock.disable_monitor()
                mon.close(linger=0)
            except Exception:
                pass
        for sock in (self._samples, self._events):
            try:
                sock.close(linger=0)
            except Exception:
                pass
