"""Foreign assemblies: the same A(p) from an element dof table (ElementMatrix), from COO triplets and from
ElementCoefficientMatrix, compared entry by entry and through a reduced functional; a nonlinear nodal
dependence with its second-order term (Taylor rates); ElementVector against ElementCoefficientVector; bad
input."""

from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.errors import MissingDerivativeError, PatternError
from adjopt.verify import check_hessian_symmetry, taylor_test


@pytest.fixture(scope="module")
def setup():
    msh = meshes.unit_square(6)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    conn = dm.restrict(msh.cells)  # -1 at the fixed (boundary) dofs
    Ke = fem.p1_stiffness(msh)
    return msh, dm, conn, Ke


def _exp_callbacks(conn, Ke):
    """(local, local_jacobian, local_second) of exp(p_e) K_e, one parameter per element."""
    E, k = conn.shape
    rows = np.arange(E * k * k)
    owner = np.repeat(np.arange(E), k * k)

    def local(p):
        return np.exp(p)[:, None, None] * Ke

    def jac(p):
        return sp.csr_array(((np.exp(p)[:, None, None] * Ke).reshape(-1), (rows, owner)), shape=(E * k * k, E))

    def second(p, dp):
        return sp.csr_array((((np.exp(p) * dp)[:, None, None] * Ke).reshape(-1), (rows, owner)), shape=(E * k * k, E))

    return local, jac, second


def _element_exp(conn, Ke, **kw):
    """exp(p_e) K_e, one parameter per element, from the dof table."""
    local, jac, second = _exp_callbacks(conn, Ke)
    return adjopt.ElementMatrix(conn, conn.shape[0], local, jac, local_second=second, **kw)


def _counted(f, calls, name):
    """f, counting its calls in calls[name]."""
    def wrapper(*args):
        calls[name] += 1
        return f(*args)
    return wrapper


def _triplets_exp(conn, Ke, n):
    E, k = conn.shape
    r = np.repeat(conn, k, axis=1).reshape(-1)
    c = np.tile(conn, (1, k)).reshape(-1)
    keep = np.flatnonzero((r >= 0) & (c >= 0))
    owner = np.repeat(np.arange(E), k * k)[keep]
    T = keep.size
    perm = np.random.default_rng(0).permutation(T)  # the user's triplets in any order
    keep, owner = keep[perm], owner[perm]

    def values(p):
        return (np.exp(p)[:, None, None] * Ke).reshape(-1)[keep]

    def jac(p):
        return sp.csr_array((values(p), (np.arange(T), owner)), shape=(T, E))

    def second(p, dp):
        return sp.csr_array((values(p) * dp[owner], (np.arange(T), owner)), shape=(T, E))

    return adjopt.element_matrix_from_triplets(r[keep], c[keep], n, E, values, jac, second_jacobian=second)


def test_the_same_matrix_three_ways(setup):
    msh, dm, conn, Ke = setup
    n, E = dm.n_free, msh.n_cells
    native = adjopt.ElementCoefficientMatrix(conn, Ke, "exp", n=n)
    by_table = _element_exp(conn, Ke)
    by_triplets = _triplets_exp(conn, Ke, n)
    rng = np.random.default_rng(1)
    p, dp = rng.standard_normal(E), rng.standard_normal(E)
    w, z = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    ref = native.assemble(p).toarray()
    for A in (by_table, by_triplets):
        assert A.shape == (n, n)
        np.testing.assert_allclose(A.assemble(p).toarray(), ref, rtol=1e-13, atol=1e-13 * np.abs(ref).max())
        np.testing.assert_allclose(A.contract(p, w, z), native.contract(p, w, z), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(A.contract(p, w[:, 0], z[:, 0]), native.contract(p, w[:, 0], z[:, 0]),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(A.second(p, w, z, dp), native.second(p, w, z, dp), rtol=1e-12, atol=1e-12)
    # through a reduced functional: the gradients and Hessian actions agree to round-off
    b = np.ones(n)
    B = sp.random(5, n, density=0.5, random_state=2)
    obj = adjopt.SquaredMisfit(np.ones(5), B=B) + 1e-3 * adjopt.TikhonovL2()
    Js = [adjopt.ReducedFunctional(A, b, obj, solver="superlu") for A in (native, by_table, by_triplets)]
    g0, h0 = Js[0].gradient(p), Js[0].hessp(p, dp)
    for J in Js[1:]:
        np.testing.assert_allclose(J.gradient(p), g0, rtol=1e-11, atol=1e-12 * np.abs(g0).max())
        np.testing.assert_allclose(J.hessp(p, dp), h0, rtol=1e-10, atol=1e-11 * np.abs(h0).max())


def test_a_nodal_dependence_with_its_second_order_term(setup):
    """A_e = (mean over the element's nodes of exp(p_i)) K_e: not affine, several parameters per element."""
    msh, dm, conn, Ke = setup
    cells = msh.cells
    E, k = cells.shape
    rows = np.repeat(np.arange(E * k * k), k)
    cols = np.tile(cells, (1, k * k)).reshape(-1)  # entry s = (e k + a) k + b depends on the element's k nodes

    def local(p):
        return np.exp(p)[cells].mean(axis=1)[:, None, None] * Ke

    def jac(p):
        vals = (Ke.reshape(E, k * k, 1) * (np.exp(p)[cells] / k)[:, None, :]).reshape(-1)
        return sp.csr_array((vals, (rows, cols)), shape=(E * k * k, msh.n_nodes))

    def second(p, dp):
        vals = (Ke.reshape(E, k * k, 1) * (np.exp(p)[cells] * dp[cells] / k)[:, None, :]).reshape(-1)
        return sp.csr_array((vals, (rows, cols)), shape=(E * k * k, msh.n_nodes))

    A = adjopt.ElementMatrix(conn, msh.n_nodes, local, jac, local_second=second)
    obj = adjopt.SquaredMisfit(np.ones(4), B=sp.random(4, dm.n_free, density=0.5, random_state=3)) + adjopt.Norm()
    J = adjopt.ReducedFunctional(A, np.ones(dm.n_free), obj, solver="superlu")
    p = 0.3 * np.random.default_rng(4).standard_normal(msh.n_nodes)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9
    assert check_hessian_symmetry(J, p) < 1e-8
    # the same operator through NodalToElement and ElementCoefficientMatrix is not this one (mean of exp vs exp
    # of the mean), but at constant p they agree
    native = adjopt.ElementCoefficientMatrix(conn, Ke, "exp", n=dm.n_free)
    np.testing.assert_allclose(A.assemble(np.full(msh.n_nodes, 0.2)).toarray(),
                               native.assemble(np.full(E, 0.2)).toarray(), rtol=1e-13, atol=1e-13)
    # without the second-order term: gradients work, Hessian actions say what is missing
    A1 = adjopt.ElementMatrix(conn, msh.n_nodes, local, jac)
    J1 = adjopt.ReducedFunctional(A1, np.ones(dm.n_free), obj, solver="superlu")
    np.testing.assert_allclose(J1.gradient(p), J.gradient(p), rtol=1e-12)
    with pytest.raises(MissingDerivativeError, match="local_second"):
        J1.hessp(p, p)


def test_element_vector_matches_element_coefficient_vector(setup):
    msh, dm, conn, Ke = setup
    E, k = conn.shape
    areas = msh.cell_volumes()
    loc = areas[:, None] * np.ones(k) / k
    rows = np.arange(E * k)
    owner = np.repeat(np.arange(E), k)
    b = adjopt.ElementVector(conn, E, lambda p: np.exp(p)[:, None] * loc,
                             lambda p: sp.csr_array(((np.exp(p)[:, None] * loc).reshape(-1), (rows, owner)),
                                                    shape=(E * k, E)),
                             local_second=lambda p, dp: sp.csr_array((((np.exp(p) * dp)[:, None] * loc).reshape(-1),
                                                                      (rows, owner)), shape=(E * k, E)),
                             n=dm.n_free)
    native = adjopt.ElementCoefficientVector(conn, loc, "exp", n=dm.n_free)
    rng = np.random.default_rng(5)
    p, dp, lam = rng.standard_normal(E), rng.standard_normal(E), rng.standard_normal(dm.n_free)
    np.testing.assert_allclose(b.value(p), native.value(p), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(b.vjp(p, lam), native.vjp(p, lam), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.jvp(p, dp), native.jvp(p, dp), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.second(p, lam, dp), native.second(p, lam, dp), rtol=1e-12, atol=1e-14)
    A = adjopt.ElementCoefficientMatrix(conn, Ke, "exp", n=dm.n_free)  # at p = 0: a constant A, p only in b
    J = adjopt.ReducedFunctional(adjopt.ConstantMatrix(A.assemble(np.zeros(E)), E), b, adjopt.Norm())
    r3 = taylor_test(J, 0.1 * p, order=3)
    assert r3.passed


def test_bad_input_and_copies(setup):
    msh, dm, conn, Ke = setup
    E, k = conn.shape
    ok = dict(local=lambda p: np.exp(p)[:, None, None] * Ke, local_jacobian=lambda p: sp.csr_array((E * k * k, E)))
    with pytest.raises(PatternError, match=r"\(E, k\)"):
        adjopt.ElementMatrix(conn.reshape(-1), E, **ok)
    with pytest.raises(PatternError, match="integers"):
        adjopt.ElementMatrix(conn + 0.5, E, **ok)
    with pytest.raises(PatternError, match="must be < n"):
        adjopt.ElementMatrix(conn, E, n=3, **ok)
    with pytest.raises(PatternError, match="every entry is dropped"):
        adjopt.ElementMatrix(-np.ones_like(conn), E, **ok)
    with pytest.raises(TypeError, match="callable"):
        adjopt.ElementMatrix(conn, E, local=1.0, local_jacobian=ok["local_jacobian"])
    A = adjopt.ElementMatrix(conn, E, lambda p: np.ones((E, k)), ok["local_jacobian"])
    with pytest.raises(PatternError, match=r"local matrices"):
        A.assemble(np.zeros(E))
    A = adjopt.ElementMatrix(conn, E, lambda p: np.full((E, k, k), np.nan), ok["local_jacobian"])
    with pytest.raises(adjopt.NonFiniteError):
        A.assemble(np.zeros(E))
    A = adjopt.ElementMatrix(conn, E, ok["local"], lambda p: np.zeros((3, E)))
    with pytest.raises(PatternError, match=r"\(E k k, m\)"):
        A.contract(np.zeros(E), np.ones(dm.n_free), np.ones(dm.n_free))
    with pytest.raises(PatternError, match="same nonzero length"):
        adjopt.element_matrix_from_triplets(np.arange(3), np.arange(4), 5, 1, None, None)
    with pytest.raises(PatternError, match="outside"):
        adjopt.element_matrix_from_triplets(np.array([0, 5]), np.array([0, 1]), 5, 1, lambda p: p, lambda p: p)
    # the table is copied: changing the caller's array afterwards changes nothing
    table = conn.copy()
    A = _element_exp(table, Ke)
    before = A.assemble(np.zeros(E)).toarray()
    table[:] = 0
    np.testing.assert_array_equal(A.assemble(np.zeros(E)).toarray(), before)
    # affine=True: a zero second-order term
    Aff = adjopt.ElementMatrix(conn, E, lambda p: p[:, None, None] * Ke,
                               lambda p: sp.csr_array((Ke.reshape(-1), (np.arange(E * k * k),
                                                                        np.repeat(np.arange(E), k * k))),
                                                      shape=(E * k * k, E)), affine=True)
    n = dm.n_free
    assert np.all(Aff.second(np.ones(E), np.ones(n), np.ones(n), np.ones(E)) == 0)


def test_hostile_inputs_get_clear_errors(setup, caplog):
    msh, dm, conn, Ke = setup
    E, k = conn.shape
    jac = lambda p: sp.csr_array((E * k * k, E))  # noqa: E731
    local = lambda p: np.exp(p)[:, None, None] * Ke  # noqa: E731
    # a -1 cast to unsigned, and rows without entries
    with pytest.raises(PatternError, match="unsigned"):
        adjopt.ElementMatrix(conn.astype(np.uint32), E, local, jac)
    with pytest.raises(PatternError, match="no entry in row"):
        adjopt.ElementMatrix(conn, E, local, jac, n=dm.n_free + 2)
    with pytest.raises(PatternError, match="no entry in row 2"):
        adjopt.element_matrix_from_triplets(np.array([0, 1, 3]), np.array([0, 1, 3]), 4, 1, None, None)
    # affine and a second-order term at once
    with pytest.raises(ValueError, match="not both"):
        adjopt.ElementMatrix(conn, E, local, jac, local_second=lambda p, dp: jac(p), affine=True)
    # a transposed table is named as such; NaN names the element; sparse local matrices refused
    A = adjopt.ElementMatrix(conn.T.copy(), E, local, jac, n=dm.n_free)
    with pytest.raises(PatternError, match="transposed"):
        A.assemble(np.zeros(E))

    def nan_local(p):
        out = local(p)
        out[5, 0, 0] = np.nan
        return out

    with pytest.raises(adjopt.NonFiniteError, match=r"local\(p\).*element 5"):
        adjopt.ElementMatrix(conn, E, nan_local, jac).assemble(np.zeros(E))
    with pytest.raises(PatternError, match="dense"):
        adjopt.ElementMatrix(conn, E, lambda p: sp.csr_array((3, 3)), jac).assemble(np.zeros(E))
    # a DOK Jacobian is converted, float32 values warned about once
    dok = adjopt.ElementMatrix(conn, E, local, lambda p: sp.dok_array((E * k * k, E)))
    assert np.all(dok.contract(np.zeros(E), np.ones(dm.n_free), np.ones(dm.n_free)) == 0)
    with caplog.at_level("WARNING", logger="adjopt.operators.foreign"):
        adjopt.ElementMatrix(conn, E, lambda p: local(p).astype(np.float32), jac).assemble(np.zeros(E))
    assert any("float32" in r.getMessage() for r in caplog.records)
    # ElementVector names itself when its second-order term is missing
    b = adjopt.ElementVector(conn, E, lambda p: np.ones((E, k)), lambda p: sp.csr_array((E * k, E)))
    with pytest.raises(MissingDerivativeError, match="ElementVector.*local_second"):
        b.second(np.zeros(E), np.ones(dm.n_free), np.ones(E))


def test_assembled_matrices_cannot_corrupt_the_pattern(setup):
    msh, dm, conn, Ke = setup
    for A in (_element_exp(conn, Ke), adjopt.ElementCoefficientMatrix(conn, Ke, "exp", n=dm.n_free)):
        p = np.zeros(msh.n_cells)
        M = A.assemble(p)
        before = M.toarray()
        with pytest.raises(ValueError):
            M.eliminate_zeros()  # would shift the shared pattern: refused
        with pytest.raises(ValueError):
            M.indices[0] = 1
        np.testing.assert_array_equal(A.assemble(p).toarray(), before)
        own = A.assemble(p).copy()
        own.eliminate_zeros()  # a copy is the user's
        np.testing.assert_array_equal(own.toarray(), before)


def test_a_nonsymmetric_scikit_fem_form_needs_its_local_matrices_transposed():
    skfem = pytest.importorskip("skfem")
    from skfem.helpers import grad

    mesh = skfem.MeshTri().refined(2)
    basis = skfem.Basis(mesh, skfem.ElementTriP1())
    form = skfem.BilinearForm(lambda u, v, _: grad(u)[0] * v)
    loc = form.coo_data(basis).tolocal()
    E = loc.shape[0]
    jac = lambda p: sp.csr_array((9 * E, 1))  # noqa: E731
    ref = form.assemble(basis).toarray()
    right = adjopt.ElementMatrix(basis.element_dofs.T, 1, lambda p: loc.transpose(0, 2, 1), jac)
    np.testing.assert_allclose(right.assemble(np.zeros(1)).toarray(), ref, atol=1e-15)


def _misfit(n):
    return adjopt.SquaredMisfit(np.ones(5), B=sp.random(5, n, density=0.5, random_state=2)) + 1e-3 * adjopt.TikhonovL2()


def test_local_jacobian_is_called_once_per_p(setup):
    """value, gradient and Hessian actions at one p share one local_jacobian(p); a new p (or the caller's p
    changed in place) evaluates it again, and the derivatives match a fresh ElementMatrix."""
    msh, dm, conn, Ke = setup
    n, E = dm.n_free, msh.n_cells
    local, jac, second = _exp_callbacks(conn, Ke)
    calls = Counter()
    A = adjopt.ElementMatrix(conn, E, _counted(local, calls, "local"), _counted(jac, calls, "jac"),
                             local_second=_counted(second, calls, "second"))
    J = adjopt.ReducedFunctional(A, np.ones(n), _misfit(n), solver="superlu")
    rng = np.random.default_rng(7)
    p, dp = 0.3 * rng.standard_normal(E), rng.standard_normal(E)
    J.value(p)
    assert calls["jac"] == 0 and calls["local"] == 1
    J.gradient(p)
    assert calls["jac"] == 1
    h = J.hessp(p, dp)  # tangent, tangent transpose and contraction: the same Jacobian
    J.hessp(p, rng.standard_normal((E, 3)))
    assert calls["jac"] == 1 and calls["local"] == 1
    # a Hessian action alone at a new p: one call
    p2 = p + 0.1
    J.hessp(p2, dp)
    assert calls["jac"] == 2
    J.gradient(p2)
    assert calls["jac"] == 2
    # back at p: evaluated again (one Jacobian is kept), and the same numbers
    np.testing.assert_allclose(J.hessp(p, dp), h, rtol=1e-13, atol=1e-14 * np.abs(h).max())
    assert calls["jac"] == 3

    # the caller changes its p in place: the kept Jacobian is not used at the new values
    fresh = _element_exp(conn, Ke)
    w, z = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    q = p.copy()
    A.contract(q, w, z)
    before = calls["jac"]
    q += 0.25
    np.testing.assert_allclose(A.contract(q, w, z), fresh.contract(q, w, z), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(A.tangent(q, dp, z), fresh.tangent(q, dp, z), rtol=1e-13, atol=1e-14)
    assert calls["jac"] == before + 1
    q[:] = p2  # through the functional as well
    J.hessp(q, dp)
    q[0] -= 0.5
    J_fresh = adjopt.ReducedFunctional(_element_exp(conn, Ke), np.ones(n), _misfit(n), solver="superlu")
    h_ref = J_fresh.hessp(q, dp)
    np.testing.assert_allclose(J.hessp(q, dp), h_ref, rtol=1e-11, atol=1e-12 * np.abs(h_ref).max())
    np.testing.assert_allclose(J.gradient(q), J_fresh.gradient(q), rtol=1e-11, atol=1e-14)


def test_triplets_and_element_vector_call_their_jacobian_once_per_p(setup):
    msh, dm, conn, Ke = setup
    n, E = dm.n_free, msh.n_cells
    rng = np.random.default_rng(8)
    p, dp, w, z = rng.standard_normal(E), rng.standard_normal(E), rng.standard_normal(n), rng.standard_normal(n)
    # COO triplets: a CallbackMatrix keeps its last Jacobian too
    A = _triplets_exp(conn, Ke, n)
    calls = Counter()
    A._jacobian_cb = _counted(A._jacobian_cb, calls, "jac")
    q = p.copy()
    c = A.contract(q, w, z)
    A.tangent(q, dp, z), A.tangent_transpose(q, dp, w)
    assert calls["jac"] == 1
    q *= 0.5  # in place
    np.testing.assert_allclose(A.contract(q, w, z), _triplets_exp(conn, Ke, n).contract(q, w, z), rtol=1e-13)
    assert calls["jac"] == 2 and not np.allclose(A.contract(q, w, z), c)
    # ElementVector: vjp and jvp at one p share local_jacobian(p)
    E, k = conn.shape
    loc = msh.cell_volumes()[:, None] * np.ones(k) / k
    rows, owner = np.arange(E * k), np.repeat(np.arange(E), k)

    def vec_jac(p):
        return sp.csr_array(((np.exp(p)[:, None] * loc).reshape(-1), (rows, owner)), shape=(E * k, E))

    vcalls = Counter()
    b = adjopt.ElementVector(conn, E, lambda p: np.exp(p)[:, None] * loc, _counted(vec_jac, vcalls, "jac"),
                             local_second=lambda p, dp: sp.csr_array(
                                 (((np.exp(p) * dp)[:, None] * loc).reshape(-1), (rows, owner)), shape=(E * k, E)),
                             n=n)
    native = adjopt.ElementCoefficientVector(conn, loc, "exp", n=n)
    K = adjopt.ConstantMatrix(adjopt.ElementCoefficientMatrix(conn, Ke, "exp", n=n).assemble(np.zeros(E)), E)
    J = adjopt.ReducedFunctional(K, b, adjopt.Norm(), solver="superlu")
    J.gradient(p), J.hessp(p, dp)
    assert vcalls["jac"] == 1
    q = p + 0.5
    b.vjp(q, w), b.jvp(q, dp)
    assert vcalls["jac"] == 2
    q -= 1.0  # in place
    np.testing.assert_allclose(b.vjp(q, w), native.vjp(q, w), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.jvp(q, dp), native.jvp(q, dp), rtol=1e-12, atol=1e-14)
    assert vcalls["jac"] == 3


def test_a_symmetric_declaration_enables_the_self_adjoint_and_paired_paths(setup):
    msh, dm, conn, Ke = setup
    n, E = dm.n_free, msh.n_cells
    A, general = _element_exp(conn, Ke, symmetric=True), _element_exp(conn, Ke)
    assert A.symmetric and not general.symmetric
    b = np.ones(n)
    fast, slow = (adjopt.ReducedFunctional(M, b, adjopt.Compliance(b), solver="superlu") for M in (A, general))
    assert fast.self_adjoint and not slow.self_adjoint
    rng = np.random.default_rng(9)
    p, dp = 0.3 * rng.standard_normal(E), rng.standard_normal(E)
    for J in (fast, slow):
        J.reset_stats()
    np.testing.assert_allclose(fast.gradient(p), slow.gradient(p), rtol=1e-11, atol=1e-14)
    h = slow.hessp(p, dp)
    np.testing.assert_allclose(fast.hessp(p, dp), h, rtol=1e-10, atol=1e-12 * np.abs(h).max())
    assert fast.stats.solves["adjoint"] == 0 and fast.stats.solves["second_adjoint"] == 0
    assert slow.stats.solves["adjoint"] == 1
    # a misfit objective: the paired tangent pass gives the general path's Hessian action
    Jm, Jg = (adjopt.ReducedFunctional(M, b, _misfit(n), solver="superlu") for M in (A, general))
    h = Jg.hessp(p, dp)
    np.testing.assert_allclose(Jm.hessp(p, dp), h, rtol=1e-10, atol=1e-12 * np.abs(h).max())
    # from triplets as well
    r, c = np.nonzero(general.assemble(p).toarray())
    T = r.size
    At = adjopt.element_matrix_from_triplets(r, c, n, 1, lambda q: np.full(T, q[0]) + (r == c) * 10.0,
                                             lambda q: np.ones((T, 1)), affine=True, symmetric=True)
    assert At.symmetric
    At.assemble(np.ones(1)), At.contract(np.ones(1), np.ones(n), np.ones(n))
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        _element_exp(conn, Ke, symmetric="yes")


def test_a_symmetric_element_matrix_with_cholmod(setup):
    pytest.importorskip("sksparse")
    msh, dm, conn, Ke = setup
    n, E = dm.n_free, msh.n_cells
    b = np.ones(n)
    p, dp = 0.2 * np.random.default_rng(10).standard_normal(E), np.ones(E)
    ref = adjopt.ReducedFunctional(_element_exp(conn, Ke), b, adjopt.Compliance(b), solver="superlu")
    for solver in ("cholmod", "auto"):
        J = adjopt.ReducedFunctional(_element_exp(conn, Ke, symmetric=True), b, adjopt.Compliance(b), solver=solver)
        assert J.self_adjoint
        assert J.value(p) == pytest.approx(ref.value(p), rel=1e-12)
        np.testing.assert_allclose(J.gradient(p), ref.gradient(p), rtol=1e-10, atol=1e-14)
        h = ref.hessp(p, dp)
        np.testing.assert_allclose(J.hessp(p, dp), h, rtol=1e-9, atol=1e-11 * np.abs(h).max())
        assert "cholmod" in J.solver.name


def test_a_broken_symmetric_declaration_is_refused(setup):
    msh, dm, conn, Ke = setup
    n, E = dm.n_free, msh.n_cells
    k = conn.shape[1]
    skew = np.zeros((k, k))
    skew[0, 1], skew[1, 0] = 0.3, -0.3
    local, jac, second = _exp_callbacks(conn, Ke)
    # nonsymmetric local matrices: refused at the first assembly, by name, every time
    bad = adjopt.ElementMatrix(conn, E, lambda p: local(p) + skew, jac, local_second=second, symmetric=True)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"symmetric=True.*A\(p\) at this p.*symmetric=False"):
            bad.assemble(np.zeros(E))
    J = adjopt.ReducedFunctional(bad, np.ones(n), adjopt.Compliance(np.ones(n)), solver="superlu")
    with pytest.raises(ValueError, match="symmetric=True"):
        J.value(np.zeros(E))
    # symmetric at p = 0 but not its derivative: A_e = K_e + p_e S (S skew), refused at the first Jacobian
    rows, owner = np.arange(E * k * k), np.repeat(np.arange(E), k * k)

    def skew_jac(p):
        return sp.csr_array((np.tile(skew.reshape(-1), E), (rows, owner)), shape=(E * k * k, E))

    tricky = adjopt.ElementMatrix(conn, E, lambda p: Ke + p[:, None, None] * skew, skew_jac, affine=True,
                                  symmetric=True)
    p0 = np.zeros(E)
    tricky.assemble(p0)  # A(0) is symmetric
    with pytest.raises(ValueError, match=r"symmetric=True.*derivative"):
        adjopt.ReducedFunctional(tricky, np.ones(n), _misfit(n), solver="superlu").gradient(p0)
    # nonsymmetric triplets
    with pytest.raises(ValueError, match="symmetric=True"):
        adjopt.element_matrix_from_triplets(np.array([0, 0, 1]), np.array([0, 1, 1]), 2, 1,
                                            lambda q: np.array([2.0, 1.0, 2.0]), lambda q: np.zeros((3, 1)),
                                            affine=True, symmetric=True).assemble(np.zeros(1))
    # the same matrices without the declaration are fine
    adjopt.ElementMatrix(conn, E, lambda p: local(p) + skew, jac, local_second=second).assemble(np.zeros(E))
