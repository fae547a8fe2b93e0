"""adjopt.results: fields on the mesh, result folder (JSON, CSV, NPZ, VTU, PNG), overwrite and write errors."""

import csv
import json
import logging
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import multi_experiment  # noqa: E402
import optimal_control  # noqa: E402
import poisson_inversion  # noqa: E402
import seed_toy  # noqa: E402
import topology_compliance  # noqa: E402

import adjopt  # noqa: E402
from adjopt.errors import AdjoptError  # noqa: E402
from adjopt.results import ResultsExistError, ResultsWriteError, fields, write_results  # noqa: E402

meshio = pytest.importorskip("meshio")
pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_SOURCES = 2

CASES = {
    "poisson2d": (lambda: poisson_inversion.build(n=8), dict(method="lbfgs")),
    "topology": (lambda: topology_compliance.build("mbb", nelx=12, nely=4), dict(method="oc", xtol=0.01)),
    "multi": (lambda: multi_experiment.build(n=6, n_sources=N_SOURCES, n_obs=12), dict(method="lbfgs")),
    "poisson3d": (lambda: poisson_inversion.build(n=4, dim=3), dict(method="lbfgs")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request):
    build, options = CASES[request.param]
    problem = build()
    result = adjopt.minimize(problem, maxiter=3, **options)
    return request.param, problem, result


@pytest.fixture(scope="module")
def poisson_run():
    build, options = CASES["poisson2d"]
    problem = build()
    return problem, adjopt.minimize(problem, maxiter=3, **options)


def _strict_json(path):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)
    assert np.ptp(img[..., :3]) > 0, f"{path} is a blank image"


def test_write_results_folder(run, tmp_path):
    case, problem, result = run
    out = tmp_path / "out"
    written = write_results(out, problem, result)
    mesh = problem.meta["mesh"]
    expected = {"history.json", "history.csv", "result.npz", "fields.vtu", "convergence.png", "parameter.png", "state.png"}
    assert set(written) == expected
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left behind
    assert all(written[name] == out / name for name in expected)

    # history.json: strict JSON, f values of the history, the problem's name and options
    doc = _strict_json(out / "history.json")
    assert doc["problem"] == problem.name and doc["method"] == result.method and doc["nit"] == result.nit
    assert "x" not in doc and "jac" not in doc
    assert doc["options"] == problem.meta.get("options")
    assert [h["f"] for h in doc["history"]] == [h["f"] for h in result.history]
    assert doc["fun"] == result.fun and doc["message"] == result.message

    # history.csv: one row per history entry, the union of the keys as columns
    with open(out / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.history) == result.nit + 1
    keys = set().union(*result.history) - {"phases"}
    phase_keys = {f"phases.{k}" for h in result.history for k in h.get("phases", {})}
    assert phase_keys >= {"phases.assembly", "phases.solve", "phases.update"}
    assert set(rows[0]) == keys | phase_keys  # the per-iteration phases flattened into columns
    last = result.history[-1]
    assert float(rows[-1]["phases.solve"]) == last["phases"]["solve"]
    assert [float(r["f"]) for r in rows] == [h["f"] for h in result.history]
    assert [int(r["nit"]) for r in rows] == list(range(result.nit + 1))

    # result.npz: x, jac, state, adjoint and the counters, without pickles
    with np.load(out / "result.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["x"], result.x)
        np.testing.assert_array_equal(npz["jac"], result.jac)
        J = problem.functional
        np.testing.assert_allclose(npz["state"], J.state(result.x))
        np.testing.assert_allclose(npz["adjoint"], J.adjoint(result.x))
        assert int(npz["nit"]) == result.nit and float(npz["fun"]) == result.fun
        assert int(npz["nfev"]) == result.nfev and str(npz["method"]) == result.method

    # fields.vtu: the fields with the right sizes, the parameter equal to x on the nodes or cells
    m = meshio.read(out / "fields.vtu")
    assert m.points.shape[0] == mesh.n_nodes
    assert sum(len(b.data) for b in m.cells) == mesh.n_cells
    pd = m.point_data
    cd = {k: v[0] for k, v in m.cell_data.items()}
    N, E = mesh.n_nodes, mesh.n_cells
    if case == "topology":
        np.testing.assert_array_equal(cd["parameter"], result.x)
        np.testing.assert_allclose(cd["density"], problem.meta["filter"].forward(result.x))
        assert pd["displacement"].shape == (N, 2) and pd["adjoint"].shape == (N, 2)
        dofmap = problem.meta["dofmap"]
        u_full = pd["displacement"].ravel()  # dof = node * 2 + component
        np.testing.assert_allclose(u_full[dofmap.free], problem.functional.state(result.x))
        np.testing.assert_array_equal(u_full[dofmap.fixed], dofmap.values)
        assert "state" not in pd and "parameter" not in pd
    else:
        np.testing.assert_array_equal(pd["parameter"], result.x)
        np.testing.assert_allclose(pd["parameter_reference"], problem.meta["m_true"])
        dofs = problem.meta["dofs"]
        u = problem.functional.state(result.x)
        names = ["state"] if u.ndim == 1 else [f"state_{j + 1}" for j in range(u.shape[1])]
        if case == "multi":
            assert names == [f"state_{j + 1}" for j in range(N_SOURCES)]
        for j, name in enumerate(names):
            assert pd[name].shape == (N,)
            np.testing.assert_allclose(pd[name][dofs.free], u if u.ndim == 1 else u[:, j])
            np.testing.assert_array_equal(pd[name][dofs.fixed], 0.0)  # u = 0 on the boundary
            assert pd[name.replace("state", "adjoint")].shape == (N,)
        assert cd == {} and E == mesh.n_cells

    for name in ("convergence.png", "parameter.png", "state.png"):
        _check_png(out / name)


def test_fields_matches_the_vtu_content(run):
    case, problem, result = run
    fd = fields(problem, result.x)
    assert set(fd) == {"point_data", "cell_data"}
    mesh = problem.meta["mesh"]
    for v in fd["point_data"].values():
        assert v.shape[0] == mesh.n_nodes
    for v in fd["cell_data"].values():
        assert v.shape[0] == mesh.n_cells
    if case == "multi":
        assert {"state_1", "state_2", "adjoint_1", "adjoint_2"} <= set(fd["point_data"])


def test_second_write_needs_force(poisson_run, tmp_path):
    problem, result = poisson_run
    out = tmp_path / "run"
    write_results(out, problem, result, pictures=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ResultsExistError, match="--force") as info:
        write_results(out, problem, result, pictures=False)
    assert isinstance(info.value, AdjoptError) and "--out" in str(info.value) and str(out) in str(info.value)
    # a stale picture of an earlier run is removed by a forced rewrite that does not draw it; other files stay
    (out / "state.png").write_bytes(PNG_SIGNATURE)
    written = write_results(out, problem, result, force=True, pictures=False)
    assert "state.png" not in written and not (out / "state.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    doc = _strict_json(out / "history.json")
    assert doc["nit"] == result.nit


def test_existing_empty_folder_is_fine(poisson_run, tmp_path):
    problem, result = poisson_run
    written = write_results(tmp_path, problem, result, pictures=False)
    assert (tmp_path / "history.json").is_file() and "fields.vtu" in written


def test_folder_under_a_file_raises_write_error(poisson_run, tmp_path):
    problem, result = poisson_run
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for target in (blocker / "results", blocker):
        with pytest.raises(ResultsWriteError) as info:
            write_results(target, problem, result, pictures=False)
        msg = str(info.value)
        assert str(target) in msg and "--out" in msg
        assert isinstance(info.value, OSError) and isinstance(info.value, AdjoptError)
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_raises_write_error(poisson_run, tmp_path):
    problem, result = poisson_run
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ResultsWriteError, match="permission"):
            write_results(ro / "sub", problem, result, pictures=False)
        with pytest.raises(ResultsWriteError, match="permission"):
            write_results(ro, problem, result, pictures=False)
    finally:
        ro.chmod(0o755)


def test_permission_errors_become_write_errors(poisson_run, tmp_path, monkeypatch):
    """What a non-root user sees on a read-only folder (simulated: the tests may run as root)."""
    problem, result = poisson_run
    import adjopt.results as results

    existing = tmp_path / "existing"
    existing.mkdir()
    monkeypatch.setattr(results.os, "access", lambda path, mode: False)
    with pytest.raises(ResultsWriteError, match="no write permission") as info:
        write_results(existing, problem, result, pictures=False)
    assert str(existing) in str(info.value)
    monkeypatch.undo()

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(results.Path, "mkdir", denied)
    with pytest.raises(ResultsWriteError, match="permission denied") as info:
        write_results(tmp_path / "new", problem, result, pictures=False)
    assert str(tmp_path / "new") in str(info.value) and "--out" in str(info.value)
    monkeypatch.undo()

    def fail_replace(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(results.os, "replace", fail_replace)
    with pytest.raises(ResultsWriteError, match="history.json"):
        write_results(tmp_path / "new2", problem, result, pictures=False)
    monkeypatch.undo()
    assert os.listdir(tmp_path / "new2") == []  # the temporary file was removed


def test_problem_without_mesh_writes_data_and_convergence(tmp_path, caplog):
    problem = seed_toy.build()
    result = adjopt.minimize(problem, method="lbfgs", maxiter=3)
    with caplog.at_level(logging.WARNING, logger="adjopt.results"):
        fd = fields(problem, result.x)
        written = write_results(tmp_path / "toy", problem, result)
    assert fd == {"point_data": {}, "cell_data": {}}
    assert "no mesh" in caplog.text
    assert set(written) == {"history.json", "history.csv", "result.npz", "convergence.png"}
    _check_png(written["convergence.png"])


def test_unknown_state_layout_is_skipped_with_a_reason(tmp_path, caplog):
    problem = optimal_control.build(n=4)  # the state lives on the free (interior) nodes only
    problem.meta.pop("dofs", None)  # without a DofMap its rows cannot be placed on the mesh
    problem.meta.pop("dofmap", None)
    result = adjopt.minimize(problem, method="lbfgs", maxiter=2)
    with caplog.at_level(logging.WARNING, logger="adjopt.results"):
        fd = fields(problem, result.x)
        written = write_results(tmp_path / "oc", problem, result)
    assert set(fd["point_data"]) == {"parameter", "parameter_reference"}  # z and z_exact
    assert "skipped state" in caplog.text and "DofMap" in caplog.text
    assert "state.png" not in written and {"fields.vtu", "parameter.png"} <= set(written)
    _check_png(written["parameter.png"])


def test_mismatched_parameter_is_skipped(poisson_run, caplog):
    problem, result = poisson_run

    class Fake:  # a functional whose parameter size fits neither nodes nor cells
        def state(self, x):
            return np.ones(3)

        def adjoint(self, x):
            raise RuntimeError("no adjoint here")

    fake = adjopt.Problem.__new__(adjopt.Problem)
    fake.functional, fake.meta, fake.name = Fake(), problem.meta, "fake"
    with caplog.at_level(logging.WARNING, logger="adjopt.results"):
        fd = fields(fake, np.zeros(7))
    assert fd == {"point_data": {}, "cell_data": {}}
    assert "parameter: 7 values" in caplog.text and "no adjoint here" in caplog.text


def test_missing_matplotlib_skips_pictures(poisson_run, tmp_path, monkeypatch, caplog):
    problem, result = poisson_run
    import adjopt.results as results

    monkeypatch.setattr(results, "_matplotlib", lambda: None)
    with caplog.at_level(logging.WARNING, logger="adjopt.results"):
        written = write_results(tmp_path / "nopics", problem, result)
    assert not any(name.endswith(".png") for name in written)
    assert "matplotlib is not installed" in caplog.text
    assert (tmp_path / "nopics" / "fields.vtu").is_file()


def test_a_space_time_parameter_is_placed_block_by_block():
    """K blocks of free-dof values (the heat source inversion's source at K time nodes) become parameter_1..K."""
    import heat_source_inversion  # noqa: E402

    problem = heat_source_inversion.build(n=8, n_steps=10)
    meta = problem.meta
    K, nf = meta["nodes"].size, meta["dofs"].n_free
    x = np.arange(K * nf, dtype=float)
    fd = fields(problem, x)
    names = {f"parameter_{k + 1}" for k in range(K)}
    assert names <= set(fd["point_data"])
    for k in range(K):
        np.testing.assert_array_equal(fd["point_data"][f"parameter_{k + 1}"], meta["dofs"].expand(x[k * nf:(k + 1) * nf]))
