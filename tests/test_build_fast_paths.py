"""The fast paths of building a large structured problem give what the general paths give.

* :func:`build_slot_map` / :func:`build_pattern` copy a row that repeats the
  previous one: compared with every row built (``repeat_rows=False``) and
  with an independent numpy reference (a stable sort of all scatter entries).
* :class:`DensityFilter` on grid centres uses a fixed stencil: compared entry
  for entry (values, order, index dtypes) with the KD-tree path.
* Mesh volumes / centres / checks come from numba kernels: compared with the
  numpy formulas (determinants of the Jacobians, ``points[cells].mean``).
* The topology problem finds its load nodes in one pass and reads the volumes once.
"""

import numpy as np
import pytest
import scipy.sparse as sp

from adjopt import fem
from adjopt.maps import DensityFilter
from adjopt.maps import maps as maps_module
from adjopt.mesh import Mesh, box, rectangle
from adjopt.mesh._reference import CELLS, jacobians, shape_functions, tensor_gauss
from adjopt.operators import _pattern
from adjopt.operators.element import ElementCoefficientMatrix, build_pattern, build_slot_map


# ---------------------------------------------------------------------------------------------------- pattern
def reference_slot_map(conn, n, extra=None):
    """(indptr, indices, slot_ptr, slot_elem, slot_loc, extra_slots) by sorting all scatter entries (numpy)."""
    conn = np.asarray(conn, dtype=np.int64)
    E, k = conn.shape
    e, a, b = (g.ravel() for g in np.meshgrid(np.arange(E), np.arange(k), np.arange(k), indexing="ij"))
    rows, cols = conn[e, a], conn[e, b]
    keep = (rows >= 0) & (cols >= 0)
    e, a, b, rows, cols = e[keep], a[keep], b[keep], rows[keep], cols[keep]
    if extra is not None:
        ex = sp.coo_array(extra)
        xr, xc = ex.row.astype(np.int64), ex.col.astype(np.int64)
    else:
        xr = xc = np.zeros(0, dtype=np.int64)
    keys = np.unique(np.concatenate([rows * n + cols, xr * n + xc]))  # sorted (row, col)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // n, minlength=n), out=indptr[1:])
    indices = keys % n
    order = np.lexsort((cols, rows))  # stable: each slot keeps the (element, a, b) order of the entries
    slot_of = np.searchsorted(keys, rows * n + cols)
    slot_ptr = np.zeros(keys.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(slot_of, minlength=keys.size), out=slot_ptr[1:])
    return (indptr, indices, slot_ptr, e[order], (a * k + b)[order], np.searchsorted(keys, xr * n + xc))


def _elasticity_conn(mesh, fixed):
    dim = mesh.dim
    dm = fem.condense(dim * mesh.n_nodes, fixed)
    return dm.restrict(fem.vector_dofs(mesh.cells, dim)), dm.n_free


def _pattern_cases():
    rng = np.random.default_rng(7)
    cases = {}
    for shape in [(3, 2, 2), (5, 3, 1), (1, 3, 5)]:
        m = box(*shape, cell="hexahedron")
        cases[f"hex{shape}-clamped"] = _elasticity_conn(m, fem.boundary_dofs(m, "left", [0, 1, 2]))
        cases[f"hex{shape}-x-fixed"] = _elasticity_conn(m, fem.boundary_dofs(m, "left", [0]))
        cases[f"hex{shape}-random-fixed"] = _elasticity_conn(m, rng.choice(3 * m.n_nodes, 7, replace=False))
        cases[f"hex{shape}-scalar"] = (m.cells, m.n_nodes)
    t = box(3, 1, 2, cell="tetra")
    cases["tet-elasticity"] = _elasticity_conn(t, fem.boundary_dofs(t, "bottom", [0, 1, 2]))
    for shape in [(5, 3), (1, 4), (7, 1)]:
        q = rectangle(*shape, cell="quad")
        cases[f"quad{shape}-mbb"] = _elasticity_conn(q, np.union1d(fem.boundary_dofs(q, "left", [0]), [1]))
        tr = rectangle(*shape)
        cases[f"tri{shape}-scalar"] = (tr.cells, tr.n_nodes)
        cases[f"tri{shape}-free"] = (fem.vector_dofs(tr.cells, 2), 2 * tr.n_nodes)
    for i in range(6):  # repeated and negative dofs inside elements
        E, k, n = rng.integers(2, 25), rng.integers(1, 6), rng.integers(2, 12)
        c = rng.integers(-2, n, size=(E, k))
        c[0, 0] = n - 1
        cases[f"random{i}"] = (c, int(n))
    cases["same-elements-shifted-twice"] = (np.array([[0, 1, 0, 1], [0, 1, 0, 1]]), 2)
    cases["blocks"] = (np.array([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]]), 9)
    return cases


PATTERN_CASES = _pattern_cases()


@pytest.mark.parametrize("name", sorted(PATTERN_CASES))
@pytest.mark.parametrize("with_extra", [False, True])
def test_slot_map_with_repeated_rows_equals_every_row_built_and_the_reference(name, with_extra):
    conn, n = PATTERN_CASES[name]
    extra = sp.random(n, n, density=0.2, random_state=3, format="csr") + sp.eye(n) if with_extra else None
    ref = reference_slot_map(conn, n, extra)
    for dtype in (np.int32, np.int64):
        fast = build_slot_map(conn.astype(dtype), n, extra)
        full = build_slot_map(conn.astype(dtype), n, extra, repeat_rows=False)
        pat = build_pattern(conn.astype(dtype), n, extra)
        pat_full = build_pattern(conn.astype(dtype), n, extra, repeat_rows=False)
        for i, (r, f, g) in enumerate(zip(ref, fast, full)):
            np.testing.assert_array_equal(f, r, err_msg=f"array {i}")
            np.testing.assert_array_equal(g, r, err_msg=f"array {i}")
            assert f.dtype == g.dtype
        for p in (pat, pat_full):
            for got, want in zip(p, (fast[0], fast[1], fast[5])):
                np.testing.assert_array_equal(got, want)
                assert got.dtype == want.dtype


def test_repeated_rows_are_found_in_vector_patterns():
    """The copy path is taken: 2 of the 3 rows of each free node of a 3D elasticity pattern repeat the row above."""
    m = box(3, 2, 2, cell="hexahedron")
    conn, n = _elasticity_conn(m, fem.boundary_dofs(m, "left", [0, 1, 2]))
    conn = np.ascontiguousarray(conn)
    ptr = np.zeros(n + 1, dtype=np.int64)
    _pattern.incidence_count(conn, n, ptr)
    elem, loc = np.empty(ptr[n], dtype=np.int32), np.empty(ptr[n], dtype=np.int16)
    _pattern.incidence_fill(conn, ptr, elem, loc)
    x_ptr = np.zeros(n + 1, dtype=np.int64)
    shifts = np.array([_pattern.row_shift(ptr, elem, loc, x_ptr, i) for i in range(n)])
    assert n == 3 * (4 * 3 * 3 - 3 * 3)
    np.testing.assert_array_equal(shifts[0::3], _pattern.BUILD)
    np.testing.assert_array_equal(shifts[1::3], 1)  # local row a + 1 of every element: x -> y
    np.testing.assert_array_equal(shifts[2::3], 1)
    assert all(_pattern.same_elements(ptr, elem, x_ptr, i) == (i % 3 != 0) for i in range(n))


def test_operator_pattern_is_the_slot_map_pattern_and_assembles_like_coo():
    m = box(3, 2, 3, cell="hexahedron")
    conn, n = _elasticity_conn(m, fem.boundary_dofs(m, "left", [0, 1, 2]))
    KE = fem.q1_elasticity(box(1, 1, 1, cell="hexahedron"), E=1.0, nu=0.3)[0]
    A = ElementCoefficientMatrix(conn, KE, n=n)
    ref = reference_slot_map(conn, n)
    np.testing.assert_array_equal(A.indptr, ref[0])
    np.testing.assert_array_equal(A.indices, ref[1])
    np.testing.assert_array_equal(A._slot_ptr, ref[2])
    np.testing.assert_array_equal(A._slot_elem, ref[3])
    np.testing.assert_array_equal(A._slot_loc, ref[4])
    p = np.linspace(0.2, 1.0, m.n_cells)
    dense = fem.assemble(conn, p[:, None, None] * KE, n).toarray()
    np.testing.assert_allclose(A.assemble(p).toarray(), dense, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------------------------------- filter
def _kdtree_filter(centers, radius, volumes=None, monkeypatch=None):
    monkeypatch.setattr(maps_module, "_grid_weights", lambda *args: None)
    try:
        return DensityFilter(centers, radius, volumes)
    finally:
        monkeypatch.undo()


def _assert_same_csr(A, B):
    for name in ("indptr", "indices", "data"):
        a, b = getattr(A, name), getattr(B, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)


GRIDS = {
    "rect-7x5": lambda: rectangle(7, 5, 7.0, 5.0, cell="quad"),
    "rect-9x1": lambda: rectangle(9, 1, 9.0, 1.0, cell="quad"),
    "rect-1x6": lambda: rectangle(1, 6, 1.0, 6.0, cell="quad"),
    "rect-11x3-scaled": lambda: rectangle(11, 3, 1.3, 0.7, cell="quad"),
    "box-5x3x7": lambda: box(5, 3, 7, 5.0, 3.0, 7.0, cell="hexahedron"),
    "box-3x1x4": lambda: box(3, 1, 4, 3.0, 1.0, 4.0, cell="hexahedron"),
    "box-4x5x3-scaled": lambda: box(4, 5, 3, 0.9, 1.7, 0.3, cell="hexahedron"),
    "box-1x1x1": lambda: box(1, 1, 1, cell="hexahedron"),
}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("rmin", [1.0, 1.5, 2.5, 3.0])
def test_grid_filter_equals_the_kdtree_filter(grid, rmin, monkeypatch):
    mesh = GRIDS[grid]()
    centers = mesh.cell_centers()
    h = (mesh.points.max(axis=0) - mesh.points.min(axis=0)) / np.maximum(
        np.array([len(np.unique(mesh.points[:, a])) - 1 for a in range(mesh.dim)]), 1)
    assert maps_module._grid_weights(centers, rmin) is not None  # the stencil path is taken
    for radius in (rmin, rmin * float(h[0]), rmin * float(h.max())):  # in cells of the first / widest axis
        for volumes in (None, mesh.cell_volumes() * np.linspace(1.0, 2.0, mesh.n_cells)):
            fast = DensityFilter(centers, radius, volumes)
            slow = _kdtree_filter(centers, radius, volumes, monkeypatch)
            _assert_same_csr(fast.L, slow.L)
            _assert_same_csr(fast._LT, slow._LT)


def test_grid_filter_on_pairs_exactly_at_the_radius(monkeypatch):
    """Radii equal to (and one ulp around) a computed centre distance: the same pairs in and out."""
    rng = np.random.default_rng(11)
    for mesh in (box(6, 4, 5, 1.1, 0.7, 0.9, cell="hexahedron"), rectangle(9, 7, 0.3, 0.8, cell="quad")):
        c = mesh.cell_centers()
        for e, f in rng.integers(0, mesh.n_cells, (8, 2)):
            if e == f:
                continue
            s = 0.0
            for d in c[e] - c[f]:
                s += d * d
            r = np.sqrt(s)
            for radius in (r, np.nextafter(r, 0.0), np.nextafter(r, np.inf)):
                _assert_same_csr(DensityFilter(c, radius).L, _kdtree_filter(c, radius, None, monkeypatch).L)


def test_grid_filter_values_in_one_dimension():
    """Cone weights on centres 0.5, 1.5, ..., r = 1.5: w = 1.5 on the diagonal, 0.5 to each neighbour."""
    F = DensityFilter((np.arange(5) + 0.5)[:, None], 1.5)
    L = F.L.toarray()
    np.testing.assert_allclose(L[0, :2], [0.75, 0.25], rtol=1e-15)
    np.testing.assert_allclose(L[2, 1:4], [0.2, 0.6, 0.2], rtol=1e-15)
    np.testing.assert_array_equal(L[2, [0, 4]], 0.0)
    np.testing.assert_allclose(L.sum(axis=1), 1.0, rtol=1e-15)
    assert F.L.nnz == 2 + 3 * 3 + 2


def test_filter_off_the_grid_takes_the_kdtree():
    rng = np.random.default_rng(0)
    assert maps_module._grid_weights(rng.uniform(0, 4, (40, 2)), 1.2) is None
    c = rectangle(4, 3, cell="quad").cell_centers()
    assert maps_module._grid_weights(c[::-1].copy(), 0.5) is None  # not numbered x fastest
    assert maps_module._grid_weights(np.zeros((4, 1)), 1.0) is None  # coincident points
    perturbed = c.copy()
    perturbed[5, 0] += 0.01
    assert maps_module._grid_weights(perturbed, 0.5) is None
    assert maps_module._lattice(box(4, 5, 3, cell="hexahedron").cell_centers())[0] == (4, 5, 3)


# ------------------------------------------------------------------------------------------------------- mesh
def _perturbed(mesh, seed, amount=0.03):
    rng = np.random.default_rng(seed)
    pts = mesh.points + amount * rng.standard_normal(mesh.points.shape)
    return Mesh(pts, mesh.cells, mesh.cell_type)


def _numpy_signed_volumes(mesh):
    info = CELLS[mesh.cell_type]
    if info.simplex:
        xe = mesh.points[mesh.cells]
        return np.linalg.det(xe[:, 1:, :] - xe[:, :1, :]) / {2: 2.0, 3: 6.0}[info.dim]
    xq, wq = tensor_gauss(info.dim, 2)
    _, dn = shape_functions(mesh.cell_type, xq)
    return np.linalg.det(jacobians(mesh.points, mesh.cells, dn)) @ wq


MESHES = {
    "hex": lambda: box(3, 4, 5, 1.5, 2.0, 1.0, cell="hexahedron"),
    "tet": lambda: box(3, 2, 3, cell="tetra"),
    "quad": lambda: rectangle(5, 3, 2.0, 1.0, cell="quad"),
    "tri": lambda: rectangle(4, 5),
}


@pytest.mark.parametrize("kind", sorted(MESHES))
def test_volumes_and_centres_match_the_numpy_formulas(kind):
    exact = MESHES[kind]()
    for mesh in (exact, _perturbed(exact, 1)):
        np.testing.assert_allclose(mesh.signed_volumes(), _numpy_signed_volumes(mesh), rtol=1e-13)
        np.testing.assert_array_equal(mesh.cell_centers(), mesh.points[mesh.cells].mean(axis=1))
    per_cell = {"hex": 1.5 * 2.0 * 1.0 / 60, "tet": 1.0 / 108, "quad": 2.0 / 15, "tri": 1.0 / 40}[kind]
    np.testing.assert_allclose(exact.cell_volumes(), per_cell, rtol=1e-13)


def test_check_still_finds_inverted_and_tangled_cells():
    m = box(2, 1, 1, cell="hexahedron")
    assert m.check() is m
    flipped = Mesh(m.points, m.cells[:, CELLS["hexahedron"].flip], "hexahedron")
    assert np.all(flipped.signed_volumes() < 0)
    with pytest.raises(Exception, match="inverted"):
        flipped.check()
    q = rectangle(1, 1, cell="quad")
    pts = q.points.copy()
    pts[2] = [0.2, 0.2]  # a dart: positive area, det J < 0 at a vertex
    with pytest.raises(Exception, match="tangled"):
        Mesh(pts, q.cells, "quad").check()


# ----------------------------------------------------------------------------------------------- topology
def test_nodes_at_matches_a_search_over_all_nodes():
    from problems import topology_compliance as tc

    mesh = box(5, 3, 4, 5.0, 3.0, 4.0, cell="hexahedron")
    pts = [(5.0, 0.0, z) for z in range(5)] + [(0.0, 3.0, 2.0)]
    want = [int(np.argmin(np.abs(mesh.points - np.array(p)).max(axis=1))) for p in pts]
    np.testing.assert_array_equal(tc._nodes_at(mesh, pts), want)
    assert tc._node_at(mesh, (2.0, 1.0, 3.0)) == (3 * 4 + 1) * 6 + 2
    with pytest.raises(RuntimeError, match="no mesh node"):
        tc._nodes_at(mesh, [(5.0, 0.0, 0.0), (5.0, 0.5, 0.0)])


@pytest.mark.parametrize("case,size", [("cantilever3d", (5, 3, 3)), ("mbb", (7, 3, None))])
def test_topology_build_loads_supports_filter_and_pattern(case, size, monkeypatch):
    from problems import topology_compliance as tc

    nelx, nely, nelz = size
    pb = tc.build(case, nelx, nely, nelz)
    mesh, dm, load = pb.meta["mesh"], pb.meta["dofmap"], pb.meta["load"]
    dim = mesh.dim
    if case == "cantilever3d":
        edge = [int(np.argmin(np.abs(mesh.points - [nelx, 0.0, z]).max(axis=1))) for z in range(nelz + 1)]
        w = np.full(nelz + 1, -1.0 / nelz)
        w[[0, -1]] *= 0.5
        np.testing.assert_array_equal(np.flatnonzero(load), np.sort(3 * np.array(edge) + 1))
        np.testing.assert_allclose(load[3 * np.array(edge) + 1], w, rtol=1e-15)
        assert load.sum() == pytest.approx(-1.0, rel=1e-14)
    else:
        top_left = int(np.argmin(np.abs(mesh.points - [0.0, nely]).max(axis=1)))
        corner = int(np.argmin(np.abs(mesh.points - [nelx, 0.0]).max(axis=1)))
        np.testing.assert_array_equal(np.flatnonzero(load), [2 * top_left + 1])
        assert 2 * corner + 1 in dm.fixed
    conn = dm.restrict(fem.vector_dofs(mesh.cells, dim))
    ref = reference_slot_map(conn, dm.n_free)
    A = pb.functional.matrix
    np.testing.assert_array_equal(A.indptr, ref[0])
    np.testing.assert_array_equal(A.indices, ref[1])
    slow = _kdtree_filter(mesh.cell_centers(), 1.5, None, monkeypatch)
    _assert_same_csr(pb.meta["filter"].L, slow.L)
    np.testing.assert_allclose(pb.mass, 1.0, rtol=1e-13)
    assert pb.constraints[0][0].value(pb.p0) == pytest.approx(0.5, rel=1e-13)


def test_restrict_with_and_without_condensed_entries():
    dm = fem.condense(10, [1, 4, 9])
    c = np.array([[0, 1, 2], [3, 4, 5], [-1, 9, 8], [-3, 7, 6]])
    want = np.where(c >= 0, dm.full_to_free[np.maximum(c, 0)], -1)
    np.testing.assert_array_equal(dm.restrict(c), want)
    np.testing.assert_array_equal(dm.restrict(c[:2]), want[:2])
    assert dm.restrict(c.astype(np.int32)).dtype == np.int64
    assert dm.restrict(np.zeros((0, 3), dtype=np.int64)).shape == (0, 3)
    with pytest.raises(fem.FemError, match="refers to a dof >= n"):
        dm.restrict(np.array([[0, 10]]))
