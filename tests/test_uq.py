"""Low-rank Hessians and the Laplace posterior (adjopt.uq): the randomized generalized eigenpairs against
scipy.linalg.eigh, the posterior covariance, variance, samples and KL divergence against dense formulas, the
low-rank preconditioner's spectrum, and bad input."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sla

import adjopt
from adjopt.uq import GaussianPrior, LaplacePosterior, LowRankPreconditioner, misfit_hessian, randomized_eigh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "problems"))
import poisson_inversion  # noqa: E402


@pytest.fixture(scope="module")
def inverse():
    """poisson_inversion with the Bayesian prior at n = 6 (49 parameters), its MAP point and dense matrices."""
    problem = poisson_inversion.build(n=6, n_obs=8, regularization="bilaplacian")
    J = problem.functional
    m = adjopt.minimize(problem, method="newton-cg", gtol=1e-11, maxiter=60).x
    n = J.n_params
    eye = np.eye(n)
    H = J.hessp(m, eye)
    H = 0.5 * (H + H.T)
    prior = GaussianPrior.of(J.objective, n)
    R = prior.precision(eye)
    R = 0.5 * (R + R.T)
    Hgn = J.hessp(m, eye, gauss_newton=True)
    return dict(J=J, m=m, n=n, H=H, R=R, Hgn=0.5 * (Hgn + Hgn.T), prior=prior)


def test_the_prior_is_found_in_the_objective(inverse):
    prior = inverse["prior"]
    assert len(prior.terms) == 1 and isinstance(prior.terms[0][1], adjopt.BiLaplacianPrior)
    term = prior.terms[0][1]
    np.testing.assert_allclose(inverse["R"], term.precision_matrix().toarray(), rtol=1e-12, atol=1e-12)
    # the covariance inverts the precision
    V = np.random.default_rng(0).standard_normal((inverse["n"], 3))
    np.testing.assert_allclose(prior.covariance(prior.precision(V)), V, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_double_pass_eigenpairs_match_the_dense_generalized_eigensolver(inverse, gauss_newton):
    Hd = (inverse["Hgn"] if gauss_newton else inverse["H"]) - inverse["R"]
    ref = sla.eigh(Hd, inverse["R"], eigvals_only=True)[::-1]
    H = misfit_hessian(inverse["J"], inverse["m"], inverse["prior"], gauss_newton=gauss_newton)
    eig = randomized_eigh(H, inverse["n"], 8, R=inverse["prior"].precision, Rinv=inverse["prior"].covariance,
                          oversampling=10, rng=1)
    assert eig.values.shape == (8,) and eig.vectors.shape == (inverse["n"], 8)
    # 18 sketch columns, then the second pass on the R-orthonormal basis: 18 columns, or 8 when the sketch
    # spans only the 8 directions of the Gauss-Newton misfit (the null ones are dropped)
    assert eig.actions == 18 + (8 if gauss_newton else 18)
    # the dominant eigenvalues to 1e-8 relative (8 observations: the Gauss-Newton misfit has rank <= 8, exactly
    # caught by the sketch; the full one adds a part of full rank, so only the leading pairs are that close)
    lead = 8 if gauss_newton else 3
    np.testing.assert_allclose(eig.values[:lead], ref[:lead], rtol=1e-8)
    np.testing.assert_allclose(eig.values[:7], ref[:7], rtol=1e-5)  # the 8th (0.1) is in the tail
    # R-orthonormal vectors, and the residuals reported are the true ones
    np.testing.assert_allclose(eig.vectors.T @ inverse["R"] @ eig.vectors, np.eye(8), atol=1e-10)
    V, lam = eig.vectors, eig.values
    res = Hd @ V - inverse["R"] @ V * lam
    true = np.sqrt(np.einsum("ij,ij->j", res, np.linalg.solve(inverse["R"], res))) / np.maximum(np.abs(lam), 1)
    np.testing.assert_allclose(eig.residuals, true, rtol=1e-3, atol=1e-12)
    assert eig.residuals[:lead].max() < (1e-9 if gauss_newton else 1e-4)


def test_single_pass_needs_no_second_block_and_is_close(inverse):
    Hd = inverse["Hgn"] - inverse["R"]
    ref = sla.eigh(Hd, inverse["R"], eigvals_only=True)[::-1]
    H = misfit_hessian(inverse["J"], inverse["m"], inverse["prior"], gauss_newton=True)
    eig = randomized_eigh(H, inverse["n"], 6, R=inverse["prior"].precision, Rinv=inverse["prior"].covariance,
                          oversampling=10, passes=1, rng=2, residuals=False)
    assert eig.actions == 16 and np.isnan(eig.residuals).all()
    # the Gauss-Newton misfit Hessian has rank 8 <= 16 sketch columns: the single pass is exact too
    np.testing.assert_allclose(eig.values, ref[:6], rtol=1e-6)


def test_the_standard_problem_when_no_weight_is_given():
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    lam = 10.0 ** (-np.arange(30) / 2)
    A = (Q * lam) @ Q.T
    eig = randomized_eigh(lambda V: A @ V, 30, 5, oversampling=10, rng=4)
    np.testing.assert_allclose(eig.values, lam[:5], rtol=1e-8)
    np.testing.assert_allclose(np.abs(eig.vectors.T @ Q[:, :5]), np.eye(5), atol=1e-6)


@pytest.fixture
def row_blocks(monkeypatch):
    """The eigensolver's tall products and QR split into up to 3 row blocks of at least 16 rows, on threads (each
    on one BLAS thread), as on a machine with 3 cores (PARALLEL_MIN_ROWS = 16), and the QR of a sketch into
    blocks of max(24, 2 k) rows (QR_BLOCK_ROWS = 24)."""
    pytest.importorskip("threadpoolctl")
    import adjopt.uq as uq

    monkeypatch.setattr(uq, "PARALLEL_MIN_ROWS", 16)
    monkeypatch.setattr(uq, "QR_BLOCK_ROWS", 24)
    monkeypatch.setattr(uq, "_blas_threads", lambda: 3)
    return uq


def _sketch_like(rng, n, k, rank, decades):
    """(n, k) of the given rank, its singular values spread over ``decades``, every column mixing the directions
    (a sketch)."""
    U = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    V = np.linalg.qr(rng.standard_normal((k, rank)))[0]
    return (U * np.logspace(0, -decades, rank)) @ V.T


def test_tall_products_and_the_tsqr_on_row_blocks_match_one_block(row_blocks):
    uq = row_blocks
    rng = np.random.default_rng(11)
    assert uq._row_blocks(200) == [(0, 67), (67, 133), (133, 200)]
    assert uq._row_blocks(40) == [(0, 20), (20, 40)] and uq._row_blocks(31) == [(0, 31)]
    for Y in (rng.standard_normal((200, 12)), np.asfortranarray(rng.standard_normal((200, 12)))):
        W = rng.standard_normal((12, 5))
        for order in ("C", "F"):
            out = uq._matmul(Y, W, order=order)
            assert out.flags.c_contiguous if order == "C" else out.flags.f_contiguous
            np.testing.assert_allclose(out, Y @ W, rtol=0, atol=1e-13 * np.abs(Y @ W).max())
        np.testing.assert_allclose(uq._gram(Y, Y), Y.T @ Y, rtol=0, atol=1e-13 * np.abs(Y.T @ Y).max())
    # full rank over 12 decades (every column a mix of all directions): every direction is kept, the basis is
    # orthonormal and spans Y to round-off; rank 5 in 12 columns: 5 directions. 3 threads of 2-3 QR blocks
    # (24 rows), one thread of 8, and one block (PARALLEL_MIN_ROWS, QR_BLOCK_ROWS above the rows)
    for threads, qr_rows in ((3, 24), (1, 24), (3, 10**6)):
        uq._blas_threads = lambda t=threads: t
        uq.QR_BLOCK_ROWS = qr_rows
        for rank, decades in ((12, 12), (5, 3)):
            Y = _sketch_like(rng, 200, 12, rank, decades)
            for Q in (uq._orthonormal_basis(Y), uq._orthonormal_basis(np.asfortranarray(Y))):
                assert Q.shape == (200, rank)
                np.testing.assert_allclose(Q.T @ Q, np.eye(rank), rtol=0, atol=1e-14)
                assert np.linalg.norm(Y - Q @ (Q.T @ Y)) <= 1e-14 * np.linalg.norm(Y)
    with pytest.raises(ValueError, match="zero"):
        uq._orthonormal_basis(np.zeros((200, 4)))


def test_the_eigensolver_on_row_blocks_gives_the_one_block_result(inverse, row_blocks, monkeypatch):
    def solve():
        H = misfit_hessian(inverse["J"], inverse["m"], inverse["prior"])
        return randomized_eigh(H, inverse["n"], 8, R=inverse["prior"].precision, Rinv=inverse["prior"].covariance,
                               oversampling=10, rng=1)

    split = solve()  # 49 parameters: 3 blocks of 16-17 rows
    monkeypatch.setattr(row_blocks, "PARALLEL_MIN_ROWS", 10**9)
    whole = solve()
    np.testing.assert_allclose(split.values, whole.values, rtol=1e-10)
    np.testing.assert_allclose(np.abs(split.vectors.T @ inverse["R"] @ whole.vectors), np.eye(8), atol=1e-7)
    np.testing.assert_allclose(split.residuals, whole.residuals, rtol=1e-4, atol=1e-12)


def test_a_failing_row_block_raises_on_the_calling_thread(row_blocks):
    def job(r0, r1):
        if r0 > 0:
            raise ArithmeticError(f"block at row {r0}")
        return r1

    with pytest.raises(ArithmeticError, match="block at row"):
        row_blocks._by_rows(job, 200)
    assert row_blocks._by_rows(lambda r0, r1: (r0, r1), 200) == [(0, 67), (67, 133), (133, 200)]


def test_residuals_from_the_priors_norms_are_those_from_its_covariance(inverse):
    prior, n = inverse["prior"], inverse["n"]
    H = misfit_hessian(inverse["J"], inverse["m"], prior)
    kw = dict(R=prior.precision, Rinv=prior.covariance, oversampling=10, rng=3)
    ref = randomized_eigh(H, n, 6, **kw)
    fast = randomized_eigh(H, n, 6, Rinv_norms=prior.covariance_norms, **kw)
    np.testing.assert_array_equal(fast.values, ref.values)
    np.testing.assert_allclose(fast.residuals, ref.residuals, rtol=1e-6, atol=1e-14)
    # the single pass with residuals: R V carried along from the orthonormalization, as in the double pass
    single = randomized_eigh(H, n, 6, passes=1, Rinv_norms=prior.covariance_norms, **kw)
    Hd = inverse["H"] - inverse["R"]
    V, lam = single.vectors, single.values
    res = Hd @ V - inverse["R"] @ V * lam
    true = np.sqrt(np.einsum("ij,ij->j", res, np.linalg.solve(inverse["R"], res))) / np.maximum(np.abs(lam), 1)
    np.testing.assert_allclose(single.residuals, true, rtol=1e-6, atol=1e-12)


def test_the_misfit_hessian_subtracts_the_prior_in_place_and_keeps_its_input(inverse):
    prior, n = inverse["prior"], inverse["n"]
    H = misfit_hessian(inverse["J"], inverse["m"], prior)
    V = np.random.default_rng(8).standard_normal((n, 4))
    before = V.copy()
    out = H(V)
    np.testing.assert_array_equal(V, before)
    ref = (inverse["H"] - inverse["R"]) @ V
    np.testing.assert_allclose(out, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    np.testing.assert_allclose(H(V[:, 0]), ref[:, 0], rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_gaussian_prior_covariance_norms(inverse):
    import scipy.sparse as sp

    n, R = inverse["n"], inverse["R"]
    V = np.random.default_rng(9).standard_normal((n, 3))
    scaled = GaussianPrior.of(4.0 * inverse["prior"].terms[0][1], n)  # one BiLaplacian term, scaled
    ref = np.sqrt(np.einsum("ij,ij->j", V, np.linalg.solve(4.0 * R, V)))
    np.testing.assert_allclose(scaled.covariance_norms(V), ref, rtol=1e-10)
    assert scaled.covariance_norms(V[:, 1]) == pytest.approx(ref[1], rel=1e-10)
    M = sp.csr_array(np.diag(np.arange(1.0, n + 1)))
    summed = GaussianPrior.of(adjopt.TikhonovL2(M) + adjopt.TikhonovL2(), n)  # no term of its own norms
    ref = np.sqrt(np.einsum("ij,ij->j", V, V / (np.arange(1.0, n + 1) + 1.0)[:, None]))
    np.testing.assert_allclose(summed.covariance_norms(V), ref, rtol=1e-12)
    assert isinstance(summed.covariance_norms(V[:, 0]), float)


def _posterior(inverse, rank):
    return LaplacePosterior(inverse["J"], inverse["m"], rank=rank, oversampling=10, rng=5)


def test_the_posterior_variance_and_covariance_match_the_dense_posterior(inverse):
    n = inverse["n"]
    post = _posterior(inverse, n)  # every pair: the low-rank formulas are then exact
    C = np.linalg.inv(inverse["H"])
    np.testing.assert_allclose(post.variance(exact=True), np.diag(C), rtol=1e-7)
    V = np.random.default_rng(6).standard_normal((n, 2))
    np.testing.assert_allclose(post.covariance(V), C @ V, rtol=1e-6, atol=1e-9 * np.abs(C @ V).max())
    np.testing.assert_allclose(post.covariance(V[:, 0]), C @ V[:, 0], rtol=1e-6, atol=1e-9 * np.abs(C @ V).max())
    # a truncated posterior is the formula with the kept pairs; the kept eigenvalues are positive, so it lies
    # below the prior
    low = _posterior(inverse, 4)
    Cp = np.linalg.inv(inverse["R"])
    ref = np.diag(Cp) - (low.vectors**2) @ (low.values / (1 + low.values))
    np.testing.assert_allclose(low.variance(exact=True), ref, rtol=1e-10)
    assert np.all(low.variance(exact=True) <= np.diag(Cp) * (1 + 1e-12))


def test_samples_converge_to_the_posterior_covariance_at_the_monte_carlo_rate(inverse):
    post = _posterior(inverse, inverse["n"])
    C = np.linalg.inv(inverse["H"])
    bound = np.sqrt(np.sum(C**2) + np.trace(C) ** 2)  # E||S - C||_F^2 = (||C||_F^2 + tr(C)^2) / N (Wishart)
    errors = {}
    for N in (400, 10000):
        S = post.sample(N, rng=7)
        assert S.shape == (inverse["n"], N)
        X = S - inverse["m"][:, None]  # about the known mean
        errors[N] = np.linalg.norm(X @ X.T / N - C)
        assert errors[N] <= 3 * bound / np.sqrt(N)
        np.testing.assert_allclose(S.mean(axis=1), inverse["m"], atol=5 * np.sqrt(np.diag(C).max() / N))
    assert errors[10000] < errors[400] / 2.5  # sqrt(25) = 5 expected


def test_the_kl_divergence_matches_the_dense_gaussians(inverse):
    post = _posterior(inverse, inverse["n"])
    n, R, H = inverse["n"], inverse["R"], inverse["H"]
    C = np.linalg.inv(H)
    dm = inverse["m"] - inverse["prior"].mean
    ref = 0.5 * (np.trace(R @ C) - n + dm @ R @ dm + np.linalg.slogdet(H)[1] - np.linalg.slogdet(R)[1])
    assert post.kl_divergence() == pytest.approx(ref, rel=1e-7)
    summary = post.summary()
    assert summary["rank"] == post.rank >= n - 4 and summary["kl_divergence"] == pytest.approx(ref, rel=1e-7)
    assert summary["eigenvalues_above_1"] == int(np.sum(post.values > 1))


def test_the_low_rank_preconditioner_clusters_the_spectrum(inverse):
    post = _posterior(inverse, 5)
    P = post.preconditioner()
    assert isinstance(P, LowRankPreconditioner)
    n = inverse["n"]
    eye = np.eye(n)
    Pinv = P.riesz(eye)
    np.testing.assert_allclose(Pinv @ P.apply(eye), eye, atol=1e-8)
    # P^{-1} (H + R): eigenvalues 1 on the kept pairs, 1 + lambda_i on the others: in [1 + lambda_min, 1 + lambda_6]
    ref = sla.eigh(inverse["H"] - inverse["R"], inverse["R"], eigvals_only=True)[::-1]
    mu = np.sort(np.linalg.eigvals(Pinv @ inverse["H"]).real)
    assert mu.max() <= (1 + ref[5]) * (1 + 1e-6)
    assert mu.min() >= (1 + min(ref.min(), 0)) * (1 - 1e-6)
    raw = np.linalg.eigvalsh(inverse["H"])
    assert mu.max() / mu.min() < 0.1 * raw.max() / raw.min()
    np.testing.assert_allclose(P.diagonal(), np.diag(P.apply(eye)), rtol=1e-10)


def test_newton_cg_with_the_low_rank_preconditioner():
    problem = poisson_inversion.build(n=8, n_obs=8, regularization="bilaplacian")
    ref = adjopt.minimize(problem, method="newton-cg", gtol=1e-10, maxiter=60)
    low = adjopt.minimize(problem, method="newton-cg", preconditioner="lowrank", gtol=1e-10, maxiter=60)
    assert low.success
    np.testing.assert_allclose(low.x, ref.x, rtol=1e-6, atol=1e-7 * np.abs(ref.x).max())
    cg = lambda r: sum(h.get("cg_iterations", 0) for h in r.history)  # noqa: E731
    assert cg(low) < cg(ref)


def test_bad_input_is_refused_or_warned(inverse):
    J, m, n = inverse["J"], inverse["m"], inverse["n"]
    with pytest.raises(ValueError, match="exceeds the parameter dimension"):
        LaplacePosterior(J, m, rank=n + 1)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        randomized_eigh(lambda V: V, 5, 0)
    with pytest.raises(ValueError, match="passes"):
        randomized_eigh(lambda V: V, 5, 2, passes=3)
    with pytest.raises(ValueError, match="both R and Rinv"):
        randomized_eigh(lambda V: V, 5, 2, R=lambda V: V)
    with pytest.raises(adjopt.ShapeError, match="returned shape"):
        randomized_eigh(lambda V: V[:, :1], 5, 2)
    with pytest.raises(adjopt.NonFiniteError):
        randomized_eigh(lambda V: V * np.nan, 5, 2)
    with pytest.raises(ValueError, match="zero"):
        randomized_eigh(lambda V: 0 * V, 5, 2)
    # a point that is not the MAP point: warned, with the Newton decrement
    with pytest.warns(RuntimeWarning, match="not a stationary point"):
        LaplacePosterior(J, np.zeros(n), rank=4, rng=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LaplacePosterior(J, m, rank=4, rng=0)  # the MAP point: no warning
    # an objective without a prior, or with one that is not positive definite
    msh = poisson_inversion.make_mesh(6, 2)
    K = poisson_inversion.assemble(msh.cells, poisson_inversion.p1_stiffness(msh), n)
    with pytest.raises(ValueError, match="no prior term"):
        GaussianPrior.of(adjopt.SquaredMisfit(np.zeros(2), B=np.ones((2, n))), n)
    h1 = GaussianPrior.of(adjopt.TikhonovH1(K), n)
    with pytest.raises(ValueError, match="not symmetric positive definite.*TikhonovL2"):
        h1.covariance(np.ones(n))
    with pytest.raises(ValueError, match="positive weight"):
        GaussianPrior.of(-1.0 * adjopt.TikhonovL2(), n)
    with pytest.raises(adjopt.ShapeError):
        inverse["prior"].precision(np.ones(n + 1))


def test_other_gaussian_priors_sample_and_give_variances():
    n = 6
    diag = GaussianPrior.of(4.0 * adjopt.TikhonovL2(), n)
    S = diag.sample(20000, rng=0)
    np.testing.assert_allclose(S.var(axis=1), 0.25, rtol=0.05)
    np.testing.assert_allclose(diag.variance(), np.full(n, 0.25), rtol=1e-12)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, n))
    import scipy.sparse as sp

    M = sp.csr_array(X @ X.T + n * np.eye(n))
    dense = GaussianPrior.of(adjopt.TikhonovL2(M) + adjopt.TikhonovL2(), n)
    C = np.linalg.inv(M.toarray() + np.eye(n))
    np.testing.assert_allclose(dense.variance(), np.diag(C), rtol=1e-10)
    np.testing.assert_allclose(dense.variance(exact=False, n_samples=4000, rng=2), np.diag(C), rtol=0.15)
    S = dense.sample(20000, rng=3)
    np.testing.assert_allclose(np.cov(S), C, atol=0.05 * np.abs(C).max())


def test_the_leading_eigenvalues_converge_under_mesh_refinement():
    """Fixed observation points, the Bayesian prior, the Gauss-Newton misfit Hessian at the true field: the
    leading eigenvalues are those of a discretized compact operator, converging at O(h^2)."""
    vals = {}
    for n in (16, 32, 64):
        problem = poisson_inversion.build(n=n, regularization="bilaplacian")
        post = LaplacePosterior(problem.functional, problem.meta["m_true"], rank=20, oversampling=40, rng=0,
                                gauss_newton=True, stationarity_tol=np.inf)
        vals[n] = post.values
        assert post.eig.residuals.max() < 1e-8  # 50 observations: rank <= 50 < the 60 sketch columns
    coarse = np.abs(vals[16] / vals[64] - 1)
    fine = np.abs(vals[32] / vals[64] - 1)
    assert fine[:10].max() < 0.05  # the leading 10 within 5 % from 32 x 32 on
    # O(h^2): the 16 x 16 differences are about 5x the 32 x 32 ones (4x for h^2, against the 64 x 64 values)
    assert fine[:20].max() < coarse[:20].max() / 3


def test_monte_carlo_variances_are_nonnegative_and_converge(inverse):
    post = _posterior(inverse, 12)
    exact = post.variance(exact=True)
    mc = post.variance(exact=False, n_samples=3000, rng=0)
    assert np.all(mc > 0)
    assert np.abs(mc / exact - 1).max() < 6 * np.sqrt(2 / 3000)  # six standard errors
    prior = inverse["prior"]
    mcp = prior.variance(exact=False, n_samples=3000, rng=1)
    np.testing.assert_allclose(mcp, prior.variance(exact=True), rtol=6 * np.sqrt(2 / 3000))


def test_a_prior_that_cannot_be_sampled_is_refused_beyond_the_exact_limit(monkeypatch):
    import scipy.sparse as sp

    import adjopt.uq as uq

    n = 30
    M = sp.diags_array([np.full(n - 1, -1.0), np.full(n, 3.0), np.full(n - 1, -1.0)], offsets=[-1, 0, 1])
    prior = GaussianPrior.of(adjopt.TikhonovL2(sp.csr_array(M)), n)
    monkeypatch.setattr(uq, "EXACT_VARIANCE_LIMIT", 10)
    small = prior.variance(exact=False, n_samples=4000, rng=0)  # a dense Cholesky factor samples it
    np.testing.assert_allclose(small, np.diag(np.linalg.inv(M.toarray())), rtol=0.15)
    monkeypatch.setattr(uq, "DENSE_SAMPLING_LIMIT", 10)
    with pytest.raises(NotImplementedError, match="exact=True"):
        prior.variance()
    np.testing.assert_allclose(prior.variance(exact=True), np.diag(np.linalg.inv(M.toarray())), rtol=1e-10)


def test_a_numerically_singular_prior_is_refused():
    K = poisson_inversion.assemble(poisson_inversion.make_mesh(3, 2).cells,
                                   poisson_inversion.p1_stiffness(poisson_inversion.make_mesh(3, 2)), 16)
    for objective in (10.0 * adjopt.TikhonovH1(K), adjopt.TikhonovH1(K) + 1e-18 * adjopt.TikhonovL2()):
        with pytest.raises(ValueError, match="not symmetric positive definite"):
            GaussianPrior.of(objective, 16).covariance(np.ones(16))


def test_posterior_arrays_are_owned_and_inputs_checked(inverse):
    post = _posterior(inverse, 6)
    for arr in (post.values, post.vectors, post.m, post.d):
        assert not arr.flags.writeable
    n = inverse["n"]
    with pytest.raises(TypeError, match="complex"):
        post.covariance(np.ones(n) + 1j)
    with pytest.raises(ValueError, match="stationarity_tol"):
        LaplacePosterior(inverse["J"], inverse["m"], rank=3, stationarity_tol=-1.0)
    vals, vecs = np.array(post.values), np.array(post.vectors)
    P = LowRankPreconditioner(inverse["prior"], vals, vecs)
    before = P.riesz(np.ones(n))
    vals[:] = 0.0
    vecs[:] = 0.0
    np.testing.assert_array_equal(P.riesz(np.ones(n)), before)  # copies, not views of the caller's arrays
    with pytest.raises(adjopt.ShapeError, match="vectors"):
        LowRankPreconditioner(inverse["prior"], np.ones(3), np.ones((n, 2)))
    with pytest.raises(adjopt.NonFiniteError):
        LowRankPreconditioner(inverse["prior"], np.array([np.nan]), np.ones((n, 1)))


def test_low_rank_newton_cg_resumes_and_refuses_bounds(tmp_path):
    problem = poisson_inversion.build(n=8, n_obs=8, regularization="bilaplacian")
    full = adjopt.minimize(problem, method="newton-cg", preconditioner="lowrank", gtol=1e-10, maxiter=60)
    ck = tmp_path / "ck.npz"
    part = adjopt.minimize(problem, method="newton-cg", preconditioner="lowrank", gtol=1e-10, maxiter=2,
                           checkpoint=ck)
    assert not part.success
    rest = adjopt.minimize(problem, method="newton-cg", preconditioner="lowrank", gtol=1e-10, maxiter=60,
                           checkpoint=ck, resume=ck)
    assert rest.success
    np.testing.assert_allclose(rest.x, full.x, rtol=1e-6, atol=1e-7 * np.abs(full.x).max())
    from dataclasses import replace

    bounded = replace(problem, bounds=(-1.0, 2.0))
    with pytest.raises(ValueError, match="without bounds"):
        adjopt.minimize(bounded, method="newton-cg", preconditioner="lowrank")
    for bad in (-1, "x", True):
        with pytest.raises(ValueError, match="seed"):
            adjopt.minimize(problem, method="newton-cg", preconditioner="lowrank", seed=bad)


def test_the_prior_of_a_transient_functional_is_found():
    import scipy.sparse as sp

    from adjopt import fem
    from adjopt import mesh as meshes
    from adjopt.transient import Final, TimeStepping, TransientReducedFunctional

    msh = meshes.unit_square(3)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    conn = dm.restrict(msh.cells)
    A = adjopt.ElementCoefficientMatrix(conn, fem.p1_stiffness(msh), "exp", n=dm.n_free)
    M = fem.assemble(conn, fem.p1_mass(msh), dm.n_free)
    B = sp.random(3, dm.n_free, density=0.7, random_state=0)
    J = TransientReducedFunctional(A, M, [Final(adjopt.SquaredMisfit(np.ones(3), B=B)), 0.5 * adjopt.TikhonovL2()],
                                   TimeStepping(dt=0.1, n_steps=3), rhs=np.ones(dm.n_free))
    prior = GaussianPrior.of(J, J.n_params)
    assert len(prior.terms) == 1 and prior.terms[0][0] == 0.5
    post = LaplacePosterior(J, np.zeros(J.n_params), rank=3, gauss_newton=True, stationarity_tol=np.inf)
    assert post.rank == 3 and np.all(np.isfinite(post.values)) and post.values[0] > 0
