"""ReducedFunctional.with_objective: several objectives on one state and one factorization per design."""

import os
import sys

import numpy as np
import pytest
from problems_random import element_case

import adjopt
from adjopt.maps import HeavisideProjection
from adjopt.verify import taylor_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import topology_stress as ts  # noqa: E402


def _pair(seed=4, **kw):
    """A nonsymmetric random element problem with its misfit objective, and a second objective f = w^T u."""
    case = element_case(seed, n=9, n_elem=7, k_loc=3, **kw)
    J = case.functional
    w = np.random.default_rng(seed + 1).standard_normal(9)
    return J, adjopt.Compliance(w), case.p


def test_a_sibling_gives_what_a_separate_functional_gives():
    J, obj, p = _pair()
    S = J.with_objective(obj)
    ref = adjopt.ReducedFunctional(J.matrix, J.rhs, obj, solver="superlu")
    assert S.value(p) == pytest.approx(ref.value(p), rel=1e-13)
    np.testing.assert_allclose(S.gradient(p), ref.gradient(p), rtol=1e-11, atol=1e-13)
    v = np.random.default_rng(2).standard_normal(p.size)
    np.testing.assert_allclose(S.hessp(p, v), ref.hessp(p, v), rtol=1e-10, atol=1e-12)
    # the first one is unchanged by its sibling's adjoints
    ref_J = adjopt.ReducedFunctional(J.matrix, J.rhs, J.objective, solver="superlu")
    np.testing.assert_allclose(J.gradient(p), ref_J.gradient(p), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(J.hessp(p, v), ref_J.hessp(p, v), rtol=1e-10, atol=1e-12)
    assert taylor_test(S, p, order=2).rate >= 1.9
    assert taylor_test(S, p, order=3).rate >= 2.9


def test_one_factorization_and_one_forward_solve_serve_both():
    J, obj, p = _pair()
    S = J.with_objective(obj)
    assert S.solver is J.solver and S.matrix is J.matrix and S.map is J.map
    J.reset_stats()
    S.value(p)
    J.value(p)
    S.gradient(p)
    J.gradient(p)
    st = J.stats
    assert st.factorizations == 1
    assert st.solves["forward"] == 1 and st.solves["adjoint"] == 2  # one adjoint each
    # a sibling of a sibling shares the first one's states too
    T = S.with_objective(adjopt.Compliance(np.ones(9)))
    T.gradient(p)
    assert st.factorizations == 1 and st.solves["forward"] == 1


def test_interleaved_points_and_released_factorizations():
    J, obj, p = _pair()
    S = J.with_objective(obj)
    ref = adjopt.ReducedFunctional(J.matrix, J.rhs, obj, solver="superlu")
    points = [p, p + 0.1, p - 0.05, p]  # more points than keep_factorizations (2): some are factorized again
    v = np.linspace(-1, 1, p.size)
    for q in points:
        J.gradient(q)
        np.testing.assert_allclose(S.hessp(q, v), ref.hessp(q, v), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(S.gradient(q), ref.gradient(q), rtol=1e-11, atol=1e-13)


def test_in_place_changes_of_p_do_not_reach_the_shared_cache():
    J, obj, p = _pair()
    S = J.with_objective(obj)
    ref = adjopt.ReducedFunctional(J.matrix, J.rhs, obj, solver="superlu")
    q = p.copy()
    a = S.value(q)
    q += 0.2  # the caller reuses its array
    assert S.value(q) == pytest.approx(ref.value(q), rel=1e-13)
    assert S.value(p) == pytest.approx(a, rel=1e-15)


def test_forget_and_a_changed_map_reach_both():
    n = 7
    case = element_case(5, n=9, n_elem=n, k_loc=3, coefficient="simp")
    proj = HeavisideProjection(n, beta=2.0)
    J = adjopt.ReducedFunctional(case.functional.matrix, case.functional.rhs, case.functional.objective,
                                 parameter_map=proj, solver="superlu")
    S = J.with_objective(adjopt.Compliance(np.ones(9)))
    p = case.p
    before = S.value(p)
    proj.beta = 8.0  # in place: the same p is another rho
    fresh = adjopt.ReducedFunctional(J.matrix, J.rhs, adjopt.Compliance(np.ones(9)), parameter_map=proj,
                                     solver="superlu")
    assert S.value(p) == pytest.approx(fresh.value(p), rel=1e-13) and S.value(p) != before
    J.reset_stats()
    S.forget()  # drops the states of the first one as well
    J.value(p)
    assert J.stats.factorizations == 1


def test_a_new_objective_forgets_only_its_own_adjoints():
    J, obj, p = _pair()
    S = J.with_objective(obj)
    J.gradient(p)
    S.gradient(p)
    J.reset_stats()
    S.objective = adjopt.Compliance(np.arange(9.0))
    ref = adjopt.ReducedFunctional(J.matrix, J.rhs, adjopt.Compliance(np.arange(9.0)), solver="superlu")
    np.testing.assert_allclose(S.gradient(p), ref.gradient(p), rtol=1e-11, atol=1e-13)
    J.gradient(p)  # still cached
    assert J.stats.factorizations == 0 and J.stats.solves["adjoint"] == 1  # S's new adjoint only


def test_refusals():
    J, obj, p = _pair()
    S = J.with_objective(obj)
    with pytest.raises(AttributeError, match="shares the states of another"):
        S.solver = "superlu"
    with pytest.raises(TypeError, match="objective must be an Objective"):
        J.with_objective("compliance")


def test_the_stress_problem_factorizes_once_per_design():
    problem = ts.build("lbracket", 20, 20, compliance_max=5.0, normalization="fixed")
    (G, _), (C, _) = problem.constraints
    assert C.solver is G.solver
    G.reset_stats()
    res = adjopt.minimize(problem, "mma", move=0.1, maxiter=5, gtol=0, xtol=0)
    assert res.nit == 5
    # one factorization and one forward solve per design; the stress adjoint solve; the compliance none
    assert G.stats.factorizations == 6 and G.stats.solves["forward"] == 6 and G.stats.solves["adjoint"] == 6
    # the run reports them although its objective (the volume) solves nothing: the constraints' solver counts,
    # each solver once, and their phases
    assert res.factorizations == 6 and res.solves == 12
    assert all(e["phases"].get("factorize", 0) > 0 for e in res.history[1:])


def test_a_nonlinear_functional_refuses_shared_states():
    from adjopt import fem
    from adjopt import mesh as meshes

    msh = meshes.unit_square(6, cell="triangle")
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    R = fem.diffusion_reaction_residual(msh, dm, source=dm.restrict_vector(fem.body_force(msh, 1.0)),
                                        diffusion="exp", beta=1.0)
    J = adjopt.ReducedFunctional(R, objective=adjopt.SquaredMisfit(np.zeros(R.n)), solver="superlu")
    with pytest.raises(TypeError, match="with_objective .* is for a linear A"):
        J.with_objective(adjopt.Compliance(np.ones(R.n)))
