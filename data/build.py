"""Documents -> (tokenizer) -> shards + manifest in the official layout, with a per-split summary.

A dataset is built whole in a temp folder next to data/datasets/<name>/ and swapped in
only when complete (shared.fsutil.atomic_replace_dir): a bad argument, a crash or a
full disk leaves the previous dataset and tokenizer byte-identical.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from shared import caseops
from shared.data import sidecar_path, write_shard
from shared.fsutil import atomic_replace_dir, make_temp_dir, write_temp_for
from shared.manifest import BOS_ID, write_manifest
from shared.tokenizer import build_byte_tables

MAX_VOCAB = 65536  # shards store uint16 ids
# Plain file names only: a name is joined under datasets/ and tokenizers/, and temps start with "."
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise ValueError(f"--name {name!r} must be a plain name (letters, digits, '.', '_', '-'), not a path")
    return name


def train_tokenizer(docs: list[str], vocab_size: int, user_symbols: tuple[str, ...] = ()) -> bytes:
    """SentencePiece BPE with the official recipe; the .model file's bytes. user_symbols become single pieces
    at ids 4, 5, ... (right after pad/bos/eos/unk): the CaseOps operators, as in the record's tokenizer (§1.1)."""
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"--vocab-size={vocab_size} must be in 1..{MAX_VOCAB} (shards store uint16 ids)")
    # model_writer instead of a model_prefix: a prefix (a temp path) is recorded inside the
    # file, so two identical builds gave different bytes and different sha256s.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(docs)), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
            pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, hard_vocab_limit=True,
            user_defined_symbols=list(user_symbols),
            # One thread and no sampling: the same corpus always gives the same model.
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
            max_sentence_length=16384, minloglevel=2)
    except RuntimeError as exc:
        raise ValueError(f"--vocab-size={vocab_size}: SentencePiece training failed: {str(exc).strip()}") from None
    return model.getvalue()


def _training_lines(docs: list[str]):
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                yield line


def read_tokenizer(path: str | os.PathLike) -> bytes:
    """A --tokenizer file's bytes, after checking it is a SentencePiece model the shard format can hold."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--tokenizer {path}: is a directory, not a SentencePiece .model file")
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no such file")
    data = path.read_bytes()
    tokenizer_from_bytes(data, f"--tokenizer {path}")
    return data


def tokenizer_from_bytes(data: bytes, label: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except RuntimeError:
        raise ValueError(f"{label}: not a SentencePiece model") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise ValueError(f"{label}: vocab size {sp.vocab_size()} does not fit the shards' uint16 ids")
    if sp.bos_id() != BOS_ID:
        raise ValueError(f"{label}: BOS id is {sp.bos_id()}; the shard format starts documents with id {BOS_ID}")
    return sp


def check_caseops_tokenizer(sp: spm.SentencePieceProcessor, label: str, want: bool) -> None:
    """--caseops needs the operators at ids 4-7; a plain build must not use a CaseOps tokenizer."""
    if caseops.is_caseops_tokenizer(sp) != want:
        raise ValueError(f"{label}: {'not ' if want else ''}a CaseOps tokenizer (ids 4-7 "
                         f"{'must' if want else 'are'} the case operators U+E001-U+E004)"
                         f"{'' if want else '; build with --caseops'}")


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str], sidecar: bool = False
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate [BOS] + tokens of each document (no EOS, as the official export); with sidecar (CaseOps:
    docs are already transformed), also every token's original byte count (shared/caseops.py)."""
    table = caseops.PieceBytes(sp) if sidecar else None
    pieces, counts = [], []
    for ids in sp.encode(docs):
        pieces.append(np.array([BOS_ID] + ids, dtype=np.uint16))
        if table is not None:
            counts.append(caseops.token_byte_counts(pieces[-1], table))
    empty = np.zeros(0, dtype=np.uint16)
    tokens = np.concatenate(pieces) if pieces else empty
    return tokens, (np.concatenate(counts) if counts else empty) if sidecar else None


def write_split(tokens: np.ndarray, out_dir: Path, split: str, shard_tokens: int,
                counts: np.ndarray | None = None) -> list[Path]:
    """Token shards; with counts, the byte sidecar shard of each beside it, cut at the same places."""
    paths = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = out_dir / f"fineweb_{split}_{i:06d}.bin"
        write_shard(path, tokens[start:start + shard_tokens])
        if counts is not None:
            write_shard(sidecar_path(out_dir, i), counts[start:start + shard_tokens])
        paths.append(path)
        print(f"wrote {path.name} ({min(shard_tokens, len(tokens) - start)} tokens)", flush=True)
    return paths


def build_dataset(docs: list[str], name: str, out_root: Path, val_docs: int | None, tokenizer: Path | None,
                  vocab_size: int, shard_tokens: int, caseops_transform: bool = False) -> dict:
    """Build out_root/datasets/<name>/ (shards + manifest.json) and out_root/tokenizers/<name>.model.

    caseops_transform: documents go through shared/caseops.encode first; the tokenizer (given or trained with
    the operators reserved at ids 4-7) must be a CaseOps one; val gets the byte sidecar."""
    check_name(name)
    if shard_tokens <= 0:
        raise ValueError(f"--shard-tokens={shard_tokens} must be a positive number of tokens")
    val, train = split_documents(docs, val_docs)
    t0 = time.perf_counter()
    if caseops_transform:
        val, train = [caseops.encode(d) for d in val], [caseops.encode(d) for d in train]
    if tokenizer is None:
        print(f"training a {vocab_size}-token BPE tokenizer on {len(train)} train documents...", flush=True)
        model = train_tokenizer(train, vocab_size, caseops.OPERATORS if caseops_transform else ())
    else:
        model = read_tokenizer(tokenizer)
    check_caseops_tokenizer(tokenizer_from_bytes(model, f"--tokenizer {tokenizer or name}"),
                            f"--tokenizer {tokenizer or name}", caseops_transform)
    tok_dest = Path(out_root) / "tokenizers" / f"{name}.model"
    dest = Path(out_root) / "datasets" / name
    dest = dest.resolve() if dest.is_symlink() else dest  # swap the folder, not the link to it
    tmp = make_temp_dir(dest)
    try:
        summary = write_dataset(tmp, name, model, val, train, shard_tokens, caseops_transform)
        summary["tokenizer"] = str(tok_dest)
        commit(tmp, dest, model, tok_dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def split_documents(docs: list[str], val_docs: int | None) -> tuple[list[str], list[str]]:
    n_val = default_val_docs(len(docs)) if val_docs is None else val_docs
    if not 0 < n_val < len(docs):
        raise ValueError(f"--val-docs={n_val} must leave both splits non-empty ({len(docs)} documents)")
    return docs[:n_val], docs[n_val:]


def write_dataset(out_dir: Path, name: str, model: bytes, val: list[str], train: list[str], shard_tokens: int,
                  caseops_transform: bool = False) -> dict:
    """Shards of both splits (+ the val byte sidecar for CaseOps) and manifest.json into out_dir; the summary
    prepare.py prints. text_bytes is the raw documents' UTF-8 (before the case transform)."""
    sp = tokenizer_from_bytes(model, f"tokenizer {name}")
    summary = {"name": name, "vocab_size": sp.vocab_size()}
    tables = build_byte_tables(sp)
    for split, split_docs in (("val", val), ("train", train)):
        tokens, counts = encode_documents(sp, split_docs, sidecar=caseops_transform and split == "val")
        write_split(tokens, out_dir, split, shard_tokens, counts)
        prev, tgt = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
        raw = [caseops.decode(d) for d in split_docs] if caseops_transform else split_docs
        summary[split] = {"documents": len(split_docs), "tokens": int(tokens.size),
                          "text_bytes": sum(len(d.encode("utf-8")) for d in raw)}
        if not caseops_transform:  # CaseOps train has no sidecar, and the tables would count operators
            summary[split]["scored_bytes"] = int(tables.count_bytes(prev, tgt).sum())
        elif counts is not None:
            summary[split]["scored_bytes"] = int(counts.sum(dtype=np.int64))
    staged = out_dir / f"{name}.model"  # hashed under its final name, then moved to tokenizers/
    staged.write_bytes(model)
    write_manifest(out_dir, staged, transform=caseops.TRANSFORM if caseops_transform else None,
                   vocab_size=sp.vocab_size(), name=name, source="data/prepare.py",
                   shard_tokens=shard_tokens, documents={s: summary[s]["documents"] for s in ("val", "train")})
    staged.unlink()
    return summary


def commit(tmp: Path, dest: Path, model: bytes, tok_dest: Path) -> None:
    """Swap the finished folder in, then the tokenizer (already written and fsynced beside its place)."""
    tok_tmp = write_temp_for(tok_dest, model)
    try:
        atomic_replace_dir(tmp, dest)
        os.replace(tok_tmp, tok_dest)
    except BaseException:
        tok_tmp.unlink(missing_ok=True)
        raise


def default_val_docs(n_docs: int) -> int:
    return max(1, min(50_000, n_docs // 10))
