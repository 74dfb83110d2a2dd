"""shared/ttt.py: documents, batches, streams, chunk windows, phases, the ledger's legality check and the driver.

The driver tests run a numpy engine (an add-one unigram model per document slot that learns from each update):
it adapts, so an update that came too early changes scores, and it runs in milliseconds."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest

from shared import ttt
from shared.bpb import EvalData
from shared.config import preset

BOS = 1
VOCAB = 16


def make_data(lengths, seed=0) -> EvalData:
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([np.concatenate([[BOS], rng.integers(2, VOCAB, n)]) for n in lengths]).astype(np.int64)
    return EvalData(tokens, None, rng.integers(1, 5, tokens.size - 1).astype(np.int32), BOS)


def cfg_for(**kw):
    base = dict(ttt_enabled=True, ttt_chunk_size=4, ttt_eval_seq_len=12, ttt_batch_size=3, ttt_streams=3,
                phased_ttt_num_phases=0, phased_ttt_prefix_docs=4, global_ttt_chunk_tokens=24)
    return dataclasses.replace(preset("tiny"), **dict(base, **kw))


class UnigramEngine:
    """nll = -log((count[slot, y] + 1) / (total[slot] + V)); update adds the weighted targets to the counts;
    A (a per-slot prior, warm-started) is the count table a reset keeps when given none; global steps add to a
    shared table."""

    def __init__(self):
        self.base = np.zeros(VOCAB)

    def new_lora(self, a_init):
        return {"a": np.zeros((a_init[0]["q"].shape[0], VOCAB)), "b": None, "pending": None}

    def reset(self, lora, a_init):
        lora["pending"] = None
        if a_init is not None:
            lora["a"][:] = 0

    def forward(self, lora, x, y, w):
        counts = lora["a"][:, None, :] + self.base[None, None, :]  # (B, 1, V)
        p = (np.take_along_axis(np.broadcast_to(counts, (*y.shape, VOCAB)), y[..., None], -1)[..., 0] + 1)
        lora["pending"] = (y, w)
        return -np.log(p / (counts.sum(-1) + VOCAB))

    def update(self, lora):
        y, w = lora["pending"]
        for i in range(y.shape[0]):
            np.add.at(lora["a"][i], y[i], w[i])

    def global_step(self, x, y, lr, first):
        np.add.at(self.base, y.ravel(), lr)
        return 0.0

    def reduce_sum(self, values):
        return values


def test_find_docs_include_next_bos_and_cover_every_target():
    tokens = np.array([5, 1, 3, 4, 1, 1, 7, 1])
    docs = ttt.find_docs(tokens, BOS)
    assert docs.tolist() == [[0, 1], [1, 3], [4, 1], [5, 2]]  # a leading tail, "BOS BOS", the last ends at the end
    covered = np.concatenate([np.arange(s, s + n) for s, n in docs])
    assert covered.tolist() == list(range(tokens.size - 1))


def test_batch_queue_sorted_by_length_longest_batch_first():
    docs = np.array([[0, n] for n in (5, 1, 9, 3, 7, 2, 8)])
    queue = ttt.batch_queue(docs, 3)
    assert [b.docs.tolist() for b in queue] == [[2], [0, 4, 6], [1, 5, 3]]  # lengths [9], [5, 7, 8], [1, 2, 3]
    assert [b.index for b in queue] == [2, 1, 0]


def test_streams_split_whole_streams_over_any_world_size():
    for world in (1, 2, 3):
        owned = sorted(s for r in range(world) for s in ttt.rank_streams(3, r, world))
        assert owned == [0, 1, 2]
    assert ttt.stream_items(7, 3, 1) == [1, 4]


@pytest.mark.parametrize("n_pred,chunk,seq_len", [(1, 4, 12), (13, 4, 12), (30, 5, 12), (12, 4, 4)])
def test_chunk_rows_score_every_prediction_once_with_own_context(n_pred, chunk, seq_len):
    tokens = np.arange(100, 100 + n_pred + 3)
    docs = np.array([[2, n_pred]])
    seen = []
    for c in range(ttt.n_chunks(n_pred, chunk)):
        r = ttt.chunk_rows(tokens, docs, np.array([0]), c, chunk, seq_len, slots=2)
        assert r.x.shape[1] <= seq_len and not r.active[1] and not r.scored[1].any()
        n = int((r.x[0] != 0).sum())
        assert r.x[0, :n].tolist() == tokens[r.positions[0, r.scored[0]][-1] + 1 - n:][:n].tolist()
        assert (r.y[0][r.scored[0]] == tokens[r.positions[0][r.scored[0]] + 1]).all()
        assert r.x[0, 0] == tokens[max(2, 2 + min((c + 1) * chunk, n_pred) - seq_len)]  # the window's first token
        seen += r.positions[0][r.scored[0]].tolist()
        last = c == ttt.n_chunks(n_pred, chunk) - 1
        assert r.trains[0] != last and np.isclose(r.weights[0].sum(), 0.0 if last else 1.0)
    assert seen == list(range(2, 2 + n_pred))


def test_phase_boundaries_and_cuts():
    assert ttt.phase_boundaries(2500, 3) == [833, 1666, 2500]
    assert ttt.phase_boundaries(10, 0) == []
    queue = [ttt.Batch(i, np.arange(3 * i, 3 * i + 3)) for i in range(4)]
    assert ttt.phase_cuts(queue, [2, 3, 7]) == [1, 3]  # 2 and 3 docs both fit in the first batch


def test_global_sgd_lr_is_a_cosine_from_base_to_zero():
    lrs = [ttt.global_sgd_lr(1.0, c, 5) for c in range(5)]
    assert lrs[0] == 1.0 and abs(lrs[-1]) < 1e-12 and abs(lrs[2] - 0.5) < 1e-12
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_global_sgd_rows_concatenate_phase_docs():
    tokens = np.arange(40)
    docs = np.array([[0, 9], [10, 19], [30, 9]])
    rows = ttt.global_sgd_rows(tokens, docs, np.array([0, 1]), chunk_tokens=8, seq_len=4)
    stream = np.concatenate([tokens[0:10], tokens[10:30]])
    assert len(rows) == (stream.size - 1) // 8
    assert rows[0][0].ravel().tolist() == stream[:8].tolist() and rows[0][1].ravel().tolist() == stream[1:9].tolist()


# ---- the ledger ----
def legal_ledger() -> ttt.Ledger:
    led = ttt.Ledger(2)
    led.score(0, [0, 1])
    led.update(0, [0])
    led.score(1, [0])
    return led


def test_ledger_accepts_score_first_order():
    legal_ledger().check(np.array([2, 1]), np.array([0, 1]))


@pytest.mark.parametrize("fault", ["update_first", "score_twice", "score_after_update", "unscored", "global_early"])
def test_ledger_rejects_every_violation(fault):
    led = ttt.Ledger(2)
    if fault == "update_first":
        led.update(0, [0]), led.score(0, [0, 1]), led.score(1, [0])
    elif fault == "score_twice":
        led.score(0, [0, 1]), led.score(0, [0]), led.score(1, [0])
    elif fault == "score_after_update":  # an update on chunk 1 seen before chunk 1 was scored
        led.score(0, [0, 1]), led.events.append(("update", 1, np.array([0]))), led.score(1, [0])
    elif fault == "unscored":
        led.score(0, [0, 1])
    else:
        led.score(0, [0, 1]), led.global_update(np.array([0])), led.score(1, [0])
    with pytest.raises(ttt.TTTLegalityError):
        led.check(np.array([2, 1]), np.array([0, 1]))


# ---- the driver ----
LENGTHS = [3, 17, 9, 25, 4, 11, 30, 6, 14, 2]


def test_driver_scores_every_target_once_and_adapts():
    data, cfg = make_data(LENGTHS), cfg_for()
    res = ttt.evaluate_ttt(UnigramEngine(), data, cfg)
    assert res.acc.tokens == data.tokens.size - 1 and res.acc.bytes == data.target_bytes.sum()
    frozen = ttt.evaluate_ttt(UnigramEngine(), data, cfg_for(ttt_warm_start_a=False))
    assert res.acc.val_loss != frozen.acc.val_loss  # the warm start carries counts along a stream


def test_injected_update_before_score_fails_the_check(monkeypatch):
    def update_then_score(engine, lora, run, rows, doc_ids, c):
        nll = engine.forward(lora, rows.x, rows.y, rows.weights)
        if rows.trains.any():
            engine.update(lora)
            run.ledger.update(c, doc_ids[rows.trains[:doc_ids.size]])
        ttt.add_scores(run, rows, nll, doc_ids, c)

    monkeypatch.setattr(ttt, "score_then_update", update_then_score)
    with pytest.raises(ttt.TTTLegalityError, match="before it was scored"):
        ttt.evaluate_ttt(UnigramEngine(), make_data(LENGTHS), cfg_for())


def test_same_result_for_every_world_size():
    """Ranks own whole streams and sums are per document: simulated ranks' doc sums add up to one rank's, bit
    for bit (no phases: a phase's sync needs every rank at once)."""
    data, cfg = make_data(LENGTHS), cfg_for()
    one = ttt.evaluate_ttt(UnigramEngine(), data, cfg).doc_nll
    for world in (2, 3):
        parts = []
        for r in range(world):
            res = ttt.evaluate_ttt(UnigramEngine(), data, cfg, rank=r, world_size=world)
            parts.append(res.doc_nll)
        assert np.array_equal(np.sum(parts, axis=0), one)


class _Lora(dict):
    """A dict that a weak reference can follow."""


class LiveCountingEngine(UnigramEngine):
    """UnigramEngine that counts how many adapter sets are still referenced whenever a new one is made."""

    def __init__(self):
        super().__init__()
        self.made, self.most_alive = [], 0

    def new_lora(self, a_init):
        gc.collect()
        self.most_alive = max(self.most_alive, 1 + sum(r() is not None for r in self.made))
        lora = _Lora(super().new_lora(a_init))
        self.made.append(weakref.ref(lora))
        return lora


def test_one_adapter_set_alive_at_a_time():
    """A rank's streams run one after the other, so a stream's adapters are dropped after its last batch of a
    segment (keeping every stream's set, as a dict of them would, holds TTT_STREAMS of them: 40 GiB at the record's
    size on one GPU). Each stream still starts every segment with a brand-new set."""
    engine = LiveCountingEngine()
    cfg = cfg_for(phased_ttt_num_phases=2, global_ttt_lr=0.5)
    ttt.evaluate_ttt(engine, make_data(LENGTHS * 3), cfg)
    assert engine.most_alive == 1
    assert len(engine.made) > cfg.ttt_streams  # new sets after the phases too


def test_phases_train_base_only_on_scored_docs_and_change_later_scores():
    data = make_data(LENGTHS)
    plain = ttt.evaluate_ttt(UnigramEngine(), data, cfg_for())
    phased = ttt.evaluate_ttt(UnigramEngine(), data, cfg_for(phased_ttt_num_phases=2, global_ttt_lr=0.5))
    assert any(e[0] == "global" for e in phased.ledger.events)
    assert plain.acc.val_loss != phased.acc.val_loss


def test_config_rejects_bad_ttt_knobs():
    from shared.config import Hyperparameters
    with pytest.raises(ValueError, match="TTT_CHUNK_SIZE"):
        Hyperparameters.from_env({"PRESET": "tiny", "TTT_CHUNK_SIZE": "4096"})
    with pytest.raises(ValueError, match="TTT_BETA2"):
        Hyperparameters.from_env({"PRESET": "tiny", "TTT_BETA2": "1.0"})
    rec = preset("record")
    assert (rec.ttt_enabled, rec.ttt_lora_rank, rec.phased_ttt_num_phases, rec.ttt_weight_decay) == (True, 80, 3, 0.5)
