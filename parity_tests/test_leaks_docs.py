"""DOC_ISOLATED_ATTN: no document sees another, in torch, MLX composed (per segment) and MLX fused (mask).

    .venv/bin/python -m pytest -q parity_tests/test_leaks_docs.py

The leak checks run each framework on its own (a bug both twins share would pass the parity tests); the
fault-injection tests prove the checks can fail.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from conftest import ROOT, run_script, tiny_env  # noqa: E402
from parity_tests import compare as C  # noqa: E402
from parity_tests.test_parity import MLX_OPS, batch, cfg_for, check_backward, check_forward  # noqa: E402
from shared import bpb, loop  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.data import TokenLoader, train_pattern  # noqa: E402
from shared.manifest import BOS_ID  # noqa: E402
from shared.runlog import parse_final  # noqa: E402
from shared.schedule import lr_multiplier  # noqa: E402
from shared.segments import segment_ids  # noqa: E402
from shared.spec import init_params  # noqa: E402

import cuda_train  # noqa: E402
import mlx_cpu_ops  # noqa: E402
import mlx_model  # noqa: E402
import mlx_train  # noqa: E402
import torch_model  # noqa: E402

FRAMEWORKS = ["torch", "mlx_composed", "mlx_segmented", "mlx_fused"]
# ComposedOps's two DOC_ISOLATED_ATTN paths at any length: the (B, 1, T, T) mask, and per-segment calls (which it
# takes by itself only from per_segment_min_seq = 1024 tokens on)
MASKED_COMPOSED = type("ComposedOps", (mlx_cpu_ops.ComposedOps,), {"per_segment": False})
SEGMENTED_COMPOSED = type("ComposedOps", (mlx_cpu_ops.ComposedOps,), {"per_segment_min_seq": 0})
OPS = dict(MLX_OPS, segmented=SEGMENTED_COMPOSED)
SEGMENT_RANGES = mlx_model.segment_ranges  # the real one, for a fault built on top of it


def doc_cfg():
    """Every model feature of the record stack, with isolation on."""
    return dataclasses.replace(cfg_for("record_stack"), doc_isolated_attn=True)


def documents_rows(cfg) -> np.ndarray:
    """2 rows of T=32: row 0 opens with BOS, row 1 with a cut document's tail; a one-token document (adjacent
    BOS), a BOS at the last position; no BOS elsewhere."""
    assert cfg.train_seq_len == 32
    x = np.random.default_rng(11).integers(2, cfg.vocab_size, size=(2, 32))
    x[0, [0, 9, 10, 20, 31]] = BOS_ID
    x[1, [6, 13, 25]] = BOS_ID
    return x


def logits_fn(framework: str, cfg, state):
    """ids -> logits, with the segments the trainers would build from ids (C.segments_for)."""
    if framework == "torch":
        model = C.torch_model(cfg, state)
        return lambda ids: C.torch_logits(model, ids, C.segments_for(cfg, ids))
    model = C.mlx_model(cfg, state, OPS[framework.split("_")[1]])
    return lambda ids: C.mlx_logits(model, ids, C.segments_for(cfg, ids))


def doc_leak(fn, cfg, x: np.ndarray) -> float:
    """Change each non-BOS token in turn (every row at once): the largest change of a logit outside the
    changed token's document or before it. 0.0 means isolated and causal."""
    base = fn(x)
    ids = segment_ids(x, BOS_ID, cfg.train_seq_len)
    worst = 0.0
    for p in range(x.shape[1]):
        other = x.copy()
        other[:, p] = np.where(x[:, p] == BOS_ID, BOS_ID, 2 + (x[:, p] - 2 + 7) % (cfg.vocab_size - 2))
        delta = np.abs(fn(other) - base).max(axis=-1)  # (B, T)
        allowed = (ids == ids[:, p:p + 1]) & (np.arange(x.shape[1]) >= p)
        assert np.all(delta[:, p][x[:, p] != BOS_ID] > 0), f"changing token {p} changed nothing: a vacuous test"
        worst = max(worst, float(delta[~allowed].max()))
    return worst


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_document_sees_another(framework):
    cfg = doc_cfg()
    fn = logits_fn(framework, cfg, C.random_state(cfg, seed=8))
    assert doc_leak(fn, cfg, documents_rows(cfg)) == 0.0, f"{framework}: a logit saw another document's token"


def test_masked_composed_attention_is_isolated():
    cfg = doc_cfg()
    model = C.mlx_model(cfg, C.random_state(cfg, seed=8), MASKED_COMPOSED)
    fn = lambda ids: C.mlx_logits(model, ids, C.segments_for(cfg, ids))  # noqa: E731
    assert doc_leak(fn, cfg, documents_rows(cfg)) == 0.0


# Per-segment calls (MLX composed) take their shapes from the segments: a BOS added or removed after t changes
# the length of t's segment, hence the blocking of its matmuls and sums, and logits at <= t move by rounding
# (measured 3.8e-6), never by information (a real leak moves them by ~1). The fixed-shape paths are exact.
LATER_TOKEN_ATOL = {"torch": 0.0, "mlx_composed": 0.0, "mlx_segmented": 1e-5, "mlx_fused": 0.0}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_logit_sees_a_later_token_with_isolation(framework):
    cfg = doc_cfg()
    fn = logits_fn(framework, cfg, C.random_state(cfg, seed=9))
    x, _ = batch(cfg, n=2, seed=7)  # planted documents
    for t in (0, 5, cfg.train_seq_len - 2):
        other = x.copy()
        other[:, t + 1:] = (other[:, t + 1:] + 1 + np.arange(x.shape[1] - t - 1)) % cfg.vocab_size
        change = np.abs(fn(x)[:, :t + 1] - fn(other)[:, :t + 1]).max()
        assert change <= LATER_TOKEN_ATOL[framework], f"{framework}: a token after {t} moved a logit by {change:.3g}"


def _bos_in_previous_segment(x, bos_id, max_len):
    """Segment ids built off by one: each segment starts after its BOS, so a BOS belongs to the document before."""
    starts = np.zeros(x.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] |= x[:, :-1] == bos_id
    return (np.cumsum(starts.ravel()) - 1).reshape(x.shape).astype(np.int32)


@pytest.mark.parametrize("fault", ["mask_dropped", "bos_in_previous_segment"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_injected_document_leaks_are_caught(monkeypatch, framework, fault):
    if fault == "mask_dropped":  # isolation lost: dense causal attention over the whole row
        model_cls = torch_model.GPT if framework == "torch" else mlx_model.GPT
        monkeypatch.setattr(model_cls, "doc_attention", lambda self, segments: None)
    else:
        monkeypatch.setattr(C, "segment_ids", _bos_in_previous_segment)
    cfg = doc_cfg()
    fn = logits_fn(framework, cfg, C.random_state(cfg, seed=8))
    assert doc_leak(fn, cfg, documents_rows(cfg)) > 0.0


# Parity under isolation beyond the doc_isolated variant: the mask path ComposedOps also has, and its vjp.
@pytest.mark.parametrize("ops", [MASKED_COMPOSED, SEGMENTED_COMPOSED], ids=["masked", "segmented"])
def test_both_composed_isolation_paths_agree_with_torch(ops):
    cfg = cfg_for("doc_isolated")
    check_forward(cfg, ops)
    check_backward(cfg, ops)


@mx.custom_function
def _mask_only_in_forward(q, k, v, mask):
    return mlx_cpu_ops._attend(q, k, v, mask)


@_mask_only_in_forward.vjp
def _causal_only_vjp(primals, cotangent, output):
    q, k, v, mask = primals
    return mlx_cpu_ops._attention_grads((q, k, v), cotangent, output, None) + (mx.zeros_like(mask),)


def _ranges_shifted(segments):
    """Per-segment calls cut one token late: each BOS joins the document before it."""
    t = segments.shape[1]
    shifted = [[(a + (a > 0), b + (b < t)) for a, b in row] for row in SEGMENT_RANGES(segments)]
    return tuple(tuple((a, b) for a, b in row if a < b) for row in shifted)  # a BOS at T-1: its segment empties


@pytest.mark.parametrize("fault", ["isolation_dropped", "vjp_without_mask", "ranges_shifted"])
def test_injected_isolation_faults_are_caught_by_parity(monkeypatch, fault):
    cfg = cfg_for("doc_isolated")
    ops = SEGMENTED_COMPOSED
    if fault == "isolation_dropped":
        monkeypatch.setattr(mlx_model.GPT, "doc_attention", lambda self, segments: None)
    elif fault == "vjp_without_mask":  # the forward is right: only gradients can tell
        monkeypatch.setattr(mlx_cpu_ops, "composed_masked_attention", _mask_only_in_forward)
        ops = MASKED_COMPOSED
        check_forward(cfg, ops)
    else:
        monkeypatch.setattr(mlx_model, "segment_ranges", _ranges_shifted)
    if fault != "vjp_without_mask":
        with pytest.raises(AssertionError, match="logits: max abs diff"):
            check_forward(cfg, ops)
    with pytest.raises(AssertionError, match="grad "):
        check_backward(cfg, ops)


# The CUDA path's plumbing, on a CPU: torch_model.attention packs (B, H, T, D) into varlen's (B*T, H, D) and
# passes cu_seqlens from shared/segments.py. varlen_attn itself needs CUDA; a reference stands in for it,
# written against torch 2.13's documented signature.
def _reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                           window_size=(-1, -1), enable_gqa=False):
    assert window_size == (-1, 0), "varlen_attn is causal only with window_size=(-1, 0)"
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    assert len(cu_seq_q) % 64 == 0, "cu_seqlens padded to the record's 64-entry buckets"
    out = torch.zeros_like(query)
    cu = cu_seq_q.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        assert b - a <= max_q
        if b > a:  # padding: zero-length segments
            q, k, v = (t[a:b].transpose(0, 1)[None] for t in (query, key, value))  # (1, H, L, D)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                 enable_gqa=enable_gqa)
            out[a:b] = y[0].transpose(0, 1)
    return out


def test_varlen_plumbing_matches_the_mask_path(monkeypatch):
    cfg = cfg_for("doc_isolated")
    state = C.random_state(cfg, seed=4)
    x, y = batch(cfg, seed=5)
    seg = C.segments_for(cfg, x)
    want = C.torch_logits(C.torch_model(cfg, state), x, seg)
    _, want_grads = C.torch_loss_and_grads(C.torch_model(cfg, state), x, y, seg)
    monkeypatch.setattr(torch_model, "varlen_attn", _reference_varlen_attn)
    monkeypatch.setattr(torch_model, "doc_attention_kernel", lambda device, dtype: "varlen_attn_reference")
    model = C.torch_model(cfg, state)
    doc = model.doc_attention(torch.from_numpy(seg))
    assert isinstance(doc, torch_model.VarlenSegments) and doc.max_seqlen == cfg.train_seq_len
    C.assert_close("varlen logits", C.torch_logits(model, x, seg), want, 1e-5, 1e-6)
    _, grads = C.torch_loss_and_grads(model, x, y, seg)
    for name in sorted(grads):
        C.assert_close(f"varlen grad {name}", grads[name], want_grads[name], 1e-4, 1e-6)


def test_missing_bos_fails_before_any_compute():
    cfg = doc_cfg()
    for backend in (cuda_train.TorchBackend(cfg), mlx_train.MLXBackend(cfg)):
        with pytest.raises(ValueError, match="DOC_ISOLATED_ATTN.*TOKENIZER_PATH"):
            backend.build(cfg, C.random_state(cfg), train=True, bos_id=-1)


# The backends' own plumbing (segments from each micro-batch and each eval window), both MLX paths: per-segment
# calls uncompiled (composed) and the mask compiled (fused). Tolerances as test_twenty_training_steps_agree.
@pytest.mark.parametrize("mlx_ops", ["composed", "fused"])
def test_isolated_training_steps_and_scores_agree(tiny_data, tmp_path, mlx_ops):
    env = tiny_env(tiny_data, tmp_path, DOC_ISOLATED_ATTN=1, MLX_OPS=mlx_ops, GRAD_CLIP_NORM=1.0)
    cfg = Hyperparameters.from_env(env)
    data = bpb.load_eval_data(cfg)
    inner_bos = np.array([np.any(data.tokens[a + 1:a + cfg.train_seq_len] == data.bos_id) for a in data.windows[:, 0]])
    data.windows = np.concatenate([data.windows[inner_bos], data.windows[:8]])  # windows holding 2 documents
    assert inner_bos.sum() >= 4
    runs = []
    for make in (cuda_train.TorchBackend, mlx_train.MLXBackend):
        be = make(cfg)
        be.build(cfg, init_params(cfg), train=True, bos_id=data.bos_id)
        runs.append((be, loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))))
    for step in range(3):
        lt, lm = (loop.one_step(be, st, cfg, lr_multiplier(cfg, step, 0.0)) for be, st in runs)
        assert abs(lt - lm) <= 2e-4, f"step {step + 1}: torch loss {lt:.6f} mlx {lm:.6f}"
    st, sm = (be.evaluate(data) for be, _ in runs)
    assert abs(st.val_bpb - sm.val_bpb) <= 1e-5, f"val_bpb torch {st.val_bpb:.7f} mlx {sm.val_bpb:.7f}"


# End to end: each trainer trains with isolation, the other scores its artifact the same.
# CI runs torch -> MLX here and MLX -> torch in test_parity.py; --all runs both directions of both
@pytest.mark.parametrize("trainer,scorer", [pytest.param("mlx_train.py", "cuda_train.py", marks=pytest.mark.slow),
                                            ("cuda_train.py", "mlx_train.py")])
def test_isolated_artifacts_score_the_same_in_the_other_framework(tiny_data, tmp_path, trainer, scorer):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=3, WARMUP_STEPS=1, DOC_ISOLATED_ATTN=1)
    run = run_script([str(ROOT / trainer)], env, tmp_path).stdout
    assert " doc_attn:" in run, "the log must say which document-isolation kernel ran"
    trained = parse_final(run)
    scored = parse_final(run_script([str(ROOT / scorer), "--eval", env["ARTIFACT_PATH"]], env, tmp_path).stdout)
    assert abs(trained["val_bpb"] - scored["val_bpb"]) <= 1e-5, (trainer, trained, scorer, scored)


def _traceable_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False):
    """varlen_attn's maths as one traceable masked SDPA over the packed tokens (a stand-in: the real kernel is CUDA)."""
    n = query.size(0)
    seg = torch.searchsorted(cu_seq_q, torch.arange(n, dtype=torch.int32, device=query.device), right=True)
    mask = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return y[0].transpose(0, 1)


def test_varlen_path_compiles_once_per_looping_state_whatever_the_document_count(monkeypatch):
    """cu_seqlens' length follows each batch's document count; torch.compile(dynamic=False) must not trace a new
    graph per 64-entry bucket (inside the timed run, and past 8 graphs silently eager)."""
    from torch._dynamo.testing import CompileCounter
    monkeypatch.setattr(torch_model, "varlen_attn", _traceable_varlen)
    monkeypatch.setattr(torch_model, "doc_attention_kernel", lambda device, dtype: "varlen_stand_in")
    cfg = dataclasses.replace(Hyperparameters.from_env({"PRESET": "tiny_record"}), train_seq_len=128)
    model = torch_model.build_model(cfg, "cpu", init_params(cfg), torch.float32, BOS_ID)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False)
    rng = np.random.default_rng(0)
    frames, lengths = [], set()
    for bos_rate in (0.01, 0.3, 0.6, 0.01, 0.6):
        x = rng.integers(2, cfg.vocab_size, size=(2, 128))
        x[rng.random(x.shape) < bos_rate] = BOS_ID
        seg = segment_ids(x, BOS_ID, 128)
        lengths.add(len(torch_model.varlen_segments(torch.from_numpy(seg)).cu_seqlens))
        for looping in (False, True):
            model.set_looping(looping)
            with torch.no_grad():
                compiled(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(seg))
        frames.append(counter.frame_count)
    assert len(lengths) >= 3, f"the batches must need different cu_seqlens lengths: {lengths}"
    assert frames[1:] == frames[:1] * (len(frames) - 1), f"graphs traced per batch: {frames}"
