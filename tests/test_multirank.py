"""Every rank of a job in one view: the JobState model, and a real torchrun DDP fine-tune on CPU (gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, screen_text, until

from vramtop.commands.attach import pick_job
from vramtop.job_source import JobSource
from vramtop.job_state import JobState, group_jobs, member_key
from vramtop.tui import render
from vramtop.tui.job_render import HI_STYLE, LO_STYLE, imbalance_text, rank_cells
from vramtop.tui.job_view import JobApp, OverviewScreen
from vramtop_agent import discovery

MIB = 1 << 20


def _sample(rank, blocks, step=3, pid=None):
    return {"v": 1, "type": "sample", "t": time.time(), "pid": pid or 100 + rank, "rank": rank, "seq": 1,
            "step": step, "phase": "idle", "device": "cpu", "blocks": blocks,
            "params_split": {"trainable": blocks["parameters"], "frozen": 0, "quantized": 0},
            "devices": {"cpu": blocks}, "host": {"rss": 1 << 30}, "dropped": 0, "errors": 0}


def _step(rank, peak_blocks, step=2, step_time=0.1):
    peak = sum(peak_blocks.values())
    return {"v": 1, "type": "step", "t": time.time(), "pid": 100 + rank, "rank": rank, "eseq": 1, "step": step,
            "step_time": step_time, "micro_steps": 1, "peaks": {"forward": peak, "backward": peak, "optimizer": peak},
            "end_of_forward": peak, "backward_spike": 0, "peak": peak, "peak_phase": "backward",
            "peak_blocks": peak_blocks}


def _blocks(act_mib, params=100 * MIB):
    return {"parameters": params, "gradients": params, "optimizer": 2 * params, "activations": act_mib * MIB,
            "other": MIB}


def test_imbalance_flags_the_blocks_that_differ_between_ranks():
    job = JobState()
    for r, act in ((0, 40), (1, 80), (2, 41)):
        key = f"local|{100 + r}|{r}"
        job.apply(key, _sample(r, _blocks(act)))
        job.apply(key, _step(r, _blocks(act), step_time=0.100 + 0.001 * r))
    imb = job.imbalance()
    a = imb["activations"]
    assert a.flagged and job.rank(a.max_key) == 1 and job.rank(a.min_key) == 0
    assert a.spread == 40 * MIB and a.ratio == pytest.approx(0.5)
    assert imb["peak"].spread == 40 * MIB and not imb["peak"].flagged  # 8% of the peak: under the 10% bar
    assert not imb["parameters"].flagged and imb["parameters"].spread == 0
    assert not imb["step_time"].flagged  # 2 ms apart: under 10% and under the 10 ms floor
    text = imbalance_text(job, imb).plain
    [line] = [ln for ln in text.splitlines() if "activations " in ln]
    assert line.startswith("▲")
    assert "activations  max 80.0 MiB (rank 1) vs min 40.0 MiB (rank 0): 40.0 MiB, 50% of max" in line
    assert "▲" not in [line for line in text.splitlines() if "parameters" in line][0]
    cells = rank_cells(job, "local|101|1", imb, scale=400 * MIB)
    assert cells["activations"].plain == render.fmt_bytes(80 * MIB) and cells["activations"].style == HI_STYLE
    assert rank_cells(job, "local|100|0", imb, scale=400 * MIB)["activations"].style == LO_STYLE
    assert cells["parameters"].style == ""
    # Before any step, live samples are compared.
    live = JobState()
    for r, act in ((0, 10), (1, 10)):
        live.apply(f"k{r}", _sample(r, _blocks(act)))
    assert not live.imbalance()["activations"].flagged and live.values("k0")["basis"] == "live"


def test_agents_are_grouped_into_jobs():
    t = 1000.0
    ddp = [{"pid": 10 + r, "rank": r, "world_size": 4, "start_time": t + r, "endpoint": "ipc:///x"} for r in range(4)]
    solo = {"pid": 99, "rank": 0, "world_size": 1, "start_time": t, "endpoint": "ipc:///y"}
    later = [{**a, "pid": a["pid"] + 100, "start_time": t + 3600} for a in ddp[:2]]
    jobs = group_jobs(ddp[::-1] + [solo] + later)
    assert [[a["pid"] for a in j] for j in jobs] == [[10, 11, 12, 13], [99], [110, 111]]
    assert pick_job(ddp, False)[0] == ddp  # one multi-rank job: the job view
    assert pick_job([solo], False) is None  # one process: the usual dashboard
    assert pick_job(ddp + [solo], False) is None  # unrelated agents: the picker
    assert len(pick_job(ddp + [solo], True)[0]) == 5  # --all
    assert member_key({"pid": 5, "rank": 1, "ssh_host": "n1"}) != member_key({"pid": 5, "rank": 1, "ssh_host": "n2"})


DDP_SCRIPT = r'''
import json, os, sys, time
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import vramtop_agent
from vramtop.tiny import build_model, make_batch

out_dir, stop_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
model = build_model(seed=0, vocab_size=512)
ddp = DDP(model)
opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
batch = make_batch(model, batch=2 + 2 * rank, seq_len=32, seed=rank)  # rank 1: twice the batch
agent = vramtop_agent.watch(ddp, opt, sample_hz=20)
deadline = time.time() + 150
while True:
    out = ddp(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    stop = torch.tensor([1 if (os.path.exists(stop_file) or time.time() > deadline) else 0])
    dist.all_reduce(stop)  # every rank stops after the same step
    if stop.item():
        break
    time.sleep(0.05)
snap = agent.snapshot()  # this rank's own accounting, on its training thread
seen = {}
for p in model.parameters():
    seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
    json.dump({"rank": rank, "world_size": world, "pid": os.getpid(), "blocks": snap["blocks"],
               "params_ref": sum(seen.values()),
               "steps": [{k: s[k] for k in ("step", "peaks", "peak", "peak_blocks", "backward_spike")}
                         for s in agent.steps]}, fh)
agent.stop()
dist.destroy_process_group()
'''


@pytest.fixture
def torchrun_job(tmp_path, runtime_dir):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    stop = tmp_path / "stop"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else sys.executable, *([] if torchrun.exists() else
           ["-m", "torch.distributed.run"]), "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tmp_path), str(stop)]
    log = open(tmp_path / "torchrun.log", "wb")
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "VRAMTOP_RUNTIME_DIR": str(runtime_dir), "GLOO_SOCKET_IFNAME": "lo",
                                  "OMP_NUM_THREADS": "1"})
    yield child, tmp_path, stop
    if child.poll() is None:
        stop.touch()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@pytest.mark.asyncio
async def test_torchrun_job_in_one_view_matches_each_ranks_accounting(torchrun_job):
    child, out_dir, stop = torchrun_job
    deadline = time.time() + 90
    agents = []
    while len(agents) < 2:
        assert child.poll() is None, (out_dir / "torchrun.log").read_text()[-2000:]
        assert time.time() < deadline, "the two ranks' agents did not appear"
        time.sleep(0.2)
        agents = discovery.list_agents()
    chosen = pick_job(agents, all_agents=False)  # what `vramtop attach` does with no argument
    assert chosen is not None
    job_agents, match = chosen
    assert sorted(a["rank"] for a in job_agents) == [0, 1] and all(a["world_size"] == 2 for a in job_agents)
    pids = {a["rank"]: a["pid"] for a in job_agents}

    app = JobApp(JobSource(job_agents, match=match), refresh_hz=10)
    async with app.run_test(size=(200, 50)) as pilot:
        job = app.job
        await until(pilot, lambda: len(job.members) == 2 and all(len(st.steps) >= 3 and st.sample and st.hello
                                                                 for st in job.members.values()),
                    timeout=60, what="three steps from both ranks")
        assert isinstance(app.screen, OverviewScreen)
        app.screen.refresh_rows()
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "2 ranks of world size 2" in text
        for rank in (0, 1):
            assert re.search(rf"(^|\s){rank}/2 \S+ {pids[rank]} ", text, re.M), rank
        imb = job.imbalance()
        assert imb["activations"].flagged and job.rank(imb["activations"].max_key) == 1  # twice the batch
        for block in ("parameters", "gradients", "optimizer"):  # DDP: the same model and optimizer on each rank
            assert not imb[block].flagged and imb[block].spread == 0, block
        assert "▲ activations" in text and "▲ gradients" not in text

        # Drill into rank 1, then back.
        await pilot.press("down")
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, OverviewScreen)
        assert app.state is job.members[app.current] and job.rank(app.current) == 1
        app._refresh_view()
        text = screen_text(app)
        assert f"pid {pids[1]}" in text and "rank 1/2" in text and "Esc: all ranks" in text
        assert f"parameters {render.fmt_bytes(app.state.sample['blocks']['parameters'])}" in text
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert isinstance(app.screen, OverviewScreen)
        # A click on rank 0's line (line 1: line 0 is the column header) drills into rank 0.
        await pilot.click("#ranks", offset=(3, 1))
        await pilot.pause(0.3)
        assert not isinstance(app.screen, OverviewScreen) and job.rank(app.current) == 0
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert isinstance(app.screen, OverviewScreen)

        stop.touch()
        await until(pilot, lambda: child.poll() is not None, timeout=60, what="the job to finish")
        await pilot.pause(0.5)  # the ranks' last frames
        await pilot.press("q")

    assert child.returncode == 0, (out_dir / "torchrun.log").read_text()[-2000:]
    for rank in (0, 1):
        own = json.loads((out_dir / f"rank{rank}.json").read_text())
        key = next(k for k in job.members if job.rank(k) == rank)
        st = job.members[key]
        assert own["pid"] == pids[rank] == st.hello["pid"]
        # Parameters: the stream = the rank's own snapshot = the model's storages.
        assert st.sample["blocks"]["parameters"] == own["blocks"]["parameters"] == own["params_ref"]
        assert st.sample["blocks"]["optimizer"] == own["blocks"]["optimizer"] > 0
        # Every step the view received is exactly the one that rank recorded.
        mine = {s["step"]: s for s in own["steps"]}
        seen = [s for s in st.steps if s["step"] in mine]
        assert len(seen) >= 3
        for s in seen:
            ref = mine[s["step"]]
            assert (s["peaks"], s["peak"], s["peak_blocks"], s["backward_spike"]) == \
                (ref["peaks"], ref["peak"], ref["peak_blocks"], ref["backward_spike"])
    r0, r1 = (json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["steps"][-1]["peak_blocks"]["activations"] > r0["steps"][-1]["peak_blocks"]["activations"]


@pytest.mark.asyncio
async def test_bare_vramtop_shows_the_gpus_until_an_agent_starts():
    """No agent: NVML's GPUs and processes, or one line saying there is no driver; then the agent, once it starts."""
    import vramtop_agent
    from vramtop.gpus import NodeSource, list_gpus
    from vramtop.tiny import build_model
    from vramtop.tui.app import VramtopApp

    report = list_gpus()
    app = VramtopApp(NodeSource(), refresh_hz=10)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause(0.5)
        text = screen_text(app)
        if report.error:  # this machine: no NVIDIA driver
            assert "no NVIDIA driver on this machine" in text or "NVML" in text
            assert "showing vramtop agents as they start" in text
        else:  # a GPU node: every GPU, with its memory
            assert "GPUs on this machine" in text and report.gpus[0].name in text
        assert "no vramtop agent on this machine yet" in text
        agent = vramtop_agent.watch(build_model(vocab_size=512), sample_hz=20)
        try:
            await until(pilot, lambda: app.state.sample is not None, timeout=20, what="the agent's first sample")
            app._refresh_view()
            text = screen_text(app)
            assert f"pid {os.getpid()}" in text and "parameters" in text
            assert "showing vramtop agents as they start" not in text
        finally:
            agent.stop()


def test_job_table_gives_up_pid_then_node_when_narrow():
    from vramtop.tui.job_render import COLUMNS, columns_for
    from vramtop_agent.schema import BLOCK_KEYS

    def cells(cols):
        return sum(w for *_, w in cols) + len(cols) - 1

    assert columns_for(None) == COLUMNS == columns_for(cells(COLUMNS))
    narrow = columns_for(118)  # a 120-column terminal less the padding
    keys = [c[0] for c in narrow]
    assert "pid" not in keys and "node" not in keys
    assert {"rank", "peak", "step", "step_time", "state", *BLOCK_KEYS} <= set(keys)
    assert cells(narrow) <= 118
