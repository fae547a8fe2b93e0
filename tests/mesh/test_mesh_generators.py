"""Structured generators: counts, numbering, orientation, boundary sets, errors."""

import numpy as np
import pytest

from adjopt.mesh import MeshError, box, rectangle, unit_cube, unit_square


@pytest.mark.parametrize("cell, n_cells, k", [("triangle", 2 * 3 * 2, 3), ("quad", 3 * 2, 4)])
def test_rectangle_counts_and_orientation(cell, n_cells, k):
    m = rectangle(3, 2, 3.0, 1.0, cell=cell)
    assert (m.n_nodes, m.n_cells, m.nodes_per_cell, m.cell_type) == (12, n_cells, k, cell)
    m.check()
    assert np.all(m.signed_volumes() > 0)
    np.testing.assert_allclose(m.cell_volumes(), 3.0 / (n_cells))
    np.testing.assert_allclose(m.cell_volumes().sum(), 3.0)


def test_rectangle_numbering_x_fastest():
    m = rectangle(3, 2, 3.0, 4.0)
    i, j = 2, 1
    np.testing.assert_allclose(m.points[j * 4 + i], [2.0, 2.0])
    np.testing.assert_allclose(m.points[-1], [3.0, 4.0])


def test_rectangle_cells_explicit():
    q = rectangle(2, 1, cell="quad")
    np.testing.assert_array_equal(q.cells, [[0, 1, 4, 3], [1, 2, 5, 4]])
    t = rectangle(1, 1)
    np.testing.assert_array_equal(t.cells, [[0, 1, 3], [0, 3, 2]])


def test_rectangle_boundaries():
    m = rectangle(3, 2, 3.0, 2.0)
    np.testing.assert_array_equal(m.boundary("left"), [0, 4, 8])
    np.testing.assert_array_equal(m.boundary("right"), [3, 7, 11])
    np.testing.assert_array_equal(m.boundary("bottom"), [0, 1, 2, 3])
    np.testing.assert_array_equal(m.boundary("top"), [8, 9, 10, 11])
    np.testing.assert_array_equal(m.boundary("all"), [0, 1, 2, 3, 4, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(m.boundary("all"), np.unique(m.boundary_facets()))
    for name, axis, value in [("left", 0, 0.0), ("right", 0, 3.0), ("bottom", 1, 0.0), ("top", 1, 2.0)]:
        np.testing.assert_array_equal(np.flatnonzero(m.points[:, axis] == value), m.boundary(name))


def test_unit_square():
    m = unit_square(4)
    assert m.cell_type == "triangle" and m.n_cells == 32 and m.n_nodes == 25
    assert unit_square(4, "quad").n_cells == 16


@pytest.mark.parametrize("cell, per_cube", [("tetra", 6), ("hexahedron", 1)])
def test_box_counts_orientation_boundaries(cell, per_cube):
    m = box(2, 3, 4, 2.0, 3.0, 4.0, cell=cell)
    assert m.n_nodes == 3 * 4 * 5 and m.n_cells == per_cube * 24 and m.dim == 3
    m.check()
    assert np.all(m.signed_volumes() > 0)
    np.testing.assert_allclose(m.cell_volumes().sum(), 24.0)
    np.testing.assert_allclose(m.cell_volumes(), 1.0 / per_cube)
    for name, axis, value in [("left", 0, 0), ("right", 0, 2), ("bottom", 1, 0), ("top", 1, 3),
                              ("front", 2, 0), ("back", 2, 4)]:
        np.testing.assert_array_equal(np.flatnonzero(m.points[:, axis] == value), m.boundary(name))
    np.testing.assert_array_equal(m.boundary("all"), np.unique(m.boundary_facets()))
    assert m.boundary("all").size == 60 - 1 * 2 * 3


def test_box_numbering_and_hex_vtk_order():
    m = box(2, 1, 1, cell="hexahedron")
    # node (i, j, l) = (l*(ny+1) + j)*(nx+1) + i
    np.testing.assert_allclose(m.points[(1 * 2 + 1) * 3 + 2], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(m.cells[0], [0, 1, 4, 3, 6, 7, 10, 9])
    xc = m.points[m.cells[0]] * [2, 1, 1]  # first cube scaled to the unit cube
    np.testing.assert_allclose(xc, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0],
                                   [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]])


def test_tets_are_conforming():
    """Every interior triangle is shared by exactly two tets (no hanging faces)."""
    m = unit_cube(2)
    faces = np.sort(m.cells[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3), axis=1)
    _, counts = np.unique(faces, axis=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    assert np.sum(counts == 1) == 6 * 4 * 2  # boundary triangles: 6 sides x 4 squares x 2
    assert unit_cube(2, "hexahedron").n_cells == 8


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rectangle(0, 2), "nx must be >= 1"),
        (lambda: rectangle(2, -1), "ny must be >= 1"),
        (lambda: rectangle(2.5, 2), "nx must be an integer"),
        (lambda: rectangle(True, 2), "nx must be an integer"),
        (lambda: rectangle(2, 2, lx=0.0), "lx must be a positive finite length"),
        (lambda: rectangle(2, 2, ly="a"), "ly must be a positive number"),
        (lambda: rectangle(2, 2, cell="tetra"), "unknown cell 'tetra'; use 'triangle' or 'quad'"),
        (lambda: unit_square(0), "nx must be >= 1"),
        (lambda: box(1, 1, 0), "nz must be >= 1"),
        (lambda: box(1, 1, 1, lz=-1), "lz must be a positive finite length"),
        (lambda: box(1, 1, 1, cell="quad"), "unknown cell 'quad'; use 'tetra' or 'hexahedron'"),
        (lambda: unit_cube(2, cell="prism"), "unknown cell 'prism'"),
    ],
)
def test_generator_errors(call, match):
    with pytest.raises(MeshError, match=match):
        call()
