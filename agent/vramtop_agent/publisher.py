"""The agent's ZeroMQ PUB socket.

ZeroMQ sockets are not thread-safe, so exactly one thread (the agent's
sampler thread) owns and uses this socket; the training thread only appends
to a bounded deque (see Agent). Sends are non-blocking: a PUB socket drops
frames for a subscriber whose queue is full (high-water mark) instead of
waiting, so a slow or frozen viewer can never stall training. Frames carry
sequence numbers so the viewer can count what it missed.
"""

from __future__ import annotations

import ipaddress
import warnings
from urllib.parse import urlsplit

from vramtop_agent.schema import encode


class EndpointError(ValueError):
    pass


def check_bind_endpoint(endpoint: str, allow_remote: bool = False) -> str:
    """Refuse to bind beyond loopback unless explicitly allowed."""
    if endpoint.startswith("ipc://"):
        return endpoint
    if not endpoint.startswith("tcp://"):
        raise EndpointError(f"unsupported endpoint {endpoint!r}: use ipc:///path or tcp://127.0.0.1:PORT")
    host = urlsplit(endpoint).hostname or ""
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        if not allow_remote:
            raise EndpointError(
                f"refusing to bind {endpoint}: not loopback (pass allow_remote=True to expose the stream)"
            )
        warnings.warn(f"vramtop agent binds {endpoint}: anyone who can reach it can read the stream",
                      stacklevel=3)
    return endpoint


class Publisher:
    def __init__(self, endpoint: str, hwm: int = 1000, allow_remote: bool = False, curve_secret_key: bytes | None = None):
        import zmq

        check_bind_endpoint(endpoint, allow_remote)
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)  # closing must never wait on a viewer
        if curve_secret_key is not None:
            sock.curve_secretkey = curve_secret_key
            sock.curve_server = True
        if endpoint.endswith(":0") and endpoint.startswith("tcp://"):
            port = sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            endpoint = endpoint.rsplit(":", 1)[0] + f":{port}"
        else:
            sock.bind(endpoint)
        self.endpoint = endpoint
        self._sock = sock
        self.sent = 0
        self.failed = 0

    def send(self, msg: dict) -> bool:
        try:
            self._sock.send(encode(msg), flags=self._zmq.NOBLOCK)
            self.sent += 1
            return True
        except self._zmq.Again:
            self.failed += 1
            return False

    def close(self) -> None:
        try:
            self._sock.close(linger=0)
        except Exception:
            pass
