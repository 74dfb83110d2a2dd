import math

import pytest

from tools.stats import betainc, one_sided_t_test, t_sf


@pytest.mark.parametrize("t,df,p", [(6.965, 2, 0.01), (2.920, 2, 0.05), (2.228, 10, 0.025), (12.706, 1, 0.025),
                                    (1.0, 1, 0.25), (0.0, 5, 0.5), (-2.228, 10, 0.975), (2.576, 1e6, 0.005)])
def test_t_tail_matches_published_critical_values(t, df, p):
    assert t_sf(t, df) == pytest.approx(p, abs=2e-5)


def test_betainc_edges_and_symmetry():
    assert betainc(2, 3, 0.0) == 0.0 and betainc(2, 3, 1.0) == 1.0
    assert betainc(2.5, 1.5, 0.3) == pytest.approx(1 - betainc(1.5, 2.5, 0.7), abs=1e-12)
    assert betainc(1, 1, 0.37) == pytest.approx(0.37, abs=1e-12)  # uniform


def test_one_sided_test():
    mean, t, p = one_sided_t_test([0.010, 0.012, 0.011], 0.005)
    assert mean == pytest.approx(0.011) and t == pytest.approx(6 / (0.001 / math.sqrt(3)) / 1000)
    assert p < 0.01
    assert one_sided_t_test([0.004, 0.006, 0.005], 0.005)[2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 seeds"):
        one_sided_t_test([0.01], 0.005)
