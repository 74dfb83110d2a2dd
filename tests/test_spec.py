"""shared/spec.py: the parameter table, its init rules and the optimizer groups, checked by hand."""
import dataclasses

import numpy as np
import pytest

from shared.config import Hyperparameters
from shared.spec import (GROUP_OPTIMIZER, INIT_RULES, STORE_KINDS, estimate_memory_bytes, groups_of, init_params,
                         layer_plan, layer_schedule, mlp_hidden, num_skip_weights, optimizer_group, param_table,
                         param_shapes)

BASELINE = Hyperparameters()
TINY = Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "128", "TRAIN_SEQ_LEN": "32",
                                 "TRAIN_BATCH_TOKENS": "1024", "MLX_MAX_MICROBATCH_TOKENS": "256"})
GiB = 2**30


@pytest.fixture(scope="module")
def baseline_init():
    return init_params(BASELINE)


@pytest.mark.parametrize("cfg", [BASELINE, TINY, dataclasses.replace(TINY, tie_embeddings=False, num_layers=3)])
def test_rows_are_unique_and_valid(cfg):
    rows = param_table(cfg)
    names = [p.name for p in rows]
    assert len(names) == len(set(names))
    for p in rows:
        assert p.group in GROUP_OPTIMIZER and p.store in STORE_KINDS and p.init in INIT_RULES, p
        assert p.shape and all(isinstance(n, int) and n > 0 for n in p.shape), p


def test_baseline_parameter_count_is_the_official_one():
    # The official baseline logs model_params:17059912 (9 blocks of 1,837,064 + 1024x512 tok_emb + 4x512 skips).
    assert sum(int(np.prod(p.shape)) for p in param_table(BASELINE)) == 17_059_912


def test_optimizer_groups_follow_the_official_split():
    assert optimizer_group("tok_emb.weight", TINY) == "tok"
    for name in ("blocks.0.attn.c_q.weight", "blocks.1.attn.c_v.weight", "blocks.1.mlp.proj.weight"):
        assert optimizer_group(name, TINY) == "matrix", name
    # 2-D control tensors are Adam scalars, not Muon matrices (the official CONTROL_TENSOR_NAME_PATTERNS)
    for name in ("skip_weights", "blocks.0.resid_mix", "blocks.1.attn.q_gain", "blocks.0.mlp_scale"):
        assert optimizer_group(name, TINY) == "scalar", name
    assert optimizer_group("lm_head.weight", dataclasses.replace(TINY, tie_embeddings=False)) == "head"


@pytest.mark.parametrize("name", ["blocks.0.attn.c_q.weights", "blocks.2.attn.c_q.weight", "lm_head.weight", "x"])
def test_a_name_without_a_row_is_an_error(name):
    # tiny has 2 blocks and tied embeddings: none of these exist, and none may default to 'scalar'
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        optimizer_group(name, TINY)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        groups_of(["tok_emb.weight", name], TINY)


def test_groups_of_keeps_the_given_order():
    names = ["blocks.1.mlp.fc.weight", "skip_weights", "blocks.0.attn.c_q.weight", "tok_emb.weight"]
    assert groups_of(names, TINY) == {"matrix": ["blocks.1.mlp.fc.weight", "blocks.0.attn.c_q.weight"],
                                      "scalar": ["skip_weights"], "tok": ["tok_emb.weight"]}


def test_init_is_deterministic_per_seed(baseline_init):
    again = init_params(BASELINE)
    other = init_params(BASELINE, seed=BASELINE.seed + 1)
    for name, w in baseline_init.items():
        assert w.dtype == np.float32, name
        np.testing.assert_array_equal(again[name], w, err_msg=name)
    for name in ("tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.8.mlp.fc.weight"):
        assert not np.array_equal(other[name], baseline_init[name]), name
    np.testing.assert_array_equal(other["blocks.3.attn.proj.weight"], baseline_init["blocks.3.attn.proj.weight"])


def test_init_values_by_hand(baseline_init):
    w = baseline_init
    for i in range(9):
        b = f"blocks.{i}."
        assert not w[b + "attn.proj.weight"].any() and not w[b + "mlp.proj.weight"].any(), i  # blocks start as identity
        assert np.all(w[b + "attn_scale"] == 1.0) and np.all(w[b + "mlp_scale"] == 1.0), i
        assert np.all(w[b + "attn.q_gain"] == 1.5) and w[b + "attn.q_gain"].shape == (8,), i
        assert w[b + "resid_mix"].shape == (2, 512)
        assert np.all(w[b + "resid_mix"][0] == 1.0) and np.all(w[b + "resid_mix"][1] == 0.0), i
    assert w["skip_weights"].shape == (4, 512) and np.all(w["skip_weights"] == 1.0)
    emb = w["tok_emb.weight"].astype(np.float64)  # 524,288 draws: the sample std is within ~0.1% of 0.005
    assert 0.0049 < emb.std() < 0.0051 and abs(emb.mean()) < 5e-5
    # nn.Linear's default bound is 1/sqrt(in_features); in = model_dim = 512 for c_q/c_k/c_v/fc.
    bound = 1.0 / np.sqrt(512.0)
    for name in ("blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight", "blocks.0.attn.c_v.weight",
                 "blocks.0.mlp.fc.weight"):
        a = np.abs(w[name])
        assert a.max() <= bound and a.max() > 0.99 * bound, name  # fills [-bound, bound], not a narrower range
        assert 0.45 * bound < a.mean() < 0.55 * bound, name  # uniform: mean |w| = bound/2


def test_init_follows_the_config():
    cfg = dataclasses.replace(TINY, qk_gain_init=2.25, tied_embed_init_std=0.02, seed=9)
    w = init_params(cfg)
    assert np.all(w["blocks.1.attn.q_gain"] == 2.25)
    assert 0.018 < w["tok_emb.weight"].std() < 0.022  # 128x64 draws
    assert np.abs(w["blocks.0.attn.c_k.weight"]).max() <= 1.0 / 8.0  # in = 64
    untied = init_params(dataclasses.replace(TINY, tie_embeddings=False))
    assert 0.9 < untied["tok_emb.weight"].std() < 1.1  # untied: nn.Embedding's N(0, 1)
    assert untied["lm_head.weight"].shape == (128, 64) and not untied["lm_head.weight"].any()


def test_mlp_hidden_is_mult_times_dim_exactly():
    assert mlp_hidden(BASELINE) == 1024  # MLP_MULT=2, as before it became a float
    assert mlp_hidden(dataclasses.replace(BASELINE, mlp_mult=1.5)) == 768
    assert mlp_hidden(dataclasses.replace(BASELINE, mlp_mult=4.0)) == 2048
    shapes = param_shapes(dataclasses.replace(TINY, mlp_mult=3.5))  # dim 64 -> 224
    assert shapes["blocks.0.mlp.fc.weight"] == (224, 64) and shapes["blocks.1.mlp.proj.weight"] == (64, 224)
    assert all(type(n) is int for n in shapes["blocks.0.mlp.fc.weight"])
    with pytest.raises(ValueError, match="MLP_MULT"):
        mlp_hidden(dataclasses.replace(TINY, mlp_mult=1.01))  # 64.64: never rounded


def test_skip_gates_row_exists_only_when_enabled_and_leaves_the_init_alone():
    assert "skip_gates" not in param_shapes(BASELINE)
    gated = dataclasses.replace(BASELINE, skip_gates_enabled=True)
    rows = {p.name: p for p in param_table(gated)}
    assert (rows["skip_gates"].shape, rows["skip_gates"].init, rows["skip_gates"].store) == ((4, 512), "zeros",
                                                                                             "control")
    assert optimizer_group("skip_gates", gated) == "scalar"
    with pytest.raises(ValueError, match="skip_gates"):
        optimizer_group("skip_gates", BASELINE)
    plain, w = init_params(TINY), init_params(dataclasses.replace(TINY, skip_gates_enabled=True, xsa_last_n=2))
    assert not w.pop("skip_gates").any() and w.keys() == plain.keys()  # zeros draw nothing: the rest is the same
    assert all(np.array_equal(w[k], plain[k]) for k in plain)


def test_memory_estimate_grows_and_refuses_absurd_sizes():
    base = estimate_memory_bytes(BASELINE, 0)
    assert base >= 16 * 17_059_912  # at least fp32 weights, grads and two Adam moments
    assert estimate_memory_bytes(BASELINE, 65_536) > base
    assert estimate_memory_bytes(dataclasses.replace(BASELINE, num_layers=18), 0) > base
    assert estimate_memory_bytes(dataclasses.replace(BASELINE, model_dim=1024), 0) > base
    looped = dataclasses.replace(BASELINE, num_loops=2)  # layers 3..5 run three times: more activations a token
    assert (estimate_memory_bytes(looped, 4096) - estimate_memory_bytes(looped, 0)
            > estimate_memory_bytes(BASELINE, 4096) - base)
    assert base < 4 * GiB  # the baseline must not be refused on a 24 GiB card
    absurd = dataclasses.replace(BASELINE, model_dim=65_536, num_layers=64)
    # c_q and attn.proj alone are 2 * 65536^2 parameters a layer: 64 * 2 * 2^32 * 16 bytes = 8 TiB.
    assert estimate_memory_bytes(absurd, 0) >= 16 * 64 * 2 * 65_536**2 > 24 * GiB


@pytest.mark.parametrize("shape", [(96, 64), (32, 64), (64, 64)])
def test_orthogonal_draw_is_semi_orthogonal(shape):
    from shared.spec import orthogonal
    w = orthogonal(shape, np.random.default_rng(0))
    gram = w @ w.T if shape[0] <= shape[1] else w.T @ w  # orthonormal rows if wide/square, columns if tall
    np.testing.assert_allclose(gram, np.eye(min(shape)), atol=1e-12)


def test_orthogonal_signs_follow_r_so_the_draw_is_uniform():
    """R's diagonal signs folded into Q (as torch's orthogonal_): a plain QR's Q follows LAPACK's sign
    convention (R's diagonal is often negative) and is not uniformly distributed; here A = Q R with diag(R) > 0."""
    from shared.spec import orthogonal
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    q = orthogonal((48, 16), rng_a)
    a = rng_b.standard_normal((48, 16))
    r = q.T @ a  # the R of the sign-normalised factorisation: upper triangular with a positive diagonal
    assert np.all(np.diag(r) > 0)
    np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-12)


def test_ortho_init_draws_input_projections_orthogonal_and_keeps_outputs_zero():
    cfg = dataclasses.replace(TINY, ortho_init=True, num_layers=2)
    state, plain = init_params(cfg), init_params(TINY)
    for i in range(2):
        for name in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "mlp.fc.weight"):
            w = state[f"blocks.{i}.{name}"].astype(np.float64)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            np.testing.assert_allclose(gram, np.eye(min(w.shape)), atol=1e-5, err_msg=name)
        for name in ("attn.proj.weight", "mlp.proj.weight"):
            assert not state[f"blocks.{i}.{name}"].any(), name
    assert np.array_equal(state["tok_emb.weight"], plain["tok_emb.weight"])  # drawn first, unchanged
    assert np.array_equal(init_params(cfg)["blocks.1.mlp.fc.weight"], state["blocks.1.mlp.fc.weight"])  # seeded


# The record's layout (RECORD_STACK.md §2, §3.2, §3.6, §3.7): 11 layers, 3..5 looped twice more, lanes from 8.
RECORD = dataclasses.replace(BASELINE, num_layers=11, vocab_size=8192, mlp_mult=4.0, skip_gates_enabled=True,
                             num_loops=2, loop_start=3, loop_end=5, parallel_start_layer=8, smear_gate_enabled=True,
                             sparse_attn_gate_enabled=True, gate_window=12)


def _skip_pairs(cfg: Hyperparameters, looping: bool) -> list[tuple[int, int | None, int | None]]:
    """(decoder layer, encoder layer whose output it receives, slot), by running the plan's push/pop stack."""
    plan = layer_plan(cfg, looping)
    stack, pairs = list(plan.encoder), []
    for layer, slot in zip(plan.decoder, plan.skip_slots):
        pairs.append((layer, None, None) if slot is None else (layer, stack.pop(), slot))
    return pairs


def test_record_layer_schedule_by_hand():
    assert layer_schedule(RECORD, looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert layer_schedule(RECORD, looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert num_skip_weights(RECORD) == 8 and num_skip_weights(BASELINE) == 4
    # NUM_LOOPS=0: the looped schedule is the plain one, whatever LOOP_START/LOOP_END say
    assert layer_schedule(BASELINE, True) == layer_schedule(BASELINE, False) == ([0, 1, 2, 3], [4, 5, 6, 7, 8])


def test_record_skip_pairing_by_hand():
    # looping off: decoder layers 5..9 receive encoder layers 4..0 through slots 0..4; layer 10 gets none
    assert _skip_pairs(RECORD, False) == [(5, 4, 0), (6, 3, 1), (7, 2, 2), (8, 1, 3), (9, 0, 4), (10, None, None)]
    # looping on: decoder [5,3,4,5,6,7,8,9] receive encoder positions 7..0 = layers [4,3,5,4,3,2,1,0], slots 0..7
    assert _skip_pairs(RECORD, True) == [(5, 4, 0), (3, 3, 1), (4, 5, 2), (5, 4, 3), (6, 3, 4), (7, 2, 5),
                                         (8, 1, 6), (9, 0, 7), (10, None, None)]
    # the baseline (no loops): today's pairing, 4 skips for 5 decoder layers
    assert _skip_pairs(BASELINE, True) == [(4, 3, 0), (5, 2, 1), (6, 1, 2), (7, 0, 3), (8, None, None)]


def test_lane_rows_exist_only_for_lane_layers_and_leave_the_init_alone():
    rows = {p.name: p for p in param_table(RECORD)}
    post, resid = rows["parallel_post_lambdas"], rows["parallel_resid_lambdas"]
    assert (post.shape, post.init, post.group, post.store) == ((3, 2, 2), "ones", "scalar", "control")
    assert (resid.shape, resid.init, resid.value, resid.group, resid.store) == ((3, 2), "const", 1.1,
                                                                                "scalar", "control")
    assert not any(name.startswith("parallel_") for name in param_shapes(BASELINE))
    tiny_lanes = dataclasses.replace(TINY, num_layers=4, parallel_start_layer=2, num_loops=1, loop_start=1,
                                     loop_end=2)
    plain, w = init_params(dataclasses.replace(tiny_lanes, parallel_start_layer=0)), init_params(tiny_lanes)
    assert np.all(w.pop("parallel_post_lambdas") == 1.0)
    assert np.all(w.pop("parallel_resid_lambdas") == np.float32(1.1))
    assert w.keys() == plain.keys() and all(np.array_equal(w[k], plain[k]) for k in plain)  # nothing drawn


def test_record_parameter_count_is_the_records_less_the_never_read_lane_rows():
    # The record has 35,945,671 parameters (RECORD_STACK.md §0) and stores a lane row for all 11 layers,
    # reading only layers 8..10: we drop the other 8 rows, 8 * (2*2 + 2) = 48 scalars.
    names = {p.name: int(np.prod(p.shape)) for p in param_table(RECORD)}
    assert sum(names.values()) == 35_945_671 - 48 == 35_945_623
    assert names["parallel_post_lambdas"] + names["parallel_resid_lambdas"] == 3 * 6
    assert names["smear_gate.weight"] + names["smear_lambda"] == 13 and names["blocks.10.attn.attn_gate_w"] == 96


def test_ns_coefficients_per_kind_and_step_count():
    from shared.spec import NS_COEFFS, POLAR_EXPRESS_COEFFS, ns_coefficients
    assert ns_coefficients("quintic", 5) == (NS_COEFFS,) * 5 and NS_COEFFS == (3.4445, -4.7750, 2.0315)
    assert ns_coefficients("polar_express", 5) == POLAR_EXPRESS_COEFFS and len(set(POLAR_EXPRESS_COEFFS)) == 5
    assert POLAR_EXPRESS_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)  # §5.3, first
    assert POLAR_EXPRESS_COEFFS[-1] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)  # and last
    assert ns_coefficients("polar_express", 3) == POLAR_EXPRESS_COEFFS[:3]  # fewer steps: the first ones
    assert ns_coefficients("polar_express", 7) == POLAR_EXPRESS_COEFFS + (POLAR_EXPRESS_COEFFS[-1],) * 2  # more
    with pytest.raises(ValueError, match="MUON_NS"):
        ns_coefficients("cubic", 5)
