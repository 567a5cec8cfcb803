"""Parameters, gradients and optimizer states: exact bytes, tensor by tensor.

These three blocks are not estimates in the statistical sense: given the
architecture and the setup they are determined to the byte, and the tests
check them byte for byte against a live run. They are computed per tensor
because several terms are per tensor, not per parameter: AdamW's `step`
counter, bitsandbytes' block constants, the 8-bit optimizer falling back to
32-bit states for small tensors, Adafactor's factored row/column statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramtop_agent.estimator.model_desc import ModelDesc
from vramtop_agent.estimator.setup import DEFAULT_LORA_TARGETS, Setup, SetupError
from vramtop_agent.estimator.units import DTYPE_BYTES

# bitsandbytes 4-bit (QLoRA paper, Dettmers et al. 2023, sec. 3): 4 bits per
# weight plus one absmax constant per 64-weight block; double quantization
# stores those constants as 8-bit values with one fp32 constant per 256 of
# them: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.
NF4_BLOCK = 64
DQ_BLOCK = 256
NF4_CODE_BYTES = 16 * 4          # QuantState.code: the 16 NF4/FP4 levels, fp32, one copy per weight
DQ_CODE_BYTES = 256 * 4          # state2.code: the 8-bit dynamic map, fp32, one copy per weight
DQ_OFFSET_BYTES = 4              # QuantState.offset: fp32 scalar (mean removed before 8-bit quantization)

# bitsandbytes 8-bit optimizers (Dettmers et al. 2022, "8-bit Optimizers via
# Block-wise Quantization"): uint8 states with one fp32 absmax per 256 values;
# tensors under 4096 elements keep 32-bit states (min_8bit_size).
OPT8_BLOCK = 256
OPT8_MIN_SIZE = 4096
OPT8_QMAP_BYTES = 2 * 256 * 4    # qmap1 + qmap2, shared by every tensor of the optimizer


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple
    dtype: str          # fp32 / bf16 / fp16 / int8 / nf4 / fp4
    trainable: bool
    role: str           # embedding, linear, bias, norm, lm_head, lora, position

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def resolve_targets(model: ModelDesc, setup: Setup) -> tuple[str, ...]:
    """LoRA target module names present in this model's layers."""
    names = model.linear_names()
    if setup.method == "full":
        return ()
    wanted = setup.targets
    if wanted is None:
        wanted = tuple(names) if setup.method == "qlora" else DEFAULT_LORA_TARGETS
    if any(w in ("all-linear", "all_linear", "all") for w in wanted):
        return tuple(names)
    if model.arch == "gpt2" and wanted == DEFAULT_LORA_TARGETS:
        wanted = ("c_attn",)  # PEFT's default for GPT-2
    hit = tuple(n for n in names if n in wanted)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise SetupError(f"LoRA target {unknown[0]!r} is not a linear layer of this model "
                         f"(its layers have {', '.join(dict.fromkeys(names))})")
    return tuple(dict.fromkeys(hit))


def inventory(model: ModelDesc, setup: Setup) -> list[ParamTensor]:
    """Every parameter tensor of the (PEFT-wrapped) model, deduplicated (tied weights once)."""
    full = setup.method == "full"
    wdt = setup.wdtype
    odt = setup.odtype
    lin_dt = wdt
    out: list[ParamTensor] = []
    h, v = model.hidden_size, model.vocab_size
    emb_name = "wte" if model.arch == "gpt2" else "embed_tokens"
    out.append(ParamTensor(emb_name, (v, h), odt, full, "embedding"))
    if model.arch == "gpt2":
        out.append(ParamTensor("wpe", (model.max_positions, h), odt, full, "position"))
    targets = set(resolve_targets(model, setup))
    norm_names = ("ln_1", "ln_2") if model.arch == "gpt2" else ("input_layernorm", "post_attention_layernorm")
    for layer in range(model.num_layers):
        for lin in model.layer_linears():
            leaf = lin.name.split(".")[-1]
            # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in).
            shape = (lin.fan_in, lin.fan_out) if model.arch == "gpt2" else (lin.fan_out, lin.fan_in)
            base = f"layers.{layer}.{lin.name}"
            out.append(ParamTensor(base, shape, lin_dt, full, "linear"))
            if lin.bias:
                out.append(ParamTensor(base + ".bias", (lin.fan_out,), odt if setup.quantized else wdt, full, "bias"))
            if leaf in targets:
                r = setup.lora_rank
                out.append(ParamTensor(base + ".lora_A", (r, lin.fan_in), setup.lora_dtype, True, "lora"))
                out.append(ParamTensor(base + ".lora_B", (lin.fan_out, r), setup.lora_dtype, True, "lora"))
        for nn in norm_names:
            out.append(ParamTensor(f"layers.{layer}.{nn}", (h,), odt, full, "norm"))
            if model.arch == "gpt2":
                out.append(ParamTensor(f"layers.{layer}.{nn}.bias", (h,), odt, full, "norm"))
    out.append(ParamTensor("norm" if model.arch != "gpt2" else "ln_f", (h,), odt, full, "norm"))
    if model.arch == "gpt2":
        out.append(ParamTensor("ln_f.bias", (h,), odt, full, "norm"))
    if not model.tie_word_embeddings:
        out.append(ParamTensor("lm_head", (v, h), odt, full, "lm_head"))
    return out


def tensor_bytes(p: ParamTensor, setup: Setup) -> int:
    """Storage bytes of one parameter, quantization constants included."""
    n = p.numel
    if p.dtype in ("nf4", "fp4"):
        packed = (n + 1) // 2
        blocks = -(-n // NF4_BLOCK)
        if setup.double_quant:
            return packed + blocks + NF4_CODE_BYTES + DQ_OFFSET_BYTES + 4 * -(-blocks // DQ_BLOCK) + DQ_CODE_BYTES
        return packed + 4 * blocks + NF4_CODE_BYTES
    if p.dtype == "int8":
        # LLM.int8(): int8 weight + one fp32 scale per output row (SCB).
        return n + 4 * p.shape[0]
    return n * DTYPE_BYTES[p.dtype]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class WeightBytes:
    params_trainable: int = 0
    params_frozen: int = 0
    params_quantized: int = 0      # included in frozen
    quant_constants: int = 0       # included in quantized
    params_by_dtype: dict = field(default_factory=dict)
    gradients: int = 0
    optimizer_states: int = 0
    optimizer_steps: int = 0       # AdamW/Adafactor 0-dim `step` tensors (host memory on CUDA)
    master_weights: int = 0
    optimizer_transient: int = 0   # temporaries inside optimizer.step()
    trainable_numel: int = 0
    total_numel: int = 0
    largest_trainable: int = 0     # bytes of the largest trainable tensor (per-tensor temporaries)
    paged: bool = False

    @property
    def parameters(self) -> int:
        return self.params_trainable + self.params_frozen

    @property
    def optimizer(self) -> int:
        return self.optimizer_states + self.optimizer_steps + self.master_weights


def weight_bytes(model: ModelDesc, setup: Setup) -> WeightBytes:
    inv = inventory(model, setup)
    wb = WeightBytes()
    on_device_steps = not setup.device.startswith("cuda")  # torch keeps `step` on the host unless capturable/fused
    opt = setup.optimizer
    used_8bit = False
    for p in inv:
        nbytes = tensor_bytes(p, setup)
        wb.params_by_dtype[p.dtype] = wb.params_by_dtype.get(p.dtype, 0) + nbytes
        n = p.numel
        wb.total_numel += n
        if not p.trainable:
            wb.params_frozen += nbytes
            if p.dtype in ("nf4", "fp4", "int8"):
                wb.params_quantized += nbytes
                wb.quant_constants += nbytes - (n + 1) // 2 if p.dtype != "int8" else nbytes - n
            continue
        wb.params_trainable += nbytes
        wb.trainable_numel += n
        wb.gradients += nbytes
        wb.largest_trainable = max(wb.largest_trainable, nbytes)
        state_dt = 4 if setup.masters else DTYPE_BYTES[p.dtype]
        if setup.masters:
            wb.master_weights += 4 * n
        if opt == "adamw":
            wb.optimizer_states += 2 * n * state_dt
            wb.optimizer_steps += 4 if on_device_steps else 0
        elif opt == "paged-adamw":
            wb.optimizer_states += 2 * n * 4  # bitsandbytes' 32-bit states are fp32 whatever the weights
        elif opt in ("adamw-8bit", "paged-adamw-8bit"):
            if n >= OPT8_MIN_SIZE:
                used_8bit = True
                wb.optimizer_states += 2 * n + 2 * 4 * _ceil_div(n, OPT8_BLOCK)
            else:
                wb.optimizer_states += 2 * 4 * n
        elif opt == "sgd-momentum":
            wb.optimizer_states += n * state_dt
        elif opt == "adafactor":
            # torch.optim.Adafactor: factored second moment for >= 2-D tensors
            # (Shazeer & Stern 2018): one row and one column vector; full for 1-D.
            if len(p.shape) >= 2:
                rows, cols = p.shape[-2], p.shape[-1]
                wb.optimizer_states += (n // cols + n // rows) * state_dt
            else:
                wb.optimizer_states += n * state_dt
            wb.optimizer_steps += 4 if on_device_steps else 0
    if used_8bit:
        wb.optimizer_states += OPT8_QMAP_BYTES
    wb.paged = opt.startswith("paged")
    _shard(wb, setup)
    wb.optimizer_transient = _optimizer_transient(wb, setup)
    return wb


def _shard(wb: WeightBytes, setup: Setup) -> None:
    """ZeRO (Rajbhandari et al. 2020): stage 1 shards optimizer states, 2 adds
    gradients, 3 adds parameters (FSDP FULL_SHARD behaves like stage 3)."""
    n = setup.world_size
    if n <= 1 or setup.zero == 0:
        return
    wb.optimizer_states = _ceil_div(wb.optimizer_states, n)
    wb.master_weights = _ceil_div(wb.master_weights, n)
    if setup.zero >= 2:
        wb.gradients = _ceil_div(wb.gradients, n)
    if setup.zero >= 3:
        wb.params_trainable = _ceil_div(wb.params_trainable, n)
        wb.params_frozen = _ceil_div(wb.params_frozen, n)
        wb.params_quantized = _ceil_div(wb.params_quantized, n)
        wb.params_by_dtype = {k: _ceil_div(v, n) for k, v in wb.params_by_dtype.items()}


def _optimizer_transient(wb: WeightBytes, setup: Setup) -> int:
    """Temporaries of optimizer.step() on top of params + grads + states.

    torch's AdamW: the single-tensor path (CPU default) builds
    `exp_avg_sq.sqrt() / bias_correction2_sqrt` for one tensor at a time (two
    temporaries of the largest tensor); the foreach path (CUDA default) does
    `_foreach_sqrt` over every tensor at once (one copy of all states' size).
    bitsandbytes optimizers update in place in one kernel.
    """
    opt = setup.optimizer
    foreach = setup.foreach if setup.foreach is not None else setup.device.startswith("cuda")
    if opt == "adamw":
        if foreach:
            return wb.trainable_numel * (4 if setup.masters else wb.gradients // max(wb.trainable_numel, 1))
        return 2 * wb.largest_trainable
    if opt == "adafactor":
        return 2 * wb.largest_trainable
    return 0
