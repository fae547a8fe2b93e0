"""CHOLMOD's solves run its BLAS on one thread (threadpoolctl), give what the unlimited solve gives, take
C- and Fortran-ordered blocks alike, and leave the BLAS pools as they found them."""

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sksparse.cholmod")
threadpoolctl = pytest.importorskip("threadpoolctl")

from adjopt.solvers import base  # noqa: E402
from adjopt.solvers.cholmod import CholmodSolver  # noqa: E402


def laplacian2d(m: int) -> sp.csr_array:
    """The 5-point Laplacian on an m x m grid (SPD, with supernodes for CHOLMOD's BLAS)."""
    T = sp.diags_array([-np.ones(m - 1), 4.0 * np.ones(m), -np.ones(m - 1)], offsets=[-1, 0, 1])
    S = sp.diags_array([-np.ones(m - 1), -np.ones(m - 1)], offsets=[-1, 1])
    return sp.csr_array(sp.kron(sp.identity(m), T) + sp.kron(S, sp.identity(m)))


class Spy:
    """A CHOLMOD factor whose solves record the BLAS pools' thread counts they ran with."""

    def __init__(self, factor):
        self.factor, self.threads = factor, []

    def solve_A(self, rhs):
        self.threads.append([lib.num_threads for lib in base.blas_controller().lib_controllers])
        return self.factor.solve_A(rhs)


@pytest.mark.parametrize("mode", ["simplicial", "supernodal"])
def test_solves_run_the_blas_on_one_thread_and_restore_it(mode):
    A = laplacian2d(30)
    fac = CholmodSolver(mode=mode).factorize(A)
    ctl = base.blas_controller()
    assert ctl is not None and ctl.lib_controllers  # CholmodSolver rescanned: its BLAS is among the pools
    B = np.random.default_rng(0).standard_normal((A.shape[0], 40))
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = [lib.num_threads for lib in ctl.lib_controllers]
        ref = fac.factor.solve_A(np.asfortranarray(B))  # CHOLMOD itself, on the pools' own threads
        spy = fac.factor = Spy(fac.factor)
        X = fac.solve(B)
        fac.solve(B[:, 0])
        assert [lib.num_threads for lib in ctl.lib_controllers] == before  # restored
    assert spy.threads and all(t == 1 for call in spy.threads for t in call)
    np.testing.assert_allclose(X, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_c_and_fortran_ordered_blocks_solve_alike():
    A = laplacian2d(20)
    fac = CholmodSolver().factorize(A)
    Bc = np.random.default_rng(1).standard_normal((A.shape[0], 7))
    Bf = np.asfortranarray(Bc)
    Xc, Xf = fac.solve(Bc), fac.solve(Bf)
    np.testing.assert_allclose(Xc, Xf, rtol=0, atol=1e-12 * np.abs(Xf).max())
    np.testing.assert_allclose(A @ Xf, Bc, rtol=0, atol=1e-10 * np.abs(Bc).max())


def test_without_threadpoolctl_the_solves_run_as_they_are(monkeypatch):
    monkeypatch.setattr(base, "blas_controller", lambda rescan=False: None)  # what it returns without threadpoolctl
    A = laplacian2d(10)
    fac = CholmodSolver().factorize(A)
    B = np.random.default_rng(2).standard_normal((A.shape[0], 3))
    np.testing.assert_allclose(A @ fac.solve(B), B, rtol=0, atol=1e-12)
