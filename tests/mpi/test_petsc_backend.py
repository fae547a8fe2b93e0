"""The PETSc backend against the serial functional: run under ``mpiexec -n 2 python -m pytest tests/mpi``.

Every test also runs on one rank (plain ``pytest``) when petsc4py is
installed, and skips without it. All assertions are on data that every rank
holds in full (gathered vectors, reduced values), so the ranks pass or fail
together.
"""

import numpy as np
import pytest

petsc4py = pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")

from problems import poisson_inversion, topology_compliance  # noqa: E402

import adjopt  # noqa: E402
from adjopt.backends.partition import partition_elements  # noqa: E402
from adjopt.backends.petsc import DistributedReducedFunctional, distribute, minimize_tao  # noqa: E402
from adjopt.errors import (  # noqa: E402
    NonFiniteError,
    PartitionError,
    ShapeError,
    SingularMatrixError,
    SolverDidNotConverge,
)

COMM = MPI.COMM_WORLD
RTOL = 1e-12  # Krylov tolerance of the comparisons with the (direct) serial path


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def poisson():
    problem = poisson_inversion.build(n=16, n_obs=20)
    return problem, distribute(problem, rtol=RTOL)


@pytest.fixture(scope="module")
def mbb():
    problem = topology_compliance.build(nelx=24, nely=8)
    return problem, distribute(problem, rtol=RTOL)


def _point(problem, seed=1):
    rng = np.random.default_rng(seed)  # the same on every rank
    lo, hi = problem.bounds if problem.bounds is not None else (-np.inf, np.inf)
    return np.clip(problem.p0 + 0.2 * rng.standard_normal(problem.p0.size), lo, hi)


@pytest.mark.parametrize("case", ["poisson", "mbb"])
def test_value_gradient_and_hessp_equal_the_serial_path(case, request):
    problem, dist = request.getfixturevalue(case)
    J, F = problem.functional, dist.functional
    p = _point(problem)
    dp = np.random.default_rng(2).standard_normal(p.size)
    assert abs(F.value(p) - J.value(p)) <= 1e-8 * abs(J.value(p))
    assert rel(F.gradient(p), J.gradient(p)) <= 1e-8
    assert rel(F.hessp(p, dp), J.hessp(p, dp)) <= 1e-7
    assert rel(F.state(p), J.state(p)) <= 1e-9
    # every rank holds the same full gradient
    g = F.gradient(p)
    assert all(np.array_equal(g, h) for h in COMM.allgather(g))


@pytest.mark.parametrize("case", ["poisson", "mbb"])
def test_taylor_rates_on_the_distributed_functional(case, request):
    problem, dist = request.getfixturevalue(case)
    F = dist.functional
    p = _point(problem, seed=3)
    dp = np.random.default_rng(4).standard_normal(p.size)
    r2 = adjopt.taylor_test(F, p, dp, order=2)
    r3 = adjopt.taylor_test(F, p, dp, order=3)
    assert r2.passed and min(r2.rates) > 1.9
    assert r3.passed and min(r3.rates) > 2.9


def test_solve_counts_follow_the_serial_rules(poisson, mbb):
    for (problem, dist), adjoint_solves in ((poisson, 1), (mbb, 0)):
        F = dist.functional
        p, dp = _point(problem, seed=5), np.ones(problem.p0.size)
        F.reset_stats()
        F.value(p), F.gradient(p), F.hessp(p, dp)
        s = F.stats
        assert s.factorizations == 1  # one preconditioner setup serves every solve at p
        assert s.solves["forward"] == 1 and s.solves["tangent"] == 1
        # the compliance problem is self-adjoint: lam = u and dl = du, no adjoint solves
        assert s.solves["adjoint"] == adjoint_solves and s.solves["second_adjoint"] == adjoint_solves
        assert s.iterations["forward"] > 0
        assert set(F.times) >= {"assembly", "factorize", "solve", "sensitivity"}


def test_partitions_give_the_same_gradient(poisson):
    problem, dist = poisson
    p = _point(problem, seed=6)
    g = dist.functional.gradient(p)
    blocks = distribute(problem, partition="block", rtol=RTOL).functional
    # an arbitrary explicit partition (interleaved elements) still gives the same numbers
    n_el = problem.functional.matrix.n_params
    parts = np.arange(n_el) % COMM.size
    scattered = distribute(problem, parts=parts, partition="block", rtol=RTOL).functional
    assert rel(blocks.gradient(p), g) <= 1e-8
    assert rel(scattered.gradient(p), g) <= 1e-8


def test_vec_interface_keeps_parameters_distributed(poisson):
    problem, dist = poisson
    F = dist.functional
    p = _point(problem, seed=7)
    pv = F.to_vec(p)
    assert pv.getSize() == p.size and pv.getLocalSize() == F.layout.params.local_size(COMM.rank)
    g = F.gradient_vec(pv)
    assert rel(F.to_numpy(g), problem.functional.gradient(p)) <= 1e-8
    assert np.allclose(F.to_numpy(pv), p)


def test_tao_newton_and_blmvm_reach_the_serial_optimum():
    problem = poisson_inversion.build(n=12, n_obs=20)
    F = distribute(problem, rtol=RTOL).functional
    serial = adjopt.minimize(problem, method="newton-cg", gtol=1e-10, maxiter=50)
    g0 = np.linalg.norm(problem.functional.gradient(problem.p0))
    res_n = minimize_tao(F, problem.p0, method="nls", gatol=1e-9 * g0, maxiter=50)
    res_t = minimize_tao(F, problem.p0, method="ntr", gatol=1e-9 * g0, maxiter=50)
    res_l = minimize_tao(F, problem.p0, method="blmvm", gatol=1e-6 * g0, maxiter=500)
    for res, tol in ((res_n, 1e-6), (res_t, 1e-6), (res_l, 1e-3)):
        assert res.success, str(res)
        assert abs(res.fun - serial.fun) <= 1e-7 * abs(serial.fun)
        assert rel(res.x, serial.x) <= tol
    # Newton with exact Hessian actions takes few iterations; L-BFGS many more
    assert res_n.nit <= 12 and res_t.nit <= 12 and res_l.nit > 2 * res_n.nit
    assert res_n.stats["solves"]["tangent"] > 0 and "tangent" not in res_l.stats["solves"]


def test_tao_honours_bounds():
    problem = poisson_inversion.build(n=8, n_obs=10)
    F = distribute(problem, rtol=RTOL).functional
    calls = []
    res = minimize_tao(F, problem.p0, method="blmvm", bounds=(-0.1, 0.1), gatol=1e-8, maxiter=300,
                       callback=calls.append)
    assert [c["nit"] for c in calls] == list(range(res.nit + 1)) and calls == res.history
    assert calls[-1]["fun"] == res.fun and calls[0]["fun"] > res.fun
    assert res.x.min() >= -0.1 - 1e-14 and res.x.max() <= 0.1 + 1e-14
    assert np.isclose(res.x.max(), 0.1)  # the truth peaks at 1: the upper bound is active
    with pytest.raises(ValueError, match="unconstrained"):
        minimize_tao(F, problem.p0, method="lmvm", bounds=(-1, 1))


def test_tao_gradient_norm_is_the_dual_norm_of_the_inner_product():
    problem = poisson_inversion.build(n=8, n_obs=10)
    F = distribute(problem, rtol=RTOL).functional
    res = minimize_tao(F, problem.p0, method="blmvm", inner=problem.mass, gatol=1e30, maxiter=5)
    g = problem.functional.gradient(problem.p0)
    M = problem.mass.toarray()
    # stopped at once (gatol huge); the reported norm is sqrt(g^T M^-1 g), not |g|
    assert res.nit == 0
    assert np.isclose(res.gnorm, np.sqrt(g @ np.linalg.solve(M, g)), rtol=1e-8)
    lumped = np.asarray(problem.mass.sum(axis=1)).ravel()
    res = minimize_tao(F, problem.p0, method="lmvm", inner=lumped, gatol=1e30, maxiter=5)
    assert np.isclose(res.gnorm, np.sqrt(g @ (g / lumped)), rtol=1e-8)
    with pytest.raises(ValueError, match="unknown TAO method"):
        minimize_tao(F, problem.p0, method="bfgs")
    with pytest.raises(ValueError, match="positive weights"):
        minimize_tao(F, problem.p0, inner=np.zeros(3))


# -- bad input: clear errors on every rank, no hang -------------------------------------------

def test_more_ranks_than_elements_fails_on_every_rank():
    conn = np.array([[0, 1]])
    A = adjopt.ElementCoefficientMatrix(conn, np.array([[1.0, -1.0], [-1.0, 2.0]]), n=2)
    if COMM.size == 1:
        with pytest.raises(PartitionError, match="cannot split 1 element"):
            partition_elements(1, 2)
        return
    with pytest.raises(PartitionError, match=f"cannot split 1 element.*over {COMM.size} MPI ranks"):
        DistributedReducedFunctional(A, np.ones(2), adjopt.Compliance(np.ones(2)))


def test_a_mesh_that_cannot_be_partitioned_fails_on_every_rank():
    K = np.array([[1.0, -1.0], [-1.0, 2.0]])
    conn = np.array([[0, 1], [1, 2], [2, 0]])
    A = adjopt.ElementCoefficientMatrix(conn, K, n=4)  # dof 3 belongs to no element
    with pytest.raises(PartitionError, match="belong to no element"):
        DistributedReducedFunctional(A, np.ones(4), adjopt.Compliance(np.ones(4)))
    B = adjopt.ElementCoefficientMatrix(conn, K, n=3)
    with pytest.raises(PartitionError, match="NaN"):
        DistributedReducedFunctional(B, np.ones(3), adjopt.Compliance(np.ones(3)), partition="slab",
                                     coordinates=[[0.0, 0.0], [np.nan, 1.0], [1.0, 1.0]])


def test_mismatched_parameter_lengths_and_nan_fail_on_every_rank(poisson):
    problem, dist = poisson
    F, m = dist.functional, problem.p0.size
    # rank 0 passes one entry too many when there are several ranks (else every rank does)
    bad = np.zeros(m + 1 if COMM.rank == 0 else m)
    with pytest.raises(ShapeError, match=f"length {m}"):
        F.value(bad)
    p = np.zeros(m)
    if COMM.rank == COMM.size - 1:
        p[F.layout.params.owned(COMM.rank)[0]] = np.nan  # only the last rank's own part is bad
    with pytest.raises(NonFiniteError, match="NaN"):
        F.value_vec(F.to_vec(p))
    assert np.isfinite(F.value(np.zeros(m)))  # still usable afterwards


def test_unsupported_pieces_are_refused_clearly(poisson):
    problem, _ = poisson
    J = problem.functional
    tv = poisson_inversion.build(n=8, regularization="tv").functional
    with pytest.raises(NotImplementedError, match="TotalVariation"):
        DistributedReducedFunctional.from_functional(tv)
    with pytest.raises(TypeError, match="ElementCoefficientMatrix"):
        DistributedReducedFunctional(adjopt.ConstantMatrix(np.eye(3), 3), np.ones(3), adjopt.Compliance(np.ones(3)))
    with pytest.raises(NotImplementedError, match="linear parameter map"):
        DistributedReducedFunctional(J.matrix, J.rhs, J.objective, adjopt.maps.ExpMap(J.matrix.n_params))
    with pytest.raises(ValueError, match="rtol"):
        DistributedReducedFunctional.from_functional(J, rtol=2.0)


def test_a_solve_that_does_not_converge_raises_on_every_rank(poisson):
    problem, _ = poisson
    F = distribute(problem, max_it=1, rtol=1e-12).functional
    with pytest.raises(SolverDidNotConverge, match="forward solve .* did not converge"):
        F.value(problem.p0)


def test_adjopts_own_oc_driver_runs_on_the_distributed_topology_problem():
    problem = topology_compliance.build(nelx=30, nely=10)
    dist = distribute(problem, rtol=RTOL)
    serial = adjopt.minimize(problem, method="oc", maxiter=30, xtol=0.0, gtol=0.0)
    ours = adjopt.minimize(dist, method="oc", maxiter=30, xtol=0.0, gtol=0.0)
    assert ours.nit == serial.nit == 30
    assert abs(ours.fun - serial.fun) <= 1e-8 * serial.fun
    assert np.max(np.abs(ours.x - serial.x)) <= 1e-6
    # 31 points: one preconditioner setup and one (self-adjoint) solve each
    assert dist.functional.stats.solves["forward"] == dist.functional.stats.factorizations >= 31


def test_a_singular_or_overflowing_matrix_stops_every_rank_before_the_solve(poisson):
    problem, dist = poisson
    F, J = dist.functional, problem.functional
    p = _point(problem, seed=8)
    g = F.gradient(p)
    with pytest.raises(NonFiniteError, match="overflowed"):
        F.value(np.full(p.size, 800.0))  # exp(800) = inf
    with pytest.raises(SingularMatrixError, match="zero.* on its diagonal"):
        F.value(np.full(p.size, -800.0))  # exp(-800) = 0
    # the failed points left no stale state behind: p is solved again, with its own matrix
    assert rel(F.gradient(p), g) == 0.0
    assert rel(F.gradient(p), J.gradient(p)) <= 1e-8


def test_graph_partition_gives_the_same_gradient(poisson):
    pytest.importorskip("pymetis")
    problem, dist = poisson
    p = _point(problem, seed=9)
    F = distribute(problem, partition="graph", rtol=RTOL).functional
    assert rel(F.gradient(p), dist.functional.gradient(p)) <= 1e-8


def _chain(n_el=40, symmetric=False):
    """A 1D chain: exp(p_e) (diffusion + convection) element matrices plus a constant A0 (nonsymmetric)."""
    conn = np.stack([np.arange(n_el), np.arange(1, n_el + 1)], axis=1)
    K = np.array([[1.0, -1.0], [-1.0, 1.0]])
    if not symmetric:
        K = K + 0.4 * np.array([[-0.5, 0.5], [-0.5, 0.5]])
    n = n_el + 1
    A0 = 0.5 * np.eye(n) + (0.0 if symmetric else 0.1) * np.eye(n, k=1)
    A = adjopt.ElementCoefficientMatrix(conn, K, "exp", n=n, A0=A0)
    rng = np.random.default_rng(11)
    objective = adjopt.SquaredMisfit(rng.standard_normal(n)) + 0.3 * adjopt.TikhonovL2(p_ref=0.2)
    return adjopt.ReducedFunctional(A, np.linspace(1.0, 2.0, n), objective)


def test_nonsymmetric_matrix_with_A0_solves_its_adjoints_with_solve_transpose():
    J = _chain()
    assert not J.matrix.symmetric
    F = DistributedReducedFunctional.from_functional(J, rtol=RTOL)
    assert F.solver.name.startswith("petsc:gmres")
    p = 0.3 * np.random.default_rng(12).standard_normal(J.n_params)
    dp = np.random.default_rng(13).standard_normal(J.n_params)
    assert abs(F.value(p) - J.value(p)) <= 1e-9 * abs(J.value(p))
    assert rel(F.gradient(p), J.gradient(p)) <= 1e-8
    assert rel(F.hessp(p, dp), J.hessp(p, dp)) <= 1e-7
    assert adjopt.taylor_test(F, p, dp, order=2).passed
    assert adjopt.taylor_test(F, p, dp, order=3).passed
    assert F.stats.solves["adjoint"] > 0 and F.stats.solves["second_adjoint"] > 0
    with pytest.raises(ShapeError, match="observes a state of length 3"):
        DistributedReducedFunctional(J.matrix, J.rhs, adjopt.SquaredMisfit(np.ones(3)))


def test_elasticity_gets_the_rigid_body_modes_as_near_nullspace():
    problem = topology_compliance.build(nelx=96, nely=32)
    p = np.clip(0.5 + 0.4 * np.random.default_rng(14).standard_normal(problem.p0.size), 0.0, 1.0)
    its = {}
    for label, opts in (("modes", {}), ("none", {"near_nullspace": None})):
        F = distribute(problem, rtol=1e-8, **opts).functional
        F.value(p)
        its[label] = F.stats.iterations["forward"]
    assert its["modes"] <= 30 and 3 * its["modes"] < its["none"]
    with pytest.raises(ShapeError, match="near_nullspace"):
        distribute(problem, near_nullspace=np.ones((5, 3)))


def test_tao_newton_is_preconditioned_by_the_regularization_hessian():
    problem = poisson_inversion.build(n=32, n_obs=20)
    F = distribute(problem, rtol=RTOL).functional
    P = F.regularization_hessian()
    reg = problem.meta["regularization"]
    dp = np.random.default_rng(15).standard_normal(problem.p0.size)
    Pv = F.to_vec(dp).duplicate()
    P.mult(F.to_vec(dp), Pv)
    assert rel(F.to_numpy(Pv), reg.hess_pp(None, problem.p0, dp)) <= 1e-12  # f_pp of the regularization
    g0 = np.linalg.norm(problem.functional.gradient(problem.p0))
    runs = {pc: minimize_tao(F, problem.p0, method="ntr", gatol=1e-7 * g0, maxiter=50, preconditioner=pc, newton_rtol=1e-5)
            for pc in ("regularization", None)}
    assert all(r.success for r in runs.values())
    # 156 against 303 Hessian actions here (n = 32); the gap grows with the mesh
    assert 1.5 * runs["regularization"].stats["solves"]["tangent"] < runs[None].stats["solves"]["tangent"]
    with pytest.raises(ValueError, match="preconditioner"):
        minimize_tao(F, problem.p0, method="ntr", preconditioner="h1")
    with pytest.raises(ValueError, match="not both 0"):
        minimize_tao(F, problem.p0, gatol=0.0, grtol=0.0)
    with pytest.raises(ValueError, match="maxiter >= 1"):
        minimize_tao(F, problem.p0, maxiter=0)
    with pytest.raises(ValueError, match="newton_rtol"):
        minimize_tao(F, problem.p0, method="nls", newton_rtol=0.0)
    chain = DistributedReducedFunctional.from_functional(_chain()).regularization_hessian()
    assert chain is not None and np.isclose(chain.getDiagonal().sum(), 0.3 * 40)  # 40 element parameters
    mbb = distribute(topology_compliance.build(nelx=8, nely=4)).functional
    assert mbb.regularization_hessian() is None


def test_self_adjoint_and_gauss_newton_requests_that_do_not_apply_are_refused(poisson):
    problem, dist = poisson
    with pytest.raises(ValueError, match="self_adjoint=True needs"):
        DistributedReducedFunctional.from_functional(problem.functional, self_adjoint=True)
    with pytest.raises(NotImplementedError, match="gauss_newton"):
        dist.functional.hessp(problem.p0, problem.p0, gauss_newton=True)
    with pytest.raises(TypeError, match="objective must be an Objective"):
        DistributedReducedFunctional(problem.functional.matrix, problem.functional.rhs, "misfit")


def test_inputs_the_backend_does_not_distribute_are_refused_clearly():
    J = _chain()
    A, n = J.matrix, J.matrix.shape[0]
    misfit = adjopt.SquaredMisfit(np.ones(n))
    with pytest.raises(NotImplementedError, match="constant right-hand side"):
        DistributedReducedFunctional(A, adjopt.AffineVector(np.ones(n), np.ones((n, A.n_params))), misfit)
    with pytest.raises(ShapeError, match="one right-hand side"):
        DistributedReducedFunctional(A, np.ones((n, 2)), misfit)
    with pytest.raises(adjopt.PatternError, match="produces 3 values"):
        DistributedReducedFunctional(A, np.ones(n), misfit, adjopt.maps.NodalToElement(np.array([[0, 1], [1, 2], [2, 3]])))
    with pytest.raises(ShapeError, match="one load case"):
        DistributedReducedFunctional(A, np.ones(n), adjopt.Compliance(np.ones((n, 2))))
    with pytest.raises(ShapeError, match="one experiment"):
        DistributedReducedFunctional(A, np.ones(n), adjopt.SquaredMisfit(np.ones((n, 2))))
    with pytest.raises(NotImplementedError, match="weights as a vector"):
        DistributedReducedFunctional(A, np.ones(n), adjopt.SquaredMisfit(np.ones(n), W=np.eye(n)))
    F = DistributedReducedFunctional.from_functional(J)
    other = DistributedReducedFunctional.from_functional(_chain(n_el=30))
    with pytest.raises(ShapeError, match="global size 40"):
        F.value_vec(other.create_parameter_vec())
    with pytest.raises(ShapeError, match="dp must be a Vec of global size 40"):
        F.hessp_vec(F.create_parameter_vec(), other.create_parameter_vec())


def test_a_per_call_tolerance_loosens_the_adjoint_and_hessian_solves(poisson):
    problem, dist = poisson
    F, J = dist.functional, problem.functional
    p = _point(problem, seed=16)
    dp = np.random.default_rng(17).standard_normal(p.size)
    F.value(p)
    F.reset_stats()
    g_loose = F.gradient(p, tol=1e-4)
    loose_its = F.stats.iterations["adjoint"]
    g = F.gradient(p)  # asks for more than the cached adjoint has: solved again at rtol
    assert F.stats.solves["adjoint"] == 2 and F.stats.iterations["adjoint"] > 2 * loose_its
    F.gradient(p, tol=1e-3)  # the cached adjoint is accurate enough: no solve
    assert F.stats.solves["adjoint"] == 2
    assert rel(g, J.gradient(p)) <= 1e-8 and 1e-12 < rel(g_loose, g) <= 1e-2
    h_loose = F.hessp(p, dp, tol=1e-3)
    assert 1e-12 < rel(h_loose, J.hessp(p, dp)) <= 1e-1
    with pytest.raises(ValueError, match="tol must be in"):
        F.hessp(p, dp, tol=2.0)


def test_the_ranks_of_a_node_share_its_cores():
    import os

    import numba

    problem = poisson_inversion.build(n=8, n_obs=5)
    distribute(problem)
    node_size = COMM.Split_type(MPI.COMM_TYPE_SHARED).size
    if "NUMBA_NUM_THREADS" not in os.environ:
        assert numba.get_num_threads() <= max(1, numba.config.NUMBA_NUM_THREADS // node_size)


def test_warm_starts_save_iterations_and_keep_the_accuracy():
    problem = topology_compliance.build(nelx=48, nely=16)
    p = np.full(problem.p0.size, 0.5)
    runs = {}
    for warm in (False, True):
        F = distribute(problem, rtol=1e-10, warm_start=warm).functional
        F.value(p)
        F.reset_stats()
        g = F.gradient(p + 1e-3)  # a nearby point, as an optimizer's next iterate
        runs[warm] = (F.stats.iterations["forward"], g)
    assert runs[True][0] < runs[False][0]
    assert rel(runs[True][1], problem.functional.gradient(p + 1e-3)) <= 1e-8
    with pytest.raises(ValueError, match="warm_start"):
        distribute(problem, warm_start="yes")


class _ScaledGradient:
    """The distributed functional with its gradient off by a relative 1e-3."""

    def __init__(self, F):
        self.F, self.warm_start = F, F.warm_start

    def value(self, p):
        return self.F.value(p)

    def value_error(self, p):
        return self.F.value_error(p)

    def gradient(self, p):
        return 1.001 * self.F.gradient(p)


def test_taylor_test_at_the_default_tolerance_with_warm_starts():
    # the Krylov error of J (rtol 1e-10) and the warm starts must not pass a wrong gradient or fail a right one
    problem = poisson_inversion.build(n=16, n_obs=20)
    F = distribute(problem, warm_start=True).functional
    p = _point(problem, seed=3)
    dp = np.random.default_rng(4).standard_normal(p.size)
    r2, r3 = adjopt.taylor_test(F, p, dp, order=2), adjopt.taylor_test(F, p, dp, order=3)
    assert r2.passed and r3.passed, r2.table() + "\n" + r3.table()
    assert F.warm_start  # switched off during the test only
    assert not adjopt.taylor_test(_ScaledGradient(F), p, dp, order=2).passed
    # the dual-weighted residual estimates the Krylov error of J
    serial = problem.functional.value(p)
    assert abs(F.value(p) - serial) <= 10 * F.value_error(p) + 1e-12 * abs(serial)


def _singular_blocks(nb=8):
    """A(p) = blockdiag of [[1, 1], [1, 1]] (p = 1): singular with a nonzero diagonal, which passes the
    zero-diagonal check and makes every factorization meet an exact zero pivot."""
    A = adjopt.ElementCoefficientMatrix(np.arange(2 * nb).reshape(nb, 2), np.ones((2, 2)), n=2 * nb)
    b = np.ones(2 * nb)
    return adjopt.Problem(adjopt.ReducedFunctional(A, b, adjopt.Compliance(b)), np.ones(nb))


def test_a_preconditioner_that_meets_a_zero_pivot_says_so_not_to_raise_max_it():
    problem = _singular_blocks()
    F = distribute(problem, pc_type="bjacobi").functional  # a factorization of each rank's block
    with pytest.raises(SolverDidNotConverge) as info:
        F.value(problem.p0)
    msg = str(info.value)
    assert "DIVERGED_PCSETUP_FAILED after 0 iterations" in msg
    assert "could not be built" in msg and "FACTOR_NUMERIC_ZEROPIVOT" in msg and "boundary conditions" in msg
    assert "max_it" not in msg  # no iteration was made: more of them cannot help


@pytest.mark.skipif(COMM.size < 2, reason="PETSc's own LU factors a matrix on one rank (mpiexec -n 2)")
def test_a_factorization_petsc_cannot_make_in_parallel_names_what_to_use_instead():
    problem = poisson_inversion.build(n=8, n_obs=5)
    F = distribute(problem, pc_type="lu").functional
    with pytest.raises(SolverDidNotConverge, match=r"cannot make a factorization that pc_type='lu' .*on \d ranks they "
                                                   r"need an external package such as MUMPS.*Use pc_type='gamg'"):
        F.value(problem.p0)
    F2 = distribute(problem, pc_type="bjacobi").functional  # the advice works
    J0 = problem.functional.value(problem.p0)
    assert abs(F2.value(problem.p0) - J0) <= 1e-8 * abs(J0)


def test_a_preconditioner_petsc_does_not_have_is_refused_with_what_to_use():
    problem = poisson_inversion.build(n=8, n_obs=5)
    with pytest.raises(ValueError, match=r"PETSc does not know .*pc_type='gammg'.*misspelling.*pc_type='gamg'"):
        distribute(problem, pc_type="gammg")
    with _Options(ksp_type="cgg"):  # the same through the options database (PETSC_OPTIONS)
        with pytest.raises(ValueError, match=r"ksp_type='cgg'.*Unable to find requested KSP type cgg"):
            distribute(problem)
    F = distribute(problem).functional  # nothing left behind
    J0 = problem.functional.value(problem.p0)
    assert abs(F.value(problem.p0) - J0) <= 1e-8 * abs(J0)


class _Options:
    """PETSc options (as PETSC_OPTIONS would set them) for the duration of a with-block."""

    def __init__(self, **opts):
        self.opts = {f"adjopt_{k}": v for k, v in opts.items()}

    def __enter__(self):
        o = petsc4py.PETSc.Options()
        for k, v in self.opts.items():
            o[k] = v

    def __exit__(self, *exc):
        o = petsc4py.PETSc.Options()
        for k in self.opts:
            o.delValue(k)


@pytest.mark.parametrize("how", ["argument", "options"])
def test_a_solve_that_is_not_one_is_refused_not_returned(how):
    # ksp_type preonly applies the preconditioner once: CONVERGED_ITS, and a u 20-100 % off before this check
    problem = poisson_inversion.build(n=8, n_obs=5)
    kw, opts = ({"ksp_type": "preonly"}, {}) if how == "argument" else ({}, {"ksp_type": "preonly"})
    with _Options(**opts):
        F = distribute(problem, **kw).functional
    with pytest.raises(SolverDidNotConverge, match=r"stopped with CONVERGED_ITS after 1 iterations but left a relative "
                                                   r"residual .* above its tolerance 1e-10: ksp_type='preonly'"):
        F.value(problem.p0)


def test_an_absolute_tolerance_that_stops_early_is_refused():
    problem = poisson_inversion.build(n=8, n_obs=5)  # |b| < 1: atol 1 stops at u = 0
    with _Options(ksp_atol=1.0):
        F = distribute(problem).functional
    with pytest.raises(SolverDidNotConverge, match=r"CONVERGED_ATOL after 0 iterations .*\(atol 1, -adjopt_ksp_atol"):
        F.value(problem.p0)


def test_the_relative_tolerance_of_the_options_database_is_the_one_used():
    problem = poisson_inversion.build(n=8, n_obs=5)
    with _Options(ksp_rtol=1e-4):
        loose = distribute(problem).functional
    assert loose.rtol == 1e-4  # before: -adjopt_ksp_rtol was overwritten by rtol= at every solve
    loose.value(problem.p0)
    tight = distribute(problem).functional
    tight.value(problem.p0)
    assert loose.stats.iterations["forward"] < tight.stats.iterations["forward"]
    with _Options(ksp_rtol=0.0):
        with pytest.raises(ValueError, match=r"-adjopt_ksp_rtol must be in \(0, 1\)"):
            distribute(problem)


def test_solver_options_petsc_refuses_stop_every_rank_with_petscs_reason():
    from adjopt.backends.petsc import PetscOptionsError

    problem = poisson_inversion.build(n=8, n_obs=5)
    with _Options(ksp_max_it="abc"):
        with pytest.raises(PetscOptionsError, match=r"PETSc refused the solver options .* error \d+: .*Check PETSC_OPTIONS"):
            distribute(problem)
    with _Options(pc_type="hypree"):  # the value set in the options is named, not the default argument
        with pytest.raises(PetscOptionsError, match=r"pc_type='hypree'.*PETSc says: Unable to find requested PC type"):
            distribute(problem)
    with pytest.raises(ValueError, match="pc_type must be the name of a PETSc PC type"):
        distribute(problem, pc_type=None)
    F = distribute(problem, rtol=np.float32(1e-8), max_it=np.int64(500)).functional  # numpy numbers are numbers
    J0 = problem.functional.value(problem.p0)
    assert abs(F.value(problem.p0) - J0) <= 1e-6 * abs(J0)


def test_bicg_with_gamg_smooths_with_what_applies_transposed():
    # bicg applies the preconditioner transposed: adjopt's SOR smoothers (which cannot) gave PETSc error 56 and
    # a crash at the next call; now GAMG keeps its own smoothers under bicg
    problem = poisson_inversion.build(n=12, n_obs=10)
    F = distribute(problem, ksp_type="bicg", rtol=RTOL).functional
    p = _point(problem)
    J = problem.functional
    assert abs(F.value(p) - J.value(p)) <= 1e-8 * abs(J.value(p))
    assert rel(F.gradient(p), J.gradient(p)) <= 1e-8


def _nonsymmetric_problem(n=24):
    """A 1D diffusion-advection operator: A(p) nonsymmetric, so the adjoint solves are with A^T."""
    conn = np.stack([np.arange(n) - 1, np.arange(n)], axis=1)
    conn[-1, 1] = -1
    K = n * np.array([[1.0, -1.0], [-1.0, 1.0]]) + 0.5 * np.array([[-1.0, 1.0], [-1.0, 1.0]])
    A = adjopt.ElementCoefficientMatrix(conn, K, coefficient=adjopt.Exp(), n=n - 1)
    J = adjopt.ReducedFunctional(A, np.full(n - 1, 1.0 / n), adjopt.SquaredMisfit(np.linspace(0.0, 0.01, n - 1)))
    return adjopt.Problem(J, np.zeros(n))


def test_a_preconditioner_that_cannot_apply_transposed_is_refused_where_a_solve_needs_it():
    from adjopt.backends.petsc import PetscOptionsError

    problem = _nonsymmetric_problem()
    with pytest.raises(PetscOptionsError, match=r"'sor' has no transposed application, which the adjoint and "
                                                r"second-adjoint solves with A\^T of a nonsymmetric A need"):
        distribute(problem, pc_type="sor")
    with pytest.raises(PetscOptionsError, match=r"'sor' has no transposed application, which ksp_type='bicg' needs"):
        distribute(poisson_inversion.build(n=8, n_obs=5), ksp_type="bicg", pc_type="sor")
    F = distribute(problem, pc_type="jacobi", rtol=RTOL).functional  # what the message advises works
    p = 0.1 * np.random.default_rng(3).standard_normal(problem.p0.size)
    assert rel(F.gradient(p), problem.functional.gradient(p)) <= 1e-8


def test_a_petsc_error_inside_a_solve_becomes_a_clear_error_and_the_ksp_is_not_used_again():
    # (a PETSc error inside KSPSolve leaves the KSP where a further call crashes the process; the error itself is
    # made here from what petsc4py raises, without driving PETSc into that state)
    problem = poisson_inversion.build(n=8, n_obs=5)
    F = distribute(problem).functional

    class Fake(Exception):
        ierr = 56

        def __str__(self):
            return "error code 56\n[0] PCApplyTranspose() at pc.c:1\n[0] Can only apply transpose of SOR if matrix is symmetric"

    msg = F._solve_error(Fake(), "adjoint")
    assert msg.startswith("the adjoint solve (petsc:cg+gamg) failed with PETSc error 56 (Can only apply transpose of SOR")
    assert "ksp_type='cg' or 'gmres'" in msg
    F._broken = msg
    with pytest.raises(SolverDidNotConverge, match="an earlier solve of this functional failed inside PETSc"):
        F.value(problem.p0)


def test_a_factorization_this_petsc_cannot_make_is_named_on_any_number_of_ranks():
    problem = poisson_inversion.build(n=8, n_obs=5)
    F = distribute(problem, pc_type="qr").functional  # QR needs SuiteSparse's SPQR, not in the PyPI build
    where = "on \\d ranks they need an external package" if COMM.size > 1 else "the package asked for is not in this PETSc"
    with pytest.raises(SolverDidNotConverge, match=rf"cannot make a factorization that pc_type='qr' .*{where}"):
        F.value(problem.p0)


@pytest.mark.skipif(COMM.size < 2, reason="Eisenstat works on one rank (mpiexec -n 2)")
def test_eisenstat_on_several_ranks_is_refused_before_petsc_fails_inside_a_solve():
    from adjopt.backends.petsc import PetscOptionsError

    with pytest.raises(PetscOptionsError, match="'eisenstat' needs the matrix on one rank"):
        distribute(poisson_inversion.build(n=8, n_obs=5), pc_type="eisenstat")
