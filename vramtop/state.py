"""The viewer's model: the agent's stream folded into state.

Pure Python, no terminal, no sockets: the TUI renders it, tests drive it
with messages, replay feeds it from a recording. `apply()` takes one decoded
and validated wire message (see vramtop_agent.schema).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from vramtop_agent.schema import BLOCK_KEYS

HISTORY = 3000  # samples kept for the timeline (5 minutes at 10 Hz)
STALE_AFTER = 2.0  # seconds without a frame before the view says so


@dataclass
class Segment:
    """One piece of the memory bar."""

    key: str
    label: str
    nbytes: int


@dataclass
class Point:
    """One timeline sample: what the allocator (or, on CPU, the bookkeeping) held."""

    t: float
    allocated: int
    reserved: int | None
    phase: str
    step: int


class SessionState:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.hello: dict | None = None
        self.sample: dict | None = None
        self.history: collections.deque[Point] = collections.deque(maxlen=HISTORY)
        self.steps: collections.deque[dict] = collections.deque(maxlen=1000)
        self.phase_marks: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=HISTORY)
        self.errors: collections.deque[dict] = collections.deque(maxlen=50)
        self.ooms: list[dict] = []
        self.last_frame_at: float | None = None  # viewer clock
        self.last_msg_t: float | None = None  # agent clock (replay uses it as "now")
        self.bye: dict | None = None
        self.process_gone = False
        self.missed_events = 0  # gaps in the agent's event sequence: frames lost on the way
        self.rejected_frames = 0  # frames the viewer refused (malformed, too big, newer schema)
        self.last_rejection: str | None = None
        self._last_eseq: int | None = None
        self._pid: int | None = None
        self.endpoint: str | None = None

    # ------------------------------------------------------------------ folding

    def apply(self, msg: dict) -> None:
        pid = msg.get("pid")
        if self._pid is not None and pid != self._pid and msg.get("type") == "hello":
            self._reset_for_new_process()
        self._pid = pid
        self.last_frame_at = self.clock()
        self.last_msg_t = msg.get("t", self.last_msg_t)
        kind = msg["type"]
        if "eseq" in msg:
            eseq = msg["eseq"]
            if self._last_eseq is not None and eseq > self._last_eseq + 1:
                self.missed_events += eseq - self._last_eseq - 1
            if self._last_eseq is None or eseq > self._last_eseq:
                self._last_eseq = eseq
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(msg)

    def reject(self, reason: str) -> None:
        self.rejected_frames += 1
        self.last_rejection = reason

    def _reset_for_new_process(self) -> None:
        keep_rejected, keep_reason = self.rejected_frames, self.last_rejection
        self.__init__(self.clock)
        self.rejected_frames, self.last_rejection = keep_rejected, keep_reason

    def _on_hello(self, msg: dict) -> None:
        self.hello = msg
        self.bye = None

    def _on_sample(self, msg: dict) -> None:
        self.sample = msg
        cuda = msg.get("cuda")
        if cuda:
            allocated, reserved = cuda["allocated"], cuda["reserved"]
        else:
            allocated, reserved = sum(msg["blocks"].values()), None
        self.history.append(Point(msg["t"], allocated, reserved, msg["phase"], msg["step"]))

    def _on_phase(self, msg: dict) -> None:
        self.phase_marks.append((msg["t"], msg["phase"], msg["edge"]))

    def _on_step(self, msg: dict) -> None:
        self.steps.append(msg)

    def _on_error(self, msg: dict) -> None:
        self.errors.append(msg)

    def _on_oom(self, msg: dict) -> None:
        self.ooms.append(msg)

    def _on_bye(self, msg: dict) -> None:
        self.bye = msg

    # ------------------------------------------------------------------ derived

    @property
    def on_cuda(self) -> bool:
        return bool(self.sample and "cuda" in self.sample)

    def connection(self, now: float | None = None) -> str:
        """live | stale | ended | gone | waiting, for the header."""
        if self.bye is not None:
            return "ended"
        if self.process_gone:
            return "gone"
        if self.last_frame_at is None:
            return "waiting"
        now = self.clock() if now is None else now
        return "live" if now - self.last_frame_at < STALE_AFTER else "stale"

    def seconds_since_frame(self, now: float | None = None) -> float | None:
        if self.last_frame_at is None:
            return None
        return (self.clock() if now is None else now) - self.last_frame_at

    def device_total(self) -> int | None:
        s = self.sample or {}
        if "nvml" in s and s["nvml"].get("total"):
            return int(s["nvml"]["total"])
        if self.hello and self.hello.get("device_total"):
            return int(self.hello["device_total"])
        host = s.get("host") or {}
        return host.get("total")

    def segments(self) -> list[Segment]:
        """The memory bar, left to right, summing to the device's total when it is known.

        CUDA: the four blocks + other (= allocated), then reserved - allocated
        (the caching allocator's cache and fragmentation), then what the process
        holds outside PyTorch (NVML process use - reserved: CUDA context,
        cuBLAS/NCCL workspaces), other processes, free.
        CPU: the four blocks + other, the rest of the process's RSS (interpreter,
        libraries, untracked tensors), other processes, free.
        """
        s = self.sample
        if s is None:
            return []
        blocks = s["blocks"]
        segs = [Segment(k, _BLOCK_LABELS[k], int(blocks.get(k, 0))) for k in BLOCK_KEYS]
        tracked = sum(x.nbytes for x in segs)
        total = self.device_total()
        if "cuda" in s:
            cuda = s["cuda"]
            segs.append(Segment("cache", "cache/frag", max(cuda["reserved"] - cuda["allocated"], 0)))
            nv = s.get("nvml") or {}
            if "process_used" in nv:
                segs.append(Segment("nonpytorch", "non-PyTorch", max(nv["process_used"] - cuda["reserved"], 0)))
                if "used" in nv:
                    segs.append(Segment("others", "other procs", max(nv["used"] - nv["process_used"], 0)))
            elif "used" in nv:
                # The driver hides per-process use (containers): everything beyond reserved is outside PyTorch.
                segs.append(Segment("nonpytorch", "non-PyTorch", max(nv["used"] - cuda["reserved"], 0)))
            if total:
                used = sum(x.nbytes for x in segs[5:]) + cuda["allocated"]
                segs.append(Segment("free", "free", max(total - used, 0)))
        else:
            host = s.get("host") or {}
            rss = host.get("rss")
            if rss is not None:
                segs.append(Segment("process", "process (untracked)", max(rss - tracked, 0)))
            if host.get("total") and host.get("available") is not None:
                used_by_others = max(host["total"] - host["available"] - (rss or 0), 0)
                segs.append(Segment("others", "other procs", used_by_others))
                segs.append(Segment("free", "free", int(host["available"])))
        return segs

    def last_step(self) -> dict | None:
        return self.steps[-1] if self.steps else None

    def peak_step(self) -> dict | None:
        return max(self.steps, key=lambda s: s["peak"]) if self.steps else None


_BLOCK_LABELS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer": "optimizer",
    "activations": "activations",
    "other": "other",
}
