"""Functionals of the lowest eigenvalues of K(p) phi = lambda M(p) phi (eigenfrequency design).

For a simple eigenvalue lambda_i with an M-normalized mode phi_i (phi_i^T M phi_i = 1),

    d lambda_i / dp = phi_i^T (dK/dp) phi_i - lambda_i phi_i^T (dM/dp) phi_i,

two contractions of the element matrices with the mode (never a tensor). The
functional here is J(p) = sum_{i < k} 1 / lambda_i (k = 1: the inverse of the
fundamental eigenvalue; minimizing it maximizes the fundamental frequency; k >
1: pyMOTO's ex_eigenfrequency objective). A sum over the k lowest eigenvalues
is differentiable as long as lambda_k < lambda_{k+1}, even where eigenvalues
below it coincide, but only through the modes of a simple eigenvalue does the
formula above hold one by one: the functional refuses (a clear error) a point
where two of the k + 1 lowest eigenvalues are within ``gap`` of each other.

The eigenpairs come from ARPACK (``scipy.sparse.linalg.eigsh``) in
shift-invert mode about 0, on a factorization of K(p) by the functional's
solver (one per new p, cached with the eigenpairs for the gradient).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import scipy.sparse.linalg as spla

from ._validate import as_parameter
from .errors import AdjoptError, ShapeError
from .solvers import make_solver

logger = logging.getLogger(__name__)

__all__ = ["EigenvalueFunctional", "RepeatedEigenvalueError"]


class RepeatedEigenvalueError(AdjoptError, ValueError):
    """Two of the lowest eigenvalues coincide: the functional is not differentiable there mode by mode."""


class EigenvalueFunctional:
    """J(p) = sum_{i < k} 1 / lambda_i(p) for K(rho) phi = lambda M(rho) phi, rho = map(p).

    Parameters
    ----------
    K, M
        :class:`~adjopt.operators.ParametricMatrix` of the same shape and the
        same parameters: stiffness (symmetric positive definite) and mass
        (symmetric positive definite).
    k
        How many of the lowest eigenvalues enter J (1: the fundamental one).
    parameter_map
        Optional :class:`~adjopt.maps.ParameterMap` p -> rho.
    solver
        The linear solver that factorizes K for the shift-invert (a name or a
        :class:`~adjopt.solvers.LinearSolver`; default ``"auto"``).
    gap
        Relative distance below which two of the k + 1 lowest eigenvalues count
        as one repeated eigenvalue (1e-6); such a point raises
        :class:`RepeatedEigenvalueError`.
    tol
        ARPACK's relative accuracy (0: machine precision).
    """

    def __init__(self, K, M, k: int = 1, parameter_map=None, solver="auto", gap: float = 1e-6, tol: float = 0.0):
        if K.shape != M.shape or K.shape[0] != K.shape[1]:
            raise ShapeError(f"K and M must be square of one shape, got {K.shape} and {M.shape}")
        if K.n_params != M.n_params:
            raise ShapeError(f"K and M must take the same parameters, got {K.n_params} and {M.n_params}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= K.shape[0] - 2:
            raise ValueError(f"k must be an integer in [1, n - 2] = [1, {K.shape[0] - 2}], got {k!r}")
        if not (np.isfinite(gap) and 0 <= gap < 1):
            raise ValueError(f"gap must be a relative distance in [0, 1), got {gap!r}")
        if parameter_map is not None and parameter_map.n_out != K.n_params:
            raise ShapeError(f"the parameter map gives {parameter_map.n_out} values, the matrices take {K.n_params}")
        self.K, self.M, self.k, self.map = K, M, int(k), parameter_map
        self.gap, self.tol = float(gap), float(tol)
        self.solver = make_solver(solver)
        self._last = None  # (p, rho, lambdas (k + 1,), modes (n, k + 1))
        #: wall seconds by phase: "filter", "assembly", "factorize", "eigensolve", "sensitivity"
        self.times = Counter()

    @property
    def n_params(self) -> int:
        return self.K.n_params if self.map is None else self.map.n_in

    @property
    def stats(self):
        return self.solver.stats

    def forget(self) -> None:
        """Drop the cached eigenpairs (a parameter map changed in place)."""
        self._last = None

    def _pairs(self, p):
        p = as_parameter(p, self.n_params, "p")
        last = self._last
        version = getattr(self.map, "version", 0)
        if last is not None and last[4] == version and np.array_equal(last[0], p):
            return last
        clock = time.perf_counter
        t0 = clock()
        rho = p.copy() if self.map is None else np.asarray(self.map.forward(p), dtype=np.float64)
        t1 = clock()
        K, M = self.K.assemble(rho), self.M.assemble(rho)
        t2 = clock()
        fac = self.solver.factorize(K)
        t3 = clock()
        n = K.shape[0]
        OPinv = spla.LinearOperator((n, n), matvec=lambda x: fac.solve(x, kind="other"), dtype=np.float64)
        want = self.k + 1
        v0 = np.ones(n)  # a fixed start: the same p gives the same modes
        lam, phi = spla.eigsh(K, k=want, M=M, sigma=0.0, which="LM", OPinv=OPinv, v0=v0, tol=self.tol)
        order = np.argsort(lam)
        lam, phi = lam[order], phi[:, order]
        t4 = clock()
        if not np.all(np.isfinite(lam)) or lam[0] <= 0:
            raise AdjoptError(f"the lowest eigenvalues {lam[:3]} are not positive: K(p) is not positive definite "
                              "(a support missing?) or M(p) is not")
        # M-normalize (ARPACK's generalized modes are M-orthogonal; make the scale explicit)
        norms = np.sqrt(np.einsum("ij,ij->j", phi, M @ phi))
        phi = phi / norms
        rel = np.diff(lam) / lam[1:]
        close = np.flatnonzero(rel <= self.gap)
        if close.size:
            i = int(close[0])
            raise RepeatedEigenvalueError(
                f"eigenvalues {i + 1} and {i + 2} coincide to {rel[i]:.2g} (relative; gap {self.gap:g}): "
                f"{lam[i]:.10g} and {lam[i + 1]:.10g}; their modes and derivatives are not defined one by one. "
                "A symmetric design has symmetric repeated modes: break the symmetry, or use a bound formulation "
                "over the cluster (adjopt.optimize.minmax_problem over 1 / lambda_i)")
        self.times["filter"] += t1 - t0
        self.times["assembly"] += t2 - t1
        self.times["factorize"] += t3 - t2
        self.times["eigensolve"] += t4 - t3
        self._last = (p.copy(), rho, lam, phi, version)
        return self._last

    def eigenvalues(self, p) -> np.ndarray:
        """The k + 1 lowest eigenvalues at p, ascending (the last one shows the gap)."""
        return self._pairs(p)[2].copy()

    def modes(self, p) -> np.ndarray:
        """(n, k + 1) M-normalized modes at p."""
        return self._pairs(p)[3].copy()

    def state(self, p) -> np.ndarray:
        """The fundamental mode (M-normalized): what result files draw."""
        return self._pairs(p)[3][:, 0].copy()

    def value(self, p) -> float:
        lam = self._pairs(p)[2]
        return float(np.sum(1.0 / lam[: self.k]))

    def gradient(self, p, tol=None) -> np.ndarray:
        """sum_i -(1 / lambda_i^2) (phi_i^T dK phi_i - lambda_i phi_i^T dM phi_i), pulled back through the map."""
        _, rho, lam, phi, _ = self._pairs(p)
        t0 = time.perf_counter()
        lam_k, phi_k = lam[: self.k], phi[:, : self.k]
        w = -1.0 / lam_k**2
        g = self.K.contract(rho, phi_k * w, phi_k) - self.M.contract(rho, phi_k * (w * lam_k), phi_k)
        if self.map is not None:
            g = self.map.vjp(np.asarray(p, dtype=np.float64), g)
        self.times["sensitivity"] += time.perf_counter() - t0
        return np.asarray(g, dtype=np.float64)

    def hessp(self, p, v, tol=None):
        raise NotImplementedError("EigenvalueFunctional has no Hessian actions (second derivatives of eigenvalues "
                                  "need the whole spectrum); use a gradient method: 'mma', 'oc' or 'lbfgs'")

    def __repr__(self):
        return f"EigenvalueFunctional(k={self.k}, n={self.K.shape[0]}, n_params={self.n_params})"
