"""Blocked Hessian actions: hessp(p, dP) with dP of shape (m, k) equals k single actions (to round-off), from
one multi-column tangent solve and one multi-column second-adjoint solve, for every kind of functional."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import multi_experiment  # noqa: E402
import nonlinear_inversion  # noqa: E402
import poisson_inversion  # noqa: E402
import topology_compliance  # noqa: E402

from adjopt.errors import ShapeError, NonFiniteError  # noqa: E402

CASES = {
    "poisson": lambda: poisson_inversion.build(n=8),
    "multi_experiment": lambda: multi_experiment.build(n=6, n_sources=3, n_obs=12),
    "compliance (self-adjoint, filter map)": lambda: topology_compliance.build("mbb", nelx=12, nely=4),
    "nonlinear": lambda: nonlinear_inversion.build(n=6),
}


@pytest.mark.parametrize("gauss_newton", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_block_equals_its_single_actions_and_solves_once(case, gauss_newton):
    problem = CASES[case]()
    J = problem.functional
    rng = np.random.default_rng(0)
    p = problem.p0 + 0.1 * rng.random(J.n_params)
    D = rng.standard_normal((J.n_params, 5))
    singles = np.column_stack([J.hessp(p, D[:, i], gauss_newton=gauss_newton) for i in range(5)])
    J.reset_stats()
    H = J.hessp(p, D, gauss_newton=gauss_newton)
    assert H.shape == (J.n_params, 5)
    np.testing.assert_allclose(H, singles, rtol=1e-10, atol=1e-12 * np.abs(singles).max())
    solves = J.stats.solves
    assert solves["tangent"] == 1 and solves["second_adjoint"] <= 1  # one multi-column solve of each kind
    assert J.stats.rhs["tangent"] == 5 * (J.state(p).size // J.state(p).shape[0])
    # a block of one column is the single action, as a column
    np.testing.assert_allclose(J.hessp(p, D[:, :1], gauss_newton=gauss_newton)[:, 0], singles[:, 0], rtol=1e-12,
                               atol=1e-14 * np.abs(singles).max())


def test_the_block_is_copied_and_bad_blocks_are_refused():
    problem = poisson_inversion.build(n=8)
    J, p = problem.functional, problem.p0
    D = np.random.default_rng(1).standard_normal((J.n_params, 3))
    H = J.hessp(p, D)
    np.testing.assert_array_equal(D, D.copy())  # not changed in place
    Dc = D.copy()
    J.hessp(p, Dc)
    np.testing.assert_array_equal(Dc, D)
    np.testing.assert_allclose(J.hessp(p, np.asfortranarray(D)), H, rtol=1e-13, atol=0)  # any memory layout
    with pytest.raises(ShapeError, match=r"\(%d, k\)" % J.n_params):
        J.hessp(p, D.T)
    with pytest.raises(ShapeError, match="no direction"):
        J.hessp(p, np.zeros((J.n_params, 0)))
    with pytest.raises(ShapeError):
        J.hessp(p, np.zeros((J.n_params, 2, 2)))
    bad = D.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError):
        J.hessp(p, bad)


def test_a_block_solve_is_checked_through_random_combinations_of_its_columns():
    import scipy.sparse as sp

    from adjopt.errors import SingularMatrixError
    from adjopt.solvers import make_solver

    n = 30
    A = sp.csr_array(sp.diags_array([np.full(n - 1, -1.0), np.full(n, 2.5), np.full(n - 1, -1.0)], offsets=[-1, 0, 1]))
    fac = make_solver("superlu").factorize(A)
    B = np.random.default_rng(0).standard_normal((n, 12))
    X = fac.solve(B)
    np.testing.assert_allclose(A @ X, B, atol=1e-12)
    fac.check_residual(X, B)  # a right block passes
    X[:, 7] += 0.5  # one wrong column among twelve is seen in the combinations
    with pytest.raises(SingularMatrixError, match="residual"):
        fac.check_residual(X, B)
