"""PyTorch trainer: the official naive baseline, torchrun + NCCL on CUDA, gloo + fp32 on CPU.

    torchrun --standalone --nproc_per_node=8 cuda_train.py          # 8xH100 (grad accum 1)
    python cuda_train.py                                            # one process, grad accum 8
    PRESET=tiny python cuda_train.py                                # CPU smoke size on demo data
    python cuda_train.py --eval artifacts/run.int8.zst              # score any artifact
    python cuda_train.py --resume checkpoints/run.ckpt              # continue a run

Config comes from env vars (shared/config.py). The model mirrors mlx_train.py
line for line; the parameter contract lives in shared/model_spec.py.
"""
from __future__ import annotations

import copy
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shared import artifact, bpb
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.config import Hyperparameters, artifact_config_for_env, parse_trainer_cli
from shared.data import TokenLoader, train_pattern
from shared.model_spec import group_lr, init_params, num_skip_weights, optimizer_group
from shared.runlog import RunLog, log_final
from shared.training import NS_COEFFS, NS_EPS, muon_momentum, run_training

# ---- numerics, written out (mlx_train.py uses the same constants) ----
RMS_NORM_EPS = 1e-6  # explicit: library defaults differ by dtype and framework
# RoPE: half-split layout, x1 = x[..., :D/2], x2 = x[..., D/2:], rotated by -theta:
#   (x1*cos + x2*sin, -x1*sin + x2*cos), theta_{t,i} = t * ROPE_BASE^(-2i/D)
# (the official torch baseline's direction; the official MLX twin used +theta and drifted).


# ---- model ----
class RMSNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=RMS_NORM_EPS)


class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype (bf16 under autocast) at use."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)  # (T, D/2)
        return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, rope_base)
        self.scale = self.head_dim ** -0.5  # explicit attention scale

    def forward(self, x: Tensor) -> Tensor:
        bsz, seqlen, dim = x.shape
        q = self.c_q(x).reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.c_v(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (self.head_dim,), eps=RMS_NORM_EPS)
        k = F.rms_norm(k, (self.head_dim,), eps=RMS_NORM_EPS)
        cos, sin = self.rotary(seqlen, q.dtype)
        q = apply_rotary_emb(q, cos, sin)
        k = apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        y = y.transpose(1, 2).reshape(bsz, seqlen, dim)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mlp_mult * dim, bias=False)
        self.proj = CastedLinear(mlp_mult * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc(x))
        return self.proj(x.square())  # relu^2


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        dim = cfg.model_dim
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.rope_base, cfg.qk_gain_init)
        self.mlp = MLP(dim, cfg.mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        x = x + self.attn_scale.to(x.dtype)[None, None, :] * self.attn(self.attn_norm(x))
        x = x + self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.logit_softcap = cfg.logit_softcap
        self.tie_embeddings = cfg.tie_embeddings
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        self.skip_weights = nn.Parameter(torch.ones(num_skip_weights(cfg), cfg.model_dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm()
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, bias=False)

    def logits(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)  # (B, T, D)
        x = F.rms_norm(x, (x.size(-1),), eps=RMS_NORM_EPS)
        x0 = x
        skips = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0)
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype)[None, None, :] * skips.pop()
            x = self.blocks[self.num_encoder_layers + i](x, x0)
        x = self.final_norm(x)
        w = self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight
        z = F.linear(x, w.to(x.dtype)).float()  # (B, T, V), softcap and loss in fp32
        return self.logit_softcap * torch.tanh(z / self.logit_softcap)

    def token_nll(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        logits = self.logits(input_ids)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="none")
        return nll.reshape(target_ids.shape)  # (B, T) nats, fp32

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        return self.token_nll(input_ids, target_ids).mean()


def build_model(cfg: Hyperparameters, device: torch.device, state: dict[str, np.ndarray] | None = None) -> GPT:
    """A GPT on device holding `state` (default: the shared numpy init for SEED)."""
    model = GPT(cfg).to(device)
    load_numpy_state(model, init_params(cfg) if state is None else state)
    return model


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Strict by name and shape; errors name the key."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: state has shape {tuple(state[name].shape)}, model {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(state[name], dtype=np.float32)))


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.named_parameters()}


# ---- optimizers ----
def zeropower_via_newtonschulz5(g: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Approximately orthogonalise g (Muon); quintic Newton-Schulz in `dtype`."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm() + NS_EPS)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised update scaled by sqrt(max(1, rows/cols)).

    Ranks split the matrices round-robin and all-reduce the flat update (official scheme).
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, ns_dtype: torch.dtype,
                 compile_ns: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))
        self.ns_dtype = ns_dtype
        self.orthogonalize = torch.compile(zeropower_via_newtonschulz5) if compile_ns else zeropower_via_newtonschulz5

    @torch.no_grad()
    def step(self):
        world, rank = _world_rank()
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    flat[offset:offset + p.numel()] = self._update(p, group).reshape(-1)
                offset += p.numel()
            if world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()

    def _update(self, p: Tensor, group: dict) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
        g = self.orthogonalize(g, group["backend_steps"], self.ns_dtype)
        return g * max(1.0, g.size(0) / g.size(1)) ** 0.5


def build_optimizers(model: GPT, cfg: Hyperparameters, ns_dtype: torch.dtype) -> dict[str, torch.optim.Optimizer]:
    """tok/head/scalar: Adam; matrix: Muon (shared/model_spec.optimizer_group decides)."""
    groups: dict[str, list[Tensor]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(optimizer_group(name, tuple(p.shape), cfg), []).append(p)
    fused = next(model.parameters()).is_cuda  # fused Adam and compiled Newton-Schulz on CUDA only
    opts = {}
    for g, params in groups.items():
        lr = group_lr(g, cfg)
        if g == "matrix":
            opts[g] = Muon(params, lr, cfg.muon_momentum, cfg.muon_backend_steps, ns_dtype, fused and cfg.torch_compile)
        else:
            opts[g] = torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
        for group in opts[g].param_groups:
            group["base_lr"] = lr
    return opts


# ---- runtime ----
@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # compute dtype: autocast target, Newton-Schulz dtype

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def setup_runtime(cfg: Hyperparameters) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 0 or 8 % world:
        raise ValueError(f"WORLD_SIZE={world} must divide 8 (grad accumulation is 8/WORLD_SIZE)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    auto = torch.bfloat16 if cuda else torch.float32  # bf16 on a CPU is slow and not what CI checks
    dtype = {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.compute_dtype]
    return Runtime(rank, world, local_rank, device, dtype)


def finish(rt: Runtime) -> None:
    """All ranks leave together: a rank that tears down gloo while another still uses it aborts at exit."""
    if rt.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: np.ndarray, rt: Runtime) -> np.ndarray:
    if rt.world_size == 1:
        return values
    t = torch.from_numpy(values).to(rt.device, torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


# ---- evaluation ----
def evaluate(model: GPT, cfg: Hyperparameters, data: bpb.EvalData, rt: Runtime, log=None) -> bpb.BpbAccumulator:
    def score(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        xt, yt = (torch.from_numpy(a).to(rt.device, non_blocking=True) for a in (x, y))
        with torch.inference_mode(), rt.autocast():
            return model.token_nll(xt, yt).float().cpu().numpy()

    was_training = model.training
    model.eval()
    mine = bpb.shard_windows(data.windows, rt.rank, rt.world_size)
    batch = bpb.windows_per_batch(cfg.val_batch_size, cfg.train_seq_len)
    acc = bpb.evaluate(score, data.tokens, mine, cfg.train_seq_len, data.tables, batch,
                       reduce_fn=lambda v: all_reduce_sum(v, rt), progress=bpb.progress_logger(log))
    model.train(was_training)
    return acc


def score_artifact(path: str, cfg: Hyperparameters, data: bpb.EvalData, rt: Runtime, log) -> None:
    """Reload the artifact from disk, evaluate it, print the final lines (rank 0)."""
    state, _ = artifact.load_artifact(path)
    model = build_model(cfg, rt.device, state)
    t0 = time.perf_counter()
    acc = evaluate(model, cfg, data, rt)
    eval_ms = 1000.0 * (time.perf_counter() - t0)
    log_final(log, acc, path, __file__, eval_ms)


def run_eval(path: str, rt_env: dict) -> None:
    _, trained_cfg = artifact.load_artifact(path)
    cfg = artifact_config_for_env(trained_cfg, rt_env, f"artifact {path}")
    rt = setup_runtime(cfg)
    log = RunLog(f"eval_{Path(path).stem}", enabled=rt.master)
    score_artifact(path, cfg, bpb.load_eval_data(cfg), rt, log)
    finish(rt)


# ---- training ----
class Trainer:
    def __init__(self, cfg: Hyperparameters, rt: Runtime, log):
        self.cfg, self.rt, self.log = cfg, rt, log
        self.model = build_model(cfg, rt.device)
        self.opts = build_optimizers(self.model, cfg, rt.dtype)
        self.train_model = self._wrap(self.model)
        self.loader = self._new_loader()
        self.step, self.train_ms = 0, 0.0

    def _wrap(self, model: GPT) -> nn.Module:
        m: nn.Module = model
        if self.rt.device.type == "cuda" and self.cfg.torch_compile:
            m = torch.compile(m, dynamic=False)
        if self.rt.world_size > 1:
            ids = [self.rt.local_rank] if self.rt.device.type == "cuda" else None
            m = nn.parallel.DistributedDataParallel(m, device_ids=ids, broadcast_buffers=False)
        return m

    def _new_loader(self) -> TokenLoader:
        return TokenLoader(train_pattern(self.cfg.data_path), self.rt.rank, self.rt.world_size, self.cfg.vocab_size)

    def train_step(self, lr_scale: float) -> float:
        """One optimizer step over 8/WORLD_SIZE micro-batches; returns the mean train loss."""
        cfg, accum = self.cfg, self.loader.grad_accum_steps
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.rt.device)
        for micro in range(accum):
            x, y = (torch.from_numpy(a).to(self.rt.device, non_blocking=True)
                    for a in self.loader.next_micro_batch(cfg.train_batch_tokens, cfg.train_seq_len))
            if isinstance(self.train_model, nn.parallel.DistributedDataParallel):
                self.train_model.require_backward_grad_sync = micro == accum - 1
            with self.rt.autocast():
                loss = self.train_model(x, y)
            total += loss.detach()
            (loss / accum).backward()
        self._apply(lr_scale)
        if self.rt.world_size > 1:  # log the global mean, comparable across world sizes
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total.item()) / (accum * self.rt.world_size)

    def _apply(self, lr_scale: float) -> None:
        for group in self.opts["matrix"].param_groups:
            group["momentum"] = muon_momentum(self.cfg, self.step)
        for opt in self.opts.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        if self.cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        for opt in self.opts.values():
            opt.step()

    def prime(self) -> None:
        """WARMUP_STEPS real steps to warm compile/caches, then restore weights, optimizers and data."""
        if self.cfg.warmup_steps <= 0:
            return
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_states = {k: copy.deepcopy(o.state_dict()) for k, o in self.opts.items()}
        for i in range(self.cfg.warmup_steps):
            self.train_step(1.0)
            self.log(f"warmup_step:{i + 1}/{self.cfg.warmup_steps}")
        self.model.load_state_dict(weights, strict=True)
        for k, o in self.opts.items():
            o.load_state_dict(opt_states[k])
        self.loader = self._new_loader()

    # -- checkpoints: framework-neutral names (shared/checkpoint.py) --
    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        tensors = {f"param:{k}": v for k, v in numpy_state(self.model).items()}
        names = {p: n for n, p in self.model.named_parameters()}
        for g, opt in self.opts.items():
            for p in (q for group in opt.param_groups for q in group["params"]):
                for slot, value in self._opt_slots(g, p).items():
                    tensors[f"opt:{names[p]}:{slot}"] = value
        return tensors

    def _opt_slots(self, group: str, p: Tensor) -> dict[str, np.ndarray]:
        state = self.opts[group].state.get(p, {})
        if group == "matrix":
            buf = state.get("momentum_buffer", torch.zeros_like(p))
            if self.rt.world_size > 1:  # each rank holds the buffers of the matrices it owns
                buf = buf.clone()
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            return {"momentum": buf.float().cpu().numpy()}
        if not state:
            return {}
        return {"m": state["exp_avg"].float().cpu().numpy(), "v": state["exp_avg_sq"].float().cpu().numpy(),
                "step": np.array([float(state["step"])], dtype=np.float64)}

    def restore(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        load_numpy_state(self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("param:")})
        names = {p: n for n, p in self.model.named_parameters()}
        for g, opt in self.opts.items():
            for p in (q for group in opt.param_groups for q in group["params"]):
                self._restore_slots(g, p, tensors, names[p])
        self.loader.stream.restore(meta["data"])
        self.step, self.train_ms = int(meta["step"]), float(meta["train_ms"])

    def _restore_slots(self, group: str, p: Tensor, tensors: dict, name: str) -> None:
        dev = p.device
        if group == "matrix":
            self.opts[group].state[p]["momentum_buffer"] = torch.from_numpy(tensors[f"opt:{name}:momentum"]).to(dev)
        elif f"opt:{name}:m" in tensors:
            self.opts[group].state[p] = {
                "step": torch.tensor(float(tensors[f"opt:{name}:step"][0]), dtype=torch.float32),
                "exp_avg": torch.from_numpy(tensors[f"opt:{name}:m"]).to(dev),
                "exp_avg_sq": torch.from_numpy(tensors[f"opt:{name}:v"]).to(dev)}

    def save(self, path: str) -> None:
        tensors = self.checkpoint_tensors()  # collective: every rank takes part
        bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"non-finite values in {bad[:3]} at step {self.step}; checkpoint not written, "
                                     f"the previous one is kept")
        if self.rt.master:
            meta = {"step": self.step, "train_ms": self.train_ms, "data": self.loader.stream.state(),
                    "backend": "torch"}
            save_checkpoint(path, self.cfg, tensors, meta)
            self.log(f"checkpoint:{path} step:{self.step}")


def reached_cap(cfg: Hyperparameters, rt: Runtime, train_ms: float) -> bool:
    """Wallclock cap, agreed across ranks (any rank over the cap stops all)."""
    over = cfg.max_wallclock_seconds > 0 and train_ms >= 1000.0 * cfg.max_wallclock_seconds
    if rt.world_size > 1 and cfg.max_wallclock_seconds > 0:
        flag = torch.tensor(int(over), device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        over = bool(flag.item())
    return over


def peak_memory_line(rt: Runtime) -> str:
    if rt.device.type == "cuda":
        return (f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    return f"peak memory (process max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"


def main(argv: list[str] | None = None) -> None:
    args = parse_trainer_cli("PyTorch", argv)
    if args.eval:
        return run_eval(args.eval, dict(os.environ))
    cfg = Hyperparameters.from_env(os.environ)
    rt = setup_runtime(cfg)
    log = RunLog(cfg.run_id, enabled=rt.master)
    gpu = torch.cuda.get_device_name(rt.device).replace(" ", "_") if rt.device.type == "cuda" else "none"
    log.header(__file__, cfg, f"torch-{torch.__version__} device:{rt.device} gpu:{gpu} world:{rt.world_size} "
                              f"dtype:{rt.dtype}")
    data = bpb.load_eval_data(cfg)  # fails fast on a bad tokenizer or a short validation split
    tr = Trainer(cfg, rt, log)
    if args.resume:
        tr.restore(*load_checkpoint(args.resume, cfg))
        log(f"resumed:{args.resume} step:{tr.step}")
    else:
        tr.prime()
    run_training(tr, cfg, log, lambda: evaluate(tr.model, cfg, data, rt), rt.sync,
                 lambda ms: reached_cap(cfg, rt, ms))
    log(peak_memory_line(rt))
    path = cfg.resolved_artifact_path()
    if rt.master:
        artifact.save_artifact(path, numpy_state(tr.model), cfg)
    if rt.world_size > 1:
        dist.barrier()
    score_artifact(path, cfg, data, rt, log)
    finish(rt)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        sys.exit(f"error: {exc}")  # bad input or a diverged run: the message, not a traceback
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
