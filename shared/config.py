"""One frozen hyperparameter dataclass for both trainers.

Field names are the official env-var names lowercased (NUM_LAYERS -> num_layers)
with the official defaults. Knobs that only one backend reads carry a prefix
(torch_..., mlx_...). Parse inside main(), never at import:

    cfg = Hyperparameters.from_env(os.environ)

PRESET=tiny (or baseline) swaps the defaults; explicit env vars still win.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

# The official scheme splits every optimizer step into 8 equal slots of tokens:
# grad accumulation 8/WORLD_SIZE, so any world size dividing 8 sees the same tokens.
MICRO_BATCHES_PER_STEP = 8

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Hyperparameters:
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = "run"
    seed: int = 1337
    val_batch_size: int = 524_288
    val_loss_every: int = 1000
    train_log_every: int = 200
    iterations: int = 20_000
    warmdown_iters: int = 1200
    warmup_steps: int = 20
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    max_wallclock_seconds: float = 600.0
    qk_gain_init: float = 1.5
    vocab_size: int = 1024
    num_layers: int = 9
    num_kv_heads: int = 4
    model_dim: int = 512
    num_heads: int = 8
    mlp_mult: int = 2
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.05
    tied_embed_init_std: float = 0.005
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0
    # Our additions (not in the official script).
    eval_stride: int = 0  # 0: official non-overlapping windows; >0: sliding windows
    compute_dtype: str = "auto"  # auto: bf16 on CUDA/Metal, fp32 on CPU
    artifact_path: str = ""  # "" -> artifacts/{run_id}.int8.zst
    checkpoint_every: int = 0  # steps between full training-state checkpoints; 0 = off
    checkpoint_path: str = ""  # "" -> checkpoints/{run_id}.ckpt; may contain {step}
    torch_compile: bool = True  # CUDA only; never on CPU
    mlx_max_microbatch_tokens: int = 8192
    mlx_compile: bool = True
    mlx_ops: str = "auto"  # auto | fused | composed: see mlx_train.select_ops
    mlx_streams: int = 0  # chunks computed concurrently; 0 = auto (1 on Metal, one per CPU core up to 4)

    @classmethod
    def from_env(cls, env: Mapping[str, str], base: "Hyperparameters | None" = None) -> "Hyperparameters":
        """Build from NAME=value pairs; unknown names are ignored, bad values raise ValueError."""
        start = base if base is not None else preset(env.get("PRESET", "baseline"))
        values = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name.upper(), raw, type(getattr(start, f.name)))
        cfg = dataclasses.replace(start, **values)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Hyperparameters":
        data = json.loads(text)
        known = {f.name: f for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"config JSON has unknown key {key!r}")
        defaults = cls()
        values = {k: _parse(k.upper(), v, type(getattr(defaults, k))) for k, v in data.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def validate(self) -> None:
        for name in ("val_batch_size", "iterations", "train_batch_tokens", "train_seq_len", "vocab_size",
                     "num_layers", "num_kv_heads", "model_dim", "num_heads", "mlp_mult",
                     "muon_backend_steps", "mlx_max_microbatch_tokens"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        for name in ("val_loss_every", "train_log_every", "warmdown_iters", "warmup_steps",
                     "max_wallclock_seconds", "muon_momentum_warmup_steps", "grad_clip_norm",
                     "eval_stride", "checkpoint_every", "adam_eps", "tied_embed_init_std", "mlx_streams"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("rope_base", "logit_softcap", "qk_gain_init"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        _require(self.vocab_size <= 65536, "vocab_size", "must fit uint16 shards (<= 65536)")
        _require(self.model_dim % self.num_heads == 0, "model_dim", f"must be divisible by NUM_HEADS={self.num_heads}")
        _require(self.head_dim % 2 == 0, "model_dim", f"gives odd head dim {self.head_dim}; RoPE needs it even")
        _require(self.num_heads % self.num_kv_heads == 0, "num_heads", f"must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        slot = MICRO_BATCHES_PER_STEP * self.train_seq_len
        _require(self.train_batch_tokens % slot == 0, "train_batch_tokens",
                 f"must be a multiple of {MICRO_BATCHES_PER_STEP}*TRAIN_SEQ_LEN={slot}")
        _require(self.eval_stride <= self.train_seq_len, "eval_stride", "must be <= TRAIN_SEQ_LEN")
        _require(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"must be one of {COMPUTE_DTYPES}")
        _require(self.mlx_max_microbatch_tokens % self.train_seq_len == 0, "mlx_max_microbatch_tokens",
                 f"must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        _require(self.mlx_ops in ("auto", "fused", "composed"), "mlx_ops", "must be auto, fused or composed")
        for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")

    def resolved_artifact_path(self) -> str:
        return self.artifact_path or f"artifacts/{self.run_id}.int8.zst"

    def resolved_checkpoint_path(self, step: int = 0) -> str:
        """CHECKPOINT_PATH may hold {step} to keep one file per checkpoint instead of the latest only."""
        return (self.checkpoint_path or f"checkpoints/{self.run_id}.ckpt").format(step=step)


# Fields that fix the network's shape and numerics: an artifact is only valid under these.
MODEL_FIELDS = ("vocab_size", "num_layers", "num_kv_heads", "model_dim", "num_heads", "mlp_mult",
                "tie_embeddings", "rope_base", "logit_softcap")

PRESETS: dict[str, dict[str, Any]] = {
    "baseline": {},
    # CPU smoke/benchmark size: the tiny config, on the demo data.
    "tiny": dict(data_path="./data/datasets/demo_sp1024", tokenizer_path="./data/tokenizers/demo_sp1024.model",
                 num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, train_seq_len=128,
                 train_batch_tokens=8192, val_batch_size=8192, iterations=300, warmdown_iters=100,
                 warmup_steps=5, val_loss_every=100, train_log_every=25, max_wallclock_seconds=0.0,
                 muon_momentum_warmup_steps=100, mlx_max_microbatch_tokens=1024),
}


def preset(name: str) -> Hyperparameters:
    if name not in PRESETS:
        raise ValueError(f"PRESET={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return Hyperparameters(**PRESETS[name])


def artifact_config_for_env(artifact_cfg: Hyperparameters, env: Mapping[str, str], origin: str) -> Hyperparameters:
    """Config to evaluate an artifact with: its own, plus env overrides that do not change the model."""
    cfg = Hyperparameters.from_env(env, base=artifact_cfg)
    for name in MODEL_FIELDS:
        if getattr(cfg, name) != getattr(artifact_cfg, name):
            raise ValueError(f"{origin} was trained with {name.upper()}={getattr(artifact_cfg, name)!r} "
                             f"but the environment sets {name.upper()}={getattr(cfg, name)!r}")
    return cfg


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{name.upper()} {why}")


def _parse(name: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        return _parse_bool(name, raw)
    if kind is int:
        try:
            if isinstance(raw, str):
                return int(raw.strip())
            if isinstance(raw, bool) or int(raw) != raw:
                raise ValueError
            return int(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name}={raw!r} is not an integer") from None
    if kind is float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{name}={raw!r} is not finite")
        return value
    return str(raw)


def _parse_bool(name: str, raw: Any) -> bool:
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use 0 or 1)")


def parse_trainer_cli(backend: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line both trainers share; everything else is env vars (Hyperparameters)."""
    ap = argparse.ArgumentParser(description=f"{backend} trainer (config from env vars, see shared/config.py)")
    ap.add_argument("--eval", metavar="ARTIFACT", help="only score this artifact on DATA_PATH's validation split")
    ap.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from a checkpoint")
    return ap.parse_args(argv)
