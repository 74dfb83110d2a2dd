"""MLX trainer: the exact twin of cuda_train.py, for Apple Silicon (and Linux CPU via mlx[cpu]).

    PRESET=tiny python mlx_train.py                       # CPU/Mac smoke size on demo data
    python mlx_train.py                                   # the official baseline config
    python mlx_train.py --eval artifacts/run.int8.zst     # score any artifact
    python mlx_train.py --resume checkpoints/run.ckpt     # continue a run (checkpoints are cross-framework)

One process consumes exactly the tokens of cuda_train.py (8 slots per step,
shared/data.py); each slot is split into chunks of MLX_MAX_MICROBATCH_TOKENS
evaluated one at a time, so memory stays flat. The model mirrors
cuda_train.py class for class and line for line.
"""
from __future__ import annotations

import ctypes
import glob
import math
import os
import resource
import sys
import time
from pathlib import Path


def _preload_cpu_blas() -> str:
    """Make mlx[cpu]'s matmuls use MKL (or a system OpenBLAS) instead of the bundled reference BLAS.

    The Linux mlx[cpu] wheel links netlib's reference BLAS (~1-2 GFLOP/s here). A BLAS loaded
    into the global symbol scope *before* mlx is imported wins symbol lookup for cblas_sgemm:
    measured 52 ms -> 2 ms for a 1024x64x1024 matmul on a 2-core CPU. MKL runs sequentially
    (deterministic, and mlx already keeps the cores busy). Set MLX_CPU_BLAS=reference to skip.
    """
    if sys.platform != "linux" or os.environ.get("MLX_CPU_BLAS") == "reference":
        return "reference"
    candidates = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    candidates += sorted(glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(lib, "MKL_Set_Threading_Layer"):
            lib.MKL_Set_Threading_Layer(1)  # MKL_THREADING_SEQUENTIAL
        return path
    return "reference"


CPU_BLAS = _preload_cpu_blas()  # before `import mlx.core`, see above

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

from shared import artifact, bpb
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.config import Hyperparameters, artifact_config_for_env, parse_trainer_cli
from shared.data import TokenLoader, train_pattern
from shared.model_spec import group_lr, init_params, num_skip_weights, optimizer_group
from shared.runlog import RunLog, log_final
from shared.training import NS_COEFFS, NS_EPS, muon_momentum, run_training

CUDA_TRAINER = Path(__file__).resolve().with_name("cuda_train.py")  # what ships, hence what code_bytes counts

# ---- numerics, written out (cuda_train.py uses the same constants) ----
RMS_NORM_EPS = 1e-6
# RoPE: half-split layout, x1 = x[..., :D/2], x2 = x[..., D/2:], rotated by -theta:
#   (x1*cos + x2*sin, -x1*sin + x2*cos), theta_{t,i} = t * ROPE_BASE^(-2i/D)
# Written out rather than mx.fast.rope, whose direction is the opposite (+theta).


def rms_norm(x: mx.array) -> mx.array:
    return mx.fast.rms_norm(x, None, RMS_NORM_EPS)


# ---- the three exp-heavy ops, two implementations of the same maths ----
class FusedOps:
    """MLX's own kernels: right on Metal, where exp/tanh are fast."""

    @staticmethod
    def tanh(u: mx.array) -> mx.array:
        return mx.tanh(u)

    @staticmethod
    def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
        return nn.losses.cross_entropy(logits, targets, reduction="none")

    @staticmethod
    def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")  # GQA: k, v untiled


# mlx[cpu]'s exp and tanh are scalar loops (~15 ns/element, measured: 15 ms for 1M floats, numpy 1.8 ms),
# and the logits' softcap + cross-entropy and attention's softmax are most of a CPU step. ComposedOps
# builds them from one exp made of vectorised arithmetic: Cody-Waite reduction x = n ln2 + r,
# |r| <= ln2/2, a degree-7 Taylor polynomial for e^r (truncation < 1e-8) and 2^n from the exponent bits.
LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06
EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(8))
EXP_MIN, EXP_MAX = -87.3, 88.7  # float32 normal range; below EXP_MIN the result is exactly 0


def _exp_poly(x: mx.array) -> mx.array:
    x = mx.clip(x, EXP_MIN, EXP_MAX)
    n = mx.round(x * (1.0 / math.log(2.0)))
    r = (x - n * LN2_HI) - n * LN2_LO
    p = EXP_TAYLOR[7]
    for c in reversed(EXP_TAYLOR[:7]):
        p = p * r + c
    two_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)
    return mx.where(x <= EXP_MIN, 0.0, p * two_n)


@mx.custom_function
def composed_exp(x: mx.array) -> mx.array:
    return _exp_poly(x.astype(mx.float32)).astype(x.dtype)


@composed_exp.vjp
def _composed_exp_vjp(primals, cotangent, output):
    return cotangent * output  # d/dx e^x = e^x: no second exp in the backward pass


class ComposedOps:
    """The same maths from composed_exp: for CPUs (mlx[cpu]); agrees with FusedOps to ~1e-6."""

    @staticmethod
    def tanh(u: mx.array) -> mx.array:
        return 1.0 - 2.0 / (composed_exp(2.0 * u) + 1.0)

    @staticmethod
    def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
        m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
        lse = mx.log(mx.sum(composed_exp(logits - m), axis=-1)) + m[..., 0]
        return lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]

    @staticmethod
    def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        return composed_attention(q * scale, k, v)


def _causal_probs(q5: mx.array, k: mx.array) -> mx.array:
    """softmax(q k^T + causal mask) for q5 (B, Hkv, G, T, D), k (B, Hkv, T, D) -> (B, Hkv, G, T, T)."""
    t = q5.shape[-2]
    s = q5 @ k[:, :, None].swapaxes(-1, -2)
    s = s + mx.triu(mx.full((t, t), -mx.inf, dtype=s.dtype), k=1)
    p = _exp_poly(s - mx.max(s, axis=-1, keepdims=True))
    return p / mx.sum(p, axis=-1, keepdims=True)


@mx.custom_function
def composed_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Causal GQA attention of pre-scaled q; each KV head serves G = H/Hkv query heads."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    p = _causal_probs(q.reshape(b, hkv, h // hkv, t, d), k)
    return (p @ v[:, :, None]).reshape(b, h, t, d)


@composed_attention.vjp
def _composed_attention_vjp(primals, cotangent, output):
    """Recomputes the (T, T) probabilities instead of keeping them for backward (flash-attention's trade):
    no (T, T) tensor is kept per layer (measured at the baseline shape on a 2-core CPU, 8192-token chunks on
    2 streams: peak RSS 15.2 GB -> 11.3 GB)."""
    q, k, v = primals
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q5 = q.reshape(b, hkv, h // hkv, t, d)
    do = cotangent.reshape(q5.shape)
    p = _causal_probs(q5, k)
    dv = mx.sum(p.swapaxes(-1, -2) @ do, axis=2)  # (B, Hkv, T, D), summed over the G query heads
    dp = do @ v[:, :, None].swapaxes(-1, -2)
    ds = p * (dp - mx.sum(do * output.reshape(q5.shape), axis=-1, keepdims=True))  # softmax backward
    dq = (ds @ k[:, :, None]).reshape(b, h, t, d)
    dk = mx.sum(ds.swapaxes(-1, -2) @ q5, axis=2)
    return dq, dk, dv


# ---- model ----
class RMSNorm(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x)


class CastedLinear(nn.Module):
    """fp32 master weight (out, in), cast with the input to the compute dtype at use (torch autocast's rule)."""

    def __init__(self, in_dim: int, out_dim: int, dtype: mx.Dtype):
        super().__init__()
        self.weight = mx.zeros((out_dim, in_dim))
        self._dtype = dtype

    def __call__(self, x: mx.array) -> mx.array:
        return x.astype(self._dtype) @ self.weight.astype(self._dtype).T


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float):
        super().__init__()
        self._inv_freq = 1.0 / (base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))  # "_": not a parameter

    def __call__(self, seq_len: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        t = mx.arange(seq_len, dtype=mx.float32)
        freqs = mx.outer(t, self._inv_freq)  # (T, D/2)
        return mx.cos(freqs)[None, None].astype(dtype), mx.sin(freqs)[None, None].astype(dtype)


def apply_rotary_emb(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], axis=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float,
                 dtype: mx.Dtype, ops):
        super().__init__()
        self._ops = ops
        self._num_heads, self._num_kv_heads = num_heads, num_kv_heads
        self._head_dim = dim // num_heads
        kv_dim = num_kv_heads * self._head_dim
        self.c_q = CastedLinear(dim, dim, dtype)
        self.c_k = CastedLinear(dim, kv_dim, dtype)
        self.c_v = CastedLinear(dim, kv_dim, dtype)
        self.proj = CastedLinear(dim, dim, dtype)
        self.q_gain = mx.full((num_heads,), qk_gain_init, dtype=mx.float32)
        self.rotary = Rotary(self._head_dim, rope_base)
        self._scale = self._head_dim ** -0.5  # explicit attention scale

    def __call__(self, x: mx.array) -> mx.array:
        bsz, seqlen, dim = x.shape
        q = self.c_q(x).reshape(bsz, seqlen, self._num_heads, self._head_dim).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = self.c_k(x).reshape(bsz, seqlen, self._num_kv_heads, self._head_dim).transpose(0, 2, 1, 3)
        v = self.c_v(x).reshape(bsz, seqlen, self._num_kv_heads, self._head_dim).transpose(0, 2, 1, 3)
        q = rms_norm(q)
        k = rms_norm(k)
        cos, sin = self.rotary(seqlen, q.dtype)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.astype(q.dtype)[None, :, None, None]
        y = self._ops.attention(q, k, v, self._scale)  # causal, GQA
        y = y.transpose(0, 2, 1, 3).reshape(bsz, seqlen, dim)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int, dtype: mx.Dtype):
        super().__init__()
        self.fc = CastedLinear(dim, mlp_mult * dim, dtype)
        self.proj = CastedLinear(mlp_mult * dim, dim, dtype)

    def __call__(self, x: mx.array) -> mx.array:
        x = nn.relu(self.fc(x))
        return self.proj(mx.square(x))  # relu^2


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters, dtype: mx.Dtype, ops):
        super().__init__()
        dim = cfg.model_dim
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.rope_base, cfg.qk_gain_init, dtype,
                                        ops)
        self.mlp = MLP(dim, cfg.mlp_mult, dtype)
        self.attn_scale = mx.ones((dim,))
        self.mlp_scale = mx.ones((dim,))
        self.resid_mix = mx.stack([mx.ones((dim,)), mx.zeros((dim,))])

    def __call__(self, x: mx.array, x0: mx.array) -> mx.array:
        mix = self.resid_mix.astype(x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        x = x + self.attn_scale.astype(x.dtype)[None, None, :] * self.attn(self.attn_norm(x))
        x = x + self.mlp_scale.astype(x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters, dtype: mx.Dtype = mx.float32, ops=None):
        super().__init__()
        self._ops = ops if ops is not None else select_ops(cfg)
        self._logit_softcap = cfg.logit_softcap
        self._tie_embeddings = cfg.tie_embeddings
        self._dtype = dtype
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self._num_encoder_layers = cfg.num_layers // 2
        self._num_decoder_layers = cfg.num_layers - self._num_encoder_layers
        self.skip_weights = mx.ones((num_skip_weights(cfg), cfg.model_dim))
        self.blocks = [Block(cfg, dtype, self._ops) for _ in range(cfg.num_layers)]
        self.final_norm = RMSNorm()
        if not cfg.tie_embeddings:
            self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, dtype)

    def logits(self, input_ids: mx.array) -> mx.array:
        x = self.tok_emb(input_ids)  # (B, T, D)
        x = rms_norm(x)
        x0 = x
        skips = []
        for i in range(self._num_encoder_layers):
            x = self.blocks[i](x, x0)
            skips.append(x)
        for i in range(self._num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].astype(x.dtype)[None, None, :] * skips.pop()
            x = self.blocks[self._num_encoder_layers + i](x, x0)
        x = self.final_norm(x)
        w = self.tok_emb.weight if self._tie_embeddings else self.lm_head.weight
        z = (x.astype(self._dtype) @ w.astype(self._dtype).T).astype(mx.float32)  # (B, T, V), softcap/loss in fp32
        return self._logit_softcap * self._ops.tanh(z / self._logit_softcap)

    def token_nll(self, input_ids: mx.array, target_ids: mx.array) -> mx.array:
        logits = self.logits(input_ids)
        return self._ops.token_nll(logits, target_ids)  # (B, T) nats, fp32

    def __call__(self, input_ids: mx.array, target_ids: mx.array) -> mx.array:
        return self.token_nll(input_ids, target_ids).mean()


def select_ops(cfg: Hyperparameters):
    """MLX_OPS: fused (MLX kernels), composed (CPU-friendly) or auto (fused on Metal, composed on CPU)."""
    if cfg.mlx_ops == "auto":
        return FusedOps if mx.metal.is_available() else ComposedOps
    return FusedOps if cfg.mlx_ops == "fused" else ComposedOps


def build_model(cfg: Hyperparameters, state: dict[str, np.ndarray] | None = None,
                dtype: mx.Dtype = mx.float32) -> GPT:
    """A GPT holding `state` (default: the shared numpy init for SEED)."""
    model = GPT(cfg, dtype)
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


# ---- optimizers (torch.optim.Adam and cuda_train.Muon, same maths) ----
def zeropower_via_newtonschulz5(g: mx.array, steps: int, dtype: mx.Dtype) -> mx.array:
    """Approximately orthogonalise g (Muon); quintic Newton-Schulz in `dtype`."""
    a, b, c = NS_COEFFS
    x = g.astype(dtype)
    x = x / (mx.linalg.norm(x.astype(mx.float32)).astype(dtype) + NS_EPS)
    transposed = g.shape[0] > g.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if transposed else x


class Muon:
    """Nesterov momentum, orthogonalised update scaled by sqrt(max(1, rows/cols))."""

    def __init__(self, names: list[str], lr: float, backend_steps: int, ns_dtype: mx.Dtype):
        self.names, self.base_lr, self.lr = names, lr, lr
        self.momentum, self.backend_steps, self.ns_dtype = 0.0, backend_steps, ns_dtype
        self.state: dict[str, dict[str, mx.array]] = {}

    def update(self, params: dict[str, mx.array], grads: dict[str, mx.array]) -> None:
        for n in self.names:
            buf = self.state.setdefault(n, {}).get("momentum", mx.zeros_like(grads[n]))
            buf = buf * self.momentum + grads[n]
            g = grads[n] + self.momentum * buf  # Nesterov
            g = zeropower_via_newtonschulz5(g, self.backend_steps, self.ns_dtype)
            g = g * max(1.0, g.shape[0] / g.shape[1]) ** 0.5
            self.state[n]["momentum"] = buf
            params[n] = params[n] - self.lr * g.astype(params[n].dtype)


class Adam:
    """torch.optim.Adam's update: m.lerp(g, 1-b1); v = b2 v + (1-b2) g^2; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""

    def __init__(self, names: list[str], lr: float, beta1: float, beta2: float, eps: float):
        self.names, self.base_lr, self.lr = names, lr, lr
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.state: dict[str, dict[str, mx.array]] = {}

    def update(self, params: dict[str, mx.array], grads: dict[str, mx.array]) -> None:
        for n in self.names:
            st = self.state.setdefault(n, {"m": mx.zeros_like(params[n]), "v": mx.zeros_like(params[n]), "step": 0.0})
            g = grads[n]
            st["step"] += 1.0
            st["m"] = st["m"] + (1.0 - self.beta1) * (g - st["m"])
            st["v"] = st["v"] * self.beta2 + (1.0 - self.beta2) * (g * g)
            bc1, bc2 = 1.0 - self.beta1 ** st["step"], 1.0 - self.beta2 ** st["step"]
            denom = mx.sqrt(st["v"]) / math.sqrt(bc2) + self.eps
            params[n] = params[n] - (self.lr / bc1) * (st["m"] / denom)


def build_optimizers(model: GPT, cfg: Hyperparameters, ns_dtype: mx.Dtype) -> dict[str, Muon | Adam]:
    """tok/head/scalar: Adam; matrix: Muon (shared/model_spec.optimizer_group decides)."""
    groups: dict[str, list[str]] = {}
    for name, p in tree_flatten(model.parameters()):
        groups.setdefault(optimizer_group(name, tuple(p.shape), cfg), []).append(name)
    opts: dict[str, Muon | Adam] = {}
    for g, names in groups.items():
        lr = group_lr(g, cfg)
        if g == "matrix":
            opts[g] = Muon(names, lr, cfg.muon_backend_steps, ns_dtype)
        else:
            opts[g] = Adam(names, lr, cfg.beta1, cfg.beta2, cfg.adam_eps)
    return opts


def clip_grad_norm(grads: dict[str, mx.array], max_norm: float) -> dict[str, mx.array]:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm/(total+1e-6) when that is < 1."""
    total = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for g in grads.values()))
    coef = mx.minimum(max_norm / (total + 1e-6), 1.0)
    return {k: g * coef.astype(g.dtype) for k, g in grads.items()}


# ---- runtime ----
def compute_dtype(cfg: Hyperparameters) -> mx.Dtype:
    auto = mx.bfloat16 if mx.metal.is_available() else mx.float32  # bf16 on a CPU is slow and not what CI checks
    return {"auto": auto, "float32": mx.float32, "bfloat16": mx.bfloat16}[cfg.compute_dtype]


def make_streams(cfg: Hyperparameters) -> list:
    """MLX_STREAMS (0 = auto): one on Metal; on a CPU one per core, up to 4.

    mlx[cpu] runs each stream's graph on one thread: independent chunks on separate
    streams use the other cores (measured 467 -> 257 ms for 8 tiny chunks on 2 cores).
    """
    n = cfg.mlx_streams or (1 if mx.metal.is_available() else max(1, min(os.cpu_count() or 1, 4)))
    return [mx.default_stream(mx.default_device())] + [mx.new_stream(mx.default_device()) for _ in range(n - 1)]


def on_streams(streams: list, fn, items: list) -> list:
    """fn(item) for each item, item i built on stream i; lazy until the caller evaluates."""
    outs = []
    for stream, item in zip(streams, items):
        with mx.stream(stream):
            outs.append(fn(item))
    return outs


def _split(a: np.ndarray, cfg: Hyperparameters) -> list[np.ndarray]:
    rows = max(1, cfg.mlx_max_microbatch_tokens // cfg.train_seq_len)
    return [a[s:s + rows] for s in range(0, a.shape[0], rows)]


def _groups(items: list, streams: list) -> list[list]:
    return [items[i:i + len(streams)] for i in range(0, len(items), len(streams))]


def peak_memory_line() -> str:
    if mx.metal.is_available():
        return f"peak memory allocated: {mx.get_peak_memory() // 2**20} MiB"
    return f"peak memory (process max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"


# ---- evaluation ----
def evaluate(model: GPT, cfg: Hyperparameters, data: bpb.EvalData, log=None) -> bpb.BpbAccumulator:
    """Scores each batch in chunks of MLX_MAX_MICROBATCH_TOKENS, a group of streams at a time: bounded memory."""
    nll_fn = mx.compile(model.token_nll) if cfg.mlx_compile else model.token_nll
    streams = make_streams(cfg)

    def score(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        parts = []
        for group in _groups(list(zip(_split(x, cfg), _split(y, cfg))), streams):
            outs = on_streams(streams, lambda c: nll_fn(mx.array(c[0]), mx.array(c[1])), group)
            mx.eval(outs)
            parts += [np.array(o) for o in outs]
        return np.concatenate(parts)

    batch = bpb.windows_per_batch(cfg.val_batch_size, cfg.train_seq_len)
    return bpb.evaluate(score, data.tokens, data.windows, cfg.train_seq_len, data.tables, batch,
                        progress=bpb.progress_logger(log))


def score_artifact(path: str, cfg: Hyperparameters, data: bpb.EvalData, log) -> None:
    """Reload the artifact from disk, evaluate it, print the final lines."""
    state, _ = artifact.load_artifact(path)
    model = build_model(cfg, state, compute_dtype(cfg))
    t0 = time.perf_counter()
    acc = evaluate(model, cfg, data, log)
    eval_ms = 1000.0 * (time.perf_counter() - t0)
    log_final(log, acc, path, str(CUDA_TRAINER), eval_ms)


def run_eval(path: str, env: dict) -> None:
    _, trained_cfg = artifact.load_artifact(path)
    cfg = artifact_config_for_env(trained_cfg, env, f"artifact {path}")
    log = RunLog(f"eval_{Path(path).stem}")
    score_artifact(path, cfg, bpb.load_eval_data(cfg), log)


# ---- training ----
class Trainer:
    def __init__(self, cfg: Hyperparameters, log):
        self.cfg, self.log = cfg, log
        self.dtype = compute_dtype(cfg)
        self.model = build_model(cfg, dtype=self.dtype)
        self.opts = build_optimizers(self.model, cfg, self.dtype)
        # w: the chunk's share of the step mean, applied inside the compiled graph (no extra pass over grads)
        grad_fn = nn.value_and_grad(self.model, lambda x, y, w: self.model(x, y) * w)
        self.loss_and_grad = (mx.compile(grad_fn, inputs=self.model.state, outputs=self.model.state)
                              if cfg.mlx_compile else grad_fn)
        self.loader = self._new_loader()
        self.streams = make_streams(cfg)
        self.step, self.train_ms = 0, 0.0

    def _new_loader(self) -> TokenLoader:
        return TokenLoader(train_pattern(self.cfg.data_path), 0, 1, self.cfg.vocab_size)

    def train_step(self, lr_scale: float) -> float:
        """One optimizer step over the 8 slots, each in chunks; returns the mean train loss.

        Chunks run MLX_STREAMS at a time, one per stream, and are summed in chunk order:
        the same result as one at a time, with memory bounded by MLX_STREAMS chunks.
        """
        cfg, accum = self.cfg, self.loader.grad_accum_steps
        chunks = []  # (x, y, weight): the chunk's share of the step's mean loss
        for _ in range(accum):
            x, y = self.loader.next_micro_batch(cfg.train_batch_tokens, cfg.train_seq_len)
            for xc, yc in zip(_split(x, cfg), _split(y, cfg)):
                chunks.append((xc, yc, xc.shape[0] / x.shape[0] / accum))
        grads, total = None, mx.array(0.0)
        for group in _groups(chunks, self.streams):
            outs = on_streams(self.streams, lambda c: self.loss_and_grad(mx.array(c[0]), mx.array(c[1]),
                                                                         mx.array(c[2], dtype=mx.float32)), group)
            for loss, g in outs:
                grads = g if grads is None else tree_map(mx.add, grads, g)
                total = total + loss
            mx.eval(grads, total)  # a group's graphs at a time: flat memory
        self._apply(dict(tree_flatten(grads)), lr_scale)
        return float(total.item())

    def _apply(self, grads: dict[str, mx.array], lr_scale: float) -> None:
        self.opts["matrix"].momentum = muon_momentum(self.cfg, self.step)
        for opt in self.opts.values():
            opt.lr = opt.base_lr * lr_scale
        if self.cfg.grad_clip_norm > 0:
            grads = clip_grad_norm(grads, self.cfg.grad_clip_norm)
        params = dict(tree_flatten(self.model.parameters()))
        for opt in self.opts.values():
            opt.update(params, grads)
        self.model.update(tree_unflatten(list(params.items())))
        mx.eval(self.model.parameters(), [o.state for o in self.opts.values()])

    def prime(self) -> None:
        """WARMUP_STEPS real steps to warm compile/caches, then restore weights, optimizers and data."""
        if self.cfg.warmup_steps <= 0:
            return
        weights = numpy_state(self.model)
        for i in range(self.cfg.warmup_steps):
            self.train_step(1.0)
            self.log(f"warmup_step:{i + 1}/{self.cfg.warmup_steps}")
        load_numpy_state(self.model, weights)
        self.opts = build_optimizers(self.model, self.cfg, self.dtype)  # fresh state == the saved initial state
        self.loader = self._new_loader()

    # -- checkpoints: the same file and names as cuda_train.py --
    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        tensors = {f"param:{k}": v for k, v in numpy_state(self.model).items()}
        for g, opt in self.opts.items():
            for name in opt.names:
                for slot, value in opt.state.get(name, {}).items():
                    arr = np.array([value], dtype=np.float64) if slot == "step" else np.array(value.astype(mx.float32))
                    tensors[f"opt:{name}:{slot}"] = arr
        return tensors

    def restore(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        load_numpy_state(self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("param:")})
        for opt in self.opts.values():
            for name in opt.names:
                slots = {k.rsplit(":", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt:{name}:")}
                if slots:
                    opt.state[name] = {s: float(v[0]) if s == "step" else mx.array(v) for s, v in slots.items()}
        self.loader.stream.restore(meta["data"])
        self.step, self.train_ms = int(meta["step"]), float(meta["train_ms"])

    def save(self, path: str) -> None:
        tensors = self.checkpoint_tensors()
        bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"non-finite values in {bad[:3]} at step {self.step}; checkpoint not written, "
                                     f"the previous one is kept")
        meta = {"step": self.step, "train_ms": self.train_ms, "data": self.loader.stream.state(), "backend": "mlx"}
        save_checkpoint(path, self.cfg, tensors, meta)
        self.log(f"checkpoint:{path} step:{self.step}")


def main(argv: list[str] | None = None) -> None:
    args = parse_trainer_cli("MLX", argv)
    if args.eval:
        return run_eval(args.eval, dict(os.environ))
    cfg = Hyperparameters.from_env(os.environ)
    log = RunLog(cfg.run_id)
    log.header(__file__, cfg, f"mlx-{mx.__version__} device:{mx.default_device()} dtype:{compute_dtype(cfg)} "
                              f"ops:{select_ops(cfg).__name__} cpu_blas:{CPU_BLAS}")
    data = bpb.load_eval_data(cfg)  # fails fast on a bad tokenizer or a short validation split
    tr = Trainer(cfg, log)
    if args.resume:
        tr.restore(*load_checkpoint(args.resume, cfg))
        log(f"resumed:{args.resume} step:{tr.step}")
    else:
        tr.prime()
    run_training(tr, cfg, log, lambda: evaluate(tr.model, cfg, data))
    log(peak_memory_line())
    path = cfg.resolved_artifact_path()
    artifact.save_artifact(path, numpy_state(tr.model), cfg)
    score_artifact(path, cfg, data, log)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        sys.exit(f"error: {exc}")  # bad input or a diverged run: the message, not a traceback
