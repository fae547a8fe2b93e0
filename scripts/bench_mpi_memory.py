"""Memory per rank of a distributed problem: built rank by rank against built on every rank, then distributed.

Usage:
  mpiexec -n R python scripts/bench_mpi_memory.py [--problem poisson_inversion|topology_compliance] [--dim 2|3]
        [--size N | NELXxNELY | NELXxNELYxNELZ] [--build local|replicated] [--case strong|weak] [--rtol 1e-8]
        [--pc-type gamg] [--ksp-type cg] [--max-it 10000] [--no-warmup] [--quick] [--json PATH]
  python scripts/bench_mpi_memory.py --ranks 1 2 4 [the options above]   (driver: one mpiexec per rank count)

What one run measures, on every rank (``mpiexec -n R``):

* ``baseline_rss_GiB``: the resident memory (VmRSS) right after the imports
  (python, numpy, scipy, numba, mpi4py, petsc4py, adjopt, the problem's
  module), before anything is built: the fixed cost of a rank.
* a warm-up (``--no-warmup`` skips it): a tiny problem of the same kind, built
  the same way, one value, gradient and Hessian action, then freed, so that
  numba loads (or compiles) its kernels before the timed build;
* ``build_s``: the build of the problem, slowest rank (a barrier before and
  after). ``--build local`` (default): ``build_distributed(...)`` of the
  problem's module, where each rank builds its slab of the mesh and its part
  of the operator, the objective and the parameter map; ``--build
  replicated``: the serial ``build(...)`` on every rank, then
  ``adjopt.backends.petsc.distribute(problem)`` (the way ``bench_mpi.py``
  builds; ``build_serial_s`` and ``distribute_s`` are its two parts). The
  serial problem stays alive in that mode, as it does in a real run;
* ``value_s``, ``gradient_s``, ``hessp_s``: one ``F.value_vec(p)`` (parameter
  map, assembly, the preconditioner setup: ``setup_s``, GAMG by default, and
  the forward solve), ``F.gradient_vec(p)`` at the same p and
  ``F.hessp_vec(p, dp)``, on distributed Vecs, slowest rank; ``J``, the
  norms of the gradient and of H dp, the Krylov iterations and solves by
  kind (``F.stats``) and the phases of ``F.times``. p and dp are functions
  of the global parameter index (p0 plus a small sinusoid, inside the
  bounds), so runs on different rank counts evaluate at the same point.
* ``peak_rss_GiB``: the peak resident memory (VmHWM, whole process: imports,
  warm-up, build and the evaluations) of every rank, and its maximum
  ``peak_rss_GiB_max``. Where the kernel allows it (``/proc/self/clear_refs``)
  the peak is also recorded per phase (``phases``: seconds, peak and the
  VmRSS after it, per rank), which shows where the memory goes: ``build``
  (the problem), ``value`` (the matrix values and the GAMG hierarchy, built at
  the first solve), ``gradient`` and ``hessp``. ``petsc_matrices`` estimates
  the AIJ storage of A and of the GAMG levels and interpolations on each rank
  from their nonzeros (8-byte values plus PETSc-integer column indices).

Sizes: ``poisson_inversion``: n cells per side (default 1000 in 2D, about
1M dofs, and 100 in 3D); ``topology_compliance``: ``NELXxNELY`` (the MBB beam,
default 1200x400, about 963k dofs) or ``NELXxNELYxNELZ`` (case mbb3d, default
96x48x48). ``--quick``: n = 32 (8 in 3D), 48x16 (12x4x4).

Cases (the size on R ranks):

* ``strong`` (default): ``--size`` on every rank count;
* ``weak``: ``--size`` is the 1-rank size; on R ranks it grows so that the
  dofs per rank stay about the same: n = round(n0 R^(1/dim)) for the Poisson
  problem, nely R for the 2D MBB beam (slabs along y, nelx kept), nelz R for
  mbb3d (slabs along z).

Driver (``--ranks``, started without mpiexec): ``mpiexec -n R`` this script for
each R in turn (mpiexec on PATH, or ``--mpiexec``) with OMP_NUM_THREADS,
NUMBA_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set to 1, and the
ratios of the largest peak per rank against the smallest rank count (normally
1): ``ratio`` = peak(R) / peak(1), with ``target`` and ``meets_target``:
strong <= 0.6 at R = 2 and <= 0.35 at R = 4 (no target at other R), weak
<= 1.10 at every R; ``ratio_above_baseline`` is the same ratio of the peaks
less the import baseline (the memory of the problem itself). More ranks than
cores is fine for the memory (MPICH oversubscribes by default); the times of
such runs measure the oversubscription.

Output: rank 0 (or the driver) prints a table and writes JSON ``--json``
(default ``scripts/results/bench_mpi_memory.json``, ``bench_mpi_memory_quick.json``
with ``--quick``; written atomically) with ``info`` (``machine_info``),
``config``, ``runs`` and ``ratios``. Exit status 2 for bad input (an unknown
problem, a bad size, ranks < 1, no mpiexec), 1 when a run failed.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import shutil
import sys
import time

import numpy as np
from _bench_common import (
    MPI_THREAD_VARS,
    blas_info,
    fmt,
    launch_mpi,
    loadavg,
    machine_info,
    peak_rss_gib,
    release_memory,
    reset_peak,
    rss_gib,
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
BUILDS = ("local", "replicated")
CASES = ("strong", "weak")
THREAD_VARS = MPI_THREAD_VARS
KINDS = ("forward", "adjoint", "tangent", "second_adjoint")
LAUNCHER_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
#: (problem, dim) -> (default size, --quick size)
DEFAULT_SIZES = {("poisson_inversion", 2): (1000, 32), ("poisson_inversion", 3): (100, 8),
                 ("topology_compliance", 2): ((1200, 400), (48, 16)),
                 ("topology_compliance", 3): ((96, 48, 48), (12, 4, 4))}
#: the targets of peak(R) / peak(1): strong at the listed R only, weak at every R
STRONG_TARGETS = {1: 1.0, 2: 0.6, 4: 0.35}
WEAK_TARGET = 1.10
#: the phases of a run, in order (``build_serial`` and ``distribute`` for --build replicated)
PHASES = ("warmup", "build", "build_serial", "distribute", "value", "gradient", "hessp")


# -- command line -----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--problem", default="poisson_inversion", choices=PROBLEMS)
    ap.add_argument("--dim", type=int, default=None, choices=(2, 3),
                    help="dimension of poisson_inversion (default 2); topology_compliance takes it from --size")
    ap.add_argument("--size", default=None,
                    help="n (poisson_inversion; default 1000 in 2D, 100 in 3D) or NELXxNELY[xNELZ] "
                         "(topology_compliance; default 1200x400, case mbb; with NELZ case mbb3d). "
                         "With --case weak: the size on one rank")
    ap.add_argument("--build", default="local", choices=BUILDS,
                    help="local: build_distributed (rank by rank); replicated: build on every rank, then distribute")
    ap.add_argument("--case", default="strong", choices=CASES,
                    help="strong: the same size on every rank count; weak: the size grows with the ranks")
    ap.add_argument("--rtol", type=float, default=1e-8, help="relative tolerance of every Krylov solve")
    ap.add_argument("--max-it", type=int, default=10000, help="Krylov iteration limit per solve")
    ap.add_argument("--pc-type", default="gamg", help="PETSc preconditioner (default gamg)")
    ap.add_argument("--ksp-type", default=None, help="PETSc Krylov method (default cg for a symmetric A)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up on a tiny problem")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--json", default=None,
                    help="JSON output (default scripts/results/bench_mpi_memory.json; bench_mpi_memory_quick.json "
                         "with --quick)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, metavar="R",
                    help="driver mode: run mpiexec -n R for each R (start without mpiexec)")
    ap.add_argument("--mpiexec", default=None, help="the MPI launcher of --ranks (default: mpiexec on PATH)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per rank count in driver mode")
    ap.add_argument("--from-driver", action="store_true", help=argparse.SUPPRESS)
    return ap


def parse_size(text, problem: str, ap) -> int | tuple:
    """``N`` (poisson_inversion, N >= 2) or ``NELXxNELY[xNELZ]`` (topology_compliance, each >= 2)."""
    if isinstance(text, (int, tuple)):
        return text
    text = str(text).strip().lower()
    if problem == "poisson_inversion":
        if not re.fullmatch(r"\d+", text) or int(text) < 2:
            ap.error(f"--size of poisson_inversion is n >= 2 (cells per side), got {text!r}")
        return int(text)
    m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", text)
    if not m or min(int(g) for g in m.groups() if g is not None) < 2:
        ap.error(f"--size of topology_compliance is NELXxNELY or NELXxNELYxNELZ (each >= 2), got {text!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def under_launcher() -> bool:
    """True when this process was started by an MPI launcher with more than one rank."""
    for var in LAUNCHER_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def problem_module(problem: str):
    if problem == "poisson_inversion":
        from problems import poisson_inversion as mod
    else:
        from problems import topology_compliance as mod
    return mod


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if args.problem == "topology_compliance":
        dim = args.dim or 2
        strong, quick = DEFAULT_SIZES[(args.problem, dim)]
        args.size = parse_size(args.size if args.size is not None else (quick if args.quick else strong), args.problem,
                               ap)
        if args.dim is not None and args.dim != len(args.size):
            ap.error(f"--dim {args.dim} does not match --size {size_arg(args.problem, args.size)} (topology_compliance "
                     "takes the dimension from the size: NELXxNELY or NELXxNELYxNELZ)")
        args.dim = len(args.size)
    else:
        args.dim = args.dim or 2
        strong, quick = DEFAULT_SIZES[(args.problem, args.dim)]
        args.size = parse_size(args.size if args.size is not None else (quick if args.quick else strong), args.problem,
                               ap)
    if not (math.isfinite(args.rtol) and 0 < args.rtol < 1):
        ap.error(f"--rtol must be in (0, 1), got {args.rtol}")
    if args.max_it < 1:
        ap.error(f"--max-it must be >= 1, got {args.max_it}")
    if args.timeout <= 0:
        ap.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.json is None:
        args.json = os.path.join(RESULTS, "bench_mpi_memory_quick.json" if args.quick else "bench_mpi_memory.json")
    d = os.path.dirname(os.path.abspath(args.json))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        ap.error(f"--json: folder {d} does not exist or is not writable")
    if args.build == "local" and not hasattr(problem_module(args.problem), "build_distributed"):
        ap.error(f"--build local needs problems/{args.problem}.py::build_distributed, which it does not have; "
                 "use --build replicated")
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


# -- sizes ----------------------------------------------------------------------------------------------
def scaled_size(args, ranks: int):
    """The size on ``ranks`` ranks: ``--size`` (strong), or grown to keep the dofs per rank (weak)."""
    if args.case == "strong":
        return args.size
    if args.problem == "poisson_inversion":
        return max(2, round(args.size * ranks ** (1.0 / args.dim)))
    if len(args.size) == 2:
        nelx, nely = args.size
        return nelx, nely * ranks  # slabs along y: each rank keeps nelx x nely elements
    nelx, nely, nelz = args.size
    return nelx, nely, nelz * ranks  # slabs along z


def warmup_size(args, ranks: int):
    """A tiny problem of the same kind, with at least two element layers per rank along the slab direction."""
    if args.problem == "poisson_inversion":
        return max(8 if args.dim == 2 else 4, 2 * ranks)
    if args.dim == 2:
        return 12, max(4, 2 * ranks)
    return 6, 2, max(2, 2 * ranks)


def size_arg(problem: str, size) -> str:
    return str(size) if problem == "poisson_inversion" else "x".join(map(str, size))


def size_label(problem: str, size) -> str:
    return f"n={size}" if problem == "poisson_inversion" else size_arg(problem, size)


# -- measurements (every rank) -----------------------------------------------------------------------
def solver_options(args) -> dict:
    opts = dict(rtol=args.rtol, max_it=args.max_it, pc_type=args.pc_type)
    if args.ksp_type:
        opts["ksp_type"] = args.ksp_type
    return opts


def build_local(args, comm, size):
    mod = problem_module(args.problem)
    if args.problem == "poisson_inversion":
        return mod.build_distributed(n=size, dim=args.dim, comm=comm, **solver_options(args))
    case = "mbb" if len(size) == 2 else "mbb3d"
    return mod.build_distributed(case, *size, comm=comm, **solver_options(args))


def build_serial(args, size):
    mod = problem_module(args.problem)
    if args.problem == "poisson_inversion":
        return mod.build(n=size, dim=args.dim)
    case = "mbb" if len(size) == 2 else "mbb3d"
    return mod.build(case, *size)


def cleanup() -> None:
    """Free the last problem: Python objects, then the PETSc objects they held (collectively), then the heap."""
    from petsc4py import PETSc

    gc.collect()
    PETSc.garbage_cleanup()
    release_memory()


class Phases:
    """Timed collective phases: slowest-rank seconds, peak (VmHWM, reset per phase) and VmRSS after, per rank."""

    def __init__(self, comm):
        self.comm = comm
        self.peak = peak_rss_gib()  # the imports
        self.can_reset = reset_peak()
        self.rows: dict[str, dict] = {}

    def run(self, name: str, f):
        comm = self.comm
        comm.Barrier()
        if self.can_reset:
            reset_peak()
        t0 = time.perf_counter()
        out = f()
        dt = time.perf_counter() - t0
        comm.Barrier()
        peak = peak_rss_gib()
        self.peak = max(self.peak, peak)
        got = comm.allgather((dt, peak, rss_gib()))
        self.rows[name] = dict(seconds=max(g[0] for g in got), peak_GiB=[g[1] for g in got],
                               rss_after_GiB=[g[2] for g in got])
        return out

    def seconds(self, name: str) -> float:
        return self.rows[name]["seconds"]


def param_indices(F) -> np.ndarray:
    """The global (serial) indices of this rank's entries of a parameter Vec."""
    return np.asarray(F.layout.params.owned(F.rank))


def bounded(problem, idx: np.ndarray, p: np.ndarray) -> np.ndarray:
    if problem.bounds is None:
        return p
    lo, hi = problem.bounds
    lo = lo if np.isscalar(lo) or lo is None else np.asarray(lo)[idx]
    hi = hi if np.isscalar(hi) or hi is None else np.asarray(hi)[idx]
    return np.clip(p, lo, hi)


def point_vecs(problem, F):
    """p and dp as parameter Vecs: functions of the global index only (the same point on any rank count)."""
    idx = param_indices(F)
    x = idx.astype(np.float64)
    base = np.asarray(problem.p0, dtype=np.float64)[idx] if problem.p0 is not None else np.zeros(idx.size)
    p = bounded(problem, idx, base + 0.2 * np.sin(0.618 * x + 0.3))
    pv, dv = F.create_parameter_vec(), F.create_parameter_vec()
    pv.setArray(p)
    dv.setArray(np.cos(1.3 * x))
    return pv, dv


def evaluate(F, pv, dv, phases: Phases | None = None) -> dict:
    """value, gradient, Hessian action at pv (timed as phases when given)."""
    run = phases.run if phases is not None else (lambda name, f: f())
    out = {}
    out["J"] = float(run("value", lambda: F.value_vec(pv)))
    g = run("gradient", lambda: F.gradient_vec(pv))
    h = run("hessp", lambda: F.hessp_vec(pv, dv))
    out["gradient_norm"], out["hessp_norm"] = float(g.norm()), float(h.norm())
    return out


def build(args, comm, size, phases: Phases | None = None):
    """The distributed problem (``--build``); its phases timed when given."""
    run = phases.run if phases is not None else (lambda name, f: f())
    if args.build == "local":
        return None, run("build", lambda: build_local(args, comm, size))
    from adjopt.backends.petsc import distribute

    serial = run("build_serial", lambda: build_serial(args, size))
    dist = run("distribute", lambda: distribute(serial, comm=comm, **solver_options(args)))
    return serial, dist


def warm_up(args, comm) -> None:
    """A tiny problem built and evaluated the same way: numba loads its kernels, PETSc sets up its classes."""
    serial, dist = build(args, comm, warmup_size(args, comm.size))
    pv, dv = point_vecs(dist, dist.functional)
    evaluate(dist.functional, pv, dv)
    del serial, dist, pv, dv
    cleanup()


def aij_mib(A) -> float:
    """Estimated AIJ storage of this rank's rows of A (values + column indices + row pointers), MiB."""
    from petsc4py import PETSc

    info = A.getInfo(PETSc.Mat.InfoType.LOCAL)
    isz = np.dtype(PETSc.IntType).itemsize
    rows = A.getLocalSize()[0]
    return (info["nz_allocated"] * (8 + isz) + (rows + 1) * isz) / 2.0**20


def petsc_matrices(F) -> dict:
    """A's storage and the GAMG hierarchy's (coarse operators, interpolations) on this rank, estimated from nonzeros."""
    out = dict(A_MiB=aij_mib(F.A))
    try:
        pc = F.ksp.getPC()
        if pc.getType() not in ("gamg", "mg", "ml"):
            return out
        n = pc.getMGLevels()
        coarse = interp = 0.0
        for level in range(n - 1):  # the finest level's operator is A itself
            coarse += aij_mib(pc.getMGSmoother(level).getOperators()[0])
        for level in range(1, n):
            interp += aij_mib(pc.getMGInterpolation(level))
        out.update(mg_levels=n, mg_coarse_operators_MiB=coarse, mg_interpolations_MiB=interp)
    except Exception as exc:  # noqa: BLE001 - informational only
        out["mg_error"] = repr(exc)
    return out


def run_here(args) -> dict:
    """One measurement with the ranks of this launch (collective); the same record on every rank."""
    from mpi4py import MPI

    import adjopt.backends.petsc  # noqa: F401  (imported before the baseline: part of the fixed cost)

    problem_module(args.problem)
    comm = MPI.COMM_WORLD
    gc.collect()
    baseline = rss_gib()
    phases = Phases(comm)
    R = comm.size
    t_start = time.perf_counter()
    if not args.no_warmup:
        phases.run("warmup", lambda: warm_up(args, comm))
    size = scaled_size(args, R)
    serial, dist = build(args, comm, size, phases)
    build_s = sum(phases.seconds(k) for k in ("build", "build_serial", "distribute") if k in phases.rows)
    F = dist.functional
    pv, dv = point_vecs(dist, F)
    F.reset_stats()
    got = evaluate(F, pv, dv, phases)
    s = F.stats
    lay = F.layout
    dofs_per_rank = np.diff(lay.dofs.ranges)
    times = {}
    for x in comm.allgather({k: float(v) for k, v in F.times.items()}):
        for k, v in x.items():
            times[k] = max(times.get(k, 0.0), v)
    mats = comm.allgather(petsc_matrices(F))
    peaks = comm.allgather(phases.peak)
    baselines = comm.allgather(baseline)
    rec = dict(ranks=R, problem=args.problem, dim=args.dim, case=args.case, build=args.build,
               size=size_label(args.problem, size), dofs=int(lay.dofs.size), params=int(F.n_params),
               elements=int(lay.elements.size), solver=F.solver.name, rtol=args.rtol,
               dofs_per_rank=dofs_per_rank.tolist(), params_per_rank=np.diff(lay.params.ranges).tolist(),
               build_s=build_s, value_s=phases.seconds("value"), gradient_s=phases.seconds("gradient"),
               hessp_s=phases.seconds("hessp"), setup_s=times.get("factorize", 0.0), times=times,
               iterations={k: int(s.iterations[k]) for k in KINDS if s.solves[k]},
               solves={k: int(s.solves[k]) for k in KINDS if s.solves[k]}, **got,
               baseline_rss_GiB=baselines, baseline_rss_GiB_max=max(baselines), peak_rss_GiB=peaks,
               peak_rss_GiB_max=max(peaks), peak_above_baseline_GiB=[p - b for p, b in zip(peaks, baselines)],
               peak_reset=phases.can_reset, phases=phases.rows, petsc_matrices=mats,
               warmup=None if args.no_warmup else size_label(args.problem, warmup_size(args, R)))
    if args.build == "replicated":
        rec["build_serial_s"], rec["distribute_s"] = phases.seconds("build_serial"), phases.seconds("distribute")
    if args.problem == "poisson_inversion":
        rec["n"] = size
    else:
        rec["nelx"], rec["nely"] = size[0], size[1]
        if len(size) == 3:
            rec["nelz"] = size[2]
    del F, dist, serial, pv, dv
    cleanup()
    rec["total_s"] = max(comm.allgather(time.perf_counter() - t_start))
    cpus = os.cpu_count() or 0
    rec["oversubscribed"] = bool(cpus and R > cpus and len(set(comm.allgather(MPI.Get_processor_name()))) == 1)
    return rec


# -- ratios, tables ------------------------------------------------------------------------------------
def target_of(case: str, ranks: int) -> float | None:
    return WEAK_TARGET if case == "weak" else STRONG_TARGETS.get(ranks)


def ratios(runs: list[dict]) -> list[dict]:
    """peak(R) / peak(R0) (largest rank's peak) per case and build, R0 the smallest rank count; targets at R0 = 1."""
    out = []
    groups = {}
    for run in runs:
        groups.setdefault((run["case"], run["build"]), []).append(run)
    for (case, bld), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["ranks"])
        base = recs[0]
        for rec in recs:
            ratio = rec["peak_rss_GiB_max"] / base["peak_rss_GiB_max"]
            above0 = base["peak_rss_GiB_max"] - base["baseline_rss_GiB_max"]
            above = rec["peak_rss_GiB_max"] - rec["baseline_rss_GiB_max"]
            target = target_of(case, rec["ranks"]) if base["ranks"] == 1 else None
            row = dict(case=case, build=bld, ranks=rec["ranks"], base_ranks=base["ranks"], size=rec["size"],
                       dofs=rec["dofs"], peak_GiB=rec["peak_rss_GiB_max"], base_peak_GiB=base["peak_rss_GiB_max"],
                       ratio=ratio, ratio_above_baseline=above / above0 if above0 > 0 else None, target=target,
                       meets_target=None if target is None else bool(ratio <= target))
            if base["ranks"] != 1:
                row["note"] = f"base is {base['ranks']} ranks, not 1: the targets (against 1 rank) are not judged"
            if case == "strong" and rec["dofs"] != base["dofs"]:
                row["note"] = f"size differs from the base run ({rec['dofs']} vs {base['dofs']} dofs)"
            out.append(row)
    return out


def iterations_text(rec: dict) -> str:
    it = rec.get("iterations", {})
    return "/".join(str(it[k]) if k in it else "-" for k in KINDS)


def phase_max(rec: dict, name: str, key: str) -> float | None:
    row = rec.get("phases", {}).get(name)
    return max(row[key]) if row else None


def report(data: dict) -> str:
    runs, rat = data["runs"], data["ratios"]
    by = {(r["case"], r["build"], r["ranks"]): r for r in rat}
    rows, mem = [], []
    for rec in sorted(runs, key=lambda r: (r["case"], r["build"], r["ranks"])):
        r = by.get((rec["case"], rec["build"], rec["ranks"]), {})
        target = "-" if r.get("target") is None else f"<= {r['target']:g}"
        met = "-" if r.get("meets_target") is None else ("yes" if r["meets_target"] else "NO")
        rows.append([rec["case"], rec["build"], rec["ranks"], rec["size"], f"{rec['dofs']:,}",
                     f"{rec['dofs'] / rec['ranks']:,.0f}", fmt(rec["build_s"]), fmt(rec["value_s"]),
                     fmt(rec["gradient_s"]), fmt(rec["hessp_s"]), fmt(rec["setup_s"]), iterations_text(rec),
                     fmt(rec["baseline_rss_GiB_max"], ".3f"), " ".join(fmt(p, ".2f") for p in rec["peak_rss_GiB"]),
                     fmt(rec["peak_rss_GiB_max"], ".3f"), fmt(r.get("ratio"), ".3f"),
                     fmt(r.get("ratio_above_baseline"), ".3f"), target, met, f"{rec['J']:.10g}"])
        mats = rec.get("petsc_matrices") or [{}]
        mem.append([rec["case"], rec["build"], rec["ranks"], fmt(rec["baseline_rss_GiB_max"], ".3f"),
                    fmt(phase_max(rec, "warmup", "rss_after_GiB"), ".3f"),
                    fmt(phase_max(rec, "build_serial", "peak_GiB"), ".3f"),
                    fmt(phase_max(rec, "build", "peak_GiB") or phase_max(rec, "distribute", "peak_GiB"), ".3f"),
                    fmt(phase_max(rec, "build", "rss_after_GiB") or phase_max(rec, "distribute", "rss_after_GiB"), ".3f"),
                    fmt(phase_max(rec, "value", "peak_GiB"), ".3f"), fmt(phase_max(rec, "value", "rss_after_GiB"), ".3f"),
                    fmt(phase_max(rec, "gradient", "peak_GiB"), ".3f"), fmt(phase_max(rec, "hessp", "peak_GiB"), ".3f"),
                    fmt(max(m.get("A_MiB", 0.0) for m in mats), ".0f"),
                    fmt(max(m.get("mg_coarse_operators_MiB", 0.0) + m.get("mg_interpolations_MiB", 0.0)
                            for m in mats), ".0f")])
    cfg = data["config"]
    lines = ["", f"Peak memory per rank: {cfg['problem']} (dim {cfg['dim']}), {cfg['solver_options']}; times of the "
             "slowest rank; peak = VmHWM of the whole process, ratio = max peak(R) / max peak(base)",
             table(rows, ["case", "build", "ranks", "size", "dofs", "dofs/rank", "build s", "value s", "grad s",
                          "hessp s", "setup s", "its f/a/t/sa", "baseline GiB", "peak GiB per rank", "peak max",
                          "ratio", "ratio-base", "target", "met", "J"]),
             "", "Where the memory goes (GiB, max over ranks; 'peak' per phase where VmHWM can be reset, 'after' = "
             "VmRSS after the phase; MiB estimated from the nonzeros):",
             table(mem, ["case", "build", "ranks", "imports", "after warmup", "serial peak", "build peak", "after build",
                         "value peak", "after value", "grad peak", "hessp peak", "A MiB", "GAMG MiB"])]
    over = sorted({rec["ranks"] for rec in runs if rec.get("oversubscribed")})
    if over:
        lines.append(f"note: more ranks than cores at R = {over}: the times of those runs measure oversubscription")
    judged = [r for r in rat if r["meets_target"] is not None and r["ranks"] != r["base_ranks"]]
    if judged:
        bad = [f"{r['case']} {r['build']} R={r['ranks']} ({r['ratio']:.3f} > {r['target']:g})" for r in judged
               if not r["meets_target"]]
        lines.append("targets: " + ("all met" if not bad else "NOT met: " + "; ".join(bad)))
    return "\n".join(lines)


def config_of(args) -> dict:
    return dict(problem=args.problem, dim=args.dim, size=size_label(args.problem, args.size), case=args.case,
                build=args.build, solver_options=solver_options(args), warmup=not args.no_warmup, quick=args.quick,
                strong_targets=STRONG_TARGETS, weak_target=WEAK_TARGET)


def thread_env() -> dict:
    return {v: os.environ.get(v) for v in THREAD_VARS}


def assemble_output(info: dict, config: dict, runs: list[dict], **extra) -> dict:
    runs = sorted(runs, key=lambda r: r["ranks"])
    return dict(info=info, config=config, ranks=[r["ranks"] for r in runs], runs=runs, ratios=ratios(runs), **extra)


# -- modes ---------------------------------------------------------------------------------------------
def worker_argv(args) -> list[str]:
    out = ["--problem", args.problem, "--size", size_arg(args.problem, args.size), "--build", args.build,
           "--case", args.case, "--rtol", repr(args.rtol), "--max-it", str(args.max_it), "--pc-type", args.pc_type,
           "--from-driver"]
    if args.problem == "poisson_inversion":
        out += ["--dim", str(args.dim)]
    if args.ksp_type:
        out += ["--ksp-type", args.ksp_type]
    for flag in ("no_warmup", "quick"):
        if getattr(args, flag):
            out.append("--" + flag.replace("_", "-"))
    return out


def launch(args, ranks: int, out_json: str) -> dict:
    """``mpiexec -n ranks`` this script; its output streamed with a prefix. A record of the launch."""
    return launch_mpi(args.mpiexec, ranks, SCRIPT, worker_argv(args), out_json, args.timeout, ROOT)


def progress_line(rec: dict) -> str:
    return (f"{rec['case']} {rec['build']} R={rec['ranks']} {rec['problem']} {rec['size']} ({rec['dofs']:,} dofs): "
            f"baseline {rec['baseline_rss_GiB_max']:.3f} GiB, peak per rank "
            f"{' '.join(f'{p:.3f}' for p in rec['peak_rss_GiB'])} GiB; build {fmt(rec['build_s'])} s, value "
            f"{fmt(rec['value_s'])} s, gradient {fmt(rec['gradient_s'])} s, hessp {fmt(rec['hessp_s'])} s; "
            f"J = {rec['J']:.12g}")


def driver(args, argv: list[str]) -> int:
    info = machine_info(script="scripts/bench_mpi_memory.py", argv=argv, blas=blas_info(),
                        thread_env_of_runs={v: "1" for v in THREAD_VARS}, mpiexec=args.mpiexec, mode="driver")
    cpus = os.cpu_count() or 0
    if cpus and max(args.ranks) > cpus:
        print(f"note: {max(args.ranks)} ranks on {cpus} cores: the larger rank counts are oversubscribed "
              "(fine for the memory, not for the times)")
    t0 = time.perf_counter()
    runs, launches = run_rank_counts(args.ranks, lambda R, path: launch(args, R, path), "bench_mpi_memory_")
    info["loadavg_after"] = loadavg()
    failed = [x for x in launches if "error" in x]
    data = assemble_output(info, config_of(args), runs, launches=launches, failed=failed, complete=not failed,
                           total_s=time.perf_counter() - t0)
    write_json(args.json, data)
    print(report(data))
    print(f"\ntotal {data['total_s']:.0f} s; wrote {args.json}")
    return 1 if failed else 0


def single(args, argv: list[str]) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rec = run_here(args)
    if comm.rank != 0:
        return 0
    info = machine_info(script="scripts/bench_mpi_memory.py", argv=argv, thread_env=thread_env(), mode="mpiexec",
                        blas=blas_info())
    data = assemble_output(info, config_of(args), [rec], complete=True)
    write_json(args.json, data)
    if args.from_driver:
        print(progress_line(rec), flush=True)
        return 0
    print(report(data))
    print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.ranks is not None:
        return driver(args, argv)
    return single(args, argv)


if __name__ == "__main__":
    sys.exit(main())
