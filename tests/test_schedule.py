"""shared/schedule.py against the official train_gpt.py formulas, written out here independently."""
import dataclasses

import numpy as np
import pytest

from shared.config import Hyperparameters
from shared.schedule import (looping_active, lr_multiplier, muon_momentum, should_checkpoint, should_log_train,
                             should_validate, training_fraction)

BASE = Hyperparameters()


def _cfg(**kw) -> Hyperparameters:
    return dataclasses.replace(BASE, **kw)


def official_lr_mul(iterations: int, warmdown_iters: int, max_wallclock_seconds: float, step: int,
                    elapsed_ms: float) -> float:
    """openai/parameter-golf train_gpt.py lr_mul, transcribed (cap in ms as the script computes it)."""
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_seconds <= 0:
        warmdown_start = max(iterations - warmdown_iters, 0)
        if warmdown_start <= step < iterations:
            return max((iterations - step) / max(warmdown_iters, 1), 0.0)
        return 1.0
    cap_ms = 1000.0 * max_wallclock_seconds
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def official_momentum(start: float, momentum: float, warmup_steps: int, step: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * momentum


@pytest.mark.parametrize("iterations,warmdown", [(20, 5), (20, 20), (20, 50), (1, 1), (100, 0), (20_000, 1200)])
def test_uncapped_lr_matches_the_official_formula_at_every_step(iterations, warmdown):
    cfg = _cfg(iterations=iterations, warmdown_iters=warmdown, max_wallclock_seconds=0.0)
    for step in range(iterations):
        got = lr_multiplier(cfg, step, elapsed_ms=123.0 * step)  # elapsed is ignored without a cap
        want = official_lr_mul(iterations, warmdown, 0.0, step, 123.0 * step)
        assert got == pytest.approx(want, rel=1e-12, abs=0), (iterations, warmdown, step, got, want)


def test_capped_lr_matches_the_official_formula_on_random_points():
    rng = np.random.default_rng(0)
    checked_warmdown = 0
    for _ in range(2000):
        iterations = int(rng.integers(1, 5000))
        warmdown = int(rng.integers(0, 400))
        cap_s = float(rng.uniform(0.5, 60.0))
        step = int(rng.integers(0, iterations))
        elapsed = float(rng.uniform(0.0, 1.3 * 1000 * cap_s))
        cfg = _cfg(iterations=iterations, warmdown_iters=warmdown, max_wallclock_seconds=cap_s)
        want = official_lr_mul(iterations, warmdown, cap_s, step, elapsed)
        got = lr_multiplier(cfg, step, elapsed)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (iterations, warmdown, cap_s, step, elapsed)
        checked_warmdown += 0.0 < want < 1.0
    assert checked_warmdown > 50  # the draw really exercised the timed warmdown, not just the flat part


def test_uncapped_lr_spot_values_by_hand():
    # iterations=20, warmdown=5: warmdown starts at step 15 with (20-15)/5 = 1.0, then 4/5, ..., 1/5 at step 19.
    cfg = _cfg(iterations=20, warmdown_iters=5, max_wallclock_seconds=0.0)
    assert [lr_multiplier(cfg, s, 0.0) for s in (0, 14, 15, 16, 17, 18, 19)] == pytest.approx(
        [1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2])
    # warmdown longer than the run: the decay starts at step 0 at 20/50.
    cfg = _cfg(iterations=20, warmdown_iters=50, max_wallclock_seconds=0.0)
    assert lr_multiplier(cfg, 0, 0.0) == pytest.approx(0.4)
    assert lr_multiplier(cfg, 10, 0.0) == pytest.approx(0.2)


def test_capped_lr_spot_values_by_hand():
    cfg = _cfg(iterations=20_000, warmdown_iters=10, max_wallclock_seconds=52.0)
    # step 100 at 50,000 ms: 500 ms a step, warmdown 10*500 = 5,000 ms; remaining 52,000-50,000 = 2,000 ms
    # <= 5,000, so lr = 2,000/5,000 = 0.4.
    assert lr_multiplier(cfg, 100, 50_000.0) == pytest.approx(0.4)
    # step 100 at 44,000 ms: 440 ms a step, warmdown 4,400 ms; remaining 8,000 ms > 4,400: full rate.
    assert lr_multiplier(cfg, 100, 44_000.0) == 1.0
    # step 100 at 47,000 ms: 470 ms a step, warmdown 4,700 ms; remaining 5,000 > 4,700: still full rate.
    assert lr_multiplier(cfg, 100, 47_000.0) == 1.0
    # step 200 at 51,000 ms: 255 ms a step, warmdown 2,550 ms; remaining 1,000 ms: 1,000/2,550.
    assert lr_multiplier(cfg, 200, 51_000.0) == pytest.approx(1000.0 / 2550.0)
    # past the cap: remaining is clamped at 0, so lr 0 (not negative).
    assert lr_multiplier(cfg, 100, 53_000.0) == 0.0
    # step 0, nothing elapsed: step time 0, warmdown 0 ms, remaining 52,000 > 0: full rate.
    assert lr_multiplier(cfg, 0, 0.0) == 1.0


def test_no_warmdown_means_full_rate_with_or_without_cap():
    for cap in (0.0, 10.0):
        cfg = _cfg(iterations=50, warmdown_iters=0, max_wallclock_seconds=cap)
        assert [lr_multiplier(cfg, s, 9_999.0) for s in range(50)] == [1.0] * 50


@pytest.mark.parametrize("cap", [0.0, 600.0])
def test_past_iterations_the_lr_is_zero_our_deliberate_deviation(cap):
    # The official uncapped formula gives 1.0 for step >= iterations (outside the warmdown window);
    # a resumed run past its end must not train, so ours is 0.0 there, with or without a cap.
    cfg = _cfg(iterations=20, warmdown_iters=5, max_wallclock_seconds=cap)
    assert official_lr_mul(20, 5, 0.0, 20, 0.0) == 1.0
    for step in (20, 21, 100):
        assert lr_multiplier(cfg, step, 1.0) == 0.0, step
    assert lr_multiplier(_cfg(iterations=20, warmdown_iters=0, max_wallclock_seconds=cap), 20, 1.0) == 0.0


def test_muon_momentum_spot_values_by_hand():
    cfg = _cfg(muon_momentum_warmup_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=500)
    # step 100: frac 0.2 -> 0.8*0.85 + 0.2*0.95 = 0.68 + 0.19 = 0.87; step 250: halfway, 0.90.
    assert muon_momentum(cfg, 0) == pytest.approx(0.85)
    assert muon_momentum(cfg, 100) == pytest.approx(0.87)
    assert muon_momentum(cfg, 250) == pytest.approx(0.90)
    assert muon_momentum(cfg, 500) == pytest.approx(0.95)
    assert muon_momentum(cfg, 5000) == pytest.approx(0.95)  # held after the warm-up, never past it
    no_warmup = _cfg(muon_momentum_warmup_start=0.5, muon_momentum=0.95, muon_momentum_warmup_steps=0)
    assert muon_momentum(no_warmup, 0) == pytest.approx(0.95)
    assert muon_momentum(no_warmup, 7) == pytest.approx(0.95)


@pytest.mark.parametrize("start,momentum,warmup", [(0.85, 0.95, 500), (0.0, 0.9, 3), (0.95, 0.5, 10), (0.6, 0.6, 7)])
def test_muon_momentum_matches_the_official_formula(start, momentum, warmup):
    cfg = _cfg(muon_momentum_warmup_start=start, muon_momentum=momentum, muon_momentum_warmup_steps=warmup)
    for step in range(0, 3 * warmup + 2):
        assert muon_momentum(cfg, step) == pytest.approx(official_momentum(start, momentum, warmup, step), abs=1e-12)


def test_validation_cadence():
    cfg = _cfg(val_loss_every=100)
    assert [s for s in range(0, 301) if should_validate(cfg, s, last_step=False)] == [0, 100, 200, 300]
    assert should_validate(cfg, 137, last_step=True)
    off = _cfg(val_loss_every=0)
    assert not any(should_validate(off, s, last_step=False) for s in range(0, 301))
    assert should_validate(off, 137, last_step=True)  # the final score is always taken


def test_train_log_cadence():
    cfg = _cfg(train_log_every=200)
    logged = [s for s in range(1, 700) if should_log_train(cfg, s, stopping=False)]
    assert logged == list(range(1, 11)) + [200, 400, 600]  # the first ten steps, then every 200
    assert should_log_train(cfg, 437, stopping=True)
    off = _cfg(train_log_every=0)
    assert not any(should_log_train(off, s, stopping=st) for s in range(1, 50) for st in (False, True))


def test_checkpoint_cadence():
    cfg = _cfg(checkpoint_every=50)
    assert [s for s in range(1, 201) if should_checkpoint(cfg, s)] == [50, 100, 150, 200]
    off = _cfg(checkpoint_every=0)
    assert not any(should_checkpoint(off, s) for s in range(0, 201))


def test_training_fraction_is_wallclock_under_a_cap_else_steps():
    capped = _cfg(iterations=20_000, max_wallclock_seconds=600.0)
    assert training_fraction(capped, 7, 210_000.0) == pytest.approx(0.35)  # the step count does not matter
    assert training_fraction(capped, 19_000, 0.0) == 0.0
    uncapped = _cfg(iterations=200, max_wallclock_seconds=0.0)
    assert training_fraction(uncapped, 70, 1e9) == pytest.approx(0.35)  # the clock does not matter


def test_looping_switches_on_at_the_first_step_reaching_the_fraction():
    # the record: ENABLE_LOOPING_AT=0.35 of a 600 s cap, i.e. from 210,000 ms on (RECORD_STACK.md §5.5)
    cfg = _cfg(num_loops=2, enable_looping_at=0.35, iterations=20_000, max_wallclock_seconds=600.0)
    assert not looping_active(cfg, 2177, 209_999.9)
    assert looping_active(cfg, 2178, 210_000.0) and looping_active(cfg, 4900, 599_000.0)
    # by steps without a cap: steps 0..6 of 20 off (6/20 = 0.3), 7.. on (7/20 = 0.35)
    steps = _cfg(num_loops=1, enable_looping_at=0.35, iterations=20, max_wallclock_seconds=0.0)
    assert [looping_active(steps, s, 0.0) for s in range(20)] == [False] * 7 + [True] * 13
    # ENABLE_LOOPING_AT=0 loops from the first step, =1 only once training is over; NUM_LOOPS=0 never loops
    assert looping_active(dataclasses.replace(steps, enable_looping_at=0.0), 0, 0.0)
    assert not any(looping_active(dataclasses.replace(steps, enable_looping_at=1.0), s, 0.0) for s in range(20))
    assert not any(looping_active(dataclasses.replace(steps, num_loops=0), s, 0.0) for s in range(20))
