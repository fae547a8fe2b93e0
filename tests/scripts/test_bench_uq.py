"""The UQ benchmark runs end to end at tiny sizes (--quick, in-process) and writes sane figures atomically."""

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_uq
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return bench_uq


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (sizes 8 16, spectrum 8 16, rank 10): (json, stdout, folder, exit status)."""
    folder = tmp_path_factory.mktemp("bench_uq")
    out = folder / "uq.json"
    mod = _module()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = mod.main(["--quick", "--no-compare", "16", "--out", str(out), "--no-warmup"])
    return json.loads(out.read_text()), buf.getvalue(), folder, code


def test_bench_uq_quick_run(quick):
    data, stdout, folder, code = quick
    assert code == 0 and data["complete"]
    assert "Laplace posterior" in stdout and "Newton-CG" in stdout and "Spectrum under refinement" in stdout
    assert data["command"].startswith("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_uq.py --quick")
    assert set(data["env_unset"]) == {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    assert data["env_unset_ok"] == all(v is None for v in data["env_unset"].values())
    info = data["info"]
    assert info["cpus"] >= 1 and "git" in info and "thread_env" in info["blas"] and "threadpools" in info["blas"]
    assert len(data["loadavg_before"]) == 3 and len(data["loadavg_after"]) == 3
    cfg = data["config"]
    assert cfg["quick"] and cfg["rank"] == 10 and cfg["sizes"] == [8, 16] and cfg["spectrum_sizes"] == [8, 16]
    assert cfg["compare_sizes"] == [8] and data["compare_skipped"] == {"sizes": [16], "reason": "--no-compare"}
    assert data["summary"]["sizes_failed"] == 0 and data["summary"]["spectrum_failed"] == 0
    assert not list(folder.glob("*.tmp"))  # written atomically


def test_bench_uq_quick_sizes(quick):
    data = quick[0]
    rows = {r["n"]: r for r in data["sizes"]}
    assert sorted(rows) == [8, 16]
    for n, r in rows.items():
        assert r["nodes"] == (n + 1) ** 2 and r["unknowns"] == (n - 1) ** 2
        assert _positive(r["t_value"]) and _positive(r["build_s"]) and len(r["t_values"]) == 2
        assert r["value_factorizations"] == [1, 1]  # a new p each: nothing cached
        low = r["newton_lowrank"]
        assert low["success"] and low["relative_stationarity"] <= data["config"]["gtol"]
        assert low["nhessp"] == low["cg_iterations"] + low["actions_outside_cg"] and low["nit"] >= 1
        # the preconditioner: one randomized double pass of rank 40 + 10 (fewer: the parameters, a rank-deficient sketch)
        assert 0 < low["actions_outside_cg"] <= 2 * min(50, r["nodes"])
        assert len(low["cg_per_step"]) == low["nit"] and low["reached"]["1e-08"]["nhessp"] <= low["nhessp"]
        post = r["posterior"]
        k = min(post["rank"] + post["oversampling"], r["nodes"])
        assert post["actions"] <= 2 * k and post["actions"] == post["hessp_columns"] and post["actions_expected"] == 2 * k
        lam = post["eigenvalues"]
        assert len(lam) == post["rank_returned"] <= 10 and all(a >= b for a, b in zip(lam, lam[1:]))
        assert lam[0] > 1 and all(math.isfinite(x) for x in post["residuals"])
        # relative residuals: small for the leading pair, larger down the sketch (20 columns, 50 observations)
        assert post["residuals"][0] < 1e-2 and post["max_residual_leading10"] < 1
        for key in ("seconds", "ratio_values", "t_hessp_blocks", "t_prior", "t_variance", "kl_divergence"):
            assert _positive(post[key]), key
        assert post["ratio_values"] == pytest.approx(post["seconds"] / r["t_value"])
        assert isinstance(post["met_values"], bool) and post["values_target"] == 12
        assert post["decrement"] < 0.1 and not post["warnings"]  # at the MAP point: no stationarity warning
        s = post["singles"]
        assert s["count"] == 2 and len(s["times"]) == 2 and _positive(s["t_single_action"])
        assert s["t_singles_scaled"] == pytest.approx(s["t_single_action"] * post["actions"])
        assert _positive(s["blocked_saving"]) and _positive(s["ratio_values_scaled"])
        assert s["blocked_saving_median"] == pytest.approx(s["t_single_median"] * post["actions"] / post["t_hessp_blocks"])
        assert post["variance_method"] == "exact" and post["variance_min_max_mean"][0] > 0
    h1 = rows[8]["newton_h1"]
    assert h1["success"] and h1["preconditioner"] == "h1" and h1["actions_outside_cg"] == 0
    assert h1["map_rel_diff_to_lowrank"] < 1e-4  # the same MAP point
    cmp_ = rows[8]["compare"]
    assert cmp_["both_converged"] and _positive(cmp_["actions_ratio_h1_over_lowrank"])
    assert rows[16]["newton_h1"] == {"skipped": "--no-compare"} and rows[16]["compare"] is None


def test_bench_uq_quick_spectrum(quick):
    data, _, folder, _ = quick
    spec = data["spectrum"]
    assert spec["rank"] == 10 and [r["n"] for r in spec["rows"]] == [8, 16]
    for r in spec["rows"]:
        lam = r["eigenvalues"]
        assert len(lam) == 10 and all(a >= b for a, b in zip(lam, lam[1:])) and lam[0] > 1
        assert r["actions"] <= 2 * (10 + 10)
    assert spec["rows"][1]["map_from"].startswith("the --sizes run")  # n = 16 reuses step 1's MAP point
    d = spec["differences"]
    assert d["finest"] == 16 and d["leading"] == [10]
    diff = d["vs_finest"]["8"]["10"]
    assert _positive(diff) and diff < 1 and d["vs_next"]["8/16"]["10"] == diff
    if spec["plot"] is not None:
        assert (folder / "uq_eigenvalues_quick.png").stat().st_size > 1000
    else:
        assert "matplotlib" in spec["plot_note"]


def test_bench_uq_differences():
    rows = [dict(n=n, eigenvalues=[10.0 * (1 + e), 5.0 * (1 + e)]) for n, e in ((8, 0.16), (16, 0.04), (32, 0.01),
                                                                                  (64, 0.0))]
    d = _module().differences(rows, 2)
    assert d["finest"] == 64 and d["leading"] == [2]
    assert d["vs_finest"]["8"]["2"] == pytest.approx(0.16) and d["vs_next"]["16/32"]["2"] == pytest.approx(0.03 / 1.01)
    assert d["reduction_vs_finest"]["8 -> 16"]["2"] == pytest.approx(4.0)
    assert _module().rel_diff([1.0], [1.0, 2.0], 2) is None


@pytest.mark.parametrize("args, message", [
    (["--sizes", "3"], "must be >= 4"),
    (["--spectrum-sizes", "8", "2"], "must be >= 4"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--spectrum-rank", "0"], "--spectrum-rank must be >= 1"),
    (["--oversampling", "-1"], "--oversampling must be >= 0"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--passes", "3"], "invalid choice"),
    (["--solver", "lu"], "invalid choice"),
    (["--gtol", "nan"], "--gtol must be a finite number"),
    (["--sizes", "--spectrum-sizes"], "nothing to do"),
    (["--no-compare", "512"], "not among --sizes"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--sizes", "x"], "invalid int value"),
    (["--out", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_bench_uq_rejects_bad_input(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        _module().parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_uq_main_refuses_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _module().main(["--quick", "--rank", "0", "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and "--rank must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
