"""The parameter contract both trainers implement: names, shapes, init and optimizer groups.

Both models are built from these names and shapes and must match them exactly
(strict loads, no rename maps). Initial weights are drawn here in numpy from
SEED, so the MLX and torch trainers start from the same bits.
"""
from __future__ import annotations

import numpy as np

from shared.config import Hyperparameters

# Small per-channel controls: kept in fp32 by the artifact, trained by Adam at SCALAR_LR.
CONTROL_TENSOR_NAME_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights")


def num_skip_weights(cfg: Hyperparameters) -> int:
    """U-Net skips: the first num_layers//2 blocks push, the rest pop."""
    encoder = cfg.num_layers // 2
    return min(encoder, cfg.num_layers - encoder)


def param_shapes(cfg: Hyperparameters) -> dict[str, tuple[int, ...]]:
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    hidden = cfg.mlp_mult * d
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, d),
                                          "skip_weights": (num_skip_weights(cfg), d)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        shapes.update({p + "attn.c_q.weight": (d, d), p + "attn.c_k.weight": (kv, d),
                       p + "attn.c_v.weight": (kv, d), p + "attn.proj.weight": (d, d),
                       p + "attn.q_gain": (cfg.num_heads,), p + "attn_scale": (d,), p + "mlp_scale": (d,),
                       p + "resid_mix": (2, d), p + "mlp.fc.weight": (hidden, d), p + "mlp.proj.weight": (d, hidden)})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def optimizer_group(name: str, shape: tuple[int, ...], cfg: Hyperparameters) -> str:
    """'tok' / 'head' (Adam), 'matrix' (Muon) or 'scalar' (Adam), as the official baseline splits them."""
    if name == "tok_emb.weight":
        return "tok"
    if name == "lm_head.weight":
        return "head"
    if len(shape) == 2 and name.startswith("blocks.") and not _is_control(name):
        return "matrix"
    return "scalar"


def group_lr(group: str, cfg: Hyperparameters) -> float:
    return {"tok": cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr, "head": cfg.head_lr,
            "matrix": cfg.matrix_lr, "scalar": cfg.scalar_lr}[group]


def init_params(cfg: Hyperparameters, seed: int | None = None) -> dict[str, np.ndarray]:
    """float32 initial weights, drawn in a fixed name order from one numpy generator."""
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        out[name] = _init_one(name, shape, cfg, rng).astype(np.float32)
    return out


def _init_one(name: str, shape: tuple[int, ...], cfg: Hyperparameters, rng: np.random.Generator) -> np.ndarray:
    if name == "tok_emb.weight":
        std = cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0  # untied: nn.Embedding's N(0, 1)
        return rng.normal(0.0, std, size=shape)
    if name.endswith("proj.weight") or name == "lm_head.weight":
        return np.zeros(shape)  # zero-init outputs: every block starts as the identity
    if name.endswith("q_gain"):
        return np.full(shape, cfg.qk_gain_init)
    if name.endswith("resid_mix"):
        return np.stack([np.ones(shape[1]), np.zeros(shape[1])])  # all residual, no x0
    if name.endswith(("attn_scale", "mlp_scale")) or name == "skip_weights":
        return np.ones(shape)
    bound = 1.0 / np.sqrt(shape[1])  # nn.Linear's default kaiming-uniform(a=sqrt(5)) bound
    return rng.uniform(-bound, bound, size=shape)


def _is_control(name: str) -> bool:
    return any(p in name for p in CONTROL_TENSOR_NAME_PATTERNS)
