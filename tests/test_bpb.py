import math

import numpy as np
import pytest

from shared.bpb import BpbAccumulator, eval_windows, evaluate, shard_windows, target_bytes
from shared.tokenizer import ByteTables, build_byte_tables, load_tokenizer

# Hand-made vocab: 0 BOS (boundary), 1 standalone "▁", 2 "ab", 3 "▁cd", 4 a byte token.
HAND = ByteTables(base_bytes=np.array([0, 0, 2, 2, 1]), has_leading_space=np.array([False, True, False, True, False]),
                  is_boundary=np.array([True, False, False, False, False]))


def test_hand_worked_bpb():
    ids = np.array([0, 3, 2, 1, 4, 3])
    # targets: "cd" after BOS (no space) 2, "ab" 2, lone space 1, byte 1, " cd" 3 -> 9 bytes
    np.testing.assert_array_equal(HAND.count_bytes(ids[:-1], ids[1:]), [2, 2, 1, 1, 3])
    acc = BpbAccumulator()
    acc.add(np.full(5, math.log(2.0)), target_bytes(ids, HAND))
    assert acc.tokens == 5 and acc.bytes == 9
    assert acc.val_loss == pytest.approx(math.log(2.0))
    assert acc.val_bpb == pytest.approx(5 / 9)


def test_accumulators_merge_like_one():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=101)
    nll = rng.random(100)
    whole, a, b = BpbAccumulator(), BpbAccumulator(), BpbAccumulator()
    nbytes = target_bytes(ids, HAND, chunk=7)  # chunked on purpose: the seams must not change a count
    np.testing.assert_array_equal(nbytes, HAND.count_bytes(ids[:-1], ids[1:]))
    whole.add(nll, nbytes)
    a.add(nll[:37], nbytes[:37])
    b.add(nll[37:], nbytes[37:])
    merged = BpbAccumulator(a.totals + b.totals)
    assert merged.val_bpb == pytest.approx(whole.val_bpb, rel=1e-14)


@pytest.mark.parametrize("n,seq,stride", [(11, 4, 2), (11, 4, 4), (12, 4, 3), (1000, 64, 17), (65, 64, 8), (200, 64, 1)])
def test_sliding_windows_score_every_target_once_with_full_context(n, seq, stride):
    w = eval_windows(n, seq, stride)
    hits = np.zeros(n - 1, dtype=int)
    for start, score_from in w:
        assert start >= 0 and start + seq <= n - 1
        hits[start + score_from:start + seq] += 1
        if start > 0:
            assert score_from >= seq - stride  # each scored token has at least seq-stride context
    np.testing.assert_array_equal(hits, 1)


def test_official_windows_drop_the_tail_and_short_split_errors():
    w = eval_windows(11, 4, 0)
    assert w[:, 0].tolist() == [0, 4] and (w[:, 1] == 0).all()
    with pytest.raises(ValueError, match="TRAIN_SEQ_LEN"):
        eval_windows(4, 4, 0)


def test_sharded_evaluation_equals_one_process():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 5, size=999)
    score = lambda x, y: (x * 0.1 + y * 0.01 + 0.5).astype(np.float32)  # any deterministic per-token NLL
    w = eval_windows(tokens.size, 16, 5)
    nbytes = target_bytes(tokens, HAND)
    one = evaluate(score, tokens, w, 16, nbytes, batch_windows=7)
    parts = [evaluate(score, tokens, shard_windows(w, r, 3), 16, nbytes, batch_windows=4) for r in range(3)]
    merged = BpbAccumulator(sum(p.totals for p in parts))
    assert merged.tokens == tokens.size - 1
    assert merged.bytes == one.bytes == int(nbytes.sum())  # every target's bytes counted once, by position
    assert merged.val_bpb == pytest.approx(one.val_bpb, rel=1e-12)


def test_official_tokenizer_tables(reference_data):
    sp = load_tokenizer(str(reference_data / "tokenizers" / "fineweb_1024_bpe.model"), 1024)
    t = build_byte_tables(sp)
    lone = sp.piece_to_id("\u2581")
    assert t.base_bytes[lone] == 0 and t.has_leading_space[lone]  # not 3 bytes of "▁" plus a space
    assert all(t.base_bytes[i] == 1 for i in range(sp.vocab_size()) if sp.is_byte(i))
    assert t.is_boundary[[0, 1, 2, 3]].all() and t.base_bytes[[0, 1, 2, 3]].sum() == 0
    with pytest.raises(ValueError, match="VOCAB_SIZE=8192"):
        load_tokenizer(str(reference_data / "tokenizers" / "fineweb_1024_bpe.model"), 8192)


@pytest.mark.parametrize("tok", ["fineweb_1024_bpe.model", "fineweb_8192_bpe.model"])
def test_byte_counts_equal_decoded_utf8_on_real_text(reference_data, tok):
    """Per document: table bytes == UTF-8 length of what the tokenizer decodes (no space counted twice)."""
    sp = load_tokenizer(str(reference_data / "tokenizers" / tok))
    tables = build_byte_tables(sp)
    text = (reference_data / "text" / "fineweb_edu_sample_1MB.txt").read_text(encoding="utf-8")
    docs = [line for line in text.splitlines() if line.strip()][:400]
    for doc in docs:
        ids = np.array([1] + sp.encode(doc))
        counted = int(tables.count_bytes(ids[:-1], ids[1:]).sum())
        assert counted == len(sp.decode(ids[1:].tolist()).encode("utf-8")), doc[:60]
