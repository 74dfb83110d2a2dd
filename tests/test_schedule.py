"""shared/schedule.py against the official train_gpt.py formulas, written out here independently."""
import dataclasses

import numpy as np
import pytest

from shared import loop, schedule
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


# ---- WARMDOWN_FRAC, MIN_LR, GPTQ_RESERVE_SECONDS (RECORD_STACK.md §5.5) ----
RECORD = Hyperparameters.from_env({"PRESET": "record"})


def record_lr_mul(frac: float, warmdown_frac: float = 0.85, min_lr: float = 0.10) -> float:
    """The record's lr_mul, transcribed: 1 before 1 - WARMDOWN_FRAC, then max((1 - frac)/WARMDOWN_FRAC, MIN_LR)."""
    if frac < 1 - warmdown_frac:
        return 1.0
    return max((1 - frac) / warmdown_frac, min_lr)


def old_lr_multiplier(cfg: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """shared/schedule.py's lr_multiplier before WARMDOWN_FRAC, copied verbatim."""
    if step >= cfg.iterations:
        return 0.0
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        return (cfg.iterations - step) / cfg.warmdown_iters if step >= start else 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = cfg.warmdown_iters * step_ms
    remaining_ms = max(1000.0 * cfg.max_wallclock_seconds - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def check_record_schedule() -> None:
    """The record's numbers (§5.5), each by hand; a plain function so the fault tests can run it too."""
    assert (RECORD.warmdown_frac, RECORD.min_lr, RECORD.gptq_reserve_seconds) == (0.85, 0.10, 0.5)
    assert (RECORD.max_wallclock_seconds, RECORD.iterations, RECORD.warmup_steps) == (600.0, 20_000, 20)
    budget = 599_500.0  # ms: 600 s less the 0.5 s reserve
    assert training_fraction(RECORD, 4900, budget) == 1.0
    assert training_fraction(RECORD, 7, 0.35 * budget) == pytest.approx(0.35, rel=1e-15)
    # full rate up to frac 0.15; at 0.15 the decay starts at (1 - 0.15)/0.85 = 1.0
    assert lr_multiplier(RECORD, 100, 0.1499 * budget) == 1.0
    assert lr_multiplier(RECORD, 100, 0.15 * budget) == pytest.approx(1.0, rel=1e-12)
    # at the loop switch (frac 0.35): 0.65/0.85 = 0.7647 (the log's lr_mul ~0.765)
    assert lr_multiplier(RECORD, 2172, 0.35 * budget) == pytest.approx(0.65 / 0.85, rel=1e-12)
    assert lr_multiplier(RECORD, 3000, 0.9 * budget) == pytest.approx(0.1 / 0.85, rel=1e-12)  # 0.1176, above floor
    # the floor is reached at 1 - 0.1*0.85 = 0.915 and held to the end
    assert lr_multiplier(RECORD, 4500, 0.915 * budget) == pytest.approx(0.1, rel=1e-9)
    for frac in (0.95, 0.99, 1.0, 1.2):
        assert lr_multiplier(RECORD, 4800, frac * budget) == pytest.approx(0.1, rel=1e-12), frac
    for frac in np.linspace(0.0, 1.05, 211):
        assert lr_multiplier(RECORD, 1000, frac * budget) == pytest.approx(record_lr_mul(frac), rel=1e-12), frac
    assert lr_multiplier(RECORD, 20_000, 0.5 * budget) == 0.0  # past ITERATIONS, as before


def test_the_record_schedule_by_hand():
    check_record_schedule()


def _floor_before_decay(cfg, frac):
    return 1.0 if frac < 1.0 - cfg.warmdown_frac else max(1.0 - frac, cfg.min_lr) / cfg.warmdown_frac


def _fraction_of_the_full_cap(cfg, step, elapsed_ms):
    return elapsed_ms / (1000.0 * cfg.max_wallclock_seconds) if cfg.max_wallclock_seconds > 0 else step / cfg.iterations


@pytest.mark.parametrize("name,fault", [("fraction_warmdown", _floor_before_decay),
                                        ("training_fraction", _fraction_of_the_full_cap)])
def test_injected_schedule_faults_are_caught(monkeypatch, name, fault):
    """Hand-port mistakes: the floor taken before the decay, or the fraction of the cap ignoring the reserve."""
    monkeypatch.setattr(schedule, name, fault)
    with pytest.raises(AssertionError):
        check_record_schedule()


def test_fraction_warmdown_by_steps_without_a_cap():
    # 100 steps, warmdown over the last half, floor 0.1: full rate to step 49, (100 - s)/50 from 50, 0.1 from 95
    cfg = _cfg(iterations=100, max_wallclock_seconds=0.0, warmdown_frac=0.5, min_lr=0.1)
    got = [lr_multiplier(cfg, s, 1e9) for s in range(101)]  # the clock is ignored without a cap
    want = [1.0] * 50 + [max((100 - s) / 50, 0.1) for s in range(50, 100)] + [0.0]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert (got[50], got[90], got[95], got[99]) == pytest.approx((1.0, 0.2, 0.1, 0.1))
    no_floor = dataclasses.replace(cfg, min_lr=0.0)
    assert lr_multiplier(no_floor, 99, 0.0) == pytest.approx(0.02)  # 1/50: MIN_LR=0 decays toward 0


def test_fraction_warmdown_by_wallclock_with_a_reserve():
    # a 10 s cap less 2 s: budget 8,000 ms; WARMDOWN_FRAC 1 decays from the start, 1 - elapsed/8,000
    cfg = _cfg(iterations=1000, max_wallclock_seconds=10.0, gptq_reserve_seconds=2.0, warmdown_frac=1.0)
    assert training_fraction(cfg, 3, 2_000.0) == 0.25
    assert [lr_multiplier(cfg, 3, ms) for ms in (0.0, 2_000.0, 6_000.0, 8_000.0, 9_000.0)] == \
        pytest.approx([1.0, 0.75, 0.25, 0.0, 0.0], abs=1e-15)  # past the budget: 0 (MIN_LR 0), never negative
    # the loop switch reads the same budget: ENABLE_LOOPING_AT 0.5 of 8,000 ms is 4,000 ms (5,000 of the cap)
    loops = dataclasses.replace(cfg, num_loops=1, enable_looping_at=0.5)
    assert not looping_active(loops, 3, 3_999.9) and looping_active(loops, 3, 4_000.0)


def test_the_reserve_shortens_the_timed_warmdown_iters_schedule_too():
    # WARMDOWN_ITERS=10 at 500 ms a step (5,000 ms) before a 50 s budget (52 s cap less 2 s): at 47,000 ms
    # 3,000 ms remain, lr 3,000/(10*470); the reserve-less run still has 5,000 > 4,700 ms: full rate
    cfg = _cfg(iterations=20_000, warmdown_iters=10, max_wallclock_seconds=52.0, gptq_reserve_seconds=2.0)
    assert lr_multiplier(cfg, 100, 47_000.0) == pytest.approx(3_000.0 / 4_700.0)
    assert lr_multiplier(dataclasses.replace(cfg, gptq_reserve_seconds=0.0), 100, 47_000.0) == 1.0


def test_warmdown_frac_zero_is_the_old_schedule_bit_for_bit():
    rng = np.random.default_rng(1)
    configs = [_cfg(iterations=it, warmdown_iters=wd, max_wallclock_seconds=cap)
               for it in (1, 20, 300, 20_000) for wd in (0, 5, 100, 1200) for cap in (0.0, 0.5, 52.0, 600.0)]
    configs += [Hyperparameters.from_env({"PRESET": p}) for p in ("baseline", "tiny")]
    for cfg in configs:
        assert cfg.warmdown_frac == 0.0 and cfg.gptq_reserve_seconds == 0.0
        steps = np.unique(np.concatenate([np.arange(0, min(cfg.iterations + 3, 400)),
                                          rng.integers(0, cfg.iterations + 3, 100)]))
        for step in steps.tolist():
            for elapsed in (0.0, 1.0, 123.456 * step, *rng.uniform(0.0, 1300.0 * cfg.max_wallclock_seconds + 1, 4)):
                assert lr_multiplier(cfg, step, elapsed) == old_lr_multiplier(cfg, step, elapsed), (cfg, step, elapsed)
                if cfg.max_wallclock_seconds > 0:  # the fraction and the stop read the unchanged cap
                    assert training_fraction(cfg, step, elapsed) == elapsed / (1000.0 * cfg.max_wallclock_seconds)
                    assert schedule.train_budget_ms(cfg) == 1000.0 * cfg.max_wallclock_seconds


@pytest.mark.parametrize("env,knob", [
    ({"WARMDOWN_FRAC": "-0.1"}, "WARMDOWN_FRAC"), ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"),
    ({"WARMDOWN_FRAC": "0.5", "MIN_LR": "-0.1"}, "MIN_LR"), ({"WARMDOWN_FRAC": "0.5", "MIN_LR": "1.1"}, "MIN_LR"),
    ({"MIN_LR": "0.1"}, "MIN_LR"),  # a floor with no fraction schedule to floor would be silently ignored
    ({"GPTQ_RESERVE_SECONDS": "-1"}, "GPTQ_RESERVE_SECONDS"),
    ({"GPTQ_RESERVE_SECONDS": "600"}, "GPTQ_RESERVE_SECONDS"),
    ({"GPTQ_RESERVE_SECONDS": "-1", "MAX_WALLCLOCK_SECONDS": "0"}, "GPTQ_RESERVE_SECONDS")])
def test_schedule_knob_errors_name_the_knob(env, knob):
    with pytest.raises(ValueError, match=f"^{knob} ") as err:
        Hyperparameters.from_env(env)
    assert "\n" not in str(err.value)


def test_schedule_knobs_accept_their_edges():
    for env in ({"WARMDOWN_FRAC": "1", "MIN_LR": "1"}, {"WARMDOWN_FRAC": "0.85", "MIN_LR": "0"},
                {"GPTQ_RESERVE_SECONDS": "599.5"}, {"GPTQ_RESERVE_SECONDS": "30", "MAX_WALLCLOCK_SECONDS": "0"}):
        Hyperparameters.from_env(env)


def test_mac_uses_the_records_fraction_warmdown():
    mac = Hyperparameters.from_env({"PRESET": "mac"})
    assert (mac.warmdown_frac, mac.min_lr, mac.max_wallclock_seconds) == (0.85, 0.10, 600.0)


# ---- the wallclock stop in shared/loop.py reads the same budget ----
class _FakeBackend:
    """run_training's Backend calls, one rank; each train_step advances a fake clock by 125 ms (exact in binary)."""
    def __init__(self, clock: list):
        self.clock, self.lrs = clock, []

    def sync(self):
        pass

    def set_looping(self, looping):
        pass

    def evaluate(self, data, windows):
        return type("Acc", (), {"val_loss": 1.0, "val_bpb": 1.0})()

    def train_step(self, micro, lr_scale, momentum):
        self.lrs.append(lr_scale)
        self.clock[0] += 0.125
        return 1.0

    def any_rank(self, flag):
        return flag

    def max_over_ranks(self, value):
        return value


class _FakeLoader:
    grad_accum_steps = 1

    def next_micro_batch(self, tokens, seq_len):
        return None


def _run_fake(monkeypatch, **kw) -> _FakeBackend:
    from shared.runlog import RunLog
    clock = [0.0]
    monkeypatch.setattr(loop, "time", type("T", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    cfg = _cfg(iterations=1000, val_loss_every=0, train_log_every=0, checkpoint_every=0, **kw)
    be, st = _FakeBackend(clock), loop.TrainState(0, 0.0, _FakeLoader())
    loop.run_training(be, st, cfg, RunLog("t", enabled=False), None, {})
    assert len(be.lrs) == st.step
    return be


def check_capped_run_with_a_reserve(monkeypatch) -> None:
    # 1 s cap less 0.5 s: the step ending at 500 ms is the last (4 steps of 125 ms), step k at lr of frac k*125/500
    be = _run_fake(monkeypatch, max_wallclock_seconds=1.0, gptq_reserve_seconds=0.5, warmdown_frac=0.85, min_lr=0.1)
    assert len(be.lrs) == 4
    assert be.lrs == pytest.approx([record_lr_mul(125 * k / 500) for k in range(4)], rel=1e-12)


def test_a_capped_run_stops_at_the_cap_less_the_reserve(monkeypatch):
    check_capped_run_with_a_reserve(monkeypatch)
    assert len(_run_fake(monkeypatch, max_wallclock_seconds=1.0).lrs) == 8  # no reserve: the full second


def test_a_stop_at_the_full_cap_is_caught(monkeypatch):
    def full_cap(be, cfg, train_ms):
        return cfg.max_wallclock_seconds > 0 and be.any_rank(train_ms >= 1000.0 * cfg.max_wallclock_seconds)
    monkeypatch.setattr(loop, "over_cap", full_cap)
    with pytest.raises(AssertionError):
        check_capped_run_with_a_reserve(monkeypatch)
