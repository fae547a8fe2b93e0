"""Log-conductivity inversion through a quasilinear (nonlinear) diffusion equation, solved by Newton.

The inverse problem of :mod:`poisson_inversion`, with a state equation whose
diffusion grows with the state:

    -div(exp(m) q(u) grad u) = f   in Omega = (0, 1)^dim,   u = 0 on the boundary,
    q(u) = 1 + beta u^2,

discretised with P1 triangles (``dim=2``, ``unit_square(n)``) or P1 tetrahedra
(``dim=3``, ``unit_cube(n)``); the boundary dofs are condensed out. The
residual R(u, rho) = F(u, rho) - b, F_e(u)_a = int_e exp(rho_e) q(u) grad u .
grad N_a, is :func:`adjopt.fem.diffusion_reaction_residual` (``diffusion="exp"``),
and ``adjopt.ReducedFunctional(R, objective=...)`` makes the Newton-based
:class:`~adjopt.functional_nonlinear.NonlinearReducedFunctional`. Its Jacobian
K = dR/du is nonsymmetric (the q'(u) grad u term).

* Parameters p = m, one value per mesh node, mapped to the cells by
  ``NodalToElement`` (rho_e = mean of m over the cell's nodes) as the
  ``parameter_map``, as in :mod:`poisson_inversion`.
* Source f = ``source`` (default 20, constant), b = M f on the free dofs.
* True field: :func:`poisson_inversion.m_true` (a Gaussian bump of
  amplitude 1 at (0.6, 0.4[, 0.5]), width 0.15).
* Observations: ``n_obs`` points uniform in [0.1, 0.9]^dim
  (:func:`poisson_inversion.observation_points`, ``np.random.default_rng(seed)``);
  data = B u_true + noise * max|B u_true| * N(0, 1) (same generator), u_true
  the Newton solution of the nonlinear equation at m_true on the same mesh.
* Objective: 0.5 |B u - d|^2 / sigma^2 + alpha (TikhonovH1(K) + 0.1 TikhonovL2(M))
  (sigma = noise * max|B u_true|; the ``"h1"`` regularization of
  :mod:`poisson_inversion`, K and M the nodal P1 stiffness and mass matrices).
* p0 = 0 (conductivity 1 everywhere).

Why beta = 1 and f = 20 (measured at n = 32, 2D): u reaches max 1.07 at p0
(1.0 at m_true), so q(u) = 1 + u^2 doubles the diffusion where u is
largest (the linear equation, beta = 0, would give max u = 1.47). Newton
from u = 0 takes 5 full steps at p0, ||R|| = 0.61, 0.48, 0.079, 3.1e-3,
4.5e-6, 7.9e-12 (quadratic only from the third), and 5 at m_true for the
data; during an optimization the solves start from the nearest cached
state and take 2-3. At f = 1 (the source of :mod:`poisson_inversion`) u
would be 0.07 and q within 0.5% of 1: linear in all but name.

alpha = 10 by default: Newton-CG at n = 32 (8 iterations) recovers m_true
with a relative L2 (mass norm) error of 0.50 / 0.45 / 0.44 / 0.48 for
alpha = 1 / 3 / 10 / 30 (data misfit at the optimum 3.8 / 5.9 / 9.1 / 14.6;
m_true itself has 23.6, about n_obs/2: smaller alpha fits the noise).

Run ``python problems/nonlinear_inversion.py [n] [dim]`` to print J(p0),
|grad J(p0)|, the Newton history at p0 and Taylor tables of orders 2 and 3;
``adjopt run nonlinear_inversion`` optimizes it.
"""

from __future__ import annotations

import numbers
import os
import sys

import numpy as np

import adjopt
from adjopt.fem import (assemble, body_force, condense, diffusion_reaction_residual, observation_operator, p1_mass,
                        p1_stiffness)
from adjopt.maps import NodalToElement
from adjopt.verify import derivative_report

if __package__:  # imported as problems.nonlinear_inversion
    from . import poisson_inversion as _pi
else:  # a script, or loaded by file path (adjopt run): problems/ is (or is put) on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import poisson_inversion as _pi

#: re-exported: the true log-conductivity of poisson_inversion
m_true = _pi.m_true

#: how ``adjopt run nonlinear_inversion`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", preconditioner="h1", gtol=1e-8)
#: exact for every integrand of the residual and its derivatives on P1 cells (see :func:`pde_residual`)
QUADRATURE_DEGREE = 2


def _check_real(value, name: str, minimum: float = -np.inf, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        bound = "" if minimum == -np.inf else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def pde_residual(mesh, beta: float, source: float):
    """(R, parameter map, dof map): R(u, rho) for -div(exp(rho) (1 + beta u^2) grad u) = source on the free dofs,
    rho = NodalToElement(m).

    On P1 cells q(u) grad u . grad N_a is a quadratic polynomial, and so are the integrands of every derivative:
    the degree-2 rule (3 points on a triangle, 4 on a tetrahedron) integrates them exactly. It is given
    explicitly, so that the discrete problem does not depend on the library's default rule (a degree-4 rule,
    9 and 36 points, gives the same values to round-off at 3 and 9 times the cost).
    """
    dofs = condense(mesh.n_nodes, mesh.boundary("all"))
    b = dofs.restrict_vector(body_force(mesh, source))
    R = diffusion_reaction_residual(mesh, dofs, diffusion="exp", beta=beta, source=b, degree=QUADRATURE_DEGREE)
    pmap = NodalToElement(mesh.cells, n_nodes=mesh.n_nodes)
    return R, pmap, dofs


def solve_state(R, pmap, m, solver=None) -> np.ndarray:
    """u solving R(u, M(m)) = 0 by Newton (on a functional of its own, so that no state is cached in the
    problem's functional), for the synthetic data."""
    J = adjopt.ReducedFunctional(R, objective=adjopt.SquaredMisfit(np.zeros(R.n)), solver=solver,
                                 parameter_map=pmap)
    return np.array(J.state(np.asarray(m, dtype=np.float64)))


def build(n: int = 32, dim: int = 2, beta: float = 1.0, source: float = 20.0, n_obs: int = 50,
          noise: float = 0.01, alpha: float = 10.0, seed: int = 0, solver=None) -> adjopt.Problem:
    """The nonlinear log-conductivity inversion as an :class:`adjopt.Problem` (see the module docstring).

    Parameters
    ----------
    n, dim
        Cells per side (>= 2) of the unit square (``dim=2``) or cube (``dim=3``).
    beta
        q(u) = 1 + beta u^2 (>= 0; 0 is the linear equation of :mod:`poisson_inversion`, solved by Newton).
    source
        The constant source f (a finite number; 0 gives u = 0 and no information).
    n_obs, noise, alpha, seed
        Observations, relative noise level, regularization weight and seed, as in :mod:`poisson_inversion`.
    solver
        The linear solver of the Newton steps and the adjoint solves (a name or a
        :class:`~adjopt.solvers.LinearSolver`); default ``"auto"``.

    Raises
    ------
    ValueError
        ``n < 2``, ``dim`` not 2 or 3, a negative or non-finite ``beta``, a non-finite ``source``,
        ``n_obs < 1``, negative ``noise`` or ``alpha``, a negative ``seed``.
    """
    mesh = _pi.make_mesh(n, dim)
    beta = _check_real(beta, "beta", 0.0)
    source = _check_real(source, "source")
    n_obs = _pi._check_int(n_obs, "n_obs", 1)
    noise = _pi._check_nonneg(noise, "noise")
    alpha = _pi._check_nonneg(alpha, "alpha")
    seed = _pi._check_int(seed, "seed", 0)
    reg = _pi.make_regularization(mesh, "h1", alpha)

    R, pmap, dofs = pde_residual(mesh, beta, source)
    rng = np.random.default_rng(seed)
    pts = _pi.observation_points(rng, n_obs, mesh.dim)
    B = observation_operator(mesh, pts)[:, dofs.free]  # u = 0 on the fixed (boundary) dofs
    mt = m_true(mesh.points)
    # a solver given by name is made afresh for the data solve; an instance is left to the problem's functional
    # (sharing it would add the data solve to the functional's solver statistics)
    u_true = solve_state(R, pmap, mt, solver if solver is None or isinstance(solver, str) else None)
    d_clean = B @ u_true
    data = _pi.noisy(rng, d_clean, noise)

    # the misfit weighted by 1/sigma^2: 0.5 sum (B u - d)^2 / sigma^2, about n_obs/2 at the truth
    weights = np.full(B.shape[0], _pi.noise_sigma(d_clean, noise) ** -2)
    objective = adjopt.SquaredMisfit(data, B=B, W=weights) + reg
    J = adjopt.ReducedFunctional(R, objective=objective, solver=solver, parameter_map=pmap)
    meta = {
        "mesh": mesh, "m_true": mt, "u_true": u_true, "observation_points": pts, "data": data,
        "data_clean": d_clean, "observation_operator": B, "regularization": reg, "dofs": dofs,
        "labels": {"parameter": "log-conductivity m (conductivity = exp(m) q(u))", "state": "potential u"},
        "options": dict(n=n, dim=dim, beta=beta, source=source, n_obs=n_obs, noise=noise, alpha=alpha, seed=seed,
                        solver=solver if solver is None or isinstance(solver, str) else type(solver).__name__),
    }
    N = mesh.n_nodes
    mass, stiffness = assemble(mesh.cells, p1_mass(mesh), N), assemble(mesh.cells, p1_stiffness(mesh), N)
    return adjopt.Problem(J, np.zeros(N), name=f"nonlinear_inversion_{dim}d", meta=meta, mass=mass,
                          stiffness=stiffness)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if len(args) > 0 else 32
    dim = int(args[1]) if len(args) > 1 else 2
    problem = build(n=n, dim=dim)
    J, p = problem.functional, problem.p0
    print(f"{problem.name}: {p.size} parameters, {J.residual.n} free dofs, "
          f"{problem.meta['observation_points'].shape[0]} observations")
    print(f"J(m_true)    = {J.value(problem.meta['m_true']):.10e}")
    J.cache.clear()
    print(f"J(p0)        = {J.value(p):.10e}")
    print("Newton at p0 from u = 0: ||R|| = " + ", ".join(f"{r:.2e}" for r in J.newton_history(p)))
    print(derivative_report(J, p))


if __name__ == "__main__":
    main()
