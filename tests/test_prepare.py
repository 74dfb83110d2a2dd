import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import download
from data.build import build_dataset
from data.corpus import demo_documents
from shared.data import list_shards, load_shard, train_pattern, val_pattern
from shared.tokenizer import build_byte_tables, load_tokenizer, normalized_text
from tests.conftest import ROOT


def _docs_of(tokens):
    starts = np.flatnonzero(tokens == 1)
    return [seg[1:].tolist() for seg in np.split(tokens, starts[1:])]


def _check_build(out, name, docs, n_val):
    sp = load_tokenizer(str(out / "tokenizers" / f"{name}.model"))
    val = np.concatenate([load_shard(f, sp.vocab_size()) for f in list_shards(val_pattern(str(out / "datasets" / name)))])
    val_docs = _docs_of(val)
    assert val[0] == 1 and len(val_docs) == n_val
    for ids, doc in zip(val_docs, docs[:n_val]):
        assert sp.decode(ids) == normalized_text(sp, doc)
    tables = build_byte_tables(sp)
    counted = int(tables.count_bytes(val[:-1].astype(np.int64), val[1:].astype(np.int64)).sum())
    assert counted == sum(len(normalized_text(sp, d).encode("utf-8")) for d in docs[:n_val])
    assert list_shards(train_pattern(str(out / "datasets" / name)))


def test_demo_build_is_deterministic_and_decodes(tmp_path):
    cmd = [sys.executable, str(ROOT / "data" / "prepare.py"), "--demo", "--out"]
    for sub in ("a", "b"):
        subprocess.run(cmd + [str(tmp_path / sub)], check=True, capture_output=True)
    a, b = (tmp_path / s / "datasets" / "demo_sp1024" for s in "ab")
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    sps = [load_tokenizer(str(tmp_path / s / "tokenizers/demo_sp1024.model")) for s in "ab"]
    vocab = [[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())] for sp in sps]
    assert vocab[0] == vocab[1]  # the file also records its temp path, so compare the model itself
    from data.prepare import deterministic_shuffle
    docs = deterministic_shuffle(demo_documents())
    _check_build(tmp_path / "a", "demo_sp1024", docs, len(docs) // 10)


def test_trained_tokenizer_and_small_shards(tmp_path):
    docs = demo_documents()[:120]
    summary = build_dataset(docs, "t", tmp_path, val_docs=12, tokenizer=None, vocab_size=384, shard_tokens=20_000)
    assert summary["val"]["documents"] == 12 and summary["train"]["documents"] == 108
    assert len(list_shards(train_pattern(str(tmp_path / "datasets" / "t")))) > 1
    _check_build(tmp_path, "t", docs, 12)
    sp = load_tokenizer(str(tmp_path / "tokenizers" / "t.model"), 384)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp.encode("12345", out_type=str)[-5:] == list("12345")[-5:]  # split_digits


def test_text_source_with_the_official_tokenizer(reference_data, tmp_path):
    src = reference_data / "text" / "fineweb_edu_sample_1MB.txt"
    tok = reference_data / "tokenizers" / "fineweb_1024_bpe.model"
    out = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--text", str(src), "--tokenizer", str(tok),
                          "--name", "edu", "--out", str(tmp_path)], check=True, capture_output=True, text=True).stdout
    summary = json.loads(out[out.index("{"):])
    docs = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert summary["val"]["documents"] == len(docs) // 10
    _check_build(tmp_path, "edu", docs, len(docs) // 10)


def test_jsonl_errors_name_the_line(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    from data.corpus import read_jsonl
    with pytest.raises(ValueError, match="d.jsonl:2"):
        read_jsonl([bad])


MANIFEST = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                          "stats": {"files_train": 195, "files_val": 1}}],
            "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                            "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}


def test_download_plan_and_local_paths(tmp_path):
    files = download.plan_files(MANIFEST, "sp1024", 2, "datasets")
    assert files == ["datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                     "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                     "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                     "datasets/tokenizers/fineweb_1024_bpe.model", "datasets/tokenizers/fineweb_1024_bpe.vocab"]
    assert download.local_path_for_remote(files[0], "datasets", tmp_path) == \
        tmp_path / "datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    with pytest.raises(ValueError, match="195 train shards"):
        download.plan_files(MANIFEST, "sp1024", 196, "datasets")
    with pytest.raises(ValueError, match="sp4096"):
        download.plan_files(MANIFEST, "sp4096", 1, "datasets")


def test_local_verification_catches_truncation(tmp_path):
    from shared.data import write_shard
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    assert download.is_valid_local(path) and download.is_valid_local(path, 1024 + 200)
    assert not download.is_valid_local(path, 999)
    path.write_bytes(path.read_bytes()[:-2])
    assert not download.is_valid_local(path)
    assert not download.is_valid_local(tmp_path / "absent.bin")


def test_network_failure_is_a_clear_message(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    res = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--variant", "sp1024", "--train-shards",
                          "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0
    assert "cannot download datasets/manifest.json" in res.stderr and "--demo" in res.stderr
