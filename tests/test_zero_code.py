"""Zero-code start: unmodified training scripts run under `python -m vramtop_agent`, `vramtop run`,
VRAMTOP_RECORD with torchrun, and the in-process root detection of `watch()` with no model.

Everything is real: subprocesses with the installed .pth / the sitecustomize bootstrap, the agent's
ipc socket read through a SUB socket, recordings read back with vramtop.recording.
"""

import os
import site
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import agent_of, job_env

import vramtop_agent
from vramtop.recording import open_recording
from vramtop.subscriber import Subscriber
from vramtop_agent import discovery
from vramtop_agent.autodetect import RootDetector, unwrap
from vramtop_agent.schema import PHASES

# A plain PyTorch script that knows nothing about vramtop. Part of the model is frozen.
TRAIN = textwrap.dedent("""
    import os, sys, time, torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(8, 64), torch.randn(8, 4)
    with torch.no_grad():
        model(x)  # an evaluation forward first: not a training root
    stop = os.environ.get("STOP_FILE")
    steps, i, deadline = int(sys.argv[1]), 0, time.time() + 60
    while i < steps or (stop and not os.path.exists(stop) and time.time() < deadline):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        i += 1
        if stop:
            time.sleep(0.02)
    print("argv=" + repr(sys.argv))
    print("name=" + __name__)
    sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
""")
FROZEN = 64 * 128 + 128
TRAINABLE = 128 * 4 + 4

DDP_TRAIN = textwrap.dedent("""
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 16), torch.randn(4, 2)
    for _ in range(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    dist.destroy_process_group()
""")


FSDP_TRAIN = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + sys.argv[1])
    torch.manual_seed(0)
    def net():
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    model = net()
    fully_shard(model[0])
    fully_shard(model)  # FSDP2: no wrapper, the model's class becomes FSDPSequential
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 16), torch.randn(4, 2)
    for _ in range(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    from vramtop_agent.introspect import describe_model
    fsdp1 = FullyShardedDataParallel(net(), device_id=torch.device("cpu"))
    print(json.dumps(describe_model(fsdp1)["sharding"]))
    dist.destroy_process_group()
""")


@pytest.fixture
def train_py(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(TRAIN)
    return path


def test_python_m_vramtop_agent_publishes_real_steps(train_py, tmp_path):
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-m", "vramtop_agent", str(train_py), "3", "5", "--flag"],
                            cwd=tmp_path, env=job_env(STOP_FILE=str(stop)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        info = agent_of(proc.pid, timeout=60.0, proc=proc)
        assert info["rank"] == 0 and info["endpoint"].startswith("ipc://")
        sub = Subscriber(info["endpoint"])
        got, deadline = [], time.time() + 30
        try:
            while time.time() < deadline:
                got += sub.poll(50)
                # A sample of step >= 1: taken once training ran (the I/O thread's fallback tick can
                # sample before the first training forward, when there is no model to count yet).
                if len([m for m in got if m["type"] == "step"]) >= 3 and any(
                        m["type"] == "hello" and m.get("optimizer") for m in got) and any(
                        m["type"] == "sample" and m["step"] >= 1 for m in got):
                    break
        finally:
            sub.close()
        stop.write_text("")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The script ran as `python train.py 3 5 --flag` would: argv, __main__, exit status.
    assert proc.returncode == 5, err
    assert f"argv={[str(train_py), '3', '5', '--flag']!r}" in out
    assert "name=__main__" in out
    assert "vramtop:" not in err, err

    hello = [m for m in got if m["type"] == "hello" and m.get("model")][-1]
    assert hello["model"]["class"] == "Sequential"  # the root, found without being told
    assert hello["model"]["params_total"] == FROZEN + TRAINABLE
    assert hello["model"]["params_trainable"] == TRAINABLE
    assert hello["model"]["summary"] == "partial"
    assert [m for m in got if m["type"] == "hello" and m.get("optimizer")][-1]["optimizer"]["class"] == "AdamW"
    sample = [m for m in got if m["type"] == "sample" and m["step"] >= 1][-1]
    assert sample["params_split"]["frozen"] == 4 * FROZEN  # frozen weights told apart
    assert sample["params_split"]["trainable"] == 4 * TRAINABLE
    assert sample["blocks"]["parameters"] == 4 * (FROZEN + TRAINABLE)
    steps = [m for m in got if m["type"] == "step"]
    for s in steps:
        assert s["batch"] == [8, 64] and s["micro_steps"] == 1
        assert all(s["peaks"][p] > 0 for p in PHASES)
        assert s["peak_blocks"]["parameters"] == 4 * (FROZEN + TRAINABLE)
    # Phase edges of a whole step, in order.
    edges = [(m["phase"], m["edge"]) for m in got if m["type"] == "phase" and m["step"] == steps[-1]["step"]]
    assert edges == [("forward", "start"), ("backward", "start"), ("backward", "end"),
                     ("optimizer", "start"), ("optimizer", "end")]
    # The agent stopped at exit: its discovery file is gone.
    assert all(i["pid"] != proc.pid for i in discovery.list_agents(clean=False))


def test_exceptions_and_exit_status_are_the_scripts(tmp_path):
    boom = tmp_path / "boom.py"
    boom.write_text("import sys\nprint('argv', sys.argv[1:])\ndef f():\n    raise KeyError('nope')\nf()\n")
    bare = subprocess.run([sys.executable, str(boom), "a"], capture_output=True, text=True, cwd=tmp_path,
                          env=job_env())
    watched = subprocess.run([sys.executable, "-m", "vramtop_agent", str(boom), "a"], capture_output=True,
                             text=True, cwd=tmp_path, env=job_env())
    assert watched.returncode == bare.returncode == 1
    assert watched.stdout == bare.stdout
    assert watched.stderr == bare.stderr  # same traceback, starting at the script
    missing = subprocess.run([sys.executable, "-m", "vramtop_agent", str(tmp_path / "nope.py")],
                             capture_output=True, text=True, env=job_env())
    assert missing.returncode == 2 and "can't open file" in missing.stderr


def test_vramtop_run_records_the_job_and_returns_its_status(train_py, tmp_path):
    rec = tmp_path / "run.vramtop"
    res = subprocess.run([sys.executable, "-m", "vramtop", "run", "--record", str(rec), "--",
                          sys.executable, str(train_py), "3", "7"],
                         capture_output=True, text=True, cwd=tmp_path, env=job_env(), timeout=120)
    assert res.returncode == 7, res.stderr
    assert "vramtop: agent not started" not in res.stderr
    with open_recording(str(rec)) as r:
        (session,) = r.sessions()
        assert session.model_class == "Sequential"
        assert session.params_trainable == TRAINABLE and session.params_total == FROZEN + TRAINABLE
        steps = r.steps()
        assert [s["step"] for s in steps] == [0, 1, 2]
        assert all(s["peaks"]["backward"] > 0 for s in steps)
        assert any(e["type"] == "bye" for e in r.events())


def test_vramtop_run_propagates_signals_as_exit_status(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vramtop", "run", "--no-tui", "--", "sh", "-c", "kill -TERM $$"],
                         capture_output=True, text=True, env=job_env(), timeout=60)
    assert res.returncode == 128 + 15
    res = subprocess.run([sys.executable, "-m", "vramtop", "run", "--", "no-such-command-vramtop"],
                         capture_output=True, text=True, env=job_env(), timeout=60)
    assert res.returncode == 127 and res.stderr.strip() == "vramtop: command not found: no-such-command-vramtop"


def test_env_record_with_torchrun_gives_each_rank_its_stream(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_TRAIN)
    pattern = str(tmp_path / "r-{rank}.vramtop")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env=job_env(VRAMTOP_RECORD=pattern), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "vramtop: agent not started" not in res.stderr
    files = sorted(p.name for p in tmp_path.glob("r-*.vramtop"))
    assert files == ["r-0.vramtop", "r-1.vramtop"]  # the launcher, which trains nothing, records nothing
    for rank in (0, 1):
        with open_recording(str(tmp_path / f"r-{rank}.vramtop")) as r:
            (session,) = r.sessions()
            assert session.rank == rank
            hello = session.hello
            assert hello["world_size"] == 2 and hello["local_rank"] == rank
            model = hello["model"]
            assert model["class"] == "DistributedDataParallel(Sequential)"  # the wrapper is the root
            assert model["sharding"] == {"kind": "ddp", "wrappers": ["DistributedDataParallel"]}
            assert model["params_total"] == 16 * 32 + 32 + 32 * 2 + 2
            assert len(r.steps()) == 3


def test_fsdp_roots_are_found_and_described(tmp_path):
    import json

    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_TRAIN)
    rec = tmp_path / "fsdp.vramtop"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "rdzv")], capture_output=True, text=True,
                         cwd=tmp_path, env=job_env(VRAMTOP_RECORD=str(rec)), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    # FSDP1 (a wrapper module): strategy (NO_SHARD: world size 1) and the wrapper named.
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {
        "kind": "fsdp", "units": 1, "strategy": "NO_SHARD", "wrappers": ["FullyShardedDataParallel"]}
    with open_recording(str(rec)) as r:
        (session,) = r.sessions()
        model = session.hello["model"]
        assert model["class"] == "FSDPSequential" and model["sharding"] == {"kind": "fsdp2", "units": 2}
        assert model["summary"] == "full · FSDP2"
        assert [s["step"] for s in r.steps()] == [0, 1]


def test_pth_is_installed_and_costs_nothing_when_off(tmp_path):
    pths = [os.path.join(d, "vramtop-autostart.pth") for d in site.getsitepackages()]
    assert any(os.path.exists(p) for p in pths), "vramtop-autostart.pth is not installed: pip install -e ."
    probe = ("import sys; print('vramtop_agent' in sys.modules, 'vramtop_agent._autostart' in sys.modules, "
             "'torch' in sys.modules, [type(f).__name__ for f in sys.meta_path][0])")
    off = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=job_env())
    assert off.stdout.split()[:3] == ["False", "False", "False"], off
    off0 = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=job_env(VRAMTOP="0"))
    assert off0.stdout.split()[:2] == ["False", "False"]
    on = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=job_env(VRAMTOP="1"))
    # On: a watcher for `import torch`, and nothing heavy imported (no torch, no agent).
    assert on.stdout.split() == ["True", "True", "False", "_TorchImportWatcher"], on
    assert on.stderr == ""


def test_sitecustomize_bootstrap_loads_the_agent_and_chains(tmp_path):
    from vramtop.commands.run import boot_dir, child_env

    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE'] = 'ran'\n")
    env = child_env(job_env(PYTHONPATH=str(user)))
    assert env["PYTHONPATH"].split(os.pathsep) == [boot_dir(), str(user)]
    assert env["VRAMTOP"] == "1"
    # -S: no site-packages, no .pth; the bootstrap alone must find vramtop_agent (VRAMTOP_AGENT_PATH).
    code = ("import sys; sys.path[:0] = __import__('os').environ['PYTHONPATH'].split(':'); import sitecustomize; "
            "import os; print(os.environ.get('USER_SITECUSTOMIZE'), 'vramtop_agent._autostart' in sys.modules, "
            "type(sys.meta_path[0]).__name__, sys.modules['sitecustomize'].__file__)")
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)
    assert res.stderr == ""
    chained, started, finder, module = res.stdout.split()
    assert (chained, started, finder) == ("ran", "True", "_TorchImportWatcher")
    assert module == str(user / "sitecustomize.py")


def test_bootstrap_failure_is_one_line_and_the_job_runs(train_py, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the agent's runtime dir cannot be created: it cannot publish
    res = subprocess.run([sys.executable, str(train_py), "2", "0"], capture_output=True, text=True, cwd=tmp_path,
                         env=job_env(VRAMTOP="1", VRAMTOP_RUNTIME_DIR=str(blocker / "rt")), timeout=120)
    assert res.returncode == 0
    assert "argv=" in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vramtop: agent not publishing"), res.stderr


# ---------------------------------------------------------------------------- in process


def _tiny_lora():
    from vramtop.tiny import add_lora, build_model, make_batch

    model = add_lora(build_model(vocab_size=512, num_hidden_layers=2))
    return model, make_batch(model, 2, 16)


def test_watch_without_model_finds_the_root_and_tells_adapters_apart(list_sink):
    model, batch = _tiny_lora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        model(**batch)  # generation / evaluation before training: ignored
    agent = vramtop_agent.watch(publish=False, sinks=[list_sink], sample_hz=0)
    try:
        assert agent.model is None
        with torch.no_grad():
            model(**batch)
        assert agent.model is None
        for _ in range(2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert agent.model is model and agent.optimizer is opt
        # The detector is gone: no global module hooks left behind.
        from torch.nn.modules import module as M

        assert not any(isinstance(getattr(h, "__self__", None), RootDetector)
                       for h in list(M._global_forward_pre_hooks.values()) + list(M._global_forward_hooks.values()))
        steps = list(agent.steps)
        assert [s["step"] for s in steps] == [0, 1]
        assert steps[0]["batch"] == [2, 16]  # read from the first call's keyword arguments
        bd = agent.breakdown()
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        assert bd.trainable == sum(p.numel() * p.element_size() for p in adapters)
        assert bd.frozen == sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        info = agent.hello_fields()["model"]
        assert info["method"] == "lora" and info["lora"]["ranks"] == [8]
        assert info["lora"]["targets"] == ["q_proj", "v_proj"] and info["autocast"] == "off"
    finally:
        agent.stop()


def test_root_is_the_outermost_trainable_module():
    inner = torch.nn.Linear(4, 4)
    outer = torch.nn.Sequential(torch.nn.Identity(), inner)
    loss_fn = torch.nn.MSELoss()  # parameter-free top-level module: never the root
    teacher = torch.nn.Linear(4, 4).requires_grad_(False)  # frozen model run with grad on: never the root
    found = []
    det = RootDetector(lambda m, a, k: found.append(m)).install()
    try:
        x = torch.randn(2, 4)
        teacher(x)
        loss_fn(x, x)
        assert found == []
        out = outer(x)
        loss_fn(out, x)
        assert found == [outer]
    finally:
        det.remove()
    wrapped = torch.nn.DataParallel(outer)  # CPU: DataParallel just calls the module
    assert unwrap(wrapped) is outer
