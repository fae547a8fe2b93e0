"""The topology benchmark runs end to end at tiny sizes: adjopt and the 88-line baselines take the same
OC steps (compliances agree to round-off), full runs agree, unknown solvers are skipped with a reason,
and the JSON is written atomically."""

import importlib.util
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_topology.py")
HAVE_CHOLMOD = importlib.util.find_spec("sksparse") is not None


def test_bench_topology_tiny(tmp_path):
    out, png = tmp_path / "topo.json", tmp_path / "topo.png"
    res = subprocess.run([sys.executable, SCRIPT, "--mbb", "30x10", "--cantilever", "4x2x2", "--full", "30x10",
                          "--iters", "2", "--solvers", "superlu", "cholmod", "nosuchsolver", "--out", str(out),
                          "--plot", str(png)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "summary" in res.stdout and "wrote" in res.stdout and "baseline spsolve" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["info"]["cpus"] >= 1 and "git" in data["info"]
    assert data["config"]["iters"] == 2 and data["errors"] == []

    # the unknown name is skipped with the reason, not a crash
    skipped = {s["solver"]: s["reason"] for s in data["skipped"]}
    assert "nosuchsolver" in skipped and "unknown solver" in skipped["nosuchsolver"]
    solvers = ["superlu"] + (["cholmod"] if HAVE_CHOLMOD else [])
    if not HAVE_CHOLMOD:
        assert "cholmod" in skipped

    # per design iteration: baselines and adjopt, warm-up excluded, the same OC iterates
    (row,) = data["mbb"]
    assert row["size"] == "30x10" and row["dofs"] == 2 * 31 * 11 and row["elements"] == 300
    assert row["free_dofs"] == row["dofs"] - 12  # 11 x-dofs of the left edge and the roller
    base = row["baselines"]
    assert base["spsolve"]["status"] == "ok"
    assert base["cholmod"]["status"] == ("ok" if HAVE_CHOLMOD else "skipped")
    for b in base.values():
        if b["status"] != "ok":
            assert b["reason"]
            continue
        assert b["s_per_iter"] > 0 and b["iterations_timed"] == 2 and len(b["iter_times"]) == 3
        assert set(b["phases"]) == {"assembly", "solve", "sensitivity", "filter", "update"}
        assert all(v > 0 for v in b["phases"].values())
        assert sum(b["phases"].values()) <= 1.05 * b["s_per_iter"] + 1e-4
        assert len(b["compliance"]) == 3 and all(c > 0 for c in b["compliance"])
    assert sorted(row["adjopt"]) == sorted(solvers)
    for name in solvers:
        r = row["adjopt"][name]
        assert r["status"] == "ok", r
        assert r["s_per_iter"] > 0 and r["warmup_s"] > 0 and r["iterations_timed"] == 2 and r["nit"] == 3
        assert r["factorizations"] >= 3 and r["solves"] >= 3
        assert r["stats_phases"]["factorize"] > 0 and r["stats_phases"]["solve"] > 0
        assert r["compared_with"] == ("cholmod" if HAVE_CHOLMOD else "spsolve")
        assert len(r["compliance_rel_diff"]) == 3  # iterations 0, 1, 2
        assert r["compliance_rel_diff_max"] < 1e-6
        assert r["design_max_abs_diff"] < 1e-6
        if HAVE_CHOLMOD:
            assert r["ratio_vs_cholmod"] == r["s_per_iter"] / base["cholmod"]["s_per_iter"]
        assert r["peak_GiB"] > 0
    # the baselines agree with each other too
    if HAVE_CHOLMOD:
        for a, b in zip(base["spsolve"]["compliance"], base["cholmod"]["compliance"]):
            assert abs(a - b) <= 1e-9 * abs(b)

    # full runs to the 88-line stopping test
    (full,) = data["full"]
    assert full["baseline"]["nit"] > 10 and full["baseline"]["c_final"] > 0
    for name in solvers:
        r = full["adjopt"][name]
        assert r["status"] == "ok" and r["success"]
        assert r["rel_diff"] < 0.005
        assert r["nit"] == full["baseline"]["nit"]

    # 3D value + gradient
    (row3,) = data["cantilever3d"]
    assert row3["dofs"] == 3 * 5 * 3 * 3
    for name in solvers:
        r = row3["adjopt"][name]
        assert r["status"] == "ok" and r["value_and_gradient_s"] > 0 and r["peak_GiB"] > 0
        assert r["free_dofs"] == row3["dofs"] - 3 * 9 and math.isfinite(r["J"]) and r["J"] > 0
        assert r["repeat_median_s"] > 0 and r["factorizations"] == 1
    js = [row3["adjopt"][n]["J"] for n in solvers]
    assert max(js) - min(js) <= 1e-9 * max(js)

    summ = data["summary"]
    for key in ("per_iteration_vs_cholmod_baseline", "mbb_1200x400", "full_run_compliance", "cantilever3d"):
        assert "target" in summ[key] and "met" in summ[key]
    assert summ["mbb_1200x400"]["met"] is None  # not run
    for key in ("cholmod_path_vs_plain_loop", "full_run_time"):
        assert "target" in summ[key] and "met" in summ[key]
    assert summ["full_run_time"]["met"] is None  # 150x50 not run in full
    (per,) = summ["per_iteration_vs_cholmod_baseline"]["sizes"]
    assert per["size"] == "30x10" and per["limit"] == 0.5  # below 61k dofs: half the baseline
    info = data["info"]
    assert info["cholmod_blas_kind"] in ("openblas", "mkl", "blis", "atlas", "reference", "unknown")
    assert isinstance(info["threadpools"], list)
    if HAVE_CHOLMOD:
        assert info["cholmod_blas"] and "CHOLMOD's BLAS" in res.stdout
        (path,) = summ["cholmod_path_vs_plain_loop"]["sizes"]
        assert path["ratio"] == row["adjopt"]["cholmod"]["ratio_vs_cholmod"]
        assert summ["cholmod_baseline_blas"]["fast"] == (info["cholmod_blas_kind"] != "reference")
    assert summ["full_run_compliance"]["sizes"][0]["size"] == "60x20"

    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_bench_topology_bad_arguments(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--mbb", "30x", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "size" in res.stderr
    res = subprocess.run([sys.executable, SCRIPT, "--mbb", "30x10", "--out", str(tmp_path / "no" / "x.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not list(tmp_path.iterdir())


def test_phase_and_time_helpers(monkeypatch):
    # the library will add "phases" and "time" to the history entries: medians over the timed entries
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    spec = importlib.util.spec_from_file_location("bench_topology_mod", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.phase_medians([None, None]) is None
    ph = mod.phase_medians([dict(assembly=1.0, solve=2.0), dict(assembly=3.0), dict(assembly=2.0, solve=4.0)])
    assert ph == dict(assembly=2.0, solve=3.0)
    hist = [dict(nit=k) for k in range(5)]
    assert mod.history_time(hist, slice(2, None)) is None
    per = [dict(nit=k, time=t) for k, t in enumerate([5.0, 9.0, 1.0, 3.0, 2.0])]
    assert mod.history_time(per, slice(2, None)) == dict(median=2.0, read_as="per iteration")
    elapsed = [dict(nit=k, time=t) for k, t in enumerate([5.0, 9.0, 10.0, 13.0, 14.0])]
    assert mod.history_time(elapsed, slice(2, None)) == dict(median=1.0, read_as="elapsed (differences)")
    base = mod.MBB88(6, 2)
    assert base.ndof == 2 * 7 * 3 and base.free.size == base.ndof - 4 and base.F.sum() == -1.0
    assert abs((base.H @ (1.0 / base.Hs)).mean() - 1.0) < 1e-12  # dv of the 88-line code has mean 1
    # the baseline is the 88-line code: top88(60, 20, 0.5, 3, 1.5, ft=2) as in tests/optimize/test_design.py
    out = mod.MBB88(60, 20).run("spsolve", maxiter=500, tolx=0.01)
    assert out["nit"] == 127 and abs(out["history"][-1] - 218.80322107310297) < 1e-8 * 218.8


def test_a_reference_blas_baseline_is_not_called_a_cholmod_baseline(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    spec = importlib.util.spec_from_file_location("bench_topology_mod2", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.blas_kind("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0") == "reference"
    assert mod.blas_kind("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3") == "openblas"
    assert mod.blas_kind("/opt/intel/mkl/lib/libmkl_rt.so") == "mkl"
    assert mod.blas_kind(None) == "unknown"

    def row(base_s, adjopt_s):
        return dict(size="300x100", dofs=60802, nelx=300, nely=100, baselines={"cholmod": dict(s_per_iter=base_s)},
                    adjopt={"cholmod": dict(status="ok", s_per_iter=adjopt_s, ratio_vs_cholmod=adjopt_s / base_s),
                            "gmg": dict(status="ok", s_per_iter=adjopt_s / 4, ratio_vs_cholmod=adjopt_s / 4 / base_s)})

    full = [dict(nelx=150, nely=50, baseline=dict(baseline="cholmod", time_s=20.0),
                 adjopt={"gmg": dict(status="ok", time_s=9.0, rel_diff=0.0)})]
    data = dict(mbb=[row(1.0, 1.05)], full=full, cantilever3d=[], info=dict(cholmod_blas_kind="openblas"))
    summ = mod.summarize(data)
    assert summ["per_iteration_vs_cholmod_baseline"]["met"] is True  # gmg 0.2625 <= 1/3
    assert summ["cholmod_path_vs_plain_loop"]["met"] is True  # 1.05 <= 1.10
    assert summ["full_run_time"]["met"] is True and summ["full_run_time"]["ratio"] == 0.45
    data["mbb"] = [row(1.0, 1.2)]
    summ = mod.summarize(data)
    assert summ["cholmod_path_vs_plain_loop"]["met"] is False
    assert summ["per_iteration_vs_cholmod_baseline"]["met"] is True  # 0.3 <= 1/3
    # the same numbers against a reference-BLAS CHOLMOD: nothing is met or missed, and the reason is given
    data["info"] = dict(cholmod_blas_kind="reference")
    summ = mod.summarize(data)
    assert summ["cholmod_baseline_blas"]["fast"] is False
    for key in ("per_iteration_vs_cholmod_baseline", "cholmod_path_vs_plain_loop", "full_run_time"):
        assert summ[key]["met"] is None, key
    assert "reference BLAS" in summ["per_iteration_vs_cholmod_baseline"]["note"]
