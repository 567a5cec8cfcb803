"""PyTorch Lightning integration: one line.

    from vramtop_agent.integrations.lightning import VramtopCallback
    trainer = lightning.pytorch.Trainer(..., callbacks=[VramtopCallback()])

(`import pytorch_lightning` users: the class derives from whichever of
`lightning.pytorch` / `pytorch_lightning` is installed, lightning.pytorch first;
`make_callback(base)` builds one for the other.)

- on_train_start: starts the agent with the LightningModule and the
  optimizer (trainer.optimizers[0]); an agent already started by VRAMTOP=1 in
  this process is reused. The `training` map of the hello message gets
  precision, grad_accum (accumulate_grad_batches), per_device_batch (the
  train dataloader's batch_size), world_size, strategy, max_steps, grad_ckpt.
- phases: `training_step` is not a module call, so the forward phase is
  marked from on_train_batch_start to on_before_backward (the root module's
  own hooks still work when training_step calls `self(...)`); backward and the
  optimizer step are seen by the agent's hooks. Lightning runs forward and
  backward inside `optimizer.step(closure)`; the agent starts the optimizer
  phase when the closure returns. Micro-steps of accumulate_grad_batches are
  counted per optimizer step.
- on_train_batch_end: logs vramtop/<block>_mib, total_mib and, when a step
  ended, vramtop/peak_<phase>_mib, peak_mib, backward_spike_mib,
  at_peak_<block>_mib through `pl_module.log_dict` (so every configured logger
  gets them: TensorBoard, W&B, MLflow, CSV).
- on_train_end / on_exception: stops the agent it started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vramtop_agent.integrations import _common

if TYPE_CHECKING:
    from vramtop_agent.agent import Agent


def _base_class() -> type:
    try:
        from lightning.pytorch import Callback

        return Callback
    except Exception:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback

        return PLCallback
    except Exception:  # pragma: no cover - neither installed: importable, not usable
        return object


def _training_info(trainer, pl_module) -> dict:
    from vramtop_agent.introspect import _grad_ckpt

    info = {
        "framework": "lightning",
        "precision": _common.plain(getattr(trainer, "precision", None)),
        "grad_accum": getattr(trainer, "accumulate_grad_batches", None),
        "world_size": getattr(trainer, "world_size", None),
        "strategy": type(getattr(trainer, "strategy", None)).__name__ if getattr(trainer, "strategy", None) else None,
        "grad_ckpt": _grad_ckpt(pl_module),
    }
    max_steps = getattr(trainer, "max_steps", -1)
    if isinstance(max_steps, int) and max_steps > 0:
        info["max_steps"] = max_steps
    try:
        loader = trainer.train_dataloader
        batch = getattr(loader, "batch_size", None)
        if isinstance(batch, int):
            info["per_device_batch"] = batch
    except Exception:
        pass
    if isinstance(info.get("per_device_batch"), int) and isinstance(info.get("grad_accum"), int):
        info["effective_batch"] = info["per_device_batch"] * info["grad_accum"] * (info.get("world_size") or 1)
    return info


def make_callback(base: Any):  # a class chosen at runtime: mypy can only take it as Any
    """A VramtopCallback class deriving from `base` (a Lightning Callback class)."""

    class VramtopCallback(base):
        """Watch a Lightning fit with vramtop (see the module docstring)."""

        def __init__(self, log_metrics: bool = True, **watch_options):
            super().__init__()
            self.log_metrics = log_metrics
            self.watch_options = watch_options
            self.agent: Agent | None = None
            self._owns_agent = False
            self._window = _common.StepWindow()

        def on_train_start(self, trainer, pl_module):
            try:
                optimizers = list(getattr(trainer, "optimizers", None) or [])
                if self.agent is None or self.agent.closed:
                    self.agent, self._owns_agent = _common.start_agent(pl_module, None, **self.watch_options)
                    self._window = _common.StepWindow()
                elif self.agent.model is not pl_module:
                    self.agent.attach_model(pl_module)
                if optimizers:
                    _common.attach_optimizer(self.agent, optimizers[0])
                self.agent.set_step(int(getattr(trainer, "global_step", 0) or 0))
                self.agent.set_training_info(_training_info(trainer, pl_module))
            except Exception as exc:
                self._fail("lightning-train-start", exc)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            agent = self.agent
            if agent is None:
                return
            try:
                if agent.optimizer is None and getattr(trainer, "optimizers", None):
                    _common.attach_optimizer(agent, trainer.optimizers[0])
                _common.forward_start(agent, pl_module, batch)
            except Exception as exc:
                self._fail("lightning-batch-start", exc)

        def on_before_backward(self, trainer, pl_module, loss):
            agent = self.agent
            if agent is None:
                return
            try:
                if agent.in_forward:
                    agent.mark_forward_end(pl_module, loss)
            except Exception as exc:
                self._fail("lightning-before-backward", exc)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            agent = self.agent
            if agent is None:
                return
            try:
                if agent.in_forward:  # training_step returned no loss: no backward follows
                    agent.abandon_forward("forward-post")
                if self.log_metrics:
                    metrics = _common.log_metrics(agent, self._window)
                    pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True,
                                       batch_size=1)
            except Exception as exc:
                self._fail("lightning-log", exc)

        def on_train_end(self, trainer, pl_module):
            self._stop("finished")

        def on_exception(self, trainer, pl_module, exception):
            if self.agent is not None:
                try:
                    from vramtop_agent import oom

                    oom.on_exception(self.agent, exception)  # an OOM is recorded before the agent stops
                except Exception:
                    pass
            self._stop("exception")

        def _stop(self, reason: str) -> None:
            agent, self.agent = self.agent, None
            if agent is not None and self._owns_agent:
                agent.stop(reason)

        def _fail(self, where: str, exc: BaseException) -> None:
            if self.agent is not None:
                self.agent.report_error(where, exc)

    return VramtopCallback


VramtopCallback = make_callback(_base_class())
