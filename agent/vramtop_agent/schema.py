"""The wire schema: the one definition of every frame an agent publishes.

A frame is a single ZeroMQ part: one topic byte followed by a msgpack map.
Single-part frames let a viewer subscribe to samples with ZMQ_CONFLATE (only
the newest sample matters) and to events without it (every step summary
matters). The same maps are the rows of a recording.

Topics:
  b"S"  sample  - the periodic state (default 10 Hz); only the latest matters.
  b"E"  events  - hello, phase, step, error, oom, bye; each carries `eseq`, a
                  per-agent counter, so a viewer can count the ones it missed.

Every map carries `v` (SCHEMA_VERSION), `type`, `t` (unix seconds), `pid` and
`rank`. A reader accepts frames whose `v` is <= its own version (fields are
only ever added within a major version) and rejects newer ones with a clear
message. All sizes are integers in bytes. Fields that do not exist on a device
(allocator stats on CPU, NVML without a driver) are absent, never zero.

Frames come from another process (or another machine): `validate()` is strict
about what the viewer relies on, so a hostile or broken frame is rejected
rather than reaching the view. Numbers must be finite; sizes must be >= 0;
`cuda` must carry `allocated` and `reserved`; `cmdline` is a list of strings
and `batch` a short list of integers. Unknown fields are ignored (they are
how the schema grows).

The fields of each type are documented in docs/wire-schema.md and checked by
`validate()` below; the viewer runs every frame through it.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from vramtop_agent.vocabulary import BLOCK_KEYS, PHASES  # noqa: F401  (re-exported: the wire's names)

SCHEMA_VERSION = 1

TOPIC_SAMPLE = b"S"
TOPIC_EVENT = b"E"

# A frame larger than this is refused by the viewer (and by ZMQ_MAXMSGSIZE).
MAX_FRAME_BYTES = 4 * 1024 * 1024

class SchemaError(ValueError):
    """A frame that is not a valid vramtop message."""


# --- encoding -----------------------------------------------------------------


def encode(msg: dict[str, Any]) -> bytes:
    """Topic byte + msgpack body. Never pickle: frames cross process trust boundaries."""
    topic = TOPIC_SAMPLE if msg.get("type") == "sample" else TOPIC_EVENT
    return topic + msgpack.packb(msg, use_bin_type=True)


# Events queued during one sampler tick travel as one frame (a msgpack array of
# event maps): every send hands the GIL to libzmq and back, and on a training
# thread that is busy launching kernels each hand-off costs it time.
BATCH_TARGET_BYTES = 1024 * 1024


def encode_events(msgs: list[dict[str, Any]], refused: list[str] | None = None) -> list[bytes]:
    """Event maps -> as few E frames as fit BATCH_TARGET_BYTES each (order kept).

    One event that msgpack cannot encode (text with undecodable bytes, an odd object) never costs the
    batch: it is sent with such text replaced (U+FFFD) and objects as their str(), or, failing that,
    left out with a reason appended to `refused`.
    """
    if not msgs:
        return []
    try:  # the usual batch: one C call for all of it (the I/O thread holds the GIL while it encodes)
        whole = msgpack.packb(msgs, use_bin_type=True)
    except Exception:
        whole = None
    if whole is not None and len(whole) <= BATCH_TARGET_BYTES:
        return [TOPIC_EVENT + whole]  # (an array of the event maps: what _batch_frame builds)
    frames: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for msg in msgs:
        try:
            packed = msgpack.packb(msg, use_bin_type=True)
        except Exception:
            try:
                packed = msgpack.packb(_encodable(msg), use_bin_type=True)
            except Exception as exc:
                if refused is not None:
                    refused.append(f"{msg.get('type')!r} event: {type(exc).__name__}: {exc}"[:300])
                continue
        if chunk and size + len(packed) > BATCH_TARGET_BYTES:
            frames.append(_batch_frame(chunk))
            chunk, size = [], 0
        chunk.append(packed)
        size += len(packed)
    if chunk:
        frames.append(_batch_frame(chunk))
    return frames


def _encodable(obj: Any, depth: int = 0) -> Any:
    """A copy msgpack can encode: str as valid UTF-8, unknown objects as their str(), bounded depth."""
    if isinstance(obj, str):  # lone surrogates (undecodable bytes in argv, paths) cannot be UTF-8
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in obj)
    if obj is None or isinstance(obj, (bool, int, float, bytes)):
        return obj
    if depth > 32:
        return None
    if isinstance(obj, dict):
        return {_encodable(k, depth + 1): _encodable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encodable(v, depth + 1) for v in obj]
    return _encodable(str(obj), depth + 1)


def _batch_frame(packed: list[bytes]) -> bytes:
    packer = msgpack.Packer(use_bin_type=True)
    return TOPIC_EVENT + packer.pack_array_header(len(packed)) + b"".join(packed)


def decode_many(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse a frame that holds one message or a batch of events.

    Returns (valid messages in order, one reason per rejected item). A frame
    that is not even msgpack raises SchemaError, like decode().
    """
    body = _body(frame, max_bytes)
    if not isinstance(body[1], list):
        return [_check(body[0], body[1])], []
    if body[0] != TOPIC_EVENT:
        raise SchemaError("a batch on the sample topic")
    good: list[dict[str, Any]] = []
    bad: list[str] = []
    for item in body[1]:
        try:
            msg = _check(TOPIC_EVENT, item)
            if msg["type"] == "sample":
                raise SchemaError("sample inside an event batch")
            good.append(msg)
        except SchemaError as exc:
            bad.append(str(exc))
    return good, bad


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Parse and validate a frame holding one message; raise SchemaError with a one-line reason."""
    topic, msg = _body(frame, max_bytes)
    if isinstance(msg, list):
        raise SchemaError("a batch of events: read it with decode_many()")
    return _check(topic, msg)


def _check(topic: bytes, msg: Any) -> dict[str, Any]:
    validate(msg)
    if (topic == TOPIC_SAMPLE) != (msg["type"] == "sample"):
        raise SchemaError(f"{msg['type']} frame on topic {topic!r}")
    return msg


def _body(frame: bytes, max_bytes: int) -> tuple[bytes, Any]:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise SchemaError("frame is not bytes")
    frame = bytes(frame)
    if len(frame) > max_bytes:
        raise SchemaError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte cap")
    if len(frame) < 2:
        raise SchemaError("frame too short")
    topic, body = frame[:1], frame[1:]
    if topic not in (TOPIC_SAMPLE, TOPIC_EVENT):
        raise SchemaError(f"unknown topic {topic!r}")
    return topic, unpack_strict(body)


def unpack_strict(body: bytes) -> Any:
    """msgpack bytes -> the object, refusing extension types and non-string map keys; raises SchemaError.

    The one decoder for bytes from outside this process (frames, recorded rows): msgpack extension
    hooks are how deserialisers get tricked, so none is honoured.
    """
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except SchemaError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise SchemaError(f"not msgpack: {type(exc).__name__}") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise SchemaError(f"msgpack extension type {code} not allowed")


# --- validation ---------------------------------------------------------------

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_OPT_NUM = (int, float, type(None))
_MAP = (dict,)
_OPT_MAP = (dict, type(None))
_LIST = (list, tuple)
_OPT_LIST = (list, tuple, type(None))

_COMMON = {"v": _INT, "type": _STR, "t": _NUM, "pid": _INT, "rank": _INT}

# field -> (accepted types, required)
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "sample": {
        "seq": (_INT, True),
        "step": (_INT, True),
        "phase": (_STR, True),          # forward | backward | optimizer | idle
        "device": (_STR, True),         # primary device, e.g. "cuda:0" or "cpu"
        "blocks": (_MAP, True),         # BLOCK_KEYS -> bytes, on the primary device
        "params_split": (_MAP, True),   # trainable / frozen / quantized -> bytes
        "devices": (_MAP, True),        # device -> {BLOCK_KEYS -> bytes}
        "cuda": (_MAP, False),          # allocator stats of the primary CUDA device
        "nvml": (_MAP, False),          # total / used / process_used of that device
        "host": (_MAP, True),           # rss / total / available
        "batch": (_OPT_LIST, False),    # [batch, seq_len] of the last forward input
        "dropped": (_INT, True),        # frames the agent could not queue
        "errors": (_INT, True),         # exceptions caught inside the agent
        "last_error": (_OPT_STR, False),
        "source": (_STR, False),        # edge: taken on the training thread | tick: the 1 Hz fallback
        "activations_source": (_STR, False),  # tracked (saved-tensor hooks) | derived (tracking.py)
        "gradients_source": (_STR, False),  # read (every .grad) | derived (accounting.read_grads)
        "activations_by_module": (_MAP, False),  # top-level module -> bytes saved, on tracked steps
    },
    "hello": {
        "eseq": (_INT, True),
        "host": (_STR, True),
        "node": (_STR, False),
        "cmdline": (_LIST, True),
        "start_time": (_NUM, True),
        "local_rank": (_INT, False),
        "world_size": (_INT, False),
        "agent_version": (_STR, True),
        "torch_version": (_OPT_STR, False),
        "device": (_STR, True),
        "device_name": (_OPT_STR, False),
        "device_total": (_OPT_INT, False),
        "model": (_OPT_MAP, False),      # class, params_total, params_trainable, dtype, method, ...
        "optimizer": (_OPT_MAP, False),  # class, state_dtype
        "sample_hz": (_NUM, True),
        "estimate": (_OPT_MAP, False),   # the estimator's prediction for this run
        "training": (_OPT_MAP, False),   # set by an integration: batch, grad_accum, grad_ckpt, precision, optim, ...
        "injected": (_OPT_MAP, False),   # `at`: the agent was injected into a running job (vramtop attach PID)
    },
    "phase": {
        "eseq": (_INT, True),
        "step": (_INT, True),
        "phase": (_STR, True),
        "edge": (_STR, True),            # start | end
        "level": (_INT, True),           # bytes allocated (tracked on CPU) at the edge
        "blocks": (_MAP, False),         # BLOCK_KEYS at the edge (the blocks that make up `level`)
    },
    "step": {
        "eseq": (_INT, True),
        "step": (_INT, True),
        "step_time": (_OPT_NUM, True),   # seconds since the previous step ended
        "micro_steps": (_INT, True),     # forward/backward passes in this optimizer step
        "batch": (_OPT_LIST, False),
        "peaks": (_MAP, True),           # PHASES -> peak bytes within the phase
        "end_of_forward": (_INT, True),  # level when backward starts
        "backward_spike": (_INT, True),  # backward peak - end_of_forward (>= 0)
        "peak": (_INT, True),
        "peak_phase": (_STR, True),
        "peak_blocks": (_MAP, True),     # BLOCK_KEYS at the step's peak
        "eof_blocks": (_MAP, False),     # BLOCK_KEYS when the forward ended (end_of_forward)
        "eof_activations_by_module": (_MAP, False),  # top-level module -> activation bytes then (tracked steps)
        "activations_source": (_STR, False),  # tracked | derived, as in samples
        "gradients_source": (_STR, False),  # read | derived, at the step's last backward end
        "derived_check": (_MAP, False),  # tracked vs derived activations, on a tracked step that checked them
    },
    "error": {
        "eseq": (_INT, True),
        "where": (_STR, True),
        "message": (_STR, True),
        "count": (_INT, True),
        "trace": (_STR, False),          # the end of the Python traceback
    },
    "oom": {
        "eseq": (_INT, True),
        "step": (_INT, True),
        "phase": (_STR, True),
        "requested": (_OPT_INT, True),
        "message": (_STR, True),
        "blocks": (_MAP, True),
        "cuda": (_MAP, False),
        "segments": (_LIST, False),
        "exception": (_STR, False),      # the exception's class name
        "where": (_STR, False),          # forward | exit | top: which of the agent's hooks saw it
        "device": (_STR, False),
        "batch": (_OPT_LIST, False),
        "memory_stats": (_MAP, False),   # torch.cuda.memory_stats, numbers only
        "memory_viz": (_STR, False),     # path of PyTorch's memory_viz snapshot beside the recording
    },
    "bye": {
        "eseq": (_INT, True),
        "reason": (_STR, True),
    },
    "creep": {                           # memory growing step after step (vramtop_agent.creep); no eseq
        "series": (_STR, True),          # allocated | reserved | rss
        "slope": (_INT, True),           # bytes per step
        "step": (_INT, True),            # the step at which the creep was first seen
        "since_step": (_INT, True),      # first step of the window the slope was fitted on
        "level": (_INT, True),           # the series' value at `step`
        "limit": (_OPT_INT, False),      # the card (allocated, reserved) or host RAM (rss)
        "steps_to_full": (_OPT_INT, False),
        "seconds_to_full": (_OPT_NUM, False),
    },
}


def validate(msg: Any) -> dict[str, Any]:
    """Check a decoded map against the schema. Returns it; raises SchemaError."""
    if not isinstance(msg, dict):
        raise SchemaError("message is not a map")
    for key, types in _COMMON.items():
        if key not in msg:
            raise SchemaError(f"missing field {key!r}")
        if not isinstance(msg[key], types) or isinstance(msg[key], bool):
            raise SchemaError(f"field {key!r} has type {type(msg[key]).__name__}")
    if not math.isfinite(msg["t"]):
        raise SchemaError("field 't' is not finite")
    if msg["v"] > SCHEMA_VERSION:
        raise SchemaError(
            f"schema version {msg['v']} is newer than this vramtop's ({SCHEMA_VERSION}): upgrade vramtop"
        )
    if msg["v"] < 1:
        raise SchemaError(f"invalid schema version {msg['v']}")
    kind = msg["type"]
    fields = _FIELDS.get(kind)
    if fields is None:
        raise SchemaError(f"unknown message type {kind[:40]!r}")
    for key, (types, required) in fields.items():
        if key not in msg:
            if required:
                raise SchemaError(f"{kind}: missing field {key!r}")
            continue
        value = msg[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise SchemaError(f"{kind}: field {key!r} has type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(f"{kind}: field {key!r} is not finite")
    if "cmdline" in fields and not all(isinstance(c, str) for c in msg.get("cmdline") or ()):
        raise SchemaError(f"{kind}: cmdline holds a non-string")
    batch = msg.get("batch")
    if isinstance(batch, (list, tuple)) and (
            len(batch) > 8 or not all(isinstance(b, int) and not isinstance(b, bool) for b in batch)):
        raise SchemaError(f"{kind}: batch is not a short list of integers")
    if kind == "sample":
        _check_blocks(msg["blocks"], "sample.blocks")
        for dev, blocks in msg["devices"].items():
            if not isinstance(dev, str):
                raise SchemaError("sample.devices: key is not a string")
            _check_blocks(blocks, f"sample.devices[{dev[:20]}]")
        _check_sizes(msg["params_split"], "sample.params_split")
        _check_sizes(msg["host"], "sample.host")
        for key in ("cuda", "nvml"):
            if key in msg:
                _check_sizes(msg[key], f"sample.{key}")
        if "cuda" in msg:
            for key in ("allocated", "reserved"):
                if not isinstance(msg["cuda"].get(key), int) or isinstance(msg["cuda"][key], bool):
                    raise SchemaError(f"sample.cuda: {key} is missing or not an integer")
    elif kind == "phase":
        if "blocks" in msg:
            _check_blocks(msg["blocks"], "phase.blocks")
    elif kind == "step":
        _check_blocks(msg["peak_blocks"], "step.peak_blocks")
        if "eof_blocks" in msg:
            _check_blocks(msg["eof_blocks"], "step.eof_blocks")
        _check_sizes(msg["peaks"], "step.peaks")
    elif kind == "oom":
        _check_blocks(msg["blocks"], "oom.blocks")
    elif kind == "creep":
        _check_sizes({k: msg.get(k) for k in ("level", "limit", "steps_to_full")}, "creep")
    return msg


def _check_blocks(blocks: Any, where: str) -> None:
    if not isinstance(blocks, dict):
        raise SchemaError(f"{where} is not a map")
    missing = [k for k in BLOCK_KEYS if k not in blocks]
    if missing:
        raise SchemaError(f"{where}: missing {', '.join(missing)}")
    _check_sizes(blocks, where)


def _check_sizes(sizes: Any, where: str) -> None:
    if not isinstance(sizes, dict):
        raise SchemaError(f"{where} is not a map")
    for key, value in sizes.items():
        if not isinstance(key, str):
            raise SchemaError(f"{where}: key is not a string")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where}.{key[:30]} is not a number")
        if not 0 <= value < math.inf:  # also false for NaN
            raise SchemaError(f"{where}.{key[:30]} is not a size (negative or not finite)")
