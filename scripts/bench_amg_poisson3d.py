"""Acceptance benchmark: value + gradient of a 3D P1 Poisson objective with >= 1M unknowns on AMG.

Usage: python scripts/bench_amg_poisson3d.py [--n 101] [--solver amg] [--tol 1e-8] [--out bench_amg_poisson3d.json]

Problem: -div(exp(p) grad u) = 1 in the unit cube, u = 0 on the boundary, P1
tetrahedra of ``unit_cube(n)`` (6 n^3 cells), boundary nodes condensed out, so
the state has (n - 1)^3 unknowns (n = 101: 1,000,000). One parameter per cell,
A(p) = sum_e exp(p_e) K_e (``ElementCoefficientMatrix``), objective
``SquaredMisfit(d)`` with smooth data d on the free nodes, at a smooth p
(contrast e^{+-0.5}). The script runs ``J.value(p)`` then ``J.gradient(p)``
once, with ``AMGSolver(tol)`` by default (``--solver superlu`` for small n).

Every phase is timed, with the resident memory after it and the peak
resident memory during it (VmHWM, reset between phases through
/proc/self/clear_refs where the kernel allows it). The phases inside
``value``/``gradient`` (assembly, AMG setup, forward / adjoint solve,
gradient contraction) are timed by wrapping the methods of this script's own
objects, so the library runs its normal code path. Numba kernels are compiled
(or loaded from the cache) in a warm-up on a tiny mesh first, reported apart.

Reading the result: "hierarchies" must be 1 (A is symmetric, so the adjoint
solve reuses the forward hierarchy); the relative residuals ||A u - b||/||b||
and ||A^T lam - g||/||g|| are recomputed here and must be <= tol; "peak" is
the process's peak resident memory. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from contextlib import contextmanager

import numpy as np
from _bench_common import _status_kib, loadavg, machine_info, reset_peak, write_json  # noqa: E402  (the script's own folder)

import adjopt
from adjopt import fem, mesh
from adjopt.solvers import AMGSolver, is_symmetric, make_solver

GiB = 2.0**30


def _maxrss_kib() -> int:
    """Peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _gib(kib) -> float | None:
    return None if kib is None else kib * 1024 / GiB


class Meter:
    """Sequential phases: wall time, RSS after, peak RSS during (VmHWM reset per phase), overall peak.

    Resetting VmHWM (``echo 5 > /proc/self/clear_refs``) also resets ru_maxrss,
    so the overall peak is kept here as the maximum over all readings.
    """

    def __init__(self):
        self.rows: list[dict] = []
        self.peak_kib = _maxrss_kib()
        self.can_reset = reset_peak()

    def _peak_since_reset(self) -> int:
        hwm = _status_kib("VmHWM")
        return max(_maxrss_kib(), hwm or 0)

    def _start(self) -> None:
        self.peak_kib = max(self.peak_kib, self._peak_since_reset())
        if self.can_reset:
            reset_peak()

    @contextmanager
    def phase(self, name: str, **extra):
        self._start()
        t0 = time.perf_counter()
        row = dict(phase=name, seconds=0.0, **extra)
        self.rows.append(row)
        try:
            yield row
        finally:
            row["seconds"] = time.perf_counter() - t0
            phase_peak = self._peak_since_reset()
            self.peak_kib = max(self.peak_kib, phase_peak)
            row["rss_after_GiB"] = _gib(_status_kib("VmRSS"))
            # without a reset the high-water mark is that of the whole run so far, not of this phase
            row["phase_peak_GiB"] = _gib(phase_peak) if self.can_reset else None

    def overall_peak_gib(self) -> float:
        self.peak_kib = max(self.peak_kib, self._peak_since_reset())
        return _gib(self.peak_kib)


def cell_centers(msh) -> np.ndarray:
    """Vertex averages of the cells, (E, 3), without the (E, 4, 3) temporary of ``points[cells]``."""
    c = np.zeros((msh.n_cells, msh.dim))
    for a in range(msh.nodes_per_cell):
        c += msh.points[msh.cells[:, a]]
    c /= msh.nodes_per_cell
    return c


def smooth_parameter(x: np.ndarray) -> np.ndarray:
    """p(x) = 0.5 sin(2 pi x) cos(pi y) (1 - z) + 0.1: contrast exp(p) in [e^-0.4, e^0.6]."""
    return 0.5 * np.sin(2 * np.pi * x[:, 0]) * np.cos(np.pi * x[:, 1]) * (1.0 - x[:, 2]) + 0.1


def smooth_data(x: np.ndarray) -> np.ndarray:
    """d(x) = 0.05 sin(pi x) sin(pi y) sin(pi z) (about the size of u; max u ~ 0.056 for exp(p) = 1)."""
    return 0.05 * np.sin(np.pi * x[:, 0]) * np.sin(np.pi * x[:, 1]) * np.sin(np.pi * x[:, 2])


def make_linear_solver(name: str, tol: float, maxiter: int):
    if name.lower() == "amg":
        return AMGSolver(tol=tol, maxiter=maxiter)
    return make_solver(name)


def build(n: int, meter: Meter | None = None):
    """Mesh, local matrices, dof map, load, data, p and the ElementCoefficientMatrix; mesh freed at the end."""
    meter = meter or Meter()
    with meter.phase("mesh generation") as row:
        msh = mesh.unit_cube(n)
        row.update(nodes=int(msh.n_nodes), cells=int(msh.n_cells))
    with meter.phase("local element matrices") as row:
        local = fem.p1_stiffness(msh)
        row.update(nbytes=int(local.nbytes))
    with meter.phase("dof map, load, data, p") as row:
        dofs = fem.condense(msh.n_nodes, msh.boundary("all"))
        conn = dofs.restrict(msh.cells)
        b = dofs.restrict_vector(fem.body_force(msh, 1.0))
        d = smooth_data(msh.points[dofs.free])
        p = smooth_parameter(cell_centers(msh))
        row.update(free_dofs=int(dofs.n_free))
    with meter.phase("ElementCoefficientMatrix (pattern)") as row:
        A = adjopt.ElementCoefficientMatrix(conn, local, "exp", n=dofs.n_free)
        slot_bytes = A._slot_ptr.nbytes + A._slot_elem.nbytes + A._slot_loc.nbytes
        row.update(nnz=int(A.nnz), slot_map_bytes=int(slot_bytes), local_bytes=int(A.local.nbytes),
                   conn_bytes=int(A.conn.nbytes))
    sizes = dict(n=n, nodes=int(msh.n_nodes), cells=int(msh.n_cells), free_dofs=int(dofs.n_free), nnz=int(A.nnz))
    with meter.phase("free mesh temporaries"):
        # A keeps its own int32 connectivity and the local matrices; the mesh, the restricted
        # int64 connectivity and the dof map are not needed any more
        del msh, conn, dofs, local
        gc.collect()
    return A, b, d, p, sizes


def instrument(J, meter: Meter, captured: dict) -> None:
    """Time assembly, AMG setup, the solves and the contraction inside J.value / J.gradient.

    Wraps methods of this run's own matrix and solver instances (instance
    attributes), so the library code path is unchanged.
    """
    matrix, solver = J.matrix, J.solver
    assemble, factorize, contract = matrix.assemble, solver.factorize, matrix.contract

    def timed_assemble(rho):
        with meter.phase("assembly of A(p) (values)"):
            return assemble(rho)

    def timed_factorize(A):
        with meter.phase("AMG setup" if isinstance(solver, AMGSolver) else "factorization") as row:
            fac = factorize(A)
            levels = getattr(getattr(fac, "_ml", None), "levels", None)
            if levels is not None:
                ml = fac._ml
                row.update(levels=len(levels), operator_complexity=float(ml.operator_complexity()),
                           grid_complexity=float(ml.grid_complexity()),
                           level_sizes=[int(lv.A.shape[0]) for lv in levels])
            row.update(factor_nnz=int(getattr(fac, "factor_nnz", 0)))
        captured["A"] = A
        solve = fac.solve

        def timed_solve(rhs, transpose=False, kind="other", tol=None):
            before = solver.stats.iterations[kind]
            with meter.phase(f"{kind} solve") as srow:
                x = solve(rhs, transpose=transpose, kind=kind, tol=tol)
            srow["iterations"] = int(solver.stats.iterations[kind] - before)
            return x

        fac.solve = timed_solve
        return fac

    def timed_contract(p, w, z):
        with meter.phase("gradient contraction"):
            return contract(p, w, z)

    matrix.assemble = timed_assemble
    solver.factorize = timed_factorize
    matrix.contract = timed_contract


def run(n: int, solver_name: str, tol: float, maxiter: int) -> dict:
    t_start = time.perf_counter()
    meter = Meter()
    A, b, d, p, sizes = build(n, meter)
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(d), solver=make_linear_solver(solver_name, tol, maxiter))
    captured: dict = {}
    instrument(J, meter, captured)

    rows_before = len(meter.rows)
    t0 = time.perf_counter()
    value = J.value(p)
    t_value = time.perf_counter() - t0
    inner_value = sum(r["seconds"] for r in meter.rows[rows_before:])
    meter.rows.append(dict(phase="value: rest (b, checks, objective)", seconds=t_value - inner_value))

    rows_before = len(meter.rows)
    t0 = time.perf_counter()
    grad = J.gradient(p)
    t_grad = time.perf_counter() - t0
    inner_grad = sum(r["seconds"] for r in meter.rows[rows_before:])
    meter.rows.append(dict(phase="gradient: rest (df/du, checks)", seconds=t_grad - inner_grad))
    peak = meter.overall_peak_gib()
    total = time.perf_counter() - t_start

    # checks, after the measurement (they allocate a few vectors and one symmetry test)
    Ah = captured["A"]
    u, lam = np.asarray(J.state(p)), np.asarray(J.adjoint(p))
    g = J.objective.grad_u(u, p)
    res_fwd = float(np.linalg.norm(Ah @ u - b) / np.linalg.norm(b))
    res_adj = float(np.linalg.norm(Ah.T @ lam - g) / np.linalg.norm(g))
    t0 = time.perf_counter()
    symmetric = is_symmetric(Ah)
    t_sym = time.perf_counter() - t0

    st = J.stats
    return dict(
        **sizes, solver=solver_name, tol=tol,
        value=value, gradient_norm=float(np.linalg.norm(grad)),
        phases=meter.rows,
        value_s=t_value, gradient_s=t_grad, value_gradient_s=t_value + t_grad, total_s=total,
        iterations={k: int(v) for k, v in st.iterations.items()},
        hierarchies=int(st.factorizations + st.transpose_factorizations),
        factorizations=int(st.factorizations), transpose_factorizations=int(st.transpose_factorizations),
        setup_s_stats=float(st.factorization_time), symmetry_check_s=t_sym, symmetric=bool(symmetric),
        factor_nnz=int(st.factor_nnz),
        residual_forward=res_fwd, residual_adjoint=res_adj,
        peak_GiB=peak, phase_peaks=meter.can_reset,
        cache=dict(entries=len(J.cache), nbytes=int(J.cache.nbytes), hits=int(J.cache.hits),
                   misses=int(J.cache.misses)),
    )


def warm_up() -> float:
    """Compile / load the numba kernels and import pyamg on a tiny problem (kept out of the phases)."""
    t0 = time.perf_counter()
    A, b, d, p, _ = build(3)
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(d), solver=AMGSolver(tol=1e-8))
    J.gradient(p)
    return time.perf_counter() - t0


def print_table(r: dict) -> None:
    print(f"3D P1 Poisson, unit_cube({r['n']}): {r['cells']} tets, {r['free_dofs']} unknowns, nnz(A) = {r['nnz']}, "
          f"solver {r['solver']} (tol {r['tol']:g})")
    print(f"{'phase':<38} {'wall s':>9} {'RSS after GiB':>14} {'phase peak GiB':>15} {'its':>5}")
    for row in r["phases"]:
        rss = row.get("rss_after_GiB")
        pk = row.get("phase_peak_GiB")
        its = row.get("iterations")
        print(f"{row['phase']:<38} {row['seconds']:>9.3f} {'' if rss is None else f'{rss:.2f}':>14} "
              f"{'' if pk is None else f'{pk:.2f}':>15} {'' if its is None else its:>5}")
    print(f"{'value + gradient':<38} {r['value_gradient_s']:>9.3f}")
    print(f"{'total (without warm-up)':<38} {r['total_s']:>9.3f}")
    print(f"JIT warm-up (not in the total): {r['warmup_s']:.2f} s")
    its = ", ".join(f"{k} {v}" for k, v in r["iterations"].items()) or "none (direct)"
    print(f"Krylov iterations: {its}; hierarchies built: {r['hierarchies']} "
          f"({r['factorizations']} of A, {r['transpose_factorizations']} of A^T)")
    print(f"relative residuals: forward {r['residual_forward']:.2e}, adjoint {r['residual_adjoint']:.2e}")
    print(f"J = {r['value']:.10e}, |grad J| = {r['gradient_norm']:.6e}")
    print(f"peak memory: {r['peak_GiB']:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=101, help="cells per side; (n-1)^3 unknowns (default 101: 1e6)")
    ap.add_argument("--solver", default="amg", help="'amg' (AMGSolver(tol)) or a name for adjopt.solvers.make_solver")
    ap.add_argument("--tol", type=float, default=1e-8, help="relative tolerance of every AMG solve")
    ap.add_argument("--maxiter", type=int, default=500, help="Krylov iterations per solve (AMG)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the JIT warm-up on a tiny mesh")
    ap.add_argument("--out", default="bench_amg_poisson3d.json")
    args = ap.parse_args()
    if args.n < 2:
        ap.error("--n must be >= 2 (at least one interior node)")
    load_before = loadavg()  # other processes on the machine skew the timings; recorded in the JSON
    warmup = 0.0 if args.no_warmup else warm_up()
    gc.collect()
    r = run(args.n, args.solver, args.tol, args.maxiter)
    r["warmup_s"] = warmup
    print_table(r)
    info = machine_info(loadavg_before=load_before, loadavg_after=loadavg())
    write_json(args.out, dict(info=info, result=r))
    print(f"wrote {args.out}")



if __name__ == "__main__":
    main()
