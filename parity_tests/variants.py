"""Parity variants generated from shared/config.py's field metadata, not kept by hand.

    model_choice_variants()       # every value of every enumerated model knob: {"mlp_act=relu2": {...}, ...}
    optimizer_variants()          # every knob an optimizer reads, moved off its default (each value of a choice)

A knob added to the config with its metadata gets parity cases here without anyone listing it; one that only
one framework implements then fails them (parity_tests/test_registries.py shows both halves).
"""
from __future__ import annotations

import dataclasses

from shared.config import Hyperparameters, choice_fields, fields_read_by


def model_choice_variants(cls: type = Hyperparameters) -> dict[str, dict]:
    return {f"{name}={value}": {name: value} for name, allowed in choice_fields("model", cls=cls).items()
            for value in allowed}


def moved(value):
    """A valid value away from a default: a flag flipped, an int + 1, a float halved (0 becomes 0.1)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value * 0.5 if value else 0.1


def optimizer_variants(cls: type = Hyperparameters) -> dict[str, dict]:
    defaults, choices = cls(), choice_fields(cls=cls)
    out = {}
    for name in fields_read_by("optimizer", cls=cls):
        default = getattr(defaults, name)
        values = [v for v in choices[name] if v != default] if name in choices else [moved(default)]
        out.update({f"{name}={v}": {name: v} for v in values})
    return out


def with_knobs(cfg: Hyperparameters, knobs: dict, cls: type = None) -> Hyperparameters:
    """cfg with `knobs` set, as an instance of `cls` (a config class with extra fields), validated."""
    out = (cls or type(cfg))(**{**dataclasses.asdict(cfg), **knobs})
    out.validate()
    return out
