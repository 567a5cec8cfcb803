"""The agents of this process: one per watched model, cleaned up at exit, inert in a forked child.

Rules (docs/integrations.md, "One agent per model"):
- `watch(model)` while a live agent of this process already watches that
  model, a module inside it or a module around it (or `watch()` without a
  model while any agent is live) returns that running agent, held once more:
  its hooks are never installed twice, and `stop()` (or leaving a `with`
  block) releases one hold; the agent stops at the last one. So an inner
  `with watch(model)` never hides the outer one, and a script's own
  `watch()` after `vramtop run` started the zero-code agent joins it.
- A watch() of an unrelated model gets its own agent, with its own socket
  and discovery file (`<pid>-<rank>-<slot>`).
- At interpreter exit every agent still running is stopped (socket and
  discovery file removed, the recording closed with its goodbye), as if
  `stop()` had been called.
- In a child made by fork(), the parent's agents are disowned: the child
  removes their hooks from its copy of the model, and never sends, records,
  closes or deletes anything of theirs (the files, socket and recording
  belong to the parent). The child is not watched.
- A recording agent stops politely on SIGTERM / SIGHUP (the recording gets
  its goodbye) when the job has no handler of its own for them; the signal
  then takes its default course, so the job ends exactly as it would have.

Thread model: register/release run on the thread that calls watch()/stop();
the fork handler runs in the child's only thread; the exit and signal
handlers on the main thread.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import threading
import weakref

_agents: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()
_said: set[str] = set()

MAX_SAMPLE_HZ = 100.0
DEFAULT_SAMPLE_HZ = 10.0


def say_once(key: str, text: str) -> None:
    """One line on stderr, once per process and key (printed, not warnings.warn: filters must not hide it)."""
    if key in _said:
        return
    _said.add(key)
    try:
        sys.stderr.write(f"vramtop: {text}"[:600] + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def bounded_sample_hz(value) -> float:
    """A sample rate the sampler can keep: 0 (events only) to MAX_SAMPLE_HZ; NaN or junk -> the default."""
    try:
        hz = float(value)
    except (TypeError, ValueError):
        hz = math.nan
    if math.isnan(hz):
        say_once("sample_hz", f"sample_hz={value!r} is not a number: sampling at {DEFAULT_SAMPLE_HZ:g} Hz")
        return DEFAULT_SAMPLE_HZ
    if hz < 0 or hz > MAX_SAMPLE_HZ:
        bounded = min(max(hz, 0.0), MAX_SAMPLE_HZ)
        say_once("sample_hz", f"sample_hz={value!r} is out of range: sampling at {bounded:g} Hz")
        return bounded
    return hz


# ---------------------------------------------------------------------------- registry


def register(agent) -> None:
    with _lock:
        _agents.add(agent)
    _install_process_hooks()


def live_agents() -> list:
    """Running agents created by this process (not a parent's before a fork)."""
    pid = os.getpid()
    return [a for a in list(_agents) if not a.closed and a.pid == pid]


def reusable(model):
    """The running agent a watch(model) should join, or None (see the module docstring)."""
    for agent in live_agents():
        watched = agent.model
        if model is None or watched is None or watched is model or _contains(watched, model) \
                or _contains(model, watched):
            return agent
    return None


def _contains(outer, inner) -> bool:
    try:
        return any(m is inner for m in outer.modules())
    except Exception:
        return False


def next_slot(rank: int) -> int:
    """0 for the process's first agent of this rank, then 1, 2, ...: distinct socket and discovery names."""
    used = {a.slot for a in live_agents() if a.rank == rank}
    slot = 0
    while slot in used:
        slot += 1
    return slot


_kept: list = []


def keep_forever(objects) -> None:
    """A forked child's copies of the parent's sockets and recorders: referenced until the child ends,
    so no finalizer ever closes (and flushes, checkpoints or unlinks) what belongs to the parent."""
    _kept.extend(objects)


# ---------------------------------------------------------------------------- process hooks

_installed: dict[str, int | None] = {"pid": None}


def _install_process_hooks() -> None:
    if _installed["pid"] == os.getpid():
        return
    first = _installed["pid"] is None
    _installed["pid"] = os.getpid()
    if first:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(stop_all_at_exit)


def stop_all_at_exit() -> None:
    """Stop what the job left running: its socket and discovery file go, its recording gets its goodbye."""
    failed = getattr(sys, "last_type", None) is not None or getattr(sys, "last_exc", None) is not None
    for agent in live_agents():
        try:
            agent.stop("exception" if failed else "finished", all_holds=True)
        except Exception:
            pass


def _after_fork_in_child() -> None:
    # Runs in the child only. Nothing here may touch a socket, file or lock of the parent's agents.
    for agent in list(_agents):
        try:
            agent.disown_after_fork()
        except Exception:
            pass
    _installed["pid"] = os.getpid()


# ---------------------------------------------------------------------------- polite signals

_POLITE = ("SIGTERM", "SIGHUP")


def stop_on_polite_signals(agent) -> None:
    """SIGTERM/SIGHUP: stop the agent (recording flushed, goodbye written), then die of the signal as before.

    Only where the job has no handler of its own (the default disposition),
    and only from the main thread (where Python lets us set one).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for name in _POLITE:
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_polite_signal)
        except (ValueError, OSError, TypeError):
            pass


def release_polite_signals() -> None:
    """Once no recording agent runs: give SIGTERM/SIGHUP back their default disposition, if still ours."""
    if threading.current_thread() is not threading.main_thread():
        return
    if any(records(a) for a in live_agents()):
        return
    for name in _POLITE:
        sig = getattr(signal, name, None)
        try:
            if sig is not None and signal.getsignal(sig) is _on_polite_signal:
                signal.signal(sig, signal.SIG_DFL)
        except (ValueError, OSError, TypeError):
            pass


def records(agent) -> bool:
    return agent.recorder is not None


def _on_polite_signal(signum, frame) -> None:
    try:
        signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once, as without vramtop
    except Exception:
        pass
    for agent in live_agents():
        try:
            agent.stop(f"signal {signal.Signals(signum).name}", all_holds=True)
        except Exception:
            pass
    os.kill(os.getpid(), signum)  # the default action: the job ends by this signal, as it would have
