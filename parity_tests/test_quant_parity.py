"""GPTQ's Hessians and the quantized artifact agree across MLX and torch (RECORD_STACK.md §6.1-§6.2).

Same numpy weights, same calibration tokens: H = sum x^T x of every matrix input agrees within fp32 tolerance
(looped layers add every application, the tied head reads the final norm's output); the artifacts quantized
from each framework's weights with the same Hessians are byte-identical; each framework's eval path reads the
decoded tensors bit for bit. Porting mistakes (a layer's second application not collected, the head's input
taken before the norm) must be caught.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")
pytest.importorskip("constriction")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from parity_tests import compare as C  # noqa: E402
from parity_tests.test_parity import batch, cfg_for  # noqa: E402
from shared import artifact  # noqa: E402
from shared.manifest import BOS_ID  # noqa: E402
from shared.quant import gptq  # noqa: E402
from shared.spec import param_table  # noqa: E402

import cuda_train  # noqa: E402
import mlx_model  # noqa: E402
import mlx_train  # noqa: E402
import torch_model  # noqa: E402

H_RTOL, H_ATOL = 1e-4, 1e-4  # fp32 sums of a few hundred products in another order (and MLX chunking)


def _all_matrices(cfg):
    """Every matrix a matmul reads (the GPTQ size threshold aside, so tiny models exercise every hook)."""
    names = [p.name for p in param_table(cfg) if p.store == "weight" and len(p.shape) == 2]
    return names if cfg.tie_embeddings else [n for n in names if n != "tok_emb.weight"]


def _model_hessians(cfg, state, batches, looping_mlx=None):
    tm = C.torch_model(cfg, state)
    mm = C.mlx_model(cfg, state)
    if looping_mlx is not None:
        mm.set_looping(looping_mlx)
    targets = _all_matrices(cfg)
    th = torch_model.collect_hessians(tm, [(torch.from_numpy(x), None if s is None else torch.from_numpy(s))
                                           for x, s in batches], targets)
    mh = mlx_model.collect_hessians(mm, [(mx.array(x), None if s is None else mx.array(s)) for x, s in batches],
                                    targets)
    return th, mh, targets


def _check_agree(th, mh, targets):
    assert sorted(th) == sorted(mh) == sorted(targets), (sorted(th), sorted(mh))
    for name in targets:
        assert th[name].dtype == mh[name].dtype == np.float32, name
        diff = np.abs(th[name] - mh[name]).max()
        assert np.allclose(th[name], mh[name], rtol=H_RTOL, atol=H_ATOL), f"H of {name}: max |diff| {diff:.3g}"


def _batches(cfg, n=2):
    out = []
    for seed in range(n):
        x, _ = batch(cfg, seed=seed + 1)
        out.append((x, C.segments_for(cfg, x)))
    return out


@pytest.mark.parametrize("variant", ["tied_gqa", "untied", "record_loops_lanes", "all_features"])
def test_hessians_agree(variant):
    cfg = cfg_for(variant)
    th, mh, targets = _model_hessians(cfg, C.random_state(cfg), _batches(cfg))
    _check_agree(th, mh, targets)
    x = _batches(cfg)[0][0]
    # one numpy check of what is summed: the MLP input's H has trace = sum of squares of the normed MLP inputs,
    # so it is positive and every H is symmetric positive semi-definite
    for name in targets:
        assert np.allclose(th[name], th[name].T, rtol=1e-5, atol=1e-5) and np.trace(th[name]) > 0, name
    assert x.shape[1] == cfg.train_seq_len


def test_the_tied_head_hessian_is_the_final_norm_output(monkeypatch):
    """H of tok_emb.weight (tied) equals sum y^T y of the final norm's outputs, read independently by wrapping
    the torch model's final_norm (the model is never edited)."""
    cfg = cfg_for("tied_gqa")
    state = C.random_state(cfg)
    batches = _batches(cfg)
    tm = C.torch_model(cfg, state)
    seen = []
    orig = torch_model.RMSNorm.forward
    monkeypatch.setattr(torch_model.RMSNorm, "forward",
                        lambda self, x: seen.append(orig(self, x)) or seen[-1] if self is tm.final_norm
                        else orig(self, x))
    with torch.no_grad():
        for x, _ in batches:
            tm.logits(torch.from_numpy(x))
    ys = [y.reshape(-1, y.shape[-1]).double().numpy() for y in seen]
    want = sum(y.T @ y for y in ys) / len(batches)
    monkeypatch.undo()
    th, _, _ = _model_hessians(cfg, state, batches)
    np.testing.assert_allclose(th["tok_emb.weight"], want, rtol=1e-5, atol=1e-5)


FAULTS = {
    # the MLX calibration runs unlooped: layers 1-2 miss their second and third applications
    "missing_looped_application": "loop",
    # the head's Hessian from the final norm's input (the un-normed residual), not its output
    "head_input_not_normed": "norm",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_injected_hessian_faults_are_caught(monkeypatch, fault):
    cfg = cfg_for("record_loops_lanes")
    state = C.random_state(cfg)
    looping_mlx = None
    if FAULTS[fault] == "loop":
        looping_mlx = False
    else:
        monkeypatch.setattr(mlx_model._TapOutput, "__call__",
                            lambda self, x: (self._tap_fn(x), self.inner(x))[1])
    th, mh, targets = _model_hessians(cfg, state, _batches(cfg), looping_mlx)
    with pytest.raises(AssertionError, match="H of"):
        _check_agree(th, mh, targets)


def _backend_cfg():
    """Matrices past the 65,536-element GPTQ threshold (tok_emb 1024x128, MLP 576x128), loops, documents."""
    return dataclasses.replace(cfg_for("all_features"), vocab_size=1024, model_dim=128, num_heads=4,
                               num_kv_heads=2, mlp_mult=4.5, quant="gptq", compressor="entropy",
                               matrix_bits=6, embed_bits=7, mlx_max_microbatch_tokens=64)


def test_backends_hessians_agree_and_artifacts_are_byte_identical(tmp_path):
    cfg = _backend_cfg()
    state = C.random_state(cfg)
    batches = [batch(cfg, seed=s) for s in (1, 2)]
    out = {}
    for name, cls in (("torch", cuda_train.TorchBackend), ("mlx", mlx_train.MLXBackend)):
        be = cls(cfg)
        be.build(cfg, state, train=False, bos_id=BOS_ID)
        be.set_looping(True)
        out[name] = (be.hessians(cfg, batches), be.weights())
    targets = gptq.targets(cfg)
    assert targets == ["tok_emb.weight"] + [f"blocks.{i}.mlp.{m}.weight" for i in range(cfg.num_layers)
                                            for m in ("fc", "proj")]
    _check_agree(out["torch"][0], out["mlx"][0], targets)  # MLX chunks rows by 64 tokens: a different sum order
    hessians = out["torch"][0]
    blobs = {name: artifact.encode_artifact(w, cfg, hessians=hessians) for name, (_, w) in out.items()}
    assert blobs["torch"] == blobs["mlx"]
    path = tmp_path / "a.art"
    path.write_bytes(blobs["torch"])
    state_q, cfg_back = artifact.load_artifact(path)
    assert cfg_back == cfg
    # each framework's eval path holds exactly the decoded float32 tensors
    tm = torch_model.build_model(cfg, "cpu", state_q, torch.float32, BOS_ID)
    mm = mlx_model.build_model(cfg, state_q, mx.float32, None, BOS_ID)
    for held in (torch_model.numpy_state(tm), mlx_model.numpy_state(mm)):
        for name in state_q:
            assert held[name].dtype == np.float32 and np.array_equal(held[name], state_q[name]), name
    # calibrated GPTQ is not round-to-nearest: the same weights without Hessians give other integers
    assert artifact.encode_artifact(state, cfg) != blobs["torch"]


def test_a_gptq_run_calibrates_logs_its_phases_and_scores_the_same_under_the_other_framework(tiny_data, tmp_path):
    """MLX trains and exports (torch's export runs the same shared code; its hessians() is checked above)."""
    trainer = "mlx_train.py"
    from conftest import ROOT, run_script, tiny_env
    from shared.runlog import parse_final

    env = tiny_env(tiny_data, tmp_path, MODEL_DIM=128, MLP_MULT=4.5, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1,
                   ITERATIONS=3, QUANT="gptq", COMPRESSOR="entropy", GPTQ_CALIBRATION_BATCHES=2)
    res = run_script([trainer], env, ROOT)
    line = next(s for s in res.stdout.splitlines() if s.startswith("export "))
    assert "quant:gptq compressor:entropy calibrated:4/4 hessians:" in line and " gptq:" in line and " coding:" in line
    other = "cuda_train.py" if trainer == "mlx_train.py" else "mlx_train.py"
    ev = run_script([other, "--eval", env["ARTIFACT_PATH"]], env, ROOT)
    assert parse_final(res.stdout)["val_bpb"] == pytest.approx(parse_final(ev.stdout)["val_bpb"], abs=1e-5)
