"""The README's library example runs and prints what it says."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert len(code.strip().splitlines()) <= 16
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "1 factorization(s)" in out and "4 solve(s)" in out
    assert "PASS" in out


def test_readme_quickstart_has_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("<!-- ci:quickstart:start -->")[1].split("<!-- ci:quickstart:end -->")[0]
    cmds = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(cmds) == 2
