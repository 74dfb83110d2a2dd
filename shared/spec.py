"""The parameter table: every tensor either model holds, declared once.

Each row gives a parameter's name, shape, init rule, optimizer group and how
the artifact stores it. Both models are built to match the table exactly
(strict loads, no rename maps), initial weights are drawn here in numpy from
SEED (so MLX and torch start from the same bits), the optimizers take their
groups from it, and checkpoints check their slots against it.

A model feature adds its rows in one function below; nothing else lists
parameter names.

    rows = param_table(cfg)           # in init draw order
    plan = layer_plan(cfg, looping)   # which layer each application runs, and its U-Net skip slot
    state = init_params(cfg)          # name -> float32 array
    optimizer_group(name, cfg)        # 'tok' | 'head' | 'matrix' | 'scalar'; unknown name -> ValueError
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from shared.config import MICRO_BATCHES_PER_STEP, Hyperparameters, implementation

# Optimizer groups (as the official baseline splits them) and the optimizer state each keeps.
GROUP_OPTIMIZER = {"tok": "adam", "head": "adam", "scalar": "adam", "matrix": "muon"}
OPTIMIZER_SLOTS = {"adam": ("m", "v", "step"), "muon": ("momentum",)}
# How the artifact stores a row: 'control' tensors (small per-channel gains) stay fp32 when small;
# 'weight' tensors are quantized (see shared/quant/); 'gate' tensors are small matrices the int8 scheme keeps
# exact (fp32, as 'control') and the gptq scheme stores int8 per row (the record's GATED_ATTN_QUANT_GATE, §6.3).
STORE_KINDS = ("control", "weight", "gate")
INIT_RULES = ("normal", "zeros", "ones", "const", "resid_mix", "linear_uniform", "orthogonal")

# Newton-Schulz quintic coefficients for Muon's orthogonalisation (Keller Jordan's Muon,
# as in the official baseline): 5 steps push singular values into about [0.7, 1.2].
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign Methods and Their
# Application to the Muon Algorithm"), one (a, b, c) per iteration, as used by the modded-nanogpt speedruns and
# the parameter-golf records (RECORD_STACK.md §5.3): each step is the minimax-optimal odd quintic for the interval
# the previous steps leave the singular values in, so 5 steps land much closer to 1 than the fixed quintic.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ROW_NORM_EPS = 1e-7  # MuonEq-R: each row divided by max(||row||_2, ROW_NORM_EPS)


# MUON_NS: steps -> the (a, b, c) of each iteration. Polar Express with fewer than its 5 steps runs the first
# ones; with more it repeats the last tuple (the paper's reference code does the same).
NS_KINDS = {
    "quintic": lambda steps: (NS_COEFFS,) * steps,
    "polar_express": lambda steps: (POLAR_EXPRESS_COEFFS[:steps]
                                    + (POLAR_EXPRESS_COEFFS[-1],) * max(0, steps - len(POLAR_EXPRESS_COEFFS))),
}


def same_shape_buckets(items: list, shape_of: Callable[[Any], tuple]) -> list[list]:
    """Items (matrices, or their names) grouped by shape, buckets and members in first-appearance order: the
    batched and parallel Muon's buckets (RECORD_STACK.md §5.3), one rule for both twins."""
    buckets: dict[tuple, list] = {}
    for item in items:
        buckets.setdefault(tuple(shape_of(item)), []).append(item)
    return list(buckets.values())


def ns_coefficients(kind: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of `steps` Newton-Schulz iterations of MUON_NS=kind (NS_KINDS)."""
    return implementation(NS_KINDS, "muon_ns", kind, "shared/spec.py")(steps)


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    init: str  # one of INIT_RULES
    group: str  # key of GROUP_OPTIMIZER
    store: str  # one of STORE_KINDS
    value: float = 0.0  # std for 'normal', the constant for 'const'

    def __post_init__(self):
        assert self.init in INIT_RULES and self.group in GROUP_OPTIMIZER and self.store in STORE_KINDS, self


@dataclass(frozen=True)
class LayerPlan:
    """One forward's walk over the physical layers: encoder applications push their output on the U-Net
    stack; decoder application j pops the most recent one with skip slot skip_slots[j] (None: no skip)."""
    encoder: tuple[int, ...]
    decoder: tuple[int, ...]
    skip_slots: tuple[int | None, ...]


def layer_schedule(cfg: Hyperparameters, looping: bool) -> tuple[list[int], list[int]]:
    """(encoder, decoder) physical layer indices, the sequence split at half its length.

    Unlooped: 0..L-1. Looped (NUM_LOOPS > 0, RECORD_STACK.md §3.2): LOOP_START..LOOP_END run NUM_LOOPS+1 times,
    e.g. L=11, 3..5, 2 loops: [0,1,2,3,4,5,3,4] | [5,3,4,5,6,7,8,9,10]."""
    order = list(range(cfg.num_layers))
    if looping and cfg.num_loops > 0:
        start, end = cfg.loop_start, cfg.loop_end
        order = order[:start] + order[start:end + 1] * (cfg.num_loops + 1) + order[end + 1:]
    half = len(order) // 2
    return order[:half], order[half:]


def num_skip_weights(cfg: Hyperparameters) -> int:
    """U-Net skip slots: as many as the longer (looped, when NUM_LOOPS > 0) schedule pairs; the unlooped
    schedule uses the first num_layers//2 of them."""
    encoder, decoder = layer_schedule(cfg, looping=True)
    return min(len(encoder), len(decoder))


def layer_plan(cfg: Hyperparameters, looping: bool) -> LayerPlan:
    """The schedule plus its skip pairing (§3.6): decoder application j pops with slot j while the stack holds
    outputs, so the same slot joins different layer pairs before and after the loop switch."""
    encoder, decoder = layer_schedule(cfg, looping)
    pops = min(len(encoder), num_skip_weights(cfg))
    return LayerPlan(tuple(encoder), tuple(decoder), tuple(j if j < pops else None for j in range(len(decoder))))


def mlp_hidden(cfg: Hyperparameters) -> int:
    """MLP hidden width = MLP_MULT * MODEL_DIM exactly (2 * 512 -> 1024); a fractional result is an error,
    never rounded, so both models and the table can only agree. MLP_MULT may be fractional (1.5 * 512 = 768)."""
    hidden = cfg.mlp_mult * cfg.model_dim
    if hidden != int(hidden):
        raise ValueError(f"MLP_MULT={cfg.mlp_mult} * MODEL_DIM={cfg.model_dim} = {hidden} is not a whole number")
    return int(hidden)


def _embedding_rows(cfg: Hyperparameters) -> list[Param]:
    std = cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0  # untied: nn.Embedding's N(0, 1)
    return [Param("tok_emb.weight", (cfg.vocab_size, cfg.model_dim), "normal", "tok", "weight", std)]


def _skip_rows(cfg: Hyperparameters) -> list[Param]:
    shape = (num_skip_weights(cfg), cfg.model_dim)
    rows = [Param("skip_weights", shape, "ones", "scalar", "control")]
    if cfg.skip_gates_enabled:  # zero-init: sigmoid(0) = 0.5, an even mix of x and the skip (RECORD_STACK.md §3.6)
        rows.append(Param("skip_gates", shape, "zeros", "scalar", "control"))
    return rows


def _smear_rows(cfg: Hyperparameters) -> list[Param]:
    """SMEAR_GATE_ENABLED (RECORD_STACK.md §3.1): gate weight w [1, W] and strength lambda [1], both zero-init
    (lambda = 0: the identity at init; w gets no gradient until lambda moves)."""
    if not cfg.smear_gate_enabled:
        return []
    return [Param("smear_gate.weight", (1, cfg.gate_window), "zeros", "scalar", "control"),
            Param("smear_lambda", (1,), "zeros", "scalar", "control")]


def _attn_gate_rows(cfg: Hyperparameters, i: int) -> list[Param]:
    """SPARSE_ATTN_GATE_ENABLED (RECORD_STACK.md §3.4): G [H, W], zero-init (every head gated by 0.5 at init).
    The record stores it int8 per row with an fp16 row scale (GATED_ATTN_QUANT_GATE=1): store kind 'gate' (the
    gptq scheme does that; the int8 scheme keeps it exact in fp32, as before)."""
    if not cfg.sparse_attn_gate_enabled:
        return []
    return [Param(f"blocks.{i}.attn.attn_gate_w", (cfg.num_heads, cfg.gate_window), "zeros", "scalar", "gate")]


def _lane_rows(cfg: Hyperparameters) -> list[Param]:
    """PARALLEL_START_LAYER (RECORD_STACK.md §3.7): one row per lane layer, row k = layer PARALLEL_START_LAYER + k.
    The record stores a row for every layer and reads only these; the 48 never-read scalars are dropped."""
    if cfg.parallel_start_layer <= 0:
        return []
    n = cfg.num_layers - cfg.parallel_start_layer
    return [Param("parallel_post_lambdas", (n, 2, 2), "ones", "scalar", "control"),  # [k, sublayer a/m, lane]
            Param("parallel_resid_lambdas", (n, 2), "const", "scalar", "control", 1.1)]  # [k, lane]


def _block_rows(cfg: Hyperparameters, i: int) -> list[Param]:
    d, kv, hidden, p = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim, mlp_hidden(cfg), f"blocks.{i}."
    init = "orthogonal" if cfg.ortho_init else "linear_uniform"  # input projections; outputs start at zero
    return [
        Param(p + "attn.c_q.weight", (d, d), init, "matrix", "weight"),
        Param(p + "attn.c_k.weight", (kv, d), init, "matrix", "weight"),
        Param(p + "attn.c_v.weight", (kv, d), init, "matrix", "weight"),
        Param(p + "attn.proj.weight", (d, d), "zeros", "matrix", "weight"),  # zero-init: blocks start as identity
        Param(p + "attn.q_gain", (cfg.num_heads,), "const", "scalar", "control", cfg.qk_gain_init),
        Param(p + "attn_scale", (d,), "ones", "scalar", "control"),
        Param(p + "mlp_scale", (d,), "ones", "scalar", "control"),
        Param(p + "resid_mix", (2, d), "resid_mix", "scalar", "control"),
        Param(p + "mlp.fc.weight", (hidden, d), init, "matrix", "weight"),
        Param(p + "mlp.proj.weight", (d, hidden), "zeros", "matrix", "weight"),
    ]


def _head_rows(cfg: Hyperparameters) -> list[Param]:
    if cfg.tie_embeddings:
        return []
    return [Param("lm_head.weight", (cfg.vocab_size, cfg.model_dim), "zeros", "head", "weight")]


def param_table(cfg: Hyperparameters) -> list[Param]:
    """Every parameter, in the order init draws them (the order is part of the init)."""
    rows = _embedding_rows(cfg) + _smear_rows(cfg) + _skip_rows(cfg) + _lane_rows(cfg)  # zero/const rows draw nothing
    for i in range(cfg.num_layers):
        rows += _block_rows(cfg, i) + _attn_gate_rows(cfg, i)
    return rows + _head_rows(cfg)


def count_params(cfg: Hyperparameters) -> int:
    return sum(int(np.prod(p.shape)) for p in param_table(cfg))


def param_shapes(cfg: Hyperparameters) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for p in param_table(cfg)}


def row(name: str, cfg: Hyperparameters) -> Param:
    """The table row of `name`; a tensor with no row is an error, never a silent default."""
    for p in param_table(cfg):
        if p.name == name:
            return p
    raise ValueError(f"parameter {name!r} has no row in the parameter table (shared/spec.py)")


def optimizer_group(name: str, cfg: Hyperparameters) -> str:
    return row(name, cfg).group


def groups_of(names: list[str], cfg: Hyperparameters) -> dict[str, list[str]]:
    """Optimizer group -> parameter names, in the given order; every name must have a row."""
    table = {p.name: p.group for p in param_table(cfg)}
    out: dict[str, list[str]] = {}
    for name in names:
        if name not in table:
            raise ValueError(f"parameter {name!r} has no row in the parameter table (shared/spec.py)")
        out.setdefault(table[name], []).append(name)
    return out


def group_lr(group: str, cfg: Hyperparameters) -> float:
    return {"tok": cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr, "head": cfg.head_lr,
            "matrix": cfg.matrix_lr, "scalar": cfg.scalar_lr}[group]


def group_wd(group: str, cfg: Hyperparameters) -> float:
    """Decoupled weight decay per group (RECORD_STACK.md §5.3, §5.4). An untied head gets none: the record family's
    code steps it with plain Adam while the scalars get AdamW(weight_decay=ADAM_WD)."""
    return {"tok": cfg.embed_wd, "head": 0.0, "matrix": cfg.muon_wd, "scalar": cfg.adam_wd}[group]


@dataclass(frozen=True)
class MuonSpec:
    """A Muon group as both twins build it (RECORD_STACK.md §5.3): Nesterov momentum (the rate set each step from
    the schedule, `momentum` the configured target), MUON_NS's iteration for `backend_steps`, MuonEq-R rows,
    decoupled decay, same-shape buckets (same_shape_buckets)."""
    lr: float  # the group's base rate; each step runs lr * the schedule's multiplier
    momentum: float
    backend_steps: int
    ns: str
    row_normalize: bool
    weight_decay: float


@dataclass(frozen=True)
class AdamSpec:
    """An Adam group as both twins build it (RECORD_STACK.md §5.4): torch.optim.Adam's update with bias correction,
    AdamW's decoupled decay p <- p (1 - lr wd) before it."""
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def optimizer_spec(group: str, cfg: Hyperparameters) -> MuonSpec | AdamSpec:
    """The one description of a group's optimizer that torch_optim and mlx_optim both build from: a new optimizer
    knob is a config line (tagged reads="optimizer"), a field here, and the line in each twin that reads it."""
    lr, wd = group_lr(group, cfg), group_wd(group, cfg)
    if GROUP_OPTIMIZER[group] == "muon":
        return MuonSpec(lr, cfg.muon_momentum, cfg.muon_backend_steps, cfg.muon_ns, cfg.muon_row_normalize, wd)
    return AdamSpec(lr, cfg.beta1, cfg.beta2, cfg.adam_eps, wd)


def optimizer_slots(p: Param) -> tuple[str, ...]:
    return OPTIMIZER_SLOTS[GROUP_OPTIMIZER[p.group]]


def init_params(cfg: Hyperparameters, seed: int | None = None) -> dict[str, np.ndarray]:
    """float32 initial weights, drawn in table order from one numpy generator."""
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    return {p.name: _init_one(p, rng).astype(np.float32) for p in param_table(cfg)}


def _init_one(p: Param, rng: np.random.Generator) -> np.ndarray:
    if p.init == "normal":
        return rng.normal(0.0, p.value, size=p.shape)
    if p.init == "zeros":
        return np.zeros(p.shape)
    if p.init == "ones":
        return np.ones(p.shape)
    if p.init == "const":
        return np.full(p.shape, p.value)
    if p.init == "resid_mix":
        return np.stack([np.ones(p.shape[1]), np.zeros(p.shape[1])])  # all residual, no x0
    if p.init == "orthogonal":
        return orthogonal(p.shape, rng)
    bound = 1.0 / np.sqrt(p.shape[1])  # linear_uniform: nn.Linear's default kaiming-uniform(a=sqrt(5)) bound
    return rng.uniform(-bound, bound, size=p.shape)


def orthogonal(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random (semi-)orthogonal matrix, gain 1: orthonormal rows if rows <= cols, else orthonormal columns.

    Saxe et al. 2013 ("Exact solutions to the nonlinear dynamics of learning in deep linear networks"),
    drawn the way torch.nn.init.orthogonal_ does: QR of a Gaussian matrix (of its transpose when wide), with
    the signs of R's diagonal folded into Q so the draw is uniform (Haar). float64, so the float32 result is
    the same bits on any machine whose LAPACK rounds alike (both frameworks always get these exact arrays).
    """
    rows, cols = shape
    a = rng.standard_normal((rows, cols))
    wide = rows < cols
    q, r = np.linalg.qr(a.T if wide else a)  # reduced QR: q has orthonormal columns
    q = q * np.sign(np.diag(r))[None, :]
    return q.T if wide else q


def estimate_memory_bytes(cfg: Hyperparameters, tokens_in_flight: int) -> int:
    """A lower bound of training memory, to refuse absurd sizes before an allocator does: fp32 weights,
    grads and optimizer state (16 bytes a parameter) plus activations kept for backward, counted low:
    ~8*D + 2*hidden floats a token a layer application (looped layers count each time) and three vocab-sized
    fp32 rows for the logits."""
    n_params = count_params(cfg)
    applications = sum(len(part) for part in layer_schedule(cfg, looping=True))
    per_token = applications * (8 * cfg.model_dim + 2 * mlp_hidden(cfg)) + 3 * cfg.vocab_size
    return 16 * n_params + 4 * per_token * tokens_in_flight


def micro_batch_tokens(cfg: Hyperparameters) -> int:
    return cfg.train_batch_tokens // MICRO_BATCHES_PER_STEP
