"""MLX on a Linux CPU: a fast BLAS under mlx[cpu], and exp-heavy ops built for CPUs.

Import this module before anything else imports mlx (mlx_model.py does): the
BLAS swap only works if it happens before `import mlx.core`. That swap is the
one import-time side effect in the codebase, and it is deliberate.

    ops = select_ops(cfg)     # FusedOps on Metal, ComposedOps on a CPU (MLX_OPS overrides)
"""
from __future__ import annotations

import ctypes
import glob
import math
import os
import sys


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

from shared.config import Hyperparameters  # noqa: E402


# ---- the three exp-heavy ops, two implementations of the same maths ----
class FusedOps:
    """MLX's own kernels: right on Metal, where exp/tanh are fast."""
    per_segment = False  # DOC_ISOLATED_ATTN: one masked kernel call (the mask lives on the device)

    @staticmethod
    def tanh(u: mx.array) -> mx.array:
        return mx.tanh(u)

    @staticmethod
    def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
        return nn.losses.cross_entropy(logits, targets, reduction="none")

    @staticmethod
    def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
        """mask: None = causal; (B, 1, T, T) bool = DOC_ISOLATED_ATTN's block-causal mask (True attends)."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale,
                                                    mask="causal" if mask is None else mask)  # GQA: k, v untiled


# mlx[cpu]'s exp and tanh are scalar loops (~15 ns/element, measured: 15 ms for 1M floats, numpy 1.8 ms),
# and the logits' softcap + cross-entropy and attention's softmax are most of a CPU step. ComposedOps
# builds them from one exp made of vectorised arithmetic: Cody-Waite reduction x = n ln2 + r,
# |r| <= ln2/2, a degree-7 Taylor polynomial for e^r (truncation < 1e-8) and 2^n from the exponent bits.
LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06
EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(8))
# Below EXP_MIN the result is exactly 0 (e^-87.3 is near the smallest normal float32, 1.2e-38). Above EXP_MAX it
# saturates at e^88.3 ~ 2.2e38, finite: 2^n comes from the exponent bits, so n = round(x/ln2) must stay <= 127,
# i.e. x < 127.5 ln2 = 88.376 (88.3 leaves margin for the rounding of x/ln2). At 88.7, as before, n reached 128,
# 2^n was inf, and backward passes through the result (softcap tanh, vjp's cotangent * output) made 0 * inf = NaN.
EXP_MIN, EXP_MAX = -87.3, 88.3


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


def composed_tanh(u: mx.array) -> mx.array:
    """1 - 2/(e^2u + 1), differentiated by MLX through composed_exp. With e^x saturating finite (EXP_MAX),
    large |u| gives gradient 0 (as torch's 1 - tanh^2 does), never 0 * inf = NaN."""
    return 1.0 - 2.0 / (composed_exp(2.0 * u) + 1.0)


class ComposedOps:
    """The same maths from composed_exp: for CPUs (mlx[cpu]); agrees with FusedOps to ~1e-6."""
    # DOC_ISOLATED_ATTN: one causal call per segment, not a (T, T) mask. The segments' shapes come from the
    # data, so the step is not mx.compile'd. Measured on a 2-core CPU (bench/doc_isolation.py --what model,
    # PRESET=tiny dims, documents of mean 700 tokens), fwd+bwd of 4096 tokens: T=2048 1.28 s vs 3.17 s with
    # the mask (dense causal 5.53 s), peak 0.29 vs 1.26 GB; T=1024 a tie; T=512 0.98 s vs 0.67 s. So rows
    # shorter than per_segment_min_seq keep the mask (and mx.compile): see uses_per_segment.
    per_segment = True
    per_segment_min_seq = 1024

    @staticmethod
    def tanh(u: mx.array) -> mx.array:
        return composed_tanh(u)

    @staticmethod
    def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
        m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
        lse = mx.log(mx.sum(composed_exp(logits - m), axis=-1)) + m[..., 0]
        return lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]

    @staticmethod
    def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, doc=None) -> mx.array:
        """doc: None = causal; DOC_ISOLATED_ATTN as a (B, 1, T, T) bool block-causal mask (True attends) or as
        per-row (start, end) segment ranges (mlx_model.segment_ranges): one causal call per segment."""
        if doc is None:
            return composed_attention(q * scale, k, v)
        if isinstance(doc, mx.array):
            return composed_masked_attention(q * scale, k, v, doc)
        return segmented_attention(composed_attention, q * scale, k, v, doc)


def uses_per_segment(ops, seq_len: int) -> bool:
    """DOC_ISOLATED_ATTN with rows of seq_len: per-segment calls (uncompiled) or one masked call (compiled)."""
    return ops.per_segment and seq_len >= getattr(ops, "per_segment_min_seq", 0)


def segmented_attention(attention, q: mx.array, k: mx.array, v: mx.array, ranges) -> mx.array:
    """attention(q, k, v) (causal) on each segment [start, end) of each row, put back in place: (B, H, T, D).
    Cut with split, not slices: split's vjp concatenates the pieces' gradients, a slice's pads each to full size."""
    def pieces(t: mx.array) -> list[list[mx.array]]:  # [row][segment] -> (1, H, L, D)
        return [mx.split(tr, [a for a, _ in row[1:]], axis=2) for tr, row in zip(mx.split(t, len(ranges)), ranges)]
    rows = [[attention(*qkv) for qkv in zip(*seg)] for seg in zip(pieces(q), pieces(k), pieces(v))]
    return mx.concatenate([mx.concatenate(row, axis=2) for row in rows], axis=0)


def _causal_probs(q5: mx.array, k: mx.array, mask: mx.array | None = None) -> mx.array:
    """softmax(q k^T + causal mask) for q5 (B, Hkv, G, T, D), k (B, Hkv, T, D) -> (B, Hkv, G, T, T);
    a (B, 1, T, T) bool mask replaces the causal one (-inf where False; the diagonal is always True)."""
    t = q5.shape[-2]
    s = q5 @ k[:, :, None].swapaxes(-1, -2)
    if mask is None:
        s = s + mx.triu(mx.full((t, t), -mx.inf, dtype=s.dtype), k=1)
    else:
        s = mx.where(mask[:, :, None], s, -mx.inf)  # (B, 1, 1, T, T): every KV head and query group
    p = _exp_poly(s - mx.max(s, axis=-1, keepdims=True))
    return p / mx.sum(p, axis=-1, keepdims=True)


def _attend(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
    b, h, t, d = q.shape
    hkv = k.shape[1]
    p = _causal_probs(q.reshape(b, hkv, h // hkv, t, d), k, mask)
    return (p @ v[:, :, None]).reshape(b, h, t, d)


@mx.custom_function
def composed_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Causal GQA attention of pre-scaled q; each KV head serves G = H/Hkv query heads."""
    return _attend(q, k, v, None)


@composed_attention.vjp
def _composed_attention_vjp(primals, cotangent, output):
    """Recomputes the (T, T) probabilities instead of keeping them for backward (flash-attention's trade):
    no (T, T) tensor is kept per layer (measured at the baseline shape on a 2-core CPU, 8192-token chunks on
    2 streams: peak RSS 15.2 GB -> 11.3 GB)."""
    return _attention_grads(primals, cotangent, output, None)


@mx.custom_function
def composed_masked_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> mx.array:
    """composed_attention under a (B, 1, T, T) bool mask (DOC_ISOLATED_ATTN)."""
    return _attend(q, k, v, mask)


@composed_masked_attention.vjp
def _composed_masked_attention_vjp(primals, cotangent, output):
    """The same recomputation, under the same mask as the forward; the mask gets no gradient."""
    q, k, v, mask = primals
    return _attention_grads((q, k, v), cotangent, output, mask) + (mx.zeros_like(mask),)


def _attention_grads(primals, cotangent, output, mask: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
    q, k, v = primals
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q5 = q.reshape(b, hkv, h // hkv, t, d)
    do = cotangent.reshape(q5.shape)
    p = _causal_probs(q5, k, mask)
    dv = mx.sum(p.swapaxes(-1, -2) @ do, axis=2)  # (B, Hkv, T, D), summed over the G query heads
    dp = do @ v[:, :, None].swapaxes(-1, -2)
    ds = p * (dp - mx.sum(do * output.reshape(q5.shape), axis=-1, keepdims=True))  # softmax backward
    dq = (ds @ k[:, :, None]).reshape(b, h, t, d)
    dk = mx.sum(ds.swapaxes(-1, -2) @ q5, axis=2)
    return dq, dk, dv


def select_ops(cfg: Hyperparameters):
    """MLX_OPS: fused (MLX kernels), composed (CPU-friendly) or auto (fused on Metal, composed on CPU)."""
    if cfg.mlx_ops == "auto":
        return FusedOps if mx.metal.is_available() else ComposedOps
    return FusedOps if cfg.mlx_ops == "fused" else ComposedOps

