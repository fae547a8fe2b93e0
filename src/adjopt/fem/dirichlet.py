"""Dirichlet conditions by condensation: solve for the free dofs only.

With prescribed values ``g`` on the fixed dofs ``D`` and free dofs ``F``,

    K_FF u_F = f_F - K_FD g,       u_D = g.

:func:`condense` builds a :class:`DofMap` that renumbers the free dofs
``0..n_free-1``; :meth:`DofMap.restrict` maps a connectivity to that
numbering (-1 for fixed dofs, which assembly skips) and
:meth:`DofMap.lifting` gives the element contributions ``-K_e[:, D] g_e``
of the right-hand side.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ShapeError
from ._errors import FemError, SingularProblemError
from .assembly import _conn, _size, assemble, assemble_vector

logger = logging.getLogger(__name__)


class DofMap:
    """Free / fixed dof bookkeeping; build it with :func:`condense`.

    Attributes
    ----------
    n_dofs : int
        Total number of dofs.
    free : (n_free,) int64 ndarray
        Sorted free dofs.
    fixed : (n_fixed,) int64 ndarray
        Sorted fixed dofs.
    values : (n_fixed,) float64 ndarray
        Prescribed values, aligned with ``fixed``.
    full_to_free : (n_dofs,) int64 ndarray
        Free index of each dof, -1 for fixed dofs.
    """

    def __init__(self, n_dofs: int, fixed: np.ndarray, values: np.ndarray):
        self.n_dofs = int(n_dofs)
        self.fixed = fixed
        self.values = values
        mask = np.zeros(self.n_dofs, dtype=bool)
        mask[fixed] = True
        self.is_fixed = mask
        self.free = np.flatnonzero(~mask).astype(np.int64)
        self.full_to_free = np.full(self.n_dofs, -1, dtype=np.int64)
        self.full_to_free[self.free] = np.arange(self.free.size, dtype=np.int64)
        g = np.zeros(self.n_dofs)
        g[fixed] = values
        self._g = g

    @property
    def n_free(self) -> int:
        """Number of free dofs."""
        return int(self.free.size)

    @property
    def prescribed(self) -> np.ndarray:
        """Full-length vector with the prescribed values at fixed dofs and 0 elsewhere."""
        return self._g.copy()

    def __repr__(self) -> str:
        return f"DofMap(n_dofs={self.n_dofs}, n_free={self.n_free}, n_fixed={self.fixed.size})"

    def restrict(self, conn) -> np.ndarray:
        """Connectivity in free numbering: ``full_to_free[conn]`` (-1 at fixed dofs).

        Negative entries of ``conn`` stay -1.
        """
        c = _conn(conn, self.n_dofs)
        if c.size == 0 or c.min() >= 0:
            return self.full_to_free.take(c)  # one gather (a full connectivity)
        out = self.full_to_free.take(np.maximum(c, 0))
        out[c < 0] = -1
        return out

    def restrict_vector(self, v) -> np.ndarray:
        """Free part ``v[free]`` of a full (n_dofs,) or (n_dofs, m) array."""
        a = np.asarray(v)
        if a.ndim not in (1, 2) or a.shape[0] != self.n_dofs:
            raise ShapeError(f"expected shape ({self.n_dofs},) or ({self.n_dofs}, m), got {a.shape}")
        return a[self.free]

    def expand(self, u_free) -> np.ndarray:
        """Full vector: ``u[free] = u_free``, ``u[fixed] = values``.

        Works for (n_free,) and (n_free, m) (the prescribed values go into
        every column).
        """
        uf = np.asarray(u_free)
        if uf.ndim not in (1, 2) or uf.shape[0] != self.n_free:
            raise ShapeError(f"u_free must have shape ({self.n_free},) or ({self.n_free}, m) "
                             f"(one row per free dof), got {uf.shape}")
        dtype = np.result_type(uf.dtype, np.float64)
        u = np.empty((self.n_dofs,) + uf.shape[1:], dtype=dtype)
        u[self.free] = uf
        u[self.fixed] = self.values if uf.ndim == 1 else self.values[:, None]
        return u

    def lifting(self, conn, local) -> np.ndarray:
        """Element right-hand-side contributions of the prescribed values.

        ``l_e = -K_e g_e`` with ``g_e = g[conn[e]]`` (prescribed values, 0 at
        free dofs), rows of fixed dofs set to 0, so that

        ``b_free = f[free] + assemble_vector(restrict(conn), lifting(conn, local), n_free)``.

        Parameters
        ----------
        conn
            (E, k) full dof connectivity.
        local
            (E, k, k) local matrices.

        Returns
        -------
        (E, k) ndarray
        """
        c = _conn(conn, self.n_dofs)
        K = np.asarray(local, dtype=np.float64)
        E, k = c.shape
        if K.shape != (E, k, k):
            raise ShapeError(f"local matrices must have shape ({E}, {k}, {k}), got {K.shape}")
        if np.any(c < 0):
            raise FemError("lifting needs the full connectivity (no negative entries), "
                           "not the restricted one")
        out = np.zeros((E, k))
        ge = self._g[c]
        touch = np.flatnonzero(np.any(ge != 0.0, axis=1))  # only cells with nonzero prescribed values
        if touch.size:
            out[touch] = -np.einsum("eab,eb->ea", K[touch], ge[touch])
            out[touch] *= ~self.is_fixed[c[touch]]
        return out

    def system(self, conn, local, f=None):
        """Condensed system ``(K_FF, f_F - K_FD g)`` assembled with :func:`assemble`.

        Parameters
        ----------
        conn, local
            Full connectivity (E, k) and local matrices (E, k, k).
        f
            Full (n_dofs,) load vector (default 0).

        Returns
        -------
        A : scipy.sparse.csr_array (n_free, n_free)
        b : (n_free,) ndarray
        """
        cf = self.restrict(conn)
        A = assemble(cf, local, self.n_free)
        b = assemble_vector(cf, self.lifting(conn, local), self.n_free)
        if f is not None:
            fv = np.asarray(f, dtype=np.float64)
            if fv.shape != (self.n_dofs,):
                raise ShapeError(f"f must have shape ({self.n_dofs},), got {fv.shape}")
            b += fv[self.free]
        return A, b


def condense(n_dofs: int, fixed_dofs, values=None) -> DofMap:
    """Build a :class:`DofMap` for ``n_dofs`` dofs with ``fixed_dofs`` prescribed.

    Parameters
    ----------
    n_dofs
        Total number of dofs.
    fixed_dofs
        Integer indices (any order; repeats allowed if their values agree).
    values
        ``None`` (homogeneous, 0), a scalar, or one value per entry of
        ``fixed_dofs``.

    Raises
    ------
    FemError
        Dofs out of range, non-integer dofs, the same dof prescribed with
        different values, NaN/Inf values.
    ShapeError
        ``values`` length differs from ``fixed_dofs``.
    """
    n = _size(n_dofs, "n_dofs")
    idx = np.asarray(fixed_dofs).ravel()
    if idx.size and idx.dtype.kind not in "iu":
        raise FemError(f"fixed_dofs must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    bad = np.flatnonzero((idx < 0) | (idx >= n))
    if bad.size:
        raise FemError(f"fixed dof {int(idx[bad[0]])} is outside [0, {n - 1}] (n_dofs = {n})")
    if values is None:
        vals = np.zeros(idx.size)
    else:
        vals = np.asarray(values, dtype=np.float64)
        if vals.ndim == 0:
            vals = np.full(idx.size, float(vals))
        vals = vals.ravel()
        if vals.size != idx.size:
            raise ShapeError(f"values has {vals.size} entries but fixed_dofs has {idx.size}; give one "
                             f"value per fixed dof or a scalar")
        if not np.all(np.isfinite(vals)):
            raise FemError("prescribed values contain NaN or Inf")
    order = np.lexsort((vals, idx))
    idx, vals = idx[order], vals[order]
    if idx.size > 1:
        same = idx[1:] == idx[:-1]
        clash = np.flatnonzero(same & (vals[1:] != vals[:-1]))
        if clash.size:
            i = int(clash[0])
            raise FemError(f"dof {int(idx[i])} is prescribed twice with different values "
                           f"{float(vals[i])!r} and {float(vals[i + 1])!r}; give each dof one value")
        keep = np.concatenate([[True], ~same])
        idx, vals = idx[keep], vals[keep]
    dm = DofMap(n, idx, vals)
    logger.debug("condense: %s", dm)
    return dm


def require_dirichlet(fixed_dofs, what: str = "Poisson") -> np.ndarray:
    """Raise if no dof is fixed (the pure-Neumann problem is singular).

    Returns
    -------
    ndarray
        ``fixed_dofs`` as an array.

    Raises
    ------
    SingularProblemError
        ``fixed_dofs`` is empty.
    """
    arr = np.asarray(fixed_dofs).ravel()
    if arr.size == 0:
        raise SingularProblemError(
            f"{what}: no Dirichlet dofs; the pure-Neumann problem is singular: give a Dirichlet "
            f"boundary, e.g. dirichlet='left'"
        )
    return arr
