"""What a hostile review of the rank-by-rank path found: bad input on one rank stops every rank with the reason
(no hang), inputs are copied and checked, stale files do not survive --force. Runs on one rank and under
``mpiexec -n 2``; where a case needs two ranks to differ, the last rank is the odd one."""

import os

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")



from adjopt import cli  # noqa: E402
from adjopt.backends.petsc import DistributedReducedFunctional  # noqa: E402
from adjopt.backends.petsc.parts import (  # noqa: E402
    DistributedVolume,
    LocalCompliance,
    LocalMisfit,
    LocalQuadratic,
    LocalSystem,
    free_numbering,
    rows_to_owners,
    sum_to_owners,
)
from adjopt.errors import NonFiniteError, ShapeError  # noqa: E402
from adjopt.mesh import MeshError, rectangle, write_pvtu  # noqa: E402

COMM = MPI.COMM_WORLD
ODD = COMM.rank == COMM.size - 1  # the rank that gets the bad input


def _chain(**change):
    """A 1D chain of 4 two-node elements per rank (as in test_local_build)."""
    r, R = COMM.rank, COMM.size
    first, n_glob = 4 * r, 4 * R + 1
    nodes = first + np.arange(5)
    free = np.where((nodes == 0) | (nodes == n_glob - 1), -1, nodes - 1)
    owned = np.arange(first, first + 4)
    owned = owned[(owned > 0) & (owned < n_glob - 1)] - 1
    args = dict(conn=np.column_stack([free[:-1], free[1:]]), local=np.array([[1.0, -1.0], [-1.0, 1.0]]),
                coefficient="exp", n_owned_dofs=owned.size, rhs=np.ones(owned.size),
                terms=[LocalCompliance(np.ones(owned.size))])
    args.update(change)
    return args, owned


def _build(**change):
    args, _ = _chain(**change)
    return DistributedReducedFunctional.from_parts(LocalSystem(**args), rtol=1e-12, pc_type="jacobi")


def test_bad_pieces_on_one_rank_stop_every_rank():
    args, owned = _chain()
    n_dofs = 4 * COMM.size - 1
    with pytest.raises(Exception, match="coefficient|unknown"):
        _build(coefficient="nonsense" if ODD else "exp")
    B_bad = sp.csr_array(np.ones((1, n_dofs + (3 if ODD else 0))))
    with pytest.raises(ShapeError, match="LocalMisfit.B has"):
        _build(terms=[LocalMisfit(np.zeros(1), B_bad)])
    # different kinds of terms on the ranks
    terms = [LocalCompliance(np.ones(owned.size))] if not ODD or COMM.size == 1 else [
        LocalMisfit(np.zeros(owned.size))]
    if COMM.size > 1:
        with pytest.raises(ValueError, match="differ in their terms"):
            _build(terms=terms)
    with pytest.raises(ShapeError, match="LocalQuadratic.Q as weights"):
        _build(terms=[LocalCompliance(np.ones(owned.size)), LocalQuadratic(np.ones(owned.size + (2 if ODD else 0)))])
    with pytest.raises(ShapeError, match="p_ref must be"):
        _build(terms=[LocalCompliance(np.ones(owned.size)), LocalQuadratic(None, np.ones(7 if ODD else 4))])
    with pytest.raises(ShapeError, match="local must be"):
        _build(local=np.eye(3) if ODD else args["local"])


def test_inputs_are_copied_and_checked():
    args, owned = _chain()
    with pytest.raises(NonFiniteError, match="p_ref"):
        LocalQuadratic(None, np.array([np.nan]))
    with pytest.raises(NonFiniteError, match="c must be finite"):
        LocalQuadratic(None, None, c=np.nan)
    with pytest.raises(NonFiniteError, match="c must be finite"):
        LocalCompliance(np.ones(2), c=np.inf)
    with pytest.raises(NonFiniteError, match="local"):
        LocalSystem(**dict(args, local=np.full((2, 2), np.nan)))
    local, p_ref = args["local"].copy(), np.zeros(owned.size + (1 if ODD else 0))
    p_ref = np.zeros(4) if len(p_ref) != 4 else p_ref
    system = LocalSystem(**dict(args, local=local))
    before = DistributedReducedFunctional.from_parts(system, rtol=1e-12, pc_type="jacobi").value(np.zeros(4 * COMM.size))
    local *= 10.0  # the caller changes its array after LocalSystem: the system keeps its copy
    after = DistributedReducedFunctional.from_parts(system, rtol=1e-12, pc_type="jacobi").value(np.zeros(4 * COMM.size))
    assert after == pytest.approx(before, rel=1e-10)


def test_ownership_helpers_refuse_ids_out_of_range_on_any_rank():
    ranges = np.arange(COMM.size + 1) * 5
    bad = [0, 5 * COMM.size + 3] if ODD else [0]
    with pytest.raises(ValueError, match="ids in"):
        sum_to_owners(COMM, bad, np.ones(len(bad)), ranges)
    with pytest.raises(ValueError, match="one entry each"):
        sum_to_owners(COMM, [0, 1], np.ones(3 if ODD else 2), ranges)
    S = sp.coo_array(np.ones((2, 5 * COMM.size)))
    with pytest.raises(ValueError, match="rows_to_owners"):
        rows_to_owners(COMM, S, [0, -1] if ODD else [0, 1], ranges)
    with pytest.raises(ShapeError, match="one flag per local id"):
        free_numbering(COMM, np.arange(3) + 3 * COMM.rank, np.zeros(4 if ODD else 3, dtype=bool), 3)
    with pytest.raises(NonFiniteError, match="volumes"):
        DistributedVolume(COMM, np.array([1.0, np.nan if ODD else 1.0]), n_params=2 * COMM.size, first=2 * COMM.rank)


def test_gram_matrices_must_be_symmetric_positive_definite():
    args, owned = _chain()
    n, m = 4, 4 * COMM.size
    rows = np.arange(n) + n * COMM.rank

    def gram(values, upper=0.0):
        G = sp.lil_array((n, m))
        G[np.arange(n), rows] = values
        if upper:
            G[0, (rows[0] + 1) % m] = upper
        return sp.csr_array(G)

    F = _build(gram={"mass": gram(-np.ones(n))})
    with pytest.raises(ValueError, match="not positive definite"):
        F.inner_product("l2")
    F = _build(gram={"mass": gram(np.ones(n), upper=0.5)})
    with pytest.raises(ValueError, match="not symmetric"):
        F.inner_product("l2")


def test_write_pvtu_with_a_bad_field_on_one_rank_stops_every_rank(tmp_path):
    folder = COMM.bcast(str(tmp_path) if COMM.rank == 0 else None)
    mesh = rectangle(2, 1)
    u = np.zeros(mesh.n_nodes + (1 if ODD else 0))
    with pytest.raises((MeshError, ShapeError), match="rank|point_data"):
        write_pvtu(f"{folder}/f.pvtu", mesh, {"u": u}, comm=COMM)
    with pytest.raises(MeshError, match="ending in '.pvtu'"):
        write_pvtu(f"{folder}/f.{'vtu' if ODD else 'pvtu'}", mesh, comm=COMM)
    assert not os.path.exists(f"{folder}/f.pvtu")
    path = write_pvtu(f"{folder}/f.pvtu", mesh, {"u": np.zeros(mesh.n_nodes)}, comm=COMM)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())
    assert oct(os.stat(f"{folder}/f_{COMM.rank}.vtu").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


def test_force_removes_the_per_rank_files_of_an_earlier_run(tmp_path):
    out = COMM.bcast(str(tmp_path / "f") if COMM.rank == 0 else None)
    base = ["run", "topology_compliance", "--nelx", "12", "--nely", "4", "--backend", "petsc", "-q", "--no-pictures",
            "--out", out, "--max-iter", "2"]
    assert cli.main(base) in (0, 1)
    COMM.Barrier()
    if COMM.rank == 0:  # as if a run on more ranks had written here
        for name in (f"checkpoint.rank{COMM.size}.npz", f"fields_{COMM.size}.vtu"):
            open(os.path.join(out, name), "w").close()
    COMM.Barrier()
    assert cli.main([*base, "--force"]) in (0, 1)
    COMM.Barrier()
    names = set(os.listdir(out))
    assert f"checkpoint.rank{COMM.size}.npz" not in names and f"fields_{COMM.size}.vtu" not in names
    assert f"checkpoint.rank{COMM.rank}.npz" in names and "fields.pvtu" in names



def test_a_singular_system_without_dirichlet_conditions_says_so():
    """A pure Neumann chain (no dof fixed): the solve fails and the message points at the boundary conditions."""
    from adjopt.errors import SolverDidNotConverge

    r, R = COMM.rank, COMM.size
    nodes = 4 * r + np.arange(5)
    n_owned = 4 if r < R - 1 else 5
    F = DistributedReducedFunctional.from_parts(LocalSystem(
        np.column_stack([nodes[:-1], nodes[1:]]), np.array([[1.0, -1.0], [-1.0, 1.0]]), "exp", n_owned,
        np.ones(n_owned), [LocalCompliance(np.ones(n_owned))]))
    with pytest.raises(SolverDidNotConverge, match="singular .* Dirichlet"):
        F.value(np.zeros(4 * R))


def test_a_full_vector_that_differs_between_ranks_is_refused_on_every_rank():
    from problems import poisson_inversion

    F = poisson_inversion.build_distributed(n=8, rtol=1e-10).functional
    p = np.linspace(0.0, 0.5, F.n_params)
    J = F.value(p)
    nudged = p.copy()
    if COMM.rank == COMM.size - 1:
        nudged[3] = np.nextafter(nudged[3], 1.0)  # round-off in one rank's own computation of p: accepted
    assert F.value(nudged) == pytest.approx(J, rel=1e-12)
    if COMM.size == 1:
        return
    mixed = p + 0.1 * COMM.rank  # each rank its own vector: would have been cut and mixed silently
    with pytest.raises(ValueError, match=r"p differs between the ranks \(ranks \[1"):
        F.value(mixed)
    with pytest.raises(ValueError, match="dp differs between the ranks"):
        F.hessp(p, np.full(F.n_params, float(COMM.rank)))
