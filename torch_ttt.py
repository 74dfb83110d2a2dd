"""Score-first TTT in PyTorch: shared/ttt.py's Engine (mirrors mlx_ttt.py function for function).

Dtypes as the trainer's (torch_model.py's "numerics, written out"): no autocast; the model's compute dtype (bf16 on
CUDA, fp32 on CPU, COMPUTE_DTYPE) for every matmul, adapters included (A and B are fp32 leaves cast at use, their
products returned in fp32), the residual stream, norms, softcap and cross-entropy in fp32; Adam moments and the
step in fp32. TTT_COMPILE=1 compiles the forward on CUDA.

Adapters (RECORD_STACK.md §7.2) are fp32 leaves, one slot per document of a batch, handed to GPT.logits as
LoRAApp lists; the base weights stay frozen except in global_step (phased SGD). forward builds the graph and
returns the detached NLL; update takes the gradient of that forward's loss and steps, so nothing changes a weight
before the driver has added the chunk's loss to the sums.

    engine = TorchTTT(model, cfg, bos_id)          # then shared.ttt.evaluate_ttt(engine, data, cfg, ...)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from shared.config import Hyperparameters
from shared.ttt import ADAM_EPS, AInit, a_numpy, a_values, lora_a_spec, lora_shapes, warmup_widths
from torch_model import GPT, LoRAApp, doc_segments, upload

GRAD_CLIP_EPS = 1e-6  # clip coefficient max_norm / (norm + eps), as torch.nn.utils.clip_grad_norm_


@dataclass
class TorchLoRA:
    a: list[dict[str, Tensor]]  # per application: target -> A (slots, r, in)
    b: list[dict[str, Tensor]]  # target -> B (slots, out, r), zero at every reset
    m: dict = field(default_factory=dict)  # Adam moments by (app, target, "a"|"b")
    v: dict = field(default_factory=dict)
    step: int = 0
    loss: Tensor | None = None  # the last forward's training loss, consumed by update

    def params(self) -> list[tuple[tuple, Tensor]]:
        return [((j, k, w), t) for j, app in enumerate(self.a) for k in app
                for w, t in (("a", self.a[j][k]), ("b", self.b[j][k]))]


class TorchTTT:
    def __init__(self, model: GPT, cfg: Hyperparameters, bos_id: int, rank: int = 0, world_size: int = 1,
                 reduce_sum: Callable[[np.ndarray], np.ndarray] | None = None,
                 all_reduce_grads: Callable[[list[Tensor]], None] | None = None):
        self.model, self.cfg, self.bos_id = model, cfg, bos_id
        self.rank, self.world_size = rank, world_size
        self._reduce_sum, self._all_reduce_grads = reduce_sum, all_reduce_grads
        self.device = next(model.parameters()).device
        self.scale = cfg.ttt_lora_alpha / cfg.ttt_lora_rank
        self.shapes = lora_shapes(cfg)
        self.momentum: dict[str, Tensor] = {}
        self.compiled = self.device.type == "cuda" and cfg.ttt_compile
        self.token_nll = self._compiled(model) if self.compiled else model.token_nll
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # frozen base: LoRA steps never build its gradients

    @staticmethod
    def _compiled(model: GPT, backend: str | Callable = "inductor") -> Callable:
        """TTT_COMPILE=1 (CUDA only): the LoRA forward compiled, its backward by AOTAutograd. Rows are
        TTT_BATCH_SIZE x width, width a multiple of TTT_CHUNK_SIZE up to TTT_EVAL_SEQ_LEN (up to 43 widths).
        dynamic=None is dynamo's automatic dynamic shapes: the first width compiles static, the second recompiles
        with the width symbolic, and that graph serves every later width (2 compiles, both in warm_up; checked on
        CPU with aot_eager, bit-identical to eager, and with inductor, 2.7e-8 nats/token from eager), instead of
        one per width (dynamo gives up after 8). Numerics: the same explicit dtypes as eager (the model's compute
        dtype, bf16 on CUDA); inductor may fuse elementwise ops, so scores match eager to bf16 rounding, not bit for
        bit."""
        return torch.compile(model.token_nll, dynamic=None, backend=backend)

    def warm_up(self) -> float:
        """TTT_COMPILE=1: compile the forward and its backward before the timed evaluation (the record's timer also
        leaves compile out, RECORD_STACK.md §7.2), on random ids, never validation tokens, and a throwaway adapter
        set, at shared.ttt.warmup_widths: after them no width recompiles. Returns the seconds; 0 when eager."""
        if not self.compiled:
            return 0.0
        t0 = time.perf_counter()
        slots, vocab = self.cfg.ttt_batch_size, self.cfg.vocab_size
        lora = self.new_lora(lora_a_spec(self.cfg, slots, -1, -1))  # a stream no plan has
        rng = np.random.default_rng(0)
        for width in warmup_widths(self.cfg):
            x, y = (rng.integers(0, vocab, (slots, width)) for _ in range(2))
            self.forward(lora, x, y, np.full((slots, width), 1.0 / width, np.float32))
            self.update(lora)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # -- adapters --
    def new_lora(self, a_init: list[dict[str, AInit]]) -> TorchLoRA:
        a = [{k: self.a_tensor(init).requires_grad_(True) for k, init in app.items()} for app in a_init]
        b = [{k: torch.zeros(t.shape[0], self.shapes[j][k][1], t.shape[1], device=self.device, requires_grad=True)
              for k, t in app.items()} for j, app in enumerate(a)]
        return TorchLoRA(a, b)

    def a_tensor(self, init: AInit, on_device: bool | None = None) -> Tensor:
        """A as shared/ttt.py specifies it, hashed where it lives: on an accelerator in int64 (torch's uint32 lacks
        the ops), on the CPU numpy's uint32 reference (4x faster there). The same bits either way."""
        if not (self.device.type != "cpu" if on_device is None else on_device):
            return torch.from_numpy(a_numpy(init)).to(self.device)
        index = torch.arange(init.size, dtype=torch.int64, device=self.device)
        return a_values(index, init, lambda h: h.to(torch.float32), False).reshape(init.shape)

    def reset(self, lora: TorchLoRA, a_init: list[dict[str, AInit]] | None) -> None:
        """B <- 0 and the Adam state <- 0; A replaced only when given (TTT_WARM_START_A=0)."""
        with torch.no_grad():
            for j, app in enumerate(lora.b):
                for k, t in app.items():
                    t.zero_()
                    if a_init is not None:
                        lora.a[j][k].copy_(self.a_tensor(a_init[j][k]))
        lora.m.clear(), lora.v.clear()
        lora.step, lora.loss = 0, None

    def apps(self, lora: TorchLoRA) -> list[LoRAApp]:
        return [LoRAApp({k: (lora.a[j][k], lora.b[j][k]) for k in app}, self.scale, self.model.dtype)
                for j, app in enumerate(lora.a)]

    # -- score, then update --
    def forward(self, lora: TorchLoRA, x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
        xt, yt, wt = (upload(t, self.device) for t in (x, y, weights))  # no wait for the last update's kernels
        with torch.enable_grad():
            nll = self.token_nll(xt, yt, None, self.apps(lora))  # (B, T) fp32: dense causal, one doc a row
            lora.loss = (nll * wt).sum()
        return nll.detach().float().cpu().numpy()

    def update(self, lora: TorchLoRA) -> None:
        """One AdamW step (decoupled wd, bias-corrected, eps 1e-10) on sum over docs of the chunk-mean loss.
        Every parameter in one foreach call per operation (one kernel per op for all tensors on CUDA instead of
        ~100 launches per op): the same ops in the same order as the per-tensor formula p <- p (1 - lr wd);
        m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2; p <- p - (lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps),
        so each element rounds as it did one tensor at a time (bit-identical on CPU: tests/test_ttt_speed.py)."""
        named = lora.params()
        ps = [t for _, t in named]
        grads = torch.autograd.grad(lora.loss, ps, allow_unused=True)  # None: unused, zero
        lora.loss, lora.step = None, lora.step + 1
        cfg, t = self.cfg, lora.step
        b1, b2, lr = cfg.ttt_beta1, cfg.ttt_beta2, cfg.ttt_lora_lr
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        with torch.no_grad():
            gs = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]
            ms = [lora.m.setdefault(key, torch.zeros_like(p)) for key, p in named]
            vs = [lora.v.setdefault(key, torch.zeros_like(p)) for key, p in named]
            torch._foreach_mul_(ps, 1.0 - lr * cfg.ttt_weight_decay)
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, gs, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
            den = torch._foreach_sqrt(vs)
            torch._foreach_div_(den, bc2 ** 0.5)
            torch._foreach_add_(den, ADAM_EPS)
            step = torch._foreach_mul(ms, lr / bc1)
            torch._foreach_div_(step, den)
            torch._foreach_sub_(ps, step)

    # -- phased global SGD on the base weights --
    def global_step(self, x: np.ndarray, y: np.ndarray, lr: float, first: bool) -> float:
        """SGD with momentum on every base weight: this rank's contiguous share of the rows, doc-isolated, mean CE
        over all ranks' tokens, gradients summed across ranks, then clipped (the record clips after the average)."""
        cfg, params = self.cfg, dict(self.model.named_parameters())
        if first:
            self.momentum = {k: torch.zeros_like(p) for k, p in params.items()}
        lo, hi = len(x) * self.rank // self.world_size, len(x) * (self.rank + 1) // self.world_size
        xs, ys = x[lo:hi], y[lo:hi]
        grads = [torch.zeros_like(p) for p in params.values()]
        loss = torch.zeros((), device=self.device)
        if len(xs):
            seg = doc_segments(xs, self.bos_id, cfg.ttt_eval_seq_len, self.device, self.model.dtype)
            for p in params.values():
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = self.model.token_nll(*(torch.from_numpy(t).to(self.device) for t in (xs, ys)), seg).sum()
                loss = loss / y.size
                grads = list(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
            for p in params.values():
                p.requires_grad_(False)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        if self._all_reduce_grads is not None:
            self._all_reduce_grads(grads)
        self._sgd(params, grads, lr)
        return float(loss.detach())  # this rank's share of the mean

    def _sgd(self, params: dict[str, Tensor], grads: list[Tensor], lr: float) -> None:
        clip = self.cfg.global_ttt_grad_clip
        coef = 1.0
        if clip > 0:
            norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
            coef = min(1.0, clip / (norm + GRAD_CLIP_EPS))
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads):
                buf = self.momentum[k]
                buf.mul_(self.cfg.global_ttt_momentum).add_(g, alpha=coef)
                p.sub_(lr * buf)

    def reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return values if self._reduce_sum is None else self._reduce_sum(values)
