"""PyTorch trainer: torchrun + NCCL + bf16 + torch.compile on CUDA, gloo + fp32 on CPU.

    torchrun --standalone --nproc_per_node=8 cuda_train.py          # 8xH100 (grad accum 1)
    python cuda_train.py                                            # one process, grad accum 8
    PRESET=tiny python cuda_train.py                                # CPU smoke size on demo data
    python cuda_train.py --eval artifacts/run.int8.zst              # score any artifact
    python cuda_train.py --resume checkpoints/run.ckpt              # continue a run

Config comes from env vars (shared/config.py). This file is the runtime only:
the model is torch_model.py, the optimizers torch_optim.py, and the flow
(train, prime, resume, export, score) is shared/loop.py, which mlx_train.py
runs too.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from shared import bpb, loop
from shared.runlog import rss_peak_line
from shared.config import Hyperparameters
from shared.segments import check_bos_features, require_bos
from shared.spec import micro_batch_tokens
from shared.quant.gptq import targets as gptq_targets
from torch_model import (VarlenSegments, build_model, collect_hessians, doc_attention_kernel, doc_segments,
                         load_numpy_state, numpy_state, to_numpy, upload)
from torch_optim import Optimizers
from torch_gptq import TorchSolver
from torch_ttt import TorchTTT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def activate_fa3(device: torch.device) -> bool:
    """torch 2.13 routes its flash kernels (varlen_attn included) to FlashAttention-3 once activated: that needs
    the FA3 build (module flash_attn_interface) and a Hopper GPU (sm90). Otherwise torch's own FA2 runs."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        from torch.nn.attention import activate_flash_attention_impl
        activate_flash_attention_impl("FA3")
    except (ImportError, RuntimeError, ValueError):  # not installed, or a build without the kernels
        return False
    return True


class TorchBackend:
    """shared/loop.py's Backend for PyTorch: one process per rank; gradients averaged by torch_optim.Optimizers."""

    def __init__(self, cfg: Hyperparameters):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size <= 0 or 8 % self.world_size:
            raise ValueError(f"WORLD_SIZE={self.world_size} must divide 8 (grad accumulation is 8/WORLD_SIZE)")
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        auto = torch.bfloat16 if cuda else torch.float32  # bf16 on a CPU is slow and not what CI checks
        self.dtype = auto if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]
        self.cfg = cfg
        if cuda and cfg.doc_isolated_attn:  # only then: the dense default keeps its kernels
            activate_fa3(self.device)

    def describe(self) -> str:
        gpu = torch.cuda.get_device_name(self.device).replace(" ", "_") if self.device.type == "cuda" else "none"
        doc = f" doc_attn:{doc_attention_kernel(self.device, self.dtype)}" if self.cfg.doc_isolated_attn else ""
        return (f"torch-{torch.__version__} device:{self.device} gpu:{gpu} world:{self.world_size} "
                f"dtype:{self.dtype}{doc}")

    # -- model and optimizer state --
    def build(self, cfg: Hyperparameters, weights: dict[str, np.ndarray], train: bool,
              bos_id: int | None = None) -> None:
        self.bos_id = bos_id  # the tokenizer's; shared/ builds BOS-aware inputs from it
        check_bos_features(cfg, bos_id)  # fail before any compute
        self.model = build_model(cfg, self.device, weights, self.dtype, bos_id)
        self.opts = Optimizers(self.model, cfg, self.dtype) if train else None
        self.train_model = self._wrap(self.model) if train else None

    def _wrap(self, model: nn.Module) -> nn.Module:
        """Compiled on CUDA. No DDP: torch_optim.Optimizers averages the gradients over ranks itself, so that
        Muon's matrices can be reduce-scattered to their owners (parallel Muon, RECORD_STACK.md §5.3)."""
        if self.device.type == "cuda" and self.cfg.torch_compile:
            return torch.compile(model, dynamic=False)
        return model

    def weights(self) -> dict[str, np.ndarray]:
        return numpy_state(self.model)

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        load_numpy_state(self.model, weights)

    def optimizer_slots(self) -> dict:
        return self.opts.slots()

    def load_optimizer_slots(self, slots: dict) -> None:
        self.opts.load_slots(slots)

    # -- EMA of the weights (RECORD_STACK.md §5.6): an fp32 shadow on the device, no host copy per step --
    def load_ema(self, weights: dict[str, np.ndarray]) -> None:
        params = dict(self.model.named_parameters())
        self.ema = {k: torch.from_numpy(np.array(weights[k], dtype=np.float32)).to(self.device) for k in params}
        self._ema_pairs = ([self.ema[k] for k in params], [p.detach() for p in params.values()])

    def ema_update(self, decay: float) -> None:
        """shared.schedule.ema_step, bit for bit: d*ema and (1-d)*w each rounded in fp32, then summed (foreach
        kernels: a few launches for all tensors; no lerp, which rounds differently)."""
        shadow, live = self._ema_pairs
        with torch.no_grad():
            torch._foreach_mul_(shadow, decay)
            torch._foreach_add_(shadow, torch._foreach_mul(live, 1.0 - decay))

    def ema_weights(self) -> dict[str, np.ndarray]:
        return {k: to_numpy(v) for k, v in self.ema.items()}

    def set_looping(self, on: bool) -> None:
        """Depth recurrence on/off (RECORD_STACK.md §3.2). torch.compile guards on the model's flag (a bool
        attribute read in logits), so each state compiles once and both graphs stay cached; prime runs both."""
        self.model.set_looping(on)

    # -- compute --
    def train_step(self, micro_batches: list, lr_scale: float, momentum: float) -> float:
        """One optimizer step over this rank's micro-batches; returns the global mean train loss."""
        self.opts.zero_grad()
        total = torch.zeros((), device=self.device)
        for x, y in micro_batches:
            xt, yt = upload(x, self.device), upload(y, self.device)
            loss = self.train_model(xt, yt, self._segments(x))
            (loss / len(micro_batches)).backward()  # accumulates locally; Optimizers.step averages over ranks
            total += loss.detach()
        self.opts.step(lr_scale, momentum)
        if self.world_size > 1:  # log the global mean, comparable across world sizes
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total.item()) / (len(micro_batches) * self.world_size)

    def _segments(self, x: np.ndarray) -> torch.Tensor | VarlenSegments | None:
        """DOC_ISOLATED_ATTN: the varlen kernel's boundaries, built on the host, or segment ids of the rows x
        (shared/segments.py) for the masked kernel; None: dense causal."""
        if not self.cfg.doc_isolated_attn:
            return None
        return doc_segments(x, require_bos(self.bos_id), self.cfg.train_seq_len, self.device, self.dtype)

    def evaluate(self, data: bpb.EvalData, log=None) -> bpb.BpbAccumulator:
        def score(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # each window is a row: the row-start rule applies
            xt, yt = upload(x, self.device), upload(y, self.device)
            with torch.inference_mode():
                return self.model.token_nll(xt, yt, self._segments(x)).float().cpu().numpy()

        self.model.eval()
        mine = bpb.shard_windows(data.windows, self.rank, self.world_size)
        batch = bpb.windows_per_batch(self.cfg.val_batch_size, self.cfg.train_seq_len)
        acc = bpb.evaluate(score, data.tokens, mine, self.cfg.train_seq_len, data.target_bytes, batch,
                           reduce_fn=self._all_reduce_sum, progress=bpb.progress_logger(log))
        self.model.train()
        return acc

    def hessians(self, cfg: Hyperparameters, batches: list) -> dict[str, np.ndarray]:
        """GPTQ's Hessians of the current weights (torch_model.collect_hessians; eval mode, the uncompiled model):
        each rank sums over its micro-batches, the sums are all-reduced and divided by every rank's batch count,
        so the calibration set (and H, up to fp32 summation order) does not depend on the world size."""
        self.model.eval()
        dev = [(torch.from_numpy(x).to(self.device), self._segments(x)) for x, _ in batches]
        sums = collect_hessians(self.model, dev, gptq_targets(cfg), divisor=1)
        self.model.train()
        if self.world_size == 1:
            return {k: v / np.float32(len(batches)) for k, v in sums.items()}
        out = {}
        for name in sorted(sums):  # the same order on every rank
            t = torch.from_numpy(sums[name]).to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            out[name] = to_numpy(t / (len(batches) * self.world_size))
        return out

    def gptq_solver(self, cfg: Hyperparameters) -> TorchSolver | None:
        """GPTQ_SOLVER=torch, or auto on a GPU: torch_gptq.py on this device (seconds there, minutes in numpy on
        a CPU); None: the numpy reference."""
        use = cfg.gptq_solver == "torch" or (cfg.gptq_solver == "auto" and self.device.type == "cuda")
        return TorchSolver(self.device) if use else None

    def ttt_engine(self) -> TorchTTT:
        """Score-first TTT over the built model (RECORD_STACK.md §7.2; torch_ttt.py); freezes the base weights."""
        return TorchTTT(self.model, self.cfg, require_bos(self.bos_id, "TTT_ENABLED"), self.rank, self.world_size,
                        self._all_reduce_sum, self._all_reduce_tensors)

    # -- collectives and machine --
    def _all_reduce_tensors(self, tensors: list[torch.Tensor]) -> None:
        if self.world_size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def _all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return values
        t = torch.from_numpy(values).to(self.device, torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def max_over_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor(value, device=self.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast_text(self, text: str) -> str:
        if self.world_size == 1:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)  # a short string of rank 0's, not untrusted data
        return box[0]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, self.world_size)

    def tokens_in_flight(self, cfg: Hyperparameters) -> int:
        return micro_batch_tokens(cfg)

    def peak_memory_line(self) -> str:
        if self.device.type == "cuda":
            return (f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                    f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        return rss_peak_line()

    def finish(self) -> None:
        """All ranks leave together: a rank that tears down gloo while another still uses it aborts at exit."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        loop.main(TorchBackend, __file__, __file__)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
