"""Beta continuation of a Heaviside projection inside the shared optimization loop, and the grey level."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import topology_compliance as tc  # noqa: E402

import adjopt  # noqa: E402
from adjopt.maps import HeavisideProjection  # noqa: E402
from adjopt.optimize import BetaContinuation, BetaSchedule, CheckpointError, MethodSetupError, grey_level, minimize  # noqa: E402


# -- the schedule ------------------------------------------------------------------------------------------
def test_schedule_every_and_on_convergence_up_to_beta_max():
    h = HeavisideProjection(4, beta=1.0)
    c = BetaContinuation(h, beta_max=6.0, factor=2.0, every=3)
    assert [c.step(False) for _ in range(3)] == [False, False, True] and h.beta == 2.0
    assert c.step(True) and h.beta == 4.0  # converged at beta 2 after one iteration: raised at once
    assert not c.step(False) and c.step(True) and h.beta == 6.0  # the last step is cut to beta_max
    assert c.at_max and not c.step(True) and not any(c.step(False) for _ in range(10)) and h.beta == 6.0
    c.reset()
    assert h.beta == 1.0 and c.since == 0


def test_several_projections_share_one_beta_and_state_round_trips():
    a, b = HeavisideProjection(3, beta=2.0, eta=0.3), HeavisideProjection(3, beta=5.0, eta=0.7)
    c = BetaContinuation([a, b], beta_max=16.0, every=1)
    assert a.beta == b.beta == 2.0
    c.step(False)
    assert a.beta == b.beta == 4.0
    c.step(False)
    state = c.state()
    c.reset()
    c.restore(state)
    assert state == {"beta": 8.0, "since": 0} and a.beta == b.beta == 8.0
    p = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(a.forward(p), HeavisideProjection(3, beta=8.0, eta=0.3).forward(p), rtol=1e-15)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"projections": []}, TypeError, "HeavisideProjection or a non-empty list"),
    ({"projections": "beta"}, TypeError, "HeavisideProjection or a non-empty list"),
    ({"beta_max": 0.5}, ValueError, r"beta 1 is above beta_max 0.5"),
    ({"beta_max": float("nan")}, ValueError, "beta_max must be a finite number"),
    ({"factor": 1.0}, ValueError, "factor must be a finite number > 1"),
    ({"factor": "2"}, ValueError, "factor must be a number"),
    ({"every": 0}, ValueError, "every must be an integer >= 1"),
    ({"every": 2.5}, ValueError, "every must be an integer >= 1"),
])
def test_bad_continuation_options(kwargs, exc, match):
    args = {"projections": HeavisideProjection(2), **kwargs}
    with pytest.raises(exc, match=match):
        BetaContinuation(args.pop("projections"), **args)


def test_restore_refuses_a_foreign_state():
    c = BetaContinuation(HeavisideProjection(2), beta_max=8.0)
    for bad in ({"beta": 16.0, "since": 0}, {"beta": 2.0}, {"beta": -1.0, "since": 0}, {"beta": "x", "since": 0}):
        with pytest.raises(ValueError, match="continuation state"):
            c.restore(bad)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), "high"])
def test_projection_beta_must_stay_positive(value):
    h = HeavisideProjection(2, beta=3.0)
    with pytest.raises(ValueError, match="beta"):
        h.beta = value
    assert h.beta == 3.0


def test_grey_level():
    assert grey_level([0.0, 0.05, 0.5, 0.95, 1.0]) == pytest.approx(0.2)
    assert grey_level(np.full(10, 0.5)) == 1.0 and grey_level([0.0, 1.0]) == 0.0
    assert grey_level([0.2, 0.7], low=0.5, high=0.9) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        grey_level([])
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        grey_level([0.5], low=0.6, high=0.4)


# -- in the loop -------------------------------------------------------------------------------------------------
def _projected(**kw):
    return tc.build("mbb", 24, 8, projection=True, **{"beta_max": 4.0, "beta_every": 4, **kw})


def test_a_raise_drops_the_cached_state_and_restarts_the_method():
    problem = _projected()
    seen = []

    def callback(info):
        seen.append((info["nit"], info["beta"], problem.continuation.beta, info["f"]))

    res = minimize(problem, "mma", maxiter=6, gtol=0, xtol=0, callback=callback)
    assert [s[1] for s in seen] == [1.0] * 4 + [2.0, 2.0]  # the 4th iteration ran at beta 1, then raised
    assert seen[3][2] == 2.0
    # the result's f is J at the final x with the final beta, not a stale cached value
    fresh = tc.build("mbb", 24, 8, projection=True, beta=2.0)
    assert res.fun == pytest.approx(fresh.functional.value(res.x), rel=1e-12)
    np.testing.assert_allclose(res.jac, fresh.functional.gradient(res.x), rtol=1e-10, atol=1e-12)


def test_a_converged_run_raises_beta_instead_of_stopping():
    problem = _projected(beta_every=1000)
    res = minimize(problem, "oc", maxiter=400, gtol=0, xtol=0.05)
    betas = [e["beta"] for e in res.history]
    assert res.success and "xtol" in res.message and betas[-1] == 4.0
    # each raise happened at an iteration whose step was within xtol, and the run stopped only at beta_max
    for k in range(1, len(betas)):
        if betas[k] > betas[k - 1]:
            assert res.history[k - 1]["step"] <= 0.05
    assert res.history[-1]["step"] <= 0.05


def test_a_second_run_starts_again_from_the_first_beta():
    problem = _projected()
    minimize(problem, "mma", maxiter=10, gtol=0, xtol=0)
    assert problem.continuation.beta == 4.0
    res = minimize(problem, "mma", maxiter=2, gtol=0, xtol=0)
    assert [e["beta"] for e in res.history] == [1.0, 1.0, 1.0]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method,stop_at", [("mma", 6), ("oc", 3), ("mma", 4)])
def test_resume_goes_on_at_the_checkpoints_beta(tmp_path, method, stop_at):
    kw = dict(maxiter=11, gtol=0, xtol=0)
    full = minimize(_projected(), method, checkpoint=tmp_path / "full.npz", **kw)

    def interrupt(info):
        if info["nit"] == stop_at:
            raise Interrupt

    ckpt = tmp_path / "run.npz"
    with pytest.raises(Interrupt):
        minimize(_projected(), method, checkpoint=ckpt, callback=interrupt, **kw)
    problem = _projected()
    resumed = minimize(problem, method, checkpoint=ckpt, resume=ckpt, **kw)
    assert [e["beta"] for e in resumed.history] == [e["beta"] for e in full.history]
    assert resumed.history[-1]["beta"] == 4.0
    np.testing.assert_allclose(resumed.x, full.x, rtol=0, atol=1e-12)
    assert [e["f"] for e in resumed.history] == pytest.approx([e["f"] for e in full.history], rel=1e-12)


def _same_problem(with_continuation: bool):
    """The projected problem by hand, with or without its continuation (the same name and options)."""
    built = _projected()
    return adjopt.Problem(built.functional, built.p0, bounds=built.bounds, constraints=built.constraints,
                          name="projected", continuation=built.continuation if with_continuation else None)


def test_resume_refuses_a_checkpoint_of_the_other_kind(tmp_path):
    ckpt = tmp_path / "run.npz"
    minimize(_same_problem(False), "mma", maxiter=2, gtol=0, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match=r"without a continuation \(beta, normalization\) and this problem has one"):
        minimize(_same_problem(True), "mma", maxiter=4, gtol=0, resume=ckpt)
    ckpt2 = tmp_path / "run2.npz"
    minimize(_same_problem(True), "mma", maxiter=2, gtol=0, checkpoint=ckpt2)
    with pytest.raises(CheckpointError, match=r"with a continuation \(beta, normalization\) and this problem has none"):
        minimize(_same_problem(False), "mma", maxiter=4, gtol=0, resume=ckpt2)


def test_scipy_loop_and_functionals_without_forget_are_refused():
    built = _projected()
    problem = adjopt.Problem(built.functional, built.p0, bounds=built.bounds, continuation=built.continuation)
    with pytest.raises(MethodSetupError, match="runs scipy's own loop"):
        minimize(problem, "lbfgsb", maxiter=2)

    class Plain:
        n_params = 3

        def value(self, x):
            return float(x @ x)

        def gradient(self, x):
            return 2 * x

    problem = adjopt.Problem(Plain(), np.ones(3), continuation=BetaContinuation(HeavisideProjection(3)))
    with pytest.raises(MethodSetupError, match="cannot drop its cached states"):
        minimize(problem, "lbfgs", maxiter=2)


def test_problem_checks_continuation_and_monitor():
    J = tc.build("mbb", 6, 2).functional
    with pytest.raises(TypeError, match="continuation must be"):
        adjopt.Problem(J, np.full(12, 0.5), continuation=32.0)
    with pytest.raises(TypeError, match="monitor must be a callable"):
        adjopt.Problem(J, np.full(12, 0.5), monitor={"grey": 0})
    problem = adjopt.Problem(J, np.full(12, 0.5), monitor=lambda p: 3.0)
    with pytest.raises(TypeError, match="monitor must return a dict"):
        minimize(problem, "lbfgs", maxiter=1)


# -- a given schedule ------------------------------------------------------------------------------------------------
def test_schedule_sets_the_beta_of_each_iteration():
    a, b = HeavisideProjection(3, beta=7.0), HeavisideProjection(3, eta=0.3)
    s = BetaSchedule([a, b], lambda k: 1.0 + k // 2)
    assert a.beta == b.beta == 1.0
    assert [s.step(False) for _ in range(4)] == [False, True, False, True] and a.beta == b.beta == 3.0
    state = s.state()
    s.reset()
    assert a.beta == 1.0
    s.restore(state)
    assert s.k == 4 and b.beta == 3.0
    with pytest.raises(ValueError, match="does not fit this schedule"):
        s.restore({"beta": 2.5, "since": 4})


@pytest.mark.parametrize("schedule,match", [(lambda k: 0.0, "finite and > 0"), (lambda k: "x", "not a number"),
                                            (lambda k: float("nan"), "finite and > 0")])
def test_schedule_values_are_checked(schedule, match):
    with pytest.raises(ValueError, match=match):
        BetaSchedule(HeavisideProjection(2), schedule)


def test_schedule_needs_a_callable_and_projections():
    with pytest.raises(TypeError, match="callable"):
        BetaSchedule(HeavisideProjection(2), 4.0)
    with pytest.raises(TypeError, match="HeavisideProjection"):
        BetaSchedule([], lambda k: 1.0)


def test_a_schedule_in_a_run_and_mma_keeps_its_asymptotes():
    problem = _projected()
    problem.continuation = BetaSchedule(problem.meta["projection"], lambda k: 1.0 if k < 3 else 2.0)
    seen = []
    res = minimize(problem, "mma", maxiter=5, gtol=0, xtol=0, callback=lambda info: seen.append(info["beta"]))
    assert seen == [1.0, 1.0, 1.0, 2.0, 2.0] and [e["beta"] for e in res.history] == [1.0] * 4 + [2.0] * 2
    # the raise re-evaluated f at the new beta without restarting MMA: the iteration counter went on
    fresh = tc.build("mbb", 24, 8, projection=True, beta=2.0)
    assert res.fun == pytest.approx(fresh.functional.value(res.x), rel=1e-12)


# -- found by a hostile review -------------------------------------------------------------------------------------
def test_a_manual_beta_change_is_seen_without_forget():
    problem = tc.build("mbb", 20, 10, projection=True)
    J, proj = problem.functional, problem.meta["projection"]
    p = np.random.default_rng(4).uniform(0.1, 0.9, 200)
    v1, g1 = J.value(p), J.gradient(p)
    proj.beta = 8.0  # no forget(): the map's version moved, the functional drops its states itself
    fresh = tc.build("mbb", 20, 10, projection=True, beta=8.0).functional
    assert J.value(p) == pytest.approx(fresh.value(p), rel=1e-12) and J.value(p) != pytest.approx(v1, rel=1e-3)
    np.testing.assert_allclose(J.gradient(p), fresh.gradient(p), rtol=1e-10)
    proj.eta = 0.3  # eta is a property too: the normalisation and the version follow
    np.testing.assert_allclose(proj.forward(np.r_[0.0, 1.0, np.full(198, 0.5)])[:2], [0.0, 1.0], atol=1e-15)
    assert J.value(p) == pytest.approx(tc.build("mbb", 20, 10, projection=True, beta=8.0, eta=0.3)
                                       .functional.value(p), rel=1e-12)
    with pytest.raises(ValueError, match="0 <= eta <= 1"):
        proj.eta = 5
    del g1


def test_resume_into_the_same_problem_object(tmp_path):
    kw = dict(maxiter=16, gtol=0, xtol=0)
    full = minimize(_projected(beta_every=5, beta_max=8.0), "mma", **kw)
    problem = _projected(beta_every=5, beta_max=8.0)
    ckpt = tmp_path / "run.npz"

    def interrupt(info):
        if info["nit"] == 12:
            raise Interrupt

    with pytest.raises(Interrupt):
        minimize(problem, "mma", checkpoint=ckpt, callback=interrupt, **kw)
    resumed = minimize(problem, "mma", resume=ckpt, checkpoint=ckpt, **kw)  # the same object: beta 8 cached
    assert [e["f"] for e in resumed.history] == pytest.approx([e["f"] for e in full.history], rel=1e-12)


def test_a_raise_on_the_last_iteration_is_in_its_entry():
    problem = _projected(beta_every=5)
    res = minimize(problem, "mma", maxiter=5, gtol=0, xtol=0)
    last = res.history[-1]
    assert last["beta"] == 1.0 and last["beta_next"] == 2.0
    assert res.fun == last["f_next"] != last["f"]


def test_gtol_cannot_stop_below_beta_max():
    built = _projected(beta_every=4, beta_max=8.0)
    problem = adjopt.Problem(built.functional, np.full(192, 0.3), bounds=(0.0, 1.0), continuation=built.continuation)
    res = minimize(problem, "lbfgs", maxiter=60, gtol=1e-3)
    assert res.history[-1]["beta"] == 8.0 or not res.success
    if res.success:
        assert "stationarity" in res.message


def test_monitor_names_and_values_are_checked():
    J = tc.build("mbb", 6, 2).functional
    for monitor, exc, match in [(lambda p: {"f": 1.0}, ValueError, "a name the history uses itself"),
                                (lambda p: {"x": object()}, TypeError, "its values must be numbers"),
                                (lambda p: {"x": "a"}, TypeError, "its values must be numbers")]:
        problem = adjopt.Problem(J, np.full(12, 0.5), monitor=monitor)
        with pytest.raises(exc, match=match):
            minimize(problem, "lbfgs", maxiter=1)


def test_a_fixed_beta_is_recorded_too():
    problem = tc.build("mbb", 12, 4, projection=True, beta=8.0, beta_max=8.0)
    res = minimize(problem, "mma", maxiter=3, gtol=0, xtol=0)
    assert [e["beta"] for e in res.history] == [8.0] * 4


def test_no_overflow_warning_at_a_large_beta():
    import warnings

    h = HeavisideProjection(3, beta=1e3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = h.jvp(np.array([0.0, 0.5, 1.0]), np.ones(3))
    assert d[0] == 0.0 and d[2] == 0.0 and d[1] > 0


def test_a_volume_objective_takes_a_beta_continuation():
    # a minimum-volume problem: its objective (a ParameterFunctional) caches nothing, so it needs no forget() of
    # its own; the run raises beta and the constraint's states are dropped
    base = _projected()
    volume, vmax = base.constraints[0]
    proj = base.continuation.projections[0]
    C = base.functional
    problem = adjopt.Problem(volume, base.p0, bounds=base.bounds, constraints=[(C, 1.5 * C.value(base.p0))],
                             continuation=BetaContinuation(proj, beta_max=4.0, every=2), name="minvol")
    res = minimize(problem, "mma", maxiter=5, gtol=0, xtol=0)
    assert [e["beta"] for e in res.history] == [1.0, 1.0, 1.0, 2.0, 2.0, 4.0]  # raised after iterations 2, 4
    fresh = tc.build("mbb", 24, 8, projection=True, beta=4.0).functional
    assert C.value(res.x) == pytest.approx(fresh.value(res.x), rel=1e-12)
