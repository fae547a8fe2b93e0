"""optimal_control: derivatives, regression values, and convergence to the manufactured optimum."""

import numpy as np
import optimal_control as oc
import pytest
import scipy.sparse.linalg as sla

import adjopt
from adjopt.verify import check_hessian_symmetry, finite_difference_gradient, taylor_test


@pytest.fixture(scope="module")
def small():
    return oc.build(n=8)


def test_taylor_rates(small):
    J = small.functional
    p = oc.exact_control(small.meta["mesh"].points) * 0.3
    r2 = taylor_test(J, p, order=2)
    assert r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and (r3.exact or r3.rate >= 2.9), r3.table()  # J is quadratic: exact
    assert check_hessian_symmetry(J, p) < 1e-10


def test_gradient_against_dense_formula(small):
    # grad = M[free]^T A^{-T} W (u - u_d) + alpha M z, with u = A^{-1} M[free] z, all dense
    J = small.functional
    z = np.random.default_rng(0).standard_normal(J.n_params)
    A = J.matrix.assemble(z).toarray()
    Bz = J.rhs.B.toarray()
    misfit, reg = J.objective.terms
    W = misfit.W.toarray()
    u = np.linalg.solve(A, Bz @ z)
    ref = Bz.T @ np.linalg.solve(A.T, W @ (u - misfit.d)) + small.meta["alpha"] * (small.meta["mass"] @ z)
    np.testing.assert_allclose(J.gradient(z), ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(J.gradient(z), finite_difference_gradient(J, z, h=1e-4), rtol=1e-6, atol=1e-10)


def test_regression_values(small):
    # measured with this implementation (n = 8, alpha = 1e-3, z0 = 0)
    J = small.functional
    assert J.value(small.p0) == pytest.approx(0.22936964684819963, rel=1e-8)
    assert np.linalg.norm(J.gradient(small.p0)) == pytest.approx(0.00403433591440596, rel=1e-8)


def test_discrete_optimum_converges_at_rate_two():
    hs, errs = [], []
    for n in (8, 16, 32):
        pb = oc.build(n=n)
        z = oc.solve_unconstrained(pb)
        # first-order optimality holds at the computed optimum
        assert np.linalg.norm(pb.functional.gradient(z)) < 1e-8 * np.linalg.norm(pb.functional.gradient(pb.p0))
        hs.append(1.0 / n)
        errs.append(oc.l2_error(pb, z))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - 2.0) < 0.1, (slope, errs)


def test_bounds_and_bad_options():
    pb = oc.build(n=4, lower=0.0, upper=10.0)
    lo, hi = pb.bounds
    assert np.all(lo == 0.0) and np.all(hi == 10.0)
    assert oc.build(n=4, upper=1.0).bounds[0][0] == -np.inf
    with pytest.raises(ValueError, match="n must"):
        oc.build(n=1)
    with pytest.raises(ValueError, match="alpha"):
        oc.build(n=4, alpha=0.0)
    for g in (0.5, 5.0, "2"):
        with pytest.raises(ValueError, match="grading"):
            oc.build(n=4, grading=g)


def test_graded_mesh_converges_to_the_manufactured_optimum():
    # cells shrink towards the origin; the manufactured solution holds on any mesh: second order in L2
    errs = [oc.l2_error(pb, oc.solve_unconstrained(pb)) for pb in (oc.build(n=n, grading=2.0) for n in (8, 16))]
    pts = oc.build(n=8, grading=2.0).meta["mesh"].points
    assert pts[:, 0].min() == 0.0 and np.unique(pts[:, 0])[1] == pytest.approx(1 / 64)
    assert errs[1] < 0.3 * errs[0], errs


def test_solve_unconstrained_reports_nonconvergence(monkeypatch):
    pb = oc.build(n=4)
    monkeypatch.setattr(sla, "cg", lambda *a, **k: (np.zeros(pb.functional.n_params), 7))
    with pytest.raises(adjopt.SolverDidNotConverge, match="info=7"):
        oc.solve_unconstrained(pb)
