"""advection_diffusion_initial_condition: a transient inverse problem (u(0) = p) through a nonsymmetric SUPG operator.

Derivatives against a dense step-by-step march and the exact quadratic form written here with numpy, Taylor
rates, the Hessian of a quadratic J (symmetric, linear in dp, independent of p), a regression value, the
reconstruction, the divergence-free vortex, and ``adjopt run``.
"""

import advection_diffusion_initial_condition as adic
import numpy as np
import pytest

import adjopt
from adjopt import fem
from adjopt.cli import main as adjopt_cli
from adjopt.transient import TransientReducedFunctional
from adjopt.verify import check_hessian_symmetry, finite_difference_gradient, independent_evaluations, taylor_test

TINY = dict(n=6, n_steps=8, obs_times=(0.25, 0.5, 1.0), sensors=2)


@pytest.fixture(scope="module")
def small():
    return adic.build(n=8, n_steps=12, sensors=3)


def _dense_parts(problem):
    """(A, M, B, P, data, sigma, R, dt, steps) as dense arrays, assembled here from the mesh."""
    meta = problem.meta
    msh, free = meta["mesh"], meta["dofs"].free
    N = msh.n_nodes
    A = fem.assemble(msh.cells, fem.advection_diffusion(msh, meta["velocity"], meta["kappa"]), N)[free][:, free]
    M = fem.assemble(msh.cells, fem.p1_mass(msh), N)[free][:, free]
    P = np.eye(N)[free]  # u_0 = p at the free nodes
    B = meta["observation_operator"].toarray()
    dt = float(meta["time"].dt[0])
    return (A.toarray(), M.toarray(), B, P, meta["data"], meta["sigma"], meta["regularization"].toarray(), dt,
            meta["steps"])


def _dense_march(A, M, U0, dt, n_steps, scheme):
    """[U_0, ..., U_N] for columns U0 (n, k): each step a dense solve of the scheme's equation."""
    out = [U0]
    for k in range(1, n_steps + 1):
        if scheme == "crank_nicolson":
            U = np.linalg.solve(M + 0.5 * dt * A, (M - 0.5 * dt * A) @ out[-1])
        elif scheme == "implicit_euler" or k == 1:  # BDF2 starts with an implicit-Euler step
            U = np.linalg.solve(M + dt * A, M @ out[-1])
        else:  # BDF2: (3/2 M + dt A) u_k = 2 M u_{k-1} - 1/2 M u_{k-2}
            U = np.linalg.solve(1.5 * M + dt * A, M @ (2.0 * out[-1] - 0.5 * out[-2]))
        out.append(U)
    return out


def _quadratic_form(problem):
    """(H, b, c) with J(p) = 0.5 p^T H p - b^T p + c, from the dense march of the identity."""
    A, M, B, P, data, sigma, R, dt, steps = _dense_parts(problem)
    opts = problem.meta["options"]
    U = _dense_march(A, M, P, dt, opts["n_steps"], opts["scheme"])  # u_k = U[k] p
    H, b, c = R.copy(), np.zeros(P.shape[1]), 0.0
    for i, s in enumerate(steps):
        G = B @ U[s]
        H += G.T @ G / sigma**2
        b += G.T @ data[i] / sigma**2
        c += 0.5 * float(data[i] @ data[i]) / sigma**2
    return H, b, c


def test_shapes_and_meta(small):
    J, meta = small.functional, small.meta
    assert isinstance(J, TransientReducedFunctional)
    assert J.n_params == meta["mesh"].n_nodes == 81 and J.n == meta["dofs"].n_free == 49
    assert J.time.n_steps == 12 and meta["steps"].tolist() == [3, 6, 12]
    assert meta["data"].shape == (3, 9) and meta["observation_points"].shape == (9, 2)
    np.testing.assert_allclose(meta["p_true"], adic.true_initial_condition(meta["mesh"].points))
    assert meta["p_true"].max() == 0.5  # the flat top


def test_operator_is_nonsymmetric_and_the_vortex_divergence_free(small):
    meta = small.meta
    msh, free = meta["mesh"], meta["dofs"].free
    A = fem.assemble(msh.cells, fem.advection_diffusion(msh, meta["velocity"], meta["kappa"]), msh.n_nodes)
    A = A[free][:, free]
    assert abs(A - A.T).max() > 0.1 * abs(A).max()
    # sum_T |T| v_T . grad N_a = 0 for every node a, boundary nodes included (divergence-free, v . n = 0)
    grad, vol = adic._p1_gradients(msh)
    flux = np.zeros(msh.n_nodes)
    np.add.at(flux, msh.cells, vol[:, None] * np.einsum("ead,ed->ea", grad, meta["velocity"]))
    assert np.abs(flux).max() < 1e-15
    speed = np.linalg.norm(adic.velocity_field(adic.meshes.unit_square(32)), axis=1)
    assert 0.99 < speed.max() <= 1.0


@pytest.mark.parametrize("scheme", adic.SCHEMES)
def test_against_the_dense_quadratic_form(scheme):
    # value, gradient and Hessian action against the dense step-by-step march of the scheme (numpy here)
    pb = adic.build(**TINY, scheme=scheme)
    J = pb.functional
    H, b, c = _quadratic_form(pb)
    rng = np.random.default_rng(7)
    p, v = rng.standard_normal(J.n_params), rng.standard_normal(J.n_params)
    assert J.value(p) == pytest.approx(0.5 * p @ H @ p - b @ p + c, rel=1e-11)
    g = H @ p - b
    np.testing.assert_allclose(J.gradient(p), g, rtol=0, atol=1e-10 * np.abs(g).max())
    np.testing.assert_allclose(J.hessp(p, v), H @ v, rtol=0, atol=1e-10 * np.abs(H @ v).max())
    # the dense march also reproduces the data-free value J(0) = c
    assert J.value(pb.p0) == pytest.approx(c, rel=1e-12)


def test_gradient_against_central_differences():
    # J is quadratic: central differences are exact up to round-off, at any step
    pb = adic.build(**TINY)
    J = pb.functional
    p = np.random.default_rng(2).standard_normal(J.n_params)
    g = J.gradient(p)
    with independent_evaluations(J):
        fd = finite_difference_gradient(J, p, h=1e-3)
    np.testing.assert_allclose(g, fd, rtol=0, atol=1e-7 * np.abs(g).max())


def test_taylor_rates(small):
    J = small.functional
    p = 0.5 * small.meta["p_true"] + 0.1 * np.random.default_rng(3).standard_normal(J.n_params)
    r2 = taylor_test(J, p, order=2)
    assert r2.passed and r2.rate >= 1.9, r2.table()
    r3 = taylor_test(J, p, order=3)
    assert r3.passed and not r3.rate < 2.8, r3.table()  # J quadratic: the remainder is at round-off


def test_hessian_symmetric_linear_and_independent_of_p(small):
    J = small.functional
    rng = np.random.default_rng(4)
    p1, p2, v, w = (rng.standard_normal(J.n_params) for _ in range(4))
    assert check_hessian_symmetry(J, p1) < 1e-8
    Hv, Hw = J.hessp(p1, v), J.hessp(p1, w)
    scale = np.abs(Hv).max() + np.abs(Hw).max()
    np.testing.assert_allclose(J.hessp(p1, 2.0 * v - 3.0 * w), 2.0 * Hv - 3.0 * Hw, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(J.hessp(p2, v), Hv, rtol=0, atol=1e-12 * scale)
    # A and M do not depend on p: the Gauss-Newton Hessian is the Hessian
    np.testing.assert_allclose(J.hessp(p2, v, gauss_newton=True), Hv, rtol=0, atol=1e-12 * scale)
    # and the gradient is affine: g(p + v) - g(p) = H v
    np.testing.assert_allclose(J.gradient(p1 + v) - J.gradient(p1), Hv, rtol=0, atol=1e-10 * np.abs(Hv).max())


def test_regression_values(small):
    # measured with this implementation (n = 8, 12 Crank-Nicolson steps, 3 x 3 sensors, seed 0, p = 0)
    J = small.functional
    assert J.value(small.p0) == pytest.approx(13497.54497125556, rel=1e-8)
    assert np.linalg.norm(J.gradient(small.p0)) == pytest.approx(47421.99832876199, rel=1e-8)


def test_solve_is_the_minimizer_of_the_quadratic_form():
    pb = adic.build(**TINY)
    H, b, _ = _quadratic_form(pb)
    exact = np.linalg.solve(H, b)
    x = adic.solve(pb)
    np.testing.assert_allclose(x, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


def test_reconstruction_is_closer_to_the_truth():
    # measured 0.278 (n = 16, 20 steps, 5 x 5 sensors); p = 0 has relative error 1
    pb = adic.build(n=16, n_steps=20, sensors=5)
    x = adic.solve(pb)
    assert adic.relative_error(pb, pb.p0) == pytest.approx(1.0)
    err = adic.relative_error(pb, x)
    assert err < 0.35, err
    # the blob is found where it was released
    pts = pb.meta["mesh"].points
    peak = pts[np.argmax(x)]
    assert np.linalg.norm(peak - np.array(adic.CENTER)) < 0.1, peak
    # the boundary values do not enter the march; the regularization holds them at 0
    assert np.abs(x[pb.meta["dofs"].fixed]).max() < 1e-8 * np.abs(x).max()


def test_reconstruction_improves_with_the_mesh():
    # measured 0.278 (n = 16), 0.254 (n = 24, 40 steps)
    errs = [adic.relative_error(pb, adic.solve(pb))
            for pb in (adic.build(n=16, n_steps=20, sensors=5), adic.build(n=24, n_steps=40, sensors=5))]
    assert errs[1] < errs[0] < 0.35, errs


def test_solve_reports_nonconvergence():
    pb = adic.build(**TINY)
    with pytest.raises(adjopt.optimize.OptimizationError, match="did not reach gtol"):
        adic.solve(pb, maxiter=1, eta_max=0.5, preconditioner="l2")


def test_adjopt_run_writes_the_pictures(tmp_path, capsys):
    out = tmp_path / "run"
    status = adjopt_cli(["run", "advection_diffusion_initial_condition", "--n", "8", "--n-steps", "12",
                         "--sensors", "3", "--out", str(out), "-q"])
    assert status == 0, capsys.readouterr()
    for name in ("parameter.png", "state.png", "fields.vtu", "result.npz"):
        assert (out / name).is_file(), name
    with np.load(out / "result.npz") as res:
        assert res["x"].shape == (81,) and res["state"].shape == (49,)  # u at the final time, free dofs


def test_plot_writes_a_png(small, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "strip.png"
    adic.plot(small, small.meta["p_true"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=1), "n must be an integer >= 2"),
    (dict(n=4.5), "n must be an integer >= 2"),
    (dict(kappa=0.0), "kappa must be a positive"),
    (dict(speed=-1.0), "speed must be a non-negative"),
    (dict(t_end=float("nan")), "t_end must be a positive"),
    (dict(n_steps=0), "n_steps must be an integer >= 1"),
    (dict(scheme="theta"), "scheme must be one of"),
    (dict(obs_times=(0.0, 0.5)), r"obs_times must lie in \(0, t_end"),
    (dict(obs_times=(0.5, 2.0)), r"obs_times must lie in \(0, t_end"),
    (dict(obs_times=(0.55,)), "is not a time level"),
    (dict(obs_times=(0.5, 0.5)), "must be distinct"),
    (dict(obs_times=()), "one or more finite times"),
    (dict(sensors=0), "sensors must be an integer >= 1"),
    (dict(noise=-0.1), "noise must be a non-negative"),
    (dict(gamma=0.0), "gamma must be a positive"),
    (dict(delta=float("inf")), "delta must be a positive"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adic.build(**{"n": 4, "n_steps": 10, **kwargs})
