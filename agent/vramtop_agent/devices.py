"""What the device and the host say: CUDA allocator stats, NVML, process RSS.

Everything here is optional: without CUDA there are no allocator stats,
without an NVIDIA driver no NVML. Absent values are left out of the sample,
never filled with zeros.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from vramtop_agent import nvml


def raw_cuda_stats(device_index: int) -> dict:
    """The allocator's nested stats dict, as the C++ side builds it.

    torch.cuda.memory_allocated() and friends flatten and sort all ~300
    counters into an OrderedDict on every call; at phase edges on the
    training thread that Python work is most of our cost, so read the
    nested dict once and pick the few numbers we need.
    """
    import torch

    return torch.cuda.memory_stats_as_nested_dict(device_index)


def _stat(raw: dict, *path, default=0) -> int:
    node: Any = raw  # torch's nested stats dict: dicts down to ints
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return int(node)


def allocated_and_peak(raw: dict) -> tuple[int, int]:
    return _stat(raw, "allocated_bytes", "all", "current"), _stat(raw, "allocated_bytes", "all", "peak")


def cuda_stats(device_index: int, raw: dict | None = None) -> dict | None:
    """torch.cuda.memory_stats of one device, reduced to what the view needs."""
    import torch

    if not torch.cuda.is_available():
        return None
    raw = raw if raw is not None else raw_cuda_stats(device_index)
    return {
        "allocated": _stat(raw, "allocated_bytes", "all", "current"),
        "reserved": _stat(raw, "reserved_bytes", "all", "current"),
        "active": _stat(raw, "active_bytes", "all", "current"),
        "inactive_split": _stat(raw, "inactive_split_bytes", "all", "current"),
        "alloc_retries": _stat(raw, "num_alloc_retries"),
        "ooms": _stat(raw, "num_ooms"),
        "peak_allocated": _stat(raw, "allocated_bytes", "all", "peak"),
        "peak_reserved": _stat(raw, "reserved_bytes", "all", "peak"),
    }


SLOW_STATS_TTL = 1.0  # NVML and /proc are read at most once a second: each read hands the GIL around
_slow_cache: dict = {}


def _cached(key, fn):
    import time

    now = time.monotonic()
    hit = _slow_cache.get(key)
    if hit is not None and now - hit[0] < SLOW_STATS_TTL:
        return hit[1]
    value = fn()
    _slow_cache[key] = (now, value)
    return value


def renew_slow_stats(device_index: int | None, tick: float) -> None:
    """I/O thread, every `tick` seconds: read what a sample takes from the slow sources (/proc, the driver)
    within two ticks of its cache entry expiring (one late tick still comes in time), so a sample taken at
    a phase edge on the training thread finds it cached: read about as often as before, once a second,
    but not on the training thread."""
    import time

    now = time.monotonic()
    wanted: list[tuple[Any, Callable[[], dict | None]]] = [("host", _host_stats)]
    if device_index is not None:
        wanted.append((("nvml", device_index, None), lambda: _nvml_stats(device_index, None)))
    for key, fn in wanted:
        hit = _slow_cache.get(key)
        if hit is None or now - hit[0] >= SLOW_STATS_TTL - 2 * tick:
            try:
                _slow_cache[key] = (now, fn())
            except Exception:
                pass  # (the sample that needs it reads it again, and reports what fails there)


def nvml_stats(device_index: int, pid: int | None = None) -> dict | None:
    """Device total/used and this process's use, from the driver (cached for a second)."""
    return _cached(("nvml", device_index, pid), lambda: _nvml_stats(device_index, pid))


def _nvml_stats(device_index: int, pid: int | None = None) -> dict | None:
    handle = nvml.handle_for_torch_index(device_index)
    if handle is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        total, used = nvml.memory(handle)
    except Exception:
        return None
    out: dict = {"total": total, "used": used}
    try:
        for _, proc_pid, proc_used in nvml.processes(handle, ("compute",)):
            if proc_pid == pid and proc_used is not None:
                out["process_used"] = proc_used
    except Exception:
        pass  # containers often hide other pids; device numbers still stand
    return out


def host_stats() -> dict:
    """Process RSS and host memory (cached for a second)."""
    return dict(_cached("host", _host_stats))


def _host_stats() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"rss": int(_this_process().memory_info().rss), "total": int(vm.total), "available": int(vm.available)}


_PROCESS: list = [None, None]  # (pid, psutil.Process): made once per process (it reads /proc/<pid>/stat)


def _this_process():
    import psutil

    pid = os.getpid()
    if _PROCESS[0] != pid:  # (a forked child gets its own)
        _PROCESS[:] = [pid, psutil.Process(pid)]
    return _PROCESS[1]


@functools.lru_cache(maxsize=16)
def device_name(device: str) -> str | None:
    if device.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(int(device.split(":")[1]) if ":" in device else 0)
        except Exception:
            return None
    try:
        import platform

        return platform.processor() or platform.machine()
    except Exception:
        return None


@functools.lru_cache(maxsize=16)
def device_total(device: str) -> int | None:
    if device.startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.get_device_properties(int(device.split(":")[1]) if ":" in device else 0).total_memory)
        except Exception:
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None
