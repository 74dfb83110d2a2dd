"""The official token shard format and the one batch schedule both trainers use.

Shard: 256 little-endian int32 header (magic 20240520, version 1, token count),
then `count` little-endian uint16 tokens. Nothing else in the file.

Batch schedule (the official torch scheme): every optimizer step is 8 slots of
TRAIN_BATCH_TOKENS/8 tokens. A micro-step on WORLD_SIZE ranks takes one
contiguous chunk of (slot+1)*WORLD_SIZE tokens and rank r takes span r, so slot
k*WORLD_SIZE+r of step s is the same tokens for every world size and backend.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from shared.config import MICRO_BATCHES_PER_STEP
from shared.fsutil import atomic_write_bytes

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens as one shard, atomically (temp file + rename)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must fit uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    atomic_write_bytes(path, header.tobytes() + tokens.astype(TOKEN_DTYPE).tobytes())


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header against its file size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad shard magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ValueError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count


def load_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Read a validated shard as uint16 tokens; with vocab_size, reject ids >= vocab_size."""
    count = read_shard_header(path)
    tokens = np.fromfile(path, dtype=TOKEN_DTYPE, count=count, offset=HEADER_BYTES)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ValueError(f"{path}: token {int(tokens[bad])} at index {bad} is >= VOCAB_SIZE={vocab_size}")
    return tokens


def list_shards(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}; build them with `python data/prepare.py --demo` "
                                f"(offline) or `python data/prepare.py --variant sp1024` (download)")
    return files


def train_pattern(data_path: str) -> str:
    return os.path.join(data_path, "fineweb_train_*.bin")


def val_pattern(data_path: str) -> str:
    # [0-9]: the CaseOps byte sidecar fineweb_val_bytes_NNNNNN.bin sits beside the val shards and is not tokens
    return os.path.join(data_path, "fineweb_val_[0-9]*.bin")


def sidecar_pattern(data_path: str) -> str:
    """Per-token byte counts of the val tokens (same shard format; RECORD_STACK.md §1.3)."""
    return os.path.join(data_path, "fineweb_val_bytes_[0-9]*.bin")


def sidecar_path(data_path: str | os.PathLike, index: int) -> str:
    return os.path.join(data_path, f"fineweb_val_bytes_{index:06d}.bin")


def load_validation_sidecar(data_path: str) -> np.ndarray | None:
    """int32 byte count of every validation token in shard order, or None when DATA_PATH has no sidecar."""
    files = sorted(glob.glob(sidecar_pattern(data_path)))
    if not files:
        return None
    return np.concatenate([load_shard(f).astype(np.int32) for f in files])


def load_validation_tokens(data_path: str, vocab_size: int) -> np.ndarray:
    """All validation tokens in shard order (the evaluator's window schedule decides what is scored)."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"DATA_PATH={data_path} does not exist; build it with `python data/prepare.py --demo` "
                                f"or download with `python data/prepare.py --variant sp1024`")
    shards = [load_shard(f, vocab_size) for f in list_shards(val_pattern(data_path))]
    return np.concatenate(shards)


class TokenStream:
    """Reads train shards in order, wrapping around; its position is a small dict for checkpoints.

    Every shard's header is checked when the stream opens (cheap: 1 KB a shard), so a corrupt
    later shard fails at start, not hours in; a split of zero tokens is an error, not a hang.
    """

    def __init__(self, pattern: str, vocab_size: int | None = None):
        self.files = list_shards(pattern)
        self.counts = [read_shard_header(f) for f in self.files]
        if sum(self.counts) == 0:
            raise ValueError(f"the train shards {pattern} hold 0 tokens; rebuild them with data/prepare.py")
        self.vocab_size = vocab_size
        self._open(0)

    def take(self, n: int) -> np.ndarray:
        chunks, remaining = [], n
        while remaining > 0:
            avail = self.tokens.size - self.pos
            if avail <= 0:
                self._open(self.file_idx + 1)
                continue
            k = min(remaining, avail)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            remaining -= k
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _open(self, idx: int) -> None:
        self.file_idx = idx % len(self.files)
        self.tokens = load_shard(self.files[self.file_idx], self.vocab_size)
        self.pos = 0

    def state(self) -> dict:
        return {"file_idx": self.file_idx, "pos": self.pos}

    def restore(self, state: dict) -> None:
        """ValueError if the position does not exist in these shards (a checkpoint of other data)."""
        idx, pos = state.get("file_idx"), state.get("pos")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (idx, pos)):
            raise ValueError(f"data position {state!r} lacks integer file_idx/pos")
        if not 0 <= idx < len(self.files) or not 0 <= pos <= self.counts[idx]:
            raise ValueError(f"data position file_idx={idx} pos={pos} is outside the {len(self.files)} train "
                             f"shards ({self.files[min(max(idx, 0), len(self.files) - 1)]})")
        self._open(idx)
        self.pos = pos

    def fingerprint(self) -> list[list]:
        """[shard file name, token count] of every train shard: what a resume must find again."""
        return [[os.path.basename(f), c] for f, c in zip(self.files, self.counts)]


class TokenLoader:
    """One rank's view of the shared schedule: next_micro_batch() returns (x, y) int64 arrays."""

    def __init__(self, pattern: str, rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        if world_size <= 0 or MICRO_BATCHES_PER_STEP % world_size:
            raise ValueError(f"WORLD_SIZE={world_size} must divide {MICRO_BATCHES_PER_STEP}")
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        self.rank, self.world_size = rank, world_size
        self.stream = TokenStream(pattern, vocab_size)

    @property
    def grad_accum_steps(self) -> int:
        return MICRO_BATCHES_PER_STEP // self.world_size

    def next_micro_batch(self, global_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        local_tokens = global_tokens // MICRO_BATCHES_PER_STEP
        span = local_tokens + 1  # +1: the last target of the slot
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)  # (B, T) each
