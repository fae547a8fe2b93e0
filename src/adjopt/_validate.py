"""Input checks shared by the package: shapes and finiteness, with clear messages."""

from __future__ import annotations

import numpy as np

from .errors import NonFiniteError, ShapeError


def as_parameter(p, n_params: int, name: str = "p") -> np.ndarray:
    """Return ``p`` as a float64 vector of length ``n_params``, checked finite and real.

    The result may share memory with ``p``; callers that keep it past the call take :func:`owned`.
    """
    refuse_complex(p, name)
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n_params:
        raise ShapeError(
            f"{name} must be a vector of length {n_params} (one value per parameter), "
            f"got an array of shape {arr.shape}"
        )
    check_finite(arr, name)
    return arr


def as_directions(dp, n_params: int, name: str = "dp") -> tuple[np.ndarray, bool]:
    """(D, single): ``dp`` of shape (m,) or (m, k) as an owned float64 (m, k) array of k directions, checked finite
    and real; ``single`` when a vector was given (the caller returns a vector then)."""
    refuse_complex(dp, name)
    arr = np.asarray(dp, dtype=np.float64)
    if arr.ndim == 1:
        return np.array(as_parameter(arr, n_params, name).reshape(n_params, 1), order="F", copy=True), True
    if arr.ndim != 2 or arr.shape[0] != n_params:
        raise ShapeError(f"{name} must be a vector of length {n_params} or an ({n_params}, k) array of k directions "
                         f"(one row per parameter), got an array of shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ShapeError(f"{name} holds no direction: shape {arr.shape}")
    check_finite(arr, name)
    return np.array(arr, order="F", copy=True), False  # each direction D[:, i] contiguous


def refuse_complex(v, name: str) -> None:
    """Raise ``TypeError`` for complex input (a cast to float64 would silently drop the imaginary part)."""
    if np.iscomplexobj(v):
        raise TypeError(
            f"{name} is complex ({np.asarray(v).dtype}); adjopt works on real parameters and states: pass the real "
            f"part (np.real) if the imaginary part is zero, or split real and imaginary parts into two real parameters"
        )


def owned(arr, name: str = "the array") -> np.ndarray:
    """A read-only, finite, real float64 copy of ``arr`` that adjopt owns: what it keeps past a call never
    aliases the caller's array. Complex input raises ``TypeError``, NaN or Inf :class:`NonFiniteError`."""
    refuse_complex(arr, name)
    out = np.array(arr, dtype=np.float64, copy=True, order="C")
    check_finite(out, name)
    out.flags.writeable = False
    return out


def owned_operator(M, name: str = "the matrix"):
    """A copy of a matrix adjopt keeps: scipy sparse as CSR (float64), dense as with :func:`owned`."""
    import scipy.sparse as sp

    if sp.issparse(M):
        refuse_complex(M.data, name)
        M = sp.csr_array(M, dtype=np.float64, copy=True)
        check_finite(M.data, name)
        return M
    return owned(M, name)


def check_symmetric(M, name: str, what: str) -> None:
    """Raise ``ValueError`` unless the sparse matrix M is symmetric to 1e-12 of max|M|; ``what`` says why."""
    diff = M - M.T
    scale = float(abs(M).max()) if M.nnz else 0.0
    if diff.nnz and float(abs(diff).max()) > 1e-12 * scale:
        raise ValueError(f"{name} must be symmetric: {what}; pass (M + M.T) / 2 if that is what you mean "
                         f"(max |M - M^T| = {float(abs(diff).max()):.3g}, max |M| = {scale:.3g})")


def as_count(value, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (a count: parameters, rows), or ``ValueError`` (bools and floats are refused)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_flag(value, name: str) -> bool:
    """``value`` as a bool, or ``TypeError`` (a string such as "False" is truthy and would silently mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_tolerance(tol, name: str = "tol") -> float | None:
    """``None`` (the solver's default) or a relative tolerance in (0, 1), as a float."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)) or not 0 < tol < 1:
        raise ValueError(f"{name} must be None (the solver's default) or a relative tolerance in (0, 1), got {tol!r}")
    return float(tol)


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise :class:`NonFiniteError` naming the first NaN/Inf entry of ``arr``."""
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(np.ravel(arr)))
        raise NonFiniteError(
            f"{name} contains {bad.size} NaN or Inf value(s), first at flat index {bad[0]}; "
            f"check the values passed in (or the step that produced them)"
        )


def as_state_like(v, n: int, name: str) -> np.ndarray:
    """Return ``v`` as float64 of shape ``(n,)`` or ``(n, k)`` (k right-hand sides)."""
    refuse_complex(v, name)
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ShapeError(f"{name} must have shape ({n},) or ({n}, k), got {arr.shape}")
    return arr


def same_layout(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise if two state-like arrays differ in shape."""
    if a.shape != b.shape:
        raise ShapeError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match")
