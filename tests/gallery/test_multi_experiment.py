"""Multi-experiment conductivity recovery (problems/multi_experiment.py): the multi-column path."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import multi_experiment  # noqa: E402

import adjopt  # noqa: E402
from adjopt.verify import check_hessian_symmetry, taylor_test  # noqa: E402

N_SOURCES = 3


def smooth_point(problem):
    x = problem.meta["mesh"].points
    return 0.5 * np.prod(np.sin(np.pi * x), axis=1) + 0.2 * x[:, 0]


@pytest.fixture(scope="module")
def problem():
    return multi_experiment.build(n=10, n_sources=N_SOURCES, n_obs=30)


def single_source_functionals(problem):
    """One ReducedFunctional per column (misfit only), built independently from the pieces."""
    J, meta = problem.functional, problem.meta
    return [
        adjopt.ReducedFunctional(J.matrix, np.ascontiguousarray(meta["rhs"][:, j]),
                                 adjopt.SquaredMisfit(meta["data"][:, j], B=meta["observation_operator"],
                                                      W=meta["misfit_weights"]),
                                 parameter_map=J.map)
        for j in range(N_SOURCES)
    ]


def test_state_has_one_column_per_source(problem):
    J, p = problem.functional, problem.p0
    n_free = problem.meta["dofs"].n_free
    assert n_free == (10 - 1) ** 2
    assert J.state(p).shape == (n_free, N_SOURCES)
    assert problem.meta["data"].shape == (30, N_SOURCES)
    # the columns differ (different source positions)
    U = J.state(p)
    assert np.linalg.matrix_rank(U) == N_SOURCES


def test_multi_column_state_is_one_solve(problem):
    J = problem.functional
    J.reset_stats()
    p = smooth_point(problem) + 0.01  # a point not cached yet
    J.value(p)
    assert J.stats.factorizations == 1
    assert J.stats.total_solves == 1
    assert J.stats.solves["forward"] == 1
    assert J.stats.rhs["forward"] == N_SOURCES


def test_value_and_gradient_equal_the_sum_of_single_source_functionals(problem):
    J = problem.functional
    reg = problem.meta["regularization"]
    singles = single_source_functionals(problem)
    for p in (problem.p0, smooth_point(problem)):
        zero_u = np.zeros(1)
        total = sum(Jj.value(p) for Jj in singles) + reg.value(zero_u, p)
        np.testing.assert_allclose(J.value(p), total, rtol=1e-12)
        g = sum(Jj.gradient(p) for Jj in singles) + reg.grad_p(zero_u, p)
        np.testing.assert_allclose(J.gradient(p), g, rtol=1e-10, atol=1e-14 * np.abs(g).max())
        v = np.cos(3 * problem.meta["mesh"].points[:, 1])
        h = sum(Jj.hessp(p, v) for Jj in singles) + reg.hess_pp(zero_u, p, v)
        np.testing.assert_allclose(J.hessp(p, v), h, rtol=1e-9, atol=1e-13 * np.abs(h).max())


@pytest.mark.parametrize("where", ["p0", "smooth"])
def test_taylor_rates(problem, where):
    J = problem.functional
    p = problem.p0 if where == "p0" else smooth_point(problem)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9


def test_hessian_symmetric(problem):
    assert check_hessian_symmetry(problem.functional, smooth_point(problem)) < 1e-8


def test_regression_values():
    # regression values measured from this implementation (n=10, defaults: 4 sources, 40 obs, seed=0)
    problem = multi_experiment.build(n=10)
    J, p = problem.functional, problem.p0
    np.testing.assert_allclose(J.value(p), 4265.690677630097, rtol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(J.gradient(p)), 5270.064813129694, rtol=1e-8)


def test_gradient_matches_central_differences(problem):
    J = problem.functional
    p = smooth_point(problem)
    g = J.gradient(p)
    rng = np.random.default_rng(7)
    h = 1e-5
    for _ in range(3):
        v = rng.standard_normal(p.size)
        fd = (J.value(p + h * v) - J.value(p - h * v)) / (2 * h)
        np.testing.assert_allclose(g @ v, fd, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(n_sources=0), dict(n=1), dict(n_obs=0), dict(regularization="l2")])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        multi_experiment.build(**{"n": 4, **kwargs})
