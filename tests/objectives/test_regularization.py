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
