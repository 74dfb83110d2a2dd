"""The record's Muon orthogonalisation (RECORD_STACK.md §5.3): Polar Express tuples and MuonEq-R row normalisation,
checked by hand in both frameworks, and porting mistakes in the MLX twin that the optimizer-step parity catches."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

import mlx_optim  # noqa: E402
import torch_optim  # noqa: E402
from parity_tests import compare as C  # noqa: E402
from parity_tests.test_parity import POLAR, ROW_NORM, cfg_for, check_optimizer_steps  # noqa: E402
from shared.spec import NS_COEFFS, POLAR_EXPRESS_COEFFS, ns_coefficients  # noqa: E402


def polar_express_reference(g: np.ndarray, coeffs) -> np.ndarray:
    """§5.3 written out in float64: X = g (transposed if rows > cols), X/(||X||_F + 1e-7), then per (a, b, c)
    A = XX^T, X <- aX + (bA + cA^2)X; transposed back."""
    x = g.astype(np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.sqrt(np.sum(x * x)) + 1e-7)
    for a, b, c in coeffs:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def _matrix(shape, seed=0) -> np.ndarray:
    """U diag(s) V^T with singular values spread over [0.02, 1] (condition number 50)."""
    rng, k = np.random.default_rng(seed), min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    return (u * np.geomspace(0.02, 1.0, k)) @ v.T


def _both(g: np.ndarray, ns: str) -> tuple[np.ndarray, np.ndarray]:
    t = torch_optim.zeropower_via_newtonschulz5(torch.tensor(g, dtype=torch.float32), 5, torch.float32, ns)
    m = mlx_optim.zeropower_via_newtonschulz5(mx.array(g.astype(np.float32)), 5, mx.float32, ns)
    return t.numpy(), np.array(m)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
def test_polar_express_matches_a_hand_written_numpy_version(shape):
    g = _matrix(shape)
    ref = polar_express_reference(g, POLAR_EXPRESS_COEFFS)
    for name, out in zip(("torch", "mlx"), _both(g, "polar_express")):
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5, err_msg=name)
    # Measured in float64: Polar Express leaves the singular values in [0.860, 1.115], the quintic in [0.705, 1.101]
    sv = np.linalg.svd(ref, compute_uv=False)
    quintic = np.linalg.svd(polar_express_reference(g, (NS_COEFFS,) * 5), compute_uv=False)
    assert 0.85 < sv.min() and sv.max() < 1.12 and quintic.min() < 0.75, (sv, quintic)


def test_row_normalization_by_hand():
    g = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [0.0, -2.0, 0.0]], dtype=np.float32)
    want = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 0.0], [1e-2, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=np.float32)
    t = torch_optim.row_normalize(torch.tensor(g, dtype=torch.bfloat16))  # a bf16 input comes back fp32
    m = mlx_optim.row_normalize(mx.array(g).astype(mx.bfloat16))
    assert t.dtype == torch.float32 and m.dtype == mx.float32
    np.testing.assert_allclose(torch_optim.row_normalize(torch.tensor(g)).numpy(), want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.array(mlx_optim.row_normalize(mx.array(g))), want, rtol=1e-6, atol=0)


# Faults: plausible porting mistakes in the MLX twin; the two-step optimizer parity must catch each.
def _reversed_tuples(kind, steps):
    return tuple(reversed(ns_coefficients(kind, steps)))


def _quintic_always(kind, steps):
    return ns_coefficients("quintic", steps)


def _column_normalize(g):
    x = g.astype(mx.float32)
    return x / mx.maximum(mx.sqrt(mx.sum(x * x, axis=0, keepdims=True)), 1e-7)


FAULTS = ["polar_tuples_reversed", "quintic_under_polar_express", "columns_normalized", "row_norm_after_ns"]


@pytest.mark.parametrize("fault", FAULTS)
def test_injected_muon_orthogonalisation_faults_are_caught(monkeypatch, fault):
    cfg = dataclasses.replace(cfg_for("untied"), grad_clip_norm=0.5, **POLAR, **ROW_NORM)
    if fault == "polar_tuples_reversed":
        monkeypatch.setattr(mlx_optim, "ns_coefficients", _reversed_tuples)
    elif fault == "quintic_under_polar_express":
        monkeypatch.setattr(mlx_optim, "ns_coefficients", _quintic_always)
    elif fault == "columns_normalized":
        monkeypatch.setattr(mlx_optim, "row_normalize", _column_normalize)
    else:
        ns, rows = mlx_optim.zeropower_via_newtonschulz5, mlx_optim.row_normalize
        monkeypatch.setattr(mlx_optim, "row_normalize", lambda g: g)
        monkeypatch.setattr(mlx_optim, "zeropower_via_newtonschulz5", lambda g, *a: rows(ns(g, *a)))
    with pytest.raises(AssertionError, match="weight|slot"):
        check_optimizer_steps(cfg, C.random_state(cfg, seed=4))
