"""The row-wise kernels of ElementCoefficientMatrix against the general ones and plain references.

Paths (``_kernels``): ``gather_rows`` (per-element and shared local matrices), ``gather_templates``
(shared matrix, rows repeating a few patterns), ``rows_matvec`` (the tangent), ``element_forms``
(the one-column contraction with phi^(order) evaluated inside; blocked for a shared matrix) and
``coefficient_values``. References: the slot-map gather ``gather_slots`` (the previous assembly
path, still used by the multigrid solver), ``element_bilinear`` (the multi-column contraction),
dense matrices and numpy's coefficient methods.
"""

import numba
import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem, mesh
from adjopt.operators import ElementCoefficientMatrix, _kernels
from adjopt.operators.coefficients import SIMP, Exp
from adjopt.operators.element import build_slot_map


def _problem(name):
    """(conn, local matrices, n): 2D/3D, shared/per-element, with and without condensed dofs."""
    if name == "p1-2d":  # per-element, unstructured-looking numbering after a shuffle
        m = mesh.unit_square(6)
        perm = np.random.default_rng(0).permutation(m.n_nodes)
        return perm[m.cells], fem.p1_stiffness(m), m.n_nodes
    if name == "p1-3d":
        m = mesh.unit_cube(3)
        return m.cells, fem.p1_stiffness(m), m.n_nodes
    if name == "q1-2d":  # one shared 8 x 8 matrix on a structured grid: row templates
        m = mesh.rectangle(7, 5, 7.0, 5.0, cell="quad")
        K = fem.q1_elasticity(mesh.rectangle(1, 1, 1.0, 1.0, cell="quad"), E=1.0, nu=0.3)[0]
        return fem.vector_dofs(m.cells, 2), K, 2 * m.n_nodes
    if name == "q1-2d-condensed":  # the left edge clamped: negative dofs
        m = mesh.rectangle(9, 7, 9.0, 7.0, cell="quad")
        K = fem.q1_elasticity(mesh.rectangle(1, 1, 1.0, 1.0, cell="quad"), E=1.0, nu=0.3)[0]
        dofs = fem.vector_dofs(m.cells, 2)
        fixed = np.flatnonzero(np.repeat(m.points[:, 0] == 0.0, 2))
        keep = np.setdiff1d(np.arange(2 * m.n_nodes), fixed)
        new = -np.ones(2 * m.n_nodes, dtype=np.int64)
        new[keep] = np.arange(keep.size)
        return new[dofs], K, keep.size
    if name == "hex-3d":  # shared scalar hex matrix on a 3D grid
        m = mesh.box(4, 4, 3, cell="hexahedron")
        return m.cells, fem.q1_laplace(mesh.box(1, 1, 1, 0.25, 0.25, 1.0 / 3, cell="hexahedron"))[0], m.n_nodes
    if name == "p1-2d-shared":  # one shared 3 x 3 matrix on structured triangles: 6 elements per node
        m = mesh.unit_square(7)
        return m.cells, fem.p1_stiffness(m)[0] + np.diag([0.5, 0.25, 0.125]), m.n_nodes
    if name == "random-shared":  # a shared nonsymmetric matrix on a random connectivity: no templates
        rng = np.random.default_rng(3)
        conn = np.stack([rng.choice(20, size=4, replace=False) for _ in range(30)])
        conn[rng.random(conn.shape) < 0.2] = -1
        return conn, rng.standard_normal((4, 4)), 20
    raise ValueError(name)


NAMES = ["p1-2d", "p1-3d", "q1-2d", "q1-2d-condensed", "hex-3d", "p1-2d-shared", "random-shared"]


def _dense(conn, local, coef, n):
    A = np.zeros((n, n))
    locs = np.broadcast_to(local, (conn.shape[0],) + local.shape[-2:])
    for e in range(conn.shape[0]):
        keep = conn[e] >= 0
        idx = conn[e][keep]
        A[np.ix_(idx, idx)] += coef[e] * locs[e][np.ix_(keep, keep)]
    return A


def _slot_gather(A, coef, base=None):
    """The previous assembly: gather_slots over the slot map of build_slot_map."""
    out = np.empty(A.nnz)
    _kernels.gather_slots(A._slot_ptr, A._slot_elem, A._slot_loc, A.local, A._estride, coef,
                          np.zeros(0) if base is None else base, out)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_row_gather_equals_slot_gather_bit_for_bit(name):
    conn, local, n = _problem(name)
    A = ElementCoefficientMatrix(conn, local, coefficient="exp", n=n)
    p = np.random.default_rng(1).standard_normal(A.n_params)
    coef = np.exp(p)
    ref = _slot_gather(A, coef)
    out = np.empty(A.nnz)
    _kernels.gather_rows(A.indptr, A._inc_ptr, A._inc_elem, A._inc_loc, A._rpos, A._row_vals, A._estride == 0, A.k,
                         coef, np.zeros(0), 3, A._scratch, out)
    # the same products added in the same (element) order: identical bits
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(A.gather(coef), ref)
    np.testing.assert_allclose(A.assemble(p).toarray(), _dense(conn, local, coef, n), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["q1-2d", "q1-2d-condensed", "hex-3d", "p1-2d-shared"])
def test_templates_of_a_structured_grid_equal_the_row_gather(name):
    """U = 4 (Q1), 8 (hex) elements per group: scalar coefficients; 6 (triangles): the general loop."""
    conn, local, n = _problem(name)
    A = ElementCoefficientMatrix(conn, local, coefficient="simp", n=n)
    assert A._templates is not None
    grp_ptr, which, tmpl = A._templates
    assert grp_ptr[0] == 0 and grp_ptr[-1] == n and which.shape == (grp_ptr.size - 1,)
    assert tmpl.shape[0] < which.size  # fewer patterns than row groups
    assert tmpl.shape[1] == {"hex-3d": 8, "p1-2d-shared": 6}.get(name, 4)
    if name.startswith("q1"):  # a node's two components form one group (but not on the clamped edge)
        assert which.size < 0.6 * n
    coef = np.random.default_rng(2).uniform(0.1, 2.0, A.n_params)
    rows = np.empty(A.nnz)
    _kernels.gather_rows(A.indptr, A._inc_ptr, A._inc_elem, A._inc_loc, A._rpos, A._row_vals, True, A.k, coef,
                         np.zeros(0), 2, A._scratch, rows)
    base = np.random.default_rng(3).standard_normal(A.nnz)
    for b in (np.zeros(0), base):
        out = np.empty(A.nnz)
        _kernels.gather_templates(A.indptr, A._inc_ptr, A._inc_elem, grp_ptr, which, tmpl, coef, b, 5, out)
        expect = rows + b if b.size else rows
        np.testing.assert_allclose(out, expect, rtol=1e-14, atol=1e-14 * np.abs(expect).max())
    np.testing.assert_array_equal(A.gather(coef), _slot_gather(A, coef))
    np.testing.assert_allclose(A.gather(coef, base), _slot_gather(A, coef, base), rtol=1e-14, atol=1e-14)


def test_random_connectivity_has_no_templates_and_per_element_matrices_none():
    conn, local, n = _problem("random-shared")
    assert ElementCoefficientMatrix(conn, local, n=n)._templates is None
    conn, local, n = _problem("p1-2d")
    A = ElementCoefficientMatrix(conn, local, n=n)
    assert A._templates is None and A._row_vals.shape == (A._rpos.shape[0],)


@pytest.mark.parametrize("name", ["q1-2d", "p1-3d"])
def test_non_finite_coefficients_stay_where_they_belong(name):
    """exp overflows in one element: its entries are inf, the others finite (the templates would give NaN)."""
    conn, local, n = _problem(name)
    A = ElementCoefficientMatrix(conn, local, coefficient="exp", n=n)
    p = np.zeros(A.n_params)
    p[3] = 1000.0
    with np.errstate(over="ignore", invalid="ignore"):
        ref = _slot_gather(A, np.exp(p))
        vals = A.values(p)
    np.testing.assert_array_equal(np.isfinite(vals), np.isfinite(ref))
    assert not np.isnan(vals[np.isfinite(ref) | np.isinf(ref)]).any() or np.isnan(ref).any()
    np.testing.assert_array_equal(vals[np.isfinite(ref)], ref[np.isfinite(ref)])


@pytest.mark.parametrize("name", NAMES)
def test_values_with_A0_match_the_dense_reference(name):
    conn, local, n = _problem(name)
    rng = np.random.default_rng(4)
    A0 = sp.random_array((n, n), density=0.1, rng=rng) + sp.eye_array(n)
    A = ElementCoefficientMatrix(conn, local, coefficient="simp", n=n, A0=A0)
    p = rng.uniform(0.05, 1.0, A.n_params)
    phi = SIMP()(p)
    np.testing.assert_allclose(A.assemble(p).toarray(), _dense(conn, local, phi, n) + A0.toarray(), rtol=1e-13,
                               atol=1e-13)
    # the slot map, rebuilt on request, describes the same pattern (A0's entries included)
    np.testing.assert_allclose(A.values(p), _slot_gather(A, phi, A._base), rtol=1e-14, atol=1e-14)
    indptr, indices, *_ = build_slot_map(A.conn, n, A0)
    np.testing.assert_array_equal(indptr, A.indptr)
    np.testing.assert_array_equal(indices, A.indices)


@pytest.mark.parametrize("coefficient", ["identity", "exp", "simp", SIMP(q=2.5, emin=1e-3), SIMP(q=1.0)])
def test_coefficients_in_the_kernels_match_numpy(coefficient):
    c = adjopt.operators.coefficients.as_coefficient(coefficient)
    p = np.random.default_rng(5).uniform(0.05, 1.5, 1000)
    spec = c.kernel_spec()
    assert spec is not None
    for order, f in enumerate((c, c.d1, c.d2)):
        out = np.empty_like(p)
        assert _kernels.coefficient_values(*spec, order, p, out) == 0
        np.testing.assert_allclose(out, f(p), rtol=4e-16 * 8, atol=0)
    # non-finite results are counted
    out = np.empty(2)
    bad = _kernels.coefficient_values(*Exp().kernel_spec(), 0, np.array([0.0, 1e4]), out)
    assert bad == 1 and out[1] == np.inf


@numba.njit(cache=False)
def _coef_eval_loop(spec, order, p, out):
    for e in range(p.shape[0]):
        out[e] = _kernels.coef_eval(spec[0], spec[1], spec[2], spec[3], spec[4], order, p[e])


@pytest.mark.parametrize("q", [1.0, 2.0, 3.0, 5.0, 8.0, 9.0, 2.5])
@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 1025, 3000])
def test_simp_factors_by_products_equal_coef_eval_bit_for_bit(q, n):
    """SIMP with an integer exponent has a vectorised loop of its own (coefficient values and the contractions'
    factors); it makes coef_eval's products in coef_eval's order, also across chunk ends and for the exponents
    that go through pow (above MAX_INT_POWER, not an integer, or below the order)."""
    c = SIMP(q=q, emin=1e-3, e0=2.0)
    spec = c.kernel_spec()
    p0 = np.random.default_rng(int(q * 10) + n).uniform(0.01, 1.5, n)
    for order in (0, 1, 2):
        p = p0.copy()
        if order <= q:
            p[:: max(2, n // 5)] = 0.0  # 0 ** 0 = 1 and 0 ** k = 0 as in coef_eval (0 ** -1 is inf: not there)
        want = np.empty(n)
        _coef_eval_loop(spec, order, p, want)
        out = np.full(n, np.nan)
        assert _kernels.coefficient_values(*spec, order, p, out) == 0
        np.testing.assert_array_equal(out, want)
        # the contraction's factors: f_e * (w_e^T K z_e) with K = [[1]] and w = z = 1, one dof per element
        conn = np.arange(n).reshape(n, 1)
        forms = np.empty(n)
        _kernels.element_forms(conn, np.ones((1, 1)), 0, np.ones(n), np.ones(n), *spec, order, p, np.zeros(0), 3,
                               forms)
        np.testing.assert_array_equal(forms, want * 1.0)


def test_subclasses_go_through_numpy():
    class Shifted(Exp):
        def __call__(self, p):
            return np.exp(p) + 1.0

        def d1(self, p):
            return np.exp(p)

        def d2(self, p):
            return np.exp(p)

    assert Shifted().kernel_spec() is None and adjopt.operators.coefficients.Coefficient().kernel_spec() is None
    conn, local, n = _problem("p1-3d")
    A = ElementCoefficientMatrix(conn, local, coefficient=Shifted(), n=n)
    p = np.random.default_rng(6).standard_normal(A.n_params)
    np.testing.assert_allclose(A.assemble(p).toarray(), _dense(conn, local, np.exp(p) + 1.0, n), rtol=1e-13,
                               atol=1e-13)


def _forms_row_order(conn, local, w, z):
    """w_e^T K_e z_e as sum_a w_a (sum_b K_ab z_b), zero at condensed dofs: the order of the fused kernel."""
    locs = np.broadcast_to(local, (conn.shape[0],) + local.shape[-2:])
    out = np.empty(conn.shape[0])
    for e in range(conn.shape[0]):
        we = [w[i] if i >= 0 else 0.0 for i in conn[e]]
        ze = [z[i] if i >= 0 else 0.0 for i in conn[e]]
        acc = 0.0
        for a in range(conn.shape[1]):
            row = 0.0
            for b in range(conn.shape[1]):
                row += locs[e, a, b] * ze[b]
            acc += we[a] * row
        out[e] = acc
    return out


def _forms_reference(conn, local, w, z):
    locs = np.broadcast_to(local, (conn.shape[0],) + local.shape[-2:])
    wz = [np.where(conn >= 0, v[np.maximum(conn, 0)], 0.0) for v in (w, z)]
    return np.einsum("ea,eab,eb->e", wz[0], locs, wz[1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("coefficient", ["identity", "exp", "simp"])
def test_fused_contraction_and_second_match_the_general_kernel(name, coefficient):
    conn, local, n = _problem(name)
    A = ElementCoefficientMatrix(conn, local, coefficient=coefficient, n=n)
    rng = np.random.default_rng(7)
    p = rng.uniform(0.1, 1.0, A.n_params)
    dp = rng.standard_normal(A.n_params)
    w, z = rng.standard_normal((2, n))
    general = np.empty(A.n_params)
    _kernels.element_bilinear(A.conn, A.local, A._estride, w[:, None], z[:, None], general)
    forms = A.element_forms(w, z)
    row_order = _forms_row_order(conn, local, w, z)
    np.testing.assert_array_equal(forms, row_order)  # the same products in the same order, blocked or not
    np.testing.assert_allclose(forms, general, rtol=1e-13, atol=1e-13 * np.abs(general).max())
    ref = _forms_reference(conn, local, w, z)
    np.testing.assert_allclose(forms, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    c = A.coefficient
    np.testing.assert_allclose(A.contract(p, w, z), c.d1(p) * row_order, rtol=1e-14, atol=0)
    if not A.affine:
        np.testing.assert_allclose(A.second(p, w, z, dp), c.d2(p) * dp * row_order, rtol=1e-14, atol=0)
    # two columns go through element_bilinear; their sum equals the one-column forms
    W, Z = rng.standard_normal((2, n, 2))
    two = A.contract(p, W, Z)
    np.testing.assert_allclose(two, A.contract(p, W[:, 0], Z[:, 0]) + A.contract(p, W[:, 1], Z[:, 1]), rtol=1e-12,
                               atol=1e-12 * np.abs(two).max())
    W3, Z3 = rng.standard_normal((2, n, 3))  # three: the general path
    three = A.contract(p, W3, Z3)
    np.testing.assert_allclose(three, sum(A.contract(p, W3[:, c], Z3[:, c]) for c in range(3)), rtol=1e-12,
                               atol=1e-12 * np.abs(three).max())


def test_blocked_contraction_over_many_blocks_and_a_ragged_end():
    """More elements than one block (FORM_BLOCK) per chunk, and chunks that end inside a block."""
    m = mesh.rectangle(37, 23, 37.0, 23.0, cell="quad")
    K = fem.q1_elasticity(mesh.rectangle(1, 1, 1.0, 1.0, cell="quad"), E=1.0, nu=0.3)[0]
    conn = fem.vector_dofs(m.cells, 2)
    n = 2 * m.n_nodes
    A = ElementCoefficientMatrix(conn, K, coefficient="simp", n=n)
    rng = np.random.default_rng(8)
    w, z = rng.standard_normal((2, n))
    p = rng.uniform(0.1, 1.0, A.n_params)
    general = _forms_row_order(conn, K, w, z)
    for nchunks in (1, 3, 7):
        out = np.empty(A.n_params)
        _kernels.element_forms(A.conn, A.local, 0, w, z, *A.coefficient.kernel_spec(), 1, p, np.zeros(0), nchunks, out)
        np.testing.assert_array_equal(out, A.coefficient.d1(p) * general)


@pytest.mark.parametrize("name", NAMES)
def test_row_matvec_tangent_matches_dense(name):
    conn, local, n = _problem(name)
    A = ElementCoefficientMatrix(conn, local, coefficient="exp", n=n)
    rng = np.random.default_rng(9)
    p, dp = rng.standard_normal((2, A.n_params))
    dA = _dense(conn, local, dp * np.exp(p), n)
    for z in (rng.standard_normal(n), rng.standard_normal((n, 2)), rng.standard_normal((n, 3))):  # 1, 2: own paths
        ref = dA @ z
        np.testing.assert_allclose(A.tangent(p, dp, z), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(A._tangent_values(p, dp), _slot_gather(A, dp * np.exp(p)), rtol=1e-14, atol=1e-14)


def test_small_and_odd_sizes():
    """k = 2, 5 and 6 (generic and literal branches), one element, rows without elements."""
    rng = np.random.default_rng(10)
    for k in (2, 5, 6):
        conn = np.stack([rng.choice(12, size=k, replace=False) for _ in range(9)])
        local = rng.standard_normal((9, k, k))
        A0 = sp.eye_array(14)  # dofs 12 and 13 are touched by no element
        A = ElementCoefficientMatrix(conn, local, coefficient="exp", n=14, A0=A0)
        p = rng.standard_normal(9)
        np.testing.assert_allclose(A.assemble(p).toarray(), _dense(conn, local, np.exp(p), 14) + np.eye(14),
                                   rtol=1e-13, atol=1e-13)
        w, z = rng.standard_normal((2, 14))
        np.testing.assert_allclose(A.contract(p, w, z), np.exp(p) * _forms_reference(conn, local, w, z), rtol=1e-12)
        dp = rng.standard_normal(9)
        W, Z = rng.standard_normal((2, 14, 2))  # the two-column tangent and contraction paths, generic k
        np.testing.assert_allclose(A.contract(p, W, Z), np.exp(p) * (_forms_reference(conn, local, W[:, 0], Z[:, 0])
                                   + _forms_reference(conn, local, W[:, 1], Z[:, 1])), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(A.tangent(p, dp, Z), _dense(conn, local, dp * np.exp(p), 14) @ Z, rtol=1e-12,
                                   atol=1e-12)
    A = ElementCoefficientMatrix(np.array([[0, 1, 2]]), np.eye(3), coefficient="simp")
    np.testing.assert_allclose(A.assemble(np.array([0.5])).toarray(), np.eye(3) * (1e-9 + 0.125 * (1 - 1e-9)))


def test_exp_in_the_kernels_is_within_one_ulp_of_numpy():
    """exp_fast (vectorisable, used for Exp inside the kernels) against np.exp, over the whole range."""
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.uniform(-1.0, 1.0, 20000), rng.uniform(-50.0, 50.0, 20000),
                        rng.uniform(-746.0, 711.0, 20000), rng.uniform(-746.0, -700.0, 5000),
                        rng.uniform(700.0, 710.0, 5000),
                        [0.0, -0.0, 1e-300, -1e-300, 0.5 * np.log(2), -0.5 * np.log(2), 709.78, 709.79, 710.0, 1e300,
                         -708.4, -745.1, -745.2, -746.0, -1e300, np.inf, -np.inf, np.nan]])
    out = np.empty_like(x)
    bad = _kernels.coefficient_values(*Exp().kernel_spec(), 0, x, out)
    with np.errstate(over="ignore"):
        ref = np.exp(x)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(ref))
    np.testing.assert_array_equal(out == 0.0, ref == 0.0)
    assert bad == np.count_nonzero(~np.isfinite(ref))
    fin = np.isfinite(ref) & (ref > 0)
    ulps = np.abs(out[fin].view(np.int64) - ref[fin].view(np.int64))
    assert ulps.max() <= 1, ulps.max()
    # the one-column contraction of an Exp operator uses it as well
    conn, local, n = _problem("p1-3d")
    A = ElementCoefficientMatrix(conn, local, coefficient="exp", n=n)
    p = rng.uniform(-30.0, 30.0, A.n_params)
    w, z = rng.standard_normal((2, n))
    np.testing.assert_allclose(A.contract(p, w, z), np.exp(p) * _forms_row_order(conn, local, w, z), rtol=7e-16,
                               atol=0)


def test_values_are_new_arrays_every_time():
    """values() never hands out an array it returned before, held or not (a cache may hold it unseen)."""
    import copy
    import pickle

    conn, local, n = _problem("q1-2d")
    A = ElementCoefficientMatrix(conn, local, coefficient="simp", n=n)
    rng = np.random.default_rng(12)
    ps = rng.uniform(0.1, 1.0, (4, A.n_params))
    coefs = np.empty_like(ps)
    for p, c in zip(ps, coefs):
        _kernels.coefficient_values(*A.coefficient.kernel_spec(), 0, p, c)
    ref = [_slot_gather(A, c) for c in coefs]
    v0 = A.values(ps[0])
    addr = v0.ctypes.data
    keep = v0.copy()
    del v0
    v1 = A.values(ps[1])
    M = A.assemble(ps[2])
    np.testing.assert_array_equal(v1, ref[1])
    np.testing.assert_array_equal(M.data, ref[2])
    w, z = rng.standard_normal((2, n))
    A.contract(ps[3], w, z)  # its scratch phi(p) is the operator's own, reused
    np.testing.assert_array_equal(v1, ref[1])
    np.testing.assert_array_equal(M.data, ref[2])
    np.testing.assert_array_equal(keep, ref[0])
    B = pickle.loads(pickle.dumps(A))
    C = copy.deepcopy(A)
    np.testing.assert_array_equal(B.values(ps[0]), ref[0])
    np.testing.assert_array_equal(C.values(ps[3]), ref[3])
    assert addr is not None


def test_long_rows_use_wider_places():
    """A dof in 300 elements: its row has 301 slots, so the places in the rows need 16 bits."""
    rng = np.random.default_rng(13)
    conn = np.stack([np.zeros(300, dtype=np.int64), np.arange(1, 301)], axis=1)
    for negative in (False, True):
        c = conn.copy()
        if negative:
            c[::7, 1] = -1
        local = rng.standard_normal((300, 2, 2))
        A = ElementCoefficientMatrix(c, local, coefficient="exp", n=301)
        assert A._rpos.dtype == np.uint16
        p = rng.standard_normal(300)
        np.testing.assert_allclose(A.assemble(p).toarray(), _dense(c, local, np.exp(p), 301), rtol=1e-13, atol=1e-13)
        coef = np.empty(300)
        _kernels.coefficient_values(*A.coefficient.kernel_spec(), 0, p, coef)  # exp_fast: within an ulp of np.exp
        np.testing.assert_array_equal(A.values(p), _slot_gather(A, coef))
