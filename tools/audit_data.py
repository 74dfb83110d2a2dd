"""The compliance audit's data checks (python -m tools.audit): byte accounting and validation/train overlap.

check_accounting runs the accounting proof (tools/accounting.account: the bytes the evaluator counts equal the
bytes recomputed from the documents' text) and, when it fails, says which historical byte-counting bug the
per-document differences show. d_i = evaluator bytes - reference bytes of validation document i (its targets:
the tokens after its BOS and the next document's BOS). Each signature is an exact law over every document, with
one integer constant k >= 1 (so a bug cannot be named from a total that happens to fit):
  (a) leading-space double count, at document starts: d_i = k * s0_i, where s0_i = 1 when document i's first
      token carries the "▁" marker right after a boundary token (BOS): the space nmt_nfkc stripped is counted
      (k = 1: over-count = the number of such documents, i.e. nearly all of them);
  (a) leading-space double count, on every "▁" piece: d_i = k * s_i, with s_i the number of "▁" targets in
      document i: the marker's byte counted on top of a byte table that already includes it (k = 1), or "▁"
      counted as its 3 UTF-8 bytes (k = 2 or 3);
  (b) byte-fallback tokens counted as their piece: d_i = k * b_i, with b_i the number of <0xNN> targets in
      document i: k = 5 when "<0xNN>" counts its 6 characters instead of 1 byte (k = 2: as U+FFFD, 3 bytes);
  (c) special tokens counted as bytes: d_i = sum over special ids t of k_t * c_it (every k_t >= 0 an integer,
      one > 0), with c_it the targets of id t in document i; special = control/unknown/unused (BOS, <unk>) and,
      for a CaseOps tokenizer, the case operators (ids 4-7): e.g. BOS counted as "<s>" gives 3 * (documents - 1).
Token kinds come from the tokenizer itself, never from the byte tables or sidecar under test.

check_no_val_in_train hashes each validation document (token ids between BOS markers, blake2b) and streams the
training shards one at a time (a document cut by a shard boundary is carried into the next shard), counting
training documents whose tokens equal a validation document's.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from shared.caseops import OPERATOR_IDS, is_caseops_tokenizer
from shared.data import list_shards, load_shard, load_validation_tokens, train_pattern, val_pattern
from shared.manifest import BOS_ID
from shared.tokenizer import SPACE_MARK, load_tokenizer
from tools import accounting
from tools.auditcheck import Finding, verdict


# ---- byte accounting ----
def check_accounting(data_path: str, tokenizer_path: str, plain_tokenizer: str | None = None,
                     max_docs: int | None = None) -> list[Finding]:
    """`byte_accounting`: PASS when the evaluator's bytes equal the text's, document by document; a FAIL names
    the bug signature(s) the differences fit (see the module docstring)."""
    name = "byte_accounting"
    try:
        r = accounting.account(data_path, tokenizer_path, plain_tokenizer=plain_tokenizer, max_docs=max_docs)
    except (ValueError, OSError) as exc:
        return [Finding(name, "FAIL", f"the proof could not run: {exc}")]
    head = (f"{r.documents} documents: evaluator {r.evaluator_bytes} bytes ({r.byte_source}), reference "
            f"{r.reference_bytes} ({r.reference})")
    if r.ok:
        return [verdict(name, True, head)]
    counted, reference = r.per_document
    d = counted - reference
    features = document_features(data_path, tokenizer_path, r.documents)
    found = diagnose(d, features)
    m = r.first_mismatch
    figure = (f"{head}: {r.evaluator_bytes - r.reference_bytes:+d} bytes in {r.mismatched_documents} documents; "
              f"{'; '.join(found) if found else 'no known bug signature fits the per-document differences'}; "
              f"first: document {m['document']} evaluator {m['evaluator']} vs {m['reference']} ({m['text'][:40]!r})")
    return [verdict(name, False, figure)]


def token_kinds(sp) -> dict[str, np.ndarray]:
    """Per id (bool): "▁" pieces, byte-fallback pieces, boundaries (control/unknown/unused), specials (boundaries
    and, for CaseOps, the case operators)."""
    n = sp.vocab_size()
    space = np.array([sp.id_to_piece(i).startswith(SPACE_MARK) and not sp.is_byte(i) for i in range(n)])
    byte = np.array([sp.is_byte(i) for i in range(n)])
    boundary = np.array([sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(n)])
    special = boundary.copy()
    if is_caseops_tokenizer(sp):
        special[list(OPERATOR_IDS)] = True
    return {"space": space, "byte": byte, "boundary": boundary, "special": special}


def document_features(data_path: str, tokenizer_path: str, documents: int) -> dict:
    """Counts per document (over its targets, as account() cuts them) of each signature's tokens."""
    sp = load_tokenizer(tokenizer_path)
    tokens = load_validation_tokens(data_path, sp.vocab_size()).astype(np.int64)
    docs = accounting.document_ids(tokens, data_path)[:documents]
    n = sum(len(x) for x in docs)
    ids, prev = tokens[:n], np.concatenate([[BOS_ID], tokens[:n - 1]])
    target = np.arange(n) > 0  # the split's first BOS is no target
    kinds = token_kinds(sp)
    starts = np.cumsum([0] + [len(x) for x in docs[:-1]])
    per_doc = lambda mask: np.add.reduceat((mask & target).astype(np.int64), starts)  # noqa: E731
    special_ids = np.unique(ids[kinds["special"][ids] & target])
    return {"start_space": per_doc(kinds["space"][ids] & kinds["boundary"][prev]),
            "space": per_doc(kinds["space"][ids]), "byte": per_doc(kinds["byte"][ids]),
            "special": {int(t): per_doc(ids == t) for t in special_ids}, "sp": sp}


def proportional(d: np.ndarray, n: np.ndarray) -> int | None:
    """k >= 1 with d == k * n for every document, or None."""
    total = int(n.sum())
    if total == 0 or int(d.sum()) % total:
        return None
    k = int(d.sum()) // total
    return k if k >= 1 and np.array_equal(d, k * n) else None


def special_fit(d: np.ndarray, counts: dict[int, np.ndarray]) -> dict[int, int] | None:
    """Integer bytes per special id that give d exactly (least squares, rounded, then checked), or None."""
    if not counts:
        return None
    ids = sorted(counts)
    a = np.stack([counts[t] for t in ids], axis=1).astype(np.float64)
    k = np.rint(np.linalg.lstsq(a, d.astype(np.float64), rcond=None)[0]).astype(np.int64)
    if (k < 0).any() or not k.any() or not np.array_equal(a.astype(np.int64) @ k, d):
        return None
    return {t: int(v) for t, v in zip(ids, k) if v}


SIGNATURES = {  # feature -> its diagnosis when d = k x that feature's count per document
    "start_space": lambda k, n: (f"bug (a) leading-space double count at document starts: +{k} x {n} documents "
                                 f"opening with a '▁' piece (the space after BOS is counted)"),
    "space": lambda k, n: (f"bug (a) leading-space double count: +{k} x {n} '▁' pieces (the marker's space "
                           f"counted on top of a byte count that already includes it)"),
    "byte": lambda k, n: (f"bug (b) byte-fallback tokens counted as {k + 1} bytes, not 1: +{k} x {n} <0xNN> "
                          f"tokens{' (their piece length)' if k == 5 else ''}"),
}


def diagnose(d: np.ndarray, f: dict) -> list[str]:
    """Every signature of the module docstring that the per-document differences d fit exactly."""
    out = []
    for key, says in SIGNATURES.items():  # each a count per document that d may be a whole multiple of
        k = proportional(d, f[key])
        if k is not None:
            out.append(says(k, int(f[key].sum())))
    fit = special_fit(d, f["special"])
    if fit is not None:
        what = ", ".join(f"{f['sp'].id_to_piece(t)} (id {t}) as {v} bytes x {int(f['special'][t].sum())}"
                         for t, v in fit.items())
        out.append(f"bug (c) special tokens counted as bytes: {what}")
    return out


# ---- validation documents in the training shards ----
def check_no_val_in_train(data_path: str) -> list[Finding]:
    """`no_val_in_train`: FAIL when a training document has exactly the tokens of a validation document."""
    name = "no_val_in_train"
    try:
        val = validation_digests(data_path)
        dups, first, n_train = scan_train(data_path, val)
    except (ValueError, OSError) as exc:
        return [Finding(name, "FAIL", f"DATA_PATH={data_path}: {exc}")]
    if not dups:
        return [verdict(name, True, f"0 of {n_train} training documents equal any of the {len(val)} distinct "
                                    f"validation documents (blake2b of the token ids between BOS markers)")]
    shard, offset, val_doc = first
    return [verdict(name, False, f"{dups} of {n_train} training documents equal a validation document; first: "
                                 f"{shard} token {offset} = validation document {val_doc}")]


def digest(doc: np.ndarray) -> bytes:
    return hashlib.blake2b(doc.astype("<u2").tobytes(), digest_size=16).digest()


def validation_digests(data_path: str) -> dict[bytes, int]:
    """digest -> index of the first validation document with those tokens (empty documents skipped)."""
    tokens = np.concatenate([load_shard(f) for f in list_shards(val_pattern(data_path))])
    out: dict[bytes, int] = {}
    for i, doc in enumerate(accounting.document_ids(tokens, data_path)):
        if doc.size > 1:
            out.setdefault(digest(doc[1:]), i)
    return out


def scan_train(data_path: str, val: dict[bytes, int]) -> tuple[int, tuple | None, int]:
    """Stream the training shards once; a document is the tokens after one BOS up to the next (or the end of the
    split), wherever the shards cut it. Returns (duplicates, (shard, token offset, val doc) of the first, docs)."""
    dups, first, n_docs = 0, None, 0
    carry, origin = np.zeros(0, dtype=np.uint16), None  # the unfinished last document and where its BOS is

    def visit(doc: np.ndarray, where: tuple[str, int]) -> None:
        nonlocal dups, first, n_docs
        body = doc[1:] if doc.size and doc[0] == BOS_ID else doc  # a split may open without BOS
        if not body.size:
            return
        n_docs += 1
        hit = val.get(digest(body))
        if hit is not None:
            dups += 1
            first = first or (*where, hit)

    for path in list_shards(train_pattern(data_path)):
        shard = load_shard(path)
        bos = np.flatnonzero(shard == BOS_ID)
        cut = int(bos[0]) if bos.size else shard.size
        carry = np.concatenate([carry, shard[:cut]])
        if bos.size:
            if carry.size:
                visit(carry, origin or (os.path.basename(path), 0))
            ends = np.append(bos[1:], shard.size)
            for a, b in zip(bos[:-1], ends[:-1]):
                visit(shard[a:b], (os.path.basename(path), int(a)))
            carry, origin = shard[bos[-1]:].copy(), (os.path.basename(path), int(bos[-1]))
    if carry.size:
        visit(carry, origin or ("fineweb_train_000000.bin", 0))
    return dups, first, n_docs
