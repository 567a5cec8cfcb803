"""How long one estimate of Llama-3-70B takes: the execution path beside the formula, interleaved.

    python bench/bench_estimator.py [--rounds 3]

Target (issue 13): executing a 70B model's setup takes < 5 s on CPU. Imports (torch, transformers,
peft, bitsandbytes) are done once before timing; each round times the formula and the execution of
QLoRA at 2k tokens with checkpointing, alternately, and prints the medians and their ratio.
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    raise SystemExit(main())
