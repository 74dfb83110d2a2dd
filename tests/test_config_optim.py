"""The record preset's optimizer values (RECORD_STACK.md §5.2-§5.4) and the weight-decay defaults."""
from shared.config import Hyperparameters


def test_weight_decay_is_off_by_default():
    cfg = Hyperparameters.from_env({})
    assert (cfg.muon_wd, cfg.embed_wd, cfg.adam_wd) == (0.0, 0.0, 0.0)


def test_record_preset_has_the_records_optimizer_values():
    cfg = Hyperparameters.from_env({"PRESET": "record"})
    assert (cfg.matrix_lr, cfg.scalar_lr, cfg.tied_embed_lr) == (0.026, 0.02, 0.03)
    assert (cfg.muon_momentum, cfg.muon_momentum_warmup_start, cfg.muon_momentum_warmup_steps) == (0.97, 0.92, 1500)
    assert (cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.grad_clip_norm, cfg.muon_backend_steps) == (0.9, 0.99, 1e-8, 0.3, 5)
    assert (cfg.muon_wd, cfg.embed_wd, cfg.adam_wd) == (0.095, 0.085, 0.02)
    assert (cfg.muon_ns, cfg.muon_row_normalize) == ("polar_express", True)


def test_muon_orthogonalisation_is_the_baselines_by_default():
    cfg = Hyperparameters.from_env({})
    assert (cfg.muon_ns, cfg.muon_row_normalize, cfg.muon_backend_steps) == ("quintic", False, 5)
