"""Linear solvers: factorize once per p, solve with A and A^T."""

from .base import SOLVE_KINDS, Factorization, LinearSolver, SolverStats
from .amg import AMGSolver
from .direct import DirectSolver, is_symmetric

__all__ = ["LinearSolver", "Factorization", "SolverStats", "SOLVE_KINDS", "DirectSolver", "AMGSolver", "is_symmetric", "make_solver"]


def make_solver(solver=None) -> LinearSolver:
    """A :class:`LinearSolver` from an instance, ``None`` (default) or a name."""
    if solver is None:
        return DirectSolver()
    if isinstance(solver, LinearSolver):
        return solver
    names = {"superlu": DirectSolver, "direct": DirectSolver, "amg": AMGSolver}
    if isinstance(solver, str) and solver.lower() in names:
        return names[solver.lower()]()
    raise ValueError(f"unknown solver {solver!r}; known solvers: {sorted(names)} (or pass a LinearSolver instance)")
