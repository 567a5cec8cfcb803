"""The agent's ZeroMQ PUB socket.

ZeroMQ sockets are not thread-safe, so exactly one thread (the agent's
sampler thread) owns and uses this socket; the training thread only appends
to a bounded deque (see Agent). Sends are non-blocking: a PUB socket drops
frames for a subscriber whose queue is full (high-water mark) instead of
waiting, so a slow or frozen viewer can never stall training. Frames carry
sequence numbers so the viewer can count what it missed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
from urllib.parse import urlsplit

from vramtop_agent.schema import encode, encode_events


class EndpointError(ValueError):
    pass


def check_bind_endpoint(endpoint: str, allow_remote: bool = False, curve: bool = False) -> str:
    """Refuse to bind beyond loopback unless explicitly allowed; then warn on stderr unless CURVE protects it."""
    if endpoint.startswith("ipc://@"):
        # A Linux abstract socket has no file, hence no permissions: any local user can connect.
        if not allow_remote:
            raise EndpointError(f"refusing to bind {endpoint}: an abstract ipc socket is open to every user "
                                "of this machine (pass allow_remote=True to expose the stream)")
        _warn_exposed(endpoint, curve)
        return endpoint
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
        _warn_exposed(endpoint, curve)
    return endpoint


def _warn_exposed(endpoint: str, curve: bool) -> None:
    if curve:
        text = f"vramtop agent binds {endpoint}, encrypted with CURVE: viewers need the agent's public key"
    else:
        text = (f"vramtop agent binds {endpoint}: anyone who can reach it can read the stream "
                "(use CURVE keys, curve_secret_key=...: see docs/security.md)")
    # Printed, not warnings.warn(): a warnings filter (python -W ignore, a framework) must not hide it.
    try:
        sys.stderr.write(f"vramtop: warning: {text}\n")
        sys.stderr.flush()
    except Exception:
        pass


_warned_plain_tcp: list[str] = []


def _warn_plain_loopback(endpoint: str) -> None:
    """Once per process: a loopback tcp port is open to every local user (an ipc socket in the 0700
    runtime directory is not)."""
    if _warned_plain_tcp:
        return
    _warned_plain_tcp.append(endpoint)
    try:
        sys.stderr.write(f"vramtop: warning: vramtop agent publishes on {endpoint} without CURVE: every user of "
                         "this machine can read the stream (use the default ipc socket, or CURVE keys: see "
                         "docs/security.md)\n")
        sys.stderr.flush()
    except Exception:
        pass


class Publisher:
    """curve_secret_key: the agent's CURVE secret key (Z85) or its `.key_secret` file: the stream is
    encrypted and only viewers given the matching public key can connect. curve_client_keys: public
    keys, key files or a directory of `*.key` files; when given, only those viewers may subscribe.
    See vramtop_agent.curve and docs/security.md."""

    def __init__(self, endpoint: str, hwm: int = 1000, allow_remote: bool = False, curve_secret_key=None,
                 curve_client_keys=None):
        import zmq

        check_bind_endpoint(endpoint, allow_remote, curve=curve_secret_key is not None)
        self._zmq = zmq
        self._auth = None
        secret = allowed = None
        if curve_secret_key is not None:
            from vramtop_agent import curve

            secret = curve.load_key(curve_secret_key, secret=True)
            if curve_client_keys is not None:
                allowed = curve.load_public_keys(curve_client_keys)
        elif curve_client_keys is not None:
            raise ValueError("curve_client_keys needs curve_secret_key (the agent's own key)")
        # A CURVE socket with its own authenticator gets its own context: one ZAP handler per context.
        self._ctx = zmq.Context() if allowed is not None else zmq.Context.instance()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)  # closing must never wait on a viewer
        if secret is not None:
            if allowed is not None:
                self._auth = _start_authenticator(self._ctx, allowed)
                sock.zap_domain = b"vramtop"
            sock.curve_secretkey = secret
            sock.curve_server = True
        try:
            if endpoint.endswith(":0") and endpoint.startswith("tcp://"):
                port = sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
                endpoint = endpoint.rsplit(":", 1)[0] + f":{port}"
            else:
                sock.bind(endpoint)
        except Exception:
            sock.close(linger=0)
            self._stop_auth()
            raise
        _restrict_ipc_socket(endpoint)
        if endpoint.startswith("tcp://") and secret is None and not allow_remote:
            _warn_plain_loopback(endpoint)  # beyond loopback, check_bind_endpoint already said more
        self.endpoint = endpoint
        self.curve = secret is not None
        self._sock = sock

    def send(self, msg: dict) -> bool:
        """One frame; False when the socket's queue is full (a slow viewer: the frame is dropped)."""
        try:
            self._sock.send(encode(msg), flags=self._zmq.NOBLOCK)
            return True
        except self._zmq.Again:
            return False

    def send_many(self, msgs: list[dict]) -> None:
        """The events as one batch frame, then the samples one frame each (the viewer conflates them).

        Events go first, as they were queued first: a viewer should not see a
        sample of step N+1 before the summary of step N.
        """
        events = [m for m in msgs if m.get("type") != "sample"]
        refused: list[str] = []
        for frame in encode_events(events, refused):
            with contextlib.suppress(self._zmq.Again):  # a slow viewer: dropped, as in send()
                self._sock.send(frame, flags=self._zmq.NOBLOCK)
        for msg in msgs:
            if msg.get("type") == "sample":
                self.send(msg)
        if refused:  # the rest went out; the agent counts and reports this one
            raise ValueError(f"{len(refused)} event(s) not sent: {refused[0]}")

    def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: every send went to the socket at once (Sink interface)."""

    def close(self) -> None:
        try:
            self._sock.close(linger=0)
        except Exception:
            pass
        self._stop_auth()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            try:
                self._auth.stop()
                self._ctx.term()
            except Exception:
                pass
            self._auth = None


class _AllowedKeys:
    """ZAP credentials provider: a fixed set of viewer public keys (Z85)."""

    def __init__(self, keys: set[bytes]):
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def _start_authenticator(ctx, allowed: set[bytes]):
    from zmq.auth.thread import ThreadAuthenticator  # a daemon thread: never keeps the job alive

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="vramtop", credentials_provider=_AllowedKeys(allowed))
    return auth


def _restrict_ipc_socket(endpoint: str) -> None:
    """Make an ipc socket file 0600: connecting needs write access, so only this user can read the stream.

    The default endpoint already lives in a 0700 directory; this also covers an explicit
    ipc:///path elsewhere. Abstract sockets (ipc://@name) have no file and are refused unless
    allow_remote (check_bind_endpoint).
    """
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        try:
            os.chmod(endpoint[len("ipc://"):], 0o600)
        except OSError:
            pass


def is_loopback_host(host: str) -> bool:
    """True for "localhost" and a loopback address (127.0.0.0/8, ::1): what binds or serves on this
    machine only. Any other name or address, or text that is neither, is False."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
