"""The tiny record preset (every feature on) through both trainers: the same losses step for step across the
looping switch, and an artifact trained in one framework scores the same in the other (`--eval`)."""
from __future__ import annotations

import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

from conftest import ROOT, run_script, tiny_env  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.runlog import parse_final, parse_train_losses  # noqa: E402


def _record_env(tiny_data, tmp_path, **overrides) -> dict:
    """PRESET=tiny_record's network on the tiny test data: 6 layers, loops switching on at step 3 of 8."""
    env = tiny_env(tiny_data, tmp_path, PRESET="tiny_record", ITERATIONS=8, WARMUP_STEPS=2, **overrides)
    cfg = Hyperparameters.from_env(env)
    assert cfg.num_loops and cfg.doc_isolated_attn and cfg.smear_gate_enabled and cfg.parallel_start_layer
    return env


def test_every_feature_on_trains_alike_and_each_trainer_scores_the_others_artifact(tiny_data, tmp_path):
    runs = {}
    for trainer in ("mlx_train.py", "cuda_train.py"):
        env = _record_env(tiny_data, tmp_path, ARTIFACT_PATH=str(tmp_path / f"{trainer[:-3]}.int8.zst"))
        runs[trainer] = (env, run_script([str(ROOT / trainer)], env, tmp_path).stdout)
        assert "looping:on step:3" in runs[trainer][1], runs[trainer][1][-2000:]
    (env_m, out_m), (env_t, out_t) = runs["mlx_train.py"], runs["cuda_train.py"]
    lm, lt = parse_train_losses(out_m), parse_train_losses(out_t)
    assert sorted(lm) == sorted(lt) == list(range(1, 9))
    for step in lm:  # logged at 4 decimals
        assert abs(lm[step] - lt[step]) <= 2e-4, f"step {step}: mlx {lm[step]} torch {lt[step]}"
    for trained, env, scorer in ((out_m, env_m, "cuda_train.py"), (out_t, env_t, "mlx_train.py")):
        scored = run_script([str(ROOT / scorer), "--eval", env["ARTIFACT_PATH"]], env, tmp_path).stdout
        assert abs(parse_final(trained)["val_bpb"] - parse_final(scored)["val_bpb"]) <= 1e-5, (scorer, scored)
