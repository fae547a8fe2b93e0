"""Linear solvers: factorize once per p, solve with A and A^T.

Backends: SuperLU (``"superlu"``, always there), AMG-preconditioned Krylov
(``"amg"``, pyamg), CHOLMOD (``"cholmod"``, extra ``cholmod``) and PARDISO
(``"pardiso"``, extra ``pardiso``); ``"auto"`` picks the fastest installed.
:class:`GMGSolver` (geometric multigrid CG on structured grids) needs the grid,
so it is constructed, not named.
"""

from .amg import AMGSolver
from .auto import DIRECT_LIMIT, AutoSolver, backends, installed
from .base import SOLVE_KINDS, Factorization, LinearSolver, SolverStats
from .cholmod import CholmodSolver
from .direct import DirectSolver, is_symmetric
from .gmg import GMG_AUTO_MIN_DOFS, GMGSolver, structured_solver
from .pardiso import PardisoError, PardisoSolver

__all__ = [
    "LinearSolver", "Factorization", "SolverStats", "SOLVE_KINDS", "DirectSolver", "AMGSolver", "CholmodSolver",
    "PardisoSolver", "PardisoError", "GMGSolver", "structured_solver", "GMG_AUTO_MIN_DOFS", "AutoSolver", "DIRECT_LIMIT", "is_symmetric", "make_solver", "backends", "installed",
]

#: names accepted by :func:`make_solver` besides the backends' own
ALIASES = {"direct": "superlu"}


def make_solver(solver=None) -> LinearSolver:
    """A :class:`LinearSolver` from an instance, ``None`` (= ``"auto"``) or a name.

    Names: ``"auto"``, ``"superlu"`` (or ``"direct"``), ``"amg"``,
    ``"cholmod"``, ``"pardiso"``. A backend whose package is missing raises
    :class:`~adjopt.errors.MissingBackendError` naming the pip extra.
    """
    if solver is None:
        return AutoSolver()
    if isinstance(solver, LinearSolver):
        return solver
    if isinstance(solver, str):
        name = ALIASES.get(solver.lower(), solver.lower())
        if name == "auto":
            return AutoSolver()
        known = backends()
        if name in known:
            return known[name]()
    names = sorted(["auto", *backends(), *ALIASES])
    raise ValueError(f"unknown solver {solver!r}; known solvers: {names} (or pass a LinearSolver instance)")
