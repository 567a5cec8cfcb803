"""The demo's training job: a real tiny LoRA fine-tune, watched by the agent.

A small Llama built from a config (random weights, nothing downloaded),
PEFT LoRA on q_proj/v_proj, AdamW, trained on the bytes of a stdlib source
file as a next-byte language model, so the loss really falls. Runs on CUDA
when present, else on CPU.

    python -m vramtop.demo_train --steps 200
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

SIZES = {
    "tiny": dict(vocab_size=512),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
}


def corpus_tokens():
    import argparse as text_source  # any stdlib module's source is a few hundred KB of text

    import torch

    data = inspect.getsource(text_source).encode("utf-8", "replace")
    return torch.tensor(list(data), dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vramtop.demo_train")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0: until stopped)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--sleep", type=float, default=0.0, help="pause between steps, to watch slowly")
    ap.add_argument("--endpoint", default=None, help="agent endpoint (default: per-user ipc socket)")
    ap.add_argument("--record", default=None, help="also record to this file")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="tiny: 0.9M params, a few MB; small: ~0.3B params, a few GB on a GPU")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import vramtop_agent
    from vramtop.tiny import add_lora, build_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(**SIZES[args.size])
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not args.full:
        model = add_lora(model, rank=8, targets=("q_proj", "v_proj"))
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    tokens = corpus_tokens()
    gen = torch.Generator().manual_seed(0)

    options = {}
    if args.endpoint:
        options["endpoint"] = args.endpoint
    if args.record:
        options["record"] = args.record
    with vramtop_agent.watch(model, optimizer, **options) as agent:
        if not args.quiet:
            print(f"demo: pid {agent.pid} training on {device}, agent at {agent.endpoint}", flush=True)
        step = 0
        while args.steps == 0 or step < args.steps:
            t0 = time.perf_counter()
            for _ in range(args.grad_accum):
                starts = torch.randint(0, len(tokens) - args.seq_len - 1, (args.batch,), generator=gen)
                ids = torch.stack([tokens[s:s + args.seq_len] for s in starts.tolist()]).to(device)
                out = model(input_ids=ids, labels=ids)
                (out.loss / args.grad_accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if not args.quiet and (step % 10 == 0 or step == 1):
                print(f"step {step} loss {out.loss.item():.3f} {1000 * (time.perf_counter() - t0):.0f} ms", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
