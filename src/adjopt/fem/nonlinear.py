"""Quadrature data for element residuals, and the diffusion-reaction residual on a mesh.

:func:`element_geometry` gives the shape values, physical gradients and weights that the nonlinear element
kernels integrate with; :func:`diffusion_reaction_residual` builds an
:class:`~adjopt.operators.ElementResidual` from a mesh in one call.
"""

from __future__ import annotations

import numpy as np

from ..mesh import Mesh
from ..mesh._reference import CELLS, shape_functions
from ._errors import FemError
from .elements import check_jacobians
from .quadrature import cell_rule

#: default quadrature degree by cell: 2 on simplices (exact for q(u) grad u . grad v with P1; a rule exact for
#: degree 2 keeps P1's L2 rate 2 for u^3 and exp(u) too), 3 on quads and hexahedra (2 Gauss points per direction)
DEFAULT_DEGREE = {"triangle": 2, "tetra": 2, "quad": 3, "hexahedron": 3}


def element_geometry(mesh: Mesh, degree: int | None = None):
    """(N, G, W) of every cell at the points of a rule of ``degree`` (default :data:`DEFAULT_DEGREE`).

    N (nq, k) shape values; G physical shape gradients, (E, 1, k, d) on simplices (constant in the cell) and
    (1, nq, k, d) when every cell is a translate of the first (a structured grid), else (E, nq, k, d);
    W weights times ``|det J|``, (E or 1, nq). Raises :class:`~adjopt.mesh.InvalidElementError` on a degenerate
    or tangled cell (det J vanishing or changing sign), as the linear element kernels do.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be an adjopt Mesh, got {type(mesh).__name__}")
    xq, wq = cell_rule(mesh.cell_type, DEFAULT_DEGREE.get(mesh.cell_type, 2) if degree is None else degree)
    N, dn = shape_functions(mesh.cell_type, xq)  # (nq, k), (nq, d, k)
    X = np.asarray(mesh.points, dtype=np.float64)[mesh.cells]  # (E, k, d)
    simplex = CELLS[mesh.cell_type].simplex
    if simplex:
        dn = dn[:1]
    else:
        rel = X - X[:, :1, :]
        scale = np.max(np.abs(rel[0])) if rel.size else 1.0
        if np.allclose(rel, rel[:1], rtol=0.0, atol=1e-12 * scale):
            X = X[:1]
    J = np.einsum("eai,qja->eqij", X, dn)  # dx_i / dxi_j
    det = np.linalg.det(J)
    if not np.all(np.isfinite(det)):
        raise FemError("a cell has a non-finite Jacobian determinant: the mesh's points hold NaN, Inf or huge values")
    check_jacobians(mesh, det)  # degenerate or tangled cells (det J vanishing or changing sign) are refused
    G = np.einsum("eqji,qja->eqai", np.linalg.inv(J), dn)  # grad_x N_a = J^{-T} grad_xi N_a
    W = np.abs(det) * wq[None, :] if not simplex else np.abs(det[:, :1]) * wq[None, :]
    return np.ascontiguousarray(N), np.ascontiguousarray(G), np.ascontiguousarray(W)


def diffusion_reaction_residual(mesh: Mesh, dofmap=None, diffusion=1.0, beta: float = 0.0, reaction=0.0,
                                nonlinearity: str | None = None, source=None, degree: int | None = None):
    """R(u, p) for -div(a q(u) grad u) + c g(u) = f on ``mesh`` (P1 or Q1, 2D or 3D).

    See :class:`~adjopt.operators.ElementResidual` for the arguments; ``source`` is the load vector on the free
    dofs (for f given at the nodes: ``dofmap.restrict_vector(M @ f)`` with the mass matrix M). ``degree`` is
    the quadrature degree (default :data:`DEFAULT_DEGREE`); a higher one integrates u^3 or exp(u) more exactly
    at more cost, with the same convergence rate.

    >>> import adjopt
    >>> msh = adjopt.mesh.unit_square(8)
    >>> dm = adjopt.fem.condense(msh.n_nodes, adjopt.fem.boundary_dofs(msh, "all"))
    >>> R = adjopt.fem.diffusion_reaction_residual(msh, dm, diffusion="exp", beta=1.0)
    >>> R.n, R.n_params
    (49, 128)
    """
    from ..operators.element_residual import ElementResidual

    if mesh.cell_type not in ("triangle", "tetra", "quad", "hexahedron"):
        raise FemError(f"element residuals need triangle, tetra, quad or hexahedron cells, got {mesh.cell_type}")
    N, G, W = element_geometry(mesh, degree)
    return ElementResidual(mesh.cells, N, G, W, n_nodes=mesh.n_nodes, dofmap=dofmap, diffusion=diffusion, beta=beta,
                           reaction=reaction, nonlinearity=nonlinearity, source=source)
