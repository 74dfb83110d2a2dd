"""GPTQ and LQER on a 40-step trained model: the extra loss over the float weights, printed, not asserted.

    python bench/lqer_trained.py [--steps 40] [--threads 1]

These were tests until LQER's figure proved to move with the install (its gain on the outlier weights: 10%
when written, 1.5% on a fresh install, -12% here); tests/test_quant_lqer.py now checks LQER on a planted
low-rank error, where its margin is known.
The model (torch, CPU, fp32; width 128, MLP 4.5x, 2 layers) trains on the demo documents with a 384-token BPE;
Hessians come from 8 later training micro-batches and each state is scored on 8 more. Rows: the float model;
round-to-nearest int6 with SDClip scales (H = I); GPTQ; and, on the same weights with two outlier input dims in
each MLP up-projection (+-20 row stds, as a trained LM's massive-activation dims), GPTQ and GPTQ + LQER.
Figures (nats): when written, RTN +0.009, GPTQ +0.00005; outliers GPTQ +0.00373, GPTQ + LQER +0.00336. With
the Linux CPU lock (numpy 2.4.6, torch 2.13.0+cpu), 1 or 2 threads: RTN +0.008990, GPTQ +0.000027; outliers
GPTQ +0.003736, GPTQ + LQER +0.004193.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 384  # the test suite's tiny tokenizer: 256 byte pieces + 4 specials + merges


def tiny_config(data: Path, steps: int):
    from shared.config import Hyperparameters
    env = dict(PRESET="tiny", VOCAB_SIZE=str(VOCAB), TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="2048",
               VAL_BATCH_SIZE="4096", ITERATIONS=str(steps), WARMUP_STEPS="2", WARMDOWN_ITERS="0",
               VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="0", COMPUTE_DTYPE="float32", MODEL_DIM="128",
               MLP_MULT="4.5", MATRIX_BITS="6", MLP_CLIP_SIGMAS="11.5", ATTN_CLIP_SIGMAS="13.0", QUANT="gptq",
               LQER_RANK="4", LQER_TOP_K="2", LQER_ASYM_GROUP="64", MATRIX_LR="0.04",
               DATA_PATH=str(data / "datasets" / "tiny"), TOKENIZER_PATH=str(data / "tokenizers" / "tiny.model"))
    return Hyperparameters.from_env(env)


def train(cfg, steps: int):
    """(weights, Hessians, held-out batches) after `steps` optimizer steps of the torch backend."""
    import cuda_train
    from shared.data import TokenLoader, train_pattern
    from shared.manifest import BOS_ID
    from shared.spec import init_params
    be = cuda_train.TorchBackend(cfg)
    be.build(cfg, init_params(cfg), train=True, bos_id=BOS_ID)
    loader = TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size)
    micro = lambda: loader.next_micro_batch(cfg.train_batch_tokens, cfg.train_seq_len)  # noqa: E731
    for _ in range(steps):
        be.train_step([micro() for _ in range(loader.grad_accum_steps)], 1.0, cfg.muon_momentum)
    hessians = be.hessians(cfg, [micro() for _ in range(8)])
    return be.weights(), hessians, [micro() for _ in range(8)]


def loss(cfg, state, batches) -> float:
    import torch
    import torch_model
    from shared.manifest import BOS_ID
    model = torch_model.build_model(cfg, "cpu", state, torch.float32, BOS_ID)
    with torch.no_grad():
        return float(np.mean([model(torch.from_numpy(x), torch.from_numpy(y)).item() for x, y in batches]))


def quantized(cfg, state, hessians, **knobs):
    from shared.quant import gptq
    from shared.spec import param_table
    cfg = dataclasses.replace(cfg, **knobs)
    tensors, index = gptq.quantize(state, {p.name: p.store for p in param_table(cfg)}, cfg, hessians)
    return gptq.dequantize(tensors, index)


def with_outlier_inputs(state, cfg):
    """Two outlier input dims (cols 5 and 77) in each MLP up-projection, every row +-20 row stds."""
    rng = np.random.default_rng(0)
    out = dict(state)
    for i in range(cfg.num_layers):
        name = f"blocks.{i}.mlp.fc.weight"
        w = state[name].copy()
        sd = w.std(axis=1, ddof=1)
        for col in (5, 77):
            w[:, col] = (rng.choice([-1.0, 1.0], size=w.shape[0]) * 20 * sd).astype(np.float32)
        out[name] = w
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from data.build import build_dataset
    from data.corpus import demo_documents
    with tempfile.TemporaryDirectory() as tmp:
        build_dataset(demo_documents()[:160], "tiny", Path(tmp), val_docs=8, tokenizer=None, vocab_size=VOCAB,
                      shard_tokens=60_000)
        cfg = tiny_config(Path(tmp), args.steps)
        state, hessians, held_out = train(cfg, args.steps)
    base = loss(cfg, state, held_out)
    print(f"numpy:{np.__version__} torch:{torch.__version__} threads:{args.threads} steps:{args.steps}")
    print(f"float loss:{base:.6f}")
    for row, s in (("rtn", quantized(cfg, state, None)), ("gptq", quantized(cfg, state, hessians))):
        print(f"{row} extra_loss:{loss(cfg, s, held_out) - base:+.6f}")
    outl = with_outlier_inputs(state, cfg)
    base = loss(cfg, outl, held_out)
    opt = loss(cfg, quantized(cfg, outl, hessians), held_out) - base
    fix = loss(cfg, quantized(cfg, outl, hessians, lqer_enabled=True), held_out) - base
    print(f"outliers gptq extra_loss:{opt:+.6f} gptq+lqer extra_loss:{fix:+.6f} lqer_gain:{1 - fix / opt:.1%}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
