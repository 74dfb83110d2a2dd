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


def _looped_env(tiny_data, tmp_path, **overrides) -> dict:
    """3 layers with layer 1 looped once ([0, 1] | [1, 2] once on), lanes on layer 2; switch at step 4 of 8."""
    looped = {"NUM_LAYERS": 3, "NUM_LOOPS": 1, "LOOP_START": 1, "LOOP_END": 1, "PARALLEL_START_LAYER": 2,
              "ENABLE_LOOPING_AT": 0.5, "ITERATIONS": 8, "WARMUP_STEPS": 0}
    return tiny_env(tiny_data, tmp_path, **{**looped, **overrides})


def _trained(name: str, cfg: Hyperparameters, resume: str | None = None) -> dict:
    """Final weights of run_training from the start or from a checkpoint (the last step validates: 4 windows)."""
    from shared import bpb
    data = bpb.load_eval_data(cfg)
    data.windows = data.windows[:4]
    be = _backend(name, cfg)
    be.build(cfg, init_params(cfg), train=True)
    st = loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))
    fingerprint = {"train_shards": st.loader.stream.fingerprint()}
    if resume:
        loop.restore(be, st, cfg, resume, fingerprint)
    loop.run_training(be, st, cfg, RunLog("t", enabled=False), data, fingerprint)
    assert st.step == cfg.iterations
    return be.weights()


# MLX's (12 s) under --all only: CI keeps torch's, and MLX's switch in parity_tests/test_parity_loops.py
@pytest.mark.parametrize("name", ["torch", pytest.param("mlx", marks=pytest.mark.slow)])
def test_a_resume_across_the_looping_switch_equals_an_uninterrupted_run(tiny_data, tmp_path, name):
    """The looping state comes from (step, train_ms) alone: resumed before (step 3) or after (step 6) the switch
    at step 4, a run ends on the same bits as the run that never stopped."""
    ck = str(tmp_path / "c_{step}.ckpt")
    cfg = Hyperparameters.from_env(_looped_env(tiny_data, tmp_path, CHECKPOINT_EVERY=3, CHECKPOINT_PATH=ck))
    full = _trained(name, cfg)
    never = _trained(name, Hyperparameters.from_env(_looped_env(tiny_data, tmp_path, ENABLE_LOOPING_AT=1.0)))
    assert not all(np.array_equal(full[k], never[k]) for k in full)  # the switch matters to the result
    quiet = Hyperparameters.from_env(_looped_env(tiny_data, tmp_path / "r", CHECKPOINT_EVERY=0))
    for step in (3, 6):
        _assert_same(full, _trained(name, quiet, resume=ck.format(step=step)), f"resumed at {step}: weight")


class _Clock:
    """A Backend stand-in for step_schedules: another rank's clock is 1,000 ms ahead."""
    def __init__(self):
        self.calls = 0

    def max_over_ranks(self, value: float) -> float:
        self.calls += 1
        return value + 1000.0


def test_step_schedules_use_the_time_all_ranks_agree_on():
    capped = Hyperparameters(num_loops=1, enable_looping_at=0.5, max_wallclock_seconds=10.0, warmdown_iters=100)
    be = _Clock()
    # this rank is at 4,500 ms (before the switch at 5,000, full rate); the slowest rank is at 5,500
    lr, looping = loop.step_schedules(be, capped, 50, 4_500.0)
    assert looping and be.calls == 1
    assert lr == pytest.approx(4_500.0 / (100 * 5_500.0 / 50))  # the warmdown from the agreed 5,500 ms
    uncapped = Hyperparameters(num_loops=1, enable_looping_at=0.5, max_wallclock_seconds=0.0, iterations=100,
                               warmdown_iters=10)
    assert loop.step_schedules(be, uncapped, 49, 9e9) == (1.0, False) and be.calls == 1  # steps only: no collective


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("warmup,expected", [(4, [False, False, True, True]), (1, [False, True])])
def test_prime_runs_both_looping_states(tiny_data, tmp_path, name, warmup, expected):
    """Both graphs are built before the timed run (compile never lands in it), even with WARMUP_STEPS=1, and
    prime still undoes itself."""
    cfg = Hyperparameters.from_env(_looped_env(tiny_data, tmp_path, WARMUP_STEPS=warmup))
    be = _backend(name, cfg)
    be.build(cfg, init_params(cfg), train=True)
    st = loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))
    states, set_looping = [], be.set_looping
    be.set_looping = lambda on: (states.append(on), set_looping(on))[1]
    weights = copy.deepcopy(be.weights())
    loop.prime(be, st, cfg, RunLog("t", enabled=False))
    assert states == expected
    if name == "mlx":  # the compiled graphs of both states exist
        assert {key[1] for key in be.graphs if key[0] == "grad"} == {False, True}
    _assert_same(weights, be.weights(), "weight")
