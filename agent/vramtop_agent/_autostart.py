"""Zero-code start: the agent of a process nobody edited.

Entry points, all ending in `start()`:
- the `vramtop-autostart.pth` file in site-packages, when VRAMTOP=1 or
  VRAMTOP_RECORD=path is set (launchers that cannot wrap the command:
  torchrun, accelerate launch, deepspeed; every rank inherits the variables);
- `vramtop run -- CMD`, which sets them and puts `_boot/sitecustomize.py` on
  PYTHONPATH (for interpreters where the .pth is not installed);
- `python -m vramtop_agent script.py`.

Nothing heavy happens at interpreter start: `start()` only registers a
post-import hook for torch. When torch is imported, a RootDetector
(autodetect.py) watches module calls; the Agent is created at the first
training forward, with that forward's root module. So processes that import
torch but never train (the torchrun launcher, DataLoader workers, a
tokenizer subprocess) publish nothing, and every training process (every
rank) publishes its own stream: ranks come from RANK / LOCAL_RANK /
WORLD_SIZE, the ipc endpoint and discovery file are per pid and rank, and
VRAMTOP_RECORD may contain {rank}, {pid} and {host}.

Options from the environment: VRAMTOP_ENDPOINT (tcp://127.0.0.1:PORT gets
LOCAL_RANK added to PORT, so ranks on one node do not collide),
VRAMTOP_SAMPLE_HZ, VRAMTOP_RECORD.

This must never break the interpreter: every failure is swallowed with one
line on stderr, and the training job runs as if vramtop were absent.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from vramtop_agent.agent import Agent
    from vramtop_agent.autodetect import RootDetector

_OFF = ("", "0", "false", "no", "off")


class _State(TypedDict):
    started: bool
    agent: Agent | None
    detector: RootDetector | None
    options: dict[str, Any]


_state: _State = {"started": False, "agent": None, "detector": None, "options": {}}


def enabled(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("VRAMTOP", "").strip().lower() not in _OFF or bool(env.get("VRAMTOP_RECORD"))


def warn(what: str, exc: BaseException | None = None) -> None:
    try:
        text = f"vramtop: {what}" + (f" ({type(exc).__name__}: {exc})" if exc is not None else "")
        sys.stderr.write(text[:400] + "\n")
    except Exception:
        pass


def current_agent() -> Agent | None:
    """The agent this module started in this process, if any."""
    agent = _state["agent"]
    if agent is not None and agent.closed:
        return None
    return agent


def started() -> bool:
    """True once start() ran here: an agent runs, or waits for the first training forward."""
    return _state["started"]


def start_from_env() -> None:
    """Called by the .pth line and sitecustomize: start when the environment asks for it."""
    try:
        if enabled():
            start()
    except Exception as exc:
        warn("agent not started", exc)


def start(**options) -> None:
    """Arrange for an agent to watch this process's training (idempotent, cheap, never raises)."""
    try:
        if _state["started"]:
            return
        _state["started"] = True
        _state["options"] = dict(options)
        if "torch" in sys.modules and hasattr(sys.modules["torch"], "nn"):
            _on_torch()
        else:
            sys.meta_path.insert(0, _TorchImportWatcher())
    except Exception as exc:
        warn("agent not started", exc)


class _TorchImportWatcher:
    """A meta path finder that notices `import torch` finishing, then runs `_on_torch` once.

    It returns the spec the other finders find, with the loader's exec_module
    wrapped for this spec only. A mere `importlib.util.find_spec("torch")`
    (availability checks in transformers and others) gets a wrapped spec that
    is never executed, so the watcher stays until torch really loads.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            loader = getattr(spec, "loader", None) if spec is not None else None
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            original = loader.exec_module
            watcher = self

            def exec_module(module):
                original(module)  # torch's own errors propagate untouched
                try:
                    del loader.exec_module  # back to the class's method
                except Exception:
                    pass
                try:
                    sys.meta_path.remove(watcher)
                except ValueError:
                    pass
                try:
                    _on_torch()
                except Exception as exc:
                    warn("agent not started", exc)

            loader.exec_module = exec_module
            return spec
        except Exception as exc:
            warn("agent not started", exc)
            return None


def _on_torch() -> None:
    from vramtop_agent.autodetect import RootDetector

    if _state["detector"] is not None:
        return
    _state["detector"] = RootDetector(_found, on_error=lambda exc: warn("agent not started", exc)).install()


def _found(module, args, kwargs) -> None:
    from vramtop_agent import lifecycle
    from vramtop_agent.autodetect import watched_by_agent

    if _state["agent"] is not None or watched_by_agent(module) or lifecycle.reusable(module) is not None:
        return  # an explicit vramtop_agent.watch(model) or an integration callback already watches it
    options = agent_options()
    import vramtop_agent

    agent = vramtop_agent.watch(module, **options)
    _state["agent"] = agent
    import atexit

    atexit.register(_stop_at_exit)
    # watch() attached the model inside this call's global pre hook: replay the agent's own pre hook.
    agent.mark_forward_start(module, args, kwargs)


def agent_options() -> dict:
    """watch() options of a zero-code agent: start()'s, then VRAMTOP_ENDPOINT (per rank) and VRAMTOP_SAMPLE_HZ."""
    opts = dict(_state["options"])
    env = os.environ
    if "endpoint" not in opts and env.get("VRAMTOP_ENDPOINT"):
        opts["endpoint"] = per_rank_endpoint(env["VRAMTOP_ENDPOINT"], _int(env.get("LOCAL_RANK"), 0))
    if "sample_hz" not in opts and env.get("VRAMTOP_SAMPLE_HZ"):
        try:
            opts["sample_hz"] = float(env["VRAMTOP_SAMPLE_HZ"])
        except ValueError:
            warn(f"ignoring VRAMTOP_SAMPLE_HZ={env['VRAMTOP_SAMPLE_HZ']!r}")
    return opts


def per_rank_endpoint(endpoint: str, local_rank: int) -> str:
    """tcp://host:PORT -> tcp://host:PORT+local_rank (port 0, ipc and others unchanged)."""
    if not endpoint.startswith("tcp://") or local_rank <= 0:
        return endpoint
    head, _, port = endpoint.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return endpoint
    return f"{head}:{int(port) + local_rank}"


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _stop_at_exit() -> None:
    agent = _state["agent"]
    if agent is None:
        return
    try:
        failed = getattr(sys, "last_type", None) is not None or getattr(sys, "last_exc", None) is not None
        agent.stop("exception" if failed else "finished")
    except Exception:
        pass
