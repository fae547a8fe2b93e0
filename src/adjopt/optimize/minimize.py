"""``adjopt.minimize(problem, method=...)``: one entry point to every driver."""

from __future__ import annotations

import logging

import numpy as np

from ..problem import Problem
from ..errors import AdjoptError
from .base import MethodSetupError, OptimizeResult, Options, run
from .inner import make_inner_product

logger = logging.getLogger(__name__)


def methods() -> dict:
    """{name: Driver class} of every method."""
    from .design import MMA, OC
    from .lbfgs import LBFGS, ScipyLBFGSB
    from .newton import NewtonCG, NewtonTR

    return {d.name: d for d in (LBFGS, ScipyLBFGSB, NewtonCG, NewtonTR, OC, MMA)}


def minimize(problem: Problem, method: str = "lbfgs", inner_product=None, x0=None, callback=None,
             checkpoint=None, resume=None, **options) -> OptimizeResult:
    """Minimize ``problem.functional`` subject to the problem's bounds and constraints.

    Parameters
    ----------
    problem
        An :class:`adjopt.Problem` (functional, p0, bounds, constraints, mass).
    method
        ``"lbfgs"`` (own L-BFGS in the chosen inner product, projected bounds;
        exactly resumable), ``"lbfgsb"`` (scipy's L-BFGS-B on mass-scaled
        variables), ``"newton-cg"`` (inexact Newton-CG, line search, projected
        bounds), ``"newton-tr"`` (Steihaug-Toint trust region, no bounds),
        ``"oc"`` (optimality criteria: bounds and one volume-like constraint),
        ``"mma"`` (method of moving asymptotes: bounds and any number of constraints).
    inner_product
        ``"euclidean"``, ``"l2"``, ``"l2-lumped"``, ``"h1"`` or an
        :class:`~adjopt.optimize.inner.InnerProduct`; default: ``"l2"`` when the
        problem has a mass (mesh-independent iteration counts), else Euclidean.
    x0
        Start (default ``problem.p0``); projected onto the bounds if outside them (and said so).
    callback
        Called after every iteration with that iteration's history entry (nit,
        f, stationarity, step, counts, method extras such as cg_iterations) and x.
    checkpoint
        Path of an ``.npz`` written atomically after every iteration; it records
        ``problem.name``, ``problem.meta["options"]``, the number of parameters and the method.
    resume
        Path of a checkpoint to continue from; :class:`~adjopt.optimize.CheckpointError`
        when it is unreadable or of another problem, options, size or method.
    **options
        Stopping tests (``maxiter``, ``gtol``, ``gatol``, ``ftol``, ``xtol``,
        ``max_time``) and the method's own options.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"minimize takes an adjopt.Problem, got {type(problem).__name__}")
    try:
        driver, x, stop, counts = _setup(problem, method, inner_product, x0, resume, options)
    except ValueError as exc:
        if isinstance(exc, AdjoptError):
            raise
        raise MethodSetupError(str(exc)) from exc
    return run(driver, x, stop, counts, callback=callback, checkpoint=checkpoint, resume=resume)


def _setup(problem, method, inner_product, x0, resume, options):
    """(driver, start, stopping tests, counters), or a ValueError saying why the method cannot run."""
    known = methods()
    if not isinstance(method, str) or method.lower() not in known:
        raise ValueError(f"unknown method {method!r}; the methods are {sorted(known)}")
    cls = known[method.lower()]
    stop_opts = {k: options.pop(k) for k in list(options) if k in Options.names()}
    stop = Options(**stop_opts)
    if problem.bounds is not None and not cls.takes_bounds:
        raise ValueError(f"method {cls.name!r} does not take bounds; use 'lbfgs', 'lbfgsb', 'newton-cg', 'oc' or 'mma'")
    if problem.constraints and not cls.takes_constraints:
        raise ValueError(f"method {cls.name!r} does not take inequality constraints; use 'mma' (or 'oc' for one volume "
                         "constraint)")
    inner = make_inner_product(inner_product, problem)
    counts = dict(nfev=0, njev=0, nhessp=0)
    driver = cls(problem, inner, options, counts)
    x = np.array(problem.p0 if x0 is None else x0, dtype=np.float64)
    if x.shape != problem.p0.shape:
        raise ValueError(f"x0 must have shape {problem.p0.shape}, got {x.shape}")
    space = driver.space
    if not space.all(np.isfinite(x)):
        raise ValueError("x0 has NaN or Inf entries")
    if problem.bounds is not None and resume is None:
        lo, hi = problem.bounds
        outside = space.count((x < lo) | (x > hi))
        if outside:
            msg = f"the start violated the bounds at {outside} of {space.size(x)} entries; it was projected onto them"
            logger.warning("%s", msg)
            driver.warnings.append(msg)
            x = np.clip(x, lo, hi)
    return driver, x, stop, counts
