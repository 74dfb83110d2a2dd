"""The adapters' A (shared/ttt.py): a counter-based hash, so numpy, torch (int64, as on a GPU) and MLX (uint32) give
the same bits, and the values look like U(+-1/sqrt(in)) draws."""
import dataclasses
import math

import numpy as np
import pytest

from shared import ttt
from shared.config import preset

M = 2 ** 32


def mix32_scalar(x: int) -> int:
    """lowbias32 written with Python integers, an oracle independent of the array code."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % M
    x ^= x >> 15
    x = (x * 0x735A2D97) % M
    return x ^ (x >> 15)


def cfg():
    return dataclasses.replace(preset("tiny_record"), ttt_lora_rank=8)


def test_array_hash_matches_the_scalar_oracle_in_both_integer_modes():
    xs = [0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, M - 2, M - 1]
    want = [mix32_scalar(x) for x in xs]
    assert ttt.mix32(np.array(xs, np.uint32), True).tolist() == want
    assert ttt.mix32(np.array(xs, np.int64), False).tolist() == want
    # porting mistake: int64 arithmetic without the 32-bit mask after each product
    assert ttt.mix32(np.array(xs, np.int64), True).tolist() != want


def test_a_values_are_the_documented_formula():
    init = ttt.lora_a_spec(cfg(), 2, 0, 0)[0]["q"]
    a = ttt.a_numpy(init).ravel()
    e = np.arange(a.size)[:: max(1, a.size // 50)]
    for i in e:
        h = mix32_scalar(mix32_scalar(int(i) ^ init.keys[0]) ^ init.keys[1]) >> 8
        assert a[i] == np.float32(np.float32(h * 2.0 ** -23 - 1.0) * np.float32(init.scale))


def test_a_looks_uniform_and_independent():
    c = dataclasses.replace(cfg(), ttt_lora_rank=32)
    init = ttt.lora_a_spec(c, 16, 3, 1)[0]["q"]
    s = init.scale
    a = ttt.a_numpy(init)
    assert a.shape == (16, 32, c.model_dim) and a.dtype == np.float32
    assert s == np.float32(1 / math.sqrt(c.model_dim))
    x = a.ravel().astype(np.float64) / s  # U[-1, 1)
    n = x.size
    assert x.min() >= -1.0 and x.max() < 1.0
    assert abs(x.mean()) < 5 * math.sqrt(1 / 3 / n)
    assert abs(x.var() - 1 / 3) < 5 * math.sqrt(4 / 45 / n)  # var of U^2 is 4/45
    counts, _ = np.histogram(x, 64, (-1, 1))
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63), chi2  # chi-square(63): mean 63, sd 11.2
    for lag in (1, c.model_dim):  # neighbours in a row, and the same column of the next row
        assert abs(np.corrcoef(x[:-lag], x[lag:])[0, 1]) < 5 / math.sqrt(n)


def test_every_tensor_stream_and_generation_differs():
    c = cfg()
    firsts = []
    for stream, gen in [(0, 0), (1, 0), (0, 1), (0, 1000)]:
        for app in ttt.lora_a_init(c, 2, stream, gen):
            firsts += [t.ravel()[:64].tobytes() for t in app.values()]
    assert len(set(firsts)) == len(firsts)
    keys = [i.keys for app in ttt.lora_a_spec(c, 2, 0, 0) for i in app.values()]
    assert len(set(keys)) == len(keys)
    again = ttt.lora_a_init(c, 2, 1, 0)
    assert all(np.array_equal(x, y) for p, q in zip(ttt.lora_a_init(c, 2, 1, 0), again) for x, y in
               zip(p.values(), q.values()))


def test_too_many_elements_for_32_bit_counters_is_refused():
    with pytest.raises(ValueError, match="TTT_BATCH_SIZE"):
        ttt.lora_a_spec(dataclasses.replace(cfg(), ttt_lora_rank=2 ** 20), 2 ** 12, 0, 0)


def test_torch_device_path_gives_the_reference_bits():
    torch = pytest.importorskip("torch")
    import torch_ttt
    from shared.spec import init_params
    from torch_model import GPT
    c = cfg()
    model = GPT(c)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in init_params(c, 0).items()}, strict=False)
    engine = torch_ttt.TorchTTT(model, c, 1)
    spec = ttt.lora_a_spec(c, 3, 2, 1)
    for app, ref in zip(spec, ttt.lora_a_init(c, 3, 2, 1)):
        for k, init in app.items():
            device = engine.a_tensor(init, on_device=True).numpy()  # the int64 path a GPU runs, here on the CPU
            assert device.dtype == np.float32 and np.array_equal(device, ref[k]), k
    lora = engine.new_lora(spec)
    assert all(np.array_equal(t.detach().numpy(), ref[k]) for app, ref in zip(lora.a, ttt.lora_a_init(c, 3, 2, 1))
               for k, t in app.items())
    # porting mistake: the device path on int32 (torch's arithmetic >> on a negative int32 fills with ones)
    init = spec[0]["q"]
    wrong = ttt.a_values(torch.arange(init.size, dtype=torch.int32), init, lambda h: h.to(torch.float32), True)
    assert not np.array_equal(wrong.reshape(init.shape).numpy(), ttt.a_numpy(init))


def test_mlx_gives_the_reference_bits():
    mx = pytest.importorskip("mlx.core")
    import mlx_ttt
    init = ttt.lora_a_spec(cfg(), 3, 5, 2)[-1]["head"]
    assert np.array_equal(np.array(mlx_ttt.a_array(init)), ttt.a_numpy(init))
    # porting mistake: an int64 index with uint32's wrapping arithmetic (no mask after the products)
    wrong = ttt.a_values(mx.arange(init.size, dtype=mx.int64), init, lambda h: h.astype(mx.float32), True)
    assert not np.array_equal(np.array(wrong).reshape(init.shape), ttt.a_numpy(init))
