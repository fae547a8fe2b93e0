"""File I/O through meshio: VTU round trip, gmsh physical groups, errors, atomic writes."""

import sys

import numpy as np
import pytest

meshio = pytest.importorskip("meshio")

from adjopt.errors import ShapeError
from adjopt.mesh import Mesh, MeshError, box, read, rectangle, write_vtu


def test_vtu_round_trip_2d(tmp_path):
    m = rectangle(3, 2, 3.0, 2.0)
    temp = m.points[:, 0] ** 2 + m.points[:, 1]
    disp = np.column_stack([m.points[:, 1], -m.points[:, 0]])
    density = np.linspace(0.1, 1.0, m.n_cells)
    path = write_vtu(tmp_path / "out.vtu", m, point_data={"T": temp, "u": disp}, cell_data={"rho": density})
    assert path == tmp_path / "out.vtu"
    r = read(path)
    assert r.cell_type == "triangle" and r.dim == 2  # zero z column dropped
    np.testing.assert_array_equal(r.points, m.points)
    np.testing.assert_array_equal(r.cells, m.cells)
    np.testing.assert_array_equal(r.point_data["T"], temp)
    np.testing.assert_array_equal(r.point_data["u"], disp)
    np.testing.assert_array_equal(r.cell_data["rho"], density)
    np.testing.assert_array_equal(r.boundary("all"), m.boundary("all"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.vtu"]  # no temporary left behind


def test_vtu_round_trip_hex(tmp_path):
    m = box(2, 1, 1, 2.0, 1.0, 1.0, cell="hexahedron")
    write_vtu(tmp_path / "hex.vtu", m, cell_data={"id": np.arange(2)})
    r = read(str(tmp_path / "hex.vtu"))
    assert r.cell_type == "hexahedron"
    np.testing.assert_array_equal(r.cells, m.cells)
    np.testing.assert_allclose(r.cell_volumes(), [1.0, 1.0])
    np.testing.assert_array_equal(r.cell_data["id"], [0, 1])
    r.check()


def _gmsh_square(tmp_path, extra_point=True):
    pts = [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]] + ([[5, 5, 0]] if extra_point else [])
    cells = [
        ("triangle", np.array([[0, 1, 2], [0, 2, 3]])),
        ("line", np.array([[0, 3]])),
        ("line", np.array([[1, 2], [2, 3]])),
    ]
    cell_data = {"gmsh:physical": [np.array([10, 10]), np.array([1]), np.array([2, 3])],
                 "gmsh:geometrical": [np.array([1, 1]), np.array([1]), np.array([2, 3])]}
    field_data = {"domain": np.array([10, 2]), "left": np.array([1, 1]), "right": np.array([2, 1]),
                  "top": np.array([3, 1])}
    m = meshio.Mesh(np.array(pts, float), cells, cell_data=cell_data, field_data=field_data)
    path = tmp_path / "square.msh"
    meshio.write(path, m, file_format="gmsh22", binary=False)
    return path


def test_gmsh_physical_groups_become_boundaries(tmp_path):
    r = read(_gmsh_square(tmp_path))
    assert r.cell_type == "triangle" and r.n_cells == 2
    assert r.n_nodes == 4  # the unused node 4 is removed
    np.testing.assert_array_equal(r.boundary("left"), [0, 3])
    np.testing.assert_array_equal(r.boundary("right"), [1, 2])
    np.testing.assert_array_equal(r.boundary("top"), [2, 3])
    np.testing.assert_array_equal(r.boundary("all"), [0, 1, 2, 3])
    assert "domain" not in r.boundaries  # 2D group, not a boundary
    np.testing.assert_array_equal(r.cell_data["gmsh:physical"], [10, 10])
    np.testing.assert_allclose(r.cell_volumes(), [0.5, 0.5])


def test_unused_nodes_removed_and_data_renumbered(tmp_path):
    pts = np.array([[9, 9, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], float)  # node 0 unused
    p = tmp_path / "unused.vtu"
    meshio.write(p, meshio.Mesh(pts, [("triangle", np.array([[1, 2, 3]]))],
                                point_data={"f": np.array([-1.0, 1.0, 2.0, 3.0])}))
    r = read(p)
    np.testing.assert_array_equal(r.points, [[0, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(r.cells, [[0, 1, 2]])
    np.testing.assert_array_equal(r.point_data["f"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(r.boundary("all"), [0, 1, 2])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.msh"
    with pytest.raises(FileNotFoundError, match="mesh file not found") as info:
        read(missing)
    assert str(missing) in str(info.value)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.msh"
    bad.write_text("$MeshFormat\ngarbage\n")
    with pytest.raises(MeshError, match="meshio could not read"):
        read(bad)


def test_no_supported_cells_lists_found(tmp_path):
    p = tmp_path / "lines.vtu"
    meshio.write(p, meshio.Mesh(np.zeros((3, 3)), [("line", np.array([[0, 1], [1, 2]]))]))
    with pytest.raises(MeshError, match=r"no supported cells: found cell blocks \['line'\]"):
        read(p)


def test_mixed_cell_types_rejected(tmp_path):
    pts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0, 0]], float)
    p = tmp_path / "mixed.vtu"
    meshio.write(p, meshio.Mesh(pts, [("quad", np.array([[0, 1, 2, 3]])), ("triangle", np.array([[1, 4, 2]]))]))
    with pytest.raises(MeshError, match="mixes cell types"):
        read(p)


def test_surface_mesh_in_3d_rejected(tmp_path):
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 1.0]])
    p = tmp_path / "surf.vtu"
    meshio.write(p, meshio.Mesh(pts, [("triangle", np.array([[0, 1, 2]]))]))
    with pytest.raises(MeshError, match="non-zero z coordinates"):
        read(p)


def test_highest_dimension_block_is_used(tmp_path):
    m = box(1, 1, 1, cell="tetra")
    p = tmp_path / "tets.vtu"
    meshio.write(p, meshio.Mesh(m.points, [("triangle", m.boundary_facets()), ("tetra", m.cells)]))
    r = read(p)
    assert r.cell_type == "tetra" and r.n_cells == 6


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(point_data={"T": np.zeros(3)}), ShapeError, r"point_data 'T' has shape \(3,\) but needs 6 rows"),
        (dict(cell_data={"rho": np.zeros((5, 2))}), ShapeError, r"cell_data 'rho' .* needs 4 rows"),
        (dict(cell_data={"s": np.array(["a"] * 4)}), MeshError, "cell_data 's' must be numeric"),
        (dict(point_data={"c": 1.0}), ShapeError, "point_data 'c'"),
    ],
)
def test_write_vtu_field_errors(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        write_vtu(tmp_path / "x.vtu", rectangle(2, 1), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_write_vtu_path_errors(tmp_path):
    m = rectangle(1, 1)
    with pytest.raises(MeshError, match="ending in '.vtu'"):
        write_vtu(tmp_path / "x.vtk", m)
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        write_vtu(tmp_path / "missing" / "x.vtu", m)


def test_write_vtu_is_atomic(tmp_path, monkeypatch):
    m = rectangle(1, 1)
    target = tmp_path / "keep.vtu"
    write_vtu(target, m, point_data={"T": np.arange(4.0)})
    before = target.read_bytes()

    def broken_write(filename, mesh, file_format=None, **kw):
        with open(filename, "w") as fh:
            fh.write("<half")
        raise OSError("disk full")

    monkeypatch.setattr(meshio, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_vtu(target, m, point_data={"T": np.zeros(4)})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.vtu"]


def test_meshio_missing_gives_install_hint(tmp_path, monkeypatch):
    p = tmp_path / "m.vtu"
    write_vtu(p, rectangle(1, 1))
    monkeypatch.setitem(sys.modules, "meshio", None)
    with pytest.raises(ImportError, match=r"pip install 'adjopt\[mesh\]'") as info:
        read(p)
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(ImportError, match=r"adjopt\[mesh\]"):
        write_vtu(tmp_path / "n.vtu", rectangle(1, 1))


def test_read_returns_checkable_mesh(tmp_path):
    m = Mesh([[0, 0], [1, 0], [0, 1]], [[0, 2, 1]], "triangle")  # clockwise
    p = tmp_path / "cw.vtu"
    write_vtu(p, m)
    r = read(p)
    with pytest.raises(MeshError, match="inverted"):
        r.check()
    r.oriented().check()


@pytest.mark.parametrize("name, content", [("empty.vtu", b""), ("corrupt.vtu", b"<VTKFile type='Unstr"),
                                           ("garbage.msh", b"\x00\x01 not a mesh")])
def test_a_file_meshio_gives_up_on_is_a_mesh_error(tmp_path, name, content):
    pytest.importorskip("meshio")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MeshError, match="meshio could not read"):  # meshio calls sys.exit for some of them
        read(path)
