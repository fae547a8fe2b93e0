"""Objectives of a trajectory: J = sum over terms of sum_i f_i(u_{s_i}, p) + g(p).

A time term knows its time levels ``steps`` (indices into the grid's ``times``; negative ones count from
the end, -1 is the final time) and, for the i-th of them, the value and the derivatives of f_i(u, p)
(the same names as :class:`~adjopt.objectives.Objective`, with the index i first). A plain
:class:`~adjopt.objectives.Objective` that does not read u (a regularization such as
:class:`~adjopt.TikhonovL2`) is a term in p alone and is counted once.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._threads import dot
from .._validate import owned, owned_operator, refuse_complex
from ..errors import ShapeError
from ..objectives import Objective

_U_DERIVATIVES = ("grad_u", "hess_uu", "hess_up", "hess_pu")


def _levels(steps, name: str = "steps") -> np.ndarray:
    refuse_complex(steps, name)
    arr = np.array(steps, copy=True).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} must name at least one time level")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integer time levels (use TimeStepping.level(t) for a time t), "
                        f"got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _nonnegative(w: np.ndarray, name: str) -> None:
    if np.any(w < 0):
        raise ValueError(f"{name} must be >= 0 (a negative weight makes the misfit unbounded below); "
                         f"{name}[{int(np.argmin(w))}] = {float(w.min())!r}")


class TimeTerm:
    """sum_i f_i(u_{s_i}, p) over the levels ``steps``; see the module docstring."""

    steps: np.ndarray
    depends_on_p = False

    def check(self, n: int) -> None:
        """Refuse what does not fit a state of size n (called by the functional)."""

    def resolve(self, n_steps: int) -> np.ndarray:
        """The levels as indices in 0..N (negative ones from the end), checked unique and in range."""
        s = np.where(self.steps < 0, self.steps + n_steps + 1, self.steps)
        if np.any(s < 0) or np.any(s > n_steps):
            bad = self.steps[(s < 0) | (s > n_steps)][0]
            raise ValueError(f"{type(self).__name__}: time level {int(bad)} is outside 0..{n_steps} "
                             f"(the grid has {n_steps} steps)")
        if np.unique(s).size != s.size:
            raise ValueError(f"{type(self).__name__}: a time level appears twice in steps {self.steps.tolist()}; "
                             f"sum its weights into one entry")
        return s

    def value(self, i, u, p) -> float:
        raise NotImplementedError

    def grad_u(self, i, u, p):
        raise NotImplementedError

    def grad_p(self, i, u, p):
        return None

    def hess_uu(self, i, u, p, du):
        raise NotImplementedError

    def hess_up(self, i, u, p, dp):
        return None

    def hess_pu(self, i, u, p, du):
        return None

    def hess_pp(self, i, u, p, dp):
        return None


class TimeSeriesMisfit(TimeTerm):
    """f = sum_i w_i 0.5 ||B u_{s_i} - d_i||_W^2: observations (sensor readings) at the levels ``steps``.

    Parameters
    ----------
    data
        (len(steps), n_obs): one row of observations per level.
    steps
        The time levels observed (integers; -1 the final time).
    B
        Observation operator (n_obs, n), sparse or dense; ``None`` observes u itself.
    weights
        Time quadrature weights w_i (len(steps),); default 1.
    W
        Per-observation weights (n_obs,), e.g. 1 / sigma^2 for a noise of standard deviation sigma (as in
        :class:`~adjopt.SquaredMisfit`); default 1.
    """

    def __init__(self, data, steps, B=None, weights=None, W=None):
        self.steps = _levels(steps)
        self.data = owned(data, "data")
        if self.data.ndim != 2 or self.data.shape[0] != self.steps.size:
            raise ShapeError(f"data must have shape (len(steps), n_obs) = ({self.steps.size}, n_obs), "
                             f"got {self.data.shape}")
        n_obs = self.data.shape[1]
        if B is not None:
            B = owned_operator(B, "the observation operator B")
            if B.ndim != 2 or B.shape[0] != n_obs:
                raise ShapeError(f"the observation operator B must have {n_obs} rows (one per observation), "
                                 f"got shape {B.shape}")
            B = sp.csr_array(B) if sp.issparse(B) else B
        self.B = B
        self.BT = None if B is None else (B.T.tocsr() if sp.issparse(B) else np.ascontiguousarray(B.T))
        self.weights = np.ones(self.steps.size) if weights is None else owned(weights, "weights")
        if self.weights.shape != (self.steps.size,):
            raise ShapeError(f"weights must have one entry per level ({self.steps.size}), got {self.weights.shape}")
        _nonnegative(self.weights, "weights")
        self.W = None if W is None else owned(W, "the weights W")
        if self.W is not None and self.W.shape != (n_obs,):
            raise ShapeError(f"W must have one weight per observation ({n_obs}), got {self.W.shape}")
        if self.W is not None:
            _nonnegative(self.W, "W")

    def check(self, n: int) -> None:
        """Refuse an observation operator (or data without one) that does not fit a state of size n."""
        cols = self.data.shape[1] if self.B is None else self.B.shape[1]
        if cols != n:
            what = "B" if self.B is not None else "the data (without B, u itself is observed)"
            raise ShapeError(f"{what} has {cols} columns but the state has {n} entries")

    def _obs(self, u):
        if self.B is None:
            if u.shape[0] != self.data.shape[1]:
                raise ShapeError(f"without B the data must have one column per state entry ({u.shape[0]}), "
                                 f"got {self.data.shape[1]}")
            return u
        return self.B @ u

    def _back(self, r):
        return r if self.BT is None else self.BT @ r

    def _w(self, r):
        return r if self.W is None else self.W * r

    def value(self, i, u, p):
        r = self._obs(u) - self.data[i]
        return 0.5 * self.weights[i] * dot(r, self._w(r))  # no BLAS threads spinning against the solver's

    def grad_u(self, i, u, p):
        return self.weights[i] * self._back(self._w(self._obs(u) - self.data[i]))

    def hess_uu(self, i, u, p, du):
        return self.weights[i] * self._back(self._w(self._obs(du)))


class AtSteps(TimeTerm):
    """An :class:`~adjopt.objectives.Objective` f(u, p) evaluated at the levels ``steps`` with weights:
    sum_i w_i f(u_{s_i}, p). ``AtSteps(objective, [-1])`` is a final-time objective."""

    def __init__(self, objective: Objective, steps, weights=None):
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an adjopt Objective, got {type(objective).__name__}")
        self.objective = objective
        self.steps = _levels(steps)
        self.weights = np.ones(self.steps.size) if weights is None else owned(weights, "weights")
        if self.weights.shape != (self.steps.size,):
            raise ShapeError(f"weights must have one entry per level ({self.steps.size}), got {self.weights.shape}")
        self.depends_on_p = bool(objective.depends_on_p)

    def value(self, i, u, p):
        return self.weights[i] * float(self.objective.value(u, p))

    def grad_u(self, i, u, p):
        return self.weights[i] * self.objective.grad_u(u, p)

    def grad_p(self, i, u, p):
        return self.weights[i] * self.objective.grad_p(u, p) if self.depends_on_p else None

    def hess_uu(self, i, u, p, du):
        return self.weights[i] * self.objective.hess_uu(u, p, du)

    def hess_up(self, i, u, p, dp):
        return self.weights[i] * self.objective.hess_up(u, p, dp) if self.depends_on_p else None

    def hess_pu(self, i, u, p, du):
        return self.weights[i] * self.objective.hess_pu(u, p, du) if self.depends_on_p else None

    def hess_pp(self, i, u, p, dp):
        return self.weights[i] * self.objective.hess_pp(u, p, dp) if self.depends_on_p else None


def Final(objective: Objective) -> AtSteps:
    """f(u_N, p): an objective of the final state."""
    return AtSteps(objective, [-1])


def split_terms(objective) -> tuple[list[TimeTerm], list[Objective]]:
    """(time terms, terms in p alone) of the ``objective`` argument: a term, an Objective of p, or a list."""
    if objective is None:
        return [], []  # J = 0: a functional used for its states (synthetic data, plots)
    items = list(objective) if isinstance(objective, (list, tuple)) else [objective]
    terms, params = [], []
    for item in items:
        if isinstance(item, TimeTerm):
            terms.append(item)
        elif isinstance(item, Objective):
            if not all(item.zero_derivative(name) for name in _U_DERIVATIVES):
                raise TypeError(
                    f"{type(item).__name__} reads the state u: say at which time levels, "
                    f"AtSteps({type(item).__name__}(...), steps=[...]) (or Final(...) for the final time); "
                    f"a bare Objective is taken as a term in p alone (a regularization)")
            params.append(item)
        else:
            raise TypeError(f"an objective term must be a TimeTerm (TimeSeriesMisfit, AtSteps, Final) or an "
                            f"Objective of p, got {type(item).__name__}")
    return terms, params


__all__ = ["TimeTerm", "TimeSeriesMisfit", "AtSteps", "Final", "split_terms"]
