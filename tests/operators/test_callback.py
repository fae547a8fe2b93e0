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
    with pytest.raises(adjopt.PatternError, match=f"the pattern has {P.nnz} entries"):
        bad_values.assemble(np.zeros(1))
    bad_jac = adjopt.CallbackMatrix(P, 1, values=lambda p: np.ones(P.nnz), jacobian=lambda p: np.zeros((P.nnz, 2)))
    with pytest.raises(adjopt.PatternError, match=r"\(nnz, m\)"):
        bad_jac.contract(np.zeros(1), np.ones(4), np.ones(4))
    bad_second = adjopt.CallbackMatrix(P, 1, values=lambda p: np.ones(P.nnz), jacobian=lambda p: np.zeros((P.nnz, 1)),
                                       second=lambda p, w, z, dp: np.zeros(3))
    with pytest.raises(adjopt.PatternError, match="second"):
        bad_second.second(np.zeros(1), np.ones(4), np.ones(4), np.ones(1))
    with pytest.raises(adjopt.PatternError, match="square"):
        adjopt.CallbackMatrix(sp.csr_array(np.ones((2, 3))), 1, values=lambda p: None, jacobian=lambda p: None)


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


# -- the caller's entry order ------------------------------------------------------------------
def _unsorted_5x5():
    """A 5 x 5 CSR matrix with unsorted column indices in every row and one duplicate entry."""
    rows = [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    cols = [1, 0, 2, 0, 1, 3, 2, 2, 3, 4, 3, 4]  # row 4 stores (4, 4) twice
    indptr = np.array([0, 2, 5, 7, 9, 12])
    P = sp.csr_array((np.arange(1.0, 13.0), np.array(cols), indptr), shape=(5, 5))
    assert not P.has_sorted_indices
    return P, np.array(rows), np.array(cols)


def _dense_from_entries(rows, cols, vals, n=5):
    D = np.zeros((n, n))
    np.add.at(D, (rows, cols), vals)
    return D


@pytest.mark.parametrize("fmt", ["csr", "tuple", "coo", "csc"])
def test_values_in_the_callers_order_assemble_the_callers_matrix(fmt):
    P, rows, cols = _unsorted_5x5()
    if fmt == "csr":
        pattern, r, c = P, rows, cols
    elif fmt == "tuple":
        pattern, r, c = (P.indptr, P.indices, P.shape), rows, cols
    elif fmt == "coo":
        perm = np.random.default_rng(3).permutation(rows.size)
        r, c = rows[perm], cols[perm]
        pattern = sp.coo_array((np.ones(r.size), (r, c)), shape=(5, 5))
    else:
        C = sp.csc_array(sp.coo_array((np.ones(rows.size), (rows, cols)), shape=(5, 5)))  # sums the duplicate
        pattern = C
        c = np.repeat(np.arange(5), np.diff(C.indptr))
        r = C.indices
    vals = lambda p: p[0] * np.arange(1.0, r.size + 1) + 10.0 * (r == c)  # noqa: E731
    jac = lambda p: np.arange(1.0, r.size + 1)[:, None]  # noqa: E731
    A = adjopt.CallbackMatrix(pattern, 1, vals, jac, affine=True)
    p = np.array([0.7])
    want = _dense_from_entries(r, c, vals(p))
    np.testing.assert_allclose(A.assemble(p).toarray(), want, rtol=0, atol=1e-14)
    # the derivatives map the same way: contract against the dense dA/dp
    rng = np.random.default_rng(0)
    w, z = rng.standard_normal(5), rng.standard_normal(5)
    dA = _dense_from_entries(r, c, np.arange(1.0, r.size + 1))
    np.testing.assert_allclose(A.contract(p, w, z), [w @ dA @ z], rtol=1e-13)
    np.testing.assert_allclose(A.tangent(p, np.array([0.3]), z), 0.3 * dA @ z, rtol=1e-13)


def test_the_callers_pattern_is_neither_sorted_nor_kept():
    P, rows, cols = _unsorted_5x5()
    before = (P.indptr.copy(), P.indices.copy(), P.data.copy())
    A = adjopt.CallbackMatrix(P, 1, lambda p: np.ones(12), lambda p: np.ones((12, 1)), affine=True)
    for a, b in zip(before, (P.indptr, P.indices, P.data)):
        np.testing.assert_array_equal(a, b)
    assert not P.has_sorted_indices
    P.indices[:] = 0  # the caller reuses its matrix: adjopt's pattern does not change
    assert A.assemble(np.zeros(1)).toarray()[0, 1] == 1.0


def test_a_reused_values_buffer_does_not_change_the_assembled_matrix():
    P = _tridiag(4)
    buf = np.empty(P.nnz)

    def values(p):
        buf[:] = p[0]
        return buf

    A = adjopt.CallbackMatrix(P, 1, values, lambda p: np.ones((P.nnz, 1)), affine=True)
    M = A.assemble(np.array([2.0]))
    A.assemble(np.array([5.0]))  # the callback writes 5 into the same buffer
    assert np.all(M.data == 2.0)


@pytest.mark.parametrize("bad", [-1, 0, 1.5, True, "3", None])
def test_n_params_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="n_params must be a positive integer"):
        adjopt.CallbackMatrix(_tridiag(3), bad, lambda p: np.ones(7), lambda p: np.ones((7, 1)))


def test_callbacks_must_be_callable():
    with pytest.raises(TypeError, match="values must be a callable"):
        adjopt.CallbackMatrix(_tridiag(3), 1, np.ones(7), lambda p: np.ones((7, 1)))


def test_a_bad_pattern_tuple_is_refused():
    with pytest.raises(adjopt.PatternError, match="indptr"):
        adjopt.CallbackMatrix((np.array([0, 2, 1]), np.array([0, 1]), (2, 2)), 1, lambda p: 0, lambda p: 0)
    with pytest.raises(adjopt.PatternError, match="column indices outside"):
        adjopt.CallbackMatrix((np.array([0, 1, 2]), np.array([0, 5]), (2, 2)), 1, lambda p: 0, lambda p: 0)


def test_complex_or_non_finite_values_are_refused():
    P = _tridiag(3)
    A = adjopt.CallbackMatrix(P, 1, lambda p: np.ones(P.nnz) * 1j, lambda p: np.ones((P.nnz, 1)), affine=True)
    with pytest.raises(TypeError, match="complex"):
        A.assemble(np.zeros(1))
    A = adjopt.CallbackMatrix(P, 1, lambda p: np.full(P.nnz, np.nan), lambda p: np.ones((P.nnz, 1)), affine=True)
    with pytest.raises(adjopt.NonFiniteError, match="values"):
        A.assemble(np.zeros(1))


def test_constant_matrix_copies_the_callers_matrix():
    M = sp.csr_array(np.array([[2.0, 1.0], [0.0, 3.0]]))
    A = adjopt.ConstantMatrix(M, 1)
    M.data[:] = 99.0
    np.testing.assert_array_equal(A.assemble(np.zeros(1)).toarray(), [[2.0, 1.0], [0.0, 3.0]])
