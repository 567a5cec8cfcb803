"""Where the viewer's messages come from: a live agent on this machine or an endpoint.

LiveSource is a vramtop.source.Source: `poll() -> list[dict]` (validated wire
messages, never raises), `status` (one line for the footer), `choices` (agents
to pick from, when discovery finds several), `choose()` and `close()`. The TUI
pulls from it on a timer; replay provides another Source.
"""

from __future__ import annotations

import time

from vramtop.errors import UserError
from vramtop.source import Source
from vramtop.subscriber import Subscriber, check_endpoint
from vramtop_agent import discovery


def pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


class LiveSource(Source):
    """Follows one agent; with no target, discovers agents and re-attaches when a job restarts."""

    def __init__(self, target: str | None = None, rescan_s: float = 1.0, *, curve_server_key=None,
                 curve_client_key=None):
        self.target = target
        self.curve = (curve_server_key, curve_client_key)  # see Subscriber and docs/security.md
        self.rescan_s = rescan_s
        self.sub: Subscriber | None = None
        self.pid: int | None = None
        self.info: dict | None = None
        self.choices: list[dict] = []
        self.status = ""
        self._last_scan = 0.0
        self._gone_since: float | None = None
        self._want_pid: int | None = None
        self._rejected_before = 0  # frames rejected by the subscribers of earlier attachments
        self._last_rejection: str | None = None
        self._said_waiting = False  # the status says nothing is at the endpoint yet
        if target is None:
            self.status = "looking for agents on this machine"
        elif target.isdigit():
            self._want_pid = int(target)
            if not pid_alive(self._want_pid):
                raise UserError(f"no process with pid {target}")
            self.status = f"waiting for the vramtop agent in pid {target}"
        else:
            self._connect(check_endpoint(target), None)

    # ------------------------------------------------------------------ connecting

    def _connect(self, endpoint: str, info: dict | None) -> None:
        self._close_sub()
        self.sub = Subscriber(endpoint, curve_server_key=self.curve[0], curve_client_key=self.curve[1])
        self.info = info
        self.pid = info.get("pid") if info else None
        self.choices = []
        self._gone_since = None
        self.status = f"attached to {endpoint}"
        if info and info.get("curve") and self.curve[0] is None:
            self.status += ": this agent encrypts its stream (CURVE), pass its public key with --server-key FILE"

    def choose(self, info: dict) -> None:
        self._connect(info["endpoint"], info)

    def _scan(self) -> None:
        now = time.monotonic()
        if now - self._last_scan < self.rescan_s:
            return
        self._last_scan = now
        try:
            agents = discovery.list_agents()
        except PermissionError as exc:  # a runtime dir planted by someone else: say so, keep waiting
            self.choices = []
            self.status = str(exc)
            return
        if self._want_pid is not None:
            agents = [a for a in agents if a.get("pid") == self._want_pid]
            if not agents and not pid_alive(self._want_pid):
                self.status = f"process {self._want_pid} has exited"
                return
        where = f"pid {self._want_pid}" if self._want_pid else "this machine"
        self.offer_agents(agents, "running",
                          f"no vramtop agent on {where} yet: waiting (start one with vramtop_agent.watch())")

    # ------------------------------------------------------------------ polling

    def poll(self) -> list[dict]:
        if self.sub is None:
            self._scan()
            return []
        msgs = self.sub.poll(0)
        waiting = self.sub.waiting_for()
        if waiting:
            self.status = waiting
            self._said_waiting = True
        elif self._said_waiting:
            self._said_waiting = False
            self.status = f"attached to {self.sub.endpoint}"
        return msgs

    def process_gone(self) -> bool:
        """True once the attached local process has exited (not for remote endpoints)."""
        if self.pid is None:
            return False
        if pid_alive(self.pid):
            return False
        if self.target is None:
            # Discovery mode: follow the job to its next incarnation.
            if self._gone_since is None:
                self._gone_since = time.monotonic()
                self.status = f"process {self.pid} exited: waiting for a new agent"
            self._detach_and_rescan()
        return True

    def _detach_and_rescan(self) -> None:
        self._close_sub()
        self.pid = None

    def _close_sub(self) -> None:
        if self.sub is not None:
            self._rejected_before += self.sub.rejected
            self._last_rejection = self.sub.last_rejection or self._last_rejection
            self.sub.close()
            self.sub = None

    @property
    def rejected(self) -> tuple[int, str | None]:
        """Frames refused since this source was created (across re-attachments), and the last reason."""
        if self.sub is None:
            return self._rejected_before, self._last_rejection
        return self._rejected_before + self.sub.rejected, self.sub.last_rejection or self._last_rejection

    def close(self) -> None:
        self._close_sub()
