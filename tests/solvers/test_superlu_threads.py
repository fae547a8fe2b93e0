"""SuperLU's multi-column solves run the BLAS on one thread (threadpoolctl) and leave the pools as they were;
single-column solves keep the pools' own threads; results equal the plain splu solve."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

threadpoolctl = pytest.importorskip("threadpoolctl")

from adjopt.solvers import base  # noqa: E402
from adjopt.solvers.direct import DirectSolver  # noqa: E402


class Spy:
    """An splu object whose solves record the BLAS pools' thread counts they ran with."""

    def __init__(self, lu):
        self.lu, self.threads = lu, []
        self.nnz = lu.nnz

    def solve(self, rhs, trans="N"):
        self.threads.append((np.ndim(rhs), [lib.num_threads for lib in base.blas_controller().lib_controllers]))
        return self.lu.solve(rhs, trans=trans)


def test_multi_column_solves_run_on_one_blas_thread_and_restore_it():
    m = 20
    T = sp.diags_array([-np.ones(m - 1), 4.0 * np.ones(m), -0.5 * np.ones(m - 1)], offsets=[-1, 0, 1])
    A = sp.csr_array(sp.kron(sp.identity(m), T) + sp.kron(sp.diags_array([-np.ones(m - 1)], offsets=[1]),
                                                              sp.identity(m)))  # nonsymmetric
    fac = DirectSolver().factorize(A)
    ctl = base.blas_controller()
    assert ctl is not None and ctl.lib_controllers
    B = np.random.default_rng(0).standard_normal((A.shape[0], 9))
    ref = sla.splu(sp.csc_array(A)).solve(B)
    ref_t = sla.splu(sp.csc_array(A)).solve(B, trans="T")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = [lib.num_threads for lib in ctl.lib_controllers]
        spy = fac.lu = Spy(fac.lu)
        X = fac.solve(B)
        Xt = fac.solve(B, transpose=True)
        fac.solve(B[:, 0])
        assert [lib.num_threads for lib in ctl.lib_controllers] == before  # restored
    blocks = [t for nd, t in spy.threads if nd == 2]
    assert blocks and all(n == 1 for call in blocks for n in call)
    single = [t for nd, t in spy.threads if nd == 1]
    assert single and single[0] == before  # a single column keeps the pools' threads
    np.testing.assert_allclose(X, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(Xt, ref_t, rtol=0, atol=1e-12 * np.abs(ref_t).max())
