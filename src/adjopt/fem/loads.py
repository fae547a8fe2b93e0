"""Load vectors: body forces, point loads, boundary tractions / fluxes."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ShapeError
from ..mesh import Mesh
from ..mesh._reference import CELLS, shape_functions, tensor_gauss
from . import _kernels
from ._errors import FemError
from .assembly import _size, assemble_vector
from .elements import check_jacobians
from .quadrature import cell_rule

logger = logging.getLogger(__name__)


def _finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise FemError(f"{name} contains NaN or Inf")


def _mass_integrals(mesh: Mesh, f=None) -> np.ndarray:
    """Row sums ``int N_a`` (E, k) of the unit consistent mass matrices, or ``M_e f_e`` (E, k, m).

    Same quadrature as :func:`adjopt.fem.mass_matrices` (degree 2 on simplices,
    2x2 / 2x2x2 Gauss on quads / hexahedra) and the same Jacobian check, but
    the (E, k, k) local matrices are never formed. ``f`` is (N, m) nodal values.
    """
    degree = 2 if CELLS[mesh.cell_type].simplex else 3
    xq, wq = cell_rule(mesh.cell_type, degree)
    nq, dn = shape_functions(mesh.cell_type, xq)
    nq, dn, wq = np.ascontiguousarray(nq), np.ascontiguousarray(dn), np.ascontiguousarray(wq)
    # affine cells (constant reference gradients): det J is the same at every point, keep one column
    detj = np.empty((mesh.n_cells, 1 if np.all(dn == dn[:1]) else wq.size))
    E, k = mesh.cells.shape
    if f is None:
        out = np.empty((E, k))
        _kernels.mass_rowsum_kernel(mesh.points, mesh.cells, nq, dn, wq, out, detj)
    else:
        out = np.empty((E, k, f.shape[1]))
        _kernels.mass_apply_kernel(mesh.points, mesh.cells, nq, dn, wq, np.ascontiguousarray(f), out, detj)
    check_jacobians(mesh, detj)
    return out


def body_force(mesh: Mesh, f) -> np.ndarray:
    """Consistent load vector ``b_i = int f N_i`` (P1 or Q1 shape functions ``N_i``).

    ``f`` may be

    * a scalar: constant source, ``b_i = f int N_i`` -> (N,);
    * (N,) nodal values, ``f_h = sum_j f_j N_j``: ``b = M f`` with the
      consistent mass matrix -> (N,);
    * (dim,) constant vector: ``b[i*dim + c] = f_c int N_i`` -> (N*dim,);
    * (N, dim) nodal vector field: ``b[i*dim + c] = (M f[:, c])_i`` -> (N*dim,).

    The element integrals use the quadrature of :func:`mass_matrices`
    without forming the local mass matrices; assembled with ``np.bincount``
    over ``mesh.cells``.

    Raises
    ------
    FemError
        Any other shape, NaN/Inf values.
    """
    if not isinstance(mesh, Mesh):
        raise FemError(f"body_force needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
    fv = np.asarray(f, dtype=np.float64)
    _finite(fv, "f")
    N, d = mesh.n_nodes, mesh.dim
    cells = mesh.cells
    if fv.ndim == 0:
        return assemble_vector(cells, float(fv) * _mass_integrals(mesh), N)
    if fv.shape == (N,):
        return assemble_vector(cells, _mass_integrals(mesh, fv[:, None])[:, :, 0], N)
    if fv.shape == (d,):
        w = _mass_integrals(mesh)  # int N_a per cell
        local = w[:, :, None] * fv[None, None, :]
    elif fv.shape == (N, d):
        local = _mass_integrals(mesh, fv)
    else:
        _mass_integrals(mesh)  # invalid cells are reported before a bad f, as they always were
        raise ShapeError(f"f must be a scalar, ({N},) nodal values, ({d},) a constant vector or "
                         f"({N}, {d}) a nodal vector field; got shape {fv.shape}")
    out = np.bincount((cells[:, :, None] * d + np.arange(d)).ravel(), weights=local.ravel(),
                      minlength=N * d)
    return out


def point_load(n_dofs: int, dofs, values) -> np.ndarray:
    """Vector of length ``n_dofs`` with ``values`` added at ``dofs`` (repeated dofs add up).

    Parameters
    ----------
    n_dofs
        Global size.
    dofs
        Integer dof indices.
    values
        Scalar (same value at every dof) or one value per dof.
    """
    n = _size(n_dofs, "n_dofs")
    idx = np.atleast_1d(np.asarray(dofs))
    if idx.size and idx.dtype.kind not in "iu":
        raise FemError(f"dofs must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64).ravel()
    bad = np.flatnonzero((idx < 0) | (idx >= n))
    if bad.size:
        raise FemError(f"point load dof {int(idx[bad[0]])} is outside [0, {n - 1}]")
    val = np.asarray(values, dtype=np.float64)
    if val.ndim == 0:
        val = np.full(idx.size, float(val))
    val = val.ravel()
    if val.size != idx.size:
        raise ShapeError(f"point_load got {idx.size} dofs but {val.size} values; give one value per dof "
                         f"or a scalar")
    _finite(val, "values")
    return np.bincount(idx, weights=val, minlength=n).astype(np.float64)


def facet_shape_integrals(mesh: Mesh, facets: np.ndarray) -> np.ndarray:
    """``int_F N_a dS`` for the vertices ``a`` of each facet, shape (F, nf).

    Straight edges: ``|F| / 2`` per vertex; flat triangles: ``|F| / 3``;
    bilinear quads: ``sum_q w_q N_a(xi_q) |x_xi x x_eta|`` with 2x2 Gauss
    (exact for parallelograms, and for any bilinear face up to the
    non-polynomial area element).
    """
    xf = mesh.points[facets]  # (F, nf, dim)
    nf = facets.shape[1]
    if nf == 2:
        length = np.linalg.norm(xf[:, 1] - xf[:, 0], axis=1)
        return np.repeat(length[:, None] / 2.0, 2, axis=1)
    if nf == 3:
        area = 0.5 * np.linalg.norm(np.cross(xf[:, 1] - xf[:, 0], xf[:, 2] - xf[:, 0]), axis=1)
        return np.repeat(area[:, None] / 3.0, 3, axis=1)
    xq, wq = tensor_gauss(2, 2)
    nq, dn = shape_functions("quad", xq)  # (q, 4), (q, 2, 4)
    T = np.einsum("fai,qja->fqji", xf, dn)  # tangents (F, q, 2, 3)
    da = np.linalg.norm(np.cross(T[:, :, 0], T[:, :, 1]), axis=2)  # (F, q)
    return np.einsum("fq,q,qa->fa", da, wq, nq)


def traction(mesh: Mesh, boundary_name: str, t) -> np.ndarray:
    """Load vector of a constant traction (or flux) on a named boundary.

    The boundary facets (see :meth:`Mesh.boundary_facets`) whose vertices all
    belong to ``mesh.boundary(boundary_name)`` are integrated:

    * ``t`` scalar (Neumann flux of a scalar problem): ``b_i = t int_G N_i dS``
      -> (N,);
    * ``t`` of shape (dim,) (traction vector): ``b[i*dim + c] = t_c int_G N_i dS``
      -> (N*dim,).

    Raises
    ------
    UnknownBoundaryError
        Unknown name (lists the known ones).
    FemError
        The boundary contains no complete boundary facet, or ``t`` has a bad shape.
    """
    if not isinstance(mesh, Mesh):
        raise FemError(f"traction needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
    nodes = mesh.boundary(boundary_name)
    tv = np.asarray(t, dtype=np.float64)
    d, N = mesh.dim, mesh.n_nodes
    if tv.ndim != 0 and tv.shape != (d,):
        raise ShapeError(f"traction t must be a scalar (flux) or a ({d},) vector, got shape {tv.shape}")
    _finite(tv, "t")
    facets = mesh.boundary_facets()
    on = np.zeros(N, dtype=bool)
    on[nodes] = True
    facets = facets[np.all(on[facets], axis=1)]
    if facets.shape[0] == 0:
        raise FemError(
            f"boundary {boundary_name!r} ({nodes.size} nodes) contains no complete boundary "
            f"{'edge' if d == 2 else 'face'} of the mesh, so nothing can be integrated over it; "
            f"use point_load for loads on isolated nodes"
        )
    w = facet_shape_integrals(mesh, facets)  # (F, nf)
    logger.debug("traction on %r: %d facets, measure %.6g", boundary_name, facets.shape[0], w.sum())
    if tv.ndim == 0:
        return assemble_vector(facets, float(tv) * w, N)
    local = w[:, :, None] * tv[None, None, :]
    return np.bincount((facets[:, :, None] * d + np.arange(d)).ravel(), weights=local.ravel(),
                       minlength=N * d)
