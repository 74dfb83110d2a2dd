"""Training FLOPs per token of the config in the environment, and what a time budget buys at a given rate.

    PRESET=record python bench/flops.py                        # the record's arithmetic
    PRESET=mac python bench/flops.py --tflops 1.5              # tokens a 10-minute run sees at 1.5 TFLOP/s
    PRESET=tiny_record python bench/flops.py --measured-tokens-per-s 9000   # the rate a measurement implies

Counts the matmuls of one looped forward (every layer application, the tied head), the attention's
QK^T and AV over the mean number of keys a query sees ((T+1)/2 for dense causal rows, less under
document isolation: --context), and training as 3x the forward (backward = 2x forward). Embedding
lookups, norms and elementwise ops are left out: they are a few percent at these widths.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import Hyperparameters  # noqa: E402
from shared.spec import count_params, layer_schedule, mlp_hidden  # noqa: E402


def layer_matmul_params(cfg: Hyperparameters) -> int:
    d, kv, hidden = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim, mlp_hidden(cfg)
    return 2 * d * d + 2 * kv * d + 2 * hidden * d  # q, o; k, v; MLP up, down


def forward_flops_per_token(cfg: Hyperparameters, context: float, looping: bool = True) -> dict[str, float]:
    """Multiply-adds count 2. `context`: mean keys per query; `looping`: NUM_LOOPS' extra applications on."""
    applications = sum(len(part) for part in layer_schedule(cfg, looping=looping))
    return {"applications": applications,
            "matmul": 2.0 * applications * layer_matmul_params(cfg),
            "head": 2.0 * cfg.vocab_size * cfg.model_dim,
            "attention": applications * 4.0 * context * cfg.model_dim}  # QK^T and AV, H * head_dim = dim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=float, default=0.0, help="mean keys per query; 0 = dense causal (T+1)/2")
    ap.add_argument("--tflops", type=float, default=0.0, help="achieved training rate to plan for, TFLOP/s")
    ap.add_argument("--seconds", type=float, default=600.0, help="time budget")
    ap.add_argument("--measured-tokens-per-s", type=float, default=0.0, help="report the rate this implies")
    args = ap.parse_args()
    cfg = Hyperparameters.from_env(os.environ)
    context = args.context or (cfg.train_seq_len + 1) / 2
    fwd = forward_flops_per_token(cfg, context)
    train = 3.0 * (fwd["matmul"] + fwd["head"] + fwd["attention"])
    print(f"params:{count_params(cfg)} layers:{cfg.num_layers} applications:{fwd['applications']} "
          f"dim:{cfg.model_dim} seq:{cfg.train_seq_len} context:{context:.0f}")
    print(f"forward MFLOP/token: matmul {fwd['matmul'] / 1e6:.1f} head {fwd['head'] / 1e6:.1f} "
          f"attention {fwd['attention'] / 1e6:.1f}; training {train / 1e6:.1f} MFLOP/token")
    if args.measured_tokens_per_s:
        print(f"measured {args.measured_tokens_per_s:.0f} tokens/s = {args.measured_tokens_per_s * train / 1e12:.3f} "
              f"TFLOP/s achieved")
    if args.tflops:
        tokens = args.tflops * 1e12 * args.seconds / train
        print(f"at {args.tflops} TFLOP/s for {args.seconds:.0f} s: {tokens / 1e6:.1f}M tokens = "
              f"{tokens / cfg.train_batch_tokens:.0f} steps of {cfg.train_batch_tokens} tokens, "
              f"{tokens / count_params(cfg):.1f} tokens per parameter")


if __name__ == "__main__":
    main()
