"""SIMP minimum compliance (problems/topology_compliance.py): cross-checked against the
independent 88-line port, derivatives by Taylor tests, regression values, bad options."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import topology_compliance as tc  # noqa: E402
from reference.top88 import EMIN, _edof_mat, element_stiffness, top88  # noqa: E402

from adjopt.verify import check_hessian_symmetry, taylor_test  # noqa: E402


def _random_design(n, seed=1234):
    return np.random.default_rng(seed).uniform(0.2, 0.9, n)


def _top88_order(nelx, nely):
    """perm[k] = index in top88's element order (column-major, rows from the top) of mesh cell k
    (x fastest, rows from the bottom)."""
    j, i = np.divmod(np.arange(nelx * nely), nelx)
    return i * nely + (nely - 1 - j)


# -- independent cross-check against the 88-line code -------------------------------------------
def test_uniform_compliance_matches_top88():
    J = tc.build("mbb", 60, 20, volfrac=0.5, penal=3.0, rmin=1.5)
    # top88's first history value is the FE analysis of the uniform start design; the loop is
    # cut after that iteration (maxiter=1) since later iterations do not affect history[0]
    ref = top88(60, 20, 0.5, 3.0, 1.5, ft=2, maxiter=1)["history"][0]
    np.testing.assert_allclose(J.functional.value(J.p0), ref, rtol=1e-10)


def test_unfiltered_gradient_matches_top88_sensitivity():
    nelx, nely, volfrac, penal = 60, 20, 0.5, 3.0
    problem = tc.build("mbb", nelx, nely, volfrac=volfrac, penal=penal, filter=False)
    J, p = problem.functional, problem.p0
    # the 88-line FE analysis and sensitivity, inline from its building blocks
    KE = element_stiffness(0.3)
    edof = _edof_mat(nelx, nely)
    ndof = 2 * (nelx + 1) * (nely + 1)
    x = np.full(nelx * nely, volfrac)
    Ee = EMIN + x**penal * (1.0 - EMIN)
    iK = np.repeat(edof, 8, axis=1).ravel()
    jK = np.tile(edof, (1, 8)).ravel()
    K = sp.coo_matrix(((KE.ravel()[None, :] * Ee[:, None]).ravel(), (iK, jK)), shape=(ndof, ndof)).tocsc()
    F = np.zeros(ndof)
    F[1] = -1.0
    fixed = np.union1d(np.arange(0, 2 * (nely + 1), 2), [ndof - 1])
    free = np.setdiff1d(np.arange(ndof), fixed)
    U = np.zeros(ndof)
    U[free] = spla.spsolve(K[free, :][:, free].tocsc(), F[free])
    Ue = U[edof]
    ce = np.sum((Ue @ KE) * Ue, axis=1)
    dc = -penal * x ** (penal - 1) * (1.0 - EMIN) * ce
    np.testing.assert_allclose(J.value(p), float(np.sum(Ee * ce)), rtol=1e-10)
    g, ref = J.gradient(p), dc[_top88_order(nelx, nely)]
    # entrywise rtol 1e-8; the absolute floor (1e-10 of the largest sensitivity) only matters for the
    # few near-rigid corner elements whose ce = u_e^T K_e u_e is ~1e-6 of the largest and loses digits
    # to cancellation in either code (top-right element: |diff| 3.7e-12 against |dc|max 32.6)
    np.testing.assert_allclose(g, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    assert np.linalg.norm(g - ref) <= 1e-10 * np.linalg.norm(ref)  # measured 1.1e-11


# -- derivatives -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case,size", [("mbb", (12, 4)), ("cantilever3d", (4, 2, 2))])
def test_taylor_rates_and_hessian_symmetry(case, size):
    problem = tc.build(case, *size)
    J = problem.functional
    p = _random_design(J.n_params)
    r2 = taylor_test(J, p, order=2)
    r3 = taylor_test(J, p, order=3)
    assert r2.rate >= 1.9, r2.table()
    assert r3.rate >= 2.9, r3.table()
    assert check_hessian_symmetry(J, p) < 1e-8


def test_volume_constraint():
    problem = tc.build("mbb", 12, 4, volfrac=0.4)
    (V, upper), = problem.constraints
    assert upper == 0.4
    np.testing.assert_allclose(V.value(problem.p0), 0.4, rtol=1e-14)
    p = _random_design(V.n_params)
    res = taylor_test(V, p, order=2)
    assert res.passed, res.table()  # V is linear in p: the remainder is at round-off ("exact")
    dp = np.random.default_rng(7).standard_normal(p.size)
    h = 1e-3
    fd = (V.value(p + h * dp) - V.value(p - h * dp)) / (2 * h)
    np.testing.assert_allclose(V.gradient(p) @ dp, fd, rtol=1e-9)
    # the volume sees the filtered densities: mean(H p)
    np.testing.assert_allclose(V.value(p), problem.meta["filter"].forward(p).mean(), rtol=1e-14)


# -- regression ------------------------------------------------------------------------------------
def test_regression_mbb_30x10():
    problem = tc.build("mbb", 30, 10)
    J, p = problem.functional, problem.p0
    # measured with this module (filter on, volfrac 0.5, penal 3, rmin 1.5, emin 1e-9)
    np.testing.assert_allclose(J.value(p), 984.5548024995865, rtol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(J.gradient(p)), 545.7204759938807, rtol=1e-8)


# -- structure -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,size", [("mbb", (12, 4)), ("cantilever3d", (4, 2, 2))])
def test_compliance_is_self_adjoint(case, size):
    problem = tc.build(case, *size)
    J = problem.functional
    p = _random_design(J.n_params)
    u, lam = J.state(p), J.adjoint(p)
    assert np.linalg.norm(lam - u) <= 1e-10 * np.linalg.norm(u)


def test_problem_layout():
    problem = tc.build("mbb", 6, 3)
    m = problem.meta
    assert problem.p0.shape == (18,) and np.all(problem.p0 == 0.5)
    assert np.all(problem.bounds[0] == 0.0) and np.all(problem.bounds[1] == 1.0)
    assert (m["nelx"], m["nely"], m["nelz"]) == (6, 3, None)
    assert m["mesh"].n_cells == 18
    A = problem.functional.matrix
    assert A.local.shape == (1, 64)  # one shared local matrix
    assert A.shape == (m["dofmap"].n_free,) * 2 == (2 * 7 * 4 - 4 - 1,) * 2
    assert tc.build("mbb", 6, 3, filter=False).meta["filter"] is None
    p3 = tc.build("cantilever3d", 3, 2, 2)
    assert p3.functional.matrix.local.shape == (1, 24 * 24)
    assert p3.meta["dofmap"].n_free == 3 * (4 * 3 * 3 - 3 * 3)
    np.testing.assert_allclose(p3.meta["load"].sum(), -1.0)  # unit total line load


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"case": "bridge"}, r"unknown case 'bridge'; known cases: 'mbb', 'cantilever3d'"),
    ({"volfrac": 0.0}, r"volfrac must be in \(0, 1\]"),
    ({"volfrac": 1.5}, r"volfrac must be in \(0, 1\]"),
    ({"nelx": 0}, r"nelx must be >= 1"),
    ({"nely": -2}, r"nely must be >= 1"),
    ({"nelx": 2.5}, r"nelx must be an integer"),
    ({"rmin": 0.0}, r"rmin .* must be a positive"),
    ({"rmin": -1}, r"rmin .* must be a positive"),
    ({"penal": 0.5}, r"penal .* must be >= 1"),
    ({"emin": 1.0}, r"emin must satisfy"),
    ({"nelz": 3}, r"nelz is for the 3D case only"),
    ({"case": "cantilever3d", "nelz": 0}, r"nelz must be >= 1"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tc.build(**{"nelx": 4, "nely": 2, **kwargs})


def test_script_runs():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "problems", "topology_compliance.py"),
                          "--nelx", "12", "--nely", "4"], capture_output=True, text=True, check=True, env=env).stdout
    assert "J(p0)" in out and "|grad J(p0)|" in out and "volume(p0)   = 0.5" in out
    assert out.count("PASS") == 4 and "Hessian action: PASS" in out  # order 2; order 3 on J, on grad J, verdict


def test_passive_ranges_sets_and_the_stored_symmetry():
    import topology_compliance as tcm

    with pytest.raises(ValueError, match=r"passive_void: the range '3:1' is empty"):
        tcm.build("mbb", 12, 4, passive_void="3:1")
    a = tcm.build("mbb", 12, 4, passive_void={5, 1, 3})  # a Python set: its elements
    b = tcm.build("mbb", 12, 4, passive_void="1,3,5")
    np.testing.assert_array_equal(a.meta["passive_void"], [1, 3, 5])
    assert a.meta["options"] == b.meta["options"]
    # the symmetry is stored as checked: the same mirror axes in any order or spelling of "none" are one problem
    assert tcm.build("mbb", 12, 4, symmetry="yx").meta["options"]["symmetry"] == "xy"
    assert tcm.build("mbb", 12, 4, symmetry=None).meta["options"] == tcm.build("mbb", 12, 4).meta["options"]
