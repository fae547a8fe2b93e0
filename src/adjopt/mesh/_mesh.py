"""The :class:`Mesh` container: points, one block of cells, named boundaries."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from ..errors import ShapeError
from ._errors import InvalidElementError, MeshError, UnknownBoundaryError
from ._reference import CELLS, SUPPORTED, jacobian_determinants, shape_functions, tensor_gauss, vertex_means

logger = logging.getLogger(__name__)

_FACTORIAL = {2: 2.0, 3: 6.0}


def _as_index_array(values, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise MeshError(f"{what} must hold integer node indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class Mesh:
    """Unstructured mesh with a single cell type.

    Parameters
    ----------
    points
        (N, dim) node coordinates, ``dim`` = 2 for ``"triangle"``/``"quad"``
        and 3 for ``"tetra"``/``"hexahedron"``.
    cells
        (E, k) vertex indices per cell in VTK / meshio order.
    cell_type
        ``"triangle"``, ``"quad"``, ``"tetra"`` or ``"hexahedron"``.
    boundaries
        Optional ``{name: node indices}``; stored sorted and unique. When no
        ``"all"`` entry is given it is computed from :meth:`boundary_facets`.
    point_data, cell_data
        Optional ``{name: array}`` with N resp. E rows (e.g. fields read from
        a file); kept as given, not used by the mesh itself.

    Raises
    ------
    MeshError
        Unknown cell type, wrong array shapes, non-finite coordinates, node
        indices out of range (the message names the cell / boundary).
    """

    def __init__(self, points, cells, cell_type: str, boundaries: Mapping | None = None,
                 *, point_data: Mapping | None = None, cell_data: Mapping | None = None):
        if cell_type not in CELLS:
            raise MeshError(
                f"unsupported cell_type {cell_type!r}; use one of {', '.join(map(repr, SUPPORTED))}"
            )
        info = CELLS[cell_type]
        pts = np.asarray(points)
        if pts.dtype.kind not in "iuf":
            raise MeshError(f"points must be a numeric (N, {info.dim}) array, got dtype {pts.dtype}")
        pts = np.ascontiguousarray(pts, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != info.dim:
            raise ShapeError(
                f"points of a {cell_type} mesh must have shape (N, {info.dim}), got {pts.shape}"
            )
        if pts.shape[0] == 0:
            raise MeshError("mesh has no points")
        if not np.all(np.isfinite(pts)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(pts), axis=1))[0])
            raise MeshError(f"point {bad} has a NaN or Inf coordinate {pts[bad].tolist()}; fix the coordinates")
        cl = np.ascontiguousarray(_as_index_array(cells, "cells"))
        if cl.ndim != 2 or cl.shape[1] != info.n_vertices:
            raise ShapeError(
                f"cells of type {cell_type!r} must have shape (E, {info.n_vertices}), got {cl.shape}"
            )
        if cl.shape[0] == 0:
            raise MeshError("mesh has no cells")
        n = pts.shape[0]
        bad_rows = np.flatnonzero(np.any((cl < 0) | (cl >= n), axis=1))
        if bad_rows.size:
            e = int(bad_rows[0])
            raise MeshError(
                f"cell {e} has vertex indices {cl[e].tolist()} outside [0, {n - 1}] "
                f"({bad_rows.size} such cell(s)); node indices must refer to the {n} points"
            )
        self.points = pts
        self.cells = cl
        self.cell_type = cell_type
        self.boundaries: dict[str, np.ndarray] = {}
        for name, nodes in dict(boundaries or {}).items():
            if not isinstance(name, str):
                raise MeshError(f"boundary names must be strings, got {name!r}")
            idx = np.unique(_as_index_array(nodes, f"boundary {name!r}").ravel())
            if idx.size and (idx[0] < 0 or idx[-1] >= n):
                off = idx[0] if idx[0] < 0 else idx[-1]
                raise MeshError(f"boundary {name!r} refers to node {int(off)}, outside [0, {n - 1}]")
            self.boundaries[name] = idx
        if "all" not in self.boundaries:
            self.boundaries["all"] = np.unique(self.boundary_facets())
        self.point_data = self._fields(point_data, n, "point_data", "node")
        self.cell_data = self._fields(cell_data, cl.shape[0], "cell_data", "cell")

    @staticmethod
    def _fields(fields, rows: int, kind: str, what: str) -> dict:
        out = {}
        for name, val in dict(fields or {}).items():
            arr = np.asarray(val)
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise ShapeError(f"{kind} {name!r} has shape {arr.shape} but needs {rows} rows (one per {what})")
            out[name] = arr
        return out

    # ------------------------------------------------------------------ sizes
    @property
    def dim(self) -> int:
        """Spatial dimension (2 or 3)."""
        return self.points.shape[1]

    @property
    def n_nodes(self) -> int:
        """Number of points N."""
        return self.points.shape[0]

    @property
    def n_cells(self) -> int:
        """Number of cells E."""
        return self.cells.shape[0]

    @property
    def nodes_per_cell(self) -> int:
        """Vertices per cell k."""
        return self.cells.shape[1]

    @property
    def boundary_names(self) -> list[str]:
        """Sorted names of the named boundaries."""
        return sorted(self.boundaries)

    def __repr__(self) -> str:
        return (f"Mesh(cell_type={self.cell_type!r}, n_nodes={self.n_nodes}, n_cells={self.n_cells}, "
                f"boundaries={self.boundary_names})")

    # ------------------------------------------------------------- boundaries
    def boundary(self, name: str) -> np.ndarray:
        """Sorted unique node indices of the boundary ``name``.

        Raises
        ------
        UnknownBoundaryError
            (a ``KeyError`` and ``ValueError``) listing the known names.
        """
        try:
            return self.boundaries[name]
        except (KeyError, TypeError):
            known = ", ".join(map(repr, self.boundary_names)) or "none"
            raise UnknownBoundaryError(
                f"unknown boundary {name!r}; this mesh has the boundaries: {known} "
                f"(add one with mesh.boundaries[name] = node_indices)"
            ) from None

    def boundary_facets(self, return_cells: bool = False):
        """Facets lying on the boundary: faces that belong to exactly one cell.

        All ``E * n_facets`` local facets are listed (outward oriented for
        positively oriented cells), each row's vertices are sorted, the rows are
        ordered with ``np.lexsort`` and runs of equal rows counted; facets whose
        sorted vertex tuple occurs exactly once are kept, in order of
        appearance.

        Parameters
        ----------
        return_cells
            Also return the index of the cell owning each facet.

        Returns
        -------
        facets : (F, nf) int64 ndarray
            Vertex indices (edges in 2D, triangles/quads in 3D).
        owners : (F,) int64 ndarray
            Only if ``return_cells``.
        """
        local = CELLS[self.cell_type].facets
        nf_cell, nv = local.shape
        allf = self.cells[:, local].reshape(-1, nv)
        key = np.sort(allf, axis=1)
        order = np.lexsort(key.T[::-1])
        ks = key[order]
        start = np.ones(ks.shape[0], dtype=bool)
        start[1:] = np.any(ks[1:] != ks[:-1], axis=1)
        first = np.flatnonzero(start)
        counts = np.diff(np.append(first, ks.shape[0]))
        if np.any(counts > 2):
            logger.warning("%d facet(s) are shared by more than two cells (non-manifold mesh)",
                           int(np.sum(counts > 2)))
        keep = np.sort(order[first[counts == 1]])
        facets = allf[keep]
        if return_cells:
            return facets, keep // nf_cell
        return facets

    # --------------------------------------------------------------- geometry
    def signed_volumes(self) -> np.ndarray:
        """Signed cell areas (2D) / volumes (3D), positive for positive orientation.

        Simplices: ``det[x_1 - x_0, ..., x_d - x_0] / d!``. Quads / hexes:
        ``sum_q w_q det J(xi_q)`` with the 2x2 / 2x2x2 Gauss rule, exact for
        the (bi/tri)linear map. The determinants come from one numba pass over
        the cells in closed form (:func:`~._reference.jacobian_determinants`;
        432k hexes: about 0.1 s, where forming the (E, 8, 3, 3) Jacobians
        (250 MB) and ``np.linalg.det`` took 1.4-3 s).
        """
        info = CELLS[self.cell_type]
        if info.simplex:
            # the Jacobian at any point is the matrix of edge vectors x_a - x_0 (as columns)
            _, dn = shape_functions(self.cell_type, np.zeros((1, info.dim)))
            return jacobian_determinants(self.points, self.cells, dn)[:, 0] / _FACTORIAL[info.dim]
        xq, wq = tensor_gauss(info.dim, 2)
        _, dn = shape_functions(self.cell_type, xq)
        return np.einsum("eq,q->e", jacobian_determinants(self.points, self.cells, dn), wq)

    def cell_volumes(self) -> np.ndarray:
        """Cell areas / volumes ``|signed_volumes()|``, shape (E,)."""
        return np.abs(self.signed_volumes())

    def cell_centers(self) -> np.ndarray:
        """Vertex averages ``(1/k) sum_a x_a`` per cell, shape (E, dim) (summed in vertex order, then divided by k)."""
        return vertex_means(self.points, self.cells)

    def check(self) -> Mesh:
        """Check that every cell is positively oriented and not degenerate.

        A cell is *inverted* if its signed volume is negative, *degenerate* if
        ``|volume| <= 1e-14 * median(|volumes|)``; quads / hexes are also
        *tangled* if ``det J`` at a vertex is not positive (non-convex quad,
        twisted hex).

        Returns
        -------
        Mesh
            ``self``, so that ``mesh = read(path).check()`` works.

        Raises
        ------
        InvalidElementError
            Naming the first offending cell, its vertices and its volume.
        """
        info = CELLS[self.cell_type]
        vol = self.signed_volumes()
        absv = np.abs(vol)
        typical = float(np.median(absv))
        if typical == 0.0:
            typical = float(absv.max())
        tol = 1e-14 * typical
        inverted = vol < 0
        degenerate = absv <= tol
        tangled = np.zeros_like(inverted)
        if not info.simplex:
            _, dn = shape_functions(self.cell_type, info.vertices)
            detv = jacobian_determinants(self.points, self.cells, dn)  # (E, k)
            tangled = np.any(detv <= tol / info.ref_volume, axis=1) & ~inverted & ~degenerate
        bad = np.flatnonzero(inverted | degenerate | tangled)
        if bad.size == 0:
            return self
        e = int(bad[0])
        verts = self.cells[e].tolist()
        where = f"cell {e} (vertices {verts}, signed volume {vol[e]:.6g})"
        if degenerate[e]:
            msg = (f"{where} is degenerate (|volume| <= 1e-14 x typical {typical:.3g}): "
                   f"its vertices coincide or are collinear/coplanar; remove or re-mesh it")
        elif inverted[e]:
            msg = (f"{where} is inverted: its vertices are ordered "
                   f"{'clockwise' if info.dim == 2 else 'with negative orientation'}; "
                   f"reorder them (mesh.oriented() flips all such cells)")
        else:
            msg = (f"{where} is tangled: det J <= 0 at a vertex "
                   f"({'non-convex quad' if info.dim == 2 else 'twisted hexahedron'}); re-mesh it")
        if bad.size > 1:
            msg += f" [{bad.size} bad cells in total]"
        raise InvalidElementError(msg, e)

    def oriented(self) -> Mesh:
        """Copy of the mesh with negatively oriented cells' vertex order reversed.

        Applies the orientation-reversing permutation of the cell type
        (e.g. ``[0, 2, 1]`` for triangles) to cells with negative signed volume.
        """
        flip = CELLS[self.cell_type].flip
        cells = self.cells.copy()
        neg = self.signed_volumes() < 0
        cells[neg] = cells[neg][:, flip]
        if neg.any():
            logger.info("reoriented %d of %d cells", int(neg.sum()), self.n_cells)
        return Mesh(self.points.copy(), cells, self.cell_type,
                    {k: v.copy() for k, v in self.boundaries.items()},
                    point_data=self.point_data, cell_data=self.cell_data)
