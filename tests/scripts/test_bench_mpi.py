"""The MPI scaling benchmark runs at tiny sizes (in-process on one rank, and as a driver over mpiexec -n 1 and 2),
records real times, iteration counts and the agreement with the serial functional, and refuses bad input clearly."""

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
SCRIPT = os.path.join(SCRIPTS, "bench_mpi.py")
SLURM = os.path.join(SCRIPTS, "slurm_bench_mpi.sh")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # for _bench_common
    spec = importlib.util.spec_from_file_location("bench_mpi_mod", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_case(rec, ranks, dofs=None):
    assert rec["ranks"] == ranks and rec["dofs"] > 0 and rec["params"] > 0
    if dofs is not None:
        assert rec["dofs"] == dofs
    assert sum(rec["dofs_per_rank"]) == rec["dofs"] and len(rec["dofs_per_rank"]) == ranks
    for key in ("value_s", "gradient_s", "hessp_s", "setup_s", "forward_solve_s", "value_gradient_s", "numpy_value_s",
                "numpy_gradient_s", "numpy_hessp_s", "build_s", "distribute_s"):
        assert rec[key] > 0 and math.isfinite(rec[key]), key
    assert rec["value_gradient_s"] > rec["value_s"]  # the median of value + gradient over the same rounds
    assert rec["iterations"]["forward"] > 0 and rec["iterations"]["tangent"] > 0
    assert rec["solves"]["forward"] == 1 and rec["solves"]["tangent"] == 1
    for r in rec["repetitions"] + [rec["warmup"]]:
        assert r["setups"] == 1 and r["iterations"]["forward"] > 0 and r["phases"]["factorize"] > 0
    assert rec["peak_rss_GiB_max"] > 0 and len(rec["peak_rss_GiB_per_rank"]) == ranks
    check = rec["check"]
    for key in ("J_rel_diff", "gradient_rel_diff", "hessp_rel_diff"):
        assert math.isfinite(check[key]) and check[key] < 1e-8, key
        assert math.isfinite(check["at_bench_rtol"][key])
    assert check["agrees"] is True and check["at_bench_rtol"]["rtol"] == 1e-8


@pytest.mark.parametrize("problem, dofs, adjoint", [("poisson_inversion", 23**2, True),
                                                    ("topology_compliance", 2 * 25 * 9 - 10, False)])
def test_bench_mpi_quick_in_process(bench, tmp_path, capsys, problem, dofs, adjoint):
    out = tmp_path / "mpi.json"
    assert bench.main(["--quick", "--problem", problem, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Strong scaling" in text and "Weak scaling" in text and "all agree" in text and "wrote" in text
    data = json.loads(out.read_text())
    assert data["complete"] and data["ranks"] == [1] and data["info"]["cpus"] >= 1 and "git" in data["info"]
    assert data["config"]["problem"] == problem and data["config"]["rtol"] == 1e-8
    (run,) = data["runs"]
    assert run["ranks"] == 1 and run["nodes"] == 1 and run["petsc"] and run["mpi"]
    assert sorted(run["cases"]) == ["strong", "weak"] and run["tao"] is None
    for case in ("strong", "weak"):
        rec = run["cases"][case]
        _check_case(rec, 1, dofs)
        assert len(rec["repetitions"]) == 2
        # the compliance problem is self-adjoint: no adjoint solves
        assert ("adjoint" in rec["iterations"]) is adjoint
    eff = {(e["case"], e["ranks"]): e for e in data["efficiency"]}
    assert eff[("strong", 1)]["efficiency_value"] == 1.0 and eff[("weak", 1)]["efficiency_hessp"] == 1.0
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_mpi_tao_in_process(bench, tmp_path, capsys):
    out = tmp_path / "tao.json"
    assert bench.main(["--quick", "--strong", "--tao", "--tao-maxiter", "3", "--json", str(out)]) == 0
    assert "Optimizers on the distributed problem" in capsys.readouterr().out
    (run,) = json.loads(out.read_text())["runs"]
    assert list(run["cases"]) == ["strong"]
    tao = run["tao"]
    for name in ("tao", "newton_cg"):
        m = tao[name]
        assert 1 <= m["nit"] <= 3 and m["seconds"] > 0 and m["total_solves"] > 0 and m["solves"]["tangent"] > 0
        assert math.isfinite(m["fun"]) and m["fun"] > 0
    assert tao["g0_l2_norm"] > 0 and math.isfinite(tao["fun_rel_diff"])


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec on PATH")
def test_bench_mpi_driver_one_and_two_ranks(tmp_path):
    out = tmp_path / "driver.json"
    res = subprocess.run([sys.executable, SCRIPT, "--ranks", "1", "2", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[R=1]" in res.stdout and "[R=2]" in res.stdout and "eff value" in res.stdout
    data = json.loads(out.read_text())
    assert data["complete"] and data["ranks"] == [1, 2] and data["failed"] == []
    assert [x["returncode"] for x in data["launches"]] == [0, 0]
    for run, R in zip(data["runs"], (1, 2)):
        assert run["ranks"] == R and run["info"]["thread_env"]["NUMBA_NUM_THREADS"] == "1"
        _check_case(run["cases"]["strong"], R, 23**2)
        _check_case(run["cases"]["weak"], R)
    weak = [run["cases"]["weak"] for run in data["runs"]]
    assert weak[0]["n"] == 24 and weak[1]["n"] == 34  # 24 sqrt(2) cells per side: about twice the dofs
    eff = {(e["case"], e["ranks"]): e for e in data["efficiency"]}
    for case in ("strong", "weak"):
        for m in ("value", "gradient", "hessp", "setup"):
            assert eff[(case, 1)][f"efficiency_{m}"] == 1.0
            assert eff[(case, 2)][f"efficiency_{m}"] > 0
    s1, s2 = (data["runs"][i]["cases"]["strong"]["value_s"] for i in (0, 1))
    assert eff[("strong", 2)]["efficiency_value"] == pytest.approx(s1 / (2 * s2), rel=1e-12)
    assert eff[("strong", 2)]["speedup_value"] == pytest.approx(s1 / s2, rel=1e-12)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("ranks*.json"))


def test_combine_merges_runs(bench, tmp_path, capsys):
    """--combine computes the efficiencies across separately written files (as the SLURM example does)."""

    def part(R, t):
        rec = dict(case="strong", ranks=R, size="n=8", dofs=49, solver="petsc:cg+gamg", value_s=t, gradient_s=t / 2,
                   value_gradient_s=1.5 * t, hessp_s=t, setup_s=t / 10, numpy_value_s=t, numpy_gradient_s=t,
                   iterations_per_solve={"forward": 5}, peak_rss_GiB_max=0.2, check=dict(skipped="off"))
        data = dict(info={}, config=dict(problem="poisson_inversion", rtol=1e-8, repeat=1, agree_tol=1e-8),
                    runs=[dict(ranks=R, cases=dict(strong=rec))])
        path = tmp_path / f"R{R}.json"
        path.write_text(json.dumps(data))
        return str(path)

    files = [part(4, 1.0), part(2, 1.6)]
    out = tmp_path / "all.json"
    assert bench.main(["--combine", *files, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ranks"] == [2, 4]
    e2, e4 = data["efficiency"]
    assert e2["efficiency_value"] == 1.0 and e4["base_ranks"] == 2
    assert e4["speedup_value"] == pytest.approx(1.6) and e4["efficiency_value"] == pytest.approx(0.8)
    assert "Strong scaling" in capsys.readouterr().out


def test_slurm_script_is_valid_bash():
    res = subprocess.run(["bash", "-n", SLURM], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    text = open(SLURM).read()
    assert "#SBATCH --nodes" in text and "OMP_NUM_THREADS=1" in text and "NUMBA_NUM_THREADS=1" in text
    assert "srun" in text and "scripts/bench_mpi.py --weak" in text and "--strong" in text


@pytest.mark.parametrize("args, message", [
    (["--problem", "helmholtz"], "invalid choice"),
    (["--problem", "topology_compliance", "--size", "64"], "NELXxNELY"),
    (["--size", "1"], "n >= 2"),
    (["--repeat", "0"], "must be >= 1"),
    (["--rtol", "0"], "--rtol must be in (0, 1)"),
    (["--problem", "topology_compliance", "--dim", "3"], "--dim 3 is for poisson_inversion"),
    (["--ranks", "0", "2"], "--ranks must be >= 1"),
    (["--combine", "/nonexistent/a.json"], "no such file"),
    (["--json", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_bad_input_exits_2(bench, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_ranks_without_mpiexec_is_a_clear_error(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--ranks", "1", "2", "--quick", "--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'mpiexec' was not found on PATH" in err and "--mpiexec" in err
    assert not list(tmp_path.iterdir())


def test_ranks_inside_a_launch_is_refused(bench, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--ranks", "1", "2", "--quick"])
    assert exc.value.code == 2 and "without mpiexec" in capsys.readouterr().err
