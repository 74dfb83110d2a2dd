"""Training throughput of either trainer for the config in the environment: tokens/s and peak memory.

    PRESET=tiny python bench/train_speed.py --backend mlx --steps 20
    python bench/train_speed.py --backend torch --steps 5          # baseline config (needs its data)

Times whole optimizer steps (TRAIN_BATCH_TOKENS each) after --warmup untimed steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_trainer(backend: str):
    from shared.config import Hyperparameters
    from shared.runlog import RunLog
    cfg = Hyperparameters.from_env(os.environ)
    log = RunLog("bench", enabled=False)
    if backend == "mlx":
        import mlx_train
        return cfg, mlx_train.Trainer(cfg, log), mlx_train.peak_memory_line, mlx_train
    import cuda_train
    rt = cuda_train.setup_runtime(cfg)
    return cfg, cuda_train.Trainer(cfg, rt, log), lambda: cuda_train.peak_memory_line(rt), cuda_train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("mlx", "torch"), required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    cfg, tr, peak, mod = make_trainer(args.backend)
    for _ in range(args.warmup):
        tr.train_step(1.0)
    sync = getattr(getattr(tr, "rt", None), "sync", lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = tr.train_step(1.0)
    sync()
    dt = time.perf_counter() - t0
    tokens = args.steps * cfg.train_batch_tokens
    extra = f" cpu_blas:{mod.CPU_BLAS} ops:{mod.select_ops(cfg).__name__}" if args.backend == "mlx" else ""
    print(f"backend:{args.backend} layers:{cfg.num_layers} dim:{cfg.model_dim} seq:{cfg.train_seq_len} "
          f"batch_tokens:{cfg.train_batch_tokens} steps:{args.steps} ms_per_step:{1000 * dt / args.steps:.1f} "
          f"tokens_per_s:{tokens / dt:.0f} last_loss:{loss:.4f}{extra}")
    print(peak())


if __name__ == "__main__":
    main()
