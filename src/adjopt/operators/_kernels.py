"""Numba kernels of the parametric operators, on raw arrays.

All loops over slots or elements are ``prange`` loops in which every iteration
writes only its own output entry, so they are race-free by construction.
``local`` holds flattened local matrices, one row per element (``estride=1``)
or a single shared row (``estride=0``, congruent elements).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def gather_slots(slot_ptr, slot_elem, slot_loc, local, estride, coef, base, out):
    """out[s] = base[s] + sum_{t in slot s} coef[elem_t] * local[elem_t, loc_t].

    An empty ``base`` (shape (0,)) stands for zero and is not read.
    """
    nslots = slot_ptr.shape[0] - 1
    has_base = base.shape[0] > 0
    for s in numba.prange(nslots):
        acc = base[s] if has_base else 0.0
        for t in range(slot_ptr[s], slot_ptr[s + 1]):
            e = slot_elem[t]
            acc += coef[e] * local[e * estride, slot_loc[t]]
        out[s] = acc


@numba.njit(parallel=True, cache=True)
def gather_matvec(indptr, indices, slot_ptr, slot_elem, slot_loc, local, estride, coef, z, out):
    """out[i, c] = sum_{slots s of row i} (sum_{t in s} coef[elem_t] local[elem_t, loc_t]) z[indices[s], c].

    The product (sum_e coef_e K_e) z without storing the matrix values: the
    tangent action (dA/dp . dp) z in one pass. Rows in parallel, race-free.
    """
    n = indptr.shape[0] - 1
    ncol = z.shape[1]
    if ncol == 1:
        for i in numba.prange(n):
            acc = 0.0
            for s in range(indptr[i], indptr[i + 1]):
                v = 0.0
                for t in range(slot_ptr[s], slot_ptr[s + 1]):
                    e = slot_elem[t]
                    v += coef[e] * local[e * estride, slot_loc[t]]
                acc += v * z[indices[s], 0]
            out[i, 0] = acc
        return
    for i in numba.prange(n):
        for c in range(ncol):
            out[i, c] = 0.0
        for s in range(indptr[i], indptr[i + 1]):
            v = 0.0
            for t in range(slot_ptr[s], slot_ptr[s + 1]):
                e = slot_elem[t]
                v += coef[e] * local[e * estride, slot_loc[t]]
            j = indices[s]
            for c in range(ncol):
                out[i, c] += v * z[j, c]


@numba.njit(parallel=True, cache=True)
def element_bilinear(conn, local, estride, w, z, out):
    """out[e] = sum_c w_e[:, c]^T K_e z_e[:, c] over the free dofs of element e.

    ``w`` and ``z`` are (n, ncol); negative connectivity entries are skipped
    (condensed Dirichlet dofs).
    """
    n_elem, k = conn.shape
    ncol = w.shape[1]
    for e in numba.prange(n_elem):
        le = e * estride
        acc = 0.0
        for a in range(k):
            i = conn[e, a]
            if i < 0:
                continue
            for b in range(k):
                j = conn[e, b]
                if j < 0:
                    continue
                kab = local[le, a * k + b]
                for c in range(ncol):
                    acc += w[i, c] * kab * z[j, c]
        out[e] = acc


@numba.njit(parallel=True, cache=True)
def element_bilinear1(conn, local, estride, w, z, nchunks, out):
    """out[e] = w_e^T K_e z_e for vectors w, z (one column): the element values are gathered once
    (zero at condensed dofs), then a branch-free k x k product. ``nchunks`` blocks of elements
    (a few per thread) each get one pair of buffers."""
    n_elem, k = conn.shape
    nchunks = max(1, min(n_elem, nchunks))
    for ch in numba.prange(nchunks):
        we = np.empty(k)  # one buffer per chunk, not per element
        ze = np.empty(k)
        for e in range(ch * n_elem // nchunks, (ch + 1) * n_elem // nchunks):
            le = e * estride
            for a in range(k):
                i = conn[e, a]
                if i < 0:
                    we[a] = 0.0
                    ze[a] = 0.0
                else:
                    we[a] = w[i]
                    ze[a] = z[i]
            acc = 0.0
            for a in range(k):
                row = 0.0
                for b in range(k):
                    row += local[le, a * k + b] * ze[b]
                acc += we[a] * row
            out[e] = acc


@numba.njit(parallel=True, cache=True)
def element_linear(conn, vec, estride, lam, out):
    """out[e] = sum_c sum_a lam[conn[e, a], c] * vec[e, a] over free dofs."""
    n_elem, k = conn.shape
    ncol = lam.shape[1]
    for e in numba.prange(n_elem):
        le = e * estride
        acc = 0.0
        for a in range(k):
            i = conn[e, a]
            if i < 0:
                continue
            for c in range(ncol):
                acc += lam[i, c] * vec[le, a]
        out[e] = acc


@numba.njit(parallel=True, cache=True)
def slot_products(rows, cols, w, z, out):
    """out[s] = sum_c w[rows[s], c] * z[cols[s], c] for every CSR slot s."""
    ncol = w.shape[1]
    for s in numba.prange(rows.shape[0]):
        acc = 0.0
        r = rows[s]
        q = cols[s]
        for c in range(ncol):
            acc += w[r, c] * z[q, c]
        out[s] = acc


def as_columns(v: np.ndarray) -> np.ndarray:
    """View a (n,) or (n, k) array as C-contiguous (n, k) for the kernels."""
    v2 = v.reshape(v.shape[0], -1)
    return np.ascontiguousarray(v2)
