"""What the agent learns about one optimizer step while it runs; a fresh one begins with every step.

Touched only by the training thread (and autograd's, in backward) at the
phase edges and in samples, never per op.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepState:
    micro_steps: int = 0  # forward/backward passes (a forward counts once its backward starts)
    backward_done: bool = False  # a backward ended since the step began: the optimizer phase may start
    phase_peak: dict[str, int] = field(default_factory=dict)  # phase -> highest bytes seen in it
    forward_end_level: int = 0  # bytes in use when the forward ended (= backward started)
    forward_end_blocks: dict | None = None  # the blocks that made up forward_end_level
    forward_end_by_module: dict | None = None  # activations per top-level module then (tracked steps)
    best_level: int = -1  # the highest level measured at an edge or sample of this step ...
    best_blocks: dict | None = None  # ... and its blocks: the make-up reported for the step's peak
