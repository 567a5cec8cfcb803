"""Dtype sizes, byte formatting and parsing, and the memory of known cards."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vramtop_agent.vocabulary import fmt_bytes, parse_bytes  # noqa: F401  (the estimator's public names)

if TYPE_CHECKING:   # annotations only: the formula path stays torch-free
    import torch

# Bytes per element. The 4-bit formats are not listed: their size is computed
# per tensor in `weights.py` (packed pairs plus block constants).
DTYPE_BYTES = {
    "fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2,
    "fp8": 1, "int8": 1, "uint8": 1, "bool": 1, "int32": 4, "int64": 8,
}
FLOAT_DTYPES = ("fp32", "bf16", "fp16")
QUANT_DTYPES = ("int8", "nf4", "fp4")
WEIGHT_DTYPES = FLOAT_DTYPES + QUANT_DTYPES

_ALIASES = {
    "float32": "fp32", "float": "fp32", "32": "fp32", "f32": "fp32",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "16": "fp16", "f16": "fp16",
    "4bit": "nf4", "int4": "nf4", "8bit": "int8", "uint8": "uint8", "bool": "bool",
    "int64": "int64", "long": "int64", "int32": "int32",
}


def norm_dtype(name: str | torch.dtype) -> str:
    """'torch.bfloat16', 'bfloat16', 'BF16' -> 'bf16'."""
    n = str(name).lower().replace("torch.", "").strip()
    return _ALIASES.get(n, n)


def dtype_bytes(name: str) -> int:
    n = norm_dtype(name)
    if n not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}")
    return DTYPE_BYTES[n]


# Total memory as nvidia-smi reports it (MiB), i.e. what a process can ever
# see before the CUDA context takes its share.
GPUS_MIB = {
    "t4": 15360, "v100-16g": 16384, "v100-32g": 32768, "rtx3060": 12288, "rtx3090": 24576,
    "rtx4090": 24564, "a10g": 23028, "l4": 23034, "l40s": 46068, "a100-40g": 40960,
    "a100-80g": 81920, "h100": 81559, "h100-80g": 81559, "h200": 143771,
}


def card_bytes(text: str) -> tuple[str, int]:
    """A card name ('rtx4090', 'a100-80g', 'h100') or a size ('24GiB') -> (label, bytes)."""
    if str(text).strip().startswith("-"):
        raise ValueError(f"--gpu {text}: a memory size cannot be negative (try 24GiB or a card name like rtx4090)")
    key = re.sub(r"[\s_]", "-", str(text).lower()).replace("nvidia-", "")
    key = key.replace("geforce-", "").replace("rtx-", "rtx")
    if key in GPUS_MIB:
        return key, GPUS_MIB[key] * 2**20
    try:
        return text, parse_bytes(text)
    except ValueError:
        raise ValueError(
            f"unknown card {text!r}: give a size like 24GiB or one of {', '.join(sorted(GPUS_MIB))}") from None
