"""Min-max problems in the bound (epigraph) formulation, for the design drivers (MMA).

    minimize over x     max_i f_i(x) / s_i         subject to  g_j(x) <= u_j,  lo <= x <= hi

becomes, with one more variable z (Svanberg's bound formulation),

    minimize over (x, z)   z      subject to  f_i(x) / s_i - z <= 0,  g_j(x) <= u_j,
                                              lo <= x <= hi,  z_lo <= z <= z_hi

which is smooth: MMA handles it like any other inequality-constrained problem.
The worst case of a robust design (the eroded, intermediate and dilated
designs of a projected topology) or of several load cases is of this form.
The scales s_i (default |f_i(x0)|, so that z starts near 1) keep the
constraints of the order of one, as MMA's constants assume.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..problem import Problem
from .base import _SumTimes, _Totals, forget

__all__ = ["minmax_problem", "MinMaxObjective", "BoundConstraint", "DesignConstraint"]


class MinMaxObjective:
    """J(x, z) = z: the objective of the bound formulation (``n_params`` = n + 1).

    ``state(xz)`` and ``adjoint(xz)`` are those of ``fields_from`` at x (for
    result files), when it is given.
    """

    def __init__(self, n: int, fields_from=None):
        self.n = int(n)
        self.n_params = self.n + 1
        self.fields_from = fields_from

    def state(self, xz):
        if self.fields_from is None:
            raise AttributeError("this min-max has no functional to take a state from (fields_from)")
        return self.fields_from.state(self._check(xz)[:-1])

    def adjoint(self, xz):
        if self.fields_from is None:
            raise AttributeError("this min-max has no functional to take an adjoint from (fields_from)")
        return self.fields_from.adjoint(self._check(xz)[:-1])

    def _check(self, xz) -> np.ndarray:
        xz = np.asarray(xz, dtype=np.float64)
        if xz.shape != (self.n_params,):
            raise ShapeError(f"the bound formulation's parameters are (x, z) of length {self.n_params}, got shape "
                             f"{xz.shape}")
        return xz

    def value(self, xz) -> float:
        return float(self._check(xz)[-1])

    def gradient(self, xz, tol=None) -> np.ndarray:
        self._check(xz)
        g = np.zeros(self.n_params)
        g[-1] = 1.0
        return g

    def hessp(self, xz, v, tol=None) -> np.ndarray:
        self._check(xz)
        self._check(v)
        return np.zeros(self.n_params)

    def forget(self) -> None:
        """Nothing to drop: z holds no state (the bound constraints drop theirs)."""


class BoundConstraint:
    """c(x, z) = f(x) / scale - z (<= 0 wanted): f of the design part below the bound z."""

    def __init__(self, functional, scale: float):
        self.f = functional
        self.scale = float(scale)
        self.n_params = int(functional.n_params) + 1

    def value(self, xz) -> float:
        xz = np.asarray(xz, dtype=np.float64)
        return float(self.f.value(xz[:-1])) / self.scale - float(xz[-1])

    def gradient(self, xz, tol=None) -> np.ndarray:
        xz = np.asarray(xz, dtype=np.float64)
        g = np.empty(self.n_params)
        g[:-1] = np.asarray(self.f.gradient(xz[:-1]), dtype=np.float64) / self.scale
        g[-1] = -1.0
        return g

    def hessp(self, xz, v, tol=None) -> np.ndarray:
        xz, v = np.asarray(xz, dtype=np.float64), np.asarray(v, dtype=np.float64)
        if xz.shape != (self.n_params,) or v.shape != (self.n_params,):
            raise ShapeError(f"x and v must be vectors of length {self.n_params} (the design and z), got shapes "
                             f"{xz.shape} and {v.shape}")
        out = np.zeros(self.n_params)
        out[:-1] = np.asarray(self.f.hessp(xz[:-1], v[:-1]), dtype=np.float64) / self.scale
        return out

    def forget(self) -> None:
        forget(self.f)


class DesignConstraint:
    """A constraint of the design part alone, on (x, z) (zero derivative in z)."""

    def __init__(self, functional):
        self.f = functional
        self.n_params = int(functional.n_params) + 1

    def value(self, xz) -> float:
        return float(self.f.value(np.asarray(xz, dtype=np.float64)[:-1]))

    def gradient(self, xz, tol=None) -> np.ndarray:
        g = np.zeros(self.n_params)
        g[:-1] = self.f.gradient(np.asarray(xz, dtype=np.float64)[:-1])
        return g

    def hessp(self, xz, v, tol=None) -> np.ndarray:
        out = np.zeros(self.n_params)
        out[:-1] = self.f.hessp(np.asarray(xz, dtype=np.float64)[:-1], np.asarray(v, dtype=np.float64)[:-1])
        return out

    def forget(self) -> None:
        forget(self.f)


def minmax_problem(functionals, p0, bounds, constraints=(), scales=None, z_bounds=(0.0, 100.0), name="minmax",
                   meta=None, mass=None, continuation=None, monitor=None, fields_from=None) -> Problem:
    """The bound formulation of ``min_x max_i f_i(x) / s_i`` as an :class:`~adjopt.Problem` over (x, z).

    Parameters
    ----------
    functionals
        The f_i (value and gradient, hessp for Hessian actions), each of
        the same ``n_params``.
    p0, bounds
        The design's start and its (lower, upper) bounds (finite, for MMA).
    constraints
        The design's own ``(functional, upper)`` constraints.
    scales
        The s_i (> 0); default ``|f_i(p0)|`` (a zero value gets 1).
    z_bounds
        Bounds of z (0, 100): with the default scales z starts at 1. A run
        that ends with z at its upper bound and a bound constraint violated
        is reported unsuccessful (raise the bound).
    name, meta, mass, continuation, monitor
        As for :class:`~adjopt.Problem`; ``mass`` and ``monitor`` are the
        design's (z gets the mean weight; the monitor sees x alone).
    fields_from
        The functional whose state and adjoint at x the result files show
        (default the first of ``functionals``).

    Returns
    -------
    Problem
        Parameters (x, z) of length n + 1 with z0 = max_i f_i(p0) / s_i;
        ``meta["minmax"]`` holds ``n``, the scales and the bound
        constraints (``design(xz)`` gives x).
    """
    fs = list(functionals)
    if not fs:
        raise ValueError("minmax_problem needs at least one functional")
    n = int(fs[0].n_params)
    if any(int(f.n_params) != n for f in fs):
        raise ShapeError(f"the functionals of a min-max must share n_params; got {[int(f.n_params) for f in fs]}")
    p0 = np.asarray(p0, dtype=np.float64)
    if p0.shape != (n,):
        raise ShapeError(f"p0 must have length {n}, got shape {p0.shape}")
    values = np.array([float(f.value(p0)) for f in fs])
    if scales is None:
        scales = np.where(np.abs(values) > 0, np.abs(values), 1.0)
    scales = np.array(scales, dtype=np.float64).reshape(-1)  # a copy: the caller's array may change
    if scales.shape != (len(fs),) or not np.all(np.isfinite(scales) & (scales > 0)):
        raise ValueError(f"scales must be {len(fs)} finite numbers > 0, got {scales!r}")
    zlo, zhi = (float(v) for v in z_bounds)
    z0 = float(np.max(values / scales))
    if not (np.isfinite(zlo) and np.isfinite(zhi) and zlo <= z0 <= zhi):
        raise ValueError(f"z_bounds ({zlo:g}, {zhi:g}) must be finite and hold the start z0 = max f_i / s_i = {z0:g}")
    try:
        lo, hi = (np.broadcast_to(np.asarray(b, dtype=np.float64), (n,)) for b in bounds)
    except (TypeError, ValueError):
        raise ShapeError(f"bounds must be a (lower, upper) pair of scalars or vectors of length {n}") from None
    constraints = list(constraints)
    if len(constraints) == 2 and not isinstance(constraints[0], tuple) and hasattr(constraints[0], "value"):
        raise TypeError("constraints must be a list of (functional, upper) pairs: [(volume, 0.5)], not one pair")
    for i, con in enumerate(constraints):
        if not (isinstance(con, tuple) and len(con) == 2 and hasattr(con[0], "value")):
            raise TypeError(f"constraint {i} must be a (functional, upper) pair with value and gradient")
        if int(getattr(con[0], "n_params", n)) != n:
            raise ShapeError(f"constraint {i} takes {con[0].n_params} parameters, the functionals {n}")
    if continuation is not None:
        missing = [i for i, f in enumerate(list(fs) + [c for c, _ in constraints])
                   if hasattr(f, "cache") and not callable(getattr(f, "forget", None))]
        if missing:
            raise ValueError(f"functional {missing[0]} caches states but has no forget(): a continuation would "
                             "leave it stale")
    parts = [BoundConstraint(f, s) for f, s in zip(fs, scales)]
    cons = [(c, 0.0) for c in parts] + [(DesignConstraint(f), float(u)) for f, u in constraints]
    if mass is not None:
        if not isinstance(mass, np.ndarray) and not isinstance(mass, (list, tuple)):
            raise TypeError(f"mass of a min-max must be the design's ({n},) array of weights, got "
                            f"{type(mass).__name__}")
        mass = np.asarray(mass, dtype=np.float64)
        if mass.shape != (n,):
            raise ShapeError(f"mass must be the design's ({n},) weights, got shape {mass.shape}")
        mass = np.append(mass, float(np.mean(mass)))
    meta = dict(meta or {})
    meta["minmax"] = {"n": n, "scales": scales, "bounded": parts, "design": lambda xz: np.asarray(xz)[:n]}
    watch = None if monitor is None else (lambda xz: monitor(np.asarray(xz)[:n]))
    source = fs[0] if fields_from is None else fields_from
    objective = MinMaxObjective(n, source if hasattr(source, "state") else None)
    stats = [f.stats for f in fs if hasattr(f, "stats")]
    if stats:
        objective.stats = _Totals(stats)  # the solves of all the bounded functionals
    times = [f.times for f in fs if hasattr(f, "times")]
    if times:
        objective.times = _SumTimes(times)  # their phases: a run's history splits its iterations by them
    return Problem(objective, np.append(p0, z0), bounds=(np.append(lo, zlo), np.append(hi, zhi)), constraints=cons,
                   name=name, meta=meta, mass=mass, continuation=continuation, monitor=watch)
