"""The objective protocol f(u, p) and its algebra (sums, scalings).

An objective gives its value and the derivative actions that the reduced
gradient and Hessian-vector product need (u is (n,) or (n, k)):

    grad_u(u, p)        = df/du                 like u
    grad_p(u, p)        = df/dp                 (m,)
    hess_uu(u, p, du)   = f_uu du               like u
    hess_up(u, p, dp)   = f_up dp               like u
    hess_pu(u, p, du)   = f_pu du               (m,)
    hess_pp(u, p, dp)   = f_pp dp               (m,)

Objectives that do not depend on p (``depends_on_p = False``) get zero
p-derivatives for free. A missing derivative raises
:class:`~adjopt.errors.MissingDerivativeError` naming the method to write.

A :class:`Sum` leaves out the terms whose derivative is zero by construction
(:meth:`Objective.zero_derivative`: the base class's zero, not overridden),
rather than adding arrays of zeros: a misfit plus a regularization made
three zero vectors of the state's length per gradient and five per Hessian
action. An overridden derivative is always called.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import MissingDerivativeError


class Objective:
    """Base class of objectives f(u, p)."""

    depends_on_p: bool = False
    #: for f(u, p) = l^T u (no other dependence): the vector l, else None. With b = l constant and A
    #: symmetric the adjoint is the state itself (self-adjoint problem, e.g. compliance)
    linear_load = None

    def value(self, u, p) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement value(u, p)")

    def zero_derivative(self, name: str) -> bool:
        """True when the derivative ``name`` (e.g. ``"grad_p"``) is zero by construction: this class does not
        override the base class's zero (here: the p-derivatives of an objective with ``depends_on_p = False``)."""
        if name in _P_DERIVATIVES:
            return not self.depends_on_p and _inherited(self, name, Objective)
        return False

    def _missing(self, method: str, needed_by: str):
        raise MissingDerivativeError(
            f"{type(self).__name__} does not implement {method}(), which {needed_by} needs; "
            f"implement it, or use a method that does not need it"
        )

    def grad_u(self, u, p):
        self._missing("grad_u", "the gradient")

    def grad_p(self, u, p):
        if not self.depends_on_p:
            return np.zeros(np.shape(p)[0])
        self._missing("grad_p", "the gradient")

    def hess_uu(self, u, p, du):
        self._missing("hess_uu", "hessp (the Hessian action)")

    def hess_up(self, u, p, dp):
        if not self.depends_on_p:
            return np.zeros_like(u)
        self._missing("hess_up", "hessp (the Hessian action)")

    def hess_pu(self, u, p, du):
        if not self.depends_on_p:
            return np.zeros(np.shape(p)[0])
        self._missing("hess_pu", "hessp (the Hessian action)")

    def hess_pp(self, u, p, dp):
        if not self.depends_on_p:
            return np.zeros(np.shape(p)[0])
        self._missing("hess_pp", "hessp (the Hessian action)")

    # -- algebra ---------------------------------------------------------------
    def hess_pp_block(self, u, p, dP) -> np.ndarray:
        """(m, k): :meth:`hess_pp` of each column of the (m, k) block dP (zero when that derivative is zero by
        construction; this default loops over the columns, a term with a block formula overrides it)."""
        if self.zero_derivative("hess_pp"):
            return np.zeros(dP.shape)
        return np.column_stack([self.hess_pp(u, p, dP[:, i]) for i in range(dP.shape[1])])

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:
            return self
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, other])

    __radd__ = __add__

    def __mul__(self, c):
        if not isinstance(c, numbers.Real):
            return NotImplemented
        return Scaled(float(c), self)

    __rmul__ = __mul__

    def __neg__(self):
        return Scaled(-1.0, self)

    def __sub__(self, other):
        return self + (-other)


#: derivatives that vanish when f does not depend on p, and those that vanish when it does not depend on u
_P_DERIVATIVES = ("grad_p", "hess_pp", "hess_up", "hess_pu")
_U_DERIVATIVES = ("grad_u", "hess_uu", "hess_up", "hess_pu")


def _inherited(obj, name: str, base: type) -> bool:
    """obj's method ``name`` is ``base``'s own (not overridden by a subclass)."""
    return getattr(type(obj), name, None) is getattr(base, name)


class Sum(Objective):
    """f = sum_i f_i; every derivative is the sum of the terms' derivatives (terms whose derivative is zero
    by construction are left out, see :meth:`Objective.zero_derivative`)."""

    def __init__(self, terms):
        flat = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, Sum) else [t])
        self.terms = flat
        self.depends_on_p = any(t.depends_on_p for t in flat)

    def value(self, u, p):
        return float(sum(t.value(u, p) for t in self.terms))

    def zero_derivative(self, name: str) -> bool:
        return all(t.zero_derivative(name) for t in self.terms)

    def _sum(self, name, *args):
        terms = [t for t in self.terms if not t.zero_derivative(name)] or self.terms[:1]  # a zero of the shape
        # sum() starts from 0: the result is a new array even for one term (a term may return its own data)
        return sum(getattr(t, name)(*args) for t in terms)

    def grad_u(self, u, p):
        return self._sum("grad_u", u, p)

    def grad_p(self, u, p):
        return self._sum("grad_p", u, p)

    def hess_uu(self, u, p, du):
        return self._sum("hess_uu", u, p, du)

    def hess_up(self, u, p, dp):
        return self._sum("hess_up", u, p, dp)

    def hess_pu(self, u, p, du):
        return self._sum("hess_pu", u, p, du)

    def hess_pp(self, u, p, dp):
        return self._sum("hess_pp", u, p, dp)

    def hess_pp_block(self, u, p, dP):
        out = np.zeros(dP.shape)
        for t in self.terms:
            if not t.zero_derivative("hess_pp"):
                out += t.hess_pp_block(u, p, dP)
        return out

    def __repr__(self):
        return " + ".join(map(repr, self.terms))


class Scaled(Objective):
    """f = c * g."""

    def __init__(self, c: float, term: Objective):
        if isinstance(term, Scaled):
            c, term = c * term.c, term.term
        self.c, self.term = c, term
        self.depends_on_p = term.depends_on_p

    def zero_derivative(self, name: str) -> bool:
        return self.term.zero_derivative(name)

    def value(self, u, p):
        return self.c * self.term.value(u, p)

    def grad_u(self, u, p):
        return self.c * self.term.grad_u(u, p)

    def grad_p(self, u, p):
        return self.c * self.term.grad_p(u, p)

    def hess_uu(self, u, p, du):
        return self.c * self.term.hess_uu(u, p, du)

    def hess_up(self, u, p, dp):
        return self.c * self.term.hess_up(u, p, dp)

    def hess_pu(self, u, p, du):
        return self.c * self.term.hess_pu(u, p, du)

    def hess_pp(self, u, p, dp):
        return self.c * self.term.hess_pp(u, p, dp)

    def hess_pp_block(self, u, p, dP):
        return self.c * self.term.hess_pp_block(u, p, dP)

    def __repr__(self):
        return f"{self.c:g} * {self.term!r}"
