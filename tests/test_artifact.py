import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.artifact import (HASHED_METADATA_V3, ArtifactError, SizeReport, load_artifact, payload_sha256,
                             read_artifact, save_artifact, size_report)
from shared.config import Hyperparameters
from shared.quant.int8 import dequantize, quantize
from shared.shipped import code_files
from shared.spec import init_params, param_shapes, param_table
from tests.conftest import ROOT

CFG = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "128", "TRAIN_SEQ_LEN": "32",
                                "TRAIN_BATCH_TOKENS": "1024", "MLX_MAX_MICROBATCH_TOKENS": "256"})
STORES = {p.name: p.store for p in param_table(CFG)}
TOKENIZER_SHA = "ab" * 32


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
        if STORES[name] == "control":
            np.testing.assert_array_equal(loaded[name], w, err_msg=name)  # small control tensors stay fp32
        else:
            step = max(np.abs(w).max() / 127, 1 / 127) if w.size > 65536 else np.abs(w).max() * 2e-3
            assert np.abs(loaded[name] - w).max() <= step, name


def test_quantization_follows_the_official_int8_rule():
    n = 70_000  # > 65,536 elements a row: quantized per row
    w = np.ones((3, n), dtype=np.float32)
    w[0, 12_345] = 1000.0  # one outlier among 69,999 ones
    w[1] = 100.0
    w[1, [7, 60_000]] = -1000.0  # two outliers: the top two sorted |w| are both 1000
    w[2] = np.where(np.arange(n) % 2 == 0, 0.005, -0.005)  # a tiny row: hits the 1/127 scale floor
    tensors, index = quantize({"m": w}, {"m": "weight"})
    q, s = tensors["q:m"], tensors["scale:m"]
    assert index["m"]["kind"] == "int8_per_row" and q.dtype == np.int8 and s.dtype == np.float16
    # Linear interpolation at position (n-1)*q = 69,999 * 0.9999984 = 69,998.8880016: sorted |w| is 1.0 at index
    # 69,998 and 1000.0 at 69,999, so clip = 1 + 0.8880016 * 999 = 888.1135984.
    clip0 = 1.0 + 0.8880016 * 999.0
    np.testing.assert_allclose(float(s[0]), clip0 / 127, rtol=1e-3)  # fp16: ~5e-4 relative precision
    assert q[0, 12_345] == 127  # the outlier is clipped to the edge, not beyond it
    assert np.all(q[0, np.arange(n) != 12_345] == 0)  # round(1 / 6.993) = 0
    # Row 1: both of the top two are 1000, so the clip is exactly 1000 and 100 -> round(12.7) = 13.
    np.testing.assert_allclose(float(s[1]), 1000.0 / 127, rtol=1e-3)
    assert q[1, 7] == q[1, 60_000] == -127 and q[1, 0] == 13
    # Row 2: clip 0.005 would give scale 0.005/127; the floor 1/127 wins and 0.005*127 = 0.635 rounds to 1.
    assert s[2] == np.float16(1 / 127)
    assert q[2, 0] == 1 and q[2, 1] == -1
    back = dequantize(tensors, index)["m"]
    assert back.dtype == np.float32 and back.shape == (3, n)
    assert back[1, 0] == np.float32(13) * np.float32(s[1]) and back[2, 1] == -np.float32(np.float16(1 / 127))


def test_small_tensors_keep_float_by_store_kind():
    t = np.array([[1.0001, -2.5]], dtype=np.float32)
    tensors, index = quantize({"c": t, "w": t}, {"c": "control", "w": "weight"})
    assert tensors["float:c"].dtype == np.float32 and tensors["float:w"].dtype == np.float16
    assert index["c"]["kind"] == index["w"]["kind"] == "float"
    assert tensors["float:c"][0, 0] == np.float32(1.0001) and tensors["float:w"][0, 0] == np.float16(1.0)


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
    return meta, tensors


def test_unknown_version_and_sha_mismatch(tmp_path):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG)
    _rewrite(path, edit_meta=lambda m: m.update(format_version="99"))
    with pytest.raises(ArtifactError, match="version '99'"):
        load_artifact(path)
    save_artifact(path, _trained_like_state(), CFG)
    _rewrite(path, edit_tensors=lambda t: t["float:tok_emb.weight"].__setitem__((0, 0), 5))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(path)


def _edit_config(meta, **changes):
    cfg = json.loads(meta["config"])
    cfg.update(changes)
    meta["config"] = json.dumps(cfg, sort_keys=True)


@pytest.mark.parametrize("edit", [
    lambda m: _edit_config(m, matrix_lr=0.02),  # valid, and consistent with the tensors: only the hash can tell
    lambda m: _edit_config(m, num_layers=3),
    lambda m: m.update(tokenizer_sha256="cd" * 32),
    lambda m: m.update(tokenizer_sha256=""),
])
def test_version_2_hash_covers_config_and_tokenizer(tmp_path, edit):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG, TOKENIZER_SHA)
    _rewrite(path)  # re-packing alone, with nothing edited, still loads: the check is about content
    assert read_artifact(path).cfg == CFG
    _rewrite(path, edit_meta=edit)
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(path)


def test_read_artifact_returns_the_tokenizer_hash(tmp_path):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG, TOKENIZER_SHA)
    art = read_artifact(path)
    assert art.tokenizer_sha256 == TOKENIZER_SHA and art.cfg == CFG
    save_artifact(path, _trained_like_state(), CFG)
    assert read_artifact(path).tokenizer_sha256 == ""


def _v1_payload_sha256(tensors):
    """The version-1 rule, written out: sha256 over [key, dtype, shape] JSON then the bytes, keys sorted."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = np.ascontiguousarray(tensors[key])
        h.update(json.dumps([key, t.dtype.str, list(t.shape)]).encode())
        h.update(t.tobytes())
    return h.hexdigest()


def test_a_version_1_file_still_loads(tmp_path):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG, TOKENIZER_SHA)
    want = read_artifact(path).state

    def to_v1(meta):
        del meta["tokenizer_sha256"]
        meta["format_version"] = "1"

    meta, tensors = _rewrite(path, edit_meta=to_v1)
    meta["payload_sha256"] = _v1_payload_sha256(tensors)
    path.write_bytes(zstandard.ZstdCompressor().compress(st_save(tensors, metadata=meta)))
    art = read_artifact(path)
    assert art.cfg == CFG and art.tokenizer_sha256 == ""
    for name in want:
        np.testing.assert_array_equal(art.state[name], want[name], err_msg=name)
    # ...and a version-1 file still checks its tensors
    _rewrite(path, edit_tensors=lambda t: t["float:tok_emb.weight"].__setitem__((0, 0), 5))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(path)


def test_non_finite_weight_is_refused_and_the_old_file_kept(tmp_path):
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), CFG)
    before = path.read_bytes()
    bad = _trained_like_state()
    bad["blocks.1.mlp.fc.weight"][3, 5] = np.nan
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.mlp\.fc\.weight"):
        save_artifact(path, bad, CFG)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the overflow under test
def test_a_weight_past_fp16_range_is_refused(tmp_path):
    path = tmp_path / "a.zst"
    assert param_shapes(CFG)["tok_emb.weight"] == (128, 64) and STORES["tok_emb.weight"] == "weight"  # kept as fp16
    state = _trained_like_state()
    state["tok_emb.weight"][1, 2] = 70_000.0  # finite in fp32, inf in fp16 (max 65,504)
    with pytest.raises(FloatingPointError, match=r"tok_emb\.weight"):
        save_artifact(path, state, CFG)
    assert not path.exists()
    # a small control tensor stays fp32, so the same value there is stored as is
    state = _trained_like_state()
    state["blocks.0.attn_scale"][0] = 70_000.0
    save_artifact(path, state, CFG)
    assert load_artifact(path)[0]["blocks.0.attn_scale"][0] == 70_000.0


def test_a_directory_is_not_an_artifact(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_artifact(tmp_path)


def test_size_report_counts_the_shipped_code(tmp_path):
    from tools.bundle import bundle_bytes
    path = tmp_path / "a.zst"
    n = save_artifact(path, _trained_like_state(), CFG)
    trainer = ROOT / "cuda_train.py"
    report = size_report(path, trainer)
    files = [Path(f) for f in code_files(trainer)]
    assert files[0] == trainer.resolve()
    # what ships, listed here from the rule in shared/shipped.py: the trainer, its model/optim/TTT modules, shared/**.py
    want_files = {trainer, ROOT / "torch_gptq.py", ROOT / "torch_model.py", ROOT / "torch_optim.py",
                  ROOT / "torch_ttt.py"}
    want_files |= set((ROOT / "shared").rglob("*.py"))
    assert set(files) == {f.resolve() for f in want_files} and len(files) == len(want_files)
    # ... counted as it ships: the compressed train_gpt.py that python -m tools.bundle --compress writes
    want_code = len(bundle_bytes(trainer, compress=True))
    assert want_code < sum(f.stat().st_size for f in files) / 4
    assert report.artifact_bytes == n == path.stat().st_size
    assert report.code_bytes == want_code
    assert report.total_bytes == n + want_code and not report.over_limit
    report.check(str(path))  # well under the 16 MB cap


def test_size_check_raises_over_the_limit():
    exact = SizeReport(artifact_bytes=1_000, code_bytes=234, limit=1_234)
    assert not exact.over_limit
    exact.check("x.zst")  # the cap itself is allowed
    over = SizeReport(artifact_bytes=1_000, code_bytes=235, limit=1_234)
    with pytest.raises(ValueError, match=r"x\.zst: 1235 bytes .* is 1 bytes over the 1234-byte cap"):
        over.check("x.zst")
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


def test_a_stored_config_this_code_rejects_is_named_with_the_file(tmp_path):
    """Older code allowed configs this code refuses: the error names the artifact, not just the field."""
    path = tmp_path / "a.zst"
    save_artifact(path, _trained_like_state(), dataclasses.replace(CFG, run_id="exp 1"))  # a space: still fine
    assert load_artifact(path)[1].run_id == "exp 1"

    def bad_config(meta):
        cfg = json.loads(meta["config"])
        cfg["adam_eps"] = 0.0
        meta["config"] = json.dumps(cfg, sort_keys=True)
        meta["payload_sha256"] = payload_sha256(st_load(zstandard.ZstdDecompressor().decompress(path.read_bytes())),
                                                {k: meta[k] for k in HASHED_METADATA_V3})
    _rewrite(path, edit_meta=bad_config)
    with pytest.raises(ArtifactError, match=f"{path}.*ADAM_EPS"):
        load_artifact(path)
