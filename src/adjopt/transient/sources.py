"""Right-hand sides b(t, p) of a transient problem and initial conditions u0(p).

A time-dependent right-hand side implements

    value(t, p)               b(t, p), shape (n,)
    vjp_add(t, p, w, out)     out += (db(t)/dp)^T w
    jvp(t, p, dp)             (db(t)/dp) dp
    second_add(t, p, w, dp, out)   out += (d2b(t)/dp2 . dp)^T w      (nothing when ``affine``)

``vjp_add`` adds into the gradient instead of returning an (m,) vector, so that a source with one block of
parameters per time node costs O(n) per level, not O(m). ``steady`` sources (b independent of t) let the
functional sum the adjoint over all levels first and call ``vjp`` once.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._validate import as_count, as_parameter, check_finite, owned, owned_operator, refuse_complex
from ..errors import ShapeError
from ..operators import ConstantVector, ParametricVector


class TimeDependentVector:
    """b(t, p): see the module docstring. ``n_params`` is None when b does not depend on p."""

    n: int
    n_params: int | None = None
    affine: bool = True
    steady: bool = False
    depends_on_p: bool = True

    def value(self, t: float, p) -> np.ndarray:
        raise NotImplementedError

    def vjp_add(self, t: float, p, w, out: np.ndarray) -> None:
        raise NotImplementedError

    def jvp(self, t: float, p, dp) -> np.ndarray:
        raise NotImplementedError

    def second_add(self, t: float, p, w, dp, out: np.ndarray) -> None:
        if not self.affine:
            raise NotImplementedError


class Steady(TimeDependentVector):
    """b(t, p) = b(p): a :class:`~adjopt.operators.ParametricVector` (or a constant array) that does not change
    in time."""

    steady = True

    def __init__(self, b):
        if not isinstance(b, ParametricVector):
            b = ConstantVector(b)
        if isinstance(b, ConstantVector) and b.b.ndim != 1:
            raise ShapeError("a transient right-hand side must be a single vector (n,), not several columns")
        self.b = b
        self.n, self.n_params = b.n, b.n_params
        self.affine, self.depends_on_p = b.affine, b.depends_on_p

    def value(self, t, p):
        return self.b.value(p)

    def vjp_add(self, t, p, w, out):
        out += self.b.vjp(p, w)

    def jvp(self, t, p, dp):
        return self.b.jvp(p, dp)

    def second_add(self, t, p, w, dp, out):
        if not self.affine:
            out += self.b.second(p, w, dp)


class Modulated(TimeDependentVector):
    """b(t, p) = g(t) b(p): a fixed spatial pattern (a :class:`~adjopt.operators.ParametricVector` or an array)
    switched on and off by a scalar function g of time (a pulse, a ramp, a periodic forcing)."""

    def __init__(self, b, g):
        if not callable(g):
            raise TypeError(f"g must be a callable g(t) -> float, got {type(g).__name__}")
        self.inner = Steady(b)
        self.g = g
        self.n, self.n_params = self.inner.n, self.inner.n_params
        self.affine, self.depends_on_p = self.inner.affine, self.inner.depends_on_p

    def _g(self, t):
        v = self.g(float(t))
        refuse_complex(v, "g(t)")
        if np.ndim(v) != 0:
            raise TypeError(f"g(t) must return a number, got an array of shape {np.shape(v)} at t = {float(t)!r}")
        v = float(v)
        if not np.isfinite(v):
            check_finite(np.array([v]), f"g(t) at t = {t!r}")
        return v

    def value(self, t, p):
        return self._g(t) * self.inner.value(t, p)

    def vjp_add(self, t, p, w, out):
        g = self._g(t)
        if g != 0.0:
            out += g * self.inner.b.vjp(p, w)

    def jvp(self, t, p, dp):
        return self._g(t) * self.inner.jvp(t, p, dp)

    def second_add(self, t, p, w, dp, out):
        if not self.affine:
            out += self._g(t) * self.inner.b.second(p, w, dp)


class TimeFunction(TimeDependentVector):
    """b(t) = f(t): a forcing that does not depend on p, from a callable ``f(t) -> (n,)``."""

    depends_on_p = False

    def __init__(self, f, n: int):
        if not callable(f):
            raise TypeError(f"f must be a callable f(t) -> array of shape (n,), got {type(f).__name__}")
        self.f = f
        self.n = as_count(n, "n")

    def value(self, t, p):
        b = self.f(float(t))
        refuse_complex(b, "f(t)")
        b = np.array(b, dtype=np.float64, copy=True)
        if b.shape != (self.n,):
            raise ShapeError(f"f(t) must return an array of shape ({self.n},), got {b.shape} at t = {t!r}")
        check_finite(b, f"f(t) at t = {t!r}")
        return b

    def vjp_add(self, t, p, w, out):
        pass

    def jvp(self, t, p, dp):
        return np.zeros(self.n)


class SpaceTimeSource(TimeDependentVector):
    """b(t, p) = B s(t): a source whose spatial values s are parameters at K time nodes, linear in time between
    them (hat functions phi_k),

        s(t) = sum_k phi_k(t) p_k,   p = [p_0, ..., p_{K-1}]  (K blocks of B's m columns each),

    so that n_params = K m. ``B`` (n, m) maps the m source values to the right-hand side (for a nodal source
    in a finite-element space: the mass matrix, restricted to the free dofs). Outside [t_0, t_{K-1}] the
    source is held at its end values. Linear in p: ``second_add`` adds nothing.
    """

    def __init__(self, B, nodes):
        B = owned_operator(B, "B")
        if B.ndim != 2:
            raise ShapeError(f"B must be an (n, m) matrix, got shape {B.shape}")
        nodes = owned(np.ravel(nodes), "the time nodes")
        if nodes.size < 1 or np.any(np.diff(nodes) <= 0):
            raise ValueError("the time nodes must be one or more strictly increasing times")
        self.B = sp.csr_array(B) if sp.issparse(B) else B
        self.BT = self.B.T.tocsr() if sp.issparse(B) else np.ascontiguousarray(self.B.T)
        self.nodes = nodes
        self.n, self.m = int(B.shape[0]), int(B.shape[1])
        self.n_params = self.m * nodes.size

    def weights(self, t: float) -> list[tuple[int, float]]:
        """[(k, phi_k(t))] for the (at most two) nonzero hat functions at t."""
        nodes = self.nodes
        if nodes.size == 1 or t <= nodes[0]:
            return [(0, 1.0)]
        if t >= nodes[-1]:
            return [(nodes.size - 1, 1.0)]
        k = int(np.searchsorted(nodes, t, side="right")) - 1
        s = (float(t) - nodes[k]) / (nodes[k + 1] - nodes[k])
        return [(k, 1.0 - s), (k + 1, s)] if s > 0 else [(k, 1.0)]

    def _s(self, t, p):
        p = p.reshape(self.nodes.size, self.m)
        return sum(c * p[k] for k, c in self.weights(t))

    def value(self, t, p):
        return self.B @ self._s(t, as_parameter(p, self.n_params))

    def vjp_add(self, t, p, w, out):
        btw = self.BT @ w
        blocks = out.reshape(self.nodes.size, self.m)
        for k, c in self.weights(t):
            blocks[k] += c * btw

    def jvp(self, t, p, dp):
        return self.B @ self._s(t, as_parameter(dp, self.n_params, "dp"))


def as_source(rhs, n: int | None) -> TimeDependentVector | None:
    """The right-hand side argument of :class:`TransientReducedFunctional` as a :class:`TimeDependentVector`."""
    if rhs is None or isinstance(rhs, TimeDependentVector):
        return rhs
    if isinstance(rhs, ParametricVector) or isinstance(rhs, np.ndarray) or sp.issparse(rhs):
        return Steady(rhs)
    if callable(rhs):
        if n is None:
            raise ValueError("a callable right-hand side f(t) needs the size of the state")
        return TimeFunction(rhs, n)
    raise TypeError(f"rhs must be None, an array, a ParametricVector, a TimeDependentVector or a callable f(t), "
                    f"got {type(rhs).__name__}")


def as_initial(u0, n: int) -> ParametricVector:
    """u0 as a :class:`~adjopt.operators.ParametricVector` (zero for None, constant for an array)."""
    if u0 is None:
        return ConstantVector(np.zeros(n))
    if isinstance(u0, ParametricVector):
        if u0.n != n:
            raise ShapeError(f"u0 has {u0.n} entries but the state has {n}")
        return u0
    refuse_complex(u0, "u0")
    v = ConstantVector(owned(u0.toarray() if sp.issparse(u0) else u0, "u0"))
    if v.b.shape != (n,):
        raise ShapeError(f"u0 must have shape ({n},), got {np.shape(u0)}")
    return v


__all__ = ["TimeDependentVector", "Steady", "Modulated", "TimeFunction", "SpaceTimeSource", "as_source",
           "as_initial"]
