"""MLX and torch twins: the same weights give the same logits, gradients, steps, artifacts and scores."""
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
from parity_tests.variants import model_choice_variants, optimizer_variants, with_knobs  # noqa: E402
from shared import bpb  # noqa: E402
from shared.artifact import load_artifact, save_artifact  # noqa: E402
from shared.config import Hyperparameters, choice_fields, fields_with_role  # noqa: E402
from shared.spec import param_shapes  # noqa: E402
from shared.runlog import parse_final, parse_train_losses  # noqa: E402

import mlx_cpu_ops  # noqa: E402
import mlx_model  # noqa: E402
import mlx_optim  # noqa: E402
import torch_model  # noqa: E402
import torch_optim  # noqa: E402
import cuda_train  # noqa: E402
import mlx_train  # noqa: E402
from shared import loop  # noqa: E402
from shared.data import TokenLoader, train_pattern  # noqa: E402
from shared.schedule import lr_multiplier  # noqa: E402
from shared.spec import init_params  # noqa: E402

BASE = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "128", "TRAIN_SEQ_LEN": "32",
                                 "TRAIN_BATCH_TOKENS": "1024", "MLX_MAX_MICROBATCH_TOKENS": "256"})
# Every architecture option either trainer offers: tied/untied head, GQA/MHA, even/odd depth (skip count),
# and every other model-tagged knob away from its default (test_every_model_field_has_a_parity_variant).
VARIANTS = {"tied_gqa": {}, "untied": {"tie_embeddings": False}, "mha": {"num_kv_heads": 4},
            "odd_depth": {"num_layers": 3}, "single_kv": {"num_kv_heads": 1, "num_layers": 1},
            "wide_mlp": {"mlp_mult": 3, "model_dim": 96, "num_heads": 6, "num_kv_heads": 3},
            "rope_softcap": {"rope_base": 500.0, "logit_softcap": 8.0, "vocab_size": 96},
            # record-stack knobs (head dim 16 in BASE): partial RoPE, LeakyReLU^2, fractional MLP_MULT, LN_SCALE
            "partial_rope": {"rope_dims": 8},
            "leaky_mlp": {"mlp_act": "leaky_relu2"},
            "frac_mlp": {"mlp_mult": 1.5, "mlp_act": "leaky_relu2", "mlp_leaky_slope": 0.25},
            "ln_scale": {"ln_scale": True, "num_layers": 3},
            "record_knobs": {"mlp_mult": 3.5, "mlp_act": "leaky_relu2", "rope_dims": 4, "ln_scale": True,
                             "num_layers": 4},
            # XSA on the last 2 of 3 layers (GQA, G = 2), on every layer of an MHA net; sigmoid-gated skips
            "xsa": {"xsa_last_n": 2, "num_layers": 3},
            "xsa_mha": {"xsa_last_n": 2, "num_layers": 2, "num_kv_heads": 4},
            "skip_gates": {"skip_gates_enabled": True, "num_layers": 5},
            "record_stack": {"mlp_mult": 3.5, "mlp_act": "leaky_relu2", "rope_dims": 4, "ln_scale": True,
                             "xsa_last_n": 4, "skip_gates_enabled": True, "num_layers": 4},
            # SmearGate; sparse attention output gate (window 10 < head dim 16, the record's scale 0.5); both with
            # the rest of the stack (the record's window 12). BOS-bearing batches: parity_tests/test_parity_gates.py
            "smear": {"smear_gate_enabled": True, "gate_window": 5},
            "sparse_gate": {"sparse_attn_gate_enabled": True, "gate_window": 10, "sparse_attn_gate_scale": 0.5},
            "record_gates": {"mlp_mult": 3.5, "mlp_act": "leaky_relu2", "rope_dims": 4, "ln_scale": True,
                             "xsa_last_n": 4, "skip_gates_enabled": True, "num_layers": 4, "smear_gate_enabled": True,
                             "sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 0.5},
            # depth recurrence: [0,1,2,1,2,1,2,3] split 4|4 (models are built looped; test_parity_loops.py runs
            # both states); two parallel lanes (layers 2, 3); then both with every other record knob:
            # looped [0,1,2,1] | [2,1,2,3,4], unlooped [0,1] | [2,3,4], lanes on layers 3, 4
            "looped": {"num_layers": 4, "num_loops": 2, "loop_start": 1, "loop_end": 2},
            "lanes": {"num_layers": 4, "parallel_start_layer": 2},
            "record_loops_lanes": {"mlp_mult": 3.5, "mlp_act": "leaky_relu2", "rope_dims": 4, "ln_scale": True,
                                   "xsa_last_n": 5, "skip_gates_enabled": True, "num_layers": 5, "num_loops": 2,
                                   "loop_start": 1, "loop_end": 2, "parallel_start_layer": 3},
            # attention within documents: batches get BOS tokens (C.plant_documents) and their segment ids
            "doc_isolated": {"doc_isolated_attn": True, "num_layers": 3, "xsa_last_n": 1},
            # every feature at once, as PRESET=tiny_record (looping states: test_parity_loops.py)
            "all_features": {"mlp_mult": 3.5, "mlp_act": "leaky_relu2", "rope_dims": 4, "ln_scale": True,
                             "xsa_last_n": 5, "skip_gates_enabled": True, "num_layers": 5, "num_loops": 2,
                             "loop_start": 1, "loop_end": 2, "parallel_start_layer": 3, "smear_gate_enabled": True,
                             "sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 0.5,
                             "doc_isolated_attn": True}}
VARIANTS.update(model_choice_variants())  # every value of every enumerated model knob (parity_tests/variants.py)
RECORD_VARIANTS = ["partial_rope", "leaky_mlp", "frac_mlp", "ln_scale", "record_knobs", "xsa", "xsa_mha",
                   "skip_gates", "record_stack", "smear", "sparse_gate", "record_gates", "looped", "lanes",
                   "record_loops_lanes", "doc_isolated", "all_features"]
MLX_OPS = {"composed": mlx_cpu_ops.ComposedOps, "fused": mlx_cpu_ops.FusedOps}


def cfg_for(variant: str) -> Hyperparameters:
    return dataclasses.replace(BASE, **VARIANTS[variant])


def batch(cfg: Hyperparameters, n: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(n, cfg.train_seq_len + 1))
    if cfg.doc_isolated_attn:  # several documents per row, or isolation is not exercised
        ids = C.plant_documents(ids, seed)
    return ids[:, :-1], ids[:, 1:]


# 1. name/shape contract: both models hold exactly the rows of shared/spec.py's table
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_names_and_shapes_are_identical(variant):
    check_names_and_shapes(cfg_for(variant))


def check_names_and_shapes(cfg: Hyperparameters) -> None:
    t = {k: tuple(p.shape) for k, p in torch_model.GPT(cfg).named_parameters()}
    from mlx.utils import tree_flatten
    m = {k: tuple(p.shape) for k, p in tree_flatten(mlx_model.GPT(cfg).parameters())}
    table = param_shapes(cfg)
    assert t == m == table, {"only_torch": set(t) - set(table), "only_mlx": set(m) - set(table),
                             "only_table": set(table) - set(t) - set(m)}


def test_every_model_field_has_a_parity_variant():
    """A new architecture knob must come with a variant that moves it, or no parity test covers it."""
    values = {name: {getattr(cfg_for(v), name) for v in VARIANTS} for name in fields_with_role("model")}
    unexercised = sorted(name.upper() for name, seen in values.items() if len(seen) < 2)
    assert not unexercised, f"model knobs no parity variant changes: {unexercised}"
    unseen = sorted(f"{name.upper()}={v}" for name, allowed in choice_fields("model").items() for v in allowed
                    if v not in values[name])
    assert not unseen, f"values of enumerated model knobs no parity variant runs: {unseen}"


def check_forward(cfg: Hyperparameters, ops) -> None:
    state = C.random_state(cfg)
    x, y = batch(cfg)
    seg = C.segments_for(cfg, x)
    tm, mm = C.torch_model(cfg, state), C.mlx_model(cfg, state, ops)
    C.assert_close("logits", C.mlx_logits(mm, x, seg), C.torch_logits(tm, x, seg), C.LOGITS_RTOL, C.LOGITS_ATOL)
    lt, _ = C.torch_loss_and_grads(tm, x, y, seg)
    lm, _ = C.mlx_loss_and_grads(mm, x, y, seg)
    assert abs(lt - lm) <= C.LOSS_ATOL, f"loss: torch {lt:.8f} mlx {lm:.8f} diff {abs(lt - lm):.3e}"


# 2. forward
@pytest.mark.parametrize("ops", MLX_OPS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_logits_and_loss_agree(variant, ops):
    check_forward(cfg_for(variant), MLX_OPS[ops])


def check_backward(cfg: Hyperparameters, ops) -> None:
    state = C.random_state(cfg, seed=2)
    x, y = batch(cfg, seed=3)
    seg = C.segments_for(cfg, x)
    _, gt = C.torch_loss_and_grads(C.torch_model(cfg, state), x, y, seg)
    _, gm = C.mlx_loss_and_grads(C.mlx_model(cfg, state, ops), x, y, seg)
    assert set(gt) == set(gm)
    for name in sorted(gt):
        C.assert_close(f"grad {name}", gm[name], gt[name], C.GRAD_RTOL, C.GRAD_ATOL)


# 3. backward
@pytest.mark.parametrize("ops", MLX_OPS)
@pytest.mark.parametrize("variant", ["tied_gqa", "untied", "odd_depth"] + RECORD_VARIANTS + list(model_choice_variants()))
def test_gradients_agree(variant, ops):
    check_backward(cfg_for(variant), MLX_OPS[ops])


# 4. optimizer: two steps (momentum and Adam bias correction both matter on the second)
# Decoupled weight decay, each group its own value (a swap between groups shows); larger than the record's
# (0.095, 0.085, 0.02) so that every fault in parity_tests/test_parity_optim.py moves a weight past the tolerance.
WEIGHT_DECAY = {"muon_wd": 0.3, "embed_wd": 0.2, "adam_wd": 0.1}


# The record's orthogonalisation (RECORD_STACK.md §5.3): Polar Express tuples, MuonEq-R row normalisation, both.
POLAR = {"muon_ns": "polar_express"}
ROW_NORM = {"muon_row_normalize": True}


@pytest.mark.parametrize("variant,decay", [("tied_gqa", {}), ("untied", {}), ("tied_gqa", WEIGHT_DECAY),
                                           ("untied", WEIGHT_DECAY), ("tied_gqa", POLAR), ("untied", ROW_NORM),
                                           ("untied", dict(POLAR, **ROW_NORM, **WEIGHT_DECAY))],
                         ids=["tied_gqa", "untied", "tied_gqa_wd", "untied_wd", "tied_gqa_polar", "untied_rownorm",
                              "untied_polar_rownorm_wd"])
def test_muon_and_adam_steps_agree(variant, decay):
    cfg = dataclasses.replace(cfg_for(variant), grad_clip_norm=0.5, **decay)  # clipping on: random grads are large
    state = C.random_state(cfg, seed=4)
    check_optimizer_steps(cfg, state)


@pytest.mark.parametrize("knob", optimizer_variants())
@pytest.mark.parametrize("variant", ["tied_gqa", "untied"])
def test_every_optimizer_knob_moves_both_twins_alike(variant, knob):
    """Each knob an optimizer reads (config metadata), off its default: the two steps still agree."""
    cfg = with_knobs(cfg_for(variant), optimizer_variants()[knob])
    check_optimizer_steps(cfg, C.random_state(cfg, seed=4))


def check_optimizer_steps(cfg: Hyperparameters, state: dict, lr_scale: float = 0.7) -> None:
    t_opts = torch_optim.Optimizers(tm := C.torch_model(cfg, state), cfg, torch.float32)
    m_opts = mlx_optim.Optimizers(mm := C.mlx_model(cfg, state), cfg, mx.float32)
    rng = np.random.default_rng(5)
    for step in range(2):
        grads = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in state.items()}
        for k, p in tm.named_parameters():
            p.grad = torch.from_numpy(grads[k].copy())
        t_opts.step(lr_scale, 0.9)
        m_opts.step({k: mx.array(v) for k, v in grads.items()}, lr_scale, 0.9)
        tw, mw = torch_model.numpy_state(tm), mlx_model.numpy_state(mm)
        for name in sorted(tw):
            C.assert_close(f"step {step + 1} weight {name}", mw[name], tw[name], 1e-5, 1e-6)
    ts, ms = t_opts.slots(), m_opts.slots()
    for name in sorted(ts):
        for slot in ts[name]:
            C.assert_close(f"optimizer slot {name}:{slot}", ms[name][slot], ts[name][slot], 1e-5, 1e-6)


# 5. training
def test_twenty_training_steps_agree(tiny_data, tmp_path):
    """Same init (shared numpy), same tokens, 20 steps of each Trainer.

    Tolerance 2e-4 per step: fp32 kernels sum in different orders (~1e-7 relative per op), the MLX CPU
    ops use a polynomial exp (~1e-7), and Muon's Newton-Schulz can amplify tiny differences between
    near-equal singular values. Measured: at most 9.1e-6 over 20 steps (demo data, vocab 1024, seq 32),
    so 2e-4 leaves 20x headroom while a real drift (RoPE sign, eps, a missing term, a wrong learning
    rate) moves the loss by far more within a few steps.
    """
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=20, WARMUP_STEPS=0, GRAD_CLIP_NORM=1.0)
    cfg = Hyperparameters.from_env(env)
    runs = []
    for make in (cuda_train.TorchBackend, mlx_train.MLXBackend):
        be = make(cfg)
        be.build(cfg, init_params(cfg), train=True)
        runs.append((be, loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))))
    for step in range(20):
        scale = lr_multiplier(cfg, step, 0.0)
        (bt, st_t), (bm, st_m) = runs
        lt, lm = loop.one_step(bt, st_t, cfg, scale), loop.one_step(bm, st_m, cfg, scale)
        assert abs(lt - lm) <= 2e-4, f"step {step + 1}: torch loss {lt:.6f} mlx {lm:.6f} diff {abs(lt - lm):.3e}"


# 6. artifacts, both directions
@pytest.mark.parametrize("direction", ["torch_to_mlx", "mlx_to_torch"])
def test_artifact_dequantizes_bit_identically_and_scores_the_same(tiny_data, tmp_path, direction):
    env = tiny_env(tiny_data, tmp_path)
    cfg = Hyperparameters.from_env(env)
    state = C.random_state(cfg, seed=6)
    source = C.torch_model(cfg, state) if direction == "torch_to_mlx" else C.mlx_model(cfg, state)
    exported = torch_model.numpy_state(source) if direction == "torch_to_mlx" else mlx_model.numpy_state(source)
    path = tmp_path / "a.int8.zst"
    save_artifact(path, exported, cfg)
    loaded, _ = load_artifact(path)
    tm, mm = C.torch_model(cfg, loaded), C.mlx_model(cfg, loaded)
    tw, mw = torch_model.numpy_state(tm), mlx_model.numpy_state(mm)
    for name in loaded:
        assert np.array_equal(tw[name], loaded[name]) and np.array_equal(mw[name], loaded[name]), name
    data = bpb.load_eval_data(cfg)
    st = C.score_torch(tm, cfg, data.tokens, data.windows, data.target_bytes)
    sm = C.score_mlx(mm, cfg, data.tokens, data.windows, data.target_bytes)
    assert (st.tokens, st.bytes) == (sm.tokens, sm.bytes)
    assert abs(st.val_bpb - sm.val_bpb) <= 1e-6, f"val_bpb torch {st.val_bpb:.9f} mlx {sm.val_bpb:.9f}"


# 7. end to end through the command lines
# CI runs MLX -> torch here and torch -> MLX in test_leaks_docs.py; --all runs both directions of both
@pytest.mark.parametrize("trainer,scorer", [("mlx_train.py", "cuda_train.py"),
                                            pytest.param("cuda_train.py", "mlx_train.py", marks=pytest.mark.slow)])
def test_command_lines_score_each_others_artifacts(tiny_data, tmp_path, trainer, scorer):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=8)
    trained = parse_final(run_script([str(ROOT / trainer)], env, tmp_path).stdout)
    scored = parse_final(run_script([str(ROOT / scorer), "--eval", env["ARTIFACT_PATH"]], env, tmp_path).stdout)
    assert abs(trained["val_bpb"] - scored["val_bpb"]) <= 1e-5, (trainer, trained, scorer, scored)


# 8. distributed
@pytest.mark.slow  # CI keeps torchrun in tests/test_trainers.py's two-rank resume and test_parallel_muon.py
def test_torchrun_eval_and_training_equal_one_process(tiny_data, tmp_path):
    one_env = tiny_env(tiny_data, tmp_path / "one", ITERATIONS=6)
    two_env = tiny_env(tiny_data, tmp_path / "two", ITERATIONS=6)
    trainer = str(ROOT / "cuda_train.py")
    one = run_script([trainer], one_env, tmp_path).stdout
    two = run_script([trainer], two_env, tmp_path, torchrun=2).stdout
    l1, l2 = parse_train_losses(one), parse_train_losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for s in l1:  # logged at 4 decimals; the two sum gradients in a different order
        assert abs(l1[s] - l2[s]) <= 2e-4, f"step {s}: 1 process {l1[s]} 2 processes {l2[s]}"
    ev1 = parse_final(run_script([trainer, "--eval", two_env["ARTIFACT_PATH"]], two_env, tmp_path).stdout)
    ev2 = parse_final(run_script([trainer, "--eval", two_env["ARTIFACT_PATH"]], two_env, tmp_path, torchrun=2).stdout)
    assert abs(ev1["val_bpb"] - ev2["val_bpb"]) <= 1e-7, (ev1, ev2)
    assert abs(parse_final(one)["val_bpb"] - ev1["val_bpb"]) <= 1e-4


# The checks must catch a broken twin.
def _flipped_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # +theta: the official MLX bug


@pytest.mark.parametrize("fault", ["rope_sign", "rms_eps", "softcap"])
def test_injected_faults_are_caught(monkeypatch, fault):
    cfg = cfg_for("tied_gqa")
    if fault == "rope_sign":
        monkeypatch.setattr(mlx_model, "apply_rotary_emb", _flipped_rope)
    elif fault == "rms_eps":
        monkeypatch.setattr(mlx_model, "RMS_NORM_EPS", 1e-1)
    else:
        cfg = dataclasses.replace(cfg, logit_softcap=15.0)
        orig = mlx_model.GPT.__init__

        def init(self, c, *a, **k):
            orig(self, dataclasses.replace(c, logit_softcap=30.0), *a, **k)
        monkeypatch.setattr(mlx_model.GPT, "__init__", init)
    with pytest.raises(AssertionError, match="logits: max abs diff"):
        check_forward(cfg, mlx_cpu_ops.ComposedOps)
    with pytest.raises(AssertionError, match="grad "):
        check_backward(cfg, mlx_cpu_ops.ComposedOps)


def test_full_width_rope_dims_is_todays_rope_bit_for_bit():
    """ROPE_DIMS=0 (all dims) and ROPE_DIMS=head_dim must be the same computation, to the bit, in both models."""
    full, explicit = BASE, dataclasses.replace(BASE, rope_dims=BASE.head_dim)
    state = C.random_state(full)
    x, _ = batch(full)
    for model, logits in ((C.torch_model, C.torch_logits), (C.mlx_model, C.mlx_logits)):
        assert np.array_equal(logits(model(full, state), x), logits(model(explicit, state), x)), model


def _adjacent_pair_rope(x, cos, sin):
    """Partial RoPE ported with interleaved pairs (j, j+1) instead of the half-split (j, j+K/2)."""
    k = 2 * cos.shape[-1]
    x1, x2 = x[..., 0:k:2], x[..., 1:k:2]
    r1, r2 = x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos
    return mx.concatenate([mx.stack([r1, r2], axis=-1).reshape(*x.shape[:-1], k), x[..., k:]], axis=-1)


def _leaky_slope_squared(self, x):
    x = self.fc(x)
    x = mx.where(x > 0, x, (self.slope ** 2) * x)
    return self.proj(mx.square(x))


def _leaky_wrong_side(self, x):
    x = self.fc(x)
    x = mx.where(x > 0, self.slope * x, x)
    return self.proj(mx.square(x))


def _ln_scale_before_norm(self, x):
    return mlx_model.rms_norm(x * self.scale)


@pytest.mark.parametrize("fault", ["rope_adjacent_pairs", "leaky_slope_squared", "leaky_wrong_side",
                                   "ln_scale_from_1", "ln_scale_before_norm"])
def test_injected_record_knob_faults_are_caught(monkeypatch, fault):
    cfg = cfg_for("record_knobs")
    if fault == "rope_adjacent_pairs":
        monkeypatch.setattr(mlx_model, "apply_rotary_emb", _adjacent_pair_rope)
    elif fault == "leaky_slope_squared":
        monkeypatch.setattr(mlx_model.MLP, "__call__", _leaky_slope_squared)
    elif fault == "leaky_wrong_side":
        monkeypatch.setattr(mlx_model.MLP, "__call__", _leaky_wrong_side)
    elif fault == "ln_scale_from_1":
        orig = mlx_model.Block.__init__

        def init(self, c, layer_idx, *a, **k):
            orig(self, c, layer_idx + 1, *a, **k)  # c_i = 1/sqrt(i+2)
        monkeypatch.setattr(mlx_model.Block, "__init__", init)
    else:
        monkeypatch.setattr(mlx_model.RMSNorm, "__call__", _ln_scale_before_norm)
    with pytest.raises(AssertionError, match="logits: max abs diff"):
        check_forward(cfg, mlx_cpu_ops.ComposedOps)
    with pytest.raises(AssertionError, match="grad "):
        check_backward(cfg, mlx_cpu_ops.ComposedOps)


def _xsa_wrong_kv_head(y, v):
    """GQA mapped the other common way: query head h against KV head h % Hkv instead of h // G."""
    g = y.shape[1] // v.shape[1]
    v = mx.tile(v.astype(mx.float32), (1, g, 1, 1))  # head h -> kv head h % Hkv
    v_hat = v / mx.sqrt(mx.sum(mx.square(v), axis=-1, keepdims=True) + mlx_model.XSA_EPS)
    y = y.astype(mx.float32)
    return y - mx.sum(y * v_hat, axis=-1, keepdims=True) * v_hat


def _xsa_unnormalised(y, v):
    """XSA projecting on v itself instead of v / ||v||."""
    bsz, heads, seqlen, head_dim = y.shape
    kv = v.shape[1]
    y = y.astype(mx.float32).reshape(bsz, kv, heads // kv, seqlen, head_dim)
    v = v.astype(mx.float32)[:, :, None]
    return (y - mx.sum(y * v, axis=-1, keepdims=True) * v).reshape(bsz, heads, seqlen, head_dim)


def _skip_lerp_reversed(x, skip, gate):
    g = mx.sigmoid(gate)
    return g * skip + (1 - g) * x


def _skip_gate_without_sigmoid(x, skip, gate):
    return gate * x + (1 - gate) * skip


@pytest.mark.parametrize("fault", ["xsa_wrong_kv_head", "xsa_unnormalised", "skip_lerp_reversed",
                                   "skip_gate_without_sigmoid"])
def test_injected_xsa_and_skip_gate_faults_are_caught(monkeypatch, fault):
    cfg = cfg_for("record_stack")
    fake = {"xsa_wrong_kv_head": _xsa_wrong_kv_head, "xsa_unnormalised": _xsa_unnormalised,
            "skip_lerp_reversed": _skip_lerp_reversed, "skip_gate_without_sigmoid": _skip_gate_without_sigmoid}[fault]
    monkeypatch.setattr(mlx_model, "exclusive_self_attention" if fault.startswith("xsa") else "gated_skip", fake)
    with pytest.raises(AssertionError, match="logits: max abs diff"):
        check_forward(cfg, mlx_cpu_ops.ComposedOps)
    with pytest.raises(AssertionError, match="grad "):
        check_backward(cfg, mlx_cpu_ops.ComposedOps)


def test_injected_mlp_hidden_rounding_is_caught(monkeypatch):
    """A twin that sizes the MLP its own way (the old int MLP_MULT: int(1.5) * dim) fails the shape contract."""
    cfg = cfg_for("frac_mlp")
    monkeypatch.setattr(mlx_model, "mlp_hidden", lambda c: int(c.mlp_mult) * c.model_dim)
    with pytest.raises(AssertionError, match="only_mlx"):
        check_names_and_shapes(cfg)
    with pytest.raises(ValueError, match="mlp.fc.weight: state has shape"):
        check_forward(cfg, mlx_cpu_ops.ComposedOps)


def _per_tensor_clip(grads, max_norm):
    """A plausible port of clipping: each tensor clipped alone instead of the global norm."""
    return {k: g * mx.minimum(max_norm / (mx.sqrt(mx.sum(g * g)) + 1e-6), 1.0) for k, g in grads.items()}


def _plain_momentum_update(self, params, grads):
    """Muon without Nesterov: the update is the buffer, not grad + momentum * buffer."""
    for n in self.names:
        buf = self.state.setdefault(n, {}).get("momentum", mx.zeros_like(grads[n])) * self.momentum + grads[n]
        self.state[n]["momentum"] = buf
        g = mlx_optim.zeropower_via_newtonschulz5(buf, self.backend_steps, self.ns_dtype)
        params[n] = params[n] - self.lr * g * max(1.0, g.shape[0] / g.shape[1]) ** 0.5


def _uncorrected_adam_update(self, params, grads):
    """Adam without bias correction (a common hand-port slip)."""
    for n in self.names:
        st = self.state.setdefault(n, {"m": mx.zeros_like(params[n]), "v": mx.zeros_like(params[n]), "step": 0.0})
        st["step"] += 1.0
        st["m"] = st["m"] + (1.0 - self.beta1) * (grads[n] - st["m"])
        st["v"] = st["v"] * self.beta2 + (1.0 - self.beta2) * (grads[n] * grads[n])
        params[n] = params[n] - self.lr * (st["m"] / (mx.sqrt(st["v"]) + self.eps))


@pytest.mark.parametrize("fault", ["per_tensor_clip", "no_nesterov", "no_bias_correction"])
def test_injected_optimizer_faults_are_caught(monkeypatch, fault):
    cfg = dataclasses.replace(cfg_for("untied"), grad_clip_norm=0.5)
    if fault == "per_tensor_clip":
        monkeypatch.setattr(mlx_optim, "clip_grad_norm", _per_tensor_clip)
    elif fault == "no_nesterov":
        monkeypatch.setattr(mlx_optim.Muon, "update", _plain_momentum_update)
    else:
        monkeypatch.setattr(mlx_optim.Adam, "update", _uncorrected_adam_update)
    with pytest.raises(AssertionError, match="weight|slot"):
        check_optimizer_steps(cfg, C.random_state(cfg, seed=4))


def test_user_command_reports_both_scores(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=3)
    run_script([str(ROOT / "mlx_train.py")], env, tmp_path)
    res = run_script(["-m", "parity_tests", env["ARTIFACT_PATH"], "--data-path", env["DATA_PATH"],
                      "--tokenizer-path", env["TOKENIZER_PATH"], "--windows", "40"], env, ROOT)
    assert "fp32 logits: max_abs_diff:" in res.stdout and "verdict:PASS" in res.stdout, res.stdout
    line = next(l for l in res.stdout.splitlines() if l.startswith("fp32 val_bpb"))
    assert "torch:" in line and "mlx:" in line and " ok (tol" in line, line


def test_a_torch_checkpoint_resumes_in_mlx(tiny_data, tmp_path):
    """Checkpoints are framework-neutral: MLX continues a torch run to the same losses."""
    ck = str(tmp_path / "ck_{step}.ckpt")
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=10, CHECKPOINT_EVERY=5, CHECKPOINT_PATH=ck)
    torch_run = run_script([str(ROOT / "cuda_train.py")], env, tmp_path).stdout
    env_m = dict(env, ARTIFACT_PATH=str(tmp_path / "m.int8.zst"), CHECKPOINT_PATH=str(tmp_path / "m_{step}.ckpt"))
    mlx_run = run_script([str(ROOT / "mlx_train.py"), "--resume", ck.format(step=5)], env_m, tmp_path).stdout
    lt, lm = parse_train_losses(torch_run), parse_train_losses(mlx_run)
    assert sorted(lm) == list(range(6, 11))
    for s in lm:  # logged at 4 decimals
        assert abs(lt[s] - lm[s]) <= 2e-4, f"step {s}: torch {lt[s]} mlx (resumed) {lm[s]}"
    assert abs(parse_final(torch_run)["val_bpb"] - parse_final(mlx_run)["val_bpb"]) <= 1e-4


def test_injected_xsa_on_the_first_layers_is_caught(monkeypatch):
    """XSA_LAST_N counted from the wrong end (the first n layers instead of the last n)."""
    cfg = cfg_for("xsa")  # XSA on layers 1, 2 of 3; the fault puts it on 0, 1
    orig = mlx_model.Block.__init__

    def init(self, c, layer_idx, *a, **k):
        orig(self, c, layer_idx, *a, **k)
        self.attn.xsa = layer_idx < c.xsa_last_n
    monkeypatch.setattr(mlx_model.Block, "__init__", init)
    with pytest.raises(AssertionError, match="logits: max abs diff"):
        check_forward(cfg, mlx_cpu_ops.ComposedOps)


# Nothing leaks from later tokens: checked in each framework on its own, with every feature built so far on.
def _future_changes_nothing(logits_fn, cfg: Hyperparameters, t: int) -> float:
    """Max change of the logits at positions <= t when every token after t is replaced."""
    x, _ = batch(cfg, n=2, seed=7)
    other = x.copy()
    other[:, t + 1:] = (other[:, t + 1:] + 1 + np.arange(other.shape[1] - t - 1)) % cfg.vocab_size
    return float(np.abs(logits_fn(x)[:, :t + 1] - logits_fn(other)[:, :t + 1]).max())


@pytest.mark.parametrize("framework", ["torch", "mlx_composed", "mlx_fused"])
def test_no_logit_sees_a_later_token(framework):
    cfg = cfg_for("record_stack")
    state = C.random_state(cfg, seed=8)
    if framework == "torch":
        model = C.torch_model(cfg, state)
        fn = lambda ids: C.torch_logits(model, ids)  # noqa: E731
    else:
        model = C.mlx_model(cfg, state, MLX_OPS[framework.split("_")[1]])
        fn = lambda ids: C.mlx_logits(model, ids)  # noqa: E731
    for t in (0, 5, cfg.train_seq_len - 2):
        assert _future_changes_nothing(fn, cfg, t) == 0.0, f"{framework}: a token after {t} changed a logit at <= {t}"


def test_injected_attention_leak_is_caught(monkeypatch):
    """The leak test must fail when the causal mask is dropped (a full softmax over all positions)."""
    def full_attention(q, k, v, scale, mask=None):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    monkeypatch.setattr(mlx_cpu_ops.FusedOps, "attention", staticmethod(full_attention))
    cfg = cfg_for("record_stack")
    model = C.mlx_model(cfg, C.random_state(cfg, seed=8), mlx_cpu_ops.FusedOps)
    assert _future_changes_nothing(lambda ids: C.mlx_logits(model, ids), cfg, 5) > 0.0
