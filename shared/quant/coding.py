"""Entropy coding of quantized integers: order-0 ANS per tensor with a quantized histogram stored beside it.

The integers of a GPTQ/SDClip tensor are close to i.i.d. (a discretized bell whose width the clip sigmas set),
so an order-0 model per tensor reaches their empirical entropy; general-purpose compressors (zstd, brotli,
lzma) stay several percent above it on such data. The coder is asymmetric numeral systems (Duda 2013,
"Asymmetric numeral systems: entropy coding combining speed of Huffman coding with compression rate of
arithmetic coding", arXiv 1311.2540), as implemented by the `constriction` package (Bamler 2022, "Understanding
Entropy Coding With Asymmetric Numeral Systems (ANS): a Statistician's Perspective", arXiv 2201.01741; Rust,
wheels for Linux and macOS): 32-bit words, 24-bit fixed-point probabilities, about 20 bytes of overhead a stream.

Probability model: the tensor's histogram over [lo, hi] (lo, hi its smallest and largest integer), scaled so the
most frequent value gets 65,535 and stored as uint16, every present value at least 1 (integer arithmetic, so
any machine derives the same table). constriction turns the table into fixed-point probabilities with
perfect=False, a deterministic function of the float64 counts, identical in encoder and decoder.
A tensor holding one value (or none) needs no stream: lo and the count say it all.

    freqs, lo, words = encode(q)            # q: any integer array (int8 here)
    q = decode(words, freqs, lo, n)         # int32, the same values, flat
"""
from __future__ import annotations

import numpy as np

FREQ_MAX = 65_535  # the most frequent value's stored frequency (uint16)


def quantized_histogram(q: np.ndarray) -> tuple[np.ndarray, int]:
    """(uint16 frequencies of lo..hi, lo): counts scaled by FREQ_MAX / max count, rounded half up, present >= 1."""
    flat = np.asarray(q).reshape(-1).astype(np.int64)
    if flat.size == 0:
        return np.zeros(0, dtype=np.uint16), 0
    lo = int(flat.min())
    counts = np.bincount(flat - lo).astype(np.int64)
    top = int(counts.max())
    freqs = (counts * FREQ_MAX + top // 2) // top
    freqs = np.where(counts > 0, np.maximum(freqs, 1), 0)
    return freqs.astype(np.uint16), lo


def _model(freqs: np.ndarray):
    import constriction  # imported here: only artifacts with COMPRESSOR=entropy need it

    return constriction.stream.model.Categorical(freqs.astype(np.float64), perfect=False)


def encode(q: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(freqs uint16, lo, ANS words uint32) of the integers q in C order."""
    import constriction

    freqs, lo = quantized_histogram(q)
    if len(freqs) <= 1:
        return freqs, lo, np.zeros(0, dtype=np.uint32)
    symbols = (np.asarray(q).reshape(-1).astype(np.int64) - lo).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, _model(freqs))  # a stack: encoded back to front, decoded front to back
    return freqs, lo, coder.get_compressed().astype(np.uint32)


def decode(words: np.ndarray, freqs: np.ndarray, lo: int, n: int) -> np.ndarray:
    """The n integers (int32, flat); ValueError if the words do not decode to exactly n symbols of the model."""
    import constriction

    if n == 0:
        return np.zeros(0, dtype=np.int32)
    if len(freqs) <= 1:
        return np.full(n, lo, dtype=np.int32)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        symbols = coder.decode(_model(freqs), n)
    except (ValueError, RuntimeError, AssertionError) as exc:  # constriction's errors for malformed words
        raise ValueError(f"entropy-coded stream does not decode ({exc})") from None
    if not coder.is_empty():
        raise ValueError("entropy-coded stream has words left over after its symbols (corrupt)")
    return symbols.astype(np.int32) + np.int32(lo)


def entropy_bits(q: np.ndarray) -> float:
    """Order-0 empirical entropy of q in bits (the limit an order-0 coder approaches), float64."""
    counts = np.unique(np.asarray(q).reshape(-1), return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum()) if counts.size else 0.0


def conditional_entropy_bits(q: np.ndarray, context: np.ndarray) -> float:
    """Empirical entropy of q given a discrete context of the same shape, in bits: what a context model
    with exact tables (and no table cost) would reach. Used to decide whether a context pays."""
    q = np.asarray(q).reshape(-1).astype(np.int64)
    c = np.asarray(context).reshape(-1).astype(np.int64)
    return sum(entropy_bits(q[c == v]) for v in np.unique(c))
