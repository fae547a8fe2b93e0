"""How adjopt's numba kernels use threads: small kernels run on the calling thread alone.

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
"""

from __future__ import annotations

import contextlib
import os

import numba

#: inner-loop iterations (slot entries, element entries, nonzeros) below which a kernel runs serially
PARALLEL_MIN_WORK = int(os.environ.get("ADJOPT_PARALLEL_MIN_WORK", "2000000"))


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
