"""Discretization errors of P1 / Q1 fields by element quadrature (vectorised)."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..mesh import Mesh
from ..mesh._reference import jacobians, shape_functions
from ._errors import FemError
from .quadrature import cell_rule


def error_norms(mesh: Mesh, u_h, exact, grad=None, degree: int = 5):
    """L2 and H1-seminorm errors of the P1/Q1 field ``u_h`` against ``exact``.

    ``||u - u_h||_0^2 = sum_e sum_q w_q |det J_eq| (u(x_eq) - u_h(x_eq))^2`` and
    ``|u - u_h|_1^2 = sum_e sum_q w_q |det J_eq| |grad u(x_eq) - grad u_h(x_eq)|^2``
    with ``x_eq = sum_a N_a(xi_q) x_a``, ``u_h = sum_a N_a u_a``,
    ``grad u_h = sum_a J^{-T} grad_ref N_a u_a`` and a rule of the given
    polynomial ``degree``.

    Parameters
    ----------
    mesh
        Any supported mesh.
    u_h
        (N,) nodal values.
    exact
        Callable ``exact(x) -> (M,)`` for points ``x`` of shape (M, dim).
    grad
        Optional callable ``grad(x) -> (M, dim)``; without it only the L2
        error is computed (and ``None`` returned for the H1 error).
    degree
        Quadrature degree.

    Returns
    -------
    l2 : float
    h1 : float or None
    """
    if not isinstance(mesh, Mesh):
        raise FemError(f"error_norms needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
    u = np.asarray(u_h, dtype=np.float64)
    if u.shape != (mesh.n_nodes,):
        raise ShapeError(f"u_h must have one value per node, shape ({mesh.n_nodes},), got {u.shape}")
    xq, wq = cell_rule(mesh.cell_type, degree)
    N, dn = shape_functions(mesh.cell_type, xq)  # (q, k), (q, d, k)
    J = jacobians(mesh.points, mesh.cells, dn)  # (E, q, d, d)
    det = np.linalg.det(J)
    dx = np.abs(det) * wq  # (E, q)
    xphys = np.einsum("qa,eai->eqi", N, mesh.points[mesh.cells])
    ue = u[mesh.cells]  # (E, k)
    uh = ue @ N.T  # (E, q)
    pts = xphys.reshape(-1, mesh.dim)
    ex = np.asarray(exact(pts), dtype=np.float64).reshape(uh.shape)
    l2 = float(np.sqrt(np.sum(dx * (ex - uh) ** 2)))
    if grad is None:
        return l2, None
    gref = np.einsum("qja,ea->eqj", dn, ue)  # reference gradient of u_h
    gh = np.linalg.solve(np.swapaxes(J, -1, -2), gref[..., None])[..., 0]  # J^T g = gref
    gx = np.asarray(grad(pts), dtype=np.float64).reshape(gh.shape)
    h1 = float(np.sqrt(np.sum(dx * np.sum((gx - gh) ** 2, axis=-1))))
    return l2, h1
