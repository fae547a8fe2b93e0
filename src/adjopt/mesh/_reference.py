"""Reference elements: vertex tables, facets, shape functions, Gauss rules.

Shared by :mod:`adjopt.mesh` (volumes, Jacobian checks) and :mod:`adjopt.fem`
(element kernels). Vertex orders follow VTK / meshio.

Reference cells
---------------
* ``triangle``: vertices (0,0), (1,0), (0,1); ``tetra``: 0, e1, e2, e3.
  Shape functions ``N = [1 - sum(xi), xi_1, ..., xi_d]``.
* ``quad``: [-1, 1]^2 with vertices (-1,-1), (1,-1), (1,1), (-1,1);
  ``hexahedron``: [-1, 1]^3, the quad at zeta=-1 then at zeta=+1.
  Shape functions ``N_a = prod_i (1 + xi_a,i xi_i) / 2^d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .._threads import threads_for


@dataclass(frozen=True)
class CellInfo:
    """Static description of a supported cell type."""

    name: str
    dim: int
    n_vertices: int
    simplex: bool
    facet_type: str
    facets: np.ndarray  # (n_facets, n_facet_vertices), outward oriented for positive cells
    vertices: np.ndarray  # reference coordinates, (n_vertices, dim)
    ref_volume: float
    flip: np.ndarray  # vertex permutation that reverses orientation


_QUAD_V = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
_HEX_V = np.array(
    [[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]],
    dtype=np.float64,
)

CELLS: dict[str, CellInfo] = {
    "triangle": CellInfo(
        "triangle", 2, 3, True, "line",
        np.array([[0, 1], [1, 2], [2, 0]]),
        np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 0.5,
        np.array([0, 2, 1]),
    ),
    "quad": CellInfo(
        "quad", 2, 4, False, "line",
        np.array([[0, 1], [1, 2], [2, 3], [3, 0]]),
        _QUAD_V, 4.0,
        np.array([0, 3, 2, 1]),
    ),
    "tetra": CellInfo(
        "tetra", 3, 4, True, "triangle",
        np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]),
        np.vstack([np.zeros(3), np.eye(3)]), 1.0 / 6.0,
        np.array([0, 2, 1, 3]),
    ),
    "hexahedron": CellInfo(
        "hexahedron", 3, 8, False, "quad",
        np.array([[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [1, 2, 6, 5], [2, 3, 7, 6], [3, 0, 4, 7]]),
        _HEX_V, 8.0,
        np.array([0, 3, 2, 1, 4, 7, 6, 5]),
    ),
}

SUPPORTED = tuple(CELLS)


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre points and weights on [-1, 1] (exact for degree 2n-1)."""
    x, w = np.polynomial.legendre.leggauss(int(n))
    return x.astype(np.float64), w.astype(np.float64)


def tensor_gauss(dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tensor Gauss rule on [-1, 1]^dim with ``n`` points per direction.

    Returns points (n**dim, dim), first coordinate fastest, and weights
    ``w = prod_i w_{j_i}`` (summing to 2**dim).
    """
    x, w = gauss_legendre(n)
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    wgrids = np.meshgrid(*([w] * dim), indexing="ij")
    # first coordinate fastest: reverse the axis order before flattening
    pts = np.stack([g.transpose().ravel() for g in grids], axis=1)
    wts = np.prod(np.stack([g.transpose().ravel() for g in wgrids], axis=1), axis=1)
    return np.ascontiguousarray(pts), np.ascontiguousarray(wts)


def shape_functions(cell_type: str, xi) -> tuple[np.ndarray, np.ndarray]:
    """Shape functions and their reference gradients at points ``xi``.

    Parameters
    ----------
    cell_type
        One of :data:`SUPPORTED`.
    xi
        (q, dim) reference coordinates.

    Returns
    -------
    N : (q, k) ndarray
        ``N[q, a]`` value of shape function ``a``.
    dN : (q, dim, k) ndarray
        ``dN[q, j, a] = dN_a / dxi_j``.
    """
    info = CELLS[cell_type]
    xi = np.atleast_2d(np.asarray(xi, dtype=np.float64))
    q, d = xi.shape
    k = info.n_vertices
    if info.simplex:
        N = np.empty((q, k))
        N[:, 0] = 1.0 - xi.sum(axis=1)
        N[:, 1:] = xi
        dn = np.zeros((q, d, k))
        dn[:, :, 0] = -1.0
        dn[:, np.arange(d), np.arange(1, k)] = 1.0
        return N, dn
    v = info.vertices  # (k, d)
    fac = 1.0 + xi[:, None, :] * v[None, :, :]  # (q, k, d): 1 + xi_a,i xi_i
    scale = 0.5**d
    N = scale * np.prod(fac, axis=2)
    dn = np.empty((q, d, k))
    for j in range(d):  # loop over the (2 or 3) reference directions only
        others = np.delete(fac, j, axis=2)
        dn[:, j, :] = scale * v[None, :, j] * np.prod(others, axis=2)
    return N, dn


def jacobians(points: np.ndarray, cells: np.ndarray, dn: np.ndarray) -> np.ndarray:
    """Jacobian matrices ``J[e, q, i, j] = sum_a x[cells[e, a], i] dN[q, j, a]``."""
    xe = points[cells]  # (E, k, dim)
    return np.einsum("eai,qja->eqij", xe, dn, optimize=True)


@numba.njit(parallel=True, cache=True)
def _jacobian_dets(points, cells, dn, out):
    """out[e, q] = det J[e, q] with J[e, q, i, j] = sum_a x[cells[e, a], i] dN[q, j, a] (sums in the order
    of a, d*d of them side by side), determinants in closed form; 2D or 3D."""
    n_elem, k = cells.shape
    nq, d = dn.shape[0], dn.shape[1]
    nchunks = min(n_elem, 64)
    for ch in numba.prange(nchunks):
        xe = np.zeros((3, k))
        for e in range(ch * n_elem // nchunks, (ch + 1) * n_elem // nchunks):
            for a in range(k):
                for i in range(d):
                    xe[i, a] = points[cells[e, a], i]
            for q in range(nq):
                if d == 2:
                    j00 = j01 = j10 = j11 = 0.0
                    for a in range(k):
                        x0, x1 = xe[0, a], xe[1, a]
                        g0, g1 = dn[q, 0, a], dn[q, 1, a]
                        j00 += x0 * g0
                        j01 += x0 * g1
                        j10 += x1 * g0
                        j11 += x1 * g1
                    out[e, q] = j00 * j11 - j01 * j10
                else:
                    j00 = j01 = j02 = j10 = j11 = j12 = j20 = j21 = j22 = 0.0
                    for a in range(k):
                        x0, x1, x2 = xe[0, a], xe[1, a], xe[2, a]
                        g0, g1, g2 = dn[q, 0, a], dn[q, 1, a], dn[q, 2, a]
                        j00 += x0 * g0
                        j01 += x0 * g1
                        j02 += x0 * g2
                        j10 += x1 * g0
                        j11 += x1 * g1
                        j12 += x1 * g2
                        j20 += x2 * g0
                        j21 += x2 * g1
                        j22 += x2 * g2
                    out[e, q] = (j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20)
                                 + j02 * (j10 * j21 - j11 * j20))


@numba.njit(parallel=True, cache=True)
def _vertex_means(points, cells, out):
    """out[e] = (x[cells[e, 0]] + x[cells[e, 1]] + ...) / k, the sum in vertex order (numpy's mean over axis 1)."""
    n_elem, k = cells.shape
    d = points.shape[1]
    for e in numba.prange(n_elem):
        for i in range(d):
            out[e, i] = points[cells[e, 0], i]
        for a in range(1, k):
            for i in range(d):
                out[e, i] += points[cells[e, a], i]
        for i in range(d):
            out[e, i] /= k


def vertex_means(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``points[cells].mean(axis=1)``, shape (E, dim), the same numbers without the (E, k, dim) gather."""
    points = np.ascontiguousarray(points, dtype=np.float64)
    cells = np.ascontiguousarray(cells)
    out = np.empty((cells.shape[0], points.shape[1]))
    with threads_for(cells.size * points.shape[1]):
        _vertex_means(points, cells, out)
    return out


def jacobian_determinants(points: np.ndarray, cells: np.ndarray, dn: np.ndarray) -> np.ndarray:
    """``det J[e, q]`` of :func:`jacobians`, shape (E, q), without forming the (E, q, d, d) Jacobians.

    One pass over the cells (numba, parallel), 3 x 3 / 2 x 2 determinants in closed form: equal to
    ``np.linalg.det(jacobians(points, cells, dn))`` up to round-off (LU there, cofactors here).
    """
    points = np.ascontiguousarray(points, dtype=np.float64)
    cells = np.ascontiguousarray(cells)
    dn = np.ascontiguousarray(dn, dtype=np.float64)
    if points.shape[1] not in (2, 3) or dn.shape[1] != points.shape[1] or dn.shape[2] != cells.shape[1]:
        raise ValueError(f"jacobian_determinants: points {points.shape}, cells {cells.shape} and dN {dn.shape} "
                         "do not match (2D or 3D cells)")
    out = np.empty((cells.shape[0], dn.shape[0]))
    with threads_for(cells.shape[0] * dn.shape[0] * cells.shape[1] * dn.shape[1] ** 2):
        _jacobian_dets(points, cells, dn, out)
    return out
