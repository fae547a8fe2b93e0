"""MPI scaling of the PETSc backend: strong and weak scaling of value, gradient and Hessian action.

Usage:
  mpiexec -n R python scripts/bench_mpi.py [--problem poisson_inversion|topology_compliance] [--dim 2|3]
        [--size N | NELXxNELY] [--weak-size N | NELXxNELY] [--strong] [--weak] [--repeat 7] [--rtol 1e-8]
        [--pc-type gamg] [--ksp-type cg] [--partition slab|block] [--check-max-dofs 300000] [--agree-tol 1e-8]
        [--check-rtol 1e-12] [--seed 0]
        [--tao [--tao-method ntr] [--tao-gtol 1e-6] [--tao-maxiter 20]] [--quick] [--json PATH]
  python scripts/bench_mpi.py --ranks 1 2 [the options above]       (driver: one mpiexec per rank count)
  python scripts/bench_mpi.py --combine a.json b.json [--json PATH]  (merge separate runs, e.g. SLURM jobs)

One run measures with the ranks it was started with. The driver mode
(``--ranks``, started without mpiexec) runs ``mpiexec -n R python
scripts/bench_mpi.py ... --json <temporary>`` for each R in turn (mpiexec found
on PATH, or ``--mpiexec``), with OMP_NUM_THREADS, NUMBA_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set to 1 (one thread per rank), and
gathers the runs into one JSON with the parallel efficiencies. ``--combine``
does the same for JSON files written by separate runs (one per job on a
cluster: see ``scripts/slurm_bench_mpi.sh``).

Problems (built on every rank, then ``adjopt.backends.petsc.distribute``):

* ``poisson_inversion`` (default): ``build(n, dim)``, nodal log-conductivity,
  P1 elements, (n - 1)^dim free dofs, (n + 1)^dim parameters. Strong-scaling
  size ``--size`` (default n = 256 in 2D: 65,025 dofs; 40 in 3D).
* ``topology_compliance``: ``build("mbb", nelx, nely)``, element densities
  through the density filter, Q1 elasticity, compliance (self-adjoint: no
  adjoint solves). Default size 192x64 (25,025 dofs).

Cases:

1. ``strong``: the ``--size`` problem on R ranks.
2. ``weak``: fixed work per rank: the ``--weak-size`` problem (default
   ``--size``) scaled with R: n = round(n0 R^(1/dim)) for the Poisson problem,
   nelx = round(nelx0 sqrt(R)) and nely = round(nely0 sqrt(R)) for the MBB beam.

Per case, after an untimed warm-up (a small problem for the numba JIT and
PETSc, then one round on the benchmark problem, recorded as ``warmup``),
``--repeat`` rounds, each at a fresh p (a new random perturbation, the same on
every rank) with the counters reset, on the distributed vectors (the Vec
interface TAO uses):

* ``value_s``: ``F.value_vec(p)``: parameter map, assembly, preconditioner
  setup (``setup_s`` = ``F.times["factorize"]``, GAMG by default) and the
  forward solve (``forward_solve_s``);
* ``gradient_s``: ``F.gradient_vec(p)`` right after, at the same p (the state is
  cached): the adjoint solve and the sensitivity contraction only;
* ``hessp_s``: ``F.hessp_vec(p, dp)`` (tangent and second-adjoint solves) for a
  fixed random direction dp;
* ``numpy_*_s``: the same three through the serial interface (``F.value(p)``
  etc. with the full numpy vector on every rank) at another fresh p: adds the
  scatter of p and the allgather of the result.

Every time is the wall time of the slowest rank (a barrier before each call);
the record holds the median over the rounds, all rounds (``repetitions``),
the Krylov iterations per solve kind (forward, adjoint, tangent,
second_adjoint; median over the rounds), the phases of ``F.times`` (slowest
rank), the rows per rank of the layout (dofs, elements, parameters; the load
imbalance max / mean of the dofs) and the peak resident memory per rank
(VmHWM, whole process, the replicated problem included).

Correctness (``check``): where the case has at most ``--check-max-dofs`` dofs
(default 300,000), J, the gradient and one Hessian action at a further fresh p
through the serial interface against the serial ``problem.functional``
(evaluated on rank 0 with its direct solver): relative differences
(``J_rel_diff``, ``gradient_rel_diff``: 2-norm; ``hessp_rel_diff``) and
``agrees`` = J and gradient within ``--agree-tol`` (default 1e-8). The
judged numbers come from a twin of the benchmarked functional (same ranks,
partition and preconditioner) solving to ``--check-rtol`` (default 1e-12): at
the benchmark's ``--rtol`` 1e-8 the Krylov error alone reaches about 1e-8 in
the gradient (1.1e-8 at n = 24), so those differences are recorded apart
(``at_bench_rtol``), not judged.

``--tao`` (Poisson problem only; the MBB beam has a volume constraint that
neither method takes): TAO (``minimize_tao``, ``--tao-method`` ntr) against
``adjopt.minimize(distributed problem, method="newton-cg")`` through the
serial interface, both from p0 and both to the same test: the gradient norm
in the L2 inner product (``inner=problem.mass`` for TAO, ``inner_product="l2"``
for adjopt) at most ``--tao-gtol`` times its value at p0, at most
``--tao-maxiter`` iterations: iterations, solves by kind, Krylov iterations,
seconds, J and the relative difference of J and x between the two. It is slow
at the default size: on one rank of the development machine TAO ntr took
10 iterations, 4,168 solves and 405 s (its trust-region CG on the Hessian has
no preconditioner), newton-cg (CG preconditioned by the H1 inner product,
the problem's default) 8 iterations, 220 solves and 29 s, to the same J.

Parallel efficiency (over the runs of a driver or ``--combine``, base R0 =
the smallest rank count, normally 1): strong speedup T(R0) / T(R) and efficiency
R0 T(R0) / (R T(R)); weak efficiency T(R0) / T(R); for value, gradient, hessp,
setup and value + gradient.

Output: rank 0 prints and writes; JSON ``--json`` (default
``scripts/results/bench_mpi.json``, ``bench_mpi_quick.json`` with ``--quick``;
written atomically) with ``info`` (``machine_info`` and the thread variables),
``config``, ``ranks``, ``runs`` (one per rank count: cases, checks, TAO) and
``efficiency``. Exit status 2 for bad input, 1 when a run failed or a
check disagreed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
from _bench_common import (
    MPI_THREAD_VARS,
    launch_mpi,
    loadavg,
    machine_info,
    peak_rss_gib,
    release_memory,
    reset_peak,
    run_rank_counts,
    table,
    write_json,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # for ``from problems import ...``
SCRIPT = os.path.abspath(__file__)
RESULTS = os.path.join(ROOT, "scripts", "results")
PROBLEMS = ("poisson_inversion", "topology_compliance")
CASES = ("strong", "weak")
THREAD_VARS = MPI_THREAD_VARS
KINDS = ("forward", "adjoint", "tangent", "second_adjoint")
#: the timed quantities of a round (median over the rounds in the case record)
TIMES = ("value_s", "gradient_s", "hessp_s", "setup_s", "forward_solve_s", "numpy_value_s", "numpy_gradient_s",
         "numpy_hessp_s")
#: the quantities of the efficiency table
EFFICIENCY_METRICS = ("value_s", "gradient_s", "value_gradient_s", "hessp_s", "setup_s")
#: default sizes: (strong-scaling size, --quick size)
DEFAULT_SIZES = {("poisson_inversion", 2): (256, 24), ("poisson_inversion", 3): (40, 6),
                 ("topology_compliance", 2): ((192, 64), (24, 8))}
#: environment variables of a process started by an MPI launcher (mpiexec of MPICH / Open MPI, srun)
LAUNCHER_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


# -- command line -----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--problem", default="poisson_inversion", choices=PROBLEMS)
    ap.add_argument("--dim", type=int, default=2, choices=(2, 3), help="dimension of poisson_inversion (default 2)")
    ap.add_argument("--size", default=None,
                    help="strong-scaling size: n (poisson_inversion; default 256 in 2D, 40 in 3D) or NELXxNELY "
                         "(topology_compliance; default 192x64)")
    ap.add_argument("--weak-size", default=None, help="the weak-scaling size on one rank (default --size)")
    ap.add_argument("--strong", action="store_true", help="strong scaling only (default: both cases)")
    ap.add_argument("--weak", action="store_true", help="weak scaling only (default: both cases)")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds per case, each at a fresh p (default 7)")
    ap.add_argument("--rtol", type=float, default=1e-8, help="relative tolerance of every Krylov solve")
    ap.add_argument("--max-it", type=int, default=10000, help="Krylov iteration limit per solve")
    ap.add_argument("--pc-type", default="gamg", help="PETSc preconditioner (default gamg)")
    ap.add_argument("--ksp-type", default=None, help="PETSc Krylov method (default cg for a symmetric A)")
    ap.add_argument("--partition", default=None, choices=("slab", "block"),
                    help="element partition (default: slab when the problem has a mesh)")
    ap.add_argument("--check-max-dofs", type=int, default=300_000,
                    help="compare with the serial functional up to this many dofs (0: never)")
    ap.add_argument("--agree-tol", type=float, default=1e-8,
                    help="J and gradient must agree with the serial functional to this (relative)")
    ap.add_argument("--check-rtol", type=float, default=1e-12, help="Krylov tolerance of the checked twin functional")
    ap.add_argument("--tao", action="store_true", help="also time TAO against adjopt's newton-cg (poisson_inversion)")
    ap.add_argument("--tao-method", default="ntr", choices=("ntr", "nls", "blmvm", "lmvm"))
    ap.add_argument("--tao-gtol", type=float, default=1e-6, help="stop at this L2 gradient norm relative to p0's")
    ap.add_argument("--tao-maxiter", type=int, default=None, help="iteration limit of both optimizers (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the parameters and the direction")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (smoke test)")
    ap.add_argument("--json", default=None,
                    help="JSON output (default scripts/results/bench_mpi.json; bench_mpi_quick.json with --quick)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, metavar="R",
                    help="driver mode: run mpiexec -n R for each R (start without mpiexec) and combine")
    ap.add_argument("--mpiexec", default=None, help="the MPI launcher of --ranks (default: mpiexec on PATH)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per rank count in driver mode")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="merge the runs of these JSON files (of this script) into --json, with efficiencies")
    ap.add_argument("--from-driver", action="store_true", help=argparse.SUPPRESS)
    return ap


def parse_size(text, problem: str, ap) -> int | tuple[int, int]:
    """``N`` (poisson_inversion, N >= 2) or ``NELXxNELY`` (topology_compliance, both >= 2)."""
    if isinstance(text, (int, tuple)):
        return text
    text = str(text).strip().lower()
    if problem == "poisson_inversion":
        if not re.fullmatch(r"\d+", text) or int(text) < 2:
            ap.error(f"--size/--weak-size of poisson_inversion is n >= 2 (cells per side), got {text!r}")
        return int(text)
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or min(int(m[1]), int(m[2])) < 2:
        ap.error(f"--size/--weak-size of topology_compliance is NELXxNELY (both >= 2), got {text!r}")
    return int(m[1]), int(m[2])


def under_launcher() -> bool:
    """True when this process was started by an MPI launcher with more than one rank."""
    for var in LAUNCHER_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if args.combine is not None:
        if args.ranks is not None:
            ap.error("--combine merges existing JSON files; it does not take --ranks")
        missing = [f for f in args.combine if not os.path.isfile(f)]
        if missing:
            ap.error(f"--combine: no such file: {', '.join(missing)}")
    if args.problem == "topology_compliance" and args.dim != 2:
        ap.error("--dim 3 is for poisson_inversion (topology_compliance runs the 2D MBB beam)")
    strong, quick = DEFAULT_SIZES[(args.problem, args.dim)]
    args.size = parse_size(args.size if args.size is not None else (quick if args.quick else strong), args.problem, ap)
    args.weak_size = parse_size(args.weak_size if args.weak_size is not None else args.size, args.problem, ap)
    args.cases = [c for c, on in zip(CASES, (args.strong, args.weak)) if on] or list(CASES)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 7
    if args.tao_maxiter is None:
        args.tao_maxiter = 5 if args.quick else 20
    if args.repeat < 1 or args.tao_maxiter < 1 or args.max_it < 1:
        ap.error(f"--repeat, --tao-maxiter and --max-it must be >= 1, got {args.repeat}, {args.tao_maxiter}, "
                 f"{args.max_it}")
    for name in ("rtol", "check_rtol", "agree_tol", "tao_gtol"):
        v = getattr(args, name)
        if not (math.isfinite(v) and 0 < v < 1):
            ap.error(f"--{name.replace('_', '-')} must be in (0, 1), got {v}")
    if args.check_max_dofs < 0:
        ap.error(f"--check-max-dofs must be >= 0, got {args.check_max_dofs}")
    if args.timeout <= 0:
        ap.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.json is None:
        args.json = os.path.join(RESULTS, "bench_mpi_quick.json" if args.quick else "bench_mpi.json")
    d = os.path.dirname(os.path.abspath(args.json))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        ap.error(f"--json: folder {d} does not exist or is not writable")
    if args.ranks is not None:
        bad = [r for r in args.ranks if r < 1]
        if bad:
            ap.error(f"--ranks must be >= 1, got {bad}")
        args.ranks = sorted(set(args.ranks))
        if under_launcher():
            ap.error("--ranks starts mpiexec itself: run the driver without mpiexec (or drop --ranks to measure "
                     "with the ranks of this launch)")
        launcher = args.mpiexec or "mpiexec"
        found = shutil.which(launcher)
        if found is None:
            ap.error(f"--ranks needs an MPI launcher: {launcher!r} was not found on PATH. Install one (the mpich "
                     "wheel: pip install mpich, or a system MPI) or pass --mpiexec /path/to/mpiexec")
        args.mpiexec = found
    return args


def weak_size(args, ranks: int):
    """The weak-scaling size on ``ranks`` ranks: elements (and dofs) grow about linearly with the rank count."""
    if args.problem == "poisson_inversion":
        return max(2, round(args.weak_size * ranks ** (1.0 / args.dim)))
    nelx, nely = args.weak_size
    s = math.sqrt(ranks)
    return max(2, round(nelx * s)), max(2, round(nely * s))


def size_arg(problem: str, size) -> str:
    """The size as --size takes it: ``N`` or ``NELXxNELY``."""
    return str(size) if problem == "poisson_inversion" else f"{size[0]}x{size[1]}"


def size_label(problem: str, size) -> str:
    return f"n={size}" if problem == "poisson_inversion" else size_arg(problem, size)


def build_problem(args, size):
    """The gallery problem at ``size`` (the same on every rank; serial functional included)."""
    if args.problem == "poisson_inversion":
        from problems import poisson_inversion

        return poisson_inversion.build(n=size, dim=args.dim)
    from problems import topology_compliance

    return topology_compliance.build("mbb", nelx=size[0], nely=size[1])


def point(problem, seed: int) -> np.ndarray:
    """A fresh p (the same on every rank): half the true field (or p0) plus a small random perturbation, in the bounds."""
    meta = problem.meta if isinstance(problem.meta, dict) else {}
    base = 0.5 * meta["m_true"] if "m_true" in meta else problem.p0
    p = base + 0.05 * np.random.default_rng(seed).standard_normal(base.size)
    if problem.bounds is not None:
        lo, hi = problem.bounds
        p = np.clip(p, lo, hi)
    return p


def direction(problem, seed: int) -> np.ndarray:
    return np.random.default_rng(10_000 + seed).standard_normal(problem.p0.size)


# -- measurements (every rank) -----------------------------------------------------------------------
def timed(comm, f) -> float:
    """Wall seconds of the collective call ``f()`` on the slowest rank (a barrier first)."""
    comm.Barrier()
    t0 = time.perf_counter()
    f()
    dt = time.perf_counter() - t0
    return max(comm.allgather(dt))


def slowest(comm, d: dict) -> dict:
    """Entry-wise maximum over the ranks of a dict of seconds."""
    out = {}
    for x in comm.allgather({k: float(v) for k, v in d.items()}):
        for k, v in x.items():
            out[k] = max(out.get(k, 0.0), v)
    return out


def cleanup() -> None:
    """Free the last case: Python objects, then the PETSc objects they held (collectively), then the heap."""
    import gc

    from petsc4py import PETSc

    gc.collect()
    PETSc.garbage_cleanup()
    release_memory()


def distribute_options(args) -> dict:
    opts = dict(rtol=args.rtol, max_it=args.max_it, pc_type=args.pc_type)
    if args.ksp_type:
        opts["ksp_type"] = args.ksp_type
    return opts


def one_round(comm, F, pv, p_numpy, dp, dv, g, h) -> dict:
    """value, gradient, hessp on Vecs at ``pv`` (fresh), then the same through the serial interface."""
    F.reset_stats()
    row = dict(value_s=timed(comm, lambda: F.value_vec(pv)))
    phases = slowest(comm, F.times)
    row["setup_s"], row["forward_solve_s"] = phases.get("factorize", 0.0), phases.get("solve", 0.0)
    row["gradient_s"] = timed(comm, lambda: F.gradient_vec(pv, g))
    row["hessp_s"] = timed(comm, lambda: F.hessp_vec(pv, dv, h))
    s = F.stats
    row["iterations"] = {k: int(s.iterations[k]) for k in KINDS if s.solves[k]}
    row["solves"] = {k: int(s.solves[k]) for k in KINDS if s.solves[k]}
    row["setups"] = int(s.factorizations)
    row["solve_s"] = slowest(comm, {k: s.solve_time[k] for k in KINDS if s.solves[k]})
    row["phases"] = slowest(comm, F.times)
    row["numpy_value_s"] = timed(comm, lambda: F.value(p_numpy))
    row["numpy_gradient_s"] = timed(comm, lambda: F.gradient(p_numpy))
    row["numpy_hessp_s"] = timed(comm, lambda: F.hessp(p_numpy, dp))
    return row


def _rel_diffs(J, g, h, Js, gs, hs) -> dict:
    return dict(J_rel_diff=abs(J - Js) / abs(Js), gradient_rel_diff=float(np.linalg.norm(g - gs) / np.linalg.norm(gs)),
                hessp_rel_diff=float(np.linalg.norm(h - hs) / np.linalg.norm(hs)))


def check_against_serial(args, comm, problem, F, dp) -> dict:
    """J, gradient and H dp at a fresh p: distributed against the serial functional (rank 0, its direct solver).

    Judged on a twin of ``F`` that solves to ``--check-rtol`` (the implementation; 1e-12 by default), and
    recorded for ``F`` itself at the benchmark's ``--rtol`` (``at_bench_rtol``: the Krylov error shows there).
    """
    from adjopt.backends.petsc import distribute

    p = point(problem, args.seed * 1000 + 999)
    bench = F.value(p), F.gradient(p), F.hessp(p, dp)
    opts = dict(distribute_options(args), rtol=args.check_rtol)
    twin = distribute(problem, comm=comm, partition=args.partition, **opts).functional
    tight = twin.value(p), twin.gradient(p), twin.hessp(p, dp)
    del twin
    out = None
    if comm.rank == 0:
        J = problem.functional
        t0 = time.perf_counter()
        serial = J.value(p), J.gradient(p), J.hessp(p, dp)
        out = dict(_rel_diffs(*tight, *serial), check_rtol=args.check_rtol, tol=args.agree_tol, J=float(serial[0]),
                   serial_solver=getattr(J.solver, "name", type(J.solver).__name__), serial_s=time.perf_counter() - t0,
                   at_bench_rtol=dict(_rel_diffs(*bench, *serial), rtol=args.rtol))
        out["agrees"] = bool(max(out["J_rel_diff"], out["gradient_rel_diff"]) <= args.agree_tol)
    return comm.bcast(out, root=0)


def summarize_rounds(rounds: list[dict]) -> dict:
    """Medians of the timed quantities and the iteration counts over the rounds."""
    out = {k: float(np.median([r[k] for r in rounds])) for k in TIMES}
    out["value_gradient_s"] = float(np.median([r["value_s"] + r["gradient_s"] for r in rounds]))
    kinds = [k for k in KINDS if any(k in r["iterations"] for r in rounds)]
    out["iterations"] = {k: float(np.median([r["iterations"].get(k, 0) for r in rounds])) for k in kinds}
    out["iterations_per_solve"] = {k: float(np.median([r["iterations"].get(k, 0) / max(1, r["solves"].get(k, 0))
                                                       for r in rounds])) for k in kinds}
    out["solves"] = rounds[-1]["solves"]
    out["phases"] = {k: float(np.median([r["phases"].get(k, 0.0) for r in rounds])) for k in rounds[-1]["phases"]}
    return out


def measure_case(args, comm, case: str, size) -> dict:
    from adjopt.backends.petsc import distribute

    R = comm.size
    reset_peak()
    t0 = time.perf_counter()
    problem = build_problem(args, size)
    build_s = max(comm.allgather(time.perf_counter() - t0))
    t0 = time.perf_counter()
    dist = distribute(problem, comm=comm, partition=args.partition, **distribute_options(args))
    distribute_s = max(comm.allgather(time.perf_counter() - t0))
    F = dist.functional
    lay = F.layout
    dofs_per_rank = np.diff(lay.dofs.ranges)
    rec = dict(case=case, ranks=R, problem=args.problem, dim=args.dim, size=size_label(args.problem, size),
               dofs=int(lay.dofs.size), params=int(F.n_params), elements=int(lay.elements.size), solver=F.solver.name,
               rtol=args.rtol, partition=args.partition or "default", build_s=build_s, distribute_s=distribute_s,
               dofs_per_rank=dofs_per_rank.tolist(), elements_per_rank=np.diff(lay.elements.ranges).tolist(),
               params_per_rank=np.diff(lay.params.ranges).tolist(),
               dof_imbalance=float(dofs_per_rank.max() / dofs_per_rank.mean()))
    if args.problem == "poisson_inversion":
        rec["n"] = size
    else:
        rec["nelx"], rec["nely"] = size
    dp = direction(problem, args.seed)
    dv, g, h = F.to_vec(dp, "dp"), F.create_parameter_vec(), F.create_parameter_vec()
    rounds = []
    for r in range(-1, args.repeat):  # r = -1: the warm-up round
        seed = args.seed * 1000 + 2 * (r + 1)
        p = point(problem, seed)
        rounds.append(one_round(comm, F, F.to_vec(p), point(problem, seed + 1), dp, dv, g, h))
    rec["warmup"] = rounds.pop(0)
    rec.update(summarize_rounds(rounds))
    rec["repetitions"] = rounds
    if rec["dofs"] <= args.check_max_dofs:
        rec["check"] = check_against_serial(args, comm, problem, F, dp)
    else:
        rec["check"] = dict(skipped=f"{rec['dofs']} dofs > --check-max-dofs {args.check_max_dofs}")
    peaks = comm.allgather(peak_rss_gib())
    rec.update(peak_rss_GiB_per_rank=peaks, peak_rss_GiB_max=max(peaks), peak_rss_GiB_sum=sum(peaks))
    del F, dist, problem, dv, g, h
    cleanup()
    return rec


def measure_tao(args, comm) -> dict:
    """TAO against adjopt's newton-cg on the distributed strong-scaling problem, the same stopping test."""
    if args.problem != "poisson_inversion":
        return dict(skipped="topology_compliance has a volume constraint, which neither TAO's Newton methods nor "
                            "newton-cg take")
    import scipy.sparse.linalg as spla
    from problems import poisson_inversion

    import adjopt
    from adjopt.backends.petsc import distribute, minimize_tao

    problem = build_problem(args, args.size)
    dist = distribute(problem, comm=comm, partition=args.partition, **distribute_options(args))
    F, p0, M = dist.functional, problem.p0, problem.mass
    g0 = F.gradient(p0)
    g0_norm = None
    if comm.rank == 0:
        g0_norm = float(np.sqrt(g0 @ spla.spsolve(M.tocsc(), g0)))
    g0_norm = comm.bcast(g0_norm, root=0)
    out = dict(ranks=comm.size, size=size_label(args.problem, args.size), dofs=int(F.layout.dofs.size),
               gtol=args.tao_gtol, maxiter=args.tao_maxiter, g0_l2_norm=g0_norm)

    F.reset_stats()
    comm.Barrier()
    res = minimize_tao(F, p0, method=args.tao_method, inner=M, gatol=args.tao_gtol * g0_norm, maxiter=args.tao_maxiter)
    out["tao"] = dict(method=args.tao_method, nit=res.nit, fun=res.fun, gnorm=res.gnorm, reason=res.reason,
                      success=res.success, seconds=max(comm.allgather(res.time)), solves=res.stats.get("solves", {}),
                      total_solves=res.stats.get("total_solves"), iterations=res.stats.get("iterations", {}),
                      setups=res.stats.get("factorizations"))

    F.reset_stats()
    extra = {k: v for k, v in getattr(poisson_inversion, "RUN_DEFAULTS", {}).items() if k == "preconditioner"}
    comm.Barrier()
    t0 = time.perf_counter()
    nres = adjopt.minimize(dist, method="newton-cg", inner_product="l2", gtol=args.tao_gtol, maxiter=args.tao_maxiter,
                           **extra)
    seconds = max(comm.allgather(time.perf_counter() - t0))
    s = F.stats
    out["newton_cg"] = dict(nit=nres.nit, fun=nres.fun, stationarity=nres.stationarity, success=nres.success,
                            message=nres.message, nfev=nres.nfev, njev=nres.njev, nhessp=nres.nhessp, seconds=seconds,
                            solves={k: int(v) for k, v in s.solves.items() if v}, total_solves=int(s.total_solves),
                            iterations={k: int(v) for k, v in s.iterations.items() if v}, setups=int(s.factorizations),
                            options=dict(inner_product="l2", **extra))
    out["fun_rel_diff"] = abs(res.fun - nres.fun) / abs(nres.fun)
    out["x_rel_diff"] = float(np.linalg.norm(res.x - nres.x) / max(np.linalg.norm(nres.x), 1e-300))
    del F, dist, problem
    cleanup()
    return out


def warm_up(args, comm) -> float:
    """One value, gradient and Hessian action on a small problem (numba JIT, PETSc first calls); seconds."""
    from adjopt.backends.petsc import distribute

    t0 = time.perf_counter()
    small = argparse.Namespace(**{**vars(args), "weak_size": DEFAULT_SIZES[(args.problem, args.dim)][1]})
    problem = build_problem(args, weak_size(small, comm.size))
    F = distribute(problem, comm=comm, partition=args.partition, **distribute_options(args)).functional
    p = point(problem, 12345)
    F.value(p), F.gradient(p), F.hessp(p, direction(problem, 1))
    del F, problem
    cleanup()
    return max(comm.allgather(time.perf_counter() - t0))


def mpi_facts(comm) -> dict:
    import petsc4py
    from mpi4py import MPI
    from petsc4py import PETSc

    hosts = comm.allgather(MPI.Get_processor_name())
    vendor, version = MPI.get_vendor()
    return dict(ranks=comm.size, nodes=len(set(hosts)), hosts=sorted(set(hosts)),
                ranks_per_node=max(hosts.count(x) for x in set(hosts)), mpi=f"{vendor} {'.'.join(map(str, version))}",
                mpi_library=MPI.Get_library_version().splitlines()[0].strip(), mpi4py=__import__("mpi4py").__version__,
                petsc=".".join(map(str, PETSc.Sys.getVersion())), petsc4py=petsc4py.__version__)


def run_here(args) -> dict:
    """All measurements with the ranks of this launch (collective); the run record (complete on every rank)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    t_start = time.perf_counter()
    run = dict(mpi_facts(comm), oversubscribed=None, cases={}, tao=None)
    cpus = os.cpu_count() or 0
    run["oversubscribed"] = bool(run["nodes"] == 1 and cpus and comm.size > cpus)
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    run["warmup_s"] = warm_up(args, comm)
    for case in args.cases:
        size = args.size if case == "strong" else weak_size(args, comm.size)
        rec = measure_case(args, comm, case, size)
        run["cases"][case] = rec
        say(progress_line(rec), flush=True)
    if args.tao:
        run["tao"] = measure_tao(args, comm)
        say(tao_line(run["tao"]), flush=True)
    run["total_s"] = max(comm.allgather(time.perf_counter() - t_start))
    return run


# -- efficiency, tables ------------------------------------------------------------------------------------
def fmt(v, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def iterations_text(rec: dict) -> str:
    it = rec.get("iterations_per_solve", {})
    return "/".join(fmt(it[k], ".0f") if k in it else "-" for k in KINDS)


def check_text(rec: dict) -> tuple[str, str, str]:
    """J and gradient differences of the checked twin, and the gradient difference at the benchmark's rtol."""
    c = rec.get("check") or {}
    if "J_rel_diff" not in c:
        return "-", "-", "-"
    return (fmt(c["J_rel_diff"], ".1e"), fmt(c["gradient_rel_diff"], ".1e"),
            fmt(c["at_bench_rtol"]["gradient_rel_diff"], ".1e"))


def progress_line(rec: dict) -> str:
    J, gr, gb = check_text(rec)
    return (f"{rec['case']:>6} R={rec['ranks']} {rec['problem']} {rec['size']} ({rec['dofs']:,} dofs): value "
            f"{fmt(rec['value_s'])} s, gradient {fmt(rec['gradient_s'])} s, hessp {fmt(rec['hessp_s'])} s, setup "
            f"{fmt(rec['setup_s'])} s, its {iterations_text(rec)}; vs serial J {J}, grad {gr} (at rtol: {gb})")


def tao_line(t: dict) -> str:
    if "skipped" in t:
        return f"TAO: skipped ({t['skipped']})"
    a, b = t["tao"], t["newton_cg"]
    return (f"   TAO R={t['ranks']} {a['method']}: {a['nit']} its, {a['total_solves']} solves, {fmt(a['seconds'])} s "
            f"({a['reason']}); newton-cg: {b['nit']} its, {b['total_solves']} solves, {fmt(b['seconds'])} s "
            f"({b['message']}); J rel diff {fmt(t['fun_rel_diff'], '.1e')}")


def efficiency(runs: list[dict]) -> list[dict]:
    """Speedup and parallel efficiency per case and rank count against the smallest rank count."""
    rows = []
    for case in CASES:
        recs = sorted(((run["ranks"], run["cases"][case]) for run in runs if case in run.get("cases", {})),
                      key=lambda x: x[0])
        if not recs:
            continue
        R0, base = recs[0]
        for R, rec in recs:
            row = dict(case=case, ranks=R, base_ranks=R0, size=rec["size"], dofs=rec["dofs"],
                       dofs_per_rank=rec["dofs"] / R)
            if case == "strong" and rec["dofs"] != base["dofs"]:
                row["note"] = f"size differs from the base run ({rec['dofs']} vs {base['dofs']} dofs)"
            for m in EFFICIENCY_METRICS:
                t0, t = base.get(m), rec.get(m)
                ok = bool(t0 and t and t0 > 0 and t > 0)
                key = m[:-2]
                if case == "strong":
                    row[f"speedup_{key}"] = t0 / t if ok else None
                    row[f"efficiency_{key}"] = R0 * t0 / (R * t) if ok else None
                else:
                    row[f"efficiency_{key}"] = t0 / t if ok else None
            rows.append(row)
    return rows


def case_table(runs: list[dict], case: str, eff: list[dict]) -> str | None:
    recs = sorted((run["cases"][case] for run in runs if case in run.get("cases", {})), key=lambda r: r["ranks"])
    if not recs:
        return None
    by_r = {e["ranks"]: e for e in eff if e["case"] == case}
    rows = []
    for r in recs:
        e = by_r.get(r["ranks"], {})
        J, gr, gb = check_text(r)
        row = [r["ranks"], r["size"], f"{r['dofs']:,}", f"{r['dofs'] / r['ranks']:,.0f}", fmt(r["value_s"]),
               fmt(r["gradient_s"]), fmt(r["hessp_s"]), fmt(r["setup_s"]), iterations_text(r), fmt(r["numpy_value_s"]
                                                                                                    + r["numpy_gradient_s"])]
        if case == "strong":
            row.append(fmt(e.get("speedup_value"), ".2f"))
        row += [fmt(e.get("efficiency_value"), ".2f"), fmt(e.get("efficiency_gradient"), ".2f"),
                fmt(e.get("efficiency_hessp"), ".2f"), fmt(r["peak_rss_GiB_max"], ".2f"), J, gr, gb]
        rows.append(row)
    header = ["ranks", "size", "dofs", "dofs/rank", "value s", "grad s", "hessp s", "setup s", "its f/a/t/sa",
              "v+g numpy s"]
    if case == "strong":
        header.append("speedup v")
    header += ["eff value", "eff grad", "eff hessp", "GiB/rank", "J rel diff", "grad rel diff", "grad @rtol"]
    return table(rows, header)


def tao_table(runs: list[dict]) -> str | None:
    rows = []
    for run in sorted(runs, key=lambda r: r["ranks"]):
        t = run.get("tao")
        if not t or "skipped" in t:
            continue
        for name, m in (("tao " + t["tao"]["method"], t["tao"]), ("newton-cg", t["newton_cg"])):
            rows.append([run["ranks"], name, m["nit"], m["total_solves"], m["solves"].get("tangent", 0),
                         fmt(m["seconds"]), fmt(m["fun"], ".8g"), "yes" if m["success"] else "no"])
    if not rows:
        return None
    return table(rows, ["ranks", "method", "its", "solves", "hessp", "seconds", "J", "converged"])


def report(data: dict) -> str:
    runs, eff = data["runs"], data["efficiency"]
    lines = []
    cfg = {"problem": "?", "rtol": math.nan, "repeat": "?", "agree_tol": math.nan, "tao_gtol": math.nan, "tao_maxiter": "?",
           **data["config"]}
    for case in CASES:
        t = case_table(runs, case, eff)
        if t is None:
            continue
        r0 = min((run for run in runs if case in run["cases"]), key=lambda r: r["ranks"])
        rec = r0["cases"][case]
        what = ("fixed problem" if case == "strong" else "fixed work per rank, size grows with the ranks")
        lines += ["", f"{case.capitalize()} scaling ({what}): {cfg['problem']} {rec['size']} at {rec['ranks']} "
                  f"rank(s), {rec['solver']}, rtol {cfg['rtol']:g}, median of {cfg['repeat']} rounds, slowest rank; "
                  f"efficiency against {r0['ranks']} rank(s)", t]
    t = tao_table(runs)
    if t is not None:
        lines += ["", f"Optimizers on the distributed problem (L2 gradient norm <= {cfg['tao_gtol']:g} x its value at p0, "
                  f"at most {cfg['tao_maxiter']} iterations):", t]
    checks = [(run["ranks"], c, run["cases"][c]["check"]) for run in runs for c in run["cases"]]
    bad = [f"{c} R={r}" for r, c, ch in checks if ch.get("agrees") is False]
    done = [ch for _, _, ch in checks if "agrees" in ch]
    if done:
        worst = max(max(ch["J_rel_diff"], ch["gradient_rel_diff"]) for ch in done)
        lines += ["", f"Agreement with the serial functional (J, gradient, Krylov rtol {cfg.get('check_rtol', math.nan):g}; "
                  f"tol {cfg['agree_tol']:g}): worst {worst:.1e}"
                  + (f"; DISAGREES: {', '.join(bad)}" if bad else ", all agree")]
    over = [run["ranks"] for run in runs if run.get("oversubscribed")]
    if over:
        lines.append(f"note: more ranks than cores at R = {over}: those timings measure oversubscription")
    return "\n".join(lines)


def failed_checks(runs: list[dict]) -> list[str]:
    return [f"{c} R={run['ranks']}" for run in runs for c, rec in run["cases"].items()
            if rec.get("check", {}).get("agrees") is False]


def config_of(args) -> dict:
    skip = {"ranks", "combine", "from_driver", "json", "strong", "weak", "mpiexec", "timeout"}
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    for k in ("size", "weak_size"):
        cfg[k] = size_label(args.problem, cfg[k])
    return cfg


def assemble_output(info: dict, config: dict, runs: list[dict], **extra) -> dict:
    runs = sorted(runs, key=lambda r: r["ranks"])
    return dict(info=info, config=config, ranks=[r["ranks"] for r in runs], runs=runs, efficiency=efficiency(runs),
                **extra)


def thread_env() -> dict:
    return {v: os.environ.get(v) for v in THREAD_VARS}


# -- modes ---------------------------------------------------------------------------------------------
def worker_argv(args) -> list[str]:
    """The options of this run for ``mpiexec ... bench_mpi.py`` (sizes and defaults resolved)."""
    out = ["--problem", args.problem, "--dim", str(args.dim), "--size", size_arg(args.problem, args.size),
           "--weak-size", size_arg(args.problem, args.weak_size), "--repeat", str(args.repeat),
           "--rtol", repr(args.rtol), "--max-it", str(args.max_it), "--pc-type", args.pc_type,
           "--check-max-dofs", str(args.check_max_dofs), "--agree-tol", repr(args.agree_tol),
           "--check-rtol", repr(args.check_rtol),
           "--tao-method", args.tao_method, "--tao-gtol", repr(args.tao_gtol), "--tao-maxiter", str(args.tao_maxiter),
           "--seed", str(args.seed), "--from-driver"]
    if args.ksp_type:
        out += ["--ksp-type", args.ksp_type]
    if args.partition:
        out += ["--partition", args.partition]
    out += [f"--{c}" for c in args.cases if len(args.cases) == 1]
    for flag in ("tao", "quick"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    return out


def launch(args, ranks: int, out_json: str) -> dict:
    """``mpiexec -n ranks`` this script; its output streamed with a prefix. A record of the launch."""
    return launch_mpi(args.mpiexec, ranks, SCRIPT, worker_argv(args), out_json, args.timeout, ROOT)


def driver(args, argv: list[str]) -> int:
    info = machine_info(script="scripts/bench_mpi.py", argv=argv, thread_env_of_runs={v: "1" for v in THREAD_VARS},
                        mpiexec=args.mpiexec, mode="driver")
    cpus = os.cpu_count() or 0
    if cpus and max(args.ranks) > cpus:
        print(f"note: {max(args.ranks)} ranks on {cpus} cores: the larger rank counts are oversubscribed")
    t0 = time.perf_counter()
    runs, launches = run_rank_counts(args.ranks, lambda R, path: launch(args, R, path), "bench_mpi_")
    info["loadavg_after"] = loadavg()
    failed = [x for x in launches if "error" in x]
    data = assemble_output(info, config_of(args), runs, launches=launches, failed=failed, complete=not failed,
                           total_s=time.perf_counter() - t0)
    write_json(args.json, data)
    print(report(data))
    print(f"\nload average before {info['loadavg']}, after {info['loadavg_after']}; total {data['total_s']:.0f} s")
    print(f"wrote {args.json}")
    return 1 if failed or failed_checks(runs) else 0


def combine(args, argv: list[str]) -> int:
    runs, configs = [], []
    for path in args.combine:
        with open(path) as fh:
            part = json.load(fh)
        for run in part.get("runs", []):
            run.setdefault("info", part.get("info"))
            run["source"] = path
            runs.append(run)
        configs.append(part.get("config", {}))
    keys = ("problem", "dim", "size", "weak_size", "rtol", "pc_type", "ksp_type")
    differ = sorted({k for c in configs for k in keys if c.get(k) != configs[0].get(k)})
    info = machine_info(script="scripts/bench_mpi.py", argv=argv, mode="combine", sources=list(args.combine))
    data = assemble_output(info, configs[0] if configs else {}, runs, config_differences=differ, complete=True)
    write_json(args.json, data)
    if differ:
        print(f"warning: the files differ in {differ}: the efficiencies compare different set-ups")
    print(report(data))
    print(f"wrote {args.json}")
    return 1 if failed_checks(runs) else 0


def single(args, argv: list[str]) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    info = None
    if comm.rank == 0:
        info = machine_info(script="scripts/bench_mpi.py", argv=argv, thread_env=thread_env(), mode="mpiexec")
    run = run_here(args)
    if comm.rank != 0:
        return 0
    info["loadavg_after"] = loadavg()
    data = assemble_output(info, config_of(args), [run], complete=True)
    write_json(args.json, data)
    if args.from_driver:
        return 0  # the driver judges the checks of all runs
    print(report(data))
    print(f"\nload average before {info['loadavg']}, after {info['loadavg_after']}; total {run['total_s']:.0f} s")
    print(f"wrote {args.json}")
    return 1 if failed_checks([run]) else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.combine is not None:
        return combine(args, argv)
    if args.ranks is not None:
        return driver(args, argv)
    return single(args, argv)


if __name__ == "__main__":
    sys.exit(main())
