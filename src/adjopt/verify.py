"""Verification of derivatives: Taylor tests with automatic step ranges.

For a direction dp and step h the Taylor remainders are

    r1(h) = |J(p + h dp) - J(p)|                                     ~ h
    r2(h) = |J(p + h dp) - J(p) - h g.dp|                            ~ h^2
    r3(h) = |J(p + h dp) - J(p) - h g.dp - h^2/2 dp.H dp|            ~ h^3

and the observed rate between two steps is log(r(h1)/r(h2)) / log(h1/h2).

Fixed step ranges either start outside the asymptotic regime or run into
round-off. :func:`taylor_test` chooses its window instead: it halves h from a
scale-aware start until the remainder reaches round-off, and then uses the
last ``window`` steps (the smallest, so the most asymptotic) at which

* the expansion is asymptotic: r_k(h) <= 0.1 r_{k-1}(h) (the highest
  retained term dominates what it leaves), and
* the remainder is clearly above round-off: r_k(h) >= 100 sigma, where
  sigma is the round-off of J evaluations measured at this p (three steps
  of 1e-12 h0, where the true remainder is negligible, so that
  |J(p + delta dp) - J(p) - delta g.dp| is pure round-off; this includes
  the conditioning of the solves), and r_k(h) >= noise (|J(p)| + |J(p + h dp)|
  + the retained terms) with ``noise = 1e3 eps``.

If r_k is at round-off for every step, the expansion is exact to this order
(J is a polynomial of degree < k along dp) and the test passes as ``exact``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

EPS = np.finfo(float).eps


@dataclass
class TaylorResult:
    """Outcome of :func:`taylor_test`."""

    order: int
    steps: np.ndarray
    remainders: np.ndarray
    used: np.ndarray
    rates: np.ndarray
    rate: float
    exact: bool
    tol: float
    roundoff: float = 0.0

    @property
    def passed(self) -> bool:
        """True when the smallest rate in the window reaches ``order - tol`` (or the expansion is exact)."""
        return self.exact or (bool(np.isfinite(self.rate)) and self.rate >= self.order - self.tol)

    def table(self) -> str:
        """A plain-text table: step, remainder, rate, used."""
        lines = [f"Taylor test, order {self.order} (expected rate {self.order})",
                 f"{'h':>11} {'remainder':>12} {'rate':>7}  used"]
        prev = None
        for h, r, u in zip(self.steps, self.remainders, self.used):
            rate = "" if prev is None or prev[1] <= 0 or r <= 0 else f"{np.log(prev[1] / r) / np.log(prev[0] / h):7.3f}"
            lines.append(f"{h:11.4e} {r:12.4e} {rate:>7}  {'*' if u else ''}")
            prev = (h, r)
        verdict = "exact to this order (remainder at round-off)" if self.exact else f"observed rate {self.rate:.3f}"
        lines.append(f"{verdict} (round-off of J here: {self.roundoff:.1e}): {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)

    __str__ = table


def _default_direction(p: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(p.shape[0])


def taylor_test(J, p, dp=None, order: int = 2, h0: float | None = None, max_steps: int = 40,
                window: int = 5, tol: float = 0.1, seed: int = 0, noise: float = 1e3 * EPS) -> TaylorResult:
    """Taylor test of J at p along dp, for order 1 (value), 2 (gradient) or 3 (Hessian action).

    Parameters
    ----------
    J
        An object with ``value(p)``, and ``gradient(p)`` (order >= 2) and ``hessp(p, dp)`` (order 3).
    p, dp
        Point and direction; dp defaults to a seeded standard-normal vector.
    order
        1, 2 or 3.
    h0
        First step; default ``0.1 max(1, |p|_inf) / |dp|_inf``.
    max_steps
        At most this many evaluations of J (halvings of h).
    window
        Number of steps used for the rates (at least 3 are needed).
    tol
        Passes when the smallest observed rate in the window is >= ``order - tol``.
    noise
        Relative round-off level of J evaluations; remainders below it are not used.

    Returns
    -------
    TaylorResult
        Steps, remainders, the window used, the observed rates and ``passed``.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if window < 3:
        raise ValueError(f"window must be at least 3 (two rates), got {window}")
    p = np.asarray(p, dtype=float)
    dp = _default_direction(p, seed) if dp is None else np.asarray(dp, dtype=float)
    if dp.shape != p.shape:
        raise ValueError(f"dp has shape {dp.shape} but p has shape {p.shape}")
    dnorm = np.abs(dp).max()
    if dnorm == 0:
        raise ValueError("dp is zero; give a nonzero direction")
    J0 = J.value(p)
    gdp = float(np.dot(J.gradient(p), dp)) if order >= 2 else 0.0
    dHd = float(np.dot(dp, J.hessp(p, dp))) if order == 3 else 0.0
    h = 0.1 * max(1.0, np.abs(p).max()) / dnorm if h0 is None else float(h0)
    deltas = 1e-12 * h * np.array([1.0, 2.0, 3.0])
    sigma = max(abs(J.value(p + d * dp) - J0 - d * gdp) for d in deltas)

    steps, rems, ok = [], [], []
    below = 0
    for _ in range(max_steps):
        Jh = J.value(p + h * dp)
        terms = [J0, h * gdp, 0.5 * h * h * dHd][:order]
        partial = [Jh - sum(terms[: j + 1]) for j in range(order)]
        r = abs(partial[-1])
        r_prev = abs(partial[-2]) if order >= 2 else abs(J0) + abs(Jh)
        floor = max(noise * (abs(J0) + abs(Jh) + sum(abs(t) for t in terms[1:])), 100.0 * sigma)
        steps.append(h)
        rems.append(r)
        ok.append(r <= 0.1 * r_prev and r >= floor)
        below = below + 1 if r < floor else 0
        if below >= 2:
            break
        h *= 0.5

    steps, rems, ok = np.array(steps), np.array(rems), np.array(ok)
    used = np.zeros_like(ok)
    good = np.flatnonzero(ok)
    if good.size:
        last = good[-1]
        first = last
        while first - 1 >= 0 and ok[first - 1] and last - first + 1 < window:
            first -= 1
        used[first : last + 1] = True
    idx = np.flatnonzero(used)
    rates = np.log(rems[idx[:-1]] / rems[idx[1:]]) / np.log(steps[idx[:-1]] / steps[idx[1:]]) if idx.size >= 2 else np.array([])
    exact = good.size == 0 and below >= 2 and not np.any(ok)
    exact = exact and bool(np.all(rems <= 1e3 * max(noise * (abs(J0) + 1e-300), 100.0 * sigma) + 1e3 * noise * np.abs(steps * gdp)))
    rate = float(rates.min()) if rates.size >= 2 else float("nan")
    res = TaylorResult(order=order, steps=steps, remainders=rems, used=used, rates=rates, rate=rate, exact=exact,
                       tol=tol, roundoff=sigma)
    logger.debug("%s", res.table())
    return res


def check_hessian_symmetry(J, p, v=None, w=None, seed: int = 1) -> float:
    """Relative asymmetry |v.Hw - w.Hv| / max(|v.Hw|, |w.Hv|) of the Hessian action (round-off for a correct H)."""
    p = np.asarray(p, dtype=float)
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(p.shape[0]) if v is None else np.asarray(v, dtype=float)
    w = rng.standard_normal(p.shape[0]) if w is None else np.asarray(w, dtype=float)
    a = float(np.dot(v, J.hessp(p, w)))
    b = float(np.dot(w, J.hessp(p, v)))
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


def finite_difference_gradient(J, p, h: float = 1e-6) -> np.ndarray:
    """Central differences (J(p + h e_k) - J(p - h e_k)) / 2h; 2m evaluations, for small m only."""
    p = np.asarray(p, dtype=float)
    g = np.empty_like(p)
    for k in range(p.size):  # one evaluation pair per parameter: a check, not a hot path
        e = np.zeros_like(p)
        e[k] = h
        g[k] = (J.value(p + e) - J.value(p - e)) / (2 * h)
    return g


def derivative_report(J, p) -> str:
    """J(p), |grad J(p)|, Taylor tables of orders 2 and 3 and the solver counters, as text.

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
