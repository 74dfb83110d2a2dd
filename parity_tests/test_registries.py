"""Every enumerated knob is a name -> implementation table in each place that implements it, and the tables'
keys are the config's choices: a value added to the config and to one framework only fails here, as does an
optimizer knob that only one twin reads (the generated variants of parity_tests/variants.py)."""
from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("mlx_model")
pytest.importorskip("torch")

import cuda_train  # noqa: E402
import mlx_model  # noqa: E402
import mlx_train  # noqa: E402
import torch_model  # noqa: E402
import torch_optim  # noqa: E402
from parity_tests import compare as C  # noqa: E402
from parity_tests.test_parity import cfg_for, check_optimizer_steps  # noqa: E402
from parity_tests.variants import model_choice_variants, optimizer_variants, with_knobs  # noqa: E402
from shared import artifact, quant, spec  # noqa: E402
from shared.config import Hyperparameters, _f, choice_fields  # noqa: E402

TWINS = ("torch_model", "mlx_model")  # a model knob's value must exist in both


def registries() -> dict[str, dict[str, dict]]:
    """knob -> {where: table}. The dtype tables resolve "auto" at run time, so it is a key with no entry."""
    return {"mlp_act": {"torch_model": torch_model.MLP_ACTIVATIONS, "mlx_model": mlx_model.MLP_ACTIVATIONS},
            "muon_ns": {"shared/spec.py": spec.NS_KINDS},
            "compute_dtype": {"cuda_train": {**cuda_train.DTYPES, "auto": None},
                              "mlx_train": {**mlx_train.DTYPES, "auto": None}},
            "compressor": {"shared/artifact.py": artifact.CONTAINER},
            "quant": {"shared/quant": quant.BY_KNOB}}


def mismatches(choices: dict[str, tuple], tables: dict[str, dict[str, dict]]) -> list[str]:
    """One line per table whose keys are not its knob's choices, and per model knob a twin has no table for."""
    out = [f"{knob.upper()}: {where} has {sorted(table)}, the config allows {sorted(choices[knob])}"
           for knob, places in tables.items() for where, table in places.items() if set(table) != set(choices[knob])]
    return out + [f"{knob.upper()}: no table in {twin}" for knob in choice_fields("model")
                  for twin in TWINS if twin not in tables.get(knob, {})]


def test_every_registry_holds_exactly_its_knobs_values():
    assert not mismatches(choice_fields(), registries())


def build_mlp(module, act: str):
    return module.MLP(8, 16, act, 0.5, mlx_model.mx.float32 if module is mlx_model else torch_model.torch.float32)


@pytest.mark.parametrize("module", [torch_model, mlx_model], ids=TWINS)
def test_an_unknown_value_fails_at_build_naming_the_knob(module):
    with pytest.raises(ValueError, match=rf"MLP_ACT='silu2' has no implementation in {module.__name__}"):
        build_mlp(module, "silu2")


def test_an_activation_added_to_one_framework_is_caught(monkeypatch):
    """The experiment: silu2 added to the config's MLP_ACTS and to torch_model only."""
    choices = dict(choice_fields(), mlp_act=choice_fields()["mlp_act"] + ("silu2",))
    monkeypatch.setitem(torch_model.MLP_ACTIVATIONS, "silu2", lambda h, slope: torch_model.F.silu(h).square())
    assert mismatches(choices, registries()) == [
        "MLP_ACT: mlx_model has ['leaky_relu2', 'relu2'], the config allows ['leaky_relu2', 'relu2', 'silu2']"]
    with pytest.raises(ValueError, match="MLP_ACT='silu2'"):  # and the generated variant mlp_act=silu2 fails
        build_mlp(mlx_model, "silu2")


@dataclasses.dataclass(frozen=True)
class WithNesterovKnob(Hyperparameters):
    muon_nesterov: bool = _f(True, "train", reads="optimizer")


def test_an_optimizer_knob_read_by_one_twin_is_caught(monkeypatch):
    """The experiment: MUON_NESTEROV added to the config and honoured by torch_optim only."""
    def plain_momentum(grad, buf, momentum, steps, dtype, ns, row_norm):
        buf.mul_(momentum).add_(grad)
        return torch_optim.zeropower_via_newtonschulz5(buf, steps, dtype, ns) * max(1, buf.size(-2) / buf.size(-1)) ** 0.5

    init = torch_optim.Optimizers.__init__

    def torch_only_toggle(self, model, cfg, ns_dtype):
        init(self, model, cfg, ns_dtype)
        for opt in self.opts.values():
            if isinstance(opt, torch_optim.Muon) and not cfg.muon_nesterov:
                opt.direction = plain_momentum
    monkeypatch.setattr(torch_optim.Optimizers, "__init__", torch_only_toggle)
    generated = optimizer_variants(WithNesterovKnob)
    assert generated["muon_nesterov=False"] == {"muon_nesterov": False}
    cfg = with_knobs(cfg_for("untied"), generated["muon_nesterov=False"], WithNesterovKnob)
    with pytest.raises(AssertionError, match="weight|slot"):
        check_optimizer_steps(cfg, C.random_state(cfg, seed=4))


def test_model_choice_variants_cover_every_value():
    assert set(model_choice_variants()) == {f"{k}={v}" for k, vs in choice_fields("model").items() for v in vs}
