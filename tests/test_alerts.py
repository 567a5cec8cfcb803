"""Alerts: --on-alert once per kind with JSON on stdin (a real job), the banner (a real Textual app), and the
shipped Prometheus rules / Grafana dashboard against the metrics the exporter really serves."""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import pytest
import yaml
from alarm_helpers import HERE, LEAK_JOB, vramtop
from recording_helpers import fake_msg

from vramtop.alerts import AlertMonitor, Thresholds, evaluate
from vramtop.metrics import MetricsExporter
from vramtop.source import KeyedSource, Source
from vramtop.state import SessionState

ROOT = os.path.dirname(HERE)
RULES = os.path.join(ROOT, "deploy", "monitoring", "vramtop-alerts.rules.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "monitoring", "vramtop-grafana.json")
SINK = f"{sys.executable} {os.path.join(HERE, 'alert_sink.py')}"
MiB, GiB = 1 << 20, 1 << 30


def _alerts_in(d) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in glob.glob(os.path.join(d, "*.json")):
        with open(path) as fh:
            a = json.load(fh)  # valid JSON, or this fails
        out.setdefault(a["kind"], []).append(a)
    return out


def test_on_alert_runs_once_per_kind_with_json(tmp_path):
    """A real job under `vramtop run --no-tui`: headroom (threshold 100 %: always), then the job dies of an OOM.
    Every sample re-raises headroom; the command still runs once for it, and once for the OOM."""
    out = tmp_path / "alerts"
    out.mkdir()
    proc = vramtop("run", "--no-tui", "--alert-headroom", "100", "--on-alert", f"{SINK} {out}", "--",
                   sys.executable, LEAK_JOB, "--steps", "10", "--sleep", "0.05", "--oom")
    assert proc.returncode == 1, proc.stderr[-2000:]  # the job's own status (its OOM)
    got = _alerts_in(str(out))
    assert sorted(got) == ["headroom", "oom"]
    assert all(len(v) == 1 for v in got.values()), got
    oom = got["oom"][0]
    # raised after the 10th optimizer step (the agent may not have closed that step yet: 9 or 10)
    assert oom["details"]["requested"] == 2 * GiB and oom["step"] in (9, 10)
    assert oom["message"].startswith("out of memory")
    head = got["headroom"][0]
    assert head["details"]["threshold_pct"] == 100 and 0 < head["details"]["free_pct"] < 100
    assert head["pid"] == oom["pid"] and head["device"] == "cpu"


def test_bad_alert_options_are_one_line_errors():
    for args in (["--alert-headroom", "140"], ["--on-alert", "'unclosed"], ["--on-alert", ""]):
        proc = vramtop("run", "--no-tui", *args, "--", sys.executable, "-c", "pass")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


# ---------------------------------------------------------------- canned CUDA stream (no GPU here)


def _cuda_sample(t: float, step: int, allocated: int, reserved: int, retries: int = 0, used: int | None = None) -> dict:
    s = fake_msg("sample", t, step=step, phase="optimizer")
    s["device"] = "cuda:0"
    s["cuda"] = {"allocated": allocated, "reserved": reserved, "active": allocated, "inactive_split": 0,
                 "alloc_retries": retries, "ooms": 0, "peak_allocated": allocated, "peak_reserved": reserved}
    s["nvml"] = {"total": 24 * GiB, "used": used if used is not None else reserved + 500 * MiB,
                 "process_used": reserved + 500 * MiB}
    return s


def _leaking_cuda_stream(steps: int = 40, leak: int = 12 * MiB) -> list[dict]:
    msgs = [fake_msg("hello", 0.0)]
    msgs[0].update(device="cuda:0", device_total=24 * GiB)
    for step in range(steps):
        level = 2 * GiB + leak * step
        msgs.append(fake_msg("phase", step + 0.5, step=step, phase="optimizer", edge="end", level=level,
                             eseq=step + 1))
        msgs.append(_cuda_sample(step + 0.6, step, level, level + 3 * GiB, retries=1 if step > 30 else 0,
                                 used=23 * GiB))
    return msgs


def test_evaluate_every_kind_on_a_canned_cuda_stream(tmp_path):
    st = SessionState()
    for m in _leaking_cuda_stream():
        st.apply(m)
    kinds = {a.kind: a for a in evaluate(st, Thresholds(headroom_pct=10, frag_pct=40))}
    assert sorted(kinds) == ["creep", "fragmentation", "headroom", "retries"]
    assert kinds["creep"].message.startswith("creeping +12.0 MiB/step (allocated), the card is full in ~")
    assert kinds["headroom"].details["free"] == 1 * GiB
    st.apply(fake_msg("oom", 100.0, step=40))
    assert evaluate(st)[0].kind == "oom"


def test_monitor_runs_the_command_once_per_kind(tmp_path):
    st, mon = SessionState(), AlertMonitor(Thresholds(frag_pct=40), on_alert=f"{SINK} {tmp_path}")
    for m in _leaking_cuda_stream():
        st.apply(m)
        mon.update(st)  # every message: the kinds hold again and again
    mon.wait()
    got = _alerts_in(str(tmp_path))
    assert sorted(got) == ["creep", "fragmentation", "headroom", "retries"]
    assert all(len(v) == 1 for v in got.values())
    assert got["creep"][0]["details"]["slope"] == 12 * MiB


class _CannedSource(Source):
    """A stream source for the dashboard that hands over canned messages (a CUDA job, on a CPU box)."""

    status = describe = ""

    def __init__(self, msgs):
        self.msgs = list(msgs)

    def poll(self):
        out, self.msgs = self.msgs, []
        return out

    def close(self):
        pass


@pytest.mark.asyncio
async def test_banner_and_creep_line_in_the_dashboard():
    from vramtop.tui.app import VramtopApp

    app = VramtopApp(_CannedSource(_leaking_cuda_stream()))
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause(0.3)
        app._refresh_view()
        text = str(app.query_one("#alerts").render())
        assert app.query_one("#alerts").display
    assert "CREEP" in text and "creeping +12.0 MiB/step (allocated), the card is full in ~" in text
    assert "HEADROOM" in text and "RETRIES" in text


def test_healthy_stream_shows_no_banner():
    st, mon = SessionState(), AlertMonitor()
    for step in range(60):
        st.apply(fake_msg("phase", step + 0.5, step=step, phase="optimizer", edge="end", level=2 * GiB,
                          eseq=step + 1))
        st.apply(_cuda_sample(step + 0.6, step, 2 * GiB, 2 * GiB + 100 * MiB))
        mon.update(st)
    assert mon.active == [] and mon.fired == {}
    from vramtop.tui import alerts_view

    assert not alerts_view.has_content(st, mon)  # the dashboard hides the banner line


# ---------------------------------------------------------------- Prometheus rules, Grafana dashboard


class _KeyedSource(KeyedSource):
    def __init__(self, msgs):
        self.msgs = [("rank0", m) for m in msgs]

    def poll(self, timeout_ms=0):
        out, self.msgs = self.msgs, []
        return out


def _served_metrics() -> tuple[set[str], str]:
    exp = MetricsExporter(source=_KeyedSource(_leaking_cuda_stream()))
    exp.job.add("rank0", {"pid": 4242, "rank": 0})
    exp.job.apply("rank0", fake_msg("step", 39.9, step=39, eseq=99))
    exp.pump()
    text = exp.text()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names, text


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bvramtop_[a-z_]+\b", expr))


def test_rules_and_dashboard_name_only_served_metrics():
    served, text = _served_metrics()
    assert 'vramtop_creep_bytes_per_step{' in text
    slope = [ln for ln in text.splitlines()
             if ln.startswith("vramtop_creep_bytes_per_step") and 'series="allocated"' in ln]
    assert float(slope[0].rsplit(" ", 1)[1]) == 12 * MiB

    with open(RULES) as fh:
        rules = [r for g in yaml.safe_load(fh)["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"VramtopHeadroomLow", "VramtopAllocatorRetries", "VramtopFragmentation",
                                           "VramtopMemoryCreep", "VramtopOOM"}
    with open(DASHBOARD) as fh:
        dash = json.load(fh)
    exprs = [(r["alert"], r["expr"]) for r in rules]
    exprs += [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    exprs += [(v["name"], v["query"]) for v in dash["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) > 15
    for where, expr in exprs:
        names = _names_in(expr)
        assert names, f"{where}: no vramtop metric in {expr!r}"
        missing = names - served
        assert not missing, f"{where}: {sorted(missing)} not served by `vramtop metrics` (serves {sorted(served)})"


def test_record_on_alert_with_a_real_agent(tmp_path, free_tcp_endpoint):
    """`vramtop record --on-alert`: the recorder watches the stream it writes (an agent in this process)."""
    import threading
    import time

    import torch

    import vramtop_agent
    from vramtop.commands.record import record
    from vramtop.tiny import add_lora, build_model, make_batch

    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = make_batch(model, batch=2, seq_len=16)
    monitor = AlertMonitor(Thresholds(headroom_pct=100), on_alert=f"{SINK} {tmp_path}")
    out = str(tmp_path / "rec.vramtop")
    with vramtop_agent.watch(model, opt, endpoint=free_tcp_endpoint, sample_hz=20):
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault("rc", record(
            free_tcp_endpoint, out, duration=6.0, say=lambda *a: None, install_signals=False, monitor=monitor)))
        t.start()
        for _ in range(20):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            time.sleep(0.1)
    t.join(30)
    assert done.get("rc") == 0
    got = _alerts_in(str(tmp_path))
    assert list(got) == ["headroom"] and len(got["headroom"]) == 1
