"""Training throughput of either trainer for the config in the environment: tokens/s and peak memory.

    PRESET=tiny python bench/train_speed.py --backend mlx --steps 20
    python bench/train_speed.py --backend torch --steps 5          # baseline config (needs its data)

Times whole optimizer steps (TRAIN_BATCH_TOKENS each) after --warmup untimed steps. A model with NUM_LOOPS
is timed looped (the state of most of a run: looping starts at ENABLE_LOOPING_AT).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_backend(backend: str):
    from shared.config import Hyperparameters
    from shared.data import TokenLoader, train_pattern
    from shared.loop import TrainState
    from shared.spec import init_params
    cfg = Hyperparameters.from_env(os.environ)
    if backend == "mlx":
        import mlx_train
        be = mlx_train.MLXBackend(cfg)
    else:
        import cuda_train
        be = cuda_train.TorchBackend(cfg)
    from shared.tokenizer import load_tokenizer
    be.build(cfg, init_params(cfg), train=True, bos_id=load_tokenizer(cfg.tokenizer_path).bos_id())
    if cfg.ema_decay > 0:  # the loop's EMA shadow, updated after every step (its cost is part of a step)
        be.load_ema(be.weights())
    st = TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), be.rank, be.world_size, cfg.vocab_size))
    return cfg, be, st


def main() -> None:
    from shared.loop import one_step
    from shared.spec import count_params
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("mlx", "torch"), required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    cfg, be, st = make_backend(args.backend)
    for _ in range(args.warmup):
        one_step(be, st, cfg, 1.0)
    be.sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one_step(be, st, cfg, 1.0)
    be.sync()
    dt = time.perf_counter() - t0
    tokens = args.steps * cfg.train_batch_tokens
    print(f"backend:{be.describe()} params:{count_params(cfg)} layers:{cfg.num_layers} dim:{cfg.model_dim} "
          f"looped:{cfg.num_loops > 0} doc_isolated:{cfg.doc_isolated_attn} seq:{cfg.train_seq_len} "
          f"batch_tokens:{cfg.train_batch_tokens} steps:{args.steps} ms_per_step:{1000 * dt / args.steps:.1f} "
          f"tokens_per_s:{tokens / dt:.0f} last_loss:{loss:.4f}")
    print(be.peak_memory_line())


if __name__ == "__main__":
    main()
