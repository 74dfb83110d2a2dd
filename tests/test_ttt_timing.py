"""shared/ttt.py's timing: each phase's seconds, the throughput and the projection to the full validation split.

Time comes from a fake clock that only the test's engine advances (a cost per input position of each forward and
per global SGD step), so every expected number is computed here from the engine's own bill, independently of the
driver's bookkeeping."""
from __future__ import annotations

import re

import numpy as np
import pytest

from shared import ttt
from tests.test_ttt import UnigramEngine, cfg_for, make_data

LENGTHS = [3, 30, 9, 41, 4, 20, 45, 12, 25, 2, 18, 35]
TOKENS = sum(LENGTHS) + len(LENGTHS) - 1  # predictions: each doc's tokens after its BOS, then the next BOS (not last)


class FakeClock:
    def __init__(self):
        self.now = 1000.0  # not 0: the driver must take differences

    def __call__(self) -> float:
        return self.now


class BilledEngine(UnigramEngine):
    """The unigram engine, charging `per_position` seconds per input position of a forward, `per_step` per SGD step."""

    def __init__(self, clock: FakeClock, per_position: float, per_step: float):
        super().__init__()
        self.clock, self.per_position, self.per_step = clock, per_position, per_step
        self.score_bill = self.sgd_bill = 0.0

    def forward(self, lora, x, y, w):
        self.clock.now += x.size * self.per_position
        self.score_bill += x.size * self.per_position
        return super().forward(lora, x, y, w)

    def global_step(self, x, y, lr, first):
        self.clock.now += self.per_step
        self.sgd_bill += self.per_step
        return super().global_step(x, y, lr, first)


def run(per_position: float, per_step: float = 2.0, **kw):
    clock, lines = FakeClock(), []
    engine = BilledEngine(clock, per_position, per_step)
    cfg = cfg_for(**kw)
    res = ttt.evaluate_ttt(engine, make_data(LENGTHS), cfg, log=lines.append, clock=clock)
    return engine, res, lines


def fields(line: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w+):(\S+)", line))


def test_projection_scales_scoring_by_tokens_and_adds_sgd_seconds():
    engine, res, lines = run(1e-3, phased_ttt_num_phases=2, phased_ttt_prefix_docs=6)
    tokens = TOKENS
    assert engine.sgd_bill > 0 and engine.score_bill > 0
    want = engine.score_bill * (tokens / len(LENGTHS) * ttt.FULL_VAL_DOCS) / tokens + engine.sgd_bill
    proj = [fields(x) for x in lines if x.startswith("ttt_projection ")]
    assert len(proj) == 1, lines
    p = proj[0]
    assert int(p["docs"]) == len(LENGTHS) and int(p["tokens"]) == tokens
    assert float(p["seconds"]) == pytest.approx(engine.score_bill + engine.sgd_bill, abs=0.01)
    assert float(p["docs_per_s"]) == pytest.approx(len(LENGTHS) / (engine.score_bill + engine.sgd_bill), abs=0.005)
    assert float(p["projected_50k_docs_s"]) == pytest.approx(want, abs=0.1)
    assert res.projection.projected_s == pytest.approx(want, rel=1e-9)  # clock differences round
    assert p["full_tokens_from"] == "per_doc" and p["world_size"] == "1" and p["budget_s"] == "600"
    assert p["sgd_phases"] == "2/2"


def test_each_phase_is_timed():
    engine, _, lines = run(1e-3, phased_ttt_num_phases=2, phased_ttt_prefix_docs=6)
    score = [float(fields(x)["seconds"]) for x in lines if x.startswith("ttt_timing:score")]
    sgd = [float(fields(x)["seconds"]) for x in lines if x.startswith("ttt_timing:global_sgd")]
    assert len(score) == 3 and len(sgd) == 2, lines
    assert sum(score) == pytest.approx(engine.score_bill, abs=0.02)
    assert sum(sgd) == pytest.approx(engine.sgd_bill, abs=0.02)
    phase_lines = [fields(x) for x in lines if x.startswith("ttt_phase:")]
    assert sum(int(f["sgd_steps"]) for f in phase_lines) * 2.0 == pytest.approx(engine.sgd_bill)


def test_warning_fires_only_past_the_budget():
    tokens = TOKENS
    _, slow, slow_lines = run(1.0, phased_ttt_num_phases=0)
    assert slow.projection.projected_s > ttt.EVAL_BUDGET_S
    assert any(x.startswith("WARNING ttt_projection") for x in slow_lines), slow_lines
    _, fast, fast_lines = run(1e-9, phased_ttt_num_phases=0)
    assert fast.projection.projected_s < ttt.EVAL_BUDGET_S
    assert not any("WARNING" in x for x in fast_lines), fast_lines
    assert fast.projection.tokens == tokens


def test_full_split_loaded_uses_its_own_token_count():
    # all 50,000 documents in memory: the split's predictions, not an extrapolation; scored in full, it is the run
    p = ttt.project(docs=ttt.FULL_VAL_DOCS, tokens=47_851_520, score_s=400.0, sgd_s=85.0, seconds=485.0,
                    loaded_docs=ttt.FULL_VAL_DOCS, loaded_tokens=47_851_520, world_size=8)
    assert p.full_tokens_from == "loaded" and p.projected_s == pytest.approx(485.0)
    assert p.warning() is None
    # a 1,000-doc prefix with 20 tokens per doc, scored in 10 s: 50x the scoring time
    q = ttt.project(docs=1000, tokens=20_000, score_s=10.0, sgd_s=3.0, seconds=13.0, loaded_docs=1000,
                    loaded_tokens=20_000, world_size=1)
    assert q.full_tokens == pytest.approx(1_000_000) and q.projected_s == pytest.approx(503.0)
    assert np.isclose(float(fields(q.line())["projected_50k_docs_s"]), 503.0)


def test_bench_plan_counts_the_chunk_tensors_the_driver_builds():
    """bench/ttt_gpu.py projects from the plan's chunk sizes: they must be the rows x width evaluate_ttt hands to
    the engine (here counted by the bench's own TimedEngine around the unigram engine)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import ttt_gpu
    cfg = cfg_for(phased_ttt_num_phases=0)
    data = make_data(LENGTHS)
    engine = ttt_gpu.TimedEngine(UnigramEngine(), 1e9)
    ttt.evaluate_ttt(engine, data, cfg)
    n_pred = ttt.find_docs(data.tokens, data.bos_id)[:, 1]
    assert sorted(engine.positions) == sorted(ttt_gpu.plan_chunks(n_pred, cfg).tolist())
    assert len(engine.batch_starts) == -(-len(LENGTHS) // cfg.ttt_batch_size)


def test_bench_plan_counts_the_global_sgd_steps_the_driver_takes():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import ttt_gpu
    engine, res, lines = run(1e-3, phased_ttt_num_phases=2, phased_ttt_prefix_docs=6)
    n_pred = res.docs[:, 1]
    taken = sum(int(fields(x)["sgd_steps"]) for x in lines if x.startswith("ttt_phase:"))
    assert taken > 0 and ttt_gpu.plan_sgd_steps(n_pred, cfg_for(phased_ttt_num_phases=2,
                                                                phased_ttt_prefix_docs=6)) == taken
