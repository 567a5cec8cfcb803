"""Creep detection: memory that grows from step to step at the same phase edge.

Pure Python (no torch, no threads), fed with wire messages. It lives in the
agent's distribution only so that both writers of a recording (the agent's
in-process Recorder, run on the sampler thread that already exists, and
`vramtop record`) and the viewer (SessionState) run the same code; the
training thread never calls it, and the agent's publisher does not either.
Its cost is one append per message and a fit over `window` numbers per step.

Series, one point per optimizer step:
  allocated  the level at the end of the optimizer step (`phase` event, edge
             end): memory_allocated on CUDA, the tracked blocks on CPU;
  reserved   the lowest cuda.reserved sampled during the step (CUDA);
  rss        the lowest host RSS sampled during the step (CPU jobs only:
             on CUDA the host side is not what runs out). The agent reads
             RSS at most once a second (devices.host_stats), so a sample
             that repeats the previous value is stale and skipped: a point
             is a fresh reading, labelled with the step it was taken in.

A series creeps when, over the last `window` points after `warmup` steps:
  - the least-squares slope times the span is at least `min_growth(level)`
    (an absolute floor, and a fraction of the level: noise scales with it);
  - the fit explains the points (R^2 >= `min_r2`): a steady rise, not noise;
  - the medians of the window's four quarters rise each time, by at least
    1/16 of the growth: a one-off jump (the allocator taking a new segment,
    optimizer state created at step 1, a longer batch) rises once, not four
    times, so a healthy warm-up does not raise the alarm;
  - the second half of the window rises at least half as fast as the first:
    growth that slows down (the allocator's cache settling as ever-longer
    batches become rarer) is not a leak.
The first time a series creeps, `feed()` returns a `creep` event (schema type
"creep"); `current()` says, at every step, which series creep now.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from vramtop_agent.schema import SCHEMA_VERSION

SERIES = ("allocated", "reserved", "rss")
WARMUP_STEPS = 10
WINDOW = 32
MIN_POINTS = 12
MIN_R2 = 0.8
FLOOR_BYTES = {"allocated": 1 << 20, "reserved": 2 << 20, "rss": 4 << 20}
REL_FLOOR = 0.002  # the window's growth must also be >= 0.2 % of the level
MIN_HALF_RATIO = 0.5  # the second half of the window rises at least half as fast as the first


@dataclass
class Creep:
    """One series that creeps: the fitted slope and how long until its limit."""

    series: str
    slope: float            # bytes per step
    since_step: int         # first step of the window the slope was fitted on
    step: int               # last step seen
    level: int              # the series' last value
    r2: float
    limit: int | None = None          # the card (allocated, reserved) or host RAM (rss)
    steps_to_full: int | None = None
    seconds_to_full: float | None = None

    def to_dict(self) -> dict:
        return {"series": self.series, "slope": int(round(self.slope)), "since_step": self.since_step,
                "step": self.step, "level": self.level, "r2": round(self.r2, 4), "limit": self.limit,
                "steps_to_full": self.steps_to_full, "seconds_to_full": self.seconds_to_full}


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (slope, R^2) of value over step."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    syy = sum((p[1] - my) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    if sxx == 0:
        return 0.0, 0.0
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy else 0.0
    return slope, r2


def _median(xs: list[int]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def steady_rise(points: list[tuple[int, int]], growth: float) -> bool:
    """The window's four quarter-medians rise each time by at least growth/16."""
    q = len(points) // 4
    if q < 2:
        return False
    meds = [_median([v for _, v in points[i * q:(i + 1) * q if i < 3 else len(points)]]) for i in range(4)]
    return all(b - a >= growth / 16 and b > a for a, b in zip(meds, meds[1:]))


def detect(series: str, points: list[tuple[int, int]], warmup: int = WARMUP_STEPS, window: int = WINDOW,
           min_points: int = MIN_POINTS, min_r2: float = MIN_R2) -> Creep | None:
    """A Creep when the last `window` points after warm-up rise steadily beyond noise, else None."""
    pts = [p for p in points if p[0] >= warmup][-window:]
    if len(pts) < min_points:
        return None
    values = [v for _, v in pts]
    floor = max(FLOOR_BYTES.get(series, 1 << 20), REL_FLOOR * values[-1])
    if max(values) - min(values) < floor:
        return None  # flat within the floor: the common case, decided without a fit
    slope, r2 = fit(pts)
    growth = slope * (pts[-1][0] - pts[0][0])
    level = pts[-1][1]
    if slope <= 0 or growth < floor or r2 < min_r2:
        return None
    if not steady_rise(pts, growth):
        return None
    half = len(pts) // 2
    if fit(pts[half:])[0] < MIN_HALF_RATIO * fit(pts[:half])[0]:
        return None
    return Creep(series, slope, pts[0][0], pts[-1][0], level, r2)


class _StepMin:
    """The lowest value of a sampled quantity within each step (the step's trough)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.low: int | None = None

    def add(self, step: int, value: int) -> tuple[int, int] | None:
        """Feed a sample; returns the finished (step, low) when a new step begins."""
        done = None
        if self.step is not None and step != self.step and self.low is not None:
            done = (self.step, self.low)
            self.low = None
        self.step = step
        self.low = value if self.low is None else min(self.low, value)
        return done


class CreepWatch:
    """Creep detection for one agent (pid, rank): `feed()` every message of its stream."""

    def __init__(self, warmup: int = WARMUP_STEPS, window: int = WINDOW, min_points: int = MIN_POINTS,
                 track_current: bool = True) -> None:
        """track_current=False (the recorders): a series that raised its event is not fitted again,
        since only the first sighting is written; the viewer keeps fitting it for the live line."""
        self.warmup, self.window, self.min_points = warmup, window, min_points
        self.track_current = track_current
        self.points: dict[str, collections.deque] = {s: collections.deque(maxlen=window + warmup) for s in SERIES}
        self._mins = {"reserved": _StepMin(), "rss": _StepMin()}
        self.on_cuda: bool | None = None
        self._last_rss: int | None = None
        self.device_total: int | None = None
        self.host_available: int | None = None
        self.host_total: int | None = None
        self.step_times: collections.deque = collections.deque(maxlen=window)
        self.creeping: dict[str, Creep] = {}   # series -> its current creep (re-fitted every step)
        self.first_seen: dict[str, dict] = {}  # series -> the creep event emitted when first seen

    # ------------------------------------------------------------------ folding

    def feed(self, msg: dict) -> list[dict]:
        """Fold one wire message; returns the `creep` events it raised (at most one per series, ever)."""
        kind = msg.get("type")
        try:
            if kind == "hello":
                total = msg.get("device_total")
                if isinstance(total, int) and total > 0:
                    self.device_total = total
            elif kind == "sample":
                return self._on_sample(msg)
            elif kind == "phase" and msg.get("phase") == "optimizer" and msg.get("edge") == "end":
                return self._add(msg, "allocated", int(msg["step"]), int(msg["level"]))
            elif kind == "step" and isinstance(msg.get("step_time"), (int, float)):
                self.step_times.append(float(msg["step_time"]))
        except (KeyError, TypeError, ValueError):
            pass  # a message without what we need: nothing to fold
        return []

    def _on_sample(self, msg: dict) -> list[dict]:
        cuda, host = msg.get("cuda"), msg.get("host") or {}
        self.on_cuda = isinstance(cuda, dict)
        self.host_available, self.host_total = host.get("available"), host.get("total")
        nvml = msg.get("nvml") or {}
        if self.device_total is None and isinstance(nvml.get("total"), int):
            self.device_total = nvml["total"]
        step = int(msg["step"])
        if isinstance(cuda, dict):  # == self.on_cuda, spelled so the type narrows
            name, value = "reserved", cuda.get("reserved")
        else:
            name, value = "rss", host.get("rss")
        if not isinstance(value, int):
            return []
        if name == "rss":
            if value == self._last_rss:
                return []  # the agent's cached reading, not a new one
            self._last_rss = value
        done = self._mins[name].add(step, value)
        return self._add(msg, name, *done) if done else []

    def _add(self, msg: dict, series: str, step: int, value: int) -> list[dict]:
        pts = self.points[series]
        if pts and step <= pts[-1][0]:
            return []  # a restarted count or a repeated edge: keep the series monotone in steps
        if not self.track_current and series in self.first_seen:
            return []
        pts.append((step, value))
        creep = detect(series, list(pts), self.warmup, self.window, self.min_points)
        if creep is None:
            self.creeping.pop(series, None)
            return []
        self._time_to_full(creep)
        self.creeping[series] = creep
        if series in self.first_seen:
            return []
        event = {"v": SCHEMA_VERSION, "type": "creep", "t": msg.get("t", 0.0), "pid": msg.get("pid", 0),
                 "rank": msg.get("rank", 0), **creep.to_dict(), "on_cuda": bool(self.on_cuda)}
        self.first_seen[series] = event
        return [event]

    def _time_to_full(self, c: Creep) -> None:
        if c.series == "rss":
            c.limit = self.host_total if isinstance(self.host_total, int) else None
            room = self.host_available if isinstance(self.host_available, int) else None
        else:
            c.limit = self.device_total
            room = None if c.limit is None else c.limit - c.level
            if c.series == "allocated" and room is not None:
                reserved = self.points["reserved"]
                if reserved:  # what the allocator holds is gone too, even if not in use
                    room = c.limit - max(c.level, reserved[-1][1])
        if room is None or c.slope <= 0:
            return
        c.steps_to_full = max(int(room / c.slope), 0)
        if self.step_times:
            c.seconds_to_full = round(c.steps_to_full * _median(list(self.step_times)), 1)

    # ------------------------------------------------------------------ derived

    def current(self) -> list[Creep]:
        """The series creeping now, steepest first."""
        return sorted(self.creeping.values(), key=lambda c: -c.slope)
