"""The distributed guide's Python example (docs/guides/distributed.rst) runs, on a smaller mesh, on one rank and
under ``mpiexec -n 2`` (CI runs tests/mpi both ways), and gives what the serial functional gives."""

import os
import textwrap

import numpy as np
import pytest

pytest.importorskip("petsc4py")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python_blocks(path: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of an rst file, dedented."""
    lines = open(path).read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
        else:
            i += 1
    return blocks


def test_distributed_guide_example_runs():
    blocks = [b for b in _python_blocks(os.path.join(ROOT, "docs", "guides", "distributed.rst"))
              if "import distribute" in b]
    assert len(blocks) == 1, "the guide's distributed example was not found"
    code = blocks[0]
    assert "build(n=256)" in code
    scope = {}
    exec(compile(code.replace("build(n=256)", "build(n=16)"), "distributed.rst", "exec"), scope)
    problem, F, g, res = scope["problem"], scope["F"], scope["g"], scope["res"]
    serial = problem.functional
    assert F.n_params == problem.p0.size == 17 * 17
    assert abs(F.value(problem.p0) - serial.value(problem.p0)) <= 1e-8 * abs(serial.value(problem.p0))
    assert np.linalg.norm(g - serial.gradient(problem.p0)) <= 1e-8 * np.linalg.norm(g)
    # the last line runs adjopt's Newton-CG on the distributed functional: it ends at a stationary point of the
    # serial one
    assert res.success and np.linalg.norm(serial.gradient(res.x)) < 1e-3 * np.linalg.norm(serial.gradient(problem.p0))
    assert F.stats.solves["adjoint"] > 0


def test_rank_by_rank_example_runs():
    from mpi4py import MPI

    from problems import topology_compliance

    import adjopt

    blocks = [b for b in _python_blocks(os.path.join(ROOT, "docs", "guides", "distributed.rst")) if "in_blocks" in b]
    assert len(blocks) == 1, "the guide's rank-by-rank example was not found"
    code = blocks[0]
    assert "nelx=1200, nely=400" in code and "maxiter=50" in code
    scope = {}
    exec(compile(code.replace("nelx=1200, nely=400", "nelx=24, nely=8").replace("maxiter=50", "maxiter=10"),
                 "distributed.rst", "exec"), scope)
    x = scope["x"]
    comm = MPI.COMM_WORLD
    assert (x is None) == (comm.rank != 0)
    serial = adjopt.minimize(topology_compliance.build("mbb", nelx=24, nely=8, solver="superlu"), method="oc",
                             maxiter=10)
    assert abs(scope["res"].fun - serial.fun) <= 1e-8 * abs(serial.fun)
    if comm.rank == 0:
        assert np.abs(x - serial.x).max() <= 1e-8
