"""A singular A(p) is refused by every direct solver, whatever the right-hand side.

The case that used to pass silently: a pure-Neumann Poisson problem (no
Dirichlet condition). Its right-hand side is consistent, so a direct solver
that perturbs or keeps the tiny last pivot returns a "solution" with a small
residual and an arbitrary constant added: J jumped from 29190 to 75292 under
a 1e-10 change of p, the adjoint's relative residual was 73, and the Taylor
test passed.
"""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt.errors import NotPositiveDefiniteError, SingularMatrixError
from adjopt.mesh import rectangle
from adjopt.solvers import installed

DIRECT = [s for s in ("superlu", "cholmod", "pardiso") if s in installed()]
ALL = [*DIRECT, "amg", "auto"]


def neumann_poisson(n=16, solver="superlu"):
    """Poisson with exp(m) conductivity and no Dirichlet condition, a consistent load and a misfit."""
    mesh = rectangle(n, n)
    A = adjopt.ElementCoefficientMatrix(mesh.cells, fem.p1_stiffness(mesh), coefficient="exp")
    b = fem.assemble_vector(mesh.cells, fem.p1_mass(mesh).sum(axis=2), mesh.n_nodes)
    b -= b.mean()  # consistent: orthogonal to the constants, the kernel of A^T
    data = np.sin(mesh.points[:, 0])
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(data), solver=solver)
    return J, np.zeros(A.n_params)


@pytest.mark.parametrize("solver", ALL)
def test_pure_neumann_value_is_refused_naming_the_boundary_condition(solver):
    J, p = neumann_poisson(solver=solver)
    with pytest.raises((SingularMatrixError, NotPositiveDefiniteError), match="Dirichlet"):
        J.value(p)


@pytest.mark.parametrize("solver", ALL)
def test_pure_neumann_gradient_and_taylor_test_are_refused(solver):
    J, p = neumann_poisson(solver=solver)
    with pytest.raises((SingularMatrixError, NotPositiveDefiniteError)):
        J.gradient(p)
    with pytest.raises((SingularMatrixError, NotPositiveDefiniteError)):
        adjopt.taylor_test(J, p, order=2)


def test_the_same_problem_with_one_dirichlet_node_solves():
    # the control: fix one node (drop its row and column) and every check passes
    mesh = rectangle(16, 16)
    conn = np.where(mesh.cells == 0, -1, mesh.cells - 1)
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(mesh), coefficient="exp", n=mesh.n_nodes - 1)
    b = fem.assemble_vector(mesh.cells, fem.p1_mass(mesh).sum(axis=2), mesh.n_nodes)[1:]
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(np.sin(mesh.points[1:, 0])), solver="superlu")
    p = np.zeros(A.n_params)
    assert np.isfinite(J.value(p))
    assert adjopt.taylor_test(J, p, order=2).passed


def _singular_factorization(solver):
    """A factorization of a singular matrix whose probe has been switched off: only the residual checks remain."""
    A = sp.csr_array(sp.diags_array([[-1.0] * 9, [1.0] + [2.0] * 8 + [1.0], [-1.0] * 9], offsets=[-1, 0, 1]))
    A = sp.csr_array(A + 1e-15 * sp.eye_array(10))  # a pure-Neumann 1D Laplacian, singular to working precision
    fac = adjopt.solvers.make_solver(solver)._factorize(A)
    fac.probed = True
    return A, fac


@pytest.mark.parametrize("solver", ["superlu", "pardiso"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kind", ["adjoint", "tangent", "second_adjoint"])
def test_every_solve_kind_checks_its_residual(solver, transpose, kind, monkeypatch):
    if solver not in installed():
        pytest.skip(f"{solver} not installed")
    from adjopt.solvers.pardiso import PardisoFactorization

    monkeypatch.setattr(PardisoFactorization, "_probe_singular", lambda self: None)  # its factorization-time probe
    A, fac = _singular_factorization(solver)
    inconsistent = np.linspace(1.0, 2.0, 10)  # not orthogonal to the constants
    with pytest.raises(SingularMatrixError, match=f"the {kind} solve.*relative residual"):
        fac.solve(inconsistent, transpose=transpose, kind=kind)
    # a consistent right-hand side has a solution: it passes
    consistent = inconsistent - inconsistent.mean()
    x = fac.solve(consistent, transpose=transpose, kind=kind)
    assert np.linalg.norm(A @ x - consistent) <= 1e-6 * np.linalg.norm(consistent)


def test_residual_check_is_per_column():
    A, fac = _singular_factorization("superlu")
    good = np.linspace(-1.0, 1.0, 10)
    bad = 1e-3 * np.ones(10)  # a small but inconsistent column next to a large consistent one
    with pytest.raises(SingularMatrixError, match="relative residual"):
        fac.solve(np.column_stack([100 * good, bad]), kind="forward")


def test_the_probe_runs_once_per_factorization_and_is_not_counted():
    A = sp.csr_array(sp.diags_array([[-1.0] * 9, [2.0] * 10, [-1.0] * 9], offsets=[-1, 0, 1]))
    solver = adjopt.solvers.DirectSolver()
    fac = solver.factorize(A)
    assert not fac.probed
    x = fac.solve(np.ones(10), kind="forward")
    np.testing.assert_allclose(A @ x, np.ones(10), atol=1e-12)
    assert fac.probed
    fac.solve(np.ones((10, 3)), kind="tangent")
    assert solver.stats.rhs == {"forward": 1, "tangent": 3}
    assert solver.stats.solves == {"forward": 1, "tangent": 1}


def test_an_ill_conditioned_but_nonsingular_simp_matrix_is_accepted():
    # SIMP contrast 1e-9: pivots span 10 orders of magnitude, yet A is nonsingular and must pass
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "problems"))
    import topology_compliance

    pb = topology_compliance.build(nelx=30, nely=10)
    J = pb.functional
    p = np.full(J.n_params, 1e-3)
    p[: J.n_params // 2] = 1.0
    for solver in DIRECT:
        J.solver = adjopt.solvers.make_solver(solver)
        J.cache.clear()
        assert np.isfinite(J.value(p)) and np.all(np.isfinite(J.gradient(p)))


def test_amg_refuses_a_singular_system_whatever_its_warm_start():
    # a consistent singular system: CG converges to a solution whose constant came from the warm start
    # (J = 2.21 fresh, 639 after another problem); the coarsest level shows the null space
    n = 50
    conn = np.stack([np.arange(n), np.arange(n) + 1], axis=1)
    K = n * np.array([[1.0, -1.0], [-1.0, 1.0]])
    b = np.zeros(n + 1)
    b[0], b[-1] = 1.0, -1.0
    solver = adjopt.solvers.AMGSolver()
    regular = adjopt.ElementCoefficientMatrix(conn, K, coefficient="exp", n=n + 1, A0=sp.eye_array(n + 1))
    adjopt.ReducedFunctional(regular, np.full(n + 1, 5.0), adjopt.Norm(), solver=solver).value(np.zeros(n))
    A = adjopt.ElementCoefficientMatrix(conn, K, coefficient="exp", n=n + 1)
    for objective in (adjopt.SquaredMisfit(np.zeros(n + 1)), adjopt.Compliance(b)):
        with pytest.raises(SingularMatrixError, match="coarsest multigrid level"):
            adjopt.ReducedFunctional(A, b, objective, solver=solver).value(np.zeros(n))


def test_amg_accepts_simp_at_the_contrast_1e_9():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "problems"))
    import topology_compliance

    pb = topology_compliance.build(nelx=30, nely=10)
    J = pb.functional
    J.solver = adjopt.solvers.make_solver("amg")
    rng = np.random.default_rng(1)
    for p in (np.zeros(J.n_params), (rng.random(J.n_params) < 0.5).astype(float)):
        assert np.isfinite(J.value(p))


def test_amg_refuses_a_zero_diagonal_before_pyamg_prints_about_it(capfd):
    A = sp.csr_array(sp.diags_array([[1.0] * 9, [2.0] * 5 + [0.0] + [2.0] * 4, [1.0] * 9], offsets=[-1, 0, 1]))
    with pytest.raises(SingularMatrixError, match=r"1 zero\(s\) on the diagonal, the first in row 5"):
        adjopt.solvers.AMGSolver().factorize(A)
    assert "zero diagonal" not in capfd.readouterr().out


@pytest.mark.parametrize("solver", DIRECT)
def test_a_solve_gives_the_same_bits_whether_it_comes_first_or_not(solver):
    # the probe is a solve of its own: a user's solve never shares a multi-column call with it
    A = sp.csr_array(sp.diags_array([[-1.0] * 29, [2.5] * 30, [-1.0] * 29], offsets=[-1, 0, 1]))
    rhs = np.random.default_rng(0).standard_normal(30)
    s = adjopt.solvers.make_solver(solver)
    first = s.factorize(A).solve(rhs, kind="tangent")
    fac = s.factorize(A)
    fac.solve(np.ones(30), kind="forward")
    np.testing.assert_array_equal(fac.solve(rhs, kind="tangent"), first)


def test_cholmod_pivots_certify_a_nonsingular_matrix_without_a_probe():
    pytest.importorskip("sksparse.cholmod")
    A = sp.csr_array(sp.diags_array([[-1.0] * 29, [2.5] * 30, [-1.0] * 29], offsets=[-1, 0, 1]))
    assert adjopt.solvers.make_solver("cholmod").factorize(A).probed


def _spd(n=12):
    return sp.csr_array(sp.diags_array([[-1.0] * (n - 1), [2.5] * n, [-1.0] * (n - 1)], offsets=[-1, 0, 1]))


@pytest.mark.parametrize("transpose", [False, True])
def test_cholmod_residual_check_of_a_transposed_solve_uses_a_and_catches_a_wrong_solution(transpose, monkeypatch):
    if "cholmod" not in installed():
        pytest.skip("cholmod not installed")
    from adjopt.solvers.cholmod import CholmodFactorization

    A = _spd()
    fac = adjopt.solvers.make_solver("cholmod").factorize(A)
    assert isinstance(fac, CholmodFactorization) and fac.self_transpose
    rhs = np.linspace(1.0, 2.0, 12)
    x = fac.solve(rhs, transpose=transpose, kind="adjoint")
    np.testing.assert_allclose(A @ x, rhs, rtol=1e-13)
    # the transposed product is never formed: A = A^T for a CHOLMOD factor
    monkeypatch.setattr(type(A), "T", property(lambda self: pytest.fail("A.T was formed")))
    fac.solve(rhs, transpose=True, kind="second_adjoint")
    monkeypatch.undo()
    # a factor that returns a wrong solution is caught, transposed or not
    monkeypatch.setattr(CholmodFactorization, "_solve", lambda self, r, t, k, tol: 1.01 * np.linalg.solve(
        A.toarray(), r))
    with pytest.raises(SingularMatrixError, match="relative residual of 0.01"):
        fac.solve(rhs, transpose=transpose, kind="adjoint")


def test_superlu_residual_check_of_a_transposed_solve_uses_a_transpose():
    # nonsymmetric A: an x with A x = rhs is not the solution of A^T x = rhs, and the check says so
    A = sp.csr_array(np.array([[4.0, 1.0, 0.0], [0.0, 3.0, 2.0], [1.0, 0.0, 5.0]]))
    fac = adjopt.solvers.DirectSolver().factorize(A)
    assert not fac.self_transpose
    rhs = np.array([1.0, 2.0, 3.0])
    xt = fac.solve(rhs, transpose=True, kind="adjoint")
    np.testing.assert_allclose(A.T @ xt, rhs, rtol=1e-14)
    x = np.linalg.solve(A.toarray(), rhs)
    with pytest.raises(SingularMatrixError, match="with A\\^T left a relative residual"):
        fac.check_residual(x, rhs, transpose=True, kind="adjoint")
    fac.check_residual(x, rhs, transpose=False, kind="forward")  # the right check for it passes
    # per column, and the right-hand side is not changed by the in-place residual
    R = np.column_stack([rhs, 2 * rhs])
    R0 = R.copy()
    fac.check_residual(np.linalg.solve(A.toarray().T, R), R, transpose=True)
    np.testing.assert_array_equal(R, R0)
