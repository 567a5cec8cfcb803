"""bench/gpu_estimator.py without a GPU: the matrix the GPU session will run is well-formed and its code runs.

The GPU session is short and rare; a row that cannot even build its config, or whose training code has a
typo, would spend it. `--list` builds every row's config on the meta device and validates its estimator
setup; `--smoke` runs the rows' real training steps and estimates on the CPU with tiny configs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_estimator.py")
SETTINGS = ("chunked loss", "optim in backward", "offload activations", "offload optimizer")


def _bench(*argv: str) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, BENCH, *argv], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_every_row_builds_and_the_quick_set_covers_the_new_settings():
    full = _bench("--list").splitlines()
    assert full[-1] == "54 rows"   # 4 families x 2 methods x 3 lengths x 2 checkpointing + 6 setting rows
    quick = _bench("--list", "--quick").splitlines()
    rows = quick[1:-1]
    for setting in SETTINGS:
        assert sum(setting in r for r in rows) == 1, setting
    t5 = [r for r in rows if "flan-t5-xl" in r]
    assert len(t5) == 2 and all("target 128" in r for r in t5) and {"lora", "qlora"} <= {r.split()[3] for r in t5}
    # >= 1B parameters each, as the GPU targets were set for (the printed size is the meta build's).
    assert all(float(r.split()[2].rstrip("B")) >= 1.0 for r in rows)


@pytest.mark.slow
def test_every_quick_row_trains_and_estimates_on_the_cpu():
    out = _bench("--smoke", "--quick").splitlines()
    ok = [line for line in out if line.startswith("ok ")]
    assert len(ok) == 8, out
    # The real steps freed every gradient (zero_grad, the in-backward hooks, the offload's hand-over to the
    # host) and the offloading rows report host memory.
    assert all(line.endswith("grads left 0") for line in ok)
    for line in ok:
        host = float(line.split("host")[1].split("MiB")[0])
        assert (host > 0) == ("offload" in line), line
