"""Bayesian Poisson inversion: MAP point, low-rank Laplace posterior and its spectrum under refinement.

Usage: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_uq.py
       [--sizes 256 1024] [--spectrum-sizes 32 64 128 256] [--no-compare [N ...]]
       [--rank 80] [--oversampling 10] [--passes 2] [--spectrum-rank 40] [--spectrum-oversampling 20]
       [--gtol 1e-8] [--maxiter 100] [--repeat 3] [--singles 5] [--solver auto] [--direct-limit N]
       [--seed 0] [--quick] [--out scripts/results/bench_uq.json] [--plot PATH | --no-plot] [--no-warmup]

Run it with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset (``env -u``, as above) as the other benchmarks
are; the JSON records the command line and those variables as the process saw them (``env_unset``,
``env_unset_ok``), the machine and BLAS (``info``, ``info.blas``: threadpoolctl), the load average before and
after every phase, and the git state.

Problem: ``problems/poisson_inversion.py``, ``build(n, regularization="bilaplacian")``: nodal log-conductivity
m on ``unit_square(n)`` ((n+1)^2 parameters, (n-1)^2 state unknowns), 50 point observations with 1% noise, the
Matérn prior ``BiLaplacianPrior.from_correlation(mesh, 0.25, 1.0)`` as the regularization: J is the negative
log-posterior. Solver (``--solver``, default ``auto``): ``auto`` is ``AutoSolver(direct_limit=--direct-limit)``
for the state equation and for the prior's operator A. adjopt's own ``auto`` switches to AMG above 300,000
unknowns (n = 1024 has 1,046,529); the default ``--direct-limit`` here (10^9) keeps a factorization at every
size, so ``auto`` means CHOLMOD when scikit-sparse is installed (else PARDISO, else SuperLU). The backend
chosen is recorded per size (``solver_chosen``).

1. Per ``--sizes`` n:

   * ``build_s`` (including the synthetic data solve), ``first_value_s`` (an untimed value at p0: the symbolic
     analysis), ``t_value`` = median over ``--repeat`` values at NEW p (small random perturbations of p0 = 0,
     never cached: a factorization and a solve each);
   * the MAP point by Newton-CG (``adjopt.minimize(problem, method="newton-cg", preconditioner=..., gtol=--gtol)``)
     with ``preconditioner="lowrank"`` and then, from the same start, ``"h1"`` (``--no-compare`` skips the latter
     at every size, ``--no-compare N ...`` at those sizes; the JSON says when). gtol is relative: the run stops
     when the stationarity sqrt(g^T M^{-1} g) (M the mass matrix, the default "l2" inner product) is at most
     gtol times its value at the start (``poisson_inversion.RUN_DEFAULTS`` uses 1e-8). Recorded: Newton
     iterations (``nit``), Hessian actions (``nhessp``: a block of k counts k; for "lowrank" it includes the
     preconditioner's randomized double pass; ``actions_outside_cg`` = nhessp - the CG iterations of the
     history: that double pass, plus the CG actions of an iteration that ended the run without a history entry,
     e.g. a line search stopped at round-off), CG
     iterations per step, values, gradients, time, success and message, and ``reached``: the first iteration
     (and the Hessian actions spent by then) at which the stationarity fell below 1e-4, 1e-6 and 1e-8 of its
     start (a comparison that holds also when one run stops short of gtol);
   * ``LaplacePosterior(J, m_map, rank=--rank, oversampling=--oversampling, passes=--passes, rng=--seed)``:
     total time, the Hessian actions it spent (``eig.actions``; 2 (rank + oversampling) unless the sketch is
     rank-deficient), ``ratio_values`` = its time / t_value against ``VALUES_TARGET`` (12), and its parts:
     ``t_hessp_blocks`` (wall time of the blocked Hessian actions, through a timing wrapper of J),
     ``t_prior`` (the prior's R V and R^{-1} V, timed on the prior object) and ``t_rest`` (the rest: the QR and
     R-orthonormalization of the sketch, the small eigenproblem, the stationarity check). For comparison
     ``--singles`` single (1-column) Hessian actions at m_map: ``t_single_action`` (mean), ``t_singles_scaled``
     = t_single_action x actions, and ``blocked_saving`` = t_singles_scaled / t_hessp_blocks (> 1: the blocked
     solves saved time). Also ``post.variance(rng=seed)`` time (exact for <= 20000 parameters, else a Monte
     Carlo estimate from 500 samples: ``variance_method``), the KL divergence, the Newton decrement, and the leading /
     trailing eigenvalues with their residuals.

2. Per ``--spectrum-sizes`` n: the MAP point (Newton-CG "lowrank"; reused from step 1 for a size in both lists)
   and the leading ``--spectrum-rank`` eigenvalues of ``LaplacePosterior(..., rank=--spectrum-rank,
   oversampling=--spectrum-oversampling)``. ``spectrum.differences``: per size, the maximum relative difference
   max_i |lambda_i(n) / lambda_i(finest) - 1| over the leading 10, 20, 30 and all (``vs_finest``), and against
   the next finer size (``vs_next``); ``reduction_vs_next`` = the ratio of consecutive ``vs_next`` differences
   (about 4 for O(h^2) convergence). A plot of the spectra (log eigenvalue against index, one line per size,
   a line at 1) goes to ``--plot`` (default ``uq_eigenvalues.png`` beside ``--out``; skipped with a note when
   matplotlib is missing).

``--quick``: sizes 8 16, spectrum sizes 8 16, rank 10, oversampling 10 (also of the spectrum),
repeat 2, singles 2 (the tests use it). The JSON (``--out``; default ``scripts/results/bench_uq.json``,
``bench_uq_quick.json`` with ``--quick``) is written atomically (temporary file + ``os.replace``) after every
phase, ``complete: false`` until the end. Exit status 2 for bad input (argparse), 1 when a size failed.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import traceback
import warnings

import numpy as np
from _bench_common import blas_info, fmt, gallery, loadavg, machine_info, median, peak_rss_gib, release_memory, save_png, table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "scripts", "results")
SCRIPT = "scripts/bench_uq.py"
ENV_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: the target of the issue: the Laplace posterior costs at most this many values
VALUES_TARGET = 12
#: stationarity levels (relative to the start) at which the Newton runs are compared
LEVELS = (1e-4, 1e-6, 1e-8)
#: leading counts of eigenvalues whose relative differences are reported
LEADING = (10, 20, 30, 40)
#: how many leading / trailing eigenvalues the tables show
SHOW = 5
SOLVERS = ("auto", "cholmod", "superlu", "pardiso", "amg")
MIN_SIZE = 4
DEFAULTS = dict(sizes=[256, 1024], spectrum_sizes=[32, 64, 128, 256], rank=80, oversampling=10, spectrum_rank=40,
                spectrum_oversampling=20, repeat=3, singles=5)
QUICK = dict(sizes=[8, 16], spectrum_sizes=[8, 16], rank=10, oversampling=10, spectrum_rank=10,
             spectrum_oversampling=10, repeat=2, singles=2)


# -- command line ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--sizes", type=int, nargs="*", default=None, metavar="N",
                    help="cells per side of the posterior runs (default 256 1024)")
    ap.add_argument("--spectrum-sizes", type=int, nargs="*", default=None, metavar="N",
                    help="cells per side of the spectrum under refinement (default 32 64 128 256)")
    ap.add_argument("--no-compare", type=int, nargs="*", default=None, metavar="N",
                    help="skip the Newton-CG 'h1' comparison: at every size (no value) or at the sizes given")
    ap.add_argument("--rank", type=int, default=None, help="eigenpairs of the Laplace posterior (default 80)")
    ap.add_argument("--oversampling", type=int, default=None, help="extra sketch columns (default 10)")
    ap.add_argument("--passes", type=int, default=2, choices=(1, 2), help="randomized passes (default 2)")
    ap.add_argument("--spectrum-rank", type=int, default=None, help="eigenvalues compared across sizes (default 40)")
    ap.add_argument("--spectrum-oversampling", type=int, default=None,
                    help="extra sketch columns of the spectrum runs (default 20)")
    ap.add_argument("--gtol", type=float, default=None,
                    help="Newton-CG gtol, relative to the start's stationarity (default: poisson_inversion's 1e-8)")
    ap.add_argument("--maxiter", type=int, default=100, help="Newton iterations at most (default 100)")
    ap.add_argument("--repeat", type=int, default=None, help="values timed, each at a new p (default 3)")
    ap.add_argument("--singles", type=int, default=None, help="single Hessian actions timed (default 5)")
    ap.add_argument("--solver", default="auto", choices=SOLVERS, help="solver of the state and the prior (default auto)")
    ap.add_argument("--direct-limit", type=int, default=10**9,
                    help="unknowns above which 'auto' takes AMG (default 10^9: always a factorization; adjopt's "
                         "own default is 300000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the perturbations, directions and sketches")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (8 16, rank 10)")
    ap.add_argument("--out", default=None, help="JSON output (default scripts/results/bench_uq.json)")
    ap.add_argument("--plot", default=None, help="PNG of the spectra (default uq_eigenvalues.png beside --out)")
    ap.add_argument("--no-plot", action="store_true", help="write no plot")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up on a tiny mesh")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("sizes", "spectrum_sizes"):
        bad = [n for n in getattr(args, name) if n < MIN_SIZE]
        if bad:
            ap.error(f"--{name.replace('_', '-')} must be >= {MIN_SIZE} (cells per side), got {bad}")
        setattr(args, name, sorted(set(getattr(args, name))))
    if not args.sizes and not args.spectrum_sizes:
        ap.error("nothing to do: --sizes and --spectrum-sizes are both empty")
    if args.no_compare is not None:
        bad = [n for n in args.no_compare if n not in args.sizes]
        if bad:
            ap.error(f"--no-compare: {bad} not among --sizes {args.sizes}")
    for name in ("rank", "spectrum_rank", "repeat", "singles", "maxiter"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("oversampling", "spectrum_oversampling", "seed", "direct_limit"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.gtol is None:
        args.gtol = float(gallery().RUN_DEFAULTS.get("gtol", 1e-8))
    if not (math.isfinite(args.gtol) and args.gtol > 0):
        ap.error(f"--gtol must be a finite number > 0, got {args.gtol}")
    if args.out is None:
        args.out = os.path.join(RESULTS, "bench_uq_quick.json" if args.quick else "bench_uq.json")
    d = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        ap.error(f"--out: folder {d} does not exist or is not writable")
    if args.no_plot:
        args.plot = None
    elif args.plot is None:
        args.plot = os.path.join(d, "uq_eigenvalues_quick.png" if args.quick else "uq_eigenvalues.png")
    else:
        pd = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(pd) or not os.access(pd, os.W_OK):
            ap.error(f"--plot: folder {pd} does not exist or is not writable")
    return args


def compare_at(n: int, args) -> bool:
    """Whether the 'h1' comparison runs at size n."""
    return args.no_compare is None or (len(args.no_compare) > 0 and n not in args.no_compare)


# -- the problem ----------------------------------------------------------------------------------
def make_solver(args):
    from adjopt.solvers import make_solver as by_name
    from adjopt.solvers.auto import AutoSolver

    return AutoSolver(direct_limit=args.direct_limit) if args.solver == "auto" else by_name(args.solver)


def build(n: int, args) -> tuple:
    """(problem, build seconds): poisson_inversion with the Bayesian prior, both operators on ``--solver``."""
    t0 = time.perf_counter()
    problem = gallery().build(n=n, regularization="bilaplacian")
    problem.functional.solver = make_solver(args)
    prior = problem.meta["regularization"]  # alpha = 1: the BiLaplacianPrior itself
    if getattr(prior, "_fac", None) is None and hasattr(prior, "solver"):
        prior.solver = make_solver(args)  # factorized on first use: A of the prior is SPD too
    return problem, time.perf_counter() - t0


def solver_name(solver) -> str:
    chosen = getattr(solver, "chosen", None)
    return chosen.name if chosen is not None else solver.name


class TimedFunctional:
    """J seen through a wrapper that times its Hessian actions and gradients (what the posterior calls)."""

    def __init__(self, J):
        self.J = J
        self.t_hessp = 0.0
        self.hessp_columns = 0
        self.hessp_calls = 0
        self.t_gradient = 0.0

    def __getattr__(self, name):
        return getattr(self.J, name)

    def hessp(self, p, V, *a, **kw):
        t0 = time.perf_counter()
        out = self.J.hessp(p, V, *a, **kw)
        self.t_hessp += time.perf_counter() - t0
        self.hessp_columns += V.shape[1] if np.ndim(V) == 2 else 1
        self.hessp_calls += 1
        return out

    def gradient(self, p, *a, **kw):
        t0 = time.perf_counter()
        out = self.J.gradient(p, *a, **kw)
        self.t_gradient += time.perf_counter() - t0
        return out


def timed_prior(J):
    """The GaussianPrior of J.objective with its precision and covariance timed (instance attributes)."""
    from adjopt.uq import GaussianPrior

    prior = GaussianPrior.of(J.objective, J.n_params)
    clock = dict(precision=0.0, covariance=0.0, precision_columns=0, covariance_columns=0)
    for name in ("precision", "covariance"):
        f = getattr(prior, name)

        def timed(V, _f=f, _name=name):
            t0 = time.perf_counter()
            out = _f(V)
            clock[_name] += time.perf_counter() - t0
            clock[_name + "_columns"] += V.shape[1] if np.ndim(V) == 2 else 1
            return out

        setattr(prior, name, timed)
    return prior, clock


# -- the measurements -----------------------------------------------------------------------------
def new_p(rng, m: int) -> np.ndarray:
    """A new parameter near p0 = 0 (never cached)."""
    return 1e-3 * rng.standard_normal(m)


def newton(problem, preconditioner: str, args) -> tuple[dict, np.ndarray]:
    """Newton-CG to the MAP point from p0: (record, x)."""
    import adjopt

    release_memory()
    load = loadavg()
    t0 = time.perf_counter()
    res = adjopt.minimize(problem, method="newton-cg", preconditioner=preconditioner, gtol=args.gtol,
                          maxiter=args.maxiter)
    t = time.perf_counter() - t0
    hist = res.history
    cg = [int(h.get("cg_iterations", 0)) for h in hist[1:]]
    g0 = hist[0]["stationarity"]
    reached = {}
    for level in LEVELS:
        hit = next((h for h in hist if h["stationarity"] <= level * g0), None)
        reached[f"{level:g}"] = None if hit is None else dict(nit=int(hit["nit"]), nhessp=int(hit["nhessp"]),
                                                              cg_iterations=sum(cg[: int(hit["nit"])]))
    rec = dict(preconditioner=preconditioner, seconds=t, nit=int(res.nit), nhessp=int(res.nhessp),
               cg_iterations=int(sum(cg)), cg_per_step=cg, actions_outside_cg=int(res.nhessp) - int(sum(cg)),
               nfev=int(res.nfev), njev=int(res.njev), factorizations=int(res.factorizations), solves=int(res.solves),
               success=bool(res.success), message=res.message, f=float(res.fun), stationarity0=float(g0),
               stationarity=float(res.stationarity), gtarget=float(args.gtol * g0), gtol=args.gtol,
               relative_stationarity=float(res.stationarity / g0) if g0 > 0 else None,
               stationarity_history=[float(h["stationarity"]) for h in hist],
               gauss_newton_steps=sum(bool(h.get("gauss_newton")) for h in hist[1:]),
               negative_curvature_steps=sum(bool(h.get("negative_curvature")) for h in hist[1:]),
               step_seconds=[float(h.get("time", 0.0)) for h in hist[1:]],
               update_seconds=float(sum(h.get("phases", {}).get("update", 0.0) for h in hist[1:])),
               warnings=list(res.warnings), reached=reached, loadavg_before=load, loadavg_after=loadavg())
    return rec, np.array(res.x)


def posterior(J, m_map: np.ndarray, rank: int, oversampling: int, args) -> tuple[dict, object]:
    """The Laplace posterior at m_map with its time split into Hessian blocks, prior and the rest."""
    from adjopt.uq import LaplacePosterior

    release_memory()
    TJ = TimedFunctional(J)
    prior, pclock = timed_prior(J)
    load = loadavg()
    J.reset_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        post = LaplacePosterior(TJ, m_map, prior=prior, rank=rank, oversampling=oversampling, passes=args.passes,
                                rng=args.seed)
        t = time.perf_counter() - t0
    stats = J.stats.as_dict()
    lam, res = post.values, post.eig.residuals
    k = min(rank + oversampling, J.n_params)
    t_prior = pclock["precision"] + pclock["covariance"]
    rec = dict(rank=rank, rank_returned=int(lam.size), oversampling=oversampling, passes=args.passes, seconds=t,
               actions=int(post.eig.actions), actions_expected=2 * k if args.passes == 2 else k,
               hessp_columns=TJ.hessp_columns, hessp_calls=TJ.hessp_calls, t_hessp_blocks=TJ.t_hessp,
               t_prior=t_prior, prior_clock=dict(pclock), t_gradient=TJ.t_gradient,
               t_rest=t - TJ.t_hessp - t_prior - TJ.t_gradient,
               phases={key: float(v) for key, v in J.times.items()}, solver_stats=stats,
               decrement=float(post.decrement), eigenvalues=lam.tolist(), residuals=res.tolist(),
               eigenvalues_above_1=int(np.sum(lam > 1.0)), negative_eigenvalues=int(np.sum(lam < 0)),
               max_residual_leading10=float(np.nanmax(res[:10])) if res.size else None,
               warnings=[str(w.message) for w in caught], loadavg_before=load, loadavg_after=loadavg())
    return rec, post


def single_actions(J, m_map: np.ndarray, count: int, rng) -> dict:
    """``count`` single (1-column) Hessian actions at m_map (its state and adjoint are cached), each timed."""
    times = []
    for _ in range(count):
        v = rng.standard_normal(J.n_params)
        t0 = time.perf_counter()
        J.hessp(m_map, v)
        times.append(time.perf_counter() - t0)
    return dict(count=count, times=times, t_single_action=float(np.mean(times)), t_single_median=median(times))


def measure_size(n: int, args, keep: dict) -> dict:
    """Step 1 at one size (see the module docstring)."""
    row = dict(n=n, nodes=(n + 1) ** 2, unknowns=(n - 1) ** 2, loadavg_before=loadavg())
    problem, row["build_s"] = build(n, args)
    J = problem.functional
    m = J.n_params
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    J.value(problem.p0)  # untimed in t_value: the symbolic analysis of the pattern, the solver's choice
    row["first_value_s"] = time.perf_counter() - t0
    row["solver_requested"] = args.solver
    row["solver_chosen"] = solver_name(J.solver)
    prior = problem.meta["regularization"]
    times, facts = [], []
    for _ in range(args.repeat):
        p = new_p(rng, m)
        J.reset_stats()
        t0 = time.perf_counter()
        J.value(p)
        times.append(time.perf_counter() - t0)
        facts.append(J.stats.factorizations)
    row.update(t_value=median(times), t_values=times, value_factorizations=facts)
    print(f"n={n}: {m:,} parameters, {row['unknowns']:,} unknowns ({row['solver_chosen']}), build "
          f"{row['build_s']:.3g} s, t_value {row['t_value']:.4g} s", flush=True)

    low, x_low = newton(problem, "lowrank", args)
    row["newton_lowrank"] = low
    print(f"  Newton-CG lowrank: {low['nit']} its, {low['nhessp']} Hessian actions ({low['cg_iterations']} CG), "
          f"{low['seconds']:.3g} s, {'converged' if low['success'] else 'NOT converged: ' + low['message']}", flush=True)
    if compare_at(n, args):
        h1, x_h1 = newton(problem, "h1", args)
        h1["map_rel_diff_to_lowrank"] = float(np.linalg.norm(x_h1 - x_low) / max(np.linalg.norm(x_low), 1e-300))
        row["newton_h1"] = h1
        row["compare"] = compare(low, h1)
        print(f"  Newton-CG h1:      {h1['nit']} its, {h1['nhessp']} Hessian actions ({h1['cg_iterations']} CG), "
              f"{h1['seconds']:.3g} s, {'converged' if h1['success'] else 'NOT converged: ' + h1['message']}",
              flush=True)
    else:
        row["newton_h1"] = dict(skipped="--no-compare")
        row["compare"] = None
        print("  Newton-CG h1: skipped (--no-compare)", flush=True)
    # the MAP point is the lowrank run's; make its state the cached one
    J.value(x_low)
    J.gradient(x_low)

    rank = min(args.rank, m)
    post_rec, post = posterior(J, x_low, rank, args.oversampling, args)
    if rank < args.rank:
        post_rec["note"] = f"rank {args.rank} exceeds the {m} parameters: {rank} asked"
    tv = row["t_value"]
    post_rec.update(ratio_values=post_rec["seconds"] / tv, values_target=VALUES_TARGET,
                    met_values=post_rec["seconds"] / tv <= VALUES_TARGET, ratio_hessp_blocks_values=post_rec["t_hessp_blocks"] / tv)
    singles = single_actions(J, x_low, args.singles, rng)
    singles["t_singles_scaled"] = singles["t_single_action"] * post_rec["actions"]
    singles["ratio_values_scaled"] = singles["t_singles_scaled"] / tv
    singles["blocked_saving"] = singles["t_singles_scaled"] / post_rec["t_hessp_blocks"]
    singles["t_singles_scaled_median"] = singles["t_single_median"] * post_rec["actions"]
    singles["blocked_saving_median"] = singles["t_singles_scaled_median"] / post_rec["t_hessp_blocks"]
    singles["t_block_per_action"] = post_rec["t_hessp_blocks"] / max(post_rec["hessp_columns"], 1)
    post_rec["singles"] = singles
    t0 = time.perf_counter()
    var = post.variance(rng=args.seed)
    post_rec["t_variance"] = time.perf_counter() - t0
    post_rec["variance_method"] = variance_method(m)
    post_rec["variance_min_max_mean"] = [float(var.min()), float(var.max()), float(var.mean())]
    t0 = time.perf_counter()
    post_rec["kl_divergence"] = float(post.kl_divergence())
    post_rec["t_kl"] = time.perf_counter() - t0
    row["posterior"] = post_rec
    row["prior_solver"] = solver_name(prior.solver) if hasattr(prior, "solver") else None
    post = None
    release_memory()
    row["kernels"] = linalg_kernels(J, min(rank + args.oversampling, m), rng)
    row["peak_rss_GiB"] = peak_rss_gib()
    row["loadavg_after"] = loadavg()
    if n in args.spectrum_sizes and low["success"]:
        keep[n] = x_low
    print(f"  Laplace posterior rank {rank}: {post_rec['seconds']:.3g} s = {post_rec['ratio_values']:.3g} values "
          f"(target {VALUES_TARGET}), {post_rec['actions']} actions in {post_rec['t_hessp_blocks']:.3g} s; "
          f"{args.singles} single actions scaled: {singles['t_singles_scaled']:.3g} s "
          f"(x{singles['blocked_saving']:.2f}); variance {post_rec['t_variance']:.3g} s", flush=True)
    return row


def linalg_kernels(J, k: int, rng) -> dict:
    """Pieces of the eigensolver's own work timed alone on an (m, k) Gaussian block (k = the sketch's columns):
    the column-pivoted QR it starts the orthonormalization with, a plain QR for comparison, and the prior's
    R V on a C-ordered block and on a Fortran-ordered one (what a QR returns)."""
    import scipy.linalg as sla

    from adjopt.uq import GaussianPrior

    prior = GaussianPrior.of(J.objective, J.n_params)
    Y = rng.standard_normal((J.n_params, max(k, 1)))
    out = dict(columns=int(Y.shape[1]))
    t0 = time.perf_counter()
    Q = sla.qr(Y, mode="economic", pivoting=True)[0]
    out["qr_pivoted"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sla.qr(Y, mode="economic")
    out["qr_plain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prior.precision(Y)
    out["precision_c_order"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prior.precision(Q)
    out["precision_f_order"] = time.perf_counter() - t0
    out["q_fortran_ordered"] = bool(Q.flags.f_contiguous and not Q.flags.c_contiguous)
    return out


def variance_method(m: int) -> str:
    """How ``LaplacePosterior.variance()`` computes the variance of m parameters (as adjopt.uq says)."""
    from adjopt import uq

    limit = getattr(uq, "EXACT_VARIANCE_LIMIT", None)
    if limit is not None:  # exact up to the limit, else from posterior samples
        return "exact" if m <= limit else "Monte Carlo from 500 posterior samples"
    from adjopt.priors import EXACT_VARIANCE_LIMIT

    return "exact" if m <= EXACT_VARIANCE_LIMIT else "the prior's Monte Carlo estimate (500 samples) minus the low-rank part"


def compare(low: dict, h1: dict) -> dict:
    """lowrank against h1: Hessian actions and Newton iterations to convergence and to common levels."""
    out = dict(both_converged=low["success"] and h1["success"],
               actions_ratio_h1_over_lowrank=h1["nhessp"] / low["nhessp"] if low["nhessp"] else None,
               nit_lowrank=low["nit"], nit_h1=h1["nit"], nhessp_lowrank=low["nhessp"], nhessp_h1=h1["nhessp"],
               cg_lowrank=low["cg_iterations"], cg_h1=h1["cg_iterations"], seconds_lowrank=low["seconds"],
               seconds_h1=h1["seconds"])
    for level in LEVELS:
        a, b = low["reached"][f"{level:g}"], h1["reached"][f"{level:g}"]
        out[f"at_{level:g}"] = dict(nhessp_lowrank=a and a["nhessp"], nhessp_h1=b and b["nhessp"],
                                    nit_lowrank=a and a["nit"], nit_h1=b and b["nit"])
    return out


def spectrum_at(n: int, args, keep: dict) -> dict:
    """Step 2 at one size: the leading eigenvalues of the Laplace posterior at the MAP point."""
    row = dict(n=n, nodes=(n + 1) ** 2, loadavg_before=loadavg())
    problem, row["build_s"] = build(n, args)
    J = problem.functional
    if n in keep:
        x = keep[n]
        row["map_from"] = "the --sizes run of this size (Newton-CG lowrank)"
    else:
        rec, x = newton(problem, "lowrank", args)
        row["map_from"] = "Newton-CG lowrank"
        row["newton_lowrank"] = {k: rec[k] for k in ("nit", "nhessp", "cg_iterations", "seconds", "success", "message",
                                                     "relative_stationarity")}
    J.value(x)
    rank = min(args.spectrum_rank, J.n_params)
    rec, _ = posterior(J, x, rank, args.spectrum_oversampling, args)
    row["solver_chosen"] = solver_name(J.solver)
    row.update({k: rec[k] for k in ("rank", "rank_returned", "oversampling", "seconds", "actions", "decrement",
                                    "eigenvalues", "residuals", "eigenvalues_above_1", "negative_eigenvalues",
                                    "warnings")})
    row["loadavg_after"] = loadavg()
    print(f"spectrum n={n}: {row['rank_returned']} eigenvalues {rec['eigenvalues'][0]:.4g} .. "
          f"{rec['eigenvalues'][-1]:.4g} in {row['seconds']:.3g} s ({row['actions']} actions)", flush=True)
    return row


def rel_diff(a, b, k: int):
    """max_i<k |a_i / b_i - 1|, None when either has fewer than k values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < k or b.size < k:
        return None
    return float(np.max(np.abs(a[:k] / b[:k] - 1.0)))


def differences(rows: list[dict], rank: int) -> dict:
    """Relative differences of the leading eigenvalues against the finest size and the next finer one."""
    got = sorted((r for r in rows if "eigenvalues" in r), key=lambda r: r["n"])
    counts = sorted({k for k in (*LEADING, rank) if k <= rank})
    if not got:
        return {}
    fine = got[-1]
    out = dict(finest=fine["n"], leading=counts, vs_finest={}, vs_next={}, reduction_vs_finest={},
               reduction_vs_next={})
    for i, r in enumerate(got[:-1]):
        out["vs_finest"][str(r["n"])] = {str(k): rel_diff(r["eigenvalues"], fine["eigenvalues"], k) for k in counts}
        nxt = got[i + 1]
        out["vs_next"][f"{r['n']}/{nxt['n']}"] = {str(k): rel_diff(r["eigenvalues"], nxt["eigenvalues"], k)
                                                  for k in counts}
    for name, red in (("vs_finest", "reduction_vs_finest"), ("vs_next", "reduction_vs_next")):
        keys = list(out[name])
        for a, b in zip(keys, keys[1:]):
            out[red][f"{a} -> {b}"] = {k: (out[name][a][k] / out[name][b][k]
                                           if out[name][a][k] is not None and out[name][b][k] else None)
                                       for k in out[name][a]}
    return out


def spectrum_plot(path: str, rows: list[dict]) -> str | None:
    """Log eigenvalue against index, one line per size, a line at 1: None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in sorted(rows, key=lambda r: r["n"]):
        if "eigenvalues" not in r:
            continue
        lam = np.asarray(r["eigenvalues"])
        idx = np.arange(1, lam.size + 1)
        pos = lam > 0
        ax.semilogy(idx[pos], lam[pos], marker="o", markersize=3, label=f"n = {r['n']} ({r['nodes']:,} nodes)")
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--", label="lambda = 1")
    ax.set_xlabel("index i")
    ax.set_ylabel("eigenvalue lambda_i of H v = lambda R v")
    ax.set_title("Laplace posterior at the MAP point: leading eigenvalues")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    return None


def warm_up(args) -> float:
    """Every code path once on a tiny mesh (numba kernels, the solvers), untimed."""
    t0 = time.perf_counter()
    quiet = argparse.Namespace(**{**vars(args), "repeat": 1, "singles": 1, "maxiter": 3, "rank": 4,
                                  "oversampling": 2, "spectrum_sizes": []})
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measure_size(MIN_SIZE + 2, quiet, {})
    except Exception:  # noqa: BLE001 - the measured sizes will record any error
        pass
    return time.perf_counter() - t0


# -- output ---------------------------------------------------------------------------------------
def shown_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def size_table(rows) -> str:
    header = ["n", "params", "solver", "build", "t_value", "post", "post/value", "met", "actions", "blocks",
              "singles x actions", "saving", "prior", "rest", "variance", "KL", "decrement"]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["n"], r["nodes"], "ERROR"] + ["-"] * (len(header) - 3))
            continue
        p = r["posterior"]
        out.append([r["n"], r["nodes"], r["solver_chosen"], fmt(r["build_s"]), fmt(r["t_value"], ".4g"),
                    fmt(p["seconds"]), fmt(p["ratio_values"], ".1f"), fmt(p["met_values"]), p["actions"],
                    fmt(p["t_hessp_blocks"]), fmt(p["singles"]["t_singles_scaled"]),
                    fmt(p["singles"]["blocked_saving"], ".2f"), fmt(p["t_prior"]), fmt(p["t_rest"]),
                    fmt(p["t_variance"]), fmt(p["kl_divergence"], ".4g"), fmt(p["decrement"], ".2g")])
    return table(out, header)


def parts_table(rows) -> str:
    header = ["n", "post", "Hessian blocks", "per action", "single action", "prior R, R^-1", "rest", "pivoted QR alone",
              "plain QR alone", "R V (C order)", "R V (F order)"]
    out = []
    for r in rows:
        if "error" in r:
            continue
        p, k = r["posterior"], r["kernels"]
        out.append([r["n"], fmt(p["seconds"]), fmt(p["t_hessp_blocks"]), fmt(p["singles"]["t_block_per_action"]),
                    fmt(p["singles"]["t_single_action"]), fmt(p["t_prior"]), fmt(p["t_rest"]), fmt(k["qr_pivoted"]),
                    fmt(k["qr_plain"]), fmt(k["precision_c_order"]), fmt(k["precision_f_order"])])
    return table(out, header)


def newton_table(rows) -> str:
    header = ["n", "preconditioner", "converged", "its", "Hessian actions", "outside CG", "CG its", "values",
              "seconds", "rel. stationarity", "actions to 1e-4", "1e-6", "1e-8"]
    out = []
    for r in rows:
        if "error" in r:
            continue
        for key in ("newton_lowrank", "newton_h1"):
            x = r[key]
            if "skipped" in x:
                out.append([r["n"], key[7:], f"skipped ({x['skipped']})"] + ["-"] * (len(header) - 3))
                continue
            reach = [fmt(x["reached"][f"{lv:g}"] and x["reached"][f"{lv:g}"]["nhessp"], "g") for lv in LEVELS]
            out.append([r["n"], x["preconditioner"], fmt(x["success"]), x["nit"], x["nhessp"],
                        x["actions_outside_cg"], x["cg_iterations"], x["nfev"], fmt(x["seconds"]),
                        fmt(x["relative_stationarity"], ".2g"), *reach])
    return table(out, header)


def eigen_table(rows) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            continue
        p = r["posterior"]
        lam, res = p["eigenvalues"], p["residuals"]
        lead = ", ".join(f"{v:.4g} ({fmt(e, '.1e')})" for v, e in zip(lam[:SHOW], res[:SHOW]))
        tail = ", ".join(f"{v:.3g} ({fmt(e, '.1e')})" for v, e in zip(lam[-SHOW:], res[-SHOW:]))
        lines.append(f"n={r['n']}: leading {lead}")
        lines.append(f"{' ' * len(str(r['n']))}    trailing {tail}; above 1: {p['eigenvalues_above_1']}, "
                     f"negative: {p['negative_eigenvalues']}")
    return "\n".join(lines)


def spectrum_table(spec: dict) -> str:
    d = spec.get("differences") or {}
    if not d:
        return "(no spectrum)"
    counts = [str(k) for k in d["leading"]]
    out = []
    for key, vals in d["vs_finest"].items():
        out.append([f"{key} vs {d['finest']} (finest)", *[fmt(vals[k], ".3g") for k in counts]])
    for key, vals in d["vs_next"].items():
        out.append([f"{key.replace('/', ' vs ')} (next)", *[fmt(vals[k], ".3g") for k in counts]])
    for name, label in (("reduction_vs_finest", "finest"), ("reduction_vs_next", "next")):
        for key, vals in d[name].items():
            out.append([f"reduction {key} (vs {label})", *[fmt(vals[k], ".2f") for k in counts]])
    return table(out, ["sizes", *[f"leading {k}" for k in counts]])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import numba

    command = "env -u " + " -u ".join(ENV_UNSET) + f" python {SCRIPT} " + shlex.join(argv)
    unset = {v: os.environ.get(v) for v in ENV_UNSET}
    if not all(v is None for v in unset.values()):
        print(f"warning: {', '.join(k for k, v in unset.items() if v is not None)} set; run the benchmark as "
              f"{command}", file=sys.stderr)
    config = {k: v for k, v in vars(args).items()}
    config.update(values_target=VALUES_TARGET, levels=list(LEVELS), compare_sizes=[n for n in args.sizes
                                                                                   if compare_at(n, args)])
    data = dict(script=SCRIPT, complete=False, command=command, argv=argv, env_unset=unset,
                env_unset_ok=all(v is None for v in unset.values()), config=config,
                info=machine_info(script=SCRIPT, argv=argv), loadavg_before=loadavg(), sizes=[], spectrum={},
                summary=None)
    skipped = [n for n in args.sizes if not compare_at(n, args)]
    data["compare_skipped"] = dict(sizes=skipped, reason="--no-compare") if skipped else None
    write_json(args.out, data)
    t_start = time.perf_counter()
    data["warmup_s"] = 0.0 if args.no_warmup else warm_up(args)
    data["info"]["blas"] = blas_info()  # after the warm-up: the backends are loaded
    data["info"]["numba_threads"] = numba.get_num_threads()
    keep: dict[int, np.ndarray] = {}
    failed = 0
    for n in args.sizes:
        try:
            row = measure_size(n, args, keep)
        except Exception as exc:  # noqa: BLE001 - a failed size is recorded, the run goes on
            failed += 1
            row = dict(n=n, nodes=(n + 1) ** 2, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            print(f"n={n}: ERROR {row['error'][:300]}", flush=True)
        data["sizes"].append(row)
        write_json(args.out, data)
        release_memory()
    spec = dict(rank=args.spectrum_rank, oversampling=args.spectrum_oversampling, rows=[], differences=None,
                plot=None, plot_note=None)
    data["spectrum"] = spec
    for n in args.spectrum_sizes:
        try:
            row = spectrum_at(n, args, keep)
        except Exception as exc:  # noqa: BLE001
            failed += 1
            row = dict(n=n, nodes=(n + 1) ** 2, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            print(f"spectrum n={n}: ERROR {row['error'][:300]}", flush=True)
        spec["rows"].append(row)
        spec["differences"] = differences(spec["rows"], args.spectrum_rank)
        write_json(args.out, data)
        release_memory()
    if args.plot and any("eigenvalues" in r for r in spec["rows"]):
        note = spectrum_plot(args.plot, spec["rows"])
        spec["plot"], spec["plot_note"] = (None, note) if note else (shown_path(args.plot), None)
    elif not args.plot:
        spec["plot_note"] = "--no-plot"
    data["total_s"] = time.perf_counter() - t_start
    data["loadavg_after"] = loadavg()
    ok = [r for r in data["sizes"] if "error" not in r]
    data["summary"] = dict(
        sizes_failed=sum("error" in r for r in data["sizes"]),
        spectrum_failed=sum("error" in r for r in spec["rows"]),
        posterior_values_met={str(r["n"]): r["posterior"]["met_values"] for r in ok},
        posterior_ratio_values={str(r["n"]): r["posterior"]["ratio_values"] for r in ok},
        lowrank_converged={str(r["n"]): r["newton_lowrank"]["success"] for r in ok},
        h1_converged={str(r["n"]): r["newton_h1"].get("success") for r in ok},
        actions_lowrank={str(r["n"]): r["newton_lowrank"]["nhessp"] for r in ok},
        actions_h1={str(r["n"]): r["newton_h1"].get("nhessp") for r in ok},
    )
    data["complete"] = True
    write_json(args.out, data)

    print()
    print(f"Laplace posterior (rank {args.rank}, oversampling {args.oversampling}, {args.passes} passes; seconds; "
          f"post/value against the target {VALUES_TARGET}; 'blocks' = its blocked Hessian actions, 'singles x "
          f"actions' = the mean single action times as many, saving = their ratio):")
    print(size_table(data["sizes"]))
    print()
    print("Parts of the posterior's time (seconds; 'rest' = QR and R-orthonormalization of the sketch, small "
          "eigenproblem, stationarity check; the last four timed alone on a block of the sketch's width):")
    print(parts_table(data["sizes"]))
    print()
    print(f"Newton-CG to the MAP point (gtol {args.gtol:g} relative; Hessian actions counted per column; "
          f"'outside CG' = the lowrank preconditioner's double pass, or the CG of a step that ended the run "
          f"unrecorded; actions to a level = when the stationarity first fell below it, relative to the start):")
    print(newton_table(data["sizes"]))
    print()
    print("Eigenvalues (residual) of H v = lambda R v at the MAP point:")
    print(eigen_table(data["sizes"]))
    print()
    print(f"Spectrum under refinement (rank {args.spectrum_rank}, oversampling {args.spectrum_oversampling}): "
          f"max relative difference of the leading eigenvalues")
    print(spectrum_table(spec))
    if spec["plot"]:
        print(f"plot: {spec['plot']}")
    elif spec["plot_note"]:
        print(f"plot: none ({spec['plot_note']})")
    env = data["info"]["blas"]["thread_env"]
    print(f"OPENBLAS_CORETYPE={env.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={env.get('OPENBLAS_L2_SIZE')}; "
          f"numba threads {data['info']['numba_threads']}; load {data['loadavg_before']} -> {data['loadavg_after']}; "
          f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
