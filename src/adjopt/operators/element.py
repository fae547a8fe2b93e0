"""Element-coefficient matrices: A(p) = A_0 + sum_e phi(p_e) K_e.

One parameter per element; K_e is the element's local matrix scattered into
the global pattern through its connectivity row (negative entries mark dofs
removed by Dirichlet condensation and are skipped). With

    a_e(w, z) = w_e^T K_e z_e

the derivatives are diagonal in the elements:

    contract(p, w, z)_e = phi'(p_e) a_e(w, z)
    second(p, w, z, dp)_e = phi''(p_e) dp_e a_e(w, z)
    tangent values        = gather of dp_e phi'(p_e) K_e into the pattern.

The pattern and the row maps of the kernels (the dof -> (element, local row)
incidence and the place of each element entry in its row) are built once;
assembly runs over chunks of rows in parallel, each row summed in its own
buffer, so no two threads write the same entry (see ``_kernels``).
:func:`build_slot_map` still returns the slot -> (element, local entry) map
that other callers use.
"""

from __future__ import annotations

import logging
import sys

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


def _rows(conn: np.ndarray, n: int, extra, repeat_rows: bool):
    """What both builders share: the incidence, the extra entries by row and the row sizes (see :mod:`._pattern`)."""
    n_elem, k = conn.shape
    if n >= np.iinfo(np.int32).max:
        raise PatternError(f"n = {n} dofs: adjopt's patterns hold up to 2^31 - 1 rows")
    conn = np.ascontiguousarray(conn)
    ptr = np.zeros(n + 1, dtype=np.int64)
    _pattern.incidence_count(conn, n, ptr)
    elem = np.empty(ptr[n], dtype=_index_dtype(n_elem))
    loc = np.empty(ptr[n], dtype=np.int16 if k <= np.iinfo(np.int16).max else np.int32)
    _pattern.incidence_fill(conn, ptr, elem, loc)
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
    with threads_for(int(ptr[n]) * k):
        _pattern.count_rows(conn, ptr, elem, x_ptr, x_col, n, nchunks, bool(repeat_rows), row_slots, row_entries)
    n_slots = int(row_slots.sum())
    indptr = np.zeros(n + 1, dtype=_index_dtype(max(n, n_slots)))
    np.cumsum(row_slots, out=indptr[1:])
    del row_slots
    return conn, ptr, elem, loc, x_ptr, x_col, x_ent, nchunks, indptr, row_entries


def build_slot_map(conn: np.ndarray, n: int, extra=None, repeat_rows: bool = True):
    """Build the CSR pattern of the element scatter and its slot map (see :mod:`._pattern`).

    Parameters
    ----------
    conn
        (E, k) global dof indices; negative entries are skipped.
    n
        Matrix size.
    extra
        Optional sparse matrix whose pattern is added (e.g. A_0).
    repeat_rows
        Copy a row that repeats the previous one (same elements, local
        indices shifted by a constant; see :mod:`._pattern`) instead of
        building it: the same result, faster. ``False`` builds every row
        (the reference the tests compare against).

    Returns
    -------
    indptr, indices, slot_ptr, slot_elem, slot_loc, extra_slots
        CSR pattern; for each slot s the entries ``slot_ptr[s]:slot_ptr[s+1]``
        of ``slot_elem``/``slot_loc`` list the (element, local entry k*a+b)
        pairs that add into it, in increasing element order; ``extra_slots``
        maps the COO entries of ``extra`` (in ``sp.coo_array(extra)`` order) to slots.
    """
    n_elem, k = conn.shape
    conn, ptr, elem, loc, x_ptr, x_col, x_ent, nchunks, indptr, row_entries = _rows(conn, n, extra, repeat_rows)
    n_slots = int(indptr[-1])
    n_entry = int(row_entries.sum())
    entry_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_entries, out=entry_ptr[1:])
    del row_entries
    indices = np.empty(n_slots, dtype=indptr.dtype)
    slot_ptr = np.empty(n_slots + 1, dtype=_index_dtype(n_entry))
    slot_ptr[-1] = n_entry
    slot_elem = np.empty(n_entry, dtype=_index_dtype(n_elem))
    slot_loc = np.empty(n_entry, dtype=np.int16 if k * k <= np.iinfo(np.int16).max else np.int32)
    extra_slots = np.empty(x_ent.size, dtype=np.int64)
    with threads_for(n_entry):
        _pattern.fill_rows(conn, ptr, elem, loc, x_ptr, x_col, x_ent, n, nchunks, bool(repeat_rows), indptr,
                           entry_ptr, indices, slot_ptr, slot_elem, slot_loc, extra_slots)
    return indptr, indices, slot_ptr, slot_elem, slot_loc, extra_slots


def build_pattern(conn: np.ndarray, n: int, extra=None, repeat_rows: bool = True):
    """``(indptr, indices, extra_slots)`` of :func:`build_slot_map` without the slot map.

    The same arrays (a row touched by the same elements as the previous one
    copies its columns), at a fraction of the memory: for the 432k-hexahedron
    cantilever (1.34M dofs, 106M nonzeros, 247M element-matrix entries) the
    slot map is 1.9 GB of the 2.3 GB that :func:`build_slot_map` returns.
    """
    conn, ptr, elem, loc, x_ptr, x_col, x_ent, nchunks, indptr, row_entries = _rows(conn, n, extra, repeat_rows)
    del row_entries, loc
    indices = np.empty(int(indptr[-1]), dtype=indptr.dtype)
    extra_slots = np.empty(x_ent.size, dtype=np.int64)
    with threads_for(int(ptr[-1]) * conn.shape[1]):
        _pattern.fill_columns(conn, ptr, elem, x_ptr, x_col, x_ent, n, nchunks, bool(repeat_rows), indptr, indices,
                              extra_slots)
    return indptr, indices, extra_slots


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

    Notes
    -----
    The kernels walk the matrix row by row through the dof -> (element, local
    row) incidence (see the section comment "The paths of
    ElementCoefficientMatrix" in :mod:`._kernels`): each row of A(p) is summed
    in a small buffer from the rows of the local matrices that touch it, and
    written once. Per-element local matrices are also kept in that order
    (``E k^2`` floats: the assembly streams them); with one shared matrix, rows
    that repeat a few patterns (structured grids) are each a small dense
    product with the coefficients of their elements. The slot map of
    :func:`build_slot_map` is not kept (``_slot_ptr``/``_slot_elem``/``_slot_loc``
    rebuild it on first access). The built-in coefficients are evaluated
    inside the kernels (``Coefficient.kernel_spec``); others through their numpy methods.

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

    #: bound on the dense row templates of a shared local matrix (bytes); at most 64 of them or one per
    #: TEMPLATE_ROWS_PER rows, and always fewer than half the rows
    TEMPLATE_BYTES = 1 << 20
    TEMPLATE_ROWS_PER = 8
    #: at most this many consecutive rows (with the same elements: a node's components) share a template
    TEMPLATE_GROUP = 8

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
        # the pattern without its slot map (the kernels walk rows: _build_rows); the slot map is built on request
        self.indptr, self.indices, extra_slots = build_pattern(self.conn, n, A0)
        self._slots = None
        # the constant part's values in the pattern; empty (= zero, not read by the kernel) without A0
        self._base = np.zeros(0)
        if A0 is not None:
            a0 = sp.coo_array(A0)
            self._base = np.bincount(extra_slots, weights=a0.data, minlength=self.indices.shape[0]).astype(np.float64)
        del extra_slots
        self._zero = np.zeros(0)
        self._coef_spare = _Spare()  # phi(p) of a contraction, which never leaves the call
        self._build_rows()
        # symmetric for every p when every local matrix and A0 are (to round-off)
        lk = local2.reshape(-1, k, k)
        tol = 1e-13 * max(float(np.abs(local2).max()), np.finfo(float).tiny)
        sym = bool(np.all(np.abs(lk - lk.transpose(0, 2, 1)) <= tol))
        if sym and A0 is not None:
            d = abs(A0 - A0.T)
            sym = d.nnz == 0 or float(d.max()) <= 1e-13 * max(float(abs(A0).max()), np.finfo(float).tiny)
        self.symmetric = sym
        logger.debug("ElementCoefficientMatrix: n=%d, %d elements, nnz=%d, shared local=%s, row templates=%s", n,
                     n_elem, self.nnz, estride == 0, None if self._templates is None else self._templates[2].shape[0])

    # -- the row maps (built once) ------------------------------------------------------------------
    def _build_rows(self) -> None:
        """The incidence, the places of its entries in the rows, the local rows in that order and the templates."""
        conn, n, k = self.conn, self.shape[0], self.k
        n_inc = int(np.count_nonzero(conn >= 0))
        self._inc_ptr = np.zeros(n + 1, dtype=_index_dtype(n_inc * k))
        self._inc_elem = np.empty(n_inc, dtype=_index_dtype(self.n_params))
        self._inc_loc = np.empty(n_inc, dtype=np.uint8 if k <= 256 else np.int32)
        _pattern.incidence_count(conn, n, self._inc_ptr)
        _pattern.incidence_fill(conn, self._inc_ptr, self._inc_elem, self._inc_loc)
        # with condensed entries every row is summed in a buffer of `scratch` + 1 entries, the condensed columns
        # going to the last; scratch = 0: none, the rows are summed in place
        max_row = int(np.diff(self.indptr).max()) if n else 0
        scratch = max_row if n_inc < conn.size else 0
        self._scratch = scratch
        self._rpos = np.empty(n_inc * k, dtype=np.uint8 if max_row <= 255 else np.uint16 if max_row <= 65535
                              else np.int32)
        with threads_for(n_inc * k):
            _kernels.row_positions(self.indptr, self.indices, conn, self._inc_ptr, self._inc_elem,
                                   2 * numba.get_num_threads(), scratch, self._rpos)
            if self._estride:
                self._row_vals = np.empty(n_inc * k)
                _kernels.incidence_values(self._inc_elem, self._inc_loc, self.local, self._row_vals)
            else:
                self._row_vals = self.local[0]
        with threads_for(n_inc * k):
            self._templates = self._build_templates() if self._estride == 0 else None

    def _build_templates(self):
        """(group -> first row, group -> template, (g, max incidences, max group slots) dense templates) for a
        shared local matrix when the row groups (``_kernels.row_groups``) repeat few patterns (see
        TEMPLATE_BYTES); else None."""
        n, k = self.shape[0], self.k
        if n == 0:
            return None
        max_inc = int(np.diff(self._inc_ptr).max())
        grp_ptr = np.empty(n + 1, dtype=np.int32 if n < np.iinfo(np.int32).max else np.int64)
        ng = _kernels.row_groups(self._inc_ptr, self._inc_elem, self.TEMPLATE_GROUP, grp_ptr)
        grp_ptr = grp_ptr[:ng + 1].copy()
        row_sig = np.empty(n, dtype=np.int64)
        _kernels.row_signatures(self.indptr, self._inc_ptr, self._inc_loc, self._rpos, k, row_sig)
        sig = np.empty(ng, dtype=np.int64)
        _kernels.group_signatures(grp_ptr, row_sig, sig)
        _, first, which = np.unique(sig, return_index=True, return_inverse=True)
        g = first.shape[0]
        max_slots = int(np.diff(self.indptr[grp_ptr]).max())
        if 2 * g > ng or g > max(64, ng // self.TEMPLATE_ROWS_PER) or \
                8 * g * max(max_inc, 1) * max(max_slots, 1) > self.TEMPLATE_BYTES:
            return None
        which = which.astype(np.int32).ravel()
        if not _kernels.groups_match(grp_ptr, self.indptr, self._inc_ptr, self._inc_loc, self._rpos, k, first[which]):
            return None  # two patterns with one hash: keep the general path
        tmpl = np.zeros((g, max(max_inc, 1), max(max_slots, 1)))
        _kernels.group_templates(grp_ptr, self.indptr, self._inc_ptr, self._inc_loc, self._rpos, self.local[0], first,
                                 tmpl)
        return grp_ptr, which, tmpl

    def _slot_arrays(self):
        """(slot_ptr, slot_elem, slot_loc) of :func:`build_slot_map` for this pattern, built on first request."""
        if self._slots is None:
            extra = None
            if self._base.size:  # A0's pattern, explicit zeros included, is part of the matrix's
                extra = self._csr(np.ones(self.nnz))
            indptr, indices, *slots, _ = build_slot_map(self.conn, self.shape[0], extra)
            assert np.array_equal(indptr, self.indptr) and np.array_equal(indices, self.indices)
            self._slots = tuple(slots)
        return self._slots

    @property
    def _slot_ptr(self):
        return self._slot_arrays()[0]

    @property
    def _slot_elem(self):
        return self._slot_arrays()[1]

    @property
    def _slot_loc(self):
        return self._slot_arrays()[2]

    @property
    def n_elements(self) -> int:
        return self.n_params

    # -- values ---------------------------------------------------------------------------------------
    def _coefficients(self, p: np.ndarray, order: int, out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """(phi^(order)(p), all finite): in one numba pass for the built-in coefficients (into ``out`` if
        given), else by numpy."""
        spec = self.coefficient.kernel_spec()
        if spec is None:
            c = np.ascontiguousarray((self.coefficient, self.coefficient.d1, self.coefficient.d2)[order](p),
                                     dtype=np.float64)
            return c, _kernels.count_nonfinite(c) == 0
        c = np.empty(self.n_params) if out is None else out
        return c, _kernels.coefficient_values(*spec, order, p, c) == 0

    def _assemble(self, coef: np.ndarray, base: np.ndarray | None, finite: bool) -> np.ndarray:
        """CSR data of base + sum_e coef[e] K_e (call inside ``threads_for``), in a new array.

        A new array every time: a values array handed out is the caller's (it may sit in a state cache, a
        factorization or a user's list without a Python reference the operator could see).
        """
        out = np.empty(self.nnz)
        base = self._zero if base is None else base
        nch = 4 * numba.get_num_threads()
        if self._templates is not None and finite:  # a non-finite coef would spread NaN through the template zeros
            _kernels.gather_templates(self.indptr, self._inc_ptr, self._inc_elem, *self._templates, coef, base, nch,
                                      out)
        else:
            _kernels.gather_rows(self.indptr, self._inc_ptr, self._inc_elem, self._inc_loc, self._rpos,
                                 self._row_vals, self._estride == 0, self.k, coef, base, nch, self._scratch, out)
        return out

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
        with threads_for(self._rpos.shape[0]):
            return self._assemble(coef, base, _kernels.count_nonfinite(coef) == 0)

    def values(self, p) -> np.ndarray:
        p = self.check_p(p)
        with threads_for(self._rpos.shape[0]):
            scratch = self._coef_spare.take(self.n_params)  # phi(p) lives only during the call
            coef, finite = self._coefficients(p, 0, scratch)
            out = self._assemble(coef, self._base if self._base.size else None, finite)
            self._coef_spare.keep(scratch)
            return out

    # -- element forms and the contractions -----------------------------------------------------------
    def _forms(self, w: np.ndarray, z: np.ndarray, p: np.ndarray | None = None, order: int = 1,
               scale: np.ndarray | None = None) -> np.ndarray:
        """f_e w_e^T K_e z_e with f = phi^(order)(p) (times ``scale``; f = 1 without p), columns summed."""
        out = np.empty(self.n_params)
        spec = None if p is None else self.coefficient.kernel_spec()
        with threads_for(self.n_params * self.k * self.k * (1 if w.ndim == 1 else w.shape[1])):
            if w.ndim == 1 and z.ndim == 1:
                if p is None:  # identity's phi' = 1: f_e = 1, p is not read
                    args = (_kernels.COEF_IDENTITY, -1, 1.0, 1.0, 0.0, 1, self._zero)
                elif spec is None:
                    f = np.ascontiguousarray((self.coefficient, self.coefficient.d1, self.coefficient.d2)[order](p),
                                             dtype=np.float64)
                    args = (_kernels.COEF_GIVEN, -1, 1.0, 1.0, 0.0, order, f)
                else:
                    args = (*spec, order, p)
                _kernels.element_forms(self.conn, self.local, self._estride, np.ascontiguousarray(w),
                                       np.ascontiguousarray(z), *args, self._zero if scale is None else scale,
                                       4 * numba.get_num_threads(), out)
                return out
            _kernels.element_bilinear(self.conn, self.local, self._estride, _kernels.as_columns(w),
                                      _kernels.as_columns(z), out)
        if p is None:
            return out
        f = (self.coefficient, self.coefficient.d1, self.coefficient.d2)[order](p)
        return f * scale * out if scale is not None else f * out

    def element_forms(self, w: np.ndarray, z: np.ndarray) -> np.ndarray:
        """a_e(w, z) = w_e^T K_e z_e for every element (columns summed); w, z of shape (n,) or (n, k)."""
        w, z = self._check_pair(w, z, "w", "z")
        return self._forms(w, z)

    def _gather_matvec(self, coef: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(sum_e coef_e K_e) z in one pass over the rows, without the matrix values."""
        z2 = _kernels.as_columns(z)
        out = np.empty((self.shape[0], z2.shape[1]))
        with threads_for(self._rpos.shape[0] * z2.shape[1]):
            _kernels.rows_matvec(self._inc_ptr, self._inc_elem, self._inc_loc, self.conn, self._row_vals,
                                 self._estride == 0, np.ascontiguousarray(coef, dtype=np.float64), z2,
                                 4 * numba.get_num_threads(), out)
        return out.reshape((self.shape[0],) + z.shape[1:])

    def tangent(self, p, dp, z) -> np.ndarray:
        """(dA/dp . dp) z = sum_e dp_e phi'(p_e) K_e z_e, fused with the gather (no matrix is formed)."""
        p = self.check_p(p)
        dp = as_parameter(dp, self.n_params, "dp")
        z = as_state_like(z, self.shape[1], "z")
        with threads_for(self._rpos.shape[0]):
            coef = dp * self._coefficients(p, 1)[0]
        return self._gather_matvec(coef, z)

    def tangent_transpose(self, p, dp, w) -> np.ndarray:
        """(dA/dp . dp)^T w; the fused kernel when every K_e is symmetric (then the tangent is)."""
        if not self.symmetric:
            return super().tangent_transpose(p, dp, w)
        return self.tangent(p, dp, w)

    def _contract(self, p, w, z):
        return self._forms(w, z, p, 1)

    def _tangent_values(self, p, dp):
        with threads_for(self._rpos.shape[0]):
            coef = dp * self._coefficients(p, 1)[0]
            return self._assemble(coef, None, _kernels.count_nonfinite(coef) == 0)

    def _second(self, p, w, z, dp):
        return self._forms(w, z, p, 2, dp)

    # -- blocks of directions: one pass over the rows or elements for all k -----------------------------
    def tangent_block(self, p, dP, z) -> np.ndarray:
        """(dA/dp . dP[:, i]) z for the k columns of dP in one pass over the rows (see the base class)."""
        p = self.check_p(p)
        dP = self._directions(dP)
        z = as_state_like(z, self.shape[1], "z")
        z2 = _kernels.as_columns(z)
        k = dP.shape[1]
        out = np.empty((z2.shape[1], self.shape[0], k))
        with threads_for(self._rpos.shape[0] * k):
            C = np.empty((self.n_params, k))  # C order: the k factors of an element side by side
            np.multiply(dP, self._coefficients(p, 1)[0][:, None], out=C)
            _kernels.rows_matvec_block(self._inc_ptr, self._inc_elem, self._inc_loc, self.conn, self._row_vals,
                                       self._estride == 0, C, z2, 4 * numba.get_num_threads(), out)
        return out[0] if z.ndim == 1 else out

    def contract_block(self, p, pairs) -> np.ndarray:
        """phi'(p_e) sum over the pairs of W_e[:, i]^T K_e Z_e[:, i], one pass over the elements per pair."""
        p = self.check_p(p)
        pairs, k = self._check_block_pairs(pairs)
        out = np.empty((self.n_params, k))
        with threads_for(self.n_params * self.k * self.k * k * len(pairs)):
            for n, (W, Z) in enumerate(pairs):
                _kernels.element_bilinear_block(self.conn, self.local, self._estride, _kernels.as_columns(W),
                                                _kernels.as_columns(Z), n > 0, 4 * numba.get_num_threads(), out)
            out *= self._coefficients(p, 1)[0][:, None]
        return out

    def second_block(self, p, w, z, dP) -> np.ndarray:
        """phi''(p_e) dP[e, i] w_e^T K_e z_e: the forms of (w, z) once, scaled per column."""
        p = self.check_p(p)
        dP = self._directions(dP)
        w, z = self._check_pair(w, z, "w", "z")
        return self._forms(w, z, p, 2)[:, None] * dP


def _sole_reference_count() -> int:
    """What ``sys.getrefcount`` reports in :meth:`_Spare.take` for an array nothing else refers to (measured
    with the same code, so that the check does not depend on the interpreter's way of counting)."""
    spare = _Spare.__new__(_Spare)
    spare._items = [np.empty(1)]
    a = spare._items.pop()
    return sys.getrefcount(a)


class _Spare:
    """A scratch array of the operator's own (phi(p) inside a contraction), handed out again once nothing else
    refers to it: a fresh array costs page faults (the OS maps and zeroes new pages, ~18 ms per 288 MB here).
    Only for arrays that never leave the operator's call; values returned to a caller are always new.
    """

    def __init__(self):
        self._items: list[np.ndarray] = []

    def take(self, n: int) -> np.ndarray:
        try:
            a = self._items.pop()
        except IndexError:
            return np.empty(n)
        if a.shape == (n,) and sys.getrefcount(a) == _SOLE:
            return a
        return np.empty(n)

    def keep(self, a: np.ndarray) -> None:
        self._items[:] = [a]

    def __reduce__(self):  # copies and pickles of the operator start empty
        return _Spare, ()


_SOLE = _sole_reference_count()
