"""Removing the hooks the agent installed: one place, since every part of the agent does it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class HookHandle(Protocol):
    """What the agent holds for every hook it installs: torch's RemovableHandle, or one of its own."""

    def remove(self) -> None: ...


def remove_hooks(handles: Iterable[HookHandle]) -> None:
    """Remove every handle; one that fails (a module already gone, interpreter shutdown) never stops the rest."""
    for h in handles:
        try:
            h.remove()
        except Exception:  # noqa: BLE001 - the job must never see an error of ours
            pass
