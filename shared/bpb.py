"""The only evaluator: window schedule, float64 accumulation, val_loss and val_bpb.

A framework supplies score_fn(x, y) -> per-token NLL in nats, shape (B, T); this
module decides which windows exist, which positions of each are scored, and how
bytes are counted. val_bpb = (val_loss / ln 2) * (tokens / bytes).

Windows are rows [start, score_from]: inputs tokens[start : start+T], targets
tokens[start+1 : start+T+1], positions >= score_from counted.
- stride 0 (official): non-overlapping windows, the tail that does not fill a
  window dropped, exactly as the official eval_val.
- stride s: sliding windows; every target token is scored exactly once, with
  the most context the window allows (>= T-s tokens after the first window),
  and the tail of the split scored by a last window ending exactly at the end.
"""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from shared.config import MICRO_BATCHES_PER_STEP, Hyperparameters
from shared.caseops import TRANSFORM as CASEOPS, is_caseops_tokenizer
from shared.data import load_validation_sidecar, load_validation_tokens, sidecar_pattern
from shared.manifest import dataset_transform
from shared.tokenizer import ByteTables, build_byte_tables, load_tokenizer

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
ReduceFn = Callable[[np.ndarray], np.ndarray]


def eval_windows(n_tokens: int, seq_len: int, stride: int = 0) -> np.ndarray:
    """(K, 2) int64 rows [start, score_from]; every window has seq_len inputs."""
    n_targets = n_tokens - 1
    if n_targets < seq_len:
        raise ValueError(f"validation split has {n_tokens} tokens, fewer than one window of "
                         f"TRAIN_SEQ_LEN+1={seq_len + 1}")
    if stride == 0:
        starts = np.arange(n_targets // seq_len, dtype=np.int64) * seq_len
        return np.stack([starts, np.zeros_like(starts)], axis=1)
    # Window i scores new targets [c_i, e_i) with e_i = min(seq_len + i*stride, n_targets).
    ends = np.arange(seq_len, n_targets + stride, stride, dtype=np.int64)
    ends = np.minimum(ends, n_targets)
    ends = ends[np.concatenate([[True], ends[1:] > ends[:-1]])]
    covered = np.concatenate([[0], ends[:-1]])
    starts = ends - seq_len
    return np.stack([starts, covered - starts], axis=1)


def shard_windows(windows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Contiguous share of the windows for one rank (as the official eval splits sequences)."""
    k = len(windows)
    return windows[k * rank // world_size:k * (rank + 1) // world_size]


@dataclass
class BpbAccumulator:
    """Sums in float64: [nll nats, tokens, bytes]; mergeable across ranks by adding `totals`."""
    totals: np.ndarray = None

    def __post_init__(self):
        if self.totals is None:
            self.totals = np.zeros(3, dtype=np.float64)

    def add(self, nll: np.ndarray, nbytes: np.ndarray) -> None:
        """nll (nats) and the byte counts of the same scored targets (EvalData.target_bytes at their positions)."""
        self.totals[0] += np.asarray(nll, dtype=np.float64).sum()
        self.totals[1] += np.asarray(nll).size
        self.totals[2] += np.asarray(nbytes).sum(dtype=np.float64)

    @property
    def val_loss(self) -> float:
        return float(self.totals[0] / self.totals[1])

    @property
    def val_bpb(self) -> float:
        bits_per_token = self.val_loss / math.log(2.0)
        return float(bits_per_token * self.totals[1] / self.totals[2])

    @property
    def tokens(self) -> int:
        return int(self.totals[1])

    @property
    def bytes(self) -> int:
        return int(self.totals[2])


def windows_per_batch(val_batch_size: int, seq_len: int) -> int:
    """Per-rank batch, as the official eval: VAL_BATCH_SIZE / 8 tokens whatever the world size."""
    return max(1, val_batch_size // (MICRO_BATCHES_PER_STEP * seq_len))


def evaluate(score_fn: ScoreFn, tokens: np.ndarray, windows: np.ndarray, seq_len: int, target_bytes: np.ndarray,
             batch_windows: int, reduce_fn: ReduceFn | None = None,
             progress: Callable[[int, int], None] | None = None) -> BpbAccumulator:
    """Score this rank's windows; target_bytes[i] = bytes of the target tokens[i + 1] (see target_bytes());
    reduce_fn (e.g. an all-reduce SUM) merges ranks' totals."""
    acc = BpbAccumulator()
    offsets = np.arange(seq_len + 1, dtype=np.int64)
    n_batches = math.ceil(len(windows) / batch_windows)
    for b in range(n_batches):
        rows = windows[b * batch_windows:(b + 1) * batch_windows]
        seqs = tokens[rows[:, :1] + offsets[None, :]].astype(np.int64)  # (B, T+1)
        x, y = seqs[:, :-1], seqs[:, 1:]
        nll = np.asarray(score_fn(x, y), dtype=np.float32)  # (B, T)
        mask = np.arange(seq_len)[None, :] >= rows[:, 1:2]
        acc.add(nll[mask], target_bytes[rows[:, :1] + offsets[None, :-1]][mask])
        if progress is not None:
            progress(b + 1, n_batches)
    if reduce_fn is not None:
        acc.totals = np.asarray(reduce_fn(acc.totals.copy()), dtype=np.float64)
    return acc


def target_bytes(tokens: np.ndarray, tables: ByteTables, chunk: int = 1 << 22) -> np.ndarray:
    """int32 (N-1,): the bytes of each target tokens[i + 1] given tokens[i], from the byte tables.

    One array for the whole split, computed once, so that every scoring path (windows, TTT chunks) reads the
    bytes of a target by its position and can never count them differently (chunked: bounded int64 temporaries)."""
    out = np.empty(max(tokens.size - 1, 0), dtype=np.int32)
    for a in range(0, out.size, chunk):
        b = min(a + chunk, out.size)
        out[a:b] = tables.count_bytes(tokens[a:b].astype(np.int64), tokens[a + 1:b + 1].astype(np.int64))
    return out


@dataclass
class EvalData:
    """Validation tokens, their window schedule and the bytes of every target: all a trainer needs to score."""
    tokens: np.ndarray
    windows: np.ndarray
    target_bytes: np.ndarray  # int32 (N-1,): bytes of tokens[i + 1]; see target_bytes()
    bos_id: int  # the tokenizer's BOS id (-1: it has none); documents start with it
    byte_source: str = "tables"  # where target_bytes came from: "sidecar" (fineweb_val_bytes_*) or "tables"


def load_eval_data(cfg: Hyperparameters) -> EvalData:
    """Fails fast, naming the variable, on a missing/mismatched tokenizer or a too-short split."""
    sp = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    tokens = load_validation_tokens(cfg.data_path, cfg.vocab_size)
    windows = eval_windows(tokens.size, cfg.train_seq_len, cfg.eval_stride)
    nbytes = split_target_bytes(cfg, tokens, sp)
    return EvalData(tokens, windows, nbytes, int(sp.bos_id()), byte_source(cfg.data_path))


class SidecarMismatch(ValueError):
    """The byte sidecar does not count the validation tokens it sits beside."""


def byte_source(data_path: str) -> str:
    """"sidecar" when DATA_PATH has fineweb_val_bytes_* shards (split_target_bytes then reads them), else "tables"."""
    return "sidecar" if glob.glob(sidecar_pattern(data_path)) else "tables"


def split_target_bytes(cfg: Hyperparameters, tokens: np.ndarray, sp) -> np.ndarray:
    """The bytes of every validation target, as every evaluation of DATA_PATH counts them.

    A dataset with a byte sidecar (CaseOps, RECORD_STACK.md §1.3) is counted by it: the byte tables would charge
    the case operators 3 bytes each. Refused: a sidecar of another length than the tokens (SidecarMismatch), and
    a CaseOps tokenizer on a plain dataset or the reverse (the manifest's "transform", else the sidecar's presence).
    """
    sidecar = load_validation_sidecar(cfg.data_path)
    check_transform(cfg, sp, has_sidecar=sidecar is not None)
    if sidecar is None:
        return target_bytes(tokens, build_byte_tables(sp, cfg.vocab_size))
    if sidecar.size != tokens.size:
        raise SidecarMismatch(f"DATA_PATH={cfg.data_path}: the byte sidecar fineweb_val_bytes_*.bin counts "
                              f"{sidecar.size} tokens but the validation shards hold {tokens.size}; rebuild or "
                              f"re-download the dataset")
    return sidecar[1:].astype(np.int32)


def check_transform(cfg: Hyperparameters, sp, has_sidecar: bool) -> None:
    """CaseOps tokens need a CaseOps tokenizer and the sidecar, plain tokens a plain tokenizer (cheap checks)."""
    caseops_tok = is_caseops_tokenizer(sp)
    transform = dataset_transform(cfg.data_path)
    if transform == CASEOPS and not caseops_tok:
        raise ValueError(f"DATA_PATH={cfg.data_path} holds {CASEOPS} (CaseOps) tokens but TOKENIZER_PATH="
                         f"{cfg.tokenizer_path} is not a CaseOps tokenizer (ids 4-7 are not the case operators)")
    if caseops_tok and (not has_sidecar or transform not in (None, CASEOPS)):
        raise ValueError(f"TOKENIZER_PATH={cfg.tokenizer_path} is a CaseOps tokenizer but DATA_PATH={cfg.data_path} "
                         f"is not a CaseOps dataset (transform {transform}, "
                         f"{'a' if has_sidecar else 'no'} byte sidecar)")


def progress_logger(log: Callable[[str], None] | None) -> Callable[[int, int], None]:
    """Logs eval_progress:done/total about every 10% (a long evaluation must not look hung)."""
    def progress(done: int, total: int) -> None:
        if log is not None and (done == total or done % max(1, total // 10) == 0):
            log(f"eval_progress:{done}/{total}")
    return progress
