"""GPTQ with SDClip row scales, the record's quantizer (RECORD_STACK.md §6.2-§6.3), in numpy only.

GPTQ: Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv 2210.17323): quantize one input column at a time and push its H-weighted
error onto the columns not yet quantized, using the upper Cholesky factor of H^-1; act-order (columns by
decreasing diag H), blocks of 128 columns with a lazy update of the rest, dampening 0.01 * mean(diag H).
SDClip (the parameter-golf records, 2026-04): one scale per output row, s_r = fp16(k * std(W_r) / R), k the
clip multiple in row standard deviations; the entropy of the integers is about b - log2(k) + const, so k is
the artifact-size knob.

Numerics: every GPTQ step runs in float64 (W, H, the Cholesky factor, the error propagation), so the integers
depend only on the numpy weights and the Hessian, never on the framework that trained. Scales are rounded to
fp16 before they are used for rounding, so the decoder's q * s is exactly what the encoder aimed at. Rounding
is numpy's rint (half to even), as torch.round. The column solve is this module's reference (GPTQ_SOLVER=numpy);
quantize takes another solver for the same jobs (torch_gptq.py: the same steps on the trainer's GPU).

Per tensor (first matching rule; RECORD_STACK.md §6.2 table; knobs in shared/config.py):
    tok_emb.weight            EMBED_BITS,  EMBED_CLIP_SIGMAS
    names with '.mlp.'        MATRIX_BITS, MLP_CLIP_SIGMAS
    names with '.attn.'       MATRIX_BITS, ATTN_CLIP_SIGMAS
    any other 'weight' row    MATRIX_BITS, MATRIX_CLIP_SIGMAS
    with > 65,536 elements
    (QUANT_PASSTHROUGH_NUMEL)
    'gate' rows               int8 per row, s_r = fp16(max|W_r| / 127)  (§6.3)
    everything else           fp16
A matrix without a Hessian (no calibration) is quantized with H = I: GPTQ then reduces to round-to-nearest
with the SDClip scales; its index entry says hessian 'identity' so the export can report it.
"""
from __future__ import annotations

import time

import numpy as np

from shared.quant.tensors import dequantize, lqer_correction, per_row  # noqa: F401  (dequantize: the one loop)

NAME = "gptq_sdclip_v1"
KEEP_FLOAT_MAX_NUMEL = 65_536  # the record's passthrough threshold (§6.3)
BLOCK = 128  # GPTQ's lazy-update block (columns)
TRI_LEAF = 64  # lower_triangular_inverse: blocks this small are solved directly
ROW_CHUNK = 512  # rows per pass through a block: keeps the block's working set (128 x 512 float64) in L2 cache
DAMP = 0.01  # H += DAMP * mean(diag H) * I
GATE_LEVELS = 127  # 'gate' tensors: symmetric int8 per row


def is_gptq(store: str, shape: tuple[int, ...], passthrough: int = KEEP_FLOAT_MAX_NUMEL) -> bool:
    """Which parameter-table rows GPTQ quantizes: 'weight' matrices with more than `passthrough` elements
    (QUANT_PASSTHROUGH_NUMEL; the record's 65,536)."""
    return store == "weight" and len(shape) == 2 and int(np.prod(shape)) > passthrough


def targets(cfg) -> list[str]:
    """The weights that want a Hessian (in table order). A tied tok_emb.weight's H is that of the head's input,
    the final norm's output (§6.1); an untied embedding has none (its input is a lookup) and falls back to H = I."""
    from shared.spec import param_table  # here: shared.spec imports nothing of quant, but keep imports light

    return [p.name for p in param_table(cfg) if is_gptq(p.store, p.shape, cfg.quant_passthrough_numel)
            and not (p.name == "tok_emb.weight" and not cfg.tie_embeddings)]


def levels(bits: int) -> int:
    """R = 2^(b-1) - 1: symmetric integers in [-R, R] (int6 -> 31, int7 -> 63)."""
    return 2 ** (bits - 1) - 1


def sdclip_scales(w: np.ndarray, k: float, bits: int) -> np.ndarray:
    """fp16 per-row scales k * std(W_r, ddof=1) / R (std in float64). A row whose scale rounds to 0 (constant or
    zero row, fp16 underflow) gets fp16(max|W_r| / R), or 1.0 for an all-zero row, so q stays finite."""
    std = np.std(w.astype(np.float64), axis=1, ddof=1)
    s = (k * std / levels(bits)).astype(np.float16)
    bad = s == 0
    if bad.any():
        fallback = (np.abs(w[bad]).astype(np.float64).max(axis=1) / levels(bits)).astype(np.float16)
        s[bad] = np.where(fallback == 0, np.float16(1.0), fallback)
    return s


def rule(name: str, cfg) -> tuple[int, float]:
    """(bits, clip sigmas) of a GPTQ tensor (RECORD_STACK.md §6.2, first matching rule)."""
    if name == "tok_emb.weight":
        return cfg.embed_bits, cfg.embed_clip_sigmas
    if ".mlp." in name:
        return cfg.matrix_bits, cfg.mlp_clip_sigmas
    if ".attn." in name:
        return cfg.matrix_bits, cfg.attn_clip_sigmas
    return cfg.matrix_bits, cfg.matrix_clip_sigmas


def prepare_hessian(h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dead columns (diag H == 0: an input never seen) get H[d, d] = 1 and W[:, d] = 0; then damping.
    Returns (H damped, W with dead columns zeroed, the dead mask); float64 copies."""
    h = np.array(h, dtype=np.float64)
    w = np.array(w, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMP * np.mean(np.diag(h)) * np.eye(h.shape[0])
    return h, w, dead


def act_order(h: np.ndarray) -> np.ndarray:
    """Column order by decreasing diag H; stable, so ties keep the lower index first."""
    return np.argsort(-np.diag(h), kind="stable")


def upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper-triangular with H^-1 = U^T U: GPTQ's reference computes it in three steps (cholesky,
    cholesky_inverse, cholesky upper); one Cholesky factor gives it. With J the order reversal and
    J H J = M M^T (M lower-triangular), H^-1 = (J M^-1 J)^T (J M^-1 J), and J M^-1 J is upper-triangular with a
    positive diagonal: the same U (to ~1e-15 relative) for about a quarter of the flops."""
    m = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(lower_triangular_inverse(m)[::-1, ::-1])


def lower_triangular_inverse(m: np.ndarray) -> np.ndarray:
    """M^-1 of a lower-triangular M by halves, [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], as
    LAPACK's blocked trtri (numpy has no triangular solve); blocks up to TRI_LEAF by a dense solve."""
    n = m.shape[0]
    if n <= TRI_LEAF:
        return np.tril(np.linalg.solve(m, np.eye(n)))  # the solve's pivoting leaves ~1e-17 above the diagonal
    k = n // 2
    out = np.zeros_like(m)
    out[:k, :k], out[k:, k:] = lower_triangular_inverse(m[:k, :k]), lower_triangular_inverse(m[k:, k:])
    out[k:, :k] = -(out[k:, k:] @ (m[k:, :k] @ out[:k, :k]))
    return out


def gptq_quantize(w: np.ndarray, h: np.ndarray | None, scales: np.ndarray, bits: int,
                  block: int = BLOCK) -> np.ndarray:
    """int8 integers Q (rows, cols) in [-R, R] minimizing (W - Q*s) H (W - Q*s)^T greedily, column by column.
    h None: round-to-nearest (the identity Hessian, exactly)."""
    r = levels(bits)
    s = scales.astype(np.float64)[:, None]  # (rows, 1): the fp16 values the decoder multiplies by
    if h is None:
        return np.clip(np.rint(w.astype(np.float64) / s), -r, r).astype(np.int8)
    h, w, _ = prepare_hessian(h, w)
    perm = act_order(h)
    wt = np.ascontiguousarray(w[:, perm].T)  # (cols, rows): column j is one contiguous row of wt
    u = upper_cholesky_of_inverse(h.take(perm, axis=0).take(perm, axis=1))
    qt = np.zeros(wt.shape, dtype=np.int8)
    for i1 in range(0, wt.shape[0], block):
        i2 = min(i1 + block, wt.shape[0])
        err = np.empty((i2 - i1, wt.shape[1]))  # (block, rows)
        for r1 in range(0, wt.shape[1], ROW_CHUNK):
            rows = slice(r1, min(r1 + ROW_CHUNK, wt.shape[1]))
            qt[i1:i2, rows] = _quantize_block(wt[i1:i2, rows], err[:, rows], u[i1:i2, i1:i2], s[rows, 0], r)
        wt[i2:] -= (np.ascontiguousarray(err.T) @ u[i1:i2, i2:]).T  # the lazy update of every later block
    return np.ascontiguousarray(qt.T[:, np.argsort(perm)])


def _quantize_block(wb: np.ndarray, err: np.ndarray, u: np.ndarray, s: np.ndarray, r: int) -> np.ndarray:
    """One block of columns, column by column, in place: wb (block, rows) the block's columns as rows, err
    (block, rows) receives the scaled errors, u (block, block) the block's part of U, s (rows,) the scales.
    Each step is the textbook loop's operation on the same operands (w / s, rint, clip, w - q*s, / U[j,j],
    w - U[j,k]*err; into preallocated buffers, the later columns stored as contiguous rows), elementwise with
    no reductions: the integers are the plain column loop's bit for bit, however the rows are chunked."""
    q = np.empty(wb.shape)
    tmp = np.empty(wb.shape)
    for j in range(wb.shape[0]):
        np.clip(np.rint(np.divide(wb[j], s, out=q[j]), out=q[j]), -r, r, out=q[j])
        np.subtract(wb[j], np.multiply(q[j], s, out=err[j]), out=err[j])
        np.divide(err[j], u[j, j], out=err[j])
        rest = tmp[j + 1:]
        np.subtract(wb[j + 1:], np.multiply(u[j, j + 1:, None], err[j], out=rest), out=wb[j + 1:])
    return q.astype(np.int8)


def weighted_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) in float64: GPTQ's objective (the layer's output error on calibration)."""
    e = w.astype(np.float64) - w_hat.astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, h.astype(np.float64), e))


def gate_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """§6.3's gate storage: s_r = fp16(max|W_r| / 127) (1.0 for a zero row), q = clamp(rint(W / s), +-127)."""
    s = (np.abs(w).astype(np.float64).max(axis=1) / GATE_LEVELS).astype(np.float16)
    s = np.where(s == 0, np.float16(1.0), s)
    q = np.clip(np.rint(w.astype(np.float64) / s.astype(np.float64)[:, None]), -GATE_LEVELS, GATE_LEVELS)
    return q.astype(np.int8), s


def numpy_solver(jobs: list[tuple[np.ndarray, np.ndarray | None, np.ndarray, int]]) -> list[np.ndarray]:
    """The reference solver (GPTQ_SOLVER=numpy): gptq_quantize on each (W, H or None, fp16 scales, bits) job.
    Another solver (torch_gptq.py on the CUDA trainer's device) takes the same list and returns the same int8
    matrices, so only the integers' provenance differs, never the artifact's format."""
    return [gptq_quantize(w, h, s, bits) for w, h, s, bits in jobs]


def quantize(state: dict[str, np.ndarray], stores: dict[str, str], cfg=None,
             hessians: dict[str, np.ndarray] | None = None, timings: dict[str, float] | None = None,
             solver=numpy_solver) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The scheme entry point (shared/quant/__init__.py). cfg supplies the bits and clip knobs; hessians maps
    a weight name to its (cols, cols) H (any float dtype, used in float64); absent -> identity. timings, if
    given, receives the seconds spent in 'gptq'. solver: the GPTQ column solve for every matrix at once
    (numpy_solver's signature); the scales are always SDClip's, computed here."""
    t0 = time.perf_counter()
    if cfg is None:
        raise ValueError(f"quant scheme {NAME} needs the config (MATRIX_BITS, EMBED_BITS, *_CLIP_SIGMAS)")
    hessians = hessians or {}
    tensors, index, jobs = {}, {}, {}
    for name in sorted(state):
        t = np.ascontiguousarray(state[name], dtype=np.float32)
        entry = {"shape": list(t.shape)}
        if is_gptq(stores[name], t.shape, cfg.quant_passthrough_numel):
            bits, k = rule(name, cfg)
            h = hessians.get(name)
            if h is not None and h.shape != (t.shape[1], t.shape[1]):
                raise ValueError(f"Hessian of {name} has shape {h.shape}, expected {(t.shape[1], t.shape[1])}")
            jobs[name] = (t, h, sdclip_scales(t, k, bits), bits)
            tensors[f"q:{name}"], tensors[f"scale:{name}"] = None, jobs[name][2]  # q filled in below, same order
            entry.update(kind="int_per_row", bits=bits, clip_sigmas=k,
                         hessian="calibrated" if h is not None else "identity")
        elif stores[name] == "gate" and t.ndim == 2:
            tensors[f"q:{name}"], tensors[f"scale:{name}"] = gate_int8(t)
            entry.update(kind="int_per_row", bits=8)
        else:
            tensors[f"float:{name}"] = t.astype(np.float16)
            entry["kind"] = "float"
        index[name] = entry
    for name, q in zip(jobs, solver(list(jobs.values()))):
        if q.dtype != np.int8 or q.shape != jobs[name][0].shape:
            raise ValueError(f"the GPTQ solver gave {name} {q.dtype} {q.shape}, expected int8 {jobs[name][0].shape}")
        tensors[f"q:{name}"] = q
    if timings is not None:
        timings["gptq"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cfg.lqer_enabled:
        add_lqer(state, tensors, index, cfg.lqer_rank, cfg.lqer_top_k, cfg.lqer_asym_group)
    if timings is not None:
        timings["lqer"] = time.perf_counter() - t0
    return tensors, index


# ---- LQER (RECORD_STACK.md §6.4): a low-rank correction of the worst-quantized matrices ----
# Zhang et al. 2024, "LQER: Low-Rank Quantization Error Reconstruction for LLMs" (arXiv 2402.02446): W ~ W_hat + A B
# with A B the rank-r truncated SVD of E = W - W_hat. The record's asymmetric factor formats: A (rows x r) in 2 bits
# with one fp16 scale, B (r x cols) in 4 bits with an fp16 scale per group of consecutive row-major elements.
LQER_A_LO, LQER_A_HI, LQER_A_DIV = -2, 1, 1.5  # q_A = clamp(rint(A / s_A), -2, 1), s_A = fp16(max|A| / 1.5)
LQER_B_LO, LQER_B_HI, LQER_B_DIV = -8, 7, 7.5  # q_B = clamp(rint(B / s_g), -8, 7), s_g = fp16(max|group| / 7.5)


def _fp16_scale(x: np.ndarray, div: float) -> np.ndarray:
    """fp16(max|x| / div) along the last axis; 1.0 where that is 0 (an all-zero factor or group)."""
    s = (np.abs(x).max(axis=-1) / div).astype(np.float16)
    return np.where(s == 0, np.float16(1.0), s)


def lqer_factors(err: np.ndarray, rank: int, group: int) -> dict[str, np.ndarray]:
    """Quantized rank-`rank` factors of err (float64 SVD; numpy's LAPACK gesdd): q_a int8 (rows, r), s_a fp16 (1,),
    q_b int8 (r, cols), s_b fp16 (r * cols / group,)."""
    u, sv, vt = np.linalg.svd(err.astype(np.float64), full_matrices=False)
    rank = min(rank, len(sv))
    a, b = u[:, :rank] * sv[:rank], vt[:rank]
    s_a = _fp16_scale(a.reshape(1, -1), LQER_A_DIV)
    q_a = np.clip(np.rint(a / s_a.astype(np.float64)), LQER_A_LO, LQER_A_HI)
    groups = b.reshape(-1, group)
    s_b = _fp16_scale(groups, LQER_B_DIV)
    q_b = np.clip(np.rint(groups / s_b.astype(np.float64)[:, None]), LQER_B_LO, LQER_B_HI).reshape(b.shape)
    return {"q_a": q_a.astype(np.int8), "s_a": s_a, "q_b": q_b.astype(np.int8), "s_b": s_b}


def add_lqer(state: dict[str, np.ndarray], tensors: dict[str, np.ndarray], index: dict[str, dict], rank: int,
             top_k: int, group: int) -> list[str]:
    """Rank every GPTQ tensor by ||W - W_hat||_F (absolute, float64) and give the top_k a correction; returns them."""
    errors = {}
    for name, entry in index.items():
        if entry.get("hessian") is not None:  # the GPTQ matrices
            w_hat = per_row(tensors, name)
            errors[name] = state[name].astype(np.float32) - w_hat
    chosen = sorted(errors, key=lambda n: (-float(np.linalg.norm(errors[n].astype(np.float64))), n))[:top_k]
    for name in chosen:
        if (rank * errors[name].shape[1]) % group:
            raise ValueError(f"LQER_ASYM_GROUP={group} does not divide the {rank} x {errors[name].shape[1]} "
                             f"B factor of {name}")
        for key, value in lqer_factors(errors[name], rank, group).items():
            tensors[f"lqer_{key}:{name}"] = value
        index[name]["lqer"] = {"rank": int(tensors[f"lqer_q_a:{name}"].shape[1]), "group": group}
    return chosen
