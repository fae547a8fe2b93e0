"""adjopt against pyMOTO on the same problem, in the same run: seconds per MMA design iteration and the objective.

Usage: python scripts/bench_pymoto.py [--cases mechanism eigen robust stress] [--iters 100] [--size NX NY]
       [--pymoto-python /work/pymoto_ref/venv/bin/python] [--pymoto-examples DIR]
       [--out scripts/results/bench_pymoto.json] [--no-pymoto]

Benchmarks on the development machine are run as
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_pymoto.py ...``;
the pyMOTO subprocess inherits the environment.

pyMOTO (https://github.com/aatmdelissen/pyMOTO) is not a dependency of
adjopt: it lives in a Python environment of its own, given by
``--pymoto-python`` (default /work/pymoto_ref/venv/bin/python, pymoto 2.0.1
from PyPI). Its side runs as a subprocess of that interpreter with a small
runner that this script writes to a temporary folder; the example files come
from ``--pymoto-examples DIR`` (default /work/pymoto_ref/examples_orig), the
folder examples/topology_optimization of pyMOTO v2.0.1:
``git clone https://github.com/aatmdelissen/pyMOTO --branch v2.0.1``.

Cases (``CASES``; each is adjopt's build keyword arguments, the method and its
options, the pyMOTO example file and how to turn pyMOTO's scaled responses
back into adjopt's unscaled values):

* ``mechanism``: ``problems/topology_mechanism.py``, ``build()`` with its
  defaults, which are the settings of pyMOTO's
  ``ex_compliant_mechanism_springs.py`` (80 x 80 unit Q4 elements, plane
  strain, E 100, nu 0.3, springs 5 (input) and 15 (output), density filter r 2,
  volume fraction 0.3 on the filtered density, 4 x 4 solid non-design squares
  at the input and the output, SIMP p 3 with Emin 1e-6 E). The objective is
  the output displacement u_out; pyMOTO minimises ``g0 = 10 u_out / |u_out(x0)|``
  (``Scaling(scaling=10)``, whose factor ``sf = 10 / |u_out(x0)|`` the runner
  reads, so ``u_out = g0 / sf``) subject to ``g1 = 10 (V / (0.3 nel) - 1) <= 0``
  (so the filtered volume fraction is ``0.3 (1 + g1 / 10)``).
* ``eigen``: ``problems/topology_eigen.py``, ``build()`` with its defaults,
  the settings of pyMOTO's ``ex_eigenfrequency.py`` (50 x 30, aluminium
  E 68.9e9, nu 0.3, density 2700, plane strain, Emin 1e-9 E, density filter
  r 2, a solid mass block set to 1 after the filter, Du-Olhoff two-range mass
  interpolation, the left edge clamped). The objective is
  ``J = 1/l1 + 1/l2 + 1/l3`` of the three lowest eigenvalues; pyMOTO
  minimises ``g0 = 100 J / J(x0)`` (``Scaling(scaling=100)``, ``J = g0 / sf``)
  subject to ``g1 = 10 (V / nel - 0.5) <= 0`` (a ``MathExpression``; the
  volume fraction of the filtered design with the block is ``0.5 + g1 / 10``).
  Also recorded: the eigenvalues of the final design on both sides (adjopt:
  ``problem.functional.eigenvalues(x_N)``, which has k + 1 = 4 of them, the
  fourth for its multiplicity check; pyMOTO: the output of its
  ``EigenSolve`` module, 3 modes, at every step and at x_N) and the lowest
  angular frequency ``omega1 = sqrt(l1)`` in rad/s. pyMOTO's size line is
  ``nx, ny, nz = 50, 30, 0``.
* ``robust``: ``problems/topology_robust.py``,
  ``build(formulation="eroded", continuation="pymoto", beta=1e-3,
  beta_max=40)``, the settings of pyMOTO's ``ex_compliance_robust.py``
  (100 x 40, E 1, nu 0.3, plane strain, Emin 1e-5, density filter r 5 with
  zero padding away from the support, projections at eta 0.6 / 0.5 / 0.4,
  its linear beta schedule: 1e-3 up to step 15, then a rise every 5 steps to
  40 from step 91). The objective is the compliance of the eroded design;
  pyMOTO minimises ``g0 = 100 c / c(x0)`` (``c = g0 / sf``) subject to
  ``g1 = 10 (sum(x_nominal) - 0.5 nel) / (0.5 nel) <= 0`` (the volume fraction
  of the nominal design is ``0.5 (1 + g1 / 10)``). pyMOTO's hand-written
  element matrix there is the plane-strain Q4 with the two displacement
  components of each node swapped and its "x" load is therefore a transverse
  load (/work/pymoto_ref/REPORT.md, section 2): the same problem, the same
  c(x0) = 676.4306. The example's own call has ``maxit=120``; the runner
  overrides it like the other stopping arguments (``kwargs_in_example``
  records the example's values). Also recorded: the beta of every analysis on
  both sides (adjopt: ``problem.continuation.schedule(k)`` for x_k, k = 0..N;
  pyMOTO: the output of its ``Continuation`` module at every step and at
  x_N). Where beta changes (k = 16, 21, ..., 91) adjopt analyses x_k twice:
  at the old beta for its history entry (so history[k]["f"] is
  f(x_k; beta_{k-1})) and again at the new one, from which MMA takes its next
  step, as pyMOTO does with the new beta alone; those 16 iterations hold two
  factorizations. pyMOTO's size line is ``nx, ny = 100, 40``.
* ``stress``: ``problems/topology_stress.py``, ``build(shear_scale=2.0)``,
  the settings of pyMOTO's ``ex_volume_stress.py`` (50 x 100, E 1, nu 0.3,
  plane strain, Emin 1e-9, density filter r 2, the left edge clamped, a unit
  upward load at the right edge's middle node, a uniform start at 1, the
  von Mises stress of each element centre relaxed by the filtered density and
  P-mean aggregated, P 10, sigma_max 0.4; ``shear_scale=2`` because pyMOTO
  2.0.1's ``Stress`` module doubles the shear stress). The objective is the
  volume fraction (mean of the filtered density) subject to the stress
  aggregate ``<= 0`` and the compliance ``f.u <= 20``. pyMOTO minimises
  ``g0 = 100 V / V(x0)`` (``Scaling(scaling=100)`` of ``sum(x_filt)``;
  ``V(x0) = nel`` at the start 1, so the volume fraction is ``g0 / 100``)
  subject to ``g1`` = the stress aggregate (unscaled) and
  ``g2 = 10 (u_out - 20) / 20`` (``Scaling(scaling=10, maxval=20)`` of
  ``u_out = f.u``, so the compliance is ``20 (1 + g2 / 10)``). Recorded on
  both sides: the volume fraction, the stress constraint and the compliance
  at x_0 and at x_N (``constraints``; adjopt evaluates its two constraint
  functionals at p0 and x_N after the run, untimed; pyMOTO's come from its
  responses, also at every step) and, in the comparison, their relative
  differences (the start ones must agree, ``constraints_start_agree``). The
  example's own call has ``maxit=300``; the runner overrides it. adjopt's
  functional (the volume) has no solver: its phases, factorizations and
  solves are those of the two constraint functionals (the stress aggregate
  and the compliance, which share one solver but each assemble and factorize
  K at every design), measured by a callback after every iteration
  (``phase_source``). pyMOTO's size line is ``nx, ny = 50, 100``.

How each side is run
--------------------
* adjopt: ``adjopt.optimize.minimize(problem, "mma", move=0.1, maxiter=N,
  gtol=0, xtol=0)`` (pyMOTO's MMA move limit is 0.1; no stopping test but
  maxiter). adjopt's MMA divides the objective by ``|f(x0)|`` and the volume
  constraint by its bound, pyMOTO's examples by the same and then multiply
  the objective by 10 (``mechanism``) or 100 (``eigen``, ``robust``) and the
  volume constraint by 10 (``mechanism``, ``robust``) or 5 (``eigen``:
  ``10 (V / nel - 0.5)``): the two MMAs solve differently scaled subproblems,
  not identical ones (the artificial-variable weights a0 = 1, c = 1000, d = 1
  are the same on both sides), so the iterates are close at first and then
  drift apart. ``stress``: adjopt takes the volume fraction as it is
  (``|f(x0)| = 1``), the stress aggregate unscaled (its bound is 0 and
  ``|G(x0)| < 1``) and the compliance as ``(c - 20) / 20``; pyMOTO's
  objective is 100 times that and its compliance response 10 times, the
  stress alike: the objective weighs 100 times more against the stress
  constraint in pyMOTO's subproblem, and the iterates part from the first
  step on.
* pyMOTO: the example, unmodified, as ``__main__``, with
  ``minimize_mma(..., maxit=N, tolf=0, tolx=0)`` (pyMOTO's stopping tests,
  relative change of the responses and of x below 1e-4, never hold) so that
  it takes exactly N MMA steps. As in /work/pymoto_ref/run_example.py the
  runner forces matplotlib's Agg backend (``pymoto.modules.io`` calls
  ``matplotlib.use("TkAgg")`` on import), replaces the plotting and file
  modules ``PlotDomain``, ``PlotIter``, ``WriteToVTI``, ``ScalarToFile`` by
  modules that do nothing (they have no outputs), and wraps ``MMA.step`` to
  record the responses g and the wall time of every step. ``--size NX NY``
  (for the tests: a quick run) is passed to pyMOTO by executing the example's
  source with its size line (``nx, ny = 80, 80``) replaced; the file itself is
  not changed. Without ``--size`` the source runs as it is.

Iterations are counted alike: iteration k (k = 1..N) is one MMA update and
one analysis with its sensitivities (pyMOTO's step k analyses x_{k-1} and
then updates; adjopt's iteration k updates and then analyses x_k, the start
x_0 being analysed before the loop). ``s_per_iter`` is the median of the wall
times of iterations 2..N (the first holds pyMOTO's solver choice and adjopt's
first compilations), ``s_per_iter_mean`` their mean. adjopt's phases are the
history's ``"phases"`` (filter, assembly, factorize, solve, sensitivity,
update) summed over iterations 2..N, as shares of their wall time; pyMOTO's
factorization and solve seconds are the time spent in its linear solver's
``update`` and ``solve`` (the inner solver of the LDAWrapper; for ``eigen`` the shift-invert
solver of its ``EigenSolve``), per iteration. The eigenvalue case has an
``"eigensolve"`` phase on adjopt's side (and no ``"solve"``).

Values: ``f_start`` is f(x_0) (adjopt: history[0]["f"], i.e.
``problem.functional.value(p0)``; pyMOTO: g0(x_0) / sf); they must agree
(``f_start_rel_diff``). ``f_final`` is f(x_N), the design after N updates:
adjopt's history[N]; pyMOTO evaluates x_{N-1} last, so the runner analyses
the design of its last update once more after the loop (untimed;
``f_last_evaluated_by_pymoto`` is pyMOTO's own last value). ``f_final_scaled``
is pyMOTO's scaling of it, ``s f / |f_start|`` (s = 10 for ``mechanism``,
100 for ``eigen`` and ``robust``). The final volume fraction is that of x_N
(adjopt: the constraint functional; pyMOTO: from g1 as above).
``comparison.f_history_max_abs_diff_over_f0`` is the largest difference of
f(x_k), k < N, of the two runs over |f_start| (for ``robust`` only over the k
where both analysed x_k at the same beta, ``f_history_compared`` of them).

Also recorded: the linear solver of each side (adjopt:
``type(problem.functional.solver).__name__`` and, for ``"auto"``, the backend
it chose; pyMOTO: the solver of its ``LinSolve`` modules, e.g.
``LDAWrapper(SolverSparseLU)``), the BLAS and thread pools of the adjopt
process (threadpoolctl), the BLAS libraries mapped into the pyMOTO process
and OpenBLAS's thread count there, the thread environment variables, the
machine (cpus, load average; per case also the load average before adjopt,
between the two sides and after pyMOTO, ``loadavg``) and the versions of adjopt, pyMOTO, numpy and
scipy on both sides. On a small machine with other work running the times
depend much on the BLAS threads (both MMAs and CHOLMOD use them): compare
runs at the same load, or pin ``OPENBLAS_NUM_THREADS``.

No pyMOTO (``--pymoto-python`` missing or not importing pymoto, or
``--no-pymoto``): adjopt is measured alone, the JSON says why, exit 0. Bad
input (unknown case, ``--iters`` < 1, a size the problem does not take, the
examples folder or file missing while pyMOTO is wanted, a missing output
folder): an error message, exit 2 and nothing written. A failed pyMOTO run is
recorded in the JSON with its error and the exit code is 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from _bench_common import blas_info, fmt, loadavg, machine_info, table, version, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))

import adjopt  # noqa: E402
from adjopt.optimize import minimize  # noqa: E402

DEFAULT_PYMOTO_PYTHON = "/work/pymoto_ref/venv/bin/python"
DEFAULT_PYMOTO_EXAMPLES = "/work/pymoto_ref/examples_orig"
DEFAULT_OUT = os.path.join(ROOT, "scripts", "results", "bench_pymoto.json")
PHASES = ("filter", "assembly", "factorize", "solve", "sensitivity", "update")
#: the order of adjopt's phases in the tables (a case reports those its history has)
PHASE_ORDER = ("filter", "assembly", "factorize", "solve", "eigensolve", "sensitivity", "update")
#: f(x_0) of the two sides must agree to this relative difference (the same problem)
START_RTOL = 1e-9


def _scaled_objective(g, sf):
    """pyMOTO's ``Scaling(scaling=s)`` of the objective f: g0 = sf f with sf = s / |f(x0)|."""
    return g[0] / sf


_mech_objective = _scaled_objective


def _mech_volume_fraction(g, sf):
    """pyMOTO's ``Scaling(scaling=10, maxval=volfrac nel)`` of V: g1 = 10 (V / (volfrac nel) - 1)."""
    return 0.3 * (1.0 + g[1] / 10.0)


def _eigen_volume_fraction(g, sf):
    """ex_eigenfrequency.py's ``MathExpression('10*(inp0/nel - 0.5)')`` of V: V / nel = 0.5 + g1 / 10."""
    return 0.5 + g[1] / 10.0


def _robust_volume_fraction(g, sf):
    """ex_compliance_robust.py's ``Scaling(scaling=10, maxval=0.5 nel)`` of sum(x_nominal): 0.5 (1 + g1 / 10)."""
    return 0.5 * (1.0 + g[1] / 10.0)


def _stress_volume_fraction(g, sf):
    """ex_volume_stress.py's ``Scaling(scaling=100)`` of V = sum(x_filt): g0 = 100 V / V(x0), V(x0) = nel (start 1)."""
    return g[0] / 100.0


def _per_element(raw, n_design):
    """The unscaled input of ex_volume_stress.py's objective Scaling, V = sum(x_filt), as a volume fraction."""
    return raw / n_design


def _stress_aggregate(g, sf):
    """ex_volume_stress.py's stress response: g1 is the aggregate itself (``ConstraintAggregation``, unscaled)."""
    return g[1]


def _stress_compliance(g, sf):
    """ex_volume_stress.py's ``Scaling(scaling=10, maxval=20)`` of u_out = f.u: g2 = 10 (u_out - 20) / 20."""
    return 20.0 * (1.0 + g[2] / 10.0)


def _functional_volume_fraction(problem, x):
    """(volume fraction, bound) when the volume is the objective: the functional's value, no bound."""
    return float(problem.functional.value(x)), None


def _eigen_extra(problem, x, iters) -> dict:
    """adjopt's eigenvalues at x and the lowest angular frequency (rad/s)."""
    lam = np.asarray(problem.functional.eigenvalues(x), dtype=float)
    return dict(eigenvalues_final=[float(v) for v in lam], omega1_final=float(np.sqrt(lam[0])))


def _robust_extra(problem, x, iters) -> dict:
    """adjopt's beta of the analysis of x_k, k = 0..N (the schedule; see the module docstring)."""
    cont = problem.continuation
    return dict(beta_schedule=[float(cont.schedule(k)) for k in range(iters + 1)], beta_final=float(cont.beta))


#: the benchmark cases: adjopt's problem and build kwargs, the method, pyMOTO's example and its conventions
CASES = {
    "mechanism": dict(
        problem="topology_mechanism",  # problems/<problem>.py
        build={},  # build()'s defaults are the example's settings
        size=(80, 80),  # (nelx, nely) of build() and (nx, ny) of the example
        size_kwargs=("nelx", "nely"),
        method="mma",
        options=dict(move=0.1),  # pyMOTO's MMA move limit
        pymoto_example="ex_compliant_mechanism_springs.py",
        pymoto_size_pattern=r"^nx, ny = .*$",  # the example's size line (multiline regex)
        pymoto_size_line="nx, ny = {nx}, {ny}",
        pymoto_objective=_mech_objective,  # (g, sf of response 0) -> unscaled objective
        pymoto_objective_doc="u_out = g0 / sf, sf = 10 / |u_out(x0)| (Scaling(scaling=10))",
        pymoto_volume_fraction=_mech_volume_fraction,  # (g, sf) -> filtered volume fraction
        pymoto_volume_fraction_doc="V / nel = 0.3 (1 + g1 / 10) (Scaling(scaling=10, maxval=0.3 nel))",
        pymoto_scale=10.0,  # pyMOTO's objective is pymoto_scale * f / |f(x0)|
        pymoto_record={},  # {name: pyMOTO module class}: the runner records its first output at every analysis
    ),
    "eigen": dict(
        problem="topology_eigen",
        build={},  # build()'s defaults are ex_eigenfrequency.py's settings
        size=(50, 30),
        size_kwargs=("nelx", "nely"),
        method="mma",
        options=dict(move=0.1),
        pymoto_example="ex_eigenfrequency.py",
        pymoto_size_pattern=r"^nx, ny, nz = .*$",
        pymoto_size_line="nx, ny, nz = {nx}, {ny}, 0",
        pymoto_objective=_scaled_objective,
        pymoto_objective_doc="J = 1/l1 + 1/l2 + 1/l3 = g0 / sf, sf = 100 / J(x0) (Scaling(scaling=100))",
        pymoto_volume_fraction=_eigen_volume_fraction,
        pymoto_volume_fraction_doc="V / nel = 0.5 + g1 / 10 (MathExpression '10*(inp0/nel - 0.5)')",
        pymoto_scale=100.0,
        pymoto_record={"eigenvalues": "EigenSolve"},
        adjopt_extra=_eigen_extra,  # (problem, x_N, N) -> values added to adjopt's result
    ),
    "robust": dict(
        problem="topology_robust",
        build=dict(formulation="eroded", continuation="pymoto", beta=1e-3, beta_max=40.0),
        size=(100, 40),
        size_kwargs=("nelx", "nely"),
        method="mma",
        options=dict(move=0.1),
        pymoto_example="ex_compliance_robust.py",
        pymoto_size_pattern=r"^nx, ny = .*$",
        pymoto_size_line="nx, ny = {nx}, {ny}",
        pymoto_objective=_scaled_objective,
        pymoto_objective_doc="c_eroded = g0 / sf, sf = 100 / c(x0) (Scaling(scaling=100))",
        pymoto_volume_fraction=_robust_volume_fraction,
        pymoto_volume_fraction_doc="sum(x_nominal) / nel = 0.5 (1 + g1 / 10) (Scaling(scaling=10, maxval=0.5 nel))",
        pymoto_scale=100.0,
        pymoto_record={"beta": "Continuation"},
        adjopt_extra=_robust_extra,
    ),
    "stress": dict(
        problem="topology_stress",
        build=dict(shear_scale=2.0),  # pyMOTO 2.0.1's Stress module doubles the shear stress
        size=(50, 100),
        size_kwargs=("nelx", "nely"),
        method="mma",
        options=dict(move=0.1),
        pymoto_example="ex_volume_stress.py",
        pymoto_size_pattern=r"^nx, ny = .*$",
        pymoto_size_line="nx, ny = {nx}, {ny}",
        pymoto_objective=_stress_volume_fraction,
        pymoto_objective_doc="V / nel = g0 / 100 (Scaling(scaling=100) of sum(x_filt), V(x0) = nel)",
        pymoto_raw_objective=_per_element,  # (Scaling input, n_design) -> f (default: the input itself)
        pymoto_volume_fraction=_stress_volume_fraction,
        pymoto_volume_fraction_doc="the objective: V / nel = g0 / 100",
        pymoto_scale=100.0,
        pymoto_record={},
        adjopt_volume_fraction=_functional_volume_fraction,  # (problem, x) -> (value, bound); default constraint 0
        # the constraints reported on both sides: adjopt's problem.constraints[index], pyMOTO's (g, sf) -> value and
        # the response whose Scaling input is that value (a conversion check), or None
        constraints=dict(
            stress=dict(index=0, pymoto=_stress_aggregate, pymoto_raw=None,
                        doc="the P-mean aggregate of rho_e (vm_e / 0.4 - 1) <= 0; pyMOTO: g1 (unscaled)"),
            compliance=dict(index=1, pymoto=_stress_compliance, pymoto_raw=2,
                            doc="f.u <= 20; pyMOTO: 20 (1 + g2 / 10) (Scaling(scaling=10, maxval=20) of u_out = f.u)"),
        ),
    ),
}

# ------------------------------------------------------------------------------------------------------
# The pyMOTO side: this runner is written to a temporary file and run by --pymoto-python.
RUNNER = r'''
"""Run a pyMOTO example headless for bench_pymoto.py: argv = config JSON path, result JSON path."""
import json, os, re, sys, time, traceback

cfg = json.load(open(sys.argv[1]))
result = dict(status="error")


def save():
    with open(sys.argv[2] + ".tmp", "w") as fh:
        json.dump(result, fh)
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])


try:
    os.environ["MPLBACKEND"] = "Agg"
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        matplotlib = None
    import numpy as np
    import scipy
    import pymoto as pym
    if matplotlib is not None:
        matplotlib.use("Agg", force=True)  # pymoto.modules.io asked for TkAgg
    from pymoto.common import mma as _mma
    import pymoto.solvers as _solvers
    import pymoto.routines as _routines

    class _NoOp(pym.Module):
        """Stands for the plotting / file modules: any inputs, no outputs."""
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a):
            return None

    for name in ("PlotDomain", "PlotIter", "WriteToVTI", "ScalarToFile"):
        if hasattr(pym, name):
            setattr(pym, name, _NoOp)

    # time spent in the linear solvers (the outermost update / solve call of a solver only: the LDAWrapper is
    # left out so the inner factorization counts, and nested solver calls are not counted twice)
    SOLVER = dict(update=0.0, solve=0.0, n_update=0, n_solve=0)
    depth = [0]

    def _timed(cls, meth):
        orig = cls.__dict__[meth]

        def f(self, *a, **k):
            if depth[0]:
                return orig(self, *a, **k)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return orig(self, *a, **k)
            finally:
                SOLVER[meth] += time.perf_counter() - t
                SOLVER["n_" + meth] += 1
                depth[0] -= 1
        setattr(cls, meth, f)

    def _subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from _subclasses(s)

    for cls in set(_subclasses(_solvers.LinearSolver)):
        if cls.__name__ != "LDAWrapper":
            for meth in ("update", "solve"):
                if meth in cls.__dict__:
                    _timed(cls, meth)

    REC = dict(g=[], t=[], raw=[], opt=None, xnew=None, solver_at_step=[], recorded=[])

    def _recorded(opt):
        """{name: the first output of the first module of class cfg["record"][name]} at the analysed design."""
        out = {}
        for name, cls in (cfg.get("record") or {}).items():
            for m in opt.function.mods:
                if type(m).__name__ == cls:
                    st = np.real(np.asarray(m.sig_out[0].state)).ravel()
                    out[name] = [float(v) for v in st]
                    break
            else:
                out[name] = None
        return out

    def _scalings(opt):
        """{response index: Scaling module producing it}."""
        out = {}
        for m in opt.function.mods:
            if type(m).__name__ == "Scaling":
                for i, r in enumerate(opt.responses):
                    if m.sig_out[0] is r:
                        out[i] = m
        return out

    orig_step = _mma.MMA.step

    def step(self, *a, **k):
        REC["opt"] = self
        s0 = dict(SOLVER)
        t = time.perf_counter()
        out = orig_step(self, *a, **k)
        REC["t"].append(time.perf_counter() - t)
        REC["solver_at_step"].append({k: SOLVER[k] - s0[k] for k in SOLVER})
        REC["g"].append([float(v) for v in np.asarray(out[1], dtype=float).ravel()])
        sc = _scalings(self)  # the unscaled inputs of the responses' Scaling modules, at the analysed design
        REC["raw"].append([float(np.real(np.asarray(sc[i].sig_in[0].state)).ravel()[0]) if i in sc else None
                           for i in range(len(self.responses))])
        REC["xnew"] = np.array(out[0], dtype=float, copy=True)
        REC["recorded"].append(_recorded(self))
        return out

    _mma.MMA.step = step

    CALL = {}
    orig_minimize = _routines.minimize_mma

    def minimize_mma(*a, **k):
        CALL["kwargs_in_example"] = {kk: vv for kk, vv in k.items() if isinstance(vv, (int, float, str, bool))}
        k.update(maxit=cfg["maxit"], tolf=cfg["tolf"], tolx=cfg["tolx"])
        t = time.perf_counter()
        r = orig_minimize(*a, **k)
        CALL["optimize_s"] = time.perf_counter() - t
        return r

    pym.minimize_mma = minimize_mma
    _routines.minimize_mma = minimize_mma

    path = cfg["example"]
    with open(path) as fh:
        src = fh.read()
    if cfg.get("size"):
        nx, ny = cfg["size"]
        src, n = re.subn(cfg["size_pattern"], cfg["size_line"].format(nx=nx, ny=ny), src, flags=re.M)
        if n != 1:
            raise RuntimeError(f"the size line {cfg['size_pattern']!r} occurs {n} times in {path} (need once)")
    t0 = time.perf_counter()
    env = {"__name__": "__main__", "__file__": path}
    exec(compile(src, path, "exec"), env)
    total = time.perf_counter() - t0
    opt = REC["opt"]
    if opt is None:
        raise RuntimeError("the example took no MMA step")
    sc = _scalings(opt)
    g_last = REC["g"][-1]
    # the design of the last update, which the loop does not analyse: analyse it (untimed)
    opt.x = REC["xnew"]
    t = time.perf_counter()
    g_final = [float(v) for v in np.asarray(opt.calculate_g(), dtype=float).ravel()]
    t_final = time.perf_counter() - t
    raw_final = [float(np.real(np.asarray(sc[i].sig_in[0].state)).ravel()[0]) if i in sc else None
                 for i in range(len(opt.responses))]
    recorded_final = _recorded(opt)
    solvers = []
    for m in opt.function.mods:
        if type(m).__name__ == "LinSolve":
            s = m.solver
            inner = getattr(s, "solver", None)
            solvers.append(type(s).__name__ + (f"({type(inner).__name__})" if inner is not None else ""))
        elif type(m).__name__ == "EigenSolve":  # shift-invert about sigma on the solver Ainv
            solvers.append(f"EigenSolve({type(getattr(m, 'Ainv', None)).__name__}, sigma={getattr(m, 'sigma', None)}, "
                           f"nmodes={getattr(m, 'nmodes', None)})")
    blas = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                p = line.split()[-1] if len(line.split()) >= 6 else ""
                low = os.path.basename(p).lower()
                if p.startswith("/") and low.startswith("lib") and p not in blas \
                        and any(w in low for w in ("blas", "lapack", "mkl", "gomp", "iomp")):
                    blas.append(p)
    except OSError:
        pass
    try:
        import threadpoolctl
        pools = threadpoolctl.threadpool_info()
    except Exception:
        pools = None
    blas_threads = {}  # OpenBLAS's own thread count, asked as threadpoolctl does (it is not installed there)
    import ctypes
    for p in blas:
        if "openblas" not in os.path.basename(p).lower():
            continue
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for sym in ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                    "scipy_openblas_get_num_threads64_"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                blas_threads[p] = int(fn())
                break
    result = dict(
        status="ok", pymoto=pym.__version__, numpy=np.__version__, scipy=scipy.__version__,
        python=sys.version.split()[0], cpus=os.cpu_count(), example=path, size=cfg.get("size"),
        kwargs_in_example=CALL.get("kwargs_in_example"), maxit=cfg["maxit"], tolf=cfg["tolf"], tolx=cfg["tolx"],
        steps=len(REC["g"]), g=REC["g"], raw=REC["raw"], step_times=REC["t"], solver_at_step=REC["solver_at_step"],
        g_last_evaluated=g_last, g_final=g_final, raw_final=raw_final, final_analysis_s=t_final,
        recorded=REC["recorded"], recorded_final=recorded_final,
        sf=[float(sc[i].sf) if i in sc else None for i in range(len(opt.responses))],
        response_tags=[r.tag for r in opt.responses], n_design=int(opt.n),
        mma=dict(version=getattr(opt, "mmaversion", None),
                 **{k: float(getattr(opt, k)) for k in ("move", "asyinit", "asyincr", "asydecr", "asybound",
                                                        "albefa", "a0", "cCoef", "epsimin")
                    if hasattr(opt, k) and np.ndim(getattr(opt, k)) == 0}),
        solvers=solvers, solver_seconds=SOLVER, blas_libraries=blas, blas_threads=blas_threads,
        threadpools=pools,
        thread_env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                   "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        run_s=total, optimize_s=CALL.get("optimize_s"))
except BaseException as exc:  # noqa: BLE001 - everything goes to the parent
    result = dict(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    save()
    sys.exit(1)
save()
'''


def probe_pymoto(python: str) -> tuple[str | None, str | None]:
    """(pymoto version, None) or (None, why pyMOTO is not available)."""
    if not python or not os.path.isfile(python) or not os.access(python, os.X_OK):
        return None, f"no Python interpreter at {python!r}"
    try:
        res = subprocess.run([python, "-c", "import pymoto; print(pymoto.__version__)"], capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{python} did not run: {exc}"
    if res.returncode != 0:
        return None, f"{python} cannot import pymoto: {res.stderr.strip().splitlines()[-1:] or res.returncode}"
    return res.stdout.strip().splitlines()[-1], None


def run_pymoto(case: dict, example: str, python: str, size, iters: int, workdir: str) -> dict:
    """Run the example with ``iters`` MMA steps; the runner's result with the unscaled values added."""
    cfg_path = os.path.join(workdir, "config.json")
    out_path = os.path.join(workdir, "result.json")
    runner = os.path.join(workdir, "pymoto_runner.py")
    with open(runner, "w") as fh:
        fh.write(RUNNER)
    with open(cfg_path, "w") as fh:
        json.dump(dict(example=os.path.abspath(example), maxit=iters, tolf=0.0, tolx=0.0,
                       size=list(size) if size != case["size"] else None,
                       size_pattern=case["pymoto_size_pattern"], size_line=case["pymoto_size_line"],
                       record=case.get("pymoto_record") or {}), fh)
    if os.path.exists(out_path):
        os.remove(out_path)
    t0 = time.perf_counter()
    try:
        res = subprocess.run([python, runner, cfg_path, out_path], capture_output=True, text=True, cwd=workdir,
                             timeout=300 + 30 * iters)
    except subprocess.TimeoutExpired as exc:
        return dict(status="error", reason=f"timed out after {exc.timeout:g} s")
    wall = time.perf_counter() - t0
    try:
        with open(out_path) as fh:
            r = json.load(fh)
    except (OSError, ValueError):
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        return dict(status="error", reason=f"the runner exited with {res.returncode} and wrote no result: "
                                           + " | ".join(tail))
    if r.get("status") != "ok":
        return dict(status="error", reason=r.get("reason", f"exit code {res.returncode}"),
                    traceback=r.get("traceback"), stdout_tail=res.stdout.strip().splitlines()[-10:])
    r["subprocess_wall_s"] = wall
    r["stdout_tail"] = res.stdout.strip().splitlines()[-3:]
    sf0 = r["sf"][0]
    f = [case["pymoto_objective"](g, sf0) for g in r["g"]]
    r["f_history"] = f  # f(x_k), k = 0..N-1 (the designs pyMOTO analysed)
    r["f_start"] = f[0]
    r["f_last_evaluated_by_pymoto"] = f[-1]
    r["f_final"] = case["pymoto_objective"](r["g_final"], sf0)  # f(x_N)
    r["f_final_scaled"] = r["g_final"][0]
    r["volume_fraction_final"] = case["pymoto_volume_fraction"](r["g_final"], sf0)
    raw = [row[0] for row in r["raw"]] + [r["raw_final"][0]]
    if case.get("pymoto_raw_objective"):
        raw = [case["pymoto_raw_objective"](v, r["n_design"]) for v in raw]
    conv = f + [r["f_final"]]
    r["conversion_max_rel_diff"] = max((abs(a - b) / abs(b) for a, b in zip(conv, raw) if b), default=None)
    if case.get("constraints"):  # the case's constraints at x_0..x_{N-1} (pyMOTO's steps) and x_N
        r["constraints"] = {}
        for name, spec in case["constraints"].items():
            hist = [spec["pymoto"](g, sf0) for g in r["g"]]
            c = dict(start=hist[0], final=spec["pymoto"](r["g_final"], sf0), last_evaluated_by_pymoto=hist[-1],
                     history=hist)
            i = spec.get("pymoto_raw")
            if i is not None:  # the value that went into that response's Scaling module
                raw_c = [row[i] for row in r["raw"]] + [r["raw_final"][i]]
                c["conversion_max_rel_diff"] = max((abs(a - b) / abs(b) for a, b in zip(hist + [c["final"]], raw_c)
                                                    if b), default=None)
            r["constraints"][name] = c
    r.update(iteration_times(r["step_times"]))
    # the recorded module outputs: per analysis x_0..x_{N-1}, then at x_N
    recorded, recorded_final = r.pop("recorded"), r.pop("recorded_final")
    for name in case.get("pymoto_record") or {}:
        hist = [row.get(name) for row in recorded] + [recorded_final.get(name)]
        if name == "eigenvalues":
            r["eigenvalues_history"] = hist[:-1]
            r["eigenvalues_final"] = hist[-1]
            r["omega1_final"] = float(np.sqrt(min(hist[-1]))) if hist[-1] else None
            r["omega1_start"] = float(np.sqrt(min(hist[0]))) if hist[0] else None
        elif name == "beta":
            r["beta_history"] = [b[0] if b else None for b in hist]  # beta of x_0..x_N
            r["beta_final"] = r["beta_history"][-1]
        else:
            r[name + "_history"] = hist
    timed = r["solver_at_step"][1:]
    if timed:
        r["solver_per_iter"] = dict(factorize=float(np.median([s["update"] for s in timed])),
                                    solve=float(np.median([s["solve"] for s in timed])),
                                    factorizations=float(np.mean([s["n_update"] for s in timed])),
                                    solves=float(np.mean([s["n_solve"] for s in timed])))
    del r["solver_at_step"], r["raw"]
    return r


def iteration_times(times) -> dict:
    """Median and mean of the times of iterations 2..N (None for N = 1) and all of them."""
    t = [float(x) for x in times]
    rest = t[1:]
    return dict(iter_times=t, s_per_iter=float(np.median(rest)) if rest else None,
                s_per_iter_mean=float(np.mean(rest)) if rest else None, first_iter_s=t[0] if t else None,
                iterations_timed=len(rest))


def solver_names(solver) -> dict:
    """adjopt's solver class and, for "auto", the backend it chose."""
    out = dict(solver=type(solver).__name__, solver_name=getattr(solver, "name", None))
    chosen = getattr(solver, "chosen", None)
    if chosen is not None:
        out["chosen"] = type(chosen).__name__
        out["chosen_name"] = getattr(chosen, "name", None)
    elif type(solver).__name__ == "AutoSolver":
        out["chosen"] = None
    return out


def _phase_sources(problem) -> tuple[list, list]:
    """(times, stats) of the constraint functionals, unique, when the functional has no phases of its own (its
    value needs no solve, e.g. the volume of ``stress``); ([], []) otherwise (the history has the phases)."""
    if getattr(problem.functional, "times", None) is not None:
        return [], []
    times, stats = {}, {}
    for fun, _ in problem.constraints or []:
        t, st = getattr(fun, "times", None), getattr(fun, "stats", None)
        if t is not None:
            times[id(t)] = t
        if st is not None:
            stats[id(st)] = st
    return list(times.values()), list(stats.values())


def _snapshot(times, stats) -> dict:
    """The phase seconds of ``times`` added up, and the factorizations and solves of ``stats``, now."""
    out = {}
    for t in times:
        for k, v in t.items():
            out[k] = out.get(k, 0.0) + float(v)
    return dict(times=out, factorizations=sum(int(st.factorizations) for st in stats),
                solves=sum(int(st.total_solves) for st in stats))


def _solver_of(problem):
    """The linear solver of the functional or, if it has none, of the first constraint functional that has one."""
    for fun in [problem.functional, *(f for f, _ in problem.constraints or [])]:
        if getattr(fun, "solver", None) is not None:
            return fun.solver
    return None


def build_problem(case: dict, size):
    mod = importlib.import_module(case["problem"])
    kw = dict(case["build"])
    kw.update(zip(case["size_kwargs"], size))
    return mod.build(**kw)


def run_adjopt(case: dict, problem, iters: int) -> dict:
    """``iters`` iterations of the case's method; times, phases and values."""
    # a functional without phases (the volume of "stress"): the constraint functionals' phases and solver counts,
    # snapshot before the run, after the start analysis and after every iteration (a callback; cheap)
    times, stats = _phase_sources(problem)
    snaps = []

    def callback(entry):
        snaps.append(_snapshot(times, stats))

    callback.wants_start = True
    before = _snapshot(times, stats)
    t0 = time.perf_counter()
    res = minimize(problem, case["method"], maxiter=iters, gtol=0, xtol=0, callback=callback if times else None,
                   **case["options"])
    wall = time.perf_counter() - t0
    hist = res.history
    steps = hist[1:]
    r = dict(status="ok", method=case["method"], options=case["options"], nit=int(res.nit), message=res.message,
             run_s=wall, f_history=[float(h["f"]) for h in hist], f_start=float(hist[0]["f"]),
             f_final=float(hist[-1]["f"]))
    r["f_final_scaled"] = case["pymoto_scale"] * r["f_final"] / abs(r["f_start"]) if r["f_start"] else None
    r.update(iteration_times([h["time"] for h in steps]))
    if times:
        if len(snaps) != len(hist):
            raise RuntimeError(f"the phase callback ran {len(snaps)} times for {len(hist)} history entries")
        phases = []
        for h, s0, s1 in zip(steps, snaps, snaps[1:]):
            ph = {k: v - s0["times"].get(k, 0.0) for k, v in s1["times"].items() if v - s0["times"].get(k, 0.0) > 0}
            ph["update"] = max(h["time"] - sum(ph.values()), 0.0)
            phases.append(ph)
        r["phase_source"] = "constraint functionals (callback)"
        per_iter = [(s1["factorizations"] - s0["factorizations"], s1["solves"] - s0["solves"])
                    for s0, s1 in zip(snaps, snaps[1:])]
        r["factorizations_per_iter"] = [a for a, _ in per_iter]
        r["solves_per_iter"] = [b for _, b in per_iter]
        factorizations, solves = snaps[-1]["factorizations"] - before["factorizations"], \
            snaps[-1]["solves"] - before["solves"]
    else:
        phases = [h.get("phases", {}) for h in steps]
        r["phase_source"] = "history"
        factorizations, solves = int(res.factorizations), int(res.solves)
    timed = steps[1:]
    if timed:
        wall_timed = sum(h["time"] for h in timed)
        seen = {k for ph in phases[1:] for k in ph}
        names = [k for k in PHASE_ORDER if k in seen] + sorted(seen - set(PHASE_ORDER))
        sums = {k: sum(ph.get(k, 0.0) for ph in phases[1:]) for k in names}
        r["phase_seconds_per_iter"] = {k: v / len(timed) for k, v in sums.items()}
        r["phase_shares"] = {k: v / wall_timed for k, v in sums.items()} if wall_timed > 0 else None
    if case.get("adjopt_volume_fraction"):
        vf, bound = case["adjopt_volume_fraction"](problem, res.x)
    else:
        vol, bound = problem.constraints[0]
        vf = vol.value(res.x)
    r["volume_fraction_final"] = float(vf)
    r["volume_bound"] = None if bound is None else float(bound)
    r["max_violation_final"] = hist[-1].get("max_violation")
    r.update(solver_names(_solver_of(problem)))
    r["factorizations"], r["solves"] = int(factorizations), int(solves)
    if case.get("constraints"):  # evaluated after the run (untimed): at x_N, then at the start p0
        r["constraints"] = {}
        for name, spec in case["constraints"].items():
            fun, bound = problem.constraints[spec["index"]]
            final = float(fun.value(res.x))
            r["constraints"][name] = dict(bound=float(bound), start=float(fun.value(problem.p0)), final=final)
    r["unknowns"] = int(problem.meta["dofmap"].n_free) if "dofmap" in problem.meta else None
    r["design_variables"] = int(problem.p0.size)
    if case.get("adjopt_extra"):
        r.update(case["adjopt_extra"](problem, res.x, iters))
    if any("beta" in h for h in hist):
        r["beta_history_entries"] = [h.get("beta") for h in hist]  # the beta of history[k]["f"]
    return r


def compare(a: dict, p: dict) -> dict:
    out = dict(f_start_rel_diff=abs(a["f_start"] - p["f_start"]) / abs(p["f_start"]) if p["f_start"] else None)
    out["f_start_agree"] = out["f_start_rel_diff"] is not None and out["f_start_rel_diff"] <= START_RTOL
    out["f_final_rel_diff"] = abs(a["f_final"] - p["f_final"]) / abs(p["f_final"]) if p["f_final"] else None
    out["volume_fraction_final_diff"] = a["volume_fraction_final"] - p["volume_fraction_final"]
    if a.get("s_per_iter") and p.get("s_per_iter"):
        out["time_ratio_adjopt_over_pymoto"] = a["s_per_iter"] / p["s_per_iter"]
        out["time_ratio_mean"] = a["s_per_iter_mean"] / p["s_per_iter_mean"]
    # f(x_k) of the two runs, k = 0..N-1 (both analysed those designs); they drift apart as the MMAs differ
    # (with a beta schedule only where adjopt's history entry has pyMOTO's beta: adjopt records f(x_k) at the
    # beta of before the change, see the module docstring)
    n = min(len(a["f_history"]), len(p["f_history"]))
    same = np.ones(n, dtype=bool)
    if a.get("beta_history_entries") and p.get("beta_history"):
        same = np.array([x == y for x, y in zip(a["beta_history_entries"][:n], p["beta_history"][:n])])
        out["f_history_compared"] = int(same.sum())
        out["f_final_same_beta"] = a["beta_history_entries"][-1] == p["beta_history"][-1]
    fa, fp = np.array(a["f_history"][:n])[same], np.array(p["f_history"][:n])[same]
    scale = abs(a["f_start"])
    out["f_history_max_abs_diff_over_f0"] = float(np.max(np.abs(fa - fp)) / scale) if fa.size and scale else None
    if a.get("omega1_final") and p.get("omega1_final"):
        out["omega1_final_rel_diff"] = (a["omega1_final"] - p["omega1_final"]) / p["omega1_final"]
    if a.get("constraints") and p.get("constraints"):
        cons = {}
        for name, ca in a["constraints"].items():
            cp = p["constraints"].get(name)
            if cp is None:
                continue
            cons[name] = dict(start_rel_diff=abs(ca["start"] - cp["start"]) / abs(cp["start"]) if cp["start"] else None,
                              final_diff=ca["final"] - cp["final"],
                              final_rel_diff=abs(ca["final"] - cp["final"]) / abs(cp["final"]) if cp["final"] else None)
        out["constraints"] = cons
        out["constraints_start_agree"] = bool(cons) and all(
            c["start_rel_diff"] is not None and c["start_rel_diff"] <= START_RTOL for c in cons.values())
    if a.get("beta_schedule") and p.get("beta_history"):
        ba, bp = a["beta_schedule"], p["beta_history"]
        m = min(len(ba), len(bp))
        out["beta_max_abs_diff"] = max(abs(x - y) for x, y in zip(ba[:m], bp[:m]))
    return out


def print_table(data) -> None:
    rows, phase_rows, notes, value_rows = [], [], [], []
    phase_names = [k for k in PHASE_ORDER
                   if any(k in (c["adjopt"].get("phase_shares") or {}) for c in data["cases"].values())]
    for name, c in data["cases"].items():
        for side in ("adjopt", "pymoto"):
            r = c.get(side) or {}
            if r.get("status") != "ok":
                rows.append([name, side, "-", "-", "-", "-", "-", "-", "-", r.get("status", "not run")])
                continue
            if side == "adjopt":
                solver = r.get("solver_name") or r.get("solver")
            else:
                solver = ", ".join(r.get("solvers", []))
            rows.append([name, side, fmt(r.get("s_per_iter"), ".4g"), fmt(r.get("s_per_iter_mean"), ".4g"),
                         fmt(r["f_start"], ".10g"), fmt(r["f_final"], ".6g"), fmt(r.get("f_final_scaled"), ".6g"),
                         fmt(r["volume_fraction_final"], ".5f"), solver, "ok"])
        for side in ("adjopt", "pymoto"):  # the volume fraction and the constraints at x_0 and x_N
            r = c.get(side) or {}
            if r.get("status") == "ok" and r.get("constraints"):
                vf0 = r["f_start"] if CASES[name].get("adjopt_volume_fraction") else None
                value_rows.append([name, side, "volume fraction", fmt(vf0, ".10g"),
                                   fmt(r["volume_fraction_final"], ".6g")])
                for cname, v in r["constraints"].items():
                    value_rows.append([name, side, cname, fmt(v["start"], ".16g"), fmt(v["final"], ".6g")])
        a = c["adjopt"]
        if a.get("phase_shares"):
            phase_rows.append([name, *(f"{100 * a['phase_shares'][k]:.1f}%" if k in a["phase_shares"] else "-"
                                       for k in phase_names)])
        p = c.get("pymoto") or {}
        if a.get("omega1_final") is not None:
            notes.append(f"{name}: lowest sqrt(eigenvalue) at x_N: adjopt {fmt(a['omega1_final'], '.8g')} rad/s, "
                         f"pyMOTO {fmt(p.get('omega1_final'), '.8g')} rad/s")
        if a.get("beta_schedule"):
            notes.append(f"{name}: beta at x_N: adjopt {fmt(a['beta_schedule'][-1], '.6g')}, "
                         f"pyMOTO {fmt(p.get('beta_final'), '.6g')}")
        if a.get("phase_source", "history") != "history":
            fpi = a.get("factorizations_per_iter") or []
            notes.append(f"{name}: adjopt's phases and counts are those of its {a['phase_source']}: "
                         f"{a['factorizations']} factorizations, {a['solves']} solves in all, "
                         f"{fmt(float(np.median(fpi[1:])) if fpi[1:] else None, '.3g')} factorizations per iteration")
        if p.get("solver_per_iter"):
            spi = p["solver_per_iter"]
            notes.append(f"{name}: pyMOTO solver per iteration: factorize {fmt(spi['factorize'], '.3g')} s, solve "
                         f"{fmt(spi['solve'], '.3g')} s, {fmt(spi['factorizations'], '.3g')} factorizations, "
                         f"{fmt(spi['solves'], '.3g')} solves")
        cmp_ = c.get("comparison")
        if cmp_ and cmp_.get("constraints"):
            notes.append(f"{name}: constraints start rel diff " + ", ".join(
                f"{k} {fmt(v['start_rel_diff'], '.2e')}" for k, v in cmp_["constraints"].items())
                + f" (agree: {fmt(cmp_['constraints_start_agree'])})")
        if cmp_:
            notes.append(f"{name}: f start rel diff {fmt(cmp_['f_start_rel_diff'], '.2e')} "
                         f"(agree: {fmt(cmp_['f_start_agree'])}), adjopt / pyMOTO s/iter "
                         f"{fmt(cmp_.get('time_ratio_adjopt_over_pymoto'), '.3g')} (median), "
                         f"{fmt(cmp_.get('time_ratio_mean'), '.3g')} (mean)")
        if c.get("loadavg"):
            notes.append(f"{name}: load average before adjopt {c['loadavg'].get('before')}, "
                         f"before pyMOTO {c['loadavg'].get('between')}, after {c['loadavg'].get('after')}")
    scales = ", ".join(f"{n} {CASES[n]['pymoto_scale']:g}" for n in data["cases"])
    print(f"\n{data['config']['iters']} MMA iterations; s/iter over iterations 2..N; f = the unscaled objective; "
          f"scaled = s f / |f start| (pyMOTO's g0; s: {scales})")
    print(table(rows, ["case", "run", "s/iter med", "s/iter mean", "f start", "f final", "scaled", "vol frac",
                       "solver", "status"]))
    if value_rows:
        print("\nat x_0 (start) and x_N (after N updates)")
        print(table(value_rows, ["case", "run", "value", "start", "final"]))
    if phase_rows:
        print("\nadjopt phases (share of the wall time of iterations 2..N)")
        print(table(phase_rows, ["case", *phase_names]))
    for n in notes:
        print(n)
    info = data["info"]
    pools = ", ".join(f"{d.get('internal_api')} {d.get('num_threads')}" for d in info.get("threadpools") or []) or "-"
    line = f"machine: {info.get('cpus')} cpus, load {info.get('loadavg')}; adjopt threads: numba {info.get('threads')}, " \
           f"pools {pools}"
    pym = [c["pymoto"] for c in data["cases"].values() if c.get("pymoto", {}).get("status") == "ok"]
    if pym:
        line += "; pyMOTO OpenBLAS threads " + (", ".join(str(n) for n in pym[0].get("blas_threads", {}).values()) or "-")
    print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["mechanism"], metavar="CASE", help=f"of {sorted(CASES)}")
    ap.add_argument("--iters", type=int, default=100, help="MMA iterations of each side (N)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("NX", "NY"), default=None,
                    help="elements along x and y (default: the case's own size; pyMOTO's example is patched)")
    ap.add_argument("--pymoto-python", default=DEFAULT_PYMOTO_PYTHON)
    ap.add_argument("--pymoto-examples", default=DEFAULT_PYMOTO_EXAMPLES,
                    help="examples/topology_optimization of pyMOTO v2.0.1")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--no-pymoto", action="store_true", help="measure adjopt alone")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(map(repr, unknown))}; the cases are {sorted(CASES)}")
    cases = list(dict.fromkeys(args.cases))
    if args.iters < 1:
        ap.error(f"--iters must be >= 1, got {args.iters}")
    if args.size is not None and min(args.size) < 1:
        ap.error(f"--size must be two positive element counts, got {args.size}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.error(f"--out {args.out!r}: its folder does not exist")

    # pyMOTO is wanted unless --no-pymoto or its interpreter is missing (then adjopt runs alone)
    pym_python = os.path.abspath(args.pymoto_python) if args.pymoto_python else ""
    if args.no_pymoto:
        pym_reason = "--no-pymoto"
    elif not os.path.isfile(pym_python):
        pym_reason = f"no Python interpreter at {args.pymoto_python!r}"
    else:
        pym_reason = None
    examples = {}
    if pym_reason is None:
        if not os.path.isdir(args.pymoto_examples):
            ap.error(f"--pymoto-examples {args.pymoto_examples!r} is not a folder (pyMOTO v2.0.1's "
                     "examples/topology_optimization; or pass --no-pymoto)")
        for c in cases:
            path = os.path.join(args.pymoto_examples, CASES[c]["pymoto_example"])
            if not os.path.isfile(path):
                ap.error(f"case {c!r}: the pyMOTO example {path!r} does not exist")
            examples[c] = path
    sizes = {c: tuple(args.size) if args.size else CASES[c]["size"] for c in cases}
    problems = {}
    for c in cases:
        try:
            problems[c] = build_problem(CASES[c], sizes[c])
        except ValueError as exc:
            ap.error(f"case {c!r} at size {sizes[c][0]} x {sizes[c][1]}: {exc}")

    pym_version = None
    if pym_reason is None:
        pym_version, pym_reason = probe_pymoto(pym_python)
    if pym_reason is not None:
        print(f"pyMOTO not run ({pym_reason}): measuring adjopt alone", flush=True)

    data = dict(
        info=machine_info(adjopt=getattr(adjopt, "__version__", None), pymoto=pym_version,
                          threadpoolctl=version("threadpoolctl"), **blas_info()),
        config=dict(cases=cases, iters=args.iters, size=list(args.size) if args.size else None,
                    pymoto_python=pym_python or None, pymoto_examples=os.path.abspath(args.pymoto_examples),
                    no_pymoto=args.no_pymoto, start_rtol=START_RTOL),
        pymoto_available=pym_reason is None, pymoto_reason=pym_reason,
        note=None if pym_reason is None else f"adjopt measured alone: pyMOTO not run ({pym_reason})",
        cases={}, errors=[], complete=False)
    failed = False
    t_all = time.perf_counter()
    for c in cases:
        case = CASES[c]
        nx, ny = sizes[c]
        print(f"\n{c} {nx}x{ny}: adjopt, {args.iters} {case['method']} iterations", flush=True)
        row = dict(size=[nx, ny],
                   config=dict(build={**case["build"], **dict(zip(case["size_kwargs"], sizes[c]))},
                               problem=f"problems/{case['problem']}.py", method=case["method"],
                               options=case["options"], stop=dict(maxiter=args.iters, gtol=0, xtol=0),
                               pymoto_example=case["pymoto_example"], pymoto_objective=case["pymoto_objective_doc"],
                               pymoto_volume_fraction=case["pymoto_volume_fraction_doc"],
                               pymoto_scale=case["pymoto_scale"], pymoto_record=case.get("pymoto_record") or {},
                               constraints={k: v["doc"] for k, v in (case.get("constraints") or {}).items()},
                               pymoto_stop=dict(maxit=args.iters, tolf=0, tolx=0),
                               pymoto_size_patched=sizes[c] != case["size"]))
        row["loadavg"] = dict(before=loadavg())
        row["adjopt"] = run_adjopt(case, problems[c], args.iters)
        row["loadavg"]["between"] = loadavg()
        if pym_reason is None:
            print(f"{c} {nx}x{ny}: pyMOTO ({examples[c]}), {args.iters} MMA steps", flush=True)
            with tempfile.TemporaryDirectory(prefix="bench_pymoto_") as work:
                row["pymoto"] = run_pymoto(case, examples[c], pym_python, sizes[c], args.iters, work)
            if row["pymoto"]["status"] == "ok":
                row["comparison"] = compare(row["adjopt"], row["pymoto"])
            else:
                failed = True
                data["errors"].append(dict(case=c, reason=row["pymoto"]["reason"]))
                print(f"pyMOTO failed: {row['pymoto']['reason']}", file=sys.stderr, flush=True)
        else:
            row["pymoto"] = dict(status="not run", reason=pym_reason)
        row["loadavg"]["after"] = loadavg()
        data["cases"][c] = row
    data["total_s"] = time.perf_counter() - t_all
    data["complete"] = True
    print_table(data)
    write_json(args.out, data)
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
