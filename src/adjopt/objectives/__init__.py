"""Objectives f(u, p) with the derivative actions of the adjoint formulas."""

from .base import Objective, Scaled, Sum
from .state import Compliance, Norm, SquaredMisfit

__all__ = ["Objective", "Sum", "Scaled", "Norm", "SquaredMisfit", "Compliance"]
