"""Nonlinear time-dependent problems: M(p) du/dt + R(u, p) = b(t, p), Newton's method at every step.

The steps of :mod:`adjopt.transient.schemes`, with the residual R in place of A u:

    F_n = sum_j alpha_nj M u_{n-j} + gamma_nj (R(u_{n-j}, p) - b_{n-j}) = 0,      n = 1..N,  u_0 = u0(p).

Step n is solved by Newton's method on F_n(u_n) = 0 from u_{n-1}, with the step Jacobian
S_n = alpha_n0 M + gamma_n0 K(u_n), K = dR/du. Collecting, for every level l, the multipliers of the steps
that read it,

    WM_l = sum_j alpha_{l+j,j} lam_{l+j},       WK_l = sum_j gamma_{l+j,j} lam_{l+j}      (l + j <= N),

the Lagrangian is sum_l f_l(u_l, p) - sum_l [WM_l^T M u_l + WK_l^T (R(u_l, p) - b_l(p))] + mu^T (u0(p) - u_0),
and the discrete adjoint of exactly the scheme that ran forward is, for l = N..1 (wM_l, wK_l: the sums over
j >= 1, known when level l is reached):

    S_l^T lam_l = f_u(l) - M^T wM_l - K(u_l)^T wK_l                 (then WM_l = alpha_l0 lam_l + wM_l, ...)
    mu          = f_u(0) - M^T wM_0 - K(u_0)^T wK_0
    grad J      = f_p + u0'^T mu - sum_l [C_M(WM_l, u_l) + (dR/dp)(u_l)^T WK_l - (db_l/dp)^T WK_l]

with C_M(w, z)_k = w^T (dM/dp_k) z. A Hessian action in the direction dp marches the tangent forwards,

    S_n du_n = - sum_{j>=1} [alpha_nj M + gamma_nj K(u_{n-j})] du_{n-j}
               - sum_j [alpha_nj dM u_{n-j} + gamma_nj ((dR/dp)(u_{n-j}) dp - db_{n-j})],       du_0 = u0' dp

and the second-order adjoint backwards (dWM_l, dWK_l: the same sums of the dlam; (hu_l, hp_l) = the residual's
``second(u_l, p, WK_l, du_l, dp)``, the action of WK_l^T d2R in the direction (du_l, dp)):

    S_l^T dlam_l = f_uu du_l + f_up dp - dM^T WM_l - M^T dwM_l - K(u_l)^T dwK_l - hu_l
    dmu          = the same at level 0 (no solve)
    H dp = f_pp dp + f_pu du + u0'^T dmu + u0''[mu, dp]
           - sum_l [C_M(dWM_l, u_l) + C_M(WM_l, du_l) + C2_M(WM_l, u_l, dp) + (dR/dp)(u_l)^T dWK_l + hp_l
                    - (db_l/dp)^T dWK_l - (d2b_l/dp2 . dp)^T WK_l]

For R = A(p) u these are the linear functional's formulas regrouped by level. The step Jacobian changes with
the state, so every march factorizes it once per step (Newton: once per iteration); the adjoint and the
second adjoint of a level share that level's factorization. The time loop, the checkpoint schedules, the
objectives and the sources are the linear functional's: only the step solve and the adjoint step differ.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.sparse as sp

from .._validate import check_finite
from ..errors import NewtonDidNotConverge, NonFiniteError, SingularMatrixError, SolverDidNotConverge
from ..functional_nonlinear import NewtonOptions, _norm, _slow_newton, _slow_newton_message, refuse_symmetric_solver
from .functional import TransientReducedFunctional, _Batch

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)


class _Levels:
    """R(u_l, p), K(u_l, p) and (dR/dp)(u_l) dp of the latest few levels, each valid for the very array u_l it
    was computed from (a recomputed level is a new array, so nothing stale is ever returned)."""

    def __init__(self, size: int):
        self.size = size
        self.entries: dict = {}

    def get(self, level: int, u: np.ndarray) -> dict:
        entry = self.entries.get(level)
        if entry is None or entry["u"] is not u:
            entry = {"u": u}
            self.entries.pop(level, None)
            self.entries[level] = entry
            while len(self.entries) > self.size:
                self.entries.pop(next(iter(self.entries)))
        return entry


class NonlinearTransientReducedFunctional(TransientReducedFunctional):
    """J(p) for M(p) du/dt + R(u, p) = b(t, p), u(t_0) = u0(p), with a :class:`~adjopt.operators.ParametricResidual`
    R (:func:`adjopt.fem.diffusion_reaction_residual`, :class:`~adjopt.operators.CallbackResidual`, ...): Newton's
    method at every step, and the gradient and Hessian actions of the discrete scheme (the formulas are in this
    module's docstring).

    ``TransientReducedFunctional(residual, mass, objective, time, ...)`` returns one; the arguments are those of
    :class:`~adjopt.transient.TransientReducedFunctional` with the residual in place of the stiffness, plus

    newton
        Options of every step's Newton solve (:class:`~adjopt.NewtonOptions` or a dict of them): step n has
        converged when ||F_n|| <= max(atol, rtol ||F_n(u_{n-1})||), or when ||F_n|| is at the round-off of its
        terms; ``line_search`` halves a step that does not decrease ||F_n||. Every step starts from the state
        of the level before (``warm_start`` has no effect here).

    Costs: a forward step assembles and factorizes the step Jacobian once per Newton iteration; a gradient
    factorizes it once per step of the adjoint march, a Hessian action twice per step (tangent and second
    adjoint). ``J.stats.newton_iterations`` counts the Newton iterations of every step solved.
    """

    _nonlinear = True

    def __init__(self, residual=None, mass=None, objective=None, time=None, rhs=None, u0=None, solver="auto",
                 newton=None, stiffness=None, **kwargs):
        if stiffness is not None:  # TransientReducedFunctional(stiffness=R, ...) names it so
            if residual is not None:
                raise TypeError("give the residual once: residual= or stiffness=, not both")
            residual = stiffness
        if residual is None or time is None:
            raise TypeError("NonlinearTransientReducedFunctional needs the residual, the mass (None: identity), "
                            "the objective and time=TimeStepping(...)")
        self.newton = NewtonOptions.make(newton)
        self._warned_slow = False
        super().__init__(residual, mass, objective, time, rhs=rhs, u0=u0, solver=solver, **kwargs)
        # the union of the patterns of M and K, and where each one's entries go in it: S = a M + g K by two
        # scatters of their data, never a sparse addition per Newton step
        self._union = self._union_M = None  # built at the first step matrix (a callback residual's pattern
        # comes from its first Jacobian)

    def _set_union(self, M) -> None:
        n = self.n
        K = sp.csr_array((np.ones(self.R.nnz), self.R.indices, self.R.indptr), shape=(n, n))
        U = sp.csr_array((np.ones(M.nnz), M.indices, M.indptr), shape=(n, n)) + K
        U.sort_indices()
        keys = np.repeat(np.arange(n, dtype=np.int64), np.diff(U.indptr)) * n + U.indices

        def slots(X):
            rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(X.indptr))
            return np.searchsorted(keys, rows * n + X.indices)

        self._union = (U.indptr, U.indices, slots(M), slots(K), M.indptr, M.indices)

    @property
    def residual(self):
        """The residual R(u, p)."""
        return self.R

    def _accept(self, solver):
        # the step matrix a0 M + g0 K is symmetric only when K is (M is a mass matrix)
        return refuse_symmetric_solver(solver, self.R)

    def _level_cache(self, ctx) -> _Levels:
        if ctx.levels is None:
            ctx.levels = _Levels(self.time.history + 2)
        return ctx.levels

    # -- the pieces of a level ----------------------------------------------------------------------------
    def _R(self, ctx, level, u):
        e = self._level_cache(ctx).get(level, u)
        if "R" not in e:
            t0 = time.perf_counter()
            e["R"] = self.R.residual(u, ctx.p)
            self.times["assembly"] += time.perf_counter() - t0
        return e["R"]

    def _K(self, ctx, level, u):
        e = self._level_cache(ctx).get(level, u)
        if "K" not in e:
            t0 = time.perf_counter()
            e["K"] = self.R.jacobian(u, ctx.p)
            self.times["assembly"] += time.perf_counter() - t0
        return e["K"]

    def _Rp(self, ctx, level, u, dp):
        """(dR/dp)(u_level) dp, for the direction object ``dp`` of the running Hessian action."""
        e = self._level_cache(ctx).get(level, u)
        if e.get("dp") is not dp:
            e["dp"], e["Rp"] = dp, self.R.jvp(u, ctx.p, dp)
        return e["Rp"]

    def _step_matrix(self, ctx, a0, g0, K):
        """S = a0 M + g0 K, in the union pattern of M and K."""
        if self._union is None or self._union_M is not ctx.M:
            ctx.M.sort_indices()
            Mptr, Mind = (self._union[4], self._union[5]) if self._union is not None else (None, None)
            if Mptr is None or not (np.array_equal(ctx.M.indptr, Mptr) and np.array_equal(ctx.M.indices, Mind)):
                self._set_union(ctx.M)  # first use, or M(p) handed out another pattern
            self._union_M = ctx.M
        Uptr, Uind, sM, sK = self._union[:4]
        data = np.zeros(Uind.size)
        data[sM] = a0 * ctx.M.data
        data[sK] += g0 * K.data
        return sp.csr_array((data, Uind, Uptr), shape=(self.n, self.n))

    def _factor(self, ctx, level, u, a0, g0, K=None):
        """The factorization of S = a0 M + g0 K(u_level) (or of a0 M + g0 K for a Newton iterate's K): fresh
        for every level; a0 M alone (g0 = 0) once."""
        if g0 == 0.0:
            key = (float(a0), 0.0)
            if key not in ctx.facs:
                ctx.facs[key] = self._factorize(sp.csr_array(a0 * ctx.M), a0, 0.0)
            return ctx.facs[key], False
        S = self._step_matrix(ctx, a0, g0, self._K(ctx, level, u) if K is None else K)
        t0 = time.perf_counter()
        try:
            fac = self.solver.factorize(S)
        except SingularMatrixError as exc:
            raise type(exc)(f"the step Jacobian S = {a0:.6g} M + {g0:.6g} K(u) at level {level} (t = "
                            f"{float(self.time.times[level]):.6g}) cannot be factorized: {exc}") from exc
        self.times["factorize"] += time.perf_counter() - t0
        return fac, True

    def _release(self, fac, fresh):
        if fresh:
            self.solver.recycle(fac)

    # -- the forward step: Newton ---------------------------------------------------------------------------
    def _advance(self, ctx, k, prev, bcache):
        a, g = self.time.coefficients(k)
        M = ctx.M
        rest = np.zeros(self.n)  # the terms of F_k that do not hold u_k
        size = 0.0
        for j in range(len(a)):
            if g[j] != 0.0:
                b = self._b(ctx, bcache, k - j)
                if b is not None:
                    rest -= g[j] * b
            if j >= 1:
                u_j = prev(k - j)
                if a[j] != 0.0:
                    rest += a[j] * (M @ u_j)
                if g[j] != 0.0:
                    rest += g[j] * self._R(ctx, k - j, u_j)
        check_finite(rest, f"the known terms of step {k}")
        size = _norm(rest)
        opts = self.newton
        u = np.array(prev(k - 1), dtype=np.float64, copy=True)

        def F(v):
            Rv = self.R.residual(v, ctx.p) if g[0] != 0.0 else None
            out = a[0] * (M @ v) + rest
            if Rv is not None:
                out += g[0] * Rv
            return out, Rv

        t0 = time.perf_counter()
        try:
            r, Rv = F(u)
        except NonFiniteError as exc:
            raise self._blew_up(k, "R(u, p) is not finite at the previous level's state") from exc
        self.times["assembly"] += time.perf_counter() - t0
        nr = _norm(r)
        terms = size + _norm(a[0] * (M @ u)) + (abs(g[0]) * _norm(Rv) if Rv is not None else 0.0)
        tol = max(opts.atol, opts.rtol * nr, 64 * _EPS * terms)
        history, full_steps, it = [nr], [], 0
        while not nr <= tol:
            if not math.isfinite(nr):
                raise self._blew_up(k, "the step's residual overflowed")
            if it >= opts.max_iter:
                raise NewtonDidNotConverge(
                    f"Newton did not converge at step {k} of {self.time.n_steps} (t = {float(self.time.times[k]):.6g}) "
                    f"in {opts.max_iter} iterations: ||F|| = {nr:.3g} against {tol:.3g} (history "
                    f"{[float(f'{v:.3g}') for v in history[-6:]]}). Take smaller time steps, raise newton max_iter "
                    f"or check the Jacobian (adjopt.verify.check_residual)", history)
            K = None
            if g[0] != 0.0:
                t0 = time.perf_counter()
                K = self.R.jacobian(u, ctx.p)
                self.times["assembly"] += time.perf_counter() - t0
            try:
                fac, fresh = self._factor(ctx, k, u, a[0], g[0], K)
            except SingularMatrixError as exc:
                raise NewtonDidNotConverge(f"Newton iteration {it} of step {k}: {exc}", history) from exc
            try:
                t0 = time.perf_counter()
                step = fac.solve(-r, kind="forward")
                self.times["solve"] += time.perf_counter() - t0
            except (SingularMatrixError, SolverDidNotConverge, NonFiniteError) as exc:
                raise NewtonDidNotConverge(f"Newton iteration {it} of step {k} (t = {float(self.time.times[k]):.6g}) "
                                           f"failed: {exc}", history) from exc
            finally:
                self._release(fac, fresh)
            t0 = time.perf_counter()
            step_len, halvings = 1.0, 0
            while True:
                trial = u + step_len * step
                try:
                    r_t, R_t = F(trial)
                    n_t = _norm(r_t)
                except NonFiniteError:
                    n_t, r_t, R_t = math.inf, None, None
                if (not opts.line_search and math.isfinite(n_t)) or n_t <= (1.0 - 1e-4 * step_len) * nr:
                    break
                halvings += 1
                if halvings > opts.max_halvings:
                    self.times["assembly"] += time.perf_counter() - t0
                    if not math.isfinite(n_t):
                        raise self._blew_up(k, "R(u, p) overflows along every Newton step")
                    raise NewtonDidNotConverge(
                        f"Newton stalled at step {k} (t = {float(self.time.times[k]):.6g}): no step along the Newton "
                        f"direction decreased ||F|| = {nr:.3g} after {opts.max_halvings} halvings (tolerance "
                        f"{tol:.3g}). Take smaller time steps or check the Jacobian (adjopt.verify.check_residual)",
                        history)
                step_len *= 0.5
            self.times["assembly"] += time.perf_counter() - t0
            u, r, Rv, nr = trial, r_t, R_t, n_t
            history.append(nr)
            full_steps.append(halvings == 0)
            it += 1
            self.stats.newton_iterations += 1  # counted as they run: a failed step's iterations too
        self.stats.time_steps += 1
        self.stats.newton_solves += 1
        if not self._warned_slow and _slow_newton(history, full_steps):
            self._warned_slow = True  # once per functional, not once per step
            logger.warning(_slow_newton_message(f" at step {k} (t = {float(self.time.times[k]):.6g})", it))
        if Rv is not None:  # R at the converged state: the next step reads it
            self._level_cache(ctx).get(k, u)["R"] = Rv
        return u

    def _blew_up(self, k, what) -> NonFiniteError:
        return NonFiniteError(f"the march blew up at step {k} of {self.time.n_steps} (t = "
                              f"{float(self.time.times[k]):.6g}): {what}. Take smaller time steps, check the sources "
                              f"and the scale of p")

    # -- the adjoint of one level ---------------------------------------------------------------------------
    def _carry(self, ctx, level, u, wM, wK):
        """- M^T wM - K(u_level)^T wK (the terms of the later steps that read this level), or None."""
        out = None
        if wM is not None:
            out = -(ctx.M.T @ wM)
        if wK is not None:
            t = self._K(ctx, level, u).T @ wK
            out = -t if out is None else out - t
        return out

    @staticmethod
    def _spread(store, k, a, g, lam):
        """Add lam_k's share to the later-step sums (wM, wK) of the levels k - j that step k reads."""
        wM, wK = store
        for j in range(1, len(a)):
            for w, c in ((wM, a[j]), (wK, g[j])):
                if c != 0.0:
                    w[k - j] = c * lam if k - j not in w else w[k - j] + c * lam

    @staticmethod
    def _total(c, lam, w):
        """c lam + w (either may be absent), or None."""
        if lam is not None and c != 0.0:
            return c * lam if w is None else w + c * lam
        return w

    # -- gradient -----------------------------------------------------------------------------------------
    def _gradient(self, ctx):
        p, N = ctx.p, self.time.n_steps
        if ctx.u is None and self.snapshots is None and self._fits(N + 1):
            if ctx.value is not None:
                self.stats.recomputed_steps += N
            self._forward_only(ctx, True)
        grad = np.zeros(self.n_params)
        store = ({}, {})  # level -> sum over later steps of alpha lam, of gamma lam
        steady_w = np.zeros(self.n)
        CM = None if self.M_op is None else _Batch(self.M_op, p, self.batch)
        has_b = self.rhs is not None and self.rhs.depends_on_p
        keep_lam = ctx.u is not None and self._fits(2 * N + 1)
        lams = [None] * (N + 1) if keep_lam else None
        bcache: dict = {}
        total = [0.0]

        def advance(k, prev, initial):
            u = self._advance(ctx, k, lambda lv: prev(lv)[0], bcache)
            if initial:
                total[0] += self._objective_at(ctx, k, u)
            return (u,)

        def U(get, level):
            return ctx.u[level] if ctx.u is not None else get(level)[0]

        def level_terms(k, u_k, lam, a0, g0):
            wM, wK = store[0].pop(k, None), store[1].pop(k, None)
            WM, WK = self._total(a0, lam, wM), self._total(g0, lam, wK)
            self._add_grad_p(ctx, k, u_k, grad)
            if CM is not None and WM is not None:
                CM.add(WM, u_k)
            if WK is not None:
                grad[:] -= self.R.vjp(u_k, p, WK)
                if has_b:
                    if self.rhs.steady:
                        steady_w[:] += WK
                    else:
                        self.rhs.vjp_add(self.time.times[k], p, WK, grad)

        def reverse(k, get):
            a, g = self.time.coefficients(k)
            u_k = U(get, k)
            rhs = self._carry(ctx, k, u_k, store[0].get(k), store[1].get(k))
            gu = self._grad_u(ctx, k, u_k)
            if gu is not None:
                rhs = gu if rhs is None else rhs + gu
            if rhs is None:
                rhs = np.zeros(self.n)
            fac, fresh = self._factor(ctx, k, u_k, a[0], g[0])
            try:
                lam = self._solve(fac, rhs, "adjoint", transpose=True)
            finally:
                self._release(fac, fresh)
            if lams is not None:
                lams[k] = lam
            level_terms(k, u_k, lam, a[0], g[0])
            self._spread(store, k, a, g, lam)

        def finish(get):
            u_0 = U(get, 0)
            mu = self._carry(ctx, 0, u_0, store[0].get(0), store[1].get(0))
            gu = self._grad_u(ctx, 0, u_0)
            if gu is not None:
                mu = gu if mu is None else mu + gu
            ctx.mu = np.zeros(self.n) if mu is None else mu
            level_terms(0, u_0, None, 0.0, 0.0)
            if self.u0.depends_on_p:
                grad[:] += self.u0.vjp(p, ctx.mu)
            if has_b and self.rhs.steady:
                self.rhs.vjp_add(self.time.times[0], p, steady_w, grad)
            if CM is not None:
                grad[:] -= CM.flush()

        t0 = time.perf_counter()
        recompute = ctx.value is not None
        if ctx.u is not None:
            for k in range(N, 0, -1):
                reverse(k, None)
                self._report("reverse", N - k + 1)
            finish(None)
        else:
            u0 = self._initial(ctx)
            total[0] = self._objective_at(ctx, 0, u0)
            self._march(ctx, 1, (u0,), advance, reverse, finish)
            if recompute:
                self.stats.recomputed_steps += N
            else:
                ctx.value = float(total[0] + sum(float(o.value(None, p)) for o in self.param_terms))
        for obj in self.param_terms:
            grad += obj.grad_p(None, p)
        check_finite(grad, "the gradient")
        self.times["adjoint"] += time.perf_counter() - t0
        if lams is not None:
            ctx.lam = lams
            self.stats.stored_states = max(self.stats.stored_states, 2 * N + 1)
        ctx.grad = grad

    # -- Hessian action -----------------------------------------------------------------------------------
    def _hessp(self, ctx, dp, gauss_newton=False):
        p, N = ctx.p, self.time.n_steps
        t0 = time.perf_counter()
        H = np.zeros(self.n_params)
        M = ctx.M
        dM = None if self.M_op is None else self.M_op._csr(self.M_op._tangent_values(p, dp))
        has_b = self.rhs is not None and self.rhs.depends_on_p
        CM = None if self.M_op is None else _Batch(self.M_op, p, self.batch)
        SM = None if self.M_op is None or self.M_op.affine else _Batch(self.M_op, p, self.batch, dp)
        store = ({}, {})  # the later-step sums of the adjoint (when it is solved again here)
        dstore = ({}, {})  # and of the second-order adjoint
        steady = [np.zeros(self.n), np.zeros(self.n)]
        bcache: dict = {}
        dbcache: dict = {}
        kept_u = ctx.u is not None
        kept_lam = ctx.lam is not None
        use_lam = not gauss_newton

        du0 = self.u0.jvp(p, dp) if self.u0.depends_on_p else np.zeros(self.n)
        du0 = np.array(du0, dtype=np.float64).reshape(self.n)
        if kept_u:
            start = (du0,)
            held = len(ctx.u) + (len(ctx.lam) - 1 if kept_lam else 0)
        else:
            start = (self._initial(ctx), du0)
            held = 0
        width = len(start)

        def U(get, level):
            return ctx.u[level] if kept_u else get(level)[0]

        def dU(get, level):
            return get(level)[-1]

        def forcing(level, u, c_a, c_g):
            """c_a dM u + c_g ((dR/dp)(u) dp - db) of one level."""
            out = np.zeros(self.n)
            if dM is not None and c_a != 0.0:
                out += c_a * (dM @ u)
            if c_g != 0.0:
                out += c_g * self._Rp(ctx, level, u, dp)
                if has_b:
                    out -= c_g * self._db(ctx, dbcache, level, dp)
            return out

        def advance(k, prev, initial):
            a, g = self.time.coefficients(k)
            u_k = ctx.u[k] if kept_u else self._advance(ctx, k, lambda lv: prev(lv)[0], bcache)
            r = -forcing(k, u_k, a[0], g[0])
            for j in range(1, len(a)):
                u_j = ctx.u[k - j] if kept_u else prev(k - j)[0]
                du_j = prev(k - j)[-1]
                r -= forcing(k - j, u_j, a[j], g[j])
                if a[j] != 0.0:
                    r -= a[j] * (M @ du_j)
                if g[j] != 0.0:
                    r -= g[j] * (self._K(ctx, k - j, u_j) @ du_j)
            fac, fresh = self._factor(ctx, k, u_k, a[0], g[0])
            try:
                du = self._solve(fac, r, "tangent")
            finally:
                self._release(fac, fresh)
            return (du,) if kept_u else (u_k, du)

        def second_terms(k, u_k, du_k, lam, a0, g0):
            """(WM, WK, hu, hp) of level k with lam its adjoint (None for level 0 or Gauss-Newton)."""
            WM = WK = None
            if use_lam:
                WM = self._total(a0, lam, store[0].pop(k, None))
                WK = self._total(g0, lam, store[1].pop(k, None))
            hu = hp = None
            if WK is not None:
                hu, hp = self.R.second(u_k, p, WK, du_k, dp)
            return WM, WK, hu, hp

        def adjoint_of(k, u_k, fac):
            """lam_k: kept, or solved again from the later-step sums (then its sums are spread)."""
            if kept_lam:
                return ctx.lam[k]
            rhs = self._carry(ctx, k, u_k, store[0].get(k), store[1].get(k))
            gu = self._grad_u(ctx, k, u_k)
            if gu is not None:
                rhs = gu if rhs is None else rhs + gu
            return self._solve(fac, np.zeros(self.n) if rhs is None else rhs, "adjoint", transpose=True)

        def close(k, u_k, du_k, WM, WK, hp, dl, a0, g0):
            """The level's terms of H, with dl its second-order adjoint (None at level 0)."""
            dWM = self._total(a0, dl, dstore[0].pop(k, None))
            dWK = self._total(g0, dl, dstore[1].pop(k, None))
            if CM is not None:
                if dWM is not None:
                    CM.add(dWM, u_k)
                if WM is not None:
                    CM.add(WM, du_k)
            if SM is not None and WM is not None:
                SM.add(WM, u_k)
            if dWK is not None:
                H[:] -= self.R.vjp(u_k, p, dWK)
            if hp is not None:
                H[:] -= hp
            if has_b:
                t_k = self.time.times[k]
                if self.rhs.steady:
                    if dWK is not None:
                        steady[1] += dWK
                    if WK is not None:
                        steady[0] += WK
                else:
                    if dWK is not None:
                        self.rhs.vjp_add(t_k, p, dWK, H)
                    if WK is not None and not self.rhs.affine:
                        self.rhs.second_add(t_k, p, WK, dp, H)

        def rhs2_of(k, u_k, du_k, WM, hu):
            rhs2 = self._second_objective(ctx, k, u_k, du_k, dp, H)
            c = self._carry(ctx, k, u_k, dstore[0].get(k), dstore[1].get(k))
            if c is not None:
                rhs2 += c
            if dM is not None and WM is not None:
                rhs2 -= dM.T @ WM
            if hu is not None:
                rhs2 -= hu
            return rhs2

        def reverse(k, get):
            a, g = self.time.coefficients(k)
            u_k, du_k = U(get, k), dU(get, k)
            fac, fresh = self._factor(ctx, k, u_k, a[0], g[0])
            try:
                lam = adjoint_of(k, u_k, fac) if use_lam else None
                WM, WK, hu, hp = second_terms(k, u_k, du_k, lam, a[0], g[0])
                dl = self._solve(fac, rhs2_of(k, u_k, du_k, WM, hu), "second_adjoint", transpose=True)
            finally:
                self._release(fac, fresh)
            close(k, u_k, du_k, WM, WK, hp, dl, a[0], g[0])
            if use_lam:
                self._spread(store, k, a, g, lam)
            self._spread(dstore, k, a, g, dl)

        def finish(get):
            u_0, du_0 = U(get, 0), dU(get, 0)
            mu = None
            if use_lam:
                if kept_lam:
                    mu = ctx.mu
                else:
                    mu = self._carry(ctx, 0, u_0, store[0].get(0), store[1].get(0))
                    gu = self._grad_u(ctx, 0, u_0)
                    if gu is not None:
                        mu = gu if mu is None else mu + gu
            WM, WK, hu, hp = second_terms(0, u_0, du_0, None, 0.0, 0.0)
            dmu = rhs2_of(0, u_0, du_0, WM, hu)
            close(0, u_0, du_0, WM, WK, hp, None, 0.0, 0.0)
            if self.u0.depends_on_p:
                H[:] += self.u0.vjp(p, dmu)
                if not self.u0.affine and mu is not None:
                    H[:] += self.u0.second(p, mu, dp)
            if has_b and self.rhs.steady:
                t_0 = self.time.times[0]
                self.rhs.vjp_add(t_0, p, steady[1], H)
                if not self.rhs.affine and use_lam:
                    self.rhs.second_add(t_0, p, steady[0], dp, H)
            for C in (CM, SM):
                if C is not None:
                    H[:] -= C.flush()

        self._march(ctx, width, start, advance, reverse, finish, held=held)
        if not kept_u and ctx.value is not None:
            self.stats.recomputed_steps += N
        for obj in self.param_terms:
            H += obj.hess_pp(None, p, dp)
        check_finite(H, "the Hessian action")
        self.times["hessp"] += time.perf_counter() - t0
        return H

    def __repr__(self):
        return (f"NonlinearTransientReducedFunctional(n={self.n}, n_params={self.n_params}, {self.time!r}, "
                f"solver={self.solver.name!r})")


__all__ = ["NonlinearTransientReducedFunctional"]
