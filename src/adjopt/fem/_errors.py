"""Exceptions of :mod:`adjopt.fem`."""

from __future__ import annotations

from ..errors import AdjoptError


class FemError(AdjoptError, ValueError):
    """Invalid input to a finite-element routine (wrong element type, option, field)."""


class SingularProblemError(FemError):
    """The problem as posed has no unique solution (e.g. pure Neumann)."""
