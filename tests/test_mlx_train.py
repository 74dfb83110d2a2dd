"""mlx_train.py on CPU (mlx[cpu], fp32): training, artifacts, resume, bad inputs."""
import numpy as np
import pytest

from conftest import ROOT, run_script, tiny_env
from shared.artifact import load_artifact
from shared.runlog import parse_final, parse_train_losses

pytest.importorskip("mlx_train")
TRAINER = str(ROOT / "mlx_train.py")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlx_tiny")
    env = tiny_env(tiny_data, tmp, ITERATIONS=30)
    out = run_script([TRAINER], env, tmp).stdout
    return {"env": env, "out": out, "tmp": tmp}


def test_loss_falls_and_final_lines_parse(trained):
    losses = parse_train_losses(trained["out"])
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1] - 0.8, losses
    assert 0 < parse_final(trained["out"])["val_bpb"] < 8
    assert "limit:16000000" in trained["out"] and "eval_progress:" in trained["out"]


def test_artifact_round_trips_and_eval_mode_repeats_the_score(trained):
    path = trained["env"]["ARTIFACT_PATH"]
    state, cfg = load_artifact(path)
    assert cfg.model_dim == 64 and "blocks.0.attn.q_gain" in state
    out = run_script([TRAINER, "--eval", path], trained["env"], trained["tmp"]).stdout
    assert parse_final(out) == parse_final(trained["out"])


def test_microbatch_chunking_does_not_change_training(tiny_data, tmp_path):
    """Chunks of 1 sequence vs whole slots: the same tokens, the same step (up to fp32 summation order)."""
    a = run_script([TRAINER], tiny_env(tiny_data, tmp_path / "a", ITERATIONS=5, MLX_MAX_MICROBATCH_TOKENS=32), tmp_path)
    b = run_script([TRAINER], tiny_env(tiny_data, tmp_path / "b", ITERATIONS=5, MLX_MAX_MICROBATCH_TOKENS=256), tmp_path)
    la, lb = parse_train_losses(a.stdout), parse_train_losses(b.stdout)
    assert all(abs(la[s] - lb[s]) <= 2e-4 for s in la), (la, lb)


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    ck = str(tmp_path / "ck_{step}.ckpt")
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=12, CHECKPOINT_EVERY=6, CHECKPOINT_PATH=ck)
    full = run_script([TRAINER], env, tmp_path).stdout
    env_b = dict(env, ARTIFACT_PATH=str(tmp_path / "resumed.int8.zst"), CHECKPOINT_PATH=str(tmp_path / "r_{step}.ckpt"))
    resumed = run_script([TRAINER, "--resume", ck.format(step=6)], env_b, tmp_path).stdout
    lf, lr = parse_train_losses(full), parse_train_losses(resumed)
    assert sorted(lr) == list(range(7, 13))
    assert all(lf[s] == lr[s] for s in lr), (lf, lr)
    assert parse_final(full) == parse_final(resumed)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    ck = tmp_path / "c.ckpt"
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=10, CHECKPOINT_EVERY=1, CHECKPOINT_PATH=str(ck),
                   MATRIX_LR="1e15", SCALAR_LR="1e15")
    res = run_script([TRAINER], env, tmp_path, check=False)
    assert res.returncode != 0 and ("non-finite" in res.stderr or "train_loss is nan" in res.stderr), res.stderr[-2000:]
    if ck.exists():
        from safetensors.numpy import load_file
        assert all(np.isfinite(v).all() for v in load_file(ck).values())


@pytest.mark.parametrize("overrides,message", [
    ({"DATA_PATH": "/nonexistent/data"}, "prepare.py"),
    ({"VOCAB_SIZE": "512"}, "VOCAB_SIZE=512"),
    ({"TOKENIZER_PATH": "/nonexistent/tok.model"}, "TOKENIZER_PATH"),
    ({"MLX_OPS": "fast"}, "MLX_OPS"),
])
def test_bad_inputs_are_clear_errors(tiny_data, tmp_path, overrides, message):
    res = run_script([TRAINER], tiny_env(tiny_data, tmp_path, **overrides), tmp_path, check=False)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]


def test_eval_rejects_a_corrupt_artifact(trained, tmp_path):
    bad = tmp_path / "bad.zst"
    bad.write_bytes(open(trained["env"]["ARTIFACT_PATH"], "rb").read()[:-100])
    res = run_script([TRAINER, "--eval", str(bad)], trained["env"], tmp_path, check=False)
    assert res.returncode != 0 and "truncated or corrupt" in res.stderr
