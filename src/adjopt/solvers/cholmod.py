"""Direct solver on CHOLMOD (scikit-sparse): one Cholesky factor serves A and A^T.

For a symmetric positive definite A the transposed solve is the same solve,
so the adjoint needs no second factorization. CHOLMOD picks a supernodal
L L^T or a simplicial L D L^T factorization (``mode="auto"``) with a
fill-reducing ordering (AMD or METIS); for SPD finite-element matrices it
is usually the fastest and leanest direct solver.

The backend is optional: scikit-sparse (the 0.4 API, ``scikit-sparse<0.5``)
is imported when a :class:`CholmodSolver` is constructed, never when adjopt
is imported.

The solves (and their residual checks) run CHOLMOD's BLAS on one thread
(:func:`~adjopt.solvers.base.one_blas_thread`, when threadpoolctl is
installed); the factorization keeps its threads. A solve is a sweep through
the factor, memory bound: on 2 cores it took as long on one OpenBLAS thread
as on two on an idle machine (90 right-hand sides, per column: 3.1 against
3.2 ms at 66k unknowns of a 2D operator, 13.1 against 13.4 ms at 263k, 6.5
against 5.7-7.7 ms at 69k of a 3D one), while two threads stall each other
when another process holds a core: 25 against 3.1 ms, 95 against 13.7 ms
and 62 against 13 ms. The factorization of a 3D operator does gain from its
threads (69k unknowns: 1.2 s on two, 2.3 s on one).
"""

from __future__ import annotations

import importlib
import logging
import time

import numpy as np

from ..errors import MissingBackendError, NotPositiveDefiniteError, SingularMatrixError
from .base import Factorization, LinearSolver, _singular_message, blas_controller, one_blas_thread
from .direct import is_symmetric

logger = logging.getLogger(__name__)

MODES = ("auto", "simplicial", "supernodal")
ORDERINGS = ("default", "best", "amd", "metis", "nesdis", "colamd", "natural")

_ALTERNATIVES = 'use solver="pardiso" or solver="superlu" instead, which factorize any nonsingular matrix'


def _import_cholmod():
    """``sksparse.cholmod``, or :class:`MissingBackendError` saying how to install it."""
    if not CholmodSolver.available():  # importlib.util.find_spec("sksparse") is None
        raise MissingBackendError(_missing_message("which is not installed"))
    try:
        return importlib.import_module("sksparse.cholmod")
    except ImportError as exc:  # installed but broken, e.g. built against another SuiteSparse
        raise MissingBackendError(_missing_message(f"which cannot be imported ({exc})")) from exc


def _missing_message(reason: str) -> str:
    return (
        f'solver="cholmod" needs scikit-sparse (CHOLMOD), {reason}. Install it with pip install "adjopt[cholmod]" '
        '(or pip install "scikit-sparse<0.5": adjopt uses the 0.4 API). scikit-sparse builds from source and '
        "needs the SuiteSparse headers first: apt-get install libsuitesparse-dev (Debian/Ubuntu) or "
        'conda install -c conda-forge suitesparse. Without it, use solver="superlu" (always available) or '
        'solver="pardiso".'
    )


def _not_spd_message(detail: str) -> str:
    return (
        f"CHOLMOD needs a symmetric positive definite matrix, but {detail}. A singular matrix (e.g. a "
        f"pure-Neumann problem without a Dirichlet boundary) is not positive definite either; otherwise {_ALTERNATIVES}."
    )


class CholmodFactorization(Factorization):
    """A CHOLMOD factor of a symmetric positive definite A (solves with A = A^T)."""

    self_transpose = True  # CholmodSolver refuses an A that is not symmetric (to 1e-12 of max|A|)

    def __init__(self, A, stats, factor, factor_nnz: int):
        super().__init__(A, stats)
        self.factor = factor
        self.factor_nnz = int(factor_nnz)

    @property
    def nbytes(self) -> int:
        # values (8 bytes) + row indices (4 bytes) per entry of L, permutation and workspace
        return 12 * self.factor_nnz + 16 * self.n

    def _solve(self, rhs, transpose, kind, tol):
        if self.factor is None:
            raise RuntimeError("this CHOLMOD factorization was released (recycle) and its memory reused")
        # A^T = A: the transposed solve is the same pair of triangular solves, on one BLAS thread (the module
        # docstring says why). A block goes to CHOLMOD whole: in chunks of 32 columns (into one output block) 90
        # columns took no less time per column (66k unknowns: 3.7-3.9 against 3.8-4.2 ms; 263k: 17.4-18.8
        # against 15.9-16.5 ms). CHOLMOD solves in column-major order: scikit-sparse first copies a C-ordered
        # block into it, a transposing copy (per column at 66k: 4.0-4.4 against 3.8-4.2 ms; raw solves at 1.05M
        # unknowns: 101 against 54 ms), so callers hand Fortran-ordered blocks where they can
        with one_blas_thread():
            return self.factor.solve_A(rhs)

    def check_residual(self, x, rhs, transpose=False, kind="other"):
        with one_blas_thread():  # its products of the solution block with random signs
            return super().check_residual(x, rhs, transpose, kind)


class CholmodSolver(LinearSolver):
    """CHOLMOD (``sksparse.cholmod.cholesky``) for symmetric positive definite A.

    Parameters
    ----------
    mode
        ``"auto"`` (default: CHOLMOD chooses), ``"simplicial"`` (L D L^T) or
        ``"supernodal"`` (L L^T with dense blocks, faster for large 3D problems).
    ordering_method
        Fill-reducing ordering passed to CHOLMOD: ``"default"`` (AMD, METIS if
        it fills less), ``"best"``, ``"amd"``, ``"metis"``, ``"nesdis"``,
        ``"colamd"`` or ``"natural"``.

    Raises
    ------
    MissingBackendError
        scikit-sparse is not installed.
    ValueError
        An unknown ``mode`` or ``ordering_method``.

    Notes
    -----
    :meth:`factorize` raises :class:`~adjopt.errors.NotPositiveDefiniteError`
    for a matrix that is not symmetric (to ``1e-12`` relative to max|A|) or
    not positive definite; use ``solver="pardiso"`` or ``"superlu"`` for those.
    """

    name = "cholmod"
    requires = "sksparse"
    extra = "cholmod"

    def __init__(self, mode: str = "auto", ordering_method: str = "default"):
        if mode not in MODES:
            raise ValueError(f"unknown CHOLMOD mode {mode!r}; use one of {MODES}")
        if ordering_method not in ORDERINGS:
            raise ValueError(f"unknown CHOLMOD ordering_method {ordering_method!r}; use one of {ORDERINGS}")
        super().__init__()
        self._cholmod = _import_cholmod()
        blas_controller(rescan=True)  # CHOLMOD's BLAS is loaded now: its solves run it on one thread
        self.mode = mode
        self.ordering_method = ordering_method
        # the symbolic analysis (fill-reducing ordering, elimination tree, supernodes) depends on the pattern
        # only; an optimizer factorizes one pattern many times, so it is done once per pattern and reused
        self._symbolic = None  # (indptr, indices, analysed Factor, nnz(L) or None)
        self.analyses = 0
        self._spare = None  # (analysed Factor it came from, a numeric Factor given back by recycle)

    def _factorize(self, A):
        if not is_symmetric(A):
            raise NotPositiveDefiniteError(_not_spd_message("A(p) is not symmetric (max|A - A^T| > 1e-12 max|A|)"))
        t0 = time.perf_counter()
        Ac = A.tocsc()
        sym = self._symbolic
        if sym is None or not (np.array_equal(sym[0], Ac.indptr) and np.array_equal(sym[1], Ac.indices)):
            analysed = self._cholmod.analyze(Ac, mode=self.mode, ordering_method=self.ordering_method)
            sym = self._symbolic = [Ac.indptr.copy(), Ac.indices.copy(), analysed, None]
            self.analyses += 1
        spare, self._spare = self._spare, None
        try:
            # CHOLMOD reads the lower triangle only, hence the symmetry check above. A factor given back by
            # recycle() (of this pattern) is refactorized in place: its memory is reused, as a plain
            # optimization loop does (a new factor of 22M entries costs 0.3 s of page faults more at 240k dofs);
            # otherwise cholesky() on the analysed factor returns a new numeric factor sharing the ordering
            if spare is not None and spare[0] is sym[2]:
                factor = spare[1]
                factor.cholesky_inplace(Ac)
            else:
                factor = sym[2].cholesky(Ac)
        except self._cholmod.CholmodNotPositiveDefiniteError as exc:  # supernodal L L^T: a pivot <= 0
            raise NotPositiveDefiniteError(
                _not_spd_message(f"the Cholesky factorization met a non-positive pivot in column {exc.column}")
            ) from exc
        # The simplicial L D L^T factorization does not stop at a negative pivot: it factors a symmetric
        # indefinite matrix without pivoting. By Sylvester's law of inertia, A is positive definite
        # exactly when every entry of D is > 0 (D() reads the diagonal in place, O(n), no copy).
        d = factor.D()
        bad = np.flatnonzero(~(d > 0))
        if bad.size and np.all(np.abs(d[bad]) <= 1e-10 * np.max(np.abs(d))):
            # pivots at round-off, not clearly negative: a singular positive semidefinite A (pure Neumann)
            raise SingularMatrixError(_singular_message(
                f"the L D L^T factorization has {bad.size} pivot(s) at round-off, the first {d[bad[0]]:.3g}"))
        if bad.size:
            raise NotPositiveDefiniteError(
                _not_spd_message(f"the L D L^T factorization has {bad.size} non-positive pivot(s) of {A.shape[0]}, "
                                 f"the first {d[bad[0]]:.3g}")
            )
        # scikit-sparse 0.4 exposes no nonzero count of the factor (Factor has no nnz/nzmax attribute and
        # Common no lnz), so L() is the only way: it copies the factor, converts the copy to a simplicial
        # L L^T and returns it as a scipy CSC matrix: O(nnz(L)) time and a transient second copy; the factor
        # used for the solves is untouched.
        # The count depends on the symbolic analysis only, so it is taken once per pattern.
        if sym[3] is None:
            sym[3] = factor.L().nnz
        factor_nnz = sym[3]
        logger.debug(
            "CHOLMOD: n=%d nnz(A)=%d nnz(L)=%d mode=%s ordering=%s in %.3g s",
            A.shape[0], A.nnz, factor_nnz, self.mode, self.ordering_method, time.perf_counter() - t0,
        )
        fac = CholmodFactorization(A, self.stats, factor, factor_nnz)
        fac.analysed = sym[2]
        # positive pivots within 1e-12 of each other certify a nonsingular A (SIMP at the contrast 1e-9: 1e-10;
        # pure Neumann: round-off): no probe solve is needed
        fac.probed = bool(d.size) and float(d.min()) > 1e-12 * float(d.max())
        return fac

    def recycle(self, factorization) -> None:
        """Keep the numeric factor of a factorization its owner released, for the next one of this pattern."""
        sym = self._symbolic
        factor = getattr(factorization, "factor", None)
        if sym is None or factor is None or getattr(factorization, "analysed", None) is not sym[2]:
            return
        factorization.factor = None  # the released factorization must not solve with what is overwritten
        self._spare = (sym[2], factor)
