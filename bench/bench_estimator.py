"""How long one estimate of Llama-3-70B takes: the execution path beside the formula, interleaved.

    python bench/bench_estimator.py [--rounds 3]

Target (issue 13): executing a 70B model's setup takes < 5 s on CPU. Imports (torch, transformers,
peft, bitsandbytes) are done once before timing; each round times the formula and the execution of
QLoRA at 2k tokens with checkpointing, alternately, and prints the medians and their ratio.

    python bench/bench_estimator.py --cli [--rounds 3]

Times what a user waits for: `vramtop estimate llama-3-70b --method qlora --seq-len 2048` in fresh
processes, imports included (the first round is the coldest this machine allows: the OS file cache
cannot be dropped without root). Prints wall and CPU (user+sys) seconds per round; on a shared,
loaded machine the CPU time is the steadier number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "agent")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cli", action="store_true", help="time the CLI in fresh processes, imports included")
    args = ap.parse_args()
    if args.cli:
        return cli(args.rounds)
    import torch

    from vramtop_agent.estimator import Setup, estimate, get_preset
    from vramtop_agent.estimator.execute import execute
    from vramtop_agent.estimator.presets import preset_config

    torch.set_num_threads(1)
    setup = Setup(method="qlora", seq_len=2048, grad_ckpt=True)
    cfg, desc = preset_config("llama-3-70b"), get_preset("llama-3-70b")
    execute(dict(cfg, num_hidden_layers=2), setup)   # imports and first-use costs, not timed
    formula, executed = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        estimate(desc, setup)
        formula.append(time.perf_counter() - t)
        t = time.perf_counter()
        est = execute(cfg, setup)
        executed.append(time.perf_counter() - t)
    f, e = statistics.median(formula), statistics.median(executed)
    print(f"llama-3-70b qlora seq 2048 ckpt: formula {f:.3f} s, execution {e:.2f} s (x{e / f:.0f}); "
          f"peak allocated {est.peak_allocated / 2**30:.2f} GiB")
    print(("PASS" if e < 5 else "FAIL") + f" execution under 5 s ({e:.2f} s)")
    return 0 if e < 5 else 1


def cli(rounds: int) -> int:
    import resource
    import subprocess

    argv = [sys.executable, "-m", "vramtop.cli", "estimate", "llama-3-70b", "--method", "qlora", "--seq-len", "2048"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "agent")]))
    walls = []
    for i in range(rounds):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        walls.append(wall)
        print(f"{'cold' if i == 0 else 'warm'} run {i + 1}: wall {wall:.2f} s, cpu {cpu:.2f} s")
    print(("PASS" if walls[0] < 5 else "FAIL") + f" first run under 5 s ({walls[0]:.2f} s wall)")
    return 0 if walls[0] < 5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
