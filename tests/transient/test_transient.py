"""TransientReducedFunctional: Taylor rates for every scheme and every place p enters, a dense all-at-once
reference, the orders of the schemes, checkpointing (memory and disk) against storing everything, the
one-factorization-per-step-matrix count, and bad input."""

import os

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.transient import (
    AtSteps,
    Final,
    Modulated,
    SpaceTimeSource,
    TimeFunction,
    TimeSeriesMisfit,
    TimeStepping,
    TransientReducedFunctional,
)
from adjopt.verify import check_hessian_symmetry, taylor_test

SCHEMES = [("implicit_euler", {}), ("crank_nicolson", {}), ("theta", {"theta": 0.7}), ("bdf2", {})]


def _parts(n_cells=4):
    msh = meshes.unit_square(n_cells)
    dofs = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    conn = dofs.restrict(msh.cells)
    return msh, dofs, conn


def _build(scheme="crank_nicolson", opts=None, n_steps=6, where=("A", "M", "b", "u0"), source="modulated",
           memory=2**30, dt=0.05, steps=None, **kw):
    """A heat-like problem where p enters the places named in ``where``."""
    msh, dofs, conn = _parts()
    n = dofs.n_free
    K = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=n)
    m = K.n_params
    A = K if "A" in where else K.assemble(np.zeros(m))
    if "M" in where:
        M = adjopt.ElementCoefficientMatrix(conn, fem.p1_mass(msh), "exp", n=n)
    else:
        M = fem.assemble(conn, fem.p1_mass(msh), n)
    rng = np.random.default_rng(0)
    rhs = None
    if "b" in where and source == "modulated":
        rhs = Modulated(adjopt.ElementCoefficientVector(conn, np.ones(3) / 3, "exp", n=n), lambda t: 1 + np.sin(3 * t))
    elif "b" in where and source == "steady":
        rhs = adjopt.ElementCoefficientVector(conn, np.ones(3) / 3, "exp", n=n)
    elif "b" in where and source == "spacetime":
        Ms = fem.assemble(conn, fem.p1_mass(msh), n)
        rhs = SpaceTimeSource(Ms, np.linspace(0, 0.3, m // n + 1)[: max(m // n, 1)])
    elif source == "forcing" or "b" not in where:  # a forcing that does not depend on p
        rhs = TimeFunction(lambda t: np.full(n, np.cos(t)), n)
    u0 = None
    if "u0" in where:
        u0 = adjopt.AffineVector(0.1 * np.ones(n), sp.random(n, m, density=0.2, random_state=1))
    time = TimeStepping(scheme, dt=None if steps is not None else dt, n_steps=None if steps is not None else n_steps,
                        steps=steps, **(opts or {}))
    obs = TimeSeriesMisfit(rng.standard_normal((3, 5)), steps=[1, 3, -1], B=sp.random(5, n, density=0.5, random_state=2))
    objective = [obs, Final(adjopt.Norm()), 1e-2 * adjopt.TikhonovL2()]
    J = TransientReducedFunctional(A, M, objective, time, rhs=rhs, u0=u0, solver=kw.pop("solver", "superlu"),
                                   memory=memory, **kw)
    return J, 0.3 * rng.standard_normal(J.n_params)


@pytest.mark.parametrize("scheme,opts", SCHEMES)
@pytest.mark.parametrize("where", [("A", "M", "b", "u0"), ("A",), ("M",), ("b",), ("u0",)])
def test_taylor_rates_for_every_scheme_and_every_place_p_enters(scheme, opts, where):
    J, p = _build(scheme, opts, where=where)
    r2 = taylor_test(J, p, order=2)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and not r3.rate < 2.8, r3.table()  # nan: J quadratic, remainders at round-off
    assert check_hessian_symmetry(J, p) < 1e-8


@pytest.mark.parametrize("source", ["steady", "spacetime"])
def test_taylor_rates_for_every_source(source):
    J, p = _build("bdf2", where=("A", "b") if source == "steady" else ("b",), source=source, n_steps=8)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert not taylor_test(J, p, order=3).rate < 2.8


def test_prescribed_variable_steps_taylor_and_one_factorization_per_step_matrix():
    steps = [0.05, 0.02, 0.05, 0.02, 0.08, 0.05]
    for scheme, opts, distinct in (("crank_nicolson", {}, 3), ("bdf2", {}, 5)):
        J, p = _build(scheme, opts, steps=steps, source="forcing")
        assert taylor_test(J, p, order=2).rate >= 1.9
        assert not taylor_test(J, p, order=3).rate < 2.8
        J.reset_stats()
        q = p + 0.1
        J.value(q), J.gradient(q), J.hessp(q, np.ones_like(q))
        # theta: one matrix per distinct dt; BDF2: implicit Euler first, then one per distinct (ratio, dt)
        assert J.stats.factorizations == distinct


def _dense_reference(J, p):
    """J(p) by one dense all-at-once solve of every step, written from the textbook schemes (theta and BDF2
    with an implicit Euler first step), independent of the functional's march."""
    A = J.A_op.assemble(p).toarray()
    M = J._M_fixed.toarray()
    n, N = J.n, J.time.n_steps
    dt, t = J.time.dt, J.time.times
    theta = J.time.theta
    b = [J.rhs.value(tk, p) for tk in t]
    u0 = J.u0.value(p)
    L = np.zeros((N * n, N * n))
    F = np.zeros(N * n)

    def blk(i, j, X):
        if j >= 1:
            L[(i - 1) * n:i * n, (j - 1) * n:j * n] += X

    for k in range(1, N + 1):
        h = dt[k - 1]
        if J.time.scheme != "bdf2":
            rows = [(k, M + theta * h * A), (k - 1, -(M - (1 - theta) * h * A))]
            f = h * (theta * b[k] + (1 - theta) * b[k - 1])
        elif k == 1:
            rows, f = [(1, M + h * A), (0, -M)], h * b[1]
        else:
            w = h / dt[k - 2]
            rows = [(k, (1 + 2 * w) / (1 + w) * M + h * A), (k - 1, -(1 + w) * M), (k - 2, w * w / (1 + w) * M)]
            f = h * b[k]
        F[(k - 1) * n:k * n] = f
        for j, X in rows:
            if j >= 1:
                blk(k, j, X)
            else:
                F[(k - 1) * n:k * n] -= X @ u0
    U = np.linalg.solve(L, F).reshape(N, n)
    U = np.vstack([u0, U])
    total = 0.0
    for term in J.terms:
        for i, lv in enumerate(term.resolve(N)):
            total += term.value(i, U[lv], p)
    return total + sum(o.value(None, p) for o in J.param_terms)


@pytest.mark.parametrize("scheme,opts", SCHEMES)
def test_value_and_gradient_match_a_dense_all_at_once_reference(scheme, opts):
    J, p = _build(scheme, opts, where=("A", "b", "u0"), steps=[0.05, 0.03, 0.05, 0.04, 0.06])
    assert J.value(p) == pytest.approx(_dense_reference(J, p), rel=1e-11)
    g = J.gradient(p)
    h = 1e-6
    fd = np.array([(_dense_reference(J, p + h * e) - _dense_reference(J, p - h * e)) / (2 * h)
                   for e in np.eye(p.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())


@pytest.mark.parametrize("scheme,opts,order", [("implicit_euler", {}, 1), ("crank_nicolson", {}, 2),
                                               ("theta", {"theta": 0.5}, 2), ("bdf2", {}, 2)])
def test_schemes_converge_at_their_order(scheme, opts, order):
    """u' + k u = 0 for modes with rates k (M = I): the final state against exp(-k T) u0."""
    k = np.array([0.5, 2.0, 5.0])
    A = sp.diags(k).tocsr()
    u0 = adjopt.AffineVector(np.ones(3), sp.identity(3).tocsr())
    errs = []
    for N in (20, 40, 80):
        time = TimeStepping(scheme, dt=1.0 / N, n_steps=N, **opts)
        J = TransientReducedFunctional(A, None, Final(adjopt.Norm()), time, u0=u0, solver="superlu")
        uN = J.states(np.zeros(3))[-1]
        errs.append(np.abs(uN - np.exp(-k)).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > order - 0.1) and np.all(rates < order + 0.3), rates


def test_variable_step_bdf2_keeps_second_order():
    k = np.array([1.0, 3.0])
    A = sp.diags(k).tocsr()
    u0 = adjopt.AffineVector(np.ones(2), sp.identity(2).tocsr())
    errs = []
    for N in (20, 40, 80):
        base = np.where(np.arange(N) % 2 == 0, 0.6, 1.4)  # alternating steps, ratio 7/3
        steps = base / base.sum()
        J = TransientReducedFunctional(A, None, Final(adjopt.Norm()), TimeStepping("bdf2", steps=steps), u0=u0,
                                       solver="superlu")
        errs.append(np.abs(J.states(np.zeros(2))[-1] - np.exp(-k)).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > 1.8), rates


def test_store_all_costs_one_solve_per_step_and_march():
    J, p = _build("crank_nicolson", n_steps=10)
    N = 10
    dp = np.random.default_rng(1).standard_normal(p.size)
    J.value(p), J.gradient(p), J.hessp(p, dp)
    s = J.stats
    assert s.factorizations == 1
    assert dict(s.solves) == {"forward": N, "adjoint": N, "tangent": N, "second_adjoint": N}
    assert s.recomputed_steps == 0 and s.checkpoints == 0
    J.hessp(p, 2 * dp)  # again at the same p: two more solves per step, nothing else
    assert s.solves["tangent"] == 2 * N and s.solves["forward"] == N and s.factorizations == 1
    J2, _ = _build("bdf2", n_steps=10)
    J2.value(p), J2.gradient(p), J2.hessp(p, dp)
    assert J2.stats.factorizations == 2  # implicit Euler's first step and BDF2's


@pytest.mark.parametrize("scheme,opts", SCHEMES)
@pytest.mark.parametrize("vectors", [4, 7, 40])
def test_checkpointing_gives_what_storing_everything_gives(scheme, opts, vectors):
    N = 24
    ref, p = _build(scheme, opts, n_steps=N)
    dp = np.random.default_rng(2).standard_normal(p.size)
    g, h = ref.gradient(p), ref.hessp(p, dp)
    J, _ = _build(scheme, opts, n_steps=N, memory=vectors * 8 * ref.n)
    np.testing.assert_allclose(J.gradient(p), g, rtol=1e-12, atol=1e-14 * np.abs(g).max())
    np.testing.assert_allclose(J.hessp(p, dp), h, rtol=1e-12, atol=1e-14 * np.abs(h).max())
    assert J.value(p) == pytest.approx(ref.value(p), rel=1e-14)
    if vectors < N:
        assert J.stats.recomputed_steps > 0 and J.stats.checkpoints > 0
        assert J.stats.stored_states < ref.stats.stored_states
        # the budget holds: checkpoints within it, plus the working levels of a Hessian action's march
        assert J.stats.stored_states <= vectors + 2 * (J.time.history + 2)


def test_disk_checkpoints_are_written_and_removed(tmp_path):
    N = 30
    ref, p = _build("bdf2", n_steps=N)
    dp = np.ones(p.size)
    J, _ = _build("bdf2", n_steps=N, memory=2 * 8 * ref.n, checkpoint_dir=tmp_path)
    np.testing.assert_allclose(J.gradient(p), ref.gradient(p), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(J.hessp(p, dp), ref.hessp(p, dp), rtol=1e-12, atol=1e-14)
    assert J.stats.disk_checkpoints > 0
    assert os.listdir(tmp_path) == []


def test_an_error_in_the_reverse_march_removes_the_disk_checkpoints(tmp_path):
    class Failing(TimeSeriesMisfit):
        def grad_u(self, i, u, p):
            raise RuntimeError("boom")

    msh, dofs, conn = _parts()
    n = dofs.n_free
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=n)
    M = fem.assemble(conn, fem.p1_mass(msh), n)
    obj = Failing(np.zeros((1, n)), steps=[-1])
    J = TransientReducedFunctional(A, M, obj, TimeStepping(dt=0.1, n_steps=20), rhs=np.ones(n), memory=8 * n,
                                   checkpoint_dir=tmp_path, solver="superlu")
    with pytest.raises(RuntimeError, match="boom"):
        J.gradient(np.zeros(A.n_params))
    assert J.stats.disk_checkpoints > 0
    assert os.listdir(tmp_path) == []


def test_inputs_are_copied_and_the_cache_keyed_on_a_copy():
    msh, dofs, conn = _parts()
    n = dofs.n_free
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=n)
    M = fem.assemble(conn, fem.p1_mass(msh), n)
    data = np.ones((2, n))
    steps = np.array([2, 4])
    b = np.ones(n)
    obj = TimeSeriesMisfit(data, steps)
    J = TransientReducedFunctional(A, M, obj, TimeStepping(dt=0.1, n_steps=4), rhs=b, solver="superlu")
    p = np.zeros(A.n_params)
    v = J.value(p)
    data[:] = 5.0
    steps[:] = 0
    b[:] = -3.0
    M.data[:] = 7.0
    assert J.value(np.zeros(A.n_params)) == v
    p[:] = 1.0  # the caller's p changes: the functional does not answer with the cached value of p = 0
    J2 = TransientReducedFunctional(A, fem.assemble(conn, fem.p1_mass(msh), n), TimeSeriesMisfit(np.ones((2, n)),
                                    [2, 4]), TimeStepping(dt=0.1, n_steps=4), rhs=np.ones(n), solver="superlu")
    assert J.value(p) == pytest.approx(J2.value(np.ones(A.n_params)), rel=1e-14)


def test_newton_cg_on_the_hessian_actions_reaches_a_stationary_point():
    J, p = _build("crank_nicolson", where=("b",), source="spacetime", n_steps=10)
    res = adjopt.minimize(adjopt.Problem(J, p), method="newton-cg", gtol=1e-10)
    assert np.linalg.norm(J.gradient(res.x)) < 1e-8 * np.linalg.norm(J.gradient(p))
    assert J.value(res.x) < J.value(p)


def _small():
    """(n, A(p), M, a 5-step grid, a final-time objective) of the small heat problem of the input tests."""
    msh, dofs, conn = _parts()
    n = dofs.n_free
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=n)
    return n, A, fem.assemble(conn, fem.p1_mass(msh), n), TimeStepping(dt=0.1, n_steps=5), Final(adjopt.Norm())


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(scheme="rk4", dt=0.1, n_steps=3), ValueError, "unknown scheme"),
    (dict(dt=0.0, n_steps=3), ValueError, "positive"),
    (dict(dt=float("nan"), n_steps=3), adjopt.NonFiniteError, "finite"),
    (dict(dt=0.1, n_steps=0), ValueError, "n_steps"),
    (dict(dt=0.1, n_steps=2.5), ValueError, "n_steps"),
    (dict(scheme="theta", dt=0.1, n_steps=3), ValueError, "needs theta"),
    (dict(scheme="theta", dt=0.1, n_steps=3, theta=1.5), ValueError, r"\[0, 1\]"),
    (dict(scheme="bdf2", dt=0.1, n_steps=3, theta=0.5), ValueError, "theta is an option"),
    (dict(dt=0.1, n_steps=3, steps=[0.1]), ValueError, "not both"),
    (dict(steps=[0.1, -0.1]), ValueError, "positive"),
    (dict(steps=[0.1, np.inf]), adjopt.NonFiniteError, "NaN or Inf"),
    (dict(), ValueError, "give dt and n_steps"),
])
def test_bad_time_grids_are_refused(kwargs, err, match):
    with pytest.raises(err, match=match):
        TimeStepping(**kwargs)


def test_bad_functional_input_is_refused(tmp_path):
    n, A, M, time, obj = _small()
    with pytest.raises(TypeError, match="AtSteps"):
        TransientReducedFunctional(A, M, adjopt.SquaredMisfit(np.zeros(n)), time)
    with pytest.raises(ValueError, match="outside 0..5"):
        TransientReducedFunctional(A, M, AtSteps(adjopt.Norm(), [6]), time)
    with pytest.raises(ValueError, match="appears twice"):
        TransientReducedFunctional(A, M, AtSteps(adjopt.Norm(), [2, -4]), time)
    with pytest.raises(adjopt.ShapeError, match="mass"):
        TransientReducedFunctional(A, sp.identity(n + 1).tocsr(), obj, time)
    with pytest.raises(adjopt.ShapeError, match="right-hand side"):
        TransientReducedFunctional(A, M, obj, time, rhs=np.ones(n + 1))
    with pytest.raises(adjopt.ShapeError, match="u0"):
        TransientReducedFunctional(A, M, obj, time, u0=np.ones(n - 1))
    with pytest.raises(adjopt.ShapeError, match="number of parameters"):
        TransientReducedFunctional(A, M, obj, time, u0=adjopt.AffineVector(None, np.ones((n, 3))))
    with pytest.raises(ValueError, match="nothing depends on p"):
        TransientReducedFunctional(A.assemble(np.zeros(A.n_params)), M, obj, time, rhs=np.ones(n))
    with pytest.raises(ValueError, match="unknown schedule"):
        TransientReducedFunctional(A, M, obj, time, schedule="revolve2")
    with pytest.raises(ValueError, match="snapshots"):
        TransientReducedFunctional(A, M, obj, time, snapshots=0)
    with pytest.raises(TypeError, match="TimeStepping"):
        TransientReducedFunctional(A, M, obj, 0.1)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        TransientReducedFunctional(A, M, obj, time, checkpoint_dir=tmp_path / "missing")
    with pytest.raises(adjopt.ShapeError, match="len\\(steps\\)"):
        TimeSeriesMisfit(np.zeros((3, n)), [1, 2])
    with pytest.raises(TypeError, match="integer time levels"):
        TimeSeriesMisfit(np.zeros((1, n)), [0.5])
    J = TransientReducedFunctional(A, M, obj, time, rhs=np.ones(n), memory=8 * n - 1, solver="superlu")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        J.gradient(np.zeros(A.n_params))
    with pytest.raises(adjopt.ShapeError):
        J.value(np.zeros(A.n_params + 1))
    with pytest.raises(adjopt.NonFiniteError):
        J.value(np.full(A.n_params, np.nan))
    bad = TransientReducedFunctional(A, M, obj, time, rhs=TimeFunction(lambda t: np.full(n, np.nan), n),
                                     solver="superlu")
    with pytest.raises(adjopt.NonFiniteError, match="f\\(t\\)"):
        bad.value(np.zeros(A.n_params))


def test_a_singular_step_matrix_is_refused():
    msh, dofs, conn = _parts()
    n = dofs.n_free
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=n)
    M = sp.csr_array((n, n))  # explicit Euler with a zero mass matrix: S = M is singular
    J = TransientReducedFunctional(A, M, Final(adjopt.Norm()), TimeStepping("theta", theta=0.0, dt=0.1, n_steps=3),
                                   rhs=np.ones(n), solver="superlu")
    with pytest.raises(adjopt.SingularMatrixError):
        J.value(np.zeros(A.n_params))


def test_gauss_newton_hessian_actions():
    # p only in a source linear in p: the state is affine in p, so with a quadratic misfit the Gauss-Newton
    # Hessian is the Hessian
    J, p = _build("bdf2", where=("b",), source="spacetime", n_steps=8)
    J.terms = J.terms[:1]  # the time-series misfit alone (quadratic in u)
    J._levels = {lv: [(t, i) for t, i in v if t is J.terms[0]] for lv, v in J._levels.items()}
    rng = np.random.default_rng(5)
    v, w = rng.standard_normal((2, p.size))
    np.testing.assert_allclose(J.hessp(p, v, gauss_newton=True), J.hessp(p, v), rtol=1e-10, atol=1e-12)
    # p in A: Gauss-Newton drops the curvature of the constraint, but stays symmetric and semidefinite
    J, p = _build("crank_nicolson", where=("A",), n_steps=8)
    v, w = rng.standard_normal((2, p.size))
    J.terms = J.terms[:1]
    J._levels = {lv: [(t, i) for t, i in vv if t is J.terms[0]] for lv, vv in J._levels.items()}
    Hv, Hw = J.hessp(p, v, gauss_newton=True), J.hessp(p, w, gauss_newton=True)
    assert abs(w @ Hv - v @ Hw) < 1e-10 * max(abs(w @ Hv), 1e-300)
    assert v @ Hv > 0 and w @ Hw > 0
    assert np.linalg.norm(Hv - J.hessp(p, v)) > 1e-6 * np.linalg.norm(Hv)
    assert J.stats.solves["adjoint"] == 8  # the full Hessian's gradient march; Gauss-Newton needs none


@pytest.mark.parametrize("schedule,snapshots,promised", [("multistage", 10, 4.636), ("multistage", 40, 3.097),
                                                        ("mixed", 10, 3.921), ("mixed", 40, 2.142)])
def test_forward_steps_per_step_are_what_the_schedule_promises(schedule, snapshots, promised):
    """N = 1000: Revolve's (binomial) and the mixed schedule's counts, the first forward sweep included."""
    N = 1000
    J, p = _build("crank_nicolson", n_steps=N, dt=1e-3, schedule=schedule, snapshots=snapshots)
    J.gradient(p)
    assert J.stats.time_steps / N == pytest.approx(promised, abs=1e-3)
    assert J.stats.recomputed_steps == J.stats.time_steps - N
    # memory grows with the checkpoints, not with N: the checkpoints plus a few working levels
    unit = 2 if schedule == "mixed" else 1  # a mixed checkpoint may hold one adjoint step's two levels
    assert J.stats.stored_states <= unit * snapshots + 3


@pytest.mark.parametrize("scheme,opts", [("crank_nicolson", {}), ("bdf2", {})])
@pytest.mark.parametrize("on_disk", [False, True])
def test_mixed_schedule_gives_what_storing_everything_gives(scheme, opts, on_disk, tmp_path):
    N = 30
    ref, p = _build(scheme, opts, n_steps=N)
    dp = np.random.default_rng(4).standard_normal(p.size)
    kw = dict(checkpoint_dir=tmp_path, memory=0, disk_snapshots=5) if on_disk else dict(snapshots=5)
    J, _ = _build(scheme, opts, n_steps=N, schedule="mixed", **kw)
    np.testing.assert_allclose(J.gradient(p), ref.gradient(p), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(J.hessp(p, dp), ref.hessp(p, dp), rtol=1e-12, atol=1e-14)
    assert J.stats.recomputed_steps > 0
    assert (J.stats.disk_checkpoints > 0) == on_disk
    assert os.listdir(tmp_path) == []


def test_a_march_that_blows_up_names_the_step_and_leaves_no_checkpoint_files(tmp_path):
    J, p = _build("theta", {"theta": 0.0}, n_steps=2000, dt=1.0, memory=8 * 9 * 3, checkpoint_dir=tmp_path)
    with pytest.raises(adjopt.NonFiniteError, match=r"blew up at step \d+ of 2000.*theta >= 1/2"):
        J.gradient(p)
    assert J.stats.disk_checkpoints > 0
    assert os.listdir(tmp_path) == []


def test_progress_is_reported_for_every_step_of_every_march():
    calls = []
    J, p = _build("crank_nicolson", n_steps=12, progress=lambda phase, k, n: calls.append((phase, k, n)))
    J.gradient(p)
    assert [c for c in calls if c[0] == "forward"] == [("forward", k, 12) for k in range(1, 13)]
    assert [c for c in calls if c[0] == "reverse"] == [("reverse", k, 12) for k in range(1, 13)]
    with pytest.raises(TypeError, match="progress"):
        _build(progress=3)


@pytest.mark.parametrize("scheme,order", [("implicit_euler", 1), ("crank_nicolson", 2), ("bdf2", 2)])
def test_a_manufactured_heat_solution_converges_at_the_schemes_order(scheme, order):
    """u(t) = (1 + sin 2t) v on a P1 mesh, with the forcing f(t) = M u' + A u that makes it exact for the
    semi-discrete system: the time error at t = 1 against the exact u."""
    msh, dofs, conn = _parts(6)
    n = dofs.n_free
    K = fem.assemble(conn, fem.p1_stiffness(msh), n)
    M = fem.assemble(conn, fem.p1_mass(msh), n)
    v = np.sin(np.arange(1, n + 1))
    f = TimeFunction(lambda t: 2 * np.cos(2 * t) * (M @ v) + (1 + np.sin(2 * t)) * (K @ v), n)
    u0 = adjopt.AffineVector(v, np.zeros((n, 1)))
    errs = []
    for N in (40, 80, 160):  # BDF2's implicit-Euler start is O(dt^2) globally but reaches rate 2 late: 1.61 at 10
        J = TransientReducedFunctional(K, M, None, TimeStepping(scheme, dt=1.0 / N, n_steps=N), rhs=f, u0=u0,
                                       solver="superlu")
        errs.append(np.abs(J.states(np.zeros(1))[-1] - (1 + np.sin(2.0)) * v).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > order - 0.15) and np.all(rates < order + 0.3), rates


def test_a_new_solver_drops_the_cached_factorizations_and_keeps_the_counters_kind():
    J, p = _build("crank_nicolson", n_steps=5)
    v = J.value(p)
    J.solver = "amg"
    assert J.stats.factorizations == 0 and J.stats.time_steps == 0
    assert J.value(p) == pytest.approx(v, rel=1e-6)
    assert J.stats.factorizations == 1 and J.stats.time_steps == 5
    np.testing.assert_allclose(J.state(p), J.states(p)[-1])
    J.cache.clear()
    J.state(p)
    assert J.stats.factorizations == 2


def test_a_first_hessian_action_keeps_what_fits_and_the_next_costs_two_solves_per_step():
    N = 10
    J, p = _build("crank_nicolson", n_steps=N)
    dp = np.ones(p.size)
    J.hessp(p, dp)
    assert dict(J.stats.solves) == {"forward": N, "adjoint": N, "tangent": N, "second_adjoint": N}
    J.hessp(p, 2 * dp)
    assert J.stats.solves["forward"] == N and J.stats.solves["adjoint"] == N and J.stats.solves["tangent"] == 2 * N
    J.reset_stats()
    J.hessp(p + 1, dp, gauss_newton=True)  # no adjoint march for Gauss-Newton
    assert dict(J.stats.solves) == {"forward": N, "tangent": N, "second_adjoint": N}


def test_the_adjoint_is_the_sensitivity_to_the_initial_state():
    """With u0 = P p, the gradient's u0 part is P^T mu: check mu against finite differences in u0."""
    msh, dofs, conn = _parts()
    n = dofs.n_free
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=n)
    M = fem.assemble(conn, fem.p1_mass(msh), n)
    obj = TimeSeriesMisfit(np.random.default_rng(0).standard_normal((2, n)), [1, -1])
    u0 = np.linspace(0, 1, n)

    def J_of(v):
        return TransientReducedFunctional(A, M, obj, TimeStepping("bdf2", dt=0.1, n_steps=5), u0=v,
                                          solver="superlu")

    p = np.zeros(A.n_params)
    mu = J_of(u0).adjoint(p)
    h = 1e-6
    fd = np.array([(J_of(u0 + h * e).value(p) - J_of(u0 - h * e).value(p)) / (2 * h) for e in np.eye(n)])
    np.testing.assert_allclose(mu, fd, rtol=1e-6, atol=1e-8 * np.abs(fd).max())


def test_a_forward_simulation_needs_no_parameter():
    msh, dofs, conn = _parts()
    n = dofs.n_free
    K = fem.assemble(conn, fem.p1_stiffness(msh), n)
    M = fem.assemble(conn, fem.p1_mass(msh), n)
    sim = TransientReducedFunctional(K, M, None, TimeStepping(dt=0.1, n_steps=3), rhs=lambda t: np.full(n, t),
                                     solver="superlu")
    U = sim.states(np.zeros(0))
    assert U.shape == (4, n) and np.all(U[0] == 0) and np.all(U[-1] > 0)


def test_hostile_review_findings(tmp_path):
    """Each a finding of a hostile review: clear errors up front instead of late or misleading ones."""
    n, A, M, time, obj = _small()
    p = np.zeros(A.n_params)
    # a checkpoint folder adjopt cannot write into is refused at construction
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(PermissionError, match="checkpoint_dir '/proc/self' is not writable"):
        TransientReducedFunctional(A, M, obj, time, rhs=np.ones(n), checkpoint_dir="/proc/self")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        TransientReducedFunctional(A, M, obj, time, rhs=np.ones(n), checkpoint_dir=target)
    with pytest.raises(ValueError, match="give a checkpoint_dir too"):
        TransientReducedFunctional(A, M, obj, time, rhs=np.ones(n), disk_snapshots=3)
    J = TransientReducedFunctional(A, M, obj, time, rhs=np.ones(n), memory=0, checkpoint_dir=tmp_path,
                                   disk_snapshots=0, solver="superlu")
    with pytest.raises(ValueError, match="disk_snapshots = 0"):
        J.gradient(p)
    # the singular matrix is named: the step matrix, and why with theta = 0
    Z = sp.csr_array((n, n))
    J = TransientReducedFunctional(A, Z, obj, TimeStepping("theta", theta=0.0, dt=0.1, n_steps=2), rhs=np.ones(n),
                                   solver="superlu")
    with pytest.raises(adjopt.SingularMatrixError, match=r"step matrix S = 1 M \+ 0 A.*mass matrix must be nonsingular"):
        J.value(p)
    # u0's errors name u0
    with pytest.raises(adjopt.NonFiniteError, match="u0"):
        TransientReducedFunctional(A, M, obj, time, u0=np.full(n, np.nan))
    with pytest.raises(TypeError, match="u0"):
        TransientReducedFunctional(A, M, obj, time, u0=np.ones(n) + 1j)
    # negative weights would make the misfit unbounded below
    with pytest.raises(ValueError, match="weights must be >= 0"):
        TimeSeriesMisfit(np.ones((2, n)), [1, 2], weights=[1.0, -5.0])
    with pytest.raises(ValueError, match="W must be >= 0"):
        TimeSeriesMisfit(np.ones((2, n)), [1, 2], W=-np.ones(n))
    # an observation operator that does not fit the state is refused at construction
    with pytest.raises(adjopt.ShapeError, match="B has 10 columns"):
        TransientReducedFunctional(A, M, TimeSeriesMisfit(np.ones((1, 5)), [1], B=np.ones((5, n + 1))), time)
    with pytest.raises(adjopt.ShapeError, match="the data"):
        TransientReducedFunctional(A, M, TimeSeriesMisfit(np.ones((1, n + 2)), [1]), time)
    # callables and grids of the wrong kind
    J = TransientReducedFunctional(A, M, obj, time, rhs=Modulated(np.ones(n), lambda t: np.array([1.0, 2.0])),
                                   solver="superlu")
    with pytest.raises(TypeError, match="g\\(t\\) must return a number"):
        J.value(p)
    with pytest.raises(TypeError, match="complex"):
        TimeStepping("implicit_euler", steps=[0.1, 0.2 + 1j])
    with pytest.raises(ValueError, match="sequence of step sizes"):
        TimeStepping(steps=[[0.1, 0.2]])
    with pytest.raises(ValueError, match="sequence of step sizes"):
        TimeStepping(steps=0.1)
    # memory=1e9 is a number of bytes
    assert TransientReducedFunctional(A, M, obj, time, memory=1e9).memory == 10**9
    # a blow-up says so, without the steady solver's advice
    J, q = _build("theta", {"theta": 0.0}, n_steps=2000, dt=1.0)
    with pytest.raises(adjopt.NonFiniteError, match="overflowed.*theta = 0.0 < 1/2") as info:
        J.value(q)
    assert "np.float64" not in str(info.value) and "coefficient that underflows" not in str(info.value)


def test_the_remaining_raises_of_grids_sources_and_terms():
    n, A, M, time, obj = _small()
    time_l = TimeStepping(dt=0.1, n_steps=4)
    assert time_l.level(0.2) == 2
    with pytest.raises(ValueError, match="not a time level of this grid \\(nearest: t_2 = 0.2"):
        time_l.level(0.25)
    with pytest.raises(TypeError, match="positive number"):
        TimeStepping(dt="0.1", n_steps=3)
    with pytest.raises(ValueError, match="at least one step size"):
        TimeStepping(steps=[])
    with pytest.raises(ValueError, match="t0 must be a finite number"):
        TimeStepping(dt=0.1, n_steps=3, t0=np.nan)
    with pytest.raises(ValueError, match="at least one time level"):
        TimeSeriesMisfit(np.ones((0, n)), [])
    with pytest.raises(adjopt.ShapeError, match="must have 2 rows"):
        TimeSeriesMisfit(np.ones((1, 2)), [1], B=np.ones((3, n)))
    with pytest.raises(adjopt.ShapeError, match="one entry per level"):
        TimeSeriesMisfit(np.ones((1, n)), [1], weights=[1.0, 2.0])
    with pytest.raises(adjopt.ShapeError, match="one weight per observation"):
        TimeSeriesMisfit(np.ones((1, n)), [1], W=np.ones(n + 1))
    with pytest.raises(TypeError, match="adjopt Objective"):
        AtSteps(lambda u, p: 0.0, [1])
    with pytest.raises(adjopt.ShapeError, match="one entry per level"):
        AtSteps(adjopt.Norm(), [1, 2], weights=[1.0])
    with pytest.raises(TypeError, match="must be a TimeTerm"):
        TransientReducedFunctional(A, M, [obj, "misfit"], time)
    with pytest.raises(TypeError, match="g must be a callable"):
        Modulated(np.ones(n), 2.0)
    with pytest.raises(TypeError, match="f must be a callable"):
        TimeFunction(np.ones(n), n)
    J = TransientReducedFunctional(A, M, obj, time, rhs=TimeFunction(lambda t: np.ones(n + 1), n), solver="superlu")
    with pytest.raises(adjopt.ShapeError, match="f\\(t\\) must return an array of shape"):
        J.value(np.zeros(A.n_params))
    with pytest.raises(adjopt.ShapeError, match="B must be an \\(n, m\\) matrix"):
        SpaceTimeSource(np.ones(n), [0.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        SpaceTimeSource(np.ones((n, 2)), [0.0, 0.0])
    with pytest.raises(TypeError, match="rhs must be None"):
        TransientReducedFunctional(A, M, obj, time, rhs="source")
    with pytest.raises(adjopt.ShapeError, match="single vector"):
        TransientReducedFunctional(A, M, obj, time, rhs=np.ones((n, 2)))
    with pytest.raises(adjopt.ShapeError, match="u0 has 3 entries"):
        TransientReducedFunctional(A, M, obj, time, u0=adjopt.AffineVector(None, np.ones((3, A.n_params))))
    with pytest.raises(TypeError, match="ParametricMatrix or a \\(sparse\\) matrix"):
        TransientReducedFunctional(A, "M", obj, time)
    with pytest.raises(adjopt.ShapeError, match="must be square"):
        TransientReducedFunctional(A, sp.csr_array(np.ones((n, n + 1))), obj, time)
