"""Score-first TTT in MLX: shared/ttt.py's Engine (mirrors torch_ttt.py function for function).

Adapters (RECORD_STACK.md §7.2) are fp32 arrays, one slot per document of a batch, handed to GPT.logits as
LoRAApp lists; the base weights stay frozen except in global_step (phased SGD). forward evaluates the NLL and
the adapters' gradient together and keeps the gradient; update applies it, so nothing changes a weight before
the driver has added the chunk's loss to the sums.

    engine = MLXTTT(model, cfg, bos_id)            # then shared.ttt.evaluate_ttt(engine, data, cfg)
"""
from __future__ import annotations

from mlx_model import GPT, LoRAApp  # first: it puts a fast BLAS under mlx[cpu] before mlx loads

from dataclasses import dataclass, field  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from shared.config import Hyperparameters  # noqa: E402
from shared.segments import segment_ids  # noqa: E402
from shared.ttt import ADAM_EPS, AInit, a_values, lora_shapes  # noqa: E402

GRAD_CLIP_EPS = 1e-6  # clip coefficient max_norm / (norm + eps), as torch.nn.utils.clip_grad_norm_


@dataclass
class MLXLoRA:
    a: list[dict[str, mx.array]]  # per application: target -> A (slots, r, in)
    b: list[dict[str, mx.array]]  # target -> B (slots, out, r), zero at every reset
    m: dict = field(default_factory=dict)  # Adam moments by (app, target, "a"|"b")
    v: dict = field(default_factory=dict)
    step: int = 0
    grads: dict | None = None  # the last forward's gradient, consumed by update

    def params(self) -> list[tuple[tuple, mx.array]]:
        return [((j, k, w), t) for j, app in enumerate(self.a) for k in app
                for w, t in (("a", self.a[j][k]), ("b", self.b[j][k]))]


def a_array(init: AInit) -> mx.array:
    """A as shared/ttt.py specifies it, hashed on MLX's default device in uint32 (products wrap): the same bits as
    numpy's reference and torch's."""
    index = mx.arange(init.size, dtype=mx.uint32)
    a = a_values(index, init, lambda h: h.astype(mx.float32), True).reshape(init.shape)
    mx.eval(a)
    return a


class MLXTTT:
    def __init__(self, model: GPT, cfg: Hyperparameters, bos_id: int):
        self.model, self.cfg, self.bos_id = model, cfg, bos_id
        self.scale = cfg.ttt_lora_alpha / cfg.ttt_lora_rank
        self.shapes = lora_shapes(cfg)
        self.momentum: dict[str, mx.array] = {}
        self.compiled = cfg.mlx_compile
        fn = mx.value_and_grad(self._loss)
        # MLX_COMPILE: one graph per row width (at most TTT_EVAL_SEQ_LEN / TTT_CHUNK_SIZE + 1); inputs=model.state:
        # the base weights are inputs, not constants of the first trace (global SGD changes them)
        self._value_and_grad = mx.compile(fn, inputs=model.state) if self.compiled else fn

    def warm_up(self) -> float:
        return 0.0  # MLX_COMPILE traces one graph per row width on first use: nothing to compile ahead

    # -- adapters --
    def new_lora(self, a_init: list[dict[str, AInit]]) -> MLXLoRA:
        a = [{k: a_array(init) for k, init in app.items()} for app in a_init]
        b = [{k: mx.zeros((t.shape[0], self.shapes[j][k][1], t.shape[1])) for k, t in app.items()}
             for j, app in enumerate(a)]
        return MLXLoRA(a, b)

    def reset(self, lora: MLXLoRA, a_init: list[dict[str, AInit]] | None) -> None:
        """B <- 0 and the Adam state <- 0; A replaced only when given (TTT_WARM_START_A=0)."""
        for j, app in enumerate(lora.b):
            for k, t in app.items():
                app[k] = mx.zeros(t.shape)
                if a_init is not None:
                    lora.a[j][k] = a_array(a_init[j][k])
        lora.m.clear(), lora.v.clear()
        lora.step, lora.grads = 0, None

    def apps(self, a: list[dict], b: list[dict]) -> list[LoRAApp]:
        return [LoRAApp({k: (a[j][k], b[j][k]) for k in app}, self.scale, self.model.dtype)
                for j, app in enumerate(a)]

    # -- score, then update --
    def _loss(self, ab: dict, x: mx.array, y: mx.array, w: mx.array) -> tuple[mx.array, mx.array]:
        nll = self.model.token_nll(x, y, None, self.apps(ab["a"], ab["b"]))  # (B, T) fp32: dense causal, one doc a row
        return (nll * w).sum(), nll

    def forward(self, lora: MLXLoRA, x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
        (_, nll), grads = self._value_and_grad({"a": lora.a, "b": lora.b}, mx.array(x), mx.array(y),
                                               mx.array(weights))
        mx.eval(nll, grads)
        lora.grads = grads
        return np.array(nll)

    def update(self, lora: MLXLoRA) -> None:
        """One AdamW step (decoupled wd, bias-corrected, eps 1e-10) on sum over docs of the chunk-mean loss."""
        grads, lora.grads, lora.step = lora.grads, None, lora.step + 1
        cfg, t = self.cfg, lora.step
        b1, b2, lr = cfg.ttt_beta1, cfg.ttt_beta2, cfg.ttt_lora_lr
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        for (j, k, w), p in lora.params():
            g = grads[w][j][k]
            m = b1 * lora.m.get((j, k, w), mx.zeros_like(p)) + (1.0 - b1) * g
            v = b2 * lora.v.get((j, k, w), mx.zeros_like(p)) + (1.0 - b2) * (g * g)
            p = p * (1.0 - lr * cfg.ttt_weight_decay)
            getattr(lora, w)[j][k] = p - (lr / bc1) * m / (mx.sqrt(v) / bc2 ** 0.5 + ADAM_EPS)
            lora.m[(j, k, w)], lora.v[(j, k, w)] = m, v
        mx.eval(lora.a, lora.b, lora.m, lora.v)

    # -- phased global SGD on the base weights --
    def global_step(self, x: np.ndarray, y: np.ndarray, lr: float, first: bool) -> float:
        """SGD with momentum on every base weight: all rows (one process), doc-isolated, mean CE, then clipped."""
        params = dict(tree_flatten(self.model.trainable_parameters()))
        if first:
            self.momentum = {k: mx.zeros_like(p) for k, p in params.items()}
        seg = mx.array(segment_ids(x, self.bos_id, self.cfg.ttt_eval_seq_len))
        fn = nn.value_and_grad(self.model, lambda xs, ys: self.model.token_nll(xs, ys, seg).sum() / y.size)
        loss, grads = fn(mx.array(x), mx.array(y))
        self._sgd(params, dict(tree_flatten(grads)), lr)
        return float(loss.item())

    def _sgd(self, params: dict[str, mx.array], grads: dict[str, mx.array], lr: float) -> None:
        clip = self.cfg.global_ttt_grad_clip
        coef = 1.0
        if clip > 0:
            norm = float(np.sqrt(sum(np.square(np.array(g, dtype=np.float64)).sum() for g in grads.values())))
            coef = min(1.0, clip / (norm + GRAD_CLIP_EPS))
        new = {}
        for k, p in params.items():
            buf = self.cfg.global_ttt_momentum * self.momentum[k] + coef * grads[k]
            self.momentum[k], new[k] = buf, p - lr * buf
        self.model.update(tree_unflatten(list(new.items())))
        mx.eval(self.model.parameters(), self.momentum)

    def reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return values  # one process
