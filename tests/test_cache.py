"""StateCache: keyed on p, LRU, bounded in bytes."""

from dataclasses import dataclass

import numpy as np
import pytest

import adjopt
from adjopt.cache import StateCache, fingerprint


@dataclass
class Item:
    nbytes: int


def test_hit_needs_equal_p_and_lru_eviction():
    c = StateCache(max_bytes=250)
    p1, p2, p3 = np.zeros(3), np.ones(3), np.full(3, 2.0)
    c.put(p1, Item(100))
    c.put(p2, Item(100))
    assert c.get(p1).nbytes == 100  # p1 is now the most recent
    c.put(p3, Item(100))  # evicts p2, the least recently used
    assert c.get(p2) is None and c.get(p1) is not None and c.get(p3) is not None
    assert c.nbytes == 200 and len(c) == 2
    assert c.hits == 3 and c.misses == 1
    c.clear()
    assert len(c) == 0


def test_fingerprint_depends_on_values_and_shape():
    assert fingerprint(np.zeros(2)) != fingerprint(np.zeros(3))
    assert fingerprint(np.zeros(2)) != fingerprint(np.array([0.0, 1e-300]))
    assert fingerprint(np.arange(3.0)) == fingerprint(np.arange(3.0))


def test_a_forged_collision_is_not_a_hit():
    c = StateCache(max_bytes=1000)
    c.put(np.zeros(2), Item(1))
    key = next(iter(c._entries))
    # forge: put another point's copy under the same key
    c._entries[key] = (np.ones(2), Item(1))
    assert c.get(np.zeros(2)) is None


def test_limit_below_one_entry_is_a_clear_error():
    c = StateCache(max_bytes=10)
    with pytest.raises(adjopt.CacheTooSmallError, match="raise cache_bytes"):
        c.put(np.zeros(2), Item(11))
    with pytest.raises(ValueError, match="positive"):
        StateCache(0)


def test_functional_cache_limit_is_enforced():
    conn = np.array([[0, 1], [1, 2]])
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[2.0, -1.0], [-1.0, 2.0]]))
    J = adjopt.ReducedFunctional(A, np.ones(3), adjopt.Norm(), cache_bytes=64)
    with pytest.raises(adjopt.CacheTooSmallError):
        J.value(np.ones(2))
    J = adjopt.ReducedFunctional(A, np.ones(3), adjopt.Norm())
    for k in range(4):
        J.value(np.full(2, 1.0 + k))
    assert len(J.cache) == 4 and J.cache.nbytes > 0
