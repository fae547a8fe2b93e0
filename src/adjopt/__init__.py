"""adjopt: sparse, large-scale, PDE-constrained adjoint optimization.

A user with a parametric sparse system A(p) u = b(p) and an objective
f(u, p) gets J(p), its gradient and Hessian-vector products at the cost of a
handful of solves that share one factorization.
"""

import logging

from . import _threads  # noqa: F401  (first: OpenMP's wait policy is read when numba loads it)
from .errors import (
    AdjoptError,
    CacheTooSmallError,
    MissingDerivativeError,
    NewtonDidNotConverge,
    NonFiniteError,
    PatternError,
    ShapeError,
    SingularMatrixError,
    SolverDidNotConverge,
)
from .functional import ReducedFunctional
from .functional_nonlinear import NewtonOptions, NonlinearReducedFunctional
from .objectives import (
    Compliance,
    Norm,
    Objective,
    ParameterFunctional,
    SquaredMisfit,
    TikhonovH1,
    TikhonovL2,
    TotalVariation,
    Volume,
)
from .operators import (
    SIMP,
    AffineVector,
    CallbackMatrix,
    ElementMatrix,
    ElementVector,
    element_matrix_from_triplets,
    CallbackVector,
    ConstantMatrix,
    ConstantVector,
    ElementCoefficientMatrix,
    ElementCoefficientVector,
    Exp,
    Identity,
    CallbackResidual,
    ElementResidual,
    ParametricMatrix,
    ParametricResidual,
)
from .optimize import OptimizeResult, minimize
from .problem import Problem
from .priors import BiLaplacianPrior
from . import uq  # noqa: F401  (adjopt.uq: low-rank Hessians and the Laplace posterior)
from . import transient  # noqa: F401  (adjopt.transient: time-dependent problems)
from .solvers import DirectSolver
from .verify import check_hessian_symmetry, taylor_test

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ReducedFunctional", "NonlinearReducedFunctional", "NewtonOptions", "Problem", "minimize", "OptimizeResult",
    "taylor_test", "check_hessian_symmetry", "ParametricResidual", "ElementResidual", "CallbackResidual",
    "ParametricMatrix", "ElementCoefficientMatrix", "CallbackMatrix", "ElementMatrix", "ElementVector",
    "element_matrix_from_triplets", "ConstantMatrix", "Identity", "Exp", "SIMP",
    "ConstantVector", "AffineVector", "ElementCoefficientVector", "CallbackVector",
    "Objective", "Norm", "SquaredMisfit", "Compliance", "DirectSolver",
    "TikhonovL2", "TikhonovH1", "TotalVariation", "Volume", "ParameterFunctional", "BiLaplacianPrior",
    "AdjoptError", "ShapeError", "NonFiniteError", "PatternError", "SingularMatrixError",
    "SolverDidNotConverge", "NewtonDidNotConverge", "MissingDerivativeError", "CacheTooSmallError",
]
