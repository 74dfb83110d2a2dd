"""The model in MLX: mirrors torch_model.py class for class and line for line.

Parameter names and shapes are the table in shared/spec.py; weights come in and go
out as numpy arrays (load_numpy_state / numpy_state).

    model = build_model(cfg, state, dtype=mx.bfloat16)
    nll = model.token_nll(x, y)          # (B, T) nats, fp32
"""
from __future__ import annotations

from mlx_cpu_ops import select_ops, uses_per_segment  # first: it puts a fast BLAS under mlx[cpu] before mlx loads

import math  # noqa: E402
from typing import NamedTuple  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from shared.config import Hyperparameters, implementation  # noqa: E402
from shared.segments import cu_seqlens  # noqa: E402
from shared.spec import LayerPlan, init_params, layer_plan, mlp_hidden, num_skip_weights  # noqa: E402

# ---- numerics, written out (torch_model.py uses the same) ----
RMS_NORM_EPS = 1e-6
# RoPE: half-split layout over the first K = ROPE_DIMS dims of a head (0: all D), x1 = x[..., :K/2],
# x2 = x[..., K/2:K], rotated by -theta: (x1*cos + x2*sin, -x1*sin + x2*cos), theta_{t,i} = t * ROPE_BASE^(-2i/K);
# dims K..D-1 pass through (the record's partial RoPE, RECORD_STACK.md §3.4).
# Written out rather than mx.fast.rope, whose direction is the opposite (+theta).
# Dtypes: weights are fp32 masters; every matmul casts both operands to the compute dtype `dtype`;
# the residual stream, every RMSNorm (q/k included), RoPE, q_gain, the softcap and the cross-entropy
# run in fp32; q, k, v enter the attention kernel in the compute dtype.
XSA_EPS = 1e-12  # XSA's v_hat = v / sqrt(sum(v^2) + XSA_EPS), in fp32: finite (zero) for an all-zero v


def rms_norm(x: mx.array) -> mx.array:
    return mx.fast.rms_norm(x.astype(mx.float32), None, RMS_NORM_EPS)  # fp32 in, fp32 out


class RMSNorm(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale  # LN_SCALE's c_i, multiplied after the norm; 1.0 skips the multiply

    def __call__(self, x: mx.array) -> mx.array:
        y = rms_norm(x)
        return y if self.scale == 1.0 else y * self.scale


class CastedLinear(nn.Module):
    """fp32 master weight (out, in); input and weight cast to the compute dtype at use."""

    def __init__(self, in_dim: int, out_dim: int, dtype: mx.Dtype):
        super().__init__()
        self.weight = mx.zeros((out_dim, in_dim))
        self.dtype = dtype

    _tap = None  # collect_hessians sets it to read each input (torch uses a forward pre-hook instead)

    def __call__(self, x: mx.array) -> mx.array:
        if self._tap is not None:
            self._tap(x)
        return x.astype(self.dtype) @ self.weight.astype(self.dtype).T


class LoRAApp(NamedTuple):
    """Score-first TTT's adapters of one layer application (RECORD_STACK.md §7.2), one slot per document:
    delta(x) = (x A^T) B^T * alpha/r with A (B, r, in), B (B, out, r). `weights` maps a target (q, k, v, o, mlp;
    head on the last) to its (A, B); mlx_ttt.py builds them. With lora=None the model never reads one."""
    weights: dict
    scale: float
    dtype: mx.Dtype

    def add(self, name: str, out: mx.array, x: mx.array) -> mx.array:
        if name not in self.weights:
            return out
        a, b = self.weights[name]
        h = x.astype(self.dtype) @ a.astype(self.dtype).transpose(0, 2, 1)  # (B, T, r)
        return out + (h @ b.astype(self.dtype).transpose(0, 2, 1)).astype(mx.float32) * self.scale  # fp32 (B, T, out)


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float):
        super().__init__()
        self._inv_freq = 1.0 / (base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))  # "_": not a parameter

    def __call__(self, seq_len: int) -> tuple[mx.array, mx.array]:
        t = mx.arange(seq_len, dtype=mx.float32)
        freqs = mx.outer(t, self._inv_freq)  # (T, D/2), fp32
        return mx.cos(freqs)[None, None], mx.sin(freqs)[None, None]


def apply_rotary_emb(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = cos.shape[-1]  # K/2: dims 2*half.. pass through (empty under full RoPE)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return mx.concatenate([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, rest], axis=-1)


def exclusive_self_attention(y: mx.array, v: mx.array) -> mx.array:
    """XSA (RECORD_STACK.md §3.4): y_h - (y_h . v_hat) v_hat with v_hat the token's own value of head h's KV head.

    y (B, H, T, D), v (B, Hkv, T, D); query head h reads KV head h // G (G = H / Hkv), as in the attention.
    Computed in fp32; returns fp32 (B, H, T, D)."""
    bsz, heads, seqlen, head_dim = y.shape
    kv_heads = v.shape[1]
    y = y.astype(mx.float32).reshape(bsz, kv_heads, heads // kv_heads, seqlen, head_dim)  # (B, Hkv, G, T, D)
    v = v.astype(mx.float32)
    v_hat = (v / mx.sqrt(mx.sum(mx.square(v), axis=-1, keepdims=True) + XSA_EPS))[:, :, None]  # (B, Hkv, 1, T, D)
    y = y - mx.sum(y * v_hat, axis=-1, keepdims=True) * v_hat
    return y.reshape(bsz, heads, seqlen, head_dim)


def segment_mask(segments: mx.array) -> mx.array:
    """(B, 1, T, T) bool from (B, T) segment ids: i attends to j iff j <= i and seg(i) == seg(j) (§4)."""
    seqlen = segments.shape[1]
    causal = mx.tril(mx.ones((seqlen, seqlen), dtype=mx.bool_))
    return (segments[:, None, :, None] == segments[:, None, None, :]) & causal


def segment_ranges(segments: mx.array) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, the (start, end) of each segment, from shared/segments.py's cu_seqlens (read on the host:
    eager mode only)."""
    seqlen = segments.shape[1]
    cu = cu_seqlens(np.array(segments)).tolist()
    rows = [[] for _ in range(segments.shape[0])]
    for a, b in zip(cu[:-1], cu[1:]):
        rows[a // seqlen].append((a % seqlen, a % seqlen + b - a))
    return tuple(tuple(row) for row in rows)


def gated_skip(x: mx.array, skip: mx.array, gate: mx.array) -> mx.array:
    """SKIP_GATES_ENABLED (RECORD_STACK.md §3.6): g = sigmoid(gate); g * x + (1 - g) * skip,
    the record's torch.lerp(skip, x, g). Zero-init gates: an even mix."""
    g = mx.sigmoid(gate)
    return g * x + (1 - g) * skip


def smear(e: mx.array, ids: mx.array, weight: mx.array, lam: mx.array, bos_id: int | None) -> mx.array:
    """The record's SmearGate with its BOS fix (SMEAR_GATE_ENABLED, RECORD_STACK.md §3.1):
    e'_t = e_t + lambda * sigmoid(w . e_t[:W]) * 1[ids_t != BOS] * e_{t-1} for t >= 1, e'_0 = e_0.

    e (B, T, dim) raw (pre-norm) embeddings, ids (B, T), weight (1, W), lam (1,). The mask reads the CURRENT token:
    a document's BOS never takes the previous document's last token. The gate is an fp32 product-sum, not a matmul
    (as in torch_model.py, where CUDA runs fp32 matmuls in TF32). Returns fp32 (B, T, dim)."""
    if bos_id is None or bos_id < 0:
        raise ValueError("SMEAR_GATE_ENABLED=1 needs the tokenizer's BOS id; TOKENIZER_PATH's model has none")
    e = e.astype(mx.float32)
    g = lam * mx.sigmoid(mx.sum(e[..., :weight.shape[-1]] * weight[0], axis=-1, keepdims=True))  # (B, T, 1)
    keep = (ids[:, 1:] != bos_id).astype(mx.float32)[..., None]  # (B, T-1, 1): 0 where the current token is BOS
    return mx.concatenate([e[:, :1], e[:, 1:] + g[:, 1:] * keep * e[:, :-1]], axis=1)


def sparse_attn_gate(y: mx.array, n: mx.array, weight: mx.array, scale: float) -> mx.array:
    """Sparse attention output gate (SPARSE_ATTN_GATE_ENABLED, RECORD_STACK.md §3.4): y_h * sigmoid(scale * G_h.n[:W]).

    y (B, H, T, D) head outputs (after XSA); n (B, T, dim) the attention's input (normed, LN-scaled), of which the
    first W dims are read; weight G (H, W). fp32 product-sum, not a matmul (as in torch). Returns fp32 (B, H, T, D)."""
    z = mx.sum(n.astype(mx.float32)[:, :, None, :weight.shape[-1]] * weight, axis=-1)  # (B, T, H)
    g = mx.sigmoid(scale * z).transpose(0, 2, 1)[..., None]  # (B, H, T, 1)
    return y.astype(mx.float32) * g


def adapters(lora: list | None, j: int) -> dict:
    """Keyword arguments of layer application j: none without TTT, so the default calls stay as they were."""
    return {} if lora is None else {"lora": lora[j]}


def merge_lanes(lane0: mx.array, lane1: mx.array) -> mx.array:
    """PARALLEL_START_LAYER: the two lanes end as their mean (the record's PARALLEL_FINAL_LANE=mean, §3.7)."""
    return 0.5 * (lane0 + lane1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, rope_dims: int,
                 qk_gain_init: float, xsa: bool, dtype: mx.Dtype, ops, gate_window: int = 0, gate_scale: float = 1.0):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.xsa = xsa
        self.gate_window, self.gate_scale = gate_window, gate_scale  # sparse output gate; 0 = off
        self.head_dim = dim // num_heads
        self.dtype, self._ops = dtype, ops
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, dtype)
        self.c_k = CastedLinear(dim, kv_dim, dtype)
        self.c_v = CastedLinear(dim, kv_dim, dtype)
        self.proj = CastedLinear(dim, dim, dtype)
        self.q_gain = mx.full((num_heads,), qk_gain_init, dtype=mx.float32)
        self.rotary = Rotary(rope_dims or self.head_dim, rope_base)  # ROPE_DIMS=0: every dim
        self.scale = self.head_dim ** -0.5  # explicit attention scale
        if gate_window:
            self.attn_gate_w = mx.zeros((num_heads, gate_window))

    def __call__(self, x: mx.array, doc: mx.array | tuple | None = None, lora: LoRAApp | None = None) -> mx.array:
        bsz, seqlen, dim = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if lora is not None:  # TTT adapters add to the frozen projections (§7.2)
            q, k, v = lora.add("q", q, x), lora.add("k", k, x), lora.add("v", v, x)
        q = q.reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        v = v.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = rms_norm(q)  # fp32 from here to the kernel
        k = rms_norm(k)
        cos, sin = self.rotary(seqlen)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain[None, :, None, None]
        y = self._ops.attention(q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype),
                                self.scale, doc)  # causal, GQA
        if self.xsa:
            y = exclusive_self_attention(y, v)
        if self.gate_window:
            y = sparse_attn_gate(y, x, self.attn_gate_w, self.gate_scale)
        y = y.transpose(0, 2, 1, 3).reshape(bsz, seqlen, dim)
        out = self.proj(y)
        return out if lora is None else lora.add("o", out, x)  # the o adapter reads n, not W_o's input (§7.2)


# MLP_ACT (shared/config.py's choices; torch_model.py has the same table): the activation of the pre-activation h,
# given MLP_LEAKY_SLOPE. leaky_relu2 (RECORD_STACK.md §3.5): h for h > 0, slope * h otherwise, squared.
MLP_ACTIVATIONS = {
    "relu2": lambda h, slope: mx.square(nn.relu(h)),
    "leaky_relu2": lambda h, slope: mx.square(mx.where(h > 0, h, slope * h)),
}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, leaky_slope: float, dtype: mx.Dtype):
        super().__init__()
        self.fc = CastedLinear(dim, hidden, dtype)
        self.proj = CastedLinear(hidden, dim, dtype)
        self.act, self.slope = implementation(MLP_ACTIVATIONS, "mlp_act", act, "mlx_model"), leaky_slope

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(self.act(self.fc(x), self.slope))


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters, layer_idx: int, dtype: mx.Dtype, ops):
        super().__init__()
        dim = cfg.model_dim
        # LN_SCALE: c_i = 1/sqrt(i+1) by physical layer index, rounded to fp32 once (RECORD_STACK.md §3.3)
        ln_scale = float(np.float32(1.0 / math.sqrt(layer_idx + 1))) if cfg.ln_scale else 1.0
        self.attn_norm = RMSNorm(ln_scale)
        self.mlp_norm = RMSNorm(ln_scale)
        xsa = layer_idx >= cfg.num_layers - cfg.xsa_last_n  # XSA_LAST_N: the last n physical layers
        gate_window = cfg.gate_window if cfg.sparse_attn_gate_enabled else 0
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.rope_base, cfg.rope_dims,
                                        cfg.qk_gain_init, xsa, dtype, ops, gate_window, cfg.sparse_attn_gate_scale)
        self.mlp = MLP(dim, mlp_hidden(cfg), cfg.mlp_act, cfg.mlp_leaky_slope, dtype)
        self.attn_scale = mx.ones((dim,))
        self.mlp_scale = mx.ones((dim,))
        self.resid_mix = mx.stack([mx.ones((dim,)), mx.zeros((dim,))])

    def __call__(self, x: mx.array, x0: mx.array, doc: mx.array | tuple | None = None,
                 lora: LoRAApp | None = None) -> mx.array:
        mix = self.resid_mix
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0  # fp32 residual stream
        x = x + self.attn_scale[None, None, :] * self.attn(self.attn_norm(x), doc, lora)
        x = x + self.mlp_scale[None, None, :] * self.mlp_out(self.mlp_norm(x), lora)
        return x

    def mlp_out(self, n: mx.array, lora: LoRAApp | None) -> mx.array:
        """The MLP of n, plus the TTT adapter's delta of n when adapted (parallel to the whole MLP, before beta)."""
        return self.mlp(n) if lora is None else lora.add("mlp", self.mlp(n), n)

    def parallel(self, lane0: mx.array, lane1: mx.array, x0: mx.array, post: mx.array, resid: mx.array,
                 doc: mx.array | tuple | None = None, lora: LoRAApp | None = None) -> tuple[mx.array, mx.array]:
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
    def __init__(self, cfg: Hyperparameters, dtype: mx.Dtype = mx.float32, ops=None, bos_id: int | None = None):
        super().__init__()
        self.bos_id = bos_id  # the tokenizer's BOS id (None/-1: unknown); read by BOS-aware features
        self._ops = ops if ops is not None else select_ops(cfg)
        self.logit_softcap = cfg.logit_softcap
        self.tie_embeddings = cfg.tie_embeddings
        self.dtype = dtype
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.smear_gate_enabled = cfg.smear_gate_enabled
        if cfg.smear_gate_enabled:  # the record's names; smear() reads the weight, it is never called as a Linear
            self.smear_gate = CastedLinear(cfg.gate_window, 1, dtype)
            self.smear_lambda = mx.zeros((1,))
        # NUM_LOOPS: the looped and unlooped plans (shared/spec.layer_plan); set_looping picks one
        self._plan_unlooped, self._plan_looped = layer_plan(cfg, False), layer_plan(cfg, True)
        self.looping = cfg.num_loops > 0  # built looped: every score runs looped; training switches it
        self.skip_weights = mx.ones((num_skip_weights(cfg), cfg.model_dim))
        self.skip_gates_enabled = cfg.skip_gates_enabled
        if cfg.skip_gates_enabled:
            self.skip_gates = mx.zeros((num_skip_weights(cfg), cfg.model_dim))
        self.parallel_start = cfg.parallel_start_layer  # 0: one residual stream throughout
        if self.parallel_start:
            lanes = cfg.num_layers - self.parallel_start
            self.parallel_post_lambdas = mx.ones((lanes, 2, 2))
            self.parallel_resid_lambdas = mx.full((lanes, 2), 1.1)
        self.blocks = [Block(cfg, i, dtype, self._ops) for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm()
        if not cfg.tie_embeddings:
            self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, dtype)

    def raw_logits(self, input_ids: mx.array, segments: mx.array | None = None,
                   lora: list[LoRAApp] | None = None) -> mx.array:
        """The head's output before the softcap. segments: None = dense causal; (B, T) int32 ids
        (shared/segments.py) = attend within a segment only. RoPE positions stay the index within the row either
        way (RECORD_STACK.md §4). lora: TTT adapters, one LoRAApp per layer application of the plan (looped
        passes apart), then the head's."""
        doc = None if segments is None else self.doc_attention(segments)
        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.smear_gate_enabled:
            x = smear(x, input_ids, self.smear_gate.weight, self.smear_lambda, self.bos_id)
        x = rms_norm(x)
        plan = self._plan_looped if self.looping else self._plan_unlooped  # NUM_LOOPS: which walk (§3.2)
        h, skips = self.encode(x, plan, doc, lora)
        x = self.final_norm(self.decode(h, x, skips, plan, doc, lora))
        w = self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight
        z = x.astype(self.dtype) @ w.astype(self.dtype).T  # (B, T, V) in the compute dtype
        if lora is not None:
            z = lora[-1].add("head", z.astype(mx.float32), x)  # before the softcap (§7.2)
        return z

    def logits(self, input_ids: mx.array, segments: mx.array | None = None,
               lora: list[LoRAApp] | None = None) -> mx.array:
        """Softcapped logits (B, T, V), fp32: c * tanh(z / c) of the head's output (raw_logits)."""
        z = self.raw_logits(input_ids, segments, lora).astype(mx.float32)  # softcap and loss in fp32
        return self.logit_softcap * self._ops.tanh(z / self.logit_softcap)

    def encode(self, x: mx.array, plan: LayerPlan, doc, lora: list | None) -> tuple[mx.array, list]:
        """The encoder's layer applications on the normed embedding x (also every block's x0), each output pushed
        for a U-Net skip; application j (the LoRA index) runs physical layer plan.encoder[j]."""
        x0, skips = x, []
        for j, i in enumerate(plan.encoder):
            x = self.blocks[i](x, x0, doc, **adapters(lora, j))
            skips.append(x)
        return x, skips

    def decode(self, x: mx.array, x0: mx.array, skips: list, plan: LayerPlan, doc, lora: list | None) -> mx.array:
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

    def add_skip(self, x: mx.array, skip: mx.array, slot: int) -> mx.array:
        """U-Net skip through `slot` (§3.6): scaled by skip_weights[slot], then added or gate-mixed."""
        skip = self.skip_weights[slot][None, None, :] * skip
        if self.skip_gates_enabled:
            return gated_skip(x, skip, self.skip_gates[slot][None, None, :])
        return x + skip

    def lane_lambdas(self, layer: int) -> tuple[mx.array, mx.array]:
        """(post [2, 2], resid [2]) of a lane layer: row layer - PARALLEL_START_LAYER (shared/spec._lane_rows)."""
        k = layer - self.parallel_start
        return self.parallel_post_lambdas[k], self.parallel_resid_lambdas[k]

    def set_looping(self, on: bool) -> None:
        """Depth recurrence on or off (RECORD_STACK.md §3.2); a no-op without NUM_LOOPS. mx.compile fixes the
        flag at trace time: a compiled caller keeps one graph per state (mlx_train.MLXBackend)."""
        self.looping = bool(on)

    def doc_attention(self, segments: mx.array) -> mx.array | tuple:
        """What every layer's attention needs for DOC_ISOLATED_ATTN, built once per forward."""
        if uses_per_segment(self._ops, segments.shape[1]):
            return segment_ranges(segments)
        return segment_mask(segments)

    def token_nll(self, input_ids: mx.array, target_ids: mx.array, segments: mx.array | None = None,
                  lora: list[LoRAApp] | None = None) -> mx.array:
        logits = self.logits(input_ids, segments, lora)
        return self._ops.token_nll(logits, target_ids)  # (B, T) nats, fp32

    def __call__(self, input_ids: mx.array, target_ids: mx.array, segments: mx.array | None = None) -> mx.array:
        return self.token_nll(input_ids, target_ids, segments).mean()


def build_model(cfg: Hyperparameters, state: dict[str, np.ndarray] | None = None, dtype: mx.Dtype = mx.float32,
                ops=None, bos_id: int | None = None) -> GPT:
    """A GPT holding `state` (default: the shared numpy init for SEED); bos_id from the tokenizer."""
    model = GPT(cfg, dtype, ops, bos_id)
    load_numpy_state(model, init_params(cfg) if state is None else state)
    return model


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Strict by name and shape; errors name the key."""
    params = dict(tree_flatten(model.parameters()))
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: state has shape {tuple(state[name].shape)}, model {tuple(p.shape)}")
    model.update(tree_unflatten([(k, mx.array(np.asarray(state[k], dtype=np.float32))) for k in params]))
    mx.eval(model.parameters())


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


class _TapOutput(nn.Module):
    """Wraps a parameter-free module and hands its output to a callback (the tied head's input for
    collect_hessians; torch reads it with a forward hook)."""

    def __init__(self, inner: nn.Module, tap):
        super().__init__()
        self.inner = inner
        self._tap_fn = tap

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        self._tap_fn(y)
        return y


def collect_hessians(model: GPT, batches: list[tuple[mx.array, mx.array | None]], targets: list[str],
                     divisor: int | None = None) -> dict[str, np.ndarray]:
    """torch_model.collect_hessians in MLX, the same sums in the same order: each target CastedLinear's _tap
    reads its input, final_norm is wrapped for the tied head's input (put back after); x cast to the compute
    dtype as the matmul casts it, then fp32; x^T x and the running sum fp32, divided by `divisor` (default: the
    number of batches). Returns float32 numpy arrays by weight name."""
    sums: dict[str, mx.array] = {}

    def tap(name: str):
        def add(x: mx.array) -> None:
            x = x.astype(model.dtype).astype(mx.float32).reshape(-1, x.shape[-1])
            sums[name] = x.T @ x if name not in sums else sums[name] + x.T @ x
        return add

    wanted, tapped = set(targets), []
    for mname, m in model.named_modules():
        if isinstance(m, CastedLinear) and f"{mname}.weight" in wanted:
            m._tap = tap(f"{mname}.weight")
            tapped.append(m)
    head = "tok_emb.weight" if model.tie_embeddings else "lm_head.weight"
    norm = model.final_norm
    if head in wanted:
        model.final_norm = _TapOutput(norm, tap(head))
    try:
        for ids, segments in batches:
            model.logits(ids, segments)
            mx.eval(list(sums.values()))
    finally:
        for m in tapped:
            m._tap = None
        model.final_norm = norm
    return {k: np.array(sums[k] / (divisor or len(batches))) for k in sorted(sums)}
