"""The LinearSolver protocol and solve counters.

A solver factorizes A once (``factorize(A) -> Factorization``) and the
factorization solves with A and with A^T (``solve(rhs, transpose=True)``), so
that the forward, adjoint, tangent and second-adjoint solves of one parameter
value share it. For an iterative solver the "factorization" is the
preconditioner (an AMG hierarchy) and ``solve`` runs a Krylov method to a
relative tolerance chosen per solve kind; a direct factorization ignores the
tolerance (``exact = True``). Every factorization, solve, right-hand side and
Krylov iteration is counted.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .._validate import check_finite
from ..errors import ConvergenceWarning, ShapeError, SingularMatrixError, SolverDidNotConverge

logger = logging.getLogger(__name__)

SOLVE_KINDS = ("forward", "adjoint", "tangent", "second_adjoint", "other")


@dataclass
class SolverStats:
    """Counters of a solver.

    ``factorizations`` counts factorizations of A (for AMG: hierarchy setups
    for A); ``transpose_factorizations`` counts separate setups for A^T (AMG on
    a nonsymmetric A builds one lazily; a direct factorization never needs
    one). ``factor_nnz`` sums the nonzeros of the factors (for AMG: of all
    levels' operators and transfers). ``solves``, ``rhs``, ``iterations`` and
    ``solve_time`` are counted by solve kind (:data:`SOLVE_KINDS`).
    """

    factorizations: int = 0
    transpose_factorizations: int = 0
    factorization_time: float = 0.0
    factor_nnz: int = 0
    solves: Counter = field(default_factory=Counter)
    rhs: Counter = field(default_factory=Counter)
    iterations: Counter = field(default_factory=Counter)
    solve_time: Counter = field(default_factory=Counter)

    @property
    def total_solves(self) -> int:
        return sum(self.solves.values())

    def reset(self) -> None:
        """Set every counter to zero."""
        self.__init__()

    def as_dict(self) -> dict:
        """Plain-dict view (for JSON)."""
        return {
            "factorizations": self.factorizations,
            "transpose_factorizations": self.transpose_factorizations,
            "factorization_time": self.factorization_time,
            "factor_nnz": self.factor_nnz,
            "solves": dict(self.solves),
            "total_solves": self.total_solves,
            "rhs": dict(self.rhs),
            "iterations": dict(self.iterations),
            "solve_time": dict(self.solve_time),
        }

    def __str__(self):
        kinds = ", ".join(f"{k}={v}" for k, v in self.solves.items())
        setups = f"{self.factorizations} factorization(s)"
        if self.transpose_factorizations:
            setups += f" + {self.transpose_factorizations} of A^T"
        text = (
            f"{setups} in {self.factorization_time:.3g} s; "
            f"{self.total_solves} solve(s) [{kinds}] in {sum(self.solve_time.values()):.3g} s"
        )
        if self.iterations:
            text += "; Krylov iterations [" + ", ".join(f"{k}={v}" for k, v in self.iterations.items()) + "]"
        return text


class Factorization:
    """A factorized matrix that solves with A and A^T. Subclasses implement :meth:`_solve`.

    ``_solve(rhs, transpose, kind, tol)`` gets validated (n,) or (n, k)
    right-hand sides; a direct factorization ignores ``kind`` and ``tol``.
    """

    #: relative residual above which the forward solve declares A singular
    singular_residual = 1e-6
    #: True for direct factorizations: every solve is exact to round-off, whatever the tolerance
    exact = True

    def __init__(self, A: sp.sparray, stats: SolverStats):
        self.A = A
        self.n = A.shape[0]
        self.stats = stats

    @property
    def nbytes(self) -> int:
        """Memory held by the factorization (bytes, an estimate)."""
        return 0

    def tolerance(self, kind: str, tol: float | None = None) -> float:
        """The relative residual a ``kind`` solve with ``tol`` reaches: 0 for a direct factorization."""
        return 0.0

    def solve(self, rhs, transpose: bool = False, kind: str = "other", tol: float | None = None) -> np.ndarray:
        """Solve A x = rhs (or A^T x = rhs) for (n,) or (n, k) right-hand sides.

        ``kind`` (one of :data:`SOLVE_KINDS`) labels the counters and picks an
        iterative solver's default tolerance; ``tol`` overrides that relative
        tolerance for this solve (ignored by direct factorizations).
        """
        if kind not in SOLVE_KINDS:
            raise ValueError(f"unknown solve kind {kind!r}; use one of {SOLVE_KINDS}")
        if tol is not None and not 0 < tol < 1:
            raise ValueError(f"tol must be a relative tolerance in (0, 1), got {tol}")
        rhs = np.asarray(rhs, dtype=np.float64)
        if rhs.ndim not in (1, 2) or rhs.shape[0] != self.n:
            raise ShapeError(f"right-hand side must have shape ({self.n},) or ({self.n}, k), got {rhs.shape}")
        check_finite(rhs, f"right-hand side of the {kind} solve")
        t0 = time.perf_counter()
        x = self._solve(rhs, transpose, kind, tol)
        self.stats.solve_time[kind] += time.perf_counter() - t0
        self.stats.solves[kind] += 1
        self.stats.rhs[kind] += 1 if rhs.ndim == 1 else rhs.shape[1]
        if not np.all(np.isfinite(x)):
            raise SingularMatrixError(_singular_message("the solution has NaN or Inf entries"))
        return x

    def check_residual(self, x: np.ndarray, rhs: np.ndarray) -> None:
        """Raise :class:`SingularMatrixError` if ||A x - rhs|| is not small relative to ||rhs||."""
        r = np.linalg.norm(self.A @ x - rhs)
        scale = np.linalg.norm(rhs)
        if scale > 0 and r > self.singular_residual * scale:
            raise SingularMatrixError(
                _singular_message(f"the direct solve left a relative residual of {r / scale:.2g}")
            )

    def _solve(self, rhs, transpose, kind, tol):
        raise NotImplementedError


def per_kind_tolerances(tol, default: float) -> dict:
    """{kind: relative tolerance} from a float (every kind) or a partial dict (the rest get ``default``)."""
    if isinstance(tol, dict):
        unknown = set(tol) - set(SOLVE_KINDS)
        if unknown:
            raise ValueError(f"unknown solve kind(s) {sorted(unknown)} in tol; the kinds are {SOLVE_KINDS}")
        out = {k: default for k in SOLVE_KINDS}
        out.update(tol)
    else:
        out = {k: tol for k in SOLVE_KINDS}
    for k, t in out.items():
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and 0 < t < 1):
            raise ValueError(f"the {k} tolerance must be a relative tolerance in (0, 1), got {t!r}")
    return {k: float(t) for k, t in out.items()}


def report_nonconvergence(on_failure: str, message: str, history) -> None:
    """An iterative solve missed its tolerance: raise :class:`SolverDidNotConverge` (with the residual
    history), or log and warn with :class:`ConvergenceWarning` when ``on_failure == "warn"``."""
    if on_failure == "warn":
        logger.warning(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=5)
    else:
        raise SolverDidNotConverge(message, history)


def _singular_message(detail: str) -> str:
    return (
        f"the system matrix A(p) is singular to working precision ({detail}). The likely cause is a "
        "missing boundary condition (a pure-Neumann problem: give a Dirichlet boundary), or a "
        "coefficient that vanishes on part of the domain (check p and the coefficient map)."
    )


class LinearSolver:
    """Protocol: ``factorize(A) -> Factorization``; owns the :class:`SolverStats`."""

    name = "abstract"
    #: module a backend imports and the pip extra that installs it (None: always available)
    requires: str | None = None
    extra: str | None = None

    @classmethod
    def available(cls) -> bool:
        """True when the backend's package can be imported."""
        if cls.requires is None:
            return True
        import importlib.util

        try:
            return importlib.util.find_spec(cls.requires) is not None
        except ModuleNotFoundError:  # a missing parent package
            return False

    def __init__(self):
        self.stats = SolverStats()

    def factorize(self, A) -> Factorization:
        A = sp.csr_array(A)
        if A.shape[0] != A.shape[1]:
            raise ShapeError(f"A must be square, got shape {A.shape}")
        check_finite(A.data, "the values of A(p)")
        t0 = time.perf_counter()
        fac = self._factorize(A)
        self.stats.factorization_time += time.perf_counter() - t0
        self.stats.factorizations += 1
        self.stats.factor_nnz += getattr(fac, "factor_nnz", 0)
        return fac

    def _factorize(self, A) -> Factorization:
        raise NotImplementedError
