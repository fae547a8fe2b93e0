"""``solver="auto"``: the fastest solver installed for the size and symmetry of A.

The choice is made on the first factorization (A(p) keeps its size and
symmetry as p changes), logged at INFO level, and kept:

- more than ``direct_limit`` unknowns: :class:`~adjopt.solvers.AMGSolver`
  (a factorization of a large 3D problem does not fit in memory);
- fewer than ``small_limit`` unknowns: CHOLMOD for a symmetric A when it is
  installed, else SuperLU; never PARDISO there, whose first use loads MKL
  (about 0.6 s, more than a whole small run). CHOLMOD has no such cost and
  factorizes 2D elasticity 2.4-2.7x faster than SuperLU from 6.6k to 15k
  unknowns (6.9 against 4.5 ms at 1.7k), measured on the development machine;
- symmetric: CHOLMOD if installed, else PARDISO if installed, else SuperLU
  with a symmetric ordering; CHOLMOD falls back to the next one if A is
  symmetric but not positive definite;
- nonsymmetric: PARDISO if installed, else SuperLU.
"""

from __future__ import annotations

import logging

from ..errors import NotPositiveDefiniteError
from .base import LinearSolver
from .direct import is_symmetric

logger = logging.getLogger(__name__)

#: unknowns above which "auto" uses AMG rather than a factorization
DIRECT_LIMIT = 300_000
#: unknowns below which "auto" does not use PARDISO (CHOLMOD for symmetric A when installed, else SuperLU)
SMALL_LIMIT = 50_000


def backends() -> dict:
    """{name: LinearSolver class} of every backend adjopt knows, installed or not."""
    from .amg import AMGSolver
    from .cholmod import CholmodSolver
    from .direct import DirectSolver
    from .pardiso import PardisoSolver

    return {"superlu": DirectSolver, "cholmod": CholmodSolver, "pardiso": PardisoSolver, "amg": AMGSolver}


def installed() -> list[str]:
    """Names of the backends whose packages are installed."""
    return [name for name, cls in backends().items() if cls.available()]


class AutoSolver(LinearSolver):
    """Pick a backend on the first factorization; see the module docstring for the rule.

    Parameters
    ----------
    direct_limit
        Unknowns above which AMG is used. 2D problems of a few million
        unknowns still factor well with CHOLMOD or PARDISO: pass
        ``solver="cholmod"`` (or raise the limit) for those.
    small_limit
        Unknowns below which PARDISO is not used (its start-up costs more than it saves).
    amg_options
        Keyword arguments for :class:`~adjopt.solvers.AMGSolver` when AMG is chosen.
    """

    name = "auto"

    def __init__(self, direct_limit: int = DIRECT_LIMIT, amg_options: dict | None = None,
                 small_limit: int = SMALL_LIMIT):
        super().__init__()
        for name, v in (("direct_limit", direct_limit), ("small_limit", small_limit)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        self.direct_limit = direct_limit
        self.small_limit = small_limit
        self.amg_options = dict(amg_options or {})
        self.chosen: LinearSolver | None = None
        self._refused: set[str] = set()  # backends that refused an A(p) of this functional

    def _candidates(self, A) -> list[str]:
        if A.shape[0] > self.direct_limit:
            return ["amg"]
        have = installed()
        if A.shape[0] < self.small_limit:
            small = ["cholmod", "superlu"] if is_symmetric(A) else ["superlu"]
            return [name for name in small if name in have and name not in self._refused]
        order = ["cholmod", "pardiso", "superlu"] if is_symmetric(A) else ["pardiso", "superlu"]
        return [name for name in order if name in have and name not in self._refused]

    def _make(self, name: str) -> LinearSolver:
        cls = backends()[name]
        solver = cls(**self.amg_options) if name == "amg" else cls()
        solver.stats = self.stats  # one set of counters, whoever does the work
        return solver

    def recycle(self, factorization) -> None:
        if self.chosen is not None:
            self.chosen.recycle(factorization)

    def _factorize(self, A):
        if self.chosen is not None:
            try:
                return self.chosen._factorize(A)
            except NotPositiveDefiniteError:
                # A(p) was symmetric positive definite where the choice was made and is not at this p (a
                # parameter that makes it nonsymmetric): choose again, without CHOLMOD
                if self.chosen.name != "cholmod":
                    raise
                logger.info("solver='auto': CHOLMOD refused A(p) at this p (not symmetric positive definite); "
                            "choosing again without it")
                self._refused.add("cholmod")
                self.chosen = None
        names = self._candidates(A)
        for i, name in enumerate(names):
            solver = self._make(name)
            try:
                fac = solver._factorize(A)
            except NotPositiveDefiniteError:
                if i + 1 == len(names):
                    raise
                logger.info("solver='auto': %s refused A (not positive definite); trying %s", name, names[i + 1])
                continue
            self.chosen = solver
            self.name = f"auto:{name}"
            logger.info("solver='auto' chose %s for n=%d, nnz=%d (installed: %s)", name, A.shape[0], A.nnz,
                        ", ".join(installed()))
            return fac
        raise AssertionError("unreachable: SuperLU and AMG are always installed")
