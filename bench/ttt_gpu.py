"""Score-first TTT's speed on one accelerator, projected to the record's 50,000 validation documents on 8 GPUs.

    python bench/ttt_gpu.py --random-record --synthetic-docs 1000 --max-seconds 90          # CUDA, no trained model
    TTT_COMPILE=1 python bench/ttt_gpu.py --random-record --synthetic-docs 1000 --max-seconds 150
    python bench/ttt_gpu.py artifacts/RUN.int8.zst --max-docs 2000 --max-seconds 120         # a trained artifact
    PRESET=tiny_record python bench/ttt_gpu.py --random-record --synthetic-docs 64 --device cpu   # CPU smoke run

Throughput does not depend on the weights, so --random-record builds the PRESET's network (default: record) from its
init weights, writes it as an int8 artifact and scores from the dequantized copy, as --eval would. The TTT knobs are
the artifact's (the record's: rank 80, chunks of 48 in 2048-token windows, 64 docs a batch), env overrides as
for --eval. Documents: the validation split (DATA_PATH), or --synthetic-docs N with lognormal lengths of mean
SYNTH_MEAN_TOKENS (the record's split: 47,851,520 tokens / 50,000 docs) and --sigma (1.0: an assumption; the
real split's length spread is not in this repository), random tokens; their bpb means nothing.

What it measures, one GPU: LoRA scoring of whole batches (global SGD off in that pass), then --sgd-steps global SGD
steps on GLOBAL_TTT_CHUNK_TOKENS rows timed on their own. The LoRA cost of a chunk is fitted as
a + b * positions (positions: rows x width of the chunk's tensor; narrow chunks are launch-bound, wide ones
compute-bound), then summed over every chunk of the 50,000-document plan (synthetic lengths, or the loaded split
scaled per document) plus the SGD steps of PHASED_TTT_NUM_PHASES phases. The 8-GPU figure divides the one-GPU
seconds by 8: perfect scaling across ranks (whole streams per rank; the all-reduces and the tail of the slowest
rank are not modelled). TTT_COMPILE=1 compiles first on random ids (TorchTTT.warm_up, untimed, as in the
trainer); warm-up chunks (--warmup-chunks) are left out of the fit as well, as the record's timer leaves compile
out.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared import artifact, bpb, ttt  # noqa: E402
from shared.config import Hyperparameters, artifact_config_for_env  # noqa: E402
from shared.spec import count_params, init_params  # noqa: E402
from shared.fsutil import atomic_write_bytes  # noqa: E402

SYNTH_MEAN_TOKENS = 47_851_520 / 50_000  # the record's validation split (RECORD_STACK.md §1)
BOS = 1  # synthetic documents' BOS (the record's tokenizers use 1)
GPUS = 8


class TimeUp(Exception):
    """--max-seconds passed: no new batch is started (or, 50% later, no new chunk)."""


class TimedEngine:
    """The engine, with the start time and positions (rows x width) of every forward; a new batch after the
    deadline, or a chunk 50% past it, raises TimeUp. Only LoRA scoring runs through it (global SGD is timed apart)."""

    def __init__(self, inner, max_seconds: float):
        now = time.perf_counter()
        self.inner, self.deadline, self.hard_deadline = inner, now + max_seconds, now + 1.5 * max_seconds
        self.starts: list[float] = []
        self.positions: list[int] = []
        self.batch_starts: list[float] = []
        self.partial = False  # stopped inside a batch: the last batch started is not complete

    def _batch(self) -> None:
        now = time.perf_counter()
        if now > self.deadline:
            raise TimeUp
        self.batch_starts.append(now)

    def new_lora(self, a_init):
        self._batch()
        return self.inner.new_lora(a_init)

    def reset(self, lora, a_init) -> None:
        self._batch()
        self.inner.reset(lora, a_init)

    def forward(self, lora, x, y, weights):
        now = time.perf_counter()
        if now > self.hard_deadline:
            self.partial = True
            raise TimeUp
        self.starts.append(now)
        self.positions.append(int(x.size))
        return self.inner.forward(lora, x, y, weights)

    def update(self, lora) -> None:
        self.inner.update(lora)

    def global_step(self, *a):
        raise AssertionError("the scoring pass runs without global phases")

    def reduce_sum(self, values):
        return self.inner.reduce_sum(values)


# ---- the model and the documents ----
def random_record_artifact(env: dict, path: str) -> str:
    """PRESET (default record) at its init weights, written as a quick int8 + zstd-3 artifact (the throughput does
    not depend on the weights or on the quantizer). ORTHO_INIT=0: the orthogonal init's QR of every matrix takes
    minutes in numpy at the record's size; the normal init takes a second."""
    cfg = Hyperparameters.from_env(dict(env, PRESET=env.get("PRESET", "record")))
    cfg = dataclasses.replace(cfg, quant="int8", compressor="zstd", lqer_enabled=False, ortho_init=False)
    atomic_write_bytes(path, artifact.encode_artifact(init_params(cfg), cfg, level=3))
    return path


def synthetic_data(cfg: Hyperparameters, n_docs: int, sigma: float, seed: int) -> bpb.EvalData:
    lengths = synthetic_lengths(n_docs, sigma, seed)
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(2, cfg.vocab_size, int(lengths.sum()) + n_docs).astype(np.int64)
    tokens[np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])] = BOS
    return bpb.EvalData(tokens, None, rng.integers(1, 5, tokens.size - 1).astype(np.int32), BOS, "synthetic")


def synthetic_lengths(n_docs: int, sigma: float, seed: int) -> np.ndarray:
    """Lognormal tokens per document (after its BOS), mean SYNTH_MEAN_TOKENS: exp(mu + sigma^2 / 2) = mean."""
    mu = np.log(SYNTH_MEAN_TOKENS) - sigma ** 2 / 2
    return np.maximum(1, np.rint(np.random.default_rng(seed).lognormal(mu, sigma, n_docs))).astype(np.int64)


def first_docs(data: bpb.EvalData, n: int) -> bpb.EvalData:
    docs = ttt.find_docs(data.tokens, data.bos_id)
    if n <= 0 or n >= len(docs):
        return data
    end = int(docs[n - 1].sum()) + 1
    return dataclasses.replace(data, tokens=data.tokens[:end], windows=None, target_bytes=data.target_bytes[:end - 1])


# ---- the plan's work ----
def chunk_positions(n_pred_max: int, cfg: Hyperparameters) -> np.ndarray:
    """rows x width of every chunk tensor of a batch whose longest doc has n_pred_max predictions (chunk_rows'
    width: the longest window, rounded up to a multiple of the chunk, at most the window length)."""
    c = np.arange(ttt.n_chunks(n_pred_max, cfg.ttt_chunk_size))
    ends = np.minimum((c + 1) * cfg.ttt_chunk_size, n_pred_max)
    width = np.minimum(cfg.ttt_eval_seq_len, -(-np.minimum(ends, cfg.ttt_eval_seq_len) // cfg.ttt_chunk_size)
                       * cfg.ttt_chunk_size)
    return cfg.ttt_batch_size * width


def plan_chunks(n_pred: np.ndarray, cfg: Hyperparameters) -> np.ndarray:
    """Positions of every chunk of every batch of documents with these prediction counts."""
    docs = np.stack([np.zeros_like(n_pred), n_pred], axis=1)
    return np.concatenate([chunk_positions(int(n_pred[b.docs].max()), cfg)
                           for b in ttt.batch_queue(docs, cfg.ttt_batch_size)])


def plan_sgd_steps(n_pred: np.ndarray, cfg: Hyperparameters) -> int:
    """Global SGD steps of all phases (global_sgd_rows: the phase's docs joined, whole chunks only)."""
    docs = np.stack([np.zeros_like(n_pred), n_pred], axis=1)
    queue = ttt.batch_queue(docs, cfg.ttt_batch_size)
    bounds = ttt.phase_boundaries(cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    per = cfg.global_ttt_chunk_tokens // cfg.ttt_eval_seq_len * cfg.ttt_eval_seq_len
    steps = 0
    for cut, bound in zip(ttt.phase_cuts(queue, bounds), bounds):
        size = int((n_pred[ttt.phase_docs(queue, cut, bound)] + 1).sum())
        steps += max(0, size - 1) // per * cfg.global_ttt_epochs
    return steps


def fit_chunk_cost(positions: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """seconds ~ a + b * positions, least squares, a >= 0; one width only: a = 0."""
    if positions.size < 2 or np.ptp(positions) == 0:
        return 0.0, float(seconds.sum() / max(positions.sum(), 1))
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(positions), positions], 1).astype(np.float64), seconds,
                                 rcond=None)
    if a < 0:
        return 0.0, float(seconds.sum() / positions.sum())
    return float(a), float(b)


# ---- measuring ----
@dataclasses.dataclass
class Scoring:
    docs: int
    tokens: int
    seconds: float  # whole batches, from the first batch's start
    positions: np.ndarray  # per timed chunk (after the warm-up)
    chunk_seconds: np.ndarray
    warmup_seconds: float
    stopped: bool
    partial: bool  # stopped inside a batch (counted in the chunks' fit, not in docs/tokens)


def measure_scoring(be, cfg: Hyperparameters, data: bpb.EvalData, max_seconds: float, warmup: int) -> Scoring:
    """LoRA TTT over whole batches (global phases off), in the driver's order, until done or past max_seconds."""
    cfg = dataclasses.replace(cfg, phased_ttt_num_phases=0)
    inner = be.ttt_engine()
    warm = inner.warm_up()  # TTT_COMPILE=1: compiled before the clock starts, as the trainer does
    if warm:
        print(f"ttt_gpu_compile_warmup seconds:{warm:.1f} widths:{ttt.warmup_widths(cfg)}", flush=True)
    engine = TimedEngine(inner, max_seconds)
    stopped = False
    try:
        ttt.evaluate_ttt(engine, data, cfg, log=print)
    except TimeUp:
        stopped = True
    be.sync()
    t_end = time.perf_counter()
    docs = ttt.find_docs(data.tokens, data.bos_id)
    queue = ttt.batch_queue(docs, cfg.ttt_batch_size)
    items = [q for s in range(cfg.ttt_streams) for q in ttt.stream_items(len(queue), cfg.ttt_streams, s)]
    complete = len(engine.batch_starts) - int(engine.partial)
    done = np.concatenate([queue[q].docs for q in items[:complete]] + [np.zeros(0, np.int64)])
    batches_s = (engine.batch_starts[-1] if engine.partial else t_end) - engine.batch_starts[0]
    starts = np.array(engine.starts + [t_end])
    warmup = min(warmup, max(0, len(engine.starts) - 2))  # a short run keeps two chunks to fit
    seconds = np.diff(starts)  # a chunk: its forward, update and the driver's host work until the next forward
    return Scoring(int(done.size), int(docs[done, 1].sum()), batches_s,
                   np.array(engine.positions[warmup:], np.float64), seconds[warmup:], float(seconds[:warmup].sum()),
                   stopped, engine.partial)


def measure_sgd(be, cfg: Hyperparameters, data: bpb.EvalData, steps: int) -> float:
    """Seconds per global SGD step on one GPU (all GLOBAL_TTT_CHUNK_TOKENS rows), after one untimed step."""
    if steps <= 0 or cfg.phased_ttt_num_phases == 0:
        return 0.0
    engine = be.ttt_engine()
    rows = cfg.global_ttt_chunk_tokens // cfg.ttt_eval_seq_len
    stream = np.resize(data.tokens, rows * cfg.ttt_eval_seq_len + 1)
    x, y = stream[:-1].reshape(rows, -1), stream[1:].reshape(rows, -1)
    engine.global_step(x, y, 0.0, True)  # lr 0: the weights stay as they are
    be.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.global_step(x, y, 0.0, False)
    be.sync()
    return (time.perf_counter() - t0) / steps


# ---- the projection ----
def full_plan(data: bpb.EvalData, args) -> tuple[np.ndarray, str]:
    """Prediction counts of 50,000 documents: the synthetic distribution's, the loaded split's own (all of it),
    or the loaded documents tiled (their length distribution assumed the split's)."""
    if args.synthetic_docs:
        return synthetic_lengths(ttt.FULL_VAL_DOCS, args.sigma, args.seed) + 1, f"lognormal_sigma_{args.sigma}"
    n_pred = ttt.find_docs(data.tokens, data.bos_id)[:, 1]
    if n_pred.size >= ttt.FULL_VAL_DOCS:
        return n_pred, "loaded_split"
    return np.resize(n_pred, ttt.FULL_VAL_DOCS), f"loaded_{n_pred.size}_docs_tiled"


def report(cfg: Hyperparameters, sc: Scoring, sgd_step_s: float, n_pred: np.ndarray, source: str) -> None:
    a, b = fit_chunk_cost(sc.positions, sc.chunk_seconds)
    rate = max(sc.seconds, 1e-9)
    print(f"ttt_gpu_measured docs:{sc.docs} tokens:{sc.tokens} seconds:{sc.seconds:.2f} "
          f"docs_per_s:{sc.docs / rate:.2f} tokens_per_s:{sc.tokens / rate:.0f} "
          f"timed_chunks:{sc.positions.size} positions_per_s:{sc.positions.sum() / sc.chunk_seconds.sum():.0f} "
          f"chunk_cost_s:{a:.5f}+{b * 1e6:.4f}us*positions warmup_s:{sc.warmup_seconds:.1f} "
          f"stopped_by_max_seconds:{int(sc.stopped)} mid_batch:{int(sc.partial)} sgd_step_s:{sgd_step_s:.4f}",
          flush=True)
    chunks = plan_chunks(n_pred, cfg)
    score_1 = a * chunks.size + b * chunks.sum()
    by_tokens = sc.seconds * n_pred.sum() / sc.tokens if sc.tokens else float("nan")  # no whole batch: unknown
    sgd_1 = plan_sgd_steps(n_pred, cfg) * sgd_step_s
    total = (score_1 + sgd_1) / GPUS
    print(f"ttt_gpu_projection full_docs:{n_pred.size} full_tokens:{n_pred.sum()} lengths:{source} "
          f"chunks:{chunks.size} positions:{chunks.sum()} score_s_1gpu:{score_1:.1f} "
          f"score_s_1gpu_by_tokens:{by_tokens:.1f} sgd_steps:{plan_sgd_steps(n_pred, cfg)} sgd_s_1gpu:{sgd_1:.1f} "
          f"projected_{GPUS}gpu_s:{total:.1f} projected_{GPUS}gpu_s_by_tokens:{(by_tokens + sgd_1) / GPUS:.1f} "
          f"budget_s:{ttt.EVAL_BUDGET_S:.0f} (1-GPU seconds / {GPUS}: perfect scaling across ranks assumed)",
          flush=True)
    if max(total, np.nan_to_num((by_tokens + sgd_1) / GPUS)) > ttt.EVAL_BUDGET_S:
        print(f"WARNING ttt_gpu_projection: over the {ttt.EVAL_BUDGET_S:.0f} s evaluation budget", flush=True)


def scoring_within_memory(be, cfg: Hyperparameters, data: bpb.EvalData, args) -> tuple[Hyperparameters, Scoring]:
    """measure_scoring; out of device memory, once more with half the documents per batch (printed: the 64-doc
    batch of 2048-token windows keeps every layer's activations of 131,072 positions for the backward)."""
    import torch
    try:
        return cfg, measure_scoring(be, cfg, data, args.max_seconds, args.warmup_chunks)
    except torch.OutOfMemoryError as exc:
        print(f"ttt_gpu_oom batch:{cfg.ttt_batch_size} {be.peak_memory_line()} ({str(exc).splitlines()[0]})",
              flush=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = dataclasses.replace(cfg, ttt_batch_size=cfg.ttt_batch_size // 2)
    be.cfg = cfg
    print(f"ttt_gpu retrying with TTT_BATCH_SIZE={cfg.ttt_batch_size} (the projection is then that plan's)",
          flush=True)
    return cfg, measure_scoring(be, cfg, data, args.max_seconds, args.warmup_chunks)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", help="an artifact; or --random-record")
    ap.add_argument("--random-record", action="store_true", help="PRESET's (default record) init weights, int8")
    ap.add_argument("--synthetic-docs", type=int, default=0, help="N lognormal-length random documents")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of --synthetic-docs (assumed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-docs", type=int, default=0, help="the split's first N documents (0: all)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="no new batch after this many seconds")
    ap.add_argument("--warmup-chunks", type=int, default=8, help="chunks left out of the cost fit (compile)")
    ap.add_argument("--sgd-steps", type=int, default=3, help="timed global SGD steps (0: none)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = ap.parse_args()
    if bool(args.artifact) == args.random_record:
        ap.error("give an artifact or --random-record (not both)")
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported (cuda_train below)
    import cuda_train
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = random_record_artifact(dict(os.environ), f"{tmp}/random.int8.zst") if args.random_record \
            else args.artifact
        art = artifact.read_artifact(path)
        built_s = time.perf_counter() - t0
    cfg = artifact_config_for_env(art.cfg, os.environ, f"artifact {path}")
    data = synthetic_data(cfg, args.synthetic_docs, args.sigma, args.seed) if args.synthetic_docs \
        else first_docs(bpb.load_eval_data(cfg), args.max_docs)
    be = cuda_train.TorchBackend(cfg)
    if args.device == "cuda" and be.device.type != "cuda":
        raise SystemExit("--device cuda: torch sees no CUDA device")
    be.build(cfg, art.state, train=False, bos_id=data.bos_id)
    be.set_looping(cfg.num_loops > 0)
    docs = ttt.find_docs(data.tokens, data.bos_id)
    print(f"ttt_gpu {be.describe()} ttt_compile:{int(cfg.ttt_compile)} params:{count_params(cfg)} "
          f"artifact_s:{built_s:.1f} docs:{len(docs)} tokens:{int(docs[:, 1].sum())} "
          f"rank:{cfg.ttt_lora_rank} chunk:{cfg.ttt_chunk_size} window:{cfg.ttt_eval_seq_len} "
          f"batch:{cfg.ttt_batch_size} streams:{cfg.ttt_streams} phases:{cfg.phased_ttt_num_phases}", flush=True)
    cfg, sc = scoring_within_memory(be, cfg, data, args)
    sgd_step_s = measure_sgd(be, cfg, data, args.sgd_steps)
    report(cfg, sc, sgd_step_s, *full_plan(data, args))
    if be.device.type == "cuda":
        print(be.peak_memory_line(), flush=True)


if __name__ == "__main__":
    main()
