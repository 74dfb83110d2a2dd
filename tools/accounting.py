"""Accounting proof: the bytes the evaluator counts, recomputed document by document from the documents' text.

    python -m tools.accounting --data-path data/datasets/fineweb10B_sp1024 \\
        --tokenizer-path data/tokenizers/fineweb_1024_bpe.model
    python -m tools.accounting --data-path data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved \\
        --tokenizer-path data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \\
        --plain-tokenizer data/tokenizers/fineweb_8192_bpe.model [--text-source docs.txt --split line]

The evaluator's count of a document is the sum of bpb.split_target_bytes over the targets inside it (its tokens
after BOS, and the next document's BOS, which must count 0); split_target_bytes reads the byte sidecar when the
dataset has one and the byte tables otherwise. The reference, computed without either:
- plain SentencePiece dataset: the UTF-8 length of the decoded document, sp.decode(ids);
- CaseOps dataset: the bytes the plain SP8192 accounting gives the same document, i.e. the UTF-8 length of
  plain.decode(plain.encode(text)) with text the original document, so CaseOps and SP8192 scores share one
  denominator.
The documents' text is --text-source (the files the dataset was built from, its first documents being the
validation documents; each must tokenize to its validation document, or the proof stops) or, without it, the
validation tokens decoded (CaseOps: sp.decode then shared.caseops.decode).

What neither counts: SentencePiece's nmt_nfkc normalizer rewrites the text before tokenizing, and counted bytes
are the normalized text's bytes, not the raw input's. With --text-source the difference is measured and split:
  nfkc        Unicode NFKC (ligatures "ﬁ"->"fi", fullwidth forms, U+00A0 -> space, ...): raw minus NFKC bytes;
  edges       whitespace stripped at the start and end of a document (" lead" counts 4 bytes, not 5);
  interior    runs of whitespace collapsed to one space ("a  b" counts 3); "\\t" "\\n" "\\r" become one space
              (same byte count, so only runs count here);
  other       the rest of the normalizer's rules (control characters removed, ...).
These bytes were never predicted by the model: they are not part of what is scored, for any tokenizer here.

A compliance audit imports account() and reads its AccountingResult; the command prints it and exits 0 on PASS.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared import bpb, caseops  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.data import load_validation_tokens  # noqa: E402
from shared.manifest import BOS_ID, dataset_transform  # noqa: E402
from shared.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_PLAIN = ROOT / "data" / "tokenizers" / "fineweb_8192_bpe.model"


@dataclass
class AccountingResult:
    data_path: str
    tokenizer_path: str
    transform: str | None  # "caseops_v1" or None
    byte_source: str  # what the evaluator read: "sidecar" or "tables"
    reference: str  # what the evaluator was compared with, in words
    documents: int
    targets: int  # scored target tokens of those documents (BOS targets included)
    evaluator_bytes: int
    reference_bytes: int
    mismatched_documents: int
    first_mismatch: dict | None  # {"document", "evaluator", "reference", "text"}
    raw_bytes: int | None = None  # UTF-8 bytes of the raw documents (with a text source)
    normalization: dict = field(default_factory=dict)  # raw - counted, by cause (see the module docstring)
    normalized_documents: int = 0  # documents whose counted bytes differ from their raw bytes
    # per document, for a diagnosis of a failure (tools/audit_data.py): the evaluator's count and the reference
    per_document: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.mismatched_documents == 0 and self.evaluator_bytes == self.reference_bytes

    @property
    def tokens_per_byte(self) -> float:
        return self.targets / max(self.evaluator_bytes, 1)


def account(data_path: str, tokenizer_path: str, texts: list[str] | None = None,
            plain_tokenizer: str | None = None, max_docs: int | None = None) -> AccountingResult:
    """Compare the evaluator's bytes with the reference for every validation document (see the module docstring);
    max_docs: only the first documents (the evaluator's bytes are still those of the whole split, cut after)."""
    sp = load_tokenizer(tokenizer_path)
    cfg = dataclasses.replace(Hyperparameters(), data_path=data_path, tokenizer_path=tokenizer_path,
                              vocab_size=sp.vocab_size())
    tokens = load_validation_tokens(data_path, sp.vocab_size())
    per_token = np.concatenate([[0], bpb.split_target_bytes(cfg, tokens, sp).astype(np.int64)])
    docs = document_ids(tokens, data_path)[:max_docs]
    n_tokens = sum(len(d) for d in docs)
    counted = np.add.reduceat(per_token[:n_tokens], np.cumsum([0] + [len(d) for d in docs[:-1]]))
    is_caseops = caseops.is_caseops_tokenizer(sp)
    raw = texts is not None
    texts = check_texts(texts, docs, sp, is_caseops) if raw else texts_for(docs, sp, is_caseops)
    if is_caseops:
        plain_path = str(plain_tokenizer or DEFAULT_PLAIN)
        plain = load_tokenizer(plain_path)
        reference = [decoded_bytes(plain, t) for t in texts]
        what = f"plain SentencePiece accounting of the same documents ({Path(plain_path).name})"
    else:
        reference = [len(sp.decode(d[1:].tolist()).encode("utf-8")) for d in docs]
        what = "UTF-8 length of the decoded documents"
    result = compare(counted, reference, texts)
    result.update(data_path=data_path, tokenizer_path=tokenizer_path, transform=dataset_transform(data_path),
                  byte_source=bpb.byte_source(data_path), reference=what, targets=n_tokens - 1)
    if raw:  # the reference is what the normalized text counts, so raw - reference is what normalization removed
        result["raw_bytes"] = sum(len(t.encode("utf-8")) for t in texts)
        result["normalization"], result["normalized_documents"] = normalization_gap(texts, reference)
    return AccountingResult(**result)


def document_ids(tokens: np.ndarray, data_path: str) -> list[np.ndarray]:
    """The validation stream cut at BOS: each piece is [BOS] + one document's tokens."""
    if not tokens.size or tokens[0] != BOS_ID:
        raise ValueError(f"DATA_PATH={data_path}: the validation tokens do not start with BOS id {BOS_ID}")
    starts = np.flatnonzero(tokens == BOS_ID)
    return np.split(tokens, starts[1:])


def texts_for(docs: list[np.ndarray], sp, is_caseops: bool) -> list[str]:
    """Each document's text from its tokens: what the tokenizer decodes (CaseOps: then the case operators undone)."""
    out = [sp.decode(d[1:].tolist()) for d in docs]
    return [caseops.decode(t) for t in out] if is_caseops else out


def check_texts(texts: list[str], docs: list[np.ndarray], sp, is_caseops: bool) -> list[str]:
    """The text source's first documents must be the validation documents, token for token."""
    if len(texts) < len(docs):
        raise ValueError(f"--text-source has {len(texts)} documents, fewer than the {len(docs)} validation documents")
    for i, (text, ids) in enumerate(zip(texts, docs)):
        if sp.encode(caseops.encode(text) if is_caseops else text) != ids[1:].tolist():
            raise ValueError(f"--text-source document {i} does not tokenize to validation document {i}: "
                             f"not the text this dataset was built from ({text[:60]!r})")
    return texts[:len(docs)]


def decoded_bytes(sp, text: str) -> int:
    return len(sp.decode(sp.encode(text)).encode("utf-8"))


def compare(counted: np.ndarray, reference: list[int], texts: list[str]) -> dict:
    diff = np.flatnonzero(counted != np.asarray(reference, dtype=np.int64))
    first = None
    if diff.size:
        i = int(diff[0])
        first = {"document": i, "evaluator": int(counted[i]), "reference": int(reference[i]), "text": texts[i][:80]}
    return {"documents": len(reference), "evaluator_bytes": int(counted.sum()), "reference_bytes": int(sum(reference)),
            "mismatched_documents": int(diff.size), "first_mismatch": first,
            "per_document": (counted, np.asarray(reference, dtype=np.int64))}


def normalization_gap(raw_texts: list[str], counted: list[int]) -> tuple[dict, int]:
    """Raw bytes minus counted bytes over the documents, split by cause; and how many documents have a gap."""
    gap = {"nfkc": 0, "edges": 0, "interior": 0, "other": 0}
    affected = 0
    for text, n in zip(raw_texts, counted):
        raw = len(text.encode("utf-8"))
        nfkc = unicodedata.normalize("NFKC", text)
        spaced = re.sub(r"[ \t\n\r]", " ", nfkc)  # nmt_nfkc: these become spaces, byte for byte
        stripped = spaced.strip(" ")
        collapsed = re.sub(" {2,}", " ", stripped)
        parts = {"nfkc": raw - len(nfkc.encode("utf-8")), "edges": len(spaced) - len(stripped),
                 "interior": len(stripped) - len(collapsed)}
        parts["other"] = raw - n - sum(parts.values())
        for k, v in parts.items():
            gap[k] += v
        affected += raw != n
    return gap, affected


def report(r: AccountingResult) -> str:
    lines = [f"accounting data_path:{r.data_path} tokenizer:{r.tokenizer_path} transform:{r.transform} "
             f"bytes:{r.byte_source}",
             f"reference: {r.reference}",
             f"documents:{r.documents} targets:{r.targets} evaluator_bytes:{r.evaluator_bytes} "
             f"reference_bytes:{r.reference_bytes} difference:{r.evaluator_bytes - r.reference_bytes} "
             f"mismatched_documents:{r.mismatched_documents} tokens_per_byte:{r.tokens_per_byte:.5f}"]
    if r.first_mismatch:
        m = r.first_mismatch
        lines.append(f"first difference: document {m['document']}: evaluator {m['evaluator']} bytes, reference "
                     f"{m['reference']} bytes: {m['text']!r}")
    if r.raw_bytes is not None:
        gap = " ".join(f"{k}:{v}" for k, v in r.normalization.items())
        lines.append(f"raw_text_bytes:{r.raw_bytes} counted:{r.reference_bytes} not counted (SentencePiece "
                     f"normalization):{r.raw_bytes - r.reference_bytes} [{gap}] in {r.normalized_documents} of "
                     f"{r.documents} documents")
    lines.append(f"verdict:{'PASS' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def read_texts(paths: list[Path], split: str) -> list[str]:
    from data import corpus
    if all(p.suffix == ".jsonl" for p in paths):
        return corpus.read_jsonl(paths)
    return corpus.read_text(paths, split)


def main(argv: list[str] | None = None) -> int:
    from data.cli import OneLineParser
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--tokenizer-path", required=True)
    ap.add_argument("--plain-tokenizer", help=f"CaseOps: the plain SP8192 model (default {DEFAULT_PLAIN})")
    ap.add_argument("--text-source", nargs="+", type=Path, help="the .txt/.jsonl files the dataset was built from")
    ap.add_argument("--split", choices=("line", "blank", "file"), default="line", help="as data/prepare.py --split")
    args = ap.parse_args(argv)
    try:
        texts = read_texts(args.text_source, args.split) if args.text_source else None
        result = account(args.data_path, args.tokenizer_path, texts, args.plain_tokenizer)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
