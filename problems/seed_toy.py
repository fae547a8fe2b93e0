"""The seed note's 4 x 4 example: the adjoint of a linear solve, checked end to end.

A(p) = [[Q, Q], [Q, Q]] + I with Q = [[p0 + p1, p2^2], [p3 - p2, p0^3]],
b = [4, 3, 2, 1], f(x) = ||x||, p0 = [1, 2, 3, 4].

The note's adjoint vector is v = -lam, where A^T lam = x / ||x||; its values
are x = [2.8, 0.4667, 0.8, -1.5333] and v = [-0.1711, -1.0255, 0.4305, -0.4239].

Run ``python problems/seed_toy.py`` to print x, v, the gradient by adjoint and
by central finite differences, and Taylor tables for the gradient and the
Hessian action.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

import adjopt

N = 4
M = 4
#: the four distinct entries of Q, in order [q00, q01, q10, q11], and where each sits in A
_Q_INDEX = np.array([[0, 1, 0, 1], [2, 3, 2, 3], [0, 1, 0, 1], [2, 3, 2, 3]])
_PATTERN = sp.csr_array(np.ones((N, N)))  # A is dense: entries in row-major CSR order
_SLOT_Q = _Q_INDEX.ravel()
_SLOT_DIAG = np.eye(N).ravel()


#: how ``adjopt run seed_toy`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", gtol=1e-10)

def _q(p):
    return np.array([p[0] + p[1], p[2] ** 2, p[3] - p[2], p[0] ** 3])


def _dq(p):
    """dq/dp, 4 x 4."""
    return np.array([
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 2 * p[2], 0.0],
        [0.0, 0.0, -1.0, 1.0],
        [3 * p[0] ** 2, 0.0, 0.0, 0.0],
    ])


def values(p):
    """CSR data of A(p) (row-major, 16 entries)."""
    return _q(p)[_SLOT_Q] + _SLOT_DIAG


def jacobian(p):
    """d data / d p, (16, 4)."""
    return _dq(p)[_SLOT_Q]


def second(p, w, z, dp):
    """C2(w, z, dp)_k = sum_j dp_j w^T (d2A/dp_k dp_j) z.

    Only q01 = p2^2 (d2 = 2) and q11 = p0^3 (d2 = 6 p0) are nonlinear.
    """
    wz = np.einsum("ic,jc->ij", w, z)  # sum over columns of w z^T
    s = np.zeros(4)  # s[q] = sum of w_i z_j over the slots holding q
    np.add.at(s, _Q_INDEX.ravel(), wz.ravel())
    out = np.zeros(M)
    out[2] = 2.0 * dp[2] * s[1]
    out[0] = 6.0 * p[0] * dp[0] * s[3]
    return out


def build() -> adjopt.Problem:
    """The seed note's problem as an :class:`adjopt.Problem` (CallbackMatrix, constant b, Norm)."""
    A = adjopt.CallbackMatrix(_PATTERN, M, values=values, jacobian=jacobian, second=second)
    b = np.array([4.0, 3.0, 2.0, 1.0])
    J = adjopt.ReducedFunctional(A, b, adjopt.Norm())
    return adjopt.Problem(J, np.array([1.0, 2.0, 3.0, 4.0]), name="seed_toy")


def main() -> None:
    from adjopt.verify import derivative_report, finite_difference_gradient

    problem = build()
    J, p = problem.functional, problem.p0
    np.set_printoptions(precision=4, suppress=True)
    print("x            =", J.state(p))
    print("v = -lambda  =", -J.adjoint(p))
    print("grad (adjoint)          =", J.gradient(p))
    print("grad (central diff. FD) =", finite_difference_gradient(J, p))
    print(derivative_report(J, p))


if __name__ == "__main__":
    main()
