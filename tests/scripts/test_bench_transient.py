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


@pytest.mark.parametrize("args, message", [
    (["--sizes", "1"], "must be >= 2"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--schemes", "rk4"], "invalid choice"),
    (["--solvers", "lu"], "invalid choice"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--final-time", "nan"], "--final-time must be a finite number > 0"),
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
