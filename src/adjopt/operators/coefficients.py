"""Scalar coefficient maps phi(p) used by element-coefficient operators.

Each map acts entrywise and provides phi, phi' and phi''; ``affine`` tells the
operators that phi'' vanishes (so the second-order contraction C2 is zero).

The built-in maps also describe themselves to the numba kernels
(:meth:`Coefficient.kernel_spec`), which then evaluate phi, phi' or phi'' inside
the assembly and contraction loops (``_kernels.coef_eval``: the same operations
in the same order as the numpy methods here; an integer SIMP exponent up to 8
is applied by repeated products, within an ulp or two of ``pow``). A subclass
(or any other Coefficient) goes through its numpy methods.
"""

from __future__ import annotations

import numpy as np

from ..errors import MissingDerivativeError


class Coefficient:
    """Entrywise scalar map phi with first and second derivatives."""

    affine: bool = False

    def __call__(self, p: np.ndarray) -> np.ndarray:
        raise MissingDerivativeError(f"{type(self).__name__} does not implement __call__(p) (phi itself), which "
                                     "every assembly needs")

    def d1(self, p: np.ndarray) -> np.ndarray:
        """phi'(p), entrywise."""
        raise MissingDerivativeError(f"{type(self).__name__} does not implement d1(p) (phi'), which gradients need")

    def d2(self, p: np.ndarray) -> np.ndarray:
        """phi''(p), entrywise."""
        raise MissingDerivativeError(f"{type(self).__name__} does not implement d2(p) (phi''), which Hessian "
                                     "actions need; implement it, or set affine = True when phi'' = 0")

    def kernel_spec(self) -> tuple[int, int, float, float, float] | None:
        """(code, integer exponent or -1, q, e0, emin) for ``_kernels.coef_eval``, or None: evaluate by numpy.

        Only the exact built-in classes answer: a subclass may change the map."""
        return None


class Identity(Coefficient):
    """phi(p) = p."""

    affine = True

    def __call__(self, p):
        return p

    def d1(self, p):
        return np.ones_like(p)

    def d2(self, p):
        return np.zeros_like(p)

    def kernel_spec(self):
        return (0, -1, 1.0, 1.0, 0.0) if type(self) is Identity else None

    def __repr__(self):
        return "Identity()"


class Exp(Coefficient):
    """phi(p) = exp(p): a log-parametrised positive coefficient (e.g. conductivity)."""

    def __call__(self, p):
        # an overflow (p > 709) gives inf, which the solver refuses with a clear error; no RuntimeWarning
        with np.errstate(over="ignore"):
            return np.exp(p)

    d1 = __call__
    d2 = __call__

    def kernel_spec(self):
        return (1, -1, 1.0, 1.0, 0.0) if type(self) is Exp else None

    def __repr__(self):
        return "Exp()"


class SIMP(Coefficient):
    """phi(p) = emin + p**q (e0 - emin), the SIMP interpolation of topology optimization.

    Parameters
    ----------
    q
        Penalization exponent (3 is the classic choice).
    e0, emin
        Stiffness of solid and of void material; ``emin > 0`` keeps A regular.
    """

    def __init__(self, q: float = 3.0, e0: float = 1.0, emin: float = 1e-9):
        if not q >= 1:
            raise ValueError(f"SIMP exponent q must be >= 1, got {q}")
        if not 0 <= emin < e0:
            raise ValueError(f"SIMP needs 0 <= emin < e0, got emin={emin}, e0={e0}")
        self.q, self.e0, self.emin = float(q), float(e0), float(emin)

    def __call__(self, p):
        return self.emin + p**self.q * (self.e0 - self.emin)

    def d1(self, p):
        return self.q * p ** (self.q - 1) * (self.e0 - self.emin)

    def d2(self, p):
        return self.q * (self.q - 1) * p ** (self.q - 2) * (self.e0 - self.emin)

    def kernel_spec(self):
        if type(self) is not SIMP:
            return None
        iq = int(self.q) if self.q.is_integer() and self.q <= 8 else -1
        return (2, iq, self.q, self.e0, self.emin)

    def __repr__(self):
        return f"SIMP(q={self.q}, e0={self.e0}, emin={self.emin})"


_BY_NAME = {"identity": Identity, "exp": Exp, "simp": SIMP}


def as_coefficient(c) -> Coefficient:
    """Accept a :class:`Coefficient` or one of the names 'identity', 'exp', 'simp'."""
    if c is None:
        return Identity()
    if isinstance(c, Coefficient):
        return c
    if isinstance(c, str) and c.lower() in _BY_NAME:
        return _BY_NAME[c.lower()]()
    raise ValueError(f"unknown coefficient {c!r}; use one of {sorted(_BY_NAME)} or a Coefficient instance")
