"""Topology optimization at scale: seconds per OC design iteration of adjopt against 88-line baselines.

Usage: python scripts/bench_topology.py [--mbb 150x50 300x100 600x200 1200x400]
       [--cantilever 16x8x8 32x16x16 48x24x24] [--full 60x20 150x50 300x100]
       [--solvers cholmod pardiso] [--solvers-3d NAME ...] [--full-solvers NAME ...] [--iters 10]
       [--baselines spsolve cholmod] [--baseline-max-dofs-superlu 300000]
       [--full-maxiter 500] [--repeat-3d 1] [--volfrac 0.5] [--penal 3] [--rmin 1.5] [--emin 1e-9]
       [--out bench_topology.json] [--plot bench_topology.png]

The 3D size of the issue (about 1.35M dofs: 3 * 121 * 61 * 61 = 1,350,723) is
``--cantilever 120x60x60``; it is not run by default.

Problem: ``problems/topology_compliance.py``, ``build("mbb", nelx, nely,
volfrac=0.5, penal=3, rmin=1.5, emin=1e-9, filter=True, solver=name)``: the
half MBB beam of the 88-line code (density filter), ``dofs = 2 (nelx+1)(nely+1)``
(all nodal dofs, fixed ones included; the free dofs are recorded too).

What is measured
----------------
1. **Per design iteration, MBB** (``--mbb``). adjopt:
   ``adjopt.minimize(problem, method="oc", maxiter=iters+1, xtol=0, gtol=0,
   callback=...)`` on a fresh problem per solver (``--solvers``; any name
   ``make_solver`` accepts, and "gmg": a name that raises ``MissingBackendError`` or
   ``ValueError`` is skipped and recorded with the reason). The iteration
   times are the differences of the callback timestamps; the first iteration
   (which also holds the start, J and its gradient at p0, and any JIT
   compilation) is the warm-up and is excluded; ``s_per_iter`` is the median
   of the other ``--iters``. Phases: the medians of the history entries'
   ``"phases"`` (when the library records them; absent otherwise) and, always,
   ``stats_phases``: the solver's factorization and solve seconds per
   iteration (from ``J.stats`` deltas at the callbacks) and ``other`` = the
   rest (assembly, sensitivity, filter, OC update, book-keeping).

   Baselines, written here the plain 88-line way (Andreassen et al. 2011,
   top88.m, numpy/scipy, density filter, OC with bisection, move 0.2), on the
   same nodes, supports and load as ``topology_compliance`` (numbered like its
   mesh, x fastest and y up, so the densities are in the same order as
   adjopt's p): each iteration assembles K from COO
   (``coo_array((sK, (iK, jK))).tocsc()``), slices the free dofs and solves,

   * ``spsolve``: ``scipy.sparse.linalg.spsolve`` (SuperLU, default COLAMD
     ordering, no UMFPACK); skipped above ``--baseline-max-dofs-superlu``
     dofs (default 300000; about 45 s per iteration at 1200x400);
   * ``cholmod``: ``sksparse.cholmod.cholesky`` (where installed): the symbolic
     analysis of the first iteration is reused (``cholesky_inplace``), the
     best plain-Python setup.

   K is exactly symmetric by construction (one symmetric KE), so the 88-line
   ``K = (K + K')/2`` is left out (it would only slow the baselines). Phases
   per iteration: assembly (values, COO -> CSC, free-dof slicing), solve
   (factorization + solve), sensitivity, filter, update (OC bisection). The
   same warm-up rule and ``--iters`` median. ``ratio_vs_cholmod`` = adjopt /
   CHOLMOD baseline seconds per iteration.

   Same design check: adjopt's history f_k (compliance at the k-th design)
   against the baseline's compliance of the same design, k = 0..iters; both
   start from p = volfrac and take the same OC steps, so with exact solves
   they agree to round-off (``compliance_rel_diff`` per iteration, and
   ``design_max_abs_diff``, max |p_adjopt - x_baseline| after iters+1 steps).

2. **Full runs** (``--full``): to the 88-line stopping test (change <= 0.01,
   ``xtol=0.01, gtol=0``), at most ``--full-maxiter`` (500) iterations: final
   compliance of adjopt per solver (``--full-solvers``, default ``--solvers``)
   and of the baseline (CHOLMOD if installed, else spsolve), both at the
   final design (the 88-line code prints the one before its last update:
   recorded as ``c_printed``), iterations and the relative difference
   (target 0.5 %).

3. **3D cantilever** (``--cantilever``): ``J.value_and_gradient(p0)`` on a
   fresh ``build("cantilever3d", ...)`` per solver (``--solvers-3d``, default
   ``--solvers``), after an untimed warm-up on 2x2x2 elements; wall time and
   peak resident memory of the build and of the call (``Meter``; VmHWM reset
   per phase), and with ``--repeat-3d N`` (default 1) the median of N more
   calls on the same problem, its state cache cleared before each (a new
   factorization every time; ``repeat_median_s``). No baseline in 3D.

The ``summary`` holds the issue's targets with the measured numbers: per
design iteration <= 1/3 of the CHOLMOD baseline at >= 61k dofs; <= 2.0 s at
1200x400; full-run compliance within 0.5 % at 60x20, 150x50, 300x100; 3D
(>= 1.2M dofs) value+gradient <= 30 s and peak memory <= 8 GB. A target whose
size was not run is ``met: null``.

Threads: numpy's OpenBLAS runs dot products and small matrix products on all
cores. On a loaded machine each such call can cost milliseconds, and OC
evaluates the volume (a dot product of the element count) about 40 times per
iteration: at 300x100 on a shared 2-core machine adjopt's non-solver time was
0.39 s per iteration, 0.03 s with ``OPENBLAS_NUM_THREADS=1``. The thread
variables of the environment and the BLAS that CHOLMOD links are recorded in
``info`` (``thread_env``, ``cholmod_blas``, ``cholmod_blas_kind``, and
``threadpools``: every BLAS and OpenMP library loaded in this process, with
its threads, by threadpoolctl); compare runs with the same ones. A CHOLMOD
baseline on the reference BLAS (what ``libsuitesparse-dev`` alone brings on
Debian) is labelled so in the tables, and no target that compares with it
is called met or not met ("not measured", with the reason).

Targets of the performance issue, in ``summary`` too: per iteration <= 1/2 of
the CHOLMOD baseline below 61k dofs; adjopt's ``cholmod`` path within 10 % of
the plain loop at every size (``cholmod_path_vs_plain_loop``); the full
150x50 run at most half the loop's time (``full_run_time``, from ``--full``).

Output: tables on stdout, the JSON ``--out`` (atomic, rewritten after every
size with ``"complete": false`` until the end; ``info`` from
``machine_info``), the PNG ``--plot`` (seconds per iteration vs dofs, log-log).
Exit status 1 when a run failed with an error other than a skip, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from _bench_common import Meter, blas_info, blas_kind, loglog_plot, machine_info, median_time, peak_rss_gib, release_memory, reset_peak, table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))

import topology_compliance as tc  # noqa: E402

import adjopt  # noqa: E402
from adjopt.errors import MissingBackendError  # noqa: E402
from adjopt.solvers import make_solver  # noqa: E402

DEFAULT_MBB = ["150x50", "300x100", "600x200", "1200x400"]
DEFAULT_CANTILEVER = ["16x8x8", "32x16x16", "48x24x24"]
BIG_CANTILEVER = "120x60x60"  # 3 * 121 * 61 * 61 = 1,350,723 dofs
DEFAULT_FULL = ["60x20", "150x50", "300x100"]
BASELINES = ("spsolve", "cholmod")
PHASES = ("assembly", "solve", "sensitivity", "filter", "update")

# targets of the issue "Topology optimization at scale"
TARGET_RATIO = 1.0 / 3.0
TARGET_RATIO_MIN_DOFS = 60_000  # "at >= 61k dofs": 300x100 has 2 * 301 * 101 = 60,802
TARGET_RATIO_SMALL = 0.5  # below TARGET_RATIO_MIN_DOFS (150x50, 15k dofs)
TARGET_CHOLMOD_PATH = 1.10  # adjopt's CHOLMOD path within 10 % of the plain loop's, at every size
TARGET_FULL_TIME_SIZE = (150, 50)
TARGET_FULL_TIME_RATIO = 0.5  # the full 150x50 run at most half the 88-line loop's time
TARGET_1200x400_S = 2.0
TARGET_FULL_REL = 0.005
TARGET_FULL_SIZES = ((60, 20), (150, 50), (300, 100))
TARGET_3D_MIN_DOFS = 1_200_000
TARGET_3D_S = 30.0
TARGET_3D_GB = 8.0


# =====================================================================================================
# The 88-line baseline (Andreassen et al. 2011), numpy/scipy
# =====================================================================================================
def element_stiffness(nu: float = 0.3) -> np.ndarray:
    """top88's 8x8 Q1 plane-stress KE (E = 1, unit square; nodes LL, LR, UR, UL; x then y)."""
    A11 = np.array([[12, 3, -6, -3], [3, 12, 3, 0], [-6, 3, 12, -3], [-3, 0, -3, 12]], float)
    A12 = np.array([[-6, -3, 0, 3], [-3, -6, -3, -6], [0, -3, -6, 3], [3, -6, 3, -6]], float)
    B11 = np.array([[-4, 3, -2, 9], [3, -4, -9, 4], [-2, -9, -4, -3], [9, 4, -3, -4]], float)
    B12 = np.array([[2, -3, 4, -9], [-3, 2, 9, -2], [4, 9, 2, 3], [-9, -2, 3, 2]], float)
    return 1.0 / (1.0 - nu**2) / 24.0 * (np.block([[A11, A12], [A12.T, A11]]) + nu * np.block([[B11, B12], [B12.T, B11]]))


def cholmod_module():
    """``sksparse.cholmod`` or None."""
    try:
        from sksparse import cholmod
    except ImportError:
        return None
    return cholmod


class MBB88:
    """The half MBB beam of top88.m with a density filter, in numpy/scipy.

    Node (i, j) (i along x, j along y, y up) is ``j (nelx+1) + i`` and owns dofs
    2n (x) and 2n+1 (y); element (i, j) is ``j nelx + i``: the numbering of the
    adjopt mesh, so densities compare entry by entry. Supports and load as in
    ``topology_compliance`` (placed by coordinates there): the x-dofs of the
    left edge x = 0, the y-dof of the bottom-right node (nelx, 0); load -1 on
    the y-dof of the top-left node (0, nely).
    """

    def __init__(self, nelx, nely, volfrac=0.5, penal=3.0, rmin=1.5, emin=1e-9, nu=0.3):
        self.nelx, self.nely = nelx, nely
        self.volfrac, self.penal, self.rmin, self.emin = volfrac, penal, rmin, emin
        self.nel = nelx * nely
        nx = nelx + 1
        self.ndof = 2 * nx * (nely + 1)
        self.KE = element_stiffness(nu)
        self.KE_flat = self.KE.ravel()
        ii = np.tile(np.arange(nelx), nely)
        jj = np.repeat(np.arange(nely), nelx)
        ll = jj * nx + ii
        nodes = np.stack([ll, ll + 1, ll + nx + 1, ll + nx], axis=1)  # LL, LR, UR, UL
        self.edof = np.stack([2 * nodes, 2 * nodes + 1], axis=2).reshape(self.nel, 8)
        idx = np.int32 if self.ndof < 2**31 else np.int64
        self.iK = np.repeat(self.edof, 8, axis=1).ravel().astype(idx)  # entry a*8+b of element e: (edof[a], edof[b])
        self.jK = np.tile(self.edof, (1, 8)).ravel().astype(idx)
        fixed = np.union1d(2 * (np.arange(nely + 1) * nx), [2 * nelx + 1])
        self.free = np.setdiff1d(np.arange(self.ndof), fixed)
        self.F = np.zeros(self.ndof)
        self.F[2 * (nely * nx) + 1] = -1.0
        self.H, self.Hs = self._filter(ii, jj)

    def _filter(self, ii, jj):
        """Cone filter H(e, f) = max(0, rmin - dist(e, f)) on element centres, and its row sums."""
        nelx, nely, rmin = self.nelx, self.nely, self.rmin
        r = int(math.ceil(rmin)) - 1
        rows, cols, vals = [], [], []
        for di in range(-r, r + 1):
            for dj in range(-r, r + 1):
                w = rmin - math.hypot(di, dj)
                if w <= 0:
                    continue
                i2, j2 = ii + di, jj + dj
                ok = (i2 >= 0) & (i2 < nelx) & (j2 >= 0) & (j2 < nely)
                rows.append((jj * nelx + ii)[ok])
                cols.append((j2 * nelx + i2)[ok])
                vals.append(np.full(int(ok.sum()), w))
        H = sp.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(self.nel,) * 2)
        return H, np.asarray(H.sum(axis=1)).ravel()

    def fe(self, xPhys, solve):
        """(U, E, timings): assembly from COO, free-dof slicing, ``solve(Kff, f)``."""
        t0 = time.perf_counter()
        E = self.emin + xPhys**self.penal * (1.0 - self.emin)
        sK = (self.KE_flat[None, :] * E[:, None]).ravel()
        K = sp.coo_array((sK, (self.iK, self.jK)), shape=(self.ndof, self.ndof)).tocsc()
        Kff = K[self.free, :][:, self.free]
        t1 = time.perf_counter()
        U = np.zeros(self.ndof)
        U[self.free] = solve(Kff, self.F[self.free])
        t2 = time.perf_counter()
        return U, E, (t1 - t0, t2 - t1)

    def solver(self, name):
        """``solve(Kff, f)`` of the baseline ``name`` ("spsolve" or "cholmod")."""
        if name == "spsolve":
            return lambda K, f: spla.spsolve(K, f, use_umfpack=False)
        chol = cholmod_module()
        box = {}

        def solve(K, f):
            if "factor" not in box:
                box["factor"] = chol.cholesky(K)  # symbolic analysis + numeric factorization
            else:
                box["factor"].cholesky_inplace(K)  # numeric factorization on the same analysis
            return box["factor"](f)
        return solve

    def compliance(self, x, solver="spsolve"):
        """c(xPhys) of the filtered design of ``x`` (one FE analysis)."""
        xPhys = (self.H @ x) / self.Hs
        U, E, _ = self.fe(xPhys, self.solver(solver))
        Ue = U[self.edof]
        return float(E @ np.einsum("ij,ij->i", Ue @ self.KE, Ue))

    def run(self, solver="spsolve", maxiter=500, tolx=0.01, move=0.2):
        """The 88-line loop; per iteration its compliance (before the update) and phase seconds."""
        solve = self.solver(solver)
        nel, penal, H, Hs = self.nel, self.penal, self.H, self.Hs
        x = np.full(nel, float(self.volfrac))
        xPhys = x.copy()
        history, times, phases = [], [], []
        change, loop = 1.0, 0
        while change > tolx and loop < maxiter:
            loop += 1
            t0 = time.perf_counter()
            U, E, (t_asm, t_sol) = self.fe(xPhys, solve)
            t2 = time.perf_counter()
            Ue = U[self.edof]
            ce = np.einsum("ij,ij->i", Ue @ self.KE, Ue)
            c = float(E @ ce)
            dc = -penal * (1.0 - self.emin) * xPhys ** (penal - 1) * ce
            t3 = time.perf_counter()
            dc = H @ (dc / Hs)
            dv = H @ (np.ones(nel) / Hs)
            t4 = time.perf_counter()
            l1, l2 = 0.0, 1e9
            while (l2 - l1) / (l1 + l2) > 1e-3:
                lmid = 0.5 * (l2 + l1)
                B = np.sqrt(np.maximum(-dc / dv / lmid, 0.0))
                xnew = np.maximum(0.0, np.maximum(x - move, np.minimum(1.0, np.minimum(x + move, x * B))))
                xPhys = (H @ xnew) / Hs
                if xPhys.sum() > self.volfrac * nel:
                    l1 = lmid
                else:
                    l2 = lmid
            change = float(np.max(np.abs(xnew - x)))
            x = xnew
            t5 = time.perf_counter()
            history.append(c)
            times.append(t5 - t0)
            phases.append(dict(assembly=t_asm, solve=t_sol, sensitivity=t3 - t2, filter=t4 - t3, update=t5 - t4))
        return dict(x=x, history=history, times=times, phases=phases, nit=loop, change=change)


# =====================================================================================================
# helpers
# =====================================================================================================
def parse_size(text: str, dim: int) -> tuple:
    parts = text.lower().split("x")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != dim or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be {'x'.join(['N'] * dim)} with integers >= 1")
    return vals


def size_name(size) -> str:
    return "x".join(str(s) for s in size)


def median(values):
    return float(np.median(values)) if len(values) else None


def phase_medians(per_iter: list[dict]) -> dict | None:
    """{phase: median seconds} over the iterations that record it; None when none does."""
    per_iter = [d if isinstance(d, dict) else None for d in per_iter]
    keys = []
    for d in per_iter:
        for k in d or {}:
            if k not in keys:
                keys.append(k)
    if not keys:
        return None
    return {k: median([float(d[k]) for d in per_iter if d and k in d]) for k in keys}


def history_time(history: list[dict], timed: slice) -> dict | None:
    """The history entries' own ``"time"`` (absent today): median over the timed entries ``history[timed]``.

    A ``time`` strictly increasing over the consecutive entries that have one is read as elapsed time (its
    differences are the iteration times), anything else as seconds per iteration.
    """
    vals = [e.get("time") if isinstance(e.get("time"), (int, float)) else None for e in history]
    have = [k for k, v in enumerate(vals) if v is not None]
    if not have:
        return None
    idx = range(len(history))[timed]
    consecutive = have == list(range(have[0], have[-1] + 1))
    if consecutive and len(have) > 2 and all(vals[k + 1] > vals[k] for k in have[:-1]):
        sel = [vals[k] - vals[k - 1] for k in idx if k - 1 >= 0 and vals[k] is not None and vals[k - 1] is not None]
        return dict(median=median(sel), read_as="elapsed (differences)") if sel else None
    sel = [vals[k] for k in idx if vals[k] is not None]
    return dict(median=median(sel), read_as="per iteration") if sel else None


def check_solver(name: str) -> str | None:
    """None when ``make_solver(name)`` works (or the name is "gmg", built by ``build(solver="gmg")``
    from the grid), else the reason to skip the name."""
    if name == "gmg":
        return None
    try:
        make_solver(name)
    except (MissingBackendError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# =====================================================================================================
# measurements
# =====================================================================================================
def run_adjopt_iterations(nelx, nely, solver, args, meter) -> dict:
    """minimize(method="oc", maxiter=iters+1) with callback timestamps."""
    rec = dict(solver=solver, status="ok")
    try:
        t0 = time.perf_counter()
        problem = tc.build("mbb", nelx, nely, volfrac=args.volfrac, penal=args.penal, rmin=args.rmin, emin=args.emin,
                           filter=True, solver=solver)
        rec["build_s"] = time.perf_counter() - t0
    except (MissingBackendError, ValueError) as exc:
        return dict(solver=solver, status="skipped", reason=error_text(exc))
    J = problem.functional
    stats = J.stats
    stamps = []

    def callback(info):
        stamps.append((time.perf_counter(), stats.factorization_time, sum(stats.solve_time.values())))

    with meter.phase(f"mbb {nelx}x{nely} adjopt {solver}") as ph:
        try:
            start = (time.perf_counter(), stats.factorization_time, sum(stats.solve_time.values()))
            res = adjopt.minimize(problem, method="oc", maxiter=args.iters + 1, xtol=0.0, gtol=0.0, callback=callback)
        except MissingBackendError as exc:
            return dict(solver=solver, status="skipped", reason=error_text(exc))
        except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
            traceback.print_exc()
            return dict(solver=solver, status="error", reason=error_text(exc))
    marks = [start] + stamps
    it_t = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    it_f = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    it_s = [b[2] - a[2] for a, b in zip(marks, marks[1:])]
    timed = slice(1, None)  # it_t[0] is iteration 1 (with the start): the warm-up
    hist_timed = slice(2, None)  # history[0] is the start, history[1] the warm-up iteration
    other = [t - f - s for t, f, s in zip(it_t, it_f, it_s)]
    rec.update(
        s_per_iter=median(it_t[timed]), iter_times=it_t, warmup_s=it_t[0] if it_t else None,
        iterations_timed=len(it_t[timed]),
        stats_phases=dict(factorize=median(it_f[timed]), solve=median(it_s[timed]), other=median(other[timed])),
        phases=phase_medians([e.get("phases") for e in res.history[hist_timed]]),
        history_time=history_time(res.history, hist_timed),
        compliance=[float(e["f"]) for e in res.history], nit=res.nit, factorizations=res.factorizations,
        solves=res.solves, peak_GiB=ph.get("peak_GiB") or peak_rss_gib(), solver_used=_solver_used(J), x=res.x,
        warnings=list(res.warnings),
    )
    return rec


def _solver_used(J) -> str:
    s = J.solver
    chosen = getattr(s, "chosen", None)
    return s.name if chosen is None else f"{s.name}:{chosen.name}"


def run_baseline_iterations(base: MBB88, name: str, args, meter) -> dict:
    with meter.phase(f"mbb {base.nelx}x{base.nely} baseline {name}") as ph:
        try:
            out = base.run(name, maxiter=args.iters + 1, tolx=0.0)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            return dict(baseline=name, status="error", reason=error_text(exc))
    timed = slice(1, None)
    per = out["phases"][timed]
    return dict(baseline=name, status="ok", s_per_iter=median(out["times"][timed]), iter_times=out["times"],
                warmup_s=out["times"][0], iterations_timed=len(out["times"][timed]),
                phases={k: median([p[k] for p in per]) for k in PHASES}, compliance=out["history"],
                peak_GiB=ph.get("peak_GiB"), x=out["x"])


def baseline_skip_reason(name: str, dofs: int, args) -> str | None:
    if name == "cholmod" and cholmod_module() is None:
        return "sksparse.cholmod (scikit-sparse) is not installed"
    if name == "spsolve" and dofs > args.baseline_max_dofs_superlu:
        return f"{dofs} dofs > --baseline-max-dofs-superlu {args.baseline_max_dofs_superlu}"
    return None


def rel_diffs(a, b) -> list:
    n = min(len(a), len(b))
    return [abs(a[k] - b[k]) / abs(b[k]) if b[k] else None for k in range(n)]


def measure_mbb(size, args, solvers, meter) -> dict:
    nelx, nely = size
    release_memory()
    reset_peak()
    t0 = time.perf_counter()
    base = MBB88(nelx, nely, args.volfrac, args.penal, args.rmin, args.emin)
    row = dict(size=size_name(size), nelx=nelx, nely=nely, dofs=base.ndof, free_dofs=int(base.free.size),
               elements=base.nel, baseline_setup_s=time.perf_counter() - t0, baselines={}, adjopt={})
    for name in args.baselines:
        reason = baseline_skip_reason(name, base.ndof, args)
        if reason:
            row["baselines"][name] = dict(baseline=name, status="skipped", reason=reason)
            print(f"  baseline {name}: skipped ({reason})", flush=True)
            continue
        rec = run_baseline_iterations(base, name, args, meter)
        row["baselines"][name] = rec
        release_memory()
        if rec["status"] == "ok":
            print(f"  baseline {name}: {rec['s_per_iter']:.4g} s/iter", flush=True)
    ref_name = next((n for n in ("cholmod", "spsolve") if row["baselines"].get(n, {}).get("status") == "ok"), None)
    ref = row["baselines"][ref_name] if ref_name else None
    chol = row["baselines"].get("cholmod", {})
    for solver in solvers:
        rec = run_adjopt_iterations(nelx, nely, solver, args, meter)
        release_memory()
        if rec["status"] == "ok":
            x = rec.pop("x")
            if ref is not None:
                d = rel_diffs(rec["compliance"][: args.iters + 1], ref["compliance"])
                rec["compared_with"] = ref_name
                rec["compliance_rel_diff"] = d
                rec["compliance_rel_diff_max"] = max(v for v in d if v is not None) if d else None
                rec["design_max_abs_diff"] = float(np.max(np.abs(x - ref["x"])))
            if chol.get("status") == "ok":
                rec["ratio_vs_cholmod"] = rec["s_per_iter"] / chol["s_per_iter"]
            print(f"  adjopt {solver}: {rec['s_per_iter']:.4g} s/iter"
                  + (f", x{rec['ratio_vs_cholmod']:.3g} of CHOLMOD baseline" if "ratio_vs_cholmod" in rec else "")
                  + (f", max rel. compliance diff {rec['compliance_rel_diff_max']:.2g}" if ref is not None else ""),
                  flush=True)
        else:
            print(f"  adjopt {solver}: {rec['status']} ({rec['reason']})", flush=True)
        row["adjopt"][solver] = rec
    for rec in row["baselines"].values():
        rec.pop("x", None)
    row["peak_GiB"] = peak_rss_gib()  # of the whole size (reset at its start where the kernel allows it)
    return row


def measure_full(size, args, solvers, meter) -> dict:
    nelx, nely = size
    base = MBB88(nelx, nely, args.volfrac, args.penal, args.rmin, args.emin)
    row = dict(size=size_name(size), nelx=nelx, nely=nely, dofs=base.ndof, adjopt={})
    bname = "cholmod" if cholmod_module() is not None else "spsolve"
    t0 = time.perf_counter()
    out = base.run(bname, maxiter=args.full_maxiter, tolx=0.01)
    t_run = time.perf_counter() - t0
    c_final = base.compliance(out["x"], bname)
    row["baseline"] = dict(baseline=bname, nit=out["nit"], c_final=c_final, c_printed=out["history"][-1],
                           change=out["change"], time_s=t_run)
    print(f"  baseline {bname}: c = {c_final:.8g} after {out['nit']} iterations ({t_run:.3g} s)", flush=True)
    for solver in solvers:
        try:
            problem = tc.build("mbb", nelx, nely, volfrac=args.volfrac, penal=args.penal, rmin=args.rmin,
                               emin=args.emin, filter=True, solver=solver)
        except (MissingBackendError, ValueError) as exc:
            row["adjopt"][solver] = dict(solver=solver, status="skipped", reason=error_text(exc))
            continue
        with meter.phase(f"full {nelx}x{nely} adjopt {solver}"):
            try:
                res = adjopt.minimize(problem, method="oc", maxiter=args.full_maxiter, xtol=0.01, gtol=0.0)
            except MissingBackendError as exc:
                row["adjopt"][solver] = dict(solver=solver, status="skipped", reason=error_text(exc))
                continue
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row["adjopt"][solver] = dict(solver=solver, status="error", reason=error_text(exc))
                continue
        rel = abs(res.fun - c_final) / abs(c_final)
        row["adjopt"][solver] = dict(solver=solver, status="ok", c_final=res.fun, nit=res.nit, success=res.success,
                                     message=res.message, time_s=res.time, rel_diff=rel,
                                     design_max_abs_diff=float(np.max(np.abs(res.x - out["x"]))))
        print(f"  adjopt {solver}: c = {res.fun:.8g} after {res.nit} iterations ({res.time:.3g} s), "
              f"rel. diff {rel:.2g}", flush=True)
        release_memory()
    return row


def warmup_3d(solver):
    try:
        p = tc.build("cantilever3d", 2, 2, 2, solver=solver)
        p.functional.value_and_gradient(p.p0)
    except Exception:  # noqa: BLE001 - the measured run reports it
        pass


def measure_3d_solver(size, solver, args, meter) -> dict:
    """Build a fresh cantilever with ``solver`` and time J.value_and_gradient(p0) (and its repeats)."""
    nelx, nely, nelz = size
    rec = dict(solver=solver, status="ok")
    try:
        with meter.phase(f"3d {size_name(size)} build {solver}") as ph:
            problem = tc.build("cantilever3d", nelx, nely, nelz, volfrac=args.volfrac, penal=args.penal,
                               rmin=args.rmin, emin=args.emin, filter=True, solver=solver)
        rec.update(build_s=ph["seconds"], build_peak_GiB=ph.get("peak_GiB"))
    except (MissingBackendError, ValueError) as exc:
        return dict(solver=solver, status="skipped", reason=error_text(exc))
    J = problem.functional
    try:
        with meter.phase(f"3d {size_name(size)} value_and_gradient {solver}") as ph:
            f, g = J.value_and_gradient(problem.p0)
    except MissingBackendError as exc:
        return dict(solver=solver, status="skipped", reason=error_text(exc))
    except Exception as exc:  # noqa: BLE001 (MemoryError included: recorded, the benchmark goes on)
        traceback.print_exc()
        return dict(solver=solver, status="error", reason=error_text(exc))
    st = J.stats
    rec.update(free_dofs=int(problem.meta["dofmap"].n_free), value_and_gradient_s=ph["seconds"],
               peak_GiB=ph.get("peak_GiB"), overall_peak_GiB=meter.overall_peak_gib(), J=float(f),
               gradient_norm=float(np.linalg.norm(g)), solver_used=_solver_used(J), factorizations=st.factorizations,
               factorization_s=st.factorization_time, solve_s=float(sum(st.solve_time.values())),
               factor_nnz=int(st.factor_nnz), solves=dict(st.solves))
    del f, g
    if args.repeat_3d > 0:
        def again():
            J.cache.clear()  # the previous state goes first: never two factorizations at once
            J.value_and_gradient(problem.p0)
        rec["repeat_median_s"] = median_time(again, args.repeat_3d)
        rec["repeats"] = args.repeat_3d
    return rec


def measure_3d(size, args, solvers, meter) -> dict:
    nelx, nely, nelz = size
    dofs = 3 * (nelx + 1) * (nely + 1) * (nelz + 1)
    row = dict(size=size_name(size), nelx=nelx, nely=nely, nelz=nelz, dofs=dofs, elements=nelx * nely * nelz,
               adjopt={})
    for solver in solvers:
        release_memory()
        rec = measure_3d_solver(size, solver, args, meter)
        row["adjopt"][solver] = rec
        if rec["status"] == "ok":
            print(f"  {solver}: value+gradient {rec['value_and_gradient_s']:.4g} s, peak "
                  f"{_fmt(rec['peak_GiB'], '.3g')} GiB, J = {rec['J']:.8g}", flush=True)
        else:
            print(f"  {solver}: {rec['status']} ({rec['reason']})", flush=True)
    release_memory()
    return row


# =====================================================================================================
# summary, tables, plot
# =====================================================================================================
def summarize(data) -> dict:
    summ = {}
    fast = fast_cholmod_baseline(data.get("info", {}))
    summ["cholmod_baseline_blas"] = dict(kind=data.get("info", {}).get("cholmod_blas_kind"), fast=fast)
    not_fast = ("the CHOLMOD baseline runs on the reference BLAS, which is no fast baseline: install OpenBLAS "
                "(apt-get install libopenblas-dev) and run again")
    # per design iteration vs the CHOLMOD baseline: <= 1/3 at >= 61k dofs, <= 1/2 below
    per = []
    for row in data["mbb"]:
        limit = TARGET_RATIO if row["dofs"] >= TARGET_RATIO_MIN_DOFS else TARGET_RATIO_SMALL
        ratios = {s: r.get("ratio_vs_cholmod") for s, r in row["adjopt"].items() if r.get("ratio_vs_cholmod")}
        best = min(ratios, key=ratios.get) if ratios else None
        per.append(dict(size=row["size"], dofs=row["dofs"], limit=limit, ratios=ratios, best_solver=best,
                        best_ratio=ratios.get(best) if best else None,
                        met=(ratios[best] <= limit) if best and fast else None))
    summ["per_iteration_vs_cholmod_baseline"] = dict(
        target=f"adjopt s/iteration <= 1/3 of the CHOLMOD baseline at >= 61k dofs, <= {TARGET_RATIO_SMALL:g} below",
        sizes=per, met=_all_met(per), note=None if fast else not_fast)
    # adjopt's CHOLMOD path against the plain loop's CHOLMOD
    path = []
    for row in data["mbb"]:
        r = row["adjopt"].get("cholmod", {})
        if r.get("ratio_vs_cholmod"):
            path.append(dict(size=row["size"], dofs=row["dofs"], ratio=r["ratio_vs_cholmod"],
                             met=(r["ratio_vs_cholmod"] <= TARGET_CHOLMOD_PATH) if fast else None))
    summ["cholmod_path_vs_plain_loop"] = dict(
        target=f"adjopt with solver='cholmod' within {TARGET_CHOLMOD_PATH - 1:.0%} of the plain loop at every size",
        sizes=path, met=_all_met(path) if path else None, note=None if fast else not_fast)
    # the full 150x50 run: at most half the loop's time
    row = next((r for r in data["full"] if (r["nelx"], r["nely"]) == TARGET_FULL_TIME_SIZE), None)
    item = dict(target=f"the full {size_name(TARGET_FULL_TIME_SIZE)} run at most {TARGET_FULL_TIME_RATIO:g} of the "
                       "88-line loop's time", met=None)
    if row is not None and row.get("baseline", {}).get("time_s"):
        tb = row["baseline"]["time_s"]
        times = {s: r["time_s"] for s, r in row["adjopt"].items() if r.get("status") == "ok"}
        best = min(times, key=times.get) if times else None
        item.update(baseline=row["baseline"]["baseline"], baseline_s=tb, seconds=times, best_solver=best,
                    ratio=times[best] / tb if best else None)
        if best and (row["baseline"]["baseline"] != "cholmod" or fast):
            item["met"] = times[best] / tb <= TARGET_FULL_TIME_RATIO
    summ["full_run_time"] = item
    # 1200x400 <= 2 s
    row = next((r for r in data["mbb"] if (r["nelx"], r["nely"]) == (1200, 400)), None)
    times = {s: r["s_per_iter"] for s, r in row["adjopt"].items() if r.get("status") == "ok"} if row else {}
    best = min(times, key=times.get) if times else None
    summ["mbb_1200x400"] = dict(target=f"<= {TARGET_1200x400_S} s per design iteration at 1200x400",
                                seconds=times, best_solver=best, best_seconds=times.get(best) if best else None,
                                met=(times[best] <= TARGET_1200x400_S) if best else None)
    # full runs
    full = []
    for size in TARGET_FULL_SIZES:
        row = next((r for r in data["full"] if (r["nelx"], r["nely"]) == size), None)
        rels = {s: r["rel_diff"] for s, r in row["adjopt"].items() if r.get("status") == "ok"} if row else {}
        full.append(dict(size=size_name(size), rel_diff=rels, max_rel_diff=max(rels.values()) if rels else None,
                         met=(max(rels.values()) <= TARGET_FULL_REL) if rels else None))
    summ["full_run_compliance"] = dict(target=f"final compliance within {TARGET_FULL_REL:.1%} of the baseline at "
                                              "60x20, 150x50, 300x100 (every solver)", sizes=full, met=_all_met(full))
    # 3D
    big = [r for r in data["cantilever3d"] if r["dofs"] >= TARGET_3D_MIN_DOFS]
    rows3 = []
    for row in big:
        # the memory target is the peak of the whole run: building the problem (the pattern) included
        sol = {s: dict(seconds=r["value_and_gradient_s"], peak_GiB=r.get("overall_peak_GiB", r.get("peak_GiB")),
                       build_peak_GiB=r.get("build_peak_GiB"),
                       met=r["value_and_gradient_s"] <= TARGET_3D_S
                       and r.get("overall_peak_GiB", r.get("peak_GiB")) is not None
                       and r.get("overall_peak_GiB", r.get("peak_GiB")) * 2**30 <= TARGET_3D_GB * 1e9)
               for s, r in row["adjopt"].items() if r.get("status") == "ok"}
        rows3.append(dict(size=row["size"], dofs=row["dofs"], solvers=sol,
                          met=any(v["met"] for v in sol.values()) if sol else None))
    summ["cantilever3d"] = dict(target=f"3D ~1.35M dofs value+gradient <= {TARGET_3D_S:g} s and peak memory <= "
                                       f"{TARGET_3D_GB:g} GB (some solver)", sizes=rows3, met=_all_met(rows3))
    return summ


def _all_met(items):
    flags = [i["met"] for i in items]
    if not flags or any(f is None for f in flags):
        return None if not any(f is False for f in flags) else False
    return all(flags)


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def print_summary(summ):
    print("\nsummary (targets of the issue 'Topology optimization at scale'):")
    mark = {True: "MET", False: "NOT MET", None: "not measured"}
    s = summ["per_iteration_vs_cholmod_baseline"]
    print(f"  {s['target']}: {mark[s['met']]}")
    for r in s["sizes"]:
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in r["ratios"].items()) or "no ratio"
        print(f"    {r['size']} ({r['dofs']} dofs): {ratios}")
    if s.get("note"):
        print(f"    ({s['note']})")
    s = summ["cholmod_path_vs_plain_loop"]
    print(f"  {s['target']}: {mark[s['met']]}")
    for r in s["sizes"]:
        print(f"    {r['size']} ({r['dofs']} dofs): {r['ratio']:.3g}")
    s = summ["full_run_time"]
    print(f"  {s['target']}: {mark[s['met']]}" + (
        f" (best {s['best_solver']} {s['seconds'][s['best_solver']]:.3g} s against {s['baseline_s']:.3g} s, "
        f"ratio {s['ratio']:.3g})" if s.get("best_solver") else ""))
    s = summ["mbb_1200x400"]
    print(f"  {s['target']}: {mark[s['met']]}" + (f" ({s['best_solver']} {s['best_seconds']:.3g} s)"
                                                  if s["best_solver"] else ""))
    s = summ["full_run_compliance"]
    print(f"  {s['target']}: {mark[s['met']]}")
    for r in s["sizes"]:
        print(f"    {r['size']}: " + (", ".join(f"{k} {v:.2e}" for k, v in r["rel_diff"].items()) or "not run"))
    s = summ["cantilever3d"]
    print(f"  {s['target']}: {mark[s['met']]}")
    for r in s["sizes"]:
        print(f"    {r['size']} ({r['dofs']} dofs): " + ", ".join(
            f"{k} {v['seconds']:.3g} s {_fmt(v['peak_GiB'])} GiB" for k, v in r["solvers"].items()))


#: [False] when the CHOLMOD baseline runs on the reference BLAS (set in main from info; labels the tables)
FAST_BASELINE = [True]


def mbb_table(rows) -> str:
    out = []
    for row in rows:
        for name, r in row["baselines"].items():
            ph = r.get("phases") or {}
            label = f"baseline {name}" + (" (reference BLAS)" if name == "cholmod" and not FAST_BASELINE[0] else "")
            out.append([row["size"], row["dofs"], label, _fmt(r.get("s_per_iter"), ".4g"),
                        *(_fmt(ph.get(k), ".3g") for k in PHASES), "-", "-", "-", r["status"]])
        for name, r in row["adjopt"].items():
            sp_ = r.get("stats_phases") or {}
            out.append([row["size"], row["dofs"], f"adjopt {name}", _fmt(r.get("s_per_iter"), ".4g"), "-",
                        _fmt((sp_.get("factorize") or 0) + (sp_.get("solve") or 0) if sp_ else None), "-", "-", "-",
                        _fmt(sp_.get("other")), _fmt(r.get("ratio_vs_cholmod")),
                        _fmt(r.get("compliance_rel_diff_max"), ".2g"), r["status"]])
    return table(out, ["size", "dofs", "run", "s/iter", *PHASES, "other", "/cholmod", "rel dc", "status"])


def adjopt_phase_table(rows) -> str | None:
    """The library's own phases (history "phases"), when it records them."""
    out, keys = [], []
    for row in rows:
        for r in row["adjopt"].values():
            for k in r.get("phases") or {}:
                if k not in keys:
                    keys.append(k)
    if not keys:
        return None
    for row in rows:
        for name, r in row["adjopt"].items():
            if r.get("phases"):
                out.append([row["size"], name, *(_fmt(r["phases"].get(k)) for k in keys)])
    return table(out, ["size", "solver", *keys])


def plot(path, data) -> bool:
    series = {}
    for row in data["mbb"]:
        for name, r in row["baselines"].items():
            series.setdefault(f"baseline {name} (88-line)", ([], []))
            series[f"baseline {name} (88-line)"][0].append(row["dofs"])
            series[f"baseline {name} (88-line)"][1].append(r.get("s_per_iter"))
        for name, r in row["adjopt"].items():
            series.setdefault(f"adjopt {name}", ([], []))
            series[f"adjopt {name}"][0].append(row["dofs"])
            series[f"adjopt {name}"][1].append(r.get("s_per_iter"))
    for row in data["cantilever3d"]:
        for name, r in row["adjopt"].items():
            key = f"3D value+gradient, adjopt {name}"
            series.setdefault(key, ([], []))
            series[key][0].append(row["dofs"])
            series[key][1].append(r.get("value_and_gradient_s"))
    return loglog_plot(path, series, "dofs", "seconds per design iteration",
                       "MBB OC iteration: adjopt vs 88-line baselines")


# =====================================================================================================
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbb", nargs="*", default=DEFAULT_MBB, type=lambda s: parse_size(s, 2), metavar="NXxNY")
    ap.add_argument("--cantilever", nargs="*", default=DEFAULT_CANTILEVER, type=lambda s: parse_size(s, 3),
                    metavar="NXxNYxNZ", help=f"3D sizes; the issue's ~1.35M dofs is {BIG_CANTILEVER}")
    ap.add_argument("--full", nargs="*", default=DEFAULT_FULL, type=lambda s: parse_size(s, 2), metavar="NXxNY")
    ap.add_argument("--solvers", nargs="+", default=["cholmod", "pardiso"])
    ap.add_argument("--solvers-3d", nargs="+", default=None, help="solvers of the 3D runs (default: --solvers)")
    ap.add_argument("--full-solvers", nargs="+", default=None, help="solvers of the full runs (default: --solvers)")
    ap.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES)
    ap.add_argument("--iters", type=int, default=10, help="timed design iterations (after 1 warm-up)")
    ap.add_argument("--baseline-max-dofs-superlu", type=int, default=300_000)
    ap.add_argument("--full-maxiter", type=int, default=500)
    ap.add_argument("--repeat-3d", type=int, default=1,
                    help="3D: further value_and_gradient calls (cache cleared) after the first; their median")
    ap.add_argument("--volfrac", type=float, default=0.5)
    ap.add_argument("--penal", type=float, default=3.0)
    ap.add_argument("--rmin", type=float, default=1.5)
    ap.add_argument("--emin", type=float, default=1e-9)
    ap.add_argument("--out", default="bench_topology.json")
    ap.add_argument("--plot", default="bench_topology.png", help="PNG path ('' for none)")
    args = ap.parse_args(argv)
    if args.iters < 1:
        ap.error("--iters must be >= 1")
    if args.full_maxiter < 1:
        ap.error("--full-maxiter must be >= 1")
    if args.repeat_3d < 0:
        ap.error("--repeat-3d must be >= 0")
    args.mbb = [tuple(s) if isinstance(s, tuple) else parse_size(s, 2) for s in args.mbb]
    args.cantilever = [tuple(s) if isinstance(s, tuple) else parse_size(s, 3) for s in args.cantilever]
    args.full = [tuple(s) if isinstance(s, tuple) else parse_size(s, 2) for s in args.full]
    for path, what in ((args.out, "--out"), (args.plot, "--plot")):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            ap.error(f"{what} {path!r}: its folder does not exist")
    solvers3d = args.solvers_3d if args.solvers_3d is not None else args.solvers
    solvers_full = args.full_solvers if args.full_solvers is not None else args.solvers

    skipped = []
    for name in dict.fromkeys(args.solvers + solvers_full + solvers3d):
        reason = check_solver(name)
        if reason:
            skipped.append(dict(solver=name, reason=reason))
            print(f"solver {name!r} skipped: {reason}", flush=True)
    bad = {s["solver"] for s in skipped}
    solvers = [s for s in dict.fromkeys(args.solvers) if s not in bad]
    ok3d = [s for s in dict.fromkeys(solvers3d) if s not in bad]
    ok_full = [s for s in dict.fromkeys(solvers_full) if s not in bad]

    meter = Meter()
    data = dict(
        info=machine_info(sksparse=_sksparse_version(), adjopt=getattr(adjopt, "__version__", None), **blas_info()),
        config=dict(mbb=[size_name(s) for s in args.mbb], cantilever3d=[size_name(s) for s in args.cantilever],
                    full=[size_name(s) for s in args.full], solvers=args.solvers, solvers_full=solvers_full, solvers_3d=solvers3d,
                    baselines=args.baselines, iters=args.iters, warmup_iterations=1,
                    baseline_max_dofs_superlu=args.baseline_max_dofs_superlu, full_maxiter=args.full_maxiter,
                    repeat_3d=args.repeat_3d, volfrac=args.volfrac, penal=args.penal, rmin=args.rmin, emin=args.emin, move=0.2,
                    baseline_cholmod="symbolic analysis of the first iteration reused (cholesky_inplace)",
                    baseline_spsolve="scipy.sparse.linalg.spsolve, SuperLU, use_umfpack=False"),
        complete=False, skipped=skipped, mbb=[], full=[], cantilever3d=[], errors=[])
    errors = data["errors"]
    FAST_BASELINE[0] = fast_cholmod_baseline(data["info"])
    print(f"CHOLMOD's BLAS: {data['info'].get('cholmod_blas')} ({data['info'].get('cholmod_blas_kind')})", flush=True)
    if "cholmod" in args.baselines and not FAST_BASELINE[0]:
        print("warning: the CHOLMOD baseline runs on the reference BLAS; it is no fast baseline and the targets "
              "that compare with it are reported as not measured (apt-get install libopenblas-dev)", flush=True)

    def save():
        write_json(args.out, data)

    def note_errors(row, section):
        for recs in (row.get("adjopt", {}), row.get("baselines", {})):
            for name, r in recs.items():
                if r.get("status") == "error":
                    errors.append(dict(section=section, size=row["size"], run=name, reason=r["reason"]))
                if r.get("status") == "skipped":
                    skipped.append(dict(solver=name, section=section, size=row["size"], reason=r["reason"]))

    save()
    t_all = time.perf_counter()
    for size in args.mbb:
        print(f"\nMBB {size_name(size)}: {args.iters} timed OC iterations after 1 warm-up", flush=True)
        row = measure_mbb(size, args, solvers, meter)
        note_errors(row, "mbb")
        data["mbb"].append(row)
        save()
    if data["mbb"]:
        print("\nseconds per design iteration (median; phases of the baselines; adjopt: solve = factorize + solve "
              "from J.stats, other = the rest)")
        print(mbb_table(data["mbb"]))
        extra = adjopt_phase_table(data["mbb"])
        if extra:
            print("\nadjopt phases recorded by the library (median seconds per iteration)")
            print(extra)
    for size in args.full:
        print(f"\nfull run MBB {size_name(size)} (change <= 0.01, at most {args.full_maxiter} iterations)", flush=True)
        row = measure_full(size, args, ok_full, meter)
        note_errors(row, "full")
        data["full"].append(row)
        save()
    if data["full"]:
        rows = []
        for row in data["full"]:
            b = row["baseline"]
            rows.append([row["size"], f"baseline {b['baseline']}", f"{b['c_final']:.8g}", b["nit"],
                         f"{b['time_s']:.3g}", "-"])
            for name, r in row["adjopt"].items():
                rows.append([row["size"], f"adjopt {name}", _fmt(r.get("c_final"), ".8g"), r.get("nit", "-"),
                             _fmt(r.get("time_s")), _fmt(r.get("rel_diff"), ".2e")])
        print("\nfull runs: final compliance (at the final design)")
        print(table(rows, ["size", "run", "compliance", "iterations", "seconds", "rel diff"]))
    if args.cantilever:
        for s in ok3d:
            warmup_3d(s)
    for size in args.cantilever:
        print(f"\n3D cantilever {size_name(size)}: value_and_gradient(p0)", flush=True)
        row = measure_3d(size, args, ok3d, meter)
        note_errors(row, "cantilever3d")
        data["cantilever3d"].append(row)
        save()
    if data["cantilever3d"]:
        rows = [[row["size"], row["dofs"], name, _fmt(r.get("build_s")), _fmt(r.get("value_and_gradient_s"), ".4g"),
                 _fmt(r.get("repeat_median_s"), ".4g"), _fmt(r.get("factorization_s")), _fmt(r.get("solve_s")),
                 _fmt(r.get("peak_GiB")), r["status"]]
                for row in data["cantilever3d"] for name, r in row["adjopt"].items()]
        print("\n3D cantilever: forward + gradient")
        print(table(rows, ["size", "dofs", "solver", "build s", "value+grad s", "repeat s", "factorize s", "solve s",
                           "peak GiB", "status"]))

    data["summary"] = summarize(data)
    data["total_s"] = time.perf_counter() - t_all
    data["peak_GiB"] = meter.overall_peak_gib()
    data["phases"] = meter.rows
    data["complete"] = True
    print_summary(data["summary"])
    save()
    print(f"\nwrote {args.out}")
    if args.plot and (data["mbb"] or data["cantilever3d"]):
        if plot(args.plot, data):
            print(f"wrote {args.plot}")
        else:
            print("matplotlib missing: no plot")
    if errors:
        print(f"{len(errors)} run(s) failed: " + "; ".join(f"{e['section']} {e['size']} {e['run']}: {e['reason']}"
                                                           for e in errors), file=sys.stderr)
        return 1
    return 0


def fast_cholmod_baseline(info: dict) -> bool:
    """True when the CHOLMOD baseline may be called one: its BLAS is not the reference BLAS."""
    return info.get("cholmod_blas_kind") not in ("reference",)


def _sksparse_version():
    try:
        import sksparse
    except ImportError:
        return None
    return getattr(sksparse, "__version__", None)


if __name__ == "__main__":
    sys.exit(main())
