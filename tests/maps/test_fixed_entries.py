"""FixedEntries: passive entries of a field (fixed values), reduced or overwriting."""

import numpy as np
import pytest

from adjopt.errors import PatternError, ShapeError
from adjopt.maps import DensityFilter, FixedEntries, HeavisideProjection, compose


def _dense(m: FixedEntries) -> np.ndarray:
    """The Jacobian column by column."""
    return np.column_stack([m.jvp(np.zeros(m.n_in), e) for e in np.eye(m.n_in)])


@pytest.mark.parametrize("reduced", [True, False])
def test_forward_jvp_vjp_and_blocks(reduced):
    m = FixedEntries(6, [4, 1], [1.0, 0.25], reduced=reduced)  # unsorted index: values follow their entries
    assert (m.n_in, m.n_out) == ((4, 6) if reduced else (6, 6))
    np.testing.assert_array_equal(m.free, [0, 2, 3, 5])
    p = np.arange(1.0, m.n_in + 1)
    out = m.forward(p)
    assert out[1] == 0.25 and out[4] == 1.0
    np.testing.assert_array_equal(out[m.free], p if reduced else p[m.free])
    D = _dense(m)
    g = np.linspace(-1, 2, 6)
    np.testing.assert_array_equal(m.vjp(p, g), D.T @ g)
    assert np.all(D[[1, 4]] == 0)
    G = np.random.default_rng(0).standard_normal((6, 3))
    dP = np.random.default_rng(1).standard_normal((m.n_in, 3))
    np.testing.assert_array_equal(m.jvp_block(p, dP), D @ dP)
    np.testing.assert_array_equal(m.vjp_block(p, G), D.T @ G)
    np.testing.assert_array_equal(m.second(p, g, p), np.zeros(m.n_in))
    assert m.affine
    # the caller's arrays are not kept: a change after construction does not move the fixed values
    idx, vals = np.array([2]), np.array([0.5])
    k = FixedEntries(3, idx, vals)
    idx[0], vals[0] = 0, 9.0
    np.testing.assert_array_equal(k.forward([7.0, 8.0]), [7.0, 8.0, 0.5])


def test_in_a_chain_the_passive_values_survive_filter_and_projection():
    centers = np.column_stack([np.arange(8) + 0.5, np.full(8, 0.5)])
    chain = compose(FixedEntries(8, [0, 7], [1.0, 0.0]), DensityFilter(centers, 2.5),
                    HeavisideProjection(8, beta=4.0), FixedEntries(8, [0, 7], [1.0, 0.0], reduced=False))
    rho = chain.forward(np.full(6, 0.5))
    assert rho[0] == 1.0 and rho[7] == 0.0 and np.all((rho[1:7] > 0) & (rho[1:7] < 1))
    # a first derivative through the chain by central differences
    p, dp = np.full(6, 0.4), np.random.default_rng(3).standard_normal(6)
    fd = (chain.forward(p + 1e-6 * dp) - chain.forward(p - 1e-6 * dp)) / 2e-6
    np.testing.assert_allclose(chain.jvp(p, dp), fd, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("args,exc,match", [
    ((4, [4], 1.0), PatternError, r"index must lie in \[0, 4\)"),
    ((4, [-1], 1.0), PatternError, r"index must lie in \[0, 4\)"),
    ((4, [1, 1], 1.0), PatternError, "index repeats position 1"),
    ((4, [0.5], 1.0), PatternError, "index must be a 1-D array of integer positions"),
    ((4, [[1]], 1.0), PatternError, "index must be a 1-D array"),
    ((2, [0, 1], 1.0), PatternError, "every entry is fixed"),
    ((4, [1], np.nan), ValueError, "fixed values must be finite"),
    ((4, [1, 2], [1.0, 2.0, 3.0]), ValueError, "values must be a scalar or one per index"),
])
def test_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        FixedEntries(*args)


def test_flag_and_shapes_are_checked():
    with pytest.raises(TypeError, match="reduced must be True or False"):
        FixedEntries(4, [1], 0.0, reduced="no")
    m = FixedEntries(4, [1], 0.0)
    with pytest.raises(ShapeError):
        m.forward(np.zeros(4))
    with pytest.raises(ShapeError):
        m.vjp(np.zeros(3), np.zeros(3))
    assert FixedEntries(3, [], []).forward([1.0, 2.0, 3.0]).tolist() == [1.0, 2.0, 3.0]


def test_density_filter_void_outside():
    centers = np.column_stack([np.arange(6) + 0.5, np.full(6, 0.5)])
    plain = DensityFilter(centers, 2.0)
    padded = DensityFilter(centers, 2.0, void_outside=[4, 5])
    mask = np.zeros(6, dtype=bool)
    mask[[5, 4]] = True
    np.testing.assert_array_equal(DensityFilter(centers, 2.0, void_outside=mask).L.toarray(), padded.L.toarray())
    ones = np.ones(6)
    np.testing.assert_allclose(plain.forward(ones), ones)
    # an interior row sums to 2 + 2 * 1 = 4 (the largest); the end row 5 to 3: divided by 4 it sums to 3 / 4
    np.testing.assert_allclose(padded.forward(ones), [1, 1, 1, 1, 1, 0.75])
    np.testing.assert_allclose(padded.L.toarray()[:4], plain.L.toarray()[:4])
    for bad, exc in (([6], PatternError), ([0.5], PatternError), (np.ones(3, dtype=bool), ShapeError)):
        with pytest.raises(exc, match="void_outside"):
            DensityFilter(centers, 2.0, void_outside=bad)


def test_tied_entries():
    from adjopt.maps import TiedEntries

    idx = np.array([0, 1, 1, 0, 2])
    m = TiedEntries(idx)
    idx[0] = 2  # the map keeps its own copy
    p = np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(m.forward(p), [1, 2, 2, 1, 3])
    g = np.array([1.0, 10.0, 100.0, 1000.0, 5.0])
    np.testing.assert_array_equal(m.vjp(p, g), [1001.0, 110.0, 5.0])
    D = np.column_stack([m.jvp(p, e) for e in np.eye(3)])
    G = np.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(m.vjp_block(p, G), D.T @ G)
    np.testing.assert_array_equal(m.jvp_block(p, np.eye(3)), D)
    with pytest.raises(PatternError, match="parameter 1 is tied to no entry"):
        TiedEntries([0, 2, 2])
    with pytest.raises(PatternError, match=r"index must lie in \[0, 2\)"):
        TiedEntries([0, 2], m=2)
    with pytest.raises(PatternError, match="non-empty 1-D integer"):
        TiedEntries([0.0, 1.0])


def test_element_indices():
    from adjopt.maps import element_indices

    np.testing.assert_array_equal(element_indices([5, 1, 5], 6), [1, 5])
    np.testing.assert_array_equal(element_indices(np.array([True, False, True]), 3), [0, 2])
    with pytest.raises(PatternError, match="an integer array of 0s and 1s, one per element: a mask"):
        element_indices([0, 1, 1, 0], 4)
    with pytest.raises(PatternError, match=r"in \[0, 4\)"):
        element_indices([4], 4)
    with pytest.raises(ShapeError, match="one entry per element"):
        element_indices(np.ones(3, dtype=bool), 4)


@pytest.mark.parametrize("n", [5.7, 0, True])
def test_fixed_entries_length_must_be_a_count(n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        FixedEntries(n, [0], 1.0)
