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

from .._validate import as_parameter, as_state_like, check_finite, same_layout
from ..errors import ShapeError


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

    # -- blocks of directions (the blocked Hessian action) ---------------------
    def tangent_block(self, p, dP, z) -> np.ndarray:
        """The tangents of k directions: column i is (dA/dp . dP[:, i]) z.

        ``dP`` is (m, k); ``z`` of shape (n,) gives (n, k), of shape (n, c) gives (c, n, k) (block [c] holds
        the tangents applied to z[:, c]). This default loops over the columns; an operator with a kernel for
        blocks forms each element's product once for every direction.
        """
        p = self.check_p(p)
        dP = self._directions(dP)
        z = as_state_like(z, self.shape[1], "z")
        out = np.empty((1 if z.ndim == 1 else z.shape[1], self.shape[0], dP.shape[1]))
        for i in range(dP.shape[1]):
            t = self.tangent(p, dP[:, i], z)
            out[:, :, i] = t[None, :] if z.ndim == 1 else t.T
        return out[0] if z.ndim == 1 else out

    def contract_block(self, p, pairs) -> np.ndarray:
        """(m, k): column i is sum over the (W, Z) in ``pairs`` of W[:, i]^T (dA/dp) Z[:, i].

        Each W and Z is an (n, k) block or an (n,) vector shared by every column (all blocks of one k).
        """
        p = self.check_p(p)
        pairs, k = self._check_block_pairs(pairs)
        out = np.zeros((self.n_params, k))
        for i in range(k):
            for W, Z in pairs:
                out[:, i] += self._contract(p, W if W.ndim == 1 else np.ascontiguousarray(W[:, i]),
                                            Z if Z.ndim == 1 else np.ascontiguousarray(Z[:, i]))
        return out

    def second_block(self, p, w, z, dP) -> np.ndarray:
        """(m, k): column i is :meth:`second` (p, w, z, dP[:, i]) (zero when A is affine in p)."""
        p = self.check_p(p)
        dP = self._directions(dP)
        w, z = self._check_pair(w, z, "w", "z")
        if self.affine:
            return np.zeros(dP.shape)
        return np.column_stack([self._second(p, w, z, dP[:, i]) for i in range(dP.shape[1])])

    def _directions(self, dP) -> np.ndarray:
        """dP as a finite float64 (m, k) array (not copied when it is one already)."""
        dP = np.asarray(dP, dtype=np.float64)
        if dP.ndim != 2 or dP.shape[0] != self.n_params or dP.shape[1] == 0:
            raise ShapeError(f"dP must be an ({self.n_params}, k) array of k >= 1 directions, got shape {dP.shape}")
        check_finite(dP, "dP")
        return dP

    def _check_block_pairs(self, pairs):
        """The (W, Z) pairs as float64 arrays of shape (n,) or (n, k), and k (1 when every one is a vector)."""
        pairs = list(pairs) if isinstance(pairs, (list, tuple)) else None
        if not pairs or not all(isinstance(q, (list, tuple)) and len(q) == 2 for q in pairs):
            raise ValueError("pairs must be a non-empty list of (W, Z) pairs, e.g. [(W, Z)] for one pair")
        checked, widths = [], set()
        for W, Z in pairs:
            W = as_state_like(W, self.shape[0], "W")
            Z = as_state_like(Z, self.shape[1], "Z")
            widths.update(a.shape[1] for a in (W, Z) if a.ndim == 2)
            checked.append((W, Z))
        if len(widths) > 1:
            raise ValueError(f"the blocks of a contract_block call have different numbers of columns: {sorted(widths)}")
        return checked, (widths.pop() if widths else 1)

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
