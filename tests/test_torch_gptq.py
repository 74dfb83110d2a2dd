"""torch_gptq.py (GPTQ_SOLVER=torch) against the numpy reference (shared/quant/gptq.py), float64 on the CPU.

Equality means the same int8 integers; the two LAPACKs may differ in the last bits of U, so a problem may
differ in at most 1 integer in 10,000 with GPTQ's objective within 1e-9 relative (none differed when written).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_gptq  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.quant import gptq  # noqa: E402

MAX_DIFF_FRACTION = 1e-4
MAX_OBJECTIVE_REL = 1e-9


def _job(rows, cols, bits=6, k=12.0, dead=(), tie=False, seed=0):
    """W (Student-t rows) and H = X^T X with uneven channel energy (act-order moves columns); dead inputs give
    zero rows and columns of H; tie: two columns of X equal up to sign, so diag H ties."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, size=(rows, cols)) / np.sqrt(cols)).astype(np.float32)
    x = rng.standard_normal((3 * cols, cols)) * np.exp(rng.normal(0.0, 0.7, size=cols))
    if tie:
        x[:, 2] = -x[:, 1]
    x[:, list(dead)] = 0.0
    return w, (x.T @ x).astype(np.float32), gptq.sdclip_scales(w, k, bits), bits


JOBS = [_job(24, 80, dead=(3, 40), tie=True, seed=1), _job(24, 80, dead=(7,), seed=2),  # one batch of two
        _job(17, 33, bits=4, k=3.0, tie=True, seed=3), _job(64, 48, bits=7, k=14.0, seed=4)]


def _objective(job, q):
    w, h, s, _ = job
    return gptq.weighted_error(w, q.astype(np.float64) * s.astype(np.float64)[:, None], gptq.prepare_hessian(h, w)[0])


def _disagreements(jobs, block):
    """Per job: (integers differing, relative objective difference) of torch (CPU, float64) vs numpy."""
    want = [gptq.gptq_quantize(*job, block=block) for job in jobs]
    got = torch_gptq.solve(jobs, torch.device("cpu"), block=block)
    out = []
    for job, a, b in zip(jobs, want, got):
        assert b.dtype == np.int8 and b.shape == a.shape
        ea, eb = _objective(job, a), _objective(job, b)
        out.append((int((a != b).sum()) / a.size, abs(eb - ea) / ea))
    return out


def _agree(jobs, block=16) -> bool:
    return all(d == 0 or (d <= MAX_DIFF_FRACTION and rel <= MAX_OBJECTIVE_REL)
               for d, rel in _disagreements(jobs, block))


@pytest.mark.parametrize("block", [16, 128])  # several blocks (the lazy update) and one
def test_torch_float64_gives_numpy_integers(block):
    hd = gptq.prepare_hessian(JOBS[0][1], JOBS[0][0])[0]
    assert list(gptq.act_order(hd)) != sorted(gptq.act_order(hd))  # act-order really permutes
    assert _agree(JOBS, block), _disagreements(JOBS, block)


def test_dead_columns_are_zero_and_round_to_nearest_is_numpys():
    w, h, s, bits = JOBS[0]
    q = torch_gptq.solve([JOBS[0], (w, None, s, bits)], torch.device("cpu"))
    assert not q[0][:, [3, 40]].any()
    assert np.array_equal(q[1], gptq.gptq_quantize(w, None, s, bits))


def _bad_damping(h, w):  # damping scaled by the mean of every entry of H, not of its diagonal
    h, w = h.clone(), w.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += gptq.DAMP * h.mean(dim=(-2, -1))[:, None]
    return h, w


@pytest.mark.parametrize("fault", ["perm_not_inverted", "damping_scale", "dead_w_kept", "ascending_order"])
def test_the_comparison_catches_a_porting_mistake(monkeypatch, fault):
    original_prepare = torch_gptq.prepare_hessian
    patches = {"perm_not_inverted": ("undo_act_order", lambda qt, perm: qt),
               "damping_scale": ("prepare_hessian", _bad_damping),
               "dead_w_kept": ("prepare_hessian", lambda h, w: (original_prepare(h, w)[0], w.clone())),
               "ascending_order": ("act_order", lambda h: torch.argsort(h.diagonal(dim1=-2, dim2=-1), stable=True))}
    monkeypatch.setattr(torch_gptq, *patches[fault])
    assert not _agree(JOBS)


def test_quantize_with_the_torch_solver_writes_the_same_tensors():
    cfg = dataclasses.replace(Hyperparameters(), quant="gptq", quant_passthrough_numel=64, lqer_enabled=True,
                              lqer_top_k=1)
    w, h, _, _ = _job(24, 80, dead=(5,), seed=6)
    state = {"blocks.0.mlp.fc.weight": w, "blocks.0.attn.c_q.weight": w[:, :40] * 2, "skip": w[:2, :3]}
    stores = {"blocks.0.mlp.fc.weight": "weight", "blocks.0.attn.c_q.weight": "weight", "skip": "weight"}
    hessians = {"blocks.0.mlp.fc.weight": h}  # c_q without one: identity
    want, want_index = gptq.quantize(state, stores, cfg, hessians)
    got, got_index = gptq.quantize(state, stores, cfg, hessians, solver=torch_gptq.TorchSolver(torch.device("cpu")))
    assert got_index == want_index and list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key


def test_the_knob_picks_the_solver():
    import cuda_train

    with pytest.raises(ValueError, match="GPTQ_SOLVER"):
        Hyperparameters.from_env({"GPTQ_SOLVER": "cupy"})
    cfg = Hyperparameters.from_env({"PRESET": "tiny", "QUANT": "gptq"})
    be = cuda_train.TorchBackend(cfg)
    assert be.gptq_solver(cfg) is None  # the default: numpy
    solver = be.gptq_solver(dataclasses.replace(cfg, gptq_solver="torch"))
    assert isinstance(solver, torch_gptq.TorchSolver) and solver.device == be.device
    auto = be.gptq_solver(dataclasses.replace(cfg, gptq_solver="auto"))
    assert (auto is not None) == (be.device.type == "cuda")


def test_the_mlx_trainer_refuses_the_torch_solver():
    pytest.importorskip("mlx.core")
    import mlx_train

    cfg = Hyperparameters.from_env({"PRESET": "tiny", "QUANT": "gptq", "GPTQ_SOLVER": "torch"})
    be = mlx_train.MLXBackend(cfg)  # builds (an artifact made with torch still scores under MLX)
    with pytest.raises(ValueError, match="GPTQ_SOLVER=torch"):
        be.gptq_solver(cfg)
    assert be.gptq_solver(dataclasses.replace(cfg, gptq_solver="auto")) is None
