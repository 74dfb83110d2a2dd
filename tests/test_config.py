import dataclasses

import pytest

from shared.config import Hyperparameters, artifact_config_for_env


def test_defaults_are_the_official_baseline():
    cfg = Hyperparameters.from_env({})
    assert (cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (9, 512, 8, 4, 1024)
    assert (cfg.train_batch_tokens, cfg.train_seq_len, cfg.iterations, cfg.warmdown_iters) == (524288, 1024, 20000, 1200)
    assert (cfg.matrix_lr, cfg.tied_embed_lr, cfg.logit_softcap, cfg.qk_gain_init) == (0.04, 0.05, 30.0, 1.5)
    assert cfg.tie_embeddings is True and cfg.grad_clip_norm == 0.0


def test_env_names_override_and_preset_keeps_official_names():
    cfg = Hyperparameters.from_env({"PRESET": "tiny", "NUM_LAYERS": "3", "TIE_EMBEDDINGS": "0", "MATRIX_LR": "0.02"})
    assert cfg.num_layers == 3 and cfg.tie_embeddings is False and cfg.matrix_lr == 0.02
    assert cfg.model_dim == 64  # from the preset


@pytest.mark.parametrize("env,name", [
    ({"NUM_LAYERS": "x"}, "NUM_LAYERS"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR"),
    ({"MODEL_DIM": "-512"}, "MODEL_DIM"),
    ({"MODEL_DIM": "500"}, "MODEL_DIM"),
    ({"MODEL_DIM": "24", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, "MODEL_DIM"),  # head dim 3 is odd
    ({"NUM_HEADS": "8", "NUM_KV_HEADS": "3"}, "NUM_HEADS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"TIE_EMBEDDINGS": "maybe"}, "TIE_EMBEDDINGS"),
    ({"ITERATIONS": "1.5"}, "ITERATIONS"),
    ({"PRESET": "huge"}, "PRESET"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        Hyperparameters.from_env(env)


def test_json_round_trip_and_unknown_key():
    cfg = Hyperparameters.from_env({"PRESET": "tiny", "RUN_ID": "abc", "TIE_EMBEDDINGS": "0"})
    assert Hyperparameters.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        Hyperparameters.from_json('{"bogus": 1}')


def test_parsing_happens_only_on_request(monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "not-a-number")
    import importlib
    import shared.config
    importlib.reload(shared.config)  # import must not read the environment
    with pytest.raises(ValueError):
        shared.config.Hyperparameters.from_env(__import__("os").environ)


def test_artifact_config_rejects_a_model_change():
    trained = Hyperparameters.from_env({"PRESET": "tiny"})
    ok = artifact_config_for_env(trained, {"VAL_BATCH_SIZE": "4096"}, "a.zst")
    assert ok.val_batch_size == 4096 and ok.num_layers == trained.num_layers
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        artifact_config_for_env(trained, {"NUM_LAYERS": "9"}, "a.zst")
    assert dataclasses.replace(trained) == trained
