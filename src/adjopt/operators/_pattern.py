"""Numba kernels that build the CSR pattern of an element scatter and its slot map, row by row.

For element e with dofs conn[e, :] and local entry (a, b) (flattened a*k + b)
the scatter adds into the global entry (conn[e, a], conn[e, b]). The pattern
(indptr, indices) holds every such entry once, columns sorted in each row;
the slot map lists, for each CSR slot s, the (element, local entry) pairs
that add into it: ``slot_elem[slot_ptr[s]:slot_ptr[s+1]]`` and the same range
of ``slot_loc``, in increasing element order.

No global sort of the E k^2 entries: the dof -> (element, local index)
incidence is built by a counting sort (O(E k)), then every row is built on
its own from the elements that touch it, in two passes over row chunks run in
parallel (count, then fill). A row's columns are deduplicated with a marker
array per chunk and sorted locally (a row has tens of entries). Memory: the
outputs, the incidence and one marker array of n entries per chunk.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def incidence(conn, n):
    """(ptr, elem, loc): for dof i, the pairs (elem[t], loc[t]) with conn[elem, loc] = i, t in ptr[i]:ptr[i+1],
    in increasing element order. Negative entries of conn are skipped."""
    n_elem, k = conn.shape
    ptr = np.zeros(n + 1, np.int64)
    for e in range(n_elem):
        for a in range(k):
            i = conn[e, a]
            if i >= 0:
                ptr[i + 1] += 1
    for i in range(n):
        ptr[i + 1] += ptr[i]
    nxt = ptr[:-1].copy()
    elem = np.empty(ptr[n], np.int64)
    loc = np.empty(ptr[n], np.int64)
    for e in range(n_elem):
        for a in range(k):
            i = conn[e, a]
            if i >= 0:
                t = nxt[i]
                elem[t] = e
                loc[t] = a
                nxt[i] = t + 1
    return ptr, elem, loc


@numba.njit(parallel=True, cache=True)
def count_rows(conn, ptr, elem, x_ptr, x_col, n, nchunks, row_slots, row_entries):
    """row_slots[i]: distinct columns of row i (element entries and extra entries); row_entries[i]: element
    entries that add into row i."""
    k = conn.shape[1]
    for ch in numba.prange(nchunks):
        mark = np.full(n, -1, np.int32)  # mark[j] == i: column j already counted in row i (n < 2^31)
        for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            u = 0
            ent = 0
            for t in range(ptr[i], ptr[i + 1]):
                e = elem[t]
                for b in range(k):
                    j = conn[e, b]
                    if j < 0:
                        continue
                    ent += 1
                    if mark[j] != i:
                        mark[j] = i
                        u += 1
            for t in range(x_ptr[i], x_ptr[i + 1]):
                j = x_col[t]
                if mark[j] != i:
                    mark[j] = i
                    u += 1
            row_slots[i] = u
            row_entries[i] = ent


@numba.njit(parallel=True, cache=True)
def fill_rows(conn, ptr, elem, loc, x_ptr, x_col, x_ent, n, nchunks, max_row, indptr, entry_ptr,
              indices, slot_ptr, slot_elem, slot_loc, x_slot):
    """Fill the columns of every row (sorted), the slot offsets and the slot map; x_slot[x_ent[t]] = the
    slot of extra entry t. Each row writes only its own ranges, so the chunks run in parallel."""
    k = conn.shape[1]
    for ch in numba.prange(nchunks):
        mark = np.full(n, -1, np.int32)
        pos = np.empty(n, np.int32)  # column -> place in the row, valid where mark says this row
        count = np.empty(max_row + 1, np.int64)
        for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            s0 = indptr[i]
            m = indptr[i + 1] - s0
            u = 0
            for t in range(ptr[i], ptr[i + 1]):
                e = elem[t]
                for b in range(k):
                    j = conn[e, b]
                    if j >= 0 and mark[j] != i:
                        mark[j] = i
                        indices[s0 + u] = j
                        u += 1
            for t in range(x_ptr[i], x_ptr[i + 1]):
                j = x_col[t]
                if mark[j] != i:
                    mark[j] = i
                    indices[s0 + u] = j
                    u += 1
            indices[s0:s0 + m] = np.sort(indices[s0:s0 + m])
            for r in range(m):
                pos[indices[s0 + r]] = r
                count[r] = 0
            for t in range(ptr[i], ptr[i + 1]):
                e = elem[t]
                for b in range(k):
                    j = conn[e, b]
                    if j >= 0:
                        count[pos[j]] += 1
            start = entry_ptr[i]
            for r in range(m):
                c = count[r]
                slot_ptr[s0 + r] = start
                count[r] = start  # from here on: the next free place of slot r
                start += c
            for t in range(ptr[i], ptr[i + 1]):
                e = elem[t]
                a = loc[t]
                for b in range(k):
                    j = conn[e, b]
                    if j >= 0:
                        r = pos[j]
                        q = count[r]
                        slot_elem[q] = e
                        slot_loc[q] = a * k + b
                        count[r] = q + 1
            for t in range(x_ptr[i], x_ptr[i + 1]):
                x_slot[x_ent[t]] = s0 + pos[x_col[t]]
