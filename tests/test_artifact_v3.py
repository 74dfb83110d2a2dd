"""Artifact format 3 (shared/artifact.py): every QUANT x COMPRESSOR round trip, old versions, named errors."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared import artifact
from shared.artifact import ArtifactError, load_artifact, payload_sha256, read_artifact, save_artifact
from shared.config import COMPRESSORS, Hyperparameters
from shared.quant import gptq, int8
from shared.spec import init_params, param_table

pytest.importorskip("constriction")

# Small (95k parameters): tok_emb (1040 x 64) just past int8's fixed 65,536-element float threshold, and GPTQ's
# passthrough lowered to 2,048 elements, so that tok_emb, c_q, proj and the MLP matrices go through GPTQ while c_k
# and c_v stay fp16; a sparse gate row ('gate').
CFG = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "1040", "MODEL_DIM": "64", "NUM_HEADS": "4",
                                "NUM_LAYERS": "1", "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "1024",
                                "SPARSE_ATTN_GATE_ENABLED": "1", "MATRIX_BITS": "6", "EMBED_BITS": "7",
                                "QUANT_PASSTHROUGH_NUMEL": "2048"})
STORES = {p.name: p.store for p in param_table(CFG)}
SHA = "cd" * 32
HAVE_BROTLI = __import__("importlib").util.find_spec("brotli") is not None
COMBOS = [(q, c) for q in ("int8", "gptq") for c in COMPRESSORS  # int8 with the zstd container only: fast CI
          if (c != "brotli" or HAVE_BROTLI) and (q == "gptq" or c in ("zstd", "entropy"))]


def _state():
    rng = np.random.default_rng(5)
    return {k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in init_params(CFG).items()}


def _hessians():
    """A calibrated-looking H = X^T X for every GPTQ target (so the artifacts hold a real GPTQ solve)."""
    rng = np.random.default_rng(6)
    shapes = {p.name: p.shape for p in param_table(CFG)}
    xs = {n: rng.standard_normal((3 * shapes[n][1], shapes[n][1])) for n in gptq.targets(_cfg("gptq", "zstd"))}
    return {n: (x.T @ x).astype(np.float32) for n, x in xs.items()}


def _cfg(quant, compressor):
    """Every artifact here: GPTQ with LQER on 2 tensors (so the LQER tensors travel through every coder)."""
    return dataclasses.replace(CFG, quant=quant, compressor=compressor, lqer_enabled=quant == "gptq", lqer_top_k=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(quant, compressor) -> (file bytes, size save_artifact returned, its timings), each written once."""
    out = {}
    for quant, compressor in COMBOS:
        path, timings = tmp_path_factory.mktemp(f"{quant}_{compressor}") / "a.art", {}
        n = save_artifact(path, _state(), _cfg(quant, compressor), SHA, _hessians(), timings)
        out[quant, compressor] = path.read_bytes(), n, timings
    return out


@pytest.fixture(scope="module")
def want():
    """quant -> the state each scheme's own quantize + dequantize gives (what every artifact must decode to)."""
    scheme = {"int8": int8, "gptq": gptq}
    return {q: scheme[q].dequantize(*scheme[q].quantize(_state(), STORES, _cfg(q, "zstd"), _hessians()))
            for q in scheme}


def _written(tmp_path, saved, quant, compressor):
    path = tmp_path / "a.art"
    path.write_bytes(saved[quant, compressor][0])
    return path


def _unpack(path):
    """(container, metadata, tensors) of any artifact file."""
    container, raw = artifact._decompress(path)
    n = int.from_bytes(raw[:8], "little")
    return container, json.loads(raw[8:8 + n])["__metadata__"], st_load(raw)


def _repack(path, meta, tensors, compressor, rehash=False):
    if rehash:
        meta["payload_sha256"] = payload_sha256(tensors, {k: meta[k] for k in artifact.HASHED_METADATA_V3})
    path.write_bytes(artifact.compress(st_save(tensors, metadata=meta), compressor))


@pytest.mark.parametrize("quant,compressor", COMBOS)
def test_every_quant_and_compressor_round_trips_bit_exactly(tmp_path, saved, want, quant, compressor):
    path = _written(tmp_path, saved, quant, compressor)
    _, n, timings = saved[quant, compressor]
    assert n == path.stat().st_size and "coding" in timings
    art = read_artifact(path)
    assert art.cfg == _cfg(quant, compressor) and art.tokenizer_sha256 == SHA
    for name in want[quant]:
        assert art.state[name].dtype == np.float32
        assert np.array_equal(art.state[name], want[quant][name]), name
    _, meta, tensors = _unpack(path)
    assert meta["format_version"] == "3" and meta["compressor"] == compressor
    coded = json.loads(meta["coding"])
    assert bool(coded) == (compressor == "entropy") and all(f"ans:{k}" in tensors for k in coded)
    if quant == "gptq":
        assert "q:blocks.0.attn.attn_gate_w" in (coded if compressor == "entropy" else tensors)
        assert sum("lqer" in e for e in json.loads(meta["tensors"]).values()) == 2 and "lqer" in timings


def _old_file(path, version):
    """A version-1 or -2 file as the old writer made it: int8 scheme, zstd, no compressor/coding fields."""
    tensors, index = int8.quantize(_state(), STORES)
    meta = {"format": artifact.FORMAT_NAME, "format_version": str(version), "quant_scheme": int8.NAME,
            "config": CFG.to_json(), "tensors": json.dumps(index, sort_keys=True)}
    if version == 2:
        meta["tokenizer_sha256"] = SHA
    covered = {k: meta[k] for k in artifact.HASHED_METADATA} if version == 2 else None
    meta["payload_sha256"] = payload_sha256(tensors, covered)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(st_save(tensors, metadata=meta)))
    return int8.dequantize(tensors, index)


@pytest.mark.parametrize("version", [1, 2])
def test_version_1_and_2_files_load_unchanged(tmp_path, version):
    path = tmp_path / "old.zst"
    want = _old_file(path, version)
    art = read_artifact(path)
    assert art.cfg == CFG and art.tokenizer_sha256 == (SHA if version == 2 else "")
    assert all(np.array_equal(art.state[k], want[k]) for k in want)
    _, meta, tensors = _unpack(path)
    meta["config"] = meta["config"].replace('"seed": 1337', '"seed": 1338')  # v2 hashes the config, v1 does not
    tensors["float:blocks.0.attn_scale"] = tensors["float:blocks.0.attn_scale"] + 1  # both hash the tensors
    _repack(path, meta, tensors, "zstd")
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(path)


@pytest.mark.parametrize("compressor", [c for q, c in COMBOS if q == "gptq"])
def test_truncated_files_are_named_errors(tmp_path, saved, compressor):
    path = _written(tmp_path, saved, "gptq", compressor)
    good = path.read_bytes()
    for cut in (len(good) - 1, len(good) // 2, 5):
        path.write_bytes(good[:cut])
        with pytest.raises(ArtifactError, match=f"{path}.*(truncated or corrupt|safetensors)"):
            load_artifact(path)
    path.write_bytes(b"GARBAGE!" + good)
    with pytest.raises(ArtifactError, match="not a zstd, xz or brotli artifact"):
        load_artifact(path)


def test_wrong_version_compressor_mismatch_and_hashed_tables(tmp_path, saved):
    path = _written(tmp_path, saved, "gptq", "entropy")
    _, meta, tensors = _unpack(path)
    _repack(path, dict(meta, format_version="4"), tensors, "zstd")
    with pytest.raises(ArtifactError, match="format version '4' is not supported"):
        load_artifact(path)
    _repack(path, dict(meta), tensors, "lzma")  # an xz file whose metadata says entropy (zstd)
    with pytest.raises(ArtifactError, match="compressor 'entropy' but the file is a lzma stream"):
        load_artifact(path)
    key = "freq:q:tok_emb.weight"
    bent = dict(tensors, **{key: tensors[key] + np.uint16(1)})  # the probability model is covered by the hash
    _repack(path, dict(meta), bent, "zstd")
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(path)
    meta_no_coding = {k: v for k, v in meta.items() if k != "coding"}
    _repack(path, meta_no_coding, tensors, "zstd")
    with pytest.raises(ArtifactError, match="lacks 'coding'"):
        load_artifact(path)


def test_a_stream_that_does_not_decode_names_its_tensor(tmp_path, saved):
    """Even with a matching hash (a writer bug, not a flipped bit), a short ANS stream is a named error."""
    path = _written(tmp_path, saved, "gptq", "entropy")
    _, meta, tensors = _unpack(path)
    tensors["ans:q:blocks.0.mlp.fc.weight"] = tensors["ans:q:blocks.0.mlp.fc.weight"][:-1].copy()
    _repack(path, meta, tensors, "zstd", rehash=True)
    with pytest.raises(ArtifactError, match=r"q:blocks\.0\.mlp\.fc\.weight: entropy-coded stream"):
        load_artifact(path)


def test_entropy_coding_is_smaller_than_zstd_on_gptq_integers(saved):
    sizes = {c: saved["gptq", c][1] for c in ("zstd", "entropy")}
    assert sizes["entropy"] < 0.97 * sizes["zstd"], sizes  # measured 56,554 vs 61,403 bytes (0.92)


def test_the_same_inputs_give_the_same_bytes():
    """The safetensors package writes its metadata map in a per-call order; ours is sorted (reproducible files)."""
    cfg = dataclasses.replace(CFG, quant="gptq", compressor="entropy")
    state = _state()
    assert artifact.encode_artifact(state, cfg, SHA) == artifact.encode_artifact(state, cfg, SHA)
    tensors = {"b": np.arange(6, dtype=np.float16).reshape(2, 3), "a": np.array([-1, 2], dtype=np.int8),
               "c": np.zeros(0, dtype=np.uint32)}
    meta = {"z": "1", "a": "2", "m": "3"}
    raw = artifact.safetensors_bytes(tensors, meta)
    back = st_load(raw)
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + n])["__metadata__"] == meta and (8 + n) % 8 == 0
