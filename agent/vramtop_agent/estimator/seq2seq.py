"""Encoder-decoder models (T5, Flan-T5, mT5, BART) in the execution engine.

What differs from a causal LM, and nothing else (execute.py calls in here at a few marked points):

- the model is built with AutoModelForSeq2SeqLM, and PEFT wraps it with task_type SEQ_2_SEQ_LM
  (PEFT's default targets for T5 are q,v; its all-linear takes q,k,v,o,wi/wi_0,wi_1,wo);
- one step's inputs are the encoder's input_ids (b x seq_len) and the decoder's labels
  (b x target_len); the model makes the decoder's inputs by shifting the labels right, as
  transformers' seq2seq training does. target_len defaults to 128 (DEFAULT_TARGET_LEN);
- from_pretrained keeps `_keep_in_fp32_modules` (T5's feed-forward output `wo`) out of 4-bit
  quantization and, when loading in fp16, in fp32: the estimate does the same;
- deep models have two stacks: see `measure`.

Importable without torch: the CLI asks `encoder_decoder()` of a config.json dict before any
engine runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # annotations only: torch is imported when the engine runs
    import torch
    from torch import nn

    from vramtop_agent.estimator.execute import Measured
    from vramtop_agent.estimator.setup import Setup

# transformers' seq2seq examples (run_summarization.py, run_translation.py) cut targets at 128 tokens
# (max_target_length); T5's tokenizer cuts inputs at 512 (model_max_length).
DEFAULT_TARGET_LEN = 128
DEFAULT_SOURCE_LEN = 512

# model_type -> (encoder depth key, decoder depth key) of the families whose layers repeat exactly
# (T5's first layer of each stack also owns the relative-position table; the rest are copies).
_DEPTH_KEYS = {
    "t5": ("num_layers", "num_decoder_layers"),
    "mt5": ("num_layers", "num_decoder_layers"),
    "bart": ("encoder_layers", "decoder_layers"),
}
# Encoder-decoder model_types transformers builds with AutoModelForSeq2SeqLM: for a config.json that
# does not say is_encoder_decoder itself.
_ENCODER_DECODER_TYPES = frozenset({
    "t5", "mt5", "umt5", "longt5", "switch_transformers", "bart", "mbart", "plbart", "pegasus", "pegasus_x",
    "marian", "blenderbot", "blenderbot-small", "m2m_100", "nllb-moe", "fsmt", "led", "bigbird_pegasus", "mvp",
    "prophetnet", "xlm-prophetnet",
})


def encoder_decoder(config: dict) -> bool:
    """A config.json dict of an encoder-decoder model (no torch needed)."""
    if not isinstance(config, dict):
        return False
    flag = config.get("is_encoder_decoder")
    if isinstance(flag, bool):
        return flag
    return str(config.get("model_type") or "").lower() in _ENCODER_DECODER_TYPES


def target_len(setup: Setup) -> int:
    return int(setup.target_len or DEFAULT_TARGET_LEN)


# ------------------------------------------------------------------ hooks called by execute.py


def check(hf: Any, setup: Setup) -> bool:
    """Whether `hf` (a transformers config) is an encoder-decoder model; refuses what only the other
    kind of model can run, with one line."""
    from vramtop_agent.estimator.execute import ExecutionError

    if not getattr(hf, "is_encoder_decoder", False):
        if setup.target_len is not None:
            raise ExecutionError(f"--target-len sets the decoder's length of an encoder-decoder model; "
                                 f"{hf.model_type} is decoder-only (its one length is --seq-len)")
        return False
    if setup.loss == "chunked":
        raise ExecutionError(f"--loss chunked is executed for causal LMs; {hf.model_type} is an encoder-decoder "
                             f"model (not modelled yet): use --loss full")
    if setup.compile:
        # Dynamo does not trace transformers' T5/BART stacks on the meta device (a logging handler used as a
        # context manager inside the traced code), so there is no partitioner decision to count.
        raise ExecutionError(f"--compile is executed for causal LMs; {hf.model_type} is an encoder-decoder "
                             f"model (torch.compile does not trace it on the meta device): estimate it eager")
    return True


def prepare_config(hf: Any) -> None:
    """T5 starts the decoder with the pad token (its published configs say decoder_start_token_id 0);
    a hand-written config may leave it out, and transformers' label shift refuses to run without it."""
    if getattr(hf, "is_encoder_decoder", False) and getattr(hf, "decoder_start_token_id", None) is None:
        pad = getattr(hf, "pad_token_id", None)
        hf.decoder_start_token_id = pad if pad is not None else 0


def auto_class(hf: Any) -> tuple[Any, str]:
    """(the transformers Auto class that builds this model for training, its name for messages)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if getattr(hf, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM, "a sequence-to-sequence LM"
    return AutoModelForCausalLM, "a causal LM"


def task_type(model: nn.Module) -> str:
    return "SEQ_2_SEQ_LM" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "CAUSAL_LM"


def keep_fp32(model: nn.Module, setup: Setup) -> None:
    """from_pretrained's `_keep_in_fp32_modules` (T5: `wo`): loaded in fp32 when the rest is fp16
    (`_keep_in_fp32_modules_strict`: fp16 or bf16). from_config does neither; this does it."""
    import torch

    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    dtype = setup.odtype if setup.quantized else setup.wdtype
    keep = (names if dtype == "fp16" else set()) | (strict if dtype in ("fp16", "bf16") else set())
    if not keep:
        return
    for name, mod in model.named_modules():
        if _matches(name, keep):
            for p in mod.parameters(recurse=True):
                if p.is_floating_point():
                    p.data = p.data.to(torch.float32)


def not_quantized(model: nn.Module) -> set[str]:
    """Module-name patterns transformers' bitsandbytes loader keeps as they are (`_keep_in_fp32_modules`,
    `_keep_in_fp32_modules_strict`)."""
    return (set(getattr(model, "_keep_in_fp32_modules", None) or ())
            | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()))


def skip_quantizing(full_name: str, patterns: set[str]) -> bool:
    return bool(patterns) and _matches(full_name, patterns)


def _matches(full_name: str, patterns: set[str]) -> bool:
    """transformers' rule: a pattern names a module by its full name, a prefix up to a dot, or a suffix."""
    return any(full_name == p or full_name.startswith(p + ".") or full_name.endswith(p) for p in patterns)


def batch(setup: Setup) -> dict[str, torch.Tensor]:
    """The encoder's token ids and the decoder's labels (their shift-right is the decoder's input)."""
    import torch

    b = setup.batch
    return {"input_ids": torch.zeros((b, setup.seq_len), dtype=torch.long, device="meta"),
            "labels": torch.zeros((b, target_len(setup)), dtype=torch.long, device="meta")}


@contextlib.contextmanager
def no_padding() -> Iterator[None]:
    """The estimated batch has no padding. A decoder that is given no mask may make one of ones (BART's),
    and transformers then asks whether it is all ones (`masking_utils.fast_all`, a `.item()`) to skip
    building the b x 1 x t x t causal mask, as it does on a real device. On the meta device the answer
    would be the recorder's "False": here it is True."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    orig = getattr(masking_utils, "fast_all", None)
    if orig is None:
        yield
        return

    def fast_all(tensor: Any) -> Any:
        return True if getattr(tensor, "is_meta", False) else orig(tensor)

    masking_utils.fast_all = fast_all
    try:
        yield
    finally:
        masking_utils.fast_all = orig


# ------------------------------------------------------------------ two stacks deep


def depth(config: dict, hf: Any) -> tuple[str, str, int, int] | None:
    """(encoder key, decoder key, encoder layers, decoder layers) for the families whose layers repeat."""
    keys = _DEPTH_KEYS.get(str(getattr(hf, "model_type", "")))
    if keys is None:
        return None
    enc, dec = (getattr(hf, k, None) for k in keys)
    if not isinstance(enc, int) or not isinstance(dec, int) or enc < 1 or dec < 1:
        return None
    return keys[0], keys[1], enc, dec


def with_depth(config: dict, keys: tuple[str, str], enc: int, dec: int) -> dict:
    cfg = dict(config)
    cfg[keys[0]], cfg[keys[1]] = enc, dec
    return cfg


def measure(config: dict, hf: Any, setup: Setup, routing: str, exact: bool) -> Measured:
    """Execute the model, or two scaled copies of it and extend linearly.

    Every encoder layer after the first adds the same tensors, and so does every decoder layer; but a
    peak is the highest of a few moments (the start of backward, the switch from the decoder's backward
    to the encoder's, its end...), and which moment is highest depends on the ratio of the two depths
    (a decoder layer's gradients may outweigh its activations while an encoder layer's do not). So the
    copies keep the ratio: with g = gcd(E, D), (2E/g, 2D/g) and (3E/g, 3D/g) layers are executed and
    extended to g: each moment's level is linear in that multiple, and so is the highest of them.
    Exact for every block and phase peak (tested against executing every layer). g <= 3 (and families
    not known to repeat) execute every layer."""
    from vramtop_agent.estimator.execute import _extend, run_step

    plan = None if exact else depth(config, hf)
    if plan is None or math.gcd(plan[2], plan[3]) <= 3:
        m = run_step(config, setup, routing)
    else:
        enc_key, dec_key, enc, dec = plan
        g = math.gcd(enc, dec)
        e0, d0 = enc // g, dec // g
        a = run_step(with_depth(config, (enc_key, dec_key), 2 * e0, 2 * d0), setup, routing)
        b = run_step(with_depth(config, (enc_key, dec_key), 3 * e0, 3 * d0), setup, routing)
        m = _extend(a, b, g - 2)
        m.trainable_numels = _extend_numels(a.trainable_numels, b.trainable_numels, g - 2)
        m.extrapolated = False   # its note speaks of one stack's periods: this one says what ran instead
        m.notes.append(f"deep encoder-decoder: {2 * e0}+{2 * d0} and {3 * e0}+{3 * d0} encoder+decoder layers "
                       f"executed, extended linearly to {enc}+{dec} (layers repeat; the depths' ratio kept)")
    m.notes.append(f"encoder-decoder: encoder input {setup.seq_len} tokens, decoder labels {target_len(setup)} "
                   f"tokens (--target-len); the decoder's input is the labels shifted right; no padding")
    return m


def _extend_numels(a: list[int], b: list[int], k: int) -> list[int]:
    """The trainable tensors' sizes of the full depth: the decoder's tensors follow the encoder's in
    parameter order, so what b adds over a is a multiset difference, not a suffix."""
    from collections import Counter

    extra = Counter(b)
    extra.subtract(Counter(a))
    if any(v < 0 for v in extra.values()):   # not a pure addition: keep the measured list
        return list(b)
    return list(a) + list(extra.elements()) * k
