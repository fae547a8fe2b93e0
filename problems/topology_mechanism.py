"""Compliant mechanism: a displacement inverter with springs at the input and the output.

    minimize    J(p) = u_out(p) = l^T u(p)       (the output displacement; negative: inverted)
    subject to  (K(rho) + K_s) u = f,  rho = M(p)    (filter, optional projection, non-design solids)
                V(p) = mean(rho) <= volfrac,  0 <= p <= 1

The classic inverter of Bendsoe & Sigmund (2003, section 2.6), in the form of
pyMOTO's ``ex_compliant_mechanism_springs.py`` (the same settings by default):
nelx x nely unit Q1 plane-strain elements (E = ``young``, nu = 0.3), the upper
half of the inverter with its symmetry line on the left edge (x-dofs of the
left edge fixed) and the right edge clamped. A force ``f_in`` pushes the
input node (0, 0) in +y against a spring ``k_in``; the output node
(0, nely) is held by a spring ``k_out``, and J is its y-displacement: a
negative J moves the output against the input force. The ``nondesign`` x
``nondesign`` elements at the input and at the output are solid and not
design variables (their design value is 1 before the filter, as pyMOTO's
``SetValue``; the filter smooths them). K(rho) = sum_e young (emin + rho_e^penal
(1 - emin)) K_e, K_s = diag(k_in, k_out) on the two dofs.

In 3D (``nelz`` given) the inverter is extruded in z: nelx x nely x nelz unit
Q1 hexahedra (3D elasticity, E = ``young``, nu = 0.3; ``plane`` does not
apply), the x-dofs of the face x = 0 fixed (the symmetry plane), the face
x = nelx clamped, and the z-dofs of the face z = 0 fixed: a symmetry plane
in z, so the model is the half (in z) of a slab 2 nelz deep and has no rigid motion
in z. The input and the output are the node lines x = 0, y = 0 and x = 0,
y = nely along z: ``f_in``, ``k_in`` and ``k_out`` are per unit thickness,
as in the 2D case (whose elements are one unit thick), spread over the
nelz + 1 nodes of each line as a uniform line load (weights
w = (1/2, 1, ..., 1, 1/2), totals nelz times the 2D values), and J is the
weighted mean of the output line's y-displacements (l = w / nelz on the
line). The solid blocks are ``nondesign`` x ``nondesign`` x nelz columns,
and the density filter acts on the 3D cell centres. The solution varies
along z for nu > 0 (Poisson's ratio couples z to x and y and the face
z = nelz is free); with nu = 0 it is the 2D solution extruded, for any nelz,
and J and its gradient are those of 2D.

J is linear in u but not the compliance: the adjoint is a second solve with
the load l = e_out on the same factorization (the general adjoint path, not
the self-adjoint shortcut of the compliance problems).

Passive elements and symmetry, as in ``topology_compliance``:
``passive_void`` and ``passive_solid`` (element indices, a mask, or a string
such as ``"0:3,7"`` on the command line) are not design variables and their
physical density is exactly 0 or 1 after the filter and the projection (unlike
the ``nondesign`` blocks, which are 1 before the filter only, as in pyMOTO).
``symmetry`` ("x", "y", "xy"; "z" in 3D) ties each element to its mirror
images in the grid: p holds one value per orbit. The inverter's loads are not
mirror-symmetric (input at the bottom, output at the top; in 3D the face z = 0
is a symmetry plane and z = nelz free), so a symmetric design is a restriction
of the design space, not a model reduction.

Run ``python problems/topology_mechanism.py [--nelz k]`` to print J(p0),
|grad J(p0)| and the Taylor tables of orders 2 and 3.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt.maps import Compose, FixedEntries, compose
from adjopt.mesh import box, rectangle
from adjopt.optimize import BetaContinuation, grey_level
from adjopt.verify import derivative_report

if __package__:  # imported as problems.topology_mechanism
    from . import topology_compliance as _tc
else:  # a script, or loaded by file path (adjopt run): problems/ is (or is put) on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import topology_compliance as _tc

NU = 0.3

#: how ``adjopt run topology_mechanism`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="mma", move=0.1, xtol=0.01, gtol=0.0, maxiter=300)


def build(nelx: int = 80, nely: int = 80, volfrac: float = 0.3, penal: float = 3.0, rmin: float = 2.0,
          emin: float = 1e-6, young: float = 100.0, k_in: float = 5.0, k_out: float = 15.0, f_in: float = 1.0,
          nondesign: int = 4, solver=None, plane: str = "strain", projection: bool = False, beta: float = 1.0, eta: float = 0.5,
          beta_max: float = 32.0, beta_every: int = 50, nelz: int | None = None, passive_void=None,
          passive_solid=None, symmetry: str = "none") -> adjopt.Problem:
    """The inverter as an :class:`adjopt.Problem`.

    Parameters
    ----------
    nelx, nely
        Elements along x and y (80 x 80).
    nelz
        ``None`` (the default): the 2D inverter. An integer >= 1: the
        inverter extruded to nelx x nely x nelz unit hexahedra (see the
        module): the z-dofs of the face z = 0 fixed, ``f_in``, ``k_in`` and
        ``k_out`` per unit thickness, spread over the nelz + 1 nodes of the
        input and the output lines as a uniform line load, J the weighted
        mean y-displacement of the output line.
    volfrac
        Volume fraction bound in (0, 1] and the uniform start (0.3).
    penal, rmin, emin
        SIMP exponent (3), density filter radius in elements (2), relative
        void stiffness (1e-6).
    young
        Young's modulus of the solid (100).
    k_in, k_out
        Spring stiffnesses at the input and the output (5, 15; >= 0, and
        k_out > 0 for a well-posed output).
    f_in
        The input force (1, != 0).
    nondesign
        Side in elements of the solid squares at the input and the output
        (4; 0 for none); in 3D the solid blocks are ``nondesign`` x
        ``nondesign`` x nelz columns.
    solver
        A solver name or object; default ``"auto"`` (the fastest
        factorization installed), in 2D and 3D. Not ``"gmg"``: geometric
        multigrid takes no constant part of the matrix (the springs). For
        large 3D grids ``"amg"`` avoids the fill of a factorization.
    plane
        ``"strain"`` (pyMOTO's default, the reference's setting) or
        ``"stress"``; checked but ignored in 3D (3D elasticity has no plane
        assumption).
    projection, beta, eta, beta_max, beta_every
        A Heaviside projection after the filter with beta continuation, as in
        :func:`topology_compliance.build`.
    passive_void, passive_solid
        Elements fixed at density 0 and 1 (indices, a boolean mask over the
        elements, one index, or a string of indices and ranges such as
        ``"0:3,7"``; ``None``: none). They are not parameters, and their
        physical density is exactly 0 / 1 after the filter and the
        projection. The ``nondesign`` blocks stay as they are (1 before the
        filter only) and are passive solids too (a block element also in
        ``passive_solid`` is pinned after the filter as well); a passive
        void in a block is refused. Only ``passive_solid`` counts in the
        check against ``volfrac`` (the filter smooths the blocks).
    symmetry
        ``"none"`` (default), or the mirrored axes of the grid (``"x"``,
        ``"y"``, ``"xy"``; with ``"z"`` in 3D): p holds one value per orbit
        of mirror images (:func:`topology_compliance.symmetry_orbits`), and
        every passive set, the ``nondesign`` blocks included, must be its
        own mirror image. The loads are not symmetric (the input at the
        bottom, the output at the top; in 3D the face z = 0 is a symmetry
        plane), so this restricts the design and does not reduce the model:
        ``"y"`` is allowed, ``"x"`` needs ``nondesign=0`` or mirrored solids.

    Returns
    -------
    adjopt.Problem
        ``functional`` (u_out), ``p0 = volfrac`` on the design elements,
        bounds (0, 1), the volume constraint, the grey-level monitor, the
        continuation (with projection) and ``meta`` (mesh, nelx, nely, nelz
        (None in 2D), dofmap, load, the design elements, the maps, and
        ``input_dof`` / ``output_dof``: the y-dof of the input / output node
        in 2D (an int), the nelz + 1 y-dofs of the line in 3D, in z order).
        The name is ``topology_mechanism_{nelx}x{nely}``, with ``x{nelz}``
        appended in 3D. ``meta["design"]`` are the elements p holds (the
        first of each orbit with symmetry), ``meta["passive_void"]`` the
        user's voids, ``meta["passive_solid"]`` the ``nondesign`` blocks and
        the user's solids, ``meta["nondesign_solid"]`` the blocks alone,
        ``meta["parameter_cells"]`` (p -> design values on every element, NaN
        on passive ones; None without passive sets or symmetry). ``mass`` is
        the cell volume of each parameter times its orbit's size.
        ``meta["options"]`` holds ``passive_void`` / ``passive_solid``
        fingerprints and ``symmetry`` only when given (a checkpoint of other
        sets is refused; the defaults' options are those of before).

    Raises
    ------
    ValueError
        An option out of its range, an element both void and solid, indices
        out of range, every element passive, passive solids alone above
        ``volfrac``, or passive sets that are not symmetric under
        ``symmetry``.
    """
    nelx = _tc._count(nelx, "nelx")
    nely = _tc._count(nely, "nely")
    if nelz is not None:
        nelz = _tc._count(nelz, "nelz")
    volfrac, penal, rmin, emin = _tc.check_material(volfrac, penal, rmin, emin)
    young = _tc._positive(young, "young (Young's modulus)")
    k_in, k_out, f_in = float(k_in), float(k_out), float(f_in)
    if not (np.isfinite(k_in) and k_in >= 0):
        raise ValueError(f"k_in must be a finite stiffness >= 0, got {k_in!r}")
    if not (np.isfinite(k_out) and k_out > 0):
        raise ValueError(f"k_out must be a finite stiffness > 0 (the output needs a spring), got {k_out!r}")
    if not (np.isfinite(f_in) and f_in != 0):
        raise ValueError(f"f_in must be a finite nonzero force, got {f_in!r}")
    if isinstance(nondesign, bool) or not isinstance(nondesign, (int, np.integer)) or nondesign < 0:
        raise ValueError(f"nondesign must be an integer >= 0 (elements), got {nondesign!r}")
    if 2 * nondesign > nely or nondesign > nelx:
        raise ValueError(f"nondesign ({nondesign}) squares do not fit in {nelx} x {nely} elements")
    beta, eta, beta_max, beta_every = _tc.check_projection(projection, beta, eta, beta_max, beta_every)
    sym = _tc.check_symmetry(symmetry, 2 if nelz is None else 3)

    if nelz is None:
        mesh = rectangle(nelx, nely, float(nelx), float(nely), cell="quad")
        dim = 2
        n_dofs = 2 * mesh.n_nodes
        fixed = np.union1d(fem.boundary_dofs(mesh, "left", components=0),
                           fem.boundary_dofs(mesh, "right", components=[0, 1]))
        dofs_in = np.array([2 * _tc._node_at(mesh, (0.0, 0.0)) + 1])
        dofs_out = np.array([2 * _tc._node_at(mesh, (0.0, float(nely))) + 1])
    else:
        mesh = box(nelx, nely, nelz, float(nelx), float(nely), float(nelz), cell="hexahedron")
        dim = 3
        n_dofs = 3 * mesh.n_nodes
        back = np.flatnonzero(np.abs(mesh.points[:, 2]) < 1e-9)  # the face z = 0: a symmetry plane
        fixed = np.union1d(np.union1d(fem.boundary_dofs(mesh, "left", components=0),
                                      fem.boundary_dofs(mesh, "right", components=[0, 1, 2])), 3 * back + 2)
        line = np.arange(nelz + 1, dtype=float)
        dofs_in = 3 * _tc._nodes_at(mesh, [(0.0, 0.0, z) for z in line]) + 1
        dofs_out = 3 * _tc._nodes_at(mesh, [(0.0, float(nely), z) for z in line]) + 1
    # a uniform line load along z per unit thickness ([1] in 2D: every share below is the 2D value itself)
    w = np.ones(1) if nelz is None else np.r_[0.5, np.ones(nelz - 1), 0.5]
    load = fem.point_load(n_dofs, dofs_in, f_in * w)
    if plane not in ("strain", "stress"):
        raise ValueError(f"plane must be 'strain' or 'stress', got {plane!r}")
    if nelz is None:
        KE = fem.q1_elasticity(rectangle(1, 1, 1.0, 1.0, cell="quad"), E=young, nu=NU, plane=plane)[0]
    else:  # 3D elasticity: plane does not apply
        KE = fem.q1_elasticity(box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron"), E=young, nu=NU)[0]
    dofmap = fem.condense(n_dofs, fixed)
    conn = dofmap.restrict(fem.vector_dofs(mesh.cells, dim))
    free_of = np.full(n_dofs, -1)
    free_of[dofmap.free] = np.arange(dofmap.n_free)
    i_in, i_out = free_of[dofs_in], free_of[dofs_out]  # no support holds a y-dof at x = 0: all free
    at = np.concatenate([i_in, i_out])
    springs = sp.csr_array((np.concatenate([k_in * w, k_out * w]), (at, at)), shape=(dofmap.n_free,) * 2)
    A = adjopt.ElementCoefficientMatrix(conn, KE, adjopt.SIMP(q=penal, e0=1.0, emin=emin), n=dofmap.n_free,
                                        A0=springs)
    del conn
    if isinstance(solver, str) and solver.lower() == "gmg":
        raise ValueError("solver 'gmg' does not take the springs (a constant part A0 of the matrix); use a "
                         "factorization ('auto', 'superlu', 'cholmod', 'pardiso') or 'amg'")
    b = dofmap.restrict_vector(load)
    out = np.zeros(dofmap.n_free)
    out[i_out] = w / w.sum()  # the weighted mean y-displacement of the output line (in 2D: of the output node)

    c = mesh.cell_centers()
    block = np.flatnonzero((c[:, 0] < nondesign) & ((c[:, 1] < nondesign) | (c[:, 1] > nely - nondesign)))
    n = mesh.n_cells
    void = _tc._elements(passive_void, n, "passive_void")
    user_solid = _tc._elements(passive_solid, n, "passive_solid")
    solid = np.union1d(block, user_solid)
    both = np.intersect1d(void, solid)
    if both.size:
        where = "the nondesign blocks make it solid" if np.isin(both[0], block) else "passive_solid has it"
        raise ValueError(f"element {int(both[0])} is both passive void and passive solid ({both.size} such; {where}); "
                         "give each passive element once")
    if void.size + solid.size >= n:
        raise ValueError("every element is passive (passive_void, passive_solid and the nondesign blocks): nothing is "
                         "left to design")
    volumes = mesh.cell_volumes()
    solid_fraction = float(volumes[user_solid].sum() / volumes.sum())
    if solid_fraction > volfrac:
        raise ValueError(f"the passive solid elements alone fill {solid_fraction:.4g} of the domain, more than "
                         f"volfrac = {volfrac:g}: no design meets the volume bound; raise volfrac or fix fewer")
    grid = (nelx, nely) if nelz is None else (nelx, nely, nelz)
    # the nondesign blocks are 1 before the filter only (pin=False, pyMOTO's SetValue); the user's passive elements
    # are pinned again after the filter and the projection: exactly 0 / 1
    chain = _tc.design_chain(mesh, rmin, True, projection, beta, eta, void, solid, pin=False, grid=grid,
                             symmetry=sym)
    pmap, design, physical, monitor = chain["map"], chain["design"], chain["physical"], chain["monitor"]
    pinned = np.concatenate([void, user_solid])
    if pinned.size:
        maps = pmap.maps if isinstance(pmap, Compose) else [pmap]
        pmap = compose(*maps, FixedEntries(n, pinned, np.r_[np.zeros(void.size), np.ones(user_solid.size)],
                                           reduced=False))

        def physical(p):
            return pmap.forward(p)

        def monitor(p):
            return {"grey": grey_level(physical(p))}
    J = adjopt.ReducedFunctional(A, b, adjopt.Compliance(out), parameter_map=pmap,
                                 solver="auto" if solver is None else solver)
    volume = adjopt.ParameterFunctional(adjopt.Volume(volumes, parameter_map=pmap), design.size)
    cont = BetaContinuation(chain["projection"], beta_max=max(beta_max, beta), every=beta_every) if projection \
        else None
    dof_in, dof_out = (int(dofs_in[0]), int(dofs_out[0])) if nelz is None else (dofs_in, dofs_out)
    options = dict(nelx=nelx, nely=nely, nelz=nelz, volfrac=volfrac, penal=penal, rmin=rmin, emin=emin,
                   young=young, k_in=k_in, k_out=k_out, f_in=f_in, nondesign=int(nondesign), plane=plane,
                   projection=projection, beta=beta, eta=eta, beta_max=beta_max, beta_every=beta_every)
    # the new options only when given: the defaults keep the options (and so the checkpoints) they always had
    extra = dict(passive_void=_tc._fingerprint(void), passive_solid=_tc._fingerprint(user_solid),
                 symmetry=sym or None)
    options.update({k: v for k, v in extra.items() if v is not None})
    meta = {"mesh": mesh, "nelx": nelx, "nely": nely, "nelz": nelz, "filter": pmap, "density_filter": chain["filter"],
            "projection": chain["projection"], "design_map": physical, "design": design,
            "parameter_cells": chain["field"], "passive_void": void, "passive_solid": solid,
            "nondesign_solid": block, "dofmap": dofmap, "dofs": dofmap, "load": load, "output_dof": dof_out,
            "input_dof": dof_in, "options": options}
    name = f"topology_mechanism_{nelx}x{nely}" + ("" if nelz is None else f"x{nelz}")
    return adjopt.Problem(J, np.full(design.size, volfrac), bounds=(0.0, 1.0), constraints=[(volume, volfrac)],
                          name=name, meta=meta, mass=volumes[design] * chain["weights"],
                          continuation=cont, monitor=monitor)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nelx", type=int, default=40)
    ap.add_argument("--nely", type=int, default=40)
    ap.add_argument("--nelz", type=int, default=None, help="3D: elements along z (default: 2D)")
    args = ap.parse_args(argv)
    problem = build(args.nelx, args.nely, nelz=args.nelz)
    J, p = problem.functional, problem.p0
    print(f"{problem.name}: {problem.meta['dofmap'].n_free} free dofs, {p.size} design elements")
    print(derivative_report(J, p))


if __name__ == "__main__":
    main()
