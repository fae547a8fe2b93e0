"""Pointwise observation of P1 fields and the P1 gradient operator.

:func:`observation_operator` gives the sparse matrix ``B`` with
``(B u)_i = u_h(x_i)`` for a P1 field ``u_h = sum_j u_j N_j`` on a triangle or
tetrahedron mesh: row ``i`` holds the barycentric coordinates of ``x_i`` in
the cell that contains it. :func:`p1_gradient_operator` gives ``G`` with
``(G u)[e*dim + c] = d u_h / d x_c`` on cell ``e`` (constant per cell), the
operator :class:`~adjopt.objectives.TotalVariation` expects.

Both are vectorised over points / cells (no Python loop over points).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..errors import ShapeError
from ..mesh import Mesh
from ._errors import FemError

_SIMPLEX = ("triangle", "tetra")


def _require_simplex(mesh, what: str) -> None:
    if not isinstance(mesh, Mesh):
        raise FemError(f"{what} needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
    if mesh.cell_type not in _SIMPLEX:
        raise FemError(f"{what} supports P1 triangle and tetra meshes, got cell type {mesh.cell_type!r}")


def _inverse_jacobians(mesh: Mesh):
    """(E, d, d) inverses of T_e = [x_1 - x_0, ..., x_d - x_0] (columns) and the first vertices (E, d)."""
    xe = mesh.points[mesh.cells]  # (E, d+1, d)
    x0 = xe[:, 0, :]
    T = np.transpose(xe[:, 1:, :] - x0[:, None, :], (0, 2, 1))  # columns are edge vectors
    return np.linalg.inv(T), x0


def _locate(mesh: Mesh, pts: np.ndarray, tol: float, k: int | None, most: int):
    """(cell of each point, -1 where none of its ``most`` nearest cells (by centre) holds it; its barycentric
    coordinates there)."""
    d = mesh.dim
    n_pts, n_cells = pts.shape[0], mesh.n_cells
    cell_of = np.full(n_pts, -1, dtype=np.int64)
    bary = np.zeros((n_pts, d + 1))
    if n_pts == 0 or n_cells == 0:
        return cell_of, bary
    Tinv, x0 = _inverse_jacobians(mesh)
    tree = cKDTree(mesh.cell_centers())
    most = min(n_cells, most)
    todo = np.arange(n_pts)
    kk = min(most, k if k is not None else (8 if d == 2 else 24))
    while todo.size:
        _, cand = tree.query(pts[todo], k=kk)
        cand = np.asarray(cand, dtype=np.int64).reshape(todo.size, kk)  # (P, kk)
        rel = pts[todo][:, None, :] - x0[cand]  # (P, kk, d)
        lam = np.einsum("pkij,pkj->pki", Tinv[cand], rel)  # (P, kk, d)
        lam = np.concatenate([1.0 - lam.sum(axis=2, keepdims=True), lam], axis=2)  # (P, kk, d+1)
        inside = np.all(lam >= -tol, axis=2)  # (P, kk)
        found = inside.any(axis=1)
        first = np.argmax(inside, axis=1)
        hit = np.flatnonzero(found)
        cell_of[todo[hit]] = cand[hit, first[hit]]
        bary[todo[hit]] = lam[hit, first[hit]]
        todo = todo[~found]
        if kk == most:
            break
        kk = min(most, 2 * kk)
    return cell_of, bary


def locate_points(mesh: Mesh, points, tol: float = 1e-12) -> np.ndarray:
    """The cell holding each point (barycentric coordinates ``>= -tol``), -1 for a point outside ``mesh``.

    For a rank's part of a distributed mesh: which observation points are its
    own. The cells with the 256 nearest centres are tried first; a point
    inside the mesh's bounding box that none of them holds (stretched cells)
    is then tested against every cell, in chunks (memory bounded).
    """
    _require_simplex(mesh, "locate_points")
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != mesh.dim or not np.all(np.isfinite(pts)):
        raise ShapeError(f"points must be a finite (n_points, {mesh.dim}) array, got shape {pts.shape}")
    cell_of = _locate(mesh, pts, tol, None, 256)[0]
    if mesh.n_cells == 0:
        return cell_of
    lo, hi = mesh.points.min(axis=0), mesh.points.max(axis=0)
    span = np.maximum(hi - lo, 1e-300)
    boxed = np.all((pts >= lo - tol * span) & (pts <= hi + tol * span), axis=1)
    rest = np.flatnonzero((cell_of < 0) & boxed)
    if rest.size:
        Tinv, x0 = _inverse_jacobians(mesh)
        chunk = max(1, 2**22 // (rest.size * (mesh.dim + 1)))  # about 32 MiB of coordinates per chunk
        for start in range(0, mesh.n_cells, chunk):
            if not rest.size:
                break
            cells = np.arange(start, min(start + chunk, mesh.n_cells))
            rel = pts[rest][:, None, :] - x0[cells][None, :, :]  # (P, C, d)
            lam = np.einsum("cij,pcj->pci", Tinv[cells], rel)
            lam = np.concatenate([1.0 - lam.sum(axis=2, keepdims=True), lam], axis=2)
            inside = np.all(lam >= -tol, axis=2)  # (P, C)
            found = inside.any(axis=1)
            cell_of[rest[found]] = cells[np.argmax(inside[found], axis=1)]
            rest = rest[~found]
    return cell_of


def observation_operator(mesh: Mesh, points, tol: float = 1e-12, k: int | None = None) -> sp.csr_array:
    """P1 interpolation at ``points``: a CSR matrix of shape (n_points, n_nodes).

    Each point is located in a cell whose barycentric coordinates are all
    ``>= -tol``: candidates are the ``k`` cells with the nearest centres
    (``scipy.spatial.cKDTree``); points not found among them are retried with
    twice as many candidates, up to all cells.

    Parameters
    ----------
    mesh
        Triangle or tetra mesh.
    points
        (n_points, dim) coordinates.
    tol
        Tolerance on the barycentric coordinates (points on edges/faces and
        vertices are inside).
    k
        Initial number of candidate cells per point (default 8 in 2D, 24 in 3D).

    Returns
    -------
    scipy.sparse.csr_array
        Rows sum to 1; ``B @ u`` reproduces linear functions exactly.

    Raises
    ------
    FemError (a ValueError)
        A point outside the mesh (the message names its index), a mesh that is
        not made of triangles / tetrahedra.
    ShapeError
        ``points`` not of shape (n_points, dim).
    """
    _require_simplex(mesh, "observation_operator")
    d = mesh.dim
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != d:
        raise ShapeError(f"points must have shape (n_points, {d}) for a {d}D mesh, got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(pts), axis=1))[0])
        raise FemError(f"point {bad} has a NaN or Inf coordinate")
    n_pts = pts.shape[0]
    cell_of, bary = _locate(mesh, pts, tol, k, mesh.n_cells)
    todo = np.flatnonzero(cell_of < 0)
    if todo.size:
        i = int(todo[0])
        raise FemError(f"point {i} at {pts[i].tolist()} is outside the mesh"
                       + (f" ({todo.size} points in all, indices {todo[:10].tolist()}...)" if todo.size > 1 else ""))
    rows = np.repeat(np.arange(n_pts), d + 1)
    cols = mesh.cells[cell_of].ravel()
    B = sp.coo_array((bary.ravel(), (rows, cols)), shape=(n_pts, mesh.n_nodes))
    return sp.csr_array(B)


def p1_gradient_operator(mesh: Mesh) -> sp.csr_array:
    """P1 gradient per cell: (E*dim, N) CSR with ``(G u)[e*dim + c] = d u_h/d x_c`` on cell ``e``.

    ``grad lambda_j = T_e^{-T} e_j`` (rows ``j-1`` of ``T_e^{-1}``) for
    ``j = 1..d`` and ``grad lambda_0 = -sum_j grad lambda_j``.
    """
    _require_simplex(mesh, "p1_gradient_operator")
    d, E = mesh.dim, mesh.n_cells
    Tinv, _ = _inverse_jacobians(mesh)
    grads = np.concatenate([-Tinv.sum(axis=1, keepdims=True), Tinv], axis=1)  # (E, d+1, d): grad lambda_a
    rows = (np.arange(E)[:, None, None] * d + np.arange(d)[None, None, :])  # (E, 1, d)
    rows = np.broadcast_to(rows, grads.shape).ravel()
    cols = np.broadcast_to(mesh.cells[:, :, None], grads.shape).ravel()
    G = sp.coo_array((grads.ravel(), (rows, cols)), shape=(E * d, mesh.n_nodes))
    return sp.csr_array(G)
