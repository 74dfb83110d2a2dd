"""ComposedOps (mlx[cpu]'s exp-built tanh, cross-entropy, attention) at the edges of float32, against torch and MLX.

    .venv/bin/python -m pytest -q tests/test_mlx_cpu_ops.py
"""
from __future__ import annotations

import numpy as np
import pytest

ops = pytest.importorskip("mlx_cpu_ops")
torch = pytest.importorskip("torch")
mx = ops.mx
F = torch.nn.functional

# 0 and +-1e-3 (a zero-init head's first logits), +-5 (mid-slope), +-44.5 (where exp(2u) used to overflow),
# +-88 and +-1e4 (far past saturation)
TANH_POINTS = np.array([0.0, 1e-3, -1e-3, 5.0, -5.0, 44.5, -44.5, 88.0, -88.0, 1e4, -1e4], np.float32)


def _close(name: str, got, want, rtol: float, atol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values {got[~np.isfinite(got)][:4]}"
    diff = np.abs(got - want)
    assert np.all(diff <= atol + rtol * np.abs(want)), f"{name}: max abs diff {diff.max():.3g}"


def test_exp_saturates_finite_above_range():
    big = np.array(ops._exp_poly(mx.array([88.4, 89.0, 100.0, 1e30], mx.float32)))
    assert np.all(np.isfinite(big)) and np.all(big > 1e38), f"exp of large x: {big}"
    tiny = np.array(ops._exp_poly(mx.array([-87.4, -100.0, -1e30, -np.inf], mx.float32)))
    assert np.all(tiny == 0.0), f"exp below EXP_MIN: {tiny}"


def test_exp_matches_numpy_in_range():
    x = np.linspace(-87.0, 88.0, 200_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(np.array(ops._exp_poly(mx.array(x))) - want) / want
    assert rel.max() < 2e-7, f"exp: max rel err {rel.max():.3g} at x={x[rel.argmax()]}"


def test_tanh_forward_matches_torch():
    got = np.array(ops.ComposedOps.tanh(mx.array(TANH_POINTS)))
    _close("tanh vs torch", got, torch.tanh(torch.from_numpy(TANH_POINTS)).numpy(), 0.0, 1e-6)
    _close("tanh vs mx.tanh", got, np.array(mx.tanh(mx.array(TANH_POINTS))), 0.0, 1e-6)


def test_tanh_grad_matches_torch():
    got = np.array(mx.grad(lambda u: mx.sum(ops.ComposedOps.tanh(u)))(mx.array(TANH_POINTS)))
    u = torch.from_numpy(TANH_POINTS.copy()).requires_grad_()
    torch.tanh(u).sum().backward()
    _close("d tanh", got, u.grad.numpy(), 0.0, 1e-6)
    assert got[0] == 1.0, f"d tanh at 0 is {got[0]}, not exactly 1: a zero-init head would stall"


def _logits_with_outliers() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((4, 16)) * 3).astype(np.float32)
    z[0, 3], z[1, 0], z[2, 7], z[2, 8] = 1e4, -1e4, 1e4, -1e4
    return z, np.array([3, 5, 8, 2], np.int32)  # targets: the outlier itself, an ordinary, the -1e4 entry, ordinary


def test_softcap_cross_entropy_large_logits_matches_torch():
    z, y = _logits_with_outliers()

    def loss(z_):
        return mx.mean(ops.ComposedOps.token_nll(30.0 * ops.ComposedOps.tanh(z_ / 30.0), mx.array(y)))
    got_loss, got_grad = mx.value_and_grad(loss)(mx.array(z))
    zt = torch.from_numpy(z.copy()).requires_grad_()
    want_loss = F.cross_entropy(30.0 * torch.tanh(zt / 30.0), torch.from_numpy(y).long())
    want_loss.backward()
    _close("softcap+CE loss", got_loss.item(), want_loss.item(), 0.0, 1e-5)
    _close("softcap+CE d logits", np.array(got_grad), zt.grad.numpy(), 0.0, 1e-5)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_token_nll_large_logits(impl):
    z, y = _logits_with_outliers()

    def loss(z_, nll=ops.ComposedOps.token_nll):
        return mx.sum(nll(z_, mx.array(y)))
    got_loss, got_grad = mx.value_and_grad(loss)(mx.array(z))
    if impl == "fused":
        want_loss, want_grad = mx.value_and_grad(lambda z_: loss(z_, ops.FusedOps.token_nll))(mx.array(z))
        want_loss, want_grad = want_loss.item(), np.array(want_grad)
    else:
        zt = torch.from_numpy(z.copy()).requires_grad_()
        want = F.cross_entropy(zt, torch.from_numpy(y).long(), reduction="sum")
        want.backward()
        want_loss, want_grad = want.item(), zt.grad.numpy()
    _close(f"token_nll vs {impl}", got_loss.item(), want_loss, 1e-6, 1e-5)  # a 2e4 nat loss: fp32 spacing 2e-3
    _close(f"d token_nll vs {impl}", np.array(got_grad), want_grad, 0.0, 1e-5)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_attention_large_scores(impl):
    rng = np.random.default_rng(1)
    b, h, hkv, t, d = 1, 4, 2, 8, 16
    q, k, v, w = (rng.standard_normal(s).astype(np.float32) for s in
                  [(b, h, t, d), (b, hkv, t, d), (b, hkv, t, d), (b, h, t, d)])
    q, k, scale = q * 10, k * 10, d ** -0.5  # scores q.k*scale ~ N(0, 100^2): |s| up to a few hundred

    def loss(q_, k_, v_, attn=ops.ComposedOps.attention):
        return mx.sum(attn(q_, k_, v_, scale) * mx.array(w))
    grad_fn = mx.value_and_grad(loss, argnums=(0, 1, 2))
    got_out, got_grads = grad_fn(mx.array(q), mx.array(k), mx.array(v))
    if impl == "fused":
        want = mx.value_and_grad(lambda *a: loss(*a, ops.FusedOps.attention), argnums=(0, 1, 2))
        want_out, want_grads = want(mx.array(q), mx.array(k), mx.array(v))
        want_out, want_grads = want_out.item(), [np.array(g) for g in want_grads]
    else:
        qt, kt, vt = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        want = (out * torch.from_numpy(w)).sum()
        want.backward()
        want_out, want_grads = want.item(), [a.grad.numpy() for a in (qt, kt, vt)]
    _close(f"attention out vs {impl}", got_out.item(), want_out, 1e-4, 1e-5)
    for name, g, wg in zip("qkv", got_grads, want_grads):
        _close(f"attention d{name} vs {impl}", np.array(g), wg, 1e-3, 1e-4)
