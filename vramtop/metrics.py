"""Prometheus export: the agents of this node as metrics, for clusters that already run Prometheus/Grafana.

`MetricsExporter` follows every agent on this machine (a JobSource in
discovery mode, so agents that start later are picked up and the ones that
end are marked down) in a pump thread, folds their streams into a JobState,
and answers scrapes from it through prometheus-client's HTTP server. The
numbers are the stream's, unchanged, in bytes and seconds. Each series is
labelled with the process: node, rank, local_rank, world_size, pid, device.

Exported (all gauges unless marked counter):
  vramtop_up                          1 while the agent's stream is live, else 0
  vramtop_last_frame_age_seconds      since the last frame from the agent
  vramtop_block_bytes{block}          the live sample's blocks (parameters, gradients, optimizer, activations, other)
  vramtop_params_bytes{kind}          trainable / frozen / quantized parameter bytes
  vramtop_step                        the current step
  vramtop_step_time_seconds           the last step's time
  vramtop_step_peak_bytes             the last step's peak
  vramtop_phase_peak_bytes{phase}     the last step's peak per phase (forward, backward, optimizer)
  vramtop_step_peak_block_bytes{block} the blocks at the last step's peak
  vramtop_backward_spike_bytes        backward peak above the end-of-forward level
  vramtop_allocator_bytes{kind}       CUDA: allocated, reserved, active, inactive_split, peak_allocated, peak_reserved
  vramtop_fragmentation_bytes         CUDA: reserved - allocated (cache and fragmentation)
  vramtop_alloc_retries_total         CUDA (counter)
  vramtop_ooms_total                  CUDA (counter)
  vramtop_nvml_bytes{kind}            NVML: total, used, process_used
  vramtop_process_rss_bytes           host RSS of the process
  vramtop_device_total_bytes          the device's memory (host RAM on CPU)
  vramtop_dropped_frames_total        frames the agent could not queue (counter)
  vramtop_missed_events_total         events lost between agent and exporter (counter)
  vramtop_agent_errors_total          exceptions caught inside the agent (counter)
Fields a device does not have are absent, as in the stream.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from vramtop.job_state import JobState
from vramtop_agent.vocabulary import BLOCK_KEYS, PHASES

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

FORGET_AFTER_S = 300.0  # a member silent this long is dropped from the export
_LABELS = ("node", "rank", "local_rank", "world_size", "pid", "device")


class MetricsExporter:
    """A prometheus-client collector over the agents of this machine."""

    def __init__(self, source=None, forget_after_s: float = FORGET_AFTER_S, rescan_s: float = 2.0):
        if source is None:
            from vramtop.job_source import JobSource
            from vramtop_agent import discovery

            source = JobSource(discovery.list_agents(), match=None, rescan_s=rescan_s, scan_local=True)
        self.source = source
        self.job = JobState()
        self.forget_after_s = forget_after_s
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.server: WSGIServer | None = None  # prometheus-client's HTTP server, once serve() ran

    # ------------------------------------------------------------------ pump

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vramtop-metrics-pump", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pump(timeout_ms=200)

    def pump(self, timeout_ms: int = 0) -> int:
        """Fold what the agents sent into the state; returns the number of messages."""
        try:
            msgs = self.source.poll(timeout_ms)
        except Exception:  # noqa: BLE001 - keep exporting what we have
            time.sleep(timeout_ms / 1000.0)
            return 0
        with self.lock:
            for key, msg in msgs:
                self.job.apply(key, msg)
            for key in self.source.gone:
                st = self.job.members.get(key)
                if st is not None:
                    st.process_gone = True
            now = time.time()
            for key, st in list(self.job.members.items()):
                if st.last_frame_at is not None and now - st.last_frame_at > self.forget_after_s:
                    self.job.remove(key)
                    self.source.remove(key)
        return len(msgs)

    # ------------------------------------------------------------------ collector

    def describe(self):
        return []  # no metadata up front: collect() is the only source of truth

    def collect(self):
        fams = _Families()
        with self.lock:
            for key in self.job.keys():  # noqa: SIM118 - JobState.keys() is rank order, not a dict's keys
                st = self.job.members[key]
                h, s = st.hello or {}, st.sample or {}
                if not s and not h:
                    continue
                self._member_metrics(fams, key, st, h, s)
        yield from fams.values()

    def _member_metrics(self, fams: _Families, key, st, h: dict, s: dict) -> None:
        """One member's series, in the order the families first appear in the exposition."""
        gauge, counter = fams.gauge, fams.counter
        info = self.job.infos.get(key) or {}
        labels = [
            self.job.node(key),
            str(self.job.rank(key)),
            str(h.get("local_rank", info.get("local_rank", ""))),
            str(h.get("world_size", info.get("world_size", ""))),
            str(self.job.pid(key) or ""),
            str(s.get("device") or h.get("device") or ""),
        ]
        gauge("vramtop_up", "1 while the agent's stream is live").add_metric(
            labels, 1.0 if st.connection() == "live" else 0.0)
        if st.last_frame_at is not None:
            gauge("vramtop_last_frame_age_seconds", "seconds since the last frame from the agent").add_metric(
                labels, max(st.clock() - st.last_frame_at, 0.0))
        if s:
            _sample_metrics(fams, labels, s)
            _creep_metrics(st, labels, gauge)
        total = st.device_total()
        if total:
            gauge("vramtop_device_total_bytes", "the device's memory (host RAM on CPU)").add_metric(
                labels, float(total))
        counter("vramtop_missed_events", "events lost between the agent and this exporter").add_metric(
            labels, float(st.missed_events))
        last = st.last_step()
        if last is not None:
            _step_metrics(fams, labels, last)

    # ------------------------------------------------------------------ serving

    def registry(self):
        from prometheus_client import CollectorRegistry

        reg = CollectorRegistry(auto_describe=False)
        reg.register(self)
        return reg

    def serve(self, port: int = 9400, bind: str = "127.0.0.1") -> tuple[str, int]:
        """Start the pump and the HTTP server; returns (host, port) actually bound."""
        from prometheus_client import start_http_server

        if self._thread is None:
            self.start()
        server, _thread = start_http_server(port, addr=bind, registry=self.registry())
        self.server = server
        return bind, server.server_port

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry()).decode()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.source.close()


def _creep_metrics(st, labels: list, gauge) -> None:
    """The creep slope per series (0 while it does not creep) and, while it does, the steps left."""
    creeping = {c.series: c for c in st.creep.current()}
    g = gauge("vramtop_creep_bytes_per_step", "memory growth per step at the same phase edge while it creeps "
              "(0: no creep); see docs/budgets-and-alerts.md", ("series",))
    for series in (("allocated", "reserved") if st.on_cuda else ("allocated", "rss")):
        c = creeping.get(series)
        g.add_metric([*labels, series], float(c.slope) if c else 0.0)
        if c is not None and c.steps_to_full is not None:
            gauge("vramtop_creep_steps_to_full", "steps until a creeping series fills its device (or host RAM)",
                  ("series",)).add_metric([*labels, series], float(c.steps_to_full))


class _Families(dict):
    """The metric families of one scrape, created on first use (name -> family)."""

    def gauge(self, name, doc, extra=()):
        from prometheus_client.core import GaugeMetricFamily

        if name not in self:
            self[name] = GaugeMetricFamily(name, doc, labels=[*_LABELS, *extra])
        return self[name]

    def counter(self, name, doc):
        from prometheus_client.core import CounterMetricFamily

        if name not in self:
            self[name] = CounterMetricFamily(name, doc, labels=list(_LABELS))
        return self[name]


def _sample_metrics(fams: _Families, labels: list[str], s: dict) -> None:
    """The latest sample: blocks, parameter kinds, step, allocator, NVML, RSS and the agent's own counters."""
    gauge, counter = fams.gauge, fams.counter
    g = gauge("vramtop_block_bytes", "live bytes per block", ("block",))
    for b in BLOCK_KEYS:
        g.add_metric([*labels, b], float(s["blocks"].get(b, 0)))
    g = gauge("vramtop_params_bytes", "parameter bytes by kind", ("kind",))
    for kind, v in (s.get("params_split") or {}).items():
        if v is not None:
            g.add_metric([*labels, kind], float(v))
    gauge("vramtop_step", "the current step").add_metric(labels, float(s.get("step", 0)))
    cuda = s.get("cuda") or {}
    if cuda:
        _allocator_metrics(fams, labels, cuda)
    nv = s.get("nvml") or {}
    if nv:
        g = gauge("vramtop_nvml_bytes", "NVML device memory", ("kind",))
        for kind in ("total", "used", "process_used"):
            if nv.get(kind) is not None:
                g.add_metric([*labels, kind], float(nv[kind]))
    host = s.get("host") or {}
    if host.get("rss") is not None:
        gauge("vramtop_process_rss_bytes", "resident set size of the process").add_metric(
            labels, float(host["rss"]))
    counter("vramtop_dropped_frames", "frames the agent could not queue").add_metric(
        labels, float(s.get("dropped", 0)))
    counter("vramtop_agent_errors", "exceptions caught inside the agent").add_metric(
        labels, float(s.get("errors", 0)))


def _allocator_metrics(fams: _Families, labels: list[str], cuda: dict) -> None:
    g = fams.gauge("vramtop_allocator_bytes", "CUDA caching allocator", ("kind",))
    for kind in ("allocated", "reserved", "active", "inactive_split", "peak_allocated", "peak_reserved"):
        if cuda.get(kind) is not None:
            g.add_metric([*labels, kind], float(cuda[kind]))
    if cuda.get("reserved") is not None and cuda.get("allocated") is not None:
        fams.gauge("vramtop_fragmentation_bytes", "reserved - allocated: cache and fragmentation"
                   ).add_metric(labels, float(max(cuda["reserved"] - cuda["allocated"], 0)))
    if cuda.get("alloc_retries") is not None:
        fams.counter("vramtop_alloc_retries", "allocator retries (cudaMalloc failed, cache flushed)"
                     ).add_metric(labels, float(cuda["alloc_retries"]))
    if cuda.get("ooms") is not None:
        fams.counter("vramtop_ooms", "CUDA out-of-memory errors").add_metric(labels, float(cuda["ooms"]))


def _step_metrics(fams: _Families, labels: list[str], last: dict) -> None:
    """The last finished step: time, peak, each phase's peak, the blocks at the peak."""
    gauge = fams.gauge
    if last.get("step_time") is not None:
        gauge("vramtop_step_time_seconds", "the last step's time").add_metric(labels, float(last["step_time"]))
    gauge("vramtop_step_peak_bytes", "the last step's peak").add_metric(labels, float(last["peak"]))
    g = gauge("vramtop_phase_peak_bytes", "the last step's peak per phase", ("phase",))
    for p in PHASES:
        if last["peaks"].get(p) is not None:
            g.add_metric([*labels, p], float(last["peaks"][p]))
    g = gauge("vramtop_step_peak_block_bytes", "the blocks at the last step's peak", ("block",))
    for b in BLOCK_KEYS:
        g.add_metric([*labels, b], float(last["peak_blocks"].get(b, 0)))
    gauge("vramtop_backward_spike_bytes", "backward peak above the end-of-forward level").add_metric(
        labels, float(last["backward_spike"]))
