"""The two number helpers every part of the report uses: a share in percent, and an integer from untrusted data."""

from __future__ import annotations

from typing import Any

from vramtop_agent.vocabulary import is_number


def pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def as_int(x: Any) -> int:
    """An integer from untrusted data (0 when it is not a finite number)."""
    return int(x) if is_number(x) else 0
