"""advection_diffusion_source: a nonsymmetric operator, transposed solves, derivatives and regression values."""

import advection_diffusion_source as ads
import numpy as np
import pytest

from adjopt.verify import check_hessian_symmetry, taylor_test


@pytest.fixture(scope="module")
def small():
    return ads.build(n=10, n_obs=20)


def test_operator_is_nonsymmetric(small):
    J = small.functional
    A = J.matrix.assemble(small.p0)
    assert abs(A - A.T).max() > 0.1 * abs(A).max()


def test_taylor_rates(small):
    J = small.functional
    p = 0.5 * ads.true_source(small.meta["mesh"].points)
    r2 = taylor_test(J, p, order=2)
    assert r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and (r3.exact or r3.rate >= 2.9), r3.table()
    assert check_hessian_symmetry(J, p) < 1e-10


def test_gradient_uses_the_transposed_operator(small):
    J = small.functional
    m = np.random.default_rng(1).standard_normal(J.n_params)
    A = J.matrix.assemble(m).toarray()
    L = J.rhs.B.toarray()
    misfit = J.objective.terms[0]
    B = misfit.B.toarray()
    u = np.linalg.solve(A, L @ m)
    lam = np.linalg.solve(A.T, B.T @ (B @ u - misfit.d))
    reg = sum(t.grad_p(u, m) for t in J.objective.terms[1:])
    np.testing.assert_allclose(J.gradient(m), L.T @ lam + reg, rtol=1e-10, atol=1e-14)
    # using A instead of A^T would be wrong: the check above is sensitive to it
    wrong = L.T @ np.linalg.solve(A, B.T @ (B @ u - misfit.d)) + reg
    assert np.abs(wrong - J.gradient(m)).max() > 1e-6 * np.abs(J.gradient(m)).max()


def test_supg_load_matrix_matches_the_fem_load():
    from adjopt import fem

    msh = ads.meshes.unit_square(6)
    f = ads.true_source(msh.points)
    v = np.array([1.0, 0.5])
    L = ads.supg_load_matrix(msh, v, 0.01)
    np.testing.assert_allclose(L @ f, fem.advection_diffusion_load(msh, v, 0.01, f), rtol=1e-12, atol=1e-15)


def test_regression_values(small):
    # measured with this implementation (n = 10, n_obs = 20, seed 0, m0 = 0)
    J = small.functional
    assert J.value(small.p0) == pytest.approx(0.03186463497475698, rel=1e-8)
    assert np.linalg.norm(J.gradient(small.p0)) == pytest.approx(0.06538057593812643, rel=1e-8)


def test_bad_options():
    with pytest.raises(ValueError, match="n must"):
        ads.build(n=1)
    with pytest.raises(ValueError, match="kappa"):
        ads.build(n=4, kappa=0.0)
    with pytest.raises(ValueError, match="velocity"):
        ads.build(n=4, velocity=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="n_obs"):
        ads.build(n=4, n_obs=1000)


def test_the_bayesian_version():
    import adjopt
    from adjopt.uq import LaplacePosterior
    from adjopt.verify import check_hessian_symmetry, taylor_test

    problem = ads.build(n=10, n_obs=20, regularization="bilaplacian")
    assert problem.name == "advection_diffusion_source_bilaplacian"
    J = problem.functional
    p = 0.3 * ads.true_source(problem.meta["mesh"].points)
    assert taylor_test(J, p, order=2).rate >= 1.9
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and (r3.exact or r3.rate >= 2.9), r3.table()  # J is quadratic: the remainder is round-off
    assert check_hessian_symmetry(J, p) < 1e-8
    assert isinstance(problem.meta["regularization"], adjopt.BiLaplacianPrior)
    # linear in m: one Newton step from anywhere is the MAP point, and the Laplace posterior is exact
    m = adjopt.minimize(problem, method="newton-cg", gtol=1e-10, maxiter=20).x
    n = J.n_params
    post = LaplacePosterior(J, m, rank=20, rng=0)  # 20 observations: the misfit Hessian has rank 20
    H = J.hessp(m, np.eye(n))
    np.testing.assert_allclose(post.variance(exact=True), np.diag(np.linalg.inv(0.5 * (H + H.T))), rtol=1e-8)
    with pytest.raises(ValueError, match="unknown regularization"):
        ads.build(n=4, regularization="tv")
