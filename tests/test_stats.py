import numpy as np
import pytest

from scalecert.stats import discordant, holm, mcnemar_exact, paired_bootstrap


def _case(both, only_a, only_b, neither):
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    return a, b


def test_mcnemar_exact_p_value_of_known_discordant_counts():
    a, b = _case(50, 8, 2, 40)
    assert discordant(a, b) == (8, 2)
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10 + 45) / 1024, abs=1e-12)  # 2 P(X <= 2), X ~ B(10, 1/2)
    assert mcnemar_exact(b, a) == pytest.approx(mcnemar_exact(a, b), abs=1e-15)
    assert mcnemar_exact(*_case(5, 0, 0, 5)) == 1.0
    assert mcnemar_exact(*_case(0, 6, 0, 0)) == pytest.approx(2 / 64)


def test_paired_bootstrap_interval_of_a_known_case():
    a, b = _case(3000, 600, 400, 6000)  # n = 10,000; difference 2 points
    diff, lo, hi = paired_bootstrap(a, b, n_boot=20000, seed=1)
    assert diff == pytest.approx(2.0)
    n, p_a, p_b = 10000, 0.06, 0.04
    se = 100 * np.sqrt((p_a + p_b - (p_a - p_b) ** 2) / n)  # paired difference's standard error
    assert lo == pytest.approx(2.0 - 1.96 * se, abs=0.06) and hi == pytest.approx(2.0 + 1.96 * se, abs=0.06)
    assert paired_bootstrap(a, b, n_boot=500, seed=3) == paired_bootstrap(a, b, n_boot=500, seed=3)


def test_paired_bootstrap_without_discordant_images_is_a_point():
    assert paired_bootstrap(*_case(7, 0, 0, 3)) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(*_case(0, 4, 0, 0)) == (100.0, 100.0, 100.0)


@pytest.mark.parametrize("a,b", [([1, 0], [1]), ([], []), ([[1]], [[1]])])
def test_unpaired_outcomes_are_refused(a, b):
    with pytest.raises(ValueError, match="paired outcomes"):
        paired_bootstrap(a, b)


def test_holm_steps_down_and_stops_at_the_first_failure():
    # sorted p 0.01, 0.012, 0.02, 0.5 against 0.05/4, 0.05/3, 0.05/2, 0.05/1: the first three pass, in input order
    assert holm([0.02, 0.5, 0.01, 0.012]).tolist() == [True, False, True, True]
    assert holm([0.03, 0.5, 0.01, 0.02]).tolist() == [False, False, True, False]  # 0.02 > 0.05/3 stops there
    # 0.013 passes 0.05/3; 0.03 fails 0.05/2, so 0.04 (< 0.05 on its own) is not rejected either
    assert holm([0.04, 0.013, 0.03]).tolist() == [False, True, False]
    assert holm([0.06]).tolist() == [False] and holm([0.05]).tolist() == [True]
    assert holm([]).tolist() == []


@pytest.mark.parametrize("bad", [[0.1, float("nan")], [1.5], [[0.1]]])
def test_holm_refuses_what_is_not_p_values(bad):
    with pytest.raises(ValueError):
        holm(bad)
