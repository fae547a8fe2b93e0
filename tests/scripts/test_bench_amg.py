"""The AMG benchmarks run end to end at tiny sizes and write their JSON atomically."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pyamg")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                          capture_output=True, text=True, check=True, timeout=120)


def test_bench_amg_poisson3d_writes_json(tmp_path):
    out = tmp_path / "p.json"
    res = _run("bench_amg_poisson3d.py", "--n", "6", "--tol", "1e-8", "--out", str(out))
    assert "phase" in res.stdout and "AMG setup" in res.stdout and "wrote" in res.stdout
    data = json.loads(out.read_text())
    r = data["result"]
    assert r["free_dofs"] == 5**3 and r["cells"] == 6 * 6**3
    assert r["iterations"]["forward"] > 0 and r["iterations"]["adjoint"] > 0
    assert r["hierarchies"] == 1 and r["transpose_factorizations"] == 0  # A symmetric: A^T reuses A's hierarchy
    assert 0 < r["residual_forward"] <= 1e-8 and 0 < r["residual_adjoint"] <= 1e-8
    assert r["peak_GiB"] > 0
    names = [p["phase"] for p in r["phases"]]
    for name in ("mesh generation", "local element matrices", "ElementCoefficientMatrix (pattern)",
                 "assembly of A(p) (values)", "AMG setup", "forward solve", "adjoint solve", "gradient contraction"):
        assert name in names
    assert all(p["seconds"] >= 0 for p in r["phases"])
    assert data["info"]["threads"] >= 1
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_bench_amg_poisson3d_superlu_agrees(tmp_path):
    """The direct solver gives the same J and gradient norm (the AMG run solved to 1e-8)."""
    amg, lu = tmp_path / "amg.json", tmp_path / "lu.json"
    _run("bench_amg_poisson3d.py", "--n", "5", "--no-warmup", "--out", str(amg))
    _run("bench_amg_poisson3d.py", "--n", "5", "--no-warmup", "--solver", "superlu", "--out", str(lu))
    a, b = json.loads(amg.read_text())["result"], json.loads(lu.read_text())["result"]
    assert b["iterations"] == {} and b["residual_forward"] < 1e-12
    assert a["value"] == pytest.approx(b["value"], rel=1e-6)
    assert a["gradient_norm"] == pytest.approx(b["gradient_norm"], rel=1e-6)


def test_bench_amg_nonsymmetric_writes_json(tmp_path):
    out = tmp_path / "ns.json"
    res = _run("bench_amg_nonsymmetric.py", "--n", "16", "--kappa", "0.01", "0.0001", "--out", str(out))
    assert "air" in res.stdout and "wrote" in res.stdout
    data = json.loads(out.read_text())
    rows = data["results"]
    assert len(rows) == 2 * 3 * 2  # kappas x methods x (A, A^T)
    assert {r["method"] for r in rows} == {"sa", "rootnode", "air"}
    assert {r["operator"] for r in rows} == {"A", "A^T"}
    assert all(r["unknowns"] == 15**2 and r["levels"] >= 1 and r["setup_s"] > 0 for r in rows)
    assert all(r["iterations"] > 0 and r["residual"] > 0 for r in rows)
    assert all(r["converged"] == (r["residual"] <= data["config"]["tol"]) for r in rows)
    air = [r for r in rows if r["method"] == "air"]
    assert all(r["converged"] for r in air)  # AIR, the AMGSolver default for nonsymmetric A, on this easy case
    assert data["summary"]["air"]["converged_all"]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
