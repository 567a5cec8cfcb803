"""What the device and the host say: CUDA allocator stats, NVML, process RSS.

Everything here is optional: without CUDA there are no allocator stats,
without an NVIDIA driver no NVML. Absent values are left out of the sample,
never filled with zeros.
"""

from __future__ import annotations

import os

_NVML_FAILED = False
_NVML_HANDLES: dict = {}


def cuda_stats(device_index: int) -> dict | None:
    """torch.cuda.memory_stats of one device, reduced to what the view needs."""
    import torch

    if not torch.cuda.is_available():
        return None
    s = torch.cuda.memory_stats(device_index)
    return {
        "allocated": int(s.get("allocated_bytes.all.current", 0)),
        "reserved": int(s.get("reserved_bytes.all.current", 0)),
        "active": int(s.get("active_bytes.all.current", 0)),
        "inactive_split": int(s.get("inactive_split_bytes.all.current", 0)),
        "alloc_retries": int(s.get("num_alloc_retries", 0)),
        "ooms": int(s.get("num_ooms", 0)),
        "peak_allocated": int(s.get("allocated_bytes.all.peak", 0)),
        "peak_reserved": int(s.get("reserved_bytes.all.peak", 0)),
    }


def _nvml_handle(device_index: int):
    """NVML handle of the CUDA device torch calls `device_index` (respecting CUDA_VISIBLE_DEVICES)."""
    global _NVML_FAILED
    if _NVML_FAILED:
        return None
    if device_index in _NVML_HANDLES:
        return _NVML_HANDLES[device_index]
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        # Map through the UUID: torch's index i is not NVML's index i under CUDA_VISIBLE_DEVICES.
        handle = None
        try:
            uuid = str(torch.cuda.get_device_properties(device_index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + uuid) if not uuid.startswith("GPU-") else uuid)
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        _NVML_HANDLES[device_index] = handle
        return handle
    except Exception:
        _NVML_FAILED = True
        return None


def nvml_stats(device_index: int, pid: int | None = None) -> dict | None:
    """Device total/used and this process's use, from the driver."""
    handle = _nvml_handle(device_index)
    if handle is None:
        return None
    import pynvml

    pid = os.getpid() if pid is None else pid
    out: dict = {}
    try:
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        out["total"] = int(mem.total)
        out["used"] = int(mem.used)
    except Exception:
        return None
    try:
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                out["process_used"] = int(proc.usedGpuMemory)
    except Exception:
        pass  # containers often hide other pids; device numbers still stand
    return out


def host_stats() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"rss": int(psutil.Process().memory_info().rss), "total": int(vm.total), "available": int(vm.available)}


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
