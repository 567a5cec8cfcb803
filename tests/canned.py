"""Canned streams for the dashboard's snapshot tests: fixed data, a fixed clock, no sockets.

- cpu_stream(): a real recording of the CPU demo (vramtop.demo_train, 12 steps of
  the tiny LoRA Llama), with pid, host, command line and clock made constant
  (tests/data/cpu_stream.json);
- cuda_stream(): a LoRA fine-tune of a 7B Llama on an 80 GiB card, built from
  the wire schema (no GPU here): every message passes schema.validate, the
  estimate is the estimator's own for that setup, and the allocator numbers are
  consistent (reserved >= allocated = the blocks' sum, NVML >= reserved).
"""

from __future__ import annotations

import json
import os

from vramtop.source import Source
from vramtop_agent.schema import validate

DATA = os.path.join(os.path.dirname(__file__), "data")
GIB, MIB = 1024 ** 3, 1024 ** 2
T0 = 1_700_000_000.0


def cpu_stream(with_bye: bool = False) -> list[dict]:
    with open(os.path.join(DATA, "cpu_stream.json")) as fh:
        msgs = json.load(fh)
    return [validate(m) for m in msgs if with_bye or m["type"] != "bye"]


def _cuda_estimate() -> dict:
    from vramtop_agent.estimator import Setup, estimate, get_preset

    return estimate(get_preset("llama-2-7b"), Setup(method="lora", batch=4, seq_len=1024)).to_dict()


def cuda_stream(pid: int = 4343, rank: int = 0, world_size: int = 1, steps: int = 12, scale: float = 1.0,
                host: str = "gpu-node1") -> list[dict]:
    """A CUDA run from the schema: `scale` grows the activations (a heavier rank of a job)."""
    base = {"v": 1, "pid": pid, "rank": rank}
    est = _cuda_estimate()
    params, grads, optim = (est["blocks"][k] for k in ("parameters", "gradients", "optimizer"))
    msgs: list[dict] = [{
        **base, "type": "hello", "t": T0, "eseq": 1, "host": host, "node": host,
        "cmdline": ["train.py", "--model", "llama-2-7b", "--lora"], "start_time": T0, "local_rank": rank,
        "world_size": world_size, "agent_version": "0.1.0", "torch_version": "2.13.0+cu128", "device": "cuda:0",
        "device_name": "NVIDIA H100 80GB HBM3", "device_total": 80 * GIB,
        "model": {"class": "PeftModelForCausalLM(LlamaForCausalLM)", "params_total": 6_742_609_920,
                  "params_trainable": 4_194_304, "dtype": "bfloat16", "method": "lora", "grad_ckpt": False,
                  "summary": "LoRA r=8 q_proj,v_proj"},
        "optimizer": {"class": "AdamW", "state_dtype": "float32"}, "sample_hz": 10.0,
        "estimate": est,
    }]
    eseq, t = 1, T0
    for step in range(steps):
        acts = int((18 + (step % 3)) * GIB * scale)
        other = 700 * MIB
        fwd_end = params + acts + other
        spike = int(2.5 * GIB * scale)
        bwd = fwd_end + grads + spike
        opt = params + grads + optim + other
        for i, phase in enumerate(("forward", "backward", "optimizer")):
            t += 0.1
            a = {"forward": acts, "backward": acts // 3, "optimizer": 0}[phase]
            blocks = {"parameters": params, "gradients": grads if phase != "forward" else 0,
                      "optimizer": optim if step or phase == "optimizer" else 0, "activations": a, "other": other}
            allocated = sum(blocks.values())
            reserved = allocated + int(3.2 * GIB * scale)
            msgs.append({**base, "type": "sample", "t": round(t, 3), "seq": 3 * step + i + 1, "step": step,
                         "phase": phase, "device": "cuda:0", "blocks": blocks,
                         "params_split": {"trainable": 8 * MIB, "frozen": params - 8 * MIB, "quantized": 0},
                         "devices": {"cuda:0": blocks}, "host": {"rss": 6 * GIB, "total": 512 * GIB,
                                                                  "available": 400 * GIB},
                         "cuda": {"allocated": allocated, "reserved": reserved, "active": allocated,
                                  "inactive_split": 180 * MIB, "alloc_retries": 0, "ooms": 0,
                                  "peak_allocated": bwd, "peak_reserved": bwd + 2 * GIB},
                         "nvml": {"total": 80 * GIB, "used": reserved + 900 * MIB + 2 * GIB,
                                  "process_used": reserved + 900 * MIB},
                         "batch": [4, 1024], "dropped": 0, "errors": 0})
        eseq += 1
        msgs.append({**base, "type": "step", "t": round(t + 0.01, 3), "eseq": eseq, "step": step,
                     "step_time": 0.412 + 0.003 * (step % 4), "micro_steps": 1, "batch": [4, 1024],
                     "peaks": {"forward": fwd_end, "backward": bwd, "optimizer": opt}, "end_of_forward": fwd_end,
                     "backward_spike": bwd - fwd_end, "peak": bwd, "peak_phase": "backward",
                     "peak_blocks": {"parameters": params, "gradients": grads, "optimizer": optim,
                                     "activations": acts + spike, "other": other},
                     "eof_blocks": {"parameters": params, "gradients": 0, "optimizer": optim, "activations": acts,
                                    "other": other}})
    return [validate(m) for m in msgs]


class CannedSource(Source):
    """A source that hands over its messages once."""

    def __init__(self, msgs: list[dict], describe: str = "", status: str = "attached to ipc:///run/vramtop/4242-0.sock"):
        self._msgs = list(msgs)
        self.describe = describe
        self.status = status

    def poll(self) -> list[dict]:
        out, self._msgs = self._msgs, []
        return out

    def close(self) -> None:
        pass


def fixed_clock(msgs: list[dict], after: float = 0.5):
    """A clock just after the stream's last message: the view reads it as live, forever."""
    now = max(m["t"] for m in msgs) + after
    return lambda: now
