"""Transient heat equation: value, gradient and Hessian action by size, steps, scheme, solver and memory.

Usage: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_transient.py
       [--sizes 64 128 256] [--steps 100 400] [--schemes crank_nicolson bdf2]
       [--solvers superlu cholmod pardiso] [--stiffness parametric constant nonlinear] [--beta 1]
       [--nonlinear-source 40] [--modes store checkpoint disk] [--repeat 3] [--profile] [--no-warmup]
       [--out scripts/results/bench_transient.json] [--quick]
       env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_transient.py --gallery heat_source_inversion
       [--gallery-n 128] [--gallery-steps 1000] [--gallery-solver cholmod] [--gallery-snapshots 10 40]
       [--gallery-schedules multistage mixed] [--gallery-scheme crank_nicolson] [--repeat 3] [--no-warmup]
       [--out scripts/results/bench_transient_gallery.json]

Run it with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset (``env -u``, as above) as the other benchmarks
are: the development machine sets them. They are unset for the benchmark's command only (``env -u`` changes the
environment of that one process, not the shell's). The JSON records the command line and those variables as the
process saw them (``runs[*].env_unset``, ``runs[*].env_unset_ok``, ``runs[*].env_note``; ``runs[*].info.blas``
has threadpoolctl's view).

Problem: M du/dt + A(p) u = b(t, p) on ``unit_square(n)`` (P1 triangles), u = 0 on the boundary (condensed
out: (n-1)^2 unknowns), u(0) = 0, t in [0, --final-time] with N = ``--steps`` constant steps, M the consistent
mass matrix. Three kinds (``--stiffness``; default the two linear ones):

* ``parametric`` (a conductivity inversion): A(p) = ``ElementCoefficientMatrix(conn, p1_stiffness(mesh), "exp",
  n=n_free)``, one log-conductivity per triangle (2 n^2 parameters), b = the load of the constant source
  f = ``--source``. p enters A, so every gradient and Hessian action runs the contractions, and every new p is
  a new factorization of every distinct step matrix;
* ``constant`` (a source inversion): A = ``--kappa`` times the stiffness matrix, fixed; b(t, p) =
  ``SpaceTimeSource(M, nodes)`` with ``--source-nodes`` time nodes (p: the nodal source values at each of
  them, K (n-1)^2 parameters). The step matrices do not depend on p: they are factorized once for the life of
  the functional (a value at a new p factorizes nothing);
* ``nonlinear`` (a conductivity inversion through a quasilinear heat equation): M du/dt + R(u, p) = b with
  R = ``adjopt.fem.diffusion_reaction_residual(mesh, dofmap, diffusion="exp", beta=--beta, source=load)``,
  i.e. -div(e^p q(u) grad u) - f with q(u) = 1 + beta u^2 (the source is R's, so b = 0), one log-conductivity
  per triangle (2 n^2 parameters; the parametric kind's p_true and p sequence), load = the load of the
  constant source f = ``--nonlinear-source`` (default 40: u reaches ~1.6 by T = 0.1, so q reaches ~3.6 with
  beta = 1; with the parametric kind's f = 10, u ~ 0.6 and the steps are nearly linear). The functional is a
  ``NonlinearTransientReducedFunctional`` (default Newton options: rtol 1e-10 on each step's residual, from
  the previous level's state); the data come from the same nonlinear functional (Crank-Nicolson) at p_true.
  The step Jacobian S = a0 M + g0 K(u) changes with the state: a value factorizes it once per Newton
  iteration (``newton_iterations_per_step`` = its, J.stats.newton_iterations / newton_solves over the values;
  ~2.5 at the defaults), a gradient once per reverse step (N; the adjoint solve shares it), a Hessian action
  twice per step (tangent march, second-adjoint march: 2N) when the states are stored; a checkpointed
  gradient or Hessian action adds one factorization per Newton iteration of every recomputed step (and hessp
  one per recomputed tangent step). With the factorization dominating a step, expect t_value ~ N its
  (factorization + solve) and t_gradient ~ N (factorization + solve), so (v+g)/v ~ 1 + 1/its (~1.4), and
  t_hessp ~ 2N (factorization + solve), so hessp/v ~ 2/its (~0.8), plus the residual, Jacobian and
  second-derivative kernels. Unlike the linear kinds, recomputation is not cheap here: a recomputed step
  factorizes again, its times. For beta != 0 K(u) is nonsymmetric: CHOLMOD (Cholesky) cannot factorize S,
  and its rows are ``skipped`` with the reason (beta = 0 makes R linear in u, one Newton iteration per step,
  and allows CHOLMOD).

Objective: ``TimeSeriesMisfit`` of ``--n-obs`` sensors (P1 interpolation, ``adjopt.fem.observation_operator``
restricted to the free dofs, random points in [0.1, 0.9]^2, seed ``--seed``) observed at every step 1..N with
time weights dt and noise weights 1/sigma^2 (sigma = 1% of the largest reading); the data are the readings of
a Crank-Nicolson march at p_true (a smooth log-conductivity / a moving Gaussian source) plus 1% noise.

Per (n, N, scheme, solver, stiffness) one row per memory mode (``--modes``), each on its own functional:

* ``store``: ``memory`` large enough for the whole trajectory and the adjoints (at least 1 GiB, more when
  (3N + 4) states need it): value stores the states, the gradient the adjoints, hessp is the tangent and
  second-adjoint marches only;
* ``checkpoint``: ``memory`` = ``memory_states`` state vectors, ceil(sqrt(N)) (at least 2 s, s = the levels a
  step reads, so that a Hessian march of (u, du) pairs holds one checkpoint): binomial / multistage
  checkpointing (``checkpoint_schedules``), states recomputed (``recomputed_steps``);
* ``disk``: the same ``memory`` plus ``checkpoint_dir`` = a fresh temporary folder (checkpoints beyond RAM go
  to disk: ``disk_checkpoints``); ``checkpoint_dir_left`` = entries left in that folder afterwards (0). With
  the functional's default ``disk_snapshots`` (N) the multistage schedule checkpoints nearly every step, most
  of them on disk, and recomputes little beyond the forward sweep the value did not keep.

``--repeat`` repetitions, each at a NEW p (the same p sequence in every mode of a configuration, 0.5 p_true
plus a random perturbation; the load average before each in ``repetitions``), stats reset before every call:
``value(p)`` (assembly of A(p), factorizations, N forward steps), ``gradient(p)`` after it, ``hessp(p, dp)``
after that. Reported per row: the medians
``t_value``, ``t_gradient``, ``t_hessp``, ``ratio_value_gradient`` = (t_value + t_gradient) / t_value,
``ratio_hessp`` = t_hessp / t_value; per call ``J.stats.as_dict()`` (``stats``, last repetition) and
``J.times``; ``factorizations`` = those of the first value (one per distinct step matrix: CN 1, BDF2 2
(implicit Euler start + BDF2), against ``expected_factorizations``), ``factorizations_per_value`` of every
repetition and ``factorizations_total`` over all calls of the row; ``factorizations_per_call`` (value,
gradient, hessp of the last repetition). The nonlinear kind's ``factorizations`` / ``expected_factorizations``
are the first value's factorizations / its Newton iterations, and ``expected_factorizations_per_call`` =
value: its Newton iterations, gradient: its Newton iterations (recomputed steps; 0 when stored) + N, hessp:
its Newton iterations + its tangent solves + N (stored: its, N, 2N), checked for every repetition
(``met_factorizations``); ``newton_iterations_per_value`` and ``newton_iterations_per_step``. ``time_steps``,
``recomputed_steps``,
``stored_states``, ``checkpoints``, ``disk_checkpoints`` of the gradient and of hessp. ``build_s``: the
functional's constructor; per size ``problem_s`` (mesh, operators, observation operator) and ``data_s`` (the
data march). Checkpointed rows add ``slowdown_*`` (their time over the store row's) and ``gradient_rel_diff``,
``hessp_rel_diff``, ``value_rel_diff`` against the store row at the same p (max over repetitions; the
recomputed states are the same arithmetic, so these are round-off).

``step``: one plain step timed alone at the first p (per call, the median over 7 blocks of 10 back-to-back
calls; ``min_*`` the fastest block): ``t_solve`` = one forward solve with the
factorization of the step matrix S = a0 M + g0 A (through adjopt's factorization, its residual check
included), ``t_solve_T`` the transposed solve, ``t_matvec`` the products with the earlier levels' matrices E_j
(one for CN, two for BDF2), ``t_step`` = t_solve + t_matvec, ``t_step_T`` = t_solve_T + t_matvec. The rows
then compare ``value_over_steps`` = t_value / (N t_step), ``gradient_over_steps`` = t_gradient / (N t_step_T),
``hessp_over_steps`` = t_hessp / (2 N t_step): 1 means the call is the N (2N) solves and nothing else. With
the parametric A, ``kernels`` times A.assemble(p), a 16-column ``contract`` and ``second`` (the batch the
functional uses) and the tangent values of dA. The nonlinear kind's step is one Newton iteration at the final
state u_T of the data march and the first p: ``t_jacobian`` (K(u)), ``t_factorize`` (of S, per call, median of
5), ``t_residual`` (R(u, p)), t_solve, t_solve_T and the products with a_j M + g_j K; ``t_step`` = t_jacobian +
t_factorize + t_solve + t_matvec (a step of one iteration), ``t_step_T`` = t_jacobian + t_factorize +
t_solve_T + t_matvec_T: then value_over_steps ~ the Newton iterations per step (``value_over_iterations`` =
t_value / (iterations t_step) ~ 1), gradient_over_steps and hessp_over_steps ~ 1 plus the kernels; its
``kernels`` time R.residual, R.jacobian, R.vjp, R.jvp and R.second at (u_T, p). ``--profile`` adds a cProfile
of one more gradient at a new p (after an untimed value) to each row: the top functions by own time.

A warm-up runs every path once on a tiny mesh first (numba kernels of adjopt and of checkpoint_schedules'
multistage schedule, which compiles for seconds in every new process), untimed, ``warmup_s``.

The JSON (``--out``; default ``scripts/results/bench_transient.json``, ``..._quick.json`` with ``--quick``) is
written atomically after every row (``complete: false`` until the end). Exit status 2 for bad input, 1 when a
row failed (a solver that is not installed gives a ``skipped`` row, not a failure).

Gallery mode (``--gallery heat_source_inversion``): instead of the problem above, the functional of
``problems/heat_source_inversion.py`` (its ``build(n=--gallery-n, n_steps=--gallery-steps,
scheme=--gallery-scheme, solver=..., memory=...)``: a moving source from 25 sensor time series, A and M fixed,
21 (n-1)^2 parameters), with the solver ``--gallery-solver`` (default cholmod when installed, else superlu).
``--repeat`` times at a new p (0.5 p_true plus a random perturbation; the same p in every row) ``value``,
``gradient`` after it and ``hessp`` after that (stats reset before each; medians), then one ``gradient_cold``
at one more p with no value before it. Rows:

* ``stored``: the built functional, ``memory`` enough for the states, adjoints and tangents: expected
  1 factorization for the functional's life, N forward solves (value), N adjoint (gradient), N tangent + N
  second-adjoint (hessp) (``solves_as_expected``), and (value + gradient) / value <= 2.05
  (``met_ratio_target``);
* per ``--gallery-schedules`` x ``--gallery-snapshots`` s: a TransientReducedFunctional on the built one's
  parts (``build()`` takes ``memory`` and ``checkpoint_dir``, not ``snapshots`` or ``schedule``) with
  ``snapshots=s, schedule=...``. ``steps_per_step`` = ``J.stats.time_steps / N`` of each call; ``promise``:
  the forward steps of the checkpoint_schedules schedule the functional runs, counted by iterating it
  (``schedule_steps``), the optimum (Revolve's closed form for multistage, the mixed schedule's cost table;
  ``optimal_steps``) and the figure TransientReducedFunctional's docstring states at N = 1000
  (``stated_per_step``: 4.636 / 3.097 multistage, 3.921 / 2.142 mixed at s = 10 / 40); ``met_promise``: the cold
  gradient and the gradient after a value both take the schedule's steps, which are the optimum.
  ``stored_states`` (``J.stats.stored_states`` of the cold gradient; ``_hessp`` of the Hessian action, whose
  levels are (u, du) pairs) and ``stored_bytes`` = stored_states * 8 * unknowns (the process's peak RSS is
  shared by the rows, so it is not per row); ``gradient_rel_diff`` (2-norm), ``gradient_max_rel_diff``
  (max-norm), ``hessp_rel_diff``, ``value_rel_diff`` against the stored row at the same p (max over the
  repetitions and the cold gradient).

It prints a markdown table and writes ``scripts/results/bench_transient_gallery.json`` (atomically, after
every row).
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import shlex
import sys
import tempfile
import time
import traceback

import numpy as np
from _bench_common import (
    blas_info,
    fmt,
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
SCRIPT = "scripts/bench_transient.py"
SCHEMES = ("crank_nicolson", "bdf2", "implicit_euler")
SOLVERS = ("superlu", "cholmod", "pardiso", "auto")
STIFFNESS = ("parametric", "constant", "nonlinear")
COEFFICIENT_KINDS = ("parametric", "nonlinear")  # one log-conductivity per triangle (the same p_true and p's)
MODES = ("store", "checkpoint", "disk")
CALLS = ("value", "gradient", "hessp")
COUNTERS = ("time_steps", "recomputed_steps", "stored_states", "checkpoints", "disk_checkpoints")
QUICK = dict(sizes=[8], steps=[16], schemes=["crank_nicolson", "bdf2"], solvers=["superlu"],
             stiffness=["parametric", "constant"], repeat=2)
DEFAULTS = dict(sizes=[64, 128, 256], steps=[100, 400], schemes=["crank_nicolson", "bdf2"],
                solvers=["superlu", "cholmod", "pardiso"], stiffness=["parametric", "constant"], repeat=3)
ENV_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
STEP_CALLS, STEP_BLOCKS = 10, 7  # the plain step: median over 7 blocks of 10 back-to-back calls
BATCH = 16  # TransientReducedFunctional's default contraction batch
GIB = 2**30
GALLERY = ("heat_source_inversion",)
GALLERY_OUT = "bench_transient_gallery.json"
#: forward steps per step of a gradient that the schedules promise at N = 1000 (TransientReducedFunctional's
#: docstring: Revolve's counts for multistage; the mixed schedule's)
STATED_PROMISE = {("multistage", 1000, 10): 4.636, ("multistage", 1000, 40): 3.097,
                  ("mixed", 1000, 10): 3.921, ("mixed", 1000, 40): 2.142}
RATIO_TARGET = 2.05  # (value + gradient) / value with all states stored


# -- command line ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                    help="n of unit_square(n): (n-1)^2 unknowns (default 64 128 256)")
    ap.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                    help="time steps (default 100 400)")
    ap.add_argument("--schemes", nargs="+", default=None, choices=SCHEMES,
                    help="time schemes (default crank_nicolson bdf2)")
    ap.add_argument("--solvers", nargs="+", default=None, choices=SOLVERS,
                    help="linear solvers (default superlu cholmod pardiso; missing ones give skipped rows)")
    ap.add_argument("--stiffness", nargs="+", default=None, choices=STIFFNESS,
                    help="parametric A(p) (conductivity), constant A (source inversion) and/or nonlinear R(u, p) "
                         "(conductivity through q(u) = 1 + beta u^2; Newton per step) (default parametric constant)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="memory modes (default store checkpoint disk; checkpoint and disk need store first "
                         "for their comparisons)")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per row, each at a new p (default 3)")
    ap.add_argument("--final-time", type=float, default=0.1, help="T (default 0.1)")
    ap.add_argument("--kappa", type=float, default=1.0, help="conductivity of the constant A (default 1)")
    ap.add_argument("--source", type=float, default=10.0, help="constant source f of the parametric kind (10)")
    ap.add_argument("--source-nodes", type=int, default=5, help="time nodes of the SpaceTimeSource (default 5)")
    ap.add_argument("--beta", type=float, default=1.0,
                    help="q(u) = 1 + beta u^2 of the nonlinear kind (default 1; 0 makes it linear in u)")
    ap.add_argument("--nonlinear-source", type=float, default=40.0,
                    help="constant source f of the nonlinear kind (default 40: u of order 1, 2-3 Newton iterations "
                         "per step)")
    ap.add_argument("--n-obs", type=int, default=20, help="sensors (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sensors, noise, parameters and directions")
    ap.add_argument("--profile", action="store_true", help="cProfile one more gradient per row")
    ap.add_argument("--no-warmup", action="store_true", help="skip the JIT / import warm-up on a tiny mesh")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for a smoke test (n=8, 16 steps, CN + BDF2, superlu, both kinds, repeat 2)")
    ap.add_argument("--out", default=None, help="JSON output (default scripts/results/bench_transient.json; "
                                                "bench_transient_gallery.json with --gallery)")
    g = ap.add_argument_group("gallery mode (--gallery NAME: a gallery problem instead of the heat problem above)")
    g.add_argument("--gallery", default=None, choices=GALLERY,
                   help="benchmark the functional of problems/NAME.py (all states stored, then snapshots x schedules)")
    g.add_argument("--gallery-n", type=int, default=128, help="n of the gallery problem's unit_square(n) (128)")
    g.add_argument("--gallery-steps", type=int, default=1000, help="time steps N of the gallery problem (1000)")
    g.add_argument("--gallery-scheme", default="crank_nicolson", choices=SCHEMES,
                   help="time scheme of the gallery problem (crank_nicolson)")
    g.add_argument("--gallery-solver", default=None, choices=SOLVERS,
                   help="linear solver (default cholmod when installed, else superlu)")
    g.add_argument("--gallery-snapshots", type=int, nargs="+", default=[10, 40], metavar="S",
                   help="checkpoints in memory of the checkpointed rows (default 10 40)")
    g.add_argument("--gallery-schedules", nargs="+", default=["multistage", "mixed"],
                   choices=("multistage", "mixed"), help="checkpoint schedules (default multistage mixed)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if args.gallery is not None:
        return parse_gallery_args(ap, args)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [n for n in args.sizes if n < 2]
    if bad:
        ap.error(f"--sizes must be >= 2 (cells per side), got {bad}")
    bad = [n for n in args.steps if n < 2]
    if bad:
        ap.error(f"--steps must be >= 2, got {bad}")
    args.sizes, args.steps = sorted(set(args.sizes)), sorted(set(args.steps))
    for name in ("schemes", "solvers", "stiffness", "modes"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    for name in ("final_time", "kappa"):
        v = getattr(args, name)
        if not math.isfinite(v) or v <= 0:
            ap.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    for name in ("source", "nonlinear_source", "beta"):
        v = getattr(args, name)
        if not math.isfinite(v):
            ap.error(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if args.source_nodes < 1 or args.n_obs < 1:
        ap.error("--source-nodes and --n-obs must be >= 1")
    if args.out is None:
        args.out = os.path.join(RESULTS, "bench_transient_quick.json" if args.quick else "bench_transient.json")
    d = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        ap.error(f"--out: folder {d} does not exist or is not writable")
    return args


def parse_gallery_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The checks and defaults of --gallery (the heat problem's options do not apply)."""
    if args.quick:
        ap.error("--quick does not apply to --gallery: give --gallery-n and --gallery-steps")
    if args.repeat is None:
        args.repeat = DEFAULTS["repeat"]
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.gallery_n < 2:
        ap.error(f"--gallery-n must be >= 2 (cells per side), got {args.gallery_n}")
    if args.gallery_steps < 2:
        ap.error(f"--gallery-steps must be >= 2, got {args.gallery_steps}")
    bad = [s for s in args.gallery_snapshots if not 1 <= s < args.gallery_steps]
    if bad:
        ap.error(f"--gallery-snapshots must be in [1, --gallery-steps - 1] = [1, {args.gallery_steps - 1}], got {bad}")
    args.gallery_snapshots = sorted(set(args.gallery_snapshots))
    args.gallery_schedules = list(dict.fromkeys(args.gallery_schedules))
    if args.out is None:
        args.out = os.path.join(RESULTS, GALLERY_OUT)
    d = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        ap.error(f"--out: folder {d} does not exist or is not writable")
    return args


# -- the problem ----------------------------------------------------------------------------------
def build_size(n: int, args) -> dict:
    """Mesh, free-dof connectivity, A (both linear kinds), R (the nonlinear kind, when asked for), M and the
    observation operator of one size."""
    import adjopt
    from adjopt.fem import body_force, condense, diffusion_reaction_residual, observation_operator, p1_mass, p1_stiffness
    from adjopt.mesh import unit_square

    t0 = time.perf_counter()
    mesh = unit_square(n)
    dofs = condense(mesh.n_nodes, mesh.boundary("all"))
    conn = dofs.restrict(mesh.cells)
    nf = dofs.n_free
    K_loc, M_loc = p1_stiffness(mesh), p1_mass(mesh)
    ones = np.ones(mesh.n_cells)
    M = adjopt.ElementCoefficientMatrix(conn, M_loc, n=nf).assemble(ones)
    A_const = args.kappa * adjopt.ElementCoefficientMatrix(conn, K_loc, n=nf).assemble(ones)
    A_par = adjopt.ElementCoefficientMatrix(conn, K_loc, "exp", n=nf)
    rng = np.random.default_rng(args.seed)
    pts = 0.1 + 0.8 * rng.random((args.n_obs, 2))
    B = observation_operator(mesh, pts)[:, dofs.free]
    b = dofs.restrict_vector(body_force(mesh, args.source))
    R = None
    if "nonlinear" in args.stiffness:  # -div(e^p (1 + beta u^2) grad u) - f, f = --nonlinear-source
        load = dofs.restrict_vector(body_force(mesh, args.nonlinear_source))
        R = diffusion_reaction_residual(mesh, dofs, diffusion="exp", beta=args.beta, source=load)
    centroids = mesh.points[mesh.cells].mean(axis=1)
    xf = mesh.points[dofs.free]
    problem_s = time.perf_counter() - t0
    return dict(n=n, mesh=mesh, nf=nf, M=M, A_const=A_const, A_par=A_par, R=R, B=B, b=b, centroids=centroids,
                xf=xf, problem_s=problem_s, n_cells=mesh.n_cells)


def true_parameter(size: dict, kind: str, args) -> np.ndarray:
    if kind in COEFFICIENT_KINDS:  # a smooth log-conductivity, one value per triangle
        x, y = size["centroids"][:, 0], size["centroids"][:, 1]
        return 0.5 * np.sin(2 * np.pi * x) * np.sin(np.pi * y)
    K = args.source_nodes  # a Gaussian source moving from x = 0.3 to 0.7
    x, y = size["xf"][:, 0], size["xf"][:, 1]
    cx = 0.3 + 0.4 * np.linspace(0.0, 1.0, K)
    return np.concatenate([args.source * np.exp(-((x - c) ** 2 + (y - 0.5) ** 2) / 0.02) for c in cx])


def parts(size: dict, kind: str, args) -> dict:
    """The stiffness (A, or the residual R of the nonlinear kind), mass and right-hand side arguments of the
    functional for ``kind``."""
    from adjopt.transient import SpaceTimeSource

    if kind == "parametric":
        return dict(stiffness=size["A_par"], mass=size["M"], rhs=size["b"])
    if kind == "nonlinear":  # the source is R's (R = F(u, p) - load): no right-hand side
        return dict(stiffness=size["R"], mass=size["M"], rhs=None)
    nodes = np.linspace(0.0, args.final_time, args.source_nodes) if args.source_nodes > 1 else np.zeros(1)
    return dict(stiffness=size["A_const"], mass=size["M"], rhs=SpaceTimeSource(size["M"], nodes))


def functional(size: dict, kind: str, args, objective, ts, solver: str, **options):
    """TransientReducedFunctional(stiffness or residual, mass, objective, ts, rhs=..., solver=..., **options): a
    NonlinearTransientReducedFunctional for the nonlinear kind. The stiffness goes by position: the nonlinear
    functional's first argument is named ``residual``, not ``stiffness``."""
    from adjopt.transient import TransientReducedFunctional

    pt = parts(size, kind, args)
    return TransientReducedFunctional(pt["stiffness"], pt["mass"], objective, ts, rhs=pt["rhs"], solver=solver,
                                      **options)


def make_objective(size: dict, kind: str, N: int, args, solver: str) -> tuple:
    """TimeSeriesMisfit of noisy readings of a Crank-Nicolson march at p_true (with the kind's own functional:
    Newton's method for the nonlinear kind); (objective, p_true, facts, u_T the march's final state)."""
    from adjopt.transient import TimeSeriesMisfit, TimeStepping

    B, dt = size["B"], args.final_time / N
    steps = np.arange(1, N + 1)
    p_true = true_parameter(size, kind, args)
    t0 = time.perf_counter()
    placeholder = TimeSeriesMisfit(np.zeros((N, B.shape[0])), steps, B=B)
    J = functional(size, kind, args, placeholder, TimeStepping("crank_nicolson", dt=dt, n_steps=N), solver)
    U = J.states(p_true)
    clean = np.asarray((B @ U[1:].T).T)
    data_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed + 7)
    sigma = 0.01 * max(float(np.abs(clean).max()), 1e-30)
    data = clean + sigma * rng.standard_normal(clean.shape)
    obj = TimeSeriesMisfit(data, steps, B=B, weights=np.full(N, dt), W=np.full(B.shape[0], sigma**-2))
    facts = dict(data_s=data_s, data_solver=solver, max_reading=float(np.abs(clean).max()), sigma=sigma)
    if kind == "nonlinear":
        facts.update(beta=args.beta, source=args.nonlinear_source, max_state=float(np.abs(U).max()),
                     data_newton_iterations_per_step=J.stats.newton_iterations / max(J.stats.newton_solves, 1))
    return obj, p_true, facts, np.array(U[-1])


def parameters(p_true: np.ndarray, kind: str, repeat: int, seed: int) -> tuple[list, np.ndarray]:
    """The p of every repetition (0.5 p_true + a perturbation) and the direction dp (the same in every mode)."""
    rng = np.random.default_rng(seed + 1)
    scale = 0.05 if kind in COEFFICIENT_KINDS else 0.1 * max(float(np.abs(p_true).max()), 1.0)
    ps = [0.5 * p_true + scale * (1.0 + 0.1 * r) * rng.standard_normal(p_true.size) for r in range(repeat + 1)]
    return ps, rng.standard_normal(p_true.size)


def memory_states(N: int, history: int) -> int:
    """The states the checkpointed rows may hold: ceil(sqrt(N)), at least 2 s (one (u, du) snapshot)."""
    return max(math.isqrt(N - 1) + 1, 2 * history)


def distinct_step_matrices(ts) -> int:
    return len({(float(a[0]), float(g[0])) for a, g in (ts.coefficients(k) for k in range(1, ts.n_steps + 1))})


# -- the measurements -----------------------------------------------------------------------------
def timed_call(J, f, *args):
    """(result, seconds, J.times, J.stats.as_dict()) of f(*args) with the stats reset first."""
    J.reset_stats()
    t0 = time.perf_counter()
    out = f(*args)
    t = time.perf_counter() - t0
    return out, t, {k: float(v) for k, v in J.times.items()}, J.stats.as_dict()


def per_call(f, calls: int | None = None, blocks: int | None = None) -> tuple[float, float]:
    """(median, min) over ``blocks`` blocks of the time per call of ``calls`` back-to-back calls of f (after one
    untimed call): a block is a short march, so that a preemption spreads over its calls."""
    calls, blocks = calls or STEP_CALLS, blocks or STEP_BLOCKS
    f()
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times)), float(min(times))


def step_times(size: dict, kind: str, ts, solver_label: str, p: np.ndarray, state: np.ndarray | None = None) -> dict:
    """One plain step timed alone: a solve with the factorization of S_N, its transpose, the E_j products. The
    nonlinear kind's S_N = a0 M + g0 K(u) at the state u, plus what one Newton iteration adds: K(u), the
    factorization of S (per call) and R(u, p)."""
    from adjopt.solvers import make_solver

    M = size["M"]
    if kind == "nonlinear":
        A = size["R"].jacobian(state, p)
    else:
        A = size["A_par"].assemble(p) if kind == "parametric" else size["A_const"]
    a, g = ts.coefficients(ts.n_steps)
    S = (a[0] * M + g[0] * A).tocsr()
    E = [(a[j] * M + g[j] * A).tocsr() for j in range(1, len(a)) if a[j] != 0.0 or g[j] != 0.0]
    solver = make_solver(solver_label)
    t0 = time.perf_counter()
    fac = solver.factorize(S)
    t_fac = time.perf_counter() - t0
    rng = np.random.default_rng(3)
    r = rng.standard_normal(S.shape[0])
    u = rng.standard_normal(S.shape[0])
    t_solve, min_solve = per_call(lambda: fac.solve(r, kind="forward"))
    t_solve_T, min_solve_T = per_call(lambda: fac.solve(r, transpose=True, kind="adjoint"))
    t_matvec, min_matvec = per_call(lambda: [Ej @ u for Ej in E])
    t_matvec_T, min_matvec_T = per_call(lambda: [Ej.T @ u for Ej in E])
    out = dict(t_factorize=t_fac, t_solve=t_solve, t_solve_T=t_solve_T, t_matvec=t_matvec, t_matvec_T=t_matvec_T,
               t_step=t_solve + t_matvec, t_step_T=t_solve_T + t_matvec_T, matvecs=len(E), nnz_S=int(S.nnz),
               min_solve=min_solve, min_solve_T=min_solve_T, min_matvec=min_matvec, min_matvec_T=min_matvec_T,
               statistic=f"per call: median (min_*: minimum) over {STEP_BLOCKS} blocks of {STEP_CALLS} back-to-back calls")
    solver.recycle(fac)
    if kind == "nonlinear":  # a step of one Newton iteration: K(u), the factorization of S, the solve, R(u, p)
        R = size["R"]
        t_jac, min_jac = per_call(lambda: R.jacobian(state, p))
        t_res, min_res = per_call(lambda: R.residual(state, p))
        t_fac5 = median_time(lambda: solver.recycle(solver.factorize(S)), 5)
        out.update(t_factorize_first=t_fac, t_factorize=t_fac5, t_jacobian=t_jac, t_residual=t_res,
                   min_jacobian=min_jac, min_residual=min_res, symmetric_S=bool(abs(S - S.T).max() == 0.0),
                   t_iteration=t_jac + t_fac5 + t_solve + t_res, t_step=t_jac + t_fac5 + t_solve + t_matvec,
                   t_step_T=t_jac + t_fac5 + t_solve_T + t_matvec_T,
                   state="u_T of the data march (p_true), K(u_T) at the first p; t_factorize: median of 5 "
                         "(t_factorize_first: the first, with the solver's analysis)")
    return out


def kernel_times(size: dict, p: np.ndarray, dp: np.ndarray) -> dict:
    """The parametric A's pieces at p: assembly, a BATCH-column contraction and second-order term, dA."""
    A = size["A_par"]
    rng = np.random.default_rng(5)
    W = rng.standard_normal((A.shape[0], BATCH))
    Z = rng.standard_normal((A.shape[0], BATCH))
    return dict(assemble=median_time(lambda: A.assemble(p), 5),
                contract=median_time(lambda: A.contract(p, W, Z), 5),
                second=median_time(lambda: A.second(p, W, Z, dp), 5),
                tangent_values=median_time(lambda: A._tangent_values(p, dp), 5),
                batch=BATCH, statistic="median of 5")


def residual_kernel_times(size: dict, p: np.ndarray, dp: np.ndarray, u: np.ndarray) -> dict:
    """The nonlinear kind's residual kernels at (u, p): R, K = dR/du, (dR/dp)^T w, (dR/dp) dp, the second-order
    terms w^T d2R (du, dp) (one of each per level of a gradient / Hessian action)."""
    R = size["R"]
    rng = np.random.default_rng(5)
    w, du = rng.standard_normal(R.n), rng.standard_normal(R.n)
    return dict(residual=median_time(lambda: R.residual(u, p), 5), jacobian=median_time(lambda: R.jacobian(u, p), 5),
                vjp=median_time(lambda: R.vjp(u, p, w), 5), jvp=median_time(lambda: R.jvp(u, p, dp), 5),
                second=median_time(lambda: R.second(u, p, w, du, dp), 5), statistic="median of 5")


def short_path(path: str) -> str:
    for marker in ("site-packages/", "src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path) if os.sep in path else path


def profile_gradient(J, p: np.ndarray, top: int = 15) -> dict:
    """cProfile of one gradient at p after an untimed value: the top functions by own time."""
    J.value(p)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    J.gradient(p)
    prof.disable()
    total = time.perf_counter() - t0
    rows = []
    for (file, line, func), (_, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
        rows.append(dict(function=f"{short_path(file)}:{line}({func})", ncalls=int(nc), tottime=tt, cumtime=ct))
    rows.sort(key=lambda r: -r["tottime"])
    return dict(seconds=total, top=rows[:top])


def rel_diff(x, ref) -> float:
    x, ref = np.asarray(x, dtype=float), np.asarray(ref, dtype=float)
    return float(np.linalg.norm(x - ref) / max(float(np.linalg.norm(ref)), 1e-300))


def measure_row(cfg: dict, mode: str, args, ref: dict | None) -> dict:
    """The repetitions of one memory mode on a new functional; ``ref`` is the store row's record (or None)."""
    from adjopt.transient import DEFAULT_MEMORY

    size, ts, N, kind = cfg["size"], cfg["time"], cfg["N"], cfg["kind"]
    nf = size["nf"]
    s = ts.history
    keep = memory_states(N, s)
    memory = max(DEFAULT_MEMORY, (3 * N + 4) * nf * 8) if mode == "store" else keep * nf * 8
    folder = tempfile.mkdtemp(prefix="bench_transient-") if mode == "disk" else None
    reset_peak()
    try:
        t0 = time.perf_counter()
        J = functional(size, kind, args, cfg["objective"], ts, cfg["solver"], memory=memory, checkpoint_dir=folder)
        build_s = time.perf_counter() - t0
        newton = ({k: getattr(J.newton, k) for k in ("rtol", "atol", "max_iter", "line_search", "max_halvings")}
                  if kind == "nonlinear" else None)
        reps = []
        for r in range(args.repeat):
            p = cfg["ps"][r]
            load = loadavg()
            v, tv, tm_v, st_v = timed_call(J, J.value, p)
            g, tg, tm_g, st_g = timed_call(J, J.gradient, p)
            h, th, tm_h, st_h = timed_call(J, J.hessp, p, cfg["dp"])
            reps.append(dict(t_value=tv, t_gradient=tg, t_hessp=th, loadavg=load, value=float(v),
                             gradient=g, hessp=h, gradient_norm=float(np.linalg.norm(g)),
                             hessp_norm=float(np.linalg.norm(h)),
                             times=dict(value=tm_v, gradient=tm_g, hessp=tm_h),
                             stats=dict(value=st_v, gradient=st_g, hessp=st_h)))
        profile = profile_gradient(J, cfg["ps"][args.repeat]) if args.profile else None
        peak = peak_rss_gib()
        solver_name = J.solver.name
        n_params = J.n_params
    finally:
        J = None
        left = None
        if folder is not None:
            left = len(os.listdir(folder))
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    med = {k: median([rep[k] for rep in reps]) for k in ("t_value", "t_gradient", "t_hessp")}
    tv, tg, th = med["t_value"], med["t_gradient"], med["t_hessp"]
    last = reps[-1]["stats"]
    fpv = [int(rep["stats"]["value"]["factorizations"]) for rep in reps]
    fpc = [{c: int(rep["stats"][c]["factorizations"]) for c in CALLS} for rep in reps]
    expected_f = cfg["expected_factorizations"]
    if kind == "nonlinear":  # one factorization per Newton iteration, per reverse step, per tangent step
        expected_fpc = [expected_nonlinear_factorizations(rep["stats"], N) for rep in reps]
        expected_f = expected_fpc[0]["value"]
    row = dict(cfg["head"], mode=mode, memory_bytes=int(memory), memory_states=int(memory // (8 * nf)),
               checkpoint_dir=folder is not None, checkpoint_dir_left=left, solver_name=solver_name,
               params=int(n_params), repeat=args.repeat, statistic="median of repeat, a new p each", build_s=build_s,
               **med, ratio_value_gradient=(tv + tg) / tv, ratio_hessp=th / tv,
               factorizations=fpv[0], expected_factorizations=expected_f, factorizations_per_value=fpv,
               factorizations_per_call=fpc[-1],
               factorizations_total=sum(int(rep["stats"][c]["factorizations"]) for rep in reps for c in CALLS),
               factorization_time=reps[0]["stats"]["value"]["factorization_time"],
               solves={c: last[c]["solves"] for c in CALLS},
               stats={c: last[c] for c in CALLS},
               times={c: {k: median([rep["times"][c].get(k, 0.0) for rep in reps])
                          for k in sorted({k for rep in reps for k in rep["times"][c]})} for c in CALLS},
               value=reps[-1]["value"], gradient_norm=reps[-1]["gradient_norm"], hessp_norm=reps[-1]["hessp_norm"],
               repetitions=[{k: v for k, v in rep.items() if k not in ("gradient", "hessp")} for rep in reps],
               peak_rss_GiB=peak, loadavg_after=loadavg())
    row["met_factorizations"] = row["factorizations"] == row["expected_factorizations"]
    if kind == "nonlinear":
        its = [int(rep["stats"]["value"]["newton_iterations"]) for rep in reps]
        row.update(newton=newton, newton_iterations_per_value=its,
                   newton_iterations_per_step=sum(its) / sum(int(rep["stats"]["value"]["newton_solves"]) for rep in reps),
                   expected_factorizations_per_call=expected_fpc[-1],
                   met_factorizations=all(a == b for a, b in zip(fpc, expected_fpc)))
    for c in ("gradient", "hessp"):
        for k in COUNTERS:
            row[f"{c}_{k}"] = int(last[c][k])
    row["recomputed_steps"] = row["gradient_recomputed_steps"]
    row["stored_states"] = max(int(last[c]["stored_states"]) for c in CALLS)
    row["checkpoints"] = row["gradient_checkpoints"]
    row["disk_checkpoints"] = row["gradient_disk_checkpoints"] + row["hessp_disk_checkpoints"]
    step = cfg.get("step")
    if step:
        row["step"] = step
        row["value_over_steps"] = tv / (N * step["t_step"])
        row["gradient_over_steps"] = tg / (N * step["t_step_T"])
        row["hessp_over_steps"] = th / (2 * N * step["t_step"])
        if kind == "nonlinear":  # ~1: the value is its iterations, each one step of one factorization
            row["value_over_iterations"] = tv / (row["newton_iterations_per_step"] * N * step["t_step"])
    if cfg.get("kernels"):
        row["kernels"] = cfg["kernels"]
    if profile is not None:
        row["profile"] = profile
    if mode == "store":
        forward = int(last["value"]["newton_iterations"]) if kind == "nonlinear" else N  # a solve per iteration
        row["solves_as_expected"] = (last["value"]["solves"] == {"forward": forward}
                                     and last["gradient"]["solves"] == {"adjoint": N}
                                     and last["hessp"]["solves"] == {"tangent": N, "second_adjoint": N})
        row["_reference"] = reps
    elif ref is not None:
        rr = ref["_reference"]
        row.update(
            slowdown_value=tv / ref["t_value"], slowdown_gradient=tg / ref["t_gradient"],
            slowdown_value_gradient=(tv + tg) / (ref["t_value"] + ref["t_gradient"]),
            slowdown_hessp=th / ref["t_hessp"],
            value_rel_diff=max(abs(a["value"] - b["value"]) / max(abs(b["value"]), 1e-300) for a, b in zip(reps, rr)),
            gradient_rel_diff=max(rel_diff(a["gradient"], b["gradient"]) for a, b in zip(reps, rr)),
            hessp_rel_diff=max(rel_diff(a["hessp"], b["hessp"]) for a, b in zip(reps, rr)))
    return row


def expected_nonlinear_factorizations(stats: dict, N: int) -> dict:
    """The factorizations of the nonlinear kind's calls, from their J.stats: one per Newton iteration (the
    value's steps, the steps a gradient or Hessian action recomputes), one per tangent step, one per reverse
    step (the adjoint and second adjoint of a level share it). All states stored: its, N, 2N."""
    its = {c: int(stats[c]["newton_iterations"]) for c in CALLS}
    return dict(value=its["value"], gradient=its["gradient"] + N,
                hessp=its["hessp"] + int(stats["hessp"]["solves"].get("tangent", 0)) + N)


def run_config(cfg: dict, args, emit) -> None:
    """The memory modes of one (n, N, scheme, solver, stiffness), store first (the others compare with it)."""
    ref = None
    for mode in args.modes:
        try:
            row = measure_row(cfg, mode, args, ref)
        except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the run goes on
            row = dict(cfg["head"], mode=mode, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        if mode == "store" and "error" not in row:
            ref = row
        emit(row)
        release_memory()


def refused(kind: str, solver: str, args) -> str | None:
    """Why ``solver`` cannot run ``kind`` (a ``skipped`` row), or None."""
    if kind == "nonlinear" and solver == "cholmod" and args.beta != 0.0:
        return (f"cholmod: Cholesky needs a symmetric step Jacobian, and S = a0 M + g0 K(u) is nonsymmetric for "
                f"beta = {args.beta:g} != 0 (K(u) holds 2 beta u e^p grad u . grad N_b N_a); use superlu or pardiso")
    return None


def configs(args, emit, warm: bool = False):
    """Build every size, its data and step timings; yield the configurations (emitting skipped/failed rows)."""
    from adjopt.solvers import make_solver
    from adjopt.transient import TimeStepping

    usable = []
    for label in args.solvers:
        try:
            make_solver(label)
            usable.append(label)
        except Exception as exc:  # noqa: BLE001 - MissingBackendError: not installed
            if not warm:
                for n in args.sizes:
                    for N in args.steps:
                        for scheme in args.schemes:
                            for kind in args.stiffness:
                                emit(dict(n=n, steps=N, scheme=scheme, solver=label, stiffness=kind,
                                          skipped=f"{type(exc).__name__}: {str(exc).split('.')[0]}"))
    if not usable:
        return
    for n in args.sizes:
        release_memory()
        size = build_size(n, args)
        for N in args.steps:
            for kind in args.stiffness:
                mine = [label for label in usable if refused(kind, label, args) is None]
                if mine:
                    obj, p_true, data, u_T = make_objective(size, kind, N, args, mine[0])
                    ps, dp = parameters(p_true, kind, args.repeat, args.seed)
                    kernels = None
                    if kind == "parametric" and not warm:
                        kernels = kernel_times(size, ps[0], dp)
                    elif kind == "nonlinear" and not warm:
                        kernels = residual_kernel_times(size, ps[0], dp, u_T)
                for scheme in args.schemes:
                    ts = TimeStepping(scheme, dt=args.final_time / N, n_steps=N)
                    for label in usable:
                        why = refused(kind, label, args)
                        if why is not None:
                            emit(dict(n=n, unknowns=size["nf"], steps=N, scheme=scheme, solver=label,
                                      stiffness=kind, skipped=why))
                            continue
                        head = dict(n=n, unknowns=size["nf"], elements=size["n_cells"], steps=N,
                                    dt=args.final_time / N, final_time=args.final_time, scheme=scheme,
                                    history=ts.history, solver=label, stiffness=kind, n_obs=args.n_obs,
                                    problem_s=size["problem_s"], nnz_A=int(size["A_const"].nnz), **data)
                        step = None if warm else step_times(size, kind, ts, label, ps[0], u_T)
                        yield dict(size=size, time=ts, N=N, kind=kind, solver=label, objective=obj, ps=ps, dp=dp,
                                   head=head, step=step, kernels=kernels,
                                   expected_factorizations=distinct_step_matrices(ts))


def warm_up(args) -> float:
    """Every path once on a tiny mesh (numba kernels of adjopt and checkpoint_schedules, the backends), untimed."""
    t0 = time.perf_counter()
    quiet = argparse.Namespace(**{**vars(args), "sizes": [4], "steps": [9], "repeat": 1, "profile": False,
                                  "modes": list(MODES)})
    try:
        for cfg in configs(quiet, lambda row: None, warm=True):
            run_config(cfg, quiet, lambda row: None)
    except Exception:  # noqa: BLE001 - the measured rows will record the error
        pass
    return time.perf_counter() - t0


# -- output ---------------------------------------------------------------------------------------
def measured(rows):
    return [r for r in rows if "error" not in r and "skipped" not in r]


def label(r) -> list:
    return [r["n"], r.get("unknowns", "-"), r["steps"], {"crank_nicolson": "CN", "bdf2": "BDF2",
                                                         "implicit_euler": "IE"}.get(r["scheme"], r["scheme"]),
            r["solver"], {"parametric": "A(p)", "constant": "A", "nonlinear": "R(u,p)"}.get(r["stiffness"], r["stiffness"])]


def solves_text(st: dict) -> str:
    short = dict(forward="f", adjoint="a", tangent="t", second_adjoint="s", other="o")
    return "+".join(f"{v}{short.get(k, k)}" for k, v in st.items() if v) or "0"


def fact_text(r) -> str:
    """factorizations / expected of the first value; the nonlinear kind's: value | gradient | hessp (last
    repetition)."""
    if r["stiffness"] == "nonlinear":
        return " | ".join(str(r["factorizations_per_call"][c]) for c in CALLS)
    return f"{r['factorizations']}/{r['expected_factorizations']}"


def main_table(rows) -> str:
    header = ["n", "unknowns", "N", "scheme", "solver", "A", "mode", "t_value", "t_grad", "t_hessp", "(v+g)/v",
              "h/v", "its/step", "fact", "solves v | g | h", "t_step ms", "v/(N st)", "g/(N stT)", "h/(2N st)"]
    out = []
    for r in rows:
        if "error" in r or "skipped" in r:
            out.append(label(r) + [r.get("mode", "-"), "ERROR" if "error" in r else "skipped"]
                       + ["-"] * (len(header) - 8))
            continue
        st = r.get("step") or {}
        out.append(label(r) + [r["mode"], fmt(r["t_value"], ".4g"), fmt(r["t_gradient"], ".4g"),
                               fmt(r["t_hessp"], ".4g"), fmt(r["ratio_value_gradient"], ".3f"),
                               fmt(r["ratio_hessp"], ".3f"), fmt(r.get("newton_iterations_per_step"), ".2f"),
                               fact_text(r),
                               " | ".join(solves_text(r["solves"][c]) for c in CALLS),
                               fmt(1e3 * st["t_step"], ".3g") if st else "-", fmt(r.get("value_over_steps"), ".2f"),
                               fmt(r.get("gradient_over_steps"), ".2f"), fmt(r.get("hessp_over_steps"), ".2f")])
    return table(out, header)


def checkpoint_table(rows) -> str:
    header = ["n", "unknowns", "N", "scheme", "solver", "A", "mode", "mem states", "stored", "ckpts g/h",
              "disk g/h", "recomp g/h", "slow v+g", "slow h", "grad rel diff", "hessp rel diff", "peak GiB"]
    out = []
    for r in measured(rows):
        out.append(label(r) + [r["mode"], "all" if r["mode"] == "store" else r["memory_states"], r["stored_states"],
                               f"{r['gradient_checkpoints']}/{r['hessp_checkpoints']}",
                               f"{r['gradient_disk_checkpoints']}/{r['hessp_disk_checkpoints']}",
                               f"{r['gradient_recomputed_steps']}/{r['hessp_recomputed_steps']}",
                               fmt(r.get("slowdown_value_gradient"), ".2f"), fmt(r.get("slowdown_hessp"), ".2f"),
                               fmt(r.get("gradient_rel_diff"), ".1e"), fmt(r.get("hessp_rel_diff"), ".1e"),
                               fmt(r.get("peak_rss_GiB"), ".3f")])
    return table(out, header)


def step_table(rows) -> str:
    header = ["n", "unknowns", "N", "scheme", "solver", "A", "factorize ms", "solve ms", "solve^T ms", "matvecs",
              "matvec ms", "assemble (A or K(u)) ms", "contract16 / vjp ms", "second16 / second ms"]
    out = []
    for r in measured(rows):
        if r["mode"] != "store" or not r.get("step"):
            continue
        st, k = r["step"], r.get("kernels") or {}
        ms = lambda x: fmt(None if x is None else 1e3 * x, ".3g")  # noqa: E731
        out.append(label(r) + [ms(st["t_factorize"]), ms(st["t_solve"]), ms(st["t_solve_T"]), st["matvecs"],
                               ms(st["t_matvec"]), ms(k.get("assemble", k.get("jacobian"))),
                               ms(k.get("contract", k.get("vjp"))), ms(k.get("second"))])
    return table(out, header)


def profile_text(rows, top: int = 8) -> str:
    lines = []
    for r in measured(rows):
        prof = r.get("profile")
        if not prof:
            continue
        lines.append(f"n={r['n']} N={r['steps']} {r['scheme']} {r['solver']} {r['stiffness']} {r['mode']}: gradient "
                     f"{prof['seconds']:.3g} s under cProfile")
        for f in prof["top"][:top]:
            lines.append(f"   {f['tottime']:8.3f} s own {f['cumtime']:8.3f} s cum {f['ncalls']:7d}x  {f['function']}")
    return "\n".join(lines)


def summary(rows) -> dict:
    got = measured(rows)
    ck = [r for r in got if r["mode"] != "store"]
    diffs = [r["gradient_rel_diff"] for r in ck if r.get("gradient_rel_diff") is not None]
    its = [r["newton_iterations_per_step"] for r in got if "newton_iterations_per_step" in r]
    return dict(rows=len(rows), rows_measured=len(got), rows_failed=sum("error" in r for r in rows),
                rows_skipped=sum("skipped" in r for r in rows),
                factorizations_met=all(r["met_factorizations"] for r in got) if got else None,
                store_solves_as_expected=all(r["solves_as_expected"] for r in got if r["mode"] == "store") if got
                else None,
                checkpointed_recompute=all(r["recomputed_steps"] > 0 for r in ck) if ck else None,
                max_gradient_rel_diff=max(diffs) if diffs else None,
                max_hessp_rel_diff=max((r["hessp_rel_diff"] for r in ck if r.get("hessp_rel_diff") is not None),
                                       default=None),
                newton_iterations_per_step=[min(its), max(its)] if its else None)


def source_hashes() -> dict:
    """sha256 (first 16 hex digits) of every file of src/adjopt/transient."""
    import hashlib

    folder = os.path.join(ROOT, "src", "adjopt", "transient")
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as fh:
                out[name] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return out


# -- gallery mode (--gallery NAME) ------------------------------------------------------------------
def gallery_solver(label: str | None) -> str:
    """--gallery-solver: the label given (MissingBackendError when it is not installed), else cholmod when
    installed, else superlu."""
    from adjopt.solvers import make_solver

    if label is not None:
        make_solver(label)
        return label
    try:
        make_solver("cholmod")
        return "cholmod"
    except Exception:  # noqa: BLE001 - MissingBackendError: scikit-sparse not installed
        return "superlu"


def revolve_steps(N: int, s: int) -> int:
    """Forward steps (the first sweep included) of the binomial (Revolve) reversal of N steps with s
    checkpoints: (t + 1) N - C(s + t, s + 1), t the smallest with C(s + t, s) >= N."""
    t = 1
    while math.comb(s + t, s) < N:
        t += 1
    return (t + 1) * N - math.comb(s + t, s + 1)


def schedule_steps(schedule: str, N: int, s: int) -> tuple[int, dict]:
    """(forward steps, action counts) of the checkpoint_schedules schedule that a TransientReducedFunctional with
    ``snapshots=s`` (no disk) runs for a march of N steps, counted by iterating the schedule itself."""
    import checkpoint_schedules as cs

    if schedule == "mixed":
        sch = cs.MixedCheckpointSchedule(N, s, storage=cs.StorageType.RAM)
    else:
        sch = cs.MultistageCheckpointSchedule(N, s, 0)
    steps, actions = 0, {}
    for action in sch:
        name = type(action).__name__
        actions[name] = actions.get(name, 0) + 1
        if isinstance(action, cs.Forward):
            steps += min(int(action.n1), N) - int(action.n0)
        elif isinstance(action, cs.EndReverse):
            break
    return steps, actions


def optimal_steps(schedule: str, N: int, s: int) -> tuple[int, str]:
    """(forward steps, where from) that the schedule promises: Revolve's closed form for multistage, the
    mixed schedule's own cost table (checkpoint_schedules.mixed.mixed_steps_tabulation) for mixed."""
    if schedule == "multistage":
        return revolve_steps(N, s), "Revolve: (t + 1) N - C(s + t, s + 1), C(s + t - 1, s) < N <= C(s + t, s)"
    from checkpoint_schedules.mixed import mixed_steps_tabulation

    return int(mixed_steps_tabulation(N, s)[N, s, 2]), "checkpoint_schedules.mixed.mixed_steps_tabulation(N, s)[N, s, 2]"


def schedule_promise(schedule: str, N: int, s: int) -> dict:
    """Forward steps per step of a gradient under ``schedule`` with s checkpoints: iterated, the optimum, and
    the figure TransientReducedFunctional's docstring states (N = 1000 only)."""
    iterated, actions = schedule_steps(schedule, N, s)
    best, source = optimal_steps(schedule, N, s)
    return dict(schedule_steps=iterated, schedule_per_step=iterated / N, schedule_actions=actions,
                optimal_steps=best, optimal_per_step=best / N, optimal_source=source,
                stated_per_step=STATED_PROMISE.get((schedule, N, s)))


def gallery_variant(J0, solver: str, schedule: str, snapshots: int):
    """A TransientReducedFunctional on J0's parts with ``snapshots`` checkpoints in memory under ``schedule``
    (the gallery's build() takes ``memory`` and ``checkpoint_dir`` but not these)."""
    from adjopt.transient import TransientReducedFunctional

    A = J0.A_op if J0.A_op is not None else J0._A_fixed
    M = J0.M_op if J0.M_op is not None else J0._M_fixed
    return TransientReducedFunctional(A, M, list(J0.terms) + list(J0.param_terms), J0.time, rhs=J0.rhs, u0=J0.u0,
                                      solver=solver, memory=J0.memory, schedule=schedule, snapshots=snapshots,
                                      batch=J0.batch)


def max_rel_diff(x, ref) -> float:
    """max_i |x_i - ref_i| / max_i |ref_i|."""
    x, ref = np.asarray(x, dtype=float), np.asarray(ref, dtype=float)
    return float(np.abs(x - ref).max() / max(float(np.abs(ref).max()), 1e-300))


GALLERY_CALLS = ("value", "gradient", "hessp", "gradient_cold")


def gallery_row(J, head: dict, ps: list, dp: np.ndarray, args, ref: dict | None, schedule=None,
                snapshots=None) -> dict:
    """--repeat times value, gradient and hessp at a new p (stats reset before each), then a gradient at one
    more p with no value before it (``gradient_cold``); ``ref``: the stored row's record (or None)."""
    N = J.time.n_steps
    reps = []
    for r in range(args.repeat):
        p = ps[r]
        load = loadavg()
        v, tv, tm_v, st_v = timed_call(J, J.value, p)
        g, tg, tm_g, st_g = timed_call(J, J.gradient, p)
        h, th, tm_h, st_h = timed_call(J, J.hessp, p, dp)
        reps.append(dict(t_value=tv, t_gradient=tg, t_hessp=th, loadavg=load, value=float(v), gradient=g, hessp=h,
                         times=dict(value=tm_v, gradient=tm_g, hessp=tm_h),
                         stats=dict(value=st_v, gradient=st_g, hessp=st_h)))
    gc_, tc, tm_c, st_c = timed_call(J, J.gradient, ps[args.repeat])
    med = {k: median([rep[k] for rep in reps]) for k in ("t_value", "t_gradient", "t_hessp")}
    tv, tg, th = med["t_value"], med["t_gradient"], med["t_hessp"]
    last = dict(reps[-1]["stats"], gradient_cold=st_c)
    fpv = [int(rep["stats"]["value"]["factorizations"]) for rep in reps]
    stored = {c: int(last[c]["stored_states"]) for c in GALLERY_CALLS}
    grad_states, peak_states = stored["gradient_cold"], max(stored.values())
    row = dict(head, row="stored" if schedule is None else f"{schedule} s={snapshots}", schedule=schedule,
               snapshots=snapshots, memory_bytes=int(J.memory), repeat=args.repeat,
               statistic="median of repeat, a new p each (the same p in every row); gradient_cold: one call",
               **med, t_gradient_cold=tc, ratio_value_gradient=(tv + tg) / tv, ratio_hessp=th / tv,
               ratio_gradient_cold=tc / tv,
               factorizations=fpv[0], factorizations_per_value=fpv,
               factorizations_total=sum(int(rep["stats"][c]["factorizations"]) for rep in reps
                                        for c in CALLS) + int(st_c["factorizations"]),
               solves={c: last[c]["solves"] for c in GALLERY_CALLS},
               steps_per_step={c: last[c]["time_steps"] / N for c in GALLERY_CALLS},
               time_steps={c: int(last[c]["time_steps"]) for c in GALLERY_CALLS},
               recomputed_steps={c: int(last[c]["recomputed_steps"]) for c in GALLERY_CALLS},
               checkpoints={c: int(last[c]["checkpoints"]) for c in GALLERY_CALLS},
               stored_states_per_call=stored, stored_states=grad_states, stored_bytes=grad_states * 8 * J.n,
               stored_MiB=grad_states * 8 * J.n / 2**20, stored_states_hessp=stored["hessp"],
               stored_MiB_hessp=stored["hessp"] * 8 * J.n / 2**20, stored_states_max=peak_states,
               stored_bytes_max=peak_states * 8 * J.n,
               stats=last,
               times=dict({c: {k: median([rep["times"][c].get(k, 0.0) for rep in reps])
                               for k in sorted({k for rep in reps for k in rep["times"][c]})} for c in CALLS},
                          gradient_cold=tm_c),
               value=reps[-1]["value"], gradient_norm=float(np.linalg.norm(reps[-1]["gradient"])),
               hessp_norm=float(np.linalg.norm(reps[-1]["hessp"])), gradient_cold_norm=float(np.linalg.norm(gc_)),
               repetitions=[{k: v for k, v in rep.items() if k not in ("gradient", "hessp")} for rep in reps],
               loadavg_after=loadavg())
    if schedule is None:
        row["solves_as_expected"] = (last["value"]["solves"] == {"forward": N}
                                     and last["gradient"]["solves"] == {"adjoint": N}
                                     and last["hessp"]["solves"] == {"tangent": N, "second_adjoint": N}
                                     and last["gradient_cold"]["solves"] == {"forward": N, "adjoint": N})
        row["met_factorizations"] = fpv[0] == 1 and row["factorizations_total"] == 1
        row["ratio_target"] = RATIO_TARGET
        row["met_ratio_target"] = row["ratio_value_gradient"] <= RATIO_TARGET
        row["_reference"] = dict(reps=reps, gradient_cold=gc_)
    else:
        pr = schedule_promise(schedule, N, snapshots)
        row["promise"] = pr
        steps = pr["schedule_steps"]
        row["met_promise"] = (row["time_steps"]["gradient_cold"] == steps == pr["optimal_steps"]
                              and row["time_steps"]["gradient"] == steps)
        row["hessp_met_promise"] = row["time_steps"]["hessp"] == steps
        if pr["stated_per_step"] is not None:
            row["met_stated_promise"] = round(row["steps_per_step"]["gradient_cold"], 3) == pr["stated_per_step"]
        row["met_factorizations"] = fpv[0] == 1 and row["factorizations_total"] == 1
        if ref is not None:
            rr, gcr = ref["_reference"]["reps"], ref["_reference"]["gradient_cold"]
            row.update(
                slowdown_value=tv / ref["t_value"], slowdown_gradient=tg / ref["t_gradient"],
                slowdown_value_gradient=(tv + tg) / (ref["t_value"] + ref["t_gradient"]),
                slowdown_hessp=th / ref["t_hessp"], slowdown_gradient_cold=tc / ref["t_gradient_cold"],
                value_rel_diff=max(abs(a["value"] - b["value"]) / max(abs(b["value"]), 1e-300) for a, b in zip(reps, rr)),
                gradient_rel_diff=max([rel_diff(a["gradient"], b["gradient"]) for a, b in zip(reps, rr)]
                                      + [rel_diff(gc_, gcr)]),
                gradient_max_rel_diff=max([max_rel_diff(a["gradient"], b["gradient"]) for a, b in zip(reps, rr)]
                                          + [max_rel_diff(gc_, gcr)]),
                hessp_rel_diff=max(rel_diff(a["hessp"], b["hessp"]) for a, b in zip(reps, rr)),
                hessp_max_rel_diff=max(max_rel_diff(a["hessp"], b["hessp"]) for a, b in zip(reps, rr)))
    return row


def run_gallery(args, emit) -> dict:
    """Build the gallery problem, measure the stored row and every (schedule, snapshots) row; the build facts."""
    from adjopt.cli import load_module
    from adjopt.transient import DEFAULT_MEMORY

    module = load_module(args.gallery)
    solver = gallery_solver(args.gallery_solver)
    n, N = args.gallery_n, args.gallery_steps
    memory = max(DEFAULT_MEMORY, (3 * N + 4) * (n - 1) ** 2 * 8)  # the trajectory, the adjoints, the tangents
    t0 = time.perf_counter()
    problem = module.build(n=n, n_steps=N, scheme=args.gallery_scheme, solver=solver, memory=memory)
    build_s = time.perf_counter() - t0
    J0 = problem.functional
    ps, dp = parameters(problem.meta["p_true"], "constant", args.repeat, args.seed)
    head = dict(gallery=args.gallery, n=n, unknowns=int(J0.n), steps=N, scheme=args.gallery_scheme,
                history=J0.time.history, solver=solver, solver_name=J0.solver.name, params=int(J0.n_params))
    facts = dict(build_s=build_s, solver=solver, memory_bytes=int(memory), params=int(J0.n_params),
                 unknowns=int(J0.n), variants="copies of the built functional's parts (build() takes memory and "
                 "checkpoint_dir, not snapshots or schedule)")
    ref = None
    try:
        ref = gallery_row(J0, head, ps, dp, args, None)
        emit(ref)
    except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the run goes on
        emit(dict(head, row="stored", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
    J0.cache.clear()  # the stored trajectory and adjoints
    release_memory()
    for schedule in args.gallery_schedules:
        for s in args.gallery_snapshots:
            J = None
            try:
                J = gallery_variant(J0, solver, schedule, s)
                row = gallery_row(J, head, ps, dp, args, ref, schedule, s)
            except Exception as exc:  # noqa: BLE001
                row = dict(head, row=f"{schedule} s={s}", schedule=schedule, snapshots=s,
                           error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            emit(row)
            J = None
            release_memory()
    return facts


def gallery_warm_up(args) -> float:
    """The gallery paths once on a tiny mesh (numba kernels of adjopt and of checkpoint_schedules), untimed."""
    t0 = time.perf_counter()
    quiet = argparse.Namespace(**{**vars(args), "gallery_n": 4, "gallery_steps": 9, "gallery_snapshots": [2, 3],
                                  "repeat": 1})
    try:
        run_gallery(quiet, lambda row: None)
    except Exception:  # noqa: BLE001 - the measured rows will record the error
        pass
    return time.perf_counter() - t0


def markdown_table(rows: list[list], header: list[str]) -> str:
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt_row = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt_row(cells[0]), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
                     + [fmt_row(r) for r in cells[1:]])


def gallery_table(rows) -> str:
    header = ["row", "t_value s", "t_grad s", "(v+g)/v", "t_hessp s", "h/v", "t_grad cold s", "fact",
              "solves v / g / h / g cold", "steps/N g cold", "g", "h", "promise: schedule", "optimum", "stated",
              "stored g cold / h", "MiB g cold / h", "grad rel diff", "grad max rel diff", "hessp rel diff"]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["row"], "ERROR"] + ["-"] * (len(header) - 2))
            continue
        pr = r.get("promise") or {}
        sps = r["steps_per_step"]
        out.append([r["row"], fmt(r["t_value"], ".4g"), fmt(r["t_gradient"], ".4g"),
                    fmt(r["ratio_value_gradient"], ".3f"), fmt(r["t_hessp"], ".4g"), fmt(r["ratio_hessp"], ".3f"),
                    fmt(r["t_gradient_cold"], ".4g"), r["factorizations_total"],
                    " / ".join(solves_text(r["solves"][c]) for c in GALLERY_CALLS),
                    fmt(sps["gradient_cold"], ".3f"), fmt(sps["gradient"], ".3f"), fmt(sps["hessp"], ".3f"),
                    fmt(pr.get("schedule_per_step"), ".3f"), fmt(pr.get("optimal_per_step"), ".3f"),
                    fmt(pr.get("stated_per_step"), ".3f"), f"{r['stored_states']} / {r['stored_states_hessp']}",
                    f"{fmt(r['stored_MiB'], '.1f')} / {fmt(r['stored_MiB_hessp'], '.1f')}",
                    fmt(r.get("gradient_rel_diff"), ".1e"), fmt(r.get("gradient_max_rel_diff"), ".1e"),
                    fmt(r.get("hessp_rel_diff"), ".1e")])
    return markdown_table(out, header)


def gallery_summary(rows) -> dict:
    got = [r for r in rows if "error" not in r]
    store = next((r for r in got if r["schedule"] is None), None)
    ck = [r for r in got if r["schedule"] is not None]
    grow = {}
    for sched in dict.fromkeys(r["schedule"] for r in ck):
        mine = sorted((r for r in ck if r["schedule"] == sched), key=lambda r: r["snapshots"])
        grow[sched] = all(a["stored_states"] < b["stored_states"] and a["stored_states_hessp"] < b["stored_states_hessp"]
                          for a, b in zip(mine, mine[1:]))
    diffs = [r["gradient_rel_diff"] for r in ck if r.get("gradient_rel_diff") is not None]
    hdiffs = [r["hessp_rel_diff"] for r in ck if r.get("hessp_rel_diff") is not None]
    return dict(rows=len(rows), rows_measured=len(got), rows_failed=len(rows) - len(got), ratio_target=RATIO_TARGET,
                ratio_value_gradient=None if store is None else store["ratio_value_gradient"],
                met_ratio_target=None if store is None else store["met_ratio_target"],
                store_solves_as_expected=None if store is None else store["solves_as_expected"],
                factorizations_met=all(r["met_factorizations"] for r in got) if got else None,
                promises_met=all(r["met_promise"] for r in ck) if ck else None,
                hessp_promises_met=all(r["hessp_met_promise"] for r in ck) if ck else None,
                stated_promises_met=(all(r["met_stated_promise"] for r in ck if "met_stated_promise" in r)
                                     if any("met_stated_promise" in r for r in ck) else None),
                stored_states_grow_with_snapshots=grow,
                max_gradient_rel_diff=max(diffs) if diffs else None, max_hessp_rel_diff=max(hdiffs) if hdiffs else None)


def gallery_main(args, argv: list) -> int:
    import numba

    command = "env -u " + " -u ".join(ENV_UNSET) + f" python {SCRIPT} " + shlex.join(argv)
    unset = {v: os.environ.get(v) for v in ENV_UNSET}
    ok = all(v is None for v in unset.values())
    run = dict(command=command, argv=argv, env_unset=unset, env_unset_ok=ok,
               env_note=(f"{' and '.join(ENV_UNSET)} were unset for this run (env -u)" if ok else
                         f"{', '.join(k for k, v in unset.items() if v is not None)} were SET for this run"),
               config=dict(gallery=args.gallery, n=args.gallery_n, steps=args.gallery_steps,
                           scheme=args.gallery_scheme, solver_requested=args.gallery_solver,
                           snapshots=args.gallery_snapshots, schedules=args.gallery_schedules, repeat=args.repeat,
                           seed=args.seed, no_warmup=args.no_warmup),
               stored_bytes_note="stored_bytes = stored_states * 8 * unknowns (J.stats.stored_states: the most state "
                                 "vectors held at once) of the cold gradient (stored_states), of hessp (stored_states_hessp) and the most over "
                                 "the calls (stored_states_max); the process's peak RSS is shared by the rows")
    if not ok:
        print(f"warning: {', '.join(k for k, v in unset.items() if v is not None)} set; run the benchmark as "
              f"{command}", file=sys.stderr)
    data = dict(script=SCRIPT, mode="gallery", gallery=args.gallery, complete=False, rows=[], runs=[run],
                summary=None)
    run["info"] = machine_info(script=SCRIPT, argv=argv)
    run["transient_sources"] = source_hashes()
    run["problem_source"] = problem_hash(args.gallery)
    write_json(args.out, data)
    t_start = time.perf_counter()
    run["warmup_s"] = 0.0 if args.no_warmup else gallery_warm_up(args)
    run["info"]["blas"] = blas_info()
    run["info"]["numba_threads"] = numba.get_num_threads()

    def emit(row):
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        data["rows"].append(row)
        write_json(args.out, data)
        head = f"{row['gallery']} n={row['n']} N={row['steps']} {row['solver']} {row['row']}:"
        if "error" in row:
            print(f"{head} ERROR {row['error'][:300]}", flush=True)
            return
        extra = ""
        if row["schedule"] is not None:
            pr = row["promise"]
            extra = (f"; cold gradient {row['steps_per_step']['gradient_cold']:.3f} steps/N (schedule "
                     f"{pr['schedule_per_step']:.3f}), stored {row['stored_states']} states, grad rel diff "
                     f"{fmt(row.get('gradient_rel_diff'), '.1e')}")
        print(f"{head} value {row['t_value']:.4g} s, gradient {row['t_gradient']:.4g} s, hessp {row['t_hessp']:.4g} s, "
              f"cold gradient {row['t_gradient_cold']:.4g} s; (v+g)/v {row['ratio_value_gradient']:.3f}, h/v "
              f"{row['ratio_hessp']:.3f}{extra}", flush=True)

    try:
        run["build"] = run_gallery(args, emit)
    except Exception as exc:  # noqa: BLE001 - a failed build is recorded
        emit(dict(gallery=args.gallery, n=args.gallery_n, steps=args.gallery_steps, solver=args.gallery_solver,
                  row="build", error=f"build: {type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
    run["total_s"] = time.perf_counter() - t_start
    run["peak_rss_GiB_process"] = peak_rss_gib()
    run["loadavg_after"] = loadavg()
    run["git_after"] = git_state()
    data["summary"] = gallery_summary(data["rows"])
    data["complete"] = True
    write_json(args.out, data)

    s = data["summary"]
    print()
    print(f"{args.gallery}: n = {args.gallery_n}, N = {args.gallery_steps} {args.gallery_scheme} steps, "
          f"{(run.get('build') or {}).get('solver', '-')}, median of {args.repeat} (a new p each); the cold gradient "
          f"is one call at one more p; steps/N = J.stats.time_steps / N; stored MiB = stored states x 8 x unknowns:")
    print(gallery_table(data["rows"]))
    print()
    print(f"{s['rows_measured']} measured row(s), {s['rows_failed']} failed; (v+g)/v stored "
          f"{fmt(s['ratio_value_gradient'], '.3f')} <= {RATIO_TARGET}: {fmt(s['met_ratio_target'])}; stored solves "
          f"as expected: {fmt(s['store_solves_as_expected'])}; factorizations 1: {fmt(s['factorizations_met'])}; "
          f"gradient steps = schedule = optimum: {fmt(s['promises_met'])} (hessp {fmt(s['hessp_promises_met'])}, "
          f"stated {fmt(s['stated_promises_met'])}); stored states grow with s: {s['stored_states_grow_with_snapshots']}; "
          f"max gradient rel diff {fmt(s['max_gradient_rel_diff'], '.1e')}, hessp {fmt(s['max_hessp_rel_diff'], '.1e')}")
    env = run["info"]["blas"]["thread_env"]
    print(f"OPENBLAS_CORETYPE={env.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={env.get('OPENBLAS_L2_SIZE')}; "
          f"numba threads {run['info']['numba_threads']}; warm-up {run['warmup_s']:.3g} s, total "
          f"{run['total_s']:.4g} s; wrote {args.out}")
    return 1 if s["rows_failed"] else 0


def problem_hash(name: str) -> str | None:
    import hashlib

    path = os.path.join(ROOT, "problems", f"{name}.py")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.gallery is not None:
        return gallery_main(args, argv)
    import numba

    command = "env -u " + " -u ".join(ENV_UNSET) + f" python {SCRIPT} " + shlex.join(argv)
    unset = {v: os.environ.get(v) for v in ENV_UNSET}
    ok = all(v is None for v in unset.values())
    run = dict(command=command, argv=argv, env_unset=unset, env_unset_ok=ok,
               env_note=(f"{' and '.join(ENV_UNSET)} were unset for this run only (env -u on the benchmark's command "
                         f"line, not in the shell)" if ok else
                         f"{', '.join(k for k, v in unset.items() if v is not None)} were SET for this run"),
               config=dict(sizes=args.sizes, steps=args.steps, schemes=args.schemes, solvers=args.solvers,
                           stiffness=args.stiffness, modes=args.modes, repeat=args.repeat,
                           final_time=args.final_time, kappa=args.kappa, source=args.source,
                           source_nodes=args.source_nodes, beta=args.beta, nonlinear_source=args.nonlinear_source,
                           n_obs=args.n_obs, seed=args.seed, quick=args.quick, profile=args.profile))
    if not run["env_unset_ok"]:
        print(f"warning: {', '.join(k for k, v in unset.items() if v is not None)} set; run the benchmark as "
              f"{command}", file=sys.stderr)
    data = dict(script=SCRIPT, complete=False, rows=[], runs=[run], summary=None)
    run["info"] = machine_info(script=SCRIPT, argv=argv)
    run["transient_sources"] = source_hashes()  # the subpackage is young: which version of it was measured
    write_json(args.out, data)
    t_start = time.perf_counter()
    run["warmup_s"] = 0.0 if args.no_warmup else warm_up(args)
    run["info"]["blas"] = blas_info()  # after the warm-up: the backends are loaded
    run["info"]["numba_threads"] = numba.get_num_threads()

    def emit(row):
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        data["rows"].append(row)
        write_json(args.out, data)
        r = row
        head = (f"n={r['n']} N={r['steps']} {r['scheme']} {r['solver']} {r['stiffness']} A"
                f"{' ' + r['mode'] if 'mode' in r else ''}:")
        if "skipped" in r:
            print(f"{head} skipped ({r['skipped']})", flush=True)
        elif "error" in r:
            print(f"{head} ERROR {r['error'][:300]}", flush=True)
        else:
            extra = ""
            if r["mode"] != "store":
                extra = (f"; recomputed {r['gradient_recomputed_steps']}/{r['hessp_recomputed_steps']} steps, "
                         f"{r['gradient_checkpoints']} checkpoints ({r['gradient_disk_checkpoints']} on disk), "
                         f"slowdown v+g {fmt(r.get('slowdown_value_gradient'), '.2f')}, "
                         f"grad rel diff {fmt(r.get('gradient_rel_diff'), '.1e')}")
            if r["stiffness"] == "nonlinear":
                fpc = r["factorizations_per_call"]
                extra = (f"; {r['newton_iterations_per_step']:.2f} Newton iterations per step, factorizations "
                         f"v|g|h {fpc['value']}|{fpc['gradient']}|{fpc['hessp']}") + extra
            print(f"{head} value {r['t_value']:.4g} s ({r['factorizations']} factorizations), gradient "
                  f"{r['t_gradient']:.4g} s, hessp {r['t_hessp']:.4g} s; (v+g)/v {r['ratio_value_gradient']:.3f}, "
                  f"hessp/v {r['ratio_hessp']:.3f}{extra}", flush=True)

    try:
        for cfg in configs(args, emit):
            run_config(cfg, args, emit)
    except Exception as exc:  # noqa: BLE001 - a failed size is recorded, the run stops there
        emit(dict(n=None, steps=None, scheme="-", solver="-", stiffness="-", error=f"build: {type(exc).__name__}: "
                  f"{exc}", traceback=traceback.format_exc()))
    run["total_s"] = time.perf_counter() - t_start
    run["loadavg_after"] = loadavg()
    run["git_after"] = git_state()
    data["summary"] = summary(data["rows"])
    data["complete"] = True
    write_json(args.out, data)

    rows = data["rows"]
    print()
    print("Figures (median of --repeat, a new p each; fact = factorizations of the first value / distinct step "
          "matrices (R(u,p): of the value | gradient | hessp); its/step = Newton iterations per step of the values; "
          "solves f forward, a adjoint, t tangent, s second adjoint; st = one plain step (R(u,p): with its "
          "Jacobian and factorization), stT its transpose):")
    print(main_table(rows))
    print()
    print("Memory (states held, checkpoints and recomputed steps of gradient/hessp; slowdown and differences "
          "against the store row at the same p):")
    print(checkpoint_table(rows))
    print()
    print("One step timed alone (per call, median of 7 blocks of 10 calls) and the parametric A's kernels (median of 5):")
    print(step_table(rows))
    prof = profile_text(rows)
    if prof:
        print()
        print("cProfile of one gradient, top functions by own time:")
        print(prof)
    s = data["summary"]
    print()
    print(f"{s['rows_measured']} measured row(s), {s['rows_failed']} failed, {s['rows_skipped']} skipped; "
          f"factorizations as expected: {fmt(s['factorizations_met'])}; store solves as expected: "
          f"{fmt(s['store_solves_as_expected'])}; checkpointed rows recompute: {fmt(s['checkpointed_recompute'])}; "
          f"max gradient rel diff {fmt(s['max_gradient_rel_diff'], '.1e')}, hessp {fmt(s['max_hessp_rel_diff'], '.1e')}"
          + ("" if s["newton_iterations_per_step"] is None else
             f"; Newton iterations per step {s['newton_iterations_per_step'][0]:.2f}-"
             f"{s['newton_iterations_per_step'][1]:.2f}"))
    env = run["info"]["blas"]["thread_env"]
    print(f"OPENBLAS_CORETYPE={env.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={env.get('OPENBLAS_L2_SIZE')}; "
          f"numba threads {run['info']['numba_threads']}; warm-up {run['warmup_s']:.3g} s, total "
          f"{run['total_s']:.4g} s; wrote {args.out}")
    return 1 if s["rows_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
