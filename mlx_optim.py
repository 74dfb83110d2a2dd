"""Optimizers in MLX: torch.optim.Adam's and torch_optim.Muon's maths, written out (mirrors torch_optim.py).

    opts = Optimizers(model, cfg, ns_dtype)
    opts.step(grads, lr_scale, momentum)
    opts.slots() / opts.load_slots(slots)     # framework-neutral optimizer state (shared/checkpoint.py)
"""
from __future__ import annotations

import math

import mlx_cpu_ops  # noqa: F401  (first: the CPU BLAS swap must precede mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from shared.config import Hyperparameters  # noqa: E402
from shared.spec import (NS_EPS, ROW_NORM_EPS, AdamSpec, MuonSpec, groups_of, ns_coefficients,  # noqa: E402
                         optimizer_spec, same_shape_buckets)


def zeropower_via_newtonschulz5(g: mx.array, steps: int, dtype: mx.Dtype, ns: str = "quintic") -> mx.array:
    """Approximately orthogonalise g (Muon) in `dtype`: Frobenius-normalise, then per iteration (a, b, c) of MUON_NS
    (shared/spec.py), A = XX^T, X <- aX + (bA + cA^2)X, on the wide orientation (RECORD_STACK.md §5.3).

    g is one matrix (rows, cols) or a stack (N, rows, cols) of same-shape matrices, each orthogonalised on its own
    (batched: equal to N single calls within 1e-6 on CPU, tested)."""
    x = g.astype(dtype)
    norm = mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)), axis=(-2, -1), keepdims=True))  # Frobenius, fp32
    x = x / (norm.astype(dtype) + NS_EPS)
    transposed = g.shape[-2] > g.shape[-1]
    if transposed:
        x = x.swapaxes(-2, -1)
    for a, b, c in ns_coefficients(ns, steps):
        A = x @ x.swapaxes(-2, -1)
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.swapaxes(-2, -1) if transposed else x


def row_normalize(g: mx.array) -> mx.array:
    """MuonEq-R (RECORD_STACK.md §5.3): each row over max(||row||_2, 1e-7), in fp32 (the result stays fp32)."""
    x = g.astype(mx.float32)
    return x / mx.maximum(mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True)), ROW_NORM_EPS)


class Muon:
    """Nesterov momentum, orthogonalised update scaled by sqrt(max(1, rows/cols)); W <- W*(1 - lr*wd) - lr*update.

    Same-shape matrices are stacked and orthogonalised in one batched call (torch_optim.Muon's buckets, one
    process). Dtypes as torch_optim.Muon: momentum fp32, the iteration in ns_dtype, applied to the fp32 weights."""

    def __init__(self, names: list[str], spec: MuonSpec, ns_dtype: mx.Dtype):
        self.names, self.base_lr, self.lr, self.wd = names, spec.lr, spec.lr, spec.weight_decay
        self.ns, self.row_normalize = spec.ns, spec.row_normalize
        self.momentum, self.backend_steps, self.ns_dtype = spec.momentum, spec.backend_steps, ns_dtype
        self.state: dict[str, dict[str, mx.array]] = {}

    def update(self, params: dict[str, mx.array], grads: dict[str, mx.array]) -> None:
        for bucket in same_shape_buckets(self.names, lambda n: params[n].shape):
            grad = mx.stack([grads[n] for n in bucket])  # (N, rows, cols)
            buf = mx.stack([self.state_of(n, params[n])["momentum"] for n in bucket])
            buf = buf * self.momentum + grad
            g = grad + self.momentum * buf  # Nesterov
            if self.row_normalize:
                g = row_normalize(g)
            g = zeropower_via_newtonschulz5(g, self.backend_steps, self.ns_dtype, self.ns)
            g = g * max(1.0, g.shape[-2] / g.shape[-1]) ** 0.5
            for i, n in enumerate(bucket):
                self.state[n] = {"momentum": buf[i]}
                params[n] = decay(params[n], self.lr, self.wd) - self.lr * g[i].astype(params[n].dtype)

    def state_of(self, n: str, p: mx.array) -> dict[str, mx.array]:
        return self.state.get(n) or {"momentum": mx.zeros_like(p)}




class Adam:
    """torch.optim.Adam's update: m.lerp(g, 1-b1); v = b2 v + (1-b2) g^2; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
    after AdamW's decoupled decay p *= 1 - lr*wd."""

    def __init__(self, names: list[str], spec: AdamSpec):
        self.names, self.base_lr, self.lr, self.wd = names, spec.lr, spec.lr, spec.weight_decay
        self.beta1, self.beta2, self.eps = spec.beta1, spec.beta2, spec.eps
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
            params[n] = decay(params[n], self.lr, self.wd) - (self.lr / bc1) * (st["m"] / denom)

    def state_of(self, n: str, p: mx.array) -> dict:
        return self.state.get(n) or {"m": mx.zeros_like(p), "v": mx.zeros_like(p), "step": 0.0}


class Optimizers:
    """Muon for the 'matrix' group, Adam for the others (groups from shared/spec.py), one step at a time."""

    def __init__(self, model: nn.Module, cfg: Hyperparameters, ns_dtype: mx.Dtype):
        self.cfg, self.model = cfg, model
        self.opts: dict[str, Muon | Adam] = {}
        for g, names in groups_of([n for n, _ in tree_flatten(model.parameters())], cfg).items():
            spec = optimizer_spec(g, cfg)
            self.opts[g] = Muon(names, spec, ns_dtype) if isinstance(spec, MuonSpec) else Adam(names, spec)

    def step(self, grads: dict[str, mx.array], lr_scale: float, momentum: float) -> None:
        """Clip the global gradient norm (GRAD_CLIP_NORM), then every group at base_lr * lr_scale."""
        for opt in self.opts.values():
            opt.lr = opt.base_lr * lr_scale
            if isinstance(opt, Muon):
                opt.momentum = momentum
        if self.cfg.grad_clip_norm > 0:
            grads = clip_grad_norm(grads, self.cfg.grad_clip_norm)
        params = dict(tree_flatten(self.model.parameters()))
        for opt in self.opts.values():
            opt.update(params, grads)
        self.model.update(tree_unflatten(list(params.items())))
        mx.eval(self.model.parameters(), [o.state for o in self.opts.values()])

    def slots(self) -> dict[str, dict[str, np.ndarray]]:
        """Every slot of every parameter as fp32/float64 numpy; zeros (step 0) before the first step."""
        params = dict(tree_flatten(self.model.parameters()))
        out = {}
        for opt in self.opts.values():
            for n in opt.names:
                out[n] = {slot: _to_numpy(slot, v) for slot, v in opt.state_of(n, params[n]).items()}
        return out

    def load_slots(self, slots: dict[str, dict[str, np.ndarray]]) -> None:
        for opt in self.opts.values():
            for n in opt.names:
                opt.state[n] = {s: float(v[0]) if s == "step" else mx.array(v) for s, v in slots[n].items()}


def decay(p: mx.array, lr: float, wd: float) -> mx.array:
    """Decoupled weight decay p*(1 - lr*wd), lr the scheduled one (RECORD_STACK.md §5.3, §5.4); p as is at wd=0."""
    return p * (1.0 - lr * wd) if wd > 0 else p


def _to_numpy(slot: str, value) -> np.ndarray:
    return np.array([value], dtype=np.float64) if slot == "step" else np.array(value.astype(mx.float32))


def clip_grad_norm(grads: dict[str, mx.array], max_norm: float) -> dict[str, mx.array]:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm/(total+1e-6) when that is < 1."""
    total = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for g in grads.values()))
    coef = mx.minimum(max_norm / (total + 1e-6), 1.0)
    return {k: g * coef.astype(g.dtype) for k, g in grads.items()}

