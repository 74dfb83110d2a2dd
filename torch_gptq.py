"""GPTQ's column solve in PyTorch on the trainer's device (GPTQ_SOLVER=torch): shared/quant/gptq.py's
gptq_quantize, step for step, for speed (the record's 67 matrices take minutes in numpy on a CPU).

The numpy solver stays the reference; what both must agree on is the artifact, and this solver only replaces
the integers' computation: the SDClip scales (fp16) come from shared/quant/gptq.py, and the result is the same
int8 matrices. Same algorithm as the reference: dead columns (diag H == 0) get H[d, d] = 1 and W[:, d] = 0,
damping 0.01 * mean(diag H) * I, act-order by decreasing diag H with ties to the lower index (a stable sort),
U the upper Cholesky factor of H^-1 (GPTQ's reference code: cholesky, cholesky_inverse, cholesky upper), blocks
of 128 columns with the lazy update, round half to even (torch.round, as numpy's rint), all in float64.
Matrices of one shape and bit width are solved together as a batch (one kernel launch per step for all of them).
The integers equal numpy's except where a value lands within rounding noise of a half step (the two LAPACKs
differ in the last bits of U); tests/test_torch_gptq.py measures that.

    shared.quant.gptq.quantize(state, stores, cfg, hessians, solver=TorchSolver(torch.device("cuda")))
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from shared.quant import gptq

Job = tuple[np.ndarray, "np.ndarray | None", np.ndarray, int]  # (W, H or None, fp16 row scales, bits)


def prepare_hessian(h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """gptq.prepare_hessian on a batch: h (B, cols, cols), w (B, rows, cols), float64 copies; dead columns, damping."""
    h, w = h.clone(), w.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: writing it writes h
    dead = diag == 0
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += gptq.DAMP * diag.mean(dim=-1, keepdim=True)
    return h, w


def act_order(h: Tensor) -> Tensor:
    """gptq.act_order: columns by decreasing diag H, stable (ties keep the lower index first); (B, cols)."""
    return torch.argsort(-h.diagonal(dim1=-2, dim2=-1), dim=-1, stable=True)


def upper_cholesky_of_inverse(h: Tensor) -> Tensor:
    """U upper-triangular with H^-1 = U^T U, per batch element."""
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


def solve_batch(w: Tensor, h: Tensor, s: Tensor, bits: int, block: int = gptq.BLOCK) -> Tensor:
    """int8 Q (B, rows, cols) of W (B, rows, cols), H (B, cols, cols), scales s (B, rows), all float64."""
    r = gptq.levels(bits)
    h, w = prepare_hessian(h, w)
    perm = act_order(h)
    wt = torch.gather(w, 2, perm[:, None, :].expand_as(w)).transpose(1, 2).contiguous()  # (B, cols, rows)
    hp = torch.gather(h, 1, perm[:, :, None].expand_as(h))
    u = upper_cholesky_of_inverse(torch.gather(hp, 2, perm[:, None, :].expand_as(h)))
    qt = torch.empty_like(wt)
    cols = wt.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = torch.empty_like(wt[:, i1:i2])  # (B, block, rows)
        for j in range(i1, i2):
            qt[:, j] = torch.clamp(torch.round(wt[:, j] / s), -r, r)
            err[:, j - i1] = (wt[:, j] - qt[:, j] * s) / u[:, j, j, None]
            wt[:, j + 1:i2] -= u[:, j, j + 1:i2, None] * err[:, j - i1, None, :]
        wt[:, i2:] -= u[:, i1:i2, i2:].transpose(1, 2) @ err  # the lazy update of every later block
    return undo_act_order(qt, perm).transpose(1, 2).to(torch.int8)


def undo_act_order(qt: Tensor, perm: Tensor) -> Tensor:
    """Rows of qt (B, cols, rows) back in the input's column order: row perm[c] of the result is row c of qt."""
    return torch.empty_like(qt).scatter_(1, perm[:, :, None].expand_as(qt), qt)


def solve(jobs: list[Job], device: torch.device, block: int = gptq.BLOCK) -> list[np.ndarray]:
    """gptq.numpy_solver's contract on `device`: jobs grouped by (shape, bits) and solved as batches; a job
    without a Hessian is round-to-nearest, left to the numpy reference (no solve to speed up)."""
    out: list[np.ndarray | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, (w, h, _, bits) in enumerate(jobs):
        if h is None:
            out[i] = gptq.gptq_quantize(w, None, jobs[i][2], bits)
        else:
            groups.setdefault((w.shape, bits), []).append(i)
    for (_, bits), idx in groups.items():
        w, h, s = (_stack([jobs[i][k] for i in idx], device) for k in range(3))
        q = solve_batch(w, h, s, bits, block).cpu().numpy()
        for n, i in enumerate(idx):
            out[i] = q[n]
    return out


def _stack(arrays: list[np.ndarray], device: torch.device) -> Tensor:
    """One float64 tensor (B, ...) on the device (scales: the fp16 values, exactly)."""
    return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float64) for a in arrays])).to(device)


class TorchSolver:
    """The `solver` argument of shared.quant.gptq.quantize on one device; `name` goes to the export line."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.name = f"torch-{self.device}"

    def __call__(self, jobs: list[Job]) -> list[np.ndarray]:
        return solve(jobs, self.device)
