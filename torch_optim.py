"""Optimizers in PyTorch: Muon for matrices, Adam for the rest (mirrors mlx_optim.py).

    opts = Optimizers(model, cfg, ns_dtype)
    opts.zero_grad(); loss.backward(); opts.step(lr_scale, momentum)
    opts.slots() / opts.load_slots(slots)     # framework-neutral optimizer state (shared/checkpoint.py)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from shared.config import Hyperparameters
from shared.spec import (NS_EPS, ROW_NORM_EPS, MuonSpec, groups_of, ns_coefficients, optimizer_spec,
                         same_shape_buckets)
from torch_model import to_numpy


def zeropower_via_newtonschulz5(g: Tensor, steps: int, dtype: torch.dtype, ns: str = "quintic") -> Tensor:
    """Approximately orthogonalise g (Muon) in `dtype`: Frobenius-normalise, then per iteration (a, b, c) of MUON_NS
    (shared/spec.py), A = XX^T, X <- aX + (bA + cA^2)X, on the wide orientation (RECORD_STACK.md §5.3).

    g is one matrix (rows, cols) or a stack (N, rows, cols) of same-shape matrices, each orthogonalised on its own:
    the batched call is one kernel per product instead of N (equal to N single calls within 1e-6 on CPU, tested)."""
    x = g.to(dtype)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + NS_EPS)
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    for a, b, c in ns_coefficients(ns, steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.mT if transposed else x


def row_normalize(g: Tensor) -> Tensor:
    """MuonEq-R (RECORD_STACK.md §5.3): each row over max(||row||_2, 1e-7), in fp32 (the result stays fp32)."""
    x = g.float()
    return x / torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS)


def muon_direction(grad: Tensor, buf: Tensor, momentum: Tensor, steps: int, dtype: torch.dtype, ns: str,
                   row_norm: bool) -> Tensor:
    """One bucket's update direction: momentum buf <- mu*buf + g (in place), Nesterov g + mu*buf, MuonEq-R rows
    (optional), orthogonalised, scaled by sqrt(max(1, rows/cols)). momentum is a 0-d tensor so that one compiled
    graph serves the whole momentum warm-up (a float would be a constant: a recompile per value)."""
    buf.mul_(momentum).add_(grad)
    g = grad + momentum * buf  # Nesterov
    if row_norm:
        g = row_normalize(g)
    g = zeropower_via_newtonschulz5(g, steps, dtype, ns)
    return g * max(1.0, g.size(-2) / g.size(-1)) ** 0.5


def _world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised update scaled by sqrt(max(1, rows/cols)); decoupled weight decay
    W <- W*(1 - lr*weight_decay) - lr*update (RECORD_STACK.md §5.3) on every matrix.

    Parallel Muon (the record's scheme, §5.3): same-shape matrices form a bucket, padded with zero matrices to a
    multiple of the world size W; rank r owns the r-th contiguous share. Gradients arrive as that share of the mean
    (collect_grads: one reduce-scatter per bucket), the owner keeps the momentum and orthogonalises its share in one
    batched call, and an all-gather gives every rank every update. Dtypes: momentum buffer fp32 (the gradient's),
    the iteration and the gathered update in ns_dtype (bf16 on CUDA, fp32 on CPU and in the parity tests),
    applied to the fp32 weights.
    """

    def __init__(self, params, spec: MuonSpec, ns_dtype: torch.dtype, compile_ns: bool = False):
        super().__init__(params, dict(lr=spec.lr, momentum=spec.momentum, backend_steps=spec.backend_steps,
                                      weight_decay=spec.weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("Muon takes one parameter group (the 'matrix' group of shared/spec.py)")
        self.ns_dtype, self.ns, self.row_normalize = ns_dtype, spec.ns, spec.row_normalize
        self.buckets = same_shape_buckets(self.param_groups[0]["params"], lambda p: p.shape)
        self.where = {id(p): (k, i) for k, b in enumerate(self.buckets) for i, p in enumerate(b)}
        self.shard_grads: list[Tensor | None] = [None] * len(self.buckets)
        self.buffers: list[Tensor | None] = [None] * len(self.buckets)  # momentum of this rank's share per bucket
        # on CUDA the whole direction (momentum, Nesterov, row norms, Newton-Schulz) is one compiled graph per shape
        self.direction = torch.compile(muon_direction, dynamic=False) if compile_ns else muon_direction

    def share(self, k: int) -> tuple[int, int]:
        """[start, stop) of bucket k's (padded) positions this rank owns."""
        world, rank = _world_rank()
        per = -(-len(self.buckets[k]) // world)
        return rank * per, (rank + 1) * per

    def owns(self, p: Tensor) -> bool:
        """This rank keeps p's momentum and computes its update."""
        k, i = self.where[id(p)]
        start, stop = self.share(k)
        return start <= i < stop

    @torch.no_grad()
    def collect_grads(self) -> None:
        """This rank's share of each bucket's gradient, averaged over ranks (reduce-scatter, SUM then / W).
        Collective; call once per step after the last backward. A missing gradient counts as zero."""
        world = _world_rank()[0]
        for k, bucket in enumerate(self.buckets):
            start, stop = self.share(k)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in bucket]
            grads += [torch.zeros_like(bucket[0])] * (world * (stop - start) - len(bucket))
            stacked = torch.stack(grads)  # (N_pad, rows, cols)
            if world == 1:
                self.shard_grads[k] = stacked
                continue
            out = torch.empty_like(stacked[start:stop])
            dist.reduce_scatter_tensor(out, stacked, op=dist.ReduceOp.SUM)
            self.shard_grads[k] = out.div_(world)

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        world = _world_rank()[0]
        for k, bucket in enumerate(self.buckets):
            update = self._update(k, self.shard_grads[k], group)  # (share, rows, cols) in ns_dtype
            if world > 1:
                full = torch.empty((world * update.size(0), *update.shape[1:]), device=update.device,
                                   dtype=update.dtype)
                dist.all_gather_into_tensor(full, update)
                update = full
            if group["weight_decay"] > 0:  # skipped at 0: the default step stays bit-identical
                torch._foreach_mul_(bucket, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(bucket, list(update[:len(bucket)].to(bucket[0].dtype).unbind(0)), alpha=-group["lr"])
            self.shard_grads[k] = None

    def momentum_of(self, p: Tensor) -> Tensor | None:
        """p's slice of its bucket's momentum (a view) on the owner once it exists, else None."""
        k, i = self.where[id(p)]
        start = self.share(k)[0]
        return self.buffers[k][i - start] if self.owns(p) and self.buffers[k] is not None else None

    def load_momentum(self, p: Tensor, value: np.ndarray) -> None:
        """Set p's momentum (only the owner keeps it; slots() sums owners only)."""
        if self.owns(p):
            k, i = self.where[id(p)]
            start, stop = self.share(k)
            self.momentum_buffer(k, torch.empty((stop - start, *p.shape), device=p.device))[i - start].copy_(
                torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

    def momentum_buffer(self, k: int, like: Tensor) -> Tensor:
        """Bucket k's fp32 momentum for this rank's share (N_share, rows, cols), zeros until the first step."""
        if self.buffers[k] is None:
            self.buffers[k] = torch.zeros_like(like, dtype=torch.float32)
        return self.buffers[k]

    def _update(self, k: int, grad: Tensor, group: dict) -> Tensor:
        momentum = torch.full((), group["momentum"], dtype=torch.float32, device=grad.device)  # a fill, no copy
        return self.direction(grad, self.momentum_buffer(k, grad), momentum, group["backend_steps"], self.ns_dtype,
                              self.ns, self.row_normalize)


class Optimizers:
    """Muon for the 'matrix' group, Adam for the others (groups from shared/spec.py), one step at a time."""

    def __init__(self, model: nn.Module, cfg: Hyperparameters, ns_dtype: torch.dtype):
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        fused = next(model.parameters()).is_cuda  # fused Adam and compiled Newton-Schulz on CUDA only
        self.opts: dict[str, torch.optim.Optimizer] = {}
        for g, names in groups_of(list(self.params), cfg).items():
            params, spec = [self.params[n] for n in names], optimizer_spec(g, cfg)
            if isinstance(spec, MuonSpec):
                self.opts[g] = Muon(params, spec, ns_dtype, fused and cfg.torch_compile)
            else:
                self.opts[g] = torch.optim.Adam(params, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                                                fused=fused)
            for group in self.opts[g].param_groups:
                group["base_lr"], group["decoupled_wd"] = spec.lr, spec.weight_decay

    def zero_grad(self) -> None:
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)

    def step(self, lr_scale: float, momentum: float) -> None:
        """Clip the global gradient norm (GRAD_CLIP_NORM), then every group at base_lr * lr_scale, decay included."""
        for opt in self.opts.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
                if isinstance(opt, Muon):
                    group["momentum"] = momentum
        self._average_grads()
        if self.cfg.grad_clip_norm > 0:
            self._clip(self.cfg.grad_clip_norm)
        for opt in self.opts.values():
            if not isinstance(opt, Muon):
                _decay_adam_groups(opt)
            opt.step()

    @torch.no_grad()
    def _average_grads(self) -> None:
        """The mean gradient over ranks (collective): Adam's parameters all-reduced in one flat buffer, Muon's
        reduce-scattered into each owner's share (Muon.collect_grads). One process: nothing moves."""
        world = _world_rank()[0]
        dense = [p for opt in self.opts.values() if not isinstance(opt, Muon)
                 for group in opt.param_groups for p in group["params"]]
        if world > 1 and dense:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in dense]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            offset = 0
            for p in dense:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        for opt in self.opts.values():
            if isinstance(opt, Muon):
                opt.collect_grads()

    @torch.no_grad()
    def _clip(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ over the GLOBAL mean gradient, for any world size and split: the norm is
        sqrt(sum of the per-tensor squared norms), each Muon share counted by its owner (one scalar all-reduce);
        scale max_norm / (norm + 1e-6) when that is < 1."""
        dense = [p.grad for opt in self.opts.values() if not isinstance(opt, Muon)
                 for group in opt.param_groups for p in group["params"] if p.grad is not None]
        shares = [g for opt in self.opts.values() if isinstance(opt, Muon) for g in opt.shard_grads]
        norms = torch._foreach_norm(dense + shares)
        zero = torch.zeros((), device=next(iter(self.params.values())).device)
        sq_dense = torch.stack(norms[:len(dense)]).square().sum() if dense else zero
        sq_shares = torch.stack(norms[len(dense):]).square().sum() if shares else zero.clone()
        if _world_rank()[0] > 1:
            dist.all_reduce(sq_shares, op=dist.ReduceOp.SUM)
        coef = torch.clamp(max_norm / (torch.sqrt(sq_dense + sq_shares) + 1e-6), max=1.0)
        torch._foreach_mul_(dense + shares, coef)

    def slots(self) -> dict[str, dict[str, np.ndarray]]:
        """Every slot of every parameter as fp32/float64 numpy; zeros (step 0) before the first step. Collective."""
        out = {}
        for g, opt in self.opts.items():
            for p in (q for group in opt.param_groups for q in group["params"]):
                out[self._name(p)] = _muon_slots(opt, p) if isinstance(opt, Muon) else _adam_slots(opt, p)
        return out

    def load_slots(self, slots: dict[str, dict[str, np.ndarray]]) -> None:
        for g, opt in self.opts.items():
            for p in (q for group in opt.param_groups for q in group["params"]):
                s = slots[self._name(p)]
                if isinstance(opt, Muon):  # only the owner keeps a buffer (and slots() sums owners only)
                    opt.load_momentum(p, s["momentum"])
                else:
                    opt.state[p] = _adam_state(opt, p, s)

    def _name(self, p: Tensor) -> str:
        return next(n for n, q in self.params.items() if q is p)


@torch.no_grad()
def _decay_adam_groups(opt: torch.optim.Optimizer) -> None:
    """torch.optim.AdamW's decoupled decay, written out: p *= 1 - lr*wd before the Adam step, on the parameters the
    step will move (those with a gradient). Explicit rather than AdamW, so that WD=0 runs today's Adam kernel
    unchanged and the order matches mlx_optim.Adam exactly."""
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if group["decoupled_wd"] > 0 and params:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["decoupled_wd"])


def _muon_slots(opt: Muon, p: Tensor) -> dict[str, np.ndarray]:
    """The owner's buffer, gathered by a sum to which every other rank adds zeros. Collective."""
    buf = opt.momentum_of(p)
    buf = torch.zeros_like(p) if buf is None else buf.clone()
    if _world_rank()[0] > 1:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return {"momentum": to_numpy(buf)}


def _adam_slots(opt: torch.optim.Optimizer, p: Tensor) -> dict[str, np.ndarray]:
    state = opt.state.get(p, {})
    if not state:  # never stepped (or no gradient yet): Adam's initial state
        zeros = np.zeros(tuple(p.shape), dtype=np.float32)
        return {"m": zeros, "v": zeros.copy(), "step": np.zeros(1, dtype=np.float64)}
    return {"m": to_numpy(state["exp_avg"]), "v": to_numpy(state["exp_avg_sq"]),
            "step": np.array([float(state["step"])], dtype=np.float64)}


def _adam_state(opt: torch.optim.Optimizer, p: Tensor, s: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """torch's Adam keeps `step` on the CPU, except fused/capturable Adam, which needs it on the parameter's device."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    on_device = group.get("fused") or group.get("capturable")
    return {"step": torch.tensor(float(s["step"][0]), dtype=torch.float32, device=p.device if on_device else "cpu"),
            "exp_avg": _like(s["m"], p), "exp_avg_sq": _like(s["v"], p)}


def _like(a: np.ndarray, p: Tensor) -> Tensor:
    """A fresh tensor (a copy: optimizers update state in place, the array may be read-only or reused)."""
    return torch.tensor(a, dtype=p.dtype, device=p.device)
