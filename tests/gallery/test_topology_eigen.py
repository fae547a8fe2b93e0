"""Eigenfrequency design (problems/topology_eigen.py) on pyMOTO's ex_eigenfrequency settings."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import topology_eigen as te  # noqa: E402

from adjopt.optimize import minimize  # noqa: E402
from adjopt.verify import taylor_test  # noqa: E402

#: pyMOTO 2.0.1's ex_eigenfrequency.py on this machine: its objective scaling 100 / J(x0) was
#: 45024.283638984314, and after its 43 MMA designs (stopped by its tolf 1e-4) the scaled objective
#: 100 J / J(x0) was 23.015036767765174, with sqrt(lambda) = 51.46, 117.44, 127.92 rad/s
PYMOTO_J0 = 100.0 / 45024.283638984314
PYMOTO_SCALED_END = 23.015036767765174


def test_the_start_matches_pymoto():
    problem = te.build()
    np.testing.assert_allclose(problem.functional.value(problem.p0), PYMOTO_J0, rtol=1e-9)
    volume, vmax = problem.constraints[0]
    # pyMOTO's volume constraint at the start: 10 (V / nel - 0.5) = 0.65 (the mass block counts as solid)
    np.testing.assert_allclose(10 * (volume.value(problem.p0) - vmax), 0.65, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 3])
def test_taylor_rate(k):
    problem = te.build(16, 10, k=k)
    p = 0.5 + 0.3 * np.sin(np.arange(160))  # away from the kink of the mass interpolation at 0.1
    r = taylor_test(problem.functional, p, order=2)
    assert r.rate >= 1.9, r.table()


def test_the_block_is_solid_and_the_state_is_the_fundamental_mode():
    problem = te.build(16, 12)
    m = problem.meta
    rho = m["filter"].forward(np.full(192, 0.2))
    assert np.all(rho[m["block"]] == 1.0) and m["block"].size == 4 * 6
    J = problem.functional
    u = J.state(problem.p0)
    assert u.shape == (m["dofmap"].n_free,)
    np.testing.assert_array_equal(u, J.modes(problem.p0)[:, 0])


def test_regression_values():
    problem = te.build(20, 12)
    lam = problem.functional.eigenvalues(problem.p0)
    # measured with this module (aluminium, plane strain, density filter 2, the mass block at p0 = 0.5)
    np.testing.assert_allclose(lam, REGRESSION, rtol=1e-8)


REGRESSION = [3302.682543570146, 36192.54801147334, 48308.58864934928, 194568.88079256585]


@pytest.mark.slow
def test_pymoto_settings_end_at_pymotos_objective():
    problem = te.build()
    res = minimize(problem, "mma", move=0.1, xtol=0, gtol=0, maxiter=43)
    # measured: 23.025 (pyMOTO 23.015) with sqrt(lambda_1) = 51.44 rad/s (pyMOTO 51.46)
    assert 100 * res.fun / res.history[0]["f"] == pytest.approx(PYMOTO_SCALED_END, rel=0.01)
    assert problem.constraints[0][0].value(res.x) <= 0.5 * (1 + 1e-3)
    assert np.sqrt(problem.functional.eigenvalues(res.x)[0]) == pytest.approx(51.46458929, rel=0.01)


def test_a_short_run_raises_the_fundamental_frequency():
    problem = te.build(24, 14)
    res = minimize(problem, "mma", move=0.1, maxiter=10, gtol=0, xtol=0)
    lam0 = problem.functional.eigenvalues(problem.p0)[0]
    assert problem.functional.eigenvalues(res.x)[0] > 2 * lam0
    assert all("f1_hz" in e and "grey" in e for e in res.history)


@pytest.mark.parametrize("kwargs,match", [
    ({"nelx": 3}, "at least 4 x 4"),
    ({"emin": 0.0}, "emin must satisfy 0 < emin < 1"),
    ({"density": -1.0}, "density must be a positive"),
    ({"k": 0}, r"k: k must be an integer in \[1, n - 2\]"),
    ({"plane": "3d"}, "plane must be 'strain' or 'stress'"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        te.build(**{"nelx": 8, "nely": 6, **kwargs})
