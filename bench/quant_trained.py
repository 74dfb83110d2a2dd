"""What quantization costs a model trained here: val_bpb and artifact bytes of each quantizer x coder.

    PRESET=tiny_record ITERATIONS=300 CHECKPOINT_EVERY=300 CHECKPOINT_PATH=/tmp/ck{step}.safetensors \\
        python cuda_train.py                                   # any run that leaves a final checkpoint
    PRESET=tiny_record python bench/quant_trained.py /tmp/ck300.safetensors [--backend mlx|torch]

The weights are the checkpoint's EMA shadow when it has one (what the trainers export), else its live weights.
Hessians come from --calibration-batches micro-batches at the start of the training stream (the trainers use
the batches after the last step: same distribution). Rows: fp32 (no quantization, the reference); int8 per
row; round-to-nearest int6/int7 with SDClip scales (GPTQ's grid, H = I); GPTQ; GPTQ + LQER. val_bpb is scored
once per quantizer (every coder is lossless, checked by decoding each artifact to the same tensors); bytes and
bits per parameter per coder, and the order-0 entropy of the quantized integers as the coders' limit.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import artifact, bpb  # noqa: E402
from shared.checkpoint import load_checkpoint  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.data import TokenLoader, train_pattern  # noqa: E402
from shared import quant  # noqa: E402
from shared.quant import coding  # noqa: E402
from shared.spec import count_params, param_table  # noqa: E402

CODERS = ("zstd", "lzma", "brotli", "entropy")
QUANTIZERS = {  # row name -> knobs over the run's config
    "int8": dict(quant="int8", lqer_enabled=False),
    "rtn": dict(quant="gptq", lqer_enabled=False),  # scored without Hessians: round-to-nearest on GPTQ's grid
    "gptq": dict(quant="gptq", lqer_enabled=False),
    "gptq+lqer": dict(quant="gptq", lqer_enabled=True),
}


def make_backend(name: str, cfg: Hyperparameters):
    if name == "mlx":
        import mlx_train
        return mlx_train.MLXBackend(cfg)
    import cuda_train
    return cuda_train.TorchBackend(cfg)


def trained_weights(path: str, cfg: Hyperparameters) -> dict[str, np.ndarray]:
    weights, _, meta, ema = load_checkpoint(path, cfg)
    print(f"checkpoint {path}: step {meta['step']}, {'EMA shadow' if ema is not None else 'live weights'}")
    return ema if ema is not None else weights


def score(be, cfg: Hyperparameters, state: dict[str, np.ndarray], data: bpb.EvalData) -> float:
    be.build(cfg, state, train=False, bos_id=data.bos_id)
    be.set_looping(cfg.num_loops > 0)
    return be.evaluate(data, None).val_bpb


def calibration(be, cfg: Hyperparameters, state, batches: int, bos_id: int) -> dict[str, np.ndarray]:
    be.build(cfg, state, train=False, bos_id=bos_id)
    be.set_looping(cfg.num_loops > 0)
    loader = TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size)
    micro = [loader.next_micro_batch(cfg.train_batch_tokens, cfg.train_seq_len) for _ in range(batches)]
    return be.hessians(cfg, micro)


def quantize(name: str, cfg: Hyperparameters, state, hessians) -> tuple[dict, dict, str, float]:
    """The scheme's integer tensors and index (before any coder) and its seconds."""
    scheme = quant.BY_KNOB[cfg.quant]
    stores = {p.name: p.store for p in param_table(cfg)}
    t0 = time.perf_counter()
    tensors, index = quant.scheme(scheme).quantize(state, stores, cfg, None if name == "rtn" else hessians, {})
    return tensors, index, scheme, time.perf_counter() - t0


def integer_entropy_bytes(tensors: dict[str, np.ndarray]) -> float:
    """Order-0 entropy of the quantized integer matrices, each under its own histogram (the entropy coder's
    model), in bytes: what a per-tensor coder can reach on the integers alone (scales, fp16 tensors excluded)."""
    return sum(coding.entropy_bits(q.astype(np.int64)) for k, q in tensors.items()
               if k.startswith("q:") and q.ndim == 2) / 8


def run_quantizer(name: str, cfg: Hyperparameters, state, hessians, be, data, n_params: int, tmp: str) -> None:
    qcfg = dataclasses.replace(cfg, **QUANTIZERS[name])
    tensors, index, scheme, q_seconds = quantize(name, qcfg, state, hessians)
    decoded, bpb_value = None, None
    for coder in CODERS:
        path = os.path.join(tmp, f"{name}.{coder}")
        t0 = time.perf_counter()
        blob = artifact.pack(tensors, index, dataclasses.replace(qcfg, compressor=coder), scheme, coder)
        enc = time.perf_counter() - t0
        Path(path).write_bytes(blob)
        t0 = time.perf_counter()
        got = artifact.read_artifact(path).state
        dec = time.perf_counter() - t0
        if decoded is None:
            decoded, bpb_value = got, score(be, cfg, got, data)
        elif any(not np.array_equal(decoded[k], got[k]) for k in decoded):
            raise SystemExit(f"{name}: the {coder} artifact decodes to other tensors than the {CODERS[0]} one")
        print(f"{name:10s} {coder:8s} val_bpb {bpb_value:.5f}  {len(blob):>10,} B  "
              f"{8 * len(blob) / n_params:6.3f} bits/param  enc {enc:6.2f}s  dec {dec:5.2f}s", flush=True)
    print(f"{name:10s} quantize {q_seconds:.1f}s; order-0 limit of its integer matrices "
          f"{integer_entropy_bytes(tensors):,.0f} B", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--backend", choices=("mlx", "torch"), default="torch")
    ap.add_argument("--calibration-batches", type=int, default=None, help="default: GPTQ_CALIBRATION_BATCHES")
    ap.add_argument("--only", nargs="*", choices=sorted(QUANTIZERS), help="a subset of the quantizer rows")
    args = ap.parse_args()
    cfg = Hyperparameters.from_env(os.environ)
    state = trained_weights(args.checkpoint, cfg)
    data = bpb.load_eval_data(cfg)
    be = make_backend(args.backend, cfg)
    n_params = count_params(cfg)
    print(f"{n_params:,} parameters, {data.tokens.size:,} validation tokens, backend {args.backend}")
    print(f"fp32       -        val_bpb {score(be, cfg, state, data):.5f}  {4 * n_params:>10,} B  32.000 bits/param")
    t0 = time.perf_counter()
    hessians = calibration(be, cfg, state, args.calibration_batches or cfg.gptq_calibration_batches, data.bos_id)
    print(f"hessians: {len(hessians)} matrices in {time.perf_counter() - t0:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or QUANTIZERS:
            run_quantizer(name, cfg, state, hessians, be, data, n_params, tmp)


if __name__ == "__main__":
    main()
