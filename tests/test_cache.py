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


def test_cache_reports_its_size_and_evictions():
    c = StateCache(max_bytes=250)
    for k in range(4):
        c.put(np.full(2, float(k)), Item(100))
    info = c.info()
    assert info == dict(entries=2, nbytes=200, max_bytes=250, hits=0, misses=0, evictions=2)
    assert "2 entries" in str(c) and "2 evictions" in str(c)


def test_default_limit_is_a_quarter_of_the_memory():
    import os

    from adjopt.cache import DEFAULT_CACHE_BYTES

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert DEFAULT_CACHE_BYTES == total // 4


def test_lru_keeps_a_bounded_number_of_factorizations_in_a_long_run():
    conn = np.array([[0, 1], [1, 2]])
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[2.0, -1.0], [-1.0, 2.0]]))
    J = adjopt.ReducedFunctional(A, np.ones(3), adjopt.Norm(), solver="superlu")
    J.value(np.ones(2))
    one = J.cache.nbytes
    J = adjopt.ReducedFunctional(A, np.ones(3), adjopt.Norm(), solver="superlu", cache_bytes=3 * one)
    for k in range(10):
        J.gradient(np.full(2, 1.0 + k))
    # only the 2 most recently used points hold a factorization: the older ones are smaller, so more fit
    assert J.cache.nbytes <= 3 * one and 3 <= len(J.cache) < 10 and J.cache.evictions == 10 - len(J.cache)
    assert sum(st.factorization is not None for st in J.cache.entries()) == 2
    J.value(np.full(2, 10.0))  # the most recent point is still cached: no new factorization
    assert J.stats.factorizations == 10


def test_an_older_point_is_factorized_again_only_when_a_solve_needs_it():
    conn = np.array([[0, 1], [1, 2]])
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[2.0, -1.0], [-1.0, 2.0]]), coefficient="exp")
    J = adjopt.ReducedFunctional(A, np.ones(3), adjopt.SquaredMisfit(np.zeros(3)), solver="superlu")
    points = [np.full(2, 0.1 * k) for k in range(4)]
    grads = [J.gradient(p).copy() for p in points]
    assert J.stats.factorizations == 4
    np.testing.assert_array_equal(J.gradient(points[0]), grads[0])  # u and lam cached: no solve needed
    assert J.stats.factorizations == 4
    h = J.hessp(points[0], np.ones(2))  # two solves at an old point: factorized again, once
    assert J.stats.factorizations == 5
    fresh = adjopt.ReducedFunctional(A, np.ones(3), adjopt.SquaredMisfit(np.zeros(3)), solver="superlu")
    np.testing.assert_array_equal(h, fresh.hessp(points[0], np.ones(2)))
    with pytest.raises(ValueError, match="keep_factorizations must be a positive integer"):
        adjopt.ReducedFunctional(A, np.ones(3), adjopt.Norm(), keep_factorizations=0)


def test_cholmod_refactorizes_in_the_memory_of_a_released_factorization():
    pytest.importorskip("sksparse.cholmod")
    conn = np.array([[0, 1], [1, 2], [2, 3]])
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[2.0, -1.0], [-1.0, 2.0]]), coefficient="exp")
    J = adjopt.ReducedFunctional(A, np.ones(4), adjopt.SquaredMisfit(np.zeros(4)), solver="cholmod",
                                 keep_factorizations=1)
    J.value(np.zeros(3))
    factor = J._use(J._state(J._p(np.zeros(3)))).factor
    g = J.gradient(np.full(3, 0.5))  # the first point's factor is recycled for this one
    assert J._use(J._state(J._p(np.full(3, 0.5)))).factor is factor
    fresh = adjopt.ReducedFunctional(A, np.ones(4), adjopt.SquaredMisfit(np.zeros(4)), solver="superlu")
    np.testing.assert_allclose(g, fresh.gradient(np.full(3, 0.5)), rtol=1e-12)
    np.testing.assert_allclose(J.gradient(np.zeros(3)), fresh.gradient(np.zeros(3)), rtol=1e-12)


def test_a_lookup_of_the_most_recent_point_needs_no_hash(monkeypatch):
    import adjopt.cache as cache_mod

    hashed = []
    real = cache_mod.fingerprint
    monkeypatch.setattr(cache_mod, "fingerprint", lambda p: hashed.append(p.copy()) or real(p))
    c = StateCache(max_bytes=1000)
    p1, p2 = np.linspace(0.0, 1.0, 5), np.linspace(1.0, 2.0, 5)
    p1.flags.writeable = False  # the functional's points are read-only copies
    assert c.get(p1) is None and len(hashed) == 1  # a miss hashes p once ...
    c.put(p1, Item(1))
    assert len(hashed) == 1  # ... and the insertion of that (read-only) p reuses the hash
    a = c.get(p1.copy())  # an equal copy of the most recent point: compared, not hashed
    assert a is not None and len(hashed) == 1 and c.hits == 1
    assert c.get(p2) is None and len(hashed) == 2
    c.put(p2, Item(2))  # writable: hashed again (it may have changed since the lookup)
    assert len(hashed) == 3
    assert c.get(p1).nbytes == 1 and len(hashed) == 4  # not the most recent: found through its hash
    assert c.get(p1).nbytes == 1 and len(hashed) == 4  # now it is the most recent again
    assert c.get(p2).nbytes == 2 and len(hashed) == 5
    assert c.hits == 4 and c.misses == 2


def test_the_fast_path_compares_every_entry_and_the_dtype():
    c = StateCache(max_bytes=1000)
    p = np.arange(4.0)
    c.put(p, Item(1))
    q = p.copy()
    q[-1] = np.nextafter(q[-1], 10.0)  # one ulp away in the last entry
    assert c.get(q) is None
    assert c.get(np.arange(4)) is None  # equal values, another dtype: another point
    assert c.get(p[:3]) is None  # a prefix
    assert c.get(p.copy()) is not None


def test_a_p_changed_between_lookup_and_insertion_is_stored_under_its_new_values():
    c = StateCache(max_bytes=1000)
    p = np.zeros(3)
    assert c.get(p) is None
    p[0] = 1.0  # the caller changed p in place before inserting it: it is hashed again
    c.put(p, Item(1))
    c.put(np.full(3, 5.0), Item(2))  # p is no longer the most recent entry: found through its hash only
    assert c.get(np.zeros(3)) is None
    assert c.get(np.array([1.0, 0.0, 0.0])).nbytes == 1


def test_the_functional_hashes_a_point_once_for_value_gradient_and_hessp(monkeypatch):
    import adjopt.cache as cache_mod

    hashed = []
    real = cache_mod.fingerprint
    monkeypatch.setattr(cache_mod, "fingerprint", lambda p: hashed.append(1) or real(p))
    conn = np.array([[0, 1], [1, 2]])
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[2.0, -1.0], [-1.0, 2.0]]), coefficient="exp",
                                        A0=np.eye(3))
    J = adjopt.ReducedFunctional(A, np.ones(3), adjopt.SquaredMisfit(np.zeros(3)), solver="superlu")
    p = np.array([0.1, -0.2])
    v = J.value(p)
    g = J.gradient(p)
    h = J.hessp(p, np.array([1.0, 0.5]))
    assert len(hashed) == 1 and J.cache.hits == 2 and J.cache.misses == 1
    # the same numbers as a functional that hashes every time
    monkeypatch.undo()
    K = adjopt.ReducedFunctional(A, np.ones(3), adjopt.SquaredMisfit(np.zeros(3)), solver="superlu")
    K.cache.get = lambda q, _get=K.cache.get: (K.cache._entries.clear(), None)[1]  # no hits at all
    assert K.value(p) == v
    np.testing.assert_array_equal(K.gradient(p), g)
    np.testing.assert_allclose(K.hessp(p, np.array([1.0, 0.5])), h, rtol=1e-14)
