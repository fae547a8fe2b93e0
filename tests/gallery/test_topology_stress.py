"""Stress-constrained minimum volume (problems/topology_stress.py): the unified aggregation and relaxation,
checked against pyMOTO's ex_volume_stress settings, finite differences and Taylor tests."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import topology_stress as ts  # noqa: E402

from adjopt.mesh import rectangle  # noqa: E402
from adjopt.optimize import minimize  # noqa: E402
from adjopt.verify import taylor_test  # noqa: E402

#: pyMOTO 2.0.1's ex_volume_stress.py on this machine, at its all-solid start: the stress constraint g1 and the
#: compliance f^T u; after its run (MMA, stopped by its tolf after 117 designs) the volume fraction
PYMOTO_G0, PYMOTO_C0, PYMOTO_VOLUME = 0.09193868927401949, 4.166940944599148, 0.17463071137869637


def test_the_start_matches_pymoto_with_its_doubled_shear():
    problem = ts.build(shear_scale=2.0)
    (G, g_max), (C, c_max) = problem.constraints
    assert g_max == 0.0 and c_max == 20.0
    np.testing.assert_allclose(G.value(problem.p0), PYMOTO_G0, rtol=1e-9)
    np.testing.assert_allclose(C.value(problem.p0), PYMOTO_C0, rtol=1e-9)
    assert problem.functional.value(problem.p0) == pytest.approx(1.0)


def test_the_centre_stress_is_the_true_stress():
    unit = rectangle(1, 1, 1.0, 1.0, cell="quad")
    S = ts.centre_stress_matrix(unit, 1.0, 0.3, "strain")
    pts = unit.points[unit.cells[0]]
    mu, lam = 1 / 2.6, 0.3 / (1.3 * 0.4)
    # pure shear u_x = g y: tau = mu g, no normal stress
    u = np.zeros(8)
    u[0::2] = 0.01 * pts[:, 1]
    np.testing.assert_allclose(S @ u, [0.0, 0.0, mu * 0.01], atol=1e-15)
    # uniaxial strain u_x = e x: sx = (lam + 2 mu) e, sy = lam e
    u = np.zeros(8)
    u[0::2] = 0.01 * pts[:, 0]
    np.testing.assert_allclose(S @ u, [(lam + 2 * mu) * 0.01, lam * 0.01, 0.0], atol=1e-15)
    np.testing.assert_allclose(ts.centre_stress_matrix(unit, 1.0, 0.3, "strain", 2.0)[2], 2 * S[2])


def test_derivatives_against_finite_differences():
    problem = ts.build("cantilever", 8, 12)
    G = problem.constraints[0][0]
    agg = problem.meta["stress"]
    p = np.clip(1.0 - 0.4 * np.abs(np.sin(np.arange(96))), 0.05, 1.0)
    u = G.state(p)
    du = np.random.default_rng(1).standard_normal(u.size) * np.abs(u).max()
    h = 1e-6
    fd = (agg.value(u + h * du, p) - agg.value(u - h * du, p)) / (2 * h)
    np.testing.assert_allclose(agg.grad_u(u, p) @ du, fd, rtol=1e-6)
    dp = np.random.default_rng(2).standard_normal(96)
    fd = (agg.value(u, p + h * dp) - agg.value(u, p - h * dp)) / (2 * h)
    np.testing.assert_allclose(agg.grad_p(u, p) @ dp, fd, rtol=1e-6)


@pytest.mark.parametrize("case,size", [("cantilever", (8, 12)), ("lbracket", (15, 15))])
def test_taylor_rates_of_the_constraints(case, size):
    problem = ts.build(case, *size, compliance_max=5.0)
    p = np.clip(1.0 - 0.5 * np.abs(np.sin(np.arange(problem.p0.size))), 0.05, 1.0)
    for con, _ in problem.constraints:
        r = taylor_test(con, p, order=2)
        assert r.rate >= 1.9, r.table()


def test_lbracket_layout_and_regression():
    problem = ts.build("lbracket", 20, 20)
    m = problem.meta
    c = m["mesh"].cell_centers()
    void = m["passive_void"]
    np.testing.assert_array_equal(void, np.flatnonzero((c[:, 0] > 8) & (c[:, 1] > 8)))
    assert problem.p0.size == 400 - 144 and len(problem.constraints) == 2
    np.testing.assert_allclose(m["load"].sum(), -1.0)
    assert np.all(m["filter"].forward(problem.p0)[void] == 0.0)
    G = problem.constraints[0][0]
    # measured with this module (plane strain, sigma_max 0.8, P 10, all solid)
    np.testing.assert_allclose(G.value(problem.p0), LBRACKET_G0, rtol=1e-8)


LBRACKET_G0 = 0.5732979715436268


def test_a_short_run_removes_material_within_the_stress_bound():
    problem = ts.build("cantilever", 20, 40, compliance_max=0.0)
    res = minimize(problem, "mma", move=0.1, maxiter=40, gtol=0, xtol=0)
    G = problem.constraints[0][0]
    assert res.fun < 0.7 and G.value(res.x) <= 2e-3
    assert all("max_vm" in e and "grey" in e for e in res.history)


@pytest.mark.slow
def test_pymoto_settings_end_near_pymoto():
    problem = ts.build(shear_scale=2.0)
    res = minimize(problem, "mma", move=0.1, maxiter=117, gtol=0, xtol=0)
    # measured: 0.1853 after 117 designs, 0.1820 after 300 (pyMOTO 0.1746, stopped by its tolf after 117)
    assert res.fun == pytest.approx(PYMOTO_VOLUME, rel=0.1)
    (G, _), (C, c_max) = problem.constraints
    assert G.value(res.x) <= 1e-3 and C.value(res.x) <= c_max * (1 + 1e-3)


@pytest.mark.parametrize("kwargs,match", [
    ({"case": "bridge"}, "case must be 'cantilever' or 'lbracket'"),
    ({"sigma_max": 0.0}, "sigma_max must be a positive"),
    ({"start": 0.0}, r"start must be in \(0, 1\]"),
    ({"compliance_max": -1.0}, "compliance_max must be >= 0"),
    ({"plane": "3d"}, "plane must be 'strain' or 'stress'"),
    ({"shear_scale": -2.0}, "shear_scale must be a positive"),
    ({"case": "lbracket", "nelx": 4}, "at least 5 x 5"),
    ({"P": 0.5}, r"P \(the aggregation exponent\) must be >= 1"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ts.build(**{"nelx": 8, "nely": 8, **kwargs})


def test_the_aggregate_refuses_densities_above_one():
    problem = ts.build("cantilever", 8, 12)
    agg = problem.meta["stress"]
    G = problem.constraints[0][0]
    u = G.state(problem.p0)
    bare = ts.StressAggregate(agg.conn, agg.S, agg.sigma_max, agg.P)  # rho = p: no map to keep it in [0, 1]
    with pytest.raises(ValueError, match="fell to -1 or below: densities above 1"):
        bare.value(np.zeros_like(u), np.full(96, 3.0))
    with pytest.raises(ValueError, match="sigma_max must be a positive stress"):
        ts.StressAggregate(agg.conn, agg.S, 0.0)
