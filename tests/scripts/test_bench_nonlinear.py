"""The nonlinear benchmark runs end to end at tiny sizes (--quick) and writes sane figures atomically."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("pyamg")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_nonlinear.py")
TIMES = ("t_value", "t_value_cold", "t_gradient", "t_hessp", "t_value_gradient")
RATIOS = ("ratio_value_gradient", "ratio_hessp", "ratio_value_gradient_cold", "ratio_hessp_cold",
          "limit_value_gradient", "limit_value_gradient_cold")
PHASES = ("filter", "assembly", "factorize", "solve", "sensitivity", "rest")


def _run(*args, check=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, check=check,
                          timeout=timeout, env=env)


def _module():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_nonlinear
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return bench_nonlinear


def test_bench_nonlinear_quick(tmp_path):
    out = tmp_path / "nonlinear.json"
    res = _run("--quick", "--profile", "--out", str(out))
    assert "Figures" in res.stdout and "Phases" in res.stdout and "cProfile" in res.stdout
    assert "Targets over 3 measured row(s)" in res.stdout and f"wrote {out}" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["summary"]["rows_measured"] == 3 and data["summary"]["rows_failed"] == 0
    (run,) = data["runs"]
    assert run["command"].startswith("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_nonlinear.py")
    assert run["env_unset_ok"] and run["env_unset"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    assert run["config"]["quick"] and run["config"]["beta"] == 1.0 and run["config"]["repeat"] == 2
    assert run["info"]["cpus"] >= 1 and "git" in run["info"] and "thread_env" in run["info"]["blas"]
    rows = data["rows"]
    assert sorted((r["dim"], r["n"], r["solver"]) for r in rows) == [(2, 8, "amg"), (2, 8, "superlu"),
                                                                      (3, 4, "amg-sa")]
    for r in rows:
        assert r["unknowns"] == (r["n"] - 1) ** r["dim"] and r["params"] == (r["n"] + 1) ** r["dim"]
        for k in TIMES:
            assert r[k] > 0, k
        for k in RATIOS:
            assert math.isfinite(r[k]) and r[k] > 0, k
        assert r["ratio_value_gradient"] > 1 and r["limit_value_gradient"] == pytest.approx(
            1 + 1.2 / r["newton_its"])
        assert r["ratio_value_gradient"] == pytest.approx((r["t_value"] + r["t_gradient"]) / r["t_value"])
        assert r["ratio_hessp"] == pytest.approx(r["t_hessp"] / r["t_value"]) and r["hessp_target"] == 0.15
        assert isinstance(r["met_value_gradient"], bool) and isinstance(r["met_hessp"], bool)
        # Newton: several steps from u = 0 (f = 10), at least as many as from the nearest cached state
        assert r["newton_its"] >= 2 and r["newton_its_cold"] >= r["newton_its"] and r["newton_its_cold"] >= 3
        assert len(r["newton_history_cold"]) == r["repetitions"][-1]["newton_its_cold"] + 1
        assert r["newton_history_cold"][-1] < 1e-9 * r["newton_history_cold"][0]
        assert r["factorizations"] >= 1 and r["factorizations_cold"] >= 1
        assert r["cold_value_rel_diff"] < 1e-8  # warm and cold Newton find the same state
        assert len(r["repetitions"]) == 2
        for c in ("value", "gradient", "hessp", "value_cold"):
            assert set(r["phases"][c]) == set(PHASES)
            assert r["stats"][c]["last"]["newton_iterations"] >= (1 if c.startswith("value") else 0)
        assert r["phases"]["value"]["assembly"] > 0 and r["phases"]["hessp"]["solve"] > 0
        assert r["stats"]["gradient"]["solves"] == {"adjoint": 1}
        assert r["stats"]["hessp"]["solves"] == {"second_adjoint": 1, "tangent": 1}
        assert all(v > 0 for k, v in r["kernels"].items()), r["kernels"]
        assert set(r["profile"]) == {"value", "gradient", "hessp"} and r["profile"]["value"]["top"]
        if r["solver"] == "superlu":  # a direct value factorizes once per Newton step and once at the end
            assert r["factorizations_cold"] == r["newton_its_cold"] + 1
        else:
            assert r["stats"]["value"]["iterations"]["forward"] > 0
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nonlinear.json"]


def test_bench_nonlinear_append_and_refusal(tmp_path):
    """--append keeps other rows; CHOLMOD on the nonsymmetric Jacobian is an expected error row (exit 0)."""
    out = tmp_path / "nonlinear.json"
    _run("--quick", "--sizes3d", "--solvers", "superlu", "--out", str(out), "--no-warmup")
    from adjopt.solvers import CholmodSolver

    if not CholmodSolver.available():
        pytest.skip("scikit-sparse is not installed")
    res = _run("--quick", "--sizes2d", "--sizes3d", "3", "--solvers3d", "cholmod", "--out", str(out), "--append",
               "--no-warmup")
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2 and data["complete"]
    rows = {(r["dim"], r["solver"]): r for r in data["rows"]}
    assert set(rows) == {(2, "superlu"), (3, "cholmod")}
    refused = rows[3, "cholmod"]
    assert "symmetric positive definite" in refused["error"] and refused["expected_refusal"] is True
    assert refused["run"] == 1
    assert rows[2, "superlu"]["run"] == 0 and rows[2, "superlu"]["t_value"] > 0
    assert "ERROR" in res.stdout and res.returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--sizes2d", "1"], "must be >= 2"),
    (["--solvers", "lu"], "invalid choice"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--sizes2d", "--sizes3d"], "nothing to do"),
    (["--source", "nan"], "--source must be a finite number"),
    (["--out", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_bench_nonlinear_rejects_bad_input(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        _module().parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_nonlinear_ratios():
    med = dict(t_value=2.0, t_gradient=0.5, t_hessp=0.2, t_value_cold=4.0, newton_its=2, newton_its_cold=4)
    r = _module().ratios(med)
    assert r["ratio_value_gradient"] == pytest.approx(1.25) and r["limit_value_gradient"] == pytest.approx(1.6)
    assert r["met_value_gradient"] is True and r["ratio_hessp"] == pytest.approx(0.1) and r["met_hessp"] is True
    assert r["ratio_value_gradient_cold"] == pytest.approx(1.125) and r["limit_value_gradient_cold"] == 1.3
    assert r["ratio_hessp_cold"] == pytest.approx(0.05) and r["cold_over_warm"] == 2.0
    r = _module().ratios(dict(med, t_gradient=2.0, t_hessp=0.4))
    assert r["met_value_gradient"] is False and r["met_hessp"] is False
