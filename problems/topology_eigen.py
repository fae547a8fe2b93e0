"""Eigenfrequency design: maximize the lowest eigenfrequencies of a clamped plate carrying a solid mass.

    minimize    J(p) = sum_{i <= k} 1 / lambda_i(p)      (k = 3: the harmonic mean of the three lowest)
    subject to  K(rho) phi = lambda M(rho) phi,  rho = pin(H p)
                mean(rho) <= volfrac,  0 <= p <= 1

pyMOTO's ``ex_eigenfrequency.py`` (Du and Olhoff 2007), the same settings by
default: nelx x nely unit Q1 plane-strain elements (50 x 30), aluminium
(E = 68.9e9, nu = 0.3, density 2700), the left edge clamped, and a solid
non-design block (x index from 3 nelx / 4, y index from nely / 4 to below
3 nely / 4) set to density 1 after the density filter (radius 2): a mass the
structure must carry. K(rho) = E (emin + (1 - emin) rho^3) K_e, and the mass
interpolation of Du and Olhoff against spurious modes of nearly void regions:
M(rho) = density m(rho) M_e with m = rho for rho >= 0.1 and rho^6 / 0.1^5
below. J is an :class:`adjopt.eigen.EigenvalueFunctional`: ARPACK in
shift-invert about 0 on a factorization of K, derivatives
phi^T (dK - lambda dM) phi per eigenvalue, and a clear error where two of the
k + 1 lowest eigenvalues coincide.

3D (``build(nelz=k)``): the same plate extruded in z, nelx x nely x nelz unit
Q1 hexahedra (3D elasticity, 3 dofs per node, consistent mass), the left face
x = 0 clamped, the mass block a column through the whole thickness (the block's
elements in every z layer), the same density filter on the 3D cell centres
and the same interpolations (``plane`` plays no part). A plate thin in z has
out-of-plane bending modes: its lowest eigenvalues are far below those of
the 2D (in-plane) problem.

Passive elements and symmetry, as in ``topology_compliance``: ``passive_void``
and ``passive_solid`` (element indices, a mask, or a string such as ``"0:3,7"``
on the command line) are not design variables and their physical density is
exactly 0 or 1 after the filter; ``symmetry`` ("x", "y", "xy"; "z" in 3D) ties
each element's design value to its mirror images (p holds one per orbit).
rho = block(pin(H T(fix(p)))): the user's sets and the mirror images come
first (``topology_compliance.design_chain``), the mass block is set to 1 last,
as without them. The block is not tied: it is mirror-symmetric in y only when
nely is a multiple of 4, and never in x (nor is the clamped left edge), so
there the symmetry restricts the design without making the physical density
symmetric in the block's rows.

Run ``python problems/topology_eigen.py`` (``--nelz k`` for 3D) to print the
eigenvalues at p0 and a Taylor table of J.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import adjopt
from adjopt import fem
from adjopt.eigen import EigenvalueFunctional
from adjopt.maps import Compose, FixedEntries, compose
from adjopt.mesh import box, rectangle
from adjopt.operators.coefficients import Coefficient
from adjopt.optimize import grey_level
from adjopt.verify import taylor_test

if __package__:  # imported as problems.topology_eigen
    from . import topology_compliance as _tc
else:  # a script, or loaded by file path (adjopt run): problems/ is (or is put) on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import topology_compliance as _tc

NU = 0.3

#: how ``adjopt run topology_eigen`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="mma", move=0.1, xtol=0.01, gtol=0.0, maxiter=200)


class MassInterpolation(Coefficient):
    """m(x) = x for x >= threshold, x^6 / threshold^5 below (Du and Olhoff's two-range mass interpolation)."""

    def __init__(self, threshold: float = 0.1, power: float = 6.0):
        self.t, self.q = float(threshold), float(power)

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.where(x >= self.t, x, x**self.q / self.t ** (self.q - 1))

    def d1(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.where(x >= self.t, 1.0, self.q * x ** (self.q - 1) / self.t ** (self.q - 1))

    def d2(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.where(x >= self.t, 0.0, self.q * (self.q - 1) * x ** (self.q - 2) / self.t ** (self.q - 1))

    def __repr__(self):
        return f"MassInterpolation(threshold={self.t:g}, power={self.q:g})"


def build(nelx: int = 50, nely: int = 30, volfrac: float = 0.5, rmin: float = 2.0, young: float = 68.9e9,
          density: float = 2700.0, emin: float = 1e-9, k: int = 3, plane: str = "strain",
          solver="auto", nelz: int | None = None, passive_void=None, passive_solid=None,
          symmetry: str = "none") -> adjopt.Problem:
    """The eigenfrequency problem as an :class:`adjopt.Problem`.

    Parameters
    ----------
    nelx, nely
        Elements along x and y (50 x 30; at least 4 x 4 for the mass block).
    volfrac
        Volume fraction bound and the uniform start (0.5).
    rmin
        Density filter radius in elements (2).
    young, density
        Young's modulus and mass density of the solid (aluminium).
    emin
        Relative void stiffness (1e-9).
    k
        How many of the lowest eigenvalues enter J (3).
    plane
        ``"strain"`` (pyMOTO's) or ``"stress"``; validated but ignored in 3D
        (3D elasticity has no plane assumption).
    solver
        The solver that factorizes K for the shift-invert (a name or a
        :class:`~adjopt.solvers.LinearSolver`; ``"auto"``: a sparse
        factorization, in 2D and 3D alike; above 300 000 free dofs
        (``adjopt.solvers.auto.DIRECT_LIMIT``) it picks AMG, an iterative
        solve: pass ``"cholmod"`` or ``"superlu"`` there for an exact
        shift-invert).
    nelz
        ``None`` (the default): the 2D plate above. An integer >= 1: the 3D
        plate, nelx x nely x nelz unit hexahedra ``adjopt.mesh.box(nelx,
        nely, nelz, nelx, nely, nelz, cell="hexahedron")``, 3 dofs per node,
        the face x = 0 clamped, the mass block through all ``nelz`` layers.
    passive_void, passive_solid
        Elements fixed at density 0 and 1 (indices, a boolean mask over the
        elements, one index, or a string of indices and ranges such as
        ``"0:3,7"``; ``None``: none). They are not parameters (p holds the
        other elements in increasing order), and their physical density is
        exactly 0 / 1 after the filter. A passive void may not lie in the
        mass block; a passive solid there is allowed (its design value is
        then no parameter). Given passive solids, they and the block
        together must fit in ``volfrac`` (the block alone is not checked,
        as before).
    symmetry
        ``"none"`` (default), or the mirrored axes of the grid (``"x"``,
        ``"y"``, ``"xy"``; with ``"z"`` in 3D): p holds one design value per
        orbit of mirror images (:func:`topology_compliance.symmetry_orbits`);
        the passive sets must be their own mirror images. The mass block is
        set after the filter and not tied (see the module): it is symmetric
        in y only for nely a multiple of 4.

    Returns
    -------
    adjopt.Problem
        ``functional`` (an :class:`~adjopt.eigen.EigenvalueFunctional`; its
        ``state`` is the fundamental mode), p0 = volfrac on every design
        element (by default all elements: the block's design values still
        reach its neighbours through the filter, as in pyMOTO), the volume
        constraint, the grey-level monitor.
        Its name is ``topology_eigen_{nelx}x{nely}`` (2D) or
        ``topology_eigen_{nelx}x{nely}x{nelz}`` (3D); ``meta["nelz"]`` is
        ``nelz``. ``meta["filter"]`` is the whole map p -> physical density
        (the one of J, the volume and the monitor), ``meta["design"]`` the
        elements p holds (the first of each orbit with symmetry),
        ``meta["passive_void"]`` / ``meta["passive_solid"]`` the user's sets,
        ``meta["parameter_cells"]`` p -> design values on every element (NaN
        on passive ones; None without passive sets or symmetry). ``mass`` is
        the cell volume of each parameter times its orbit's size.
        ``meta["options"]`` holds ``passive_void`` / ``passive_solid``
        fingerprints and ``symmetry`` only when given (a checkpoint of other
        sets is refused; the defaults' options are those of before).

    Raises
    ------
    ValueError
        A count (nelx, nely, nelz) not an integer >= 1, fewer than 4 x 4
        elements in x and y, another option out of its range, an element
        both void and solid (or void in the mass block), indices out of
        range, every element passive, passive solids (with the mass block)
        above ``volfrac``, or passive sets not symmetric under ``symmetry``.
    """
    nelx = _tc._count(nelx, "nelx")
    nely = _tc._count(nely, "nely")
    if nelz is not None:
        nelz = _tc._count(nelz, "nelz", "number of elements through the thickness; None for the 2D plate")
    if nelx < 4 or nely < 4:
        raise ValueError(f"the mass block needs at least 4 x 4 elements, got {nelx} x {nely}")
    volfrac = float(volfrac)
    if not 0.0 < volfrac <= 1.0:
        raise ValueError(f"volfrac must be in (0, 1], got {volfrac!r}")
    rmin = _tc._positive(rmin, "rmin (filter radius in element units)")
    young = _tc._positive(young, "young (Young's modulus)")
    density = _tc._positive(density, "density")
    emin = float(emin)
    if not 0.0 < emin < 1.0:
        raise ValueError(f"emin must satisfy 0 < emin < 1 (K must stay positive definite), got {emin!r}")
    if plane not in ("strain", "stress"):
        raise ValueError(f"plane must be 'strain' or 'stress', got {plane!r}")
    sym = _tc.check_symmetry(symmetry, 2 if nelz is None else 3)

    if nelz is None:
        mesh = rectangle(nelx, nely, float(nelx), float(nely), cell="quad")
        dim = 2
        unit = rectangle(1, 1, 1.0, 1.0, cell="quad")
        KE = fem.q1_elasticity(unit, E=young, nu=NU, plane=plane)[0]
    else:  # the plate extruded in z: every element is a translate of the unit cube
        mesh = box(nelx, nely, nelz, float(nelx), float(nely), float(nelz), cell="hexahedron")
        dim = 3
        unit = box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron")
        KE = fem.q1_elasticity(unit, E=young, nu=NU)[0]  # 3D elasticity: no plane assumption
    fixed = fem.boundary_dofs(mesh, "left", components=list(range(dim)))  # the left edge / face clamped
    dofmap = fem.condense(dim * mesh.n_nodes, fixed)
    conn = dofmap.restrict(fem.vector_dofs(mesh.cells, dim))
    ME = np.kron(fem.q1_mass(unit, rho=density)[0], np.eye(dim))  # node-major vector dofs, as KE
    K = adjopt.ElementCoefficientMatrix(conn, KE, adjopt.SIMP(q=3.0, e0=1.0, emin=emin), n=dofmap.n_free)
    M = adjopt.ElementCoefficientMatrix(conn, ME, MassInterpolation(), n=dofmap.n_free)
    del conn
    n = mesh.n_cells
    # cells are numbered x fastest, then y (then z): the block is a column through every z layer
    i, j = np.arange(n) % nelx, (np.arange(n) // nelx) % nely
    block = np.flatnonzero((i >= 3 * nelx // 4) & (j >= nely // 4) & (j < nely * 3 // 4))
    grid = (nelx, nely) if nelz is None else (nelx, nely, nelz)
    void = _tc._elements(passive_void, n, "passive_void")
    solid = _tc._elements(passive_solid, n, "passive_solid")
    both = np.intersect1d(void, solid)
    if both.size:
        raise ValueError(f"element {int(both[0])} is both passive void and passive solid ({both.size} such); give "
                         "each passive element once")
    in_block = np.intersect1d(void, block)
    if in_block.size:
        raise ValueError(f"element {int(in_block[0])} is both passive void and in the solid mass block "
                         f"({in_block.size} such); the block is set to density 1 after the filter")
    if np.union1d(np.union1d(void, solid), block).size >= n:
        raise ValueError("every element is passive (passive_void, passive_solid and the mass block): nothing is left "
                         "to design")
    volumes = mesh.cell_volumes()  # Volume and the Problem keep their own copies
    if solid.size:  # exactly 1 after the filter, as the block: no design below their volume meets the bound
        solid_fraction = float(volumes[np.union1d(solid, block)].sum() / volumes.sum())
        if solid_fraction > volfrac:
            raise ValueError(f"the passive solid elements alone fill {solid_fraction:.4g} of the domain (with the mass "
                             f"block), more than volfrac = {volfrac:g}: no design meets the volume bound; raise "
                             "volfrac or fix fewer")
    # the user's sets and the mirror images, the filter, the user's sets pinned again (exact 0 / 1); then the block
    # set to 1 after the filter, as pyMOTO (without passive sets or symmetry: the filter and the block alone)
    chain = _tc.design_chain(mesh, rmin, True, False, 1.0, 0.5, void, solid, pin=True, grid=grid, symmetry=sym)
    design = chain["design"]
    head = chain["map"].maps if isinstance(chain["map"], Compose) else [chain["map"]]
    pmap = compose(*head, FixedEntries(n, block, 1.0, reduced=False))
    try:
        J = EigenvalueFunctional(K, M, k=k, parameter_map=pmap, solver=solver)
    except ValueError as exc:
        raise ValueError(f"k: {exc}") from None
    m = design.size
    volume = adjopt.ParameterFunctional(adjopt.Volume(volumes, parameter_map=pmap), m)

    def physical(p):
        return pmap.forward(p)

    def monitor(p):
        rho = pmap.forward(p)
        lam = J.eigenvalues(p)[:k]
        return {"grey": grey_level(rho), "f1_hz": float(np.sqrt(lam[0]) / (2 * np.pi))}

    options = dict(nelx=nelx, nely=nely, volfrac=volfrac, rmin=rmin, young=young, density=density,
                   emin=emin, k=k, plane=plane)
    if nelz is not None:  # 2D keeps the options (and checkpoints) it always had
        options["nelz"] = nelz
    # the passive sets and symmetry only when given: the defaults keep their options (and checkpoints) too
    extra = dict(passive_void=_tc._fingerprint(void), passive_solid=_tc._fingerprint(solid), symmetry=sym or None)
    options.update({key: v for key, v in extra.items() if v is not None})
    meta = {"mesh": mesh, "nelx": nelx, "nely": nely, "nelz": nelz, "filter": pmap, "density_filter": chain["filter"],
            "design_map": physical, "design": design, "parameter_cells": chain["field"], "passive_void": void,
            "passive_solid": solid, "block": block, "dofmap": dofmap, "dofs": dofmap,
            "labels": {"displacement": "fundamental mode"}, "options": options}
    name = f"topology_eigen_{nelx}x{nely}" + ("" if nelz is None else f"x{nelz}")
    return adjopt.Problem(J, np.full(m, volfrac), bounds=(0.0, 1.0), constraints=[(volume, volfrac)],
                          name=name, meta=meta, mass=volumes[design] * chain["weights"], monitor=monitor)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nelx", type=int, default=50)
    ap.add_argument("--nely", type=int, default=30)
    ap.add_argument("--nelz", type=int, default=None, help="elements through the thickness: the 3D plate")
    args = ap.parse_args(argv)
    problem = build(args.nelx, args.nely, nelz=args.nelz)
    J, p = problem.functional, problem.p0
    lam = J.eigenvalues(p)
    print(f"{problem.name}: eigenvalues at p0 {lam}, frequencies {np.sqrt(lam) / (2 * np.pi)} Hz")
    print(f"J(p0) = {J.value(p):.10g}")
    print(taylor_test(J, np.clip(p + 0.05 * np.sin(np.arange(p.size)), 0.2, 0.9), order=2).table())


if __name__ == "__main__":
    main()
