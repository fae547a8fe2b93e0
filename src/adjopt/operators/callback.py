"""Parametric matrices defined by user callbacks: bring your own A(p).

The user gives a fixed sparsity pattern, ``values(p) -> data`` in the
pattern's own entry order and the Jacobian ``jacobian(p) -> J`` with
J[s, k] = d data_s / d p_k (sparse, nnz x m). adjopt maps the caller's
entries onto its canonical CSR pattern (sorted column indices, duplicates
summed) with a fixed 0/1 matrix P (canonical slot <- caller's entry), so

    A(p) data   = P values(p)
    dA/dp       = P J(p)
    contract(p, w, z)_k = sum_s (P J)[s, k] w[row_s] z[col_s]     (a gather per slot)
    tangent values      = P J dp

and the second-order term

    C2(w, z, dp)_k = sum_j dp_j w^T (d2A / dp_k dp_j) z

comes from a ``second(p, w, z, dp)`` callback, or is zero when the user
declares ``affine=True``.

The Jacobian of the last p is kept (one, replaced when p changes): a value,
a gradient and a Hessian action at one p call ``jacobian(p)`` once, not once
per contraction and tangent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from .._threads import threads_for
from .._validate import as_count, check_finite, check_flag, refuse_complex
from ..errors import MissingDerivativeError, PatternError
from . import _kernels
from .base import ParametricMatrix


def _caller_entries(pattern):
    """(rows, cols, shape) of the pattern's stored entries, in the caller's order.

    CSR (or a tuple ``(indptr, indices, shape)``): the order of ``data``; CSC:
    its own ``data`` order; COO: the order of its triplets. Any other format
    (or a dense array) has no entry order of its own: its canonical CSR order
    (rows, then sorted columns) is used. Nothing of the caller's is modified.
    """
    if isinstance(pattern, tuple):
        if len(pattern) != 3:
            raise PatternError("a pattern tuple must be (indptr, indices, shape)")
        indptr, indices, shape = pattern
        indptr, indices = np.asarray(indptr), np.asarray(indices)
        if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
            raise PatternError(f"indptr and indices must be integer arrays, got {indptr.dtype} and {indices.dtype}")
        shape = tuple(int(v) for v in shape)
        if indptr.ndim != 1 or indptr.size != shape[0] + 1 or indptr[0] != 0 or indptr[-1] != indices.size \
                or np.any(np.diff(indptr) < 0):
            raise PatternError(f"indptr must be a nondecreasing array of {shape[0] + 1} offsets from 0 to "
                               f"len(indices) = {indices.size}")
        rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
        return rows, indices.astype(np.int64), shape
    if sp.issparse(pattern) and pattern.format == "csr":
        rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
        return rows, pattern.indices.astype(np.int64), pattern.shape
    if sp.issparse(pattern) and pattern.format == "csc":
        cols = np.repeat(np.arange(pattern.shape[1]), np.diff(pattern.indptr))
        return pattern.indices.astype(np.int64), cols, pattern.shape
    if sp.issparse(pattern) and pattern.format == "coo":
        return np.asarray(pattern.row, dtype=np.int64), np.asarray(pattern.col, dtype=np.int64), pattern.shape
    mat = sp.csr_array(pattern, copy=True)
    mat.sum_duplicates()
    mat.sort_indices()
    return np.repeat(np.arange(mat.shape[0]), np.diff(mat.indptr)), mat.indices.astype(np.int64), mat.shape


#: relative tolerance of the check of a ``symmetric=True`` declaration (the one CHOLMOD refuses an A by)
SYMMETRY_RTOL = 1e-12


class _LastJacobian:
    """The Jacobian evaluated last and a copy of the p it was evaluated at.

    The key is a copy, so a caller who changes its p array in place afterwards gets a fresh evaluation, not a
    stale Jacobian. One entry only: the old one is released before the callback builds the next.
    """

    __slots__ = ("_entry",)

    def __init__(self):
        self._entry = None

    def get(self, p: np.ndarray, evaluate: Callable):
        entry = self._entry
        if entry is not None and np.array_equal(entry[0], p):
            return entry[1]
        self._entry = None
        key = np.array(p, dtype=np.float64, copy=True)  # taken before the callback, which might change p
        J = evaluate(p)
        self._entry = (key, J)
        return J

    def clear(self) -> None:
        self._entry = None


def _asymmetry(M: sp.csr_array) -> float:
    """max |M - M^T| (0 for a symmetric M), O(nnz)."""
    diff = sp.csr_array(M - M.T)
    return float(np.abs(diff.data).max()) if diff.nnz else 0.0


class CallbackMatrix(ParametricMatrix):
    """A(p) from a fixed pattern and callbacks for its values and their Jacobian.

    Parameters
    ----------
    pattern
        A scipy sparse matrix whose stored entries are A's pattern (CSR in
        any column order and with duplicates, CSC or COO: the values come in
        that matrix's own entry order), or a tuple ``(indptr, indices,
        shape)`` in CSR layout. Duplicate entries are summed into one slot;
        the caller's matrix is not modified nor kept.
    n_params
        Number of parameters m (a positive integer).
    values
        ``values(p) -> (nnz,)``: A(p)'s values, one per stored entry of the
        pattern, in the pattern's order. A reused output buffer is fine: the
        values are copied.
    jacobian
        ``jacobian(p) -> (nnz, m)`` sparse or dense: d values / d p, rows in
        the same order.
    second
        Optional ``second(p, w, z, dp) -> (m,)``, the second-order contraction
        C2(w, z, dp)_k = sum_j dp_j w^T (d2A / dp_k dp_j) z, with w and z
        given as (n, k) arrays (k right-hand sides; sum over the columns).
    affine
        Declare A affine in p (C2 = 0). Without ``second`` and without
        ``affine=True``, Hessian actions raise :class:`MissingDerivativeError`.
    symmetric
        Declare A(p) = A(p)^T for every p (sets :attr:`symmetric`; default
        False, never guessed). A :class:`~adjopt.ReducedFunctional` then uses
        the self-adjoint shortcut for a compliance objective f = b^T u with a
        constant b (lam = u: no adjoint solve, one solve per Hessian action
        instead of two) and takes (dA . dp) u and (dA . dp)^T lam in one
        two-column tangent pass. The solver choice does not depend on it:
        ``solver="auto"`` and ``"cholmod"`` look at the assembled A itself
        (CHOLMOD for a symmetric positive definite A, whose transposed solve
        is the solve). The promise is checked in O(nnz): at every assembly,
        max|A - A^T| <= 1e-12 max|A| (a matrix symmetric at the start p0 = 0
        only is caught at the next p), and at the first Jacobian evaluation
        the same for the tangent dA/dp . d in one fixed direction d; a broken
        promise raises ``ValueError``.

    Notes
    -----
    ``jacobian(p)`` is evaluated once per p: the last one is kept (with a copy
    of its p) and serves every contraction and tangent at that p.
    """

    def __init__(
        self,
        pattern,
        n_params: int,
        values: Callable,
        jacobian: Callable,
        second: Callable | None = None,
        affine: bool = False,
        symmetric: bool = False,
    ):
        self.n_params = as_count(n_params, "n_params")
        check_flag(symmetric, "symmetric")
        check_flag(affine, "affine")
        for name, cb in (("values", values), ("jacobian", jacobian), ("second", second)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be a callable, got {type(cb).__name__}")
        rows, cols, shape = _caller_entries(pattern)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise PatternError(f"A must be square, the pattern has shape {shape}")
        n = int(shape[0])
        if rows.size and (cols.min() < 0 or cols.max() >= n):
            raise PatternError(f"the pattern has column indices outside [0, {n})")
        if rows.size == 0:
            raise PatternError("the pattern has no entries")
        keys = rows.astype(np.int64) * n + cols
        ukeys, slot = np.unique(keys, return_inverse=True)
        idx_t = np.int32 if max(n, ukeys.size) < np.iinfo(np.int32).max else np.int64
        urows = ukeys // n
        self.shape = (n, n)
        self.indptr = np.zeros(n + 1, dtype=idx_t)
        np.cumsum(np.bincount(urows, minlength=n), out=self.indptr[1:])
        self.indices = (ukeys - urows * n).astype(idx_t)
        self._rows = urows.astype(idx_t)
        #: number of values the callbacks give (the caller's stored entries, duplicates included)
        self.n_given = int(keys.size)
        # canonical slot <- caller's entry; None when the caller's order is the canonical one
        canonical = self.n_given == ukeys.size and bool(np.all(slot == np.arange(slot.size)))
        self._slot = None if canonical else slot.reshape(-1)
        self._P = None if canonical else sp.csr_array(
            (np.ones(self.n_given), (self._slot, np.arange(self.n_given))), shape=(ukeys.size, self.n_given))
        self._values_cb = values
        self._jacobian_cb = jacobian
        self._second_cb = second
        self.affine = bool(affine) and second is None
        self.symmetric = bool(symmetric)
        # the declaration is checked on every assembly and once on a tangent (cleared when it passes)
        self._check_tangent_symmetry = self.symmetric
        self._last_jacobian = _LastJacobian()

    def _refuse_asymmetry(self, data: np.ndarray, scale: float, what: str, scale_name: str) -> None:
        """ValueError when the CSR values ``data`` on the pattern are not symmetric to SYMMETRY_RTOL * scale."""
        gap = _asymmetry(self._csr(data))
        if gap > SYMMETRY_RTOL * scale:
            raise ValueError(
                f"symmetric=True promises A(p) = A(p)^T for every p, but {what} is not symmetric: max|M - M^T| = "
                f"{gap:.3g} > {SYMMETRY_RTOL:g} * {scale_name} = {SYMMETRY_RTOL * scale:.3g}. Pass symmetric=False (the "
                f"default) for a nonsymmetric A(p), or make the values and their Jacobian symmetric")

    def values(self, p) -> np.ndarray:
        p = self.check_p(p)
        data = self._values_cb(p)
        refuse_complex(data, "values(p)")
        data = np.array(data, dtype=np.float64, copy=True)  # the callback may reuse its buffer
        if data.shape != (self.n_given,):
            raise PatternError(f"values(p) returned shape {data.shape}, but the pattern has {self.n_given} entries")
        check_finite(data, "values(p)")
        if self._slot is not None:
            data = np.bincount(self._slot, weights=data, minlength=self.nnz)
        if self.symmetric:
            self._refuse_asymmetry(data, float(np.abs(data).max()), "M = A(p) at this p", "max|A|")
        return data

    def _jacobian_at(self, p) -> sp.csr_array:
        """:meth:`jacobian` at p, evaluated once per p (the last one is kept); the caller must not modify it."""
        return self._last_jacobian.get(p, self._checked_jacobian)

    def _checked_jacobian(self, p) -> sp.csr_array:
        J = self.jacobian(p)
        if self._check_tangent_symmetry and J.nnz:
            # the tangent dA/dp . d of a symmetric A(p) is symmetric: one fixed pseudo-random direction d; the scale
            # |J| |d| bounds the round-off of J d
            d = np.random.default_rng(20240611).standard_normal(self.n_params)
            self._refuse_asymmetry(J @ d, float((abs(J) @ np.abs(d)).max()),
                                   "its derivative M = dA/dp . d (jacobian(p) at the first p evaluated, a fixed "
                                   "direction d)", "max(|J| |d|)")
        self._check_tangent_symmetry = False
        return J

    def jacobian(self, p) -> sp.csr_array:
        """d data / d p as a sparse (nnz, m) array in the canonical pattern, checked against the pattern (a fresh
        evaluation of the callback; the contractions and tangents use the one kept for the last p)."""
        J = self._jacobian_cb(p)
        refuse_complex(J.data if sp.issparse(J) else J, "jacobian(p)")
        J = sp.csr_array(J, dtype=np.float64, copy=True) if (sp.issparse(J) or np.ndim(J) == 2) else None
        if J is None or J.shape != (self.n_given, self.n_params):
            got = None if J is None else J.shape
            raise PatternError(f"jacobian(p) must have shape (nnz, m) = ({self.n_given}, {self.n_params}), got {got}")
        check_finite(J.data, "jacobian(p)")
        return J if self._P is None else sp.csr_array(self._P @ J)

    def _slot_products(self, w, z) -> np.ndarray:
        """sum over the columns of w[row_s] z[col_s], per canonical slot s (one kernel call)."""
        prod = np.empty(self.nnz)
        w2, z2 = _kernels.as_columns(w), _kernels.as_columns(z)
        with threads_for(self.nnz * w2.shape[1]):
            _kernels.slot_products(self._rows, self.indices, w2, z2, prod)
        return prod

    def _slot_contract(self, G, w, z) -> np.ndarray:
        """G^T (slot products) for G of shape (given entries, m) in the caller's entry order."""
        G = G if self._P is None else sp.csr_array(self._P @ G)
        return G.T @ self._slot_products(w, z)

    def _contract(self, p, w, z):
        return self._jacobian_at(p).T @ self._slot_products(w, z)

    def _tangent_values(self, p, dp):
        return self._jacobian_at(p) @ dp

    def _second(self, p, w, z, dp):
        if self._second_cb is None and getattr(self, "_second_jacobian", None) is not None:
            return self._slot_contract(self._second_jacobian(p, dp), w, z)
        if self._second_cb is None:
            raise MissingDerivativeError(
                "this CallbackMatrix has no second-order term: pass second=(p, w, z, dp) -> (m,) "
                "or affine=True if A depends affinely on p (Hessian actions need it)"
            )
        out = np.asarray(self._second_cb(p, _kernels.as_columns(w), _kernels.as_columns(z), dp), dtype=np.float64)
        if out.shape != (self.n_params,):
            raise PatternError(f"second(p, w, z, dp) must return shape ({self.n_params},), got {out.shape}")
        return out


class ConstantMatrix(ParametricMatrix):
    """A matrix that does not depend on p (parameters enter only through b(p)).

    Every derivative of A vanishes: contract, tangent and second are zero. Use
    it for source and control problems, where p is a right-hand side.
    """

    affine = True
    constant = True

    def __init__(self, A, n_params: int):
        refuse_complex(A.data if sp.issparse(A) else A, "A")
        A = sp.csr_array(A, dtype=np.float64, copy=True)  # a copy: the caller's matrix is neither kept nor sorted
        A.sum_duplicates()
        A.sort_indices()
        if A.shape[0] != A.shape[1]:
            raise PatternError(f"A must be square, got shape {A.shape}")
        check_finite(A.data, "the values of A")
        self.shape = (int(A.shape[0]), int(A.shape[1]))
        self.indptr, self.indices = A.indptr, A.indices
        self._data = A.data  # A is a copy: adjopt owns it
        self.n_params = as_count(n_params, "n_params")

    def values(self, p) -> np.ndarray:
        self.check_p(p)
        return self._data

    def _contract(self, p, w, z):
        return np.zeros(self.n_params)

    def _tangent_values(self, p, dp):
        return np.zeros_like(self._data)
