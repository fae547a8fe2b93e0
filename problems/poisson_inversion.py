"""Poisson coefficient inversion: the classic hIPPYlib model problem.

Recover a nodal log-conductivity m from noisy point observations of u, where

    -div(exp(m) grad u) = f = 1   in Omega = (0, 1)^dim,      u = 0 on the boundary,

discretised with P1 triangles (``dim=2``, ``unit_square(n)``) or P1 tetrahedra
(``dim=3``, ``unit_cube(n)``); the boundary dofs are condensed out, so the
state is u on the free (interior) nodes.

* Parameters p = m, one value per mesh node. The matrix sees the element
  values rho_e = mean of m over the cell's nodes (``NodalToElement``, passed
  as ``parameter_map``) through A(rho) = sum_e exp(rho_e) K_e, with K_e the P1
  stiffness matrices restricted to the free dofs.
* True field (see :func:`m_true`): a Gaussian bump
  m(x) = 1.0 * exp(-|x - c|^2 / (2 * 0.15^2)) with c = (0.6, 0.4) in 2D and
  c = (0.6, 0.4, 0.5) in 3D, i.e. the conductivity rises from 1 to e.
* Observations: ``n_obs`` points drawn uniformly in [0.1, 0.9]^dim with
  ``np.random.default_rng(seed)``; data = B u_true + noise * max|B u_true| * N(0, 1)
  (same generator), u_true solved on the same mesh.
* Objective: 0.5 |B u - d|^2 / sigma^2 + alpha R(m) (sigma = noise * max|B u_true|, the noise level) with
  R = TikhonovH1(K) + 0.1 TikhonovL2(M) (``"h1"``, K and M the nodal P1
  stiffness and mass matrices), R = TotalVariation(G, areas, eps=1e-2)
  (``"tv"``, G the P1 gradient operator) or the Bayesian prior (``"bilaplacian"``):
  ``BiLaplacianPrior.from_correlation(mesh, length=0.25, std=1.0)`` (a Matérn field of correlation
  length 0.25 and standard deviation 1, Robin boundary; alpha = 1 by default for it, so that J is the
  negative log-posterior and ``adjopt uq`` gives the Laplace approximation).
* p0 = 0 (conductivity 1 everywhere).
* alpha = 10 by default: with Newton-CG at n = 32 the L2 error of the
  reconstruction against m_true is 0.43 / 0.39 / 0.39 / 0.43 for alpha =
  1 / 3 / 10 / 30 (relative, mass norm); smaller alpha over-fits the noise
  (misfit 3 at alpha 1, against n_obs/2 = 25 for data at the noise level).

Run ``python problems/poisson_inversion.py [n] [dim] [regularization]`` to print J(p0),
|grad J(p0)| and Taylor tables of orders 2 and 3; ``adjopt run poisson_inversion``
optimizes it.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

import adjopt
from adjopt.fem import assemble, body_force, condense, observation_operator, p1_mass, p1_stiffness
from adjopt.fem.observation import p1_gradient_operator
from adjopt.maps import NodalToElement
from adjopt.mesh import Mesh, unit_cube, unit_square
from adjopt.mesh import read as read_mesh
from adjopt.verify import derivative_report

REGULARIZATIONS = ("h1", "tv", "bilaplacian")
#: correlation length and standard deviation of the "bilaplacian" prior
PRIOR_LENGTH = 0.25
PRIOR_STD = 1.0
#: bump of the true log-conductivity: amplitude, width, centre (first dim entries)
BUMP_AMPLITUDE = 1.0
BUMP_WIDTH = 0.15
BUMP_CENTER = (0.6, 0.4, 0.5)
#: weight of the L2 term inside the "h1" regularization, and the TV smoothing
L2_WEIGHT = 0.1
TV_EPS = 1e-2


#: how ``adjopt run poisson_inversion`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", preconditioner="h1", gtol=1e-8)

def m_true(points: np.ndarray) -> np.ndarray:
    """The true log-conductivity at ``points`` (N, dim): a Gaussian bump (see the module docstring)."""
    x = np.asarray(points, dtype=np.float64)
    c = np.asarray(BUMP_CENTER[: x.shape[1]])
    return BUMP_AMPLITUDE * np.exp(-np.sum((x - c) ** 2, axis=1) / (2 * BUMP_WIDTH**2))


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _checked(mesh, mesh_file):
    """A mesh from ``mesh_file`` that this problem can run on (P1 triangles or tetrahedra)."""
    if mesh.cell_type not in ("triangle", "tetra"):
        raise ValueError(f"mesh_file {mesh_file!r} has {mesh.cell_type} cells; this problem needs triangles (2D) or "
                         "tetrahedra (3D)")
    return mesh


def make_mesh(n: int, dim: int, grading: float = 1.0):
    """unit_square(n) (triangles) or unit_cube(n) (tetrahedra), with validated options.

    ``grading`` g >= 1 maps every coordinate x -> x^g: cells shrink towards
    the origin corner (their sizes then differ by a factor of about g n^(g-1)).
    """
    n = _check_int(n, "n (cells per side)", 2)
    if isinstance(dim, bool) or dim not in (2, 3):
        raise ValueError(f"dim must be 2 (unit square, triangles) or 3 (unit cube, tetrahedra), got {dim!r}")
    if not (isinstance(grading, (int, float)) and 1.0 <= grading <= 4.0):
        raise ValueError(f"grading must be a number in [1, 4], got {grading!r}")
    mesh = unit_square(n) if dim == 2 else unit_cube(n)
    if grading != 1.0:
        mesh = Mesh(mesh.points**grading, mesh.cells, mesh.cell_type, mesh.boundaries)
    return mesh


def make_regularization(mesh, regularization: str, alpha: float):
    """alpha * R(m) on nodal m: ``"h1"`` = TikhonovH1(K) + 0.1 TikhonovL2(M), ``"tv"`` = TotalVariation,
    ``"bilaplacian"`` = the Gaussian prior of correlation length 0.25 and standard deviation 1."""
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"unknown regularization {regularization!r}; known: {', '.join(REGULARIZATIONS)}")
    N = mesh.n_nodes
    if regularization == "bilaplacian":
        prior = adjopt.BiLaplacianPrior.from_correlation(mesh, PRIOR_LENGTH, PRIOR_STD)
        return prior if alpha == 1.0 else alpha * prior
    if regularization == "h1":
        K = assemble(mesh.cells, p1_stiffness(mesh), N)
        M = assemble(mesh.cells, p1_mass(mesh), N)
        R = adjopt.TikhonovH1(K) + L2_WEIGHT * adjopt.TikhonovL2(M)
    else:
        R = adjopt.TotalVariation(p1_gradient_operator(mesh), mesh.cell_volumes(), eps=TV_EPS)
    return alpha * R


def pde_operator(mesh):
    """(A, parameter map, dof map): A(rho) = sum_e exp(rho_e) K_e on the free dofs, rho = NodalToElement(m)."""
    dofs = condense(mesh.n_nodes, mesh.boundary("all"))
    A = adjopt.ElementCoefficientMatrix(dofs.restrict(mesh.cells), p1_stiffness(mesh), "exp", n=dofs.n_free)
    pmap = NodalToElement(mesh.cells, n_nodes=mesh.n_nodes)
    return A, pmap, dofs


def solve(A, pmap, m, b) -> np.ndarray:
    """u solving A(M(m)) u = b (b of shape (n,) or (n, k)), for the synthetic data."""
    lu = sla.splu(A.assemble(pmap.forward(np.asarray(m, dtype=np.float64))).tocsc())
    return lu.solve(np.asarray(b, dtype=np.float64))


def observation_points(rng, n_obs: int, dim: int) -> np.ndarray:
    """``n_obs`` points uniform in [0.1, 0.9]^dim."""
    return rng.uniform(0.1, 0.9, size=(n_obs, dim))


def noise_sigma(clean: np.ndarray, noise: float) -> float:
    """The noise standard deviation sigma = noise * max|clean| (1 when noise = 0, no weighting)."""
    sigma = noise * float(np.max(np.abs(clean)))
    return sigma if sigma > 0 else 1.0


def noisy(rng, clean: np.ndarray, noise: float) -> np.ndarray:
    """clean + noise * max|clean| * N(0, 1), same shape as clean."""
    return clean + noise * np.max(np.abs(clean)) * rng.standard_normal(clean.shape)


def _file_digest(path) -> dict:
    """{"mesh_sha1": digest of the file's bytes} for a mesh file, {} without one: a resume checks that the file
    it continues on is the one the run started on (its nodes' order is p's), not only its name."""
    if path is None:
        return {}
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"mesh_sha1": h.hexdigest()[:16]}


def build(n: int = 32, dim: int = 2, n_obs: int = 50, noise: float = 0.01, alpha: float | None = None,
          regularization: str = "h1", seed: int = 0, grading: float = 1.0, mesh_file: str | None = None
          ) -> adjopt.Problem:
    """The Poisson log-conductivity inversion as an :class:`adjopt.Problem` (see the module docstring).

    ``mesh_file``: a triangle or tetrahedron mesh file (read by
    :func:`adjopt.mesh.read`) instead of the unit square or cube of ``n``,
    ``dim`` and ``grading``; u = 0 on its whole boundary, the observation
    points must lie inside it.

    ``alpha`` (the weight of the regularization) defaults to 10 for ``"h1"`` and ``"tv"`` and to 1 for
    ``"bilaplacian"`` (the prior as it is: J is the negative log-posterior).

    Raises
    ------
    ValueError
        ``n < 2``, ``dim`` not 2 or 3, an unknown ``regularization``, ``n_obs < 1``,
        negative ``noise`` or ``alpha``.
    """
    if mesh_file is None:
        mesh = make_mesh(n, dim, grading)
    else:
        mesh = _checked(read_mesh(mesh_file), mesh_file)
        dim = mesh.dim
    n_obs = _check_int(n_obs, "n_obs", 1)
    noise = _check_nonneg(noise, "noise")
    alpha = _check_nonneg((1.0 if regularization == "bilaplacian" else 10.0) if alpha is None else alpha, "alpha")
    reg = make_regularization(mesh, regularization, alpha)

    A, pmap, dofs = pde_operator(mesh)
    b = dofs.restrict_vector(body_force(mesh, 1.0))
    rng = np.random.default_rng(seed)
    pts = observation_points(rng, n_obs, mesh.dim)
    B = observation_operator(mesh, pts)[:, dofs.free]  # u = 0 on the fixed (boundary) dofs
    mt = m_true(mesh.points)
    d_clean = B @ solve(A, pmap, mt, b)
    data = noisy(rng, d_clean, noise)

    # the misfit weighted by 1/sigma^2: 0.5 sum (B u - d)^2 / sigma^2, about n_obs/2 at the truth
    weights = np.full(B.shape[0], noise_sigma(d_clean, noise) ** -2)
    objective = adjopt.SquaredMisfit(data, B=B, W=weights) + reg
    J = adjopt.ReducedFunctional(A, b, objective, parameter_map=pmap)
    meta = {
        "mesh": mesh, "m_true": mt, "observation_points": pts, "data": data, "data_clean": d_clean,
        "observation_operator": B, "regularization": reg, "dofs": dofs,
        "options": dict(n=n, dim=dim, n_obs=n_obs, noise=noise, alpha=alpha, regularization=regularization, seed=seed,
                        grading=grading, mesh_file=mesh_file, **_file_digest(mesh_file)),
    }
    N = mesh.n_nodes
    mass, stiffness = assemble(mesh.cells, p1_mass(mesh), N), assemble(mesh.cells, p1_stiffness(mesh), N)
    return adjopt.Problem(J, np.zeros(N), name=f"poisson_inversion_{dim}d_{regularization}", meta=meta,
                          mass=mass, stiffness=stiffness)


def build_distributed(n: int = 32, dim: int = 2, n_obs: int = 50, noise: float = 0.01, alpha: float | None = None,
                      regularization: str = "h1", seed: int = 0, grading: float = 1.0, mesh_file: str | None = None,
                      partition: str = "slab", comm=None, **solver_options) -> adjopt.Problem:
    """The inversion built rank by rank on PETSc: no rank forms the global mesh, operator or data.

    The same problem as :func:`build` (``regularization="h1"``; TV and the
    Bayesian prior are built serially), for ``mpiexec``: each rank builds its
    slab of the mesh (:func:`adjopt.mesh.unit_square_part` /
    :func:`~adjopt.mesh.unit_cube_part`), its elements in the global free-dof
    numbering, its rows of the nodal-to-element map, of the stiffness and mass
    matrices of the regularization and of the load (the contributions of its
    elements to nodes owned by the next rank sent to it), and the observation
    points inside its slab (all ranks draw the same ``n_obs`` points from
    ``seed``, as :func:`build` does, and keep theirs). The synthetic data comes
    from the distributed solver at m_true, with the noise of :func:`build`.
    ``solver_options`` go to :meth:`DistributedReducedFunctional.from_parts
    <adjopt.backends.petsc.DistributedReducedFunctional.from_parts>`.

    The numbering of nodes (the parameters) and of the free dofs is the
    serial one; the observations are ordered by rank (``meta["observation_index"]``
    holds this rank's points' numbers in :func:`build`'s order). The
    functional takes the full parameter vector on every rank (the serial
    interface); p0 is replicated.

    ``mesh_file``: as in :func:`build`; rank 0 reads it, partitions the cells
    (``partition``: ``"slab"`` or ``"graph"``, see
    :func:`adjopt.mesh.read_part`) and sends each rank its part. The global
    numbering is then :func:`~adjopt.mesh.read_part`'s renumbering of the
    file's (``meta["part"].source_nodes`` maps back); an observation point
    belongs to the lowest rank whose cells hold it.
    """
    from mpi4py import MPI

    from adjopt.backends.petsc import DistributedReducedFunctional
    from adjopt.backends.petsc.parts import (
        LocalMisfit,
        LocalQuadratic,
        LocalSystem,
        agree,
        free_numbering,
        ownership,
        raise_first,
        rows_to_owners,
        same_options,
        sum_to_owners,
    )
    from adjopt.fem.observation import locate_points
    from adjopt.mesh import read_part, unit_cube_part, unit_square_part

    comm = MPI.COMM_WORLD if comm is None else comm
    same_options(comm, "poisson_inversion.build_distributed", n=n, dim=dim, n_obs=n_obs, noise=noise, alpha=alpha,
                 regularization=regularization, seed=seed, grading=grading, mesh_file=mesh_file, partition=partition,
                 **solver_options)
    n = _check_int(n, "n (cells per side)", 2)
    if isinstance(dim, bool) or dim not in (2, 3):
        raise ValueError(f"dim must be 2 (unit square, triangles) or 3 (unit cube, tetrahedra), got {dim!r}")
    if grading != 1.0:
        raise NotImplementedError(f"build_distributed builds the uniform mesh (grading 1); grading={grading!r} is "
                                  "built serially (build(), then adjopt.backends.petsc.distribute)")
    if regularization != "h1":
        raise NotImplementedError(f"build_distributed builds the 'h1' regularization; {regularization!r} is built "
                                  "serially (build(), then adjopt.backends.petsc.distribute)")
    n_obs = _check_int(n_obs, "n_obs", 1)
    noise = _check_nonneg(noise, "noise")
    alpha = _check_nonneg(10.0 if alpha is None else alpha, "alpha")
    if partition not in ("slab", "graph"):
        raise ValueError(f"partition must be 'slab' or 'graph', got {partition!r}")
    if mesh_file is None and partition != "slab":
        raise ValueError(f"partition={partition!r} partitions a mesh file (mesh_file=, --mesh-file); the built-in mesh is split in "
                         "slabs of cell layers: leave partition out, or give a mesh file")
    if mesh_file is None:
        part = unit_square_part(n, comm=comm) if dim == 2 else unit_cube_part(n, comm=comm)
    else:
        part = read_part(mesh_file, comm=comm, partition=partition)
        error = None
        try:
            _checked(part.mesh, mesh_file)
        except ValueError as exc:
            error = exc
        raise_first(comm, error)
        dim = part.mesh.dim
    mesh, nodes, n_own = part.mesh, part.nodes, part.n_owned
    node_ranges = ownership(comm, part.node_start, n_own)
    free, n_free = free_numbering(comm, nodes, np.isin(np.arange(mesh.n_nodes), mesh.boundary("all")), n_own)
    owned_free = free[:n_own] >= 0

    # operator, parameter map (rows of this rank's elements, global node columns), load
    k = dim + 1
    E = mesh.n_cells
    L = sp.csr_array((np.full(E * k, 1.0 / k), nodes[mesh.cells].ravel(), np.arange(0, E * k + 1, k)),
                     shape=(E, part.n_global_nodes))
    b = sum_to_owners(comm, nodes, body_force(mesh, 1.0), node_ranges)[owned_free]

    # regularization: this rank's rows of alpha (K + 0.1 M), completed with the next rank's contributions
    def rows(local):
        S = assemble(mesh.cells, local, mesh.n_nodes).tocoo()
        S = sp.coo_array((S.data, (S.row, nodes[S.col])), shape=(mesh.n_nodes, part.n_global_nodes))
        return rows_to_owners(comm, S, nodes, node_ranges)

    K, M = rows(p1_stiffness(mesh)), rows(p1_mass(mesh))
    terms = [LocalQuadratic(K, c=alpha), LocalQuadratic(M, c=L2_WEIGHT * alpha)]

    # observations: every rank draws the points of build() and keeps those in its slab [y_k0, y_k1), or (a mesh
    # file's part) those that the lowest rank whose cells hold them is this one
    rng = np.random.default_rng(seed)
    pts = observation_points(rng, n_obs, dim)
    if part.layers is None:
        holder = np.where(locate_points(mesh, pts) >= 0, part.rank, part.size).astype(np.int64)
        lowest = np.empty_like(holder)
        comm.Allreduce(holder, lowest, op=MPI.MIN)
        agree(comm, bool(np.all(lowest < part.size)), f"observation points {np.flatnonzero(lowest == part.size)[:10].tolist()} "
              f"are outside the mesh {mesh_file!r} (they are drawn in [0.1, 0.9]^{dim})", ValueError)
        mine = np.flatnonzero(lowest == part.rank)
    else:
        lo, hi = mesh.points[0, -1], mesh.points[-1, -1]
        last = part.rank == part.size - 1
        mine = np.flatnonzero((pts[:, -1] >= lo) & ((pts[:, -1] <= hi) if last else (pts[:, -1] < hi)))
    B = observation_operator(mesh, pts[mine]).tocoo()
    keep = free[B.col] >= 0  # u = 0 on the boundary
    B = sp.csr_array((B.data[keep], (B.row[keep], free[B.col[keep]])), shape=(mine.size, n_free_total(comm, n_free)))
    terms.insert(0, LocalMisfit(np.zeros(mine.size), B, np.ones(mine.size)))
    system = LocalSystem(free[mesh.cells], p1_stiffness(mesh), "exp", n_free, b, terms, parameter_matrix=L,
                         n_owned_params=n_own, gram={"mass": M, "stiffness": K})  # build()'s mass and stiffness
    del K, M
    J = DistributedReducedFunctional.from_parts(system, comm=comm, **solver_options)
    del system, terms, L  # PETSc holds its copies: free the scipy ones before the data solve (its GAMG setup)

    # the synthetic data: the distributed state at m_true, then build()'s noise
    mt = m_true(mesh.points[:n_own])
    v = J.create_parameter_vec()
    v.setArray(mt)
    J.value_vec(v)
    u = J._st.u_ghost[np.searchsorted(J._ghosts, B.indices)]
    d_clean = np.add.reduceat(B.data * u, B.indptr[:-1]) if B.nnz else np.zeros(mine.size)
    d_clean[np.diff(B.indptr) == 0] = 0.0
    top = comm.allreduce(float(np.max(np.abs(d_clean), initial=0.0)), op=MPI.MAX)
    normals = rng.standard_normal(n_obs)[mine]
    data = d_clean + noise * top * normals
    sigma = noise * top if noise * top > 0 else 1.0
    J.set_misfit(data, np.full(mine.size, sigma**-2))
    node_free = free.copy()

    def local_fields(F, x):
        """This rank's piece of fields.pvtu: m, m_true, state and adjoint on its nodes (ghosts included); F the
        functional (x the full vector) or its block view (x this rank's block)."""
        return ({"parameter": F.parameter_values(x, nodes), "m_true": m_true(mesh.points),
                 "state": F.local_values(x, "state", node_free), "adjoint": F.local_values(x, "adjoint", node_free)}, {})

    meta = {"part": part, "local_fields": local_fields, "observation_index": mine, "observation_points": pts[mine], "data": data,
            "data_clean": d_clean, "m_true": mt, "distributed": True,
            # a mesh file's part: the file's node of each free dof this rank owns, in the free dofs' order (the
            # state and adjoint go back to the serial numbering: the file's free nodes in ascending order)
            "free_source_nodes": (None if part.source_nodes is None else
                                  part.source_nodes[:n_own][owned_free][np.argsort(free[:n_own][owned_free])]),
            # the partition of a mesh file decides the numbering of p (and of the per-rank checkpoints): a resume
            # with another one would read each block into other nodes
            "options": dict(n=n, dim=dim, n_obs=n_obs, noise=noise, alpha=alpha, regularization=regularization,
                            seed=seed, grading=1.0, mesh_file=mesh_file,
                            **({} if mesh_file is None else {"partition": partition}),
                            **comm.bcast(_file_digest(mesh_file) if comm.rank == 0 else None))}
    return adjopt.Problem(J, np.zeros(part.n_global_nodes), name=f"poisson_inversion_{dim}d_{regularization}",
                          meta=meta)


def n_free_total(comm, n_owned_free: int) -> int:
    """The global number of free dofs (a sum over the ranks)."""
    return int(comm.allreduce(int(n_owned_free)))


def main(argv=None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if len(args) > 0 else 32
    dim = int(args[1]) if len(args) > 1 else 2
    reg = args[2] if len(args) > 2 else "h1"
    problem = build(n=n, dim=dim, regularization=reg)
    J, p = problem.functional, problem.p0
    print(f"{problem.name}: {p.size} parameters, {J.matrix.shape[0]} free dofs, "
          f"{problem.meta['observation_points'].shape[0]} observations")
    print(f"J(m_true)    = {J.value(problem.meta['m_true']):.10e}")
    print(derivative_report(J, p))


if __name__ == "__main__":
    main()
