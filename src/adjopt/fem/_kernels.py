"""Numba element kernels: one ``prange`` loop over elements each.

All kernels take raw arrays: ``points`` (N, d) float64, ``cells`` (E, k)
int64, reference shape-function gradients ``dN`` (q, d, k) (and values
``N`` (q, k)) at the quadrature points with weights ``w`` (q,). They fill the
preallocated ``out`` and ``detj`` (E, q) arrays; validation happens in the
Python wrappers. Integrals use ``|det J|`` so that consistently negatively
oriented cells still give the right matrices; the wrappers reject cells whose
``det J`` changes sign or vanishes.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _gather(points, cells, e, xe):
    k = cells.shape[1]
    d = points.shape[1]
    for a in range(k):
        for i in range(d):
            xe[a, i] = points[cells[e, a], i]


@numba.njit(cache=True)
def _jac_grads(xe, dnq, grad):
    """Physical gradients ``G[a] = J^{-T} dN[:, a]`` with ``J_ij = sum_a X_ai dN_ja``; returns det J.

    If det J == 0 the gradients are set to zero (the caller reports the cell).
    """
    k, d = xe.shape
    J = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            s = 0.0
            for a in range(k):
                s += xe[a, i] * dnq[j, a]
            J[i, j] = s
    inv = np.zeros((d, d))
    if d == 2:
        det = J[0, 0] * J[1, 1] - J[0, 1] * J[1, 0]
        if det != 0.0:
            inv[0, 0] = J[1, 1] / det
            inv[0, 1] = -J[0, 1] / det
            inv[1, 0] = -J[1, 0] / det
            inv[1, 1] = J[0, 0] / det
    else:
        c00 = J[1, 1] * J[2, 2] - J[1, 2] * J[2, 1]
        c01 = J[1, 2] * J[2, 0] - J[1, 0] * J[2, 2]
        c02 = J[1, 0] * J[2, 1] - J[1, 1] * J[2, 0]
        det = J[0, 0] * c00 + J[0, 1] * c01 + J[0, 2] * c02
        if det != 0.0:
            inv[0, 0] = c00 / det
            inv[1, 0] = c01 / det
            inv[2, 0] = c02 / det
            inv[0, 1] = (J[0, 2] * J[2, 1] - J[0, 1] * J[2, 2]) / det
            inv[1, 1] = (J[0, 0] * J[2, 2] - J[0, 2] * J[2, 0]) / det
            inv[2, 1] = (J[0, 1] * J[2, 0] - J[0, 0] * J[2, 1]) / det
            inv[0, 2] = (J[0, 1] * J[1, 2] - J[0, 2] * J[1, 1]) / det
            inv[1, 2] = (J[0, 2] * J[1, 0] - J[0, 0] * J[1, 2]) / det
            inv[2, 2] = (J[0, 0] * J[1, 1] - J[0, 1] * J[1, 0]) / det
    # G[a, i] = sum_j inv[j, i] dN[j, a]
    for a in range(k):
        for i in range(d):
            s = 0.0
            for j in range(d):
                s += inv[j, i] * dnq[j, a]
            grad[a, i] = s
    return det


@numba.njit(cache=True, parallel=True)
def laplace_kernel(points, cells, dn, w, kappa, out, detj):
    """``out[e] = kappa_e sum_q w_q |det J_q| G_q G_q^T`` (stiffness of -div(kappa grad u))."""
    n_el, k = cells.shape
    d = points.shape[1]
    for e in numba.prange(n_el):
        xe = np.empty((k, d))
        grad = np.empty((k, d))
        _gather(points, cells, e, xe)
        for a in range(k):
            for b in range(k):
                out[e, a, b] = 0.0
        for q in range(w.shape[0]):
            dj = _jac_grads(xe, dn[q], grad)
            detj[e, q] = dj
            c = kappa[e] * w[q] * abs(dj)
            for a in range(k):
                for b in range(a, k):
                    s = 0.0
                    for i in range(d):
                        s += grad[a, i] * grad[b, i]
                    out[e, a, b] += c * s
        for a in range(k):
            for b in range(a):
                out[e, a, b] = out[e, b, a]


@numba.njit(cache=True, parallel=True)
def mass_kernel(points, cells, N, dn, w, rho, out, detj):
    """``out[e] = rho_e sum_q w_q |det J_q| N_q N_q^T`` (consistent mass)."""
    n_el, k = cells.shape
    d = points.shape[1]
    for e in numba.prange(n_el):
        xe = np.empty((k, d))
        grad = np.empty((k, d))
        _gather(points, cells, e, xe)
        for a in range(k):
            for b in range(k):
                out[e, a, b] = 0.0
        for q in range(w.shape[0]):
            dj = _jac_grads(xe, dn[q], grad)
            detj[e, q] = dj
            c = rho[e] * w[q] * abs(dj)
            for a in range(k):
                for b in range(k):
                    out[e, a, b] += c * N[q, a] * N[q, b]


@numba.njit(cache=True)
def _strain_matrix(grad, B):
    """Voigt strain-displacement matrix, dofs node-major ``[n0x, n0y, (n0z,) n1x, ...]``.

    2D rows ``[e_xx, e_yy, g_xy]``; 3D rows ``[e_xx, e_yy, e_zz, g_yz, g_xz, g_xy]``
    (engineering shear strains).
    """
    k, d = grad.shape
    B[:, :] = 0.0
    for a in range(k):
        gx = grad[a, 0]
        gy = grad[a, 1]
        if d == 2:
            B[0, 2 * a] = gx
            B[1, 2 * a + 1] = gy
            B[2, 2 * a] = gy
            B[2, 2 * a + 1] = gx
        else:
            gz = grad[a, 2]
            c = 3 * a
            B[0, c] = gx
            B[1, c + 1] = gy
            B[2, c + 2] = gz
            B[3, c + 1] = gz
            B[3, c + 2] = gy
            B[4, c] = gz
            B[4, c + 2] = gx
            B[5, c] = gy
            B[5, c + 1] = gx


@numba.njit(cache=True, parallel=True)
def elasticity_kernel(points, cells, dn, w, dmat, scale, out, detj):
    """``out[e] = scale_e sum_q w_q |det J_q| B_q^T D B_q`` (linear elasticity)."""
    n_el, k = cells.shape
    d = points.shape[1]
    ns = dmat.shape[0]
    kd = k * d
    for e in numba.prange(n_el):
        xe = np.empty((k, d))
        grad = np.empty((k, d))
        B = np.empty((ns, kd))
        dmat_b = np.empty((ns, kd))
        _gather(points, cells, e, xe)
        for a in range(kd):
            for b in range(kd):
                out[e, a, b] = 0.0
        for q in range(w.shape[0]):
            dj = _jac_grads(xe, dn[q], grad)
            detj[e, q] = dj
            _strain_matrix(grad, B)
            for r in range(ns):
                for b in range(kd):
                    s = 0.0
                    for t in range(ns):
                        s += dmat[r, t] * B[t, b]
                    dmat_b[r, b] = s
            c = scale[e] * w[q] * abs(dj)
            for a in range(kd):
                for b in range(a, kd):
                    s = 0.0
                    for r in range(ns):
                        s += B[r, a] * dmat_b[r, b]
                    out[e, a, b] += c * s
        for a in range(kd):
            for b in range(a):
                out[e, a, b] = out[e, b, a]


@numba.njit(cache=True)
def _xi(pe):
    """Optimal upwind function ``coth(Pe) - 1/Pe`` (series ``Pe/3 - Pe^3/45`` for small Pe)."""
    if pe < 1e-3:
        return pe / 3.0 - pe * pe * pe / 45.0
    if pe > 20.0:
        return 1.0 - 1.0 / pe
    return 1.0 / np.tanh(pe) - 1.0 / pe


@numba.njit(cache=True, parallel=True)
def advection_diffusion_kernel(points, cells, dn, ref_volume, vel, kappa, supg, out, detj, tau):
    """P1 local matrices of ``-div(kappa grad u) + b . grad u`` with optional SUPG.

    ``out[e, a, b] = |T| (kappa G_a.G_b + (b.G_b)/(d+1) + tau (b.G_a)(b.G_b))``;
    ``tau = h / (2|b|) (coth Pe - 1/Pe)``, ``Pe = |b| h / (2 kappa)``,
    ``h = 2 |b| / sum_a |b . G_a|`` (element length along the flow).
    """
    n_el, k = cells.shape
    d = points.shape[1]
    for e in numba.prange(n_el):
        xe = np.empty((k, d))
        grad = np.empty((k, d))
        bg = np.empty(k)
        _gather(points, cells, e, xe)
        dj = _jac_grads(xe, dn[0], grad)
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
