"""NonlinearReducedFunctional: Taylor rates for every residual kind (with and without a parameter map, every
solver), the reuse of the converged Jacobian's factorization, warm starts, counters and the optimizers."""

import numpy as np
import pytest

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.maps import NodalToElement
from adjopt.solvers import backends
from adjopt.verify import check_hessian_symmetry, taylor_test

KINDS = {
    "quasilinear": dict(diffusion="exp", beta=1.0),
    "cube": dict(diffusion="exp", reaction=2.0, nonlinearity="cube"),
    "bratu": dict(diffusion=1.0, reaction="exp", nonlinearity="exp"),
}
SOLVERS = ("superlu", "cholmod", "pardiso", "amg")


def _problem(kind="quasilinear", n=8, cell="triangle", mapped=False, solver="superlu", **kw):
    msh = meshes.unit_square(n, cell=cell)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    f = dm.restrict_vector(fem.body_force(msh, 10.0))
    R = fem.diffusion_reaction_residual(msh, dm, source=f, **KINDS[kind])
    rng = np.random.default_rng(7)
    obj = adjopt.SquaredMisfit(0.2 * rng.standard_normal(R.n)) + 1e-3 * adjopt.TikhonovL2()
    pmap = NodalToElement(msh.cells, msh.n_nodes) if mapped else None
    J = adjopt.ReducedFunctional(R, objective=obj, solver=solver, parameter_map=pmap, **kw)
    p = 0.3 * rng.standard_normal(J.n_params)
    return J, p


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_taylor_rates_and_symmetry(kind, mapped):
    J, p = _problem(kind, mapped=mapped)
    r2 = taylor_test(J, p, order=2)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    # the value's remainders reach the floor set by Newton's tolerance (|lam^T R(u)|) early; the central
    # differences of the gradient resolve the Hessian action to round-off
    assert r3.passed and r3.rate >= 2.8 and r3.gradient_check.rate >= 2.95, r3.table()
    assert check_hessian_symmetry(J, p) < 1e-8
    assert J.stats.newton_iterations >= 3 * J.stats.newton_solves  # nonlinear: several Newton steps per state


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_gives_the_derivatives(solver):
    if not backends()[solver].available():
        pytest.skip(f"{solver} is not installed")
    kind = "cube" if solver == "cholmod" else "quasilinear"  # CHOLMOD needs a symmetric K (beta = 0)
    J, p = _problem(kind, cell="quad", mapped=True, solver=solver)
    assert taylor_test(J, p, order=2).passed
    assert taylor_test(J, p, order=3).passed
    ref, _ = _problem(kind, cell="quad", mapped=True, solver="superlu")
    rtol = 1e-5 if solver == "amg" else 1e-9
    np.testing.assert_allclose(J.gradient(p), ref.gradient(p), rtol=rtol, atol=rtol * np.abs(ref.gradient(p)).max())


def test_one_factorization_of_the_converged_jacobian_serves_every_solve():
    J, p = _problem("quasilinear")
    J.value(p)
    its, facs = J.stats.newton_iterations, J.stats.factorizations
    assert facs == its + 1  # a factorization per Newton step, and the last one at the converged state
    J.gradient(p)
    J.hessp(p, np.ones(J.n_params))
    J.hessp(p, np.arange(J.n_params, dtype=float))
    assert J.stats.factorizations == facs
    assert J.stats.solves["adjoint"] == 1 and J.stats.solves["tangent"] == 2
    assert J.stats.solves["second_adjoint"] == 2
    assert J.stats.newton_solves == 1
    # the gradient is exact for the returned state: matches finite differences of J
    g = J.gradient(p)
    dp = np.random.default_rng(0).standard_normal(p.size)
    h = 1e-5
    fd = (J.value(p + h * dp) - J.value(p - h * dp)) / (2 * h)
    assert g @ dp == pytest.approx(fd, rel=1e-7)


def test_a_released_factorization_is_made_again_from_the_stored_jacobian():
    J, p = _problem("cube", keep_factorizations=1)
    ref, _ = _problem("cube")
    J.value(p)
    J.value(p + 0.1)  # releases p's factorization
    facs = J.stats.factorizations
    np.testing.assert_allclose(J.gradient(p), ref.gradient(p), rtol=1e-10)
    assert J.stats.factorizations == facs + 1  # refactorized K(u(p)), no Newton again
    assert J.stats.newton_solves == 2


def test_warm_start_from_the_nearest_cached_state():
    J, p = _problem("quasilinear")
    J.value(p)
    cold = J.stats.newton_iterations
    J.value(p + 1e-3)
    warm = J.stats.newton_iterations - cold
    assert warm < cold
    Jc, _ = _problem("quasilinear", newton=dict(warm_start=False))
    Jc.value(p)
    Jc.value(p + 1e-3)
    assert Jc.stats.newton_iterations == 2 * cold
    assert J.value(p + 1e-3) == pytest.approx(Jc.value(p + 1e-3), rel=1e-10)


def test_state_is_read_only_and_the_callers_p_is_not_kept():
    J, p = _problem("cube")
    q = p.copy()
    u = J.state(q)
    with pytest.raises(ValueError):
        u[0] = 1.0
    v = J.value(q)
    q += 1.0  # the caller changes its array in place: the cached state stays p's
    assert J.value(p) == v
    assert len(J.newton_history(p)) >= 2 and J.newton_history(p)[-1] <= 1e-10 * J.newton_history(p)[0] + 1e-13


def test_gauss_newton_hessian_drops_the_second_order_terms():
    J, p = _problem("quasilinear")
    dp = np.random.default_rng(1).standard_normal(p.size)
    gn = J.hessp(p, dp, gauss_newton=True)
    full = J.hessp(p, dp)
    assert dp @ gn > 0
    assert np.linalg.norm(gn - full) > 1e-6 * np.linalg.norm(full)  # the residual's curvature matters here
    assert check_hessian_symmetry(_GaussNewton(J), p) < 1e-10


class _GaussNewton:
    def __init__(self, J):
        self.J = J

    def hessp(self, p, dp):
        return self.J.hessp(p, dp, gauss_newton=True)


@pytest.mark.parametrize("method", ["lbfgs", "newton-cg"])
def test_the_optimizers_run_on_a_nonlinear_problem(method):
    J, _ = _problem("quasilinear", n=6)
    p_true = np.zeros(J.n_params)
    # data from the true state: the misfit can be driven to the regularization's level
    d = J.state(p_true).copy()
    J.objective = adjopt.SquaredMisfit(d) + 1e-8 * adjopt.TikhonovL2()
    p0 = np.full(J.n_params, 0.5)
    res = adjopt.minimize(adjopt.Problem(J, p0), method=method, gtol=1e-8, maxiter=200)
    assert res.fun < 1e-4 * J.value(p0)
    # every iteration's record says how many Newton steps its state solves took
    assert all("newton_iterations" in h for h in res.history[1:])
    assert sum(h["newton_iterations"] for h in res.history[1:]) > len(res.history) - 1


def test_the_optimizer_backs_off_where_newton_fails():
    # Bratu with a parametric reaction -exp(p) exp(u): beyond the turning point there is no state. The
    # objective pulls p up, towards the region without a solution; the line search must step back from it.
    msh = meshes.unit_square(6)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    R = fem.diffusion_reaction_residual(msh, dm, diffusion=1.0, reaction=_NegExp(), nonlinearity="exp")
    J = adjopt.ReducedFunctional(R, objective=adjopt.SquaredMisfit(np.full(R.n, 5.0)), solver="superlu",
                                 newton=dict(max_iter=25))
    with pytest.raises(adjopt.NewtonDidNotConverge):
        J.value(np.full(R.n_params, np.log(10.0)))
    res = adjopt.minimize(adjopt.Problem(J, np.zeros(R.n_params)), method="lbfgs", maxiter=15)
    assert np.isfinite(res.fun) and res.fun < J.value(np.zeros(R.n_params))


class _NegExp(adjopt.operators.Coefficient):
    """phi(p) = -exp(p): a reaction -exp(p) exp(u), Bratu's sign."""

    def __call__(self, p):
        with np.errstate(over="ignore"):  # an overflow becomes Inf, which the residual refuses
            return -np.exp(p)

    def d1(self, p):
        return self(p)

    def d2(self, p):
        return self(p)


def test_amg_keeps_its_hierarchy_across_newton_steps():
    J, p = _problem("cube", n=16, solver="amg")
    ref, _ = _problem("cube", n=16, solver="superlu")
    J.value(p)
    its = J.stats.newton_iterations
    assert its >= 3
    assert J.stats.factorizations < its + 1  # fewer hierarchies than Newton's Jacobians
    np.testing.assert_allclose(J.gradient(p), ref.gradient(p), rtol=1e-6, atol=1e-8 * np.abs(ref.gradient(p)).max())
    assert taylor_test(J, p, order=2).passed
    # a quasilinear Jacobian is symmetric at u = 0 only: the first (CG) hierarchy is not reused for the
    # nonsymmetric steps, and the derivatives stay right
    Jq, pq = _problem("quasilinear", n=16, solver="amg")
    refq, _ = _problem("quasilinear", n=16, solver="superlu")
    np.testing.assert_allclose(Jq.gradient(pq), refq.gradient(pq), rtol=1e-6,
                               atol=1e-8 * np.abs(refq.gradient(pq)).max())


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path):
    # Newton starts from the states cached during a run, which the resumed run has not seen: equal to
    # Newton's tolerance, not bit for bit
    def problem():
        J, _ = _problem("quasilinear", n=6)
        return adjopt.Problem(J, np.full(J.n_params, 0.3), name="nonlinear-resume")

    ck = tmp_path / "run.npz"
    adjopt.minimize(problem(), method="lbfgs", maxiter=4, checkpoint=ck)
    resumed = adjopt.minimize(problem(), method="lbfgs", maxiter=12, resume=ck)
    whole = adjopt.minimize(problem(), method="lbfgs", maxiter=12)
    assert resumed.nit == whole.nit == 12
    np.testing.assert_allclose(resumed.x, whole.x, rtol=1e-7, atol=1e-9)


# -- findings of the hostile review, each a test ---------------------------------------------------------------
def _cube(n=5, source=1.0, neumann=False, **kw):
    msh = meshes.unit_square(n)
    dm = fem.condense(msh.n_nodes, [] if neumann else msh.boundary("all"))
    f = dm.restrict_vector(fem.body_force(msh, source))
    R = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", reaction=1.0, nonlinearity="cube", source=f)
    return adjopt.ReducedFunctional(R, objective=adjopt.Norm(), solver="superlu", **kw), R


def test_a_residual_that_overflows_is_not_called_converged():
    J, R = _cube(source=1e160)
    with pytest.raises(adjopt.AdjoptError, match="not finite"):
        J.value(np.zeros(R.n_params))
    J, R = _cube(source=1e200)  # ||R|| of entries near 1e200, squared, would overflow
    with pytest.raises(adjopt.AdjoptError, match="not finite"):
        J.value(np.zeros(R.n_params))
    with pytest.raises(adjopt.NonFiniteError, match="overflow"):
        J.value(np.full(R.n_params, 800.0))  # exp(800): the coefficient overflows, and says so


def test_the_tolerance_is_relative_to_the_problem():
    # a tiny source: the state is tiny, not zero; the cube is negligible, so u is the linear solution
    J, R = _cube(source=5e-13)
    Jlin, _ = _cube(source=5e-13 * 1e10)
    u = J.state(np.zeros(R.n_params))
    assert np.max(u) > 0
    lin = Jlin.state(np.zeros(R.n_params)) * 1e-10
    np.testing.assert_allclose(u, lin, rtol=1e-3)  # u^3 is 1e-11 of u at scale 1; a linear map of the source


def test_newton_options_are_checked_however_they_come():
    J, R = _cube()
    with pytest.raises(ValueError, match="rtol"):
        adjopt.ReducedFunctional(R, objective=adjopt.Norm(), newton=adjopt.NewtonOptions(rtol=-5.0))
    with pytest.raises(ValueError, match="max_iter"):
        J.newton = dict(max_iter=0)
    J.newton = dict(rtol=np.float32(1e-8), line_search=np.bool_(True))
    assert J.newton.rtol == pytest.approx(1e-8) and J.newton.line_search is True
    opts = adjopt.NewtonOptions(max_iter=7)
    J.newton = opts
    opts.max_iter = 1  # the functional keeps its own copy
    assert J.newton.max_iter == 7


def test_solver_failures_inside_newton_say_so():
    # pure Neumann with a cube: K(0) = the Neumann Laplacian, singular at the zero initial guess only
    J, R = _cube(neumann=True)
    with pytest.raises(adjopt.NewtonDidNotConverge, match="initial_guess"):
        J.value(np.zeros(R.n_params))
    # ... and a problem whose state is zero without any Newton step is still refused when K is singular
    msh = meshes.unit_square(4)
    dm = fem.condense(msh.n_nodes, [])
    R0 = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", beta=1.0)
    J0 = adjopt.ReducedFunctional(R0, objective=adjopt.Norm(), solver="superlu")
    with pytest.raises(adjopt.AdjoptError, match="singular"):
        J0.value(np.zeros(R0.n_params))


def test_a_tolerance_below_round_off_is_named():
    J, R = _problem("quasilinear", newton=dict(rtol=1e-300, max_halvings=5))
    with pytest.raises(adjopt.NewtonDidNotConverge, match="round-off"):
        J.value(np.zeros(J.n_params))


def test_a_forced_symmetric_amg_is_refused_for_a_nonsymmetric_jacobian():
    from adjopt.solvers import AMGSolver

    J, _ = _problem("quasilinear")
    with pytest.raises(ValueError, match="symmetric"):
        adjopt.ReducedFunctional(J.residual, objective=J.objective, solver=AMGSolver(symmetric=True))
    J2, _ = _problem("cube")  # a symmetric Jacobian: allowed
    adjopt.ReducedFunctional(J2.residual, objective=J2.objective, solver=AMGSolver(symmetric=True))


def test_finite_differences_switch_warm_starts_off():
    from adjopt.verify import finite_difference_gradient

    n = 6
    C = adjopt.CallbackResidual(lambda u, p: u**3 + u - p, lambda u, p: np.diag(3 * u**2 + 1.0),
                                lambda u, p: -np.eye(n), n, n)
    J = adjopt.ReducedFunctional(C, objective=adjopt.SquaredMisfit(np.zeros(n)), solver="superlu")
    p = np.full(n, 50.0)
    fd = finite_difference_gradient(J, p, h=1e-6)
    np.testing.assert_allclose(fd, J.gradient(p), rtol=1e-4)
    assert J.newton.warm_start is True  # restored


@pytest.mark.parametrize("method", ["lbfgs", "lbfgsb", "newton-cg", "mma"])
def test_every_optimizer_steps_back_where_newton_fails(method):
    msh = meshes.unit_square(6)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    R = fem.diffusion_reaction_residual(msh, dm, diffusion=1.0, reaction=_NegExp(), nonlinearity="exp")
    J = adjopt.ReducedFunctional(R, objective=adjopt.SquaredMisfit(np.full(R.n, 5.0)), solver="superlu",
                                 newton=dict(max_iter=25))
    bounds = (-3.0, 3.0) if method in ("lbfgsb", "mma") else None
    p0 = np.zeros(R.n_params)
    res = adjopt.minimize(adjopt.Problem(J, p0, bounds=bounds), method=method, maxiter=15)
    assert np.isfinite(res.fun) and res.fun < J.value(p0)


def test_a_wrong_jacobian_is_reported_and_a_failed_solve_counted(caplog):
    import scipy.sparse as sp

    from adjopt.errors import NewtonDidNotConverge

    def residual(factor, **kw):
        R = adjopt.CallbackResidual(lambda u, p: p[0] * u ** 3 + u - 1.0,
                                    lambda u, p: sp.diags(factor * (3 * p[0] * u ** 2 + 1.0), format="csr"),
                                    lambda u, p: (u ** 3)[:, None], n=3, n_params=1)
        return adjopt.NonlinearReducedFunctional(R, objective=adjopt.Norm(), solver="superlu", **kw)

    with caplog.at_level("WARNING", logger="adjopt.functional_nonlinear"):
        J = residual(2.0)
        J.value(np.array([1.0]))
        J.value(np.array([1.1]))
    slow = [r for r in caplog.records if "converged only linearly" in r.getMessage()]
    assert len(slow) == 1 and "check_residual" in slow[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="adjopt.functional_nonlinear"):
        good = residual(1.0)
        good.value(np.array([1.0]))
    assert not [r for r in caplog.records if "linearly" in r.getMessage()]
    J = residual(2.0, newton={"max_iter": 3})
    with pytest.raises(NewtonDidNotConverge):
        J.value(np.array([1.0]))
    assert J.stats.newton_iterations == 3
