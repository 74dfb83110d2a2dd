"""The compliance audit's checks on the model itself (python -m tools.audit runs them; see its docstring).

    causality      tokens after t never change a logit at a position <= t
    doc_isolation  a document's tokens never change a logit of the next document (its BOS included)
    normalization  the scored distribution sums to 1, and the scorer's NLL is -log of it
    ttt_order      score-first TTT replayed on the first documents passes shared/ttt.py's ledger

Nothing here is a second model: the artifact's weights are built by the trainers' own backend
(cuda_train.TorchBackend or mlx_train.MLXBackend, fp32 on the CPU), the logits are the ones its scorer's
forward computes (with the segments it feeds), and the NLLs are read back through Backend.evaluate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from shared import bpb, ttt
from shared.artifact import read_artifact
from shared.config import Hyperparameters
from shared.manifest import check_tokenizer
from tools.auditcheck import Finding, verdict

SEED = 0  # the sampled windows, positions and replacement tokens: the same audit prints the same figures
CUTS = 3  # causality: cut positions tried per window (each a full forward of the sampled windows)
# Causality and isolation compare two forwards of the SAME shapes in which the BOS tokens (so the segments
# and every kernel's shapes) stay put: a masked key then contributes an exact 0 (exp(-inf)) and every other
# sum runs in the same order, so a correct model differs by exactly 0.0 on the CPU. Any nonzero is a leak.
CAUSALITY_TOL = 0.0
ISOLATION_TOL = 0.0
PROB_SUM_TOL = 1e-6  # float64 softmax of fp32 logits sums to 1 within ~1e-15; 1e-6 only flags non-finite logits
# The scorer's fp32 cross-entropy (log-sum-exp over V <= 8192 logits of |z| <= softcap) rounds at ~1e-6 nats,
# and its forward (one window) and ours (a batch of windows) may differ by fp32 noise; 1e-4 nats is 100x that,
# and 1000x below any bonus that moves a score (0.1 nats on a few tokens is already visible in val_bpb).
NLL_TOL = 1e-4
TTT_DEFAULT_DOCS = 32  # TTT replays the real model on the CPU: a few documents, unless --max-docs says


@dataclass
class Subject:
    """The artifact under audit, built in one backend for scoring: what every check here reads."""
    backend: str  # "torch" | "mlx"
    be: Any  # a built shared.loop.Backend
    cfg: Hyperparameters
    state: dict[str, np.ndarray]
    data: bpb.EvalData
    logits: Callable[[np.ndarray], np.ndarray]  # (B, T) ids -> (B, T, V) fp32, the scorer's forward


def load_subject(artifact_path: str, data_path: str, tokenizer_path: str, backend: str = "torch") -> Subject:
    """Decode the artifact, check it was trained with this tokenizer, build it for scoring (fp32, CPU)."""
    art = read_artifact(artifact_path)
    sha, _ = check_tokenizer(data_path, tokenizer_path, enforce=True)
    if art.tokenizer_sha256 and art.tokenizer_sha256 != sha:
        raise ValueError(f"artifact {artifact_path} was trained with tokenizer sha256 {art.tokenizer_sha256[:16]}, "
                         f"{tokenizer_path} is {sha[:16]}")
    cfg = dataclasses.replace(art.cfg, data_path=data_path, tokenizer_path=tokenizer_path, compute_dtype="float32")
    data = bpb.load_eval_data(cfg)
    be = make_backend(backend, cfg, art.state, data.bos_id)
    return Subject(backend, be, cfg, art.state, data, logits_fn(backend, be))


def make_backend(backend: str, cfg: Hyperparameters, state: dict[str, np.ndarray], bos_id: int):
    """The trainer's backend, built for scoring on the CPU in fp32 (the audit's figures do not depend on a GPU)."""
    if backend == "torch":
        import torch
        from cuda_train import TorchBackend
        be = TorchBackend(cfg)
        be.device = torch.device("cpu")  # it picks CUDA where present; the model is built on be.device
    elif backend == "mlx":
        from mlx_train import MLXBackend  # first: mlx_cpu_ops puts its BLAS under mlx before mlx.core loads
        import mlx.core as mx
        mx.set_default_device(mx.cpu)
        be = MLXBackend(cfg)
    else:
        raise ValueError(f"--backend {backend!r}: must be torch or mlx")
    be.build(cfg, state, train=False, bos_id=bos_id)
    be.set_looping(cfg.num_loops > 0)  # scored looped, as shared/loop.score_artifact does (§3.2)
    return be


def logits_fn(backend: str, be) -> Callable[[np.ndarray], np.ndarray]:
    """The logits of the backend's scoring forward: its model, with the segments its evaluate feeds."""
    if backend == "torch":
        import torch

        def torch_logits(x: np.ndarray) -> np.ndarray:
            be.model.eval()
            with torch.inference_mode():
                return be.model.logits(torch.from_numpy(x).to(be.device), be._segments(x)).float().cpu().numpy()
        return torch_logits
    import mlx.core as mx

    def mlx_logits(x: np.ndarray) -> np.ndarray:
        out = be.model.logits(mx.array(x), be._segments(x))
        mx.eval(out)
        return np.array(out, dtype=np.float32)
    return mlx_logits


# ---- sampling ----
def sample_starts(s: Subject, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct window starts of the evaluation's own schedule (all of them when it has fewer)."""
    starts = s.data.windows[:, 0]
    return np.sort(rng.choice(starts, size=min(n, starts.size), replace=False))


def rows(s: Subject, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int64 (B, T): inputs tokens[start : start+T] and their targets, as bpb.evaluate slices them."""
    seqs = s.data.tokens[starts[:, None] + np.arange(s.cfg.train_seq_len + 1)[None, :]].astype(np.int64)
    return seqs[:, :-1], seqs[:, 1:]


def replace_tokens(x: np.ndarray, where: np.ndarray, vocab: int, bos_id: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of x whose non-BOS tokens under `where` are each replaced by a uniformly drawn other token that is
    not BOS either: the documents (and so the segments and every kernel shape) stay as they were."""
    out = x.copy()
    hit = where & (x != bos_id)
    old = x[hit]
    if bos_id < 0:
        r = rng.integers(0, vocab - 1, size=old.size)
        out[hit] = r + (r >= old)
        return out
    lo, hi = np.minimum(old, bos_id), np.maximum(old, bos_id)
    r = rng.integers(0, vocab - 2, size=old.size)  # the r-th token of the vocabulary without old and BOS
    r = r + (r >= lo)
    out[hit] = r + (r >= hi)
    return out


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


# ---- the checks ----
def check_causality(s: Subject, n_windows: int) -> Finding:
    """Per window, a random cut t: every token after t replaced; the logits at positions <= t must not move."""
    rng = np.random.default_rng(SEED)
    x, _ = rows(s, sample_starts(s, n_windows, rng))
    seq = x.shape[1]
    base = s.logits(x)
    worst = 0.0
    for _ in range(CUTS):
        cut = rng.integers(0, seq - 1, size=x.shape[0])  # the last position kept, one per window
        future = np.arange(seq)[None, :] > cut[:, None]
        out = s.logits(replace_tokens(x, future, s.cfg.vocab_size, s.data.bos_id, rng))
        worst = max(worst, max_abs_diff(base[~future], out[~future]))
    return verdict("causality", worst <= CAUSALITY_TOL,
                   f"max_abs_logit_diff:{worst:.3e} tol:{CAUSALITY_TOL:g} windows:{x.shape[0]} cuts_per_window:{CUTS}")


def boundary_rows(s: Subject, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x (B, T), b (B,)): windows of the split holding a document start (BOS) at position b >= 1."""
    seq, tokens = s.cfg.train_seq_len, s.data.tokens
    bos = np.flatnonzero(tokens == s.data.bos_id)
    bos = bos[(bos >= 1) & (bos < tokens.size - 1)]
    if bos.size == 0:
        return np.zeros((0, seq), np.int64), np.zeros(0, np.int64)
    picked = np.sort(rng.choice(bos, size=min(n, bos.size), replace=False))
    starts = np.clip(picked - rng.integers(1, seq, size=picked.size), 0, tokens.size - seq - 1)
    x, _ = rows(s, starts)
    return x, picked - starts


def check_doc_isolation(s: Subject, n_windows: int) -> Finding:
    """Per window, the tokens before a document start b replaced; no logit at positions >= b may move. A rule
    only for a model that claims isolation (DOC_ISOLATED_ATTN, with the SmearGate's BOS mask): else INFO."""
    if s.data.bos_id < 0:
        return Finding("doc_isolation", "SKIP", f"the tokenizer {s.cfg.tokenizer_path} has no BOS: no documents")
    rng = np.random.default_rng(SEED + 1)
    x, b = boundary_rows(s, n_windows, rng)
    if x.shape[0] == 0:
        return Finding("doc_isolation", "SKIP", "no document boundary in the validation split")
    before = np.arange(x.shape[1])[None, :] < b[:, None]
    base, out = s.logits(x), s.logits(replace_tokens(x, before, s.cfg.vocab_size, s.data.bos_id, rng))
    worst = max_abs_diff(base[~before], out[~before])
    figure = f"max_abs_logit_diff:{worst:.3e} windows:{x.shape[0]} next_doc_positions:{int((~before).sum())}"
    if not s.cfg.doc_isolated_attn:
        return Finding("doc_isolation", "INFO", f"{figure} (DOC_ISOLATED_ATTN=0: isolation not claimed)")
    return verdict("doc_isolation", worst <= ISOLATION_TOL, f"{figure} tol:{ISOLATION_TOL:g}")


def scorer_nll(s: Subject, start: int, pos: int) -> float:
    """The NLL Backend.evaluate counts for target position pos of the window at start: its sum over positions
    >= pos minus its sum over positions >= pos + 1 (float64 sums of the scorer's fp32 values: exact enough)."""
    def scored_from(p: int) -> float:
        data = dataclasses.replace(s.data, windows=np.array([[start, p]], np.int64))
        return float(s.be.evaluate(data, None).totals[0])
    return scored_from(pos) - scored_from(pos + 1)


def check_normalization(s: Subject, n_windows: int) -> Finding:
    """At one random position per window: softmax (float64, over the whole vocabulary) of the final logits
    (softcap included) sums to 1, and the scorer's NLL of the target is -log of that probability."""
    rng = np.random.default_rng(SEED + 2)
    starts = sample_starts(s, n_windows, rng)
    x, y = rows(s, starts)
    pos = rng.integers(0, x.shape[1], size=x.shape[0])
    z = s.logits(x)[np.arange(x.shape[0]), pos].astype(np.float64)  # (B, V)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    sum_err = float(np.max(np.abs(np.exp(logp).sum(axis=1) - 1.0)))
    want = -logp[np.arange(x.shape[0]), y[np.arange(x.shape[0]), pos]]
    got = np.array([scorer_nll(s, int(a), int(p)) for a, p in zip(starts, pos)])
    nll_err = float(np.max(np.abs(got - want)))
    ok = bool(np.isfinite(z).all()) and sum_err <= PROB_SUM_TOL and nll_err <= NLL_TOL
    return verdict("normalization", ok, f"max_prob_sum_err:{sum_err:.1e} tol:{PROB_SUM_TOL:g} "
                                        f"max_scorer_nll_diff:{nll_err:.3e} tol:{NLL_TOL:g} positions:{got.size}")


def first_docs(data: bpb.EvalData, n: int) -> bpb.EvalData:
    """The split cut after its first n documents (shared/ttt.find_docs'), byte counts by position kept."""
    docs = ttt.find_docs(data.tokens, data.bos_id)
    if n >= len(docs):
        return data
    end = int(docs[n - 1, 0] + docs[n - 1, 1] + 1)  # through the next document's BOS, the last target
    return dataclasses.replace(data, tokens=data.tokens[:end], target_bytes=data.target_bytes[:end - 1],
                               windows=np.zeros((0, 2), np.int64))


def check_ttt_order(s: Subject, max_docs: int | None) -> Finding:
    """TTT_ENABLED: shared/ttt.evaluate_ttt on a fresh build over the first documents; its ledger raises
    TTTLegalityError, naming the document, on any update that used a token before that token was scored."""
    if not s.cfg.ttt_enabled:
        return Finding("ttt_order", "SKIP", "TTT_ENABLED=0 in the artifact's config")
    data = first_docs(s.data, max_docs or TTT_DEFAULT_DOCS)
    be = make_backend(s.backend, s.cfg, s.state, s.data.bos_id)  # TTT's global SGD moves the base weights
    try:
        result = ttt.evaluate_ttt(be.ttt_engine(), data, s.cfg)
    except ttt.TTTLegalityError as exc:
        return Finding("ttt_order", "FAIL", str(exc))
    return Finding("ttt_order", "PASS", f"docs:{len(result.docs)} ledger:ok ttt_val_bpb:{result.acc.val_bpb:.6f}")
