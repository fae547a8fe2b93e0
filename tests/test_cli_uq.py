"""adjopt uq end to end, in subprocesses: the files and their contents, a MAP point read from a finished run,
and bad input (exit status 2 with one line saying what to do)."""

import json
import subprocess
import sys

import numpy as np
import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def adjopt(*args, check=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "adjopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


BAYES = ("poisson_inversion", "--regularization", "bilaplacian", "--n", "8")


def test_uq_writes_eigenvalues_variance_samples_and_fields(tmp_path):
    out = tmp_path / "uq"
    proc = adjopt("uq", *BAYES, "--rank", 12, "--samples", 2, "--out", out, "--save-vectors", check=0)
    assert "Hessian actions" in proc.stdout and "results in" in proc.stdout
    info = json.loads((out / "uq.json").read_text())
    assert info["rank"] == 12 and info["n_params"] == 81 and info["samples"] == 2
    assert info["hessian_actions"] <= 2 * (12 + 10)
    lam = np.array(info["eigenvalues"])
    assert np.all(np.diff(lam) <= 0) and lam[0] > 1
    assert info["map_success"] is True and info["decrement"] < 0.1
    assert 0 < info["variance_reduction"] < 1 and info["kl_divergence"] > 0
    with np.load(out / "uq.npz") as data:
        np.testing.assert_allclose(data["eigenvalues"], lam)
        assert data["samples"].shape == (81, 2) and data["eigenvectors"].shape == (81, 12)
        assert np.all(data["posterior_variance"] <= data["prior_variance"] * (1 + 1e-12))
        assert np.all(data["posterior_variance"] > 0)
    for name in ("eigenvalues.png", "variance.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == PNG
    meshio = pytest.importorskip("meshio")
    vtu = meshio.read(out / "fields.vtu")
    assert {"map", "posterior_variance", "prior_std", "sample_1", "sample_2", "eigenvector_1"} <= set(vtu.point_data)
    np.testing.assert_allclose(vtu.point_data["map"], np.load(out / "uq.npz")["map"])


def test_uq_reads_the_map_point_of_a_finished_run(tmp_path):
    run = tmp_path / "run"
    adjopt("run", *BAYES, "--out", run, "--no-pictures", "-q", check=0)
    out = tmp_path / "uq"
    proc = adjopt("uq", *BAYES, "--rank", 8, "--result", run, "--out", out, "--no-pictures", "--gauss-newton",
                  "--passes", 1, check=0)
    assert "read from" in proc.stdout
    info = json.loads((out / "uq.json").read_text())
    assert info["map_source"] == str(run) and info["gauss_newton"] is True and info["passes"] == 1
    with np.load(run / "result.npz") as r, np.load(out / "uq.npz") as u:
        np.testing.assert_array_equal(r["x"], u["map"])
    assert not (out / "eigenvalues.png").exists()


@pytest.mark.parametrize("args, message", [
    (("poisson_inversion", "--n", "8", "--regularization", "tv"), "no prior term.*bilaplacian"),
    ((*BAYES, "--rank", "0"), "--rank must be"),
    ((*BAYES, "--rank", "82"), "exceeds the 81 parameters"),
    ((*BAYES, "--passes", "3"), "invalid choice"),
    ((*BAYES, "--result", "/nonexistent/result.npz"), "no such file"),
    ((*BAYES, "--solver", "nosuch"), "unknown solver"),
    ((*BAYES, "--bogus", "1"), "unknown option --bogus"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    import re

    proc = adjopt("uq", *args, "--out", tmp_path / "o", check=2)
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written, no folder left behind


def test_a_result_of_another_problem_and_a_full_folder_are_refused(tmp_path):
    bad = tmp_path / "result.npz"
    np.savez(bad, x=np.zeros(5))
    proc = adjopt("uq", *BAYES, "--result", bad, "--out", tmp_path / "o", check=2)
    assert "shape (5,)" in proc.stderr and "81 parameters" in proc.stderr
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full(81, np.nan))
    assert "NaN" in adjopt("uq", *BAYES, "--result", nan, "--out", tmp_path / "o", check=2).stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "not empty" in adjopt("uq", *BAYES, "--rank", 4, "--out", full, check=2).stderr
    assert (full / "keep.txt").read_text() == "mine"


def test_problem_seed_result_checks_and_stale_files(tmp_path):
    out = tmp_path / "uq"
    adjopt("uq", *BAYES, "--seed", 3, "--rank", 4, "--samples", 1, "--out", out, check=0)
    info = json.loads((out / "uq.json").read_text())
    assert info["options"]["seed"] == 3 and info["sample_seed"] == 0  # --seed reached build()
    assert (out / "eigenvalues.png").exists()
    # a rerun with --force and no pictures removes the earlier run's pictures
    adjopt("uq", *BAYES, "--rank", 4, "--out", out, "--force", "--no-pictures", check=0)
    assert not (out / "eigenvalues.png").exists() and not (out / "variance.png").exists()
    # a finished run of other options is refused as the MAP point of this problem
    run = tmp_path / "run"
    adjopt("run", *BAYES, "--seed", 3, "--out", run, "--no-pictures", "-q", check=0)
    proc = adjopt("uq", *BAYES, "--result", run, "--out", tmp_path / "o", check=2)
    assert "other options" in proc.stderr and "seed" in proc.stderr
    np.save(tmp_path / "plain.npy", np.zeros(81))
    proc = adjopt("uq", *BAYES, "--result", tmp_path / "plain.npy", "--out", tmp_path / "o", check=2)
    assert "not the result.npz" in proc.stderr
    # the default rank is at most the number of parameters
    proc = adjopt("uq", "poisson_inversion", "--regularization", "bilaplacian", "--n", "4", "--out",
                  tmp_path / "small", "--no-pictures", check=0)
    assert json.loads((tmp_path / "small" / "uq.json").read_text())["rank"] <= 25


def test_a_map_point_that_is_not_one_fails_cleanly(tmp_path):
    proc = adjopt("uq", *BAYES, "--max-iter", 0, "--rank", 6, "--out", tmp_path / "o")
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert "did not converge" in proc.stderr or "not positive definite" in proc.stderr
