"""Verification of derivatives: Taylor tests with automatic step ranges.

For a direction dp and step h the Taylor remainders are::

    r1(h) = |J(p + h dp) - J(p)|                                     ~ h
    r2(h) = |J(p + h dp) - J(p) - h g.dp|                            ~ h^2
    r3(h) = |J(p + h dp) - J(p) - h g.dp - h^2/2 dp.H dp|            ~ h^3

and the observed rate between two steps is log(r(h1)/r(h2)) / log(h1/h2).
The Hessian action is checked a second way too, by central differences of
the gradient (the even terms cancel)::

    rg(h) = ||grad J(p + h dp) - grad J(p - h dp) - 2 h H dp||       ~ h^3

An error e in H dp adds 2 h e, rate 1, which overtakes the h^3 term at
h ~ sqrt(e): rg resolves Hessian errors of a relative 1e-6 at steps where r3
has long reached round-off.

Fixed step ranges either start outside the asymptotic regime or run into
round-off. :func:`taylor_test` chooses its window instead: it halves h from a
scale-aware start until the remainder reaches its noise floor, and then uses
the last ``window`` steps (the smallest, so the most asymptotic) at which

* the expansion is asymptotic: r_k(h) <= 0.1 r_{k-1}(h) (the highest
  retained term dominates what it leaves), and
* the remainder is clearly above the noise of the evaluations: r_k(h) >= the
  floor, the largest of

  - 100 sigma, where sigma is the noise measured at this p: three steps of
    1e-12 h0, where the true remainder is negligible, so that
    ``|J(p + delta dp) - J(p) - delta g.dp|`` is pure noise (round-off, the
    conditioning of the solves, and the error of iterative solves);
  - ``noise`` (``|J(p)| + |J(p + h dp)|`` + the retained terms), ``noise = 1e3 eps``;
  - 10 times the errors of inexact solves at p and at p + h dp, when J
    estimates them (``J.value_error(q)``: the dual-weighted residual
    ``|lam^T (b - A u)|`` of an iterative forward solve, the error up to second
    order). A tiny step cannot measure these: a Krylov solve from the same
    start on a nearly equal matrix makes nearly the same error, so that
    sigma misses the error that changes with the number of iterations.

Iterative solvers that warm-start make J(p + h dp) depend on the points
evaluated before it: a tiny step then takes zero Krylov iterations and the
noise looks like zero; a preconditioner reused from an earlier point (GMG's
``reuse_hierarchy``) does the same. The test switches both off while it runs
(every ``warm_start`` and ``reuse_hierarchy`` attribute of J, its solver and
the solver ``"auto"`` chose), so that every evaluation depends on its point alone.

If r_k is at the floor for every step, the expansion is exact to this order
(J is a polynomial of degree < k along dp) and the test passes as ``exact``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import math

import numpy as np

from .optimize.space import SERIAL

logger = logging.getLogger(__name__)

EPS = np.finfo(float).eps
#: largest spread of the rates in a window that counts as settled (asymptotic)
SETTLED_SPREAD = 0.3
#: unordered steps (see TaylorResult.unordered) from which an inconclusive test blames the derivative
UNORDERED_STEPS = 5


@dataclass
class TaylorResult:
    """Outcome of :func:`taylor_test`.

    ``rate`` is the observed rate at the smallest steps of the window, the
    most asymptotic (``nan`` when fewer than three steps are usable: no
    asymptotic window above the noise);
    ``passed`` needs it to reach ``expected - tol`` (or ``exact``). For order
    3, ``gradient_check`` holds the central-difference test of the gradient
    (expected rate 3), which must pass too.
    """

    order: int
    steps: np.ndarray
    remainders: np.ndarray
    used: np.ndarray
    rates: np.ndarray
    rate: float
    exact: bool
    tol: float
    roundoff: float = 0.0
    floors: np.ndarray | None = None
    expected: float | None = None
    quantity: str = "J"
    gradient_check: TaylorResult | None = None
    #: steps 100x above the noise floor whose remainder is not a tenth of the lower order's: the expansion is
    #: not ordered there, which for many steps means the term of this order (the derivative tested) is wrong
    unordered: int = 0

    def __post_init__(self):
        if self.expected is None:
            self.expected = float(self.order)

    @property
    def own_passed(self) -> bool:
        """This series alone (without ``gradient_check``)."""
        return self.exact or (bool(np.isfinite(self.rate)) and self.rate >= self.expected - self.tol)

    @property
    def settled(self) -> bool:
        """The rates of the window agree (spread <= 0.3): the window is in the asymptotic regime."""
        return self.rates.size >= 2 and float(self.rates.max() - self.rates.min()) <= SETTLED_SPREAD

    @property
    def status(self) -> str:
        """"pass", "fail" (settled at a wrong rate) or "inconclusive" (no window, or rates that still drift:
        the noise floor cut the series before it became asymptotic)."""
        if self.own_passed:
            return "pass"
        return "fail" if self.settled else "inconclusive"

    @property
    def passed(self) -> bool:
        """Orders 1 and 2: the rate at the smallest steps of the window reaches ``expected - tol`` (or the
        expansion is exact).

        Order 3: the central-difference test of the gradient passes, and the series of J does not fail
        (inconclusive is allowed: J's remainders reach round-off long before the gradient's do).
        """
        if self.gradient_check is None:
            return self.own_passed
        return self.gradient_check.passed and self.status != "fail"

    @property
    def verdict(self) -> str:
        """What the test judged on: the rate (marked when the window is not settled), "exact", or "no window"."""
        if self.exact:
            return "exact"
        if np.isfinite(self.rate):
            return f"{self.rate:.3f}" + ("" if self.own_passed or self.settled else "?")
        return "no window"

    def _series_table(self) -> list[str]:
        what = "Hessian action" if self.quantity == "grad J" else ("gradient" if self.order == 2 else
                                                                      "Hessian action" if self.order == 3 else "value")
        lines = [f"Taylor test of the {what} on {self.quantity}, order {self.order} (expected rate {self.expected:g})",
                 f"{'h':>11} {'remainder':>12} {'floor':>10} {'rate':>7}  used"]
        prev = None
        floors = self.floors if self.floors is not None else np.zeros_like(self.steps)
        for h, r, fl, u in zip(self.steps, self.remainders, floors, self.used):
            rate = "" if prev is None or prev[1] <= 0 or r <= 0 else f"{np.log(prev[1] / r) / np.log(prev[0] / h):7.3f}"
            lines.append(f"{h:11.4e} {r:12.4e} {fl:10.2e} {rate:>7}  {'*' if u else ''}")
            prev = (h, r)
        if self.exact:
            verdict = "exact to this order (remainder at round-off)"
        elif np.isfinite(self.rate):
            verdict = f"observed rate {self.rate:.3f}" + ("" if self.own_passed or self.settled else
                                                         " in a window whose rates still drift")
        else:
            verdict = "no asymptotic window above the noise floor (fewer than 3 usable steps)"
        outcome = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}[self.status]
        if self.status == "inconclusive" and self.quantity == "J" and self.gradient_check is None:
            outcome = "FAIL (inconclusive)"
        lines.append(f"{verdict} (noise of {self.quantity} here: {self.roundoff:.1e}): {outcome}")
        if self.status == "inconclusive" and self.unordered >= UNORDERED_STEPS:
            lines.append(f"  {self.unordered} steps far above the noise floor left a remainder larger than a tenth of the "
                         f"order-{self.order - 1} remainder: the expansion is not ordered, so the term of order "
                         f"{self.order} (the {what}) is probably wrong, not noisy")
        elif self.status == "inconclusive" and self.floors is not None and self.floors.size \
                and self.floors.max() > 1.5 * 100.0 * self.roundoff:
            lines.append("  the noise floor is the error of inexact (iterative) solves: tighten the solver's tolerance "
                         "to resolve smaller remainders")
        return lines

    def table(self) -> str:
        """A plain-text table: step, remainder, noise floor, rate, used (and the gradient check for order 3)."""
        lines = self._series_table()
        if self.gradient_check is not None:
            lines += [""] + self.gradient_check._series_table()
            lines.append(f"Hessian action: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)

    __str__ = table


def _default_direction(p: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(p.shape[0])


@contextlib.contextmanager
def independent_evaluations(J):
    """Within: no warm starts and no preconditioners reused from other points (``warm_start`` and
    ``reuse_hierarchy`` of J, its solver, the solver ``"auto"`` chose, and J's Newton options), so that an
    evaluation depends on its point alone, not on the points evaluated before it."""
    solver = getattr(J, "solver", None)
    objects = (J, solver, getattr(solver, "chosen", None), getattr(J, "newton", None))
    saved = [(obj, name, getattr(obj, name)) for obj in objects for name in ("warm_start", "reuse_hierarchy")
             if hasattr(obj, name)]
    try:
        for obj, name, _ in saved:
            setattr(obj, name, False)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _series(remainder, h: float, max_steps: int, floor_of):
    """Halve h until two remainders in a row are below their floor.

    ``remainder(h) -> (r, r_prev, last, scale)``: the remainder, the one of the order below, the size of the
    last retained term and the scale for ``floor_of(scale)``, the noise floor of that step. A step is usable
    when r is above the floor and the expansion is ordered there (r <= 0.1 r_prev), or the last retained term
    is negligible against r (a direction along which it vanishes, e.g. g.dp = 0 at a stationary point).
    Returns (steps, remainders, floors, ok, below).
    """
    steps, rems, floors, ok = [], [], [], []
    below = 0
    for _ in range(max_steps):
        r, r_prev, last, scale = remainder(h)
        floor = floor_of(scale)
        steps.append(h)
        rems.append(r)
        floors.append(floor)
        ok.append(r >= floor and (r <= 0.1 * r_prev or last <= 0.01 * r))
        below = below + 1 if r < floor else 0
        if below >= 2:
            break
        h *= 0.5
    return np.array(steps), np.array(rems), np.array(floors), np.array(ok), below


def _judge(steps, rems, floors, ok, below, window: int, order: int, tol: float, sigma: float, expected: float,
           quantity: str, exact_scale: np.ndarray) -> TaylorResult:
    """The window (the last ``window`` steps of the last run of at least 3 consecutive usable steps), its
    rates and the verdict."""
    used = np.zeros_like(ok)
    good = np.flatnonzero(ok)
    runs = np.split(good, np.flatnonzero(np.diff(good) > 1) + 1) if good.size else []
    runs = [r for r in runs if r.size >= 3]
    if runs:
        used[runs[-1][-window:]] = True
    idx = np.flatnonzero(used)
    rates = np.log(rems[idx[:-1]] / rems[idx[1:]]) / np.log(steps[idx[:-1]] / steps[idx[1:]]) if idx.size >= 2 else np.array([])
    exact = good.size == 0 and below >= 2 and bool(np.all(rems <= 1e3 * exact_scale))
    # judged on the smallest step's rate, the most asymptotic one: above a 100-sigma floor noise moves it by
    # less than 0.03, and a rate that is still converging at the large steps of the window is no failure
    rate = float(rates[-1]) if rates.size >= 2 else float("nan")
    unordered = int(np.sum((rems >= 100.0 * floors) & ~ok))  # far above the noise: not the solver's error
    return TaylorResult(order=order, steps=steps, remainders=rems, used=used, rates=rates, rate=rate, exact=exact,
                        tol=tol, roundoff=sigma, floors=floors, expected=expected, quantity=quantity,
                        unordered=unordered)


def taylor_test(J, p, dp=None, order: int = 2, h0: float | None = None, max_steps: int = 40,
                window: int = 5, tol: float = 0.1, seed: int = 0, noise: float = 1e3 * EPS) -> TaylorResult:
    """Taylor test of J at p along dp, for order 1 (value), 2 (gradient) or 3 (Hessian action).

    Parameters
    ----------
    J
        An object with ``value(p)``, and ``gradient(p)`` (order >= 2) and ``hessp(p, dp)`` (order 3);
        optionally ``value_error(p)`` (an estimate of the error of inexact solves in value(p)).
    p, dp
        Point and direction; dp defaults to a seeded standard-normal vector.
    order
        1, 2 or 3. Order 3 also runs the central-difference test of the gradient (expected
        rate 3) and passes only when both pass.
    h0
        First step; default ``0.1 max(1, |p|_inf) / |dp|_inf``.
    max_steps
        At most this many evaluations of J (halvings of h).
    window
        Number of steps used for the rates (at least 3 are needed).
    tol
        Passes when the observed rate at the smallest steps of the window is >= ``order - tol``.
    noise
        Relative round-off level of J evaluations; remainders below it are not used.

    Returns
    -------
    TaylorResult
        Steps, remainders, floors, the window used, the observed rates and ``passed``.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 3:
        raise ValueError(f"window must be an integer of at least 3 (two rates), got {window!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < window:
        raise ValueError(f"max_steps must be an integer of at least window = {window}, got {max_steps!r}")
    if h0 is not None and not (np.isfinite(h0) and h0 > 0):
        raise ValueError(f"h0 must be a positive step, got {h0!r}")
    p = np.array(p, dtype=float)
    # a functional on blocks of p over MPI ranks (BlockFunctional) sums its reductions over the ranks
    space = getattr(J, "space", None) or SERIAL
    dp = _default_direction(p, seed + (space.comm.rank if space.distributed else 0)) if dp is None else \
        np.array(dp, dtype=float)
    if dp.shape != p.shape:
        raise ValueError(f"dp has shape {dp.shape} but p has shape {p.shape}")
    dot = space.dot

    def norm(v):
        return math.sqrt(max(space.dot(v, v), 0.0))

    dnorm = space.max(np.abs(dp), initial=0.0)
    if not dnorm > 0 or not np.isfinite(dnorm):
        raise ValueError("dp is zero or not finite; give a nonzero, finite direction")
    with independent_evaluations(J):
        J0 = J.value(p)
        g0 = np.asarray(J.gradient(p), dtype=float) if order >= 2 else None
        gdp = dot(g0, dp) if order >= 2 else 0.0
        Hdp = np.asarray(J.hessp(p, dp), dtype=float) if order == 3 else None
        dHd = dot(dp, Hdp) if order == 3 else 0.0
        h = 0.1 * max(1.0, space.max(np.abs(p), initial=0.0)) / dnorm if h0 is None else float(h0)
        deltas = 1e-12 * h * np.array([1.0, 2.0, 3.0])
        sigma = max(abs(J.value(p + d * dp) - J0 - d * gdp) for d in deltas)
        err = getattr(J, "value_error", None)
        err0 = float(err(p)) if err is not None else 0.0
        floor_abs = max(100.0 * sigma, 10.0 * err0)

        def remainder(h):
            q = p + h * dp
            Jh = J.value(q)
            terms = [J0, h * gdp, 0.5 * h * h * dHd][:order]
            partial = [Jh - sum(terms[: j + 1]) for j in range(order)]
            r_prev = abs(partial[-2]) if order >= 2 else abs(J0) + abs(Jh)
            last = abs(terms[-1]) if order >= 2 else np.inf
            # the errors of inexact solves at both points (estimated closely, so a factor 10 is margin enough)
            solve_noise = 10.0 * (err0 + float(err(q))) if err is not None else 0.0
            return abs(partial[-1]), r_prev, last, (abs(J0) + abs(Jh) + sum(abs(t) for t in terms[1:]), solve_noise)

        series = _series(remainder, h, max_steps, lambda scale: max(noise * scale[0], floor_abs, scale[1]))
        # "exact" means at round-off: the floor of an inexact solve is noise that could hide anything
        exact_scale = max(noise * (abs(J0) + 1e-300), 100.0 * sigma) + noise * np.abs(series[0] * gdp)
        res = _judge(*series, window, order, tol, sigma, float(order), "J", exact_scale)

        if order == 3:
            def central(h):
                return np.asarray(J.gradient(p + h * dp), dtype=float) - np.asarray(J.gradient(p - h * dp), dtype=float)

            sigma_g = max(norm(central(d) - 2 * d * Hdp) for d in deltas)
            g_scale = norm(g0)

            def g_remainder(h):
                diff = central(h)
                return (norm(diff - 2 * h * Hdp), norm(diff), 2 * h * norm(Hdp), 2 * g_scale + 2 * h * norm(Hdp))

            gseries = _series(g_remainder, h, max_steps, lambda scale: max(noise * scale, 100.0 * sigma_g))
            g_exact = max(noise * g_scale, 100.0 * sigma_g) + noise * gseries[0] * norm(Hdp)
            res.gradient_check = _judge(*gseries, window, 3, tol, sigma_g, 3.0, "grad J", g_exact)
    logger.debug("%s", res.table())
    return res


def check_hessian_symmetry(J, p, v=None, w=None, seed: int = 1) -> float:
    """Relative asymmetry ``|v.Hw - w.Hv| / max(|v.Hw|, |w.Hv|)`` of the Hessian action (round-off for a correct H)."""
    p = np.asarray(p, dtype=float)
    space = getattr(J, "space", None) or SERIAL
    rng = np.random.default_rng(seed + (space.comm.rank if space.distributed else 0))
    v = rng.standard_normal(p.shape[0]) if v is None else np.asarray(v, dtype=float)
    w = rng.standard_normal(p.shape[0]) if w is None else np.asarray(w, dtype=float)
    a = space.dot(v, J.hessp(p, w))
    b = space.dot(w, J.hessp(p, v))
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


def finite_difference_gradient(J, p, h: float = 1e-6) -> np.ndarray:
    """Central differences (J(p + h e_k) - J(p - h e_k)) / 2h; 2m evaluations, for small m only.

    Warm starts are off meanwhile (:func:`independent_evaluations`), as in :func:`taylor_test`."""
    p = np.asarray(p, dtype=float)
    g = np.empty_like(p)
    with independent_evaluations(J):  # a warm-started solve would make J(p + e) depend on J(p - e)
        for k in range(p.size):  # one evaluation pair per parameter: a check, not a hot path
            e = np.zeros_like(p)
            e[k] = h
            g[k] = (J.value(p + e) - J.value(p - e)) / (2 * h)
    return g


@dataclass
class ResidualCheck:
    """Relative errors of a residual's derivatives against central differences (:func:`check_residual`)."""

    errors: dict
    tol: float

    @property
    def passed(self) -> bool:
        return all(e <= self.tol for e in self.errors.values() if e is not None)

    def table(self) -> str:
        rows = [f"{name:<28s} {'not given' if e is None else f'{e:.2e}'}"
                f"{'' if e is None or e <= self.tol else '   FAILED'}" for name, e in self.errors.items()]
        return "\n".join([f"derivative                   relative error (tolerance {self.tol:.0e})", *rows])


def check_residual(R, u, p, h: float = 1e-6, tol: float = 1e-5, seed: int = 0) -> ResidualCheck:
    """Compare the derivatives of a :class:`~adjopt.operators.ParametricResidual` with central differences of R.

    At (u, p), along seeded random directions du, dp and with a random w, checks

    * ``K du`` (the Jacobian) against (R(u + h du) - R(u - h du)) / 2h,
    * ``jvp``, (dR/dp) dp, against (R(p + h dp) - R(p - h dp)) / 2h,
    * ``vjp`` against ``jvp``: w^T (dR/dp dp) = dp^T (dR/dp)^T w,
    * ``second`` (when the residual has it) against central differences of K^T w and (dR/dp)^T w along
      (du, dp).

    The steps are ``h`` times ``max(1, |u|_inf)`` (resp. ``|p|_inf``) over the direction's largest entry. A correct
    residual shows errors of about h^2 (1e-10 to 1e-8 in practice); an error above ``tol`` means a derivative
    is not the derivative of R (a sign, a factor, a missing term). Returns a :class:`ResidualCheck`;
    ``result.passed``, ``result.table()``.
    """
    from .errors import MissingDerivativeError

    u = R.check_u(u).copy()
    p = R.check_p(p).copy()
    rng = np.random.default_rng(seed)
    du, dp, w = rng.standard_normal(R.n), rng.standard_normal(R.n_params), rng.standard_normal(R.n)
    hu = h * max(1.0, float(np.max(np.abs(u)))) / float(np.max(np.abs(du)))
    hp = h * max(1.0, float(np.max(np.abs(p)))) / float(np.max(np.abs(dp)))

    def rel(a, b):
        scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
        return float(np.linalg.norm(a - b)) / scale if scale > 0 else 0.0

    errors = {}
    K = R.jacobian(u, p)
    errors["jacobian K du"] = rel(K @ du, (R.residual(u + hu * du, p) - R.residual(u - hu * du, p)) / (2 * hu))
    jvp = R.jvp(u, p, dp)
    errors["jvp (dR/dp) dp"] = rel(jvp, (R.residual(u, p + hp * dp) - R.residual(u, p - hp * dp)) / (2 * hp))
    a, b = float(w @ jvp), float(dp @ R.vjp(u, p, w))
    errors["vjp against jvp"] = abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) > 0 else 0.0
    try:
        su, sp_ = R.second(u, p, w, du, dp)
    except MissingDerivativeError:
        errors["second: L_uu du + L_up dp"] = errors["second: L_pu du + L_pp dp"] = None
    else:
        t = min(hu / max(1.0, float(np.max(np.abs(u)))), hp / max(1.0, float(np.max(np.abs(p)))))
        plus, minus = (u + t * du, p + t * dp), (u - t * du, p - t * dp)
        fu = (R.jacobian(*plus).T @ w - R.jacobian(*minus).T @ w) / (2 * t)
        fp = (R.vjp(*plus, w) - R.vjp(*minus, w)) / (2 * t)
        errors["second: L_uu du + L_up dp"] = rel(su, fu)
        errors["second: L_pu du + L_pp dp"] = rel(sp_, fp)
    out = ResidualCheck(errors, tol)
    if not out.passed:
        logger.warning("check_residual: a derivative of the residual disagrees with finite differences:\n%s",
                       out.table())
    return out


def derivative_report(J, p) -> str:
    """J(p), ``|grad J(p)|``, Taylor tables of orders 2 and 3 and the solver counters, as text.

    What every gallery problem prints when run as a script.
    """
    lines = [
        f"J(p0)        = {J.value(p):.12g}",
        f"|grad J(p0)| = {np.linalg.norm(J.gradient(p)):.12g}",
        "",
        taylor_test(J, p, order=2).table(),
        "",
        taylor_test(J, p, order=3).table(),
    ]
    if hasattr(J, "stats"):
        lines += ["", f"solver: {J.stats}"]
    return "\n".join(lines)
