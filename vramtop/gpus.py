"""The GPUs of this machine and their processes, from NVML: what `vramtop` shows before any agent runs.

NVML (pynvml, from nvidia-ml-py) knows, per GPU, the memory in use, the
utilisation, and the compute/graphics processes with the memory each holds.
No agent is needed, so a user who types `vramtop` on a node always sees
something. Without an NVIDIA driver `list_gpus()` returns a report whose
`error` says so in one line, and the view shows just that line (and the
agents as they appear).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vramtop.sources import LiveSource


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


def _s(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _proc_name(pid: int) -> str:
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
            driver = _s(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                uuid = _s(pynvml.nvmlDeviceGetUUID(h))
            except Exception:
                uuid = None
            gpu = Gpu(i, _s(pynvml.nvmlDeviceGetName(h)), uuid, int(mem.total), int(mem.used))
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(h)
                gpu.util_gpu, gpu.util_mem = int(util.gpu), int(util.memory)
            except Exception:
                pass  # not supported (MIG, some vGPUs): absent, not zero
            seen: dict[int, GpuProcess] = {}
            for kind, fn in (("compute", "nvmlDeviceGetComputeRunningProcesses"),
                             ("graphics", "nvmlDeviceGetGraphicsRunningProcesses")):
                try:
                    procs = getattr(pynvml, fn)(h)
                except Exception:
                    continue
                for p in procs:
                    used = getattr(p, "usedGpuMemory", None)
                    used = int(used) if isinstance(used, int) and used >= 0 else None
                    if p.pid in seen:
                        continue
                    seen[p.pid] = GpuProcess(int(p.pid), used, _proc_name(int(p.pid)), kind)
            gpu.processes = sorted(seen.values(), key=lambda p: -(p.used or 0))
            gpus.append(gpu)
        return GpuReport(gpus, None if gpus else "NVML sees no GPU on this machine", driver, now)
    except Exception as exc:
        return GpuReport([], f"NVML failed: {exc}", taken_at=now)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def pid_gpus(report: GpuReport) -> dict[int, list[int]]:
    """pid -> the indices of the GPUs it holds memory on."""
    out: dict[int, list[int]] = {}
    for g in report.gpus:
        for p in g.processes:
            out.setdefault(p.pid, []).append(g.index)
    return out


def render_gpus(report: GpuReport, agents: list[dict] | None = None):
    """A Rich table of the GPUs and their processes (or the one line that says why there is none)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from vramtop_agent.vocabulary import fmt_bytes

    if report.error:
        return Text(report.error, style="yellow")
    agent_pids = {a.get("pid") for a in (agents or [])}
    title = Text()
    title.append("GPUs on this machine ", style="bold")
    title.append("(NVML" + (f", driver {report.driver}" if report.driver else "") + ")", style="dim")
    table = Table(box=None, padding=(0, 1), expand=True)
    for col, justify in (("GPU", "right"), ("name", "left"), ("memory used", "right"), ("util", "right"),
                         ("pid", "right"), ("proc mem", "right"), ("process", "left")):
        table.add_column(col, justify=justify)
    for g in report.gpus:
        pct = 100.0 * g.used / g.total if g.total else 0.0
        util = f"{g.util_gpu}%" if g.util_gpu is not None else "-"
        mem = f"{fmt_bytes(g.used)} / {fmt_bytes(g.total)} ({pct:.0f}%)"
        if not g.processes:
            table.add_row(str(g.index), g.name, mem, util, "", "", Text("no processes", style="dim"))
            continue
        for j, p in enumerate(g.processes):
            name = Text(p.name[:80])
            if p.pid in agent_pids:
                name.append("  [vramtop agent]", style="green")
            table.add_row(str(g.index) if j == 0 else "", g.name if j == 0 else "", mem if j == 0 else "",
                          util if j == 0 else "", str(p.pid), fmt_bytes(p.used), name)
    return Group(title, table)


class NodeSource(LiveSource):
    """LiveSource in discovery mode, plus the machine's GPUs (NVML) while no agent is attached."""

    def __init__(self, refresh_s: float = 2.0, **kwargs):
        super().__init__(None, **kwargs)
        self.refresh_s = refresh_s
        self._report: GpuReport | None = None
        self._report_at = 0.0

    def report(self) -> GpuReport:
        now = time.monotonic()
        if self._report is None or now - self._report_at >= self.refresh_s:
            self._report = list_gpus()
            self._report_at = now
        return self._report

    def idle_view(self):
        """What the dashboard shows instead of the memory bar until a first sample arrives."""
        from rich.console import Group
        from rich.text import Text

        report = self.report()
        if report.error:
            return Group(Text(report.error + ": showing vramtop agents as they start", style="yellow"))
        return render_gpus(report, self.choices)
