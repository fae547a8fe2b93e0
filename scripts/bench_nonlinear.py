"""Nonlinear log-conductivity inversion: value (Newton), gradient and Hessian action by size and solver.

Usage: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_nonlinear.py
       [--sizes2d 512] [--sizes3d 64 100] [--solvers cholmod superlu pardiso] [--solvers3d amg amg-sa]
       [--beta 1.0] [--source 10] [--repeat 3] [--profile] [--append] [--out scripts/results/bench_nonlinear.json]
       [--quick]

Run it with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset (``env -u``, as above) as the other benchmarks
are: the development machine sets them. The JSON records the command line and those variables as the process
saw them (``runs[*].info.blas.thread_env``; ``runs[*].env_unset_ok`` is True when both were unset).

Problem (built here from the helpers of ``problems/poisson_inversion.py``): on ``unit_square(n)`` (P1
triangles, dim 2) or ``unit_cube(n)`` (P1 tetrahedra, dim 3), boundary dofs condensed out,

    -div(exp(rho) q(u) grad u) = f,   q(u) = 1 + beta u^2,   u = 0 on the boundary,

with ``adjopt.fem.diffusion_reaction_residual(mesh, dofmap, diffusion="exp", beta=--beta, source=b)``, b the
load of the constant source f = ``--source`` (default 10) on the free dofs; nodal parameters m, rho =
``NodalToElement(m)`` as the ``parameter_map``. Objective: 0.5 |B u - d|^2 / sigma^2 + alpha (TikhonovH1(K) +
0.1 TikhonovL2(M)) (``poisson_inversion.make_regularization(mesh, "h1", --alpha)``), B the P1 interpolation at
``--n-obs`` points (``poisson_inversion.observation_points``, seed ``--seed``) and the data d the Newton solution
at m_true (``poisson_inversion.m_true``) plus 1% noise (``poisson_inversion.noisy``; sigma = noise max|B u|).
K = dR/du is nonsymmetric for beta != 0 (the q'(u) u grad u term), so CHOLMOD (symmetric positive definite
only) refuses it at the first Newton step away from u = 0: its row records the error. f = 10 was chosen so that
Newton from u = 0 takes 4 steps at these points (2D n = 32: ||R|| 0.30, 0.053, 1.8e-3, 1.9e-6, 1.6e-12; n = 512:
0.019, 3.4e-3, 1.2e-4, 1.2e-7, 1.3e-13 at m_true; f = 1 takes 3 and is nearly linear, f = 30 takes 5); the
rows record the steps of every value.

Solvers (``--solvers`` for the 2D sizes, ``--solvers3d`` for the 3D ones): ``cholmod``, ``superlu``,
``pardiso``, ``auto`` (by name, as ``ReducedFunctional(..., solver=name)`` makes them), ``amg`` (by name:
``AMGSolver()``, smoothed aggregation + CG for a symmetric K, AIR + FGMRES for a nonsymmetric one) and
``amg-sa`` (``AMGSolver(method="sa")``: nonsymmetric smoothed aggregation + FGMRES). A backend that is not
installed gives a row with ``skipped``; one that fails (CHOLMOD on a nonsymmetric K) a row with ``error``.

Per (size, solver) one functional; an untimed value at m_true first (the data solve for the first solver, which
reuses its functional with the objective replaced), then ``--repeat`` repetitions, each at a NEW p = 0.5 m_true +
a random perturbation (never cached) and with the stats reset before every call:

1. ``value(p)``: Newton warm-starts from the state of the nearest cached p (NewtonOptions.warm_start), as an
   optimizer's consecutive values do; ``newton_its`` and ``factorizations`` (AMG: hierarchy setups, those of
   K^T included) are what it took;
2. ``gradient(p)`` (the cached state: one adjoint solve on the converged factorization, the sensitivities);
3. ``hessp(p, dp)`` (a tangent and a second-adjoint solve, the second-order terms);
4. ``J.cache.clear()``, then ``value(p)`` again: the cold value, Newton from u = 0 (``newton_its_cold``);
   it must give the warm value (``cold_value_rel_diff``). The solver's own state (AMG's warm-start vectors)
   is not cleared.

Reported per row: the medians over the repetitions (``t_value``, ``t_gradient``, ``t_hessp``,
``t_value_cold``), ``newton_its`` (median), the ratios from the medians, ``ratio_value_gradient`` = (t_value +
t_gradient) / t_value against ``limit_value_gradient`` = 1 + 1.2 / newton_its (the issue's limit: a gradient
costs at most 1.2 Newton steps' worth of a value) and ``ratio_hessp`` = t_hessp / t_value against 0.15, each
``met`` or not, also with the cold value in the denominators (``*_cold``). ``phases``: ``J.times`` of each call
(median per phase: filter = parameter map, assembly = residuals, Jacobians and line search, factorize, solve,
sensitivity) and ``rest`` = the call's time minus those; ``stats``: ``J.stats.as_dict()`` of each call (last
repetition) with the medians of factorizations, factorization time and solve time per kind; ``kernels``: the
pieces timed alone at the last state (residual, Jacobian, symmetry check, vjp, jvp, second-order terms,
parameter map, objective), median of 3. ``--profile`` adds a cProfile of one more value, gradient and hessp
at a new p (top functions by own time) to each row.

The JSON (``--out``; default ``scripts/results/bench_nonlinear.json``, ``..._quick.json`` with ``--quick``) is
written atomically after every row (``complete: false`` until the end). ``--append`` keeps the rows of an
existing file (a row of the same dim, n and solver is replaced) and adds this run to its ``runs``; the 2D and
3D measurements can so be made by separate commands into one file. Exit status 2 for bad input, 1 when a row
other than an expected refusal (``expected_refusal``: CHOLMOD on a nonsymmetric K) failed.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import shlex
import sys
import time
import traceback

import numpy as np
from _bench_common import (
    blas_info,
    fmt,
    gallery,
    git_state,
    loadavg,
    machine_info,
    median,
    median_time,
    peak_rss_gib,
    release_memory,
    reset_peak,
    table,
    write_json,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "scripts", "results")
SOLVERS = ("cholmod", "superlu", "pardiso", "auto", "amg", "amg-sa")
#: the targets of the issue
GRADIENT_STEPS = 1.2  # (value + gradient) / value <= 1 + GRADIENT_STEPS / newton_its
HESSP_TARGET = 0.15  # hessp / value <= HESSP_TARGET
PHASES = ("filter", "assembly", "factorize", "solve", "sensitivity")
CALLS = ("value", "gradient", "hessp", "value_cold")
QUICK = dict(sizes2d=[8], sizes3d=[4], solvers=["superlu", "amg"], solvers3d=["amg-sa"], repeat=2)
ENV_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: errors that are the expected refusal of a backend (CHOLMOD on a nonsymmetric K), not a failure of the run;
#: Newton may wrap them (NewtonDidNotConverge with the solver's error as its cause); the functional itself
#: refuses solver='cholmod' for a residual that does not declare K symmetric (a ValueError, see below)
EXPECTED_ERRORS = ("NotPositiveDefiniteError",)


def expected_refusal(exc: BaseException | None) -> bool:
    """True when ``exc`` or an exception it was raised from is one of :data:`EXPECTED_ERRORS`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in EXPECTED_ERRORS:
            return True
        if isinstance(exc, ValueError) and "solver='cholmod' needs a symmetric positive definite" in str(exc):
            return True  # refused when the functional is made: the residual does not declare K symmetric
        exc = exc.__cause__ or exc.__context__
    return False


# -- command line ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--sizes2d", type=int, nargs="*", default=None, metavar="N",
                    help="n of unit_square(n): (n-1)^2 unknowns (default 512)")
    ap.add_argument("--sizes3d", type=int, nargs="*", default=None, metavar="N",
                    help="n of unit_cube(n): (n-1)^3 unknowns (default none; 100 is 970,299)")
    ap.add_argument("--solvers", nargs="+", default=None, choices=SOLVERS,
                    help="solvers of the 2D sizes (default cholmod superlu pardiso)")
    ap.add_argument("--solvers3d", nargs="+", default=None, choices=SOLVERS,
                    help="solvers of the 3D sizes (default amg)")
    ap.add_argument("--beta", type=float, default=1.0, help="q(u) = 1 + beta u^2 (default 1)")
    ap.add_argument("--source", type=float, default=10.0, help="the constant source f (default 10)")
    ap.add_argument("--alpha", type=float, default=10.0, help="regularization weight (default 10)")
    ap.add_argument("--n-obs", type=int, default=50, help="observation points (default 50)")
    ap.add_argument("--noise", type=float, default=0.01, help="relative noise of the data (default 0.01)")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per row, each at a new p (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the observations, noise, points and directions")
    ap.add_argument("--profile", action="store_true", help="cProfile one more value, gradient and hessp per row")
    ap.add_argument("--no-warmup", action="store_true", help="skip the JIT / import warm-up on tiny meshes")
    ap.add_argument("--append", action="store_true", help="keep the rows of an existing --out, add this run's")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for a smoke test (2D n=8 superlu+amg, 3D n=4 amg-sa, repeat 2)")
    ap.add_argument("--out", default=None, help="JSON output (default scripts/results/bench_nonlinear.json)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    defaults = dict(sizes2d=[512], sizes3d=[], solvers=["cholmod", "superlu", "pardiso"], solvers3d=["amg"],
                    repeat=3)
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("sizes2d", "sizes3d"):
        bad = [n for n in getattr(args, name) if n < 2]
        if bad:
            ap.error(f"--{name} must be >= 2 (cells per side), got {bad}")
        setattr(args, name, sorted(set(getattr(args, name))))
    if not args.sizes2d and not args.sizes3d:
        ap.error("nothing to do: --sizes2d and --sizes3d are both empty")
    args.solvers = list(dict.fromkeys(args.solvers))
    args.solvers3d = list(dict.fromkeys(args.solvers3d))
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    for name in ("beta", "source", "alpha", "noise"):
        v = getattr(args, name)
        if not math.isfinite(v) or (name != "beta" and v < 0):
            ap.error(f"--{name.replace('_', '-')} must be a finite number{'' if name == 'beta' else ' >= 0'}, got {v}")
    if args.n_obs < 1:
        ap.error(f"--n-obs must be >= 1, got {args.n_obs}")
    if args.out is None:
        args.out = os.path.join(RESULTS, "bench_nonlinear_quick.json" if args.quick else "bench_nonlinear.json")
    d = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        ap.error(f"--out: folder {d} does not exist or is not writable")
    return args


# -- the problem ----------------------------------------------------------------------------------
def make_solver(label: str):
    """The solver of a row label; MissingBackendError when its package is not installed."""
    from adjopt.solvers import AMGSolver
    from adjopt.solvers import make_solver as by_name

    if label == "amg-sa":
        return AMGSolver(method="sa")
    return by_name(label)


def build_problem(n: int, dim: int, args) -> dict:
    """Mesh, residual, map, observation operator and regularization of one size (the data come later)."""
    import adjopt
    from adjopt.fem import body_force, condense, diffusion_reaction_residual, observation_operator
    from adjopt.maps import NodalToElement

    pi = gallery()
    mesh = pi.make_mesh(n, dim)
    dofs = condense(mesh.n_nodes, mesh.boundary("all"))
    b = dofs.restrict_vector(body_force(mesh, args.source))
    R = diffusion_reaction_residual(mesh, dofs, diffusion="exp", beta=args.beta, source=b)
    pmap = NodalToElement(mesh.cells, n_nodes=mesh.n_nodes)
    rng = np.random.default_rng(args.seed)
    pts = pi.observation_points(rng, args.n_obs, dim)
    B = observation_operator(mesh, pts)[:, dofs.free]
    reg = pi.make_regularization(mesh, "h1", args.alpha)
    return dict(mesh=mesh, dofs=dofs, R=R, pmap=pmap, B=B, reg=reg, rng=rng, m_true=pi.m_true(mesh.points),
                pi=pi, adjopt=adjopt)


def make_data(prob: dict, labels: list[str], args) -> tuple[dict, dict]:
    """Synthetic data from the Newton solution at m_true with the first solver that manages it.

    Returns (record, {label: functional}) with the functional that solved it (its objective is replaced by
    the benchmark's, which keeps the cached state at m_true), so that the row of that solver need not solve
    it again.
    """
    adjopt, pi, R, pmap, B = prob["adjopt"], prob["pi"], prob["R"], prob["pmap"], prob["B"]
    placeholder = adjopt.SquaredMisfit(np.zeros(B.shape[0]), B=B)
    tried = []
    for label in [*labels, "superlu"]:
        try:
            J = adjopt.ReducedFunctional(R, objective=placeholder, solver=make_solver(label), parameter_map=pmap)
            t0 = time.perf_counter()
            u = np.array(J.state(prob["m_true"]))
            t = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - the next solver tries
            tried.append(f"{label}: {type(exc).__name__}")
            continue
        d_clean = B @ u
        data = pi.noisy(prob["rng"], d_clean, args.noise)
        weights = np.full(B.shape[0], pi.noise_sigma(d_clean, args.noise) ** -2)
        prob["objective"] = adjopt.SquaredMisfit(data, B=B, W=weights) + prob["reg"]
        J.objective = prob["objective"]
        rec = dict(data_solver=label, data_solve_s=t, data_newton_its=len(J.newton_history(prob["m_true"])) - 1,
                   data_newton_history=J.newton_history(prob["m_true"]), data_failed=tried,
                   max_u_true=float(np.max(u)))
        return rec, ({label: J} if label in labels else {})
    raise RuntimeError(f"no solver could solve for the data: {tried}")


def fresh_parameter(base: np.ndarray, rng, r: int) -> np.ndarray:
    """A new p for repetition r: 0.5 m_true plus a random perturbation (never seen by the cache)."""
    return base + 0.05 * (1.0 + 0.1 * r) * rng.standard_normal(base.size)


# -- the measurements -----------------------------------------------------------------------------
def timed_call(J, f, *args):
    """(result, seconds, J.times as a dict, J.stats.as_dict()) of f(*args) with the stats reset first."""
    J.reset_stats()
    t0 = time.perf_counter()
    out = f(*args)
    t = time.perf_counter() - t0
    return out, t, {k: float(v) for k, v in J.times.items()}, J.stats.as_dict()


def setups(stats: dict) -> int:
    """Factorizations (AMG: hierarchy setups of K and of K^T) of one call."""
    return int(stats["factorizations"] + stats["transpose_factorizations"])


def kernel_times(J, p: np.ndarray, dp: np.ndarray) -> dict:
    """The pieces of value, gradient and hessp timed alone at the state of p (median of 3)."""
    from adjopt.solvers import is_symmetric

    R, pmap, f = J.residual, J.map, J.objective
    u = np.array(J.state(p))
    lam = np.array(J.adjoint(p))
    rho = np.array(pmap.forward(p))
    drho = np.array(pmap.jvp(p, dp))
    K = R.jacobian(u, rho)
    return dict(
        residual=median_time(lambda: R.residual(u, rho), 3),
        jacobian=median_time(lambda: R.jacobian(u, rho), 3),
        symmetry_check=median_time(lambda: is_symmetric(K), 3),
        vjp=median_time(lambda: R.vjp(u, rho, lam), 3),
        jvp=median_time(lambda: R.jvp(u, rho, drho), 3),
        second=median_time(lambda: R.second(u, rho, lam, lam, drho), 3),
        map_forward=median_time(lambda: pmap.forward(p), 3),
        map_vjp=median_time(lambda: pmap.vjp(p, rho), 3),
        map_jvp=median_time(lambda: pmap.jvp(p, dp), 3),
        objective_value=median_time(lambda: f.value(u, p), 3),
        objective_grad_u=median_time(lambda: f.grad_u(u, p), 3),
        objective_grad_p=median_time(lambda: f.grad_p(u, p), 3),
        objective_hess=median_time(lambda: (f.hess_uu(u, p, u), f.hess_up(u, p, dp), f.hess_pp(u, p, dp),
                                            f.hess_pu(u, p, u)), 3),
        jacobian_nnz=int(K.nnz),
    )


def profile_calls(J, p: np.ndarray, dp: np.ndarray, top: int = 25) -> dict:
    """cProfile of value, gradient and hessp at p (not cached): the top functions by own time, per call."""
    out = {}
    for name, f in (("value", lambda: J.value(p)), ("gradient", lambda: J.gradient(p)),
                    ("hessp", lambda: J.hessp(p, dp))):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        f()
        prof.disable()
        total = time.perf_counter() - t0
        st = pstats.Stats(prof)
        rows = []
        for (file, line, func), (_, nc, tt, ct, _) in st.stats.items():
            rows.append(dict(function=f"{short_path(file)}:{line}({func})", ncalls=int(nc), tottime=tt, cumtime=ct))
        rows.sort(key=lambda r: -r["tottime"])
        out[name] = dict(seconds=total, top=rows[:top])
    return out


def short_path(path: str) -> str:
    for marker in ("site-packages/", "src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path) if os.sep in path else path


def measure_row(prob: dict, J, n: int, dim: int, label: str, args) -> dict:
    """The repetitions of one (size, solver) on the functional J (its cache holds m_true's state)."""
    R = J.residual
    rng = np.random.default_rng(args.seed + 1)
    base = 0.5 * prob["m_true"]
    m = J.n_params
    dp = rng.standard_normal(m)
    reps = []
    reset_peak()
    for r in range(args.repeat):
        p = fresh_parameter(base, rng, r)
        load = loadavg()
        v, tv, ph_v, st_v = timed_call(J, J.value, p)
        hist = J.newton_history(p)
        g, tg, ph_g, st_g = timed_call(J, J.gradient, p)
        h, th, ph_h, st_h = timed_call(J, J.hessp, p, dp)
        J.cache.clear()
        vc, tc, ph_c, st_c = timed_call(J, J.value, p)
        hist_c = J.newton_history(p)
        calls = dict(value=(tv, ph_v, st_v), gradient=(tg, ph_g, st_g), hessp=(th, ph_h, st_h),
                     value_cold=(tc, ph_c, st_c))
        reps.append(dict(
            t_value=tv, t_gradient=tg, t_hessp=th, t_value_cold=tc, loadavg=load,
            newton_its=int(st_v["newton_iterations"]), newton_its_cold=int(st_c["newton_iterations"]),
            factorizations=setups(st_v), factorizations_cold=setups(st_c),
            gradient_factorizations=setups(st_g), hessp_factorizations=setups(st_h),
            newton_history=hist, newton_history_cold=hist_c,
            value=v, value_cold=vc, cold_value_rel_diff=abs(vc - v) / max(abs(v), 1e-300),
            gradient_norm=float(np.linalg.norm(g)), hessp_norm=float(np.linalg.norm(h)),
            phases={c: dict(ph, rest=t - sum(ph.values())) for c, (t, ph, _) in calls.items()},
            stats={c: st for c, (_, _, st) in calls.items()},
        ))
    peak = peak_rss_gib()
    med = {k: median([rep[k] for rep in reps]) for k in ("t_value", "t_gradient", "t_hessp", "t_value_cold",
                                                         "newton_its", "newton_its_cold", "factorizations",
                                                         "factorizations_cold")}
    phases = {c: {k: median([rep["phases"][c].get(k, 0.0) for rep in reps]) for k in (*PHASES, "rest")}
              for c in CALLS}
    stats = {}
    for c in CALLS:
        last = reps[-1]["stats"][c]
        kinds = sorted({k for rep in reps for k in rep["stats"][c]["solve_time"]})
        stats[c] = dict(last=last, factorizations=median([setups(rep["stats"][c]) for rep in reps]),
                        factorization_time=median([rep["stats"][c]["factorization_time"] for rep in reps]),
                        solve_time={k: median([rep["stats"][c]["solve_time"].get(k, 0.0) for rep in reps])
                                    for k in kinds},
                        solves={k: median([rep["stats"][c]["solves"].get(k, 0) for rep in reps]) for k in kinds},
                        iterations={k: median([rep["stats"][c]["iterations"].get(k, 0) for rep in reps])
                                    for k in kinds if any(rep["stats"][c]["iterations"] for rep in reps)})
    row = dict(dim=dim, n=n, unknowns=int(R.n), params=int(m), elements=int(R.n_params), nnz=int(R.nnz),
               solver=label, solver_name=J.solver.name, beta=args.beta, source=args.source, repeat=args.repeat,
               statistic="median of repeat, a new p each", **med, **ratios(med))
    row.update(
        phases=phases, stats=stats, repetitions=reps,
        newton_history=reps[-1]["newton_history"], newton_history_cold=reps[-1]["newton_history_cold"],
        cold_value_rel_diff=max(rep["cold_value_rel_diff"] for rep in reps),
        value=reps[-1]["value"], gradient_norm=reps[-1]["gradient_norm"], hessp_norm=reps[-1]["hessp_norm"],
        peak_rss_GiB=peak, cache=J.cache.info() if hasattr(J.cache, "info") else None,
        git=git_state(), loadavg_after=loadavg(),
    )
    if getattr(J.solver, "analyses", None) is not None:
        row["solver_analyses"] = int(J.solver.analyses)
    row["kernels"] = kernel_times(J, p, dp)
    if args.profile:
        row["profile"] = profile_calls(J, fresh_parameter(base, rng, args.repeat), dp)
    return row


def ratios(med: dict) -> dict:
    """The ratios of the medians against the issue's limits (see the module docstring)."""
    tv, tg, th, tc = med["t_value"], med["t_gradient"], med["t_hessp"], med["t_value_cold"]
    its, its_c = med["newton_its"], med["newton_its_cold"]
    out = dict(t_value_gradient=tv + tg, ratio_value_gradient=(tv + tg) / tv, ratio_hessp=th / tv,
               ratio_value_gradient_cold=(tc + tg) / tc, ratio_hessp_cold=th / tc, hessp_target=HESSP_TARGET,
               cold_over_warm=tc / tv)
    out["limit_value_gradient"] = 1.0 + GRADIENT_STEPS / its if its else None
    out["limit_value_gradient_cold"] = 1.0 + GRADIENT_STEPS / its_c if its_c else None
    out["met_value_gradient"] = (out["ratio_value_gradient"] <= out["limit_value_gradient"]
                                 if out["limit_value_gradient"] else None)
    out["met_value_gradient_cold"] = (out["ratio_value_gradient_cold"] <= out["limit_value_gradient_cold"]
                                      if out["limit_value_gradient_cold"] else None)
    out["met_hessp"] = out["ratio_hessp"] <= HESSP_TARGET
    out["met_hessp_cold"] = out["ratio_hessp_cold"] <= HESSP_TARGET
    return out


def warm_up(args) -> float:
    """Every code path of a row once on tiny meshes (numba kernels, pyamg, the backends), untimed."""
    t0 = time.perf_counter()
    quiet = argparse.Namespace(**{**vars(args), "repeat": 1, "profile": False})
    for dim, sizes, labels in ((2, args.sizes2d, args.solvers), (3, args.sizes3d, args.solvers3d)):
        if not sizes:
            continue
        try:
            prob = build_problem(4, dim, quiet)
            _, made = make_data(prob, labels, quiet)
        except Exception:  # noqa: BLE001 - the measured rows will record the error
            continue
        for label in labels:
            try:
                J = made.get(label) or prob["adjopt"].ReducedFunctional(
                    prob["R"], objective=prob["objective"], solver=make_solver(label), parameter_map=prob["pmap"])
                measure_row(prob, J, 4, dim, label, quiet)
            except Exception:  # noqa: BLE001
                pass
    return time.perf_counter() - t0


def run_size(n: int, dim: int, labels: list[str], args, emit) -> None:
    """Build one size, solve for its data, then one row per solver (emitted as soon as it is done)."""
    head = dict(dim=dim, n=n, unknowns=(n - 1) ** dim, beta=args.beta, source=args.source)
    usable = []
    for label in labels:
        try:
            make_solver(label)
            usable.append(label)
        except Exception as exc:  # noqa: BLE001 - MissingBackendError: not installed
            emit(dict(head, solver=label, skipped=f"{type(exc).__name__}: {str(exc).split('.')[0]}"))
    if not usable:
        return
    release_memory()
    try:
        t0 = time.perf_counter()
        prob = build_problem(n, dim, args)
        t_build = time.perf_counter() - t0
        data, made = make_data(prob, usable, args)
    except Exception as exc:  # noqa: BLE001 - a failed size is recorded, the run goes on
        for label in usable:
            emit(dict(head, solver=label, error=f"build: {type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
        return
    for label in usable:
        try:
            J = made.pop(label, None)
            warm = "data solve" if J is not None else None
            if J is None:
                J = prob["adjopt"].ReducedFunctional(prob["R"], objective=prob["objective"], solver=make_solver(label),
                                                     parameter_map=prob["pmap"])
                t0 = time.perf_counter()
                J.value(prob["m_true"])  # untimed: the state of m_true in the cache, as the data solve leaves it
                warm = time.perf_counter() - t0
            row = measure_row(prob, J, n, dim, label, args)
            row.update(build_s=t_build, first_value_s=warm, **data)
        except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the run goes on
            row = dict(head, solver=label, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                       expected_refusal=expected_refusal(exc))
        J = None
        emit(row)
        release_memory()


# -- output ---------------------------------------------------------------------------------------
def measured(rows):
    return [r for r in rows if "error" not in r and "skipped" not in r]


def main_table(rows) -> str:
    header = ["dim", "unknowns", "solver", "beta", "t_value", "t_value_cold", "its", "its_cold", "fact", "fact_cold",
              "t_grad", "t_hessp", "(v+g)/v", "limit", "met", "hessp/v", "met", "(v+g)/v cold", "limit", "hessp/v cold"]
    out = []
    for r in rows:
        if "error" in r or "skipped" in r:
            out.append([r["dim"], r["unknowns"], r["solver"], fmt(r.get("beta"), "g"),
                        "ERROR" if "error" in r else "skipped"] + ["-"] * (len(header) - 5))
            continue
        out.append([r["dim"], r["unknowns"], r["solver"], fmt(r["beta"], "g"), fmt(r["t_value"], ".4g"), fmt(r["t_value_cold"], ".4g"),
                    fmt(r["newton_its"], "g"), fmt(r["newton_its_cold"], "g"), fmt(r["factorizations"], "g"),
                    fmt(r["factorizations_cold"], "g"), fmt(r["t_gradient"], ".3g"), fmt(r["t_hessp"], ".3g"),
                    fmt(r["ratio_value_gradient"], ".3f"), fmt(r["limit_value_gradient"], ".3f"),
                    fmt(r["met_value_gradient"]), fmt(r["ratio_hessp"], ".3f"), fmt(r["met_hessp"]),
                    fmt(r["ratio_value_gradient_cold"], ".3f"), fmt(r["limit_value_gradient_cold"], ".3f"),
                    fmt(r["ratio_hessp_cold"], ".3f")])
    return table(out, header)


def phase_table(rows) -> str:
    header = ["dim", "unknowns", "solver", "beta", "call", "seconds", *PHASES, "rest", "setups", "solves"]
    out = []
    for r in measured(rows):
        for c in CALLS:
            ph, st = r["phases"][c], r["stats"][c]
            t = r["t_" + c] if c != "value_cold" else r["t_value_cold"]
            solves = ",".join(f"{k[:3]}{fmt(v, 'g')}" for k, v in st["solves"].items() if v) or "-"
            its = ",".join(f"{k[:3]}{fmt(v, 'g')}" for k, v in st["iterations"].items() if v)
            out.append([r["dim"], r["unknowns"], r["solver"], fmt(r["beta"], "g"), c, fmt(t, ".3g"), *[fmt(ph[k], ".3g") for k in PHASES],
                        fmt(ph["rest"], ".3g"), fmt(st["factorizations"], "g"),
                        solves + (f" (Krylov {its})" if its else "")])
    return table(out, header)


def kernel_table(rows) -> str:
    keys = ("residual", "jacobian", "symmetry_check", "vjp", "jvp", "second", "map_forward", "map_vjp",
            "objective_value", "objective_grad_p", "objective_hess")
    out = [[r["dim"], r["unknowns"], r["solver"], fmt(r["beta"], "g"), *[fmt(r["kernels"][k], ".3g") for k in keys]]
           for r in measured(rows) if r.get("kernels")]
    return table(out, ["dim", "unknowns", "solver", "beta", *keys])


def profile_text(rows, top: int = 8) -> str:
    lines = []
    for r in measured(rows):
        if not r.get("profile"):
            continue
        for call, prof in r["profile"].items():
            lines.append(f"{r['dim']}D {r['unknowns']:,} {r['solver']} beta={r['beta']:g} {call} ({prof['seconds']:.3g} s under cProfile):")
            for f in prof["top"][:top]:
                lines.append(f"   {f['tottime']:8.3f} s own {f['cumtime']:8.3f} s cum {f['ncalls']:6d}x  {f['function']}")
    return "\n".join(lines)


def summary(rows) -> dict:
    got = measured(rows)
    def judge(key):
        vals = [r[key] for r in got if r.get(key) is not None]
        return None if not vals else all(vals)
    return dict(rows=len(rows), rows_measured=len(got), rows_failed=sum("error" in r and not r.get("expected_refusal") for r in rows),
                rows_refused=sum(bool(r.get("expected_refusal")) for r in rows),
                rows_skipped=sum("skipped" in r for r in rows),
                value_gradient_met=judge("met_value_gradient"), hessp_met=judge("met_hessp"),
                value_gradient_cold_met=judge("met_value_gradient_cold"), hessp_cold_met=judge("met_hessp_cold"))


def key(r) -> tuple:
    return (r["dim"], r["n"], r["solver"], r.get("beta"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import numba

    command = "env -u " + " -u ".join(ENV_UNSET) + " python scripts/bench_nonlinear.py " + shlex.join(argv)
    unset = {v: os.environ.get(v) for v in ENV_UNSET}
    run = dict(command=command, argv=argv, env_unset=unset, env_unset_ok=all(v is None for v in unset.values()),
               config=dict(sizes2d=args.sizes2d, sizes3d=args.sizes3d, solvers=args.solvers,
                           solvers3d=args.solvers3d, beta=args.beta, source=args.source, alpha=args.alpha,
                           n_obs=args.n_obs, noise=args.noise, repeat=args.repeat, seed=args.seed,
                           quick=args.quick, profile=args.profile, gradient_steps=GRADIENT_STEPS,
                           hessp_target=HESSP_TARGET))
    if not run["env_unset_ok"]:
        print(f"warning: {', '.join(k for k, v in unset.items() if v is not None)} set; run the benchmark as "
              f"{command}", file=sys.stderr)
    data = dict(script="scripts/bench_nonlinear.py", complete=False, rows=[], runs=[], summary=None)
    if args.append and os.path.exists(args.out):
        with open(args.out) as fh:
            old = json.load(fh)
        data["rows"], data["runs"] = old.get("rows", []), old.get("runs", [])
    data["runs"].append(run)
    run["info"] = machine_info(script="scripts/bench_nonlinear.py", argv=argv)
    write_json(args.out, data)
    t_start = time.perf_counter()
    run["warmup_s"] = 0.0 if args.no_warmup else warm_up(args)
    run["info"]["blas"] = blas_info()  # after the warm-up: the backends are loaded
    run["info"]["numba_threads"] = numba.get_num_threads()
    new_rows = []

    def emit(row):
        row["run"] = len(data["runs"]) - 1
        new_rows.append(row)
        data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
        write_json(args.out, data)
        r = row
        head = f"{r['dim']}D n={r['n']} ({r['unknowns']:,} unknowns) {r['solver']}, beta={r['beta']:g}:"
        if "skipped" in r:
            print(f"{head} skipped ({r['skipped']})", flush=True)
        elif "error" in r:
            print(f"{head} ERROR {r['error'][:300]}", flush=True)
        else:
            print(f"{head} value {r['t_value']:.4g} s ({fmt(r['newton_its'], 'g')} Newton steps, "
                  f"{fmt(r['factorizations'], 'g')} factorizations), cold {r['t_value_cold']:.4g} s "
                  f"({fmt(r['newton_its_cold'], 'g')} steps), gradient {r['t_gradient']:.3g} s, hessp "
                  f"{r['t_hessp']:.3g} s; (v+g)/v {r['ratio_value_gradient']:.3f} (limit "
                  f"{fmt(r['limit_value_gradient'], '.3f')}), hessp/v {r['ratio_hessp']:.3f} (target {HESSP_TARGET})",
                  flush=True)

    for dim, sizes, labels in ((2, args.sizes2d, args.solvers), (3, args.sizes3d, args.solvers3d)):
        for n in sizes:
            run_size(n, dim, labels, args, emit)
    run["total_s"] = time.perf_counter() - t_start
    run["loadavg_after"] = machine_info()["loadavg"]
    data["summary"] = summary(data["rows"])
    data["complete"] = True
    write_json(args.out, data)

    rows = data["rows"]
    print()
    print(f"Figures (median of --repeat, a new p each; limit = 1 + {GRADIENT_STEPS}/newton_its, "
          f"hessp target {HESSP_TARGET}; 'fact' = factorizations / AMG setups per value):")
    print(main_table(rows))
    print()
    print("Phases (J.times per call, median seconds; rest = call time - phases; setups = factorizations):")
    print(phase_table(rows))
    print()
    print("Pieces timed alone at the last state (seconds, median of 3):")
    print(kernel_table(rows))
    prof = profile_text(rows)
    if prof:
        print()
        print("cProfile, top functions by own time:")
        print(prof)
    s = data["summary"]
    print()
    print(f"Targets over {s['rows_measured']} measured row(s): (value+gradient)/value <= limit: "
          f"{fmt(s['value_gradient_met'])}, hessp/value <= {HESSP_TARGET}: {fmt(s['hessp_met'])} "
          f"(cold value: {fmt(s['value_gradient_cold_met'])}, {fmt(s['hessp_cold_met'])})")
    env = run["info"]["blas"]["thread_env"]
    print(f"OPENBLAS_CORETYPE={env.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={env.get('OPENBLAS_L2_SIZE')}; "
          f"numba threads {run['info']['numba_threads']}; wrote {args.out}")
    failed = [r for r in new_rows if "error" in r and not r.get("expected_refusal")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
