"""vramtop's in-process agent.

    import vramtop_agent
    with vramtop_agent.watch(model, optimizer):
        train()

It categorizes the job's memory (parameters, gradients, optimizer states,
activations, other), tracks the forward / backward / optimizer phases and
their peaks, and publishes versioned snapshots over ZeroMQ for `vramtop
attach`. It imports torch, pyzmq, msgpack, psutil and pynvml lazily, and
nothing of the viewer.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["watch", "Agent", "__version__"]


def watch(model=None, optimizer=None, **options):
    """Start watching this process; returns the Agent (also a context manager).

    model:     the root module whose forward is one training forward pass
               (found automatically later when omitted, see `vramtop run`).
    optimizer: the optimizer whose step ends a training step (any optimizer
               that steps is adopted when omitted).
    options:   endpoint="tcp://127.0.0.1:5555" (default: an ipc socket in a
               per-user 0700 directory), publish=True, sample_hz=10.0,
               hwm=1000, allow_remote=False, curve_secret_key=None (a Z85
               secret key or a `.key_secret` file: CURVE encryption, see
               docs/security.md; VRAMTOP_CURVE_SECRET_KEY=FILE does the same),
               curve_client_keys=None (viewer public keys / key files / a
               directory of *.key: only they may subscribe),
               track_activations=True, reset_peaks=True, record=None (path of
               a recording; VRAMTOP_RECORD in the environment does the same).

    A model this process already watches (the same module, one inside it or
    one around it, also by `vramtop run`'s zero-code agent) is not watched
    twice: the running agent is returned, held once more, and its stop()
    (or `with` exit) releases that hold only. Its other options stay.
    Never raises for reasons of its own: where the machine refuses (a runtime
    directory of another user, a port in use) the agent does not publish and
    says so once on stderr; wrong options (a non-loopback endpoint without
    allow_remote, a bad key) still raise.
    """
    from vramtop_agent import lifecycle

    running = lifecycle.reusable(model)  # one agent per model: nested / repeated watch() joins it
    if running is not None:
        if model is not None and running.model is None:
            running.attach_model(model)
        return running.rejoin(optimizer, options.get("record"))
    from vramtop_agent.agent import Agent

    return Agent(model, optimizer, **options)


def __getattr__(name):
    if name == "Agent":
        from vramtop_agent.agent import Agent

        return Agent
    raise AttributeError(name)
