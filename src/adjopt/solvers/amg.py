"""AMG-preconditioned Krylov solves (pyamg), reused like a factorization.

``AMGSolver.factorize(A)`` builds one multigrid hierarchy per parameter value;
the forward, adjoint, tangent and second-adjoint solves of that value share it,
exactly as they share a direct factorization.

- Symmetric A: smoothed aggregation (optionally with a near-nullspace, e.g.
  the rigid body modes of :func:`adjopt.fem.rigid_body_modes`) and CG. A^T = A,
  so the adjoint solves use the same hierarchy.
- Nonsymmetric A: approximate ideal restriction (AIR) with flexible GMRES.
  The adjoint solves need a hierarchy of A^T, built lazily on the first
  transposed solve and kept for the other transposed solves of that p. AIR
  was picked by measurement on SUPG advection-diffusion (``scripts/
  bench_amg_nonsymmetric.py``, 65k unknowns): it converged in 10-34 GMRES
  iterations for A and A^T from cell Peclet 0.02 to 218, where nonsymmetric
  smoothed aggregation stalled from Peclet 22 and root-node AMG from 2.2.
  Its hierarchies are heavier (operator complexity 2.3-7 against 1.2).

Every solve runs to a relative tolerance ``||rhs - A x|| <= tol ||rhs||``
(the true residual, checked after the Krylov method stops) chosen per solve
kind; one that does not reach it raises :class:`~adjopt.errors.SolverDidNotConverge`
with the residual history, or warns (``on_failure="warn"``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import scipy.sparse as sp

from .._validate import check_finite
from ..errors import NotPositiveDefiniteError, ShapeError, SingularMatrixError
from .base import Factorization, LinearSolver, _singular_message, per_kind_tolerances, report_nonconvergence
from .direct import is_symmetric

logger = logging.getLogger(__name__)

METHODS = ("auto", "sa", "rootnode", "air", "ruge_stuben")
#: default relative tolerance of every solve kind
DEFAULT_TOL = 1e-10



#: smallest / largest singular value of the coarsest level below which A counts as singular
COARSE_SINGULAR = 1e-12
#: coarsest levels up to this size get the (dense) singularity check
COARSE_CHECK_MAX = 2000


def _check_coarse(ml) -> None:
    """Raise :class:`SingularMatrixError` when the coarsest level of the hierarchy is singular.

    A Krylov solve does not notice a singular A with a consistent right-hand side: it converges to one of
    its solutions, with a null-space part that depends on the start (a warm start from another problem,
    say), and pyamg's coarse solver is a pseudo-inverse. A Galerkin coarse operator keeps the null space of
    A (the constants of a pure-Neumann problem are in the range of the prolongation), so the smallest
    singular value of the coarsest level, a matrix of a few unknowns, tells: measured 2e-15 of the largest
    for pure-Neumann Poisson, 0.1 and more for SIMP elasticity at the contrast 1e-9.
    """
    C = ml.levels[-1].A
    if C.shape[0] > COARSE_CHECK_MAX:
        logger.debug("AMG: coarsest level of %d unknowns: no singularity check", C.shape[0])
        return
    d = np.linalg.svd(C.toarray() if sp.issparse(C) else np.asarray(C), compute_uv=False)
    if d.size and not d[-1] > COARSE_SINGULAR * d[0]:
        raise SingularMatrixError(_singular_message(
            f"the coarsest multigrid level has a singular value {d[-1] / d[0]:.1e} times its largest"))


def _hierarchy_nnz(ml) -> int:
    """Nonzeros of all level operators and transfer operators of a pyamg hierarchy."""
    nnz = 0
    for lvl in ml.levels:
        for name in ("A", "P", "R"):
            M = getattr(lvl, name, None)
            if M is not None and sp.issparse(M):
                nnz += M.nnz
    return nnz


class AMGFactorization(Factorization):
    """One AMG hierarchy of A (and, lazily, one of A^T) with Krylov solves."""

    exact = False

    def __init__(self, A, stats, solver: AMGSolver, ml, symmetric: bool):
        super().__init__(A, stats)
        self.solver = solver
        self.symmetric = symmetric
        self._ml = ml
        self._ml_T = None
        self._AT = None
        self.factor_nnz = _hierarchy_nnz(ml)
        #: relative residual history of the last solve (list of floats)
        self.last_residuals: list[float] = []

    @property
    def nbytes(self) -> int:
        # values (8 bytes) + column indices (4 bytes) per hierarchy entry, and A^T when built
        extra = 12 * self._AT.nnz if self._AT is not None else 0
        return 12 * self.factor_nnz + extra

    def tolerance(self, kind: str, tol: float | None = None) -> float:
        return self.solver.tol[kind] if tol is None else float(tol)

    def check_residual(self, x, rhs, transpose=False, kind="other") -> None:
        """Nothing to do: every Krylov solve has checked its true residual already."""

    def lagged(self, A) -> AMGFactorization | None:
        """Solves with A preconditioned by this hierarchy (built for a nearby matrix), without a new setup.

        The Krylov method runs on A itself, so the solutions meet their tolerance for A; only the iteration
        count feels the lag. Newton's method uses it across its steps. None when A's symmetry differs from
        the hierarchy's (CG needs a symmetric A; a quasilinear Jacobian is symmetric at u = 0 only).
        """
        sym = is_symmetric(A) if self.solver.symmetric is None else bool(self.solver.symmetric)
        if sym != self.symmetric or A.shape != self.A.shape:
            return None
        return AMGFactorization(A, self.stats, self.solver, self._ml, sym)

    def _operator(self, transpose: bool):
        if not transpose or self.symmetric:
            return self.A, self._ml
        if self._ml_T is None:
            t0 = time.perf_counter()
            self._AT = self.A.T.tocsr()
            self._ml_T = self.solver._setup(self._AT, symmetric=False)
            nnz_t = _hierarchy_nnz(self._ml_T)
            self.factor_nnz += nnz_t
            self.stats.factor_nnz += nnz_t
            self.stats.transpose_factorizations += 1
            self.stats.factorization_time += time.perf_counter() - t0
            logger.debug("AMG: built the A^T hierarchy (%d levels) for the adjoint solves", len(self._ml_T.levels))
        return self._AT, self._ml_T

    def _solve(self, rhs, transpose, kind, tol):
        tol = self.tolerance(kind, tol)
        op, ml = self._operator(transpose)
        if rhs.ndim == 1:
            return self._krylov(op, ml, rhs, transpose, kind, tol)
        return np.column_stack([self._krylov(op, ml, rhs[:, j], transpose, kind, tol) for j in range(rhs.shape[1])])

    def _krylov(self, op, ml, b, transpose, kind, tol) -> np.ndarray:
        s = self.solver
        nb = float(np.linalg.norm(b))
        if nb == 0.0:
            self.last_residuals = [0.0]
            return np.zeros_like(b)
        key = (kind, transpose)
        x0 = s._last.get(key) if s.warm_start else None
        if x0 is not None and (x0.shape != b.shape or not np.linalg.norm(b - op @ x0) < nb):
            x0 = None  # a warm start that is worse than zero is no warm start
        M = ml.aspreconditioner(cycle=s.cycle)
        history: list[float] = []
        its = 0
        x = x0
        # a Krylov method stops on its recursive residual; the true one is checked and, if need be,
        # the method restarts from where it stopped (round-off drift; rare)
        for _ in range(3):
            res: list[float] = []
            budget = s.maxiter - its
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if self.symmetric:
                    x, info = s._cg(op, b, x0=x, tol=tol, maxiter=budget, M=M, residuals=res)
                else:
                    cycles = max(1, math.ceil(budget / s.restart))
                    x, info = s._gmres(op, b, x0=x, tol=tol, restart=min(s.restart, budget),
                                       maxiter=cycles, M=M, residuals=res)
            its += max(len(res) - 1, 0)
            history.extend(r / nb for r in (res[1:] if history else res))
            if self.symmetric and info < 0 or any("Indefinite" in str(w.message) for w in caught):
                self.stats.iterations[kind] += its
                raise NotPositiveDefiniteError(
                    f"CG met negative curvature in the {kind} solve: A(p) is not positive definite. If A(p) "
                    "should be, it is singular (a missing Dirichlet condition, or a coefficient that vanishes); "
                    "if it is indefinite, use AMGSolver(symmetric=False) (GMRES) or solver='superlu'."
                )
            if not np.all(np.isfinite(x)):
                break
            rel = float(np.linalg.norm(b - op @ x)) / nb
            history.append(rel)
            if rel <= tol or its >= s.maxiter:
                break
        self.stats.iterations[kind] += its
        self.last_residuals = history
        rel = history[-1] if history else math.inf
        if not (np.all(np.isfinite(x)) and rel <= tol):
            self._fail(kind, tol, its, history)
        if s.warm_start:
            s._last[key] = x.copy()
        return x

    def _fail(self, kind, tol, its, history):
        last = history[-1] if history else math.nan
        best = min(history) if history else math.nan
        msg = (
            f"the {kind} Krylov solve ({'CG' if self.symmetric else 'GMRES'} with AMG) stopped after {its} "
            f"iterations at a relative residual of {last:.3g} (best {best:.3g}), above its tolerance {tol:.3g}. "
            "Raise maxiter, loosen the tolerance of this kind (AMGSolver(tol={...})), give a near-nullspace "
            "for vector problems (fem.rigid_body_modes), or use a direct solver; a solve that stalls near 1 "
            "often means A(p) is singular (a missing Dirichlet condition) or the coefficient vanishes."
        )
        report_nonconvergence(self.solver.on_failure, msg, history)


class AMGSolver(LinearSolver):
    """AMG-preconditioned CG (symmetric A) or GMRES (nonsymmetric A) through pyamg.

    Parameters
    ----------
    tol
        Relative residual tolerance: a float for every solve kind, or a dict
        ``{kind: tol}`` over ``"forward"``, ``"adjoint"``, ``"tangent"``,
        ``"second_adjoint"``, ``"other"`` (kinds not given: 1e-10). A
        ``tol`` passed to a solve (``J.gradient(p, tol=...)``) overrides it.
    maxiter
        Krylov iterations per right-hand side (all restarts together).
    method
        ``"auto"`` (smoothed aggregation when A is symmetric, AIR otherwise),
        ``"sa"``, ``"rootnode"``, ``"air"`` or ``"ruge_stuben"``.
    near_nullspace
        (n, m) near-nullspace candidates for smoothed aggregation / root-node
        (rigid body modes for elasticity: :func:`adjopt.fem.rigid_body_modes`).
    symmetric
        ``None`` detects symmetry of each A (O(nnz)); ``True`` / ``False`` force it.
    on_failure
        ``"raise"`` (default): :class:`~adjopt.errors.SolverDidNotConverge`
        with the residual history; ``"warn"``: a
        :class:`~adjopt.errors.ConvergenceWarning` and the last iterate.
    warm_start
        Start each solve from the last solution of the same kind (a previous
        p's state for the forward solve) when that is better than zero.
    restart
        GMRES restart length.
    cycle
        Multigrid cycle of the preconditioner (``"V"``, ``"W"``, ``"F"``).
    options
        Extra keyword arguments for the pyamg solver constructor.
    seed
        Seed of the random start vectors pyamg's setup draws (spectral radius
        estimates): the same A gives the same hierarchy and iteration counts.
    """

    name = "amg"
    requires = "pyamg"

    def __init__(self, tol=DEFAULT_TOL, maxiter: int = 500, method: str = "auto", near_nullspace=None,
                 symmetric: bool | None = None, on_failure: str = "raise", warm_start: bool = True,
                 restart: int = 50, cycle: str = "V", options: dict | None = None, seed: int = 0):
        super().__init__()
        import pyamg
        import pyamg.krylov

        self._pyamg = pyamg
        self._cg = pyamg.krylov.cg
        self._gmres = pyamg.krylov.fgmres
        self.tol = per_kind_tolerances(tol, DEFAULT_TOL)
        if isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer)) or maxiter < 1:
            raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}")
        if isinstance(restart, bool) or not isinstance(restart, (int, np.integer)) or restart < 1:
            raise ValueError(f"restart must be a positive integer, got {restart!r}")
        if method not in METHODS:
            raise ValueError(f"unknown AMG method {method!r}; use one of {METHODS}")
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        if cycle not in ("V", "W", "F"):
            raise ValueError(f"cycle must be 'V', 'W' or 'F', got {cycle!r}")
        if near_nullspace is not None:
            B = np.array(near_nullspace, dtype=np.float64, copy=True)  # kept for every setup: adjopt's own copy
            if B.ndim == 1:
                B = B[:, None]
            if B.ndim != 2 or B.shape[1] < 1:
                raise ShapeError(f"near_nullspace must have shape (n, m), got {B.shape}")
            check_finite(B, "the near-nullspace")
            if method in ("air", "ruge_stuben"):
                raise ValueError(f"method {method!r} takes no near-nullspace; use 'sa' or 'rootnode'")
            near_nullspace = B
        self.maxiter = int(maxiter)
        self.restart = int(restart)
        self.method = method
        self.near_nullspace = near_nullspace
        self.symmetric = symmetric
        self.on_failure = on_failure
        self.warm_start = bool(warm_start)
        self.cycle = cycle
        self.options = dict(options or {})
        self.seed = int(seed)
        self._last: dict = {}

    def _setup(self, A, symmetric: bool):
        # pyamg draws the start vectors of its spectral-radius estimates from numpy's global RNG: seed it for
        # the setup so that a hierarchy, and every iteration count after it, is reproducible, and give the
        # caller's RNG state back untouched
        state = np.random.get_state()
        np.random.seed(self.seed)
        try:
            ml = self._build(A, symmetric)
        finally:
            np.random.set_state(state)
        # smoothed aggregation stores the coarse levels as BSR with 1 x 1 blocks, on which pyamg's
        # Gauss-Seidel runs ~12x slower per nonzero than on CSR: measured 18% of a CG solve at 1M unknowns
        for lvl in ml.levels:
            for name in ("A", "P", "R"):
                M = getattr(lvl, name, None)
                if M is not None and sp.issparse(M) and M.format == "bsr" and M.blocksize == (1, 1):
                    setattr(lvl, name, M.tocsr())
        return ml

    def _build(self, A, symmetric: bool):
        pyamg = self._pyamg
        method = self.method if self.method != "auto" else ("sa" if symmetric else "air")
        B = self.near_nullspace
        if B is not None and B.shape[0] != A.shape[0]:
            raise ShapeError(f"near_nullspace has {B.shape[0]} rows but A(p) is {A.shape[0]} x {A.shape[1]}")
        opts = dict(self.options)
        if method in ("sa", "rootnode"):
            build = pyamg.smoothed_aggregation_solver if method == "sa" else pyamg.rootnode_solver
            if B is not None:
                opts.setdefault("B", B)
                if not symmetric:
                    opts.setdefault("BH", B)
            return build(A, symmetry="hermitian" if symmetric else "nonsymmetric", **opts)
        if B is not None:
            logger.info("AMG: method %r ignores the near-nullspace", method)
        if method == "air":
            return pyamg.air_solver(A, **opts)
        return pyamg.ruge_stuben_solver(A, **opts)

    def _factorize(self, A) -> AMGFactorization:
        zero = np.flatnonzero(A.diagonal() == 0)
        if zero.size:  # the smoothers divide by the diagonal (and pyamg prints a line per zero it meets)
            raise SingularMatrixError(_singular_message(
                f"{zero.size} zero(s) on the diagonal, the first in row {zero[0]}: a dof without stiffness; AMG's "
                "smoothers need a nonzero diagonal (a saddle-point matrix needs solver='superlu' or 'pardiso')"))
        sym = is_symmetric(A) if self.symmetric is None else bool(self.symmetric)
        if not sym and self.method == "auto" and self.near_nullspace is not None:
            logger.info("AMG: A is nonsymmetric; AIR ignores the near-nullspace (use method='sa' to keep it)")
        ml = self._setup(A, sym)
        _check_coarse(ml)
        logger.debug("AMG: n=%d nnz(A)=%d, %d levels, operator complexity %.2f, symmetric=%s",
                     A.shape[0], A.nnz, len(ml.levels), ml.operator_complexity(), sym)
        return AMGFactorization(A, self.stats, self, ml, sym)
