"""The CUDA trainer's fused training paths against their eager references (torch_model.py), on the CPU.

TORCH_FUSED_CE (SoftcapCrossEntropy) and TORCH_FUSED_MLP (FusedSquaredMLP) write their backward by hand, so
each is compared with autograd through the reference ops, value and gradients: in fp32 to fp32 rounding and in
bf16 to bf16 tolerance. Each comparison must also catch a plausible mistake in the hand-written backward.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_model
from shared.config import Hyperparameters
from shared.segments import CU_SEQLENS_BUCKET, segment_ids
from shared.spec import init_params

BOS = 1
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on a GPU the same checks run there too
# (rtol, atol) for values and gradients. fp32: summation order only. bf16: one bf16 ulp (2^-8) of each input
# and of the saved pre-activation moves a product by up to ~1%; the hand-written backward rounds in other places
# than autograd's chain of bf16 ops.
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (3e-2, 3e-2)}


def close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    got, want = got.float(), want.float()
    err = float((got - want).abs().max())
    assert torch.allclose(got, want, rtol=rtol, atol=atol * float(want.abs().max().clamp_min(1.0))), \
        f"{what} ({dtype}): max |diff| {err:.3g}, max |want| {float(want.abs().max()):.3g}"


def reference_ce(z: torch.Tensor, y: torch.Tensor, softcap: float) -> torch.Tensor:
    return F.cross_entropy(softcap * torch.tanh(z.float() / softcap), y, reduction="none")


def ce_case(dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Logits up to ~3 softcaps wide (tanh saturates), targets, and a non-uniform upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(64, 300, generator=g) * 40.0).to(dtype)
    y = torch.randint(0, 300, (64,), generator=g)
    return z.to(device), y.to(device), torch.rand(64, generator=g).to(device)


def ce_grads(fn, z, y, up, softcap=30.0):
    z = z.clone().requires_grad_(True)
    out = fn(z, y, softcap)
    (out * up).sum().backward()
    return out.detach(), z.grad


class NoSoftcapSlope(torch_model.SoftcapCrossEntropy):
    """Fault: the backward forgets the softcap's derivative (1 - tanh^2)."""

    @staticmethod
    def backward(ctx, grad):
        z, y, lse = ctx.saved_tensors
        t = torch.tanh(z.float() / ctx.softcap)
        onehot = F.one_hot(y, z.size(-1)).float()
        return (grad[:, None] * (torch.exp(ctx.softcap * t - lse[:, None]) - onehot)).to(z.dtype), None, None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_matches_the_reference(dtype, device):
    z, y, up = ce_case(dtype, device=device)
    want, want_grad = ce_grads(reference_ce, z, y, up)
    got, got_grad = ce_grads(torch_model.SoftcapCrossEntropy.apply, z, y, up)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    close("nll", got, want, dtype)
    close("d nll / d z", got_grad, want_grad, dtype)


def test_fused_ce_comparison_catches_a_missing_softcap_derivative():
    z, y, up = ce_case(torch.float32, seed=1)
    _, want_grad = ce_grads(reference_ce, z, y, up)
    _, bad_grad = ce_grads(NoSoftcapSlope.apply, z, y, up)
    with pytest.raises(AssertionError, match="d nll"):
        close("d nll / d z", bad_grad, want_grad, torch.float32)


def reference_mlp(x, w1, w2, slope):
    pre = F.linear(x, w1)
    act = torch.relu(pre) if slope == 0.0 else F.leaky_relu(pre, negative_slope=slope)
    return F.linear(act.square(), w2)


class SlopeNotSquared(torch_model.FusedSquaredMLP):
    """Fault: the negative side's gradient uses slope, not slope^2 (the chain rule applied once)."""

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, pre = ctx.saved_tensors
        g2, x2, pre2 = (t.reshape(-1, t.size(-1)) for t in (grad, x, pre))
        d_w2 = g2.mT @ torch_model.squared_act(pre2, ctx.slope)
        d_pre = (g2 @ w2) * (2.0 * torch.where(pre2 > 0, pre2, pre2 * ctx.slope))
        return (d_pre @ w1).reshape(x.shape), d_pre.mT @ x2, d_w2, None


def mlp_grads(fn, dtype, slope, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(2, 16, 32, generator=g), torch.randn(96, 32, generator=g) / 6,
              torch.randn(32, 96, generator=g) / 10]
    leaves = [t.to(device, dtype).requires_grad_(True) for t in leaves]
    out = fn(*leaves, slope)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slope", [0.5, 0.0], ids=["leaky_relu2", "relu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_matches_the_reference(dtype, slope, device):
    want = mlp_grads(reference_mlp, dtype, slope, device=device)
    got = mlp_grads(torch_model.FusedSquaredMLP.apply, dtype, slope, device=device)
    for name, a, b in zip(("out", "d x", "d w1", "d w2"), got, want):
        assert a.dtype == dtype, name
        close(name, a, b, dtype)


def test_fused_mlp_comparison_catches_a_slope_applied_once():
    want = mlp_grads(reference_mlp, torch.float32, 0.5)
    got = mlp_grads(SlopeNotSquared.apply, torch.float32, 0.5)
    with pytest.raises(AssertionError, match="d x"):
        close("d x", got[1], want[1], torch.float32)


# ---- the model: the fused paths are the ones training runs, and they train what the reference trains ----
def model_grads(cfg: Hyperparameters, fused: bool, x: np.ndarray, y: np.ndarray):
    from parity_tests.compare import random_state  # imports MLX too: only the CPU model tests need it
    cfg = dataclasses.replace(cfg, torch_fused_ce=fused, torch_fused_mlp=fused)
    state = random_state(cfg, seed=2)  # no zero-initialised projections, which would hide a broken backward
    state["tok_emb.weight"] = state["tok_emb.weight"] * 4.0  # logits near the softcap: tanh' well below 1
    model = torch_model.build_model(cfg, "cpu", state, torch.float32, BOS)
    model.train()
    seg = torch.from_numpy(segment_ids(x, BOS, cfg.train_seq_len))
    loss = model(torch.from_numpy(x), torch.from_numpy(y), seg)
    loss.backward()
    return float(loss.detach()), {k: p.grad for k, p in model.named_parameters()}


def tiny_batch(cfg: Hyperparameters) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.integers(2, cfg.vocab_size, (2, cfg.train_seq_len))
    x[:, ::41] = BOS
    return x, rng.integers(2, cfg.vocab_size, x.shape)


@pytest.fixture(scope="module")
def record_like() -> Hyperparameters:
    return dataclasses.replace(Hyperparameters.from_env({"PRESET": "tiny_record"}), train_seq_len=64)


def test_fused_training_step_equals_the_reference(record_like):
    x, y = tiny_batch(record_like)
    loss_ref, want = model_grads(record_like, False, x, y)
    loss, got = model_grads(record_like, True, x, y)
    assert abs(loss - loss_ref) < 1e-5
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:  # atol on the largest gradient's scale: fp32 summation order, nothing more
        err = float((got[name] - want[name]).abs().max())
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-5 * scale), f"{name}: max |diff| {err:.3g}"


@pytest.mark.parametrize("fault", ["ce", "mlp", "gate_logits", "gated_skip"])
def test_model_runs_the_written_out_backwards(record_like, monkeypatch, fault):
    """A broken hand-written backward must change the model's gradients: training really goes through it."""
    x, y = tiny_batch(record_like)
    _, want = model_grads(record_like, True, x, y)
    monkeypatch.setattr(torch_model, *{"ce": ("SoftcapCrossEntropy", NoSoftcapSlope),
                                       "mlp": ("FusedSquaredMLP", SlopeNotSquared),
                                       "gate_logits": ("GateLogits", GateGradTransposed),
                                       "gated_skip": ("GatedSkip", SkipGateWithoutSlope)}[fault])
    _, got = model_grads(record_like, True, x, y)
    worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-3)) for k in want)
    assert worst > 1e-3, f"a broken fused {fault} left every gradient within {worst:.2g}"


def test_eval_and_hessians_run_the_reference_mlp(record_like, monkeypatch):
    """GPTQ's Hessian hooks sit on mlp.fc / mlp.proj: eval mode must call them (the fused path would not)."""
    monkeypatch.setattr(torch_model, "FusedSquaredMLP", None)  # any use would fail
    model = torch_model.build_model(record_like, "cpu", init_params(record_like), torch.float32, BOS)
    model.eval()
    x, _ = tiny_batch(record_like)
    sums = torch_model.collect_hessians(model, [(torch.from_numpy(x), None)], ["blocks.0.mlp.proj.weight"])
    assert sums["blocks.0.mlp.proj.weight"].shape == (256, 256)


def test_host_varlen_segments_equal_the_device_built_ones(record_like):
    x, _ = tiny_batch(record_like)
    host = torch_model.host_varlen_segments(x, BOS, record_like.train_seq_len, torch.device("cpu"))
    dev = torch_model.varlen_segments(torch.from_numpy(segment_ids(x, BOS, record_like.train_seq_len)))
    assert host.max_seqlen == dev.max_seqlen == x.shape[1]
    assert torch.equal(host.cu_seqlens, dev.cu_seqlens) and len(host.cu_seqlens) % CU_SEQLENS_BUCKET == 0


def test_one_compiled_muon_graph_serves_the_momentum_warm_up():
    """Compiled optimizer math: the momentum is a tensor, so a new value each step compiles nothing new."""
    from torch._dynamo.testing import CompileCounter
    import torch_optim
    counter = CompileCounter()
    direction = torch.compile(torch_optim.muon_direction, dynamic=False, backend=counter)
    g = torch.Generator().manual_seed(0)
    grad, buf, ref_buf = torch.randn(3, 16, 32, generator=g), torch.zeros(3, 16, 32), torch.zeros(3, 16, 32)
    for mu in (0.92, 0.925, 0.93):
        got = direction(grad, buf, torch.full((), mu), 5, torch.float32, "polar_express", True)
        want = torch_optim.muon_direction(grad, ref_buf, torch.full((), mu), 5, torch.float32, "polar_express", True)
        assert torch.equal(got, want) and torch.equal(buf, ref_buf)
    assert counter.frame_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the varlen kernel runs there only")
def test_cuda_host_built_varlen_segments_match_the_masked_attention(record_like, monkeypatch):
    """On a GPU: the trainer's path (boundaries built on the host, flash varlen kernel) scores what SDPA with
    the block-causal mask scores, to bf16 tolerance."""
    rng = np.random.default_rng(5)  # the init plus noise: no zero projection, logits of a few nats
    state = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init_params(record_like).items()}
    model = torch_model.build_model(record_like, "cuda", state, torch.bfloat16, BOS)
    model.eval()
    x, _ = tiny_batch(record_like)
    host = torch_model.host_varlen_segments(x, BOS, record_like.train_seq_len, torch.device("cuda"))
    ids = torch.from_numpy(segment_ids(x, BOS, record_like.train_seq_len)).cuda()
    with torch.no_grad():
        got = model.logits(torch.from_numpy(x).cuda(), host)
        monkeypatch.setattr(torch_model, "doc_attention_kernel", lambda device, dtype: "sdpa_block_mask")
        want = model.logits(torch.from_numpy(x).cuda(), ids)
    close("varlen logits", got, want, torch.bfloat16)


class GateGradTransposed(torch_model.GateLogits):
    """Fault: G's gradient built as (W, H) and reshaped to (H, W), not transposed."""

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        d_x = (grad[..., :, None] * weight).sum(dim=-2)
        h, w = weight.shape
        return d_x, torch_model.token_sum((x[..., :, None] * grad[..., None, :]).reshape(-1, w, h)).reshape(h, w)


def gate_grads(fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, 12, generator=g, requires_grad=True)
    w = torch.randn(8, 12, generator=g, requires_grad=True)
    z = fn(x, w)
    (z * torch.randn(z.shape, generator=g)).sum().backward()
    return z.detach(), x.grad, w.grad


@pytest.mark.parametrize("fault", [False, True], ids=["written_out", "transposed_fault"])
def test_gate_logits_backward_matches_autograd(fault):
    want = gate_grads(lambda x, w: (x[..., None, :] * w).sum(dim=-1))
    got = gate_grads((GateGradTransposed if fault else torch_model.GateLogits).apply)
    assert torch.equal(got[0], want[0])  # the forward is the reference expression itself
    close("d x", got[1], want[1], torch.float32)
    if fault:
        with pytest.raises(AssertionError, match="d G"):
            close("d G", got[2], want[2], torch.float32)
    else:
        close("d G", got[2], want[2], torch.float32)


@pytest.mark.parametrize("n", [98_304, 120, 7])
def test_token_sum_is_a_sum_over_tokens(n):
    t = torch.randn(n, 3, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert torch.allclose(torch_model.token_sum(t), t.sum(dim=0), rtol=1e-12, atol=1e-12)


GATED_SKIP = torch_model.GatedSkip  # the real one, also while a test has patched the module's name


class SkipGateWithoutSlope(GATED_SKIP):
    """Fault: the gate's gradient misses the sigmoid's slope g (1 - g)."""

    @staticmethod
    def backward(ctx, grad):
        x, skip, weight, gate = ctx.saved_tensors
        dx, dskip, dw, _ = GATED_SKIP.backward(ctx, grad)
        d_gate = torch_model.token_sum((grad * (x - weight * skip)).reshape(-1, weight.size(0)))
        return dx, dskip, dw, d_gate


def skip_grads(fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(2, 24, 16, generator=g), torch.randn(2, 24, 16, generator=g),
              1 + 0.3 * torch.randn(16, generator=g), torch.randn(16, generator=g)]
    leaves = [t.requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def reference_skip(x, skip, w, gate):
    return torch_model.gated_skip(x, w[None, None, :] * skip, gate[None, None, :])


@pytest.mark.parametrize("fault", [False, True], ids=["written_out", "no_sigmoid_slope_fault"])
def test_gated_skip_backward_matches_autograd(fault):
    want = skip_grads(reference_skip)
    got = skip_grads((SkipGateWithoutSlope if fault else torch_model.GatedSkip).apply)
    assert torch.equal(got[0], want[0])  # the forward is the reference expression itself
    for name, a, b in zip(("out", "d x", "d skip", "d w"), got[:4], want[:4]):
        close(name, a, b, torch.float32)
    if fault:
        with pytest.raises(AssertionError, match="d gate"):
            close("d gate", got[4], want[4], torch.float32)
    else:
        close("d gate", got[4], want[4], torch.float32)
