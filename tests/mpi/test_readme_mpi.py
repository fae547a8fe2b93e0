"""The README's distributed example runs (on a smaller mesh) and does what it says, on every rank."""

import os
import re

import numpy as np
import pytest

pytest.importorskip("petsc4py")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_distributed_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "adjopt.backends.petsc" in c)
    assert "build(n=256)" in code
    scope = {}
    exec(compile(code.replace("build(n=256)", "build(n=16)"), "README.md", "exec"), scope)
    problem, F, g, res = scope["problem"], scope["F"], scope["g"], scope["res"]
    assert np.linalg.norm(g - problem.functional.gradient(problem.p0)) <= 1e-8 * np.linalg.norm(g)
    assert res.success and np.linalg.norm(problem.functional.gradient(res.x)) < 1e-3
    assert F.stats.solves["adjoint"] > 0 and F.n_params == problem.p0.size == 17 * 17
