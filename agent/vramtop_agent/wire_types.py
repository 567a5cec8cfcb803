"""Typed views of the wire messages (schema.py), for readers and type checkers.

Each message is a `<Type>Msg` TypedDict: the required fields in a total class,
the optional ones in a `total=False` subclass (Python 3.10 has no NotRequired).
`validate()` in schema.py stays the one check at run time; tests/test_wire_types.py
checks these key sets against its field tables so that the two cannot drift.
"""

from __future__ import annotations

from typing import Any, TypedDict

Blocks = dict[str, int]  # vocabulary.BLOCK_KEYS -> bytes


class _Common(TypedDict):
    v: int
    type: str
    t: float
    pid: int
    rank: int


class _Event(_Common):
    eseq: int


class _SampleRequired(_Common):
    seq: int
    step: int
    phase: str
    device: str
    blocks: Blocks
    params_split: dict[str, int]
    devices: dict[str, Blocks]
    host: dict[str, int]
    dropped: int
    errors: int


class SampleMsg(_SampleRequired, total=False):
    cuda: dict[str, int]
    nvml: dict[str, int]
    batch: list[int] | None
    last_error: str | None
    source: str
    activations_source: str
    gradients_source: str
    activations_by_module: dict[str, int]


class _HelloRequired(_Event):
    host: str
    cmdline: list[str]
    start_time: float
    agent_version: str
    device: str
    sample_hz: float


class HelloMsg(_HelloRequired, total=False):
    node: str
    local_rank: int
    world_size: int
    torch_version: str | None
    device_name: str | None
    device_total: int | None
    model: dict[str, Any] | None
    optimizer: dict[str, Any] | None
    estimate: dict[str, Any] | None
    training: dict[str, Any] | None
    injected: dict[str, Any] | None


class _PhaseRequired(_Event):
    step: int
    phase: str
    edge: str
    level: int


class PhaseMsg(_PhaseRequired, total=False):
    blocks: Blocks


class _StepRequired(_Event):
    step: int
    step_time: float | None
    micro_steps: int
    peaks: dict[str, int]
    end_of_forward: int
    backward_spike: int
    peak: int
    peak_phase: str
    peak_blocks: Blocks


class StepMsg(_StepRequired, total=False):
    batch: list[int] | None
    eof_blocks: Blocks
    eof_activations_by_module: dict[str, int]
    activations_source: str
    gradients_source: str
    derived_check: dict[str, Any]


class _ErrorRequired(_Event):
    where: str
    message: str
    count: int


class ErrorMsg(_ErrorRequired, total=False):
    trace: str


class _OomRequired(_Event):
    step: int
    phase: str
    requested: int | None
    message: str
    blocks: Blocks


class OomMsg(_OomRequired, total=False):
    cuda: dict[str, int]
    segments: list[dict[str, Any]]
    exception: str
    where: str
    device: str
    batch: list[int] | None
    memory_stats: dict[str, float]
    memory_viz: str


class ByeMsg(_Event):
    reason: str


class _CreepRequired(_Common):
    series: str
    slope: int
    step: int
    since_step: int
    level: int


class CreepMsg(_CreepRequired, total=False):
    limit: int | None
    steps_to_full: int | None
    seconds_to_full: float | None


# schema type -> its TypedDict
BY_TYPE: dict[str, type] = {
    "sample": SampleMsg, "hello": HelloMsg, "phase": PhaseMsg, "step": StepMsg, "error": ErrorMsg,
    "oom": OomMsg, "bye": ByeMsg, "creep": CreepMsg,
}
