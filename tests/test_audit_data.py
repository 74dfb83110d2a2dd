"""tools/audit_data.py: each check passes on correct data and fails, naming the cause, on data built to break it."""
import io
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data.build import build_dataset
from shared import bpb
from shared.caseops import OPERATOR_IDS
from shared.data import list_shards, load_shard, sidecar_path, train_pattern, val_pattern, write_shard
from shared.manifest import BOS_ID
from shared.tokenizer import ByteTables, build_byte_tables
from tools.audit_data import check_accounting, check_no_val_in_train

WORDS = ("the model reads every token of a document and predicts the next one while the evaluator counts "
         "bytes of text under a cap of sixteen million with weights quantized Title CASE words").split()


def documents(n: int, seed: int = 0) -> list[str]:
    """Seeded word salad with capitals (CaseOps) and characters a 384-token vocabulary spells in byte fallback."""
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) + "." for _ in range(n)]
    for i in range(0, n, 3):
        docs[i] += f" naïve café {chr(0x1F600 + i)}"  # an emoji of its own: never seen by the tokenizer
    return docs


def dummy_prefix_tokenizer(docs: list[str], path) -> None:
    """A BPE that writes a "▁" before each document's first word (add_dummy_prefix, the SentencePiece default;
    the official recipe turns it off): the tokenizer on which a space counted after BOS shows."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model, vocab_size=384,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=True, pad_id=0, bos_id=1,
                                   eos_id=2, unk_id=3, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A plain and a CaseOps dataset of the same 60 documents (12 validation), 384-token BPEs trained on them;
    and the plain one again with a dummy-prefix tokenizer."""
    out = tmp_path_factory.mktemp("auditdata")
    docs = documents(60)
    build_dataset(docs, "plain", out, val_docs=12, tokenizer=None, vocab_size=384, shard_tokens=700)
    build_dataset(docs, "cops", out, val_docs=12, tokenizer=None, vocab_size=384, shard_tokens=700,
                  caseops_transform=True)
    dummy_prefix_tokenizer(docs[12:], out / "prefix.model")
    build_dataset(docs, "prefix", out, val_docs=12, tokenizer=out / "prefix.model", vocab_size=384,
                  shard_tokens=10**6)
    ds = lambda n: (str(out / "datasets" / n), str(out / "tokenizers" / f"{n}.model"))  # noqa: E731
    return {"plain": ds("plain"), "cops": ds("cops"), "prefix": ds("prefix"), "docs": docs}


def test_correct_accounting_passes(data):
    for f in (check_accounting(*data["plain"]) + check_accounting(*data["prefix"])
              + check_accounting(*data["cops"], plain_tokenizer=data["plain"][1])):
        assert f.status == "PASS", f.line()
    assert check_accounting(*data["plain"], max_docs=5)[0].figure.startswith("5 documents")


# ---- the three historical bugs, as a byte table the evaluator could have built ----
def _boundary_forgotten(sp, vocab_size=None):
    """BOS not a boundary: the space the normalizer stripped from each document's first piece is counted."""
    t = build_byte_tables(sp, vocab_size)
    return ByteTables(t.base_bytes, t.has_leading_space, np.zeros_like(t.is_boundary))


def _space_twice(sp, vocab_size=None):
    """The space byte kept in the piece's length and added again by the leading-space flag."""
    t = build_byte_tables(sp, vocab_size)
    return ByteTables(t.base_bytes + t.has_leading_space, t.has_leading_space, t.is_boundary)


def _byte_piece_length(sp, vocab_size=None):
    """<0xNN> counted as the UTF-8 length of its piece (6) instead of the 1 byte it stands for."""
    t = build_byte_tables(sp, vocab_size)
    base = t.base_bytes.copy()
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            base[i] = len(sp.id_to_piece(i).encode("utf-8"))
    return ByteTables(base, t.has_leading_space, t.is_boundary)


def _specials_as_text(sp, vocab_size=None):
    """Control and unknown pieces counted as their text ("<s>": 3 bytes) instead of 0."""
    t = build_byte_tables(sp, vocab_size)
    base = t.base_bytes.copy()
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            base[i] = len(sp.id_to_piece(i).encode("utf-8"))
    return ByteTables(base, t.has_leading_space, t.is_boundary)


@pytest.mark.parametrize("bug,named", [
    (_boundary_forgotten, "bug (a) leading-space double count at document starts: +1 x 12 documents"),
    (_space_twice, "bug (a) leading-space double count: +1 x"),
    (_byte_piece_length, "bug (b) byte-fallback tokens counted as 6 bytes, not 1: +5 x"),
    (_specials_as_text, "bug (c) special tokens counted as bytes: <s> (id 1) as 3 bytes x 11"),
], ids=["space_at_document_start", "space_twice", "byte_as_piece", "bos_as_text"])
def test_each_table_bug_fails_and_is_named(data, monkeypatch, bug, named):
    monkeypatch.setattr(bpb, "build_byte_tables", bug)
    f = check_accounting(*data["prefix" if bug is _boundary_forgotten else "plain"])[0]
    assert f.status == "FAIL" and named in f.figure, f.figure
    assert f.figure.count("bug (") == 1, f.figure  # one signature fits, not every one


def test_caseops_operators_counted_in_the_sidecar_fail_and_are_named(data, tmp_path):
    """The CaseOps sidecar giving each case operator the 3 UTF-8 bytes of its private-use character."""
    ds = tmp_path / "cops"
    shutil.copytree(data["cops"][0], ds)
    for i, path in enumerate(list_shards(val_pattern(str(ds)))):
        side_path = sidecar_path(ds, i)
        ops = np.isin(load_shard(path), OPERATOR_IDS)
        write_shard(side_path, load_shard(side_path).astype(np.int64) + 3 * ops)
    f = check_accounting(str(ds), data["cops"][1], plain_tokenizer=data["plain"][1])[0]
    assert f.status == "FAIL" and "bug (c) special tokens counted as bytes" in f.figure, f.figure
    assert "as 3 bytes" in f.figure


def test_an_unknown_miscount_fails_without_a_name(data, monkeypatch):
    def off_by_one(sp, vocab_size=None):
        t = build_byte_tables(sp, vocab_size)
        base = t.base_bytes.copy()
        base[sp.piece_to_id("▁the")] += 1  # one word's length wrong: no historical bug
        return ByteTables(base, t.has_leading_space, t.is_boundary)
    monkeypatch.setattr(bpb, "build_byte_tables", off_by_one)
    f = check_accounting(*data["plain"])[0]
    assert f.status == "FAIL" and "no known bug signature" in f.figure and "bug (" not in f.figure


# ---- a validation document in the training shards ----
def _copy_with_train(data, tmp_path, train: np.ndarray, shard_tokens: int) -> str:
    ds = tmp_path / "ds"
    shutil.copytree(data["plain"][0], ds)
    for f in list_shards(train_pattern(str(ds))):
        (ds / f).unlink()
    for i, a in enumerate(range(0, train.size, shard_tokens)):
        write_shard(ds / f"fineweb_train_{i:06d}.bin", train[a:a + shard_tokens])
    return str(ds)


def _splits(data):
    val = load_shard(data["plain"][0] + "/fineweb_val_000000.bin")
    train = np.concatenate([load_shard(f) for f in list_shards(train_pattern(data["plain"][0]))])
    bos = np.flatnonzero(val == BOS_ID)
    return val[bos[3]:bos[4]], train  # validation document 3 with its BOS


def test_clean_splits_pass(data):
    f = check_no_val_in_train(data["plain"][0])[0]
    assert f.status == "PASS" and "0 of 48 training documents" in f.figure, f.figure


def test_a_validation_document_in_a_training_shard_fails(data, tmp_path):
    doc, train = _splits(data)
    cut = int(np.flatnonzero(train == BOS_ID)[10])
    mixed = np.concatenate([train[:cut], doc, train[cut:]])
    ds = _copy_with_train(data, tmp_path, mixed, shard_tokens=mixed.size)
    f = check_no_val_in_train(ds)[0]
    assert f.status == "FAIL", f.figure
    assert "1 of 49 training documents" in f.figure and f"fineweb_train_000000.bin token {cut} = validation " \
        "document 3" in f.figure, f.figure


def test_a_validation_document_cut_by_a_shard_boundary_is_found(data, tmp_path):
    doc, train = _splits(data)
    mixed = np.concatenate([train, doc, [BOS_ID], train[1:200]])
    shard = train.size + doc.size // 2  # the shard boundary falls inside the validation document
    ds = _copy_with_train(data, tmp_path, mixed, shard_tokens=shard)
    f = check_no_val_in_train(ds)[0]
    assert f.status == "FAIL" and f"fineweb_train_000000.bin token {train.size} = validation document 3" \
        in f.figure, f.figure
