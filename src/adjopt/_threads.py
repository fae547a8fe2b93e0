"""How adjopt's numba kernels use threads: idle workers sleep, and small kernels run on the calling thread.

A parallel kernel wakes numba's worker threads and waits for every one of
them at its end. When another process keeps a core busy (or the BLAS threads
of a factorization still hold it), a woken worker waits for its time slice,
and a kernel of a millisecond takes ten: measured here on 2 cores, the
values-only assembly of a 62k-nonzero matrix took 0.75 ms with 2 threads and
1.07 ms with 1 on an idle machine, but 12 ms with 2 and 1.2 ms with 1 with
one core busy (``scripts/bench_threads.py``). Below :data:`PARALLEL_MIN_WORK`
inner-loop iterations the gain of a second thread is a fraction of a
millisecond and the risk is ten, so such a kernel runs serially.

``ADJOPT_PARALLEL_MIN_WORK`` (environment) overrides the threshold; 0 runs
every kernel on numba's threads.

Numba's OpenMP workers spin after a parallel region before they sleep, and a
spinning worker takes the core that another process, or the BLAS threads of
a factorization, needs next: with one core busy, kernels of 0.3 ms took 8 ms
(28x) on 2 threads. With ``OMP_WAIT_POLICY=PASSIVE`` they sleep at once and
the worst ratio of 2 to 1 threads with one core busy was 1.12, while the large
kernels keep their gain on an idle machine (0.6-0.7). OpenMP reads the
variable once, when its library loads, which numba does at the first
parallel kernel: importing adjopt sets it then, unless it is set already
(``os.environ.setdefault``; it applies to the process's other OpenMP code
loaded later too) or ``ADJOPT_THREADING=keep``.

numpy's own BLAS is a third pool: OpenBLAS computes a dot product of more
than 10,000 entries (``x @ y``, ``np.dot``, ``np.vdot``, and
``np.linalg.norm``, which is a dot product) on all its threads, which then
spin for about 0.1 s, on the cores that CHOLMOD's BLAS needs for the next
factorization. In an OC loop at 15k dofs the per-solve residual check and
the compliance f^T u did exactly that, and CHOLMOD's factorization took
0.095-0.12 s instead of the 0.045 s it takes alone (0.049 s with numpy's
BLAS on one thread). adjopt's own reductions on vectors therefore go through
:func:`dot` and :func:`norm`, which use numpy's einsum loops (vectorized, one
thread, memory bound like the BLAS call) and never wake a BLAS pool.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numba
import numpy as np

logger = logging.getLogger(__name__)

#: inner-loop iterations (slot entries, element entries, nonzeros) below which a kernel runs serially
PARALLEL_MIN_WORK = int(os.environ.get("ADJOPT_PARALLEL_MIN_WORK", "500000"))


def _sleeping_workers() -> None:
    """OMP_WAIT_POLICY=PASSIVE before OpenMP loads (see the module docstring)."""
    if os.environ.get("ADJOPT_THREADING", "").lower() == "keep":
        return
    policy = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logger.debug("OpenMP wait policy: %s", policy)


_sleeping_workers()


@contextlib.contextmanager
def threads_for(work: int):
    """Run the numba kernels inside on one thread when ``work`` is below :data:`PARALLEL_MIN_WORK`."""
    n = numba.get_num_threads()
    if n == 1 or work >= PARALLEL_MIN_WORK:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


def _real(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "c":
        raise TypeError(f"{name} is complex; adjopt's reductions are for real arrays")
    return a if a.dtype == np.float64 else a.astype(np.float64)  # integers: no overflow, no wrap-around


def dot(a, b) -> float:
    """sum(a * b) of two real arrays (flattened) without numpy's BLAS threads (see the module docstring)."""
    return float(np.einsum("i,i->", _real(a, "a").ravel(), _real(b, "b").ravel()))


def norm(a) -> float:
    """The 2-norm of a real array (Frobenius for 2-D) without numpy's BLAS threads; complex: numpy's norm."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        return float(np.linalg.norm(a.ravel()))
    a = _real(a, "a").ravel()
    return float(np.sqrt(np.einsum("i,i->", a, a)))


def column_norms(a: np.ndarray) -> np.ndarray:
    """The 2-norms of the columns of an (n, k) array without numpy's BLAS threads; complex: numpy's norms."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"column_norms needs an (n, k) array, got shape {a.shape}")
    if a.dtype.kind == "c":
        return np.linalg.norm(a, axis=0)
    a = _real(a, "a")
    return np.sqrt(np.einsum("ij,ij->j", a, a))
