"""The adjopt command end to end, in subprocesses: files, contents, exit codes, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def adjopt(*args, cwd=None, check=None, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "adjopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_list_shows_the_gallery_with_options():
    out = adjopt("list", check=0).stdout
    for name in ("poisson_inversion", "optimal_control", "topology_compliance", "advection_diffusion_source"):
        assert name in out
    assert "--alpha none" in out and "--nelx none" in out  # alpha: 10 for h1 and tv, 1 for the Bayesian prior
    # the options only the rank-by-rank build takes, on the line after the problem's own
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("poisson_inversion:")))
    assert lines[at + 2] == "    with --backend petsc also: --partition slab"
    assert not any("with --backend petsc" in line for line in lines[lines.index(
        next(line for line in lines if line.startswith("seed_toy:"))):][:3])


def test_a_missing_mesh_file_says_to_check_the_path(tmp_path):
    proc = adjopt("run", "poisson_inversion", "--mesh-file", tmp_path / "nope.vtu", "--out", tmp_path / "x", check=2)
    assert "could not read a file (FileNotFoundError" in proc.stderr and "check the path" in proc.stderr
    assert "fix the problem file" not in proc.stderr and not (tmp_path / "x").exists()


def test_an_option_without_its_value_is_named(tmp_path):
    proc = adjopt("run", "poisson_inversion", "--n", "--n-obs", 5, "--out", tmp_path / "x", check=2)
    assert "option --n has no value (the next word, --n-obs, is another option)" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_rank_by_rank_option_without_the_petsc_backend_says_what_to_add(tmp_path):
    proc = adjopt("run", "poisson_inversion", "--n", 6, "--partition", "graph", "--out", tmp_path / "x", check=2)
    assert "--partition is an option of the rank-by-rank build: add --backend petsc" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_run_writes_a_complete_results_folder(tmp_path):
    meshio = pytest.importorskip("meshio")
    out = tmp_path / "pi"
    proc = adjopt("run", "poisson_inversion", "--n", 8, "--out", out, "--log-json", tmp_path / "log.jsonl", check=0)
    assert "newton-cg: converged" in proc.stdout and f"results in {out}" in proc.stdout
    hist = json.loads((out / "history.json").read_text())
    f = [h["f"] for h in hist["history"]]
    assert len(f) >= 3 and all(b <= a for a, b in zip(f, f[1:])) and f[-1] < 0.1 * f[0]
    assert hist["options"]["n"] == 8
    rows = (out / "history.csv").read_text().strip().splitlines()
    assert len(rows) == len(f) + 1
    res = np.load(out / "result.npz")
    assert res["x"].shape == (81,)
    vtu = meshio.read(out / "fields.vtu")
    np.testing.assert_allclose(vtu.point_data["parameter"], res["x"])
    assert "state" in vtu.point_data and "adjoint" in vtu.point_data
    for name in ("convergence.png", "parameter.png", "state.png"):
        w, h = png_size(out / name)
        assert w > 200 and h > 200
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["nit"] for line in lines] == list(range(0, len(f)))  # the start (iteration 0) too
    assert not list(out.glob("*.tmp"))


def test_run_topology_with_oc_quietly(tmp_path):
    out = tmp_path / "topo"
    proc = adjopt("run", "topology_compliance", "--nelx", 24, "--nely", 8, "--out", out, "-q", check=0)
    assert proc.stdout.strip().startswith("oc: converged")
    hist = json.loads((out / "history.json").read_text())
    assert hist["history"][-1]["volume"] <= 0.5 + 1e-3
    assert png_size(out / "parameter.png")[0] > 200


def test_run_topology_with_the_geometric_multigrid_solver(tmp_path):
    # 5 iterations, not converged: exit status 1; the same compliances as the direct solver (GMG solves to 1e-8)
    hists = {}
    for solver in ("gmg", "superlu"):
        out = tmp_path / solver
        adjopt("run", "topology_compliance", "--nelx", 32, "--nely", 16, "--solver", solver, "--max-iter", 5,
               "--out", out, "-q", "--no-pictures", check=1)
        hists[solver] = [h["f"] for h in json.loads((out / "history.json").read_text())["history"]]
    fa, fb = hists["gmg"], hists["superlu"]
    assert len(fa) == len(fb) == 6 and max(abs(a - b) / b for a, b in zip(fa, fb)) < 1e-7
    proc = adjopt("run", "poisson_inversion", "--n", 8, "--solver", "gmg", "--out", tmp_path / "x", check=2)
    assert "--solver gmg needs the grid" in proc.stderr
    # an unknown name lists gmg too; an empty one is an error, not the default
    proc = adjopt("run", "poisson_inversion", "--n", 8, "--solver", "bogus", "--out", tmp_path / "y", check=2)
    assert "unknown solver 'bogus'" in proc.stderr and "gmg for topology_compliance" in proc.stderr
    proc = adjopt("run", "poisson_inversion", "--n", 8, "--solver", " ", "--out", tmp_path / "z", check=2)
    assert "needs a solver name" in proc.stderr and not (tmp_path / "z").exists()


def test_existing_folder_needs_force(tmp_path):
    out = tmp_path / "r"
    run = ("run", "optimal_control", "--n", 6, "--gtol", 1e-8, "--out", out, "-q")  # gtol 1e-10 is below round-off at n 6
    adjopt(*run, check=0)
    proc = adjopt(*run, check=2)
    assert "exists and is not empty; pass --force" in proc.stderr
    adjopt(*run, "--force", check=0)


def _wrong_gradient_problem(tmp_path):
    """A problem file whose gradient is 1.01 times the true one (a check must fail on it)."""
    bad = tmp_path / "bad_gradient.py"
    bad.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "problems")!r})
        import adjopt, poisson_inversion

        class Wrong(adjopt.ReducedFunctional):
            def gradient(self, p, tol=None):
                return 1.01 * super().gradient(p, tol)

        def build(n: int = 6):
            pb = poisson_inversion.build(n=n)
            J = pb.functional
            pb.functional = Wrong(J.matrix, J.rhs, J.objective, parameter_map=J.map)
            return pb
    """))
    return bad


def test_check_passes_on_the_gallery_and_fails_on_a_wrong_gradient(tmp_path):
    proc = adjopt("check", "poisson_inversion", "--n", 6, check=0)
    assert proc.stdout.count("PASS") == 4  # gradient; Hessian action on J and on grad J; symmetry
    bad = _wrong_gradient_problem(tmp_path)
    proc = adjopt("check", bad, check=1)
    row = next(line for line in proc.stdout.splitlines() if line.strip().startswith("Taylor order 2"))
    assert row.endswith("FAIL") and abs(float(row.split()[-4]) - 1.0) < 0.1, proc.stdout  # the rate it judged on
    assert "Taylor test of the gradient on J" in proc.stdout  # and the table it judged from


def test_check_quietly_prints_one_line(tmp_path):
    # -q: one summary line instead of the table (the rates it judged on), no compile notice; exit status as without
    proc = adjopt("check", "poisson_inversion", "--n", 6, "-q", check=0)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    line = lines[0]
    assert line.startswith("poisson_inversion_2d_h1: check PASS (gradient rate 2.0") and "Taylor" not in line
    assert ", Hessian rate 3.0" in line and ", symmetry " in line and line.endswith(")")
    assert float(line.split("symmetry ")[1].rstrip(")")) <= 1e-8
    assert "compiling" not in proc.stderr
    bad = _wrong_gradient_problem(tmp_path)
    proc = adjopt("check", bad, "--quiet", check=1)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("poisson_inversion_2d_h1: check FAIL (gradient rate "), proc.stdout
    rate = float(lines[0].split("gradient rate ")[1].split(",")[0])
    assert abs(rate - 1.0) < 0.1 and "gradient rate" in lines[0].split("want >= 1.9")[0], lines[0]  # what failed, wanted
    assert "passed: symmetry" in lines[0] and "Taylor test of" not in proc.stdout
    # without -q: the table as before
    assert adjopt("check", bad, check=1).stdout.count("Taylor test of the gradient on J") == 1


def test_quiet_runs_hide_the_library_warnings_but_keep_them_in_the_results(tmp_path):
    # a start outside the bounds (a warning the driver records) and too few iterations (a warning it only logs)
    prob = tmp_path / "out_of_bounds.py"
    prob.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "problems")!r})
        from dataclasses import replace
        import poisson_inversion

        def build(n: int = 6):
            pb = poisson_inversion.build(n=n)
            return replace(pb, p0=pb.p0 + 1.0, bounds=(-0.5, 0.5))
    """))
    run = ("run", prob, "--method", "lbfgs", "--max-iter", 2, "--no-pictures")
    loud = adjopt(*run, "--out", tmp_path / "loud", check=1)
    assert "WARNING adjopt.optimize.minimize: the start violated the bounds at 49 of 49 entries" in loud.stderr
    assert "WARNING adjopt.optimize.base: lbfgs: maximum number of iterations (2) reached" in loud.stderr
    quiet = adjopt(*run, "--out", tmp_path / "quiet", "-q", check=1)
    # not shown, but counted in one line with the first of them (a warning the results do not keep is not lost)
    assert "WARNING" not in quiet.stderr, quiet.stderr
    assert quiet.stderr.strip().splitlines() == [
        "adjopt: 2 warning(s) hidden by -q (run without -q to see them); the first: the start violated the bounds at "
        "49 of 49 entries; it was projected onto them"], quiet.stderr
    assert quiet.stdout.strip() == "lbfgs: stopped after 2 iterations: maximum number of iterations (2) reached"
    for out in ("loud", "quiet"):
        hist = json.loads((tmp_path / out / "history.json").read_text())
        assert hist["warnings"] == ["the start violated the bounds at 49 of 49 entries; it was projected onto them"]
    # the command's own warnings still show with -q
    proc = adjopt(*run, "--out", tmp_path / "fresh", "-q", "--resume", check=1)
    assert "--resume: no checkpoint in" in proc.stderr and "WARNING adjopt.optimize" not in proc.stderr
    # demo -q too (its preset size overridden to stay small)
    proc = adjopt("demo", "--n", 6, "--max-iter", 1, "--no-pictures", "--out", tmp_path / "demo", "-q", check=1)
    assert "WARNING" not in proc.stderr and proc.stdout.startswith("newton-cg: stopped after 1 iteration")
    proc = adjopt("demo", "--n", 6, "--max-iter", 1, "--no-pictures", "--out", tmp_path / "demo2", check=1)
    assert "WARNING adjopt.optimize.base: newton-cg: maximum number of iterations (1) reached" in proc.stderr


def test_quiet_main_in_process_restores_the_library_log_level(tmp_path):
    import logging

    from adjopt.cli import main

    lib = logging.getLogger("adjopt")
    before = lib.level, [list(h.filters) for h in logging.getLogger().handlers]
    assert main(["run", "poisson_inversion", "--n", "6", "--max-iter", "1", "--no-pictures", "-q",
                 "--out", str(tmp_path / "r")]) == 1
    assert (lib.level, [list(h.filters) for h in logging.getLogger().handlers]) == before
    assert logging.getLogger("adjopt.optimize.base").isEnabledFor(logging.WARNING)


def test_bench_writes_json(tmp_path):
    js = tmp_path / "b.json"
    proc = adjopt("bench", "poisson_inversion", "--sizes", 6, 8, "--json", js, check=0)
    assert "wrote" in proc.stdout
    rows = json.loads(js.read_text())["results"]
    assert [r["size"] for r in rows] == [6, 8] and all(r["gradient_s"] > 0 and r["hessp_s"] > 0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (("run", "poisson_inverson"), "unknown problem 'poisson_inverson'; the gallery has: advection_diffusion_initial_condition"),
    (("run", "poisson_inversion", "--nn", "8"), "unknown option --nn; the problem's options are --n, --dim"),
    (("run", "poisson_inversion", "--n", "eight"), "option --n takes a int (default 32), got 'eight'"),
    (("run", "poisson_inversion", "--n", "1"), "rejected the options"),
    (("run", "poisson_inversion", "--method", "bfgs"), "unknown method 'bfgs'; the methods are lbfgs"),
    (("run", "missing_file.py"), "no problem file"),
])
def test_bad_input_exits_with_status_2(args, message):
    proc = adjopt(*args, check=2)
    assert message in proc.stderr


def test_a_problem_file_that_raises_on_import(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import numpy\nraise RuntimeError('the mesh file is missing')\ndef build():\n    pass\n")
    proc = adjopt("run", bad, check=2)
    assert "Traceback" in proc.stderr and "the mesh file is missing" in proc.stderr


def test_an_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = adjopt("run", "optimal_control", "--n", 6, "--out", blocker / "sub", check=2)
    assert "cannot create the output folder" in proc.stderr


def test_sigkill_then_resume_gives_the_same_final_J(tmp_path):
    slow = tmp_path / "slow_inversion.py"
    slow.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(ROOT, "problems")!r})
        import poisson_inversion

        RUN_DEFAULTS = dict(method="lbfgs", gtol=1e-7)

        def build(n: int = 12, delay: float = 0.0):
            pb = poisson_inversion.build(n=n)
            J = pb.functional
            value = J.value
            def slow_value(p):
                time.sleep(delay)
                return value(p)
            J.value = slow_value
            return pb
    """))
    adjopt("run", slow, "--out", tmp_path / "ref", "-q", check=0)
    f_ref = json.loads((tmp_path / "ref" / "history.json").read_text())["fun"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "adjopt.cli", "run", str(slow), "--delay", "0.05", "--out", str(out),
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck = out / "checkpoint.npz"
    deadline = time.time() + 60
    from adjopt.optimize import read_checkpoint

    while time.time() < deadline:
        if ck.exists():
            try:
                if read_checkpoint(ck)[1]["nit"] >= 4:
                    break
            except Exception:
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(ck)[1]["nit"]
    assert killed_at >= 4
    resumed = adjopt("run", slow, "--out", out, "--resume", "-q", check=0)
    assert resumed.stdout.startswith("lbfgs: converged")
    hist = json.loads((out / "history.json").read_text())
    assert hist["fun"] == pytest.approx(f_ref, rel=1e-12)
    assert hist["nit"] == json.loads((tmp_path / "ref" / "history.json").read_text())["nit"]


def test_a_cold_kernel_cache_is_announced_before_compiling(tmp_path):
    # an empty numba cache: the command says it compiles (on stderr, before it does); a warm one: silent;
    # another problem whose kernels are not cached yet: said again
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    probe = [sys.executable, "-c", "from adjopt._compile import kernels_cached; print(kernels_cached())"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "False"
    cmd = [sys.executable, "-m", "adjopt.cli", "check", "seed_toy"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("compiling numba kernels") == 1
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "True"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "compiling" not in second.stderr
    quiet = subprocess.run([sys.executable, "-m", "adjopt.cli", "run", "seed_toy", "-q", "--out", str(tmp_path / "o")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert "compiling" not in quiet.stderr


def test_the_table_starts_at_iteration_0_and_names_what_it_shows(tmp_path):
    out = adjopt("run", "topology_compliance", "--nelx", 12, "--nely", 4, "--max-iter", 3, "--out", tmp_path / "t",
                 "--no-pictures").stdout
    lines = out.splitlines()
    head = next(line for line in lines if line.split()[:2] == ["it", "J"])
    assert "change" in head and "|g|" not in head and "step" not in head and "total s" in head  # OC
    rows = [line.split() for line in lines[lines.index(head) + 1:] if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows[:4]] == [0, 1, 2, 3]
    out = adjopt("run", "poisson_inversion", "--n", 6, "--max-iter", 2, "--out", tmp_path / "p",
                 "--no-pictures").stdout
    head = next(line for line in out.splitlines() if line.split()[:2] == ["it", "J"])
    assert "|g|" in head and "step" in head
    # every file of a run, the checkpoint too, gets the same permissions
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "p").iterdir() if not p.name.startswith(".")}
    assert "checkpoint.npz" in modes and len(set(modes.values())) == 1, modes


def test_list_shows_defaults_as_they_are_typed_and_survives_a_closed_pipe():
    from adjopt.cli import _as_typed, _convert

    for value in (True, False, (1.0, 0.5), None, 3, 0.25, "h1"):
        back = _convert("x", _as_typed(value), value)
        assert back == value or (value is None and back is None), (value, back)
    out = adjopt("list", check=0).stdout
    assert "--velocity 1,0.5" in out and "--alpha none" in out
    proc = subprocess.run(f"{sys.executable} -m adjopt.cli list | head -1", shell=True, capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_check_tests_the_constraints_and_skips_missing_hessians(tmp_path):
    proc = adjopt("check", "topology_robust", "--nelx", 16, "--nely", 8, "--rmin", 2.0, "-q", check=0)
    line = proc.stdout.strip()
    assert "check PASS" in line and "constraint 0 gradient rate" in line and "Hessian rate exact" in line
    assert "constraint 3 gradient rate" in line  # the three bound constraints and the volume
    proc = adjopt("check", "topology_eigen", "--nelx", 10, "--nely", 8, check=0)
    assert "Hessian actions" in proc.stdout and "(skipped)" in proc.stdout and "constraint 0" in proc.stdout
    bad = tmp_path / "wrong_constraint.py"
    bad.write_text(
        "import numpy as np\n"
        "import adjopt\n"
        "class Q:\n"
        "    n_params = 4\n"
        "    def value(self, p): return float(p @ p)\n"
        "    def gradient(self, p, tol=None): return 2 * p\n"
        "    def hessp(self, p, v, tol=None): return 2 * np.asarray(v)\n"
        "class WrongConstraint(Q):\n"
        "    def gradient(self, p, tol=None): return p  # half of the true gradient\n"
        "def build():\n"
        "    return adjopt.Problem(Q(), np.full(4, 0.5), constraints=[(WrongConstraint(), 1.0)])\n")
    proc = adjopt("check", str(bad), "-q", check=1)
    assert "check FAIL (constraint 0 gradient rate" in proc.stdout and "passed: gradient rate" in proc.stdout


def test_quiet_runs_hide_the_librarys_python_warnings_too(tmp_path):
    # a solver that did not converge logs and warns (ConvergenceWarning): -q shows neither, counts it once
    prob = tmp_path / "warns.py"
    prob.write_text(textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {os.path.join(ROOT, "problems")!r})
        import adjopt, poisson_inversion
        from adjopt.errors import ConvergenceWarning

        class Warns(adjopt.ReducedFunctional):
            def value(self, p):
                warnings.warn("the Krylov solve stopped at 3 iterations", ConvergenceWarning)
                return super().value(p)

        def build(n: int = 6):
            pb = poisson_inversion.build(n=n)
            J = pb.functional
            pb.functional = Warns(J.matrix, J.rhs, J.objective, parameter_map=J.map)
            return pb
    """))
    quiet = adjopt("run", prob, "--method", "lbfgs", "--max-iter", 1, "--no-pictures", "--out", tmp_path / "q", "-q",
                   check=1)
    assert "ConvergenceWarning" not in quiet.stderr and "Krylov" not in quiet.stderr.split("the first:")[0]
    assert "warning(s) hidden by -q" in quiet.stderr, quiet.stderr
    loud = adjopt("run", prob, "--method", "lbfgs", "--max-iter", 1, "--no-pictures", "--out", tmp_path / "l",
                  check=1)
    assert "ConvergenceWarning" in loud.stderr and "the Krylov solve stopped at 3 iterations" in loud.stderr


def test_run_shows_the_normalization_column_aligned(tmp_path):
    # the stress L-bracket's adaptive normalization is a continuation with a long name: its column is as wide as
    # its name, and every value sits under it
    proc = adjopt("run", "topology_stress", "--case", "lbracket", "--nelx", 20, "--nely", 20, "--compliance_max", 0,
                  "--max-iter", 3, "--out", tmp_path / "st", timeout=300)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: the iteration budget ended the run
    lines = proc.stdout.splitlines()
    head = next(line for line in lines if "normalization" in line)
    end = head.index("normalization") + len("normalization")
    rows = [line for line in lines if line[:5].strip().isdigit()]
    assert [int(r[:5]) for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r[end - 1] != " " and r[end] == " ", (head, r)  # right-aligned under the header
    hist = json.loads((tmp_path / "st" / "history.json").read_text())
    cs = [h["normalization"] for h in hist["history"]]
    assert cs[0] == 1.0 and len(set(cs)) > 1
