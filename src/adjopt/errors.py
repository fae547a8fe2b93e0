"""Exceptions raised by adjopt.

Every error says what went wrong and what to do about it. They subclass the
built-in exception a user would expect (``ValueError`` for bad input,
``RuntimeError`` for numerical failures), so ``except ValueError`` still works.
"""

from __future__ import annotations


class AdjoptError(Exception):
    """Base class of all adjopt errors."""


class ShapeError(AdjoptError, ValueError):
    """An array has the wrong shape or length."""


class NonFiniteError(AdjoptError, ValueError):
    """An input or intermediate array holds NaN or Inf."""


class PatternError(AdjoptError, ValueError):
    """Connectivity, pattern and local matrices do not fit together."""


class SingularMatrixError(AdjoptError, RuntimeError):
    """The system matrix is singular to working precision."""


class SolverDidNotConverge(AdjoptError, RuntimeError):
    """An iterative solve did not reach its tolerance.

    Attributes
    ----------
    residuals : list of float
        The relative residual history of the failed solve.
    """

    def __init__(self, message: str, residuals=None):
        super().__init__(message)
        self.residuals = list(residuals) if residuals is not None else []


class NewtonDidNotConverge(SolverDidNotConverge):
    """Newton's method did not bring the residual R(u, p) below its tolerance.

    ``residuals`` holds the history of ||R(u_k, p)||, from the initial guess on.
    """


class NotPositiveDefiniteError(SingularMatrixError, ValueError):
    """A Cholesky factorization (or CG) met a matrix that is not positive definite.

    A singular matrix is not positive definite either, so this is a :class:`SingularMatrixError`
    (``except SingularMatrixError`` catches a singular A whatever the solver); it is a ``ValueError``
    too, as it always was.
    """


class ConvergenceWarning(UserWarning):
    """An iterative solve stopped above its tolerance and the solver was told to warn, not raise."""


class MissingBackendError(AdjoptError, ImportError):
    """A solver backend was asked for by name but its package is not installed."""


class MissingDerivativeError(AdjoptError, NotImplementedError):
    """A derivative that a computation needs was not provided."""


class CacheTooSmallError(AdjoptError, ValueError):
    """The state cache limit is below the size of a single entry."""


class PartitionError(AdjoptError, ValueError):
    """A mesh cannot be split over the requested number of MPI ranks."""
