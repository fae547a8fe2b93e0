"""Svanberg's interior-point solver of the MMA subproblem for few constraints (m < n), compiled.

The same iteration as :func:`adjopt.optimize.design.subsolv` (its numpy form
is the reference), with every vector expression over the n variables fused
into a few passes: the residual in one pass, a Newton step's linear system
(the (m + 1) x (m + 1) reduced system) in one pass, the step and its length
in another, each line-search trial and its residual in one more. The numpy
form makes some 60 passes over n-vectors per Newton step; at 120k variables
and 4 constraints it took about 0.6 s per design iteration.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True)
def _residual_n(low, upp, alfa, beta, p0, q0, P, Q, x, lam, xsi, eta, epsi, gvec):
    """The residual's part over the variables: (sum of squares, max |r|) of its n-rows, and ``gvec`` (m,),
    sum_j P_ij / (upp_j - x_j) + Q_ij / (x_j - low_j), over the variables given (a rank's block)."""
    n = x.shape[0]
    m = gvec.shape[0]
    ss = 0.0
    mx = 0.0
    for i in range(m):
        gvec[i] = 0.0
    for j in range(n):
        iu = 1.0 / (upp[j] - x[j])
        il = 1.0 / (x[j] - low[j])
        plam = p0[j]
        qlam = q0[j]
        for i in range(m):
            plam += lam[i] * P[i, j]
            qlam += lam[i] * Q[i, j]
            gvec[i] += P[i, j] * iu + Q[i, j] * il
        r1 = plam * (iu * iu) - qlam * (il * il) - xsi[j] + eta[j]
        r5 = xsi[j] * (x[j] - alfa[j]) - epsi
        r6 = eta[j] * (beta[j] - x[j]) - epsi
        ss += r1 * r1 + r5 * r5 + r6 * r6
        mx = max(mx, abs(r1), abs(r5), abs(r6))
    return ss, mx


@numba.njit(cache=True)
def _residual_m(a0, a, b, c, d, y, z, lam, mu, zet, s, epsi, gvec, ss, mx):
    """The residual's (||r||_2, max |r|) from its n-part (``ss``, ``mx``, the whole ``gvec``) and its m-rows."""
    m = y.shape[0]
    alam = 0.0
    for i in range(m):
        alam += a[i] * lam[i]
        r2 = c[i] + d[i] * y[i] - mu[i] - lam[i]
        r4 = gvec[i] - a[i] * z - y[i] + s[i] - b[i]
        r7 = mu[i] * y[i] - epsi
        r9 = lam[i] * s[i] - epsi
        ss += r2 * r2 + r4 * r4 + r7 * r7 + r9 * r9
        mx = max(mx, abs(r2), abs(r4), abs(r7), abs(r9))
    r3 = a0 - zet - alam
    r8 = zet * z - epsi
    ss += r3 * r3 + r8 * r8
    mx = max(mx, abs(r3), abs(r8))
    return math.sqrt(ss), mx


@numba.njit(cache=True)
def _residual(low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, c, d, x, y, z, lam, xsi, eta, mu, zet, s, epsi,
              gvec):
    """(||r||_2, max |r|) of the subproblem's KKT residual at the given point (``gvec`` is scratch, (m,))."""
    ss, mx = _residual_n(low, upp, alfa, beta, p0, q0, P, Q, x, lam, xsi, eta, epsi, gvec)
    return _residual_m(a0, a, b, c, d, y, z, lam, mu, zet, s, epsi, gvec, ss, mx)


@numba.njit(cache=True)
def _system_n(low, upp, alfa, beta, p0, q0, P, Q, x, lam, xsi, eta, epsi, gvec, gdx, AA, GG, delx, diagx):
    """A Newton step's pass over the variables: GG, delx, diagx, and the sums gvec, GG (delx / diagx) and the
    lower triangle of (GG / diagx) GG^T into ``gvec``, ``gdx`` and ``AA[:m, :m]`` (zeroed first)."""
    n = x.shape[0]
    m = gvec.shape[0]
    for i in range(m):
        gvec[i] = 0.0
        gdx[i] = 0.0
        for k in range(m + 1):
            AA[i, k] = 0.0
    for j in range(n):
        iu = 1.0 / (upp[j] - x[j])
        il = 1.0 / (x[j] - low[j])
        iu2 = iu * iu
        il2 = il * il
        plam = p0[j]
        qlam = q0[j]
        for i in range(m):
            plam += lam[i] * P[i, j]
            qlam += lam[i] * Q[i, j]
            gvec[i] += P[i, j] * iu + Q[i, j] * il
            GG[i, j] = P[i, j] * iu2 - Q[i, j] * il2
        ia = 1.0 / (x[j] - alfa[j])
        ib = 1.0 / (beta[j] - x[j])
        dj = plam * iu2 - qlam * il2 - epsi * ia + epsi * ib
        gj = 2.0 * (plam * (iu2 * iu) + qlam * (il2 * il)) + xsi[j] * ia + eta[j] * ib
        delx[j] = dj
        diagx[j] = gj
        ig = 1.0 / gj
        t = dj * ig
        for i in range(m):
            gi = GG[i, j]
            gdx[i] += gi * t
            gig = gi * ig
            for k in range(i + 1):
                AA[i, k] += gig * GG[k, j]


@numba.njit(cache=True)
def _system_m(a0, a, b, c, d, y, z, lam, mu, zet, s, epsi, gvec, gdx, AA, rhs):
    """The reduced (m + 1) x (m + 1) system from the whole sums of :func:`_system_n`: ``AA`` and ``rhs`` filled."""
    m = y.shape[0]
    alam = 0.0
    for i in range(m):
        alam += a[i] * lam[i]
    delz = a0 - alam - epsi / z
    for i in range(m):
        dely = c[i] + d[i] * y[i] - lam[i] - epsi / y[i]
        diagy = d[i] + mu[i] / y[i]
        dellam = gvec[i] - a[i] * z - y[i] - b[i] + epsi / lam[i]
        rhs[i] = dellam + dely / diagy - gdx[i]
        AA[i, i] += s[i] / lam[i] + 1.0 / diagy
        for k in range(i):
            AA[k, i] = AA[i, k]
        AA[i, m] = a[i]
        AA[m, i] = a[i]
    AA[m, m] = -zet / z
    rhs[m] = delz


@numba.njit(cache=True)
def _step_n(x, alfa, beta, xsi, eta, epsi, sol, GG, delx, diagx, dx, dxsi, deta):
    """The step in x and in the bounds' multipliers over the variables; returns the largest 1 / step length."""
    n = x.shape[0]
    m = GG.shape[0]
    stm = 1.0
    for j in range(n):
        gl = 0.0
        for i in range(m):
            gl += sol[i] * GG[i, j]
        dxj = -(delx[j] + gl) / diagx[j]
        ia = 1.0 / (x[j] - alfa[j])
        ib = 1.0 / (beta[j] - x[j])
        dx[j] = dxj
        dxsi[j] = -xsi[j] + epsi * ia - xsi[j] * dxj * ia
        deta[j] = -eta[j] + epsi * ib + eta[j] * dxj * ib
        stm = max(stm, -1.01 * dxj * ia, 1.01 * dxj * ib, -1.01 * dxsi[j] / xsi[j], -1.01 * deta[j] / eta[j])
    return stm


@numba.njit(cache=True)
def _step_m(c, d, y, z, lam, mu, zet, s, epsi, sol, stm):
    """The step of the m + 2 other unknowns: (dy, dlam, dmu, ds, dz, dzet, stm) with stm updated."""
    m = y.shape[0]
    dz = sol[m]
    dy = np.empty(m)
    dmu = np.empty(m)
    ds = np.empty(m)
    dlam = sol[:m].copy()
    for i in range(m):
        diagy = d[i] + mu[i] / y[i]
        dely = c[i] + d[i] * y[i] - lam[i] - epsi / y[i]
        dy[i] = -dely / diagy + dlam[i] / diagy
        dmu[i] = -mu[i] + epsi / y[i] - (mu[i] * dy[i]) / y[i]
        ds[i] = -s[i] + epsi / lam[i] - (s[i] * dlam[i]) / lam[i]
        stm = max(stm, -1.01 * dy[i] / y[i], -1.01 * dlam[i] / lam[i], -1.01 * dmu[i] / mu[i],
                  -1.01 * ds[i] / s[i])
    dzet = -zet + epsi / z - zet * dz / z
    stm = max(stm, -1.01 * dz / z, -1.01 * dzet / zet)
    return dy, dlam, dmu, ds, dz, dzet, stm


@numba.njit(cache=True)
def _move_n(x0, xsi0, eta0, dx, dxsi, deta, steg, x, xsi, eta):
    """x, xsi, eta = x0 + steg dx, ... (a line-search trial over the variables)."""
    for j in range(x.shape[0]):
        x[j] = x0[j] + steg * dx[j]
        xsi[j] = xsi0[j] + steg * dxsi[j]
        eta[j] = eta0[j] + steg * deta[j]


@numba.njit(cache=True)
def _start(alfa, beta, c):
    """The interior point's start: (x, y, z, lam, xsi, eta, mu, zet, s) (x, xsi, eta over the given variables)."""
    n = alfa.shape[0]
    m = c.shape[0]
    x = 0.5 * (alfa + beta)
    xsi = np.empty(n)
    eta = np.empty(n)
    for j in range(n):
        xsi[j] = max(1.0 / (x[j] - alfa[j]), 1.0)
        eta[j] = max(1.0 / (beta[j] - x[j]), 1.0)
    mu = np.empty(m)
    for i in range(m):
        mu[i] = max(1.0, 0.5 * c[i])
    return x, np.ones(m), 1.0, np.ones(m), xsi, eta, mu, 1.0, np.ones(m)


@numba.njit(cache=True)
def subsolv_few(low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, c, d, epsimin, max_newton):
    """The MMA subproblem's solution for m < n constraints: ``(x, y, z, lam, xsi, eta, mu, zet, s, newton)``."""
    n = p0.shape[0]
    m = b.shape[0]
    epsi = 1.0
    x, y, z, lam, xsi, eta, mu, zet, s = _start(alfa, beta, c)
    total = 0
    # scratch
    gvec = np.empty(m)
    GG = np.empty((m, n))
    delx = np.empty(n)
    diagx = np.empty(n)
    dx = np.empty(n)
    dxsi = np.empty(n)
    deta = np.empty(n)
    x0 = np.empty(n)
    xsi0 = np.empty(n)
    eta0 = np.empty(n)
    AA = np.empty((m + 1, m + 1))
    rhs = np.empty(m + 1)
    gdx = np.empty(m)
    while epsi > epsimin:
        resnorm, resmax = _residual(low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, c, d, x, y, z, lam, xsi, eta,
                                    mu, zet, s, epsi, gvec)
        it = 0
        while resmax > 0.9 * epsi and it < max_newton:
            it += 1
            total += 1
            _system_n(low, upp, alfa, beta, p0, q0, P, Q, x, lam, xsi, eta, epsi, gvec, gdx, AA, GG, delx, diagx)
            _system_m(a0, a, b, c, d, y, z, lam, mu, zet, s, epsi, gvec, gdx, AA, rhs)
            sol = np.linalg.solve(AA, rhs)
            stm = _step_n(x, alfa, beta, xsi, eta, epsi, sol, GG, delx, diagx, dx, dxsi, deta)
            dy, dlam, dmu, ds, dz, dzet, stm = _step_m(c, d, y, z, lam, mu, zet, s, epsi, sol, stm)
            steg = 1.0 / stm
            # backtracking on the residual norm
            x0[:] = x
            xsi0[:] = xsi
            eta0[:] = eta
            y0 = y.copy()
            lam0 = lam.copy()
            mu0 = mu.copy()
            s0 = s.copy()
            z0 = z
            zet0 = zet
            itto = 0
            resinew = 2.0 * resnorm
            while resinew > resnorm and itto < 50:
                itto += 1
                _move_n(x0, xsi0, eta0, dx, dxsi, deta, steg, x, xsi, eta)
                for i in range(m):
                    y[i] = y0[i] + steg * dy[i]
                    lam[i] = lam0[i] + steg * dlam[i]
                    mu[i] = mu0[i] + steg * dmu[i]
                    s[i] = s0[i] + steg * ds[i]
                z = z0 + steg * dz
                zet = zet0 + steg * dzet
                resinew, resmax = _residual(low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, c, d, x, y, z, lam, xsi,
                                            eta, mu, zet, s, epsi, gvec)
                steg /= 2.0
            resnorm = resinew
        epsi *= 0.1
    return x, y, z, lam, xsi, eta, mu, zet, s, total


def subsolv_blocks(low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, c, d, epsimin, max_newton, space):
    """:func:`subsolv_few` with the variables in blocks over the ranks of ``space``
    (:class:`~adjopt.optimize.space.Blocks`): the same passes over this rank's variables, their sums and maxima
    reduced over the ranks (one allreduce per pass), the m + 2 other unknowns the same on every rank. Collective.
    """
    n = p0.shape[0]
    m = b.shape[0]
    epsi = 1.0
    x, y, z, lam, xsi, eta, mu, zet, s = _start(alfa, beta, c)
    total = 0
    gvec, gdx = np.empty(m), np.empty(m)
    GG = np.empty((m, n))
    delx, diagx, dx, dxsi, deta = (np.empty(n) for _ in range(5))
    AA = np.empty((m + 1, m + 1))
    rhs = np.empty(m + 1)

    def residual():
        ss, mx = _residual_n(low, upp, alfa, beta, p0, q0, P, Q, x, lam, xsi, eta, epsi, gvec)
        both = space.sum_array(np.concatenate([gvec, [ss]]))
        gvec[:] = both[:m]
        return _residual_m(a0, a, b, c, d, y, z, lam, mu, zet, s, epsi, gvec, float(both[m]), space.max([mx]))

    while epsi > epsimin:
        resnorm, resmax = residual()
        it = 0
        while resmax > 0.9 * epsi and it < max_newton:
            it += 1
            total += 1
            _system_n(low, upp, alfa, beta, p0, q0, P, Q, x, lam, xsi, eta, epsi, gvec, gdx, AA, GG, delx, diagx)
            sums = space.sum_array(np.concatenate([gvec, gdx, AA[:m, :m].ravel()]))
            gvec[:], gdx[:] = sums[:m], sums[m:2 * m]
            AA[:m, :m] = sums[2 * m:].reshape(m, m)
            _system_m(a0, a, b, c, d, y, z, lam, mu, zet, s, epsi, gvec, gdx, AA, rhs)
            sol = np.linalg.solve(AA, rhs)
            stm = space.max([_step_n(x, alfa, beta, xsi, eta, epsi, sol, GG, delx, diagx, dx, dxsi, deta)])
            dy, dlam, dmu, ds, dz, dzet, stm = _step_m(c, d, y, z, lam, mu, zet, s, epsi, sol, stm)
            steg = 1.0 / stm
            x0, xsi0, eta0 = x.copy(), xsi.copy(), eta.copy()
            y0, lam0, mu0, s0, z0, zet0 = y.copy(), lam.copy(), mu.copy(), s.copy(), z, zet
            itto = 0
            resinew = 2.0 * resnorm
            while resinew > resnorm and itto < 50:
                itto += 1
                _move_n(x0, xsi0, eta0, dx, dxsi, deta, steg, x, xsi, eta)
                y[:], lam[:], mu[:], s[:] = y0 + steg * dy, lam0 + steg * dlam, mu0 + steg * dmu, s0 + steg * ds
                z = z0 + steg * dz
                zet = zet0 + steg * dzet
                resinew, resmax = residual()
                steg /= 2.0
            resnorm = resinew
        epsi *= 0.1
    return x, y, z, lam, xsi, eta, mu, zet, s, total
