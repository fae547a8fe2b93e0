"""Recover a source field from observations of a steady advection-diffusion state.

    -div(kappa grad u) + v . grad u = m  in the unit square,  u = 0 on the boundary,

discretised with P1 triangles and SUPG (the operator is nonsymmetric, so the
adjoint solves are real transposed solves). The source m is a nodal P1
field; the SUPG-consistent load is linear in m,

    b_i(m) = sum_j L_ij m_j,   L_ij = int N_j (N_i + tau v . grad N_i),

so b(m) = L[free, :] m (``AffineVector``) and A is constant. Observations of
u at ``n_obs`` free nodes (seeded), with Gaussian noise, and an H1 + L2
Tikhonov regularization (``regularization="h1"``, the default):

    J(m) = 0.5 |B u(m) - d|^2 + alpha (0.5 m^T K m + 0.05 m^T M m),

or the Bayesian version (``regularization="bilaplacian"``): the misfit weighted by the noise,
0.5 |B u(m) - d|^2 / sigma^2 with sigma = noise max|B u_true|, plus the Gaussian prior
``BiLaplacianPrior.from_correlation(mesh, 0.2, 1.0)`` (alpha = 1 by default: J is the negative
log-posterior, and ``adjopt uq advection_diffusion_source --regularization bilaplacian`` gives the
Laplace approximation; the problem is linear in m, so that approximation is the posterior itself).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.fem.elements import _p1_gradients
from adjopt.verify import derivative_report

#: how ``adjopt run advection_diffusion_source`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", gtol=1e-8)

def true_source(points: np.ndarray) -> np.ndarray:
    """Two Gaussian blobs upstream of the observation region."""
    x, y = points[:, 0], points[:, 1]
    return np.exp(-((x - 0.3) ** 2 + (y - 0.3) ** 2) / 0.01) + 0.5 * np.exp(-((x - 0.3) ** 2 + (y - 0.7) ** 2) / 0.02)


def supg_load_matrix(msh, velocity, kappa) -> sp.csr_array:
    """L with L_ij = int N_j (N_i + tau v . grad N_i) (the SUPG load as a matrix of the nodal source)."""
    _, tau = fem.advection_diffusion(msh, velocity, kappa, return_tau=True)
    grad, vol = _p1_gradients(msh)
    vg = np.einsum("ead,d->ea", grad, np.asarray(velocity, dtype=float))
    k = msh.nodes_per_cell
    local = fem.p1_mass(msh) + (tau * vol / k)[:, None, None] * vg[:, :, None] * np.ones((1, 1, k))
    return fem.assemble(msh.cells, local, msh.n_nodes)


REGULARIZATIONS = ("h1", "bilaplacian")
#: correlation length and standard deviation of the "bilaplacian" prior
PRIOR_LENGTH = 0.2
PRIOR_STD = 1.0


def _checked_options(n, kappa, velocity, alpha, regularization):
    """(n, kappa, velocity as an array, alpha with its default) of :func:`build`, checked."""
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"unknown regularization {regularization!r}; known: {', '.join(REGULARIZATIONS)}")
    if alpha is None:
        alpha = 1.0 if regularization == "bilaplacian" else 1e-4
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n}")
    if not kappa > 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    velocity = np.asarray(velocity, dtype=float)
    if velocity.shape != (2,):
        raise ValueError(f"velocity must be a 2-vector, got shape {velocity.shape}")
    return int(n), kappa, velocity, alpha


def build(n: int = 32, kappa: float = 0.01, velocity=(1.0, 0.5), n_obs: int = 60, noise: float = 0.01,
          alpha: float | None = None, seed: int = 0, regularization: str = "h1") -> adjopt.Problem:
    """The source-recovery problem on an n x n triangle mesh.

    Parameters
    ----------
    n
        Cells per side (>= 2).
    kappa
        Diffusion (> 0); the cell Peclet number is |v| h / (2 kappa).
    velocity
        Constant velocity (2,).
    n_obs
        Number of observed free nodes (drawn with ``seed``).
    noise
        Noise level relative to max |B u_true|.
    alpha
        Regularization weight (default 1e-4 for ``"h1"``, 1 for ``"bilaplacian"``).
    regularization
        ``"h1"`` (Tikhonov H1 + L2) or ``"bilaplacian"`` (the Gaussian prior, noise-weighted misfit).
    """
    n, kappa, velocity, alpha = _checked_options(n, kappa, velocity, alpha, regularization)
    msh = meshes.unit_square(n, cell="triangle")
    N = msh.n_nodes
    dofs = fem.condense(N, msh.boundary("all"))
    free = dofs.free
    if not 1 <= n_obs <= free.size:
        raise ValueError(f"n_obs must be between 1 and {free.size} (the free nodes), got {n_obs}")
    Afull = fem.assemble(msh.cells, fem.advection_diffusion(msh, velocity, kappa), N)
    A = adjopt.ConstantMatrix(Afull[free][:, free], n_params=N)
    b = adjopt.AffineVector(None, supg_load_matrix(msh, velocity, kappa)[free])
    rng = np.random.default_rng(seed)
    obs = np.sort(rng.choice(free.size, size=n_obs, replace=False))
    B = sp.csr_array((np.ones(n_obs), (np.arange(n_obs), obs)), shape=(n_obs, free.size))
    m_true = true_source(msh.points)
    u_true = adjopt.ReducedFunctional(A, b, adjopt.Norm()).state(m_true)
    clean = B @ u_true
    data = clean + noise * np.abs(clean).max() * rng.standard_normal(n_obs)
    K = fem.assemble(msh.cells, fem.p1_stiffness(msh), N)
    M = fem.assemble(msh.cells, fem.p1_mass(msh), N)
    if regularization == "bilaplacian":
        sigma = noise * np.abs(clean).max() if noise > 0 else 1.0
        prior = adjopt.BiLaplacianPrior.from_correlation(msh, PRIOR_LENGTH, PRIOR_STD)
        reg = prior if alpha == 1.0 else alpha * prior
        objective = adjopt.SquaredMisfit(data, B=B, W=np.full(n_obs, sigma ** -2.0)) + reg
    else:
        reg = alpha * (adjopt.TikhonovH1(K) + 0.1 * adjopt.TikhonovL2(M))
        objective = adjopt.SquaredMisfit(data, B=B) + reg
    J = adjopt.ReducedFunctional(A, b, objective)
    name = "advection_diffusion_source" + ("_bilaplacian" if regularization == "bilaplacian" else "")
    return adjopt.Problem(J, np.zeros(N), name=name,
                          meta=dict(mesh=msh, m_true=m_true, observed=free[obs], velocity=velocity, kappa=kappa, dofs=dofs,
                                    options=dict(n=n, kappa=kappa, velocity=tuple(velocity), n_obs=n_obs, noise=noise,
                                                 alpha=alpha, seed=seed, regularization=regularization),
                                    regularization=reg),
                          # the Bayesian version measures steps in L2 (Newton-CG's default preconditioner then)
                          **(dict(mass=M, stiffness=K) if regularization == "bilaplacian" else {}))


def build_distributed(n: int = 32, kappa: float = 0.01, velocity=(1.0, 0.5), n_obs: int = 60, noise: float = 0.01,
                      alpha: float | None = None, seed: int = 0, regularization: str = "h1", comm=None,
                      **solver_options) -> adjopt.Problem:
    """The source recovery built rank by rank on PETSc: no rank forms the global mesh, operator or data.

    The problem of :func:`build` (``regularization="h1"``; the Bayesian prior is
    built serially), for ``mpiexec``: each rank builds its slab of the mesh
    (:func:`adjopt.mesh.unit_square_part`), the SUPG matrices of its elements
    (A is constant: the element coefficient is exp(0) = 1 with a zero
    parameter map), its rows of the load matrix (b(m) = R m:
    ``LocalSystem.rhs_matrix``) and of the regularization, and the observed
    nodes it owns (every rank draws build()'s nodes and keeps its own). The
    synthetic data come from the distributed solver at the true source, with
    build()'s noise. A is nonsymmetric: GMRES, transposed solves for
    the adjoints; the preconditioner is additive Schwarz (``pc_type="asm"``)
    unless ``solver_options`` say otherwise (GAMG does not converge on the
    transposed operator). The numbering of nodes and free dofs is the serial one.
    """
    from mpi4py import MPI

    from adjopt.backends.petsc import DistributedReducedFunctional
    from adjopt.backends.petsc.parts import (
        LocalMisfit,
        LocalQuadratic,
        LocalSystem,
        free_numbering,
        ownership,
        rows_to_owners,
        same_options,
    )

    comm = MPI.COMM_WORLD if comm is None else comm
    same_options(comm, "advection_diffusion_source.build_distributed", n=n, kappa=kappa, velocity=velocity,
                 n_obs=n_obs, noise=noise, alpha=alpha, seed=seed, regularization=regularization, **solver_options)
    if regularization != "h1":
        raise NotImplementedError(f"build_distributed builds the 'h1' regularization; {regularization!r} is built "
                                  "serially (build(), then adjopt.backends.petsc.distribute)")
    n, kappa, velocity, alpha = _checked_options(n, kappa, velocity, alpha, regularization)
    n_free_global = (n - 1) ** 2  # the interior nodes of the unit square
    if not 1 <= n_obs <= n_free_global:
        raise ValueError(f"n_obs must be between 1 and {n_free_global} (the free nodes), got {n_obs}")
    # A is nonsymmetric (SUPG): GAMG took 386 GMRES iterations for the forward solve at n = 24 and its transposed
    # application did not converge in 2000 for the adjoint; additive Schwarz (ILU blocks) took 12 and 13 (144 and
    # 165 at n = 128, on 2 ranks)
    solver_options.setdefault("pc_type", "asm")
    solver_options.setdefault("ksp_type", "gmres")  # restricted ASM is not symmetric: no CG even for velocity 0
    part = meshes.unit_square_part(n, comm=comm)
    msh, nodes, n_own = part.mesh, part.nodes, part.n_owned
    node_ranges = ownership(comm, part.node_start, n_own)
    free, n_free = free_numbering(comm, nodes, np.isin(np.arange(msh.n_nodes), msh.boundary("all")), n_own)
    free_ranges = ownership(comm, int(comm.exscan(n_free) or 0), n_free)  # every rank: one may own no free node
    N = part.n_global_nodes

    def node_rows(S):
        """This rank's rows of an assembled local node matrix, in global node numbers (rows and columns)."""
        S = sp.coo_array(S)
        S = sp.coo_array((S.data, (S.row, nodes[S.col])), shape=(msh.n_nodes, N))
        return rows_to_owners(comm, S, nodes, node_ranges)

    # b(m) = R m: the SUPG load's rows of the free dofs (completed by the next rank), columns the nodal source
    S = sp.coo_array(supg_load_matrix(msh, velocity, kappa))
    keep = free[S.row] >= 0
    S = sp.coo_array((S.data[keep], (S.row[keep], nodes[S.col[keep]])), shape=(msh.n_nodes, N))
    R = rows_to_owners(comm, S, np.where(free >= 0, free, 0), free_ranges)
    K = node_rows(fem.assemble(msh.cells, fem.p1_stiffness(msh), msh.n_nodes))
    M = node_rows(fem.assemble(msh.cells, fem.p1_mass(msh), msh.n_nodes))

    # the observed nodes of build(): the same draw on every rank; free index k is interior node k (global id order)
    rng = np.random.default_rng(seed)
    obs = np.sort(rng.choice(n_free_global, size=n_obs, replace=False))
    lo, hi = free_ranges[comm.rank], free_ranges[comm.rank + 1]
    mine = np.flatnonzero((obs >= lo) & (obs < hi))
    B = sp.csr_array((np.ones(mine.size), (np.arange(mine.size), obs[mine])), shape=(mine.size, n_free_global))
    terms = [LocalMisfit(np.zeros(mine.size), B), LocalQuadratic(K, c=alpha), LocalQuadratic(M, c=0.1 * alpha)]
    zero = sp.csr_array((msh.n_cells, N))  # A does not depend on m: coefficient exp(0 m) = 1
    system = LocalSystem(free[msh.cells], fem.advection_diffusion(msh, velocity, kappa), "exp", n_free,
                         np.zeros(n_free), terms, parameter_matrix=zero, n_owned_params=n_own, rhs_matrix=R,
                         gram={"mass": M, "stiffness": K})
    J = DistributedReducedFunctional.from_parts(system, comm=comm, **solver_options)
    del system, terms, S, R

    # the synthetic data: the distributed state at the true source, then build()'s noise
    m_true = true_source(msh.points[:n_own])
    v = J.create_parameter_vec()
    v.setArray(m_true)
    J.value_vec(v)
    u = J._st.u.getArray(readonly=True)
    clean = u[obs[mine] - lo]
    top = comm.allreduce(float(np.max(np.abs(clean), initial=0.0)), op=MPI.MAX)
    data = clean + noise * top * rng.standard_normal(n_obs)[mine]
    J.set_misfit(data)
    node_free = free.copy()

    def local_fields(F, x):
        """This rank's piece of fields.pvtu: the source, the true source, state and adjoint on its nodes."""
        return ({"source": F.parameter_values(x, nodes), "m_true": true_source(msh.points),
                 "state": F.local_values(x, "state", node_free), "adjoint": F.local_values(x, "adjoint", node_free)},
                {})

    meta = dict(part=part, local_fields=local_fields, m_true=m_true, observed=obs[mine], velocity=velocity,
                kappa=kappa, distributed=True,
                options=dict(n=n, kappa=kappa, velocity=tuple(velocity), n_obs=n_obs, noise=noise, alpha=alpha,
                             seed=seed, regularization=regularization))
    return adjopt.Problem(J, np.zeros(N), name="advection_diffusion_source", meta=meta)


def main() -> None:
    problem = build()
    J, p = problem.functional, problem.p0
    print(derivative_report(J, p))


if __name__ == "__main__":
    main()
