"""CaseOps: a lossless case transform applied to text before SentencePiece, and its per-token byte counts.

Credit: the transform `lossless_caps_caseops_v1` (lossless_caps.py, prepare_caseops_data.py) of the 1.0611
record, records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611 in
github.com/openai/parameter-golf, first published with the romeerp/parameter-golf-caseops-v1 export; rules in
RECORD_STACK.md §1.2-§1.3. Re-derived here from those rules (no code copied).

encode(text): every maximal run w of ASCII letters [A-Za-z] is rewritten by its case pattern
    lowercase            -> w                      "the"      -> the
    len >= 2, uppercase  -> ALLCAPS lower(w)       "NASA"     -> ALLCAPS nasa
    Title                -> TITLE lower(w)         "Paris"/"I" -> TITLE paris / TITLE i
    anything else        -> [TITLE] first, then CAPNEXT before every later capital
                                                   "McDonald" -> TITLE mc CAPNEXT donald, "iPhone" -> i CAPNEXT phone
and a literal operator character c in the input becomes ESC c. Everything else passes through unchanged:
non-ASCII letters ("É", Turkish "İ"/"ı") are never case-folded, so decode(encode(x)) == x for every string.
decode() raises CaseOpsDecodeError naming the position of an operator that no encode() output (nor its NFKC
normalization) can hold: TITLE/ALLCAPS/CAPNEXT not followed by an ASCII letter, CAPNEXT outside a word or in an
ALLCAPS word, ESC not followed by an operator character.

Byte counts (the sidecar, §1.3): every token counts the UTF-8 bytes of the ORIGINAL (un-cased) text it stands
for, as SentencePiece normalized it: BOS and the operators 0, an escaped operator character 3, an ASCII letter
1 (either case), "▁" one space, byte-fallback pieces the whole character's bytes on the piece that completes it
(its last byte piece; the others 0). The sum over a document is therefore the byte length of the normalized
original document: what the plain SP8192 tokenizer's byte tables count for the same document, so CaseOps and
plain scores share one denominator (see tools/accounting.py, which checks this document by document).
"""
from __future__ import annotations

import re

import numpy as np

TRANSFORM = "caseops_v1"  # the manifest's "transform" for datasets built with this module
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
OPERATOR_IDS = (4, 5, 6, 7)  # where a CaseOps tokenizer keeps them: user-defined pieces right after pad/bos/eos/unk
SPACE_MARK = "\u2581"

_RUN = re.compile("[A-Za-z]+|[" + "".join(OPERATORS) + "]")


class CaseOpsDecodeError(ValueError):
    """Operators where encode() never puts them; the message names the position in the decoded string."""


def encode(text: str) -> str:
    return _RUN.sub(_rewrite, text)


def _rewrite(match: re.Match) -> str:
    w = match.group(0)
    if w in OPERATORS:
        return ESC + w
    if w.islower():  # ASCII letters only here, so islower/isupper/lower never touch other scripts
        return w
    low = w.lower()
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + low
    if w[0].isupper() and w[1:].islower() or len(w) == 1:
        return TITLE + low
    head = TITLE + low[0] if w[0].isupper() else low[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def _is_ascii_letter(c: str) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z"


def decode(text: str) -> str:
    """Inverse of encode(); CaseOpsDecodeError at the first operator encode() could not have written."""
    out: list[str] = []
    pending, pending_at = "", -1  # TITLE/ALLCAPS/CAPNEXT waiting for its letter, and where it stood
    in_word = allcaps = escaped = False
    for i, c in enumerate(text):
        if escaped:
            if c not in OPERATORS:
                _malformed(i - 1, "ESC not followed by an operator character")
            out.append(c)
            escaped = in_word = allcaps = False
        elif c in OPERATORS:
            if pending:
                _malformed(pending_at, f"{_NAMES[pending]} not followed by an ASCII letter")
            if c == ESC:
                escaped = True
            elif c == CAPNEXT and (not in_word or allcaps):
                _malformed(i, "CAPNEXT outside a mixed-case word")
            # TITLE/ALLCAPS right after a letter is accepted: NFKC can turn the non-letter before a word into
            # an ASCII letter ("450\u00bac" -> "450oc"), and the decoder must read the tokenizer's decode() back.
            allcaps = allcaps and c == CAPNEXT
            pending, pending_at = ("" if c == ESC else c), i
        elif _is_ascii_letter(c):
            allcaps = allcaps or pending == ALLCAPS
            out.append(c.upper() if pending or allcaps else c)
            pending, in_word = "", True
        else:
            if pending:
                _malformed(pending_at, f"{_NAMES[pending]} not followed by an ASCII letter")
            out.append(c)
            in_word = allcaps = False
    if escaped or pending:
        _malformed(len(text) - 1, f"{_NAMES[ESC if escaped else pending]} at the end of the text")
    return "".join(out)


_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}


def _malformed(pos: int, what: str) -> None:
    raise CaseOpsDecodeError(f"malformed CaseOps text at position {pos}: {what}")


def is_caseops_tokenizer(sp) -> bool:
    """Its ids 4-7 are the four operator characters as single pieces (cheap: four look-ups)."""
    return sp.vocab_size() > max(OPERATOR_IDS) and all(
        sp.id_to_piece(i) == op for i, op in zip(OPERATOR_IDS, OPERATORS))


class PieceBytes:
    """Per-id facts the sidecar needs, read once from a CaseOps tokenizer (pieces, not surfaces: no protobuf)."""

    def __init__(self, sp):
        n = sp.vocab_size()
        self.kind = np.zeros(n, dtype=np.int8)  # 0 counted piece, 1 control/unknown, 2 operator, 3 ESC, 4 byte
        self.nbytes = np.zeros(n, dtype=np.int64)  # counted pieces: UTF-8 bytes with "▁" as one space
        self.byte = np.zeros(n, dtype=np.int64)  # byte pieces: the byte value
        for tid in range(n):
            piece = sp.id_to_piece(tid)
            if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
                self.kind[tid] = 1
            elif piece in OPERATORS:
                self.kind[tid] = 3 if piece == ESC else 2
            elif sp.is_byte(tid):
                self.kind[tid], self.byte[tid] = 4, int(piece[3:5], 16)
            else:
                self.nbytes[tid] = len(piece.replace(SPACE_MARK, " ").encode("utf-8"))


def _utf8_length(lead: int) -> int:
    """Bytes of the character a UTF-8 lead byte starts (1 for a stray continuation byte: counted as itself)."""
    return 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1


def token_byte_counts(ids, table: PieceBytes) -> np.ndarray:
    """uint16 count per id of one document's ids (BOS included if present): see the module docstring."""
    ids = np.asarray(ids, dtype=np.int64)
    out = table.nbytes[ids].astype(np.uint16)  # counted pieces; controls and operators stay 0
    kind = table.kind[ids]
    escaped_at, need, run, prev = -1, 0, 0, -1  # ESC's operand; bytes missing of a character, bytes so far
    for k in np.flatnonzero(kind >= 2).tolist():  # operators, ESC, byte pieces: the only context-dependent kinds
        if need and (k != prev + 1 or kind[k] != 4):  # a character cut short (never from encoding text)
            out[prev] += run
            need = 0
        if k == escaped_at:  # ESC's operand is an operator piece: the literal character, 3 bytes in UTF-8
            out[k] = 3 if kind[k] in (2, 3) else out[k]
        elif kind[k] == 3:
            escaped_at = k + 1
        elif kind[k] == 4:
            if need == 0:
                need, run = _utf8_length(int(table.byte[ids[k]])), 0
            run, need = run + 1, need - 1
            if need == 0:  # the piece that completes the character carries all its bytes
                out[k] = run
        prev = k
    if need:
        out[prev] += run
    return out
