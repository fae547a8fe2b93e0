"""AMGSolver: hierarchy reuse, tolerances, transposed solves, failures; derivatives against the direct solver."""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.errors import ConvergenceWarning, NotPositiveDefiniteError, ShapeError, SingularMatrixError, SolverDidNotConverge
from adjopt.solvers import AMGSolver, DirectSolver, make_solver


def poisson(n=40):
    """2D five-point Laplacian with Dirichlet boundary, (n-1)^2 unknowns."""
    T = sp.diags_array([-np.ones(n - 2), 2 * np.ones(n - 1), -np.ones(n - 2)], offsets=[-1, 0, 1])
    Id = sp.eye_array(n - 1)
    return sp.csr_array(sp.kron(T, Id) + sp.kron(Id, T))


def advection_problem(n=24, kappa=0.01, velocity=(1.0, 0.5)):
    """A(p) = A_supg + sum_e exp(p_e) kappa K_e on the free nodes: nonsymmetric and parametric."""
    msh = meshes.unit_square(n, cell="triangle")
    dofs = fem.condense(msh.n_nodes, msh.boundary("all"))
    free = dofs.free
    A0 = fem.assemble(msh.cells, fem.advection_diffusion(msh, velocity, kappa), msh.n_nodes)[free][:, free]
    A = adjopt.ElementCoefficientMatrix(dofs.restrict(msh.cells), kappa * fem.p1_stiffness(msh), "exp",
                                        n=dofs.n_free, A0=A0)
    b = dofs.restrict_vector(fem.body_force(msh, 1.0))
    rng = np.random.default_rng(3)
    d = rng.standard_normal(b.size) * 0.01
    return A, b, adjopt.SquaredMisfit(d), msh.n_cells


def functional(solver, **kw):
    A, b, f, m = advection_problem(**kw)
    return adjopt.ReducedFunctional(A, b, f, solver=solver), m


def test_spd_solves_reach_the_tolerance_and_share_one_hierarchy():
    A = poisson()
    s = AMGSolver(tol=1e-9)
    fac = s.factorize(A)
    rng = np.random.default_rng(0)
    b = rng.standard_normal(A.shape[0])
    for kind, tr in (("forward", False), ("adjoint", True), ("tangent", False)):
        x = fac.solve(b + (kind == "tangent"), transpose=tr, kind=kind)
        assert np.linalg.norm(A @ x - (b + (kind == "tangent"))) <= 1e-9 * np.linalg.norm(b + (kind == "tangent"))
    st = s.stats
    assert st.factorizations == 1 and st.transpose_factorizations == 0  # A^T = A: one hierarchy
    assert st.solves["adjoint"] == 1 and 3 <= st.iterations["forward"] <= 40
    assert fac.last_residuals[0] == pytest.approx(1.0) and fac.last_residuals[-1] <= 1e-9
    assert fac.factor_nnz > A.nnz and fac.nbytes >= 12 * fac.factor_nnz
    assert not fac.exact and fac.tolerance("forward") == 1e-9 and fac.tolerance("forward", 1e-3) == 1e-3
    assert "Krylov iterations" in str(st) and st.as_dict()["iterations"]["forward"] == st.iterations["forward"]


def test_multicolumn_and_zero_right_hand_sides():
    A = poisson(20)
    fac = AMGSolver().factorize(A)
    B = np.random.default_rng(1).standard_normal((A.shape[0], 3))
    X = fac.solve(B)
    np.testing.assert_allclose(A @ X, B, atol=1e-8 * np.abs(B).max())
    assert fac.stats.rhs["other"] == 3
    z = fac.solve(np.zeros(A.shape[0]), kind="forward")
    assert np.all(z == 0) and fac.stats.iterations["forward"] == 0


def test_nonsymmetric_builds_the_transposed_hierarchy_once_lazily():
    A, b, _, _ = advection_problem()
    Am = A.assemble(np.zeros(A.n_params))
    s = AMGSolver(tol=1e-10)
    fac = s.factorize(Am)
    x = fac.solve(b, kind="forward")
    assert s.stats.transpose_factorizations == 0
    y1 = fac.solve(b, transpose=True, kind="adjoint")
    y2 = fac.solve(2 * b, transpose=True, kind="second_adjoint")
    assert s.stats.factorizations == 1 and s.stats.transpose_factorizations == 1
    for sol, M, rhs in ((x, Am, b), (y1, Am.T, b), (y2, Am.T, 2 * b)):
        assert np.linalg.norm(M @ sol - rhs) <= 1e-10 * np.linalg.norm(rhs)


def test_value_gradient_hessp_build_one_hierarchy_for_A_and_one_for_AT():
    J, m = functional(AMGSolver())
    p = np.random.default_rng(0).standard_normal(m) * 0.3
    J.value(p)
    J.gradient(p)
    J.hessp(p, np.ones(m))
    J.hessp(p, np.arange(m, dtype=float))
    s = J.stats
    assert s.factorizations == 1 and s.transpose_factorizations == 1
    assert s.solves == {"forward": 1, "adjoint": 1, "tangent": 2, "second_adjoint": 2}
    assert all(s.iterations[k] > 0 for k in ("forward", "adjoint", "tangent", "second_adjoint"))


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_amg_gmres_derivatives_match_the_direct_solver_to_the_tolerance(tol):
    Ja, m = functional(AMGSolver(tol=tol))
    Jd, _ = functional(DirectSolver())
    rng = np.random.default_rng(1)
    p, dp = 0.3 * rng.standard_normal(m), rng.standard_normal(m)
    g, gd = Ja.gradient(p), Jd.gradient(p)
    h, hd = Ja.hessp(p, dp), Jd.hessp(p, dp)
    assert abs(Ja.value(p) - Jd.value(p)) <= 100 * tol * abs(Jd.value(p))
    assert np.linalg.norm(g - gd) <= 100 * tol * np.linalg.norm(gd)
    assert np.linalg.norm(h - hd) <= 100 * tol * np.linalg.norm(hd)
    if tol == 1e-6:  # a loose tolerance really is looser
        assert np.linalg.norm(g - gd) > 1e-12 * np.linalg.norm(gd)


def test_taylor_rates_hold_with_amg_gmres_at_tight_tolerance():
    J, m = functional(AMGSolver(tol=1e-13, maxiter=1000))
    rng = np.random.default_rng(2)
    p, dp = 0.3 * rng.standard_normal(m), rng.standard_normal(m)
    r2 = adjopt.taylor_test(J, p, dp, order=2)
    r3 = adjopt.taylor_test(J, p, dp, order=3)
    assert r2.passed and r2.rate > 1.9, r2.table()
    assert r3.passed and r3.rate > 2.9, r3.table()


def test_gradient_and_hessp_tol_control_the_adjoint_and_hessian_solves():
    J, m = functional(AMGSolver(tol={"adjoint": 1e-10, "tangent": 1e-10, "second_adjoint": 1e-10}))
    p = np.zeros(m)
    J.gradient(p, tol=1e-3)
    loose = J.stats.iterations["adjoint"]
    J.gradient(p, tol=1e-2)  # looser than cached: no new solve
    assert J.stats.solves["adjoint"] == 1
    g_tight = J.gradient(p)  # default 1e-10 is tighter: solved again
    assert J.stats.solves["adjoint"] == 2 and J.stats.iterations["adjoint"] > 2 * loose
    Jd, _ = functional(DirectSolver())
    gd = Jd.gradient(p)
    assert np.linalg.norm(g_tight - gd) <= 1e-8 * np.linalg.norm(gd)
    before = J.stats.iterations["tangent"]
    J.hessp(p, np.ones(m), tol=1e-2)
    mid = J.stats.iterations["tangent"]
    J.hessp(p, np.ones(m))
    assert mid - before < J.stats.iterations["tangent"] - mid


def test_direct_solver_is_exact_whatever_the_tolerance():
    J, m = functional(DirectSolver())
    g1 = J.gradient(np.zeros(m), tol=1e-2)
    g2 = J.gradient(np.zeros(m))
    assert J.stats.solves["adjoint"] == 1
    np.testing.assert_array_equal(g1, g2)


def test_a_stalled_solve_raises_with_its_residual_history():
    A = poisson(40)
    fac = AMGSolver(tol=1e-14, maxiter=2, warm_start=False).factorize(A)
    with pytest.raises(SolverDidNotConverge, match="forward Krylov solve.*2 iterations") as exc:
        fac.solve(np.ones(A.shape[0]), kind="forward")
    r = exc.value.residuals
    assert len(r) >= 3 and r[0] == pytest.approx(1.0) and 1e-14 < r[-1] < 1.0


def test_warn_mode_returns_the_last_iterate():
    A = poisson(40)
    fac = AMGSolver(tol=1e-14, maxiter=2, on_failure="warn", warm_start=False).factorize(A)
    b = np.ones(A.shape[0])
    with pytest.warns(ConvergenceWarning, match="above its tolerance"):
        x = fac.solve(b)
    assert np.linalg.norm(A @ x - b) < np.linalg.norm(b)


def test_a_singular_matrix_is_reported_not_returned():
    # pure-Neumann Laplacian (rows sum to zero): the coarsest level of the hierarchy is singular too, so the
    # setup refuses it, whatever the right-hand side (a consistent one would converge to an arbitrary solution)
    A = poisson(20)
    A = sp.csr_array(A - sp.diags_array(np.asarray(A.sum(axis=1)).ravel()))
    for seed in range(4):
        with pytest.raises(SingularMatrixError, match=r"coarsest multigrid level.*missing boundary condition"):
            AMGSolver(maxiter=60, seed=seed).factorize(A)
    # nonsymmetric: advection-diffusion without any Dirichlet row (AIR)
    msh = meshes.unit_square(16, cell="triangle")
    An = fem.assemble(msh.cells, fem.advection_diffusion(msh, (1.0, 0.5), 0.01), msh.n_nodes)
    with pytest.raises(SingularMatrixError, match="coarsest multigrid level"):
        AMGSolver(maxiter=60).factorize(An)


def test_indefinite_symmetric_matrix_is_reported():
    A = sp.csr_array(poisson(20) - 1.5 * sp.eye_array(19 * 19))  # shifts past the smallest eigenvalues
    fac = AMGSolver(symmetric=True).factorize(A)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        fac.solve(np.random.default_rng(0).standard_normal(A.shape[0]))


def test_rigid_body_near_nullspace_speeds_up_elasticity():
    msh = meshes.rectangle(48, 12, lx=4.0, ly=1.0, cell="quad")
    conn = fem.vector_dofs(msh.cells, 2)
    K = fem.assemble(conn, fem.q1_elasticity(msh), 2 * msh.n_nodes)
    dofs = fem.condense(2 * msh.n_nodes, fem.boundary_dofs(msh, "left"))
    Kf = K[dofs.free][:, dofs.free]
    b = np.zeros(Kf.shape[0])
    b[-1] = -1.0
    iters = {}
    for name, B in (("plain", None), ("rbm", fem.rigid_body_modes(msh.points, dofs.free))):
        s = AMGSolver(tol=1e-8, near_nullspace=B)
        x = s.factorize(Kf).solve(b, kind="forward")
        assert np.linalg.norm(Kf @ x - b) <= 1e-8
        iters[name] = s.stats.iterations["forward"]
    assert iters["rbm"] < iters["plain"]


def test_rigid_body_modes_span_the_kernel_of_elasticity():
    for msh, local in ((meshes.rectangle(6, 3, cell="quad"), fem.q1_elasticity),
                       (meshes.box(2, 2, 2, cell="tetra"), fem.p1_elasticity)):
        dim = msh.points.shape[1]
        K = fem.assemble(fem.vector_dofs(msh.cells, dim), local(msh), dim * msh.n_nodes)
        B = fem.rigid_body_modes(msh.points)
        assert B.shape == (dim * msh.n_nodes, 3 if dim == 2 else 6)
        assert np.abs(K @ B).max() < 1e-12 * np.abs(K.data).max()
        assert np.linalg.matrix_rank(B) == B.shape[1]
    with pytest.raises(ShapeError, match="points"):
        fem.rigid_body_modes(np.zeros((4, 4)))
    with pytest.raises(ShapeError, match="free"):
        fem.rigid_body_modes(np.zeros((4, 2)), free=np.array([8]))


def test_warm_start_from_the_previous_state_saves_iterations():
    counts = {}
    for warm in (False, True):
        J, m = functional(AMGSolver(tol=1e-10, warm_start=warm))
        p = np.zeros(m)
        J.value(p)
        first = J.stats.iterations["forward"]
        J.value(p + 1e-4)
        counts[warm] = J.stats.iterations["forward"] - first
    assert counts[True] < counts[False]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown solve kind"):
        AMGSolver(tol={"fwd": 1e-8})
    with pytest.raises(ValueError, match="tolerance in"):
        AMGSolver(tol=2.0)
    with pytest.raises(ValueError, match="maxiter"):
        AMGSolver(maxiter=0)
    with pytest.raises(ValueError, match="unknown AMG method"):
        AMGSolver(method="magic")
    with pytest.raises(ValueError, match="on_failure"):
        AMGSolver(on_failure="ignore")
    with pytest.raises(ValueError, match="cycle"):
        AMGSolver(cycle="X")
    with pytest.raises(ValueError, match="restart"):
        AMGSolver(restart=0)
    with pytest.raises(ValueError, match="no near-nullspace"):
        AMGSolver(method="air", near_nullspace=np.ones(4))
    with pytest.raises(ShapeError, match="rows"):
        AMGSolver(near_nullspace=np.ones((5, 1))).factorize(poisson(5))
    fac = AMGSolver().factorize(poisson(5))
    with pytest.raises(ValueError, match="unknown solve kind"):
        fac.solve(np.ones(16), kind="backward")
    with pytest.raises(ValueError, match="tol must be"):
        fac.solve(np.ones(16), tol=0.0)


def test_setup_is_reproducible_and_leaves_the_global_rng_alone():
    A = poisson(30)
    b = np.ones(A.shape[0])
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    histories = []
    for _ in range(2):
        fac = AMGSolver(warm_start=False).factorize(A)
        fac.solve(b)
        histories.append(fac.last_residuals)
    assert np.random.rand() == expected
    assert len(histories[0]) > 3 and histories[0] == histories[1]


def test_make_solver_knows_amg():
    assert isinstance(make_solver("amg"), AMGSolver)
    assert isinstance(make_solver("AMG"), AMGSolver)
