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

import contextlib
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .._threads import column_norms, norm
from .._validate import check_finite, check_tolerance, refuse_complex
from ..errors import ConvergenceWarning, NonFiniteError, ShapeError, SingularMatrixError, SolverDidNotConverge

logger = logging.getLogger(__name__)

SOLVE_KINDS = ("forward", "adjoint", "tangent", "second_adjoint", "other")
#: seed of the random right-hand side that probes a direct factorization for singularity
_PROBE_SEED = 20261203

_BLAS = []  # [threadpoolctl's controller of the BLAS pools loaded when it was made], [None] without threadpoolctl


def blas_controller(rescan: bool = False):
    """threadpoolctl's controller of the BLAS pools (OpenBLAS, MKL, BLIS) loaded when it was first asked for,
    or again with ``rescan`` (a backend that loads a BLAS of its own asks once it has); None without
    threadpoolctl (an optional package)."""
    if rescan:
        _BLAS.clear()
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS.append(None)
        else:
            _BLAS.append(ThreadpoolController().select(user_api="blas"))
    return _BLAS[0]


@contextlib.contextmanager
def one_blas_thread():
    """The BLAS pools on one thread inside (nothing changes without threadpoolctl).

    A multi-threaded BLAS makes its threads wait for each other by spinning at every call, and a thread whose
    core another process holds stalls the others until the scheduler runs it: calls that take milliseconds
    take 5-10 times longer, and sometimes a second, when another process is busy. adjopt runs the BLAS calls
    that gain little from threads on one (CHOLMOD's solves; :mod:`adjopt.uq`'s dense products, split into
    row blocks on Python threads instead, which wait asleep).
    """
    ctl = blas_controller()
    if ctl is None:
        yield
        return
    with ctl.limit(limits=1):
        yield


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
    #: state solves made by Newton's method (nonlinear residuals) and the Newton steps they took
    newton_solves: int = 0
    newton_iterations: int = 0

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
            "newton_solves": self.newton_solves,
            "newton_iterations": self.newton_iterations,
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

    A direct factorization does not always stop at a singular A: round-off
    turns the zero pivot of a pure-Neumann problem into a tiny one, and a
    consistent right-hand side then "solves" to a small residual with an
    arbitrary null-space component. Two checks refuse such an A with
    :class:`~adjopt.errors.SingularMatrixError`:

    - every new factorization solves once with a seeded random right-hand
      side r (almost surely not in the range of a singular A), a solve of its
      own (in the user's solves it would change their round-off, and a result
      would depend on which solve came first), not counted; a relative
      residual ||A x_r - r|| / ||r|| above :attr:`singular_residual` means A is
      singular to working precision. A backend with a cheaper certificate of
      regularity skips it (CHOLMOD: pivots of L D L^T within 1e-12 of each
      other). Measured here: 0.35 for a pure-Neumann
      Poisson matrix, 7e-4 once shifted by 1e-14 (condition about 1e16), but
      1e-12 for a SIMP design at the contrast 1e-9 and 2e-6 for a random 0/1
      one (condition 6e11), which are nonsingular and solve to that accuracy;
    - every solve, of every kind, checks its own residual ||A x - rhs|| (or
      ||A^T x - rhs||) per column against :attr:`singular_residual` ||rhs||:
      one sparse product, O(nnz(A)). A residual above :attr:`ill_conditioned`
      (but below the singular one) is logged once per factorization.

    Iterative solvers (``exact = False``) check their true residual against
    their tolerance themselves and override :meth:`check_residual`.
    """

    #: relative residual above which a direct solve (or the singularity probe) declares A singular
    singular_residual = 1e-3
    #: relative residual above which a direct solve is logged as ill-conditioned (once per factorization)
    ill_conditioned = 1e-8
    #: True for direct factorizations: every solve is exact to round-off, whatever the tolerance
    exact = True
    #: True when a transposed solve is the solve itself, A = A^T (CHOLMOD reads one triangle of a matrix it
    #: checked to be symmetric): its residual is then taken with A's rows (CSR) rather than with A.T's columns,
    #: whose product is a scatter (1.8 ms against 1.3 ms for 1.8M nonzeros)
    self_transpose = False

    def __init__(self, A: sp.sparray, stats: SolverStats):
        self.A = A
        self.n = A.shape[0]
        self.stats = stats
        #: whether the singularity probe has run (direct factorizations; see the class docstring)
        self.probed = not self.exact

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

        Raises
        ------
        SingularMatrixError
            The solution is not finite, or (direct factorizations) its residual
            or the singularity probe's is not small: A is singular.
        """
        if kind not in SOLVE_KINDS:
            raise ValueError(f"unknown solve kind {kind!r}; use one of {SOLVE_KINDS}")
        tol = check_tolerance(tol)
        refuse_complex(rhs, f"the right-hand side of the {kind} solve")
        rhs = np.asarray(rhs, dtype=np.float64)
        if rhs.ndim not in (1, 2) or rhs.shape[0] != self.n:
            raise ShapeError(f"right-hand side must have shape ({self.n},) or ({self.n}, k), got {rhs.shape}")
        check_finite(rhs, f"right-hand side of the {kind} solve")
        t0 = time.perf_counter()
        if not self.probed:
            self.probe()
        x = self._solve(rhs, transpose, kind, tol)
        self.stats.solves[kind] += 1
        self.stats.rhs[kind] += 1 if rhs.ndim == 1 else rhs.shape[1]
        try:
            if not np.all(np.isfinite(x)):
                if self.exact:  # the probe found A nonsingular: the solution is too large for floats
                    raise NonFiniteError(
                        f"the {kind} solve overflowed: the solution exceeds the float range although A(p) is "
                        "nonsingular. A coefficient that underflows (check the scale of p and the coefficient map) "
                        "or a huge right-hand side or data make A^-1 b too large; rescale the problem")
                raise SingularMatrixError(_singular_message(f"the {kind} solve returned NaN or Inf entries"))
            self.check_residual(x, rhs, transpose, kind)
        finally:
            self.stats.solve_time[kind] += time.perf_counter() - t0
        return x

    def probe(self) -> None:
        """The singularity probe (see the class docstring); :class:`SingularMatrixError` if A is singular."""
        r = np.random.default_rng(_PROBE_SEED).standard_normal(self.n)
        x = self._solve(r, False, "other", None)
        res = norm(self.A @ x - r) / norm(r) if np.all(np.isfinite(x)) else np.inf
        if not res <= self.singular_residual:
            raise SingularMatrixError(_singular_message(
                f"a solve with a random right-hand side left a relative residual of {res:.2g}, so A x = b has no "
                "solution for most b"
            ))
        self.probed = True

    def check_residual(self, x: np.ndarray, rhs: np.ndarray, transpose: bool = False, kind: str = "other") -> None:
        """Raise :class:`SingularMatrixError` if a column of A x - rhs (A^T x - rhs) is not small against its rhs.

        A block of more than :data:`RESIDUAL_COLUMNS` columns from one factorization is checked through
        ``RESIDUAL_COLUMNS`` random combinations of its columns (X w against B w, w of random signs): one
        factorization solves them all, so a singular or ill-conditioned A shows in every combination, at the
        cost of a few products with A instead of one per column."""
        op = self.A.T if transpose and not self.self_transpose else self.A
        if x.ndim == 2 and x.shape[1] > RESIDUAL_COLUMNS:
            w = np.random.default_rng(_PROBE_SEED).choice((-1.0, 1.0), size=(x.shape[1], RESIDUAL_COLUMNS))
            x, rhs = x @ w, rhs @ w
        r = op @ x
        r -= rhs  # in place: one temporary, not two
        r = column_norms(r.reshape(self.n, -1))
        scale = column_norms(rhs.reshape(self.n, -1))
        if not getattr(self, "_warned", False) and np.any((scale > 0) & (r > self.ill_conditioned * scale)):
            self._warned = True
            logger.info("the %s solve left a relative residual of %.1e: A(p) is ill-conditioned, the results are "
                        "accurate to about that", kind, float(np.max(r / np.where(scale > 0, scale, 1.0))))
        bad = (scale > 0) & ~(r <= self.singular_residual * scale)
        if np.any(bad):
            j = int(np.argmax(bad))
            raise SingularMatrixError(_singular_message(
                f"the {kind} solve{' with A^T' if transpose else ''} left a relative residual of {r[j] / scale[j]:.2g}"
            ))

    def _solve(self, rhs, transpose, kind, tol):
        raise NotImplementedError


#: a multi-column solve is checked through this many random combinations of its columns (see check_residual)
RESIDUAL_COLUMNS = 2


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
        """The factorization (or hierarchy) of A, for every solve with A and A^T.

        The factorization keeps A (no copy: it is the matrix of the residual checks), so A must not be
        changed while it is in use; :class:`~adjopt.ReducedFunctional` passes matrices it owns.
        """
        A = sp.csr_array(A)
        if A.shape[0] != A.shape[1]:
            raise ShapeError(f"A must be square, got shape {A.shape}")
        check_finite(A.data, "A(p) (at this p its coefficient overflows or is not finite: is p far out of range?)")
        t0 = time.perf_counter()
        fac = self._factorize(A)
        self.stats.factorization_time += time.perf_counter() - t0
        self.stats.factorizations += 1
        self.stats.factor_nnz += getattr(fac, "factor_nnz", 0)
        return fac

    def _factorize(self, A) -> Factorization:
        raise NotImplementedError

    def recycle(self, factorization: Factorization) -> None:
        """Take back a factorization its owner no longer needs; a backend may refactorize in its memory.

        The default lets it be freed. The owner must not use it again.
        """
