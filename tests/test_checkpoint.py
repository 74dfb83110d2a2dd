"""shared/checkpoint.py: a framework-neutral training state that refuses, by name, anything it cannot trust."""
import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.checkpoint import check_fingerprint, load_checkpoint, pack, save_checkpoint
from shared.config import Hyperparameters
from shared.spec import init_params, optimizer_slots, param_table

CFG = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "128", "TRAIN_SEQ_LEN": "32",
                                "TRAIN_BATCH_TOKENS": "1024", "MLX_MAX_MICROBATCH_TOKENS": "256", "RUN_ID": "ck"})
META = {"step": 7, "train_ms": 1234.5, "data": {"file_idx": 1, "pos": 42},
        "fingerprint": {"train_shards": [["fineweb_train_000000.bin", 100]], "tokenizer_sha256": "ab" * 32},
        "backend": "torch"}


def _tensors(cfg=CFG):
    """Weights from the parameter table and every optimizer slot, filled with distinct values (zeros would
    hide a slot swapped for another)."""
    rng = np.random.default_rng(5)
    weights = init_params(cfg)
    slots = {}
    for p in param_table(cfg):
        slots[p.name] = {s: (np.array([7.0]) if s == "step" else rng.standard_normal(p.shape).astype(np.float32))
                         for s in optimizer_slots(p)}
    return pack(weights, slots), weights, slots


def _save(tmp_path, tensors=None, meta=META, cfg=CFG):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, cfg, _tensors(cfg)[0] if tensors is None else tensors, meta)
    return path


def test_round_trip_is_exact(tmp_path):
    tensors, weights, slots = _tensors()
    assert "opt:tok_emb.weight:m" in tensors and "opt:blocks.0.attn.c_q.weight:momentum" in tensors
    assert tensors["opt:tok_emb.weight:step"].dtype == np.float64
    path = _save(tmp_path, tensors)
    got_w, got_s, meta, _ = load_checkpoint(path, CFG)
    assert meta == META and set(meta) >= {"step", "train_ms", "data", "fingerprint", "backend"}
    assert set(got_w) == set(weights) and set(got_s) == set(slots)
    for name, w in weights.items():
        assert got_w[name].dtype == w.dtype
        np.testing.assert_array_equal(got_w[name], w, err_msg=name)
        assert set(got_s[name]) == set(slots[name]), name
        for slot, v in slots[name].items():
            assert got_s[name][slot].dtype == v.dtype, (name, slot)
            np.testing.assert_array_equal(got_s[name][slot], v, err_msg=f"{name}:{slot}")


def test_a_flipped_byte_in_the_tensor_data_is_caught(tmp_path):
    path = _save(tmp_path)
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    i = data_start + (len(raw) - data_start) // 2
    raw[i] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(path, CFG)


def test_a_truncated_file_is_named(tmp_path):
    path = _save(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(path, CFG)


def _resave(path, edit_meta=None, edit_tensors=None):
    """Rewrite the file's metadata or tensors without fixing its payload hash."""
    raw = path.read_bytes()
    metadata = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = st_load(raw)
    if edit_meta:
        edit_meta(metadata)
    if edit_tensors:
        edit_tensors(tensors)
    path.write_bytes(st_save(tensors, metadata=metadata))


def _set_config(metadata, **changes):
    cfg = json.loads(metadata["config"])
    cfg.update(changes)
    metadata["config"] = json.dumps(cfg, sort_keys=True)


@pytest.mark.parametrize("edit", [
    lambda m: _set_config(m, matrix_lr=0.02),
    lambda m: m.update(meta=m["meta"].replace('"step": 7', '"step": 8')),
])
def test_the_hash_covers_config_and_meta(tmp_path, edit):
    path = _save(tmp_path)
    _resave(path, edit_meta=edit)
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(path, CFG)


@pytest.mark.parametrize("edit,named", [
    (lambda t: t.pop("opt:blocks.1.attn_scale:m"), "opt:blocks.1.attn_scale:m"),
    (lambda t: t.pop("opt:blocks.0.mlp.fc.weight:momentum"), "opt:blocks.0.mlp.fc.weight:momentum"),
    (lambda t: t.pop("param:skip_weights"), "param:skip_weights"),
    (lambda t: t.update({"opt:tok_emb.weight:bogus": np.zeros(3, np.float32)}), "opt:tok_emb.weight:bogus"),
    (lambda t: t.update({"param:blocks.0.attn_scale": np.zeros(63, np.float32)}), "param:blocks.0.attn_scale"),
    (lambda t: t.update({"opt:tok_emb.weight:step": np.zeros(2)}), "opt:tok_emb.weight:step"),
])
def test_missing_extra_and_misshapen_entries_are_named(tmp_path, edit, named):
    tensors = _tensors()[0]
    edit(tensors)
    path = _save(tmp_path, tensors)  # saved with a valid hash: the table check must catch it
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_checkpoint(path, CFG)


@pytest.mark.parametrize("key", ["data", "step", "fingerprint", "backend", "train_ms"])
def test_meta_without_a_key_is_named(tmp_path, key):
    path = _save(tmp_path, meta={k: v for k, v in META.items() if k != key})
    with pytest.raises(ValueError, match=f"lacks.*'{key}'"):
        load_checkpoint(path, CFG)


@pytest.mark.parametrize("env,name", [
    ({"MATRIX_LR": "0.02"}, "MATRIX_LR"),
    ({"SEED": "1"}, "SEED"),
    ({"WARMDOWN_ITERS": "7"}, "WARMDOWN_ITERS"),
    ({"NUM_LAYERS": "3"}, "NUM_LAYERS"),
])
def test_a_train_or_model_change_is_refused_by_name(tmp_path, env, name):
    path = _save(tmp_path)
    other = Hyperparameters.from_env(env, base=CFG)
    with pytest.raises(ValueError, match=name) as info:
        load_checkpoint(path, other)
    assert f"{name}={getattr(CFG, name.lower())!r}" in str(info.value)


@pytest.mark.parametrize("changes", [dict(iterations=999), dict(run_id="resumed"), dict(val_batch_size=2048),
                                     dict(compute_dtype="bfloat16"), dict(checkpoint_every=5)])
def test_run_eval_and_backend_changes_are_allowed(tmp_path, changes):
    path = _save(tmp_path)
    weights, _, meta, _ = load_checkpoint(path, dataclasses.replace(CFG, **changes))
    assert meta == META and set(weights) == {p.name for p in param_table(CFG)}


@pytest.mark.parametrize("key", ["param:blocks.0.attn.c_k.weight", "opt:tok_emb.weight:v"])
def test_non_finite_state_is_refused_and_the_old_file_kept(tmp_path, key):
    path = _save(tmp_path)
    before = path.read_bytes()
    tensors = _tensors()[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[3] = np.inf
    with pytest.raises(FloatingPointError, match=key.replace(".", r"\.")):
        save_checkpoint(path, CFG, tensors, dict(META, step=8))
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_missing_file_and_foreign_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.ckpt", CFG)
    path = tmp_path / "b.ckpt"
    path.write_bytes(st_save({"x": np.zeros(2, np.float32)}, metadata={"format": "something-else"}))
    with pytest.raises(ValueError, match="something-else"):
        load_checkpoint(path, CFG)


def test_check_fingerprint_names_the_differing_key():
    saved = {"train_shards": [["a.bin", 10]], "tokenizer_sha256": "ab"}
    check_fingerprint("c.ckpt", saved, json.loads(json.dumps(saved)))  # equal content: no error
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        check_fingerprint("c.ckpt", saved, dict(saved, tokenizer_sha256="cd"))
    with pytest.raises(ValueError, match="train_shards"):
        check_fingerprint("c.ckpt", saved, dict(saved, train_shards=[["a.bin", 11]]))
    with pytest.raises(ValueError, match="val_shards"):
        check_fingerprint("c.ckpt", saved, dict(saved, val_shards=[]))  # a key one side lacks
