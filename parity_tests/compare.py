"""Run one set of numpy weights through both frameworks and compare what comes out.

Used by the parity test suite and by the user command (python -m parity_tests).
Every comparison names the tensor and the max difference.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx_model as mlx_model_mod  # noqa: E402  (first: it loads a CPU BLAS before anything imports mlx)
import torch_model as torch_model_mod  # noqa: E402
import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from shared import bpb  # noqa: E402
from shared.config import Hyperparameters  # noqa: E402
from shared.manifest import BOS_ID  # noqa: E402  (the shards' BOS, which the tokenizers here share)
from shared.segments import segment_ids  # noqa: E402
from shared.spec import param_table  # noqa: E402

# fp32 tolerances (STYLE.md): forward, loss, gradients.
LOGITS_RTOL, LOGITS_ATOL = 1e-4, 1e-5
LOSS_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-4


def random_state(cfg: Hyperparameters, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-trivial weights for every parameter (the real init zeroes projections, which hides bugs)."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in param_table(cfg):
        if p.init in ("ones", "const"):  # gains: around their init value, away from it
            out[p.name] = (p.value if p.init == "const" else 1.0) + 0.3 * rng.standard_normal(p.shape)
        elif p.init == "resid_mix":
            out[p.name] = np.stack([1.0 + 0.2 * rng.standard_normal(p.shape[1]),
                                    0.3 * rng.standard_normal(p.shape[1])])
        else:
            out[p.name] = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
    return {k: v.astype(np.float32) for k, v in out.items()}


def torch_model(cfg: Hyperparameters, state: dict[str, np.ndarray], device: str = "cpu", dtype=torch.float32,
                bos_id: int = BOS_ID):
    return torch_model_mod.build_model(cfg, torch.device(device), state, dtype, bos_id)


def mlx_model(cfg: Hyperparameters, state: dict[str, np.ndarray], ops=None, dtype=mx.float32, bos_id: int = BOS_ID):
    return mlx_model_mod.build_model(cfg, state, dtype, ops, bos_id)


def plant_documents(ids: np.ndarray, seed: int = 0, rate: float = 0.12) -> np.ndarray:
    """A copy of (B, T+1) token rows holding several documents: BOS_ID at random positions (some adjacent), at
    the start of row 0 (other rows open with a cut document's tail) and at row 1's last input position."""
    out = ids.copy()
    out[np.random.default_rng(seed).random(ids.shape) < rate] = BOS_ID
    out[0, 0] = BOS_ID
    out[1, -2] = BOS_ID
    return out


def segments_for(cfg: Hyperparameters, x: np.ndarray) -> np.ndarray | None:
    """What the trainers feed the models: segment ids of x under DOC_ISOLATED_ATTN, else None (dense causal)."""
    return segment_ids(x, BOS_ID, cfg.train_seq_len) if cfg.doc_isolated_attn else None


def torch_logits(model, ids: np.ndarray, segments: np.ndarray | None = None) -> np.ndarray:
    dev = next(model.parameters()).device
    seg = None if segments is None else torch.from_numpy(segments).to(dev)
    with torch.no_grad():
        return model.logits(torch.from_numpy(ids).to(dev), seg).float().cpu().numpy()


def mlx_logits(model, ids: np.ndarray, segments: np.ndarray | None = None) -> np.ndarray:
    return np.array(model.logits(mx.array(ids), None if segments is None else mx.array(segments)))


def torch_loss_and_grads(model, x: np.ndarray, y: np.ndarray,
                         segments: np.ndarray | None = None) -> tuple[float, dict[str, np.ndarray]]:
    model.zero_grad(set_to_none=True)
    loss = model(torch.from_numpy(x), torch.from_numpy(y), None if segments is None else torch.from_numpy(segments))
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().numpy().copy()
             for k, p in model.named_parameters()}  # unused (e.g. 0 skip weights): zero, as MLX reports
    return float(loss.detach()), grads


def mlx_loss_and_grads(model, x: np.ndarray, y: np.ndarray,
                       segments: np.ndarray | None = None) -> tuple[float, dict[str, np.ndarray]]:
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    seg = None if segments is None else mx.array(segments)
    loss, grads = nn.value_and_grad(model, lambda a, b: model(a, b, seg))(mx.array(x), mx.array(y))
    return float(loss.item()), {k: np.array(v) for k, v in tree_flatten(grads)}


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def assert_close(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    """np.allclose semantics; the message names the tensor, the max difference and where it is worst."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {got.shape} != {want.shape}")
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    if np.any(excess > 0) or not np.all(np.isfinite(got)):
        worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
        raise AssertionError(f"{name}: max abs diff {max_abs_diff(got, want):.3e} exceeds rtol={rtol} atol={atol} "
                             f"(worst at {worst}: {got[worst]:.7g} vs {want[worst]:.7g})")


@dataclass
class Score:
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int


def score_torch(model, cfg: Hyperparameters, tokens: np.ndarray, windows: np.ndarray, target_bytes: np.ndarray) -> Score:
    dev = next(model.parameters()).device

    def fn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        seg = segments_for(cfg, x)
        xt, yt, st = (None if a is None else torch.from_numpy(a).to(dev) for a in (x, y, seg))
        with torch.no_grad():
            return model.token_nll(xt, yt, st).float().cpu().numpy()
    return _score(fn, cfg, tokens, windows, target_bytes)


def score_mlx(model, cfg: Hyperparameters, tokens: np.ndarray, windows: np.ndarray, target_bytes: np.ndarray) -> Score:
    def fn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        seg = segments_for(cfg, x)
        out = model.token_nll(mx.array(x), mx.array(y), None if seg is None else mx.array(seg))
        mx.eval(out)
        return np.array(out)
    return _score(fn, cfg, tokens, windows, target_bytes)


def _score(fn, cfg: Hyperparameters, tokens: np.ndarray, windows: np.ndarray, target_bytes: np.ndarray) -> Score:
    batch = max(1, min(bpb.windows_per_batch(cfg.val_batch_size, cfg.train_seq_len), 4096 // cfg.train_seq_len))
    acc = bpb.evaluate(fn, tokens, windows, cfg.train_seq_len, target_bytes, batch)
    return Score(acc.val_loss, acc.val_bpb, acc.tokens, acc.bytes)
