"""The estimator's three peaks against a real GPU: max_memory_allocated, max_memory_reserved, NVML.

    python bench/gpu_estimator.py                      # the matrix below, each row in a fresh process
    python bench/gpu_estimator.py --quick              # 8 rows, the new settings first (~4 minutes on one H100)
    python bench/gpu_estimator.py --json OUT.json
    python bench/gpu_estimator.py --list [--quick]     # no GPU: the rows, each config built on the meta device
                                                       # and each setup validated
    python bench/gpu_estimator.py --smoke [--quick]    # no GPU: every row's training code and estimate run on
                                                       # the CPU with a tiny config of the same family

Rows: 1B-scale configs of several families built from their config numbers (random bf16 weights,
nothing downloaded) x LoRA / QLoRA (bitsandbytes NF4 + double quant, quantized on the way to the
GPU) x seq 512 / 2048 / 8192 x gradient checkpointing off / on, batch 1, AdamW (foreach, torch's
CUDA default); then one row per setting the execution engine runs as it is (--loss chunked,
--optim-in-backward, --offload activations, --offload optimizer) and Flan-T5-XL (encoder 512 tokens,
decoder 128) with LoRA and QLoRA. Each row runs in its own process (a clean caching allocator and
CUDA context), trains three steps and measures the third: torch.cuda.max_memory_allocated /
max_memory_reserved after reset_peak_memory_stats, and NVML's used memory of this process at the end
of the step (the device number). The estimate is `execute()` for the same config and setup on the
meta device. The real runs of the settings are written here, independently of the engine.

Targets (issue 13): allocated within 3 %, reserved within 5 %, device within 5 %, every row.
Prints one line per row, then a PASS/FAIL summary. Exit 0 all pass, 1 a row failed, 2 no CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "agent")]

from vramtop_agent.estimator.presets import preset_config  # noqa: E402  (path set above; no torch)
from vramtop_agent.estimator.seq2seq import encoder_decoder  # noqa: E402

CONFIGS = {
    # TinyLlama-1.1B, Qwen2.5-1.5B, Gemma-2-2B, Phi-3-mini-shaped (fewer layers: 1B scale) decoder configs.
    "llama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=8192),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "gemma2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                      num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      max_position_embeddings=8192, sliding_window=4096),
    "phi3-1b": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                    num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=32,
                    max_position_embeddings=8192, pad_token_id=0),
    # The estimator's own preset: the published config numbers (an encoder-decoder, 2.8 B as published).
    "flan-t5-xl": preset_config("flan-t5-xl"),
}
METHODS = ("lora", "qlora")
SEQS = (512, 2048, 8192)
TARGETS = {"allocated": 0.03, "reserved": 0.05, "device": 0.05}
# One row per setting the execution engine runs as it is, and the encoder-decoder rows. Full fine-tuning
# where the setting is about gradients or optimizer states (LoRA's are too small to show an error).
SETTING_ROWS = [
    dict(config="qwen2.5-1.5b", method="lora", seq=2048, ckpt=True, loss="chunked"),   # 152k vocabulary
    dict(config="llama-1.1b", method="full", seq=2048, ckpt=True, optim_in_backward=True),
    dict(config="llama-1.1b", method="lora", seq=2048, ckpt=False, offload=["activations"]),
    dict(config="llama-1.1b", method="full", seq=2048, ckpt=True, offload=["optimizer"]),
    dict(config="flan-t5-xl", method="lora", seq=512, target=128, batch=4, ckpt=False),
    dict(config="flan-t5-xl", method="qlora", seq=512, target=128, batch=4, ckpt=True),
]
LR = 1e-4


def rows(quick: bool) -> list[dict]:
    base = []
    for name in ("llama-1.1b", "qwen2.5-1.5b", "gemma2-2b", "phi3-1b"):
        for method in METHODS:
            for seq in SEQS:
                for ckpt in (False, True):
                    base.append(dict(config=name, method=method, seq=seq, ckpt=ckpt))
    if not quick:
        return base + SETTING_ROWS
    # What one device session can run (~280 s): a plain LoRA row, the settings, a plain QLoRA row last.
    plain = [r for r in base if r["seq"] == 2048 and r["ckpt"]]
    return ([r for r in plain if (r["config"], r["method"]) == ("llama-1.1b", "lora")] + SETTING_ROWS
            + [r for r in plain if (r["config"], r["method"]) == ("qwen2.5-1.5b", "qlora")])


def label(row: dict) -> str:
    """The row's setting in a few words (the table's last column)."""
    bits = []
    if row.get("loss") == "chunked":
        bits.append("chunked loss")
    if row.get("optim_in_backward"):
        bits.append("optim in backward")
    if row.get("offload"):
        bits.append("offload " + "+".join(row["offload"]))
    if row.get("target"):
        bits.append(f"b{row.get('batch', 1)} target {row['target']}")
    return ", ".join(bits) or "-"


def setup_for(row: dict, card: str | None, device: str = "cuda"):
    from vramtop_agent.estimator import Setup

    return Setup(method=row["method"], lora_rank=16, lora_targets=None, weight_dtype=None if row["method"] == "qlora"
                 else "bf16", compute_dtype="bf16", master_weights=False, batch=row.get("batch", 1),
                 seq_len=row["seq"], target_len=row.get("target"), grad_ckpt=row["ckpt"], attn="sdpa",
                 device=device, gpu=card, loss=row.get("loss", "full"),
                 optim_in_backward=bool(row.get("optim_in_backward")),
                 offload=tuple(row["offload"]) if row.get("offload") else None)


def _card() -> str | None:
    import torch

    from vramtop_agent.estimator.units import GPUS_MIB

    name = torch.cuda.get_device_name().lower()
    for key in sorted(GPUS_MIB, key=len, reverse=True):
        if key.split("-")[0] in name.replace(" ", ""):
            return key
    return None


# ------------------------------------------------------------------ the real run


def _hf(cfg: dict):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = dict(cfg)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf.use_cache = False
    return hf, (AutoModelForSeq2SeqLM if hf.is_encoder_decoder else AutoModelForCausalLM)


def _real_model(cfg: dict, method: str, dev: str):
    import torch

    hf, auto = _hf(cfg)
    model = auto.from_config(hf, dtype=torch.bfloat16)
    if method == "qlora":
        import bitsandbytes as bnb

        head = model.get_output_embeddings()
        # transformers' 4-bit loader leaves `_keep_in_fp32_modules` (T5's `wo`) unquantized.
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
        for prefix, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                full = f"{prefix}.{cname}" if prefix else cname
                if type(child) is not torch.nn.Linear or child is head or any(full.endswith(k) for k in keep):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(mod, cname, q)
        model.is_loaded_in_4bit = True
        for p in model.parameters():   # prepare_model_for_kbit_training's cast
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
    return model.to(dev)   # 4-bit weights are quantized as they move to the device


def _trainable(row: dict, cfg: dict, dev: str):
    """The model as the row trains it: adapters, checkpointing, train mode."""
    from peft import LoraConfig, get_peft_model

    model = _real_model(cfg, row["method"], dev)
    if row["method"] != "full":
        for p in model.parameters():
            p.requires_grad_(False)
    if row["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if row["method"] == "qlora":
            model.enable_input_require_grads()
    if row["method"] != "full":
        targets = "all-linear" if row["method"] == "qlora" else None
        task = "SEQ_2_SEQ_LM" if encoder_decoder(cfg) else "CAUSAL_LM"
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type=task))
    model.train()
    return model


def _batch(row: dict, cfg: dict, dev: str) -> dict:
    import torch

    b, vocab = row.get("batch", 1), cfg["vocab_size"]
    ids = torch.randint(0, vocab, (b, row["seq"]), device=dev)
    if encoder_decoder(cfg):
        return {"input_ids": ids, "labels": torch.randint(0, vocab, (b, row.get("target") or 128), device=dev)}
    return {"input_ids": ids, "labels": ids.clone()}


def _chunked(model, batch: dict, chunk: int) -> None:
    """--loss chunked as a training loop writes it: the decoder stack, then the output layer and fp32
    cross-entropy `chunk` tokens at a time into a detached copy of the hidden states, each chunk's backward
    at once, then one backward through the stack. The mean over every shifted target."""
    import torch
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=batch["input_ids"]).last_hidden_state
    h = hidden.detach().flatten(0, 1).requires_grad_(True)
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1).flatten()
    count = labels.shape[0] * (labels.shape[1] - 1)

    def chunk_loss(i):   # the chunk's logits die on return
        logits = lm.lm_head(h[i:i + chunk]).float()
        return F.cross_entropy(logits, targets[i:i + chunk], ignore_index=-100, reduction="sum") / count

    for i in range(0, h.shape[0], chunk):
        chunk_loss(i).backward()
    hidden.backward(h.grad.view_as(hidden))


def training(row: dict, cfg: dict, dev: str):
    """(model, one training step) for the row on `dev`; the step runs the row's setting for real."""
    import torch

    model = _trainable(row, cfg, dev)
    batch = _batch(row, cfg, dev)
    params = [p for p in model.parameters() if p.requires_grad]

    if row.get("optim_in_backward"):   # PyTorch's recipe: a per-parameter optimizer stepped from the hook
        opts = {p: torch.optim.AdamW([p], lr=LR) for p in params}

        def hook(p):
            opts[p].step()
            opts[p].zero_grad(set_to_none=True)

        for p in params:
            p.register_post_accumulate_grad_hook(hook)

        def step():
            model(**batch).loss.backward()
        return model, step

    if "optimizer" in (row.get("offload") or ()):   # ZeRO-Offload's layout: fp32 masters + states on the host
        masters = [p.detach().to("cpu").float() for p in params]
        host_grads = [torch.zeros_like(m) for m in masters]
        host_opt = torch.optim.AdamW(masters, lr=LR, foreach=False)
        for m, g in zip(masters, host_grads, strict=True):
            m.grad = g

        def step():
            model(**batch).loss.backward()
            for p, g in zip(params, host_grads, strict=True):
                g.copy_(p.grad.to("cpu"))   # bf16 to the host, widened there: no fp32 copy on the device
                p.grad = None
            host_opt.step()
            for p, m in zip(params, masters, strict=True):
                p.data.copy_(m.to(p.dtype))
        return model, step

    opt = torch.optim.AdamW(params, lr=LR)
    offload_acts = "activations" in (row.get("offload") or ())

    def step():
        if row.get("loss") == "chunked":
            _chunked(model, batch, 1024)
        elif offload_acts:
            with torch.autograd.graph.save_on_cpu(pin_memory=dev.startswith("cuda")):
                loss = model(**batch).loss
            loss.backward()
        else:
            model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def run_row(row: dict) -> dict:
    """In a fresh process: train 3 steps, measure the third, estimate the same setup."""
    import pynvml
    import torch

    from vramtop_agent.estimator.execute import execute

    card = _card()
    cfg = CONFIGS[row["config"]]
    _, step = training(row, cfg, "cuda")
    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    got = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    got["device"] = next((p.usedGpuMemory for p in procs if p.pid == os.getpid()), None)
    t = time.time()
    est = execute(cfg, setup_for(row, card))
    want = {"allocated": est.peak_allocated, "reserved": est.peak_reserved, "device": est.device,
            "estimate_s": round(time.time() - t, 2), "device_parts": est.device_parts, "host": est.host}
    return {**row, "card": card, "measured": got, "estimated": want}


# ------------------------------------------------------------------ without a GPU


_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=16, d_model=64, d_ff=128, d_kv=16, num_heads=4,
             num_layers=2, num_decoder_layers=2)


def tiny(cfg: dict) -> dict:
    """The same family and settings at a size a CPU trains in a second."""
    return {**cfg, **{k: v for k, v in _TINY.items() if k in cfg}}


def list_rows(selected: list[dict]) -> int:
    """Each row, its config built on the meta device (its size) and its setup validated: what can be checked
    of the matrix without a GPU."""
    import torch

    from vramtop_agent.estimator.setup import validate

    sizes = {}
    print(f"{'#':>2} {'config':<14}{'params':>8} {'method':<7}{'seq':>6} {'ckpt':<5}setting")
    for i, row in enumerate(selected):
        if row["config"] not in sizes:
            hf, auto = _hf(CONFIGS[row["config"]])
            with torch.device("meta"):
                model = auto.from_config(hf, dtype=torch.bfloat16)
            sizes[row["config"]] = sum(p.numel() for p in model.parameters())
        validate(setup_for(row, None))
        print(f"{i:>2} {row['config']:<14}{sizes[row['config']] / 1e9:7.2f}B {row['method']:<7}{row['seq']:>6} "
              f"{'on' if row['ckpt'] else 'off':<5}{label(row)}")
    print(f"{len(selected)} rows")
    return 0


def smoke(selected: list[dict]) -> int:
    """Every row's real training step and its estimate on the CPU, tiny: the code the GPU session will run,
    minus the CUDA counters."""
    from vramtop_agent.estimator.execute import execute

    done = set()
    for row in selected:
        key = json.dumps({k: v for k, v in row.items() if k not in ("seq",)}, sort_keys=True)
        if key in done:
            continue
        done.add(key)
        small = dict(row, seq=32, target=16 if row.get("target") else None, batch=2)
        cfg = tiny(CONFIGS[row["config"]])
        model, step = training(small, cfg, "cpu")
        step()
        step()
        est = execute(cfg, setup_for(small, None, device="cpu"))
        grads = sum(1 for p in model.parameters() if p.grad is not None)
        print(f"ok {row['config']:<14}{row['method']:<7}{label(row):<28} estimate "
              f"{est.peak_allocated / 2**20:7.2f} MiB, host {est.host / 2**20:6.2f} MiB, grads left {grads}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--list", action="store_true", help="print the rows (configs built on the meta device); no GPU")
    ap.add_argument("--smoke", action="store_true", help="run every row's code on the CPU with tiny configs; no GPU")
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0
    if args.list:
        return list_rows(rows(args.quick))
    if args.smoke:
        return smoke(rows(args.quick))
    import torch

    if not torch.cuda.is_available():
        print("SKIP no CUDA device: the estimator's GPU comparison did not run")
        return 2
    results, failed, start = [], False, time.time()
    print(f"{'config':<14}{'method':<7}{'seq':>6} {'ckpt':<5}" + "".join(f"{k:>26}" for k in TARGETS) + "  setting")
    for row in rows(args.quick):
        left = args.budget_s - (time.time() - start)
        if left < 30:
            print(f"STOP budget spent; {len(results)} rows measured")
            break
        try:
            proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(row)], capture_output=True,
                                  text=True, timeout=left)
            if proc.returncode != 0:   # the row's own error, not a JSON error about its missing output
                raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except Exception as exc:
            print(f"ERROR {row}: {exc}")
            failed = True
            continue
        results.append(res)
        cells = []
        for key, tol in TARGETS.items():
            m, e = res["measured"][key], res["estimated"][key]
            if m is None:
                cells.append(f"{'n/a (NVML)':>26}")
                continue
            err = (e - m) / m
            failed |= abs(err) > tol
            cells.append(f"{m / 2**30:8.2f} vs {e / 2**30:6.2f} GiB {err:+6.1%}")
        print(f"{row['config']:<14}{row['method']:<7}{row['seq']:>6} {'on' if row['ckpt'] else 'off':<5}"
              + "".join(f"{c:>26}" for c in cells) + f"  {label(row)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("FAIL a row is outside its target" if failed else f"PASS {len(results)} rows within targets")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
