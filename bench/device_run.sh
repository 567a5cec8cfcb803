#!/usr/bin/env bash
# The GPU session's checks in one go (see bench/gpu_validate.py). Run from the repo root on a CUDA box:
#   bash bench/device_run.sh OUTDIR [PART ...]
# PARTS: validate (blocks, phase peaks, derived activations, overhead ratios: ~5.5 min), tests (~2 min),
# screenshot (~1 min), alarms (~3.5 min), inject (~4 min), estimator (~5 min: 8 rows, the execution-only
# settings and Flan-T5-XL first; `python3 bench/gpu_estimator.py --list --quick` prints them, no GPU needed).
# All of them take ~21 min, more than one device session lends (15 min, 10 a command): the default is
# "validate tests"; run the rest in a second call.
# Expects wheels for what the box lacks in .whl/ (pyzmq, textual, bitsandbytes, ...).
set -u
OUT=${1:-/tmp/vramtop-gpu}
shift || true
PARTS=${*:-validate tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; }
  export PYTHONPATH=/tmp/site:$PWD:$PWD/agent
else
  export PYTHONPATH=$PWD:$PWD/agent
fi
nvidia-smi -L
python3 -c "import torch, zmq, textual; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zmq', zmq.__version__)"
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
want() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if want validate; then
  echo "== gpu_validate =="
  timeout 330 python3 bench/gpu_validate.py --budget-s 300 --json "$OUT/gpu_validate.json" 2>&1 | tee "$OUT/gpu_validate.log"
fi
if want tests; then
  echo "== gpu tests =="
  timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -4
fi
if want screenshot; then
  echo "== screenshot of the dashboard on the GPU =="
  timeout 70 python3 bench/gpu_screenshot.py "$OUT/dashboard-gpu.svg" --seconds 30 2>&1 | grep -v -i warn | tail -8
fi
if want alarms; then
  echo "== budgets and creep on the GPU (issue 15) =="
  timeout 200 python3 bench/gpu_alarms.py --json "$OUT/gpu_alarms.json" 2>&1 | grep -E "^(PASS|FAIL|SKIP)" | tee "$OUT/gpu_alarms.log"
fi
if want inject; then
  echo "== injection into a running CUDA job (docs/attach.md; needs ptrace on the box) =="
  timeout 240 python3 bench/bench_inject.py --device cuda --runs 2 --steps 20 2>&1 | tail -4
fi
if want estimator; then
  echo "== estimator: three peaks vs max_memory_allocated / max_memory_reserved / NVML =="
  timeout 300 python3 bench/gpu_estimator.py --quick --budget-s 280 --json "$OUT/gpu_estimator.json" 2>&1 | grep -v -i warn | tail -16
fi
