"""Parametric right-hand sides b(p).

A :class:`ParametricVector` gives b(p) of shape (n,) or (n, k) (k load cases)
and the derivative actions the adjoint formulas need:

    vjp(p, lam)        = (db/dp)^T lam                 (m,)  (columns summed)
    jvp(p, dp)         = (db/dp) dp                    like b
    second(p, lam, dp) = lam^T (d2b/dp2 . dp)          (m,)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from .._threads import threads_for
from .._validate import as_count, as_parameter, as_state_like, check_finite, check_flag, owned, owned_operator, refuse_complex
from ..errors import MissingDerivativeError, PatternError, ShapeError
from . import _kernels
from .coefficients import Coefficient, as_coefficient


class ParametricVector:
    """b(p), shape (n,) or (n, k). ``n_params`` is None when b accepts any p (constant b)."""

    n: int
    n_params: int | None = None
    affine: bool = True
    depends_on_p: bool = True

    def value(self, p) -> np.ndarray:
        raise NotImplementedError

    def vjp(self, p, lam) -> np.ndarray:
        raise NotImplementedError

    def jvp(self, p, dp) -> np.ndarray:
        raise NotImplementedError

    def second(self, p, lam, dp) -> np.ndarray:
        if self.affine:
            return np.zeros(np.shape(p)[0])
        raise NotImplementedError

    def _p(self, p, name="p"):
        return np.asarray(p, dtype=np.float64) if self.n_params is None else as_parameter(p, self.n_params, name)


class ConstantVector(ParametricVector):
    """b independent of p: (n,) or (n, k) for k right-hand sides."""

    depends_on_p = False

    def __init__(self, b):
        refuse_complex(b, "b")
        b = owned(b.toarray() if sp.issparse(b) else b, "b")  # a copy: the caller may change its b
        if b.ndim not in (1, 2):
            raise ShapeError(f"b must have shape (n,) or (n, k), got {b.shape}")
        check_finite(b, "b")
        self.b = b
        self.n = b.shape[0]

    def value(self, p):
        return self.b

    def vjp(self, p, lam):
        return np.zeros(np.shape(p)[0])

    def jvp(self, p, dp):
        return np.zeros_like(self.b)


class AffineVector(ParametricVector):
    """b(p) = b0 + B p with B of shape (n, m) (dense or sparse)."""

    def __init__(self, b0, B):
        self.B = owned_operator(B, "B")
        if self.B.ndim != 2:
            raise ShapeError(f"B must be an (n, m) matrix, got shape {self.B.shape}")
        self.n, self.n_params = int(self.B.shape[0]), int(self.B.shape[1])
        b0 = np.zeros(self.n) if b0 is None else owned(b0, "b0")
        if b0.shape != (self.n,):
            raise ShapeError(f"b0 must have shape ({self.n},) to match B of shape {self.B.shape}, got {b0.shape}")
        self.b0 = b0

    def value(self, p):
        return self.b0 + self.B @ self._p(p)

    def vjp(self, p, lam):
        return self.B.T @ as_state_like(lam, self.n, "lam").reshape(self.n, -1).sum(axis=1)

    def jvp(self, p, dp):
        return self.B @ self._p(dp, "dp")


class ElementCoefficientVector(ParametricVector):
    """b(p) = b0 + sum_e phi(p_e) f_e scattered through the connectivity.

    The vector companion of :class:`ElementCoefficientMatrix` (body forces
    scaled by a density, or the lifting of nonzero Dirichlet values through a
    parametric coefficient). With l_e(lam) = lam_e^T f_e:

        vjp_e = phi'(p_e) l_e(lam),   second_e = phi''(p_e) dp_e l_e(lam).
    """

    def __init__(self, conn, local, coefficient: Coefficient | str | None = None, n: int | None = None, b0=None):
        conn = np.asarray(conn)
        if conn.ndim != 2 or not np.issubdtype(conn.dtype, np.integer):
            raise PatternError(f"conn must be an (n_elem, k) integer array, got shape {conn.shape}")
        n_elem, k = conn.shape
        refuse_complex(local, "local vectors")
        local = np.array(local, dtype=np.float64, copy=True)  # a copy: adjopt owns what it keeps
        check_finite(local, "local vectors")
        if local.shape == (k,):
            self._estride, self.local = 0, local.reshape(1, k)
        elif local.shape == (n_elem, k):
            self._estride, self.local = 1, local
        else:
            raise PatternError(f"local vectors must have shape ({k},) or ({n_elem}, {k}), got {local.shape}")
        self.n = int(conn.max()) + 1 if n is None else int(n)
        if conn.max() >= self.n:
            raise PatternError(f"conn refers to dof {int(conn.max())} but n={self.n}")
        self.conn = np.array(conn, copy=True, order="C")
        self.n_params = n_elem
        self.coefficient = as_coefficient(coefficient)
        self.affine = self.coefficient.affine
        self.b0 = np.zeros(self.n) if b0 is None else owned(b0, "b0")
        if self.b0.shape != (self.n,):
            raise ShapeError(f"b0 must have shape ({self.n},), got {self.b0.shape}")
        keep = self.conn >= 0
        self._dofs = self.conn[keep]
        self._elem_of = np.broadcast_to(np.arange(n_elem)[:, None], conn.shape)[keep]
        self._entry_vals = np.broadcast_to(self.local if self._estride else self.local[0], conn.shape)[keep]

    def _scatter(self, coef):
        return np.bincount(self._dofs, weights=coef[self._elem_of] * self._entry_vals, minlength=self.n)

    def _forms(self, lam):
        out = np.empty(self.n_params)
        lam = _kernels.as_columns(as_state_like(lam, self.n, "lam"))
        with threads_for(self.conn.size * lam.shape[1]):
            _kernels.element_linear(self.conn, self.local, self._estride, lam, out)
        return out

    def value(self, p):
        return self.b0 + self._scatter(self.coefficient(self._p(p)))

    def vjp(self, p, lam):
        return self.coefficient.d1(self._p(p)) * self._forms(lam)

    def jvp(self, p, dp):
        return self._scatter(self.coefficient.d1(self._p(p)) * self._p(dp, "dp"))

    def second(self, p, lam, dp):
        p = self._p(p)
        return self.coefficient.d2(p) * self._p(dp, "dp") * self._forms(lam)


class CallbackVector(ParametricVector):
    """b(p) from callbacks: ``value(p) -> (n,)`` and ``jacobian(p) -> (n, m)``.

    ``second(p, lam, dp) -> (m,)`` is optional; without it (and without
    ``affine=True``) Hessian actions raise :class:`MissingDerivativeError`.
    """

    def __init__(self, n: int, n_params: int, value: Callable, jacobian: Callable, second: Callable | None = None, affine: bool = False):
        self.n, self.n_params = as_count(n, "n"), as_count(n_params, "n_params")
        for name, cb in (("value", value), ("jacobian", jacobian), ("second", second)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be a callable, got {type(cb).__name__}")
        self._value, self._jac, self._second = value, jacobian, second
        self.affine = check_flag(affine, "affine") and second is None

    def _J(self, p):
        J = self._jac(p)
        refuse_complex(J.data if sp.issparse(J) else J, "jacobian(p)")
        J = sp.csr_array(J, dtype=np.float64) if sp.issparse(J) else np.asarray(J, dtype=np.float64)
        if J.shape != (self.n, self.n_params):
            raise PatternError(f"jacobian(p) must have shape ({self.n}, {self.n_params}), got {J.shape}")
        return J

    def value(self, p):
        b = self._value(self._p(p))
        refuse_complex(b, "value(p)")
        b = np.array(b, dtype=np.float64, copy=True)  # the callback may reuse its buffer
        if b.shape != (self.n,):
            raise PatternError(f"value(p) must return shape ({self.n},), got {b.shape}")
        return b

    def vjp(self, p, lam):
        lam = as_state_like(lam, self.n, "lam")
        return self._J(self._p(p)).T @ lam.reshape(self.n, -1).sum(axis=1)

    def jvp(self, p, dp):
        return self._J(self._p(p)) @ self._p(dp, "dp")

    def second(self, p, lam, dp):
        if self.affine:
            return np.zeros(self.n_params)
        if self._second is None:
            raise MissingDerivativeError(
                "this CallbackVector has no second-order term: pass second=(p, lam, dp) -> (m,) or affine=True"
            )
        return np.asarray(self._second(self._p(p), lam, self._p(dp, "dp")), dtype=np.float64)


def as_vector(b) -> ParametricVector:
    """Wrap an array as a :class:`ConstantVector`; pass a ParametricVector through."""
    return b if isinstance(b, ParametricVector) else ConstantVector(b)
