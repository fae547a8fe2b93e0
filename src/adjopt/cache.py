"""A state cache keyed on the parameter vector, bounded in bytes (LRU).

The key is a hash of p's bytes; a stored copy of p is compared on every hit,
so a hash collision can never return another point's state. Entries are
evicted least-recently-used first when the total size would exceed the limit.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import numpy as np

from .errors import CacheTooSmallError

logger = logging.getLogger(__name__)

#: default limit: a quarter of a 24 GiB machine
DEFAULT_CACHE_BYTES = 6 * 2**30


def fingerprint(p: np.ndarray) -> bytes:
    """A 16-byte hash of p's dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((p.dtype.str, p.shape)).encode())
    h.update(np.ascontiguousarray(p).data)
    return h.digest()


class StateCache:
    """LRU map p -> entry, bounded by ``max_bytes``; entries expose ``nbytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if not max_bytes > 0:
            raise ValueError(f"cache_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, tuple[np.ndarray, object]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached entries."""
        return sum(e.nbytes for _, e in self._entries.values())

    def __len__(self):
        return len(self._entries)

    def get(self, p: np.ndarray):
        key = fingerprint(p)
        item = self._entries.get(key)
        if item is not None and np.array_equal(item[0], p):
            self._entries.move_to_end(key)
            self.hits += 1
            return item[1]
        self.misses += 1
        return None

    def put(self, p: np.ndarray, entry) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            raise CacheTooSmallError(
                f"one state (factorization, state and adjoint) takes {size / 2**20:.1f} MiB, more than the "
                f"cache limit of {self.max_bytes / 2**20:.1f} MiB; raise cache_bytes to at least {size}"
            )
        key = fingerprint(p)
        self._entries.pop(key, None)
        while self._entries and self.nbytes + size > self.max_bytes:
            _, (old_p, _) = self._entries.popitem(last=False)
            logger.debug("state cache: evicted the entry of a point with |p|=%.3g", float(np.linalg.norm(old_p)))
        self._entries[key] = (p.copy(), entry)

    def clear(self) -> None:
        self._entries.clear()
