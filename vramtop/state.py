"""The viewer's model: the agent's stream folded into state.

Pure Python, no terminal, no sockets: the TUI renders it, tests drive it
with messages, replay feeds it from a recording. `apply()` takes one decoded
and validated wire message (see vramtop_agent.schema).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from vramtop_agent.creep import CreepWatch
from vramtop_agent.schema import BLOCK_KEYS
from vramtop_agent.vocabulary import LABELS, is_number

HISTORY = 3000  # samples kept for the timeline (5 minutes at 10 Hz)
STALE_AFTER = 2.0  # seconds without a frame before the view says so
MAX_OOMS = 100  # OOM events kept (each can carry a segment map of megabytes)


def byte_count(x) -> int | None:
    """A byte count from a validated message: an int >= 0, or None when absent or unusable.

    schema.validate() already refuses negative and non-finite sizes; this keeps the
    view safe whatever reaches it (a recording, a future field, a test).
    """
    return int(x) if is_number(x) and x >= 0 else None


def dict_field(msg: dict, key: str) -> dict:
    """A message's sub-record (a sample's `nvml`, `host`, `cuda`) when it is one, else an empty dict."""
    value = msg.get(key)
    return value if isinstance(value, dict) else {}


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
    """count_event_gaps: a gap in the events' `eseq` is a lost frame (live). Replay passes False:
    a recording stores repeated hellos once, so its event numbers have gaps that lost nothing."""

    def __init__(self, clock=time.time, count_event_gaps: bool = True) -> None:
        self.clock = clock
        self.count_event_gaps = count_event_gaps
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
        self.creep = CreepWatch()  # the viewer's own creep detection (vramtop_agent.creep)
        self.creep_events: dict[str, dict] = {}  # series -> first creep event (computed here or recorded)

    # ------------------------------------------------------------------ folding

    def apply(self, msg: dict) -> None:
        pid = msg.get("pid")
        if self._pid is not None and pid != self._pid:
            # Another process (a restarted job found again by discovery): its first frame may be a
            # sample rather than its hello, which PUB/SUB does not guarantee to deliver first.
            self._reset_for_new_process()
        self._pid = pid
        self.last_frame_at = self.clock()
        self.last_msg_t = msg.get("t", self.last_msg_t)
        kind = msg["type"]
        if "eseq" in msg:
            eseq = msg["eseq"]
            if self.count_event_gaps and self._last_eseq is not None and eseq > self._last_eseq + 1:
                self.missed_events += eseq - self._last_eseq - 1
            if self._last_eseq is None or eseq > self._last_eseq:
                self._last_eseq = eseq
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(msg)
        for event in self.creep.feed(msg):
            self._on_creep(event)

    def reject(self, reason: str) -> None:
        self.rejected_frames += 1
        self.last_rejection = reason

    def _reset_for_new_process(self) -> None:
        keep_rejected, keep_reason = self.rejected_frames, self.last_rejection
        SessionState.__init__(self, self.clock, self.count_event_gaps)  # every field back to its start
        self.rejected_frames, self.last_rejection = keep_rejected, keep_reason

    def _on_hello(self, msg: dict) -> None:
        self.hello = msg
        self.bye = None

    def _on_sample(self, msg: dict) -> None:
        self.sample = msg
        cuda = msg.get("cuda")
        allocated = reserved = None
        if isinstance(cuda, dict):
            allocated, reserved = byte_count(cuda.get("allocated")), byte_count(cuda.get("reserved"))
        if allocated is None:
            allocated = self.tracked()
        self.history.append(Point(msg["t"], allocated, reserved, msg["phase"], msg["step"]))

    def _on_phase(self, msg: dict) -> None:
        self.phase_marks.append((msg["t"], msg["phase"], msg["edge"]))

    def _on_step(self, msg: dict) -> None:
        self.steps.append(msg)

    def _on_error(self, msg: dict) -> None:
        self.errors.append(msg)

    def _on_oom(self, msg: dict) -> None:
        self.ooms.append(msg)
        del self.ooms[:-MAX_OOMS]

    def _on_creep(self, msg: dict) -> None:
        self.creep_events.setdefault(str(msg.get("series")), msg)

    def _on_bye(self, msg: dict) -> None:
        self.bye = msg

    # ------------------------------------------------------------------ derived

    @property
    def on_cuda(self) -> bool:
        return bool(self.sample and isinstance(self.sample.get("cuda"), dict))

    def tracked(self) -> int:
        """The four blocks + other of the latest sample, in bytes."""
        blocks = (self.sample or {}).get("blocks") or {}
        return sum(byte_count(blocks.get(k)) or 0 for k in BLOCK_KEYS)

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
        nv = dict_field(s, "nvml")
        if byte_count(nv.get("total")):
            return byte_count(nv["total"])
        if self.hello and byte_count(self.hello.get("device_total")):
            return byte_count(self.hello["device_total"])
        host = dict_field(s, "host")
        return byte_count(host.get("total"))

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
        segs = [Segment(k, LABELS[k], byte_count(blocks.get(k)) or 0) for k in BLOCK_KEYS]
        tracked = sum(x.nbytes for x in segs)
        total = self.device_total()
        if self.on_cuda:
            cuda = s["cuda"]
            allocated = byte_count(cuda.get("allocated")) or 0
            reserved = byte_count(cuda.get("reserved")) or 0
            segs.append(Segment("cache", LABELS["cache"], max(reserved - allocated, 0)))
            nv = dict_field(s, "nvml")
            process_used, used = byte_count(nv.get("process_used")), byte_count(nv.get("used"))
            if process_used is not None:
                segs.append(Segment("nonpytorch", LABELS["nonpytorch"], max(process_used - reserved, 0)))
                if used is not None:
                    segs.append(Segment("others", LABELS["others"], max(used - process_used, 0)))
            elif used is not None:
                # The driver hides per-process use (containers): everything beyond reserved is outside PyTorch.
                segs.append(Segment("nonpytorch", LABELS["nonpytorch"], max(used - reserved, 0)))
            if total:
                used = sum(x.nbytes for x in segs[5:]) + allocated
                segs.append(Segment("free", LABELS["free"], max(total - used, 0)))
        else:
            host = dict_field(s, "host")
            rss, host_total = byte_count(host.get("rss")), byte_count(host.get("total"))
            available = byte_count(host.get("available"))
            if rss is not None:
                segs.append(Segment("process", LABELS["process"], max(rss - tracked, 0)))
            if host_total and available is not None:
                used_by_others = max(host_total - available - (rss or 0), 0)
                segs.append(Segment("others", LABELS["others"], used_by_others))
                segs.append(Segment("free", LABELS["free"], available))
        return segs

    def last_step(self) -> dict | None:
        return self.steps[-1] if self.steps else None

    def peak_step(self) -> dict | None:
        return max(self.steps, key=lambda s: s["peak"]) if self.steps else None


def activations_note(sample: dict, fmt) -> str:
    """'derived', or 'tracked · layers.0-3 9.1 GiB · lm_head 2.3 GiB' (where the activations are, biggest first).

    Numbered siblings (layers.0, layers.1, ...) are summed into one range; `fmt` formats bytes.
    """
    source = sample.get("activations_source")
    if source not in ("tracked", "derived"):
        return ""
    by_module = sample.get("activations_by_module")
    if source == "derived" or not isinstance(by_module, dict):
        return source
    groups: dict = {}
    for name, nbytes in by_module.items():
        if not isinstance(name, str) or byte_count(nbytes) is None:
            continue
        head, _, last = name.rpartition(".")
        key, idx = (head, int(last)) if head and last.isdigit() else (name, None)
        g = groups.setdefault(key, [0, None, None])
        g[0] += nbytes
        if idx is not None:
            g[1] = idx if g[1] is None else min(g[1], idx)
            g[2] = idx if g[2] is None else max(g[2], idx)
    parts = []
    for key, (nbytes, lo, hi) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:3]:
        label = key if lo is None else (f"{key}.{lo}" if lo == hi else f"{key}.{lo}-{hi}")
        parts.append(f"{label} {fmt(nbytes)}")
    return " · ".join(["tracked", *parts])


