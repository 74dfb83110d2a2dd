"""GPTQ + SDClip (shared/quant/gptq.py) against a direct dense solve of the same greedy objective, and by hand."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from shared.config import Hyperparameters
from shared.quant import gptq


def _problem(rows=12, cols=40, dead=(), seed=0):
    """W and a correlated H = X^T X with varied column scales (so act-order moves columns); dead inputs zeroed."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, cols)) @ rng.normal(size=(cols, cols)) * rng.uniform(0.2, 3.0, size=cols)
    x[:, list(dead)] = 0.0
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    return w, x.T @ x


def _dense_reference(w, h, s, bits, order):
    """The greedy objective solved directly: quantize column order[t], then set every column not yet quantized
    to the exact minimizer of tr(E H E^T) given the quantized ones (e_F = -e_Q H_QF H_FF^-1, a dense solve)."""
    r = gptq.levels(bits)
    w0 = w.astype(np.float64)
    cur, q = w0.copy(), np.zeros_like(w0)
    for t, j in enumerate(order):
        q[:, j] = np.clip(np.rint(cur[:, j] / s), -r, r)
        fixed, free = order[:t + 1], order[t + 1:]
        if len(free):
            e_fixed = w0[:, fixed] - q[:, fixed] * s[:, None]
            e_free = -np.linalg.solve(h[np.ix_(free, free)], (e_fixed @ h[np.ix_(fixed, free)]).T).T
            cur[:, free] = w0[:, free] - e_free
    return q.astype(np.int8)


@pytest.mark.parametrize("block", [128, 7])  # one block, and several (the lazy update across blocks)
def test_gptq_equals_the_dense_greedy_solve_in_act_order(block):
    w, h = _problem()
    s = gptq.sdclip_scales(w, 3.0, 4)
    hd, wd, _ = gptq.prepare_hessian(h, w)
    order = list(gptq.act_order(hd))
    assert order != sorted(order)  # act-order really permutes here
    want = _dense_reference(wd, hd, s.astype(np.float64), 4, order)
    got = gptq.gptq_quantize(w, h, s, 4, block=block)
    assert np.array_equal(got, want), f"{(got != want).sum()} of {got.size} integers differ"
    natural = _dense_reference(wd, hd, s.astype(np.float64), 4, list(range(w.shape[1])))
    assert not np.array_equal(got, natural)  # the order matters, so a lost permutation would be seen


def test_gptq_lowers_the_weighted_error_well_below_round_to_nearest():
    w, h = _problem(rows=32, cols=64, seed=1)
    s = gptq.sdclip_scales(w, 12.85, 6)
    hd = gptq.prepare_hessian(h, w)[0]
    deq = lambda q: q.astype(np.float64) * s.astype(np.float64)[:, None]  # noqa: E731
    rtn = gptq.weighted_error(w, deq(gptq.gptq_quantize(w, None, s, 6)), hd)
    opt = gptq.weighted_error(w, deq(gptq.gptq_quantize(w, h, s, 6)), hd)
    assert opt < 0.6 * rtn, (opt, rtn)  # measured 0.28 on these correlated inputs


def test_dead_columns_are_zero_and_the_rest_still_optimal():
    dead = (3, 17)
    w, h = _problem(dead=dead, seed=2)
    assert (np.diag(h)[list(dead)] == 0).all()
    s = gptq.sdclip_scales(w, 3.0, 4)
    q = gptq.gptq_quantize(w, h, s, 4)
    assert not q[:, list(dead)].any()
    hd, wd, mask = gptq.prepare_hessian(h, w)
    assert list(np.flatnonzero(mask)) == list(dead)
    assert np.array_equal(q, _dense_reference(wd, hd, s.astype(np.float64), 4, list(gptq.act_order(hd))))


def test_sdclip_scales_by_hand():
    w = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, 1.0, -1.0, 1.0]],
                 dtype=np.float32)
    s = gptq.sdclip_scales(w, 13.0, 6)
    # row 0: std ddof 1 of 1..4 = sqrt(5/3) = 1.2909944; * 13 / 31 = 0.54138...; fp16 -> 0.5415039
    # row 3: std ddof 1 of (+-1) x 4 = sqrt(4/3) = 1.1547005; * 13 / 31 = 0.48423...; fp16 -> 0.4841309
    # row 1 (zeros): 1.0; row 2 (constant 5): max|w| / R = 5/31 = 0.16129 -> fp16 0.1612549
    assert s.dtype == np.float16
    assert s.tolist() == [np.float16(0.54138).item(), 1.0, np.float16(5 / 31).item(), np.float16(0.48423).item()]
    assert abs(float(s[0]) - 0.5415039) < 1e-7 and abs(float(s[3]) - 0.4841309) < 1e-7


def test_encoder_rounds_with_the_fp16_scale_the_decoder_uses():
    """A value between the half steps of the exact and the fp16-rounded scale rounds as the fp16 one says."""
    row = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    exact = 1.0 * np.std(row.astype(np.float64), ddof=1) / 7  # k = 1, 4 bits: R = 7
    s16 = gptq.sdclip_scales(row, 1.0, 4)
    assert np.float64(s16[0]) != exact
    v = np.float32(2.5 * (np.float64(s16[0]) + exact) / 2)  # strictly between 2.5 * s16 and 2.5 * exact
    want = np.rint(v / np.float64(s16[0]))
    assert want != np.rint(v / exact)
    q = gptq.gptq_quantize(np.array([[v, v, v]], dtype=np.float32), None, s16, 4)
    assert q.tolist() == [[want] * 3]


def test_scheme_kinds_bits_and_identity_fallback():
    cfg = dataclasses.replace(Hyperparameters(), embed_bits=7, matrix_bits=6)
    rng = np.random.default_rng(3)
    state = {"tok_emb.weight": rng.normal(size=(1024, 80)), "blocks.0.mlp.fc.weight": rng.normal(size=(300, 256)),
             "blocks.0.attn.attn_gate_w": rng.normal(size=(4, 12)), "blocks.0.attn_scale": rng.normal(size=(64,))}
    stores = {"tok_emb.weight": "weight", "blocks.0.mlp.fc.weight": "weight", "blocks.0.attn.attn_gate_w": "gate",
              "blocks.0.attn_scale": "control"}
    h = {"blocks.0.mlp.fc.weight": np.eye(256) * 2.0}
    tensors, index = gptq.quantize(state, stores, cfg, h)
    assert index["tok_emb.weight"]["bits"] == 7 and index["tok_emb.weight"]["hessian"] == "identity"
    assert index["blocks.0.mlp.fc.weight"]["bits"] == 6 and index["blocks.0.mlp.fc.weight"]["hessian"] == "calibrated"
    assert np.abs(tensors["q:tok_emb.weight"]).max() <= 63 and np.abs(tensors["q:blocks.0.mlp.fc.weight"]).max() <= 31
    assert tensors["q:blocks.0.attn.attn_gate_w"].dtype == np.int8 and index["blocks.0.attn_scale"]["kind"] == "float"
    gate = state["blocks.0.attn.attn_gate_w"]
    assert np.array_equal(tensors["scale:blocks.0.attn.attn_gate_w"], (np.abs(gate).max(1) / 127).astype(np.float16))
    back = gptq.dequantize(tensors, index)
    assert back["blocks.0.attn_scale"].dtype == np.float32
    # a diagonal H does not couple columns: GPTQ is then round-to-nearest, bit for bit
    rtn = gptq.gptq_quantize(state["blocks.0.mlp.fc.weight"], None, tensors["scale:blocks.0.mlp.fc.weight"], 6)
    assert np.array_equal(tensors["q:blocks.0.mlp.fc.weight"], rtn)
    with pytest.raises(ValueError, match="Hessian of blocks.0.mlp.fc.weight"):
        gptq.quantize(state, stores, cfg, {"blocks.0.mlp.fc.weight": np.eye(3)})
