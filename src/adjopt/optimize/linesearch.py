"""Projected Armijo backtracking that backs off from failed evaluations.

A trial point whose objective is NaN or Inf, or whose PDE solve fails (a
singular A(p), a Krylov solve that does not converge), counts as "no
decrease": the step is shortened, never accepted. If no step in
``max_steps`` halvings decreases f, the run stops with a message and the last
good x (which the checkpoint already holds).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import AdjoptError
from .base import Stop
from .space import SERIAL

logger = logging.getLogger(__name__)

#: a predicted decrease below ROUNDOFF * |f| cannot be measured in f: the run stops (short of gtol, so not a success)
ROUNDOFF = 100 * np.finfo(float).eps


def safe_value(J, x) -> float:
    """J.value(x), or NaN when the evaluation fails (NaN/Inf, singular matrix, solver failure)."""
    try:
        f = J.value(x)
    except (AdjoptError, FloatingPointError, ArithmeticError) as exc:
        logger.info("line search: the objective failed at a trial point (%s); backing off", exc)
        return math.nan
    return f if math.isfinite(f) else math.nan


def safe_gradient(J, x):
    """J.gradient(x), or None when it fails (a solve that fails, a non-finite gradient)."""
    try:
        return J.gradient(x)
    except (AdjoptError, FloatingPointError, ArithmeticError) as exc:
        logger.info("the gradient failed at a trial point (%s); backing off", exc)
        return None


def backtrack(J, x, f, g, d, project, t0: float = 1.0, c1: float = 1e-4, max_steps: int = 30, space=SERIAL):
    """The first t in t0, ~t0/2, ... with f(P(x + t d)) <= f + c1 g^T (P(x + t d) - x).

    Returns ``(t, x_new, f_new, trials)``. Steps shrink by safeguarded
    quadratic interpolation (to within [0.1, 0.5] of the last one). Raises
    :class:`~adjopt.optimize.base.Stop` when no step decreases f. ``space``: where x lives
    (:mod:`adjopt.optimize.space`; its reductions).
    """
    dot = space.dot
    t = t0
    nan_seen = False
    predicted = -dot(g, project(x + t0 * d) - x)
    if predicted <= ROUNDOFF * max(abs(f), np.finfo(float).tiny):
        raise Stop(f"stopped at round-off short of the gradient tolerance: the predicted decrease {predicted:.3g} is "
                   f"below the precision of f = {f:.6g} (loosen gtol, or scale the objective)", success=False)
    for trial in range(1, max_steps + 1):
        xt = project(x + t * d)
        s = xt - x
        slope = dot(g, s)
        if slope >= 0 and not space.any(s):
            break  # the projected step vanished
        ft = safe_value(J, xt)
        if not math.isnan(ft) and ft <= f + c1 * min(slope, 0.0):
            return t, xt, ft, trial
        if math.isnan(ft):
            nan_seen = True
            t *= 0.5
        else:
            # minimiser of the quadratic through f, slope and ft, safeguarded
            denom = 2.0 * (ft - f - slope)
            tq = -slope * t / denom if denom > 0 else 0.5 * t
            t = min(max(tq, 0.1 * t), 0.5 * t)
    why = "the objective could not be evaluated at any trial point (NaN/Inf or a failed solve)" if nan_seen else \
        "no step along the search direction decreased the objective"
    raise Stop(f"line search failed after {trial} trials: {why}; the last good x is kept")
