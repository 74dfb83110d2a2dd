"""The one artifact container: quantized tensors in safetensors, compressed.

File = one compressed safetensors buffer. Its tensors are what the quant scheme wrote (shared/quant/), and
with COMPRESSOR=entropy every integer tensor is replaced by its ANS words and its quantized histogram
(shared/quant/coding.py). Its metadata holds: format, format_version, quant_scheme, compressor, coding (JSON:
lo and shape of each entropy-coded tensor), config (JSON), tensors (the scheme's JSON index),
tokenizer_sha256 (the .model file the weights were trained with, "" when unknown) and payload_sha256 over
all of it (tensors in canonical order, probability tables included, then config, index, scheme, tokenizer
hash, compressor and coding), so a changed config is as detectable as a flipped weight.

The compression is told by the file's first bytes: a zstd frame (level 22, with content checksum; also the
container of COMPRESSOR=entropy, whose ANS words zstd leaves alone while it squeezes scales and metadata), an
xz stream (lzma preset 9, CRC64), or b"PGBR" then a brotli stream (quality 11, window 2^24). Version 1 (hash
over tensors only, no tokenizer hash) and version 2 (zstd, no compressor/coding fields) files still load.

    save_artifact(path, state, cfg, tokenizer_sha256, hessians)  # checks, then writes atomically
    state, cfg = load_artifact(path)                              # float32 numpy arrays by name
    art = read_artifact(path)                                     # .state .cfg .tokenizer_sha256
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from safetensors.numpy import load as st_load

from shared import quant
from shared.quant import coding
from shared.config import Hyperparameters
from shared.fsutil import atomic_write_bytes
from shared.shipped import shipped_code_bytes
from shared.spec import param_table

FORMAT_NAME = "parameter-golf-artifact"
FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")
# Level 22 measured smallest on baseline-shaped int8 state (bench/compression.py); ~1-2 s is paid once.
ZSTD_LEVEL = 22
LZMA_PRESET = 9  # xz's strongest standard preset (stdlib lzma)
BROTLI_QUALITY, BROTLI_LGWIN = 11, 24  # the record's fallback compressor settings (RECORD_STACK.md §6.5)
ZSTD_MAGIC, XZ_MAGIC, BROTLI_TAG = b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00", b"PGBR"
CONTAINER = {"zstd": "zstd", "entropy": "zstd", "lzma": "lzma", "brotli": "brotli"}  # COMPRESSOR -> outer layer
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


HASHED_METADATA = ("config", "quant_scheme", "tensors", "tokenizer_sha256")  # version 2
HASHED_METADATA_V3 = HASHED_METADATA + ("compressor", "coding")


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
                    scheme: str | None = None, level: int = ZSTD_LEVEL, hessians: dict[str, np.ndarray] | None = None,
                    compressor: str | None = None, timings: dict[str, float] | None = None, solver=None) -> bytes:
    """Quantize (scheme default: QUANT's), code and pack (compressor default: COMPRESSOR's); FloatingPointError if
    a weight or a stored value (e.g. past fp16's 65,504) is not finite. hessians: name -> H for GPTQ (absent ->
    identity). timings, if given, receives the seconds of each phase (the scheme's, then 'coding'). solver: GPTQ's
    column solve (GPTQ_SOLVER; shared/quant/gptq.numpy_solver's signature), None: the numpy reference."""
    scheme = quant.BY_KNOB[cfg.quant] if scheme is None else scheme
    compressor = cfg.compressor if compressor is None else compressor
    check_matches_table(state, cfg)
    check_finite(state, "weights")
    stores = {p.name: p.store for p in param_table(cfg)}
    timings = {} if timings is None else timings
    extra = {} if solver is None else {"solver": solver}  # only the gptq scheme has a solve to swap
    tensors, index = quant.scheme(scheme).quantize(state, stores, cfg, hessians, timings, **extra)
    check_finite({k: v.astype(np.float32) for k, v in tensors.items()}, "quantized weights (past fp16 range?)")
    t0 = time.perf_counter()
    blob = pack(tensors, index, cfg, scheme, compressor, tokenizer_sha256, level)
    timings["coding"] = time.perf_counter() - t0
    return blob


def pack(tensors: dict[str, np.ndarray], index: dict, cfg: Hyperparameters, scheme: str, compressor: str,
         tokenizer_sha256: str = "", level: int = ZSTD_LEVEL) -> bytes:
    """A scheme's output -> the file's bytes: entropy coding (COMPRESSOR=entropy), metadata and hash, compression."""
    tensors, code_index = entropy_code(tensors) if compressor == "entropy" else (tensors, {})
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "quant_scheme": scheme,
                "compressor": compressor, "coding": json.dumps(code_index, sort_keys=True),
                "config": cfg.to_json(), "tensors": json.dumps(index, sort_keys=True),
                "tokenizer_sha256": tokenizer_sha256}
    metadata["payload_sha256"] = payload_sha256(tensors, {k: metadata[k] for k in HASHED_METADATA_V3})
    return compress(safetensors_bytes(tensors, metadata), compressor, level)


def entropy_code(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Every int8 tensor -> 'ans:KEY' (uint32 words) + 'freq:KEY' (uint16 table); the rest unchanged."""
    out, index = {}, {}
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype != np.int8:
            out[key] = t
            continue
        out[f"freq:{key}"], lo, out[f"ans:{key}"] = coding.encode(t)
        index[key] = {"lo": lo, "shape": list(t.shape)}
    return out, index


def entropy_decode(tensors: dict[str, np.ndarray], index: dict[str, dict]) -> dict[str, np.ndarray]:
    """The inverse of entropy_code; ValueError naming the tensor when a stream does not decode."""
    out = {k: v for k, v in tensors.items() if not k.startswith(("ans:", "freq:"))}
    for key, entry in index.items():
        n = int(np.prod(entry["shape"], dtype=np.int64))
        try:
            q = coding.decode(tensors[f"ans:{key}"], tensors[f"freq:{key}"], int(entry["lo"]), n)
        except ValueError as exc:
            raise ValueError(f"tensor {key}: {exc}") from None
        if q.size and (q.min() < -128 or q.max() > 127):
            raise ValueError(f"tensor {key}: decoded integers outside int8")
        out[key] = q.astype(np.int8).reshape(entry["shape"])
    return out


ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int8": "I8",
             "uint32": "U32", "uint16": "U16", "uint8": "U8"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors buffer with everything in sorted order, so equal inputs give equal bytes. (The safetensors
    package writes __metadata__ from a hash map, in an order that changes from call to call.) The layout is the
    format's: u64 LE header length, the JSON header padded with spaces to 8 bytes, the tensors' bytes in header
    order, little-endian, C order."""
    header, chunks, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for key in sorted(tensors):
        t = np.ascontiguousarray(tensors[key])
        data = t.astype(t.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": ST_DTYPES[t.dtype.name], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def compress(raw: bytes, compressor: str, level: int = ZSTD_LEVEL) -> bytes:
    container = CONTAINER.get(compressor)
    if container == "zstd":
        return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(raw)
    if container == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=LZMA_PRESET)
    if container == "brotli":
        import brotli  # only COMPRESSOR=brotli needs the package

        return BROTLI_TAG + brotli.compress(raw, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)
    raise ValueError(f"COMPRESSOR={compressor!r} must be one of {sorted(CONTAINER)}")


def save_artifact(path: str | os.PathLike, state: dict[str, np.ndarray], cfg: Hyperparameters,
                  tokenizer_sha256: str = "", hessians: dict[str, np.ndarray] | None = None,
                  timings: dict[str, float] | None = None, solver=None) -> int:
    """Check, quantize, compress, write atomically (a failure keeps the previous file); returns the size."""
    blob = encode_artifact(state, cfg, tokenizer_sha256, hessians=hessians, timings=timings, solver=solver)
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
    container, raw = _decompress(path)
    metadata = _read_metadata(path, raw, container)
    try:
        tensors = st_load(raw)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"artifact {path}: corrupt safetensors payload ({exc})") from None
    version = metadata["format_version"]
    covered = None if version == "1" else HASHED_METADATA if version == "2" else HASHED_METADATA_V3
    covered = {k: metadata.get(k, "") for k in covered} if covered else None
    if payload_sha256(tensors, covered) != metadata.get("payload_sha256"):
        raise ArtifactError(f"artifact {path}: payload sha256 does not match its metadata (corrupt file)")
    try:
        cfg = Hyperparameters.from_json(metadata["config"])
        if version == "3":
            tensors = entropy_decode(tensors, json.loads(metadata["coding"]))
        state = quant.scheme(metadata["quant_scheme"]).dequantize(tensors, json.loads(metadata["tensors"]))
    except (ValueError, KeyError) as exc:  # a config this code rejects, an index naming absent tensors
        raise ArtifactError(f"artifact {path}: unusable contents ({exc})") from None
    return LoadedArtifact(state, cfg, metadata.get("tokenizer_sha256", ""), metadata["quant_scheme"])


def _decompress(path: Path) -> tuple[str, bytes]:
    """(container, the safetensors bytes), the container told by the file's first bytes."""
    data = path.read_bytes()
    try:
        if data.startswith(ZSTD_MAGIC) or not data:
            return "zstd", zstandard.ZstdDecompressor().decompress(data)
        if data.startswith(XZ_MAGIC):
            return "lzma", lzma.decompress(data, format=lzma.FORMAT_XZ)
        if data.startswith(BROTLI_TAG):
            import brotli

            return "brotli", brotli.decompress(data[len(BROTLI_TAG):])
    except (zstandard.ZstdError, lzma.LZMAError, EOFError) as exc:
        raise ArtifactError(f"artifact {path}: not a complete compressed stream, truncated or corrupt "
                            f"({exc})") from None
    except Exception as exc:  # brotli.error, without importing brotli where it is not installed
        if type(exc).__module__.startswith(("brotli", "_brotli")):
            raise ArtifactError(f"artifact {path}: not a complete brotli stream, truncated or corrupt "
                                f"({exc})") from None
        raise
    raise ArtifactError(f"artifact {path}: starts with {data[:4]!r}, not a zstd, xz or brotli artifact "
                        f"(truncated or corrupt, or not an artifact)")


def _read_metadata(path: Path, raw: bytes, container: str) -> dict[str, str]:
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
    needed = ("quant_scheme", "config", "tensors", "payload_sha256")
    for key in needed + (("compressor", "coding") if metadata["format_version"] == "3" else ()):
        if key not in metadata:
            raise ArtifactError(f"artifact {path}: metadata lacks {key!r}")
    if metadata["quant_scheme"] not in quant.SCHEMES:
        raise ArtifactError(f"artifact {path}: quant scheme {metadata['quant_scheme']!r} is unknown to this code")
    want = CONTAINER.get(metadata.get("compressor", "zstd"))
    if want != container:
        raise ArtifactError(f"artifact {path}: metadata says compressor {metadata.get('compressor')!r} but the file "
                            f"is a {container} stream")
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
                             f"{self.code_bytes}) is {self.total_bytes - self.limit} bytes over the {self.limit}-byte cap")


def cap_detail(code: int, artifact_bytes: int) -> str:
    """`code C + artifact A = T <= CAP (M under)`, or `> CAP (N over)`: the margin either way, in bytes."""
    total = code + artifact_bytes
    if total <= BYTE_LIMIT:
        return f"code {code} + artifact {artifact_bytes} = {total} <= {BYTE_LIMIT} ({BYTE_LIMIT - total} under)"
    return f"code {code} + artifact {artifact_bytes} = {total} > {BYTE_LIMIT} ({total - BYTE_LIMIT} over)"


def size_report(artifact_path: str | os.PathLike, trainer_path: str | os.PathLike) -> SizeReport:
    """The artifact's bytes and the code that ships with it (the compressed bundle: shared/shipped.py)."""
    return SizeReport(os.path.getsize(artifact_path), shipped_code_bytes(trainer_path))
