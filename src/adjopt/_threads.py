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
"""

from __future__ import annotations

import contextlib
import logging
import os

import numba

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
