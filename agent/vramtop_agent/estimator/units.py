"""Dtype sizes, byte formatting and parsing, and the memory of known cards."""

from __future__ import annotations

import re

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


def norm_dtype(name: str) -> str:
    """'torch.bfloat16', 'bfloat16', 'BF16' -> 'bf16'."""
    n = str(name).lower().replace("torch.", "").strip()
    return _ALIASES.get(n, n)


def dtype_bytes(name: str) -> int:
    n = norm_dtype(name)
    if n not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}")
    return DTYPE_BYTES[n]


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '80g', '1.5e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 24GiB or 80GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


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
        raise ValueError(f"unknown card {text!r}: give a size like 24GiB or one of {', '.join(sorted(GPUS_MIB))}") from None
