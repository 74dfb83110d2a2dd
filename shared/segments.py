"""Documents inside packed rows: segment ids and cu_seqlens for DOC_ISOLATED_ATTN (RECORD_STACK.md §4).

Built once here, in numpy, and used by both trainers (training rows and evaluation windows alike):

    ids = segment_ids(x, bos_id, max_len)     # (B, T) int32: token i may attend to j iff j <= i and ids equal
    cu = cu_seqlens(ids, bucket=64)           # int32 boundaries over the flattened batch, for varlen kernels

Rules (the record's _build_cu_seqlens): a segment starts at every BOS and at position 0 of every row (a row
that does not start with BOS begins with the tail of a document the loader cut); a segment longer than
max_len is split into pieces of max_len counted from the segment's start.
"""
from __future__ import annotations

import numpy as np

CU_SEQLENS_BUCKET = 64  # the record pads cu_seqlens to a multiple of 64 entries: compiled kernels see few shapes


def require_bos(bos_id: int | None, knob: str = "DOC_ISOLATED_ATTN") -> int:
    """The BOS id a BOS-aware feature reads; one line naming the feature's knob and TOKENIZER_PATH when the
    tokenizer has none."""
    if bos_id is None or bos_id < 0:
        raise ValueError(f"{knob}=1 needs the tokenizer's BOS id, but the tokenizer at TOKENIZER_PATH has none "
                         f"(got {bos_id})")
    return int(bos_id)


def check_bos_features(cfg, bos_id: int | None) -> None:
    """Before any compute: every enabled feature that reads BOS has one to read."""
    for knob, on in (("DOC_ISOLATED_ATTN", cfg.doc_isolated_attn), ("SMEAR_GATE_ENABLED", cfg.smear_gate_enabled)):
        if on:
            require_bos(bos_id, knob)


def segment_ids(x: np.ndarray, bos_id: int, max_len: int) -> np.ndarray:
    """(B, T) int32 ids, numbered in order over the flattened batch: a row's first id is new, so ids never
    continue across rows, and ids[b, t] is the index of the token's segment in cu_seqlens(ids)."""
    if x.ndim != 2 or max_len <= 0:
        raise ValueError(f"segment_ids wants (B, T) token rows and max_len > 0, got shape {x.shape}, {max_len}")
    pos = np.arange(x.shape[1])
    starts = x == bos_id
    starts[:, 0] = True  # the row-start rule
    last = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)  # each token's segment start
    starts |= (pos - last) % max_len == 0  # pieces of max_len measured from the segment start
    return (np.cumsum(starts.ravel()) - 1).reshape(x.shape).astype(np.int32)


def cu_seqlens(ids: np.ndarray, bucket: int = 0) -> np.ndarray:
    """int32 [start_0, start_1, ..., B*T] over the flattened batch (row boundaries are segment boundaries);
    bucket > 0 pads to a multiple of `bucket` entries by repeating B*T (zero-length segments)."""
    flat = ids.reshape(-1)
    change = np.ones(flat.size, dtype=bool)
    change[1:] = flat[1:] != flat[:-1]
    change[::ids.shape[-1]] = True  # every row starts a segment, whatever ids a caller numbered
    cu = np.append(np.flatnonzero(change), flat.size)
    if bucket > 0:
        cu = np.append(cu, np.full(-len(cu) % bucket, flat.size))
    return cu.astype(np.int32)


def attention_mask(ids: np.ndarray) -> np.ndarray:
    """(B, T, T) bool reference mask: [b, i, j] iff j <= i and ids[b, i] == ids[b, j] (tests and benchmarks)."""
    t = ids.shape[-1]
    return (ids[:, :, None] == ids[:, None, :]) & np.tril(np.ones((t, t), dtype=bool))
