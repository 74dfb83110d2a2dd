"""Quantizers, registered by scheme name; the artifact stores the name and looks the decoder up here.

A scheme turns a float32 state (and the parameter table's store kinds) into named
arrays plus a JSON-able index, and back:

    tensors, index = SCHEMES[name].quantize(state, stores, cfg, hessians, timings)  # stores: spec.STORE_KINDS by name
    state = SCHEMES[name].dequantize(tensors, index)
"""
from __future__ import annotations

from shared.quant import gptq, int8

SCHEMES = {int8.NAME: int8, gptq.NAME: gptq}
DEFAULT_SCHEME = int8.NAME
BY_KNOB = {"int8": int8.NAME, "gptq": gptq.NAME}  # QUANT=... -> scheme name stored in the artifact


def scheme(name: str):
    if name not in SCHEMES:
        raise ValueError(f"quant scheme {name!r} is unknown; this code has {sorted(SCHEMES)}")
    return SCHEMES[name]
