"""Input checks shared by the package: shapes and finiteness, with clear messages."""

from __future__ import annotations

import numpy as np

from .errors import NonFiniteError, ShapeError


def as_parameter(p, n_params: int, name: str = "p") -> np.ndarray:
    """Return ``p`` as a float64 vector of length ``n_params``, checked finite."""
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n_params:
        raise ShapeError(
            f"{name} must be a vector of length {n_params} (one value per parameter), "
            f"got an array of shape {arr.shape}"
        )
    check_finite(arr, name)
    return arr


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
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ShapeError(f"{name} must have shape ({n},) or ({n}, k), got {arr.shape}")
    return arr


def same_layout(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise if two state-like arrays differ in shape."""
    if a.shape != b.shape:
        raise ShapeError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match")
