"""The thread-contention benchmark runs end to end at tiny sizes and records what it measured."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_threads.py")


def test_bench_threads_writes_every_kernel_for_every_configuration(tmp_path):
    out = tmp_path / "threads.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--sizes", "8", "12", "--repeat", "2", "--layers", "omp-passive",
                           "adjopt", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"omp-passive", "adjopt"}
    for layer, res in data["results"].items():
        rows = res["rows"]
        assert {(r["n"], r["kernel"], r["load"]) for r in rows} == {
            (n, k, load) for n in (8, 12) for k in ("values", "contract", "tangent", "hessp") for load in ("idle", "busy")}
        assert all(r["ms_1"] > 0 and r["ms_2"] > 0 and abs(r["ratio"] - r["ms_2"] / r["ms_1"]) < 1e-12 for r in rows)
        assert res["threading_layer"] == "omp"
    assert data["worst_busy_ratio"]["adjopt"] == max(r["ratio"] for r in data["results"]["adjopt"]["rows"]
                                                      if r["load"] == "busy")
    assert "worst t(2 threads) / t(1 thread)" in proc.stdout


def test_bench_threads_refuses_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--sizes", "1", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "every size >= 2" in proc.stderr
