"""The kernel benchmark runs end to end at tiny sizes and records real, verified values."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import scipy.sparse as sp

from adjopt import fem, mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_kernels.py")
FAMILIES = ("p1-2d", "p1-3d", "q1-elasticity")
# the mesh parameter whose element count is closest to 2000 / 5000, worked out by hand:
# 2 n^2: 32 -> 2048 (not 31 -> 1922), 50 -> 5000; 6 n^3: 7 -> 2058, 9 -> 4374 (not 10 -> 6000);
# n^2: 45 -> 2025 (not 44 -> 1936), 71 -> 5041 (not 70 -> 4900)
EXPECTED = {("p1-2d", 2000): (32, 2048), ("p1-2d", 5000): (50, 5000), ("p1-3d", 2000): (7, 2058),
            ("p1-3d", 5000): (9, 4374), ("q1-elasticity", 2000): (45, 2025), ("q1-elasticity", 5000): (71, 5041)}


def _independent_nnz(family: str, n: int) -> tuple[int, int]:
    """Dofs and nnz of the assembled matrix, from the mesh and scipy alone (not adjopt's slot map)."""
    if family == "p1-2d":
        m = mesh.unit_square(n)
        conn, ndof = m.cells, m.n_nodes
    elif family == "p1-3d":
        m = mesh.unit_cube(n)
        conn, ndof = m.cells, m.n_nodes
    else:
        m = mesh.rectangle(n, n, float(n), float(n), cell="quad")
        conn, ndof = fem.vector_dofs(m.cells, 2), 2 * m.n_nodes
    k = conn.shape[1]
    rows = np.repeat(conn, k, axis=1).ravel()
    cols = np.tile(conn, (1, k)).ravel()
    A = sp.coo_array((np.ones(rows.size), (rows, cols)), shape=(ndof, ndof)).tocsr()
    A.sum_duplicates()
    return ndof, A.nnz


def test_bench_kernels_tiny_run(tmp_path):
    out, png = tmp_path / "k.json", tmp_path / "k.png"
    res = subprocess.run([sys.executable, SCRIPT, "--elements", "2000", "5000", "--repeat", "1",
                          "--families", *FAMILIES, "--out", str(out), "--plot", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "elements" in res.stdout and "wrote" in res.stdout and "NOT ASSESSED" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["skipped"] == []
    info = data["info"]
    assert info["copy_GBps"] > 0 and info["threads"] >= 1 and "git" in info and info["first_call_s"]["values"] > 0
    rows = data["results"]
    assert sorted((r["family"], r["target"]) for r in rows) == sorted(EXPECTED)
    for r in rows:
        n, elements = EXPECTED[(r["family"], r["target"])]
        assert r["size_parameter"] == n and r["elements"] == elements
        ndof, nnz = _independent_nnz(r["family"], n)
        assert r["n_dofs"] == ndof and r["nnz"] == nnz
        assert r["shared_local"] == (r["family"] == "q1-elasticity")
        assert r["slot_entries"] == elements * r["k"] ** 2
        assert r["pattern_s"] > 0 and r["local_s"] > 0 and r["mesh_s"] > 0
        for k in ("values", "contract", "tangent", "tangent_values"):
            t = r["times_s"][k]
            assert t > 0 and r["first_call_s"][k] > 0
            b = r["bytes"][k]
            assert b["total"] == sum(v for key, v in b.items() if key != "total") > 0
            assert math.isclose(r["GBps"][k], b["total"] / t / 1e9, rel_tol=1e-9)
            assert math.isclose(r["copy_fraction"][k], r["GBps"][k] / r["GBps_copy_ceiling"], rel_tol=1e-9)
            d = r["bytes_data"][k]  # the operation's own inputs and outputs: a floor below the implementation's
            assert d["total"] == sum(v for key, v in d.items() if key != "total") > 0
            assert math.isclose(r["copy_fraction_data"][k], d["total"] / t / 1e9 / r["GBps_copy_ceiling"], rel_tol=1e-9)
            assert math.isclose(r["per_element_ns"][k], 1e9 * t / elements, rel_tol=1e-9)
        assert r["bytes_data"]["values"]["total"] <= r["bytes"]["values"]["total"]
        assert r["values_path"] == ("templates" if r["family"] == "q1-elasticity" else "rows")
        # the numpy baseline was checked against adjopt in the run
        npy = r["numpy"]
        assert npy["verified"] and npy["same_pattern"]
        assert all(0 <= v < 1e-10 for v in npy["max_rel_diff"].values())
        assert npy["values_s"] > 0 and npy["contract_s"] > 0
        assert math.isclose(npy["speedup"]["values"], npy["values_s"] / r["times_s"]["values"], rel_tol=1e-9)
        thr = r["threads"]
        assert all(v > 0 for k, v in thr["1"].items() if k != "cpu_per_wall")
        if info["threads"] >= 2 and thr["2"] is not None:
            assert all(v > 0 for v in thr["speedup_2_over_1"].values())
        assert r["memory"]["peak_GiB"] > 0 and len(r["memory"]["phases"]) >= 5
        if r["skfem"] is not None:  # only when scikit-fem happens to be installed
            assert "assemble_s" in r["skfem"] or "error" in r["skfem"]
    summ = data["summary"]
    assert summ["bandwidth"]["met"] is None and summ["bandwidth_data"]["met"] is None  # nothing at >= 1M here
    assert summ["verified"]["met"] is True and summ["verified"]["max_rel_diff"] < 1e-10
    for key in ("numpy_speedup", "flatness"):
        assert summ[key]["met"] in (True, False) and summ[key]["values"]
    assert len(summ["flatness"]["values"]) == 3 * 3  # families x (values, contract, tangent)
    assert png.stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_bench_kernels_rejects_bad_input(tmp_path):
    for argv, msg in ((["--elements", "0"], "--elements must be"), (["--elements", "5e6"], "above --max-elements"),
                      (["--repeat", "0"], "--repeat must be"), (["--families", "p2-2d"], "invalid choice"),
                      (["--out", str(tmp_path / "nope" / "x.json")], "does not exist")):
        # a later --out overrides the first one
        res = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png"),
                              *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and msg in res.stderr, (argv, res.stderr)
    assert not list(tmp_path.iterdir())
