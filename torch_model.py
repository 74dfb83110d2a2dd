"""The model in PyTorch: mirrors mlx_model.py class for class and line for line.

Parameter names and shapes are the table in shared/spec.py; weights come in and go
out as numpy arrays (load_numpy_state / numpy_state), so either framework can
continue what the other trained.

    model = build_model(cfg, device, state, dtype=torch.bfloat16)
    nll = model.token_nll(x, y)          # (B, T) nats, fp32
"""
from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.config import Hyperparameters, implementation
from shared.segments import CU_SEQLENS_BUCKET, cu_seqlens, segment_ids
from shared.spec import LayerPlan, init_params, layer_plan, mlp_hidden, num_skip_weights

try:  # torch >= 2.10: flash attention over packed variable-length sequences (CUDA, fp16/bf16 only)
    from torch.nn.attention.varlen import varlen_attn
    # Its keywords changed between releases: 2.10 takes is_causal and no scale (unusable here: the attention
    # scale is ours); 2.11 takes scale and window_size; 2.12 adds enable_gqa (without it K/V heads are expanded).
    _VARLEN_KW = set(inspect.signature(varlen_attn).parameters)
    if not {"scale", "window_size"} <= _VARLEN_KW:
        varlen_attn = None
except ImportError:
    varlen_attn = None

# ---- numerics, written out (mlx_model.py uses the same) ----
RMS_NORM_EPS = 1e-6  # explicit: library defaults differ by dtype and framework
# RoPE: half-split layout over the first K = ROPE_DIMS dims of a head (0: all D), x1 = x[..., :K/2],
# x2 = x[..., K/2:K], rotated by -theta: (x1*cos + x2*sin, -x1*sin + x2*cos), theta_{t,i} = t * ROPE_BASE^(-2i/K);
# dims K..D-1 pass through (the record's partial RoPE, RECORD_STACK.md §3.4).
# (the official torch baseline's direction; the official MLX twin used +theta and drifted).
# Dtypes, with no autocast: weights are fp32 masters; every matmul casts both operands to the
# compute dtype `dtype` (bf16 on CUDA/Metal, fp32 on CPU); the residual stream, every RMSNorm
# (q/k included), RoPE, q_gain, the softcap and the cross-entropy run in fp32; q, k, v enter the
# attention kernel in the compute dtype. (Torch autocast's lists happened to do this for q/k;
# writing it out makes MLX do the same.)
XSA_EPS = 1e-12  # XSA's v_hat = v / sqrt(sum(v^2) + XSA_EPS), in fp32: finite (zero) for an all-zero v


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x.float(), (x.size(-1),), eps=RMS_NORM_EPS)  # fp32 in, fp32 out


class RMSNorm(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale  # LN_SCALE's c_i, multiplied after the norm; 1.0 skips the multiply

    def forward(self, x: Tensor) -> Tensor:
        y = rms_norm(x)
        return y if self.scale == 1.0 else y * self.scale


class CastedLinear(nn.Linear):
    """fp32 master weight (out, in); input and weight cast to the compute dtype at use."""

    def __init__(self, in_dim: int, out_dim: int, dtype: torch.dtype):
        super().__init__(in_dim, out_dim, bias=False)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.dtype), self.weight.to(self.dtype))


class LoRAApp(NamedTuple):
    """Score-first TTT's adapters of one layer application (RECORD_STACK.md §7.2), one slot per document:
    delta(x) = (x A^T) B^T * alpha/r with A (B, r, in), B (B, out, r). `weights` maps a target (q, k, v, o, mlp;
    head on the last) to its (A, B); torch_ttt.py builds them. With lora=None the model never reads one."""
    weights: dict
    scale: float
    dtype: torch.dtype

    def add(self, name: str, out: Tensor, x: Tensor) -> Tensor:
        if name not in self.weights:
            return out
        a, b = self.weights[name]
        h = torch.matmul(x.to(self.dtype), a.to(self.dtype).transpose(1, 2))  # (B, T, r)
        return out + torch.matmul(h, b.to(self.dtype).transpose(1, 2)).float() * self.scale  # fp32 (B, T, out)


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)  # (T, D/2), fp32
        return freqs.cos()[None, None], freqs.sin()[None, None]


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = cos.size(-1)  # K/2: dims 2*half.. pass through (empty under full RoPE)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, rest), dim=-1)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA (RECORD_STACK.md §3.4): y_h - (y_h . v_hat) v_hat with v_hat the token's own value of head h's KV head.

    y (B, H, T, D), v (B, Hkv, T, D); query head h reads KV head h // G (G = H / Hkv), as in the attention.
    Computed in fp32; returns fp32 (B, H, T, D)."""
    bsz, heads, seqlen, head_dim = y.shape
    kv_heads = v.size(1)
    y = y.float().reshape(bsz, kv_heads, heads // kv_heads, seqlen, head_dim)  # (B, Hkv, G, T, D): no repeated KV
    v = v.float()
    v_hat = (v / torch.sqrt(v.square().sum(dim=-1, keepdim=True) + XSA_EPS))[:, :, None]  # (B, Hkv, 1, T, D)
    y = y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return y.reshape(bsz, heads, seqlen, head_dim)


class VarlenSegments(NamedTuple):
    """DOC_ISOLATED_ATTN on the varlen kernel: boundaries over the flattened (B*T) batch, padded (zero-length
    segments) to a multiple of 64 entries as the record does; max_seqlen = T bounds every segment."""
    cu_seqlens: Tensor  # int32 (S,), on the device
    max_seqlen: int


def doc_attention_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel DOC_ISOLATED_ATTN runs: flash varlen on CUDA in half precision (FA3 when activated, else
    torch's FA2), else SDPA with a boolean block-causal mask (RECORD_STACK.md §10.2's plain equivalent)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and varlen_attn is not None:
        import torch.nn.attention as nn_attention  # current_flash_attention_impl: torch >= 2.12
        current = getattr(nn_attention, "current_flash_attention_impl", lambda: None)
        return f"varlen_attn_{current() or 'FA2'}"
    return "sdpa_block_mask"


def segment_mask(segments: Tensor) -> Tensor:
    """(B, 1, T, T) bool from (B, T) segment ids: i attends to j iff j <= i and seg(i) == seg(j) (§4)."""
    seqlen = segments.size(1)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segments.device).tril()
    return (segments[:, None, :, None] == segments[:, None, None, :]) & causal


def varlen_segments(segments: Tensor) -> VarlenSegments:
    """cu_seqlens from shared/segments.py (one small device-to-host copy per forward, not per layer)."""
    cu = torch.from_numpy(cu_seqlens(segments.cpu().numpy(), bucket=CU_SEQLENS_BUCKET)).to(segments.device)
    # its length follows the batch's document count: dynamic, or torch.compile (dynamic=False) would trace a graph
    # for every 64-entry bucket and looping state inside the timed run, and past 8 fall back to eager silently
    torch._dynamo.mark_dynamic(cu, 0)
    return VarlenSegments(cu, segments.size(1))


def upload(a: np.ndarray, device: torch.device) -> Tensor:
    """A host array on the device. On CUDA through pinned memory, non-blocking: a copy from pageable memory
    first waits for every kernel already queued (a host sync), so the host could not run ahead of the GPU."""
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def host_varlen_segments(x: np.ndarray, bos_id: int, max_len: int, device: torch.device) -> VarlenSegments:
    """VarlenSegments of token rows x built on the host (shared/segments.py) and uploaded without a sync: the
    step never waits for the device to hand segment ids back."""
    cu = upload(cu_seqlens(segment_ids(x, bos_id, max_len), bucket=CU_SEQLENS_BUCKET), device)
    torch._dynamo.mark_dynamic(cu, 0)  # as in varlen_segments: one graph for every bucket of documents
    return VarlenSegments(cu, x.shape[1])


def doc_segments(x: np.ndarray, bos_id: int, max_len: int, device: torch.device,
                 dtype: torch.dtype) -> Tensor | VarlenSegments:
    """What GPT.logits takes for DOC_ISOLATED_ATTN on rows x: the varlen kernel's boundaries built on the host
    where that kernel runs, else segment ids on the device for the masked kernel (shared/segments.py)."""
    if doc_attention_kernel(device, dtype).startswith("varlen"):
        return host_varlen_segments(x, bos_id, max_len, device)
    return upload(segment_ids(x, bos_id, max_len), device)


def expand_kv_heads(t: Tensor, heads: int, head_dim: int) -> Tensor:
    """GQA written out: KV heads repeated so that query head h reads KV head h // G (G = heads / kv heads), the
    pairing SDPA's enable_gqa uses; each KV head repeated in place, not the block tiled (h % Hkv)."""
    return t.repeat_interleave(heads // t.size(head_dim), dim=head_dim)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, doc: Tensor | VarlenSegments | None) -> Tensor:
    """Causal GQA attention (B, H, T, D) x (B, Hkv, T, D) -> (B, H, T, D); query head h reads KV head h // G.
    doc (DOC_ISOLATED_ATTN): a block-causal mask or varlen boundaries keep each query inside its segment."""
    gqa = k.size(1) != q.size(1)
    if doc is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if isinstance(doc, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=doc, scale=scale, enable_gqa=gqa)
    bsz, heads, seqlen, head_dim = q.shape
    packed = [t.transpose(1, 2).reshape(bsz * seqlen, t.size(1), head_dim) for t in (q, k, v)]  # (B*T, H, D)
    if gqa and "enable_gqa" not in _VARLEN_KW:  # torch 2.11: no GQA in the kernel, so K/V heads are expanded
        packed[1:] = [expand_kv_heads(t, heads, head_dim=1) for t in packed[1:]]
    gqa_kw = {"enable_gqa": gqa} if "enable_gqa" in _VARLEN_KW else {}
    y = varlen_attn(*packed, doc.cu_seqlens, doc.cu_seqlens, doc.max_seqlen, doc.max_seqlen, scale=scale,
                    window_size=(-1, 0), **gqa_kw)  # window (-1, 0): causal within each segment
    return y.reshape(bsz, seqlen, heads, head_dim).transpose(1, 2)


def gated_skip(x: Tensor, skip: Tensor, gate: Tensor) -> Tensor:
    """SKIP_GATES_ENABLED (RECORD_STACK.md §3.6): g = sigmoid(gate); g * x + (1 - g) * skip,
    the record's torch.lerp(skip, x, g). Zero-init gates: an even mix."""
    g = torch.sigmoid(gate)
    return g * x + (1 - g) * skip


TOKEN_SUM_SPLITS = 256  # token_sum's first stage: this many partial sums (a divisor of the token count)


def token_sum(t: Tensor) -> Tensor:
    """Sum over the leading (token) dim in two stages: partial sums over TOKEN_SUM_SPLITS slices, then their sum.
    A gate weight's gradient has a few dozen outputs and ~10^5 tokens to reduce: as one reduction it runs on a
    few thread blocks (7 ms a micro-batch on an H200 for the looped layers' gates); split, on all of them."""
    n = t.size(0)
    splits = math.gcd(n, TOKEN_SUM_SPLITS)
    return t.reshape(splits, n // splits, *t.shape[1:]).sum(dim=1).sum(dim=0)


class GateLogits(torch.autograd.Function):
    """z[..., h] = sum_w x[..., w] * G[h, w] as an fp32 product-sum (not a matmul: CUDA runs fp32 matmuls in
    TF32 here), the logits of the smear and sparse attention gates. The forward is the plain expression; the
    backward is written out so that G's gradient, a reduction over every token, is token_sum's two stages.
    x (..., W) fp32, G (H, W) fp32; returns (..., H) fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return (x[..., None, :] * weight).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        d_x = (grad[..., :, None] * weight).sum(dim=-2) if ctx.needs_input_grad[0] else None
        d_w = None
        if ctx.needs_input_grad[1]:  # frozen under TTT: skipped
            d_w = token_sum((grad[..., :, None] * x[..., None, :]).reshape(-1, *weight.shape))
        return d_x, d_w


class GatedSkip(torch.autograd.Function):
    """The gated U-Net skip, gated_skip(x, w * skip, gate) with w, gate (dim,) the slot's skip weight and gate.
    Forward: those ops as written. Backward written out so that the two per-channel gradients, reductions over
    every token, run as token_sum's two stages (fused with the norms around them, autograd's reductions took
    3-5 ms a micro-batch each on an H200):
    dx = g dout, d(ws) = (1 - g) dout, dskip = w d(ws), dw = sum(d(ws) skip), dgate = g (1 - g) sum(dout (x - ws))."""

    @staticmethod
    def forward(ctx, x: Tensor, skip: Tensor, weight: Tensor, gate: Tensor) -> Tensor:
        ctx.save_for_backward(x, skip, weight, gate)
        return gated_skip(x, weight[None, None, :] * skip, gate[None, None, :])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, skip, weight, gate = ctx.saved_tensors
        g = torch.sigmoid(gate)
        d_ws = (1 - g) * grad
        channels = weight.size(0)
        d_w = token_sum((d_ws * skip).reshape(-1, channels))
        d_gate = g * (1 - g) * token_sum((grad * (x - weight * skip)).reshape(-1, channels))
        return g * grad, weight * d_ws, d_w, d_gate


def smear(e: Tensor, ids: Tensor, weight: Tensor, lam: Tensor, bos_id: int | None) -> Tensor:
    """The record's SmearGate with its BOS fix (SMEAR_GATE_ENABLED, RECORD_STACK.md §3.1):
    e'_t = e_t + lambda * sigmoid(w . e_t[:W]) * 1[ids_t != BOS] * e_{t-1} for t >= 1, e'_0 = e_0.

    e (B, T, dim) raw (pre-norm) embeddings, ids (B, T), weight (1, W), lam (1,). The mask reads the CURRENT token:
    a document's BOS never takes the previous document's last token. The gate is an fp32 product-sum, not a matmul
    (CUDA runs fp32 matmuls in TF32 here). Returns fp32 (B, T, dim)."""
    if bos_id is None or bos_id < 0:
        raise ValueError("SMEAR_GATE_ENABLED=1 needs the tokenizer's BOS id; TOKENIZER_PATH's model has none")
    e = e.float()
    g = lam * torch.sigmoid(GateLogits.apply(e[..., :weight.size(-1)], weight))  # (B, T, 1): w . e_t[:W]
    keep = (ids[:, 1:] != bos_id).float()[..., None]  # (B, T-1, 1): 0 where the current token is BOS
    return torch.cat((e[:, :1], e[:, 1:] + g[:, 1:] * keep * e[:, :-1]), dim=1)


def sparse_attn_gate(y: Tensor, n: Tensor, weight: Tensor, scale: float) -> Tensor:
    """Sparse attention output gate (SPARSE_ATTN_GATE_ENABLED, RECORD_STACK.md §3.4): y_h * sigmoid(scale * G_h.n[:W]).

    y (B, H, T, D) head outputs (after XSA); n (B, T, dim) the attention's input (normed, LN-scaled), of which the
    first W dims are read; weight G (H, W). fp32 product-sum, not a matmul (TF32 on CUDA). Returns fp32 (B, H, T, D)."""
    z = GateLogits.apply(n.float()[..., :weight.size(-1)], weight)  # (B, T, H): G_h . n[:W]
    g = torch.sigmoid(scale * z).transpose(1, 2)[..., None]  # (B, H, T, 1)
    return y.float() * g


def adapters(lora: list | None, j: int) -> dict:
    """Keyword arguments of layer application j: none without TTT, so the default calls stay as they were."""
    return {} if lora is None else {"lora": lora[j]}


def merge_lanes(lane0: Tensor, lane1: Tensor) -> Tensor:
    """PARALLEL_START_LAYER: the two lanes end as their mean (the record's PARALLEL_FINAL_LANE=mean, §3.7)."""
    return 0.5 * (lane0 + lane1)


def squared_act(pre: Tensor, slope: float) -> Tensor:
    """leaky_relu2 (slope > 0) or relu2 (slope 0): max(pre, slope * pre)^2, in pre's dtype."""
    return torch.where(pre > 0, pre, pre * slope).square()


class FusedSquaredMLP(torch.autograd.Function):
    """TORCH_FUSED_MLP: out = act(x W1^T)^2 W2^T keeping only the pre-activation for the backward (the autograd
    of the reference keeps three (N, hidden) tensors) and recomputing the square there; the record's Triton
    MLP does the same (RECORD_STACK.md §10, "fused LeakyReLU² MLP"). Inputs in the compute dtype. The gradient
    through the activation is written out: d act(p)^2 / dp = 2p for p > 0, 2 slope^2 p otherwise."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, slope: float) -> Tensor:
        pre = F.linear(x, w1)  # (..., hidden)
        ctx.save_for_backward(x, w1, w2, pre)
        ctx.slope = slope
        return F.linear(squared_act(pre, slope), w2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w1, w2, pre = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))
        pre2 = pre.reshape(-1, pre.size(-1))
        d_w2 = g2.mT @ squared_act(pre2, ctx.slope)  # (dim, hidden)
        d_pre = (g2 @ w2) * (2.0 * torch.where(pre2 > 0, pre2, pre2 * (ctx.slope * ctx.slope)))
        return (d_pre @ w1).reshape(x.shape), d_pre.mT @ x2, d_w2, None


class SoftcapCrossEntropy(torch.autograd.Function):
    """TORCH_FUSED_CE: nll = logsumexp(s) - s[y] with s = c * tanh(z / c), in fp32 from z of any dtype, saving
    only z and the log-sum-exp (N floats); the backward is one pass, (softmax(s) - onehot(y)) * (1 - tanh^2).
    The record's training loss is a Triton kernel of the same math (RECORD_STACK.md §3.8). z (N, V), y (N,)."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, softcap: float) -> Tensor:
        s = softcap * torch.tanh(z.float() / softcap)
        lse = torch.logsumexp(s, dim=-1)
        ctx.save_for_backward(z, y, lse)
        ctx.softcap = softcap
        return lse - s.gather(1, y[:, None])[:, 0]  # (N,) fp32

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, y, lse = ctx.saved_tensors
        t = torch.tanh(z.float() / ctx.softcap)
        onehot = torch.arange(z.size(-1), device=z.device)[None, :] == y[:, None]
        p = torch.exp(ctx.softcap * t - lse[:, None]) - onehot.float()
        return (grad[:, None] * p * (1.0 - t * t)).to(z.dtype), None, None


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, rope_dims: int,
                 qk_gain_init: float, xsa: bool, dtype: torch.dtype, gate_window: int = 0, gate_scale: float = 1.0):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.xsa = xsa
        self.gate_window, self.gate_scale = gate_window, gate_scale  # sparse output gate; 0 = off
        self.head_dim = dim // num_heads
        self.dtype = dtype
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, dtype)
        self.c_k = CastedLinear(dim, kv_dim, dtype)
        self.c_v = CastedLinear(dim, kv_dim, dtype)
        self.proj = CastedLinear(dim, dim, dtype)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(rope_dims or self.head_dim, rope_base)  # ROPE_DIMS=0: every dim
        self.scale = self.head_dim ** -0.5  # explicit attention scale
        if gate_window:
            self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, gate_window))

    def forward(self, x: Tensor, doc: Tensor | VarlenSegments | None = None, lora: LoRAApp | None = None) -> Tensor:
        bsz, seqlen, dim = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if lora is not None:  # TTT adapters add to the frozen projections (§7.2)
            q, k, v = lora.add("q", q, x), lora.add("k", k, x), lora.add("v", v, x)
        q = q.reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = rms_norm(q)  # fp32 from here to the kernel
        k = rms_norm(k)
        cos, sin = self.rotary(seqlen)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain[None, :, None, None]
        y = attention(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), self.scale, doc)  # causal, GQA
        if self.xsa:
            y = exclusive_self_attention(y, v)
        if self.gate_window:
            y = sparse_attn_gate(y, x, self.attn_gate_w, self.gate_scale)
        y = y.transpose(1, 2).reshape(bsz, seqlen, dim)
        out = self.proj(y)
        return out if lora is None else lora.add("o", out, x)  # the o adapter reads n, not W_o's input (§7.2)


# MLP_ACT (shared/config.py's choices; mlx_model.py has the same table): the activation of the pre-activation h,
# given MLP_LEAKY_SLOPE. leaky_relu2 (RECORD_STACK.md §3.5): h for h > 0, slope * h otherwise, squared.
MLP_ACTIVATIONS = {
    "relu2": lambda h, slope: torch.relu(h).square(),
    "leaky_relu2": lambda h, slope: F.leaky_relu(h, negative_slope=slope).square(),
}
FUSED_MLP_SLOPES = {"relu2": lambda slope: 0.0, "leaky_relu2": lambda slope: slope}  # FusedSquaredMLP's family


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, leaky_slope: float, dtype: torch.dtype, fused: bool = False):
        super().__init__()
        self.fc = CastedLinear(dim, hidden, dtype)
        self.proj = CastedLinear(hidden, dim, dtype)
        self.act, self.slope = implementation(MLP_ACTIVATIONS, "mlp_act", act, "torch_model"), leaky_slope
        # TORCH_FUSED_MLP, training only (eval, Hessian hooks and TTT run the reference); None: the reference
        self.fused_slope = FUSED_MLP_SLOPES[act](leaky_slope) if fused and act in FUSED_MLP_SLOPES else None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_slope is not None and self.training:
            dt = self.fc.dtype
            return FusedSquaredMLP.apply(x.to(dt), self.fc.weight.to(dt), self.proj.weight.to(dt), self.fused_slope)
        return self.proj(self.act(self.fc(x), self.slope))


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        dim = cfg.model_dim
        # LN_SCALE: c_i = 1/sqrt(i+1) by physical layer index, rounded to fp32 once (RECORD_STACK.md §3.3)
        ln_scale = float(np.float32(1.0 / math.sqrt(layer_idx + 1))) if cfg.ln_scale else 1.0
        self.attn_norm = RMSNorm(ln_scale)
        self.mlp_norm = RMSNorm(ln_scale)
        xsa = layer_idx >= cfg.num_layers - cfg.xsa_last_n  # XSA_LAST_N: the last n physical layers
        gate_window = cfg.gate_window if cfg.sparse_attn_gate_enabled else 0
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.rope_base, cfg.rope_dims,
                                        cfg.qk_gain_init, xsa, dtype, gate_window, cfg.sparse_attn_gate_scale)
        self.mlp = MLP(dim, mlp_hidden(cfg), cfg.mlp_act, cfg.mlp_leaky_slope, dtype, cfg.torch_fused_mlp)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor, doc: Tensor | VarlenSegments | None = None,
                lora: LoRAApp | None = None) -> Tensor:
        mix = self.resid_mix
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0  # fp32 residual stream
        x = x + self.attn_scale[None, None, :] * self.attn(self.attn_norm(x), doc, lora)
        x = x + self.mlp_scale[None, None, :] * self.mlp_out(self.mlp_norm(x), lora)
        return x

    def mlp_out(self, n: Tensor, lora: LoRAApp | None) -> Tensor:
        """The MLP of n, plus the TTT adapter's delta of n when adapted (parallel to the whole MLP, before beta)."""
        return self.mlp(n) if lora is None else lora.add("mlp", self.mlp(n), n)

    def parallel(self, lane0: Tensor, lane1: Tensor, x0: Tensor, post: Tensor, resid: Tensor,
                 doc: Tensor | VarlenSegments | None = None, lora: LoRAApp | None = None) -> tuple[Tensor, Tensor]:
        """Two residual lanes (RECORD_STACK.md §3.7, from the 2026-03-31 ParallelResiduals record): attention
        reads lane 0 mixed with x0, the MLP reads lane 1 alone (not this layer's attention); post[s, l] sends
        sublayer s (0 attention, 1 MLP) into lane l, resid[l] scales lane l. fp32 like the residual stream."""
        mix = self.resid_mix
        u = mix[0][None, None, :] * lane0 + mix[1][None, None, :] * x0
        a = self.attn_scale[None, None, :] * self.attn(self.attn_norm(u), doc, lora)
        m = self.mlp_scale[None, None, :] * self.mlp_out(self.mlp_norm(lane1), lora)
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters, dtype: torch.dtype = torch.float32, bos_id: int | None = None):
        super().__init__()
        self.bos_id = bos_id  # the tokenizer's BOS id (None/-1: unknown); read by BOS-aware features
        self.logit_softcap = cfg.logit_softcap
        self.fused_ce = cfg.torch_fused_ce
        self.tie_embeddings = cfg.tie_embeddings
        self.dtype = dtype
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.smear_gate_enabled = cfg.smear_gate_enabled
        if cfg.smear_gate_enabled:  # the record's names; smear() reads the weight, it is never called as a Linear
            self.smear_gate = CastedLinear(cfg.gate_window, 1, dtype)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        # NUM_LOOPS: the looped and unlooped plans (shared/spec.layer_plan); set_looping picks one
        self._plan_unlooped, self._plan_looped = layer_plan(cfg, False), layer_plan(cfg, True)
        self.looping = cfg.num_loops > 0  # built looped: every score runs looped; training switches it
        self.skip_weights = nn.Parameter(torch.ones(num_skip_weights(cfg), cfg.model_dim))
        self.skip_gates_enabled = cfg.skip_gates_enabled
        if cfg.skip_gates_enabled:
            self.skip_gates = nn.Parameter(torch.zeros(num_skip_weights(cfg), cfg.model_dim))
        self.parallel_start = cfg.parallel_start_layer  # 0: one residual stream throughout
        if self.parallel_start:
            lanes = cfg.num_layers - self.parallel_start
            self.parallel_post_lambdas = nn.Parameter(torch.ones(lanes, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((lanes, 2), 1.1))
        self.blocks = nn.ModuleList([Block(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm()
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, dtype)

    def raw_logits(self, input_ids: Tensor, segments: Tensor | VarlenSegments | None = None,
                   lora: list[LoRAApp] | None = None) -> Tensor:
        """The head's output before the softcap. segments: None = dense causal; (B, T) int32 ids
        (shared/segments.py) = attend within a segment only; or VarlenSegments the caller built on the host
        (host_varlen_segments: no device-to-host copy inside the step). RoPE positions stay the index within
        the row either way (RECORD_STACK.md §4). lora: TTT adapters, one LoRAApp per layer application of the
        plan (looped passes apart), then the head's."""
        doc = segments if isinstance(segments, VarlenSegments) or segments is None else self.doc_attention(segments)
        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.smear_gate_enabled:
            x = smear(x, input_ids, self.smear_gate.weight, self.smear_lambda, self.bos_id)
        x = rms_norm(x)
        plan = self._plan_looped if self.looping else self._plan_unlooped  # NUM_LOOPS: which walk (§3.2)
        h, skips = self.encode(x, plan, doc, lora)
        x = self.final_norm(self.decode(h, x, skips, plan, doc, lora))
        w = self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight
        z = F.linear(x.to(self.dtype), w.to(self.dtype))  # (B, T, V) in the compute dtype
        if lora is not None:
            z = lora[-1].add("head", z.float(), x)  # before the softcap (§7.2)
        return z

    def logits(self, input_ids: Tensor, segments: Tensor | VarlenSegments | None = None,
               lora: list[LoRAApp] | None = None) -> Tensor:
        """Softcapped logits (B, T, V), fp32: c * tanh(z / c) of the head's output (raw_logits)."""
        z = self.raw_logits(input_ids, segments, lora).float()  # softcap and loss in fp32
        return self.logit_softcap * torch.tanh(z / self.logit_softcap)

    def encode(self, x: Tensor, plan: LayerPlan, doc, lora: list | None) -> tuple[Tensor, list]:
        """The encoder's layer applications on the normed embedding x (also every block's x0), each output pushed
        for a U-Net skip; application j (the LoRA index) runs physical layer plan.encoder[j]."""
        x0, skips = x, []
        for j, i in enumerate(plan.encoder):
            x = self.blocks[i](x, x0, doc, **adapters(lora, j))
            skips.append(x)
        return x, skips

    def decode(self, x: Tensor, x0: Tensor, skips: list, plan: LayerPlan, doc, lora: list | None) -> Tensor:
        """The decoder's applications (LoRA index j continues the encoder's), each popping the skip its slot
        names; from the first layer >= PARALLEL_START_LAYER two residual lanes (§3.7), merged at the end."""
        lanes = None  # (lane0, lane1) from the first layer >= PARALLEL_START_LAYER to the end
        for j, (i, slot) in enumerate(zip(plan.decoder, plan.skip_slots), len(plan.encoder)):
            app = adapters(lora, j)
            if lanes is None and 0 < self.parallel_start <= i:
                lanes = (x, x)  # split before the skip, which joins lane 0 only
            if lanes is None:
                x = self.blocks[i](x if slot is None else self.add_skip(x, skips.pop(), slot), x0, doc, **app)
            else:
                lane0 = lanes[0] if slot is None else self.add_skip(lanes[0], skips.pop(), slot)
                lanes = self.blocks[i].parallel(lane0, lanes[1], x0, *self.lane_lambdas(i), doc, **app)
        return x if lanes is None else merge_lanes(*lanes)

    def add_skip(self, x: Tensor, skip: Tensor, slot: int) -> Tensor:
        """U-Net skip through `slot` (§3.6): scaled by skip_weights[slot], then added or gate-mixed (GatedSkip:
        gated_skip with its backward written out)."""
        if self.skip_gates_enabled:
            return GatedSkip.apply(x, skip, self.skip_weights[slot], self.skip_gates[slot])
        return x + self.skip_weights[slot][None, None, :] * skip

    def lane_lambdas(self, layer: int) -> tuple[Tensor, Tensor]:
        """(post [2, 2], resid [2]) of a lane layer: row layer - PARALLEL_START_LAYER (shared/spec._lane_rows)."""
        k = layer - self.parallel_start
        return self.parallel_post_lambdas[k], self.parallel_resid_lambdas[k]

    def set_looping(self, on: bool) -> None:
        """Depth recurrence on or off (RECORD_STACK.md §3.2); a no-op without NUM_LOOPS. Under torch.compile
        the flag is guarded: each state compiles once, then both graphs stay cached."""
        self.looping = bool(on)

    @torch.compiler.disable  # host-side choice and numpy: one graph break, nothing traced into the compiled graph
    def doc_attention(self, segments: Tensor) -> Tensor | VarlenSegments:
        """What every layer's attention needs for DOC_ISOLATED_ATTN, built once per forward."""
        if doc_attention_kernel(segments.device, self.dtype).startswith("varlen"):
            return varlen_segments(segments)
        return segment_mask(segments)

    def token_nll(self, input_ids: Tensor, target_ids: Tensor, segments: Tensor | None = None,
                  lora: list[LoRAApp] | None = None) -> Tensor:
        logits = self.logits(input_ids, segments, lora)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="none")
        return nll.reshape(target_ids.shape)  # (B, T) nats, fp32

    def forward(self, input_ids: Tensor, target_ids: Tensor, segments: Tensor | VarlenSegments | None = None) -> Tensor:
        """Mean training loss. TORCH_FUSED_CE (training only): softcap and cross-entropy in one pass over the
        head's output (SoftcapCrossEntropy), never materialising the fp32 softcapped logits."""
        if not (self.fused_ce and self.training):
            return self.token_nll(input_ids, target_ids, segments).mean()
        z = self.raw_logits(input_ids, segments)
        return SoftcapCrossEntropy.apply(z.reshape(-1, z.size(-1)), target_ids.reshape(-1), self.logit_softcap).mean()


def build_model(cfg: Hyperparameters, device: torch.device | str = "cpu", state: dict[str, np.ndarray] | None = None,
                dtype: torch.dtype = torch.float32, bos_id: int | None = None) -> GPT:
    """A GPT on device holding `state` (default: the shared numpy init for SEED); bos_id from the tokenizer."""
    model = GPT(cfg, dtype, bos_id).to(device)
    load_numpy_state(model, init_params(cfg) if state is None else state)
    return model


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Strict by name and shape; errors name the key."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: state has shape {tuple(state[name].shape)}, model {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(state[name], dtype=np.float32)))


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies (never views of the live parameters, which the optimizer updates in place)."""
    return {k: to_numpy(v) for k, v in model.named_parameters()}


def to_numpy(t: Tensor) -> np.ndarray:
    """An fp32 numpy copy: on a CPU .numpy() would share memory with the tensor."""
    return t.detach().float().cpu().numpy().copy()


def collect_hessians(model: GPT, batches: list[tuple[Tensor, Tensor | None]], targets: list[str],
                     divisor: int | None = None) -> dict[str, np.ndarray]:
    """GPTQ's H = sum of x^T x over every row x a target weight's matmul reads (RECORD_STACK.md §6.1), by
    hooks, with no change to the model: a forward pre-hook on each target CastedLinear (it fires once per
    application, so a looped layer adds every pass) and, for the tied head, a forward hook on final_norm (the
    head's input). x is cast to the compute dtype as the matmul casts it, then to fp32; x^T x and the running
    sum (in call order) are fp32 on the device, divided by `divisor` (default: the number of batches).
    batches: (ids, segments or None) on the device. Returns float32 numpy arrays by weight name."""
    sums: dict[str, Tensor] = {}

    def add(name: str, x: Tensor) -> None:
        x = x.detach().to(model.dtype).float().reshape(-1, x.shape[-1])
        sums[name] = x.T @ x if name not in sums else sums[name] + x.T @ x

    wanted, handles = set(targets), []
    for mname, m in model.named_modules():
        if isinstance(m, CastedLinear) and f"{mname}.weight" in wanted:
            handles.append(m.register_forward_pre_hook(lambda _m, args, n=f"{mname}.weight": add(n, args[0])))
    head = "tok_emb.weight" if model.tie_embeddings else "lm_head.weight"
    if head in wanted:
        handles.append(model.final_norm.register_forward_hook(lambda _m, _args, out: add(head, out)))
    was_training = model.training
    model.eval()  # the reference MLP: TORCH_FUSED_MLP's training path never calls mlp.fc / mlp.proj
    try:
        with torch.inference_mode():
            for ids, segments in batches:
                model.logits(ids, segments)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {k: to_numpy(sums[k] / (divisor or len(batches))) for k in sorted(sums)}
