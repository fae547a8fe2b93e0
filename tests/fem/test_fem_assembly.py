"""Assembly helpers, dof connectivity and load vectors."""

import numpy as np
import pytest

import adjopt.fem as F
from adjopt.errors import ShapeError
from adjopt.mesh import Mesh, UnknownBoundaryError, box, rectangle, unit_square


def test_assemble_two_triangles_by_hand():
    m = unit_square(1)  # cells [0, 1, 3], [0, 3, 2]
    A = F.assemble(m.cells, F.p1_stiffness(m), 4).toarray()
    expected = 0.5 * np.array([[2, -1, -1, 0], [-1, 2, 0, -1], [-1, 0, 2, -1], [0, -1, -1, 2]])
    np.testing.assert_allclose(A, expected, atol=1e-15)


def test_assemble_drops_negative_entries_and_sums_duplicates():
    conn = np.array([[0, -1], [0, 1]])
    local = np.array([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]])
    A = F.assemble(conn, local, 2)
    np.testing.assert_array_equal(A.toarray(), [[11.0, 20.0], [30.0, 40.0]])
    b = F.assemble_vector(conn, np.array([[1.0, 5.0], [2.0, 3.0]]), 3)
    np.testing.assert_array_equal(b, [3.0, 3.0, 0.0])


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: F.assemble(np.array([[0, 2]]), np.zeros((1, 2, 2)), 2), F.FemError, r"row 0 = \[0, 2\] .* >= n = 2"),
        (lambda: F.assemble(np.array([[0, 1]]), np.zeros((1, 3, 3)), 2), ShapeError, r"\(1, 2, 2\)"),
        (lambda: F.assemble(np.array([0.0, 1.0]), np.zeros((1, 2, 2)), 2), ShapeError, "integer"),
        (lambda: F.assemble(np.array([[0, 1]]), np.zeros((1, 2, 2)), -1), F.FemError, "non-negative integer"),
        (lambda: F.assemble_vector(np.array([[0, 1]]), np.zeros((1, 3)), 2), ShapeError, r"\(1, 2\)"),
        (lambda: F.vector_dofs(np.array([[0.0, 1.0]]), 2), ShapeError, "integer"),
        (lambda: F.vector_dofs(np.array([[0, 1]]), 0), F.FemError, "dim must be a positive integer"),
        (lambda: F.boundary_dofs(unit_square(1), "left", components=2), F.FemError, r"\[0, 1\]"),
        (lambda: F.point_load(4, [1, 4], 1.0), F.FemError, r"dof 4 is outside \[0, 3\]"),
        (lambda: F.point_load(4, [0.5], 1.0), F.FemError, "integers"),
        (lambda: F.point_load(4, [0, 1], [1.0, 2.0, 3.0]), ShapeError, "2 dofs but 3 values"),
        (lambda: F.point_load(4, [0], np.inf), F.FemError, "NaN or Inf"),
    ],
)
def test_assembly_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_vector_dofs_node_major():
    np.testing.assert_array_equal(F.vector_dofs(np.array([[0, 2, 5]]), 2), [[0, 1, 4, 5, 10, 11]])
    np.testing.assert_array_equal(F.vector_dofs(np.array([[1, 3]]), 3), [[3, 4, 5, 9, 10, 11]])


def test_boundary_dofs():
    m = rectangle(2, 1)  # left nodes 0, 3
    np.testing.assert_array_equal(F.boundary_dofs(m, "left"), [0, 3])
    np.testing.assert_array_equal(F.boundary_dofs(m, "left", components=[0, 1]), [0, 1, 6, 7])
    np.testing.assert_array_equal(F.boundary_dofs(m, "left", components=1), [1, 7])


def test_point_load():
    b = F.point_load(5, [1, 3, 1], [2.0, -1.0, 0.5])
    np.testing.assert_array_equal(b, [0, 2.5, 0, -1.0, 0])
    np.testing.assert_array_equal(F.point_load(3, 2, 4.0), [0, 0, 4.0])


# ---------------------------------------------------------------- body force
@pytest.mark.parametrize("mesh", [rectangle(3, 2, 3.0, 2.0), rectangle(3, 2, 3.0, 2.0, cell="quad"),
                                  box(2, 1, 1, 2.0, 1.0, 1.0), box(2, 1, 1, 2.0, 1.0, 1.0, cell="hexahedron")],
                         ids=["tri", "quad", "tet", "hex"])
def test_body_force_constant_and_nodal(mesh):
    area = mesh.cell_volumes().sum()
    b = F.body_force(mesh, 2.0)
    assert b.shape == (mesh.n_nodes,)
    np.testing.assert_allclose(b.sum(), 2.0 * area)
    np.testing.assert_allclose(b, 2.0 * F.lumped_mass(mesh))
    # nodal linear f: sum_i b_i = int f exactly; b = M f
    f = 1.0 + mesh.points[:, 0]
    bn = F.body_force(mesh, f)
    M = F.assemble(mesh.cells, F.mass_matrices(mesh), mesh.n_nodes)
    np.testing.assert_allclose(bn, M @ f, rtol=1e-13)
    lx = mesh.points[:, 0].max()
    np.testing.assert_allclose(bn.sum(), area * (1.0 + lx / 2), rtol=1e-13)  # mean of x is lx/2


def test_body_force_vector():
    m = rectangle(2, 2, 2.0, 1.0, cell="quad")
    g = np.array([0.0, -9.81])
    b = F.body_force(m, g)
    assert b.shape == (2 * m.n_nodes,)
    np.testing.assert_allclose(b[0::2], 0.0)
    np.testing.assert_allclose(b[1::2], -9.81 * F.lumped_mass(m))
    field = np.column_stack([m.points[:, 0], 2 * m.points[:, 1]])
    bf = F.body_force(m, field)
    np.testing.assert_allclose(bf[0::2], F.body_force(m, field[:, 0]))
    np.testing.assert_allclose(bf[1::2], F.body_force(m, field[:, 1]))


def test_body_force_errors():
    m = unit_square(2)
    with pytest.raises(ShapeError, match=r"\(9,\) nodal values, \(2,\) a constant vector"):
        F.body_force(m, np.zeros(4))
    with pytest.raises(F.FemError, match="NaN or Inf"):
        F.body_force(m, np.nan)
    with pytest.raises(F.FemError, match="needs an adjopt.mesh.Mesh"):
        F.body_force(m.points, 1.0)


# ------------------------------------------------------------------ traction
def test_traction_2d_edge_by_hand():
    m = rectangle(2, 1, 2.0, 1.0, cell="quad")  # right edge: nodes 2, 5 of length 1
    b = F.traction(m, "right", [3.0, -1.0])
    expected = np.zeros(12)
    expected[[4, 10]] = 1.5
    expected[[5, 11]] = -0.5
    np.testing.assert_allclose(b, expected)
    flux = F.traction(m, "top", 2.0)  # top nodes 3, 4, 5; edge lengths 1
    np.testing.assert_allclose(flux, [0, 0, 0, 1.0, 2.0, 1.0])


@pytest.mark.parametrize("cell", ["tetra", "hexahedron"])
def test_traction_3d_total_force(cell):
    m = box(2, 3, 1, 2.0, 3.0, 1.0, cell=cell)
    b = F.traction(m, "back", [0.0, 0.0, -2.0])
    np.testing.assert_allclose(b.reshape(-1, 3).sum(axis=0), [0.0, 0.0, -2.0 * 6.0])
    on = np.zeros(m.n_nodes, bool)
    on[m.boundary("back")] = True
    assert np.all(b.reshape(-1, 3)[~on] == 0)
    # corner node of a hex face grid gets a quarter of one face
    if cell == "hexahedron":
        corner = m.boundary("back")[0]
        assert b[3 * corner + 2] == pytest.approx(-2.0 * 0.25)


def test_facet_integrals_of_warped_quad_face():
    """Non-planar bilinear face: 2x2 Gauss integrates |x_xi x x_eta| N_a; compare with a fine rule."""
    pts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0.3], [0, 1, 0.0]])
    m = Mesh(np.vstack([pts, pts + [0, 0, 1]]), [[0, 1, 2, 3, 4, 5, 6, 7]], "hexahedron")
    w = F.facet_shape_integrals(m, np.array([[0, 1, 2, 3]]))
    from adjopt.mesh._reference import shape_functions, tensor_gauss

    xq, wq = tensor_gauss(2, 12)
    N, dn = shape_functions("quad", xq)
    T = np.einsum("ai,qja->qji", pts, dn)
    da = np.linalg.norm(np.cross(T[:, 0], T[:, 1]), axis=1)
    np.testing.assert_allclose(w[0], (wq * da) @ N, rtol=2e-3)
    np.testing.assert_allclose(F.facet_shape_integrals(unit_square(1), np.array([[0, 1]])), [[0.5, 0.5]])


def test_traction_errors():
    m = unit_square(2)
    m.boundaries["corner"] = np.array([0])
    with pytest.raises(F.FemError, match="boundary 'corner' .*no complete boundary edge.*point_load"):
        F.traction(m, "corner", [1.0, 0.0])
    with pytest.raises(UnknownBoundaryError, match="'left'"):
        F.traction(m, "inlet", 1.0)
    with pytest.raises(ShapeError, match=r"scalar \(flux\) or a \(2,\) vector"):
        F.traction(m, "left", [1.0, 0.0, 0.0])
    with pytest.raises(F.FemError, match="NaN"):
        F.traction(m, "left", np.nan)
    with pytest.raises(F.FemError, match="needs an adjopt.mesh.Mesh"):
        F.traction(None, "left", 1.0)
