"""The documentation builds without a warning and every example on its pages runs (docs/, extra ``docs``)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def sphinx(builder: str, out, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m sphinx -W --keep-going -b <builder> docs <out>``, as the README gives it."""
    return subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, DOCS, str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_html_builds_without_warnings_and_the_examples_run(tmp_path):
    pytest.importorskip("sphinx")
    html = sphinx("html", tmp_path / "html")
    assert html.returncode == 0, html.stdout + html.stderr
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "_images" / "poisson_inversion.png").is_file()  # the gallery's pictures

    doctest = sphinx("doctest", tmp_path / "doctest")
    report = (tmp_path / "doctest" / "output.txt")
    assert doctest.returncode == 0, doctest.stdout + doctest.stderr + (report.read_text() if report.is_file() else "")
    summary = report.read_text()
    assert "0 failures in tests" in summary and "0 failures in setup code" in summary
    ran = re.search(r"^\s*(\d+) tests$", summary, re.M)
    assert ran and int(ran.group(1)) >= 20, summary  # the guides' examples ran, not an empty build
