"""semilinear_control: derivatives, Newton, the manufactured optimality system, convergence to the optimum."""

import numpy as np
import pytest
import semilinear_control as sc

import adjopt
from adjopt.optimize import OptimizationError
from adjopt.verify import check_hessian_symmetry, finite_difference_gradient, independent_evaluations, taylor_test


@pytest.fixture(scope="module")
def small():
    return sc.build(n=8)


def test_shapes_and_meta(small):
    J, mesh = small.functional, small.meta["mesh"]
    assert isinstance(J, adjopt.NonlinearReducedFunctional)
    assert J.n_params == mesh.n_nodes and J.residual.n == (8 - 1) ** 2
    assert J.residual.symmetric  # beta = 0: K = stiffness + 3 u^2 mass is symmetric
    np.testing.assert_allclose(small.meta["z_exact"], sc.exact_control(mesh.points))
    np.testing.assert_allclose(small.meta["w_exact"], -small.meta["alpha"] * small.meta["z_exact"])


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_taylor_rates(small, scale):
    # at (a multiple of) z*, where u = O(1) and the cubic matters (at z = 0, u = 0.03 and J is nearly quadratic)
    J = small.functional
    p = scale * small.meta["z_exact"]
    r2 = taylor_test(J, p, order=2)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and not r3.exact and r3.rate >= 2.9, r3.table()  # not quadratic, unlike optimal_control
    assert check_hessian_symmetry(J, p) < 1e-8


def test_taylor_rates_at_p0(small):
    J = small.functional
    assert taylor_test(J, small.p0, order=2).rate >= 1.9
    assert taylor_test(J, small.p0, order=3).passed
    assert check_hessian_symmetry(J, small.p0) < 1e-8


def test_gradient_against_finite_differences(small):
    J = small.functional
    z = 0.5 * small.meta["z_exact"] + np.random.default_rng(0).standard_normal(J.n_params)
    g = J.gradient(z)
    with independent_evaluations(J):
        fd = finite_difference_gradient(J, z, h=1e-4)
    np.testing.assert_allclose(g, fd, rtol=0, atol=1e-7 * np.abs(g).max())


def test_regression_values(small):
    # measured with this implementation (n = 8, alpha = 1e-3, amplitude 1, quadrature degree 4, z0 = 0)
    J = small.functional
    assert J.value(small.p0) == pytest.approx(0.23133222110014381, rel=1e-8)
    assert np.linalg.norm(J.gradient(small.p0)) == pytest.approx(0.004051108043698225, rel=1e-8)


def test_newton_iterations():
    # fresh functionals (nothing cached): Newton from u = 0; measured 2 at z = 0, 4 at z*
    for which, at_least in (("p0", 2), ("z_exact", 3)):
        pb = sc.build(n=8)
        J = pb.functional
        p = pb.p0 if which == "p0" else pb.meta["z_exact"]
        J.value(p)
        history = J.newton_history(p)
        assert len(history) - 1 >= at_least, (which, history)
        assert history[-1] <= 1e-10 * history[0]
        assert J.stats.newton_iterations == len(history) - 1


def test_manufactured_optimality_system():
    # at I_h z*: the state tends to u*, the adjoint to w* = -alpha z* (the sign of the adjoint), and the
    # gradient alpha M z + M^T lam to zero, all at second order
    errs = []
    for n in (8, 16):
        pb = sc.build(n=n)
        J, meta = pb.functional, pb.meta
        free = meta["dofs"].free
        zs = meta["z_exact"]
        u_err = np.abs(J.state(zs) - meta["u_exact"][free]).max()
        w_err = np.abs(J.adjoint(zs) - meta["w_exact"][free]).max() / np.abs(meta["w_exact"]).max()
        g_rel = np.linalg.norm(J.gradient(zs)) / np.linalg.norm(J.gradient(pb.p0))
        errs.append((u_err, w_err, g_rel))
    for coarse, fine in zip(errs[0], errs[1]):
        assert 3.5 < coarse / fine < 4.5, errs
    assert max(errs[1]) < 0.02, errs


def test_discrete_optimum_converges_at_rate_two():
    hs, errs = [], []
    for n in (8, 16, 32):
        pb = sc.build(n=n)
        z = sc.solve(pb)
        J = pb.functional
        assert np.linalg.norm(J.gradient(z)) < 1e-6 * np.linalg.norm(J.gradient(pb.p0))
        hs.append(1.0 / n)
        errs.append(sc.l2_error(pb, z))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - 2.0) < 0.15, (slope, errs)  # measured 1.96 (0.154, 0.0403, 0.0102)


def test_larger_amplitude_converges():
    # k = 3: u* up to 3, the cubic comparable to the Laplacian
    errs = [sc.l2_error(pb, sc.solve(pb)) for pb in (sc.build(n=n, amplitude=3.0) for n in (8, 16))]
    assert 3.5 < errs[0] / errs[1] < 4.5, errs


def test_solve_reports_nonconvergence():
    pb = sc.build(n=4)
    with pytest.raises(OptimizationError, match="did not reach gtol"):
        sc.solve(pb, maxiter=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=1), "n must be an integer >= 2"),
    (dict(n=2.5), "n must be an integer >= 2"),
    (dict(n=True), "n must be an integer >= 2"),
    (dict(alpha=0.0), "alpha must be a positive"),
    (dict(alpha=-1e-3), "alpha must be a positive"),
    (dict(alpha=float("inf")), "alpha must be a positive"),
    (dict(amplitude=0.0), "amplitude must be a positive"),
    (dict(amplitude=float("nan")), "amplitude must be a positive"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sc.build(**{"n": 4, **kwargs})
