"""Eigenfrequency design (problems/topology_eigen.py) on pyMOTO's ex_eigenfrequency settings."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import topology_eigen as te  # noqa: E402

from adjopt.optimize import minimize  # noqa: E402
from adjopt.verify import taylor_test  # noqa: E402

#: pyMOTO 2.0.1's ex_eigenfrequency.py on this machine: its objective scaling 100 / J(x0) was
#: 45024.283638984314, and after its 43 MMA designs (stopped by its tolf 1e-4) the scaled objective
#: 100 J / J(x0) was 23.015036767765174, with sqrt(lambda) = 51.46, 117.44, 127.92 rad/s
PYMOTO_J0 = 100.0 / 45024.283638984314
PYMOTO_SCALED_END = 23.015036767765174


def test_the_start_matches_pymoto():
    problem = te.build()
    np.testing.assert_allclose(problem.functional.value(problem.p0), PYMOTO_J0, rtol=1e-9)
    volume, vmax = problem.constraints[0]
    # pyMOTO's volume constraint at the start: 10 (V / nel - 0.5) = 0.65 (the mass block counts as solid)
    np.testing.assert_allclose(10 * (volume.value(problem.p0) - vmax), 0.65, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 3])
def test_taylor_rate(k):
    problem = te.build(16, 10, k=k)
    p = 0.5 + 0.3 * np.sin(np.arange(160))  # away from the kink of the mass interpolation at 0.1
    r = taylor_test(problem.functional, p, order=2)
    assert r.rate >= 1.9, r.table()


def test_the_block_is_solid_and_the_state_is_the_fundamental_mode():
    problem = te.build(16, 12)
    m = problem.meta
    rho = m["filter"].forward(np.full(192, 0.2))
    assert np.all(rho[m["block"]] == 1.0) and m["block"].size == 4 * 6
    J = problem.functional
    u = J.state(problem.p0)
    assert u.shape == (m["dofmap"].n_free,)
    np.testing.assert_array_equal(u, J.modes(problem.p0)[:, 0])


def test_regression_values():
    problem = te.build(20, 12)
    lam = problem.functional.eigenvalues(problem.p0)
    # measured with this module (aluminium, plane strain, density filter 2, the mass block at p0 = 0.5)
    np.testing.assert_allclose(lam, REGRESSION, rtol=1e-8)


REGRESSION = [3302.682543570146, 36192.54801147334, 48308.58864934928, 194568.88079256585]


@pytest.mark.slow
def test_pymoto_settings_end_at_pymotos_objective():
    problem = te.build()
    res = minimize(problem, "mma", move=0.1, xtol=0, gtol=0, maxiter=43)
    # measured: 23.025 (pyMOTO 23.015) with sqrt(lambda_1) = 51.44 rad/s (pyMOTO 51.46)
    assert 100 * res.fun / res.history[0]["f"] == pytest.approx(PYMOTO_SCALED_END, rel=0.01)
    assert problem.constraints[0][0].value(res.x) <= 0.5 * (1 + 1e-3)
    assert np.sqrt(problem.functional.eigenvalues(res.x)[0]) == pytest.approx(51.46458929, rel=0.01)


def test_a_short_run_raises_the_fundamental_frequency():
    problem = te.build(24, 14)
    res = minimize(problem, "mma", move=0.1, maxiter=10, gtol=0, xtol=0)
    lam0 = problem.functional.eigenvalues(problem.p0)[0]
    assert problem.functional.eigenvalues(res.x)[0] > 2 * lam0
    assert all("f1_hz" in e and "grey" in e for e in res.history)


@pytest.mark.parametrize("kwargs,match", [
    ({"nelx": 3}, "at least 4 x 4"),
    ({"emin": 0.0}, "emin must satisfy 0 < emin < 1"),
    ({"density": -1.0}, "density must be a positive"),
    ({"k": 0}, r"k: k must be an integer in \[1, n - 2\]"),
    ({"plane": "3d"}, "plane must be 'strain' or 'stress'"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        te.build(**{"nelx": 8, "nely": 6, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# 3D: build(nelz=k), the plate extruded in z (hexahedra, 3 dofs per node, the left face clamped)


def _p_nonuniform(n):
    """A design in [0.2, 0.8]: its filtered densities stay above the kink of the mass interpolation at 0.1."""
    return 0.5 + 0.3 * np.sin(np.arange(n))


def _lowest_reference(problem, p, count):
    """The ``count`` lowest eigenvalues of the assembled K(rho), M(rho) from scipy's eigsh (its own shift-invert)."""
    import scipy.sparse.linalg as spla

    J, rho = problem.functional, problem.meta["filter"].forward(p)
    lam = spla.eigsh(J.K.assemble(rho), k=count, M=J.M.assemble(rho), sigma=0.0, which="LM")[0]
    return np.sort(lam)


def test_3d_problem_layout():
    problem = te.build(8, 6, nelz=2)
    m = problem.meta
    assert problem.name == "topology_eigen_8x6x2" and m["nelz"] == 2 and m["options"]["nelz"] == 2
    mesh = m["mesh"]
    assert mesh.dim == 3 and mesh.cell_type == "hexahedron" and mesh.n_cells == 8 * 6 * 2 == problem.p0.size
    # the face x = 0 clamped: all 3 dofs of its (6 + 1) x (2 + 1) nodes
    assert m["dofmap"].n_free == 3 * (9 * 7 * 3 - 7 * 3)
    # the mass block: x index >= 6, y index in [1, 4), through both z layers, solid after the filter
    c = mesh.cell_centers()[m["block"]]
    assert m["block"].size == 2 * 3 * 2 and set(c[:, 2]) == {0.5, 1.5}
    assert np.all(c[:, 0] > 6) and np.all((c[:, 1] > 1) & (c[:, 1] < 4))
    assert np.all(m["filter"].forward(np.full(96, 0.2))[m["block"]] == 1.0)
    J = problem.functional
    np.testing.assert_array_equal(J.state(problem.p0), J.modes(problem.p0)[:, 0])
    # the 2D problem keeps the options (and so the checkpoints) it always had
    assert "nelz" not in te.build(8, 6).meta["options"] and te.build(8, 6).meta["nelz"] is None


def test_3d_gradient_against_central_differences_of_eigsh():
    problem = te.build(8, 6, nelz=2)
    J = problem.functional
    p = _p_nonuniform(problem.p0.size)
    lam = J.eigenvalues(p)
    assert np.all(np.diff(lam) / lam[1:] > 0.3)  # well separated: the functional's gap test is far away
    np.testing.assert_allclose(_lowest_reference(problem, p, 4), lam, rtol=1e-9)

    def value(q):  # J from scratch: scipy's eigsh on the assembled matrices, not the functional's solve
        return float(np.sum(1.0 / _lowest_reference(problem, q, J.k + 1)[: J.k]))

    g, h = J.gradient(p), 1e-5
    rng = np.random.default_rng(3)
    for _ in range(3):
        d = rng.standard_normal(p.size)
        fd = (value(p + h * d) - value(p - h * d)) / (2 * h)
        np.testing.assert_allclose(g @ d, fd, rtol=1e-5)


def test_3d_taylor_rates():
    problem = te.build(8, 6, nelz=2)
    p = _p_nonuniform(problem.p0.size)
    r = taylor_test(problem.functional, p, order=2)
    assert r.rate >= 1.9, r.table()
    # the volume is linear in p: its second-order remainder is at round-off from the first step ("exact"),
    # where no rate can be observed (nan); otherwise the rate must be 2
    r = taylor_test(problem.constraints[0][0], p, order=2)
    assert r.passed and (r.exact or r.rate >= 1.9), r.table()


def test_3d_eigenvalues_against_dense_eigh():
    import scipy.linalg as sla

    problem = te.build(4, 4, nelz=1)
    J = problem.functional
    p = _p_nonuniform(problem.p0.size)
    rho = problem.meta["filter"].forward(p)
    K, M = J.K.assemble(rho).toarray(), J.M.assemble(rho).toarray()
    assert K.shape == (3 * (5 * 5 * 2 - 5 * 2),) * 2
    lam = sla.eigh(K, M, eigvals_only=True)
    np.testing.assert_allclose(J.eigenvalues(p), lam[: J.k + 1], rtol=1e-8)


def test_3d_element_matrices_and_scaling():
    from adjopt import fem
    from adjopt.mesh import box

    density = 2700.0
    problem = te.build(4, 4, nelz=1, density=density)
    J = problem.functional
    ME, KE = J.M.local.reshape(24, 24), J.K.local.reshape(24, 24)
    # consistent mass of a unit hexahedron, 3 dofs per node: all entries sum to 3 * density * volume (= 1)
    assert ME.sum() == pytest.approx(3 * density * 1.0, rel=1e-12)
    unit = box(1, 1, 1, 1.0, 1.0, 1.0, cell="hexahedron")
    np.testing.assert_array_equal(ME, np.kron(fem.q1_mass(unit, rho=density)[0], np.eye(3)))
    # both node-major (dof = 3 node + c): the 6 rigid motions are in the kernel of K_e, and a unit
    # translation along c carries the whole mass along c only
    x = unit.points[unit.cells[0]]  # (8, 3) in the element's node order
    rigid = []
    for c in range(3):
        t = np.zeros((8, 3))
        t[:, c] = 1.0
        rigid.append(t.ravel())
    for a, b in ((0, 1), (1, 2), (2, 0)):  # rotations in the (a, b) plane
        r = np.zeros((8, 3))
        r[:, a], r[:, b] = -x[:, b], x[:, a]
        rigid.append(r.ravel())
    R = np.column_stack(rigid)
    assert np.abs(KE @ R).max() <= 1e-9 * np.abs(KE).max()
    np.testing.assert_allclose(R[:, :3].T @ ME @ R[:, :3], density * np.eye(3), rtol=1e-12, atol=1e-9)
    # K scales with young, M with density: the eigenvalues with young / density
    p = _p_nonuniform(problem.p0.size)
    lam = J.eigenvalues(p)
    np.testing.assert_allclose(te.build(4, 4, nelz=1, density=density, young=2 * 68.9e9).functional.eigenvalues(p),
                               2 * lam, rtol=1e-9)
    np.testing.assert_allclose(te.build(4, 4, nelz=1, density=2 * density).functional.eigenvalues(p),
                               lam / 2, rtol=1e-9)


def test_3d_regression_value():
    problem = te.build(8, 6, nelz=2)
    # measured with this module (aluminium, 8 x 6 x 2 hexahedra, density filter 2, the block column, p0 = 0.5);
    # the eigenvalues then were 5329.630476481934, 26521.75643783591, 41707.48759196848, 176527.59146925766
    np.testing.assert_allclose(problem.functional.value(problem.p0), 0.00024931167259270673, rtol=1e-7)


def test_3d_a_short_run_improves_the_objective():
    problem = te.build(12, 8, nelz=2)
    res = minimize(problem, "mma", move=0.1, maxiter=10, gtol=0, xtol=0)
    # measured: J from 1.0968e-3 to 4.914e-4, lambda_1 from 1094.7 to 2514.7
    assert res.fun < 0.7 * res.history[0]["f"]
    assert problem.functional.eigenvalues(res.x)[0] > 1.5 * problem.functional.eigenvalues(problem.p0)[0]
    assert problem.constraints[0][0].value(res.x) <= 0.5 * (1 + 1e-3)
    assert all("f1_hz" in e and "grey" in e for e in res.history)


@pytest.mark.parametrize("nelz,match", [
    (0, r"nelz must be >= 1 \(number of elements through the thickness"),
    (-1, r"nelz must be >= 1"),
    (2.5, r"nelz must be an integer >= 1 .*got 2\.5"),
    ("a", r"nelz must be an integer >= 1 .*got 'a'"),
    (True, r"nelz must be an integer >= 1 .*got True"),
])
def test_bad_nelz_raises(nelz, match):
    with pytest.raises(ValueError, match=match):
        te.build(8, 6, nelz=nelz)


# ---------------------------------------------------------------------------------------------------------------
# passive elements and symmetry (the options of topology_compliance), on top of the mass block

#: meta["options"] of the defaults before the passive sets and symmetry existed (checkpoints must stay resumable)
OPTIONS_BEFORE = {"nelx": 12, "nely": 8, "volfrac": 0.5, "rmin": 2.0, "young": 68900000000.0, "density": 2700.0,
                  "emin": 1e-09, "k": 3, "plane": "strain"}


def _mirror_y(grid):
    """For each element of a structured grid (x fastest), the index of its mirror image about y = nely / 2."""
    n = int(np.prod(grid))
    ijk = list(np.unravel_index(np.arange(n), grid[::-1])[::-1])
    ijk[1] = grid[1] - 1 - ijk[1]
    return np.ravel_multi_index(tuple(ijk[::-1]), grid[::-1])


@pytest.mark.parametrize("nelz,void,solid", [
    (None, [0, 1, 13], "40:42,57"),  # 12 x 8; a command-line string for the solids; 57 is in the mass block
    (2, [0, 50], [20, 70]),  # 8 x 6 x 2: 96 elements; 70 is in the mass block
])
def test_passive_sets_are_no_parameters_and_exactly_0_or_1(nelz, void, solid):
    nelx, nely = (12, 8) if nelz is None else (8, 6)
    problem = te.build(nelx, nely, nelz=nelz, passive_void=void, passive_solid=solid)
    m, J = problem.meta, problem.functional
    n = m["mesh"].n_cells
    void, solid = np.asarray(void), te._tc._elements(solid, n, "passive_solid")
    np.testing.assert_array_equal(m["passive_void"], void)
    np.testing.assert_array_equal(m["passive_solid"], solid)
    assert problem.p0.size == n - void.size - solid.size == problem.mass.size
    np.testing.assert_array_equal(m["design"], np.setdiff1d(np.arange(n), np.union1d(void, solid)))
    np.testing.assert_array_equal(problem.mass, m["mesh"].cell_volumes()[m["design"]])
    assert solid[-1] in m["block"]  # a passive solid in the block: allowed, no parameter
    p = np.random.default_rng(1).uniform(0.0, 1.0, problem.p0.size)
    rho = m["filter"].forward(p)
    assert np.all(rho[void] == 0.0) and np.all(rho[solid] == 1.0) and np.all(rho[m["block"]] == 1.0)
    np.testing.assert_array_equal(m["design_map"](p), rho)
    field = m["parameter_cells"](p)
    assert np.all(np.isnan(field[np.union1d(void, solid)])) and np.array_equal(field[m["design"]], p)
    # J, the volume and the monitor see the same physical density: the volume counts the passive solids at 1
    volume, vmax = problem.constraints[0]
    np.testing.assert_allclose(volume.value(p), rho.mean(), rtol=1e-14)
    np.testing.assert_allclose(J.eigenvalues(p), np.sort(_lowest_reference(problem, p, J.k + 1)), rtol=1e-9)
    assert problem.monitor(p)["grey"] == np.mean((rho > 0.05) & (rho < 0.95))
    q = np.random.default_rng(2).uniform(0.2, 0.8, problem.p0.size)  # above the mass interpolation's kink
    r = taylor_test(J, q, order=2)
    assert r.rate >= 1.9, r.table()
    # the volume is linear in p: "exact" (no rate observable) or a rate of 2
    rv = taylor_test(volume, q, order=2)
    assert rv.passed and (rv.exact or rv.rate >= 1.9), rv.table()
    d = np.random.default_rng(3).standard_normal(q.size)
    np.testing.assert_allclose(volume.value(q + 1e-3 * d) - volume.value(q), 1e-3 * volume.gradient(q) @ d, rtol=1e-9)


def test_defaults_are_the_old_problem():
    # no passive sets, no symmetry: the filter and the block pin alone, every element a parameter (as pyMOTO)
    problem = te.build(12, 8)
    m = problem.meta
    assert problem.p0.size == 96 and m["parameter_cells"] is None and m["passive_void"].size == 0
    assert [type(x).__name__ for x in m["filter"].maps] == ["DensityFilter", "FixedEntries"]
    np.testing.assert_array_equal(m["design"], np.arange(96))


@pytest.mark.parametrize("nelz", [None, 2])
def test_symmetry_y_ties_mirror_images(nelz):
    nelx, nely = (12, 8) if nelz is None else (8, 4)  # nely a multiple of 4: the mass block is symmetric in y
    grid = (nelx, nely) if nelz is None else (nelx, nely, nelz)
    n = int(np.prod(grid))
    mirror = _mirror_y(grid)
    void = np.union1d([2, 3], mirror[[2, 3]])
    sym = te.build(nelx, nely, nelz=nelz, symmetry="y", passive_void=void)
    full = te.build(nelx, nely, nelz=nelz, passive_void=void)
    orbit = te._tc.symmetry_orbits(grid, "y")
    assert sym.p0.size == orbit.max() + 1 - 2 == n // 2 - 2
    assert sym.meta["options"]["symmetry"] == "y"
    q = np.random.default_rng(4).uniform(0.0, 1.0, sym.p0.size)
    rho = sym.meta["filter"].forward(q)
    np.testing.assert_allclose(rho, rho[mirror], rtol=0, atol=1e-14)
    assert np.all(rho[void] == 0.0) and np.all(rho[sym.meta["block"]] == 1.0)
    # the same problem as the full one at the symmetric design
    x = np.random.default_rng(5).uniform(0.2, 0.8, sym.p0.size)
    p = sym.meta["parameter_cells"](x)[full.meta["design"]]
    np.testing.assert_allclose(sym.functional.value(x), full.functional.value(p), rtol=1e-9)
    g = np.zeros(n)
    g[full.meta["design"]] = full.functional.gradient(p)
    np.testing.assert_allclose(sym.functional.gradient(x), np.bincount(orbit, g)[orbit[sym.meta["design"]]],
                               rtol=1e-6, atol=1e-9 * np.abs(g).max())
    np.testing.assert_allclose(sym.mass, 2 * sym.meta["mesh"].cell_volumes()[sym.meta["design"]], rtol=1e-15)
    r = taylor_test(sym.functional, x, order=2)
    assert r.rate >= 1.9, r.table()


def test_symmetry_leaves_the_block_as_it_is():
    # nely = 6: the block's rows 1..3 have no mirror 4 (the block is pyMOTO's, not tied); everything else is mirrored
    problem = te.build(8, 6, symmetry="y")
    rho = problem.meta["filter"].forward(np.random.default_rng(6).uniform(0, 1, problem.p0.size))
    mirror = _mirror_y((8, 6))
    block = problem.meta["block"]
    odd = np.union1d(np.setdiff1d(block, mirror[block]), np.setdiff1d(mirror[block], block))
    assert odd.size == 2 * 2
    keep = np.setdiff1d(np.arange(48), odd)
    np.testing.assert_allclose(rho[keep], rho[mirror[keep]], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs,match", [
    ({"passive_void": [5], "passive_solid": [5]}, r"element 5 is both passive void and passive solid"),
    ({"passive_void": [33]}, r"element 33 is both passive void and in the solid mass block"),
    ({"passive_void": [96]}, r"passive_void must be element indices in \[0, 96\)"),
    ({"passive_solid": "3,x"}, r"passive_solid must be element indices such as '3,7,12'"),
    ({"passive_solid": np.arange(96)}, r"every element is passive"),
    ({"passive_void": np.setdiff1d(np.arange(96), [33, 34, 35, 45, 46, 47, 57, 58, 59, 69, 70, 71])},
     r"every element is passive"),
    ({"passive_solid": np.arange(48)}, r"passive solid elements alone fill 0.5625 of the domain \(with the mass block\)"),
    ({"symmetry": "y", "passive_void": [5]}, r"not symmetric under symmetry='y'"),
    ({"symmetry": "z"}, r"symmetry must be 'none' or mirrored axes from 'xy'"),
    ({"symmetry": 1}, r"symmetry must be 'none' or mirrored axes from 'xy'"),
])
def test_bad_passive_sets_and_symmetry_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        te.build(12, 8, **kwargs)


def test_options_identify_the_passive_sets():
    assert te.build(12, 8).meta["options"] == OPTIONS_BEFORE  # no new keys at the defaults: old checkpoints resume
    assert te.build(8, 6, nelz=2).meta["options"] == {**OPTIONS_BEFORE, "nelx": 8, "nely": 6, "nelz": 2}
    assert te.build(12, 8, symmetry="none", passive_void=None).meta["options"] == OPTIONS_BEFORE
    a = te.build(12, 8, passive_void=[2, 3]).meta["options"]
    b = te.build(12, 8, passive_void=[2, 4]).meta["options"]
    assert a["passive_void"] != b["passive_void"] and a != b
    assert {k: v for k, v in a.items() if k != "passive_void"} == OPTIONS_BEFORE
    assert te.build(12, 8, passive_void="2:4").meta["options"] == a  # the command line's string: the same set
    assert te.build(12, 8, passive_solid=[2, 3]).meta["options"]["passive_solid"] == a["passive_void"]
    assert te.build(12, 8, symmetry="y").meta["options"] == {**OPTIONS_BEFORE, "symmetry": "y"}


def test_resume_with_other_passive_elements_is_refused(tmp_path):
    from adjopt.optimize import CheckpointError

    ckpt = tmp_path / "run.npz"
    minimize(te.build(12, 8, passive_void=[2, 3]), "mma", maxiter=2, gtol=0, xtol=0, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="passive_void"):
        minimize(te.build(12, 8, passive_void=[2, 4]), "mma", maxiter=4, resume=ckpt)
