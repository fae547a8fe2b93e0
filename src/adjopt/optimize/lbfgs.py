"""L-BFGS in a chosen inner product, with optional bounds; and scipy's L-BFGS-B, mass-scaled.

``LBFGS`` ("lbfgs"): the two-loop recursion with the initial inverse Hessian
gamma M^{-1} (M the Gram matrix of the inner product), so the first step is
the function-space steepest descent and the iteration counts do not grow with
the mesh. Bounds by projection: variables at a bound whose gradient pushes
outwards are held fixed, the quasi-Newton direction moves the others, and a
projected Armijo backtracking picks the step. Its whole state (x, f, g and
the pairs s, y) lives in the checkpoint, so a resumed run is exact.

``ScipyLBFGSB`` ("lbfgsb"): scipy's L-BFGS-B (Byrd, Lu, Nocedal, Zhu) on the
scaled variables z = sqrt(w) * p, w the lumped mass (``inner.diagonal()``),
so that its Euclidean inner product is the lumped L2 one. Use it for bound
constraints when a mature active-set method matters more than exact
resumption: scipy keeps its memory internally, so a resume restarts it from
the checkpointed x with an empty memory (the run still converges, but not
through the same iterates).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Driver, Stop
from .linesearch import backtrack, safe_gradient, safe_value


def _active(x, g, bounds, eps: float = 0.0) -> np.ndarray:
    """Variables at a bound with the gradient pushing outwards."""
    lo, hi = bounds
    return ((x <= lo + eps) & (g > 0)) | ((x >= hi - eps) & (g < 0))


class LBFGS(Driver):
    """Limited-memory BFGS in the inner product of the problem (see the module docstring)."""

    name = "lbfgs"
    defaults = dict(memory=10, c1=1e-4, max_backtracks=30)
    takes_bounds = True
    takes_blocks = True

    def start(self, x0):
        x, f, g = self.first_point(x0)
        return dict(x=x, f=f, g=g, S=np.zeros((0, x.size)), Y=np.zeros((0, x.size)))

    def direction(self, state) -> np.ndarray:
        """-H g by the two-loop recursion with H0 = gamma M^{-1}; fixed variables held at zero."""
        g, S, Y = state["g"], state["S"], state["Y"]
        dot = self.space.dot
        fixed = _active(state["x"], g, self.bounds) if self.bounds is not None else None
        q = g.copy()
        if fixed is not None:
            q[fixed] = 0.0
        k = S.shape[0]
        rho = 1.0 / self.space.rows(S, Y) if k else np.zeros(0)
        alpha = np.zeros(k)
        for i in range(k - 1, -1, -1):
            alpha[i] = rho[i] * dot(S[i], q)
            q -= alpha[i] * Y[i]
        r = self.inner.riesz(q)
        if k:
            yl = Y[-1]
            gamma = dot(S[-1], yl) / dot(yl, self.inner.riesz(yl))
        else:
            gamma = 1.0 / max(self.inner.dual_norm(q), np.finfo(float).tiny)  # a first step of unit length in M
        r *= gamma
        for i in range(k):
            beta = rho[i] * dot(Y[i], r)
            r += (alpha[i] - beta) * S[i]
        d = -r
        if fixed is not None:
            d[fixed] = 0.0
        return d

    def iterate(self, state):
        x, f, g = state["x"], state["f"], state["g"]
        dot = self.space.dot
        d = self.direction(state)
        restarted = False
        if not dot(g, d) < 0:  # not a descent direction (bounds cut it): restart from steepest descent
            state["S"], state["Y"] = state["S"][:0], state["Y"][:0]
            d = self.direction(state)
            restarted = True
            if not dot(g, d) < 0:
                raise Stop("no descent direction: the projected gradient vanishes", success=True)
        t, x_new, f_new, trials = backtrack(self.J, x, f, g, d, self.project, 1.0, self.opts["c1"],
                                            self.opts["max_backtracks"], space=self.space)
        g_new = self.J.gradient(x_new)
        s, y = x_new - x, g_new - g
        sy = dot(s, y)
        updated = sy > 1e-12 * math.sqrt(dot(s, self.inner.apply(s)) * dot(y, self.inner.riesz(y)))
        if updated:
            mem = self.opts["memory"]
            state["S"] = np.vstack([state["S"], s])[-mem:]
            state["Y"] = np.vstack([state["Y"], y])[-mem:]
        state.update(x=x_new, f=f_new, g=g_new)
        return dict(t=t, backtracks=trials - 1, updated=updated, restarted=restarted)


class ScipyLBFGSB(Driver):
    """scipy's L-BFGS-B on lumped-mass-scaled variables; every scipy iteration goes through the shared loop."""

    name = "lbfgsb"
    defaults = dict(memory=10, maxls=20)
    takes_bounds = True
    external_loop = True

    def start(self, x0):
        x, f, g = self.first_point(x0)
        return dict(x=x, f=f, g=g)

    def solve(self, state, maxiter: int, report) -> None:
        from scipy.optimize import minimize

        sw = np.sqrt(self.inner.diagonal())
        seen = {}

        def fun(z):
            x = z / sw
            f = safe_value(self.J, x)  # NaN where the evaluation failed (a singular A, Newton, a solver)
            g = safe_gradient(self.J, x) if math.isfinite(f) else None
            if g is None:
                return math.inf, np.zeros_like(z)  # L-BFGS-B's line search backs off from an infinite value
            seen.clear()
            seen[z.tobytes()] = (x, f, g)
            return f, g / sw

        def callback(intermediate_result):
            z = intermediate_result.x
            if z.tobytes() not in seen:
                fun(z)
            x_old, f_old = state["x"].copy(), float(state["f"])
            x, f, g = seen[z.tobytes()]
            state.update(x=x.copy(), f=f, g=g.copy())
            if report(x_old, f_old):
                raise StopIteration

        bounds = None
        if self.bounds is not None:
            lo, hi = self.bounds
            bounds = list(zip(lo * sw, hi * sw))
        res = minimize(fun, state["x"] * sw, jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                       options=dict(maxiter=max(maxiter, 1), maxcor=self.opts["memory"], maxls=self.opts["maxls"],
                                    gtol=0.0, ftol=0.0))
        # scipy's own tests (with gtol = ftol = 0 only "no decrease at all": round-off) or its line search failed:
        # either way short of adjopt's gtol, which the shared loop would have reported as success
        raise Stop(f"L-BFGS-B stopped short of the gradient tolerance: {res.message}", success=False)
