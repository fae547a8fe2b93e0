"""Tests for the numpy/scipy port of top88 (Andreassen et al. 2011)."""

import math

import numpy as np
import pytest

from .top88 import density_filter, element_stiffness, top88

# Reference values for the paper's standard call top88(60,20,0.5,3,1.5,ft).
# They were measured with this module itself (python tests/reference/top88.py,
# numpy 2.4.6, scipy 1.17.1, SuperLU via spsolve) -- they are a regression
# baseline for this implementation, not numbers copied from the paper.
C_60x20_FT2 = 218.80322107310297
NIT_60x20_FT2 = 127
C_60x20_FT1 = 203.19245763953455
NIT_60x20_FT1 = 94


@pytest.fixture(scope="module")
def mbb_ft2():
    return top88(60, 20, 0.5, 3.0, 1.5, ft=2)


# --------------------------------------------------------------------- KE
def test_ke_symmetric_psd_rigid_body_modes():
    KE = element_stiffness(0.3)
    assert KE.shape == (8, 8)
    np.testing.assert_allclose(KE, KE.T, rtol=0, atol=1e-15)
    # Local node order LL, LR, UR, UL on the unit square (x right, y up).
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tx = np.tile([1.0, 0.0], 4)
    ty = np.tile([0.0, 1.0], 4)
    rot = np.column_stack([-xy[:, 1], xy[:, 0]]).ravel()
    for mode in (tx, ty, rot):
        assert np.abs(KE @ mode).max() < 1e-14
    ev = np.linalg.eigvalsh(KE)
    assert ev.min() > -1e-14
    assert np.sum(ev > 1e-10) == 5  # 8 dofs - 3 rigid body modes


def test_ke_matches_paper_entries():
    # First row of KE for nu = 0.3 from A11/A12/B11/B12 of the paper.
    nu = 0.3
    KE = element_stiffness(nu)
    row_a = np.array([12, 3, -6, -3, -6, -3, 0, 3])
    row_b = np.array([-4, 3, -2, 9, 2, -3, 4, -9])
    np.testing.assert_allclose(KE[0], (row_a + nu * row_b) / (1 - nu**2) / 24, rtol=1e-15)


# ----------------------------------------------------------------- filter
def _loop_filter(nelx, nely, rmin):
    """The paper's four nested loops (lines 29-43), dense, for comparison."""
    n = nelx * nely
    H = np.zeros((n, n))
    r = math.ceil(rmin) - 1
    for i1 in range(nelx):
        for j1 in range(nely):
            for i2 in range(max(i1 - r, 0), min(i1 + r, nelx - 1) + 1):
                for j2 in range(max(j1 - r, 0), min(j1 + r, nely - 1) + 1):
                    H[i1 * nely + j1, i2 * nely + j2] = max(
                        0.0, rmin - math.sqrt((i1 - i2) ** 2 + (j1 - j2) ** 2)
                    )
    return H


@pytest.mark.parametrize("nelx,nely,rmin", [(6, 4, 1.5), (9, 5, 2.3), (5, 3, 1.0)])
def test_filter_matches_loops_and_rows_normalise(nelx, nely, rmin):
    H, Hs = density_filter(nelx, nely, rmin)
    n = nelx * nely
    assert H.shape == (n, n) and Hs.shape == (n,)
    np.testing.assert_allclose(H.toarray(), _loop_filter(nelx, nely, rmin), rtol=0, atol=1e-15)
    np.testing.assert_allclose((H - H.T).toarray(), 0.0, atol=0)
    assert H.data.min() > 0.0
    Hn = H.multiply(1.0 / Hs[:, None])
    np.testing.assert_allclose(np.asarray(Hn.sum(axis=1)).ravel(), 1.0, rtol=1e-14)


def test_filter_interior_row_rmin_1p5():
    H, Hs = density_filter(5, 5, 1.5)
    centre = 2 * 5 + 2
    assert H[centre].nnz == 9
    np.testing.assert_allclose(Hs[centre], 1.5 + 4 * 0.5 + 4 * (1.5 - math.sqrt(2.0)))


# ------------------------------------------------------------ optimization
@pytest.mark.parametrize("ft", [1, 2])
def test_small_case_decreases_and_meets_volume(ft):
    res = top88(12, 4, 0.5, 3.0, 1.5, ft=ft)
    x, hist = res["x"], res["history"]
    assert x.shape == (4, 12)
    assert len(hist) == res["nit"] >= 2
    assert hist[-1] == res["c"]
    assert hist[-1] < 0.6 * hist[0]  # overall decrease (about 935.8 -> 420)
    assert abs(x.mean() - 0.5) < 1e-3
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.all(np.isfinite(hist))


def test_maxiter_caps_iterations():
    res = top88(12, 4, ft=2, maxiter=3)
    assert res["nit"] == 3 and len(res["history"]) == 3


def test_bad_filter_type():
    with pytest.raises(ValueError):
        top88(4, 2, ft=3)


def test_mbb_60x20_ft2_reference(mbb_ft2):
    assert mbb_ft2["c"] == pytest.approx(C_60x20_FT2, rel=1e-6)
    assert mbb_ft2["nit"] == NIT_60x20_FT2


def test_mbb_60x20_ft2_is_a_beam(mbb_ft2):
    x = mbb_ft2["x"]
    assert x.shape == (20, 60)
    assert abs(x.mean() - 0.5) < 1e-3
    # Solid top chord next to the load (top-left) and solid bottom chord
    # running into the roller support (bottom-right); mostly void web.
    assert x[0, :20].mean() > 0.95
    assert x[-1, :].mean() > 0.95
    assert x[10, :].mean() < 0.45
    # Largely 0/1 design: under half of the elements are grey.
    assert ((x > 0.1) & (x < 0.9)).mean() < 0.5


def test_mbb_60x20_ft1_reference():
    res = top88(60, 20, 0.5, 3.0, 1.5, ft=1)
    assert res["c"] == pytest.approx(C_60x20_FT1, rel=1e-6)
    assert res["nit"] == NIT_60x20_FT1
    assert abs(res["x"].mean() - 0.5) < 1e-3

