"""`vramtop metrics`: a real exporter process scraped over HTTP; its numbers are the stream's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import torch
from conftest import train_steps
from helpers import optimizer_tensors, storage_bytes
from prometheus_client.parser import text_string_to_metric_families

import vramtop_agent
from vramtop.subscriber import Subscriber
from vramtop.tiny import build_model, make_batch
from vramtop_agent.schema import BLOCK_KEYS, PHASES


def scrape(url: str) -> dict:
    """{(metric name, frozenset(labels)) -> value} of one real HTTP scrape."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels):
    want = {k: str(v) for k, v in labels.items()}
    hits = [v for (n, ls), v in metrics.items() if n == name and want.items() <= dict(ls).items()]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else None


@pytest.fixture
def exporter(runtime_dir):
    proc = subprocess.Popen([sys.executable, "-m", "vramtop", "metrics", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VRAMTOP_RUNTIME_DIR": str(runtime_dir)})
    line = proc.stdout.readline()
    assert line.startswith("vramtop metrics: serving http://127.0.0.1:"), line + proc.stderr.read()
    url = line.split()[3]
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_metrics_scraped_over_http_match_the_stream(exporter):
    proc, url = exporter
    model = build_model(vocab_size=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    agent = vramtop_agent.watch(model, opt, sample_hz=20)
    direct = Subscriber(agent.endpoint)  # the stream, read by the test itself
    samples, steps = [], []

    def drain(ms=50):
        for m in direct.poll(ms):
            (samples if m["type"] == "sample" else steps if m["type"] == "step" else []).append(m)

    labels = {"rank": 0, "pid": os.getpid(), "device": "cpu"}
    try:
        deadline = time.time() + 30
        while value(scrape(url), "vramtop_up", **labels) != 1.0:  # the exporter found the agent
            assert time.time() < deadline, "the exporter never saw the agent"
            drain(200)
        batch = make_batch(model, 2, 32)
        for _ in range(3):
            train_steps(model, opt, batch, 1)
            drain(20)
        # Training has stopped: every block holds still, so the scrape and the stream must agree exactly.
        deadline = time.time() + 20
        while True:
            drain(100)
            m = scrape(url)
            last_sample, last_step = samples[-1] if samples else None, steps[-1] if steps else None
            ok = (last_step is not None and last_step["step"] == 2 and value(m, "vramtop_step", **labels) == 3
                  and value(m, "vramtop_step_peak_bytes", **labels) == last_step["peak"]  # its step summary too
                  and all(value(m, "vramtop_block_bytes", block=b, **labels) == last_sample["blocks"][b]
                          for b in BLOCK_KEYS))
            if ok:
                break
            assert time.time() < deadline, (last_step and last_step["step"], value(m, "vramtop_step", **labels))
        assert last_sample["blocks"]["parameters"] == agent.snapshot()["blocks"]["parameters"] > 0
        assert last_sample["blocks"]["optimizer"] == storage_bytes(optimizer_tensors(opt))  # AdamW: moments + step
        for phase in PHASES:
            assert value(m, "vramtop_phase_peak_bytes", phase=phase, **labels) == last_step["peaks"][phase]
        assert value(m, "vramtop_step_peak_bytes", **labels) == last_step["peak"]
        assert value(m, "vramtop_backward_spike_bytes", **labels) == last_step["backward_spike"]
        for b in BLOCK_KEYS:
            assert value(m, "vramtop_step_peak_block_bytes", block=b, **labels) == last_step["peak_blocks"][b]
        assert value(m, "vramtop_params_bytes", kind="trainable", **labels) == last_sample["params_split"]["trainable"]
        assert value(m, "vramtop_step_time_seconds", **labels) == pytest.approx(last_step["step_time"])
        assert value(m, "vramtop_process_rss_bytes", **labels) > 0
        assert value(m, "vramtop_agent_errors_total", **labels) == 0
        # CPU: no allocator, no NVML: absent, not zero.
        assert value(m, "vramtop_fragmentation_bytes", **labels) is None
        assert value(m, "vramtop_allocator_bytes", kind="reserved", **labels) is None
        # It listens on loopback only.
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
        # The agent goes away: the exporter says so (and keeps serving).
        agent.stop()
        deadline = time.time() + 20
        while value(scrape(url), "vramtop_up", **labels) != 0.0:
            assert time.time() < deadline, "vramtop_up stayed 1 after the agent stopped"
            time.sleep(0.2)
    finally:
        agent.stop()
        direct.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
