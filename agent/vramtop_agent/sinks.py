"""Where the agent's messages go: the `Sink` interface the publisher and the recorder implement.

The agent's I/O thread hands each tick's messages to every sink with one
`send_many` call (the publisher packs the tick's events into one frame: fewer
sends, fewer GIL hand-offs with the training thread). `flush` is called when
the process is about to die of an OOM, so that a recording has it on disk.

A caller of `watch(sinks=[...])` may pass anything with `send(msg)` and
`close()`; `as_sink` wraps such an object once, when the agent takes it, so
the agent never has to ask a sink what it can do.

Every sink gets the same message objects, and the agent reuses the nested
`blocks` maps of a step's phase edges for the next step's while nothing
behind them changed: a sink reads what it gets, and copies what it would
change.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


class MessageSink(Protocol):
    """The least a sink given to `watch(sinks=...)` must do."""

    def send(self, msg: dict[str, Any]) -> Any: ...

    def close(self) -> None: ...


@runtime_checkable
class Sink(MessageSink, Protocol):
    """What the agent calls on every sink it holds (Publisher, Recorder, SendEach)."""

    def send_many(self, msgs: list[dict[str, Any]]) -> None:
        """Take one tick's messages, in order; raise after taking the rest if one failed."""
        ...

    def flush(self, timeout: float | None = None) -> None:
        """Get what was taken to its destination now (a no-op where send already did)."""
        ...


class SendEach:
    """A `MessageSink` as a `Sink`: `send_many` sends one message at a time."""

    def __init__(self, wrapped: MessageSink):
        self.wrapped = wrapped

    def send(self, msg: dict[str, Any]) -> Any:
        return self.wrapped.send(msg)

    def send_many(self, msgs: list[dict[str, Any]]) -> None:
        send_each(self.wrapped.send, msgs)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        self.wrapped.close()


def send_each(send, msgs: list[dict[str, Any]]) -> None:
    """`send` every message; one that fails never stops the rest; the first failure is raised at the end."""
    failure: Exception | None = None
    for msg in msgs:
        try:
            send(msg)
        except Exception as exc:  # noqa: BLE001 - raised below, to the agent's error count
            failure = failure or exc
    if failure is not None:
        raise failure


def as_sink(sink: MessageSink) -> Sink:
    """`sink` itself when it is a whole `Sink`, else wrapped in `SendEach`."""
    return sink if isinstance(sink, Sink) else SendEach(sink)


def sink_name(sink: Sink) -> str:
    """The class name errors of this sink are counted under (`sink-<name>`)."""
    return type(sink.wrapped if isinstance(sink, SendEach) else sink).__name__
