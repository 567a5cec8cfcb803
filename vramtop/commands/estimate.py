"""`vramtop estimate MODEL`: what a training run will need, block by block, before running it."""

from __future__ import annotations

import argparse
import json
import os

from vramtop import budget
from vramtop.errors import UserError

# Seed 001's Llama-2-7B table (batch 1, gradient checkpointing on), in GB as the article prints them.
ARTICLE_LLAMA2_7B = [
    ("QLoRA, seq 1024", dict(method="qlora", seq_len=1024), 7.0),
    ("QLoRA, seq 2048", dict(method="qlora", seq_len=2048), 8.5),
    ("QLoRA, seq 4096", dict(method="qlora", seq_len=4096), 11.5),
    ("LoRA fp16, seq 2048", dict(method="lora", weight_dtype="fp16", seq_len=2048), 18.0),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="predict a training run's memory (parameters, gradients, optimizer, activations, peak)",
        description="Predict the memory of one training step from a preset or a config.json, block by block.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a preset (llama-2-7b, llama-3-8b, llama-3-70b, qwen2.5-7b, mistral-7b, gpt2) "
                        "or a path to a config.json (or its directory)")
    p.add_argument("--method", choices=("full", "lora", "qlora"), default="full")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--targets", default=None,
                   help="LoRA target modules, comma-separated (default: all linear layers for QLoRA, "
                        "q_proj,v_proj for LoRA; 'all-linear' works too)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--dtype", default=None,
                   help="weight dtype: fp32, bf16, fp16, int8, nf4, fp4 (default bf16; nf4 for QLoRA)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization")
    p.add_argument("--compute-dtype", default=None, help="activation dtype (default: the weight dtype; bf16 when quantized)")
    mw = p.add_mutually_exclusive_group()
    mw.add_argument("--master-weights", dest="master_weights", action="store_const", const=True, default=None,
                    help="keep fp32 master weights of 16-bit trainable weights (default for full 16-bit training)")
    mw.add_argument("--no-master-weights", dest="master_weights", action="store_const", const=False)
    p.add_argument("--optim", default="adamw", help="adamw, adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, "
                                                     "sgd-momentum, adafactor")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of every layer")
    p.add_argument("--attn", choices=("eager", "sdpa", "flash"), default="sdpa")
    p.add_argument("--logits-dtype", default="fp32", help="dtype the loss sees (HF upcasts to fp32)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage (FSDP full shard = 3)")
    p.add_argument("--fsdp", action="store_true", help="FSDP full sharding (same as --zero 3)")
    p.add_argument("--cuda-context", default="500MiB", help="CUDA context size (default 500MiB)")
    p.add_argument("--gpu", default=None, help="a card (rtx4090, a100-80g, h100, ...) or a size (24GiB)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    p.add_argument("--terms", action="store_true", help="list every term with its explanation")
    p.add_argument("--vs-article", action="store_true",
                   help="Llama-2-7B only: print the estimate beside seed 001's table (batch 1, checkpointing on)")
    budget.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vramtop_agent.estimator import card_bytes, estimate, parse_bytes

    desc = _model(args.model)
    try:
        setup = _setup(args, parse_bytes)
        card = card_bytes(args.gpu) if args.gpu else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.vs_article:
        print(article_table(desc, setup))
        return 0
    try:
        est = estimate(desc, setup)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    limits = budget.from_args(args)
    if limits is not None:  # the same verdict as `vramtop run --budget`, from the estimate
        return budget.finish_estimate(est.to_dict(), limits, args.verdict, render(est, card) if not args.json else None)
    if args.json:
        out = est.to_dict()
        if card:
            out["gpu"] = {"name": card[0], "bytes": card[1], "fits": est.fits(card[1])}
        print(json.dumps(out))
        return 0
    print(render(est, card, show_terms=args.terms))
    return 0


def _model(name: str):
    from vramtop_agent.estimator import get_preset, load_config

    looks_like_path = os.sep in name or name.endswith(".json") or os.path.exists(name)
    try:
        return load_config(name) if looks_like_path else get_preset(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _setup(args, parse_bytes):
    from vramtop_agent.estimator import Setup

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    return Setup(
        method=args.method, lora_rank=args.rank, lora_targets=targets, lora_dropout=args.lora_dropout,
        weight_dtype=args.dtype, double_quant=not args.no_double_quant, compute_dtype=args.compute_dtype,
        master_weights=args.master_weights, optimizer=args.optim, batch=args.batch, seq_len=args.seq_len,
        grad_accum=args.grad_accum, grad_ckpt=args.grad_ckpt, attn=args.attn, logits_dtype=args.logits_dtype,
        world_size=args.world_size, zero=3 if args.fsdp else args.zero,
        cuda_context=parse_bytes(args.cuda_context), device="cuda",
    )


# ------------------------------------------------------------------ rendering


def _gb(n: int) -> str:
    return f"{n / 1e9:6.2f} GB"


def describe_setup(est) -> str:
    s = est.setup
    bits = [est.model.name, s.method]
    if s.method == "qlora":
        bits.append(f"{s.wdtype}{'+dq' if s.double_quant and s.wdtype != 'int8' else ''}")
    else:
        bits.append(s.wdtype + (" + fp32 masters" if s.masters else ""))
    if s.method != "full":
        from vramtop_agent.estimator.weights import resolve_targets

        bits.append(f"rank {s.lora_rank} on {','.join(resolve_targets(est.model, s))}")
    bits += [s.optimizer, f"batch {s.batch} x seq {s.seq_len}", f"grad ckpt {'on' if s.grad_ckpt else 'off'}", s.attn]
    if s.grad_accum > 1:
        bits.append(f"grad accum {s.grad_accum}")
    if s.world_size > 1:
        bits.append(f"{s.world_size} ranks, ZeRO-{s.zero}")
    return " · ".join(bits)


def render(est, card=None, show_terms=False) -> str:
    from vramtop_agent.estimator import BLOCKS, fmt_bytes

    lines = [describe_setup(est), ""]
    notes = {
        "parameters": f"trainable {fmt_bytes(est.params_split['trainable'])}, frozen {fmt_bytes(est.params_split['frozen'])}",
        "gradients": "",
        "optimizer": "",
        "activations": "saved for backward at the end of forward",
        "other": f"CUDA context {fmt_bytes(est.other_parts['cuda_context'])}, "
                 f"held logits {fmt_bytes(est.other_parts['held_outputs'])}",
    }
    lines.append(f"{'block':<13}{'estimate':>12}  ")
    for k in BLOCKS:
        lines.append(f"{k:<13}{fmt_bytes(est.blocks[k]):>12}  {notes[k]}")
    lines.append("")
    pp = est.phase_peaks
    lines.append("phase peaks (allocated): " + "  ".join(f"{p} {fmt_bytes(pp[p])}" for p in pp))
    lines.append(f"peak: {fmt_bytes(est.peak)} in {est.peak_phase} (with CUDA context)")
    if card:
        name, total = card
        verdict = "fits" if est.fits(total) else "does NOT fit"
        lines.append(f"{name} ({fmt_bytes(total)}): {verdict}, {fmt_bytes(total - est.peak)} left")
    if show_terms:
        lines.append("")
        for name, nbytes, why in est.terms:
            lines.append(f"  {name:<42}{fmt_bytes(nbytes):>12}  {why}")
    return "\n".join(lines)


def article_table(desc, base_setup) -> str:
    """Our per-block numbers beside the article's totals (seed 001), for Llama-2-7B."""
    from vramtop_agent.estimator import estimate

    if desc.name != "llama-2-7b":
        raise UserError("--vs-article compares with a Llama-2-7B table: use MODEL llama-2-7b")
    head = (f"{'scenario':<21}{'article':>9}{'ours':>10}{'diff':>8}   "
            f"{'params':>9}{'grads':>9}{'optim':>9}{'acts':>9}{'other':>9}{'spike':>9}")
    lines = ["Llama-2-7B, batch 1, gradient checkpointing on (GB = 1e9 bytes); ours = peak incl. CUDA context",
             head, "-" * len(head)]
    for label, changes, article_gb in ARTICLE_LLAMA2_7B:
        fixed = dict(batch=1, grad_ckpt=True, weight_dtype=None, lora_targets=None, master_weights=None)
        setup = base_setup.with_(**{**fixed, **changes})
        est = estimate(desc, setup)
        b = est.blocks
        spike = est.peak_allocated - est.end_of_forward
        ours = est.peak / 1e9
        lines.append(f"{label:<21}{article_gb:>7.1f}GB{ours:>8.2f}GB{(ours - article_gb) / article_gb:>+7.0%}   "
                     + "".join(f"{b[k] / 1e9:>9.2f}" for k in ("parameters", "gradients", "optimizer", "activations", "other"))
                     + f"{spike / 1e9:>9.2f}")
    lines.append("")
    lines.append("spike = backward/optimizer peak above the end of forward (loss spike, recomputed layer, gradients).")
    lines.append("Why the numbers differ: docs/estimator.md.")
    return "\n".join(lines)
