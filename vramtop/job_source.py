"""Every rank of a job at once: one subscriber per agent, on this machine and/or over ssh.

`poll()` returns `(member key, message)` pairs (see vramtop.job_state) from
all the members whose sockets have something, through one ZeroMQ poller, so
64 ranks cost one poll call, not 64. Agents on other hosts are reached
through one ssh per host carrying one unix-socket forward per agent
(vramtop.remote.SshTunnel): a dropped host comes back with all its ranks.

Rescans (every `rescan_s`; local discovery in the polling thread since it
only reads small files, `vramtop ls --json` over ssh in worker threads) add
agents that `match` accepts (a late or restarted rank of the same job) and
mark members whose process is gone; gone members stay in the view, marked,
since a rank that died is what a user needs to see.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vramtop.errors import UserError
from vramtop.job_state import member_key
from vramtop.remote import Host, SshTunnel, local_socket_dir, parse_host, remote_ls, remote_target
from vramtop.source import KeyedSource

if TYPE_CHECKING:  # pyzmq is imported when a JobSource is made, not with this module
    import zmq

    from vramtop.subscriber import Subscriber


@dataclass
class Member:
    key: str
    info: dict
    sub: Subscriber
    socks: tuple[zmq.Socket[bytes], ...] = ()


@dataclass
class _RemoteHost:
    host: Host
    dir: Path
    tunnel: SshTunnel | None = None
    keys: list[str] = field(default_factory=list)
    scan: concurrent.futures.Future | None = None
    error: str | None = None


class JobSource(KeyedSource):
    def __init__(self, agents: list[dict], *, hosts: Sequence[Host | str] | None = None,
                 match: Callable[[dict], bool] | None = None, remote_vramtop: str | None = None,
                 rescan_s: float | None = 2.0, scan_local: bool | None = None, label: str = "job"):
        import zmq

        self._zmq = zmq
        self._poller = zmq.Poller()
        self._by_sock: dict = {}
        self.members: dict[str, Member] = {}
        self.gone: set[str] = set()
        self.match = match
        self.remote_vramtop = remote_vramtop
        self.rescan_s = rescan_s
        self.label = label
        self.choices: list[dict] = []
        self.status = ""
        self._hosts: dict[str, _RemoteHost] = {}
        for h in hosts or []:
            h = parse_host(h) if isinstance(h, str) else h
            self._hosts[h.spec] = _RemoteHost(h, local_socket_dir())
        self._scan_local = scan_local if scan_local is not None else not hosts
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(self._hosts))),
                                                           thread_name_prefix="vramtop-ls") if self._hosts else None
        self._last_scan = time.monotonic()
        for a in agents:
            self._add(a)
        for rh in self._hosts.values():
            self._rebuild_tunnel(rh)
        self._update_status()

    # ------------------------------------------------------------------ members

    def _add(self, info: dict) -> str | None:
        from vramtop.subscriber import Subscriber

        key = member_key(info)
        if key in self.members:
            return None
        spec = info.get("ssh_host")
        if spec:
            rh = self._hosts.get(spec)
            if rh is None:
                rh = self._hosts[spec] = _RemoteHost(parse_host(spec), local_socket_dir())
            local = rh.dir / f"{info['pid']}-{info.get('rank', 0)}.sock"
            info = {**info, "local_endpoint": "ipc://" + str(local)}
            rh.keys.append(key)
            endpoint = info["local_endpoint"]
        else:
            endpoint = info["endpoint"]
        sub = Subscriber(endpoint)
        socks = sub.sockets  # one of them ready: sub.poll() has something to do
        for s in socks:
            self._poller.register(s, self._zmq.POLLIN)
            self._by_sock[s] = key
        self.members[key] = Member(key, info, sub, socks)
        return key

    def _rebuild_tunnel(self, rh: _RemoteHost) -> None:
        """One ssh for all of a host's members; rebuilt when a member joins."""
        if rh.tunnel is not None:
            rh.tunnel.close()
            rh.tunnel = None
        forwards = []
        for key in rh.keys:
            info = self.members[key].info
            forwards.append((info["local_endpoint"][len("ipc://"):], remote_target(info["endpoint"])))
        if forwards:
            rh.tunnel = SshTunnel(rh.host, forwards)
            rh.tunnel.ensure()

    @property
    def tunnels(self) -> list[SshTunnel]:
        return [rh.tunnel for rh in self._hosts.values() if rh.tunnel is not None]

    # ------------------------------------------------------------------ rescans

    def _rescan(self) -> None:
        if self.rescan_s is None:
            return
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_s:
            self._last_scan = now
            if self._scan_local:
                from vramtop_agent import discovery

                self._take_listing(None, discovery.list_agents())
            for rh in self._hosts.values():
                if rh.scan is None and self._pool is not None:
                    rh.scan = self._pool.submit(remote_ls, rh.host, self.remote_vramtop)
        for rh in self._hosts.values():
            if rh.scan is not None and rh.scan.done():
                fut, rh.scan = rh.scan, None
                try:
                    self._take_listing(rh, fut.result())
                    rh.error = None
                except UserError as exc:
                    rh.error = str(exc)
                except Exception as exc:  # noqa: BLE001 - a listing bug must not kill the view
                    rh.error = f"listing failed: {exc}"

    def _take_listing(self, rh: _RemoteHost | None, agents: list[dict]) -> None:
        listed = {member_key(a) for a in agents}
        where = rh.host.spec if rh else None  # the host listed, None for this machine
        mine = [k for k, m in self.members.items() if (m.info.get("ssh_host") or None) == where]
        for k in mine:
            if k not in listed:
                self.gone.add(k)
            else:
                self.gone.discard(k)
        added = False
        for a in agents:
            if member_key(a) not in self.members and (self.match is None or self.match(a)):
                added = self._add(a) is not None or added
        if added and rh is not None:
            self._rebuild_tunnel(rh)

    # ------------------------------------------------------------------ polling

    def poll(self, timeout_ms: int = 0) -> list[tuple[str, dict]]:
        self._rescan()
        for t in self.tunnels:
            t.ensure()
        out: list[tuple[str, dict]] = []
        ready = self._poller.poll(timeout_ms)
        seen: set[str] = set()
        for sock, _ in ready:
            key = self._by_sock.get(sock)
            if key is None or key in seen:
                continue
            seen.add(key)
            for msg in self.members[key].sub.poll(0):
                out.append((key, msg))
        self._update_status()
        return out

    def _update_status(self) -> None:
        parts = [f"{len(self.members)} agents"]
        if self.gone:
            parts.append(f"{len(self.gone)} gone")
        for rh in self._hosts.values():
            t = rh.tunnel.describe() if rh.tunnel else "no agents"
            parts.append(f"{rh.host}: {t}" + (f" ({rh.error})" if rh.error else ""))
        self.status = " · ".join(parts)

    @property
    def describe(self) -> str:
        if self._hosts:
            return f"via ssh {', '.join(self._hosts)}"
        return "this machine"

    def remove(self, key: str) -> None:
        """Stop following a member (the metrics exporter forgets long-silent agents)."""
        m = self.members.pop(key, None)
        self.gone.discard(key)
        if m is None:
            return
        for s in m.socks:
            try:
                self._poller.unregister(s)
            except Exception:
                pass
            self._by_sock.pop(s, None)
        m.sub.close()

    @property
    def rejected(self) -> tuple[int, str | None]:
        """Frames refused by the members followed now, and one of their last reasons."""
        subs = [m.sub for m in self.members.values()]
        return sum(s.rejected for s in subs), next((s.last_rejection for s in subs if s.last_rejection), None)

    def close(self) -> None:
        for m in self.members.values():
            for s in m.socks:
                try:
                    self._poller.unregister(s)
                except Exception:
                    pass
            m.sub.close()
        self.members.clear()
        for rh in self._hosts.values():
            if rh.tunnel is not None:
                rh.tunnel.close()
            shutil.rmtree(rh.dir, ignore_errors=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
