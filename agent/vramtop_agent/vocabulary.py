"""The words vramtop uses for memory, in one place: the blocks, the phases, and how a size is written.

Every view (dashboard, job view, report, estimator CLI, metrics, export) takes
its block names, labels and colours, and every byte count it prints, from here,
so 150 MiB reads "150 MiB" everywhere. It lives in the agent distribution
because the agent's schema and estimator use it too; it imports nothing.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple


class Block(NamedTuple):
    key: str      # as on the wire (snapshot()["blocks"], schema.BLOCK_KEYS)
    label: str    # in sentences and table headers
    short: str    # where a column is narrow
    colour: str   # the dashboard's and the report's colour for it


# The four blocks of training memory plus "other", in stack order. The wire's
# blocks are exactly these keys: changing them changes the schema.
BLOCKS: tuple[Block, ...] = (
    Block("parameters", "parameters", "params", "#4e79a7"),
    Block("gradients", "gradients", "grads", "#f28e2b"),
    Block("optimizer", "optimizer", "optim", "#e15759"),
    Block("activations", "activations", "acts", "#59a14f"),
    Block("other", "other", "other", "#b07aa1"),
)
BLOCK_KEYS: tuple[str, ...] = tuple(b.key for b in BLOCKS)

# What the viewer draws beside the blocks: the allocator's cache, what lies
# outside PyTorch, the other processes on the card, and what is free.
REGIONS: tuple[Block, ...] = (
    Block("cache", "cache/frag", "cache", "#edc948"),
    Block("nonpytorch", "non-PyTorch", "non-torch", "#9c755f"),
    Block("process", "process (untracked)", "process", "#9c755f"),
    Block("others", "other procs", "others", "#79706e"),
    Block("free", "free", "free", "#3a3a3a"),
)

COLOURS: dict[str, str] = {b.key: b.colour for b in (*BLOCKS, *REGIONS)}
LABELS: dict[str, str] = {b.key: b.label for b in (*BLOCKS, *REGIONS)}
SHORT: dict[str, str] = {b.key: b.short for b in (*BLOCKS, *REGIONS)}

PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")
# A phase's one-letter mark on the timeline and its colour.
PHASE_STYLE: dict[str, tuple[str, str]] = {
    "forward": ("F", "#59a14f"), "backward": ("B", "#e15759"), "optimizer": ("O", "#4e79a7"),
    "idle": ("·", "#666666"),
}


def is_number(x: object) -> bool:
    """A finite int or float that is not a bool: what a size or a time from the wire must be."""
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True  # every int is finite (math.isfinite would overflow on 10**400)
    return isinstance(x, float) and math.isfinite(x)


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def fmt_bytes(n: object) -> str:
    """Three significant digits in binary units: '512 B', '1.50 GiB', '12.3 MiB', '150 MiB', '5.00 TiB'.

    Anything that is not a finite number prints as '-' (a view never crashes on a bad field).
    """
    if not is_number(n):
        return "-"
    try:
        value = float(n)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond any float: not a size anyone has
        return "-"
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if unit == "B" and value < 1024:
            return f"{sign}{value:.0f} B"
        if unit != "B":
            # Round first: 1023.9 MiB would otherwise print as "1024 MiB".
            if round(value, 2) < 10:
                return f"{sign}{value:.2f} {unit}"
            if round(value, 1) < 100:
                return f"{sign}{value:.1f} {unit}"
            if round(value) < 1024 or unit == _UNITS[-1]:
                return f"{sign}{value:.0f} {unit}"
        value /= 1024
    return f"{sign}{value:.0f} {_UNITS[-1]}"  # pragma: no cover


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 2**10, "ki": 2**10,
    "m": 1000**2, "mb": 1000**2, "mib": 2**20, "mi": 2**20,
    "g": 1000**3, "gb": 1000**3, "gib": 2**30, "gi": 2**30,
    "t": 1000**4, "tb": 1000**4, "tib": 2**40, "ti": 2**40,
}


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '80g', '1.5e9' -> bytes; a ValueError that says what a size looks like otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (try 24GiB or 80GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
