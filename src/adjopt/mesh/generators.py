"""Structured meshes of rectangles and boxes (numpy only, no loops over cells).

Node numbering is x fastest, then y, then z: node ``(i, j)`` is
``j * (nx + 1) + i`` and node ``(i, j, l)`` is
``(l * (ny + 1) + j) * (nx + 1) + i``. All cells are positively oriented
and use VTK / meshio vertex order. Named boundary node sets: ``left`` (x=0),
``right`` (x=lx), ``bottom`` (y=0), ``top`` (y=ly), in 3D ``front`` (z=0)
and ``back`` (z=lz), and ``all``.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np

from ._errors import MeshError
from ._mesh import Mesh

logger = logging.getLogger(__name__)

# Kuhn subdivision of the unit cube into 6 tets along the diagonal 000-111:
# for a permutation (a, b, c) of the axes the path 0 -> e_a -> e_a+e_b -> 111.
# Corners are numbered by bits x + 2y + 4z. Odd permutations get their middle
# vertices swapped so that every tet has det > 0.
_KUHN = np.array(
    [
        [0, 1, 3, 7],  # x, y, z (even)
        [0, 5, 1, 7],  # x, z, y (odd: path 0, 1, 5, 7 with 1 <-> 5)
        [0, 3, 2, 7],  # y, x, z (odd: path 0, 2, 3, 7 with 2 <-> 3)
        [0, 2, 6, 7],  # y, z, x (even)
        [0, 4, 5, 7],  # z, x, y (even)
        [0, 6, 4, 7],  # z, y, x (odd: path 0, 4, 6, 7 with 4 <-> 6)
    ]
)


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MeshError(f"{name} must be an integer number of cells >= 1, got {value!r}")
    if value < 1:
        raise MeshError(f"{name} must be >= 1 (number of cells along that side), got {value}")
    return int(value)


def _length(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MeshError(f"{name} must be a positive number, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise MeshError(f"{name} must be a positive finite length, got {value!r}")
    return v


def rectangle(nx: int, ny: int, lx: float = 1.0, ly: float = 1.0, cell: str = "triangle") -> Mesh:
    """Structured mesh of ``[0, lx] x [0, ly]`` with ``nx x ny`` squares.

    Parameters
    ----------
    nx, ny
        Number of cells in x and y (>= 1).
    lx, ly
        Side lengths (> 0).
    cell
        ``"quad"``: one quad ``(n00, n10, n11, n01)`` per square;
        ``"triangle"``: two triangles ``(n00, n10, n11)``, ``(n00, n11, n01)``
        per square (diagonal from lower left to upper right), both
        counter-clockwise.

    Returns
    -------
    Mesh
        ``(nx+1)(ny+1)`` nodes, ``nx*ny`` quads or ``2*nx*ny`` triangles.
    """
    nx, ny = _count(nx, "nx"), _count(ny, "ny")
    lx, ly = _length(lx, "lx"), _length(ly, "ly")
    if cell not in ("triangle", "quad"):
        raise MeshError(f"rectangle: unknown cell {cell!r}; use 'triangle' or 'quad'")
    x = np.linspace(0.0, lx, nx + 1)
    y = np.linspace(0.0, ly, ny + 1)
    gx, gy = np.meshgrid(x, y)  # (ny+1, nx+1), x fastest when raveled
    points = np.column_stack([gx.ravel(), gy.ravel()])
    i, j = np.meshgrid(np.arange(nx), np.arange(ny))
    n00 = (j * (nx + 1) + i).ravel()
    n10, n01 = n00 + 1, n00 + nx + 1
    n11 = n01 + 1
    if cell == "quad":
        cells = np.column_stack([n00, n10, n11, n01])
    else:
        cells = np.stack([np.column_stack([n00, n10, n11]), np.column_stack([n00, n11, n01])], axis=1)
        cells = cells.reshape(-1, 3)
    ids = np.arange((nx + 1) * (ny + 1)).reshape(ny + 1, nx + 1)
    boundaries = {
        "left": ids[:, 0], "right": ids[:, -1], "bottom": ids[0, :], "top": ids[-1, :],
    }
    boundaries["all"] = np.concatenate(list(boundaries.values()))
    logger.debug("rectangle: %d nodes, %d %s cells", points.shape[0], cells.shape[0], cell)
    return Mesh(points, cells, cell, boundaries)


def unit_square(n: int, cell: str = "triangle") -> Mesh:
    """``rectangle(n, n, 1, 1, cell)``: the unit square with ``n x n`` squares."""
    return rectangle(n, n, 1.0, 1.0, cell)


def box(nx: int, ny: int, nz: int, lx: float = 1.0, ly: float = 1.0, lz: float = 1.0,
        cell: str = "tetra") -> Mesh:
    """Structured mesh of ``[0, lx] x [0, ly] x [0, lz]`` with ``nx x ny x nz`` cubes.

    Parameters
    ----------
    nx, ny, nz
        Number of cells per direction (>= 1).
    lx, ly, lz
        Side lengths (> 0).
    cell
        ``"hexahedron"``: one hex per cube, VTK order
        ``(c000, c100, c110, c010, c001, c101, c111, c011)``;
        ``"tetra"``: 6 tets per cube (Kuhn subdivision sharing the diagonal
        c000-c111, conforming across cubes), all with positive Jacobian.

    Returns
    -------
    Mesh
        ``(nx+1)(ny+1)(nz+1)`` nodes, ``nx*ny*nz`` hexes or ``6*nx*ny*nz`` tets.
    """
    nx, ny, nz = _count(nx, "nx"), _count(ny, "ny"), _count(nz, "nz")
    lx, ly, lz = _length(lx, "lx"), _length(ly, "ly"), _length(lz, "lz")
    if cell not in ("tetra", "hexahedron"):
        raise MeshError(f"box: unknown cell {cell!r}; use 'tetra' or 'hexahedron'")
    x = np.linspace(0.0, lx, nx + 1)
    y = np.linspace(0.0, ly, ny + 1)
    z = np.linspace(0.0, lz, nz + 1)
    gz, gy, gx = np.meshgrid(z, y, x, indexing="ij")  # (nz+1, ny+1, nx+1): x fastest
    points = np.column_stack([gx.ravel(), gy.ravel(), gz.ravel()])
    sx, sy = 1, nx + 1
    sz = (nx + 1) * (ny + 1)
    cl, cj, ci = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    base = (cl * sz + cj * sy + ci * sx).ravel()
    # corner offsets by bit pattern x + 2y + 4z
    bits = np.arange(8)
    offs = (bits & 1) * sx + ((bits >> 1) & 1) * sy + ((bits >> 2) & 1) * sz
    corners = base[:, None] + offs[None, :]  # (C, 8)
    if cell == "hexahedron":
        cells = corners[:, [0, 1, 3, 2, 4, 5, 7, 6]]
    else:
        cells = corners[:, _KUHN].reshape(-1, 4)
    ids = np.arange(points.shape[0]).reshape(nz + 1, ny + 1, nx + 1)
    boundaries = {
        "left": ids[:, :, 0], "right": ids[:, :, -1],
        "bottom": ids[:, 0, :], "top": ids[:, -1, :],
        "front": ids[0, :, :], "back": ids[-1, :, :],
    }
    boundaries["all"] = np.concatenate([v.ravel() for v in boundaries.values()])
    logger.debug("box: %d nodes, %d %s cells", points.shape[0], cells.shape[0], cell)
    return Mesh(points, cells, cell, boundaries)


def unit_cube(n: int, cell: str = "tetra") -> Mesh:
    """``box(n, n, n, 1, 1, 1, cell)``: the unit cube with ``n^3`` cubes."""
    return box(n, n, n, 1.0, 1.0, 1.0, cell)
