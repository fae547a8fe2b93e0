"""Rank-by-rank builds refuse options that differ between the ranks (instead of building parts of different
problems, or waiting forever in an exchange whose sizes disagree).

Under ``mpiexec -n 2`` the ranks pass different values and every rank must raise the same error; on one rank
the fingerprints are checked against a stand-in communicator that plays the other ranks.
"""

import numpy as np
import pytest

petsc4py = pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")

from problems import advection_diffusion_source, poisson_inversion, topology_compliance  # noqa: E402

from adjopt.backends.petsc import DistributedReducedFunctional  # noqa: E402
from adjopt.backends.petsc.parts import LocalCompliance, LocalSystem, same_options  # noqa: E402

COMM = MPI.COMM_WORLD


class Ranks:
    """A communicator whose allgather answers as ranks that called with ``others`` (this process is rank 0)."""

    def __init__(self, *others):
        self.others = others

    def allgather(self, mine):
        from adjopt.backends.petsc.parts import _fingerprint

        return [mine] + [{k: _fingerprint(v) for k, v in o.items()} for o in self.others]


def test_equal_options_pass_and_differing_ones_are_named():
    same_options(Ranks(dict(n=8, seed=0)), "f", n=8, seed=0)
    with pytest.raises(ValueError, match=r"f was called with options that differ between the ranks \(n: rank 0 8, "
                                         r"rank 1 9\): every rank must pass the same options"):
        same_options(Ranks(dict(n=9, seed=0)), "f", n=8, seed=0)


def test_an_option_given_on_one_rank_only_differs():
    with pytest.raises(ValueError, match=r"pc_type: rank 0 \(not given\), rank 1 'jacobi'"):
        same_options(Ranks(dict(n=8, pc_type="jacobi")), "f", n=8)


def test_arrays_compare_by_their_bytes_shape_and_dtype():
    a = np.arange(6.0)
    same_options(Ranks(dict(v=a.copy())), "f", v=a)
    b = a.copy()
    b[3] += 1e-12
    for other in (b, a.reshape(2, 3), a.astype(np.float32), a[::-1].copy()):
        with pytest.raises(ValueError, match="v: rank 0 array"):
            same_options(Ranks(dict(v=other)), "f", v=a)


def test_nested_values_and_nan_compare_by_value():
    same_options(Ranks(dict(v=(1.0, [2, "x"]), d={"a": 1}, x=float("nan"))), "f",
                 v=(1.0, [2, "x"]), d={"a": 1}, x=float("nan"))
    with pytest.raises(ValueError, match="v: "):
        same_options(Ranks(dict(v=(1.0, 2.0))), "f", v=(1.0, 3.0))
    same_options(Ranks(dict(v=[1.0, 2.0])), "f", v=(1.0, np.float64(2.0)))  # a list as the tuple it equals


def test_numpy_scalars_equal_the_python_numbers_they_are():
    same_options(Ranks(dict(n=np.int64(8), x=np.float32(0.5), b=True, s="graph")), "f", n=8, x=0.5, b=np.True_,
                 s=np.str_("graph"))
    # numpy's booleans by their value (they were compared by type: True on one rank, False on another passed)
    with pytest.raises(ValueError, match="warm_start: rank 0 True, rank 1 False"):
        same_options(Ranks(dict(warm_start=np.False_)), "f", warm_start=np.True_)
    with pytest.raises(ValueError, match="n: rank 0 8, rank 1 8.0"):
        same_options(Ranks(dict(n=8.0)), "f", n=np.int32(8))
    with pytest.raises(ValueError, match="b: rank 0 True, rank 1 1"):
        same_options(Ranks(dict(b=1)), "f", b=True)


def test_paths_compare_as_the_strings_they_name():
    from pathlib import Path

    same_options(Ranks(dict(mesh_file="sq.vtu")), "f", mesh_file=Path("sq.vtu"))
    with pytest.raises(ValueError, match="mesh_file: rank 0 'sq.vtu', rank 1 'other.vtu'"):
        same_options(Ranks(dict(mesh_file=Path("other.vtu"))), "f", mesh_file=Path("sq.vtu"))


def test_object_arrays_compare_by_their_entries_and_0d_arrays_keep_their_shape():
    v = np.array([1.0, 0.5], dtype=object)
    same_options(Ranks(dict(v=np.array([1.0, 0.5], dtype=object))), "f", v=v)
    with pytest.raises(ValueError, match=r"v: rank 0 array\(\(1.0, 0.5\)\), rank 1 array\(\(1.0, 0.25\)\)"):
        same_options(Ranks(dict(v=np.array([1.0, 0.25], dtype=object))), "f", v=v)
    with pytest.raises(ValueError, match=r"n: rank 0 8, rank 1 9\)"):  # a 0-d array as its scalar
        same_options(Ranks(dict(n=np.array(9))), "f", n=np.array(8))


def test_a_value_that_cannot_be_read_compares_by_its_type_instead_of_raising():
    import os

    class Broken(os.PathLike):
        def __fspath__(self):
            raise RuntimeError("no path")

    same_options(Ranks(dict(f=Broken())), "f", f=Broken())  # on every rank alike: nothing to raise here
    with pytest.raises(ValueError, match="f: rank 0 <Broken>, rank 1 'x.vtu'"):
        same_options(Ranks(dict(f="x.vtu")), "f", f=Broken())


def test_objects_compare_by_type_only():
    # an object's repr holds its address, which differs between processes: equal types pass
    same_options(Ranks(dict(f=lambda x: x)), "f", f=lambda x: 2 * x)
    with pytest.raises(ValueError, match=r"f: rank 0 <function>, rank 1 1\)"):
        same_options(Ranks(dict(f=1)), "f", f=lambda x: x)


def test_at_most_four_options_are_listed():
    mine = {f"o{i}": i for i in range(6)}
    with pytest.raises(ValueError, match=r"and 2 more\)"):
        same_options(Ranks({k: v + 1 for k, v in mine.items()}), "f", **mine)


@pytest.mark.skipif(COMM.size < 2, reason="needs ranks that differ (mpiexec -n 2)")
@pytest.mark.parametrize("build, options, name", [
    (poisson_inversion.build_distributed, lambda r: dict(n=8 + r), "n"),
    (poisson_inversion.build_distributed, lambda r: dict(n=8, seed=r), "seed"),
    (poisson_inversion.build_distributed, lambda r: dict(n=8, rtol=10.0 ** -(8 + r)), "rtol"),
    (topology_compliance.build_distributed, lambda r: dict(case="mbb", nelx=12, nely=4 + r), "nely"),
    (topology_compliance.build_distributed, lambda r: dict(case="mbb", nelx=12, nely=4, filter=bool(r)), "filter"),
    (advection_diffusion_source.build_distributed, lambda r: dict(n=8, velocity=(1.0, 0.5 * r)), "velocity"),
    # a value that one rank alone would refuse: the comparison comes first, so no rank waits for the others
    (advection_diffusion_source.build_distributed, lambda r: dict(n=8, n_obs=10 + 10**6 * r), "n_obs"),
])
def test_rank_by_rank_builds_refuse_differing_options_on_every_rank(build, options, name):
    with pytest.raises(ValueError, match=rf"build_distributed was called with options that differ between the "
                                         rf"ranks \({name}: rank 0 "):
        build(comm=COMM, **options(COMM.rank))


@pytest.mark.skipif(COMM.size < 2, reason="needs ranks that differ (mpiexec -n 2)")
def test_from_parts_refuses_differing_solver_options():
    ke = np.array([[1.0, -1.0], [-1.0, 1.0]])
    r = COMM.rank
    conn = np.array([[r, r + 1]]) if r + 1 < COMM.size else np.array([[r, -1]])
    system = LocalSystem(conn, ke[None], None, 1, np.ones(1), [LocalCompliance(np.ones(1))])
    with pytest.raises(ValueError, match=r"from_parts was called with options that differ between the ranks "
                                         r"\(pc_type: rank 0 'jacobi', rank 1 'none'"):
        DistributedReducedFunctional.from_parts(system, comm=COMM, pc_type=("jacobi", "none")[min(r, 1)])


def test_a_graph_partition_needs_a_mesh_file():
    with pytest.raises(ValueError, match="partitions a mesh file"):
        poisson_inversion.build_distributed(n=6, partition="graph", comm=COMM)
    with pytest.raises(ValueError, match="partition must be 'slab' or 'graph', got 'metis'"):
        poisson_inversion.build_distributed(n=6, partition="metis", comm=COMM)


@pytest.mark.skipif(COMM.size < 2, reason="needs ranks that differ (mpiexec -n 2)")
@pytest.mark.parametrize("options, name", [
    (lambda r: dict(partition=("slab", "graph")[min(r, 1)]), "partition"),
    (lambda r: dict(rtol=10.0 ** -(8 + r)), "rtol"),
    (lambda r: dict(pc_type=("gamg", "jacobi")[min(r, 1)]), "pc_type"),
    (lambda r: dict(warm_start=np.bool_(r == 0)), "warm_start"),
    (lambda r: dict(partition=("slab", "bogus")[min(r, 1)]), "partition"),  # a value one rank alone refuses
])
def test_distribute_refuses_differing_options_on_every_rank(options, name):
    # they crashed (a double free), hung or ended in an MPI error before
    from adjopt.backends.petsc import distribute

    problem = poisson_inversion.build(n=8)
    with pytest.raises(ValueError, match=rf"distribute was called with options that differ between the ranks "
                                         rf"\({name}: rank 0 "):
        distribute(problem, comm=COMM, **options(COMM.rank))
    # the constructor compares what it is given, too
    with pytest.raises(ValueError, match=rf"DistributedReducedFunctional was called with options that differ "
                                         rf"between the ranks \({name}: rank 0 "):
        DistributedReducedFunctional(problem.functional.matrix, problem.functional.rhs, problem.functional.objective,
                                     problem.functional.map, comm=COMM, **options(COMM.rank))


def test_array_likes_sets_and_sparse_matrices_compare_by_their_entries():
    import array

    import scipy.sparse as sp

    parts = np.arange(40) % 3
    for same in (parts.tolist(), array.array("l", parts.tolist()), parts.astype(np.int64)):
        same_options(Ranks(dict(parts=same)), "f", parts=parts)
    for other in (parts[::-1].tolist(), array.array("l", parts[::-1].tolist()), range(40)):
        with pytest.raises(ValueError, match="parts: rank 0 array"):
            same_options(Ranks(dict(parts=other)), "f", parts=parts)
    same_options(Ranks(dict(s={1, 2})), "f", s={2, 1})
    with pytest.raises(ValueError, match="s: "):
        same_options(Ranks(dict(s={1, 3})), "f", s={1, 2})
    same_options(Ranks(dict(M=sp.eye(4, format="coo"))), "f", M=sp.eye(4, format="csr"))
    with pytest.raises(ValueError, match="M: rank 0 sparse"):
        same_options(Ranks(dict(M=2 * sp.eye(4))), "f", M=sp.eye(4))
    # 0-d arrays as their scalars; a long list is shown in brief
    same_options(Ranks(dict(n=np.array(16), x=np.array("slab"))), "f", n=16, x="slab")
    with pytest.raises(ValueError, match=r"parts: rank 0 array\(shape=\(1000,\).{0,80} rank 1"):
        same_options(Ranks(dict(parts=list(range(1000)))), "f", parts=list(range(1, 1001)))


def test_content_digests_tell_problems_apart():
    from adjopt.backends.petsc.parts import content_digest

    def digest(**kw):
        J = poisson_inversion.build(**kw).functional
        return content_digest(J.matrix, J.rhs, J.objective, J.map)

    a = digest(n=8)
    assert a == digest(n=8)  # the same problem built twice
    assert a != digest(n=9) and a != digest(n=8, seed=1) and a != digest(n=8, alpha=3.0)


@pytest.mark.skipif(COMM.size < 2, reason="needs ranks that differ (mpiexec -n 2)")
@pytest.mark.parametrize("options", [lambda r: dict(n=8 + r), lambda r: dict(n=8, seed=r)])
def test_distribute_refuses_different_serial_problems_on_the_ranks(options):
    # another size crashed with a corrupted heap, another seed gave a J that was neither rank's
    from adjopt.backends.petsc import distribute

    with pytest.raises(ValueError, match="the ranks hold different serial problems"):
        distribute(poisson_inversion.build(**options(COMM.rank)), comm=COMM, partition="block")
