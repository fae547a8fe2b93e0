"""Distributed optimal control of a semilinear elliptic equation, with a manufactured exact solution.

    min_z  0.5 ||u - u_d||^2_{L2} + alpha/2 ||z||^2_{L2}
    s.t.   -Laplace u + u^3 = f + z  in the unit square,  u = 0 on the boundary,

discretised with P1 triangles; the control z is a nodal P1 field. The state
equation is the residual R(u, z) = F(u) - b(z), F(u)_a = int grad u . grad N_a
+ u^3 N_a (:func:`adjopt.fem.diffusion_reaction_residual` with
``nonlinearity="cube"``), solved by Newton; the control enters the source
b(z) = M[free, :] (f + z) (``AffineVector``), exactly as in
:mod:`optimal_control`. Unlike there, J is not quadratic: the state depends
nonlinearly on z, and the Hessian has the curvature term 6 u w du dz of the
cubic.

Optimality system (from the Lagrangian J - <w, R>, the sign adjopt uses; the
continuous form of K^T w = f_u and grad J = f_z - (dR/dz)^T w):

    -Laplace u + u^3 = f + z                 state
    -Laplace w + 3 u^2 w = u - u_d           adjoint, w = 0 on the boundary
    alpha z + w = 0                          gradient (L2 Riesz representative)

Manufactured solution: with s = sin(pi x) sin(pi y) and an amplitude k
(``amplitude``, default 1),

    u* = k s,   z* = 2 pi^2 k s,   w* = -alpha z*,
    f   = -Laplace u* + u*^3 - z* = k^3 s^3,
    u_d = u* - (-Laplace w* + 3 u*^2 w*) = u* + alpha (-Laplace z* + 3 u*^2 z*)
        = k (1 + 4 pi^4 alpha) s + 6 pi^2 alpha k^3 s^3,

satisfy all three equations (-Laplace s = 2 pi^2 s). The discrete f and u_d
are the nodal interpolants; the discrete optimum converges to z* at rate 2
in L2 (measured: ||z_h - z*|| = 0.154, 0.0403, 0.0102, 0.00255 at
n = 8, 16, 32, 64, rates 1.94, 1.98, 2.00; least-squares slope 1.96 over
8-32). :func:`solve` finds it with Newton-CG. That (u*, w*, z*) is optimal,
the sign of the adjoint included, is checked in
tests/gallery/test_semilinear_control.py: at I_h z* the state tends to u*,
the adjoint to w* and the discrete gradient to 0, all at O(h^2).

Newton on the state from u = 0 (rtol 1e-10) takes 2 iterations at z = 0
(u = O(0.03) there, nearly linear) and 4 at z* (u* = 1 in the middle;
k = 1: u^3 <= 1 against -Laplace u* = 2 pi^2 s <= 20). A larger k makes the cubic
matter more: at k = 3 (u^3 up to 27 against 59) 3 and 5 iterations, and
Newton-CG needs 5 steps instead of 3.

:func:`solve` and ``adjopt run`` stop at gtol = 1e-7 (relative
stationarity). That is about as tight as an f-based line search gets here:
the next Newton step would predict a decrease below 100 eps |f| (f = 0.071
at the optimum), and Newton-CG stops there "at round-off" (measured floor:
a relative stationarity of 2e-10 to 1e-8, reached in 3 steps at k = 1). The
optimum is then accurate to far below the discretization error.
"""

from __future__ import annotations

import numbers
import os
import sys

import numpy as np

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.optimize import OptimizationError
from adjopt.verify import derivative_report

if __package__:  # imported as problems.semilinear_control
    from .optimal_control import l2_error
else:  # a script, or loaded by file path (adjopt run): problems/ is (or is put) on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from optimal_control import l2_error

#: how ``adjopt run semilinear_control`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", gtol=1e-7)
#: quadrature degree of the residual: exact for u^3 N_a on P1 (and so for every derivative), so that the discrete
#: problem does not depend on the library's default rule (degree 2 gives the same rate; its L2 errors differ
#: by 4e-5 relative at n = 8)
QUADRATURE_DEGREE = 4


def exact_control(points: np.ndarray, amplitude: float = 1.0) -> np.ndarray:
    """z*(x, y) = 2 pi^2 k sin(pi x) sin(pi y)."""
    return 2 * np.pi**2 * amplitude * np.sin(np.pi * points[:, 0]) * np.sin(np.pi * points[:, 1])


def exact_state(points: np.ndarray, amplitude: float = 1.0) -> np.ndarray:
    """u*(x, y) = k sin(pi x) sin(pi y)."""
    return amplitude * np.sin(np.pi * points[:, 0]) * np.sin(np.pi * points[:, 1])


def build(n: int = 32, alpha: float = 1e-3, amplitude: float = 1.0) -> adjopt.Problem:
    """The semilinear control problem on an n x n triangle mesh of the unit square.

    Parameters
    ----------
    n
        Cells per side (>= 2).
    alpha
        Control cost (> 0).
    amplitude
        k of the manufactured solution u* = k sin(pi x) sin(pi y) (> 0, finite; module docstring).

    Raises
    ------
    ValueError
        ``n`` not an integer >= 2, ``alpha`` not a positive finite number, ``amplitude`` not a positive
        finite number.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    for name, v in (("alpha", alpha), ("amplitude", amplitude)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    n, alpha, k = int(n), float(alpha), float(amplitude)
    msh = meshes.unit_square(n, cell="triangle")
    N = msh.n_nodes
    M = fem.assemble(msh.cells, fem.p1_mass(msh), N)
    dofs = fem.condense(N, msh.boundary("all"))
    free = dofs.free
    s = exact_state(msh.points)
    u_star, z_star = k * s, exact_control(msh.points, k)
    f = u_star**3  # -Laplace u* + u*^3 - z* with -Laplace u* = z*
    b = adjopt.AffineVector((M @ f)[free], M[free])  # b(z) = M[free, :] (f + z)
    R = fem.diffusion_reaction_residual(msh, dofs, diffusion=1.0, reaction=1.0, nonlinearity="cube", source=b,
                                       degree=QUADRATURE_DEGREE)
    # u_d = u* + alpha (-Laplace z* + 3 u*^2 z*), -Laplace z* = 2 pi^2 z*: makes w* = -alpha z* the adjoint
    u_d = u_star + alpha * (2 * np.pi**2 + 3 * u_star**2) * z_star
    objective = adjopt.SquaredMisfit(u_d[free], W=M[free][:, free]) + alpha * adjopt.TikhonovL2(M)
    J = adjopt.ReducedFunctional(R, objective=objective)
    return adjopt.Problem(J, np.zeros(N), name="semilinear_control", mass=M,
                          meta=dict(mesh=msh, mass=M, alpha=alpha, z_exact=z_star, u_exact=u_star,
                                    w_exact=-alpha * z_star, u_d=u_d, source=f, dofs=dofs,
                                    labels={"parameter": "control z", "state": "state u"},
                                    options=dict(n=n, alpha=alpha, amplitude=k)))


def solve(problem: adjopt.Problem, method: str = "newton-cg", gtol: float = 1e-7, **options) -> np.ndarray:
    """The discrete optimum: ``adjopt.minimize`` (Newton-CG by default) from p0 to ``gtol`` (relative to the start;
    see the module docstring for why not tighter). Further ``options`` go to ``adjopt.minimize``.

    Raises :class:`adjopt.optimize.OptimizationError` when the method stops without meeting the tolerance.
    """
    result = adjopt.minimize(problem, method=method, gtol=gtol, **options)
    if not result.success:
        raise OptimizationError(f"{method} did not reach gtol = {gtol:g}: {result.message}")
    return result.x


def main() -> None:
    problem = build(n=32)
    J, p = problem.functional, problem.p0
    print(derivative_report(J, p))
    errs = []
    for n in (8, 16, 32, 64):
        pb = build(n=n)
        errs.append(l2_error(pb, solve(pb)))
        rate = "" if len(errs) < 2 else f"  (rate {np.log2(errs[-2] / errs[-1]):.2f})"
        print(f"n = {n:3d}: ||z_h - z*||_L2 = {errs[-1]:.4e}{rate}")


if __name__ == "__main__":
    main()
