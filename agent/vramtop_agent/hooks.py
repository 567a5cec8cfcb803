"""Removing the hooks the agent installed: one place, since every part of the agent does it."""

from __future__ import annotations

from collections.abc import Iterable


def remove_hooks(handles: Iterable) -> None:
    """Remove every handle; one that fails (a module already gone, interpreter shutdown) never stops the rest."""
    for h in handles:
        try:
            h.remove()
        except Exception:  # noqa: BLE001 - the job must never see an error of ours
            pass
