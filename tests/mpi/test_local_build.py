"""Rank-local builds (no rank forms the global problem) against the serial build.

Run under ``mpiexec -n 2 python -m pytest tests/mpi`` (CI) and on one rank
with plain pytest. Assertions are on gathered or reduced data, so the ranks
pass or fail together.
"""

import numpy as np
import pytest
import scipy.sparse as sp

petsc4py = pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")

from problems import advection_diffusion_source, poisson_inversion, topology_compliance  # noqa: E402

from adjopt.backends.partition import ContiguousNumbering, Numbering  # noqa: E402
from adjopt.backends.petsc import DistributedReducedFunctional  # noqa: E402
from adjopt.backends.petsc.parts import (  # noqa: E402
    DistributedVolume,
    LocalCompliance,
    LocalMisfit,
    LocalQuadratic,
    LocalSystem,
    free_numbering,
    ownership,
    rows_to_owners,
    sum_to_owners,
)
from adjopt.errors import NonFiniteError, PartitionError, PatternError, ShapeError  # noqa: E402
from adjopt.mesh import unit_square_part  # noqa: E402

COMM = MPI.COMM_WORLD
RTOL = 1e-12


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def _compare(F, J, p, dp):
    assert abs(F.value(p) - J.value(p)) <= 1e-8 * abs(J.value(p))
    assert rel(F.gradient(p), J.gradient(p)) <= 1e-8
    assert rel(F.hessp(p, dp), J.hessp(p, dp)) <= 1e-8


@pytest.mark.parametrize("case, sizes", [("mbb", dict(nelx=24, nely=8)), ("mbb3d", dict(nelx=8, nely=4, nelz=4))])
@pytest.mark.parametrize("filter", [True, False])
def test_topology_local_build_equals_the_serial_build(case, sizes, filter):
    local = topology_compliance.build_distributed(case, filter=filter, rtol=RTOL, **sizes)
    serial = topology_compliance.build(case, filter=filter, solver="superlu", **sizes)
    rng = np.random.default_rng(1)
    p = rng.uniform(0.2, 0.9, serial.p0.size)
    _compare(local.functional, serial.functional, p, rng.standard_normal(p.size))
    assert local.functional.self_adjoint  # compliance with the load: no adjoint solves
    assert local.functional.stats.solves["adjoint"] == 0
    (vol, bound), (svol, sbound) = local.constraints[0], serial.constraints[0]
    assert bound == sbound and abs(vol.value(p) - svol.value(p)) <= 1e-14
    assert np.allclose(vol.gradient(p), svol.gradient(p), rtol=0, atol=1e-16)
    assert np.array_equal(local.p0, serial.p0)
    assert all(np.array_equal(a, b) for a, b in zip(local.bounds, serial.bounds))
    assert local.functional.layout.dofs.size == serial.functional.matrix.shape[0]


@pytest.mark.parametrize("dim, n", [(2, 16), (3, 6)])
def test_poisson_local_build_equals_the_serial_build(dim, n):
    local = poisson_inversion.build_distributed(n=n, dim=dim, n_obs=30, rtol=1e-13)
    serial = poisson_inversion.build(n=n, dim=dim, n_obs=30)
    idx = np.concatenate(COMM.allgather(local.meta["observation_index"]))
    assert np.array_equal(np.sort(idx), np.arange(30))  # every point on exactly one rank
    data = np.concatenate(COMM.allgather(local.meta["data"]))
    assert rel(data, serial.meta["data"][idx]) <= 1e-10  # the distributed solve of the synthetic data
    rng = np.random.default_rng(3)
    p = 0.3 * rng.standard_normal(serial.p0.size)
    _compare(local.functional, serial.functional, p, rng.standard_normal(p.size))
    assert np.array_equal(local.p0, serial.p0)


def test_advection_source_local_build_equals_the_serial_build():
    from adjopt.verify import taylor_test

    local = advection_diffusion_source.build_distributed(n=14, n_obs=40, rtol=1e-13)
    serial = advection_diffusion_source.build(n=14, n_obs=40)
    F = local.functional
    assert not F.symmetric and F.R is not None and not F.self_adjoint  # SUPG: transposed solves; b(m) = R m
    observed = np.concatenate(COMM.allgather(local.meta["observed"]))
    assert np.array_equal(observed, np.flatnonzero(np.isin(serial.meta["dofs"].free, serial.meta["observed"])))
    rng = np.random.default_rng(4)
    p = 0.5 * rng.standard_normal(serial.p0.size)
    _compare(F, serial.functional, p, rng.standard_normal(p.size))
    for order in (2, 3):  # gradient and Hessian action of the distributed functional itself
        res = taylor_test(F, p, order=order, seed=1)
        assert res.passed, (order, res.rate, res.exact)


@pytest.mark.parametrize("options", [dict(n=3, n_obs=2), dict(n=8, n_obs=20, velocity=(0.0, 0.0)),
                                     dict(n=8, n_obs=20, kappa=1e-3)])
def test_advection_source_local_build_on_small_meshes_and_extreme_flows(options):
    # n = 3: some rank owns no free node; velocity 0: a symmetric A (GMRES with additive Schwarz all the same)
    local = advection_diffusion_source.build_distributed(rtol=1e-13, **options)
    serial = advection_diffusion_source.build(**options)
    rng = np.random.default_rng(5)
    p = rng.standard_normal(serial.p0.size)
    _compare(local.functional, serial.functional, p, rng.standard_normal(p.size))


@pytest.mark.parametrize("options, error, match", [
    (dict(regularization="bilaplacian"), NotImplementedError, "built serially"),
    (dict(n=1), ValueError, "n must be an integer >= 2"),
    (dict(kappa=0.0), ValueError, "kappa must be positive"),
    (dict(velocity=(1.0, 0.0, 0.0)), ValueError, "velocity must be a 2-vector"),
    (dict(n=4, n_obs=10), ValueError, r"n_obs must be between 1 and 9"),
    (dict(alpha=-1.0), ValueError, "alpha must be a finite number"),
])
def test_the_advection_source_local_build_checks_its_options(options, error, match):
    with pytest.raises(error, match=match):
        advection_diffusion_source.build_distributed(**options)


def test_a_rhs_matrix_is_checked_on_every_rank():
    args, _ = _tiny_system()
    n_params = 4 * COMM.size
    good = sp.csr_array(np.ones((args["n_owned_dofs"], n_params)))
    with pytest.raises(ShapeError, match="rhs_matrix must have"):
        LocalSystem(**dict(args, rhs_matrix=sp.csr_array(np.ones((args["n_owned_dofs"] + 1, n_params)))))
    with pytest.raises(NonFiniteError, match="rhs_matrix holds NaN"):
        LocalSystem(**dict(args, rhs_matrix=sp.csr_array(np.full((args["n_owned_dofs"], n_params), np.nan))))
    with pytest.raises(TypeError, match="rhs_matrix must be a scipy sparse"):
        LocalSystem(**dict(args, rhs_matrix=np.ones((args["n_owned_dofs"], n_params))))
    wide = sp.csr_array(np.ones((args["n_owned_dofs"], n_params + 1)))
    with pytest.raises(PatternError, match="rhs_matrix has .* columns"):
        DistributedReducedFunctional.from_parts(LocalSystem(**dict(args, rhs_matrix=wide)), pc_type="jacobi")
    one = dict(args, rhs_matrix=good) if COMM.rank == 0 else args  # a rhs_matrix on one rank only
    if COMM.size > 1:
        with pytest.raises(ValueError, match="the ranks' LocalSystems differ"):
            DistributedReducedFunctional.from_parts(LocalSystem(**one), pc_type="jacobi")


def test_build_distributed_refuses_what_it_does_not_build():
    with pytest.raises(NotImplementedError, match="build_distributed builds the cases"):
        topology_compliance.build_distributed("cantilever3d")
    with pytest.raises(ValueError, match="unknown case"):
        topology_compliance.build_distributed("bridge")
    with pytest.raises(ValueError, match="nelz is for the 3D case only"):
        topology_compliance.build_distributed("mbb", nelz=4)
    with pytest.raises(NotImplementedError, match="'h1' regularization"):
        poisson_inversion.build_distributed(n=8, regularization="tv")
    with pytest.raises(ValueError, match="dim must be 2"):
        poisson_inversion.build_distributed(n=8, dim=4)


def test_ownership_helpers_match_the_serial_numbering():
    part = unit_square_part(9, comm=COMM)
    mesh, nodes = part.mesh, part.nodes
    ranges = ownership(COMM, part.node_start, part.n_owned)
    assert ranges[-1] == part.n_global_nodes
    fixed = np.isin(np.arange(mesh.n_nodes), mesh.boundary("all"))
    free, n_free = free_numbering(COMM, nodes, fixed, part.n_owned)
    # the serial condensation numbers the free nodes in order: 8 x 8 interior nodes of a 10 x 10 grid
    gx, gy = nodes % 10, nodes // 10
    interior = (gx > 0) & (gx < 9) & (gy > 0) & (gy < 9)
    assert np.array_equal(free >= 0, interior)
    assert np.array_equal(free[interior], (gy[interior] - 1) * 8 + gx[interior] - 1)
    assert COMM.allreduce(n_free) == 64
    # sums at ghost nodes reach their owners: every node receives the number of cells around it, as serially
    counts = np.bincount(mesh.cells.ravel(), minlength=mesh.n_nodes).astype(float)
    mine = sum_to_owners(COMM, nodes, counts, ranges)
    full = np.concatenate(COMM.allgather(mine))
    from adjopt.mesh import unit_square

    whole = unit_square(9)
    assert np.array_equal(full, np.bincount(whole.cells.ravel(), minlength=whole.n_nodes))
    # rows of a local matrix completed by the other ranks' contributions
    S = sp.coo_array((np.ones(mesh.cells.size), (mesh.cells.ravel(), nodes[mesh.cells.ravel()])),
                     shape=(mesh.n_nodes, part.n_global_nodes))
    R = sp.vstack(COMM.allgather(rows_to_owners(COMM, S, nodes, ranges)))
    W = sp.coo_array((np.ones(whole.cells.size), (whole.cells.ravel(), whole.cells.ravel())),
                     shape=(whole.n_nodes, whole.n_nodes)).tocsr()
    assert abs(R - W).max() == 0


def test_contiguous_numbering_is_the_identity():
    num = Numbering.contiguous([0, 3, 7])
    assert isinstance(num, ContiguousNumbering) and num.size == 7 and num.local_size(1) == 4
    assert np.array_equal(num.owned(1), [3, 4, 5, 6]) and np.array_equal(num.order, np.arange(7))
    with pytest.raises(PartitionError, match="start at 0"):
        ContiguousNumbering([1, 3])
    with pytest.raises(PartitionError, match="not decrease"):
        ContiguousNumbering([0, 3, 2])


def _tiny_system(**change):
    """A 1D chain of 2-node elements, this rank's block of 4 elements (global dofs: interior nodes)."""
    r, R = COMM.rank, COMM.size
    E = 4
    first = r * E
    nodes = first + np.arange(E + 1)  # nodes 0 .. 4R; node 0 and 4R are fixed
    n_glob = E * R + 1
    free = np.where((nodes == 0) | (nodes == n_glob - 1), -1, nodes - 1)
    conn = np.column_stack([free[:-1], free[1:]])
    owned_free = np.arange(first, first + E)
    owned_free = owned_free[(owned_free > 0) & (owned_free < n_glob - 1)] - 1
    n_owned = owned_free.size
    args = dict(conn=conn, local=np.array([[1.0, -1.0], [-1.0, 1.0]]), coefficient="exp", n_owned_dofs=n_owned,
                rhs=np.ones(n_owned), terms=[LocalCompliance(np.ones(n_owned))])
    args.update(change)
    return args, owned_free


def test_from_parts_validates_its_input():
    args, _ = _tiny_system()
    F = DistributedReducedFunctional.from_parts(LocalSystem(**args), rtol=RTOL, pc_type="jacobi")
    p = np.zeros(F.n_params)
    # A(0) is the 1D Laplacian (h = 1): u_i = i (N - i) / 2, compliance b^T u with b = 1, N = 4R
    N = 4 * COMM.size
    i = np.arange(1, N)
    assert abs(F.value(p) - np.sum(i * (N - i) / 2)) <= 1e-9 * F.value(p)
    with pytest.raises(ShapeError, match="rhs must have shape"):
        LocalSystem(**dict(args, rhs=np.ones(args["n_owned_dofs"] + 1)))
    with pytest.raises(NonFiniteError, match="rhs holds NaN"):
        LocalSystem(**dict(args, rhs=np.full(args["n_owned_dofs"], np.nan)))
    with pytest.raises(TypeError, match="terms are LocalMisfit"):
        LocalSystem(**dict(args, terms=["compliance"]))
    with pytest.raises(ShapeError, match="one value per owned dof"):
        LocalSystem(**dict(args, terms=[LocalCompliance(np.ones(args["n_owned_dofs"] + 2))]))
    with pytest.raises(ValueError, match="n_owned_params"):
        LocalSystem(**dict(args, parameter_matrix=sp.eye_array(4, format="csr")))
    with pytest.raises(ShapeError, match="conn must be an integer array"):
        LocalSystem(**dict(args, conn=args["conn"].astype(float)))
    with pytest.raises(PatternError, match="conn names dof"):
        DistributedReducedFunctional.from_parts(LocalSystem(**dict(args, conn=args["conn"] + 100)))
    empty = dict(args, conn=args["conn"][:0]) if COMM.rank == COMM.size - 1 else args  # one rank without elements
    with pytest.raises(PatternError, match="has no elements"):
        DistributedReducedFunctional.from_parts(LocalSystem(**empty))
    with pytest.raises(TypeError, match="must be a LocalSystem"):
        DistributedReducedFunctional.from_parts(args)
    with pytest.raises(PatternError, match="one column per global parameter"):
        DistributedReducedFunctional.from_parts(LocalSystem(**dict(
            args, parameter_matrix=sp.eye_array(4, 5, format="csr"), n_owned_params=4)))


def test_local_system_keeps_copies_of_what_it_is_given():
    args, _ = _tiny_system()
    rhs, load = np.ones(args["n_owned_dofs"]), np.ones(args["n_owned_dofs"])
    system = LocalSystem(**dict(args, rhs=rhs, terms=[LocalCompliance(load)]))
    F = DistributedReducedFunctional.from_parts(system, rtol=RTOL, pc_type="jacobi")
    p = np.zeros(F.n_params)
    before = F.value(p)
    rhs[:] = 5.0
    load[:] = -3.0
    F2 = DistributedReducedFunctional.from_parts(system, rtol=RTOL, pc_type="jacobi")
    assert F2.value(p) == pytest.approx(before, rel=1e-9)


def test_misfit_and_quadratic_terms_of_a_local_system():
    """J = 0.5 |u - d|^2 + 0.5 c p^T p on the chain, against the same problem assembled densely."""
    args, owned_free = _tiny_system()
    n = args["n_owned_dofs"]
    d = np.sin(owned_free + 1.0)
    terms = [LocalMisfit(d, None, 2.0 * np.ones(n), c=0.5), LocalQuadratic(None, 0.1, c=3.0)]
    F = DistributedReducedFunctional.from_parts(LocalSystem(**dict(args, terms=terms)), rtol=RTOL, pc_type="jacobi")
    N = 4 * COMM.size
    rng = np.random.default_rng(0)
    p = 0.3 * rng.standard_normal(N)
    dfull = np.sin(np.arange(N - 1) + 1.0)

    def dense(p):
        A = np.zeros((N + 1, N + 1))
        for e in range(N):
            A[e:e + 2, e:e + 2] += np.exp(p[e]) * np.array([[1.0, -1.0], [-1.0, 1.0]])
        u = np.linalg.solve(A[1:-1, 1:-1], np.ones(N - 1))
        return 0.5 * 0.5 * 2.0 * np.sum((u - dfull) ** 2) + 0.5 * 3.0 * np.sum((p - 0.1) ** 2)

    assert F.value(p) == pytest.approx(dense(p), rel=1e-9)
    h = 1e-6
    fd = np.array([(dense(p + h * e) - dense(p - h * e)) / (2 * h) for e in np.eye(N)])
    assert rel(F.gradient(p), fd) <= 1e-6
    Hreg = F.regularization_hessian()
    v = F.to_vec(np.ones(N))
    out = v.duplicate()
    Hreg.mult(v, out)
    assert np.allclose(F.to_numpy(out), 3.0)
    with pytest.raises(ShapeError, match="this rank's"):
        F.set_misfit(np.ones(n + 1))
    with pytest.raises(IndexError, match="1 misfit term"):
        F.set_misfit(d, which=1)
    F.set_misfit(dfull[owned_free], 2.0 * np.ones(n))
    assert F.value(p) == pytest.approx(dense(p), rel=1e-9)


def test_distributed_volume():
    part_cells = np.arange(3) + 3 * COMM.rank
    m = 3 * COMM.size
    vol = DistributedVolume(COMM, np.array([1.0, 2.0, 1.0]), None, n_params=m, first=int(part_cells[0]))
    p = np.linspace(0, 1, m)
    v = np.tile([1.0, 2.0, 1.0], COMM.size)
    assert vol.value(p) == pytest.approx(v @ p / v.sum(), rel=1e-14)
    assert np.allclose(vol.gradient(p), v / v.sum())
    with pytest.raises(ShapeError, match="p must have length"):
        vol.value(np.ones(m + 1))
    with pytest.raises(ValueError, match="must be positive"):
        DistributedVolume(COMM, np.zeros(3), None, n_params=m)


def test_a_failing_solver_setup_is_a_clear_error():
    from petsc4py import PETSc

    from adjopt.errors import SolverDidNotConverge

    problem = topology_compliance.build_distributed("mbb", nelx=12, nely=4)
    opts = PETSc.Options()
    opts["matptap_via"] = "nonsense"  # GAMG's Galerkin product fails in its setup, on every rank
    try:
        with pytest.raises(SolverDidNotConverge, match="solver setup .* failed with PETSc error"):
            problem.functional.value(problem.p0)
    finally:
        opts.delValue("matptap_via")
    assert problem.functional.value(problem.p0) > 0  # and it recovers once the option is gone
