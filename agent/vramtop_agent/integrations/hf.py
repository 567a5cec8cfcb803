"""Hugging Face Trainer integration: one line.

    from vramtop_agent.integrations.hf import VramtopCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[VramtopCallback()])

Works with anything built on Trainer (TRL's SFTTrainer, DPOTrainer, ...;
LLaMA-Factory and axolotl take the same `callbacks=`). What it does:

- on_train_begin: starts the agent with the model (the Trainer's unwrapped
  model; a DDP/FSDP wrapper calls its forward) and the optimizer (the torch
  optimizer inside accelerate's AcceleratedOptimizer). When VRAMTOP=1 already
  started an agent in this process, that one is reused.
- reads TrainingArguments into the hello message's `training` map:
  per_device_batch, grad_accum, effective_batch, grad_ckpt (+ grad_ckpt_kwargs), precision
  (bf16|fp16|fp32), optim, world_size, max_steps, seq_len (SFTConfig), deepspeed,
  fsdp, torch_compile;
- marks steps: the agent's step number follows `state.global_step` (resumed
  runs included), and an optimizer step the agent did not see (skipped by
  the fp16 grad scaler, or a DeepSpeed engine step) still ends the step at
  on_step_end; gradient-accumulation micro-steps (forward/backward passes)
  are counted per optimizer step (`micro_steps` of each step message): the
  optimizer is known from the first micro-step on, so the first accumulation
  window is not split into steps;
- on_log: adds vramtop/<block>_mib (parameters, gradients, optimizer,
  activations, other, total) and vramtop/peak_<phase>_mib, peak_mib,
  backward_spike_mib (over the steps since the previous log) to the logs, so
  TensorBoard, W&B, MLflow... receive them. The callback moves itself to the
  front of the Trainer's callback list so those reporters see the values.
- on_train_end: stops the agent it started (a "bye" with reason "finished").

Options: VramtopCallback(log_metrics=True, **watch_options) (endpoint=,
record=, sample_hz=, ... as for vramtop_agent.watch).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from vramtop_agent.integrations import _common

if TYPE_CHECKING:
    from types import FrameType

    from transformers import TrainerCallback as _Base

    from vramtop_agent.agent import Agent
else:
    try:  # a real TrainerCallback when transformers is there (Trainer checks nothing, but users may)
        from transformers import TrainerCallback as _Base
    except Exception:  # pragma: no cover - transformers absent: the class is still importable
        _Base = object


def training_from_args(args, state=None) -> dict:
    """The `training` map from TrainingArguments (or a subclass: SFTConfig, DPOConfig, ...)."""
    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    if get("bf16"):
        precision = "bf16"
    elif get("fp16"):
        precision = "fp16"
    else:
        precision = "fp32"
    batch = get("per_device_train_batch_size")
    accum = get("gradient_accumulation_steps") or 1
    world = get("world_size") or 1
    info = {
        "framework": "transformers",
        "args_class": type(args).__name__,
        "per_device_batch": batch,
        "grad_accum": accum,
        "world_size": world,
        "effective_batch": batch * accum * world if isinstance(batch, int) else None,
        # transformers 5 renamed gradient_checkpointing* to activation_checkpointing* (old names still mirror them)
        "grad_ckpt": bool(get("activation_checkpointing") or get("gradient_checkpointing")),
        "precision": precision,
        "optim": _common.plain(get("optim")),
        "tf32": get("tf32"),
        "torch_compile": bool(get("torch_compile", False)) or None,
        "deepspeed": True if get("deepspeed") else None,
        "fsdp": " ".join(str(_common.plain(x)) for x in get("fsdp")) if get("fsdp") else None,
    }
    ckpt_kwargs = get("activation_checkpointing_kwargs") or get("gradient_checkpointing_kwargs")
    if info["grad_ckpt"] and isinstance(ckpt_kwargs, dict):
        simple = {str(k): v for k, v in ckpt_kwargs.items() if type(v) in (bool, int, float, str)}
        if simple:
            info["grad_ckpt_kwargs"] = simple  # use_reentrant, every_n_layers, offloading, ...
    for name in ("max_length", "max_seq_length"):  # TRL's SFTConfig
        value = get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            info["seq_len"] = value
            break
    if state is not None and isinstance(getattr(state, "max_steps", None), int) and state.max_steps > 0:
        info["max_steps"] = state.max_steps
    return {k: (v if isinstance(v, dict) else _common.plain(v)) for k, v in info.items() if v is not None}


class VramtopCallback(_Base):
    """Watch a Trainer run with vramtop (see the module docstring)."""

    def __init__(self, log_metrics: bool = True, **watch_options):
        self.log_metrics = log_metrics
        self.watch_options = watch_options
        self.agent: Agent | None = None
        self._owns_agent = False
        self._window = _common.StepWindow()
        self._promoted = False
        self._step_at_begin: int | None = None

    # -------------------------------------------------------------- ordering

    def _promote(self) -> None:
        """Run before the reporting callbacks, so that they log what on_log adds.

        Trainer puts user callbacks after the reporters (TensorBoard, W&B, MLflow);
        the CallbackHandler calling us is found in the caller's frame, and its list
        is replaced by one with this callback first (the loop in progress keeps
        iterating the old list).
        """
        if self._promoted:
            return
        self._promoted = True
        try:
            frame: FrameType | None = sys._getframe(2)
            for _ in range(3):
                if frame is None:
                    return
                handler: Any = frame.f_locals.get("self")  # whatever the caller is; checked below
                cbs = getattr(handler, "callbacks", None)
                if isinstance(cbs, list) and any(c is self for c in cbs):
                    handler.callbacks = [self] + [c for c in cbs if c is not self]
                    return
                frame = frame.f_back
        except Exception:
            pass

    # -------------------------------------------------------------- events

    def on_init_end(self, args, state, control, **kwargs):
        self._promote()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._promote()
        try:
            if self.agent is None or self.agent.closed:
                self.agent, self._owns_agent = _common.start_agent(model, None, **self.watch_options)
                self._window = _common.StepWindow()
            elif model is not None and self.agent.model is not model:
                self.agent.attach_model(model)
            _common.attach_optimizer(self.agent, optimizer)
            self._sync_step(state)
            self.agent.set_training_info(training_from_args(args, state))
        except Exception as exc:  # never stop the training
            self._fail("hf-train-begin", exc)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        agent = self.agent
        if agent is None:
            return
        try:
            if agent.optimizer is None:  # created later (DeepSpeed, FSDP with delayed optimizer creation)
                _common.attach_optimizer(agent, optimizer)
            self._sync_step(state)
            self._step_at_begin = agent.step
        except Exception as exc:
            self._fail("hf-step-begin", exc)

    def on_step_end(self, args, state, control, **kwargs):
        agent = self.agent
        if agent is None:
            return
        try:
            if self._step_at_begin is not None and agent.step == self._step_at_begin and agent.backward_done:
                agent.end_step("hf-step-end")  # the agent saw no optimizer step
            self._sync_step(state)
        except Exception as exc:
            self._fail("hf-step-end", exc)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.agent is None or not self.log_metrics or logs is None:
            return
        try:
            metrics = _common.log_metrics(self.agent, self._window)
            logs.update(metrics)
            history = getattr(state, "log_history", None)
            if history and isinstance(history[-1], dict) and history[-1].get("step") == state.global_step:
                history[-1].update(metrics)
        except Exception as exc:
            self._fail("hf-log", exc)

    def on_train_end(self, args, state, control, **kwargs):
        agent, self.agent = self.agent, None
        if agent is not None and self._owns_agent:
            agent.stop("finished")

    # -------------------------------------------------------------- helpers

    def _sync_step(self, state) -> None:
        agent = self.agent
        if agent is None:  # not reached: every caller has an agent
            return
        step = getattr(state, "global_step", None)
        if isinstance(step, int) and agent.phase == "idle" and agent.step != step:
            agent.set_step(step)

    def _fail(self, where: str, exc: BaseException) -> None:
        if self.agent is not None:
            self.agent.report_error(where, exc)
