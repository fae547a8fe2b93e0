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

from .._validate import as_parameter, as_state_like, refuse_complex
from ..errors import PatternError, ShapeError
from . import _kernels
from .base import ParametricMatrix
from .coefficients import Coefficient, as_coefficient

logger = logging.getLogger(__name__)


def _index_dtype(n: int):
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def build_slot_map(conn: np.ndarray, n: int, extra=None):
    """Build the CSR pattern of the element scatter and its slot map.

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
        pairs that add into it; ``extra_slots`` maps the COO entries of
        ``extra`` to slots.
    """
    n_elem, k = conn.shape
    kk = k * k
    rows = np.repeat(conn, k, axis=1).ravel()  # conn[e, a] at local entry a*k+b
    cols = np.tile(conn, (1, k)).ravel()  # conn[e, b]
    keep = (rows >= 0) & (cols >= 0)
    entry = np.flatnonzero(keep).astype(_index_dtype(rows.size))  # int32 where it fits: the largest temporaries
    keys = rows[keep].astype(np.int64) * n + cols[keep]
    del rows, cols, keep
    n_entry = entry.size
    n_extra = 0
    if extra is not None:
        ex = sp.coo_array(extra)
        n_extra = ex.nnz
        keys = np.concatenate([keys, ex.row.astype(np.int64) * n + ex.col])
    # one stable sort of the keys gives the pattern and the slot order at once (np.unique with
    # return_inverse sorts again and a second argsort of the inverse a third time: 4x slower at 1M elements).
    # Arrays are freed as soon as they are used: the peak is keys, their order, the sorted keys and entry.
    order = np.argsort(keys, kind="stable")
    keys = keys[order]  # sorted
    first = np.empty(keys.size, dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    ukeys = keys[first]
    del keys
    urows = ukeys // n
    idx_t = _index_dtype(max(n, ukeys.size))
    indptr = np.zeros(n + 1, dtype=idx_t)
    np.cumsum(np.bincount(urows, minlength=n), out=indptr[1:])
    indices = (ukeys - urows * n).astype(idx_t)
    del urows
    n_slots = ukeys.size
    del ukeys
    ptr_t = _index_dtype(n_entry)
    extra_slots = np.zeros(0, dtype=np.int64)
    if n_extra:
        slot_of = np.cumsum(first, dtype=np.int64) - 1  # slot of each sorted entry
        is_elem = order < n_entry
        extra_slots = np.empty(n_extra, dtype=np.int64)
        extra_slots[order[~is_elem] - n_entry] = slot_of[~is_elem]
        order = order[is_elem]
        slot_ptr = np.zeros(n_slots + 1, dtype=ptr_t)
        np.cumsum(np.bincount(slot_of[is_elem], minlength=n_slots), out=slot_ptr[1:])
        del slot_of, is_elem
    else:
        # every sorted entry is an element entry: a slot starts where its key first appears
        slot_ptr = np.empty(n_slots + 1, dtype=ptr_t)
        slot_ptr[:-1] = np.flatnonzero(first)
        slot_ptr[-1] = n_entry
    del first
    sorted_entry = entry[order]  # stable: within a slot, element entries keep their order
    del order, entry
    slot_elem = (sorted_entry // kk).astype(_index_dtype(n_elem))
    slot_loc = (sorted_entry % kk).astype(np.int16 if kk <= np.iinfo(np.int16).max else np.int32)
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
        if n is None:
            n = cmax + 1
        if cmax >= n:
            bad = int(np.argmax(conn.max(axis=1) >= n))
            raise PatternError(f"element {bad} refers to dof {int(conn[bad].max())} but the matrix has only n={n} rows")
        if A0 is not None:
            A0 = sp.csr_array(A0)
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
        _kernels.gather_matvec(self.indptr, self.indices, self._slot_ptr, self._slot_elem, self._slot_loc, self.local,
                               self._estride, np.ascontiguousarray(coef, dtype=np.float64), z2, out)
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
