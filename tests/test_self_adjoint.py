"""The self-adjoint shortcut (compliance, constant load, symmetric A): lam = u, dl = du, fewer solves,
the same derivatives as the general path."""

import os
import sys

import numpy as np
import pytest

import adjopt
from adjopt.verify import taylor_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import poisson_inversion  # noqa: E402
import topology_compliance as tc  # noqa: E402


def _pair(**kw):
    """(shortcut, general) functionals of the same small MBB problem."""
    fast = tc.build("mbb", 12, 4, **kw).functional
    general = tc.build("mbb", 12, 4, **kw).functional
    general.self_adjoint = False
    return fast, general


def _design(n, seed=3):
    return np.random.default_rng(seed).uniform(0.2, 0.9, n)


@pytest.mark.parametrize("filter", [True, False])
def test_gradient_and_hessp_match_the_general_path(filter):
    fast, general = _pair(filter=filter)
    assert fast.self_adjoint and not general.self_adjoint
    p = _design(fast.n_params)
    dp = np.random.default_rng(4).standard_normal(p.size)
    assert fast.value(p) == pytest.approx(general.value(p), rel=1e-14)
    g1, g2 = fast.gradient(p), general.gradient(p)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-12 * np.abs(g2).max())
    h1, h2 = fast.hessp(p, dp), general.hessp(p, dp)
    np.testing.assert_allclose(h1, h2, rtol=1e-9, atol=1e-10 * np.abs(h2).max())


def test_no_adjoint_or_second_adjoint_solves():
    fast, general = _pair()
    p = _design(fast.n_params)
    for J in (fast, general):
        J.reset_stats()
        J.gradient(p)
        J.hessp(p, np.ones(p.size))
    assert fast.stats.solves["adjoint"] == 0 and fast.stats.solves["second_adjoint"] == 0
    assert fast.stats.solves["forward"] == 1 and fast.stats.solves["tangent"] == 1
    assert general.stats.solves["adjoint"] == 1 and general.stats.solves["second_adjoint"] == 1


def test_taylor_rates_with_the_shortcut():
    J = tc.build("mbb", 12, 4).functional
    assert J.self_adjoint
    p = _design(J.n_params)
    assert taylor_test(J, p, order=2).passed
    assert taylor_test(J, p, order=3).passed


def test_not_detected_for_a_misfit_objective():
    J = poisson_inversion.build(n=6).functional
    assert not J.self_adjoint


def test_not_detected_for_a_nonsymmetric_matrix():
    conn = np.array([[0, 1], [1, 2]])
    K = np.array([[2.0, -1.0], [-0.5, 1.0]])
    A = adjopt.ElementCoefficientMatrix(conn, K, A0=np.eye(3))
    assert not A.symmetric
    b = np.array([1.0, 0.0, 1.0])
    J = adjopt.ReducedFunctional(A, b, adjopt.Compliance(b))
    assert not J.self_adjoint
    with pytest.raises(ValueError, match="self_adjoint=True"):
        adjopt.ReducedFunctional(A, b, adjopt.Compliance(b), self_adjoint=True)


def test_not_detected_when_the_load_differs_from_b():
    conn = np.array([[0, 1], [1, 2]])
    K = np.array([[1.0, -1.0], [-1.0, 1.0]])
    A = adjopt.ElementCoefficientMatrix(conn, K, A0=np.eye(3))
    assert A.symmetric
    b = np.array([1.0, 0.0, 1.0])
    assert adjopt.ReducedFunctional(A, b, adjopt.Compliance(b)).self_adjoint
    J = adjopt.ReducedFunctional(A, b, adjopt.Compliance(2 * b))
    assert not J.self_adjoint
    p = np.array([0.5, 2.0])
    # the general path is taken and is right: J = 2 b^T u, grad = -2 C(u, u) (lam = 2 u)
    u = J.state(p)
    np.testing.assert_allclose(J.gradient(p), -2 * A.contract(p, u.copy(), u.copy()), rtol=1e-12)


def test_bad_self_adjoint_option():
    conn = np.array([[0, 1], [1, 2]])
    K = np.array([[1.0, -1.0], [-1.0, 1.0]])
    A = adjopt.ElementCoefficientMatrix(conn, K, A0=np.eye(3))
    b = np.ones(3)
    with pytest.raises(ValueError, match="self_adjoint must be"):
        adjopt.ReducedFunctional(A, b, adjopt.Compliance(b), self_adjoint="yes")
