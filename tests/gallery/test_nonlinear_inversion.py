"""The nonlinear log-conductivity inversion (problems/nonlinear_inversion.py): derivatives, Newton, values, options."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import nonlinear_inversion as ni  # noqa: E402
import poisson_inversion  # noqa: E402

import adjopt  # noqa: E402
from adjopt.verify import (  # noqa: E402
    check_hessian_symmetry,
    finite_difference_gradient,
    independent_evaluations,
    taylor_test,
)


def smooth_point(problem):
    """A smooth nonzero nodal field: 0.5 sin(pi x) sin(pi y) (sin(pi z)) + 0.2 x."""
    x = problem.meta["mesh"].points
    return 0.5 * np.prod(np.sin(np.pi * x), axis=1) + 0.2 * x[:, 0]


@pytest.fixture(scope="module")
def problem():
    return ni.build(n=8)


def test_shapes_and_meta(problem):
    J, mesh = problem.functional, problem.meta["mesh"]
    assert isinstance(J, adjopt.NonlinearReducedFunctional)
    assert problem.p0.shape == (mesh.n_nodes,) and not problem.p0.any()
    assert J.n_params == mesh.n_nodes
    assert J.residual.n_params == mesh.n_cells
    assert J.residual.n == (8 - 1) ** 2  # interior nodes only
    assert J.residual.beta == 1.0 and not J.residual.symmetric
    assert problem.meta["observation_points"].shape == (50, 2)
    np.testing.assert_array_equal(problem.meta["m_true"], poisson_inversion.m_true(mesh.points))


def test_newton_needs_several_iterations_at_p0():
    # a fresh functional (nothing cached): Newton from u = 0 at p0
    J = ni.build(n=8).functional
    p0 = np.zeros(J.n_params)
    J.value(p0)
    history = J.newton_history(p0)
    assert J.stats.newton_iterations == len(history) - 1
    assert len(history) - 1 >= 3, history  # measured: 5
    assert history[-1] <= 1e-10 * history[0]
    assert 0.8 < np.abs(J.state(p0)).max() < 1.5  # u = O(1): q(u) = 1 + u^2 far from 1


@pytest.mark.parametrize("where", ["p0", "smooth"])
def test_taylor_rates(problem, where):
    J = problem.functional
    p = problem.p0 if where == "p0" else smooth_point(problem)
    r2 = taylor_test(J, p, order=2)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and r3.rate >= 2.9, r3.table()


def test_hessian_symmetric(problem):
    assert check_hessian_symmetry(problem.functional, smooth_point(problem)) < 1e-8
    assert check_hessian_symmetry(problem.functional, problem.p0) < 1e-8


def test_regression_values(problem):
    # measured with this implementation (n=8, dim=2, beta=1, source=20, defaults, seed=0)
    J, p = problem.functional, problem.p0
    assert J.value(p) == pytest.approx(696.3585159762052, rel=1e-8)
    assert np.linalg.norm(J.gradient(p)) == pytest.approx(1701.8825451466457, rel=1e-8)


def test_gradient_matches_finite_differences(problem):
    J = problem.functional
    p = smooth_point(problem)
    g = J.gradient(p)
    with independent_evaluations(J):
        fd = finite_difference_gradient(J, p, h=1e-5)
    np.testing.assert_allclose(g, fd, rtol=0, atol=1e-7 * np.abs(g).max())


def _element_functional(problem):
    """The misfit (plus an L2 term on the cells) as a function of the element values rho, without a map."""
    J, meta = problem.functional, problem.meta
    misfit = J.objective.terms[0]
    areas = meta["mesh"].cell_volumes()
    objective = adjopt.SquaredMisfit(misfit.d, B=meta["observation_operator"], W=misfit.W) \
        + 0.5 * adjopt.TikhonovL2(areas)
    return adjopt.ReducedFunctional(J.residual, objective=objective)


def test_without_the_parameter_map(problem):
    J = problem.functional
    Je = _element_functional(problem)
    assert Je.map is None and Je.n_params == problem.meta["mesh"].n_cells
    m = smooth_point(problem)
    rho = J.map.forward(m)
    r2 = taylor_test(Je, rho, order=2)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    r3 = taylor_test(Je, rho, order=3)
    assert r3.passed and r3.rate >= 2.9, r3.table()
    assert check_hessian_symmetry(Je, rho) < 1e-8
    # the same state either way, and the chain rule through the map for the misfit part
    np.testing.assert_allclose(Je.state(rho), J.state(m), rtol=1e-9, atol=1e-12)
    reg = problem.meta["regularization"]
    g_misfit = J.gradient(m) - reg.grad_p(J.state(m), m)
    g_rho = Je.gradient(rho) - 0.5 * adjopt.TikhonovL2(problem.meta["mesh"].cell_volumes()).grad_p(None, rho)
    np.testing.assert_allclose(g_misfit, J.map.vjp(m, g_rho), rtol=1e-8, atol=1e-10 * np.abs(g_misfit).max())


def test_data_are_observations_of_the_nonlinear_state(problem):
    J, meta = problem.functional, problem.meta
    u = J.state(meta["m_true"])
    np.testing.assert_allclose(u, meta["u_true"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(meta["observation_operator"] @ u, meta["data_clean"], rtol=1e-8)
    noise = meta["data"] - meta["data_clean"]
    assert 0 < np.abs(noise).max() < 0.05 * np.abs(meta["data_clean"]).max()
    # the state solves R(u, M(m_true)) = 0 and differs from the linear (beta = 0) state
    R = J.residual
    rho = J.map.forward(meta["m_true"])
    assert np.linalg.norm(R.residual(u, rho)) < 1e-9 * np.linalg.norm(R.residual(np.zeros(R.n), rho))
    linear = ni.build(n=8, beta=0.0).meta["u_true"]
    assert np.abs(linear).max() > 1.2 * np.abs(u).max()


def test_beta_zero_and_unit_source_is_poisson_inversion():
    # q = 1 and f = 1: the linear problem of poisson_inversion, the same data draw; Newton takes one step
    lin = poisson_inversion.build(n=8)
    pb = ni.build(n=8, beta=0.0, source=1.0)
    p = smooth_point(pb)
    assert pb.functional.value(p) == pytest.approx(lin.functional.value(p), rel=1e-9)
    np.testing.assert_allclose(pb.functional.gradient(p), lin.functional.gradient(p), rtol=1e-7,
                               atol=1e-9 * np.abs(lin.functional.gradient(p)).max())
    J = ni.build(n=8, beta=0.0, source=1.0).functional
    J.value(p)
    assert len(J.newton_history(p)) - 1 == 1


def test_three_dimensions_tiny():
    problem = ni.build(n=3, dim=3)
    J = problem.functional
    assert problem.meta["mesh"].cell_type == "tetra"
    assert problem.meta["observation_points"].shape == (50, 3)
    assert problem.name == "nonlinear_inversion_3d"
    p = smooth_point(problem)
    assert taylor_test(J, p, order=2).rate >= 1.9
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and r3.rate >= 2.9, r3.table()
    assert check_hessian_symmetry(J, p) < 1e-8


def test_solver_option():
    pb = ni.build(n=4, solver="superlu")
    assert pb.functional.solver.name == "superlu"
    ref = ni.build(n=4)
    assert pb.functional.value(pb.p0) == pytest.approx(ref.functional.value(ref.p0), rel=1e-10)
    # an instance goes to the functional only: the data solve does not count in its statistics
    from adjopt.solvers import make_solver

    solver = make_solver("superlu")
    J = ni.build(n=4, solver=solver).functional
    assert J.solver is solver and J.stats.newton_iterations == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=1), "n"),
    (dict(n=2.5), "n"),
    (dict(dim=1), "dim must be 2"),
    (dict(dim=4), "dim must be 2"),
    (dict(beta=-1.0), "beta must be a finite number >= 0"),
    (dict(beta=float("nan")), "beta"),
    (dict(beta="1"), "beta"),
    (dict(source=float("inf")), "source must be a finite number"),
    (dict(n_obs=0), "n_obs"),
    (dict(noise=-1.0), "noise"),
    (dict(alpha=-1.0), "alpha"),
    (dict(seed=-1), "seed"),
    (dict(solver="nonexistent"), "unknown solver"),
    (dict(solver="gmg"), "solver"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ni.build(**{"n": 4, **kwargs})


def test_truth_fits_better_than_the_start():
    problem = ni.build(n=16, n_obs=30)
    J = problem.functional
    assert J.value(problem.meta["m_true"]) < 0.1 * J.value(problem.p0)
    assert J.value(problem.meta["m_true"]) < 3 * 30 / 2
