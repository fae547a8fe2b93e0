"""The bound formulation of min-max problems (adjopt.optimize.minmax_problem)."""

import numpy as np
import pytest

from adjopt.errors import ShapeError
from adjopt.optimize import minimize, minmax_problem
from adjopt.optimize.minmax import BoundConstraint, DesignConstraint
from adjopt.verify import taylor_test


class Shifted:
    """f(x) = w * |x - c|^2 + k."""

    def __init__(self, c, w=1.0, k=0.0):
        self.c, self.w, self.k = np.asarray(c, float), w, k
        self.n_params = self.c.size

    def value(self, x):
        return float(self.w * np.sum((x - self.c) ** 2) + self.k)

    def gradient(self, x):
        return 2 * self.w * (x - self.c)

    def hessp(self, x, v):
        return 2 * self.w * np.asarray(v)


def test_mma_finds_the_minmax_point():
    f1, f2 = Shifted([1.0], k=1.0), Shifted([-1.0], k=1.0)
    problem = minmax_problem([f1, f2], np.array([0.7]), (-2.0, 2.0), scales=[1.0, 1.0])
    assert problem.p0.tolist() == [0.7, f2.value(np.array([0.7]))]
    res = minimize(problem, "mma", maxiter=200, gtol=1e-7, xtol=0)
    x, z = res.x[:1], res.x[1]
    # max((x - 1)^2, (x + 1)^2) + 1 is least at x = 0 with z = 2: a vertex (both bounds on z active)
    np.testing.assert_allclose(x, [0.0], atol=1e-4)
    assert z == pytest.approx(2.0, abs=1e-4) and z >= max(f1.value(x), f2.value(x)) - 1e-6


def test_design_constraints_and_default_scales():
    f1, f2 = Shifted([1.0], w=4.0), Shifted([-1.0])
    con = Shifted([0.0])
    problem = minmax_problem([f1, f2], np.array([0.5]), (-2.0, 2.0), constraints=[(con, 0.01)])
    scales = problem.meta["minmax"]["scales"]
    np.testing.assert_allclose(scales, [1.0, 2.25])  # |f_i(p0)|
    assert problem.p0[-1] == pytest.approx(1.0)
    res = minimize(problem, "mma", maxiter=300, gtol=1e-7, xtol=0)
    x = res.x[:1]
    assert con.value(x) <= 0.01 + 1e-5  # |x| <= 0.1, active: x = 0.1 minimizes max(4(x-1)^2, (x+1)^2 / 2.25)
    np.testing.assert_allclose(x, [0.1], atol=2e-3)


def test_derivatives_of_the_pieces():
    f = Shifted([0.3, -0.2, 0.1], w=2.0)
    xz = np.array([0.1, 0.4, -0.3, 0.8])
    c = BoundConstraint(f, 3.0)
    assert c.value(xz) == pytest.approx(f.value(xz[:3]) / 3.0 - 0.8)
    for piece in (c, DesignConstraint(f)):
        r = taylor_test(piece, xz, order=2)
        assert r.passed, r.table()
        r3 = taylor_test(piece, xz, order=3)
        assert r3.passed, r3.table()
    problem = minmax_problem([f], xz[:3], (-1.0, 1.0))
    J = problem.functional
    assert J.value(xz) == 0.8 and J.gradient(xz).tolist() == [0, 0, 0, 1.0] and not J.hessp(xz, xz).any()
    with pytest.raises(ShapeError, match="length 4"):
        J.value(xz[:3])


@pytest.mark.parametrize("args,kw,exc,match", [
    (([],), {}, ValueError, "at least one functional"),
    (([Shifted([0.0]), Shifted([0.0, 1.0])],), {}, ShapeError, "must share n_params"),
    (([Shifted([0.0])],), {"scales": [0.0]}, ValueError, "scales must be 1 finite numbers > 0"),
    (([Shifted([0.0])],), {"scales": [1.0, 2.0]}, ValueError, "scales must be 1 finite numbers"),
    (([Shifted([0.0], k=500.0)],), {"scales": [1.0]}, ValueError, r"must be finite and hold the start z0"),
    (([Shifted([0.0])],), {"mass": np.ones(3)}, ShapeError, r"mass must be the design's \(1,\) weights"),
])
def test_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        minmax_problem(*args, np.array([0.5]), (0.0, 1.0), **kw)


def test_checks_found_by_a_hostile_review():
    import scipy.sparse as sp

    from adjopt.maps import HeavisideProjection
    from adjopt.optimize import BetaContinuation

    f = Shifted([0.0, 1.0])
    sc = np.array([2.0])
    problem = minmax_problem([f], np.array([0.5, 0.5]), (0.0, 1.0), scales=sc)
    sc[:] = -5.0
    assert problem.meta["minmax"]["scales"].tolist() == [2.0]  # copied
    with pytest.raises(ShapeError, match="constraint 0 takes 3 parameters"):
        minmax_problem([f], np.array([0.5, 0.5]), (0.0, 1.0), constraints=[(Shifted([0.0, 0.0, 0.0]), 1.0)])
    with pytest.raises(TypeError, match="a list of \\(functional, upper\\) pairs"):
        minmax_problem([f], np.array([0.5, 0.5]), (0.0, 1.0), constraints=(Shifted([0.0, 0.0]), 1.0))
    with pytest.raises(ShapeError, match="bounds must be a \\(lower, upper\\) pair"):
        minmax_problem([f], np.array([0.5, 0.5]), (np.zeros(3), 1.0))
    with pytest.raises(TypeError, match="mass of a min-max must be"):
        minmax_problem([f], np.array([0.5, 0.5]), (0.0, 1.0), mass=sp.eye(2))
    J = problem.functional
    with pytest.raises(ShapeError):
        J.hessp(np.zeros(3), np.zeros(2))
    with pytest.raises(ShapeError, match="x and v must be vectors of length 3"):
        problem.constraints[0][0].hessp(np.zeros(3), np.zeros((3, 2)))

    class Cached(Shifted):
        cache = {}

    with pytest.raises(ValueError, match="caches states but has no forget"):
        minmax_problem([Cached([0.0, 1.0])], np.array([0.5, 0.5]), (0.0, 1.0),
                       continuation=BetaContinuation(HeavisideProjection(2)))


def test_a_capped_bound_is_not_a_success():
    f = Shifted([3.0])
    problem = minmax_problem([f], np.array([0.0]), (-1.0, 1.0), scales=[9.0], z_bounds=(0.0, 1.5))
    f.k = 100.0  # the functional grew (as compliances do when beta rises): f / 9 >= 11.6 > the bound 1.5
    res = minimize(problem, "mma", maxiter=50, gtol=0, xtol=1e-6)
    assert res.x[-1] == pytest.approx(1.5, abs=1e-3)
    assert not res.success and "constraint 0 is violated" in res.message and "z_bounds" in res.message


def test_nan_upper_bounds_are_refused():
    import adjopt

    f = Shifted([0.0])
    with pytest.raises(ValueError, match="upper bound is NaN"):
        adjopt.Problem(f, np.array([0.5]), bounds=(0.0, 1.0), constraints=[(f, float("nan"))])


def test_fields_need_a_source_and_a_failing_constraint_is_reported():
    from adjopt.optimize.minmax import MinMaxObjective

    J = MinMaxObjective(2)
    with pytest.raises(AttributeError, match="no functional to take a state from"):
        J.state(np.zeros(3))
    with pytest.raises(AttributeError, match="no functional to take an adjoint from"):
        J.adjoint(np.zeros(3))

    class Breaks(Shifted):
        broken = False

        def value(self, x):
            if Breaks.broken:  # fails only after the last iteration, where feasibility is checked
                raise RuntimeError("the solver failed")
            return super().value(x)

    import adjopt

    f = Shifted([0.0])
    problem = adjopt.Problem(f, np.array([0.5]), bounds=(-1.0, 1.0), constraints=[(Breaks([0.0]), 4.0)])
    res = minimize(problem, "mma", maxiter=50, gtol=0, xtol=0, ftol=1e-1,
                   callback=lambda info: setattr(Breaks, "broken", True))
    assert not res.success and "constraint 0 could not be evaluated at the result (RuntimeError" in res.message
