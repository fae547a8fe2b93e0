"""Hessian actions on a symmetric A(p) pair their operator calls: one two-column tangent for (dA.drho) u and
(dA.drho) lam, one two-column contraction for C(dl, u) + C(lam, du); the results are those of the dense
reference and of the unpaired path."""

import numpy as np
import pytest
from problems_random import dense_solution, element_case

import adjopt
from adjopt.operators import ElementCoefficientMatrix


def _counting(J, monkeypatch):
    """Count the calls of the matrix's tangent, tangent_transpose and contract, with their column counts."""
    calls = {"tangent": [], "tangent_transpose": [], "contract": []}
    M = J.matrix
    for name in calls:
        original = getattr(M, name)

        def wrapped(*args, _name=name, _original=original):
            calls[_name].append(args[-1].size // args[-1].shape[0])  # columns of the last argument
            return _original(*args)

        monkeypatch.setattr(M, name, wrapped)
    return calls


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("coefficient", ["exp", "simp", "identity"])
@pytest.mark.parametrize(("ncols", "rhs"), [(1, "constant"), (3, "constant"), (1, "affine")])
def test_symmetric_element_matrix_matches_the_dense_hessian(seed, coefficient, ncols, rhs):
    case = element_case(seed, n=9, n_elem=7, k_loc=3, ncols=ncols, coefficient=coefficient, symmetric=True, rhs=rhs)
    J, p = case.functional, case.p
    assert J.matrix.symmetric
    _, grad, H = dense_solution(case)
    np.testing.assert_allclose(J.gradient(p), grad, rtol=1e-10, atol=1e-10 * np.abs(grad).max())
    Hcols = np.column_stack([J.hessp(p, e) for e in np.eye(p.size)])
    np.testing.assert_allclose(Hcols, H, rtol=1e-10, atol=1e-10 * np.abs(H).max())


@pytest.mark.parametrize("ncols", [1, 2])
def test_paired_calls_and_the_unpaired_path_agree(ncols, monkeypatch):
    case = element_case(4, n=10, n_elem=8, k_loc=3, ncols=ncols, coefficient="exp", symmetric=True)
    J, p = case.functional, case.p
    dp = np.random.default_rng(5).standard_normal(p.size)
    J.gradient(p)
    calls = _counting(J, monkeypatch)
    h = J.hessp(p, dp)
    # one tangent of 2 x ncols columns (u and lam), no transposed tangent, one contraction of 2 x ncols columns
    assert calls == {"tangent": [2 * ncols], "tangent_transpose": [], "contract": [2 * ncols]}
    # the same functional with the matrix declared nonsymmetric takes the unpaired tangents (the contraction
    # pairs whatever the symmetry): same Hessian action
    monkeypatch.undo()
    J.matrix.symmetric = False
    try:
        calls = _counting(J, monkeypatch)
        h_ref = J.hessp(p, dp)
        assert calls == {"tangent": [ncols], "tangent_transpose": [ncols], "contract": [2 * ncols]}
    finally:
        J.matrix.symmetric = True
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-13 * np.abs(h_ref).max())



def test_gauss_newton_is_not_paired(monkeypatch):
    case = element_case(6, n=10, n_elem=8, k_loc=3, coefficient="exp", symmetric=True)
    J, p = case.functional, case.p
    calls = _counting(J, monkeypatch)
    J.hessp(p, np.ones(p.size), gauss_newton=True)
    assert calls == {"tangent": [1], "tangent_transpose": [], "contract": [1]}  # no lam: nothing to pair


def test_self_adjoint_hessp_contracts_once_and_matches_the_general_path(monkeypatch):
    # compliance l^T u with b = l on a symmetric A: lam = u, dl = du, so C(dl, u) + C(lam, du) = 2 C(du, u)
    rng = np.random.default_rng(7)
    n, n_elem = 12, 10
    conn = np.stack([rng.choice(n, size=3, replace=False) for _ in range(n_elem)])
    K = rng.standard_normal((n_elem, 3, 3))
    K = K @ np.transpose(K, (0, 2, 1))
    A = ElementCoefficientMatrix(conn, K, coefficient="simp", n=n, A0=n * np.eye(n))
    load = rng.standard_normal(n)
    fast = adjopt.ReducedFunctional(A, load, adjopt.Compliance(load), solver="superlu")
    general = adjopt.ReducedFunctional(A, load, adjopt.Compliance(load), solver="superlu", self_adjoint=False)
    assert fast.self_adjoint and not general.self_adjoint
    p, dp = rng.uniform(0.3, 1.0, n_elem), rng.standard_normal(n_elem)
    fast.gradient(p)
    calls = _counting(fast, monkeypatch)
    h = fast.hessp(p, dp)
    assert calls == {"tangent": [1], "tangent_transpose": [], "contract": [1]}
    h_ref = general.hessp(p, dp)
    np.testing.assert_allclose(h, h_ref, rtol=1e-11, atol=1e-12 * np.abs(h_ref).max())
    # and the finite difference of the gradient
    eps = 1e-6
    fd = (general.gradient(p + eps * dp) - general.gradient(p - eps * dp)) / (2 * eps)
    np.testing.assert_allclose(h, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())
