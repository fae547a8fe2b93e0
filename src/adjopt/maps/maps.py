"""Concrete parameter maps: exp, SIMP, density filter, Heaviside projection, nodal -> element."""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from .._threads import threads_for
from .._validate import check_flag
from ..errors import PatternError, ShapeError
from ..operators.coefficients import SIMP, Exp
from .base import ParameterMap


class _Entrywise(ParameterMap):
    """rho_i = phi(p_i): jvp = phi' dp, vjp = phi' g, second = phi'' g dp.

    phi comes from a :class:`~adjopt.operators.coefficients.Coefficient` (``self.phi``)
    or from the subclass's own ``_f``, ``_d1``, ``_d2``.
    """

    phi = None

    def __init__(self, n: int):
        self.n_in = self.n_out = int(n)

    def _f(self, p):
        return self.phi(p)

    def _d1(self, p):
        return self.phi.d1(p)

    def _d2(self, p):
        return self.phi.d2(p)

    def forward(self, p):
        return self._f(self.check_p(p))

    def jvp(self, p, dp):
        return self._d1(self.check_p(p)) * self.check_p(dp, "dp")

    def vjp(self, p, g):
        return self._d1(self.check_p(p)) * self.check_out(g)

    def second(self, p, g, dp):
        return self._d2(self.check_p(p)) * self.check_out(g) * self.check_p(dp, "dp")

    def jvp_block(self, p, dP):
        return self._d1(self.check_p(p))[:, None] * self.check_block(dP, self.n_in, "dP")

    def vjp_block(self, p, G):
        return self._d1(self.check_p(p))[:, None] * self.check_block(G, self.n_out, "G")


class ExpMap(_Entrywise):
    """rho = exp(p), entrywise (the :class:`~adjopt.operators.Exp` coefficient as a map)."""

    phi = Exp()


class SIMPMap(_Entrywise):
    """rho = emin + p**q (e0 - emin), entrywise (the :class:`~adjopt.operators.SIMP` coefficient as a map)."""

    def __init__(self, n: int, q: float = 3.0, e0: float = 1.0, emin: float = 1e-9):
        super().__init__(n)
        self.phi = SIMP(q=q, e0=e0, emin=emin)


class HeavisideProjection(_Entrywise):
    """Smoothed Heaviside projection (Wang, Lazarov, Sigmund 2011):

        rho = (tanh(beta eta) + tanh(beta (p - eta))) / (tanh(beta eta) + tanh(beta (1 - eta)))

    ``beta`` and ``eta`` may be changed between evaluations (continuation,
    :class:`~adjopt.optimize.BetaContinuation`): each change bumps
    ``version``, and the functionals that cache states drop them.
    """

    def __init__(self, n: int, beta: float = 1.0, eta: float = 0.5):
        super().__init__(n)
        self.version = 0
        self._beta, self._eta = 1.0, 0.5
        self.eta = eta
        self.beta = beta

    @property
    def beta(self) -> float:
        """The sharpness (> 0); setting it recomputes the normalisation and bumps ``version``."""
        return self._beta

    @beta.setter
    def beta(self, value) -> None:
        try:
            b = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Heaviside projection needs a number beta > 0, got {value!r}") from None
        if not (np.isfinite(b) and b > 0):
            raise ValueError(f"Heaviside projection needs a finite beta > 0, got {value!r}")
        self._beta = b
        self._changed()

    @property
    def eta(self) -> float:
        """The threshold in [0, 1]; setting it recomputes the normalisation and bumps ``version``."""
        return self._eta

    @eta.setter
    def eta(self, value) -> None:
        try:
            e = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Heaviside projection needs a number eta in [0, 1], got {value!r}") from None
        if not 0 <= e <= 1:
            raise ValueError(f"Heaviside projection needs 0 <= eta <= 1, got {value!r}")
        self._eta = e
        self._changed()

    def _changed(self) -> None:
        b, e = self._beta, self._eta
        self._den = np.tanh(b * e) + np.tanh(b * (1 - e))
        self.version += 1

    def _f(self, p):
        return (np.tanh(self.beta * self.eta) + np.tanh(self.beta * (p - self.eta))) / self._den

    def _d1(self, p):
        t = np.tanh(self.beta * (p - self.eta))  # 1 - tanh^2 = 1 / cosh^2, without cosh's overflow at large beta
        return self.beta * (1.0 - t * t) / self._den

    def _d2(self, p):
        t = np.tanh(self.beta * (p - self.eta))
        return -2.0 * self.beta**2 * t * (1 - t * t) / self._den

    def __repr__(self):
        return f"HeavisideProjection(beta={self.beta:g}, eta={self.eta:g})"


class FixedEntries(ParameterMap):
    """Fixed values at some entries of a field (passive elements of a design: solid 1, void 0).

    With ``reduced=True`` (default) the input holds only the free entries
    (length ``n - len(index)``, in increasing order of their position) and the
    output is the whole field with ``values`` at ``index``: the design
    variables of an optimizer that never sees the passive elements. With
    ``reduced=False`` input and output have length n and the entries at
    ``index`` are overwritten (after a filter: the passive elements stay
    exactly at their values). Affine: jvp and vjp are the same selection
    without the values.

    Parameters
    ----------
    n
        Length of the output field.
    index
        Positions of the fixed entries (integers in [0, n), no repeats).
    values
        Their values: a scalar or one per index.
    """

    affine = True

    def __init__(self, n: int, index, values, reduced: bool = True):
        self.reduced = check_flag(reduced, "reduced")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1 (the length of the field), got {n!r}")
        n = int(n)
        idx = np.asarray(index)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise PatternError(f"index must be a 1-D array of integer positions, got dtype {idx.dtype} shape {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise PatternError(f"index must lie in [0, {n}), got entries from {idx.min()} to {idx.max()}")
        v = np.asarray(values, dtype=np.float64)
        if v.ndim > 1 or (v.ndim == 1 and v.size != idx.size):
            raise ValueError(f"values must be a scalar or one per index ({idx.size}), got shape {v.shape}")
        vals = np.broadcast_to(v, idx.shape).copy() if idx.size else np.zeros(0)
        if not np.all(np.isfinite(vals)):
            raise ValueError("the fixed values must be finite")
        order = np.argsort(idx, kind="stable")
        idx, vals = idx[order], vals[order]
        if idx.size > 1 and np.any(idx[1:] == idx[:-1]):
            raise PatternError(f"index repeats position {int(idx[1:][idx[1:] == idx[:-1]][0])}; give each fixed entry once")
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        self.index, self.values = idx, vals
        self.free = np.flatnonzero(~mask)
        if self.free.size == 0:
            raise PatternError("every entry is fixed: nothing is left to vary")
        self.n_out = n
        self.n_in = self.free.size if self.reduced else n

    def forward(self, p):
        p = self.check_p(p)
        out = np.empty(self.n_out)
        out[self.free] = p if self.reduced else p[self.free]
        out[self.index] = self.values
        return out

    def jvp(self, p, dp):
        return self._spread(self.check_p(dp, "dp"))

    def vjp(self, p, g):
        g = self.check_out(g)
        if self.reduced:
            return g[self.free]
        out = g.copy()
        out[self.index] = 0.0
        return out

    def _spread(self, d):
        out = np.zeros((self.n_out,) + d.shape[1:])
        out[self.free] = d if self.reduced else d[self.free]
        return out

    def jvp_block(self, p, dP):
        return self._spread(self.check_block(dP, self.n_in, "dP"))

    def vjp_block(self, p, G):
        G = self.check_block(G, self.n_out, "G")
        if self.reduced:
            return G[self.free]
        out = G.copy()
        out[self.index] = 0.0
        return out

    def __repr__(self):
        return f"FixedEntries({self.index.size} of {self.n_out} fixed, reduced={self.reduced})"


class TiedEntries(ParameterMap):
    """Entries tied to shared values: out[e] = p[index[e]] (a symmetric, periodic or patterned design).

    ``index`` (length n_out) maps every output entry to its parameter in
    [0, m); every parameter must be used. jvp is the same gather; vjp adds up
    the entries of each parameter (``bincount``). Affine.

    Parameters
    ----------
    index
        (n_out,) integers in [0, m).
    m
        Number of parameters (default ``index.max() + 1``).
    """

    affine = True

    def __init__(self, index, m: int | None = None):
        idx = np.asarray(index)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise PatternError(f"index must be a non-empty 1-D integer array, got dtype {idx.dtype} shape {idx.shape}")
        idx = idx.astype(np.int64)  # a copy: the caller's array may change
        m = int(idx.max()) + 1 if m is None else int(m)
        if idx.min() < 0 or idx.max() >= m:
            raise PatternError(f"index must lie in [0, {m}), got entries from {idx.min()} to {idx.max()}")
        unused = np.flatnonzero(np.bincount(idx, minlength=m) == 0)
        if unused.size:
            raise PatternError(f"parameter {int(unused[0])} is tied to no entry ({unused.size} such); every "
                               "parameter must appear in index")
        self.index = idx
        self.n_in, self.n_out = m, idx.size

    def forward(self, p):
        return self.check_p(p)[self.index]

    def jvp(self, p, dp):
        return self.check_p(dp, "dp")[self.index]

    def vjp(self, p, g):
        return np.bincount(self.index, weights=self.check_out(g), minlength=self.n_in)

    def jvp_block(self, p, dP):
        return self.check_block(dP, self.n_in, "dP")[self.index]

    def vjp_block(self, p, G):
        G = self.check_block(G, self.n_out, "G")
        out = np.zeros((self.n_in, G.shape[1]))
        np.add.at(out, self.index, G)
        return out

    def __repr__(self):
        return f"TiedEntries({self.n_in} -> {self.n_out})"


class _Linear(ParameterMap):
    """rho = L p for a sparse matrix L built once."""

    affine = True

    def __init__(self, L, copy: bool = True):
        # copy=False: L is the subclass's own new matrix (nobody else holds it); no second copy
        self.L = sp.csr_array(L, dtype=np.float64, copy=copy)
        self._LT = self.L.T.tocsr()
        self.n_out, self.n_in = self.L.shape

    def forward(self, p):
        return self.L @ self.check_p(p)

    def jvp(self, p, dp):
        return self.L @ self.check_p(dp, "dp")

    def vjp(self, p, g):
        return self._LT @ self.check_out(g)

    def jvp_block(self, p, dP):
        return self.L @ self.check_block(dP, self.n_in, "dP")

    def vjp_block(self, p, G):
        return self._LT @ self.check_block(G, self.n_out, "G")


def _lattice(centers: np.ndarray):
    """``(shape, deviation)`` when the points are a regular grid numbered x fastest, else None.

    ``shape`` are the point counts per axis; the grid is ``centers[0] + idx * h`` with ``h`` > 0 per
    axis (of an axis with more than one point), and no coordinate deviates from it by more than
    ``deviation`` (<= 1e-3 of the smallest spacing; round-off of generated centres). O(E), no sort.
    """
    n, dim = centers.shape
    if not 1 <= dim <= 3 or n == 0 or not np.all(np.isfinite(centers)):
        return None
    shape, stride = [], 1
    for a in range(dim):
        x = centers[::stride, a]
        if a == dim - 1:
            na = x.size
        else:
            drop = np.flatnonzero(x[1:] <= x[:-1])  # where the coordinate starts over: the next row
            na = int(drop[0]) + 1 if drop.size else x.size
        if (n // stride) % na:
            return None
        shape.append(na)
        stride *= na
    if stride != n:
        return None
    grid = centers.reshape(tuple(shape[::-1]) + (dim,))  # (nz, ny, nx, dim): axis a of the grid is -2-a
    dev, hmin = 0.0, np.inf
    for a in range(dim):
        na = shape[a]
        line = np.moveaxis(grid[..., a], dim - 1 - a, -1)  # axis a last
        first = float(line.flat[0])
        h = (float(line.flat[na - 1]) - first) / (na - 1) if na > 1 else 0.0
        if na > 1:
            if not h > 0:
                return None
            hmin = min(hmin, h)
        dev = max(dev, float(np.abs(line - (first + h * np.arange(na))).max()))
    if dev > 1e-3 * hmin:  # hmin = inf when every axis has a single point
        return None
    return tuple(shape), dev


def _stencil(centers: np.ndarray, shape, dev: float, radius: float) -> np.ndarray:
    """Grid offsets (S, 3) that can hold a neighbour within ``radius``, sorted like the columns of a row.

    A superset: the grid distance of every offset kept is at most ``radius`` plus twice the largest
    deviation of a point from the grid (and a relative 1e-9), so every pair within ``radius`` is found
    (the exact test is on the points themselves). Offsets along axes with one point are 0.
    """
    dim = len(shape)
    h = np.zeros(dim)
    for a in range(dim):
        if shape[a] > 1:
            step = int(np.prod(shape[:a]))
            h[a] = (centers[(shape[a] - 1) * step, a] - centers[0, a]) / (shape[a] - 1)
    reach = radius * (1 + 1e-9) + 2.0 * dev * np.sqrt(dim) + 1e-12 * float(np.abs(centers[[0, -1]]).max())
    ranges = []
    for a in range(dim):
        m = 0 if shape[a] == 1 else int(min(shape[a] - 1.0, np.floor(reach / h[a])))
        ranges.append(np.arange(-m, m + 1))
    offs = np.stack([g.ravel() for g in np.meshgrid(*ranges, indexing="ij")], axis=1)  # (S, dim)
    near = (np.abs(offs) * h).clip(min=0.0)
    offs = offs[np.sqrt((near * near).sum(axis=1)) <= reach]
    out = np.zeros((offs.shape[0], 3), dtype=np.int64)
    out[:, :dim] = offs
    order = np.lexsort((out[:, 0], out[:, 1], out[:, 2]))  # z, then y, then x: increasing column
    return np.ascontiguousarray(out[order])


@numba.njit(parallel=True, cache=True)
def _stencil_rows(c3, nx, ny, nz, offs, radius, count, indptr, indices, data):
    """count=True: indptr[e + 1] = entries of row e; else fill row e of W + radius I (columns ascending).

    W_ec = radius - |x_e - x_c| for c != e with |x_e - x_c|^2 <= radius^2, computed as the KD-tree
    computes it (squared differences added over the axes in order, then the square root; c3 holds the
    centres padded with zero coordinates to 3 axes, which add exact zeros); zeros are dropped, the
    diagonal is radius: the matrix ``W + eye * radius`` of the KD-tree path, entry for entry.
    """
    r2 = radius * radius
    nxy = nx * ny
    for e in numba.prange(nx * ny * nz):
        i = e % nx
        j = (e // nx) % ny
        l = e // nxy
        x0, x1, x2 = c3[e, 0], c3[e, 1], c3[e, 2]
        q = 0 if count else indptr[e]
        for s in range(offs.shape[0]):
            oi, oj, ol = offs[s, 0], offs[s, 1], offs[s, 2]
            if i + oi < 0 or i + oi >= nx or j + oj < 0 or j + oj >= ny or l + ol < 0 or l + ol >= nz:
                continue
            c = e + oi + nx * oj + nxy * ol
            if c == e:
                w = radius
            else:
                d0 = x0 - c3[c, 0]
                d1 = x1 - c3[c, 1]
                d2 = x2 - c3[c, 2]
                sq = 0.0
                sq += d0 * d0
                sq += d1 * d1
                sq += d2 * d2
                if sq > r2:
                    continue
                w = radius - np.sqrt(sq)
                if w == 0.0:
                    continue
            if not count:
                indices[q] = c
                data[q] = w
            q += 1
        if count:
            indptr[e + 1] = q


def _kdtree_weights(centers: np.ndarray, radius: float):
    """``W + radius I`` of :class:`DensityFilter` from a KD-tree: any centres (the general path)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(centers)
    D = tree.sparse_distance_matrix(tree, radius, output_type="coo_matrix")
    off = D.row != D.col  # the self-distance 0 may or may not be stored: add it once below
    W = sp.coo_array((radius - D.data[off], (D.row[off], D.col[off])), shape=(len(centers),) * 2).tocsr()
    return W + sp.eye_array(len(centers)) * radius


def _grid_weights(centers: np.ndarray, radius: float):
    """``W + radius I`` of :class:`DensityFilter` from a fixed stencil when the centres are a regular grid
    numbered x fastest (see :func:`_lattice`), else None. The same CSR (canonical) as the KD-tree path."""
    if not np.isfinite(radius):
        return None
    grid = _lattice(centers)
    if grid is None:
        return None
    shape, dev = grid
    radius = float(radius)
    offs = _stencil(centers, shape, dev, radius)
    n, dim = centers.shape
    c3 = np.zeros((n, 3))
    c3[:, :dim] = centers
    nx, ny, nz = (tuple(shape) + (1, 1))[:3]
    indptr = np.zeros(n + 1, dtype=np.int64)
    empty_i, empty_d = np.zeros(0, dtype=np.int32), np.zeros(0)
    with threads_for(n * offs.shape[0]):
        _stencil_rows(c3, nx, ny, nz, offs, radius, True, indptr, empty_i, empty_d)
        np.cumsum(indptr, out=indptr)
        nnz = int(indptr[-1])
        idx_t = np.int32 if max(n, nnz) < np.iinfo(np.int32).max else np.int64
        indptr = indptr.astype(idx_t)
        indices = np.empty(nnz, dtype=idx_t)
        data = np.empty(nnz)
        _stencil_rows(c3, nx, ny, nz, offs, radius, False, indptr, indices, data)
    W = sp.csr_array((data, indices, indptr), shape=(n, n))
    W.has_canonical_format = True
    return W


def element_indices(value, n: int, name: str = "elements") -> np.ndarray:
    """Sorted unique indices in [0, n) from integer indices (any order, repeats allowed) or a boolean mask of
    length n; a clear error for anything else (an integer array of n zeros and ones, probably a mask, too)."""
    a = np.asarray(value)
    if a.dtype == bool:
        if a.shape != (n,):
            raise ShapeError(f"{name} as a mask must have one entry per element ({n}), got shape {a.shape}")
        return np.flatnonzero(a)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise PatternError(f"{name} must be element indices (1-D integers) or a boolean mask, got dtype {a.dtype} "
                           f"shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= n):
        raise PatternError(f"{name} must be element indices in [0, {n}), got entries from {a.min()} to {a.max()}")
    if a.size == n and n > 2 and np.all((a == 0) | (a == 1)):
        raise PatternError(f"{name} is an integer array of 0s and 1s, one per element: a mask? Give a boolean mask "
                           "(mask.astype(bool)) or element indices")
    return np.unique(a.astype(np.int64))


class DensityFilter(_Linear):
    """Cone-weighted linear density filter (Bruns & Tortorelli 2001; Bourdin 2001)::

        rho_e = sum_i w_ei v_i p_i / sum_i w_ei v_i,    w_ei = max(0, r - |x_e - x_i|)

    The neighbours within r come from a KD-tree (``scipy.spatial.cKDTree``),
    or, when the centres are a regular grid numbered x fastest (the cell
    centres of :func:`~adjopt.mesh.rectangle` and :func:`~adjopt.mesh.box`),
    from the fixed stencil of grid offsets within r, with the distances
    computed from the centres as the KD-tree computes them: the same matrix,
    entry for entry (432k cells of a box, r = 1.5, on 2 busy cores: 0.2 s
    instead of 2.8-3.5 s for the neighbours, 0.45-0.6 s instead of 2.2-3.0 s
    for the whole filter).

    Parameters
    ----------
    centers
        (E, dim) element centres.
    radius
        Filter radius r (same units as the centres).
    volumes
        Optional (E,) element volumes (default: equal weights).
    void_outside
        Optional elements (indices or a boolean mask) whose row is divided by
        the largest row sum instead of its own: as if the domain went on with
        void beyond their boundary (zero padding; pyMOTO's ``nonpadding`` is
        the complement). Such rows sum to less than one near the boundary, so
        material there is penalized; leave out the elements near supports.
    """

    def __init__(self, centers, radius: float, volumes=None, void_outside=None):
        centers = np.asarray(centers, dtype=np.float64)
        if centers.ndim != 2:
            raise ShapeError(f"centers must be an (E, dim) array, got shape {centers.shape}")
        if not radius > 0:
            raise ValueError(f"filter radius must be positive, got {radius}")
        W = _grid_weights(centers, radius)
        if W is None:
            W = _kdtree_weights(centers, radius)
        if volumes is not None:
            volumes = np.asarray(volumes, dtype=np.float64)
            if volumes.shape != (len(centers),):
                raise ShapeError(f"volumes must have length {len(centers)}, got shape {volumes.shape}")
            W = W @ sp.diags_array(volumes)
        sums = np.asarray(W.sum(axis=1)).ravel()
        if void_outside is not None:
            sums[element_indices(void_outside, len(centers), "void_outside")] = sums.max()
        W = sp.diags_array(1.0 / sums) @ W
        super().__init__(W, copy=False)
        self.radius = float(radius)


class NodalToElement(_Linear):
    """A nodal field to one value per element: the mean of its nodes (``mode="average"``),
    or that mean times the element volume (``mode="integrate"``, exact for P1 fields).
    """

    def __init__(self, cells, n_nodes: int | None = None, mode: str = "average", volumes=None):
        cells = np.asarray(cells)
        if cells.ndim != 2:
            raise PatternError(f"cells must be an (E, k) array, got shape {cells.shape}")
        n_elem, k = cells.shape
        n_nodes = int(cells.max()) + 1 if n_nodes is None else int(n_nodes)
        weights = np.full(n_elem, 1.0 / k)
        if mode == "integrate":
            if volumes is None:
                raise ValueError("mode='integrate' needs the element volumes")
            weights = weights * np.asarray(volumes, dtype=np.float64)
        elif mode != "average":
            raise ValueError(f"unknown mode {mode!r}; use 'average' or 'integrate'")
        rows = np.repeat(np.arange(n_elem), k)
        L = sp.coo_array((np.repeat(weights, k), (rows, cells.ravel())), shape=(n_elem, n_nodes))
        super().__init__(L)
