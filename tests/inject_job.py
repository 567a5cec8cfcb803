"""A plain LoRA fine-tune that knows nothing about vramtop: the target of tests/test_inject.py and bench_inject.py.

python inject_job.py OUT_DIR [EXIT_CODE]. Trains a tiny Llama (random weights, from a config) with PEFT LoRA
and AdamW until OUT_DIR/stop exists (or STEPS steps); prints one `loss STEP VALUE SECONDS END_UNIX_TIME` line per step;
writes OUT_DIR/truth.json (its own tensors' bytes) after the first step and OUT_DIR/hooks.json (the global
hooks left in torch) at the end.
"""

import json
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

out = sys.argv[1]
code = int(sys.argv[2]) if len(sys.argv) > 2 else 0
max_steps = int(os.environ.get("STEPS", "100000"))
pause = float(os.environ.get("STEP_PAUSE", "0.02"))
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
cfg._attn_implementation = "eager"
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
device = os.environ.get("DEVICE", "cpu")  # bench/bench_inject.py --device cuda on a GPU machine
model = model.to(device)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)


def nbytes(tensors):
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


step = 0
while step < max_steps and not os.path.exists(os.path.join(out, "stop")):
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if step == 0:
        grads = nbytes([p.grad for p in model.parameters() if p.grad is not None])
    opt.step()
    if step == 0:
        truth = {"parameters": nbytes(list(model.parameters())), "gradients": grads,
                 "optimizer": nbytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])}
        with open(os.path.join(out, "truth.json.tmp"), "w") as fh:
            json.dump(truth, fh)
        os.replace(os.path.join(out, "truth.json.tmp"), os.path.join(out, "truth.json"))
    opt.zero_grad(set_to_none=True)
    print(f"loss {step} {loss.item():.8f} {time.perf_counter() - t0:.6f} {time.time():.6f}", flush=True)
    step += 1
    time.sleep(pause)

from torch.nn.modules import module as _m  # noqa: E402
from torch.optim import optimizer as _o  # noqa: E402

hooks = {"forward_pre": len(_m._global_forward_pre_hooks), "forward": len(_m._global_forward_hooks),
         "opt_pre": len(_o._global_optimizer_pre_hooks), "opt_post": len(_o._global_optimizer_post_hooks),
         "model_hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())}
with open(os.path.join(out, "hooks.json"), "w") as fh:
    json.dump(hooks, fh)
sys.exit(code)
