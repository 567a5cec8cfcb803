"""The dashboard under App.run_test(), fed by a real agent in a real training subprocess."""

import os
import subprocess
import sys

import pytest
from helpers import screen_text, until

from vramtop.live_source import LiveSource
from vramtop.state import SessionState
from vramtop.tui import render
from vramtop.tui.app import VramtopApp

pytestmark = pytest.mark.asyncio


@pytest.fixture
def demo_job(runtime_dir):
    child = subprocess.Popen(
        [sys.executable, "-m", "vramtop.demo_train", "--steps", "400", "--sleep", "0.02", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "VRAMTOP_RUNTIME_DIR": str(runtime_dir)},
    )
    yield child
    child.kill()
    child.wait()


def _connection(app) -> str:
    """What the viewer has seen so far: the diagnostic for a wait that times out."""
    return (f"{app.state.connection()} steps={len(app.state.steps)} hello={bool(app.state.hello)} "
            f"status={app.source.status}")


async def test_dashboard_shows_the_streams_numbers(demo_job):
    from vramtop.tiny import add_lora, build_model
    from vramtop_agent.accounting import sum_unique

    expected_params = sum_unique(add_lora(build_model(vocab_size=512), rank=8).parameters())
    app = VramtopApp(LiveSource(str(demo_job.pid)), refresh_hz=10)
    async with app.run_test(size=(180, 50)) as pilot:
        # The hello is re-sent every second: wait for one that describes the model.
        await until(pilot, lambda: len(app.state.steps) >= 3 and app.state.sample is not None
                    and ((app.state.hello or {}).get("model") or {}).get("summary"),
                    timeout=40, what="a hello describing the model", detail=lambda: _connection(app))
        await pilot.pause(0.3)
        app.paused = False
        app._refresh_view()
        text = screen_text(app)
        sample = app.state.sample
        # The demo model is the one this test builds: the stream's parameter bytes are exact.
        assert sample["blocks"]["parameters"] == expected_params
        assert f"parameters {render.fmt_bytes(sample['blocks']['parameters'])}" in text
        assert f"activations {render.fmt_bytes(sample['blocks']['activations'])}" in text
        assert f"pid {demo_job.pid}" in text
        assert "PeftModelForCausalLM" in text and "LoRA r=8" in text
        assert "batch×seq 4×128" in text
        assert "[live]" in text
        last = app.state.steps[-1]
        assert render.fmt_bytes(last["peaks"]["forward"]) in text
        await pilot.press("q")
    assert demo_job.poll() is None  # the job did not notice the viewer leaving


async def test_viewer_waits_when_no_agent_runs():
    app = VramtopApp(LiveSource(None), refresh_hz=10)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.5)
        assert "no vramtop agent on this machine yet" in screen_text(app)
        assert app.state.connection() == "waiting"


async def test_cuda_sample_renders_the_whole_card():
    """A GPU cannot exist here: a CUDA-shaped sample drives the pure view
    (the same path runs for real on the device)."""
    gib = 1024 ** 3
    state = SessionState()
    blocks = {"parameters": 14 * gib, "gradients": 2 * gib, "optimizer": 4 * gib, "activations": 20 * gib,
              "other": 1 * gib}
    state.apply({"v": 1, "type": "sample", "t": 1.0, "pid": 7, "rank": 0, "seq": 1, "step": 3, "phase": "backward",
                 "device": "cuda:0", "blocks": blocks, "params_split": {"trainable": gib, "frozen": 13 * gib},
                 "devices": {"cuda:0": blocks}, "host": {"rss": gib, "total": 64 * gib, "available": 32 * gib},
                 "cuda": {"allocated": 41 * gib, "reserved": 50 * gib, "active": 41 * gib, "inactive_split": gib,
                          "alloc_retries": 2, "ooms": 0, "peak_allocated": 45 * gib, "peak_reserved": 50 * gib},
                 "nvml": {"total": 80 * gib, "used": 53 * gib, "process_used": 51 * gib},
                 "dropped": 0, "errors": 0})
    segs = {s.key: s.nbytes for s in state.segments()}
    assert segs["cache"] == 9 * gib and segs["nonpytorch"] == gib and segs["others"] == 2 * gib
    assert segs["free"] == 27 * gib
    assert sum(segs.values()) == 80 * gib
    frag = render.fragmentation(state).plain
    assert "18% of reserved" in frag and "alloc retries 2" in frag


async def test_estimate_beside_actual_and_what_if(demo_job):
    """The agent publishes the estimator's prediction; the view shows it beside the measurement."""
    app = VramtopApp(LiveSource(str(demo_job.pid)), refresh_hz=10)
    async with app.run_test(size=(180, 60)) as pilot:
        await until(pilot, lambda: len(app.state.steps) >= 2 and (app.state.hello or {}).get("estimate"),
                    timeout=90, what="two steps and an estimate", detail=lambda: _connection(app))
        app._refresh_view()
        rows = {r.block: r for r in app.gap_model.rows(app.state)}
        # Parameters and optimizer states are exact on a live LoRA run (estimator tests cover the matrix).
        assert rows["parameters"].difference == 0 and rows["optimizer"].difference == 0
        assert "Estimate vs actual" in screen_text(app)
        # The whole panel (its lower part may be scrolled out of the visible screen).
        from rich.console import Console

        from vramtop.tui.gap_render import render_gap

        console = Console(width=120, record=True, file=open(os.devnull, "w"))
        console.print(render_gap(app.state, app.gap_model))
        panel = console.export_text()
        assert "What to try" in panel and "turn on gradient checkpointing" in panel
        await pilot.press("w")
        await until(pilot, lambda: getattr(app.screen, "prediction", None) is not None, timeout=20,
                    what="a what-if prediction", detail=lambda: _connection(app))
        screen = app.screen
        base = screen.prediction["predicted_peak"]
        screen.query_one("#wi-batch").value = "16"
        await until(pilot, lambda: screen.prediction["predicted_peak"] != base, timeout=20,
                    what="a new prediction for batch 16", detail=lambda: _connection(app))
        bigger = screen.prediction["predicted_peak"]
        assert bigger > base  # 4x the batch: more activations
        assert "predicted peak" in screen_text(app)
        await pilot.press("escape")
