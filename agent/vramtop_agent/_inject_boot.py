"""The agent's side of `vramtop attach PID` on a job started without vramtop (see vramtop/inject.py).

`run(action, status_path)` is called by the bootstrap file the viewer wrote,
on the job's main thread, between two bytecodes, holding the GIL (a pending
call, or sys.remote_exec on 3.14). It never raises and never blocks for
long; it writes one JSON status file (mode 0600) that the viewer reads:
- start: an agent in zero-code mode (no model, no optimizer: the root module
  is found at the next training forward through the global module hooks,
  the optimizer at its next step through the global optimizer hooks), marked
  `injected` in its hello. An agent already in the process (injected before,
  `vramtop_agent.watch`, `vramtop run`) is reused: nothing new is started.
- stop: the injected agent stops, removing every hook it installed (`vramtop detach`).
- prepare (before start): the agent's modules are imported in a daemon thread,
  so that the pending call of `start` on the training thread takes milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType

# Distribution names of the modules the agent cannot run without (nvidia-ml-py is optional).
REQUIRED = (("zmq", "pyzmq"), ("msgpack", "msgpack"), ("psutil", "psutil"))

_injected = {"agent": None}


# Imported by `prepare` off the training thread, so that `start` (on it) only builds the agent.
PRELOAD = ("zmq", "msgpack", "psutil", "vramtop_agent.agent", "vramtop_agent.publisher", "vramtop_agent.discovery",
           "vramtop_agent.introspect", "vramtop_agent.oom", "vramtop_agent.estimator")


def run(action: str, status_path: str) -> None:
    if action == "prepare":
        _in_thread(prepare, status_path)
        return
    try:
        result = stop() if action == "stop" else start()
    except BaseException as exc:  # noqa: BLE001 - nothing may reach the job
        result = {"ok": False, "reason": f"agent not started: {type(exc).__name__}: {exc}"[:400]}
    _report(status_path, result)


def _in_thread(work, status_path: str) -> None:
    """Run `work` in a daemon thread that writes its status: the job's main thread returns at once."""
    import threading

    def body():
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001
            result = {"ok": False, "reason": f"agent not loaded: {type(exc).__name__}: {exc}"[:400]}
        _report(status_path, result)

    threading.Thread(target=body, name="vramtop-inject-preload", daemon=True).start()


def prepare() -> dict:
    """Import what the agent needs, off the training thread (imports hold the GIL in slices, not at once)."""
    missing = missing_dependencies()
    if missing:
        return _missing(missing)
    for name in PRELOAD:
        importlib.import_module(name)
    return {"ok": True, "prepared": True}


def _missing(missing: list[str]) -> dict:
    return {"ok": False, "reason": f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            f"installed in the job's environment ({sys.executable}): `pip install {' '.join(missing)}` there"}


def _report(status_path: str, result: dict) -> None:
    """Write the status the viewer waits for (with this pid); a failure to write never reaches the job."""
    result.setdefault("pid", os.getpid())
    try:
        write_status(status_path, result)
    except BaseException:  # noqa: BLE001 - nothing may reach the job
        pass


def write_status(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, path)


def missing_dependencies() -> list[str]:
    return [dist for module, dist in REQUIRED if importlib.util.find_spec(module) is None]


def injected_agent():
    agent = _injected["agent"]
    return agent if agent is not None and not agent.closed else None


def existing_agent() -> dict | None:
    """An agent this process already runs (explicit watch(), `vramtop run`, VRAMTOP=1), as a status."""
    from vramtop_agent import _autostart, discovery

    agent = _autostart.current_agent()
    if agent is not None:
        return {"ok": True, "already": True, "endpoint": agent.endpoint, "injected": False}
    if _autostart.started():  # zero-code start waiting for the first training forward
        return {"ok": True, "already": True, "endpoint": None, "injected": False}
    try:
        mine = [a for a in discovery.list_agents(clean=False) if a.get("pid") == os.getpid()]
    except Exception:
        mine = []
    if mine:
        return {"ok": True, "already": True, "endpoint": mine[0]["endpoint"], "injected": False}
    return None


def start() -> dict:
    agent = injected_agent()
    if agent is not None:
        return {"ok": True, "already": True, "endpoint": agent.endpoint, "injected": True}
    missing = missing_dependencies()
    if missing:
        return _missing(missing)
    torch = sys.modules.get("torch")
    if torch is None:
        return {"ok": False, "reason": "torch is not imported in this process"}
    if getattr(getattr(torch, "__spec__", None), "_initializing", False) or not hasattr(torch, "optim"):
        # The line ran inside `import torch`: importing the agent now would re-enter a half-built torch.
        return {"ok": False, "retry": True, "reason": "the job is still importing torch"}
    existing = existing_agent()
    if existing is not None:
        return existing
    import vramtop_agent
    from vramtop_agent import _autostart

    agent = vramtop_agent.watch(None, None, **_autostart.agent_options())
    _outermost_root_only(agent)
    # The viewer shows steps before the first hooked one as unknown, never as zero (wire schema: hello.injected).
    agent.mark_injected(time.time())
    _injected["agent"] = agent
    import atexit

    atexit.register(_stop_at_exit)
    return {"ok": True, "already": False, "endpoint": agent.endpoint, "injected": True}


def _module_calls_on_stack() -> int:
    """How many module calls (Module._call_impl frames) are running on this thread."""
    n = 0
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_call_impl" and code.co_filename.endswith("module.py"):
            n += 1
        frame = frame.f_back
    return n


def _outermost_root_only(agent) -> None:
    """Swap the agent's RootDetector for one that counts module calls on the stack.

    The job may be in the middle of a forward when the agent starts. Modules
    entered before the agent's global hooks existed took PyTorch's fast path,
    so the detector's depth counter never saw them and a decoder layer would
    look outermost. Counting `_call_impl` frames sees them all: the root is
    found at the next forward that starts with no module call running, and
    the first step reported is a whole one.
    """
    from vramtop_agent.autodetect import RootDetector, swap_root_detector

    class OutermostRootDetector(RootDetector):
        def _pre(self, module, args):
            if self.done or _module_calls_on_stack() != 1:
                return None
            self._local.depth = 0  # outermost by the stack, whatever the counter saw
            return super()._pre(module, args)

    swap_root_detector(agent, OutermostRootDetector)


def stop() -> dict:
    agent = injected_agent()
    if agent is None:
        existing = existing_agent()
        if existing is not None:
            return {"ok": False, "reason": "its agent was started by the job itself (watch(), `vramtop run` or "
                    "VRAMTOP=1), not injected: `vramtop detach` stops only injected agents"}
        return {"ok": True, "stopped": False}
    _injected["agent"] = None
    import atexit

    atexit.unregister(_stop_at_exit)
    agent.stop("detached")
    return {"ok": True, "stopped": True}


def _stop_at_exit() -> None:
    agent = injected_agent()
    if agent is not None:
        try:
            agent.stop("finished")
        except Exception:
            pass
