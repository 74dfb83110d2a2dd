"""Artifact compression on a random baseline-shaped state: our zstd levels against int8+zlib-9.

    python bench/compression.py [--levels 3 9 15 19 22]
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zstandard  # noqa: E402
from safetensors.numpy import save as st_save  # noqa: E402

from shared.artifact import encode_artifact  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.quant.int8 import quantize  # noqa: E402
from shared.spec import init_params, param_table  # noqa: E402


def random_state(cfg: Hyperparameters):
    """Baseline shapes with non-zero random values everywhere (zero-init outputs would flatter zstd)."""
    import numpy as np
    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in init_params(cfg).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", type=int, nargs="+", default=[3, 9, 15, 19, 22])
    args = ap.parse_args()
    cfg = Hyperparameters()
    state = random_state(cfg)
    print(f"params:{sum(v.size for v in state.values())}")
    tensors, _ = quantize(state, {p.name: p.store for p in param_table(cfg)})
    raw = st_save(tensors)
    t0 = time.perf_counter()
    z = zlib.compress(raw, 9)
    print(f"int8+zlib-9 bytes:{len(z)} seconds:{time.perf_counter() - t0:.2f}")
    for level in args.levels:
        t0 = time.perf_counter()
        blob = encode_artifact(state, cfg, level=level)
        t1 = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(blob)
        print(f"int8+zstd-{level} bytes:{len(blob)} encode_seconds:{t1 - t0:.2f} "
              f"decode_seconds:{time.perf_counter() - t1:.2f} vs_zlib9:{len(blob) / len(z):.4f}")


if __name__ == "__main__":
    main()
