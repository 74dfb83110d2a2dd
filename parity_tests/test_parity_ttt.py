"""Score-first TTT (RECORD_STACK.md §7.2) in both frameworks: the same artifact-like weights, the same documents,
fp32 on the CPU, per-document NLL compared; plus isolation, determinism and fault injection.

Tolerance: TTT_PARITY_ATOL nats per scored token (a doc's NLL sum over its tokens). Each forward agrees to the
logits tolerance (rtol 1e-4); AdamW divides by sqrt(v) (eps 1e-10), so a step's size barely depends on the
gradient's magnitude and its relative error passes into the adapters about one to one; with lr 1e-2 and a few
steps per doc the adapters move ~1e-2 and carry ~1e-6 of difference. Measured: 6.7e-7 nats/token; the injected
faults move some doc by 8e-3 (o reads W_o's input), 1e-2 (looped passes share), 0.39 (no sparse gate), 3e-2 (B kept).
2e-5 sits between: 30x above the noise, 400x below the smallest fault.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import torch_model
import torch_ttt
import mlx_ttt
from parity_tests.compare import mlx_model, random_state, torch_model as build_torch
from shared import ttt
from shared.bpb import EvalData
from shared.config import preset
from shared.spec import layer_plan

BOS = 1
TTT_PARITY_ATOL = 2e-5  # nats per token; see the module docstring
LENGTHS = [3, 30, 9, 41, 4, 20, 45, 12, 25, 2, 18, 35]


def ttt_cfg(**kw):
    # one stream: two batches before the phase (cut after 6 docs) and two after, so resets happen on both sides
    base = dict(ttt_enabled=True, ttt_chunk_size=8, ttt_eval_seq_len=32, ttt_batch_size=3, ttt_streams=1,
                ttt_lora_lr=1e-2, phased_ttt_prefix_docs=6, phased_ttt_num_phases=1, global_ttt_chunk_tokens=64)
    return dataclasses.replace(preset("tiny_record"), **dict(base, **kw))


def make_data(cfg, lengths=LENGTHS, seed=0) -> EvalData:
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([np.concatenate([[BOS], rng.integers(2, cfg.vocab_size, n)]) for n in lengths])
    return EvalData(tokens.astype(np.int64), None, rng.integers(1, 5, tokens.size - 1).astype(np.int32), BOS)


def run_torch(cfg, state, data, **kw):
    return ttt.evaluate_ttt(torch_ttt.TorchTTT(build_torch(cfg, state), cfg, BOS), data, cfg, **kw)


def run_mlx(cfg, state, data):
    return ttt.evaluate_ttt(mlx_ttt.MLXTTT(mlx_model(cfg, state), cfg, BOS), data, cfg)


def per_token_gap(a: ttt.TTTResult, b: ttt.TTTResult) -> float:
    n = np.asarray(a.docs[:, 1], np.float64)
    return float(np.max(np.abs(a.doc_nll - b.doc_nll) / n))


def check_parity(a: ttt.TTTResult, b: ttt.TTTResult) -> None:
    gap = per_token_gap(a, b)
    assert gap <= TTT_PARITY_ATOL, f"TTT per-doc nll/token: max |torch - mlx| = {gap:.3g} > {TTT_PARITY_ATOL}"
    assert abs(a.acc.val_bpb - b.acc.val_bpb) <= TTT_PARITY_ATOL, (a.acc.val_bpb, b.acc.val_bpb)


@pytest.fixture(scope="module")
def setup():
    cfg = ttt_cfg()
    state = random_state(cfg, 3)
    data = make_data(cfg)
    return cfg, state, data, run_mlx(cfg, state, data)


def test_zero_b_adapters_leave_logits_bit_identical():
    """B = 0 at every reset: the adapted forward must then be the plain one exactly, in both frameworks."""
    import mlx.core as mx
    cfg = ttt_cfg()
    state = random_state(cfg, 1)
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (3, 20))
    tm, mm = build_torch(cfg, state), mlx_model(cfg, state)
    a_init = ttt.lora_a_spec(cfg, 3, 0, 0)
    te, me = torch_ttt.TorchTTT(tm, cfg, BOS), mlx_ttt.MLXTTT(mm, cfg, BOS)
    import torch
    with torch.no_grad():
        plain = tm.logits(torch.from_numpy(ids)).numpy()
        adapted = tm.logits(torch.from_numpy(ids), None, te.apps(te.new_lora(a_init))).numpy()
    assert np.array_equal(plain, adapted)
    lora = me.new_lora(a_init)
    assert np.array_equal(np.array(mm.logits(mx.array(ids))), np.array(mm.logits(mx.array(ids), None,
                                                                                    me.apps(lora.a, lora.b))))


def test_ttt_parity_torch_mlx(setup):
    cfg, state, data, ref = setup
    res = run_torch(cfg, state, data)
    check_parity(res, ref)
    frozen = run_torch(dataclasses.replace(cfg, ttt_lora_lr=0.0, phased_ttt_num_phases=0), state, data)
    assert per_token_gap(res, frozen) > 50 * TTT_PARITY_ATOL  # TTT moved the scores: the check is not vacuous
    assert res.acc.tokens == data.tokens.size - 1


def test_ttt_is_deterministic(setup):
    cfg, state, data, ref = setup
    assert np.array_equal(run_mlx(cfg, state, data).doc_nll, ref.doc_nll)
    a, b = run_torch(cfg, state, data), run_torch(cfg, state, data)
    assert np.array_equal(a.doc_nll, b.doc_nll) and a.acc.val_bpb == b.acc.val_bpb


def test_ttt_same_for_two_ranks(setup):
    """Two simulated ranks (streams 0 and 1) add up to the one-rank doc sums bit for bit (no phase: its sync
    needs both ranks at once)."""
    cfg, state, data, _ = setup
    cfg = dataclasses.replace(cfg, phased_ttt_num_phases=0, ttt_streams=2)
    one = run_torch(cfg, state, data).doc_nll
    two = sum(run_torch(cfg, state, data, rank=r, world_size=2).doc_nll for r in range(2))
    assert np.array_equal(one, two)


def test_ttt_document_isolation(setup):
    """No phases: another doc of the same batch, or a later part of the same doc, changes nothing scored before."""
    cfg, state, data, _ = setup
    cfg = dataclasses.replace(cfg, phased_ttt_num_phases=0)
    docs = ttt.find_docs(data.tokens, BOS)
    batch = ttt.batch_queue(docs, cfg.ttt_batch_size)[0].docs  # the longest docs, scored first on stream 0
    a, b = int(batch[0]), int(batch[1])
    base = run_torch(cfg, state, data)
    other = dataclasses.replace(data, tokens=data.tokens.copy())
    s, n = docs[b]
    other.tokens[s + 1:s + n] = 2 + (other.tokens[s + 1:s + n] + 7) % (cfg.vocab_size - 2)  # same length, no BOS
    changed = run_torch(cfg, state, other)
    sa, na = docs[a]
    assert np.array_equal(base.position_nll[sa:sa + na], changed.position_nll[sa:sa + na])
    assert not np.array_equal(base.position_nll[s:s + n], changed.position_nll[s:s + n])
    c = 2  # within doc a: change tokens after chunk c
    cut = sa + (c + 1) * cfg.ttt_chunk_size
    later = dataclasses.replace(data, tokens=data.tokens.copy())
    later.tokens[cut + 1:sa + na] = 2 + (later.tokens[cut + 1:sa + na] + 5) % (cfg.vocab_size - 2)
    res = run_torch(cfg, state, later)
    assert np.array_equal(base.position_nll[sa:cut], res.position_nll[sa:cut])
    assert not np.array_equal(base.position_nll[cut:sa + na], res.position_nll[cut:sa + na])


# ---- fault injection: plausible porting mistakes in the torch side, each caught by check_parity ----
def fault_o_reads_wo_input(monkeypatch):
    last = {}
    linear_forward, add = torch_model.CastedLinear.forward, torch_model.LoRAApp.add

    def recording(self, x):
        last["x"] = x
        return linear_forward(self, x)

    def o_on_y(self, name, out, x):
        return add(self, name, out, last["x"] if name == "o" else x)  # "o" runs right after proj(y)

    monkeypatch.setattr(torch_model.CastedLinear, "forward", recording)
    monkeypatch.setattr(torch_model.LoRAApp, "add", o_on_y)


def fault_loop_shares_adapter(monkeypatch):
    apps = torch_ttt.TorchTTT.apps

    def shared(self, lora):
        plan = layer_plan(self.cfg, True)
        layers = list(plan.encoder) + list(plan.decoder)
        out = apps(self, lora)
        return [out[layers.index(i)] for i in layers] + [out[-1]]  # every pass of a layer uses its first adapter

    monkeypatch.setattr(torch_ttt.TorchTTT, "apps", shared)


def fault_no_sparse_gate_in_ttt(monkeypatch):
    gate, forward = torch_model.sparse_attn_gate, torch_ttt.TorchTTT.forward
    active = {"on": False}

    def maybe_gate(y, n, weight, scale):
        return y.float() if active["on"] else gate(y, n, weight, scale)

    def ttt_forward(self, *args):
        active["on"] = True
        try:
            return forward(self, *args)
        finally:
            active["on"] = False

    monkeypatch.setattr(torch_model, "sparse_attn_gate", maybe_gate)
    monkeypatch.setattr(torch_ttt.TorchTTT, "forward", ttt_forward)


def fault_b_not_reset(monkeypatch):
    def reset(self, lora, a_init):
        lora.m.clear(), lora.v.clear()
        lora.step, lora.loss = 0, None

    monkeypatch.setattr(torch_ttt.TorchTTT, "reset", reset)


@pytest.mark.parametrize("fault", [fault_o_reads_wo_input, fault_loop_shares_adapter, fault_no_sparse_gate_in_ttt,
                                   fault_b_not_reset])
def test_fault_injection_caught(setup, monkeypatch, fault):
    cfg, state, data, ref = setup
    fault(monkeypatch)
    with pytest.raises(AssertionError, match="TTT per-doc"):
        check_parity(run_torch(cfg, state, data), ref)



def test_mlx_compiled_ttt_follows_the_base_weights_through_a_phase(setup):
    """MLX_COMPILE (default on) compiles the LoRA forward + gradient with the base weights as graph inputs: after the
    phase's global SGD the compiled graph must read the new weights. Measured on CPU: compiled and eager agree
    exactly (gap 0); the fault, compiling without inputs=model.state (the first trace's weights frozen in), moves
    the docs after the phase by 5e-4 nats/token. 1e-6 sits between."""
    import mlx.core as mx
    cfg, state, data, compiled = setup
    assert cfg.mlx_compile
    eager = run_mlx(dataclasses.replace(cfg, mlx_compile=False), state, data)
    assert per_token_gap(compiled, eager) <= 1e-6
    engine = mlx_ttt.MLXTTT(mlx_model(cfg, state), cfg, BOS)
    engine._value_and_grad = mx.compile(mx.value_and_grad(engine._loss))  # the fault: weights not inputs
    assert per_token_gap(ttt.evaluate_ttt(engine, data, cfg), eager) > 1e-4
