"""Continuation of the Heaviside projection's sharpness beta during an optimization, and the grey-level measure.

A projected topology design (filter, then :class:`~adjopt.maps.HeavisideProjection`)
starts with a soft projection (beta about 1) and sharpens it step by step;
the usual schedule doubles beta every so many iterations, or earlier when the
design has stopped changing at the current beta, up to a maximum (Guest et al.
2004, Wang, Lazarov and Sigmund 2011). :class:`BetaContinuation` is that
schedule. Given to a :class:`~adjopt.Problem` (``continuation=``), the shared
loop of the drivers (:func:`adjopt.optimize.minimize`) applies it after every
iteration:

- the iteration is recorded with the beta it ran at (``beta`` in the history);
- when beta is raised, the functionals' cached states are dropped (the same p
  now gives another design) and the driver evaluates again at the current
  design (OC's change back to 1 and L-BFGS's memory reset; MMA keeps its
  asymptotes and builds its next approximation from the new gradients);
- a stopping test that holds (xtol, ftol, gtol) ends the run only at the
  largest beta: before that, it raises beta instead;
- checkpoints keep beta and the iterations since its last change, so that
  ``--resume`` goes on with the same beta.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveNormalization", "BetaContinuation", "BetaSchedule", "ContinuationChain", "grey_level"]

#: the names of a history entry that the optimization loop writes itself
LOOP_NAMES = frozenset({"nit", "f", "stationarity", "step", "nfev", "njev", "nhessp", "time", "phases", "f_next",
                        "newton_iterations"})
#: history names a continuation may not record under: the loop's and the drivers' own records
_TAKEN = LOOP_NAMES | {"factorizations", "solves", "cg_iterations", "max_violation", "kkt", "change", "multipliers",
                       "subsolver_iterations", "volume", "lam"}


def grey_level(rho, low: float = 0.05, high: float = 0.95) -> float:
    """Fraction of the entries of ``rho`` strictly between ``low`` and ``high`` (0: a black-and-white design).

    Element densities of equal-size elements; for a projected design use the
    physical density (after filter and projection).
    """
    rho = np.asarray(rho, dtype=np.float64)
    if rho.size == 0:
        raise ValueError("grey_level needs at least one density")
    if not 0 <= low < high <= 1:
        raise ValueError(f"grey_level needs 0 <= low < high <= 1, got low={low!r}, high={high!r}")
    return float(np.count_nonzero((rho > low) & (rho < high))) / rho.size


def _number(value, name: str, minimum: float, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v <= minimum if strict else v < minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return v


class BetaContinuation:
    """Raise the beta of Heaviside projections by ``factor`` every ``every`` iterations or when the run has
    converged at the current beta, up to ``beta_max``.

    Parameters
    ----------
    projections
        A :class:`~adjopt.maps.HeavisideProjection`, or several that share
        one beta (the eroded, intermediate and dilated designs of a robust
        formulation). Their beta now is the start; they are set to the first
        one's.
    beta_max
        The largest beta (32). Reached in ``factor`` steps; the last step is
        cut to ``beta_max``.
    factor
        The multiplier per step (2, > 1).
    every
        Iterations at one beta before it is raised anyway (50, an integer
        >= 1).
    """

    def __init__(self, projections, beta_max: float = 32.0, factor: float = 2.0, every: int = 50):
        from ..maps import HeavisideProjection

        projs = [projections] if isinstance(projections, HeavisideProjection) else list(projections)
        if not projs or not all(isinstance(m, HeavisideProjection) for m in projs):
            raise TypeError("BetaContinuation needs a HeavisideProjection or a non-empty list of them, got "
                            f"{projections!r}")
        self.projections = projs
        self.beta_max = _number(beta_max, "beta_max", 0.0)
        self.factor = _number(factor, "factor", 1.0)
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (iterations per beta), got {every!r}")
        self.every = int(every)
        beta = projs[0].beta
        if beta > self.beta_max:
            raise ValueError(f"the projection's beta {beta:g} is above beta_max {self.beta_max:g}")
        self.beta0 = beta
        self._set(beta)
        self.since = 0  # iterations at the current beta

    @property
    def beta(self) -> float:
        """The current beta of every projection."""
        return self.projections[0].beta

    @property
    def at_max(self) -> bool:
        """True when beta cannot be raised any more: only then may a converged run stop."""
        return self.beta >= self.beta_max

    def _set(self, beta: float) -> None:
        for m in self.projections:
            m.beta = beta

    #: a raise changes the parameter map: the functionals' cached states are stale
    drops_states = True

    def record(self) -> dict:
        """What every history entry records: ``beta``."""
        return {"beta": float(self.beta)}

    def step(self, converged: bool, x=None) -> bool:
        """Count one iteration; raise beta when the run ``converged`` at this beta or it has run ``every``
        iterations at it (and it is below ``beta_max``). True when beta changed. (``x``, the current
        design, is not needed.)"""
        self.since += 1
        if self.at_max or not (converged or self.since >= self.every):
            return False
        old = self.beta
        self._set(min(old * self.factor, self.beta_max))
        self.since = 0
        logger.info("continuation: beta %g -> %g (%s)", old, self.beta,
                    "converged at the old beta" if converged else f"{self.every} iterations at it")
        return True

    def state(self) -> dict:
        """What a checkpoint keeps: the beta and the iterations spent at it."""
        return dict(beta=self.beta, since=self.since)

    def restore(self, state: dict) -> None:
        """Go on from a checkpoint's :meth:`state`."""
        try:
            beta, since = float(state["beta"]), int(state["since"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a continuation state needs a number 'beta' and an integer 'since', got {state!r}") \
                from None
        if not (math.isfinite(beta) and 0 < beta <= self.beta_max * (1 + 1e-12)) or since < 0:
            raise ValueError(f"the checkpoint's continuation state {state!r} does not fit beta_max {self.beta_max:g}")
        self._set(beta)
        self.since = since

    def reset(self) -> None:
        """Back to the starting beta (a new run from the start)."""
        self._set(self.beta0)
        self.since = 0

    def __repr__(self):
        return (f"BetaContinuation(beta={self.beta:g}, beta_max={self.beta_max:g}, factor={self.factor:g}, "
                f"every={self.every})")


class BetaSchedule:
    """beta as a given function of the iteration number: ``schedule(k)`` is the beta of iteration k + 1's
    evaluations (``schedule(0)`` at the start), whatever the run does.

    For a published schedule (pyMOTO's robust example: beta 1e-3 for 15 steps, then a linear rise every 5
    steps). Unlike :class:`BetaContinuation` it does not wait for convergence: a stopping test that holds
    ends the run at whatever beta the schedule has reached.

    Parameters
    ----------
    projections
        A :class:`~adjopt.maps.HeavisideProjection` or several sharing one beta.
    schedule
        A callable ``k -> beta`` (> 0, finite) for k = 0, 1, 2, ...
    """

    def __init__(self, projections, schedule):
        from ..maps import HeavisideProjection

        projs = [projections] if isinstance(projections, HeavisideProjection) else list(projections)
        if not projs or not all(isinstance(m, HeavisideProjection) for m in projs):
            raise TypeError("BetaSchedule needs a HeavisideProjection or a non-empty list of them, got "
                            f"{projections!r}")
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable k -> beta, got {type(schedule).__name__}")
        self.projections = projs
        self.schedule = schedule
        self.k = 0
        self._set(self._beta_at(0))

    def _beta_at(self, k: int) -> float:
        b = self.schedule(k)
        try:
            b = float(b)
        except (TypeError, ValueError):
            raise ValueError(f"the beta schedule gave {b!r} at iteration {k}, not a number") from None
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"the beta schedule gave {b!r} at iteration {k}; beta must be finite and > 0")
        return b

    def _set(self, beta: float) -> None:
        for m in self.projections:
            m.beta = beta

    @property
    def beta(self) -> float:
        return self.projections[0].beta

    drops_states = True
    at_max = True  # a stopping test that holds ends the run at whatever beta

    def record(self) -> dict:
        """What every history entry records: ``beta``."""
        return {"beta": float(self.beta)}

    def step(self, converged: bool, x=None) -> bool:
        """Count one iteration and set the schedule's beta for the next; True when it changed."""
        self.k += 1
        old, new = self.beta, self._beta_at(self.k)
        if new == old:
            return False
        self._set(new)
        logger.info("schedule: beta %g -> %g at iteration %d", old, new, self.k)
        return True

    def state(self) -> dict:
        return dict(beta=self.beta, since=self.k)

    def restore(self, state: dict) -> None:
        try:
            beta, k = float(state["beta"]), int(state["since"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a schedule state needs a number 'beta' and an integer 'since', got {state!r}") from None
        if k < 0 or beta != self._beta_at(k):
            raise ValueError(f"the checkpoint's continuation state {state!r} does not fit this schedule "
                             f"(beta {self._beta_at(max(k, 0)):g} at iteration {k})")
        self.k = k
        self._set(beta)

    def reset(self) -> None:
        self.k = 0
        self._set(self._beta_at(0))

    def __repr__(self):
        return f"BetaSchedule(beta={self.beta:g} at iteration {self.k})"


class AdaptiveNormalization:
    """A constraint aggregate whose normalization follows the true maximum: g_c(p) = c (a(p) + offset) - offset.

    An aggregate (a P-norm, a P-mean, a KS function) ``a(p) + offset`` of many
    local quantities lies below their largest value ``peak(p)`` by a factor
    that depends on the design, so a fixed bound on it is either too loose
    or too tight. The adaptive normalization of Le, Norato, Bruns, Ha and
    Tortorelli (2010) multiplies the aggregate by

        c_k = alpha * peak(p_k) / (a(p_k) + offset) + (1 - alpha) * c_{k-1}

    after every design iteration k (c_0 = ``start``): as the design settles,
    c (a + offset) tends to the peak itself, and g_c <= 0 bounds the largest
    local value rather than its mean.

    The object is both the constraint (``value``, ``gradient``: c times the
    wrapped functional's) and the continuation that updates c: give it to
    the :class:`~adjopt.Problem` as a constraint ``(norm, 0.0)`` and as
    ``continuation=norm``. c is constant within an iteration, so every
    gradient is exact for the current c (the Taylor tests of the wrapped
    functional hold); between iterations the driver evaluates the constraint
    again at the same design (no new solves: the states are kept). c changes
    only when the update differs from it by more than ``rtol`` (relative), so
    that a settled run can stop; every history entry records c under
    ``name``, and checkpoints keep it.

    Parameters
    ----------
    functional
        The aggregate a(p), with ``value``, ``gradient`` and ``n_params``
        (a :class:`~adjopt.ReducedFunctional` of a stress aggregate).
    peak
        A callable ``p -> float``: the largest of the aggregated values at p
        (same units as ``a(p) + offset``, positive).
    alpha
        The damping in (0, 1] (0.5; 1: c is the last ratio).
    offset
        What makes the aggregate a positive measure: ``a + offset`` is the
        aggregate of the local values (1 for a constraint written as
        ``mean - 1 <= 0``; 0 for a plain norm).
    start
        The first normalization c_0 (1).
    rtol
        The relative change below which c stays (1e-3).
    name
        Its column in the history (``"normalization"``).
    """

    drops_states = False  # c scales the constraint: the states, adjoints and factorizations stay valid
    at_max = True  # a stopping test that holds may end the run (c settles by rtol)

    def __init__(self, functional, peak, alpha: float = 0.5, offset: float = 1.0, start: float = 1.0,
                 rtol: float = 1e-3, name: str = "normalization"):
        if not all(callable(getattr(functional, a, None)) for a in ("value", "gradient")):
            raise TypeError(f"AdaptiveNormalization needs a functional with value and gradient, got "
                            f"{type(functional).__name__}")
        if not callable(peak):
            raise TypeError(f"peak must be a callable p -> float (the largest local value), got {type(peak).__name__}")
        self.functional = functional
        self.peak = peak
        self.alpha = _number(alpha, "alpha", 0.0)
        if self.alpha > 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.offset = _number(offset, "offset", -math.inf)
        self.c0 = _number(start, "start", 0.0)
        self.rtol = _number(rtol, "rtol", 0.0, strict=False)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in _TAKEN or name == "beta" or name.endswith("_next"):
            raise ValueError(f"name {name!r} is a history name the optimization loop (or a beta continuation) uses "
                             "itself; choose another (default 'normalization')")
        self.name = name
        self.c = self.c0

    @property
    def n_params(self) -> int:
        return self.functional.n_params

    # -- the constraint ----------------------------------------------------------
    def value(self, p) -> float:
        """c (a(p) + offset) - offset."""
        return self.c * (float(self.functional.value(p)) + self.offset) - self.offset

    def gradient(self, p, tol=None) -> np.ndarray:
        """c grad a(p)."""
        g = self.functional.gradient(p) if tol is None else self.functional.gradient(p, tol=tol)
        return self.c * np.asarray(g, dtype=np.float64)

    def forget(self) -> None:
        drop = getattr(self.functional, "forget", None)
        if callable(drop):
            drop()

    # -- the continuation ----------------------------------------------------------
    def ratio(self, p) -> float | None:
        """peak(p) / (a(p) + offset): what c would be with alpha = 1; None when both are zero (nothing to
        aggregate: a design without stresses keeps its c)."""
        agg = float(self.functional.value(p)) + self.offset
        raw = self.peak(np.array(p, dtype=np.float64, copy=True))
        if isinstance(raw, (bool, np.bool_, str, bytes)) or not (isinstance(raw, numbers.Real) or (
                isinstance(raw, np.ndarray) and raw.shape == () and np.issubdtype(raw.dtype, np.floating))):
            raise TypeError(f"the peak callable must return a real number (the largest local value), got {raw!r}")
        top = float(raw)
        if not (math.isfinite(agg) and math.isfinite(top) and agg >= 0 and top >= 0):
            raise ValueError(f"the adaptive normalization needs a finite aggregate and peak >= 0, got a + offset = "
                             f"{agg!r} and peak = {top!r}; check the offset (a + offset must be the aggregate of "
                             "the local values)")
        if agg == 0 or top == 0:
            if agg == top:
                return None
            raise ValueError(f"the adaptive normalization got a + offset = {agg!r} and peak = {top!r}: one is zero "
                             "and the other is not; the peak must be the largest of the values a + offset aggregates")
        return top / agg

    def record(self) -> dict:
        return {self.name: float(self.c)}

    def step(self, converged: bool, x=None) -> bool:
        """Update c at the design ``x`` that the iteration ended at; True when it changed."""
        if x is None:
            raise ValueError("the adaptive normalization updates at the current design: step(converged, x)")
        ratio = self.ratio(x)
        if ratio is None:
            logger.debug("adaptive normalization: nothing aggregated at this design; %s stays %g", self.name, self.c)
            return False
        new = self.alpha * ratio + (1.0 - self.alpha) * self.c
        if abs(new - self.c) <= self.rtol * abs(self.c):
            return False
        logger.debug("adaptive normalization: %s %g -> %g", self.name, self.c, new)
        self.c = new
        return True

    def state(self) -> dict:
        return {"normalization": float(self.c)}

    def restore(self, state: dict) -> None:
        try:
            c = float(state["normalization"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"an adaptive normalization state needs a number 'normalization', got {state!r}") \
                from None
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"the checkpoint's normalization {c!r} is not a positive number")
        self.c = c

    def reset(self) -> None:
        self.c = self.c0

    def __repr__(self):
        return f"AdaptiveNormalization(c={self.c:g}, alpha={self.alpha:g}, offset={self.offset:g})"


class ContinuationChain:
    """Several continuations in one run (a beta continuation and an adaptive normalization): each steps after
    every iteration, the entries record all their names, a checkpoint keeps all their states.

    ``Problem(continuation=[a, b])`` makes one. The run may stop only when
    every member may (``at_max``); a change of any member evaluates the
    method again, and drops the cached states when a member that changed
    needs it (``drops_states``).
    """

    def __init__(self, members):
        members = list(members)
        if len(members) < 1:
            raise ValueError("a ContinuationChain needs at least one continuation")
        for m in members:
            if not all(callable(getattr(m, a, None)) for a in ("step", "state", "restore", "reset")):
                raise TypeError(f"each continuation needs step, state, restore and reset, got {type(m).__name__}")
            if isinstance(m, ContinuationChain):
                raise TypeError("a ContinuationChain cannot hold another; list all members in one")
        if len({id(m) for m in members}) != len(members):
            raise ValueError("a continuation is listed twice")
        names: dict = {}
        for m in members:
            for k in _record(m):
                if k in names:
                    raise ValueError(f"two continuations record {k!r} ({type(names[k]).__name__} and "
                                     f"{type(m).__name__}); give one another name")
                names[k] = m
        self.members = members
        self._changed: list = []

    @property
    def at_max(self) -> bool:
        return all(getattr(m, "at_max", True) for m in self.members)

    @property
    def may_drop_states(self) -> bool:
        """Whether a step of some member may need the cached states dropped (the run checks forget())."""
        return any(getattr(m, "drops_states", True) for m in self.members)

    @property
    def drops_states(self) -> bool:
        """Whether the last step's changes need the cached states dropped."""
        return any(getattr(m, "drops_states", True) for m in self._changed)

    @property
    def beta(self) -> float:
        for m in self.members:
            if hasattr(m, "beta"):
                return m.beta
        raise AttributeError("no member of this chain has a beta")

    def record(self) -> dict:
        out = {}
        for m in self.members:
            out.update(_record(m))
        return out

    def step(self, converged: bool, x=None) -> bool:
        self._changed = [m for m in self.members if m.step(converged, x=x)]
        return bool(self._changed)

    def state(self) -> dict:
        return {"chain": [m.state() for m in self.members]}

    def restore(self, state: dict) -> None:
        try:
            states = list(state["chain"])
        except (KeyError, TypeError):
            raise ValueError(f"a continuation chain's state needs a 'chain' list, got {state!r}") from None
        if len(states) != len(self.members):
            raise ValueError(f"the checkpoint's continuation chain has {len(states)} members, this problem's "
                             f"{len(self.members)}")
        for m, st in zip(self.members, states):
            m.restore(st)

    def reset(self) -> None:
        self._changed = []
        for m in self.members:
            m.reset()

    def __repr__(self):
        return f"ContinuationChain({', '.join(map(repr, self.members))})"


def _record(cont) -> dict:
    """What a continuation records in every history entry: its ``record()``, or its ``beta``."""
    record = getattr(cont, "record", None)
    if not callable(record):
        return {"beta": float(cont.beta)}
    return {str(k): float(v) for k, v in record().items()}
