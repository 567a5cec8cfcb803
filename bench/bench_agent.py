"""Agent overhead, measured side by side in one run.

1. The tiny LoRA fine-tune (vramtop.tiny) trained bare and with the agent at
   default settings (publishing over ipc, 10 Hz sampler), interleaved in
   pairs of blocks of steps; prints the median ratio of paired step times.
2. The cost of one categorized sample (Agent.snapshot) for the tiny model
   and for a Llama-7B-shaped model on the meta device (no memory used),
   with gradients and AdamW states in place, as in full fine-tuning.

    python bench/bench_agent.py [--pairs 15] [--steps 10]

Targets: step-time ratio <= 1.02 on CPU for the tiny model; one 7B-shaped
sample < 1 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vramtop_agent
from vramtop.tiny import add_lora, build_model, make_batch


def _train_block(model, opt, batch, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def step_time_ratio(pairs: int, steps: int) -> tuple[float, float, float]:
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch = make_batch(model, 4, 128)
    _train_block(model, opt, batch, 3)  # warm-up
    bare, watched, ratios = [], [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate which goes first
        times = {}
        for with_agent in order:
            if with_agent:
                agent = vramtop_agent.watch(model, opt)
                times[True] = _train_block(model, opt, batch, steps)
                agent.stop()
            else:
                times[False] = _train_block(model, opt, batch, steps)
        bare.append(times[False])
        watched.append(times[True])
        ratios.append(times[True] / times[False])
    return statistics.median(bare), statistics.median(watched), statistics.median(ratios)


def sample_cost(model, opt, repeat: int = 200) -> float:
    agent = vramtop_agent.watch(model, opt, publish=False)
    agent.snapshot()
    t0 = time.perf_counter()
    for _ in range(repeat):
        agent.snapshot(fresh=False)  # what the sampler thread does
    cost = (time.perf_counter() - t0) / repeat
    agent.stop()
    return cost


def llama7b_on_meta():
    from vramtop.tiny import build_model as _unused  # noqa: F401  (same transformers import path)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.empty_like(p)
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p)}
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)

    bare, watched, ratio = step_time_ratio(args.pairs, args.steps)
    print(f"tiny LoRA fine-tune, CPU, batch 4 x seq 128, {args.pairs} interleaved pairs of {args.steps} steps")
    print(f"  step time bare    {bare * 1000:8.2f} ms (median)")
    print(f"  step time watched {watched * 1000:8.2f} ms (median)")
    print(f"  ratio watched/bare {ratio:.3f}   (target <= 1.02)")

    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(**make_batch(model, 4, 128)).loss.backward()
    opt.step()
    print(f"one sample, tiny LoRA model:        {sample_cost(model, opt) * 1e6:8.1f} us")
    model, opt = llama7b_on_meta()
    n = sum(p.numel() for p in model.parameters())
    cost = sample_cost(model, opt, repeat=100)
    print(f"one sample, Llama-7B shape ({n / 1e9:.2f}B params, grads + AdamW states, meta device): "
          f"{cost * 1e6:8.1f} us   (target < 1000 us)")


if __name__ == "__main__":
    main()
