"""Element-coefficient matrices: A(p) = A_0 + sum_e phi(p_e) K_e.

One parameter per element; K_e is the element's local matrix scattered into
the global pattern through its connectivity row (negative entries mark dofs
removed by Dirichlet condensation and are skipped). With

    a_e(w, z) = w_e^T K_e z_e

the derivatives are diagonal in the elements:

    contract(p, w, z)_e = phi'(p_e) a_e(w, z)
    second(p, w, z, dp)_e = phi''(p_e) dp_e a_e(w, z)
    tangent values        = gather of dp_e phi'(p_e) K_e into the pattern.

The pattern and the slot -> (element, local entry) map are built once;
assembly is a parallel gather over CSR slots, so no two threads write the
same entry.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import scipy.sparse as sp

from .._threads import threads_for
from .._validate import as_count, as_parameter, as_state_like, check_finite, refuse_complex
from ..errors import PatternError, ShapeError
from . import _kernels, _pattern
from .base import ParametricMatrix
from .coefficients import Coefficient, as_coefficient

logger = logging.getLogger(__name__)


def _index_dtype(n: int):
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def build_slot_map(conn: np.ndarray, n: int, extra=None):
    """Build the CSR pattern of the element scatter and its slot map (see :mod:`._pattern`).

    Parameters
    ----------
    conn
        (E, k) global dof indices; negative entries are skipped.
    n
        Matrix size.
    extra
        Optional sparse matrix whose pattern is added (e.g. A_0).

    Returns
    -------
    indptr, indices, slot_ptr, slot_elem, slot_loc, extra_slots
        CSR pattern; for each slot s the entries ``slot_ptr[s]:slot_ptr[s+1]``
        of ``slot_elem``/``slot_loc`` list the (element, local entry k*a+b)
        pairs that add into it, in increasing element order; ``extra_slots``
        maps the COO entries of ``extra`` (in ``sp.coo_array(extra)`` order) to slots.
    """
    n_elem, k = conn.shape
    if n >= np.iinfo(np.int32).max:
        raise PatternError(f"n = {n} dofs: adjopt's patterns hold up to 2^31 - 1 rows")
    conn = np.ascontiguousarray(conn)
    ptr, elem, loc = _pattern.incidence(conn, n)
    if extra is not None:
        ex = sp.coo_array(extra)
        xrow, xcol = ex.row.astype(np.int64), ex.col.astype(np.int64)
        x_ent = np.argsort(xrow, kind="stable")
        x_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(xrow, minlength=n), out=x_ptr[1:])
        x_col = xcol[x_ent]
    else:
        x_ptr, x_col, x_ent = np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nchunks = max(1, min(n, 2 * numba.get_num_threads()))
    row_slots = np.empty(n, dtype=np.int64)
    row_entries = np.empty(n, dtype=np.int64)
    _pattern.count_rows(conn, ptr, elem, x_ptr, x_col, n, nchunks, row_slots, row_entries)
    n_slots, n_entry = int(row_slots.sum()), int(row_entries.sum())
    idx_t = _index_dtype(max(n, n_slots))
    ptr_t = _index_dtype(n_entry)
    indptr = np.zeros(n + 1, dtype=idx_t)
    np.cumsum(row_slots, out=indptr[1:])
    entry_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_entries, out=entry_ptr[1:])
    indices = np.empty(n_slots, dtype=idx_t)
    slot_ptr = np.empty(n_slots + 1, dtype=ptr_t)
    slot_ptr[-1] = n_entry
    slot_elem = np.empty(n_entry, dtype=_index_dtype(n_elem))
    slot_loc = np.empty(n_entry, dtype=np.int16 if k * k <= np.iinfo(np.int16).max else np.int32)
    extra_slots = np.empty(x_ent.size, dtype=np.int64)
    max_row = int(row_slots.max()) if n else 0
    _pattern.fill_rows(conn, ptr, elem, loc, x_ptr, x_col, x_ent, n, nchunks, max_row, indptr, entry_ptr, indices,
                       slot_ptr, slot_elem, slot_loc, extra_slots)
    return indptr, indices, slot_ptr, slot_elem, slot_loc, extra_slots


class ElementCoefficientMatrix(ParametricMatrix):
    """A(p) = A_0 + sum_e phi(p_e) K_e with one parameter per element.

    Parameters
    ----------
    conn
        (E, k) integer connectivity: global dof of each local dof; a negative
        entry drops that local row and column (a condensed Dirichlet dof).
    local
        One (k, k) local matrix shared by all elements (congruent elements,
        stored once) or (E, k, k) local matrices.
    coefficient
        phi as a :class:`~adjopt.operators.coefficients.Coefficient` or a name
        ('identity', 'exp', 'simp'); default identity.
    n
        Number of rows (dofs); default ``conn.max() + 1``.
    A0
        Optional constant sparse n x n part.

    Examples
    --------
    >>> import numpy as np
    >>> from adjopt.operators import ElementCoefficientMatrix
    >>> conn = np.array([[0, 1], [1, 2]])
    >>> K = np.array([[1.0, -1.0], [-1.0, 1.0]])
    >>> A = ElementCoefficientMatrix(conn, K, A0=np.eye(3))
    >>> A.assemble(np.array([2.0, 3.0])).toarray()
    array([[ 3., -2.,  0.],
           [-2.,  6., -3.],
           [ 0., -3.,  4.]])
    """

    def __init__(self, conn, local, coefficient: Coefficient | str | None = None, n: int | None = None, A0=None):
        conn = np.asarray(conn)
        if conn.ndim != 2 or not np.issubdtype(conn.dtype, np.integer):
            raise PatternError(f"conn must be an (n_elem, k) integer array, got dtype {conn.dtype} shape {conn.shape}")
        n_elem, k = conn.shape
        if n_elem == 0:
            raise PatternError("conn has no elements")
        refuse_complex(local, "local matrices")
        local = np.array(local, dtype=np.float64, copy=True)  # a copy: adjopt owns what it keeps
        if local.shape == (k, k):
            estride = 0
            local2 = np.ascontiguousarray(local.reshape(1, k * k))
        elif local.shape == (n_elem, k, k):
            estride = 1
            local2 = np.ascontiguousarray(local.reshape(n_elem, k * k))
        else:
            hint = ""
            if local.shape in ((k, n_elem, n_elem), (n_elem, n_elem)):
                hint = (f"; conn looks transposed (one row per element is expected: pass conn.T, of shape "
                        f"({k}, {n_elem}))")
            raise PatternError(
                f"local matrices must have shape ({k}, {k}) (shared) or ({n_elem}, {k}, {k}) (one per element) "
                f"to match conn of shape {conn.shape}; got {local.shape}{hint}"
            )
        if not np.all(np.isfinite(local2)):
            raise PatternError("local matrices contain NaN or Inf")
        cmax = int(conn.max())
        if cmax < 0:
            raise PatternError("conn has no dof: every entry is negative (every dof condensed)")
        n = cmax + 1 if n is None else as_count(n, "n")
        if cmax >= n:
            bad = int(np.argmax(conn.max(axis=1) >= n))
            raise PatternError(f"element {bad} refers to dof {int(conn[bad].max())} but the matrix has only n={n} rows")
        if A0 is not None:
            refuse_complex(A0.data if sp.issparse(A0) else A0, "A0")
            A0 = sp.csr_array(A0, dtype=np.float64)
            check_finite(A0.data, "A0")
            if A0.shape != (n, n):
                raise PatternError(f"A0 must have shape ({n}, {n}), got {A0.shape}")
        idx_t = _index_dtype(max(n, n_elem))
        self.conn = np.array(conn, dtype=idx_t, copy=True, order="C")
        self.local = local2
        self._estride = estride
        self.k = k
        self.coefficient = as_coefficient(coefficient)
        self.affine = self.coefficient.affine
        self.shape = (int(n), int(n))
        self.n_params = n_elem
        (self.indptr, self.indices, self._slot_ptr, self._slot_elem, self._slot_loc, extra_slots) = build_slot_map(
            self.conn, n, A0
        )
        # the constant part's values in the pattern; empty (= zero, not read by the kernel) without A0
        self._base = np.zeros(0)
        if A0 is not None:
            a0 = sp.coo_array(A0)
            self._base = np.bincount(extra_slots, weights=a0.data, minlength=self.indices.shape[0]).astype(np.float64)
        self._zero = np.zeros(0)
        # symmetric for every p when every local matrix and A0 are (to round-off)
        lk = local2.reshape(-1, k, k)
        tol = 1e-13 * max(float(np.abs(local2).max()), np.finfo(float).tiny)
        sym = bool(np.all(np.abs(lk - lk.transpose(0, 2, 1)) <= tol))
        if sym and A0 is not None:
            d = abs(A0 - A0.T)
            sym = d.nnz == 0 or float(d.max()) <= 1e-13 * max(float(abs(A0).max()), np.finfo(float).tiny)
        self.symmetric = sym
        logger.debug("ElementCoefficientMatrix: n=%d, %d elements, nnz=%d, shared local=%s", n, n_elem, self.nnz, estride == 0)

    @property
    def n_elements(self) -> int:
        return self.n_params

    def gather(self, coef: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        """CSR data of base + sum_e coef[e] K_e (the assembly kernel).

        ``coef`` has one value per element; ``base`` (optional) one per slot of the pattern.
        """
        coef = np.ascontiguousarray(coef, dtype=np.float64)
        if coef.shape != (self.n_params,):
            raise ShapeError(f"coef must have one value per element, shape ({self.n_params},), got {coef.shape}")
        if base is not None:
            base = np.ascontiguousarray(base, dtype=np.float64)
            if base.shape != (self.nnz,):
                raise ShapeError(f"base must have one value per slot of the pattern, shape ({self.nnz},), "
                                 f"got {base.shape}")
        out = np.empty(self.nnz)
        with threads_for(self._slot_elem.shape[0]):
            _kernels.gather_slots(
                self._slot_ptr, self._slot_elem, self._slot_loc, self.local, self._estride,
                coef, self._zero if base is None else base, out,
            )
        return out

    def values(self, p) -> np.ndarray:
        p = self.check_p(p)
        return self.gather(self.coefficient(p), self._base if self._base.size else None)

    def element_forms(self, w: np.ndarray, z: np.ndarray) -> np.ndarray:
        """a_e(w, z) = w_e^T K_e z_e for every element (columns summed); w, z of shape (n,) or (n, k)."""
        w, z = self._check_pair(w, z, "w", "z")
        out = np.empty(self.n_params)
        with threads_for(self.n_params * self.k * self.k * (1 if w.ndim == 1 else w.shape[1])):
            if w.ndim == 1 and z.ndim == 1:
                _kernels.element_bilinear1(self.conn, self.local, self._estride, np.ascontiguousarray(w),
                                           np.ascontiguousarray(z), 8 * numba.get_num_threads(), out)
            else:
                _kernels.element_bilinear(self.conn, self.local, self._estride, _kernels.as_columns(w),
                                          _kernels.as_columns(z), out)
        return out

    def _gather_matvec(self, coef: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(sum_e coef_e K_e) z in one pass, without storing the matrix values."""
        z2 = _kernels.as_columns(z)
        out = np.empty((self.shape[0], z2.shape[1]))
        with threads_for(self._slot_elem.shape[0] * z2.shape[1]):
            _kernels.gather_matvec(self.indptr, self.indices, self._slot_ptr, self._slot_elem, self._slot_loc,
                                   self.local, self._estride, np.ascontiguousarray(coef, dtype=np.float64), z2, out)
        return out.reshape((self.shape[0],) + z.shape[1:])

    def tangent(self, p, dp, z) -> np.ndarray:
        """(dA/dp . dp) z = sum_e dp_e phi'(p_e) K_e z_e, fused with the gather (no matrix is formed)."""
        p = self.check_p(p)
        dp = as_parameter(dp, self.n_params, "dp")
        z = as_state_like(z, self.shape[1], "z")
        return self._gather_matvec(dp * self.coefficient.d1(p), z)

    def tangent_transpose(self, p, dp, w) -> np.ndarray:
        """(dA/dp . dp)^T w; the fused kernel when every K_e is symmetric (then the tangent is)."""
        if not self.symmetric:
            return super().tangent_transpose(p, dp, w)
        return self.tangent(p, dp, w)

    def _contract(self, p, w, z):
        return self.coefficient.d1(p) * self.element_forms(w, z)

    def _tangent_values(self, p, dp):
        return self.gather(dp * self.coefficient.d1(p))

    def _second(self, p, w, z, dp):
        return self.coefficient.d2(p) * dp * self.element_forms(w, z)
