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
import scipy.sparse.linalg as sla

import adjopt
from adjopt.fem import assemble, body_force, condense, observation_operator, p1_mass, p1_stiffness
from adjopt.fem.observation import p1_gradient_operator
from adjopt.maps import NodalToElement
from adjopt.mesh import Mesh, unit_cube, unit_square
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


def build(n: int = 32, dim: int = 2, n_obs: int = 50, noise: float = 0.01, alpha: float | None = None,
          regularization: str = "h1", seed: int = 0, grading: float = 1.0) -> adjopt.Problem:
    """The Poisson log-conductivity inversion as an :class:`adjopt.Problem` (see the module docstring).

    ``alpha`` (the weight of the regularization) defaults to 10 for ``"h1"`` and ``"tv"`` and to 1 for
    ``"bilaplacian"`` (the prior as it is: J is the negative log-posterior).

    Raises
    ------
    ValueError
        ``n < 2``, ``dim`` not 2 or 3, an unknown ``regularization``, ``n_obs < 1``,
        negative ``noise`` or ``alpha``.
    """
    mesh = make_mesh(n, dim, grading)
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
                        grading=grading),
    }
    N = mesh.n_nodes
    mass, stiffness = assemble(mesh.cells, p1_mass(mesh), N), assemble(mesh.cells, p1_stiffness(mesh), N)
    return adjopt.Problem(J, np.zeros(N), name=f"poisson_inversion_{dim}d_{regularization}", meta=meta,
                          mass=mass, stiffness=stiffness)


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
