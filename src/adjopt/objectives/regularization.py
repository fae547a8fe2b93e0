"""Objectives of the parameter alone: regularization and volume.

They depend on p only (all u-derivatives vanish), so they can be added to a
state objective (``SquaredMisfit(...) + 1e-3 * TikhonovH1(K)``) or used on
their own as constraint functionals through :class:`ParameterFunctional`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._threads import dot
from .._validate import as_parameter, check_symmetric, owned, owned_operator
from ..errors import ShapeError
from .base import _U_DERIVATIVES, Objective, _inherited


def _as_operator(M, n: int | None, name: str):
    """A sparse matrix, a vector (diagonal) or None (identity) as a callable v -> M v."""
    if M is None:
        return None, n
    if sp.issparse(M) or np.ndim(M) == 2:
        M = owned_operator(sp.csr_array(M) if not sp.issparse(M) else M, name)
        if M.shape[0] != M.shape[1]:
            raise ShapeError(f"{name} must be square, got shape {M.shape}")
        check_symmetric(M, name, "the penalty 0.5 p^T M p has the gradient M p only for a symmetric M (a "
                                 "triangle of a symmetric matrix is not enough)")
        return M, M.shape[0]
    M = owned(M, name)
    if M.ndim != 1:
        raise ShapeError(f"{name} must be a matrix or a vector of weights, got shape {M.shape}")
    return M, M.shape[0]


class ParameterObjective(Objective):
    """Base of objectives g(p) without u: implement ``value_p``, ``grad_pp`` and ``hess_pp_p``."""

    depends_on_p = True
    n: int | None = None

    def zero_derivative(self, name: str) -> bool:
        if name in _U_DERIVATIVES:  # no u: zero unless a subclass overrides it
            return _inherited(self, name, ParameterObjective)
        return super().zero_derivative(name)

    def _check(self, p):
        p = np.asarray(p, dtype=np.float64)
        if self.n is not None and p.shape != (self.n,):
            raise ShapeError(f"{type(self).__name__} acts on vectors of length {self.n}, got shape {p.shape}")
        return p

    def value(self, u, p):
        return self.value_p(self._check(p))

    def grad_u(self, u, p):
        return np.zeros_like(u)

    def grad_p(self, u, p):
        return self.gradient_p(self._check(p))

    def hess_uu(self, u, p, du):
        return np.zeros_like(du)

    def hess_up(self, u, p, dp):
        return np.zeros_like(u)

    def hess_pu(self, u, p, du):
        return np.zeros(np.shape(p)[0])

    def hess_pp(self, u, p, dp):
        return self.hessp_p(self._check(p), np.asarray(dp, dtype=np.float64))


class _Quadratic(ParameterObjective):
    """0.5 (p - p_ref)^T M (p - p_ref) with M a matrix, a weight vector or the identity.

    The value computes M (p - p_ref), which is the gradient at that p: it is kept, with a copy of p, for the
    next :meth:`gradient_p` (value then gradient at one point is what a reduced functional and an optimizer
    do), which hands it over if its p equals the kept one entry for entry, and computes it otherwise. A sparse
    M of a nodal field costs a product over all its nonzeros (1.8 ms for the 1.8M of a P1 stiffness matrix
    at 263k nodes); the check and the copy cost a pass over p each.
    """

    def __init__(self, M=None, p_ref=None, n: int | None = None):
        self.M, self.n = _as_operator(M, n, "M")
        self.p_ref = None if p_ref is None else owned(p_ref, "p_ref")
        if self.p_ref is not None and self.n is not None and self.p_ref.shape not in ((), (self.n,)):
            raise ShapeError(f"p_ref must be a scalar or have length {self.n}, got shape {self.p_ref.shape}")
        #: (copy of p, M, p_ref, M (p - p_ref)) of the last value, for one gradient at the same p
        self._kept = None

    def _apply(self, v):
        """M v as a new array (never v itself: the caller may write into what a gradient returns)."""
        if self.M is None:
            return np.array(v, dtype=np.float64, copy=True)
        return self.M * v if isinstance(self.M, np.ndarray) else self.M @ v

    def _d(self, p):
        if self.p_ref is None:
            return p
        if self.p_ref.ndim and self.p_ref.shape != np.shape(p):
            raise ShapeError(f"p_ref has length {self.p_ref.shape[0]} but p has length {np.shape(p)[0]}")
        return p - self.p_ref

    def value_p(self, p):
        d = self._d(p)
        md = self._apply(d)
        self._kept = (np.array(p, dtype=np.float64, copy=True), self.M, self.p_ref, md)
        # dot(): einsum, not d @ md, whose BLAS ddot wakes numpy's OpenBLAS threads (see adjopt._threads)
        return 0.5 * dot(d, md)

    def gradient_p(self, p):
        kept, self._kept = self._kept, None  # handed over once: the caller owns (and may write into) it
        if (kept is not None and kept[1] is self.M and kept[2] is self.p_ref and kept[0].shape == np.shape(p)
                and np.array_equal(kept[0], p)):
            return kept[3]
        return self._apply(self._d(p))

    def hessp_p(self, p, dp):
        return self._apply(dp)

    def hess_pp_block(self, u, p, dP):
        """M dP for the (m, k) block dP in one product."""
        self._check(p)
        dP = np.asarray(dP, dtype=np.float64)
        if isinstance(self.M, np.ndarray):  # weights, one per entry of p
            return self.M[:, None] * dP
        return self._apply(dP)


class TikhonovL2(_Quadratic):
    """R(p) = 0.5 ||p - p_ref||_M^2 with M the (consistent or lumped) mass matrix.

    Parameters
    ----------
    M
        Mass matrix (sparse), lumped masses (vector) or None (Euclidean).
    p_ref
        Reference value (scalar or vector); default 0.
    """

    def __repr__(self):
        return "TikhonovL2()"


class TikhonovH1(_Quadratic):
    """R(p) = 0.5 (p - p_ref)^T K (p - p_ref) = 0.5 ``int |grad p|^2`` with K the stiffness matrix.

    Add ``delta * TikhonovL2(M)`` for the full H1 norm (K alone has the
    constants in its kernel).
    """

    def __init__(self, K, p_ref=None):
        if K is None:
            raise ValueError("TikhonovH1 needs the stiffness matrix K (e.g. adjopt.fem.p1_stiffness assembled)")
        super().__init__(K, p_ref)

    def __repr__(self):
        return "TikhonovH1()"


class TotalVariation(ParameterObjective):
    """Smoothed total variation ``TV(p) = sum_e a_e sqrt(|G_e p|^2 + eps^2)``.

    G maps nodal values to the (constant) gradient of a P1 field on each
    element: rows ``e*dim + d``. With ``s_e = sqrt(|g_e|^2 + eps^2)``, g_e = G_e p::

        grad = G^T [a_e g_e / s_e],   H dp = G^T [a_e (dg_e / s_e - g_e (g_e . dg_e) / s_e^3)]

    Parameters
    ----------
    G
        (E*dim, N) sparse gradient operator.
    areas
        (E,) element areas/volumes.
    eps
        Smoothing; the smaller, the closer to TV and the stiffer the Hessian.
    """

    def __init__(self, G, areas, eps: float = 1e-3):
        self.G = sp.csr_array(G, dtype=np.float64, copy=True)
        self.areas = owned(areas, "areas")
        E = self.areas.shape[0]
        if self.G.shape[0] % max(E, 1) != 0 or E == 0:
            raise ShapeError(f"G has {self.G.shape[0]} rows, which is not dim x {E} elements")
        self.dim = self.G.shape[0] // E
        self.n = self.G.shape[1]
        if not eps > 0:
            raise ValueError(f"TotalVariation needs eps > 0 (smoothing), got {eps}")
        self.eps = float(eps)

    def _g(self, p):
        g = (self.G @ p).reshape(-1, self.dim)
        return g, np.sqrt(np.einsum("ed,ed->e", g, g) + self.eps**2)

    def value_p(self, p):
        g, s = self._g(p)
        return dot(self.areas, s)  # not areas @ s: a BLAS ddot (see adjopt._threads)

    def gradient_p(self, p):
        g, s = self._g(p)
        return self.G.T @ ((self.areas / s)[:, None] * g).ravel()

    def hessp_p(self, p, dp):
        g, s = self._g(p)
        dg = (self.G @ dp).reshape(-1, self.dim)
        gdg = np.einsum("ed,ed->e", g, dg)
        out = (self.areas / s)[:, None] * dg - (self.areas * gdg / s**3)[:, None] * g
        return self.G.T @ out.ravel()

    def __repr__(self):
        return f"TotalVariation(eps={self.eps:g})"


class Volume(ParameterObjective):
    """V(p) = sum_e v_e rho_e / sum_e v_e, rho = M(p) (a parameter map, default identity).

    The volume fraction of a design, for volume constraints V(p) <= f.
    """

    def __init__(self, volumes, parameter_map=None):
        self.volumes = owned(volumes, "volumes")
        if self.volumes.ndim != 1:
            raise ShapeError(f"volumes must be a vector, got shape {self.volumes.shape}")
        self.map = parameter_map
        if parameter_map is not None and parameter_map.n_out != self.volumes.shape[0]:
            raise ShapeError(f"the map gives {parameter_map.n_out} values but there are {self.volumes.shape[0]} volumes")
        self.n = self.volumes.shape[0] if parameter_map is None else parameter_map.n_in
        self.w = self.volumes / self.volumes.sum()
        # an affine map rho = H p + c gives V(p) = (H^T w)^T p + w^T c: one dot product per value, no map
        # application (OC evaluates the volume about 40 times per iteration in its bisection)
        self._v = self._c = None
        if parameter_map is not None and parameter_map.affine:
            zero = np.zeros(self.n)
            self._v = np.asarray(parameter_map.vjp(zero, self.w), dtype=np.float64)
            self._c = float((self.w * parameter_map.forward(zero)).sum())

    def value_p(self, p):
        # (a * b).sum(): numpy's pairwise sum, not a BLAS dot (which may start threads for every call)
        if self._v is not None:
            return float((self._v * p).sum()) + self._c
        rho = p if self.map is None else self.map.forward(p)
        return float((self.w * rho).sum())

    def gradient_p(self, p):
        return self.w.copy() if self.map is None else self.map.vjp(p, self.w)

    def hessp_p(self, p, dp):
        if self.map is None or self.map.affine:
            return np.zeros_like(dp)
        return self.map.second(p, self.w, dp)

    def __repr__(self):
        return "Volume()"


class ParameterFunctional:
    """g(p) of a :class:`ParameterObjective` with the functional interface (value, gradient, hessp).

    Use it for constraints (``Volume``) and to Taylor-test a regularization on its own.
    """

    def forget(self) -> None:
        """Nothing to drop: a parameter functional caches no states (a continuation may call it)."""

    def __init__(self, term: ParameterObjective, n_params: int | None = None):
        self.term = term
        n = term.n if n_params is None else n_params
        if n is None:
            raise ValueError("give n_params: this term does not know its length")
        self.n_params = int(n)

    def _p(self, p):
        return as_parameter(p, self.n_params)

    def value(self, p) -> float:
        return float(self.term.value_p(self._p(p)))

    def gradient(self, p) -> np.ndarray:
        return self.term.gradient_p(self._p(p))

    def hessp(self, p, dp) -> np.ndarray:
        return self.term.hessp_p(self._p(p), as_parameter(dp, self.n_params, "dp"))

    __call__ = value
