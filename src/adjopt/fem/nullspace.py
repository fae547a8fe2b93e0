"""Near-nullspaces for algebraic multigrid: the rigid body modes of elasticity."""

from __future__ import annotations

import numpy as np

from .._validate import check_finite
from ..errors import ShapeError


def rigid_body_modes(points, free=None, center=None) -> np.ndarray:
    """The rigid body modes of a linear elasticity problem, for ``AMGSolver(near_nullspace=...)``.

    Parameters
    ----------
    points
        (N, dim) node coordinates, dim 2 or 3.
    free
        Optional dof indices (e.g. ``DofMap.free``) to keep: the rows of the
        condensed system.
    center
        The point the rotations turn about (default: the mean of ``points``).
        A distributed build passes the global centroid, so that every rank's
        rows are rows of the same global modes.

    Returns
    -------
    (N*dim, 3) in 2D or (N*dim, 6) in 3D, rows ordered ``dof = node*dim + component``
    (as :func:`adjopt.fem.vector_dofs`): translations, then rotations about
    the centroid (centred coordinates keep the columns well conditioned).
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] not in (2, 3):
        raise ShapeError(f"points must have shape (N, 2) or (N, 3), got {x.shape}")
    check_finite(x, "the node coordinates")
    n, dim = x.shape
    x = x - (x.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64))
    if dim == 2:
        B = np.zeros((n, 2, 3))
        B[:, 0, 0] = B[:, 1, 1] = 1.0
        B[:, 0, 2], B[:, 1, 2] = -x[:, 1], x[:, 0]
    else:
        B = np.zeros((n, 3, 6))
        B[:, 0, 0] = B[:, 1, 1] = B[:, 2, 2] = 1.0
        # rotations about z, x and y: omega x r
        B[:, 0, 3], B[:, 1, 3] = -x[:, 1], x[:, 0]
        B[:, 1, 4], B[:, 2, 4] = -x[:, 2], x[:, 1]
        B[:, 0, 5], B[:, 2, 5] = x[:, 2], -x[:, 0]
    B = B.reshape(n * dim, -1)
    if free is not None:
        free = np.asarray(free)
        if free.ndim != 1 or free.dtype.kind not in "iu" or (free.size and (free.min() < 0 or free.max() >= n * dim)):
            raise ShapeError(f"free must be 1-D dof indices in [0, {n * dim}), got shape {free.shape} dtype {free.dtype}")
        B = B[free]
    return B
