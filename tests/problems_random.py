"""Random small problems with known dense derivatives, for the reference tests."""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

import adjopt
from adjopt.objectives import Objective


class MixedObjective(Objective):
    """f(U, p) = (c . vec U)(d . p) + 0.5 p^T R p: exercises every p-derivative."""

    depends_on_p = True

    def __init__(self, c, d, R):
        self.c, self.d, self.R = c, d, R

    def value(self, u, p):
        return float(np.vdot(self.c, u) * (self.d @ p) + 0.5 * p @ self.R @ p)

    def grad_u(self, u, p):
        return self.c * (self.d @ p)

    def grad_p(self, u, p):
        return np.vdot(self.c, u) * self.d + self.R @ p

    def hess_uu(self, u, p, du):
        return np.zeros_like(du)

    def hess_up(self, u, p, dp):
        return self.c * (self.d @ dp)

    def hess_pu(self, u, p, du):
        return np.vdot(self.c, du) * self.d

    def hess_pp(self, u, p, dp):
        return self.R @ dp


@dataclass
class Case:
    functional: adjopt.ReducedFunctional
    p: np.ndarray
    dense: dict  # callables of p for the dense reference


def _phi(name):
    return {"identity": adjopt.Identity(), "exp": adjopt.Exp(), "simp": adjopt.SIMP(q=3.0, emin=1e-3)}[name]


def element_case(seed, n=8, n_elem=6, k_loc=3, ncols=1, coefficient="exp", shared=False,
                 symmetric=False, rhs="constant", objective="misfit+mixed"):
    rng = np.random.default_rng(seed)
    conn = np.stack([rng.choice(n, size=k_loc, replace=False) for _ in range(n_elem)])
    if shared:
        K = rng.standard_normal((k_loc, k_loc))
        K = K @ K.T if symmetric else K
        locs = np.broadcast_to(K, (n_elem, k_loc, k_loc))
        local = K
    else:
        locs = rng.standard_normal((n_elem, k_loc, k_loc))
        if symmetric:
            locs = locs @ np.transpose(locs, (0, 2, 1))
        local = locs
    A0 = n * np.eye(n) + (0 if symmetric else 0.3 * rng.standard_normal((n, n)) * (rng.random((n, n)) < 0.3))
    phi = _phi(coefficient)
    Amat = adjopt.ElementCoefficientMatrix(conn, local, coefficient=phi, n=n, A0=sp.csr_array(A0))
    scat = np.zeros((n, n, n_elem))
    for e in range(n_elem):
        scat[np.ix_(conn[e], conn[e], [e])] += locs[e][:, :, None]
    p = rng.uniform(0.3, 1.0, n_elem) if coefficient == "simp" else rng.uniform(-0.5, 0.5, n_elem)

    def A(p):
        return A0 + scat @ phi(p)

    def dA(p):
        return scat * phi.d1(p)

    def d2A(p):
        out = np.zeros((n, n, n_elem, n_elem))
        out[:, :, np.arange(n_elem), np.arange(n_elem)] = scat * phi.d2(p)
        return out

    return _finish(rng, Amat, p, A, dA, d2A, n, n_elem, ncols, rhs, objective)


def callback_case(seed, n=7, m=4, ncols=1, rhs="constant", objective="misfit+mixed", affine=False, density=0.4):
    rng = np.random.default_rng(seed)
    mask = (rng.random((n, n)) < density) | np.eye(n, dtype=bool)
    A0 = (n * np.eye(n) + rng.standard_normal((n, n))) * mask
    Ak = rng.standard_normal((n, n, m)) * mask[:, :, None]
    Q = rng.standard_normal((n, n, m, m)) * mask[:, :, None, None]
    Q = 0.0 * Q if affine else 0.5 * (Q + np.transpose(Q, (0, 1, 3, 2)))
    pattern = sp.csr_array(mask.astype(float))
    rows, cols = np.nonzero(mask)  # row-major: the canonical CSR order

    def A(p):
        return A0 + Ak @ p + 0.5 * np.einsum("ijkl,k,l->ij", Q, p, p)

    def dA(p):
        return Ak + np.einsum("ijkl,l->ijk", Q, p)

    def d2A(p):
        return Q

    def second(p, w, z, dp):
        return np.einsum("ic,ijkl,jc,l->k", w, Q, z, dp)

    Amat = adjopt.CallbackMatrix(
        pattern, m,
        values=lambda p: A(p)[rows, cols],
        jacobian=lambda p: sp.csr_array(dA(p)[rows, cols]),
        second=None if affine else second,
        affine=affine,
    )
    p = rng.uniform(-0.3, 0.3, m)
    return _finish(rng, Amat, p, A, dA, d2A, n, m, ncols, rhs, objective)


def _finish(rng, Amat, p, A, dA, d2A, n, m, ncols, rhs, objective):
    def zeros_d2B(p):
        return np.zeros((n, ncols, m, m))

    if rhs == "constant":
        b = rng.standard_normal((n, ncols)) if ncols > 1 else rng.standard_normal(n)
        rhs_obj = b

        def B(p):
            return b.reshape(n, ncols)

        def dB(p):
            return np.zeros((n, ncols, m))

        d2B = zeros_d2B
    elif rhs == "affine":
        assert ncols == 1
        b0, Bm = rng.standard_normal(n), rng.standard_normal((n, m))
        rhs_obj = adjopt.AffineVector(b0, Bm)

        def B(p):
            return (b0 + Bm @ p)[:, None]

        def dB(p):
            return Bm[:, None, :]

        d2B = zeros_d2B
    elif rhs == "quadratic":  # CallbackVector with a second-order term
        assert ncols == 1
        b0, Bm, Q = rng.standard_normal(n), rng.standard_normal((n, m)), rng.standard_normal((n, m, m))
        Q = 0.5 * (Q + Q.transpose(0, 2, 1))
        rhs_obj = adjopt.CallbackVector(
            n, m, value=lambda p: b0 + Bm @ p + 0.5 * np.einsum("ikl,k,l->i", Q, p, p),
            jacobian=lambda p: Bm + np.einsum("ikl,l->ik", Q, p),
            second=lambda p, lam, dp: np.einsum("i,ikl,l->k", lam, Q, dp),
        )

        def B(p):
            return (b0 + Bm @ p + 0.5 * np.einsum("ikl,k,l->i", Q, p, p))[:, None]

        def dB(p):
            return (Bm + np.einsum("ikl,l->ik", Q, p))[:, None, :]

        def d2B(p):
            return Q[:, None, :, :]
    else:
        raise ValueError(rhs)
    n_obs = max(2, n - 2)
    Bobs = rng.standard_normal((n_obs, n))
    Wv = rng.uniform(0.5, 2.0, n_obs)
    data = rng.standard_normal((n_obs, ncols)) if ncols > 1 else rng.standard_normal(n_obs)
    c = rng.standard_normal((n, ncols)) if ncols > 1 else rng.standard_normal(n)
    dvec = rng.standard_normal(m)
    R = rng.standard_normal((m, m))
    R = R @ R.T
    terms = []
    if "misfit" in objective:
        terms.append(adjopt.SquaredMisfit(data, B=Bobs, W=Wv))
    if "mixed" in objective:
        terms.append(0.7 * MixedObjective(c, dvec, R))
    if "norm" in objective:
        terms.append(adjopt.Norm())
    obj = sum(terms)
    kron = np.kron(Bobs.T @ np.diag(Wv) @ Bobs, np.eye(ncols))
    Dm = data.reshape(n_obs, ncols)
    cv = c.ravel()

    def fu(U):
        g = np.zeros_like(U)
        if "misfit" in objective:
            g = g + Bobs.T @ (Wv[:, None] * (Bobs @ U - Dm))
        if "mixed" in objective:
            g = g + 0.7 * cv.reshape(U.shape) * (dvec @ p)
        if "norm" in objective:
            g = g + U / np.linalg.norm(U)
        return g

    def fp(U):
        return 0.7 * ((cv @ U.ravel()) * dvec + R @ p) if "mixed" in objective else np.zeros(m)

    def fuu(U):
        H = np.zeros((n * ncols, n * ncols))
        if "misfit" in objective:
            H = H + kron
        if "norm" in objective:
            uv = U.ravel()
            nr = np.linalg.norm(uv)
            H = H + np.eye(uv.size) / nr - np.outer(uv, uv) / nr**3
        return H

    def fup(U):
        return 0.7 * np.outer(cv, dvec) if "mixed" in objective else np.zeros((n * ncols, m))

    def fpp(U):
        return 0.7 * R if "mixed" in objective else np.zeros((m, m))

    J = adjopt.ReducedFunctional(Amat, rhs_obj, obj)
    dense = dict(A=A, dA=dA, d2A=d2A, B=B, dB=dB, d2B=d2B, fu=fu, fp=fp, fuu=fuu, fup=fup, fpp=fpp)
    return Case(J, p, dense)


def dense_solution(case):
    from dense_reference import reference

    d, p = case.dense, case.p
    return reference(d["A"](p), d["dA"](p), d["d2A"](p), d["B"](p), d["dB"](p), d["d2B"](p),
                     d["fu"], d["fp"], d["fuu"], d["fup"], d["fpp"])
