"""Manufactured solutions: convergence rates, exact reproduction (patch tests)."""

import numpy as np
import pytest
from scipy.sparse.linalg import spsolve

import adjopt.fem as F
from adjopt.mesh import Mesh, box, rectangle, unit_square

PI = np.pi


def exact(x):
    return np.sin(PI * x[:, 0]) * np.sin(PI * x[:, 1])


def grad_exact(x):
    return np.column_stack([PI * np.cos(PI * x[:, 0]) * np.sin(PI * x[:, 1]),
                            PI * np.sin(PI * x[:, 0]) * np.cos(PI * x[:, 1])])


def solve_poisson(n, cell):
    """-lap u = 2 pi^2 sin(pi x) sin(pi y), u = 0 on the boundary; returns (h, L2, H1 errors)."""
    m = unit_square(n, cell)
    K = F.p1_stiffness(m) if cell == "triangle" else F.q1_laplace(m)
    b = F.body_force(m, 2 * PI**2 * exact(m.points))
    dm = F.condense(m.n_nodes, F.require_dirichlet(m.boundary("all")))
    A = F.assemble(dm.restrict(m.cells), K, dm.n_free)
    u = dm.expand(spsolve(A.tocsc(), dm.restrict_vector(b)))
    l2, h1 = F.error_norms(m, u, exact, grad_exact)
    return 1.0 / n, l2, h1


def slopes(ns, cell):
    data = np.array([solve_poisson(n, cell) for n in ns])
    logh = np.log(data[:, 0])
    return np.polyfit(logh, np.log(data[:, 1]), 1)[0], np.polyfit(logh, np.log(data[:, 2]), 1)[0], data


def test_p1_poisson_convergence():
    s_l2, s_h1, data = slopes([8, 16, 32, 64], "triangle")
    assert abs(s_l2 - 2.0) < 0.1, data
    assert abs(s_h1 - 1.0) < 0.1, data
    assert data[-1, 1] < 1e-3


def test_q1_poisson_convergence():
    s_l2, s_h1, data = slopes([8, 16, 32], "quad")
    assert abs(s_l2 - 2.0) < 0.1, data
    assert abs(s_h1 - 1.0) < 0.1, data


def test_nonzero_dirichlet_lifting_recovers_linear_field():
    m = unit_square(4)
    u_ex = m.points[:, 0] + 2 * m.points[:, 1]
    fixed = m.boundary("all")
    dm = F.condense(m.n_nodes, fixed, u_ex[fixed])
    K = F.p1_stiffness(m)
    A = F.assemble(dm.restrict(m.cells), K, dm.n_free)
    b = F.assemble_vector(dm.restrict(m.cells), dm.lifting(m.cells, K), dm.n_free)
    u = dm.expand(spsolve(A.tocsc(), b))
    np.testing.assert_allclose(u, u_ex, atol=1e-12)


@pytest.mark.parametrize("cell", ["triangle", "quad"])
def test_mixed_dirichlet_neumann_linear_field(cell):
    """u = x + 2y: Dirichlet on left/right/bottom, flux du/dn = 2 on top; Q1 on a distorted mesh."""
    m = unit_square(4, cell)
    rng = np.random.default_rng(1)
    inner = np.setdiff1d(np.arange(m.n_nodes), m.boundary("all"))
    pts = m.points.copy()
    pts[inner] += rng.uniform(-0.08, 0.08, (inner.size, 2))
    m = Mesh(pts, m.cells, cell, m.boundaries)
    u_ex = m.points[:, 0] + 2 * m.points[:, 1]
    fixed = np.concatenate([m.boundary(s) for s in ("left", "right", "bottom")])
    dm = F.condense(m.n_nodes, fixed, u_ex[fixed])
    K = F.p1_stiffness(m) if cell == "triangle" else F.q1_laplace(m)
    A, b = dm.system(m.cells, K, F.traction(m, "top", 2.0))
    np.testing.assert_allclose(dm.expand(spsolve(A.tocsc(), b)), u_ex, atol=1e-12)


@pytest.mark.parametrize("cell", ["triangle", "quad", "tetra", "hexahedron"])
def test_elasticity_uniaxial_patch_test(cell):
    """Uniform tension sigma: u = sigma/E (x, -nu y[, -nu z]) is reproduced exactly."""
    E, nu, sigma = 2.0, 0.3, 0.5
    m = rectangle(3, 2, 2.0, 1.0, cell=cell) if cell in ("triangle", "quad") else box(2, 2, 2, 2.0, 1.0, 1.0, cell=cell)
    d = m.dim
    K = (F.p1_elasticity if cell in ("triangle", "tetra") else F.q1_elasticity)(m, E=E, nu=nu)
    conn = F.vector_dofs(m.cells, d)
    sym = ["left", "bottom", "front"]  # normal displacement 0 on the symmetry planes
    fixed = np.concatenate([F.boundary_dofs(m, sym[c], components=c) for c in range(d)])
    dm = F.condense(m.n_nodes * d, fixed)
    t = np.zeros(d)
    t[0] = sigma
    A, b = dm.system(conn, K, F.traction(m, "right", t))
    u = dm.expand(spsolve(A.tocsc(), b)).reshape(-1, d)
    expected = sigma / E * m.points * np.r_[1.0, -nu * np.ones(d - 1)]
    np.testing.assert_allclose(u, expected, atol=1e-12)
