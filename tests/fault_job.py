"""A small training job for the fault tests, driven over stdin (not a test module).

    python tests/fault_job.py '{"watch": {...}, "inject": "edge", "outbox_limit": 8}'

Prints `ready {"pid": ..., "endpoint": ...}`, then obeys one command per line:
  run N    train N steps; prints `times [seconds of each step]`
  exit     stop the agent; prints `done {counters}`; exits 0
A plain torch MLP keeps start-up short (no transformers import).
"""

import json
import math
import sys
import time

import torch

import vramtop_agent
import vramtop_agent.agent as agent_mod


def main() -> int:
    opts = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if opts.get("outbox_limit"):
        agent_mod.OUTBOX_LIMIT = int(opts["outbox_limit"])
    width = int(opts.get("width", 256))
    model = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    agent = vramtop_agent.watch(model, opt, **opts.get("watch", {}))

    inject = opts.get("inject")
    if inject == "edge":  # every phase edge raises inside the agent
        def broken_edge(*a, **k):
            raise RuntimeError("injected fault in a phase hook")
        agent._edge = broken_edge
    elif inject == "grad":  # the post-accumulate-grad hook raises (autograd calls it; tracked steps only)
        def broken_grad(param):
            raise RuntimeError("injected fault in a gradient hook")
        agent.acct.note_grad = broken_grad
    elif inject == "grad-read":  # the one gradient read at the end of every backward raises (autograd calls it)
        def broken_read(*_args):
            raise RuntimeError("injected fault in the gradient read")
        agent.acct.read_grads = broken_read

    print("ready " + json.dumps({"pid": agent.pid, "endpoint": agent.endpoint}), flush=True)
    x = torch.randn(int(opts.get("batch", 64)), width)
    y = torch.randn_like(x)
    loss = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            times = []
            for _ in range(int(cmd[1])):
                t0 = time.perf_counter()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            print("times " + json.dumps(times), flush=True)
        elif cmd[0] == "sleep":
            time.sleep(float(cmd[1]))
            print("slept", flush=True)
        elif cmd[0] == "exit":
            break
    agent.stop()
    counts = {"errors": agent.errors, "dropped": agent.dropped, "steps": agent.step,
              "error_counts": dict(agent._error_counts), "last_error": agent.last_error,
              "loss_finite": loss is None or math.isfinite(float(loss))}
    print("done " + json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
