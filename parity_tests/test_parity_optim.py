"""Decoupled weight decay (MUON_WD, EMBED_WD, ADAM_WD; RECORD_STACK.md §5.3, §5.4): a hand-computed step in both
frameworks, and porting mistakes that check_optimizer_steps must catch."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from parity_tests import compare as C  # noqa: E402
from parity_tests.test_parity import WEIGHT_DECAY, cfg_for, check_optimizer_steps  # noqa: E402
from shared.spec import group_lr, optimizer_spec, param_table  # noqa: E402

import mlx_model  # noqa: E402
import mlx_optim  # noqa: E402
import torch_model  # noqa: E402
import torch_optim  # noqa: E402

LR_SCALE = 0.5
WD_OF_GROUP = {"tok": WEIGHT_DECAY["embed_wd"], "head": 0.0, "matrix": WEIGHT_DECAY["muon_wd"],
               "scalar": WEIGHT_DECAY["adam_wd"]}  # the head gets none, as in the record's code (shared/spec.group_wd)


def _one_step(framework: str, cfg, state: dict, grads: dict) -> dict[str, np.ndarray]:
    if framework == "torch":
        opts = torch_optim.Optimizers(model := C.torch_model(cfg, state), cfg, torch.float32)
        for k, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[k].copy())
        opts.step(LR_SCALE, 0.9)
        return torch_model.numpy_state(model)
    opts = mlx_optim.Optimizers(model := C.mlx_model(cfg, state), cfg, mx.float32)
    opts.step({k: mx.array(v) for k, v in grads.items()}, LR_SCALE, 0.9)
    return mlx_model.numpy_state(model)


@pytest.mark.parametrize("framework", ["torch", "mlx"])
@pytest.mark.parametrize("variant", ["tied_gqa", "untied"])
def test_a_zero_gradient_step_only_decays(framework, variant):
    """With every gradient 0, Adam's and Muon's updates are exactly 0 (0/(0+eps); Newton-Schulz of 0 is 0), so each
    weight becomes w*(1 - LR_SCALE*group_lr*group_wd): the scheduled lr, each group its own decay."""
    cfg = dataclasses.replace(cfg_for(variant), **WEIGHT_DECAY)
    state = C.random_state(cfg, seed=4)
    got = _one_step(framework, cfg, state, {k: np.zeros_like(v) for k, v in state.items()})
    for p in param_table(cfg):
        want = state[p.name].astype(np.float64) * (1.0 - LR_SCALE * group_lr(p.group, cfg) * WD_OF_GROUP[p.group])
        C.assert_close(f"{framework} {p.name} ({p.group})", got[p.name], want, 1e-6, 1e-7)


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_the_first_adam_step_decays_then_moves_by_the_lr(framework):
    """Adam's first step moves by lr*g/(|g|+eps) (bias correction cancels), so with decay first the new weight is
    w*(1 - lr*wd) - lr*sign(g) up to eps; decaying after the step would give (w - lr*sign(g))*(1 - lr*wd)."""
    cfg = dataclasses.replace(cfg_for("tied_gqa"), **WEIGHT_DECAY)
    state = C.random_state(cfg, seed=4)
    grads = {k: np.where(np.random.default_rng(1).random(v.shape) < 0.5, -0.1, 0.1).astype(np.float32)
             for k, v in state.items()}
    got = _one_step(framework, cfg, state, grads)
    for p in (q for q in param_table(cfg) if q.group in ("tok", "scalar")):
        lr = LR_SCALE * group_lr(p.group, cfg)
        g = grads[p.name].astype(np.float64)
        want = state[p.name] * (1.0 - lr * WD_OF_GROUP[p.group]) - lr * g / (np.abs(g) + cfg.adam_eps)
        C.assert_close(f"{framework} {p.name} ({p.group})", got[p.name], want, 1e-6, 1e-7)


# Porting mistakes, each injected into the MLX side only.
def _identity_decay(p, lr, wd):
    return p


def _decay_with_base_lr(orig_step):
    """The decay done once per step by the caller with the unscheduled (base) lr."""
    def step(self, grads, lr_scale, momentum):
        params = dict(tree_flatten(self.model.parameters()))
        for opt in self.opts.values():
            for n in opt.names:
                params[n] = params[n] * (1.0 - opt.base_lr * opt.wd)
        self.model.update(tree_unflatten(list(params.items())))
        orig_step(self, grads, lr_scale, momentum)
    return step


def _decay_after_update(orig_update):
    def update(self, params, grads):
        orig_update(self, params, grads)
        for n in self.names:
            params[n] = params[n] * (1.0 - self.lr * self.wd)
    return update


def _wd_swapped_between_embedding_and_scalars(group, cfg):
    return {"tok": cfg.adam_wd, "head": 0.0, "matrix": cfg.muon_wd, "scalar": cfg.embed_wd}[group]


def _no_muon_wd(group, cfg):
    return {"tok": cfg.embed_wd, "head": 0.0, "matrix": 0.0, "scalar": cfg.adam_wd}[group]


@pytest.mark.parametrize("variant", ["tied_gqa", "untied"])
@pytest.mark.parametrize("fault", ["base_lr", "after_update", "swapped_groups", "no_muon_wd"])
def test_injected_weight_decay_faults_are_caught(monkeypatch, fault, variant):
    cfg = dataclasses.replace(cfg_for(variant), grad_clip_norm=0.5, **WEIGHT_DECAY)
    if fault == "base_lr":
        monkeypatch.setattr(mlx_optim, "decay", _identity_decay)
        monkeypatch.setattr(mlx_optim.Optimizers, "step", _decay_with_base_lr(mlx_optim.Optimizers.step))
    elif fault == "after_update":
        monkeypatch.setattr(mlx_optim, "decay", _identity_decay)
        for cls in (mlx_optim.Muon, mlx_optim.Adam):
            monkeypatch.setattr(cls, "update", _decay_after_update(cls.update))
    else:  # a twin that decays the groups its own way instead of as the shared spec says
        wrong = _wd_swapped_between_embedding_and_scalars if fault == "swapped_groups" else _no_muon_wd
        monkeypatch.setattr(mlx_optim, "optimizer_spec",
                            lambda g, c: dataclasses.replace(optimizer_spec(g, c), weight_decay=wrong(g, c)))
    with pytest.raises(AssertionError, match="weight"):
        check_optimizer_steps(cfg, C.random_state(cfg, seed=4))
