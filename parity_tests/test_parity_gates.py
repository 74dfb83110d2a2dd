"""SmearGate and the sparse attention output gate: knobs, rows, parity on BOS-bearing batches, injected porting
faults, and leaks (later tokens; the token before a BOS)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from parity_tests import compare as C  # noqa: E402
from parity_tests import test_parity as P  # noqa: E402
from shared import quant  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.manifest import BOS_ID  # noqa: E402
from shared.spec import init_params, param_table  # noqa: E402

import mlx_cpu_ops  # noqa: E402
import mlx_model  # noqa: E402
import torch_model  # noqa: E402

GATE_VARIANTS = ["smear", "sparse_gate", "record_gates"]
_random_batch, _real_gate, _real_norm_call = P.batch, mlx_model.sparse_attn_gate, mlx_model.RMSNorm.__call__


def bos_batch(cfg: Hyperparameters, n: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """P.batch with BOS at fixed places: row starts, mid-row, a "BOS BOS" pair. Random ids over a 128-token vocab
    rarely hold BOS (none in the seeds the checks use), and a wrong BOS mask is invisible without one."""
    x, y = _random_batch(cfg, n, seed)
    ids = np.concatenate([x, y[:, -1:]], axis=1)
    ids[:, 6::9] = BOS_ID
    ids[0, 0] = ids[1, 3] = ids[1, 4] = ids[n - 1, ids.shape[1] - 2] = BOS_ID
    return ids[:, :-1], ids[:, 1:]


@pytest.fixture(autouse=True)
def _bos_in_every_batch(monkeypatch):
    monkeypatch.setattr(P, "batch", bos_batch)  # check_forward/backward and the leak helper read P.batch


# 1. knobs and parameter rows
def test_gate_window_is_validated_only_when_a_gate_is_on():
    for knob in ("SMEAR_GATE_ENABLED", "SPARSE_ATTN_GATE_ENABLED"):
        for window in ("0", "65"):
            with pytest.raises(ValueError, match="GATE_WINDOW"):
                Hyperparameters.from_env({"PRESET": "tiny", knob: "1", "GATE_WINDOW": window})
        assert Hyperparameters.from_env({"PRESET": "tiny", knob: "1", "GATE_WINDOW": "64"}).gate_window == 64
    assert Hyperparameters.from_env({"PRESET": "tiny", "GATE_WINDOW": "0"}).gate_window == 0  # no gate: unread
    cfg = Hyperparameters()
    assert (cfg.smear_gate_enabled, cfg.gate_window, cfg.sparse_attn_gate_enabled,
            cfg.sparse_attn_gate_scale) == (False, 12, False, 1.0)


def test_gate_rows_exist_only_when_enabled_and_leave_the_init_alone():
    cfg = P.cfg_for("record_gates")
    rows = {p.name: p for p in param_table(cfg)}
    want = {"smear_gate.weight": (1, 12), "smear_lambda": (1,)}
    want.update({f"blocks.{i}.attn.attn_gate_w": (cfg.num_heads, 12) for i in range(cfg.num_layers)})
    for name, shape in want.items():
        store = "gate" if name.endswith("attn_gate_w") else "control"  # 'gate': int8 per row under QUANT=gptq
        assert (rows[name].shape, rows[name].init, rows[name].group, rows[name].store) == (shape, "zeros", "scalar",
                                                                                           store), name
    plain = {p.name for p in param_table(dataclasses.replace(cfg, smear_gate_enabled=False,
                                                             sparse_attn_gate_enabled=False))}
    assert plain == set(rows) - set(want)
    gated, base = init_params(cfg), init_params(dataclasses.replace(cfg, smear_gate_enabled=False,
                                                                    sparse_attn_gate_enabled=False))
    assert all(not gated.pop(k).any() for k in want) and gated.keys() == base.keys()  # zeros draw nothing
    assert all(np.array_equal(gated[k], base[k]) for k in base)


def test_gate_rows_survive_the_artifact_quantizer_exactly():
    """'control' and 'gate' rows of this size stay fp32 in the int8 scheme (QUANT=gptq stores gates int8)."""
    cfg = P.cfg_for("record_gates")
    state = C.random_state(cfg)
    tensors, index = quant.scheme(quant.DEFAULT_SCHEME).quantize(state, {p.name: p.store for p in param_table(cfg)})
    back = quant.scheme(quant.DEFAULT_SCHEME).dequantize(tensors, index)
    for name in ["smear_gate.weight", "smear_lambda"] + [f"blocks.{i}.attn.attn_gate_w" for i in range(4)]:
        assert np.array_equal(back[name], state[name]), name


def test_zero_init_smear_is_the_identity_bit_for_bit():
    """lambda = 0 at init: e + 0 * e_prev is e exactly, in both models."""
    cfg = P.cfg_for("smear")
    plain = dataclasses.replace(cfg, smear_gate_enabled=False)
    state = C.random_state(plain)
    gated = dict(state, **{k: v for k, v in init_params(cfg).items() if k.startswith("smear")})
    x, _ = bos_batch(cfg)
    assert np.array_equal(C.torch_logits(C.torch_model(cfg, gated), x), C.torch_logits(C.torch_model(plain, state), x))
    assert np.array_equal(C.mlx_logits(C.mlx_model(cfg, gated), x), C.mlx_logits(C.mlx_model(plain, state), x))


@pytest.mark.parametrize("bos_id", [None, -1])
def test_smear_without_a_bos_id_names_the_knob_and_the_tokenizer(bos_id):
    cfg = P.cfg_for("smear")
    state = C.random_state(cfg)
    x, _ = bos_batch(cfg)
    for model, logits in ((C.torch_model(cfg, state, bos_id=bos_id), C.torch_logits),
                          (C.mlx_model(cfg, state, bos_id=bos_id), C.mlx_logits)):
        with pytest.raises(ValueError, match="SMEAR_GATE_ENABLED.*TOKENIZER_PATH"):
            logits(model, x)


# 2. parity with BOS in the batch (test_parity.py runs the same variants on BOS-free random ids)
@pytest.mark.parametrize("ops", P.MLX_OPS)
@pytest.mark.parametrize("variant", GATE_VARIANTS)
def test_gate_variants_agree_on_batches_with_bos(variant, ops):
    assert (P.batch(P.cfg_for(variant))[0] == BOS_ID).sum() >= 8
    P.check_forward(P.cfg_for(variant), P.MLX_OPS[ops])
    P.check_backward(P.cfg_for(variant), P.MLX_OPS[ops])


# 3. injected porting faults (MLX side) that the parity checks must catch
def _smear_mask_on_previous_token(e, ids, weight, lam, bos_id):
    e = e.astype(mx.float32)
    g = lam * mx.sigmoid(mx.sum(e[..., :weight.shape[-1]] * weight[0], axis=-1, keepdims=True))
    keep = (ids[:, :-1] != bos_id).astype(mx.float32)[..., None]  # the token before, not the current one
    return mx.concatenate([e[:, :1], e[:, 1:] + g[:, 1:] * keep * e[:, :-1]], axis=1)


def _smear_gate_reads_normed(e, ids, weight, lam, bos_id):
    normed = mlx_model.rms_norm(e)  # the gate input after the norm instead of the raw embedding
    g = lam * mx.sigmoid(mx.sum(normed[..., :weight.shape[-1]] * weight[0], axis=-1, keepdims=True))
    keep = (ids[:, 1:] != bos_id).astype(mx.float32)[..., None]
    return mx.concatenate([e[:, :1], e[:, 1:] + g[:, 1:] * keep * e[:, :-1]], axis=1)


def _smear_wraps_around(e, ids, weight, lam, bos_id):
    g = lam * mx.sigmoid(mx.sum(e[..., :weight.shape[-1]] * weight[0], axis=-1, keepdims=True))
    keep = (ids != bos_id).astype(mx.float32)[..., None]
    return e + g * keep * mx.roll(e, 1, axis=1)  # position 0 takes the row's last token


def _smear_without_bos_mask(e, ids, weight, lam, bos_id):
    g = lam * mx.sigmoid(mx.sum(e[..., :weight.shape[-1]] * weight[0], axis=-1, keepdims=True))
    return mx.concatenate([e[:, :1], e[:, 1:] + g[:, 1:] * e[:, :-1]], axis=1)  # before the record's BOS fix


def _smear_from_the_next_token(e, ids, weight, lam, bos_id):
    g = lam * mx.sigmoid(mx.sum(e[..., :weight.shape[-1]] * weight[0], axis=-1, keepdims=True))
    keep = (ids[:, :-1] != bos_id).astype(mx.float32)[..., None]
    return mx.concatenate([e[:, :-1] + g[:, :-1] * keep * e[:, 1:], e[:, -1:]], axis=1)  # shifted the wrong way


def _gate_without_scale(y, n, weight, scale):
    return _real_gate(y, n, weight, 1.0)


def _gate_reads_last_dims(y, n, weight, scale):
    z = mx.sum(n.astype(mx.float32)[:, :, None, -weight.shape[-1]:] * weight, axis=-1)  # n[-W:], not n[:W]
    return y.astype(mx.float32) * mx.sigmoid(scale * z).transpose(0, 2, 1)[..., None]


_NORM_INPUT = []


def _norm_stashing_its_input(self, x):
    _NORM_INPUT[:] = [x]  # the attention runs right after attn_norm: this is the block's pre-norm input u
    return _real_norm_call(self, x)


def _gate_reads_pre_norm(y, n, weight, scale):
    return _real_gate(y, _NORM_INPUT[0], weight, scale)


def _gate_tiled_over_heads(y, n, weight, scale):
    """Gate of head h broadcast onto the concatenated (H*D) layout by tiling: dim j gets head j % H's gate."""
    bsz, heads, seqlen, head_dim = y.shape
    z = mx.sum(n.astype(mx.float32)[:, :, None, :weight.shape[-1]] * weight, axis=-1)  # (B, T, H)
    g = mx.tile(mx.sigmoid(scale * z), (1, 1, head_dim)).reshape(bsz, seqlen, heads, head_dim).transpose(0, 2, 1, 3)
    return y.astype(mx.float32) * g


SMEAR_FAULTS = {"smear_mask_on_previous_token": _smear_mask_on_previous_token,
                "smear_gate_reads_normed": _smear_gate_reads_normed, "smear_wraps_around": _smear_wraps_around}
GATE_FAULTS = {"gate_without_scale": _gate_without_scale, "gate_reads_last_dims": _gate_reads_last_dims,
               "gate_reads_pre_norm": _gate_reads_pre_norm, "gate_tiled_over_heads": _gate_tiled_over_heads}


@pytest.mark.parametrize("fault", list(SMEAR_FAULTS) + list(GATE_FAULTS))
def test_injected_gate_faults_are_caught(monkeypatch, fault):
    if fault in SMEAR_FAULTS:
        cfg = P.cfg_for("smear")
        monkeypatch.setattr(mlx_model, "smear", SMEAR_FAULTS[fault])
    else:
        cfg = P.cfg_for("sparse_gate")
        monkeypatch.setattr(mlx_model, "sparse_attn_gate", GATE_FAULTS[fault])
        if fault == "gate_reads_pre_norm":
            monkeypatch.setattr(mlx_model.RMSNorm, "__call__", _norm_stashing_its_input)
    with pytest.raises(AssertionError, match="logits: max abs diff"):
        P.check_forward(cfg, mlx_cpu_ops.ComposedOps)
    with pytest.raises(AssertionError, match="grad "):
        P.check_backward(cfg, mlx_cpu_ops.ComposedOps)


def test_gating_before_xsa_is_the_same_maths():
    """Not a fault to inject: the gate scales each head's vector by one number and XSA removes a component along a
    direction that y does not set, so XSA(g*y) = g*XSA(y); the two orders agree to rounding in both frameworks."""
    rng = np.random.default_rng(0)
    y, v = rng.standard_normal((2, 4, 8, 16)), rng.standard_normal((2, 2, 8, 16))
    n, w = rng.standard_normal((2, 8, 64)), rng.standard_normal((4, 12))
    for mod, arr, out in ((torch_model, torch.tensor, lambda t: t.numpy()), (mlx_model, mx.array, np.array)):
        y_, v_, n_, w_ = (arr(a.astype(np.float32)) for a in (y, v, n, w))
        after = out(mod.sparse_attn_gate(mod.exclusive_self_attention(y_, v_), n_, w_, 0.5))
        before = out(mod.exclusive_self_attention(mod.sparse_attn_gate(y_, n_, w_, 0.5), v_))
        C.assert_close(f"{mod.__name__} gate before vs after XSA", before, after, 1e-5, 1e-6)
        assert C.max_abs_diff(after, out(mod.exclusive_self_attention(y_, v_))) > 0.1  # the gate does act


# 4. leaks: no logit sees a later token, and a BOS never sees the token before it
def _logits_fn(framework: str, cfg: Hyperparameters, state: dict):
    if framework == "torch":
        model = C.torch_model(cfg, state)
        return lambda ids: C.torch_logits(model, ids)
    model = C.mlx_model(cfg, state, P.MLX_OPS[framework.split("_")[1]])
    return lambda ids: C.mlx_logits(model, ids)


@pytest.mark.parametrize("framework", ["torch", "mlx_composed", "mlx_fused"])
def test_no_logit_sees_a_later_token_with_both_gates(framework):
    cfg = P.cfg_for("record_gates")
    fn = _logits_fn(framework, cfg, C.random_state(cfg, seed=8))
    for t in (0, 3, 5, cfg.train_seq_len - 2):
        assert P._future_changes_nothing(fn, cfg, t) == 0.0, f"{framework}: a token after {t} changed a logit"


def test_injected_smear_from_the_next_token_is_caught(monkeypatch):
    monkeypatch.setattr(mlx_model, "smear", _smear_from_the_next_token)
    cfg = P.cfg_for("record_gates")
    assert P._future_changes_nothing(_logits_fn("mlx_composed", cfg, C.random_state(cfg, seed=8)), cfg, 5) > 0.0


def _bos_leak(smear_fn, arr, out) -> float:
    """Change the embedding of the token before each BOS: the largest change of the smeared embedding at a BOS
    (one not itself before a BOS, whose own embedding changes)."""
    rng = np.random.default_rng(9)
    ids, _ = bos_batch(P.cfg_for("smear"))
    e = rng.standard_normal((*ids.shape, 64)).astype(np.float32)
    w, lam = rng.standard_normal((1, 12)).astype(np.float32), np.array([0.8], np.float32)
    before_bos = np.zeros(ids.shape, bool)
    before_bos[:, :-1] = ids[:, 1:] == BOS_ID
    other = e + before_bos[..., None] * rng.standard_normal(e.shape).astype(np.float32)
    a, b = (out(smear_fn(arr(x), arr(ids), arr(w), arr(lam), BOS_ID)) for x in (e, other))
    changed = np.abs(a - b).max(axis=-1)
    return float(changed[(ids == BOS_ID) & ~before_bos].max())


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_a_bos_never_takes_the_token_before_it(framework):
    mod, arr, out = ((torch_model, torch.tensor, lambda t: t.numpy()) if framework == "torch"
                     else (mlx_model, mx.array, np.array))
    at_bos = _bos_leak(mod.smear, arr, out)
    assert at_bos == 0.0, f"{framework}: a BOS embedding moved by {at_bos} when the token before it changed"


@pytest.mark.parametrize("fake", [_smear_without_bos_mask, _smear_mask_on_previous_token])
def test_the_bos_leak_check_fails_without_the_mask(fake):
    assert _bos_leak(fake, mx.array, np.array) > 0.1


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_backends_refuse_a_smear_gate_without_bos_before_any_compute(backend):
    """build() checks, so a tokenizer without BOS fails at start, not in the first forward of the timed run."""
    import cuda_train
    import mlx_train
    cfg = P.cfg_for("smear")
    be = (cuda_train.TorchBackend if backend == "torch" else mlx_train.MLXBackend)(cfg)
    with pytest.raises(ValueError, match="SMEAR_GATE_ENABLED=1 needs the tokenizer's BOS id.*TOKENIZER_PATH"):
        be.build(cfg, init_params(cfg), train=True, bos_id=-1)
