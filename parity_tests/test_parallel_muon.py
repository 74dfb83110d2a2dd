"""Batched and parallel Muon (RECORD_STACK.md §5.3): same-shape matrices orthogonalised in one batched call, and
with W ranks each bucket reduce-scattered to its owners, orthogonalised there and all-gathered back.

The batched call must equal N single calls bit for bit (CPU, fp32), in both frameworks; the W-rank optimizer
(real gloo processes, no mocks) must take the step one process takes on the mean gradient, momentum included."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

import mlx_optim  # noqa: E402
import torch_optim  # noqa: E402
from shared.spec import MuonSpec  # noqa: E402

# Three (8, 16) matrices (with 2 ranks: padded to 4, one zero matrix), two (16, 8) tall ones, one square.
SHAPES = [(8, 16), (16, 8), (8, 16), (12, 12), (8, 16), (16, 8)]
STEPS, LR, MOMENTUM, WD = 3, 0.05, 0.9, 0.1


def _grads(rank: int, step: int) -> list[np.ndarray]:
    """Rank- and step-dependent gradients, fixed numpy draws."""
    rng = np.random.default_rng(1000 * step + rank)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _weights() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(s).astype(np.float32) * 0.1 for s in SHAPES]


@pytest.mark.parametrize("ns", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(5, 8, 16), (4, 16, 8), (3, 12, 12)], ids=["wide", "tall", "square"])
def test_batched_orthogonalisation_equals_single_calls(shape, ns):
    g = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tb = torch_optim.zeropower_via_newtonschulz5(torch.from_numpy(g), 5, torch.float32, ns).numpy()
    ts = np.stack([torch_optim.zeropower_via_newtonschulz5(torch.from_numpy(m), 5, torch.float32, ns).numpy()
                   for m in g])
    mb = np.array(mlx_optim.zeropower_via_newtonschulz5(mx.array(g), 5, mx.float32, ns))
    ms = np.stack([np.array(mlx_optim.zeropower_via_newtonschulz5(mx.array(m), 5, mx.float32, ns)) for m in g])
    # one batched GEMM against N single ones: bit-equal on the BLAS builds we pinned, but a BLAS may block a
    # batch differently, so the stated bound is fp32 rounding through 5 iterations (seen: 0), not bit-equality
    np.testing.assert_allclose(tb, ts, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mb, ms, rtol=0, atol=1e-6)
    np.testing.assert_allclose(tb, mb, rtol=0, atol=2e-5)  # the twins: the single-matrix tests' tolerance


def _run_muon(world: int, rank: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """STEPS Muon steps on this rank's gradients; returns (weights, gathered momentum) after the last step."""
    params = [torch.nn.Parameter(torch.from_numpy(w)) for w in _weights()]
    opt = torch_optim.Muon(params, MuonSpec(LR, MOMENTUM, 5, "quintic", True, WD), torch.float32)
    for step in range(STEPS):
        if world == 1:  # one process: the mean of the ranks' gradients, formed as the reduce-scatter does
            per_rank = [_grads(r, step) for r in range(2)]
            grads = [(torch.from_numpy(a) + torch.from_numpy(b)).div_(2) for a, b in zip(*per_rank)]
        else:
            grads = [torch.from_numpy(g) for g in _grads(rank, step)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.collect_grads()
        opt.step()
    return [p.detach().numpy().copy() for p in params], [torch_optim._muon_slots(opt, p)["momentum"] for p in params]


def _local_gradient(out, stacked, op=None):
    """Fault: the share of this rank's own gradient, never summed with the other rank's (a forgotten reduce)."""
    per = out.size(0)
    out.copy_(stacked[dist.get_rank() * per:(dist.get_rank() + 1) * per] * dist.get_world_size())


def _swapped_gather(full, part):
    """Fault: the shares gathered in the wrong rank order."""
    _GATHER(full, part)
    full.copy_(torch.cat(full.chunk(dist.get_world_size())[::-1]))


_GATHER = dist.all_gather_into_tensor
FAULTS = {"local_gradient": ("reduce_scatter_tensor", _local_gradient),
          "swapped_gather": ("all_gather_into_tensor", _swapped_gather)}


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    """The clean run, then each injected fault (a porting mistake in the collective pattern), in one process
    group: spawning is the slow part."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for fault in [None, *sorted(FAULTS)]:
            if fault is not None:
                name, fn = FAULTS[fault]
                setattr(torch_optim.dist, name, fn)
            weights, momenta = _run_muon(world, rank)
            np.savez(os.path.join(out_dir, f"{fault}_rank{rank}.npz"), *weights, *momenta)
            for name, _ in FAULTS.values():
                setattr(torch_optim.dist, name, getattr(dist, name))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict[str | None, list[list[np.ndarray]]]:
    """{fault or None: per rank, the weights then the momenta after STEPS steps}."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as d:
        tmp.spawn(_worker, args=(2, f"file://{d}/rendezvous", d), nprocs=2, join=True)
        out = {}
        for fault in [None, *FAULTS]:
            out[fault] = []
            for r in range(2):
                with np.load(os.path.join(d, f"{fault}_rank{r}.npz")) as z:
                    out[fault].append([z[f"arr_{i}"] for i in range(2 * len(SHAPES))])
        return out


def _check_against_one_process(ranks: list[list[np.ndarray]]) -> None:
    weights, momenta = _run_muon(1, 0)
    for r, arrays in enumerate(ranks):
        for i, (got, want) in enumerate(zip(arrays, weights + momenta)):
            what = f"rank {r} {'weight' if i < len(SHAPES) else 'momentum'} {i % len(SHAPES)} {SHAPES[i % len(SHAPES)]}"
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=what)


def test_two_ranks_take_the_one_process_step(two_ranks):
    _check_against_one_process(two_ranks[None])


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_injected_collective_faults_are_caught(two_ranks, fault):
    with pytest.raises(AssertionError):
        _check_against_one_process(two_ranks[fault])


def test_ownership_pads_each_bucket_to_the_world_and_splits_it_contiguously():
    """One process owns everything; the padded shares are what the reduce-scatter and all-gather assume."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = torch_optim.Muon(params, MuonSpec(LR, MOMENTUM, 5, "quintic", False, 0.0), torch.float32)
    assert [len(b) for b in opt.buckets] == [3, 2, 1]
    assert [tuple(b[0].shape) for b in opt.buckets] == [(8, 16), (16, 8), (12, 12)]
    assert all(opt.owns(p) for p in params)
    assert [opt.share(k) for k in range(3)] == [(0, 3), (0, 2), (0, 1)]
