"""A problem: a reduced functional with its starting point and constraints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._validate import as_parameter, owned_operator
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
    mass
        Optional Gram matrix of the L2 inner product on the parameter space: a
        sparse (m, m) mass matrix, or an (m,) array of lumped weights (cell
        volumes for element-wise parameters). The optimizers use it for Riesz
        maps, which make their iteration counts mesh-independent.
    stiffness
        Optional (m, m) stiffness matrix K; with ``mass`` it gives the H1 inner product.
    meta
        Anything else the problem wants to keep (mesh, exact solution, options).
    continuation
        Optional :class:`~adjopt.optimize.BetaContinuation`: the drivers raise
        the beta of its projections during the run (and record it).
    monitor
        Optional callable ``monitor(p) -> dict`` of numbers recorded in every
        history entry (a topology problem's grey level: ``{"grey": ...}``).
    """

    functional: object
    p0: np.ndarray
    bounds: tuple | None = None
    constraints: list = field(default_factory=list)
    name: str = "problem"
    meta: dict = field(default_factory=dict)
    mass: object = None
    stiffness: object = None
    continuation: object = None
    monitor: object = None

    def _check_normalizations(self) -> None:
        """An AdaptiveNormalization is a constraint and a continuation at once: one without the other is a
        mistake (a constraint whose c never moves, or a c that scales nothing)."""
        from .optimize.continuation import AdaptiveNormalization, ContinuationChain

        cont = self.continuation
        members = cont.members if isinstance(cont, ContinuationChain) else ([] if cont is None else [cont])
        continuing = {id(m) for m in members if isinstance(m, AdaptiveNormalization)}
        constraining = {id(c) for c, _ in (self.constraints or []) if isinstance(c, AdaptiveNormalization)}
        if constraining - continuing:
            raise ValueError("a constraint is an AdaptiveNormalization but not the problem's continuation: its "
                             "factor would never move; pass it as continuation= too (with a beta continuation: "
                             "continuation=[beta_continuation, normalization])")
        if continuing - constraining:
            raise ValueError("the continuation is an AdaptiveNormalization that is none of the constraints: its "
                             "factor would scale nothing; use it as the constraint (constraints=[(norm, 0.0)])")

    def __post_init__(self):
        self.p0 = as_parameter(self.p0, self.functional.n_params, "p0").copy()
        if self.bounds is not None:
            try:
                # a scalar bound is a read-only broadcast view (no memory: a distributed problem holds p0 and its
                # bounds on every rank), a vector bound a copy (the caller may reuse its array)
                lo, hi = (np.broadcast_to(np.asarray(b, dtype=float), self.p0.shape) if np.ndim(b) == 0 else
                          np.broadcast_to(np.asarray(b, dtype=float), self.p0.shape).copy() for b in self.bounds)
            except ValueError as exc:
                raise ShapeError(f"bounds must be a (lower, upper) pair of scalars or vectors of length {self.p0.size}") from exc
            for name, v in (("lower", lo), ("upper", hi)):
                if np.any(np.isnan(v)):
                    raise ValueError(f"the {name} bound is NaN at {np.count_nonzero(np.isnan(v))} entries (first at "
                                     f"{int(np.argmax(np.isnan(v)))}); use -inf / inf for no bound")
            if np.any(lo > hi):
                raise ValueError(f"bounds are inverted at {int(np.argmax(lo > hi))}: lower > upper")
            self.bounds = (lo, hi)
        m = self.p0.size
        if self.mass is not None and (np.shape(self.mass) not in ((m,), (m, m))):
            raise ShapeError(f"mass must be an ({m},) array of weights or an ({m}, {m}) matrix, got shape {np.shape(self.mass)}")
        if self.stiffness is not None and np.shape(self.stiffness) != (m, m):
            raise ShapeError(f"stiffness must be ({m}, {m}), got shape {np.shape(self.stiffness)}")
        # copies: the optimizers keep them for the whole run, the caller may reuse its arrays
        self.mass = None if self.mass is None else owned_operator(self.mass, "mass")
        self.stiffness = None if self.stiffness is None else owned_operator(self.stiffness, "stiffness")
        if isinstance(self.continuation, (list, tuple)):
            from .optimize.continuation import ContinuationChain

            self.continuation = ContinuationChain(self.continuation) if len(self.continuation) > 1 else \
                (self.continuation[0] if self.continuation else None)
        if self.continuation is not None and not all(callable(getattr(self.continuation, a, None))
                                                     for a in ("step", "state", "restore", "reset")):
            raise TypeError("continuation must be an adjopt.optimize.BetaContinuation, AdaptiveNormalization, ... "
                            f"(step, state, restore, reset) or a list of them, got {type(self.continuation).__name__}")
        if self.monitor is not None and not callable(self.monitor):
            raise TypeError(f"monitor must be a callable p -> dict of numbers, got {type(self.monitor).__name__}")
        for i, con in enumerate(self.constraints):
            if not (isinstance(con, tuple) and len(con) == 2 and hasattr(con[0], "value") and hasattr(con[0], "gradient")):
                raise TypeError(f"constraint {i} must be a (functional, upper) pair with value and gradient")
            try:
                upper = float(con[1])
            except (TypeError, ValueError):
                raise TypeError(f"constraint {i}'s upper bound must be a number, got {con[1]!r}") from None
            if np.isnan(upper):
                raise ValueError(f"constraint {i}'s upper bound is NaN; give a number (inf for no bound)")
        self._check_normalizations()
