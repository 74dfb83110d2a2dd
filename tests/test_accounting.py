"""tools/accounting.py: the proof passes on correct data, and each historical byte-counting bug makes it FAIL."""
import shutil

import numpy as np
import pytest

from data.build import build_dataset
from shared import bpb, caseops
from shared.data import load_shard, write_shard
from shared.tokenizer import SPACE_MARK, ByteTables, build_byte_tables, load_tokenizer
from tools.accounting import account, main, report

CASEOPS_MODEL = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The first 400 lines of the FineWeb-Edu sample as sp1024 and CaseOps SP8192 datasets (100 val documents)."""
    from tests.conftest import REFERENCE_DATA as ref
    if not (ref / "tokenizers" / CASEOPS_MODEL).is_file():
        pytest.skip("../shared/data reference files are absent")
    out = tmp_path_factory.mktemp("acct")
    lines = (ref / "text" / "fineweb_edu_sample_1MB.txt").read_text(encoding="utf-8").splitlines()
    docs = [line for line in lines if line.strip()][:400]
    build_dataset(docs, "sp1024", out, val_docs=100, tokenizer=ref / "tokenizers" / "fineweb_1024_bpe.model",
                  vocab_size=1024, shard_tokens=10**8)
    build_dataset(docs, "cops", out, val_docs=100, tokenizer=ref / "tokenizers" / CASEOPS_MODEL, vocab_size=8192,
                  shard_tokens=10**8, caseops_transform=True)
    d = lambda n: str(out / "datasets" / n)  # noqa: E731
    t = lambda n: str(out / "tokenizers" / f"{n}.model")  # noqa: E731
    return {"plain": (d("sp1024"), t("sp1024")), "caseops": (d("cops"), t("cops")), "docs": docs, "out": out,
            "plain8192": str(ref / "tokenizers" / "fineweb_8192_bpe.model")}


def test_the_proof_passes_on_correct_accounting(sample):
    plain = account(*sample["plain"], texts=sample["docs"])
    assert plain.ok and plain.byte_source == "tables" and plain.documents == 100
    assert plain.evaluator_bytes == sum(len(d.encode("utf-8")) for d in sample["docs"][:100]) - sum(
        plain.normalization.values())
    cops = account(*sample["caseops"], plain_tokenizer=sample["plain8192"])  # texts decoded from the tokens
    assert cops.ok and cops.byte_source == "sidecar" and cops.transform == caseops.TRANSFORM
    assert cops.evaluator_bytes == plain.evaluator_bytes  # CaseOps and plain scores share one denominator
    assert "verdict:PASS" in report(cops)


def test_a_text_source_that_is_not_the_dataset_is_refused(sample):
    with pytest.raises(ValueError, match="document 0 does not tokenize to validation document 0"):
        account(*sample["plain"], texts=sample["docs"][1:])


# ---- the three historical bugs, injected into the byte tables the evaluator builds ----
def _space_twice(sp, vocab_size=None):
    t = build_byte_tables(sp, vocab_size)
    return ByteTables(t.base_bytes + t.has_leading_space, t.has_leading_space, t.is_boundary)  # in base AND flag


def _bytes_as_fffd(sp, vocab_size=None):
    t = build_byte_tables(sp, vocab_size)
    base = t.base_bytes.copy()
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            base[i] = len(sp.decode([i]).encode("utf-8"))  # a lone byte piece decodes to U+FFFD: 3 bytes
    return ByteTables(base, t.has_leading_space, t.is_boundary)


def _space_via_standalone_piece(sp, vocab_size=None):
    """Finds the space marker through the standalone "▁" piece: without one, piece_to_id answers <unk>."""
    marker = sp.id_to_piece(sp.piece_to_id(SPACE_MARK))
    t = build_byte_tables(sp, vocab_size)
    space = np.array([sp.id_to_piece(i).startswith(marker) for i in range(sp.vocab_size())]
                     + [False] * (t.base_bytes.size - sp.vocab_size()))
    base = t.base_bytes + (t.has_leading_space & ~space) * len(SPACE_MARK.encode("utf-8"))
    return ByteTables(base, space, t.is_boundary)


class NoStandaloneSpace:
    """The same tokenizer seen through a vocabulary without a standalone "▁" piece (as SentencePiece answers)."""

    def __init__(self, sp):
        self._sp = sp

    def piece_to_id(self, piece):
        return self._sp.unk_id() if piece == SPACE_MARK else self._sp.piece_to_id(piece)

    def __getattr__(self, name):
        return getattr(self._sp, name)


@pytest.mark.parametrize("bug", [_space_twice, _bytes_as_fffd])
def test_each_injected_table_bug_fails_the_proof(sample, monkeypatch, bug, capsys):
    tokens = load_shard(sample["plain"][0] + "/fineweb_val_000000.bin")
    sp = load_tokenizer(sample["plain"][1])
    assert any(sp.is_byte(int(i)) for i in np.unique(tokens))  # the sample exercises byte fallback
    monkeypatch.setattr(bpb, "build_byte_tables", bug)
    result = account(*sample["plain"])
    assert not result.ok and result.first_mismatch["evaluator"] > result.first_mismatch["reference"]
    assert main(["--data-path", sample["plain"][0], "--tokenizer-path", sample["plain"][1]]) == 1
    assert "verdict:FAIL" in capsys.readouterr().out


def test_a_vocabulary_without_a_standalone_space_piece(sample, monkeypatch):
    monkeypatch.setattr(bpb, "build_byte_tables", lambda sp, v=None: build_byte_tables(NoStandaloneSpace(sp), v))
    assert account(*sample["plain"]).ok  # our tables do not need the piece
    buggy = lambda sp, v=None: _space_via_standalone_piece(NoStandaloneSpace(sp), v)  # noqa: E731
    monkeypatch.setattr(bpb, "build_byte_tables", buggy)
    assert not account(*sample["plain"]).ok
    monkeypatch.setattr(bpb, "build_byte_tables", _space_via_standalone_piece)
    assert account(*sample["plain"]).ok  # the bug hides on a vocabulary that has the piece


# ---- the same bugs in a CaseOps sidecar ----
def _rewrite_sidecar(sample, tmp_path, per_piece):
    ds = tmp_path / "cops"
    shutil.copytree(sample["caseops"][0], ds)
    sp = load_tokenizer(sample["caseops"][1])
    tokens = load_shard(ds / "fineweb_val_000000.bin")
    side = load_shard(ds / "fineweb_val_bytes_000000.bin").astype(np.int64)
    pieces = [sp.id_to_piece(int(i)) for i in tokens]
    bad = np.array([per_piece(sp, int(i), p, n) for i, p, n in zip(tokens, pieces, side)])
    assert (bad != side).any()
    write_shard(ds / "fineweb_val_bytes_000000.bin", bad)
    return str(ds)


@pytest.mark.parametrize("per_piece", [
    lambda sp, i, p, n: n + 2 * p.startswith(SPACE_MARK),  # "▁" counted as its 3 UTF-8 bytes
    lambda sp, i, p, n: 3 if sp.is_byte(i) else n,  # every byte-fallback piece as U+FFFD
], ids=["space_as_3_bytes", "bytes_as_fffd"])
def test_each_injected_sidecar_bug_fails_the_proof(sample, tmp_path, per_piece):
    ds = _rewrite_sidecar(sample, tmp_path, per_piece)
    result = account(ds, sample["caseops"][1], plain_tokenizer=sample["plain8192"])
    assert not result.ok and result.first_mismatch is not None


def test_normalization_is_measured_by_cause(reference_data, tmp_path):
    docs = [" lead", "a  b", "\ufb01ne", "plain", "x\u3000y", "tail\t"] + ["filler line"] * 10
    build_dataset(docs, "n", tmp_path, val_docs=6, tokenizer=reference_data / "tokenizers" /
                  "fineweb_1024_bpe.model", vocab_size=1024, shard_tokens=10**8)
    r = account(str(tmp_path / "datasets" / "n"), str(tmp_path / "tokenizers" / "n.model"), texts=docs)
    assert r.ok
    # " lead" 1 edge byte; "a  b" 1 interior; "ﬁ" 3 -> "fi" 2; U+3000 (3 bytes) -> " " by NFKC; "tail\t" 1 edge
    assert r.normalization == {"nfkc": 3, "edges": 2, "interior": 1, "other": 0}
    assert r.raw_bytes - r.reference_bytes == 6 and r.normalized_documents == 5
