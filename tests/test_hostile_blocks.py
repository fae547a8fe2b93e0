"""Findings of a hostile review of the blocked Hessian actions and the symmetric= declarations, each a test:
a matrix symmetric only at the start p0 = 0, truthy strings for boolean options, an empty list of contraction
pairs, unchecked map blocks, and directions of 1e-160 under an iterative solver."""

import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem, mesh
from adjopt.errors import NonFiniteError, ShapeError
from adjopt.maps import ExpMap, NodalToElement, compose
from adjopt.maps.base import IdentityMap
from adjopt.operators import CallbackMatrix, CallbackVector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import poisson_inversion  # noqa: E402


def _symmetric_only_at_zero():
    """exp(p_e) K_e + p_e^2 S_e with S_e nonsymmetric: A(0) and dA(0) are symmetric, A(0.3) is not."""
    rng = np.random.default_rng(0)
    msh = mesh.unit_square(6)
    dm = fem.condense(msh.n_nodes, msh.boundary("all"))
    conn, K = dm.restrict(msh.cells), fem.p1_stiffness(msh)
    E, n = conn.shape[0], dm.n_free
    S = 0.5 * np.abs(K).max() * rng.standard_normal((E, 3, 3))
    owner = np.repeat(np.arange(E), 9)

    def D(c):
        return sp.csr_array((c.ravel(), (np.arange(9 * E), owner)), shape=(9 * E, E))

    A = adjopt.ElementMatrix(conn, E, lambda p: np.exp(p)[:, None, None] * K + (p**2)[:, None, None] * S,
                             lambda p: D(np.exp(p)[:, None, None] * K + (2 * p)[:, None, None] * S),
                             local_second=lambda p, dp: D((np.exp(p) * dp)[:, None, None] * K + (2 * dp)[:, None, None] * S),
                             symmetric=True)
    return adjopt.ReducedFunctional(A, np.ones(n), adjopt.Compliance(np.ones(n)), solver="superlu"), E


def test_a_matrix_symmetric_only_at_the_start_is_refused_at_the_next_p():
    J, E = _symmetric_only_at_zero()
    p0 = np.zeros(E)
    J.gradient(p0)
    J.hessp(p0, np.ones(E))  # symmetric at p0: accepted
    with pytest.raises(ValueError, match=r"symmetric=True promises .* at this p is not symmetric"):
        J.gradient(np.full(E, 0.3))  # a silent wrong gradient (the self-adjoint shortcut) before


def test_boolean_options_refuse_truthy_strings():
    problem = poisson_inversion.build(n=6)
    J, p = problem.functional, problem.p0
    with pytest.raises(TypeError, match="gauss_newton must be True or False"):
        J.hessp(p, np.ones(J.n_params), gauss_newton="False")
    with pytest.raises(TypeError, match="gauss_newton must be True or False"):
        J.hessian(p, gauss_newton="False")
    msh = mesh.unit_square(3)
    conn, K = msh.cells, fem.p1_stiffness(msh)
    E = conn.shape[0]
    local = lambda p: np.exp(p)[:, None, None] * K  # noqa: E731
    jac = lambda p: sp.csr_array(np.zeros((9 * E, E)))  # noqa: E731
    with pytest.raises(TypeError, match="affine must be True or False"):
        adjopt.ElementMatrix(conn, E, local, jac, affine="False")
    with pytest.raises(TypeError, match="affine must be True or False"):
        adjopt.element_matrix_from_triplets(np.array([0, 1]), np.array([0, 1]), 2, 1, lambda p: np.ones(2),
                                            lambda p: np.ones((2, 1)), affine="False")
    with pytest.raises(TypeError, match="affine must be True or False"):
        CallbackMatrix(sp.identity(2, format="csr"), 1, lambda p: np.ones(2), lambda p: np.ones((2, 1)), affine="no")
    with pytest.raises(TypeError, match="affine must be True or False"):
        CallbackVector(2, 1, lambda p: np.ones(2), lambda p: np.ones((2, 1)), affine="False")


def test_contract_block_refuses_an_empty_or_unpacked_list_of_pairs():
    J = poisson_inversion.build(n=6).functional
    A = J.matrix
    rho = np.zeros(A.n_params)
    z = np.ones(A.shape[0])
    with pytest.raises(ValueError, match="non-empty list of"):
        A.contract_block(rho, [])
    with pytest.raises(ValueError, match=r"\[\(W, Z\)\]"):
        A.contract_block(rho, (z, z))


@pytest.mark.parametrize("make", [lambda: ExpMap(5), lambda: IdentityMap(5),
                                  lambda: compose(NodalToElement(np.array([[0, 1, 2], [2, 3, 4]]), n_nodes=5),
                                                  ExpMap(2))],
                         ids=["entrywise", "identity", "composed"])
def test_map_blocks_are_checked_and_owned(make):
    M = make()
    p = np.full(M.n_in, 0.5)
    good = np.ones((M.n_in, 2))
    out = M.jvp_block(p, good)
    assert out is not good and out.shape == (M.n_out, 2)
    out[:] = 7.0
    np.testing.assert_array_equal(good, 1.0)  # the output is the caller's own, not its input
    for bad in (np.ones(M.n_in), np.ones((1, 2)), np.ones((M.n_in + 1, 2)), np.ones((M.n_in, 0))):
        with pytest.raises(ShapeError, match=r"block of k >= 1 columns"):
            M.jvp_block(p, bad)
    nan = good.copy()
    nan[0, 1] = np.nan
    with pytest.raises(NonFiniteError):
        M.jvp_block(p, nan)
    with pytest.raises(ShapeError, match=r"block of k >= 1 columns"):
        M.vjp_block(p, np.ones(M.n_out))


@pytest.mark.parametrize("scale", [1e-160, 1e-300, 1e160])
def test_tiny_and_huge_directions_under_amg(scale):
    problem = poisson_inversion.build(n=12)
    J = problem.functional
    J.solver = "amg"
    p = problem.p0 + 0.1
    d = np.random.default_rng(12).standard_normal(J.n_params)
    ref = J.hessp(p, d)
    got = J.hessp(p, scale * d) / scale  # H is linear in dp: the solves see directions of order one
    assert np.linalg.norm(got - ref) <= 1e-8 * np.linalg.norm(ref)
    block = J.hessp(p, np.column_stack([scale * d, d])) / np.array([scale, 1.0])
    assert np.linalg.norm(block[:, 0] - ref) <= 1e-8 * np.linalg.norm(ref)
