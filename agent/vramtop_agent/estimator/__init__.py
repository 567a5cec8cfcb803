"""The memory estimator: what a correct formula expects for a training run, block by block.

Pure Python (no torch at import): the CLI uses it offline from a preset or a
config.json, and the in-process agent uses it on the live model
(`describe_live`) to publish the estimate beside the measurement.

    from vramtop_agent.estimator import estimate, get_preset, Setup
    est = estimate(get_preset("llama-2-7b"), Setup(method="qlora", seq_len=2048, grad_ckpt=True))
    est.blocks, est.peak, est.phase_peaks, est.terms, est.to_dict()
"""

from __future__ import annotations

from vramtop_agent.estimator.estimate import BLOCKS, PHASES, Estimate, estimate
from vramtop_agent.estimator.live import describe_live
from vramtop_agent.estimator.model_desc import ModelDesc, from_hf_config, load_config
from vramtop_agent.estimator.presets import PRESET_NAMES, get_preset
from vramtop_agent.estimator.setup import OPTIMIZERS, Setup, SetupError
from vramtop_agent.estimator.units import card_bytes, fmt_bytes, parse_bytes

__all__ = [
    "BLOCKS", "PHASES", "Estimate", "estimate", "describe_live", "ModelDesc", "from_hf_config",
    "load_config", "PRESET_NAMES", "get_preset", "OPTIMIZERS", "Setup", "SetupError", "card_bytes",
    "fmt_bytes", "parse_bytes",
]
