"""The whole job: one SessionState per rank, and where the ranks differ.

Pure Python, like vramtop.state: the job view renders it, the metrics
exporter reads it, tests drive it with messages. A member is one agent (one
process of the job), keyed by `member_key(info)` so that two nodes' rank 0
of unrelated jobs never collide; members are shown ordered by rank.

Imbalance compares the ranks block by block: per metric, the largest and
smallest value across the ranks that have reported it, flagged when the
spread is at least `ratio` of the largest and at least `floor` in absolute
terms. A block is compared by the most it held during the rank's last
finished step: the largest of the step's edge measurements (the blocks at
every phase edge, at the step's peak and at the end of forward) and of the
samples taken during the step. Live samples catch each rank in a different
phase, and the step peak's breakdown is a different moment on each rank (a
small batch peaks in the optimizer step, a large one at the end of
forward), so neither compares like with like; the per-step maximum of each
block does, and holds still from one step to the next. Before the first
step the live sample is used.

`group_jobs()` decides which agents belong to one job: same world size,
started within a few minutes of each other, one agent per rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vramtop.state import SessionState
from vramtop_agent.schema import BLOCK_KEYS
from vramtop_agent.vocabulary import is_number

IMBALANCE_RATIO = 0.10
BYTES_FLOOR = 1 << 20  # 1 MiB: differences below this are noise, not imbalance
TIME_FLOOR = 0.010  # 10 ms of step time
LAUNCH_WINDOW_S = 300.0  # ranks of one job start within this of each other

METRICS = (*BLOCK_KEYS, "peak", "step_time")
_FLOORS = {"step_time": TIME_FLOOR}


def member_key(info: dict) -> str:
    return f"{info.get('ssh_host') or 'local'}|{info.get('pid')}|{info.get('rank', 0)}"


@dataclass
class Imbalance:
    metric: str
    max: float
    min: float
    max_key: str
    min_key: str
    flagged: bool

    @property
    def spread(self) -> float:
        return self.max - self.min

    @property
    def ratio(self) -> float:
        return self.spread / self.max if self.max else 0.0


class JobState:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.members: dict[str, SessionState] = {}
        self.infos: dict[str, dict] = {}
        self._sampled: dict[str, dict[int, dict]] = {}  # key -> step -> most of each block seen in samples
        self.step_max: dict[str, dict] = {}  # key -> most of each block during the last finished step

    # ------------------------------------------------------------------ folding

    def add(self, key: str, info: dict | None = None) -> SessionState:
        st = self.members.get(key)
        if st is None:
            st = self.members[key] = SessionState(clock=self.clock)
        if info is not None:
            self.infos[key] = info
        return st

    def remove(self, key: str) -> None:
        self.members.pop(key, None)
        self.infos.pop(key, None)
        self._sampled.pop(key, None)
        self.step_max.pop(key, None)

    def apply(self, key: str, msg: dict) -> None:
        st = self.add(key)
        if msg.get("type") == "hello" and st._pid is not None and msg.get("pid") != st._pid:
            self._sampled.pop(key, None)  # a new process behind the same key
            self.step_max.pop(key, None)
        st.apply(msg)
        kind = msg["type"]
        if kind == "sample":
            per_step = self._sampled.setdefault(key, {})
            _fold_max(per_step.setdefault(msg["step"], {}), msg["blocks"])
            if len(per_step) > 4:  # keep the steps a late step message can still refer to
                for old in sorted(per_step)[:-4]:
                    del per_step[old]
        elif kind == "phase" and "blocks" in msg:
            _fold_max(self._sampled.setdefault(key, {}).setdefault(msg["step"], {}), msg["blocks"])
        elif kind == "step":
            most = dict(self._sampled.get(key, {}).pop(msg["step"], {}))
            _fold_max(most, msg.get("peak_blocks") or {})
            _fold_max(most, msg.get("eof_blocks") or {})
            self.step_max[key] = most

    # ------------------------------------------------------------------ who

    def rank(self, key: str) -> int:
        st = self.members.get(key)
        for m in (st and st.sample, st and st.hello, self.infos.get(key)):
            if m and isinstance(m.get("rank"), int):
                return m["rank"]
        return 0

    def node(self, key: str) -> str:
        st = self.members.get(key)
        h = (st.hello if st else None) or {}
        info = self.infos.get(key) or {}
        return str(h.get("node") or info.get("node") or h.get("host") or info.get("host") or "?")

    def pid(self, key: str) -> int | None:
        st = self.members.get(key)
        for m in (st and st.sample, st and st.hello, self.infos.get(key)):
            if m and isinstance(m.get("pid"), int):
                return m["pid"]
        return None

    def keys(self) -> list[str]:
        """Members in rank order (then node, pid)."""
        return sorted(self.members, key=lambda k: (self.rank(k), self.node(k), self.pid(k) or 0, k))

    def world_size(self) -> int | None:
        sizes = set()
        for k, st in self.members.items():
            ws = (st.hello or {}).get("world_size") or (self.infos.get(k) or {}).get("world_size")
            if isinstance(ws, int):
                sizes.add(ws)
        return max(sizes) if sizes else None

    # ------------------------------------------------------------------ numbers

    def values(self, key: str) -> dict:
        """What the job view shows for one rank, and the numbers imbalance compares."""
        st = self.members[key]
        last = st.last_step()
        s = st.sample or {}
        if key in self.step_max:
            blocks, basis = self.step_max[key], "step max"
        else:
            blocks, basis = dict(s.get("blocks") or {}), "live"
        out: dict = {k: blocks.get(k) for k in BLOCK_KEYS}
        out["basis"] = basis if blocks else None
        out["peak_blocks"] = dict(last.get("peak_blocks") or {}) if last else dict(s.get("blocks") or {})
        out["peak"] = last.get("peak") if last else None
        out["peak_phase"] = last.get("peak_phase") if last else None
        out["step_time"] = last.get("step_time") if last else None
        out["step"] = s.get("step", last.get("step") if last else None)
        out["phase"] = s.get("phase")
        live = st.history[-1] if st.history else None
        out["now"] = live.allocated if live else None
        out["reserved"] = live.reserved if live else None
        out["total"] = st.device_total()
        out["live_blocks"] = dict(s.get("blocks") or {})
        out["connection"] = st.connection()
        out["device"] = (st.hello or {}).get("device") or s.get("device") or (self.infos.get(key) or {}).get("device")
        return out

    def imbalance(self, ratio: float = IMBALANCE_RATIO, floor: int = BYTES_FLOOR,
                  keys: list[str] | None = None, values: dict | None = None) -> dict[str, Imbalance]:
        """Per metric: max vs min across the ranks (two or more) that have a value."""
        keys = self.keys() if keys is None else keys
        vals = values if values is not None else {k: self.values(k) for k in keys}
        out: dict[str, Imbalance] = {}
        for metric in METRICS:
            have = [(v[metric], k) for k, v in vals.items() if is_number(v.get(metric))]
            if len(have) < 2:
                continue
            hi_v, hi_k = max(have, key=lambda x: x[0])
            lo_v, lo_k = min(have, key=lambda x: x[0])
            spread = hi_v - lo_v
            flagged = spread > 0 and hi_v > 0 and spread / hi_v >= ratio and spread >= _FLOORS.get(metric, floor)
            out[metric] = Imbalance(metric, hi_v, lo_v, hi_k, lo_k, flagged)
        return out

    def step_range(self) -> tuple[int | None, int | None]:
        """(the slowest rank's current step, the fastest rank's): a rank that lags shows as a gap."""
        steps = [st.sample["step"] for st in self.members.values() if st.sample]
        return (min(steps), max(steps)) if steps else (None, None)

    def live_count(self) -> int:
        return sum(1 for st in self.members.values() if st.connection() == "live")


def _fold_max(into: dict, blocks) -> None:
    if not isinstance(blocks, dict):
        return
    for k in BLOCK_KEYS:
        v = blocks.get(k)
        if is_number(v) and v > into.get(k, -1):
            into[k] = v


# --------------------------------------------------------------------- grouping


def group_jobs(agents: list[dict], window_s: float = LAUNCH_WINDOW_S) -> list[list[dict]]:
    """Split agents into jobs: same world size (> 1), launched within `window_s`, each rank once.

    A single-process agent (world size 1) is a job of its own. Jobs come
    oldest first; each job's agents are in rank order.
    """
    jobs: list[list[dict]] = []
    open_jobs: dict[int, list[list[dict]]] = {}
    for a in sorted(agents, key=lambda a: (a.get("start_time") or 0.0, a.get("rank") or 0)):
        ws = a.get("world_size") or 1
        if ws <= 1:
            jobs.append([a])
            continue
        placed = False
        for job in open_jobs.get(ws, []):
            t0 = job[0].get("start_time") or 0.0
            ranks = {m.get("rank") for m in job}
            if (a.get("start_time") or 0.0) - t0 <= window_s and a.get("rank") not in ranks and len(job) < ws:
                job.append(a)
                placed = True
                break
        if not placed:
            job = [a]
            open_jobs.setdefault(ws, []).append(job)
            jobs.append(job)
    for job in jobs:
        job.sort(key=lambda a: (a.get("rank") or 0, str(a.get("node") or ""), a.get("pid") or 0))
    return jobs


def same_job(job: list[dict], window_s: float = LAUNCH_WINDOW_S):
    """A predicate: does an agent that appears later belong to `job` (a restarted or late rank)?"""
    ws = max((a.get("world_size") or 1) for a in job)
    t0 = min((a.get("start_time") or 0.0) for a in job)

    def match(a: dict) -> bool:
        return (a.get("world_size") or 1) == ws and ws > 1 and abs((a.get("start_time") or 0.0) - t0) <= window_s

    return match
