"""Memory of a distributed run stays flat over its iterations.

petsc4py does not destroy a parallel object when Python drops it: it queues it
until a collective ``PETSc.garbage_cleanup``. Each value, gradient and Hessian
action makes a few temporary Vecs, so without a cleanup every rank's memory
grows with every call of a long run. Run under ``mpiexec -n 2`` (CI); on one
rank petsc4py destroys objects at once and there is nothing to check.
"""

import os
import re
import tempfile

import numpy as np
import pytest

pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")
from petsc4py import PETSc  # noqa: E402
from problems import poisson_inversion, topology_compliance  # noqa: E402

import adjopt  # noqa: E402
from adjopt.backends.petsc import in_blocks  # noqa: E402

COMM = MPI.COMM_WORLD
pytestmark = pytest.mark.skipif(COMM.size == 1, reason="petsc4py defers destruction only on more than one rank")


def garbage_entries(comm) -> int:
    """How many dropped PETSc objects wait for a cleanup, on the rank with most (PETSc's garbage_view)."""
    fd, path = tempfile.mkstemp()
    saved = os.dup(1)
    try:
        os.dup2(fd, 1)
        PETSc.garbage_view(comm)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    # rank 0 prints every rank's table
    found = [int(n) for n in re.findall(r"Rank \d+:: Total entries: (\d+)", text)]
    return comm.bcast(max(found, default=0) if comm.rank == 0 else None)


def _points(F, k: int):
    v = F.create_parameter_vec()
    n = v.getLocalSize()
    start = v.getOwnershipRange()[0]
    v.setArray(0.3 * np.sin(0.3 * (start + np.arange(n)) + k))  # a new point for each k
    return v


@pytest.mark.parametrize("build", ["poisson", "mbb"])
def test_garbage_does_not_grow_with_the_calls(build):
    if build == "poisson":
        F = poisson_inversion.build_distributed(n=12, rtol=1e-10).functional
    else:
        F = topology_compliance.build_distributed(nelx=24, nely=8, rtol=1e-8).functional
    counts = []
    for k in range(8):
        p = _points(F, k)
        if build == "mbb":
            p.shift(0.5)
        F.value_vec(p)
        F.gradient_vec(p)
        F.hessp_vec(p, _points(F, k + 1))
        F.hessp_vec(p, _points(F, k + 2))
        counts.append(garbage_entries(COMM))
    # what is left is the last few calls' temporaries, the same number after 2 points and after 8
    assert counts[-1] <= max(counts[:2]), counts
    assert counts[-1] < 30, counts


def test_garbage_stays_bounded_in_a_block_newton_cg_run():
    problem = in_blocks(poisson_inversion.build_distributed(n=12, rtol=1e-10))
    seen = []

    def callback(*args, **kwargs):
        seen.append(garbage_entries(COMM))

    res = adjopt.minimize(problem, method="newton-cg", inner_product="h1", maxiter=4, callback=callback)
    assert res.nit >= 3
    assert len(seen) >= 3
    assert max(seen) < 60 and seen[-1] <= max(seen[:2]) + 5, seen


def test_conversions_and_riesz_maps_between_calls_do_not_pile_up():
    F = poisson_inversion.build_distributed(n=12, rtol=1e-10).functional
    full, blocks = F.inner_product("h1"), F.blocks().inner_product("h1")
    p = np.linspace(0.0, 1.0, F.n_params)
    n_mine = F.layout.params.local_size(COMM.rank)
    counts = []
    for k in range(40):
        F.to_vec(p + k)
        full.riesz(full.apply(p))
        blocks.riesz(blocks.apply(np.full(n_mine, float(k))))
        if k in (2, 39):
            counts.append(garbage_entries(COMM))
    assert counts[1] <= counts[0] and counts[1] < 30, counts


def test_an_adjopt_malloc_one_rank_refuses_stops_every_rank(monkeypatch):
    if COMM.rank == 1:
        monkeypatch.setenv("ADJOPT_MALLOC", "Bogus")
    else:
        monkeypatch.delenv("ADJOPT_MALLOC", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(ValueError, match=r"environment variable ADJOPT_MALLOC must be 'keep'.*'Bogus' \(on rank 1"):
        poisson_inversion.build_distributed(n=8)
