"""numba kernels of the element residual F_e(u) = int a_e q(u) grad u . grad v + c_e g(u) v.

One pass over the elements (chunks in parallel) evaluates, at every quadrature point, the state u and its
gradient, and the other fields a mode needs (w, du), and accumulates per element:

    RESIDUAL   r_a  = sum_q om [A q gu.G_a + C g N_a]
    JT_ACTION  (K^T w)_b = sum_q om [A (q' N_b gu.gw + q G_b.gw) + C g' N_b wq]
    SECOND_U   d/du_b (w^T K du) with (A, C), plus K(A2, C2)^T w (the mixed term, A2 = a' dp, C2 = c' dp), in
               columns 0..k-1, and in columns k..k+3 the forms FORMS1 and FORMS0 of the same element:
               (sum_q om [q gw.gdu + q' duq gu.gw], sum_q om g' wq duq, sum_q om q gu.gw, sum_q om g wq)
    FORMS0     (sum_q om q gu.gw, sum_q om g wq)                       per element, two values
    JACOBIAN   K_ab = sum_q om [A (q G_a.G_b + q' N_b gu.G_a) + C g' N_a N_b]

with q(u) = 1 + beta u^2, g(u) = 0, u^3 or exp(u) (``G_*``), om the quadrature weight times |det J|, N_a the
shape functions and G_a their physical gradients at the point. Element-local results are scattered to the free
dofs by :func:`scatter` (serial: the sum of one dof's contributions in a fixed order, so results do not depend
on the thread count).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

G_NONE, G_CUBE, G_EXP = 0, 1, 2
RESIDUAL, JT_ACTION, SECOND_U, FORMS0, JACOBIAN = 0, 1, 2, 3, 5


@numba.njit(cache=True, inline="always")
def _g(kind, u):
    if kind == G_CUBE:
        return u * u * u, 3.0 * u * u, 6.0 * u
    if kind == G_EXP:
        e = np.exp(u)
        return e, e, e
    return 0.0, 0.0, 0.0


@numba.njit(parallel=True, cache=True)
def element_pass(mode, conn, N, G, es, qs, W, ws, beta, gkind, A, C, A2, C2, u, w, du, nch, out):
    """Accumulate ``mode`` per element into ``out``: (E, k) local vectors, (E, 2) forms or (E, k*k) matrices."""
    n_elem, k = conn.shape
    nq = N.shape[0]
    d = G.shape[3]
    per = (n_elem + nch - 1) // nch
    for c in prange(nch):
        ue = np.empty(k)
        we = np.empty(k)
        de = np.empty(k)
        gu = np.empty(d)
        gw = np.empty(d)
        gd = np.empty(d)
        for e in range(c * per, min(n_elem, (c + 1) * per)):
            for a in range(k):
                ue[a] = u[conn[e, a]]
            if mode != RESIDUAL and mode != JACOBIAN:
                for a in range(k):
                    we[a] = w[conn[e, a]]
            if mode == SECOND_U:
                for a in range(k):
                    de[a] = du[conn[e, a]]
            for a in range(out.shape[1]):
                out[e, a] = 0.0
            Ae = A[e]
            Ce = C[e]
            for q in range(nq):
                Gq = G[e * es, q * qs]
                om = W[e * ws, q]
                uq = 0.0
                wq = 0.0
                dq = 0.0
                for a in range(k):
                    uq += N[q, a] * ue[a]
                if mode != RESIDUAL and mode != JACOBIAN:
                    for a in range(k):
                        wq += N[q, a] * we[a]
                if mode == SECOND_U:
                    for a in range(k):
                        dq += N[q, a] * de[a]
                if q == 0 or qs != 0:  # gradients: once per element where they are constant (simplices)
                    for i in range(d):
                        gu[i] = 0.0
                        gw[i] = 0.0
                        gd[i] = 0.0
                    for a in range(k):
                        for i in range(d):
                            gu[i] += Gq[a, i] * ue[a]
                    if mode != RESIDUAL and mode != JACOBIAN:
                        for a in range(k):
                            for i in range(d):
                                gw[i] += Gq[a, i] * we[a]
                    if mode == SECOND_U:
                        for a in range(k):
                            for i in range(d):
                                gd[i] += Gq[a, i] * de[a]
                    uw = 0.0
                    wd = 0.0
                    for i in range(d):
                        uw += gu[i] * gw[i]
                        wd += gw[i] * gd[i]
                qv = 1.0 + beta * uq * uq
                q1 = 2.0 * beta * uq
                q2 = 2.0 * beta
                g0, g1, g2 = _g(gkind, uq)
                if mode == RESIDUAL:
                    for a in range(k):
                        s = 0.0
                        for i in range(d):
                            s += gu[i] * Gq[a, i]
                        out[e, a] += om * (Ae * qv * s + Ce * g0 * N[q, a])
                elif mode == JT_ACTION:
                    for b in range(k):
                        s = 0.0
                        for i in range(d):
                            s += Gq[b, i] * gw[i]
                        out[e, b] += om * (Ae * (q1 * N[q, b] * uw + qv * s) + Ce * g1 * N[q, b] * wq)
                elif mode == SECOND_U:
                    A2e = A2[e]
                    C2e = C2[e]
                    for b in range(k):
                        s = 0.0
                        for i in range(d):
                            s += Gq[b, i] * gw[i]
                        nb = N[q, b]
                        uu = Ae * (q1 * nb * wd + q2 * nb * dq * uw + q1 * dq * s) + Ce * g2 * nb * wq * dq
                        up = A2e * (q1 * nb * uw + qv * s) + C2e * g1 * nb * wq
                        out[e, b] += om * (uu + up)
                    out[e, k] += om * (qv * wd + q1 * dq * uw)
                    out[e, k + 1] += om * g1 * wq * dq
                    out[e, k + 2] += om * qv * uw
                    out[e, k + 3] += om * g0 * wq
                elif mode == FORMS0:
                    out[e, 0] += om * qv * uw
                    out[e, 1] += om * g0 * wq
                else:  # JACOBIAN
                    for a in range(k):
                        sa = 0.0
                        for i in range(d):
                            sa += gu[i] * Gq[a, i]
                        for b in range(k):
                            s = 0.0
                            for i in range(d):
                                s += Gq[a, i] * Gq[b, i]
                            out[e, a * k + b] += om * (Ae * (qv * s + q1 * N[q, b] * sa) + Ce * g1 * N[q, a] * N[q, b])


@numba.njit(cache=True)
def scatter(conn, free_of, local, out):
    """out[free_of[conn[e, a]]] += local[e, a] for the free dofs (serial, element order)."""
    n_elem, k = conn.shape
    for e in range(n_elem):
        for a in range(k):
            i = free_of[conn[e, a]]
            if i >= 0:
                out[i] += local[e, a]


@numba.njit(parallel=True, cache=True)
def gather_slots(slot_ptr, slot_elem, slot_loc, local, out):
    """out[s] = sum of the element entries mapped to slot s (CSR values of the Jacobian)."""
    for s in prange(out.shape[0]):
        acc = 0.0
        for j in range(slot_ptr[s], slot_ptr[s + 1]):
            acc += local[slot_elem[j], slot_loc[j]]
        out[s] = acc
