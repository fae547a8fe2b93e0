"""Design-optimization drivers for bound- and inequality-constrained problems: OC and MMA.

Both work on :class:`~adjopt.problem.Problem` s with bounds and inequality
constraints ``(functional, upper)`` meaning ``functional.value(x) <= upper``
(e.g. the volume fraction of a topology problem), and plug into the shared
loop of :mod:`adjopt.optimize.base` (history, callback, checkpoints, resume).
Their whole state is a dict of arrays and numbers, so a resumed run ends with
the same x as an uninterrupted one.

:class:`OC` (``"oc"``)
    The optimality-criteria update of the 88-line topology code (Andreassen
    et al. 2011), for exactly one constraint increasing in every variable
    (a volume) and an objective decreasing in every variable (compliance)::

        xnew = max(lo, max(x - move, min(hi, min(x + move, x * (-dc / (l dv))^eta))))

    with the multiplier ``l`` found by bisection so that the constraint holds
    at ``xnew``. Stationarity measure: the max-norm change of the last step
    (1 at the start, as ``change = 1`` in the 88-line code), so ``gtol`` is an
    absolute bound on the change; stop it as the 88-line code does with
    ``xtol=0.01`` (and ``gtol=0``).

:class:`MMA` (``"mma"``)
    Svanberg's method of moving asymptotes (1987) in the ``mmasub``
    formulation of his 2002/2007 notes, with the standard asymptote update and
    the artificial variables ``a0 = 1, a_i = 0, c_i = 1000, d_i = 1`` (an
    infeasible start is handled); the convex separable subproblem is solved by
    Svanberg's primal-dual interior-point method (``subsolv``), vectorised over
    the design variables (only m x m dense systems). Any number m >= 0 of
    constraints. Stationarity measure: a KKT residual of the original problem
    with the subproblem's multipliers (see :meth:`MMA.stationarity`); ``gtol``
    works, and ``xtol`` stops it like OC.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..solvers.base import one_blas_thread
from .base import Driver, OptimizationError, Stop
from .linesearch import safe_gradient, safe_value
from .space import SERIAL

logger = logging.getLogger(__name__)

__all__ = ["OC", "MMA", "mma_subproblem", "subsolv"]


#: halvings of a design update towards the current design when the objective fails at the update
MAX_BACKOFF = 10


def _evaluate_or_back_off(J, x: np.ndarray, xnew: np.ndarray, method: str, space=SERIAL):
    """(xnew, f, g) with f and g evaluated at xnew, or at x + 2^-k (xnew - x) for the first k where they evaluate
    (a failed PDE solve, a Newton that does not converge, NaN): the update is shortened, as a line search would.
    Raises :class:`Stop` when none of ``MAX_BACKOFF`` halvings evaluates. With the parameters in blocks
    (``space``) the ranks decide together: one rank's failure shortens the step on every rank."""
    for k in range(MAX_BACKOFF + 1):
        f = safe_value(J, xnew)
        ok = space.all(np.array([math.isfinite(f)])) if space.distributed else math.isfinite(f)
        g = safe_gradient(J, xnew) if ok else None
        if space.distributed and ok:
            ok = space.all(np.array([g is not None]))
            g = g if ok else None
        if g is not None:
            if k:
                logger.info("%s: the objective failed at the update; took %g of it", method, 0.5**k)
            return xnew, f, g
        xnew = x + 0.5 * (xnew - x)
    raise Stop(f"{method}: the objective or its gradient failed at the update and at {MAX_BACKOFF} shorter "
               "steps towards the current design (a failed PDE solve, or NaN)", success=False)


def _finite_bounds(driver: Driver, method: str) -> tuple[np.ndarray, np.ndarray]:
    if driver.bounds is None:
        raise ValueError(f"method {method!r} needs bounds: give Problem(bounds=(lower, upper)) with finite arrays or scalars")
    lo, hi = (np.asarray(b, dtype=np.float64) for b in driver.bounds)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"method {method!r} needs finite bounds; the problem's bounds have infinite entries")
    return lo, hi


def _check_positive(name: str, value, strict: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= 0 if strict else v < 0):
        raise ValueError(f"option {name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")
    return v


# =====================================================================================================
# Optimality criteria
# =====================================================================================================
class OC(Driver):
    """Optimality criteria (the update of the 88-line topology code), one constraint, bounds.

    Options
    -------
    move
        Move limit as a fraction of ``hi - lo`` (0.2; with bounds (0, 1) the
        absolute move of the 88-line code).
    eta
        Damping exponent of the update factor (0.5: the square root).
    l1, l2
        Starting bracket of the bisection on the multiplier (0, 1e9). The
        constraint gradient is normalised to mean 1 first (for a volume
        fraction with a density filter it is then exactly the 88-line code's
        ``dv``), so the bracket does not depend on how the constraint is scaled.
    bisection_tol
        Bisection runs while ``(l2 - l1) / (l1 + l2) > bisection_tol`` (1e-3).
    max_bisections
        Safety cap on the bisection steps (200).

    Every bisection step evaluates the constraint's value at the trial point
    (about 40 per iteration): it must be cheap (a volume, no PDE solve).

    The state holds x, f, g (objective gradient), ``change`` (max |x_new - x|
    of the last step), the constraint value ``volume`` and the multiplier
    ``lam`` (of the constraint as given, not normalised). The history records
    ``volume``, ``multiplier``, ``change`` and ``bisections``. Positive
    objective-gradient entries are clipped at 0 (as in the 88-line code) and
    noted once in ``warnings``.
    """

    name = "oc"
    takes_blocks = True
    defaults = {"move": 0.2, "eta": 0.5, "l1": 0.0, "l2": 1e9, "bisection_tol": 1e-3, "max_bisections": 200}
    takes_bounds = True
    takes_constraints = True
    needs_constraints = True

    def __init__(self, problem, inner, options, counts):
        super().__init__(problem, inner, options, counts)
        cons = list(problem.constraints or [])
        if len(cons) != 1:
            raise ValueError(
                f"method 'oc' needs exactly one inequality constraint (e.g. a volume fraction), the problem has {len(cons)}; "
                "use method 'mma' for several constraints (or none)"
            )
        self.lo, self.hi = _finite_bounds(self, "oc")
        if np.any(self.lo < 0):
            raise ValueError("method 'oc' needs lower bounds >= 0 (its update multiplies x by a positive factor); use 'mma'")
        self.con, upper = cons[0]
        self.upper = float(upper)
        o = self.opts
        self.move = _check_positive("move", o["move"])
        self.eta = _check_positive("eta", o["eta"])
        self.l1 = _check_positive("l1", o["l1"], strict=False)
        self.l2 = _check_positive("l2", o["l2"])
        if not self.l1 < self.l2:
            raise ValueError(f"options l1 < l2 are the bisection bracket, got l1={self.l1!r}, l2={self.l2!r}")
        self.btol = _check_positive("bisection_tol", o["bisection_tol"])
        if not (self.l2 - self.l1) / (self.l1 + self.l2) > self.btol:
            raise ValueError(f"the bisection bracket (l1, l2) = ({self.l1!r}, {self.l2!r}) is already narrower than "
                             f"bisection_tol = {self.btol!r} (relative width (l2 - l1) / (l1 + l2))")
        mb = o["max_bisections"]
        if isinstance(mb, bool) or not isinstance(mb, (int, np.integer)) or mb < 1:
            raise ValueError(f"option max_bisections must be an integer >= 1, got {mb!r}")
        self.max_bisections = int(mb)

    def start(self, x0):
        x = self.project(np.array(x0, dtype=np.float64))
        f = self.J.value(x)
        g = self.J.gradient(x)
        return dict(x=x, f=f, g=g, change=1.0, volume=float(self.con.value(x)), lam=0.0)

    def stationarity(self, state):
        """The max-norm change of the last step (1.0 at the start, as in the 88-line code)."""
        return float(state["change"])

    def iterate(self, state):
        x = state["x"]
        dc = state["g"]
        space = self.space
        dv = np.asarray(self.con.gradient(x), dtype=np.float64)
        if not space.all(dv > 0):
            raise OptimizationError(
                f"OC needs a constraint increasing in every variable (dv > 0, like a volume); {space.count(dv <= 0)} "
                "entries of its gradient are <= 0; use method 'mma'"
            )
        if space.any(dc > 0):
            note = "oc: the objective gradient has positive entries"
            if not any(w.startswith(note) for w in self.warnings):
                msg = (f"{note} ({space.count(dc > 0)} of {space.size(dc)} at the first such iterate); they are "
                       "clipped at 0 as in the 88-line code (OC assumes an objective decreasing in every variable, "
                       "like compliance; use 'mma' otherwise)")
                self.warnings.append(msg)
                logger.warning(msg)
        scale = space.sum(dv) / space.size(dv)  # dv / scale has mean 1: the 88-line dv for a filtered volume fraction
        dvn = dv / scale
        step = self.move * (self.hi - self.lo)
        xlo = np.maximum(self.lo, x - step)
        xhi = np.minimum(self.hi, x + step)
        ratio = np.maximum(-dc / dvn, 0.0)
        # x (ratio / l)^eta = [x ratio^eta] l^-eta: the array part once, a scalar per bisection step, and
        # the clip into one reused buffer (two passes over x per step besides the constraint)
        xr = x * (np.sqrt(ratio) if self.eta == 0.5 else ratio**self.eta)
        l1, l2 = self.l1, self.l2
        lmid, xnew, nb = l2, xhi, 0
        buf = np.empty_like(x)
        while (l2 - l1) / (l1 + l2) > self.btol and nb < self.max_bisections:
            nb += 1
            lmid = 0.5 * (l2 + l1)
            np.multiply(xr, lmid**-self.eta, out=buf)
            xnew = np.clip(buf, xlo, xhi, out=buf)
            if self.con.value(xnew) > self.upper:
                l1 = lmid
            else:
                l2 = lmid
        xnew, f, g = _evaluate_or_back_off(self.J, x, xnew.copy(), "oc", space)
        volume = float(self.con.value(xnew))
        change = space.max(np.abs(xnew - x), initial=0.0)
        if volume > self.upper * (1 + 1e-6) + 1e-12 and lmid >= 0.99 * self.l2:
            note = "oc: the constraint cannot be met within the bisection bracket"
            if not any(w.startswith(note) for w in self.warnings):
                msg = f"{note} (l2 = {self.l2:g}; value {volume:.6g} > {self.upper:.6g}): raise option l2"
                self.warnings.append(msg)
                logger.warning(msg)
        state["x"] = xnew
        state["f"] = f
        state["g"] = g
        state["change"] = change
        state["volume"] = volume
        state["lam"] = float(lmid / scale)
        return dict(volume=volume, multiplier=float(lmid / scale), change=change, bisections=nb)


# =====================================================================================================
# Method of moving asymptotes
# =====================================================================================================
#: the most constraints the compiled subproblem solver takes: its O(n m^2) loop of the reduced system lost to
#: numpy's BLAS products above some 50 (n = 600: 1.6x slower at m = 100, 3.7x at 599)
COMPILED_MAX_CONSTRAINTS = 16


def subsolv(low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, c, d, epsimin=1e-7, max_newton=200, compiled=True,
            space=SERIAL):
    """Svanberg's primal-dual interior-point solver of the MMA subproblem.

    minimize   sum_j (p0_j / (upp_j - x_j) + q0_j / (x_j - low_j)) + a0 z + sum_i (c_i y_i + d_i y_i^2 / 2)
    subject to sum_j (P_ij / (upp_j - x_j) + Q_ij / (x_j - low_j)) - a_i z - y_i <= b_i,
               alfa <= x <= beta, y >= 0, z >= 0.

    Vectors are 1-D (n,) or (m,), P and Q are (m, n), a0 and z scalars. Returns
    ``(x, y, z, lam, xsi, eta, mu, zet, s, newton_iterations)``. With
    ``compiled`` (the default) and 0 < m < n, m <= COMPILED_MAX_CONSTRAINTS,
    the compiled form runs (:func:`adjopt.optimize._mma_kernels.subsolv_few`,
    the same iteration in a few fused passes); this numpy form is its
    reference, and the faster one for many constraints (its (m, n) products
    go to BLAS). With ``space`` a :class:`~adjopt.optimize.space.Blocks` the
    vectors of length n are this rank's blocks and the same passes run with
    their sums reduced over the ranks
    (:func:`adjopt.optimize._mma_kernels.subsolv_blocks`, collective).
    """
    n = p0.size
    m = b.size
    finite = all(np.all(np.isfinite(v)) for v in (low, upp, alfa, beta, p0, q0, P, Q, a, b, c, d)) and np.isfinite(a0)
    if not (space.all(np.array([finite])) if space.distributed else finite):
        raise ValueError("subsolv: NaN or Inf in the subproblem's data (low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, "
                         "c or d)")
    if space.distributed:
        from ._mma_kernels import subsolv_blocks

        f64 = np.float64
        out = subsolv_blocks(*(np.ascontiguousarray(v, dtype=f64) for v in (low, upp, alfa, beta, p0, q0)),
                             *(np.ascontiguousarray(v, dtype=f64).reshape(m, n) for v in (P, Q)), float(a0),
                             *(np.ascontiguousarray(v, dtype=f64) for v in (a, b, c, d)), float(epsimin),
                             int(max_newton), space)
        x, y, z, lam, xsi, eta, mu, zet, s, total = out
        return x, y, float(z), lam, xsi, eta, mu, float(zet), s, int(total)
    if compiled and 0 < m <= COMPILED_MAX_CONSTRAINTS and m < n:
        from ._mma_kernels import subsolv_few

        f64 = np.float64
        out = subsolv_few(*(np.ascontiguousarray(v, dtype=f64) for v in (low, upp, alfa, beta, p0, q0, P, Q)),
                          float(a0), *(np.ascontiguousarray(v, dtype=f64) for v in (a, b, c, d)), float(epsimin),
                          int(max_newton))
        x, y, z, lam, xsi, eta, mu, zet, s, total = out
        return x, y, float(z), lam, xsi, eta, mu, float(zet), s, int(total)
    epsi = 1.0
    x = 0.5 * (alfa + beta)
    y = np.ones(m)
    z = 1.0
    lam = np.ones(m)
    xsi = np.maximum(1.0 / (x - alfa), 1.0)
    eta = np.maximum(1.0 / (beta - x), 1.0)
    mu = np.maximum(1.0, 0.5 * c)
    zet = 1.0
    s = np.ones(m)
    total = 0

    def residual(x, y, z, lam, xsi, eta, mu, zet, s, epsi):
        ux1 = upp - x
        xl1 = x - low
        plam = p0 + lam @ P
        qlam = q0 + lam @ Q
        gvec = P @ (1.0 / ux1) + Q @ (1.0 / xl1)
        dpsidx = plam / ux1**2 - qlam / xl1**2
        r = np.concatenate([
            dpsidx - xsi + eta,
            c + d * y - mu - lam,
            [a0 - zet - a @ lam],
            gvec - a * z - y + s - b,
            xsi * (x - alfa) - epsi,
            eta * (beta - x) - epsi,
            mu * y - epsi,
            [zet * z - epsi],
            lam * s - epsi,
        ])
        return r

    while epsi > epsimin:
        r = residual(x, y, z, lam, xsi, eta, mu, zet, s, epsi)
        resnorm = float(np.sqrt(r @ r))
        resmax = float(np.max(np.abs(r)))
        it = 0
        while resmax > 0.9 * epsi and it < max_newton:
            it += 1
            total += 1
            ux1 = upp - x
            xl1 = x - low
            ux2 = ux1 * ux1
            xl2 = xl1 * xl1
            plam = p0 + lam @ P
            qlam = q0 + lam @ Q
            gvec = P @ (1.0 / ux1) + Q @ (1.0 / xl1)
            GG = P / ux2 - Q / xl2  # (m, n)
            dpsidx = plam / ux2 - qlam / xl2
            delx = dpsidx - epsi / (x - alfa) + epsi / (beta - x)
            dely = c + d * y - lam - epsi / y
            delz = a0 - a @ lam - epsi / z
            dellam = gvec - a * z - y - b + epsi / lam
            diagx = 2.0 * (plam / (ux2 * ux1) + qlam / (xl2 * xl1)) + xsi / (x - alfa) + eta / (beta - x)
            diagy = d + mu / y
            diaglamyi = s / lam + 1.0 / diagy
            if m < n:
                blam = dellam + dely / diagy - GG @ (delx / diagx)
                Alam = np.diag(diaglamyi) + (GG / diagx) @ GG.T
                AA = np.zeros((m + 1, m + 1))
                AA[:m, :m] = Alam
                AA[:m, m] = a
                AA[m, :m] = a
                AA[m, m] = -zet / z
                sol = np.linalg.solve(AA, np.concatenate([blam, [delz]]))
                dlam = sol[:m]
                dz = float(sol[m])
                dx = -delx / diagx - (dlam @ GG) / diagx
            else:
                dellamyi = dellam + dely / diagy
                Axx = np.diag(diagx) + (GG.T / diaglamyi) @ GG
                azz = zet / z + a @ (a / diaglamyi)
                axz = -GG.T @ (a / diaglamyi)
                bx = delx + GG.T @ (dellamyi / diaglamyi)
                bz = delz - a @ (dellamyi / diaglamyi)
                AA = np.zeros((n + 1, n + 1))
                AA[:n, :n] = Axx
                AA[:n, n] = axz
                AA[n, :n] = axz
                AA[n, n] = azz
                sol = np.linalg.solve(AA, -np.concatenate([bx, [bz]]))
                dx = sol[:n]
                dz = float(sol[n])
                dlam = (GG @ dx) / diaglamyi - dz * (a / diaglamyi) + dellamyi / diaglamyi
            dy = -dely / diagy + dlam / diagy
            dxsi = -xsi + epsi / (x - alfa) - (xsi * dx) / (x - alfa)
            deta = -eta + epsi / (beta - x) + (eta * dx) / (beta - x)
            dmu = -mu + epsi / y - (mu * dy) / y
            dzet = -zet + epsi / z - zet * dz / z
            ds = -s + epsi / lam - (s * dlam) / lam
            xx = np.concatenate([y, [z], lam, xsi, eta, mu, [zet], s])
            dxx = np.concatenate([dy, [dz], dlam, dxsi, deta, dmu, [dzet], ds])
            stmxx = float(np.max(-1.01 * dxx / xx))
            stmalfa = float(np.max(-1.01 * dx / (x - alfa))) if n else 0.0
            stmbeta = float(np.max(1.01 * dx / (beta - x))) if n else 0.0
            steg = 1.0 / max(stmalfa, stmbeta, stmxx, 1.0)
            old = (x, y, z, lam, xsi, eta, mu, zet, s)
            itto = 0
            resinew = 2.0 * resnorm
            while resinew > resnorm and itto < 50:
                itto += 1
                x = old[0] + steg * dx
                y = old[1] + steg * dy
                z = old[2] + steg * dz
                lam = old[3] + steg * dlam
                xsi = old[4] + steg * dxsi
                eta = old[5] + steg * deta
                mu = old[6] + steg * dmu
                zet = old[7] + steg * dzet
                s = old[8] + steg * ds
                r = residual(x, y, z, lam, xsi, eta, mu, zet, s, epsi)
                resinew = float(np.sqrt(r @ r))
                steg /= 2.0
            resnorm = resinew
            resmax = float(np.max(np.abs(r)))
        epsi *= 0.1
    return x, y, z, lam, xsi, eta, mu, zet, s, total


def mma_subproblem(k, x, xmin, xmax, xold1, xold2, df0dx, fval, dfdx, low, upp, *, move=0.5, asyinit=0.5,
                   asyincr=1.2, asydecr=0.7, asymin=0.01, asymax=10.0, albefa=0.1, raa0=1e-5, a0=1.0, a=None, c=None,
                   d=None, epsimin=1e-7, space=SERIAL):
    """One MMA step (Svanberg's ``mmasub``): new asymptotes and the subproblem's solution.

    ``k`` is the 1-based iteration number (the asymptotes are reset in the
    first two), ``fval`` (m,) the constraint values g_i(x) (<= 0 wanted),
    ``dfdx`` (m, n) their gradients. Returns ``(xmma, y, z, lam, low, upp,
    newton_iterations)``. ``space``: where the n-vectors live (this rank's
    blocks for :class:`~adjopt.optimize.space.Blocks`; collective then).
    """
    n = x.size
    m = fval.size
    a = np.zeros(m) if a is None else a
    c = np.full(m, 1000.0) if c is None else c
    d = np.ones(m) if d is None else d
    xmami = np.maximum(xmax - xmin, 1e-5)
    if k <= 2:
        low = x - asyinit * (xmax - xmin)
        upp = x + asyinit * (xmax - xmin)
    else:
        zzz = (x - xold1) * (xold1 - xold2)
        factor = np.ones(n)
        factor[zzz > 0] = asyincr
        factor[zzz < 0] = asydecr
        low = x - factor * (xold1 - low)
        upp = x + factor * (upp - xold1)
        low = np.minimum(np.maximum(low, x - asymax * (xmax - xmin)), x - asymin * (xmax - xmin))
        upp = np.maximum(np.minimum(upp, x + asymax * (xmax - xmin)), x + asymin * (xmax - xmin))
    alfa = np.maximum(np.maximum(low + albefa * (x - low), x - move * (xmax - xmin)), xmin)
    beta = np.minimum(np.minimum(upp - albefa * (upp - x), x + move * (xmax - xmin)), xmax)
    ux1 = upp - x
    xl1 = x - low
    ux2 = ux1 * ux1
    xl2 = xl1 * xl1
    p0 = np.maximum(df0dx, 0.0)
    q0 = np.maximum(-df0dx, 0.0)
    pq0 = 0.001 * (p0 + q0) + raa0 / xmami
    p0 = (p0 + pq0) * ux2
    q0 = (q0 + pq0) * xl2
    if m == 0:
        # no constraints: the separable convex subproblem has a closed-form minimiser
        sp, sq = np.sqrt(p0), np.sqrt(q0)
        xmma = np.clip((sp * low + sq * upp) / (sp + sq), alfa, beta)
        return xmma, np.zeros(0), 0.0, np.zeros(0), low, upp, 0
    P = np.maximum(dfdx, 0.0)
    Q = np.maximum(-dfdx, 0.0)
    PQ = 0.001 * (P + Q) + raa0 / xmami
    P = (P + PQ) * ux2
    Q = (Q + PQ) * xl2
    b = space.sum_array(P @ (1.0 / ux1) + Q @ (1.0 / xl1)) - fval
    xmma, y, z, lam, _xsi, _eta, _mu, _zet, _s, nit = subsolv(low, upp, alfa, beta, p0, q0, P, Q, a0, a, b, c, d,
                                                               epsimin=epsimin, space=space)
    return xmma, y, z, lam, low, upp, nit


class MMA(Driver):
    """Svanberg's method of moving asymptotes for bounds and any number of inequality constraints.

    Each constraint ``(functional, upper)`` becomes ``g_i(x) = (value(x) -
    upper) / s_i <= 0`` with ``s_i = |upper|`` (``max(1, |value(x0)|)`` when
    upper is 0), and the objective is divided by ``|f(x0)|`` (``scale=True``),
    the scaling Svanberg recommends for ``c_i = 1000``.

    Options
    -------
    move
        Move limit as a fraction of ``hi - lo`` (0.5).
    asyinit, asyincr, asydecr
        Asymptote initialisation and growth/shrink factors (0.5, 1.2, 0.7).
    asymin, asymax
        Bounds of the asymptotes' distance from x as fractions of ``hi - lo``
        (0.01, 10). Plain (not globally convergent) MMA can end in a 2-cycle
        of amplitude about ``asymin (hi - lo) / 4`` around a minimiser inside
        the bounds of a strongly curved objective; vertex solutions (as many
        active constraints and bounds as variables) and the 0/1 designs of
        topology optimization converge.
    albefa, raa0
        The subproblem's inner-bound factor (0.1) and regularisation (1e-5).
    a0, c, d
        The artificial variables' weights: ``a0 = 1``, ``a_i = 0``,
        ``c_i = c = 1000``, ``d_i = d = 1``.
    epsimin
        Final barrier parameter of the interior-point subsolver (1e-7).
    scale
        Scale the objective and constraints as above (True).

    The state holds x, f, g, the constraint values and gradients, the two
    previous iterates ``xold1``, ``xold2``, the asymptotes ``low``, ``upp``,
    the iteration number ``k``, the multipliers ``lam`` (of the constraints as
    given), the scale factors and the KKT residual. The history records
    ``max_violation`` (max over i of value - upper, 0 when feasible), ``kkt``,
    ``change`` (max |x_new - x|), ``subsolver_iterations`` (Newton steps of
    the interior-point method) and ``multipliers``.
    """

    name = "mma"
    defaults = {"move": 0.5, "asyinit": 0.5, "asyincr": 1.2, "asydecr": 0.7, "asymin": 0.01, "asymax": 10.0,
                "albefa": 0.1, "raa0": 1e-5,
                "a0": 1.0, "c": 1000.0, "d": 1.0, "epsimin": 1e-7, "scale": True}
    takes_bounds = True
    takes_constraints = True
    needs_constraints = False
    takes_blocks = True

    def __init__(self, problem, inner, options, counts):
        super().__init__(problem, inner, options, counts)
        self.lo, self.hi = _finite_bounds(self, "mma")
        #: the variables MMA moves: a variable with equal bounds stays at them (its asymptotes would coincide), and
        #: so does one whose bounds differ by round-off (its subproblem interval [alfa, beta] would be empty)
        free = (self.hi - self.lo) > 1e-10 * np.maximum(1.0, np.maximum(np.abs(self.lo), np.abs(self.hi)))
        if self.space.size(self.lo) and not self.space.any(free):
            raise ValueError("method 'mma': every variable has equal lower and upper bounds; there is nothing to "
                             "optimize")
        # all free (the usual case): a slice, whose x[free] are views, not copies of every n-vector per iteration
        self.free = slice(None) if np.all(free) else free
        self.cons = [(f, float(u)) for f, u in (problem.constraints or [])]
        self.m = len(self.cons)
        o = self.opts
        for key in ("move", "asyinit", "asyincr", "asydecr", "asymin", "asymax", "albefa", "raa0", "a0", "c", "epsimin"):
            _check_positive(key, o[key])
        if not o["asymin"] <= o["asyinit"] <= o["asymax"]:
            raise ValueError(f"options need asymin <= asyinit <= asymax, got {o['asymin']!r}, {o['asyinit']!r}, {o['asymax']!r}")
        if not 0 < o["albefa"] < 1:
            raise ValueError(f"option albefa must be in (0, 1), got {o['albefa']!r}")
        _check_positive("d", o["d"], strict=False)
        if not 0 < o["asydecr"] < 1 <= o["asyincr"]:
            raise ValueError(f"options need 0 < asydecr < 1 <= asyincr, got {o['asydecr']!r}, {o['asyincr']!r}")
        if not isinstance(o["scale"], (bool, np.bool_)):
            raise ValueError(f"option scale must be True or False, got {o['scale']!r}")
        self.diag = np.asarray(inner.diagonal(), dtype=np.float64)

    # -- evaluations ---------------------------------------------------------------------------
    def _constraints(self, x):
        n = x.size
        val = np.array([f.value(x) - u for f, u in self.cons], dtype=np.float64)
        grad = np.array([np.asarray(f.gradient(x), dtype=np.float64) for f, _ in self.cons]).reshape(self.m, n)
        return val, grad

    def _kkt(self, x, g, fval, dfdx, lam) -> float:
        """sqrt(||x - P(x - M^{-1} grad L)||_M^2 + sum (lam_i g_i)^2 + sum max(g_i, 0)^2): zero exactly at a KKT point."""
        gl = g + np.einsum("i,ij->j", lam, dfdx) if self.m else g
        r = self.inner.riesz(gl)
        pg = x - np.clip(x - r, self.lo, self.hi)
        t = self.inner.norm(pg) ** 2 + float(np.sum((lam * fval) ** 2)) + float(np.sum(np.maximum(fval, 0.0) ** 2))
        return math.sqrt(t)

    def _evaluate(self, x, lam) -> dict:
        """f, g, the constraints' values and gradients and the KKT residual at x (multipliers ``lam``)."""
        f = self.J.value(x)
        g = self.J.gradient(x)
        fval, dfdx = self._constraints(x)
        self._check_finite(dict(g=g, fval=fval, dfdx=dfdx))  # before the KKT measure's Riesz map sees a NaN
        return dict(f=f, g=g, fval=fval, dfdx=dfdx, kkt=self._kkt(x, g, fval, dfdx, lam))

    def start(self, x0):
        x = self.project(np.array(x0, dtype=np.float64))
        lam = np.zeros(self.m)
        ev = self._evaluate(x, lam)
        f, fval = ev["f"], ev["fval"]
        if self.opts["scale"]:
            fscale = 1.0 / abs(f) if abs(f) > 0 else 1.0
            cscale = np.array([1.0 / abs(u) if u != 0 else 1.0 / max(1.0, abs(v + u)) for (_, u), v in zip(self.cons, fval)])
        else:
            fscale, cscale = 1.0, np.ones(self.m)
        return dict(x=x, **ev, xold1=x.copy(), xold2=x.copy(), low=x - 1.0, upp=x + 1.0, k=0, lam=lam,
                    fscale=float(fscale), cscale=cscale)

    def refresh(self, state):
        """The objective and constraints changed at the same x (a continuation step): their values and gradients
        again; the asymptotes, the previous iterates and the scaling stay (MMA builds its next approximation from
        the new gradients, as after any step)."""
        state.update(self._evaluate(state["x"], np.asarray(state["lam"], dtype=np.float64).reshape(self.m)))

    def stationarity(self, state):
        """KKT residual of the original problem with the last subproblem's multipliers (0 for them at the start):
        ``sqrt(||x - P(x - M^{-1} grad L)||_M^2 + sum_i (lam_i g_i)^2 + sum_i max(g_i, 0)^2)``,
        grad L = grad f + sum lam_i grad g_i, g_i = value_i - upper_i."""
        return float(state["kkt"])

    def _check_finite(self, state) -> None:
        """A clear error for NaN or Inf in what the subproblem is built from (it would fail deep inside)."""
        bad = [("the objective's gradient", state["g"])]
        bad += [(f"constraint {i}'s value", state["fval"][i:i + 1]) for i in range(self.m)]
        bad += [(f"constraint {i}'s gradient", state["dfdx"][i]) for i in range(self.m)]
        for what, v in bad:
            v = np.asarray(v, dtype=np.float64)
            if not self.space.all(np.isfinite(v)):  # on every rank, when one has it (a block of the gradient)
                local = np.flatnonzero(~np.isfinite(v))
                where = (f"{v[local[0]]} at the current design (entry {int(local[0])}"
                         f"{' of this rank' if self.space.distributed else ''})" if local.size else
                         "not finite at the current design (on another rank)")
                raise OptimizationError(f"MMA: {what} is {where}; check the functional there (a NaN in data, a map "
                                        "or a solve)")

    def iterate(self, state):
        o = self.opts
        self._check_finite(state)
        x = state["x"]
        k = int(state["k"]) + 1
        sf = float(state["fscale"])
        sc = np.asarray(state["cscale"], dtype=np.float64).reshape(self.m)
        fval = np.asarray(state["fval"], dtype=np.float64).reshape(self.m)
        dfdx = np.asarray(state["dfdx"], dtype=np.float64).reshape(self.m, x.size)
        f = self.free  # fixed variables (equal bounds) are left out of the subproblem: they stay where they are
        low, upp = np.array(state["low"], dtype=np.float64), np.array(state["upp"], dtype=np.float64)
        with one_blas_thread():  # many small (m, n) products: BLAS threads spin more than they work
            xsub, y, _z, lam_s, low[f], upp[f], nsub = mma_subproblem(
                k, x[f], self.lo[f], self.hi[f], state["xold1"][f], state["xold2"][f], sf * state["g"][f], sc * fval,
                sc[:, None] * dfdx[:, f], low[f], upp[f], move=o["move"], asyinit=o["asyinit"],
                asyincr=o["asyincr"], asydecr=o["asydecr"], asymin=o["asymin"], asymax=o["asymax"],
                albefa=o["albefa"], raa0=o["raa0"], a0=float(o["a0"]), a=np.zeros(self.m),
                c=np.full(self.m, float(o["c"])), d=np.full(self.m, float(o["d"])), epsimin=o["epsimin"],
                space=self.space)
        if not self.space.all(np.isfinite(xsub)):
            raise OptimizationError("MMA: the subproblem solver returned a non-finite point")
        xmma = np.array(x, dtype=np.float64, copy=True)
        xmma[f] = xsub
        xmma = np.clip(xmma, self.lo, self.hi)
        lam = lam_s * sc / sf  # multipliers of value_i - upper_i <= 0 for f itself
        xmma, f, g = _evaluate_or_back_off(self.J, x, xmma, "mma", self.space)
        change = self.space.max(np.abs(xmma - x), initial=0.0)
        fval_new, dfdx_new = self._constraints(xmma)
        self._check_finite(dict(g=g, fval=fval_new, dfdx=dfdx_new))
        kkt = self._kkt(xmma, g, fval_new, dfdx_new, lam)
        state.update(xold2=np.array(state["xold1"], copy=True), xold1=np.array(x, copy=True), x=xmma, f=f, g=g,
                     fval=fval_new, dfdx=dfdx_new, low=low, upp=upp, k=k, lam=lam, kkt=kkt)
        viol = float(np.max(fval_new, initial=0.0))
        if self.m and float(np.max(y, initial=0.0)) > 0 and viol > 0:
            logger.debug("mma: artificial variables y = %s (constraints violated in the subproblem)", y)
        if not math.isfinite(f):
            raise Stop(f"MMA: the objective is not finite at iteration {k}")
        return dict(max_violation=viol, kkt=kkt, change=change, subsolver_iterations=int(nsub),
                    multipliers=[float(v) for v in lam])
