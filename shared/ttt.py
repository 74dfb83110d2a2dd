"""Score-first test-time training (RECORD_STACK.md §7.2), the framework-free half: plan, driver, ledger.

The record's scored number: every validation document is scored chunk by chunk with per-document LoRA adapters
that train, after each chunk is scored, on that chunk; at phase boundaries the base weights train (SGD) on the
documents already scored. This module decides everything that is not tensor maths, once for both trainers:

- documents: split at BOS, doc i = tokens[BOS_i .. BOS_{i+1}] inclusive of the next BOS (find_docs);
- batches: docs sorted by length, cut into TTT_BATCH_SIZE, the queue in descending length (batch_queue);
- work split: TTT_STREAMS virtual streams, stream s owning queue items s, s+S, ... and carrying its own warm-started
  A; rank r owns streams r, r+W, ... So what a document is scored with depends on the plan only, never on the world
  size or on timing (the record claims batches through a file-locked counter: timing-dependent, §10.4 item 14);
- chunks: window of up to TTT_EVAL_SEQ_LEN tokens of the document's own context ending at the chunk (chunk_rows);
- phases: boundaries are document counts of the queue (phase_cuts), never timings;
- accounting: float64 sums per document (bytes from EvalData.target_bytes at each target's position), reduced
  across ranks, summed in document order: without global phases the same BPB to the last bit for any world size
  up to TTT_STREAMS (streams are whole units of work); a phase's all-reduced SGD gradient rounds by world size;
- legality: the driver scores a chunk (adds it to the sums and to the ledger) before it asks for the update that
  uses it; Ledger.check replays the events and raises TTTLegalityError on any update that precedes the score of a
  token it used. It runs at the end of every TTT evaluation.

A trainer supplies an Engine (torch_ttt.py / mlx_ttt.py): adapters, forward, AdamW step, global SGD step.
"""
from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable, Protocol

import numpy as np

from shared.bpb import BpbAccumulator, EvalData
from shared.config import Hyperparameters
from shared.spec import layer_plan

ADAM_EPS = 1e-10  # the record's LoRA AdamW eps (§7.2), not a library default
FULL_VAL_DOCS = 50_000  # documents of the FineWeb validation split the record scores (RECORD_STACK.md §1, §7.2)
EVAL_BUDGET_S = 600.0  # the challenge's evaluation budget on 8xH100; TTT must fit in it
LORA_TARGETS = ("q", "k", "v", "o", "mlp")  # per layer application; plus "head" once


class TTTLegalityError(RuntimeError):
    """An update used a token before that token was scored: the score would be invalid."""


# ---- documents, batches, streams ----
def find_docs(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """(D, 2) int64 rows [start, n_pred]: doc = tokens[start : start + n_pred + 1], from a BOS through the next BOS
    (its last target is "end of document"); the last runs to the end of the split. Tokens before the first BOS
    (a split not starting with one) form a document too, so every target position is predicted exactly once."""
    if bos_id is None or bos_id < 0:
        raise ValueError("TTT_ENABLED=1 needs the tokenizer's BOS id to split documents; TOKENIZER_PATH has none")
    starts = np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.concatenate([starts[1:], [tokens.size - 1]])
    docs = np.stack([starts, ends - starts], axis=1)
    return docs[docs[:, 1] > 0]


@dataclass(frozen=True)
class Batch:
    index: int  # position in the ascending-length order (the record's "original batch index")
    docs: np.ndarray  # document ids, ascending length


def batch_queue(docs: np.ndarray, batch_size: int) -> list[Batch]:
    """Docs sorted by length (stable: ties by id), cut into batches; the queue runs longest batch first (§7.2)."""
    order = np.argsort(docs[:, 1], kind="stable")
    batches = [Batch(i, order[a:a + batch_size]) for i, a in enumerate(range(0, order.size, batch_size))]
    return sorted(batches, key=lambda b: (-int(docs[b.docs, 1].max()), b.index))


def stream_items(n_items: int, streams: int, stream: int) -> list[int]:
    """Queue positions owned by a stream: stream, stream + S, ..."""
    return list(range(stream, n_items, streams))


def rank_streams(streams: int, rank: int, world_size: int) -> list[int]:
    """Whole streams per rank (rank r: r, r + W, ...): a stream's computation never depends on the world size."""
    return list(range(rank, streams, world_size))


# ---- chunks ----
def n_chunks(n_pred: int, chunk: int) -> int:
    return -(-int(n_pred) // chunk)


@dataclass
class ChunkRows:
    """One lock-step chunk of a batch: rows padded with id 0 after each window's end."""
    x: np.ndarray  # (B, T) int64 inputs
    y: np.ndarray  # (B, T) int64 targets
    scored: np.ndarray  # (B, T) bool: this chunk's new predictions
    positions: np.ndarray  # (B, T) int64: global target position (index into EvalData.target_bytes), -1 elsewhere
    weights: np.ndarray  # (B, T) float32: training loss weights, 1/len(chunk) on docs with a later chunk, else 0
    active: np.ndarray  # (B,) bool: docs that still have this chunk
    trains: np.ndarray  # (B,) bool: docs whose chunk enters the update


def chunk_rows(tokens: np.ndarray, docs: np.ndarray, doc_ids: np.ndarray, c: int, chunk: int, seq_len: int,
               slots: int) -> ChunkRows:
    """Chunk c of each doc: predictions [c*chunk, end), end = min((c+1)*chunk, P), window [end - seq_len, end)
    clipped at the doc start. Row length: the longest window, rounded up to a multiple of the chunk (fewer shapes)."""
    starts, n_pred = docs[doc_ids, 0], docs[doc_ids, 1]
    ends = np.minimum((c + 1) * chunk, n_pred)
    active = c * chunk < n_pred
    wins = np.maximum(0, ends - seq_len)
    width = int(max(1, (ends - wins)[active].max(initial=1)))
    width = min(seq_len, -(-width // chunk) * chunk)
    shape = (slots, width)
    x, y = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    scored, weights = np.zeros(shape, bool), np.zeros(shape, np.float32)
    positions = np.full(shape, -1, np.int64)
    trains = active & (ends < n_pred)
    for i in np.flatnonzero(active):
        lo, hi = starts[i] + wins[i], starts[i] + ends[i]  # global input range
        n = hi - lo
        x[i, :n], y[i, :n] = tokens[lo:hi], tokens[lo + 1:hi + 1]
        first = c * chunk - wins[i]  # the chunk's first prediction inside the window
        scored[i, first:n] = True
        positions[i, first:n] = np.arange(lo + first, hi)
        if trains[i]:
            weights[i, first:n] = 1.0 / (n - first)  # the record's per-doc mean over the chunk
    return ChunkRows(x, y, scored, positions, weights, np.pad(active, (0, slots - active.size)),
                     np.pad(trains, (0, slots - trains.size)))


def chunk_widths(cfg: Hyperparameters) -> list[int]:
    """Every row width chunk_rows can produce: multiples of the chunk below the window, and the window."""
    chunk, seq = cfg.ttt_chunk_size, cfg.ttt_eval_seq_len
    return list(range(chunk, seq, chunk)) + [seq]


def warmup_widths(cfg: Hyperparameters) -> list[int]:
    """Widths a compiled engine warms up on before the timed evaluation: the first two (dynamo compiles the first
    static, the second with the width symbolic) and the widest (the largest activations)."""
    widths = chunk_widths(cfg)
    return sorted(set(widths[:2] + widths[-1:]))


# ---- adapters ----
def lora_shapes(cfg: Hyperparameters) -> list[dict[str, tuple[int, int]]]:
    """(in, out) of every adapter: one dict per layer application of the looped plan (looped passes get their own),
    then the head's. The o adapter reads the block's normed input n (dim -> dim), the MLP one the MLP's input."""
    plan = layer_plan(cfg, cfg.num_loops > 0)
    dim, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    app = {"q": (dim, dim), "v": (dim, kv)}
    if cfg.ttt_k_lora:
        app["k"] = (dim, kv)
    if cfg.ttt_o_lora:
        app["o"] = (dim, dim)
    if cfg.ttt_mlp_lora:
        app["mlp"] = (dim, dim)
    return [dict(app) for _ in range(len(plan.encoder) + len(plan.decoder))] + [{"head": (dim, cfg.vocab_size)}]


# ---- adapters' A: counter-based hashing, the same bits in numpy, torch and MLX on any device ----
# A is drawn afresh for every (stream, generation): 225M values at the record's size. A host generator took 3.4 s a
# draw (float64 PCG64, one core) plus the copy to the device, probably most of the one-GPU smoke run's TTT time. A
# hash of the element's index is computed where the tensor lives (milliseconds on a GPU), the same bits everywhere.
M32 = 0xFFFF_FFFF
HASH_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)  # lowbias32 (Chris Wellons, "hash-prospector", public domain)
UNIFORM_STEP = 2.0 ** -23  # 24 hashed bits -> [0, 2) on a grid exact in float32


@dataclass(frozen=True)
class AInit:
    """One adapter's A: shape (slots, r, in); element e = hash(e, keys) -> U[-1, 1) on a 2^-23 grid, times scale."""
    shape: tuple[int, int, int]
    keys: tuple[int, int]  # 32-bit keys of this tensor
    scale: float  # float32(1/sqrt(in)), held as the exact Python float

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def mix32(x, wrapping: bool):
    """lowbias32 on an integer array of any framework holding uint32 values, updated in place where the framework
    allows (x is consumed): x ^= x >> 16; x *= m1; x ^= x >> 15; x *= m2; x ^= x >> 15 (mod 2^32). wrapping: x is
    uint32 (products wrap); else int64, and each product, below 2^63 because both multipliers are below 2^31, is
    masked back to 32 bits."""
    for shift, mult in zip((16, 15), HASH_MULTIPLIERS):
        x ^= x >> shift
        x *= mult
        if not wrapping:
            x &= M32
    x ^= x >> 15
    return x


def a_values(index, init: AInit, to_float32: Callable, wrapping: bool):
    """A's flat values from index = arange(init.size) of the framework's integer array (uint32 when wrapping, else
    int64): two keyed rounds, the top 24 bits as u in [0, 2^24); (u * 2^-23 - 1) is exact in float32, * scale is
    its one rounding (IEEE, the same in every framework)."""
    h = mix32(index ^ init.keys[0], wrapping)
    h ^= init.keys[1]
    h = mix32(h, wrapping)
    a = to_float32(h >> 8)
    a *= UNIFORM_STEP
    a -= 1.0
    a *= init.scale
    return a


def lora_a_spec(cfg: Hyperparameters, slots: int, stream: int, generation: int) -> list[dict[str, AInit]]:
    """A ~ U(+-1/sqrt(in)) for every adapter, (slots, r, in), keyed by (SEED, stream, generation, application,
    target): both frameworks start from the same adapters, and a stream's draws do not depend on which rank runs it."""
    if slots * cfg.ttt_lora_rank * cfg.model_dim >= 2 ** 32:
        raise ValueError(f"TTT_BATCH_SIZE={slots} x TTT_LORA_RANK={cfg.ttt_lora_rank} x MODEL_DIM={cfg.model_dim} "
                         "must be < 2^32: an adapter's elements are numbered by 32-bit counters")
    out = []
    for j, app in enumerate(lora_shapes(cfg)):
        out.append({k: AInit((slots, cfg.ttt_lora_rank, i), _tensor_keys(cfg.seed, stream, generation, j, k),
                             float(np.float32(1.0 / math.sqrt(i)))) for k, (i, _) in app.items()})
    return out


def _tensor_keys(*parts) -> tuple[int, int]:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def a_numpy(init: AInit) -> np.ndarray:
    """The reference values (uint32 arithmetic in numpy: 3.45 s for the record's 225M on one core)."""
    index = np.arange(init.size, dtype=np.uint32)
    return a_values(index, init, lambda h: h.astype(np.float32), True).reshape(init.shape)


def lora_a_init(cfg: Hyperparameters, slots: int, stream: int, generation: int) -> list[dict[str, np.ndarray]]:
    """lora_a_spec's tensors in numpy (tests, and engines on the CPU)."""
    return [{k: a_numpy(init) for k, init in app.items()} for app in lora_a_spec(cfg, slots, stream, generation)]


# ---- phases and global SGD ----
def phase_boundaries(prefix_docs: int, num_phases: int) -> list[int]:
    """Document counts floor(prefix * k / phases), k = 1..phases (2500, 3 -> 833, 1666, 2500)."""
    return [prefix_docs * k // num_phases for k in range(1, num_phases + 1)] if num_phases > 0 else []


def phase_cuts(queue: list[Batch], boundaries: list[int]) -> list[int]:
    """Queue positions where each phase pauses: the first q whose batches [0, q) hold >= boundary docs. Scoring
    of every queue item before q completes (on all ranks) before the global SGD of that phase starts."""
    counts = np.cumsum([b.docs.size for b in queue])
    cuts = []
    for b in boundaries:
        q = int(np.searchsorted(counts, b, side="left")) + 1
        if q <= len(queue) and (not cuts or q > cuts[-1]):
            cuts.append(q)
    return cuts


def phase_docs(queue: list[Batch], cut: int, boundary: int) -> np.ndarray:
    """The docs a phase trains on: those of queue[:cut], sorted by (batch index, position) = ascending length, the
    first `boundary` of them (the record's cut keeps the shorter of the scored docs)."""
    ordered = sorted(queue[:cut], key=lambda b: b.index)
    return np.concatenate([b.docs for b in ordered])[:boundary]


def global_sgd_rows(tokens: np.ndarray, docs: np.ndarray, doc_ids: np.ndarray, chunk_tokens: int,
                    seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The phase's docs concatenated (each ending with the next doc's BOS: "BOS BOS" joins, §10.4 item 16), cut into
    chunks of chunk_tokens targets as rows of seq_len; a final partial chunk is skipped. One SGD step per chunk."""
    stream = np.concatenate([tokens[s:s + n + 1] for s, n in docs[doc_ids]]).astype(np.int64)
    per = chunk_tokens // seq_len * seq_len
    out = []
    for a in range(0, stream.size - 1 - per + 1, per):
        out.append((stream[a:a + per].reshape(-1, seq_len), stream[a + 1:a + per + 1].reshape(-1, seq_len)))
    return out


def global_sgd_lr(base: float, c: int, n_chunks: int, warmup: int = 0) -> float:
    """lr_c = base * 1/2 (1 + cos(pi c / (n - 1))), after `warmup` linear chunks (the record uses 0)."""
    if c < warmup:
        return base * (c + 1) / warmup
    span = max(1, n_chunks - 1 - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * (c - warmup) / span))


# ---- the ledger ----
@dataclass
class Ledger:
    """Events in the order they happened: ("score", chunk, docs), ("update", chunk, docs) for a LoRA step on
    chunk `chunk` of those docs, ("global", -1, docs) for a base-weight step on whole docs, ("sync", -1, counts)
    for the scored-chunk counts of every doc merged across ranks (before a global phase)."""
    n_docs: int
    events: list = field(default_factory=list)

    def score(self, chunk: int, docs: np.ndarray) -> None:
        self.events.append(("score", chunk, np.asarray(docs, np.int64)))

    def update(self, chunk: int, docs: np.ndarray) -> None:
        self.events.append(("update", chunk, np.asarray(docs, np.int64)))

    def global_update(self, docs: np.ndarray) -> None:
        self.events.append(("global", -1, np.asarray(docs, np.int64)))

    def sync(self, counts: np.ndarray) -> None:
        self.events.append(("sync", -1, np.asarray(counts, np.int64)))

    def scored_counts(self) -> np.ndarray:
        counts = np.zeros(self.n_docs, np.int64)
        for kind, _, docs in self.events:
            if kind == "score":
                counts[docs] += 1
        return counts

    def check(self, chunks_per_doc: np.ndarray, own: np.ndarray) -> None:
        """Replay: chunks scored once each and in order; a LoRA update on chunk c only after c was scored and never
        before the score of a chunk <= c (it would have seen that chunk's targets); a global step only on fully
        scored docs; every doc in `own` (this rank's) fully scored. Raises TTTLegalityError naming doc and chunk."""
        nxt = np.zeros(self.n_docs, np.int64)  # next chunk to score
        seen = np.full(self.n_docs, -1, np.int64)  # highest chunk any update has used
        for i, (kind, c, docs) in enumerate(self.events):
            if kind == "sync":
                nxt = np.maximum(nxt, docs)
                continue
            if kind == "score":
                _fail(docs, nxt[docs] != c, i, f"chunk {c} scored out of order or twice")
                _fail(docs, seen[docs] >= c, i, f"chunk {c} scored after an update that used it")
                nxt[docs] += 1
            elif kind == "update":
                _fail(docs, nxt[docs] <= c, i, f"update on chunk {c} before it was scored")
                seen[docs] = np.maximum(seen[docs], c)
            else:
                _fail(docs, nxt[docs] < chunks_per_doc[docs], i, "global step on a doc not fully scored")
                seen[docs] = chunks_per_doc[docs]
        _fail(own, nxt[own] != chunks_per_doc[own], len(self.events), "not every chunk scored")


def _fail(docs: np.ndarray, bad: np.ndarray, event: int, what: str) -> None:
    if np.any(bad):
        raise TTTLegalityError(f"TTT legality check: doc {int(docs[np.argmax(bad)])}: {what} (event {event})")


# ---- time: each phase's seconds, the throughput, the projected time of the full split ----
@dataclass(frozen=True)
class Projection:
    """The full validation split's TTT seconds on this hardware, from this run's throughput (RECORD_STACK.md §7.2:
    the record's TTT must fit in EVAL_BUDGET_S on 8xH100). Scoring time scales with predicted tokens, not
    documents (their lengths vary 1000-fold); the global SGD phases' seconds are added as measured (their size is
    PHASED_TTT_PREFIX_DOCS's, not the split's). full_tokens: the split's predictions when all FULL_VAL_DOCS
    documents are loaded ("loaded"), else this run's tokens per document times FULL_VAL_DOCS ("per_doc")."""
    docs: int  # documents scored, all ranks
    tokens: int  # predictions scored, all ranks
    seconds: float  # this rank's wall time of the whole TTT evaluation
    score_seconds: float  # of which LoRA scoring (ranks score concurrently: docs / seconds is the machine's rate)
    sgd_seconds: float  # of which global SGD
    full_tokens: float
    full_tokens_from: str
    world_size: int
    sgd_phases: str = "0/0"  # phases run / configured: fewer run than configured makes the projection low
    budget_s: float = EVAL_BUDGET_S

    @property
    def projected_s(self) -> float:
        return self.score_seconds * self.full_tokens / max(self.tokens, 1) + self.sgd_seconds

    def line(self) -> str:
        rate = max(self.seconds, 1e-9)
        return (f"ttt_projection docs:{self.docs} tokens:{self.tokens} seconds:{self.seconds:.2f} "
                f"score_seconds:{self.score_seconds:.2f} sgd_seconds:{self.sgd_seconds:.2f} "
                f"docs_per_s:{self.docs / rate:.2f} tokens_per_s:{self.tokens / rate:.0f} "
                f"full_docs:{FULL_VAL_DOCS} full_tokens:{self.full_tokens:.0f} "
                f"full_tokens_from:{self.full_tokens_from} "
                f"sgd_phases:{self.sgd_phases} projected_50k_docs_s:{self.projected_s:.1f} "
                f"world_size:{self.world_size} budget_s:{self.budget_s:.0f}")

    def warning(self) -> str | None:
        if self.projected_s <= self.budget_s:
            return None
        return (f"WARNING ttt_projection: {self.projected_s:.0f} s projected for the {FULL_VAL_DOCS} validation "
                f"documents on world_size {self.world_size} exceeds the {self.budget_s:.0f} s evaluation budget")


def project(docs: int, tokens: int, score_s: float, sgd_s: float, seconds: float, loaded_docs: int,
            loaded_tokens: int, world_size: int, sgd_phases: str = "0/0") -> Projection:
    """Projection from a run's counts; loaded_*: the split in memory (all of it scored by the ranks together)."""
    if loaded_docs >= FULL_VAL_DOCS:
        full, source = float(loaded_tokens) * FULL_VAL_DOCS / loaded_docs, "loaded"
    else:
        full, source = float(tokens) / max(docs, 1) * FULL_VAL_DOCS, "per_doc"
    return Projection(docs, tokens, seconds, score_s, sgd_s, full, source, world_size, sgd_phases)


class PhaseTimer:
    """Seconds of every scoring segment (between phase cuts) and every global SGD phase, logged as each ends."""

    def __init__(self, clock: Callable[[], float], log: Callable[[str], None] | None):
        self.clock, self.log = clock, log
        self.start = clock()
        self.score_s = self.sgd_s = 0.0

    @contextmanager
    def scoring(self, segment: int, segments: int, docs: int, tokens_col: np.ndarray):
        t0, before = self.clock(), float(tokens_col.sum())
        yield
        dt = self.clock() - t0
        self.score_s += dt
        tokens = float(tokens_col.sum()) - before
        if self.log is not None:
            self.log(f"ttt_timing:score segment:{segment + 1}/{segments} seconds:{dt:.2f} docs:{docs} "
                     f"tokens:{tokens:.0f} docs_per_s:{docs / max(dt, 1e-9):.2f} "
                     f"tokens_per_s:{tokens / max(dt, 1e-9):.0f} (this rank)")

    @contextmanager
    def sgd(self, phase: int):
        t0 = self.clock()
        yield
        dt = self.clock() - t0
        self.sgd_s += dt
        if self.log is not None:
            self.log(f"ttt_timing:global_sgd phase:{phase + 1} seconds:{dt:.2f}")

    def project(self, docs: int, tokens: int, loaded_docs: int, loaded_tokens: int, world_size: int,
                phases_run: int, phases: int) -> Projection:
        proj = project(docs, tokens, self.score_s, self.sgd_s, self.clock() - self.start, loaded_docs,
                       loaded_tokens, world_size, f"{phases_run}/{phases}")
        if self.log is not None:
            self.log(proj.line())
            if proj.warning():
                self.log(proj.warning())
        return proj


# ---- the driver ----
class Engine(Protocol):
    """A framework's TTT side. forward must not change any weight; update applies the step it prepared."""
    def warm_up(self) -> float: ...  # compile (if it does) on synthetic ids before the timed evaluation; seconds
    def new_lora(self, a_init: list[dict[str, AInit]]): ...  # adapters: A as specified, B = 0, Adam state 0
    def reset(self, lora, a_init: list[dict[str, AInit]] | None) -> None: ...  # B, moments, step <- 0; A if given
    def forward(self, lora, x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray: ...  # (B, T) nll
    def update(self, lora) -> None: ...  # one AdamW step on sum(weights * nll) of the last forward
    def global_step(self, x: np.ndarray, y: np.ndarray, lr: float,
                    first: bool) -> float: ...  # collective SGD step on the base weights; first: momentum <- 0
    def reduce_sum(self, values: np.ndarray) -> np.ndarray: ...  # collective SUM across ranks (float64)


@dataclass
class TTTResult:
    acc: BpbAccumulator
    doc_nll: np.ndarray  # (D,) float64 nats per doc (after the reduce)
    docs: np.ndarray
    ledger: Ledger
    position_nll: np.ndarray  # (N-1,) float32 nats by target position, this rank's docs only (0 elsewhere)
    projection: Projection | None = None  # the full split's projected time (evaluate_ttt's last log lines)


@dataclass
class _Run:
    cfg: Hyperparameters
    data: EvalData
    docs: np.ndarray
    ledger: Ledger
    sums: np.ndarray  # (D, 3) float64: nll, tokens, bytes
    position_nll: np.ndarray  # (N-1,) float32, for the isolation tests and diagnostics


def score_then_update(engine: Engine, lora, run: _Run, rows: ChunkRows, doc_ids: np.ndarray, c: int) -> None:
    """Legal order by construction: the chunk's loss goes into the sums (and the ledger) before its update."""
    nll = np.asarray(engine.forward(lora, rows.x, rows.y, rows.weights), np.float64)
    add_scores(run, rows, nll, doc_ids, c)
    if rows.trains.any():
        engine.update(lora)
        run.ledger.update(c, doc_ids[rows.trains[:doc_ids.size]])


def add_scores(run: _Run, rows: ChunkRows, nll: np.ndarray, doc_ids: np.ndarray, c: int) -> None:
    for i in np.flatnonzero(rows.active[:doc_ids.size]):
        m = rows.scored[i]
        run.sums[doc_ids[i]] += (nll[i, m].sum(), m.sum(), run.data.target_bytes[rows.positions[i, m]].sum())
        run.position_nll[rows.positions[i, m]] = nll[i, m]
    run.ledger.score(c, doc_ids[rows.active[:doc_ids.size]])


def run_batch(engine: Engine, lora, run: _Run, batch: Batch) -> None:
    cfg = run.cfg
    for c in range(n_chunks(run.docs[batch.docs, 1].max(), cfg.ttt_chunk_size)):
        rows = chunk_rows(run.data.tokens, run.docs, batch.docs, c, cfg.ttt_chunk_size, cfg.ttt_eval_seq_len,
                          cfg.ttt_batch_size)
        score_then_update(engine, lora, run, rows, batch.docs, c)


def run_stream_items(engine: Engine, run: _Run, queue: list[Batch], items: list[tuple[int, int]],
                     generation: int) -> None:
    """Each stream's batches in order (items: (stream, queue position), stream by stream). Between batches B and
    the Adam state reset; A is kept (TTT_WARM_START_A) or drawn afresh. A stream's first batch of a segment (phases
    cut segments) gets a brand-new LoRA, dropped after its last: one adapter set alive at a time (4.98 GiB at the
    record's size), not one per stream of the rank."""
    cfg = run.cfg
    for s, owned in groupby(items, key=lambda item: item[0]):
        lora = None
        for _, q in owned:
            if lora is None:
                lora = engine.new_lora(lora_a_spec(cfg, cfg.ttt_batch_size, s, generation))
            else:
                fresh = None if cfg.ttt_warm_start_a else lora_a_spec(cfg, cfg.ttt_batch_size, s,
                                                                     1000 * generation + q)
                engine.reset(lora, fresh)
            run_batch(engine, lora, run, queue[q])


def evaluate_ttt(engine: Engine, data: EvalData, cfg: Hyperparameters, rank: int = 0, world_size: int = 1,
                 log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> TTTResult:
    """The whole TTT score: LoRA TTT over the queue, global SGD at each phase cut, the legality check, the BPB.
    Each phase is timed with `clock` (seconds) and logged; the last lines project the full split's time."""
    docs = find_docs(data.tokens, data.bos_id)
    queue = batch_queue(docs, cfg.ttt_batch_size)
    run = _Run(cfg, data, docs, Ledger(len(docs)), np.zeros((len(docs), 3), np.float64),
               np.zeros(max(data.tokens.size - 1, 0), np.float32))
    mine = rank_streams(cfg.ttt_streams, rank, world_size)
    boundaries = phase_boundaries(cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    cuts = phase_cuts(queue, boundaries)
    timer = PhaseTimer(clock, log)
    lo = 0
    for gen, hi in enumerate(cuts + [len(queue)]):
        items = [(s, q) for s in mine for q in stream_items(len(queue), cfg.ttt_streams, s) if lo <= q < hi]
        with timer.scoring(gen, len(cuts) + 1, sum(queue[q].docs.size for _, q in items), run.sums[:, 1]):
            run_stream_items(engine, run, queue, items, gen)
        if gen < len(cuts):
            run.ledger.sync(engine.reduce_sum(run.ledger.scored_counts().astype(np.float64)).astype(np.int64))
            with timer.sgd(gen):
                train_phase(engine, run, phase_docs(queue, hi, boundaries[gen]), log, gen)
        if log is not None:
            log(f"ttt_progress:{hi}/{len(queue)} batches")
        lo = hi
    chunks = np.array([n_chunks(n, cfg.ttt_chunk_size) for n in docs[:, 1]], np.int64)
    own = np.concatenate([queue[q].docs for s in mine for q in stream_items(len(queue), cfg.ttt_streams, s)] +
                         [np.zeros(0, np.int64)])
    run.ledger.check(chunks, own)
    sums = engine.reduce_sum(run.sums.copy())
    acc = BpbAccumulator(np.array([sums[:, 0].sum(), sums[:, 1].sum(), sums[:, 2].sum()], np.float64))
    proj = timer.project(len(docs), int(sums[:, 1].sum()), len(docs), int(docs[:, 1].sum()), world_size,
                         len(cuts), len(boundaries))
    return TTTResult(acc, sums[:, 0], docs, run.ledger, run.position_nll, proj)


def train_phase(engine: Engine, run: _Run, doc_ids: np.ndarray, log, phase: int) -> None:
    """Global SGD on the base weights over already-scored docs (every rank the same rows; the engine splits them)."""
    cfg = run.cfg
    run.ledger.global_update(doc_ids)
    rows = global_sgd_rows(run.data.tokens, run.docs, doc_ids, cfg.global_ttt_chunk_tokens, cfg.ttt_eval_seq_len)
    steps = len(rows) * cfg.global_ttt_epochs
    for k in range(steps):
        x, y = rows[k % len(rows)]
        loss = engine.global_step(x, y, global_sgd_lr(cfg.global_ttt_lr, k, steps, cfg.global_ttt_warmup_chunks),
                                  k == 0)
    if log is not None:
        log(f"ttt_phase:{phase + 1} docs:{doc_ids.size} sgd_steps:{steps}"
            + (f" last_loss:{loss:.4f}" if steps else ""))
