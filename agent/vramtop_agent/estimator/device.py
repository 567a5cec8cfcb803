"""What nvidia-smi shows beyond torch's reserved memory: CUDA context and library workspaces, per card.

Typical figures (torch 2.x, CUDA 12, CUDA_MODULE_LOADING=LAZY): the context with the kernels a
training step loads takes 0.3-0.6 GiB and grows with the architecture's kernel images; cuBLAS and
cuBLASLt each keep a workspace per handle (torch: 4 MiB before Hopper, 32 MiB on Hopper and later);
NCCL adds its channel buffers when more than one rank runs. These are published/observed typical
values, not fitted here: bench/gpu_estimator.py measures them (NVML process memory minus
max_memory_reserved) on the GPU machine; `--cuda-context` overrides the context.
"""

from __future__ import annotations

MIB = 2**20
# card -> (CUDA context MiB, cuBLAS + cuBLASLt workspaces MiB)
_CARDS = {
    "hopper": (530, 64), "ampere-dc": (430, 8), "ampere": (360, 8), "ada": (380, 8), "turing": (310, 8),
    "volta": (300, 8),
}
_FAMILY = {
    "h100": "hopper", "h100-80g": "hopper", "h200": "hopper", "gh200": "hopper", "h20": "hopper",
    "a100-40g": "ampere-dc", "a100-80g": "ampere-dc", "a10g": "ampere", "a10": "ampere", "a6000": "ampere",
    "rtx3060": "ampere", "rtx3090": "ampere", "rtx4090": "ada", "l4": "ada", "l40s": "ada", "rtx6000-ada": "ada",
    "t4": "turing", "v100-16g": "volta", "v100-32g": "volta",
}
DEFAULT = (500, 8)
NCCL_MIB = 300   # per rank with NCCL's default channels (only when world size > 1)


def card_family(card: str | None) -> str | None:
    return _FAMILY.get(str(card).lower()) if card else None


def device_overhead(setup, card: str | None = None) -> dict:
    """{'cuda_context': bytes, 'workspaces': bytes} for `setup` on `card` (a name from units.GPUS_MIB or None)."""
    if not setup.device.startswith("cuda"):
        return {"cuda_context": 0, "workspaces": 0}
    ctx, ws = _CARDS.get(card_family(card or getattr(setup, "gpu", None)) or "", DEFAULT)
    context = setup.cuda_context if setup.cuda_context is not None else ctx * MIB
    nccl = NCCL_MIB * MIB if setup.world_size > 1 else 0
    return {"cuda_context": int(context), "workspaces": ws * MIB + nccl}
