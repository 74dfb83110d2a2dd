"""DOC_ISOLATED_ATTN's cost: forward+backward time per token and peak memory, dense causal vs document isolation.

    python bench/doc_isolation.py                          # attention alone, both frameworks, T=2048
    python bench/doc_isolation.py --what model             # a small model (PRESET=tiny dims unless env says)
    python bench/doc_isolation.py --mean-doc 300 --rows 4

Rows are cut from a stream of documents with exponential lengths (mean --mean-doc tokens, BOS first), as the
loader packs them: most rows start inside a document. Each case runs in its own process, so the peak RSS
(and MLX's peak allocation) belongs to it alone. Cases: dense (causal, today), masked (the block-causal mask
the CPU paths use, compiled in MLX) and per_segment (one causal call per segment; MLX eager: its shapes come
from the data, so mx.compile cannot hold them).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOS = 1
CASES = ("dense", "masked", "per_segment")


def packed_rows(rows: int, seq_len: int, mean_doc: float, vocab: int, seed: int = 0) -> np.ndarray:
    """(rows, seq_len + 1) tokens: documents of exponential length (>= 2) back to back, each opened by BOS,
    the stream starting at a random offset inside its first document (a row the loader cut)."""
    rng = np.random.default_rng(seed)
    need = rows * (seq_len + 1)
    lengths = np.maximum(2, rng.exponential(mean_doc, size=need // 2 + 2).astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    stream = rng.integers(2, vocab, size=int(starts[-1]))
    stream[starts[:-1]] = BOS
    offset = int(rng.integers(0, lengths[0]))
    return stream[offset:offset + need].reshape(rows, seq_len + 1)


def _segment_ranges(ids: np.ndarray) -> list[list[tuple[int, int]]]:
    from shared.segments import cu_seqlens
    t = ids.shape[1]
    cu = cu_seqlens(ids)
    return [[(int(a) - r * t, int(b) - r * t) for a, b in zip(cu[:-1], cu[1:]) if r * t <= a < (r + 1) * t]
            for r in range(ids.shape[0])]


def _qkv(args, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = args.head_dim
    q = rng.standard_normal((args.rows, args.heads, args.seq, d)).astype(np.float32)
    k = rng.standard_normal((args.rows, args.kv_heads, args.seq, d)).astype(np.float32)
    v = rng.standard_normal((args.rows, args.kv_heads, args.seq, d)).astype(np.float32)
    return q, k, v


def torch_per_segment(ranges: list[list[tuple[int, int]]]):
    """torch_model.attention done as one causal call per segment (ranges: per row, [start, end))."""
    import torch
    import torch_model
    dense = torch_model.attention

    def attention(q, k, v, scale, doc):
        return torch.cat([torch.cat([dense(q[r:r + 1, :, a:b], k[r:r + 1, :, a:b], v[r:r + 1, :, a:b], scale, None)
                                     for a, b in row], dim=2) for r, row in enumerate(ranges)])
    return attention


def _mlx_ops(args, case: str):
    """The ops class of --mlx-ops, with DOC_ISOLATED_ATTN's representation forced to the case's."""
    import mlx_cpu_ops
    ops = mlx_cpu_ops.FusedOps if args.mlx_ops == "fused" else mlx_cpu_ops.ComposedOps
    return type(ops.__name__, (ops,), {"per_segment": case == "per_segment"})


def torch_attention_step(args, ids: np.ndarray, case: str):
    import torch
    import torch_model
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in _qkv(args, np.random.default_rng(1)))
    scale = args.head_dim ** -0.5
    doc = torch_model.segment_mask(torch.from_numpy(ids)) if case == "masked" else None
    attention = torch_per_segment(_segment_ranges(ids)) if case == "per_segment" else torch_model.attention

    def step():
        attention(q, k, v, scale, doc).square().sum().backward()
    return step


def mlx_attention_step(args, ids: np.ndarray, case: str):
    import mlx_model  # first: mlx_cpu_ops puts MKL under mlx[cpu] before mlx loads
    import mlx.core as mx
    ops = _mlx_ops(args, case)
    q, k, v = (mx.array(a) for a in _qkv(args, np.random.default_rng(1)))
    scale = args.head_dim ** -0.5
    doc = {"dense": None, "masked": mlx_model.segment_mask(mx.array(ids)),
           "per_segment": mlx_model.segment_ranges(mx.array(ids))}[case]
    fn = mx.grad(lambda q, k, v: mx.sum(mx.square(ops.attention(q, k, v, scale, doc))), argnums=(0, 1, 2))
    fn = fn if case == "per_segment" or args.eager else mx.compile(fn)  # per-segment shapes change every batch
    return lambda: mx.eval(fn(q, k, v))


def _model_cfg(args):
    import dataclasses
    from shared.config import Hyperparameters
    cfg = Hyperparameters.from_env({"PRESET": "tiny", **os.environ})
    return dataclasses.replace(cfg, train_seq_len=args.seq, doc_isolated_attn=True)


def torch_model_step(args, x: np.ndarray, y: np.ndarray, ids: np.ndarray, case: str):
    import torch
    import torch_model
    from shared.spec import init_params
    cfg = _model_cfg(args)
    model = torch_model.build_model(cfg, "cpu", init_params(cfg), torch.float32, BOS)
    if case == "per_segment":
        torch_model.attention = torch_per_segment(_segment_ranges(ids))  # this process only
    xt, yt, seg = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ids) if case == "masked" else None

    def step():
        model.zero_grad(set_to_none=True)
        model(xt, yt, seg).backward()
    return step


def mlx_model_step(args, x: np.ndarray, y: np.ndarray, ids: np.ndarray, case: str):
    import mlx_model  # first: mlx_cpu_ops puts MKL under mlx[cpu] before mlx loads
    import mlx.core as mx
    import mlx.nn as nn
    from shared.spec import init_params
    cfg = _model_cfg(args)
    model = mlx_model.build_model(cfg, init_params(cfg), mx.float32, _mlx_ops(args, case), BOS)
    fn = nn.value_and_grad(model, lambda a, b, s: model(a, b, s))
    if case != "per_segment" and not args.eager:  # as mlx_train.py does; per-segment shapes change every batch
        fn = mx.compile(fn, inputs=model.state, outputs=model.state)
    xm, ym, seg = mx.array(x), mx.array(y), None if case == "dense" else mx.array(ids)
    return lambda: mx.eval(fn(xm, ym, seg))


def run_case(args) -> dict:
    from shared.segments import segment_ids
    vocab = _model_cfg(args).vocab_size if args.what == "model" else 1024
    rows = packed_rows(args.rows, args.seq, args.mean_doc, vocab)
    x, y = rows[:, :-1], rows[:, 1:]
    ids = segment_ids(x, BOS, args.seq)
    if args.what == "attention":
        make = torch_attention_step if args.framework == "torch" else mlx_attention_step
        step = make(args, ids, args.case)
    else:
        make = torch_model_step if args.framework == "torch" else mlx_model_step
        step = make(args, x, y, ids, args.case)
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        step()
    dt = (time.perf_counter() - t0) / args.repeats
    out = {"us_per_token": 1e6 * dt / x.size, "ms_per_step": 1e3 * dt, "segments": int(ids.max()) + 1,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.framework == "mlx":
        import mlx.core as mx
        import mlx_cpu_ops
        out["mlx_peak_mib"] = mx.get_peak_memory() / 2**20
        out["cpu_blas"] = Path(mlx_cpu_ops.CPU_BLAS).name  # "reference" = mlx loaded before the swap: slow
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=("attention", "model"), default="attention")
    ap.add_argument("--framework", choices=("torch", "mlx", "both"), default="both")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--mean-doc", type=float, default=700.0)
    ap.add_argument("--heads", type=int, default=8)  # attention alone: the baseline's 8/4 heads of 64 dims
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mlx-ops", choices=("composed", "fused"), default="composed")
    ap.add_argument("--eager", type=int, default=0, help="1: no mx.compile for dense and masked either")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    frameworks = ("torch", "mlx") if args.framework == "both" else (args.framework,)
    for fw in frameworks:
        for case in CASES:
            cmd = [sys.executable, __file__, "--framework", fw, "--case", case]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("framework", "case")]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            ops = f"({args.mlx_ops}{',eager' if args.eager else ''})" if fw == "mlx" else ""
            print(f"what:{args.what} framework:{fw}{ops} case:{case} seq:{args.seq} rows:{args.rows} "
                  f"segments:{res['segments']} us_per_token:{res['us_per_token']:.2f} "
                  f"ms_per_step:{res['ms_per_step']:.1f} peak_rss_mib:{res['peak_rss_mib']:.0f}"
                  + (f" mlx_peak_mib:{res['mlx_peak_mib']:.0f} cpu_blas:{res['cpu_blas']}" if fw == "mlx" else ""),
                  flush=True)


if __name__ == "__main__":
    main()
