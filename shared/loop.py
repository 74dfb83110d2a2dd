"""The train / eval / resume / prime / export flow, written once over a small backend protocol.

A trainer (cuda_train.py, mlx_train.py) implements Backend: build a model from
numpy weights, take one optimizer step on given micro-batches, score windows,
and a few collectives. Everything else lives here: data, schedules, checkpoints,
the artifact, logging and every check a run makes before it spends compute.

    main(make_backend, __file__, shipped_file)   # a trainer's whole __main__
"""
from __future__ import annotations

import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from shared import artifact, bpb, ttt
from shared.checkpoint import Slots, check_fingerprint, load_checkpoint, pack, save_checkpoint
from shared.config import Hyperparameters, artifact_config_for_env, near_misses, parse_trainer_cli, with_run_id
from shared.data import TokenLoader, train_pattern
from shared.manifest import check_tokenizer
from shared.quant.gptq import targets as gptq_targets
from shared.runlog import RunLog, log_final, step_line, val_line
from shared.schedule import (looping_active, lr_multiplier, muon_momentum, should_checkpoint, should_log_train,
                             should_validate, train_budget_ms)
from shared.spec import count_params, estimate_memory_bytes, init_params


class Backend(Protocol):
    """What the flow needs from a framework. Methods marked collective run on every rank."""
    rank: int
    world_size: int

    def describe(self) -> str: ...  # one header line: versions, device, dtype
    def build(self, cfg: Hyperparameters, weights: dict[str, np.ndarray], train: bool,
              bos_id: int | None = None) -> None: ...  # bos_id: the tokenizer's, for BOS-aware features
    def weights(self) -> dict[str, np.ndarray]: ...  # fp32 numpy copies (never views of live state)
    def load_weights(self, weights: dict[str, np.ndarray]) -> None: ...
    def optimizer_slots(self) -> Slots: ...  # collective; copies of every slot (zeros before a step)
    def load_optimizer_slots(self, slots: Slots) -> None: ...
    # EMA of the weights (EMA_DECAY > 0 only): an fp32 shadow kept on the device, so a step costs no host copy
    def load_ema(self, weights: dict[str, np.ndarray]) -> None: ...  # (re)sets the shadow to these values
    def ema_update(self, decay: float) -> None: ...  # shadow <- shared.schedule.ema_step(shadow, weights, decay)
    def ema_weights(self) -> dict[str, np.ndarray]: ...  # fp32 numpy copies of the shadow
    def train_step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], lr_scale: float,
                   momentum: float) -> float: ...  # collective; the global mean loss
    def evaluate(self, data: bpb.EvalData, log: Callable | None) -> bpb.BpbAccumulator: ...  # collective
    def set_looping(self, on: bool) -> None: ...  # depth recurrence on/off for the next steps and scores (§3.2)
    # QUANT=gptq, collective: H = sum of x^T x of each shared.quant.gptq.targets(cfg) weight's input over every
    # rank's batches, divided by their total count; float32 numpy
    def hessians(self, cfg: Hyperparameters, batches: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]: ...
    # GPTQ_SOLVER: the column solve shared.quant.gptq.quantize runs (its numpy_solver's signature; a `name`
    # attribute, if any, goes to the export line); None: the numpy reference
    def gptq_solver(self, cfg: Hyperparameters) -> Callable | None: ...
    def ttt_engine(self) -> ttt.Engine: ...  # score-first TTT over the built model (TTT_ENABLED; shared/ttt.py)
    def any_rank(self, flag: bool) -> bool: ...  # collective OR
    def max_over_ranks(self, value: float) -> float: ...  # collective MAX
    def broadcast_text(self, text: str) -> str: ...  # collective: rank 0's value
    def sync(self) -> None: ...
    def memory_bytes(self) -> int | None: ...  # what the device offers, None if unknown
    def tokens_in_flight(self, cfg: Hyperparameters) -> int: ...
    def peak_memory_line(self) -> str: ...
    def finish(self) -> None: ...


@dataclass
class TrainState:
    step: int
    train_ms: float
    loader: TokenLoader


def main(make_backend: Callable[[Hyperparameters], Backend], source_file: str, shipped_file: str,
         argv: list[str] | None = None) -> None:
    """A trainer's entry point: bad input and diverged runs end with one `error:` line and status 1.

    source_file: the trainer that runs (its source heads the log); shipped_file: the trainer whose
    code ships and counts toward the byte cap (always cuda_train.py).
    """
    try:
        args = parse_trainer_cli(Path(source_file).stem, argv)
        files = (source_file, shipped_file)
        if args.eval:
            run_eval(make_backend, args.eval, files)
        else:
            train(make_backend, files, args.resume)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as exc:
        sys.exit(f"error: {exc}")


def train(make_backend: Callable[[Hyperparameters], Backend], files: tuple[str, str], resume: str | None) -> None:
    """Check everything, build, (resume,) prime, train, export, score the artifact from disk."""
    cfg = Hyperparameters.from_env(os.environ)
    be = make_backend(cfg)
    cfg = with_run_id(cfg, be.broadcast_text(f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:8]}"))
    log = RunLog(cfg.run_id, enabled=be.rank == 0)
    log.header(files[0], cfg, be.describe())
    data, tokenizer_sha = load_checked_eval_data(cfg, log)
    preflight(cfg, be)
    st = TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), be.rank, be.world_size, cfg.vocab_size))
    fingerprint = {"tokenizer_sha256": tokenizer_sha, "train_shards": st.loader.stream.fingerprint()}
    be.build(cfg, init_params(cfg), train=True, bos_id=data.bos_id)
    log(f"model_params:{count_params(cfg)}")  # as the official script prints it
    if cfg.ema_decay > 0:
        be.load_ema(be.weights())  # from the initial weights; a resume overwrites it with the checkpoint's
    if resume:
        restore(be, st, cfg, resume, fingerprint)
        log(f"resumed:{resume} step:{st.step}")
    prime(be, st, cfg, log)
    live = run_training(be, st, cfg, log, data, fingerprint)
    log(be.peak_memory_line())
    if cfg.ema_decay > 0:
        swap_in_ema(be, cfg, data, log, live)
    path = export(be, cfg, tokenizer_sha, st.loader, log)
    score_artifact(be, path, cfg, data, log, files[1])
    be.finish()


def load_checked_eval_data(cfg: Hyperparameters, log: RunLog) -> tuple[bpb.EvalData, str]:
    """Validation data and byte tables, after checking the tokenizer is the one the dataset was built with."""
    data = bpb.load_eval_data(cfg)  # fails fast on a bad tokenizer or a short validation split
    tokenizer_sha, status = check_tokenizer(cfg.data_path, cfg.tokenizer_path, enforce=cfg.tokenizer_check)
    log(f"tokenizer:{cfg.tokenizer_path} sha256:{tokenizer_sha[:16]} {status} bytes:{data.byte_source}")
    for warning in near_misses(os.environ):
        log(f"warning: {warning}")
    return data, tokenizer_sha


def preflight(cfg: Hyperparameters, be: Backend) -> None:
    """Everything that would otherwise fail after training: output paths, memory."""
    check_output_path(cfg.resolved_artifact_path(), "ARTIFACT_PATH")
    if cfg.checkpoint_every > 0:
        try:
            ckpt = cfg.resolved_checkpoint_path(0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"CHECKPOINT_PATH={cfg.checkpoint_path!r} is not a valid template; only {{step}} "
                             f"may appear ({exc!r})") from None
        check_output_path(ckpt, "CHECKPOINT_PATH")
    if cfg.quant == "gptq":
        be.gptq_solver(cfg)  # a backend that cannot run GPTQ_SOLVER says so now, not after training
    if cfg.quant == "gptq" and cfg.gptq_calibration_batches % be.world_size:
        raise ValueError(f"GPTQ_CALIBRATION_BATCHES={cfg.gptq_calibration_batches} must be a multiple of WORLD_SIZE="
                         f"{be.world_size} (the ranks share the calibration micro-batches)")
    need, have = estimate_memory_bytes(cfg, be.tokens_in_flight(cfg)), be.memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"this config needs at least ~{need / 2**30:.1f} GiB ({be.tokens_in_flight(cfg)} tokens in "
                         f"flight) but the device has {have / 2**30:.1f} GiB; lower MODEL_DIM, NUM_LAYERS, VOCAB_SIZE, "
                         f"TRAIN_SEQ_LEN or the micro-batch size")


def check_output_path(path: str, var: str) -> None:
    """The file can be written there: not a folder, and its folder exists (or can be made) and is writable."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{var}={path} is a directory, not a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{var}={path}: cannot create its folder ({exc.strerror})") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{var}={path} is not writable")


# ---- training ----
def run_training(be: Backend, st: TrainState, cfg: Hyperparameters, log: RunLog, data: bpb.EvalData,
                 fingerprint: dict) -> bpb.BpbAccumulator:
    """The official loop: validate on schedule, step, log, checkpoint, stop at ITERATIONS or the wallclock cap.

    train_ms counts only training: validation and checkpoint writes are excluded. Returns the last
    validation (the live weights at the stop).
    """
    stop_after = st.step if over_cap(be, cfg, st.train_ms) else None  # resumed at the cap: no extra step
    last_ckpt, was_looping = None, False
    be.sync()
    t0 = time.perf_counter()
    while True:
        last = st.step >= cfg.iterations or (stop_after is not None and st.step >= stop_after)
        if should_validate(cfg, st.step, last):
            be.sync()
            st.train_ms += 1000.0 * (time.perf_counter() - t0)
            be.set_looping(cfg.num_loops > 0)  # every score runs looped, also mid-training
            acc = be.evaluate(data, None)
            log(val_line(st.step, cfg.iterations, acc.val_loss, acc.val_bpb, st.train_ms))
            be.sync()
            t0 = time.perf_counter()
        if last:
            if stop_after is not None and st.step < cfg.iterations:
                log(f"stopping_early: wallclock_cap train_time:{st.train_ms:.0f}ms step:{st.step}/{cfg.iterations}")
            return acc
        lr_scale, looping = step_schedules(be, cfg, st.step, st.train_ms + 1000.0 * (time.perf_counter() - t0))
        if looping != was_looping:
            log(f"looping:{'on' if looping else 'off'} step:{st.step}")
            was_looping = looping
        be.set_looping(looping)
        loss = one_step(be, st, cfg, lr_scale)
        if not math.isfinite(loss):
            raise FloatingPointError(f"train_loss is {loss} at step {st.step}; stopping. Last good checkpoint: "
                                     f"{last_ckpt or 'none written (CHECKPOINT_EVERY=0 or none due yet)'}")
        now_ms = st.train_ms + 1000.0 * (time.perf_counter() - t0)
        if should_log_train(cfg, st.step, stop_after is not None):
            log(step_line(st.step, cfg.iterations, loss, now_ms))
        if should_checkpoint(cfg, st.step):
            st.train_ms = now_ms
            last_ckpt = cfg.resolved_checkpoint_path(st.step)
            save(be, st, cfg, last_ckpt, fingerprint, log)
            t0 = time.perf_counter()
            now_ms = st.train_ms
        if stop_after is None and over_cap(be, cfg, now_ms):
            stop_after = st.step


def step_schedules(be: Backend, cfg: Hyperparameters, step: int, elapsed_ms: float) -> tuple[float, bool]:
    """This step's learning-rate multiplier and looping state, from one elapsed time every rank agrees on.

    Each rank's own clock would give ranks different learning rates in a timed warmdown and, at the loop
    switch, different graphs. Untimed schedules (no wallclock cap) read only the step: no collective then.
    """
    if cfg.max_wallclock_seconds > 0:
        elapsed_ms = be.max_over_ranks(elapsed_ms)
    return lr_multiplier(cfg, step, elapsed_ms), looping_active(cfg, step, elapsed_ms)


def one_step(be: Backend, st: TrainState, cfg: Hyperparameters, lr_scale: float) -> float:
    """The step's 8/WORLD_SIZE micro-batches from the shared schedule, one optimizer step, then the EMA update
    (after the step: the shadow averages the weights each step produced, §5.6)."""
    micro = [st.loader.next_micro_batch(cfg.train_batch_tokens, cfg.train_seq_len)
             for _ in range(st.loader.grad_accum_steps)]
    loss = be.train_step(micro, lr_scale, muon_momentum(cfg, st.step))
    if cfg.ema_decay > 0:
        be.ema_update(cfg.ema_decay)
    st.step += 1
    return loss


def over_cap(be: Backend, cfg: Hyperparameters, train_ms: float) -> bool:
    """Wallclock cap less GPTQ_RESERVE_SECONDS, agreed across ranks (any rank over the budget stops all)."""
    if cfg.max_wallclock_seconds <= 0:
        return False
    return be.any_rank(train_ms >= train_budget_ms(cfg))


def prime(be: Backend, st: TrainState, cfg: Hyperparameters, log: RunLog) -> None:
    """WARMUP_STEPS real steps to warm compile and caches, then every bit of state put back.

    Runs on a resumed run too, so compile time never lands inside the timed training; with NUM_LOOPS > 0
    the second half runs looped, so both graphs (looping off and on) are compiled here.
    """
    if cfg.warmup_steps <= 0:
        return
    weights, slots, position, step = be.weights(), be.optimizer_slots(), st.loader.stream.state(), st.step
    ema = be.ema_weights() if cfg.ema_decay > 0 else None
    steps = max(cfg.warmup_steps, 2) if cfg.num_loops > 0 else cfg.warmup_steps  # at least one step per state
    for i in range(steps):
        be.set_looping(cfg.num_loops > 0 and i >= (steps + 1) // 2)
        one_step(be, st, cfg, 1.0)
        log(f"warmup_step:{i + 1}/{steps}")
    be.load_weights(weights)
    be.load_optimizer_slots(slots)
    if ema is not None:
        be.load_ema(ema)
    st.loader.stream.restore(position)
    st.step = step


# ---- checkpoints ----
def save(be: Backend, st: TrainState, cfg: Hyperparameters, path: str, fingerprint: dict, log: RunLog) -> None:
    ema = be.ema_weights() if cfg.ema_decay > 0 else None
    tensors = pack(be.weights(), be.optimizer_slots(), ema)  # collective: every rank takes part
    meta = {"step": st.step, "train_ms": st.train_ms, "data": st.loader.stream.state(), "fingerprint": fingerprint,
            "backend": type(be).__name__}
    on_rank0(be, lambda: save_checkpoint(path, cfg, tensors, meta), f"checkpoint {path}")
    log(f"checkpoint:{path} step:{st.step}")


def restore(be: Backend, st: TrainState, cfg: Hyperparameters, path: str, fingerprint: dict) -> None:
    weights, slots, meta, ema = load_checkpoint(path, cfg)
    check_fingerprint(path, meta["fingerprint"], fingerprint)
    try:
        st.loader.stream.restore(meta["data"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from None
    be.load_weights(weights)
    be.load_optimizer_slots(slots)
    if ema is not None:
        be.load_ema(ema)
    st.step, st.train_ms = int(meta["step"]), float(meta["train_ms"])


def on_rank0(be: Backend, write: Callable[[], None], what: str) -> None:
    """Rank 0 writes; every rank learns whether it worked, so no rank waits forever at a barrier."""
    error = None
    if be.rank == 0:
        try:
            write()
        except Exception as exc:  # whatever it is, the other ranks must hear of it
            error = exc
    if be.any_rank(error is not None):
        raise error if error is not None else OSError(f"rank 0 failed to write {what}")


# ---- export and scoring ----
def swap_in_ema(be: Backend, cfg: Hyperparameters, data: bpb.EvalData, log: RunLog, live: bpb.BpbAccumulator) -> None:
    """Put the EMA shadow into the model for everything after training (export, score), logging the live
    weights' last validation next to the EMA weights' (the record's log shows both, §5.6)."""
    log(f"val_live val_loss:{live.val_loss:.4f} val_bpb:{live.val_bpb:.4f}")
    be.load_weights(be.ema_weights())
    be.set_looping(cfg.num_loops > 0)  # scored as every validation is
    acc = be.evaluate(data, None)
    log(f"val_ema val_loss:{acc.val_loss:.4f} val_bpb:{acc.val_bpb:.4f} decay:{cfg.ema_decay}")


def export(be: Backend, cfg: Hyperparameters, tokenizer_sha: str, loader: TokenLoader | None = None,
           log: RunLog | None = None) -> str:
    """Quantize (QUANT=gptq: calibrated on the next GPTQ_CALIBRATION_BATCHES micro-batch slots of the training
    stream, shared among the ranks, whatever the world size), code, write on rank 0; logs each phase's seconds.
    Without a loader GPTQ runs with H = I."""
    path = cfg.resolved_artifact_path()
    hessians, timings = None, {}
    if cfg.quant == "gptq" and loader is not None:
        t0 = time.perf_counter()
        batches = [loader.next_micro_batch(cfg.train_batch_tokens, cfg.train_seq_len)
                   for _ in range(cfg.gptq_calibration_batches // be.world_size)]
        be.set_looping(cfg.num_loops > 0)  # calibrated as scored: looped layers add every application
        hessians = be.hessians(cfg, batches)
        timings["hessians"] = time.perf_counter() - t0
    weights = be.weights()
    solver = be.gptq_solver(cfg) if cfg.quant == "gptq" else None
    on_rank0(be, lambda: artifact.save_artifact(path, weights, cfg, tokenizer_sha, hessians, timings, solver),
             f"artifact {path}")
    if log is not None and be.rank == 0:
        log(export_line(cfg, hessians, timings, getattr(solver, "name", "numpy")))
    return path


def export_line(cfg: Hyperparameters, hessians: dict | None, timings: dict[str, float],
                solver: str = "numpy") -> str:
    """quant:... compressor:... then the seconds of each phase, then GPTQ's solver; GPTQ without Hessians says so."""
    line = f"export quant:{cfg.quant} compressor:{cfg.compressor}"
    if cfg.quant == "gptq":
        targets = gptq_targets(cfg)
        missing = [n for n in targets if n not in (hessians or {})]
        line += f" calibrated:{len(targets) - len(missing)}/{len(targets)}"
        if missing:
            line += f" identity_hessian(round-to-nearest):{','.join(missing[:3])}{'...' if len(missing) > 3 else ''}"
    line += "".join(f" {k}:{v:.2f}s" for k, v in timings.items())
    return line + (f" solver:{solver}" if cfg.quant == "gptq" else "")


def score_artifact(be: Backend, path: str, cfg: Hyperparameters, data: bpb.EvalData, log: RunLog,
                   shipped_file: str, state: dict[str, np.ndarray] | None = None) -> None:
    """Reload the artifact from disk (unless given its state), build a fresh model, evaluate, print the final lines."""
    state = artifact.load_artifact(path)[0] if state is None else state
    be.build(cfg, state, train=False, bos_id=data.bos_id)
    be.set_looping(cfg.num_loops > 0)  # the score runs looped (§3.2)
    t0 = time.perf_counter()
    acc = be.evaluate(data, log)
    eval_ms = 1000.0 * (time.perf_counter() - t0)
    if cfg.ttt_enabled:
        acc, eval_ms = score_ttt(be, cfg, data, log, acc, eval_ms)
    log_final(log, acc, path, shipped_file, eval_ms)


def score_ttt(be: Backend, cfg: Hyperparameters, data: bpb.EvalData, log: RunLog, plain: bpb.BpbAccumulator,
              plain_ms: float) -> tuple[bpb.BpbAccumulator, float]:
    """TTT_ENABLED: the scored number is score-first TTT (RECORD_STACK.md §7.2) on the same weights; the plain
    score of the artifact is logged next to it. The legality check inside raises on any violation."""
    log(f"no_ttt val_loss:{plain.val_loss:.8f} val_bpb:{plain.val_bpb:.8f} eval_time:{plain_ms:.0f}ms")
    engine = be.ttt_engine()
    warm = engine.warm_up()
    if warm:
        log(f"ttt_warmup seconds:{warm:.2f} widths:{','.join(map(str, ttt.warmup_widths(cfg)))} "
            "(TTT_COMPILE: compiled on random ids before the timed evaluation, as the record's timer)")
    t0 = time.perf_counter()
    result = ttt.evaluate_ttt(engine, data, cfg, be.rank, be.world_size, log)
    ttt_ms = 1000.0 * (time.perf_counter() - t0)
    log(f"ttt val_loss:{result.acc.val_loss:.8f} val_bpb:{result.acc.val_bpb:.8f} eval_time:{ttt_ms:.0f}ms "
        f"docs:{len(result.docs)} legality:ok")
    return result.acc, ttt_ms


def run_eval(make_backend: Callable[[Hyperparameters], Backend], path: str, files: tuple[str, str]) -> None:
    """Score an artifact under its own config plus eval/run/backend overrides from the environment."""
    art = artifact.read_artifact(path)
    cfg = artifact_config_for_env(art.cfg, os.environ, f"artifact {path}")
    be = make_backend(cfg)
    log = RunLog(f"eval_{Path(path).stem}", enabled=be.rank == 0)
    log.header(files[0], cfg, be.describe())
    data, tokenizer_sha = load_checked_eval_data(cfg, log)
    if art.tokenizer_sha256 and art.tokenizer_sha256 != tokenizer_sha:
        message = (f"artifact {path} was trained with tokenizer sha256 {art.tokenizer_sha256[:16]}, "
                   f"TOKENIZER_PATH={cfg.tokenizer_path} is {tokenizer_sha[:16]}")
        if cfg.tokenizer_check:
            raise ValueError(message + "; set TOKENIZER_CHECK=0 to score anyway")
        log(f"warning: {message}")
    score_artifact(be, path, cfg, data, log, files[1], art.state)
    be.finish()
