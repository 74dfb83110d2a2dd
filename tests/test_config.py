import dataclasses
import subprocess
import sys

import pytest

from shared.config import (ARTIFACT_EXT, COMPRESSORS, ROLES, Hyperparameters, artifact_config_for_env,
                           fields_with_role, near_misses, with_run_id)
from tests.conftest import ROOT

TINY = Hyperparameters.from_env({"PRESET": "tiny"})


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
    ({"MATRIX_LR": "-0.01"}, "MATRIX_LR"),
    ({"SCALAR_LR": "-0.01"}, "SCALAR_LR"),
    ({"EMBED_LR": "-0.01"}, "EMBED_LR"),
    ({"HEAD_LR": "-0.01"}, "HEAD_LR"),
    ({"TIED_EMBED_LR": "-0.01"}, "TIED_EMBED_LR"),
    ({"ADAM_EPS": "0"}, "ADAM_EPS"),
    ({"SEED": "-1"}, "SEED"),
    ({"SEED": str(2**32)}, "SEED"),
    ({"RUN_ID": ".hidden"}, "RUN_ID"),
    ({"RUN_ID": "a/b"}, "RUN_ID"),
    ({"RUN_ID": ".."}, "RUN_ID"),
    ({"ARTIFACT_PATH": "out/"}, "ARTIFACT_PATH"),
    ({"MLP_MULT": "0"}, "MLP_MULT"),
    ({"MLP_MULT": "2.001"}, "MLP_MULT"),  # 2.001 * 512 is not a whole hidden width
    ({"MLP_ACT": "gelu"}, "MLP_ACT"),
    ({"MLP_LEAKY_SLOPE": "-0.5"}, "MLP_LEAKY_SLOPE"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS"),  # odd
    ({"ROPE_DIMS": "66"}, "ROPE_DIMS"),  # > head dim 64
    ({"ROPE_DIMS": "-2"}, "ROPE_DIMS"),
    ({"LN_SCALE": "2"}, "LN_SCALE"),
    ({"XSA_LAST_N": "-1"}, "XSA_LAST_N"),
    ({"XSA_LAST_N": "10"}, "XSA_LAST_N"),  # > NUM_LAYERS=9
    ({"XSA_LAST_N": "3", "NUM_LAYERS": "2"}, "XSA_LAST_N"),
    ({"XSA_LAST_N": "1.5"}, "XSA_LAST_N"),
    ({"SKIP_GATES_ENABLED": "2"}, "SKIP_GATES_ENABLED"),
    ({"NUM_LOOPS": "-1"}, "NUM_LOOPS"),
    ({"NUM_LOOPS": "2", "LOOP_END": "9"}, "LOOP_START and LOOP_END"),  # = NUM_LAYERS
    ({"NUM_LOOPS": "2", "LOOP_START": "6", "LOOP_END": "5"}, "LOOP_START and LOOP_END"),
    ({"NUM_LOOPS": "2", "LOOP_START": "-1"}, "LOOP_START and LOOP_END"),
    ({"ENABLE_LOOPING_AT": "1.01"}, "ENABLE_LOOPING_AT"),
    ({"ENABLE_LOOPING_AT": "-0.1"}, "ENABLE_LOOPING_AT"),
    ({"PARALLEL_START_LAYER": "9"}, "PARALLEL_START_LAYER"),  # no layer >= 9 in 9 layers
    ({"PARALLEL_START_LAYER": "-1"}, "PARALLEL_START_LAYER"),
    ({"MUON_WD": "-0.1"}, "MUON_WD"),
    ({"EMBED_WD": "-0.1"}, "EMBED_WD"),
    ({"ADAM_WD": "-1e-9"}, "ADAM_WD"),
    ({"MUON_NS": "newton_schulz"}, "MUON_NS must be one of"),
    ({"MUON_ROW_NORMALIZE": "2"}, "MUON_ROW_NORMALIZE"),
    ({"PARALLEL_START_LAYER": "3"}, "PARALLEL_START_LAYER"),  # layer 3 is in the encoder [0..3]
    # looped [0,1,2,3,4,5,3,4,5] | [3,4,5,6,7,8, ...]: layer 4 runs, then 3 again, inside the lanes
    ({"PARALLEL_START_LAYER": "4", "NUM_LOOPS": "2"}, "PARALLEL_START_LAYER.*looped schedule"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        Hyperparameters.from_env(env)


@pytest.mark.parametrize("env", [
    {"RUN_ID": ""}, {"RUN_ID": "run-1.b_2"}, {"MATRIX_LR": "0"}, {"SEED": "0"}, {"SEED": str(2**32 - 1)},
    {"ARTIFACT_PATH": "out/a.int8.zst"}, {"ADAM_EPS": "1e-12"},
    {"MLP_MULT": "1.5"}, {"MLP_MULT": "4"}, {"MLP_ACT": "leaky_relu2"}, {"ROPE_DIMS": "16"}, {"ROPE_DIMS": "64"},
    {"LN_SCALE": "1"}, {"MUON_NS": "polar_express"}, {"MUON_NS": "quintic"}, {"MUON_ROW_NORMALIZE": "1"},
    {"XSA_LAST_N": "9"}, {"XSA_LAST_N": "1"}, {"SKIP_GATES_ENABLED": "1"},
    {"NUM_LOOPS": "1"}, {"ENABLE_LOOPING_AT": "0"}, {"ENABLE_LOOPING_AT": "1"}, {"PARALLEL_START_LAYER": "8"},
    {"PARALLEL_START_LAYER": "4"}, {"LOOP_END": "99"},  # LOOP_* are read only when NUM_LOOPS > 0
])
def test_edge_values_that_are_allowed(env):
    cfg = Hyperparameters.from_env(env)
    (key, raw), = env.items()
    value = getattr(cfg, key.lower())
    assert value == type(value)(raw)


def test_json_round_trip_and_unknown_key():
    cfg = Hyperparameters.from_env({"PRESET": "tiny", "RUN_ID": "abc", "TIE_EMBEDDINGS": "0"})
    assert Hyperparameters.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        Hyperparameters.from_json('{"bogus": 1}')


def test_mlp_mult_is_a_float_and_old_int_json_still_parses():
    old = Hyperparameters.from_json('{"mlp_mult": 2, "model_dim": 512}')  # artifacts stored it as an int
    assert old.mlp_mult == 2.0 and isinstance(old.mlp_mult, float) and old == Hyperparameters()
    assert Hyperparameters.from_env({"MLP_MULT": "3.5"}).mlp_mult == 3.5
    for text in ('{"mlp_mult": "two"}', '{"mlp_mult": 2.001}'):
        with pytest.raises(ValueError, match="MLP_MULT"):
            Hyperparameters.from_json(text)


def test_record_knob_defaults_are_the_baseline_network():
    cfg = Hyperparameters()
    assert (cfg.mlp_mult, cfg.mlp_act, cfg.mlp_leaky_slope, cfg.rope_dims, cfg.ln_scale) == (2.0, "relu2", 0.5, 0,
                                                                                             False)
    assert (cfg.xsa_last_n, cfg.skip_gates_enabled) == (0, False)
    assert (cfg.num_loops, cfg.parallel_start_layer) == (0, 0)  # off; LOOP_START/END/ENABLE_LOOPING_AT as the record
    assert (cfg.loop_start, cfg.loop_end, cfg.enable_looping_at) == (3, 5, 0.35)


def test_the_record_loop_and_lane_layout_is_valid():
    record = {"NUM_LAYERS": "11", "NUM_LOOPS": "2", "PARALLEL_START_LAYER": "8"}
    assert (Hyperparameters.from_env(record).loop_start, Hyperparameters.from_env(record).loop_end) == (3, 5)
    # the looped decoder is [5,3,4,5,6,...]: lanes from layer 6 on end it, lanes from 5 would meet 3 again
    assert Hyperparameters.from_env(dict(record, PARALLEL_START_LAYER="6")).parallel_start_layer == 6
    with pytest.raises(ValueError, match="PARALLEL_START_LAYER .*looped schedule"):
        Hyperparameters.from_env(dict(record, PARALLEL_START_LAYER="5"))


def test_parsing_happens_only_on_request():
    # A fresh interpreter (not importlib.reload, which would swap the class under other modules' feet):
    # importing every config reader with a broken knob in the environment must succeed.
    code = ("import os, shared.config, shared.spec, shared.schedule, shared.artifact, shared.checkpoint\n"
            "try:\n    shared.config.Hyperparameters.from_env(os.environ)\n"
            "except ValueError as e:\n    print('raised', e)\n")
    env = {"NUM_LAYERS": "not-a-number", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "raised NUM_LAYERS='not-a-number'" in res.stdout


def test_every_field_has_a_role():
    for f in dataclasses.fields(Hyperparameters):
        assert f.metadata.get("role") in ROLES, f.name
    every = sorted(f.name for f in dataclasses.fields(Hyperparameters))
    assert sorted(sum((fields_with_role(r) for r in ROLES), ())) == every


def test_architecture_knobs_are_model_fields():
    model = set(fields_with_role("model"))
    assert {"vocab_size", "num_layers", "num_kv_heads", "model_dim", "num_heads", "mlp_mult", "tie_embeddings",
            "rope_base", "logit_softcap", "mlp_act", "mlp_leaky_slope", "rope_dims", "ln_scale", "xsa_last_n",
            "skip_gates_enabled", "num_loops", "loop_start", "loop_end", "parallel_start_layer"} <= model
    # the optimizer and the run length are not part of what an artifact is valid under
    assert not {"matrix_lr", "seed", "iterations", "val_batch_size", "compute_dtype"} & model
    assert {"matrix_lr", "seed", "warmdown_iters", "train_seq_len", "enable_looping_at"} <= set(
        fields_with_role("train"))


@pytest.mark.parametrize("name,raw,attr,value", [
    ("VAL_BATCH_SIZE", "4096", "val_batch_size", 4096),
    ("EVAL_STRIDE", "64", "eval_stride", 64),
    ("RUN_ID", "eval-1", "run_id", "eval-1"),
    ("MLX_STREAMS", "3", "mlx_streams", 3),
    ("COMPUTE_DTYPE", "float32", "compute_dtype", "float32"),
])
def test_artifact_config_accepts_eval_run_and_backend_overrides(name, raw, attr, value):
    cfg = artifact_config_for_env(TINY, {name: raw}, "a.zst")
    assert getattr(cfg, attr) == value and getattr(TINY, attr) != value
    assert dataclasses.replace(cfg, **{attr: getattr(TINY, attr)}) == TINY  # nothing else moved


@pytest.mark.parametrize("name,raw,old,new", [
    ("NUM_LAYERS", "9", "2", "9"),  # model
    ("MODEL_DIM", "128", "64", "128"),  # model
    ("MATRIX_LR", "0.02", "0.04", "0.02"),  # train
    ("SEED", "7", "1337", "7"),  # train
])
def test_artifact_config_rejects_model_and_train_overrides(name, raw, old, new):
    with pytest.raises(ValueError) as info:
        artifact_config_for_env(TINY, {name: raw}, "a.zst")
    msg = str(info.value)
    assert "a.zst" in msg and f"{name}={old}" in msg and f"{name}={new}" in msg, msg


def test_artifact_config_accepts_the_artifacts_own_values():
    same = {"NUM_LAYERS": "2", "MODEL_DIM": "64", "MATRIX_LR": "0.04", "SEED": "1337", "PRESET": "baseline"}
    assert artifact_config_for_env(TINY, same, "a.zst") == TINY  # base is the artifact's config, not the preset


def test_near_misses_warn_for_typos_only():
    warnings = near_misses({"NUM_LAYER": "3", "MATRX_LR": "0.1"})
    assert len(warnings) == 2
    assert any("NUM_LAYER " in w and "NUM_LAYERS" in w for w in warnings), warnings
    assert any("MATRX_LR " in w and "MATRIX_LR" in w for w in warnings), warnings
    innocent = {k: "1" for k in ("PATH", "HOME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS", "PRESET",
                                 "NUM_LAYERS", "MATRIX_LR", "RUN_ID", "MLX_STREAMS", "USER", "PWD", "SHELL",
                                 "TERM")}
    assert near_misses(innocent) == []  # USER, PWD, SHELL, TERM are 3 edits from SEED: past the limit of 2
    assert near_misses({"NUM_LAY": "1"}) == []  # 3 edits from NUM_LAYERS
    assert len(near_misses({"SEED_": "1", "BETA3": "1", "NUM_HEAD": "4"})) == 3  # 1 edit each
    assert near_misses({"NUM_LAYRES": "3"}) == ["NUM_LAYRES is not a knob; did you mean NUM_LAYERS?"]  # 2 edits


def test_with_run_id_keeps_a_set_id_and_fills_an_empty_one():
    assert with_run_id(dataclasses.replace(TINY, run_id="mine"), "fresh").run_id == "mine"
    filled = with_run_id(dataclasses.replace(TINY, run_id=""), "fresh")
    assert filled.run_id == "fresh" and dataclasses.replace(filled, run_id="") == dataclasses.replace(TINY, run_id="")


def test_an_mlx_chunk_size_does_not_constrain_the_sequence_length():
    """MLX_MAX_MICROBATCH_TOKENS only sizes MLX's chunks (at least one sequence each): a torch run at
    TRAIN_SEQ_LEN=3072 must not be refused because 8192 is not a multiple of it."""
    cfg = Hyperparameters.from_env({"TRAIN_SEQ_LEN": "3072", "TRAIN_BATCH_TOKENS": str(3072 * 8 * 4)})
    assert cfg.train_seq_len == 3072 and cfg.mlx_max_microbatch_tokens == 8192


def test_record_preset_prints_the_records_parameter_count():
    from shared.spec import count_params
    # 35,945,671 in the record's log, less the 48 lane scalars it stores for layers 0..7 and never reads
    assert count_params(Hyperparameters.from_env({"PRESET": "record"})) == 35_945_623


@pytest.mark.parametrize("name", ["record", "tiny_record", "mac"])
def test_record_presets_turn_every_feature_on(name):
    """Every model/init knob that is off in the baseline (False or 0) is on in the record-class presets, so a new
    feature cannot be forgotten in them; and they share the record's values for every non-size knob."""
    from shared.config import RECORD_MODEL, fields_with_role
    cfg, base = Hyperparameters.from_env({"PRESET": name}), Hyperparameters()
    off = [f for f in fields_with_role("model") + ("ortho_init",) if not getattr(base, f)]
    assert off and [f for f in off if not getattr(cfg, f)] == []
    sizes = {"vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "rope_dims", "xsa_last_n",
             "loop_start", "loop_end", "parallel_start_layer"}
    assert {k: getattr(cfg, k) for k in RECORD_MODEL if k not in sizes} == \
        {k: v for k, v in RECORD_MODEL.items() if k not in sizes}


def test_the_default_artifact_name_says_what_is_inside():
    assert Hyperparameters.from_env({"RUN_ID": "r"}).resolved_artifact_path() == "artifacts/r.int8.zst"
    record = Hyperparameters.from_env({"PRESET": "record", "RUN_ID": "r"})
    assert record.resolved_artifact_path() == "artifacts/r.gptq.ans"
    env = {"RUN_ID": "r", "QUANT": "gptq", "COMPRESSOR": "brotli"}
    assert Hyperparameters.from_env(env).resolved_artifact_path() == "artifacts/r.gptq.br"
    assert Hyperparameters.from_env(dict(env, ARTIFACT_PATH="x/y.bin")).resolved_artifact_path() == "x/y.bin"
    assert set(ARTIFACT_EXT) == set(COMPRESSORS)  # every coder has a suffix
