"""SIMP minimum compliance with a volume constraint and a density filter.

    minimize    J(p) = f^T u(p)              (compliance)
    subject to  K(rho) u = f,  rho = H p     (H: cone density filter, optional)
                V(p) = mean(H p) <= volfrac
                0 <= p <= 1

with K(rho) = sum_e (emin + rho_e^penal (1 - emin)) K_e over the free dofs
(Dirichlet dofs condensed out). All elements are congruent unit squares /
cubes, so one local matrix K_e is shared by every element (stored once).
The parameters p are the element densities in the mesh's cell order
(x fastest, then y, then z).

Cases
-----
``"mbb"``
    The 2D half MBB beam of the 88-line code (Andreassen et al. 2011):
    nelx x nely unit Q1 plane-stress elements (E0 = 1, nu = 0.3); the x-dofs of
    the left edge are fixed (symmetry) and the y-dof of the bottom-right corner
    node (roller); a unit downward point load acts at the top-left node. The
    generator numbers nodes x fastest with y up (the 88-line code: column-major,
    y down), so supports and load are placed by coordinates.
``"cantilever3d"``
    A 3D cantilever: nelx x nely x nelz unit Q1 hexahedra (E0 = 1, nu = 0.3),
    x along the beam, y up, z through the depth (default 16 x 8 x 8, a quick
    demo size). The left face x = 0 is clamped (all three components). The
    load is a downward (-y) line load along the bottom-right edge
    (x = nelx, y = 0, 0 <= z <= nelz) of total magnitude 1, lumped
    consistently onto the edge nodes (trapezoidal weights 1/nelz inside,
    1/(2 nelz) at the two ends): the edge load of the top3d cantilever,
    normalised to unit total force.

Run ``python problems/topology_compliance.py [mbb|cantilever3d]`` to print
J(p0), |grad J(p0)|, the volume fraction and Taylor tables of orders 2 and 3.
"""

from __future__ import annotations

import numbers

import numpy as np

import adjopt
from adjopt import fem
from adjopt.maps import DensityFilter
from adjopt.mesh import box, rectangle
from adjopt.verify import derivative_report

CASES = ("mbb", "cantilever3d")
#: default sizes when nelx / nely / nelz are None
DEFAULT_SIZES = {"mbb": (60, 20, None), "cantilever3d": (16, 8, 8)}
NU = 0.3


#: how ``adjopt run topology_compliance`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="oc", xtol=0.01, gtol=0.0, maxiter=500)

def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer number of elements >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (number of elements along that side), got {value}")
    return int(value)


def _positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _nodes_at(mesh, points) -> np.ndarray:
    """Indices of the mesh nodes at ``points`` (exact grid coordinates; the first such node of each).

    One pass over the mesh keeps the nodes within 1e-9 of the box around the points (a corner, an
    edge); only those are compared with every point.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, mesh.dim)
    inside = np.all((mesh.points >= pts.min(axis=0) - 1e-9) & (mesh.points <= pts.max(axis=0) + 1e-9), axis=1)
    near = np.flatnonzero(inside)
    if near.size == 0:
        raise RuntimeError(f"no mesh node at {pts[0].tolist()}")
    d = np.abs(mesh.points[near][None, :, :] - pts[:, None, :]).max(axis=2)  # (points, nodes near)
    best = np.argmin(d, axis=1)
    far = np.flatnonzero(d[np.arange(pts.shape[0]), best] > 1e-9)
    if far.size:
        raise RuntimeError(f"no mesh node at {pts[far[0]].tolist()}")
    return near[best]


def _node_at(mesh, point) -> int:
    """Index of the mesh node at ``point`` (exact grid coordinates)."""
    return int(_nodes_at(mesh, point)[0])


def _mbb(nelx: int, nely: int):
    mesh = rectangle(nelx, nely, float(nelx), float(nely), cell="quad")
    n_dofs = 2 * mesh.n_nodes
    corner = _node_at(mesh, (nelx, 0.0))  # bottom-right: roller (y fixed)
    fixed = np.union1d(fem.boundary_dofs(mesh, "left", components=0), [2 * corner + 1])
    top_left = _node_at(mesh, (0.0, nely))
    load = fem.point_load(n_dofs, [2 * top_left + 1], -1.0)
    unit = rectangle(1, 1, 1.0, 1.0, cell="quad")
    return mesh, fixed, load, unit


def _cantilever3d(nelx: int, nely: int, nelz: int):
    mesh = box(nelx, nely, nelz, float(nelx), float(nely), float(nelz), cell="hexahedron")
    n_dofs = 3 * mesh.n_nodes
    fixed = fem.boundary_dofs(mesh, "left", components=[0, 1, 2])
    nodes = _nodes_at(mesh, [(nelx, 0.0, z) for z in range(nelz + 1)])
    w = np.full(nelz + 1, 1.0 / nelz)
    w[[0, -1]] *= 0.5
    load = fem.point_load(n_dofs, 3 * nodes + 1, -w)
    unit = box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron")
    return mesh, fixed, load, unit


def build(case: str = "mbb", nelx: int | None = None, nely: int | None = None, nelz: int | None = None,
          volfrac: float = 0.5, penal: float = 3.0, rmin: float = 1.5, emin: float = 1e-9,
          filter: bool = True, solver=None) -> adjopt.Problem:
    """The minimum-compliance problem as an :class:`adjopt.Problem`.

    Parameters
    ----------
    case
        ``"mbb"`` (2D half MBB beam) or ``"cantilever3d"``.
    nelx, nely, nelz
        Elements per direction; ``None`` takes the case's default
        (mbb 60 x 20, cantilever3d 16 x 8 x 8). ``nelz`` is for 3D only.
    volfrac
        Volume fraction bound in (0, 1]; also the uniform starting design.
    penal
        SIMP exponent (>= 1).
    rmin
        Density filter radius in element units (> 0), on cell centres.
    emin
        Void stiffness, 0 <= emin < 1.
    filter
        Use the density filter as the parameter map (the matrix and the
        volume see rho = H p); ``False``: rho = p.
    solver
        The linear solver of the functional (a name or a
        :class:`~adjopt.solvers.LinearSolver`); default ``"auto"``: geometric
        multigrid where it is faster than a factorization (from 12k free dofs
        in 2D when the grid coarsens, :func:`adjopt.solvers.structured_solver`),
        else the fastest factorization installed.
        ``"gmg"``: geometric multigrid CG (:class:`~adjopt.solvers.GMGSolver`)
        on this grid, for large meshes (element counts divisible by a power of 2).

    Returns
    -------
    adjopt.Problem
        ``functional`` (compliance), ``p0 = volfrac``, bounds (0, 1), the
        constraint ``[(ParameterFunctional(Volume), volfrac)]``, and ``meta``
        with mesh, nelx, nely, nelz, case, filter (the map or None), dofmap, load
        (full length).
    """
    if not isinstance(case, str) or case not in CASES:
        raise ValueError(f"unknown case {case!r}; known cases: {', '.join(map(repr, CASES))}")
    dx, dy, dz = DEFAULT_SIZES[case]
    nelx = _count(dx if nelx is None else nelx, "nelx")
    nely = _count(dy if nely is None else nely, "nely")
    if case == "mbb":
        if nelz is not None:
            raise ValueError(f"nelz is for the 3D case only; case 'mbb' is 2D, got nelz={nelz!r}")
    else:
        nelz = _count(dz if nelz is None else nelz, "nelz")
    try:
        volfrac = float(volfrac)
    except (TypeError, ValueError):
        raise ValueError(f"volfrac must be a number in (0, 1], got {volfrac!r}") from None
    if not 0.0 < volfrac <= 1.0:
        raise ValueError(f"volfrac must be in (0, 1], got {volfrac!r}")
    rmin = _positive(rmin, "rmin (filter radius in element units)")
    penal = _positive(penal, "penal")
    if penal < 1:
        raise ValueError(f"penal (SIMP exponent) must be >= 1, got {penal!r}")
    emin = float(emin)
    if not 0.0 <= emin < 1.0:
        raise ValueError(f"emin must satisfy 0 <= emin < 1 (= E0), got {emin!r}")
    if not isinstance(filter, (bool, np.bool_)):
        raise ValueError(f"filter must be True or False, got {filter!r}")

    if case == "mbb":
        mesh, fixed, load, unit = _mbb(nelx, nely)
    else:
        mesh, fixed, load, unit = _cantilever3d(nelx, nely, nelz)
    dim = mesh.dim
    # every element is a translate of the unit cell: one shared local matrix
    KE = fem.q1_elasticity(unit, E=1.0, nu=NU)[0]
    dofmap = fem.condense(dim * mesh.n_nodes, fixed)
    conn = dofmap.restrict(fem.vector_dofs(mesh.cells, dim))
    A = adjopt.ElementCoefficientMatrix(conn, KE, adjopt.SIMP(q=penal, e0=1.0, emin=emin), n=dofmap.n_free)
    del conn  # A keeps its own copy
    if solver is None or (isinstance(solver, str) and solver.lower() in ("gmg", "auto")):
        # geometric multigrid CG needs the grid: built here for this mesh and these supports; "auto" takes it
        # where it is faster than a factorization (adjopt.solvers.structured_solver)
        from adjopt.solvers import structured_solver

        shape = (nelx, nely) if nelz is None else (nelx, nely, nelz)
        solver = structured_solver(shape, dim, dofmap.fixed, solver)
    b = dofmap.restrict_vector(load)
    pmap = DensityFilter(mesh.cell_centers(), rmin) if filter else None
    J = adjopt.ReducedFunctional(A, b, adjopt.Compliance(b), parameter_map=pmap, solver=solver)
    n = mesh.n_cells
    volumes = mesh.cell_volumes()  # Volume and the Problem keep their own copies
    volume = adjopt.ParameterFunctional(adjopt.Volume(volumes, parameter_map=pmap), n)
    name = f"topology_compliance_{case}_{nelx}x{nely}" + ("" if nelz is None else f"x{nelz}")
    meta = {"case": case, "mesh": mesh, "nelx": nelx, "nely": nely, "nelz": nelz, "filter": pmap,
            "dofmap": dofmap, "dofs": dofmap, "load": load, "volfrac": volfrac, "penal": penal, "rmin": rmin,
            "emin": emin, "options": dict(case=case, nelx=nelx, nely=nely, nelz=nelz, volfrac=volfrac, penal=penal,
                                          rmin=rmin, emin=emin, filter=filter)}
    return adjopt.Problem(J, np.full(n, volfrac), bounds=(0.0, 1.0), constraints=[(volume, volfrac)],
                          name=name, meta=meta, mass=volumes)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", nargs="?", default="mbb", choices=CASES)
    ap.add_argument("--nelx", type=int)
    ap.add_argument("--nely", type=int)
    ap.add_argument("--nelz", type=int)
    ap.add_argument("--no-filter", action="store_true")
    args = ap.parse_args(argv)
    problem = build(args.case, args.nelx, args.nely, args.nelz, filter=not args.no_filter)
    J, p = problem.functional, problem.p0
    volume, vmax = problem.constraints[0]
    m = problem.meta
    size = f"{m['nelx']} x {m['nely']}" + ("" if m["nelz"] is None else f" x {m['nelz']}")
    print(f"{problem.name}: {size} elements, {m['dofmap'].n_free} free dofs, filter={'on' if m['filter'] else 'off'}")
    print(f"volume(p0)   = {volume.value(p):.12g}  (bound {vmax})")
    print(derivative_report(J, p))


if __name__ == "__main__":
    main()
