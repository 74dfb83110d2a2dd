"""EMA of the weights (EMA_DECAY, RECORD_STACK.md §5.6): the formula, each backend against the numpy reference,
prime and resume putting the shadow back, the cross-framework agreement, the exported artifact, and the porting
mistakes these checks must catch."""
import numpy as np
import pytest

from conftest import tiny_env
from shared import artifact, bpb, loop
from shared.config import Hyperparameters
from shared.data import TokenLoader, train_pattern
from shared.runlog import RunLog
from shared.schedule import ema_step
from shared.spec import init_params
from tests.test_loop import BACKENDS, _assert_same, _backend

DECAY = 0.9  # large enough a share of each step that a wrong order or a swapped decay moves the shadow visibly
QUIET = RunLog("t", enabled=False)


def _cfg(tiny_data, tmp_path, **overrides) -> Hyperparameters:
    env = dict({"EMA_DECAY": DECAY, "ITERATIONS": 6, "WARMUP_STEPS": 2}, **overrides)
    return Hyperparameters.from_env(tiny_env(tiny_data, tmp_path, **env))


def _fresh(name: str, cfg: Hyperparameters):
    """A built backend with its shadow set from the initial weights (as loop.train does) and a new data state."""
    be = _backend(name, cfg)
    be.build(cfg, init_params(cfg), train=True)
    be.load_ema(be.weights())
    return be, loop.TrainState(0, 0.0, TokenLoader(train_pattern(cfg.data_path), 0, 1, cfg.vocab_size))


def _check_against_reference(be, st, cfg, steps: int = 3) -> None:
    """After each step the backend's shadow is bit-equal to ema_step applied to the live weights after that step."""
    ref = be.weights()
    for _ in range(steps):
        loop.one_step(be, st, cfg, 1.0)
        live = be.weights()
        ref = {k: ema_step(ref[k], live[k], cfg.ema_decay) for k in ref}
        _assert_same(ref, be.ema_weights(), f"step {st.step} ema")
    assert not all(np.array_equal(ref[k], live[k]) for k in ref), "the shadow must lag the live weights"


def test_ema_step_by_hand():
    ema, theta = np.array([1.0, 2.0, -4.0], np.float32), np.array([3.0, -1.0, 4.0], np.float32)
    got = ema_step(ema, theta, 0.75)  # 0.75*1 + 0.25*3, 0.75*2 - 0.25, -3 + 1
    assert got.dtype == np.float32 and got.tolist() == [1.5, 1.25, -2.0]
    assert ema_step(ema, theta, 0.0).tolist() == theta.tolist()
    # fp32 throughout, d and 1-d each rounded once: not float64, not a lerp
    e, t = np.float32(0.1), np.float32(0.7)
    assert ema_step(e, t, 0.9965) == np.float32(0.9965) * e + np.float32(1.0 - 0.9965) * t


def test_ema_decay_validation():
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(ValueError, match="EMA_DECAY"):
            Hyperparameters.from_env({"EMA_DECAY": bad})
    assert Hyperparameters.from_env({}).ema_decay == 0.0
    assert Hyperparameters.from_env({"PRESET": "record"}).ema_decay == 0.9965


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_ema_equals_the_numpy_reference_bit_for_bit(tiny_data, tmp_path, name):
    cfg = _cfg(tiny_data, tmp_path)
    _check_against_reference(*_fresh(name, cfg), cfg)


@pytest.mark.parametrize("fault", ["before_the_step", "decay_swapped"])
def test_injected_ema_update_faults_are_caught(tiny_data, tmp_path, fault):
    cfg = _cfg(tiny_data, tmp_path)
    be, st = _fresh("torch", cfg)
    update, step = be.ema_update, be.train_step
    if fault == "before_the_step":  # the shadow averages the weights before each step: one step behind
        be.ema_update = lambda decay: None
        be.train_step = lambda *a: (update(cfg.ema_decay), step(*a))[1]
    else:
        be.ema_update = lambda decay: update(1.0 - decay)
    with pytest.raises(AssertionError, match="ema"):
        _check_against_reference(be, st, cfg)


def _prime_keeps_the_shadow(be, st, cfg) -> None:
    for _ in range(2):
        loop.one_step(be, st, cfg, 1.0)
    before = be.ema_weights()
    loop.prime(be, st, cfg, QUIET)
    _assert_same(before, be.ema_weights(), "ema after prime")


@pytest.mark.parametrize("name", BACKENDS)
def test_prime_puts_the_ema_back(tiny_data, tmp_path, name):
    cfg = _cfg(tiny_data, tmp_path)
    _prime_keeps_the_shadow(*_fresh(name, cfg), cfg)


def test_injected_prime_that_forgets_the_ema_is_caught(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    be, st = _fresh("torch", cfg)
    be.load_ema = lambda weights: None  # prime's restore of the shadow does nothing
    with pytest.raises(AssertionError, match="ema after prime"):
        _prime_keeps_the_shadow(be, st, cfg)


def _run(name: str, cfg: Hyperparameters, resume: str | None = None, forget_ema: bool = False) -> tuple[dict, dict]:
    """Final (weights, shadow) of run_training from the start or from a checkpoint (as loop.train orders it)."""
    data = bpb.load_eval_data(cfg)
    data.windows = data.windows[:4]
    be, st = _fresh(name, cfg)
    fingerprint = {"train_shards": st.loader.stream.fingerprint()}
    if forget_ema:  # the fault: restore leaves the shadow at the initial weights
        be.load_ema = lambda weights: None
    if resume:
        loop.restore(be, st, cfg, resume, fingerprint)
    loop.run_training(be, st, cfg, QUIET, data, fingerprint)
    assert st.step == cfg.iterations
    return be.weights(), be.ema_weights()


@pytest.mark.parametrize("name", BACKENDS)
def test_a_resumed_run_ends_on_the_same_ema(tiny_data, tmp_path, name):
    ck = str(tmp_path / "c_{step}.ckpt")
    full = _run(name, _cfg(tiny_data, tmp_path, CHECKPOINT_EVERY=3, CHECKPOINT_PATH=ck))
    quiet = _cfg(tiny_data, tmp_path / "r", CHECKPOINT_EVERY=0)
    weights, ema = _run(name, quiet, resume=ck.format(step=3))
    _assert_same(full[0], weights, "weight")
    _assert_same(full[1], ema, "resumed ema")
    if name == "torch":
        with pytest.raises(AssertionError, match="resumed ema"):
            _assert_same(full[1], _run(name, quiet, resume=ck.format(step=3), forget_ema=True)[1], "resumed ema")


def _close(a: dict, b: dict, what: str, rtol: float, atol: float) -> None:
    for k, want in a.items():
        np.testing.assert_allclose(b[k], want, rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def test_a_torch_checkpoint_with_ema_resumes_in_mlx(tiny_data, tmp_path):
    """The shadow crosses frameworks: MLX continues a torch checkpoint to the torch run's EMA.

    Tolerance rtol 1e-4 / atol 1e-5 (STYLE.md's forward tolerance) on the weights after 6 steps: the two
    frameworks' steps differ by fp32 summation order only (test_parity's twenty steps agree to ~1e-5 in the loss),
    and the EMA itself is bit-equal to the reference in each (above)."""
    pytest.importorskip("mlx_train")
    ck = str(tmp_path / "c_{step}.ckpt")
    weights, ema = _run("torch", _cfg(tiny_data, tmp_path, CHECKPOINT_EVERY=3, CHECKPOINT_PATH=ck))
    m_weights, m_ema = _run("mlx", _cfg(tiny_data, tmp_path / "m", CHECKPOINT_EVERY=0), resume=ck.format(step=3))
    _close(weights, m_weights, "weight", 1e-4, 1e-5)
    _close(ema, m_ema, "ema", 1e-4, 1e-5)


def test_a_trained_run_logs_both_scores_and_exports_the_ema(tiny_data, tmp_path, monkeypatch, capsys):
    """loop.train end to end: val_live and val_ema lines, and the artifact holds the EMA weights."""
    import cuda_train
    env = tiny_env(tiny_data, tmp_path, EMA_DECAY=DECAY, ITERATIONS=4, WARMUP_STEPS=1)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    seen = {}
    swap = loop.swap_in_ema

    def spy(be, *a):
        seen["live"] = be.weights()
        swap(be, *a)
        seen["ema"] = be.weights()
    monkeypatch.setattr(loop, "swap_in_ema", spy)
    loop.train(cuda_train.TorchBackend, (cuda_train.__file__, cuda_train.__file__), None)
    out = capsys.readouterr().out
    assert "val_live val_loss:" in out and "val_ema val_loss:" in out
    state = artifact.load_artifact(env["ARTIFACT_PATH"])[0]
    name = max(state, key=lambda k: state[k].size)  # the largest (quantized) tensor
    to_ema = np.abs(state[name] - seen["ema"][name]).max()
    assert to_ema < np.abs(state[name] - seen["live"][name]).max(), "the artifact must hold the EMA weights"


def test_a_checkpoint_stores_the_shadow_and_refuses_one_without_it(tmp_path):
    from shared.checkpoint import load_checkpoint, pack, save_checkpoint
    from tests.test_checkpoint import CFG, META, _tensors
    cfg = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "128", "TRAIN_SEQ_LEN": "32", "EMA_DECAY": "0.5",
                                    "TRAIN_BATCH_TOKENS": "1024", "MLX_MAX_MICROBATCH_TOKENS": "256", "RUN_ID": "ck"})
    _, weights, slots = _tensors(CFG)
    ema = {k: v + 1.0 for k, v in weights.items()}
    save_checkpoint(tmp_path / "e.ckpt", cfg, pack(weights, slots, ema), META)
    got_w, _, _, got_ema = load_checkpoint(tmp_path / "e.ckpt", cfg)
    _assert_same(ema, got_ema, "ema")
    _assert_same(weights, got_w, "weight")
    save_checkpoint(tmp_path / "n.ckpt", cfg, pack(weights, slots), META)  # the shadow forgotten by save
    with pytest.raises(ValueError, match="missing entries .*'ema:"):
        load_checkpoint(tmp_path / "n.ckpt", cfg)
