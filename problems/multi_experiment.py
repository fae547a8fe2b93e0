"""Conductivity recovery from several experiments (right-hand sides) at once.

The operator of :mod:`poisson_inversion` in 2D (P1 triangles on the unit
square, u = 0 on the boundary, A(rho) = sum_e exp(rho_e) K_e with
rho = NodalToElement(m)), driven by ``n_sources`` Gaussian sources

    f_j(x) = exp(-|x - s_j|^2 / (2 * 0.1^2)) / (2 pi 0.1^2)   (unit total source),
    s_j = (0.5, 0.5) + 0.25 (cos(pi/4 + 2 pi j / k), sin(pi/4 + 2 pi j / k)),

one per column: b is the (n_free, k) array of consistent loads, the state U is
(n_free, k), solved for all columns with one factorization and one
multi-column solve. Every column is observed at the same ``n_obs`` points
(uniform in [0.1, 0.9]^2, ``np.random.default_rng(seed)``), data
D = B U_true + noise * max|B U_true| * N(0, 1) of shape (n_obs, k), and

    J(m) = 0.5 ||B U(m) - D||_F^2 + alpha R(m)

with R the regularization of :mod:`poisson_inversion` (default ``"h1"``).
True field and p0 = 0 as there.

Run ``python problems/multi_experiment.py [n]`` to print J(p0), |grad J(p0)|
and Taylor tables of orders 2 and 3.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import adjopt
from adjopt.fem import assemble, body_force, observation_operator, p1_mass, p1_stiffness
from adjopt.verify import derivative_report

if __package__:  # imported as problems.multi_experiment
    from . import poisson_inversion as _pi
else:  # a script, or loaded by file path (adjopt run): problems/ is (or is put) on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import poisson_inversion as _pi

SOURCE_WIDTH = 0.1
SOURCE_RADIUS = 0.25


#: how ``adjopt run multi_experiment`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", preconditioner="h1", gtol=1e-8)

def source_centers(n_sources: int) -> np.ndarray:
    """(k, 2) source positions on a circle of radius 0.25 around the centre of the square."""
    t = np.pi / 4 + 2 * np.pi * np.arange(n_sources) / n_sources
    return 0.5 + SOURCE_RADIUS * np.column_stack([np.cos(t), np.sin(t)])


def sources(points: np.ndarray, n_sources: int) -> np.ndarray:
    """(N, k) nodal values of the Gaussian sources f_j at ``points`` (each integrates to ~1 over the plane)."""
    c = source_centers(n_sources)
    r2 = np.sum((points[:, None, :] - c[None, :, :]) ** 2, axis=2)
    return np.exp(-r2 / (2 * SOURCE_WIDTH**2)) / (2 * np.pi * SOURCE_WIDTH**2)


def build(n: int = 24, n_sources: int = 4, n_obs: int = 40, noise: float = 0.01, alpha: float = 10.0,
          seed: int = 0, regularization: str = "h1") -> adjopt.Problem:
    """The multi-experiment inversion as an :class:`adjopt.Problem` (see the module docstring).

    Raises
    ------
    ValueError
        ``n < 2``, ``n_sources < 1``, ``n_obs < 1``, negative ``noise`` or ``alpha``,
        an unknown ``regularization``.
    """
    mesh = _pi.make_mesh(n, 2)
    k = _pi._check_int(n_sources, "n_sources", 1)
    n_obs = _pi._check_int(n_obs, "n_obs", 1)
    noise = _pi._check_nonneg(noise, "noise")
    alpha = _pi._check_nonneg(alpha, "alpha")
    reg = _pi.make_regularization(mesh, regularization, alpha)

    A, pmap, dofs = _pi.pde_operator(mesh)
    f = sources(mesh.points, k)
    b = dofs.restrict_vector(np.column_stack([body_force(mesh, f[:, j]) for j in range(k)]))  # (n_free, k)
    rng = np.random.default_rng(seed)
    pts = _pi.observation_points(rng, n_obs, 2)
    B = observation_operator(mesh, pts)[:, dofs.free]
    mt = _pi.m_true(mesh.points)
    d_clean = B @ _pi.solve(A, pmap, mt, b)  # (n_obs, k)
    data = _pi.noisy(rng, d_clean, noise)

    weights = np.full(B.shape[0], _pi.noise_sigma(d_clean, noise) ** -2)  # 1/sigma^2, as in poisson_inversion
    objective = adjopt.SquaredMisfit(data, B=B, W=weights) + reg
    J = adjopt.ReducedFunctional(A, b, objective, parameter_map=pmap)
    meta = {
        "mesh": mesh, "m_true": mt, "observation_points": pts, "data": data, "data_clean": d_clean,
        "observation_operator": B, "regularization": reg, "dofs": dofs, "rhs": b,
        "source_centers": source_centers(k),
        "misfit_weights": weights,
        "options": dict(n=n, n_sources=k, n_obs=n_obs, noise=noise, alpha=alpha, seed=seed,
                        regularization=regularization),
    }
    N = mesh.n_nodes
    mass, stiffness = assemble(mesh.cells, p1_mass(mesh), N), assemble(mesh.cells, p1_stiffness(mesh), N)
    return adjopt.Problem(J, np.zeros(N), name=f"multi_experiment_{k}", meta=meta, mass=mass, stiffness=stiffness)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 24
    problem = build(n=n)
    J, p = problem.functional, problem.p0
    print(f"{problem.name}: {p.size} parameters, state {J.state(p).shape}, data {problem.meta['data'].shape}")
    print(f"J(m_true)    = {J.value(problem.meta['m_true']):.10e}")
    print(derivative_report(J, p))


if __name__ == "__main__":
    main()
