"""What the viewer pulls its messages from, declared once.

Two shapes:
- `Source`: one agent's stream for the dashboard (vramtop.tui.app). LiveSource
  (this machine), NodeSource (the same, plus the GPUs while nothing is
  attached), RemoteSource (over ssh), ReplaySource (a recording) and the job
  view's per-rank view are Sources. `poll()` returns validated wire messages
  and never raises; the rest has a default here, so the app uses every
  attribute plainly instead of probing which ones a source happens to have.
- `KeyedSource`: every member of a job at once, as (member key, message)
  pairs (vramtop.job_source.JobSource); the job view and the metrics exporter
  pull from it.

The TUI calls these from its timers, on the app's thread; none of them blocks
except `list_agents` (the picker's fresh listing, which may run ssh).
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type: a source is imported before (and without) any rendering
    from rich.console import RenderableType


class _Described:
    """What both kinds of source show in the header and the footer."""

    if TYPE_CHECKING:
        # Read-only to the app, so a source may compute it (a property: RemoteSource, ReplaySource,
        # the job view's RankView) or store it (a plain attribute). The type checker sees the property;
        # at run time it is a plain "" default, which a property replaces and an instance may set.
        @property
        def describe(self) -> str:
            """Where the stream (or the members) come from, for the header ("" when there is nothing to say)."""
            return ""
    else:
        describe = ""
    status: str = ""  # one line for the footer; the app writes a polling error here


class Source(_Described, abc.ABC):
    """One agent's stream, as the dashboard reads it."""

    choices: Sequence[dict] = ()  # agents to pick from when discovery found several (the app shows its picker)

    @abc.abstractmethod
    def poll(self) -> list[dict]:
        """The validated messages that arrived since the last call (never raises)."""

    @property
    def rejected(self) -> tuple[int, str | None]:
        """Frames refused so far, and the last reason."""
        return 0, None

    def process_gone(self) -> bool:
        """True once the process being followed has exited (asked on every pump, even before a hello)."""
        return False

    def idle_view(self) -> RenderableType | None:
        """What the dashboard shows in place of the memory bar until a first sample arrives (None: the bar)."""
        return None

    def list_agents(self) -> list[dict]:
        """The agents the picker offers ('a'): those on this machine unless the source knows better."""
        from vramtop_agent import discovery

        return discovery.list_agents()

    def choose(self, info: dict) -> None:  # noqa: B027 - a deliberate no-op default, not a missing abstract
        """Follow the agent picked in the picker. A source that cannot switch agents ignores the pick."""

    def close(self) -> None:  # noqa: B027 - a deliberate no-op default: a source may hold nothing to release
        """Release sockets, tunnels, files. Called once, when the app unmounts."""

    def offer_agents(self, agents: list[dict], where: str, none_yet: str) -> None:
        """What a source does with a fresh listing of agents: follows the only one (`choose`), offers
        several to the picker (`choices`, status "N agents WHERE: pick one"), or, with none, says
        `none_yet` and keeps waiting."""
        if len(agents) == 1:
            self.choose(agents[0])
        elif agents:
            self.choices = agents
            self.status = f"{len(agents)} agents {where}: pick one"
        else:
            self.choices = []
            self.status = none_yet


class KeyedSource(_Described, abc.ABC):
    """Every member of a job: messages as (member key, message) pairs."""

    members: Mapping[str, Any] = MappingProxyType({})  # key -> something with `.info` (the agent's listing)
    gone: Collection[str] = frozenset()  # members whose process has exited (they stay in the view, marked)

    @abc.abstractmethod
    def poll(self, timeout_ms: int = 0) -> list[tuple[str, dict]]:
        """What the members sent since the last call; waits up to `timeout_ms` for the first message."""

    @property
    def rejected(self) -> tuple[int, str | None]:
        """Frames the members' streams refused so far, and a last reason (as Source.rejected)."""
        return 0, None

    def remove(self, key: str) -> None:  # noqa: B027 - a deliberate no-op default: nothing to forget
        """Stop following a member (the metrics exporter forgets long-silent agents)."""

    def close(self) -> None:  # noqa: B027 - a deliberate no-op default: a source may hold nothing to release
        """Release every member's sockets and tunnels."""
