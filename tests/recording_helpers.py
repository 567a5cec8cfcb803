"""Shared by tests/test_recording*.py: one real recording of a tiny fine-tune, made once per process."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

_CACHE: dict = {}

# The fine-tune: LoRA on the tiny Llama, batch 2x32, except one step with a 6x64 batch: the peak.
PEAK_STEP = 6
STEPS = 10


def _tmpdir() -> str:
    if "dir" not in _CACHE:
        d = tempfile.mkdtemp(prefix="vramtop-rec-")
        atexit.register(shutil.rmtree, d, True)
        _CACHE["dir"] = d
    return _CACHE["dir"]


def real_recording() -> str:
    """Path of a finished recording (read-only for tests: copy it before changing it)."""
    if "real" in _CACHE:
        return _CACHE["real"]
    import torch

    import vramtop_agent
    from vramtop.tiny import add_lora, build_model, make_batch

    path = os.path.join(_tmpdir(), "real.vramtop")
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with vramtop_agent.watch(model, opt, publish=False, record=path, sample_hz=20):
        for i in range(STEPS):
            big = i == PEAK_STEP
            b = make_batch(model, batch=6 if big else 2, seq_len=64 if big else 32, seed=i)
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            time.sleep(0.06)  # let the sampler see every step
    os.chmod(path, 0o444)
    _CACHE["real"] = path
    return path


def copy_of(path: str, name: str) -> str:
    dst = os.path.join(_tmpdir(), name)
    shutil.copyfile(path, dst)
    os.chmod(dst, 0o644)
    for suffix in ("-wal", "-shm"):
        try:
            os.remove(dst + suffix)
        except OSError:
            pass
    return dst


def fake_msg(kind: str, t: float, **fields) -> dict:
    """A schema-valid message of each type, for synthetic recordings."""
    base = {"v": 1, "type": kind, "t": t, "pid": fields.pop("pid", 4242), "rank": fields.pop("rank", 0)}
    blocks = fields.pop("blocks", None) or {"parameters": 1000, "gradients": 100, "optimizer": 200,
                                             "activations": 300, "other": 10}
    if kind == "sample":
        base.update(seq=fields.pop("seq", 0), step=fields.pop("step", 0), phase=fields.pop("phase", "forward"),
                    device="cpu", blocks=blocks, params_split={"trainable": 10, "frozen": 990, "quantized": 0},
                    devices={"cpu": blocks}, host={"rss": 5000, "total": 10 ** 9, "available": 10 ** 8},
                    dropped=0, errors=0)
    elif kind == "hello":
        base.update(eseq=fields.pop("eseq", 1), host="h", cmdline=["train.py"], start_time=t, agent_version="0.1.0",
                    device="cpu", sample_hz=10.0, model={"class": "Tiny", "params_total": 10, "params_trainable": 1,
                                                         "dtype": "float32", "method": "lora"})
    elif kind == "step":
        step = fields.pop("step", 0)
        peak = fields.pop("peak", sum(blocks.values()))
        base.update(eseq=fields.pop("eseq", 1), step=step, step_time=0.1, micro_steps=1, batch=[2, 32],
                    peaks={"forward": peak, "backward": peak, "optimizer": peak // 2}, end_of_forward=peak,
                    backward_spike=0, peak=peak, peak_phase="forward", peak_blocks=blocks)
    elif kind == "phase":
        base.update(eseq=fields.pop("eseq", 1), step=fields.pop("step", 0), phase=fields.pop("phase", "forward"),
                    edge=fields.pop("edge", "start"), level=1000)
    elif kind == "oom":
        base.update(eseq=fields.pop("eseq", 1), step=fields.pop("step", 0), phase="backward",
                    requested=2 << 30, message="CUDA out of memory. Tried to allocate 2.00 GiB", blocks=blocks)
    elif kind == "bye":
        base.update(eseq=fields.pop("eseq", 1), reason="finished")
    base.update(fields)
    return base
