"""The :class:`ParametricMatrix` contract: a fixed CSR pattern whose values depend on p.

Formulas (DESIGN.md), with A = A(p) of shape n x n and m parameters:

    contract(p, w, z)_k        = w^T (dA/dp_k) z                      (m,)
    tangent(p, dp, z)          = (sum_j dp_j dA/dp_j) z               (n,)
    tangent_transpose(p, dp, w) = (sum_j dp_j dA/dp_j)^T w            (n,)
    second(p, w, z, dp)_k      = sum_j dp_j w^T (d2A/dp_k dp_j) z     (m,)

w and z may be (n,) or (n, k); for (n, k) the contractions sum over the k
columns (one column per right-hand side) and the tangents act column-wise.
The n x n x m tensor dA/dp is never formed.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._validate import as_parameter, as_state_like, same_layout


class ParametricMatrix:
    """A sparse matrix A(p) with a fixed CSR pattern.

    Subclasses set ``shape``, ``indptr``, ``indices`` and ``n_params`` and
    implement :meth:`values`, :meth:`_contract`, :meth:`_tangent_values` and
    :meth:`_second`. The public methods check their arguments first.
    """

    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    n_params: int
    #: True when A depends affinely on p, so that ``second`` is identically zero.
    affine: bool = False
    #: True when A(p) is symmetric for every p (declared by the subclass; never guessed)
    symmetric: bool = False
    #: True when A does not depend on p at all: the functional then factorizes it once for every p
    constant: bool = False

    @property
    def nnz(self) -> int:
        """Number of stored entries of the pattern."""
        return int(self.indices.shape[0])

    # -- public API -----------------------------------------------------------
    def values(self, p) -> np.ndarray:
        """The CSR ``data`` array of A(p), shape (nnz,)."""
        raise NotImplementedError

    def assemble(self, p) -> sp.csr_array:
        """A(p) as a ``scipy.sparse.csr_array``: fresh values on the fixed pattern, whose ``indices`` and
        ``indptr`` are shared and read-only (an in-place change such as ``eliminate_zeros()`` raises instead of
        corrupting the operator; ``A.assemble(p).copy()`` gives a matrix of your own)."""
        return self._csr(self.values(p))

    def contract(self, p, w, z) -> np.ndarray:
        """C(w, z)_k = w^T (dA/dp_k) z, summed over columns for (n, k) arguments."""
        p = self.check_p(p)
        w, z = self._check_pair(w, z, "w", "z")
        return self._contract(p, w, z)

    def tangent(self, p, dp, z) -> np.ndarray:
        """(dA/dp . dp) z = sum_j dp_j (dA/dp_j) z."""
        p = self.check_p(p)
        dp = as_parameter(dp, self.n_params, "dp")
        z = as_state_like(z, self.shape[1], "z")
        return self._csr(self._tangent_values(p, dp)) @ z

    def tangent_transpose(self, p, dp, w) -> np.ndarray:
        """(dA/dp . dp)^T w = sum_j dp_j (dA/dp_j)^T w."""
        p = self.check_p(p)
        dp = as_parameter(dp, self.n_params, "dp")
        w = as_state_like(w, self.shape[0], "w")
        return self._csr(self._tangent_values(p, dp)).T @ w

    def second(self, p, w, z, dp) -> np.ndarray:
        """C2(w, z, dp)_k = sum_j dp_j w^T (d2A/dp_k dp_j) z; zero when A is affine in p."""
        p = self.check_p(p)
        dp = as_parameter(dp, self.n_params, "dp")
        w, z = self._check_pair(w, z, "w", "z")
        if self.affine:
            return np.zeros(self.n_params)
        return self._second(p, w, z, dp)

    # -- helpers --------------------------------------------------------------
    def check_p(self, p) -> np.ndarray:
        """p as a finite float64 vector of length ``n_params`` (or a clear error)."""
        return as_parameter(p, self.n_params)

    def _check_pair(self, w, z, nw, nz):
        w = as_state_like(w, self.shape[0], nw)
        z = as_state_like(z, self.shape[1], nz)
        same_layout(w, z, nw, nz)
        return w, z

    def _csr(self, data: np.ndarray) -> sp.csr_array:
        for arr in (self.indices, self.indptr):
            if arr.flags.writeable:
                arr.flags.writeable = False  # shared by every matrix handed out: nobody may change the pattern
        return sp.csr_array((data, self.indices, self.indptr), shape=self.shape, copy=False)

    def _contract(self, p, w, z):
        raise NotImplementedError

    def _tangent_values(self, p, dp):
        """CSR data of sum_j dp_j dA/dp_j."""
        raise NotImplementedError

    def _second(self, p, w, z, dp):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape}, nnz={self.nnz}, n_params={self.n_params})"
