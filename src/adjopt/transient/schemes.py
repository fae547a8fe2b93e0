"""Time grids and the linear multistep schemes that march M du/dt + A u = b(t) on them.

Every step n = 1..N of every scheme is one equation of the same form,

    F_n = sum_j (alpha_nj M + gamma_nj A) u_{n-j} - sum_j gamma_nj b(t_{n-j}) = 0,    j = 0..s_n,

with the coefficients (gamma already multiplied by the step size dt_n):

    theta           alpha = (1, -1),  gamma = (theta dt_n, (1 - theta) dt_n)
                    (implicit Euler: theta = 1; Crank-Nicolson: theta = 1/2)
    BDF2, n >= 2    alpha = ((1 + 2w)/(1 + w), -(1 + w), w^2/(1 + w)),  gamma = (dt_n, 0, 0),  w = dt_n / dt_{n-1}
    BDF2, n = 1     implicit Euler: its local error O(dt^2) keeps the global error O(dt^2), and it is L-stable

The step matrix S_n = alpha_n0 M + gamma_n0 A is the same for every step with the same (alpha_n0, gamma_n0):
one factorization per distinct pair serves the whole forward march, the adjoint march and every Hessian
action (with a constant step: one for the theta scheme, two for BDF2).
"""

from __future__ import annotations

import numbers

import numpy as np

from .._validate import refuse_complex
from ..errors import NonFiniteError

SCHEMES = ("implicit_euler", "crank_nicolson", "theta", "bdf2")


def _positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise NonFiniteError(f"{name} must be finite, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


class TimeStepping:
    """A time grid t_0 < t_1 < ... < t_N and the scheme that steps on it.

    Parameters
    ----------
    scheme
        ``"crank_nicolson"`` (default), ``"implicit_euler"``, ``"theta"`` (with ``theta``) or ``"bdf2"``.
    dt, n_steps
        A constant step: N = ``n_steps`` steps of size ``dt``.
    steps
        Prescribed step sizes instead (a sequence of N positive numbers); ``dt`` and ``n_steps`` must then
        be left out. Each distinct step matrix is factorized once.
    theta
        The theta of ``scheme="theta"``, in [0, 1] (0: explicit Euler, which still solves with M).
    t0
        The initial time.

    Attributes
    ----------
    times
        (N + 1,) the time levels; level 0 is the initial condition.
    order
        The scheme's order of accuracy in time (1 or 2).
    """

    def __init__(self, scheme: str = "crank_nicolson", dt=None, n_steps=None, steps=None, theta=None, t0=0.0):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        if steps is not None:
            if dt is not None or n_steps is not None:
                raise ValueError("give either steps (the step sizes) or dt and n_steps, not both")
            refuse_complex(steps, "steps")
            if np.ndim(steps) != 1:
                raise ValueError(f"steps must be a sequence of step sizes, got an array of shape {np.shape(steps)}")
            sizes = np.array(steps, dtype=np.float64, copy=True)
            if sizes.size == 0:
                raise ValueError("steps must hold at least one step size")
            if not np.all(np.isfinite(sizes)):
                raise NonFiniteError("steps contains NaN or Inf; every step size must be a positive number")
            if np.any(sizes <= 0):
                raise ValueError(f"every step size must be positive; steps[{int(np.argmin(sizes))}] = {sizes.min()!r}")
        else:
            if dt is None or n_steps is None:
                raise ValueError("give dt and n_steps (a constant step), or steps (the step sizes)")
            dt = _positive_float(dt, "dt")
            if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
                raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
            sizes = np.full(int(n_steps), dt)
        if scheme == "theta":
            if theta is None:
                raise ValueError('scheme="theta" needs theta in [0, 1] (1: implicit Euler, 0.5: Crank-Nicolson)')
            if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0.0 <= float(theta) <= 1.0:
                raise ValueError(f"theta must be a number in [0, 1], got {theta!r}")
            theta = float(theta)
        elif theta is not None:
            raise ValueError(f'theta is an option of scheme="theta", not of scheme={scheme!r}')
        else:
            theta = {"implicit_euler": 1.0, "crank_nicolson": 0.5}.get(scheme)
        if isinstance(t0, bool) or not isinstance(t0, numbers.Real) or not np.isfinite(t0):
            raise ValueError(f"t0 must be a finite number, got {t0!r}")
        sizes.flags.writeable = False
        self.scheme = scheme
        self.theta = theta
        self.dt = sizes
        self.n_steps = int(sizes.size)
        self.times = np.concatenate([[float(t0)], float(t0) + np.cumsum(sizes)])
        self.times.flags.writeable = False
        self.order = 2 if scheme == "bdf2" or theta == 0.5 else 1
        self._alpha: list = [None]
        self._gamma: list = [None]
        for n in range(1, self.n_steps + 1):
            h = float(sizes[n - 1])
            if scheme == "bdf2" and n >= 2:
                w = h / float(sizes[n - 2])
                a = ((1 + 2 * w) / (1 + w), -(1 + w), w * w / (1 + w))
                g = (h, 0.0, 0.0)
            elif scheme == "bdf2":
                a, g = (1.0, -1.0), (h, 0.0)
            else:
                a, g = (1.0, -1.0), (theta * h, (1.0 - theta) * h)
            self._alpha.append(a)
            self._gamma.append(g)

    @property
    def history(self) -> int:
        """s: how many earlier levels a step reads (1 for the theta scheme, 2 for BDF2)."""
        return max(len(a) for a in self._alpha[1:]) - 1

    def coefficients(self, n: int) -> tuple[tuple, tuple]:
        """(alpha_n, gamma_n) of step n (1..N): F_n = sum_j (alpha_nj M + gamma_nj A) u_{n-j} - gamma_nj b_{n-j}."""
        return self._alpha[n], self._gamma[n]

    def level(self, t, tol: float = 1e-9) -> int:
        """The index of the time level at time t (within tol times the step), or ``ValueError``."""
        k = int(np.argmin(np.abs(self.times - float(t))))
        scale = float(self.dt[max(k - 1, 0)])
        if abs(self.times[k] - float(t)) > tol * scale:
            raise ValueError(f"t = {float(t)!r} is not a time level of this grid (nearest: t_{k} = {float(self.times[k])!r})")
        return k

    def __repr__(self):
        extra = f", theta={self.theta}" if self.scheme == "theta" else ""
        return (f"TimeStepping(scheme={self.scheme!r}{extra}, n_steps={self.n_steps}, "
                f"t=[{self.times[0]:g}, {self.times[-1]:g}])")
