"""Topology optimization beyond the 88-line code: seconds per MMA design iteration, and the share of each phase.

Usage: python scripts/bench_topology_extended.py [--cases robust_mbb cantilever3d mbb3d] [--iters 10]
       [--size robust_mbb=600x200] [--size cantilever3d=120x60x60] [--size mbb3d=144x48x48]
       [--out scripts/results/bench_topology_extended.json]

Cases
-----
``robust_mbb``
    ``problems/topology_robust.py``: ``build(nelx, nely, case="mbb",
    formulation="minmax")`` (default 600 x 200): the eroded, intermediate and
    dilated designs of one field, each its own ReducedFunctional on one shared
    solver ("auto": geometric multigrid at this size), the min-max in the bound
    formulation, run by ``minimize(problem, "mma", move=0.1, maxiter=iters,
    gtol=0, xtol=0)``.
``cantilever3d``
    ``problems/topology_compliance.py``: ``build("cantilever3d", nelx, nely,
    nelz)`` (default 120 x 60 x 60, 3 * 121 * 61 * 61 = 1,350,723 dofs; "auto":
    geometric multigrid), by ``minimize(problem, "mma", maxiter=iters, gtol=0,
    xtol=0)``.
``mbb3d``
    ``problems/topology_compliance.py``: ``build("mbb3d", nelx, nely, nelz)``
    (default 144 x 48 x 48, 3 * 145 * 49 * 49 = 1,044,435 dofs: the 3D half
    MBB beam; "auto": geometric multigrid), by ``minimize(problem, "mma",
    maxiter=iters, gtol=0, xtol=0)``. Not in the default ``--cases``.

``--size CASE=NXxNY[xNZ]`` replaces a case's size (quick tests).

What is measured, per case
--------------------------
* ``build_s``: the seconds of ``build()`` (for robust_mbb it evaluates the
  three compliances at p0 for the min-max scales: three solver setups and
  solves). Before it, the same case is built and run for 2 iterations at a tiny
  size with ``solver="gmg"`` (``warmup_s``) so that JIT compilation (numba's
  on-disk cache loading included) is in neither build_s nor the iterations.
* Seconds per design iteration: the history entries' ``time`` (iteration k's
  wall seconds), median and mean over iterations 2..N (iteration 1 is the
  warm-up; with N = 1 it is the only one and ``timed_includes_warmup`` says
  so).
* Phases: seconds by phase filter, assembly, factorize, solve, sensitivity
  (``ReducedFunctional.times``) and update (the rest: the MMA subproblem and
  the driver's book-keeping). ``history_phases``: the medians of the history
  entries' own ``phases`` (the library's: ``problem.functional.times``, for
  the min-max objective of robust_mbb the three designs' summed).
  ``phases`` are also measured here, for both cases, at the callback:
  the change of the ``times`` of the reduced functionals (robust_mbb: the
  three designs', summed; cantilever3d: the problem's) and the wall time
  between consecutive callbacks; update = wall - the rest.
  ``phases.median_s``: median seconds per phase; ``phases.share``: the
  phase's seconds over the iterations' seconds (iterations 2..N summed: the
  shares add up to 1); ``phases.share_of_median``: median phase / median
  iteration. ``update_share``: the MMA update's share.
* Counts: ``factorizations_per_iter`` and ``solves_per_iter`` are
  ``result.factorizations / nit`` and ``result.solves / nit`` (they include
  the run's start, which evaluates the functionals at p0 once more: for
  robust_mbb the continuation's reset drops the states build() cached);
  ``steady`` holds the median per-iteration counts over iterations 2..N from
  the solver statistics (factorizations = multigrid hierarchy setups for
  GMG, solves, CG iterations per solve: None for a direct solver). robust_mbb also records the shared
  solver's own ``stats`` (``meta["functionals"]["eroded"].stats``) after the
  run and whether the three designs do share one solver.
* ``objective_start`` / ``objective_end``: f of history[0] and of the
  result (robust_mbb: z = max_k c_k / c_k(p0), so 1 at the start; its three
  compliances at the start and the end are in ``compliances``).
* ``free_dofs``, ``design_variables`` (the optimizer's parameters: the
  elements, and z for the min-max), ``elements``.
* ``peak_rss_GiB``: ``ru_maxrss`` after the case; ``case_peak_GiB``: VmHWM
  since the start of the case's build (reset by /proc/self/clear_refs where
  allowed, else None). On Linux that reset lowers ``ru_maxrss`` too, so both
  are the case's own peak where the reset works (``peak_reset``), else the
  process's peak so far.
* ``loadavg_before`` / ``loadavg_after``: ``os.getloadavg()`` around the case
  (other work on the machine skews the timings).

Output: a table on stdout and the JSON ``--out`` (written atomically after every
case, ``"complete": false`` until the end; ``info``: ``machine_info`` and
``blas_info`` of scripts/_bench_common.py). Exit status 2 on bad arguments
(nothing written), 1 when a case failed (its error recorded), else 0.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import traceback
from collections import Counter

import numpy as np
from _bench_common import blas_info, fmt, loadavg, machine_info, median, peak_rss_gib, release_memory, reset_peak, table, write_json
from bench_topology import parse_size, size_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))

import topology_compliance as tc  # noqa: E402
import topology_robust as tr  # noqa: E402

import adjopt  # noqa: E402
from adjopt.optimize import minimize  # noqa: E402

CASES = ("robust_mbb", "cantilever3d", "mbb3d")
DEFAULT_CASES = ("robust_mbb", "cantilever3d")
DEFAULT_SIZES = {"robust_mbb": (600, 200), "cantilever3d": (120, 60, 60), "mbb3d": (144, 48, 48)}
#: tiny sizes of the JIT warm-up (solver "gmg": the multigrid kernels are compiled too)
WARMUP_SIZES = {"robust_mbb": (32, 16), "cantilever3d": (8, 4, 4), "mbb3d": (8, 4, 4)}
PHASES = ("filter", "assembly", "factorize", "solve", "sensitivity", "update")
DEFAULT_OUT = os.path.join(ROOT, "scripts", "results", "bench_topology_extended.json")


# =====================================================================================================
# the cases
# =====================================================================================================
def build_case(case: str, size: tuple, solver=None):
    if case == "robust_mbb":
        nelx, nely = size
        return tr.build(nelx=nelx, nely=nely, case="mbb", formulation="minmax", solver=solver)
    nelx, nely, nelz = size
    return tc.build(case, nelx=nelx, nely=nely, nelz=nelz, solver=solver)


def mma_options(case: str, iters: int) -> dict:
    opts = dict(maxiter=iters, gtol=0.0, xtol=0.0)
    if case == "robust_mbb":
        opts["move"] = 0.1
    return opts


def functionals_of(problem) -> list:
    """The reduced functionals whose ``times`` make up an iteration: the three designs of the min-max, or the
    problem's own functional."""
    fs = problem.meta.get("functionals")
    return list(fs.values()) if fs else [problem.functional]


def solver_of(problem):
    return functionals_of(problem)[0].solver


def warmup(case: str) -> float:
    """Build and run ``case`` for 2 iterations at a tiny size with GMG; its seconds (errors are the measured
    run's to report)."""
    t0 = time.perf_counter()
    try:
        problem = build_case(case, WARMUP_SIZES[case], solver="gmg")
        minimize(problem, "mma", **mma_options(case, 2))
    except Exception:  # noqa: BLE001
        pass
    return time.perf_counter() - t0


# =====================================================================================================
# measurement
# =====================================================================================================
class Marks:
    """Snapshots at the start and at every callback: wall clock, the functionals' phase seconds, solver counts."""

    def __init__(self, problem):
        self.functionals = functionals_of(problem)
        stats = {id(f.stats): f.stats for f in self.functionals}  # a shared solver: its counts once
        self.stats = list(stats.values())
        self.rows = [self.snapshot()]

    def snapshot(self) -> dict:
        times = Counter()
        for f in self.functionals:
            times.update(f.times)
        s = self.stats
        return dict(t=time.perf_counter(), times=dict(times),
                    factorizations=sum(x.factorizations for x in s), solves=sum(x.total_solves for x in s),
                    cg=sum(sum(x.iterations.values()) for x in s))

    def __call__(self, info):
        self.rows.append(self.snapshot())

    def iterations(self) -> list[dict]:
        """Per iteration 1..nit: wall seconds, phase seconds (update = the rest), counts."""
        out = []
        for a, b in zip(self.rows, self.rows[1:]):
            wall = b["t"] - a["t"]
            ph = {k: b["times"].get(k, 0.0) - a["times"].get(k, 0.0) for k in PHASES[:-1]}
            ph["update"] = max(wall - sum(ph.values()), 0.0)
            out.append(dict(wall=wall, phases=ph, factorizations=b["factorizations"] - a["factorizations"],
                            solves=b["solves"] - a["solves"], cg=b["cg"] - a["cg"]))
        return out


def phase_summary(per_iter: list[dict]) -> dict:
    """median_s, share (summed seconds / summed wall: adds up to 1) and share_of_median of each phase."""
    med = {k: median([it["phases"][k] for it in per_iter]) for k in PHASES}
    total = sum(it["wall"] for it in per_iter)
    share = {k: sum(it["phases"][k] for it in per_iter) / total if total > 0 else None for k in PHASES}
    mwall = median([it["wall"] for it in per_iter])
    return dict(median_s=med, share=share, share_of_median={k: (med[k] / mwall if mwall else None) for k in PHASES},
                median_wall_s=mwall)


def history_phase_medians(entries: list[dict]) -> dict:
    keys = []
    for e in entries:
        for k in e.get("phases") or {}:
            if k not in keys:
                keys.append(k)
    return {k: median([e["phases"].get(k, 0.0) for e in entries if e.get("phases") is not None]) for k in keys}


def ru_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2.0**20  # KiB on Linux


def measure(case: str, size: tuple, iters: int) -> dict:
    rec = dict(case=case, size=size_name(size), status="ok", iters=iters)
    release_memory()
    can_reset = reset_peak()
    rec["loadavg_before"] = loadavg()
    rec["peak_reset"] = can_reset
    rec["warmup_s"] = warmup(case)
    release_memory()
    if can_reset:
        reset_peak()
    try:
        t0 = time.perf_counter()
        problem = build_case(case, size)
        rec["build_s"] = time.perf_counter() - t0
        meta = problem.meta
        solver = solver_of(problem)
        rec.update(elements=int(meta["mesh"].n_cells), free_dofs=int(meta["dofmap"].n_free),
                   design_variables=int(np.asarray(problem.p0).size), solver=type(solver).__name__,
                   solver_levels=len(getattr(solver, "levels", ())) or None)
        marks = Marks(problem)
        t0 = time.perf_counter()
        res = minimize(problem, "mma", callback=marks, **mma_options(case, iters))
        rec["run_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 (MemoryError included): recorded, the benchmark goes on
        traceback.print_exc()
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        rec.update(peak_rss_GiB=ru_maxrss_gib(), case_peak_GiB=peak_rss_gib() if can_reset else None,
                   loadavg_after=loadavg())
        return rec

    nit = res.nit
    hist = res.history  # [0] the start, [k] iteration k
    timed = slice(2, None) if nit >= 2 else slice(1, None)
    entries = hist[timed]
    times = [float(e["time"]) for e in entries]
    per_iter = marks.iterations()  # [k - 1] is iteration k
    per_timed = per_iter[timed.start - 1:]
    rec.update(
        nit=nit, iterations_timed=len(times), timed_includes_warmup=nit < 2, message=res.message,
        iter_times=[float(e["time"]) for e in hist[1:]],
        s_per_iter_median=median(times), s_per_iter_mean=float(np.mean(times)) if times else None,
        phases=dict(source="callback: the reduced functionals' times" +
                    (" (the three designs, summed)" if "functionals" in meta else ""), **phase_summary(per_timed)),
        history_phases=history_phase_medians(entries),
        factorizations=int(res.factorizations), solves=int(res.solves),
        factorizations_per_iter=res.factorizations / nit if nit else None,
        solves_per_iter=res.solves / nit if nit else None,
        steady=dict(factorizations_per_iter=median([it["factorizations"] for it in per_timed]),
                    solves_per_iter=median([it["solves"] for it in per_timed]),
                    cg_iterations_per_solve=median([it["cg"] / it["solves"] for it in per_timed if it["solves"]])
                    if any(it["cg"] for it in per_timed) else None),
        nfev=int(res.nfev), njev=int(res.njev),
        objective_start=float(hist[0]["f"]), objective_end=float(res.fun),
    )
    rec["update_share"] = rec["phases"]["share"]["update"]
    if "functionals" in meta:  # robust_mbb: the shared solver and the three compliances
        fs = meta["functionals"]
        rec["shared_solver"] = len({id(f.solver) for f in fs.values()}) == 1
        rec["stats"] = fs["eroded"].stats.as_dict()
        x = np.asarray(meta["minmax"]["design"](res.x))
        rec["compliances"] = dict(start=dict(zip(fs, map(float, meta["minmax"]["scales"]))),
                                  end={k: float(f.value(x)) for k, f in fs.items()})
        rec["grey_end"] = hist[-1].get("grey")
    rec.update(peak_rss_GiB=ru_maxrss_gib(), case_peak_GiB=peak_rss_gib() if can_reset else None,
               loadavg_after=loadavg())
    del problem, res, marks
    release_memory()
    return rec


# =====================================================================================================
def parse_sizes(items: list[str], ap) -> dict:
    sizes = {}
    for item in items:
        case, sep, text = item.partition("=")
        if not sep:
            ap.error(f"--size {item!r} must be CASE=SIZE, e.g. robust_mbb=60x20 or cantilever3d=8x4x4")
        if case not in CASES:
            ap.error(f"--size {item!r}: unknown case {case!r}; known cases: {', '.join(CASES)}")
        try:
            sizes[case] = parse_size(text, len(DEFAULT_SIZES[case]))
        except argparse.ArgumentTypeError as exc:
            ap.error(f"--size {item!r}: {exc}")
    return sizes


def report(cases: dict) -> str:
    rows = []
    for name, r in cases.items():
        if r["status"] != "ok":
            rows.append([name, r["size"], "-", fmt(r.get("build_s")), "-", "-", *["-"] * len(PHASES), "-", "-",
                         fmt(r.get("peak_rss_GiB")), "-", "-", r["status"]])
            continue
        share = r["phases"]["share"]
        la = r.get("loadavg_before") or [None]
        lb = r.get("loadavg_after") or [None]
        rows.append([name, r["size"], r["free_dofs"], fmt(r["build_s"]), fmt(r["s_per_iter_median"], ".4g"),
                     fmt(r["s_per_iter_mean"], ".4g"), *(fmt(100 * share[k], ".1f") for k in PHASES),
                     fmt(r["solves_per_iter"]), fmt(r["steady"]["solves_per_iter"]), fmt(r["peak_rss_GiB"]),
                     fmt(la[0]), fmt(lb[0]), r["status"]])
    return table(rows, ["case", "size", "free dofs", "build s", "s/iter med", "s/iter mean",
                        *(f"{k[:6]} %" for k in PHASES), "solves/it", "steady", "peak GiB", "load1 pre",
                        "load1 post", "status"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="CASE",
                    help=f"of {', '.join(CASES)} (default: {', '.join(DEFAULT_CASES)})")
    ap.add_argument("--iters", type=int, default=10, help="MMA design iterations (the first is the warm-up)")
    ap.add_argument("--size", action="append", default=[], metavar="CASE=SIZE",
                    help="a case's size, e.g. robust_mbb=60x20 or cantilever3d=8x4x4 (repeatable)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {', '.join(map(repr, bad))}; known cases: {', '.join(CASES)}")
    if args.iters < 1:
        ap.error(f"--iters must be >= 1, got {args.iters}")
    sizes = {**DEFAULT_SIZES, **parse_sizes(args.size, ap)}
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.error(f"--out {args.out!r}: its folder does not exist")
    cases = list(dict.fromkeys(args.cases))

    data = dict(info=machine_info(adjopt=getattr(adjopt, "__version__", None), **blas_info()),
                config=dict(cases=cases, sizes={c: size_name(sizes[c]) for c in cases}, iters=args.iters,
                            timed_iterations="2..N", method="mma", options={c: mma_options(c, args.iters)
                                                                            for c in cases},
                            solver="auto", warmup_sizes={c: size_name(WARMUP_SIZES[c]) for c in cases}),
                complete=False, cases={}, errors=[])
    print(f"BLAS: {[(p.get('internal_api'), p.get('num_threads')) for p in data['info']['threadpools']]}, "
          f"numba threads {data['info']['threads']}", flush=True)
    t_all = time.perf_counter()
    write_json(args.out, data)
    for case in cases:
        print(f"\n{case} {size_name(sizes[case])}: build, then {args.iters} MMA iterations", flush=True)
        rec = measure(case, sizes[case], args.iters)
        data["cases"][case] = rec
        if rec["status"] != "ok":
            data["errors"].append(dict(case=case, reason=rec["reason"]))
        else:
            print(f"  build {rec['build_s']:.3g} s, {rec['s_per_iter_median']:.4g} s/iter (median), "
                  f"objective {rec['objective_start']:.6g} -> {rec['objective_end']:.6g}, "
                  f"peak {rec['peak_rss_GiB']:.3g} GiB", flush=True)
        write_json(args.out, data)
    data["total_s"] = time.perf_counter() - t_all
    data["complete"] = True
    write_json(args.out, data)
    print("\nseconds per MMA design iteration (iterations 2..N) and phase shares of the iteration")
    print(report(data["cases"]))
    print(f"\nwrote {args.out}")
    if data["errors"]:
        print("failed: " + "; ".join(f"{e['case']}: {e['reason']}" for e in data["errors"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
