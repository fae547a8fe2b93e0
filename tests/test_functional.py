"""ReducedFunctional: gradients and Hessian actions against a dense reference and Taylor rates."""

import numpy as np
import pytest
import scipy.optimize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems_random import MixedObjective, callback_case, dense_solution, element_case

import adjopt
from adjopt.verify import check_hessian_symmetry, taylor_test


def _check_against_dense(case, rtol=1e-10):
    U, grad, H = dense_solution(case)
    J, p = case.functional, case.p
    u = J.state(p)
    np.testing.assert_allclose(u.reshape(U.shape), U, rtol=1e-10, atol=1e-12 * np.abs(U).max())
    g = J.gradient(p)
    np.testing.assert_allclose(g, grad, rtol=rtol, atol=rtol * np.abs(grad).max())
    m = p.size
    Hcols = np.column_stack([J.hessp(p, e) for e in np.eye(m)])
    np.testing.assert_allclose(Hcols, H, rtol=rtol, atol=rtol * np.abs(H).max())
    # the Hessian is symmetric to round-off
    np.testing.assert_allclose(Hcols, Hcols.T, rtol=0, atol=1e-10 * np.abs(H).max())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(4, 12),
    n_elem=st.integers(1, 8),
    k_loc=st.integers(2, 4),
    ncols=st.integers(1, 3),
    coefficient=st.sampled_from(["identity", "exp", "simp"]),
    shared=st.booleans(),
)
def test_element_matrix_matches_dense_reference(seed, n, n_elem, k_loc, ncols, coefficient, shared):
    case = element_case(seed, n=n, n_elem=n_elem, k_loc=min(k_loc, n), ncols=ncols, coefficient=coefficient, shared=shared)
    _check_against_dense(case)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(3, 10),
    m=st.integers(1, 5),
    rhs=st.sampled_from(["constant", "affine", "quadratic"]),
    density=st.floats(0.1, 1.0),
    objective=st.sampled_from(["misfit", "misfit+mixed", "norm+mixed"]),
)
def test_callback_matrix_matches_dense_reference(seed, n, m, rhs, density, objective):
    case = callback_case(seed, n=n, m=m, rhs=rhs, density=density, objective=objective)
    _check_against_dense(case)


@pytest.mark.parametrize("rhs", ["affine", "quadratic"])
def test_element_matrix_with_parametric_rhs_matches_dense(rhs):
    _check_against_dense(element_case(3, rhs=rhs, coefficient="simp"))


def test_multicolumn_callback_matches_dense():
    _check_against_dense(callback_case(5, ncols=3))


CASES = {
    "element-exp": lambda: element_case(1, coefficient="exp"),
    "element-simp": lambda: element_case(2, coefficient="simp", shared=True),
    "element-identity-affine-b": lambda: element_case(3, coefficient="identity", rhs="affine"),
    "element-exp-multicolumn": lambda: element_case(4, coefficient="exp", ncols=3),
    "element-simp-symmetric": lambda: element_case(5, coefficient="simp", symmetric=True),
    "callback-quadratic": lambda: callback_case(6),
    "callback-affine-b": lambda: callback_case(7, rhs="affine"),
    "callback-quadratic-b": lambda: callback_case(8, rhs="quadratic", objective="norm+mixed"),
    "callback-multicolumn": lambda: callback_case(9, ncols=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_taylor_rates(name):
    case = CASES[name]()
    J, p = case.functional, case.p
    r2 = taylor_test(J, p, order=2)
    assert r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.rate >= 2.9, r3.table()
    assert check_hessian_symmetry(J, p) < 1e-10


def test_nonsymmetric_matrix_uses_transposed_solves():
    case = element_case(11, coefficient="exp", symmetric=False)
    A = case.functional.matrix.assemble(case.p).toarray()
    assert np.abs(A - A.T).max() > 1e-3  # really nonsymmetric
    _check_against_dense(case)


def test_counters_value_gradient_five_hessp():
    case = element_case(12, coefficient="exp")
    J, p = case.functional, case.p
    J.reset_stats()
    J.value(p)
    J.gradient(p)
    rng = np.random.default_rng(0)
    for _ in range(5):
        J.hessp(p, rng.standard_normal(p.size))
    s = J.stats
    assert s.factorizations == 1
    assert s.total_solves == 12
    assert dict(s.solves) == {"forward": 1, "adjoint": 1, "tangent": 5, "second_adjoint": 5}
    # a new p costs a new factorization; the old one is still cached
    J.value(p + 0.1)
    J.gradient(p)
    assert s.factorizations == 2 and s.solves["adjoint"] == 1


def test_value_and_gradient_and_scipy_triple():
    case = element_case(13, coefficient="exp")
    J, p = case.functional, case.p
    v, g = J.value_and_gradient(p)
    fun, jac, hessp = J.scipy()
    assert fun(p) == v
    np.testing.assert_array_equal(jac(p), g)
    H = J.hessian(p)
    dp = np.ones(p.size)
    np.testing.assert_allclose(H @ dp, hessp(p, dp))
    assert H.shape == (p.size, p.size)
    with pytest.raises(ValueError):
        H.matvec(np.ones(p.size + 1))


def test_scipy_trust_ncg_minimizes_a_misfit():
    # recover the element coefficients from full observations: the minimum is J = 0
    case = element_case(14, n=10, n_elem=5, coefficient="exp", objective="misfit")
    J, p_true = case.functional, case.p
    data = J.state(p_true).copy()
    J2 = adjopt.ReducedFunctional(J.matrix, J.rhs, adjopt.SquaredMisfit(data))
    fun, jac, hessp = J2.scipy()
    res = scipy.optimize.minimize(fun, np.zeros(p_true.size), jac=jac, hessp=hessp, method="trust-ncg",
                                  options=dict(gtol=1e-13))
    assert res.success and res.fun < 1e-20
    np.testing.assert_allclose(res.x, p_true, atol=1e-8)


def test_state_is_read_only_and_p_independent():
    case = element_case(15)
    J, p = case.functional, case.p
    u = J.state(p)
    with pytest.raises(ValueError):
        u[0] = 1.0
    q = p.copy()
    v = J.value(q)
    q[0] += 1.0  # mutating the caller's array must not corrupt the cache
    assert J.value(p) == v


# -- bad input -------------------------------------------------------------------------
def test_wrong_p_shape_and_nonfinite():
    case = element_case(16)
    J, p = case.functional, case.p
    with pytest.raises(adjopt.ShapeError, match=f"length {p.size}"):
        J.value(p[:-1])
    bad = p.copy()
    bad[1] = np.nan
    with pytest.raises(adjopt.NonFiniteError, match="NaN or Inf"):
        J.gradient(bad)
    bad[1] = np.inf
    with pytest.raises(adjopt.NonFiniteError):
        J.hessp(p, bad)


def test_singular_matrix_names_missing_boundary_condition():
    # 1D Laplacian without any Dirichlet condition: singular (pure Neumann)
    n = 6
    conn = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1)
    K = np.array([[1.0, -1.0], [-1.0, 1.0]])
    A = adjopt.ElementCoefficientMatrix(conn, K)
    J = adjopt.ReducedFunctional(A, np.arange(n, dtype=float), adjopt.Norm())
    with pytest.raises(adjopt.SingularMatrixError, match="boundary condition") as exc:
        J.value(np.ones(n - 1))
    assert "Dirichlet" in str(exc.value)


def test_exactly_singular_matrix():
    conn = np.array([[0, 1]])
    A = adjopt.ElementCoefficientMatrix(conn, np.ones((2, 2)))
    J = adjopt.ReducedFunctional(A, np.ones(2), adjopt.Norm())
    with pytest.raises(adjopt.SingularMatrixError, match="singular"):
        J.value(np.array([1.0]))


def test_objective_missing_second_derivative():
    class OnlyGradient(adjopt.Objective):
        def value(self, u, p):
            return float(u.sum())

        def grad_u(self, u, p):
            return np.ones_like(u)

    case = element_case(17)
    J = adjopt.ReducedFunctional(case.functional.matrix, case.functional.rhs, OnlyGradient())
    J.gradient(case.p)
    with pytest.raises(adjopt.MissingDerivativeError, match="hess_uu"):
        J.hessp(case.p, np.ones(case.p.size))


def test_objective_depending_on_p_must_give_grad_p():
    class NoGradP(MixedObjective):
        grad_p = adjopt.Objective.grad_p

    case = element_case(18)
    obj = NoGradP(np.ones(8), np.ones(case.p.size), np.eye(case.p.size))
    J = adjopt.ReducedFunctional(case.functional.matrix, case.functional.rhs, obj)
    with pytest.raises(adjopt.MissingDerivativeError, match="grad_p"):
        J.gradient(case.p)


def test_rhs_and_matrix_mismatch():
    case = element_case(19)
    with pytest.raises(adjopt.PatternError, match="rows"):
        adjopt.ReducedFunctional(case.functional.matrix, np.ones(3), adjopt.Norm())
    with pytest.raises(adjopt.PatternError, match="parameters"):
        adjopt.ReducedFunctional(case.functional.matrix, adjopt.AffineVector(None, np.ones((8, 2))), adjopt.Norm())
    with pytest.raises(TypeError, match="ParametricMatrix"):
        adjopt.ReducedFunctional(np.eye(3), np.ones(3), adjopt.Norm())
    with pytest.raises(TypeError, match="Objective"):
        adjopt.ReducedFunctional(case.functional.matrix, np.ones(8), lambda u: 0.0)


def test_problem_checks_p0_and_bounds():
    case = element_case(20)
    J = case.functional
    pb = adjopt.Problem(J, case.p, bounds=(0.0, 1.0))
    assert pb.bounds[0].shape == case.p.shape
    with pytest.raises(adjopt.ShapeError):
        adjopt.Problem(J, case.p[:2])
    with pytest.raises(ValueError, match="inverted"):
        adjopt.Problem(J, case.p, bounds=(1.0, 0.0))
    with pytest.raises(adjopt.ShapeError, match="bounds"):
        adjopt.Problem(J, case.p, bounds=(np.zeros(2), 1.0))


def test_gauss_newton_hessian_is_the_dense_jacobian_product():
    """H_GN = S^T f_uu S + f_pp with S = du/dp (dense forward sensitivities); no adjoint solve."""
    n, m = 12, 12
    conn = np.stack([np.arange(n) - 1, np.arange(n)], axis=1)
    conn[0, 0] = -1
    K = np.array([[1.0, -1.0], [-1.0, 1.0]]) * n
    A = adjopt.ElementCoefficientMatrix(conn, K, coefficient="exp", n=n)
    rng = np.random.default_rng(0)
    d = rng.standard_normal(n)
    f = adjopt.SquaredMisfit(d) + 0.01 * adjopt.TikhonovL2(np.eye(m))
    J = adjopt.ReducedFunctional(A, np.ones(n), f, solver="superlu")
    p = 0.3 * rng.standard_normal(m)
    Ad = A.assemble(p).toarray()
    u = np.linalg.solve(Ad, np.ones(n))
    S = np.column_stack([-np.linalg.solve(Ad, A.tangent(p, e, u)) for e in np.eye(m)])
    H_gn = S.T @ S + 0.01 * np.eye(m)
    HG = np.column_stack([J.hessp(p, e, gauss_newton=True) for e in np.eye(m)])
    np.testing.assert_allclose(HG, H_gn, rtol=1e-10, atol=1e-12)
    assert J.stats.solves["adjoint"] == 0
    H = np.column_stack([J.hessp(p, e) for e in np.eye(m)])
    assert np.linalg.norm(H - HG) > 1e-6 * np.linalg.norm(H)  # the full Hessian has the lam terms
    assert np.linalg.eigvalsh(0.5 * (HG + HG.T)).min() > 0


# -- a matrix that does not depend on p ------------------------------------------------------------
def _constant_matrix_problem(solver="superlu"):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "problems"))
    import optimal_control

    pb = optimal_control.build(n=12)
    pb.functional.solver = adjopt.solvers.make_solver(solver)
    pb.functional.cache.clear()
    return pb


@pytest.mark.parametrize("solver", ["superlu", "amg"])
def test_a_constant_matrix_is_factorized_once_for_every_p(solver):
    pb = _constant_matrix_problem(solver)
    J = pb.functional
    rng = np.random.default_rng(0)
    points = [pb.p0 + rng.standard_normal(pb.p0.size) for _ in range(6)]
    for p in points:
        J.value(p)
        J.gradient(p)
        J.hessp(p, rng.standard_normal(p.size))
    assert J.stats.factorizations == 1
    assert J.stats.solves["forward"] == 6 and J.stats.solves["adjoint"] == 6
    # the shared factorization gives the same numbers as a fresh functional
    fresh = _constant_matrix_problem(solver).functional
    p = points[3]
    tol = 1e-12 if solver == "superlu" else 1e-7
    np.testing.assert_allclose(J.gradient(p), fresh.gradient(p), rtol=tol, atol=tol * np.abs(fresh.gradient(p)).max())


def test_a_new_solver_on_a_constant_matrix_factorizes_again():
    pb = _constant_matrix_problem()
    J = pb.functional
    J.value(pb.p0)
    J.solver = adjopt.solvers.make_solver("superlu")
    J.value(pb.p0 + 1.0)
    assert J.solver.stats.factorizations == 1  # the new solver made its own, once


def test_the_shared_factorization_is_not_counted_per_cache_entry():
    pb = _constant_matrix_problem()
    J = pb.functional
    J.value(pb.p0)
    one = J.cache.nbytes
    J.value(pb.p0 + 1.0)
    assert J.cache.nbytes == 2 * one
    assert one == 3 * J.state(pb.p0).nbytes  # u, b and lam: the factorization is held once, outside the entries


@pytest.mark.parametrize("tol", [-1.0, 0.0, 1.0, 2.0, float("nan"), "1e-3", True])
def test_a_bad_tolerance_is_refused_even_when_the_adjoint_is_cached(tol):
    case = element_case(0)
    J, p = case.functional, case.p
    J.gradient(p)
    with pytest.raises(ValueError, match="tol must be None"):
        J.gradient(p, tol=tol)
    with pytest.raises(ValueError, match="tol must be None"):
        J.hessp(p, np.ones(p.size), tol=tol)


def test_complex_p_and_dp_are_refused():
    case = element_case(0)
    J, p = case.functional, case.p
    with pytest.raises(TypeError, match="p is complex"):
        J.value(p + 0j)
    with pytest.raises(TypeError, match="dp is complex"):
        J.hessp(p, np.ones(p.size) * (1 + 1j))


def test_cached_state_and_adjoint_cannot_be_made_writable():
    case = element_case(0)
    J, p = case.functional, case.p
    g = J.gradient(p).copy()
    for arr in (J.state(p), J.adjoint(p)):
        with pytest.raises(ValueError):
            arr.flags.writeable = True
        with pytest.raises((ValueError, AttributeError)):  # nor through its base
            arr.base.flags.writeable = True
        with pytest.raises(ValueError):
            arr[0] = 1.0
    np.testing.assert_array_equal(J.gradient(p), g)
