"""DirectSolver: one factorization for A and A^T, counters, singular matrices."""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt.solvers import DirectSolver, is_symmetric, make_solver


def _nonsym(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return sp.random_array((n, n), density=0.1, rng=rng) + 4 * sp.eye_array(n)


def test_forward_and_transposed_solves_share_one_factorization():
    A = _nonsym()
    s = DirectSolver()
    fac = s.factorize(A)
    rng = np.random.default_rng(1)
    b = rng.standard_normal(30)
    B = rng.standard_normal((30, 3))
    np.testing.assert_allclose(A @ fac.solve(b), b, atol=1e-12)
    np.testing.assert_allclose(A.T @ fac.solve(b, transpose=True, kind="adjoint"), b, atol=1e-12)
    np.testing.assert_allclose(A @ fac.solve(B), B, atol=1e-12)
    assert s.stats.factorizations == 1
    assert s.stats.total_solves == 3 and s.stats.solves["adjoint"] == 1
    assert s.stats.rhs["other"] == 4  # 1 + 3 columns
    assert fac.factor_nnz > 0 and fac.nbytes > 0
    assert "1 factorization" in str(s.stats)
    d = s.stats.as_dict()
    assert d["total_solves"] == 3
    s.stats.reset()
    assert s.stats.factorizations == 0 and s.stats.total_solves == 0


def test_symmetry_detection():
    A = _nonsym()
    assert not is_symmetric(A)
    assert is_symmetric(A + A.T)
    assert is_symmetric(sp.eye_array(3))


def test_symmetric_ordering_is_used_for_spd():
    n = 40
    T = sp.diags_array([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], offsets=[-1, 0, 1])
    A = sp.kron(T, sp.eye_array(n)) + sp.kron(sp.eye_array(n), T)
    b = np.ones(n * n)
    sym = DirectSolver().factorize(A)
    gen = DirectSolver(symmetric=False).factorize(A)
    np.testing.assert_allclose(sym.solve(b), gen.solve(b), rtol=1e-10)
    assert sym.factor_nnz <= gen.factor_nnz


def test_bad_inputs():
    s = DirectSolver()
    with pytest.raises(adjopt.ShapeError, match="square"):
        s.factorize(sp.csr_array(np.ones((2, 3))))
    with pytest.raises(adjopt.NonFiniteError):
        s.factorize(sp.csr_array(np.array([[1.0, np.nan], [0.0, 1.0]])))
    fac = s.factorize(sp.eye_array(3))
    with pytest.raises(adjopt.ShapeError, match=r"\(3,\)"):
        fac.solve(np.ones(4))
    with pytest.raises(adjopt.NonFiniteError):
        fac.solve(np.array([1.0, np.inf, 0.0]))
    with pytest.raises(adjopt.SingularMatrixError, match="Dirichlet"):
        s.factorize(sp.csr_array(np.array([[1.0, 1.0], [1.0, 1.0]])))


def test_make_solver():
    assert isinstance(make_solver("superlu"), DirectSolver)
    s = DirectSolver()
    assert make_solver(s) is s
    with pytest.raises(ValueError, match="known solvers"):
        make_solver("mumps")
