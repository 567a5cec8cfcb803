"""Recorder benchmark: its overhead on a training job, and a 24-hour recording's open / seek times.

    python bench/bench_recorder.py                 # both parts
    python bench/bench_recorder.py --skip-overhead # only the 24-hour file
    python bench/bench_recorder.py --keep /tmp/day.vramtop  # reuse the synthetic file between runs

1. Overhead: the tiny LoRA fine-tune in this process, with the agent (no publishing) and the
   recorder on vs the agent alone (the recorder's own cost), and vs no agent at all. Runs are
   interleaved in pairs (order alternating) and each ratio is the median over pairs of
   median-step-time ratios, so drift on a shared machine cancels out.
2. A synthetic 24-hour recording at 10 Hz (864,000 samples with CUDA and NVML fields, a step
   per second with its phase events): time to open it, and to seek (replay preroll included) to
   the middle, to a step, to the peak. Target: open < 2 s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "agent")]


# ---------------------------------------------------------------------- overhead


RECORDER_CPU = {"seconds": 0.0, "wall": 0.0, "messages": 0}


class NullSink:
    def send(self, msg):
        pass

    def close(self):
        pass


def _meter(rec) -> None:
    """Count the CPU time the sampler thread spends inside Recorder.send (encoding, SQLite, commits)."""
    inner = rec.send

    def send(msg):
        t = time.thread_time()
        try:
            inner(msg)
        finally:
            RECORDER_CPU["seconds"] += time.thread_time() - t
            RECORDER_CPU["messages"] += 1

    rec.send = send


def _run_steps(model, opt, batches, mode: str, path: str) -> list[float]:
    import vramtop_agent

    agent = None
    if mode == "record":
        if os.path.exists(path):
            os.remove(path)
        agent = vramtop_agent.watch(model, opt, publish=False, record=path)
        if agent.recorder is not None:
            _meter(agent.recorder)
    elif mode == "agent":
        # The same agent with its sampler thread running, its messages dropped: the baseline that
        # isolates the recorder (without any sink the agent starts no sampler at all).
        agent = vramtop_agent.watch(model, opt, publish=False, sinks=[NullSink()])
    times = []
    for b in batches:
        t0 = time.perf_counter()
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if mode == "record":
        RECORDER_CPU["wall"] += sum(times)
    if agent is not None:
        agent.stop()
        if mode == "record" and agent.errors:
            print(f"  agent errors: {agent.last_error}")
    return times


def overhead(pairs: int, steps: int, batch: int, seq: int) -> dict:
    import torch

    from vramtop.tiny import add_lora, build_model, make_batch

    torch.set_num_threads(1)
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = [make_batch(model, batch, seq, seed=i) for i in range(steps)]
    path = os.path.join(tempfile.mkdtemp(), "bench.vramtop")
    _run_steps(model, opt, batches[:3], "bare", path)  # warm-up
    _run_steps(model, opt, batches[:3], "record", path)
    RECORDER_CPU.update(seconds=0.0, wall=0.0, messages=0)
    ratios = {"record/agent": [], "record/bare": [], "agent/bare": []}
    med = {"bare": [], "agent": [], "record": []}
    for i in range(pairs):
        order = ["bare", "agent", "record"]
        random.Random(i).shuffle(order)
        got = {m: statistics.median(_run_steps(model, opt, batches, m, path)[1:]) for m in order}
        for m in got:
            med[m].append(got[m])
        ratios["record/agent"].append(got["record"] / got["agent"])
        ratios["record/bare"].append(got["record"] / got["bare"])
        ratios["agent/bare"].append(got["agent"] / got["bare"])
        print(f"  pair {i + 1}/{pairs}: bare {got['bare'] * 1e3:.1f} ms  agent {got['agent'] * 1e3:.1f} ms  "
              f"agent+record {got['record'] * 1e3:.1f} ms")
    size = os.path.getsize(path)
    return {"ratios": {k: statistics.median(v) for k, v in ratios.items()},
            "step_ms": {k: statistics.median(v) * 1e3 for k, v in med.items()}, "file_bytes_per_run": size}


# ---------------------------------------------------------------------- 24 hours


def _sample(t: float, seq: int, step: int, phase: str, act: int) -> dict:
    blocks = {"parameters": 14_000_000_000, "gradients": 40_000_000, "optimizer": 80_000_000,
              "activations": act, "other": 300_000_000 + (seq % 97) * 1_000_000}
    alloc = sum(blocks.values())
    return {"v": 1, "type": "sample", "t": t, "pid": 4242, "rank": 0, "seq": seq, "step": step, "phase": phase,
            "device": "cuda:0", "blocks": blocks,
            "params_split": {"trainable": 40_000_000, "frozen": 13_960_000_000, "quantized": 0},
            "devices": {"cuda:0": blocks},
            "cuda": {"allocated": alloc, "reserved": alloc + 2_000_000_000, "active": alloc,
                     "inactive_split": 5_000_000, "alloc_retries": 0, "ooms": 0, "peak_allocated": alloc + 1_000_000,
                     "peak_reserved": alloc + 2_000_000_000},
            "nvml": {"total": 85_000_000_000, "used": alloc + 3_000_000_000, "process_used": alloc + 2_600_000_000},
            "host": {"rss": 6_000_000_000, "total": 2_000_000_000_000, "available": 1_500_000_000_000},
            "batch": [4, 2048], "dropped": 0, "errors": 0, "last_error": None}


def make_day(path: str, hours: float = 24.0, hz: float = 10.0) -> dict:
    from vramtop_agent.recorder import Recorder

    if os.path.exists(path):
        os.remove(path)
    rec = Recorder(path, writer="bench")
    db = rec._db
    t0 = 1_700_000_000.0
    n = int(hours * 3600 * hz)
    peak_at = n * 2 // 3
    hello = {"v": 1, "type": "hello", "t": t0, "pid": 4242, "rank": 0, "eseq": 1, "host": "bench",
             "cmdline": ["train.py"], "start_time": t0, "agent_version": "0.1.0", "device": "cuda:0",
             "device_name": "H100", "device_total": 85_000_000_000, "sample_hz": hz,
             "model": {"class": "LlamaForCausalLM", "params_total": 7_000_000_000, "params_trainable": 40_000_000,
                       "dtype": "bfloat16", "method": "lora"}}
    eseq = 1
    batch = [("hello", hello)]
    started = time.perf_counter()
    per_step = int(hz)
    for i in range(n):
        t = t0 + i / hz
        step, within = divmod(i, per_step)
        phase = ("forward", "forward", "forward", "backward", "backward", "backward", "backward", "optimizer",
                 "idle", "idle")[within % 10]
        act = 8_000_000_000 * (within % 10) // 10 + (6_000_000_000 if i == peak_at else 0)
        batch.append(("sample", _sample(t, i + 1, step, phase, act)))
        if within == 0:
            for ph, edge, dt in (("forward", "start", 0.0), ("backward", "start", 0.3), ("backward", "end", 0.7),
                                 ("optimizer", "start", 0.7)):
                eseq += 1
                batch.append(("phase", {"v": 1, "type": "phase", "t": t + dt, "pid": 4242, "rank": 0, "eseq": eseq,
                                        "step": step, "phase": ph, "edge": edge, "level": 14_000_000_000}))
        if within == per_step - 1:
            eseq += 1
            pk = 22_500_000_000 + (6_000_000_000 if step == peak_at // per_step else 0)
            pb = {"parameters": 14_000_000_000, "gradients": 40_000_000, "optimizer": 80_000_000,
                  "activations": pk - 14_420_000_000, "other": 300_000_000}
            batch.append(("step", {"v": 1, "type": "step", "t": t, "pid": 4242, "rank": 0, "eseq": eseq, "step": step,
                                   "step_time": 1.0, "micro_steps": 1, "batch": [4, 2048],
                                   "peaks": {"forward": pk - 1, "backward": pk, "optimizer": 14_200_000_000},
                                   "end_of_forward": pk - 2_000_000_000, "backward_spike": 2_000_000_000, "peak": pk,
                                   "peak_phase": "backward", "peak_blocks": pb}))
        if len(batch) >= 20_000:
            db.execute("BEGIN")
            rec._write_batch(db, batch)
            db.execute("COMMIT")
            batch = []
    if batch:
        db.execute("BEGIN")
        rec._write_batch(db, batch)
        db.execute("COMMIT")
    rec.close()
    return {"samples": n, "seconds": time.perf_counter() - started, "bytes": os.path.getsize(path),
            "peak_step": peak_at // per_step, "t0": t0}


def day_timings(path: str) -> dict:
    from vramtop.recording import Recording
    from vramtop.replay import ReplaySource

    out = {}
    t = time.perf_counter()
    rec = Recording.open(path)
    sessions = rec.sessions()
    span = rec.span()
    out["open"] = time.perf_counter() - t

    t = time.perf_counter()
    src = ReplaySource(rec, playing=False)
    first = src.poll()
    out["replay_start"] = time.perf_counter() - t

    t = time.perf_counter()
    src.seek_time((span[0] + span[1]) / 2)
    src.take_reset()
    mid = src.poll()
    out["seek_middle"] = time.perf_counter() - t

    target_step = int((span[1] - span[0]) / 3)
    out["target_step"] = target_step
    t = time.perf_counter()
    src.seek_step(target_step)
    src.take_reset()
    src.poll()
    out["seek_step"] = time.perf_counter() - t

    t = time.perf_counter()
    src.jump_peak()
    src.take_reset()
    src.poll()
    out["jump_peak"] = time.perf_counter() - t
    out["peak_step"] = rec.peak().step

    src.clock.play()
    src.clock.set_speed(64)
    t = time.perf_counter()
    n = 0
    for _ in range(10):
        src.clock._pos = src.clock.position() + 6.4  # ten 100 ms frames at 64x
        n += len(src.poll())
    out["play_64x_per_frame"] = (time.perf_counter() - t) / 10
    out["preroll_messages"] = len(mid)
    out["sessions"] = len(sessions)
    out["first_poll_messages"] = len(first)
    rec.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--keep", default=None, help="path of the synthetic recording (reused when it exists)")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-day", action="store_true")
    args = ap.parse_args()

    if not args.skip_overhead:
        print(f"1. recorder overhead: tiny LoRA fine-tune, batch {args.batch}x{args.seq}, {args.pairs} interleaved "
              f"runs of {args.steps} steps")
        r = overhead(args.pairs, args.steps, args.batch, args.seq)
        print(f"   median step: bare {r['step_ms']['bare']:.1f} ms, agent (null sink) {r['step_ms']['agent']:.1f} ms, "
              f"agent+recorder {r['step_ms']['record']:.1f} ms")
        print(f"   ratio agent+recorder / agent     = {r['ratios']['record/agent']:.3f}x  (the recorder's own cost)")
        print(f"   ratio agent+recorder / no agent  = {r['ratios']['record/bare']:.3f}x")
        print(f"   ratio agent / no agent           = {r['ratios']['agent/bare']:.3f}x")
        cpu = RECORDER_CPU
        print(f"   recorder CPU, measured in its thread: {cpu['seconds'] * 1e3:.0f} ms over {cpu['wall']:.1f} s of "
              f"training = {100 * cpu['seconds'] / max(cpu['wall'], 1e-9):.2f}% of a core "
              f"({cpu['messages']} messages, {1e6 * cpu['seconds'] / max(cpu['messages'], 1):.0f} us each)")
        print(f"   recording of one run: {r['file_bytes_per_run'] / 1024:.0f} KiB")

    if not args.skip_day:
        path = args.keep or os.path.join(tempfile.mkdtemp(), "day.vramtop")
        if not (args.keep and os.path.exists(path)):
            print(f"2. writing a synthetic {args.hours:g}-hour 10 Hz recording to {path} ...")
            info = make_day(path, args.hours)
            print(f"   {info['samples']} samples in {info['seconds']:.0f} s, {info['bytes'] / 2**20:.0f} MiB "
                  f"({info['bytes'] / info['samples']:.0f} bytes/sample)")
        else:
            print(f"2. reusing {path} ({os.path.getsize(path) / 2**20:.0f} MiB)")
        d = day_timings(path)
        ok = "OK" if d["open"] < 2.0 else "OVER TARGET"
        print(f"   open (meta, sessions, span)      {d['open'] * 1e3:8.1f} ms  (target < 2 s: {ok})")
        print(f"   replay start (first preroll)     {d['replay_start'] * 1e3:8.1f} ms")
        print(f"   seek to the middle + preroll     {d['seek_middle'] * 1e3:8.1f} ms  "
              f"({d['preroll_messages']} messages)")
        print(f"   seek to step {d['target_step']:<6d} + preroll    {d['seek_step'] * 1e3:8.1f} ms")
        print(f"   jump to the peak + preroll       {d['jump_peak'] * 1e3:8.1f} ms  (peak at step {d['peak_step']})")
        print(f"   playing at 64x, one 100 ms frame {d['play_64x_per_frame'] * 1e3:8.1f} ms")
        print("   (warm page cache: the file was just written or read; a cold disk adds its read time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
