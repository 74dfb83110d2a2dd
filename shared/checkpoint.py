"""Full training-state checkpoints in a framework-neutral file (safetensors + JSON metadata).

Tensors: "param:{name}" (fp32 weights) and "opt:{name}:{slot}" (optimizer state:
Muon "momentum"; Adam "m", "v", "step"); metadata: step, data position (shard,
offset), elapsed training time and the config. The same names in both trainers,
so a run can resume in either. No RNG state: after the numpy init from SEED,
training draws no random numbers (no dropout, fixed data order). Written
atomically, so a crash mid-write keeps the previous checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.config import Hyperparameters
from shared.fsutil import atomic_write_bytes

CHECKPOINT_FORMAT = "parameter-golf-checkpoint-v1"
# Fields a resumed run may change: logging, paths, the stopping point and speed knobs.
RESUMABLE_CHANGES = ("run_id", "iterations", "val_loss_every", "train_log_every", "checkpoint_every",
                     "checkpoint_path", "artifact_path", "max_wallclock_seconds", "torch_compile", "mlx_compile",
                     "mlx_ops", "mlx_max_microbatch_tokens", "mlx_streams")


def save_checkpoint(path: str | os.PathLike, cfg: Hyperparameters, tensors: dict[str, np.ndarray], meta: dict) -> None:
    metadata = {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "meta": json.dumps(meta, sort_keys=True)}
    payload = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(payload, metadata=metadata))


def load_checkpoint(path: str | os.PathLike, cfg: Hyperparameters) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and meta of a checkpoint; ValueError if it was made under an incompatible config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + header_len])["__metadata__"]
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({exc})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path}: format {metadata.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    _check_compatible(path, Hyperparameters.from_json(metadata["config"]), cfg)
    return tensors, json.loads(metadata["meta"])


def _check_compatible(path: Path, saved: Hyperparameters, cfg: Hyperparameters) -> None:
    for f in dataclasses.fields(Hyperparameters):
        if f.name in RESUMABLE_CHANGES:
            continue
        if getattr(saved, f.name) != getattr(cfg, f.name):
            raise ValueError(f"checkpoint {path} was made with {f.name.upper()}={getattr(saved, f.name)!r}, "
                             f"this run has {f.name.upper()}={getattr(cfg, f.name)!r}")
