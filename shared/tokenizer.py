"""SentencePiece loading and the per-token byte tables behind bits-per-byte.

The byte count of a target token y following token x is
    base_bytes[y] + (has_leading_space[y] and not is_boundary[x])
- base_bytes: UTF-8 bytes of the piece without its leading "▁"; byte-fallback
  tokens (<0xNN>) are exactly 1 byte; control/unknown/unused tokens are 0.
- the leading "▁" is one space byte, except right after a boundary token
  (BOS, ...): documents start without a space (nmt_nfkc strips it), so
  counting it there would count bytes the text does not have.
- a standalone "▁" piece has base 0 and is only its space: counting the piece's
  UTF-8 ("▁" is 3 bytes) *and* the space is the double count to avoid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm

SPACE_MARK = "\u2581"  # "▁", SentencePiece's whitespace symbol


@dataclass(frozen=True)
class ByteTables:
    base_bytes: np.ndarray  # (V,) int64
    has_leading_space: np.ndarray  # (V,) bool
    is_boundary: np.ndarray  # (V,) bool

    def count_bytes(self, prev_ids: np.ndarray, tgt_ids: np.ndarray) -> np.ndarray:
        """Bytes of each target token given the token before it (int64, same shape)."""
        space = self.has_leading_space[tgt_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[tgt_ids] + space.astype(np.int64)


def load_tokenizer(path: str, vocab_size: int | None = None) -> spm.SentencePieceProcessor:
    """Load a .model file; with vocab_size, insist that it matches (TOKENIZER_PATH vs VOCAB_SIZE)."""
    if os.path.isdir(path):
        raise ValueError(f"TOKENIZER_PATH={path} is a directory, not a SentencePiece .model file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TOKENIZER_PATH={path} does not exist; build data with `python data/prepare.py --demo` "
                                f"or download with `python data/prepare.py --variant sp1024`")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"TOKENIZER_PATH={path} is not a SentencePiece model: {exc}") from None
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise ValueError(f"TOKENIZER_PATH={path} has vocab size {sp.vocab_size()} but VOCAB_SIZE={vocab_size}")
    return sp


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int | None = None) -> ByteTables:
    """Tables sized max(tokenizer vocab, vocab_size); ids beyond the tokenizer are boundaries of 0 bytes."""
    n = sp.vocab_size()
    size = max(n, vocab_size or 0)
    base = np.zeros(size, dtype=np.int64)
    space = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)
    for tid in range(n):
        if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
            continue
        boundary[tid] = False
        if sp.is_byte(tid):
            base[tid] = 1
            continue
        piece = sp.id_to_piece(tid)
        if piece.startswith(SPACE_MARK):
            space[tid] = True
            piece = piece[1:]
        base[tid] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)


def normalized_text(sp: spm.SentencePieceProcessor, text: str) -> str:
    """The text as the tokenizer sees it (NFKC, collapsed whitespace): what decode() gives back."""
    return sp.normalize(text).replace(SPACE_MARK, " ")
