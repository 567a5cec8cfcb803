"""Where the agent's overhead goes on a GPU: ablations and a profile of the training thread.

    python bench/gpu_overhead.py [--steps 15] [--rounds 3] [--profile]

Trains a ~1.1B Llama (random weights, bf16, LoRA r=8 on q/v, batch 4 x 512)
and times steps (CUDA-synchronised, median) bare and with the agent in
several configurations, interleaved: default; recording on; activations
tracked every step (track_every=1); no sampling (sample_hz=0); no sampling
and no activation tracking; no peak resets. Target (issue 11): default
<= 1.02x, recording on <= 1.03x.
With --profile, prints the training thread's hottest functions with the
default agent.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile

import torch
from gpu_validate import timed_steps  # bench/ is the script's directory: on sys.path

import vramtop_agent
from vramtop.tiny import add_lora, build_model

CONFIGS = {
    "default": {},
    "recording on": {"record": os.path.join(tempfile.mkdtemp(prefix="vramtop-ovh-"), "r.vramtop")},
    "track every step": {"track_every": 1},
    "no sampling": {"sample_hz": 0},
    "no sampling, no activations": {"sample_hz": 0, "track_activations": False},
    "no peak resets": {"reset_peaks": False},
}


def build(device: str):
    model = build_model(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                        num_attention_heads=32, num_key_value_heads=4, attn_implementation="sdpa")
    model = model.to(device=device, dtype=torch.bfloat16)
    model = add_lora(model, rank=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (4, 512), device=device)
    return model, opt, {"input_ids": ids, "labels": ids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    model, opt, batch = build("cuda")
    timed_steps(model, opt, batch, 5)
    times: dict[str, list[float]] = {"bare": []}
    import random

    rng = random.Random(0)
    for _round in range(args.rounds):
        order = ["bare", *CONFIGS]
        rng.shuffle(order)  # no configuration always runs first or last in a round
        for name in order:
            if name == "bare":
                times["bare"] += timed_steps(model, opt, batch, args.steps)
                continue
            opts = CONFIGS[name]
            agent = vramtop_agent.watch(model, opt, **opts)
            timed_steps(model, opt, batch, 3)  # the estimate, the first hello and the first (tracked) steps settle
            times.setdefault(name, []).extend(timed_steps(model, opt, batch, args.steps))
            agent.stop()
    bare = statistics.median(times["bare"])
    print(f"bare step (median of {len(times['bare'])}): {bare * 1000:.2f} ms")
    for name in CONFIGS:
        med = statistics.median(times[name])
        print(f"RATIO {name:<28} {med / bare:.3f}x  ({med * 1000:.2f} ms)")
    if args.profile:
        agent = vramtop_agent.watch(model, opt)
        timed_steps(model, opt, batch, 2)
        prof = cProfile.Profile()
        prof.enable()
        timed_steps(model, opt, batch, 10)
        prof.disable()
        agent.stop()
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumtime").print_stats("vramtop_agent|cuda/memory", 25)


if __name__ == "__main__":
    main()
