"""`vramtop record [PID | ENDPOINT] -o run.vramtop`: write an agent's stream to a recording.

The file has the same format as the agent's own recording (VRAMTOP_RECORD /
`watch(record=...)`). Every frame is kept (no conflation: a recording wants
every sample). Ctrl-C, SIGTERM, the agent's goodbye or the end of the
process end the recording cleanly, with everything committed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from vramtop import alerts
from vramtop.commands.common import add_curve_keys, add_verb, check_curve_keys
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "record", run,
        help="record a training process's memory stream to a file",
        description="Subscribe to a vramtop agent and write everything it sends to a recording "
        "(SQLite, see docs/recording-format.md). With no TARGET, record the only agent running on this machine. "
        "Ends with Ctrl-C, when the agent says goodbye or when its process exits.",
    )
    p.add_argument("target", nargs="?", help="a PID, or an endpoint such as tcp://127.0.0.1:5555 or ipc:///path")
    p.add_argument("-o", "--output", help="recording file (default: vramtop-PID-DATE.vramtop)")
    p.add_argument("--append", action="store_true", help="add to an existing recording instead of refusing")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--keep-going", action="store_true",
                   help="do not stop at the agent's goodbye (an endpoint that a restarted job binds again)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--no-inject", action="store_true",
                   help="never inject the agent into a process started without vramtop: wait for one instead")
    p.add_argument("--yes", "-y", action="store_true",
                   help="inject the agent into a process started without vramtop without asking (docs/attach.md)")
    add_curve_keys(p, server_help="the agent's CURVE public key, when it encrypts its stream (see docs/security.md)",
                   client_help="with --server-key: this recorder's CURVE secret key file, for an agent that lists "
                   "its viewers")
    alerts.add_arguments(p)


def StreamReader(endpoint: str, **curve):
    """The viewer's Subscriber without conflation: every sample and every event, size-capped,
    validated, reconnecting after an oversized frame, with the same CURVE options."""
    from vramtop.subscriber import Subscriber

    return Subscriber(endpoint, every_sample=True, **curve)


def resolve_target(target: str | None, wait_s: float | None = None, say=print) -> tuple[str, int | None]:
    """(endpoint, pid or None) of the agent to record; waits for a local agent to appear."""
    from vramtop.live_source import pid_alive
    from vramtop.subscriber import check_endpoint
    from vramtop_agent import discovery

    if target and not target.isdigit():
        return check_endpoint(target), None
    pid = int(target) if target else None
    if pid is not None and not pid_alive(pid):
        raise UserError(f"no process with pid {pid}")
    deadline = None if wait_s is None else time.monotonic() + wait_s
    announced = False
    while True:
        agents = discovery.list_agents()
        if pid is not None:
            agents = [a for a in agents if a.get("pid") == pid]
            if not agents and not pid_alive(pid):
                raise UserError(f"process {pid} exited before its vramtop agent started")
        if len(agents) == 1:
            return agents[0]["endpoint"], agents[0].get("pid")
        if len(agents) > 1:
            listing = ", ".join(f"pid {a.get('pid')} rank {a.get('rank', 0)}" for a in agents[:8])
            raise UserError(f"{len(agents)} agents are running ({listing}): pass a PID or an endpoint")
        if not announced:
            where = f"in pid {pid}" if pid is not None else "on this machine"
            say(f"vramtop record: no agent {where} yet, waiting (Ctrl-C to give up)")
            announced = True
        if deadline is not None and time.monotonic() > deadline:
            raise UserError("no vramtop agent appeared")
        time.sleep(0.5)


def _inject_if_plain(pid: int, yes: bool, say) -> None:
    """A PID with no agent (a job started without vramtop): inject one (vramtop/inject.py), or say why not."""
    from vramtop import inject
    from vramtop.attach_inject import starts_its_own_agent
    from vramtop_agent import discovery

    if any(a.get("pid") == pid for a in discovery.list_agents()) or starts_its_own_agent(pid):
        return  # its agent is there, or will be at its first training forward
    status = inject.start_agent(pid, yes, "record", say=say)  # a refusal or a block: one line, exit
    say(f"vramtop record: {'reusing the agent in' if status.get('already') else 'agent started in'} process {pid}")


def default_name(pid: int | None) -> str:
    return f"vramtop-{pid if pid is not None else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}.vramtop"


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and args.duration <= 0:
        raise UserError("--duration must be positive")
    if args.output and os.path.exists(args.output) and not args.append:
        raise UserError(f"{args.output} exists: choose another name or pass --append")
    say = (lambda *a, **k: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.target and args.target.isdigit() and not args.no_inject:
        _inject_if_plain(int(args.target), args.yes, say)
    try:
        endpoint, pid = resolve_target(args.target, say=say)
    except KeyboardInterrupt:
        return 130
    output = args.output or default_name(pid)
    check_curve_keys(args.server_key, args.client_key)
    curve = {"curve_server_key": args.server_key, "curve_client_key": args.client_key}
    monitor = alerts.from_args(args)
    return record(endpoint, output, pid=pid, duration=args.duration, stop_at_bye=not args.keep_going, say=say,
                  curve=curve, monitor=monitor if monitor.on_alert else None)


def record(endpoint: str, output: str, *, pid: int | None = None, duration: float | None = None,
           stop_at_bye: bool = True, say=print, install_signals: bool = True, curve: dict | None = None,
           monitor=None) -> int:
    """Record until Ctrl-C / SIGTERM / bye / process exit / duration. Returns an exit code."""
    from vramtop.live_source import pid_alive
    from vramtop_agent.recorder import Recorder, RecorderError

    try:
        rec = Recorder(output, writer="vramtop record")
    except (RecorderError, OSError) as exc:
        raise UserError(f"cannot record to {output}: {exc}") from None
    reader = StreamReader(endpoint, **(curve or {}))
    stop: dict[str, str | None] = {"why": None}  # why the loop ends, once it should
    old_handlers = _stop_on_signals(stop) if install_signals else {}
    writer = _Writer(rec, say, monitor)
    started = time.monotonic()
    last_flush = started
    last_progress = 0.0
    say(f"vramtop record: {endpoint} -> {output} (Ctrl-C to stop)")
    try:
        while stop["why"] is None:
            msgs = reader.poll(200)
            byes = writer.write(msgs)
            if byes and stop_at_bye:
                stop["why"] = f"agent said goodbye ({byes[-1].get('reason')})"
            if rec.disabled:
                raise UserError(rec.last_failure or "recording failed")
            now = time.monotonic()
            if now - last_flush >= 0.25:
                writer.flush()
                last_flush = now
            if duration is not None and now - started >= duration:
                stop["why"] = "duration reached"
            if pid is not None and not msgs and not pid_alive(pid):
                stop["why"] = f"process {pid} exited"
            if now - last_progress >= 5.0 and sys.stderr.isatty():
                say(f"vramtop record: {writer.counts['sample']} samples, {writer.counts['step']} steps")
                last_progress = now
    except KeyboardInterrupt:
        stop["why"] = "interrupted"
    finally:
        _drain(reader, rec)
        reader.close()
        rec.close()
        if monitor is not None:
            monitor.wait()
        _restore_signals(old_handlers)
    counts = writer.counts
    say(f"vramtop record: {stop['why']}; wrote {counts['sample']} samples, {counts['step']} steps, "
        f"{counts['event']} events to {output}")
    if reader.rejected:
        say(f"vramtop record: {reader.rejected} frames rejected (last: {reader.last_rejection})")
    return 0


class _Writer:
    """What the record loop keeps between polls: the counts, the one warning about a failing
    write, and (with --on-alert) the viewer's model of the stream for the alert thresholds."""

    def __init__(self, rec, say, monitor=None):
        self.rec, self.say, self.monitor = rec, say, monitor
        self.counts = {"sample": 0, "step": 0, "event": 0}
        self.warned = False
        if monitor is not None:
            from vramtop.state import SessionState

            self.state = SessionState()

    def write(self, msgs: list[dict]) -> list[dict]:
        """Record msgs; returns the agents' goodbyes among them."""
        from vramtop_agent.recorder import RecorderError

        byes = []
        for msg in msgs:
            kind = msg.get("type")
            self.counts["sample" if kind == "sample" else "step" if kind == "step" else "event"] += 1
            try:
                self.rec.send(msg)
            except RecorderError as exc:
                self._warn_once(exc)
            if kind == "bye":
                byes.append(msg)
            if self.monitor is not None:
                try:
                    self.state.apply(msg)
                except Exception:  # noqa: BLE001 - alerts are a bonus; the recording goes on
                    pass
        if self.monitor is not None and msgs:
            self.monitor.update(self.state)
        return byes

    def flush(self) -> None:
        from vramtop_agent.recorder import RecorderError

        try:
            self.rec.flush()
        except RecorderError as exc:
            self._warn_once(exc)

    def _warn_once(self, exc: Exception) -> None:
        if not self.warned:
            self.say(f"vramtop record: {exc}")
            self.warned = True


def _stop_on_signals(stop: dict[str, str | None]) -> dict:
    """SIGINT/SIGTERM set stop["why"] instead of raising in the middle of a write: the loop ends
    within 200 ms. A second Ctrl-C stops waiting. Returns the handlers to restore."""

    def _stop(signum, frame):
        if stop["why"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["why"] = "interrupted" if signum == signal.SIGINT else "terminated"

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, _stop)
        except ValueError:  # not the main thread
            pass
    return old_handlers


def _restore_signals(old_handlers: dict) -> None:
    for sig, handler in old_handlers.items():
        try:
            signal.signal(sig, handler)
        except ValueError:
            pass


def _drain(reader, rec) -> None:
    """Frames already queued in the socket belong in the file too."""
    try:
        for msg in reader.poll(0):
            rec.send(msg)
    except Exception:
        pass
