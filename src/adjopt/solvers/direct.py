"""Direct solver on SuperLU: one LU factorization serves A and A^T.

``lu.solve(b, trans="T")`` solves with A^T on the same factors, so the
adjoint solve costs one pair of triangular solves, not a new factorization.
For (numerically) symmetric A a symmetric column ordering (minimum degree on
A^T + A, diagonal pivoting) keeps the fill close to a Cholesky factor's.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from ..errors import SingularMatrixError
from .base import Factorization, LinearSolver, _singular_message, one_blas_thread

logger = logging.getLogger(__name__)


def is_symmetric(A: sp.sparray, rtol: float = 1e-12) -> bool:
    """True when max|A - A^T| <= rtol * max|A| (O(nnz))."""
    diff = A - A.T
    if diff.nnz == 0:
        return True
    scale = np.abs(A.data).max() if A.nnz else 0.0
    return bool(np.abs(diff.data).max() <= rtol * scale)


class SuperLUFactorization(Factorization):
    def __init__(self, A, stats, lu):
        super().__init__(A, stats)
        self.lu = lu
        self.factor_nnz = int(lu.nnz)

    @property
    def nbytes(self) -> int:
        # values (8 bytes) + row indices (4 bytes) per factor entry, permutations
        return 12 * self.factor_nnz + 16 * self.n

    def _solve(self, rhs, transpose, kind, tol):
        if rhs.ndim == 1:
            return self.lu.solve(rhs, trans="T" if transpose else "N")
        # several right-hand sides: SuperLU's triangular solves call the BLAS on small supernode blocks, whose
        # threads then spin against each other; on one thread, 50 columns at 66k unknowns took 0.24-0.26 s, on
        # scipy's OpenBLAS's 2 threads with another process busy 2.5-5.1 s (and 0.93 s column by column)
        with one_blas_thread():
            return self.lu.solve(rhs, trans="T" if transpose else "N")


class DirectSolver(LinearSolver):
    """SuperLU (``scipy.sparse.linalg.splu``) with transposed solves on the same factors.

    Parameters
    ----------
    symmetric
        ``None`` (default) detects symmetry; ``True``/``False`` force the ordering.
    """

    name = "superlu"

    def __init__(self, symmetric: bool | None = None):
        super().__init__()
        self.symmetric = symmetric

    def _factorize(self, A):
        sym = is_symmetric(A) if self.symmetric is None else self.symmetric
        opts = (
            dict(permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
            if sym
            else dict(permc_spec="COLAMD")
        )
        try:
            lu = sla.splu(A.tocsc(), **opts)
        except RuntimeError as exc:  # "Factor is exactly singular"
            raise SingularMatrixError(_singular_message(str(exc))) from exc
        logger.debug("SuperLU: n=%d nnz(A)=%d nnz(L+U)=%d symmetric=%s", A.shape[0], A.nnz, lu.nnz, sym)
        return SuperLUFactorization(A, self.stats, lu)
