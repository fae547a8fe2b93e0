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
    """out[s] = base[s] + sum_{t in slot s} coef[elem_t] * local[elem_t, loc_t]."""
    nslots = slot_ptr.shape[0] - 1
    for s in numba.prange(nslots):
        acc = base[s]
        for t in range(slot_ptr[s], slot_ptr[s + 1]):
            e = slot_elem[t]
            acc += coef[e] * local[e * estride, slot_loc[t]]
        out[s] = acc


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
