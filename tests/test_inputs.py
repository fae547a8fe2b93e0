"""Inputs that used to give a wrong number without an error (found by a hostile review); each is refused now,
or handled, with a message that says what to do."""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt.errors import NonFiniteError, PatternError, ShapeError, SingularMatrixError

N_EL = 20


def chain(coefficient="exp"):
    """1D Poisson on N_EL elements, u = 0 at both ends (N_EL - 1 free dofs)."""
    conn = np.stack([np.arange(N_EL) - 1, np.arange(N_EL)], axis=1)
    conn[-1, 1] = -1
    return adjopt.ElementCoefficientMatrix(conn, N_EL * np.array([[1.0, -1.0], [-1.0, 1.0]]), coefficient=coefficient,
                                           n=N_EL - 1)


def misfit_problem(**kw):
    B = np.zeros((5, N_EL - 1))
    B[np.arange(5), np.arange(0, 15, 3)] = 1.0
    return adjopt.ReducedFunctional(chain(), np.linspace(1, 2, N_EL - 1), adjopt.SquaredMisfit(np.linspace(0, 0.1, 5),
                                                                                                  B=B, **kw))


# -- matrices a quadratic form needs symmetric ------------------------------------------------------
def test_a_nonsymmetric_weight_matrix_is_refused():
    W = np.eye(5) + np.triu(np.ones((5, 5)), 1)
    with pytest.raises(ValueError, match=r"weight matrix W must be symmetric.*\(M \+ M.T\) / 2"):
        misfit_problem(W=W)
    J = misfit_problem(W=0.5 * (W + W.T))  # its symmetric part is accepted, and right
    assert adjopt.taylor_test(J, np.linspace(-0.3, 0.3, N_EL), order=2).passed


@pytest.mark.parametrize("term", ["l2", "h1"])
def test_a_nonsymmetric_regularization_matrix_is_refused(term):
    K = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(N_EL, N_EL)).tocsr()
    upper = sp.triu(K).tocsr()  # a triangle of a symmetric matrix (a common storage format) is not enough
    make = adjopt.TikhonovL2 if term == "l2" else adjopt.TikhonovH1
    with pytest.raises(ValueError, match="must be symmetric.*a triangle"):
        make(upper)
    make(K)


# -- complex input --------------------------------------------------------------------------------
def _complex_inputs():
    n = N_EL - 1
    b = np.linspace(1, 2, n)
    conn = np.stack([np.arange(N_EL) - 1, np.arange(N_EL)], axis=1)
    conn[-1, 1] = -1
    yield "AffineVector b0", lambda: adjopt.AffineVector(b + 1j, np.eye(n, N_EL))
    yield "AffineVector B", lambda: adjopt.AffineVector(b, np.eye(n, N_EL) * (1 + 1j))
    yield "AffineVector sparse B", lambda: adjopt.AffineVector(b, sp.csr_array(np.eye(n, N_EL) * (1 + 1j)))
    yield "ElementCoefficientVector local", lambda: adjopt.ElementCoefficientVector(conn, np.ones(2) * 1j, n=n)
    yield "ElementCoefficientVector b0", lambda: adjopt.ElementCoefficientVector(conn, np.ones(2), n=n, b0=b + 1j)
    yield "Compliance load", lambda: adjopt.Compliance(b + 5j)
    yield "SquaredMisfit sparse B", lambda: adjopt.SquaredMisfit(np.zeros(3), B=sp.csr_array(np.ones((3, n)) * 1j))
    yield "SquaredMisfit W", lambda: adjopt.SquaredMisfit(np.zeros(3), W=np.ones(3) + 1j)
    yield "TikhonovL2 p_ref", lambda: adjopt.TikhonovL2(p_ref=0.3 + 1j)
    yield "TikhonovL2 M", lambda: adjopt.TikhonovL2(sp.eye_array(n) * (1 + 1j))
    yield "ConstantMatrix", lambda: adjopt.ConstantMatrix(sp.eye_array(n) * (1 + 1j), 2)
    yield "ElementCoefficientMatrix A0", lambda: adjopt.ElementCoefficientMatrix(
        conn, np.eye(2), n=n, A0=sp.eye_array(n) * (1 + 1j))


@pytest.mark.parametrize("name,make", list(_complex_inputs()), ids=[c[0] for c in _complex_inputs()])
def test_complex_input_is_refused(name, make):
    with pytest.raises(TypeError, match="is complex"):
        make()


@pytest.mark.parametrize("sparse", [False, True])
def test_a_complex_callback_vector_jacobian_is_refused(sparse):
    n = N_EL - 1
    jac = (lambda p: sp.csr_array(np.eye(n, N_EL) * 1j)) if sparse else (lambda p: np.eye(n, N_EL) * 1j)
    b = adjopt.CallbackVector(n, N_EL, lambda p: np.ones(n), jac, affine=True)
    J = adjopt.ReducedFunctional(chain(), b, adjopt.Norm())
    with pytest.raises(TypeError, match=r"jacobian\(p\) is complex"):
        J.gradient(np.zeros(N_EL))


# -- NaN in what an objective keeps -------------------------------------------------------------------
@pytest.mark.parametrize("what", ["B", "W", "p_ref", "M"])
def test_nan_in_objective_data_is_refused_at_construction(what):
    n = N_EL - 1
    bad = {"B": lambda: adjopt.SquaredMisfit(np.zeros(2), B=np.full((2, n), np.nan)),
           "W": lambda: adjopt.SquaredMisfit(np.zeros(2), W=np.array([1.0, np.nan])),
           "p_ref": lambda: adjopt.TikhonovL2(p_ref=np.full(N_EL, np.nan)),
           "M": lambda: adjopt.TikhonovL2(sp.eye_array(N_EL) * np.nan)}[what]
    with pytest.raises(NonFiniteError):
        bad()


def test_a_value_that_is_not_finite_is_refused():
    class Overflowing(adjopt.objectives.Objective):
        def value(self, u, p):
            return float(np.sum(u)) * 1e308 * 10

    J = adjopt.ReducedFunctional(chain(), np.ones(N_EL - 1), Overflowing())
    with pytest.raises(NonFiniteError, match=r"J\(p\) = inf"):
        J.value(np.zeros(N_EL))


def test_an_overflowing_solve_is_not_called_singular():
    # p = 1e-160 with the identity coefficient: A is 1e-160 times a well-conditioned matrix; its solution
    # overflows in the adjoint solve. That is a scale problem, not a missing boundary condition
    J = adjopt.ReducedFunctional(chain("identity"), np.full(N_EL - 1, 1e-3), adjopt.SquaredMisfit(np.zeros(N_EL - 1)))
    p = np.full(N_EL, 1e-160)
    with pytest.raises(NonFiniteError, match="overflow") as exc:
        J.gradient(p)
    assert not isinstance(exc.value, SingularMatrixError)
    with pytest.raises(NonFiniteError):  # the norm of such a state overflows too
        adjopt.ReducedFunctional(chain("identity"), np.ones(N_EL - 1), adjopt.Norm()).value(p * 1e-5)


# -- counts, patterns, lengths ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1.5, True, 0, -1, "3"])
def test_callback_vector_counts_are_checked(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        adjopt.CallbackVector(bad, 2, lambda p: 0, lambda p: 0)
    with pytest.raises(ValueError, match="must be a positive integer"):
        adjopt.CallbackVector(3, bad, lambda p: 0, lambda p: 0)


def test_a_pattern_tuple_with_float_indices_is_refused():
    with pytest.raises(PatternError, match="integer arrays"):
        adjopt.CallbackMatrix((np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0]), (2, 2)), 1, lambda p: 0, lambda p: 0)


def test_element_matrix_sizes_and_connectivities_are_checked():
    conn = np.array([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        adjopt.ElementCoefficientMatrix(conn, np.eye(2), n=4.0)
    with pytest.raises(PatternError, match="every entry is negative"):
        adjopt.ElementCoefficientMatrix(-np.ones((2, 2), dtype=int), np.eye(2))


def test_a_p_ref_of_the_wrong_length_is_named():
    with pytest.raises(ShapeError, match="p_ref has length 3 but p has length 4"):
        adjopt.ParameterFunctional(adjopt.TikhonovL2(p_ref=np.ones(3)), n_params=4).value(np.zeros(4))


def test_a_parameter_functional_returns_new_arrays():
    # TikhonovL2() without a matrix: gradient p and Hessian action dp, as arrays of their own
    F = adjopt.ParameterFunctional(adjopt.TikhonovL2(), n_params=4)
    p, dp = np.arange(4.0), np.ones(4)
    g, h = F.gradient(p), F.hessp(p, dp)
    assert g is not p and not np.shares_memory(g, p) and not np.shares_memory(h, dp)
    g *= 0.5
    np.testing.assert_array_equal(p, np.arange(4.0))


# -- what a functional is made of -------------------------------------------------------------------------
def test_a_new_objective_forgets_the_cached_adjoints():
    J = misfit_problem()
    p = np.linspace(-0.3, 0.3, N_EL)
    J.gradient(p)
    B = J.objective.B
    J.objective = adjopt.SquaredMisfit(np.linspace(0, 0.5, 5), B=B)
    fresh = adjopt.ReducedFunctional(J.matrix, J.rhs, J.objective)
    np.testing.assert_allclose(J.gradient(p), fresh.gradient(p), rtol=1e-12)
    np.testing.assert_allclose(J.hessp(p, np.ones(N_EL)), fresh.hessp(p, np.ones(N_EL)), rtol=1e-12)
    assert J.stats.factorizations == 1  # the states and the factorization were kept
    with pytest.raises(TypeError, match="must be an Objective"):
        J.objective = "misfit"


def test_a_new_solver_takes_effect_at_once_and_names_are_accepted():
    J = misfit_problem()
    p = np.zeros(N_EL)
    J.value(p)
    J.solver = "amg"
    J.value(p)
    assert J.solver.name == "amg" and J.solver.stats.factorizations == 1  # not the cached SuperLU state
    with pytest.raises(ValueError, match="unknown solver"):
        J.solver = "bogus"


@pytest.mark.parametrize("attr", ["matrix", "rhs", "map"])
def test_matrix_rhs_and_map_cannot_be_replaced(attr):
    J = misfit_problem()
    with pytest.raises(AttributeError, match="build a new ReducedFunctional"):
        setattr(J, attr, None)


# -- inner products of the optimizers -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lbfgs", "newton-cg"])
def test_a_mass_matrix_that_is_not_positive_definite_is_refused(method):
    J = misfit_problem()
    mass = sp.diags_array(np.r_[np.ones(N_EL - 1), -1.0]).tocsr()
    with pytest.raises(ValueError, match="not positive definite"):
        adjopt.minimize(adjopt.Problem(J, np.zeros(N_EL), mass=mass), method=method)
    skew = sp.eye_array(N_EL).tocsr() + sp.diags_array([0.3], offsets=[1], shape=(N_EL, N_EL))
    with pytest.raises(ValueError, match="must be symmetric"):
        adjopt.minimize(adjopt.Problem(J, np.zeros(N_EL), mass=skew), method=method)
