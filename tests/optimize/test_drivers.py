"""L-BFGS, L-BFGS-B and Newton drivers through adjopt.minimize: convergence, mesh independence, resume, bad input."""

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt.optimize import CheckpointError, Diagonal, Euclidean, Matrix, make_inner_product, methods, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))

import optimal_control as oc  # noqa: E402
import poisson_inversion as pi  # noqa: E402

UPPER = 2 * np.pi**2


@pytest.fixture(scope="module")
def optimum():
    return oc.solve_unconstrained(oc.build(n=12))


@pytest.fixture
def quadratic(optimum):
    """A fresh (uncached) optimal control problem and its discrete optimum."""
    return oc.build(n=12), optimum


@pytest.mark.parametrize("method", ["lbfgs", "lbfgsb", "newton-cg", "newton-tr"])
def test_unconstrained_quadratic_reaches_the_discrete_optimum(quadratic, method):
    pb, z = quadratic
    # gtol 1e-7, not 1e-10: the round-off of J (0.068) stops L-BFGS at about 2e-8 of the start gradient and
    # Newton at 1e-9, short of 1e-10 (not a success), and where scipy's L-BFGS-B ends down there, and how (its
    # convergence test or an abnormal line search), depends on the last bits of f
    r = adjopt.minimize(pb, method=method, gtol=1e-7, maxiter=300)
    assert r.success, r.message
    assert r.stationarity <= 1e-7 * r.history[0]["stationarity"], r.message  # stopped by the stationarity test
    # J is quadratic with Hessian alpha M + (positive semidefinite), so ||x - z||_M <= ||grad J(x)||_{M^-1} / alpha:
    # the error the stopping test allows (measured 0.91 to 0.98 of it; z is a CG solution, 4e-12 relative)
    e, M = r.x - z, pb.mass
    assert math.sqrt(e @ (M @ e)) <= r.stationarity / pb.meta["alpha"] + 1e-9 * math.sqrt(z @ (M @ z))
    assert r.nit == len(r.history) - 1 and r.history[0]["nit"] == 0
    assert r.nfev >= r.nit and r.njev >= 1 and r.factorizations >= 1
    if method.startswith("newton"):
        assert r.nhessp > 0 and all(h["cg_iterations"] >= 1 for h in r.history[1:])
        assert r.nit <= 3  # a quadratic: Newton with inexact CG needs a couple of steps


@pytest.mark.parametrize("method", ["lbfgs", "lbfgsb", "newton-cg"])
def test_bound_constrained_control_reaches_the_manufactured_solution(method):
    errors = []
    for n in (8, 16):
        pb = oc.build(n=n, upper=UPPER, amplitude=1.5)
        # gtol 1e-7: at 1e-8 scipy's L-BFGS-B sometimes ends in an abnormal line search at round-off
        r = adjopt.minimize(pb, method=method, gtol=1e-7, maxiter=200)
        assert r.success, r.message
        assert r.x.max() <= UPPER and np.count_nonzero(r.x >= UPPER - 1e-9) > 0  # the bound is active
        errors.append(oc.l2_error(pb, r.x))
    # the discretisation error only: halves (or better) with the mesh size, same for every method
    assert errors[1] < 0.55 * errors[0]
    assert errors[1] == pytest.approx(0.0884, rel=0.02)


def _inversion_counts(n, method, inner, grading=1.0, **kw):
    pb = pi.build(n=n, alpha=1.0, n_obs=40, grading=grading)
    kw.setdefault("maxiter", 400)
    r = adjopt.minimize(pb, method=method, inner_product=inner, gtol=1e-6, **kw)
    assert r.success, r.message
    return r.nit


def test_newton_cg_iterations_do_not_grow_with_the_mesh():
    counts = [_inversion_counts(n, "newton-cg", "l2", preconditioner="h1") for n in (8, 16, 32)]
    assert max(counts) - min(counts) <= 2, counts
    graded = [_inversion_counts(n, "newton-cg", "h1", preconditioner="h1", grading=2.0) for n in (8, 16, 32)]
    assert max(graded) - min(graded) <= 2, graded


def _control_counts(n, method, inner, grading):
    # gtol 1e-7: reached by every method well above round-off, so the counts do not move when the solves are
    # perturbed by 1e-13; at 1e-8 the runs end near the precision of f (L2 L-BFGS 5 or 6 iterations at n = 32,
    # L-BFGS-B 16 to 20 at n = 16 graded, and its Euclidean run failed 3 times in 8 in the line search)
    r = adjopt.minimize(oc.build(n=n, grading=grading), method=method, inner_product=inner, gtol=1e-7, maxiter=500)
    assert r.success, r.message
    assert r.stationarity <= 1e-7 * r.history[0]["stationarity"], r.message
    return r.nit


@pytest.mark.parametrize("grading", [1.0, 2.0])
def test_lbfgs_in_l2_iterations_do_not_grow_with_the_mesh(grading):
    # L2-regularized control: the reduced Hessian is alpha I + compact in L2, so L2 L-BFGS is mesh independent
    counts = [_control_counts(n, "lbfgs", "l2", grading) for n in (16, 32, 64)]
    assert max(counts) <= 1.3 * min(counts) and max(counts) <= 8, counts  # 5/4/4 uniform, 6/6/5 graded
    lumped = [_control_counts(n, "lbfgsb", "l2-lumped", grading) for n in (16, 32, 64)]
    assert max(lumped) <= 1.4 * min(lumped) and lumped[-1] <= lumped[0], lumped  # 13/11/10 uniform, 14/12/12 graded
    if grading > 1:
        # on a graded mesh the Euclidean inner product is far from L2: many more iterations (48 here)
        euclid = _control_counts(32, "lbfgsb", "euclidean", grading)
        assert euclid >= 3 * max(lumped), (euclid, lumped)


def _lbfgs_median_iterations(n, inner, seeds=range(5)):
    """Median over observation layouts (seeds) of the L-BFGS iterations that reduce the gradient 1000-fold.

    On the H1-regularized inversion with alpha = 100 the regularization's h^-2 spectrum dominates the
    reduced Hessian already at n = 12 (with alpha = 1 the data term does, up to n of about 64). gtol = 1e-3,
    not 1e-6: the first ~30 iterations of L-BFGS are not chaotic (the counts stay the same when x0 is
    perturbed by 1e-8, far more than the rounding differences between CPUs, BLAS and thread counts), while
    the counts of a 200-iteration run to 1e-6 move by +-20 % under a 1e-12 perturbation. The median over
    five layouts of the 40 observation points takes out the layout-to-layout spread (23 to 38 at one n).
    """
    counts = []
    for seed in seeds:
        pb = pi.build(n=n, alpha=100.0, n_obs=40, seed=seed)
        r = adjopt.minimize(pb, method="lbfgs", inner_product=inner, gtol=1e-3, maxiter=500)
        assert r.success, r.message
        counts.append(r.nit)
    return float(np.median(counts)), counts


def test_lbfgs_in_h1_iterations_do_not_grow_with_the_mesh():
    # H1-regularized inversion: the regularization's h^-2 spectrum makes H1 the parameter space (L2 is not).
    # Medians measured: H1 30 / 31 / 31 at n = 12 / 24 / 48; L2 19 / 42 / 91 and Euclidean 13 / 23 / 49,
    # so the bound below fails (4.8x, 3.8x) if the Riesz map is L2 or Euclidean
    h1 = {n: _lbfgs_median_iterations(n, "h1") for n in (12, 24, 48)}
    medians = [m for m, _ in h1.values()]
    assert max(medians) <= 1.3 * min(medians), h1
    # the same set-up does show the mesh dependence of the L2 inner product (doubling with each refinement):
    # the bound above is not met trivially because the problem is too easy to see it
    l2 = {n: _lbfgs_median_iterations(n, "l2", seeds=range(3)) for n in (12, 48)}  # little spread: 3 layouts
    assert l2[48][0] >= 3 * l2[12][0] and l2[48][0] >= 2 * h1[48][0], (l2, h1)


def test_gauss_newton_first_steps_then_newton():
    pb = pi.build(n=12, alpha=1.0, n_obs=30)
    r = adjopt.minimize(pb, method="newton-cg", gauss_newton_iters=3, gtol=1e-8)
    ref = adjopt.minimize(pb, method="newton-cg", gtol=1e-8)
    assert r.success and [h["gauss_newton"] for h in r.history[1:5]] == [True, True, True, False]
    assert np.linalg.norm(r.x - ref.x) <= 1e-5 * np.linalg.norm(ref.x)


# L-BFGS to 1e-7 (about 160 iterations, 8 of 8 at gtol with the linear solves perturbed by 1e-14): at 1e-9 it
# ends at round-off or in a failed line search (7 runs of 8; 2 of 8 at 1e-8); Newton reaches 1e-9 in 10 steps
RESUME_GTOL = {"lbfgs": 1e-7, "newton-cg": 1e-9, "newton-tr": 1e-9}


@pytest.mark.parametrize("method", ["lbfgs", "newton-cg", "newton-tr"])
def test_resume_after_an_exception_gives_the_same_x(tmp_path, method):
    gtol = RESUME_GTOL[method]
    pb = pi.build(n=10, alpha=1.0, n_obs=30)
    full = adjopt.minimize(pb, method=method, gtol=gtol, maxiter=300)
    assert full.success, full.message
    ck = tmp_path / "run.npz"

    def boom(info):
        if info["nit"] == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        adjopt.minimize(pb, method=method, gtol=gtol, maxiter=300, checkpoint=ck, callback=boom)
    state, meta = read_checkpoint(ck)
    assert meta["nit"] == 3 and len(meta["history"]) == 4
    pb2 = pi.build(n=10, alpha=1.0, n_obs=30)  # a fresh functional: nothing cached
    resumed = adjopt.minimize(pb2, method=method, gtol=gtol, maxiter=300, checkpoint=ck, resume=ck)
    assert resumed.nit == full.nit and resumed.success
    np.testing.assert_allclose(resumed.x, full.x, rtol=0, atol=1e-12)
    assert [h["f"] for h in resumed.history] == pytest.approx([h["f"] for h in full.history], rel=1e-12)
    assert resumed.nfev == full.nfev and resumed.nhessp == full.nhessp


def test_resume_after_sigkill_of_a_subprocess(tmp_path):
    ck = tmp_path / "run.npz"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.join(ROOT, "problems")!r})
        import numpy as np, adjopt, poisson_inversion as pi
        pb = pi.build(n=10, alpha=1.0, n_obs=30)
        kill = int(sys.argv[1])
        def cb(info):
            if info["nit"] == kill:
                os.kill(os.getpid(), signal.SIGKILL)
        resume = sys.argv[2] if len(sys.argv) > 2 else None
        r = adjopt.minimize(pb, method="lbfgs", gtol=1e-9, maxiter=80, checkpoint={str(ck)!r}, callback=cb, resume=resume)
        np.save({str(tmp_path / "x.npy")!r}, r.x)
    """)
    path = tmp_path / "run_opt.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path), "5"], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    assert read_checkpoint(ck)[1]["nit"] == 5
    assert not list(tmp_path.glob("*.tmp"))
    subprocess.run([sys.executable, str(path), "-1", str(ck)], check=True, capture_output=True, text=True)
    x_resumed = np.load(tmp_path / "x.npy")
    full = adjopt.minimize(pi.build(n=10, alpha=1.0, n_obs=30), method="lbfgs", gtol=1e-9, maxiter=80)
    np.testing.assert_allclose(x_resumed, full.x, rtol=0, atol=1e-12)


def test_lbfgsb_resume_continues_to_the_optimum(tmp_path):
    # gtol 1e-7: at 1e-9 scipy's L-BFGS-B ends at round-off, in an abnormal line search in 6 runs of 8 with the
    # linear solves perturbed by 1e-14
    pb = oc.build(n=10, upper=UPPER, amplitude=1.5)
    full = adjopt.minimize(pb, method="lbfgsb", gtol=1e-7)
    assert full.success, full.message
    ck = tmp_path / "b.npz"

    def stop_at_4(info):
        if info["nit"] == 4:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        adjopt.minimize(pb, method="lbfgsb", gtol=1e-7, checkpoint=ck, callback=stop_at_4)
    r = adjopt.minimize(oc.build(n=10, upper=UPPER, amplitude=1.5), method="lbfgsb", gtol=1e-7, resume=ck)
    assert r.success and r.nit > 4
    # resumed with an empty memory, it takes other iterates to the same optimum: J is alpha-convex in the mass
    # norm, so each run ends about stationarity / alpha from it (with the bounds the measure is the projected one
    # and this is an estimate, not a bound: the distance measured is 0.5 of the sum, at most 0.8 for other stops)
    e, M = r.x - full.x, pb.mass
    assert math.sqrt(e @ (M @ e)) <= (r.stationarity + full.stationarity) / pb.meta["alpha"]


class Flaky:
    """A functional that returns NaN (or raises) where x crosses a threshold: a failing PDE solve mid-run."""

    def __init__(self, J, bad):
        self.J, self.bad = J, bad

    def __getattr__(self, name):
        return getattr(self.J, name)

    def value(self, x):
        bad = self.bad(x)  # once per value: bad may count the calls
        if bad == "nan":
            return math.nan
        if bad == "raise":
            raise adjopt.SingularMatrixError("A(p) is singular here")
        return self.J.value(x)


@pytest.mark.parametrize("kind", ["nan", "raise"])
def test_line_search_backs_off_from_failed_evaluations(quadratic, kind):
    pb, z = quadratic
    calls = {"n": 0}

    def bad(x):  # the first two trial points of the second iteration fail (values 3 and 4; 1 is the start)
        calls["n"] += 1
        return kind if calls["n"] in (3, 4) else None

    # (a region |x| > 1.5 max|z| that fails, as this test had, is never visited: L-BFGS steps from 0.1 z to z)
    flaky = Flaky(pb.functional, bad)
    r = adjopt.minimize(adjopt.Problem(flaky, pb.p0, mass=pb.mass), method="lbfgs", gtol=1e-7, maxiter=300)
    assert r.success, r.message
    assert r.history[2]["backtracks"] == 2 and r.history[2]["t"] == 0.25  # backed off twice, then went on
    np.testing.assert_allclose(r.x, z, atol=1e-6 * np.abs(z).max())


@pytest.mark.parametrize("method", ["lbfgs", "lbfgsb", "newton-cg", "newton-tr"])
def test_an_objective_that_is_not_finite_at_the_start_is_refused(quadratic, method):
    pb, _ = quadratic
    flaky = Flaky(pb.functional, lambda x: "nan")
    with pytest.raises(ValueError, match="not finite at the starting point"):
        adjopt.minimize(adjopt.Problem(flaky, pb.p0, mass=pb.mass), method=method)


def test_a_run_that_cannot_evaluate_stops_with_the_last_good_x(quadratic, tmp_path):
    pb, _ = quadratic
    calls = {"n": 0}

    def bad(x):
        calls["n"] += 1
        return "nan" if calls["n"] > 2 else None  # the start and the first trial point evaluate

    flaky = Flaky(pb.functional, bad)
    ck = tmp_path / "c.npz"
    r = adjopt.minimize(adjopt.Problem(flaky, pb.p0, mass=pb.mass), method="newton-cg", checkpoint=ck)
    assert not r.success and "could not be evaluated" in r.message and "last good x" in r.message
    assert np.isfinite(r.fun) and r.nit >= 1
    np.testing.assert_array_equal(read_checkpoint(ck)[0]["x"], r.x)


def test_infeasible_start_is_projected_and_said_so(caplog):
    pb = oc.build(n=6, lower=-1.0, upper=1.0)
    x0 = np.full(pb.p0.size, 3.0)
    r = adjopt.minimize(pb, method="lbfgs", x0=x0, maxiter=3)
    assert any("projected" in w for w in r.warnings)
    assert r.x.max() <= 1.0


def test_stopping_tests_and_callback(quadratic):
    pb, _ = quadratic
    seen = []
    r = adjopt.minimize(pb, method="lbfgs", maxiter=3, gtol=0, callback=seen.append)
    assert not r.success and "maximum number of iterations (3)" in r.message and r.nit == 3
    assert [s["nit"] for s in seen] == [1, 2, 3] and all(s["x"].shape == pb.p0.shape for s in seen)
    r = adjopt.minimize(pb, method="lbfgs", gtol=0, ftol=1e-3)
    assert r.success and "ftol" in r.message
    r = adjopt.minimize(pb, method="lbfgs", gtol=0, xtol=1e-2)
    assert r.success and "xtol" in r.message
    r = adjopt.minimize(pb, method="lbfgs", gtol=0, max_time=1e-9)
    assert not r.success and "wall-time" in r.message
    r = adjopt.minimize(pb, method="lbfgs", gtol=0, gatol=1e-3)
    assert r.success and r.stationarity <= 1e-3
    assert "lbfgs: converged" in str(r) and r.as_dict()["nit"] == r.nit


def test_inner_products():
    pb = pi.build(n=6)
    M, K = pb.mass, pb.stiffness
    g = np.random.default_rng(0).standard_normal(M.shape[0])
    l2 = make_inner_product("l2", pb)
    np.testing.assert_allclose(M @ l2.riesz(g), g, atol=1e-12)
    assert l2.dual_norm(g) == pytest.approx(math.sqrt(g @ np.linalg.solve(M.toarray(), g)))
    h1 = make_inner_product("h1", pb)
    np.testing.assert_allclose((K + M) @ h1.riesz(g), g, atol=1e-10)
    lumped = make_inner_product("l2-lumped", pb)
    np.testing.assert_allclose(lumped.diagonal(), M.sum(axis=1))
    assert isinstance(make_inner_product(None, pb), Matrix)
    assert isinstance(make_inner_product("euclidean", pb), Euclidean)
    with pytest.raises(ValueError, match="unknown inner product"):
        make_inner_product("sobolev", pb)
    bare = adjopt.Problem(pb.functional, pb.p0)
    assert isinstance(make_inner_product(None, bare), Euclidean)
    with pytest.raises(ValueError, match="needs the problem's parameter-space mass"):
        make_inner_product("l2", bare)
    with pytest.raises(ValueError, match="stiffness"):
        make_inner_product("h1", adjopt.Problem(pb.functional, pb.p0, mass=M))
    with pytest.raises(ValueError, match="positive"):
        Diagonal(np.array([1.0, 0.0]))
    with pytest.raises(adjopt.ShapeError, match="acts on 3"):
        make_inner_product(Euclidean(3), pb)
    with pytest.raises(adjopt.ShapeError, match="mass must be"):
        adjopt.Problem(pb.functional, pb.p0, mass=np.ones(3))
    with pytest.raises(ValueError, match="empty row"):
        Matrix(sp.diags_array([1.0, 0.0]))


def test_bad_input_gets_clear_errors(quadratic, tmp_path):
    pb, _ = quadratic
    with pytest.raises(ValueError, match="unknown method 'bfgs'; the methods are .*lbfgs.*mma.*newton-cg.*oc"):
        adjopt.minimize(pb, method="bfgs")
    with pytest.raises(ValueError, match="unknown option.*'memroy'.*memory"):
        adjopt.minimize(pb, method="lbfgs", memroy=5)
    with pytest.raises(ValueError, match="maxiter"):
        adjopt.minimize(pb, maxiter=-1)
    with pytest.raises(ValueError, match="gtol"):
        adjopt.minimize(pb, gtol=math.nan)
    with pytest.raises(ValueError, match="inverted"):
        adjopt.Problem(pb.functional, pb.p0, bounds=(1.0, 0.0))
    with pytest.raises(adjopt.ShapeError, match="bounds"):
        adjopt.Problem(pb.functional, pb.p0, bounds=(np.zeros(3), np.ones(3)))
    bounded = oc.build(n=6, upper=1.0)
    with pytest.raises(ValueError, match="does not take bounds"):
        adjopt.minimize(bounded, method="newton-tr")
    with pytest.raises(ValueError, match="x0 must have shape"):
        adjopt.minimize(pb, x0=np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        adjopt.minimize(pb, x0=np.full(pb.p0.size, np.nan))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        adjopt.minimize(pb, resume=tmp_path / "missing.npz")
    ck = tmp_path / "c.npz"
    adjopt.minimize(pb, method="lbfgs", maxiter=1, checkpoint=ck)
    with pytest.raises(CheckpointError, match="of method 'lbfgs', not 'newton-cg'"):
        adjopt.minimize(pb, method="newton-cg", resume=ck)
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged"):
        adjopt.minimize(pb, resume=tmp_path / "junk.npz")
    with pytest.raises(TypeError, match="Problem"):
        adjopt.minimize(pb.functional)
    with pytest.raises(ValueError, match="preconditioner"):
        adjopt.minimize(pb, method="newton-cg", preconditioner=3)
    assert sorted(methods()) == ["lbfgs", "lbfgsb", "mma", "newton-cg", "newton-tr", "oc"]
    with pytest.raises(ValueError, match="grading"):
        pi.build(n=4, grading=0.5)


def test_design_methods_through_minimize():
    import topology_compliance as tc

    pb = tc.build(case="mbb", nelx=30, nely=10)
    r = adjopt.minimize(pb, method="oc", xtol=0.01, gtol=0, maxiter=300)
    assert r.success and "xtol" in r.message
    assert r.history[-1]["volume"] <= 0.5 + 1e-3
    with pytest.raises(ValueError, match="does not take inequality constraints"):
        adjopt.minimize(pb, method="lbfgs")


def test_per_rank_checkpoint_files_say_how_many_ranks_wrote_them(tmp_path):
    """A resume on another number of ranks than wrote the per-rank checkpoints says how many did."""
    from adjopt.optimize import CheckpointError
    from adjopt.optimize.base import _RankCheckpoint

    path = tmp_path / "checkpoint.npz"
    assert _RankCheckpoint.ranks_written(path) == 0
    for name in ("checkpoint.rank0.prev.npz", "checkpoint.rank1.npz", "checkpoint.rank2.prev.npz", "other.rank7.npz",
                 "checkpoint.rank3.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert _RankCheckpoint.ranks_written(path) == 3  # rank 2's .prev counts, other stems and names do not

    class OneRank:  # a communicator of one rank, as mpi4py's answers
        rank, size = 0, 1

        def allgather(self, x):
            return [x]

    # rank 0 of the writers has no readable iteration (empty files): nothing in common, and the message names 3
    with pytest.raises(CheckpointError, match=r"written by a run on 3 ranks: resume on 3 ranks \(mpiexec -n 3\)"):
        _RankCheckpoint(path, OneRank()).latest_common()
