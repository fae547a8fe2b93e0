"""Objectives f(u, p) with the derivative actions of the adjoint formulas."""

from .base import Objective, Scaled, Sum
from .regularization import (
    ParameterFunctional,
    ParameterObjective,
    TikhonovH1,
    TikhonovL2,
    TotalVariation,
    Volume,
)
from .state import Compliance, Norm, SquaredMisfit

__all__ = [
    "Objective", "Sum", "Scaled", "Norm", "SquaredMisfit", "Compliance",
    "ParameterObjective", "ParameterFunctional", "TikhonovL2", "TikhonovH1", "TotalVariation", "Volume",
]
