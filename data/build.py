"""Documents -> (tokenizer) -> shards in the official layout, with a per-split summary."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from shared.data import write_shard
from shared.tokenizer import build_byte_tables, load_tokenizer

BOS_ID = 1


def train_tokenizer(docs: list[str], model_path: Path, vocab_size: int) -> None:
    """SentencePiece BPE with the official recipe; written atomically to model_path."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = Path(tmp) / "tok"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(docs)), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=True,
            # One thread and no sampling: the same corpus always gives the same model.
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
            max_sentence_length=16384, minloglevel=2)
        shutil.move(str(prefix) + ".model", model_path)


def _training_lines(docs: list[str]):
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                yield line


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    """Concatenate [BOS] + tokens of each document (no EOS, as the official export)."""
    pieces = []
    for ids in sp.encode(docs):
        pieces.append(np.array([BOS_ID] + ids, dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def write_split(tokens: np.ndarray, out_dir: Path, split: str, shard_tokens: int) -> list[Path]:
    paths = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = out_dir / f"fineweb_{split}_{i:06d}.bin"
        write_shard(path, tokens[start:start + shard_tokens])
        paths.append(path)
        print(f"wrote {path} ({min(shard_tokens, len(tokens) - start)} tokens)", flush=True)
    return paths


def build_dataset(docs: list[str], name: str, out_root: Path, val_docs: int | None, tokenizer: Path | None,
                  vocab_size: int, shard_tokens: int) -> dict:
    n_val = default_val_docs(len(docs)) if val_docs is None else val_docs
    if not 0 < n_val < len(docs):
        raise ValueError(f"--val-docs={n_val} must leave both splits non-empty ({len(docs)} documents)")
    val, train = docs[:n_val], docs[n_val:]
    model_path = out_root / "tokenizers" / f"{name}.model"
    t0 = time.perf_counter()
    if tokenizer is None:
        print(f"training a {vocab_size}-token BPE tokenizer on {len(train)} train documents...", flush=True)
        train_tokenizer(train, model_path, vocab_size)
    elif Path(tokenizer).resolve() != model_path.resolve():
        model_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, model_path)
    sp = load_tokenizer(str(model_path))
    out_dir = out_root / "datasets" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("fineweb_*.bin"):
        stale.unlink()  # a rebuild must not leave shards of an older, larger build behind
    summary = {"name": name, "tokenizer": str(model_path), "vocab_size": sp.vocab_size()}
    tables = build_byte_tables(sp)
    for split, split_docs in (("val", val), ("train", train)):
        tokens = encode_documents(sp, split_docs)
        write_split(tokens, out_dir, split, shard_tokens)
        prev, tgt = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
        summary[split] = {"documents": len(split_docs), "tokens": int(tokens.size),
                          "text_bytes": sum(len(d.encode("utf-8")) for d in split_docs),
                          "scored_bytes": int(tables.count_bytes(prev, tgt).sum())}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def default_val_docs(n_docs: int) -> int:
    return max(1, min(50_000, n_docs // 10))
