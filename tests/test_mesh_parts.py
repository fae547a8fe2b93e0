"""Rank-local slabs (adjopt.mesh.parts) against the serial generators."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from adjopt.mesh import MeshError, box, rectangle, unit_cube, unit_square
from adjopt.mesh.parts import MeshPart, box_part, rectangle_part, unit_cube_part, unit_square_part

# (name, global mesh factory, part factory, number of cell layers along the last axis)
CASES = [
    ("rect-tri", lambda: rectangle(3, 5, 2.0, 0.7, "triangle"),
     lambda **kw: rectangle_part(3, 5, 2.0, 0.7, "triangle", **kw), 5),
    ("rect-quad", lambda: rectangle(4, 3, 0.3, 1.9, "quad"),
     lambda **kw: rectangle_part(4, 3, 0.3, 1.9, "quad", **kw), 3),
    ("unit-square", lambda: unit_square(4), lambda **kw: unit_square_part(4, **kw), 4),
    ("unit-square-quad", lambda: unit_square(3, "quad"), lambda **kw: unit_square_part(3, "quad", **kw), 3),
    ("box-tet", lambda: box(2, 3, 4, 1.5, 0.5, 2.5, "tetra"),
     lambda **kw: box_part(2, 3, 4, 1.5, 0.5, 2.5, "tetra", **kw), 4),
    ("box-hex", lambda: box(3, 2, 5, 0.7, 1.1, 0.9, "hexahedron"),
     lambda **kw: box_part(3, 2, 5, 0.7, 1.1, 0.9, "hexahedron", **kw), 5),
    ("unit-cube", lambda: unit_cube(3), lambda **kw: unit_cube_part(3, **kw), 3),
    ("unit-cube-hex", lambda: unit_cube(2, "hexahedron"), lambda **kw: unit_cube_part(2, "hexahedron", **kw), 2),
]
IDS = [c[0] for c in CASES]
SIZES = [1, 2, 3, 4, 5]


def _parts(make_part, size):
    return [make_part(rank=r, size=size) for r in range(size)]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    _, make_global, make_part, n_layers = request.param
    return make_global(), make_part, n_layers


@pytest.mark.parametrize("size", SIZES)
def test_parts_match_global(case, size):
    glob, make_part, n_layers = case
    if size > n_layers:
        with pytest.raises(MeshError, match="more ranks than cell layers"):
            make_part(rank=0, size=size)
        return
    parts = _parts(make_part, size)
    for p in parts:
        assert isinstance(p, MeshPart)
        n = p.mesh.n_cells
        # (1) points bit-identical
        assert p.nodes.dtype == np.int64
        assert np.all(np.diff(p.nodes) > 0)
        assert p.node_start == p.nodes[0]
        assert np.array_equal(p.mesh.points, glob.points[p.nodes])
        # (2) cells
        assert p.mesh.cell_type == glob.cell_type
        assert np.array_equal(p.global_cells(), glob.cells[p.cell_start:p.cell_start + n])
        assert p.n_global_nodes == glob.n_nodes
        assert p.n_global_cells == glob.n_cells
        assert (p.rank, p.size) == (parts.index(p), size)
        # (4) boundaries: global boundary restricted to the part's nodes
        assert set(p.mesh.boundaries) == set(glob.boundaries)
        for name, gb in glob.boundaries.items():
            local = p.mesh.boundaries[name]
            expected = np.intersect1d(gb, p.nodes)
            assert set(p.nodes[local].tolist()) == set(expected.tolist()), name
            assert np.array_equal(p.nodes[local], expected), name  # sorted as well
        # (6) ghosts = nodes of local cells that are not owned; every local node is used
        used = np.unique(p.mesh.cells)
        assert np.array_equal(used, np.arange(p.mesh.n_nodes))
        owned = set(p.owned_nodes.tolist())
        ghosts = set(p.nodes[p.n_owned:].tolist())
        assert ghosts == set(p.global_cells().ravel().tolist()) - owned
        assert p.n_ghosts == len(ghosts)
        assert np.array_equal(p.owned_nodes, p.node_start + np.arange(p.n_owned))
    # (3) owned nodes and cells partition the global ranges, in rank order
    owned_all = np.concatenate([p.owned_nodes for p in parts])
    assert np.array_equal(owned_all, np.arange(glob.n_nodes))
    cells_all = np.concatenate([p.cell_start + np.arange(p.mesh.n_cells) for p in parts])
    assert np.array_equal(cells_all, np.arange(glob.n_cells))
    # slab layers follow the documented rule; ghosts belong to the next rank
    for r, p in enumerate(parts):
        assert p.layers == (r * n_layers // size, (r + 1) * n_layers // size)
        if r < size - 1:
            assert p.n_ghosts > 0
            nxt = parts[r + 1]
            assert np.array_equal(p.nodes[p.n_owned:], nxt.owned_nodes[: p.n_ghosts])
        else:
            assert p.n_ghosts == 0


def test_size_one_is_whole_mesh(case):
    glob, make_part, _ = case
    (p,) = _parts(make_part, 1)
    assert p.layers[0] == 0 and p.n_owned == glob.n_nodes and p.cell_start == 0
    assert np.array_equal(p.nodes, np.arange(glob.n_nodes))
    assert np.array_equal(p.mesh.points, glob.points)
    assert np.array_equal(p.mesh.cells, glob.cells)
    assert set(p.mesh.boundaries) == set(glob.boundaries)
    for name, gb in glob.boundaries.items():
        assert np.array_equal(p.mesh.boundaries[name], gb), name


def test_boundary_layers_2d():
    parts = _parts(lambda **kw: rectangle_part(2, 4, **kw), 2)
    assert parts[0].mesh.boundaries["bottom"].size == 3
    assert parts[0].mesh.boundaries["top"].size == 0
    assert parts[1].mesh.boundaries["bottom"].size == 0
    assert parts[1].mesh.boundaries["top"].size == 3
    # left / right include the ghost node of rank 0
    assert parts[0].nodes[parts[0].mesh.boundaries["left"]].tolist() == [0, 3, 6]


def test_boundary_layers_3d():
    parts = _parts(lambda **kw: box_part(1, 1, 3, **kw), 3)
    assert [p.mesh.boundaries["front"].size for p in parts] == [4, 0, 0]
    assert [p.mesh.boundaries["back"].size for p in parts] == [0, 0, 4]
    assert [p.mesh.boundaries["left"].size for p in parts] == [4, 4, 4]


def test_uneven_split_counts():
    # ny = 5 over 3 ranks: layers [0,1), [1,3), [3,5)
    parts = _parts(lambda **kw: rectangle_part(2, 5, cell="quad", **kw), 3)
    assert [p.layers for p in parts] == [(0, 1), (1, 3), (3, 5)]
    assert [p.n_owned for p in parts] == [3, 6, 9]
    assert [p.mesh.n_nodes for p in parts] == [6, 9, 9]
    assert [p.cell_start for p in parts] == [0, 2, 6]
    assert [p.mesh.n_cells for p in parts] == [2, 4, 4]


def test_comm_stand_in():
    comm = SimpleNamespace(rank=1, size=3)
    a = box_part(2, 2, 3, cell="hexahedron", comm=comm)
    b = box_part(2, 2, 3, cell="hexahedron", rank=1, size=3)
    assert (a.rank, a.size, a.layers) == (1, 3, (1, 2))
    assert np.array_equal(a.nodes, b.nodes)
    assert np.array_equal(a.mesh.cells, b.mesh.cells)
    assert np.array_equal(a.mesh.points, b.mesh.points)
    c = unit_square_part(3, comm=SimpleNamespace(rank=0, size=1))
    assert c.n_owned == 16


def test_mesh_part_is_frozen():
    p = unit_square_part(2, rank=0, size=1)
    with pytest.raises(AttributeError):
        p.rank = 1
    assert "rank=0" in repr(p)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rectangle_part(2, 3, rank=0, size=4), r"more ranks than cell layers along y: use at most 3 ranks"),
        (lambda: box_part(2, 9, 2, rank=0, size=3), r"more ranks than cell layers along z: use at most 2 ranks"),
        (lambda: unit_square_part(4, rank=2, size=2), r"rank must be in \[0, 2\)"),
        (lambda: unit_square_part(4, rank=-1, size=2), r"rank must be in \[0, 2\)"),
        (lambda: unit_square_part(4, rank=True, size=2), r"rank must be an integer, got True"),
        (lambda: unit_square_part(4, rank=0, size=2.0), r"size must be an integer"),
        (lambda: unit_square_part(4, rank=0, size=0), r"size must be >= 1"),
        (lambda: unit_cube_part(2, rank=0, size=1, comm=SimpleNamespace(rank=0, size=1)),
         r"either comm= or rank= and size=, not both"),
        (lambda: unit_cube_part(2), r"either comm= .* or both rank= and size="),
        (lambda: unit_cube_part(2, rank=0), r"either comm= .* or both rank= and size="),
        (lambda: unit_cube_part(2, comm=object()), r"comm must have \.rank and \.size"),
        (lambda: rectangle_part(0, 3, rank=0, size=1), r"nx must be >= 1"),
        (lambda: rectangle_part(2.5, 3, rank=0, size=1), r"nx must be an integer"),
        (lambda: box_part(2, 2, 2, lz=-1.0, rank=0, size=1), r"lz must be a positive finite length"),
        (lambda: rectangle_part(2, 2, cell="tetra", rank=0, size=1), r"unknown cell 'tetra'"),
        (lambda: box_part(2, 2, 2, cell="quad", rank=0, size=1), r"unknown cell 'quad'"),
    ],
)
def test_errors(call, match):
    with pytest.raises(MeshError, match=match):
        call()


def test_memory_proportional_to_part():
    import tracemalloc

    # the global mesh would have 201^3 ~ 8.1M nodes (~190 MB of points alone);
    # one slab of 1 cell layer has 2 * 201^2 nodes and 6 * 200^2 tets
    tracemalloc.start()
    try:
        p = box_part(200, 200, 200, rank=7, size=200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.mesh.n_nodes == 2 * 201**2 and p.mesh.n_cells == 6 * 200**2
    assert p.node_start == 7 * 201**2 and p.cell_start == 7 * 6 * 200**2
    assert peak < 40e6, peak
