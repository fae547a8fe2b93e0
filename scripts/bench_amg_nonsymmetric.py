"""Which pyamg hierarchy preconditions nonsymmetric (advection-dominated) systems: SA, root-node or AIR.

Usage: python scripts/bench_amg_nonsymmetric.py [--n 256] [--kappa 1e-1 ... 1e-5]
       [--methods sa rootnode air] [--maxiter 200] [--out bench_amg_nonsymmetric.json]

What it measures: the SUPG P1 discretisation of

    -kappa Laplace(u) + v . grad u = 1  in the unit square,  u = 0 on the boundary,

with v = (1, 0.5), on ``unit_square(n, cell="triangle")`` (interior nodes only,
``fem.condense``; (n - 1)^2 unknowns), for each kappa. For each pyamg method,
configured as ``adjopt.solvers.AMGSolver`` configures it,

* ``sa``: ``smoothed_aggregation_solver(A, symmetry="nonsymmetric")``,
* ``rootnode``: ``rootnode_solver(A, symmetry="nonsymmetric")``,
* ``air``: ``air_solver(A)`` (approximate ideal restriction),

a hierarchy is built for A (the forward solve) and for A^T = ``A.T.tocsr()``
(the adjoint solve), and ``pyamg.krylov.fgmres`` (restart 50, relative
tolerance 1e-10, at most ``--maxiter`` iterations in all, zero initial guess)
is run with one V-cycle of that hierarchy as the preconditioner. The right-hand
side of both is the SUPG-consistent load of f = 1
(``fem.advection_diffusion_load``). Recorded per run: setup and solve time,
levels, operator complexity, FGMRES iterations, the true relative residual
||b - A x|| / ||b|| recomputed here, and "converged" = that residual <= tol.

How to read it: the cell Peclet number Pe = |v| h / (2 kappa), h = 1/n, tells
how advection-dominated a row is (Pe > 1: advection dominates on the grid
scale). A method fit for ``AMGSolver``'s nonsymmetric default must converge
for A *and* A^T at every kappa, in a number of iterations that does not grow
much with Pe; a run that hits the iteration budget ("no") has stalled, and its
residual tells how far it got. pyamg's warnings (e.g. about nonsymmetric
strength measures, or the ill-conditioned Hessenberg systems of a stalled
FGMRES) are suppressed and only counted ("warnings" in the JSON). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import pyamg
import pyamg.krylov
from _bench_common import loadavg, machine_info, write_json  # noqa: E402  (the script's own folder)

from adjopt import fem, mesh

VELOCITY = (1.0, 0.5)
METHODS = ("sa", "rootnode", "air")
RESTART = 50


def build_hierarchy(A, method: str):
    """The pyamg hierarchy of ``method``, configured as AMGSolver._setup does for a nonsymmetric A."""
    if method == "sa":
        return pyamg.smoothed_aggregation_solver(A, symmetry="nonsymmetric")
    if method == "rootnode":
        return pyamg.rootnode_solver(A, symmetry="nonsymmetric")
    if method == "air":
        return pyamg.air_solver(A)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


def system(n: int, kappa: float, velocity=VELOCITY):
    """(A, b) of the SUPG advection-diffusion problem on the interior nodes of unit_square(n)."""
    msh = mesh.unit_square(n, cell="triangle")
    dofs = fem.condense(msh.n_nodes, msh.boundary("all"))
    conn = dofs.restrict(msh.cells)
    A = fem.assemble(conn, fem.advection_diffusion(msh, velocity, kappa), dofs.n_free)
    b = dofs.restrict_vector(fem.advection_diffusion_load(msh, velocity, kappa, 1.0))
    return A.tocsr(), b


def solve(A, b, method: str, tol: float, maxiter: int, seed: int = 0) -> dict:
    """Build the hierarchy of A and run preconditioned FGMRES; times, iterations, true residual."""
    # record=True, not simplefilter("ignore"): pyamg's fgmres installs its own "always" filter for its
    # module on every call, which would win over an "ignore"; recorded warnings are only counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with np.errstate(all="ignore"):
            np.random.seed(seed)  # pyamg's setup draws random start vectors (as AMGSolver(seed=0) does)
            t0 = time.perf_counter()
            ml = build_hierarchy(A, method)
            t_setup = time.perf_counter() - t0
            M = ml.aspreconditioner(cycle="V")
            res: list[float] = []
            t0 = time.perf_counter()
            x, info = pyamg.krylov.fgmres(A, b, x0=np.zeros_like(b), tol=tol, restart=min(RESTART, maxiter),
                                          maxiter=max(1, math.ceil(maxiter / RESTART)), M=M, residuals=res)
            t_solve = time.perf_counter() - t0
            rel = float(np.linalg.norm(b - A @ x) / np.linalg.norm(b)) if np.all(np.isfinite(x)) else math.inf
    return dict(levels=len(ml.levels), operator_complexity=float(ml.operator_complexity()),
                setup_s=t_setup, solve_s=t_solve, iterations=max(len(res) - 1, 0), info=int(info),
                residual=rel, converged=bool(rel <= tol), hit_budget=bool(len(res) - 1 >= maxiter),
                warnings=len(caught))


def run(n: int, kappas, methods, tol: float, maxiter: int, seed: int = 0) -> list[dict]:
    rows = []
    speed = float(np.linalg.norm(VELOCITY))
    for kappa in kappas:
        A, b = system(n, kappa)
        AT = A.T.tocsr()
        peclet = speed / n / (2 * kappa)
        for method in methods:
            for op, M in (("A", A), ("A^T", AT)):
                r = solve(M, b, method, tol, maxiter, seed)
                r.update(kappa=kappa, peclet=peclet, method=method, operator=op, unknowns=int(A.shape[0]))
                rows.append(r)
                print(f"{kappa:>8.0e} {peclet:>8.3g} {method:>9} {op:>4} {r['levels']:>3} "
                      f"{r['operator_complexity']:>5.2f} {r['setup_s']:>8.3f} {r['solve_s']:>8.3f} "
                      f"{r['iterations']:>5} {r['residual']:>9.2e} {'yes' if r['converged'] else 'no':>5}", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    """Per method: converged everywhere?, iteration range of the converged runs, the stalled (kappa, operator)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        its = [r["iterations"] for r in mine if r["converged"]]
        out[method] = dict(
            converged_all=all(r["converged"] for r in mine),
            iterations_min=min(its) if its else None, iterations_max=max(its) if its else None,
            stalled=[dict(kappa=r["kappa"], operator=r["operator"], residual=r["residual"])
                     for r in mine if not r["converged"]],
            setup_s=sum(r["setup_s"] for r in mine), solve_s=sum(r["solve_s"] for r in mine),
        )
    return out



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="cells per side; (n-1)^2 unknowns")
    ap.add_argument("--kappa", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tol", type=float, default=1e-10, help="relative tolerance of FGMRES")
    ap.add_argument("--maxiter", type=int, default=200, help="FGMRES iterations in all (restart 50)")
    ap.add_argument("--seed", type=int, default=0, help="numpy seed set before each pyamg setup")
    ap.add_argument("--out", default="bench_amg_nonsymmetric.json")
    args = ap.parse_args()
    if args.n < 3:
        ap.error("--n must be >= 3")
    if any(not k > 0 for k in args.kappa):
        ap.error("every --kappa must be positive")
    load_before = loadavg()  # other processes on the machine skew the timings; recorded in the JSON
    print(f"SUPG advection-diffusion, velocity {VELOCITY}, unit_square({args.n}) triangles, "
          f"{(args.n - 1) ** 2} unknowns; FGMRES(restart {RESTART}) to {args.tol:g}, at most {args.maxiter} its")
    print(f"{'kappa':>8} {'cell Pe':>8} {'method':>9} {'op':>4} {'lev':>3} {'opcx':>5} {'setup s':>8} "
          f"{'solve s':>8} {'its':>5} {'rel.res':>9} {'conv':>5}")
    rows = run(args.n, args.kappa, args.methods, args.tol, args.maxiter, args.seed)
    summ = summary(rows)
    for method, s in summ.items():
        rng = "-" if s["iterations_min"] is None else f"{s['iterations_min']}-{s['iterations_max']}"
        stalled = ", ".join(f"{r['operator']} at kappa={r['kappa']:g}" for r in s["stalled"]) or "none"
        print(f"{method:>9}: converged everywhere: {'yes' if s['converged_all'] else 'no'}; "
              f"iterations when converged {rng}; stalled: {stalled}")
    info = machine_info(loadavg_before=load_before, loadavg_after=loadavg())
    config = dict(n=args.n, kappas=args.kappa, velocity=list(VELOCITY), methods=args.methods, tol=args.tol,
                  maxiter=args.maxiter, restart=RESTART, seed=args.seed, unknowns=(args.n - 1) ** 2)
    write_json(args.out, dict(info=info, config=config, results=rows, summary=summ))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
