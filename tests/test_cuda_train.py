"""cuda_train.py on CPU (gloo, fp32): training, artifacts, torchrun, resume, bad inputs."""
import numpy as np
import pytest

from conftest import ROOT, run_script, tiny_env
from shared.artifact import load_artifact
from shared.data import write_shard
from shared.runlog import parse_final, parse_train_losses

TRAINER = str(ROOT / "cuda_train.py")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_tiny")
    env = tiny_env(tiny_data, tmp, ITERATIONS=30)
    out = run_script([TRAINER], env, tmp).stdout
    return {"env": env, "out": out, "tmp": tmp}


def test_loss_falls_and_final_lines_parse(trained):
    losses = parse_train_losses(trained["out"])
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1] - 0.8, losses
    final = parse_final(trained["out"])
    assert 0 < final["val_bpb"] < 8
    assert "val_tokens:" in trained["out"] and "limit:16000000" in trained["out"]


def test_artifact_round_trips_and_eval_mode_repeats_the_score(trained):
    path = trained["env"]["ARTIFACT_PATH"]
    state, cfg = load_artifact(path)
    assert cfg.num_layers == 2 and cfg.vocab_size == 384 and "blocks.1.mlp.fc.weight" in state
    out = run_script([TRAINER, "--eval", path], trained["env"], trained["tmp"]).stdout
    assert parse_final(out) == parse_final(trained["out"])


def test_eval_rejects_a_config_the_artifact_was_not_trained_with(trained):
    env = dict(trained["env"], NUM_LAYERS="3")
    res = run_script([TRAINER, "--eval", trained["env"]["ARTIFACT_PATH"]], env, trained["tmp"], check=False)
    assert res.returncode != 0 and "NUM_LAYERS=2" in res.stderr and "NUM_LAYERS=3" in res.stderr


# torchrun (gloo) against one process: parity_tests/test_parity.py::test_torchrun_eval_and_training_equal_one_process


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


def test_resume_rejects_a_different_model(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=2, CHECKPOINT_EVERY=2, CHECKPOINT_PATH=str(tmp_path / "c.ckpt"))
    run_script([TRAINER], env, tmp_path)
    res = run_script([TRAINER, "--resume", str(tmp_path / "c.ckpt")], dict(env, MODEL_DIM="32"), tmp_path, check=False)
    assert res.returncode != 0 and "MODEL_DIM=64" in res.stderr


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
    ({"WORLD_SIZE": "3"}, "WORLD_SIZE=3"),
    ({"TOKENIZER_PATH": "/nonexistent/tok.model"}, "TOKENIZER_PATH"),
])
def test_bad_inputs_are_clear_errors(tiny_data, tmp_path, overrides, message):
    res = run_script([TRAINER], tiny_env(tiny_data, tmp_path, **overrides), tmp_path, check=False)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]


def test_short_validation_split_is_a_clear_error(tiny_data, tmp_path):
    data = tmp_path / "short"
    data.mkdir()
    (data / "fineweb_train_000000.bin").write_bytes((__import__("pathlib").Path(tiny_data["DATA_PATH"]) /
                                                     "fineweb_train_000000.bin").read_bytes())
    write_shard(data / "fineweb_val_000000.bin", np.arange(20, dtype=np.uint16))
    res = run_script([TRAINER], tiny_env(tiny_data, tmp_path, DATA_PATH=str(data)), tmp_path, check=False)
    assert res.returncode != 0 and "fewer than one window" in res.stderr
