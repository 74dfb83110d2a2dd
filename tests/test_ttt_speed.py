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


def reference_update(cfg, lora: torch_ttt.TorchLoRA, lerp: bool = False) -> None:
    """AdamW one tensor at a time: p (1 - lr wd); m, v; p - (lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps).
    lerp=True: m <- lerp(m, g, 1 - b1) as torch.optim.AdamW writes it (a plausible port)."""
    named = lora.params()
    grads = torch.autograd.grad(lora.loss, [t for _, t in named], allow_unused=True)
    lora.loss, lora.step = None, lora.step + 1
    b1, b2, lr, t = cfg.ttt_beta1, cfg.ttt_beta2, cfg.ttt_lora_lr, lora.step
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    with torch.no_grad():
        for (key, p), g in zip(named, grads):
            g = torch.zeros_like(p) if g is None else g
            m = lora.m.setdefault(key, torch.zeros_like(p))
            v = lora.v.setdefault(key, torch.zeros_like(p))
            p.mul_(1.0 - lr * cfg.ttt_weight_decay)
            m.lerp_(g, 1.0 - b1) if lerp else m.mul_(b1).add_(g, alpha=1.0 - b1)
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


def test_a_lerp_port_of_the_moment_is_caught():
    cfg, engine, rows = setup_engine(ttt_beta1=0.9)
    ours = steps(cfg, engine, rows, engine.update)
    lerp = steps(cfg, engine, rows, lambda lora: reference_update(cfg, lora, lerp=True))
    assert not all(torch.equal(a, b) for a, b in zip(ours, lerp))


def test_ttt_compile_never_compiles_on_cpu():
    _, engine, _ = setup_engine(ttt_compile=True)
    assert not engine.compiled and engine.token_nll == engine.model.token_nll
