"""EigenvalueFunctional: sums of inverse lowest eigenvalues of K(p) phi = lambda M(p) phi and their gradients."""

import numpy as np
import pytest
import scipy.linalg as sla

import adjopt
from adjopt.eigen import EigenvalueFunctional, RepeatedEigenvalueError
from adjopt.maps import DensityFilter
from adjopt.verify import taylor_test


def _chain(n=12):
    """A fixed-free chain of n springs and n masses: K(p) = sum_e p_e^3 k_e, M(p) = sum_e (0.1 + p_e) m_e."""
    conn = np.column_stack([np.arange(n) - 1, np.arange(n)])  # element e joins nodes e - 1 and e (node -1 fixed)
    keep = conn >= 0
    K = adjopt.ElementCoefficientMatrix(np.where(keep, conn, n), np.array([[1.0, -1.0], [-1.0, 1.0]]),
                                        adjopt.SIMP(q=3.0, emin=1e-3), n=n + 1)
    M = adjopt.ElementCoefficientMatrix(np.where(keep, conn, n), np.array([[1 / 3, 1 / 6], [1 / 6, 1 / 3]]),
                                        adjopt.SIMP(q=1.0, emin=0.1), n=n + 1)
    return K, M


class Restricted:
    """A ParametricMatrix restricted to its first n rows and columns (drops the fixed node)."""

    def __init__(self, A, n):
        self.A, self.n = A, n
        self.shape = (n, n)
        self.n_params = A.n_params

    def assemble(self, p):
        return self.A.assemble(p)[: self.n, : self.n].tocsr()

    def contract(self, p, w, z):
        pad = ((0, 1),) + ((0, 0),) * (np.ndim(w) - 1)
        return self.A.contract(p, np.pad(w, pad), np.pad(z, pad))


def _problem(k=1):
    K, M = _chain()
    return EigenvalueFunctional(Restricted(K, 12), Restricted(M, 12), k=k, solver="superlu")


def _dense_eigs(F, p):
    K = F.K.assemble(p).toarray()
    M = F.M.assemble(p).toarray()
    return sla.eigh(K, M, eigvals_only=True)


@pytest.mark.parametrize("k", [1, 3])
def test_value_matches_dense_and_gradient_matches_finite_differences_of_eigsh(k):
    F = _problem(k)
    p = np.linspace(0.4, 0.9, 12)
    lam = _dense_eigs(F, p)
    np.testing.assert_allclose(F.eigenvalues(p), lam[: k + 1], rtol=1e-10)
    np.testing.assert_allclose(F.value(p), np.sum(1 / lam[:k]), rtol=1e-10)
    g = F.gradient(p)
    h = 1e-5
    for i in (0, 5, 11):
        e = np.zeros(12)
        e[i] = h
        # central differences of scipy's eigsh (what value() calls) and of the dense eigh
        fd = (F.value(p + e) - F.value(p - e)) / (2 * h)
        np.testing.assert_allclose(g[i], fd, rtol=2e-6)
        fd_dense = (np.sum(1 / _dense_eigs(F, p + e)[:k]) - np.sum(1 / _dense_eigs(F, p - e)[:k])) / (2 * h)
        np.testing.assert_allclose(g[i], fd_dense, rtol=2e-6)
    r = taylor_test(F, p, order=2)
    assert r.rate >= 1.9, r.table()


def test_modes_are_mass_normalized_and_the_state_is_the_first():
    F = _problem(2)
    p = np.linspace(0.3, 1.0, 12)
    phi = F.modes(p)
    M = F.M.assemble(p).toarray()
    np.testing.assert_allclose(phi.T @ M @ phi, np.eye(3), atol=1e-10)
    np.testing.assert_array_equal(F.state(p), phi[:, 0])


def test_a_repeated_eigenvalue_is_refused():
    n = 6
    conn = np.arange(n)[:, None]
    K = adjopt.ElementCoefficientMatrix(conn, [[1.0]], "identity", n=n)
    M = adjopt.ElementCoefficientMatrix(conn, [[1e-12]], "identity", n=n, A0=np.eye(n))
    F = EigenvalueFunctional(K, M, k=1, solver="superlu")
    assert F.value(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])) == pytest.approx(1.0, rel=1e-10)
    with pytest.raises(RepeatedEigenvalueError, match="eigenvalues 1 and 2 coincide"):
        F.value(np.array([2.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    # the (k + 1)-th eigenvalue is checked too: a gap at k is what makes the sum differentiable
    with pytest.raises(RepeatedEigenvalueError, match="eigenvalues 2 and 3 coincide"):
        EigenvalueFunctional(K, M, k=2, solver="superlu").value(np.array([1.0, 3.0, 3.0, 4.0, 5.0, 6.0]))


def test_through_a_map_and_errors():
    K, M = _chain()
    Kr, Mr = Restricted(K, 12), Restricted(M, 12)
    centers = np.column_stack([np.arange(12) + 0.5, np.zeros(12)])
    F = EigenvalueFunctional(Kr, Mr, k=2, parameter_map=DensityFilter(centers, 2.5), solver="superlu")
    r = taylor_test(F, np.linspace(0.3, 0.8, 12), order=2)
    assert r.rate >= 1.9, r.table()
    with pytest.raises(NotImplementedError, match="no Hessian actions"):
        F.hessp(np.full(12, 0.5), np.ones(12))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, n - 2\]"):
        EigenvalueFunctional(Kr, Mr, k=11)
    with pytest.raises(ValueError, match="gap must be"):
        EigenvalueFunctional(Kr, Mr, gap=1.0)
    with pytest.raises(adjopt.ShapeError, match="square of one shape"):
        EigenvalueFunctional(Kr, Restricted(M, 11))
    with pytest.raises(adjopt.ShapeError, match="the parameter map gives 5"):
        EigenvalueFunctional(Kr, Mr, parameter_map=DensityFilter(centers[:5], 2.0))
    with pytest.raises(adjopt.ShapeError):
        F.value(np.ones(11))


def test_cache_and_forget():
    F = _problem(1)
    p = np.full(12, 0.5)
    F.value(p)
    n = F.stats.factorizations
    F.gradient(p)
    assert F.stats.factorizations == n  # the eigenpairs of the last p are kept
    F.forget()
    F.value(p)
    assert F.stats.factorizations == n + 1


def test_a_matrix_that_is_not_positive_definite_is_refused():
    n = 6
    conn = np.arange(n)[:, None]
    K = adjopt.ElementCoefficientMatrix(conn, [[1.0]], "identity", n=n)
    M = adjopt.ElementCoefficientMatrix(conn, [[1e-12]], "identity", n=n, A0=np.eye(n))
    F = EigenvalueFunctional(K, M, k=1, solver="superlu")
    with pytest.raises(adjopt.AdjoptError, match="are not positive: K\\(p\\) is not positive definite"):
        F.value(np.array([-1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
