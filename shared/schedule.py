"""Schedules both trainers apply: pure functions of the config, the step and the elapsed time."""
from __future__ import annotations

import numpy as np

from shared.config import Hyperparameters


def lr_multiplier(cfg: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """The learning-rate multiplier of all optimizers: WARMDOWN_FRAC's schedule when set, else WARMDOWN_ITERS'.

    Past ITERATIONS the multiplier is 0 (the official code returns 1 there; a resumed run past its end must not
    train at full rate)."""
    if step >= cfg.iterations:
        return 0.0
    if cfg.warmdown_frac > 0:
        return fraction_warmdown(cfg, training_fraction(cfg, step, elapsed_ms))
    return iters_warmdown(cfg, step, elapsed_ms)


def fraction_warmdown(cfg: Hyperparameters, frac: float) -> float:
    """The record's schedule (RECORD_STACK.md §5.5): full rate until the training fraction reaches
    1 - WARMDOWN_FRAC, then linear to 0 at frac 1, floored at MIN_LR (the floor applies to the decayed value:
    with the record's 0.85 and 0.10 it is reached at frac 1 - 0.1*0.85 = 0.915)."""
    if frac < 1.0 - cfg.warmdown_frac:
        return 1.0
    return max((1.0 - frac) / cfg.warmdown_frac, cfg.min_lr)


def iters_warmdown(cfg: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Linear warmdown to 0 over the last WARMDOWN_ITERS steps (the official schedule).

    With a wallclock cap the warmdown is timed: it starts when the remaining training budget equals
    WARMDOWN_ITERS steps at the average step time so far."""
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        return (cfg.iterations - step) / cfg.warmdown_iters if step >= start else 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = cfg.warmdown_iters * step_ms
    remaining_ms = max(train_budget_ms(cfg) - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def train_budget_ms(cfg: Hyperparameters) -> float:
    """The timed training budget: MAX_WALLCLOCK_SECONDS less GPTQ_RESERVE_SECONDS, kept for quantization that
    reads training data (the record's 599.5 s of 600, §5.5). Only meaningful with a cap."""
    return 1000.0 * (cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds)


def training_fraction(cfg: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """How far training is: elapsed / budget under a wallclock cap (the record's frac, §5.5), else
    step / ITERATIONS. The LR schedule, the loop switch and the wallclock stop read the same budget.

    elapsed_ms must be the value every rank agreed on (shared/loop.py takes the max over ranks)."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_ms / train_budget_ms(cfg)
    return step / cfg.iterations


def looping_active(cfg: Hyperparameters, step: int, elapsed_ms: float) -> bool:
    """Depth recurrence runs from the first step whose training fraction reaches ENABLE_LOOPING_AT (§3.2).

    A resumed run gets the same answer from its checkpoint's (step, train_ms): nothing more is stored."""
    return cfg.num_loops > 0 and training_fraction(cfg, step, elapsed_ms) >= cfg.enable_looping_at


def muon_momentum(cfg: Hyperparameters, step: int) -> float:
    """Momentum warm-up MUON_MOMENTUM_WARMUP_START -> MUON_MOMENTUM over MUON_MOMENTUM_WARMUP_STEPS."""
    steps = cfg.muon_momentum_warmup_steps
    frac = min(step / steps, 1.0) if steps > 0 else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def should_validate(cfg: Hyperparameters, step: int, last_step: bool) -> bool:
    return last_step or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0)


def should_log_train(cfg: Hyperparameters, step: int, stopping: bool) -> bool:
    return cfg.train_log_every > 0 and (step <= 10 or step % cfg.train_log_every == 0 or stopping)


def should_checkpoint(cfg: Hyperparameters, step: int) -> bool:
    return cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0


def ema_step(ema: np.ndarray, theta: np.ndarray, decay: float) -> np.ndarray:
    """One EMA update of the weights (RECORD_STACK.md §5.6), the numpy reference both trainers match bit for bit:
    d*ema + (1-d)*theta in fp32, in that order, with d and 1-d (computed in float64) each rounded to fp32 once.
    Two products and one sum, each rounded: no fused multiply-add, no lerp (ema + (1-d)*(theta-ema) rounds
    differently)."""
    d, rest = np.float32(decay), np.float32(1.0 - decay)
    return d * ema.astype(np.float32) + rest * theta.astype(np.float32)
