"""How much of a training step the optimizer takes, in either trainer, for the config in the environment.

    PRESET=tiny_record python bench/optimizer_share.py --backend torch --steps 10
    PRESET=mac python bench/optimizer_share.py --backend mlx --steps 3 --unbatched   # Muon one matrix at a time

Times whole steps (as bench/train_speed.py) and, inside them, the optimizer's step (averaging, clipping, Muon,
Adam, weight decay; both trainers' step ends synchronised on a CPU). --unbatched orthogonalises each matrix on its
own (buckets of one) to show what batching same-shape matrices buys.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_speed import make_backend  # noqa: E402


def unbatch(backend: str) -> None:
    """Buckets of one matrix each: the per-matrix Muon of before."""
    if backend == "mlx":
        import mlx_optim as optim
    else:
        import torch_optim as optim
    optim.same_shape_buckets = lambda items, shape_of: [[item] for item in items]


def timed_optimizer(be) -> list[float]:
    """Wrap be.opts.step so that each call's seconds are recorded."""
    spent, step = [], be.opts.step

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        step(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
    be.opts.step = wrapped
    return spent


def main() -> None:
    from shared.loop import one_step
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("mlx", "torch"), required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--unbatched", action="store_true")
    args = ap.parse_args()
    if args.unbatched:
        unbatch(args.backend)
    cfg, be, st = make_backend(args.backend)
    for _ in range(args.warmup):
        one_step(be, st, cfg, 1.0)
    spent = timed_optimizer(be)
    be.sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one_step(be, st, cfg, 1.0)
    be.sync()
    total = time.perf_counter() - t0
    opt = sum(spent)
    print(f"backend:{args.backend} preset_dim:{cfg.model_dim} layers:{cfg.num_layers} muon_ns:{cfg.muon_ns} "
          f"row_norm:{cfg.muon_row_normalize} batched:{not args.unbatched} steps:{args.steps} "
          f"ms_per_step:{1000 * total / args.steps:.1f} optimizer_ms_per_step:{1000 * opt / args.steps:.1f} "
          f"optimizer_share:{opt / total:.3f}")


if __name__ == "__main__":
    main()
