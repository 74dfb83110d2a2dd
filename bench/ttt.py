"""Score-first TTT's gain and cost: val_bpb and evaluation seconds of one artifact without TTT, with LoRA TTT
(no global phase) and with phased TTT, in each framework on this machine.

    PRESET=tiny_record ITERATIONS=300 python mlx_train.py          # a small model on the demo data
    python bench/ttt.py artifacts/RUN.int8.zst                      # both frameworks, the artifact's TTT knobs
    TTT_LORA_LR=3e-3 python bench/ttt.py artifacts/RUN.int8.zst --frameworks torch --docs 12   # first 12 docs

Eval/backend knobs come from the environment as for --eval (shared/config.artifact_config_for_env); the plain
score uses the trainers' own evaluate (EVAL_STRIDE windows), the TTT rows shared/ttt.evaluate_ttt.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared import artifact, bpb, ttt  # noqa: E402
from shared.config import artifact_config_for_env  # noqa: E402


def backend(name: str, cfg):
    if name == "mlx":
        import mlx_train
        return mlx_train.MLXBackend(cfg)
    import cuda_train
    return cuda_train.TorchBackend(cfg)


def run_case(name: str, cfg, state, data: bpb.EvalData, case: str) -> tuple[float, float]:
    """(val_bpb, seconds) of one case on a freshly built model (global SGD changes the weights)."""
    be = backend(name, cfg)
    be.build(cfg, state, train=False, bos_id=data.bos_id)
    be.set_looping(cfg.num_loops > 0)
    t0 = time.perf_counter()
    if case == "no_ttt":
        acc = be.evaluate(data, None)
    else:
        phases = cfg.phased_ttt_num_phases if case == "phased_ttt" else 0
        acc = ttt.evaluate_ttt(be.ttt_engine(), data, dataclasses.replace(cfg, phased_ttt_num_phases=phases)).acc
    return acc.val_bpb, time.perf_counter() - t0


def first_docs(data: bpb.EvalData, cfg, n: int) -> bpb.EvalData:
    """The split cut after its first n documents (through the next BOS, as TTT counts them); windows recomputed."""
    docs = ttt.find_docs(data.tokens, data.bos_id)
    if n <= 0 or n >= len(docs):
        return data
    end = int(docs[n - 1].sum()) + 1  # tokens[start : start + n_pred + 1]
    windows = bpb.eval_windows(end, cfg.train_seq_len, cfg.eval_stride)
    return dataclasses.replace(data, tokens=data.tokens[:end], windows=windows,
                               target_bytes=data.target_bytes[:end - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--frameworks", default="torch,mlx")
    ap.add_argument("--docs", type=int, default=0, help="score only the first N documents (0: all)")
    args = ap.parse_args()
    art = artifact.read_artifact(args.artifact)
    cfg = artifact_config_for_env(art.cfg, os.environ, f"artifact {args.artifact}")
    data = first_docs(bpb.load_eval_data(cfg), cfg, args.docs)
    docs = ttt.find_docs(data.tokens, data.bos_id)
    print(f"artifact:{args.artifact} val_tokens:{data.tokens.size} docs:{len(docs)} lora_rank:{cfg.ttt_lora_rank} "
          f"chunk:{cfg.ttt_chunk_size} window:{cfg.ttt_eval_seq_len} batch:{cfg.ttt_batch_size} "
          f"lr:{cfg.ttt_lora_lr} phases:{cfg.phased_ttt_num_phases} prefix_docs:{cfg.phased_ttt_prefix_docs}")
    for name in args.frameworks.split(","):
        for case in ("no_ttt", "lora_ttt", "phased_ttt"):
            val_bpb, seconds = run_case(name, cfg, art.state, data, case)
            print(f"framework:{name} case:{case} val_bpb:{val_bpb:.6f} eval_seconds:{seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()
