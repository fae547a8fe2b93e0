"""A run that stops short of its gradient tolerance is not a success, whatever stopped it."""

import numpy as np
import pytest

import adjopt


class Quadratic:
    """J(p) = c + 0.5 p^T D p: a large constant c puts the round-off of J far above what gtol asks for."""

    def __init__(self, c, m=40):
        self.c = c
        self.d = np.linspace(1.0, 100.0, m)
        self.n_params = m

    def value(self, p):
        return self.c + 0.5 * float(p @ (self.d * p))

    def gradient(self, p, tol=None):
        return self.d * p

    def hessp(self, p, v, tol=None, **kw):
        return self.d * v


@pytest.mark.parametrize("method", ["lbfgs", "lbfgsb", "newton-cg"])
def test_a_run_stopped_by_round_off_short_of_gtol_is_not_a_success(method):
    J = Quadratic(1e12)
    res = adjopt.minimize(adjopt.Problem(J, np.ones(J.n_params)), method=method, gtol=1e-15, maxiter=500)
    assert res.stationarity > 1e-15 * np.linalg.norm(J.d)  # gtol was not reached ...
    assert not res.success  # ... so it is not reported as converged
    assert res.nit < 500 and ("round-off" in res.message or "short of" in res.message)


@pytest.mark.parametrize("method", ["lbfgs", "newton-cg"])
def test_the_same_run_without_the_constant_converges(method):
    J = Quadratic(0.0)
    res = adjopt.minimize(adjopt.Problem(J, np.ones(J.n_params)), method=method, gtol=1e-10, maxiter=500)
    assert res.success and res.stationarity <= 1e-10 * res.history[0]["stationarity"]


def test_nan_bounds_are_named_as_bounds():
    J = Quadratic(0.0, m=3)
    with pytest.raises(ValueError, match=r"the upper bound is NaN at 1 entries \(first at 2\).*-inf / inf"):
        adjopt.Problem(J, np.zeros(3), bounds=(0.0, np.array([1.0, 1.0, np.nan])))
    with pytest.raises(ValueError, match="the lower bound is NaN"):
        adjopt.Problem(J, np.zeros(3), bounds=(np.nan, 1.0))


def test_scalar_bounds_cost_no_memory_and_vector_bounds_are_copies():
    J = Quadratic(0.0, m=1000)
    lower = np.full(1000, -1.0)
    problem = adjopt.Problem(J, np.zeros(1000), bounds=(lower, 2.0))
    lo, hi = problem.bounds
    assert hi.shape == (1000,) and np.all(hi == 2.0)
    assert hi.strides == (0,) and not hi.flags.writeable  # one number, read-only: no one changes it in place
    lower[:] = 5.0  # the caller reuses its array: the problem's bound stays
    assert np.all(lo == -1.0)
    with pytest.raises(ValueError, match="the upper bound is NaN"):
        adjopt.Problem(J, np.zeros(1000), bounds=(0.0, None))
    res = adjopt.minimize(adjopt.Problem(J, np.full(1000, 1.0), bounds=(0.5, 2.0)), method="lbfgs", maxiter=50)
    assert np.allclose(res.x, 0.5)
