"""The transient benchmark runs end to end at a tiny size (--quick) and writes sane figures atomically."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("checkpoint_schedules")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_transient.py")
N = 16  # --quick: unit_square(8), 16 steps, repeat 2


def _run(*args, check=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, check=check,
                          timeout=timeout, env=env)


def _module():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_transient
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return bench_transient


def test_bench_transient_quick(tmp_path):
    out = tmp_path / "transient.json"
    res = _run("--quick", "--profile", "--out", str(out))
    assert "Figures" in res.stdout and "Memory" in res.stdout and "One step timed alone" in res.stdout
    assert "cProfile of one gradient" in res.stdout and f"wrote {out}" in res.stdout
    data = json.loads(out.read_text())
    s = data["summary"]
    assert data["complete"] and s["rows_measured"] == 12 and s["rows_failed"] == 0 and s["rows_skipped"] == 0
    assert s["factorizations_met"] and s["store_solves_as_expected"] and s["checkpointed_recompute"]
    (run,) = data["runs"]
    assert run["command"].startswith("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_transient.py")
    assert run["env_unset_ok"] and run["config"]["quick"] and run["config"]["repeat"] == 2
    assert run["info"]["cpus"] >= 1 and "git" in run["info"] and "thread_env" in run["info"]["blas"]
    assert run["warmup_s"] > 0 and run["total_s"] > 0 and "functional.py" in run["transient_sources"]
    rows = {(r["scheme"], r["stiffness"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(sc, k, m) for sc in ("crank_nicolson", "bdf2") for k in ("parametric", "constant")
                         for m in ("store", "checkpoint", "disk")}
    for (scheme, kind, mode), r in rows.items():
        assert r["n"] == 8 and r["unknowns"] == 49 and r["steps"] == N and r["solver"] == "superlu"
        assert r["params"] == (2 * 8 * 8 if kind == "parametric" else 5 * 49)
        for k in ("t_value", "t_gradient", "t_hessp", "build_s", "problem_s", "data_s"):
            assert r[k] > 0, k
        assert r["ratio_value_gradient"] == pytest.approx((r["t_value"] + r["t_gradient"]) / r["t_value"])
        assert r["ratio_hessp"] == pytest.approx(r["t_hessp"] / r["t_value"])
        # one factorization per distinct step matrix: CN one, BDF2 two (its implicit Euler start and BDF2)
        f = 1 if scheme == "crank_nicolson" else 2
        assert r["factorizations"] == r["expected_factorizations"] == f and r["met_factorizations"]
        if kind == "constant":  # A and M do not depend on p: factorized once for the functional's life
            assert r["factorizations_per_value"] == [f, 0] and r["factorizations_total"] == f
        else:  # a new p is a new A(p): its step matrices are factorized again, by the value only
            assert r["factorizations_per_value"] == [f, f] and r["factorizations_total"] == 2 * f
        assert r["stats"]["gradient"]["factorizations"] == r["stats"]["hessp"]["factorizations"] == 0
        assert r["solves"]["value"] == {"forward": N}
        assert r["solves"]["gradient"]["adjoint"] == N and r["solves"]["hessp"]["second_adjoint"] == N
        assert r["solves"]["hessp"]["tangent"] >= N
        st = r["step"]
        assert st["matvecs"] == r["history"] == (1 if scheme == "crank_nicolson" else 2)
        assert st["t_step"] == pytest.approx(st["t_solve"] + st["t_matvec"]) and st["t_solve"] > 0
        assert r["value_over_steps"] == pytest.approx(r["t_value"] / (N * st["t_step"]))
        assert r["hessp_over_steps"] == pytest.approx(r["t_hessp"] / (2 * N * st["t_step"]))
        assert math.isfinite(r["value"]) and r["gradient_norm"] > 0 and r["hessp_norm"] > 0
        assert len(r["repetitions"]) == 2 and r["profile"]["top"]
        assert ("kernels" in r) == (kind == "parametric")
        if mode == "store":
            assert r["solves_as_expected"] and r["recomputed_steps"] == 0 and r["hessp_recomputed_steps"] == 0
            assert r["checkpoints"] == 0 and r["stored_states"] >= 2 * N + 1
            assert r["gradient_time_steps"] == r["hessp_time_steps"] == 0  # the value's trajectory serves both
            continue
        ref = rows[scheme, kind, "store"]
        # ceil(sqrt(16)) = 4 states; the march recomputes, and gives the store row's numbers to round-off
        assert r["memory_states"] == 4 and r["stored_states"] < N + 1 and r["stored_states"] < ref["stored_states"]
        assert r["recomputed_steps"] > 0 and r["checkpoints"] > 0
        assert r["gradient_time_steps"] > N and r["solves"]["gradient"]["forward"] == r["gradient_time_steps"]
        assert r["gradient_rel_diff"] <= 1e-10 and r["hessp_rel_diff"] <= 1e-10 and r["value_rel_diff"] <= 1e-12
        assert r["gradient_norm"] == pytest.approx(ref["gradient_norm"], rel=1e-10)
        assert r["slowdown_gradient"] == pytest.approx(r["t_gradient"] / ref["t_gradient"])
        assert r["slowdown_value_gradient"] > 0 and r["slowdown_hessp"] > 0
        if mode == "checkpoint":
            assert r["disk_checkpoints"] == 0 and not r["checkpoint_dir"]
        else:
            assert r["checkpoint_dir"] and r["disk_checkpoints"] > 0 and r["checkpoint_dir_left"] == 0
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transient.json"]


def test_bench_transient_nonlinear(tmp_path):
    """The nonlinear kind: Newton at every step, one factorization per Newton iteration (value), per reverse
    step (gradient) and two per step (hessp) when the states are stored; CHOLMOD refused (nonsymmetric S)."""
    n_steps, repeat = 12, 2
    out = tmp_path / "nonlinear.json"
    res = _run("--quick", "--stiffness", "nonlinear", "--steps", str(n_steps), "--solvers", "superlu", "cholmod",
               "--modes", "store", "checkpoint", "--out", str(out))
    assert "R(u,p)" in res.stdout and "Newton iterations per step" in res.stdout and f"wrote {out}" in res.stdout
    data = json.loads(out.read_text())
    s = data["summary"]
    assert data["complete"] and s["rows_measured"] == 4 and s["rows_failed"] == 0 and s["rows_skipped"] == 2
    assert s["factorizations_met"] and s["store_solves_as_expected"] and s["checkpointed_recompute"]
    (run,) = data["runs"]
    assert run["config"]["stiffness"] == ["nonlinear"] and run["config"]["beta"] == 1.0
    assert run["config"]["nonlinear_source"] == 40.0 and run["env_unset_ok"] and "unset" in run["env_note"]
    skipped = [r for r in data["rows"] if "skipped" in r]
    assert {(r["scheme"], r["solver"], r["stiffness"]) for r in skipped} == {
        (sc, "cholmod", "nonlinear") for sc in ("crank_nicolson", "bdf2")}
    from adjopt.solvers import installed

    if "cholmod" in installed():  # refused (nonsymmetric step Jacobian), not missing
        assert all("nonsymmetric" in r["skipped"] for r in skipped)
    m = _module()
    rows = {(r["scheme"], r["mode"]): r for r in m.measured(data["rows"])}
    assert set(rows) == {(sc, mo) for sc in ("crank_nicolson", "bdf2") for mo in ("store", "checkpoint")}
    N = n_steps
    for (scheme, mode), r in rows.items():
        assert r["stiffness"] == "nonlinear" and r["solver"] == "superlu" and r["n"] == 8 and r["unknowns"] == 49
        assert r["params"] == 2 * 8 * 8 and r["steps"] == N and r["beta"] == 1.0 and r["newton"]["rtol"] > 0
        assert 0.5 < r["max_state"] < 5  # u of order 1: q(u) = 1 + u^2 matters
        for k in ("t_value", "t_gradient", "t_hessp", "build_s", "data_s"):
            assert r[k] > 0, k
        assert r["ratio_value_gradient"] == pytest.approx((r["t_value"] + r["t_gradient"]) / r["t_value"])
        assert r["ratio_hessp"] == pytest.approx(r["t_hessp"] / r["t_value"])
        st, f = r["stats"], r["factorizations_per_call"]  # the last repetition's counters
        assert st["value"]["newton_solves"] == N and st["value"]["time_steps"] == N
        its = st["value"]["newton_iterations"]
        assert N < its <= 4 * N  # Newton: 2-4 iterations per step here (rtol 1e-10)
        per_value = r["newton_iterations_per_value"]
        assert len(per_value) == repeat and per_value[-1] == its
        assert r["newton_iterations_per_step"] == pytest.approx(sum(per_value) / (repeat * N))
        assert 1 < r["newton_iterations_per_step"] <= 4
        # value: one factorization and one forward solve per Newton iteration, in every repetition
        assert r["factorizations_per_value"] == per_value and r["factorizations"] == r["expected_factorizations"]
        assert f["value"] == its and r["solves"]["value"] == {"forward": its}
        assert r["met_factorizations"] and r["expected_factorizations_per_call"] == f
        assert r["solves"]["gradient"]["adjoint"] == N and r["solves"]["hessp"]["second_adjoint"] == N
        if mode == "store":  # the value's trajectory serves both: N factorizations (adjoint), 2N (tangent + second)
            assert f == {"value": its, "gradient": N, "hessp": 2 * N}
            assert st["gradient"]["newton_iterations"] == st["hessp"]["newton_iterations"] == 0
            assert r["solves_as_expected"] and r["recomputed_steps"] == 0
        else:  # the recomputed steps run Newton again: one more factorization per iteration (and per tangent step)
            g_its, h_its = st["gradient"]["newton_iterations"], st["hessp"]["newton_iterations"]
            assert g_its > 0 and h_its > 0 and r["recomputed_steps"] > 0
            assert f["gradient"] == N + g_its and f["gradient"] > N
            assert f["hessp"] == h_its + r["solves"]["hessp"]["tangent"] + N and f["hessp"] > 2 * N
            ref = rows[scheme, "store"]
            assert r["gradient_rel_diff"] <= 1e-10 and r["hessp_rel_diff"] <= 1e-10 and r["value_rel_diff"] <= 1e-12
            assert r["gradient_norm"] == pytest.approx(ref["gradient_norm"], rel=1e-10)
        assert r["factorizations_total"] == sum(per_value) + repeat * (f["gradient"] + f["hessp"])
        step = r["step"]  # one Newton iteration: K(u), the factorization of S, the solve
        assert not step["symmetric_S"] and step["t_jacobian"] > 0 and step["t_factorize"] > 0
        assert step["t_step"] == pytest.approx(step["t_jacobian"] + step["t_factorize"] + step["t_solve"]
                                               + step["t_matvec"])
        assert r["value_over_iterations"] == pytest.approx(r["t_value"] / (its / N * N * step["t_step"]), rel=1e-9)
        assert set(r["kernels"]) >= {"residual", "jacobian", "vjp", "jvp", "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nonlinear.json"]  # written atomically


def test_bench_transient_refused():
    m = _module()
    args = m.parse_args(["--stiffness", "nonlinear"])
    assert args.beta == 1.0 and args.nonlinear_source == 40.0 and args.stiffness == ["nonlinear"]
    assert "nonsymmetric" in m.refused("nonlinear", "cholmod", args)
    assert m.refused("nonlinear", "superlu", args) is None and m.refused("parametric", "cholmod", args) is None
    assert m.refused("nonlinear", "cholmod", m.parse_args(["--stiffness", "nonlinear", "--beta", "0"])) is None
    assert m.parse_args([]).stiffness == ["parametric", "constant"]  # the nonlinear kind is asked for


@pytest.mark.parametrize("args, message", [
    (["--sizes", "1"], "must be >= 2"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--schemes", "rk4"], "invalid choice"),
    (["--solvers", "lu"], "invalid choice"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--final-time", "nan"], "--final-time must be a finite number > 0"),
    (["--stiffness", "quasilinear"], "invalid choice"),
    (["--beta", "nan"], "--beta must be a finite number"),
    (["--nonlinear-source", "inf"], "--nonlinear-source must be a finite number"),
    (["--out", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_bench_transient_rejects_bad_input(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        _module().parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_transient_memory_states():
    m = _module()
    assert m.memory_states(16, 1) == 4 and m.memory_states(200, 2) == 15 and m.memory_states(400, 1) == 20
    assert m.memory_states(4, 2) == 4  # at least one (u, du) snapshot of BDF2's two levels


def _schedule_steps(schedule, n_steps, s):
    """Forward steps of the checkpoint_schedules schedule a functional with snapshots=s runs (iterated here)."""
    import checkpoint_schedules as cs

    sch = (cs.MixedCheckpointSchedule(n_steps, s, storage=cs.StorageType.RAM) if schedule == "mixed"
           else cs.MultistageCheckpointSchedule(n_steps, s, 0))
    steps = 0
    for action in sch:
        if isinstance(action, cs.Forward):
            steps += min(int(action.n1), n_steps) - int(action.n0)
        elif isinstance(action, cs.EndReverse):
            break
    return steps


def test_bench_transient_gallery(tmp_path):
    n_steps, snaps = 30, (3, 6)
    out = tmp_path / "gallery.json"
    res = _run("--gallery", "heat_source_inversion", "--gallery-n", "8", "--gallery-steps", str(n_steps),
               "--gallery-snapshots", *map(str, snaps), "--gallery-solver", "superlu", "--repeat", "1",
               "--out", str(out))
    assert "| multistage s=3 |" in res.stdout and f"wrote {out}" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["mode"] == "gallery" and data["gallery"] == "heat_source_inversion"
    (run,) = data["runs"]
    assert run["command"].startswith("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_transient.py "
                                     "--gallery heat_source_inversion")
    assert run["env_unset_ok"] and "were unset" in run["env_note"] and run["build"]["solver"] == "superlu"
    assert run["problem_source"] and "functional.py" in run["transient_sources"]
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["stored"] + [f"{sc} s={s}" for sc in ("multistage", "mixed") for s in snaps]
    nf = 7 * 7
    for r in rows.values():
        assert "error" not in r and r["unknowns"] == nf and r["steps"] == n_steps and r["params"] == 21 * nf
        assert r["solver"] == "superlu" and r["factorizations"] == r["factorizations_total"] == 1
        for k in ("t_value", "t_gradient", "t_hessp", "t_gradient_cold"):
            assert r[k] > 0, k
        assert r["ratio_value_gradient"] == pytest.approx((r["t_value"] + r["t_gradient"]) / r["t_value"])
        assert r["ratio_hessp"] == pytest.approx(r["t_hessp"] / r["t_value"])
        assert r["stored_bytes"] == r["stored_states"] * 8 * nf and r["solves"]["value"] == {"forward": n_steps}
    st = rows["stored"]
    assert st["solves_as_expected"] and st["met_factorizations"] and st["ratio_target"] == 2.05
    assert st["solves"]["gradient"] == {"adjoint": n_steps}
    assert st["solves"]["hessp"] == {"tangent": n_steps, "second_adjoint": n_steps}
    assert st["solves"]["gradient_cold"] == {"forward": n_steps, "adjoint": n_steps}
    assert st["steps_per_step"] == {"value": 1.0, "gradient": 0.0, "hessp": 0.0, "gradient_cold": 1.0}
    assert st["stored_states"] == 2 * n_steps + 1 and st["stored_states_hessp"] == 3 * n_steps + 2
    for sched in ("multistage", "mixed"):
        for s in snaps:
            r = rows[f"{sched} s={s}"]
            steps = _schedule_steps(sched, n_steps, s)  # the schedule's promise
            assert r["time_steps"] == {"value": n_steps, "gradient": steps, "hessp": steps, "gradient_cold": steps}
            assert r["steps_per_step"]["gradient_cold"] == pytest.approx(steps / n_steps)
            assert r["promise"]["schedule_steps"] == r["promise"]["optimal_steps"] == steps
            assert r["promise"]["stated_per_step"] is None  # stated for N = 1000 only
            assert r["met_promise"] and r["hessp_met_promise"] and "met_stated_promise" not in r
            assert r["solves"]["gradient_cold"] == {"forward": steps, "adjoint": n_steps}
            assert r["solves"]["hessp"] == {"forward": steps, "tangent": steps, "adjoint": n_steps,
                                            "second_adjoint": n_steps}
            assert 0 < r["stored_states"] < r["stored_states_hessp"] < n_steps + 1
            assert r["gradient_rel_diff"] <= 1e-12 and r["hessp_rel_diff"] <= 1e-12 and r["value_rel_diff"] <= 1e-12
        lo, hi = rows[f"{sched} s={snaps[0]}"], rows[f"{sched} s={snaps[1]}"]
        assert lo["stored_states"] < hi["stored_states"] and lo["time_steps"]["gradient"] > hi["time_steps"]["gradient"]
    s = data["summary"]
    assert s["rows_measured"] == 5 and s["rows_failed"] == 0 and s["promises_met"] and s["store_solves_as_expected"]
    assert s["stored_states_grow_with_snapshots"] == {"multistage": True, "mixed": True}
    assert s["met_ratio_target"] == (st["ratio_value_gradient"] <= 2.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.json"]  # written atomically


def test_bench_transient_gallery_promise():
    m = _module()
    for n_steps, s in ((30, 3), (30, 6), (57, 5), (100, 10)):
        for sched in ("multistage", "mixed"):
            pr = m.schedule_promise(sched, n_steps, s)
            assert pr["schedule_steps"] == pr["optimal_steps"] == _schedule_steps(sched, n_steps, s)
    assert m.revolve_steps(1000, 10) == 4636 and m.revolve_steps(1000, 40) == 3097
    assert m.STATED_PROMISE[("mixed", 1000, 10)] == 3.921


@pytest.mark.parametrize("args, message", [
    (["--gallery", "poisson"], "invalid choice"),
    (["--gallery", "heat_source_inversion", "--gallery-snapshots", "0"], "--gallery-snapshots must be in"),
    (["--gallery", "heat_source_inversion", "--gallery-steps", "10", "--gallery-snapshots", "10"],
     "--gallery-snapshots must be in"),
    (["--gallery", "heat_source_inversion", "--gallery-n", "1"], "--gallery-n must be >= 2"),
    (["--gallery", "heat_source_inversion", "--quick"], "--quick does not apply"),
])
def test_bench_transient_gallery_rejects_bad_input(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        _module().parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_transient_gallery_defaults():
    args = _module().parse_args(["--gallery", "heat_source_inversion"])
    assert (args.gallery_n, args.gallery_steps, args.gallery_snapshots, args.repeat) == (128, 1000, [10, 40], 3)
    assert args.gallery_schedules == ["multistage", "mixed"] and args.out.endswith("bench_transient_gallery.json")
