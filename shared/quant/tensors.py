"""The one dequantize loop: every scheme's tensors back to a float32 state, one reader per stored tensor kind.

    state = dequantize(tensors, index)   # index: name -> {"kind", "shape", ...} as a scheme's quantize wrote it

W_hat = q * s is formed in float32, as every reader of an artifact computes it (both trainers, every tool), so
the same artifact gives the same weights everywhere; an LQER correction is added where the index has one.
"""
from __future__ import annotations

import numpy as np

LQER_KEYS = ("q_a", "s_a", "q_b", "s_b")


def lqer_correction(q_a: np.ndarray, s_a: np.ndarray, q_b: np.ndarray, s_b: np.ndarray) -> np.ndarray:
    """float32 A_hat B_hat, summed over the rank one outer product at a time in order (no BLAS: the same bits
    on any machine)."""
    a = q_a.astype(np.float32) * s_a.astype(np.float32)[0]
    group = q_b.size // s_b.size
    b = (q_b.astype(np.float32).reshape(-1, group) * s_b.astype(np.float32)[:, None]).reshape(q_b.shape)
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.float32)
    for k in range(a.shape[1]):
        out += np.outer(a[:, k], b[k])
    return out


def per_row(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Integers times one float scale per row."""
    return tensors[f"q:{name}"].astype(np.float32) * tensors[f"scale:{name}"].astype(np.float32)[:, None]


def _per_row_lqer(tensors: dict[str, np.ndarray], name: str, entry: dict) -> np.ndarray:
    w = per_row(tensors, name)
    return w + lqer_correction(*(tensors[f"lqer_{k}:{name}"] for k in LQER_KEYS)) if "lqer" in entry else w


READERS = {  # stored tensor kind -> reader (tensors, name, index entry) -> float32 array
    "float": lambda tensors, name, entry: tensors[f"float:{name}"].astype(np.float32),
    "int8_per_row": lambda tensors, name, entry: per_row(tensors, name),  # shared/quant/int8.py
    "int8_per_tensor": lambda tensors, name, entry: (tensors[f"q:{name}"].astype(np.float32)
                                                     * np.float32(tensors[f"scale:{name}"])),
    "int_per_row": _per_row_lqer,  # shared/quant/gptq.py: any width, LQER optional
}


def dequantize(tensors: dict[str, np.ndarray], index: dict[str, dict]) -> dict[str, np.ndarray]:
    out = {}
    for name, entry in index.items():
        if entry["kind"] not in READERS:
            raise ValueError(f"tensor {name}: unknown kind {entry['kind']!r} (this code reads {sorted(READERS)})")
        out[name] = READERS[entry["kind"]](tensors, name, entry).reshape(entry["shape"])
    return out
