"""Numba kernels of the parametric operators, on raw arrays.

All loops over slots, rows or elements are ``prange`` loops in which every
iteration (or chunk of rows / elements) writes only its own output entries, so
they are race-free by construction.
``local`` holds flattened local matrices, one row per element (``estride=1``)
or a single shared row (``estride=0``, congruent elements).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


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
def element_bilinear(conn, local, estride, w, z, out):
    """out[e] = sum_c w_e[:, c]^T K_e z_e[:, c] over the free dofs of element e.

    ``w`` and ``z`` are (n, ncol); negative connectivity entries are skipped
    (condensed Dirichlet dofs).
    """
    n_elem, k = conn.shape
    ncol = w.shape[1]
    if ncol == 2:  # the paired contraction of a Hessian action: each column's entries gathered once
        for e in numba.prange(n_elem):
            if k == 3:
                out[e] = _bilinear2(conn, local, e * estride, w, z, e, 3)
            elif k == 4:
                out[e] = _bilinear2(conn, local, e * estride, w, z, e, 4)
            elif k == 8:
                out[e] = _bilinear2(conn, local, e * estride, w, z, e, 8)
            else:
                out[e] = _bilinear2(conn, local, e * estride, w, z, e, k)
        return
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


@numba.njit(inline="always")
def _bilinear2(conn, local, le, w, z, e, k):
    """sum_c w_e[:, c]^T K_e z_e[:, c] for two columns (condensed dofs count as zero)."""
    acc = 0.0
    for a in range(k):
        i = conn[e, a]
        if i < 0:
            continue
        s0 = 0.0
        s1 = 0.0
        for b in range(k):
            j = conn[e, b]
            if j >= 0:
                kab = local[le, a * k + b]
                s0 += kab * z[j, 0]
                s1 += kab * z[j, 1]
        acc += w[i, 0] * s0 + w[i, 1] * s1
    return acc


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


# == The paths of ElementCoefficientMatrix =========================================================
# The slot map above lists, for every CSR slot, the (element, local entry) pairs that add into it;
# walked slot by slot it reads the element data in slot order (random access into the local
# matrices and coefficients) and runs one short loop of 1 to ~6 entries per slot (mispredicted
# exits). The operator keeps instead the dof -> (element, local row) incidence, row by row:
#
#   inc_ptr[i]:inc_ptr[i+1]  the incidences t of row i (increasing element, then local row),
#   inc_elem[t], inc_loc[t]  element e and local row a with conn[e, a] = i,
#   rpos[t*k + b]            the place of column conn[e, b] in row i (0 <= rpos < row length),
#                            ``scratch`` (>= every row length) where conn[e, b] < 0 (condensed;
#                            scratch = 0 when no entry is condensed),
#   row_vals[t*k + b]        K_e[a, b] in this order (per-element local matrices only: the local
#                            data streamed in assembly order, a copy of ``local`` reordered).
#
# A row is assembled in place (or, with condensed entries, in a small buffer written once): every
# incidence adds coef[e] K_e[a, :] into it, a fixed loop of k entries. The contributions to each
# slot are added in increasing element order, as the slot map lists them, so the values equal
# gather_slots' bit for bit (measured at 1M elements, one thread: 2.3x (P1 2D), 4.2x (P1 3D)
# faster than gather_slots with its coefficient pass). When all elements share one matrix and the
# rows repeat a few patterns (structured grids), consecutive rows with the same elements (a node's
# components) form a group, and a group is a small dense product instead: its template g is the
# (n_inc x slots) matrix M with M[u, r] = sum of K[a_u, b] over the entries b of incidence u that
# land in slot r, and out = M^T coef[elements of the group] (8.7x for Q1 elasticity, one thread).


# -- the coefficient maps inside the kernels ------------------------------------------------------
#: codes of ``Coefficient.kernel_spec()`` (coefficients.py); COEF_GIVEN: the kernel's p holds the factor
COEF_GIVEN, COEF_IDENTITY, COEF_EXP, COEF_SIMP = -1, 0, 1, 2
#: integer exponents up to this are computed by repeated products (else pow)
MAX_INT_POWER = 8


@numba.njit(inline="always")
def _power(x, y, iy):
    """x**y: by repeated products when y is the integer iy in 0..MAX_INT_POWER (within an ulp or two of pow)."""
    if iy < 0 or iy > MAX_INT_POWER:
        return x**y
    r = 1.0
    for _ in range(iy):
        r *= x
    return r


@intrinsic
def _bits_as_float(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(context.cast(builder, args[0], sig.args[0], types.int64), ir.DoubleType())

    return types.float64(bits), codegen


@intrinsic
def _float_bits(typingctx, x):
    """The bit pattern of the float64 ``x`` as an int64."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(context.cast(builder, args[0], sig.args[0], types.float64), ir.IntType(64))

    return types.int64(x), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts (fdlibm): n * _LN2_HI is exact for |n| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_SHIFTER = 6755399441055744.0  # 1.5 * 2^52: x + _SHIFTER rounds x to an integer held in the low mantissa bits
_SHIFTER_BITS = 0x4338000000000000


@numba.njit(inline="always")
def exp_fast(x):
    """exp(x) within 1 ulp of libm's (measured over [-746, 710] and the special values), branch-free so that
    loops over it vectorise (libm's exp is a call per element: ~2x slower here, and it dominated the
    contraction and the coefficient pass of exp-parametrised operators).

    x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor polynomial of degree 13 (truncation < 1e-17),
    times 2^n built from bits in two factors (2^(n -+ 54) 2^(+-54)), so that gradual underflow rounds once
    and the overflow to inf happens in the last product. x is clamped to [-746, 710] first (exp is 0 or
    inf beyond); NaN stays NaN."""
    xc = x if x < 710.0 else 710.0
    xc = xc if xc > -746.0 else -746.0
    t = xc * _LOG2E + _SHIFTER
    fn = t - _SHIFTER
    n = _float_bits(t) - _SHIFTER_BITS
    r = (xc - fn * _LN2_HI) - fn * _LN2_LO
    q = 1.0 / 6227020800.0
    q = q * r + 1.0 / 479001600.0
    q = q * r + 1.0 / 39916800.0
    q = q * r + 1.0 / 3628800.0
    q = q * r + 1.0 / 362880.0
    q = q * r + 1.0 / 40320.0
    q = q * r + 1.0 / 5040.0
    q = q * r + 1.0 / 720.0
    q = q * r + 1.0 / 120.0
    q = q * r + 1.0 / 24.0
    q = q * r + 1.0 / 6.0
    q = q * r + 0.5
    q = q * r + 1.0
    q = q * r + 1.0
    c = np.int64(54) if n < 0 else np.int64(-54)
    scale = _bits_as_float((n + (1023 + c)) << 52)
    v = (q * scale) * (5.551115123125783e-17 if n < 0 else 1.8014398509481984e16)  # 2^-54, 2^54
    return v if x == x else x


@numba.njit(inline="always")
def coef_eval(code, iq, q, e0, emin, order, x):
    """phi (order 0), phi' (1) or phi'' (2) at x for the built-in coefficient ``code``, in the operations and
    order of coefficients.py's numpy code; COEF_GIVEN returns x."""
    if code == COEF_IDENTITY:
        if order == 0:
            return x
        return 1.0 if order == 1 else 0.0
    if code == COEF_EXP:
        return exp_fast(x)
    if code == COEF_SIMP:
        d = e0 - emin
        if order == 0:
            return emin + _power(x, q, iq) * d
        if order == 1:
            return q * _power(x, q - 1.0, iq - 1 if iq >= 1 else -1) * d
        return q * (q - 1.0) * _power(x, q - 2.0, iq - 2 if iq >= 2 else -1) * d
    return x


@numba.njit(inline="always")
def simp_factors(iq, q, e0, emin, order, p, start, count, out):
    """out[j] = phi^(order)(p[start + j]) for j < count, for SIMP with the integer exponent iq >= order: the
    products of :func:`coef_eval` (r = 1, then r *= x, iq - order times) in loops over j that LLVM vectorises
    (in coef_eval the product loop sits inside each element's branches). The same operations in the same
    order: bit-identical to coef_eval."""
    d = e0 - emin
    for j in range(count):
        out[j] = 1.0
    for _ in range(iq - order):
        for j in range(count):
            out[j] *= p[start + j]
    if order == 0:
        for j in range(count):
            out[j] = emin + out[j] * d
    elif order == 1:
        for j in range(count):
            out[j] = q * out[j] * d
    else:
        c = q * (q - 1.0)
        for j in range(count):
            out[j] = c * out[j] * d


#: elements per chunk of the vectorised SIMP factors in coefficient_values (in L1 while they are multiplied)
SIMP_CHUNK = 1024


@numba.njit(parallel=True, cache=True)
def coefficient_values(code, iq, q, e0, emin, order, p, out):
    """out[e] = phi^(order)(p[e]); returns the number of non-finite results. exp and SIMP with an integer
    exponent have loops of their own (the code branches of coef_eval inside the loop keep LLVM from
    vectorising it)."""
    n = p.shape[0]
    if code == COEF_EXP:
        for e in numba.prange(n):
            out[e] = exp_fast(p[e])
    elif code == COEF_SIMP and order <= iq <= MAX_INT_POWER:
        nch = (n + SIMP_CHUNK - 1) // SIMP_CHUNK
        for ch in numba.prange(nch):
            s = ch * SIMP_CHUNK
            simp_factors(iq, q, e0, emin, order, p, s, min(SIMP_CHUNK, n - s), out[s:])
    else:
        for e in numba.prange(n):
            out[e] = coef_eval(code, iq, q, e0, emin, order, p[e])
    bad = 0
    for e in numba.prange(n):
        if not math.isfinite(out[e]):
            bad += 1
    return bad


@numba.njit(parallel=True, cache=True)
def count_nonfinite(x):
    """Number of NaN and Inf entries of x."""
    bad = 0
    for i in numba.prange(x.shape[0]):
        if not math.isfinite(x[i]):
            bad += 1
    return bad


# -- building the incidence and the row maps (once per operator) ---------------------------------
@numba.njit(parallel=True, cache=True)
def row_positions(indptr, indices, conn, inc_ptr, inc_elem, nchunks, scratch, rpos):
    """rpos[t*k + b] = the place of column conn[e, b] in row i for incidence t = (e, a) of row i; ``scratch``
    where conn[e, b] < 0. Rows in parallel chunks, each with its own column -> place array."""
    n = indptr.shape[0] - 1
    k = conn.shape[1]
    nchunks = max(1, min(n, nchunks))
    for ch in numba.prange(nchunks):
        pos = np.empty(n, np.int32)
        for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            s0 = indptr[i]
            for s in range(s0, indptr[i + 1]):
                pos[indices[s]] = s - s0
            for t in range(inc_ptr[i], inc_ptr[i + 1]):
                e = inc_elem[t]
                for b in range(k):
                    j = conn[e, b]
                    rpos[t * k + b] = pos[j] if j >= 0 else scratch


@numba.njit(parallel=True, cache=True)
def incidence_values(inc_elem, inc_loc, local, out):
    """out[t*k + b] = local[inc_elem[t], inc_loc[t]*k + b]: the local matrices' rows in incidence order."""
    k = out.shape[0] // max(1, inc_elem.shape[0])
    for t in numba.prange(inc_elem.shape[0]):
        e = inc_elem[t]
        a = inc_loc[t]
        for b in range(k):
            out[t * k + b] = local[e, a * k + b]


@numba.njit(parallel=True, cache=True)
def row_signatures(indptr, inc_ptr, inc_loc, rpos, k, out):
    """out[i] = a 64-bit FNV-1a hash of row i's structure (length, incidences, their local rows and places)."""
    n = indptr.shape[0] - 1
    for i in numba.prange(n):
        h = np.uint64(14695981039346656037)
        prime = np.uint64(1099511628211)
        h = (h ^ np.uint64(indptr[i + 1] - indptr[i])) * prime
        t0 = inc_ptr[i]
        t1 = inc_ptr[i + 1]
        h = (h ^ np.uint64(t1 - t0)) * prime
        for t in range(t0, t1):
            h = (h ^ np.uint64(inc_loc[t])) * prime
            for b in range(k):
                h = (h ^ np.uint64(rpos[t * k + b])) * prime
        out[i] = np.int64(h)


@numba.njit(cache=True)
def row_groups(inc_ptr, inc_elem, max_group, out):
    """Split the rows into groups of consecutive rows touched by the same elements in the same order (the
    components of a node's vector dofs), at most ``max_group`` rows each; out[q] = first row of group q,
    out[g] = n. Returns g. Rows without elements are groups of their own."""
    n = inc_ptr.shape[0] - 1
    g = 0
    for i in range(n):
        new = True
        if i > 0 and i - out[g - 1] < max_group:
            t0 = inc_ptr[i]
            p0 = inc_ptr[i - 1]
            ni = inc_ptr[i + 1] - t0
            if ni > 0 and ni == t0 - p0:
                new = False
                for u in range(ni):
                    if inc_elem[t0 + u] != inc_elem[p0 + u]:
                        new = True
                        break
        if new:
            out[g] = i
            g += 1
    out[g] = n
    return g


@numba.njit(parallel=True, cache=True)
def group_signatures(grp_ptr, row_sig, out):
    """out[q] = a 64-bit FNV-1a hash of the row hashes of group q."""
    for q in numba.prange(grp_ptr.shape[0] - 1):
        h = np.uint64(14695981039346656037)
        prime = np.uint64(1099511628211)
        h = (h ^ np.uint64(grp_ptr[q + 1] - grp_ptr[q])) * prime
        for i in range(grp_ptr[q], grp_ptr[q + 1]):
            h = (h ^ np.uint64(row_sig[i])) * prime
        out[q] = np.int64(h)


@numba.njit(parallel=True, cache=True)
def groups_match(grp_ptr, indptr, inc_ptr, inc_loc, rpos, k, rep):
    """True when every group q has exactly the structure of group rep[q] (row by row: lengths, local rows of
    the incidences, places of the entries): guards the templates against hash collisions."""
    bad = 0
    for q in numba.prange(grp_ptr.shape[0] - 1):
        qr = rep[q]
        if grp_ptr[q + 1] - grp_ptr[q] != grp_ptr[qr + 1] - grp_ptr[qr]:
            bad += 1
            continue
        for d in range(grp_ptr[q + 1] - grp_ptr[q]):
            i = grp_ptr[q] + d
            j = grp_ptr[qr] + d
            ok = indptr[i + 1] - indptr[i] == indptr[j + 1] - indptr[j] and \
                inc_ptr[i + 1] - inc_ptr[i] == inc_ptr[j + 1] - inc_ptr[j]
            if ok:
                ti = inc_ptr[i]
                tj = inc_ptr[j]
                for u in range(inc_ptr[i + 1] - ti):
                    if inc_loc[ti + u] != inc_loc[tj + u]:
                        ok = False
                    for b in range(k):
                        if rpos[(ti + u) * k + b] != rpos[(tj + u) * k + b]:
                            ok = False
            if not ok:
                bad += 1
                break
    return bad == 0


@numba.njit(cache=True)
def group_templates(grp_ptr, indptr, inc_ptr, inc_loc, rpos, K, first, out):
    """out[g, u, r] = sum of K[a*k + b] over the entries b of incidence u (local row a) of the rows of group
    first[g] that land in slot r of the group (its rows' slots one after the other): the dense
    (incidences x slots) matrix of the groups of template g (out zeroed)."""
    k = rpos.shape[0] // max(1, inc_loc.shape[0])
    for g in range(first.shape[0]):
        q = first[g]
        s0 = indptr[grp_ptr[q]]
        for i in range(grp_ptr[q], grp_ptr[q + 1]):
            off = indptr[i] - s0
            m = indptr[i + 1] - indptr[i]
            t0 = inc_ptr[i]
            for t in range(t0, inc_ptr[i + 1]):
                a = np.int64(inc_loc[t])
                for b in range(k):
                    r = np.int64(rpos[t * k + b])
                    if r < m:
                        out[g, t - t0, off + r] += K[a * k + b]


# -- values: sum_e coef[e] K_e into the CSR data, row by row ---------------------------------------
@numba.njit(inline="always")
def _scatter_row(buf, t0, t1, inc_elem, inc_loc, rpos, vals, shared, coef, k):
    """buf[rpos[t*k + b]] += coef[e_t] K_{e_t}[a_t, b] for the incidences t0 <= t < t1 (unsigned index
    arithmetic: no negative-index wraparound code in the inner loop)."""
    uk = numba.uint64(k)
    if shared:
        for t in range(t0, t1):
            c = coef[numba.uint64(inc_elem[t])]
            off = numba.uint64(inc_loc[t]) * uk
            q = numba.uint64(t) * uk
            for b in range(k):
                ub = numba.uint64(b)
                buf[rpos[q + ub]] += c * vals[off + ub]
    else:
        for t in range(t0, t1):
            c = coef[numba.uint64(inc_elem[t])]
            q = numba.uint64(t) * uk
            for b in range(k):
                ub = numba.uint64(b)
                buf[rpos[q + ub]] += c * vals[q + ub]


@numba.njit(parallel=True, cache=True)
def gather_rows(indptr, inc_ptr, inc_elem, inc_loc, rpos, vals, shared, k, coef, base, nchunks, scratch, out):
    """out[s] = base[s] + sum_e coef[e] K_e (slot s), one row at a time (see the section comment).

    ``vals`` is the shared K (k*k, ``shared``) or the local rows in incidence order (``row_vals``); an empty
    ``base`` stands for zero. ``scratch`` = 0 says that no entry is condensed: the rows are then summed in
    place in ``out``; else in a buffer whose entry ``scratch`` takes the condensed columns. Literal k for
    the common sizes lets LLVM unroll the inner loop."""
    n = indptr.shape[0] - 1
    has_base = base.shape[0] > 0
    nchunks = max(1, min(n, nchunks))
    for ch in numba.prange(nchunks):
        buf = np.empty(scratch + 1)
        for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            s0 = indptr[i]
            m = indptr[i + 1] - s0
            # with condensed entries the whole buffer: its entry `scratch` (past every row) takes them
            dst = out[s0:s0 + m] if scratch == 0 else buf
            if has_base:
                for r in range(m):
                    dst[r] = base[s0 + r]
            else:
                for r in range(m):
                    dst[r] = 0.0
            t0 = inc_ptr[i]
            t1 = inc_ptr[i + 1]
            if k == 3:
                _scatter_row(dst, t0, t1, inc_elem, inc_loc, rpos, vals, shared, coef, 3)
            elif k == 4:
                _scatter_row(dst, t0, t1, inc_elem, inc_loc, rpos, vals, shared, coef, 4)
            elif k == 6:
                _scatter_row(dst, t0, t1, inc_elem, inc_loc, rpos, vals, shared, coef, 6)
            elif k == 8:
                _scatter_row(dst, t0, t1, inc_elem, inc_loc, rpos, vals, shared, coef, 8)
            else:
                _scatter_row(dst, t0, t1, inc_elem, inc_loc, rpos, vals, shared, coef, k)
            if scratch > 0:
                for r in range(m):
                    out[s0 + r] = buf[r]


@numba.njit(inline="always")
def _coef_at(coef, inc_elem, t0, ni, u):
    """The coefficient of the u-th element of a row group, 0 past its last."""
    return coef[inc_elem[t0 + u]] if u < ni else 0.0


@numba.njit(inline="always")
def _template4(o, b, has_base, T, c0, c1, c2, c3, m):
    """o[r] = b[r] + T[0, r] c0 + ... + T[3, r] c3, added left to right (gather_rows' order); the
    coefficients are scalars, so the loop over r vectorises."""
    if has_base:
        for r in range(m):
            o[r] = b[r] + T[0, r] * c0 + T[1, r] * c1 + T[2, r] * c2 + T[3, r] * c3
    else:
        for r in range(m):
            o[r] = T[0, r] * c0 + T[1, r] * c1 + T[2, r] * c2 + T[3, r] * c3


@numba.njit(inline="always")
def _template8(o, b, has_base, T, c0, c1, c2, c3, c4, c5, c6, c7, m):
    """As _template4 with 8 coefficients."""
    if has_base:
        for r in range(m):
            o[r] = (b[r] + T[0, r] * c0 + T[1, r] * c1 + T[2, r] * c2 + T[3, r] * c3 + T[4, r] * c4 + T[5, r] * c5
                    + T[6, r] * c6 + T[7, r] * c7)
    else:
        for r in range(m):
            o[r] = (T[0, r] * c0 + T[1, r] * c1 + T[2, r] * c2 + T[3, r] * c3 + T[4, r] * c4 + T[5, r] * c5
                    + T[6, r] * c6 + T[7, r] * c7)


@numba.njit(parallel=True, cache=True)
def gather_templates(indptr, inc_ptr, inc_elem, grp_ptr, grp_tmpl, tmpl, coef, base, nchunks, out):
    """The shared-matrix assembly of rows that repeat a few patterns, one row group at a time (consecutive
    rows with the same elements: ``row_groups``): with c = coef of the group's elements,
    out[s0 + r] = base + sum_u tmpl[g, u, r] c[u] over the group's slots s0 + r (g = grp_tmpl[q]).

    The templates are zero-padded to the largest number of elements of a group U and the missing
    coefficients are zero, so every slot takes U products; for U = 4 and 8 the coefficients are scalars and
    the loop over the slots vectorises (else one pass per element). Same additions in the same order as
    gather_rows (the zeros add +-0), provided every coef is finite."""
    ng = grp_ptr.shape[0] - 1
    has_base = base.shape[0] > 0
    U = tmpl.shape[1]
    nchunks = max(1, min(ng, nchunks))
    for ch in numba.prange(nchunks):
        for q in range(ch * ng // nchunks, (ch + 1) * ng // nchunks):
            i0 = grp_ptr[q]
            s0 = indptr[i0]
            m = indptr[grp_ptr[q + 1]] - s0
            t0 = inc_ptr[i0]
            ni = inc_ptr[i0 + 1] - t0
            T = tmpl[grp_tmpl[q]]
            o = out[s0:s0 + m]
            b = base[s0:s0 + m] if has_base else base
            if U == 4:
                _template4(o, b, has_base, T, _coef_at(coef, inc_elem, t0, ni, 0), _coef_at(coef, inc_elem, t0, ni, 1),
                           _coef_at(coef, inc_elem, t0, ni, 2), _coef_at(coef, inc_elem, t0, ni, 3), m)
            elif U == 8:
                _template8(o, b, has_base, T, _coef_at(coef, inc_elem, t0, ni, 0), _coef_at(coef, inc_elem, t0, ni, 1),
                           _coef_at(coef, inc_elem, t0, ni, 2), _coef_at(coef, inc_elem, t0, ni, 3),
                           _coef_at(coef, inc_elem, t0, ni, 4), _coef_at(coef, inc_elem, t0, ni, 5),
                           _coef_at(coef, inc_elem, t0, ni, 6), _coef_at(coef, inc_elem, t0, ni, 7), m)
            else:
                if has_base:
                    for r in range(m):
                        o[r] = b[r]
                else:
                    for r in range(m):
                        o[r] = 0.0
                for u in range(ni):
                    c = coef[inc_elem[t0 + u]]
                    Tu = T[u]
                    for r in range(m):
                        o[r] += Tu[r] * c


# -- tangent: (sum_e coef_e K_e) z, row by row -------------------------------------------------------
@numba.njit(inline="always")
def _row_matvec1(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, z, k):
    acc = 0.0
    for t in range(t0, t1):
        e = inc_elem[t]
        off = inc_loc[t] * k if shared else t * k
        s = 0.0
        for b in range(k):
            j = conn[e, b]
            if j >= 0:
                s += vals[off + b] * z[j]
        acc += coef[e] * s
    return acc


@numba.njit(inline="always")
def _row_matvec2(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, z, k):
    """The two columns of one row at once (the paired tangent of a Hessian action): one read of the row's
    entries and indices for both."""
    acc0 = 0.0
    acc1 = 0.0
    for t in range(t0, t1):
        e = inc_elem[t]
        off = inc_loc[t] * k if shared else t * k
        s0 = 0.0
        s1 = 0.0
        for b in range(k):
            j = conn[e, b]
            if j >= 0:
                v = vals[off + b]
                s0 += v * z[j, 0]
                s1 += v * z[j, 1]
        c = coef[e]
        acc0 += c * s0
        acc1 += c * s1
    return acc0, acc1


@numba.njit(inline="always")
def _incidence_products(t, e, inc_loc, conn, vals, shared, z, k, s):
    """s[c] = sum_b K_e[a, b] z[conn[e, b], c] for the incidence t = (e, a), every column c of z (condensed dofs
    skipped)."""
    off = inc_loc[t] * k if shared else t * k
    for c in range(z.shape[1]):
        s[c] = 0.0
    for b in range(k):
        j = conn[e, b]
        if j >= 0:
            v = vals[off + b]
            for c in range(z.shape[1]):
                s[c] += v * z[j, c]


@numba.njit(parallel=True, cache=True)
def rows_matvec(inc_ptr, inc_elem, inc_loc, conn, vals, shared, coef, z, nchunks, out):
    """out[i, c] = sum over the incidences t = (e, a) of row i of coef[e] sum_b K_e[a, b] z[conn[e, b], c]:
    the product (sum_e coef_e K_e) z without the matrix (condensed dofs skipped). Rows in parallel."""
    n = inc_ptr.shape[0] - 1
    k = conn.shape[1]
    ncol = z.shape[1]
    nchunks = max(1, min(n, nchunks))
    if ncol == 1:
        zz = z[:, 0]
        for ch in numba.prange(nchunks):
            for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
                t0 = inc_ptr[i]
                t1 = inc_ptr[i + 1]
                if k == 3:
                    out[i, 0] = _row_matvec1(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, zz, 3)
                elif k == 4:
                    out[i, 0] = _row_matvec1(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, zz, 4)
                elif k == 8:
                    out[i, 0] = _row_matvec1(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, zz, 8)
                else:
                    out[i, 0] = _row_matvec1(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, zz, k)
        return
    if ncol == 2:
        for ch in numba.prange(nchunks):
            for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
                t0 = inc_ptr[i]
                t1 = inc_ptr[i + 1]
                if k == 3:
                    a0, a1 = _row_matvec2(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, z, 3)
                elif k == 4:
                    a0, a1 = _row_matvec2(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, z, 4)
                elif k == 8:
                    a0, a1 = _row_matvec2(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, z, 8)
                else:
                    a0, a1 = _row_matvec2(t0, t1, inc_elem, inc_loc, conn, vals, shared, coef, z, k)
                out[i, 0] = a0
                out[i, 1] = a1
        return
    for ch in numba.prange(nchunks):
        s = np.empty(ncol)
        for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            for c in range(ncol):
                out[i, c] = 0.0
            for t in range(inc_ptr[i], inc_ptr[i + 1]):
                e = inc_elem[t]
                _incidence_products(t, e, inc_loc, conn, vals, shared, z, k, s)
                ce = coef[e]
                for c in range(ncol):
                    out[i, c] += ce * s[c]


# -- contraction: phi^(order)(p_e) [scale_e] w_e^T K_e z_e for one column -------------------------
@numba.njit(inline="always")
def _forms_shared(conn, K, w, z, e0, nb, Wt, Zt, acc, k, B):
    """acc[j] = w_e^T K z_e for the elements e = e0 + j, j < nb: gathered into (k, B) blocks, then
    vectorised over the block (the same products, in the same order, as the per-element form)."""
    for j in range(nb):
        e = e0 + j
        for a in range(k):
            i = conn[e, a]
            if i < 0:
                Wt[a * B + j] = 0.0
                Zt[a * B + j] = 0.0
            else:
                Wt[a * B + j] = w[i]
                Zt[a * B + j] = z[i]
    for j in range(nb):
        acc[j] = 0.0
    for a in range(k):
        for j in range(nb):
            row = 0.0
            for b in range(k):
                row += K[a * k + b] * Zt[b * B + j]
            acc[j] += Wt[a * B + j] * row


@numba.njit(inline="always")
def _form_element(conn, local, w, z, e, we, ze, k):
    """w_e^T K_e z_e (zero at condensed dofs): sum_a w_a (sum_b K_ab z_b)."""
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
            row += local[e, a * k + b] * ze[b]
        acc += we[a] * row
    return acc


#: elements per block of the shared-matrix contraction
FORM_BLOCK = 128


@numba.njit(parallel=True, cache=True)
def element_forms(conn, local, estride, w, z, code, iq, q, e0, emin, order, p, scale, nchunks, out):
    """out[e] = f_e w_e^T K_e z_e for vectors w, z with f_e = phi^(order)(p[e]) (``coef_eval``; COEF_GIVEN:
    f_e = p[e]; an empty p is not read: identity's phi' = 1) times scale[e] when ``scale`` is not empty.
    Condensed dofs (conn < 0) count as zero. ``nchunks`` ranges of elements (a few per thread), each in
    blocks of FORM_BLOCK: the forms of a block, then its factors in one vectorised loop."""
    n_elem, k = conn.shape
    has_scale = scale.shape[0] > 0
    has_p = p.shape[0] > 0
    nchunks = max(1, min(n_elem, nchunks))
    B = FORM_BLOCK
    for ch in numba.prange(nchunks):
        c0 = ch * n_elem // nchunks
        c1 = (ch + 1) * n_elem // nchunks
        acc = np.empty(B)
        F = np.empty(B)
        Wt = np.empty(k * B)
        Zt = np.empty(k * B)
        K = local[0]
        for b0 in range(c0, c1, B):
            nb = min(B, c1 - b0)
            if estride == 0:
                if k == 8:
                    _forms_shared(conn, K, w, z, b0, nb, Wt, Zt, acc, 8, B)
                elif k == 4:
                    _forms_shared(conn, K, w, z, b0, nb, Wt, Zt, acc, 4, B)
                elif k == 3:
                    _forms_shared(conn, K, w, z, b0, nb, Wt, Zt, acc, 3, B)
                else:
                    _forms_shared(conn, K, w, z, b0, nb, Wt, Zt, acc, k, B)
            else:
                for j in range(nb):
                    if k == 3:
                        acc[j] = _form_element(conn, local, w, z, b0 + j, Wt, Zt, 3)
                    elif k == 4:
                        acc[j] = _form_element(conn, local, w, z, b0 + j, Wt, Zt, 4)
                    elif k == 8:
                        acc[j] = _form_element(conn, local, w, z, b0 + j, Wt, Zt, 8)
                    else:
                        acc[j] = _form_element(conn, local, w, z, b0 + j, Wt, Zt, k)
            if code == COEF_EXP and has_p:  # a loop of its own: vectorised
                for j in range(nb):
                    F[j] = exp_fast(p[b0 + j])
            elif code == COEF_SIMP and has_p and order <= iq <= MAX_INT_POWER:
                simp_factors(iq, q, e0, emin, order, p, b0, nb, F)
            else:
                for j in range(nb):
                    F[j] = coef_eval(code, iq, q, e0, emin, order, p[b0 + j] if has_p else 0.0)
            if has_scale:
                for j in range(nb):
                    F[j] = F[j] * scale[b0 + j]
            for j in range(nb):
                out[b0 + j] = F[j] * acc[j]


# -- blocks of directions: the tangents and contractions of a blocked Hessian action ----------------------
@numba.njit(parallel=True, cache=True)
def rows_matvec_block(inc_ptr, inc_elem, inc_loc, conn, vals, shared, C, z, nchunks, out):
    """out[c, i, q] = sum over the incidences t = (e, a) of row i of C[e, q] sum_b K_e[a, b] z[conn[e, b], c]:
    the tangents (sum_e C[e, q] K_e) z[:, c] of q directions at once, each row's local products formed once
    for every direction (condensed dofs skipped). Rows in parallel."""
    n = inc_ptr.shape[0] - 1
    k = conn.shape[1]
    nq = C.shape[1]
    ncol = z.shape[1]
    nchunks = max(1, min(n, nchunks))
    for ch in numba.prange(nchunks):
        s = np.empty(ncol)
        for i in range(ch * n // nchunks, (ch + 1) * n // nchunks):
            for c in range(ncol):
                for q in range(nq):
                    out[c, i, q] = 0.0
            for t in range(inc_ptr[i], inc_ptr[i + 1]):
                e = inc_elem[t]
                _incidence_products(t, e, inc_loc, conn, vals, shared, z, k, s)
                for c in range(ncol):
                    sc = s[c]
                    for q in range(nq):
                        out[c, i, q] += C[e, q] * sc


@numba.njit(parallel=True, cache=True)
def element_bilinear_block(conn, local, estride, W, Z, accumulate, nchunks, out):
    """out[e, q] (+)= W[conn_e, qw]^T K_e Z[conn_e, qz] for the nq columns of out, with qw = q when W has nq
    columns and qw = 0 when it has one (a vector shared by every column), the same for Z: the contractions of
    nq directions, each element's matrix read once for all of them (condensed dofs count as zero). Elements
    in parallel; ``accumulate`` adds to out instead of overwriting it."""
    n_elem, k = conn.shape
    nq = out.shape[1]
    sw = 1 if W.shape[1] > 1 else 0
    sz = 1 if Z.shape[1] > 1 else 0
    nchunks = max(1, min(n_elem, nchunks))
    for ch in numba.prange(nchunks):
        row = np.empty(nq)
        val = np.empty(nq)
        for e in range(ch * n_elem // nchunks, (ch + 1) * n_elem // nchunks):
            le = e * estride
            for q in range(nq):
                val[q] = 0.0
            for a in range(k):
                i = conn[e, a]
                if i < 0:
                    continue
                if sz == 0:  # a shared z: one row product for every column
                    r = 0.0
                    for b in range(k):
                        j = conn[e, b]
                        if j >= 0:
                            r += local[le, a * k + b] * Z[j, 0]
                    for q in range(nq):
                        val[q] += W[i, q * sw] * r
                    continue
                for q in range(nq):
                    row[q] = 0.0
                for b in range(k):
                    j = conn[e, b]
                    if j < 0:
                        continue
                    kab = local[le, a * k + b]
                    for q in range(nq):
                        row[q] += kab * Z[j, q]
                for q in range(nq):
                    val[q] += W[i, q * sw] * row[q]
            if accumulate:
                for q in range(nq):
                    out[e, q] += val[q]
            else:
                for q in range(nq):
                    out[e, q] = val[q]
