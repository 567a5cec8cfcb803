"""`vramtop estimate MODEL`: what a training run will need, block by block, before running it."""

from __future__ import annotations

import argparse
import json
import re

from vramtop import budget
from vramtop.commands.common import add_verb
from vramtop.errors import UserError

# Seed 001's Llama-2-7B table (batch 1, gradient checkpointing on), in GB as the article prints them.
ARTICLE_LLAMA2_7B = [
    ("QLoRA, seq 1024", dict(method="qlora", seq_len=1024), 7.0),
    ("QLoRA, seq 2048", dict(method="qlora", seq_len=2048), 8.5),
    ("QLoRA, seq 4096", dict(method="qlora", seq_len=4096), 11.5),
    ("LoRA fp16, seq 2048", dict(method="lora", weight_dtype="fp16", seq_len=2048), 18.0),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "estimate", run,
        help="predict a training run's memory (parameters, gradients, optimizer, activations, peak)",
        description="Predict the GPU memory of one training step, block by block, and what nvidia-smi will show. "
                    "Any model transformers can build is run on a 'meta' device (shapes only, no memory, no download) "
                    "when torch, transformers and peft are installed; otherwise a built-in formula covers "
                    "Llama-style models and GPT-2.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a preset (llama-2-7b, llama-3-8b, llama-3-70b, qwen2.5-7b, mistral-7b, gpt2, flan-t5-base, "
                        "flan-t5-large, flan-t5-xl, t5-base, t5-large, bart-large), a config.json "
                        "or model directory, or a Hugging Face id (org/name) whose config.json is in the local cache")
    _add_method_options(p)
    _add_step_options(p)
    _add_parallel_options(p)
    _add_output_options(p)
    budget.add_arguments(p)
    # "--gpu -5GiB" should reach the size parser (and get a reason), not be taken for an option.
    p._negative_number_matcher = re.compile(r"^-\d")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """LoRA / QLoRA and the weights' dtypes."""
    p.add_argument("--method", choices=("full", "lora", "qlora"), default="full",
                   help="full fine-tuning, LoRA adapters on a 16-bit model, or LoRA on a 4-bit model (QLoRA)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--targets", "--lora-targets", dest="targets", default=None,
                   help="layers that get LoRA adapters, comma-separated, e.g. q_proj,v_proj or lm_head "
                        "(default: every linear layer for QLoRA, q_proj,v_proj for LoRA; 'all-linear' works too)")
    p.add_argument("--modules-to-save", default=None,
                   help="layers trained in full beside the adapters, comma-separated (e.g. lm_head,embed_tokens)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout probability (default 0)")
    p.add_argument("--adapter-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the LoRA weights (PEFT keeps them in fp32 by default)")
    p.add_argument("--dtype", default=None,
                   help="weight dtype: fp32, bf16, fp16, int8, nf4, fp4 (default bf16; nf4 for QLoRA)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit weights without double quantization")
    p.add_argument("--no-kbit-fp32-cast", action="store_true",
                   help="QLoRA: keep embeddings, norms and the output layer in 16-bit (peft's "
                        "prepare_model_for_kbit_training casts them to fp32)")
    p.add_argument("--compute-dtype", default=None,
                   help="dtype of the activations (default: the weight dtype; bf16 for 4/8-bit weights)")
    mw = p.add_mutually_exclusive_group()
    mw.add_argument("--master-weights", dest="master_weights", action="store_const", const=True, default=None,
                    help="keep an fp32 copy of 16-bit weights for the optimizer (default for full 16-bit training)")
    mw.add_argument("--no-master-weights", dest="master_weights", action="store_const", const=False)


def _add_step_options(p: argparse.ArgumentParser) -> None:
    """The optimizer and one step's shape: batch, sequence, accumulation, checkpointing, attention."""
    p.add_argument("--optim", default="adamw", help="adamw, adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, "
                                                     "sgd-momentum, adafactor")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence; for an encoder-decoder model (T5, BART) the encoder's input "
                        "(default 2048; 512 for encoder-decoder models)")
    p.add_argument("--target-len", type=int, default=None,
                   help="encoder-decoder models only: tokens of the decoder's labels (default 128, where "
                        "transformers' summarization and translation examples cut their targets)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="gradient checkpointing: recompute each layer in backward instead of keeping its activations")
    p.add_argument("--attn", choices=("eager", "sdpa", "flash"), default="sdpa",
                   help="attention implementation (sdpa: PyTorch's fused kernels; eager: plain matmul + softmax)")
    p.add_argument("--logits-dtype", default="fp32", help="dtype of the logits the loss reads (default fp32)")
    p.add_argument("--loss", choices=("full", "chunked"), default="full",
                   help="chunked: output layer + cross-entropy on --loss-chunk tokens at a time, each chunk's "
                        "backward at once, so the full batch x seq x vocab logits never exist (execution engine)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk for --loss chunked (default 1024)")
    p.add_argument("--optim-in-backward", action="store_true",
                   help="one optimizer per parameter stepped from a post-accumulate-grad hook that frees the "
                        "gradient: about one gradient alive at a time (execution engine)")
    p.add_argument("--offload", action="append", default=None, metavar="activations|optimizer",
                   help="move saved activations (torch's save_on_cpu) and/or the optimizer (an fp32 copy of the "
                        "weights, gradient copies, states and the step: ZeRO-Offload) to host RAM; repeat or "
                        "comma-separate for both; the host RAM needed is reported (execution engine)")
    p.add_argument("--compile", action="store_true",
                   help="the model trained under torch.compile (inductor, default mode): inductor's partitioner "
                        "decides what is saved for backward; its kernels' buffers are approximated (execution "
                        "engine)")


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    """Several GPUs, sharding and mixture-of-experts routing."""
    p.add_argument("--world-size", type=int, default=1, help="number of GPUs training together")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0,
                   help="split training state across the --world-size GPUs: 1 the optimizer states, 2 also the "
                        "gradients, 3 also the weights (DeepSpeed ZeRO stages; FSDP full sharding is 3)")
    p.add_argument("--fsdp", action="store_true", help="FSDP full sharding (same as --zero 3)")
    p.add_argument("--routing", choices=("balanced", "worst"), default="balanced",
                   help="mixture-of-experts models: tokens spread evenly over the experts (balanced) or "
                        "all on the top-k experts (worst)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """How to estimate, for which card, and what to print."""
    p.add_argument("--engine", choices=("auto", "execute", "formula"), default="auto",
                   help="execute the model on the meta device, or use the built-in formula (auto: execute "
                        "when torch, transformers and peft are installed)")
    p.add_argument("--cuda-context", default=None, help="CUDA context size (default: typical for --gpu, else 500MiB)")
    p.add_argument("--gpu", default=None, help="a card (rtx4090, a100-80g, h100, ...) or a memory size (24GiB)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    p.add_argument("--terms", action="store_true", help="list every term with its explanation")
    p.add_argument("--vs-article", action="store_true",
                   help="Llama-2-7B only: print the estimate beside a published table of measured totals "
                        "(batch 1, checkpointing on)")


def run(args: argparse.Namespace) -> int:
    import sys

    from vramtop_agent.estimator import card_bytes, parse_bytes
    from vramtop_agent.estimator.setup import validate

    _reject_meaningless(args)
    config, label = _model(args.model)
    _lengths(args, config, label)
    try:
        card = card_bytes(args.gpu) if args.gpu else None
        setup = validate(_setup(args, parse_bytes, card))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if card is not None and card[1] <= 0:
        raise UserError(f"--gpu {args.gpu}: a card has more than 0 bytes of memory")
    if args.vs_article:
        print(article_table(_desc(config, label), setup))
        return 0
    context = _context_length(config)
    if context and args.seq_len > context:
        print(f"warning: --seq-len {args.seq_len} exceeds {label}'s context of {context} positions "
              f"(max_position_embeddings)", file=sys.stderr)
    est = _estimate(config, label, setup, args)
    limits = budget.from_args(args)
    if limits is not None:  # the same verdict as `vramtop run --budget`, from the estimate
        return budget.finish_estimate(est.to_dict(), limits, args.verdict,
                                      render(est, card, show_terms=args.terms) if not args.json else None)
    if args.json:
        out = est.to_dict()
        if card:
            out["gpu"] = {"name": card[0], "bytes": card[1], "fits": est.fits(card[1])}
        print(json.dumps(out))
        return 0
    print(render(est, card, show_terms=args.terms))
    return 0


def _reject_meaningless(args) -> None:
    """Options that mean nothing for the chosen method are mistakes: say so instead of ignoring them."""
    if args.method == "full":
        for flag, value in (("--rank", args.rank), ("--targets", args.targets),
                            ("--modules-to-save", args.modules_to_save)):
            if value is not None:
                raise UserError(f"{flag} applies to LoRA adapters: add --method lora or --method qlora")
        if args.no_kbit_fp32_cast:
            raise UserError("--no-kbit-fp32-cast applies to QLoRA: add --method qlora")
    if (args.zero or args.fsdp) and args.world_size < 2:
        raise UserError("--zero/--fsdp split state across GPUs: add --world-size 2 or more")
    if args.rank is not None and args.rank < 1:
        raise UserError("--rank must be at least 1")


def _lengths(args, config: dict, label: str) -> None:
    """The defaults of --seq-len and --target-len depend on the kind of model."""
    from vramtop_agent.estimator import seq2seq

    if seq2seq.encoder_decoder(config):
        if args.seq_len is None:
            args.seq_len = seq2seq.DEFAULT_SOURCE_LEN
        if args.target_len is None:
            args.target_len = seq2seq.DEFAULT_TARGET_LEN
        return
    if args.target_len is not None:
        raise UserError(f"--target-len applies to encoder-decoder models (T5, BART); {label} is decoder-only: "
                        f"its one length is --seq-len")
    if args.seq_len is None:
        args.seq_len = 2048


def _context_length(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    text = config.get("text_config")
    return _context_length(text) if isinstance(text, dict) else None


def _model(name: str) -> tuple[dict, str]:
    from vramtop_agent.estimator.model_source import resolve_model

    try:
        return resolve_model(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _desc(config: dict, label: str):
    from vramtop_agent.estimator import from_hf_config

    try:
        return from_hf_config(config, name=label)
    except ValueError as exc:
        if "--engine execute" in str(exc):
            raise UserError(str(exc)) from None
        raise UserError(f"{exc} (the formula engine knows Llama-style models and GPT-2; install torch, "
                        f"transformers and peft to execute any architecture)") from None


def _estimate(config: dict, label: str, setup, args):
    from vramtop_agent.estimator import estimate
    from vramtop_agent.estimator.execute import ExecutionError, available, execute

    engine = args.engine
    if engine == "auto":
        engine = "execute" if available(light=True) and setup.world_size == 1 and setup.wdtype != "int8" else "formula"
    try:
        if engine == "execute":
            if not available(light=True):
                raise UserError("--engine execute needs torch, transformers and peft installed")
            return execute(config, setup, routing=args.routing, name=label)
        return estimate(_desc(config, label), setup)
    except (ExecutionError, ValueError) as exc:
        raise UserError(str(exc)) from None


def _setup(args, parse_bytes, card=None):
    from vramtop_agent.estimator import Setup

    def names(text):
        return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None

    return Setup(
        method=args.method, lora_rank=args.rank or 8, lora_targets=names(args.targets),
        modules_to_save=names(args.modules_to_save), lora_dropout=args.lora_dropout, lora_dtype=args.adapter_dtype,
        weight_dtype=args.dtype, double_quant=not args.no_double_quant, kbit_prep=not args.no_kbit_fp32_cast,
        compute_dtype=args.compute_dtype,
        master_weights=args.master_weights, optimizer=args.optim, batch=args.batch, seq_len=args.seq_len,
        grad_accum=args.grad_accum, grad_ckpt=args.grad_ckpt, attn=args.attn, logits_dtype=args.logits_dtype,
        world_size=args.world_size, zero=3 if args.fsdp else args.zero,
        cuda_context=parse_bytes(args.cuda_context) if args.cuda_context else None, device="cuda",
        gpu=card[0] if card else None, loss=args.loss, loss_chunk=args.loss_chunk,
        optim_in_backward=args.optim_in_backward, target_len=args.target_len,
        offload=names(",".join(args.offload)) if args.offload else None, compile=args.compile,
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
        bits.append(f"rank {s.lora_rank} on {_targets(est)}")
    lengths = f"seq {s.seq_len}" + (f" -> target {s.target_len}" if s.target_len else "")
    bits += [s.optimizer, f"batch {s.batch} x {lengths}", f"grad ckpt {'on' if s.grad_ckpt else 'off'}", s.attn]
    if s.grad_accum > 1:
        bits.append(f"grad accum {s.grad_accum}")
    if s.world_size > 1:
        bits.append(f"{s.world_size} ranks, ZeRO-{s.zero}")
    if s.loss == "chunked":
        bits.append(f"chunked loss ({s.loss_chunk} tokens)")
    if s.optim_in_backward:
        bits.append("optimizer in backward")
    if s.offload:
        bits.append(f"{' + '.join(s.offload)} offloaded")
    if s.compile:
        bits.append("torch.compile")
    return " · ".join(bits)


def _targets(est) -> str:
    s = est.setup
    if est.engine == "execute":
        return ",".join(s.lora_targets) if s.lora_targets else ("all linear layers" if s.method == "qlora"
                                                                 else "PEFT's default layers")
    from vramtop_agent.estimator.weights import resolve_targets

    return ",".join(resolve_targets(est.model, s))


def _headline(est) -> list[str]:
    """The device number first (what nvidia-smi shows, what --gpu is checked against), then the two
    numbers torch reports, each named for where the user reads it."""
    from vramtop_agent.estimator import fmt_bytes

    parts = est.device_parts or {}
    extra = [f"reserved {fmt_bytes(parts.get('reserved', est.peak_reserved))}"]
    for key, label in (("cuda_context", "CUDA context"), ("workspaces", "library workspaces"),
                       ("paged_optimizer", "paged optimizer states")):
        if parts.get(key):
            extra.append(f"{label} {fmt_bytes(parts[key])}")
    return [
        f"device (nvidia-smi):             {fmt_bytes(est.device):>12}  = " + " + ".join(extra),
        f"peak reserved (max_memory_reserved):  {fmt_bytes(est.peak_reserved):>12}  "
        "allocated + allocator rounding/slack",
        f"peak allocated (max_memory_allocated): {fmt_bytes(est.peak_allocated):>11}  in {est.peak_phase}",
    ]


def render(est, card=None, show_terms=False) -> str:
    from vramtop_agent.estimator import BLOCKS, fmt_bytes

    engine = "executed on the meta device" if est.engine == "execute" else "formula"
    lines = [describe_setup(est) + f" · {engine}", ""] + _headline(est)
    if card:
        name, total = card
        verdict = "fits" if est.fits(total) else "does NOT fit"
        lines.append(f"{name} ({fmt_bytes(total)}): {verdict}, {fmt_bytes(total - est.peak)} left")
    if est.host_parts:
        parts = " + ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in est.host_parts.items())
        lines.append(f"host RAM (offloaded, not on the device): {fmt_bytes(est.host)}  = {parts}")
    for note in est.assumptions:
        lines.append(f"assumption: {note}")
    lines.append("")
    notes = {
        "parameters": f"trainable {fmt_bytes(est.params_split['trainable'])}, "
                      f"frozen {fmt_bytes(est.params_split['frozen'])}",
        "gradients": "",
        "optimizer": "",
        "activations": "saved for backward at the end of forward",
        "other": f"held logits {fmt_bytes(est.other_parts['held_outputs'])}, inputs, buffers"
                 + (f", CUDA context {fmt_bytes(est.other_parts['cuda_context'])}"
                    if est.other_parts.get('cuda_context') else ""),
    }
    lines.append(f"{'block':<13}{'estimate':>12}  ")
    for k in BLOCKS:
        lines.append(f"{k:<13}{fmt_bytes(est.blocks[k]):>12}  {notes[k]}")
    lines.append("")
    pp = est.phase_peaks
    lines.append("phase peaks (allocated): " + "  ".join(f"{p} {fmt_bytes(pp[p])}" for p in pp))
    if show_terms:
        lines.append("")
        for name, nbytes, why in est.terms:
            lines.append(f"  {name:<42}{fmt_bytes(nbytes):>12}  {why}")
    return "\n".join(lines)


BLOCK_ORDER = ("parameters", "gradients", "optimizer", "activations", "other")


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
                     + "".join(f"{b[k] / 1e9:>9.2f}" for k in BLOCK_ORDER)
                     + f"{spike / 1e9:>9.2f}")
    lines.append("")
    lines.append("spike = backward/optimizer peak above the end of forward (loss spike, recomputed layer, gradients).")
    lines.append("Why the numbers differ: docs/estimator.md.")
    return "\n".join(lines)
