"""Put the pieces together: blocks, phase peaks, the peak, and a term for each number."""

from __future__ import annotations

from dataclasses import dataclass, field

from vramtop_agent.estimator.activations import TAG_EXPLAIN, trace
from vramtop_agent.estimator.device import device_overhead
from vramtop_agent.estimator.model_desc import ModelDesc
from vramtop_agent.estimator.setup import Setup, SetupError, execution_only, validate
from vramtop_agent.estimator.units import DTYPE_BYTES
from vramtop_agent.estimator.weights import weight_bytes
from vramtop_agent.vocabulary import BLOCK_KEYS, PHASES

BLOCKS = BLOCK_KEYS  # the estimate predicts the wire's blocks


@dataclass
class Estimate:
    blocks: dict                 # BLOCKS -> bytes at the end of forward (gradients: when complete)
    peak: int                    # max phase peak + CUDA context + allocator overhead: what the card must hold
    phase_peaks: dict            # PHASES -> bytes allocated by PyTorch (torch.cuda.max_memory_allocated's view)
    terms: list                  # (name, bytes, one-line explanation)
    setup: Setup
    model: ModelDesc
    end_of_forward: int = 0      # bytes allocated when backward starts
    params_split: dict = field(default_factory=dict)
    params_by_dtype: dict = field(default_factory=dict)
    other_parts: dict = field(default_factory=dict)
    activations_by_term: dict = field(default_factory=dict)
    engine: str = "formula"      # "formula" (hand-written graph) or "execute" (the real model on the meta device)
    peak_reserved: int = 0       # torch.cuda.max_memory_reserved's view: allocated + caching-allocator slack
    device_parts: dict = field(default_factory=dict)  # reserved, cuda_context, workspaces, paged_optimizer
    assumptions: list = field(default_factory=list)
    host_parts: dict = field(default_factory=dict)  # bytes moved to host RAM by --offload (not on the device)

    @property
    def host(self) -> int:
        """Host RAM the offloaded parts need (0 without --offload)."""
        return sum(self.host_parts.values())

    @property
    def device(self) -> int:
        """What nvidia-smi shows for the process: reserved + context + workspaces (+ paged states)."""
        return self.peak

    @property
    def peak_allocated(self) -> int:
        return max(self.phase_peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=lambda p: self.phase_peaks[p])

    def fits(self, card_bytes: int) -> bool:
        return self.peak <= card_bytes

    def to_dict(self) -> dict:
        """Plain ints/strings only: goes into msgpack (the agent's hello) and `--json`."""
        return {
            "blocks": {k: int(self.blocks[k]) for k in BLOCKS},
            "peak": int(self.peak),
            "peak_allocated": int(self.peak_allocated),
            "peak_reserved": int(self.peak_reserved),
            "device": int(self.device),
            "device_parts": {k: int(v) for k, v in self.device_parts.items()},
            "engine": self.engine,
            "assumptions": list(self.assumptions),
            "host": int(self.host),
            "host_parts": {k: int(v) for k, v in self.host_parts.items()},
            "peak_phase": self.peak_phase,
            "phase_peaks": {k: int(self.phase_peaks[k]) for k in PHASES},
            "end_of_forward": int(self.end_of_forward),
            "params_split": {k: int(v) for k, v in self.params_split.items()},
            "params_by_dtype": {k: int(v) for k, v in self.params_by_dtype.items()},
            "other_parts": {k: int(v) for k, v in self.other_parts.items()},
            "activations_by_term": {k: int(v) for k, v in self.activations_by_term.items()},
            "terms": [[name, int(nbytes), why] for name, nbytes, why in self.terms],
            "setup": _plain(self.setup.to_dict()),
            "model": _plain(self.model.to_dict()),
        }


def _plain(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _buffers(model: ModelDesc, setup: Setup) -> int:
    """Non-parameter module state: Llama's rotary inv_freq and original_inv_freq."""
    if model.arch == "gpt2":
        return 0
    return 2 * (model.head_dim // 2) * DTYPE_BYTES[setup.odtype]


def estimate(model: ModelDesc, setup: Setup) -> Estimate:
    """Predict the memory of one training step of `model` under `setup`.

    Raises SetupError (a ValueError) for a setup that cannot run."""
    setup = validate(setup)
    only = execution_only(setup)
    if only:
        raise SetupError(f"{' '.join(only)}: modelled by executing the model (--engine execute, with torch, "
                         f"transformers and peft installed), not by the formula")
    wb = weight_bytes(model, setup)
    tr = trace(model, setup)

    b, s = setup.batch, setup.seq_len
    ids_bytes = labels_bytes = b * s * 8
    ids_saved = ids_bytes if setup.method == "full" else 0     # the embedding keeps the ids only when it trains
    inputs = ids_bytes + labels_bytes
    buffers = _buffers(model, setup)
    accum_grads = wb.gradients if setup.grad_accum > 1 else 0  # .grad survives between micro-batches
    # DDP without ZeRO copies gradients into flat communication buckets of the same size.
    ddp_buckets = wb.gradients if (setup.world_size > 1 and setup.zero == 0) else 0

    static = wb.parameters + buffers + inputs + accum_grads + ddp_buckets + wb.optimizer
    acts = tr.saved_eof
    # Graph level at the end of forward = saved tensors (minus the ids, which are an input)
    # + what the caller holds (logits, loss) + layer kwargs kept by checkpoint frames.
    held_other = tr.eof_level - (acts - ids_saved)
    eof = static + tr.eof_level
    # Paged optimizer states live in CUDA managed memory: on the card (nvidia-smi) but outside torch's allocator.
    paged = wb.optimizer if wb.paged else 0
    phase_peaks = {
        "forward": static - paged + tr.forward_peak,
        "backward": static - paged + tr.backward_peak,
        # After backward: parameter gradients and the held outputs remain; the optimizer adds its temporaries.
        "optimizer": static - paged + tr.graph.level + wb.optimizer_transient,
    }
    grads_block = wb.gradients
    peak_alloc = max(phase_peaks.values())
    overhead = int(peak_alloc * setup.allocator_overhead)
    reserved = peak_alloc + overhead
    if setup.device.startswith("cuda") and not setup.allocator_overhead:
        reserved = _reserved_lower_bound(peak_alloc)
    dev = device_overhead(setup)
    context = dev["cuda_context"]
    other_parts = {
        "buffers": buffers,
        "inputs": inputs - ids_saved,
        "held_outputs": held_other,
        "ddp_buckets": ddp_buckets,
        "cuda_context": context,
        "allocator_overhead": overhead,
    }
    blocks = {
        "parameters": wb.parameters,
        "gradients": grads_block,
        # Paged states count: they sit on the device until memory pressure evicts them.
        "optimizer": wb.optimizer,
        "activations": acts,
        "other": sum(other_parts.values()),
    }
    terms = _terms(model, setup, wb, tr, other_parts, phase_peaks, eof)
    return Estimate(
        blocks=blocks,
        peak=reserved + context + dev["workspaces"] + paged,
        phase_peaks=phase_peaks,
        terms=terms,
        setup=setup,
        model=model,
        end_of_forward=eof,
        params_split={"trainable": wb.params_trainable, "frozen": wb.params_frozen, "quantized": wb.params_quantized},
        params_by_dtype=dict(wb.params_by_dtype),
        other_parts=other_parts,
        activations_by_term=dict(sorted(tr.saved_by_tag.items(), key=lambda kv: -kv[1])),
        peak_reserved=reserved,
        device_parts={"reserved": reserved, **dev, "paged_optimizer": paged},
    )


def _reserved_lower_bound(peak_alloc: int) -> int:
    """Without the allocation sequence (formula path): the peak rounded up to whole 2 MiB segments plus the
    20 MiB segment the mid-size requests open. The execution path replays the sequence instead."""
    seg = 2 << 20
    return -(-peak_alloc // seg) * seg + (20 << 20 if peak_alloc > (20 << 20) else 0)


def _terms(model, setup, wb, tr, other_parts, phase_peaks, eof) -> list:
    t = []
    n_total = wb.total_numel
    t.append(("parameters: trainable", wb.params_trainable,
              f"{wb.trainable_numel:,} trainable weights ({setup.method}; "
              f"{'LoRA rank ' + str(setup.lora_rank) if setup.method != 'full' else setup.wdtype})"))
    t.append(("parameters: frozen", wb.params_frozen,
              f"{n_total - wb.trainable_numel:,} frozen weights" + (
                  f"; {setup.wdtype}{' + double quant' if setup.double_quant and setup.wdtype != 'int8' else ''}"
                  f" linear layers, embeddings/norms/lm_head in {setup.odtype}" if setup.quantized else "")))
    for dt, nbytes in sorted(wb.params_by_dtype.items(), key=lambda kv: -kv[1]):
        t.append((f"parameters: {dt}", nbytes, f"all parameters stored as {dt}"
                  + (" (packed pairs + block constants)" if dt in ("nf4", "fp4") else "")))
    if wb.quant_constants:
        t.append(("parameters: quantization constants", wb.quant_constants,
                  "per 64-weight absmax (8-bit with double quant) + per-tensor code books: "
                  "4.127 bits per weight in total (QLoRA paper, sec. 3)"))
    t.append(("gradients", wb.gradients,
              "one gradient per trainable weight, in the weight's dtype"
              + (f"; ZeRO-{setup.zero} shards it over {setup.world_size} ranks" if setup.zero >= 2 else "")))
    opt_line = {
        "adamw": "AdamW: exp_avg + exp_avg_sq per trainable weight",
        "paged-adamw": "paged AdamW: 32-bit states in CUDA managed memory (outside torch's allocator; may page out)",
        "adamw-8bit": ("8-bit AdamW (bitsandbytes): 2 bytes per weight + an fp32 absmax per 256; "
                       "tensors < 4096 stay 32-bit"),
        "paged-adamw-8bit": "paged 8-bit AdamW: 2 bytes per weight in managed memory (may page out to the host)",
        "sgd": "SGD without momentum keeps no state",
        "sgd-momentum": "SGD momentum buffer: one per trainable weight",
        "adafactor": "Adafactor: factored second moment (a row and a column vector per matrix)",
        "none": "no optimizer known to the estimator: its states are not predicted",
    }[setup.optimizer]
    t.append(("optimizer states", wb.optimizer_states,
              opt_line + (" in fp32 (mixed precision)" if setup.masters else "")))
    if wb.master_weights:
        t.append(("optimizer: fp32 master weights", wb.master_weights,
                  "mixed precision keeps an fp32 copy of every 16-bit trainable weight (ZeRO paper: 16 bytes/param "
                  "with Adam; a max over stages misses it)"))
    if wb.optimizer_steps:
        t.append(("optimizer: step counters", wb.optimizer_steps, "a 0-d fp32 `step` tensor per trainable tensor"))
    for tag, nbytes in sorted(tr.saved_by_tag.items(), key=lambda kv: -kv[1]):
        t.append((f"activations: {tag}", nbytes, TAG_EXPLAIN.get(tag, tag)))
    t.append(("other: outputs held", other_parts["held_outputs"],
              "the logits the model returns (b·s·V) and the loss, alive until the step ends"))
    t.append(("other: inputs and buffers", other_parts["inputs"] + other_parts["buffers"],
              "input_ids and labels (int64) and rotary buffers"))
    if other_parts["ddp_buckets"]:
        t.append(("other: DDP gradient buckets", other_parts["ddp_buckets"],
                  "DDP copies gradients into flat all-reduce buckets (gradient_as_bucket_view=False)"))
    if other_parts["cuda_context"]:
        t.append(("other: CUDA context", other_parts["cuda_context"],
                  "driver context, cuBLAS/cuDNN workspaces: ~0.3-0.7 GB (CUDA_MODULE_LOADING=LAZY keeps it low)"))
    if other_parts["allocator_overhead"]:
        t.append(("other: allocator overhead", other_parts["allocator_overhead"],
                  "reserved but unallocated memory (fragmentation, 2 MiB segment rounding)"))
    spike = phase_peaks["backward"] - eof
    t.append(("peak: backward above end of forward", max(spike, 0),
              "loss spike: fp32 log-softmax gradient and logits gradient (~12 bytes x b·s·V), then "
              "gradients growing while activations free"
              + ("; one layer recomputed at a time (checkpointing)" if setup.grad_ckpt else "")))
    t.append(("peak: optimizer temporaries", wb.optimizer_transient,
              "torch AdamW builds sqrt(exp_avg_sq) for all tensors at once (foreach, CUDA) or per tensor (CPU)"))
    return t
