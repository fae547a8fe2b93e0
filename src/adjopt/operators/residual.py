"""Parametric residuals R(u, p) = 0: the nonlinear counterpart of :class:`ParametricMatrix`.

With n states u, m parameters p and L(u, p) = w^T R(u, p) for a vector w:

    residual(u, p)            = R(u, p)                                   (n,)
    jacobian(u, p)            = K = dR/du, sparse in a fixed pattern       (n, n)
    vjp(u, p, w)              = (dR/dp)^T w                               (m,)
    jvp(u, p, dp)             = (dR/dp) dp                                (n,)
    second(u, p, w, du, dp)   = (L_uu du + L_up dp,  L_pu du + L_pp dp)   ((n,), (m,))

The four second-order contractions are those of the second-adjoint equation and the Hessian action
(:mod:`adjopt.functional_nonlinear`). For R = A(p) u - b(p) they are (0 + (dA.dp)^T w,
C(w, du) + C2(w, u, dp) - w^T b''(p) dp), which is how the linear functional's formulas come out of them.
Nothing of size n x n x m or n x n x n is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from .._validate import as_parameter, check_finite, refuse_complex
from ..errors import MissingDerivativeError, PatternError, ShapeError


def _state(v, n: int, name: str) -> np.ndarray:
    refuse_complex(v, name)
    arr = np.asarray(v, dtype=np.float64)
    if arr.shape != (n,):
        raise ShapeError(f"{name} must have shape ({n},) (one value per state dof), got {arr.shape}")
    check_finite(arr, name)
    return arr


class ParametricResidual:
    """A residual R(u, p) whose Jacobian K = dR/du has a fixed sparsity pattern.

    Subclasses set ``n`` (states), ``n_params``, ``indptr`` and ``indices`` (the CSR pattern of K) and implement
    :meth:`_residual`, :meth:`_jacobian_values`, :meth:`_vjp`, :meth:`_jvp` and :meth:`_second`. The public
    methods check their arguments (shapes, NaN/Inf) first.
    """

    n: int
    n_params: int
    indptr: np.ndarray
    indices: np.ndarray
    #: True when K(u, p) is symmetric for every u and p (declared, never guessed): Cholesky solvers may serve
    symmetric: bool = False
    #: the solver needs no Newton loop when R is affine in u; a residual never is unless it says so
    linear: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    # -- public API -------------------------------------------------------------------------------
    def residual(self, u, p) -> np.ndarray:
        """R(u, p), shape (n,)."""
        return self._residual(self.check_u(u), self.check_p(p))

    def jacobian(self, u, p) -> sp.csr_array:
        """K = dR/du at (u, p) as a CSR matrix in the fixed pattern."""
        data = self._jacobian_values(self.check_u(u), self.check_p(p))
        return sp.csr_array((data, self.indices, self.indptr), shape=self.shape, copy=False)

    def vjp(self, u, p, w) -> np.ndarray:
        """(dR/dp)^T w, shape (m,)."""
        return self._vjp(self.check_u(u), self.check_p(p), _state(w, self.n, "w"))

    def jvp(self, u, p, dp) -> np.ndarray:
        """(dR/dp) dp, shape (n,)."""
        return self._jvp(self.check_u(u), self.check_p(p), as_parameter(dp, self.n_params, "dp"))

    def second(self, u, p, w, du, dp) -> tuple[np.ndarray, np.ndarray]:
        """(L_uu du + L_up dp, L_pu du + L_pp dp) for L = w^T R(u, p): the second-order terms of a Hessian action."""
        return self._second(self.check_u(u), self.check_p(p), _state(w, self.n, "w"), _state(du, self.n, "du"),
                            as_parameter(dp, self.n_params, "dp"))

    def initial_guess(self, p) -> np.ndarray:
        """Newton's start when no state at a nearby p is cached: zero."""
        return np.zeros(self.n)

    # -- helpers ----------------------------------------------------------------------------------
    def check_p(self, p) -> np.ndarray:
        return as_parameter(p, self.n_params)

    def check_u(self, u) -> np.ndarray:
        return _state(u, self.n, "u")

    def _residual(self, u, p):
        raise NotImplementedError

    def _jacobian_values(self, u, p):
        raise NotImplementedError

    def _vjp(self, u, p, w):
        raise NotImplementedError

    def _jvp(self, u, p, dp):
        raise NotImplementedError

    def _second(self, u, p, w, du, dp):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n}, nnz={self.nnz}, n_params={self.n_params})"


def _real(v, name: str) -> np.ndarray:
    """A callback's output as a finite real float64 array (complex refused, NaN/Inf named)."""
    if v is None:
        raise TypeError(f"{name} returned None; it must return an array")
    refuse_complex(v, name)
    out = np.asarray(v, dtype=np.float64)
    check_finite(out, name)
    return out


def _canonical(mat, name: str) -> sp.csr_array:
    """A copy of ``mat`` as CSR with sorted columns and duplicates summed."""
    if mat is None:
        raise TypeError(f"{name} returned None; it must return a sparse matrix or a 2-D array")
    if sp.issparse(mat):
        refuse_complex(mat.data, name)
    else:
        refuse_complex(mat, name)
    out = sp.csr_array(mat, dtype=np.float64, copy=True)
    check_finite(out.data, name)
    out.sum_duplicates()
    out.sort_indices()
    return out


class CallbackResidual(ParametricResidual):
    """R(u, p) from user callbacks: bring your own residual and Jacobian.

    Parameters
    ----------
    residual
        ``residual(u, p) -> (n,)``.
    jacobian
        ``jacobian(u, p) -> K`` (any scipy sparse format or dense), K = dR/du. The pattern is fixed by
        ``pattern`` or by the first call; a later K with an entry outside it raises
        :class:`~adjopt.errors.PatternError` (entries of the pattern it leaves out are zeros).
    dR_dp
        ``dR_dp(u, p) -> (n, m)`` matrix (sparse or dense), the derivative of R with respect to p.
    n, n_params
        Numbers of states and parameters.
    second
        Optional ``second(u, p, w, du, dp) -> (hu, hp)`` with, for L(u, p) = w^T R(u, p),
        ``hu = L_uu du + L_up dp`` (n,) and ``hp = L_pu du + L_pp dp`` (m,): the action of w^T d2R in the
        directions (du, dp). Without it, values and gradients work and Hessian actions raise
        :class:`~adjopt.errors.MissingDerivativeError`.
    symmetric
        Declare K symmetric for every (u, p) (then Cholesky solvers may be used).
    pattern
        Optional sparse matrix whose stored entries are K's pattern.

    Notes
    -----
    Check the callbacks against finite differences with :func:`adjopt.verify.check_residual` before an
    optimization: a Jacobian that is not the derivative of the residual makes Newton slow and the gradient wrong.
    """

    def __init__(self, residual: Callable, jacobian: Callable, dR_dp: Callable, n: int, n_params: int,
                 second: Callable | None = None, symmetric: bool = False, pattern=None):
        for name, f in (("residual", residual), ("jacobian", jacobian), ("dR_dp", dR_dp)):
            if not callable(f):
                raise TypeError(f"{name} must be callable, got {type(f).__name__}")
        if second is not None and not callable(second):
            raise TypeError(f"second must be callable or None, got {type(second).__name__}")
        for name, v in (("n", n), ("n_params", n_params)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.n, self.n_params = int(n), int(n_params)
        self._r, self._k, self._rp, self._s = residual, jacobian, dR_dp, second
        self.symmetric = bool(symmetric)
        self.indptr = self.indices = None
        if pattern is not None:
            self._fix(_canonical(pattern, "pattern"))

    def _fix(self, K: sp.csr_array) -> None:
        if K.shape != self.shape:
            raise ShapeError(f"the Jacobian must be {self.n} x {self.n}, got {K.shape}")
        self.indptr, self.indices = K.indptr.copy(), K.indices.copy()
        self.indptr.flags.writeable = self.indices.flags.writeable = False

    @property
    def nnz(self) -> int:
        return 0 if self.indices is None else int(self.indices.shape[0])

    def _residual(self, u, p):
        r = _real(self._r(u.copy(), p.copy()), "residual(u, p)")
        if r.shape != (self.n,):
            raise ShapeError(f"residual(u, p) must return shape ({self.n},), got {r.shape}")
        return r

    def _jacobian_values(self, u, p):
        K = _canonical(self._k(u.copy(), p.copy()), "jacobian(u, p)")
        if self.indices is None:
            self._fix(K)
        if K.shape != self.shape:
            raise ShapeError(f"jacobian(u, p) must return an {self.n} x {self.n} matrix, got {K.shape}")
        if np.array_equal(K.indptr, self.indptr) and np.array_equal(K.indices, self.indices):
            return K.data
        # embed into the fixed pattern: every entry of K must be a slot of it
        rows = np.repeat(np.arange(self.n), np.diff(K.indptr))
        fixed_rows = np.repeat(np.arange(self.n), np.diff(self.indptr))
        keys = fixed_rows.astype(np.int64) * self.n + self.indices
        want = rows.astype(np.int64) * self.n + K.indices
        pos = np.searchsorted(keys, want)
        ok = (pos < keys.size) & (keys[np.minimum(pos, keys.size - 1)] == want)
        if not np.all(ok):
            i = int(np.flatnonzero(~ok)[0])
            raise PatternError(f"jacobian(u, p) has an entry ({rows[i]}, {K.indices[i]}) outside the pattern fixed "
                               "by the first call (or by pattern=): pass pattern= with every entry K can hold")
        data = np.zeros(self.nnz)
        data[pos] = K.data
        return data

    def _derivative(self, u, p):
        D = self._rp(u.copy(), p.copy())
        if sp.issparse(D):
            refuse_complex(D.data, "dR_dp(u, p)")
            D = sp.csr_array(D, dtype=np.float64)
            check_finite(D.data, "dR_dp(u, p)")
        else:
            D = _real(D, "dR_dp(u, p)")
        if D.shape != (self.n, self.n_params):
            raise ShapeError(f"dR_dp(u, p) must return an ({self.n}, {self.n_params}) matrix, got {D.shape}")
        return D

    def _vjp(self, u, p, w):
        return np.asarray(self._derivative(u, p).T @ w, dtype=np.float64).reshape(self.n_params)

    def _jvp(self, u, p, dp):
        return np.asarray(self._derivative(u, p) @ dp, dtype=np.float64).reshape(self.n)

    def _second(self, u, p, w, du, dp):
        if self._s is None:
            raise MissingDerivativeError(
                "a Hessian action needs the second-order terms of the residual: pass second=(u, p, w, du, dp) -> "
                "(L_uu du + L_up dp, L_pu du + L_pp dp) with L = w^T R(u, p) to CallbackResidual (values and "
                "gradients work without it; so does hessp(..., gauss_newton=True))")
        out = self._s(u.copy(), p.copy(), w.copy(), du.copy(), dp.copy())
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError("second(u, p, w, du, dp) must return a pair (hu, hp)")
        hu, hp = (_real(v, "second(u, p, w, du, dp)") for v in out)
        if hu.shape != (self.n,) or hp.shape != (self.n_params,):
            raise ShapeError(f"second(u, p, w, du, dp) must return shapes ({self.n},) and ({self.n_params},), got "
                             f"{hu.shape} and {hp.shape}")
        return hu, hp
