"""The model's forward and loss, replayed on the symbolic autograd in `graph.py`.

Each function mirrors the HF transformers code of the module it names
(modeling_llama.py, modeling_gpt2.py, peft/tuners/lora/layer.py,
bitsandbytes' Linear4bit, loss_utils.ForCausalLMLoss) op by op, in order,
including the Python references that keep temporaries alive. What each op
saves follows PyTorch's autograd formulas (tools/autograd/derivatives.yaml):

  linear(x, W)        saves x if W requires grad (W itself is a parameter)
  a * b               saves b if a requires grad, a if b requires grad
  pow / silu / tanh   saves the input (pow, silu) or the output (tanh, rsqrt, softmax)
  softmax(dtype=fp32) saves its fp32 output: HF's eager attention upcasts the scores
  dropout             CPU: saves the scaled noise tensor (input dtype); CUDA's fused
                      kernel saves a bool mask (1 byte per element)
  sdpa / flash        saves q, k, v, the output and the fp32 log-sum-exp, never s²
  cross_entropy       saves the fp32 log-softmax (b·s·V·4 bytes) and the targets

Summed over a Llama layer with every weight trainable this gives, in 16-bit
with SDPA, 2·(5bsh + 2bs·kv + 4bsi + ...) — the same structure as Korthikanti
et al. 2022 (arXiv:2205.05198, eq. 1: s·b·h·(34 + 5·a·s/h)), but with the
terms HF really has (fp32 copies inside RMSNorm, fp32 softmax, no bias/GeLU
terms) instead of Megatron's. With frozen weights (LoRA, QLoRA) whole terms
vanish because autograd does not keep inputs it will never need; that is why
the trace propagates requires_grad rather than applying a fixed rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramtop_agent.estimator.graph import Graph, Sym
from vramtop_agent.estimator.model_desc import Linear, ModelDesc
from vramtop_agent.estimator.setup import Setup
from vramtop_agent.estimator.units import DTYPE_BYTES
from vramtop_agent.estimator.weights import resolve_targets

FP32 = 4
INT64 = 8

# One line per tag: what the saved tensors are, for the estimate's terms.
TAG_EXPLAIN = {
    "embedding": "token ids kept by the embedding to scatter its gradient",
    "input norm": "RMSNorm/LayerNorm inputs and statistics (RMSNorm keeps an fp32 copy of its input)",
    "qkv input": "input of the q/k/v projections (kept when their weights train)",
    "lora": "LoRA adapters: the input cast to the adapter dtype, A's output (b·s·r)",
    "lora dropout": "lora_dropout > 0: the dropout mask/noise plus the dropped copy of each adapted input",
    "rope": "rotary cos/sin tables (one copy shared by all layers)",
    "attention scores": "q and k for the score matmul (k/v repeated to all heads when eager)",
    "attention softmax": "eager attention's softmax output in fp32 (b·heads·s²·4) and its copy in the compute dtype",
    "attention values": "the values and the attention output for the second matmul",
    "sdpa": "SDPA/flash saves q, k, v, output and the fp32 log-sum-exp: no s² term",
    "attention dropout": "dropout on the attention probabilities (mask of b·heads·s²)",
    "o_proj input": "input of the output projection",
    "post-attention norm": "RMSNorm/LayerNorm before the MLP",
    "mlp input": "input of the gate/up (or fc) projection",
    "mlp activation": "SwiGLU: gate output, silu output and up output; GELU: its tanh-form intermediates",
    "mlp down input": "input of the down projection (b·s·intermediate)",
    "residual dropout": "dropout on the residual branches (mask/noise per element)",
    "final norm": "the final norm before lm_head",
    "lm_head input": "input of lm_head (kept when lm_head trains)",
    "loss": "cross-entropy keeps the fp32 log-softmax of every logit (b·s·V·4) and the targets",
    "checkpoint inputs": "gradient checkpointing keeps only each layer's input (b·s·h); the rest is recomputed",
}


@dataclass
class TraceResult:
    graph: Graph
    loss: Sym
    logits: Sym
    eof_level: int                 # graph level at the end of forward (saved + held outputs)
    saved_eof: int                 # activations block: saved storages only
    saved_by_tag: dict
    held_outputs: int              # tensors the caller still holds after forward (out.logits, out.loss)
    forward_peak: int
    backward_peak: int
    param_grads: int


class _Ctx:
    """Per-run choices the module functions need."""

    def __init__(self, model: ModelDesc, setup: Setup, g: Graph):
        self.m, self.s, self.g = model, setup, g
        self.b, self.t = setup.batch, setup.seq_len
        self.bt = self.b * self.t
        self.full = setup.method == "full"
        self.quant = setup.quantized
        self.targets = set(resolve_targets(model, setup))
        self.odt = DTYPE_BYTES[setup.odtype]          # embeddings / norms / lm_head
        self.wdt = DTYPE_BYTES[setup.wdtype] if not self.quant else None
        self.cdt = DTYPE_BYTES[setup.cdtype]           # bnb compute dtype
        self.ldt = DTYPE_BYTES[setup.lora_dtype]
        self.cuda = setup.device.startswith("cuda")
        self.frame_held: list = []   # layer kwargs kept alive by checkpoint frames until backward


def trace(model: ModelDesc, setup: Setup) -> TraceResult:
    g = Graph()
    if setup.world_size > 1 and setup.zero >= 2:
        g.grad_divisor = setup.world_size
    c = _Ctx(model, setup, g)
    ids = g.input(c.bt, INT64, "input_ids")
    labels = g.input(c.bt, INT64, "labels")
    logits = _gpt2(c, ids) if model.arch == "gpt2" else _llama(c, ids)
    loss = _causal_lm_loss(c, logits, labels)
    held = logits.st.nbytes + loss.st.nbytes
    saved = g.saved_storages()
    saved_eof = sum(st.nbytes for st in saved.values())
    by_tag = g.saved_bytes_by_tag()
    eof_level = g.level
    forward_peak = g.phase_peak["forward"]
    g.backward(loss, grad_accum_existing=setup.grad_accum > 1)
    g.drop(*c.frame_held)  # checkpoint frames die with the graph
    return TraceResult(g, loss, logits, eof_level, saved_eof, by_tag, held, forward_peak,
                       g.phase_peak["backward"], g.param_grad_bytes)


# ----------------------------------------------------------------- building blocks


def _param(c: _Ctx, name: str, numel: int, itemsize: int, trainable: bool) -> Sym:
    return c.g.param(numel, itemsize, trainable, name)


def _cast(c: _Ctx, x: Sym, itemsize: int, tag: str) -> Sym:
    """x.to(dtype): the same tensor when the dtype matches, else a copy (no saved tensors)."""
    if x.itemsize == itemsize:
        return c.g.keep(x)
    return c.g.op(tag, [x], x.numel, itemsize)


def _mul(c: _Ctx, a: Sym, b: Sym, tag: str, out_numel: int | None = None) -> Sym:
    save = ([b] if a.rg else []) + ([a] if b.rg else [])
    return c.g.op(tag, [a, b], out_numel or max(a.numel, b.numel), max(a.itemsize, b.itemsize), save)


def _dropout(c: _Ctx, x: Sym, p: float, tag: str) -> Sym:
    """F.dropout in training. p == 0 returns the input (nothing saved)."""
    if p <= 0:
        return c.g.keep(x)
    # CUDA: native_dropout saves a bool mask; CPU: `input * noise` saves the noise in the input dtype.
    mask_itemsize = 1 if c.cuda else x.itemsize
    if not x.rg:
        return c.g.op(tag, [x], x.numel, x.itemsize)
    mask = c.g.new(x.numel, mask_itemsize, tag)
    out = c.g.op(tag, [x], x.numel, x.itemsize, save=[mask])
    c.g.drop(mask)
    return out


def _linear(c: _Ctx, x: Sym, name: str, fan_in: int, fan_out: int, bias: bool, tag: str) -> Sym:
    """A projection inside a decoder layer: full / frozen / 4-bit base, plus a LoRA adapter if targeted."""
    leaf = name.split(".")[-1]
    numel_out = x.numel // fan_in * fan_out
    if c.quant:
        # bitsandbytes Linear4bit/MatMul4Bit: casts x to the compute dtype, dequantizes the
        # weight for the matmul (transient) and saves nothing visible to autograd hooks
        # (the packed weight goes on ctx, not save_for_backward).
        w = _param(c, name, fan_in * fan_out // 2, 1, False)
        deq = fan_in * fan_out * c.cdt
        xin = x.numel * c.cdt if x.itemsize != c.cdt else 0
        out_itemsize = x.itemsize
        base = c.g.op(tag, [x, w], numel_out, out_itemsize, save=[], fwd_extra=deq + xin + numel_out * c.cdt,
                      bwd_extra=deq)
    else:
        assert c.wdt is not None  # None only for 4-bit bases (the branch above)
        w = _param(c, name, fan_in * fan_out, c.wdt, c.full)
        save = ([x] if w.rg else []) + ([w] if x.rg else [])
        base = c.g.op(tag, [x, w], numel_out, max(x.itemsize, c.wdt), save=save)
    if leaf in c.targets:
        out = _lora(c, x, base, name, fan_in, fan_out)
        c.g.drop(base)
        return out
    return base


def _lora(c: _Ctx, x: Sym, base: Sym, name: str, fan_in: int, fan_out: int) -> Sym:
    """peft LoraLayer.forward: result + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling, cast back."""
    g, r = c.g, c.s.lora_rank
    xa = _cast(c, x, c.ldt, "lora")
    xd = _dropout(c, xa, c.s.lora_dropout, "lora dropout")
    g.drop(xa)
    wa = _param(c, name + ".lora_A", r * fan_in, c.ldt, True)
    a = g.op("lora dropout" if c.s.lora_dropout > 0 else "lora", [xd, wa], xd.numel // fan_in * r, c.ldt,
             save=[xd, wa])
    g.drop(xd)
    wb = _param(c, name + ".lora_B", fan_out * r, c.ldt, True)
    bo = g.op("lora", [a, wb], base.numel, c.ldt, save=[a, wb])
    g.drop(a)
    scaled = g.op("lora", [bo], bo.numel, bo.itemsize)  # * scaling (a Python float): saves nothing
    g.drop(bo)
    summed = g.op("lora", [base, scaled], base.numel, max(base.itemsize, scaled.itemsize), passthrough=True)
    g.drop(scaled)
    out = _cast(c, summed, base.itemsize, "lora")
    g.drop(summed)
    return out


def _rms_norm(c: _Ctx, x: Sym, name: str, tag: str) -> Sym:
    """LlamaRMSNorm: fp32 copy, pow, mean, rsqrt, multiply, cast back, times weight."""
    g = c.g
    xf = _cast(c, x, FP32, tag)
    sq = g.op(tag, [xf], xf.numel, FP32, save=[xf])                 # pow(2) saves its input
    var = g.op(tag, [sq], c.bt, FP32)                               # mean(-1): saves nothing
    g.drop(sq)
    var_eps = g.op(tag, [var], c.bt, FP32)                          # + eps
    g.drop(var)
    rs = g.op(tag, [var_eps], c.bt, FP32, save_out=True)  # rsqrt saves its output
    g.drop(var_eps)
    xn = _mul(c, xf, rs, tag, out_numel=xf.numel)
    g.drop(xf, rs)
    xc = _cast(c, xn, x.itemsize, tag)
    g.drop(xn)
    w = _param(c, name, c.m.hidden_size, c.odt, c.full)
    out = _mul(c, w, xc, tag, out_numel=xc.numel)
    g.drop(xc)
    return out


def _layer_norm(c: _Ctx, x: Sym, name: str, tag: str) -> Sym:
    """nn.LayerNorm (native_layer_norm): saves input, mean and rstd (fp32, b·s each)."""
    g = c.g
    w = _param(c, name, c.m.hidden_size, c.odt, c.full)
    bias = _param(c, name + ".bias", c.m.hidden_size, c.odt, c.full)
    mean = g.new(c.bt, FP32, tag)
    rstd = g.new(c.bt, FP32, tag)
    out = g.op(tag, [x, w, bias], x.numel, x.itemsize, save=[x, mean, rstd])
    g.drop(mean, rstd)
    return out


def _add(c: _Ctx, a: Sym, b: Sym, tag: str) -> Sym:
    return c.g.op(tag, [a, b], max(a.numel, b.numel), max(a.itemsize, b.itemsize), passthrough=True)


# ----------------------------------------------------------------- Llama family


def _llama(c: _Ctx, ids: Sym) -> Sym:
    g, m = c.g, c.m
    h, hd = m.hidden_size, m.head_dim
    emb_w = _param(c, "embed_tokens", m.vocab_size * h, c.odt, c.full)
    x = g.op("embedding", [emb_w], c.bt * h, c.odt, save=[ids] if emb_w.rg else [])
    if _input_grads(c) and not x.rg:
        x.rg = True  # enable_input_require_grads(): a forward hook sets requires_grad on the output
    # Rotary tables: computed once per forward, in the hidden dtype, shared by every layer.
    cos = g.new(c.t * hd, x.itemsize, "rope")
    sin = g.new(c.t * hd, x.itemsize, "rope")
    mask = None
    if c.s.attn == "eager":
        mask = g.new(c.b * c.t * c.t, x.itemsize, "attention mask")  # 4-D additive causal mask
    for layer in range(m.num_layers):
        x = _llama_layer(c, x, layer, cos, sin, mask)
    # With checkpointing the frames keep the layer kwargs (mask, cos/sin) until backward.
    held = [t for t in (cos, sin, mask) if t is not None]
    if c.s.grad_ckpt:
        c.frame_held = held
    else:
        g.drop(*held)
    y = _rms_norm(c, x, "norm", "final norm")
    g.drop(x)
    lm_trainable = c.full
    lm = _param(c, "lm_head", h * m.vocab_size, c.odt, lm_trainable)
    logits = g.op("lm_head input", [y, lm], c.bt * m.vocab_size, max(y.itemsize, c.odt),
                  save=([y] if lm.rg else []) + ([lm] if y.rg else []))
    g.drop(y)
    return logits


def _input_grads(c: _Ctx) -> bool:
    if c.s.input_grads is not None:
        return c.s.input_grads
    return c.s.method == "qlora" and c.s.kbit_prep and c.s.grad_ckpt


def _llama_layer(c: _Ctx, x: Sym, layer: int, cos: Sym, sin: Sym, mask: Sym | None) -> Sym:
    g, m, s = c.g, c.m, c.s
    if s.grad_ckpt:
        g.begin_checkpoint([x])
    pre = f"layers.{layer}."
    lin = {lin.name: lin for lin in m.layer_linears()}
    residual = g.keep(x)
    hn = _rms_norm(c, x, pre + "input_layernorm", "input norm")
    g.drop(x)
    q = _linear(c, hn, pre + "q_proj", *_fio(lin["q_proj"]), "qkv input")
    k = _linear(c, hn, pre + "k_proj", *_fio(lin["k_proj"]), "qkv input")
    v = _linear(c, hn, pre + "v_proj", *_fio(lin["v_proj"]), "qkv input")
    g.drop(hn)
    q2 = _rope(c, q, cos, sin)
    g.drop(q)
    k2 = _rope(c, k, cos, sin)
    g.drop(k)
    attn = _attention(c, q2, k2, v, mask)
    g.drop(q2, k2, v)
    o = _linear(c, attn, pre + "o_proj", *_fio(lin["o_proj"]), "o_proj input")
    g.drop(attn)
    x = _add(c, residual, o, "residual")
    g.drop(residual, o)
    residual = g.keep(x)
    hn = _rms_norm(c, x, pre + "post_attention_layernorm", "post-attention norm")
    g.drop(x)
    gate = _linear(c, hn, pre + "gate_proj", *_fio(lin["gate_proj"]), "mlp input")
    act = g.op("mlp activation", [gate], gate.numel, gate.itemsize, save=[gate])   # silu saves its input
    g.drop(gate)
    up = _linear(c, hn, pre + "up_proj", *_fio(lin["up_proj"]), "mlp input")
    g.drop(hn)
    prod = _mul(c, act, up, "mlp activation")
    g.drop(act, up)
    down = _linear(c, prod, pre + "down_proj", *_fio(lin["down_proj"]), "mlp down input")
    g.drop(prod)
    x = _add(c, residual, down, "residual")
    g.drop(residual, down)
    if s.grad_ckpt:
        g.end_checkpoint()
    return x


def _fio(lin: Linear) -> tuple[int, int, bool]:
    return lin.fan_in, lin.fan_out, lin.bias


def _rope(c: _Ctx, x: Sym, cos: Sym, sin: Sym) -> Sym:
    """(x * cos) + (rotate_half(x) * sin): cos and sin are saved (they need no grad), x is not."""
    g = c.g
    a = _mul(c, x, cos, "rope", out_numel=x.numel)
    half = g.op("rope", [x], x.numel // 2, x.itemsize)            # -x2 (neg saves nothing)
    rot = g.op("rope", [half], x.numel, x.itemsize)               # cat saves nothing
    g.drop(half)
    b = _mul(c, rot, sin, "rope", out_numel=x.numel)
    g.drop(rot)
    out = _add(c, a, b, "rope")
    g.drop(a, b)
    return out


def _attention(c: _Ctx, q: Sym, k: Sym, v: Sym, mask: Sym | None) -> Sym:
    g, m = c.g, c.m
    heads, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    full_heads = c.b * heads * c.t * hd
    if c.s.attn in ("sdpa", "flash"):
        # SDPA (flash / memory-efficient / CPU flash): GQA handled natively (no repeat_kv when
        # there is no padding mask); saves q, k, v, out and logsumexp (fp32, b·heads·s).
        out = g.new(full_heads, q.itemsize, "sdpa")
        lse = g.new(c.b * heads * c.t, FP32, "sdpa")
        g.record("sdpa", [q, k, v], [out], save=[q, k, v, out, lse])
        g.drop(lse)
    else:
        rep = heads // kv
        kr = g.op("attention scores", [k], full_heads, k.itemsize) if rep > 1 else g.keep(k)
        vr = g.op("attention values", [v], full_heads, v.itemsize) if rep > 1 else g.keep(v)
        ss = c.b * heads * c.t * c.t
        # matmul(q, k^T): q's RoPE output is laid out (b, s, heads, d), so matmul copies it to
        # (b·heads, s, d) before bmm; the copy is what gets saved (same size).
        qc = g.op("attention scores", [q], q.numel, q.itemsize, passthrough=True)
        scores = _mul(c, qc, kr, "attention scores", out_numel=ss)
        g.drop(qc, kr)
        scaled = g.op("attention scores", [scores], ss, scores.itemsize)   # * scaling
        g.drop(scores)
        if mask is not None:
            masked = g.op("attention scores", [scaled], ss, scaled.itemsize, passthrough=True)
            g.drop(scaled)
            scaled = masked
        probs32 = g.op("attention softmax", [scaled], ss, FP32, save_out=True)  # softmax(dtype=fp32)
        g.drop(scaled)
        probs = _cast(c, probs32, q.itemsize, "attention softmax")
        g.drop(probs32)
        pd = _dropout(c, probs, m.attention_dropout, "attention dropout")
        g.drop(probs)
        out = _mul(c, pd, vr, "attention values", out_numel=full_heads)
        g.drop(pd, vr)
    if c.s.attn in ("sdpa", "flash"):
        # The kernels write their output as (b, s, heads, d) and return a transposed view, so
        # HF's transpose(1, 2).contiguous() is free: o_proj's input is the saved output itself.
        return out
    # Eager: transpose(1, 2).contiguous() copies; nothing saved.
    flat = g.op("o_proj input", [out], out.numel, out.itemsize, passthrough=True)
    g.drop(out)
    return flat


# ----------------------------------------------------------------- GPT-2


def _gpt2(c: _Ctx, ids: Sym) -> Sym:
    g, m = c.g, c.m
    h = m.hidden_size
    wte = _param(c, "wte", m.vocab_size * h, c.odt, c.full)
    wpe = _param(c, "wpe", m.max_positions * h, c.odt, c.full)
    pos = g.new(c.t, INT64, "embedding")
    te = g.op("embedding", [wte], c.bt * h, c.odt, save=[ids] if wte.rg else [])
    pe = g.op("embedding", [wpe], c.t * h, c.odt, save=[pos] if wpe.rg else [])
    g.drop(pos)
    x0 = _add(c, te, pe, "embedding")
    g.drop(te, pe)
    if _input_grads(c) and not x0.rg:
        x0.rg = True
    x = _dropout(c, x0, m.embd_dropout, "residual dropout")
    g.drop(x0)
    mask = None
    if c.s.attn == "eager":
        mask = g.new(c.b * c.t * c.t, x.itemsize, "attention mask")
    for layer in range(m.num_layers):
        x = _gpt2_block(c, x, layer, mask)
    if mask is not None:
        if c.s.grad_ckpt:
            c.frame_held = [mask]
        else:
            g.drop(mask)
    y = _layer_norm(c, x, "ln_f", "final norm")
    g.drop(x)
    logits = g.op("lm_head input", [y, wte], c.bt * m.vocab_size, y.itemsize,
                  save=([y] if wte.rg else []) + ([wte] if y.rg else []))
    g.drop(y)
    return logits


def _gpt2_block(c: _Ctx, x: Sym, layer: int, mask: Sym | None) -> Sym:
    g, m, s = c.g, c.m, c.s
    if s.grad_ckpt:
        g.begin_checkpoint([x])
    pre = f"layers.{layer}."
    h, i = m.hidden_size, m.intermediate_size
    residual = g.keep(x)
    hn = _layer_norm(c, x, pre + "ln_1", "input norm")
    g.drop(x)
    qkv = _linear(c, hn, pre + "c_attn", h, 3 * h, True, "qkv input")
    g.drop(hn)
    # split + view + transpose: views of qkv; matmul copies q and k (non-contiguous) before bmm.
    third = qkv.numel // 3
    qc = g.op("attention scores", [qkv], third, qkv.itemsize, passthrough=True)
    kc = g.op("attention scores", [qkv], third, qkv.itemsize, passthrough=True)
    ss = c.b * m.num_heads * c.t * c.t
    scores = _mul(c, qc, kc, "attention scores", out_numel=ss)
    g.drop(qc, kc)
    scaled = g.op("attention scores", [scores], ss, scores.itemsize)   # / full([], sqrt(d)): a 0-d tensor
    g.drop(scores)
    if mask is not None:
        masked = g.op("attention scores", [scaled], ss, scaled.itemsize, passthrough=True)
        g.drop(scaled)
        scaled = masked
    probs = g.op("attention softmax", [scaled], ss, scaled.itemsize, save_out=True)  # softmax in the compute dtype
    g.drop(scaled)
    pd = _dropout(c, probs, m.attention_dropout, "attention dropout")
    g.drop(probs)
    vc = g.op("attention values", [qkv], third, qkv.itemsize, passthrough=True)
    g.drop(qkv)
    out = _mul(c, pd, vc, "attention values", out_numel=third)
    g.drop(pd, vc)
    flat = g.op("o_proj input", [out], out.numel, out.itemsize, passthrough=True)
    g.drop(out)
    o = _linear(c, flat, pre + "attn.c_proj", h, h, True, "o_proj input")
    g.drop(flat)
    od = _dropout(c, o, m.resid_dropout, "residual dropout")
    g.drop(o)
    x = _add(c, residual, od, "residual")
    g.drop(residual, od)
    residual = g.keep(x)
    hn = _layer_norm(c, x, pre + "ln_2", "post-attention norm")
    g.drop(x)
    fc = _linear(c, hn, pre + "c_fc", h, i, True, "mlp input")
    g.drop(hn)
    act = _gelu_new(c, fc)
    g.drop(fc)
    proj = _linear(c, act, pre + "mlp.c_proj", i, h, True, "mlp down input")
    g.drop(act)
    pdp = _dropout(c, proj, m.resid_dropout, "residual dropout")
    g.drop(proj)
    x = _add(c, residual, pdp, "residual")
    g.drop(residual, pdp)
    if s.grad_ckpt:
        g.end_checkpoint()
    return x


def _gelu_new(c: _Ctx, x: Sym) -> Sym:
    """NewGELUActivation, written in Python: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    g, tag = c.g, "mlp activation"
    half = g.op(tag, [x], x.numel, x.itemsize)                          # 0.5 * x
    cube = g.op(tag, [x], x.numel, x.itemsize, save=[x])                # pow(x, 3) saves x
    t1 = g.op(tag, [cube], x.numel, x.itemsize)
    g.drop(cube)
    t2 = _add(c, x, t1, tag)
    g.drop(t1)
    t3 = g.op(tag, [t2], x.numel, x.itemsize)
    g.drop(t2)
    th = g.op(tag, [t3], x.numel, x.itemsize, save_out=True)  # tanh saves its output
    g.drop(t3)
    onep = g.op(tag, [th], x.numel, x.itemsize, passthrough=True)       # 1 + tanh
    g.drop(th)
    out = _mul(c, half, onep, tag, out_numel=x.numel)
    g.drop(half, onep)
    return out


# ----------------------------------------------------------------- loss


def _causal_lm_loss(c: _Ctx, logits: Sym, labels: Sym) -> Sym:
    """transformers ForCausalLMLoss: logits.float(), shift labels, cross_entropy(mean)."""
    g = c.g
    lf = _cast(c, logits, DTYPE_BYTES[c.s.logits_dtype], "loss")
    padded = g.new(c.b * (c.t + 1), INT64, "loss")                      # pad(labels, (0, 1))
    if c.b == 1:
        target = padded   # [..., 1:] of a (1, s+1) tensor is already contiguous: no copy, the padded storage is kept
    else:
        target = g.new(c.bt, INT64, "loss")                             # [..., 1:].contiguous()
        g.drop(padded)
    ls = g.op("loss", [lf], lf.numel, lf.itemsize, save_out=True)  # log_softmax saves its output
    g.drop(lf)
    total_weight = g.new(1, FP32, "loss")
    loss = g.op("loss", [ls], 1, FP32, save=[target, total_weight])     # nll_loss
    g.drop(ls, target, total_weight)
    return loss
