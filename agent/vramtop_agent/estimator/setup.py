"""The training setup: everything besides the architecture that moves memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from vramtop_agent.estimator.units import FLOAT_DTYPES, QUANT_DTYPES, WEIGHT_DTYPES, norm_dtype

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "sgd-momentum", "adafactor", "none")
# "none": no optimizer seen (yet), or one the estimator does not know: its states are not predicted.
ATTENTION = ("eager", "sdpa", "flash")
LOSSES = ("full", "chunked")
OFFLOADS = ("activations", "optimizer")
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")  # PEFT's default for Llama-style models

_OPT_ALIASES = {
    "adam": "adamw", "adamw_torch": "adamw", "adamw-torch": "adamw", "adamw_8bit": "adamw-8bit",
    "adamw8bit": "adamw-8bit", "adam8bit": "adamw-8bit", "bnb-adamw-8bit": "adamw-8bit",
    "paged_adamw_8bit": "paged-adamw-8bit", "pagedadamw8bit": "paged-adamw-8bit",
    "paged_adamw": "paged-adamw", "pagedadamw": "paged-adamw", "paged_adamw_32bit": "paged-adamw",
    "pagedadamw32bit": "paged-adamw", "sgd_momentum": "sgd-momentum",
}


class SetupError(ValueError):
    """A training setup that cannot exist (one line, for the user)."""


@dataclass(frozen=True)
class Setup:
    method: str = "full"
    lora_rank: int = 8
    lora_targets: tuple | None = None      # None: all linear layers for QLoRA, q_proj,v_proj for LoRA
    lora_dropout: float = 0.0
    lora_dtype: str = "fp32"               # PEFT upcasts adapters to fp32 (autocast_adapter_dtype=True)
    weight_dtype: str | None = None        # None: bf16 (full, lora) / nf4 (qlora)
    double_quant: bool = True
    kbit_prep: bool = True                 # peft.prepare_model_for_kbit_training: non-quantized params to fp32
    other_dtype: str | None = None         # dtype of embeddings/norms/lm_head when the base is quantized
    compute_dtype: str | None = None       # activations; None: the weight dtype (bf16 for quantized)
    master_weights: bool | None = None     # fp32 copy of trainable 16-bit weights in the optimizer
    optimizer: str = "adamw"
    batch: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    grad_ckpt: bool = False
    attn: str = "sdpa"
    logits_dtype: str = "fp32"             # HF's loss upcasts logits to fp32
    input_grads: bool | None = None        # enable_input_require_grads(); None: on for QLoRA with checkpointing
    world_size: int = 1
    zero: int = 0                          # ZeRO stage; FSDP full sharding is stage 3
    device: str = "cuda"
    cuda_context: int | None = None        # bytes; None: 500 MiB on CUDA, 0 on CPU
    allocator_overhead: float = 0.0        # fraction of the peak lost to fragmentation
    foreach: bool | None = None            # optimizer's multi-tensor path; None: torch's default for the device
    modules_to_save: tuple | None = None   # PEFT modules_to_save: trained in full beside the adapters
    gpu: str | None = None                 # card name (units.GPUS_MIB): picks its CUDA context / workspace figures
    # Settings the execution engine runs as they are (the formula path refuses them):
    loss: str = "full"                     # "chunked": logits + loss in chunks of loss_chunk tokens (see docs)
    loss_chunk: int = 1024                 # tokens of the flattened batch (b·s) per loss chunk
    optim_in_backward: bool = False        # per-parameter optimizers stepped from post-accumulate-grad hooks
    offload: tuple | None = None           # ("activations", "optimizer"): moved to host RAM
    # Encoder-decoder models (T5, BART): the decoder's length (labels); seq_len is the encoder's.
    target_len: int | None = None          # None: 128 (seq2seq.DEFAULT_TARGET_LEN); refused for decoder-only models
    compile: bool = False                  # torch.compile (inductor): its partitioner decides what is saved

    # ------------------------------------------------------------- resolved values

    @property
    def wdtype(self) -> str:
        if self.weight_dtype:
            return norm_dtype(self.weight_dtype)
        return "nf4" if self.method == "qlora" else "bf16"

    @property
    def quantized(self) -> bool:
        return self.wdtype in QUANT_DTYPES

    @property
    def cdtype(self) -> str:
        if self.compute_dtype:
            return norm_dtype(self.compute_dtype)
        return "bf16" if self.quantized else self.wdtype

    @property
    def odtype(self) -> str:
        """Embeddings, norms and lm_head: never quantized."""
        if self.other_dtype:
            return norm_dtype(self.other_dtype)
        if not self.quantized:
            return self.wdtype
        return "fp32" if self.kbit_prep else self.cdtype

    @property
    def masters(self) -> bool:
        if self.master_weights is not None:
            return self.master_weights
        return self.method == "full" and self.wdtype in ("bf16", "fp16")

    @property
    def targets(self) -> tuple | None:
        if self.method == "full":
            return None
        return tuple(self.lora_targets) if self.lora_targets else None  # None: resolved against the model

    @property
    def context_bytes(self) -> int:
        if self.cuda_context is not None:
            return int(self.cuda_context)
        return 500 * 2**20 if self.device.startswith("cuda") else 0

    def with_(self, **changes) -> Setup:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        d["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save else None
        d["offload"] = list(self.offload) if self.offload else None
        d.update(weight_dtype=self.wdtype, compute_dtype=self.cdtype, master_weights=self.masters)
        return d


def normalize_optimizer(name: str) -> str:
    key = str(name).strip().lower()
    key = _OPT_ALIASES.get(key, key)
    key = _OPT_ALIASES.get(key.replace("-", "_"), key)
    return key


def validate(setup: Setup) -> Setup:
    """Normalize names and refuse setups that cannot run, with one clear line."""
    opt = normalize_optimizer(setup.optimizer)
    setup = replace(setup, optimizer=opt)
    if setup.method not in METHODS:
        raise SetupError(f"unknown method {setup.method!r}: use one of {', '.join(METHODS)}")
    if opt not in OPTIMIZERS:
        raise SetupError(f"unknown optimizer {setup.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if setup.attn not in ATTENTION:
        raise SetupError(f"unknown attention {setup.attn!r}: use one of {', '.join(ATTENTION)}")
    if setup.wdtype not in WEIGHT_DTYPES:
        raise SetupError(f"unknown weight dtype {setup.weight_dtype!r}: use one of {', '.join(WEIGHT_DTYPES)}")
    if setup.cdtype not in FLOAT_DTYPES or setup.odtype not in FLOAT_DTYPES:
        raise SetupError("compute dtype must be one of fp32, bf16, fp16")
    if setup.quantized and setup.method == "full":
        raise SetupError(f"full fine-tuning cannot train {setup.wdtype} weights: use --method qlora (or lora)")
    if setup.method == "qlora" and setup.wdtype not in ("nf4", "fp4", "int8"):
        raise SetupError(f"QLoRA needs a quantized base (nf4, fp4 or int8), not {setup.wdtype}")
    for key in ("batch", "seq_len", "grad_accum", "world_size"):
        if int(getattr(setup, key)) < 1:
            raise SetupError(f"{key.replace('_', ' ')} must be at least 1")
    if setup.method != "full" and setup.lora_rank < 1:
        raise SetupError("LoRA rank must be at least 1")
    if not 0.0 <= setup.lora_dropout < 1.0:
        raise SetupError("LoRA dropout must be in [0, 1)")
    if setup.zero not in (0, 1, 2, 3):
        raise SetupError("ZeRO stage must be 0, 1, 2 or 3")
    return _validate_execution_only(setup)


def _validate_execution_only(setup: Setup) -> Setup:
    if setup.loss not in LOSSES:
        raise SetupError(f"unknown loss {setup.loss!r}: use one of {', '.join(LOSSES)}")
    if setup.target_len is not None and int(setup.target_len) < 1:
        raise SetupError("target len must be at least 1")
    if setup.loss_chunk < 1:
        raise SetupError("the loss chunk must be at least 1 token")
    offload = tuple(dict.fromkeys(setup.offload or ()))
    for what in offload:
        if what not in OFFLOADS:
            raise SetupError(f"unknown offload {what!r}: use activations and/or optimizer")
    setup = replace(setup, offload=offload or None)
    if setup.optim_in_backward and setup.grad_accum > 1:
        raise SetupError("optimizer-in-backward steps once per backward: it cannot accumulate gradients")
    if "optimizer" in offload:
        if setup.optimizer not in ("adamw", "sgd", "sgd-momentum", "adafactor"):
            raise SetupError(f"--offload optimizer models a host (CPU) step of a torch optimizer, "
                             f"not {setup.optimizer}")
        if setup.optim_in_backward:
            raise SetupError("--offload optimizer and --optim-in-backward: choose one")
    if setup.compile and setup.loss == "chunked":
        # The chunked loss runs the decoder stack and the output layer as separate calls, outside the compiled
        # model's forward: what torch.compile would make of that loop is not modelled.
        raise SetupError("--compile with --loss chunked is not modelled (the chunked loss runs outside the "
                         "compiled forward): drop one of them")
    return setup


def execution_only(setup: Setup) -> list[str]:
    """The settings only the execution engine models (their flags), for the formula path's refusal."""
    out = []
    if setup.loss != "full":
        out.append(f"--loss {setup.loss}")
    if setup.optim_in_backward:
        out.append("--optim-in-backward")
    if setup.offload:
        out.append("--offload " + ",".join(setup.offload))
    if setup.compile:
        out.append("--compile")
    return out
