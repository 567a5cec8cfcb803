"""Injecting the agent into a running job: how long until the full picture, and what the job feels.

    $ python bench/bench_inject.py [--runs 2] [--steps 30]

For each run: start tests/inject_job.py (a plain tiny-Llama LoRA fine-tune, no vramtop in it, no pause
between steps), let it train `--steps` steps, then run `vramtop record PID --yes` (the same injection as
`vramtop attach PID --yes`, without a terminal) and measure, side by side in that one job:
- time from the command's start to the agent's first sample (samples start once the optimizer is known:
  the full picture) and to its first step summary;
- the job's step time: the slowest step overlapping the injection (from the command's start to the end of
  the step in which the agent was created, hello.injected.at) and the median of `--steps` steps after the
  agent's first whole step, each as a ratio to the median of the `--steps` steps before the command.
Also checks the agent's blocks at each optimizer-step start against the job's own tensors (truth.json).
Prints one line per run and the medians. `--device cuda` trains the job on the GPU (bench/device_run.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOB = ROOT / "tests" / "inject_job.py"
WARMUP = 10  # the first steps of a fresh process are slower


def steps_of(text: str) -> list[tuple[int, float, float]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "loss":
            out.append((int(parts[1]), float(parts[3]), float(parts[4])))
    return out


def one_run(work: Path, warm_steps: int, after_steps: int, device: str = "cpu") -> dict:
    from vramtop.subscriber import Subscriber
    from vramtop_agent import discovery

    env = {**os.environ, "STEP_PAUSE": "0", "DEVICE": device, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "VRAMTOP_RUNTIME_DIR": str(work / "rt")}
    os.environ["VRAMTOP_RUNTIME_DIR"] = env["VRAMTOP_RUNTIME_DIR"]
    log = open(work / "job.log", "w")
    job = subprocess.Popen([sys.executable, str(JOB), str(work)], stdout=log, stderr=subprocess.DEVNULL, env=env)
    try:
        while len(steps_of((work / "job.log").read_text())) < warm_steps + WARMUP:
            assert job.poll() is None, "the job died"
            time.sleep(0.05)
        t0 = time.time()
        rec = subprocess.Popen([sys.executable, "-m", "vramtop", "record", str(job.pid), "--yes", "--quiet",
                                "-o", str(work / "run.vramtop")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        endpoint = None
        while endpoint is None:
            agents = [a for a in discovery.list_agents() if a["pid"] == job.pid]
            endpoint = agents[0]["endpoint"] if agents else None
            assert rec.poll() is None or endpoint, rec.stderr.read()
            time.sleep(0.01)
        sub = Subscriber(endpoint, every_sample=True)
        first_sample = first_step = hello = None
        summaries = 0
        edges = []  # optimizer-start edges: every block present, to compare with the job's own tensors
        while summaries < after_steps + 3 or hello is None:
            for m in sub.poll(50):
                if m["type"] == "sample" and first_sample is None:
                    first_sample = time.time() - t0
                if m["type"] == "phase" and m["phase"] == "optimizer" and m["edge"] == "start":
                    edges.append(m.get("blocks") or {})
                if m["type"] == "step":
                    summaries += 1
                    first_step = first_step or time.time() - t0
                if m["type"] == "hello" and (m.get("injected") or {}).get("first_step") is not None:
                    hello = m
            assert job.poll() is None, "the job died"
        sub.close()
        rec.terminate()
        rec.wait(30)
    finally:
        (work / "stop").write_text("")
        job.wait(60)
        log.close()
    steps = steps_of((work / "job.log").read_text())
    at = hello["injected"]["at"]
    before = [dt for _, dt, end in steps[WARMUP:] if end < t0][-warm_steps:]
    # Every step that overlaps the injection: from the command's start (the imports run then, in a
    # thread of the job) to the end of the step in which the agent was created.
    k = next(i for i, (_, _, end) in enumerate(steps) if end >= at)
    during = [dt for _, dt, end in steps[:k + 1] if end >= t0]
    after = [dt for _, dt, _ in steps[k + 3:k + 3 + after_steps]]  # past the agent's first whole step
    base = statistics.median(before)
    import json

    truth = json.loads((work / "truth.json").read_text())
    exact = bool(edges) and all(all(e.get(k) == truth[k] for k in truth) for e in edges)
    return {"exact": exact, "first_sample_s": first_sample, "first_step_s": first_step, "base_ms": base * 1000,
            "inject_step": max(during) / base, "during_n": len(during), "after": statistics.median(after) / base}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu", help="where the job trains (cuda on a GPU machine)")
    args = ap.parse_args()
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            r = one_run(Path(d), args.steps, args.steps, args.device)
        results.append(r)
        print(f"run {i + 1}: attach -> first full sample {r['first_sample_s']:.2f} s, first step summary "
              f"{r['first_step_s']:.2f} s; step time {r['base_ms']:.0f} ms before; slowest of the {r['during_n']} "
              f"steps during the injection {r['inject_step']:.2f}x, steady state after {r['after']:.2f}x; "
              f"blocks byte-exact vs the job's tensors: {'yes' if r['exact'] else 'NO'}", flush=True)
    med = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "exact"}
    print(f"median of {len(results)}: first full sample {med['first_sample_s']:.2f} s, first step "
          f"{med['first_step_s']:.2f} s; injection step {med['inject_step']:.2f}x, after {med['after']:.2f}x "
          f"(tiny Llama LoRA on {args.device}, {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
