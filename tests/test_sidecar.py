"""The CaseOps byte sidecar: hand-worked counts, a CaseOps build from real text, and how the evaluator reads it."""
import json
import subprocess
import sys

import numpy as np
import pytest

from data.build import build_dataset
from shared import bpb, caseops
from shared.config import Hyperparameters
from shared.data import (list_shards, load_shard, load_validation_sidecar, load_validation_tokens, sidecar_path,
                         val_pattern, write_shard)
from shared.manifest import read_manifest
from shared.tokenizer import load_tokenizer
from tests.conftest import ROOT

CASEOPS_MODEL = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

# text -> [(piece, bytes of the original text it stands for)] with BOS first; the pieces are what the record's
# tokenizer gives (a fact of that file), the counts worked out by hand from RECORD_STACK.md §1.3.
HAND = {
    "Paris is big": [("<s>", 0), ("\ue001", 0), ("paris", 5), ("▁is", 3), ("▁big", 4)],  # title case
    "NASA said": [("<s>", 0), ("\ue002", 0), ("nas", 3), ("a", 1), ("▁said", 5)],  # all caps
    "McDonald iPhone": [("<s>", 0), ("\ue001", 0), ("mc", 2), ("\ue003", 0), ("donald", 6), ("▁i", 2),
                        ("\ue003", 0), ("phone", 5)],  # mixed case
    # ö and ß are 2 bytes each, 日 and 本 3: byte-fallback pieces, the whole character on its last byte piece
    "Größe 日本": [("<s>", 0), ("\ue001", 0), ("gr", 2), ("<0xC3>", 0), ("<0xB6>", 2), ("<0xC3>", 0), ("<0x9F>", 2),
                 ("e", 1), ("▁", 1), ("<0xE6>", 0), ("<0x97>", 0), ("<0xA5>", 3), ("<0xE6>", 0), ("<0x9C>", 0),
                 ("<0xAC>", 3)],
    "x \ue001 y": [("<s>", 0), ("x", 1), ("▁", 1), ("\ue004", 0), ("\ue001", 3), ("▁y", 2)],  # escaped operator
}


@pytest.fixture
def caseops_sp(reference_data):
    return load_tokenizer(str(reference_data / "tokenizers" / CASEOPS_MODEL))


@pytest.mark.parametrize("text", HAND)
def test_hand_worked_sidecar_counts(caseops_sp, text):
    ids = [1] + caseops_sp.encode(caseops.encode(text))
    counts = caseops.token_byte_counts(ids, caseops.PieceBytes(caseops_sp))
    assert [(caseops_sp.id_to_piece(i), int(n)) for i, n in zip(ids, counts)] == HAND[text]
    assert int(counts.sum()) == len(text.encode("utf-8"))


def _sample_docs(reference_data, n):
    text = (reference_data / "text" / "fineweb_edu_sample_1MB.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][:n]


@pytest.fixture(scope="module")
def caseops_build(tmp_path_factory):
    """--text of 300 sample lines, --caseops with the record's tokenizer, 60 val docs, small shards."""
    from tests.conftest import REFERENCE_DATA
    if not (REFERENCE_DATA / "tokenizers" / CASEOPS_MODEL).is_file():
        pytest.skip("../shared/data reference files are absent")
    out = tmp_path_factory.mktemp("caseops")
    text = (REFERENCE_DATA / "text" / "fineweb_edu_sample_1MB.txt").read_text(encoding="utf-8")
    docs = [line for line in text.splitlines() if line.strip()][:300]
    (out / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    res = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--text", str(out / "docs.txt"),
                          "--caseops", "--tokenizer", str(REFERENCE_DATA / "tokenizers" / CASEOPS_MODEL),
                          "--name", "edu_caseops", "--val-docs", "60", "--shard-tokens", "4000", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    return {"dir": out / "datasets" / "edu_caseops", "tok": out / "tokenizers" / "edu_caseops.model",
            "docs": docs, "summary": summary}


def _cfg(data_dir, tok, vocab=8192):
    return Hyperparameters.from_env({"DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(tok),
                                     "VOCAB_SIZE": str(vocab), "TRAIN_SEQ_LEN": "64"})


def test_caseops_build_sidecar_equals_plain_sp8192_bytes(caseops_build, reference_data):
    """Per validation document: sidecar sum == the plain SP8192 tokenizer's decoded bytes of the same document."""
    ds = caseops_build["dir"]
    tokens, sidecar = load_validation_tokens(str(ds), 8192), load_validation_sidecar(str(ds))
    assert len(list_shards(val_pattern(str(ds)))) > 1  # several shards: the sidecar is cut at the same places
    for i, path in enumerate(list_shards(val_pattern(str(ds)))):
        assert load_shard(sidecar_path(ds, i)).size == load_shard(path).size
    plain = load_tokenizer(str(reference_data / "tokenizers" / "fineweb_8192_bpe.model"))
    starts = np.flatnonzero(tokens == 1)
    per_doc = np.add.reduceat(sidecar.astype(np.int64), starts)
    want = [len(plain.decode(plain.encode(d)).encode("utf-8")) for d in caseops_build["docs"][:60]]
    assert per_doc.tolist() == want
    assert caseops_build["summary"]["val"]["scored_bytes"] == sum(want)
    assert read_manifest(ds)["transform"] == caseops.TRANSFORM
    assert read_manifest(ds)["splits"]["val_bytes"]["tokens"] == tokens.size


def test_evaluator_reads_the_sidecar_and_says_so(caseops_build):
    cfg = _cfg(caseops_build["dir"], caseops_build["tok"])
    data = bpb.load_eval_data(cfg)
    assert data.byte_source == "sidecar"
    assert np.array_equal(data.target_bytes, load_validation_sidecar(str(caseops_build["dir"]))[1:])
    val = list_shards(val_pattern(str(caseops_build["dir"])))
    assert val and not [f for f in val if "_bytes_" in f]  # the sidecar beside them is not listed as tokens
    assert data.tokens.size == sum(load_shard(f).size for f in val)


def test_adopt_records_the_transform_and_checks_the_sidecar(caseops_build, tmp_path):
    import shutil
    from data import prepare
    ds = tmp_path / "ds"
    shutil.copytree(caseops_build["dir"], ds)
    (ds / "manifest.json").unlink()
    assert prepare.main(["--adopt", str(ds), "--tokenizer", str(caseops_build["tok"])]) == 0
    assert read_manifest(ds)["transform"] == caseops.TRANSFORM
    (ds / "manifest.json").unlink()
    side = ds / "fineweb_val_bytes_000001.bin"
    write_shard(side, load_shard(side)[:-1])
    with pytest.raises(ValueError, match="fineweb_val_bytes_000001.bin: the byte sidecar counts"):
        prepare.adopt(ds, caseops_build["tok"])
    for f in ds.glob("fineweb_val_bytes_*.bin"):
        f.unlink()
    with pytest.raises(ValueError, match="no byte sidecar"):
        prepare.adopt(ds, caseops_build["tok"])


def test_a_sidecar_of_another_length_is_refused(caseops_build, tmp_path):
    import shutil
    ds = tmp_path / "ds"
    shutil.copytree(caseops_build["dir"], ds)
    last = sorted(ds.glob("fineweb_val_bytes_*.bin"))[-1]
    write_shard(last, load_shard(last)[:-1])
    with pytest.raises(bpb.SidecarMismatch, match="counts .* tokens but the validation shards hold"):
        bpb.load_eval_data(_cfg(ds, caseops_build["tok"]))


def test_tokenizer_and_dataset_transforms_must_agree(caseops_build, reference_data, tiny_data):
    plain8192 = reference_data / "tokenizers" / "fineweb_8192_bpe.model"
    with pytest.raises(ValueError, match="holds caseops_v1 .* not a CaseOps tokenizer"):
        bpb.load_eval_data(_cfg(caseops_build["dir"], plain8192))
    with pytest.raises(ValueError, match="is a CaseOps tokenizer but DATA_PATH=.* is not a CaseOps dataset"):
        bpb.load_eval_data(_cfg(tiny_data["DATA_PATH"], caseops_build["tok"]))


def test_plain_datasets_still_count_with_the_tables(tiny_data):
    data = bpb.load_eval_data(_cfg(tiny_data["DATA_PATH"], tiny_data["TOKENIZER_PATH"], 384))
    assert data.byte_source == "tables"


def test_a_trained_caseops_tokenizer_reserves_the_operators(tmp_path):
    from pydoc_data.topics import topics  # real prose that ships with Python, loaded in milliseconds
    docs = [topics[k] for k in sorted(topics)[:30]]
    summary = build_dataset(docs, "c", tmp_path, val_docs=4, tokenizer=None, vocab_size=384,
                            shard_tokens=50_000, caseops_transform=True)
    sp = load_tokenizer(str(tmp_path / "tokenizers" / "c.model"))
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *caseops.OPERATORS]
    assert all(sp.is_byte(i) for i in range(8, 264))
    assert caseops.is_caseops_tokenizer(sp)
    assert summary["val"]["text_bytes"] == sum(len(d.encode("utf-8")) for d in docs[:4])
    side = load_validation_sidecar(str(tmp_path / "datasets" / "c"))
    assert int(side.sum()) == summary["val"]["scored_bytes"]


def test_prepare_refuses_mixed_transforms(reference_data, tmp_path):
    (tmp_path / "a.txt").write_text("Hello World\nSecond Line\nThird one\n", encoding="utf-8")
    base = [sys.executable, str(ROOT / "data" / "prepare.py"), "--text", str(tmp_path / "a.txt"), "--name", "x",
            "--out", str(tmp_path / "out")]
    res = subprocess.run(base + ["--caseops", "--tokenizer", str(reference_data / "tokenizers" /
                                                                "fineweb_8192_bpe.model")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and "not a CaseOps tokenizer" in res.stderr and res.stderr.count("\n") == 1
    res = subprocess.run(base + ["--tokenizer", str(reference_data / "tokenizers" / CASEOPS_MODEL)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "build with --caseops" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_trainer_scores_a_caseops_dataset_by_its_sidecar(tmp_path):
    """torch trainer on CPU, 4 steps: the log says bytes:sidecar and val_bpb's bytes are the sidecar's."""
    import math

    from pydoc_data.topics import topics
    from shared.runlog import parse_final
    from conftest import run_script, tiny_env
    build_dataset([topics[k] for k in sorted(topics)[:60]], "c", tmp_path, val_docs=6, tokenizer=None,
                  vocab_size=384, shard_tokens=60_000, caseops_transform=True)
    data = {"DATA_PATH": str(tmp_path / "datasets" / "c"), "TOKENIZER_PATH": str(tmp_path / "tokenizers" / "c.model")}
    env = tiny_env(data, tmp_path, ITERATIONS=4, WARMUP_STEPS=0)
    out = run_script([str(ROOT / "cuda_train.py")], env, tmp_path).stdout
    assert "verified bytes:sidecar" in out
    final = parse_final(out)
    n = load_validation_tokens(data["DATA_PATH"], 384).size
    scored = (n - 1) // 32 * 32  # TRAIN_SEQ_LEN=32, stride 0: whole windows from the start
    nbytes = int(load_validation_sidecar(data["DATA_PATH"])[1:scored + 1].sum())
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / math.log(2) * scored / nbytes, rel=1e-5)
