"""Nothing leaks in the tiny record preset (every feature on), in torch and in MLX: no logit sees a later
token, and no logit of a document sees an earlier document, its BOS included, in both looping states.

The cross-document check is what catches the leak several leaderboard entries were rejected for: a
SmearGate that mixes the last token of document n into the BOS of document n+1. It must fail when the
SmearGate's BOS mask is removed (test_the_document_leak_check_fails_without_the_smear_bos_mask).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from parity_tests import compare as C  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.manifest import BOS_ID  # noqa: E402

import mlx_cpu_ops  # noqa: E402
import mlx_model  # noqa: E402
import torch_model  # noqa: E402

# The preset's network at CI length: 6 layers, loops, lanes, gates, XSA, document isolation.
CFG = Hyperparameters.from_env({"PRESET": "tiny_record", "TRAIN_SEQ_LEN": "48", "TRAIN_BATCH_TOKENS": "3072"})
DOC_STARTS = (0, 11, 12, 30)  # documents [0,11) [11,12) [12,30) [30,48): a one-token document, BOS BOS
FRAMEWORKS = ["torch", "mlx_composed", "mlx_segmented", "mlx_fused"]
OPS = {"composed": mlx_cpu_ops.ComposedOps, "fused": mlx_cpu_ops.FusedOps,  # segmented: per-segment calls at any T
       "segmented": type("ComposedOps", (mlx_cpu_ops.ComposedOps,), {"per_segment_min_seq": 0})}


def _rows() -> np.ndarray:
    rng = np.random.default_rng(11)
    x = rng.integers(2, CFG.vocab_size, size=(2, CFG.train_seq_len))  # no stray BOS
    x[:, list(DOC_STARTS)] = BOS_ID
    x[1, 0] = 7  # row 1 opens with the tail of a cut document (the row-start rule)
    return x


def _logits_fn(framework: str, looping: bool):
    state = C.random_state(CFG, seed=12)  # every gate, lambda and lane weight away from its identity init
    if framework == "torch":
        model = C.torch_model(CFG, state)
        model.set_looping(looping)
        return lambda ids: C.torch_logits(model, ids, C.segments_for(CFG, ids))
    model = C.mlx_model(CFG, state, OPS[framework.split("_")[1]])
    model.set_looping(looping)
    return lambda ids: C.mlx_logits(model, ids, C.segments_for(CFG, ids))


def _doc_leak(logits_fn, doc: int) -> float:
    """Max change of any logit outside document `doc` (rows 0 and 1) when every non-BOS token of it changes.
    Earlier documents must not move (causality), later ones must not (isolation), BOS positions included."""
    x = _rows()
    start, end = DOC_STARTS[doc], (DOC_STARTS + (CFG.train_seq_len,))[doc + 1]
    other = x.copy()
    span = np.arange(start + 1, end)
    other[:, span] = 2 + (other[:, span] + 5) % (CFG.vocab_size - 2)
    outside = np.ones(CFG.train_seq_len, dtype=bool)
    outside[start:end] = False
    return float(np.abs(logits_fn(x)[:, outside] - logits_fn(other)[:, outside]).max())


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_logit_sees_another_document(framework, looping):
    fn = _logits_fn(framework, looping)
    for doc in (0, 2):
        assert _doc_leak(fn, doc) == 0.0, f"{framework}: changing document {doc} moved a logit of another one"


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_logit_sees_a_later_token(framework, looping):
    fn = _logits_fn(framework, looping)
    x = _rows()
    for t in (0, 5, 11, 29, CFG.train_seq_len - 2):
        other = x.copy()
        later = np.zeros_like(x, dtype=bool)
        later[:, t + 1:] = x[:, t + 1:] != BOS_ID  # documents keep their places: MLX's per-segment attention
        other[later] = 2 + (other[later] + 3) % (CFG.vocab_size - 2)  # would round differently otherwise (1e-6)
        change = np.abs(fn(x)[:, :t + 1] - fn(other)[:, :t + 1]).max()
        assert change == 0.0, f"{framework}: a token after {t} moved a logit at <= {t} by {change}"


def _torch_smear_without_mask(e, ids, weight, lam, bos_id):
    e = e.float()
    g = lam * torch.sigmoid((e[..., :weight.size(-1)] * weight[0]).sum(dim=-1, keepdim=True))
    return torch.cat((e[:, :1], e[:, 1:] + g[:, 1:] * e[:, :-1]), dim=1)


def _mlx_smear_without_mask(e, ids, weight, lam, bos_id):
    e = e.astype(mx.float32)
    g = lam * mx.sigmoid(mx.sum(e[..., :weight.shape[-1]] * weight[0], axis=-1, keepdims=True))
    return mx.concatenate([e[:, :1], e[:, 1:] + g[:, 1:] * e[:, :-1]], axis=1)


@pytest.mark.parametrize("framework", ["torch", "mlx_composed", "mlx_segmented"])
def test_the_document_leak_check_fails_without_the_smear_bos_mask(monkeypatch, framework):
    """The pre-fix SmearGate: a document's BOS takes the previous document's last token."""
    if framework == "torch":
        monkeypatch.setattr(torch_model, "smear", _torch_smear_without_mask)
    else:
        monkeypatch.setattr(mlx_model, "smear", _mlx_smear_without_mask)
    assert _doc_leak(_logits_fn(framework, True), 0) > 0.0
