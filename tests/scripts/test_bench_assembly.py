"""The assembly benchmark runs end to end and writes its JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_assembly_writes_json(tmp_path):
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_assembly.py"), "--n", "8", "16",
                          "--repeat", "1", "--out", str(out)], capture_output=True, text=True, check=True)
    assert "elements" in res.stdout and "wrote" in res.stdout
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["n_elements"] for r in rows] == [128, 512]
    assert all(r["values_s"] > 0 and r["nnz"] > 0 for r in rows)
    assert data["info"]["threads"] >= 1
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
