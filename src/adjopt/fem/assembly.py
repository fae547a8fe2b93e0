"""Scatter of local matrices / vectors into global ones (plain scipy / numpy)."""

from __future__ import annotations

import logging
import numbers

import numpy as np
import scipy.sparse as sp

from ..errors import ShapeError
from ..mesh import Mesh
from ._errors import FemError

logger = logging.getLogger(__name__)


def _size(n, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise FemError(f"{name} must be a non-negative integer (number of dofs), got {n!r}")
    return int(n)


def _conn(conn, n: int) -> np.ndarray:
    c = np.asarray(conn)
    if c.dtype.kind not in "iu" or c.ndim != 2:
        raise ShapeError(f"connectivity must be an integer (E, k) array, got dtype {c.dtype} shape {c.shape}")
    if c.size and c.max() >= n:  # one reduction; the offending row is looked up only on failure
        e = int(np.flatnonzero(np.any(c >= n, axis=1))[0])
        raise FemError(f"connectivity row {e} = {c[e].tolist()} refers to a dof >= n = {n}; "
                       f"n must be the number of dofs")
    return c.astype(np.int64, copy=False)


def vector_dofs(cells, dim: int) -> np.ndarray:
    """Vector-valued dof connectivity ``dof = node * dim + component``.

    Parameters
    ----------
    cells
        (E, k) node indices.
    dim
        Number of components (2 or 3).

    Returns
    -------
    (E, k*dim) int64 ndarray
        Node-major: ``[n0*dim, n0*dim+1, ..., n1*dim, ...]``.
    """
    c = np.asarray(cells)
    if c.dtype.kind not in "iu" or c.ndim != 2:
        raise ShapeError(f"cells must be an integer (E, k) array, got dtype {c.dtype} shape {c.shape}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise FemError(f"dim must be a positive integer, got {dim!r}")
    c = c.astype(np.int64, copy=False)
    return (c[:, :, None] * dim + np.arange(dim)).reshape(c.shape[0], -1)


def boundary_dofs(mesh: Mesh, name: str, components=None) -> np.ndarray:
    """Dofs of the named boundary's nodes.

    Parameters
    ----------
    mesh
        The mesh.
    name
        Boundary name (``mesh.boundary(name)``).
    components
        ``None``: scalar problem, the node indices. Otherwise an int or a
        sequence of components: ``node * mesh.dim + c`` (sorted).

    Returns
    -------
    int64 ndarray
    """
    nodes = mesh.boundary(name)
    if components is None:
        return nodes.copy()
    comps = np.atleast_1d(np.asarray(components))
    if comps.dtype.kind not in "iu" or np.any(comps < 0) or np.any(comps >= mesh.dim):
        raise FemError(f"components must be integers in [0, {mesh.dim - 1}], got {components!r}")
    return np.sort((nodes[:, None] * mesh.dim + comps[None, :]).ravel())


def assemble(conn, local, n: int) -> sp.csr_array:
    """Global sparse matrix ``A = sum_e P_e^T K_e P_e`` from local matrices.

    COO triplets ``(conn[e, a], conn[e, b], local[e, a, b])`` converted to CSR
    (duplicates summed); entries whose row or column index is negative
    (condensed dofs) are dropped.

    Parameters
    ----------
    conn
        (E, k) dof indices, negative = skip.
    local
        (E, k, k) local matrices.
    n
        Global size.

    Returns
    -------
    scipy.sparse.csr_array
        (n, n).
    """
    n = _size(n)
    c = _conn(conn, n)
    K = np.asarray(local, dtype=np.float64)
    E, k = c.shape
    if K.shape != (E, k, k):
        raise ShapeError(f"local matrices must have shape ({E}, {k}, {k}) to match the connectivity, "
                         f"got {K.shape}")
    rows = np.broadcast_to(c[:, :, None], (E, k, k)).ravel()
    cols = np.broadcast_to(c[:, None, :], (E, k, k)).ravel()
    vals = K.ravel()
    keep = (rows >= 0) & (cols >= 0)
    if not keep.all():
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    A = sp.coo_array((vals, (rows, cols)), shape=(n, n)).tocsr()
    A.sum_duplicates()
    return A


def assemble_vector(conn, local, n: int) -> np.ndarray:
    """Global vector ``b_i = sum_{(e,a): conn[e,a] = i} local[e, a]`` via ``np.bincount``.

    Negative connectivity entries are dropped.

    Parameters
    ----------
    conn
        (E, k) dof indices.
    local
        (E, k) local vectors.
    n
        Global size.

    Returns
    -------
    (n,) ndarray
    """
    n = _size(n)
    c = _conn(conn, n)
    v = np.asarray(local, dtype=np.float64)
    if v.shape != c.shape:
        raise ShapeError(f"local vectors must have shape {c.shape} to match the connectivity, got {v.shape}")
    keep = c >= 0
    return np.bincount(c[keep], weights=v[keep], minlength=n).astype(np.float64)
