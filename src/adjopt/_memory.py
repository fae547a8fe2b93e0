"""Freed memory goes back to the system: glibc's mmap threshold fixed for distributed runs.

glibc serves a block of more than ``M_MMAP_THRESHOLD`` bytes (128 KiB at
start) by its own ``mmap``, returned to the system by ``free``; smaller blocks
come from the heap, whose free space stays with the process. The threshold is
dynamic: each freed mmapped block raises it to that block's size, up to 32
MiB. A rank of a distributed run allocates arrays of a few MiB (its part of a
vector, of an element array), frees them, and from then on such arrays live
in the heap, where the holes they leave are kept: measured on the 2D Poisson
inversion at 1M dofs, the resident memory after the build was 1.10 GiB per
rank on 2 ranks and 0.90 GiB with the threshold fixed at 128 KiB (0.66 and
0.57 on 4 ranks); on 1 rank, whose arrays are larger than 32 MiB and mmapped
anyway, the peak moved by 1 %. The cost is a page fault per 4 KiB of a fresh
large array, which did not show in the solve-dominated times.

:func:`return_freed_memory` fixes the threshold (``mallopt``) once per process;
:class:`~adjopt.backends.petsc.DistributedReducedFunctional` calls it when it is
built. ``ADJOPT_MALLOC=keep`` in the environment leaves the allocator alone;
so does a ``MALLOC_MMAP_THRESHOLD_`` set by the user (glibc reads it at start).
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MAX_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound on 64-bit systems (HEAP_MAX_SIZE / 2)
DEFAULT_THRESHOLD = 128 * 1024

_done: int | None = None  # the threshold this process set, once set


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes, so that freed blocks above it return to the system.

    Returns True when the threshold is set (now or by an earlier call), False
    where it is not: not glibc, ``ADJOPT_MALLOC=keep`` or
    ``MALLOC_MMAP_THRESHOLD_`` in the environment. Process-wide (it applies to
    every later allocation of the process); logged once.
    """
    global _done
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"threshold must be an int of bytes in [0, {MAX_THRESHOLD}] (glibc's range), got {threshold!r}")
    given = os.environ.get("ADJOPT_MALLOC", "")
    keep = given.strip().lower()
    if keep not in ("", "keep"):
        raise ValueError(f"the environment variable ADJOPT_MALLOC must be 'keep' (leave the allocator alone) or "
                         f"unset, got {given!r}")
    if _done is not None and _done == threshold:
        return True
    if keep == "keep" or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has neither)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, threshold):
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)  # the free pages the heap holds already go back too
    _done = threshold
    logger.info("glibc mmap threshold fixed at %d bytes: freed arrays return to the system (ADJOPT_MALLOC=keep "
                "leaves the allocator alone)", threshold)
    return True


def threshold_set() -> int | None:
    """The mmap threshold :func:`return_freed_memory` set in this process, or None."""
    return _done
