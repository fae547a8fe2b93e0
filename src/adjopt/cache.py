"""A state cache keyed on the parameter vector, bounded in bytes (LRU).

The key is a hash of p's bytes; a stored copy of p is compared on every hit,
so a hash collision can never return another point's state. A lookup
compares p with the most recently used entry's copy first (value, gradient
and Hessian actions at one point ask for the same p in turn): a hit there
needs no hash, one pass over p instead of hashing its bytes (0.2 ms against
2.6 ms for 263k parameters); a miss computes the hash once, for the lookup
and the insertion of that (read-only) p that follows it. Entries are
evicted least-recently-used first when the total size would exceed the limit.
An entry may grow after it is stored (an AMG hierarchy of A^T is built on the
first adjoint solve); the limit is enforced again at the next insertion.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict

import numpy as np

from .errors import CacheTooSmallError

logger = logging.getLogger(__name__)


def _default_limit() -> int:
    """A quarter of the physical memory (6 GiB on a 24 GiB machine); 6 GiB where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 6 * 2**30


#: default limit of the state cache: a quarter of the physical memory
DEFAULT_CACHE_BYTES = _default_limit()


def fingerprint(p: np.ndarray) -> bytes:
    """A 16-byte hash of p's dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((p.dtype.str, p.shape)).encode())
    h.update(np.ascontiguousarray(p).data)
    return h.digest()


def _same(stored: np.ndarray, p: np.ndarray) -> bool:
    """p equals a stored copy: same dtype and shape, equal entries."""
    return stored.dtype == p.dtype and stored.shape == p.shape and bool(np.array_equal(stored, p))


class StateCache:
    """LRU map p -> entry, bounded by ``max_bytes``; entries expose ``nbytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if not max_bytes > 0:
            raise ValueError(f"cache_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, tuple[np.ndarray, object]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        #: (p, its fingerprint) of the last missed lookup: the insertion of that p reuses the hash
        self._missed = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached entries."""
        return sum(e.nbytes for _, e in self._entries.values())

    def __len__(self):
        return len(self._entries)

    def get(self, p: np.ndarray):
        if self._entries:  # the most recently used entry first, compared entry for entry (no hash)
            last_p, last = next(reversed(self._entries.values()))
            if _same(last_p, p):
                self.hits += 1
                return last
        key = fingerprint(p)
        item = self._entries.get(key)
        if item is not None and _same(item[0], p):
            self._entries.move_to_end(key)
            self.hits += 1
            return item[1]
        self.misses += 1
        self._missed = (p, key)
        return None

    def put(self, p: np.ndarray, entry) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            raise CacheTooSmallError(
                f"one state (factorization, state and adjoint) takes {size / 2**20:.1f} MiB, more than the "
                f"cache limit of {self.max_bytes / 2**20:.1f} MiB; raise cache_bytes to at least {size}"
            )
        missed, self._missed = self._missed, None
        # the hash of the lookup that missed, when this is its p and p is read-only (the functional's own copy);
        # a writable p may have changed in between (a stale hash would cost later misses, never a wrong hit:
        # a hit always compares the stored copy)
        key = missed[1] if missed is not None and missed[0] is p and not p.flags.writeable else fingerprint(p)
        self._entries.pop(key, None)
        while self._entries and self.nbytes + size > self.max_bytes:
            _, (old_p, _) = self._entries.popitem(last=False)
            self.evictions += 1
            logger.debug("state cache: evicted the entry of a point with |p|=%.3g", float(np.linalg.norm(old_p)))
        self._entries[key] = (p.copy(), entry)

    def clear(self) -> None:
        self._entries.clear()
        self._missed = None

    def entries(self):
        """The cached entries (oldest first), for a caller that must update what they hold."""
        return [entry for _, entry in self._entries.values()]

    def items(self):
        """(p, entry) pairs of the cached points (oldest first); the p's are the cache's read-only copies."""
        return list(self._entries.values())

    def info(self) -> dict:
        """Entries, bytes held, limit, hits, misses and evictions (for logs and JSON)."""
        return dict(entries=len(self), nbytes=self.nbytes, max_bytes=self.max_bytes, hits=self.hits,
                    misses=self.misses, evictions=self.evictions)

    def __str__(self):
        return (f"state cache: {len(self)} entr{'y' if len(self) == 1 else 'ies'}, {self.nbytes / 2**20:.1f} of "
                f"{self.max_bytes / 2**20:.0f} MiB; {self.hits} hits, {self.misses} misses, {self.evictions} evictions")
