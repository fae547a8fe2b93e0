"""Nonlinear time stepping, M(p) du/dt + R(u, p) = b(t, p) with Newton at every step: a linear residual gives
the linear functional's numbers, Taylor rates for every scheme and nonlinearity, checkpointing against storing
everything, the Gauss-Newton action against tangents, the schemes' orders on an ODE with a known solution,
the factorization counts, and bad input."""

import os

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.errors import MissingDerivativeError, NewtonDidNotConverge, NonFiniteError, ShapeError
from adjopt.solvers import AMGSolver
from adjopt.transient import (
    Final,
    Modulated,
    NonlinearTransientReducedFunctional,
    TimeFunction,
    TimeSeriesMisfit,
    TimeStepping,
    TransientReducedFunctional,
)
from adjopt.verify import check_hessian_symmetry, taylor_test

SCHEMES = ["implicit_euler", "crank_nicolson", "bdf2"]


def _mesh(n_cells=4):
    msh = meshes.unit_square(n_cells)
    dofs = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    return msh, dofs, dofs.restrict(msh.cells)


def _residual(kind, msh, dofs):
    n = dofs.n_free
    if kind == "linear":
        return fem.diffusion_reaction_residual(msh, dofs, diffusion="exp")
    if kind == "quasilinear":
        return fem.diffusion_reaction_residual(msh, dofs, diffusion="exp", beta=1.0, source=0.05 * np.ones(n))
    if kind == "cube":
        return fem.diffusion_reaction_residual(msh, dofs, diffusion="exp", reaction="exp", nonlinearity="cube")
    return fem.diffusion_reaction_residual(msh, dofs, diffusion=1.0, reaction="exp", nonlinearity="exp")


def _build(kind="quasilinear", scheme="crank_nicolson", where=("M", "b", "u0"), n_steps=6, dt=0.05, **kw):
    """p enters R always, and M, b and u0 where named."""
    msh, dofs, conn = _mesh()
    n = dofs.n_free
    R = _residual(kind, msh, dofs)
    m = R.n_params
    M = (adjopt.ElementCoefficientMatrix(conn, fem.p1_mass(msh), "exp", n=n) if "M" in where
         else fem.assemble(conn, fem.p1_mass(msh), n))
    if "b" in where:
        rhs = Modulated(adjopt.ElementCoefficientVector(conn, np.ones(3) / 3, "exp", n=n), lambda t: 1 + np.sin(3 * t))
    else:
        rhs = TimeFunction(lambda t: np.full(n, np.cos(t)), n)
    u0 = adjopt.AffineVector(0.5 * np.ones(n), sp.random(n, m, density=0.2, random_state=1)) if "u0" in where else None
    rng = np.random.default_rng(0)
    obs = TimeSeriesMisfit(rng.standard_normal((3, 5)), steps=[1, 3, -1], B=sp.random(5, n, density=0.5, random_state=2))
    objective = kw.pop("objective", [obs, Final(adjopt.Norm()), 1e-2 * adjopt.TikhonovL2()])
    J = TransientReducedFunctional(R, M, objective, TimeStepping(scheme, dt=dt, n_steps=n_steps), rhs=rhs, u0=u0,
                                   solver=kw.pop("solver", "superlu"), **kw)
    return J, 0.3 * rng.standard_normal(m)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_linear_residual_gives_the_linear_functionals_value_gradient_and_hessian_action(scheme):
    Jn, p = _build("linear", scheme)
    assert isinstance(Jn, NonlinearTransientReducedFunctional)
    msh, dofs, conn = _mesh()
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=dofs.n_free)
    Jl = TransientReducedFunctional(A, Jn.M_op, [t for t in Jn.terms] + Jn.param_terms, Jn.time, rhs=Jn.rhs,
                                    u0=Jn.u0, solver="superlu")
    assert not isinstance(Jl, NonlinearTransientReducedFunctional)
    dp = np.random.default_rng(5).standard_normal(p.size)
    assert Jn.value(p) == pytest.approx(Jl.value(p), rel=1e-13)
    np.testing.assert_allclose(Jn.gradient(p), Jl.gradient(p), rtol=1e-11, atol=1e-13 * np.abs(Jl.gradient(p)).max())
    h = Jl.hessp(p, dp)
    np.testing.assert_allclose(Jn.hessp(p, dp), h, rtol=1e-10, atol=1e-12 * np.abs(h).max())
    np.testing.assert_allclose(Jn.adjoint(p), Jl.adjoint(p), rtol=1e-10, atol=1e-14)
    # a linear residual: one Newton iteration per step
    assert Jn.stats.newton_iterations == Jn.stats.newton_solves == Jn.time.n_steps


@pytest.mark.parametrize("kind,scheme", [("quasilinear", s) for s in SCHEMES] + [("cube", "crank_nicolson"),
                                                                                   ("cube", "bdf2"),
                                                                                   ("bratu", "implicit_euler")])
def test_taylor_rates_for_every_scheme_and_nonlinearity(kind, scheme):
    J, p = _build(kind, scheme)
    r2 = taylor_test(J, p, order=2)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and r3.rate >= 2.8, r3.table()
    assert check_hessian_symmetry(J, p) < 1e-8
    assert J.stats.newton_iterations > J.stats.newton_solves  # the steps needed Newton


@pytest.mark.parametrize("where", [(), ("M",), ("b",), ("u0",)])
def test_taylor_rates_with_p_in_each_place(where):
    J, p = _build("cube", "crank_nicolson", where=where)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.8


def test_the_gradient_matches_central_differences():
    J, p = _build("quasilinear", "bdf2", n_steps=4)
    g = J.gradient(p)
    rng = np.random.default_rng(3)
    for _ in range(3):
        d = rng.standard_normal(p.size)
        h = 1e-6
        fd = (J.value(p + h * d) - J.value(p - h * d)) / (2 * h)
        assert g @ d == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("schedule", ["multistage", "mixed"])
@pytest.mark.parametrize("scheme", ["crank_nicolson", "bdf2"])
def test_checkpointing_gives_what_storing_everything_gives(schedule, scheme):
    J, p = _build("cube", scheme, n_steps=9)
    K, _ = _build("cube", scheme, n_steps=9, snapshots=2, schedule=schedule)
    dp = np.random.default_rng(1).standard_normal(p.size)
    assert K.value(p) == pytest.approx(J.value(p), rel=1e-12)
    np.testing.assert_allclose(K.gradient(p), J.gradient(p), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(K.hessp(p, dp), J.hessp(p, dp), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(K.hessp(p, dp, gauss_newton=True), J.hessp(p, dp, gauss_newton=True), rtol=1e-9,
                               atol=1e-11)
    assert K.stats.recomputed_steps > 0 and K.stats.checkpoints > 0
    assert J.stats.recomputed_steps == 0


def test_disk_checkpoints_are_written_and_removed(tmp_path):
    J, p = _build("quasilinear", "crank_nicolson", n_steps=8)
    K, _ = _build("quasilinear", "crank_nicolson", n_steps=8, memory=0, checkpoint_dir=tmp_path)
    np.testing.assert_allclose(K.gradient(p), J.gradient(p), rtol=1e-9, atol=1e-12)
    assert K.stats.disk_checkpoints > 0
    assert os.listdir(tmp_path) == []


def test_the_gauss_newton_action_is_the_product_of_tangents():
    """e^T H_GN dp = sum_i w_i (B du_i[e])^T (B du_i[dp]) for a misfit alone, du the state tangents."""
    msh, dofs, conn = _mesh()
    n = dofs.n_free
    rng = np.random.default_rng(2)
    B = sp.random(5, n, density=0.5, random_state=2)
    steps, w = [2, 4, -1], np.array([0.5, 1.0, 2.0])
    obs = TimeSeriesMisfit(rng.standard_normal((3, 5)), steps=steps, B=B, weights=w)
    J, p = _build("cube", "bdf2", objective=obs)
    e, dp = rng.standard_normal((2, p.size))

    def tangent(d, h=1e-6):
        return (J.states(p + h * d) - J.states(p - h * d)) / (2 * h)

    De, Dd = tangent(e), tangent(dp)
    expected = sum(wi * (B @ De[s]) @ (B @ Dd[s]) for wi, s in zip(w, steps))
    assert e @ J.hessp(p, dp, gauss_newton=True) == pytest.approx(expected, rel=1e-6)
    # the full Hessian differs by the terms of the constraint's curvature
    assert not np.allclose(J.hessp(p, dp), J.hessp(p, dp, gauss_newton=True))


def test_amg_gives_the_direct_solvers_gradient():
    J, p = _build("quasilinear", "crank_nicolson")
    K, _ = _build("quasilinear", "crank_nicolson", solver=AMGSolver(tol=1e-12))
    assert K.value(p) == pytest.approx(J.value(p), rel=1e-9)
    np.testing.assert_allclose(K.gradient(p, tol=1e-12), J.gradient(p), rtol=1e-6, atol=1e-9)


def _decay(scheme, n_steps, t_end=1.0, c=1.0, u_start=1.0, **kw):
    """u' + c u^3 = 0, u(0) = u_start: exact u(t) = 1 / sqrt(2 c t + 1 / u_start^2)."""
    R = adjopt.CallbackResidual(lambda u, p: p[0] * u ** 3, lambda u, p: sp.csr_array([[3 * p[0] * u[0] ** 2]]),
                                lambda u, p: np.array([[u[0] ** 3]]), n=1, n_params=1,
                                second=lambda u, p, w, du, dp: (np.array([w[0] * (6 * p[0] * u[0] * du[0] + 3 * u[0] ** 2 * dp[0])]),
                                                                np.array([w[0] * 3 * u[0] ** 2 * du[0]])))
    time = TimeStepping(scheme, dt=t_end / n_steps, n_steps=n_steps)
    J = TransientReducedFunctional(R, None, Final(adjopt.Norm()), time, u0=np.array([u_start]), solver="superlu",
                                   **kw)
    return J, np.array([c])


@pytest.mark.parametrize("scheme,order", [("implicit_euler", 1), ("crank_nicolson", 2), ("bdf2", 2)])
def test_an_ode_with_a_known_solution_converges_at_the_schemes_order(scheme, order):
    errors = []
    for N in (20, 40, 80):
        J, p = _decay(scheme, N)
        errors.append(abs(J.state(p)[0] - 1 / np.sqrt(2 * 1.0 + 1.0)))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(np.abs(rates - order) < 0.15), rates
    J, p = _decay(scheme, 10)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.8


def test_factorizations_one_per_newton_iteration_and_per_reverse_step():
    J, p = _build("cube", "crank_nicolson", n_steps=5)
    J.value(p)
    its = J.stats.newton_iterations
    assert J.stats.factorizations == its
    J.gradient(p)
    assert J.stats.factorizations == its + 5
    J.hessp(p, np.ones_like(p))
    assert J.stats.factorizations == its + 15  # tangent and second adjoint: one each per step
    assert J.stats.time_steps == 5  # the trajectory was kept: no step solved again


def test_newton_that_does_not_converge_names_the_step_and_leaves_no_checkpoint_files(tmp_path):
    J, p = _build("cube", "implicit_euler", newton={"max_iter": 1, "rtol": 1e-12}, memory=0,
                  checkpoint_dir=tmp_path)
    with pytest.raises(NewtonDidNotConverge, match=r"step 1 of 6.*max_iter") as info:
        J.gradient(p)
    assert len(info.value.residuals) == 2
    assert os.listdir(tmp_path) == []


def test_a_march_whose_state_overflows_is_refused():
    # u' = u^3 (c = -1) from u = 2 blows up at t = 1/8: Newton finds no state, or the states overflow
    J, p = _decay("implicit_euler", 40, c=-1.0, u_start=2.0)
    with pytest.raises((NewtonDidNotConverge, NonFiniteError), match="step"):
        J.value(p)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown Newton option"):
        _build("cube", newton={"rtl": 1e-8})
    with pytest.raises(ValueError, match="max_iter"):
        _build("cube", newton={"max_iter": 0})
    msh, dofs, conn = _mesh()
    R = _residual("cube", msh, dofs)
    with pytest.raises(ShapeError, match="mass"):
        TransientReducedFunctional(R, sp.identity(R.n + 1, format="csr"), Final(adjopt.Norm()),
                                   TimeStepping(dt=0.1, n_steps=2))
    with pytest.raises(TypeError, match="NonlinearTransientReducedFunctional"):
        # the linear class's own constructor, called on itself, does not step a residual
        TransientReducedFunctional.__init__(object.__new__(TransientReducedFunctional), R, None, Final(adjopt.Norm()),
                                            TimeStepping(dt=0.1, n_steps=2))
    # a callback residual without its second-order callback: values, gradients and Gauss-Newton work
    Rc = adjopt.CallbackResidual(lambda u, p: p[0] * u ** 3, lambda u, p: sp.diags(3 * p[0] * u ** 2),
                                 lambda u, p: (u ** 3)[:, None], n=3, n_params=1)
    J = TransientReducedFunctional(Rc, None, Final(adjopt.Norm()), TimeStepping(dt=0.1, n_steps=3),
                                   u0=np.ones(3))
    p = np.array([1.0])
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert np.isfinite(J.hessp(p, p, gauss_newton=True)).all()
    with pytest.raises(MissingDerivativeError, match="second"):
        J.hessp(p, p)


def test_inputs_are_copied():
    J, p = _build("quasilinear", "bdf2", n_steps=4)
    q = p.copy()
    g = J.gradient(q)
    q += 1.0  # an in-place change of the caller's array after the call
    np.testing.assert_array_equal(J.gradient(p), g)
    dp = np.ones_like(p)
    h = J.hessp(p, dp)
    dp[:] = 0.0
    np.testing.assert_array_equal(J.hessp(p, np.ones_like(p)), h)


def test_a_block_of_directions_gives_the_single_actions():
    J, p = _build("cube", "bdf2", n_steps=4)
    D = np.random.default_rng(4).standard_normal((p.size, 3))
    H = J.hessp(p, D)
    assert H.shape == (p.size, 3)
    for i in range(3):
        np.testing.assert_allclose(H[:, i], J.hessp(p, D[:, i]), rtol=1e-12, atol=1e-14)


def _wrong_jacobian(factor=2.0):
    """R(u, p) = p u^3 + u - 1 with a Jacobian ``factor`` times the true one: Newton converges linearly."""
    return adjopt.CallbackResidual(lambda u, p: p[0] * u ** 3 + u - 1.0,
                                   lambda u, p: sp.diags(factor * (3 * p[0] * u ** 2 + 1.0), format="csr"),
                                   lambda u, p: (u ** 3)[:, None], n=3, n_params=1)


def test_a_wrong_jacobian_is_reported_once_and_counted(caplog):
    J = TransientReducedFunctional(_wrong_jacobian(), None, Final(adjopt.Norm()), TimeStepping(dt=1.0, n_steps=4),
                                   u0=np.zeros(3))
    with caplog.at_level("WARNING", logger="adjopt.transient.nonlinear"):
        J.value(np.array([1.0]))
    slow = [r for r in caplog.records if "converged only linearly" in r.getMessage()]
    assert len(slow) == 1 and "check_residual" in slow[0].getMessage() and "step 1" in slow[0].getMessage()
    assert J.stats.newton_iterations >= 4 * 8  # a factor 10 per step needs several linear iterations
    # the true Jacobian converges quadratically: no warning
    caplog.clear()
    good = TransientReducedFunctional(_wrong_jacobian(1.0), None, Final(adjopt.Norm()),
                                      TimeStepping(dt=1.0, n_steps=4), u0=np.zeros(3))
    with caplog.at_level("WARNING", logger="adjopt.transient.nonlinear"):
        good.value(np.array([1.0]))
    assert not [r for r in caplog.records if "linearly" in r.getMessage()]
    assert good.stats.newton_iterations < J.stats.newton_iterations / 2


def test_the_iterations_of_a_failed_newton_solve_are_counted():
    J = TransientReducedFunctional(_wrong_jacobian(), None, Final(adjopt.Norm()), TimeStepping(dt=1.0, n_steps=4),
                                   u0=np.zeros(3), newton={"max_iter": 3})
    with pytest.raises(NewtonDidNotConverge, match="step 1 of 4"):
        J.value(np.array([1.0]))
    assert J.stats.newton_iterations == 3


def test_a_tolerance_is_checked_when_the_gradient_is_cached():
    J, p = _build("cube", "implicit_euler", n_steps=4)
    J.gradient(p)
    for bad in (2.0, 0.0, -1e-3, True):
        with pytest.raises(ValueError, match="tol"):
            J.gradient(p, tol=bad)


def test_the_residual_may_be_passed_by_keyword():
    msh, dofs, conn = _mesh()
    R = _residual("cube", msh, dofs)
    for kw in ({"stiffness": R}, {"residual": R}):
        J = TransientReducedFunctional(**kw, mass=None, objective=Final(adjopt.Norm()),
                                       time=TimeStepping(dt=0.1, n_steps=2), u0=np.ones(R.n))
        assert isinstance(J, NonlinearTransientReducedFunctional) and J.residual is R
    with pytest.raises(TypeError, match="once"):
        NonlinearTransientReducedFunctional(R, stiffness=R, mass=None, objective=Final(adjopt.Norm()),
                                            time=TimeStepping(dt=0.1, n_steps=2))


def test_cholmod_is_refused_for_a_jacobian_that_is_not_declared_symmetric():
    pytest.importorskip("sksparse")
    msh, dofs, conn = _mesh()
    R = fem.diffusion_reaction_residual(msh, dofs, diffusion="exp", beta=1.0)
    assert not R.symmetric
    with pytest.raises(ValueError, match="cholmod.*symmetric.*pardiso"):
        TransientReducedFunctional(R, None, Final(adjopt.Norm()), TimeStepping(dt=0.1, n_steps=2), u0=np.ones(R.n),
                                   solver="cholmod")
    with pytest.raises(ValueError, match="cholmod.*symmetric"):
        adjopt.NonlinearReducedFunctional(R, objective=adjopt.Norm(), solver="cholmod")
    # a symmetric one is accepted (beta = 0)
    Rs = fem.diffusion_reaction_residual(msh, dofs, diffusion="exp", reaction="exp", nonlinearity="cube")
    assert Rs.symmetric
    J = TransientReducedFunctional(Rs, None, Final(adjopt.Norm()), TimeStepping(dt=0.1, n_steps=2), u0=np.ones(Rs.n),
                                   solver="cholmod")
    assert np.isfinite(J.value(np.zeros(Rs.n_params)))
