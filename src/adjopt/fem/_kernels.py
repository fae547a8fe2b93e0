"""Numba element kernels: one ``prange`` loop over elements each.

All kernels take raw arrays: ``points`` (N, d) float64, ``cells`` (E, k)
int64, reference shape-function gradients ``dN`` (q, d, k) (and values
``N`` (q, k)) at the quadrature points with weights ``w`` (q,). They fill the
preallocated ``out`` and ``detj`` (E, q) arrays; validation happens in the
Python wrappers. Integrals use ``|det J|`` so that consistently negatively
oriented cells still give the right matrices; the wrappers reject cells whose
``det J`` changes sign or vanishes.

Nothing is allocated per element or per quadrature point: the ``prange``
loop runs over chunks of ``_CHUNK`` elements, each chunk allocates its small
scratch arrays (nodal coordinates, gradients, D B) once, and J, det J and J^-1
are scalars. The mass kernels compute det J only. When the reference
gradients are the same at every quadrature point (simplices), J and the
gradients are computed once per element and reused (the same operations on
the same inputs, so the results are unchanged). Sums keep the order and the
``+0.0`` start of the straightforward loops, so the kernels reproduce the
plain dense formulas bitwise.

The chunk loops are compiled once per cell type (triangle, quad, tetra,
hexahedron: ``k`` nodes in ``d`` dimensions as compile-time constants, so
that LLVM unrolls the small loops) plus once for any other shape; the
parallel kernels pick the variant from ``cells.shape[1]`` and
``points.shape[1]``.
"""

from __future__ import annotations

import numba
import numpy as np

_CHUNK = 512  # elements per prange iteration (scratch arrays are allocated once per chunk)
_SHAPES = ((3, 2), (4, 2), (4, 3), (8, 3), (0, 0))  # (k, d) variants; (0, 0): read from the arrays


@numba.njit(cache=True)
def _n_chunks(n_el):
    return (n_el + _CHUNK - 1) // _CHUNK


@numba.njit(cache=True)
def _variant(k, d):
    """Index into ``_SHAPES`` of the chunk-loop variant for ``k`` nodes in ``d`` dimensions."""
    if d == 2:
        if k == 3:
            return 0
        if k == 4:
            return 1
    elif d == 3:
        if k == 4:
            return 2
        if k == 8:
            return 3
    return 4


@numba.njit(cache=True)
def _constant_dn(dn):
    """True if ``dn[q]`` is the same (bitwise) at every quadrature point (affine simplices)."""
    for q in range(1, dn.shape[0]):
        for j in range(dn.shape[1]):
            for a in range(dn.shape[2]):
                if dn[q, j, a] != dn[0, j, a]:
                    return False
    return True


@numba.njit(cache=True)
def _gather(points, cells, e, xe, k, d):
    for a in range(k):
        for i in range(d):
            xe[a, i] = points[cells[e, a], i]


@numba.njit(cache=True)
def _jacobian2(xe, dn, q, k):
    """``J_ij = sum_a X_ai dN_ja`` (2D) as scalars ``J00, J01, J10, J11``."""
    J00 = J01 = J10 = J11 = 0.0
    for a in range(k):
        x0 = xe[a, 0]
        x1 = xe[a, 1]
        g0 = dn[q, 0, a]
        g1 = dn[q, 1, a]
        J00 += x0 * g0
        J01 += x0 * g1
        J10 += x1 * g0
        J11 += x1 * g1
    return J00, J01, J10, J11


@numba.njit(cache=True)
def _jacobian3(xe, dn, q, k):
    """``J_ij = sum_a X_ai dN_ja`` (3D) as scalars ``J00, J01, ..., J22``."""
    J00 = J01 = J02 = J10 = J11 = J12 = J20 = J21 = J22 = 0.0
    for a in range(k):
        x0 = xe[a, 0]
        x1 = xe[a, 1]
        x2 = xe[a, 2]
        g0 = dn[q, 0, a]
        g1 = dn[q, 1, a]
        g2 = dn[q, 2, a]
        J00 += x0 * g0
        J01 += x0 * g1
        J02 += x0 * g2
        J10 += x1 * g0
        J11 += x1 * g1
        J12 += x1 * g2
        J20 += x2 * g0
        J21 += x2 * g1
        J22 += x2 * g2
    return J00, J01, J02, J10, J11, J12, J20, J21, J22


@numba.njit(cache=True)
def _det(xe, dn, q, k, d):
    """det J at one quadrature point (no inverse, no gradients)."""
    if d == 2:
        J00, J01, J10, J11 = _jacobian2(xe, dn, q, k)
        return J00 * J11 - J01 * J10
    J00, J01, J02, J10, J11, J12, J20, J21, J22 = _jacobian3(xe, dn, q, k)
    c00 = J11 * J22 - J12 * J21
    c01 = J12 * J20 - J10 * J22
    c02 = J10 * J21 - J11 * J20
    return J00 * c00 + J01 * c01 + J02 * c02


@numba.njit(cache=True)
def _grads(xe, dn, q, grad, k, d):
    """Physical gradients ``G[a] = J^{-T} dN[:, a]`` into the (k, d) scratch ``grad``; returns det J.

    ``J_ij = sum_a X_ai dN_ja``. If det J == 0 the gradients are set to zero
    (the caller reports the cell).
    """
    if d == 2:
        J00, J01, J10, J11 = _jacobian2(xe, dn, q, k)
        det = J00 * J11 - J01 * J10
        if det == 0.0:
            for a in range(k):
                grad[a, 0] = 0.0
                grad[a, 1] = 0.0
            return det
        i00 = J11 / det
        i01 = -J01 / det
        i10 = -J10 / det
        i11 = J00 / det
        # G[a, i] = sum_j inv[j, i] dN[j, a]
        for a in range(k):
            g0 = dn[q, 0, a]
            g1 = dn[q, 1, a]
            grad[a, 0] = 0.0 + i00 * g0 + i10 * g1
            grad[a, 1] = 0.0 + i01 * g0 + i11 * g1
        return det
    J00, J01, J02, J10, J11, J12, J20, J21, J22 = _jacobian3(xe, dn, q, k)
    c00 = J11 * J22 - J12 * J21
    c01 = J12 * J20 - J10 * J22
    c02 = J10 * J21 - J11 * J20
    det = J00 * c00 + J01 * c01 + J02 * c02
    if det == 0.0:
        for a in range(k):
            grad[a, 0] = 0.0
            grad[a, 1] = 0.0
            grad[a, 2] = 0.0
        return det
    i00 = c00 / det
    i10 = c01 / det
    i20 = c02 / det
    i01 = (J02 * J21 - J01 * J22) / det
    i11 = (J00 * J22 - J02 * J20) / det
    i21 = (J01 * J20 - J00 * J21) / det
    i02 = (J01 * J12 - J02 * J11) / det
    i12 = (J02 * J10 - J00 * J12) / det
    i22 = (J00 * J11 - J01 * J10) / det
    for a in range(k):
        g0 = dn[q, 0, a]
        g1 = dn[q, 1, a]
        g2 = dn[q, 2, a]
        grad[a, 0] = 0.0 + i00 * g0 + i10 * g1 + i20 * g2
        grad[a, 1] = 0.0 + i01 * g0 + i11 * g1 + i21 * g2
        grad[a, 2] = 0.0 + i02 * g0 + i12 * g1 + i22 * g2
    return det


# ------------------------------------------------------------------ Laplace
def _laplace_chunk(K, D):
    """Element loop of :func:`laplace_kernel` over ``e0 <= e < e1``; ``K, D`` compile-time (0: runtime)."""

    @numba.njit
    def chunk(points, cells, dn, w, kappa, out, detj, const, e0, e1):
        k = K if K else cells.shape[1]
        d = D if D else points.shape[1]
        nq = w.shape[0]
        xe = np.empty((k, d))
        grad = np.empty((k, d))
        for e in range(e0, e1):
            _gather(points, cells, e, xe, k, d)
            dj = 0.0
            for q in range(nq):
                if q == 0 or not const:
                    dj = _grads(xe, dn, q, grad, k, d)
                detj[e, q] = dj
                c = kappa[e] * w[q] * abs(dj)
                for a in range(k):
                    for b in range(a, k):
                        s = 0.0
                        for i in range(d):
                            s += grad[a, i] * grad[b, i]
                        v = c * s
                        out[e, a, b] = 0.0 + v if q == 0 else out[e, a, b] + v  # the sum over q starts at +0.0
            for a in range(k):
                for b in range(a):
                    out[e, a, b] = out[e, b, a]

    return chunk


_LAP = tuple(_laplace_chunk(K, D) for K, D in _SHAPES)
_LAP0, _LAP1, _LAP2, _LAP3, _LAP4 = _LAP


@numba.njit(cache=True, parallel=True)
def laplace_kernel(points, cells, dn, w, kappa, out, detj):
    """``out[e] = kappa_e sum_q w_q |det J_q| G_q G_q^T`` (stiffness of -div(kappa grad u))."""
    n_el, k = cells.shape
    v = _variant(k, points.shape[1])
    const = _constant_dn(dn)
    for ch in numba.prange(_n_chunks(n_el)):
        e0 = ch * _CHUNK
        e1 = min(n_el, e0 + _CHUNK)
        if v == 0:
            _LAP0(points, cells, dn, w, kappa, out, detj, const, e0, e1)
        elif v == 1:
            _LAP1(points, cells, dn, w, kappa, out, detj, const, e0, e1)
        elif v == 2:
            _LAP2(points, cells, dn, w, kappa, out, detj, const, e0, e1)
        elif v == 3:
            _LAP3(points, cells, dn, w, kappa, out, detj, const, e0, e1)
        else:
            _LAP4(points, cells, dn, w, kappa, out, detj, const, e0, e1)


# --------------------------------------------------------------------- mass
def _mass_chunk(K, D):
    """Element loop of :func:`mass_kernel` over ``e0 <= e < e1``; ``K, D`` compile-time (0: runtime)."""

    @numba.njit
    def chunk(points, cells, N, dn, w, rho, out, detj, const, e0, e1):
        k = K if K else cells.shape[1]
        d = D if D else points.shape[1]
        nq = w.shape[0]
        xe = np.empty((k, d))
        for e in range(e0, e1):
            _gather(points, cells, e, xe, k, d)
            dj = 0.0
            for q in range(nq):
                if q == 0 or not const:
                    dj = _det(xe, dn, q, k, d)
                detj[e, q] = dj
                c = rho[e] * w[q] * abs(dj)
                for a in range(k):
                    ca = c * N[q, a]
                    if q == 0:
                        for b in range(k):
                            out[e, a, b] = 0.0 + ca * N[q, b]
                    else:
                        for b in range(k):
                            out[e, a, b] += ca * N[q, b]

    return chunk


_MASS0 = _mass_chunk(3, 2)  # triangles
_MASS1 = _mass_chunk(4, 2)  # quads
_MASS2 = _mass_chunk(4, 3)  # tetrahedra
_MASS4 = _mass_chunk(0, 0)  # anything else; hexahedra too (measured faster than their constant-shape variant)


@numba.njit(cache=True, parallel=True)
def mass_kernel(points, cells, N, dn, w, rho, out, detj):
    """``out[e] = rho_e sum_q w_q |det J_q| N_q N_q^T`` (consistent mass; needs det J only)."""
    n_el, k = cells.shape
    v = _variant(k, points.shape[1])
    const = _constant_dn(dn)
    for ch in numba.prange(_n_chunks(n_el)):
        e0 = ch * _CHUNK
        e1 = min(n_el, e0 + _CHUNK)
        if v == 0:
            _MASS0(points, cells, N, dn, w, rho, out, detj, const, e0, e1)
        elif v == 1:
            _MASS1(points, cells, N, dn, w, rho, out, detj, const, e0, e1)
        elif v == 2:
            _MASS2(points, cells, N, dn, w, rho, out, detj, const, e0, e1)
        else:
            _MASS4(points, cells, N, dn, w, rho, out, detj, const, e0, e1)


def _rowsum_chunk(K, D):
    """Element loop of :func:`mass_rowsum_kernel` over ``e0 <= e < e1``; ``K, D`` compile-time (0: runtime)."""

    @numba.njit
    def chunk(points, cells, N, dn, w, nsum, out, detj, const, e0, e1):
        k = K if K else cells.shape[1]
        d = D if D else points.shape[1]
        nq = w.shape[0]
        ndet = detj.shape[1]
        xe = np.empty((k, d))
        for e in range(e0, e1):
            _gather(points, cells, e, xe, k, d)
            for a in range(k):
                out[e, a] = 0.0
            dj = 0.0
            for q in range(nq):
                if q == 0 or not const:
                    dj = _det(xe, dn, q, k, d)
                if q < ndet:
                    detj[e, q] = dj
                c = w[q] * abs(dj) * nsum[q]
                for a in range(k):
                    out[e, a] += c * N[q, a]

    return chunk


_ROW0 = _rowsum_chunk(3, 2)  # triangles
_ROW1 = _rowsum_chunk(4, 2)  # quads
_ROW2 = _rowsum_chunk(4, 3)  # tetrahedra
_ROW4 = _rowsum_chunk(0, 0)  # anything else, hexahedra


@numba.njit(cache=True, parallel=True)
def mass_rowsum_kernel(points, cells, N, dn, w, out, detj):
    """``out[e, a] = sum_q w_q |det J_q| N_qa sum_b N_qb`` (= int N_a, row sums of the unit mass).

    The (k, k) local matrices are not formed. ``detj`` is (E, q), or (E, 1)
    if ``dn`` is the same at every quadrature point (then det J is too).
    """
    n_el, k = cells.shape
    v = _variant(k, points.shape[1])
    nq = w.shape[0]
    const = _constant_dn(dn)
    nsum = np.zeros(nq)
    for q in range(nq):
        for b in range(k):
            nsum[q] += N[q, b]
    for ch in numba.prange(_n_chunks(n_el)):
        e0 = ch * _CHUNK
        e1 = min(n_el, e0 + _CHUNK)
        if v == 0:
            _ROW0(points, cells, N, dn, w, nsum, out, detj, const, e0, e1)
        elif v == 1:
            _ROW1(points, cells, N, dn, w, nsum, out, detj, const, e0, e1)
        elif v == 2:
            _ROW2(points, cells, N, dn, w, nsum, out, detj, const, e0, e1)
        else:
            _ROW4(points, cells, N, dn, w, nsum, out, detj, const, e0, e1)


def _apply_chunk(K, D):
    """Element loop of :func:`mass_apply_kernel` over ``e0 <= e < e1``; ``K, D`` compile-time (0: runtime)."""

    @numba.njit
    def chunk(points, cells, N, dn, w, f, out, detj, const, e0, e1):
        k = K if K else cells.shape[1]
        d = D if D else points.shape[1]
        nq = w.shape[0]
        m = f.shape[1]
        ndet = detj.shape[1]
        xe = np.empty((k, d))
        fe = np.empty((k, m))
        for e in range(e0, e1):
            _gather(points, cells, e, xe, k, d)
            for a in range(k):
                for c in range(m):
                    fe[a, c] = f[cells[e, a], c]
                    out[e, a, c] = 0.0
            dj = 0.0
            for q in range(nq):
                if q == 0 or not const:
                    dj = _det(xe, dn, q, k, d)
                if q < ndet:
                    detj[e, q] = dj
                wq = w[q] * abs(dj)
                for c in range(m):
                    fq = 0.0
                    for b in range(k):
                        fq += N[q, b] * fe[b, c]
                    fq *= wq
                    for a in range(k):
                        out[e, a, c] += fq * N[q, a]

    return chunk


_APP0 = _apply_chunk(3, 2)  # triangles
_APP1 = _apply_chunk(4, 2)  # quads
_APP2 = _apply_chunk(4, 3)  # tetrahedra
_APP4 = _apply_chunk(0, 0)  # anything else, hexahedra


@numba.njit(cache=True, parallel=True)
def mass_apply_kernel(points, cells, N, dn, w, f, out, detj):
    """``out[e, a, c] = sum_q w_q |det J_q| N_qa sum_b N_qb f[cells[e, b], c]`` (= (M_e f_e)_a).

    ``f`` is (n_nodes, m) nodal values, ``out`` (E, k, m): the unit consistent
    mass applied to ``f`` without forming the (k, k) local matrices. ``detj``
    as in :func:`mass_rowsum_kernel`.
    """
    n_el, k = cells.shape
    v = _variant(k, points.shape[1])
    const = _constant_dn(dn)
    for ch in numba.prange(_n_chunks(n_el)):
        e0 = ch * _CHUNK
        e1 = min(n_el, e0 + _CHUNK)
        if v == 0:
            _APP0(points, cells, N, dn, w, f, out, detj, const, e0, e1)
        elif v == 1:
            _APP1(points, cells, N, dn, w, f, out, detj, const, e0, e1)
        elif v == 2:
            _APP2(points, cells, N, dn, w, f, out, detj, const, e0, e1)
        else:
            _APP4(points, cells, N, dn, w, f, out, detj, const, e0, e1)


# --------------------------------------------------------------- elasticity
# Voigt strain-displacement matrix B, dofs node-major ``[n0x, n0y, (n0z,) n1x, ...]``;
# 2D rows ``[e_xx, e_yy, g_xy]``, 3D rows ``[e_xx, e_yy, e_zz, g_yz, g_xz, g_xy]``
# (engineering shear strains):
#
#   2D column (node n, x): rows 0, 2 hold gx, gy;   (n, y): rows 1, 2 hold gy, gx
#   3D column (n, x): rows 0, 4, 5 hold gx, gz, gy;  (n, y): rows 1, 3, 5 hold gy, gz, gx;
#      (n, z): rows 2, 3, 4 hold gz, gy, gx
#
# with ``(gx, gy, gz) = grad N_n``. ``D B`` and ``B^T (D B)`` are summed over
# these nonzero rows only, in ascending row order. The skipped terms are
# products with exact zeros of B; since every sum starts at +0.0, adding them
# changes nothing, so the result is bitwise that of the dense products.


@numba.njit(cache=True)
def _db2(dmat, grad, db, k):
    """``db[r, b] = (D B)[r, b]`` for 2D (``dmat`` 3x3, ``db`` (3, 2k))."""
    for n in range(k):
        gx = grad[n, 0]
        gy = grad[n, 1]
        b = 2 * n
        for r in range(3):
            db[r, b] = 0.0 + dmat[r, 0] * gx + dmat[r, 2] * gy
            db[r, b + 1] = 0.0 + dmat[r, 1] * gy + dmat[r, 2] * gx


@numba.njit(cache=True)
def _db3(dmat, grad, db, k):
    """``db[r, b] = (D B)[r, b]`` for 3D (``dmat`` 6x6, ``db`` (6, 3k))."""
    for n in range(k):
        gx = grad[n, 0]
        gy = grad[n, 1]
        gz = grad[n, 2]
        b = 3 * n
        for r in range(6):
            db[r, b] = 0.0 + dmat[r, 0] * gx + dmat[r, 4] * gz + dmat[r, 5] * gy
            db[r, b + 1] = 0.0 + dmat[r, 1] * gy + dmat[r, 3] * gz + dmat[r, 5] * gx
            db[r, b + 2] = 0.0 + dmat[r, 2] * gz + dmat[r, 3] * gy + dmat[r, 4] * gx


@numba.njit(cache=True)
def _btdb2(grad, db, c, first, out, e, k):
    """Upper triangle of ``out[e] (+)= c B^T (D B)`` (2D); ``first``: assign (the sum starts at +0.0)."""
    kd = 2 * k
    for n in range(k):
        gx = grad[n, 0]
        gy = grad[n, 1]
        a = 2 * n
        for b in range(a, kd):
            v = c * (0.0 + gx * db[0, b] + gy * db[2, b])
            out[e, a, b] = 0.0 + v if first else out[e, a, b] + v
        for b in range(a + 1, kd):
            v = c * (0.0 + gy * db[1, b] + gx * db[2, b])
            out[e, a + 1, b] = 0.0 + v if first else out[e, a + 1, b] + v


@numba.njit(cache=True)
def _btdb3(grad, db, c, first, out, e, k):
    """Upper triangle of ``out[e] (+)= c B^T (D B)`` (3D); ``first``: assign (the sum starts at +0.0)."""
    kd = 3 * k
    for n in range(k):
        gx = grad[n, 0]
        gy = grad[n, 1]
        gz = grad[n, 2]
        a = 3 * n
        for b in range(a, kd):
            v = c * (0.0 + gx * db[0, b] + gz * db[4, b] + gy * db[5, b])
            out[e, a, b] = 0.0 + v if first else out[e, a, b] + v
        for b in range(a + 1, kd):
            v = c * (0.0 + gy * db[1, b] + gz * db[3, b] + gx * db[5, b])
            out[e, a + 1, b] = 0.0 + v if first else out[e, a + 1, b] + v
        for b in range(a + 2, kd):
            v = c * (0.0 + gz * db[2, b] + gy * db[3, b] + gx * db[4, b])
            out[e, a + 2, b] = 0.0 + v if first else out[e, a + 2, b] + v


def _elasticity_chunk(K, D):
    """Element loop of :func:`elasticity_kernel` over ``e0 <= e < e1``; ``K, D`` compile-time (0: runtime)."""

    @numba.njit
    def chunk(points, cells, dn, w, dmat, scale, out, detj, const, e0, e1):
        k = K if K else cells.shape[1]
        d = D if D else points.shape[1]
        kd = k * d
        nq = w.shape[0]
        xe = np.empty((k, d))
        grad = np.empty((k, d))
        db = np.empty((dmat.shape[0], kd))
        for e in range(e0, e1):
            _gather(points, cells, e, xe, k, d)
            dj = 0.0
            for q in range(nq):
                if q == 0 or not const:
                    dj = _grads(xe, dn, q, grad, k, d)
                    if d == 2:
                        _db2(dmat, grad, db, k)
                    else:
                        _db3(dmat, grad, db, k)
                detj[e, q] = dj
                c = scale[e] * w[q] * abs(dj)
                if d == 2:
                    _btdb2(grad, db, c, q == 0, out, e, k)
                else:
                    _btdb3(grad, db, c, q == 0, out, e, k)
            for a in range(kd):
                for b in range(a):
                    out[e, a, b] = out[e, b, a]

    return chunk


_EL = tuple(_elasticity_chunk(K, D) for K, D in _SHAPES)
_EL0, _EL1, _EL2, _EL3, _EL4 = _EL


@numba.njit(cache=True, parallel=True)
def elasticity_kernel(points, cells, dn, w, dmat, scale, out, detj):
    """``out[e] = scale_e sum_q w_q |det J_q| B_q^T D B_q`` (linear elasticity).

    ``dmat`` is (3, 3) in 2D and (6, 6) in 3D (any, not necessarily
    isotropic or symmetric); B is used through its sparsity pattern, see above.
    """
    n_el, k = cells.shape
    v = _variant(k, points.shape[1])
    const = _constant_dn(dn)
    for ch in numba.prange(_n_chunks(n_el)):
        e0 = ch * _CHUNK
        e1 = min(n_el, e0 + _CHUNK)
        if v == 0:
            _EL0(points, cells, dn, w, dmat, scale, out, detj, const, e0, e1)
        elif v == 1:
            _EL1(points, cells, dn, w, dmat, scale, out, detj, const, e0, e1)
        elif v == 2:
            _EL2(points, cells, dn, w, dmat, scale, out, detj, const, e0, e1)
        elif v == 3:
            _EL3(points, cells, dn, w, dmat, scale, out, detj, const, e0, e1)
        else:
            _EL4(points, cells, dn, w, dmat, scale, out, detj, const, e0, e1)


# ------------------------------------------------------- advection-diffusion
@numba.njit(cache=True)
def _xi(pe):
    """Optimal upwind function ``coth(Pe) - 1/Pe`` (series ``Pe/3 - Pe^3/45`` for small Pe)."""
    if pe < 1e-3:
        return pe / 3.0 - pe * pe * pe / 45.0
    if pe > 20.0:
        return 1.0 - 1.0 / pe
    return 1.0 / np.tanh(pe) - 1.0 / pe


def _advection_chunk(K, D):
    """Element loop of :func:`advection_diffusion_kernel` over ``e0 <= e < e1``; ``K, D`` compile-time (0: runtime)."""

    @numba.njit
    def chunk(points, cells, dn, ref_volume, vel, kappa, supg, out, detj, tau, e0, e1):
        k = K if K else cells.shape[1]
        d = D if D else points.shape[1]
        xe = np.empty((k, d))
        grad = np.empty((k, d))
        bg = np.empty(k)
        for e in range(e0, e1):
            _gather(points, cells, e, xe, k, d)
            dj = _grads(xe, dn, 0, grad, k, d)
            detj[e, 0] = dj
            vol = ref_volume * abs(dj)
            bnorm = 0.0
            for i in range(d):
                bnorm += vel[e, i] * vel[e, i]
            bnorm = np.sqrt(bnorm)
            ssum = 0.0
            for a in range(k):
                s = 0.0
                for i in range(d):
                    s += vel[e, i] * grad[a, i]
                bg[a] = s
                ssum += abs(s)
            t = 0.0
            if supg and bnorm > 0.0 and ssum > 0.0:
                h = 2.0 * bnorm / ssum
                if kappa[e] > 0.0:
                    t = h / (2.0 * bnorm) * _xi(bnorm * h / (2.0 * kappa[e]))
                else:
                    t = h / (2.0 * bnorm)
            tau[e] = t
            for a in range(k):
                for b in range(k):
                    s = 0.0
                    for i in range(d):
                        s += grad[a, i] * grad[b, i]
                    out[e, a, b] = vol * (kappa[e] * s + bg[b] / (d + 1) + t * bg[a] * bg[b])

    return chunk


_ADV0 = _advection_chunk(3, 2)  # triangles
_ADV2 = _advection_chunk(4, 3)  # tetrahedra
_ADV4 = _advection_chunk(0, 0)


@numba.njit(cache=True, parallel=True)
def advection_diffusion_kernel(points, cells, dn, ref_volume, vel, kappa, supg, out, detj, tau):
    """P1 local matrices of ``-div(kappa grad u) + b . grad u`` with optional SUPG.

    ``out[e, a, b] = |T| (kappa G_a.G_b + (b.G_b)/(d+1) + tau (b.G_a)(b.G_b))``;
    ``tau = h / (2|b|) (coth Pe - 1/Pe)``, ``Pe = |b| h / (2 kappa)``,
    ``h = 2 |b| / sum_a |b . G_a|`` (element length along the flow).
    """
    n_el, k = cells.shape
    v = _variant(k, points.shape[1])
    for ch in numba.prange(_n_chunks(n_el)):
        e0 = ch * _CHUNK
        e1 = min(n_el, e0 + _CHUNK)
        if v == 0:
            _ADV0(points, cells, dn, ref_volume, vel, kappa, supg, out, detj, tau, e0, e1)
        elif v == 2:
            _ADV2(points, cells, dn, ref_volume, vel, kappa, supg, out, detj, tau, e0, e1)
        else:
            _ADV4(points, cells, dn, ref_volume, vel, kappa, supg, out, detj, tau, e0, e1)
