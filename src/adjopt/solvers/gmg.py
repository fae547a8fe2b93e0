"""Geometric multigrid preconditioned CG for element-coefficient operators on structured grids.

``GMGSolver`` solves A(rho) u = b for A(rho) = sum_e E_e K_e assembled by an
:class:`~adjopt.operators.ElementCoefficientMatrix` on a structured grid of
``nx x ny`` unit quads or ``nx x ny x nz`` hexahedra (nodes numbered x
fastest, then y, then z; ``dofs_per_node`` dofs per node, node-major; the
Dirichlet dofs condensed out) -- SIMP elasticity in topology optimization is
the case it is made for. Like :class:`~adjopt.solvers.AMGSolver`, one
"factorization" per parameter value (here: the multigrid hierarchy) serves the
forward, adjoint, tangent and second-adjoint solves of that value.

Hierarchy
---------
Level 0 is the given grid. Level l+1 halves every element count of level l;
coarsening stops when the next level would have an odd element count, when a
level has at most ``coarse_dofs`` free dofs and there are ``min_levels``
levels (2 by default: a grid that coarsens is not factorized whole), or at
``max_levels``. The
coarsest level is solved directly (CHOLMOD when scikit-sparse is installed,
else SuperLU), factorized once per parameter value.

Transfers: bilinear / trilinear interpolation P_l (coarse node (I, J) sits on
fine node (2I, 2J)), applied to every component; restriction R_l = P_l^T.

Coarse operators by element-wise Galerkin products. Every fine element lies
inside one coarse (parent) element, and its nodal values interpolate from the
parent's nodes only, so with P_c the local (k x k) interpolation from a parent
to its child in position c (k = 2^d * dofs_per_node),

    P^T A P = assemble over coarse elements C of  K_C = sum_{children c of C} P_c^T K_c P_c .

On level 1, K_c = E_c KE with the shared fine element matrix KE, so
K_C = sum_c E_c G_c with the precomputed G_c = P_c^T KE P_c: one
(n_coarse, 2^d) @ (2^d, k*k) product. Deeper levels apply the sum to the
per-element matrices of the level above (a numba kernel that uses the sparsity
of P_c). The matrices are assembled into CSR patterns built once per solver
(the grids do not change with the design) by the parallel slot gather of
:func:`adjopt.operators.element.build_slot_map`.

Dirichlet dofs: a coarse dof is fixed when the fine node it sits on has that
dof fixed. The element-wise product equals the true Galerkin operator of the
condensed system, P_free^T A_free P_free, exactly when no fixed fine dof
interpolates from a free coarse dof, P_full[fixed_fine, free_coarse] = 0;
this is checked when the solver is built (a ``ValueError`` otherwise).

Smoother
--------
A polynomial in D^{-1} A (D = diag A), the same before and after the coarse
correction so that the V-cycle is symmetric and CG applies:

- ``"chebyshev4"`` (default): the fourth-kind Chebyshev smoother of Lottes
  (2022) / Phillips & Fischer (2022), which needs only an upper bound
  rho >= lambda_max(D^{-1} A):
  d_0 = 4/(3 rho) D^{-1} r_0,
  d_k = (2k-1)/(2k+3) d_{k-1} + (8k+4)/((2k+3) rho) D^{-1} r_k,
  x_{k+1} = x_k + d_k, r_{k+1} = r_k - A d_k;
- ``"chebyshev"``: first-kind Chebyshev on [rho / ratio, rho];
- ``"jacobi"``: ``degree`` sweeps of damped Jacobi x += omega/rho D^{-1} r.

On the finest level with one shared element matrix K_e and coefficients
>= 0, rho is the element bound max lambda(diag(K_e)^{-1} K_e) >= lambda_max(D^{-1} A)
(x^T A x = sum_e E_e x_e^T K_e x_e <= rho x^T D x), computed once per solver:
an upper bound on every design, with no Lanczos steps. Elsewhere rho is
``eig_safety`` times the largest Ritz value of ``eig_steps`` Lanczos steps on
D^{-1/2} A D^{-1/2}, per level per parameter value. Every sparse
product (smoothers, residuals, transfers, CG) runs in a numba-parallel kernel
(scipy's products are single-threaded); a smoothing step and its residual
update are one pass over the matrix. For 2D elasticity with a shared element
matrix, level 0 is applied matrix-free from E and KE (a 4-element stencil per
node, about twice as fast as reading the CSR matrix: 10 ms against 21 ms at
1200 x 400 on 2 cores; a node row per thread, one branch-free loop per element
corner with its KE entries in registers: 2.0 ms against 2.5 ms for a
node-by-node gather at 600 x 200 on one thread) on all dofs of the grid with zeros at the fixed ones.

Reused coarse levels
--------------------
With ``reuse_hierarchy=True`` (the default) a factorization at a new parameter
value builds only its finest level (the operator of this A, its diagonal and
the element bound) and reuses the coarse levels and the coarse factor of the
last fresh hierarchy. The V-cycle is still symmetric positive definite, so CG
converges to the solution of this A, to the same tolerance, with a residual
checked against this A; it may take more iterations. Let n be the iterations
of the fresh hierarchy's first solve and m = ``rebuild_ratio`` n + 1:

- a solve on reused levels that took more than m iterations makes the next
  factorization build a fresh hierarchy;
- a solve on reused levels whose residual, at its rate over the last 4
  iterations, will need more than m iterations (checked from iteration
  max(6, m / 2) on), or that reaches twice m + 10, is given up: this A's own
  levels are built and CG goes on from the iterate it reached. The next
  factorizations then build fresh hierarchies, 1, 2, 4, ... up to 32 of them
  after consecutive give-ups, so that a design that changes fast (the first
  OC iterations) pays for few lagged attempts.

Measured on the MBB beam in OC (2 cores, paired runs on a noisy machine): the
full 150 x 50 run (412 iterations, 150x50 -> 75x25) 10.4-10.5 s with reuse
against 12.3-14.7 s without (343 of 413 factorizations reused the coarse
levels; CG iterations 3,806 against 3,571). In the first iterations, where
the design changes fast, it is about even: the first 8 at 300 x 100 took
2.1-2.4 s with reuse against 2.0-2.4 s without (three pairs; 96 CG
iterations against 83), the first 10 at 600 x 200 5.8-7.1 against 6.3-7.2 s.
``reuse_hierarchy=False`` builds every hierarchy afresh.

Krylov method
-------------
CG preconditioned by one V-cycle (or W-cycle, ``cycle="W"``), to a relative
residual ``||b - A x|| <= tol ||b||`` chosen per solve kind; the true residual
(with the given CSR A) is checked after CG stops, and CG restarts from there
if round-off left it above the tolerance. A solve that does not reach it
raises :class:`~adjopt.errors.SolverDidNotConverge` or warns
(``on_failure="warn"``). Solves start from the last solution of the same kind
when that is better than zero (``warm_start``). A is symmetric, so a
transposed solve is the same solve.

Measured (MBB beam, penal 3, emin 1e-9, density filter, design after 20-25 OC
iterations, tol 1e-8, 2 shared cores): 300 x 100 (61k dofs) 10 CG iterations,
600 x 200 (241k) 14, 1200 x 400 (963k) 15 from zero and 12 warm-started
inside OC; at 1200 x 400 0.5 s setup and 1.4 s solve, against 15.5 s for a
CHOLMOD factorization. Iterations grow with the number of levels below the
resolution of the design: with the coarse grid fixed at 15 x 5, the V-cycle
takes 38, 46 and 53 iterations at 120 x 40, 240 x 80 and 480 x 160 (4, 5 and
6 levels), the W-cycle 23, 21 and 19. The 3D cantilever (CSR fine level)
64 x 32 x 32 (209k dofs, random filtered design): 22 iterations, 0.5 s setup,
2.6 s solve. Unfiltered checkerboard designs, whose corner hinges are
mechanisms of stiffness emin, are out of reach (even a direct solve leaves a
residual of 1e-5 there).
"""

from __future__ import annotations

import logging
import math
import numbers
import time

import numba
import numpy as np
import scipy.sparse as sp

from .._threads import threads_for
from .._validate import check_finite
from ..errors import NotPositiveDefiniteError, ShapeError, SolverDidNotConverge
from ..operators import _kernels
from ..operators.element import build_slot_map
from .base import Factorization, LinearSolver, per_kind_tolerances, report_nonconvergence

logger = logging.getLogger(__name__)

#: default relative tolerance of every solve kind
DEFAULT_TOL = 1e-8
SMOOTHERS = ("chebyshev4", "chebyshev", "jacobi")

#: local node offsets of a quad (n00, n10, n11, n01) and of a VTK hexahedron, as in adjopt.mesh
_OFFSETS = {
    2: np.array([[0, 0], [1, 0], [1, 1], [0, 1]]),
    3: np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]]),
}


# -- numba kernels ------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def _spmv(indptr, indices, data, x, y):
    """y = A x."""
    for i in numba.prange(indptr.shape[0] - 1):
        acc = 0.0
        for t in range(indptr[i], indptr[i + 1]):
            acc += data[t] * x[indices[t]]
        y[i] = acc


@numba.njit(parallel=True, cache=True)
def _spmv_add(indptr, indices, data, x, y, alpha):
    """y += alpha A x."""
    for i in numba.prange(indptr.shape[0] - 1):
        acc = 0.0
        for t in range(indptr[i], indptr[i + 1]):
            acc += data[t] * x[indices[t]]
        y[i] += alpha * acc


@numba.njit(parallel=True, cache=True)
def _residual_start(indptr, indices, data, x, b, r, invd, d, c0):
    """r = b - A x and d = c0 D^{-1} r (the first step of a smoother from a nonzero x)."""
    for i in numba.prange(indptr.shape[0] - 1):
        acc = 0.0
        for t in range(indptr[i], indptr[i + 1]):
            acc += data[t] * x[indices[t]]
        ri = b[i] - acc
        r[i] = ri
        d[i] = c0 * invd[i] * ri


@numba.njit(parallel=True, cache=True)
def _smooth_step(indptr, indices, data, invd, r, d_old, d_new, x, c1, c2):
    """One smoother step in one pass over A: r -= A d_old; d_new = c1 d_old + c2 D^{-1} r; x += d_new."""
    for i in numba.prange(indptr.shape[0] - 1):
        acc = 0.0
        for t in range(indptr[i], indptr[i + 1]):
            acc += data[t] * d_old[indices[t]]
        ri = r[i] - acc
        r[i] = ri
        di = c1 * d_old[i] + c2 * invd[i] * ri
        d_new[i] = di
        x[i] += di


@numba.njit(parallel=True, cache=True)
def _scaled_copy(invd, r, d, x, c0, add):
    """d = c0 D^{-1} r; x = d (add=False) or x += d (add=True)."""
    for i in numba.prange(r.shape[0]):
        di = c0 * invd[i] * r[i]
        d[i] = di
        if add:
            x[i] += di
        else:
            x[i] = di


@numba.njit(parallel=True, cache=True)
def _dot(a, b):
    """a . b (numba, so that CG's vector operations use the same threads as the kernels and no BLAS pool)."""
    acc = 0.0
    for i in numba.prange(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@numba.njit(parallel=True, cache=True)
def _cg_update(x, r, p, q, alpha):
    """x += alpha p; r -= alpha q; return r . r."""
    acc = 0.0
    for i in numba.prange(x.shape[0]):
        x[i] += alpha * p[i]
        ri = r[i] - alpha * q[i]
        r[i] = ri
        acc += ri * ri
    return acc


@numba.njit(parallel=True, cache=True)
def _cg_direction(p, z, beta):
    """p = z + beta p."""
    for i in numba.prange(p.shape[0]):
        p[i] = z[i] + beta * p[i]


@numba.njit(parallel=True, cache=True)
def _scaled_spmv(indptr, indices, data, s, v, w):
    """w = S v with S = diag(s) A diag(s)."""
    for i in numba.prange(indptr.shape[0] - 1):
        acc = 0.0
        for t in range(indptr[i], indptr[i + 1]):
            j = indices[t]
            acc += data[t] * s[j] * v[j]
        w[i] = s[i] * acc


@numba.njit(parallel=True, cache=True)
def _lanczos_orth(w, v, v_prev, alpha, beta):
    """w -= alpha v + beta v_prev; return w . w."""
    acc = 0.0
    for i in numba.prange(w.shape[0]):
        wi = w[i] - alpha * v[i] - beta * v_prev[i]
        w[i] = wi
        acc += wi * wi
    return acc


@numba.njit(parallel=True, cache=True)
def _scale(s, v, out):
    """out = s * v."""
    for i in numba.prange(v.shape[0]):
        out[i] = s[i] * v[i]


@numba.njit(parallel=True, cache=True)
def _scale_dot(s, w, v):
    """w *= s; return v . w."""
    acc = 0.0
    for i in numba.prange(w.shape[0]):
        wi = s[i] * w[i]
        w[i] = wi
        acc += v[i] * wi
    return acc


@numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _q1_stencil(nx, ny, ke, E, mask, x, mode, y, b, r, invd, d_new, xs, alpha, c1, c2):
    """o = (sum_e E_e KE) x at every node of an nx x ny Q1 grid (2 dofs per node, full numbering), then

    mode 0: y = M o;  mode 1: y += alpha M o;  mode 2: r = b - M o, d_new = c2 D^{-1} r;
    mode 3 (x is d_old): r -= M o, d_new = c1 d_old + c2 D^{-1} r, xs += d_new.

    A node row at a time (one thread per row): for each of the 4 element corners a node can be, a
    branch-free loop over the row with that corner's 16 KE entries in registers, accumulating into a
    row buffer; then the mode's update in one pass. Sums may be reassociated (a few ulps).
    """
    nnx = nx + 1
    row = 2 * nnx
    for jy in numba.prange(ny + 1):
        o = np.zeros(row)
        for sy in range(2):
            ey = jy - 1 + sy  # the element row below (sy = 0) or above (sy = 1) the node row
            if ey < 0 or ey >= ny:
                continue
            for sx in range(2):
                slot = (1 - sx) + 2 * (1 - sy)  # the node's corner in element (ix - 1 + sx, ey)
                a0 = ke[slot, 0, 0]
                a1 = ke[slot, 0, 1]
                a2 = ke[slot, 0, 2]
                a3 = ke[slot, 0, 3]
                a4 = ke[slot, 0, 4]
                a5 = ke[slot, 0, 5]
                a6 = ke[slot, 0, 6]
                a7 = ke[slot, 0, 7]
                b0 = ke[slot, 1, 0]
                b1 = ke[slot, 1, 1]
                b2 = ke[slot, 1, 2]
                b3 = ke[slot, 1, 3]
                b4 = ke[slot, 1, 4]
                b5 = ke[slot, 1, 5]
                b6 = ke[slot, 1, 6]
                b7 = ke[slot, 1, 7]
                for ix in range(1 - sx, nx + 1 - sx):
                    ex = ix - 1 + sx
                    e = E[ey * nx + ex]
                    m0 = 2 * (ey * nnx + ex)  # nodes 00, 10 of the element
                    m3 = m0 + row  # nodes 01, 11
                    u0 = x[m0]
                    u1 = x[m0 + 1]
                    u2 = x[m0 + 2]
                    u3 = x[m0 + 3]
                    u4 = x[m3 + 2]
                    u5 = x[m3 + 3]
                    u6 = x[m3]
                    u7 = x[m3 + 1]
                    o[2 * ix] += e * (a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3 + a4 * u4 + a5 * u5 + a6 * u6 + a7 * u7)
                    o[2 * ix + 1] += e * (b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3 + b4 * u4 + b5 * u5 + b6 * u6
                                          + b7 * u7)
        base = jy * row
        if mode == 0:
            for t in range(row):
                y[base + t] = o[t] * mask[base + t]
        elif mode == 1:
            for t in range(row):
                y[base + t] += alpha * (o[t] * mask[base + t])
        elif mode == 2:
            for t in range(row):
                i = base + t
                ri = b[i] - o[t] * mask[i]
                r[i] = ri
                d_new[i] = c2 * invd[i] * ri
        else:
            for t in range(row):
                i = base + t
                ri = r[i] - o[t] * mask[i]
                r[i] = ri
                di = c1 * x[i] + c2 * invd[i] * ri
                d_new[i] = di
                xs[i] += di


@numba.njit(parallel=True, cache=True)
def _galerkin_elements(kf, children, prow, pcol, pw, k, out):
    """out[C] = sum_c P_c^T K_{children[C, c]} P_c, flattened (k*k), with P_c[prow, pcol] = pw (sparse)."""
    nc, nch = children.shape
    m = prow.shape[1]
    for C in numba.prange(nc):
        acc = np.zeros(k * k)
        T = np.empty((k, k))
        for c in range(nch):
            e = children[C, c]
            T[:, :] = 0.0
            for t in range(m):  # T = K_e P_c
                b = prow[c, t]
                j = pcol[c, t]
                w = pw[c, t]
                for a in range(k):
                    T[a, j] += kf[e, a * k + b] * w
            for t in range(m):  # acc += P_c^T T
                b = prow[c, t]
                i = pcol[c, t]
                w = pw[c, t]
                for j in range(k):
                    acc[i * k + j] += w * T[b, j]
        for i in range(k):  # symmetric by construction; remove the round-off asymmetry
            for j in range(i, k):
                s = 0.5 * (acc[i * k + j] + acc[j * k + i])
                out[C, i * k + j] = s
                out[C, j * k + i] = s


def _predicted(history: list, tol: float, window: int = 4) -> float:
    """Iterations a CG run needs to reach ``tol`` at the rate of decrease of its relative residual over its
    last ``window`` iterations (the residual of preconditioned CG is not monotone: it often rises in the first
    iterations, so the rate since the start would underestimate the asymptotic one)."""
    its = len(history) - 1
    w = min(window, its)
    rate = (history[-1] / history[-1 - w]) ** (1.0 / w) if history[-1 - w] > 0 else 0.0
    if not rate < 1.0:
        return math.inf
    if rate <= 0.0:
        return float(its)
    return its + math.log(tol / history[-1]) / math.log(rate)


# -- structured grids ---------------------------------------------------------------------------------------
def _node_strides(shape) -> np.ndarray:
    dims = np.array(shape) + 1
    return np.concatenate([[1], np.cumprod(dims[:-1])]).astype(np.int64)


def _multi_index(shape) -> np.ndarray:
    """(d, prod(shape)) multi-indices, x fastest."""
    d = len(shape)
    return np.indices(tuple(shape[::-1])).reshape(d, -1)[::-1].astype(np.int64)


def grid_cells(shape) -> np.ndarray:
    """(E, 2^d) node indices of the elements of a structured grid, numbered like adjopt.mesh.rectangle/box."""
    idx = _multi_index(shape)
    strides = _node_strides(shape)
    base = strides @ idx
    return base[:, None] + (_OFFSETS[len(shape)] @ strides)[None, :]


def _dof_conn(cells: np.ndarray, dim: int) -> np.ndarray:
    return (cells[:, :, None] * dim + np.arange(dim)[None, None, :]).reshape(cells.shape[0], -1)


def _interp_1d(n_coarse: int) -> sp.csr_array:
    """(2 n + 1, n + 1) linear interpolation from a coarse 1D node row to the fine one."""
    nf = 2 * n_coarse + 1
    rows = [2 * np.arange(n_coarse + 1), 2 * np.arange(n_coarse) + 1, 2 * np.arange(n_coarse) + 1]
    cols = [np.arange(n_coarse + 1), np.arange(n_coarse), np.arange(n_coarse) + 1]
    vals = [np.ones(n_coarse + 1), np.full(n_coarse, 0.5), np.full(n_coarse, 0.5)]
    return sp.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nf, n_coarse + 1))


def _local_interpolation(d: int, dim: int) -> np.ndarray:
    """(2^d, k, k) P_c: child c's local dofs from its parent's local dofs (child c at bit offsets of c)."""
    off = _OFFSETS[d]
    nloc = off.shape[0]
    out = np.zeros((2**d, nloc * dim, nloc * dim))
    for c in range(2**d):
        shift = np.array([(c >> a) & 1 for a in range(d)])
        pos = shift[None, :] + off  # fine local nodes in units of fine elements inside the parent (0..2)
        w = np.clip(1.0 - np.abs(pos[:, None, :] - 2 * off[None, :, :]) / 2.0, 0.0, None).prod(axis=2)
        out[c] = np.kron(w, np.eye(dim))
    return out


class _Level:
    """One grid of the hierarchy: its free dofs, element connectivity and (coarse levels) CSR pattern."""

    def __init__(self, shape, dim: int, fixed_mask: np.ndarray):
        self.shape = tuple(int(s) for s in shape)
        self.d = len(shape)
        self.dim = dim
        self.n_elements = int(np.prod(self.shape))
        self.fixed_mask = fixed_mask
        self.free = np.flatnonzero(~fixed_mask)
        self.n = int(self.free.size)
        self.full_to_free = np.full(fixed_mask.size, -1, dtype=np.int64)
        self.full_to_free[self.free] = np.arange(self.n)
        self.conn = self.full_to_free[_dof_conn(grid_cells(self.shape), dim)]
        # set for coarse levels
        self.children = None  # (n_elements, 2^d) elements of the finer level, by child position
        self.pattern = None  # (indptr, indices, slot_ptr, slot_elem, slot_loc)
        self.P = self.R = None  # transfers to/from the finer level, free dofs only
        self.P_full = self.R_full = None  # level 1 only: the same with all dofs of level 0 (matrix-free level 0)

    def describe(self) -> str:
        return "x".join(map(str, self.shape)) + f" ({self.n} dofs)"


def _coarsen(fine: _Level) -> tuple[_Level, sp.csr_array]:
    """The coarse level of ``fine`` and the full (all dofs) interpolation P_full from it."""
    d, dim = fine.d, fine.dim
    cshape = tuple(s // 2 for s in fine.shape)
    # coarse node (I, J, ...) sits on fine node (2I, 2J, ...)
    on_fine = _node_strides(fine.shape) @ (2 * np.indices(tuple(s + 1 for s in cshape[::-1])).reshape(d, -1)[::-1])
    fixed = fine.fixed_mask.reshape(-1, dim)[on_fine].ravel()
    coarse = _Level(cshape, dim, fixed)
    P_node = _interp_1d(cshape[0])
    for a in range(1, d):
        P_node = sp.kron(_interp_1d(cshape[a]), P_node, format="csr")
    P_full = sp.csr_array(sp.kron(P_node, sp.eye_array(dim), format="csr"))
    # children of each coarse element by child position c = sum_a bit_a 2^a
    cidx = _multi_index(cshape)
    fstrides = np.concatenate([[1], np.cumprod(fine.shape[:-1])]).astype(np.int64)
    bits = np.array([[(c >> a) & 1 for a in range(d)] for c in range(2**d)])
    coarse.children = np.ascontiguousarray((fstrides @ (2 * cidx))[:, None] + (bits @ fstrides)[None, :])
    return coarse, P_full


class GridSupportError(ValueError):
    """The Dirichlet dofs do not fit the hierarchy (a fixed dof that does not sit on a coarse node)."""


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)



# -- the numeric hierarchy of one parameter value -----------------------------------------------------------
class _CSROperator:
    """y = A x and the fused smoother passes for a CSR matrix (numba-parallel over rows)."""

    def __init__(self, A: sp.csr_array):
        self.A = A
        self.indptr, self.indices, self.data = A.indptr, A.indices, A.data

    def matvec(self, x, y):
        _spmv(self.indptr, self.indices, self.data, x, y)

    def add_product(self, x, y, alpha):
        _spmv_add(self.indptr, self.indices, self.data, x, y, alpha)

    def residual_start(self, x, b, r, invd, d, c0):
        _residual_start(self.indptr, self.indices, self.data, x, b, r, invd, d, c0)

    def smooth_step(self, invd, r, d_old, d_new, x, c1, c2):
        _smooth_step(self.indptr, self.indices, self.data, invd, r, d_old, d_new, x, c1, c2)


class _Q1Stencil:
    """Matrix-free A = M (sum_e E_e KE) M of 2D Q1 elasticity on the full dofs (M: 0 at the fixed dofs).

    Each row is gathered from the 4 elements around its node (64 multiply-adds per
    node, no matrix read): about twice as fast as the CSR product on the
    fine level, which dominates a V-cycle.
    """

    def __init__(self, shape, KE: np.ndarray, E: np.ndarray, mask: np.ndarray):
        self.nx, self.ny = shape
        # ke[slot, a, :]: the KE row of component a of the local node at corner bits `slot` (x + 2y)
        ke = np.zeros((4, 2, 8))
        for ln, (ox, oy) in enumerate(_OFFSETS[2]):
            ke[ox + 2 * oy] = KE[2 * ln:2 * ln + 2]
        self.ke = ke
        self.E = np.ascontiguousarray(E, dtype=np.float64)
        self.mask = mask
        self._dummy = np.zeros(1)

    def _run(self, mode, x, y, b, r, invd, d_new, xs, alpha, c1, c2):
        _q1_stencil(self.nx, self.ny, self.ke, self.E, self.mask, x, mode, y, b, r, invd, d_new, xs, alpha, c1, c2)

    def matvec(self, x, y):
        z = self._dummy
        self._run(0, x, y, z, z, z, z, z, 0.0, 0.0, 0.0)

    def add_product(self, x, y, alpha):
        z = self._dummy
        self._run(1, x, y, z, z, z, z, z, alpha, 0.0, 0.0)

    def residual_start(self, x, b, r, invd, d, c0):
        z = self._dummy
        self._run(2, x, z, b, r, invd, d, z, 0.0, 0.0, c0)

    def smooth_step(self, invd, r, d_old, d_new, x, c1, c2):
        z = self._dummy
        self._run(3, d_old, z, z, r, invd, d_new, x, 0.0, c1, c2)


class _LevelOp:
    """Numeric data of one level for one parameter value: the operator, D^{-1}, rho and work vectors."""

    def __init__(self, kern, diag: np.ndarray):
        self.kern = kern
        self.matvec = kern.matvec
        n = diag.shape[0]
        self.invd = np.zeros(n)
        np.divide(1.0, diag, out=self.invd, where=diag != 0)
        self.x = np.zeros(n)
        self.b = np.zeros(n)
        self.r = np.zeros(n)
        self.d0 = np.zeros(n)
        self.d1 = np.zeros(n)
        self.b2 = np.zeros(n)
        self.x2 = np.zeros(n)
        self.rho = 1.0


def _positive_diagonal(A) -> np.ndarray:
    diag = A.diagonal()
    if not np.all(diag > 0):
        raise NotPositiveDefiniteError(
            f"a diagonal entry of a multigrid level operator (n={A.shape[0]}) is <= 0: A(p) is not positive "
            "definite (a negative coefficient?); geometric multigrid needs an SPD A(p)."
        )
    return diag


def _lanczos_max(op: _LevelOp, steps: int, rng: np.random.Generator) -> float:
    """Largest Ritz value of ``steps`` Lanczos steps on S = D^{-1/2} A D^{-1/2} (the spectrum of D^{-1} A).

    The Ritz value bounds lambda_max from below and converges to it fast (the
    top of the spectrum is well separated in relative terms). Rows with
    D^{-1} = 0 (fixed dofs of a full-space level) are left out.
    """
    s = np.sqrt(op.invd)
    active = s > 0
    n = int(np.count_nonzero(active))
    v = np.zeros_like(s)
    v[active] = rng.standard_normal(n)  # the same start on the free dofs whether or not the level holds all dofs
    v /= math.sqrt(_dot(v, v))
    v_prev = np.zeros_like(v)
    u = np.empty_like(v)
    w = np.empty_like(v)
    alphas, betas = [], []
    beta = 0.0
    for _ in range(min(steps, n)):
        _scale(s, v, u)
        op.matvec(u, w)
        alpha = _scale_dot(s, w, v)  # w = S v; alpha = v . w
        beta = math.sqrt(_lanczos_orth(w, v, v_prev, alpha, beta))  # w -= alpha v + beta v_prev
        alphas.append(alpha)
        if beta <= 1e-14 * abs(alpha):
            break
        betas.append(beta)
        w /= beta
        v_prev, v, w = v, w, v_prev
    k = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    return float(np.linalg.eigvalsh(T)[-1])


class GMGFactorization(Factorization):
    """The multigrid hierarchy of one A(rho) and V-cycle preconditioned CG solves with it.

    Level 0 works on the free dofs (CSR A) or, with the matrix-free stencil, on
    all dofs of the grid with zeros at the fixed ones; the solves take and
    return free-dof vectors either way.
    """

    exact = False

    def __init__(self, A, stats, solver: GMGSolver, ops: list, transfers: list, coarse_solve, coarse_nnz: int,
                 free: np.ndarray | None):
        super().__init__(A, stats)
        self.solver = solver
        self.ops = ops  # _LevelOp per level; the last is solved directly
        self.transfers = transfers  # (P, R) from level l+1 to level l
        self._coarse_solve = coarse_solve
        self._free = free  # level 0 in the full numbering: the free dofs; None: level 0 is the free dofs
        self._csr = _CSROperator(A)
        self.factor_nnz = int(sum(op.kern.A.nnz for op in ops[1:]) + coarse_nnz
                              + sum(P.nnz + R.nnz for P, R in transfers))
        #: relative residual history of the last solve (list of floats)
        self.last_residuals: list[float] = []
        self._coeffs = [solver._smoother_coefficients(op.rho) for op in ops[:-1]]
        #: True when the coarse levels are those of an earlier parameter value (``reuse_hierarchy``)
        self.lagged = False
        self._source = None  # (operator, coef): what a fresh hierarchy of this A is built from
        self._partial = None  # the last iterate of a lagged solve that was given up

    def _set_hierarchy(self, ops, transfers, coarse_solve, coarse_nnz, free) -> None:
        self.ops, self.transfers, self._coarse_solve, self._free = ops, transfers, coarse_solve, free
        self._coeffs = [self.solver._smoother_coefficients(op.rho) for op in ops[:-1]]
        self.factor_nnz = int(sum(op.kern.A.nnz for op in ops[1:]) + coarse_nnz
                              + sum(P.nnz + R.nnz for P, R in transfers))

    def _refresh(self) -> None:
        """Replace lagged coarse levels by this A's own (after a lagged solve that was too slow)."""
        operator, coef = self._source
        fresh = self.solver._build(self.A, operator, coef)
        self._set_hierarchy(*fresh)
        self.lagged = False
        self.solver._lag_failed()
        logger.info("GMG: a solve with the coarse levels of an earlier design converged too slowly; rebuilt them "
                    "and went on from its iterate")

    @property
    def nbytes(self) -> int:
        return 12 * self.factor_nnz + sum(56 * op.invd.shape[0] for op in self.ops)

    @property
    def n_levels(self) -> int:
        """Number of levels (1: a direct solve)."""
        return len(self.ops)

    def tolerance(self, kind: str, tol: float | None = None) -> float:
        return self.solver.tol[kind] if tol is None else float(tol)

    def check_residual(self, x, rhs, transpose=False, kind="other") -> None:
        """Nothing to do: every CG solve has checked its true residual already."""

    # -- the V-cycle ---------------------------------------------------------------------------------------
    def _smooth(self, level: int, x, b, zero_start: bool, want_residual: bool) -> None:
        """Apply the smoothing polynomial to x (x = 0 on entry if ``zero_start``); r = b - A x if wanted."""
        op = self.ops[level]
        kern = op.kern
        c0, steps = self._coeffs[level]
        r, d_old, d_new = op.r, op.d0, op.d1
        if zero_start:
            r[:] = b
            _scaled_copy(op.invd, r, d_old, x, c0, False)
        else:
            kern.residual_start(x, b, r, op.invd, d_old, c0)
            x += d_old
        for c1, c2 in steps:
            kern.smooth_step(op.invd, r, d_old, d_new, x, c1, c2)
            d_old, d_new = d_new, d_old
        if want_residual:
            kern.add_product(d_old, r, -1.0)

    def _vcycle(self, level: int, b: np.ndarray, x: np.ndarray) -> None:
        """x = B_level b, one V-cycle (or W-cycle) from x = 0: the same smoother before and after, so B is symmetric."""
        if level == len(self.ops) - 1:
            x[:] = self._coarse_solve(b)
            return
        op, nxt = self.ops[level], self.ops[level + 1]
        P, R = self.transfers[level]
        self._smooth(level, x, b, zero_start=True, want_residual=True)
        _spmv(R.indptr, R.indices, R.data, op.r, nxt.b)
        self._vcycle(level + 1, nxt.b, nxt.x)
        if self.solver.cycle == "W" and level + 2 < len(self.ops):
            # a second coarse correction from the coarse residual: x_c += B_c (b_c - A_c x_c)
            nxt.kern.residual_start(nxt.x, nxt.b, nxt.b2, nxt.invd, nxt.d0, 0.0)
            self._vcycle(level + 1, nxt.b2, nxt.x2)
            nxt.x += nxt.x2
        _spmv_add(P.indptr, P.indices, P.data, nxt.x, x, 1.0)
        self._smooth(level, x, b, zero_start=False, want_residual=False)

    def precondition(self, r: np.ndarray) -> np.ndarray:
        """z = B r, one multigrid cycle (B symmetric positive definite, approximately A^{-1}); free-dof vectors."""
        if self._free is None:
            z = np.empty_like(r)
            self._vcycle(0, r, z)
            return z
        rf = np.zeros(self.ops[0].invd.shape[0])
        rf[self._free] = r
        z = np.empty_like(rf)
        self._vcycle(0, rf, z)
        return z[self._free]

    # -- CG ------------------------------------------------------------------------------------------------
    def _solve(self, rhs, transpose, kind, tol):
        tol = self.tolerance(kind, tol)
        # a V-cycle launches some 20 kernels per CG iteration; on a small grid (A with fewer nonzeros than
        # adjopt._threads.PARALLEL_MIN_WORK) each is too short to gain from a second thread and pays its
        # wake-up: at 150 x 50 (271k nonzeros) a solve took 0.013-0.023 s on one thread, 0.018-0.046 s on two
        with threads_for(self.A.nnz):
            if rhs.ndim == 1:
                return self._scaled_cg(rhs, kind, tol)
            out = np.empty(rhs.shape)
            for j in range(rhs.shape[1]):
                out[:, j] = self._scaled_cg(rhs[:, j], kind, tol)
            return out

    def _scaled_cg(self, b_free: np.ndarray, kind: str, tol: float) -> np.ndarray:
        """CG on b / max|b| when b's entries are so small or large that ||b||^2 would under- or overflow."""
        scale = float(np.max(np.abs(b_free))) if b_free.size else 0.0
        if scale == 0.0:
            self.last_residuals = [0.0]
            return np.zeros_like(b_free)
        if 1e-150 < scale < 1e150:
            return self._cg(b_free, kind, tol)
        return self._cg(b_free / scale, kind, tol, warm=False) * scale  # a warm start of another scale is no start

    def _cg(self, b_free: np.ndarray, kind: str, tol: float, warm: bool = True) -> np.ndarray:
        """CG to ``tol`` (on lagged levels first, if any); ``warm=False``: no warm start, and none kept."""
        start = None
        if self.lagged:
            self._partial = None
            try:
                x = self._cg_once(b_free, kind, tol, lagged=True, warm=warm)
            except (SolverDidNotConverge, NotPositiveDefiniteError):
                self._partial = None
            else:
                if x is not None:
                    return x
            # too slow on the lagged levels: fresh ones, and CG goes on from where it stopped
            start, self._partial = self._partial, None
            self._refresh()
        return self._cg_once(b_free, kind, tol, lagged=False, start=start, warm=warm)

    def _cg_once(self, b_free: np.ndarray, kind: str, tol: float, lagged: bool,
                 start: np.ndarray | None = None, warm: bool = True) -> np.ndarray | None:
        """CG to ``tol`` from ``start`` (else the warm start, else 0); with ``lagged`` coarse levels, None
        (instead of a failure) when it does not converge or would take too many iterations (its last iterate
        in ``self._partial``)."""
        s = self.solver
        nb = math.sqrt(_dot(b_free, b_free))  # not np.linalg.norm: a BLAS call that wakes OpenBLAS's threads
        if nb == 0.0:
            self.last_residuals = [0.0]
            return np.zeros_like(b_free)
        csr = self._csr  # the given A: the true residuals are measured with it
        r_free = np.empty_like(b_free)
        x_free = None
        warm = warm and s.warm_start
        x0 = start if start is not None else (s._last.get(kind) if warm else None)
        if x0 is not None and x0.shape == b_free.shape:
            csr.matvec(x0, r_free)
            np.subtract(b_free, r_free, out=r_free)
            if math.sqrt(_dot(r_free, r_free)) < nb:
                x_free = x0.copy()  # a warm start that is worse than zero is no warm start
        if x_free is None:
            x_free = np.zeros_like(b_free)
            r_free[:] = b_free
        x_start = x_free.copy() if s.on_failure == "warn" else None  # returned instead of a worse last iterate
        op = self.ops[0]
        free = self._free
        history: list[float] = [math.sqrt(_dot(r_free, r_free)) / nb]
        its = 0
        # lagged coarse levels get a budget: beyond it, fresh ones are cheaper than more iterations; and once
        # the residual's recent rate of decrease predicts more than the stale limit, they are given up at once
        maxiter = min(s.maxiter, s._lagged_budget()) if lagged else s.maxiter
        limit = s._stale_limit() if lagged else None
        # CG stops on its recursive residual; the true one is checked and, if need be, CG restarts from there
        for _attempt in range(3):
            if history[-1] <= tol or its >= maxiter:
                break
            if free is None:
                x, r = x_free, r_free
            else:  # level 0 on all dofs (matrix-free): zeros at the fixed dofs
                x = np.zeros(op.invd.shape[0])
                r = np.zeros_like(x)
                x[free] = x_free
                r[free] = r_free
            q = np.empty_like(x)
            z = np.empty_like(x)
            p = None
            rz = 0.0
            while history[-1] > tol and its < maxiter:
                self._vcycle(0, r, z)
                rz_new = _dot(r, z)
                if not rz_new > 0:
                    self._indefinite(kind, its, "the multigrid preconditioner")
                if p is None:
                    p = z.copy()
                else:
                    _cg_direction(p, z, rz_new / rz)
                rz = rz_new
                op.matvec(p, q)
                pq = _dot(p, q)
                if not pq > 0:
                    self._indefinite(kind, its, "A(p)")
                rr = _cg_update(x, r, p, q, rz / pq)
                its += 1
                history.append(math.sqrt(rr) / nb)
                if (limit is not None and its >= max(6, limit / 2) and history[-1] > tol
                        and _predicted(history, tol) > limit):
                    maxiter = its  # give the lagged levels up (the true residual is still taken below)
            if free is not None:
                x_free = x[free]
            csr.matvec(x_free, r_free)
            np.subtract(b_free, r_free, out=r_free)
            history[-1] = math.sqrt(_dot(r_free, r_free)) / nb
            if not math.isfinite(history[-1]):
                break
        self.stats.iterations[kind] += its
        self.last_residuals = history
        rel = history[-1]
        if not (np.all(np.isfinite(x_free)) and rel <= tol):
            if lagged:
                self._partial = x_free if np.all(np.isfinite(x_free)) else None
                return None
            self._fail(kind, tol, its, history)  # raises, or warns (on_failure="warn")
            if not rel <= history[0]:  # the last iterate is worse than the start: the start is returned
                x_free = x_start
        s._note_iterations(its, lagged)
        if warm:
            s._last[kind] = x_free.copy()
        return x_free

    def _indefinite(self, kind, its, what):
        self.stats.iterations[kind] += its
        raise NotPositiveDefiniteError(
            f"CG met non-positive curvature of {what} in the {kind} solve (iteration {its}): A(p) is not "
            "symmetric positive definite, or the multigrid smoother diverges (raise eig_safety or eig_steps). "
            "If A(p) should be SPD it may be singular (a missing Dirichlet condition, or a coefficient that "
            "vanishes: use emin > 0)."
        )

    def _fail(self, kind, tol, its, history):
        last = history[-1] if history else math.nan
        best = min(history) if history else math.nan
        back = self.solver.on_failure == "warn" and bool(history) and not last <= history[0]
        msg = (
            f"the {kind} solve (CG with geometric multigrid) stopped after {its} iterations at a relative residual "
            f"of {last:.3g} (the smallest of CG's recursive residuals: {best:.3g}), above its tolerance {tol:.3g}"
            + ("; its start is returned, whose residual was smaller" if back else "")
            + ". Raise maxiter, loosen the tolerance "
            "of this kind (GMGSolver(tol={...})), raise the smoother degree, or use a direct solver; a solve that "
            "stalls near 1 often means A(p) is singular (a missing Dirichlet condition, or emin = 0)."
        )
        report_nonconvergence(self.solver.on_failure, msg, history)


class GMGSolver(LinearSolver):
    """Geometric multigrid preconditioned CG on a structured grid (see the module docstring).

    It needs the discretisation, not only A: use it through
    :class:`~adjopt.ReducedFunctional` (which calls ``factorize(A,
    operator=..., rho=...)`` because ``uses_operator`` is True), e.g.
    ``topology_compliance.build(solver="gmg")``.

    Parameters
    ----------
    shape
        Elements per direction, ``(nx, ny)`` (quads) or ``(nx, ny, nz)``
        (hexahedra), numbered x fastest like :func:`adjopt.mesh.rectangle` /
        :func:`adjopt.mesh.box`.
    dofs_per_node
        Dofs per node (node-major, ``dof = node * dofs_per_node + component``):
        the dimension for elasticity, 1 for a scalar problem.
    fixed
        The Dirichlet dofs in the full numbering (all nodes); the operator's
        unknowns are the other dofs, in increasing order (:func:`adjopt.fem.condense`).
    tol
        Relative residual tolerance: a float for every solve kind, or a dict
        ``{kind: tol}`` (kinds not given: 1e-8); a ``tol`` passed to a solve overrides it.
    maxiter
        CG iterations per right-hand side.
    coarse_dofs
        Coarsening stops at a level with at most this many free dofs (which is
        solved directly), or earlier when an element count turns odd.
    min_levels
        Coarsen at least to this many levels when the grid allows, even below
        ``coarse_dofs`` (default 2: the given grid is not factorized whole when
        it coarsens). Measured on the MBB beam at 150 x 50 (15k dofs): the
        hierarchy 150 x 50 -> 75 x 25 takes 0.018 s to set up and 0.029 s to
        solve (11 CG iterations from zero), the single level 0.10 s to
        factorize. At 300 x 100 a third level (75 x 25) saves a 15k-dof factor
        but adds 4 CG iterations (10 -> 14): no gain, hence 2.
    max_levels
        At most this many levels (``None``: no limit; 1: a direct solve).
    smoother
        ``"chebyshev4"`` (default), ``"chebyshev"`` (first kind) or ``"jacobi"``.
    degree
        Smoothing steps before and after the coarse correction (the polynomial degree).
    eig_steps
        Lanczos steps for the estimate of lambda_max(D^{-1} A) per level.
    eig_safety
        rho = eig_safety * the Lanczos estimate (it bounds lambda_max from below).
    cheb_ratio
        First-kind Chebyshev targets [rho / cheb_ratio, rho].
    jacobi_weight
        Damped Jacobi weight omega (x += omega / rho D^{-1} r).
    on_failure
        ``"raise"``: :class:`~adjopt.errors.SolverDidNotConverge`; ``"warn"``:
        a :class:`~adjopt.errors.ConvergenceWarning` and the last iterate.
    warm_start
        Start each solve from the last solution of the same kind when that is better than zero.
    cycle
        ``"V"`` or ``"W"`` (two coarse corrections per level: fewer CG
        iterations on deep hierarchies, more work per iteration).
    matrix_free
        2D vector problems (``dofs_per_node = 2``) with one shared element
        matrix: apply the fine-level operator from the element coefficients
        (a 4-element stencil per node) instead of reading the CSR matrix, about
        twice as fast; the true residuals are measured with the CSR A either way.
    seed
        Seed of the Lanczos start vectors (reproducible hierarchies).
    reuse_hierarchy
        Reuse the coarse levels of the last fresh hierarchy at a new parameter
        value (default True; see "Reused coarse levels" in the module docstring).
    rebuild_ratio
        A fresh hierarchy is built once a solve on reused coarse levels takes
        more than ``rebuild_ratio * n + 1`` CG iterations, n those of the fresh
        hierarchy's first solve.
    """

    name = "gmg"
    #: ReducedFunctional passes the operator and rho to factorize
    uses_operator = True

    def __init__(self, shape, dofs_per_node: int, fixed=(), tol=DEFAULT_TOL, maxiter: int = 500,
                 coarse_dofs: int = 20_000, min_levels: int = 2, max_levels: int | None = None,
                 smoother: str = "chebyshev4",
                 degree: int = 2, eig_steps: int = 10, eig_safety: float = 1.1, cheb_ratio: float = 8.0,
                 jacobi_weight: float = 2.0 / 3.0, on_failure: str = "raise", warm_start: bool = True,
                 cycle: str = "V", matrix_free: bool = True, seed: int = 0, reuse_hierarchy: bool = True,
                 rebuild_ratio: float = 1.0):
        super().__init__()
        try:
            shape = tuple(shape)
        except TypeError:
            raise ValueError(f"shape must be (nx, ny) or (nx, ny, nz) element counts, got {shape!r}") from None
        if len(shape) not in (2, 3):
            raise ValueError(f"shape must be (nx, ny) or (nx, ny, nz) element counts, got {shape!r}")
        shape = tuple(_check_count(s, "every element count of shape", 1) for s in shape)
        dim = _check_count(dofs_per_node, "dofs_per_node", 1)
        self.tol = per_kind_tolerances(tol, DEFAULT_TOL)
        self.maxiter = _check_count(maxiter, "maxiter", 1)
        self.coarse_dofs = _check_count(coarse_dofs, "coarse_dofs", 1)
        self.min_levels = _check_count(min_levels, "min_levels", 1)
        self.max_levels = None if max_levels is None else _check_count(max_levels, "max_levels", 1)
        if smoother not in SMOOTHERS:
            raise ValueError(f"unknown smoother {smoother!r}; use one of {SMOOTHERS}")
        self.smoother = smoother
        self.degree = _check_count(degree, "degree", 1)
        self.eig_steps = _check_count(eig_steps, "eig_steps", 2)
        for name, v, lo in (("eig_safety", eig_safety, 1.0), ("cheb_ratio", cheb_ratio, 1.0)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= v < math.inf:
                raise ValueError(f"{name} must be a number >= {lo}, got {v!r}")
        self.eig_safety, self.cheb_ratio = float(eig_safety), float(cheb_ratio)
        if isinstance(jacobi_weight, bool) or not isinstance(jacobi_weight, numbers.Real) or not 0 < jacobi_weight < 2:
            raise ValueError(f"jacobi_weight must be in (0, 2), got {jacobi_weight!r}")
        self.jacobi_weight = float(jacobi_weight)
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
        self.on_failure = on_failure
        if cycle not in ("V", "W"):
            raise ValueError(f"cycle must be 'V' or 'W', got {cycle!r}")
        self.cycle = cycle
        self.warm_start = bool(warm_start)
        self.seed = int(seed)
        for name, v in (("reuse_hierarchy", reuse_hierarchy), ("warm_start", warm_start),
                        ("matrix_free", matrix_free)):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {v!r}")
        self.reuse_hierarchy = bool(reuse_hierarchy)
        if isinstance(rebuild_ratio, bool) or not isinstance(rebuild_ratio, numbers.Real) or not 1 <= rebuild_ratio < math.inf:
            raise ValueError(f"rebuild_ratio must be a number >= 1, got {rebuild_ratio!r}")
        self.rebuild_ratio = float(rebuild_ratio)
        self._fresh = None  # the last fresh hierarchy's coarse levels, for reuse_hierarchy
        self._bound = None  # the element bound of lambda_max(D^-1 A), once per solver
        #: factorizations that reused the coarse levels of an earlier one (reuse_hierarchy)
        self.lagged_setups = 0
        self._lag_skip = 0  # fresh hierarchies to build before reuse is tried again (see _lag_failed)
        self._lag_backoff = 1
        self.shape = shape
        self.dofs_per_node = dim
        n_full = int(np.prod(np.array(shape) + 1)) * dim
        fixed = np.unique(np.asarray(fixed).ravel())
        if fixed.size and fixed.dtype.kind not in "iu":
            raise ValueError(f"fixed must hold integer dof indices, got dtype {fixed.dtype}")
        if fixed.size and (fixed[0] < 0 or fixed[-1] >= n_full):
            raise ValueError(f"fixed dofs must be in [0, {n_full - 1}] for a {shape} grid with {dim} dofs per node "
                             f"({n_full} dofs), got {int(fixed[0])}..{int(fixed[-1])}")
        mask = np.zeros(n_full, dtype=bool)
        mask[fixed.astype(np.int64)] = True
        self._last: dict = {}
        self._coarse_symbolic = None
        self._coarse_nnz = None
        self._checked_conn = None
        self._stencil_checked = None
        self.matrix_free = bool(matrix_free)
        self._stencil_possible = self.matrix_free and len(shape) == 2 and dim == 2
        self.levels = self._build_levels(_Level(shape, dim, mask))

    @classmethod
    def structured(cls, shape, dofs_per_node: int, fixed=(), **options) -> GMGSolver:
        """``GMGSolver(shape, dofs_per_node, fixed, **options)``."""
        return cls(shape, dofs_per_node, fixed, **options)

    # -- geometry (once per solver) ------------------------------------------------------------------------
    def _build_levels(self, fine: _Level) -> list:
        t0 = time.perf_counter()
        levels = [fine]
        k = fine.conn.shape[1]
        self._local_P = _local_interpolation(fine.d, fine.dim)  # (2^d, k, k)
        # every child's P_c has the same number of nonzeros (by symmetry): (row, col, weight) lists for the kernel
        rows, cols, ws = [], [], []
        for c in range(self._local_P.shape[0]):
            r_, c_ = np.nonzero(self._local_P[c])
            rows.append(r_)
            cols.append(c_)
            ws.append(self._local_P[c][r_, c_])
        self._p_rows = np.ascontiguousarray(rows, dtype=np.int64)
        self._p_cols = np.ascontiguousarray(cols, dtype=np.int64)
        self._p_w = np.ascontiguousarray(ws)
        while True:
            cur = levels[-1]
            if self.max_levels is not None and len(levels) >= self.max_levels:
                break
            if cur.n <= self.coarse_dofs and len(levels) >= self.min_levels:
                break
            wanted = cur.n > self.coarse_dofs  # else only min_levels asks for another level
            if any(s % 2 for s in cur.shape):
                (logger.warning if wanted else logger.debug)(
                    "GMG: the %s grid cannot be coarsened further (an odd element count); its %d dofs are "
                    "solved directly (%d level(s)). Element counts divisible by a power of 2 give more levels.",
                    "x".join(map(str, cur.shape)), cur.n, len(levels))
                break
            coarse, P_full = _coarsen(cur)
            # element-wise Galerkin = P_free^T A_free P_free iff no fixed fine dof interpolates from a free coarse dof
            leak = P_full[np.flatnonzero(cur.fixed_mask)][:, coarse.free]
            leak.eliminate_zeros()
            if leak.nnz and not wanted:
                logger.debug("GMG: the supports of the %s grid do not coarsen; it is solved directly",
                             cur.describe())
                break
            if leak.nnz:
                bad = int(np.flatnonzero(cur.fixed_mask)[leak.tocoo().row[0]])
                raise GridSupportError(
                    f"GMG: the fixed dof {bad} of the {cur.describe()} grid (node {bad // cur.dim}, component "
                    f"{bad % cur.dim}) does not sit on a node of the coarser grid, or is fixed where the coarse "
                    "node is free: it would interpolate from free coarse dofs, and the element-wise Galerkin "
                    "operator would differ from P^T A P. Fix whole boundary sides (or every dof at nodes with "
                    "even grid indices), or limit the hierarchy with max_levels="
                    f"{len(levels)}.")
            P = sp.csr_array(P_full[cur.free][:, coarse.free])
            P.sort_indices()
            coarse.P = P
            coarse.R = sp.csr_array(P.T.tocsr())
            coarse.R.sort_indices()
            if len(levels) == 1 and self._stencil_possible:
                # the matrix-free level 0 works on all fine dofs: its rows at fixed dofs are 0 (checked above)
                coarse.P_full = sp.csr_array(P_full[:, coarse.free])
                coarse.P_full.sort_indices()
                coarse.R_full = sp.csr_array(coarse.P_full.T.tocsr())
                coarse.R_full.sort_indices()
            indptr, indices, slot_ptr, slot_elem, slot_loc, _ = build_slot_map(coarse.conn, coarse.n)
            coarse.pattern = (indptr, indices, slot_ptr, slot_elem, slot_loc)
            levels.append(coarse)
        self._k = k
        logger.info("GMG: %d level(s) %s; built in %.3g s", len(levels),
                    " -> ".join(lv.describe() for lv in levels), time.perf_counter() - t0)
        return levels

    # -- numerics (once per parameter value) ---------------------------------------------------------------
    def _check_operator(self, A, operator) -> None:
        from ..operators.element import ElementCoefficientMatrix

        if not isinstance(operator, ElementCoefficientMatrix):
            raise ValueError(f"GMGSolver needs an ElementCoefficientMatrix operator, got {type(operator).__name__}")
        fine = self.levels[0]
        if operator.shape != A.shape:
            raise ShapeError(f"A is {A.shape[0]} x {A.shape[1]} but the operator is {operator.shape}")
        if operator.conn is self._checked_conn:
            return
        grid = f"the {fine.describe()} grid with {fine.dim} dof(s) per node"
        if A.shape[0] != fine.n or operator.conn.shape != fine.conn.shape:
            raise ShapeError(
                f"GMGSolver was built for {grid} ({fine.n_elements} elements of {fine.conn.shape[1]} dofs), "
                f"but the operator has {operator.n_elements} elements of {operator.conn.shape[1]} dofs and "
                f"{operator.shape[0]} unknowns: build the solver for the operator's grid and Dirichlet dofs."
            )
        if not np.array_equal(operator.conn, fine.conn):
            raise ValueError(
                f"the operator's connectivity differs from {grid} and the given fixed dofs (element order x "
                "fastest, local nodes as in adjopt.mesh, dofs node-major, fixed dofs condensed): build the solver "
                "for the operator's grid and Dirichlet dofs."
            )
        if np.any(getattr(operator, "_base", 0.0)):
            raise ValueError("GMGSolver supports A(p) = sum_e phi(p_e) K_e without a constant part A0")
        self._checked_conn = operator.conn

    def factorize(self, A, operator=None, rho=None) -> GMGFactorization:
        """Build the multigrid hierarchy of A = ``operator.assemble(rho)``.

        Geometric multigrid needs the discretisation: ``operator`` (the
        :class:`~adjopt.operators.ElementCoefficientMatrix` on this solver's
        grid) and ``rho`` (its parameters). :class:`~adjopt.ReducedFunctional`
        passes both. A must be ``operator.assemble(rho)`` and must not change
        while the factorization is in use (it is kept, not copied).
        """
        if operator is None or rho is None:
            raise ValueError(
                "GMGSolver.factorize needs the discretisation, not only A: call factorize(A, operator=..., "
                "rho=...) with the ElementCoefficientMatrix and its parameters, or use the solver through "
                "adjopt.ReducedFunctional (e.g. topology_compliance.build(solver='gmg')), which passes them."
            )
        A = sp.csr_array(A)
        if A.shape[0] != A.shape[1]:
            raise ShapeError(f"A must be square, got shape {A.shape}")
        check_finite(A.data, "the values of A(p)")
        self._check_operator(A, operator)
        rho = np.asarray(rho, dtype=np.float64)
        if rho.shape != (operator.n_params,):
            raise ShapeError(f"rho must have shape ({operator.n_params},), got {rho.shape}")
        t0 = time.perf_counter()
        with threads_for(A.nnz):  # small grids on one thread (see GMGFactorization._solve)
            fac = self._factorize(A, operator, rho)
        self.stats.factorization_time += time.perf_counter() - t0
        self.stats.factorizations += 1
        self.stats.factor_nnz += fac.factor_nnz
        return fac

    @staticmethod
    def _coefficients(operator, rho) -> np.ndarray:
        # a copy: the hierarchy (and a later rebuild of it) must not follow the caller's rho, nor a coefficient
        # that hands back its input (Identity)
        coef = np.array(operator.coefficient(np.asarray(rho, dtype=np.float64)), dtype=np.float64, order="C")
        check_finite(coef, "the element coefficients phi(rho)")
        return coef

    def coarse_operators(self, operator, rho, coef=None) -> list:
        """The operators A_1, ..., A_L (CSR) of the coarse levels for A(rho) (element-wise Galerkin products)."""
        if coef is None:
            coef = self._coefficients(operator, rho)
        local = operator.local
        k = self._k
        out = []
        K = None
        for l_idx, lv in enumerate(self.levels[1:], start=1):
            if l_idx == 1 and local.shape[0] == 1:
                # K_C = sum_c E_c P_c^T KE P_c = E[children] @ G
                G = np.einsum("cai,ab,cbj->cij", self._local_P, local.reshape(k, k), self._local_P).reshape(-1, k * k)
                G = 0.5 * (G + G.reshape(-1, k, k).transpose(0, 2, 1).reshape(-1, k * k))
                # einsum, not a BLAS matmul: numpy's BLAS threads would spin on the cores of the next kernels
                K = np.einsum("ec,ck->ek", coef[lv.children], G)
            else:
                fine = coef[:, None] * local if l_idx == 1 else K
                K = np.empty((lv.n_elements, k * k))
                _galerkin_elements(np.ascontiguousarray(fine), lv.children, self._p_rows, self._p_cols,
                                   self._p_w, k, K)
            indptr, indices, slot_ptr, slot_elem, slot_loc = lv.pattern
            data = np.empty(indices.shape[0])
            ones = np.ones(lv.n_elements)
            _kernels.gather_slots(slot_ptr, slot_elem, slot_loc, K, 1, ones, np.zeros_like(data), data)
            out.append(sp.csr_array((data, indices, indptr), shape=(lv.n, lv.n)))
        return out

    def _level0(self, A, operator, coef):
        """The finest level's operator for A: matrix-free (2D, shared KE) on all dofs, else the CSR A."""
        fine = self.levels[0]
        if len(self.levels) > 1 and self._stencil_possible and operator.local.shape[0] == 1:
            # level 0 matrix-free on all dofs of the grid (zeros at the fixed ones)
            diag = np.zeros(fine.fixed_mask.size)
            diag[fine.free] = _positive_diagonal(A)
            mask = (~fine.fixed_mask).astype(np.float64)
            op0 = _LevelOp(_Q1Stencil(fine.shape, operator.local.reshape(self._k, self._k), coef, mask), diag)
            if self._stencil_checked is not operator.conn:  # once per operator: the stencil is this A
                free = fine.free
                v = np.zeros(fine.fixed_mask.size)
                v[free] = np.random.default_rng(self.seed).standard_normal(free.size)
                w = np.empty_like(v)
                op0.matvec(v, w)
                ref = A @ v[free]
                if not np.linalg.norm(w[free] - ref) <= 1e-10 * np.linalg.norm(ref):
                    raise ValueError("the matrix-free fine-level operator differs from A = operator.assemble(rho); "
                                     "pass that A, or use GMGSolver(..., matrix_free=False)")
                self._stencil_checked = operator.conn
            return op0, fine.free
        return _LevelOp(_CSROperator(A), _positive_diagonal(A)), None

    def _element_bound(self, operator, coef) -> float | None:
        """max_e lambda_max(diag(K_e)^-1 K_e) for one shared K_e and coefficients >= 0, else None.

        x^T A x = sum_e E_e x_e^T K_e x_e <= lambda sum_e E_e x_e^T diag(K_e) x_e = lambda x^T D x, so it
        bounds lambda_max(D^-1 A) from above on any grid and design (and on the free dofs, by interlacing):
        an upper bound for the smoother without Lanczos steps. 2.89 for Q1 plane stress at nu = 0.3, where
        10 Lanczos steps times 1.1 gave 2.41 (CG took 0.5-0.75 more iterations per solve with the bound).
        """
        if operator.local.shape[0] != 1 or not float(np.min(coef)) >= 0.0:
            return None
        if self._bound is None or self._bound[0] is not operator.local:  # per element matrix (it may change)
            K = operator.local.reshape(self._k, self._k)
            d = np.sqrt(np.diag(K))
            self._bound = (operator.local, float(np.linalg.eigvalsh(K / d[:, None] / d[None, :])[-1]))
        return self._bound[1]

    def _build(self, A, operator, coef):
        """A fresh hierarchy for A: (ops, transfers, coarse_solve, coarse_nnz, free)."""
        t0 = time.perf_counter()
        mats = self.coarse_operators(operator, None, coef)
        t1 = time.perf_counter()
        op0, free = self._level0(A, operator, coef)
        transfers = [(lv.P, lv.R) for lv in self.levels[1:]]
        if free is not None:
            transfers[0] = (self.levels[1].P_full, self.levels[1].R_full)
        ops = [op0] + [_LevelOp(_CSROperator(M), _positive_diagonal(M)) for M in mats]
        rng = np.random.default_rng(self.seed)
        bound = self._element_bound(operator, coef)
        for level, op in enumerate(ops[:-1]):
            if level == 0 and bound is not None:
                op.rho = bound
            else:
                op.rho = self.eig_safety * _lanczos_max(op, self.eig_steps, rng)
        t2 = time.perf_counter()
        coarse_solve, coarse_nnz = self._coarse_factor(mats[-1] if mats else A)
        t3 = time.perf_counter()
        logger.debug("GMG setup: Galerkin %.3g s, smoother bounds %.3g s, coarse factor %.3g s; rho %s",
                     t1 - t0, t2 - t1, t3 - t2, [round(op.rho, 3) for op in ops[:-1]])
        self._fresh = dict(ops=ops[1:], transfers=transfers, coarse_solve=coarse_solve, coarse_nnz=coarse_nnz,
                           conn=operator.conn, iterations=None, stale=False)
        return ops, transfers, coarse_solve, coarse_nnz, free

    def _factorize(self, A, operator, rho) -> GMGFactorization:
        A.sort_indices()
        coef = self._coefficients(operator, rho)
        fresh = self._fresh
        reuse = (self.reuse_hierarchy and not self._lag_skip and fresh is not None and not fresh["stale"]
                 and fresh["conn"] is operator.conn and len(self.levels) > 1)
        self._lag_skip = max(self._lag_skip - 1, 0)
        if reuse:
            # the coarse levels of the last fresh hierarchy, this A's own finest level: a preconditioner
            # that is still symmetric positive definite, so CG converges to A's solution all the same
            op0, free = self._level0(A, operator, coef)
            bound = self._element_bound(operator, coef)
            op0.rho = bound if bound is not None else self.eig_safety * _lanczos_max(
                op0, self.eig_steps, np.random.default_rng(self.seed))
            self.lagged_setups += 1
            transfers = list(fresh["transfers"])
            fac = GMGFactorization(A, self.stats, self, [op0] + fresh["ops"], transfers, fresh["coarse_solve"],
                                   fresh["coarse_nnz"], free)
            fac.lagged = True
        else:
            fac = GMGFactorization(A, self.stats, self, *self._build(A, operator, coef))
        fac._source = (operator, coef)
        return fac

    def _note_iterations(self, its: int, lagged: bool) -> None:
        """Rebuild the coarse levels at the next factorization once lagged ones cost many more CG iterations."""
        fresh = self._fresh
        if fresh is None:
            return
        if not lagged:
            if fresh["iterations"] is None:
                fresh["iterations"] = its
        elif fresh["iterations"] is not None and its > self._stale_limit():
            fresh["stale"] = True
        else:
            self._lag_backoff = 1  # reuse paid off: try it again at once after the next failure

    def _stale_limit(self) -> float | None:
        """Iterations beyond which reused coarse levels count as stale (None: not known yet)."""
        fresh = self._fresh
        if fresh is None or fresh["iterations"] is None:
            return None
        return self.rebuild_ratio * fresh["iterations"] + 1

    def _lag_failed(self) -> None:
        """A solve on reused levels was given up: the next factorizations build fresh hierarchies (1, 2, 4,
        ... up to 32 of them after consecutive failures), so that a design that changes fast pays little."""
        self._lag_skip = self._lag_backoff
        self._lag_backoff = min(2 * self._lag_backoff, 32)

    def _lagged_budget(self) -> int:
        """CG iterations a solve with lagged coarse levels may take before they are rebuilt."""
        fresh = self._fresh
        base = fresh["iterations"] if fresh is not None and fresh["iterations"] is not None else 20
        return int(2 * self.rebuild_ratio * base) + 10

    def _coarse_factor(self, Ac):
        """A solve function of the coarsest operator (CHOLMOD, else SuperLU) and its factor's nonzeros."""
        Acsc = Ac.tocsc()
        try:
            from sksparse import cholmod
        except ImportError:
            cholmod = None
        if cholmod is not None:
            try:
                if self._coarse_symbolic is None:
                    # 2D coarse grids have little fill: simplicial L D L^T factors them 1.5-2x faster than supernodal
                    mode = "simplicial" if len(self.shape) == 2 else "auto"
                    self._coarse_symbolic = cholmod.analyze(Acsc, mode=mode)
                factor = self._coarse_symbolic.cholesky(Acsc)
            except cholmod.CholmodNotPositiveDefiniteError as exc:
                raise NotPositiveDefiniteError(
                    f"the coarsest multigrid operator is not positive definite (pivot {exc.column}): A(p) is not SPD"
                ) from exc
            if not np.all(factor.D() > 0):
                raise NotPositiveDefiniteError("the coarsest multigrid operator is not positive definite: A(p) is not SPD")
            if self._coarse_nnz is None:  # the same pattern every time: count the factor's nonzeros once
                self._coarse_nnz = int(factor.L().nnz)
            return factor.solve_A, self._coarse_nnz
        from scipy.sparse.linalg import splu

        lu = splu(Acsc, permc_spec="MMD_AT_PLUS_A")
        return lu.solve, int(lu.L.nnz + lu.U.nnz)

    def _smoother_coefficients(self, rho: float):
        """(c0, [(c1, c2), ...]): d_0 = c0 D^{-1} r_0, d_k = c1 d_{k-1} + c2 D^{-1} r_k, x += d_k."""
        m = self.degree
        if self.smoother == "jacobi":
            w = self.jacobi_weight / rho
            return w, [(0.0, w)] * (m - 1)
        if self.smoother == "chebyshev4":
            return 4.0 / (3.0 * rho), [((2 * k - 1) / (2 * k + 3), (8 * k + 4) / ((2 * k + 3) * rho))
                                       for k in range(1, m)]
        # first kind on [a, b] (Saad, Iterative Methods, Alg. 12.1)
        b = rho
        a = rho / self.cheb_ratio
        theta, delta = 0.5 * (b + a), 0.5 * (b - a)
        sigma = theta / delta
        r_old = 1.0 / sigma
        steps = []
        for _ in range(1, m):
            r_new = 1.0 / (2.0 * sigma - r_old)
            steps.append((r_new * r_old, 2.0 * r_new / delta))
            r_old = r_new
        return 1.0 / theta, steps


#: free dofs from which ``solver="auto"`` takes geometric multigrid on a structured grid (2D, 3D): below, a
#: CHOLMOD factorization per design is faster (measured on the MBB beam and the 3D cantilever, see
#: :func:`structured_solver`)
GMG_AUTO_MIN_DOFS = {2: 12_000, 3: 20_000}


def structured_solver(shape, dofs_per_node: int, fixed=(), solver=None, **options) -> LinearSolver:
    """The linear solver of A(p) = sum_e phi(p_e) K_e on a structured grid, where GMG is an option.

    ``solver="gmg"``: a :class:`GMGSolver` on the grid (``options`` are its
    keyword arguments). ``None`` or ``"auto"``: the same when the grid has at
    least :data:`GMG_AUTO_MIN_DOFS` free dofs and coarsens at least once (a
    hierarchy of 2 levels or more), else :class:`~adjopt.solvers.AutoSolver`
    (a factorization). Anything else: :func:`~adjopt.solvers.make_solver`.

    The crossover was measured per OC design iteration on the development
    machine (2 cores, CHOLMOD on OpenBLAS) with the default ``min_levels=2``:
    in 2D, CHOLMOD is faster at 2.6k dofs (0.007 s against 0.017 s for GMG)
    and 8.3k (0.020 against 0.024), GMG at 14.8k (0.025 against 0.042) and
    15.4k (0.032 against 0.045). In 3D a factor fills much more, and GMG is
    taken as soon as the default hierarchy has 2 levels (``coarse_dofs`` =
    20k free dofs). ``shape``, ``dofs_per_node``, ``fixed`` and ``options``
    (names and values) are checked whichever solver is returned.
    """
    import inspect

    from . import make_solver

    try:
        inspect.signature(GMGSolver).bind(shape, dofs_per_node, fixed, **options)
    except TypeError as exc:
        raise TypeError(f"structured_solver: {exc} (options are GMGSolver's keyword arguments)") from None
    # the grid, the fixed dofs and every option's value are checked whichever solver is returned (one level: cheap)
    GMGSolver(shape, dofs_per_node, fixed, **{**options, "max_levels": 1})
    if options.get("max_levels") is not None:
        _check_count(options["max_levels"], "max_levels", 1)

    if isinstance(solver, str) and solver.lower() == "gmg":
        return GMGSolver(shape, dofs_per_node, fixed, **options)
    if solver is not None and not (isinstance(solver, str) and solver.lower() == "auto"):
        return make_solver(solver)
    shape = tuple(shape)
    n_full = int(np.prod(np.array(shape) + 1)) * int(dofs_per_node)
    n_free = n_full - np.unique(np.asarray(fixed).ravel()).size
    if n_free >= GMG_AUTO_MIN_DOFS.get(len(shape), math.inf):
        try:
            gmg = GMGSolver(shape, dofs_per_node, fixed, **options)
        except GridSupportError as exc:  # supports that the hierarchy cannot represent: a factorization then
            logger.info("solver='auto': no geometric multigrid on this grid (%s); a factorization instead", exc)
        else:
            if len(gmg.levels) >= 2:
                logger.info("solver='auto' chose geometric multigrid for the %s grid (%d free dofs, %d levels)",
                            "x".join(map(str, shape)), n_free, len(gmg.levels))
                return gmg
    return make_solver("auto")
