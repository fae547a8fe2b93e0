"""Concrete parameter maps: exp, SIMP, density filter, Heaviside projection, nodal -> element."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import PatternError, ShapeError
from ..operators.coefficients import SIMP, Exp
from .base import ParameterMap


class _Entrywise(ParameterMap):
    """rho_i = phi(p_i): jvp = phi' dp, vjp = phi' g, second = phi'' g dp.

    phi comes from a :class:`~adjopt.operators.coefficients.Coefficient` (``self.phi``)
    or from the subclass's own ``_f``, ``_d1``, ``_d2``.
    """

    phi = None

    def __init__(self, n: int):
        self.n_in = self.n_out = int(n)

    def _f(self, p):
        return self.phi(p)

    def _d1(self, p):
        return self.phi.d1(p)

    def _d2(self, p):
        return self.phi.d2(p)

    def forward(self, p):
        return self._f(self.check_p(p))

    def jvp(self, p, dp):
        return self._d1(self.check_p(p)) * self.check_p(dp, "dp")

    def vjp(self, p, g):
        return self._d1(self.check_p(p)) * self.check_out(g)

    def second(self, p, g, dp):
        return self._d2(self.check_p(p)) * self.check_out(g) * self.check_p(dp, "dp")


class ExpMap(_Entrywise):
    """rho = exp(p), entrywise (the :class:`~adjopt.operators.Exp` coefficient as a map)."""

    phi = Exp()


class SIMPMap(_Entrywise):
    """rho = emin + p**q (e0 - emin), entrywise (the :class:`~adjopt.operators.SIMP` coefficient as a map)."""

    def __init__(self, n: int, q: float = 3.0, e0: float = 1.0, emin: float = 1e-9):
        super().__init__(n)
        self.phi = SIMP(q=q, e0=e0, emin=emin)


class HeavisideProjection(_Entrywise):
    """Smoothed Heaviside projection (Wang, Lazarov, Sigmund 2011):

        rho = (tanh(beta eta) + tanh(beta (p - eta))) / (tanh(beta eta) + tanh(beta (1 - eta)))
    """

    def __init__(self, n: int, beta: float = 1.0, eta: float = 0.5):
        super().__init__(n)
        if not beta > 0:
            raise ValueError(f"Heaviside projection needs beta > 0, got {beta}")
        if not 0 <= eta <= 1:
            raise ValueError(f"Heaviside projection needs 0 <= eta <= 1, got {eta}")
        self.beta, self.eta = float(beta), float(eta)
        self._den = np.tanh(beta * eta) + np.tanh(beta * (1 - eta))

    def _f(self, p):
        return (np.tanh(self.beta * self.eta) + np.tanh(self.beta * (p - self.eta))) / self._den

    def _d1(self, p):
        return self.beta / np.cosh(self.beta * (p - self.eta)) ** 2 / self._den

    def _d2(self, p):
        t = np.tanh(self.beta * (p - self.eta))
        return -2.0 * self.beta**2 * t * (1 - t * t) / self._den


class _Linear(ParameterMap):
    """rho = L p for a sparse matrix L built once."""

    affine = True

    def __init__(self, L):
        self.L = sp.csr_array(L, dtype=np.float64, copy=True)
        self._LT = self.L.T.tocsr()
        self.n_out, self.n_in = self.L.shape

    def forward(self, p):
        return self.L @ self.check_p(p)

    def jvp(self, p, dp):
        return self.L @ self.check_p(dp, "dp")

    def vjp(self, p, g):
        return self._LT @ self.check_out(g)


class DensityFilter(_Linear):
    """Cone-weighted linear density filter (Bruns & Tortorelli 2001; Bourdin 2001):

        rho_e = sum_i w_ei v_i p_i / sum_i w_ei v_i,    w_ei = max(0, r - |x_e - x_i|)

    Parameters
    ----------
    centers
        (E, dim) element centres.
    radius
        Filter radius r (same units as the centres).
    volumes
        Optional (E,) element volumes (default: equal weights).
    """

    def __init__(self, centers, radius: float, volumes=None):
        from scipy.spatial import cKDTree

        centers = np.asarray(centers, dtype=np.float64)
        if centers.ndim != 2:
            raise ShapeError(f"centers must be an (E, dim) array, got shape {centers.shape}")
        if not radius > 0:
            raise ValueError(f"filter radius must be positive, got {radius}")
        tree = cKDTree(centers)
        D = tree.sparse_distance_matrix(tree, radius, output_type="coo_matrix")
        off = D.row != D.col  # the self-distance 0 may or may not be stored: add it once below
        W = sp.coo_array((radius - D.data[off], (D.row[off], D.col[off])), shape=(len(centers),) * 2).tocsr()
        W = W + sp.eye_array(len(centers)) * radius
        if volumes is not None:
            volumes = np.asarray(volumes, dtype=np.float64)
            if volumes.shape != (len(centers),):
                raise ShapeError(f"volumes must have length {len(centers)}, got shape {volumes.shape}")
            W = W @ sp.diags_array(volumes)
        W = sp.diags_array(1.0 / np.asarray(W.sum(axis=1)).ravel()) @ W
        super().__init__(W)
        self.radius = float(radius)


class NodalToElement(_Linear):
    """A nodal field to one value per element: the mean of its nodes (``mode="average"``),
    or that mean times the element volume (``mode="integrate"``, exact for P1 fields).
    """

    def __init__(self, cells, n_nodes: int | None = None, mode: str = "average", volumes=None):
        cells = np.asarray(cells)
        if cells.ndim != 2:
            raise PatternError(f"cells must be an (E, k) array, got shape {cells.shape}")
        n_elem, k = cells.shape
        n_nodes = int(cells.max()) + 1 if n_nodes is None else int(n_nodes)
        weights = np.full(n_elem, 1.0 / k)
        if mode == "integrate":
            if volumes is None:
                raise ValueError("mode='integrate' needs the element volumes")
            weights = weights * np.asarray(volumes, dtype=np.float64)
        elif mode != "average":
            raise ValueError(f"unknown mode {mode!r}; use 'average' or 'integrate'")
        rows = np.repeat(np.arange(n_elem), k)
        L = sp.coo_array((np.repeat(weights, k), (rows, cells.ravel())), shape=(n_elem, n_nodes))
        super().__init__(L)
