"""GPU checks of budgets and creep (issue 15), on a real CUDA fine-tune. One PASS/FAIL line per check.

    python bench/gpu_alarms.py [--json OUT.json]

- creep on CUDA: tests/leak_job.py --leak --device cuda (each step's logits kept) under
  `vramtop run --record`: a `creep` event for the `allocated` series, slope within 10 % of the
  kept tensor's bytes (on CUDA memory_allocated moves by exactly that); the same job without
  the leak, 200 steps: no creep event (allocated or reserved);
- budget on CUDA: `vramtop run --budget-measure allocated` verdict peak vs the job's own
  torch.cuda.max_memory_allocated() (within 2 MiB), and the device measure >= max_memory_reserved()
  (it adds what lies outside PyTorch); a budget below the peak exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JOB = os.path.join(ROOT, "tests", "leak_job.py")
results: list[dict] = []


def check(name: str, ok: bool, detail: str) -> None:
    results.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramtop", *args], capture_output=True, text=True, timeout=300)


def value(stdout: str, key: str) -> int:
    return int(next(ln.split()[1] for ln in stdout.splitlines() if ln.startswith(key + " ")))


def creep_events(path: str) -> list[dict]:
    from vramtop.recording import Recording

    with Recording.open(path) as rec:
        return rec.events(("creep",))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("SKIP no CUDA")
        return 0
    d = tempfile.mkdtemp(prefix="vramtop-alarms-")
    leak = os.path.join(d, "leak.vramtop")
    p = run("run", "--no-tui", "--record", leak, "--budget-measure", "allocated", "--budget", "80GiB",
            "--verdict", os.path.join(d, "leak.json"), "--", sys.executable, JOB, "--device", "cuda", "--leak",
            "--steps", "120", "--batch", "4", "--seq-len", "128", "--sleep", "0.02")
    if p.returncode != 0:
        check("leak job ran", False, p.stderr[-500:])
        return 1
    truth = value(p.stdout, "LEAK_BYTES")
    ev = [e for e in creep_events(leak) if e["series"] == "allocated"]
    seen = [(e["series"], e["step"], e["slope"]) for e in creep_events(leak)]
    check("creep event (allocated)", bool(ev), f"events {seen}")
    if ev:
        err = abs(ev[0]["slope"] - truth) / truth
        check("creep slope within 10 %", err < 0.10, f"slope {ev[0]['slope']} vs kept {truth} B/step ({err:.1%}), "
              f"first seen at step {ev[0]['step']}")
    v = json.load(open(os.path.join(d, "leak.json")))
    (m,) = v["measured"].values()
    max_alloc = value(p.stdout, "MAX_ALLOCATED")
    check("budget allocated peak = max_memory_allocated", abs(m["allocated"]["bytes"] - max_alloc) <= 2 << 20,
          f"verdict {m['allocated']['bytes']} vs torch {max_alloc}")
    max_res = value(p.stdout, "MAX_RESERVED")
    check("budget device peak >= max_memory_reserved", m["device"]["bytes"] >= max_res,
          f"verdict {m['device']['bytes']} vs torch {max_res}")
    over = run("report", leak, "--budget-measure", "allocated", "--budget", str(max_alloc // 2))
    check("over budget exits 3", over.returncode == 3, over.stderr.strip()[-300:])

    ok = os.path.join(d, "ok.vramtop")
    p = run("run", "--no-tui", "--record", ok, "--", sys.executable, JOB, "--device", "cuda", "--steps", "200",
            "--batch", "4", "--seq-len", "128")
    check("healthy CUDA run: no creep over 200 steps", p.returncode == 0 and creep_events(ok) == [],
          f"rc {p.returncode}, events {creep_events(ok) if p.returncode == 0 else p.stderr[-300:]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
