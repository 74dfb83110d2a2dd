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
from shared.spec import GROUP_OPTIMIZER, NS_EPS, ROW_NORM_EPS, group_lr, group_wd, groups_of, ns_coefficients
from torch_model import to_numpy


def zeropower_via_newtonschulz5(g: Tensor, steps: int, dtype: torch.dtype, ns: str = "quintic") -> Tensor:
    """Approximately orthogonalise g (Muon) in `dtype`: Frobenius-normalise, then per iteration (a, b, c) of MUON_NS
    (shared/spec.py), A = XX^T, X <- aX + (bA + cA^2)X, on the wide orientation (RECORD_STACK.md §5.3)."""
    x = g.to(dtype)
    x = x / (x.norm() + NS_EPS)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for a, b, c in ns_coefficients(ns, steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if transposed else x


def row_normalize(g: Tensor) -> Tensor:
    """MuonEq-R (RECORD_STACK.md §5.3): each row over max(||row||_2, 1e-7), in fp32 (the result stays fp32)."""
    x = g.float()
    return x / torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True).clamp_min(ROW_NORM_EPS)


def _world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised update scaled by sqrt(max(1, rows/cols)).

    Ranks split the matrices round-robin and all-reduce the flat update (official scheme). Decoupled weight decay
    W <- W*(1 - lr*weight_decay) - lr*update (RECORD_STACK.md §5.3) is applied by every rank to every matrix.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, ns_dtype: torch.dtype,
                 compile_ns: bool = False, weight_decay: float = 0.0, ns: str = "quintic",
                 row_normalize: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay))
        self.ns_dtype, self.ns, self.row_normalize = ns_dtype, ns, row_normalize
        self.index = {id(p): i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        self.orthogonalize = torch.compile(zeropower_via_newtonschulz5) if compile_ns else zeropower_via_newtonschulz5

    @torch.no_grad()
    def step(self):
        world = _world_rank()[0]
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for p in params:
                if self.owns(p) and p.grad is not None:
                    flat[offset:offset + p.numel()] = self._update(p, group).reshape(-1)
                offset += p.numel()
            if world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            if group["weight_decay"] > 0:  # skipped at 0: the default step stays bit-identical
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            for p in params:
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()

    def owns(self, p: Tensor) -> bool:
        """Round-robin ownership: this rank keeps p's momentum and computes its update."""
        world, rank = _world_rank()
        return self.index[id(p)] % world == rank

    def _update(self, p: Tensor, group: dict) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
        if self.row_normalize:
            g = row_normalize(g)
        g = self.orthogonalize(g, group["backend_steps"], self.ns_dtype, self.ns)
        return g * max(1.0, g.size(0) / g.size(1)) ** 0.5


class Optimizers:
    """Muon for the 'matrix' group, Adam for the others (groups from shared/spec.py), one step at a time."""

    def __init__(self, model: nn.Module, cfg: Hyperparameters, ns_dtype: torch.dtype):
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        fused = next(model.parameters()).is_cuda  # fused Adam and compiled Newton-Schulz on CUDA only
        self.opts: dict[str, torch.optim.Optimizer] = {}
        for g, names in groups_of(list(self.params), cfg).items():
            params, lr = [self.params[n] for n in names], group_lr(g, cfg)
            if GROUP_OPTIMIZER[g] == "muon":
                self.opts[g] = Muon(params, lr, cfg.muon_momentum, cfg.muon_backend_steps, ns_dtype,
                                    fused and cfg.torch_compile, group_wd(g, cfg), cfg.muon_ns,
                                    cfg.muon_row_normalize)
            else:
                self.opts[g] = torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                                fused=fused)
            for group in self.opts[g].param_groups:
                group["base_lr"], group["decoupled_wd"] = lr, group_wd(g, cfg)

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
        if self.cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip_norm)
        for opt in self.opts.values():
            if not isinstance(opt, Muon):
                _decay_adam_groups(opt)
            opt.step()

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
                    opt.state[p] = {"momentum_buffer": _like(s["momentum"], p)} if opt.owns(p) else {}
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
    buf = opt.state.get(p, {}).get("momentum_buffer") if opt.owns(p) else None
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
