"""Element residuals of nonlinear diffusion-reaction equations, with numba kernels for every derivative.

    R(u, p) = F(u, p) - b(p),
    F_e(u)_a = int_e a_e q(u) grad u . grad N_a + c_e g(u) N_a,    q(u) = 1 + beta u^2,  g = 0, u^3 or exp(u)

covers quasilinear diffusion -div(a q(u) grad u) = f and semilinear reaction -div(a grad u) + c g(u) = f
(Bratu for g = exp). The diffusion coefficient a_e and the reaction coefficient c_e are constants or
a_e = phi(p_e), c_e = psi(p_e) for coefficient maps (one parameter per element); the source b(p) is any
:class:`~adjopt.operators.ParametricVector` on the free dofs (a distributed control, for instance).

With the element forms of ``_residual_kernels`` the derivatives are

    (dR/dp)^T w     e-th: a'_e int q gu.gw + c'_e int g wq                  - (db/dp)^T w
    (dR/dp) dp      the residual kernel with (a'_e dp_e, c'_e dp_e)         - (db/dp) dp
    L_uu du + L_up dp   one kernel pass (SECOND_U)
    L_pu du + L_pp dp   e-th: a'_e int (q gw.gdu + q' du gu.gw) + c'_e int g' w du
                          + dp_e (a''_e int q gu.gw + c''_e int g w)        - w^T b''(p) dp

for L = w^T R. Dirichlet dofs (a :class:`~adjopt.fem.DofMap`) hold their prescribed values; the state, the
residual and the Jacobian live on the free dofs.
"""

from __future__ import annotations

import numba
import numpy as np

from .._threads import threads_for
from .._validate import check_finite
from ..errors import PatternError, ShapeError
from . import _residual_kernels as _rk
from .coefficients import Coefficient, as_coefficient
from .element import build_slot_map
from ..fem.dirichlet import DofMap
from .residual import ParametricResidual
from .vectors import ParametricVector, as_vector

_NONLINEARITIES = {None: _rk.G_NONE, "none": _rk.G_NONE, "cube": _rk.G_CUBE, "exp": _rk.G_EXP}


def _coefficient(value, name: str):
    """(Coefficient or None, constant): a Coefficient (or its name) is parametric, a number constant."""
    if isinstance(value, (Coefficient, str)):
        return as_coefficient(value), 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number or a Coefficient (or 'exp', 'identity', 'simp'), "
                         f"got {value!r}")
    return None, float(value)


class ElementResidual(ParametricResidual):
    """R(u, p) = F(u, p) - b(p) for the diffusion-reaction element residual of the module docstring.

    Parameters
    ----------
    conn
        (E, k) node numbers of the elements (all nodes, before any Dirichlet condensation).
    N, G, W
        Quadrature data (see :func:`adjopt.fem.element_geometry`): shape values N (nq, k), physical gradients
        G (E or 1, nq or 1, k, d) and weights times ``|det J|`` W (E or 1, nq). A leading 1 means shared by all
        elements (or all points).
    dofmap
        Optional :class:`~adjopt.fem.DofMap`: the fixed nodes keep its values; default every node is free.
    diffusion, reaction
        a and c: numbers, or coefficient maps of p (``Exp()``, ``"exp"``, ``SIMP(...)``, ...), one parameter per
        element. At least one of them or the source must depend on p.
    beta
        q(u) = 1 + beta u^2; ``beta != 0`` makes K nonsymmetric.
    nonlinearity
        g(u): ``None`` (no reaction term), ``"cube"`` (u^3) or ``"exp"`` (Bratu).
    source
        b: an array on the free dofs, a :class:`~adjopt.operators.ParametricVector` (e.g. a control), or None.
    """

    def __init__(self, conn, N, G, W, n_nodes: int | None = None, dofmap=None, diffusion=1.0, beta: float = 0.0,
                 reaction=0.0, nonlinearity: str | None = None, source=None):
        conn = np.asarray(conn)
        if conn.ndim != 2 or not np.issubdtype(conn.dtype, np.integer) or conn.shape[0] == 0:
            raise PatternError(f"conn must be a non-empty (E, k) integer array, got shape {conn.shape}")
        n_elem, k = conn.shape
        n_nodes = int(conn.max()) + 1 if n_nodes is None else int(n_nodes)
        if conn.min() < 0 or conn.max() >= n_nodes:
            raise PatternError(f"conn must hold node numbers in [0, {n_nodes}); got [{conn.min()}, {conn.max()}]")
        N, G, W = (np.array(a, dtype=np.float64, copy=True, order="C") for a in (N, G, W))  # adjopt's own copies
        nq = N.shape[0]
        if N.shape != (nq, k) or G.ndim != 4 or G.shape[0] not in (1, n_elem) or G.shape[1] not in (1, nq) \
                or G.shape[2] != k or W.shape not in ((1, nq), (n_elem, nq)):
            raise ShapeError(f"quadrature data do not fit {n_elem} elements of {k} nodes: N {N.shape} (nq, k), "
                             f"G {G.shape} (E or 1, nq or 1, k, d), W {W.shape} (E or 1, nq)")
        for name, a in (("N", N), ("G", G), ("W", W)):
            check_finite(a, name)
            a.flags.writeable = False
        if np.any(W < 0):
            raise ValueError("W holds quadrature weights times |det J|: it cannot be negative")
        if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) \
                or not np.isfinite(beta):
            raise ValueError(f"beta must be a finite number, got {beta!r}")
        key = nonlinearity.lower() if isinstance(nonlinearity, str) else nonlinearity
        if key not in _NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; use None, 'cube' (u^3) or 'exp' (Bratu)")
        self.conn = np.array(conn, dtype=np.int64, order="C")
        self.conn.flags.writeable = False
        self.N, self.G, self.W = N, G, W
        self._es, self._qs, self._ws = int(G.shape[0] > 1), int(G.shape[1] > 1), int(W.shape[0] > 1)
        self.beta, self.nonlinearity = float(beta), _NONLINEARITIES[key]
        self.diffusion, self._a0 = _coefficient(diffusion, "diffusion")
        self.reaction, self._c0 = _coefficient(reaction, "reaction")
        if self.nonlinearity == _rk.G_NONE and (self.reaction is not None or self._c0 != 0.0):
            raise ValueError("a reaction coefficient needs a nonlinearity ('cube' or 'exp')")
        if dofmap is None:
            self.free_of = np.arange(n_nodes, dtype=np.int64)
            self._g = np.zeros(n_nodes)
        else:
            if not isinstance(dofmap, DofMap):
                raise TypeError(f"dofmap must be an adjopt.fem.DofMap (adjopt.fem.condense), got "
                                f"{type(dofmap).__name__}")
            if dofmap.n_dofs != n_nodes:
                raise ShapeError(f"the DofMap has {dofmap.n_dofs} dofs but the mesh {n_nodes} nodes")
            # copies: a later change of the DofMap's arrays does not reach a residual (nor its cached states)
            self.free_of = np.array(dofmap.full_to_free, dtype=np.int64, copy=True)
            self._g = np.array(dofmap.prescribed, dtype=np.float64, copy=True)
            check_finite(self._g, "the prescribed Dirichlet values")
        self.free_of.flags.writeable = self._g.flags.writeable = False
        self._free = np.flatnonzero(self.free_of >= 0)
        self.n, self.n_nodes, self.n_elem = int(self._free.size), n_nodes, n_elem
        if self.n == 0:
            raise PatternError("every node is fixed: there is no state to solve for")
        self._b = as_vector(np.zeros(self.n) if source is None else source)
        if self._b.n != self.n:
            raise ShapeError(f"the source has {self._b.n} rows but there are {self.n} free dofs")
        if not self._b.depends_on_p and np.ndim(self._b.value(None)) != 1:
            raise ShapeError(f"the source must be one vector of shape ({self.n},): a residual has one right-hand "
                             f"side, got {np.shape(self._b.value(None))}")
        self._parametric = self.diffusion is not None or self.reaction is not None
        if self._parametric:
            self.n_params = n_elem
            if self._b.n_params not in (None, n_elem):
                raise ShapeError(f"the source takes {self._b.n_params} parameters but the coefficients one per "
                                 f"element ({n_elem})")
        elif self._b.depends_on_p and self._b.n_params is not None:
            self.n_params = int(self._b.n_params)
        else:
            raise ValueError("R does not depend on p: make diffusion or reaction a coefficient map, or pass a "
                             "source b(p)")
        self.symmetric = self.beta == 0.0
        restricted = self.free_of[self.conn]
        self.indptr, self.indices, self._slot_ptr, self._slot_elem, self._slot_loc, _ = build_slot_map(
            restricted, self.n)
        # the Jacobians handed out share the pattern: read-only, so that no caller can change it in place
        for a in (self.indptr, self.indices):
            a.flags.writeable = False

    # -- coefficient values -----------------------------------------------------------------------
    def _coefs(self, p, order: int):
        """(a^(order)(p), c^(order)(p)) per element (constants for order 0, zeros above)."""
        out = []
        for coef, const in ((self.diffusion, self._a0), (self.reaction, self._c0)):
            if coef is None:
                out.append(np.full(self.n_elem, const if order == 0 else 0.0))
            else:
                v = np.asarray((coef, coef.d1, coef.d2)[order](p), dtype=np.float64)
                if v.shape != (self.n_elem,):  # a user's Coefficient: the kernels index one value per element
                    raise ShapeError(f"the coefficient {coef!r} returned shape {v.shape} for "
                                     f"{('phi', 'phi_prime', 'phi_second')[order]}(p); one value per element "
                                     f"({self.n_elem},) is needed")
                check_finite(v, f"the coefficient {coef!r} at p (is p out of its range, or does it overflow?)")
                out.append(np.ascontiguousarray(v))
        return out

    def _full(self, v, fixed_values: bool):
        out = self._g.copy() if fixed_values else np.zeros(self.n_nodes)
        out[self._free] = v
        return out

    def _pass(self, mode, A, C, u, w=None, du=None, A2=None, C2=None, width=None):
        zero = np.zeros(1)
        out = np.empty((self.n_elem, width if width is not None else self.conn.shape[1]))
        with threads_for(self.n_elem * self.N.shape[0] * self.conn.shape[1]):
            _rk.element_pass(mode, self.conn, self.N, self.G, self._es, self._qs, self.W, self._ws, self.beta,
                             self.nonlinearity, A, C, zero if A2 is None else A2, zero if C2 is None else C2, u,
                             zero if w is None else w, zero if du is None else du, 4 * numba.get_num_threads(), out)
        return out

    def _scatter(self, local):
        out = np.zeros(self.n)
        _rk.scatter(self.conn, self.free_of, local, out)
        return out

    # -- the residual and its derivatives ---------------------------------------------------------
    def _residual(self, u, p):
        A, C = self._coefs(p, 0)
        r = self._scatter(self._pass(_rk.RESIDUAL, A, C, self._full(u, True)))
        b = self._b.value(p)
        if np.shape(b) != (self.n,):
            raise ShapeError(f"the source b(p) must have shape ({self.n},), got {np.shape(b)}")
        return r - b

    def _jacobian_values(self, u, p):
        A, C = self._coefs(p, 0)
        k = self.conn.shape[1]
        local = self._pass(_rk.JACOBIAN, A, C, self._full(u, True), width=k * k)
        out = np.empty(self.nnz)
        with threads_for(self.nnz):
            _rk.gather_slots(self._slot_ptr, self._slot_elem, self._slot_loc, local, out)
        return out

    def _vjp(self, u, p, w):
        g = np.zeros(self.n_params)
        if self._parametric:
            dA, dC = self._coefs(p, 1)
            F = self._pass(_rk.FORMS0, dA, dC, self._full(u, True), self._full(w, False), width=2)
            g = dA * F[:, 0] + dC * F[:, 1]
        if self._b.depends_on_p:
            g = g - self._b.vjp(p, w)
        return g

    def _jvp(self, u, p, dp):
        r = np.zeros(self.n)
        if self._parametric:
            dA, dC = self._coefs(p, 1)
            r = self._scatter(self._pass(_rk.RESIDUAL, dA * dp, dC * dp, self._full(u, True)))
        if self._b.depends_on_p:
            r = r - self._b.jvp(p, dp)
        return r

    def _second(self, u, p, w, du, dp):
        A, C = self._coefs(p, 0)
        uf, wf, duf = self._full(u, True), self._full(w, False), self._full(du, False)
        k = self.conn.shape[1]
        if self._parametric:
            dA, dC = self._coefs(p, 1)
            ddA, ddC = self._coefs(p, 2)
            A2, C2 = dA * dp, dC * dp
        else:
            A2 = C2 = np.zeros(self.n_elem)
        # one pass: the state part (columns :k) and the element forms of the parameter part (k:k+4)
        local = self._pass(_rk.SECOND_U, A, C, uf, wf, duf, A2, C2, width=k + 4)
        hu = self._scatter(local)
        hp = np.zeros(self.n_params)
        if self._parametric:
            F = local[:, k:]
            hp = dA * F[:, 0] + dC * F[:, 1] + dp * (ddA * F[:, 2] + ddC * F[:, 3])
        if self._b.depends_on_p and not self._b.affine:
            hp = hp - self._b.second(p, w, dp)
        return hu, hp

    def expand(self, u) -> np.ndarray:
        """The nodal field of a state: free dofs from u, fixed ones at their prescribed values."""
        return self._full(self.check_u(u), True)

