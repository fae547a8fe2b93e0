"""Robust minimum compliance: eroded, intermediate and dilated designs from one field (Wang, Lazarov, Sigmund 2011).

    rho_k = P_eta_k(H p),  eta_k = 0.5 + delta, 0.5, 0.5 - delta   (eroded, intermediate, dilated)

with H the density filter and P_eta the smoothed Heaviside projection of
threshold eta (one beta for all three, raised by continuation). The
manufacturing error of a design is modelled by the three thresholds: a design
that is stiff when eroded is stiff whatever the error.

``formulation="minmax"`` (default)
    min over p of max_k c_k(p) / c_k(p0), by MMA in the bound formulation
    (:func:`adjopt.optimize.minmax_problem`: parameters (p, z), constraints
    c_k / c_k(p0) - z <= 0), with the volume constraint on the intermediate
    (``volume_on="intermediate"``) or the dilated design.
``formulation="eroded"``
    min c_eroded (for compliance the eroded design is the worst case: pyMOTO's
    ``ex_compliance_robust.py`` formulation), volume on the intermediate design.

The case is pyMOTO's: a cantilever of nelx x nely unit Q1 plane-strain
elements (100 x 40, E = 1, nu = 0.3, emin = 1e-5, penal 3), the left edge
clamped, a unit transverse force at the middle of the right edge, filter
radius 5 with void outside the domain away from the support, delta = 0.1,
volume fraction 0.5 from a uniform 0.5. Each design
has its own reduced functional (its own factorization or multigrid cycle),
all three on the same matrix pattern, the same solver object and the same
filter. Every history entry records beta and the grey level of the
intermediate design.

``passive_void`` / ``passive_solid`` (element indices, a boolean mask or a
string such as ``"0:3,7"``) fix elements at 0 and 1 as in
:func:`topology_compliance.build`: they are not parameters, and all three
designs hold them at exactly 0 and 1 (the same sets in each). ``symmetry``
(``"x"``, ``"y"``, ``"xy"``, and ``"z"`` in 3D) ties mirror images to one
parameter. The maps are then p -> passive values -> mirror images -> filter
-> projection_k -> passive values again; without either option they are
filter -> projection_k as before.

Run ``python problems/topology_robust.py`` to print the three compliances at
p0 and the Taylor tables of the eroded one.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import adjopt
from adjopt import fem
from adjopt.maps import Compose, DensityFilter, FixedEntries, HeavisideProjection, compose
from adjopt.mesh import rectangle
from adjopt.optimize import BetaContinuation, BetaSchedule, grey_level, minmax_problem
from adjopt.verify import derivative_report

if __package__:  # imported as problems.topology_robust
    from . import topology_compliance as _tc
else:  # a script, or loaded by file path (adjopt run): problems/ is (or is put) on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import topology_compliance as _tc

NU = 0.3
DESIGNS = ("eroded", "intermediate", "dilated")

#: how ``adjopt run topology_robust`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="mma", move=0.1, xtol=0.01, gtol=0.0, maxiter=300)


def build(nelx: int = 100, nely: int = 40, volfrac: float = 0.5, penal: float = 3.0, rmin: float = 5.0,
          emin: float = 1e-5, delta: float = 0.1, beta: float = 1.0, beta_max: float = 32.0, beta_every: int = 40,
          formulation: str = "minmax", volume_on: str = "intermediate", plane: str = "strain",
          pad_filter: bool = True, continuation: str = "double", case: str = "cantilever",
          solver=None, nelz: int | None = None, passive_void=None, passive_solid=None,
          symmetry: str = "none") -> adjopt.Problem:
    """The robust cantilever as an :class:`adjopt.Problem`.

    Parameters
    ----------
    nelx, nely
        Elements along x and y (100 x 40).
    volfrac
        Volume fraction bound and the uniform start (0.5).
    penal, rmin, emin
        SIMP exponent, filter radius in elements, relative void stiffness.
    delta
        The threshold offset: eroded 0.5 + delta, dilated 0.5 - delta
        (0.1; in (0, 0.5)).
    beta, beta_max, beta_every
        The projections' beta and its continuation (doubled every
        ``beta_every`` iterations or when the run converges, up to
        ``beta_max``).
    formulation
        ``"minmax"`` or ``"eroded"`` (see the module).
    volume_on
        ``"intermediate"`` or ``"dilated"``: the design the volume bound holds for.
    plane
        ``"strain"`` (pyMOTO's) or ``"stress"``.
    pad_filter
        Void outside the domain for the filter (rows divided by the largest
        row sum, :class:`~adjopt.maps.DensityFilter` ``void_outside``) except
        in the first ``int(rmin) + 1`` columns at the clamped edge: pyMOTO's
        setting (True). False: every row divided by its own sum.
    continuation
        ``"double"``: :class:`~adjopt.optimize.BetaContinuation` (beta doubled
        every ``beta_every`` iterations or at convergence, up to
        ``beta_max``); ``"pymoto"``: the schedule of pyMOTO's example,
        :class:`~adjopt.optimize.BetaSchedule` with ``beta`` for the first 15
        iterations, then ``beta + (beta_max - beta) / 80 (5 floor((k - 1) / 5)
        - 10)`` (a step every 5 iterations, beta_max from iteration 91; pyMOTO
        uses beta = 1e-3, beta_max = 40).
    case
        ``"cantilever"`` (pyMOTO's, above) or ``"mbb"``: the half MBB beam of
        :func:`topology_compliance.build` (symmetry on the left edge, a roller
        at the bottom-right corner, a unit downward load at the top-left
        node).
    solver
        As for :func:`topology_compliance.build` (``"auto"``: multigrid on
        larger grids, else a factorization); one solver object for the three.
    nelz
        None (2D) or the elements along z: the 3D cantilever or half MBB
        beam of :func:`topology_compliance.build` (cases ``"cantilever3d"``,
        ``"mbb3d"``: unit hexahedra, a unit line load along z), with the
        same three projections, filter and formulations; ``plane`` does not
        apply.
    passive_void, passive_solid
        Elements fixed at density 0 and 1 (indices, a boolean mask over the
        elements, one index, or a string of indices and ranges such as
        ``"0:3,7"``); disjoint, not every element, and the solids must not
        fill more than ``volfrac``. They are not parameters (p holds the other
        elements in increasing order), and their physical density is exactly
        0 or 1 in all three designs (pinned after each projection). The volume
        bound counts the passive solids.
    symmetry
        ``"none"``, or the axes the design is mirrored about the middle of
        the domain (``"x"``, ``"y"``, ``"xy"``; ``"z"`` too in 3D): p holds one
        value per orbit of mirror images (its first element), and the passive
        sets must be their own mirror images. A design restriction: the
        cantilever's load at node row ``nely // 2`` is mirror-symmetric in y
        up to its sign only for an even ``nely``, and the padded filter
        (``pad_filter``, not at the clamped edge) is not symmetric in x, so
        with ``"x"`` only p, not the physical density, is symmetric.

    Returns
    -------
    adjopt.Problem
        For ``"minmax"`` the parameters are (p, z); ``meta["functionals"]``
        holds the three reduced functionals of p by design name,
        ``meta["designs"]`` the maps p -> physical density,
        ``meta["design"]`` the elements p holds, ``meta["passive_void"]`` and
        ``meta["passive_solid"]`` the passive sets, ``meta["parameter_cells"]``
        (p -> the parameters on every element, NaN on passive ones; None
        without passive sets and symmetry). ``mass`` is the cell volume times
        the orbit size of each parameter.
    """
    nelx = _tc._count(nelx, "nelx")
    nely = _tc._count(nely, "nely")
    if nelz is not None:
        nelz = _tc._count(nelz, "nelz", "number of elements along z; None for the 2D problem")
    volfrac, penal, rmin, emin = _tc.check_material(volfrac, penal, rmin, emin)
    delta = float(delta)
    if not 0.0 < delta < 0.5:
        raise ValueError(f"delta (threshold offset) must be in (0, 0.5), got {delta!r}")
    beta, _, beta_max, beta_every = _tc.check_projection(True, beta, 0.5, beta_max, beta_every)
    if formulation not in ("minmax", "eroded"):
        raise ValueError(f"formulation must be 'minmax' or 'eroded', got {formulation!r}")
    if volume_on not in ("intermediate", "dilated"):
        raise ValueError(f"volume_on must be 'intermediate' or 'dilated', got {volume_on!r}")
    if plane not in ("strain", "stress"):
        raise ValueError(f"plane must be 'strain' or 'stress', got {plane!r}")
    if not isinstance(pad_filter, (bool, np.bool_)):
        raise ValueError(f"pad_filter must be True or False, got {pad_filter!r}")
    if case not in ("cantilever", "mbb"):
        raise ValueError(f"case must be 'cantilever' or 'mbb', got {case!r}")
    if continuation not in ("double", "pymoto"):
        raise ValueError(f"continuation must be 'double' or 'pymoto', got {continuation!r}")

    dim = 2 if nelz is None else 3
    if nelz is not None:  # the 3D cases of topology_compliance: "cantilever3d" and "mbb3d"
        mesh, fixed, load, unit = (_tc._mbb3d if case == "mbb" else _tc._cantilever3d)(nelx, nely, nelz)
    elif case == "mbb":
        mesh, fixed, load, unit = _tc._mbb(nelx, nely)
    else:
        mesh = rectangle(nelx, nely, float(nelx), float(nely), cell="quad")
        fixed = fem.boundary_dofs(mesh, "left", components=[0, 1])
        tip = _tc._node_at(mesh, (nelx, float(nely // 2)))
        load = fem.point_load(2 * mesh.n_nodes, [2 * tip + 1], 1.0)
        unit = rectangle(1, 1, 1.0, 1.0, cell="quad")
    n_dofs = dim * mesh.n_nodes
    KE = fem.q1_elasticity(unit, E=1.0, nu=NU, plane=plane)[0]
    dofmap = fem.condense(n_dofs, fixed)
    conn = dofmap.restrict(fem.vector_dofs(mesh.cells, dim))
    A = adjopt.ElementCoefficientMatrix(conn, KE, adjopt.SIMP(q=penal, e0=1.0, emin=emin), n=dofmap.n_free)
    del conn
    if solver is None or (isinstance(solver, str) and solver.lower() in ("gmg", "auto")):
        from adjopt.solvers import structured_solver

        solver = structured_solver((nelx, nely) if nelz is None else (nelx, nely, nelz), dim, dofmap.fixed, solver)
    b = dofmap.restrict_vector(load)
    n = mesh.n_cells
    grid = (nelx, nely) if nelz is None else (nelx, nely, nelz)
    passive = _tc.passive_design(mesh, grid, passive_void, passive_solid, symmetry, volfrac)
    void, solid, design = passive["void"], passive["solid"], passive["design"]
    m = design.size
    centers = mesh.cell_centers()
    fmap = DensityFilter(centers, rmin, void_outside=centers[:, 0] > int(rmin) + 1 if pad_filter else None)
    etas = {"eroded": 0.5 + delta, "intermediate": 0.5, "dilated": 0.5 - delta}
    projections = {k: HeavisideProjection(n, beta=beta, eta=eta) for k, eta in etas.items()}
    # p -> [passive values, mirror images] -> filter -> projection -> [passive values again]: the same passive
    # sets at exactly 0 / 1 in all three designs; without passive sets and symmetry filter -> projection alone
    index = np.concatenate([void, solid])
    pins = [FixedEntries(n, index, np.concatenate([np.zeros(void.size), np.ones(solid.size)]), reduced=False)] \
        if index.size else []
    maps = {k: compose(*passive["maps"], fmap, projections[k], *pins) for k in DESIGNS}
    functionals = {k: adjopt.ReducedFunctional(A, b, adjopt.Compliance(b), parameter_map=maps[k], solver=solver)
                   for k in DESIGNS}
    volumes = mesh.cell_volumes()
    volume = adjopt.ParameterFunctional(adjopt.Volume(volumes, parameter_map=maps[volume_on]), m)
    if continuation == "pymoto":
        def schedule(k, b0=beta, b1=beta_max):
            return b0 if k <= 15 else float(np.clip(b0 + (b1 - b0) / 80 * (5 * ((k - 1) // 5) - 10), b0, b1))

        cont = BetaSchedule(list(projections.values()), schedule)
    else:
        cont = BetaContinuation(list(projections.values()), beta_max=max(beta_max, beta), every=beta_every)

    def monitor(p):
        out = {"grey": grey_level(maps["intermediate"].forward(p))}
        if formulation == "minmax":  # the compliances themselves (their states are cached at p by now)
            out.update({f"c_{k}": functionals[k].value(p) for k in DESIGNS})
        return out

    designs = {k: maps[k].forward for k in DESIGNS}
    meta = {"mesh": mesh, "nelx": nelx, "nely": nely, "nelz": nelz, "filter": maps["intermediate"],
            "density_filter": fmap, "projections": projections, "designs": designs, "functionals": functionals,
            "dofmap": dofmap, "dofs": dofmap, "load": load, "design": design, "passive_void": void,
            "passive_solid": solid, "parameter_cells": passive["field"],
            "options": dict(nelx=nelx, nely=nely, volfrac=volfrac, penal=penal, rmin=rmin, emin=emin, delta=delta,
                            beta=beta, beta_max=beta_max, beta_every=beta_every, formulation=formulation,
                            volume_on=volume_on, plane=plane, pad_filter=pad_filter, continuation=continuation,
                            case=case)}
    # the options added since the first version enter only where they make another problem, so that a
    # checkpoint of the same problem from before them still resumes
    added = dict(nelz=nelz, passive_void=_tc._fingerprint(void), passive_solid=_tc._fingerprint(solid),
                 symmetry=passive["symmetry"] or None)
    meta["options"].update({k: v for k, v in added.items() if v is not None})
    name = f"topology_robust_{case}_{formulation}_{nelx}x{nely}" + ("" if nelz is None else f"x{nelz}")
    p0 = np.full(m, volfrac)
    mass = volumes[design] * passive["weights"]  # a parameter weighs its orbit's cells
    if formulation == "eroded":
        return adjopt.Problem(functionals["eroded"], p0, bounds=(0.0, 1.0), constraints=[(volume, volfrac)],
                              name=name, meta=meta, mass=mass, continuation=cont, monitor=monitor)
    meta["parameter_view"] = lambda xz: np.asarray(xz)[:m]
    return minmax_problem([functionals[k] for k in DESIGNS], p0, (0.0, 1.0), constraints=[(volume, volfrac)],
                          name=name, meta=meta, mass=mass, continuation=cont, monitor=monitor,
                          fields_from=functionals["intermediate"])


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nelx", type=int, default=30)
    ap.add_argument("--nely", type=int, default=12)
    args = ap.parse_args(argv)
    problem = build(args.nelx, args.nely, rmin=2.0, beta=4.0)
    p = np.full(args.nelx * args.nely, 0.5)
    for k, J in problem.meta["functionals"].items():
        print(f"compliance of the {k} design at p0: {J.value(p):.10g}")
    print(derivative_report(problem.meta["functionals"]["eroded"], p))


if __name__ == "__main__":
    main()
