"""The README's library example runs and prints what it says."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert len(code.strip().splitlines()) <= 16
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "1 factorization(s)" in out and "4 solve(s)" in out
    assert "PASS" in out


def test_readme_quickstart_has_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("<!-- ci:quickstart:start -->")[1].split("<!-- ci:quickstart:end -->")[0]
    cmds = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(cmds) == 2


def test_readme_optimization_example_runs_from_any_folder(tmp_path):
    # after the Quick start install, ``from problems import ...`` works outside the checkout too
    import subprocess
    import sys

    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "topology_compliance.build" in c)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "oc: converged after 127 iterations" in proc.stdout and "f = 218.8" in proc.stdout
    assert (tmp_path / "mbb.npz").exists()


def test_readme_callback_example_recovers_the_coefficient(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "CallbackMatrix(" in c)
    exec(compile(code, "README.md", "exec"), {})
    nit, err = capsys.readouterr().out.split()
    assert int(nit) <= 20 and float(err) < 1e-6


def test_readme_nonlinear_example_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "diffusion_reaction_residual(" in c)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "True"
    value, newton, factorizations = lines[1].split()
    assert float(value) > 0 and int(newton) >= 3 and int(factorizations) == int(newton) + 1
    assert sum("PASS" in line for line in lines) >= 3
    assert float(lines[-1]) < 1e-3  # the misfit fell by more than a thousand


def test_readme_transient_example_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "TransientReducedFunctional(" in c)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    value, gnorm = map(float, lines[0].split())
    assert value > 0 and gnorm > 0
    assert lines[1].startswith("1 factorization(s)") and "forward=100, adjoint=100" in lines[1]
    assert sum("PASS" in line for line in lines) >= 3
    diff, recomputed = lines[-1].split()
    assert float(diff) <= 1e-12 * gnorm and int(recomputed) > 100


def test_readme_nonlinear_transient_example_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S)
                if "TransientReducedFunctional(R" in c)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    value, newton, factorizations = lines[0].split()
    assert float(value) > 0 and int(newton) > 25 and int(factorizations) == int(newton)
    assert sum("PASS" in line for line in lines) >= 3


def test_readme_uncertainty_example_runs(tmp_path):
    import subprocess
    import sys

    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "LaplacePosterior" in c)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert " 140 " in lines[0]  # 70 sketch columns, then 70 in the second pass
    assert "(1089, 5)" in lines[1]
    lo, hi = map(float, lines[1].split()[:2])
    assert 0 < lo < hi < 1.2  # below the prior variance (about 1 in the interior)


def test_readme_scikit_fem_example_matches_the_native_assembly():
    """The scikit-fem example runs, and its gradient equals the one of adjopt's own P1 assembly on the same
    mesh to 1e-12 relative."""
    import numpy as np
    import pytest

    pytest.importorskip("skfem")
    import adjopt
    from adjopt import fem
    from adjopt.mesh import Mesh

    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "skfem" in c)
    assert len(code.strip().splitlines()) <= 20
    ns = {}
    exec(compile(code.replace("print(", "(lambda *a: None)("), "README.md", "exec"), ns)
    mesh, J, p, free, number = ns["mesh"], ns["J"], ns["p"], ns["free"], ns["number"]
    own = Mesh(mesh.p.T.copy(), mesh.t.T.copy(), "triangle")
    conn = number[own.cells]
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(own), "exp", n=free.size)
    native = adjopt.ReducedFunctional(A, np.full(free.size, 1 / 64), J.objective)
    g, g0 = J.gradient(p), native.gradient(p)
    assert np.linalg.norm(g - g0) <= 1e-12 * np.linalg.norm(g0)
    assert J.value(p) == pytest.approx(native.value(p), rel=1e-12)
    assert adjopt.taylor_test(J, p, order=3).rate >= 2.9
