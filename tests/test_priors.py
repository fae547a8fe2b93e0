"""BiLaplacianPrior: the precision, covariance, samples and variance against dense linear algebra, the Matérn
calibration of from_correlation, the Robin boundary term, and the objective's derivatives."""

import logging
import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import kv

from adjopt import fem
from adjopt.errors import NonFiniteError, ShapeError
from adjopt.mesh import unit_cube, unit_square
from adjopt.objectives import ParameterFunctional, TikhonovL2
from adjopt.priors import BiLaplacianPrior, boundary_lumped_mass
from adjopt.verify import taylor_test


def dense_parts(prior):
    A = prior.A.toarray()
    R = A @ np.diag(1.0 / prior.lumped_mass) @ A
    return A, R, np.linalg.inv(R)


def node_at(mesh, x):
    """Index of the node at the point x (asserted to exist)."""
    d = np.linalg.norm(mesh.points - np.asarray(x), axis=1)
    i = int(np.argmin(d))
    assert d[i] < 1e-12, f"no node at {x}"
    return i


@pytest.fixture(scope="module")
def small():
    mesh = unit_square(6)
    rng = np.random.default_rng(3)
    return BiLaplacianPrior(mesh, gamma=0.1, delta=3.0, mean=rng.standard_normal(mesh.n_nodes))


# -- objective -----------------------------------------------------------------------------------------------------
def test_value_gradient_hessp_finite_differences(small):
    P, n = small, small.n_params
    rng = np.random.default_rng(0)
    p, dp = rng.standard_normal(n), rng.standard_normal(n)
    _, R, _ = dense_parts(P)
    d = p - P.mean
    assert P.value_p(p) == pytest.approx(0.5 * d @ R @ d, rel=1e-12)
    for h in (1e-3, 1e-5):  # central differences are exact for a quadratic up to round-off
        fd = (P.value_p(p + h * dp) - P.value_p(p - h * dp)) / (2 * h)
        assert fd == pytest.approx(P.gradient_p(p) @ dp, rel=1e-7)
        fd_g = (P.gradient_p(p + h * dp) - P.gradient_p(p - h * dp)) / (2 * h)
        np.testing.assert_allclose(fd_g, P.hessp_p(p, dp), rtol=1e-6, atol=1e-8 * np.abs(fd_g).max())
    J = ParameterFunctional(P)
    assert taylor_test(J, p, dp, order=2).passed
    assert taylor_test(J, p, dp, order=1).passed


def test_gradient_after_value_is_the_gradient_at_its_own_point(small):
    P = small
    rng = np.random.default_rng(1)
    p, q = rng.standard_normal((2, P.n_params))
    _, R, _ = dense_parts(P)
    P.value_p(p)
    np.testing.assert_allclose(P.gradient_p(q), R @ (q - P.mean), rtol=1e-12, atol=1e-12)  # not p's
    P.value_p(p)
    g = P.gradient_p(p)
    np.testing.assert_allclose(g, R @ (p - P.mean), rtol=1e-12, atol=1e-12)
    g[:] = 0.0  # the caller owns what it gets: the next gradient is unaffected
    np.testing.assert_allclose(P.gradient_p(p), R @ (p - P.mean), rtol=1e-12, atol=1e-12)


def test_objective_in_a_sum_and_blocks_of_directions(small):
    P, n = small, small.n_params
    rng = np.random.default_rng(2)
    p, D = rng.standard_normal(n), rng.standard_normal((n, 3))
    _, R, _ = dense_parts(P)
    S = P + 0.5 * TikhonovL2()
    assert P.gaussian is True and P.depends_on_p
    assert S.value(None, p) == pytest.approx(P.value_p(p) + 0.25 * p @ p, rel=1e-12)
    np.testing.assert_allclose(S.grad_p(None, p), R @ (p - P.mean) + 0.5 * p, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(P.hess_pp(None, p, D), R @ D, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S.hess_pp(None, p, D[:, 0]), R @ D[:, 0] + 0.5 * D[:, 0], rtol=1e-12, atol=1e-12)


# -- precision and covariance -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh", [unit_square(7), unit_square(5, "quad"), unit_cube(3), unit_cube(2, "hexahedron")],
                         ids=["triangle", "quad", "tetra", "hexahedron"])
def test_precision_inverts_covariance(mesh):
    P = BiLaplacianPrior(mesh, gamma=0.05, delta=2.0)
    V = np.random.default_rng(4).standard_normal((mesh.n_nodes, 4))
    np.testing.assert_allclose(P.precision(P.covariance(V)), V, rtol=0, atol=1e-10)
    np.testing.assert_allclose(P.covariance(P.precision(V[:, 0])), V[:, 0], rtol=0, atol=1e-10)
    assert P.covariance(V[:, 0]).shape == (mesh.n_nodes,)


def test_covariance_and_precision_match_dense_matrices(small):
    P, n = small, small.n_params
    A, R, C = dense_parts(P)
    np.testing.assert_allclose(P.covariance(np.eye(n)), C, rtol=1e-9, atol=1e-12 * np.abs(C).max())
    np.testing.assert_allclose(P.precision(np.eye(n)), R, rtol=1e-12, atol=1e-12 * np.abs(R).max())
    Rs = P.precision_matrix()
    assert sp.issparse(Rs) and Rs.format == "csr"
    np.testing.assert_allclose(Rs.toarray(), R, rtol=1e-12, atol=1e-12 * np.abs(R).max())
    # A = delta M + gamma K + beta B from the element matrices
    mesh = unit_square(6)
    M = fem.assemble(mesh.cells, fem.p1_mass(mesh), n).toarray()
    K = fem.assemble(mesh.cells, fem.p1_stiffness(mesh), n).toarray()
    B = np.diag(boundary_lumped_mass(mesh))
    np.testing.assert_allclose(A, 3.0 * M + 0.1 * K + math.sqrt(0.3) / 1.42 * B, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(P.lumped_mass, M.sum(axis=1), rtol=1e-13)


def test_covariance_norms_take_one_solve_per_column(small, monkeypatch):
    P, n = small, small.n_params
    _, _, C = dense_parts(P)
    V = np.random.default_rng(5).standard_normal((n, 5))
    ref = np.sqrt(np.einsum("ij,ij->j", V, C @ V))
    solves = []
    fac = P._factorization()
    solve = fac.solve
    monkeypatch.setattr(fac, "solve", lambda rhs, **kw: solves.append(rhs.shape) or solve(rhs, **kw))
    np.testing.assert_allclose(P.covariance_norms(V), ref, rtol=1e-10)
    assert solves == [(n, 5)]  # one multi-column solve; covariance takes two
    one = P.covariance_norms(V[:, 0])
    assert isinstance(one, float) and one == pytest.approx(ref[0], rel=1e-10)
    assert P.covariance_norms(np.zeros((n, 0))).shape == (0,)


def test_covariance_of_c_and_fortran_ordered_blocks_agree_and_leaves_them_alone(small):
    P, n = small, small.n_params
    Vc = np.random.default_rng(6).standard_normal((n, 7))
    Vf = np.asfortranarray(Vc)
    before = Vc.copy()
    Xc, Xf = P.covariance(Vc), P.covariance(Vf)
    np.testing.assert_allclose(Xc, Xf, rtol=0, atol=1e-12 * np.abs(Xf).max())
    np.testing.assert_array_equal(Vc, before)  # the scaling between the two solves is done in place on the
    np.testing.assert_array_equal(Vf, before)  # first solve's own array, never on the caller's block
    _, _, C = dense_parts(P)
    np.testing.assert_allclose(Xf, C @ Vc, rtol=1e-9, atol=1e-12 * np.abs(C @ Vc).max())


def test_exact_variance_is_the_diagonal_of_the_dense_covariance(caplog):
    mesh = unit_square(20)  # 441 nodes: two blocks of identity columns
    P = BiLaplacianPrior(mesh, gamma=0.02, delta=1.5)
    _, _, C = dense_parts(P)
    with caplog.at_level(logging.INFO, logger="adjopt.priors"):
        v = P.variance(exact=True)
    np.testing.assert_allclose(v, np.diag(C), rtol=1e-10)
    assert "exact" in caplog.text
    np.testing.assert_allclose(P.variance(), v, rtol=1e-14)  # m <= 20000: exact by default


def test_samples_and_monte_carlo_variance_converge_to_the_covariance(caplog):
    mesh = unit_square(4)
    P = BiLaplacianPrior(mesh, gamma=0.05, delta=1.0, mean=2.0)
    _, _, C = dense_parts(P)
    N = 20000
    S = P.sample(N, rng=7)
    assert S.shape == (mesh.n_nodes, N)
    X = S - P.mean[:, None]
    sd = np.sqrt(np.diag(C))
    assert np.all(np.abs(X.mean(axis=1)) < 5 * sd / math.sqrt(N))
    emp = X @ X.T / N  # the mean is known: no degree of freedom lost
    se = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / N)  # std error of each entry of emp
    z = np.abs(emp - C) / se
    assert z.max() < 5.0, z.max()
    assert np.abs(emp - C).max() < 0.05 * np.abs(C).max()
    with caplog.at_level(logging.INFO, logger="adjopt.priors"):
        v = P.variance(exact=False, n_samples=N, rng=11)
    assert "Monte Carlo" in caplog.text
    rel = np.abs(v / np.diag(C) - 1)
    assert rel.max() < 5 * math.sqrt(2.0 / N), rel.max()
    assert rel.max() > 0  # an estimate, not the exact values


def test_sample_shapes_and_seeds(small):
    P = small
    s = P.sample(rng=5)
    assert s.shape == (P.n_params, 1)
    np.testing.assert_array_equal(s, P.sample(1, rng=5))
    np.testing.assert_array_equal(P.sample(3, rng=np.random.default_rng(9)), P.sample(3, rng=9))
    assert not np.array_equal(P.sample(1, rng=5), P.sample(1, rng=6))


# -- Matérn calibration --------------------------------------------------------------------------------------------
def test_from_correlation_marginal_variance_at_the_center():
    mesh = unit_square(64)
    P = BiLaplacianPrior.from_correlation(mesh, length=0.2, std=1.5)
    assert P.correlation_length == pytest.approx(0.2, rel=1e-12)
    assert P.marginal_std == pytest.approx(1.5, rel=1e-12)
    assert P.delta / P.gamma == pytest.approx(8.0 / 0.2**2, rel=1e-12)  # kappa^2 = 8 nu / rho^2, nu = 1
    assert P.gamma == pytest.approx(1 / (1.5 * math.sqrt(8) / 0.2 * math.sqrt(4 * math.pi)), rel=1e-12)
    c = node_at(mesh, [0.5, 0.5])
    j = node_at(mesh, [0.5 + 13 / 64, 0.5])  # distance 0.203 ~ rho
    E = np.zeros((mesh.n_nodes, 2))
    E[c, 0] = E[j, 1] = 1.0
    CE = P.covariance(E)
    assert CE[c, 0] == pytest.approx(1.5**2, rel=0.15)
    corr = CE[j, 0] / math.sqrt(CE[c, 0] * CE[j, 1])
    r = 13 / 64 * math.sqrt(8) / 0.2  # kappa r
    assert corr == pytest.approx(r * kv(1, r), abs=0.05)  # Matérn nu = 1: (kappa r) K_1(kappa r)
    assert corr == pytest.approx(0.139, abs=0.05)
    assert CE[j, 0] == pytest.approx(CE[c, 1], rel=1e-10)  # C symmetric


def test_from_correlation_in_3d_and_its_checks():
    P = BiLaplacianPrior.from_correlation(unit_cube(4), length=0.3, std=0.5, robin=False)
    assert P.nu == 0.5 and P.beta == 0.0
    kappa = math.sqrt(4.0) / 0.3
    assert P.delta / P.gamma == pytest.approx(kappa**2, rel=1e-12)
    assert 0.5**2 == pytest.approx(1 / (8 * math.pi * kappa * P.gamma**2), rel=1e-12)
    with pytest.raises(ValueError, match="length must be a positive"):
        BiLaplacianPrior.from_correlation(unit_cube(2), length=0.0, std=1.0)
    with pytest.raises(ValueError, match="std must be a positive"):
        BiLaplacianPrior.from_correlation(unit_cube(2), length=0.1, std=-1.0)
    with pytest.raises(TypeError, match="adjopt.mesh.Mesh"):
        BiLaplacianPrior.from_correlation("mesh", length=0.1, std=1.0)


def test_robin_brings_the_boundary_variance_closer_to_the_interior():
    mesh = unit_square(32)
    nodes = [node_at(mesh, x) for x in ([0.5, 0.5], [0.0, 0.5], [0.0, 0.0])]  # center, edge middle, corner
    E = np.zeros((mesh.n_nodes, 3))
    E[nodes, [0, 1, 2]] = 1.0
    ratios = {}
    for robin in (True, False):
        P = BiLaplacianPrior.from_correlation(mesh, length=0.2, std=1.0, robin=robin)
        v = np.einsum("ij,ij->j", E, P.covariance(E))
        ratios[robin] = v[1:] / v[0]
    assert np.all(ratios[False] > 1.5)  # Neumann: inflated at the boundary, worst in the corner
    assert np.all(np.abs(ratios[True] - 1) < np.abs(ratios[False] - 1))
    assert np.all(np.abs(ratios[True] - 1) < 0.3)


@pytest.mark.parametrize("mesh, measure", [(unit_square(5), 4.0), (unit_square(3, "quad"), 4.0),
                                           (unit_cube(3), 6.0), (unit_cube(2, "hexahedron"), 6.0)],
                         ids=["triangle", "quad", "tetra", "hexahedron"])
def test_boundary_mass_sums_to_the_boundary_measure(mesh, measure):
    b = boundary_lumped_mass(mesh)
    assert b.sum() == pytest.approx(measure, rel=1e-13)
    interior = np.ones(mesh.n_nodes, dtype=bool)
    interior[np.unique(mesh.boundary_facets())] = False
    assert np.all(b[interior] == 0) and np.all(b[~interior] > 0)
    P, Q = BiLaplacianPrior(mesh, 0.5, 2.0), BiLaplacianPrior(mesh, 0.5, 2.0, robin=False)
    np.testing.assert_allclose((P.A - Q.A).toarray(), np.diag(1.0 / 1.42 * b), rtol=1e-12, atol=1e-15)


def test_3d_unit_cube():
    mesh = unit_cube(6)
    P = BiLaplacianPrior.from_correlation(mesh, length=0.4, std=1.0)
    _, _, C = dense_parts(P)
    np.testing.assert_allclose(P.variance(exact=True), np.diag(C), rtol=1e-10)
    V = np.random.default_rng(8).standard_normal((mesh.n_nodes, 2))
    np.testing.assert_allclose(P.precision(P.covariance(V)), V, rtol=0, atol=1e-10)
    assert P.sample(4, rng=0).shape == (mesh.n_nodes, 4)
    assert P.value_p(P.mean + V[:, 0]) == pytest.approx(0.5 * V[:, 0] @ np.linalg.solve(C, V[:, 0]), rel=1e-9)


# -- input checks and ownership ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gamma", "delta"])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_coefficients_must_be_positive(name, bad):
    kwargs = {"gamma": 1.0, "delta": 1.0, name: bad}
    with pytest.raises(ValueError, match=f"{name} must be a positive finite number"):
        BiLaplacianPrior(unit_square(2), **kwargs)


def test_bad_input_is_refused_with_clear_errors(small):
    mesh, n = unit_square(3), 16
    with pytest.raises(NonFiniteError, match="mean contains 1 NaN"):
        BiLaplacianPrior(mesh, 1.0, 1.0, mean=np.r_[np.nan, np.zeros(n - 1)])
    with pytest.raises(ShapeError, match="mean must be a scalar or a nodal array of length 16"):
        BiLaplacianPrior(mesh, 1.0, 1.0, mean=np.zeros(n + 1))
    with pytest.raises(ValueError, match="robin must be"):
        BiLaplacianPrior(mesh, 1.0, 1.0, robin="yes")
    with pytest.raises(ValueError, match="unknown solver"):
        BiLaplacianPrior(mesh, 1.0, 1.0, solver="nope")
    with pytest.raises(TypeError, match="adjopt.mesh.Mesh"):
        BiLaplacianPrior(mesh.points, 1.0, 1.0)
    P, m = small, small.n_params
    for method in (P.precision, P.covariance):
        for V in (np.zeros(m + 1), np.zeros((m - 1, 2)), np.zeros((m, 2, 2))):
            with pytest.raises(ShapeError, match=rf"V must have shape \({m},\) or \({m}, k\)"):
                method(V)
        with pytest.raises(NonFiniteError, match="V contains"):
            method(np.full(m, np.inf))
    with pytest.raises(ShapeError, match=f"p must be a nodal vector of length {m}"):
        P.value_p(np.zeros(m + 1))
    with pytest.raises(ShapeError, match=f"p must be a nodal vector of length {m}"):
        P.gradient_p(np.zeros((m, 1)))
    with pytest.raises(ShapeError, match="dp must have shape"):
        P.hessp_p(np.zeros(m), np.zeros(m - 2))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        P.sample(0)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        P.variance(exact=False, n_samples=0)


def test_arrays_passed_in_are_copied():
    mesh = unit_square(4)
    mean = np.linspace(0.0, 1.0, mesh.n_nodes)
    P = BiLaplacianPrior(mesh, 0.1, 1.0, mean=mean)
    p = np.ones(mesh.n_nodes)
    before, g_before = P.value_p(p), P.gradient_p(p)
    mean[:] = 5.0
    assert P.value_p(p) == before
    np.testing.assert_array_equal(P.gradient_p(p), g_before)
    np.testing.assert_array_equal(P.mean, np.linspace(0.0, 1.0, mesh.n_nodes))
    for arr in (P.mean, P.lumped_mass, P.A.data):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1.0
    R = P.precision_matrix()
    R.data[:] = 0.0  # a copy: the prior's own is untouched
    assert P.precision_matrix().count_nonzero() > 0
    np.testing.assert_array_equal(BiLaplacianPrior(mesh, 0.1, 1.0, mean=3.0).mean, np.full(mesh.n_nodes, 3.0))


def test_attributes_and_repr(small):
    P = small
    assert P.n_params == P.n == 49
    assert P.beta == pytest.approx(math.sqrt(0.1 * 3.0) / 1.42)
    assert repr(P) == "BiLaplacianPrior(gamma=0.1, delta=3, beta=0.38572, n_params=49, dim=2)"
    assert BiLaplacianPrior(unit_square(2), 1.0, 4.0, robin=0.25).beta == 0.25


def test_a_correlation_length_of_a_few_cells_is_warned_about(caplog):
    from adjopt import mesh as meshes

    msh = meshes.unit_square(8)
    with caplog.at_level("WARNING", logger="adjopt.priors"):
        BiLaplacianPrior.from_correlation(msh, 0.2, 1.0)  # 1.8 node spacings of 1/9
    assert any("only 1.8 cells" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="adjopt.priors"):
        BiLaplacianPrior.from_correlation(msh, 0.6, 1.0)  # 5.4 cells
    assert not caplog.records
