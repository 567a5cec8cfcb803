"""The in-process agent: hooks, phase tracking, edge sampling, publishing.

Threads:
- the training thread (and, on CUDA, autograd's device threads) run the hooks.
  They do bookkeeping only, take the samples (at the phase edges, and at the
  next hook they pass once 1/sample_hz has gone by: no other thread competes
  for the GIL to measure) and append finished messages to a bounded deque;
  they never touch a socket, a file or a lock that another thread could hold
  for long.
- the agent's I/O thread drains the deque and hands every message to the
  sinks (ZeroMQ publisher, recorder): socket and file writes, which release
  the GIL. Only when the training thread has produced no sample for a second
  (one long op, a hang, no training at all) does it take a sample itself, from
  the caches, marked `source: "tick"`. It is a daemon thread: it never keeps a
  finished job alive.

Activations are tracked (saved-tensor hooks, exact) on the steps that decide
the picture: the first steps, a new input shape, a new model or optimizer,
and one step in `track_every` (by default no more often than every 10 s); on
the steps in between no hook runs per op and they are derived (tracking.py).
Every sample and step says which.

Gradients are read once per backward, at its end (autograd's final callback),
in one pass over the parameters. Only on tracked steps does a hook run per
parameter as its gradient lands (mid-backward samples then show gradients
growing while activations are freed); on the steps in between no Python runs
per parameter in backward.

Every hook body runs under `_guard`: an exception inside vramtop is counted,
reported in the stream and swallowed; the training job never sees it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

from vramtop_agent import devices
from vramtop_agent.accounting import Accountant, Breakdown
from vramtop_agent.attribution import Attribution
from vramtop_agent.autodetect import defer_to_closure, watch_root
from vramtop_agent.compile_guard import skip_our_frames
from vramtop_agent.hooks import HookHandle, remove_hooks
from vramtop_agent.saved import SavedTensorTracker
from vramtop_agent.schema import BLOCK_KEYS, PHASES, SCHEMA_VERSION
from vramtop_agent.sinks import MessageSink, Sink, as_sink, sink_name
from vramtop_agent.step_state import StepState
from vramtop_agent.tracking import TrackingPolicy

AGENT_VERSION = "0.1.0"
OUTBOX_LIMIT = 10_000
FALLBACK_TICK_S = 1.0  # the I/O thread samples only when the training thread has not for this long
HELLO_REBUILD_S = 30.0  # the re-sent hello is a copy; rebuilt (model walk) this rarely


# The phase edges: `_edge` tells them by identity (`is`) on the hot path.
_FORWARD_START = ("forward", "start")
_BACKWARD_START = ("backward", "start")
_BACKWARD_END = ("backward", "end")
_OPTIMIZER_START = ("optimizer", "start")
_OPTIMIZER_END = ("optimizer", "end")
_get_ident = threading.get_ident
_monotonic = time.monotonic
_time = time.time


@functools.cache
def _estimate_key() -> Callable:
    """estimator.live.estimate_key, imported once (the forward pre hook asks for it every step)."""
    from vramtop_agent.estimator.live import estimate_key

    return estimate_key


def _is_compiling() -> bool:
    """True while Dynamo traces: every hook returns at once, so it is invisible to torch.compile."""
    return False


def _grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def _queue_callback(callback: Callable[[], None]) -> None:
    """Run `callback` when the running backward ends (autograd's final callbacks)."""
    import torch

    torch.autograd.Variable._execution_engine.queue_callback(callback)


_TENSOR: Any = None  # torch.Tensor, once bound: a model output of exactly this type needs no walk


def _bind_is_compiling() -> None:
    """Bind the torch functions every hook asks (once torch is in use: a model is attached)."""
    global _is_compiling, _grad_enabled, _queue_callback, _TENSOR
    try:
        import torch

        _TENSOR = torch.Tensor
        _is_compiling = torch.compiler.is_compiling
        _grad_enabled = torch.is_grad_enabled
        _queue_callback = torch.autograd.Variable._execution_engine.queue_callback
    except Exception:
        pass


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class Agent:
    """Watches one training process. Create it with `vramtop_agent.watch()`.

    Integrations (integrations/), the OOM postmortem (oom.py), autodetection
    (autodetect.py) and `vramtop attach` (_inject_boot.py) drive it through its
    public methods only: `mark_forward_start`/`mark_forward_end`/`abandon_forward`,
    `end_step`, `set_step`, `set_training_info`, `mark_injected`, `read_level`,
    `report_error`, `run_guarded`, `emit_event`, `adopt_hook`/`take_hooks`,
    `drain`, and the read-only `closed`, `in_forward`, `backward_done`,
    `cuda_index`, `recorder`.
    """

    def __init__(
        self,
        model=None,
        optimizer=None,
        *,
        endpoint: str | None = None,
        publish: bool = True,
        sample_hz: float = 10.0,
        hwm: int = 1000,
        allow_remote: bool = False,
        curve_secret_key: bytes | str | None = None,
        curve_client_keys=None,
        track_activations: bool = True,
        reset_peaks: bool = True,
        record: str | None = None,
        sinks: list[MessageSink] | None = None,
        track_every: int | None = None,
    ):
        self.pid = os.getpid()
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", self.rank)
        self.world_size = _env_int("WORLD_SIZE", 1)
        from vramtop_agent import lifecycle

        self.sample_hz = lifecycle.bounded_sample_hz(sample_hz)  # inf would make the sampler spin
        self.reset_peaks = reset_peaks
        self.slot = lifecycle.next_slot(self.rank)  # a second agent of this process gets its own socket
        self._holds = 1  # watch() of an already watched model holds this agent once more (lifecycle.py)

        _bind_is_compiling()
        self.saved = SavedTensorTracker()
        self.saved.enabled = track_activations
        self.acct = Accountant(None, None, self.saved)
        if track_every is None and os.environ.get("VRAMTOP_TRACK_EVERY"):
            track_every = _env_int("VRAMTOP_TRACK_EVERY", TrackingPolicy.DEFAULT_EVERY)
        self.tracking = TrackingPolicy(track_every)  # None: the default, with its time floor
        self.attribution = Attribution(self.saved)
        self._train_thread: int | None = None  # ident of the thread running the watched model's forward
        self._in_opt = None  # the optimizer whose step is the optimizer phase now
        self._bwd_started = False
        self._last_sample_at = -1e9  # monotonic time of the newest sample
        self._pending_sample: dict | None = None
        self._last_hello: dict | None = None
        self._hello_built_at = -1e9
        self.device = "cpu"
        self._cuda_index: int | None = None

        # Counters reported in every sample.
        self.errors = 0
        self.last_error: str | None = None
        self.dropped = 0
        self._error_counts: collections.Counter = collections.Counter()

        # Phase state, touched by the training/autograd threads.
        self.step = 0
        self.phase = "idle"
        self.batch: list[int] | None = None
        self._fwd_depth = 0
        self._step_started: float | None = None
        self._last_step_end: float | None = None
        self._this_step = StepState()  # replaced by a fresh one when the step ends
        self.steps: collections.deque = collections.deque(maxlen=10_000)  # step summaries, newest last

        self._eseq = 0
        self._edge_memo: dict = {}  # phase edge -> (breakdown, tracking.version, level, blocks): see _edge
        self._foreign_optimizers: dict = {}  # id -> (weakref, what was compared): optimizers of other models
        self._model_gen = 0  # attach_model of another model
        self._estimate_stale = True  # the live estimate's model or optimizer may have changed
        self._seq = 0
        self._outbox: collections.deque = collections.deque()
        self._hooks: list[HookHandle] = []
        self._grad_hooks: list[HookHandle] = []  # per-parameter post-accumulate-grad hooks: tracked steps only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.time()
        self._sinks: list[Sink] = [as_sink(s) for s in sinks or []]
        self._closed = False
        self.endpoint: str | None = None
        self._info: dict = {}  # this agent's discovery file (publishing agents)
        self._info_written = False
        self.injected: dict | None = None  # `vramtop attach PID` started this agent in a running job (hello)
        self._training_info: dict | None = None  # an integration's framework settings (hello `training`)
        self.estimate: dict | None = None  # the estimator's prediction for this run (sent in hello)
        self._estimated_for: tuple | None = None

        if publish:
            self._start_publisher(endpoint, hwm, allow_remote, curve_secret_key, curve_client_keys)
        record = record or os.environ.get("VRAMTOP_RECORD")
        if record:
            self._start_recorder(record)

        lifecycle.register(self)  # stopped at exit if nobody stops it; inert in a forked child
        if self.recorder is not None:
            lifecycle.stop_on_polite_signals(self)  # SIGTERM/SIGHUP: the recording still gets its goodbye

        self._install_optimizer_hooks()
        from vramtop_agent import oom  # OOM postmortem: excepthook chain (recordings work)

        oom.install(self)
        if model is not None:
            self.attach_model(model)
        else:  # zero-code use: the first training forward names the root module (autodetect.py)
            self.run_guarded("autodetect", watch_root, self)
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        if self._sinks:
            self._thread = threading.Thread(target=self._run, name="vramtop-agent", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ setup

    def _start_publisher(self, endpoint, hwm, allow_remote, curve_secret_key, curve_client_keys=None) -> None:
        """Bind and announce. Wrong options (a non-loopback endpoint, a bad key) raise; what the machine
        refuses (a foreign or uncreatable runtime dir, a port in use) leaves a non-publishing agent and
        one line on stderr: the job must not die of vramtop."""
        import zmq

        from vramtop_agent import discovery, lifecycle
        from vramtop_agent.publisher import Publisher

        endpoint = endpoint or os.environ.get("VRAMTOP_ENDPOINT")
        curve_secret_key = curve_secret_key or os.environ.get("VRAMTOP_CURVE_SECRET_KEY") or None  # a key file
        try:
            endpoint = endpoint or discovery.ipc_endpoint(self.pid, self.rank, self.slot)
            pub = Publisher(endpoint, hwm=hwm, allow_remote=allow_remote, curve_secret_key=curve_secret_key,
                            curve_client_keys=curve_client_keys)
        except (OSError, zmq.ZMQError) as exc:
            lifecycle.say_once("publish", f"agent not publishing, viewers cannot attach ({type(exc).__name__}: "
                               f"{exc}); the job runs on")
            return
        self.endpoint = pub.endpoint
        self._sinks.append(pub)
        self._info = discovery.make_info(self.endpoint, self.rank, self.local_rank, self.world_size, self.slot)
        if pub.curve:
            self._info["curve"] = True  # a local viewer then knows it needs the agent's public key
        try:
            discovery.write_info(self._info)
            self._info_written = True
        except OSError as exc:  # a tcp endpoint works without the directory: attach by endpoint
            lifecycle.say_once("discovery", f"agent publishes on {self.endpoint} but is not listed for `vramtop ls` "
                               f"({type(exc).__name__}: {exc})")

    def _start_recorder(self, path: str) -> None:
        from vramtop_agent.recorder import Recorder

        try:
            self._sinks.append(Recorder(path))
        except Exception as exc:  # a bad path must not stop the job
            self.report_error("recorder", exc)

    # The model and the optimizers are held weakly (by the Accountant): a job that drops or
    # rebuilds them gets their memory back.
    @property
    def model(self):
        """The watched root module (None before one is attached or found, or after it was collected)."""
        return self.acct.model

    @property
    def optimizer(self):
        """The newest adopted optimizer still alive."""
        return self.acct.optimizer

    def attach_model(self, model) -> None:
        """Watch this module as the root: its forward marks the forward phase."""
        if self.model is model:
            return
        remove_hooks(self.take_hooks(_is_model_hook))
        self.acct.model = model
        self._model_gen += 1
        self._estimate_stale = True
        self.attribution.set_model(model)
        self.tracking.changed()
        self.device = self._primary_device(model)
        self._cuda_index = int(self.device.split(":")[1]) if self.device.startswith("cuda") else None
        if self._info_written:  # `vramtop ls` shows the device (one small file write, once per model)
            self.run_guarded("discovery", self._write_device_info)
        _bind_is_compiling()
        if getattr(model, "_compiled_call_impl", None) is not None:
            # Compiled in place (`model.compile()`): its own hooks run inside the compiled region, where
            # ours would be traced away. Ours go around the compiled call instead, eagerly.
            handles: list[HookHandle] = [_CompiledCallWrap(model, self._on_forward_pre,
                                                                     self._on_compiled_forward_post)]
            from vramtop_agent import oom

            handles += oom.model_hooks(self, model)  # records an OOM raised inside forward
        else:
            h1 = model.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True)
            # always_call: a forward that raises (an OOM) must still pop our saved-tensor hooks.
            h2 = model.register_forward_hook(self._on_forward_post, always_call=True)
            handles = [_ModelHook(h1), _ModelHook(h2)]
        self._grad_hooks_on(False)  # the old model's; a tracked forward of this one registers its own
        self._hooks += handles
        self._queue_hello()

    def _write_device_info(self) -> None:
        from vramtop_agent import discovery

        self._info.update(device=self.device, device_name=devices.device_name(self.device))
        discovery.write_info(self._info)

    def attach_optimizer(self, optimizer) -> None:
        """Count this optimizer's states; its step (or any adopted one's) marks the optimizer phase."""
        if self.acct.add_optimizer(optimizer):
            self.tracking.changed()
            self._estimate_stale = True
            self._queue_hello()

    def take_hooks(self, which: Callable[[HookHandle], bool]) -> list[HookHandle]:
        """Hand over the hook handles `which` selects: the agent forgets them, the caller removes or replaces them."""
        keep: list[HookHandle] = []
        taken: list[HookHandle] = []
        for h in self._hooks:
            (taken if which(h) else keep).append(h)
        self._hooks = keep
        return taken

    def adopt_hook(self, handle: HookHandle) -> None:
        """Hold a hook handle (anything with `remove()`) that stop() removes with the agent's own."""
        self._hooks.append(handle)

    def _install_optimizer_hooks(self) -> None:
        # Global hooks: catch whichever optimizer steps, even when none was passed.
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks.append(register_optimizer_step_pre_hook(self._on_opt_pre))
        self._hooks.append(register_optimizer_step_post_hook(self._on_opt_post))

    @staticmethod
    def _primary_device(model) -> str:
        sizes: dict[str, int] = {}
        for p in model.parameters():
            d = str(p.device) if p.device.index is not None or p.device.type == "cpu" else f"{p.device.type}:0"
            sizes[d] = sizes.get(d, 0) + p.numel() * p.element_size()
        if not sizes:
            return "cpu"
        return max(sizes, key=lambda d: sizes[d])

    # ------------------------------------------------------------------ guard

    def run_guarded(self, where: str, fn: Callable, *args):
        """fn(*args); an exception is reported as an agent error at `where` and None returned instead."""
        try:
            return fn(*args)
        except Exception as exc:
            self.report_error(where, exc)
            return None

    def report_error(self, where: str, exc: BaseException) -> None:
        """Count an exception caught inside vramtop (every sample says how many) and send an "error" event."""
        try:
            self.errors += 1
            self._error_counts[where] += 1
            n = self._error_counts[where]
            text = f"{type(exc).__name__}: {exc}"[:500]
            self.last_error = f"{where}: {text}"
            # Report the first few of a kind, then one in a hundred: a hook that fails every op must not flood.
            if n <= 5 or n % 100 == 0:
                self.emit_event({"type": "error", "where": where, "message": text, "count": n,
                            "trace": "".join(traceback.format_exception(exc))[-2000:]})
        except Exception:
            pass

    # ------------------------------------------------------------------ what integrations, OOM and autodetect use

    @property
    def closed(self) -> bool:
        """True once stop() ran (or a forked child disowned the parent's agent)."""
        return self._closed

    @property
    def in_forward(self) -> bool:
        """True between a training forward's start and its end."""
        return self._fwd_depth > 0

    @property
    def backward_done(self) -> bool:
        """True when a backward ended in the current step (its optimizer phase may start)."""
        return self._this_step.backward_done

    @property
    def cuda_index(self) -> int | None:
        """The CUDA index of the watched model's primary device; None off CUDA."""
        return self._cuda_index

    @property
    def recorder(self):
        """The Recorder among the sinks, or None when this agent does not record."""
        module = sys.modules.get("vramtop_agent.recorder")  # never imported: no sink can be a Recorder
        if module is None:
            return None
        return next((s for s in self._sinks if isinstance(s, module.Recorder)), None)

    def read_level(self) -> tuple[int, dict]:
        """(bytes in use on the primary device now, the blocks that make them up), from the caches."""
        return self._level()

    def mark_forward_start(self, module, args: tuple = (), kwargs: dict | None = None) -> None:
        """A training forward of `module` starts with these inputs (what the root module's pre hook does):
        for a framework whose training step is not a module call, or a root found inside its own call."""
        self._on_forward_pre(module, args, kwargs or {})

    def mark_forward_end(self, module, output) -> None:
        """The training forward ended with `output`: its first gradient will start the backward phase."""
        self._on_forward_post(module, (), output)

    def abandon_forward(self, where: str) -> None:
        """The forward ends with no backward to follow (it raised, or returned no loss): unwind, go idle."""
        self.run_guarded(where, self._forward_post, None)
        self.phase = "idle"

    def mark_optimizer_start(self, optimizer) -> None:
        """`optimizer`'s update starts now (a `step(closure)` whose closure has just run forward and backward)."""
        self.run_guarded("optimizer-pre", self._opt_pre, optimizer)

    def end_step(self, where: str) -> None:
        """End the current step now: the framework saw an optimizer step the agent's hooks did not (skipped
        by the fp16 grad scaler, a DeepSpeed engine step). An exception is reported at `where`."""
        self.run_guarded(where, self._finish_step)

    def set_step(self, step: int) -> None:
        """Number the current step `step` (a framework's global step: resumed runs go on counting)."""
        self.step = int(step)

    def set_training_info(self, training: dict) -> None:
        """The framework's training settings (batch, grad_accum, precision, ...; None values left out):
        the hello's `training` map, re-sent at once."""
        self._training_info = {k: v for k, v in training.items() if v is not None}
        self.run_guarded("training-info", self._queue_hello)

    def mark_injected(self, at: float) -> None:
        """`vramtop attach PID` started this agent at `at` in a running job: the hello says so, and the
        steps before the first whole one are unknown, never zero."""
        self.injected = {"at": at}
        self._queue_hello()

    def drain(self, timeout: float = 1.0) -> None:
        """Wait (at most `timeout` s) until the I/O thread has handed the queued messages to the sinks,
        then flush the sinks (a recording commits): the process is about to die."""
        deadline = time.monotonic() + timeout
        thread = self._thread
        while self._outbox and thread is not None and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        for sink in list(self._sinks):
            with contextlib.suppress(Exception):
                sink.flush(timeout=max(deadline - time.monotonic(), 0.05))

    # ------------------------------------------------------------------ messages

    def _base(self, kind: str) -> dict:
        return {"v": SCHEMA_VERSION, "type": kind, "t": time.time(), "pid": self.pid, "rank": self.rank}

    def emit_event(self, fields: dict) -> dict | None:
        """Queue an event (a map with its `type`) for the sinks; returns the message as queued, or None when
        nothing was queued (no sinks, or the queue full). Never blocks, never grows without bound."""
        if not self._sinks:
            return None
        if len(self._outbox) >= OUTBOX_LIMIT:
            # Counted here (`dropped` in every sample) and given no eseq, so a viewer's gap count
            # (frames lost on the wire) does not count it twice.
            self.dropped += 1
            return None
        msg = self._base(fields["type"])
        msg.update(fields)
        self._eseq += 1
        msg["eseq"] = self._eseq
        self._outbox.append(msg)
        return msg

    def _queue_hello(self) -> None:
        hello = self.hello_fields()
        self._last_hello = hello
        self._hello_built_at = time.monotonic()
        self.emit_event(hello)

    def hello_fields(self) -> dict:
        """The fields of this agent's hello message: who it is, the model, optimizer, estimate, training."""

        model_info = None
        if self.model is not None:
            model_info = self.run_guarded("describe-model", self._describe_model)
        opt_info = None
        if self.optimizer is not None:
            from vramtop_agent.introspect import describe_optimizer

            opt_info = self.run_guarded("describe-optimizer", describe_optimizer, self.optimizer)
        try:
            import torch

            torch_version = torch.__version__
        except Exception:
            torch_version = None
        return {
            "type": "hello",
            "host": self._info.get("host") or __import__("socket").gethostname(),
            "node": self._info.get("node") or __import__("socket").gethostname(),
            "cmdline": _safe_argv(),
            "start_time": self._started_at,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "agent_version": AGENT_VERSION,
            "torch_version": torch_version,
            "device": self.device,
            "device_name": devices.device_name(self.device),
            "device_total": devices.device_total(self.device),
            "model": model_info,
            "optimizer": opt_info,
            "sample_hz": self.sample_hz,
            "estimate": self.estimate,
            "endpoint": self.endpoint,
            **({"training": self._training_info} if self._training_info else {}),  # integrations/
            **({"injected": dict(self.injected)} if self.injected else {}),  # _inject_boot.py
        }

    def _describe_model(self) -> dict:
        from vramtop_agent.introspect import describe_model  # LoRA, bitsandbytes, grad-ckpt, autocast, sharding

        return describe_model(self.model, on_change=self._queue_hello)

    # ------------------------------------------------------------------ measuring

    def breakdown(self) -> Breakdown:
        """The memory blocks per device now (re-read off the I/O thread; its caches on it). Read-only: shared
        with the accountant's cache."""
        return self.acct.breakdown(fresh=threading.current_thread() is not self._thread)

    def _on_training_thread(self) -> bool:
        return threading.get_ident() == self._train_thread

    def _level(self, bd: Breakdown | None = None, fresh: bool = False,
               allocated: int | None = None, edge: tuple | None = None) -> tuple[int, dict]:
        """Bytes in use on the primary device now, and the blocks that make it up.

        `fresh` re-reads gradients and optimizer state: only on the training
        thread, never inside backward. On a step whose activations are not
        tracked they are derived (tracking.py); `edge` names the phase edge.
        """
        bd = bd or self.acct.breakdown(fresh=fresh)
        blocks = bd.blocks(self.device)
        if self._cuda_index is not None and allocated is None:
            allocated = devices.allocated_and_peak(devices.raw_cuda_stats(self._cuda_index))[0]
        if not self.tracking.tracked:
            blocks["activations"] = self.tracking.derive(blocks, allocated, edge)
        elif edge is not None:
            self.tracking.learn(blocks, allocated, edge)
        if self._cuda_index is not None and allocated is not None:  # (on CUDA it always is, read above)
            four = sum(blocks[k] for k in BLOCK_KEYS if k != "other")
            blocks["other"] = max(allocated - four, 0)
            return allocated, blocks
        return sum(blocks.values()), blocks

    def snapshot(self, fresh: bool | None = None) -> dict:
        """The current sample: the same map that goes on the wire.

        Called from the training thread (the default outside the agent's I/O
        thread), it re-reads every gradient; the I/O thread uses the caches.
        """
        if fresh is None:
            fresh = threading.current_thread() is not self._thread
        bd = self.acct.breakdown(fresh=fresh)
        return self._sample(bd, "edge" if fresh else "tick")

    def _sample(self, bd: Breakdown, source: str, level_blocks: tuple | None = None) -> dict:
        raw = devices.raw_cuda_stats(self._cuda_index) if self._cuda_index is not None else None
        if level_blocks is None:
            level, blocks = self._level(bd, allocated=devices.allocated_and_peak(raw)[0] if raw is not None else None)
        else:
            level, blocks = level_blocks
            blocks = dict(blocks)
        self._seq += 1
        msg = self._base("sample")
        per_device = {dev: bd.blocks(dev) for dev in bd.devices}
        per_device[self.device] = blocks
        msg.update({
            "seq": self._seq,
            "step": self.step,
            "phase": self.phase,
            "device": self.device,
            "blocks": blocks,
            "params_split": {"trainable": bd.trainable, "frozen": bd.frozen, "quantized": bd.quantized},
            "devices": per_device,
            "host": devices.host_stats(),
            "dropped": self.dropped,
            "errors": self.errors,
            "last_error": self.last_error,
            "source": source,  # edge: taken on the training thread; tick: the I/O thread's fallback
            "activations_source": "tracked" if self.tracking.tracked else "derived",
            "gradients_source": "derived" if self.acct.grads_derived else "read",
        })
        if self.tracking.tracked:
            by_module = self.attribution.live()
            if by_module:
                msg["activations_by_module"] = by_module
        if self.batch is not None:
            msg["batch"] = list(self.batch)
        if self._cuda_index is not None:
            stats = devices.cuda_stats(self._cuda_index, raw)  # the same reading as the blocks' "other"
            if stats:
                msg["cuda"] = stats
            nv = devices.nvml_stats(self._cuda_index)
            if nv:
                msg["nvml"] = nv
        # A sample taken inside a phase can see a higher level than its edges (CPU bookkeeping).
        if self.phase in PHASES:
            self._note_level(level, blocks, self.phase)
        self._last_sample_at = time.monotonic()
        return msg

    def _sample_due(self) -> bool:
        return bool(self._sinks) and self.sample_hz > 0 and \
            time.monotonic() - self._last_sample_at >= self._sample_interval()

    def _sample_interval(self) -> float:
        return 1.0 / self.sample_hz if self.sample_hz > 0 else 0.1

    def _offer_sample(self, msg: dict) -> None:
        """Queue a sample in time order with the events (a recording replays them in that order)."""
        if len(self._outbox) >= OUTBOX_LIMIT:
            self.dropped += 1
            return
        self._outbox.append(msg)

    # ------------------------------------------------------------------ phases

    def _edge(self, where: tuple[str, str]) -> None:
        # Five times a step on the training thread, where a launch-bound job feels every microsecond: when
        # nothing changed since the last step's same edge (the usual case) this is a few dict operations
        # and one event. The breakdown comes from the accountant's cache (accounting.py); on an untracked
        # CPU step the edge's blocks are those of the last step's same edge while the breakdown and the
        # derivation behind them are the same objects (`_edge_memo`). `where`: _FORWARD_START and the rest.
        phase, edge = where
        injected = self.injected
        if injected and self.step < injected.get("first_step", 1 << 62):
            return  # a step that began before the agent was injected: its edges are not known
        allocated = None
        if self._cuda_index is not None:
            import torch

            allocated, peak = devices.allocated_and_peak(devices.raw_cuda_stats(self._cuda_index))
            if edge == "end" or phase == "backward":
                ended = "forward" if where is _BACKWARD_START else phase
                peaks = self._this_step.phase_peak
                peaks[ended] = max(peaks.get(ended, 0), peak)
            if edge == "start" and self.reset_peaks:
                torch.cuda.reset_peak_memory_stats(self._cuda_index)
        # Gradients change under zero_grad (before forward), optimizer states in step(): bring the
        # caches up to date there, incrementally, and only on the watched model's training thread.
        acct = self.acct
        if _get_ident() == self._train_thread:
            if where is _FORWARD_START:
                acct.sync_grads(self._this_step.micro_steps == 0)
            elif where is _OPTIMIZER_END:
                acct.sync_optimizers()
            if acct._params_dirty:
                acct.refresh_params()  # (a walk of the parameters)
            elif _monotonic() - acct._params_at > acct.PARAM_REFRESH_S:
                acct.recheck_params()  # (once a second; a walk only when something changed)
        elif acct._params_dirty:
            acct.refresh_params()
        bd = acct.assemble()
        tracking = self.tracking
        memo = self._edge_memo.get(where)
        if (memo is not None and memo[0] is bd and memo[1] == tracking.version and allocated is None
                and not tracking.tracked):
            level, blocks = memo[2], memo[3]
            tracking._last_edge = where  # (what derive() does besides answering)
        else:
            level, blocks = self._level(bd, allocated=allocated, edge=where)
            if allocated is None and not tracking.tracked:
                self._edge_memo[where] = (bd, tracking.version, level, blocks)
        this = self._this_step
        if where is _BACKWARD_START:
            this.forward_end_level = max(this.forward_end_level, level)
            this.forward_end_blocks = blocks
            this.forward_end_by_module = self.attribution.live() if tracking.tracked else None
            self._note_level(level, blocks, "forward")
            self._note_level(level, blocks, "backward")  # backward starts from the forward's level
        else:  # (_note_level, inline: this runs five times a step)
            if allocated is None and level > this.phase_peak.get(phase, -1):
                this.phase_peak[phase] = level
            if level > this.best_level:
                this.best_level, this.best_blocks = level, blocks
        if not self._sinks:
            return
        # The job view compares ranks block by block at the edges. `blocks` is never changed after this
        # (_level builds a new dict; the memo hands the same one to the next step's edge): events share it.
        if len(self._outbox) >= OUTBOX_LIMIT:
            self.dropped += 1  # (as emit_event counts it)
            return
        self._eseq += 1
        now = _time()
        self._outbox.append({"v": SCHEMA_VERSION, "type": "phase", "t": now, "pid": self.pid, "rank": self.rank,
                             "step": self.step, "phase": phase, "edge": edge, "level": level, "blocks": blocks,
                             "eseq": self._eseq})
        hz = self.sample_hz
        if where is not _OPTIMIZER_END and hz > 0 and _monotonic() - self._last_sample_at >= 1.0 / hz:
            # (optimizer end: sampled after the step ends, as the next step's)
            sample = self._sample(bd, "edge", (level, blocks))
            sample["t"] = now  # it measures the edge: the same instant (a replay seeking it finds it)
            self._offer_sample(sample)

    def _note_level(self, level: int, blocks: dict, phase: str) -> None:
        this = self._this_step
        if self._cuda_index is None and level > this.phase_peak.get(phase, -1):
            this.phase_peak[phase] = level
        if level > this.best_level:
            this.best_level, this.best_blocks = level, blocks

    def _grad_hooks_on(self, on: bool) -> None:
        """Per-parameter gradient hooks for a tracked step (training thread, at a forward start, no backward
        running), removed at the next untracked one: their cost is paid on tracked steps only."""
        if on == bool(self._grad_hooks):
            return
        if not on:
            hooks, self._grad_hooks = self._grad_hooks, []
            remove_hooks(hooks)
            return
        model = self.model
        if model is None:
            return
        self._grad_hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in model.parameters()
                            if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook")]

    def _on_grad(self, param) -> None:
        """A gradient landed (tracked steps): count it now, and sample if one is due (inside a long backward)."""
        if _is_compiling():
            return
        try:
            self.acct.note_grad(param)
            if self._sinks and time.monotonic() - self._last_sample_at >= self._sample_interval():
                # Inside a long backward: the next hook we pass takes the sample (caches only).
                self._offer_sample(self._sample(self.acct.assemble(), "edge"))
        except Exception as exc:
            self.report_error("grad-hook", exc)

    def _on_forward_pre(self, module, args, kwargs):
        if _is_compiling():
            return
        try:  # (run_guarded, inline in the per-step hooks: a frame less each)
            self._forward_pre(module, args, kwargs)
        except Exception as exc:
            self.report_error("forward-pre", exc)

    def _forward_pre(self, module, args, kwargs) -> None:
        if not _grad_enabled():
            return  # evaluation / generation: not a training phase
        self._fwd_depth += 1
        if self._fwd_depth > 1:
            return
        self._train_thread = threading.get_ident()
        self._in_opt = None
        if self._this_step.backward_done and not self.acct.optimizers():
            self._finish_step()  # no optimizer in sight: one forward+backward is a step
        if self._step_started is None:
            self._step_started = time.time()
        if not kwargs and args and type(args[0]) is _TENSOR:  # model(x): the common call, without the search
            shape = args[0].shape
            batch = ([shape[0], shape[1]] if len(shape) >= 2 else [shape[0]] if shape else None) or self.batch
        else:
            batch = _batch_shape(args, kwargs) or self.batch
        if batch != self.batch or self._estimate_stale:
            self.batch, self._estimate_stale = batch, False
            key = _estimate_key()(self.model, self.optimizer, batch)
            if key != self._estimated_for:  # model, optimizer or input shape became known or changed
                self._estimated_for = key
                self.run_guarded("estimate", self._update_estimate)
        else:
            self.batch = batch
        tracked = self.tracking.begin_forward(self.step, self.batch, self.saved.enabled)
        if tracked:
            skip_our_frames(self.saved.hot_functions() + self.attribution.hot_functions())
        if tracked or self._grad_hooks:
            self._grad_hooks_on(tracked)
        self.phase = "forward"
        self._edge(_FORWARD_START)
        if tracked and self.saved.enter():
            self.attribution.enter()
        elif tracked:
            self.tracking.tracked = False  # the job disabled saved-tensor hooks: nothing to track here

    def _update_estimate(self) -> None:
        """The estimator's prediction for this model, optimizer and batch (estimator/live.py)."""
        from vramtop_agent.estimator.live import live_estimate

        live_estimate(self.model, self.optimizer, self.batch, self._publish_estimate, key=self._estimated_for)

    def _publish_estimate(self, estimate: dict) -> None:
        self.estimate = estimate
        self._queue_hello()

    def _on_forward_post(self, module, args, output):
        if _is_compiling():
            return
        try:
            self._forward_post(output)
        except Exception as exc:
            self.report_error("forward-post", exc)
        if output is None:  # always_call: forward raised (or returned None). An OOM there is recorded.
            raised = sys.exc_info()[1]
            if raised is not None:
                from vramtop_agent import oom

                oom.forward_raised(self, raised)

    def _on_compiled_forward_post(self, module, args, output):
        """Around an in-place compiled module's call (_CompiledCallWrap): its OOMs are oom.model_hooks'."""
        if _is_compiling():
            return
        self.run_guarded("forward-post", self._forward_post, output)

    def _forward_post(self, output) -> None:
        if self._fwd_depth == 0:
            return
        self._fwd_depth -= 1
        if self._fwd_depth > 0:
            return
        if self.tracking.tracked or self.saved._pushed:  # (what enter() began on a tracked forward)
            self.saved.exit()
            self.attribution.exit()
        self.tracking.forward_done()
        # The first gradient to reach any output marks the start of backward.
        self._bwd_started = False
        for t in (output,) if type(output) is _TENSOR else _output_tensors(output):
            if t.requires_grad:
                fn = t.grad_fn
                if fn is not None:
                    fn.register_prehook(self._on_backward_first)  # a C++ node hook: cheaper than a tensor hook
                else:
                    t.register_hook(self._on_backward_first)  # a leaf output (no node)

    def _on_backward_first(self, grad):
        if not self._bwd_started:  # (a second output's hook: the backward has started already)
            try:
                self._backward_start()
            except Exception as exc:
                self.report_error("backward-start", exc)
        return None

    def _backward_start(self) -> None:
        if self._bwd_started:
            return
        self._bwd_started = True
        self._this_step.micro_steps += 1  # a forward is a micro-step once its backward runs (eval forwards never do)
        self.phase = "backward"
        self._edge(_BACKWARD_START)
        _queue_callback(self._on_backward_end)

    def _on_backward_end(self):
        # Every gradient of this backward has landed and none of its nodes runs any more: read them all once.
        # (a full read on tracked steps: their per-gradient hooks have the storages already)
        try:
            self.acct.read_grads(self.tracking.tracked)
        except Exception as exc:
            self.report_error("grad-read", exc)
        try:
            self._backward_end()
        except Exception as exc:
            self.report_error("backward-end", exc)

    def _backward_end(self) -> None:
        self._edge(_BACKWARD_END)
        self.phase = "idle"
        self._this_step.backward_done = True

    def _on_opt_pre(self, optimizer, args, kwargs):
        if _is_compiling():
            return None
        if len(args) > 1 or kwargs:  # (args[0] is the optimizer: step() with no closure needs no look)
            deferred = defer_to_closure(self, optimizer, args, kwargs)  # step(closure): Lightning, LBFGS
            if deferred is not None:
                return deferred
        try:
            self._opt_pre(optimizer)
        except Exception as exc:
            self.report_error("optimizer-pre", exc)
        return None

    def _adopt(self, optimizer) -> bool:
        """Follow an optimizer that steps the watched model's parameters (and only such a one)."""
        if self.acct.has_optimizer(optimizer):
            return True
        if self.model is None:
            return False
        # Another model's optimizer (a GAN's discriminator, another thread's job) steps as often as ours:
        # its parameters are compared with the model's once, again only when its groups or our parameters
        # change.
        seen = (len(optimizer.param_groups), self.acct._params_version, self._model_gen)
        foreign = self._foreign_optimizers.get(id(optimizer))
        if foreign is not None and foreign[0]() is optimizer and foreign[1] == seen:
            return False
        if not self.acct.steps_params_of_model(optimizer):
            if len(self._foreign_optimizers) >= 64:
                self._foreign_optimizers.clear()
            self._foreign_optimizers[id(optimizer)] = (weakref.ref(optimizer), seen)
            return False  # not ours to read
        self._foreign_optimizers.pop(id(optimizer), None)
        self.attach_optimizer(optimizer)
        return True

    def _opt_pre(self, optimizer) -> None:
        newly = not self.acct.has_optimizer(optimizer)
        if not self._adopt(optimizer):
            return
        if newly and self.injected and "first_step" not in self.injected:
            # Injected: this step began before we knew the optimizer: it and earlier ones are unknown.
            self.injected = {**self.injected, "first_step": self.step + 1}
            self._queue_hello()  # the cached hello would otherwise go on saying nothing is known yet
        if not self._this_step.backward_done or self._in_opt is not None:
            return  # a second optimizer of the same step: counted at its end, no new phase
        self._in_opt = optimizer
        self.phase = "optimizer"
        self._edge(_OPTIMIZER_START)

    def _on_opt_post(self, optimizer, args, kwargs):
        if _is_compiling():
            return
        try:
            self._opt_post(optimizer)
        except Exception as exc:
            self.report_error("optimizer-post", exc)

    def _opt_post(self, optimizer) -> None:
        if optimizer is not self._in_opt:
            if self._on_training_thread() and self.acct.has_optimizer(optimizer):
                self.acct.sync_optimizers()  # its states changed: keep the optimizer block current
            return
        self._in_opt = None
        self._edge(_OPTIMIZER_END)
        self._finish_step()
        if self._sample_due():  # between steps, as the next step's: a replay seeking "step N" lands on it
            self._offer_sample(self._sample(self.acct.assemble(), "edge"))

    def _finish_step(self) -> None:
        now = time.time()
        this = self._this_step
        start = self._last_step_end or self._step_started or now
        got = this.phase_peak.get  # (once a step on the training thread: no comprehension, no key lambda)
        peaks = {"forward": int(got("forward", 0)), "backward": int(got("backward", 0)),
                 "optimizer": int(got("optimizer", 0))}
        peak_phase, peak = "forward", peaks["forward"]
        if peaks["backward"] > peak:
            peak_phase, peak = "backward", peaks["backward"]
        if peaks["optimizer"] > peak:
            peak_phase, peak = "optimizer", peaks["optimizer"]
        blocks = this.best_blocks or dict.fromkeys(BLOCK_KEYS, 0)  # (never changed once made: shared)
        if self._cuda_index is not None:
            blocks = dict(blocks)
            # The allocator knows the peak, not its make-up: the blocks come from the
            # highest edge we measured; the rest of the peak is transient ("other").
            four = sum(blocks[k] for k in BLOCK_KEYS if k != "other")
            blocks["other"] = max(peak - four, 0)
        summary = {
            "type": "step",
            "step": self.step,
            "step_time": now - start if (self._last_step_end or self._step_started) else None,
            "micro_steps": this.micro_steps,
            "batch": list(self.batch) if self.batch else None,
            "peaks": peaks,
            "end_of_forward": int(this.forward_end_level),
            "backward_spike": max(peaks["backward"] - int(this.forward_end_level), 0),
            "peak": peak,
            "peak_phase": peak_phase,
            "peak_blocks": blocks,
            "eof_blocks": this.forward_end_blocks or dict.fromkeys(BLOCK_KEYS, 0),
            "activations_source": "tracked" if self.tracking.step_tracked else "derived",
            "gradients_source": "derived" if self.acct.grads_derived else "read",  # (at its last backward end)
        }
        if this.forward_end_by_module:
            summary["eof_activations_by_module"] = this.forward_end_by_module
        check = self.tracking.take_check()
        if check is not None:
            summary["derived_check"] = check  # the derivation, checked against this tracked step
        if not self.injected or self.step >= self.injected.get("first_step", 1 << 62):
            full = self.emit_event(summary)  # (the queued message: the summary kept is the one sent)
            if full is None:
                full = self._base("step")
                full.update(summary)
            self.steps.append(full)
        self.step += 1
        self.phase = "idle"
        self._last_step_end = now
        self._this_step = StepState()
        self.tracking.end_step()

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        """Hand what the training thread queued to the sinks; sample only when it has not for a second."""
        interval = self._sample_interval()
        last_hello = 0.0
        while not self._stop.is_set():
            try:
                now = time.time()
                if now - last_hello >= 1.0:
                    # Re-sent every second: a viewer that joins late learns who this is.
                    self._resend_hello()
                    last_hello = now
                if self.sample_hz > 0:  # (the training thread's edge samples then never wait on /proc or the driver)
                    devices.renew_slow_stats(self._cuda_index, interval)
                sample, self._pending_sample = self._pending_sample, None
                if sample is None and self.sample_hz > 0 and \
                        time.monotonic() - self._last_sample_at >= max(FALLBACK_TICK_S, interval):
                    # The training thread is stuck in one op (or not training): show it is alive.
                    sample = self.run_guarded("sampler", self._tick_sample)
                if self.injected and "first_step" not in self.injected:
                    sample = None  # injected: no sample until the optimizer is known (its states would read 0)
                self._flush(sample)  # events first, then the sample: one batch per tick
            except Exception as exc:  # the thread must outlive any bug
                self.report_error("sampler", exc)
            self._stop.wait(interval)
        self._flush(self._pending_sample)

    def _tick_sample(self) -> dict:
        """A sample from the caches only: no `.grad`, no optimizer state, no parameter walk."""
        return self._sample(self.acct.assemble(), "tick")

    def _resend_hello(self) -> None:
        """The last hello again (a copy): rebuilding it walks the model, so that happens rarely."""
        last = self._last_hello
        if last is None or time.monotonic() - self._hello_built_at > HELLO_REBUILD_S:
            self._queue_hello()
            return
        msg = dict(last)
        msg.pop("eseq", None)
        self.emit_event(msg)

    def _flush(self, sample: dict | None = None) -> None:
        """Hand the queued events (and this tick's sample) to every sink in one go (sinks.py)."""
        batch = []
        while self._outbox:
            try:
                batch.append(self._outbox.popleft())
            except IndexError:
                break
        if sample is not None:
            batch.append(sample)
        if not batch:
            return
        for sink in self._sinks:
            try:
                sink.send_many(batch)
            except Exception as exc:
                self.report_error(f"sink-{sink_name(sink)}", exc)

    # ------------------------------------------------------------------ lifecycle

    def stop(self, reason: str = "stopped", *, all_holds: bool = False) -> None:
        """Remove every hook, send a last message, close sockets and files.

        An agent that watch() handed out more than once (nested watch() of one model) stops at its
        last stop(); `all_holds` stops it at once (interpreter exit, a polite signal).
        """
        if self._closed:
            return
        if self._holds > 1 and not all_holds:
            self._holds -= 1
            return
        if os.getpid() != self.pid:  # a forked child: the files, socket and recording are the parent's
            self.disown_after_fork()
            return
        self._closed = True
        self.saved.exit()
        self.attribution.exit()
        remove_hooks(self._hooks)
        self._hooks = []
        self._grad_hooks_on(False)
        self.emit_event({"type": "bye", "reason": reason})
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._flush()
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                pass
        from vramtop_agent import discovery, lifecycle

        if self._info_written:
            discovery.remove_files(self._info)
        lifecycle.release_polite_signals()  # the job's signals are its own again

    close = stop

    def rejoin(self, optimizer=None, record: str | None = None) -> Agent:
        """watch() of a model this agent already watches: the same agent, held once more (lifecycle.py)."""
        self._holds += 1
        if optimizer is not None and self.optimizer is None:
            self.attach_optimizer(optimizer)
        from vramtop_agent import lifecycle

        if record and self.recorder is None:
            self._start_recorder(record)
            if self.recorder is not None:
                lifecycle.stop_on_polite_signals(self)
            if self._sinks and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vramtop-agent", daemon=True)
                self._thread.start()
        return self

    def disown_after_fork(self) -> None:
        """In a forked child: drop the parent's sinks and files unclosed and untouched, unhook the child's copy."""
        if self.pid == os.getpid():
            return
        self._closed = True
        from vramtop_agent import lifecycle

        lifecycle.keep_forever(self._sinks)  # never closed nor collected here: they flush or unbind the parent's
        self._sinks = []
        self._info_written = False
        self._outbox.clear()  # no sampler thread here; its Event's lock may have been held at fork: untouched
        remove_hooks(self._hooks)  # only this process's copy of the module
        self._hooks = []
        self._grad_hooks_on(False)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            from vramtop_agent import oom

            oom.on_exception(self, exc)  # an OOM on its way out is recorded before the stop
        self.stop("exception" if exc_type else "finished")


def _is_model_hook(handle: HookHandle) -> bool:
    """A hook handle on the watched model (marked when registered): it goes when another model is attached."""
    return getattr(handle, "_vramtop_model", False)


def _safe_argv() -> list[str]:
    from vramtop_agent.discovery import safe_argv  # valid UTF-8, bounded: one odd byte must not sink the hello

    return safe_argv()


class _ModelHook:
    """A hook handle on the watched model, marked as such (`_is_model_hook`)."""

    _vramtop_model = True

    def __init__(self, handle: HookHandle) -> None:
        self._handle = handle

    def remove(self) -> None:
        self._handle.remove()


class _CompiledCallWrap:
    """Our forward pre/post hooks around an in-place compiled module's call; `remove()` undoes it."""

    _vramtop_model = True  # always a hook of the watched model (_is_model_hook)

    def __init__(self, module, pre, post):
        self._module = weakref.ref(module)
        inner = module._compiled_call_impl
        self._inner = inner

        def call(*args, **kwargs):
            pre(module_ref(), args, kwargs)
            out = None
            try:
                out = inner(*args, **kwargs)
                return out
            finally:
                post(module_ref(), args, out)

        module_ref = self._module
        self._call = call
        module._compiled_call_impl = call

    def remove(self) -> None:
        m = self._module()
        if m is not None and getattr(m, "_compiled_call_impl", None) is self._call:
            m._compiled_call_impl = self._inner


def _batch_shape(args, kwargs) -> list[int] | None:
    """batch x seq_len from the root module's input (input_ids, inputs_embeds or the first tensor)."""
    cand = None
    for name in ("input_ids", "inputs_embeds", "x", "input"):
        if name in kwargs and hasattr(kwargs[name], "shape"):
            cand = kwargs[name]
            break
    if cand is None:
        for a in args:
            if hasattr(a, "shape"):
                cand = a
                break
    if cand is None or len(cand.shape) == 0:
        return None
    shape = list(cand.shape)
    return [int(shape[0]), int(shape[1])] if len(shape) >= 2 else [int(shape[0])]


def _output_tensors(output: Any, depth: int = 0) -> list:
    """Tensors in a model output (tensor, tuple, dict or HF ModelOutput).

    Once a forward, on the training thread: each item's type is asked first. (An HF output holds a loss,
    logits and often a cache object or None; a `hasattr` that misses raises an AttributeError inside.)"""
    tensor = _TENSOR or _bind_tensor_type()
    if isinstance(output, tensor):
        return [output]
    if depth > 3:
        return []
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        items: Any = output.values()
    elif isinstance(output, (list, tuple)):
        items = output
    else:
        return []
    out = []
    for item in items:
        if isinstance(item, tensor):
            out.append(item)
        elif isinstance(item, (dict, list, tuple)):
            out.extend(_output_tensors(item, depth + 1))
    return out


def _bind_tensor_type() -> type:
    import torch

    return torch.Tensor
