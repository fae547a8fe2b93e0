"""Distributed optimal control of the Poisson equation, with a manufactured exact solution.

    min_z  0.5 ||u - u_d||^2_{L2} + alpha/2 ||z||^2_{L2}
    s.t.   -Laplace u = z  in the unit square,  u = 0 on the boundary,

discretised with P1 triangles; the control z is a nodal P1 field. The state
matrix does not depend on z (``ConstantMatrix``); the control enters the
right-hand side b(z) = M[free, :] z (``AffineVector``), so J is quadratic and
its Hessian action is exact (a Taylor test of order 3 reports ``exact``).

Manufactured solution: the reduced gradient is alpha z + w with the adjoint
-Laplace w = u - u_d, w = 0 on the boundary. Choosing
u* = sin(pi x) sin(pi y) gives z* = 2 pi^2 u*, w* = -alpha z*, and
u_d = (1 + 4 pi^4 alpha) sin(pi x) sin(pi y); the discrete optimum converges
to z* at rate 2 in L2 as the mesh is refined.

Optional bounds on z (``lower``, ``upper``) go to ``Problem.bounds``. With
bounds the manufactured solution is generalised: for an amplitude k, the
unconstrained control would be k z*; the bound-constrained optimum is
z*_b = clip(k z*, lower, upper) = P(-w*/alpha), with the adjoint
w* = -alpha k z*, the state u* = sin(pi x) sin(pi y) driven by z*_b plus the
source f = 2 pi^2 u* - z*_b, and u_d = u* - 2 pi^2 w*.
"""

from __future__ import annotations

import numpy as np

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.verify import derivative_report

#: how ``adjopt run optimal_control`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", gtol=1e-10)

def exact_control(points: np.ndarray) -> np.ndarray:
    """z*(x, y) = 2 pi^2 sin(pi x) sin(pi y)."""
    return 2 * np.pi**2 * np.sin(np.pi * points[:, 0]) * np.sin(np.pi * points[:, 1])


def build(n: int = 32, alpha: float = 1e-3, lower: float | None = None, upper: float | None = None,
          amplitude: float = 1.0, grading: float = 1.0) -> adjopt.Problem:
    """The optimal control problem on an n x n triangle mesh of the unit square.

    Parameters
    ----------
    n
        Cells per side (>= 2).
    alpha
        Control cost (> 0).
    lower, upper
        Optional bounds on the control values.
    amplitude
        k in the manufactured solution with bounds (module docstring): the
        unconstrained control would be k z*; with ``upper`` below its maximum
        the bound is active on part of the domain and ``meta["z_exact"]`` is
        the projected (bound-constrained) optimum. 1 and no bounds: the
        classical problem without a state source.
    grading
        g in [1, 4]: every coordinate is mapped x -> x^g, so the cells shrink
        towards the origin corner (a non-uniform mesh; the manufactured
        solution holds on any mesh). 1: uniform.
    """
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not amplitude > 0:
        raise ValueError(f"amplitude must be positive, got {amplitude}")
    if isinstance(grading, bool) or not isinstance(grading, (int, float)) or not 1.0 <= grading <= 4.0:
        raise ValueError(f"grading must be a number in [1, 4], got {grading!r}")
    lo = -np.inf if lower is None else float(lower)
    hi = np.inf if upper is None else float(upper)
    msh = meshes.unit_square(int(n), cell="triangle")
    if grading != 1.0:
        msh = meshes.Mesh(msh.points**grading, msh.cells, msh.cell_type, msh.boundaries)
    N = msh.n_nodes
    K = fem.assemble(msh.cells, fem.p1_stiffness(msh), N)
    M = fem.assemble(msh.cells, fem.p1_mass(msh), N)
    dofs = fem.condense(N, msh.boundary("all"))
    free = dofs.free
    A = adjopt.ConstantMatrix(K[free][:, free], n_params=N)
    # manufactured: u* = s, w* = -alpha k 2 pi^2 s (s = sin pi x sin pi y), z* = clip(k 2 pi^2 s, lower, upper);
    # the state source f = 2 pi^2 u* - z* and the data u_d = u* - 2 pi^2 w* make (u*, w*, z*) optimal
    s_all = np.sin(np.pi * msh.points[:, 0]) * np.sin(np.pi * msh.points[:, 1])
    z_star = np.clip(amplitude * exact_control(msh.points), lo, hi)
    source = 2 * np.pi**2 * s_all - z_star
    b0 = (M @ source)[free] if np.any(source) else None
    b = adjopt.AffineVector(b0, M[free])  # b(z) = M[free, :] (f + z)
    u_d = (1 + 4 * np.pi**4 * alpha * amplitude) * s_all[free]
    objective = adjopt.SquaredMisfit(u_d, W=M[free][:, free]) + alpha * adjopt.TikhonovL2(M)
    J = adjopt.ReducedFunctional(A, b, objective)
    bounds = None if lower is None and upper is None else (lo, hi)
    return adjopt.Problem(J, np.zeros(N), bounds=bounds, name="optimal_control", mass=M,
                          meta=dict(mesh=msh, mass=M, alpha=alpha, z_exact=z_star, dofs=dofs,
                                    options=dict(n=n, alpha=alpha, lower=lower, upper=upper, amplitude=amplitude,
                                                 grading=grading)))


def solve_unconstrained(problem: adjopt.Problem, rtol: float = 1e-12) -> np.ndarray:
    """The discrete optimum of the (quadratic) problem: CG on H z = -grad J(0), matrix-free."""
    import scipy.sparse.linalg as sla

    J = problem.functional
    z0 = np.zeros(J.n_params)
    z, info = sla.cg(J.hessian(z0), -J.gradient(z0), rtol=rtol, maxiter=10 * J.n_params)
    if info != 0:
        raise adjopt.SolverDidNotConverge(f"CG on the optimality system did not converge (info={info})")
    return z


def l2_error(problem: adjopt.Problem, z: np.ndarray) -> float:
    """||z - I_h z*||_M, the L2 error of the control against the interpolated exact control."""
    e = z - problem.meta["z_exact"]
    return float(np.sqrt(e @ (problem.meta["mass"] @ e)))


def main() -> None:
    problem = build(n=32)
    J, p = problem.functional, problem.p0
    print(derivative_report(J, p))
    for n in (8, 16, 32, 64):
        pb = build(n=n)
        print(f"n = {n:3d}: ||z_h - z*||_L2 = {l2_error(pb, solve_unconstrained(pb)):.4e}")


if __name__ == "__main__":
    main()
