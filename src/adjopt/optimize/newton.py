"""Inexact Newton-CG on matrix-free Hessian actions: line search and trust region.

Each Newton step solves H d = -g approximately by conjugate gradients on
``J.hessp``, preconditioned by the Riesz map of the inner product (M^{-1}) or
by a user-given SPD operator (e.g. the regularization's), and stops CG at the
Eisenstat-Walker forcing tolerance

    ||H d + g||_{P^{-1}} <= eta_k ||g||_{P^{-1}},  eta_k = min(eta_max, sqrt(||g_k|| / ||g_0||)),

so early steps are cheap and the last ones converge superlinearly. The
Hessian actions get a solver tolerance tied to eta_k (iterative solvers).

- ``NewtonCG`` ("newton-cg"): Armijo backtracking on the Newton direction.
  Negative curvature found by CG ends CG: at the first CG iteration the
  preconditioned steepest-descent direction is used, later the iterate so
  far. Bounds by the projected variant: variables at an active bound are
  held fixed in CG (with a diagonal preconditioner) and the line search
  projects.
- ``NewtonTR`` ("newton-tr"): Steihaug-Toint truncated CG in the trust
  region ||d||_P <= Delta; the ratio of actual to predicted decrease updates
  Delta. No bounds.

``gauss_newton_iters=k`` uses the Gauss-Newton Hessian (no adjoint terms;
positive semidefinite for least squares) in the first k Newton steps.

``preconditioner="lowrank"`` (inverse problems with a Gaussian prior R in the
objective, :mod:`adjopt.uq`): P = R + R V Lambda V^T R with the ``lowrank_rank``
dominant pairs of the Gauss-Newton misfit Hessian at the start, H V = R V Lambda,
from one randomized double pass (blocked Hessian actions); P^{-1} = R^{-1} -
V D V^T. CG then sees the eigenvalues 1 + lambda_i of the pairs not kept
only, so its counts no longer grow with the information in the data.
``lowrank_refresh=k`` rebuilds it at the current point every k Newton steps.
With it the first 5 Newton steps use the Gauss-Newton Hessian unless
``gauss_newton_iters`` says otherwise (the full Hessian far from the minimum is
indefinite in the directions the preconditioner weighs most: poisson_inversion
at 64^2 took 45 Newton steps without, 11 with).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Driver, Stop
from .inner import Diagonal, InnerProduct, Matrix
from .lbfgs import _active
from .linesearch import ROUNDOFF, backtrack, safe_value


class _NewtonBase(Driver):
    defaults = dict(eta_max=0.5, cg_maxiter=200, gauss_newton_iters=None, preconditioner=None, c1=1e-4,
                    max_backtracks=30, lowrank_rank=40, lowrank_oversampling=10, lowrank_refresh=0, seed=0)

    def __init__(self, problem, inner, options, counts):
        super().__init__(problem, inner, options, counts)
        P = self.opts["preconditioner"]
        self._lowrank = isinstance(P, str) and P.lower() == "lowrank"
        if self._lowrank and self.space.distributed:
            raise ValueError("preconditioner='lowrank' works on the whole parameter vector; with the parameters in "
                             "blocks over the ranks use 'h1'")
        gn = self.opts["gauss_newton_iters"]
        if gn is None:  # the low-rank preconditioner comes from the Gauss-Newton Hessian: so do the first steps
            gn = 5 if self._lowrank else 0
        if isinstance(gn, bool) or not isinstance(gn, (int, np.integer)) or gn < 0:
            raise ValueError(f"gauss_newton_iters must be an integer >= 0, got {gn!r}")
        self.opts["gauss_newton_iters"] = int(gn)
        for name in ("lowrank_rank", "lowrank_oversampling", "lowrank_refresh"):
            v = self.opts[name]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if name == "lowrank_rank" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'lowrank_rank' else 0}, got {v!r}")
        seed = self.opts["seed"]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (of the low-rank preconditioner's sketch), got {seed!r}")
        if self._lowrank:
            from ..uq import GaussianPrior

            if problem.bounds is not None:
                raise ValueError("preconditioner='lowrank' works without bounds only: the projected Newton-CG "
                                 "preconditions the free variables with a diagonal, which the low-rank operator "
                                 "does not have; drop the bounds or use preconditioner=None / 'h1'")
            # the prior is found now (a clear error before any solve); the pairs at the start point
            self._prior = GaussianPrior.of(problem.functional, inner.n)
            self.P = None
        elif P is None:
            self.P = inner
        elif isinstance(P, str):
            from .inner import make_inner_product

            self.P = make_inner_product(P, problem)
        elif isinstance(P, InnerProduct):
            self.P = P
        elif hasattr(P, "shape") and P.shape == (inner.n, inner.n):
            self.P = Matrix(P, name="preconditioner")
        else:
            raise ValueError("preconditioner must be None (the inner product's Riesz map), the name of an inner product "
                             f"('h1' suits H1-regularized problems), an InnerProduct, or an SPD ({inner.n}, {inner.n}) matrix")
        if self.P is not None and self.P.space.distributed != self.space.distributed:
            raise ValueError("the preconditioner works on the whole parameter vector but the parameters are in blocks "
                             "over the ranks: give it by name ('h1', 'l2'), which the distributed functional makes")
        if not 0 < self.opts["eta_max"] < 1:
            raise ValueError(f"eta_max must be in (0, 1), got {self.opts['eta_max']}")

    def start(self, x0):
        x, f, g = self.first_point(x0)
        if self._lowrank:
            self._build_lowrank(x)
        return dict(x=x, f=f, g=g, gnorm0=max(self.P.dual_norm(g), np.finfo(float).tiny), k=0)

    def _build_lowrank(self, x) -> None:
        """P = R + R V Lambda V^T R from the Gauss-Newton misfit Hessian at x (one randomized double pass)."""
        from ..uq import LowRankPreconditioner, misfit_hessian, randomized_eigh

        prior, n = self._prior, self.inner.n
        rank = min(self.opts["lowrank_rank"], n)
        eig = randomized_eigh(misfit_hessian(self.J, x, prior, gauss_newton=True), n, rank, R=prior.precision,
                              Rinv=prior.covariance, oversampling=self.opts["lowrank_oversampling"],
                              rng=self.opts["seed"], residuals=False)
        # Gauss-Newton is positive semidefinite: a negative eigenvalue is round-off
        self.P = LowRankPreconditioner(prior, np.maximum(eig.values, 0.0), eig.vectors)

    def refresh(self, state) -> None:
        """Rebuild the low-rank preconditioner every ``lowrank_refresh`` Newton steps."""
        k = self.opts["lowrank_refresh"]
        if self._lowrank and (self.P is None or (k and state["k"] > 0 and state["k"] % k == 0)):
            self._build_lowrank(state["x"])  # None: a resumed run, whose start() did not run

    def forcing(self, state, gnorm) -> float:
        return min(self.opts["eta_max"], math.sqrt(gnorm / state["gnorm0"]))

    def hess(self, state, eta):
        """v -> H v at x (Gauss-Newton in the first ``gauss_newton_iters`` steps); solves to ~eta/10."""
        x = state["x"]
        gn = state["k"] < self.opts["gauss_newton_iters"]
        tol = min(1e-2, max(1e-12, 0.1 * eta))
        return (lambda v: self.J.hessp(x, v, tol=tol, gauss_newton=True)) if gn else (lambda v: self.J.hessp(x, v, tol=tol))


class NewtonCG(_NewtonBase):
    """Inexact Newton-CG with Armijo backtracking (projected when there are bounds)."""

    name = "newton-cg"
    takes_bounds = True
    takes_blocks = True

    def iterate(self, state):
        self.refresh(state)
        x, f, g = state["x"], state["f"], state["g"]
        free = None
        P = self.P
        if self.bounds is not None:
            free = ~_active(x, g, self.bounds)
            P = Diagonal(P.diagonal(), P.space)  # a diagonal preconditioner restricts to the free variables exactly
        gf = g if free is None else np.where(free, g, 0.0)
        gnorm = P.dual_norm(gf)
        eta = self.forcing(state, gnorm)
        H = self.hess(state, eta)
        Hf = H if free is None else (lambda v: np.where(free, H(np.where(free, v, 0.0)), 0.0))
        d, cg_its, neg = _pcg(Hf, gf, P, eta * gnorm, self.opts["cg_maxiter"])
        if not self.space.dot(g, d) < 0:
            d = -P.riesz(gf)
        t, x_new, f_new, trials = backtrack(self.J, x, f, g, d, self.project, 1.0, self.opts["c1"],
                                            self.opts["max_backtracks"], space=self.space)
        state.update(x=x_new, f=f_new, g=self.J.gradient(x_new), k=state["k"] + 1)
        return dict(cg_iterations=cg_its, eta=eta, t=t, negative_curvature=neg, gauss_newton=state["k"] <= self.opts["gauss_newton_iters"])


class NewtonTR(_NewtonBase):
    """Inexact Newton with a Steihaug-Toint trust region in the preconditioner's norm."""

    name = "newton-tr"
    defaults = dict(_NewtonBase.defaults, radius0=None, max_radius=None, accept=1e-4)

    def start(self, x0):
        state = super().start(x0)
        r0 = self.opts["radius0"]
        state["radius"] = math.inf if r0 is None else float(r0)  # inf: the first step is a full Newton step
        return state

    def iterate(self, state):
        self.refresh(state)
        x, f, g = state["x"], state["f"], state["g"]
        gnorm = self.P.dual_norm(g)
        eta = self.forcing(state, gnorm)
        H = self.hess(state, eta)
        for _ in range(60):
            d, Hd, cg_its, hit = _steihaug(H, g, self.P, eta * gnorm, state["radius"], self.opts["cg_maxiter"])
            pred = -(self.space.dot(g, d) + 0.5 * self.space.dot(d, Hd))
            if 0 <= pred <= ROUNDOFF * max(abs(f), np.finfo(float).tiny):
                raise Stop(f"stopped at round-off short of the gradient tolerance: the predicted decrease {pred:.3g} "
                           f"is below the precision of f = {f:.6g} (loosen gtol, or scale the objective)", success=False)
            dnorm = self.P.norm(d)
            if math.isinf(state["radius"]):
                state["radius"] = dnorm
            x_new = x + d
            f_new = safe_value(self.J, x_new)
            ratio = (f - f_new) / pred if (pred > 0 and not math.isnan(f_new)) else -math.inf
            if ratio < 0.25:
                state["radius"] = 0.25 * min(state["radius"], dnorm)
            elif ratio > 0.75 and hit:
                state["radius"] = 2.0 * state["radius"]
                if self.opts["max_radius"] is not None:
                    state["radius"] = min(state["radius"], self.opts["max_radius"])
            if ratio > self.opts["accept"]:
                state.update(x=x_new, f=f_new, g=self.J.gradient(x_new), k=state["k"] + 1)
                return dict(cg_iterations=cg_its, eta=eta, radius=state["radius"], ratio=ratio, boundary=hit)
            if not state["radius"] > 1e-14 * max(1.0, self.P.norm(x)):
                break
        raise Stop("the trust region collapsed: no step decreased the objective; the last good x is kept")


def _pcg(H, g, P, tol, maxiter):
    """Preconditioned CG for H d = -g; (d, iterations, negative curvature met)."""
    dot = P.space.dot
    d = np.zeros_like(g)
    r = -g.copy()
    z = P.riesz(r)
    p = z.copy()
    rz = dot(r, z)
    for it in range(1, maxiter + 1):
        Hp = H(p)
        curv = dot(p, Hp)
        if curv <= 0:
            return (z if it == 1 else d), it, True
        alpha = rz / curv
        d += alpha * p
        r -= alpha * Hp
        z = P.riesz(r)
        rz_new = dot(r, z)
        if math.sqrt(max(rz_new, 0.0)) <= tol:
            return d, it, False
        p = z + (rz_new / rz) * p
        rz = rz_new
    return d, maxiter, False


def _to_boundary(P, d, p, radius):
    """tau >= 0 with ||d + tau p||_P = radius."""
    a = P.inner(p, p)
    b = 2.0 * P.inner(d, p)
    c = P.inner(d, d) - radius**2
    return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)


def _steihaug(H, g, P, tol, radius, maxiter):
    """Steihaug-Toint CG: (d, H d, iterations, on the boundary)."""
    dot = P.space.dot
    d = np.zeros_like(g)
    Hd = np.zeros_like(g)
    r = -g.copy()
    z = P.riesz(r)
    p = z.copy()
    rz = dot(r, z)
    for it in range(1, maxiter + 1):
        Hp = H(p)
        curv = dot(p, Hp)
        if curv <= 0:
            if math.isinf(radius):  # no region yet: take the preconditioned steepest descent (or the iterate)
                return (z, H(z), it, False) if it == 1 else (d, Hd, it, False)
            tau = _to_boundary(P, d, p, radius)
            return d + tau * p, Hd + tau * Hp, it, True
        alpha = rz / curv
        if P.norm(d + alpha * p) >= radius:
            tau = _to_boundary(P, d, p, radius)
            return d + tau * p, Hd + tau * Hp, it, True
        d += alpha * p
        Hd += alpha * Hp
        r -= alpha * Hp
        z = P.riesz(r)
        rz_new = dot(r, z)
        if math.sqrt(max(rz_new, 0.0)) <= tol:
            return d, Hd, it, False
        p = z + (rz_new / rz) * p
        rz = rz_new
    return d, Hd, maxiter, False
