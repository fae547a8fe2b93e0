"""Quadrature rules on the reference cells of :mod:`adjopt.mesh`.

* quads / hexes on [-1, 1]^d: tensor Gauss-Legendre, ``n = ceil((p + 1) / 2)``
  points per direction for degree ``p``.
* triangle (0,0),(1,0),(0,1) and unit tetrahedron: the centroid rule for
  ``p <= 1``, the classical interior rules for ``p = 2``, and collapsed
  (Duffy) Gauss rules above: for the triangle
  ``x = u, y = v (1 - u)``, ``dx dy = (1 - u) du dv``, for the tetrahedron
  ``x = u, y = v (1 - u), z = s (1 - u)(1 - v)``,
  ``dV = (1 - u)^2 (1 - v) du dv ds`` on the unit cube, with enough Gauss
  points to integrate the transformed polynomial exactly.
"""

from __future__ import annotations

import numpy as np

from ..mesh._reference import CELLS, gauss_legendre, shape_functions, tensor_gauss
from ._errors import FemError

__all__ = ["cell_rule", "gauss_legendre", "shape_functions", "tensor_gauss", "tetra_rule", "triangle_rule"]


def _degree(degree) -> int:
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise FemError(f"quadrature degree must be an integer >= 0, got {degree!r}")
    return int(degree)


def _unit_gauss(n):
    x, w = gauss_legendre(n)
    return 0.5 * (x + 1.0), 0.5 * w


def triangle_rule(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (q, 2) and weights (q,) exact for polynomials of ``degree`` on the reference triangle.

    Weights sum to the area 1/2.
    """
    p = _degree(degree)
    if p <= 1:
        return np.array([[1.0 / 3.0, 1.0 / 3.0]]), np.array([0.5])
    if p == 2:
        pts = np.array([[1 / 6, 1 / 6], [2 / 3, 1 / 6], [1 / 6, 2 / 3]])
        return pts, np.full(3, 1.0 / 6.0)
    u, wu = _unit_gauss(-(-(p + 2) // 2))
    v, wv = _unit_gauss(-(-(p + 1) // 2))
    U, vv = np.meshgrid(u, v, indexing="ij")
    W = np.outer(wu, wv) * (1.0 - U)
    pts = np.column_stack([U.ravel(), (vv * (1.0 - U)).ravel()])
    return pts, W.ravel()


def tetra_rule(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (q, 3) and weights (q,) exact for polynomials of ``degree`` on the reference tetrahedron.

    Weights sum to the volume 1/6.
    """
    p = _degree(degree)
    if p <= 1:
        return np.full((1, 3), 0.25), np.array([1.0 / 6.0])
    if p == 2:
        a, b = 0.5854101966249685, 0.1381966011250105
        pts = np.array([[b, b, b], [a, b, b], [b, a, b], [b, b, a]])
        return pts, np.full(4, 1.0 / 24.0)
    u, wu = _unit_gauss(-(-(p + 3) // 2))
    v, wv = _unit_gauss(-(-(p + 2) // 2))
    s, ws = _unit_gauss(-(-(p + 1) // 2))
    U, vv, ss = np.meshgrid(u, v, s, indexing="ij")
    W = wu[:, None, None] * wv[None, :, None] * ws[None, None, :] * (1.0 - U) ** 2 * (1.0 - vv)
    pts = np.column_stack([U.ravel(), (vv * (1.0 - U)).ravel(), (ss * (1.0 - U) * (1.0 - vv)).ravel()])
    return pts, W.ravel()


def cell_rule(cell_type: str, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature rule of the given polynomial ``degree`` on the reference cell of ``cell_type``."""
    if cell_type not in CELLS:
        raise FemError(f"no quadrature for cell type {cell_type!r}; use one of {list(CELLS)}")
    p = _degree(degree)
    if cell_type == "triangle":
        return triangle_rule(p)
    if cell_type == "tetra":
        return tetra_rule(p)
    return tensor_gauss(CELLS[cell_type].dim, max(1, -(-(p + 1) // 2)))
