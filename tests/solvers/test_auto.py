"""solver="auto": the choice by size, symmetry and what is installed; make_solver names."""

import logging

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt.errors import MissingBackendError
from adjopt.solvers import AMGSolver, AutoSolver, DirectSolver, auto, installed, make_solver


def laplacian(n=12):
    T = sp.diags_array([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], offsets=[-1, 0, 1])
    Id = sp.eye_array(n)
    return sp.csr_array(sp.kron(T, Id) + sp.kron(Id, T))


def advective(n=12):
    L = laplacian(n)
    S = sp.diags_array([np.ones(n * n - 1), -np.ones(n * n - 1)], offsets=[1, -1])
    return sp.csr_array(L + 0.4 * S)


@pytest.mark.parametrize("matrix, order", [(laplacian, ["cholmod", "pardiso", "superlu"]),
                                           (advective, ["pardiso", "superlu"])])
def test_auto_picks_the_first_installed_backend_and_logs_it(matrix, order, caplog):
    A = matrix()
    s = AutoSolver(small_limit=0)
    with caplog.at_level(logging.INFO, logger="adjopt.solvers.auto"):
        fac = s.factorize(A)
    expected = next(name for name in order if name in installed())
    assert s.name == f"auto:{expected}" and s.chosen.name == expected
    assert f"chose {expected}" in caplog.text
    b = np.arange(A.shape[0], dtype=float)
    np.testing.assert_allclose(A @ fac.solve(b), b, atol=1e-9)
    np.testing.assert_allclose(A.T @ fac.solve(b, transpose=True, kind="adjoint"), b, atol=1e-9)
    s.factorize(A)
    assert s.stats.factorizations == 2 and s.stats.solves["adjoint"] == 1  # one set of counters


def test_auto_without_the_optional_backends_uses_superlu(monkeypatch):
    monkeypatch.setattr(auto, "installed", lambda: ["superlu", "amg"])
    s = AutoSolver(small_limit=0)
    s.factorize(laplacian())
    assert isinstance(s.chosen, DirectSolver)


def test_auto_never_uses_pardiso_for_small_problems(monkeypatch):
    s = AutoSolver()
    s.factorize(laplacian())
    expected = "cholmod" if "cholmod" in installed() else "superlu"  # symmetric: CHOLMOD when installed
    assert s.name == f"auto:{expected}"
    s = AutoSolver()
    s.factorize(advective())  # nonsymmetric: SuperLU, not PARDISO and its MKL start-up
    assert isinstance(s.chosen, DirectSolver) and s.name == "auto:superlu"
    monkeypatch.setattr(auto, "installed", lambda: ["superlu", "pardiso", "amg"])
    s = AutoSolver()
    s.factorize(laplacian())
    assert s.name == "auto:superlu"
    with pytest.raises(ValueError, match="small_limit"):
        AutoSolver(small_limit=1.5)


def test_auto_uses_amg_above_the_direct_limit():
    s = AutoSolver(direct_limit=100, amg_options=dict(tol=1e-9))
    fac = s.factorize(laplacian(12))  # 144 unknowns
    assert isinstance(s.chosen, AMGSolver) and s.chosen.tol["forward"] == 1e-9
    b = np.ones(144)
    assert np.linalg.norm(laplacian(12) @ fac.solve(b, kind="forward") - b) <= 1e-9 * 12
    assert s.stats.iterations["forward"] > 0
    with pytest.raises(ValueError, match="direct_limit"):
        AutoSolver(direct_limit=-1)


def test_auto_falls_back_when_cholesky_refuses_an_indefinite_matrix(caplog):
    pytest.importorskip("sksparse")
    A = sp.csr_array(laplacian() - 1.0 * sp.eye_array(144))  # symmetric, indefinite, nonsingular
    s = AutoSolver(small_limit=0)
    with caplog.at_level(logging.INFO, logger="adjopt.solvers.auto"):
        fac = s.factorize(A)
    assert s.chosen.name != "cholmod" and "refused" in caplog.text
    b = np.ones(144)
    np.testing.assert_allclose(A @ fac.solve(b), b, atol=1e-9)


def test_functional_defaults_to_auto():
    conn = np.array([[0, 1], [1, 2]])
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[2.0, -1.0], [-1.0, 2.0]]))
    J = adjopt.ReducedFunctional(A, np.ones(3), adjopt.Norm())
    assert isinstance(J.solver, AutoSolver)
    J.gradient(np.ones(2))
    assert J.stats.factorizations == 1 and J.stats.solves["adjoint"] == 1
    assert "auto:" in repr(J)


def test_make_solver_names_and_errors(monkeypatch):
    assert isinstance(make_solver(None), AutoSolver) and isinstance(make_solver("auto"), AutoSolver)
    assert isinstance(make_solver("direct"), DirectSolver) and isinstance(make_solver("SuperLU"), DirectSolver)
    s = AMGSolver()
    assert make_solver(s) is s
    with pytest.raises(ValueError, match="known solvers: .*cholmod.*pardiso"):
        make_solver("mumps")
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver(3)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("pypardiso") else real(name, *a))
    with pytest.raises(MissingBackendError, match=r'pip install "adjopt\[pardiso\]"'):
        make_solver("pardiso")


def test_auto_chooses_again_when_cholmod_refuses_a_later_a():
    # A(p) = L + p C: symmetric at p = 0, where "auto" picks CHOLMOD, nonsymmetric elsewhere
    pytest.importorskip("sksparse.cholmod")
    n = 200
    L = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n)).tocsr()
    C = sp.diags_array([-0.5, 0.5], offsets=[-1, 1], shape=(n, n)).tocsr()
    pattern = sp.csr_array(L + C)
    rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
    Ld = np.asarray(L[rows, pattern.indices]).ravel()
    Cd = np.asarray(C[rows, pattern.indices]).ravel()
    A = adjopt.CallbackMatrix(pattern, 1, lambda p: Ld + p[0] * Cd, lambda p: sp.csr_array(Cd[:, None]), affine=True)
    J = adjopt.ReducedFunctional(A, np.ones(n) / n**2, adjopt.SquaredMisfit(np.zeros(n)),
                                 solver=AutoSolver(small_limit=0))
    J.value(np.zeros(1))
    assert J.solver.name == "auto:cholmod"
    fresh = adjopt.ReducedFunctional(A, np.ones(n) / n**2, adjopt.SquaredMisfit(np.zeros(n)), solver="superlu")
    p = np.array([0.1])
    np.testing.assert_allclose(J.value(p), fresh.value(p), rtol=1e-12)
    assert J.solver.name in ("auto:pardiso", "auto:superlu")
