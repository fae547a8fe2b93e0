"""Topology beyond the MBB beam (problems/topology_compliance.py): two load cases, passive elements and
the Heaviside projection with beta continuation, cross-checked against the independent 88-line loop
with the same extensions (tests/reference/top88.py, ``top88_extended``)."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import topology_compliance as tc  # noqa: E402
from reference.top88 import top88_extended  # noqa: E402

from adjopt.optimize import minimize  # noqa: E402
from adjopt.verify import check_hessian_symmetry, taylor_test  # noqa: E402


def _top88_order(nelx, nely):
    j, i = np.divmod(np.arange(nelx * nely), nelx)
    return i * nely + (nely - 1 - j)


def _random_design(n, seed=99):
    return np.random.default_rng(seed).uniform(0.2, 0.9, n)


# -- the same iterates as the independent loop --------------------------------------------------------
@pytest.mark.parametrize("case,size,projection,exact_until", [
    ("cantilever_two_loads", (30, 15), False, None),
    ("cantilever_hole", (30, 20), False, None),
    ("cantilever_hole", (30, 20), True, None),
    ("cantilever_two_loads", (30, 15), True, 60),  # OC's bisection amplifies round-off over 150 iterations
])
def test_oc_iterates_match_the_independent_loop(case, size, projection, exact_until):
    nelx, nely = size
    kw = dict(volfrac=0.4, projection=projection, beta_max=8.0, beta_every=25)
    ref = top88_extended(case, nelx, nely, maxiter=150, **kw)
    problem = tc.build(case, nelx, nely, **kw)
    res = minimize(problem, "oc", xtol=0.01, gtol=0, maxiter=150)
    assert res.nit == ref["nit"]
    f = np.array([h["f"] for h in res.history])
    rf = np.array(ref["history"])
    # f[k] is J at the k-th design at the beta it was made with; the loop's history[k] is the analysis of
    # the same design at the beta of the next iteration: the two differ only where beta was raised
    if projection:
        betas = [h["beta"] for h in res.history]
        assert betas[1:] == ref["betas"][: len(betas) - 1]
        assert betas[-1] == 8.0 and 1.0 in betas and 2.0 in betas and 4.0 in betas
        k = min(f.size, rf.size)
        same = np.array(betas[:k]) == np.array(ref["betas"][:k])
    else:
        same = np.ones(min(f.size, rf.size), dtype=bool)
    n = same.size if exact_until is None else exact_until
    np.testing.assert_allclose(f[:n][same[:n]], rf[:n][same[:n]], rtol=1e-8)
    rho = problem.meta["design_map"](res.x)
    ref_rho = ref["x"].ravel(order="F")[_top88_order(nelx, nely)]
    tol = 1e-8 if exact_until is None else 5e-3
    assert np.max(np.abs(rho - ref_rho)) < tol
    np.testing.assert_allclose(f[-1], rf[-1], rtol=1e-3)


# -- derivatives -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,size,kw", [
    ("cantilever_two_loads", (10, 6), {}),
    ("cantilever_hole", (12, 9), {}),
    ("cantilever_hole", (12, 9), {"projection": True, "beta": 4.0}),
    ("mbb", (12, 4), {"projection": True, "beta": 8.0, "eta": 0.3, "passive_solid": [0, 1, 2]}),
    ("cantilever3d", (4, 2, 2), {"projection": True, "beta": 4.0, "passive_void": [5]}),
    ("mbb3d", (6, 2, 2), {}),
])
def test_taylor_rates(case, size, kw):
    problem = tc.build(case, *size, **kw)
    J = problem.functional
    p = _random_design(J.n_params)
    r2 = taylor_test(J, p, order=2)
    r3 = taylor_test(J, p, order=3)
    assert r2.rate >= 1.9, r2.table()
    assert r3.rate >= 2.9, r3.table()
    assert check_hessian_symmetry(J, p) < 1e-8
    V, _ = problem.constraints[0]
    rv = taylor_test(V, p, order=2)
    assert rv.passed, rv.table()


def test_two_load_cases_are_the_sum_of_single_loads():
    problem = tc.build("cantilever_two_loads", 10, 6)
    J, p = problem.functional, _random_design(60)
    b = J.rhs.value(None)
    assert b.shape == (problem.meta["dofmap"].n_free, 2)
    u = J.state(p)
    assert u.shape == b.shape
    A = J.matrix.assemble(problem.meta["filter"].forward(p)).toarray()
    single = [np.linalg.solve(A, b[:, k]) @ b[:, k] for k in range(2)]
    np.testing.assert_allclose(J.value(p), sum(single), rtol=1e-10)
    assert J.self_adjoint  # lam = U: no adjoint solve
    np.testing.assert_allclose(problem.meta["load"].sum(axis=0), [1.0, -1.0])


def test_passive_elements_stay_exactly_fixed():
    problem = tc.build("cantilever_hole", 12, 9, projection=True, beta=8.0, passive_solid=[11])
    m = problem.meta
    void, solid = m["passive_void"], m["passive_solid"]
    assert void.size > 0 and list(solid) == [11]
    assert problem.p0.size == 12 * 9 - void.size - 1
    np.testing.assert_array_equal(m["design"], np.setdiff1d(np.arange(108), np.union1d(void, solid)))
    c = m["mesh"].cell_centers()
    np.testing.assert_array_equal(void, np.flatnonzero(np.hypot(c[:, 0] - 4.0, c[:, 1] - 4.5) < 3.0))
    rho = m["design_map"](_random_design(problem.p0.size))
    assert np.all(rho[void] == 0.0) and rho[11] == 1.0
    assert np.all((rho[m["design"]] > 0) & (rho[m["design"]] < 1))
    # the gradient has one entry per design element; a passive element is not one
    assert problem.functional.gradient(problem.p0).shape == problem.p0.shape
    assert problem.mass.shape == problem.p0.shape


def test_masks_and_indices_give_the_same_problem():
    mask = np.zeros(24, dtype=bool)
    mask[[3, 7]] = True
    a = tc.build("mbb", 6, 4, passive_void=mask)
    b = tc.build("mbb", 6, 4, passive_void=[7, 3, 7])  # unsorted, repeated: the same set
    np.testing.assert_array_equal(a.meta["design"], b.meta["design"])
    p = _random_design(22)
    assert a.functional.value(p) == b.functional.value(p)


@pytest.mark.parametrize("kwargs,match", [
    ({"passive_void": [0], "passive_solid": [0]}, r"element 0 is both passive void and passive solid"),
    ({"passive_void": np.arange(8)}, r"every element is passive"),
    ({"passive_void": [8]}, r"passive_void must be element indices in \[0, 8\)"),
    ({"passive_void": [0.5]}, r"passive_void must be element indices"),
    ({"passive_solid": np.ones(3, dtype=bool)}, r"passive_solid as a mask must have one entry per element \(8\)"),
    ({"projection": "yes"}, r"projection must be True or False"),
    ({"projection": True, "beta": 0.0}, r"beta .* must be a positive"),
    ({"projection": True, "beta": 64.0}, r"beta_max \(32\) must be >= beta \(64\)"),
    ({"eta": 1.5}, r"eta .* must be in \[0, 1\]"),
    ({"beta_every": 0}, r"beta_every must be >= 1"),
    ({"case": "cantilever_hole", "nelz": 2}, r"nelz is for the 3D case only"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tc.build(**{"nelx": 4, "nely": 2, **kwargs})


# -- the continuation in a run ---------------------------------------------------------------------------
def test_mma_with_continuation_ends_black_and_white():
    problem = tc.build("mbb", 48, 16, projection=True, beta_max=16.0, beta_every=30)
    res = minimize(problem, "mma", xtol=0.01, gtol=0, maxiter=300)
    h = res.history
    assert res.success and h[-1]["beta"] == 16.0
    betas = [e["beta"] for e in h]
    assert betas == sorted(betas) and set(betas) == {1.0, 2.0, 4.0, 8.0, 16.0}
    # every raise came after at most beta_every iterations at a beta
    first = [betas.index(b) for b in (2.0, 4.0, 8.0, 16.0)]
    assert all(0 < b - a <= 31 for a, b in zip([0] + first, first))
    assert h[0]["grey"] > 0.9 and h[-1]["grey"] < 0.05  # uniform 0.5 start; a black-and-white end
    volume, vmax = problem.constraints[0]
    assert volume.value(res.x) <= vmax + 1e-3
    # the run at beta 1 alone ends greyer
    soft = minimize(tc.build("mbb", 48, 16), "mma", xtol=0.01, gtol=0, maxiter=300)
    assert soft.history[-1]["grey"] > 3 * h[-1]["grey"]


def test_grey_level_is_recorded_without_projection():
    problem = tc.build("mbb", 12, 4)
    assert problem.continuation is None
    res = minimize(problem, "oc", maxiter=3, gtol=0)
    assert all("grey" in e and "beta" not in e for e in res.history)
    assert res.history[0]["grey"] == 1.0  # 0.5 everywhere


# -- symmetry --------------------------------------------------------------------------------------------
def test_a_symmetric_design_equals_the_full_one_at_symmetric_points():
    full = tc.build("cantilever_two_loads", 10, 6)
    sym = tc.build("cantilever_two_loads", 10, 6, symmetry="y")
    orbit = tc.symmetry_orbits((10, 6), "y")
    assert sym.p0.size == 30 == orbit.max() + 1
    q = _random_design(30)
    p = q[orbit]  # the symmetric field on every element
    j, i = np.divmod(np.arange(60), 10)
    np.testing.assert_array_equal(p, p[(5 - j) * 10 + i])  # mirror image about the horizontal centre line
    np.testing.assert_allclose(sym.functional.value(q), full.functional.value(p), rtol=1e-12)
    # the gradient of the reduced design adds up the two mirror images' gradients
    g_full = full.functional.gradient(p)
    np.testing.assert_allclose(sym.functional.gradient(q), np.bincount(orbit, g_full), rtol=1e-10)
    np.testing.assert_allclose(sym.mass, np.bincount(orbit, np.ones(60)))
    r = taylor_test(sym.functional, q, order=3)
    assert r.rate >= 2.9, r.table()
    np.testing.assert_array_equal(sym.meta["parameter_cells"](q), p)


def test_symmetry_in_3d_and_with_passive_sets():
    problem = tc.build("cantilever3d", 4, 2, 4, symmetry="z", projection=True, beta=4.0)
    assert problem.p0.size == 16
    r = taylor_test(problem.functional, _random_design(16), order=2)
    assert r.rate >= 1.9, r.table()
    # the hole is symmetric about the horizontal centre line: it stays passive in the reduced design
    hole = tc.build("cantilever_hole", 12, 8, symmetry="y")
    field = hole.meta["parameter_cells"](np.full(hole.p0.size, 0.5))
    void = hole.meta["passive_void"]
    assert void.size == 24 and np.all(np.isnan(field[void])) and np.sum(~np.isnan(field)) == 96 - 24
    assert hole.p0.size == (96 - 24) // 2
    with pytest.raises(ValueError, match="not symmetric under symmetry='y'"):
        tc.build("mbb", 6, 4, symmetry="y", passive_solid=[0])


@pytest.mark.parametrize("value", ["q", "yy", "z", 1, ""])
def test_bad_symmetry(value):
    with pytest.raises(ValueError, match="symmetry must be 'none' or mirrored axes from 'xy'"):
        tc.build("mbb", 6, 4, symmetry=value)


# -- found by a hostile review -------------------------------------------------------------------------------------
def test_resume_with_other_passive_elements_is_refused(tmp_path):
    from adjopt.optimize import CheckpointError

    ckpt = tmp_path / "run.npz"
    minimize(tc.build("mbb", 20, 10, passive_void=np.arange(10)), "oc", maxiter=3, gtol=0, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="passive"):
        minimize(tc.build("mbb", 20, 10, passive_solid=np.arange(100, 110)), "oc", maxiter=5, resume=ckpt)


def test_passive_solids_beyond_the_volume_bound_are_refused():
    with pytest.raises(ValueError, match=r"passive solid elements alone fill 0.75 of the domain, more than volfrac"):
        tc.build("mbb", 12, 6, passive_solid=np.arange(54))


def test_an_infeasible_run_is_not_a_success():
    import adjopt

    built = tc.build("mbb", 12, 4)
    volume, _ = built.constraints[0]
    problem = adjopt.Problem(built.functional, np.full(48, 0.6), bounds=(0.5, 1.0), constraints=[(volume, 0.2)])
    res = minimize(problem, "mma", maxiter=30, gtol=0, xtol=0.01)
    assert not res.success and "constraint 0 is violated at the result" in res.message
    assert any("violated" in w for w in res.warnings)


def test_command_line_passive_strings_and_integer_masks():
    a = tc.build("mbb", 6, 4, passive_void="0:3,7")
    np.testing.assert_array_equal(a.meta["passive_void"], [0, 1, 2, 7])
    assert tc.build("mbb", 6, 4, passive_void=5).meta["passive_void"].tolist() == [5]
    with pytest.raises(ValueError, match="element indices such as '3,7,12'"):
        tc.build("mbb", 6, 4, passive_void="1,x")
    with pytest.raises(ValueError, match="an integer array of 0s and 1s, one per element: a mask"):
        tc.build("mbb", 6, 4, passive_void=np.r_[np.ones(3, int), np.zeros(21, int)])
    with pytest.raises(ValueError, match=r"beta_every must be >= 1 \(iterations at one beta\)"):
        tc.build("mbb", 6, 4, beta_every=0)
    with pytest.raises(ValueError, match="the case 'cantilever_hole' makes it void"):
        tc.build("cantilever_hole", 15, 9, passive_solid=[33])


def test_mbb3d_supports_regression_and_multigrid():
    problem = tc.build("mbb3d", 6, 2, 2)
    m = problem.meta
    pts = m["mesh"].points
    fixed = m["dofmap"].fixed
    assert np.all(np.isin(3 * np.flatnonzero(pts[:, 0] == 0), fixed))  # symmetry: x on the left face
    assert np.all(np.isin(3 * np.flatnonzero(pts[:, 2] == 0) + 2, fixed))  # symmetry: z on the back face
    assert np.all(np.isin(3 * np.flatnonzero((pts[:, 0] == 6) & (pts[:, 1] == 0)) + 1, fixed))  # the roller
    np.testing.assert_allclose(m["load"].sum(), -1.0)
    # measured with this module (filter on, volfrac 0.5, penal 3, rmin 1.5)
    np.testing.assert_allclose(problem.functional.value(problem.p0), 414.1944904706926, rtol=1e-8)
    # multigrid and a factorization give the same MMA iterates
    runs = [minimize(tc.build("mbb3d", 16, 8, 4, solver=s), "mma", maxiter=3, gtol=0, xtol=0) for s in ("superlu",
                                                                                                     "gmg")]
    np.testing.assert_allclose(runs[0].fun, runs[1].fun, rtol=1e-7)


@pytest.mark.parametrize("kwargs,match", [({"volfrac": "half"}, "volfrac must be a number in"),
                                          ({"emin": "small"}, "emin must be a number with 0 <= emin < 1")])
def test_material_options_must_be_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tc.build("mbb", 6, 4, **kwargs)
