"""Full training-state checkpoints in a framework-neutral file (safetensors + JSON metadata).

Tensors: "param:{name}" (fp32 weights) and "opt:{name}:{slot}" (the slots of the
parameter's optimizer in shared/spec.py: Muon "momentum"; Adam "m", "v",
"step") and, with EMA_DECAY > 0, "ema:{name}" (the fp32 EMA shadow); metadata:
step, data position, elapsed training time, a fingerprint of the data and
tokenizer, the config, and payload_sha256 over all of it. The same names in
both trainers, so a run can resume in either. No RNG state: after the
numpy init from SEED, training draws no random numbers (no dropout, fixed data
order). Written atomically, so a crash mid-write keeps the previous checkpoint.

    tensors = pack(weights, slots, ema)                   # ema: None when EMA_DECAY=0
    save_checkpoint(path, cfg, tensors, meta)
    weights, slots, meta, ema = load_checkpoint(path, cfg)  # every check named, nothing silently zeroed
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.artifact import payload_sha256
from shared.config import RESUME_CHANGEABLE, Hyperparameters, changed_fields
from shared.fsutil import atomic_write_bytes
from shared.spec import optimizer_slots, param_table

CHECKPOINT_FORMAT = "parameter-golf-checkpoint-v2"
META_KEYS = ("step", "train_ms", "data", "fingerprint", "backend")

Slots = dict[str, dict[str, np.ndarray]]  # parameter name -> slot name -> array


def pack(weights: dict[str, np.ndarray], slots: Slots,
         ema: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    tensors = {f"param:{k}": v for k, v in weights.items()}
    tensors.update({f"ema:{k}": v for k, v in (ema or {}).items()})
    for name, by_slot in slots.items():
        tensors.update({f"opt:{name}:{slot}": v for slot, v in by_slot.items()})
    return tensors


def unpack(tensors: dict[str, np.ndarray], cfg: Hyperparameters,
           origin: str) -> tuple[dict[str, np.ndarray], Slots, dict[str, np.ndarray] | None]:
    """Weights, optimizer slots and the EMA shadow (None when EMA_DECAY=0), checked against the parameter table:
    a missing, extra or misshapen entry is a ValueError naming it."""
    expected = {}
    for p in param_table(cfg):
        expected[f"param:{p.name}"] = p.shape
        if cfg.ema_decay > 0:
            expected[f"ema:{p.name}"] = p.shape
        for slot in optimizer_slots(p):
            expected[f"opt:{p.name}:{slot}"] = (1,) if slot == "step" else p.shape
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{origin}: missing entries {missing[:4]}, unexpected entries {extra[:4]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(f"{origin}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("param:")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema:")} if cfg.ema_decay > 0 else None
    slots: Slots = {}
    for key, v in tensors.items():
        if key.startswith("opt:"):
            name, slot = key[4:].rsplit(":", 1)
            slots.setdefault(name, {})[slot] = v
    return weights, slots, ema


def save_checkpoint(path: str | os.PathLike, cfg: Hyperparameters, tensors: dict[str, np.ndarray], meta: dict) -> None:
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"non-finite values in {bad[:3]} at step {meta.get('step')}; checkpoint {path} not "
                                 f"written, the previous one is kept")
    metadata = {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "meta": json.dumps(meta, sort_keys=True)}
    payload = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata["payload_sha256"] = payload_sha256(payload, {"config": metadata["config"], "meta": metadata["meta"]})
    atomic_write_bytes(path, st_save(payload, metadata=metadata))


def load_checkpoint(path: str | os.PathLike,
                    cfg: Hyperparameters) -> tuple[dict[str, np.ndarray], Slots, dict, dict[str, np.ndarray] | None]:
    """Weights, optimizer slots, meta and the EMA shadow (None when EMA_DECAY=0); ValueError if corrupt or made
    under an incompatible config (EMA_DECAY is a training knob: a resume keeps it, so the entries match)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    tensors, metadata = _read(path)
    if payload_sha256(tensors, {"config": metadata["config"], "meta": metadata["meta"]}) != metadata["payload_sha256"]:
        raise ValueError(f"checkpoint {path}: payload sha256 does not match its metadata (corrupt file)")
    try:
        saved = Hyperparameters.from_json(metadata["config"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: stored config unusable ({exc})") from None
    for name in changed_fields(saved, cfg, RESUME_CHANGEABLE):
        raise ValueError(f"checkpoint {path} was made with {name.upper()}={getattr(saved, name)!r}, "
                         f"this run has {name.upper()}={getattr(cfg, name)!r}")
    meta = json.loads(metadata["meta"])
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {path}: metadata lacks {missing}")
    weights, slots, ema = unpack(tensors, cfg, f"checkpoint {path}")
    return weights, slots, meta, ema


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + header_len])["__metadata__"]
    except Exception as exc:  # safetensors and json raise their own types
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({exc})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path}: format {metadata.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    for key in ("config", "meta", "payload_sha256"):
        if key not in metadata:
            raise ValueError(f"checkpoint {path}: metadata lacks {key!r}")
    return tensors, metadata


def check_fingerprint(path: str | os.PathLike, saved: dict, current: dict) -> None:
    """The data and tokenizer a run resumes on must be the ones it started on (by content, not by path)."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ValueError(f"checkpoint {path} was made on other {key} ({str(saved.get(key))[:60]}) than this run "
                             f"({str(current.get(key))[:60]})")
