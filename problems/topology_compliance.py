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

``"mbb3d"``
    The half MBB beam in 3D: nelx x nely x nelz unit Q1 hexahedra (default
    24 x 8 x 4), symmetry on the left face (x-dofs fixed) and on the back
    face z = 0 (z-dofs fixed: the half of a beam twice as deep), a roller
    line along the bottom-right edge (y-dofs of x = nelx, y = 0), and a
    downward line load of total magnitude 1 along the top-left edge
    (x = 0, y = nely), lumped like the cantilever's.
``"cantilever_two_loads"``
    Two load cases on a 2D cantilever (the multiple-load example of the
    88-line paper, section 5.2): nelx x nely unit Q1 elements (default
    60 x 30), the left edge clamped; load case 1 a unit upward force at the
    bottom-right corner, load case 2 a unit downward force at the top-right
    corner. J is the sum of the two compliances, from one factorization (or
    one multigrid hierarchy) and one two-column solve per design.
``"cantilever_hole"``
    Passive elements (the 88-line paper, section 5.3): a 2D cantilever,
    nelx x nely (default 45 x 30), the left edge clamped, a unit downward
    force at the middle of the right edge, and a circular hole of void
    elements (centre (nelx / 3, nely / 2), radius nely / 3 in element units,
    element centres strictly inside) that the optimizer never sees.

Options for every case
----------------------
``projection=True`` puts a smoothed Heaviside projection (threshold
``eta``) after the filter, with beta continuation: ``beta`` (1) doubled every
``beta_every`` (50) iterations, or earlier when the run converges at the
current beta, up to ``beta_max`` (32); the run ends only at ``beta_max``.
``passive_void`` and ``passive_solid`` (element indices) fix elements at
densities 0 and 1: they are not design variables (p holds the others, in
increasing element order), and their physical density stays exactly 0 or 1
after the filter and the projection. Every history entry records the grey
level (the fraction of physical densities strictly between 0.05 and 0.95)
and, with projection, beta.

Run ``python problems/topology_compliance.py [case]`` to print
J(p0), |grad J(p0)|, the volume fraction and Taylor tables of orders 2 and 3.
"""

from __future__ import annotations

import numbers

import numpy as np

import adjopt
from adjopt import fem
from adjopt.maps import Compose, DensityFilter, FixedEntries, HeavisideProjection, TiedEntries, compose, element_indices
from adjopt.mesh import box, rectangle
from adjopt.optimize import BetaContinuation, grey_level
from adjopt.verify import derivative_report

CASES = ("mbb", "cantilever3d", "cantilever_two_loads", "cantilever_hole", "mbb3d")
#: default sizes when nelx / nely / nelz are None
DEFAULT_SIZES = {"mbb": (60, 20, None), "cantilever3d": (16, 8, 8), "cantilever_two_loads": (60, 30, None),
                 "cantilever_hole": (45, 30, None), "mbb3d": (24, 8, 4)}
NU = 0.3


#: how ``adjopt run topology_compliance`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="oc", xtol=0.01, gtol=0.0, maxiter=500)

def _count(value, name: str, what: str = "number of elements along that side") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1 ({what}), got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 ({what}), got {value}")
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


def _cantilever2d(nelx: int, nely: int, case: str):
    """Left edge clamped; the loads of ``case`` (columns of a full-length array) and its passive voids."""
    mesh = rectangle(nelx, nely, float(nelx), float(nely), cell="quad")
    n_dofs = 2 * mesh.n_nodes
    fixed = fem.boundary_dofs(mesh, "left", components=[0, 1])
    void = None
    if case == "cantilever_two_loads":
        bottom, top = _node_at(mesh, (nelx, 0.0)), _node_at(mesh, (nelx, nely))
        load = np.column_stack([fem.point_load(n_dofs, [2 * bottom + 1], 1.0),
                                fem.point_load(n_dofs, [2 * top + 1], -1.0)])
    else:  # cantilever_hole: the load at the middle of the right edge (the node below it for an odd nely)
        mid = _node_at(mesh, (nelx, float(nely // 2)))
        load = fem.point_load(n_dofs, [2 * mid + 1], -1.0)
        c = mesh.cell_centers()
        void = np.flatnonzero(np.hypot(c[:, 0] - nelx / 3.0, c[:, 1] - nely / 2.0) < nely / 3.0)
    unit = rectangle(1, 1, 1.0, 1.0, cell="quad")
    return mesh, fixed, load, unit, void


def _fingerprint(elements: np.ndarray) -> str | None:
    """A short, exact name of a set of elements for the run's options (a checkpoint of another set is refused)."""
    if elements.size == 0:
        return None
    import hashlib

    digest = hashlib.sha1(np.ascontiguousarray(elements, dtype=np.int64).tobytes()).hexdigest()[:12]
    return f"{elements.size} elements, sha1 {digest}"


def _parse_elements(text: str, name: str) -> np.ndarray:
    """Element indices from the command line: "3,7,12", ranges "0:10" (10 excluded), or both."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if ":" in part:
                a, b = (int(v) for v in part.split(":"))
                if b <= a:
                    raise ValueError(f"{name}: the range {part!r} is empty (its end must be above its start; "
                                     "'0:10' is 0 to 9)")
                out.extend(range(a, b))
            else:
                out.append(int(part))
        except ValueError as exc:
            if "is empty" in str(exc):
                raise
            raise ValueError(f"{name} must be element indices such as '3,7,12' or a range '0:10', got {text!r}") \
                from None
    return np.array(out, dtype=np.int64)


def _elements(value, n: int, name: str) -> np.ndarray:
    """Element indices (unique, sorted) from an integer array, a boolean mask of length n, one index, or a
    string of indices and ranges (the command line): :func:`adjopt.maps.element_indices`."""
    if value is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(value, str):
        value = _parse_elements(value, name)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    elif isinstance(value, (set, frozenset)):
        value = sorted(value)
    return element_indices(value, n, name)


def check_material(volfrac, penal, rmin, emin) -> tuple:
    """The design options every topology problem here takes, checked: ``(volfrac, penal, rmin, emin)`` as
    floats (volfrac in (0, 1], penal >= 1, rmin > 0, 0 <= emin < 1), or a ValueError."""
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
    try:
        emin = float(emin)
    except (TypeError, ValueError):
        raise ValueError(f"emin must be a number with 0 <= emin < 1, got {emin!r}") from None
    if not 0.0 <= emin < 1.0:
        raise ValueError(f"emin must satisfy 0 <= emin < 1 (relative to the solid's stiffness), got {emin!r}")
    return volfrac, penal, rmin, emin


def check_projection(projection, beta, eta, beta_max, beta_every) -> tuple:
    """The projection options checked: ``(beta, eta, beta_max, beta_every)`` as numbers, or a ValueError."""
    if not isinstance(projection, (bool, np.bool_)):
        raise ValueError(f"projection must be True or False, got {projection!r}")
    beta = _positive(beta, "beta (projection sharpness)")
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}") from None
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta (projection threshold) must be in [0, 1], got {eta!r}")
    beta_max = _positive(beta_max, "beta_max")
    if projection and beta_max < beta:
        raise ValueError(f"beta_max ({beta_max:g}) must be >= beta ({beta:g})")
    return beta, eta, beta_max, _count(beta_every, "beta_every", "iterations at one beta")


def symmetry_orbits(grid, symmetry: str) -> np.ndarray:
    """For each element of a structured grid (x fastest), the index of its orbit under mirror symmetry.

    ``grid`` is (nelx, nely) or (nelx, nely, nelz); ``symmetry`` names the axes mirrored about the
    middle of the domain ("x": i -> nelx - 1 - i, "y", "z", or several: "xy"). Orbits are numbered in
    the order of their smallest element.
    """
    grid = tuple(int(g) for g in grid)
    n = int(np.prod(grid))
    images = [np.arange(n)]
    for axis in sorted(set(symmetry)):
        a = "xyz".index(axis)
        new = []
        for img in images:
            ijk = list(np.unravel_index(img, grid[::-1])[::-1])
            ijk[a] = grid[a] - 1 - ijk[a]
            new.append(np.ravel_multi_index(tuple(ijk[::-1]), grid[::-1]))
        images += new
    rep = np.min(np.stack(images), axis=0)
    return np.unique(rep, return_inverse=True)[1].astype(np.int64)


def check_symmetry(symmetry, dim: int) -> str:
    """'' for none, or the mirrored axes ("x", "y", "xy"; "z" in 3D), or a ValueError."""
    if symmetry is None or symmetry == "none":
        return ""
    axes = "xyz"[:dim]
    if not isinstance(symmetry, str) or not symmetry or set(symmetry) - set(axes) or len(set(symmetry)) != len(symmetry):
        raise ValueError(f"symmetry must be 'none' or mirrored axes from {axes!r} (e.g. 'y', 'xy'), got {symmetry!r}")
    return "".join(sorted(symmetry))


def design_chain(mesh, rmin, filter, projection, beta, eta, void, solid, pin: bool = True, grid=None,
                 symmetry: str = "") -> dict:
    """The parameter map of a density design: p -> [passive values in] -> [mirror images] -> filter ->
    projection -> [passive values again, when ``pin``].

    ``void`` and ``solid`` are sorted element indices (disjoint). With ``symmetry`` (mirrored axes of the
    structured ``grid``) p holds one value per orbit of elements (:class:`~adjopt.maps.TiedEntries`); the
    passive sets must then be symmetric. Returns a dict with ``map`` (the composed map, or None for rho =
    p), ``filter``, ``projection`` (the maps or None), ``design`` (the elements p holds: the first of each
    orbit), ``weights`` (the cell-volume weight of each parameter: its orbit's size), ``field`` (p -> the
    design variables on every element, NaN on passive ones), ``physical`` (p -> physical density) and
    ``monitor`` (p -> {"grey": ...}).
    """
    n = mesh.n_cells
    index = np.concatenate([void, solid]).astype(np.int64)
    values = np.concatenate([np.zeros(void.size), np.ones(solid.size)])
    fmap = DensityFilter(mesh.cell_centers(), rmin) if filter else None
    proj = HeavisideProjection(n, beta=beta, eta=eta) if projection else None
    chain = [m for m in (fmap, proj) if m is not None]
    pins = [FixedEntries(n, index, values, reduced=False)] if index.size and chain and pin else []
    if symmetry:
        orbit = symmetry_orbits(grid, symmetry)
        m_orb = int(orbit.max()) + 1
        fixed = np.full(m_orb, np.nan)
        fixed[orbit[index]] = values
        # every element of a passive orbit must be passive with the same value
        full = fixed[orbit]
        state = np.full(n, np.nan)
        state[index] = values
        if not np.array_equal(np.isnan(full), np.isnan(state)) or not np.allclose(full[index], values):
            raise ValueError(f"the passive elements are not symmetric under symmetry={symmetry!r}: the problem's own "
                             "fixed elements (its holes, blocks or void corner) and passive_void / passive_solid "
                             "must be their own mirror images; give symmetric sets or another symmetry")
        o_index = np.flatnonzero(~np.isnan(fixed))
        head = [FixedEntries(m_orb, o_index, fixed[o_index])] if o_index.size else []
        chain = head + [TiedEntries(orbit, m_orb)] + chain + pins
        free_orbits = np.setdiff1d(np.arange(m_orb), o_index)
        first = np.full(m_orb, n)
        np.minimum.at(first, orbit, np.arange(n))
        design = first[free_orbits]
        weights = np.bincount(orbit, minlength=m_orb)[free_orbits].astype(np.float64)
        expand = compose(*chain[: len(head) + 1])

        def field(p):
            out = expand.forward(p)
            out[index] = np.nan
            return out
    else:
        if index.size:
            chain = [FixedEntries(n, index, values)] + chain + pins
        design = np.setdiff1d(np.arange(n), index)
        weights = np.ones(design.size)
        field = None
        if index.size:
            def field(p):
                out = np.full(n, np.nan)
                out[design] = p
                return out
    pmap = compose(*chain) if chain else None

    def physical(p):
        return p if pmap is None else pmap.forward(p)

    def monitor(p):
        return {"grey": grey_level(physical(p))}

    return {"map": pmap, "filter": fmap, "projection": proj, "design": design, "weights": weights,
            "field": field, "physical": physical, "monitor": monitor}


def check_passive(mesh, passive_void, passive_solid, volfrac=None, own_void=None,
                  own_name: str = "the case") -> tuple[np.ndarray, np.ndarray]:
    """(void, solid): the passive sets as sorted element indices, ``own_void`` (elements the case itself makes
    void, named ``own_name`` in errors) united with ``passive_void``; a ValueError for an element both void and
    solid, every element passive, or passive solids filling more than ``volfrac`` (when given)."""
    n = mesh.n_cells
    own = _elements(own_void, n, f"{own_name}'s voids")
    void = np.union1d(own, _elements(passive_void, n, "passive_void")).astype(np.int64)
    solid = _elements(passive_solid, n, "passive_solid")
    both = np.intersect1d(void, solid)
    if both.size:
        where = f"{own_name} makes it void" if np.isin(both[0], own) else "passive_void has it"
        raise ValueError(f"element {int(both[0])} is both passive void and passive solid ({both.size} such; "
                         f"{where}); give each passive element once")
    if void.size + solid.size >= n:
        raise ValueError("every element is passive: nothing is left to design")
    if volfrac is not None:
        cell_volumes = mesh.cell_volumes()
        solid_fraction = float(cell_volumes[solid].sum() / cell_volumes.sum())
        if solid_fraction > volfrac:
            raise ValueError(f"the passive solid elements alone fill {solid_fraction:.4g} of the domain, more than "
                             f"volfrac = {volfrac:g}: no design meets the volume bound; raise volfrac or fix fewer")
    return void, solid


def passive_design(mesh, grid, passive_void, passive_solid, symmetry, volfrac=None, own_void=None,
                   own_name: str = "the case") -> dict:
    """The passive sets and symmetry of a density design on a structured grid, checked, and the map p -> the
    design variables on every element (passive values in, mirror images tied) that goes before the filter.

    ``passive_void`` and ``passive_solid`` are as :func:`_elements` takes them (indices, a
    boolean mask, one index, a string "0:3,7"); ``own_void`` are elements the case itself makes void (united
    with ``passive_void``, named ``own_name`` in errors). A ValueError for an element both void and solid,
    every element passive, passive solids filling more than ``volfrac`` (when given), a bad ``symmetry`` or
    passive sets that are not their own mirror images. Returns a dict with ``void``, ``solid`` (sorted
    indices), ``symmetry`` ('' for none), ``maps`` (the maps p -> design variables on every element, in order:
    [:class:`~adjopt.maps.FixedEntries`] [:class:`~adjopt.maps.TiedEntries`]; empty when p is the design), and
    from :func:`design_chain` without filter and projection: ``design`` (the elements p
    holds), ``weights`` (each parameter's orbit size) and ``field``.
    """
    void, solid = check_passive(mesh, passive_void, passive_solid, volfrac, own_void, own_name)
    sym = check_symmetry(symmetry, mesh.dim)
    chain = design_chain(mesh, 1.0, False, False, 1.0, 0.5, void, solid, pin=False, grid=grid, symmetry=sym)
    head = chain["map"]
    maps = [] if head is None else list(head.maps) if isinstance(head, Compose) else [head]
    return {"void": void, "solid": solid, "symmetry": sym, "maps": maps, "design": chain["design"],
            "weights": chain["weights"], "field": chain["field"]}


def _mbb3d(nelx: int, nely: int, nelz: int):
    mesh = box(nelx, nely, nelz, float(nelx), float(nely), float(nelz), cell="hexahedron")
    n_dofs = 3 * mesh.n_nodes
    roller = _nodes_at(mesh, [(nelx, 0.0, z) for z in range(nelz + 1)])
    back = np.flatnonzero(np.abs(mesh.points[:, 2]) < 1e-9)
    fixed = np.union1d(np.union1d(fem.boundary_dofs(mesh, "left", components=0), 3 * back + 2), 3 * roller + 1)
    nodes = _nodes_at(mesh, [(0.0, nely, z) for z in range(nelz + 1)])
    w = np.full(nelz + 1, 1.0 / nelz)
    w[[0, -1]] *= 0.5
    load = fem.point_load(n_dofs, 3 * nodes + 1, -w)
    unit = box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron")
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
          filter: bool = True, solver=None, projection: bool = False, beta: float = 1.0, eta: float = 0.5,
          beta_max: float = 32.0, beta_every: int = 50, passive_void=None,
          passive_solid=None, symmetry: str = "none") -> adjopt.Problem:
    """The minimum-compliance problem as an :class:`adjopt.Problem`.

    Parameters
    ----------
    case
        ``"mbb"`` (2D half MBB beam), ``"cantilever3d"``, ``"mbb3d"``,
        ``"cantilever_two_loads"`` or ``"cantilever_hole"`` (see the module).
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

    projection
        Put a smoothed Heaviside projection after the filter, with beta
        continuation (the problem's ``continuation``).
    beta, eta
        The projection's starting sharpness (> 0) and threshold in [0, 1].
    beta_max, beta_every
        The continuation: beta doubled every ``beta_every`` iterations or when
        the run converges at the current beta, up to ``beta_max`` (>= beta).
    passive_void, passive_solid
        Elements fixed at density 0 and 1 (indices or a boolean mask over the
        elements), added to the case's own (the hole of
        ``"cantilever_hole"``). They are not parameters: p holds the other
        elements in increasing order.

    Returns
    -------
    adjopt.Problem
        ``functional`` (compliance), ``p0 = volfrac``, bounds (0, 1), the
        constraint ``[(ParameterFunctional(Volume), volfrac)]``, the grey-level
        ``monitor``, the ``continuation`` (with projection), and ``meta`` with
        mesh, nelx, nely, nelz, case, filter (the whole map p -> physical
        density, or None), density_filter (the DensityFilter or None),
        projection (or None), design_map (p -> physical density), design
        (the indices of the elements p holds), dofmap, load (full length, a
        column per load case).
    """
    if not isinstance(case, str) or case not in CASES:
        raise ValueError(f"unknown case {case!r}; known cases: {', '.join(map(repr, CASES))}")
    dx, dy, dz = DEFAULT_SIZES[case]
    nelx = _count(dx if nelx is None else nelx, "nelx")
    nely = _count(dy if nely is None else nely, "nely")
    if dz is None:
        if nelz is not None:
            raise ValueError(f"nelz is for the 3D case only; case {case!r} is 2D, got nelz={nelz!r}")
    else:
        nelz = _count(dz if nelz is None else nelz, "nelz")
    volfrac, penal, rmin, emin = check_material(volfrac, penal, rmin, emin)
    if not isinstance(filter, (bool, np.bool_)):
        raise ValueError(f"filter must be True or False, got {filter!r}")
    beta, eta, beta_max, beta_every = check_projection(projection, beta, eta, beta_max, beta_every)

    void = None
    if case == "mbb":
        mesh, fixed, load, unit = _mbb(nelx, nely)
    elif case == "cantilever3d":
        mesh, fixed, load, unit = _cantilever3d(nelx, nely, nelz)
    elif case == "mbb3d":
        mesh, fixed, load, unit = _mbb3d(nelx, nely, nelz)
    else:
        mesh, fixed, load, unit, void = _cantilever2d(nelx, nely, case)
    void, solid = check_passive(mesh, passive_void, passive_solid, volfrac, own_void=void,
                                own_name=f"the case {case!r}")
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
    shape = (nelx, nely) if nelz is None else (nelx, nely, nelz)
    chain = design_chain(mesh, rmin, filter, projection, beta, eta, void, solid, grid=shape,
                         symmetry=check_symmetry(symmetry, mesh.dim))
    pmap, fmap, proj, design, physical = (chain[k] for k in ("map", "filter", "projection", "design", "physical"))
    J = adjopt.ReducedFunctional(A, b, adjopt.Compliance(b), parameter_map=pmap, solver=solver)
    volumes = mesh.cell_volumes()  # Volume and the Problem keep their own copies
    m = design.size
    volume = adjopt.ParameterFunctional(adjopt.Volume(volumes, parameter_map=pmap), m)
    # with beta_max = beta the continuation never raises, but every history entry still records beta
    cont = BetaContinuation(proj, beta_max=max(beta_max, beta), every=beta_every) if projection else None
    name = f"topology_compliance_{case}_{nelx}x{nely}" + ("" if nelz is None else f"x{nelz}")
    meta = {"case": case, "mesh": mesh, "nelx": nelx, "nely": nely, "nelz": nelz, "filter": pmap,
            "density_filter": fmap, "projection": proj, "design_map": physical, "design": design,
            "parameter_cells": chain["field"], "passive_void": void,
            "passive_solid": solid,
            "dofmap": dofmap, "dofs": dofmap, "load": load, "volfrac": volfrac, "penal": penal, "rmin": rmin,
            "emin": emin, "options": dict(case=case, nelx=nelx, nely=nely, nelz=nelz, volfrac=volfrac, penal=penal,
                                          rmin=rmin, emin=emin, filter=filter, projection=projection, beta=beta,
                                          eta=eta, beta_max=beta_max, beta_every=beta_every,
                                          symmetry=check_symmetry(symmetry, mesh.dim) or "none",
                                          passive_void=_fingerprint(void), passive_solid=_fingerprint(solid))}
    return adjopt.Problem(J, np.full(m, volfrac), bounds=(0.0, 1.0), constraints=[(volume, volfrac)],
                          name=name, meta=meta, mass=volumes[design] * chain["weights"], continuation=cont,
                          monitor=chain["monitor"])


#: the cases :func:`build_distributed` builds rank by rank
DISTRIBUTED_CASES = ("mbb", "mbb3d")


def _slab_filter(part, shape, rmin: float):
    """This rank's rows of the serial DensityFilter on the cell centres of the unit grid ``shape``: built on the
    slab's cells and ceil(rmin) layers of cells on either side (every neighbour within rmin), columns global."""
    import scipy.sparse as sp

    k0, k1 = part.layers
    n_layers, per_layer = shape[-1], int(np.prod(shape[:-1]))
    g = int(np.ceil(rmin))
    e0, e1 = max(0, k0 - g), min(n_layers, k1 + g)
    axes = [np.arange(n, dtype=np.float64) + 0.5 for n in shape[:-1]] + [np.arange(e0, e1, dtype=np.float64) + 0.5]
    grids = np.meshgrid(*axes[::-1], indexing="ij")  # the last axis slowest, x fastest (the generators' order)
    centers = np.column_stack([a.ravel() for a in grids[::-1]])
    W = DensityFilter(centers, rmin).L
    rows = W[(k0 - e0) * per_layer:(k1 - e0) * per_layer]
    return sp.csr_array((rows.data, rows.indices + e0 * per_layer, rows.indptr),
                        shape=(rows.shape[0], n_layers * per_layer))


def build_distributed(case: str = "mbb", nelx: int | None = None, nely: int | None = None, nelz: int | None = None,
                      volfrac: float = 0.5, penal: float = 3.0, rmin: float = 1.5, emin: float = 1e-9,
                      filter: bool = True, comm=None, **solver_options) -> adjopt.Problem:
    """The minimum-compliance problem built rank by rank on PETSc: no rank forms the global mesh or operator.

    The same problem as :func:`build` (cases ``"mbb"`` and ``"mbb3d"``, the
    density filter on or off; no projection, passive sets or symmetry), for
    ``mpiexec``: each rank builds its slab of the mesh
    (:func:`adjopt.mesh.rectangle_part` / :func:`~adjopt.mesh.box_part`,
    slabs along y in 2D and z in 3D), its element connectivity in the global
    free-dof numbering, its rows of the density filter, its part of the load
    and of the rigid body modes, and the functional is
    :meth:`DistributedReducedFunctional.from_parts
    <adjopt.backends.petsc.DistributedReducedFunctional.from_parts>` with
    ``solver_options`` (``rtol``, ``pc_type``, ...). The numbering of nodes,
    dofs, elements and parameters is the serial one, so results compare entry
    by entry with :func:`build`.

    The returned problem's functional and volume constraint take the full
    parameter vector on every rank (the serial interface) and p0 is the full
    vector; ``adjopt.backends.petsc.in_blocks(problem)`` keeps p in blocks over
    the ranks instead (what ``adjopt run --backend petsc`` does for OC, L-BFGS
    and Newton-CG).
    """
    from mpi4py import MPI

    from adjopt.backends.petsc import DistributedReducedFunctional
    from adjopt.backends.petsc.parts import DistributedVolume, LocalCompliance, LocalSystem, free_numbering, same_options
    from adjopt.fem.nullspace import rigid_body_modes
    from adjopt.mesh import box_part, rectangle_part

    comm = MPI.COMM_WORLD if comm is None else comm
    same_options(comm, "topology_compliance.build_distributed", case=case, nelx=nelx, nely=nely, nelz=nelz,
                 volfrac=volfrac, penal=penal, rmin=rmin, emin=emin, filter=filter, **solver_options)
    if not isinstance(case, str) or case not in CASES:
        raise ValueError(f"unknown case {case!r}; known cases: {', '.join(map(repr, CASES))}")
    if case not in DISTRIBUTED_CASES:
        raise NotImplementedError(f"build_distributed builds the cases {', '.join(map(repr, DISTRIBUTED_CASES))}, got {case!r}; "
                         "build the others serially (build(), then adjopt.backends.petsc.distribute)")
    dx, dy, dz = DEFAULT_SIZES[case]
    nelx = _count(dx if nelx is None else nelx, "nelx")
    nely = _count(dy if nely is None else nely, "nely")
    if dz is None and nelz is not None:
        raise ValueError(f"nelz is for the 3D case only; case {case!r} is 2D, got nelz={nelz!r}")
    nelz = None if dz is None else _count(dz if nelz is None else nelz, "nelz")
    volfrac, penal, rmin, emin = check_material(volfrac, penal, rmin, emin)
    if not isinstance(filter, (bool, np.bool_)):
        raise ValueError(f"filter must be True or False, got {filter!r}")
    if nelz is None:
        shape, dim = (nelx, nely), 2
        part = rectangle_part(nelx, nely, float(nelx), float(nely), cell="quad", comm=comm)
        unit = rectangle(1, 1, 1.0, 1.0, cell="quad")
    else:
        shape, dim = (nelx, nely, nelz), 3
        part = box_part(nelx, nely, nelz, float(nelx), float(nely), float(nelz), cell="hexahedron", comm=comm)
        unit = box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron")
    x = part.mesh.points
    n_local, n_owned = x.shape[0], part.n_owned
    fixed = np.zeros((n_local, dim), dtype=bool)  # (node, component), the serial _mbb / _mbb3d supports
    load = np.zeros((n_local, dim))
    fixed[x[:, 0] == 0.0, 0] = True  # symmetry plane x = 0
    roller = (x[:, 0] == nelx) & (x[:, 1] == 0.0)
    fixed[roller, 1] = True
    top = (x[:, 0] == 0.0) & (x[:, 1] == nely)
    if dim == 2:
        load[top, 1] = -1.0
    else:
        fixed[x[:, 2] == 0.0, 2] = True  # the back face z = 0: symmetry
        w = np.where((x[:, 2] == 0.0) | (x[:, 2] == nelz), 0.5, 1.0) / nelz
        load[top, 1] = -w[top]
    ids = dim * part.node_start + np.arange(dim * n_local)
    free, n_free = free_numbering(comm, ids, fixed.ravel(), dim * n_owned)
    owned_free = np.flatnonzero(free[:dim * n_owned] >= 0)
    conn = free[fem.vector_dofs(part.mesh.cells, dim)]
    b = load.ravel()[owned_free]
    KE = fem.q1_elasticity(unit, E=1.0, nu=NU)[0]
    L = _slab_filter(part, shape, rmin) if filter else None
    n_el = part.mesh.n_cells
    system = LocalSystem(conn, KE, adjopt.SIMP(q=penal, e0=1.0, emin=emin), n_free, b, [LocalCompliance(b)],
                         parameter_matrix=L, n_owned_params=n_el if filter else None,
                         near_nullspace=rigid_body_modes(x[:n_owned], owned_free, center=np.array(shape) / 2.0),
                         gram={"mass": np.ones(n_el)})  # build()'s mass: the (unit) element volumes
    dof_free = free.reshape(n_local, dim)
    del conn, load, fixed, free

    def local_fields(F, x):
        """This rank's piece of fields.pvtu: the displacement on its nodes, the physical density of its cells."""
        u = F.local_values(x, "state", dof_free.ravel()).reshape(n_local, dim)
        if dim == 2:
            u = np.column_stack([u, np.zeros(n_local)])
        return {"displacement": u}, {"density": F.local_values(x, "rho")}
    J = DistributedReducedFunctional.from_parts(system, comm=comm, **solver_options)
    del system
    m = part.n_global_cells
    volume = DistributedVolume(comm, np.ones(n_el), L, n_params=m, first=part.cell_start)
    name = f"topology_compliance_{case}_{nelx}x{nely}" + ("" if nelz is None else f"x{nelz}")
    meta = {"case": case, "nelx": nelx, "nely": nely, "nelz": nelz, "part": part, "local_fields": local_fields,
            "volfrac": volfrac,
            "penal": penal, "rmin": rmin, "emin": emin, "distributed": True,
            "options": dict(case=case, nelx=nelx, nely=nely, nelz=nelz, volfrac=volfrac, penal=penal, rmin=rmin,
                            emin=emin, filter=bool(filter))}
    return adjopt.Problem(J, np.full(m, volfrac), bounds=(0.0, 1.0), constraints=[(volume, volfrac)], name=name,
                          meta=meta)


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
