"""Mesh independence of the optimizers on the Poisson coefficient inversion (uniform and graded meshes).

Usage: python scripts/bench_optimizers.py [--n 32 64 128 256] [--grading 1.0 2.0]
       [--methods newton-cg newton-tr lbfgs lbfgsb | label ...] [--gtol 1e-6] [--maxiter 2000]
       [--max-time 600] [--cache-mib 512] [--out bench_optimizers.json]

Problem: ``problems/poisson_inversion.py``, ``build(n, dim=2, n_obs=40,
alpha=1.0, grading=g)`` (H1 regularization, noise 1 %, default seed):
(n + 1)^2 nodal log-conductivity parameters on ``unit_square(n)``; with
grading g every coordinate is mapped x -> x^g (cells shrink towards the origin).
A fresh problem is built for every run (no state cache shared between runs).
``--problem optimal_control`` runs ``problems/optimal_control.py`` instead
(``build(n, alpha=1e-3, grading=g)``: L2-regularized distributed control,
full-state observation, manufactured optimum; it has no stiffness, so use
``--methods lbfgs:l2 lbfgsb``): there the parameter space is L2 and the L2
Riesz map is the one that makes L-BFGS mesh independent, while for the
H1-regularized inversion it is the H1 map (the regularization's h^-2
spectrum makes L2 counts grow).

Memory: the state cache of each run's functional is limited to ``--cache-mib``
(default 512 MiB; the drivers only revisit the last few points, so the counts
do not change) instead of the library default of a quarter of the RAM, with
which one long L-BFGS run keeps every iterate's factorization (about 14 MB
each at n = 128, 44 MB at n = 256). After every run the garbage is collected
and the freed heap handed back to the system (glibc ``malloc_trim``): without
that glibc keeps the freed heap of one run and the next run's cache comes on
top (resident memory after five 1 GB-capped runs in one process: 1.0 -> 2.4
GiB without, 0.19 GiB after each run with it). A first full run with neither
was killed by the kernel's OOM killer at 24 GB.

Configurations (``adjopt.minimize(problem, method, inner_product, gtol, maxiter, ...)``):

* ``newton-cg:l2``       Newton-CG, line search, inner product l2, CG preconditioner "h1" (K + M);
* ``newton-tr:l2``       Newton, Steihaug trust region, l2, preconditioner "h1";
* ``lbfgs:l2``           adjopt's L-BFGS in the L2 inner product (consistent mass);
* ``lbfgs:h1``           adjopt's L-BFGS in the H1 inner product (K + M);
* ``lbfgs:h1-m60``       the same with 60 stored pairs instead of 10 (4x fewer iterations here);
* ``lbfgsb:l2-lumped``   scipy's L-BFGS-B on lumped-mass-scaled variables;
* ``lbfgsb:euclidean``   plain scipy L-BFGS-B.

``--methods`` takes method names (all configurations of that method) or labels.
Every run stops at gtol (relative to the start, in the run's own inner
product: the stopping tests of different inner products are *not* the same
test), maxiter or ``--max-time`` seconds (default 600 s: a run that needs more
than 10 minutes is cut there and marked ``T`` in the tables; 0 = no limit).

Recorded per run: iterations, total CG iterations (Newton), values,
gradients, Hessian actions, factorizations, solves, time (optimizer loop;
problem build apart), final J, success and message, and, to compare the
answers on a common scale:

* ``error``: ||m - m_true||_M / ||m_true||_M, M the P1 mass matrix (``problem.mass``);
* ``dist_best``: ||m - m_best||_M / ||m_best||_M, m_best the answer of the run with the lowest J at the same
  (n, grading) (0 for that run): whether the methods reach the same optimum;
* ``l2_stationarity``: ||g||_{M^-1} at the answer over its value at p0, the same measure for every method.

Prints one line per run as it finishes, then per grading a table of
iterations (Newton: Newton iterations / total CG iterations) with rows =
configurations and columns = n, and a "spread" column: max/min over n (and
max - min for the Newton iterations); then the errors, distances and times.
Marks: T = wall-time limit, M = maxiter reached, F = other failure. The JSON
(``--out``) is rewritten atomically after every (n, grading) (``"complete": false``
until the end), with an ``info`` block of machine facts; "peak_rss_GiB" is the
peak resident memory of the run (of the process so far where VmHWM cannot be reset).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numba
import numpy as np
import scipy

import adjopt
from adjopt.optimize.inner import make_inner_product

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import optimal_control  # noqa: E402
import poisson_inversion  # noqa: E402
from _bench_common import git_state as _git_state  # noqa: E402
from _bench_common import loadavg as _loadavg  # noqa: E402
from _bench_common import peak_rss_gib as _peak_rss_gib  # noqa: E402
from _bench_common import release_memory, write_json  # noqa: E402
from _bench_common import reset_peak as _reset_peak  # noqa: E402
from _bench_common import total_memory_gib as _total_memory_gib  # noqa: E402
from _bench_common import version as _version  # noqa: E402

#: the configurations: label -> (method, inner product, method options)
CONFIGS = {
    "newton-cg:l2": ("newton-cg", "l2", {"preconditioner": "h1"}),
    "newton-tr:l2": ("newton-tr", "l2", {"preconditioner": "h1"}),
    "lbfgs:l2": ("lbfgs", "l2", {}),
    "lbfgs:h1": ("lbfgs", "h1", {}),
    "lbfgs:h1-m60": ("lbfgs", "h1", {"memory": 60}),
    "lbfgsb:l2-lumped": ("lbfgsb", "l2-lumped", {}),
    "lbfgsb:euclidean": ("lbfgsb", "euclidean", {}),
}
NEWTON = ("newton-cg", "newton-tr")
#: --problem: name -> (module, build options, meta key of the true parameter)
PROBLEMS = {
    "poisson_inversion": (poisson_inversion, dict(dim=2, n_obs=40, alpha=1.0), "m_true"),
    "optimal_control": (optimal_control, dict(alpha=1e-3), "z_exact"),
}
PROBLEM_NAME = "poisson_inversion"
PROBLEM = PROBLEMS[PROBLEM_NAME][1]


def set_problem(name: str) -> None:
    """Select the problem every run builds (``--problem``)."""
    global PROBLEM_NAME, PROBLEM
    PROBLEM_NAME, PROBLEM = name, PROBLEMS[name][1]


def build_problem(n: int, **kw):
    return PROBLEMS[PROBLEM_NAME][0].build(n, **kw)


def select(names: list[str]) -> list[str]:
    """Configuration labels from method names and/or labels, in the order of CONFIGS."""
    methods = {m for m, _, _ in CONFIGS.values()}
    bad = [s for s in names if s not in methods and s not in CONFIGS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; use method names {sorted(methods)} or labels {list(CONFIGS)}")
    return [lab for lab, (m, _, _) in CONFIGS.items() if lab in names or m in names]


def mass_norm(M, v: np.ndarray) -> float:
    return math.sqrt(max(float(v @ (M @ v)), 0.0))


def flag(res) -> str:
    """'' converged; T wall-time limit; M maxiter; F another failure (line search, trust region)."""
    if res.success:
        return ""
    if "wall-time" in res.message:
        return "T"
    if "maximum number of iterations" in res.message:
        return "M"
    return "F"


def run_one(label: str, n: int, grading: float, gtol: float, maxiter: int, max_time: float | None,
            seed: int | None, cache_bytes: int | None) -> tuple[dict, np.ndarray, object]:
    """Build the problem, minimize, and return (record, answer, problem)."""
    method, inner, opts = CONFIGS[label]
    kw = dict(PROBLEM, grading=grading) if seed is None else dict(PROBLEM, grading=grading, seed=seed)
    t0 = time.perf_counter()
    problem = build_problem(n, **kw)
    if cache_bytes:
        # the drivers revisit only the last few points; the default limit (a quarter of the RAM) lets one long
        # L-BFGS run keep thousands of factorizations (~14 MB each at n=128)
        problem.functional.cache.max_bytes = int(cache_bytes)
    build_s = time.perf_counter() - t0
    stop = dict(gtol=gtol, maxiter=maxiter)
    if max_time:
        stop["max_time"] = max_time
    per_run_peak = _reset_peak()
    res = adjopt.minimize(problem, method=method, inner_product=inner, **stop, **opts)
    M, mt = problem.mass, problem.meta[PROBLEMS[PROBLEM_NAME][2]]
    cg = [int(h["cg_iterations"]) for h in res.history if "cg_iterations" in h]
    solver = problem.functional.solver
    chosen = getattr(solver, "chosen", None) or solver
    rec = dict(
        label=label, method=method, inner_product=inner, options=opts, n=n, grading=grading,
        parameters=int(problem.p0.size), free_dofs=int(problem.functional.matrix.shape[0]),
        nit=int(res.nit), cg_iterations=int(sum(cg)) if method in NEWTON else None,
        nfev=int(res.nfev), njev=int(res.njev), nhessp=int(res.nhessp),
        factorizations=int(res.factorizations), solves=int(res.solves), time_s=float(res.time), build_s=build_s,
        fun=float(res.fun), success=bool(res.success), message=res.message, flag=flag(res),
        stationarity=float(res.stationarity), stationarity0=float(res.history[0]["stationarity"]),
        error=mass_norm(M, res.x - mt) / mass_norm(M, mt),
        solver=type(chosen).__name__, warnings=list(res.warnings), peak_rss_GiB=_peak_rss_gib(), peak_rss_per_run=per_run_peak,
        cache=dict(max_bytes=problem.functional.cache.max_bytes, evictions=int(problem.functional.cache.evictions)),
        history=dict(f=[float(h["f"]) for h in res.history], stationarity=[float(h["stationarity"]) for h in res.history],
                     cg_iterations=cg if method in NEWTON else None),
    )
    return rec, res.x, problem


def finish_group(recs: list[dict], xs: list[np.ndarray], problem) -> None:
    """Common measures within one (n, grading): distance to the lowest-J answer, L2 stationarity ratio."""
    M = problem.mass
    J = problem.functional
    l2 = make_inner_product("l2", problem)
    g0 = l2.dual_norm(J.gradient(problem.p0))
    best = int(np.argmin([r["fun"] for r in recs]))
    xb = xs[best]
    for r, x in zip(recs, xs):
        r["dist_best"] = mass_norm(M, x - xb) / mass_norm(M, xb)
        r["best_label"] = recs[best]["label"]
        r["J_minus_best"] = r["fun"] - recs[best]["fun"]
        r["l2_stationarity"] = l2.dual_norm(J.gradient(x)) / g0


def run_line(r: dict) -> str:
    cg = f"/{r['cg_iterations']}" if r["cg_iterations"] is not None else ""
    return (f"g={r['grading']:<4g} n={r['n']:<4d} {r['label']:<17} its {str(r['nit']) + cg + r['flag']:>10} "
            f"f {r['nfev']:>5} g {r['njev']:>5} Hv {r['nhessp']:>5} fact {r['factorizations']:>5} "
            f"solves {r['solves']:>6} {r['time_s']:>8.2f} s  J {r['fun']:.10g}  err {r['error']:.4e}  "
            f"peak RSS {r['peak_rss_GiB']:.1f} GiB  "
            f"{'ok' if r['success'] else 'STOPPED: ' + r['message']}")


def _spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"x{hi / lo:.2f}" if lo > 0 else "-"


def spread(rows: list[dict], newton: bool) -> dict:
    """max/min (and max - min of the Newton iterations) over n; 'lower_bound' when a run did not converge."""
    its = [r["nit"] for r in rows]
    out = dict(ratio=max(its) / min(its) if min(its) > 0 else None, lower_bound=not all(r["success"] for r in rows))
    if newton:
        cgs = [r["cg_iterations"] for r in rows]
        out.update(difference=max(its) - min(its), cg_ratio=max(cgs) / min(cgs) if min(cgs) > 0 else None,
                   cg_difference=max(cgs) - min(cgs))
    return out


def spread_text(rows: list[dict], newton: bool) -> str:
    if len(rows) < 2:
        return "-"
    s = spread(rows, newton)
    pre = ">=" if s["lower_bound"] else ""
    its = [r["nit"] for r in rows]
    if newton:
        return (f"{pre}{_spread(its)} (+{s['difference']}); CG {pre}{_spread([r['cg_iterations'] for r in rows])} "
                f"(+{s['cg_difference']})")
    return pre + _spread(its)


def print_tables(results: list[dict], labels: list[str], ns: list[int], gradings: list[float]) -> None:
    def cell(r, what):
        if r is None:
            return "-"
        if what == "its":
            cg = f"/{r['cg_iterations']}" if r["cg_iterations"] is not None else ""
            return f"{r['nit']}{cg}{r['flag']}"
        if what == "time":
            return f"{r['time_s']:.2f}{r['flag']}"
        return f"{r[what]:.3e}{r['flag']}"

    width = 13
    for g in gradings:
        mesh = "uniform mesh" if g == 1.0 else f"graded mesh x -> x^{g:g}"
        blocks = [
            ("its", "iterations (Newton: Newton iterations / total CG iterations)", True),
            ("error", "relative error ||m - m_true||_M / ||m_true||_M", False),
            ("dist_best", "distance to the lowest-J answer ||m - m_best||_M / ||m_best||_M", False),
            ("l2_stationarity", "L2 stationarity ||g||_{M^-1} / ||g(p0)||_{M^-1} (same measure for all)", False),
            ("time", "time [s] of the optimizer loop", False),
        ]
        print()
        print(f"=== grading {g:g} ({mesh}), {PROBLEM_NAME} {PROBLEM} ===")
        for what, title, with_spread in blocks:
            print(f"-- {title}")
            head = f"{'config':<30}" + "".join(f"{'n=' + str(n):>{width}}" for n in ns)
            print(head + ("   spread" if with_spread else ""))
            for lab in labels:
                method, inner, opts = CONFIGS[lab]
                name = lab + (f" (P={opts['preconditioner']})" if "preconditioner" in opts else "")
                rows = [next((r for r in results if r["label"] == lab and r["n"] == n and r["grading"] == g), None)
                        for n in ns]
                if all(r is None for r in rows):
                    continue
                line = f"{name:<30}" + "".join(f"{cell(r, what):>{width}}" for r in rows)
                if with_spread:
                    line += "   " + spread_text([r for r in rows if r is not None], method in NEWTON)
                print(line)
    print("\nmarks: T = stopped at the wall-time limit, M = maxiter reached, F = other failure; "
          "'>=' spread: a run did not converge")


def summarize(results: list[dict], labels: list[str], ns: list[int], gradings: list[float]) -> dict:
    out = {}
    for g in gradings:
        per = {}
        for lab in labels:
            rows = [r for n in ns for r in results if r["label"] == lab and r["n"] == n and r["grading"] == g]
            if not rows:
                continue
            per[lab] = dict(n=[r["n"] for r in rows], iterations=[r["nit"] for r in rows],
                            cg_iterations=[r["cg_iterations"] for r in rows], flags=[r["flag"] for r in rows],
                            errors=[r["error"] for r in rows], dist_best=[r.get("dist_best") for r in rows],
                            time_s=[r["time_s"] for r in rows],
                            spread=spread(rows, CONFIGS[lab][0] in NEWTON) if len(rows) > 1 else None)
        out[f"{g:g}"] = per
    return out


def warm_up(labels: list[str]) -> float:
    """Compile / load the numba kernels and import every driver's modules on a tiny problem (kept out of the times)."""
    t0 = time.perf_counter()
    for lab in labels:
        method, inner, opts = CONFIGS[lab]
        adjopt.minimize(build_problem(4, **PROBLEM), method=method, inner_product=inner, maxiter=2, **opts)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64, 128, 256], help="cells per side (several values)")
    ap.add_argument("--grading", type=float, nargs="+", default=[1.0, 2.0], help="mesh gradings g in [1, 4]")
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS),
                    help=f"method names or configuration labels ({', '.join(CONFIGS)})")
    ap.add_argument("--gtol", type=float, default=1e-6, help="stationarity relative to the start")
    ap.add_argument("--maxiter", type=int, default=2000)
    ap.add_argument("--max-time", type=float, default=600.0, help="wall-time limit of one run in s (0: none)")
    ap.add_argument("--cache-mib", type=float, default=512.0,
                    help="state-cache limit of each run's functional in MiB (0: the library default, a quarter of the RAM)")
    ap.add_argument("--seed", type=int, default=None, help="observation/noise seed (default: build()'s default)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the JIT warm-up on a tiny mesh")
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="poisson_inversion",
                    help="poisson_inversion (H1-regularized, the default) or optimal_control (L2-regularized)")
    ap.add_argument("--out", default="bench_optimizers.json")
    args = ap.parse_args()
    if any(n < 2 for n in args.n):
        ap.error("every --n must be >= 2")
    if any(not 1.0 <= g <= 4.0 for g in args.grading):
        ap.error("every --grading must be in [1, 4]")
    if args.max_time < 0:
        ap.error("--max-time must be >= 0")
    if args.cache_mib < 0:
        ap.error("--cache-mib must be >= 0")
    try:
        labels = select(args.methods)
    except ValueError as exc:
        ap.error(str(exc))
    set_problem(args.problem)
    if args.problem == "optimal_control" and args.seed is not None:
        ap.error("--seed is for poisson_inversion (optimal_control has no random data)")
    ns = sorted(set(args.n))
    gradings = list(dict.fromkeys(args.grading))
    max_time = args.max_time or None
    cache_bytes = int(args.cache_mib * 2**20) or None

    git = _git_state()
    load_before = _loadavg()  # other processes on the machine skew the timings; recorded in the JSON
    warmup = 0.0 if args.no_warmup else warm_up(labels)
    config = dict(problem=PROBLEM_NAME, **PROBLEM, seed=args.seed, n=ns, gradings=gradings,
                  configurations={lab: dict(method=m, inner_product=ip, options=o) for lab, (m, ip, o) in CONFIGS.items()
                                  if lab in labels},
                  gtol=args.gtol, maxiter=args.maxiter, max_time=max_time, cache_bytes=cache_bytes, warmup_s=warmup)
    print(f"{PROBLEM_NAME} {PROBLEM}; gtol {args.gtol:g}, "
          f"maxiter {args.maxiter}, max_time {max_time if max_time else 'none'} s; warm-up {warmup:.1f} s", flush=True)

    def info():
        return dict(machine=platform.machine(), processor=platform.processor(), python=platform.python_version(),
                    numpy=np.__version__, scipy=scipy.__version__, numba=numba.__version__,
                    pyamg=_version("pyamg"), threads=numba.get_num_threads(), cpus=os.cpu_count(),
                    loadavg_before=load_before, loadavg_after=_loadavg(), memory_GiB=_total_memory_gib(), git=git)

    results: list[dict] = []
    for g in gradings:
        for n in ns:
            recs, xs, problem = [], [], None
            for lab in labels:
                problem = None
                release_memory()  # the previous run's functional (its state cache) is freed before the next one
                rec, x, problem = run_one(lab, n, g, args.gtol, args.maxiter, max_time, args.seed, cache_bytes)
                recs.append(rec)
                xs.append(x)
                print(run_line(rec), flush=True)
            finish_group(recs, xs, problem)
            del problem
            release_memory()
            results.extend(recs)
            write_json(args.out, dict(info=info(), config=config, complete=False, results=results))
    print_tables(results, labels, ns, gradings)
    write_json(args.out, dict(info=info(), config=config, complete=True, results=results,
                              summary=summarize(results, labels, ns, gradings)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
