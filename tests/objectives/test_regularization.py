"""Regularization and volume terms: values, Taylor rates, use inside a ReducedFunctional."""

import numpy as np
import pytest
import scipy.sparse as sp
from problems_random import element_case

import adjopt
from adjopt.maps import DensityFilter, HeavisideProjection, compose
from adjopt.objectives import ParameterFunctional, TikhonovH1, TikhonovL2, TotalVariation, Volume
from adjopt.verify import taylor_test


def _p1_gradient_1d(n):
    """Gradient of a P1 field on n equal cells of [0, 1]: (n, n+1), and the cell lengths."""
    h = 1.0 / n
    G = sp.diags_array([-np.ones(n) / h, np.ones(n) / h], offsets=[0, 1], shape=(n, n + 1))
    return G, np.full(n, h)


def test_tikhonov_values():
    M = sp.diags_array([1.0, 2.0, 3.0])
    p = np.array([1.0, 1.0, 2.0])
    assert TikhonovL2(M).value(None, p) == pytest.approx(0.5 * (1 + 2 + 12))
    assert TikhonovL2(np.array([1.0, 2.0, 3.0]), p_ref=1.0).value(None, p) == pytest.approx(1.5)
    assert TikhonovL2(n=3).value(None, p) == pytest.approx(3.0)
    G, h = _p1_gradient_1d(4)
    K = G.T @ sp.diags_array(h) @ G
    x = np.linspace(0, 1, 5)
    assert TikhonovH1(K).value(None, 3 * x) == pytest.approx(0.5 * 9.0)  # 0.5 int |u'|^2, u' = 3


def test_total_variation_of_a_ramp_and_a_step():
    G, h = _p1_gradient_1d(10)
    x = np.linspace(0, 1, 11)
    tv = TotalVariation(G, h, eps=1e-8)
    assert tv.value(None, 2 * x) == pytest.approx(2.0, rel=1e-6)
    assert tv.value(None, (x > 0.5).astype(float)) == pytest.approx(1.0, rel=1e-6)


TERMS = {
    "l2": lambda: TikhonovL2(sp.diags_array(np.linspace(1, 2, 11)), p_ref=0.3),
    "h1": lambda: TikhonovH1((lambda G, h: G.T @ sp.diags_array(h) @ G)(*_p1_gradient_1d(10))),
    "tv": lambda: TotalVariation(*_p1_gradient_1d(10), eps=1e-2),
    "volume-projected": lambda: Volume(np.linspace(1, 2, 11), compose(
        DensityFilter(np.linspace(0, 1, 11)[:, None], 0.25), HeavisideProjection(11, beta=4.0))),
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_taylor_rates(name):
    F = ParameterFunctional(TERMS[name]())
    p = np.random.default_rng(0).uniform(0.1, 0.9, 11)
    r2 = taylor_test(F, p, order=2)
    r3 = taylor_test(F, p, order=3)
    assert r2.passed and (r2.exact or r2.rate >= 1.9), r2.table()
    assert r3.passed and (r3.exact or r3.rate >= 2.9), r3.table()


def test_volume_fraction():
    V = ParameterFunctional(Volume(np.array([1.0, 1.0, 2.0])))
    assert V.value(np.array([1.0, 0.0, 0.5])) == pytest.approx(0.5)
    np.testing.assert_allclose(V.gradient(np.zeros(3)), [0.25, 0.25, 0.5])
    np.testing.assert_array_equal(V.hessp(np.zeros(3), np.ones(3)), 0.0)


def test_volume_through_an_affine_map_equals_the_volume_of_the_mapped_design():
    from adjopt.maps import DensityFilter

    rng = np.random.default_rng(5)
    centers = rng.uniform(0, 4, (40, 2))
    vols = rng.uniform(0.5, 1.5, 40)
    H = DensityFilter(centers, 1.2)
    V = Volume(vols, H)
    assert V._v is not None  # the precomputed H^T w path
    for _ in range(3):
        p = rng.uniform(0, 1, 40)
        assert V.value_p(p) == pytest.approx(float(vols @ H.forward(p)) / vols.sum(), rel=1e-14)


def test_misfit_plus_regularization_in_functional():
    case = element_case(30, coefficient="exp", objective="misfit")
    base = case.functional
    m = case.p.size
    obj = base.objective + 0.1 * TikhonovL2(n=m, p_ref=0.2) + 1e-2 * TotalVariation(sp.eye_array(m), np.ones(m))
    J = adjopt.ReducedFunctional(base.matrix, base.rhs, obj)
    assert taylor_test(J, case.p, order=2).rate >= 1.9
    assert taylor_test(J, case.p, order=3).rate >= 2.9
    # value adds up
    J0 = adjopt.ReducedFunctional(base.matrix, base.rhs, base.objective)
    extra = 0.05 * np.sum((case.p - 0.2) ** 2) + 1e-2 * np.sum(np.sqrt(case.p**2 + 1e-6))
    assert J.value(case.p) == pytest.approx(J0.value(case.p) + extra, rel=1e-12)


def test_bad_input():
    with pytest.raises(adjopt.ShapeError, match="square"):
        TikhonovL2(np.ones((2, 3)))
    with pytest.raises(adjopt.ShapeError, match="p_ref"):
        TikhonovL2(np.ones(3), p_ref=np.ones(2))
    with pytest.raises(adjopt.ShapeError, match="matrix or a vector"):
        TikhonovL2(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="stiffness"):
        TikhonovH1(None)
    with pytest.raises(ValueError, match="eps"):
        TotalVariation(sp.eye_array(3), np.ones(3), eps=0.0)
    with pytest.raises(adjopt.ShapeError, match="elements"):
        TotalVariation(sp.eye_array(3), np.ones(2))
    with pytest.raises(adjopt.ShapeError, match="length 3"):
        TikhonovL2(np.ones(3)).value(None, np.ones(4))
    with pytest.raises(adjopt.ShapeError, match="volumes"):
        Volume(np.ones((2, 2)))
    with pytest.raises(adjopt.ShapeError, match="volumes"):
        Volume(np.ones(3), DensityFilter(np.zeros((4, 1)), 1.0))
    with pytest.raises(ValueError, match="n_params"):
        ParameterFunctional(TikhonovL2())
    with pytest.raises(adjopt.ShapeError):
        ParameterFunctional(TikhonovL2(n=3)).value(np.ones(2))


def _h1_l2(n=30, seed=0):
    G, h = _p1_gradient_1d(n)
    K = G.T @ sp.diags_array(h) @ G
    M = sp.diags_array(np.random.default_rng(seed).uniform(0.5, 1.5, n + 1))
    return K, M


@pytest.mark.parametrize("make", [lambda K, M: TikhonovH1(K, p_ref=0.2), lambda K, M: TikhonovL2(M),
                                  lambda K, M: TikhonovL2(n=K.shape[0]), lambda K, M: TikhonovL2(M.diagonal())])
def test_quadratic_gradient_after_a_value_is_the_kept_product(make, monkeypatch):
    K, M = _h1_l2()
    term = make(K, M)
    Mop = K if isinstance(term, TikhonovH1) else (M if term.M is not None else sp.eye_array(K.shape[0]))
    rng = np.random.default_rng(1)
    p, q = rng.standard_normal(K.shape[0]), rng.standard_normal(K.shape[0])
    ref = term.p_ref if term.p_ref is not None else 0.0

    def expected_grad(x):
        return Mop @ (x - ref)

    products = []
    real = type(term)._apply
    monkeypatch.setattr(type(term), "_apply", lambda self, v: products.append(1) or real(self, v))
    assert term.value(None, p) == pytest.approx(0.5 * (p - ref) @ Mop @ (p - ref), rel=1e-13)
    g = term.grad_p(None, p.copy())  # an equal p (another array): the value's product, not a new one
    assert len(products) == 1
    np.testing.assert_allclose(g, expected_grad(p), rtol=1e-13)
    g[:] = 7.0  # the caller owns what it got: the next gradient is not that array
    g2 = term.grad_p(None, p)
    assert len(products) == 2  # handed over once: computed again
    np.testing.assert_allclose(g2, expected_grad(p), rtol=1e-13)
    # a value at p, then the gradient at another point: computed for that point
    term.value(None, p)
    np.testing.assert_allclose(term.grad_p(None, q), expected_grad(q), rtol=1e-13)
    # p changed in place between the value and the gradient: the gradient of the changed p
    x = p.copy()
    term.value(None, x)
    x[3] += 1.0
    np.testing.assert_allclose(term.grad_p(None, x), expected_grad(x), rtol=1e-13)


def test_regularized_functional_gradient_is_unchanged_by_the_kept_product():
    case = element_case(3, n=8, n_elem=6, coefficient="exp")
    J, p = case.functional, case.p
    K, M = _h1_l2(n=p.size - 1)
    reg = 0.3 * TikhonovH1(K) + 0.1 * TikhonovL2(M)
    Jr = adjopt.ReducedFunctional(J.matrix, J.rhs, J.objective + reg, solver="superlu")
    Jc = adjopt.ReducedFunctional(J.matrix, J.rhs, J.objective + reg, solver="superlu")
    g_after_value = (Jr.value(p), Jr.gradient(p))[1]
    g_alone = Jc.gradient(p)  # no value before: the products are computed by the gradient
    np.testing.assert_array_equal(g_after_value, g_alone)
    np.testing.assert_allclose(g_alone - J.gradient(p), 0.3 * (K @ p) + 0.1 * (M @ p), rtol=1e-12, atol=1e-14)


def test_total_variation_value_is_the_weighted_sum():
    G, h = _p1_gradient_1d(20)
    p = np.random.default_rng(2).standard_normal(21)
    tv = TotalVariation(G, h, eps=1e-2)
    g = (G @ p).reshape(-1, 1)
    assert tv.value(None, p) == pytest.approx(float(np.sum(h * np.sqrt(g[:, 0] ** 2 + 1e-4))), rel=1e-14)


def _spy(monkeypatch, cls, names):
    """Record the calls of ``cls``'s methods ``names`` (by name)."""
    seen = []
    for name in names:
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _n=name, _r=real: seen.append(_n) or _r(self, *a))
    return seen


def test_a_sum_leaves_out_derivatives_that_are_zero_by_construction(monkeypatch):
    rng = np.random.default_rng(4)
    n, m = 7, 5
    B = rng.standard_normal((3, n))
    misfit = adjopt.SquaredMisfit(rng.standard_normal(3), B=B)
    K = sp.diags_array(rng.uniform(1, 2, m))
    f = misfit + 10.0 * (TikhonovH1(K) + 0.1 * TikhonovL2(n=m))
    u, du, p, dp = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(m), rng.standard_normal(m)
    from adjopt.objectives.regularization import ParameterObjective

    zero_u = _spy(monkeypatch, ParameterObjective, ["grad_u", "hess_uu", "hess_up", "hess_pu"])
    zero_p = _spy(monkeypatch, adjopt.objectives.Objective, ["grad_p", "hess_pp", "hess_up", "hess_pu"])
    g_u, g_p = f.grad_u(u, p), f.grad_p(u, p)
    h_uu, h_up, h_pu, h_pp = f.hess_uu(u, p, du), f.hess_up(u, p, dp), f.hess_pu(u, p, du), f.hess_pp(u, p, dp)
    # the regularization's u-derivatives and the misfit's p-derivatives were not called, except once each
    # for the mixed ones, where every term is zero (the first term gives the zero of the right shape)
    assert zero_u == [] and zero_p == ["hess_up", "hess_pu"]
    r = B @ u - misfit.d
    np.testing.assert_allclose(g_u, B.T @ r, rtol=1e-14)
    np.testing.assert_allclose(g_p, 10.0 * (K @ p + 0.1 * p), rtol=1e-14)
    np.testing.assert_allclose(h_uu, B.T @ (B @ du), rtol=1e-14)
    np.testing.assert_array_equal(h_up, np.zeros(n))
    np.testing.assert_array_equal(h_pu, np.zeros(m))
    np.testing.assert_allclose(h_pp, 10.0 * (K @ dp + 0.1 * dp), rtol=1e-14)
    assert f.zero_derivative("hess_up") and f.zero_derivative("hess_pu") and not f.zero_derivative("grad_u")


def test_an_overridden_derivative_is_always_called_whatever_depends_on_p_says():
    # an objective that forgot depends_on_p = True but implements grad_p: its gradient is not dropped
    class Tilted(adjopt.objectives.Objective):
        def value(self, u, p):
            return float(np.sum(u) * np.sum(p))

        def grad_u(self, u, p):
            return np.full_like(u, np.sum(p))

        def grad_p(self, u, p):
            return np.full(np.shape(p)[0], np.sum(u))

    class Bias(TikhonovL2):
        def grad_u(self, u, p):  # a parameter term that overrides a u-derivative is called too
            return np.ones_like(u)

    f = Tilted() + TikhonovL2(n=3) + Bias(n=3)
    u, p = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, -1.0, 2.0])
    assert not Tilted().depends_on_p and not Tilted().zero_derivative("grad_p")
    np.testing.assert_allclose(f.grad_p(u, p), 10.0 + 2 * p)
    np.testing.assert_allclose(f.grad_u(u, p), 1.5 + np.ones(4))
    g = f.grad_u(u, p)
    g[:] = 0.0  # a new array, even where one term is left
    np.testing.assert_allclose(f.grad_u(u, p), 2.5)


def test_a_sum_of_one_compliance_term_does_not_hand_out_the_load():
    load = np.array([1.0, 2.0, 3.0])
    f = adjopt.Compliance(load) + TikhonovL2(n=2)
    g = f.grad_u(np.zeros(3), np.zeros(2))
    np.testing.assert_array_equal(g, load)
    assert g is not f.terms[0].load and g.flags.writeable
