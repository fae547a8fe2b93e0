"""The seed note's 4 x 4 example: its numbers, its script, its derivatives."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import seed_toy  # noqa: E402

from adjopt.verify import check_hessian_symmetry, finite_difference_gradient, taylor_test  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    return seed_toy.build()


def test_state_and_adjoint_match_the_note(problem):
    J, p = problem.functional, problem.p0
    np.testing.assert_allclose(J.state(p), [2.8, 0.4667, 0.8, -1.5333], atol=5e-5)
    np.testing.assert_allclose(-J.adjoint(p), [-0.1711, -1.0255, 0.4305, -0.4239], atol=5e-5)


def test_gradient_matches_dense_reference(problem):
    J, p = problem.functional, problem.p0
    # dense reference: dJ/dp_k = v^T dA_k x with v = -A^{-T} x/|x| (the note's formula)
    A = J.matrix.assemble(p).toarray()
    x = np.linalg.solve(A, [4.0, 3.0, 2.0, 1.0])
    v = -np.linalg.solve(A.T, x / np.linalg.norm(x))
    jac = seed_toy.jacobian(p).reshape(4, 4, 4)  # (row, col, k)
    ref = np.einsum("i,ijk,j->k", v, jac, x)
    np.testing.assert_allclose(J.gradient(p), ref, rtol=1e-12)
    np.testing.assert_allclose(J.gradient(p), finite_difference_gradient(J, p), rtol=1e-7)


def test_taylor_rates_and_symmetry(problem):
    J, p = problem.functional, problem.p0
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9
    assert check_hessian_symmetry(J, p) < 1e-10


def test_hessian_matches_finite_differences_of_the_gradient(problem):
    J, p = problem.functional, problem.p0
    h = 1e-6
    Hfd = np.column_stack([(J.gradient(p + h * e) - J.gradient(p - h * e)) / (2 * h) for e in np.eye(4)])
    Hadj = np.column_stack([J.hessp(p, e) for e in np.eye(4)])
    np.testing.assert_allclose(Hadj, Hfd, rtol=1e-6, atol=1e-8)


def test_script_prints_the_notes_numbers():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "problems", "seed_toy.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "[ 2.8     0.4667  0.8    -1.5333]" in out
    assert "[-0.1711 -1.0255  0.4305 -0.4239]" in out
    assert out.count("PASS") == 4 and "Hessian action: PASS" in out  # order 2; order 3 on J, on grad J, verdict
