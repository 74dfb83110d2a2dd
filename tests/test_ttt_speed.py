"""torch_ttt.py's speed work keeps the numbers: the foreach AdamW step equals the per-tensor formula bit for bit
(fp32, CPU), torch's own AdamW does not (why we keep ours), and TTT_COMPILE never compiles on a CPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import torch_ttt
from shared import ttt
from shared.config import preset
from torch_model import build_model

BOS = 1


def setup_engine(**kw):
    cfg = dataclasses.replace(preset("tiny_record"), ttt_enabled=True, ttt_chunk_size=8, ttt_eval_seq_len=16,
                              ttt_batch_size=2, ttt_lora_lr=1e-2, **kw)
    engine = torch_ttt.TorchTTT(build_model(cfg, "cpu", bos_id=BOS), cfg, BOS)
    rng = np.random.default_rng(0)
    x = rng.integers(2, cfg.vocab_size, (2, 16)).astype(np.int64)
    y = rng.integers(2, cfg.vocab_size, (2, 16)).astype(np.int64)
    w = np.full((2, 16), 1 / 16, np.float32)
    return cfg, engine, (x, y, w)


def reference_update(cfg, lora: torch_ttt.TorchLoRA, bias_correction: bool = True) -> None:
    """AdamW one tensor at a time: p (1 - lr wd); m, v; p - (lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps).
    bias_correction=False: bc1 = bc2 = 1, a common slip of a hand port."""
    named = lora.params()
    grads = torch.autograd.grad(lora.loss, [t for _, t in named], allow_unused=True)
    lora.loss, lora.step = None, lora.step + 1
    b1, b2, lr, t = cfg.ttt_beta1, cfg.ttt_beta2, cfg.ttt_lora_lr, lora.step
    bc1, bc2 = (1.0 - b1 ** t, 1.0 - b2 ** t) if bias_correction else (1.0, 1.0)
    with torch.no_grad():
        for (key, p), g in zip(named, grads):
            g = torch.zeros_like(p) if g is None else g
            m = lora.m.setdefault(key, torch.zeros_like(p))
            v = lora.v.setdefault(key, torch.zeros_like(p))
            p.mul_(1.0 - lr * cfg.ttt_weight_decay)
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            p.sub_((lr / bc1) * m / (v.sqrt() / bc2 ** 0.5 + ttt.ADAM_EPS))


def steps(cfg, engine, rows, update, n=3):
    lora = engine.new_lora(ttt.lora_a_spec(cfg, 2, 0, 0))
    for _ in range(n):
        engine.forward(lora, *rows)
        update(lora)
    return [t.detach().clone() for _, t in lora.params()] + [lora.m[k].clone() for k, _ in lora.params()]


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_foreach_adamw_is_bit_identical_to_the_per_tensor_formula(beta1):
    cfg, engine, rows = setup_engine(ttt_beta1=beta1)
    ours = steps(cfg, engine, rows, engine.update)
    ref = steps(cfg, engine, rows, lambda lora: reference_update(cfg, lora))
    bad = [i for i, (a, b) in enumerate(zip(ours, ref)) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} tensors differ, first by {float((ours[bad[0]] - ref[bad[0]]).abs().max()):.3g}"
    assert any(float(t.abs().max()) > 0 for t in ours[1::2]), "B never moved: the check compared nothing"


def test_a_port_without_bias_correction_is_caught():
    """A fault far above rounding (the first steps' moments are 1/(1 - b^t) too small), so the comparison's
    power to catch it does not hang on how one BLAS or kernel rounds, as a lerp-for-mul/add port's 1-ulp
    difference would."""
    cfg, engine, rows = setup_engine(ttt_beta1=0.9)
    ours = steps(cfg, engine, rows, engine.update)
    bad = steps(cfg, engine, rows, lambda lora: reference_update(cfg, lora, bias_correction=False))
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(ours, bad))
    assert worst > 1e-3, f"a port without bias correction stayed within {worst:.2g} of the engine"


def test_ttt_compile_never_compiles_on_cpu():
    _, engine, _ = setup_engine(ttt_compile=True)
    assert not engine.compiled and engine.token_nll == engine.model.token_nll


def test_chunk_widths_are_every_width_chunk_rows_makes():
    cfg = dataclasses.replace(preset("tiny_record"), ttt_chunk_size=12, ttt_eval_seq_len=40, ttt_batch_size=3)
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 120, 30)
    tokens = np.concatenate([np.concatenate([[BOS], rng.integers(2, 50, n)]) for n in lens]).astype(np.int64)
    docs = ttt.find_docs(tokens, BOS)
    seen = set()
    for b in ttt.batch_queue(docs, cfg.ttt_batch_size):
        for c in range(ttt.n_chunks(docs[b.docs, 1].max(), cfg.ttt_chunk_size)):
            seen.add(ttt.chunk_rows(tokens, docs, b.docs, c, 12, 40, 3).x.shape[1])
    assert seen <= set(ttt.chunk_widths(cfg)) and max(seen) == 40 and ttt.chunk_widths(cfg) == [12, 24, 36, 40]
    assert ttt.warmup_widths(cfg) == [12, 24, 40]


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them eagerly (CPU, seconds)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def compiled_engine(cfg, backend):
    engine = torch_ttt.TorchTTT(build_model(cfg, "cpu", bos_id=BOS), cfg, BOS)
    engine.compiled, engine.token_nll = True, torch_ttt.TorchTTT._compiled(engine.model, backend)
    return engine


def doc_data(cfg, n_docs=9, seed=2):
    from shared.bpb import EvalData
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 3 * cfg.ttt_eval_seq_len, n_docs)
    tokens = np.concatenate([np.concatenate([[BOS], rng.integers(2, cfg.vocab_size, n)]) for n in lens])
    return EvalData(tokens.astype(np.int64), np.zeros((0, 2), np.int64), np.full(tokens.size - 1, 2, np.int32), BOS)


def test_compiled_warm_up_leaves_nothing_to_compile_and_changes_no_score():
    """After warm_up, scoring documents of every width compiles no new graph; the base weights are untouched and the
    scores equal the eager engine's (the counting backend runs dynamo's graphs eagerly, in the same order)."""
    torch._dynamo.reset()
    cfg = dataclasses.replace(preset("tiny_record"), ttt_enabled=True, ttt_chunk_size=8, ttt_eval_seq_len=32,
                              ttt_batch_size=3, phased_ttt_num_phases=0)
    data = doc_data(cfg)
    backend = CountingBackend()
    engine = compiled_engine(cfg, backend)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    assert engine.warm_up() > 0
    warmed = backend.graphs
    compiled = ttt.evaluate_ttt(engine, data, cfg)
    assert warmed >= 2 and backend.graphs == warmed, f"{backend.graphs - warmed} graphs compiled while scoring"
    assert all(torch.equal(v, engine.model.state_dict()[k]) for k, v in before.items())
    eager = ttt.evaluate_ttt(torch_ttt.TorchTTT(build_model(cfg, "cpu", bos_id=BOS), cfg, BOS), data, cfg)
    assert np.allclose(compiled.doc_nll, eager.doc_nll, rtol=1e-6, atol=1e-6)


def test_a_warm_up_on_one_width_is_caught(monkeypatch):
    """The fault: warming up on the first width only; scoring then compiles again, and the count shows it."""
    torch._dynamo.reset()
    cfg = dataclasses.replace(preset("tiny_record"), ttt_enabled=True, ttt_chunk_size=8, ttt_eval_seq_len=32,
                              ttt_batch_size=3, phased_ttt_num_phases=0)
    monkeypatch.setattr(torch_ttt, "warmup_widths", lambda c: [c.ttt_chunk_size])
    backend = CountingBackend()
    engine = compiled_engine(cfg, backend)
    engine.warm_up()
    warmed = backend.graphs
    ttt.evaluate_ttt(engine, doc_data(cfg), cfg)
    assert backend.graphs > warmed


def test_eager_engines_do_not_warm_up():
    _, engine, _ = setup_engine()
    assert engine.warm_up() == 0.0
