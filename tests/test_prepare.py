import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data import download
from data.build import build_dataset
from data.corpus import demo_documents
from shared.data import list_shards, load_shard, train_pattern, val_pattern
from shared.manifest import check_tokenizer, file_sha256
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
    assert vocab[0] == vocab[1]
    assert len({(tmp_path / s / "tokenizers/demo_sp1024.model").read_bytes() for s in "ab"}) == 1
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


# A failed prepare leaves the previous dataset and tokenizer byte-identical, says what was wrong in one line.
def _write_corpus(path, lo: int, hi: int) -> None:
    from pydoc_data.topics import topics  # real prose that ships with Python, loaded in milliseconds
    path.write_text("\n".join(" ".join(topics[k].split()) for k in sorted(topics)[lo:hi]) + "\n", encoding="utf-8")


def _snapshot(root):
    """Every file and folder under root, files by sha256: equal snapshots are byte-identical trees."""
    return {p.relative_to(root).as_posix(): file_sha256(p) if p.is_file() else "dir" for p in root.rglob("*")}


PREP = [sys.executable, str(ROOT / "data" / "prepare.py")]
TINY = ["--name", "t", "--vocab-size", "384", "--shard-tokens", "20000"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """data/ with datasets/t (several train shards + manifest) and tokenizers/t.model, made by the command line."""
    root = tmp_path_factory.mktemp("built")
    _write_corpus(root / "corpus.txt", 0, 40)
    subprocess.run(PREP + ["--text", str(root / "corpus.txt"), *TINY, "--out", str(root / "out")], check=True,
                   capture_output=True, timeout=120)
    assert len(list((root / "out" / "datasets" / "t").glob("fineweb_train_*.bin"))) > 1
    return root


BAD_RUNS = {  # name: (extra arguments, what stderr must say)
    "garbage_tokenizer": (["--tokenizer", "{junk}"], "error: --tokenizer {junk}: not a SentencePiece model"),
    "folder_tokenizer": (["--tokenizer", "{dir}"], "error: --tokenizer {dir}: is a directory"),
    "missing_tokenizer": (["--tokenizer", "{dir}/nope.model"], "error: --tokenizer {dir}/nope.model: no such file"),
    "zero_shard_tokens": (["--shard-tokens", "0"], "error: argument --shard-tokens: must be >= 1, got 0"),
    "negative_shard_tokens": (["--shard-tokens", "-5"], "error: argument --shard-tokens: must be >= 1, got -5"),
    "zero_val_docs": (["--val-docs", "0"], "error: argument --val-docs: must be >= 1, got 0"),
    "all_val_docs": (["--val-docs", "40"], "error: --val-docs=40 must leave both splits non-empty (40 documents)"),
    "tiny_vocab": (["--vocab-size", "100"], "error: --vocab-size=100: SentencePiece training failed"),
    "path_name": (["--name", "../t"], "error: argument --name: '../t' must be a plain name"),
    "not_utf8": (["--text", "{latin1}"], "error: {latin1}: not UTF-8 text: line 2, byte 4 is 0xe9"),
    "missing_text": (["--text", "{dir}/gone.txt"], "error: {dir}/gone.txt: no such file"),
    "not_utf8_jsonl": (["--jsonl", "{latin1}"], "error: {latin1}: not UTF-8 text: line 2, byte 4 is 0xe9"),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_a_bad_argument_changes_nothing_and_says_why_in_one_line(built, tmp_path, case):
    shutil.copytree(built / "out", tmp_path / "out")
    (tmp_path / "junk.model").write_bytes(b"\x00garbage, not a model")
    (tmp_path / "latin1.txt").write_bytes('{"text": "ok"}\ncaf\u00e9\n'.encode("latin-1"))
    names = {"junk": tmp_path / "junk.model", "dir": tmp_path, "latin1": tmp_path / "latin1.txt"}
    extra, says = BAD_RUNS[case]
    extra, says = [a.format(**names) for a in extra], says.format(**names)
    before = _snapshot(tmp_path / "out")
    source = [] if {"--text", "--jsonl"} & set(extra) else ["--text", str(built / "corpus.txt")]
    res = subprocess.run(PREP + source + [*TINY, "--out", str(tmp_path / "out")] + extra, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(says) and res.stderr.count("\n") == 1, res.stderr
    assert _snapshot(tmp_path / "out") == before  # no shard, tokenizer, manifest or temp changed


def test_a_build_that_dies_midway_keeps_the_old_dataset(built, tmp_path, monkeypatch):
    import data.build
    shutil.copytree(built / "out", tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    docs = (built / "corpus.txt").read_text(encoding="utf-8").splitlines()[:20]

    written, write_shard = [], data.build.write_shard

    def full_disk(path, tokens):  # the disk fills up at the third shard of the new build
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path)
        write_shard(path, tokens)
    monkeypatch.setattr(data.build, "write_shard", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_dataset(docs, "t", tmp_path / "out", val_docs=2, tokenizer=None, vocab_size=384, shard_tokens=20_000)
    assert _snapshot(tmp_path / "out") == before


def test_a_rebuild_replaces_the_whole_dataset(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built / "out", out)
    _write_corpus(tmp_path / "other.txt", 40, 50)
    res = subprocess.run(PREP + ["--text", str(tmp_path / "other.txt"), *TINY[:-1], "1000000", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ds = out / "datasets" / "t"
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                   "manifest.json"]  # the old build's extra shards are gone
    assert sorted(p.name for p in out.rglob(".*")) == []  # no temp file or folder left behind
    assert check_tokenizer(str(ds), str(out / "tokenizers" / "t.model"))[1] == "verified"


def test_a_trained_tokenizer_is_byte_identical_across_builds(built, tmp_path):
    """Same corpus, same .model bytes, same sha256: the manifest check can compare rebuilt datasets."""
    for sub in ("a", "b"):
        subprocess.run(PREP + ["--text", str(built / "corpus.txt"), *TINY, "--out", str(tmp_path / sub)],
                       check=True, capture_output=True, timeout=120)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    assert _snapshot(tmp_path / "a") == _snapshot(built / "out")
