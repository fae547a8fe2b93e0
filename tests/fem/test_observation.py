"""P1 point observation operator and P1 gradient operator (adjopt.fem.observation)."""

import numpy as np
import pytest
import scipy.sparse as sp

from adjopt.errors import ShapeError
from adjopt.fem import observation_operator
from adjopt.fem.observation import p1_gradient_operator
from adjopt.mesh import Mesh, unit_cube, unit_square

MESHES = {"triangle": lambda: unit_square(6), "tetra": lambda: unit_cube(3)}


@pytest.fixture(params=sorted(MESHES))
def mesh(request):
    return MESHES[request.param]()


def random_points(mesh, n=300, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0.0, 1.0, size=(n, mesh.dim))
    # plus vertices, edge midpoints and corners of the domain (on cell boundaries)
    mids = 0.5 * (mesh.points[mesh.cells[:, 0]] + mesh.points[mesh.cells[:, 1]])
    return np.vstack([pts, mesh.points, mids[:20], np.zeros((1, mesh.dim)), np.ones((1, mesh.dim))])


def test_reproduces_linear_functions(mesh):
    pts = random_points(mesh)
    B = observation_operator(mesh, pts)
    assert sp.issparse(B) and B.format == "csr"
    assert B.shape == (pts.shape[0], mesh.n_nodes)
    a = np.arange(1.0, mesh.dim + 1.0)
    u = mesh.points @ a - 0.7
    np.testing.assert_allclose(B @ u, pts @ a - 0.7, atol=1e-13)
    # at the mesh vertices B picks the nodal value
    nv = mesh.n_nodes
    vertex_rows = B[300:300 + nv].toarray()
    np.testing.assert_allclose(vertex_rows, np.eye(nv), atol=1e-12)


def test_rows_sum_to_one_and_are_convex(mesh):
    B = observation_operator(mesh, random_points(mesh, seed=1))
    np.testing.assert_allclose(B.sum(axis=1), 1.0, atol=1e-13)
    assert B.data.min() >= -1e-12
    assert np.all(np.diff(B.indptr) <= mesh.dim + 1)


def test_point_outside_raises_naming_its_index(mesh):
    pts = np.full((4, mesh.dim), 0.5)
    pts[2, 0] = 1.25
    with pytest.raises(ValueError, match="point 2 .* outside the mesh"):
        observation_operator(mesh, pts)


def test_bad_points_shape():
    with pytest.raises(ShapeError):
        observation_operator(unit_square(3), np.zeros((4, 3)))


def test_non_simplex_mesh_rejected():
    with pytest.raises(ValueError, match="triangle and tetra"):
        observation_operator(unit_square(3, cell="quad"), np.full((1, 2), 0.5))


def test_gradient_operator_is_exact_for_linear_fields(mesh):
    G = p1_gradient_operator(mesh)
    assert G.shape == (mesh.n_cells * mesh.dim, mesh.n_nodes)
    a = np.arange(1.0, mesh.dim + 1.0)
    g = (G @ (mesh.points @ a + 2.0)).reshape(-1, mesh.dim)
    np.testing.assert_allclose(g, np.broadcast_to(a, g.shape), atol=1e-12)
    # constants are in the kernel
    np.testing.assert_allclose(G @ np.ones(mesh.n_nodes), 0.0, atol=1e-12)


def test_locate_points_finds_points_in_long_thin_cells_and_none_outside():
    from scipy.spatial import Delaunay

    from adjopt.fem.observation import locate_points

    # a cluster of 10^4 nodes near the top: the rest of the square is long fan triangles whose centres are far
    g = np.linspace(0.0, 1.0, 100)
    X, Y = np.meshgrid(0.45 + 0.1 * g, 0.86 + 0.1 * g)
    P = np.r_[[[0, 0], [1, 0], [1, 1], [0, 1.0]], np.c_[X.ravel(), Y.ravel()]]
    mesh = Mesh(P, Delaunay(P).simplices, "triangle")
    q = np.array([[0.5, 0.84], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [1.2, 0.5], [-0.1, -0.1]])
    cells = locate_points(mesh, q)
    assert np.all(cells[:4] >= 0) and np.all(cells[4:] == -1)
    B = observation_operator(mesh, q[:4])  # the serial operator finds them too: the same interpolation
    for i, c in enumerate(cells[:4]):
        assert set(B[[i]].indices) <= set(mesh.cells[c])
