"""A real tiny fine-tune for the alarm tests, run unmodified under `vramtop run` (no vramtop import).

    python tests/leak_job.py --steps 200 [--leak] [--batch 2] [--seq-len 32] [--sleep 0.02]

With --leak it keeps each step's logits in a list "for later metrics" (the classic leak): one
batch x seq x vocab float32 tensor more per step, printed as LEAK_BYTES so a test knows the truth.
"""

import argparse
import time

import torch

from vramtop.tiny import add_lora, build_model, make_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--leak", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--oom", action="store_true", help="end with the error a CUDA OOM raises (CPU: raised here)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = add_lora(build_model(vocab_size=2048)).to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = make_batch(model, batch=args.batch, seq_len=args.seq_len, device=args.device)
    kept = []
    for _ in range(args.steps):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.leak:
            kept.append(out.logits.detach().clone())  # "for the epoch's metrics": never freed
        del out
        if args.sleep:
            time.sleep(args.sleep)
    if kept:
        print(f"LEAK_BYTES {kept[0].untyped_storage().nbytes()}", flush=True)
    if args.device.startswith("cuda"):  # what CUDA itself says, for bench/gpu_alarms.py
        print(f"MAX_ALLOCATED {torch.cuda.max_memory_allocated()}", flush=True)
        print(f"MAX_RESERVED {torch.cuda.max_memory_reserved()}", flush=True)
    print(f"done {len(kept)}", flush=True)
    if args.oom:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; simulated on CPU)")


if __name__ == "__main__":
    main()
