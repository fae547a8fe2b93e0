"""P1 advection-diffusion with SUPG."""

import numpy as np
import pytest
from scipy.sparse.linalg import spsolve

import adjopt.fem as F
from adjopt.mesh import Mesh, rectangle, unit_cube, unit_square

UNIT_TRI = Mesh([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0, 1, 2]], "triangle")


def test_unit_triangle_by_hand():
    kappa = 0.1
    K, tau = F.advection_diffusion(UNIT_TRI, [1.0, 0.0], kappa, return_tau=True)
    # G = [(-1,-1), (1,0), (0,1)], b.G = [-1, 1, 0], h = 2|b| / sum|b.G| = 1, Pe = 1/(2 kappa) = 5
    tau_hand = 0.5 * (1.0 / np.tanh(5.0) - 1.0 / 5.0)
    assert tau[0] == pytest.approx(tau_hand, rel=1e-14)
    stiff = np.array([[2, -1, -1], [-1, 1, 0], [-1, 0, 1]])
    bg = np.array([-1.0, 1.0, 0.0])
    galerkin = np.tile(bg, (3, 1)) / 3  # row a: int N_a (b . grad N_b) = (b.G_b) |T| / 3, times 1/|T| here
    expected = 0.5 * (kappa * stiff + galerkin + tau_hand * np.outer(bg, bg))
    np.testing.assert_allclose(K[0], expected, atol=1e-15)
    K0 = F.advection_diffusion(UNIT_TRI, [1.0, 0.0], kappa, stabilization="none")
    np.testing.assert_allclose(K0[0], 0.5 * (kappa * stiff + galerkin), atol=1e-15)


def test_tau_limits():
    m = unit_square(2)
    h = 0.5
    _, tau = F.advection_diffusion(m, [2.0, 0.0], 0.0, return_tau=True)  # pure advection
    np.testing.assert_allclose(tau, h / (2 * 2.0))
    _, tau = F.advection_diffusion(m, [1.0, 0.0], 1e3, return_tau=True)  # Pe -> 0: tau ~ h^2 / (12 kappa)
    np.testing.assert_allclose(tau, h**2 / (12 * 1e3), rtol=1e-6)
    _, tau = F.advection_diffusion(m, [1.0, 0.0], 1e-3, return_tau=True)  # Pe = 250
    np.testing.assert_allclose(tau, h / 2 * (1 - 1 / 250.0), rtol=1e-14)
    K, tau = F.advection_diffusion(m, [0.0, 0.0], 0.7, return_tau=True)
    np.testing.assert_array_equal(tau, 0.0)
    np.testing.assert_allclose(K, 0.7 * F.p1_stiffness(m), atol=1e-15)


def test_per_cell_velocity_and_row_sums():
    m = unit_cube(1)
    v = np.array([1.0, -0.5, 0.25])
    K = F.advection_diffusion(m, v, 0.05)
    np.testing.assert_allclose(F.advection_diffusion(m, np.tile(v, (m.n_cells, 1)), 0.05), K)
    np.testing.assert_allclose(K.sum(axis=2), 0.0, atol=1e-14)  # constants are solutions
    # for linear u with gradient g: sum_a (K u)_a = int_T b . g
    g = np.array([0.3, 1.0, -2.0])
    u = m.points @ g
    Ku = np.einsum("eab,eb->ea", K, u[m.cells])
    np.testing.assert_allclose(Ku.sum(axis=1), m.cell_volumes() * (v @ g), atol=1e-14)
    assert not np.allclose(K, np.swapaxes(K, 1, 2))  # nonsymmetric


@pytest.mark.parametrize("kappa", [0.01, 0.05, 0.2])
def test_supg_interior_rows_exact_for_1d_layer(kappa):
    """With b = (1, 0) the exact 1D solution satisfies every interior equation (optimal tau);
    plain Galerkin does not."""
    m = rectangle(10, 4, 1.0, 0.4)
    x = m.points[:, 0]
    u = (np.exp((x - 1) / kappa) - np.exp(-1 / kappa)) / (1 - np.exp(-1 / kappa))
    inner = np.setdiff1d(np.arange(m.n_nodes), m.boundary("all"))
    r_supg = F.assemble(m.cells, F.advection_diffusion(m, [1.0, 0.0], kappa), m.n_nodes) @ u
    r_gal = F.assemble(m.cells, F.advection_diffusion(m, [1.0, 0.0], kappa, "none"), m.n_nodes) @ u
    assert np.abs(r_supg[inner]).max() < 1e-14
    assert np.abs(r_gal[inner]).max() > 5e-4


def test_supg_damps_boundary_layer_oscillations():
    m = rectangle(10, 4, 1.0, 0.4)
    fixed = np.concatenate([m.boundary("left"), m.boundary("right")])
    vals = np.r_[np.zeros(5), np.ones(5)]
    dm = F.condense(m.n_nodes, fixed, vals)
    under = {}
    for stab in ("supg", "none"):
        A, b = dm.system(m.cells, F.advection_diffusion(m, [1.0, 0.0], 0.01, stab))
        under[stab] = -dm.expand(spsolve(A.tocsc(), b)).min()
    assert under["none"] > 1.0 and under["supg"] < 0.2 * under["none"]


def test_supg_manufactured_convergence():
    pi, kappa, b = np.pi, 0.01, np.array([1.0, 0.5])

    def exact(x):
        return np.sin(pi * x[:, 0]) * np.sin(pi * x[:, 1])

    def grad(x):
        return np.column_stack([pi * np.cos(pi * x[:, 0]) * np.sin(pi * x[:, 1]),
                                pi * np.sin(pi * x[:, 0]) * np.cos(pi * x[:, 1])])

    errs = []
    for n in (16, 32, 64):
        m = unit_square(n)
        f = kappa * 2 * pi**2 * exact(m.points) + grad(m.points) @ b
        dm = F.condense(m.n_nodes, m.boundary("all"))
        A, rhs = dm.system(m.cells, F.advection_diffusion(m, b, kappa),
                           F.advection_diffusion_load(m, b, kappa, f))
        errs.append(F.error_norms(m, dm.expand(spsolve(A.tocsc(), rhs)), exact)[0])
    rate = np.polyfit(np.log([16, 32, 64]), np.log(errs), 1)[0]
    assert -2.1 < rate < -1.7, errs


def test_load_without_stabilization_is_mass_times_f():
    m = unit_square(2)
    f = m.points[:, 0]
    M = F.assemble(m.cells, F.p1_mass(m), m.n_nodes)
    np.testing.assert_allclose(F.advection_diffusion_load(m, [1.0, 0.0], 0.1, f, "none"), M @ f)
    # SUPG adds tau (b.G_a) |T| mean(f) per cell; the sum over a of b.G_a is 0, so the total is unchanged
    np.testing.assert_allclose(F.advection_diffusion_load(m, [1.0, 0.0], 0.1, 2.0).sum(), 2.0)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: F.advection_diffusion(UNIT_TRI, [1.0, 0.0], 0.1, "gls"), F.FemError, "'supg' or 'none'"),
        (lambda: F.advection_diffusion(UNIT_TRI, [1.0, 0.0, 0.0], 0.1), F.FemError,
         r"velocity must have shape \(2,\) or \(1, 2\)"),
        (lambda: F.advection_diffusion(UNIT_TRI, [np.nan, 0.0], 0.1), F.FemError, "velocity contains NaN"),
        (lambda: F.advection_diffusion(UNIT_TRI, [1.0, 0.0], -0.1), F.FemError, "diffusion must be finite and >= 0"),
        (lambda: F.advection_diffusion_load(UNIT_TRI, [1.0, 0.0], 0.1, np.zeros(2)), F.FemError,
         r"\(3,\) nodal values"),
        (lambda: F.advection_diffusion_load(UNIT_TRI, [1.0, 0.0], 0.1, np.inf), F.FemError, "NaN or Inf"),
        (lambda: F.advection_diffusion_load(rectangle(1, 1, cell="quad"), [1.0, 0.0], 0.1, 1.0), F.FemError, "P1 only"),
    ],
)
def test_advection_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
