"""The framework-free training loop and schedules that both trainers must agree on."""
from __future__ import annotations

import math
import time
from typing import Callable, Protocol

from shared.config import Hyperparameters
from shared.runlog import step_line, val_line


def lr_multiplier(cfg: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Linear warmdown over the last WARMDOWN_ITERS steps (official schedule).

    With a wallclock cap the warmdown is timed: it starts when the remaining time
    equals WARMDOWN_ITERS steps at the average step time so far.
    """
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        if start <= step < cfg.iterations:
            return max((cfg.iterations - step) / max(cfg.warmdown_iters, 1), 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = cfg.warmdown_iters * step_ms
    remaining_ms = max(1000.0 * cfg.max_wallclock_seconds - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


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


# Newton-Schulz quintic coefficients for Muon's orthogonalisation (Keller Jordan's Muon,
# as in the official baseline): 5 steps push singular values into about [0.7, 1.2].
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


class TrainerLike(Protocol):
    """What the loop needs from a framework's trainer."""
    step: int
    train_ms: float

    def train_step(self, lr_scale: float) -> float: ...
    def save(self, path: str) -> None: ...


def run_training(tr: TrainerLike, cfg: Hyperparameters, log: Callable[[str], None], evaluate: Callable[[], object],
                 sync: Callable[[], None] = lambda: None,
                 over_cap: Callable[[float], bool] | None = None) -> None:
    """The official loop: validate on schedule, step, log, checkpoint, stop at ITERATIONS or the wallclock cap.

    train_ms counts only training: validation and checkpoint writes are excluded. over_cap(train_ms)
    lets a distributed trainer agree on the cap across ranks.
    """
    over_cap = over_cap or (lambda ms: cfg.max_wallclock_seconds > 0 and ms >= 1000.0 * cfg.max_wallclock_seconds)
    stop_after, last_ckpt = None, None
    sync()
    t0 = time.perf_counter()
    while True:
        last = tr.step == cfg.iterations or (stop_after is not None and tr.step >= stop_after)
        if should_validate(cfg, tr.step, last):
            sync()
            tr.train_ms += 1000.0 * (time.perf_counter() - t0)
            acc = evaluate()
            log(val_line(tr.step, cfg.iterations, acc.val_loss, acc.val_bpb, tr.train_ms))
            sync()
            t0 = time.perf_counter()
        if last:
            if stop_after is not None and tr.step < cfg.iterations:
                log(f"stopping_early: wallclock_cap train_time:{tr.train_ms:.0f}ms step:{tr.step}/{cfg.iterations}")
            return
        loss = tr.train_step(lr_multiplier(cfg, tr.step, tr.train_ms + 1000.0 * (time.perf_counter() - t0)))
        tr.step += 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"train_loss is {loss} at step {tr.step}; stopping. Last good checkpoint: "
                                     f"{last_ckpt or 'none written (CHECKPOINT_EVERY=0 or none due yet)'}")
        now_ms = tr.train_ms + 1000.0 * (time.perf_counter() - t0)
        if should_log_train(cfg, tr.step, stop_after is not None):
            log(step_line(tr.step, cfg.iterations, loss, now_ms))
        if should_checkpoint(cfg, tr.step):
            tr.train_ms = now_ms
            last_ckpt = cfg.resolved_checkpoint_path(tr.step)
            tr.save(last_ckpt)
            t0 = time.perf_counter()
            now_ms = tr.train_ms
        if stop_after is None and over_cap(now_ms):
            stop_after = tr.step
