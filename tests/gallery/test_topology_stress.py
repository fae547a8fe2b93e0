"""Stress-constrained minimum volume (problems/topology_stress.py): the unified aggregation and relaxation,
checked against pyMOTO's ex_volume_stress settings, finite differences and Taylor tests."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import topology_stress as ts  # noqa: E402

import adjopt  # noqa: E402
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
    problem = ts.build("lbracket", 20, 20, normalization="fixed", compliance_max=20.0)
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


# -- the P-norm with adaptive normalization, and 3D ------------------------------------------------------------
def test_the_3d_centre_stress_is_the_true_stress():
    from adjopt.mesh import box

    unit = box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron")
    S = ts.centre_stress_matrix(unit, 1.0, 0.3, "strain")
    assert S.shape == (6, 24)
    pts = unit.points[unit.cells[0]]
    mu, lam = 1 / 2.6, 0.3 / (1.3 * 0.4)
    for i in range(3):  # uniaxial strain along axis i: s_ii = (lam + 2 mu) e, the other normals lam e
        u = np.zeros(24)
        u[i::3] = 0.01 * pts[:, i]
        want = np.zeros(6)
        want[:3] = lam * 0.01
        want[i] = (lam + 2 * mu) * 0.01
        np.testing.assert_allclose(S @ u, want, atol=1e-15)
    # simple shears: u_x = g y -> t_xy; u_y = g z -> t_yz; u_x = g z -> t_xz (Voigt order sx sy sz tyz txz txy)
    for comp, coord, row in ((0, 1, 5), (1, 2, 3), (0, 2, 4)):
        u = np.zeros(24)
        u[comp::3] = 0.01 * pts[:, coord]
        want = np.zeros(6)
        want[row] = mu * 0.01
        np.testing.assert_allclose(S @ u, want, atol=1e-15)
    # the 3D von Mises of uniaxial stress is its value, of pure shear sqrt(3) times it
    agg = ts.StressAggregate(np.arange(24)[None, :], S, 1.0)
    assert agg._vm(np.array([[2.0, 0, 0, 0, 0, 0]]))[0] == pytest.approx(2.0)
    assert agg._vm(np.array([[0, 0, 0, 0, 1.0, 0]]))[0] == pytest.approx(np.sqrt(3.0))
    with pytest.raises(adjopt.ShapeError, match=r"S must be \(3, 8\)"):
        ts.StressAggregate(np.arange(8)[None, :], S, 1.0)


@pytest.mark.parametrize("form", ["unified", "pnorm"])
@pytest.mark.parametrize("dims", [(8, 12, None), (6, 8, 2)])
def test_both_forms_against_finite_differences_in_2d_and_3d(form, dims):
    nelx, nely, nelz = dims
    problem = ts.build("cantilever", nelx, nely, nelz=nelz, normalization="fixed" if form == "unified" else "adaptive")
    agg, G = problem.meta["stress"], problem.meta["stress_functional"]
    assert agg.form == form
    n = problem.p0.size
    p = np.clip(1.0 - 0.4 * np.abs(np.sin(np.arange(n))), 0.05, 1.0)
    u = G.state(p)
    du = np.random.default_rng(1).standard_normal(u.size) * np.abs(u).max()
    h = 1e-6
    fd = (agg.value(u + h * du, p) - agg.value(u - h * du, p)) / (2 * h)
    np.testing.assert_allclose(agg.grad_u(u, p) @ du, fd, rtol=1e-6)
    dp = np.random.default_rng(2).standard_normal(n)
    fd = (agg.value(u, p + h * dp) - agg.value(u, p - h * dp)) / (2 * h)
    np.testing.assert_allclose(agg.grad_p(u, p) @ dp, fd, rtol=1e-6)
    r = taylor_test(problem.constraints[0][0], p, order=2)
    assert r.rate >= 1.9, r.table()


def test_the_pnorm_is_the_norm_of_the_relaxed_stress_ratios():
    problem = ts.build("lbracket", 20, 20)
    agg, G = problem.meta["stress"], problem.meta["stress_functional"]
    p = np.clip(1.0 - 0.5 * np.abs(np.cos(np.arange(problem.p0.size))), 0.05, 1.0)
    rho = problem.meta["filter"].forward(p)[agg.elements]
    r = rho * agg.von_mises(G.state(p)) / 0.8
    assert G.value(p) == pytest.approx(np.linalg.norm(r, 10) - 1.0, rel=1e-13)
    assert agg.peak(G.state(p), p) == pytest.approx(r.max(), rel=1e-14)
    assert r.max() <= G.value(p) + 1.0  # the P-norm lies above the largest value
    # measured with this module (adaptive L-bracket: P-norm of rho vm / 0.8, P 10, all solid)
    np.testing.assert_allclose(G.value(problem.p0), LBRACKET_PNORM0, rtol=1e-8)


LBRACKET_PNORM0 = 1.521943845647682


def test_3d_lbracket_layout_and_loads():
    problem = ts.build("lbracket", 10, 10, nelz=2)
    m = problem.meta
    assert m["nelz"] == 2 and problem.name == "topology_stress_lbracket_10x10x2"
    c = m["mesh"].cell_centers()
    np.testing.assert_array_equal(m["passive_void"], np.flatnonzero((c[:, 0] > 4) & (c[:, 1] > 4)))
    load = m["load"]
    np.testing.assert_allclose(load.sum(), -1.0)
    assert np.all(load[0::3] == 0) and np.all(load[2::3] == 0)
    # the 3D cantilever's load is a line along z of total 1 (trapezoidal weights)
    cant = ts.build("cantilever", 6, 8, nelz=4).meta["load"]
    np.testing.assert_allclose(np.sort(cant[cant != 0]), [0.125, 0.125, 0.25, 0.25, 0.25])


@pytest.mark.parametrize("kwargs,match", [
    ({"normalization": "auto"}, "normalization must be 'fixed' or 'adaptive'"),
    ({"nelz": 0}, "nelz must be >= 1"),
    ({"nelz": 1.5}, "nelz must be an integer"),
])
def test_bad_3d_and_normalization_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ts.build(**{"nelx": 8, "nely": 8, **kwargs})


def test_the_aggregate_refuses_an_unknown_form():
    agg = ts.build("cantilever", 8, 12).meta["stress"]
    with pytest.raises(ValueError, match="form must be 'unified'"):
        ts.StressAggregate(agg.conn, agg.S, 1.0, form="ks")


def test_the_qp_relaxation_has_exact_derivatives():
    problem = ts.build("lbracket", 15, 15, q=2.5)
    agg, G = problem.meta["stress"], problem.meta["stress_functional"]
    assert agg.q == 2.5 and problem.meta["options"]["q"] == 2.5
    p = np.clip(1.0 - 0.5 * np.abs(np.sin(np.arange(problem.p0.size))), 0.05, 1.0)
    rho = problem.meta["filter"].forward(p)[agg.elements]
    r = rho**2.5 * agg.von_mises(G.state(p)) / 0.8
    assert G.value(p) == pytest.approx(np.linalg.norm(r, 10) - 1.0, rel=1e-13)
    u = G.state(p)
    dp = np.random.default_rng(2).standard_normal(p.size)
    h = 1e-6
    fd = (agg.value(u, p + h * dp) - agg.value(u, p - h * dp)) / (2 * h)
    np.testing.assert_allclose(agg.grad_p(u, p) @ dp, fd, rtol=1e-6)
    assert taylor_test(G, p, order=2).rate >= 1.9


def test_the_bracket_has_no_compliance_bound_by_default():
    # its all-solid start has a compliance of about 100: pyMOTO's cantilever bound of 20 would be infeasible
    problem = ts.build("lbracket", 20, 20)
    assert len(problem.constraints) == 1 and problem.meta["options"]["compliance_max"] == 0.0
    assert len(ts.build("cantilever", 8, 12).constraints) == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0.0}, r"alpha .* must be a number in \(0, 1\]"),
    ({"alpha": -1.0, "normalization": "fixed"}, r"alpha .* must be a number in \(0, 1\]"),
    ({"alpha": "0.5"}, r"alpha .* must be a number in \(0, 1\]"),
    ({"q": 0.5}, r"q \(the relaxation exponent\) must be a number >= 1"),
    ({"q": float("nan")}, r"q \(the relaxation exponent\) must be a number >= 1"),
])
def test_bad_relaxation_and_damping(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ts.build(**{"nelx": 8, "nely": 8, **kwargs})


# -- passive elements and symmetry ------------------------------------------------------------------------------
def _random(m, seed=5):
    return np.random.default_rng(seed).uniform(0.05, 0.95, m)


def _taylor_rates(problem, p):
    """Order-2 Taylor rates of every constraint and of the raw (not normalized) stress functional; the volume
    (affine: its remainder is round-off) passes."""
    for f in [con for con, _ in problem.constraints] + [problem.meta["stress_functional"]]:
        r = taylor_test(f, p, order=2)
        assert r.rate >= 1.9, (f, r.table())
    r = taylor_test(problem.functional, p, order=2)
    assert r.passed, r.table()


@pytest.mark.parametrize("case,size,void,solid", [
    # cantilever 8 x 12: two voids inside, the two elements at the loaded node solid (a command-line string)
    ("cantilever", (8, 12), [43, 44], "47,55"),
    # L-bracket 15 x 15 (adaptive P-norm): a void at the clamped corner besides its own, solids at the load
    ("lbracket", (15, 15), [210], [88, 89]),
])
def test_passive_elements_are_exact_and_solids_carry_stress(case, size, void, solid):
    problem = ts.build(case, *size, passive_void=void, passive_solid=solid, compliance_max=5.0)
    m = problem.meta
    n = size[0] * size[1]
    solid = [47, 55] if isinstance(solid, str) else solid
    c = m["mesh"].cell_centers()
    own = np.flatnonzero((c[:, 0] > 0.4 * size[0]) & (c[:, 1] > 0.4 * size[1]) & (case == "lbracket"))
    all_void = np.union1d(own, void)
    np.testing.assert_array_equal(m["passive_void"], all_void)
    np.testing.assert_array_equal(m["passive_solid"], solid)
    assert problem.p0.size == n - all_void.size - len(solid) == m["design"].size
    # the aggregate covers every element but the voids: the passive solids too
    np.testing.assert_array_equal(m["covered"], np.setdiff1d(np.arange(n), all_void))
    np.testing.assert_array_equal(m["stress"].elements, m["covered"])
    assert np.isin(solid, m["stress"].elements).all() and not np.isin(void, m["stress"].elements).any()
    p = _random(problem.p0.size)
    rho = m["filter"].forward(p)
    assert np.all(rho[all_void] == 0.0) and np.all(rho[solid] == 1.0)
    free = rho[m["design"]]
    assert np.all((free > 0) & (free < 1))
    # the objective (the volume fraction) counts the passive solids
    assert problem.functional.value(p) == pytest.approx(rho.mean(), rel=1e-12)
    assert problem.functional.value(np.zeros(problem.p0.size)) >= len(solid) / n
    assert isinstance(problem.constraints[0][0], ts.AdaptiveNormalization) == (case == "lbracket")
    _taylor_rates(problem, p)


def test_symmetric_designs():
    # void pairs and the solid pair (the loaded node's two elements) are mirror images about y = nely / 2
    void, solid = [43, 44, 51, 52], [47, 55]
    problem = ts.build("cantilever", 8, 12, symmetry="y", passive_void=void, passive_solid=solid)
    m = problem.meta
    assert m["options"]["symmetry"] == "y"
    assert problem.p0.size == 96 // 2 - 3  # orbits minus the passive ones
    np.testing.assert_allclose(problem.mass, 2.0)
    j, i = np.divmod(np.arange(96), 8)
    mirror = (11 - j) * 8 + i
    p = _random(problem.p0.size)
    rho = m["filter"].forward(p)
    assert np.max(np.abs(rho - rho[mirror])) <= 1e-14
    assert np.all(rho[void] == 0.0) and np.all(rho[solid] == 1.0)
    field = m["parameter_cells"](p)
    assert np.isnan(field[void + solid]).all()
    np.testing.assert_array_equal(field, field[mirror])
    _taylor_rates(problem, p)
    # with the adaptive normalization too
    adaptive = ts.build("cantilever", 8, 12, symmetry="y", normalization="adaptive", passive_solid=solid)
    assert adaptive.p0.size == 47 and isinstance(adaptive.constraints[0][0], ts.AdaptiveNormalization)
    _taylor_rates(adaptive, _random(47))


@pytest.mark.parametrize("kwargs,match", [
    ({"passive_void": [3], "passive_solid": [3]}, r"element 3 is both passive void and passive solid .*passive_void"),
    ({"case": "lbracket", "passive_solid": [63]}, r"element 63 is both .*the case 'lbracket' makes it void"),
    ({"passive_void": [64]}, r"passive_void must be element indices in \[0, 64\)"),
    ({"passive_solid": np.ones(3, dtype=bool)}, r"passive_solid as a mask must have one entry per element \(64\)"),
    ({"passive_void": "1,x"}, r"element indices such as '3,7,12'"),
    ({"symmetry": "y", "passive_solid": [0]}, r"not symmetric under symmetry='y'"),
    ({"case": "lbracket", "symmetry": "x"}, r"not symmetric under symmetry='x'"),
    ({"passive_void": "0:40", "passive_solid": "40:64"}, r"every element is passive"),
    ({"symmetry": "xz"}, r"symmetry must be 'none' or mirrored axes from 'xy'"),
])
def test_bad_passive_sets_and_symmetry_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ts.build(**{"nelx": 8, "nely": 8, **kwargs})


def test_options_fingerprint_the_passive_sets():
    default = ts.build("lbracket", 15, 15)  # its own voids are not an option: passive_void stays None
    assert default.meta["options"] == dict(
        case="lbracket", nelx=15, nely=15, sigma_max=0.8, P=10.0, rmin=2.0, emin=1e-9, start=1.0,
        compliance_max=0.0, load_width=3, plane="strain", shear_scale=1.0, normalization="adaptive", alpha=0.5)
    # the cantilever's defaults are the problem of the first version: its options (and checkpoints) are those
    opts = ts.build("cantilever", 8, 12).meta["options"]
    assert opts == dict(case="cantilever", nelx=8, nely=12, sigma_max=0.4, P=10.0, rmin=2.0, emin=1e-9, start=1.0,
                        compliance_max=20.0, load_width=3, plane="strain", shear_scale=1.0)
    assert ts.build("cantilever", 8, 12, q=2.0, nelz=2).meta["options"]["q"] == 2.0
    a = ts.build("cantilever", 8, 12, passive_solid=[47])
    b = ts.build("cantilever", 8, 12, passive_solid=[55])
    assert a.meta["options"]["passive_solid"] != b.meta["options"]["passive_solid"]
    assert a.meta["options"]["passive_solid"].startswith("1 elements, sha1 ")
    assert ts.build("cantilever", 8, 12, passive_solid="47").meta["options"] == a.meta["options"]


def test_passive_solids_from_the_command_line(tmp_path):
    import json
    import subprocess

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "adjopt.cli", "run", "topology_stress", "--case", "lbracket",
                           "--nelx", "20", "--nely", "20", "--passive_solid", "0:5", "--max-iter", "2", "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    # exit status 1: two iterations do not converge; the run's results are written all the same
    assert proc.returncode == 1 and "maximum number of iterations (2) reached" in proc.stdout, proc.stdout + proc.stderr
    options = json.loads((out / "history.json").read_text())["options"]
    assert options["passive_solid"].startswith("5 elements, sha1 ") and "passive_void" not in options
    x = np.load(out / "result.npz")["x"]
    assert x.shape == (400 - 144 - 5,)
