"""Objectives of the state u alone: Norm, SquaredMisfit, Compliance."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._threads import dot, norm
from .._validate import check_finite, check_symmetric, owned, owned_operator, refuse_complex
from ..errors import ShapeError
from .base import Objective


class Norm(Objective):
    """f(u) = ||u|| (Frobenius norm for several columns): the seed note's objective.

        df/du = u / ||u||,     f_uu du = du / ||u|| - u (u . du) / ||u||^3
    """

    def value(self, u, p):
        return norm(u)

    def _norm(self, u):
        nrm = norm(u)
        if nrm == 0:
            raise ValueError("Norm is not differentiable at u = 0; the state vanished (is b zero?)")
        return nrm

    def grad_u(self, u, p):
        return u / self._norm(u)

    def hess_uu(self, u, p, du):
        nrm = self._norm(u)
        return du / nrm - u * (dot(u, du) / nrm**3)

    def __repr__(self):
        return "Norm()"


class SquaredMisfit(Objective):
    """f(u) = 0.5 ||B u - d||_W^2 = 0.5 (B u - d)^T W (B u - d).

        df/du = B^T W (B u - d),      f_uu du = B^T W B du

    Parameters
    ----------
    B
        Observation operator (n_obs x n, sparse or dense); ``None`` observes u itself.
    d
        Data, (n_obs,) or (n_obs, k) for k experiments.
    W
        Weights: ``None`` (identity), a vector of n_obs weights (e.g. 1/sigma^2), or an n_obs x n_obs matrix.
    """

    def __init__(self, d, B=None, W=None):
        refuse_complex(d, "data d")
        self.d = owned(d, "data d")  # a copy: the caller may reuse its data array
        check_finite(self.d, "data d")
        if self.d.ndim not in (1, 2):
            raise ShapeError(f"data d must be (n_obs,) or (n_obs, k), got {self.d.shape}")
        n_obs = self.d.shape[0]
        if B is not None:
            B = owned_operator(B, "the observation operator B")
            if B.ndim != 2 or B.shape[0] != n_obs:
                raise ShapeError(f"observation operator B must have {n_obs} rows (one per datum), got shape {B.shape}")
        self.B = B
        if W is not None:
            if sp.issparse(W) or np.ndim(W) == 2:
                W = owned_operator(W if sp.issparse(W) else sp.csr_array(W), "the weight matrix W")
                if W.shape != (n_obs, n_obs):
                    raise ShapeError(f"weight matrix W must be {n_obs} x {n_obs}, got {W.shape}")
                check_symmetric(W, "the weight matrix W", "the misfit 0.5 r^T W r has the gradient B^T W r only "
                                "for a symmetric W")
            else:
                W = owned(W, "the weights W")
                if W.shape != (n_obs,):
                    raise ShapeError(f"weight vector W must have length {n_obs}, got {W.shape}")
        self.W = W

    def _obs(self, u):
        return u if self.B is None else self.B @ u

    def _obs_T(self, r):
        return r if self.B is None else self.B.T @ r

    def _weigh(self, r):
        if self.W is None:
            return r
        if isinstance(self.W, np.ndarray):
            return self.W[:, None] * r if r.ndim == 2 else self.W * r
        return self.W @ r

    def residual(self, u):
        r = self._obs(u)
        if r.shape != self.d.shape:
            raise ShapeError(f"observations B u have shape {r.shape} but the data have shape {self.d.shape}")
        return r - self.d

    def value(self, u, p):
        r = self.residual(u)
        return 0.5 * dot(r, self._weigh(r))

    def grad_u(self, u, p):
        return self._obs_T(self._weigh(self.residual(u)))

    def hess_uu(self, u, p, du):
        return self._obs_T(self._weigh(self._obs(du)))

    def __repr__(self):
        return f"SquaredMisfit(n_obs={self.d.shape[0]})"


class Compliance(Objective):
    """f(u) = l^T u (for l = b, the compliance of a structure under load b).

        df/du = l,      f_uu = 0
    """

    def __init__(self, load):
        self.load = owned(load.toarray() if sp.issparse(load) else load, "load")
        check_finite(self.load, "load")
        self.linear_load = self.load

    def value(self, u, p):
        if u.shape != self.load.shape:
            raise ShapeError(f"state has shape {u.shape} but the load has shape {self.load.shape}")
        return dot(self.load, u)

    def grad_u(self, u, p):
        return self.load

    def hess_uu(self, u, p, du):
        return np.zeros_like(du)

    def __repr__(self):
        return "Compliance()"
