"""CallbackMatrix and CallbackVector: user-supplied A(p), b(p) and their checks."""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt


def _tridiag(n):
    return sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1], format="csr")


def _matrix(n=5, second=None, affine=False):
    P = _tridiag(n)
    rows = np.repeat(np.arange(n), np.diff(P.indptr))
    cols = P.indices
    diag = rows == cols
    # A(p) = 3 I + p0 * offdiag + p1^2 * I
    return adjopt.CallbackMatrix(
        P, 2,
        values=lambda p: np.where(diag, 3.0 + p[1] ** 2, p[0]),
        jacobian=lambda p: sp.csr_array(np.stack([np.where(diag, 0.0, 1.0), np.where(diag, 2 * p[1], 0.0)], axis=1)),
        second=second, affine=affine,
    ), rows, cols


def test_contract_and_tangent_match_dense():
    n = 5
    A, rows, cols = _matrix(n)
    rng = np.random.default_rng(0)
    p, dp = rng.standard_normal((2, 2))
    w, z = rng.standard_normal((2, n))
    dA0 = np.zeros((n, n))
    dA0[rows, cols] = np.where(rows == cols, 0.0, 1.0)
    dA1 = 2 * p[1] * np.eye(n)
    np.testing.assert_allclose(A.contract(p, w, z), [w @ dA0 @ z, w @ dA1 @ z])
    np.testing.assert_allclose(A.tangent(p, dp, z), (dp[0] * dA0 + dp[1] * dA1) @ z)
    np.testing.assert_allclose(A.tangent_transpose(p, dp, w), (dp[0] * dA0 + dp[1] * dA1).T @ w)
    np.testing.assert_allclose(A.assemble(p).toarray(), 3 * np.eye(n) + p[1] ** 2 * np.eye(n) + p[0] * (dA0))


def test_pattern_given_as_tuple():
    P = _tridiag(4)
    A = adjopt.CallbackMatrix((P.indptr, P.indices, P.shape), 1, values=lambda p: np.ones(P.nnz),
                              jacobian=lambda p: np.zeros((P.nnz, 1)), affine=True)
    assert A.nnz == P.nnz and A.affine


def test_missing_second_term_is_an_error_until_declared():
    A, _, _ = _matrix()
    J = adjopt.ReducedFunctional(A, np.ones(5), adjopt.Norm())
    p = np.array([0.1, 0.2])
    J.gradient(p)
    with pytest.raises(adjopt.MissingDerivativeError, match="affine=True"):
        J.hessp(p, np.ones(2))


def test_values_and_jacobian_shapes_are_checked():
    P = _tridiag(4)
    bad_values = adjopt.CallbackMatrix(P, 1, values=lambda p: np.ones(3), jacobian=lambda p: np.zeros((P.nnz, 1)))
    with pytest.raises(adjopt.PatternError, match=f"nnz={P.nnz}"):
        bad_values.assemble(np.zeros(1))
    bad_jac = adjopt.CallbackMatrix(P, 1, values=lambda p: np.ones(P.nnz), jacobian=lambda p: np.zeros((P.nnz, 2)))
    with pytest.raises(adjopt.PatternError, match=r"\(nnz, m\)"):
        bad_jac.contract(np.zeros(1), np.ones(4), np.ones(4))
    bad_second = adjopt.CallbackMatrix(P, 1, values=lambda p: np.ones(P.nnz), jacobian=lambda p: np.zeros((P.nnz, 1)),
                                       second=lambda p, w, z, dp: np.zeros(3))
    with pytest.raises(adjopt.PatternError, match="second"):
        bad_second.second(np.zeros(1), np.ones(4), np.ones(4), np.ones(1))
    with pytest.raises(adjopt.PatternError, match="square"):
        adjopt.CallbackMatrix(sp.csr_array(np.ones((2, 3))), 1, values=None, jacobian=None)


def test_callback_vector_checks():
    b = adjopt.CallbackVector(3, 2, value=lambda p: np.ones(2), jacobian=lambda p: np.ones((3, 3)))
    with pytest.raises(adjopt.PatternError, match=r"shape \(3,\)"):
        b.value(np.zeros(2))
    with pytest.raises(adjopt.PatternError, match=r"\(3, 2\)"):
        b.jvp(np.zeros(2), np.ones(2))
    with pytest.raises(adjopt.MissingDerivativeError, match="second"):
        b.second(np.zeros(2), np.ones(3), np.ones(2))
    affine = adjopt.CallbackVector(3, 2, value=lambda p: np.ones(3), jacobian=lambda p: np.ones((3, 2)), affine=True)
    np.testing.assert_array_equal(affine.second(np.zeros(2), np.ones(3), np.ones(2)), np.zeros(2))


def test_constant_matrix_has_zero_derivatives():
    A = adjopt.ConstantMatrix(_tridiag(4) + 2 * sp.eye_array(4), n_params=3)
    p, w = np.ones(3), np.arange(4.0)
    np.testing.assert_array_equal(A.assemble(p).toarray(), (_tridiag(4) + 2 * sp.eye_array(4)).toarray())
    np.testing.assert_array_equal(A.contract(p, w, w), np.zeros(3))
    np.testing.assert_array_equal(A.tangent(p, p, w), np.zeros(4))
    np.testing.assert_array_equal(A.second(p, w, w, p), np.zeros(3))
    with pytest.raises(adjopt.ShapeError, match="length 3"):
        A.values(np.ones(2))
    with pytest.raises(adjopt.PatternError, match="square"):
        adjopt.ConstantMatrix(np.ones((2, 3)), 1)
