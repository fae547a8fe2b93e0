"""DofMap / condense / lifting / require_dirichlet."""

import numpy as np
import pytest

import adjopt.fem as F
from adjopt.errors import ShapeError
from adjopt.mesh import unit_square


def test_condense_bookkeeping():
    dm = F.condense(6, [4, 1, 4], [2.0, -1.0, 2.0])
    np.testing.assert_array_equal(dm.fixed, [1, 4])
    np.testing.assert_array_equal(dm.values, [-1.0, 2.0])
    np.testing.assert_array_equal(dm.free, [0, 2, 3, 5])
    assert dm.n_free == 4 and dm.n_dofs == 6
    np.testing.assert_array_equal(dm.full_to_free, [0, -1, 1, 2, -1, 3])
    np.testing.assert_array_equal(dm.prescribed, [0, -1.0, 0, 0, 2.0, 0])
    assert repr(dm) == "DofMap(n_dofs=6, n_free=4, n_fixed=2)"


def test_condense_defaults_and_scalar_values():
    dm = F.condense(3, [2])
    np.testing.assert_array_equal(dm.values, [0.0])
    dm = F.condense(4, np.array([0, 3]), 5.0)
    np.testing.assert_array_equal(dm.values, [5.0, 5.0])
    dm = F.condense(3, [])
    assert dm.n_free == 3 and dm.fixed.size == 0


def test_restrict_expand():
    dm = F.condense(5, [0, 3], [1.0, 7.0])
    conn = np.array([[0, 1, 2], [2, 3, 4]])
    np.testing.assert_array_equal(dm.restrict(conn), [[-1, 0, 1], [1, -1, 2]])
    np.testing.assert_array_equal(dm.restrict(np.array([[-1, 4]])), [[-1, 2]])
    np.testing.assert_array_equal(dm.expand(np.array([10.0, 20.0, 30.0])), [1.0, 10.0, 20.0, 7.0, 30.0])
    U = dm.expand(np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(U, [[1, 1], [0, 1], [2, 3], [7, 7], [4, 5]])
    np.testing.assert_array_equal(dm.restrict_vector(np.arange(5.0)), [1, 2, 4])


def test_lifting_equals_minus_kfd_g():
    m = unit_square(3)
    K = F.p1_stiffness(m)
    fixed = m.boundary("left")
    g = 1.0 + m.points[fixed, 1] ** 2
    dm = F.condense(m.n_nodes, fixed, g)
    lift = dm.lifting(m.cells, K)
    assert lift.shape == K.shape[:2]
    A = F.assemble(m.cells, K, m.n_nodes).toarray()
    expected = -A[np.ix_(dm.free, dm.fixed)] @ dm.values
    np.testing.assert_allclose(F.assemble_vector(dm.restrict(m.cells), lift, dm.n_free), expected, atol=1e-14)
    # rows of fixed dofs are zero
    assert np.all(lift[dm.is_fixed[m.cells]] == 0)
    Af, b = dm.system(m.cells, K, np.ones(m.n_nodes))
    np.testing.assert_allclose(Af.toarray(), A[np.ix_(dm.free, dm.free)], atol=1e-15)
    np.testing.assert_allclose(b, expected + 1.0, atol=1e-14)


def test_homogeneous_lifting_is_zero():
    m = unit_square(2)
    dm = F.condense(m.n_nodes, m.boundary("all"))
    assert not np.any(dm.lifting(m.cells, F.p1_stiffness(m)))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: F.condense(4, [0, 4]), F.FemError, r"fixed dof 4 is outside \[0, 3\]"),
        (lambda: F.condense(4, [-1]), F.FemError, "fixed dof -1 is outside"),
        (lambda: F.condense(4, [1, 2, 1], [0.0, 1.0, 3.0]), F.FemError,
         "dof 1 is prescribed twice with different values 0.0 and 3.0"),
        (lambda: F.condense(4, [0.5]), F.FemError, "must be integers"),
        (lambda: F.condense(4, [0, 1], [1.0]), ShapeError, "values has 1 entries but fixed_dofs has 2"),
        (lambda: F.condense(4, [0], [np.nan]), F.FemError, "NaN or Inf"),
        (lambda: F.condense(2.5, [0]), F.FemError, "n_dofs must be a non-negative integer"),
    ],
)
def test_condense_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_dofmap_method_errors():
    dm = F.condense(4, [0], [1.0])
    with pytest.raises(ShapeError, match=r"u_free must have shape \(3,\) or \(3, m\)"):
        dm.expand(np.zeros(4))
    with pytest.raises(ShapeError, match=r"expected shape \(4,\)"):
        dm.restrict_vector(np.zeros(3))
    conn = np.array([[0, 1], [1, 2]])
    with pytest.raises(ShapeError, match=r"local matrices must have shape \(2, 2, 2\)"):
        dm.lifting(conn, np.zeros((2, 3, 3)))
    with pytest.raises(F.FemError, match="full connectivity"):
        dm.lifting(np.array([[-1, 1]]), np.zeros((1, 2, 2)))
    with pytest.raises(F.FemError, match=">= n = 4"):
        dm.restrict(np.array([[0, 7]]))
    with pytest.raises(ShapeError, match=r"f must have shape \(4,\)"):
        dm.system(conn, np.zeros((2, 2, 2)), np.zeros(3))


def test_require_dirichlet():
    msg = "Poisson: .*pure-Neumann problem is singular: give a Dirichlet boundary, e.g. dirichlet='left'"
    with pytest.raises(F.SingularProblemError, match=msg):
        F.require_dirichlet([])
    with pytest.raises(ValueError, match="elasticity"):
        F.require_dirichlet(np.array([], dtype=int), what="elasticity")
    np.testing.assert_array_equal(F.require_dirichlet([3, 1]), [3, 1])
