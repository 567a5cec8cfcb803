"""Which steps track activations exactly, and what the others show.

Tracking (saved-tensor hooks, one Python call per saved tensor) is exact and
costs per op. It runs on the steps that decide the picture: the first
`FIRST_STEPS`, any forward whose input shape has not been tracked yet, the
step after a new model or optimizer, and one step in `every` (VRAMTOP_TRACK_EVERY,
`watch(track_every=N)`; 1 tracks every step).

By default (no `every` given) the periodic step is also at least
`DEFAULT_INTERVAL_S` after the last tracked one: one step in 20, or one every
10 s, whichever is rarer. A tracked step costs a launch-bound job about a
quarter of a step (bench/bench_agent.py); at 100 steps a second one in 20
would be 1.3 % of the run, one every 10 s is 0.03 %. A screen refreshed a few
times a second gains nothing from five exact counts a second, and what makes
a new count worth having (a new shape, model or optimizer) is tracked at once
whatever the interval. An explicit `every` is taken as it is.

On the steps in between, activations are derived at each phase edge:
- CUDA: allocated − parameters − gradients − optimizer − the `other` that
  the last tracked step of this shape showed at the same edge;
- CPU (no allocator counter): the value the last tracked step of this shape
  had at the same edge.
A tracked step checks the derivation: at its end of forward it computes what
the derivation would have said and reports both (`derived_check`).
"""

from __future__ import annotations

import time

BLOCKS_OF_STATE = ("parameters", "gradients", "optimizer")


class TrackingPolicy:
    DEFAULT_EVERY = 20
    DEFAULT_INTERVAL_S = 10.0
    FIRST_STEPS = 3
    MAX_SHAPES = 256

    def __init__(self, every: int | None = None, clock=time.monotonic) -> None:
        self.every = max(1, int(every)) if every is not None else self.DEFAULT_EVERY
        self.interval_s = self.DEFAULT_INTERVAL_S if every is None else 0.0
        self._clock = clock
        self._last_tracked_at = -1e18
        self.tracked = False  # the current (or last) forward's activations are tracked
        self.step_tracked = False
        self._force = True
        self._decided = False
        self._last_tracked_step: int | None = None
        self._shape: tuple | None = None
        self._known: set = set()  # shapes with a tracked end of forward
        self._act: dict = {}  # (shape, edge) -> activations at that edge on the last tracked step
        self._other: dict = {}  # (shape, edge) -> CUDA "other" there
        self._last_edge: tuple | None = None
        self._check: dict | None = None
        # Changes whenever what derive() answers may change (a tracked edge, a new shape): the agent reuses
        # an untracked edge's blocks while it holds (and the breakdown is the same object).
        self.version = 0

    def changed(self) -> None:
        """A new model or optimizer: the next step is tracked."""
        self._force = True

    def begin_forward(self, step: int, batch, enabled: bool) -> bool:
        shape = tuple(batch) if batch else None
        if shape != self._shape:
            self._shape = shape
            self.version += 1
        if not enabled:
            self.tracked = self.step_tracked = False
            return False
        if not self._decided:
            self._decided = True
            last = self._last_tracked_step
            self.step_tracked = (self.every <= 1 or self._force or step < self.FIRST_STEPS or last is None
                                 or (step - last >= self.every
                                     and self._clock() - self._last_tracked_at >= self.interval_s))
            self._force = False
        if self._shape not in self._known:
            self.step_tracked = True  # a shape never tracked: track it now
        self.tracked = self.step_tracked
        if self.tracked:
            self._last_tracked_step = step
            self._last_tracked_at = self._clock()
        return self.tracked

    def end_step(self) -> None:
        self._decided = False

    # ------------------------------------------------------------------ learning and deriving

    def learn(self, blocks: dict, allocated: int | None, edge: tuple) -> None:
        """A tracked edge: remember its activations (and CUDA `other`) for the derived steps."""
        key = (self._shape, edge)
        act = int(blocks.get("activations", 0))
        self.version += 1
        if edge == ("backward", "start"):
            if key in self._act:
                self._check = {"tracked": act, "derived": self._derived(blocks, allocated, key)}
            self._known.add(self._shape)
            if len(self._known) > self.MAX_SHAPES:  # dynamic shapes: forget, do not grow
                self._known = {self._shape}
                self._act = {k: v for k, v in self._act.items() if k[0] == self._shape}
                self._other = {k: v for k, v in self._other.items() if k[0] == self._shape}
        self._act[key] = act
        if allocated is not None:
            self._other[key] = allocated - act - sum(int(blocks.get(k, 0)) for k in BLOCKS_OF_STATE)
        self._last_edge = edge

    def derive(self, blocks: dict, allocated: int | None, edge: tuple | None) -> int:
        """Activations on an untracked step, at a phase edge (or between edges: as at the last one)."""
        if edge is None:
            edge = self._last_edge
        else:
            self._last_edge = edge
        return self._derived(blocks, allocated, (self._shape, edge))

    def _derived(self, blocks: dict, allocated: int | None, key) -> int:
        if allocated is not None and key in self._other:
            state = sum(int(blocks.get(k, 0)) for k in BLOCKS_OF_STATE)
            return max(int(allocated) - state - self._other[key], 0)
        return int(self._act.get(key, 0))

    def forward_done(self) -> None:
        """Between the end of forward and backward, derived samples show the end-of-forward value."""
        self._last_edge = ("backward", "start")

    def take_check(self) -> dict | None:
        check, self._check = self._check, None
        return check
