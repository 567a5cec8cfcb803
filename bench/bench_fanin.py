"""Fan-in benchmark: 64 agent streams at 20 Hz into one viewer process.

    python bench/bench_fanin.py                   # model, then the real job TUI (headless)
    python bench/bench_fanin.py --mode model --seconds 30 --ranks 128

Publishers: `--ranks` synthetic agents (default 64) spread over `--procs`
processes, each a real ZeroMQ PUB socket bound to its own ipc socket, sending
what an agent on a CUDA device sends, encoded with vramtop_agent.schema.encode:
a sample at `--hz` (20; CUDA and NVML fields, per-device blocks), a hello every
second, and per training step (`--step-hz`, 2) six phase events (with their
blocks) and a step summary. `t` in every frame is the send time.

Viewer (this process), one of:
- model: vramtop.job_source.JobSource (one SUB pair per agent, one poller)
  pumped at 10 Hz like the app, folded into a JobState, and the job overview
  (job_render.overview_rows: every rank's line + the imbalance panel) rendered
  at 4 Hz to an off-screen Rich console;
- tui: the real JobApp (vramtop.tui.job_view) running headless at 200x80,
  overview screen on top, refresh 4 Hz, pump 10 Hz.

Printed: the viewer's CPU (process time of all its threads, ZeroMQ's I/O
thread included, over wall time: % of one core), end-to-end lag (receive
time in the viewer minus the frame's send time) for samples and for events,
events received vs sent, and whether the backlog grows (event lag in the
last quarter of the run vs the first). Target: < 25% of one core, no growing backlog.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "agent")]

GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------------- publishers


def _blocks(rank: int, phase: str) -> dict:
    act = {"forward": 18 * GIB, "backward": 12 * GIB, "optimizer": 0, "idle": 0}[phase] + rank * 64 * MIB
    grads = 2 * GIB if phase in ("backward", "optimizer") else 0
    return {"parameters": 14 * GIB, "gradients": grads, "optimizer": 4 * GIB, "activations": act, "other": 700 * MIB}


def _sample(rank: int, pid: int, seq: int, step: int, phase: str, t: float) -> dict:
    b = _blocks(rank, phase)
    alloc = sum(b.values())
    return {"v": 1, "type": "sample", "t": t, "pid": pid, "rank": rank, "seq": seq, "step": step, "phase": phase,
            "device": "cuda:0", "blocks": b,
            "params_split": {"trainable": 40 * MIB, "frozen": 14 * GIB - 40 * MIB, "quantized": 0},
            "devices": {"cuda:0": b}, "host": {"rss": 9 * GIB, "total": 2000 * GIB, "available": 1500 * GIB},
            "cuda": {"allocated": alloc, "reserved": alloc + 3 * GIB, "active": alloc, "inactive_split": 300 * MIB,
                     "alloc_retries": 0, "ooms": 0, "peak_allocated": 40 * GIB, "peak_reserved": 44 * GIB},
            "nvml": {"total": 80 * GIB, "used": 46 * GIB, "process_used": 45 * GIB},
            "batch": [8, 2048], "dropped": 0, "errors": 0, "last_error": None}


def _hello(rank: int, pid: int, world: int, eseq: int, t: float) -> dict:
    return {"v": 1, "type": "hello", "t": t, "pid": pid, "rank": rank, "eseq": eseq, "host": f"node{rank // 8}",
            "node": f"node{rank // 8}", "cmdline": ["python", "train.py", "--config", "llama-7b.yaml"],
            "start_time": t, "local_rank": rank % 8, "world_size": world, "agent_version": "0.1.0",
            "torch_version": "2.13.0", "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3",
            "device_total": 80 * GIB, "model": {"class": "LlamaForCausalLM", "params_total": 6_738_415_616,
                                                "params_trainable": 19_988_480, "dtype": "bfloat16", "method": "lora"},
            "optimizer": {"class": "AdamW"}, "sample_hz": 20.0, "estimate": None}


def publisher_main(ranks, world, ipc_dir, hz, step_hz, stop, sent, ready):
    import zmq

    from vramtop_agent.schema import encode

    ctx = zmq.Context()
    socks = []
    for r in ranks:
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(f"ipc://{ipc_dir}/{r}.sock")
        socks.append(s)
    ready.put(len(ranks))
    pid0 = 100_000
    eseq = {r: 0 for r in ranks}
    seq = 0
    step = 0
    phases = [("forward", "start"), ("forward", "end"), ("backward", "start"), ("backward", "end"),
              ("optimizer", "start"), ("optimizer", "end")]
    period = 1.0 / hz
    next_tick = time.perf_counter()
    last_hello = 0.0
    step_period = 1.0 / step_hz
    next_step = time.time() + step_period
    n_samples = n_events = 0
    while not stop.is_set():
        now = time.time()
        seq += 1
        phase = ("forward", "backward", "optimizer", "idle")[int(now * step_hz * 4) % 4]
        events_due = []
        if now - last_hello >= 1.0:
            last_hello = now
            events_due.append("hello")
        if now >= next_step:
            next_step += step_period
            events_due.append("step")
        for r, s in zip(ranks, socks):
            pid = pid0 + r
            frames = [encode(_sample(r, pid, seq, step, phase, now))]
            for what in events_due:
                if what == "hello":
                    eseq[r] += 1
                    frames.append(encode(_hello(r, pid, world, eseq[r], now)))
                else:
                    for ph, edge in phases:
                        eseq[r] += 1
                        b = _blocks(r, ph)
                        frames.append(encode({"v": 1, "type": "phase", "t": now, "pid": pid, "rank": r,
                                              "eseq": eseq[r], "step": step, "phase": ph, "edge": edge,
                                              "level": sum(b.values()), "blocks": b}))
                    eseq[r] += 1
                    pb = _blocks(r, "forward")
                    frames.append(encode({"v": 1, "type": "step", "t": now, "pid": pid, "rank": r, "eseq": eseq[r],
                                          "step": step, "step_time": step_period, "micro_steps": 1, "batch": [8, 2048],
                                          "peaks": {"forward": sum(pb.values()), "backward": sum(pb.values()) - GIB,
                                                    "optimizer": 21 * GIB},
                                          "end_of_forward": sum(pb.values()), "backward_spike": 0,
                                          "peak": sum(pb.values()), "peak_phase": "forward", "peak_blocks": pb,
                                          "eof_blocks": pb}))
            for i, f in enumerate(frames):
                try:
                    s.send(f, zmq.NOBLOCK)
                    if i == 0:
                        n_samples += 1
                    else:
                        n_events += 1
                except zmq.Again:
                    pass
        if "step" in events_due:
            step += 1
        next_tick += period
        delay = next_tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            next_tick = time.perf_counter()  # fell behind: do not burst
        with sent.get_lock():
            sent[0], sent[1] = sent[0] + n_samples, sent[1] + n_events
        n_samples = n_events = 0
    for s in socks:
        s.close(linger=0)
    ctx.term()


# ---------------------------------------------------------------------- viewer


class Meter:
    """Lag of every message as the viewer's pump receives it."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []  # (receive time, lag)
        self.events: list[tuple[float, float]] = []
        self.counting = False
        self.recv_samples = self.recv_events = 0

    def note(self, msgs) -> None:
        now = time.time()
        if not self.counting:
            return
        for _key, m in msgs:
            lag = now - m["t"]
            if m["type"] == "sample":
                self.samples.append((now, lag))
                self.recv_samples += 1
            else:
                self.events.append((now, lag))
                self.recv_events += 1


def make_source(infos):
    from vramtop.job_source import JobSource

    return JobSource(infos, rescan_s=None, scan_local=False)


def run_model(infos, seconds: float, warmup: float, meter: Meter, mark) -> tuple[float, float, tuple]:
    from io import StringIO

    from rich.console import Console
    from rich.text import Text

    from vramtop.job_state import JobState
    from vramtop.tui.job_render import header_line, imbalance_text, job_header, overview_rows

    src = make_source(infos)
    job = JobState()
    console = Console(file=StringIO(), width=200, color_system="truecolor", force_terminal=True)
    cache: dict = {}
    t_start = time.time()
    next_pump = next_render = time.perf_counter()
    cpu0 = wall0 = None
    try:
        while time.time() - t_start < warmup + seconds:
            now = time.perf_counter()
            if cpu0 is None and time.time() - t_start >= warmup:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                sent0 = mark()
                meter.counting = True
            if now >= next_pump:
                msgs = src.poll(0)
                meter.note(msgs)
                for key, msg in msgs:
                    job.apply(key, msg)
                next_pump += 0.1
            if now >= next_render:
                keys, lines, imb = overview_rows(job, cache)
                console.file.seek(0)
                console.file.truncate()
                console.print(job_header(job, "bench"))
                console.print(Text("\n").join([header_line(), *lines]))
                console.print(imbalance_text(job, imb))
                next_render += 0.25
            time.sleep(max(min(next_pump, next_render) - time.perf_counter(), 0))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        sent1 = mark()
    finally:
        meter.counting = False
        src.close()
    assert len(job.members) == len(infos), f"only {len(job.members)} of {len(infos)} streams arrived"
    return cpu, wall, (sent1[0] - sent0[0], sent1[1] - sent0[1])


def run_tui(infos, seconds: float, warmup: float, meter: Meter, mark) -> tuple[float, float, tuple]:
    from vramtop.tui.job_view import JobApp

    src = make_source(infos)
    inner = src.poll

    def poll(timeout_ms: int = 0):
        msgs = inner(timeout_ms)
        meter.note(msgs)
        return msgs

    src.poll = poll
    app = JobApp(src, refresh_hz=4.0, pump_hz=10.0)
    marks: dict = {}

    def start_measure():
        marks["cpu0"], marks["wall0"] = time.process_time(), time.perf_counter()
        marks["sent0"] = mark()
        meter.counting = True

    def stop_measure():
        marks["cpu"], marks["wall"] = time.process_time() - marks["cpu0"], time.perf_counter() - marks["wall0"]
        sent1 = mark()
        marks["sent"] = (sent1[0] - marks["sent0"][0], sent1[1] - marks["sent0"][1])
        meter.counting = False
        marks["members"] = len(app.job.members)
        marks["overview"] = type(app.screen).__name__
        app.exit()

    def arm():
        app.set_timer(warmup, start_measure)
        app.set_timer(warmup + seconds, stop_measure)

    app.call_later(arm)
    app.run(headless=True, size=(200, 80))
    assert marks.get("overview") == "OverviewScreen", marks
    assert marks["members"] == len(infos), f"only {marks['members']} of {len(infos)} streams arrived"
    return marks["cpu"], marks["wall"], marks["sent"]


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)]


def report(mode: str, cpu: float, wall: float, meter: Meter, sent_window: tuple[int, int], target: float) -> bool:
    s_lag = [lag for _, lag in meter.samples]
    e_lag = [lag for _, lag in meter.events]
    cpu_pct = 100.0 * cpu / wall
    print(f"\n[{mode}] viewer CPU {cpu_pct:.1f}% of one core over {wall:.1f} s "
          f"(target < {target:.0f}%: {'OK' if cpu_pct < target else 'MISSED'})")
    print(f"  samples: received {meter.recv_samples} (conflated to the newest per pump; sent {sent_window[0]}), "
          f"lag ms p50 {1000 * pct(s_lag, .5):.1f}  p95 {1000 * pct(s_lag, .95):.1f}  "
          f"max {1000 * max(s_lag or [0]):.1f}")
    print(f"  events:  received {meter.recv_events} of {sent_window[1]} sent in the window, "
          f"lag ms p50 {1000 * pct(e_lag, .5):.1f}  p95 {1000 * pct(e_lag, .95):.1f}  "
          f"max {1000 * max(e_lag or [0]):.1f}")
    grows = False
    if len(meter.events) >= 8:
        n = len(meter.events) // 4
        first = statistics.median(lag for _, lag in meter.events[:n])
        last = statistics.median(lag for _, lag in meter.events[-n:])
        grows = last > 2 * first and last - first > 0.05
        print(f"  backlog: event lag median first quarter {1000 * first:.1f} ms, last quarter {1000 * last:.1f} ms: "
              f"{'GROWS' if grows else 'steady'}")
    return cpu_pct < target and not grows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--procs", type=int, default=4, help="publisher processes")
    ap.add_argument("--hz", type=float, default=20.0, help="samples per second per agent")
    ap.add_argument("--step-hz", type=float, default=2.0, help="training steps per second per agent")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--mode", choices=("model", "tui", "both"), default="both")
    ap.add_argument("--target", type=float, default=25.0, help="CPU target, %% of one core")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    ipc_dir = tempfile.mkdtemp(prefix="vt-fanin-")
    stop, ready, sent = ctx.Event(), ctx.Queue(), ctx.Array("q", 2)
    groups = [list(range(args.ranks))[i::args.procs] for i in range(args.procs)]
    procs = [ctx.Process(target=publisher_main, args=(g, args.ranks, ipc_dir, args.hz, args.step_hz, stop, sent, ready),
                         daemon=True) for g in groups if g]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    infos = [{"pid": 100_000 + r, "rank": r, "world_size": args.ranks, "node": f"node{r // 8}",
              "endpoint": f"ipc://{ipc_dir}/{r}.sock"} for r in range(args.ranks)]
    print(f"{args.ranks} publishers in {len(procs)} processes, {args.hz:g} samples/s each + "
          f"{args.step_hz:g} steps/s (7 events each) + 1 hello/s; viewer pid {os.getpid()}, {os.cpu_count()} CPUs")
    ok = True
    try:
        modes = ("model", "tui") if args.mode == "both" else (args.mode,)
        for mode in modes:
            meter = Meter()

            def mark():
                with sent.get_lock():
                    return sent[0], sent[1]

            runner = run_model if mode == "model" else run_tui
            cpu, wall, sent_window = runner(infos, args.seconds, args.warmup, meter, mark)
            ok = report(mode, cpu, wall, meter, sent_window, args.target) and ok
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        import shutil

        shutil.rmtree(ipc_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
