"""shared/segments.py: the segments DOC_ISOLATED_ATTN attends within (RECORD_STACK.md §4).

    .venv/bin/python -m pytest -q tests/test_segments.py
"""
from __future__ import annotations

import numpy as np
import pytest

from shared.segments import attention_mask, cu_seqlens, require_bos, segment_ids

BOS = 1


def _lengths(row_ids: np.ndarray) -> list[int]:
    """Run lengths of one row's ids, in order."""
    _, first, counts = np.unique(row_ids, return_index=True, return_counts=True)
    return [int(c) for _, c in sorted(zip(first, counts))]


def test_row_without_bos_at_start_opens_with_the_cut_documents_tail():
    x = np.array([[5, 6, 1, 7, 8, 1, 9]])
    assert _lengths(segment_ids(x, BOS, 64)[0]) == [2, 3, 2]


def test_row_starting_with_bos_has_no_empty_segment():
    x = np.array([[1, 6, 7, 1, 9]])
    assert _lengths(segment_ids(x, BOS, 64)[0]) == [3, 2]


def test_bos_at_the_last_position_is_a_one_token_segment():
    ids = segment_ids(np.array([[4, 5, 6, 1]]), BOS, 64)
    assert _lengths(ids[0]) == [3, 1]
    assert ids[0, -1] != ids[0, -2]


def test_all_bos_row_is_one_segment_per_token():
    ids = segment_ids(np.full((2, 6), BOS), BOS, 64)
    assert np.array_equal(ids.ravel(), np.arange(12))


def test_no_bos_at_all_is_one_segment_per_row():
    ids = segment_ids(np.full((3, 5), 7), BOS, 64)
    assert np.array_equal(ids, np.repeat(np.arange(3), 5).reshape(3, 5))


def test_long_segments_split_into_max_len_pieces_from_the_segment_start():
    # segments [0, 3) and [3, 14): the second splits at 3 + 4 = 7 and 11, not at multiples of 4 in the row
    x = np.array([[5, 6, 7, 1] + [9] * 10])
    assert _lengths(segment_ids(x, BOS, 4)[0]) == [3, 4, 4, 3]
    assert _lengths(segment_ids(x, BOS, 11)[0]) == [3, 11]  # exactly max_len: no split
    assert _lengths(segment_ids(np.full((1, 10), 9), BOS, 4)[0]) == [4, 4, 2]  # a cut tail splits too


def test_ids_are_numbered_over_the_flattened_batch_and_never_continue_across_rows():
    x = np.array([[5, 1, 6], [7, 8, 9]])  # row 1 has no BOS: it is still a new segment
    ids = segment_ids(x, BOS, 64)
    assert ids.dtype == np.int32
    assert np.array_equal(ids, [[0, 1, 1], [2, 2, 2]])


@pytest.mark.parametrize("seed", range(5))
def test_cu_seqlens_agree_with_ids(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=(4, 37))  # BOS (1) about one token in six
    ids = segment_ids(x, BOS, 9)
    cu = cu_seqlens(ids)
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == x.size and np.all(np.diff(cu) > 0)
    # segment s spans flat positions [cu[s], cu[s+1]), and ids[flat] = s
    assert np.array_equal(np.repeat(np.arange(len(cu) - 1), np.diff(cu)), ids.ravel())
    assert set(cu[:-1]) >= set(range(0, x.size, x.shape[1])), "every row start is a boundary"
    assert np.diff(cu).max() <= 9


def test_cu_seqlens_pad_to_the_bucket_by_repeating_the_total():
    ids = segment_ids(np.array([[1, 2, 1, 3], [4, 1, 5, 6]]), BOS, 64)
    assert list(cu_seqlens(ids)) == [0, 2, 4, 5, 8]
    padded = cu_seqlens(ids, bucket=64)
    assert len(padded) == 64 and list(padded[:5]) == [0, 2, 4, 5, 8] and np.all(padded[5:] == 8)
    assert len(cu_seqlens(segment_ids(np.ones((1, 63)), BOS, 64), bucket=64)) == 64  # 64 entries already: no pad


def test_cu_seqlens_keep_row_boundaries_for_ids_numbered_per_row():
    per_row = np.zeros((2, 3), dtype=np.int32)  # a caller numbering each row from 0
    assert list(cu_seqlens(per_row)) == [0, 3, 6]


def test_attention_mask_is_causal_and_same_segment():
    ids = segment_ids(np.array([[5, 1, 6, 7, 1]]), BOS, 64)
    want = np.array([[1, 0, 0, 0, 0],
                     [0, 1, 0, 0, 0],
                     [0, 1, 1, 0, 0],
                     [0, 1, 1, 1, 0],
                     [0, 0, 0, 0, 1]], dtype=bool)
    assert np.array_equal(attention_mask(ids)[0], want)


@pytest.mark.parametrize("bos", [None, -1])
def test_missing_bos_names_the_knobs(bos):
    with pytest.raises(ValueError, match="DOC_ISOLATED_ATTN.*TOKENIZER_PATH"):
        require_bos(bos)
