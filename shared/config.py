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
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

# The official scheme splits every optimizer step into 8 equal slots of tokens:
# grad accumulation 8/WORLD_SIZE, so any world size dividing 8 sees the same tokens.
MICRO_BATCHES_PER_STEP = 8

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
MLP_ACTS = ("relu2", "leaky_relu2")
MUON_NS_KINDS = ("quintic", "polar_express")  # coefficients in shared/spec.py
_SAFE_ID = re.compile(r"([^./\x00][^/\x00]*)?")  # "" = unset (a fresh id at start)


ROLES = ("model", "train", "eval", "run", "backend", "export")
# model:   shape and numerics of the network; an artifact is valid only under these.
# train:   the training trajectory (data order, batch, optimizer, schedule, init); fixed across a resume.
# eval:    how a score is computed (windows, batch, data and tokenizer paths); --eval may override.
# run:     bookkeeping and run length (ids, paths, cadence, stopping point); a resume or --eval may change.
#          ITERATIONS, MAX_WALLCLOCK_SECONDS and GPTQ_RESERVE_SECONDS also place the warmdown: changing them on
#          resume re-plans it.
# backend: one framework's speed knobs and compute dtype; a resume or --eval may change.
# export:  how the artifact is quantized and compressed (QUANT, bits, clips, LQER, COMPRESSOR); read once, after
#          training, so a resume may change them; --eval may not (the artifact it scores is already written).
EVAL_OVERRIDABLE = ("eval", "run", "backend")
RESUME_CHANGEABLE = ("eval", "run", "backend", "export")
QUANTS = ("int8", "gptq")  # shared/quant/: int8 = the official per-row int8; gptq = GPTQ + SDClip (+ LQER)
COMPRESSORS = ("zstd", "lzma", "brotli", "entropy")  # shared/artifact.py; entropy = shared/quant/coding.py
ARTIFACT_EXT = {"zstd": "zst", "lzma": "xz", "brotli": "br", "entropy": "ans"}  # the default artifact name's suffix
GPTQ_SOLVERS = ("numpy", "torch", "auto")  # numpy = the reference; torch = torch_gptq.py; auto = torch on CUDA
MLX_OPS_KINDS = ("auto", "fused", "composed")  # mlx_cpu_ops.select_ops


# What reads a "train" knob: every one says, so a new optimizer knob cannot escape the twins' generated parity
# variants (parity_tests/variants.py), which move each knob an optimizer reads and compare the two steps.
READERS = ("optimizer", "schedule", "init", "data", "ema")


def _f(default: Any, role: str, choices: tuple | None = None, reads: str | None = None) -> Any:
    """A field: its role; `choices`, the allowed values of an enumerated knob (checked at parse, each one a
    registry entry where a framework implements it); `reads`, which part of training reads a train knob."""
    assert role in ROLES, role
    assert (reads is not None) == (role == "train") and reads in READERS + (None,), (role, reads)
    meta = {"role": role} | ({"choices": choices} if choices else {}) | ({"reads": reads} if reads else {})
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Hyperparameters:
    data_path: str = _f("./data/datasets/fineweb10B_sp1024", "eval")  # resume compares content, not the string
    tokenizer_path: str = _f("./data/tokenizers/fineweb_1024_bpe.model", "eval")
    run_id: str = _f("", "run")  # "" -> a fresh unique id at start (logs and artifacts never merge)
    seed: int = _f(1337, "train", reads="init")
    val_batch_size: int = _f(524_288, "eval")
    val_loss_every: int = _f(1000, "run")
    train_log_every: int = _f(200, "run")
    iterations: int = _f(20_000, "run")
    warmdown_iters: int = _f(1200, "train", reads="schedule")
    warmdown_frac: float = _f(0.0, "train", reads="schedule")  # > 0: the record's fraction warmdown (§5.5) replaces WARMDOWN_ITERS
    min_lr: float = _f(0.0, "train", reads="schedule")  # floor of WARMDOWN_FRAC's multiplier (unused by WARMDOWN_ITERS)
    warmup_steps: int = _f(20, "run")  # priming steps, undone before training: no effect on the result
    train_batch_tokens: int = _f(524_288, "train", reads="data")
    train_seq_len: int = _f(1024, "train", reads="data")  # also the eval window (the official rule)
    max_wallclock_seconds: float = _f(600.0, "run")
    gptq_reserve_seconds: float = _f(0.0, "run")  # of the cap, kept for quantization reading training data
    qk_gain_init: float = _f(1.5, "train", reads="init")
    vocab_size: int = _f(1024, "model")
    num_layers: int = _f(9, "model")
    num_kv_heads: int = _f(4, "model")
    model_dim: int = _f(512, "model")
    num_heads: int = _f(8, "model")
    mlp_mult: float = _f(2.0, "model")  # MLP hidden = MLP_MULT * MODEL_DIM, a whole number (shared/spec.mlp_hidden)
    tie_embeddings: bool = _f(True, "model")
    rope_base: float = _f(10000.0, "model")
    logit_softcap: float = _f(30.0, "model")
    embed_lr: float = _f(0.6, "train", reads="optimizer")
    head_lr: float = _f(0.008, "train", reads="optimizer")
    tied_embed_lr: float = _f(0.05, "train", reads="optimizer")
    tied_embed_init_std: float = _f(0.005, "train", reads="init")
    matrix_lr: float = _f(0.04, "train", reads="optimizer")
    scalar_lr: float = _f(0.04, "train", reads="optimizer")
    muon_momentum: float = _f(0.95, "train", reads="optimizer")
    muon_backend_steps: int = _f(5, "train", reads="optimizer")
    muon_momentum_warmup_start: float = _f(0.85, "train", reads="schedule")
    muon_momentum_warmup_steps: int = _f(500, "train", reads="schedule")
    beta1: float = _f(0.9, "train", reads="optimizer")
    beta2: float = _f(0.95, "train", reads="optimizer")
    adam_eps: float = _f(1e-8, "train", reads="optimizer")
    grad_clip_norm: float = _f(0.0, "train", reads="optimizer")
    # Decoupled weight decay (RECORD_STACK.md §5.3, §5.4): W <- W*(1 - lr*WD) before each step, lr the scheduled one.
    muon_wd: float = _f(0.0, "train", reads="optimizer")  # the Muon (matrix) group
    embed_wd: float = _f(0.0, "train", reads="optimizer")  # the token embedding (Adam "tok" group)
    adam_wd: float = _f(0.0, "train", reads="optimizer")  # the Adam "scalar" group (an untied head gets no decay, as in the record's code)
    # Muon's orthogonalisation (RECORD_STACK.md §5.3): quintic = the baseline's fixed (3.4445, -4.7750, 2.0315)
    # Newton-Schulz; polar_express = the record's per-iteration tuples (shared/spec.py; past 5 steps the last repeats).
    muon_ns: str = _f("quintic", "train", choices=MUON_NS_KINDS, reads="optimizer")
    muon_row_normalize: bool = _f(False, "train", reads="optimizer")  # MuonEq-R: each update row to unit L2 norm (fp32) before it
    # EMA of the weights (RECORD_STACK.md §5.6): fp32 shadow, ema <- d*ema + (1-d)*w after every step; exported
    # and scored instead of the live weights. 0 = off.
    ema_decay: float = _f(0.0, "train", reads="ema")
    # Knobs of the record stack (RECORD_STACK.md §3); their defaults are the baseline's network.
    mlp_act: str = _f("relu2", "model", choices=MLP_ACTS)  # relu2: relu(h)^2 | leaky_relu2: leaky_relu(h, MLP_LEAKY_SLOPE)^2
    mlp_leaky_slope: float = _f(0.5, "model")  # read only by MLP_ACT=leaky_relu2
    rope_dims: int = _f(0, "model")  # RoPE on the first ROPE_DIMS dims of each head; 0 = all (head_dim)
    ln_scale: bool = _f(False, "model")  # block i scales its normed attn/MLP inputs by 1/sqrt(i+1)
    xsa_last_n: int = _f(0, "model")  # the last N layers remove from each head's output its own token's v direction
    skip_gates_enabled: bool = _f(False, "model")  # U-Net skips mixed by a sigmoid gate (lerp), not added
    ortho_init: bool = _f(False, "train", reads="init")  # q/k/v/MLP-up drawn orthogonal (the record) instead of nn.Linear-uniform
    smear_gate_enabled: bool = _f(False, "model")  # e_t += lambda*sigmoid(w . e_t[:GATE_WINDOW]) * e_{t-1}, not at BOS
    gate_window: int = _f(12, "model")  # the first GATE_WINDOW input dims feed the smear and sparse attention gates
    sparse_attn_gate_enabled: bool = _f(False, "model")  # head h's output *= sigmoid(SCALE * G_h . n[:GATE_WINDOW])
    sparse_attn_gate_scale: float = _f(1.0, "model")  # the record's code default; the record runs 0.5
    # Depth recurrence (§3.2): once on, layers LOOP_START..LOOP_END run NUM_LOOPS extra times with shared weights.
    num_loops: int = _f(0, "model")  # 0 = off
    loop_start: int = _f(3, "model")  # first and last physical layer of the looped block (read when NUM_LOOPS > 0)
    loop_end: int = _f(5, "model")
    enable_looping_at: float = _f(0.35, "train", reads="schedule")  # training fraction (wallclock, else steps) where looping starts
    parallel_start_layer: int = _f(0, "model")  # decoder layers >= this run as two residual lanes (§3.7); 0 = off
    doc_isolated_attn: bool = _f(False, "model")  # attention stays inside each document of a row (split at BOS)
    # Score-first TTT (RECORD_STACK.md §7.2; shared/ttt.py): the scored number when TTT_ENABLED. Defaults are the
    # record's code defaults; PRESET=record sets its logged values.
    ttt_enabled: bool = _f(False, "eval")
    ttt_lora_rank: int = _f(96, "eval")
    ttt_lora_alpha: float = _f(144.0, "eval")  # adapter scale alpha / rank
    ttt_lora_lr: float = _f(1e-4, "eval")  # constant
    ttt_chunk_size: int = _f(48, "eval")  # predictions scored (then trained on) per step
    ttt_eval_seq_len: int = _f(2048, "eval")  # window of the document's own context; also global SGD's rows
    ttt_batch_size: int = _f(64, "eval")  # documents per batch, one adapter slot each
    ttt_beta1: float = _f(0.0, "eval")
    ttt_beta2: float = _f(0.999, "eval")
    ttt_weight_decay: float = _f(1.0, "eval")  # decoupled: p <- p (1 - lr wd)
    ttt_warm_start_a: bool = _f(True, "eval")  # keep A between a stream's batches (B and Adam always reset)
    ttt_k_lora: bool = _f(True, "eval")
    ttt_o_lora: bool = _f(True, "eval")
    ttt_mlp_lora: bool = _f(True, "eval")
    ttt_streams: int = _f(8, "eval")  # ours: virtual work streams; a rank owns whole ones (any world size <= it)
    phased_ttt_prefix_docs: int = _f(2000, "eval")
    phased_ttt_num_phases: int = _f(1, "eval")  # 0: no global SGD
    global_ttt_lr: float = _f(1e-3, "eval")
    global_ttt_momentum: float = _f(0.9, "eval")
    global_ttt_chunk_tokens: int = _f(32_768, "eval")
    global_ttt_grad_clip: float = _f(1.0, "eval")  # on the rank-averaged gradient; 0 = off
    global_ttt_epochs: int = _f(1, "eval")
    global_ttt_warmup_chunks: int = _f(0, "eval")
    # Our additions (not in the official script).
    eval_stride: int = _f(0, "eval")  # 0: official non-overlapping windows; >0: sliding windows
    tokenizer_check: bool = _f(True, "eval")  # 0: score even if the tokenizer is not the dataset's (see manifest)
    compute_dtype: str = _f("auto", "backend", choices=COMPUTE_DTYPES)  # auto: bf16 on CUDA/Metal, fp32 on CPU
    artifact_path: str = _f("", "run")  # "" -> artifacts/{run_id}.{quant}.{zst|xz|br|ans}
    checkpoint_every: int = _f(0, "run")  # steps between full training-state checkpoints; 0 = off
    checkpoint_path: str = _f("", "run")  # "" -> checkpoints/{run_id}.ckpt; may contain {step}
    torch_compile: bool = _f(True, "backend")  # CUDA only; never on CPU
    # Training-only torch paths with hand-written backwards (torch_model.py), A/B'd by bench/gpu_check.py kernels
    # on an H200 (98,304 tokens, compiled, fwd+bwd): the softcapped CE 4.49 ms against 4.81 for the reference ops,
    # so on; the MLP 2.27 ms against 2.26, no gain over what torch.compile makes of the reference, so off.
    torch_fused_ce: bool = _f(True, "backend")
    torch_fused_mlp: bool = _f(False, "backend")
    ttt_compile: bool = _f(False, "backend")  # CUDA only: torch.compile TTT's LoRA forward (+ backward); torch_ttt.py
    mlx_max_microbatch_tokens: int = _f(8192, "backend")
    mlx_compile: bool = _f(True, "backend")
    mlx_ops: str = _f("auto", "backend", choices=MLX_OPS_KINDS)  # auto | fused | composed: see mlx_cpu_ops.select_ops
    mlx_streams: int = _f(0, "backend")  # chunks computed concurrently; 0 = auto (1 on Metal, one per CPU core up to 4)
    # The artifact (RECORD_STACK.md §6; defaults: today's int8 + zstd-22; the others are the record's code defaults)
    quant: str = _f("int8", "export", choices=QUANTS)  # int8 | gptq (shared/quant/gptq.py)
    compressor: str = _f("zstd", "export", choices=COMPRESSORS)  # zstd (22) | lzma (9) | brotli (11) | entropy (range coder + zstd)
    matrix_bits: int = _f(6, "export")  # GPTQ integer width of the block matrices (R = 2^(b-1) - 1)
    embed_bits: int = _f(8, "export")  # ... of tok_emb.weight (the record runs 7)
    matrix_clip_sigmas: float = _f(12.85, "export")  # SDClip k: row scale = k * std(row) / R
    attn_clip_sigmas: float = _f(13.0, "export")
    mlp_clip_sigmas: float = _f(10.0, "export")  # the record runs 11.5
    embed_clip_sigmas: float = _f(20.0, "export")  # the record runs 14.0
    quant_passthrough_numel: int = _f(65_536, "export")  # gptq: matrices up to this size stay fp16 (record 65,536)
    gptq_calibration_batches: int = _f(16, "export")  # training micro-batches whose activations give H = sum x^T x
    gptq_solver: str = _f("numpy", "export", choices=GPTQ_SOLVERS)  # numpy | torch (the trainer's device) | auto (torch on CUDA, else numpy)
    lqer_enabled: bool = _f(False, "export")  # low-rank correction of the worst GPTQ tensors (§6.4)
    lqer_rank: int = _f(4, "export")
    lqer_top_k: int = _f(3, "export")  # tensors by ||W - W_hat||_F
    lqer_asym_group: int = _f(64, "export")  # INT4 group size of the B factor

    @classmethod
    def from_env(cls, env: Mapping[str, str], base: "Hyperparameters | None" = None) -> "Hyperparameters":
        """Build from NAME=value pairs; unknown names are ignored (see near_misses), bad values raise ValueError."""
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
        for name, allowed in choice_fields().items():
            _require(getattr(self, name) in allowed, name, f"must be one of {allowed}")
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
        _require(self.mlp_leaky_slope >= 0, "mlp_leaky_slope", "must be >= 0")
        _require(0 <= self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0, "rope_dims",
                 f"must be even and in [0, head dim {self.head_dim}] (0 = all)")
        _require(0 <= self.xsa_last_n <= self.num_layers, "xsa_last_n",
                 f"must be in [0, NUM_LAYERS={self.num_layers}]")
        if self.smear_gate_enabled or self.sparse_attn_gate_enabled:
            _require(1 <= self.gate_window <= self.model_dim, "gate_window",
                     f"must be in [1, MODEL_DIM={self.model_dim}] when a gate is on")
        from shared.spec import mlp_hidden  # here, not at the top: shared.spec imports this module
        mlp_hidden(self)  # MLP_MULT * MODEL_DIM must be a whole number
        self._validate_loops_and_lanes()
        _require(self.num_heads % self.num_kv_heads == 0, "num_heads", f"must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        slot = MICRO_BATCHES_PER_STEP * self.train_seq_len
        _require(self.train_batch_tokens % slot == 0, "train_batch_tokens",
                 f"must be a multiple of {MICRO_BATCHES_PER_STEP}*TRAIN_SEQ_LEN={slot}")
        _require(self.eval_stride <= self.train_seq_len, "eval_stride", "must be <= TRAIN_SEQ_LEN")
        for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        for name in ("embed_lr", "head_lr", "tied_embed_lr", "matrix_lr", "scalar_lr"):
            _require(getattr(self, name) >= 0, name, "must be >= 0 (a negative learning rate climbs the loss)")
        self._validate_schedule()
        for name in ("muon_wd", "embed_wd", "adam_wd"):
            _require(getattr(self, name) >= 0, name, "must be >= 0 (a negative decay grows the weights)")
        self._validate_export()
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1) (0 = off; 1 would never move)")
        self._validate_ttt()
        _require(self.adam_eps > 0, "adam_eps", "must be > 0 (0 divides by zero where a gradient is 0)")
        _require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        _require(_SAFE_ID.fullmatch(self.run_id) is not None, "run_id",
                 f"{self.run_id!r} is not a usable file name in logs/: no '/', no NUL, not starting with '.'")
        _require(self.artifact_path == "" or not self.artifact_path.endswith(("/", os.sep)), "artifact_path",
                 f"{self.artifact_path!r} names a folder, not a file")

    def _validate_export(self) -> None:
        for name in ("matrix_bits", "embed_bits"):
            _require(2 <= getattr(self, name) <= 8, name, "must be in [2, 8] (stored as int8)")
        for name in ("matrix_clip_sigmas", "attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        for name in ("gptq_calibration_batches", "lqer_rank", "lqer_top_k", "lqer_asym_group",
                     "quant_passthrough_numel"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(not self.lqer_enabled or self.quant == "gptq", "lqer_enabled", "corrects GPTQ's error: set QUANT=gptq")

    def _validate_ttt(self) -> None:
        for name in ("ttt_lora_rank", "ttt_chunk_size", "ttt_eval_seq_len", "ttt_batch_size", "ttt_streams",
                     "global_ttt_chunk_tokens"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        for name in ("ttt_lora_lr", "ttt_weight_decay", "global_ttt_lr", "global_ttt_grad_clip",
                     "phased_ttt_prefix_docs", "phased_ttt_num_phases", "global_ttt_epochs",
                     "global_ttt_warmup_chunks"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("ttt_beta1", "ttt_beta2", "global_ttt_momentum"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        _require(self.ttt_lora_alpha > 0, "ttt_lora_alpha", "must be > 0")
        _require(self.ttt_chunk_size <= self.ttt_eval_seq_len, "ttt_chunk_size",
                 f"must be <= TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len} (a chunk must fit its window)")
        _require(self.global_ttt_chunk_tokens >= self.ttt_eval_seq_len, "global_ttt_chunk_tokens",
                 f"must be >= TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len} (one row at least)")

    def _validate_schedule(self) -> None:
        for name in ("warmdown_frac", "min_lr"):
            _require(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        _require(self.min_lr == 0 or self.warmdown_frac > 0, "min_lr",
                 "floors only the WARMDOWN_FRAC schedule: set WARMDOWN_FRAC > 0 or MIN_LR=0")
        cap = self.max_wallclock_seconds
        if cap > 0:
            _require(0.0 <= self.gptq_reserve_seconds < cap, "gptq_reserve_seconds",
                     f"must be in [0, MAX_WALLCLOCK_SECONDS={cap}) (it is taken from the training budget)")
        else:
            _require(self.gptq_reserve_seconds >= 0, "gptq_reserve_seconds", "must be >= 0")

    def _validate_loops_and_lanes(self) -> None:
        from shared.spec import layer_schedule  # here, not at the top: shared.spec imports this module

        _require(self.num_loops >= 0, "num_loops", "must be >= 0 (0 = off)")
        if self.num_loops > 0:
            _require(0 <= self.loop_start <= self.loop_end < self.num_layers, "loop_start",
                     f"and LOOP_END must satisfy 0 <= LOOP_START <= LOOP_END < NUM_LAYERS={self.num_layers} "
                     f"(got {self.loop_start}, {self.loop_end})")
        _require(0.0 <= self.enable_looping_at <= 1.0, "enable_looping_at", "must be in [0, 1]")
        p = self.parallel_start_layer
        _require(0 <= p < self.num_layers, "parallel_start_layer", f"must be in [0, NUM_LAYERS={self.num_layers}) "
                 f"(0 = off)")
        for looping in (False, True) if p > 0 else ():
            # lanes, once split, never merge back into one stream: layers >= p must end the decoder
            encoder, decoder = layer_schedule(self, looping)
            first = next(j for j, i in enumerate(decoder + [p]) if i >= p)
            _require(all(i < p for i in encoder) and all(i >= p for i in decoder[first:]), "parallel_start_layer",
                     f"must leave layers >= {p} only at the end of the decoder (lanes never merge back), "
                     f"but the {'looped' if looping else 'unlooped'} schedule is {encoder} | {decoder}")

    def resolved_artifact_path(self) -> str:
        """ARTIFACT_PATH, or artifacts/RUN_ID.QUANT.EXT named by what is inside (the default: RUN_ID.int8.zst)."""
        return self.artifact_path or f"artifacts/{self.run_id}.{self.quant}.{ARTIFACT_EXT[self.compressor]}"

    def resolved_checkpoint_path(self, step: int = 0) -> str:
        """CHECKPOINT_PATH may hold {step} to keep one file per checkpoint instead of the latest only."""
        return (self.checkpoint_path or f"checkpoints/{self.run_id}.ckpt").format(step=step)


def fields_with_role(*roles: str) -> tuple[str, ...]:
    """Field names tagged with any of `roles` (the lists other modules used to write by hand)."""
    return tuple(f.name for f in fields(Hyperparameters) if f.metadata["role"] in roles)


def choice_fields(*roles: str, cls: type = None) -> dict[str, tuple]:
    """Enumerated knobs (of `roles`, default all) and their allowed values, from the fields' metadata."""
    return {f.name: f.metadata["choices"] for f in fields(cls or Hyperparameters)
            if "choices" in f.metadata and (not roles or f.metadata["role"] in roles)}


def implementation(table: Mapping[str, Any], knob: str, value: str, where: str) -> Any:
    """The registry entry of an enumerated knob's value (each framework keeps a name -> implementation table whose
    keys the tests hold to the knob's choices); a value it lacks is one line naming the knob and the module."""
    if value not in table:
        raise ValueError(f"{knob.upper()}={value!r} has no implementation in {where} (it has {sorted(table)})")
    return table[value]


def fields_read_by(reader: str, cls: type = None) -> tuple[str, ...]:
    """The train knobs that `reader` (one of READERS) reads."""
    return tuple(f.name for f in fields(cls or Hyperparameters) if f.metadata.get("reads") == reader)


def changed_fields(old: Hyperparameters, new: Hyperparameters, allowed_roles: tuple[str, ...]) -> list[str]:
    """Fields that differ between old and new although their role is not in allowed_roles."""
    return [name for name in fields_with_role(*(r for r in ROLES if r not in allowed_roles))
            if getattr(old, name) != getattr(new, name)]


def near_misses(env: Mapping[str, str]) -> list[str]:
    """Environment names that look like a mistyped knob (edit distance <= 2, same first three letters)."""
    knobs = [f.name.upper() for f in fields(Hyperparameters)] + ["PRESET"]
    out = []
    for name in sorted(env):
        if name in knobs:
            continue
        for knob in knobs:
            if name[:3] == knob[:3] and _edit_distance(name, knob) <= 2:
                out.append(f"{name} is not a knob; did you mean {knob}?")
                break
    return out


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def with_run_id(cfg: Hyperparameters, fresh_id: str) -> Hyperparameters:
    """RUN_ID unset: a fresh id (the official script uses a uuid), so logs and artifacts never merge."""
    return cfg if cfg.run_id else dataclasses.replace(cfg, run_id=fresh_id)


PRESETS: dict[str, dict[str, Any]] = {
    "baseline": {},
    # CPU smoke/benchmark size: the tiny config, on the demo data.
    "tiny": dict(data_path="./data/datasets/demo_sp1024", tokenizer_path="./data/tokenizers/demo_sp1024.model",
                 num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, train_seq_len=128,
                 train_batch_tokens=8192, val_batch_size=8192, iterations=300, warmdown_iters=100,
                 warmup_steps=5, val_loss_every=100, train_log_every=25, max_wallclock_seconds=0.0,
                 muon_momentum_warmup_steps=100, mlx_max_microbatch_tokens=1024),
}
# The 1.0611 record's network (RECORD_STACK.md §2, §3, §8), every model knob at its logged value, on the SP8192
# export. Its optimizer and quantization values come with those features, not here.
RECORD_MODEL: dict[str, Any] = dict(
    vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
    mlp_act="leaky_relu2", mlp_leaky_slope=0.5, rope_dims=16, rope_base=10000.0, ln_scale=True, xsa_last_n=11,
    qk_gain_init=5.0, logit_softcap=30.0, tie_embeddings=True, tied_embed_init_std=0.005, skip_gates_enabled=True,
    smear_gate_enabled=True, gate_window=12, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
    num_loops=2, loop_start=3, loop_end=5, enable_looping_at=0.35, parallel_start_layer=8, ortho_init=True,
    doc_isolated_attn=True)
# The record's optimizer (RECORD_STACK.md §5.2-§5.4): rates, momentum 0.97 warmed up from 0.92, beta2, clipping,
# decoupled weight decay, Polar Express with MuonEq-R.
RECORD_OPTIMIZER: dict[str, Any] = dict(
    matrix_lr=0.026, scalar_lr=0.02, tied_embed_lr=0.03, muon_momentum=0.97, muon_momentum_warmup_start=0.92,
    muon_momentum_warmup_steps=1500, beta2=0.99, grad_clip_norm=0.3, muon_wd=0.095, embed_wd=0.085, adam_wd=0.02,
    muon_ns="polar_express", muon_row_normalize=True)
# Data: the record's CaseOps SP8192 export, where `python data/prepare.py --variant sp8192_caseops` puts it (§1).
PRESETS["record"] = dict(RECORD_MODEL, **RECORD_OPTIMIZER,
                         data_path="./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                         tokenizer_path="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                         train_seq_len=2048, train_batch_tokens=786_432, val_batch_size=524_288,
                         # §5.5: a 600 s cap less 0.5 s for GPTQ's calibration, the fraction warmdown over the
                         # last 85% floored at 0.1, 20 discarded compile steps (no LR warm-up)
                         max_wallclock_seconds=600.0, gptq_reserve_seconds=0.5, iterations=20_000,
                         warmdown_frac=0.85, min_lr=0.10, warmup_steps=20,
                         ema_decay=0.9965,  # §5.6
                         # §6, §8: GPTQ int6 (embedding int7) with SDClip, calibrated on 16 training micro-batches,
                         # LQER on the 3 worst tensors; our ANS coder instead of the record's lrzip/brotli serializer
                         quant="gptq", compressor="entropy", matrix_bits=6, embed_bits=7, matrix_clip_sigmas=12.85,
                         attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0,
                         gptq_calibration_batches=16, lqer_enabled=True, lqer_rank=4, lqer_top_k=3,
                         lqer_asym_group=64,
                         gptq_solver="auto",  # GPTQ's solve on the GPU when the trainer has one (seconds, not minutes)
                         # §7.2, §8: the scored number is phased score-first TTT
                         ttt_enabled=True, ttt_lora_rank=80, ttt_lora_alpha=144.0, ttt_lora_lr=1e-4,
                         ttt_chunk_size=48, ttt_eval_seq_len=2048, ttt_batch_size=64, ttt_beta1=0.0,
                         ttt_beta2=0.99, ttt_weight_decay=0.5, ttt_warm_start_a=True, phased_ttt_prefix_docs=2500,
                         phased_ttt_num_phases=3, global_ttt_lr=1e-3, global_ttt_momentum=0.9,
                         global_ttt_chunk_tokens=32_768, global_ttt_grad_clip=1.0, global_ttt_epochs=1)
# The record's network at width 256 (4 query / 2 KV heads of the record's dim 64, so ROPE_DIMS=16 and the gates
# read the same dims) and depth, loops and lanes unchanged: a 10-minute run on a 16 GB Apple-Silicon laptop
# (README "Presets" gives the arithmetic). Sequence 1024 and 16K-token steps keep the step count useful.
PRESETS["mac"] = dict(RECORD_MODEL, **{**RECORD_OPTIMIZER, "muon_momentum_warmup_steps": 100},
                      model_dim=256, num_heads=4, num_kv_heads=2,
                      data_path="./data/datasets/fineweb10B_sp8192",
                      tokenizer_path="./data/tokenizers/fineweb_8192_bpe.model",
                      train_seq_len=1024, train_batch_tokens=16_384, val_batch_size=131_072,
                      warmup_steps=10, train_log_every=25, val_loss_every=0, mlx_max_microbatch_tokens=8192,
                      # the record's warmdown: it is timed by the fraction of the wallclock budget, so it fits
                      # the few hundred steps a laptop takes in 10 minutes as it fits the record's 4,900 (no
                      # step count to guess, unlike WARMDOWN_ITERS); the 500-step momentum warm-up would span
                      # the whole run, so 100. No GPTQ reserve: the mac preset does not calibrate on train data.
                      # EMA 0.95: a 20-step window, ~6% of the few hundred steps as the record's 286-step window is
                      # of its ~4,900 (0.9965 would leave a third of the initial weights in a 300-step export).
                      # The rest of the record's optimizer as is: Muon's rates are width-independent by design
                      # (orthogonalised updates), and a measured comparison is in README "Presets".
                      warmdown_frac=0.85, min_lr=0.10, ema_decay=0.95)
# CI size with every record feature on, on the demo data: 6 layers of width 64 (head dim 16, RoPE on 8 of it),
# layers 2..3 looped twice more (10 applications: [0,1,2,3,2] | [3,2,3,4,5]), lanes on layers 4..5.
# EMA 0.95: a 1/(1-d) = 20-step window, 7% of the 300 steps as the record's 286 steps are 6% of its ~4,900, and
# 0.95**300 leaves nothing of the initial weights (0.99 would leave 5% of them in the export). The record's
# optimizer with its fraction warmdown, the momentum warm-up scaled to the 300 steps (tiny's 100).
PRESETS["tiny_record"] = dict(PRESETS["tiny"], **dict(
    RECORD_MODEL, vocab_size=1024, num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
    xsa_last_n=6, loop_start=2, loop_end=3, parallel_start_layer=4), **dict(
    RECORD_OPTIMIZER, muon_momentum_warmup_steps=100), warmdown_frac=0.85, min_lr=0.10, ema_decay=0.95,
    # the record's quantization; at width 64 no matrix passes the record's 65,536-element threshold, so 1,024 (every
    # block matrix and the embedding go through GPTQ); 2 calibration micro-batches (16K tokens), LQER on 1 tensor
    quant="gptq", compressor="entropy", matrix_bits=6, embed_bits=7, mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0,
    quant_passthrough_numel=1024, gptq_calibration_batches=2, lqer_enabled=True, lqer_top_k=1,
    # TTT off (CI speed) but sized for the demo split when TTT_ENABLED=1: rank 4, chunks of 16 in windows of 128,
    # 8 docs a batch, two phases over the first 24 docs (the demo split has 52), 1024-token SGD chunks
    ttt_lora_rank=4, ttt_lora_alpha=8.0, ttt_lora_lr=1e-3, ttt_chunk_size=16, ttt_eval_seq_len=128,
    ttt_batch_size=8, ttt_beta2=0.99, ttt_weight_decay=0.5, ttt_streams=4, phased_ttt_prefix_docs=24,
    phased_ttt_num_phases=2, global_ttt_chunk_tokens=1024)


def preset(name: str) -> Hyperparameters:
    if name not in PRESETS:
        raise ValueError(f"PRESET={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return Hyperparameters(**PRESETS[name])


def artifact_config_for_env(artifact_cfg: Hyperparameters, env: Mapping[str, str], origin: str) -> Hyperparameters:
    """Config to evaluate an artifact with: its own, plus env overrides of eval/run/backend fields only."""
    cfg = Hyperparameters.from_env(env, base=artifact_cfg)
    for name in changed_fields(artifact_cfg, cfg, EVAL_OVERRIDABLE):
        raise ValueError(f"{origin} was trained with {name.upper()}={getattr(artifact_cfg, name)!r} "
                         f"but the environment sets {name.upper()}={getattr(cfg, name)!r}; --eval may only "
                         f"change {'/'.join(EVAL_OVERRIDABLE)} knobs")
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
