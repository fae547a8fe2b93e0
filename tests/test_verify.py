"""Taylor tests: they pass on right derivatives, fail on wrong ones, and handle exact expansions."""

import numpy as np
import pytest

from adjopt.verify import check_hessian_symmetry, finite_difference_gradient, taylor_test


class Quartic:
    """J(p) = sum(p^4) + p0 p1: all derivatives known."""

    def __init__(self, wrong_gradient=False, wrong_hessian=False):
        self.wg, self.wh = wrong_gradient, wrong_hessian

    def value(self, p):
        return float(np.sum(p**4) + p[0] * p[1])

    def gradient(self, p):
        g = 4 * p**3
        g[0] += p[1]
        g[1] += p[0]
        return g * (1.01 if self.wg else 1.0)

    def hessp(self, p, v):
        h = 12 * p**2 * v
        h[0] += v[1]
        h[1] += v[0]
        return h * (1.05 if self.wh else 1.0)


class Quadratic:
    def value(self, p):
        return float(0.5 * p @ p + p.sum())

    def gradient(self, p):
        return p + 1

    def hessp(self, p, v):
        return v


P = np.array([0.3, -0.7, 1.1])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_right_derivatives_pass_with_expected_rates(order):
    r = taylor_test(Quartic(), P, order=order)
    assert r.passed and abs(r.rate - order) < 0.1, r.table()
    assert r.used.sum() >= 3
    assert f"order {order}" in r.table() and "PASS" in r.table()


def test_wrong_gradient_fails_with_rate_one():
    r = taylor_test(Quartic(wrong_gradient=True), P, order=2)
    assert not r.passed and abs(r.rate - 1) < 0.1, r.table()
    assert "FAIL" in r.table()


def test_wrong_hessian_fails_with_rate_two():
    r = taylor_test(Quartic(wrong_hessian=True), P, order=3)
    assert not r.passed and abs(r.rate - 2) < 0.1, r.table()


def test_exact_expansion_passes_as_exact():
    r = taylor_test(Quadratic(), P, order=3)
    assert r.exact and r.passed
    assert "exact" in r.table()


def test_step_window_avoids_roundoff():
    # a large constant in J moves the round-off floor up; the window must stay above it
    class Shifted(Quartic):
        def value(self, p):
            return super().value(p) + 1e6

    r = taylor_test(Shifted(), P, order=3)
    assert r.passed, r.table()
    assert np.all(r.remainders[r.used] > 1e3 * np.finfo(float).eps * 1e6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        taylor_test(Quartic(), P, order=4)
    with pytest.raises(ValueError, match="zero"):
        taylor_test(Quartic(), P, dp=np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        taylor_test(Quartic(), P, dp=np.ones(2))
    with pytest.raises(ValueError, match="window"):
        taylor_test(Quartic(), P, window=2)


def test_symmetry_and_finite_differences():
    assert check_hessian_symmetry(Quartic(), P) < 1e-14

    class Skew(Quartic):
        def hessp(self, p, v):
            return super().hessp(p, v) + np.array([v[1], 0.0, 0.0])

    assert check_hessian_symmetry(Skew(), P) > 1e-3
    np.testing.assert_allclose(finite_difference_gradient(Quartic(), P), Quartic().gradient(P), rtol=1e-8)


def test_derivative_report_lists_value_gradient_and_tables():
    text = __import__("adjopt.verify", fromlist=["derivative_report"]).derivative_report(Quartic(), P)
    assert text.startswith("J(p0)        = ")
    assert "|grad J(p0)| = " in text
    assert text.count("PASS") == 2 and "order 2" in text and "order 3" in text
