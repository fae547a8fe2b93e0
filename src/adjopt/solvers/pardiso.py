"""Direct solver on Intel MKL PARDISO (pypardiso): one LU factorization serves A and A^T.

PARDISO factorizes A once (phase 12: analysis and numerical factorization,
real nonsymmetric matrix type 11, nested-dissection ordering, weighted
matching and scaling) and solves (phase 33) with A, or with A^T on the same
factors when iparm(12) = 2, so the adjoint solve is one pair of triangular
solves. Each factorization owns its own PARDISO handle, so several cached
factorizations coexist; the handle's memory is released (phase -1) when the
factorization is garbage collected.

pypardiso's public ``solve(A, b)`` is bypassed on purpose: it compares A
with a stored copy on every call and re-factorizes (phase 13) when they
differ, and it sets iparm(12) from the sparse format (CSR 0, CSC 1). Here
every solve calls ``PyPardisoSolver._call_pardiso`` with phase 33 and an
explicit iparm(12) (the direct call pypardiso's own docstring of
``remove_stored_factorization`` suggests), so a solve never re-factorizes.

The backend is optional: pypardiso is imported when a :class:`PardisoSolver`
is constructed, never when adjopt is imported.
"""

from __future__ import annotations

import copy
import importlib
import logging
import time
import weakref

import numpy as np

from ..errors import AdjoptError, MissingBackendError, SingularMatrixError
from .base import Factorization, LinearSolver, _singular_message

logger = logging.getLogger(__name__)

#: PARDISO matrix type: real and nonsymmetric (the only type pypardiso is tested for)
MTYPE_REAL_NONSYMMETRIC = 11
#: iparm(12) values (1-based numbering, as in pypardiso's set_iparm): solve with A, or with A^T
_SOLVE_A, _SOLVE_AT = 0, 2

#: error codes of PARDISO (Intel oneMKL reference, "pardiso" error parameter)
PARDISO_ERRORS = {
    -1: "input inconsistent",
    -2: "not enough memory",
    -3: "reordering problem",
    -4: "zero pivot, numerical factorization or iterative refinement problem",
    -5: "unclassified (internal) error",
    -6: "reordering failed",
    -7: "diagonal matrix is singular",
    -8: "32-bit integer overflow problem",
    -9: "not enough memory for the out-of-core solver",
    -10: "error opening the out-of-core files",
    -11: "read/write error with the out-of-core files",
    -12: "pardiso_64 called from a 32-bit library",
    -13: "interrupted by the mkl_progress callback",
    -15: "internal error in the reordering or symbolic factorization",
}
_SINGULAR_CODES = (-4, -7)
_MEMORY_CODES = (-2, -9)


class PardisoError(AdjoptError, RuntimeError):
    """PARDISO returned an error code that does not mean "singular matrix".

    Attributes
    ----------
    code : int
        The PARDISO error code (see :data:`PARDISO_ERRORS`).
    """

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _import_pypardiso():
    """``pypardiso``, or :class:`MissingBackendError` saying how to install it."""
    if not PardisoSolver.available():  # importlib.util.find_spec("pypardiso") is None
        raise MissingBackendError(_missing_message("which is not installed"))
    try:
        return importlib.import_module("pypardiso")
    except ImportError as exc:  # installed but broken
        raise MissingBackendError(_missing_message(f"which cannot be imported ({exc})")) from exc


def _missing_message(reason: str) -> str:
    return (
        f'solver="pardiso" needs pypardiso (Intel MKL PARDISO), {reason}. Install it with '
        'pip install "adjopt[pardiso]" (it pulls in the mkl wheel, available for x86-64); without it, use '
        'solver="superlu" (always available) or solver="cholmod" for SPD matrices.'
    )


#: a PyPardisoSolver whose loaded MKL library the per-factorization handles share (see _new_handle)
_template = None


def _pardiso_template(pypardiso):
    """The shared :class:`pypardiso.PyPardisoSolver`; MissingBackendError when MKL cannot be loaded."""
    global _template
    if _template is None:
        try:
            _template = pypardiso.PyPardisoSolver(mtype=MTYPE_REAL_NONSYMMETRIC)
        except ImportError as exc:  # "Shared library mkl_rt not found"
            raise MissingBackendError(
                f"pypardiso is installed but cannot load MKL's mkl_rt library ({exc}). Reinstall it with "
                'pip install --force-reinstall "adjopt[pardiso]", or point the PYPARDISO_MKL_RT environment '
                'variable at libmkl_rt; or use solver="superlu".'
            ) from exc
    return _template


def _new_handle(template):
    """A PyPardisoSolver with its own PARDISO handle, sharing ``template``'s loaded library.

    ``PyPardisoSolver()`` searches for mkl_rt on every construction (a
    recursive glob over sys.prefix when ``find_library`` fails, ~0.3 s here),
    so each factorization gets a shallow copy of one instance instead, with
    fresh handle ``pt`` (zero: PARDISO allocates a new internal solver),
    ``iparm`` (iparm(1) = 0: PARDISO fills in its defaults) and ``perm``.
    """
    ps = copy.copy(template)
    ps.pt = np.zeros_like(template.pt)
    ps.iparm = np.zeros_like(template.iparm)
    ps.perm = np.zeros_like(template.perm)
    ps.set_matrix_type(MTYPE_REAL_NONSYMMETRIC)
    return ps


def _release(ps) -> None:
    """Free all of PARDISO's memory for the handle of ``ps`` (phase -1)."""
    try:
        ps.free_memory(everything=True)
    except Exception:  # a finalizer must not raise; the memory is lost at worst
        logger.debug("PARDISO: releasing a handle failed", exc_info=True)


def _error(code: int, stage: str, A) -> Exception:
    meaning = PARDISO_ERRORS.get(code, "unknown error")
    if code in _SINGULAR_CODES:
        return SingularMatrixError(_singular_message(f"PARDISO error {code} in the {stage}: {meaning}"))
    advice = (
        'the factors do not fit in memory: use solver="cholmod" for an SPD matrix, a coarser mesh, or an iterative solver'
        if code in _MEMORY_CODES
        else 'try solver="superlu"'
    )
    return PardisoError(
        f"PARDISO failed with error {code} ({meaning}) in the {stage} of a {A.shape[0]} x {A.shape[1]} matrix "
        f"with {A.nnz} nonzeros; {advice}",
        code,
    )


class PardisoFactorization(Factorization):
    """A PARDISO LU factorization (its own handle) that solves with A and A^T.

    Attributes
    ----------
    perturbed_pivots : int
        Pivots PARDISO replaced by +-1e-13 ||A|| (iparm(14)); iterative
        refinement makes up for them when A is nonsingular.
    """

    def __init__(self, A, stats, pardiso, error_type):
        super().__init__(A, stats)
        self._pardiso = pardiso
        self._error_type = error_type  # pypardiso's PyPardisoError
        self.factor_nnz = int(pardiso.get_iparm(18))  # iparm(18): nonzeros in the factors L and U
        self.perturbed_pivots = int(pardiso.get_iparm(14))
        self._finalizer = weakref.finalize(self, _release, pardiso)
        self._finalizer.atexit = False  # at interpreter exit the OS reclaims the memory

    @property
    def nbytes(self) -> int:
        # iparm(16): permanent memory of the analysis, iparm(17): memory of the factors and the solve, in KB
        return 1024 * int(self._pardiso.get_iparm(16) + self._pardiso.get_iparm(17))

    def _solve(self, rhs, transpose, kind, tol):
        ps = self._pardiso
        ps.set_phase(33)
        ps.set_iparm(12, _SOLVE_AT if transpose else _SOLVE_A)
        try:
            return ps._call_pardiso(self.A, np.asfortranarray(rhs))  # PARDISO reads b column-major
        except self._error_type as exc:
            raise _error(exc.value, "transposed solve" if transpose else "solve", self.A) from exc

    def _probe_singular(self) -> None:
        """Raise SingularMatrixError if A x = b has no solution for a random b (called after perturbed pivots).

        PARDISO does not stop at a zero pivot: it perturbs it and factors a
        nearby matrix. A nonsingular A still solves to round-off (iterative
        refinement); a singular A leaves the component of a generic b outside
        its range, a relative residual of order sqrt(dim null(A^T) / n).
        """
        b = np.random.default_rng(0).standard_normal(self.n)
        x = self._solve(b, False, "other", None)
        scale = np.linalg.norm(b)
        res = np.linalg.norm(self.A @ x - b) / scale if np.all(np.isfinite(x)) else np.inf
        if not res <= self.singular_residual:
            raise SingularMatrixError(
                _singular_message(
                    f"PARDISO perturbed {self.perturbed_pivots} tiny pivot(s) and a solve with a random right-hand "
                    f"side left a relative residual of {res:.2g}"
                )
            )


class PardisoSolver(LinearSolver):
    """Intel MKL PARDISO (pypardiso) with transposed solves on the same factors.

    Real nonsymmetric matrix type (11) for every A, so symmetric, indefinite
    and nonsymmetric matrices all work; for SPD matrices ``solver="cholmod"``
    stores half the factor.

    Raises
    ------
    MissingBackendError
        pypardiso is not installed, or MKL's mkl_rt library cannot be loaded.

    Notes
    -----
    :meth:`factorize` raises :class:`~adjopt.errors.SingularMatrixError` for a
    matrix with an empty row or column or when PARDISO reports a zero pivot,
    and :class:`PardisoError` for PARDISO's other error codes. PARDISO
    perturbs tiny pivots instead of stopping; after a perturbation one solve
    with a random right-hand side (not counted) tells a singular A, whose
    residual stays large, from a nonsingular one.
    """

    name = "pardiso"
    requires = "pypardiso"
    extra = "pardiso"

    def __init__(self):
        super().__init__()
        pypardiso = _import_pypardiso()
        self._template = _pardiso_template(pypardiso)
        self._error_type = pypardiso.pardiso_wrapper.PyPardisoError

    def _factorize(self, A):
        n = A.shape[0]
        # PARDISO crashes on an empty CSR row (pypardiso's note); either kind of empty line means singular
        for what, counts in (("row", np.diff(A.indptr)), ("column", np.bincount(A.indices, minlength=n))):
            empty = np.flatnonzero(counts == 0)
            if empty.size:
                raise SingularMatrixError(
                    _singular_message(f"{empty.size} {what}(s) of A hold no entries, the first {what} {empty[0]}")
                )
        A = A.astype(np.float64, copy=False)
        if not A.has_sorted_indices:  # PARDISO needs sorted column indices; sort a copy, not the caller's A
            A = A.sorted_indices()
        ps = _new_handle(self._template)
        ps.set_phase(12)
        t0 = time.perf_counter()
        try:
            ps._call_pardiso(A, np.zeros((n, 1)))  # b is not read in phase 12 (as in pypardiso's factorize)
        except self._error_type as exc:
            _release(ps)
            raise _error(exc.value, "factorization", A) from exc
        fac = PardisoFactorization(A, self.stats, ps, self._error_type)
        if fac.perturbed_pivots:
            try:
                fac._probe_singular()
            except SingularMatrixError:
                fac._finalizer()  # release the handle now, not when the traceback lets go of fac
                raise
            fac.probed = True  # the first solve need not probe again
        logger.debug(
            "PARDISO: n=%d nnz(A)=%d nnz(L+U)=%d perturbed pivots=%d memory=%d KB in %.3g s",
            n, A.nnz, fac.factor_nnz, fac.perturbed_pivots, fac.nbytes // 1024, time.perf_counter() - t0,
        )
        return fac
