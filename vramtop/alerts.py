"""Alerts: thresholds over the viewer's model, a banner, and `--on-alert CMD`.

`evaluate(state, thresholds)` is pure: a SessionState in, the alerts that hold now out (one per
kind). `AlertMonitor` remembers which kinds have fired and runs the user's command once per kind,
with the alert as JSON on stdin, in the background: neither the dashboard nor the recorder waits
for it (and the training job never knows).

Kinds (docs/budgets-and-alerts.md):
  headroom       free memory on the device (host RAM on CPU) below `headroom_pct` % of it
  retries        the CUDA caching allocator retried (cudaMalloc failed, cache flushed) at least once
  fragmentation  reserved - allocated above `frag_pct` % of reserved (and above `frag_min_bytes`)
  creep          memory growing step after step (vramtop_agent.creep)
  oom            an out-of-memory error
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field

from vramtop.state import byte_count, dict_field

KINDS = ("oom", "creep", "headroom", "retries", "fragmentation")


@dataclass
class Thresholds:
    headroom_pct: float = 10.0
    frag_pct: float = 50.0
    frag_min_bytes: int = 256 << 20


@dataclass
class Alert:
    kind: str
    message: str
    details: dict = field(default_factory=dict)

    def to_json(self, state=None) -> str:
        who = {}
        if state is not None:
            h, last = state.hello or {}, state.sample or state.hello or {}
            # The step the alert is about where it names one (an OOM's own step), else the latest sample's:
            # samples are taken at edges, at most sample_hz a second, and may lag the event.
            step = self.details.get("step") if isinstance(self.details.get("step"), int) else None
            who = {"pid": last.get("pid"), "rank": last.get("rank"), "host": h.get("host"),
                   "device": h.get("device") or last.get("device"),
                   "step": step if step is not None else (state.sample or {}).get("step")}
        return json.dumps({"kind": self.kind, "message": self.message, "t": time.time(), **who,
                           "details": self.details}, default=str)


def _fmt(n) -> str:
    from vramtop_agent.vocabulary import fmt_bytes

    return fmt_bytes(n)


def creep_text(c) -> str:
    """'creeping +12 MiB/step (reserved), the card is full in ~3,400 steps (≈ 5 h)'."""
    where = "host RAM" if c.series == "rss" else "the card"
    text = f"creeping +{_fmt(c.slope)}/step ({c.series})"
    if c.steps_to_full is not None:
        text += f", {where} is full in ~{c.steps_to_full:,} steps"
        if c.seconds_to_full is not None:
            text += f" (≈ {_duration(c.seconds_to_full)})"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _headroom(state, th: Thresholds) -> Alert | None:
    s = state.sample or {}
    total = state.device_total()
    if not total:
        return None
    if state.on_cuda:
        nv = dict_field(s, "nvml")
        used = byte_count(nv.get("used"))
        if used is None:
            used = byte_count(s["cuda"].get("reserved"))
        free = total - (used or 0)
        where = "on the card"
    else:
        free = byte_count((s.get("host") or {}).get("available"))
        where = "host RAM"
    if free is None:
        return None
    pct = 100.0 * free / total
    if pct >= th.headroom_pct:
        return None
    return Alert("headroom", f"only {_fmt(free)} free {where} ({pct:.1f} % < {th.headroom_pct:g} %)",
                 {"free": free, "total": total, "free_pct": round(pct, 2), "threshold_pct": th.headroom_pct})


def _retries(state) -> Alert | None:
    cuda = (state.sample or {}).get("cuda")
    n = byte_count(cuda.get("alloc_retries")) if isinstance(cuda, dict) else None
    if not n:
        return None
    return Alert("retries", f"the allocator retried {n} time{'s' if n != 1 else ''} (cudaMalloc failed, "
                 "cache flushed): close to OOM, and slow", {"alloc_retries": n})


def _fragmentation(state, th: Thresholds) -> Alert | None:
    cuda = (state.sample or {}).get("cuda")
    if not isinstance(cuda, dict):
        return None
    reserved, allocated = byte_count(cuda.get("reserved")) or 0, byte_count(cuda.get("allocated")) or 0
    slack = reserved - allocated
    if reserved <= 0 or slack < th.frag_min_bytes:
        return None
    pct = 100.0 * slack / reserved
    if pct <= th.frag_pct:
        return None
    return Alert("fragmentation", f"{_fmt(slack)} reserved but unused ({pct:.0f} % of reserved > "
                 f"{th.frag_pct:g} %): cache and fragmentation", {"reserved": reserved, "allocated": allocated,
                                                                 "slack_pct": round(pct, 2)})


def _creep(state) -> Alert | None:
    now = state.creep.current()
    if now:
        c = now[0]
        return Alert("creep", creep_text(c), c.to_dict())
    if state.creep_events:  # recorded (a replay), or seen before and stopped since
        ev = next(iter(state.creep_events.values()))
        return None if state.creep.first_seen else Alert("creep", f"creep recorded at step {ev.get('step')}", ev)
    return None


def _oom(state) -> Alert | None:
    if not state.ooms:
        return None
    o = state.ooms[-1]
    req = o.get("requested")
    return Alert("oom", f"out of memory at step {o.get('step')} ({o.get('phase')})"
                 + (f", {_fmt(req)} requested" if req else ""),
                 {k: o.get(k) for k in ("step", "phase", "requested", "message")})


def evaluate(state, th: Thresholds | None = None) -> list[Alert]:
    """The alerts that hold now, most severe first."""
    th = th or Thresholds()
    found = [_oom(state), _creep(state), _headroom(state, th), _retries(state), _fragmentation(state, th)]
    return [a for a in found if a is not None]


class AlertMonitor:
    """Evaluates the model after each batch of messages; runs `on_alert` once per kind."""

    def __init__(self, thresholds: Thresholds | None = None, on_alert: str | None = None):
        self.thresholds = thresholds or Thresholds()
        self.on_alert = on_alert
        self.active: list[Alert] = []
        self.fired: dict[str, Alert] = {}
        self.failures: list[str] = []
        self._threads: list[threading.Thread] = []

    def update(self, state) -> list[Alert]:
        """Re-evaluate; returns the alerts of kinds that fire for the first time."""
        self.active = evaluate(state, self.thresholds)
        new = [a for a in self.active if a.kind not in self.fired]
        for a in new:
            self.fired[a.kind] = a
            if self.on_alert:
                self._run(a, a.to_json(state))
        return new

    def _run(self, alert: Alert, payload: str) -> None:
        t = threading.Thread(target=self._deliver, args=(alert.kind, payload), name=f"vramtop-alert-{alert.kind}",
                             daemon=True)
        t.start()
        self._threads.append(t)

    def _deliver(self, kind: str, payload: str) -> None:
        try:
            subprocess.run(shlex.split(self.on_alert), input=payload, text=True, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            self.failures.append(f"--on-alert for {kind}: {exc}"[:200])

    def wait(self, timeout: float = 10.0) -> None:
        """Let the commands already started finish (at exit)."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0))


def add_arguments(p) -> None:
    """--on-alert and the thresholds, shared by attach, run and record."""
    p.add_argument("--on-alert", metavar="CMD", default=None,
                   help="run CMD once per alert kind (oom, creep, headroom, retries, fragmentation) with the "
                   "alert as JSON on stdin")
    p.add_argument("--alert-headroom", metavar="PCT", type=float, default=Thresholds.headroom_pct,
                   help="alert when free memory falls below PCT %% of the device (default 10)")
    p.add_argument("--alert-frag", metavar="PCT", type=float, default=Thresholds.frag_pct,
                   help="alert when reserved-but-unused memory exceeds PCT %% of reserved (default 50)")


def from_args(args) -> AlertMonitor:
    from vramtop.errors import UserError

    for name in ("alert_headroom", "alert_frag"):
        v = getattr(args, name, None)
        if v is not None and not 0 <= v <= 100:
            raise UserError(f"--{name.replace('_', '-')} must be a percentage between 0 and 100")
    cmd = getattr(args, "on_alert", None)
    if cmd is not None:
        try:
            if not shlex.split(cmd):
                raise ValueError("empty command")
        except ValueError as exc:
            raise UserError(f"--on-alert {cmd!r}: {exc}") from None
    th = Thresholds(headroom_pct=getattr(args, "alert_headroom", Thresholds.headroom_pct),
                    frag_pct=getattr(args, "alert_frag", Thresholds.frag_pct))
    return AlertMonitor(th, cmd)


class StreamAlerts:
    """Alerts for a job watched without a dashboard (`vramtop run --no-tui --on-alert`): a thread in
    vramtop (never in the job) subscribes to the job's agent and feeds a model and the monitor."""

    def __init__(self, monitor: AlertMonitor, find_endpoint):
        self.monitor = monitor
        self._find = find_endpoint  # () -> endpoint or None, until the job's agent appears
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vramtop-alerts", daemon=True)

    def start(self) -> StreamAlerts:
        self._thread.start()
        return self

    def _loop(self) -> None:
        from vramtop.state import SessionState
        from vramtop.subscriber import Subscriber

        endpoint = None
        while endpoint is None and not self._stop.wait(0.2):
            endpoint = self._find()
        if endpoint is None:
            return
        sub, state = Subscriber(endpoint, every_sample=True), SessionState()
        try:
            while True:
                msgs = sub.poll(200)
                for msg in msgs:
                    state.apply(msg)
                if msgs:
                    self.monitor.update(state)
                elif self._stop.is_set():
                    break  # the job ended and what it sent last (an OOM, its goodbye) is in
        finally:
            sub.close()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.monitor.wait()
