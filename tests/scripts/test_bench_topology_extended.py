"""The extended topology benchmark (robust min-max MBB, 3D cantilever, MMA) runs end to end at tiny sizes: the
JSON has the timings, phase shares that add up to 1, the solver counts of each case, and bad arguments exit 2
without writing anything."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_topology_extended.py")
PHASES = {"filter", "assembly", "factorize", "solve", "sensitivity", "update"}


def run(tmp_path, *args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def test_bench_topology_extended_tiny(tmp_path):
    out = tmp_path / "ext.json"
    # 128 x 48: 12,592 free dofs, just above the 12k where "auto" takes geometric multigrid in 2D (the path
    # of the real 600 x 200 run); the 8 x 4 x 4 cantilever gets a factorization
    res = run(tmp_path, "--iters", "2", "--size", "robust_mbb=128x48", "--size", "cantilever3d=8x4x4",
              "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "s/iter med" in res.stdout and "wrote" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["errors"] == [] and data["total_s"] > 0
    assert data["config"]["iters"] == 2
    assert data["config"]["sizes"] == {"robust_mbb": "128x48", "cantilever3d": "8x4x4"}
    info = data["info"]
    assert info["cpus"] >= 1 and "git" in info and isinstance(info["threadpools"], list) and "thread_env" in info

    assert list(data["cases"]) == ["robust_mbb", "cantilever3d"]
    for r in data["cases"].values():
        assert r["status"] == "ok", r
        assert r["build_s"] > 0 and r["warmup_s"] > 0 and r["run_s"] > 0
        assert r["nit"] == 2 and r["iterations_timed"] == 1 and not r["timed_includes_warmup"]
        assert len(r["iter_times"]) == 2 and all(t > 0 for t in r["iter_times"])
        # iteration 2 alone is timed: its history time is the median and the mean
        assert r["s_per_iter_median"] == r["s_per_iter_mean"] == r["iter_times"][1]
        ph = r["phases"]
        assert set(ph["share"]) == set(ph["median_s"]) == PHASES
        assert all(v >= 0 for v in ph["median_s"].values()) and all(v >= 0 for v in ph["share"].values())
        assert abs(sum(ph["share"].values()) - 1.0) < 1e-6
        assert ph["median_s"]["factorize"] > 0 and ph["median_s"]["solve"] > 0 and ph["median_s"]["update"] > 0
        # the callback's wall time of the iteration is the history's time (up to the callback's own microseconds)
        assert abs(ph["median_wall_s"] - r["s_per_iter_median"]) <= 0.05 * r["s_per_iter_median"] + 2e-3
        assert r["update_share"] == ph["share"]["update"]
        assert math.isfinite(r["objective_start"]) and r["objective_end"] < r["objective_start"]
        assert r["peak_rss_GiB"] > 0.05 and (r["case_peak_GiB"] is None or r["case_peak_GiB"] > 0.05)
        for key in ("loadavg_before", "loadavg_after"):
            assert r[key] is None or (len(r[key]) == 3 and all(x >= 0 for x in r[key]))

    rob = data["cases"]["robust_mbb"]
    assert rob["solver"] == "GMGSolver" and rob["solver_levels"] >= 2
    assert rob["elements"] == 128 * 48 and rob["design_variables"] == 128 * 48 + 1  # the densities and z
    assert rob["free_dofs"] == 2 * 129 * 49 - 49 - 1  # the x-dofs of the left edge and the roller
    # one forward solve per design and iteration (compliance is self-adjoint: no adjoint solve), and one
    # multigrid setup per design
    assert rob["steady"] == dict(factorizations_per_iter=3, solves_per_iter=3,
                                 cg_iterations_per_solve=rob["steady"]["cg_iterations_per_solve"])
    assert rob["steady"]["cg_iterations_per_solve"] >= 1
    # the run's start evaluates the three designs once more (the continuation's reset drops build()'s states):
    # 3 (nit + 1) over nit iterations
    assert rob["solves"] == rob["factorizations"] == 3 * (rob["nit"] + 1)
    assert rob["solves_per_iter"] == rob["factorizations_per_iter"] == 4.5
    # the shared solver's own counts: build()'s three evaluations at p0 (the min-max scales) and the run's
    assert rob["shared_solver"] is True
    assert rob["stats"]["solves"] == {"forward": 3 + rob["solves"]}
    assert rob["stats"]["factorizations"] == 3 + rob["factorizations"]
    for k in ("factorize", "solve"):  # the min-max objective's phases are its three designs' (summed)
        assert abs(rob["history_phases"].get(k, 0.0) - rob["phases"]["median_s"][k]) < 1e-6, k
    assert rob["objective_start"] == 1.0  # z = max_k c_k / c_k(p0)
    c0, c1 = rob["compliances"]["start"], rob["compliances"]["end"]
    assert c0["eroded"] > c0["intermediate"] > c0["dilated"] > 0  # the eroded design is the least stiff
    assert all(c1[k] < c0[k] for k in c0)
    assert abs(max(c1[k] / c0[k] for k in c0) - rob["objective_end"]) < 0.05  # z bounds the scaled compliances

    can = data["cases"]["cantilever3d"]
    assert can["elements"] == can["design_variables"] == 8 * 4 * 4
    assert can["free_dofs"] == 3 * 9 * 5 * 5 - 3 * 5 * 5  # the clamped face x = 0
    assert can["steady"] == dict(factorizations_per_iter=1, solves_per_iter=1, cg_iterations_per_solve=None)
    assert can["solves"] == can["factorizations"] == can["nit"] + 1
    # one functional: the library's own phases and the callback's are the same counters over the same iteration
    for k in PHASES - {"update"}:
        assert abs(can["history_phases"].get(k, 0.0) - can["phases"]["median_s"][k]) < 1e-9, k
    assert "stats" not in can and "compliances" not in can
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("args, message", [
    (["--cases", "robust_mbb", "nosuch"], "unknown case"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--size", "robust_mbb=60x"], "must be NxN"),
    (["--size", "cantilever3d=8x4"], "must be NxNxN"),
    (["--size", "nosuch=8x4"], "unknown case"),
    (["--size", "robust_mbb"], "CASE=SIZE"),
    (["--out", os.path.join("no", "x.json")], "does not exist"),
])
def test_bench_topology_extended_bad_arguments(tmp_path, args, message):
    res = run(tmp_path, "--out", str(tmp_path / "x.json"), *args, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_bench_topology_extended_mbb3d_tiny(tmp_path):
    out = tmp_path / "mbb3d.json"
    res = run(tmp_path, "--cases", "mbb3d", "--iters", "2", "--size", "mbb3d=8x4x4", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["complete"] and list(data["cases"]) == ["mbb3d"] and data["config"]["sizes"] == {"mbb3d": "8x4x4"}
    r = data["cases"]["mbb3d"]
    assert r["status"] == "ok" and r["nit"] == 2 and r["free_dofs"] > 0
