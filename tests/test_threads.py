"""Threads: small kernels run on the calling thread, OpenMP's workers sleep instead of spinning."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import adjopt
from adjopt import _threads


def test_small_work_runs_on_one_thread_and_the_count_is_restored(monkeypatch):
    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread: nothing to switch")
    n = numba.get_num_threads()
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 1000)
    with _threads.threads_for(999):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == n
    with _threads.threads_for(1000):
        assert numba.get_num_threads() == n
    with pytest.raises(RuntimeError), _threads.threads_for(0):
        raise RuntimeError("a kernel failed")
    assert numba.get_num_threads() == n


def test_kernels_give_the_same_numbers_on_one_thread_and_on_many(monkeypatch):
    conn = np.stack([np.arange(400), np.arange(400) + 1], axis=1)
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[1.0, -1.0], [-1.0, 1.0]]), A0=np.eye(401) * 1e-3)
    p, w = np.linspace(0, 1, 400), np.linspace(-1, 1, 401)
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)
    parallel = A.values(p), A.contract(p, w, w), A.tangent(p, p, w)
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 10**12)
    serial = A.values(p), A.contract(p, w, w), A.tangent(p, p, w)
    for a, b in zip(parallel, serial):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("env, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                           ({"ADJOPT_THREADING": "keep"}, None)])
def test_importing_adjopt_lets_openmp_workers_sleep_unless_told_otherwise(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "ADJOPT_THREADING")}
    proc = subprocess.run([sys.executable, "-c", "import os, adjopt; print(os.environ.get('OMP_WAIT_POLICY'))"],
                          env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(expected)


def test_blas_free_reductions_match_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(20_001), rng.standard_normal(20_001)  # above OpenBLAS's threaded-dot size
    assert _threads.dot(a, b) == pytest.approx(float(a @ b), rel=1e-12)
    assert _threads.norm(a) == pytest.approx(float(np.linalg.norm(a)), rel=1e-13)
    M = rng.standard_normal((500, 3))
    np.testing.assert_allclose(_threads.column_norms(M), np.linalg.norm(M, axis=0), rtol=1e-13)
    assert _threads.norm(M) == pytest.approx(float(np.linalg.norm(M)), rel=1e-13)  # Frobenius, as np.vdot flattens
    assert isinstance(_threads.dot(a[:3], b[:3]), float)
    with pytest.raises(ValueError):
        _threads.dot(a, b[:-1])


def test_blas_free_reductions_on_integers_complex_and_bad_shapes():
    big = np.array([2**62, 2**62])
    assert _threads.norm(big) == pytest.approx(float(np.linalg.norm(big.astype(float))), rel=1e-15)  # no overflow
    assert _threads.dot(np.array([1, 2]), np.array([3, 4])) == 11.0
    z = np.array([3 + 4j, 1j])
    assert _threads.norm(z) == pytest.approx(float(np.linalg.norm(z)))  # numpy's, not a wrong real number
    np.testing.assert_allclose(_threads.column_norms(np.array([[3 + 4j], [0j]])), [5.0])
    with pytest.raises(TypeError, match="complex"):
        _threads.dot(z, z)
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        _threads.column_norms(np.ones(3))
    assert _threads.norm(np.array([])) == 0.0 and np.isnan(_threads.norm(np.array([np.nan, 1.0])))


def test_multigrid_setup_and_solves_run_on_one_thread_below_the_threshold(monkeypatch):
    import contextlib
    import sys

    from adjopt.solvers import gmg

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "problems"))
    import topology_compliance as tc

    seen = []

    @contextlib.contextmanager
    def recording(work):
        seen.append(work)
        with _threads.threads_for(work):
            seen.append(numba.get_num_threads())
            yield

    monkeypatch.setattr(gmg, "threads_for", recording)
    pb = tc.build("mbb", 32, 16, solver="gmg")
    J = pb.functional
    rho = J.map.forward(pb.p0)
    A, b = J.matrix.assemble(rho), J.rhs.value(rho)
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", A.nnz + 1)
    u1 = J.solver.factorize(A, operator=J.matrix, rho=rho).solve(b)
    assert seen == [A.nnz, 1, A.nnz, 1]  # factorize, then solve: the work is A's nonzeros, on one thread
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)
    J.solver.warm_start = False
    u2 = J.solver.factorize(A, operator=J.matrix, rho=rho).solve(b)
    assert seen[4:] == [A.nnz, numba.get_num_threads(), A.nnz, numba.get_num_threads()]
    np.testing.assert_allclose(u2, u1, rtol=0, atol=1e-6 * np.abs(u1).max())
