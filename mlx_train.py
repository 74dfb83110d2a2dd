"""MLX trainer: the exact twin of cuda_train.py, for Apple Silicon (and Linux CPU via mlx[cpu]).

    PRESET=tiny python mlx_train.py                       # CPU/Mac smoke size on demo data
    python mlx_train.py                                   # the official baseline config
    python mlx_train.py --eval artifacts/run.int8.zst     # score any artifact
    python mlx_train.py --resume checkpoints/run.ckpt     # continue a run (checkpoints are cross-framework)

One process consumes exactly the tokens of cuda_train.py (8 slots per step,
shared/data.py); each slot is split into chunks of MLX_MAX_MICROBATCH_TOKENS,
computed MLX_STREAMS at a time, so memory stays flat. This file is the runtime
only: the model is mlx_model.py, the optimizers mlx_optim.py, the CPU shims
mlx_cpu_ops.py and the flow shared/loop.py.
"""
from __future__ import annotations

import os
from pathlib import Path

from mlx_cpu_ops import CPU_BLAS, select_ops, uses_per_segment  # first: it puts a fast BLAS under mlx[cpu] before mlx loads

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from mlx_model import build_model, collect_hessians, load_numpy_state, numpy_state  # noqa: E402
from mlx_optim import Optimizers  # noqa: E402
from mlx_ttt import MLXTTT  # noqa: E402
from shared import bpb, loop  # noqa: E402
from shared.runlog import rss_peak_line  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.quant.gptq import targets as gptq_targets  # noqa: E402
from shared.segments import check_bos_features, require_bos, segment_ids  # noqa: E402

CUDA_TRAINER = str(Path(__file__).resolve().with_name("cuda_train.py"))  # what ships, hence what code_bytes counts
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def make_streams(cfg: Hyperparameters) -> list:
    """MLX_STREAMS (0 = auto): one on Metal; on a CPU one per core, up to 4.

    mlx[cpu] runs each stream's graph on one thread: independent chunks on separate
    streams use the other cores (measured 467 -> 257 ms for 8 tiny chunks on 2 cores).
    """
    n = cfg.mlx_streams or (1 if mx.metal.is_available() else max(1, min(os.cpu_count() or 1, 4)))
    return [mx.default_stream(mx.default_device())] + [mx.new_stream(mx.default_device()) for _ in range(n - 1)]


def on_streams(streams: list, fn, items: list) -> list:
    """fn(item) for each item, item i built on stream i; lazy until the caller evaluates."""
    outs = []
    for stream, item in zip(streams, items):
        with mx.stream(stream):
            outs.append(fn(item))
    return outs


def _split(a: np.ndarray, cfg: Hyperparameters) -> list[np.ndarray]:
    rows = max(1, cfg.mlx_max_microbatch_tokens // cfg.train_seq_len)
    return [a[s:s + rows] for s in range(0, a.shape[0], rows)]


def _groups(items: list, streams: list) -> list[list]:
    return [items[i:i + len(streams)] for i in range(0, len(items), len(streams))]


class MLXBackend:
    """shared/loop.py's Backend for MLX: one process; streams, compiled graphs made once per model."""
    rank, world_size = 0, 1

    def __init__(self, cfg: Hyperparameters):
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ValueError("WORLD_SIZE must be 1 for mlx_train.py (one process; use cuda_train.py under torchrun)")
        auto = mx.bfloat16 if mx.metal.is_available() else mx.float32  # bf16 on a CPU is slow, not what CI checks
        self.dtype = auto if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]
        self.cfg = cfg
        self.streams = make_streams(cfg)  # once: new streams are new threads on a CPU

    def describe(self) -> str:
        ops = select_ops(self.cfg)
        segmented = uses_per_segment(ops, self.cfg.train_seq_len)
        doc = f" doc_attn:{'per_segment' if segmented else 'block_mask'}" if self.cfg.doc_isolated_attn else ""
        return (f"mlx-{mx.__version__} device:{mx.default_device()} dtype:{self.dtype} "
                f"ops:{ops.__name__} cpu_blas:{CPU_BLAS}{doc}")

    # -- model and optimizer state --
    def build(self, cfg: Hyperparameters, weights: dict[str, np.ndarray], train: bool,
              bos_id: int | None = None) -> None:
        self.bos_id = bos_id  # the tokenizer's; shared/ builds BOS-aware inputs from it
        check_bos_features(cfg, bos_id)  # fail before any compute
        self.model = build_model(cfg, weights, self.dtype, bos_id=bos_id)
        self.opts = Optimizers(self.model, cfg, self.dtype) if train else None
        # per-segment attention reads the segments on the host (shapes from the data): it cannot be compiled
        self.compile = cfg.mlx_compile and not (cfg.doc_isolated_attn
                                                and uses_per_segment(select_ops(cfg), cfg.train_seq_len))
        self.train_graphs = self.compile and train
        self.looping = cfg.num_loops > 0  # as the model is built
        self.graphs = {}  # (kind, looping) -> function, made on first use

    def set_looping(self, on: bool) -> None:
        """Depth recurrence on/off (RECORD_STACK.md §3.2). mx.compile fixes the model's flag at trace time,
        so each state gets its own compiled graphs (made lazily; prime runs both)."""
        self.looping = bool(on) and self.cfg.num_loops > 0  # NUM_LOOPS=0: one state, one set of graphs
        self.model.set_looping(self.looping)

    @property
    def nll_fn(self):
        key = ("nll", self.looping)
        if key not in self.graphs:
            # inputs=model.state: the weights are inputs of the compiled graphs, not constants of the first trace
            fn = self.model.token_nll
            self.graphs[key] = mx.compile(fn, inputs=self.model.state) if self.compile else fn
        return self.graphs[key]

    @property
    def loss_and_grad(self):
        key = ("grad", self.looping)
        if key not in self.graphs:
            # w: the chunk's share of the step mean, applied inside the compiled graph (no extra pass over grads)
            fn = nn.value_and_grad(self.model, lambda x, y, w, seg: self.model(x, y, seg) * w)
            self.graphs[key] = (mx.compile(fn, inputs=self.model.state, outputs=self.model.state)
                                if self.train_graphs else fn)
        return self.graphs[key]

    def weights(self) -> dict[str, np.ndarray]:
        return numpy_state(self.model)

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        load_numpy_state(self.model, weights)

    def optimizer_slots(self) -> dict:
        return self.opts.slots()

    def load_optimizer_slots(self, slots: dict) -> None:
        self.opts.load_slots(slots)

    # -- EMA of the weights (RECORD_STACK.md §5.6): an fp32 shadow, the twin of cuda_train.py's --
    def load_ema(self, weights: dict[str, np.ndarray]) -> None:
        names = [k for k, _ in tree_flatten(self.model.parameters())]
        self.ema = {k: mx.array(np.array(weights[k], dtype=np.float32)) for k in names}
        mx.eval(self.ema)

    def ema_update(self, decay: float) -> None:
        """shared.schedule.ema_step, bit for bit: d*ema and (1-d)*w each rounded in fp32, then summed (uncompiled
        ops: nothing fuses them into a multiply-add)."""
        live = dict(tree_flatten(self.model.parameters()))
        d, rest = mx.array(decay, dtype=mx.float32), mx.array(1.0 - decay, dtype=mx.float32)
        self.ema = {k: d * e + rest * live[k].astype(mx.float32) for k, e in self.ema.items()}
        mx.eval(self.ema)

    def ema_weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.ema.items()}

    # -- compute --
    def train_step(self, micro_batches: list, lr_scale: float, momentum: float) -> float:
        """One optimizer step over the 8 slots, each in chunks; returns the mean train loss.

        Chunks run MLX_STREAMS at a time, one per stream, and are summed in chunk order:
        the same result as one at a time, with memory bounded by MLX_STREAMS chunks.
        """
        chunks = []  # (x, y, weight): the chunk's share of the step's mean loss
        for x, y in micro_batches:
            for xc, yc in zip(_split(x, self.cfg), _split(y, self.cfg)):
                chunks.append((xc, yc, xc.shape[0] / x.shape[0] / len(micro_batches)))
        grads, total = None, mx.array(0.0)
        for group in _groups(chunks, self.streams):
            outs = on_streams(self.streams, lambda c: self.loss_and_grad(mx.array(c[0]), mx.array(c[1]),
                                                                         mx.array(c[2], dtype=mx.float32),
                                                                         self._segments(c[0])), group)
            for loss, g in outs:
                grads = g if grads is None else tree_map(mx.add, grads, g)
                total = total + loss
            mx.eval(grads, total)  # a group's graphs at a time: flat memory
        self.opts.step(dict(tree_flatten(grads)), lr_scale, momentum)
        return float(total.item())

    def _segments(self, x: np.ndarray) -> mx.array | None:
        """DOC_ISOLATED_ATTN: segment ids of the rows x (shared/segments.py); None: dense causal."""
        if not self.cfg.doc_isolated_attn:
            return None
        return mx.array(segment_ids(x, require_bos(self.bos_id), self.cfg.train_seq_len))

    def evaluate(self, data: bpb.EvalData, log=None) -> bpb.BpbAccumulator:
        """Scores each batch in chunks of MLX_MAX_MICROBATCH_TOKENS, a group of streams at a time: bounded memory.
        Each window is a row: under DOC_ISOLATED_ATTN the row-start rule applies to it."""
        def score(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            parts = []
            for group in _groups(list(zip(_split(x, self.cfg), _split(y, self.cfg))), self.streams):
                outs = on_streams(self.streams, lambda c: self.nll_fn(mx.array(c[0]), mx.array(c[1]),
                                                                      self._segments(c[0])), group)
                mx.eval(outs)
                parts += [np.array(o) for o in outs]
            return np.concatenate(parts)

        batch = bpb.windows_per_batch(self.cfg.val_batch_size, self.cfg.train_seq_len)
        return bpb.evaluate(score, data.tokens, data.windows, self.cfg.train_seq_len, data.target_bytes, batch,
                            progress=bpb.progress_logger(log))

    def hessians(self, cfg: Hyperparameters, batches: list) -> dict[str, np.ndarray]:
        """GPTQ's Hessians of the current weights on these training micro-batches (mlx_model.collect_hessians),
        each split into MLX_MAX_MICROBATCH_TOKENS chunks of rows; uncompiled (the taps are host callbacks)."""
        chunks = [(mx.array(c), self._segments(c)) for x, _ in batches for c in _split(x, self.cfg)]
        return collect_hessians(self.model, chunks, gptq_targets(cfg), divisor=len(batches))

    def gptq_solver(self, cfg: Hyperparameters) -> None:
        """GPTQ_SOLVER numpy or auto: the numpy reference; torch is refused (loop.preflight asks before training)."""
        if cfg.gptq_solver == "torch":
            raise ValueError("GPTQ_SOLVER=torch runs in cuda_train.py; mlx_train.py solves in numpy (numpy or auto)")
        return None

    def ttt_engine(self) -> MLXTTT:
        """Score-first TTT over the built model (RECORD_STACK.md §7.2; mlx_ttt.py)."""
        return MLXTTT(self.model, self.cfg, require_bos(self.bos_id, "TTT_ENABLED"))

    # -- collectives (one process) and machine --
    def any_rank(self, flag: bool) -> bool:
        return flag

    def max_over_ranks(self, value: float) -> float:
        return value

    def broadcast_text(self, text: str) -> str:
        return text

    def sync(self) -> None:
        pass

    def memory_bytes(self) -> int | None:
        if mx.metal.is_available():
            return int(mx.metal.device_info()["memory_size"])
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def tokens_in_flight(self, cfg: Hyperparameters) -> int:
        rows = max(1, cfg.mlx_max_microbatch_tokens // cfg.train_seq_len)  # as _split cuts them
        return rows * cfg.train_seq_len * len(self.streams)

    def peak_memory_line(self) -> str:
        if mx.metal.is_available():
            return f"peak memory allocated: {mx.get_peak_memory() // 2**20} MiB"
        return rss_peak_line()

    def finish(self) -> None:
        pass


if __name__ == "__main__":
    loop.main(MLXBackend, __file__, CUDA_TRAINER)
