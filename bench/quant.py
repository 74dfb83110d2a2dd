"""Artifact size and speed of each quantizer x compressor on a record-shaped state, in numpy on this CPU.

    python bench/quant.py                       # PRESET=record shapes (35.9M parameters)
    PRESET=mac python bench/quant.py --fast     # smaller, and skips brotli
    python bench/quant.py --gptq-only --solver torch --device cuda --compare   # GPTQ_SOLVER=torch on a GPU

The state is synthetic but shaped like trained weights: every matrix drawn from a Student-t (5 degrees of
freedom, heavier tails than a Gaussian, as trained weights have) scaled to std 1/sqrt(cols), small tensors
around their init; Hessians H = X^T X of 4 x cols synthetic activations with log-normal channel scales (the
uneven per-channel energy GPTQ exploits). Prints: artifact bytes and bits per parameter for int8 + zstd and for
GPTQ (with and without LQER) under each compressor, the order-0 entropy limit of the integers, whether a
context model (previous integer's magnitude, row-scale quartile) would pay, and the seconds of each phase.
lrzip (the record's ZPAQ back end, RECORD_STACK.md §6.5) is measured only when the binary is on PATH.
--gptq-only: only GPTQ (with --solver on --device; torch_gptq.py for torch) and LQER, packed once with the
record's coder (entropy); --compare also runs the numpy reference and counts the integers that differ.
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

from shared import artifact  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.quant import coding, gptq, int8  # noqa: E402
from shared.spec import count_params, init_params, param_table  # noqa: E402


def synthetic_state(cfg: Hyperparameters, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = init_params(cfg, seed)
    for p in param_table(cfg):
        if p.store == "weight" and len(p.shape) == 2:
            t = rng.standard_t(5, size=p.shape) / np.sqrt(5 / 3)  # unit variance
            state[p.name] = (t / np.sqrt(p.shape[1])).astype(np.float32)
        elif p.store == "gate":
            state[p.name] = (0.1 * rng.standard_normal(p.shape)).astype(np.float32)
    return state


def synthetic_hessians(cfg: Hyperparameters, seed: int = 1) -> dict[str, np.ndarray]:
    """One H per input width and input kind (as c_q/c_k/c_v share theirs), float32 like the trainers'."""
    rng = np.random.default_rng(seed)
    out, cache = {}, {}
    shapes = {p.name: p.shape for p in param_table(cfg)}
    for name in gptq.targets(cfg):
        cols = shapes[name][1]
        key = (cols, name.split(".")[-2], name.split(".")[1] if name.startswith("blocks.") else "")
        if key not in cache:
            x = rng.standard_normal((4 * cols, cols)) * np.exp(rng.normal(0, 0.7, size=cols))
            cache[key] = (x.T @ x).astype(np.float32)
        out[name] = cache[key]
    return out


def context_report(tensors: dict[str, np.ndarray]) -> str:
    """Order-0 bits vs conditional bits given |previous integer| (0,1,2,3+) and given the row scale's quartile."""
    h0 = h_prev = h_scale = 0.0
    n_tensors = 0
    for key, q in tensors.items():
        if not key.startswith("q:") or q.ndim != 2 or f"scale:{key[2:]}" not in tensors:
            continue
        n_tensors += 1
        q64 = q.astype(np.int64)
        prev = np.zeros_like(q64)
        prev[:, 1:] = np.minimum(np.abs(q64[:, :-1]), 3)
        s = tensors[f"scale:{key[2:]}"].astype(np.float64)
        bucket = np.searchsorted(np.quantile(s, [0.25, 0.5, 0.75]), s)[:, None] * np.ones_like(q64)
        h0 += coding.entropy_bits(q64)
        h_prev += coding.conditional_entropy_bits(q64, prev)
        h_scale += coding.conditional_entropy_bits(q64, bucket)
    table = 3 * n_tensors * 2 * 64  # three more uint16 tables of ~64 values per tensor
    return (f"context: order0 {h0 / 8:,.0f} B | given |prev| {h_prev / 8:,.0f} B (saves {(h0 - h_prev) / 8:,.0f})"
            f" | given row-scale quartile {h_scale / 8:,.0f} B (saves {(h0 - h_scale) / 8:,.0f}); "
            f"extra tables ~{table:,} B")


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def decode_seconds(blob: bytes) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.art"
        path.write_bytes(blob)
        return timed(artifact.read_artifact, path)[1]


def row(label: str, blob: bytes, n_params: int, enc: float, dec: float) -> str:
    return (f"{label:<28} {len(blob):>12,} B {8 * len(blob) / n_params:6.3f} bits/param  enc {enc:6.2f}s  "
            f"dec {dec:6.2f}s")


def lrzip_line(tensors: dict[str, np.ndarray], n_params: int) -> str:
    if shutil.which("lrzip") is None:
        return "lrzip: not installed here (`which lrzip` finds nothing); the record's ZPAQ back end is not measured"
    raw = b"".join(np.ascontiguousarray(tensors[k]).tobytes() for k in sorted(tensors))
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "raw"
        src.write_bytes(raw)
        t0 = time.perf_counter()
        subprocess.run(["lrzip", "-z", "-L", "9", "-q", str(src)], check=True)
        size = (Path(d) / "raw.lrz").stat().st_size
    return (f"lrzip -z -L 9 (raw tensors)  {size:>12,} B {8 * size / n_params:6.3f} bits/param  "
            f"enc {time.perf_counter() - t0:6.2f}s")


def make_solver(name: str, device: str):
    """GPTQ_SOLVER's solve: the numpy reference, or torch_gptq.py on `device` (imported only then)."""
    if name == "numpy":
        if device != "cpu":
            raise ValueError("--solver numpy runs on the CPU: drop --device or use --solver torch")
        return gptq.numpy_solver
    import torch
    import torch_gptq

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch finds no CUDA device here")
    return torch_gptq.TorchSolver(torch.device(device))


def gptq_only(cfg, state, hessians, stores, n: int, solver, compare: bool) -> None:
    """GPTQ (+ LQER, as the record) with `solver`, twice for a device solver (the first run pays the GPU's
    start-up), then one artifact with the record's coder; --compare: the numpy reference's integers too."""
    runs = 2 if solver is not gptq.numpy_solver else 1
    for run in range(runs):
        timings = {}
        tensors, index = gptq.quantize(state, stores, cfg, hessians, timings, solver=solver)
        print(f"gptq solver:{getattr(solver, 'name', 'numpy')} run {run + 1}: gptq {timings['gptq']:.2f}s "
              f"lqer {timings['lqer']:.2f}s")
    blob, enc = timed(artifact.pack, tensors, index, cfg, gptq.NAME, cfg.compressor)
    print(row(f"gptq + lqer + {cfg.compressor}", blob, n, enc, decode_seconds(blob)))
    if compare:
        timings = {}
        want, _ = gptq.quantize(state, stores, cfg, hessians, timings)
        ints = [k for k in want if k.startswith("q:")]
        diff = sum(int((want[k] != tensors[k]).sum()) for k in ints)
        size = len(artifact.pack(want, index, cfg, gptq.NAME, cfg.compressor))
        print(f"numpy reference: gptq {timings['gptq']:.2f}s; integers differing from it: {diff:,} of "
              f"{sum(want[k].size for k in ints):,}; its artifact {size:,} B")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="skip brotli and lzma (the slow compressors)")
    ap.add_argument("--gptq-only", action="store_true", help="only GPTQ + LQER and one artifact (COMPRESSOR=entropy)")
    ap.add_argument("--solver", choices=("numpy", "torch"), default="numpy", help="GPTQ_SOLVER")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where --solver torch runs")
    ap.add_argument("--compare", action="store_true", help="--gptq-only: count integers differing from numpy's")
    args = ap.parse_args()
    solver = make_solver(args.solver, args.device)
    cfg = Hyperparameters.from_env({"PRESET": os.environ.get("PRESET", "record")})
    cfg = dataclasses.replace(cfg, quant="gptq", matrix_bits=6, embed_bits=7, lqer_enabled=False)
    n = count_params(cfg)
    t0 = time.perf_counter()
    state, hessians = synthetic_state(cfg), synthetic_hessians(cfg)
    stores = {p.name: p.store for p in param_table(cfg)}
    print(f"state: PRESET={os.environ.get('PRESET', 'record')} {n:,} parameters (synthetic), "
          f"{len(hessians)} Hessians (synthetic), built in {time.perf_counter() - t0:.1f}s")
    if args.gptq_only:
        lq_cfg = dataclasses.replace(cfg, lqer_enabled=True, compressor="entropy")
        return gptq_only(lq_cfg, state, hessians, stores, n, solver, args.compare)
    compressors = ["zstd", "entropy"] + ([] if args.fast else ["lzma", "brotli"])
    (t8, i8), s8 = timed(int8.quantize, state, stores)
    blob, enc = timed(artifact.pack, t8, i8, cfg, int8.NAME, "zstd")
    print(row("int8 per row + zstd-22", blob, n, enc + s8, decode_seconds(blob)))
    timings = {}
    (tg, ig), _ = timed(lambda: gptq.quantize(state, stores, cfg, hessians, timings, solver=solver))
    print(f"gptq ({getattr(solver, 'name', 'numpy')} float64): {timings['gptq']:.1f}s")
    ints = sum(coding.entropy_bits(v) for k, v in tg.items() if v.dtype == np.int8) / 8
    rest = sum(v.nbytes for k, v in tg.items() if v.dtype != np.int8)
    print(f"order-0 entropy limit of gptq's integers: {ints:,.0f} B (+ {rest:,} B of scales and fp16 tensors, "
          f"uncompressed) = {8 * (ints + rest) / n:.3f} bits/param")
    print(context_report(tg))
    lq_cfg = dataclasses.replace(cfg, lqer_enabled=True)
    tl, il = dict(tg), {k: dict(v) for k, v in ig.items()}
    _, lqer_s = timed(gptq.add_lqer, state, tl, il, lq_cfg.lqer_rank, lq_cfg.lqer_top_k, lq_cfg.lqer_asym_group)
    print(f"lqer (rank {lq_cfg.lqer_rank}, top {lq_cfg.lqer_top_k}): {lqer_s:.1f}s")
    for label, (tensors, index, c) in {"gptq int6/7": (tg, ig, cfg), "gptq int6/7 + lqer": (tl, il, lq_cfg)}.items():
        for compressor in compressors:
            blob, enc = timed(artifact.pack, tensors, index, c, gptq.NAME, compressor)
            print(row(f"{label} + {compressor}", blob, n, enc, decode_seconds(blob)))
    print(lrzip_line(tg, n))


if __name__ == "__main__":
    main()
