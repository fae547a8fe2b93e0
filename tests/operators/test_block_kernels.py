"""The blocked derivatives of a blocked Hessian action: ``tangent_block``, ``contract_block`` and
``second_block`` of ElementCoefficientMatrix (one pass over the rows or elements for k directions, kernels
``rows_matvec_block`` and ``element_bilinear_block``) against k calls of the single-column methods, and the base
class's column loops (used by every other operator) against the same; the maps' ``jvp_block`` / ``vjp_block``
against their column-wise products."""

import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from adjopt.errors import ShapeError
from adjopt.maps import DensityFilter, ExpMap, HeavisideProjection, NodalToElement, SIMPMap, compose
from adjopt.maps.base import IdentityMap, ParameterMap
from adjopt.operators import CallbackMatrix, ElementCoefficientMatrix
from adjopt.operators.base import ParametricMatrix

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_kernel_paths import NAMES, _problem  # noqa: E402

COEFFICIENTS = ["exp", "simp", None]


def _operator(name, coefficient, with_A0=False):
    conn, local, n = _problem(name)
    A0 = sp.identity(n, format="csr") * 0.5 if with_A0 else None
    return ElementCoefficientMatrix(conn, local, coefficient, n=n, A0=A0)


def _point(A, rng):
    return 0.4 + 0.3 * rng.random(A.n_params)  # inside (0, 1): SIMP's and exp's derivatives are both nonzero


def _cols(f, k):
    return np.column_stack([f(i) for i in range(k)])


@pytest.mark.parametrize("coefficient", COEFFICIENTS)
@pytest.mark.parametrize("name", NAMES)
def test_element_blocks_equal_their_columns(name, coefficient):
    A = _operator(name, coefficient, with_A0=name == "p1-2d")
    rng = np.random.default_rng(1)
    p, k, n = _point(A, rng), 5, A.shape[0]
    dP = rng.standard_normal((A.n_params, k))
    u, lam = rng.standard_normal(n), rng.standard_normal(n)
    W, Z = rng.standard_normal((n, k)), rng.standard_normal((n, k))

    T = A.tangent_block(p, dP, u)
    ref = _cols(lambda i: A.tangent(p, dP[:, i], u), k)
    np.testing.assert_allclose(T, ref, rtol=1e-12, atol=1e-13 * np.abs(ref).max())
    T2 = A.tangent_block(p, np.asfortranarray(dP), np.column_stack([u, lam]))  # two states at once, any layout
    assert T2.shape == (2, n, k)
    np.testing.assert_allclose(T2[0], ref, rtol=1e-12, atol=1e-13 * np.abs(ref).max())
    ref_l = _cols(lambda i: A.tangent(p, dP[:, i], lam), k)
    np.testing.assert_allclose(T2[1], ref_l, rtol=1e-12, atol=1e-13 * np.abs(ref_l).max())

    # sum of a wide-by-shared pair and a shared-by-wide pair, as in C(dl, u) + C(lam, du)
    C = A.contract_block(p, [(W, u), (lam, Z)])
    ref = _cols(lambda i: A.contract(p, W[:, i], u) + A.contract(p, lam, Z[:, i]), k)
    np.testing.assert_allclose(C, ref, rtol=1e-11, atol=1e-12 * np.abs(ref).max())
    C = A.contract_block(p, [(W, Z)])  # both wide
    ref = _cols(lambda i: A.contract(p, W[:, i], Z[:, i]), k)
    np.testing.assert_allclose(C, ref, rtol=1e-11, atol=1e-12 * np.abs(ref).max())

    S = A.second_block(p, lam, u, dP)
    ref = _cols(lambda i: A.second(p, lam, u, dP[:, i]), k)
    np.testing.assert_allclose(S, ref, rtol=1e-12, atol=1e-13 * max(np.abs(ref).max(), 1e-300))
    if coefficient is None:
        assert not np.any(S)


def test_the_base_class_loops_give_the_kernels_results():
    A = _operator("p1-2d", "exp")
    rng = np.random.default_rng(2)
    p, k, n = _point(A, rng), 4, A.shape[0]
    dP = rng.standard_normal((A.n_params, k))
    u, lam, W = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal((n, k))
    for method, args in (("tangent_block", (p, dP, u)), ("tangent_block", (p, dP, np.column_stack([u, lam]))),
                         ("contract_block", (p, [(W, u), (lam, W)])), ("second_block", (p, lam, u, dP))):
        fast = getattr(A, method)(*args)
        loop = getattr(ParametricMatrix, method)(A, *args)
        np.testing.assert_allclose(fast, loop, rtol=1e-11, atol=1e-12 * np.abs(loop).max())


def test_a_callback_matrix_uses_the_column_loops():
    rng = np.random.default_rng(3)
    n, m, k = 6, 4, 3
    pattern = sp.csr_array(np.ones((n, n)))
    G = sp.csr_array(rng.standard_normal((n * n, m)))

    A = CallbackMatrix(pattern, m, lambda p: np.full(n * n, 1.0) + G @ p, lambda p: G, affine=True)
    p, dP = rng.standard_normal(m), rng.standard_normal((m, k))
    u, W = rng.standard_normal(n), rng.standard_normal((n, k))
    np.testing.assert_allclose(A.tangent_block(p, dP, u), _cols(lambda i: A.tangent(p, dP[:, i], u), k), rtol=1e-13)
    np.testing.assert_allclose(A.contract_block(p, [(W, u)]), _cols(lambda i: A.contract(p, W[:, i], u), k),
                               rtol=1e-13)
    np.testing.assert_array_equal(A.second_block(p, u, u, dP), np.zeros((m, k)))


def test_bad_blocks_are_refused():
    A = _operator("p1-2d", "exp")
    p, n = _point(A, np.random.default_rng(4)), A.shape[0]
    u = np.ones(n)
    with pytest.raises(ShapeError, match="k >= 1 directions"):
        A.tangent_block(p, np.ones(A.n_params), u)
    with pytest.raises(ShapeError, match="k >= 1 directions"):
        A.second_block(p, u, u, np.ones((A.n_params + 1, 2)))
    bad = np.ones((A.n_params, 2))
    bad[3, 1] = np.nan
    with pytest.raises(Exception, match="NaN"):
        A.tangent_block(p, bad, u)
    with pytest.raises(ValueError, match="different numbers of columns"):
        A.contract_block(p, [(np.ones((n, 2)), u), (u, np.ones((n, 3)))])


def _maps(rng):
    cells = np.array([[0, 1, 2], [1, 3, 2], [2, 3, 4], [0, 2, 4]])
    centers = rng.random((6, 2))
    return {
        "identity": IdentityMap(5),
        "exp": ExpMap(5),
        "simp": SIMPMap(5, q=3.0),
        "heaviside": HeavisideProjection(5, beta=4.0),
        "nodal-to-element": NodalToElement(cells, n_nodes=5),
        "filter": DensityFilter(centers, 0.5),
        "composed": compose(NodalToElement(cells, n_nodes=5), SIMPMap(4), HeavisideProjection(4, beta=2.0)),
    }


@pytest.mark.parametrize("name", ["identity", "exp", "simp", "heaviside", "nodal-to-element", "filter", "composed"])
def test_map_blocks_equal_their_columns(name):
    rng = np.random.default_rng(5)
    M = _maps(rng)[name]
    p = 0.2 + 0.6 * rng.random(M.n_in)
    dP, G = rng.standard_normal((M.n_in, 3)), rng.standard_normal((M.n_out, 3))
    np.testing.assert_allclose(M.jvp_block(p, dP), _cols(lambda i: M.jvp(p, dP[:, i]), 3), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(M.vjp_block(p, G), _cols(lambda i: M.vjp(p, G[:, i]), 3), rtol=1e-13, atol=1e-15)
    # the base class's loops give the same
    np.testing.assert_allclose(ParameterMap.jvp_block(M, p, dP), M.jvp_block(p, dP), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ParameterMap.vjp_block(M, p, G), M.vjp_block(p, G), rtol=1e-13, atol=1e-15)


def test_a_user_coefficient_without_d2_says_what_is_missing():
    import adjopt
    from adjopt.errors import MissingDerivativeError
    from adjopt.operators.coefficients import Coefficient

    class Square(Coefficient):
        def __call__(self, p):
            return p**2

        def d1(self, p):
            return 2 * p

    A = adjopt.ElementCoefficientMatrix(np.array([[0, 1], [1, 2]]), np.array([[1.0, -1.0], [-1.0, 1.0]]), Square(),
                                        n=3, A0=np.eye(3))
    with pytest.raises(MissingDerivativeError, match=r"Square does not implement d2\(p\) \(phi''\), which Hessian"):
        A.second_block(np.ones(2), np.ones(3), np.ones(3), np.ones((2, 2)))
    with pytest.raises(NotImplementedError):  # still a NotImplementedError for code that catches that
        A.second(np.ones(2), np.ones(3), np.ones(3), np.ones(2))
