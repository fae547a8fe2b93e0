"""Element matrices against hand computations and structural properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adjopt.fem as F
from adjopt.mesh import InvalidElementError, Mesh, box, rectangle, unit_cube, unit_square

UNIT_TRI = Mesh([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0, 1, 2]], "triangle")
UNIT_TET = Mesh(np.vstack([np.zeros(3), np.eye(3)]), [[0, 1, 2, 3]], "tetra")
UNIT_QUAD = Mesh([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], [[0, 1, 2, 3]], "quad")
UNIT_HEX = box(1, 1, 1, cell="hexahedron")


def distorted(mesh, amount, seed=0):
    """Same topology, interior-and-boundary nodes moved by a small random amount."""
    rng = np.random.default_rng(seed)
    h = mesh.cell_volumes().mean() ** (1.0 / mesh.dim)
    return Mesh(mesh.points + amount * h * rng.uniform(-1, 1, mesh.points.shape), mesh.cells, mesh.cell_type)


# ------------------------------------------------------------ hand-computed
def test_p1_triangle_by_hand():
    K = F.p1_stiffness(UNIT_TRI)
    np.testing.assert_allclose(K[0], 0.5 * np.array([[2, -1, -1], [-1, 1, 0], [-1, 0, 1]]), atol=1e-15)
    M = F.p1_mass(UNIT_TRI)
    np.testing.assert_allclose(M[0], np.array([[2, 1, 1], [1, 2, 1], [1, 1, 2]]) / 24, atol=1e-15)


def test_p1_tet_by_hand():
    K = F.p1_stiffness(UNIT_TET)
    expected = np.array([[3, -1, -1, -1], [-1, 1, 0, 0], [-1, 0, 1, 0], [-1, 0, 0, 1]]) / 6
    np.testing.assert_allclose(K[0], expected, atol=1e-15)
    M = F.p1_mass(UNIT_TET)
    np.testing.assert_allclose(M[0], (np.ones((4, 4)) + np.eye(4)) / 120, atol=1e-15)


def test_q1_quad_laplace_by_hand():
    K = F.q1_laplace(UNIT_QUAD)
    expected = np.array([[4, -1, -2, -1], [-1, 4, -1, -2], [-2, -1, 4, -1], [-1, -2, -1, 4]]) / 6
    np.testing.assert_allclose(K[0], expected, atol=1e-15)
    M = F.q1_mass(UNIT_QUAD)
    expected_m = np.array([[4, 2, 1, 2], [2, 4, 2, 1], [1, 2, 4, 2], [2, 1, 2, 4]]) / 36
    np.testing.assert_allclose(M[0], expected_m, atol=1e-15)


def test_q1_hex_laplace_is_tensor_product():
    """On the unit cube K = Kx(x)My(x)Mz + Mx(x)Ky(x)Mz + Mx(x)My(x)Kz with 1D P1 matrices."""
    k1 = np.array([[1.0, -1.0], [-1.0, 1.0]])
    m1 = np.array([[2.0, 1.0], [1.0, 2.0]]) / 6
    # tensor index (z, y, x) -> node bits x + 2y + 4z; VTK hex order in bits
    vtk_bits = [0, 1, 3, 2, 4, 5, 7, 6]
    K = np.kron(np.kron(m1, m1), k1) + np.kron(np.kron(m1, k1), m1) + np.kron(np.kron(k1, m1), m1)
    K = K[np.ix_(vtk_bits, vtk_bits)]
    np.testing.assert_allclose(F.q1_laplace(UNIT_HEX)[0], K, atol=1e-15)
    assert F.q1_laplace(UNIT_HEX)[0][0, 0] == pytest.approx(1 / 3)
    M = np.kron(np.kron(m1, m1), m1)[np.ix_(vtk_bits, vtk_bits)]
    np.testing.assert_allclose(F.q1_mass(UNIT_HEX)[0], M, atol=1e-15)


def test_scaling_with_size_and_coefficient():
    """Laplace matrices scale like h^(d-2), masses like h^d; kappa / rho multiply per cell."""
    big = Mesh(UNIT_TET.points * 2.0, UNIT_TET.cells, "tetra")
    np.testing.assert_allclose(F.p1_stiffness(big), 2.0 * F.p1_stiffness(UNIT_TET))
    np.testing.assert_allclose(F.p1_mass(big), 8.0 * F.p1_mass(UNIT_TET))
    m = unit_square(2, "quad")
    kappa = np.arange(1.0, 5.0)
    np.testing.assert_allclose(F.q1_laplace(m, kappa), kappa[:, None, None] * F.q1_laplace(m))
    np.testing.assert_allclose(F.q1_mass(m, rho=3.0), 3.0 * F.q1_mass(m))


# ------------------------------------------------------------------- top88
def top88_ke(nu):
    A11 = np.array([[12, 3, -6, -3], [3, 12, 3, 0], [-6, 3, 12, -3], [-3, 0, -3, 12]])
    A12 = np.array([[-6, -3, 0, 3], [-3, -6, -3, -6], [0, -3, -6, 3], [3, -6, 3, -6]])
    B11 = np.array([[-4, 3, -2, 9], [3, -4, -9, 4], [-2, -9, -4, -3], [9, 4, -3, -4]])
    B12 = np.array([[2, -3, 4, -9], [-3, 2, 9, -2], [4, 9, 2, 3], [-9, -2, 3, 2]])
    return 1 / (1 - nu**2) / 24 * (np.block([[A11, A12], [A12.T, A11]]) + nu * np.block([[B11, B12], [B12.T, B11]]))


def top88_edofmat(nelx, nely):
    """edofMat of top88 (0-based) and the coordinates of its node numbers.

    top88: nodenrs = reshape(1:(1+nelx)*(1+nely), 1+nely, 1+nelx) (column-major, row 1 at the
    top, i.e. y = nely), edofVec = 2*nodenrs(1:end-1, 1:end-1)(:) + 1,
    edofMat = edofVec + [0 1 2*nely+[2 3 0 1] -2 -1].
    """
    nodenrs = np.arange(1, (1 + nelx) * (1 + nely) + 1).reshape(1 + nelx, 1 + nely).T
    edofvec = (2 * nodenrs[:-1, :-1] + 1).ravel(order="F")
    edofmat = edofvec[:, None] + np.array([0, 1, 2 * nely + 2, 2 * nely + 3, 2 * nely, 2 * nely + 1, -2, -1])
    node = nodenrs.ravel(order="F") - 1
    r, c = np.unravel_index(np.arange(nodenrs.size), nodenrs.shape, order="F")
    coords = np.empty((nodenrs.size, 2))
    coords[node, 0] = c  # column = x
    coords[node, 1] = nely - r  # row 1 is the top
    return edofmat - 1, coords


def test_q1_elasticity_equals_top88_ke_on_unit_square():
    nu = 0.3
    edof, coords = top88_edofmat(1, 1)
    # map top88's local nodes (dof pairs) to our mesh nodes by coordinates
    top_nodes = edof[0, ::2] // 2
    ours = {tuple(p): i for i, p in enumerate(UNIT_QUAD.points.tolist())}
    local = [ours[tuple(coords[n])] for n in top_nodes]
    perm = np.array([[2 * a, 2 * a + 1] for a in local]).ravel()
    K = F.q1_elasticity(UNIT_QUAD, E=1.0, nu=nu)[0]
    np.testing.assert_allclose(K[np.ix_(perm, perm)], top88_ke(nu), rtol=0, atol=1e-12)
    assert local == [0, 1, 2, 3]  # top88's element order is the VTK quad order


def test_q1_elasticity_global_matrix_equals_top88():
    nelx, nely, nu = 3, 2, 0.3
    edof, coords = top88_edofmat(nelx, nely)
    n_dof = 2 * (nelx + 1) * (nely + 1)
    K88 = F.assemble(edof, np.broadcast_to(top88_ke(nu), (edof.shape[0], 8, 8)), n_dof).toarray()
    m = rectangle(nelx, nely, float(nelx), float(nely), cell="quad")
    Kours = F.assemble(F.vector_dofs(m.cells, 2), F.q1_elasticity(m, nu=nu), n_dof).toarray()
    # our node index of each top88 node, then dof permutation
    ours = (np.round(coords[:, 1]) * (nelx + 1) + np.round(coords[:, 0])).astype(int)
    perm = np.column_stack([2 * ours, 2 * ours + 1]).ravel()
    np.testing.assert_allclose(Kours[np.ix_(perm, perm)], K88, atol=1e-12)


def test_p1_elasticity_triangle_by_hand():
    E, nu = 2.0, 0.25
    dmat = E / (1 - nu**2) * np.array([[1, nu, 0], [nu, 1, 0], [0, 0, (1 - nu) / 2]])
    # grad l0 = (-1,-1), grad l1 = (1,0), grad l2 = (0,1); dofs [u0 v0 u1 v1 u2 v2]
    B = np.array([[-1, 0, 1, 0, 0, 0], [0, -1, 0, 0, 0, 1], [-1, -1, 0, 1, 1, 0]], float)
    np.testing.assert_allclose(F.p1_elasticity(UNIT_TRI, E=E, nu=nu)[0], 0.5 * B.T @ dmat @ B, atol=1e-14)
    np.testing.assert_allclose(F.elasticity_matrix(2, E, nu), dmat)


def test_elasticity_matrix_3d_and_plane_strain():
    E, nu = 3.0, 0.2
    lam, mu = E * nu / ((1 + nu) * (1 - 2 * nu)), E / (2 * (1 + nu))
    dmat3 = F.elasticity_matrix(3, E, nu)
    np.testing.assert_allclose(dmat3[:3, :3], lam + 2 * mu * np.eye(3))
    np.testing.assert_allclose(np.diag(dmat3)[3:], mu)
    assert np.count_nonzero(dmat3) == 9 + 3
    np.testing.assert_allclose(F.elasticity_matrix(2, E, nu, "strain"),
                               [[lam + 2 * mu, lam, 0], [lam, lam + 2 * mu, 0], [0, 0, mu]])


# ------------------------------------------------------------- properties
@pytest.mark.parametrize("mesh", [unit_square(3), unit_cube(2), unit_square(3, "quad"),
                                  unit_cube(2, "hexahedron")], ids=["tri", "tet", "quad", "hex"])
def test_laplace_rows_sum_to_zero_and_mass_sums_to_volume(mesh):
    m = distorted(mesh, 0.15)
    K = F.p1_stiffness(m) if m.cell_type in ("triangle", "tetra") else F.q1_laplace(m)
    np.testing.assert_allclose(K.sum(axis=2), 0.0, atol=1e-13)
    np.testing.assert_allclose(K, np.swapaxes(K, 1, 2), atol=1e-15)
    assert np.all(np.linalg.eigvalsh(K)[:, 1:] > 0)  # only the constant is in the kernel
    M = F.mass_matrices(m)
    np.testing.assert_allclose(M.sum(axis=(1, 2)), m.cell_volumes(), rtol=1e-12)
    lumped = F.lumped_mass(m)
    assert lumped.shape == (m.n_nodes,) and np.all(lumped > 0)
    np.testing.assert_allclose(lumped.sum(), m.cell_volumes().sum(), rtol=1e-12)


def rigid_modes(points):
    """Rigid-body modes of point sets (..., n, d) -> (..., n*d, 3 or 6), node-major dofs.

    Translations e_c and infinitesimal rotations u_i = -x_j, u_j = x_i.
    """
    n, d = points.shape[-2:]
    lead = points.shape[:-2]
    axes = [(0, 1)] if d == 2 else [(0, 1), (1, 2), (0, 2)]
    modes = np.zeros(lead + (n, d, d + len(axes)))
    modes[..., np.arange(d), np.arange(d)] = 1.0
    for m, (i, j) in enumerate(axes, start=d):
        modes[..., i, m] = -points[..., j]
        modes[..., j, m] = points[..., i]
    return modes.reshape(lead + (n * d, d + len(axes)))


@pytest.mark.parametrize("mesh", [unit_square(2), unit_cube(1), unit_square(2, "quad"),
                                  unit_cube(1, "hexahedron")], ids=["tri", "tet", "quad", "hex"])
def test_elasticity_annihilates_rigid_body_modes(mesh):
    m = distorted(mesh, 0.1, seed=3)
    K = (F.p1_elasticity if m.cell_type in ("triangle", "tetra") else F.q1_elasticity)(m, E=5.0, nu=0.3)
    modes = rigid_modes(m.points[m.cells])  # (E, k*d, n_rigid)
    n_rigid = modes.shape[-1]
    np.testing.assert_allclose(K @ modes, 0.0, atol=1e-12)
    w = np.linalg.eigvalsh(K)
    assert np.all(np.abs(w[:, :n_rigid]) < 1e-12) and np.all(w[:, n_rigid] > 1e-3)
    A = F.assemble(F.vector_dofs(m.cells, m.dim), K, m.n_nodes * m.dim)
    np.testing.assert_allclose(A @ rigid_modes(m.points), 0.0, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-0.3, 0.3), min_size=6, max_size=6), st.floats(0.05, 0.45))
def test_p1_elasticity_energy_of_affine_field(pert, nu):
    """For u = G x (affine), u^T K u = |T| eps:D:eps exactly with eps = sym(G)."""
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) + np.reshape(pert, (3, 2))
    m = Mesh(pts, [[0, 1, 2]], "triangle")
    if abs(m.signed_volumes()[0]) < 0.05:
        return
    gmat = np.array([[0.3, -0.7], [1.1, 0.2]])
    u = (pts @ gmat.T).ravel()
    eps = np.array([gmat[0, 0], gmat[1, 1], gmat[0, 1] + gmat[1, 0]])
    energy = m.cell_volumes()[0] * eps @ F.elasticity_matrix(2, 1.0, nu) @ eps
    assert u @ F.p1_elasticity(m, nu=nu)[0] @ u == pytest.approx(energy, rel=1e-11)


def test_clockwise_cells_give_same_matrices():
    m = unit_square(2, "quad")
    flipped = Mesh(m.points, m.cells[:, [0, 3, 2, 1]], "quad")
    K, Kf = F.q1_laplace(m), F.q1_laplace(flipped)
    perm = [0, 3, 2, 1]
    np.testing.assert_allclose(Kf, K[:, perm][:, :, perm], atol=1e-15)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.p1_stiffness(UNIT_QUAD), "p1_stiffness works on triangle and tetra cells, .*'quad'.*q1_laplace"),
        (lambda: F.p1_mass(UNIT_HEX), "p1_mass .*q1_mass"),
        (lambda: F.q1_laplace(UNIT_TRI), "q1_laplace works on quad and hexahedron .*p1_stiffness"),
        (lambda: F.q1_mass(UNIT_TET), "q1_mass .*p1_mass"),
        (lambda: F.q1_elasticity(UNIT_TRI), "p1_elasticity"),
        (lambda: F.p1_elasticity(UNIT_QUAD), "q1_elasticity"),
        (lambda: F.advection_diffusion(UNIT_QUAD, [1, 0], 1.0), "P1 only"),
        (lambda: F.p1_stiffness("mesh"), "needs an adjopt.mesh.Mesh, got str"),
        (lambda: F.mass_matrices(None), "needs an adjopt.mesh.Mesh"),
        (lambda: F.p1_stiffness(unit_square(1), kappa=[1.0]), r"one value per cell, shape \(2,\)"),
        (lambda: F.p1_stiffness(unit_square(1), kappa=[1.0, -2.0]), "cell 1 has kappa = -2.0"),
        (lambda: F.p1_mass(UNIT_TRI, rho=np.nan), "rho must be finite"),
        (lambda: F.q1_elasticity(UNIT_QUAD, nu=0.5), r"nu must lie in \(-1, 0.5\)"),
        (lambda: F.q1_elasticity(UNIT_QUAD, E=-1.0), "cell 0 has E = -1.0"),
        (lambda: F.elasticity_matrix(2, E=0.0), "E must be positive"),
        (lambda: F.elasticity_matrix(2, plane="membrane"), "plane must be 'stress' or 'strain'"),
        (lambda: F.elasticity_matrix(4), "dim must be 2 or 3"),
    ],
)
def test_element_errors(call, match):
    with pytest.raises(F.FemError, match=match):
        call()


def test_degenerate_cell_is_named():
    m = Mesh([[0, 0], [1, 0], [0, 1], [2, 0]], [[0, 1, 2], [0, 1, 3]], "triangle")
    with pytest.raises(InvalidElementError, match=r"cell 1 \(vertices \[0, 1, 3\]\) is degenerate"):
        F.p1_stiffness(m)


def test_tangled_cell_is_named():
    # a quad whose det J changes sign inside: vertex 2 pulled across the diagonal 1-3
    m = Mesh([[0, 0], [1, 0], [0.1, 0.1], [0, 1]], [[0, 1, 2, 3]], "quad")
    with pytest.raises(InvalidElementError, match="cell 0 .* is tangled"):
        F.q1_laplace(m)


def test_check_jacobians_accepts_consistent_negative():
    F.check_jacobians(UNIT_QUAD, -np.ones((1, 4)))
    with pytest.raises(InvalidElementError, match="cell 0 .*tangled"):
        F.check_jacobians(UNIT_QUAD, np.array([[1.0, 1.0, -1.0, 1.0]]))
