"""Depth recurrence (NUM_LOOPS) and parallel residual lanes (PARALLEL_START_LAYER) in both twins.

Models are built looped, so test_parity.py's variants check the looped state; here both states are checked,
the switch is shown to reach each model and to happen at the same step in both trainers, and porting
mistakes specific to loops and lanes must be caught.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import torch  # noqa: E402

from conftest import ROOT, run_script, tiny_env  # noqa: E402
from parity_tests import compare as C  # noqa: E402
from parity_tests.test_parity import MLX_OPS, batch, cfg_for, check_backward, check_forward  # noqa: E402
from shared import bpb, loop  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.data import TokenLoader, train_pattern  # noqa: E402
from shared.runlog import RunLog, parse_final  # noqa: E402
from shared.schedule import looping_active  # noqa: E402
from shared.spec import init_params, layer_plan  # noqa: E402

import cuda_train  # noqa: E402
import mlx_cpu_ops  # noqa: E402
import mlx_model  # noqa: E402
import mlx_train  # noqa: E402

LOOP_VARIANTS = ["looped", "record_loops_lanes", "all_features"]


@pytest.fixture
def looping(monkeypatch):
    """looping(on): every model compare.py builds from now on (both frameworks) runs with set_looping(on)."""
    def apply(on: bool) -> None:
        for name in ("torch_model", "mlx_model"):
            def built(*args, _build=getattr(C, name), **kwargs):
                model = _build(*args, **kwargs)
                model.set_looping(on)
                return model
            monkeypatch.setattr(C, name, built)
    return apply


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("ops", MLX_OPS)
@pytest.mark.parametrize("variant", LOOP_VARIANTS)
def test_both_looping_states_agree(looping, variant, ops, on):
    cfg = cfg_for(variant)
    cfg.validate()
    looping(on)
    check_forward(cfg, MLX_OPS[ops])
    check_backward(cfg, MLX_OPS[ops])


@pytest.mark.parametrize("variant", LOOP_VARIANTS)
def test_looping_changes_the_logits_of_each_model(variant):
    """The flag reaches the forward: the two states give different logits, in each framework."""
    cfg = cfg_for(variant)
    state = C.random_state(cfg)
    x, _ = batch(cfg)
    for build, logits in ((C.torch_model, C.torch_logits), (C.mlx_model, C.mlx_logits)):
        model = build(cfg, state)
        on = logits(model, x)
        model.set_looping(False)
        off = logits(model, x)
        assert C.max_abs_diff(on, off) > 1e-3, f"{build.__name__}: looping on and off give the same logits"


def _backend(name: str, cfg: Hyperparameters):
    return (cuda_train.TorchBackend if name == "torch" else mlx_train.MLXBackend)(cfg)


def _loop_env(tiny_data, tmp_path, **overrides) -> dict:
    """3 layers, layer 1 looped once: [0, 1] | [1, 2] looped, [0] | [1, 2] unlooped; lanes on layer 2."""
    return tiny_env(tiny_data, tmp_path, NUM_LAYERS=3, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1,
                    PARALLEL_START_LAYER=2, SKIP_GATES_ENABLED=1, **overrides)


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_set_looping_reaches_the_compiled_graphs(tiny_data, tmp_path, name):
    """Backend.set_looping switches scores and steps both ways (MLX: one compiled graph per state), and each
    state scores what a fresh model in that state scores."""
    cfg = Hyperparameters.from_env(_loop_env(tiny_data, tmp_path))
    data = bpb.load_eval_data(cfg)
    data.windows = data.windows[:8]
    state = C.random_state(cfg, seed=3)
    be = _backend(name, cfg)
    be.build(cfg, state, train=True)
    scores: dict[bool, list[float]] = {True: [], False: []}
    for on in (True, False, True, False):
        be.set_looping(on)
        scores[on].append(be.evaluate(data).val_loss)
    assert scores[True][0] == scores[True][1] and scores[False][0] == scores[False][1], scores
    assert abs(scores[True][0] - scores[False][0]) > 1e-4, scores
    for on in (True, False):
        model = C.torch_model(cfg, state)
        model.set_looping(on)
        want = C.score_torch(model, cfg, data.tokens, data.windows, data.target_bytes).val_loss
        assert abs(scores[on][0] - want) <= 1e-5, (name, on, scores[on][0], want)
    st = loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))
    position, losses = st.loader.stream.state(), {}
    for on in (False, True):
        be.load_weights(state)
        st.loader.stream.restore(position)
        be.set_looping(on)
        losses[on] = loop.one_step(be, st, cfg, 1.0)
    assert abs(losses[True] - losses[False]) > 1e-4, losses


def test_both_trainers_switch_at_the_same_step(tiny_data, tmp_path):
    """shared/loop.py decides the switch from the pure schedule; both models run the same state at every step."""
    cfg = Hyperparameters.from_env(_loop_env(tiny_data, tmp_path, ITERATIONS=8, ENABLE_LOOPING_AT=0.5))
    data = bpb.load_eval_data(cfg)
    data.windows = data.windows[:4]
    seen = {}
    for name in ("torch", "mlx"):
        be = _backend(name, cfg)
        be.build(cfg, init_params(cfg), train=True)
        seen[name] = []
        step = be.train_step

        def recording_step(*args, _be=be, _step=step, _seen=seen[name], **kwargs):
            _seen.append(_be.model.looping)  # the state the model itself holds (the same name in both twins)
            return _step(*args, **kwargs)
        be.train_step = recording_step
        st = loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))
        loop.run_training(be, st, cfg, RunLog("t", enabled=False), data, {})
    want = [looping_active(cfg, s, 0.0) for s in range(8)]
    assert want == [False] * 4 + [True] * 4
    assert seen["torch"] == seen["mlx"] == want, seen


def test_a_looped_mlx_run_logs_the_switch_and_torch_scores_its_artifact_the_same(tiny_data, tmp_path):
    """Through the command lines: validation mid-run (looped) between unlooped steps, the switch logged at step 3
    of 6, and the artifact, scored looped by the other trainer, gives the trainer's own final score."""
    env = _loop_env(tiny_data, tmp_path, ITERATIONS=6, ENABLE_LOOPING_AT=0.5, VAL_LOSS_EVERY=2)
    trained = run_script([str(ROOT / "mlx_train.py")], env, tmp_path).stdout
    assert "looping:on step:3" in trained and "looping:off" not in trained, trained[-2000:]
    scored = run_script([str(ROOT / "cuda_train.py"), "--eval", env["ARTIFACT_PATH"]], env, tmp_path).stdout
    assert abs(parse_final(trained)["val_bpb"] - parse_final(scored)["val_bpb"]) <= 1e-5, (trained, scored)


def test_torch_compile_traces_each_looping_state_once():
    """torch.compile guards on the model's looping flag: two graphs for any number of switches, not one a step.
    (The CUDA trainer compiles; on a CPU it does not, so this traces with a counting backend.)"""
    from torch._dynamo.testing import CompileCounter
    cfg = dataclasses.replace(cfg_for("looped"), num_layers=3, loop_start=1, loop_end=1, num_loops=1)
    model = C.torch_model(cfg, C.random_state(cfg))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False, fullgraph=True)
    x, y = (torch.from_numpy(a) for a in batch(cfg))
    losses: dict[bool, set[float]] = {True: set(), False: set()}
    for on in (False, True, False, True, True, False):
        model.set_looping(on)
        with torch.no_grad():
            losses[on].add(float(compiled(x, y)))
    assert counter.frame_count == 2, f"{counter.frame_count} compiles for 2 looping states"
    assert len(losses[True]) == len(losses[False]) == 1 and losses[True] != losses[False], losses


# Porting mistakes the checks must catch (injected into the MLX twin).
def _plan_with_unlooped_pairing(cfg, looping):
    """The skip pairing computed once for the unlooped schedule and kept after the switch."""
    plan, unlooped = layer_plan(cfg, looping), layer_plan(cfg, False)
    return dataclasses.replace(plan, skip_slots=unlooped.skip_slots + (None,) * (len(plan.decoder) -
                                                                                  len(unlooped.decoder)))


def _plan_looping_num_loops_times(cfg, looping):
    """The looped block run NUM_LOOPS times instead of NUM_LOOPS + 1."""
    return layer_plan(dataclasses.replace(cfg, num_loops=cfg.num_loops - 1), looping)


def _parallel_transposed(orig):
    def parallel(self, lane0, lane1, x0, post, resid, doc=None):
        return orig(self, lane0, lane1, x0, post.T, resid, doc)  # post[l, s] read as post[s, l]
    return parallel


def _parallel_mlp_reads_lane0(self, lane0, lane1, x0, post, resid, doc=None):
    mix = self.resid_mix
    u = mix[0][None, None, :] * lane0 + mix[1][None, None, :] * x0
    a = self.attn_scale[None, None, :] * self.attn(self.attn_norm(u), doc)
    m = self.mlp_scale[None, None, :] * self.mlp(self.mlp_norm(lane0))
    return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
            resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


def _ln_scale_by_application(monkeypatch) -> None:
    """LN_SCALE's 1/sqrt(i+1) taken from the application's position in the unrolled stack, not its layer."""
    count = [0]

    def counted(orig):
        def run(self, *args, **kwargs):
            saved = self.attn_norm.scale, self.mlp_norm.scale
            self.attn_norm.scale = self.mlp_norm.scale = float(np.float32(1.0 / math.sqrt(count[0] + 1)))
            count[0] += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                self.attn_norm.scale, self.mlp_norm.scale = saved
        return run

    orig_logits = mlx_model.GPT.logits

    def logits(self, *args, **kwargs):
        count[0] = 0
        return orig_logits(self, *args, **kwargs)
    monkeypatch.setattr(mlx_model.GPT, "logits", logits)
    monkeypatch.setattr(mlx_model.Block, "__call__", counted(mlx_model.Block.__call__))
    monkeypatch.setattr(mlx_model.Block, "parallel", counted(mlx_model.Block.parallel))


@pytest.mark.parametrize("fault", ["skip_unlooped_pairing", "num_loops_times", "lanes_transposed",
                                   "lane_mlp_reads_lane0", "ln_scale_by_application", "final_lane0"])
def test_injected_loop_and_lane_faults_are_caught(monkeypatch, fault):
    cfg = cfg_for("record_loops_lanes")  # built looped: every fault below shows in this state
    if fault == "skip_unlooped_pairing":
        monkeypatch.setattr(mlx_model, "layer_plan", _plan_with_unlooped_pairing)
    elif fault == "num_loops_times":
        monkeypatch.setattr(mlx_model, "layer_plan", _plan_looping_num_loops_times)
    elif fault == "lanes_transposed":
        monkeypatch.setattr(mlx_model.Block, "parallel", _parallel_transposed(mlx_model.Block.parallel))
    elif fault == "lane_mlp_reads_lane0":
        monkeypatch.setattr(mlx_model.Block, "parallel", _parallel_mlp_reads_lane0)
    elif fault == "ln_scale_by_application":
        _ln_scale_by_application(monkeypatch)
    else:
        monkeypatch.setattr(mlx_model, "merge_lanes", lambda lane0, lane1: lane0)
    with pytest.raises(AssertionError, match="logits: max abs diff"):
        check_forward(cfg, mlx_cpu_ops.ComposedOps)
    with pytest.raises(AssertionError, match="grad "):
        check_backward(cfg, mlx_cpu_ops.ComposedOps)


def test_no_logit_sees_a_later_token_with_loops_and_lanes():
    from parity_tests.test_parity import _future_changes_nothing
    cfg = cfg_for("record_loops_lanes")
    state = C.random_state(cfg, seed=8)
    for on in (False, True):
        for build, logits in ((C.torch_model, C.torch_logits), (C.mlx_model, C.mlx_logits)):
            model = build(cfg, state)
            model.set_looping(on)
            for t in (0, 5, cfg.train_seq_len - 2):
                assert _future_changes_nothing(lambda ids: logits(model, ids), cfg, t) == 0.0, (build.__name__, on, t)
