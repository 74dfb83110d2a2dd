"""The one artifact format: int8 weights in safetensors, zstandard-compressed.

File = one zstd frame (with content checksum) holding a safetensors buffer:
  q:{name}      int8 (rows, cols)  per-row quantized matrix
  scale:{name}  float16 (rows,)    its per-row scales
  float:{name}  float16 | float32  tensors kept as floats
metadata: format, format_version, quant_scheme, config (JSON), tensors (JSON:
kind, shape, dtype per name) and payload_sha256 (over the tensors, canonical order).

Quantization is the official baseline's int8 scheme, done here in numpy so both
frameworks produce and read identical bits:
- float tensors with <= 65,536 elements are kept: control tensors in fp32, the
  rest in fp16;
- matrices: per row, clip |w| at its 99.99984th percentile, scale =
  max(clip/127, 1/127) stored in fp16, q = round(w/scale) in [-127, 127];
- other large tensors: one fp32 scale per tensor.

    save_artifact(path, state, cfg)      # atomic
    state, cfg = load_artifact(path)     # float32 numpy arrays by name
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

from shared.config import Hyperparameters
from shared.fsutil import atomic_write_bytes
from shared.model_spec import CONTROL_TENSOR_NAME_PATTERNS

FORMAT_NAME = "parameter-golf-artifact"
FORMAT_VERSION = 1
QUANT_SCHEME = "int8_per_row_fp16_scale_v1"
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_Q = 99.99984 / 100.0
# Level 22 measured smallest on baseline-shaped int8 state (bench/compression.py); ~1-2 s is paid once.
ZSTD_LEVEL = 22
BYTE_LIMIT = 16_000_000  # decimal cap on code bytes + artifact bytes
# Every source file the CUDA trainer needs at run time (what ships and counts as code).
RUNTIME_SHARED_MODULES = ("__init__.py", "artifact.py", "bpb.py", "config.py", "data.py", "fsutil.py",
                          "model_spec.py", "runlog.py", "checkpoint.py", "tokenizer.py", "training.py")


class ArtifactError(ValueError):
    """An artifact file that cannot be trusted: truncated, corrupt, or of an unknown format."""


def quantize(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    tensors, index = {}, {}
    for name in sorted(state):
        t = np.ascontiguousarray(state[name], dtype=np.float32)
        entry = {"shape": list(t.shape)}
        if t.size <= KEEP_FLOAT_MAX_NUMEL:
            keep = np.float32 if any(p in name for p in CONTROL_TENSOR_NAME_PATTERNS) else np.float16
            tensors[f"float:{name}"] = t.astype(keep)
            entry["kind"] = "float"
        elif t.ndim == 2:
            tensors[f"q:{name}"], tensors[f"scale:{name}"] = _quantize_rows(t)
            entry["kind"] = "int8_per_row"
        else:
            tensors[f"q:{name}"], tensors[f"scale:{name}"] = _quantize_tensor(t)
            entry["kind"] = "int8_per_tensor"
        index[name] = entry
    return tensors, index


def _quantize_rows(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = np.quantile(np.abs(t), CLIP_Q, axis=1).astype(np.float32)  # (rows,)
    clipped = np.clip(t, -clip[:, None], clip[:, None])
    scale = np.maximum(clip / np.float32(127.0), np.float32(1.0 / 127.0))
    q = np.clip(np.round(clipped / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float16)


def _quantize_tensor(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = np.float32(np.quantile(np.abs(t).ravel(), CLIP_Q))
    scale = np.float32(clip / 127.0 if clip > 0 else 1.0)
    q = np.clip(np.round(np.clip(t, -clip, clip) / scale), -127, 127).astype(np.int8)
    return q, np.array(scale, dtype=np.float32)


def dequantize(tensors: dict[str, np.ndarray], index: dict[str, dict]) -> dict[str, np.ndarray]:
    out = {}
    for name, entry in index.items():
        if entry["kind"] == "float":
            t = tensors[f"float:{name}"].astype(np.float32)
        elif entry["kind"] == "int8_per_row":
            t = tensors[f"q:{name}"].astype(np.float32) * tensors[f"scale:{name}"].astype(np.float32)[:, None]
        else:
            t = tensors[f"q:{name}"].astype(np.float32) * np.float32(tensors[f"scale:{name}"])
        out[name] = t.reshape(entry["shape"])
    return out


def payload_sha256(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = np.ascontiguousarray(tensors[key])
        h.update(json.dumps([key, t.dtype.str, list(t.shape)]).encode())
        h.update(t.tobytes())
    return h.hexdigest()


def encode_artifact(state: dict[str, np.ndarray], cfg: Hyperparameters, level: int = ZSTD_LEVEL) -> bytes:
    tensors, index = quantize(state)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "quant_scheme": QUANT_SCHEME,
                "config": cfg.to_json(), "tensors": json.dumps(index, sort_keys=True),
                "payload_sha256": payload_sha256(tensors)}
    raw = st_save(tensors, metadata=metadata)
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(raw)


def save_artifact(path: str | os.PathLike, state: dict[str, np.ndarray], cfg: Hyperparameters) -> int:
    """Quantize, compress and write atomically; returns the file's size in bytes."""
    blob = encode_artifact(state, cfg)
    atomic_write_bytes(path, blob)
    return len(blob)


def load_artifact(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], Hyperparameters]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist")
    raw = _decompress(path)
    metadata = _read_metadata(path, raw)
    try:
        tensors = st_load(raw)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"artifact {path}: corrupt safetensors payload ({exc})") from None
    if payload_sha256(tensors) != metadata.get("payload_sha256"):
        raise ArtifactError(f"artifact {path}: payload sha256 does not match its metadata (corrupt file)")
    cfg = Hyperparameters.from_json(metadata["config"])
    return dequantize(tensors, json.loads(metadata["tensors"])), cfg


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
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(f"artifact {path}: format version {metadata.get('format_version')!r} is not supported "
                            f"(this code reads version {FORMAT_VERSION})")
    for key in ("quant_scheme", "config", "tensors", "payload_sha256"):
        if key not in metadata:
            raise ArtifactError(f"artifact {path}: metadata lacks {key!r}")
    if metadata["quant_scheme"] != QUANT_SCHEME:
        raise ArtifactError(f"artifact {path}: quant scheme {metadata['quant_scheme']!r} is not {QUANT_SCHEME!r}")
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


def code_files(trainer_path: str | os.PathLike) -> list[Path]:
    """The CUDA trainer plus the shared modules it runs with (the code that ships).

    Inside a bundled train_gpt.py (shared/bundle.py) every module lives in that one file.
    """
    if globals().get("__bundled__"):
        return [Path(trainer_path).resolve()]
    shared_dir = Path(__file__).resolve().parent
    return [Path(trainer_path).resolve()] + [shared_dir / m for m in RUNTIME_SHARED_MODULES]


def code_bytes(files: list[Path]) -> int:
    return sum(len(f.read_text(encoding="utf-8").encode("utf-8")) for f in files)


def size_report(artifact_path: str | os.PathLike, trainer_path: str | os.PathLike) -> SizeReport:
    return SizeReport(os.path.getsize(artifact_path), code_bytes(code_files(trainer_path)))
