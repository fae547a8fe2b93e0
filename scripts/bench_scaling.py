"""Scaling of value, gradient and Hessian action with problem size, solver and threads.

Usage: python scripts/bench_scaling.py [--sizes2d 32 64 ... 1024 2050] [--sizes3d 8 16 ... 64 101]
       [--solvers direct amg] [--direct cholmod|superlu|pardiso] [--amg-tol 1e-8] [--repeat 3]
       [--threads 2 | --threads 1 2] [--fd-full-limit 2000] [--fd-samples 8] [--direct-max-3d 150000]
       [--out bench_scaling.json] [--plot bench_scaling.png]

Problem: the gallery's ``problems/poisson_inversion.py``, ``build(n, dim)``
with its defaults (H1 regularization, 50 observations): 2D ``unit_square(n)``,
(n + 1)^2 nodal parameters and (n - 1)^2 unknowns (n = 2050: 4.2M); 3D
``unit_cube(n)``, (n + 1)^3 parameters and (n - 1)^3 unknowns (n = 101: 1.0M).
``build()`` solves for its synthetic data with SuperLU (``splu``, COLAMD
ordering), which does not scale to the 3D sizes; for this benchmark that one
data solve goes through the benchmark's own solver (the module's ``solve`` is
replaced while ``build()`` runs; below 20,000 unknowns the original is run as
well and the relative difference of the data recorded as ``data_check_rel_diff``).
The problem is built once per size; every solver then gets its own
``ReducedFunctional`` on the same matrix, right-hand side, objective and map.

Solvers: ``direct`` is ``--direct`` (CHOLMOD by default; SuperLU when
scikit-sparse is missing or broken; PARDISO on request), ``amg`` is
``AMGSolver(tol=--amg-tol, warm_start=False)`` (every solve starts from zero,
so a repetition does not profit from the previous one's solution). Direct
solvers are skipped on 3D meshes above ``--direct-max-3d`` unknowns (a 3D
Cholesky factor grows like N^(4/3) in memory and N^2 in time: CHOLMOD took
1.9 s and 6.2M factor nonzeros at 24k unknowns on the development machine,
extrapolated 15-25 min and ~10 GB at 1M); 0 lifts the limit.

Per (size, solver), ``--repeat`` times, each with a fresh p (a new random
perturbation of 0.5 m_true; the state cache is cleared as well) and the
stats reset: ``J.value(p)``, then ``J.gradient(p)`` (served by the cached
factorization: one adjoint solve), then one ``J.hessp(p, dp)`` (two solves).
"value+gradient" is value + gradient at that fresh p, i.e. exactly
``J.value_and_gradient(p)``. Reported: the best of the repetitions of each
time (the median too), the ratios (value+gradient)/value and hessp/value
computed from those best times, and the value broken down into parameter map,
assembly (both timed apart by calling ``J.map.forward`` / ``J.matrix.assemble``,
best of --repeat), factorization or AMG setup and forward solve (``J.stats``;
the factorization time includes adjopt's symmetry check, timed apart as
``symmetry_check_s``) and the rest (right-hand side, residual check, objective).

Memory: peak resident memory (VmHWM, reset per phase via ``Meter``) during the
repetitions, in bytes per unknown (``peak_rss_bytes_per_unknown``: the whole
process, problem included), and the growth over the resident memory at their
start (``eval_increment_bytes_per_unknown``: the factorization, states and
temporaries of the functional).

Baselines, same run, same p:

* finite differences: forward differences (J(p + h_k e_k) - J(p)) / h_k,
  h_k = ``--fd-step`` max(1, |p_k|), i.e. m + 1 values. With m <=
  ``--fd-full-limit`` all m + 1 values are run and timed (``fd_mode: "full"``);
  above it J(p) and ``--fd-samples`` coordinates are timed and the time
  scaled to m + 1 values (``fd_mode: "sampled"``); the smallest default sizes
  (2D n = 32: 1,089 parameters, 3D n = 8: 729) are there for the full
  measurement. The FD gradient is compared with the adjoint gradient on the
  coordinates it computed (``fd_rel_err``, 2-norm relative). With AMG every
  value carries a solve error of the order of --amg-tol; the FD error is
  reported as it comes (it stayed below 1e-4 at the development sizes).
* refactorize: an adjoint that factorizes A^T again (a fresh solver of the
  same kind and settings; A assembled beforehand, not timed) instead of
  reusing the forward factorization, then solves and contracts exactly as
  adjopt does; best of --repeat. Its gradient must equal adjopt's
  (``refactorize_max_rel_diff``, max-norm relative; the script checks it).
  Reported as ``refactorize_ratio`` = its gradient time / adjopt's gradient
  time (after a value), and ``refactorize_vg_ratio`` for value+gradient.

Threads: BLAS and numba thread pools are sized at import, so each thread count
of ``--threads`` runs in its own subprocess (this script with a hidden
``--worker`` flag) with NUMBA_NUM_THREADS, OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set; the worker streams one JSON line
per row back. ``thread_scaling`` lists t(1 thread) / t(k threads).

Limits, same run: a gradient after a value is at least one adjoint solve
on the value's factorization, which costs what the forward solve does (the
same pair of triangular solves for a symmetric A); a Hessian action is at
least its two solves (tangent and second adjoint). So per row, with
t_solve = ``forward_solve_s`` (the forward solve of the value, on its factor,
with its residual check, as ``J.stats`` times it):

* ``limit_value_gradient`` = 1 + t_solve / t_value, and
  ``value_gradient_over_limit`` = ratio_value_gradient - limit_value_gradient,
  the share of a value spent in the gradient beyond one solve;
* ``hessp_over_two_solves`` = hessp_s / (2 t_solve);
* ``adjoint_over_forward`` = adjoint_solve_s / forward_solve_s (1 when the
  adjoint solve runs as fast as the forward one).

From the best times, like the other ratios; ``limits_per_repetition`` has
the same numbers for each repetition alone (one value, gradient and solve
each), as a check that mixing best times does not make them.

Output: a progress line per row, then the tables and the summary of the
targets (direct 2D at >= 250,000 unknowns: (value+gradient)/value <= 1.05,
hessp/value <= 0.1, (value+gradient)/value at most 0.02 above its limit,
hessp <= 1.2 x its two solves; AMG 3D at >= 1,000,000 unknowns:
(value+gradient)/value <= 1.5), each met / not met / not measured, with the
numbers. ``info.blas`` (and the worker's) records the BLAS libraries
(threadpoolctl: numpy's own, the one CHOLMOD links, OpenMP) with their
threads, and which of them CHOLMOD runs on (``cholmod_blas``, from ``ldd`` of
scikit-sparse's module, followed through Debian's alternatives). The JSON
(``--out``) is rewritten atomically after every row (``"complete": false``
until the end); the PNG (``--plot``) shows time per unknown against unknowns.
Exit status 2 for bad input, 1 when a row failed, a worker died or rows are missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np
from _bench_common import (
    GiB,
    Meter,
    best_time,
    blas_info,
    loglog_plot,
    machine_info,
    median_time,
    peak_rss_gib,
    release_memory,
    reset_peak,
    rss_gib,
    table,
    write_json,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: marks the lines of a worker's stdout that carry a JSON message for the parent
MARK = "@@bench_scaling@@ "
PROBLEM = "poisson_inversion"
DIRECT_BACKENDS = ("cholmod", "superlu", "pardiso")
#: below this many unknowns the data of build() is also solved the gallery's own way, for comparison
DATA_CHECK_LIMIT = 20_000
#: the refactorize baseline must give adjopt's gradient to this (max-norm relative)
REFACTORIZE_TOL = 1e-8
TIME_KEYS = ("value_s", "gradient_s", "value_gradient_s", "hessp_s", "factorization_s", "forward_solve_s",
             "adjoint_solve_s", "tangent_solve_s", "second_adjoint_solve_s")
#: the targets of the issue: (key, label, dim, solver kind, min unknowns, ratio field, bound)
TARGETS = (
    ("direct_2d_value_gradient", "direct 2D: (value+gradient)/value <= 1.05 at >= 250,000 unknowns",
     2, "direct", 250_000, "ratio_value_gradient", 1.05),
    ("direct_2d_hessp", "direct 2D: hessp/value <= 0.1 at >= 250,000 unknowns",
     2, "direct", 250_000, "ratio_hessp", 0.1),
    ("amg_3d_value_gradient", "AMG 3D: (value+gradient)/value <= 1.5 at >= 1,000,000 unknowns",
     3, "amg", 1_000_000, "ratio_value_gradient", 1.5),
    ("direct_2d_value_gradient_limit",
     "direct 2D: (value+gradient)/value at most 0.02 above its limit 1 + t_solve/t_value at >= 250,000 unknowns",
     2, "direct", 250_000, "value_gradient_over_limit", 0.02),
    ("direct_2d_hessp_two_solves", "direct 2D: hessp <= 1.2 x its two solves (2 t_solve) at >= 250,000 unknowns",
     2, "direct", 250_000, "hessp_over_two_solves", 1.2),
)
#: fields shown next to a target's ratio in the summary: (field, label)
TARGET_CONTEXT = {
    "direct_2d_value_gradient_limit": (("ratio_value_gradient", "(v+g)/v"), ("limit_value_gradient", "limit")),
    "direct_2d_hessp_two_solves": (("hessp_s", "hessp s"), ("forward_solve_s", "t_solve s")),
}


# -- command line ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--sizes2d", type=int, nargs="*", default=[32, 64, 128, 256, 512, 1024, 2050], metavar="N",
                    help="n of poisson_inversion dim=2: (n-1)^2 unknowns (default 32 to 2050: 4.2M)")
    ap.add_argument("--sizes3d", type=int, nargs="*", default=[8, 16, 24, 32, 48, 64, 101], metavar="N",
                    help="n of poisson_inversion dim=3: (n-1)^3 unknowns (default 8 to 101: 1.0M)")
    ap.add_argument("--solvers", nargs="+", default=["direct", "amg"], choices=["direct", "amg"])
    ap.add_argument("--direct", default="cholmod", choices=DIRECT_BACKENDS,
                    help="the direct backend (default cholmod; superlu when scikit-sparse is missing)")
    ap.add_argument("--amg-tol", type=float, default=1e-8, help="relative tolerance of every AMG solve")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per (size, solver), each at a fresh p")
    ap.add_argument("--threads", type=int, nargs="+", default=[2],
                    help="thread counts, one worker subprocess each (default 2; '1 2' for the scaling)")
    ap.add_argument("--fd-full-limit", type=int, default=2000,
                    help="run all m+1 values of the FD gradient up to this many parameters, else sample")
    ap.add_argument("--fd-samples", type=int, default=8,
                    help="FD coordinates timed above --fd-full-limit (scaled to m+1 values); 0: no FD there")
    ap.add_argument("--fd-step", type=float, default=1e-6, help="relative forward-difference step")
    ap.add_argument("--direct-max-3d", type=int, default=150_000,
                    help="skip direct solvers on 3D meshes above this many unknowns (0: no limit)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the parameter perturbations and directions")
    ap.add_argument("--no-warmup", action="store_true", help="skip the JIT / import warm-up on tiny meshes")
    ap.add_argument("--out", default="bench_scaling.json", help="JSON output, rewritten after every row")
    ap.add_argument("--plot", default="bench_scaling.png", help="PNG: time per unknown vs unknowns")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    for name in ("sizes2d", "sizes3d"):
        bad = [n for n in getattr(args, name) if n < 2]
        if bad:
            ap.error(f"--{name} must be >= 2 (cells per side; n - 1 interior nodes per side), got {bad}")
        setattr(args, name, sorted(set(getattr(args, name))))
    if not args.sizes2d and not args.sizes3d:
        ap.error("nothing to do: --sizes2d and --sizes3d are both empty")
    args.solvers = list(dict.fromkeys(args.solvers))
    bad = [t for t in args.threads if t < 1]
    if bad:
        ap.error(f"--threads must be >= 1, got {bad}")
    args.threads = list(dict.fromkeys(args.threads))
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if not (math.isfinite(args.amg_tol) and 0 < args.amg_tol < 1):
        ap.error(f"--amg-tol must be in (0, 1), got {args.amg_tol}")
    if not (math.isfinite(args.fd_step) and 0 < args.fd_step < 1):
        ap.error(f"--fd-step must be in (0, 1), got {args.fd_step}")
    if args.fd_full_limit < 0 or args.fd_samples < 0 or args.direct_max_3d < 0:
        ap.error("--fd-full-limit, --fd-samples and --direct-max-3d must be >= 0")
    for flag in ("out", "plot"):
        d = os.path.dirname(os.path.abspath(getattr(args, flag)))
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            ap.error(f"--{flag}: folder {d} does not exist or is not writable")
    args.direct_used, args.direct_note = resolve_direct(args.direct)
    if args.direct_used is None:
        ap.error(args.direct_note)
    return args


def resolve_direct(name: str) -> tuple[str | None, str]:
    """The direct backend to use, and a note: CHOLMOD falls back to SuperLU; a missing PARDISO is an error."""
    from adjopt.errors import MissingBackendError
    from adjopt.solvers import make_solver

    try:
        make_solver(name)
    except MissingBackendError as exc:
        if name == "cholmod":
            return "superlu", f"cholmod is not usable ({str(exc).split('.')[0]}); using superlu"
        return None, f"--direct {name}: {exc}"
    return name, ""


# -- worker: the measurements ---------------------------------------------------------------------
def emit(kind: str, payload: dict) -> None:
    """One JSON message to the parent process (stdout line with MARK)."""
    from _bench_common import finite

    sys.stdout.write(MARK + json.dumps(dict(type=kind, data=finite(payload))) + "\n")
    sys.stdout.flush()


def gallery():
    sys.path.insert(0, os.path.join(ROOT, "problems"))
    import poisson_inversion

    return poisson_inversion


def make_bench_solver(kind: str, args):
    from adjopt.solvers import AMGSolver, make_solver

    if kind == "amg":
        return AMGSolver(tol=args.amg_tol, warm_start=False)
    return make_solver(args.direct_used)


@contextmanager
def data_solve_by(factory, record: dict):
    """Replace ``poisson_inversion.solve`` (the synthetic data solve of build()) by ``factory()``'s solver."""
    pi = gallery()
    original = pi.solve

    def solve(A, pmap, m, b):
        t0 = time.perf_counter()
        Ah = A.assemble(pmap.forward(np.asarray(m, dtype=np.float64)))
        u = factory().factorize(Ah).solve(np.asarray(b, dtype=np.float64), kind="other")
        record["data_solve_s"] = time.perf_counter() - t0
        if Ah.shape[0] <= DATA_CHECK_LIMIT:
            ref = original(A, pmap, m, b)
            record["data_check_rel_diff"] = float(np.linalg.norm(u - ref) / np.linalg.norm(ref))
        return u

    pi.solve = solve
    try:
        yield
    finally:
        pi.solve = original


def blas_line(info: dict | None) -> str:
    """One line: the BLAS CHOLMOD runs on and numpy's own, with their threads."""
    if not info:
        return "BLAS: not recorded"
    def desc(d):
        return (f"{d.get('internal_api')} {d.get('version')} ({d.get('threading_layer')}, {d.get('architecture')}, "
                f"{d.get('num_threads')} threads) {d.get('filepath')}")
    chol = "; ".join(desc(d) for d in info.get("cholmod_pools") or []) or str(info.get("cholmod_blas"))
    numpy_blas = [d for d in info.get("threadpools") or [] if "numpy" in (d.get("filepath") or "")]
    return f"CHOLMOD's BLAS: {chol}" + (f"; numpy's BLAS: {desc(numpy_blas[0])}" if numpy_blas else "")


def limits(value_s: float, value_gradient_s: float, hessp_s: float, solve_s: float, adjoint_s: float) -> dict:
    """The limits of a row (see the module docstring): 1 + t_solve/t_value, hessp / (2 t_solve) and the rest.

    The gap is that of (value+gradient)/value as the row reports it: best value+gradient over best value (one
    repetition each), not best value plus best gradient, which may come from two repetitions.
    """
    limit = 1.0 + solve_s / value_s
    ratio = value_gradient_s / value_s
    return dict(limit_value_gradient=limit, value_gradient_over_limit=ratio - limit,
                hessp_over_two_solves=hessp_s / (2.0 * solve_s), adjoint_over_forward=adjoint_s / solve_s)


def solver_label(kind: str, args) -> str:
    return args.direct_used if kind == "direct" else "amg"


def unknowns_of(n: int, dim: int) -> int:
    return (n - 1) ** dim


def fresh_parameter(base: np.ndarray, rng, r: int) -> np.ndarray:
    """A new p for repetition r: 0.5 m_true plus a random perturbation (never seen by the cache)."""
    return base + 0.05 * (1.0 + 0.1 * r) * rng.standard_normal(base.size)


def fd_gradient(J, p: np.ndarray, g: np.ndarray, args, rng) -> dict:
    """Forward-difference gradient baseline: all m+1 values, or J(p) and a sample of coordinates, timed."""
    m = p.size
    if m <= args.fd_full_limit:
        coords, mode = np.arange(m), "full"
    elif args.fd_samples > 0:
        coords, mode = np.sort(rng.choice(m, size=min(args.fd_samples, m), replace=False)), "sampled"
    else:
        return dict(fd_mode="off")
    J.cache.clear()
    t0 = time.perf_counter()
    f0 = J.value(p)
    t_base = time.perf_counter() - t0
    times = np.empty(coords.size)
    g_fd = np.empty(coords.size)
    q = p.copy()
    for i, k in enumerate(coords):
        h = args.fd_step * max(1.0, abs(p[k]))
        q[k] = p[k] + h
        J.cache.clear()  # one state at a time, as a plain FD loop holds
        t0 = time.perf_counter()
        fk = J.value(q)
        times[i] = time.perf_counter() - t0
        q[k] = p[k]
        g_fd[i] = (fk - f0) / h
    J.cache.clear()
    measured = t_base + float(times.sum())
    estimate = measured if mode == "full" else t_base + float(times.mean()) * m
    ref = g[coords]
    return dict(
        fd_mode=mode, fd_values_measured=int(coords.size + 1), fd_values_needed=int(m + 1),
        fd_coords=coords.tolist() if mode == "sampled" else None,
        fd_measured_s=measured, fd_s=estimate, fd_value_median_s=float(np.median(times)) if times.size else None,
        fd_rel_err=float(np.linalg.norm(g_fd - ref) / np.linalg.norm(ref)) if np.linalg.norm(ref) > 0 else None,
        fd_step=args.fd_step,
    )


def refactorize_gradient(J, p: np.ndarray, g: np.ndarray, kind: str, args) -> dict:
    """The adjoint without reuse: factorize A^T with a fresh solver of the same kind, solve, contract."""
    u = np.array(J.state(p))  # the cached forward state, as a writable copy (a read-only view is another
    # numba type: the contraction kernel would be compiled again for it)
    rho = p if J.map is None else J.map.forward(p)
    A = J.matrix.assemble(rho)
    solver = make_bench_solver(kind, args)
    out = {}

    def gradient():
        fac = solver.factorize(A.T)
        lam = fac.solve(J.objective.grad_u(u, p), kind="adjoint")
        q = -J.matrix.contract(rho, lam, u)
        if J.rhs.depends_on_p:
            q = q + J.rhs.vjp(rho, lam)
        out["g"] = J.objective.grad_p(u, p) + (q if J.map is None else J.map.vjp(p, q))

    t = best_time(gradient, repeat=args.repeat, warmup=False)
    diff = float(np.max(np.abs(out["g"] - g)) / np.max(np.abs(g)))
    return dict(refactorize_gradient_s=t, refactorize_max_rel_diff=diff,
                refactorize_ok=bool(diff < REFACTORIZE_TOL),
                refactorize_factorizations=int(solver.stats.factorizations))


def value_pieces(J, p: np.ndarray, repeat: int) -> dict:
    """The parts of a value that J.stats does not time: parameter map, assembly, symmetry check (in factorize)."""
    from adjopt.solvers import is_symmetric

    rho = J.map.forward(p)
    A = J.matrix.assemble(rho)
    return dict(map_s=best_time(lambda: J.map.forward(p), repeat=repeat, warmup=False),
                assembly_s=best_time(lambda: J.matrix.assemble(rho), repeat=repeat, warmup=False),
                symmetry_check_s=median_time(lambda: is_symmetric(A), repeat=repeat), nnz=int(A.nnz))


def measure_row(problem, n: int, dim: int, kind: str, args, meter: Meter) -> dict:
    import adjopt

    pi = gallery()
    J0 = problem.functional
    solver = make_bench_solver(kind, args)
    J = adjopt.ReducedFunctional(J0.matrix, J0.rhs, J0.objective, solver=solver, parameter_map=J0.map)
    N, m = int(J.matrix.shape[0]), int(J.n_params)
    rng = np.random.default_rng(args.seed)
    base = 0.5 * pi.m_true(problem.meta["mesh"].points)
    dp = rng.standard_normal(m)
    reps = []
    release_memory()
    rss_start = rss_gib()
    with meter.phase(f"evaluate {dim}D n={n} {solver.name}") as ph:
        for r in range(args.repeat):
            p = fresh_parameter(base, rng, r)
            J.cache.clear()
            J.reset_stats()
            t0 = time.perf_counter()
            v = J.value(p)
            t1 = time.perf_counter()
            g = J.gradient(p)
            t2 = time.perf_counter()
            h = J.hessp(p, dp)
            t3 = time.perf_counter()
            st = J.stats
            reps.append(dict(
                value_s=t1 - t0, gradient_s=t2 - t1, value_gradient_s=t2 - t0, hessp_s=t3 - t2,
                factorization_s=st.factorization_time, forward_solve_s=st.solve_time["forward"],
                adjoint_solve_s=st.solve_time["adjoint"], tangent_solve_s=st.solve_time["tangent"],
                second_adjoint_solve_s=st.solve_time["second_adjoint"],
                factorizations=st.factorizations + st.transpose_factorizations, solves=dict(st.solves),
                iterations=dict(st.iterations), factor_nnz=st.factor_nnz,
            ))
    eval_peak = ph["peak_GiB"]
    best = {k: min(rep[k] for rep in reps) for k in TIME_KEYS}
    median = {k: float(np.median([rep[k] for rep in reps])) for k in TIME_KEYS}

    pieces = value_pieces(J, p, args.repeat)

    row = dict(
        problem=PROBLEM, dim=dim, n=n, unknowns=N, params=m, nnz=pieces.pop("nnz"), solver=solver.name,
        solver_kind=kind,
        amg_tol=args.amg_tol if kind == "amg" else None, repeat=args.repeat, statistic="best of repeat, fresh p each",
        **best,
        ratio_value_gradient=best["value_gradient_s"] / best["value_s"],
        ratio_hessp=best["hessp_s"] / best["value_s"],
        **limits(best["value_s"], best["value_gradient_s"], best["hessp_s"], best["forward_solve_s"],
                 best["adjoint_solve_s"]),
        limits_per_repetition=[limits(rep["value_s"], rep["value_gradient_s"], rep["hessp_s"],
                                      rep["forward_solve_s"], rep["adjoint_solve_s"]) for rep in reps],
        median=median, repetitions=reps,
        **pieces,
        value_rest_s=best["value_s"] - pieces["map_s"] - pieces["assembly_s"] - best["factorization_s"]
        - best["forward_solve_s"],
        gradient_rest_s=best["gradient_s"] - best["adjoint_solve_s"],
        hessp_rest_s=best["hessp_s"] - best["tangent_solve_s"] - best["second_adjoint_solve_s"],
        factorizations_per_repetition=max(rep["factorizations"] for rep in reps),
        iterations=reps[-1]["iterations"], factor_nnz=reps[-1]["factor_nnz"],
        value=float(v), gradient_norm=float(np.linalg.norm(g)), hessp_norm=float(np.linalg.norm(h)),
        peak_rss_bytes=eval_peak * GiB, peak_rss_bytes_per_unknown=eval_peak * GiB / N,
        eval_increment_bytes_per_unknown=max(eval_peak - rss_start, 0.0) * GiB / N,
        peak_is_per_phase=meter.can_reset,
    )
    with meter.phase(f"refactorize baseline {dim}D n={n} {solver.name}") as ph:
        row.update(refactorize_gradient(J, p, g, kind, args))
    row["refactorize_peak_rss_bytes"] = ph["peak_GiB"] * GiB if ph["peak_GiB"] is not None else None
    row["refactorize_ratio"] = row["refactorize_gradient_s"] / row["gradient_s"]
    row["refactorize_vg_ratio"] = (row["value_s"] + row["refactorize_gradient_s"]) / row["value_gradient_s"]
    with meter.phase(f"finite differences {dim}D n={n} {solver.name}"):
        row.update(fd_gradient(J, p, g, args, rng))
    row["fd_ratio"] = row["fd_s"] / row["value_gradient_s"] if row.get("fd_s") else None
    row["cache"] = J.cache.info()
    return row


def measure_size(n: int, dim: int, args, meter: Meter) -> None:
    """Build poisson_inversion(n, dim) once, then one row per solver (emitted as soon as it is done)."""
    pi = gallery()
    N = unknowns_of(n, dim)
    kinds = []
    for kind in args.solvers:
        if kind == "direct" and dim == 3 and args.direct_max_3d and N > args.direct_max_3d:
            emit("row", dict(problem=PROBLEM, dim=dim, n=n, unknowns=N, solver=solver_label(kind, args), solver_kind=kind,
                             skipped=f"direct on 3D above --direct-max-3d {args.direct_max_3d} unknowns"))
        else:
            kinds.append(kind)
    if not kinds:
        return
    release_memory()
    rec: dict = {}
    try:
        with meter.phase(f"build {dim}D n={n}") as ph:
            with data_solve_by(lambda: make_bench_solver(kinds[0], args), rec):
                problem = pi.build(n=n, dim=dim)
    except Exception as exc:  # a failed size is recorded, the run goes on
        for kind in kinds:
            emit("row", dict(problem=PROBLEM, dim=dim, n=n, unknowns=N, solver=solver_label(kind, args),
                             solver_kind=kind, error=f"build: {type(exc).__name__}: {exc}",
                             traceback=traceback.format_exc()))
        return
    build = dict(build_s=ph["seconds"], data_solver=kinds[0], **rec,
                 build_peak_rss_bytes_per_unknown=ph["peak_GiB"] * GiB / N if ph["peak_GiB"] else None)
    for kind in kinds:
        try:
            row = measure_row(problem, n, dim, kind, args, meter)
            row.update(build)
        except Exception as exc:  # a failed row is recorded, the run goes on
            row = dict(problem=PROBLEM, dim=dim, n=n, unknowns=N, solver=solver_label(kind, args), solver_kind=kind,
                       error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        emit("row", row)
        release_memory()
    del problem
    release_memory()


def warm_up(args) -> float:
    """Run every code path of a row once on tiny meshes (numba kernels, pyamg, the direct backend), untimed."""
    pi = gallery()
    t0 = time.perf_counter()
    for dim, sizes in ((2, args.sizes2d), (3, args.sizes3d)):
        if sizes:
            problem = pi.build(n=4, dim=dim)
            for kind in args.solvers:
                try:
                    measure_row(problem, 4, dim, kind, args, Meter())
                except Exception:  # the measured rows will record the error
                    pass
    return time.perf_counter() - t0


def worker(args) -> int:
    import numba

    threads = args.worker
    reset_peak()
    info = machine_info(thread_env={v: os.environ.get(v) for v in THREAD_VARS})
    info["threads_requested"] = threads
    info["numba_threads_ok"] = numba.get_num_threads() == threads
    info["warmup_s"] = 0.0 if args.no_warmup else warm_up(args)
    info["blas"] = blas_info()  # after the warm-up: the direct backend (scikit-sparse) is loaded
    meter = Meter()
    info["peak_per_phase"] = meter.can_reset
    emit("info", info)
    for dim, sizes in ((2, args.sizes2d), (3, args.sizes3d)):
        for n in sizes:
            measure_size(n, dim, args, meter)
    emit("done", dict(peak_rss_GiB=max(meter.overall_peak_gib(), peak_rss_gib()), phases=meter.rows))
    return 0


# -- parent: workers, tables, summary, plot -------------------------------------------------------
def fmt(x, spec=".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def progress_line(r: dict) -> str:
    head = f"{r['dim']}D n={r['n']} ({r['unknowns']:,} unknowns) {r.get('solver') or r['solver_kind']}, " \
           f"{r['threads']} thr:"
    if "skipped" in r:
        return f"{head} skipped ({r['skipped']})"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    return (f"{head} value {r['value_s']:.4g} s, value+grad {r['value_gradient_s']:.4g} s "
            f"({r['ratio_value_gradient']:.3f}x, limit {r['limit_value_gradient']:.3f}), hessp {r['hessp_s']:.4g} s "
            f"({r['ratio_hessp']:.3f}x, {r['hessp_over_two_solves']:.2f}x its two solves), "
            f"solves: forward {r['forward_solve_s']:.3g} s, adjoint {r['adjoint_solve_s']:.3g} s, "
            f"FD {fmt(r.get('fd_s'))} s ({r.get('fd_mode')}), refactorize {r['refactorize_ratio']:.2f}x, "
            f"peak {r['peak_rss_bytes_per_unknown']:.0f} B/unknown")


def main_table(rows: list[dict]) -> str:
    header = ["problem", "dim", "unknowns", "solver", "thr", "value s", "v+g s", "hessp s", "(v+g)/v", "hessp/v",
              "RSS B/unk", "+B/unk", "FD s", "FD mode", "FD/(v+g)", "FD err", "refac grad s", "refac/grad",
              "refac diff"]
    out = []
    for r in rows:
        name = r.get("solver") or r["solver_kind"]
        if "skipped" in r or "error" in r:
            out.append([r["problem"], r["dim"], r["unknowns"], name, r["threads"],
                        "skipped" if "skipped" in r else "ERROR"] + ["-"] * (len(header) - 6))
            continue
        out.append([r["problem"], r["dim"], r["unknowns"], name, r["threads"], fmt(r["value_s"], ".4g"),
                    fmt(r["value_gradient_s"], ".4g"), fmt(r["hessp_s"], ".4g"),
                    fmt(r["ratio_value_gradient"], ".3f"), fmt(r["ratio_hessp"], ".3f"),
                    fmt(r["peak_rss_bytes_per_unknown"], ".0f"), fmt(r["eval_increment_bytes_per_unknown"], ".0f"),
                    fmt(r.get("fd_s"), ".3g"), r.get("fd_mode", "-"), fmt(r.get("fd_ratio"), ".3g"),
                    fmt(r.get("fd_rel_err"), ".1e"), fmt(r["refactorize_gradient_s"], ".4g"),
                    fmt(r["refactorize_ratio"], ".2f"), fmt(r["refactorize_max_rel_diff"], ".1e")])
    return table(out, header)


def limit_table(rows: list[dict]) -> str:
    header = ["dim", "unknowns", "solver", "thr", "value s", "t_solve s", "adjoint s", "adj/fwd", "(v+g)/v", "limit",
              "over limit", "hessp s", "hessp/(2 t_solve)"]
    out = []
    for r in measured(rows):
        out.append([r["dim"], r["unknowns"], r["solver"], r["threads"], fmt(r["value_s"], ".4g"),
                    fmt(r["forward_solve_s"], ".4g"), fmt(r["adjoint_solve_s"], ".4g"),
                    fmt(r["adjoint_over_forward"], ".2f"), fmt(r["ratio_value_gradient"], ".3f"),
                    fmt(r["limit_value_gradient"], ".3f"), fmt(r["value_gradient_over_limit"], "+.3f"),
                    fmt(r["hessp_s"], ".4g"), fmt(r["hessp_over_two_solves"], ".2f")])
    return table(out, header)


def phase_table(rows: list[dict]) -> str:
    header = ["dim", "unknowns", "solver", "thr", "map", "assembly", "factor/setup", "(sym check)", "forward",
              "value rest", "adjoint", "grad rest", "tangent+2nd adj", "hessp rest", "iterations"]
    out = []
    for r in rows:
        if "skipped" in r or "error" in r:
            continue
        its = ",".join(f"{k[:3]}{v}" for k, v in r["iterations"].items()) or "-"
        out.append([r["dim"], r["unknowns"], r["solver"], r["threads"], fmt(r["map_s"]), fmt(r["assembly_s"]),
                    fmt(r["factorization_s"]), fmt(r["symmetry_check_s"]), fmt(r["forward_solve_s"]),
                    fmt(r["value_rest_s"]), fmt(r["adjoint_solve_s"]), fmt(r["gradient_rest_s"]),
                    fmt(r["tangent_solve_s"] + r["second_adjoint_solve_s"]), fmt(r["hessp_rest_s"]), its])
    return table(out, header)


def measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "skipped" not in r and "error" not in r]


def thread_scaling(rows: list[dict]) -> list[dict]:
    """t(1 thread) / t(k threads) per (dim, n, solver), where both were measured."""
    by = {}
    for r in measured(rows):
        by.setdefault((r["dim"], r["n"], r["solver"]), {})[r["threads"]] = r
    out = []
    for (dim, n, solver), per in sorted(by.items()):
        if 1 not in per or len(per) < 2:
            continue
        one = per[1]
        for t, r in sorted(per.items()):
            if t == 1:
                continue
            out.append(dict(dim=dim, n=n, unknowns=r["unknowns"], solver=solver, threads=t,
                            **{f"speedup_{k[:-2]}": one[k] / r[k] for k in ("value_s", "value_gradient_s",
                                                                            "hessp_s", "factorization_s")}))
    return out


def summarize(rows: list[dict]) -> dict:
    ok = measured(rows)
    summary = {}
    for key, label, dim, kind, min_n, field, bound in TARGETS:
        cand = [r for r in ok if r["dim"] == dim and r["solver_kind"] == kind]
        hits = [r for r in cand if r["unknowns"] >= min_n and r.get(field) is not None]
        meas = [dict(threads=r["threads"], n=r["n"], unknowns=r["unknowns"], solver=r["solver"], ratio=r[field],
                     met=bool(r[field] <= bound), **{f: r.get(f) for f, _ in TARGET_CONTEXT.get(key, ())})
                for r in hits]
        if meas:
            met, note = all(x["met"] for x in meas), ""
        else:
            largest = max((r["unknowns"] for r in cand), default=None)
            met, note = None, (f"not measured: no {dim}D {kind} row with >= {min_n:,} unknowns "
                               f"(largest measured: {'none' if largest is None else f'{largest:,}'})")
        summary[key] = dict(target=label, bound=bound, min_unknowns=min_n, ratio=field, measured=meas, met=met,
                            note=note)
    diffs = [r["refactorize_max_rel_diff"] for r in ok]
    fd_direct = [r["fd_rel_err"] for r in ok if r["solver_kind"] == "direct" and r.get("fd_rel_err") is not None]
    fd_amg = [r["fd_rel_err"] for r in ok if r["solver_kind"] == "amg" and r.get("fd_rel_err") is not None]
    summary["checks"] = dict(
        refactorize_max_rel_diff=max(diffs, default=None), refactorize_all_ok=all(r["refactorize_ok"] for r in ok),
        fd_rel_err_direct_max=max(fd_direct, default=None), fd_rel_err_amg_max=max(fd_amg, default=None),
        rows=len(rows), rows_measured=len(ok), rows_skipped=sum("skipped" in r for r in rows),
        rows_failed=sum("error" in r for r in rows),
    )
    return summary


def _target_numbers(key: str, x: dict) -> str:
    """A target's measurement in the summary: its ratio (signed for a gap) and the fields it is made of."""
    ratio = f"{x['ratio']:+.3f}" if key.endswith("_limit") else f"{x['ratio']:.3f}"
    ctx = ", ".join(f"{label} {fmt(x.get(field), '.4g')}" for field, label in TARGET_CONTEXT.get(key, ()))
    return (f"n={x['n']} ({x['unknowns']:,} unknowns, {x['solver']}, {x['threads']} thr): {ratio}"
            + (f" [{ctx}]" if ctx else "") + ("" if x["met"] else " (over)"))


def summary_text(summary: dict) -> str:
    lines = ["Targets:"]
    for key, *_ in TARGETS:
        s = summary[key]
        state = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[s["met"]]
        nums = "; ".join(_target_numbers(key, x) for x in s["measured"])
        lines.append(f"  {s['target']}: {state}" + (f" -- {nums}" if nums else f" -- {s['note']}"))
    c = summary["checks"]
    lines.append(f"Checks: refactorize gradient = adjopt gradient to {fmt(c['refactorize_max_rel_diff'], '.1e')} "
                 f"(max rel, bound {REFACTORIZE_TOL:g}: {'ok' if c['refactorize_all_ok'] else 'FAILED'}); "
                 f"FD vs adjoint rel err: direct {fmt(c['fd_rel_err_direct_max'], '.1e')}, "
                 f"AMG {fmt(c['fd_rel_err_amg_max'], '.1e')}; rows measured {c['rows_measured']}, "
                 f"skipped {c['rows_skipped']}, failed {c['rows_failed']}")
    return "\n".join(lines)


def plot(path: str, rows: list[dict]) -> bool:
    ok = measured(rows)
    if not ok:
        return False
    tmax = max(r["threads"] for r in ok)
    series = {}
    for dim in (2, 3):
        for solver in sorted({r["solver"] for r in ok}):
            sel = sorted((r for r in ok if r["dim"] == dim and r["solver"] == solver and r["threads"] == tmax),
                         key=lambda r: r["unknowns"])
            if not sel:
                continue
            x = [r["unknowns"] for r in sel]
            for key, name in (("value_s", "value"), ("value_gradient_s", "value+grad"), ("hessp_s", "hessp")):
                series[f"{dim}D {solver} {name}"] = (x, [r[key] / r["unknowns"] for r in sel])
    title = f"{PROBLEM}: time per unknown ({tmax} thread{'s' if tmax > 1 else ''})"
    try:  # one colour per (dim, solver), one line style per quantity (the default cycle repeats after 10)
        import matplotlib
        from cycler import cycler
    except ImportError:
        return loglog_plot(path, series, "unknowns", "seconds per unknown", title)
    groups = len(series) // 3
    colors = [c for c in ("tab:blue", "tab:orange", "tab:green", "tab:red")[:groups] for _ in range(3)]
    style = cycler(color=colors) + cycler(linestyle=["-", "--", ":"] * groups)
    with matplotlib.rc_context({"axes.prop_cycle": style}):
        return loglog_plot(path, series, "unknowns", "seconds per unknown", title)


def run_worker(args, argv: list[str], threads: int, data: dict, out: str) -> dict:
    env = dict(os.environ)
    for v in THREAD_VARS:
        env[v] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", str(threads)]
    rec = dict(threads=threads, info=None, returncode=None, done=False)
    data["workers"].append(rec)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
    for line in proc.stdout:
        if not line.startswith(MARK):
            print(line, end="", flush=True)
            continue
        msg = json.loads(line[len(MARK):])
        if msg["type"] == "info":
            rec["info"] = msg["data"]
            if not msg["data"].get("numba_threads_ok", True):
                print(f"warning: the worker runs numba with {msg['data']['threads']} threads, not {threads}")
        elif msg["type"] == "row":
            row = dict(msg["data"], threads=threads)
            data["rows"].append(row)
            print(progress_line(row), flush=True)
            write_json(out, data)
        elif msg["type"] == "done":
            rec.update(done=True, peak_rss_GiB=msg["data"]["peak_rss_GiB"], phases=msg["data"]["phases"])
    rec["returncode"] = proc.wait()
    if rec["returncode"] != 0:
        print(f"worker with {threads} thread(s) exited with status {rec['returncode']}", flush=True)
    write_json(out, data)
    return rec


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    if args.direct_note:
        print(f"note: {args.direct_note}")
    if "direct" in args.solvers and args.direct_used != "cholmod":
        print(f"direct solver: {args.direct_used}")
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    config.update(problem=PROBLEM, thread_vars=list(THREAD_VARS), refactorize_tol=REFACTORIZE_TOL,
                  data_check_limit=DATA_CHECK_LIMIT)
    data = dict(info=machine_info(script="scripts/bench_scaling.py", argv=argv), config=config, complete=False,
                rows=[], workers=[], thread_scaling=[], summary=None)
    write_json(args.out, data)
    t0 = time.perf_counter()
    for t in args.threads:
        run_worker(args, argv, t, data, args.out)
    rows = data["rows"]
    got = {(r["threads"], r["dim"], r["n"], r["solver_kind"]) for r in rows}
    data["missing"] = [dict(threads=t, dim=d, n=n, solver_kind=k) for t in args.threads
                       for d, sizes in ((2, args.sizes2d), (3, args.sizes3d)) for n in sizes for k in args.solvers
                       if (t, d, n, k) not in got]  # a worker that died (out of memory?) before the row
    data["thread_scaling"] = thread_scaling(rows)
    blas = [w["info"]["blas"] for w in data["workers"] if w.get("info") and w["info"].get("blas")]
    data["info"]["blas"] = blas[-1] if blas else None  # the workers' (thread counts differ, libraries do not)
    data["summary"] = summarize(rows)
    data["total_s"] = time.perf_counter() - t0
    data["info"]["loadavg_after"] = machine_info()["loadavg"]
    data["plot"] = args.plot if plot(args.plot, rows) else None
    data["complete"] = True
    write_json(args.out, data)

    print()
    print(main_table(rows))
    print()
    print("Phases (seconds, best of repeat; map and assembly timed apart, factorization includes the symmetry check):")
    print(phase_table(rows))
    print()
    print("Limits (same run; t_solve = the value's forward solve on its factor; over limit = (v+g)/v - limit):")
    print(limit_table(rows))
    if data["thread_scaling"]:
        print()
        print("Thread scaling (t(1 thread) / t(k threads)):")
        print(table([[s["dim"], s["unknowns"], s["solver"], s["threads"], fmt(s["speedup_value"], ".2f"),
                      fmt(s["speedup_value_gradient"], ".2f"), fmt(s["speedup_hessp"], ".2f"),
                      fmt(s["speedup_factorization"], ".2f")] for s in data["thread_scaling"]],
                    ["dim", "unknowns", "solver", "threads", "value", "value+grad", "hessp", "factor/setup"]))
    print()
    print(summary_text(data["summary"]))
    print(blas_line(data["info"]["blas"]))
    print(f"wrote {args.out}" + (f" and {args.plot}" if data["plot"] else " (no plot: matplotlib missing or no rows)"))
    if data["missing"]:
        print(f"missing rows (worker died): {data['missing']}")
    failed = [w for w in data["workers"] if w["returncode"] != 0]
    return 1 if failed or data["missing"] or data["summary"]["checks"]["rows_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
