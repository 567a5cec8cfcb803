"""Framework integrations and method detection, on CPU with the real libraries.

- a transformers Trainer LoRA run (bf16 autocast, gradient accumulation) and a QLoRA run (bitsandbytes NF4
  with double quant, gradient checkpointing, bitsandbytes 8-bit AdamW), both through VramtopCallback;
- QLoRA / 8-bit parameter bytes byte-exact against the bitsandbytes tensors and their quant states;
- a Lightning fit through its VramtopCallback, with the metrics reaching a real logger (CSV).
"""

import csv
import warnings

import pytest
import torch

from vramtop_agent.introspect import describe_optimizer
from vramtop_agent.schema import BLOCK_KEYS, PHASES, validate

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

MIB = float(1 << 20)
TINY = dict(vocab_size=512, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vramtop.tiny import build_model

    path = tmp_path_factory.mktemp("tiny") / "llama"
    build_model(**TINY).save_pretrained(str(path))
    return str(path)


def _dataset(model, n=8, seq_len=32):
    from vramtop.tiny import make_batch

    b = make_batch(model, n, seq_len)
    return [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for i in range(n)]


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                report_to="none", use_cpu=True, dataloader_num_workers=0, save_strategy="no", disable_tqdm=True,
                learning_rate=1e-3)
    base.update(kw)
    return TrainingArguments(**base)


class LogCatcher(transformers.TrainerCallback):
    """Stands in for a reporter (TensorBoard, W&B, MLflow): it comes before user callbacks in Trainer's list."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _of(sink, kind):
    return [m for m in sink.messages if m["type"] == kind]


def _hello_with(sink, *path):
    """The newest hello that carries `path` (hellos are re-sent; one built just before a change may arrive after)."""
    for m in reversed(_of(sink, "hello")):
        node = m
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return m
    raise AssertionError(f"no hello with {'.'.join(path)}")


def _quant_tensors(p):
    qs = p.quant_state
    return [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]


def _storage_bytes(tensors):
    """Distinct storages by data pointer: an independent key from the agent's."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_hf_trainer_lora_through_the_callback(tmp_path, list_sink):
    from transformers import Trainer

    from vramtop.tiny import add_lora, build_model
    from vramtop_agent.integrations.hf import VramtopCallback

    model = add_lora(build_model(**TINY))
    reporter = LogCatcher()
    cb = VramtopCallback(publish=False, sinks=[list_sink], sample_hz=0)
    trainer = Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2, bf16=True),
                      train_dataset=_dataset(model), callbacks=[reporter, cb])
    assert trainer.callback_handler.callbacks[0] is cb  # moved ahead of the reporters
    trainer.train()

    for m in list_sink.messages:
        validate(m)
    steps = _of(list_sink, "step")
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert all(s["micro_steps"] == 2 and s["batch"] == [2, 32] for s in steps)  # gradient accumulation
    hello = _hello_with(list_sink, "model", "autocast")
    assert hello["training"] == {
        "framework": "transformers", "args_class": "TrainingArguments", "per_device_batch": 2, "grad_accum": 2,
        "world_size": 1, "effective_batch": 4, "grad_ckpt": False, "precision": "bf16",
        "optim": trainer.args.optim.value, "max_steps": 3}
    model_info = hello["model"]
    assert model_info["method"] == "lora" and model_info["class"] == "PeftModelForCausalLM(LlamaForCausalLM)"
    assert model_info["lora"]["ranks"] == [8] and model_info["lora"]["targets"] == ["q_proj", "v_proj"]
    assert model_info["lora"]["adapter_params"] == model_info["params_trainable"]
    assert model_info["autocast"] == "bfloat16"  # seen inside the forward, under accelerate's autocast
    assert model_info["summary"] == "LoRA r=8 q_proj,v_proj · autocast bfloat16"
    assert [m["optimizer"]["class"] for m in _of(list_sink, "hello") if m.get("optimizer")][-1] == "AdamW"
    assert _of(list_sink, "bye")[-1]["reason"] == "finished"

    # The reporter saw the blocks and phase peaks in the logs of every training step.
    train_logs = [lg for lg in reporter.logs if "loss" in lg]
    assert len(train_logs) == 3
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for i, lg in enumerate(train_logs):
        assert lg["vramtop/parameters_mib"] * MIB == params_bytes
        for key in BLOCK_KEYS:
            assert f"vramtop/{key}_mib" in lg
        for phase in PHASES:
            assert lg[f"vramtop/peak_{phase}_mib"] * MIB == steps[i]["peaks"][phase]
        assert lg["vramtop/peak_mib"] * MIB == steps[i]["peak"]
        assert lg["vramtop/at_peak_activations_mib"] * MIB == steps[i]["peak_blocks"]["activations"] > 0
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history[-1]["vramtop/peak_backward_mib"] == train_logs[-1]["vramtop/peak_backward_mib"]


def test_hf_trainer_qlora_nf4_through_the_callback(tmp_path, tiny_checkpoint, list_sink):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer

    from vramtop_agent.integrations.hf import VramtopCallback

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=quant, device_map="cpu")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    linears4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears4) == 2 * 7
    cb = VramtopCallback(publish=False, sinks=[list_sink], sample_hz=0)
    from transformers import TrainingArguments

    # transformers 5 names it activation_checkpointing; 4.x gradient_checkpointing.
    ckpt = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    args = _args(tmp_path, max_steps=2, optim="adamw_bnb_8bit",
                 **{f"{ckpt}_checkpointing": True, f"{ckpt}_checkpointing_kwargs": {"use_reentrant": False}})
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(model), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    steps = _of(list_sink, "step")
    assert [s["step"] for s in steps] == [0, 1]
    hello = _hello_with(list_sink, "training")
    info = hello["model"]
    assert info["method"] == "qlora"
    assert info["quant"] == {"bits": 4, "type": "nf4", "double_quant": True, "blocksize": 64,
                             "compute_dtype": "float32", "storage": "uint8", "quantized": True, "modules": 14,
                             "params": sum(m.in_features * m.out_features for m in linears4)}
    assert info["grad_ckpt"] is True and info["dtype"] == "nf4"
    assert info["summary"] == "QLoRA r=8 q_proj,v_proj · nf4 dq · grad-ckpt"
    assert info["params_total"] == sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features - m.weight.numel() for m in linears4)  # 4-bit weights counted unpacked
    assert hello["training"]["grad_ckpt"] is True and hello["training"]["optim"] == "adamw_bnb_8bit"
    assert hello["training"]["grad_ckpt_kwargs"] == {"use_reentrant": False}
    opt_info = [m["optimizer"] for m in _of(list_sink, "hello") if m.get("optimizer")][-1]
    # Trainer builds bitsandbytes.optim.AdamW(optim_bits=8) for "adamw_bnb_8bit".
    assert {k: opt_info[k] for k in ("class", "library", "bits", "paged")} == {
        "class": "AdamW", "library": "bitsandbytes", "bits": 8, "paged": False}

    # Byte-exact: the packed NF4 weights plus absmax and quantization maps (double quant), per bitsandbytes.
    from vramtop_agent.accounting import Accountant

    quantized = []
    for m in linears4:
        w = m.weight
        qs = w.quant_state
        n = qs.shape[0] * qs.shape[1]
        assert w.untyped_storage().nbytes() == n // 2  # two 4-bit weights per byte
        assert qs.absmax.dtype == torch.uint8 and qs.absmax.numel() == n // qs.blocksize  # double quant: 8-bit absmax
        quantized += [w, *_quant_tensors(w)]
    everything = list(model.parameters()) + quantized
    bd = Accountant(model).breakdown()
    assert bd.quantized == _storage_bytes(quantized)
    assert bd.blocks("cpu")["parameters"] == _storage_bytes(everything)
    assert bd.trainable == _storage_bytes([p for p in model.parameters() if p.requires_grad])
    assert bd.frozen == _storage_bytes(everything) - bd.trainable
    # The stream said the same during training.
    assert all(s["peak_blocks"]["parameters"] == bd.blocks("cpu")["parameters"] for s in steps)


def test_int8_weights_count_their_scales(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from vramtop_agent.accounting import Accountant
    from vramtop_agent.introspect import describe_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tiny_checkpoint, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    linears8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert linears8
    int8 = []
    for m in linears8:
        assert m.weight.dtype == torch.int8 and m.weight.SCB.dtype == torch.float32
        int8 += [m.weight, m.weight.SCB]
    bd = Accountant(model).breakdown()
    assert bd.quantized == _storage_bytes(int8)
    assert bd.blocks("cpu")["parameters"] == _storage_bytes(list(model.parameters()) + int8)
    info = describe_model(model)
    assert info["quant"]["bits"] == 8 and info["quant"]["modules"] == len(linears8) and info["dtype"] == "int8"


def test_bitsandbytes_optimizers_are_described():
    p = torch.nn.Parameter(torch.randn(8192))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paged = bnb.optim.PagedAdamW8bit([p])
        p.grad = torch.randn_like(p)
        paged.step()
    info = describe_optimizer(paged)
    assert info == {"class": "PagedAdamW8bit", "library": "bitsandbytes", "bits": 8, "paged": True,
                    "state_dtype": "uint8"}
    assert describe_optimizer(torch.optim.SGD([p], lr=0.1)) == {"class": "SGD"}


def test_lightning_fit_through_the_callback(tmp_path, list_sink):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from vramtop_agent.integrations.lightning import VramtopCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

        def training_step(self, batch, batch_idx):  # calls a submodule, not self(...)
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 32), torch.randn(32, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    cb = VramtopCallback(publish=False, sinks=[list_sink], sample_hz=0)
    module = Module()
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, precision="bf16-mixed", callbacks=[cb],
                         logger=CSVLogger(str(tmp_path)), log_every_n_steps=1, accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)

    steps = _of(list_sink, "step")
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert all(s["micro_steps"] == 2 and s["batch"] == [4, 32] for s in steps)
    for s in steps:  # forward and backward run inside optimizer.step(closure): the update comes after
        edges = [(m["phase"], m["edge"]) for m in _of(list_sink, "phase") if m["step"] == s["step"]]
        assert edges == [("forward", "start"), ("backward", "start"), ("backward", "end")] * 2 + [
            ("optimizer", "start"), ("optimizer", "end")]
        assert all(s["peaks"][p] > 0 for p in PHASES)
    hello = _hello_with(list_sink, "model", "autocast")
    assert hello["training"] == {"framework": "lightning", "precision": "bf16-mixed", "grad_accum": 2,
                                 "world_size": 1, "strategy": "SingleDeviceStrategy", "grad_ckpt": False,
                                 "max_steps": 3, "per_device_batch": 4, "effective_batch": 8}
    assert hello["model"]["class"] == "Module" and hello["model"]["autocast"] == "bfloat16"
    assert _of(list_sink, "bye")[-1]["reason"] == "finished"

    params_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert trainer.logged_metrics["vramtop/parameters_mib"].item() * MIB == pytest.approx(params_bytes, rel=1e-6)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("vramtop/peak_backward_mib")]
    assert len(logged) == 3  # one per optimizer step, through the real logger
    assert float(logged[-1]["vramtop/peak_backward_mib"]) * MIB == pytest.approx(steps[-1]["peaks"]["backward"],
                                                                                  rel=1e-6)


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_a_step_with_a_closure_starts_the_optimizer_phase_when_the_closure_returns(list_sink, how):
    """`optimizer.step(closure)` (SAM-like optimizers, LBFGS with one evaluation, Lightning by keyword):
    forward and backward run inside step(), so its optimizer phase begins after them, whichever way the
    closure is passed."""
    import vramtop_agent

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0)
    x = torch.randn(4, 8)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    losses = [opt.step(closure) if how == "positional" else opt.step(closure=closure) for _ in range(3)]
    agent.drain()
    agent.stop()
    assert all(isinstance(loss, torch.Tensor) for loss in losses)  # step() still returns the closure's loss
    assert [s["step"] for s in _of(list_sink, "step")] == [0, 1, 2]
    for step in range(3):
        edges = [(m["phase"], m["edge"]) for m in _of(list_sink, "phase") if m["step"] == step]
        assert edges == [("forward", "start"), ("backward", "start"), ("backward", "end"),
                         ("optimizer", "start"), ("optimizer", "end")]
    assert agent.errors == 0, agent.last_error


def test_lbfgs_evaluating_its_closure_several_times_is_one_step_with_as_many_micro_steps(list_sink):
    """LBFGS(max_iter > 1) runs the closure (forward and backward) several times inside one step():
    every step still ends, each evaluation is a micro-step, and the optimizer phase resumes after each."""
    import vramtop_agent

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    evaluations = []
    for _ in range(3):
        before = len(calls)
        opt.step(closure)
        evaluations.append(len(calls) - before)
    agent.drain()
    agent.stop()
    assert max(evaluations) > 1  # the case at hand: several evaluations in one step()
    steps = _of(list_sink, "step")
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert [s["micro_steps"] for s in steps] == evaluations
    for step, n in enumerate(evaluations):
        edges = [(m["phase"], m["edge"]) for m in _of(list_sink, "phase") if m["step"] == step]
        one = [("forward", "start"), ("backward", "start"), ("backward", "end"), ("optimizer", "start")]
        assert edges == one * n + [("optimizer", "end")]
    assert agent.errors == 0, agent.last_error
