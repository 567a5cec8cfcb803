"""Byte-exact accounting on real training steps of a tiny Llama (full fine-tune and LoRA)."""

import pytest
import torch
from conftest import train_steps
from helpers import optimizer_tensors, storage_bytes

import vramtop_agent
from vramtop.tiny import add_lora, build_model, make_batch


def _run(model, steps=2, batch=2, seq=32):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    agent = vramtop_agent.watch(model, opt, publish=False)
    b = make_batch(model, batch, seq)
    train_steps(model, opt, b, steps)
    # Leave gradients in place for the check: one more backward without the optimizer step.
    model(**b).loss.backward()
    snap = agent.snapshot()
    agent.stop()
    return snap, opt


def test_full_finetune_blocks_are_byte_exact():
    model = build_model()
    snap, opt = _run(model)
    params = list(model.parameters())
    blocks = snap["blocks"]
    assert blocks["parameters"] == storage_bytes(params)
    assert blocks["gradients"] == storage_bytes([p.grad for p in params if p.grad is not None])
    assert blocks["gradients"] == blocks["parameters"]  # every weight trains, fp32 grads
    assert blocks["optimizer"] == storage_bytes(optimizer_tensors(opt))
    # AdamW: exp_avg + exp_avg_sq per parameter, plus a 4-byte step counter each.
    assert blocks["optimizer"] == 2 * blocks["parameters"] + 4 * len(params)
    assert snap["params_split"] == {"trainable": blocks["parameters"], "frozen": 0, "quantized": 0}
    assert blocks["activations"] == 0  # backward freed every saved tensor


def test_lora_counts_gradients_and_optimizer_only_for_adapters():
    model = add_lora(build_model(), rank=4)
    snap, opt = _run(model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    assert trainable and all(p.grad is None for p in frozen)
    blocks = snap["blocks"]
    assert blocks["parameters"] == storage_bytes(params)
    assert snap["params_split"]["trainable"] == storage_bytes(trainable)
    assert snap["params_split"]["frozen"] == storage_bytes(frozen)
    assert blocks["gradients"] == storage_bytes([p.grad for p in trainable]) == storage_bytes(trainable)
    assert blocks["optimizer"] == storage_bytes(optimizer_tensors(opt))
    assert blocks["optimizer"] == 2 * storage_bytes(trainable) + 4 * len(trainable)
    # LoRA adapters of rank 4 on q/v are a small fraction of the model.
    assert snap["params_split"]["trainable"] < 0.05 * blocks["parameters"]


def test_tied_and_shared_storages_count_once():
    model = build_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = build_model(tie_word_embeddings=False)
    agent = vramtop_agent.watch(model, publish=False)
    blocks = agent.snapshot()["blocks"]
    agent.stop()
    emb = model.model.embed_tokens.weight
    assert blocks["parameters"] == storage_bytes(model.parameters())
    assert blocks["parameters"] == storage_bytes(untied.parameters()) - emb.numel() * emb.element_size()


def test_activations_are_the_saved_tensors_at_end_of_forward(list_sink):
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    b = make_batch(model, 2, 64)
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = (s.nbytes(), t)  # keep t alive so pointers stay unique
        return t

    # Reference: the same forward with our own hooks, before the agent watches (its hooks would nest inside).
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**b)
    expected = sum(n for ptr, (n, _) in saved.items() if ptr not in param_ptrs)
    saved.clear()

    agent = vramtop_agent.watch(model, opt, publish=False, sinks=[list_sink], sample_hz=0)
    out = model(**b)
    level = agent.snapshot()["blocks"]["activations"]
    out.loss.backward()
    after_backward = agent.snapshot()["blocks"]["activations"]
    opt.step()
    step = agent.steps[-1]
    agent.stop()
    assert level == expected  # everything autograd saved, live, parameters excluded
    assert step["eof_blocks"]["activations"] == expected
    assert after_backward == 0
    assert expected > 1_000_000


@pytest.mark.parametrize("batch,seq", [(2, 64), (4, 128)])
def test_activations_agree_with_torch_profiler(batch, seq):
    """PyTorch's memory profiler categorizes the same step; its ACTIVATION peak is our end-of-forward."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, Category

    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    agent = vramtop_agent.watch(model, opt, publish=False)
    b = make_batch(model, batch, seq)
    train_steps(model, opt, b, 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        train_steps(model, opt, b, 1)
    ours = agent.steps[-1]["eof_blocks"]["activations"]
    agent.stop()

    mp = prof._memory_profile()
    live: dict = {}
    peak = 0
    for _, action, (key, version), size in mp.timeline:
        cat = mp._categories.get(key, version)
        if action == Action.INCREMENT_VERSION:
            before = mp._categories.get(key, version - 1)
            live[before] = live.get(before, 0) - size
            live[cat] = live.get(cat, 0) + size
        elif action in (Action.CREATE, Action.PREEXISTING):
            live[cat] = live.get(cat, 0) + size
        elif action == Action.DESTROY:
            live[cat] = live.get(cat, 0) - size
        peak = max(peak, live.get(Category.ACTIVATION, 0))
    assert peak > 0
    assert abs(ours - peak) / peak < 0.10, (ours, peak)


def test_meta_device_model_is_accounted_without_memory():
    """The 7B-shaped benchmark model lives on the meta device: storages still have sizes."""
    with torch.device("meta"):
        model = build_model(hidden_size=256, intermediate_size=688, num_hidden_layers=2)
    agent = vramtop_agent.watch(model, publish=False)
    blocks = agent.snapshot()["blocks"]
    agent.stop()
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    assert blocks["parameters"] == expected


def test_a_model_adopted_during_a_parameter_walk_is_walked_again():
    """The I/O thread can be walking the parameters when the training thread adopts the model
    (zero-code root detection): that walk is stale and must not mark the cache clean."""
    from vramtop_agent.accounting import Accountant

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    acct = Accountant(optimizer=opt)
    walk = acct.param_objects

    def model_arrives_mid_walk():
        objs = walk()  # what the walk saw: the optimizer's parameters only
        acct.model = model  # the other thread, between the walk and its bookkeeping
        return objs

    acct.param_objects = model_arrives_mid_walk
    acct.refresh_params()
    acct.param_objects = walk
    bd = acct.breakdown()
    assert bd.frozen == storage_bytes(model[0].parameters())
    assert bd.trainable == storage_bytes(model[1].parameters())


def test_the_gradient_ledger_read_in_bulk_behaves_as_one_built_entry_by_entry():
    """read_grads hands the ledger parallel lists (no dict entry per storage on an untracked step); every
    later use (a tracked step's per-gradient hooks, a partial zero_grad, the overlaps the breakdown
    subtracts) must see the same state as a ledger built one owner at a time."""
    from vramtop_agent.ledger import StorageLedger

    owners = ["w1", "w2", "b1", "b2"]
    keys = [10, 11, 12, 12]  # b1 and b2 are views of one storage: it counts once
    sizes = [400, 800, 64, 64]
    devs = ["cpu", "cpu", "cuda:0", "cuda:0"]
    bulk, one_by_one = StorageLedger(), StorageLedger()
    bulk.replace_bulk(owners, keys, sizes, devs, {"cpu": 1200, "cuda:0": 64})
    for o, k, n, d in zip(owners, keys, sizes, devs):
        one_by_one.set(o, k, n, d)
    assert bulk.totals() == one_by_one.totals() == {"cpu": 1200, "cuda:0": 64}
    assert set(bulk.keys()) == set(one_by_one.keys()) == {10, 11, 12}
    assert len(bulk) == len(one_by_one) == 4
    assert sorted(bulk.owners()) == sorted(one_by_one.owners())
    assert bulk.totals({11, 99}) == one_by_one.totals({11, 99}) == {"cpu": 400, "cuda:0": 64}  # 11 is elsewhere
    assert bulk.holds_bulk(owners, keys) and one_by_one.holds_bulk(owners, keys)
    assert not bulk.holds_bulk(owners, [10, 11, 12, 13])
    version = bulk.version
    bulk.drop("b1")  # one view gone: the storage stays (b2 holds it)
    one_by_one.drop("b1")
    assert bulk.version != version
    assert bulk.totals() == one_by_one.totals() == {"cpu": 1200, "cuda:0": 64}
    bulk.drop("b2")
    one_by_one.drop("b2")
    bulk.set("w1", 20, 400, "cpu")  # a new storage for w1 (a tracked step's hook saw it land)
    one_by_one.set("w1", 20, 400, "cpu")
    assert bulk.totals() == one_by_one.totals() == {"cpu": 1200, "cuda:0": 0}
    assert set(bulk.keys()) == set(one_by_one.keys()) == {20, 11}
    assert not bulk.holds_bulk(owners, keys)


def test_the_once_a_second_recheck_walks_the_model_only_when_something_changed():
    """The periodic re-check compares the last walk's parameters and buffers by C-level maps and walks
    the module tree only when a storage, a size, requires_grad or an optimizer group changed, a parameter
    was registered (at once), a module or buffer was registered on one of the model's modules, or
    PARAM_WALK_S has passed."""
    from torch import nn

    from vramtop_agent.accounting import Accountant

    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acct = Accountant(model, opt)
    walks = []
    walk = acct.param_objects
    acct.param_objects = lambda: walks.append(1) or walk()

    def recheck() -> int:
        before = len(walks)
        acct.recheck_params()
        return len(walks) - before

    def parameters() -> int:
        return acct.breakdown().blocks("cpu")["parameters"]

    acct.refresh_params()
    assert recheck() == 0 and parameters() == storage_bytes(model.parameters())
    model[0].weight.data = torch.zeros(16, 8)  # a storage swapped under the parameter (FSDP's way)
    assert recheck() == 1 and parameters() == storage_bytes(model.parameters())
    assert recheck() == 0
    model[0].bias.requires_grad_(False)  # frozen: the trainable/frozen split changes
    assert recheck() == 1 and acct.breakdown().frozen == storage_bytes([model[0].bias])
    model.add_module("head", nn.Linear(8, 3))  # a module attached with its parameters: walked next time
    assert recheck() == 1 and parameters() == storage_bytes(model.parameters())
    model.head.weight = nn.Parameter(torch.zeros(3, 8))  # a parameter registered: walked at once
    assert acct._params_dirty
    assert parameters() == storage_bytes(model.parameters())
    model[1].register_buffer("running_mean", torch.zeros(8))  # a buffer re-registered: walked next time
    assert recheck() == 1 and recheck() == 0
    # A container built around the model's layers and dropped (transformers does this in every forward):
    # registrations on a module that is not the model's are not counted.
    nn.ModuleList([model[0], model[1]]).register_buffer("scratch", torch.zeros(4))
    assert recheck() == 0
    old_bias = model.head.bias  # kept alive: a write no hook sees leaves the last walk's objects as they were
    model.head._parameters["bias"] = nn.Parameter(torch.zeros(300))
    assert recheck() == 0
    acct._walked_at -= acct.PARAM_WALK_S + 1  # ... until the module tree is walked again
    assert recheck() == 1 and parameters() == storage_bytes(model.parameters()) and old_bias is not None
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(50))]})  # trained, owned by no module
    assert recheck() == 1
    assert parameters() == storage_bytes([*model.parameters(), *opt.param_groups[1]["params"]])


def test_a_transformers_forward_leaves_the_once_a_second_recheck_a_comparison():
    """A real Llama forward registers its layers in a new ModuleList every time; the re-check that
    follows still finds nothing changed and does not walk the model (it did, once a second, before)."""
    model = add_lora(build_model(vocab_size=512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch = make_batch(model, 2, 16)
    agent = vramtop_agent.watch(model, opt, publish=False, sample_hz=0)
    acct = agent.acct

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # (the optimizer is adopted at its first step: the parameter set is walked again then)
    step()
    walks = []
    walk = acct.param_objects
    acct.param_objects = lambda: walks.append(1) or walk()
    for _ in range(3):
        acct._params_at -= acct.PARAM_REFRESH_S + 1  # a re-check due at the next edge
        step()
    assert walks == [] and not acct._params_dirty
    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
    layer.register_buffer("extra", torch.zeros(1000))  # on one of the model's modules: walked
    acct._params_at -= acct.PARAM_REFRESH_S + 1
    step()
    assert walks == [1]
    agent.stop()
    assert agent.errors == 0
