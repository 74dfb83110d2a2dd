"""A dataset records its tokenizer's sha256; scoring with another tokenizer of the same vocab size is refused."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.build import build_dataset
from shared.manifest import MANIFEST_NAME, check_tokenizer, file_sha256, read_manifest, write_manifest
from shared.tokenizer import load_tokenizer
from tests.conftest import ROOT

VOCAB = 384  # the smallest byte-fallback BPE: 256 byte pieces + 4 specials + merges
PREPARE = [sys.executable, str(ROOT / "data" / "prepare.py")]


def topic_docs(lo: int, hi: int) -> list[str]:
    """pydoc's help topics: real prose that ships with Python and loads in milliseconds."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)[lo:hi]]


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict:
    """Datasets a and b: same vocab size, tokenizers trained on different text (other merges)."""
    out = tmp_path_factory.mktemp("twins")
    for name, (lo, hi) in (("a", (0, 30)), ("b", (30, 60))):
        build_dataset(topic_docs(lo, hi), name, out, val_docs=3, tokenizer=None, vocab_size=VOCAB,
                      shard_tokens=50_000)
    return {n: {"data": str(out / "datasets" / n), "tok": str(out / "tokenizers" / f"{n}.model")} for n in "ab"}


def test_same_vocab_size_other_merges_is_refused(twins):
    a, b = twins["a"], twins["b"]
    sa, sb = (load_tokenizer(t["tok"]) for t in (a, b))
    assert sa.vocab_size() == sb.vocab_size() == VOCAB  # what VOCAB_SIZE checks: passes
    assert [sa.id_to_piece(i) for i in range(VOCAB)] != [sb.id_to_piece(i) for i in range(VOCAB)]
    assert check_tokenizer(a["data"], a["tok"]) == (file_sha256(a["tok"]), "verified")
    with pytest.raises(ValueError) as err:
        check_tokenizer(a["data"], b["tok"])
    msg = str(err.value)
    assert f"TOKENIZER_PATH={b['tok']} (sha256 {file_sha256(b['tok'])[:8]}…) is not the tokenizer" in msg
    assert f"DATA_PATH={a['data']} was built with" in msg and file_sha256(a["tok"])[:8] in msg
    assert msg.endswith("set TOKENIZER_CHECK=0 to score anyway")
    sha, status = check_tokenizer(a["data"], b["tok"], enforce=False)
    assert sha == file_sha256(b["tok"]) and status.startswith("unverified: TOKENIZER_PATH=")


def test_the_manifest_describes_the_dataset(twins):
    m = read_manifest(twins["a"]["data"])
    assert m["format"] == "parameter-golf-dataset-v1" and m["tokenizer"] == "a.model" and m["bos_id"] == 1
    assert m["tokenizer_sha256"] == file_sha256(twins["a"]["tok"]) and m["vocab_size"] == VOCAB
    assert m["splits"]["val"]["shards"] == 1 and m["splits"]["train"]["shards"] >= 1
    assert m["documents"] == {"val": 3, "train": 27}


def test_no_manifest_or_a_broken_one_is_refused_unless_told(twins, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(twins["a"]["data"], data)
    (data / MANIFEST_NAME).unlink()
    assert read_manifest(data) is None
    with pytest.raises(ValueError, match=rf"DATA_PATH={data} has no manifest.json.*"
                                         rf"python data/prepare.py --adopt {data} --tokenizer FILE.*TOKENIZER_CHECK=0"):
        check_tokenizer(str(data), twins["a"]["tok"])
    assert check_tokenizer(str(data), twins["a"]["tok"], enforce=False)[1].startswith("unverified: DATA_PATH=")
    (data / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=f"{data / MANIFEST_NAME}: unreadable"):
        read_manifest(data)
    with pytest.raises(ValueError, match="unreadable.*TOKENIZER_CHECK=0"):
        check_tokenizer(str(data), twins["a"]["tok"])
    (data / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a parameter-golf-dataset-v1 manifest"):
        read_manifest(data)
    assert check_tokenizer(str(data), twins["a"]["tok"], enforce=False)[1].startswith("unverified:")


def test_write_manifest_needs_a_vocab_size_and_a_val_split(twins, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        write_manifest(twins["a"]["data"], twins["a"]["tok"])
    with pytest.raises(FileNotFoundError, match="no fineweb_val_"):
        write_manifest(tmp_path, twins["a"]["tok"], vocab_size=VOCAB)


def _adopt(data, tok):
    return subprocess.run(PREPARE + ["--adopt", str(data), "--tokenizer", str(tok)], capture_output=True, text=True,
                          timeout=120)


def test_adopt_records_a_dataset_built_elsewhere(twins, tmp_path):
    data = tmp_path / "elsewhere"
    shutil.copytree(twins["a"]["data"], data)
    (data / MANIFEST_NAME).unlink()
    res = _adopt(data, twins["a"]["tok"])
    assert res.returncode == 0, res.stderr
    assert check_tokenizer(str(data), twins["a"]["tok"])[1] == "verified"
    before = (data / MANIFEST_NAME).read_bytes()
    res = _adopt(data, twins["b"]["tok"])  # a second adopt may not overwrite the record with another tokenizer
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: --adopt {data}: its manifest.json already records another tokenizer")
    assert (data / MANIFEST_NAME).read_bytes() == before


def test_adopt_checks_shards_before_writing(twins, tmp_path):
    data = tmp_path / "bad"
    shutil.copytree(twins["a"]["data"], data)
    (data / MANIFEST_NAME).unlink()
    shard = sorted(data.glob("fineweb_train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated copy
    res = _adopt(data, twins["a"]["tok"])
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: {shard}: header says") and not (data / MANIFEST_NAME).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _adopt(empty, twins["a"]["tok"])
    assert res.returncode == 1 and "no fineweb_val_*.bin shards" in res.stderr


def test_download_writes_the_manifest_of_what_it_fetched(twins, tmp_path, monkeypatch):
    from data import download
    remote = tmp_path / "remote"
    ds = remote / "datasets" / "datasets" / "fineweb10B_sp384"
    ds.mkdir(parents=True)
    for f in sorted(Path(twins["b"]["data"]).glob("*.bin")):
        shutil.copy(f, ds / f.name)
    (remote / "datasets" / "tokenizers").mkdir()
    shutil.copy(twins["b"]["tok"], remote / "datasets" / "tokenizers" / "sp384.model")
    (remote / "datasets" / "manifest.json").write_text(json.dumps({
        "datasets": [{"name": "fineweb10B_sp384", "tokenizer_name": "t", "stats": {"files_train": 1, "files_val": 1}}],
        "tokenizers": [{"name": "t", "model_path": "tokenizers/sp384.model"}]}))

    class Hub:  # hf_hub_download's contract: a local path to the requested file
        @staticmethod
        def hf_hub_download(repo_id, filename, subfolder, repo_type):
            return str(remote / (subfolder or "") / filename)
    monkeypatch.setattr(download, "_hub", lambda: Hub)
    assert download.fetch_variant("sp384", 1, tmp_path / "out") == 0
    data = tmp_path / "out" / "datasets" / "fineweb10B_sp384"
    m = read_manifest(data)
    assert m["tokenizer"] == "sp384.model" and m["vocab_size"] == VOCAB and m["splits"]["train"]["shards"] == 1
    assert check_tokenizer(str(data), str(tmp_path / "out" / "tokenizers" / "sp384.model"))[1] == "verified"
    with pytest.raises(ValueError, match="is not the tokenizer"):
        check_tokenizer(str(data), twins["a"]["tok"])


# python -m parity_tests: the same check, and one-line errors for bad input. In-process main()
# (what `python -m parity_tests` runs) except where noted: each new process pays ~4 s of torch+MLX imports.
def _parity_main(capsys, *args) -> tuple[int, str, str]:
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from parity_tests.__main__ import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse exits
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flag,value,says", [("--windows", "-3", "argument --windows: must be >= 0, got -3"),
                                             ("--logit-windows", "0", "argument --logit-windows: must be >= 1, got 0"),
                                             ("--windows", "x", "argument --windows: 'x' is not an integer")])
def test_parity_rejects_bad_counts_in_one_line(tmp_path, capsys, flag, value, says):
    rc, _, err = _parity_main(capsys, tmp_path / "a.zst", flag, value)
    assert rc == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1, err


def test_parity_names_an_unreadable_artifact(tmp_path, capsys):
    art = tmp_path / "a.zst"
    art.write_bytes(b"\xff\xfe not utf-8, not zstd")
    rc, _, err = _parity_main(capsys, art)
    assert rc == 2 and err.startswith(f"error: artifact {art}") and err.count("\n") == 1, err


def test_parity_refuses_a_swapped_tokenizer(twins, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from parity_tests import compare as C
    from shared.artifact import save_artifact
    from shared.config import Hyperparameters
    cfg = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": str(VOCAB), "TRAIN_SEQ_LEN": "32",
                                    "DATA_PATH": twins["a"]["data"], "TOKENIZER_PATH": twins["b"]["tok"]})
    art = tmp_path / "a.int8.zst"
    save_artifact(art, C.random_state(cfg), cfg)
    windows = ["--windows", "2", "--logit-windows", "1"]
    res = subprocess.run([sys.executable, "-m", "parity_tests", str(art), *windows], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # the real command line, once
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: TOKENIZER_PATH={twins['b']['tok']} (sha256 ")
    assert "pass --no-tokenizer-check" in res.stderr and res.stderr.count("\n") == 1
    rc, out, err = _parity_main(capsys, art, *windows, "--no-tokenizer-check")
    assert rc == 0 and "check:unverified: TOKENIZER_PATH=" in out and "verdict:PASS" in out, out + err
    rc, out, err = _parity_main(capsys, art, *windows, "--tokenizer-path", twins["a"]["tok"])
    assert rc == 0 and "check:verified" in out, out + err
