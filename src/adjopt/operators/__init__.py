"""Parametric sparse matrices A(p) and right-hand sides b(p)."""

from .base import ParametricMatrix
from .callback import CallbackMatrix, ConstantMatrix
from .foreign import ElementMatrix, ElementVector, element_matrix_from_triplets
from .coefficients import SIMP, Coefficient, Exp, Identity
from .element import ElementCoefficientMatrix
from .element_residual import ElementResidual
from .residual import CallbackResidual, ParametricResidual
from .vectors import (
    AffineVector,
    CallbackVector,
    ConstantVector,
    ElementCoefficientVector,
    ParametricVector,
    as_vector,
)

__all__ = [
    "ParametricMatrix", "ElementCoefficientMatrix", "ParametricResidual", "ElementResidual", "CallbackResidual", "CallbackMatrix", "ConstantMatrix", "ElementMatrix", "ElementVector", "element_matrix_from_triplets",
    "Coefficient", "Identity", "Exp", "SIMP",
    "ParametricVector", "ConstantVector", "AffineVector", "ElementCoefficientVector", "CallbackVector", "as_vector",
]
