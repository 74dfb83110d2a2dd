import json

import numpy as np
import pytest
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.artifact import (ArtifactError, SizeReport, dequantize, load_artifact, quantize, save_artifact)
from shared.config import Hyperparameters
from shared.model_spec import init_params, param_shapes

CFG = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "128", "TRAIN_SEQ_LEN": "32",
                                "TRAIN_BATCH_TOKENS": "1024", "MLX_MAX_MICROBATCH_TOKENS": "256"})


def _trained_like_state(cfg=CFG):
    rng = np.random.default_rng(3)
    return {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32) for k, v in init_params(cfg).items()}


def test_round_trip_names_shapes_and_quantization_error(tmp_path):
    state = _trained_like_state()
    path = tmp_path / "a.int8.zst"
    n = save_artifact(path, state, CFG)
    loaded, cfg = load_artifact(path)
    assert n == path.stat().st_size and cfg == CFG
    assert {k: v.shape for k, v in loaded.items()} == param_shapes(CFG)
    for name, w in state.items():
        assert loaded[name].dtype == np.float32
        if "q_gain" in name or "resid_mix" in name or "skip" in name or "scale" in name:
            np.testing.assert_array_equal(loaded[name], w, err_msg=name)  # control tensors stay fp32
        else:
            step = max(np.abs(w).max() / 127, 1 / 127) if w.size > 65536 else np.abs(w).max() * 2e-3
            assert np.abs(loaded[name] - w).max() <= step, name


def test_quantization_follows_the_official_int8_rule():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 70000)) * np.array([[0.001], [2.0], [50.0]])).astype(np.float32)
    tensors, index = quantize({"m": w})
    q, s = tensors["q:m"], tensors["scale:m"].astype(np.float32)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127 and index["m"]["kind"] == "int8_per_row"
    assert s[0] == np.float16(1 / 127)  # tiny rows hit the 1/127 floor
    clip = np.quantile(np.abs(w[2]), 0.9999984)
    assert s[2] == np.float16(clip / 127)
    back = dequantize(tensors, index)["m"]
    np.testing.assert_array_equal(back, q.astype(np.float32) * s[:, None])


def _corrupt(path, fn):
    data = bytearray(path.read_bytes())
    fn(data)
    path.write_bytes(bytes(data))


def test_truncated_and_flipped_files_are_clear_errors(tmp_path):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_artifact(path)
    path.write_bytes(good)
    _corrupt(path, lambda d: d.__setitem__(len(d) // 2, d[len(d) // 2] ^ 0x40))
    with pytest.raises(ArtifactError, match=str(path)):
        load_artifact(path)
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "missing.zst")


def _rewrite(path, edit_meta=None, edit_tensors=None):
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    tensors = st_load(raw)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    path.write_bytes(zstandard.ZstdCompressor().compress(st_save(tensors, metadata=meta)))


def test_unknown_version_and_sha_mismatch(tmp_path):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG)
    _rewrite(path, edit_meta=lambda m: m.update(format_version="99"))
    with pytest.raises(ArtifactError, match="version '99'"):
        load_artifact(path)
    save_artifact(path, _trained_like_state(), CFG)
    _rewrite(path, edit_tensors=lambda t: t["q:tok_emb.weight"].__setitem__((0, 0), 5) if "q:tok_emb.weight" in t
             else t["float:tok_emb.weight"].__setitem__((0, 0), 5))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(path)


def test_size_cap():
    assert not SizeReport(15_000_000, 999_999).over_limit
    assert SizeReport(15_000_000, 1_000_001).over_limit
    with pytest.raises(ValueError, match="over the 16000000-byte cap"):
        SizeReport(16_000_000, 1).check("x.zst")
    assert SizeReport(1, 2).line("p") == "artifact:p artifact_bytes:1 code_bytes:2 total_bytes:3 limit:16000000"


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG)
    before = path.read_bytes()
    import shared.fsutil
    monkeypatch.setattr(shared.fsutil.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_artifact(path, {k: v * 2 for k, v in _trained_like_state().items()}, CFG)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
