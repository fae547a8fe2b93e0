"""Stress-constrained minimum volume: element von Mises stresses, relaxed and aggregated into one constraint.

    minimize    V(p) = mean_e rho_e                     (rho = H p, the filtered density)
    subject to  K(rho) u = f
                G(u, p) = ((1/n) sum_e (s_e + 1)^P)^(1/P) - 1 <= 0,
                          s_e = rho_e (sigma_vm,e(u) / sigma_max - 1)
                f^T u <= c_max                           (optional)

The unified aggregation and relaxation of Verbart, Langelaar and van Keulen
(2017), in the form of pyMOTO's ``ex_volume_stress.py`` (its settings by
default): nelx x nely unit Q1 plane-strain elements (50 x 100, E = 1, nu =
0.3, emin = 1e-9, SIMP 3), the left edge clamped, a unit upward force at the
right edge's middle node, density filter radius 2, a uniform start at 1,
sigma_max = 0.4, P = 10, and the compliance bound 20. The element stress is
the solid material's at the element centre, sigma_e = D B_c u_e (the mean of
its 2 x 2 Gauss-point stresses), with the von Mises measure
sigma_vm^2 = sx^2 + sy^2 - sx sy + 3 txy^2; multiplying the relative excess
by the density relaxes the constraint in void (no singular optima).

``case="lbracket"`` is the L-bracket (Le et al. 2010): an nelx x nely square
(default 100 x 100) with its upper-right 0.6 x 0.6 part void and passive (the
re-entrant corner concentrates the stress), the top edge of the remaining arm
clamped, a unit downward force at the right end of the lower arm spread over
the top nodes of its last ``load_width`` element columns.

``passive_void`` / ``passive_solid`` (element indices, a boolean mask or a
string such as ``"0:3,7"``) fix elements at 0 and 1 as in
:func:`topology_compliance.build` (the voids united with the L-bracket's
own): they are not parameters and their density is exactly 0 or 1 after the
filter. A passive void carries no stress (the aggregate leaves it out); a
passive solid does (it stays in the aggregate). ``symmetry`` (``"x"``,
``"y"``, ``"xy"``; ``"z"`` in 3D) ties mirror images to one parameter: a
design restriction (see :func:`build`).

:class:`StressAggregate` is the objective (value, derivatives in u and p; no
Hessian); the problem's constraint is a :class:`adjopt.ReducedFunctional` of
it, so each design iteration takes one solve and one adjoint solve.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import adjopt
from adjopt import fem
from adjopt.maps import DensityFilter, FixedEntries, compose
from adjopt.mesh import box, rectangle
from adjopt.objectives import Objective
from adjopt.optimize import AdaptiveNormalization, grey_level
from adjopt.verify import taylor_test

if __package__:  # imported as problems.topology_stress
    from . import topology_compliance as _tc
else:  # a script, or loaded by file path (adjopt run): problems/ is (or is put) on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import topology_compliance as _tc

NU = 0.3
#: the von Mises form of plane stresses (sx, sy, txy): sigma_vm^2 = sigma^T VM sigma
VM = np.array([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 3.0]])
#: the same for 3D stresses in Voigt order (sx, sy, sz, tyz, txz, txy)
VM3 = np.block([[np.full((3, 3), -0.5) + 1.5 * np.eye(3), np.zeros((3, 3))], [np.zeros((3, 3)), 3.0 * np.eye(3)]])

#: how ``adjopt run topology_stress`` optimizes it unless told otherwise: a move limit of 0.05, because with 0.1
#: the adaptive L-bracket above 64 x 64 elements passed through a grey, overstressed design for dozens of
#: iterations (at 100 x 100: volume 0.02, relaxed stresses 100-200 times sigma_max at iterations 20-50) before
#: it recovered; with 0.05 it converged at 60, 70 and 100 elements without it
RUN_DEFAULTS = dict(method="mma", move=0.05, xtol=0.0, gtol=0.0, maxiter=300)


def centre_stress_matrix(unit_mesh, young: float, nu: float, plane: str, shear_scale: float = 1.0) -> np.ndarray:
    """sigma = D B_c u_e of a unit Q1 element at its centre, dofs node-major as the element matrices'.

    (3, 8) for a unit square (sx, sy, txy; ``plane`` strain or stress), (6, 24)
    for a unit cube (Voigt order sx, sy, sz, tyz, txz, txy; ``plane`` unused).
    ``shear_scale`` multiplies the shear stresses (1: the true ones)."""
    dim = unit_mesh.dim
    pts = unit_mesh.points[unit_mesh.cells[0]]  # corners of the unit element, in the cell's node order
    c = pts.mean(axis=0)
    # multilinear shape functions' gradients at the centre of a unit square (1/2) or cube (1/4)
    dn = (0.5 if dim == 2 else 0.25) * np.sign(pts - c)
    k = pts.shape[0]
    if dim == 2:
        B = np.zeros((3, 2 * k))
        B[0, 0::2] = dn[:, 0]
        B[1, 1::2] = dn[:, 1]
        B[2, 0::2] = dn[:, 1]
        B[2, 1::2] = dn[:, 0]
        shear = [2]
    else:
        B = np.zeros((6, 3 * k))
        for i in range(3):
            B[i, i::3] = dn[:, i]
        B[3, 1::3], B[3, 2::3] = dn[:, 2], dn[:, 1]  # gamma_yz
        B[4, 0::3], B[4, 2::3] = dn[:, 2], dn[:, 0]  # gamma_xz
        B[5, 0::3], B[5, 1::3] = dn[:, 1], dn[:, 0]  # gamma_xy
        shear = [3, 4, 5]
    S = fem.elasticity_matrix(dim, young, nu, plane) @ B
    S[shear] *= shear_scale
    return S


class StressAggregate(Objective):
    """A P-aggregate of the element von Mises stresses relaxed by the density, rho = M(p).

    ``form="unified"`` (Verbart et al. 2017, pyMOTO's): the P-mean of the relaxed excesses,

        G = ((1/n) sum_e (s_e + 1)^P)^(1/P) - 1,   s_e = rho_e (sigma_vm,e / sigma_max - 1);

    a void element has s_e = 0, a solid one within the bound s_e < 0.

    ``form="pnorm"`` (Le et al. 2010): the P-norm of the relaxed stress ratios,

        G = (sum_e r_e^P)^(1/P) - 1,   r_e = rho_e sigma_vm,e / sigma_max;

    the P-norm lies above max r_e, and an
    :class:`~adjopt.optimize.AdaptiveNormalization` (offset 1, :meth:`peak`
    the largest r_e) scales it to the largest relaxed stress. (The unified
    form cannot be normalized that way: its void elements sit at s_e + 1 = 1,
    so its aggregate has a floor near 1 that a normalization above 1 puts out
    of reach.)

    Parameters
    ----------
    conn
        (E, 8) (2D) or (E, 24) (3D) element dofs in the state's numbering, -1 for a fixed dof (zero
        displacement).
    S
        (3, 8) or (6, 24) stress of an element's dofs (:func:`centre_stress_matrix`), the same for every
        element.
    sigma_max
        The allowed von Mises stress.
    P
        The aggregation exponent (>= 1; 10).
    parameter_map
        p -> rho (the relaxation's density), or None for rho = p.
    elements
        The elements the constraint covers (default all; passive voids carry no stress).
    form
        ``"unified"`` or ``"pnorm"`` (above).
    """

    depends_on_p = True

    def __init__(self, conn, S, sigma_max: float, P: float = 10.0, parameter_map=None, elements=None,
                 form: str = "unified", q: float = 1.0):
        q = float(q)
        if not (np.isfinite(q) and q >= 1.0):
            raise ValueError(f"q (the relaxation exponent) must be >= 1, got {q!r}")
        self.q = q
        if form not in ("unified", "pnorm"):
            raise ValueError(f"form must be 'unified' (P-mean of relaxed excesses) or 'pnorm' (P-norm of relaxed "
                             f"stress ratios), got {form!r}")
        self.form = form
        conn = np.asarray(conn, dtype=np.int64)
        self.elements = np.arange(conn.shape[0]) if elements is None else np.asarray(elements, dtype=np.int64)
        self.conn = conn[self.elements]
        self.n_state = int(conn.max()) + 1
        self.S = np.asarray(S, dtype=np.float64)
        if self.S.shape not in ((3, 8), (6, 24)) or self.S.shape[1] != self.conn.shape[1]:
            raise adjopt.ShapeError(f"S must be (3, 8) (2D Q1) or (6, 24) (3D Q1) with one column per element "
                                    f"dof ({conn.shape[1]}), got {self.S.shape}")
        self.VM = VM if self.S.shape[0] == 3 else VM3
        self.sigma_max, self.P = float(sigma_max), float(P)
        if not (self.sigma_max > 0 and np.isfinite(self.sigma_max)):
            raise ValueError(f"sigma_max must be a positive stress, got {sigma_max!r}")
        if not self.P >= 1:
            raise ValueError(f"P (the aggregation exponent) must be >= 1, got {P!r}")
        self.map = parameter_map

    def _u_e(self, u):
        u = np.asarray(u, dtype=np.float64)
        if u.shape != (self.n_state,):
            raise adjopt.ShapeError(f"the stress needs one state column of length {self.n_state}, got {u.shape}")
        padded = np.append(u, 0.0)  # index -1 (a fixed dof) reads the zero at the end
        return padded[self.conn]  # (E, 8)

    def stresses(self, u) -> np.ndarray:
        """(E, 3) centre stresses (sx, sy, txy) of the covered elements, solid material; (E, 6) in 3D."""
        return self._u_e(u) @ self.S.T

    def _vm(self, sig) -> np.ndarray:
        return np.sqrt(np.maximum(np.einsum("ei,ij,ej->e", sig, self.VM, sig), 0.0))

    def von_mises(self, u) -> np.ndarray:
        """(E,) von Mises stresses of the covered elements, solid material."""
        return self._vm(self.stresses(u))

    def _eta(self, rho):
        """The relaxation rho^q."""
        return rho if self.q == 1.0 else np.maximum(rho, 0.0) ** self.q

    def _deta(self, rho):
        return np.ones_like(rho) if self.q == 1.0 else self.q * np.maximum(rho, 0.0) ** (self.q - 1.0)

    def _parts(self, u, p):
        """(n_rho, rho, sig, vm, y, agg): y the aggregated values (s + 1 or r), agg their P-mean or P-norm."""
        rho_all = np.asarray(p if self.map is None else self.map.forward(p), dtype=np.float64)
        rho = rho_all[self.elements]
        sig = self.stresses(u)
        vm = self._vm(sig)
        if self.form == "unified":
            y = self._eta(rho) * (vm / self.sigma_max - 1.0) + 1.0
            if np.any(y <= 0):  # rho <= 1 keeps y = 1 - rho + rho vm / sigma_max > 0
                raise ValueError("the relaxed stress s_e = rho_e (vm_e / sigma_max - 1) fell to -1 or below: "
                                 "densities above 1 (a map that overshoots?)")
            agg = float(np.mean(y**self.P)) ** (1.0 / self.P)
        else:
            y = self._eta(rho) * vm / self.sigma_max
            if np.any(y < 0):
                raise ValueError("a relaxed stress rho_e vm_e / sigma_max is negative: negative densities (a map "
                                 "that undershoots?)")
            top = float(np.max(y, initial=0.0))
            # scaled by the largest value: no overflow of y^P
            agg = 0.0 if top == 0 else top * float(np.sum((y / top) ** self.P)) ** (1.0 / self.P)
        return rho_all.size, rho, sig, vm, y, agg

    def value(self, u, p):
        *_, agg = self._parts(u, p)
        return agg - 1.0

    def peak(self, u, p) -> float:
        """The largest of the aggregated values: max (s_e + 1) (unified) or max r_e (pnorm); <= 1 when every
        relaxed stress is within sigma_max. :class:`~adjopt.optimize.AdaptiveNormalization` scales the
        P-norm towards it."""
        *_, y, _ = self._parts(u, p)
        return float(np.max(y, initial=0.0))

    def _dG_dy(self, y, agg):
        if agg == 0:
            return np.zeros_like(y)
        if self.form == "unified":
            return agg ** (1.0 - self.P) * y ** (self.P - 1.0) / y.size
        return (y / agg) ** (self.P - 1.0)

    def grad_u(self, u, p):
        _, rho, sig, vm, y, agg = self._parts(u, p)
        w = self._dG_dy(y, agg) * self._eta(rho) / self.sigma_max  # dG/d(vm_e), both forms
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(vm > 0, w / vm, 0.0)  # d vm / d sigma = VM sigma / vm (0 at a stress-free element)
        local = (w[:, None] * (sig @ self.VM)) @ self.S  # (E, 8) or (E, 24)
        keep = self.conn >= 0
        return np.bincount(self.conn[keep], weights=local[keep], minlength=self.n_state)

    def grad_p(self, u, p):
        n_rho, rho, _, vm, y, agg = self._parts(u, p)
        g_rho = np.zeros(n_rho)
        dy_drho = self._deta(rho) * (vm / self.sigma_max - (1.0 if self.form == "unified" else 0.0))
        g_rho[self.elements] = self._dG_dy(y, agg) * dy_drho
        return g_rho if self.map is None else self.map.vjp(p, g_rho)

    def __repr__(self):
        return (f"StressAggregate(form={self.form!r}, sigma_max={self.sigma_max:g}, P={self.P:g}, "
                f"elements={self.elements.size})")


def build(case: str = "cantilever", nelx: int | None = None, nely: int | None = None, sigma_max: float | None = None,
          P: float = 10.0, rmin: float = 2.0, emin: float = 1e-9, start: float = 1.0,
          compliance_max: float | None = None,
          load_width: int = 3, plane: str = "strain", shear_scale: float = 1.0, solver=None, nelz: int | None = None,
          normalization: str | None = None, alpha: float = 0.5, q: float | None = None, passive_void=None,
          passive_solid=None, symmetry: str = "none") -> adjopt.Problem:
    """The stress-constrained problem as an :class:`adjopt.Problem`.

    Parameters
    ----------
    case
        ``"cantilever"`` (pyMOTO's example, 50 x 100) or ``"lbracket"`` (100 x 100).
    nelx, nely
        Elements along x and y (None: the case's default).
    sigma_max, P
        The allowed von Mises stress (None: 0.4 for the cantilever, 0.8 for
        the L-bracket) and the aggregation exponent (10). The aggregate is a
        P-mean over the elements: it holds the stresses down on average, and
        single elements (the re-entrant corner) may exceed sigma_max unless
        the normalization adapts; every history entry records the largest
        relaxed stress (``max_vm``).
    rmin, emin
        Filter radius in elements (2) and the relative void stiffness (1e-9).
    start
        The uniform starting design (1: all solid).
    compliance_max
        The bound on f^T u; ``0`` for none. None: 20 for the cantilever
        (pyMOTO's), none for the L-bracket (whose all-solid start has a
        compliance of about 100: a bound of 20 would be infeasible there).
    load_width
        L-bracket: element columns the load spreads over (3).
    plane
        ``"strain"`` (pyMOTO's) or ``"stress"`` (2D only; 3D is 3D elasticity).
    shear_scale
        Multiplies the shear stress in the von Mises measure (1: the true
        stress). pyMOTO 2.0.1's ``Stress`` doubles the shear strain of a B
        that already has engineering shear, so its shear stress is twice the
        true one: ``shear_scale=2`` reproduces its numbers.
    solver
        The solver (default ``"auto"``).
    nelz
        None (2D) or the elements along z: the case extruded to an
        nelx x nely x nelz block of unit hexahedra (3D stresses and von
        Mises measure; the clamped edge a clamped face, the loads spread
        along z with trapezoidal weights, the same totals).
    normalization
        ``"fixed"`` (the cantilever's default): the unified P-mean of
        Verbart et al. bounded as it is, pyMOTO's formulation. ``"adaptive"``
        (the L-bracket's default): the P-norm of the relaxed stress ratios
        rho_e vm_e / sigma_max, scaled after every design iteration towards
        their largest value (Le et al. 2010,
        :class:`~adjopt.optimize.AdaptiveNormalization`), so that the bound
        holds for the peak relaxed stress without tuning P or sigma_max; the
        history records the factor (``normalization``).
    alpha
        The adaptive normalization's damping (0.5).
    q
        The relaxation exponent: the density multiplies the stress as
        rho_e^q (None: 1, as above). q > 1 is the qp-relaxation of Bruggi
        (2008); on the adaptive L-bracket q = 2.5 collapsed into a grey,
        overstressed design (the relaxed stress of a grey element grows as
        its density falls), so 1 is the default.
    passive_void, passive_solid
        Elements fixed at density 0 and 1 (indices, a boolean mask over the
        elements, one index, or a string of indices and ranges such as
        ``"0:3,7"``); the voids are added to the L-bracket's own. Disjoint
        (also from the L-bracket's voids) and not every element. They are
        not parameters (p holds the other elements in increasing order) and
        their density is exactly 0 or 1 after the filter. The stress
        aggregate covers every element but the voids: a passive solid carries
        stress. The volume counts the passive solids.
    symmetry
        ``"none"``, or the axes the design is mirrored about the middle of
        the domain (``"x"``, ``"y"``, ``"xy"``; ``"z"`` too in 3D): p holds one
        value per orbit of mirror images (its first element), and the passive
        sets must be their own mirror images (the L-bracket's void is not
        mirror-symmetric: it takes ``"none"`` only, or ``"z"`` in 3D). A
        design restriction, not a reduction of a symmetric problem: the
        cantilever's load at node row ``nely // 2`` is the mirror image in y
        of its own reversal (the same von Mises stresses and compliance) only
        for an even ``nely``; its supports are not symmetric in x.

    Returns
    -------
    adjopt.Problem
        ``functional``: the volume fraction (mean of rho, a :class:`~adjopt.ParameterFunctional`);
        constraints ``[(stress, 0.0), (compliance, compliance_max)]``, the stress an
        :class:`~adjopt.optimize.AdaptiveNormalization` (also the problem's ``continuation``) when adaptive;
        ``meta["stress"]`` (the :class:`StressAggregate`), ``meta["stress_functional"]`` (its reduced
        functional, not normalized), ``meta["design"]`` (the elements p holds), ``meta["passive_void"]``
        (the L-bracket's and the given voids), ``meta["passive_solid"]``, ``meta["covered"]`` (the elements
        the stress aggregate covers), ``meta["parameter_cells"]`` (p -> the parameters on every element, NaN
        on passive ones; None without passive elements and symmetry). ``mass`` is the cell volume times the
        orbit size of each parameter.
    """
    if case not in ("cantilever", "lbracket"):
        raise ValueError(f"case must be 'cantilever' or 'lbracket', got {case!r}")
    dx, dy = (50, 100) if case == "cantilever" else (100, 100)
    nelx = _tc._count(dx if nelx is None else nelx, "nelx")
    nely = _tc._count(dy if nely is None else nely, "nely")
    if nelz is not None:
        nelz = _tc._count(nelz, "nelz", "number of elements along z; None for the 2D problem")
    sigma_max = _tc._positive((0.4 if case == "cantilever" else 0.8) if sigma_max is None else sigma_max,
                              "sigma_max")
    rmin = _tc._positive(rmin, "rmin (filter radius in element units)")
    emin = float(emin)
    if not 0.0 < emin < 1.0:
        raise ValueError(f"emin must satisfy 0 < emin < 1, got {emin!r}")
    start = float(start)
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be in (0, 1], got {start!r}")
    if compliance_max is None:
        compliance_max = 20.0 if case == "cantilever" else 0.0
    compliance_max = float(compliance_max)
    if not (np.isfinite(compliance_max) and compliance_max >= 0):
        raise ValueError(f"compliance_max must be >= 0 (0: no compliance bound), got {compliance_max!r}")
    if plane not in ("strain", "stress"):
        raise ValueError(f"plane must be 'strain' or 'stress', got {plane!r}")
    load_width = _tc._count(load_width, "load_width", "element columns the load spreads over")
    if normalization is None:
        normalization = "fixed" if case == "cantilever" else "adaptive"
    if normalization not in ("fixed", "adaptive"):
        raise ValueError(f"normalization must be 'fixed' or 'adaptive', got {normalization!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha (the normalization's damping) must be a number in (0, 1], got {alpha!r}")
    q = 1.0 if q is None else q
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (np.isfinite(q) and q >= 1.0):
        raise ValueError(f"q (the relaxation exponent) must be a number >= 1, got {q!r}")

    dim = 2 if nelz is None else 3
    if dim == 2:
        mesh = rectangle(nelx, nely, float(nelx), float(nely), cell="quad")
        unit = rectangle(1, 1, 1.0, 1.0, cell="quad")
        layers = [None]
        weights = np.ones(1)
    else:
        mesh = box(nelx, nely, nelz, float(nelx), float(nely), float(nelz), cell="hexahedron")
        unit = box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron")
        layers = [float(z) for z in range(nelz + 1)]
        weights = np.full(nelz + 1, 1.0 / nelz)  # trapezoidal: a line load of total 1 along z
        weights[[0, -1]] *= 0.5

    def at(x, y):
        """The nodes at (x, y): one in 2D, the line along z in 3D (its weights: ``weights``)."""
        pts = [(x, y) if z is None else (x, y, z) for z in layers]
        return _tc._nodes_at(mesh, pts)

    n_dofs, n = dim * mesh.n_nodes, mesh.n_cells
    c = mesh.cell_centers()
    void = np.zeros(0, dtype=np.int64)
    if case == "cantilever":
        fixed = fem.boundary_dofs(mesh, "left", components=list(range(dim)))
        load = fem.point_load(n_dofs, dim * at(nelx, float(nely // 2)) + 1, weights)
    else:
        if nelx < 5 or nely < 5:
            raise ValueError(f"the L-bracket needs at least 5 x 5 elements, got {nelx} x {nely}")
        cx, cy = 0.4 * nelx, 0.4 * nely  # the corner: x > 0.4 nelx and y > 0.4 nely is void
        void = np.flatnonzero((c[:, 0] > cx) & (c[:, 1] > cy))
        top = np.flatnonzero((np.abs(mesh.points[:, 1] - nely) < 1e-9) & (mesh.points[:, 0] <= cx + 1e-9))
        fixed = np.unique((dim * top[:, None] + np.arange(dim)).ravel())
        ycut = float(np.floor(cy))
        cols = np.flatnonzero((np.abs(mesh.points[:, 1] - ycut) < 1e-9)
                              & (mesh.points[:, 0] >= nelx - load_width - 1e-9))
        if dim == 2:
            w = np.full(cols.size, 1.0 / cols.size)
        else:  # each column's line along z carries 1/ncols with trapezoidal weights
            ncols = np.unique(np.round(mesh.points[cols, 0])).size
            w = weights[np.round(mesh.points[cols, 2]).astype(np.int64)] / ncols
        load = fem.point_load(n_dofs, dim * cols + 1, -w)
    KE = fem.q1_elasticity(unit, E=1.0, nu=NU, plane=plane)[0]
    shear_scale = _tc._positive(shear_scale, "shear_scale")
    S = centre_stress_matrix(unit, 1.0, NU, plane, shear_scale)
    dofmap = fem.condense(n_dofs, fixed)
    conn = dofmap.restrict(fem.vector_dofs(mesh.cells, dim))
    A = adjopt.ElementCoefficientMatrix(conn, KE, adjopt.SIMP(q=3.0, e0=1.0, emin=emin), n=dofmap.n_free)
    if solver is None or (isinstance(solver, str) and solver.lower() in ("gmg", "auto")):
        from adjopt.solvers import structured_solver

        solver = structured_solver((nelx, nely) if dim == 2 else (nelx, nely, nelz), dim, dofmap.fixed, solver)
    b = dofmap.restrict_vector(load)
    grid = (nelx, nely) if dim == 2 else (nelx, nely, nelz)
    passive = _tc.passive_design(mesh, grid, passive_void, passive_solid, symmetry, own_void=void,
                                 own_name=f"the case {case!r}")
    void, solid, design = passive["void"], passive["solid"], passive["design"]
    fmap = DensityFilter(c, rmin)
    # p -> [passive values, mirror images] -> filter -> [passive values again]; the filter alone without them
    index = np.concatenate([void, solid])
    values = np.concatenate([np.zeros(void.size), np.ones(solid.size)])
    pins = [FixedEntries(n, index, values, reduced=False)] if index.size else []
    pmap = compose(*passive["maps"], fmap, *pins)
    covered = np.setdiff1d(np.arange(n), void)  # a passive void carries no stress, a passive solid does
    stress = StressAggregate(conn, S, sigma_max, P, parameter_map=pmap, elements=covered,
                             form="unified" if normalization == "fixed" else "pnorm", q=q)
    # the objective gets p and applies the map itself (its rho is the relaxation's density)
    G = adjopt.ReducedFunctional(A, b, stress, parameter_map=pmap, solver=solver)
    constraint, continuation = G, None
    if normalization == "adaptive":
        constraint = continuation = AdaptiveNormalization(G, lambda p: stress.peak(G.state(p), p), alpha=alpha)
    volumes = mesh.cell_volumes()
    volume = adjopt.ParameterFunctional(adjopt.Volume(volumes, parameter_map=pmap), design.size)
    cons = [(constraint, 0.0)]
    if compliance_max > 0:
        C = G.with_objective(adjopt.Compliance(b))  # the same states: one factorization per design for both
        cons.append((C, compliance_max))

    def monitor(p):
        rho = pmap.forward(p)
        vm = stress.von_mises(G.state(p))
        return {"grey": grey_level(rho), "max_vm": float(np.max(stress._eta(rho[covered]) * vm))}

    size = f"{nelx}x{nely}" + ("" if nelz is None else f"x{nelz}")
    # the options fingerprint the given passive voids only: the L-bracket's own follow from nelx and nely, so a
    # default run keeps passive_void None (and its checkpoints)
    meta = {"case": case, "mesh": mesh, "nelx": nelx, "nely": nely, "nelz": nelz, "filter": pmap,
            "dofmap": dofmap, "dofs": dofmap, "load": load, "stress": stress, "stress_functional": G,
            "passive_void": void, "passive_solid": solid, "design": design, "covered": covered,
            "parameter_cells": passive["field"],
            "options": dict(case=case, nelx=nelx, nely=nely, sigma_max=sigma_max, P=P, rmin=rmin,
                            emin=emin, start=start, compliance_max=compliance_max, load_width=load_width,
                            plane=plane, shear_scale=shear_scale)}
    # the options added since the first version enter only where they make another problem, so that a
    # checkpoint of the same problem from before them still resumes
    added = dict(nelz=nelz, normalization=None if normalization == "fixed" else normalization,
                 alpha=alpha if normalization == "adaptive" else None, q=None if q == 1.0 else q,
                 passive_void=_tc._fingerprint(_tc._elements(passive_void, n, "passive_void")),
                 passive_solid=_tc._fingerprint(solid), symmetry=passive["symmetry"] or None)
    meta["options"].update({k: v for k, v in added.items() if v is not None})
    return adjopt.Problem(volume, np.full(design.size, start), bounds=(0.0, 1.0),
                          constraints=cons, name=f"topology_stress_{case}_{size}", meta=meta,
                          mass=volumes[design] * passive["weights"], monitor=monitor, continuation=continuation)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", nargs="?", default="cantilever", choices=("cantilever", "lbracket"))
    args = ap.parse_args(argv)
    problem = build(args.case, 20, 40) if args.case == "cantilever" else build(args.case, 30, 30)
    G = problem.constraints[0][0]
    p = np.clip(problem.p0 - 0.3 * np.abs(np.sin(np.arange(problem.p0.size))), 0.1, 1.0)
    print(f"{problem.name}: G(p) = {G.value(p):.10g}")
    print(taylor_test(G, p, order=2).table())


if __name__ == "__main__":
    main()
