"""NVML (pynvml, from nvidia-ml-py): the one place vramtop asks the NVIDIA driver about GPU memory.

Two users, one layer:
- the agent (devices.py) reads its own CUDA device: total, used, and the
  memory the driver charges to this process. It opens NVML once and keeps it
  open; the device is found through its UUID, as torch numbers devices after
  CUDA_VISIBLE_DEVICES and NVML does not.
- the viewer (`vramtop` before any agent runs, `vramtop ls`) lists every GPU
  of the machine with its processes: `list_gpus()` opens NVML for one reading
  and closes it, and never raises (a report whose `error` says why).

Everything NVML does not tell is absent (None), never zero.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

_PROCESS_LISTS = (("compute", "nvmlDeviceGetComputeRunningProcesses"),
                  ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"))

_torch_handles: dict = {}  # torch CUDA index -> NVML handle (the agent's device)
_torch_handles_failed = False  # no driver, no pynvml: not asked again


@dataclass
class GpuProcess:
    pid: int
    used: int | None  # bytes; None when the driver does not tell (some containers, MIG)
    name: str = ""
    kind: str = "compute"


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str | None
    total: int
    used: int
    util_gpu: int | None = None  # percent
    util_mem: int | None = None
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass
class GpuReport:
    gpus: list[Gpu]
    error: str | None = None  # one line: why there is nothing to show
    driver: str | None = None
    taken_at: float = 0.0


# ---------------------------------------------------------------------- reading one device


def memory(handle) -> tuple[int, int]:
    """(total, used) bytes of the device."""
    import pynvml

    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return int(mem.total), int(mem.used)


def processes(handle, kinds: tuple[str, ...] = ("compute", "graphics")) -> Iterator[tuple[str, int, int | None]]:
    """(kind, pid, bytes or None) of every process on the device; a list the driver refuses is skipped."""
    import pynvml

    for kind, fn in _PROCESS_LISTS:
        if kind not in kinds:
            continue
        try:
            procs = getattr(pynvml, fn)(handle)
        except Exception:  # not supported, or hidden (containers): the device numbers still stand
            continue
        for proc in procs:
            used = getattr(proc, "usedGpuMemory", None)
            yield kind, int(proc.pid), (int(used) if isinstance(used, int) and used >= 0 else None)


def handle_for_torch_index(device_index: int):
    """NVML handle of the CUDA device torch calls `device_index` (NVML kept open); None without NVML."""
    global _torch_handles_failed
    if _torch_handles_failed:
        return None
    if device_index in _torch_handles:
        return _torch_handles[device_index]
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        # Map through the UUID: torch's index i is not NVML's index i under CUDA_VISIBLE_DEVICES.
        try:
            uuid = str(torch.cuda.get_device_properties(device_index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + uuid) if not uuid.startswith("GPU-") else uuid)
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        _torch_handles[device_index] = handle
        return handle
    except Exception:
        _torch_handles_failed = True
        return None


# ---------------------------------------------------------------------- the machine's GPUs (viewer)


def as_text(value) -> str:
    """NVML strings are bytes in older pynvml releases."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def process_command_line(pid: int) -> str:
    try:
        import psutil

        p = psutil.Process(pid)
        cmd = p.cmdline()
        return " ".join(cmd) if cmd else p.name()
    except Exception:
        return "?"  # another container's pid namespace, or already gone


def list_gpus() -> GpuReport:
    """Every GPU NVML sees, with its processes. Never raises."""
    now = time.time()
    try:
        import pynvml
    except ImportError:
        return GpuReport([], "NVML is not available here (pip install nvidia-ml-py)", taken_at=now)
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return GpuReport([], f"no NVIDIA driver on this machine (NVML: {exc})", taken_at=now)
    try:
        try:
            driver = as_text(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        gpus = [_read_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
        return GpuReport(gpus, None if gpus else "NVML sees no GPU on this machine", driver, now)
    except Exception as exc:
        return GpuReport([], f"NVML failed: {exc}", taken_at=now)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _read_gpu(pynvml, index: int) -> Gpu:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    total, used = memory(handle)
    try:
        uuid = as_text(pynvml.nvmlDeviceGetUUID(handle))
    except Exception:
        uuid = None
    gpu = Gpu(index, as_text(pynvml.nvmlDeviceGetName(handle)), uuid, total, used)
    try:
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        gpu.util_gpu, gpu.util_mem = int(util.gpu), int(util.memory)
    except Exception:
        pass  # not supported (MIG, some vGPUs): absent, not zero
    seen: dict[int, GpuProcess] = {}
    for kind, pid, proc_used in processes(handle):
        if pid not in seen:
            seen[pid] = GpuProcess(pid, proc_used, process_command_line(pid), kind)
    gpu.processes = sorted(seen.values(), key=lambda p: -(p.used or 0))
    return gpu


def pid_gpus(report: GpuReport) -> dict[int, list[int]]:
    """pid -> the indices of the GPUs it holds memory on."""
    out: dict[int, list[int]] = {}
    for g in report.gpus:
        for p in g.processes:
            out.setdefault(p.pid, []).append(g.index)
    return out
