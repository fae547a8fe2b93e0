"""ElementCoefficientMatrix: assembly, contractions and bad input against dense references."""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt.errors import PatternError, ShapeError
from adjopt.operators import ElementCoefficientMatrix, ElementCoefficientVector


def _dense(conn, locs, coef, n, A0=None):
    A = np.zeros((n, n)) if A0 is None else np.array(A0, dtype=float)
    for e in range(conn.shape[0]):
        keep = conn[e] >= 0
        idx = conn[e][keep]
        A[np.ix_(idx, idx)] += coef[e] * locs[e][np.ix_(keep, keep)]
    return A


def _random(seed, n=9, n_elem=7, k=3, negative=False):
    rng = np.random.default_rng(seed)
    conn = np.stack([rng.choice(n, size=k, replace=False) for _ in range(n_elem)])
    if negative:
        conn[rng.random(conn.shape) < 0.25] = -1
    locs = rng.standard_normal((n_elem, k, k))
    return rng, conn, locs


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("coef", ["identity", "exp", "simp"])
def test_assembly_matches_dense(coef, negative):
    rng, conn, locs = _random(1, negative=negative)
    n = 9
    A0 = sp.random_array((n, n), density=0.2, rng=rng) + sp.eye_array(n)
    A = ElementCoefficientMatrix(conn, locs, coefficient=coef, n=n, A0=A0)
    p = rng.uniform(0.2, 1.0, conn.shape[0])
    phi = A.coefficient(p)
    np.testing.assert_allclose(A.assemble(p).toarray(), _dense(conn, locs, phi, n, A0.toarray()), atol=1e-14)
    # the pattern is canonical CSR: sorted, no duplicates
    M = A.assemble(p)
    assert M.has_canonical_format
    assert A.nnz == M.nnz


def test_shared_local_matrix_equals_per_element_copies():
    rng, conn, _ = _random(2)
    K = rng.standard_normal((3, 3))
    shared = ElementCoefficientMatrix(conn, K, coefficient="exp", n=9)
    copies = ElementCoefficientMatrix(conn, np.broadcast_to(K, (7, 3, 3)), coefficient="exp", n=9)
    p = rng.standard_normal(7)
    np.testing.assert_allclose(shared.values(p), copies.values(p), rtol=1e-15, atol=0)
    w, z = rng.standard_normal((2, 9, 2))
    np.testing.assert_allclose(shared.contract(p, w, z), copies.contract(p, w, z))
    assert shared.local.shape == (1, 9)  # stored once


def test_contract_tangent_second_match_dense_tensor():
    rng, conn, locs = _random(3, negative=True)
    n, m = 9, 7
    A = ElementCoefficientMatrix(conn, locs, coefficient=adjopt.SIMP(q=3, emin=1e-3), n=n)
    p = rng.uniform(0.2, 1.0, m)
    phi = A.coefficient
    dA = np.stack([_dense(conn, locs, np.eye(m)[e] * phi.d1(p), n) for e in range(m)], axis=2)
    d2A = np.stack([_dense(conn, locs, np.eye(m)[e] * phi.d2(p), n) for e in range(m)], axis=2)
    w, z = rng.standard_normal((2, n))
    dp = rng.standard_normal(m)
    np.testing.assert_allclose(A.contract(p, w, z), np.einsum("i,ijk,j->k", w, dA, z), atol=1e-13)
    np.testing.assert_allclose(A.tangent(p, dp, z), (dA @ dp) @ z, atol=1e-13)
    np.testing.assert_allclose(A.tangent_transpose(p, dp, w), (dA @ dp).T @ w, atol=1e-13)
    np.testing.assert_allclose(A.second(p, w, z, dp), np.einsum("i,ijk,j->k", w, d2A, z) * dp, atol=1e-13)
    # columns are summed in the contractions and kept in the tangents
    W, Z = rng.standard_normal((2, n, 3))
    np.testing.assert_allclose(A.contract(p, W, Z), sum(A.contract(p, W[:, c], Z[:, c]) for c in range(3)))
    np.testing.assert_allclose(A.tangent(p, dp, Z)[:, 1], A.tangent(p, dp, Z[:, 1]))


def test_affine_coefficient_has_zero_second_term():
    rng, conn, locs = _random(4)
    A = ElementCoefficientMatrix(conn, locs, n=9)
    assert A.affine
    w, z = rng.standard_normal((2, 9))
    np.testing.assert_array_equal(A.second(np.ones(7), w, z, np.ones(7)), np.zeros(7))


def test_docstring_example():
    A = ElementCoefficientMatrix(np.array([[0, 1], [1, 2]]), np.array([[1.0, -1.0], [-1.0, 1.0]]), A0=np.eye(3))
    np.testing.assert_array_equal(
        A.assemble(np.array([2.0, 3.0])).toarray(), [[3.0, -2.0, 0.0], [-2.0, 6.0, -3.0], [0.0, -3.0, 4.0]]
    )


def test_element_coefficient_vector_matches_dense():
    rng, conn, _ = _random(5, negative=True)
    f = rng.standard_normal((7, 3))
    b = ElementCoefficientVector(conn, f, coefficient="exp", n=9)
    p, dp, lam = rng.standard_normal(7), rng.standard_normal(7), rng.standard_normal(9)
    S = np.zeros((9, 7))  # d b / d phi
    for e in range(7):
        keep = conn[e] >= 0
        np.add.at(S[:, e], conn[e][keep], f[e][keep])
    np.testing.assert_allclose(b.value(p), S @ np.exp(p))
    np.testing.assert_allclose(b.vjp(p, lam), np.exp(p) * (S.T @ lam))
    np.testing.assert_allclose(b.jvp(p, dp), S @ (np.exp(p) * dp))
    np.testing.assert_allclose(b.second(p, lam, dp), np.exp(p) * dp * (S.T @ lam))


# -- bad input ---------------------------------------------------------------------------
def test_local_matrix_shape_mismatch():
    conn = np.array([[0, 1, 2], [2, 3, 4]])
    with pytest.raises(adjopt.PatternError, match=r"\(3, 3\) \(shared\) or \(2, 3, 3\)"):
        ElementCoefficientMatrix(conn, np.ones((2, 2)))
    with pytest.raises(adjopt.PatternError, match=r"\(2, 3, 3\)"):
        ElementCoefficientMatrix(conn, np.ones((3, 3, 3)))


def test_connectivity_out_of_range_names_the_element():
    conn = np.array([[0, 1], [1, 7]])
    with pytest.raises(adjopt.PatternError, match="element 1 refers to dof 7"):
        ElementCoefficientMatrix(conn, np.eye(2), n=5)


def test_bad_connectivity_and_values():
    with pytest.raises(adjopt.PatternError, match="integer"):
        ElementCoefficientMatrix(np.array([[0.0, 1.0]]), np.eye(2))
    with pytest.raises(adjopt.PatternError, match="no elements"):
        ElementCoefficientMatrix(np.zeros((0, 2), dtype=int), np.eye(2))
    with pytest.raises(adjopt.PatternError, match="NaN"):
        ElementCoefficientMatrix(np.array([[0, 1]]), np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(adjopt.PatternError, match="A0"):
        ElementCoefficientMatrix(np.array([[0, 1]]), np.eye(2), A0=np.eye(3))
    with pytest.raises(ValueError, match="unknown coefficient"):
        ElementCoefficientMatrix(np.array([[0, 1]]), np.eye(2), coefficient="cubic")
    with pytest.raises(ValueError, match="exponent"):
        adjopt.SIMP(q=0.5)
    with pytest.raises(ValueError, match="emin"):
        adjopt.SIMP(emin=2.0)


def test_wrong_shapes_of_p_w_z():
    rng, conn, locs = _random(6)
    A = ElementCoefficientMatrix(conn, locs, n=9)
    p = np.ones(7)
    with pytest.raises(adjopt.ShapeError, match="length 7"):
        A.assemble(np.ones(6))
    with pytest.raises(adjopt.ShapeError, match=r"w must have shape \(9,\)"):
        A.contract(p, np.ones(8), np.ones(9))
    with pytest.raises(adjopt.ShapeError, match="must match"):
        A.contract(p, np.ones(9), np.ones((9, 2)))
    with pytest.raises(adjopt.ShapeError, match="dp"):
        A.tangent(p, np.ones(3), np.ones(9))
    with pytest.raises(adjopt.NonFiniteError):
        A.values(np.full(7, np.inf))


def test_vector_bad_input():
    conn = np.array([[0, 1], [1, 2]])
    with pytest.raises(adjopt.PatternError, match="local vectors"):
        ElementCoefficientVector(conn, np.ones(3))
    with pytest.raises(adjopt.PatternError, match="n=2"):
        ElementCoefficientVector(conn, np.ones(2), n=2)
    with pytest.raises(adjopt.ShapeError, match="b0"):
        adjopt.AffineVector(np.ones(2), np.ones((3, 2)))
    with pytest.raises(adjopt.ShapeError, match="b must"):
        adjopt.ConstantVector(np.ones((2, 2, 2)))
    with pytest.raises(adjopt.NonFiniteError):
        adjopt.ConstantVector(np.array([1.0, np.nan]))


@pytest.mark.parametrize("shared", [True, False])
def test_symmetric_locals_fused_tangent_and_transpose(shared):
    rng, conn, locs = _random(8, negative=True)
    locs = locs + locs.transpose(0, 2, 1)
    n, m = 9, 7
    A = ElementCoefficientMatrix(conn, locs[0] if shared else locs, coefficient="exp", n=n)
    assert A.symmetric
    assert not ElementCoefficientMatrix(conn, np.triu(locs[0]), n=n).symmetric
    p, dp = rng.standard_normal((2, m))
    dAdp = _dense(conn, np.broadcast_to(locs[0], locs.shape) if shared else locs, dp * np.exp(p), n)
    w = rng.standard_normal(n)
    np.testing.assert_allclose(A.tangent(p, dp, w), dAdp @ w, atol=1e-13)
    np.testing.assert_allclose(A.tangent_transpose(p, dp, w), dAdp.T @ w, atol=1e-13)
    W = rng.standard_normal((n, 2))
    np.testing.assert_allclose(A.tangent_transpose(p, dp, W), dAdp.T @ W, atol=1e-13)
    # the contraction of one column (branch-free kernel) equals the dense form
    z = rng.standard_normal(n)
    np.testing.assert_allclose(A.contract(p, w, z), [w @ _dense(conn, locs if not shared else np.broadcast_to(
        locs[0], locs.shape), np.eye(m)[e] * np.exp(p), n) @ z for e in range(m)], atol=1e-13)


def _reference_slot_map(conn, n, extra=None):
    """The slot map by plain Python: slot = sorted unique (row, col); its (element, local entry) list in entry order."""
    n_elem, k = conn.shape
    pairs = {}
    for e in range(n_elem):
        for a in range(k):
            for b in range(k):
                i, j = conn[e, a], conn[e, b]
                if i >= 0 and j >= 0:
                    pairs.setdefault((i, j), []).append((e, a * k + b))
    if extra is not None:
        ex = sp.coo_array(extra)
        for i, j in zip(ex.row, ex.col):
            pairs.setdefault((int(i), int(j)), [])
    return sorted(pairs), pairs


@pytest.mark.parametrize("seed", range(6))
def test_build_slot_map_matches_a_plain_reference(seed):
    from adjopt.operators.element import build_slot_map

    rng, conn, _ = _random(seed, n=11, n_elem=9, k=4, negative=seed % 2 == 1)
    extra = sp.random_array((11, 11), density=0.15, rng=rng) if seed >= 3 else None
    indptr, indices, slot_ptr, slot_elem, slot_loc, extra_slots = build_slot_map(conn, 11, extra)
    keys, pairs = _reference_slot_map(conn, 11, extra)
    got = [(i, int(j)) for i in range(11) for j in indices[indptr[i]:indptr[i + 1]]]
    assert got == keys
    for s, key in enumerate(keys):
        lst = list(zip(slot_elem[slot_ptr[s]:slot_ptr[s + 1]].tolist(), slot_loc[slot_ptr[s]:slot_ptr[s + 1]].tolist()))
        assert lst == pairs[key]
    if extra is not None:
        ex = sp.coo_array(extra)
        assert [keys[s] for s in extra_slots] == list(zip(ex.row.tolist(), ex.col.tolist()))
    assert slot_loc.dtype == np.int16 and slot_ptr.dtype == np.int32


# -- lengths and layouts are checked, not read out of bounds ---------------------------------------
def _small():
    conn = np.array([[0, 1], [1, 2], [2, 3]])
    K = np.array([[1.0, -1.0], [-1.0, 1.0]])
    return ElementCoefficientMatrix(conn, K, n=4)


def test_gather_checks_the_lengths_of_coef_and_base():
    A = _small()
    np.testing.assert_allclose(A.gather(np.ones(3)), A.assemble(np.ones(3)).data)
    with pytest.raises(ShapeError, match=r"one value per element, shape \(3,\)"):
        A.gather(np.ones(2))
    with pytest.raises(ShapeError, match="one value per slot"):
        A.gather(np.ones(3), base=np.ones(A.nnz - 1))


def test_element_forms_checks_w_and_z():
    A = _small()
    w = np.arange(4.0)
    np.testing.assert_allclose(A.element_forms(w, w), [1.0, 1.0, 1.0])
    with pytest.raises(ShapeError, match="w must have shape"):
        A.element_forms(np.ones(3), np.ones(4))
    with pytest.raises(ShapeError, match="z has shape"):
        A.element_forms(np.ones((4, 2)), np.ones(4))


def test_a_transposed_connectivity_is_named():
    conn = np.array([[0, 1], [1, 2], [2, 3]])
    locs = np.tile(np.array([[1.0, -1.0], [-1.0, 1.0]]), (3, 1, 1))
    with pytest.raises(PatternError, match=r"conn looks transposed.*conn\.T"):
        ElementCoefficientMatrix(conn.T, locs, n=4)


def test_the_callers_conn_and_local_matrices_are_copied():
    conn = np.array([[0, 1], [1, 2], [2, 3]])
    K = np.array([[1.0, -1.0], [-1.0, 1.0]])
    A = ElementCoefficientMatrix(conn, K, n=4)
    before = A.assemble(np.ones(3)).toarray()
    K *= 7.0
    conn[:] = 0
    np.testing.assert_array_equal(A.assemble(np.ones(3)).toarray(), before)
    np.testing.assert_allclose(A.contract(np.ones(3), np.arange(4.0), np.arange(4.0)), [1.0, 1.0, 1.0])
