"""Parameter maps: Taylor rates of each map and of compositions, and inside a ReducedFunctional."""

import numpy as np
import pytest
from problems_random import element_case

import adjopt
from adjopt.maps import (
    DensityFilter,
    ExpMap,
    HeavisideProjection,
    IdentityMap,
    NodalToElement,
    SIMPMap,
    compose,
)
from adjopt.verify import check_hessian_symmetry, taylor_test


class ThroughMap:
    """J(p) = 0.5 |M(p)|^2 + c . M(p): grad = M'^T (M + c), H dp = M'^T M' dp + M''[M + c, dp]."""

    def __init__(self, M, seed=0):
        self.M = M
        self.c = np.random.default_rng(seed).standard_normal(M.n_out)

    def value(self, p):
        r = self.M.forward(p)
        return 0.5 * r @ r + self.c @ r

    def gradient(self, p):
        return self.M.vjp(p, self.M.forward(p) + self.c)

    def hessp(self, p, dp):
        g = self.M.forward(p) + self.c
        out = self.M.vjp(p, self.M.jvp(p, dp))
        return out if self.M.affine else out + self.M.second(p, g, dp)


def _grid(nx=6, ny=5):
    x, y = np.meshgrid(np.arange(nx) + 0.5, np.arange(ny) + 0.5)
    return np.column_stack([x.ravel(), y.ravel()])


def _cells(nx=6, ny=5):
    # quads of an (nx+1) x (ny+1) node grid
    i, j = np.meshgrid(np.arange(nx), np.arange(ny))
    n0 = (j * (nx + 1) + i).ravel()
    return np.column_stack([n0, n0 + 1, n0 + nx + 2, n0 + nx + 1])


MAPS = {
    "exp": lambda: ExpMap(30),
    "simp": lambda: SIMPMap(30, q=3, emin=1e-3),
    "heaviside": lambda: HeavisideProjection(30, beta=4.0, eta=0.4),
    "filter": lambda: DensityFilter(_grid(), radius=1.6),
    "nodal-to-element": lambda: NodalToElement(_cells(), mode="average"),
    "filter-heaviside-simp": lambda: compose(
        DensityFilter(_grid(), 1.6), HeavisideProjection(30, beta=3.0), SIMPMap(30, q=3, emin=1e-3)
    ),
    "nodal-exp": lambda: compose(NodalToElement(_cells()), ExpMap(30)),
}


@pytest.mark.parametrize("name", sorted(MAPS))
def test_map_taylor_rates(name):
    M = MAPS[name]()
    rng = np.random.default_rng(1)
    p = rng.uniform(0.2, 0.8, M.n_in)
    J = ThroughMap(M)
    r2 = taylor_test(J, p, order=2)
    r3 = taylor_test(J, p, order=3)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    assert r3.passed and (r3.exact or r3.rate >= 2.9), r3.table()
    assert check_hessian_symmetry(J, p) < 1e-12


def test_density_filter_rows_sum_to_one_and_weights():
    F = DensityFilter(_grid(), radius=1.5)
    np.testing.assert_allclose(F.L.sum(axis=1), 1.0)
    # interior element: itself (weight 1.5), 4 neighbours at distance 1 (0.5), 4 at sqrt(2) (1.5 - sqrt 2)
    row = F.L[[2 * 6 + 2]].toarray().ravel()
    assert np.count_nonzero(row) == 9
    np.testing.assert_allclose(row.max() / row[row > 0].min(), 1.5 / (1.5 - np.sqrt(2)))
    np.testing.assert_allclose(row.sum(), 1.0)
    np.testing.assert_allclose(F.forward(np.ones(30)), 1.0)
    Fv = DensityFilter(_grid(), radius=1.5, volumes=np.full(30, 2.0))
    np.testing.assert_allclose(Fv.L.toarray(), F.L.toarray())


def test_heaviside_and_nodal_values():
    H = HeavisideProjection(3, beta=8.0, eta=0.5)
    np.testing.assert_allclose(H.forward(np.array([0.0, 0.5, 1.0])), [0.0, 0.5, 1.0], atol=1e-15)
    N = NodalToElement(np.array([[0, 1, 2], [1, 2, 3]]), mode="integrate", volumes=np.array([2.0, 4.0]))
    np.testing.assert_allclose(N.forward(np.array([3.0, 0.0, 0.0, 3.0])), [2.0, 4.0])


def test_composition_equals_manual_chain():
    F, P = DensityFilter(_grid(), 1.6), HeavisideProjection(30, beta=2.0)
    C = compose(F, P)
    p = np.random.default_rng(3).uniform(0, 1, 30)
    np.testing.assert_allclose(C.forward(p), P.forward(F.forward(p)))
    g = np.ones(30)
    np.testing.assert_allclose(C.vjp(p, g), F.vjp(p, P.vjp(F.forward(p), g)))
    assert compose(F) is F
    assert "DensityFilter" in repr(C)


def test_functional_with_map_taylor_and_dense():
    # filter -> projection -> matrix with SIMP coefficient, and exp of nodal values
    case = element_case(21, n=10, n_elem=6, coefficient="simp", rhs="affine")
    base = case.functional
    centers = np.random.default_rng(0).uniform(0, 2, (6, 2))
    M = compose(DensityFilter(centers, 1.0), HeavisideProjection(6, beta=2.0))
    J = adjopt.ReducedFunctional(base.matrix, base.rhs, base.objective, parameter_map=M)
    p = np.random.default_rng(1).uniform(0.3, 0.9, 6)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9
    assert check_hessian_symmetry(J, p) < 1e-10
    # the PDE part through the map equals the unmapped functional at rho = M(p)
    J_plain = adjopt.ReducedFunctional(base.matrix, base.rhs, adjopt.SquaredMisfit(np.zeros(8), B=np.eye(8, 10)))
    J_map = adjopt.ReducedFunctional(base.matrix, base.rhs, adjopt.SquaredMisfit(np.zeros(8), B=np.eye(8, 10)),
                                     parameter_map=M)
    rho = M.forward(p)
    assert J_map.value(p) == pytest.approx(J_plain.value(rho), rel=1e-14)
    np.testing.assert_allclose(J_map.gradient(p), M.vjp(p, J_plain.gradient(rho)), rtol=1e-12)


def test_map_bad_input():
    with pytest.raises(adjopt.PatternError, match="cannot compose"):
        compose(ExpMap(3), ExpMap(4))
    with pytest.raises(ValueError, match="at least one"):
        adjopt.maps.Compose([])
    with pytest.raises(adjopt.ShapeError, match="length 3"):
        ExpMap(3).forward(np.ones(4))
    with pytest.raises(adjopt.ShapeError, match="output"):
        ExpMap(3).vjp(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="radius"):
        DensityFilter(_grid(), 0.0)
    with pytest.raises(adjopt.ShapeError, match="volumes"):
        DensityFilter(_grid(), 1.0, volumes=np.ones(3))
    with pytest.raises(adjopt.ShapeError, match="centers"):
        DensityFilter(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="beta"):
        HeavisideProjection(3, beta=0.0)
    with pytest.raises(ValueError, match="eta"):
        HeavisideProjection(3, eta=2.0)
    with pytest.raises(ValueError, match="unknown mode"):
        NodalToElement(_cells(), mode="max")
    with pytest.raises(ValueError, match="volumes"):
        NodalToElement(_cells(), mode="integrate")
    with pytest.raises(adjopt.PatternError, match="cells"):
        NodalToElement(np.arange(3))
    case = element_case(22)
    with pytest.raises(adjopt.PatternError, match="parameter map produces 5"):
        adjopt.ReducedFunctional(case.functional.matrix, np.ones(8), adjopt.Norm(), parameter_map=IdentityMap(5))
    J = adjopt.ReducedFunctional(case.functional.matrix, np.ones(8), adjopt.Norm(), parameter_map=IdentityMap(6))
    with pytest.raises(adjopt.ShapeError, match="length 6"):
        J.value(np.ones(5))
