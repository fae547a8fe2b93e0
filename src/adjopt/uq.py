"""Low-rank Hessians and the Laplace approximation of the posterior.

With a Gaussian prior N(m0, R^{-1}) (R: the Hessian of the objective's prior terms, the regularization) and the
data misfit's Hessian H at the MAP point m (the reduced Hessian minus R), the Laplace approximation of the
posterior is N(m, (H + R)^{-1}). The generalized eigenproblem

    H v_i = lambda_i R v_i,   V^T R V = I,   lambda_1 >= lambda_2 >= ...

is solved by a randomized method on blocked Hessian actions (:func:`randomized_eigh`: Halko-Martinsson-Tropp's
range finder in the R inner product, Saibaba-Lee-Kitanidis for the generalized problem; double pass, or single
pass which needs no second block of actions). Then, with D = diag(lambda_i / (1 + lambda_i)) over the r pairs
kept (Woodbury),

    (H + R)^{-1} ~ R^{-1} - V D V^T                                         posterior covariance
    var_post     = var_prior - sum_i d_i v_i^2                              pointwise variance
    s_post       = m + s_prior - V P V^T R s_prior,  P = diag(1 - 1/sqrt(1 + lambda_i))   samples, s_prior ~ N(0, R^{-1})
    KL(post || prior) = 1/2 [sum_i (log(1 + lambda_i) - lambda_i / (1 + lambda_i)) + ||m - m0||_R^2]

(the sample's covariance is R^{-1} - V (2P - P^2) V^T = R^{-1} - V D V^T). Dropping the eigenvalues below the
r-th only loses directions where the data inform the parameter less than the prior does, when lambda_r << 1.
The same factors give the low-rank preconditioner (R + R V Lambda V^T R)^{-1} = R^{-1} - V D V^T for Newton-CG
(``preconditioner="lowrank"``).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from ._validate import as_count, as_parameter, check_finite, owned, refuse_complex
from .errors import ShapeError
from .objectives.base import Scaled, Sum
from .optimize.inner import InnerProduct, Matrix
from .solvers.base import blas_controller, one_blas_thread

logger = logging.getLogger(__name__)

#: the largest prior (parameters) sampled through a dense Cholesky factor of its precision
DENSE_SAMPLING_LIMIT = 4000
#: parameters up to which variances are computed exactly by default (m solves, in blocks)
EXACT_VARIANCE_LIMIT = 20000
#: samples drawn at once by the Monte Carlo variance estimates (memory: m x SAMPLE_BLOCK numbers)
SAMPLE_BLOCK = 64
#: a pivot of the prior precision this small against the largest: singular to working precision
SINGULAR_PIVOT = 1e-13
#: rows per thread from which the eigensolver's products and QR of tall blocks are split into row blocks on threads
PARALLEL_MIN_ROWS = 20000
#: rows of the blocks whose QRs make the QR of a sketch (TSQR; at least twice its columns): a block of them stays
#: in cache (see _orthonormal_basis)
QR_BLOCK_ROWS = 2048


# -- the prior --------------------------------------------------------------------------------------------
def _is_prior(term) -> bool:
    from .objectives.regularization import TikhonovH1, TikhonovL2

    return bool(getattr(term, "gaussian", False)) or isinstance(term, (TikhonovL2, TikhonovH1))


def _flatten(objective, c=1.0):
    """[(c, term)] of a sum of (scaled) terms (or of a list of them)."""
    if isinstance(objective, (list, tuple)):
        return [x for t in objective for x in _flatten(t, c)]
    if isinstance(objective, Sum):
        return [x for t in objective.terms for x in _flatten(t, c)]
    if isinstance(objective, Scaled):
        return _flatten(objective.term, c * objective.c)
    return [(c, objective)]


def objective_of(J):
    """The objective whose prior terms are looked for: ``J.objective`` of a reduced functional, the terms in p
    of a transient one (``J.param_terms``), or ``J`` itself (an objective or a list of terms)."""
    if hasattr(J, "param_terms") and not hasattr(J, "objective"):
        return list(J.param_terms)
    return getattr(J, "objective", J)


def _precision_matrix(term, n: int) -> sp.csr_array:
    if hasattr(term, "precision_matrix"):
        return sp.csr_array(term.precision_matrix())
    M = term.M
    if M is None:
        return sp.identity(n, format="csr")
    if isinstance(M, np.ndarray) and M.ndim == 1:
        return sp.diags_array(M).tocsr()
    return sp.csr_array(M)


class GaussianPrior:
    """The prior part of an objective, N(m0, R^{-1}): R = sum_i c_i R_i over the prior terms found in it
    (``BiLaplacianPrior``, ``TikhonovL2``, ``TikhonovH1``, each possibly scaled; the other terms are the data
    misfit).

    ``precision(V)`` = R V and ``covariance(V)`` = R^{-1} V for V of shape (m,) or (m, k), ``covariance_norms(V)``
    the norms sqrt(v^T R^{-1} v) of its columns; ``sample(n, rng)``
    (m, n) draws of N(m0, R^{-1}); ``variance()`` the pointwise prior variance diag(R^{-1}). One BiLaplacian
    prior (scaled or not) uses its own factorization and sampler; any other combination factorizes R (checked
    symmetric positive definite) and samples only when R is diagonal.
    """

    def __init__(self, terms, n: int):
        if not terms:
            raise ValueError("the objective has no prior term: add a Gaussian regularization (adjopt.BiLaplacianPrior, "
                             "TikhonovL2, or TikhonovH1 + TikhonovL2) to the misfit, or pass prior=")
        self.terms, self.n = list(terms), int(n)
        for c, _ in self.terms:
            if not c > 0:
                raise ValueError(f"a prior term is scaled by {c!r}: a Gaussian prior needs a positive weight")
        self.single = self.terms[0] if len(self.terms) == 1 and hasattr(self.terms[0][1], "covariance") else None
        self._R = None
        self._fac = None
        means = [getattr(t, "mean", None) if hasattr(t, "mean") else getattr(t, "p_ref", None) for _, t in self.terms]
        m0 = np.zeros(self.n)
        if len(self.terms) == 1 and means[0] is not None:
            m0 = m0 + np.asarray(means[0], dtype=np.float64)
        elif any(m is not None and np.any(m) for m in means):
            # the mean of a sum of quadratics: R m0 = sum c_i R_i m_i
            rhs = sum(c * (_precision_matrix(t, self.n) @ (np.zeros(self.n) + (0.0 if m is None else m)))
                      for (c, t), m in zip(self.terms, means))
            m0 = self.covariance(rhs)
        self.mean = m0

    @classmethod
    def of(cls, objective, n: int) -> GaussianPrior:
        """The prior terms of ``objective`` (an :class:`~adjopt.objectives.Objective`, usually a sum; a list of
        terms; or a functional, whose objective is read: ``J.objective``, or a transient one's terms in p)."""
        if isinstance(objective, GaussianPrior):
            return objective
        if hasattr(objective, "covariance") and hasattr(objective, "precision"):
            return cls([(1.0, objective)], n)
        return cls([(c, t) for c, t in _flatten(objective_of(objective)) if _is_prior(t)], n)

    def matrix(self) -> sp.csr_array:
        """R as a sparse matrix."""
        if self._R is None:
            self._R = sp.csr_array(sum(c * _precision_matrix(t, self.n) for c, t in self.terms))
        return self._R

    def _block(self, V, name="V"):
        refuse_complex(V, name)
        V = np.asarray(V, dtype=np.float64)
        if V.ndim not in (1, 2) or V.shape[0] != self.n:
            raise ShapeError(f"{name} must have shape ({self.n},) or ({self.n}, k), got {V.shape}")
        check_finite(V, name)
        return V

    def precision(self, V) -> np.ndarray:
        V = self._block(V)
        if self.single is not None:
            c, t = self.single
            return c * t.precision(V)
        return self.matrix() @ V

    def covariance(self, V) -> np.ndarray:
        V = self._block(V)
        if self.single is not None:
            c, t = self.single
            return t.covariance(V) / c
        if self._fac is None:
            hint = ("TikhonovH1 alone leaves the constants free: add a TikhonovL2 term or use "
                    "adjopt.BiLaplacianPrior")
            try:
                fac = Matrix(self.matrix(), name="prior precision")
            except ValueError as exc:
                raise ValueError(f"the prior precision (the Hessian of the regularization) is not symmetric positive "
                                 f"definite: {exc}. {hint}") from exc
            pivots = np.abs(fac._lu.U.diagonal())
            if pivots.min() <= SINGULAR_PIVOT * pivots.max():
                # positive pivots, one of them round-off: singular to working precision (a free constant)
                raise ValueError(f"the prior precision (the Hessian of the regularization) is not symmetric positive "
                                 f"definite: it is singular to working precision (pivots from {pivots.max():.3g} "
                                 f"down to {pivots.min():.3g}). {hint}")
            self._fac = fac
        return self._fac.riesz(V)

    def covariance_norms(self, V):
        """sqrt(v^T R^{-1} v) of each column of V: a float for V of shape (m,), (k,) for (m, k). A BiLaplacian
        prior spends one solve per column on it (half of :meth:`covariance`)."""
        V = self._block(V)
        if self.single is not None:
            c, t = self.single
            if hasattr(t, "covariance_norms"):
                return t.covariance_norms(V) / math.sqrt(c)
        X = self.covariance(V)
        if V.ndim == 1:
            return math.sqrt(max(float(np.einsum("i,i->", V, X)), 0.0))
        return np.sqrt(np.maximum(np.einsum("ij,ij->j", V, X), 0.0))

    def sample(self, n: int = 1, rng=None) -> np.ndarray:
        """(m, n) samples of N(m0, R^{-1}): through the prior term's own sampler (BiLaplacian), 1/sqrt(diag R) for a
        diagonal R, or a dense Cholesky factor of R up to :data:`DENSE_SAMPLING_LIMIT` parameters."""
        n = as_count(n, "n")
        rng = np.random.default_rng(rng)
        if self.single is not None:
            c, t = self.single
            # the term's samples around its own mean, scaled: c R_t has the covariance R_t^{-1} / c
            return self.mean[:, None] + (t.sample(n, rng) - self.mean[:, None]) / math.sqrt(c)
        R = self.matrix()
        offdiag = R - sp.diags_array(R.diagonal())
        if offdiag.count_nonzero() == 0:
            d = R.diagonal()
            if not np.all(d > 0):
                raise ValueError("the prior precision has a non-positive diagonal: it is not positive definite")
            return self.mean[:, None] + rng.standard_normal((self.n, n)) / np.sqrt(d)[:, None]
        if self.n <= DENSE_SAMPLING_LIMIT:  # small: a dense Cholesky factor L L^T = R, s = L^-T xi
            L = np.linalg.cholesky(R.toarray())
            return self.mean[:, None] + sla.solve_triangular(L.T, rng.standard_normal((self.n, n)), lower=False)
        raise NotImplementedError(f"sampling this prior ({self.n} parameters) needs a square root of its precision: "
                                  f"use adjopt.BiLaplacianPrior (sampled through its factorization) or a diagonal "
                                  f"TikhonovL2 (a dense Cholesky factor serves up to {DENSE_SAMPLING_LIMIT} parameters); "
                                  f"its variance is then available exactly only (variance(exact=True): m solves)")

    def variance(self, exact: bool | None = None, n_samples: int = 500, rng=None) -> np.ndarray:
        """diag(R^{-1}): exact (m solves, in blocks of 256) when ``exact`` or m <= 20000, else the Monte Carlo
        estimate mean_s (s - m0)^2 over ``n_samples`` samples (relative standard error sqrt(2 / n_samples);
        never negative). A prior that cannot be sampled at this size is refused beyond the exact limit."""
        if self.single is not None:
            c, t = self.single
            return t.variance(exact=exact, n_samples=n_samples, rng=rng) / c
        if exact or (exact is None and self.n <= EXACT_VARIANCE_LIMIT):
            out = np.empty(self.n)
            for i0 in range(0, self.n, 256):
                i1 = min(i0 + 256, self.n)
                E = np.zeros((self.n, i1 - i0))
                E[np.arange(i0, i1), np.arange(i1 - i0)] = 1.0
                X = self.covariance(E)
                out[i0:i1] = X[np.arange(i0, i1), np.arange(i1 - i0)]
            return out
        n_samples = as_count(n_samples, "n_samples")
        rng = np.random.default_rng(rng)
        out = np.zeros(self.n)
        for s0 in range(0, n_samples, SAMPLE_BLOCK):
            S = self.sample(min(SAMPLE_BLOCK, n_samples - s0), rng) - self.mean[:, None]  # refuses what it cannot
            out += np.einsum("ij,ij->i", S, S)
        logger.info("prior variance: Monte Carlo estimate from %d samples (relative standard error %.1f %%)",
                    n_samples, 100 * math.sqrt(2.0 / n_samples))
        return out / n_samples


# -- the randomized generalized eigensolver ----------------------------------------------------------------
@dataclass
class EigenResult:
    """``values`` (r,) descending, ``vectors`` (m, r) with V^T R V = I, ``residuals`` (r,) the relative residuals
    ``||H v_i - lambda_i R v_i||_{R^{-1}} / max(|lambda_i|, 1)`` (NaN when not computed), ``actions`` the Hessian
    actions (columns) spent."""

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    actions: int


# -- dense linear algebra on tall blocks -------------------------------------------------------------------
# The eigensolver's dense products and factorizations run on one BLAS thread each, split into row blocks on
# parallel Python threads when the blocks are tall. OpenBLAS's own threads wait for each other by spinning
# and yielding, and when another process holds one of the cores a call stalls until the scheduler lets the
# waiting thread run: measured on 2 cores next to another busy process, the Gram matrix of a 66k x 90 block
# took 21 ms in the median but up to 1.4 s on OpenBLAS's 2 threads (33 ms median, 71 ms at most on one), the
# SVD and the eigendecomposition of a 90 x 90 matrix up to 0.14 s (1.5 ms on one thread), and a Householder
# QR of the 66k x 90 block, which synchronizes its threads at every column, 0.3 s idle but up to 2.8 s with
# both cores busy elsewhere. Python threads wait for each other once per product, asleep.


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _blas_threads() -> int:
    """The threads numpy's and scipy's BLAS would use (the fewest of the pools), at most this process's CPUs;
    1 without threadpoolctl, which the split into threads needs to put each block on one BLAS thread."""
    ctl = blas_controller()
    if ctl is None:
        return 1
    counts = [int(lib.num_threads or 1) for lib in ctl.lib_controllers]
    return max(1, min(min(counts, default=1), _cpus()))


def _on_threads(fn, count: int) -> list:
    """[fn(0), ..., fn(count - 1)], fn(0) on the calling thread and the others on threads of their own."""
    out, errors = [None] * count, []

    def run(i):
        try:
            out[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - raised again on the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"adjopt-rows-{i}") for i in range(1, count)]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _row_blocks(n: int) -> list:
    """[(r0, r1), ...]: the row blocks of a tall block, one per thread, of at least PARALLEL_MIN_ROWS rows."""
    count = max(1, min(_blas_threads(), n // PARALLEL_MIN_ROWS))
    bounds = [round(i * n / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _by_rows(job, n: int, blocks=None) -> list:
    """[job(r0, r1) for the row blocks of n rows (``blocks``, default :func:`_row_blocks`)], on parallel
    threads, each on one BLAS thread."""
    blocks = _row_blocks(n) if blocks is None else blocks
    with one_blas_thread():
        return _on_threads(lambda i: job(*blocks[i]), len(blocks))


def _matmul(Y, W, order: str = "C") -> np.ndarray:
    """Y @ W for a tall Y (n, k) and a small W (k, r), C- or Fortran-ordered (``order``)."""
    n, r = Y.shape[0], W.shape[1]
    if order == "C":
        out = np.empty((n, r))

        def job(r0, r1):
            np.matmul(Y[r0:r1], W, out=out[r0:r1])
    else:  # the rows of (Y W)^T = W^T Y^T
        out_t = np.empty((r, n))

        def job(r0, r1):
            np.matmul(W.T, Y[r0:r1].T, out=out_t[:, r0:r1])

        out = out_t.T
    _by_rows(job, n)
    return out


def _gram(Y, Z) -> np.ndarray:
    """Y^T Z for tall Y (n, k) and Z (n, l): the sum of the row blocks' products."""
    parts = _by_rows(lambda r0, r1: Y[r0:r1].T @ Z[r0:r1], Y.shape[0])
    return parts[0] if len(parts) == 1 else np.sum(parts, axis=0)


def _orthonormal_basis(Y) -> np.ndarray:
    """An orthonormal basis (C-ordered) of the numerical range of Y (n, k).

    A Householder QR of Y (backward stable at any scale of the columns: a sketch of a Hessian spans
    eigenvalues over many decades), then the SVD of its k x k triangle T = U S W^T, whose singular values are
    Y's to round-off: the basis is Q U over the singular values above k eps of the largest (those below are
    directions Y does not span). The SVD of the triangle reveals the rank (the column-pivoted QR this
    replaces read it off its diagonal), and a QR without pivoting can be split into row blocks, a TSQR: the
    QR of each block of :data:`QR_BLOCK_ROWS` rows (the blocks of each thread's rows in turn), then the QR of
    the stacked triangles, and Q = diag(Q_1, ..., Q_b) Q_s. A Householder QR of a tall block streams the
    whole block from memory at every column, while a block of 2048 x 90 stays in cache: at 66k x 90 on 2
    cores the QR took 0.15 s in blocks of 2048 rows, 0.24 s as one block per thread and 0.27-0.30 s in
    LAPACK's column-pivoted QR on its 2 threads; at 1.05M x 90, 3.0-3.2 s against 10 and 11 s.
    """
    n, k = Y.shape
    eps = np.finfo(np.float64).eps
    blocks = _row_blocks(n)
    size = max(QR_BLOCK_ROWS, 2 * k)

    def factor(r0, r1):
        count = max(1, round((r1 - r0) / size))
        cuts = [r0 + round(i * (r1 - r0) / count) for i in range(count + 1)]
        return [(a, b) + tuple(sla.qr(np.array(Y[a:b], order="F", copy=True), mode="economic", overwrite_a=True,
                                      check_finite=False)) for a, b in zip(cuts[:-1], cuts[1:])]

    per_thread = _by_rows(factor, n, blocks)
    parts = [part for ps in per_thread for part in ps]  # (first row, end row, Q_i, R_i) in row order
    with one_blas_thread():
        if len(parts) == 1:
            T = parts[0][3]
        else:
            Qs, T = sla.qr(np.vstack([R for *_, R in parts]), mode="economic", check_finite=False)
        U, sv, _ = np.linalg.svd(T)
        if sv.size == 0 or not sv[0] > 0:
            raise ValueError("the sketch of the Hessian is zero: the data do not inform any direction (is the "
                             "misfit zero, or the Hessian action wrong?)")
        W = U[:, sv > sv[0] * k * eps * 10]
        if len(parts) == 1:
            return parts[0][2] @ W
        B = Qs @ W  # the rows of block i of the basis are Q_i (Qs_i W)
    offsets = np.cumsum([0] + [R.shape[0] for *_, R in parts])
    first = np.cumsum([0] + [len(ps) for ps in per_thread])
    out = np.empty((n, W.shape[1]))
    thread = {r0: i for i, (r0, _) in enumerate(blocks)}

    def combine(r0, r1):
        for j in range(first[thread[r0]], first[thread[r0] + 1]):
            a, b, Q, _ = parts[j]
            np.matmul(Q, B[offsets[j]:offsets[j + 1]], out=out[a:b])

    _by_rows(combine, n, blocks)
    return out


def _r_orthonormalize(Y, R):
    """(Q, R Q): Q spanning the columns of Y with Q^T R Q = I.

    First a Euclidean orthonormal basis of Y's numerical range (:func:`_orthonormal_basis`: Householder QR,
    stable at any scale of the columns, and the SVD of its triangle, which drops the directions Y does not
    span: its singular values below k eps of the largest); then twice a Cholesky-QR in the R inner product
    (by the eigendecomposition of the Gram matrix of the basis, whose condition number is R's on that
    subspace only). R Q is the second Gram matrix's R Y carried along, (R Y) W = R (Y W), not a third
    product with R.
    """
    Y = _orthonormal_basis(Y)
    for _ in range(2):
        RY = R(Y)
        G = _gram(Y, RY)
        G = 0.5 * (G + G.T)
        with one_blas_thread():
            s, U = np.linalg.eigh(G)
        keep = s > max(float(s.max()), 0.0) * 1e-13
        if not np.any(keep):
            raise ValueError("the prior precision R is not positive definite on the sketch: check the prior")
        W = U[:, keep] / np.sqrt(s[keep])
        Y = _matmul(Y, W)
    return Y, _matmul(RY, W)


def randomized_eigh(H, n: int, rank: int, R=None, Rinv=None, oversampling: int = 10, passes: int = 2, rng=None,
                    residuals: bool = True, Rinv_norms=None) -> EigenResult:
    """The ``rank`` dominant eigenpairs of H v = lambda R v by a randomized range finder.

    Parameters
    ----------
    H
        V (n, k) -> H V (n, k): blocked actions of the symmetric operator (a reduced Hessian minus the prior's).
    R, Rinv
        V -> R V and V -> R^{-1} V (blocks) of the SPD weight; both None: the standard problem (R = I).
    oversampling
        Extra sketch columns p: the sketch has rank + p columns (10 is the usual choice).
    passes
        2 (default): Y = R^{-1} H Omega, Q its R-orthonormal basis, then the small matrix Q^T H Q from a second
        block of actions (the accurate one); 1: the single-pass estimate T = (Omega^T R Q)^+ (Omega^T H Omega)
        (Omega^T R Q)^{+T}, no second block (less accurate for slowly decaying spectra).
    residuals
        Compute the residuals of the returned pairs (no Hessian action in the double pass; the single pass spends
        ``rank`` more actions on them).
    Rinv_norms
        V (n, k) -> the column norms sqrt(v^T R^{-1} v), for the residuals (default: from ``Rinv``); a
        BiLaplacian prior's :meth:`GaussianPrior.covariance_norms` spends one solve per column on them where
        ``Rinv`` spends two.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(oversampling, bool) or not isinstance(oversampling, (int, np.integer)) or oversampling < 0:
        raise ValueError(f"oversampling must be a non-negative integer, got {oversampling!r}")
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2, got {passes!r}")
    if rank > n:
        raise ValueError(f"rank {rank} exceeds the parameter dimension {n}: ask for at most {n} eigenpairs")
    if (R is None) != (Rinv is None):
        raise ValueError("give both R and Rinv (the weight and its inverse), or neither")
    if R is None:
        def R(V):
            return V

        def Rinv(V):
            return V
    rng = np.random.default_rng(rng)
    k = min(rank + oversampling, n)

    def apply(V):
        out = np.asarray(H(V), dtype=np.float64)
        if out.shape != V.shape:
            raise ShapeError(f"the Hessian action returned shape {out.shape} for a block of shape {V.shape}")
        check_finite(out, "the Hessian action")
        return out

    Omega = rng.standard_normal((n, k))
    Ybar = apply(Omega)
    actions = k
    Q, RQ = _r_orthonormalize(Rinv(Ybar), R)
    if passes == 2:
        HQ = apply(Q)
        actions += Q.shape[1]
        T = _gram(Q, HQ)
    else:
        X, OY = _gram(Omega, RQ), _gram(Omega, Ybar)
        with one_blas_thread():
            Xp = np.linalg.pinv(X)
            T = Xp @ OY @ Xp.T
    T = 0.5 * (T + T.T)
    with one_blas_thread():
        lam, S = np.linalg.eigh(T)
    order = np.argsort(lam)[::-1][:rank]
    lam, S = lam[order], S[:, order]
    V = _matmul(Q, S)
    res = np.full(lam.size, np.nan)
    if residuals:
        # R V = (R Q) S: no product with R; the residual block Fortran-ordered, the order a CHOLMOD solve takes
        # without a transposing copy
        RV = _matmul(RQ, S, order="F")
        if passes == 2:
            Rres = _matmul(HQ, S, order="F")
        else:
            Rres = np.array(apply(V), order="F")
            actions += V.shape[1]
        RV *= lam
        Rres -= RV
        if Rinv_norms is None:
            norms = np.sqrt(np.maximum(np.einsum("ij,ij->j", Rres, Rinv(Rres)), 0.0))
        else:
            norms = np.asarray(Rinv_norms(Rres), dtype=np.float64)
        res = norms / np.maximum(np.abs(lam), 1.0)
    if lam.size < rank:
        logger.warning("the sketch spans only %d directions (rank %d asked): the rest of the spectrum is zero",
                       lam.size, rank)
    return EigenResult(values=lam, vectors=V, residuals=res, actions=actions)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _project(W, V):
    """W^T V for V of shape (m,) or (m, k) (the tall product on row blocks, one BLAS thread each)."""
    return _gram(W, V) if V.ndim == 2 else _gram(W, V[:, None])[:, 0]


def _low_rank(W, d, V, project=True):
    """W diag(d) W^T V (``project``) or W diag(d) V (V already W^T V), for V of shape (m,) or (m, k)."""
    C = _project(W, V) if project else V
    if C.ndim == 1:
        return _matmul(W, (d * C)[:, None])[:, 0]
    return _matmul(W, d[:, None] * C)


# -- the Laplace approximation ------------------------------------------------------------------------------
def misfit_hessian(J, p, prior: GaussianPrior, gauss_newton: bool = False, tol=None):
    """V -> (H_J - R) V at p: the data part of the reduced Hessian, on blocks."""
    p = owned(as_parameter(p, J.n_params))

    def H(V):
        out = J.hessp(p, V, tol=tol, gauss_newton=gauss_newton)
        if isinstance(out, np.ndarray) and out.dtype == np.float64 and out.flags.writeable \
                and not np.may_share_memory(out, V):
            out -= prior.precision(V)  # in place: the Hessian action's own array keeps its (Fortran) order
            return out
        return out - prior.precision(V)

    return H


class LaplacePosterior:
    """The Laplace approximation N(m, (H + R)^{-1}) of the posterior at the MAP point m (see the module
    docstring for the formulas).

    Parameters
    ----------
    J
        The reduced functional: data misfit plus the prior as its regularization (``J.objective``).
    m
        The MAP point (the minimizer of J). A point that is not stationary is warned about: the Laplace
        approximation is centred at the MAP point.
    prior
        The prior (a :class:`GaussianPrior`, or a prior term such as ``adjopt.BiLaplacianPrior``); default: the
        prior terms of ``J.objective``.
    rank, oversampling, passes, rng
        Of :func:`randomized_eigh` (80 pairs, 10, double pass).
    gauss_newton
        Use the Gauss-Newton Hessian (positive semidefinite; the usual choice away from the MAP point).
    stationarity_tol
        Warn (RuntimeWarning and a log record) when the Newton decrement at m, the distance from m to the MAP
        point in posterior standard deviations, exceeds it.
    """

    def __init__(self, J, m, prior=None, rank: int = 80, oversampling: int = 10, passes: int = 2, rng=None,
                 gauss_newton: bool = False, tol=None, stationarity_tol: float = 0.1):
        if isinstance(stationarity_tol, bool) or not isinstance(stationarity_tol, numbers.Real) \
                or not stationarity_tol >= 0:  # inf is allowed: no check
            raise ValueError(f"stationarity_tol must be a number >= 0 (inf: no check), got {stationarity_tol!r}")
        self.J = J
        n = J.n_params
        self.m = _read_only(owned(as_parameter(m, n, "m")))
        self.prior = GaussianPrior.of(prior if prior is not None else J, n)
        H = misfit_hessian(J, self.m, self.prior, gauss_newton=gauss_newton, tol=tol)
        eig = randomized_eigh(H, n, rank, R=self.prior.precision, Rinv=self.prior.covariance,
                              oversampling=oversampling, passes=passes, rng=rng, Rinv_norms=self.prior.covariance_norms)
        self.eig = eig
        lam = eig.values
        if np.any(lam <= -1.0):
            raise ValueError(f"the Hessian is not positive definite at m (an eigenvalue of H v = lambda R v is "
                             f"{lam.min():.3g} <= -1): m is not a minimum of J; optimize further, or use the "
                             f"Gauss-Newton Hessian (gauss_newton=True)")
        self.values, self.vectors = _read_only(lam.copy()), _read_only(eig.vectors.copy())
        self.d = _read_only(lam / (1.0 + lam))
        exhausted = lam.size < rank or lam.size >= n  # the sketch spans every direction the data inform
        if lam.size and lam[-1] > 1.0 and not exhausted:
            logger.warning("the smallest of the %d eigenvalues kept is %.3g > 1: the data still inform directions "
                           "beyond rank %d, so the posterior variance is overestimated; raise rank", lam.size,
                           lam[-1], lam.size)
        # the Newton decrement sqrt(g^T (H + R)^-1 g): the length of the Newton step in the posterior's own
        # metric, i.e. how many posterior standard deviations m is from the MAP point (0 there); with the
        # pairs kept only (a lower rank overestimates it)
        g = J.gradient(self.m)
        Vg = _project(self.vectors, g)  # g^T (R^-1 - V D V^T) g, with g^T R^-1 g in one solve
        gCg = self.prior.covariance_norms(g) ** 2 - float(np.einsum("i,i,i->", self.d, Vg, Vg))
        self.decrement = math.sqrt(max(gCg, 0.0))
        if gCg < 0:
            msg = (f"g^T (H + R)^-1 g = {gCg:.3g} < 0 at m: the Hessian is not positive definite there (m is not a "
                   f"minimum of J, or the prior is not positive definite); the Laplace approximation needs a "
                   f"minimum: optimize further, or use the Gauss-Newton Hessian")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        elif not self.decrement <= stationarity_tol:
            msg = (f"m is not a stationary point of J: the Newton decrement sqrt(g^T (H + R)^-1 g) is "
                   f"{self.decrement:.3g} (m is about that many posterior standard deviations from the MAP point; "
                   f"stationarity_tol={stationarity_tol:g}); the Laplace approximation is centred at the MAP "
                   f"point: optimize further (smaller gtol) before computing it")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    @property
    def rank(self) -> int:
        return int(self.values.size)

    def covariance(self, V) -> np.ndarray:
        """(H + R)^{-1} V ~ R^{-1} V - V_r D V_r^T V (blocks)."""
        V = self.prior._block(V)
        return self.prior.covariance(V) - _low_rank(self.vectors, self.d, V)

    def variance(self, exact: bool | None = None, n_samples: int = 500, rng=None) -> np.ndarray:
        """Pointwise posterior variance.

        Exact (``exact=True``, or ``exact=None`` and m <= 20000): the prior's exact variance minus
        sum_i d_i v_i^2 (m solves with the prior). Otherwise the Monte Carlo estimate mean_s (s - m)^2 over
        ``n_samples`` posterior samples (relative standard error sqrt(2 / n_samples), never negative; the
        prior's estimate minus the exact low-rank part would not be).
        """
        if exact or (exact is None and self.prior.n <= EXACT_VARIANCE_LIMIT):
            return self.prior.variance(exact=True) - (self.vectors ** 2) @ self.d
        n_samples = as_count(n_samples, "n_samples")
        rng = np.random.default_rng(rng)
        out = np.zeros(self.prior.n)
        for s0 in range(0, n_samples, SAMPLE_BLOCK):
            S = self.sample(min(SAMPLE_BLOCK, n_samples - s0), rng) - self.m[:, None]
            out += np.einsum("ij,ij->i", S, S)
        logger.info("posterior variance: Monte Carlo estimate from %d samples (relative standard error %.1f %%)",
                    n_samples, 100 * math.sqrt(2.0 / n_samples))
        return out / n_samples

    def sample(self, n: int = 1, rng=None) -> np.ndarray:
        """(m, n) samples of the Laplace posterior: s = m + s_0 - V P V^T R s_0, s_0 ~ N(0, R^{-1})."""
        n = as_count(n, "n")
        S = self.prior.sample(n, rng) - self.prior.mean[:, None]
        P = 1.0 - 1.0 / np.sqrt(1.0 + self.values)
        W = self.vectors
        return self.m[:, None] + S - _matmul(W, P[:, None] * _project(W, self.prior.precision(S)))

    def kl_divergence(self) -> float:
        """KL(posterior || prior) of the Laplace approximation (the information gain, in nats)."""
        lam = self.values
        dm = self.m - self.prior.mean
        return 0.5 * float(np.sum(np.log1p(lam) - lam / (1.0 + lam)) + dm @ self.prior.precision(dm))

    def preconditioner(self) -> LowRankPreconditioner:
        """(H + R) ~ R + R V Lambda V^T R as an inner product for Newton-CG (``preconditioner=``)."""
        return LowRankPreconditioner(self.prior, self.values, self.vectors)

    def summary(self) -> dict:
        return dict(rank=self.rank, eigenvalues=self.values.tolist(), residuals=self.eig.residuals.tolist(),
                    hessian_actions=self.eig.actions, kl_divergence=self.kl_divergence(), decrement=self.decrement,
                    eigenvalues_above_1=int(np.sum(self.values > 1.0)))


class LowRankPreconditioner(InnerProduct):
    """<a, b> = a^T (R + R V Lambda V^T R) b, whose Riesz map is R^{-1} - V D V^T (Woodbury, V^T R V = I):
    the Hessian R + H of a Gaussian inverse problem with H replaced by its low-rank part."""

    name = "lowrank"

    def __init__(self, prior: GaussianPrior, values, vectors):
        if not isinstance(prior, GaussianPrior):
            raise TypeError(f"prior must be a GaussianPrior (GaussianPrior.of(objective, n)), got {type(prior).__name__}")
        super().__init__(prior.n)
        self.prior = prior
        refuse_complex(values, "values")
        refuse_complex(vectors, "vectors")
        self.values = _read_only(np.array(values, dtype=np.float64, copy=True).reshape(-1))
        self.vectors = _read_only(np.array(vectors, dtype=np.float64, copy=True))
        if self.vectors.ndim != 2 or self.vectors.shape != (prior.n, self.values.size):
            raise ShapeError(f"vectors must have shape (m, r) = ({prior.n}, {self.values.size}) for {self.values.size} "
                             f"values, got {self.vectors.shape}")
        check_finite(self.values, "values")
        check_finite(self.vectors, "vectors")
        if np.any(self.values <= -1.0):
            raise ValueError("a low-rank preconditioner needs eigenvalues > -1 (R + H positive definite)")
        self.d = self.values / (1.0 + self.values)
        self._RW = None  # R V, on first use

    def apply(self, v):
        Rv = self.prior.precision(v)
        if self._RW is None:
            self._RW = self.prior.precision(self.vectors)
        return Rv + _low_rank(self._RW, self.values, _project(self.vectors, Rv), project=False)

    def riesz(self, g):
        return self.prior.covariance(g) - _low_rank(self.vectors, self.d, g)

    def diagonal(self):
        R = self.prior.matrix()
        return R.diagonal() + ((R @ self.vectors) ** 2) @ self.values


__all__ = ["GaussianPrior", "randomized_eigh", "EigenResult", "LaplacePosterior", "LowRankPreconditioner",
           "misfit_hessian"]
