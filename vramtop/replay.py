"""Replay: a recording played back through the same SessionState and TUI as a live agent.

Two pieces, both free of the terminal:

- `PlaybackClock`: where in the recording we are (recording time, unix
  seconds), advancing with the wall clock times `speed` while playing;
  pause, speed, seek. Pure: the wall clock is injected.
- `ReplaySource`: a message source with the shape the app pulls from
  (`poll()`, `status`, `describe`, `rejected`, `close()`): each poll returns
  the recorded messages between the previous position and the new one. A
  seek (time, step, peak, OOM) sets `take_reset()`: the app starts a fresh
  SessionState and the next poll returns a preroll (the hello, the recent
  steps and errors, the last few minutes of samples and phase marks), so the
  view after a seek is what a live viewer would have shown at that moment.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from vramtop.errors import UserError
from vramtop.recording import Recording
from vramtop.source import Source

SPEEDS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
PREROLL_S = 300.0  # the live timeline's history (state.HISTORY samples at 10 Hz)
PREROLL_STEPS = 200


class PlaybackClock:
    """Recording time as a function of wall time: t = pos + (now - anchor) * speed while playing."""

    def __init__(self, start: float, end: float, speed: float = 1.0, playing: bool = True,
                 now: Callable[[], float] = time.monotonic):
        if end < start:
            end = start
        self.start = float(start)
        self.end = float(end)
        self._now = now
        self._pos = float(start)
        self._anchor = now()
        self.speed = _clamp_speed(speed)
        self.playing = playing

    def position(self, now: float | None = None) -> float:
        now = self._now() if now is None else now
        pos = self._pos
        if self.playing:
            pos += (now - self._anchor) * self.speed
        return min(max(pos, self.start), self.end)

    def _settle(self) -> None:
        now = self._now()
        self._pos = self.position(now)
        self._anchor = now

    @property
    def at_end(self) -> bool:
        return self.position() >= self.end

    def play(self) -> None:
        self._settle()
        if self.at_end:
            self._pos = self.start  # play at the end starts over
        self.playing = True

    def pause(self) -> None:
        self._settle()
        self.playing = False

    def toggle(self) -> bool:
        (self.pause if self.playing else self.play)()
        return self.playing

    def set_speed(self, speed: float) -> None:
        self._settle()
        self.speed = _clamp_speed(speed)

    def faster(self) -> float:
        self.set_speed(next((s for s in SPEEDS if s > self.speed + 1e-9), SPEEDS[-1]))
        return self.speed

    def slower(self) -> float:
        self.set_speed(next((s for s in reversed(SPEEDS) if s < self.speed - 1e-9), SPEEDS[0]))
        return self.speed

    def seek(self, t: float) -> float:
        self._settle()
        self._pos = min(max(float(t), self.start), self.end)
        return self._pos

    def extend(self, end: float) -> None:
        """The recording grew (it is still being written)."""
        if end > self.end:
            self._settle()
            self.end = float(end)


def _clamp_speed(speed: float) -> float:
    try:
        speed = float(speed)
    except (TypeError, ValueError):
        raise UserError(f"bad speed {speed!r}") from None
    if not speed > 0 or speed != speed:
        raise UserError("speed must be positive")
    return min(max(speed, SPEEDS[0]), 10_000.0)


_DURATION = re.compile(r"^\+?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?$")


def parse_position(text: str) -> tuple[str, float]:
    """What a user typed to seek: ("step", n), ("offset", seconds), ("peak"|"oom"|"start"|"end", 0).

    "120" or "step 120" -> step 120; "+90s", "1m30s", "2h", "1:30", "01:02:03" -> offset from the
    start of the recording; "peak", "oom", "start", "end".
    """
    s = (text or "").strip().lower()
    if not s:
        raise UserError("empty position")
    if s in ("peak", "oom", "start", "end"):
        return s, 0.0
    m = re.fullmatch(r"(?:step\s*|s(?=\d))?(\d+)", s)
    if m and not s.endswith("s"):
        return "step", float(m.group(1))
    if re.fullmatch(r"\+?\d+(?::\d{1,2}){1,2}(?:\.\d+)?", s):
        parts = [float(x) for x in s.lstrip("+").split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        return "offset", secs
    m = _DURATION.match(s.replace("t+", "+"))
    if m and any(m.groups()):
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        return "offset", h * 3600 + mi * 60 + se
    raise UserError(f"cannot read position {text[:40]!r}: try a step (120), a time (+90s, 1:30, 2h) or peak / oom")


SAME_LAUNCH_S = 60.0  # sessions that started this close to the newest one are ranks of the same launch


def newest_session(sessions: list) -> int | None:
    """The session a reader means by default: the newest run's (its lowest rank when several ranks
    of one launch record into the file). `vramtop run --record` and `record --append` add a session
    per run, and the run just made is the one to look at."""
    if not sessions:
        return None
    last = max(sessions, key=lambda s: s.id)
    start = last.start_time if last.start_time is not None else last.first_t
    if start is None:
        return last.id
    launch = [s for s in sessions if (s.start_time if s.start_time is not None else s.first_t or 0)
              >= start - SAME_LAUNCH_S]
    return min(launch, key=lambda s: (s.rank, s.id)).id


class ReplaySource(Source):
    """Feeds a recording into a SessionState at the pace of a PlaybackClock."""

    def __init__(self, recording: Recording, session: int | None = None, speed: float = 1.0,
                 playing: bool = True, clock: PlaybackClock | None = None,
                 wall: Callable[[], float] = time.monotonic, follow_s: float = 1.0):
        self.rec = recording
        sessions = recording.sessions()
        if session is None:
            session = newest_session(sessions)
        elif not any(s.id == session for s in sessions):
            ids = ", ".join(str(s.id) for s in sessions) or "none"
            raise UserError(f"{recording.path}: no session {session} (it has {ids})")
        self.session = session
        span = recording.span(session)
        if span is None:
            raise UserError(f"{recording.path}: the recording is empty")
        self.clock = clock or PlaybackClock(span[0], span[1], speed=speed, playing=playing, now=wall)
        self._wall = wall
        self._follow_s = follow_s
        self._last_follow = wall()
        self._last = self.clock.start
        self._reset = True  # the first poll is a preroll too (at the start: just the hello)
        self._preroll_pending = True
        self._oom_times: list[float] | None = None
        self.message = ""  # last action, for the status line
        self.choices: list = []

    # ------------------------------------------------------------------ what the app reads

    def now(self) -> float:
        """The recording time being shown: the SessionState's clock during replay."""
        return self.clock.position()

    @property
    def describe(self) -> str:
        import os

        return f"replay {os.path.basename(self.rec.path)}"

    @property
    def status(self) -> str:
        c = self.clock
        pos = c.position()
        state = "▶ playing" if c.playing and not c.at_end else "paused" if not c.at_end else "end"
        # The footer lists the other keys; these have no footer entry.
        text = (f"{state} {c.speed:g}x  {_hms(pos - c.start)} / {_hms(c.end - c.start)}"
                f"  ←/→ 10 s  [/] step  Home/End")
        if self.message:
            text += f"  | {self.message}"
        return text

    @status.setter
    def status(self, value: str) -> None:  # the app writes errors here
        self.message = value

    @property
    def rejected(self) -> tuple[int, str | None]:
        n = sum(self.rec.problems.values())
        return n, (self.rec.problem_line() if n else None)

    def take_reset(self) -> bool:
        """True once after a seek: the app must start a fresh SessionState before the next poll."""
        r = self._reset
        self._reset = False
        return r

    def poll(self) -> list[dict]:
        now = self._wall()
        if now - self._last_follow >= self._follow_s:
            self._last_follow = now
            span = self.rec.span(self.session)
            if span:
                self.clock.extend(span[1])
        pos = self.clock.position()
        if self._preroll_pending:
            self._preroll_pending = False
            self._last = pos
            return self.preroll(pos)
        if pos < self._last:  # only a seek goes back, and seeks set the preroll
            self._last = pos
            return []
        if pos == self._last:
            return []
        msgs = self.rec.messages(self._last, pos, session=self.session, after=True)
        self._last = pos
        return msgs

    def close(self) -> None:
        self.rec.close()

    # ------------------------------------------------------------------ preroll

    def preroll(self, pos: float) -> list[dict]:
        """What a live viewer would have accumulated by recording time `pos`."""
        rec, sid = self.rec, self.session
        pairs: dict[int, dict] = {}
        hello = rec.last_events(("hello",), pos, session=sid, limit=1)
        if not hello:
            # Recording joined late (no hello before pos): the session's last known hello.
            s = rec.session(sid)
            if s is not None and s.hello is not None:
                pairs[-1] = s.hello
        for rseq, msg in hello:
            pairs[rseq] = msg
        for rseq, msg in rec.last_steps(pos, session=sid, limit=PREROLL_STEPS):
            pairs[rseq] = msg
        for rseq, msg in rec.last_events(("error", "oom", "bye"), pos, session=sid, limit=50):
            pairs[rseq] = msg
        for rseq, msg in rec.messages(pos - PREROLL_S, pos, session=sid, with_rseq=True,
                                      tables=("samples", "events")):
            if msg.get("type") in ("sample", "phase"):
                pairs[rseq] = msg
        return [pairs[k] for k in sorted(pairs)]

    # ------------------------------------------------------------------ seeking

    def _seek(self, t: float, what: str) -> float:
        pos = self.clock.seek(t)
        self._reset = True
        self._preroll_pending = True
        self.message = what
        return pos

    def seek_time(self, t: float) -> float:
        return self._seek(t, f"at {_hms(t - self.clock.start)}")

    def seek_offset(self, seconds: float) -> float:
        return self.seek_time(self.clock.start + seconds)

    def skip(self, seconds: float) -> float:
        return self.seek_time(self.clock.position() + seconds)

    def seek_step(self, step: int) -> float:
        t = self.rec.step_start(int(step), session=self.session)
        if t is None:
            raise UserError(f"no step {step} in the recording")
        return self._seek(t, f"step {step}")

    def step_relative(self, delta: int) -> float:
        sample = self.rec.sample_at(self.clock.position(), session=self.session)
        current = sample["step"] if sample else 0
        return self.seek_step(max(current + delta, 0))

    def jump_peak(self) -> float:
        peak = self.rec.peak(self.session)
        if peak is None or peak.t is None:
            raise UserError("no samples to find a peak in")
        from vramtop_agent.vocabulary import fmt_bytes

        return self._seek(peak.t, f"peak {fmt_bytes(peak.level)} at step {peak.step} ({peak.phase})")

    def jump_oom(self) -> float:
        """The next OOM after the current position (the first one again after the last)."""
        if self._oom_times is None:
            self._oom_times = [e["t"] for e in self.rec.ooms(self.session)]
        if not self._oom_times:
            raise UserError("no OOM in this recording")
        pos = self.clock.position()
        t = next((x for x in self._oom_times if x > pos + 1e-6), self._oom_times[0])
        return self._seek(t, f"OOM at {_hms(t - self.clock.start)}")

    def goto(self, text: str) -> float:
        kind, value = parse_position(text)
        if kind == "step":
            return self.seek_step(int(value))
        if kind == "offset":
            return self.seek_offset(value)
        if kind == "peak":
            return self.jump_peak()
        if kind == "oom":
            return self.jump_oom()
        return self.seek_time(self.clock.start if kind == "start" else self.clock.end)


def _hms(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"
