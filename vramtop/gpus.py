"""The GPUs of this machine and their processes: what `vramtop` shows before any agent runs.

The data comes from the agent's NVML layer (vramtop_agent.nvml: `list_gpus()`,
re-exported here with its report types); this module draws it. No agent is
needed, so a user who types `vramtop` on a node always sees something.
Without an NVIDIA driver the report's `error` says so in one line, and the
view shows just that line (and the agents as they appear).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vramtop.live_source import LiveSource
from vramtop_agent.nvml import Gpu, GpuProcess, GpuReport, list_gpus, pid_gpus

if TYPE_CHECKING:
    from rich.console import JustifyMethod

__all__ = ["Gpu", "GpuProcess", "GpuReport", "NodeSource", "list_gpus", "pid_gpus", "render_gpus"]


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
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("GPU", "right"), ("name", "left"), ("memory used", "right"), ("util", "right"),
        ("pid", "right"), ("proc mem", "right"), ("process", "left"))
    for col, justify in columns:
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
