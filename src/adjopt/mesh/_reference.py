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

import numpy as np


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
