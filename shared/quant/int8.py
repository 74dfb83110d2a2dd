"""The official baseline's int8 scheme, in numpy so both frameworks write and read identical bits.

- float tensors with <= 65,536 elements are kept: 'control' and 'gate' tensors in fp32, the rest in fp16;
- matrices: per row, clip |w| at its 99.99984th percentile, scale = max(clip/127, 1/127)
  stored in fp16, q = round(w/scale) in [-127, 127];
- other large tensors: one fp32 scale per tensor.
"""
from __future__ import annotations

import numpy as np

from shared.quant.tensors import dequantize  # noqa: F401  (the scheme's reader: the one loop)

NAME = "int8_per_row_fp16_scale_v1"
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_Q = 99.99984 / 100.0


def quantize(state: dict[str, np.ndarray], stores: dict[str, str], cfg=None, hessians=None,
             timings=None) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """cfg, hessians and timings are unused (the scheme interface passes them to every scheme)."""
    tensors, index = {}, {}
    for name in sorted(state):
        t = np.ascontiguousarray(state[name], dtype=np.float32)
        entry = {"shape": list(t.shape)}
        if t.size <= KEEP_FLOAT_MAX_NUMEL:
            keep = np.float32 if stores[name] in ("control", "gate") else np.float16
            tensors[f"float:{name}"] = t.astype(keep)
            entry["kind"] = "float"
        elif t.ndim == 2:
            tensors[f"q:{name}"], tensors[f"scale:{name}"] = quantize_rows(t)
            entry["kind"] = "int8_per_row"
        else:
            tensors[f"q:{name}"], tensors[f"scale:{name}"] = quantize_tensor(t)
            entry["kind"] = "int8_per_tensor"
        index[name] = entry
    return tensors, index


def quantize_rows(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = np.quantile(np.abs(t), CLIP_Q, axis=1).astype(np.float32)  # (rows,)
    clipped = np.clip(t, -clip[:, None], clip[:, None])
    scale = np.maximum(clip / np.float32(127.0), np.float32(1.0 / 127.0))
    q = np.clip(np.round(clipped / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float16)


def quantize_tensor(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = np.float32(np.quantile(np.abs(t).ravel(), CLIP_Q))
    scale = np.float32(clip / 127.0 if clip > 0 else 1.0)
    q = np.clip(np.round(np.clip(t, -clip, clip) / scale), -127, 127).astype(np.int8)
    return q, np.array(scale, dtype=np.float32)
