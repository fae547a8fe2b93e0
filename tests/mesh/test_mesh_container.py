"""Mesh container: validation, geometry, boundaries, element checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adjopt.errors import ShapeError
from adjopt.mesh import InvalidElementError, Mesh, MeshError, UnknownBoundaryError, box, unit_square

TRI_PTS = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TRI_CELLS = np.array([[0, 1, 2], [1, 3, 2]])


def two_triangles(**kw):
    return Mesh(TRI_PTS, TRI_CELLS, "triangle", **kw)


# ----------------------------------------------------------------- construction
def test_basic_properties():
    m = two_triangles()
    assert (m.dim, m.n_nodes, m.n_cells, m.nodes_per_cell) == (2, 4, 2, 3)
    assert m.points.dtype == np.float64 and m.cells.dtype == np.int64
    # the outer square's 4 edges are the boundary; the diagonal 1-2 is interior
    facets = m.boundary_facets()
    assert sorted(map(tuple, np.sort(facets, axis=1).tolist())) == [(0, 1), (0, 2), (1, 3), (2, 3)]
    np.testing.assert_array_equal(m.boundary("all"), [0, 1, 2, 3])
    assert "Mesh(cell_type='triangle'" in repr(m)


def test_boundaries_sorted_unique_and_given_all_kept():
    m = two_triangles(boundaries={"left": [2, 0, 2], "all": [0, 1]})
    np.testing.assert_array_equal(m.boundary("left"), [0, 2])
    np.testing.assert_array_equal(m.boundary("all"), [0, 1])
    assert m.boundary_names == ["all", "left"]


def test_float_integer_cells_accepted():
    m = Mesh(TRI_PTS, TRI_CELLS.astype(float), "triangle")
    assert m.cells.dtype == np.int64


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(cell_type="prism"), MeshError, "unsupported cell_type 'prism'"),
        (dict(points=TRI_PTS[:, :1]), ShapeError, r"shape \(N, 2\)"),
        (dict(points=np.array([["a", "b"]])), MeshError, "numeric"),
        (dict(points=np.zeros((0, 2)), cells=np.zeros((0, 3), int)), MeshError, "no points"),
        (dict(cells=np.zeros((0, 3), int)), MeshError, "no cells"),
        (dict(cells=TRI_CELLS[:, :2]), ShapeError, r"\(E, 3\)"),
        (dict(cells=np.array([[0, 1, 2], [1, 4, 2]])), MeshError, "cell 1 has vertex indices"),
        (dict(cells=np.array([[0, 1, -1]])), MeshError, "cell 0"),
        (dict(cells=np.array([[0.5, 1, 2]])), MeshError, "integer node indices"),
        (dict(boundaries={"left": [0, 9]}), MeshError, "boundary 'left' refers to node 9"),
        (dict(boundaries={"left": [0.5]}), MeshError, "boundary 'left'"),
        (dict(boundaries={3: [0]}), MeshError, "names must be strings"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    args = dict(points=TRI_PTS, cells=TRI_CELLS, cell_type="triangle")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        Mesh(args["points"], args["cells"], args["cell_type"], args.get("boundaries"))


def test_field_lengths_checked():
    m = two_triangles(point_data={"T": np.arange(4.0)}, cell_data={"rho": [1.0, 2.0]})
    np.testing.assert_array_equal(m.cell_data["rho"], [1.0, 2.0])
    with pytest.raises(ShapeError, match=r"point_data 'T' has shape \(3,\) but needs 4 rows"):
        two_triangles(point_data={"T": np.arange(3.0)})
    with pytest.raises(ShapeError, match="cell_data 'rho' .* needs 2 rows"):
        two_triangles(cell_data={"rho": 1.0})


def test_non_manifold_facets_warn(caplog):
    pts = [[0, 0], [1, 0], [0.5, 1], [0.5, -1], [0.5, 2]]
    m = Mesh(pts, [[0, 1, 2], [1, 0, 3], [0, 1, 4]], "triangle")  # edge 0-1 in three cells
    assert "shared by more than two cells" in caplog.text
    assert m.boundary_facets().shape == (6, 2)


def test_nonfinite_point_is_named():
    pts = TRI_PTS.copy()
    pts[3, 1] = np.nan
    with pytest.raises(MeshError, match="point 3 has a NaN"):
        Mesh(pts, TRI_CELLS, "triangle")


def test_unknown_boundary_lists_known_names():
    m = unit_square(2)
    with pytest.raises(UnknownBoundaryError) as info:
        m.boundary("inlet")
    msg = str(info.value)
    assert "'inlet'" in msg
    for name in ("all", "bottom", "left", "right", "top"):
        assert f"'{name}'" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert not msg.startswith('"')  # plain message, not KeyError's repr


# --------------------------------------------------------------------- geometry
def test_volumes_and_centers_by_hand():
    m = two_triangles()
    np.testing.assert_allclose(m.signed_volumes(), [0.5, 0.5])
    np.testing.assert_allclose(m.cell_centers(), [[1 / 3, 1 / 3], [2 / 3, 2 / 3]])
    tet = Mesh(np.vstack([np.zeros(3), np.eye(3) * [1.0, 2.0, 3.0]]), [[0, 1, 2, 3]], "tetra")
    np.testing.assert_allclose(tet.cell_volumes(), [1.0])  # 1*2*3/6
    quad = Mesh([[0, 0], [2, 0], [3, 1], [0, 1]], [[0, 1, 2, 3]], "quad")  # trapezoid
    np.testing.assert_allclose(quad.cell_volumes(), [2.5])
    hexa = box(1, 1, 1, 2.0, 3.0, 0.5, cell="hexahedron")
    np.testing.assert_allclose(hexa.cell_volumes(), [3.0])


def test_volume_of_distorted_hex_is_exact():
    rng = np.random.default_rng(0)
    m = box(2, 2, 2, cell="hexahedron")
    m.points[:] += 0.05 * rng.standard_normal(m.points.shape)
    # 2x2x2 Gauss is exact for det J of a trilinear map: compare with a 6x6x6 rule
    from adjopt.mesh._reference import jacobians, shape_functions, tensor_gauss

    xq, wq = tensor_gauss(3, 6)
    _, dn = shape_functions("hexahedron", xq)
    ref = np.linalg.det(jacobians(m.points, m.cells, dn)) @ wq
    np.testing.assert_allclose(m.signed_volumes(), ref, rtol=1e-13)


def test_oriented_flips_clockwise_cells():
    cells = TRI_CELLS.copy()
    cells[1] = cells[1, [0, 2, 1]]
    m = Mesh(TRI_PTS, cells, "triangle")
    assert m.signed_volumes()[1] < 0
    fixed = m.oriented()
    fixed.check()
    np.testing.assert_allclose(fixed.signed_volumes(), [0.5, 0.5])
    np.testing.assert_array_equal(fixed.cells[0], TRI_CELLS[0])


@pytest.mark.parametrize("cell", ["quad", "hexahedron"])
def test_oriented_flips_tensor_cells(cell):
    m = unit_square(2, cell) if cell == "quad" else box(1, 2, 1, cell=cell)
    flipped = Mesh(m.points, m.cells[:, [0, 3, 2, 1] if cell == "quad" else [0, 3, 2, 1, 4, 7, 6, 5]], cell)
    assert np.all(flipped.signed_volumes() < 0)
    np.testing.assert_array_equal(flipped.oriented().cells, m.cells)


# ----------------------------------------------------------------------- check
def test_check_detects_inverted_element():
    cells = np.array([[0, 1, 2], [1, 2, 3]])  # second is clockwise
    m = Mesh(TRI_PTS, cells, "triangle")
    with pytest.raises(InvalidElementError, match=r"cell 1 \(vertices \[1, 2, 3\].*inverted.*clockwise") as info:
        m.check()
    assert info.value.element == 1


def test_check_detects_inverted_tet():
    m = box(1, 1, 1, cell="tetra")
    m.cells[4] = m.cells[4, [1, 0, 2, 3]]
    with pytest.raises(InvalidElementError, match="cell 4 .*negative orientation") as info:
        m.check()
    assert info.value.element == 4


def test_check_detects_degenerate_element():
    pts = np.vstack([TRI_PTS, [[2.0, 2.0]]])  # node 4 on the line through 0 and 3
    cells = np.array([[0, 1, 2], [1, 3, 2], [0, 3, 4]])
    with pytest.raises(InvalidElementError, match="cell 2 .*degenerate") as info:
        Mesh(pts, cells, "triangle").check()
    assert info.value.element == 2


def test_check_detects_nonconvex_quad():
    pts = np.array([[0, 0], [2, 0], [0.5, 0.5], [0, 2]], float)  # dart: positive area, reflex corner
    m = Mesh(pts, [[0, 1, 2, 3]], "quad")
    assert m.signed_volumes()[0] == pytest.approx(1.0)
    with pytest.raises(InvalidElementError, match="cell 0 .*tangled.*non-convex"):
        m.check()


def test_check_reports_first_of_several_and_count():
    m = unit_square(3)
    m.cells[[5, 7]] = m.cells[[5, 7]][:, [0, 2, 1]]
    with pytest.raises(InvalidElementError, match=r"cell 5 .*\[2 bad cells in total\]"):
        m.check()


def test_check_returns_self():
    m = unit_square(2)
    assert m.check() is m


@settings(max_examples=25, deadline=None)
@given(st.floats(0.1, 10), st.floats(-2, 2), st.floats(0.1, 10), st.integers(0, 3))
def test_facets_and_volume_invariant_under_affine_maps(a, b, c, seed):
    """Area scales by det A; boundary facet count is topological."""
    A = np.array([[a, b], [0.0, c]])
    m = unit_square(3, "triangle" if seed % 2 else "quad")
    mm = Mesh(m.points @ A.T, m.cells, m.cell_type, m.boundaries)
    np.testing.assert_allclose(mm.cell_volumes().sum(), a * c, rtol=1e-12)
    assert mm.boundary_facets().shape[0] == 12
    mm.check()


def test_boundary_facets_outward_and_owners():
    m = box(2, 1, 1, cell="tetra")
    facets, owners = m.boundary_facets(return_cells=True)
    assert facets.shape == (2 * (2 + 2 + 1) * 2, 3)
    xf = m.points[facets]
    normals = np.cross(xf[:, 1] - xf[:, 0], xf[:, 2] - xf[:, 0])
    outward = xf.mean(axis=1) - m.cell_centers()[owners]
    assert np.all(np.einsum("fi,fi->f", normals, outward) > 0)
    # facet areas sum to the surface of the unit cube
    np.testing.assert_allclose(0.5 * np.linalg.norm(normals, axis=1).sum(), 6.0)


def test_boundary_facets_hex_outward():
    m = box(1, 2, 1, cell="hexahedron")
    facets, owners = m.boundary_facets(return_cells=True)
    assert facets.shape == (10, 4)
    xf = m.points[facets]
    normals = np.cross(xf[:, 1] - xf[:, 0], xf[:, 3] - xf[:, 0])
    outward = xf.mean(axis=1) - m.cell_centers()[owners]
    assert np.all(np.einsum("fi,fi->f", normals, outward) > 0)
