"""GMGSolver: element-wise Galerkin = P^T A P, solves against direct ones on contrasted SIMP designs,
iteration counts on an optimized MBB design, warm starts, bad input, and an OC run through
topology_compliance.build(solver="gmg")."""

import logging
import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import adjopt
from adjopt.errors import ConvergenceWarning, ShapeError, SolverDidNotConverge
from adjopt.solvers import GMGSolver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import topology_compliance as tc  # noqa: E402


# -- helpers ---------------------------------------------------------------------------------------------
def interpolation(shape, dim):
    """Full-dof bilinear / trilinear interpolation from the grid with half the elements, built independently."""
    def one_d(nc):
        P = np.zeros((2 * nc + 1, nc + 1))
        for i in range(nc + 1):
            P[2 * i, i] = 1.0
        for i in range(nc):
            P[2 * i + 1, [i, i + 1]] = 0.5
        return sp.csr_array(P)

    P = one_d(shape[0] // 2)
    for n in shape[1:]:
        P = sp.kron(one_d(n // 2), P)  # x fastest: the x factor is the innermost
    return sp.csr_array(sp.kron(P, sp.eye_array(dim)))


def coarse_fixed(shape, dim, fixed_mask):
    """Coarse dofs fixed where the fine node under the coarse node is fixed (same rule as the solver)."""
    P = interpolation(shape, dim)
    # the fine dof of coarse dof j is the row of P with a single entry 1 in column j
    P = P.tocsc()
    out = np.zeros(P.shape[1], dtype=bool)
    for j in range(P.shape[1]):
        rows = P.indices[P.indptr[j]:P.indptr[j + 1]]
        vals = P.data[P.indptr[j]:P.indptr[j + 1]]
        out[j] = fixed_mask[rows[vals == 1.0][0]]
    return out


def simp_design(n, seed=0):
    """A random 0/1 design; through the density filter of the problem (rmin 1.5) E spans 1e-9 .. 1.

    Unfiltered random 0/1 designs are no test: their solid islands and corner hinges are
    mechanisms with stiffness emin, and even a direct solve leaves a residual of 1e-5 there.
    """
    return (np.random.default_rng(seed).uniform(size=n) > 0.45).astype(float)


def solver_for(problem, **options):
    m = problem.meta
    shape = (m["nelx"], m["nely"]) if m["nelz"] is None else (m["nelx"], m["nely"], m["nelz"])
    dim = len(shape)
    return GMGSolver(shape, dim, m["dofmap"].fixed, **options)


def system(problem, p):
    J = problem.functional
    rho = p if J.map is None else J.map.forward(p)
    return J.matrix, rho, J.matrix.assemble(rho), J.rhs.value(rho)


@pytest.fixture(scope="module")
def mbb_designs():
    """Intermediate MBB designs: OC iterations 25 and 26 at 120 x 40 with a direct solver."""
    problem = tc.build("mbb", 120, 40, solver="superlu")
    xs = {}
    res = adjopt.minimize(problem, method="oc", maxiter=26, xtol=0.0, gtol=0.0,
                          callback=lambda entry: xs.__setitem__(entry["nit"], entry["x"]))
    assert res.fun < 0.5 * problem.functional.value(problem.p0)
    x25, x26 = xs[25], xs[26]
    assert np.mean(x25 > 0.9) > 0.2 and np.mean(x25 < 0.1) > 0.3  # members and holes, not the uniform start
    assert 0 < np.abs(x26 - x25).max() <= 0.2 + 1e-12  # one OC step (move limit 0.2)
    return x25.reshape(40, 120), x26.reshape(40, 120)


def upsample(x, f):
    return np.kron(x, np.ones((f, f))).ravel()


# -- Galerkin coarse operators ---------------------------------------------------------------------------
@pytest.mark.parametrize("case,size,per_element", [("mbb", (16, 8, None), False), ("mbb", (16, 8, None), True),
                                                   ("cantilever3d", (8, 4, 4), False)])
def test_coarse_operators_equal_sparse_galerkin_products(case, size, per_element):
    problem = tc.build(case, *size, emin=1e-9, solver="superlu")
    M, rho, A, _ = system(problem, simp_design(problem.p0.size, seed=3))
    if per_element:  # the same matrix from one local matrix per element: the generic Galerkin kernel on level 1
        k = M.local.shape[1]
        n = int(np.sqrt(k))
        M = adjopt.ElementCoefficientMatrix(M.conn, np.repeat(M.local.reshape(1, n, n), M.n_params, axis=0),
                                            M.coefficient, n=M.shape[0])
    s = solver_for(problem, coarse_dofs=1)
    shape = tuple(v for v in size if v is not None)
    dim = len(shape)
    expected = {2: [(16, 8), (8, 4), (4, 2), (2, 1)], 3: [(8, 4, 4), (4, 2, 2), (2, 1, 1)]}[dim]
    assert [lv.shape for lv in s.levels] == expected
    coarse = s.coarse_operators(M, rho)
    assert len(coarse) == len(expected) - 1
    fixed = problem.meta["dofmap"].is_fixed
    fine_op = A
    for level, Ac in enumerate(coarse, start=1):
        fshape = tuple(v // 2 ** (level - 1) for v in shape)
        P_full = interpolation(fshape, dim)
        cfixed = coarse_fixed(fshape, dim, fixed)
        P = P_full[np.flatnonzero(~fixed)][:, np.flatnonzero(~cfixed)]
        ref = (P.T @ fine_op @ P).toarray()
        assert Ac.shape == ref.shape
        err = np.abs(Ac.toarray() - ref).max() / np.abs(ref).max()
        assert err < 1e-12, (level, err)
        fine_op, fixed = sp.csr_array(ref), cfixed


def test_fixed_dof_off_the_coarse_nodes_is_refused():
    # a single fixed y-dof at node (1, 0): it interpolates from the free coarse nodes (0, 0) and (1, 0)
    with pytest.raises(ValueError, match="does not sit on a node of the coarser grid"):
        GMGSolver((8, 4), 2, fixed=[0, 1, 3], coarse_dofs=1)
    # the same supports on a grid that is not coarsened are fine
    assert len(GMGSolver((8, 4), 2, fixed=[0, 1, 3], max_levels=1).levels) == 1
    # ... and so when only min_levels (not coarse_dofs) asks for a coarser level: the grid is solved directly
    assert len(GMGSolver((8, 4), 2, fixed=[0, 1, 3]).levels) == 1
    # supports that coarsen: min_levels=2 coarsens a grid below coarse_dofs once, min_levels=3 twice
    assert [lv.shape for lv in GMGSolver((8, 4), 2, fixed=[0, 1]).levels] == [(8, 4), (4, 2)]
    assert [lv.shape for lv in GMGSolver((8, 4), 2, fixed=[0, 1], min_levels=3).levels] == [(8, 4), (4, 2), (2, 1)]
    assert len(GMGSolver((7, 4), 2, fixed=[0, 1]).levels) == 1  # odd: nothing to coarsen, no warning needed


# -- solves ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,size", [("mbb", (64, 32, None)), ("cantilever3d", (16, 8, 8))])
def test_solve_matches_direct_on_a_contrasted_design(case, size):
    problem = tc.build(case, *size, emin=1e-9, solver="superlu")
    M, rho, A, b = system(problem, simp_design(problem.p0.size, seed=1))
    E = M.coefficient(rho)
    assert E.min() < 1e-8 and E.max() > 0.5  # contrast > 1e8
    s = solver_for(problem, coarse_dofs=200, tol=1e-10)
    assert len(s.levels) >= 3
    fac = s.factorize(A, operator=M, rho=rho)
    u = fac.solve(b, kind="forward")
    ref = spla.spsolve(A.tocsc(), b)
    assert np.linalg.norm(A @ u - b) <= 1e-10 * np.linalg.norm(b)
    assert fac.last_residuals[0] == pytest.approx(1.0) and fac.last_residuals[-1] <= 1e-10
    # compliance and the displacements of the solid part agree with the direct solve
    assert abs(b @ u - b @ ref) <= 1e-9 * abs(b @ ref)
    assert np.linalg.norm(u - ref) <= 1e-6 * np.linalg.norm(ref)
    assert 0 < s.stats.iterations["forward"] <= 60 and s.stats.factorizations == 1  # to 1e-10 on a random design
    # transposed solve: A is symmetric, the same solve (an adjoint with another right-hand side)
    g = np.random.default_rng(2).standard_normal(b.size)
    lam = fac.solve(g, transpose=True, kind="adjoint")
    assert np.linalg.norm(A.T @ lam - g) <= 1e-10 * np.linalg.norm(g)
    assert s.stats.solves["adjoint"] == 1 and s.stats.iterations["adjoint"] > 0
    # several right-hand sides
    X = fac.solve(np.column_stack([b, g]), kind="tangent")
    np.testing.assert_allclose(X[:, 0], u, rtol=0, atol=1e-8 * np.abs(u).max())
    assert s.stats.rhs["tangent"] == 2


def test_vcycle_is_symmetric_positive_definite():
    problem = tc.build("mbb", 32, 16, emin=1e-9, filter=False, solver="superlu")
    M, rho, A, _ = system(problem, simp_design(problem.p0.size, seed=4))
    for options in (dict(), dict(matrix_free=False, smoother="chebyshev", degree=3), dict(cycle="W", smoother="jacobi")):
        fac = solver_for(problem, coarse_dofs=50, **options).factorize(A, operator=M, rho=rho)
        n = A.shape[0]
        B = np.column_stack([fac.precondition(e) for e in np.eye(n)[:, :: max(1, n // 60)].T])
        V = np.eye(n)[:, :: max(1, n // 60)]
        S = V.T @ B
        np.testing.assert_allclose(S, S.T, atol=1e-10 * np.abs(S).max())
        assert np.linalg.eigvalsh(0.5 * (S + S.T)).min() > 0


def test_matrix_free_fine_level_equals_csr():
    problem = tc.build("mbb", 64, 32, emin=1e-9, solver="superlu")
    M, rho, A, b = system(problem, simp_design(problem.p0.size, seed=5))
    runs = []
    for mf in (True, False):
        s = solver_for(problem, coarse_dofs=200, matrix_free=mf, warm_start=False)
        fac = s.factorize(A, operator=M, rho=rho)
        runs.append((fac.solve(b), s.stats.iterations["other"], fac.last_residuals))
    (u1, it1, h1), (u2, it2, h2) = runs
    assert it1 == it2
    np.testing.assert_allclose(h1, h2, rtol=1e-4)  # the same smoothers: the histories agree to round-off
    np.testing.assert_allclose(u1, u2, rtol=0, atol=1e-9 * np.abs(u2).max())


# -- iteration counts on an optimized design -------------------------------------------------------------
@pytest.mark.parametrize("factor", [1, 2])
def test_iterations_are_bounded_on_an_intermediate_mbb_design(mbb_designs, factor):
    nelx, nely = 120 * factor, 40 * factor
    problem = tc.build("mbb", nelx, nely, solver="superlu")
    M, rho, A, b = system(problem, upsample(mbb_designs[0], factor))
    counts = {}
    for cycle in ("V", "W"):
        # a deep hierarchy: down to 15 x 5 (4 levels at 120 x 40, 5 at 240 x 80)
        s = solver_for(problem, coarse_dofs=200, tol=1e-8, warm_start=False, cycle=cycle)
        assert [lv.shape for lv in s.levels][-1] == (15, 5) and len(s.levels) == 3 + factor
        u = s.factorize(A, operator=M, rho=rho).solve(b, kind="forward")
        assert np.linalg.norm(A @ u - b) <= 1e-8 * np.linalg.norm(b)
        counts[cycle] = s.stats.iterations["forward"]
    # measured: V 38 and 43, W 23 and 19 (120 x 40 and 240 x 80)
    assert counts["V"] <= 50 and counts["W"] <= 26, counts
    if factor == 2:  # the default hierarchy (coarse grid <= 20000 dofs): 240 x 80 -> 120 x 40, 11 iterations
        s = solver_for(problem, tol=1e-8, warm_start=False)
        assert len(s.levels) == 2
        s.factorize(A, operator=M, rho=rho).solve(b, kind="forward")
        assert s.stats.iterations["forward"] <= 14


def test_warm_start_saves_iterations(mbb_designs):
    """The solve at OC iteration 26 started from the solution at iteration 25 (measured: 34 instead of 38)."""
    problem = tc.build("mbb", 120, 40, solver="superlu")
    M = problem.functional.matrix
    counts = {}
    for warm in (True, False):
        s = solver_for(problem, coarse_dofs=200, warm_start=warm)
        for p in mbb_designs:
            _, rho, A, b = system(problem, p.ravel())
            before = s.stats.iterations["forward"]
            u = s.factorize(A, operator=M, rho=rho).solve(b, kind="forward")
            assert np.linalg.norm(A @ u - b) <= 1e-8 * np.linalg.norm(b)
        counts[warm] = s.stats.iterations["forward"] - before
    assert counts[True] <= counts[False] - 2, counts


# -- failures and bad input ------------------------------------------------------------------------------
def test_factorize_without_the_discretisation_is_refused():
    problem = tc.build("mbb", 16, 8, solver="superlu")
    M, rho, A, _ = system(problem, problem.p0)
    s = solver_for(problem)
    with pytest.raises(ValueError, match="needs the discretisation"):
        s.factorize(A)
    with pytest.raises(ValueError, match="ElementCoefficientMatrix"):
        s.factorize(A, operator=object(), rho=rho)
    with pytest.raises(ShapeError, match="rho must have shape"):
        s.factorize(A, operator=M, rho=rho[:-1])


def test_grid_that_does_not_match_the_operator_is_refused():
    problem = tc.build("mbb", 16, 8, solver="superlu")
    M, rho, A, _ = system(problem, problem.p0)
    fixed = problem.meta["dofmap"].fixed
    with pytest.raises(ShapeError, match="built for the 16x4"):
        GMGSolver((16, 4), 2, [0]).factorize(A, operator=M, rho=rho)
    # as many elements and free dofs, but numbered otherwise: the connectivity differs
    with pytest.raises(ValueError, match="connectivity differs"):
        GMGSolver((8, 16), 2, fixed, max_levels=1).factorize(A, operator=M, rho=rho)
    other = np.setdiff1d(fixed, [fixed[-1]]).tolist() + [fixed[-1] - 1]  # other supports
    with pytest.raises(ValueError, match="connectivity differs"):
        GMGSolver((16, 8), 2, other, max_levels=1).factorize(A, operator=M, rho=rho)
    with pytest.raises(ValueError, match="fixed dofs must be in"):
        GMGSolver((16, 8), 2, [10_000])
    # an A that is not operator.assemble(rho): the matrix-free fine level would solve another system
    with pytest.raises(ValueError, match="matrix-free fine-level operator differs"):
        solver_for(problem, coarse_dofs=50).factorize(2 * A, operator=M, rho=rho)
    fac = solver_for(problem, matrix_free=False, min_levels=1).factorize(A, operator=M, rho=rho)
    assert fac.n_levels == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(shape=(4,)), "shape must be"), (dict(shape=(4, 0)), "element count"), (dict(dofs_per_node=0), "dofs_per_node"),
    (dict(tol=0.0), "tolerance"), (dict(tol={"nope": 1e-3}), "unknown solve kind"), (dict(maxiter=0), "maxiter"),
    (dict(smoother="sor"), "unknown smoother"), (dict(degree=0), "degree"), (dict(cycle="F"), "cycle"),
    (dict(on_failure="ignore"), "on_failure"), (dict(min_levels=0), "min_levels"), (dict(eig_safety=0.5), "eig_safety"), (dict(jacobi_weight=2.5), "jacobi_weight"),
])
def test_bad_options(kwargs, match):
    args = dict(shape=(8, 4), dofs_per_node=2, fixed=[0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GMGSolver(**args)


def test_odd_element_counts_give_fewer_levels(caplog):
    problem = tc.build("mbb", 30, 10, emin=1e-9, solver="superlu")  # 30 x 10 -> 15 x 5, then odd
    M, rho, A, b = system(problem, simp_design(problem.p0.size))
    with caplog.at_level(logging.WARNING, logger="adjopt.solvers.gmg"):
        s = solver_for(problem, coarse_dofs=10)
    assert [lv.shape for lv in s.levels] == [(30, 10), (15, 5)]
    assert "cannot be coarsened further" in caplog.text
    u = s.factorize(A, operator=M, rho=rho).solve(b)
    assert np.linalg.norm(A @ u - b) <= 1e-8 * np.linalg.norm(b)
    # an odd fine grid: one level, the direct solve of A itself (one CG step)
    problem = tc.build("mbb", 15, 5, solver="superlu")
    M, rho, A, b = system(problem, problem.p0)
    s = solver_for(problem, coarse_dofs=10)
    assert len(s.levels) == 1
    u = s.factorize(A, operator=M, rho=rho).solve(b)
    assert s.stats.iterations["other"] == 1 and np.linalg.norm(A @ u - b) <= 1e-12 * np.linalg.norm(b)


def test_not_converging_raises_or_warns():
    problem = tc.build("mbb", 64, 32, emin=1e-9, solver="superlu")
    M, rho, A, b = system(problem, simp_design(problem.p0.size))
    s = solver_for(problem, coarse_dofs=50, maxiter=3, tol=1e-12)
    fac = s.factorize(A, operator=M, rho=rho)
    with pytest.raises(SolverDidNotConverge, match="stopped after 3 iterations") as info:
        fac.solve(b, kind="forward")
    assert len(info.value.residuals) == 4 and info.value.residuals[-1] > 1e-12
    s = solver_for(problem, coarse_dofs=50, maxiter=3, tol=1e-12, on_failure="warn")
    with pytest.warns(ConvergenceWarning):
        u = s.factorize(A, operator=M, rho=rho).solve(b)
    assert np.linalg.norm(A @ u - b) < np.linalg.norm(b)
    assert np.all(s.factorize(A, operator=M, rho=rho).solve(np.zeros_like(b)) == 0)


# -- through the functional and the optimizer ------------------------------------------------------------
def test_topology_build_with_gmg_runs_oc_like_the_direct_solver():
    runs = {}
    for name in ("superlu", "gmg"):
        problem = tc.build("mbb", 60, 20, solver=name)
        res = adjopt.minimize(problem, method="oc", maxiter=30, xtol=0.0, gtol=0.0)
        runs[name] = (res, problem.functional)
    assert isinstance(runs["gmg"][1].solver, GMGSolver)
    (ref, _), (res, J) = runs["superlu"], runs["gmg"]
    # 2562 dofs <= coarse_dofs, but min_levels=2: 60 x 20 -> 30 x 10, one factorization per design of the coarse grid
    assert [lv.shape for lv in J.solver.levels] == [(60, 20), (30, 10)]
    assert J.solver.stats.factorizations == 31 and J.solver.stats.iterations["forward"] > 31
    assert res.nit == ref.nit == 30
    assert res.fun == pytest.approx(ref.fun, rel=1e-6)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-5)
    # a multi-level hierarchy on a grid that coarsens (64 x 32 -> 8 x 4), through the functional
    base = tc.build("mbb", 64, 32, solver="superlu")
    s = solver_for(base, coarse_dofs=100)
    assert len(s.levels) == 4
    problem = tc.build("mbb", 64, 32, solver=s)
    res = adjopt.minimize(problem, method="oc", maxiter=30, xtol=0.0, gtol=0.0)
    ref = adjopt.minimize(base, method="oc", maxiter=30, xtol=0.0, gtol=0.0)
    assert res.fun == pytest.approx(ref.fun, rel=1e-6)
    st = s.stats
    assert st.factorizations == 31 and st.iterations["forward"] > 0
    assert st.iterations["forward"] / st.solves["forward"] <= 28  # measured 22.6 (4 levels, warm starts)


def test_gradient_with_gmg_matches_direct():
    problem = tc.build("mbb", 32, 16, solver="superlu")
    p = np.random.default_rng(7).uniform(0.1, 1.0, problem.p0.size)
    ref = problem.functional.gradient(p)
    s = solver_for(problem, coarse_dofs=50, tol=1e-12)
    J = tc.build("mbb", 32, 16, solver=s).functional
    np.testing.assert_allclose(J.gradient(p), ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_structured_solver_chooses_gmg_from_the_measured_size(monkeypatch, caplog):
    from adjopt.solvers import AutoSolver, gmg, structured_solver

    monkeypatch.setitem(gmg.GMG_AUTO_MIN_DOFS, 2, 500)
    fixed = np.arange(0, 2 * 33 * 17, 2 * 33)  # x-dofs of the left edge of a 32 x 16 grid
    with caplog.at_level(logging.INFO, logger="adjopt.solvers.gmg"):
        s = structured_solver((32, 16), 2, fixed, coarse_dofs=100)
    assert isinstance(s, GMGSolver) and len(s.levels) >= 2 and "chose geometric multigrid" in caplog.text
    assert isinstance(structured_solver((32, 16), 2, fixed, solver="auto", coarse_dofs=100), GMGSolver)
    # 1105 free dofs <= coarse_dofs (20,000 by default): min_levels=2 still coarsens the grid once
    s = structured_solver((32, 16), 2, fixed)
    assert isinstance(s, GMGSolver) and [lv.shape for lv in s.levels] == [(32, 16), (16, 8)]
    # a hierarchy of one level is a factorization
    assert isinstance(structured_solver((32, 16), 2, fixed, min_levels=1), AutoSolver)
    assert isinstance(structured_solver((8, 4), 2, [0]), AutoSolver)  # 88 free dofs: below the crossover
    assert isinstance(structured_solver((31, 17), 2, [0]), AutoSolver)  # odd counts: one level, no multigrid
    # a support off the coarse nodes: a factorization instead (the error is for an explicit "gmg")
    assert isinstance(structured_solver((32, 16), 2, [0, 1, 3], coarse_dofs=100), AutoSolver)
    with pytest.raises(ValueError, match="does not sit on a node"):
        structured_solver((32, 16), 2, [0, 1, 3], solver="gmg", coarse_dofs=100)
    # explicit choices are kept; bad options are errors, not a silent fallback
    assert structured_solver((32, 16), 2, fixed, solver="superlu").name == "superlu"
    assert isinstance(structured_solver((8, 4), 2, [0], solver="gmg"), GMGSolver)
    with pytest.raises(ValueError, match="unknown smoother"):
        structured_solver((32, 16), 2, fixed, smoother="nope")
    with pytest.raises(ValueError, match="unknown solver"):
        structured_solver((32, 16), 2, fixed, solver="nope")


# -- reused coarse levels (reuse_hierarchy) and the element bound of the smoother -------------------------
def test_the_element_bound_bounds_the_spectrum_of_the_fine_level():
    problem = tc.build("mbb", 16, 8, emin=1e-9, solver="superlu")
    M, rho, A, _ = system(problem, simp_design(problem.p0.size, seed=6))
    s = solver_for(problem, coarse_dofs=20)
    fac = s.factorize(A, operator=M, rho=rho)
    K = M.local.reshape(8, 8)
    d = np.sqrt(np.diag(K))
    bound = np.linalg.eigvalsh(K / np.outer(d, d))[-1]
    assert fac.ops[0].rho == pytest.approx(bound, rel=1e-12)
    Ad = A.toarray()
    dd = np.sqrt(np.diag(Ad))
    lam_max = np.linalg.eigvalsh(Ad / np.outer(dd, dd))[-1]
    assert lam_max <= bound * (1 + 1e-12) and lam_max > 0.5 * bound  # an upper bound, and not a loose one


def test_reused_coarse_levels_solve_to_the_tolerance_and_are_rebuilt_when_they_cost(monkeypatch):
    problem = tc.build("mbb", 64, 32, emin=1e-9, solver="superlu")
    x0 = simp_design(problem.p0.size, seed=7)
    M, rho0, A0, b = system(problem, x0)
    near = np.clip(x0 + 0.02 * np.random.default_rng(1).standard_normal(x0.size), 0, 1)  # a small OC-like step
    _, rho1, A1, _ = system(problem, near)
    s = solver_for(problem, coarse_dofs=200, warm_start=False, reuse_hierarchy=True)
    fac0 = s.factorize(A0, operator=M, rho=rho0)
    fac0.solve(b, kind="forward")
    assert not fac0.lagged and s.lagged_setups == 0
    fac1 = s.factorize(A1, operator=M, rho=rho1)
    assert fac1.lagged and s.lagged_setups == 1
    assert fac1.ops[1] is fac0.ops[1]  # the coarse levels are shared, the finest level is A1's
    u1 = fac1.solve(b, kind="forward")
    assert np.linalg.norm(A1 @ u1 - b) <= 1e-8 * np.linalg.norm(b)
    np.testing.assert_allclose(u1, spla.spsolve(A1.tocsc(), b), rtol=0, atol=1e-6 * np.abs(u1).max())
    # a different design: the lagged levels cost more iterations than the fresh ones -> rebuilt next time
    _, rho2, A2, _ = system(problem, 1.0 - x0)
    fac2 = s.factorize(A2, operator=M, rho=rho2)
    assert fac2.lagged
    u2 = fac2.solve(b, kind="forward")
    assert np.linalg.norm(A2 @ u2 - b) <= 1e-8 * np.linalg.norm(b)
    fresh_its = s._fresh["iterations"]
    if s._fresh["stale"]:
        fac3 = s.factorize(A2, operator=M, rho=rho2)
        assert not fac3.lagged and s._fresh["iterations"] is None  # a new hierarchy, not yet used
    else:
        assert fac2.last_residuals and len(fac2.last_residuals) - 1 <= fresh_its + 1
    # no reuse when asked not to
    s = solver_for(problem, coarse_dofs=200, reuse_hierarchy=False)
    s.factorize(A0, operator=M, rho=rho0).solve(b)
    assert not s.factorize(A1, operator=M, rho=rho1).lagged and s.lagged_setups == 0
    with pytest.raises(ValueError, match="rebuild_ratio"):
        solver_for(problem, rebuild_ratio=0.5)


def test_a_lagged_solve_that_does_not_converge_is_redone_on_fresh_levels(monkeypatch, caplog):
    problem = tc.build("mbb", 64, 32, emin=1e-9, solver="superlu")
    x0 = simp_design(problem.p0.size, seed=7)
    M, rho0, A0, b = system(problem, x0)
    _, rho1, A1, _ = system(problem, 1.0 - x0)
    s = solver_for(problem, coarse_dofs=200, warm_start=False, reuse_hierarchy=True)
    s.factorize(A0, operator=M, rho=rho0).solve(b)
    monkeypatch.setattr(GMGSolver, "_lagged_budget", lambda self: 1)  # a lagged solve gets one iteration
    fac = s.factorize(A1, operator=M, rho=rho1)
    assert fac.lagged
    with caplog.at_level(logging.INFO, logger="adjopt.solvers.gmg"):
        u = fac.solve(b, kind="forward")
    assert not fac.lagged and "rebuilt them" in caplog.text
    assert np.linalg.norm(A1 @ u - b) <= 1e-8 * np.linalg.norm(b)


def test_a_lagged_solve_predicted_too_slow_goes_on_from_its_iterate_and_backs_off(caplog):
    from adjopt.solvers.gmg import _predicted

    assert _predicted([1.0, 0.5, 0.25, 0.125, 0.0625], 1e-3) == pytest.approx(4 + np.log(1e-3 / 0.0625) / np.log(0.5))
    assert _predicted([1.0, 2.0, 1.5, 1.6, 1.7], 1e-3) == np.inf  # no decrease over the window
    problem = tc.build("mbb", 64, 32, emin=1e-9, solver="superlu")
    x0 = simp_design(problem.p0.size, seed=7)
    M, rho0, A0, b = system(problem, x0)
    _, rho1, A1, _ = system(problem, 1.0 - x0)  # far from x0: the lagged levels are slow
    s = solver_for(problem, coarse_dofs=200, warm_start=False)
    assert s.reuse_hierarchy  # the default
    s.factorize(A0, operator=M, rho=rho0).solve(b)
    fresh_its = s._fresh["iterations"]
    fac = s.factorize(A1, operator=M, rho=rho1)
    assert fac.lagged
    before = s.stats.iterations["other"]
    with caplog.at_level(logging.INFO, logger="adjopt.solvers.gmg"):
        u = fac.solve(b)
    assert "rebuilt them and went on from its iterate" in caplog.text and not fac.lagged
    assert np.linalg.norm(A1 @ u - b) <= 1e-8 * np.linalg.norm(b)
    # the fresh solve started from the lagged solve's iterate (warm_start is off: otherwise it starts at 0)
    assert 0 < fac.last_residuals[0] < 1  # from 0 it would be 1
    # the lagged attempt stopped early: far below its budget of 2 * (n + 1) + 10 iterations
    lagged_its = s.stats.iterations["other"] - before - (len(fac.last_residuals) - 1)
    assert 6 <= lagged_its < 2 * (fresh_its + 1) + 10
    # back-off: the next factorization is fresh, the one after may reuse again
    assert not s.factorize(A1, operator=M, rho=rho1).lagged
    assert s.factorize(A1, operator=M, rho=rho1).lagged


def test_structured_solver_checks_its_arguments_whichever_solver_it_returns():
    from adjopt.solvers import structured_solver

    for shape in [(0, 32), (64.5, 32), (True, 32), (64,), (64, 32, 4, 2)]:
        with pytest.raises(ValueError):
            structured_solver(shape, 2, [0])
    with pytest.raises(ValueError, match="dofs_per_node"):
        structured_solver((8, 4), 0, [0])
    with pytest.raises(ValueError, match="fixed dofs must be in"):
        structured_solver((8, 4), 2, [10**6])
    with pytest.raises(TypeError, match="bogus"):
        structured_solver((8, 4), 2, [0], bogus=1)
    with pytest.raises(ValueError, match="reuse_hierarchy"):
        GMGSolver((8, 4), 2, [0], reuse_hierarchy="yes")


def test_the_element_bound_follows_the_element_matrix():
    from adjopt import fem
    from adjopt.mesh import rectangle

    problem = tc.build("mbb", 16, 8, emin=1e-9, solver="superlu")
    M, rho, A, _ = system(problem, simp_design(problem.p0.size, seed=6))
    stiff = fem.q1_elasticity(rectangle(1, 1, 1.0, 1.0, cell="quad"), E=1.0, nu=0.49)[0]
    M2 = adjopt.ElementCoefficientMatrix(M.conn, stiff, M.coefficient, n=M.shape[0])
    s = solver_for(problem, coarse_dofs=20)
    bounds = []
    for op in (M, M2):
        fac = s.factorize(op.assemble(rho), operator=op, rho=rho)
        K = op.local.reshape(8, 8)
        d = np.sqrt(np.diag(K))
        bounds.append(np.linalg.eigvalsh(K / np.outer(d, d))[-1])
        assert fac.ops[0].rho == pytest.approx(bounds[-1], rel=1e-12)
    assert bounds[1] > bounds[0] * 1.1  # nu = 0.49 has a larger bound than nu = 0.3


# -- findings of a hostile review ------------------------------------------------------------------------
def test_the_hierarchy_does_not_follow_the_callers_rho_changed_after_factorize():
    from adjopt import fem
    from adjopt.mesh import rectangle

    problem = tc.build("mbb", 64, 32, solver="superlu")
    dm = problem.meta["dofmap"]
    KE = fem.q1_elasticity(rectangle(1, 1, 1.0, 1.0, cell="quad"), E=1.0, nu=0.3)[0]
    op = adjopt.ElementCoefficientMatrix(dm.restrict(fem.vector_dofs(problem.meta["mesh"].cells, 2)), KE,
                                         adjopt.Identity(), n=dm.n_free)  # Identity hands back its input
    rho = np.ones(64 * 32)
    A = op.assemble(rho)
    b = problem.functional.rhs.value(problem.p0)
    fac = solver_for(problem).factorize(A, operator=op, rho=rho)
    rho[:1024] = 1e-3  # in place, after factorize
    u = fac.solve(b)
    assert np.linalg.norm(A @ u - b) <= 1e-8 * np.linalg.norm(b)


def test_tiny_huge_and_empty_right_hand_sides():
    problem = tc.build("mbb", 32, 16, solver="superlu")
    M, rho, A, b = system(problem, simp_design(problem.p0.size, seed=2))
    fac = solver_for(problem).factorize(A, operator=M, rho=rho)
    u = fac.solve(b)
    for scale in (1e-170, 1e-300, 1e200):  # ||b||^2 under- or overflows: solved on b / max|b|
        us = fac.solve(scale * b)
        np.testing.assert_allclose(us, scale * u, rtol=1e-6, atol=0)
    U = fac.solve(np.column_stack([b, 1e-200 * b]))
    np.testing.assert_allclose(U[:, 1], 1e-200 * U[:, 0], rtol=1e-6)
    assert fac.solve(np.zeros((b.size, 0))).shape == (b.size, 0)


def test_a_failed_solve_that_warns_returns_its_start_when_the_last_iterate_is_worse():
    problem = tc.build("mbb", 32, 16, solver="superlu")
    M, rho, A, b = system(problem, simp_design(problem.p0.size, seed=2))
    s = solver_for(problem, on_failure="warn", warm_start=False, maxiter=1, tol=1e-12)
    fac = s.factorize(A, operator=M, rho=rho)
    # CG minimizes the error in the A-norm, not the residual: after one step here the residual is 2.3 ||b||
    with pytest.warns(ConvergenceWarning, match="its start is returned"):
        x = fac.solve(b)
    assert fac.last_residuals[-1] > 1 and np.all(x == 0)
    # with more steps allowed the last iterate is better than the start, and it is what comes back
    s = solver_for(problem, on_failure="warn", warm_start=False, maxiter=4, tol=1e-12)
    with pytest.warns(ConvergenceWarning) as rec:
        x = s.factorize(A, operator=M, rho=rho).solve(b)
    assert "its start is returned" not in str(rec[0].message)
    assert np.linalg.norm(A @ x - b) < np.linalg.norm(b)  # better than x = 0


def test_structured_solver_checks_option_values_whichever_solver_it_returns():
    from adjopt.solvers import structured_solver

    for solver in (None, "auto", "superlu"):  # (8, 4): a factorization is returned, the options are still checked
        for bad, match in ((dict(tol=-5), "tolerance"), (dict(smoother="nope"), "unknown smoother"),
                           (dict(min_levels=0), "min_levels"), (dict(max_levels=0), "max_levels")):
            with pytest.raises(ValueError, match=match):
                structured_solver((8, 4), 2, [0], solver, **bad)
    assert structured_solver((8, 4), 2, [0], "superlu", max_levels=3, tol=1e-6).name == "superlu"
