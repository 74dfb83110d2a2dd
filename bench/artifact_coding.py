"""Artifact coders on one quantized model: file bytes of each COMPRESSOR, the ideal bytes of richer ANS models,
and the entropy coder's decode seconds.

    PRESET=record python bench/artifact_coding.py                      # record shapes, init + noise weights
    PRESET=tiny_record python bench/artifact_coding.py --checkpoint /tmp/ck300.safetensors   # trained weights

Weights: the checkpoint's (its EMA shadow when it has one), else the preset's initial weights plus Gaussian
noise (--noise, so zero-initialized projections are not free). They are quantized by the preset's scheme with
identity Hessians (round-to-nearest on GPTQ's grid; the integers' shape of distribution is what the coders
see, LQER off). Rows:
  file:<compressor>  bytes of the artifact file shared/artifact.pack writes (brotli-11, zstd-22, lzma-9e, and
                     entropy = per-tensor order-0 ANS in a zstd container), with lrzip -z (ZPAQ) on the
                     uncompressed safetensors where the binary is installed (reference only);
  ideal:<model>      the integer payload's empirical code length under a model (no stream overhead), plus its
                     tables at 2 bytes an entry: order0 per tensor (what entropy reaches), per-row histograms,
                     rows grouped by their scale (GROUPS quantile buckets a tensor), sign + magnitude, and the
                     previous row's value in the same column as context (what a row similarity sort would feed).
The non-integer tensors (scales, floats) are counted once, zstd-22, in every ideal row.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import artifact, quant  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.quant import coding  # noqa: E402
from shared.spec import init_params, param_table  # noqa: E402

COMPRESSORS = ("brotli", "zstd", "lzma", "entropy")
GROUPS = 8
TABLE_BYTES = 2  # a uint16 frequency per histogram entry, as coding.quantized_histogram stores them


def weights(cfg: Hyperparameters, checkpoint: str | None, noise: float) -> dict[str, np.ndarray]:
    if checkpoint:
        from shared.checkpoint import load_checkpoint
        live, _, meta, ema = load_checkpoint(checkpoint, cfg)
        print(f"weights:checkpoint {checkpoint} step:{meta['step']} {'ema' if ema is not None else 'live'}")
        return ema if ema is not None else live
    rng = np.random.default_rng(0)
    print(f"weights:init+noise std:{noise}")
    return {k: (v + noise * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init_params(cfg).items()}


def entropy_bits(q: np.ndarray) -> float:
    return coding.entropy_bits(q)


def _tables(q: np.ndarray) -> int:
    return int(q.max()) - int(q.min()) + 1 if q.size else 0


def ideal_bytes(ints: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> dict[str, float]:
    """Code length (bytes) of every integer tensor under each model, tables included."""
    out = dict.fromkeys(("order0", "per_row", "scale_groups", "sign_magnitude", "prev_row_context"), 0.0)
    for key, q in ints.items():
        q = q.astype(np.int64)
        out["order0"] += entropy_bits(q) / 8 + TABLE_BYTES * _tables(q)
        rows = q.reshape(q.shape[0], -1) if q.ndim > 1 else q.reshape(1, -1)
        out["per_row"] += sum(entropy_bits(r) / 8 + TABLE_BYTES * _tables(r) for r in rows)
        scale = scales.get(key)
        if scale is not None and scale.size == rows.shape[0] and rows.shape[0] >= GROUPS:
            edges = np.quantile(scale.astype(np.float64), np.linspace(0, 1, GROUPS + 1)[1:-1])
            group = np.searchsorted(edges, scale.astype(np.float64))
            for g in np.unique(group):
                part = rows[group == g]
                out["scale_groups"] += entropy_bits(part) / 8 + TABLE_BYTES * _tables(part)
        else:
            out["scale_groups"] += entropy_bits(q) / 8 + TABLE_BYTES * _tables(q)
        mag = np.abs(q)
        out["sign_magnitude"] += (entropy_bits(mag) + np.count_nonzero(q)) / 8 + TABLE_BYTES * _tables(mag)
        if rows.shape[0] > 1:
            ctx = np.clip(rows[:-1], -3, 3)  # 7 context values: the previous row's small integers, the rest pooled
            cond = coding.conditional_entropy_bits(rows[1:], ctx) + entropy_bits(rows[0])
            out["prev_row_context"] += cond / 8 + TABLE_BYTES * 8 * _tables(q)
        else:
            out["prev_row_context"] += entropy_bits(q) / 8 + TABLE_BYTES * _tables(q)
    return out


def lrzip_bytes(raw: bytes) -> int | None:
    if shutil.which("lrzip") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "a.safetensors"
        src.write_bytes(raw)
        subprocess.run(["lrzip", "-q", "-z", str(src)], check=True, capture_output=True)
        return (Path(tmp) / "a.safetensors.lrz").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--noise", type=float, default=0.02, help="std of the noise added to the initial weights")
    args = ap.parse_args()
    cfg = dataclasses.replace(Hyperparameters.from_env(os.environ), lqer_enabled=False)
    state = weights(cfg, args.checkpoint, args.noise)
    n_params = sum(v.size for v in state.values())
    scheme = quant.BY_KNOB[cfg.quant]
    stores = {p.name: p.store for p in param_table(cfg)}
    tensors, index = quant.scheme(scheme).quantize(state, stores, cfg, None, {})
    ints = {k[2:]: v for k, v in tensors.items() if v.dtype == np.int8 and k.startswith("q:")}
    scales = {k[6:]: v for k, v in tensors.items() if k.startswith("scale:")}
    print(f"preset:{os.environ.get('PRESET', 'baseline')} params:{n_params} scheme:{scheme} "
          f"int_tensors:{len(ints)} int_values:{sum(v.size for v in ints.values())}")
    files = {}
    for comp in COMPRESSORS:
        t0 = time.perf_counter()
        files[comp] = artifact.pack(tensors, index, cfg, scheme, comp)
        print(f"file:{comp} bytes:{len(files[comp])} encode_s:{time.perf_counter() - t0:.2f}")
    raw = artifact.pack(tensors, index, cfg, scheme, "zstd", level=1)
    lrz = lrzip_bytes(raw)
    print(f"file:lrzip-zpaq bytes:{lrz if lrz is not None else 'not installed'}")
    coded, code_index = artifact.entropy_code(tensors)
    t0 = time.perf_counter()
    artifact.entropy_decode(coded, code_index)
    print(f"entropy_decode_s:{time.perf_counter() - t0:.2f} (one process, {sum(v.size for v in ints.values())} ints)")
    rest = {k: v for k, v in tensors.items() if v.dtype != np.int8}
    rest_bytes = len(artifact.pack(rest, {}, cfg, scheme, "zstd"))
    for model, b in ideal_bytes(ints, scales).items():
        total = b + rest_bytes
        print(f"ideal:{model} bytes:{total:.0f} vs_brotli:{total / len(files['brotli']) - 1:+.2%} "
              f"vs_entropy_file:{total / len(files['entropy']) - 1:+.2%}")


if __name__ == "__main__":
    main()
