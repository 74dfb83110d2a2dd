"""Check an artifact in both frameworks before submitting.

    python -m parity_tests ARTIFACT [--data-path DIR] [--tokenizer-path FILE] [--windows N] [--logit-windows K]
                                    [--no-tokenizer-check]

Loads ARTIFACT in torch and in MLX, compares logits on K validation windows,
scores the first N validation windows (0 = all) in each, in fp32 and, where a
GPU is present, in the dtype each trainer really runs (bf16 on CUDA / Metal),
and prints a report with a verdict. The tokenizer must be the one DATA_PATH's
manifest.json records (shared/manifest.py) unless --no-tokenizer-check.
Exit status 0 = parity holds, 1 = it does not, 2 = bad arguments or inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from data.cli import OneLineParser, int_at_least
from parity_tests import compare as C
from shared.artifact import load_artifact
from shared import bpb
from shared.bpb import eval_windows
from shared.data import load_validation_tokens
from shared.manifest import check_tokenizer
from shared.tokenizer import load_tokenizer

BPB_TOL_FP32 = 1e-5  # fp32 twins agree to ~1e-7 in val_bpb on CPU; 1e-5 leaves room for other BLAS builds
BPB_TOL_BF16 = 5e-3  # bf16 kernels differ across vendors; this catches drift, not rounding


def parse_args(argv=None) -> argparse.Namespace:
    ap = OneLineParser(prog="python -m parity_tests", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data-path", help="default: the DATA_PATH stored in the artifact's config")
    ap.add_argument("--tokenizer-path", help="default: the TOKENIZER_PATH stored in the artifact's config")
    ap.add_argument("--windows", type=int_at_least(0), default=256, help="validation windows to score (0 = all)")
    ap.add_argument("--logit-windows", type=int_at_least(1), default=4, help="windows whose logits are compared")
    ap.add_argument("--no-tokenizer-check", action="store_true",
                    help="score even if DATA_PATH's manifest.json does not record this tokenizer")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        state, cfg, tokens, nbytes = load_inputs(args)
    except (ValueError, OSError) as exc:  # a bad artifact, tokenizer or dataset: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    windows = eval_windows(tokens.size, cfg.train_seq_len, cfg.eval_stride)
    windows = windows[:args.windows] if args.windows > 0 else windows
    print(f"artifact:{args.artifact} layers:{cfg.num_layers} dim:{cfg.model_dim} vocab:{cfg.vocab_size} "
          f"windows:{len(windows)} of seq {cfg.train_seq_len}")
    ok = report_fp32(cfg, state, tokens, windows, nbytes, args.logit_windows)
    ok &= report_gpu_dtypes(cfg, state, tokens, windows, nbytes)
    print(f"verdict:{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def load_inputs(args: argparse.Namespace) -> tuple:
    """(state, cfg, validation tokens, bytes of each target), the tokenizer checked against DATA_PATH's manifest."""
    state, cfg = load_artifact(args.artifact)
    cfg = dataclasses.replace(cfg, data_path=args.data_path or cfg.data_path,
                              tokenizer_path=args.tokenizer_path or cfg.tokenizer_path)
    try:
        sha, status = check_tokenizer(cfg.data_path, cfg.tokenizer_path, enforce=not args.no_tokenizer_check)
    except ValueError as exc:  # the trainers' override is an env var; this tool's is a flag
        raise ValueError(str(exc).replace("set TOKENIZER_CHECK=0", "pass --no-tokenizer-check")) from None
    print(f"tokenizer:{cfg.tokenizer_path} sha256:{sha[:12]} check:{status}")
    sp = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    tokens = load_validation_tokens(cfg.data_path, cfg.vocab_size)
    if tokens.size <= cfg.train_seq_len:
        raise ValueError(f"DATA_PATH={cfg.data_path} has {tokens.size} validation tokens, "
                         f"not one window of TRAIN_SEQ_LEN={cfg.train_seq_len}")
    return state, cfg, tokens, bpb.split_target_bytes(cfg, tokens, sp)


def report_fp32(cfg, state, tokens, windows, nbytes, logit_windows: int) -> bool:
    tm, mm = C.torch_model(cfg, state), C.mlx_model(cfg, state)
    ids = tokens[windows[:logit_windows, :1] + np.arange(cfg.train_seq_len)[None, :]].astype(np.int64)
    seg = C.segments_for(cfg, ids)  # DOC_ISOLATED_ATTN: each window's documents, as the trainers score them
    lt, lm = C.torch_logits(tm, ids, seg), C.mlx_logits(mm, ids, seg)
    diff = np.abs(lt.astype(np.float64) - lm)
    logits_ok = bool((diff <= C.LOGITS_ATOL + C.LOGITS_RTOL * abs(lt)).all())
    print(f"fp32 logits: max_abs_diff:{diff.max():.3e} mean_abs_diff:{diff.mean():.3e} "
          f"{'ok' if logits_ok else 'FAIL'} (rtol {C.LOGITS_RTOL}, atol {C.LOGITS_ATOL})")
    (st, t_s), (sm, m_s) = (_timed(lambda: C.score_torch(tm, cfg, tokens, windows, nbytes)),
                            _timed(lambda: C.score_mlx(mm, cfg, tokens, windows, nbytes)))
    return logits_ok & report_scores("fp32", ("torch", st, t_s), ("mlx", sm, m_s), BPB_TOL_FP32)


def report_gpu_dtypes(cfg, state, tokens, windows, nbytes) -> bool:
    import mlx.core as mx
    import torch
    ok = True
    if torch.cuda.is_available():
        st = C.score_torch(C.torch_model(cfg, state, "cuda", torch.bfloat16), cfg, tokens, windows, nbytes)
        ref = C.score_torch(C.torch_model(cfg, state), cfg, tokens, windows, nbytes)
        ok &= report_scores("bf16", ("torch_cuda_bf16", st, 0.0), ("torch_cpu_fp32", ref, 0.0), BPB_TOL_BF16)
    if mx.metal.is_available():
        mm = C.mlx_model(cfg, state, dtype=mx.bfloat16)
        sm = C.score_mlx(mm, cfg, tokens, windows, nbytes)
        ref = C.score_torch(C.torch_model(cfg, state), cfg, tokens, windows, nbytes)
        ok &= report_scores("bf16", ("mlx_metal_bf16", sm, 0.0), ("torch_cpu_fp32", ref, 0.0), BPB_TOL_BF16)
    if not torch.cuda.is_available() and not mx.metal.is_available():
        print("bf16: no CUDA or Metal device here; both trainers run fp32 on this machine")
    return ok


def report_scores(label: str, a: tuple, b: tuple, tol: float) -> bool:
    """a, b: (name, Score, seconds); one line with both val_bpb side by side and the verdict."""
    (na, sa, ta), (nb, sb, tb) = a, b
    diff = abs(sa.val_bpb - sb.val_bpb)
    ok = diff <= tol and sa.tokens == sb.tokens and sa.bytes == sb.bytes
    timing = f" seconds {na}:{ta:.1f} {nb}:{tb:.1f}" if ta else ""
    print(f"{label} val_bpb {na}:{sa.val_bpb:.8f} {nb}:{sb.val_bpb:.8f} diff:{diff:.3e} tokens:{sa.tokens} "
          f"bytes:{sa.bytes} {'ok' if ok else 'FAIL'} (tol {tol:g}){timing}")
    return ok


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
