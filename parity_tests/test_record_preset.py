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
    env = tiny_env(tiny_data, tmp_path, **{"PRESET": "tiny_record", "ITERATIONS": 8, "WARMUP_STEPS": 2, **overrides})
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


# Every optimizer feature of the record (RECORD_STACK.md §5), on the tiny record network.
RECORD_OPTIMIZER = dict(MUON_NS="polar_express", MUON_ROW_NORMALIZE=1, MUON_WD=0.095, EMBED_WD=0.085, ADAM_WD=0.02,
                        GRAD_CLIP_NORM=0.3, BETA2=0.99, WARMDOWN_FRAC=0.85, MIN_LR=0.1, EMA_DECAY=0.95)


def test_twenty_steps_with_every_optimizer_feature_agree_across_trainers_and_world_sizes(tiny_data, tmp_path):
    """MLX, torch in one process (8 accumulation slots) and torchrun with 2 ranks (4 each): the same losses step
    for step (logged at 4 decimals), and the same final score of the exported EMA weights."""
    # int8 export: GPTQ's error feedback turns fp32-level differences of the weights or Hessians into other, equally
    # good integers (~2e-4 bpb apart at this size); GPTQ across frameworks is checked in test_quant_parity.py
    env = _record_env(tiny_data, tmp_path, ITERATIONS=20, QUANT="int8", COMPRESSOR="zstd", LQER_ENABLED=0,
                      **RECORD_OPTIMIZER)
    runs = {}
    for name, args, ranks in (("mlx", ["mlx_train.py"], 0), ("torch", ["cuda_train.py"], 0),
                              ("torchrun2", ["cuda_train.py"], 2)):
        run_env = dict(env, ARTIFACT_PATH=str(tmp_path / f"{name}.int8.zst"), RUN_ID=f"opt_{name}")
        out = run_script([str(ROOT / args[0])], run_env, tmp_path, torchrun=ranks).stdout
        assert "val_ema" in out and "looping:on step:" in out, out[-2000:]
        runs[name] = out
    losses = {name: parse_train_losses(out) for name, out in runs.items()}
    assert all(sorted(lo) == list(range(1, 21)) for lo in losses.values())
    for step in range(1, 21):
        seen = {name: lo[step] for name, lo in losses.items()}
        assert max(seen.values()) - min(seen.values()) <= 2e-4, f"step {step}: {seen}"
    finals = {name: parse_final(out)["val_bpb"] for name, out in runs.items()}
    assert max(finals.values()) - min(finals.values()) <= 1e-4, finals
