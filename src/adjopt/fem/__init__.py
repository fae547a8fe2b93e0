"""Finite elements for adjopt: element kernels, assembly helpers, loads, Dirichlet condensation.

Scalar problems use node indices as dofs (connectivity ``mesh.cells``);
vector problems use ``dof = node * dim + component``
(connectivity :func:`vector_dofs`). Element functions return the local
matrices of all cells at once, shape (E, k, k).
"""

from ._errors import FemError, SingularProblemError
from .assembly import assemble, assemble_vector, boundary_dofs, vector_dofs
from .dirichlet import DofMap, condense, require_dirichlet
from .elements import (
    advection_diffusion,
    advection_diffusion_load,
    check_jacobians,
    elasticity_matrix,
    lumped_mass,
    mass_matrices,
    p1_elasticity,
    p1_mass,
    p1_stiffness,
    q1_elasticity,
    q1_laplace,
    q1_mass,
)
from .nonlinear import diffusion_reaction_residual, element_geometry
from .loads import body_force, facet_shape_integrals, point_load, traction
from .norms import error_norms
from .nullspace import rigid_body_modes
from .observation import observation_operator
from .quadrature import cell_rule, tetra_rule, triangle_rule

__all__ = [
    "diffusion_reaction_residual",
    "element_geometry",
    "rigid_body_modes",
    "observation_operator",
    "DofMap",
    "FemError",
    "SingularProblemError",
    "advection_diffusion",
    "advection_diffusion_load",
    "assemble",
    "assemble_vector",
    "body_force",
    "boundary_dofs",
    "cell_rule",
    "check_jacobians",
    "condense",
    "elasticity_matrix",
    "error_norms",
    "facet_shape_integrals",
    "lumped_mass",
    "mass_matrices",
    "p1_elasticity",
    "p1_mass",
    "p1_stiffness",
    "point_load",
    "q1_elasticity",
    "q1_laplace",
    "q1_mass",
    "require_dirichlet",
    "tetra_rule",
    "traction",
    "triangle_rule",
    "vector_dofs",
]
