"""The reduced functional of a nonlinear PDE R(u, p) = 0, solved by Newton's method.

Formulas (derived from the Lagrangian f(u, p) - lam^T R(u, p)); K = dR/du at the converged state, and
L = lam^T R with its second derivatives applied to directions (:class:`~adjopt.operators.ParametricResidual`):

    R(u, p) = 0                                    Newton: K(u_k) s = -R(u_k), u_{k+1} = u_k + a s
    K^T lam = f_u                                  adjoint
    grad J = f_p - (dR/dp)^T lam
    K du = -(dR/dp) dp                             tangent
    K^T dl = f_uu du + f_up dp - (L_uu du + L_up dp)           second adjoint
    H dp = f_pp dp + f_pu du - (dR/dp)^T dl - (L_pu du + L_pp dp)

For R = A(p) u - b(p): L_uu = 0, L_up dp = (dA.dp)^T lam, L_pu du + L_pp dp = C(lam, du) + C2(lam, u, dp)
- lam^T b'' dp, and these are :mod:`adjopt.functional`'s formulas. With a parameter map rho = M(p) the PDE terms
are pulled back through M exactly as there.

One factorization serves every solve at a parameter value: Newton factorizes K at each iterate *before* it tests
convergence, so the loop ends holding the factorization of K at the converged u itself. The adjoint, every tangent
and every second adjoint reuse it: they are exact for the Jacobian of the state that is returned (no lagged
Jacobian), and a value costs one factorization more than Newton's steps, a gradient one more solve.

An iterative solver (AMG) does not rebuild its hierarchy at every Newton step: a new Jacobian is solved with
the last hierarchy as preconditioner (``AMGFactorization.lagged``) while the step solves take at most twice
the Krylov iterations of the last fresh hierarchy plus 2. The Krylov method always runs on the current K,
so every solve still meets its tolerance for the Jacobian of the returned state.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, fields

import numpy as np

from ._threads import dot, norm
from ._validate import as_count, owned
from .cache import DEFAULT_CACHE_BYTES, StateCache
from .errors import (NewtonDidNotConverge, NonFiniteError, PatternError, SingularMatrixError,
                     SolverDidNotConverge)
from .functional import ReducedFunctional, _frozen, _State
from .objectives import Objective
from .operators.residual import ParametricResidual
from .solvers import SOLVE_KINDS, make_solver

logger = logging.getLogger(__name__)


#: full Newton steps in a row, each reducing ||R|| by less than this factor, after which Newton is reported as
#: converging linearly (a Jacobian that is not the derivative of the residual)
_SLOW_STEPS, _SLOW_RATIO = 4, 0.1


def refuse_symmetric_solver(solver, residual):
    """The solver, or a ValueError when it needs a symmetric K that the residual does not declare."""
    if residual.symmetric:
        return solver
    if getattr(solver, "name", None) == "cholmod":
        raise ValueError("solver='cholmod' needs a symmetric positive definite Jacobian, but this residual does not "
                         "declare K(u, p) symmetric (residual.symmetric is False; a quasilinear q(u) = 1 + beta u^2 "
                         "with beta != 0 makes it nonsymmetric away from u = 0): use solver='auto', 'pardiso', "
                         "'superlu' or 'amg'")
    if getattr(solver, "symmetric", None) is True:
        raise ValueError(f"the {solver.name} solver is told that K is symmetric (symmetric=True), but the "
                         "residual does not declare a symmetric Jacobian (residual.symmetric is False): its "
                         "adjoint solves would use K instead of K^T. Leave symmetric=None (detected)")
    return solver


def _slow_newton(history, full_steps) -> bool:
    """True when the last ``_SLOW_STEPS`` iterations were full steps that each reduced ||R|| by less than a
    factor 10: Newton with the true Jacobian converges quadratically once it takes full steps."""
    if len(full_steps) < _SLOW_STEPS + 2:
        return False
    last = range(len(history) - _SLOW_STEPS, len(history))
    return all(full_steps[i - 1] and 0 < history[i - 1] and history[i] > _SLOW_RATIO * history[i - 1] for i in last)


def _slow_newton_message(where: str, its: int) -> str:
    return (f"Newton{where} converged only linearly ({its} iterations; full steps each reducing ||R|| by less "
            "than a factor 10): the Jacobian K(u, p) is probably not the derivative of R(u, p). Check it with "
            "adjopt.verify.check_residual; gradients are computed with this K and are wrong if it is wrong")


@dataclass
class NewtonOptions:
    """Options of the Newton solve of R(u, p) = 0.

    Converged when ||R(u, p)|| <= max(atol, rtol s) (2-norms), with the scale s = ||R(0, p)|| (or the residual
    at the initial guess when R(0, p) = 0): relative by default, so that the result does not depend on the
    units of the problem. ``line_search`` halves the step until ||R|| decreases by the factor (1 - 1e-4 a) (at
    most ``max_halvings`` times); without it every full step is taken. ``warm_start`` starts from the state of
    the nearest cached p.
    """

    rtol: float = 1e-10
    atol: float = 0.0
    max_iter: int = 50
    line_search: bool = True
    max_halvings: int = 30
    warm_start: bool = True

    @classmethod
    def make(cls, value) -> NewtonOptions:
        """Checked options from None (the defaults), a dict of them or a NewtonOptions."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            value = {f.name: getattr(value, f.name) for f in fields(cls)}
        if not isinstance(value, dict):
            raise TypeError(f"newton must be a dict of options or NewtonOptions, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown Newton option(s) {unknown}; the options are {sorted(known)}")
        out = cls(**value)
        for name in ("rtol", "atol"):
            v = getattr(out, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not (0 <= v < 1):
                raise ValueError(f"newton {name} must be a number in [0, 1), got {v!r}")
            setattr(out, name, float(v))
        if out.rtol == 0 and out.atol == 0:
            raise ValueError("newton rtol and atol cannot both be 0 (Newton would never stop)")
        for name in ("max_iter", "max_halvings"):
            v = getattr(out, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"newton {name} must be a positive integer, got {v!r}")
            setattr(out, name, int(v))
        for name in ("line_search", "warm_start"):
            v = getattr(out, name)
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"newton {name} must be True or False, got {v!r}")
            setattr(out, name, bool(v))
        return out


def _norm(r: np.ndarray) -> float:
    """||r||_2 without overflow for entries beyond 1e154 (inf only when an entry is)."""
    nr = float(norm(r))
    if math.isfinite(nr) or not r.size:
        return nr
    big = float(np.max(np.abs(r)))
    return big * float(norm(r / big)) if math.isfinite(big) and big > 0 else math.inf


@dataclass
class _NonlinearState(_State):
    newton_iterations: int = 0
    residual_norms: list | None = None


class NonlinearReducedFunctional(ReducedFunctional):
    """J(p) = f(u(p), p) subject to R(u, p) = 0, with gradient and Hessian actions.

    ``ReducedFunctional(residual, objective=...)`` builds one when its first argument is a
    :class:`~adjopt.operators.ParametricResidual`.

    Parameters
    ----------
    residual
        The :class:`~adjopt.operators.ParametricResidual` R(u, p).
    objective
        An :class:`~adjopt.objectives.Objective` f(u, p).
    solver
        A :class:`~adjopt.solvers.LinearSolver` or its name, for the Newton steps and every other solve
        (``"auto"`` picks by the size and declared symmetry of K). Geometric multigrid (which assembles its own
        levels from a linear operator) is not available here.
    newton
        :class:`NewtonOptions` or a dict of them (``rtol``, ``atol``, ``max_iter``, ``line_search``,
        ``max_halvings``, ``warm_start``).
    cache_bytes, keep_factorizations, parameter_map
        As for :class:`~adjopt.ReducedFunctional`.

    Raises
    ------
    adjopt.errors.NewtonDidNotConverge
        With the residual history, when Newton does not converge; the optimizers treat it like a NaN value and
        step back.
    """

    def __init__(self, residual: ParametricResidual, rhs=None, objective: Objective | None = None, solver=None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, parameter_map=None, self_adjoint: bool | None = None,
                 keep_factorizations: int = 2, newton=None):
        if not isinstance(residual, ParametricResidual):
            raise TypeError(f"residual must be a ParametricResidual, got {type(residual).__name__}")
        if rhs is not None:
            raise TypeError("a residual R(u, p) carries its own source: pass rhs=None (or put b(p) into R)")
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an Objective, got {type(objective).__name__}")
        if self_adjoint:
            raise ValueError("self_adjoint=True needs a linear state equation; a nonlinear residual has none")
        self._matrix = residual
        self._rhs = None
        self._objective = objective
        self._map = parameter_map
        if parameter_map is not None and parameter_map.n_out != residual.n_params:
            raise PatternError(f"the parameter map produces {parameter_map.n_out} values but R(u, rho) takes "
                               f"{residual.n_params} parameters")
        self._newton_options = NewtonOptions.make(newton)
        self._solver = self._accept(make_solver(solver))
        self._fixed = None
        self.cache = StateCache(cache_bytes)
        self._map_version = None  # the parameter map's version the cached states were computed with
        self.keep_factorizations = as_count(keep_factorizations, "keep_factorizations")
        self._live: OrderedDict[int, _State] = OrderedDict()
        self.times = Counter()
        self._self_adjoint_request = False
        self.self_adjoint = False
        self._warned_slow = False

    # -- what it is made of ---------------------------------------------------------------------------
    @property
    def residual(self) -> ParametricResidual:
        """R(u, p) (fixed)."""
        return self._matrix

    @property
    def newton(self) -> NewtonOptions:
        """The Newton options; set a dict or :class:`NewtonOptions` (checked)."""
        return self._newton_options

    @newton.setter
    def newton(self, value):
        self._newton_options = NewtonOptions.make(value)

    def _accept(self, solver):
        if getattr(solver, "uses_operator", False):
            raise ValueError(f"the {solver.name} solver builds its levels from a linear operator A(p); a nonlinear "
                             "residual has none: use 'auto', 'superlu', 'cholmod', 'pardiso' or 'amg'")
        return refuse_symmetric_solver(solver, self.residual)

    def _detect_self_adjoint(self) -> bool:
        return False

    # -- Newton -----------------------------------------------------------------------------------------
    def _guess(self, p: np.ndarray, rho: np.ndarray) -> np.ndarray:
        """The state of the nearest cached p (Newton's start), else the residual's own guess."""
        best, dist = None, np.inf
        if self.newton.warm_start:
            for q, st in self.cache.items():
                if q.shape == p.shape:
                    d = float(norm(q - p))
                    if d < dist:
                        best, dist = st, d
        if best is not None:
            return np.array(best.u, dtype=np.float64)
        guess = np.array(self.residual.initial_guess(rho), dtype=np.float64)
        if guess.shape != (self.residual.n,):
            raise ValueError(f"initial_guess(p) must return shape ({self.residual.n},), got {guess.shape}")
        return guess

    def _newton(self, p: np.ndarray, rho: np.ndarray):
        """(u, K, its factorization, shared, iterations, residual norms) at the converged state."""
        R, opts, times, clock = self.residual, self.newton, self.times, time.perf_counter
        u = self._guess(p, rho)
        t0 = clock()
        r = R.residual(u, rho)
        nr = _norm(r)
        scale = _norm(R.residual(np.zeros(R.n), rho)) if np.any(u) else nr
        times["assembly"] += clock() - t0
        if not math.isfinite(nr) or not math.isfinite(scale):
            raise NonFiniteError(
                f"the residual R(u, p) is not finite (or overflows) at Newton's initial guess: ||R|| = {nr:.3g}. "
                "Check the scale of p, of the source and of the coefficients")
        tol = max(opts.atol, opts.rtol * (scale if scale > 0 else nr))
        history, full_steps = [nr], []
        fac, shared, fresh = None, False, True
        fresh_its = its = 0
        it = 0

        def failed(exc):
            hint = (" At the initial guess this can mean that K is singular there only (a reaction that vanishes "
                    "at u = 0 on a problem without a Dirichlet boundary): start elsewhere by overriding the "
                    "residual's initial_guess(p).") if it == 0 else ""
            return NewtonDidNotConverge(
                f"Newton iteration {it} (||R|| = {nr:.3g}) failed: {exc}{hint}", history)

        while True:
            t0 = clock()
            K = R.jacobian(u, rho)
            K = type(K)((owned(K.data, "the Jacobian K(u, p)"), K.indices, K.indptr), shape=K.shape)
            t1 = clock()
            # an iterative solver keeps its preconditioner across Newton steps while the step solves stay
            # within twice the iterations of the last fresh one (plus 2); then it builds a new one
            lagged = None
            if fac is not None and not fac.exact and hasattr(fac, "lagged") and its <= 2 * fresh_its + 2:
                lagged = fac.lagged(K)
            try:
                if lagged is not None:
                    fac, fresh = lagged, False
                else:
                    if fac is not None:
                        self.solver.recycle(fac)
                    fac, shared = self._factorize(K, rho)
                    fresh = True
                if nr <= tol and it == 0 and not getattr(fac, "probed", True):
                    fac.probe()  # no Newton step solved with it: a singular K must still be refused
            except (SingularMatrixError, SolverDidNotConverge) as exc:
                raise failed(exc) from exc
            times["assembly"] += t1 - t0
            times["factorize"] += clock() - t1
            if nr <= tol:
                break
            if it >= opts.max_iter:
                raise NewtonDidNotConverge(
                    f"Newton did not converge in {opts.max_iter} iterations: ||R|| = {nr:.3g} against the tolerance "
                    f"{tol:.3g} (history {[float(f'{v:.3g}') for v in history[-6:]]}). Raise newton max_iter, "
                    "loosen rtol/atol, start closer (p nearer a solved one) or check the Jacobian "
                    "(adjopt.verify.check_residual)", history)
            t0 = clock()
            before = self.solver.stats.iterations["forward"]
            try:
                step = fac.solve(-r, kind="forward")
            except (SingularMatrixError, SolverDidNotConverge, NonFiniteError) as exc:
                raise failed(exc) from exc
            its = self.solver.stats.iterations["forward"] - before
            if fresh:
                fresh_its = its
            times["solve"] += clock() - t0
            t0 = clock()
            a, halvings = 1.0, 0
            while True:
                trial = u + a * step
                try:
                    r_trial = R.residual(trial, rho)
                    n_trial = _norm(r_trial)
                except NonFiniteError:
                    n_trial = np.inf
                if not opts.line_search and math.isfinite(n_trial):
                    break
                if n_trial <= (1.0 - 1e-4 * a) * nr:
                    break
                halvings += 1
                if halvings > opts.max_halvings:
                    raise NewtonDidNotConverge(self._no_decrease(nr, scale, tol, it, n_trial), history)
                a *= 0.5
            times["assembly"] += clock() - t0
            u, r, nr = trial, r_trial, n_trial
            history.append(nr)
            full_steps.append(halvings == 0)
            it += 1
            self.solver.stats.newton_iterations += 1  # counted as they run: a failed solve's iterations too
            logger.debug("Newton %d: ||R|| = %.3e (step %.3g)", it, nr, a)
        self.solver.stats.newton_solves += 1
        if not self._warned_slow and _slow_newton(history, full_steps):
            self._warned_slow = True  # once per functional
            logger.warning(_slow_newton_message("", it))
        return u, K, fac, shared, it, history

    def _no_decrease(self, nr: float, scale: float, tol: float, it: int, n_trial: float) -> str:
        opts = self.newton
        what = "R overflows or is NaN along the Newton step (not finite)" if not math.isfinite(n_trial) else \
            f"no step along the Newton direction decreased ||R|| (after {opts.max_halvings} halvings)"
        if not math.isfinite(n_trial):
            why = ("check the scale of the source, of p and of the coefficients, and whether a solution "
                   "exists")
        elif scale > 0 and nr <= 1e-6 * scale:
            why = (f"||R|| = {nr:.3g} is {nr / scale:.1e} of its scale {scale:.3g}, where round-off stops Newton "
                   f"short of the tolerance {tol:.3g}: loosen newton rtol (or atol)")
        else:
            why = ("the Jacobian may not be the derivative of the residual (adjopt.verify.check_residual), or "
                   "the problem has no solution near the start")
        return f"Newton iteration {it} (||R|| = {nr:.3g}): {what}; {why}"

    def with_objective(self, objective, self_adjoint=None):
        """Not for a nonlinear state equation yet: build a second functional (its own Newton solves)."""
        raise TypeError("with_objective (shared states) is for a linear A(p) u = b(p); for a nonlinear residual "
                        "build a second NonlinearReducedFunctional")

    def _state(self, p: np.ndarray) -> _State:
        self._check_map_version()
        st = self.cache.get(p)
        if st is not None:
            return st
        t0 = time.perf_counter()
        rho = p if self.map is None else owned(self.map.forward(p), "the parameter map's output rho = M(p)")
        self.times["filter"] += time.perf_counter() - t0
        u, K, fac, shared, its, history = self._newton(p, rho)
        tolerances = None if fac.exact else {kind: fac.tolerance(kind) for kind in SOLVE_KINDS}
        st = _NonlinearState(A=K, factorization=fac, b=None, u=_frozen(u), rho=rho, shared=shared,
                             tolerances=tolerances, newton_iterations=its, residual_norms=history)
        self._use(st)
        self.cache.put(p, st)
        return st

    def _pde_gradient(self, p: np.ndarray, st: _State, tol: float | None = None) -> np.ndarray:
        """q = -(dR/drho)^T lam, the gradient of the PDE part with respect to rho."""
        lam = self._adjoint(p, st, tol)
        if st.q is None:
            t0 = time.perf_counter()
            st.q = -self.residual.vjp(st.u, st.rho, lam)
            self.times["sensitivity"] += time.perf_counter() - t0
        return st.q

    # -- public API -------------------------------------------------------------------------------------
    def value_error(self, p) -> float:
        """``|lam^T R(u_h, p)|``: the error of value(p) from the state's Newton residual (and, with an iterative
        solver, the inexact solves), to first order. It costs an adjoint solve when none is cached."""
        p = self._p(p)
        st = self._state(p)
        lam = self._adjoint(p, st)
        return abs(dot(lam, self.residual.residual(st.u, st.rho)))

    def newton_history(self, p) -> list[float]:
        """||R(u_k, p)|| of the Newton iterates of the state at p, from the initial guess on."""
        return list(self._state(self._p(p)).residual_norms)

    def _hessp_block(self, p, dP, st, lam, tol):
        """k Hessian actions (the columns of dP): one multi-column tangent and one multi-column second-adjoint
        solve on the factorization of K (``gauss_newton``, lam None: no second-order terms of the residual)."""
        clock = time.perf_counter
        t_start = clock()
        u, rho, R, f, pmap = st.u, st.rho, self.residual, self.objective, self.map
        k = dP.shape[1]
        dR = [dP[:, i] if pmap is None else pmap.jvp(p, dP[:, i]) for i in range(k)]
        RT = np.empty(u.shape + (k,))
        for i, drho in enumerate(dR):
            RT[..., i] = -R.jvp(u, rho, drho)
        t0 = clock()
        DU = self._solve_block(st, RT, "tangent", tol)
        t_solves = clock() - t0
        RA = np.empty_like(RT)
        hps = [None] * k
        for i, drho in enumerate(dR):
            du = np.ascontiguousarray(DU[..., i])
            RA[..., i] = f.hess_uu(u, p, du) + f.hess_up(u, p, dP[:, i])
            if lam is not None:
                hu, hps[i] = R.second(u, rho, lam, du, drho)
                RA[..., i] -= hu
        t0 = clock()
        DL = self._solve_block(st, RA, "second_adjoint", tol, transpose=True)
        t_solves += clock() - t0
        H = np.empty(dP.shape)
        for i in range(k):
            h_rho = -R.vjp(u, rho, np.ascontiguousarray(DL[..., i]))
            if lam is not None:
                h_rho = h_rho - hps[i]
            H[:, i] = self._finish_hessp(p, dP[:, i], st, np.ascontiguousarray(DU[..., i]), h_rho, lam is not None,
                                         t_start, t_solves if i == 0 else 0.0)
            t_start = clock()
        return H

    def __repr__(self):
        return (f"NonlinearReducedFunctional({self.residual!r}, objective={self.objective!r}, "
                f"solver={self.solver.name})")
