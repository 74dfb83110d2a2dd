"""The entropy coder (shared/quant/coding.py): bit-exact round trips, edge cases, cost near the order-0 limit."""
from __future__ import annotations

import numpy as np
import pytest

from shared.quant import coding

pytest.importorskip("constriction")


def _round_trip(q):
    freqs, lo, words = coding.encode(q)
    back = coding.decode(words, freqs, lo, q.size)
    assert back.dtype == np.int32 and np.array_equal(back, q.reshape(-1)), "round trip changed the integers"
    return freqs, lo, words


@pytest.mark.parametrize("q", [
    np.zeros((0,), dtype=np.int8),  # empty
    np.zeros((0, 7), dtype=np.int8),  # empty with a shape
    np.full((5, 3), -17, dtype=np.int8),  # one value
    np.array([127], dtype=np.int8),  # one element
    np.array([-128, 127], dtype=np.int8),  # the extremes, nothing between
    np.array([-128] * 1000 + [127], dtype=np.int8),  # an extreme, once, after a long run
    np.arange(-128, 128, dtype=np.int8).repeat(3),  # every int8 value, uniform
])
def test_edge_cases_round_trip(q):
    freqs, lo, words = _round_trip(q)
    if q.size and len(np.unique(q)) == 1:
        assert words.size == 0 and lo == int(q.flat[0]) and len(freqs) == 1  # nothing to code


def test_gaussian_integers_round_trip_at_the_order_0_limit():
    rng = np.random.default_rng(0)
    q = np.clip(np.rint(rng.normal(size=(300, 500)) * 31 / 11.5), -31, 31).astype(np.int8)
    freqs, lo, words = _round_trip(q)
    limit = coding.entropy_bits(q) / 8
    table = freqs.nbytes
    assert words.nbytes < limit * 1.002 + 64, (words.nbytes, limit)  # ANS: ~20 bytes over, quantized table ~0
    assert table <= 2 * 63 and lo >= -31


def test_histogram_is_integer_exact_and_keeps_rare_values():
    q = np.array([0] * 1_000_000 + [5] + [3] * 2, dtype=np.int64)
    freqs, lo = coding.quantized_histogram(q)
    # counts over 0..5: [1e6, 0, 0, 2, 0, 1]; top -> 65535; rare ones floored to 1, absent ones 0
    assert lo == 0 and freqs.tolist() == [65535, 0, 0, 1, 0, 1]
    freqs, lo = coding.quantized_histogram(np.array([-2, -2, -1, 1]))
    assert lo == -2 and freqs.tolist() == [65535, 32768, 0, 32768]  # (1 * 65535 + 1) // 2 = 32768


def test_a_damaged_stream_is_an_error_or_at_worst_other_integers():
    """The artifact's payload hash is the guard; the coder itself must never return the wrong count or crash."""
    rng = np.random.default_rng(1)
    q = np.clip(np.rint(rng.normal(size=5000) * 3), -31, 31).astype(np.int8)
    freqs, lo, words = coding.encode(q)
    with pytest.raises(ValueError, match="entropy-coded stream"):
        coding.decode(words[:-1], freqs, lo, q.size)
    with pytest.raises(ValueError, match="entropy-coded stream"):
        coding.decode(np.concatenate([words, words[:1]]), freqs, lo, q.size)


def test_conditional_entropy_is_at_most_the_order_0_entropy():
    rng = np.random.default_rng(2)
    ctx = rng.integers(0, 2, size=20_000)
    q = np.where(ctx == 1, rng.integers(-8, 8, size=ctx.size), 0)  # the context decides a lot
    assert coding.conditional_entropy_bits(q, ctx) < 0.75 * coding.entropy_bits(q)  # 2.0 vs 2.8 bits a symbol
    noise = rng.integers(0, 4, size=ctx.size)
    assert coding.conditional_entropy_bits(q, noise) <= coding.entropy_bits(q) + 1e-6
