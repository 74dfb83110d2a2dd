"""shared/loop.py with each real backend: priming and checkpoint state put every bit back."""
import copy

import numpy as np
import pytest

from conftest import tiny_env
from shared import loop
from shared.config import Hyperparameters
from shared.data import TokenLoader, train_pattern
from shared.runlog import RunLog
from shared.spec import init_params

BACKENDS = ["torch", "mlx"]


def _backend(name: str, cfg: Hyperparameters):
    if name == "mlx":
        mlx_train = pytest.importorskip("mlx_train")
        return mlx_train.MLXBackend(cfg)
    import cuda_train
    return cuda_train.TorchBackend(cfg)


def _started(name: str, tiny_data, tmp_path, steps: int = 2):
    """A backend and state after `steps` real steps: every optimizer slot is non-zero."""
    cfg = Hyperparameters.from_env(tiny_env(tiny_data, tmp_path, WARMUP_STEPS=3))
    be = _backend(name, cfg)
    be.build(cfg, init_params(cfg), train=True)
    st = loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))
    for _ in range(steps):
        loop.one_step(be, st, cfg, 1.0)
    return cfg, be, st


def _assert_same(before: dict, after: dict, what: str) -> None:
    assert before.keys() == after.keys(), what
    for k in before:
        a, b = before[k], after[k]
        if isinstance(a, dict):
            _assert_same(a, b, f"{what} {k}")
        else:
            assert np.array_equal(a, b), f"{what} {k}: max diff {np.max(np.abs(a - b)) if a.size else 0}"


@pytest.mark.parametrize("name", BACKENDS)
def test_prime_puts_every_bit_of_state_back(tiny_data, tmp_path, name):
    cfg, be, st = _started(name, tiny_data, tmp_path)
    # deep copies: a backend that hands out views of its live state must fail here, not pass trivially
    weights, slots, position = copy.deepcopy((be.weights(), be.optimizer_slots(), st.loader.stream.state()))
    loop.prime(be, st, cfg, RunLog("t", enabled=False))
    _assert_same(weights, be.weights(), "weight")
    _assert_same(slots, be.optimizer_slots(), "slot")
    assert st.loader.stream.state() == position and st.step == 2


@pytest.mark.parametrize("name", BACKENDS)
def test_a_checkpoint_restores_the_next_step_exactly(tiny_data, tmp_path, name):
    cfg, be, st = _started(name, tiny_data, tmp_path)
    fingerprint = {"train_shards": st.loader.stream.fingerprint()}
    loop.save(be, st, cfg, str(tmp_path / "c.ckpt"), fingerprint, RunLog("t", enabled=False))
    expected = loop.one_step(be, st, cfg, 0.5)
    cfg2, be2, st2 = _started(name, tiny_data, tmp_path / "other", steps=0)
    loop.restore(be2, st2, cfg2, str(tmp_path / "c.ckpt"), fingerprint)
    assert st2.step == 2 and loop.one_step(be2, st2, cfg2, 0.5) == expected


@pytest.mark.parametrize("name", BACKENDS)
def test_evaluation_sees_the_current_weights(tiny_data, tmp_path, name):
    """Validation during training scores today's weights (a compiled scorer must not freeze the first ones)."""
    from shared import bpb
    cfg, be, st = _started(name, tiny_data, tmp_path, steps=0)
    data = bpb.load_eval_data(cfg)
    data.windows = data.windows[:8]
    at_init = be.evaluate(data).val_loss
    for _ in range(3):
        loop.one_step(be, st, cfg, 1.0)
    trained = be.evaluate(data).val_loss
    fresh = _backend(name, cfg)
    fresh.build(cfg, be.weights(), train=False)
    assert trained != at_init and abs(trained - fresh.evaluate(data).val_loss) <= 1e-6, (at_init, trained)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_run_resumed_at_the_wallclock_cap_takes_no_further_step(tiny_data, tmp_path, name):
    from shared import bpb
    cfg, be, st = _started(name, tiny_data, tmp_path, steps=2)
    cfg = Hyperparameters.from_env(dict(tiny_env(tiny_data, tmp_path), MAX_WALLCLOCK_SECONDS="1", ITERATIONS="50"))
    data = bpb.load_eval_data(cfg)
    data.windows = data.windows[:4]
    st.train_ms = 1000.0  # the checkpoint was taken as the cap was reached
    weights = copy.deepcopy(be.weights())
    loop.run_training(be, st, cfg, RunLog("t", enabled=False), data, {})
    assert st.step == 2
    _assert_same(weights, be.weights(), "weight")
