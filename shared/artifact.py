"""The one artifact container: quantized tensors in safetensors, zstandard-compressed.

File = one zstd frame (with content checksum) holding a safetensors buffer whose
tensors are what the quant scheme wrote (shared/quant/) and whose metadata holds:
format, format_version, quant_scheme, config (JSON), tensors (the scheme's JSON
index), tokenizer_sha256 (the .model file the weights were trained with, "" when
unknown) and payload_sha256 over all of it (tensors in canonical order, config,
index, scheme, tokenizer hash), so a changed config is as detectable as a flipped
weight. Version 1 files (hash over tensors only, no tokenizer hash) still load.

    save_artifact(path, state, cfg, tokenizer_sha256)   # checks, then writes atomically
    state, cfg = load_artifact(path)                    # float32 numpy arrays by name
    art = read_artifact(path)                           # .state .cfg .tokenizer_sha256
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared import quant
from shared.config import Hyperparameters
from shared.fsutil import atomic_write_bytes
from shared.shipped import code_bytes, code_files
from shared.spec import param_table

FORMAT_NAME = "parameter-golf-artifact"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
# Level 22 measured smallest on baseline-shaped int8 state (bench/compression.py); ~1-2 s is paid once.
ZSTD_LEVEL = 22
BYTE_LIMIT = 16_000_000  # decimal cap on code bytes + artifact bytes


class ArtifactError(ValueError):
    """An artifact file that cannot be trusted: truncated, corrupt, or of an unknown format."""


def payload_sha256(tensors: dict[str, np.ndarray], covered: dict[str, str] | None = None) -> str:
    """sha256 over the tensors in canonical order, then the covered metadata fields (version 2)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = np.ascontiguousarray(tensors[key])
        h.update(json.dumps([key, t.dtype.str, list(t.shape)]).encode())
        h.update(t.tobytes())
    for key in sorted(covered or {}):
        h.update(json.dumps([key, covered[key]]).encode())
    return h.hexdigest()


HASHED_METADATA = ("config", "quant_scheme", "tensors", "tokenizer_sha256")


def check_finite(state: dict[str, np.ndarray], what: str) -> None:
    """FloatingPointError naming the first tensor holding NaN/inf."""
    for name in sorted(state):
        if not np.isfinite(state[name]).all():
            raise FloatingPointError(f"{what}: tensor {name} holds NaN/inf")


def check_matches_table(state: dict[str, np.ndarray], cfg: Hyperparameters) -> None:
    """The weights are exactly the parameter table's rows: an artifact missing one would fail only when scored."""
    shapes = {p.name: p.shape for p in param_table(cfg)}
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(f"weights do not match the parameter table: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in shapes.items():
        if tuple(np.shape(state[name])) != tuple(shape):
            raise ValueError(f"weight {name} has shape {tuple(np.shape(state[name]))}, the table says {tuple(shape)}")


def encode_artifact(state: dict[str, np.ndarray], cfg: Hyperparameters, tokenizer_sha256: str = "",
                    scheme: str = quant.DEFAULT_SCHEME, level: int = ZSTD_LEVEL) -> bytes:
    """Quantize and pack; FloatingPointError if a weight or a stored value (e.g. past fp16's 65,504) is not finite."""
    check_matches_table(state, cfg)
    check_finite(state, "weights")
    stores = {p.name: p.store for p in param_table(cfg)}
    tensors, index = quant.scheme(scheme).quantize(state, stores)
    check_finite({k: v.astype(np.float32) for k, v in tensors.items()}, "quantized weights (past fp16 range?)")
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "quant_scheme": scheme,
                "config": cfg.to_json(), "tensors": json.dumps(index, sort_keys=True),
                "tokenizer_sha256": tokenizer_sha256}
    metadata["payload_sha256"] = payload_sha256(tensors, {k: metadata[k] for k in HASHED_METADATA})
    raw = st_save(tensors, metadata=metadata)
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(raw)


def save_artifact(path: str | os.PathLike, state: dict[str, np.ndarray], cfg: Hyperparameters,
                  tokenizer_sha256: str = "") -> int:
    """Check, quantize, compress, write atomically (a failure keeps the previous file); returns the size."""
    blob = encode_artifact(state, cfg, tokenizer_sha256)
    atomic_write_bytes(path, blob)
    return len(blob)


@dataclass
class LoadedArtifact:
    state: dict[str, np.ndarray]
    cfg: Hyperparameters
    tokenizer_sha256: str
    quant_scheme: str


def load_artifact(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], Hyperparameters]:
    art = read_artifact(path)
    return art.state, art.cfg


def read_artifact(path: str | os.PathLike) -> LoadedArtifact:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"artifact {path} is a directory, not an artifact file")
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist")
    raw = _decompress(path)
    metadata = _read_metadata(path, raw)
    try:
        tensors = st_load(raw)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"artifact {path}: corrupt safetensors payload ({exc})") from None
    covered = {k: metadata.get(k, "") for k in HASHED_METADATA} if metadata["format_version"] != "1" else None
    if payload_sha256(tensors, covered) != metadata.get("payload_sha256"):
        raise ArtifactError(f"artifact {path}: payload sha256 does not match its metadata (corrupt file)")
    try:
        cfg = Hyperparameters.from_json(metadata["config"])
        state = quant.scheme(metadata["quant_scheme"]).dequantize(tensors, json.loads(metadata["tensors"]))
    except (ValueError, KeyError) as exc:  # a config this code rejects, an index naming absent tensors
        raise ArtifactError(f"artifact {path}: unusable contents ({exc})") from None
    return LoadedArtifact(state, cfg, metadata.get("tokenizer_sha256", ""), metadata["quant_scheme"])


def _decompress(path: Path) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(path.read_bytes())
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"artifact {path}: not a complete zstd stream, truncated or corrupt ({exc})") from None


def _read_metadata(path: Path, raw: bytes) -> dict[str, str]:
    try:
        (header_len,) = struct.unpack("<Q", raw[:8])
        metadata = json.loads(raw[8:8 + header_len]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError):
        raise ArtifactError(f"artifact {path}: no readable safetensors header") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ArtifactError(f"artifact {path}: metadata format {metadata.get('format')!r} is not {FORMAT_NAME!r}")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"artifact {path}: format version {metadata.get('format_version')!r} is not supported "
                            f"(this code reads versions {', '.join(READABLE_VERSIONS)})")
    for key in ("quant_scheme", "config", "tensors", "payload_sha256"):
        if key not in metadata:
            raise ArtifactError(f"artifact {path}: metadata lacks {key!r}")
    if metadata["quant_scheme"] not in quant.SCHEMES:
        raise ArtifactError(f"artifact {path}: quant scheme {metadata['quant_scheme']!r} is unknown to this code")
    return metadata


@dataclass(frozen=True)
class SizeReport:
    artifact_bytes: int
    code_bytes: int
    limit: int = BYTE_LIMIT

    @property
    def total_bytes(self) -> int:
        return self.artifact_bytes + self.code_bytes

    @property
    def over_limit(self) -> bool:
        return self.total_bytes > self.limit

    def line(self, path: str) -> str:
        return (f"artifact:{path} artifact_bytes:{self.artifact_bytes} code_bytes:{self.code_bytes} "
                f"total_bytes:{self.total_bytes} limit:{self.limit}")

    def check(self, path: str) -> None:
        if self.over_limit:
            raise ValueError(f"artifact {path}: {self.total_bytes} bytes (artifact {self.artifact_bytes} + code "
                             f"{self.code_bytes}) is over the {self.limit}-byte cap")


def size_report(artifact_path: str | os.PathLike, trainer_path: str | os.PathLike) -> SizeReport:
    return SizeReport(os.path.getsize(artifact_path), code_bytes(code_files(trainer_path)))
