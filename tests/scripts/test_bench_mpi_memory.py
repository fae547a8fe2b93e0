"""The per-rank memory benchmark runs as a driver over mpiexec -n 1 and 2 at tiny sizes, records real peaks above the
import baseline and the same J on both rank counts, and refuses bad input with exit status 2."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("petsc4py")
pytest.importorskip("mpi4py")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
SCRIPT = os.path.join(SCRIPTS, "bench_mpi_memory.py")
needs_mpiexec = pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec on PATH")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # for _bench_common
    spec = importlib.util.spec_from_file_location("bench_mpi_memory_mod", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_mpiexec
@pytest.mark.parametrize("problem, size, dofs", [("poisson_inversion", "n=32", 31**2),
                                                 ("topology_compliance", "48x16", 2 * 49 * 17 - 18)])
def test_driver_one_and_two_ranks(tmp_path, problem, size, dofs):
    out = tmp_path / "mem.json"
    res = subprocess.run([sys.executable, SCRIPT, "--problem", problem, "--quick", "--ranks", "1", "2", "--json",
                          str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[R=1]" in res.stdout and "[R=2]" in res.stdout and "Where the memory goes" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["failed"] == [] and data["ranks"] == [1, 2]
    assert data["config"]["problem"] == problem and data["config"]["build"] == "local"
    assert data["info"]["cpus"] >= 1 and "git" in data["info"]
    assert "threadpools" in data["info"]["blas"]  # which BLAS ran
    runs = {r["ranks"]: r for r in data["runs"]}
    assert sorted(runs) == [1, 2]
    for R, run in runs.items():
        assert run["size"] == size and run["dofs"] == dofs and run["params"] > 0
        assert sum(run["dofs_per_rank"]) == dofs and len(run["dofs_per_rank"]) == R
        assert run["info"]["thread_env"]["NUMBA_NUM_THREADS"] == "1"
        assert len(run["peak_rss_GiB"]) == R and len(run["baseline_rss_GiB"]) == R
        for peak, base in zip(run["peak_rss_GiB"], run["baseline_rss_GiB"]):
            assert peak > base > 0.0
        assert run["peak_rss_GiB_max"] == max(run["peak_rss_GiB"])
        for key in ("build_s", "value_s", "gradient_s", "hessp_s"):
            assert run[key] > 0 and math.isfinite(run[key]), key
        assert run["iterations"]["forward"] > 0 and run["iterations"]["tangent"] > 0
        assert run["solves"]["forward"] == 1 and run["solves"]["tangent"] == 1
        assert ("adjoint" in run["solves"]) is (problem == "poisson_inversion")  # compliance is self-adjoint
        assert math.isfinite(run["J"]) and run["gradient_norm"] > 0 and run["hessp_norm"] > 0
        assert set(run["phases"]) >= {"warmup", "build", "value", "gradient", "hessp"}
    assert runs[1]["J"] == pytest.approx(runs[2]["J"], rel=1e-6)
    assert runs[1]["gradient_norm"] == pytest.approx(runs[2]["gradient_norm"], rel=1e-5)
    ratios = {r["ranks"]: r for r in data["ratios"]}
    assert ratios[1]["ratio"] == 1.0 and ratios[1]["meets_target"] is True
    assert ratios[2]["ratio"] == pytest.approx(runs[2]["peak_rss_GiB_max"] / runs[1]["peak_rss_GiB_max"], rel=1e-12)
    assert ratios[2]["target"] == 0.6 and isinstance(ratios[2]["meets_target"], bool)
    assert not list(tmp_path.glob("*.tmp"))


@needs_mpiexec
def test_weak_replicated_sizes_grow_with_the_ranks(tmp_path):
    """--case weak scales nely with R (slabs along y); --build replicated goes through distribute()."""
    out = tmp_path / "weak.json"
    res = subprocess.run([sys.executable, SCRIPT, "--problem", "topology_compliance", "--quick", "--case", "weak",
                          "--build", "replicated", "--ranks", "1", "2", "--json", str(out)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    r1, r2 = sorted(data["runs"], key=lambda r: r["ranks"])
    assert (r1["size"], r2["size"]) == ("48x16", "48x32") and r2["dofs"] > 1.9 * r1["dofs"]
    for run in (r1, r2):
        assert run["build"] == "replicated" and run["build_serial_s"] > 0 and run["distribute_s"] > 0
        assert "build_serial" in run["phases"] and "distribute" in run["phases"]
    assert all(r["target"] == 1.10 for r in data["ratios"])


@pytest.mark.parametrize("args, message", [
    (["--problem", "helmholtz"], "invalid choice"),
    (["--problem", "topology_compliance", "--size", "64"], "NELXxNELY"),
    (["--problem", "topology_compliance", "--size", "64x1"], "each >= 2"),
    (["--size", "ten"], "n >= 2"),
    (["--build", "global"], "invalid choice"),
    (["--rtol", "0"], "--rtol must be in (0, 1)"),
    (["--ranks", "0", "2"], "--ranks must be >= 1"),
    (["--json", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_bad_input_exits_2(bench, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--problem", "topology_compliance", "--size", "12by4"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "NELXxNELY" in res.stderr


def test_ranks_without_mpiexec_is_a_clear_error(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--ranks", "1", "2", "--quick", "--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'mpiexec' was not found on PATH" in err and "--mpiexec" in err
    assert not list(tmp_path.iterdir())


def test_weak_sizes(bench, tmp_path):
    out = str(tmp_path / "x.json")
    args = bench.parse_args(["--quick", "--case", "weak", "--size", "500", "--json", out])
    assert [bench.scaled_size(args, R) for R in (1, 2, 4)] == [500, 707, 1000]
    args = bench.parse_args(["--case", "weak", "--dim", "3", "--size", "63", "--json", out])
    assert [bench.scaled_size(args, R) for R in (1, 2, 4)] == [63, 79, 100]
    args = bench.parse_args(["--problem", "topology_compliance", "--case", "weak", "--size", "1200x200",
                             "--json", out])
    assert [bench.scaled_size(args, R) for R in (1, 2, 4)] == [(1200, 200), (1200, 400), (1200, 800)]
    args = bench.parse_args(["--problem", "topology_compliance", "--case", "weak", "--size", "24x8x4",
                             "--json", out])
    assert args.dim == 3 and bench.scaled_size(args, 4) == (24, 8, 16)
    strong = bench.parse_args(["--size", "500", "--json", out])
    assert bench.scaled_size(strong, 4) == 500
