"""Inner products on the parameter space and their Riesz maps.

The gradient adjopt computes is the Euclidean one, dJ/dp_i: a dual vector.
With p the nodal values of a function, the steepest-descent direction in the
function space is its Riesz representative r = M^{-1} g, with M the Gram
matrix of the inner product (the L2 mass matrix, or K + M for H1). Drivers
that measure steps and gradients this way take iteration counts that do not
grow as the mesh is refined; the Euclidean inner product (M = I) makes them
grow, because g shrinks with the element size while the curvature does not.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from .._validate import check_symmetric

from ..errors import ShapeError
from .space import SERIAL

INNER_PRODUCTS = ("euclidean", "l2", "l2-lumped", "h1")


class InnerProduct:
    """<a, b> = a^T M b with M symmetric positive definite; ``riesz(g) = M^{-1} g``."""

    name = "abstract"

    def __init__(self, n: int, space=None):
        self.n = int(n)
        #: where the vectors live (:mod:`adjopt.optimize.space`): ``n`` is this process's part of them
        self.space = SERIAL if space is None else space

    def apply(self, v: np.ndarray) -> np.ndarray:
        """M v (primal -> dual)."""
        raise NotImplementedError

    def riesz(self, g: np.ndarray) -> np.ndarray:
        """M^{-1} g (dual -> primal): the gradient's representative."""
        raise NotImplementedError

    def diagonal(self) -> np.ndarray:
        """A positive diagonal approximation of M (the lumped mass): scales bound-constrained methods."""
        raise NotImplementedError

    def inner(self, a: np.ndarray, b: np.ndarray) -> float:
        return self.space.dot(a, self.apply(b))

    def norm(self, v: np.ndarray) -> float:
        return math.sqrt(max(self.inner(v, v), 0.0))

    def dual_norm(self, g: np.ndarray) -> float:
        """sqrt(g^T M^{-1} g), the norm of a gradient."""
        return math.sqrt(max(self.space.dot(g, self.riesz(g)), 0.0))

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n})"


class Euclidean(InnerProduct):
    """M = I."""

    name = "euclidean"

    def apply(self, v):
        return v

    def riesz(self, g):
        return g

    def diagonal(self):
        return np.ones(self.n)


class Diagonal(InnerProduct):
    """M = diag(d), d > 0 (a lumped mass, or cell volumes for element-wise parameters)."""

    name = "l2-lumped"

    def __init__(self, d, space=None):
        d = np.asarray(d, dtype=np.float64)
        if d.ndim != 1 or not np.all(np.isfinite(d)) or not np.all(d > 0):
            raise ValueError("a diagonal inner product needs a 1-D array of positive finite weights")
        super().__init__(d.size, space)
        self.d = d

    def apply(self, v):
        return self.d * v

    def riesz(self, g):
        return g / self.d

    def diagonal(self):
        return self.d


class Matrix(InnerProduct):
    """M a sparse SPD matrix (consistent mass, or K + M for H1), factorized once."""

    def __init__(self, M, name: str = "l2"):
        M = sp.csc_array(M, dtype=np.float64)
        if M.shape[0] != M.shape[1]:
            raise ShapeError(f"the Gram matrix must be square, got {M.shape}")
        super().__init__(M.shape[0])
        self.name = name
        self.M = M
        d = np.asarray(abs(M).sum(axis=1)).ravel()  # row sums of |M|: the lumped mass
        if not np.all(d > 0):
            raise ValueError("the Gram matrix has an empty row: it is not positive definite")
        self._diag = d
        check_symmetric(sp.csr_array(M), f"the Gram matrix of the {name} inner product",
                        "an inner product is symmetric")
        try:
            # diagonal pivoting with a symmetric ordering: the pivots are those of L D L^T, all positive
            # exactly when M is positive definite (Sylvester's law of inertia)
            self._lu = sla.splu(M, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
        except RuntimeError as exc:
            raise ValueError(f"the Gram matrix is singular ({exc}): it is not positive definite") from exc
        pivots = self._lu.U.diagonal()
        if not np.all(pivots > 0):
            raise ValueError(f"the Gram matrix of the {name} inner product is not positive definite "
                             f"({int(np.count_nonzero(~(pivots > 0)))} non-positive pivot(s)): give a mass matrix "
                             "(and stiffness) that is symmetric positive definite")

    def apply(self, v):
        return self.M @ v

    def riesz(self, g):
        return self._lu.solve(np.asarray(g, dtype=np.float64))

    def diagonal(self):
        return self._diag


def make_inner_product(spec, problem) -> InnerProduct:
    """An :class:`InnerProduct` from a name or an instance.

    Names: ``"euclidean"``; ``"l2"`` (``problem.mass``: a sparse consistent
    mass, or a 1-D array of lumped weights); ``"l2-lumped"`` (the row sums of
    ``problem.mass``); ``"h1"`` (``problem.stiffness + problem.mass``).
    ``None`` is ``"l2"`` when the problem has a mass and ``"euclidean"`` otherwise.
    A problem without a mass whose functional has Gram matrices (``functional.grams``: a distributed
    functional built rank by rank) gets ``functional.inner_product(spec)``, its matrices kept distributed.
    """
    n = problem.functional.n_params
    if isinstance(spec, InnerProduct):
        if spec.n != n:
            raise ShapeError(f"the inner product acts on {spec.n} parameters, the problem has {n}")
        return spec
    mass = getattr(problem, "mass", None)
    grams = getattr(problem.functional, "grams", None)
    if mass is None and grams:
        # a distributed functional built with its parameter space's Gram matrices (a rank-local build)
        if spec is None:
            spec = "l2" if "mass" in grams else "euclidean"
        return problem.functional.inner_product(spec)
    if spec is None:
        spec = "l2" if mass is not None else "euclidean"
    if not isinstance(spec, str) or spec.lower() not in INNER_PRODUCTS:
        raise ValueError(f"unknown inner product {spec!r}; use one of {INNER_PRODUCTS} or an InnerProduct instance")
    spec = spec.lower()
    if spec == "euclidean":
        return Euclidean(n, getattr(problem.functional, "space", None))
    if mass is None:
        raise ValueError(f"inner product {spec!r} needs the problem's parameter-space mass (Problem(mass=...))")
    if spec == "h1":
        K = getattr(problem, "stiffness", None)
        if K is None:
            raise ValueError("inner product 'h1' needs Problem(stiffness=...) as well as mass")
        M = sp.diags_array(mass) if np.ndim(mass) == 1 else mass
        return Matrix(sp.csc_array(K) + sp.csc_array(M), name="h1")
    if np.ndim(mass) == 1:
        return Diagonal(mass)
    if spec == "l2-lumped":
        return Diagonal(np.asarray(sp.csr_array(mass).sum(axis=1)).ravel())
    return Matrix(mass, name="l2")
