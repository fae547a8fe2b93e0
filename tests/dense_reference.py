"""An independent dense reference for gradients and Hessians: forward sensitivities.

Given dense A(p), dA/dp (n, n, m), d2A/dp2 (n, n, m, m), B(p) (n, k),
dB/dp (n, k, m), d2B/dp2 (n, k, m, m) and the objective's derivatives as dense
arrays on vec(U) = U.ravel() (row-major), it computes

    S_j   = A^{-1} (dB_j - dA_j U)                                      first sensitivities
    T_ij  = A^{-1} (d2B_ij - d2A_ij U - dA_i S_j - dA_j S_i)            second sensitivities
    grad  = f_p + f_u . S
    H     = f_pp + f_pu S + (f_pu S)^T + S^T f_uu S + f_u . T

with no adjoint at all, so it checks the adjoint formulas independently.
"""

import numpy as np


def reference(A, dA, d2A, B, dB, d2B, fu, fp, fuu, fup, fpp):
    n, k = B.shape
    m = dA.shape[2]
    U = np.linalg.solve(A, B)
    S = np.empty((n, k, m))
    for j in range(m):
        S[:, :, j] = np.linalg.solve(A, dB[:, :, j] - dA[:, :, j] @ U)
    T = np.empty((n, k, m, m))
    for i in range(m):
        for j in range(m):
            rhs = d2B[:, :, i, j] - d2A[:, :, i, j] @ U - dA[:, :, i] @ S[:, :, j] - dA[:, :, j] @ S[:, :, i]
            T[:, :, i, j] = np.linalg.solve(A, rhs)
    Sv = S.reshape(n * k, m)
    fu_v = fu(U).ravel()
    grad = fp(U) + fu_v @ Sv
    cross = fup(U).T @ Sv  # (m, m): f_pu S
    H = fpp(U) + cross + cross.T + Sv.T @ fuu(U) @ Sv + np.einsum("a,aij->ij", fu_v, T.reshape(n * k, m, m))
    return U, grad, H
