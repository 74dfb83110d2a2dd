"""shared/quant/gptq.py's upper Cholesky factor of H^-1 (one Cholesky and a triangular inverse) against GPTQ's
three-step reference (cholesky, inverse, cholesky upper), written out here in numpy."""
from __future__ import annotations

import numpy as np
import pytest

from shared.quant import gptq


def _reference(h):
    lower = np.linalg.cholesky(h)
    inv_lower = np.linalg.solve(lower, np.eye(h.shape[0]))
    return np.linalg.cholesky(inv_lower.T @ inv_lower).T


@pytest.mark.parametrize("n", [5, 64, 203])  # one leaf, the leaf size, uneven halves three levels deep
def test_the_factor_is_the_reference_upper_cholesky_of_the_inverse(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3 * n, n)) * np.exp(rng.normal(0.0, 0.7, size=n))
    h = x.T @ x + 0.01 * np.mean(np.sum(x * x, axis=0)) * np.eye(n)
    u = gptq.upper_cholesky_of_inverse(h)
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    assert np.allclose(u.T @ u @ h, np.eye(n), atol=1e-9)
    want = _reference(h)
    assert np.abs(u - want).max() <= 1e-12 * np.abs(want).max()


def test_the_triangular_inverse_inverts():
    rng = np.random.default_rng(0)
    m = np.tril(rng.standard_normal((150, 150))) + 20 * np.eye(150)
    assert np.allclose(gptq.lower_triangular_inverse(m) @ m, np.eye(150), atol=1e-12)
