"""A problem: a reduced functional with its starting point and constraints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._validate import as_parameter
from .errors import ShapeError


@dataclass
class Problem:
    """What a gallery ``build()`` returns and what the optimizers take.

    Attributes
    ----------
    functional
        The :class:`~adjopt.functional.ReducedFunctional`.
    p0
        Starting parameter vector.
    bounds
        Optional ``(lower, upper)`` arrays (or scalars) of length m.
    constraints
        Inequality constraints g(p) <= 0 as ``(functional, upper)`` pairs meaning
        ``functional.value(p) <= upper`` (e.g. a volume fraction); each functional has
        value, gradient and hessp.
    name
        A short name for logs and result files.
    meta
        Anything else the problem wants to keep (mesh, exact solution, options).
    """

    functional: object
    p0: np.ndarray
    bounds: tuple | None = None
    constraints: list = field(default_factory=list)
    name: str = "problem"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.p0 = as_parameter(self.p0, self.functional.n_params, "p0").copy()
        if self.bounds is not None:
            try:
                lo, hi = (np.broadcast_to(np.asarray(b, dtype=float), self.p0.shape).copy() for b in self.bounds)
            except ValueError as exc:
                raise ShapeError(f"bounds must be a (lower, upper) pair of scalars or vectors of length {self.p0.size}") from exc
            if np.any(lo > hi):
                raise ValueError(f"bounds are inverted at {int(np.argmax(lo > hi))}: lower > upper")
            self.bounds = (lo, hi)
