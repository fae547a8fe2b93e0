"""The adjopt-vs-pyMOTO benchmark runs end to end at a small size: adjopt alone without pyMOTO (exit 0, said so in
the JSON), bad input exits 2 and writes nothing, and, where the pyMOTO environment of the development machine
exists, both sides start from the same f and take the same number of MMA iterations; for the cases mechanism,
eigen, robust and stress."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_pymoto.py")
PYMOTO_PYTHON = "/work/pymoto_ref/venv/bin/python"
PYMOTO_EXAMPLES = "/work/pymoto_ref/examples_orig"
PHASES = {"filter", "assembly", "factorize", "solve", "sensitivity", "update"}


def _run(args, tmp_path, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


#: the benchmark's cases: (problems/<module>.py, build kwargs besides the size, pyMOTO's objective scale)
CASES = {
    "mechanism": ("topology_mechanism", {}, 10.0),
    "eigen": ("topology_eigen", {}, 100.0),
    "robust": ("topology_robust", dict(formulation="eroded", continuation="pymoto", beta=1e-3, beta_max=40.0), 100.0),
    "stress": ("topology_stress", dict(shear_scale=2.0), 100.0),
}


def _problem(nx, ny, case="mechanism"):
    sys.path.insert(0, os.path.join(ROOT, "problems"))
    try:
        mod = __import__(CASES[case][0])
    finally:
        sys.path.remove(os.path.join(ROOT, "problems"))
    return mod.build(nelx=nx, nely=ny, **CASES[case][1])


def _f0(nx, ny, case="mechanism"):
    problem = _problem(nx, ny, case)
    return problem.functional.value(problem.p0)


def _check_adjopt(a, iters, nx, ny, case="mechanism"):
    assert a["status"] == "ok" and a["nit"] == iters and a["method"] == "mma" and a["options"] == {"move": 0.1}
    assert len(a["iter_times"]) == iters and all(t > 0 for t in a["iter_times"])
    assert a["iterations_timed"] == iters - 1
    assert a["s_per_iter"] > 0 and a["s_per_iter_mean"] > 0
    phases = PHASES - {"solve"} | {"eigensolve"} if case == "eigen" else PHASES
    assert set(a["phase_shares"]) == phases and all(v >= 0 for v in a["phase_shares"].values())
    assert 0.5 < sum(a["phase_shares"].values()) <= 1.0 + 1e-9
    assert len(a["f_history"]) == iters + 1 and all(math.isfinite(f) for f in a["f_history"])
    assert math.isfinite(a["f_final"]) and a["f_final"] == a["f_history"][-1]
    scale = CASES[case][2]
    assert a["f_final_scaled"] == pytest.approx(scale * a["f_final"] / abs(a["f_start"]), rel=1e-12)
    # the start is J(p0) of the same problem
    assert a["f_start"] == pytest.approx(_f0(nx, ny, case), rel=1e-12, abs=0)
    if case == "stress":  # the volume fraction is the objective: no bound
        assert a["volume_bound"] is None and a["volume_fraction_final"] == pytest.approx(a["f_final"], rel=1e-12)
        assert 0 < a["volume_fraction_final"] <= 1
    else:
        bound = 0.3 if case == "mechanism" else 0.5
        assert 0 < a["volume_fraction_final"] <= bound + 1e-6 and a["volume_bound"] == bound
    assert a["solver"] == "AutoSolver" and a["chosen"] and a["solver_name"].startswith("auto:")
    nondesign = 2 * 4 * 4 if case == "mechanism" else 0
    assert a["unknowns"] > 0 and a["design_variables"] == nx * ny - nondesign
    if case == "eigen":  # k + 1 = 4 eigenvalues, ascending; omega1 = sqrt(l1)
        lam = a["eigenvalues_final"]
        assert len(lam) == 4 and all(0 < x <= y for x, y in zip(lam, lam[1:]))
        assert a["omega1_final"] == pytest.approx(math.sqrt(lam[0]), rel=1e-14)
        assert a["f_final"] == pytest.approx(sum(1 / x for x in lam[:3]), rel=1e-10)
    if case == "stress":  # phases and counts of the two constraint functionals, recorded by a callback
        assert a["phase_source"].startswith("constraint functionals")
        assert len(a["factorizations_per_iter"]) == iters and all(n >= 1 for n in a["factorizations_per_iter"])
        assert a["factorizations"] >= sum(a["factorizations_per_iter"]) + 1 and a["solves"] >= a["factorizations"]
        problem = _problem(nx, ny, case)  # the start values are the constraint functionals' at p0
        assert list(a["constraints"]) == ["stress", "compliance"]
        for (fun, bound), name in zip(problem.constraints, ("stress", "compliance")):
            c = a["constraints"][name]
            assert c["bound"] == bound and c["start"] == pytest.approx(fun.value(problem.p0), rel=1e-12)
            assert math.isfinite(c["final"])
        assert a["constraints"]["compliance"]["bound"] == 20.0 and a["constraints"]["stress"]["bound"] == 0.0
    else:
        assert a["phase_source"] == "history"
    if case == "robust":  # pyMOTO's schedule: 1e-3 up to step 15, 2.50094 from step 16
        assert len(a["beta_schedule"]) == iters + 1
        assert all(b == (1e-3 if k <= 15 else pytest.approx(2.5009375)) for k, b in enumerate(a["beta_schedule"][:21]))
        assert a["beta_history_entries"][0] == 1e-3 and len(a["beta_history_entries"]) == iters + 1


@pytest.mark.parametrize("how", ["--no-pymoto", "missing interpreter"])
def test_bench_pymoto_adjopt_alone(tmp_path, how):
    out = tmp_path / "bp.json"
    extra = ["--no-pymoto"] if how == "--no-pymoto" else ["--pymoto-python", str(tmp_path / "no" / "python")]
    res = _run(["--cases", "mechanism", "--iters", "2", "--size", "16", "12", "--out", str(out), *extra], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "adjopt" in res.stdout and "wrote" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["errors"] == []
    assert data["pymoto_available"] is False and data["pymoto_reason"] and "alone" in data["note"]
    if how == "--no-pymoto":
        assert data["pymoto_reason"] == "--no-pymoto"
    else:
        assert "no Python interpreter" in data["pymoto_reason"]
    assert data["config"]["iters"] == 2 and data["config"]["size"] == [16, 12]
    info = data["info"]
    assert info["cpus"] >= 1 and info["adjopt"] and info["numpy"] and info["scipy"] and info["pymoto"] is None
    assert isinstance(info["threadpools"], list)
    row = data["cases"]["mechanism"]
    assert row["size"] == [16, 12] and row["pymoto"]["status"] == "not run"
    assert "comparison" not in row and row["config"]["pymoto_size_patched"] is True
    _check_adjopt(row["adjopt"], 2, 16, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bp.json"]  # written atomically, no temporary left


def test_bench_pymoto_adjopt_alone_eigen_robust(tmp_path):
    out = tmp_path / "bp.json"
    res = _run(["--cases", "eigen", "robust", "--iters", "2", "--size", "16", "12", "--out", str(out), "--no-pymoto"],
               tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "eigensolve" in res.stdout and "lowest sqrt(eigenvalue)" in res.stdout and "beta at x_N" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["errors"] == [] and data["pymoto_available"] is False
    assert list(data["cases"]) == ["eigen", "robust"]
    for case in ("eigen", "robust"):
        row = data["cases"][case]
        assert row["size"] == [16, 12] and row["pymoto"]["status"] == "not run" and "comparison" not in row
        assert row["config"]["pymoto_scale"] == 100.0 and row["config"]["pymoto_size_patched"] is True
        assert all(len(row["loadavg"][k]) == 3 for k in ("before", "between", "after"))
        _check_adjopt(row["adjopt"], 2, 16, 12, case)
    assert data["cases"]["robust"]["config"]["build"]["continuation"] == "pymoto"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bp.json"]


def test_bench_pymoto_adjopt_alone_stress(tmp_path):
    out = tmp_path / "bp.json"
    res = _run(["--cases", "stress", "--iters", "2", "--size", "10", "20", "--out", str(out), "--no-pymoto"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "compliance" in res.stdout and "constraint functionals" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["errors"] == [] and data["pymoto_available"] is False
    row = data["cases"]["stress"]
    assert row["size"] == [10, 20] and row["pymoto"]["status"] == "not run" and "comparison" not in row
    assert row["config"]["build"] == {"shear_scale": 2.0, "nelx": 10, "nely": 20}
    assert row["config"]["pymoto_example"] == "ex_volume_stress.py" and row["config"]["pymoto_scale"] == 100.0
    assert set(row["config"]["constraints"]) == {"stress", "compliance"}
    _check_adjopt(row["adjopt"], 2, 10, 20, "stress")
    assert row["adjopt"]["f_start"] == pytest.approx(1.0, rel=1e-12)  # the start is solid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bp.json"]


def test_bench_pymoto_bad_input(tmp_path):
    out = tmp_path / "x.json"
    cases = [
        (["--cases", "nosuchcase", "--no-pymoto"], "unknown case"),
        (["--iters", "0", "--no-pymoto"], "--iters"),
        # pyMOTO wanted (an interpreter that exists) but its examples are missing
        (["--iters", "2", "--size", "16", "12", "--pymoto-python", sys.executable, "--pymoto-examples",
          str(tmp_path / "noexamples")], "not a folder"),
        (["--iters", "2", "--size", "16", "12", "--pymoto-python", sys.executable, "--pymoto-examples",
          str(tmp_path)], "does not exist"),  # a folder without the example file
        (["--size", "8", "6", "--no-pymoto"], "nondesign"),  # the 4 x 4 solids do not fit
        (["--size", "0", "16", "--no-pymoto"], "--size"),
        (["--cases", "eigen", "--size", "3", "16", "--no-pymoto"], "mass block"),  # the block needs 4 x 4
    ]
    for args, msg in cases:
        res = _run([*args, "--out", str(out)], tmp_path, timeout=120)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert msg in res.stderr, (args, res.stderr)
    res = _run(["--no-pymoto", "--out", str(tmp_path / "no" / "x.json")], tmp_path, timeout=120)
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not os.path.exists(PYMOTO_PYTHON), reason=f"no pyMOTO environment at {PYMOTO_PYTHON}")
def test_bench_pymoto_against_pymoto(tmp_path):
    if not os.path.isdir(PYMOTO_EXAMPLES):
        pytest.skip(f"no pyMOTO examples at {PYMOTO_EXAMPLES}")
    out = tmp_path / "bp.json"
    res = _run(["--cases", "mechanism", "--iters", "2", "--size", "16", "16", "--pymoto-python", PYMOTO_PYTHON,
                "--pymoto-examples", PYMOTO_EXAMPLES, "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["complete"] and data["errors"] == [] and data["pymoto_available"] is True
    assert data["pymoto_reason"] is None and data["info"]["pymoto"] == "2.0.1"
    row = data["cases"]["mechanism"]
    _check_adjopt(row["adjopt"], 2, 16, 16)
    p = row["pymoto"]
    assert p["status"] == "ok" and p["pymoto"] == "2.0.1" and p["numpy"] and p["scipy"] and p["cpus"] >= 1
    assert p["size"] == [16, 16] and p["n_design"] == 16 * 16  # the example ran at the patched size
    assert p["steps"] == 2 and p["maxit"] == 2 and p["tolf"] == 0 and p["tolx"] == 0
    assert len(p["step_times"]) == 2 and p["s_per_iter"] > 0 and p["s_per_iter_mean"] > 0
    assert p["solvers"] and all("Solver" in s for s in p["solvers"])
    assert p["mma"]["move"] == 0.1
    assert len(p["f_history"]) == 2 and all(math.isfinite(f) for f in p["f_history"])
    assert math.isfinite(p["f_final"]) and p["f_final_scaled"] == pytest.approx(10 * p["f_final"] / abs(p["f_start"]))
    assert p["conversion_max_rel_diff"] < 1e-12  # g0 / sf is the u_out that went into the Scaling module
    assert 0 < p["volume_fraction_final"] < 1
    assert p["solver_per_iter"]["factorize"] > 0
    assert all(n >= 1 for n in p["blas_threads"].values())
    # the same problem: the same start, and (the MMAs being alike) nearby early iterates
    cmp_ = row["comparison"]
    assert cmp_["f_start_agree"] and cmp_["f_start_rel_diff"] < 1e-9
    assert cmp_["time_ratio_adjopt_over_pymoto"] > 0
    assert abs(cmp_["volume_fraction_final_diff"]) < 0.05
    assert "adjopt / pyMOTO" in res.stdout and "LDAWrapper" in res.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bp.json"]


@pytest.mark.skipif(not os.path.exists(PYMOTO_PYTHON), reason=f"no pyMOTO environment at {PYMOTO_PYTHON}")
def test_bench_pymoto_eigen_robust_against_pymoto(tmp_path):
    """17 iterations: robust's beta schedule changes (1e-3 -> 2.50094) at step 16 on both sides alike."""
    if not os.path.isdir(PYMOTO_EXAMPLES):
        pytest.skip(f"no pyMOTO examples at {PYMOTO_EXAMPLES}")
    out = tmp_path / "bp.json"
    iters = 17
    res = _run(["--cases", "eigen", "robust", "--iters", str(iters), "--size", "16", "12", "--pymoto-python",
                PYMOTO_PYTHON, "--pymoto-examples", PYMOTO_EXAMPLES, "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["complete"] and data["errors"] == [] and data["pymoto_available"] is True
    for case in ("eigen", "robust"):
        row = data["cases"][case]
        _check_adjopt(row["adjopt"], iters, 16, 12, case)
        p = row["pymoto"]
        assert p["status"] == "ok" and p["pymoto"] == "2.0.1"
        assert p["size"] == [16, 12] and p["n_design"] == 16 * 12  # the example ran at the patched size
        assert p["steps"] == iters and p["maxit"] == iters and p["tolf"] == 0 and p["tolx"] == 0
        assert len(p["step_times"]) == iters and p["s_per_iter"] > 0 and p["mma"]["move"] == 0.1
        assert len(p["f_history"]) == iters and all(math.isfinite(f) for f in p["f_history"])
        assert p["f_final_scaled"] == pytest.approx(100 * p["f_final"] / abs(p["f_start"]))
        assert p["conversion_max_rel_diff"] < 1e-12  # g0 / sf is the value that went into the Scaling module
        assert p["solver_per_iter"]["factorize"] > 0
        cmp_ = row["comparison"]
        assert cmp_["f_start_agree"] and cmp_["f_start_rel_diff"] < 1e-9
        assert cmp_["time_ratio_adjopt_over_pymoto"] > 0
        assert abs(cmp_["volume_fraction_final_diff"]) < 0.01 and abs(cmp_["f_final_rel_diff"]) < 0.05
        assert cmp_["f_history_max_abs_diff_over_f0"] < 0.05  # alike MMAs: nearby early iterates
    e = data["cases"]["eigen"]["pymoto"]
    assert e["solvers"] and e["solvers"][0].startswith("EigenSolve(") and "nmodes=3" in e["solvers"][0]
    assert len(e["eigenvalues_final"]) == 3 and len(e["eigenvalues_history"]) == iters
    assert e["omega1_final"] == pytest.approx(math.sqrt(e["eigenvalues_final"][0]))
    assert abs(data["cases"]["eigen"]["comparison"]["omega1_final_rel_diff"]) < 0.01
    r = data["cases"]["robust"]
    assert r["pymoto"]["kwargs_in_example"]["maxit"] == 120  # the example's own, overridden
    assert r["pymoto"]["solvers"] == ["LDAWrapper(SolverSparseLU)"]
    # the beta of every analysis x_0..x_N: pyMOTO's Continuation module and adjopt's schedule agree
    assert len(r["pymoto"]["beta_history"]) == iters + 1
    assert r["comparison"]["beta_max_abs_diff"] == 0.0 and r["pymoto"]["beta_final"] == pytest.approx(2.5009375)
    # adjopt's history entry of step 16 has the old beta: left out of the f comparison
    assert r["comparison"]["f_history_compared"] == iters - 1 and r["comparison"]["f_final_same_beta"]
    assert "EigenSolve" in res.stdout and "beta at x_N" in res.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bp.json"]


@pytest.mark.skipif(not os.path.exists(PYMOTO_PYTHON), reason=f"no pyMOTO environment at {PYMOTO_PYTHON}")
def test_bench_pymoto_stress_against_pymoto(tmp_path):
    """The stress case at 10 x 20: the same volume fraction, stress aggregate and compliance at the start."""
    if not os.path.isdir(PYMOTO_EXAMPLES):
        pytest.skip(f"no pyMOTO examples at {PYMOTO_EXAMPLES}")
    out = tmp_path / "bp.json"
    iters = 3
    res = _run(["--cases", "stress", "--iters", str(iters), "--size", "10", "20", "--pymoto-python", PYMOTO_PYTHON,
                "--pymoto-examples", PYMOTO_EXAMPLES, "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["complete"] and data["errors"] == [] and data["pymoto_available"] is True
    row = data["cases"]["stress"]
    _check_adjopt(row["adjopt"], iters, 10, 20, "stress")
    p = row["pymoto"]
    assert p["status"] == "ok" and p["pymoto"] == "2.0.1"
    assert p["size"] == [10, 20] and p["n_design"] == 10 * 20  # the example ran at the patched size
    assert p["kwargs_in_example"]["maxit"] == 300  # the example's own, overridden
    assert p["steps"] == iters and p["maxit"] == iters and p["tolf"] == 0 and p["tolx"] == 0
    assert len(p["step_times"]) == iters and p["s_per_iter"] > 0 and p["mma"]["move"] == 0.1
    assert p["response_tags"] == ["Objective (volume)", "Stress constraint", "Displacement constraint"]
    assert p["solvers"] == ["LDAWrapper(SolverSparseLU)"] and p["solver_per_iter"]["factorize"] > 0
    assert p["f_start"] == pytest.approx(1.0, rel=1e-12)  # g0 / 100 at the solid start
    assert p["f_final_scaled"] == pytest.approx(100 * p["f_final"]) and p["volume_fraction_final"] == p["f_final"]
    assert p["conversion_max_rel_diff"] < 1e-12  # g0 / 100 is sum(x_filt) / nel
    assert p["constraints"]["compliance"]["conversion_max_rel_diff"] < 1e-12  # 20 (1 + g2 / 10) is f.u
    for name in ("stress", "compliance"):
        c = p["constraints"][name]
        assert len(c["history"]) == iters and c["start"] == c["history"][0] and math.isfinite(c["final"])
    cmp_ = row["comparison"]
    assert cmp_["f_start_agree"] and cmp_["f_start_rel_diff"] < 1e-12
    assert cmp_["constraints_start_agree"]
    assert all(cmp_["constraints"][k]["start_rel_diff"] < 1e-12 for k in ("stress", "compliance"))
    assert cmp_["time_ratio_adjopt_over_pymoto"] > 0 and abs(cmp_["volume_fraction_final_diff"]) < 0.2
    assert "constraints start rel diff" in res.stdout and "LDAWrapper" in res.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bp.json"]
