"""The Poisson log-conductivity inversion (problems/poisson_inversion.py): derivatives, values, options."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import poisson_inversion  # noqa: E402

from adjopt.verify import check_hessian_symmetry, taylor_test  # noqa: E402


def smooth_point(problem):
    """A smooth nonzero nodal field: 0.5 sin(pi x) sin(pi y) (sin(pi z)) + 0.2 x."""
    x = problem.meta["mesh"].points
    return 0.5 * np.prod(np.sin(np.pi * x), axis=1) + 0.2 * x[:, 0]


@pytest.fixture(scope="module")
def problem():
    return poisson_inversion.build(n=8)


def test_shapes_and_meta(problem):
    J, mesh = problem.functional, problem.meta["mesh"]
    assert problem.p0.shape == (mesh.n_nodes,) and not problem.p0.any()
    assert J.n_params == mesh.n_nodes
    assert J.matrix.n_params == mesh.n_cells
    assert J.matrix.shape[0] == (8 - 1) ** 2  # interior nodes only
    assert problem.meta["observation_points"].shape == (50, 2)
    pts = problem.meta["observation_points"]
    assert pts.min() >= 0.1 and pts.max() <= 0.9
    assert problem.meta["m_true"].shape == (mesh.n_nodes,)


@pytest.mark.parametrize("where", ["p0", "smooth"])
def test_taylor_rates(problem, where):
    J = problem.functional
    p = problem.p0 if where == "p0" else smooth_point(problem)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9


def test_hessian_symmetric(problem):
    assert check_hessian_symmetry(problem.functional, smooth_point(problem)) < 1e-8


def test_regression_values(problem):
    # regression values measured from this implementation (n=8, dim=2, defaults, seed=0)
    J, p = problem.functional, problem.p0
    np.testing.assert_allclose(J.value(p), 1339.037806506935, rtol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(J.gradient(p)), 3238.7134106902213, rtol=1e-8)


def test_gradient_matches_central_differences(problem):
    J = problem.functional
    p = smooth_point(problem)
    g = J.gradient(p)
    rng = np.random.default_rng(42)
    h = 1e-5
    for _ in range(3):
        v = rng.standard_normal(p.size)
        fd = (J.value(p + h * v) - J.value(p - h * v)) / (2 * h)
        np.testing.assert_allclose(g @ v, fd, rtol=1e-5)


def test_data_are_observations_of_the_true_state(problem):
    J, meta = problem.functional, problem.meta
    u = J.state(meta["m_true"])
    np.testing.assert_allclose(meta["observation_operator"] @ u, meta["data_clean"], rtol=1e-10)
    noise = meta["data"] - meta["data_clean"]
    assert 0 < np.abs(noise).max() < 0.05 * np.abs(meta["data_clean"]).max()


def test_three_dimensions_tiny():
    problem = poisson_inversion.build(n=3, dim=3)
    J = problem.functional
    assert problem.meta["mesh"].cell_type == "tetra"
    assert problem.meta["observation_points"].shape == (50, 3)
    p = smooth_point(problem)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9
    assert check_hessian_symmetry(J, p) < 1e-8


def test_total_variation():
    problem = poisson_inversion.build(n=8, regularization="tv")
    J = problem.functional
    p = smooth_point(problem)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9
    assert check_hessian_symmetry(J, p) < 1e-8
    # at p0 = 0 the TV term is alpha * eps * area: J differs from the h1 version by that only
    h1 = poisson_inversion.build(n=8)
    np.testing.assert_allclose(J.value(problem.p0) - h1.functional.value(h1.p0), 10.0 * 1e-2, rtol=1e-8)


def test_bilaplacian_prior():
    import adjopt

    problem = poisson_inversion.build(n=8, regularization="bilaplacian")
    J = problem.functional
    p = smooth_point(problem)
    assert taylor_test(J, p, order=2).rate >= 1.9
    assert taylor_test(J, p, order=3).rate >= 2.9
    assert check_hessian_symmetry(J, p) < 1e-8
    prior = problem.meta["regularization"]
    assert isinstance(prior, adjopt.BiLaplacianPrior) and problem.meta["options"]["alpha"] == 1.0
    assert prior.correlation_length == pytest.approx(poisson_inversion.PRIOR_LENGTH)
    assert prior.marginal_std == pytest.approx(poisson_inversion.PRIOR_STD)
    # J is the misfit plus 0.5 ||p||_R^2: the h1 problem's misfit (same data) plus the prior's value
    h1 = poisson_inversion.build(n=8)
    reg = h1.meta["regularization"]
    misfit = h1.functional.value(p) - reg.value(None, p)
    np.testing.assert_allclose(J.value(p), misfit + prior.value_p(p), rtol=1e-12)
    np.testing.assert_allclose(J.value(p), misfit + 0.5 * p @ prior.precision(p), rtol=1e-12)
    # alpha scales the prior's precision
    J2 = poisson_inversion.build(n=8, regularization="bilaplacian", alpha=2.0).functional
    np.testing.assert_allclose(J2.value(p) - J.value(p), prior.value_p(p), rtol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(regularization="l1"), "unknown regularization 'l1'; known: h1, tv, bilaplacian"),
    (dict(n=1), "n"),
    (dict(n=2.5), "n"),
    (dict(dim=1), "dim must be 2"),
    (dict(dim=4), "dim must be 2"),
    (dict(n_obs=0), "n_obs"),
    (dict(noise=-1.0), "noise"),
    (dict(alpha=-1.0), "alpha"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        poisson_inversion.build(**{"n": 4, **kwargs})


def test_truth_fits_better_than_the_start():
    # with the misfit weighted by 1/sigma^2, J(m_true) is about n_obs/2 and far below J(0)
    problem = poisson_inversion.build(n=16, n_obs=30)
    J = problem.functional
    assert J.value(problem.meta["m_true"]) < 0.1 * J.value(problem.p0)
    assert J.value(problem.meta["m_true"]) < 3 * 30 / 2


def test_a_mesh_file_builds_the_same_problem_as_its_generator(tmp_path):
    pytest.importorskip("meshio")
    from adjopt.mesh import unit_square, write_vtu

    write_vtu(tmp_path / "square.vtu", unit_square(10))
    from_file = poisson_inversion.build(mesh_file=str(tmp_path / "square.vtu"), n_obs=20)
    generated = poisson_inversion.build(n=10, n_obs=20)
    p = np.linspace(-0.3, 0.3, generated.p0.size)
    assert from_file.functional.value(p) == pytest.approx(generated.functional.value(p), rel=1e-12)
    np.testing.assert_allclose(from_file.functional.gradient(p), generated.functional.gradient(p), rtol=1e-10,
                               atol=1e-12)
    assert from_file.meta["options"]["mesh_file"] == str(tmp_path / "square.vtu")
    with pytest.raises(FileNotFoundError, match="mesh file not found"):
        poisson_inversion.build(mesh_file=str(tmp_path / "missing.vtu"))
    from adjopt.mesh import rectangle

    write_vtu(tmp_path / "quads.vtu", rectangle(3, 3, cell="quad"))
    with pytest.raises(ValueError, match="needs triangles"):
        poisson_inversion.build(mesh_file=str(tmp_path / "quads.vtu"))


def test_a_resume_on_a_mesh_file_that_changed_is_refused(tmp_path):
    """The options hold a digest of the file: the same name with other contents (here the nodes in another
    order, which is p's order) is another problem, and --resume says so instead of continuing on it."""
    pytest.importorskip("meshio")
    from adjopt import cli
    from adjopt.mesh import Mesh, unit_square, write_vtu

    path = str(tmp_path / "square.vtu")
    m = unit_square(8)
    write_vtu(path, m)
    assert poisson_inversion.build(mesh_file=path, n_obs=10).meta["options"]["mesh_sha1"] == \
        poisson_inversion.build(mesh_file=path, n_obs=10).meta["options"]["mesh_sha1"]
    out = str(tmp_path / "run")
    args = ["run", "poisson_inversion", "--mesh-file", path, "--n-obs", "10", "--method", "lbfgs", "--no-pictures",
            "-q", "--out", out]
    assert cli.main([*args, "--max-iter", "2"]) in (0, 1)
    perm = np.random.default_rng(0).permutation(m.n_nodes)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(m.n_nodes)
    write_vtu(path, Mesh(m.points[perm], inv[m.cells], "triangle"))
    assert cli.main([*args, "--max-iter", "4", "--resume"]) == 2
