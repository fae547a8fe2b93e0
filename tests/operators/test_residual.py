"""Element and callback residuals R(u, p): derivatives against finite differences, the linear special case,
manufactured solutions, Newton's convergence and bad input."""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.solvers.gmg import GMGSolver
from adjopt.errors import MissingDerivativeError, NewtonDidNotConverge, PatternError, ShapeError
from adjopt.verify import check_residual

MESHES = {
    "triangle": lambda: meshes.unit_square(5),
    "quad": lambda: meshes.unit_square(4, cell="quad"),
    "tetra": lambda: meshes.unit_cube(3),
    "hexahedron": lambda: meshes.unit_cube(3, cell="hexahedron"),
}
KINDS = {
    "quasilinear": dict(diffusion="exp", beta=1.5),
    "cube": dict(diffusion="exp", reaction=1.0, nonlinearity="cube"),
    "bratu": dict(diffusion=1.0, reaction="exp", nonlinearity="exp"),
    "both": dict(diffusion="exp", beta=0.7, reaction=adjopt.SIMP(3.0), nonlinearity="exp"),
}


def _residual(cell, kind, values=0.3, source=None):
    msh = MESHES[cell]()
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"), values)
    src = np.random.default_rng(3).standard_normal(dm.n_free) if source is None else source
    return fem.diffusion_reaction_residual(msh, dm, source=src, **KINDS[kind]), msh, dm


@pytest.mark.parametrize("cell", sorted(MESHES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_derivative_matches_finite_differences(cell, kind):
    R, _, _ = _residual(cell, kind)
    rng = np.random.default_rng(0)
    u, p = 0.5 * rng.standard_normal(R.n), 0.2 + 0.3 * rng.random(R.n_params)
    res = check_residual(R, u, p)
    assert res.passed, res.table()
    assert all(e < 1e-6 for e in res.errors.values()), res.table()
    K = R.jacobian(u, p)
    asym = abs(K - K.T).max()
    assert R.symmetric == (KINDS[kind].get("beta", 0.0) == 0.0)
    assert (asym < 1e-14) if R.symmetric else (asym > 1e-3)


def test_linear_residual_is_the_linear_operator():
    # beta = 0, no reaction: R = A(p) u - b with A(p) = sum_e exp(p_e) K_e, the ElementCoefficientMatrix
    msh = meshes.unit_square(6)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    b = dm.restrict_vector(fem.body_force(msh, 1.0))
    R = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", source=b)
    A = adjopt.ElementCoefficientMatrix(dm.restrict(msh.cells), fem.p1_stiffness(msh), "exp", n=dm.n_free)
    rng = np.random.default_rng(1)
    u, p, w, du, dp = (rng.standard_normal(n) for n in (R.n, R.n_params, R.n, R.n, R.n_params))
    Ap = A.assemble(p)
    np.testing.assert_allclose(R.residual(u, p), Ap @ u - b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(R.jacobian(u, p).toarray(), Ap.toarray(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(R.vjp(u, p, w), A.contract(p, w, u), rtol=1e-11, atol=1e-12)
    hu, hp = R.second(u, p, w, du, dp)
    np.testing.assert_allclose(hu, A.tangent_transpose(p, dp, w), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(hp, A.contract(p, w, du) + A.second(p, w, u, dp), rtol=1e-11, atol=1e-12)
    # the functionals agree: value, gradient and Hessian action
    obj = adjopt.SquaredMisfit(rng.standard_normal(R.n)) + 1e-3 * adjopt.TikhonovL2()
    Jn = adjopt.ReducedFunctional(R, objective=obj, solver="superlu")
    Jl = adjopt.ReducedFunctional(A, b, obj, solver="superlu")
    q = 0.3 * rng.standard_normal(R.n_params)
    assert Jn.value(q) == pytest.approx(Jl.value(q), rel=1e-11)
    np.testing.assert_allclose(Jn.gradient(q), Jl.gradient(q), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(Jn.hessp(q, dp), Jl.hessp(q, dp), rtol=1e-9, atol=1e-12)
    assert Jn.stats.newton_iterations == 1  # one Newton step solves a linear equation


def _manufactured(kind, n, cell="triangle"):
    """u* = sin(pi x) sin(pi y): the L2 error of u_h against u*'s nodal values, and h."""
    msh = meshes.unit_square(n, cell=cell)
    x, y = msh.points[:, 0], msh.points[:, 1]
    s = np.sin(np.pi * x) * np.sin(np.pi * y)
    lap = -2 * np.pi**2 * s
    grad2 = np.pi**2 * ((np.cos(np.pi * x) * np.sin(np.pi * y)) ** 2 + (np.sin(np.pi * x) * np.cos(np.pi * y)) ** 2)
    beta, lam = 2.0, 0.5
    if kind == "quasilinear":  # -div((1 + beta u^2) grad u) = f
        f, opts = -(1 + beta * s**2) * lap - 2 * beta * s * grad2, dict(diffusion="exp", beta=beta)
    elif kind == "cube":  # -lap u + u^3 = f
        f, opts = -lap + s**3, dict(diffusion="exp", reaction=1.0, nonlinearity="cube")
    else:  # Bratu: -lap u + lam exp(u) = f
        f, opts = -lap + lam * np.exp(s), dict(diffusion="exp", reaction=lam, nonlinearity="exp")
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    R = fem.diffusion_reaction_residual(msh, dm, source=dm.restrict_vector(fem.body_force(msh, f)), **opts)
    J = adjopt.ReducedFunctional(R, objective=adjopt.SquaredMisfit(np.zeros(R.n)), solver="superlu")
    p = np.zeros(R.n_params)
    e = R.expand(J.state(p)) - s
    M = fem.assemble(msh.cells, fem.mass_matrices(msh), msh.n_nodes)
    return float(np.sqrt(e @ (M @ e))), J.newton_history(p)


@pytest.mark.parametrize("kind", ["quasilinear", "cube", "bratu"])
@pytest.mark.parametrize("cell", ["triangle", "quad"])
def test_manufactured_solution_converges_at_rate_two(kind, cell):
    errs = [_manufactured(kind, n, cell)[0] for n in (8, 16, 32, 64)]
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > 1.7) and abs(rates[-1] - 2.0) < 0.1, (errs, rates)


@pytest.mark.parametrize("kind", ["quasilinear", "cube", "bratu"])
def test_newton_converges_quadratically(kind):
    _, hist = _manufactured(kind, 16)
    print(f"{kind}: ||R_k|| =", " ".join(f"{r:.2e}" for r in hist))
    assert len(hist) >= 4, hist  # really nonlinear: several steps
    r = np.array(hist)
    # the order log(r_{k+1}/r_k) / log(r_k/r_{k-1}) of the last step whose residual is clearly above round-off
    k = max(i for i in range(1, len(r) - 1) if r[i + 1] > 1e3 * np.finfo(float).eps * r[0])
    order = np.log(r[k + 1] / r[k]) / np.log(r[k] / r[k - 1])
    assert order > 1.8, (order, hist)


def test_a_bratu_problem_beyond_its_turning_point_raises():
    # -lap u = lam exp(u) on the unit square has no solution for lam above about 6.81
    msh = meshes.unit_square(8)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    R = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", reaction=-10.0, nonlinearity="exp")
    J = adjopt.ReducedFunctional(R, objective=adjopt.SquaredMisfit(np.zeros(R.n)), solver="superlu",
                                 newton=dict(max_iter=30))
    with pytest.raises(NewtonDidNotConverge, match="Newton") as info:
        J.value(np.zeros(R.n_params))
    assert len(info.value.residuals) >= 2 and isinstance(info.value, adjopt.AdjoptError)
    # below the turning point it solves
    R2 = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", reaction=-5.0, nonlinearity="exp")
    J2 = adjopt.ReducedFunctional(R2, objective=adjopt.SquaredMisfit(np.zeros(R2.n)), solver="superlu")
    assert np.max(J2.state(np.zeros(R2.n_params))) > 0.1


def _callback_from(R, second=True, symmetric=False):
    return adjopt.CallbackResidual(
        residual=R.residual, jacobian=R.jacobian,
        dR_dp=lambda u, p: sp.csr_array(np.column_stack([R.jvp(u, p, e) for e in np.eye(R.n_params)])),
        n=R.n, n_params=R.n_params, second=R.second if second else None, symmetric=symmetric)


def test_callback_residual_gives_the_same_functional():
    R, _, _ = _residual("triangle", "quasilinear", values=0.0)
    C = _callback_from(R)
    assert check_residual(C, np.ones(C.n), np.zeros(C.n_params)).passed
    rng = np.random.default_rng(4)
    obj = adjopt.SquaredMisfit(rng.standard_normal(R.n)) + 1e-2 * adjopt.TikhonovL2()
    Je = adjopt.ReducedFunctional(R, objective=obj, solver="superlu")
    Jc = adjopt.ReducedFunctional(C, objective=obj, solver="superlu")
    p, dp = 0.2 * rng.standard_normal(R.n_params), rng.standard_normal(R.n_params)
    assert Jc.value(p) == pytest.approx(Je.value(p), rel=1e-12)
    np.testing.assert_allclose(Jc.gradient(p), Je.gradient(p), rtol=1e-10)
    np.testing.assert_allclose(Jc.hessp(p, dp), Je.hessp(p, dp), rtol=1e-9)


def test_callback_residual_without_second_order_terms():
    R, _, _ = _residual("triangle", "cube", values=0.0)
    C = _callback_from(R, second=False)
    J = adjopt.ReducedFunctional(C, objective=adjopt.SquaredMisfit(np.ones(C.n)), solver="superlu")
    p = np.zeros(C.n_params)
    assert np.all(np.isfinite(J.gradient(p)))
    with pytest.raises(MissingDerivativeError, match="second="):
        J.hessp(p, np.ones(C.n_params))
    assert np.all(np.isfinite(J.hessp(p, np.ones(C.n_params), gauss_newton=True)))
    assert check_residual(C, np.ones(C.n), p).errors["second: L_uu du + L_up dp"] is None


def test_check_residual_catches_a_wrong_jacobian():
    R, _, _ = _residual("quad", "quasilinear")
    wrong = adjopt.CallbackResidual(R.residual, lambda u, p: 1.1 * R.jacobian(u, p),
                                    lambda u, p: np.column_stack([R.jvp(u, p, e) for e in np.eye(R.n_params)]),
                                    R.n, R.n_params, second=R.second)
    res = check_residual(wrong, np.ones(R.n), np.zeros(R.n_params))
    assert not res.passed and res.errors["jacobian K du"] > 0.05 and "FAILED" in res.table()
    # a Jacobian missing the q'(u) term (the symmetric part only): also caught
    half = adjopt.CallbackResidual(R.residual, lambda u, p: 0.5 * (R.jacobian(u, p) + R.jacobian(u, p).T),
                                   lambda u, p: np.column_stack([R.jvp(u, p, e) for e in np.eye(R.n_params)]),
                                   R.n, R.n_params)
    u = np.random.default_rng(5).standard_normal(R.n)
    assert not check_residual(half, u, np.zeros(R.n_params)).passed


def test_callback_pattern_is_fixed_by_the_first_jacobian():
    n = 3
    calls = []

    def jac(u, p):
        calls.append(1)
        K = sp.diags([3 * u**2 + 1.0], [0]).tocsr()
        if len(calls) > 1:
            K = K + sp.csr_array(([1.0], ([0], [2])), shape=(n, n))  # an entry outside the first pattern
        return K

    C = adjopt.CallbackResidual(lambda u, p: u**3 + u - p, jac, lambda u, p: -np.eye(n), n, n)
    C.jacobian(np.ones(n), np.ones(n))
    with pytest.raises(PatternError, match="outside the pattern"):
        C.jacobian(np.ones(n), np.ones(n))
    # with pattern= naming every entry K can hold, both fit; an entry left out is a zero
    full = sp.csr_array(np.ones((n, n)))
    C2 = adjopt.CallbackResidual(lambda u, p: u**3 + u - p, jac, lambda u, p: -np.eye(n), n, n, pattern=full)
    calls.clear()
    K1, K2 = C2.jacobian(np.ones(n), np.ones(n)), C2.jacobian(np.ones(n), np.ones(n))
    assert K1.nnz == K2.nnz == n * n and K2[0, 2] == 1.0 and K1[0, 2] == 0.0


def test_callback_scalar_problem_against_the_analytic_solution():
    # R(u, p) = u^3 + u - p, entrywise: u(p) solves the cubic; J = 0.5 |u|^2, dJ/dp = u / (3 u^2 + 1)
    n = 4
    C = adjopt.CallbackResidual(
        lambda u, p: u**3 + u - p, lambda u, p: sp.diags([3 * u**2 + 1.0], [0]), lambda u, p: -sp.eye(n), n, n,
        second=lambda u, p, w, du, dp: (6 * u * w * du, np.zeros(n)), symmetric=True)
    J = adjopt.ReducedFunctional(C, objective=adjopt.SquaredMisfit(np.zeros(n)), solver="superlu")
    p = np.array([0.5, 2.0, -3.0, 10.0])
    u = J.state(p)
    # Newton's criterion: ||R(u)|| <= rtol ||R(0)|| = 1e-10 ||p||
    assert np.linalg.norm(u**3 + u - p) <= 1e-10 * np.linalg.norm(p)
    np.testing.assert_allclose(J.gradient(p), u / (3 * u**2 + 1), rtol=1e-10)
    # d/dp [u / (3u^2 + 1)] = (1 - 3u^2) / (3u^2 + 1)^3
    dp = np.array([1.0, -1.0, 0.5, 2.0])
    np.testing.assert_allclose(J.hessp(p, dp), (1 - 3 * u**2) / (3 * u**2 + 1) ** 3 * dp, rtol=1e-9)


def test_bad_input_gets_a_clear_error():
    msh = meshes.unit_square(3)
    dm = fem.condense(msh.n_nodes, fem.boundary_dofs(msh, "all"))
    with pytest.raises(ValueError, match="nonlinearity"):
        fem.diffusion_reaction_residual(msh, dm, diffusion="exp", nonlinearity="sine")
    with pytest.raises(ValueError, match="needs a nonlinearity"):
        fem.diffusion_reaction_residual(msh, dm, diffusion="exp", reaction=1.0)
    with pytest.raises(ValueError, match="does not depend on p"):
        fem.diffusion_reaction_residual(msh, dm, diffusion=1.0, beta=1.0)
    with pytest.raises(ValueError, match="diffusion must be"):
        fem.diffusion_reaction_residual(msh, dm, diffusion=np.nan)
    with pytest.raises(ValueError, match="beta"):
        fem.diffusion_reaction_residual(msh, dm, diffusion="exp", beta="1")
    with pytest.raises(ShapeError, match="free dofs"):
        fem.diffusion_reaction_residual(msh, dm, diffusion="exp", source=np.ones(msh.n_nodes))
    R = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", beta=1.0, source=np.ones(dm.n_free))
    with pytest.raises(ShapeError, match="u must have shape"):
        R.residual(np.ones(R.n + 1), np.zeros(R.n_params))
    with pytest.raises(adjopt.NonFiniteError):
        R.residual(np.full(R.n, np.nan), np.zeros(R.n_params))
    with pytest.raises(ShapeError):
        R.jvp(np.ones(R.n), np.zeros(R.n_params), np.ones(3))
    obj = adjopt.SquaredMisfit(np.zeros(R.n))
    with pytest.raises(ValueError, match="unknown Newton option"):
        adjopt.ReducedFunctional(R, objective=obj, newton=dict(tolerance=1e-8))
    for bad in (dict(rtol=-1.0), dict(max_iter=0), dict(line_search="yes"), dict(rtol=0.0, atol=0.0)):
        with pytest.raises(ValueError, match="newton"):
            adjopt.ReducedFunctional(R, objective=obj, newton=bad)
    with pytest.raises(TypeError, match="rhs=None"):
        adjopt.ReducedFunctional(R, np.ones(R.n), obj)
    with pytest.raises(ValueError, match="linear operator"):
        adjopt.ReducedFunctional(R, objective=obj, solver=GMGSolver((3, 3), 1, fixed=fem.boundary_dofs(msh, "all")))
    with pytest.raises(ValueError, match="self_adjoint"):
        adjopt.ReducedFunctional(R, objective=obj, self_adjoint=True)
    with pytest.raises(TypeError, match="callable"):
        adjopt.CallbackResidual(None, R.jacobian, R.vjp, R.n, R.n_params)
    with pytest.raises(ValueError, match="positive integer"):
        adjopt.CallbackResidual(R.residual, R.jacobian, R.vjp, 0, R.n_params)
    bad_shape = adjopt.CallbackResidual(lambda u, p: np.ones(2), R.jacobian, R.vjp, R.n, R.n_params)
    with pytest.raises(ShapeError, match="residual"):
        bad_shape.residual(np.ones(R.n), np.zeros(R.n_params))


# -- findings of the hostile review, each a test ---------------------------------------------------------------
def _square(n=5, values=0.0):
    msh = meshes.unit_square(n)
    return msh, fem.condense(msh.n_nodes, msh.boundary("all"), values)


def test_arrays_handed_in_are_copied():
    msh, dm = _square()
    N, G, W = fem.element_geometry(msh)
    f = np.ones(dm.n_free)
    R = adjopt.ElementResidual(msh.cells, N, G, W, n_nodes=msh.n_nodes, dofmap=dm, diffusion="exp", beta=1.0,
                               source=f)
    u, p = np.linspace(0, 1, R.n), np.zeros(R.n_params)
    r0, K0 = R.residual(u, p), R.jacobian(u, p).toarray()
    W *= 2.0
    G *= -1.0
    N[:] = 0.0
    f[:] = 7.0
    dm.full_to_free[:] = -1
    np.testing.assert_array_equal(R.residual(u, p), r0)
    np.testing.assert_array_equal(R.jacobian(u, p).toarray(), K0)


def test_the_jacobians_pattern_cannot_be_changed_in_place():
    R, _, _ = _residual("triangle", "quasilinear")
    K = R.jacobian(np.zeros(R.n), np.zeros(R.n_params))
    with pytest.raises(ValueError, match="read-only"):
        K.indices[0] = 0
    with pytest.raises(ValueError, match="read-only"):
        K.indptr[1] = 0


def test_a_tangled_quad_is_refused():
    msh = meshes.unit_square(2, cell="quad")
    pts = msh.points.copy()
    pts[4] = (-0.3, -0.3)  # the middle node pulled out of its cells: det J changes sign inside them
    bad = meshes.Mesh(pts, msh.cells, msh.cell_type, msh.boundaries)
    with pytest.raises(meshes.InvalidElementError, match="tangled"):
        fem.element_geometry(bad)


def test_a_user_coefficient_must_give_one_value_per_element():
    class Scalar(adjopt.operators.Coefficient):
        def __call__(self, p):
            return 2.0

        def d1(self, p):
            return 0.0

        def d2(self, p):
            return 0.0

    msh, dm = _square()
    R = fem.diffusion_reaction_residual(msh, dm, diffusion=Scalar(), beta=1.0, source=np.ones(dm.n_free))
    with pytest.raises(ShapeError, match="one value per element"):
        R.residual(np.zeros(R.n), np.zeros(R.n_params))


def test_more_bad_input():
    msh, dm = _square()
    with pytest.raises(ShapeError, match="one vector"):
        fem.diffusion_reaction_residual(msh, dm, diffusion="exp", source=np.ones((dm.n_free, 2)))
    with pytest.raises(TypeError, match="DofMap"):
        fem.diffusion_reaction_residual(msh, dm.free, diffusion="exp")
    N, G, W = fem.element_geometry(msh)
    with pytest.raises(ValueError, match="negative"):
        adjopt.ElementResidual(msh.cells, N, G, -W, dofmap=dm, diffusion="exp")
    R = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", beta=1.0)
    for bad, match in ((lambda u, p: None, "returned None"), (lambda u, p: R.jacobian(u, p) * 1j, "complex")):
        C = adjopt.CallbackResidual(R.residual, bad, lambda u, p: np.zeros((R.n, R.n_params)), R.n, R.n_params)
        with pytest.raises(TypeError, match=match):
            C.jacobian(np.zeros(R.n), np.zeros(R.n_params))
    C = adjopt.CallbackResidual(lambda u, p: R.residual(u, p) + 0j, R.jacobian,
                                lambda u, p: np.zeros((R.n, R.n_params)), R.n, R.n_params)
    with pytest.raises(TypeError, match="complex"):
        C.residual(np.zeros(R.n), np.zeros(R.n_params))
    C = adjopt.CallbackResidual(lambda u, p: np.full(R.n, np.nan), R.jacobian,
                                lambda u, p: np.zeros((R.n, R.n_params)), R.n, R.n_params)
    with pytest.raises(adjopt.NonFiniteError, match=r"residual\(u, p\)"):
        C.residual(np.zeros(R.n), np.zeros(R.n_params))
