"""Parametric matrices defined by user callbacks: bring your own A(p).

The user gives a fixed CSR pattern, ``values(p) -> data`` and the Jacobian
``jacobian(p) -> J`` with J[s, k] = d data_s / d p_k (sparse, nnz x m). Then

    contract(p, w, z) = J^T (w[rows] * z[cols])      (a gather per slot)
    tangent values    = J dp

and the second-order term comes from a ``second(p, w, z, dp)`` callback, or is
zero when the user declares ``affine=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from ..errors import MissingDerivativeError, PatternError
from . import _kernels
from .base import ParametricMatrix


class CallbackMatrix(ParametricMatrix):
    """A(p) from a fixed pattern and callbacks for its values and their Jacobian.

    Parameters
    ----------
    pattern
        A scipy sparse matrix whose (canonical CSR) pattern is A's pattern, or
        a tuple ``(indptr, indices, shape)``.
    n_params
        Number of parameters m.
    values
        ``values(p) -> (nnz,)``: the CSR data of A(p) in the pattern's order.
    jacobian
        ``jacobian(p) -> (nnz, m)`` sparse or dense: d data / d p.
    second
        Optional ``second(p, w, z, dp) -> (m,)``: C2 of DESIGN.md, with w and z
        given as (n, k) arrays.
    affine
        Declare A affine in p (C2 = 0). Without ``second`` and without
        ``affine=True``, Hessian actions raise :class:`MissingDerivativeError`.
    """

    def __init__(
        self,
        pattern,
        n_params: int,
        values: Callable,
        jacobian: Callable,
        second: Callable | None = None,
        affine: bool = False,
    ):
        if isinstance(pattern, tuple):
            indptr, indices, shape = pattern
            mat = sp.csr_array((np.ones(len(indices)), indices, indptr), shape=shape)
        else:
            mat = sp.csr_array(pattern)
        mat.sum_duplicates()
        mat.sort_indices()
        if mat.shape[0] != mat.shape[1]:
            raise PatternError(f"A must be square, the pattern has shape {mat.shape}")
        self.shape = (int(mat.shape[0]), int(mat.shape[1]))
        self.indptr = mat.indptr
        self.indices = mat.indices
        self.n_params = int(n_params)
        self._rows = np.repeat(np.arange(self.shape[0], dtype=self.indices.dtype), np.diff(self.indptr))
        self._values_cb = values
        self._jacobian_cb = jacobian
        self._second_cb = second
        self.affine = bool(affine) and second is None

    def values(self, p) -> np.ndarray:
        p = self.check_p(p)
        data = np.asarray(self._values_cb(p), dtype=np.float64)
        if data.shape != (self.nnz,):
            raise PatternError(f"values(p) returned shape {data.shape}, but the pattern has nnz={self.nnz} entries")
        return data

    def jacobian(self, p) -> sp.csr_array:
        """d data / d p as a sparse (nnz, m) array, checked against the pattern."""
        J = self._jacobian_cb(p)
        J = sp.csr_array(J) if (sp.issparse(J) or np.ndim(J) == 2) else None
        if J is None or J.shape != (self.nnz, self.n_params):
            got = None if J is None else J.shape
            raise PatternError(f"jacobian(p) must have shape (nnz, m) = ({self.nnz}, {self.n_params}), got {got}")
        return J

    def _contract(self, p, w, z):
        prod = np.empty(self.nnz)
        _kernels.slot_products(self._rows, self.indices, _kernels.as_columns(w), _kernels.as_columns(z), prod)
        return self.jacobian(p).T @ prod

    def _tangent_values(self, p, dp):
        return self.jacobian(p) @ dp

    def _second(self, p, w, z, dp):
        if self._second_cb is None:
            raise MissingDerivativeError(
                "this CallbackMatrix has no second-order term: pass second=(p, w, z, dp) -> (m,) "
                "or affine=True if A depends affinely on p (Hessian actions need it)"
            )
        out = np.asarray(self._second_cb(p, _kernels.as_columns(w), _kernels.as_columns(z), dp), dtype=np.float64)
        if out.shape != (self.n_params,):
            raise PatternError(f"second(p, w, z, dp) must return shape ({self.n_params},), got {out.shape}")
        return out


class ConstantMatrix(ParametricMatrix):
    """A matrix that does not depend on p (parameters enter only through b(p)).

    Every derivative of A vanishes: contract, tangent and second are zero. Use
    it for source and control problems, where p is a right-hand side.
    """

    affine = True

    def __init__(self, A, n_params: int):
        A = sp.csr_array(A)
        A.sum_duplicates()
        A.sort_indices()
        if A.shape[0] != A.shape[1]:
            raise PatternError(f"A must be square, got shape {A.shape}")
        self.shape = (int(A.shape[0]), int(A.shape[1]))
        self.indptr, self.indices, self._data = A.indptr, A.indices, A.data
        self.n_params = int(n_params)

    def values(self, p) -> np.ndarray:
        self.check_p(p)
        return self._data

    def _contract(self, p, w, z):
        return np.zeros(self.n_params)

    def _tangent_values(self, p, dp):
        return np.zeros_like(self._data)
