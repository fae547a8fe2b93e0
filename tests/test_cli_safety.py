"""The adjopt command is safe about resume, concurrent runs, half-written files and exit codes.

Subprocess tests run ``python -m adjopt.cli`` like tests/test_cli.py; what needs a monkeypatch (a missing
backend, a full disk) runs ``cli.main`` in-process.
"""

import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import adjopt
from adjopt import cli
from adjopt.optimize import CheckpointError, read_checkpoint
from adjopt.optimize.base import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import optimal_control  # noqa: E402
import poisson_inversion  # noqa: E402


try:
    import meshio  # noqa: F401

    VTU = ["fields.vtu"]
except ImportError:
    VTU = []
#: the files of a run with --no-pictures
FILES = sorted(["checkpoint.npz", "history.csv", "history.json", "result.npz", *VTU])


def adjopt_cmd(*args, check=None, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "adjopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def _default_sigint():
    # a shell without job control starts background commands with SIGINT ignored, and the child would inherit
    # that (Python then installs no KeyboardInterrupt handler): the tests that send Ctrl-C reset it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "adjopt.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def one_line(stderr: str) -> str:
    """The single 'adjopt: ' line of stderr (and nothing else: no traceback, no second line)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adjopt: "), stderr
    return lines[0]


def write_problem(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(ROOT, "problems")!r})
        import adjopt, poisson_inversion
    """) + textwrap.dedent(body))
    return path


# gtol 1e-7 (59 iterations): at 1e-8 L-BFGS ends at round-off, in a failed line search (exit status 1), in 2 runs
# of 10 with the linear solves perturbed by 1e-14, as rounding on another CPU or BLAS can do
SLOW = """
    RUN_DEFAULTS = dict(method="lbfgs", gtol=1e-7)

    def build(n: int = 8, delay: float = 0.0):
        pb = poisson_inversion.build(n=n)
        J = pb.functional
        value = J.value
        def slow_value(p):
            time.sleep(delay)
            return value(p)
        J.value = slow_value
        return pb
"""


def wait_for_checkpoint(ck, nit, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if read_checkpoint(ck)[1]["nit"] >= nit:
                return
        except CheckpointError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint with nit >= {nit} in {timeout} s")


# -- 1. the checkpoint records the problem; another problem's checkpoint is refused -----------------------------
def test_resume_refuses_another_problems_checkpoint(tmp_path):
    out = tmp_path / "r"
    adjopt_cmd("run", "poisson_inversion", "--n", 8, "--max-iter", 2, "--out", out, "-q", "--no-pictures", check=1)
    before = (out / "history.json").read_text()
    proc = adjopt_cmd("run", "optimal_control", "--n", 8, "--out", out, "--resume", "-q", "--no-pictures", check=2)
    line = one_line(proc.stderr)
    assert f"the checkpoint '{out / 'checkpoint.npz'}' is of problem 'poisson_inversion_2d_h1', not 'optimal_control'" in line
    assert "run without --resume and with --force" in line
    assert (out / "history.json").read_text() == before  # no mixed history written
    assert read_checkpoint(out / "checkpoint.npz")[1]["nit"] == 2  # the checkpoint is untouched


def test_checkpoint_meta_names_problem_options_size_and_method(tmp_path):
    ck = tmp_path / "c.npz"
    pb = poisson_inversion.build(n=8)
    adjopt.minimize(pb, method="lbfgs", maxiter=1, checkpoint=ck)
    meta = read_checkpoint(ck)[1]
    assert meta["problem"] == "poisson_inversion_2d_h1"
    assert meta["options"] == json.loads(json.dumps(pb.meta["options"]))
    assert meta["options"]["n"] == 8 and meta["options"]["alpha"] == 10.0
    assert meta["n_params"] == 81 and meta["method"] == "lbfgs"


def test_resume_refuses_other_options_size_and_method(tmp_path):
    ck = tmp_path / "c.npz"
    adjopt.minimize(poisson_inversion.build(n=8), method="lbfgs", maxiter=1, checkpoint=ck)
    with pytest.raises(CheckpointError) as exc:
        adjopt.minimize(poisson_inversion.build(n=8, alpha=1.0), method="lbfgs", resume=ck)
    assert str(exc.value) == (f"the checkpoint '{ck}' is of problem options {{\"alpha\": 10.0}}, not {{\"alpha\": 1.0}}; "
                              "resume with the problem, options and method of the run that wrote it")
    with pytest.raises(CheckpointError, match=r"is of problem options \{\"n\": 8\}, not \{\"n\": 6\} and of 81 parameters, not 49;"):
        adjopt.minimize(poisson_inversion.build(n=6), method="lbfgs", resume=ck)
    with pytest.raises(CheckpointError, match="is of method 'lbfgs', not 'newton-cg'"):
        adjopt.minimize(poisson_inversion.build(n=8), method="newton-cg", resume=ck)
    # optimal_control at n = 8 has 81 parameters too: the name tells them apart
    with pytest.raises(CheckpointError, match="is of problem 'poisson_inversion_2d_h1', not 'optimal_control'"):
        adjopt.minimize(optimal_control.build(n=8), method="lbfgs", resume=ck)
    r = adjopt.minimize(poisson_inversion.build(n=8), method="lbfgs", maxiter=2, resume=ck)
    assert r.nit == 2 and len(r.history) == 3


def test_a_checkpoint_of_an_older_adjopt_is_accepted_when_method_and_size_match(tmp_path, caplog):
    ck = tmp_path / "c.npz"
    adjopt.minimize(poisson_inversion.build(n=8), method="lbfgs", maxiter=1, checkpoint=ck)
    state, meta = read_checkpoint(ck)
    for key in ("problem", "options", "n_params"):
        del meta[key]
    meta["version"] = 1
    write_checkpoint(ck, state, meta)
    with caplog.at_level(logging.WARNING, logger="adjopt.optimize.base"):
        r = adjopt.minimize(optimal_control.build(n=8), method="lbfgs", maxiter=2, resume=ck)
    assert r.nit == 2
    assert "was written by an older adjopt without the problem's name" in caplog.text
    with pytest.raises(CheckpointError, match="is of method 'lbfgs', not 'newton-cg'"):
        adjopt.minimize(optimal_control.build(n=8), method="newton-cg", resume=ck)
    with pytest.raises(CheckpointError, match="is of 81 parameters, not 49"):
        adjopt.minimize(optimal_control.build(n=6), method="lbfgs", resume=ck)
    meta["version"] = 99
    write_checkpoint(ck, state, meta)
    with pytest.raises(CheckpointError, match="version 99 checkpoint; this adjopt reads versions 1 and 2"):
        read_checkpoint(ck)


# -- 2. one run at a time per output folder ----------------------------------------------------------------------
def test_a_folder_locked_by_another_run_is_refused(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with open(out / ".adjopt.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = adjopt_cmd("run", "optimal_control", "--n", 6, "--out", out, "--force", "-q", check=2)
    line = one_line(proc.stderr)
    assert f"another adjopt run is writing to {out}" in line and "wait for it to finish or choose another --out" in line
    assert sorted(p.name for p in out.iterdir()) == [".adjopt.lock", "notes.txt"]


def test_two_runs_started_together_into_one_folder(tmp_path):
    slow = write_problem(tmp_path, "slow", SLOW)
    out = tmp_path / "r"
    args = ("run", slow, "--delay", 0.2, "--max-iter", 10, "--out", out, "-q", "--no-pictures")
    procs = [start(*args), start(*args)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [1, 2], outs
    loser = outs[codes.index(2)]
    assert f"another adjopt run is writing to {out}" in one_line(loser[1])
    winner = outs[codes.index(1)]
    assert winner[0].startswith("lbfgs: stopped after 10 iterations")
    hist = json.loads((out / "history.json").read_text())
    assert [h["nit"] for h in hist["history"]] == list(range(11))  # one run's history, not two mixed
    assert sorted(p.name for p in out.iterdir()) == FILES


def test_a_lock_file_that_cannot_be_created(tmp_path, capsys):
    out = tmp_path / "r"
    (out / ".adjopt.lock").mkdir(parents=True)
    assert cli.main(["run", "poisson_inversion", "--n", "6", "--out", str(out), "-q"]) == 2
    assert one_line(capsys.readouterr().err) == (f"adjopt: cannot create {out / '.adjopt.lock'} (Is a directory); "
                                                 "choose another --out")


def test_the_lock_follows_a_lock_file_removed_while_waiting(tmp_path, monkeypatch):
    # the run that held the lock removes its file just before this one gets the lock: lock the new file instead
    out = tmp_path / "r"
    out.mkdir()
    real, calls = fcntl.flock, []

    def flock(fd, op):
        real(fd, op)
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            os.unlink(out / ".adjopt.lock")

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = cli._prepare_out(out, force=False, resume=False)
    assert len(calls) == 2 and os.stat(out / ".adjopt.lock").st_ino == calls[1]
    lock.release()
    assert list(out.iterdir()) == []


def test_a_stale_lock_file_does_not_make_the_folder_non_empty(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".adjopt.lock").write_text("")  # left by a killed run: nobody holds it
    proc = adjopt_cmd("run", "poisson_inversion", "--n", 6, "--out", out, "--no-pictures", check=0)
    listed = proc.stdout.strip().splitlines()[-1]
    assert listed == f"results in {out}/: " + ", ".join(f for f in FILES if f != "checkpoint.npz")
    assert sorted(p.name for p in out.iterdir()) == FILES


# -- 3. temporaries of a killed run are removed by the next run ---------------------------------------------------
def test_sigkill_then_the_next_run_removes_temporaries_and_resumes(tmp_path):
    slow = write_problem(tmp_path, "slow", SLOW)
    out = tmp_path / "killed"
    proc = start("run", slow, "--delay", 0.1, "--out", out, "-q", "--no-pictures")
    wait_for_checkpoint(out / "checkpoint.npz", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(out / "checkpoint.npz")[1]["nit"]
    # what a kill while writing leaves: the writers' temporary names (and files of the user's that look alike)
    ours = [".checkpoint-k2x_9abq.tmp", ".history.json.4242.0a1b2c3d.tmp", ".result.npz.17.deadbeef.tmp",
            ".fields.vtu.ab12_xyz.tmp.vtu", ".convergence.png.99.00ff00ff.tmp"]
    theirs = ["notes.tmp", ".checkpoint.tmp", "checkpoint-old.tmp", ".history.json.tmp", ".mydata.1.deadbeef.tmp"]
    for name in ours + theirs:
        (out / name).write_bytes(b"PK\x03\x04half")
    resumed = adjopt_cmd("run", slow, "--out", out, "--resume", "-q", "--no-pictures", check=0)
    assert resumed.stdout.startswith("lbfgs: converged")
    names = {p.name for p in out.iterdir()}
    assert not names & set(ours)
    assert set(theirs) <= names
    hist = json.loads((out / "history.json").read_text())
    assert hist["nit"] > killed_at and [h["nit"] for h in hist["history"]] == list(range(hist["nit"] + 1))
    assert ".adjopt.lock" not in names


def test_temporaries_alone_do_not_make_the_folder_non_empty(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".checkpoint-abcd1234.tmp").write_bytes(b"half")
    adjopt_cmd("run", "poisson_inversion", "--n", 6, "--out", out, "-q", "--no-pictures", check=0)
    assert sorted(p.name for p in out.iterdir()) == FILES


# -- 4. bad input: one line, exit 2 --------------------------------------------------------------------------------
BUILD_RAISES = """
    def build(n: int = 8):
        raise RuntimeError("the mesh file is missing")
"""
BUILD_RETURNS_DICT = """
    def build(n: int = 8):
        return {"n": n}
"""


@pytest.mark.parametrize("args, message", [
    (("run", "poisson_inversion", "--n", 8, "--solver", "bogus"),
     "unknown solver 'bogus'; the solvers are amg, auto, cholmod, direct, pardiso, superlu"),
    (("run", "poisson_inversion", "--n", 8, "--gtol", -1), "--gtol must be a finite number >= 0, got -1.0"),
    (("run", "poisson_inversion", "--n", 8, "--xtol", "nan"), "--xtol must be a finite number >= 0, got nan"),
    (("run", "poisson_inversion", "--n", 8, "--max-iter", -3), "--max-iter must be a whole number >= 0, got -3"),
    (("run", "poisson_inversion", "--n", 8, "--log-json", "{tmp}/missing/log.jsonl"),
     "cannot open the --log-json file {tmp}/missing/log.jsonl (No such file or directory); create its folder or "
     "choose another file"),
    (("run", "{raises}"), "raises.build() raised RuntimeError: the mesh file is missing; fix the problem file "
     "{raises} or its options (--debug shows the traceback)"),
    (("run", "{returns_dict}", "--n", 3), "returns_dict.build returned a dict, not an adjopt.Problem; "
     "build(**options) must return adjopt.Problem(functional, p0, ...)"),
    (("check", "{raises}", "--n", 4), "raises.build(n=4) raised RuntimeError: the mesh file is missing"),
    (("check", "{returns_dict}"), "returns_dict.build returned a dict, not an adjopt.Problem"),
    (("check", "poisson_inversion", "--n", 6, "--seed", -1), "--seed must be a whole number >= 0, got -1"),
    (("bench", "{raises}", "--sizes", 4, "--json", "{tmp}/b.json"),
     "raises.build(n=4) raised RuntimeError: the mesh file is missing"),
    (("bench", "{returns_dict}", "--sizes", 4, "--json", "{tmp}/b.json"), "returns_dict.build returned a dict"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, message):
    names = dict(tmp=tmp_path, raises=write_problem(tmp_path, "raises", BUILD_RAISES),
                 returns_dict=write_problem(tmp_path, "returns_dict", BUILD_RETURNS_DICT))
    out = tmp_path / "out"
    extra = ("--out", out) if args[0] == "run" else ()
    proc = adjopt_cmd(*(str(a).format(**names) for a in args), *extra, check=2)
    assert message.format(**names) in one_line(proc.stderr)
    assert not out.exists()  # no empty results folder left behind
    assert not (tmp_path / "b.json").exists()


def test_debug_adds_the_traceback(tmp_path):
    raises = write_problem(tmp_path, "raises", BUILD_RAISES)
    for command in (("run", raises, "--out", tmp_path / "o"), ("check", raises), ("bench", raises, "--sizes", 4)):
        proc = adjopt_cmd(*command, "--debug", check=2)
        assert "Traceback (most recent call last)" in proc.stderr
        assert 'raise RuntimeError("the mesh file is missing")' in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("adjopt: raises.build(")
    proc = adjopt_cmd("run", "poisson_inversion", "--n", 8, "--gtol", -1, "--debug", check=2)
    assert "Traceback" in proc.stderr and "UsageError: --gtol must be a finite number >= 0, got -1.0" in proc.stderr


def test_bad_run_defaults_of_a_problem_file(tmp_path):
    bad = write_problem(tmp_path, "bad_defaults", """
        RUN_DEFAULTS = dict(method="lbfgs", gtol=-1e-8)

        def build(n: int = 6):
            return poisson_inversion.build(n=n)
    """)
    proc = adjopt_cmd("run", bad, "--out", tmp_path / "o", check=2)
    assert one_line(proc.stderr) == ("adjopt: the problem file's RUN_DEFAULTS: gtol must be a finite number >= 0, got "
                                     "-1e-08; fix them, or override them with --max-iter, --gtol or --xtol")
    adjopt_cmd("run", bad, "--gtol", 1e-8, "--max-iter", 1, "--out", tmp_path / "o", "-q", "--no-pictures", check=1)


@pytest.mark.parametrize("content, reason", [
    ("truncated", "BadZipFile: File is not a zip file"),
    ("empty", "EOFError: No data left in file"),
    ("no_meta", "KeyError: 'meta is not a file in the archive'"),
    ("npy", "not an .npz archive"),
    ("meta_list", "its meta is not a JSON object"),
    ("garbage", "ValueError: This file contains pickled (object) data)"),
    ("meta_keys", "it has no counts, elapsed, g0, history, method, nit"),
])
def test_a_damaged_or_foreign_checkpoint_on_resume(tmp_path, content, reason):
    out = tmp_path / "r"
    out.mkdir()
    ck = out / "checkpoint.npz"
    if content == "truncated":
        write_checkpoint(ck, dict(x=np.zeros(81), f=1.0, g=np.zeros(81)), dict(version=2, method="newton-cg"))
        ck.write_bytes(ck.read_bytes()[:-40])
    elif content == "empty":
        ck.write_bytes(b"")
    elif content == "no_meta":
        np.savez(ck, x=np.zeros(81))
    elif content == "npy":
        with open(ck, "wb") as fh:
            np.save(fh, np.zeros(81))
    elif content == "meta_list":
        np.savez(ck, meta=np.array("[1, 2]"))
    elif content == "meta_keys":
        np.savez(ck, meta=np.array('{"version": 2}'), state__x=np.zeros(81))
    else:
        ck.write_bytes(b"\x00not a checkpoint at all" * 10)
    proc = adjopt_cmd("run", "poisson_inversion", "--n", 8, "--out", out, "--resume", "-q", check=2)
    line = one_line(proc.stderr)
    assert f"adjopt: cannot read the checkpoint '{ck}' (" in line and reason in line
    assert "it is damaged or not a checkpoint" in line and "run without --resume and with --force" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz"]


def test_missing_cholmod_is_bad_input(monkeypatch, tmp_path, capsys):
    from adjopt.solvers import CholmodSolver

    monkeypatch.setattr(CholmodSolver, "available", staticmethod(lambda: False))
    code = cli.main(["run", "poisson_inversion", "--n", "8", "--solver", "cholmod", "--out", str(tmp_path / "r"), "-q"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert 'solver="cholmod" needs scikit-sparse (CHOLMOD), which is not installed' in line
    assert 'pip install "adjopt[cholmod]"' in line
    assert not (tmp_path / "r").exists()
    # a problem whose build() makes the solver itself: MissingBackendError is an ImportError, not a ValueError
    code = cli.main(["run", "topology_compliance", "--nelx", "6", "--nely", "3", "--solver", "cholmod",
                     "--out", str(tmp_path / "t"), "-q"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "topology_compliance.build(nelx=6, nely=3, solver='cholmod') raised MissingBackendError" in line
    assert 'pip install "adjopt[cholmod]"' in line


def full_disk(monkeypatch, what: str, after: int = 0):
    """os.fsync raises ENOSPC for files whose name contains `what`, from the (after+1)-th such call on."""
    real = os.fsync
    calls = []

    def fsync(fd):
        if what in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_full_disk_at_the_first_checkpoint_leaves_no_folder(monkeypatch, tmp_path, capsys):
    full_disk(monkeypatch, ".checkpoint-")
    out = tmp_path / "new" / "r"
    code = cli.main(["run", "poisson_inversion", "--n", "6", "--out", str(out), "-q"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert line == (f"adjopt: cannot write the checkpoint {out / 'checkpoint.npz'} (No space left on device); free some "
                    "disk space, then continue with --resume")
    assert not (tmp_path / "new").exists()  # this run created both folders and wrote nothing


def test_full_disk_mid_run_keeps_the_last_checkpoint(monkeypatch, tmp_path, capsys):
    full_disk(monkeypatch, ".checkpoint-", after=2)
    out = tmp_path / "r"
    assert cli.main(["run", "poisson_inversion", "--n", "6", "--out", str(out), "-q"]) == 2
    assert "(No space left on device); free some disk space, then continue with --resume" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz"]
    assert read_checkpoint(out / "checkpoint.npz")[1]["nit"] == 2
    monkeypatch.undo()
    assert cli.main(["run", "poisson_inversion", "--n", "6", "--out", str(out), "-q", "--resume", "--no-pictures"]) == 0
    hist = json.loads((out / "history.json").read_text())
    assert hist["success"] and [h["nit"] for h in hist["history"]] == list(range(hist["nit"] + 1))


def test_full_disk_while_writing_results(monkeypatch, tmp_path, capsys):
    full_disk(monkeypatch, "result.npz")
    out = tmp_path / "r"
    assert cli.main(["run", "poisson_inversion", "--n", "6", "--out", str(out), "-q", "--no-pictures"]) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert f"adjopt: cannot write '{out / 'result.npz'}': No space left on device" in line
    assert line.endswith("; the checkpoint is kept: once that is fixed, run again with --resume to write the results")
    # whole files only: no temporaries, no result.npz, the files written before it complete
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "history.csv", "history.json"]
    assert json.loads((out / "history.json").read_text())["success"]
    monkeypatch.undo()
    assert cli.main(["run", "poisson_inversion", "--n", "6", "--out", str(out), "-q", "--resume", "--no-pictures"]) == 0
    assert np.load(out / "result.npz")["x"].shape == (49,)


def test_ctrl_c_exits_130_and_the_run_continues_with_resume(tmp_path):
    slow = write_problem(tmp_path, "slow", SLOW)
    out = tmp_path / "r"
    # 0.5 s per value: the run is far from done when the second checkpoint appears, even on a loaded machine
    proc = start("run", slow, "--delay", 0.5, "--out", out, "-q", "--no-pictures", "--force")
    wait_for_checkpoint(out / "checkpoint.npz", 2, proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert one_line(err) == (f"adjopt: interrupted; continue with --resume: adjopt run {slow} --delay 0.5 --out {out} "
                             "-q --no-pictures --resume")
    nit = read_checkpoint(out / "checkpoint.npz")[1]["nit"]
    assert nit >= 2 and not [p for p in out.iterdir() if p.name != "checkpoint.npz"]
    resumed = adjopt_cmd("run", slow, "--out", out, "-q", "--no-pictures", "--resume", check=0)
    assert resumed.stdout.startswith("lbfgs: converged")
    assert json.loads((out / "history.json").read_text())["nit"] > nit


def test_an_oserror_of_the_problem_is_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    bad = write_problem(tmp_path, "lost_sensor", """
        RUN_DEFAULTS = dict(method="lbfgs")

        def build(n: int = 6):
            pb = poisson_inversion.build(n=n)
            J, calls = pb.functional, []
            value = J.value
            def failing_value(p):
                calls.append(1)
                if len(calls) > 8:
                    raise FileNotFoundError(2, "No such file or directory", "/data/sensor.csv")
                return value(p)
            J.value = failing_value
            return pb
    """)
    out = tmp_path / "r"
    with pytest.raises(FileNotFoundError, match="sensor.csv"):  # a crash: traceback and exit 1, not "free disk space"
        cli.main(["run", str(bad), "--out", str(out), "-q", "--no-pictures"])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz"]
    assert read_checkpoint(out / "checkpoint.npz")[1]["nit"] >= 1


def test_resume_command_of_the_interrupt_message():
    assert cli._resume_command(["demo"], "adjopt-results/demo") == "adjopt demo --out adjopt-results/demo --resume"
    assert cli._resume_command(["run", "my problem.py", "--out=r", "--force", "-q"], "r") == \
        "adjopt run 'my problem.py' --out=r -q --resume"
    assert cli._resume_command(["run", "p", "--resume", "--out", "x"], "x") == "adjopt run p --out x --resume"


def test_ctrl_c_in_check_and_bench_exits_130(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("adjopt.verify.taylor_test", interrupt)
    assert cli.main(["check", "poisson_inversion", "--n", "4"]) == 130
    assert one_line(capsys.readouterr().err) == "adjopt: interrupted"
    monkeypatch.setattr(cli, "make_problem", interrupt)
    assert cli.main(["bench", "poisson_inversion", "--sizes", "4"]) == 130
    assert one_line(capsys.readouterr().err) == "adjopt: interrupted"
    assert cli.main(["bench", "poisson_inversion", "--sizes", "4", "--debug"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "KeyboardInterrupt" in err and err.strip().endswith("\nadjopt: interrupted")


# -- findings of a hostile review -----------------------------------------------------------------------
BUILD_SINGULAR = """
    import numpy as np

    def build(n: int = 20):
        conn = np.stack([np.arange(n), np.arange(n) + 1], axis=1)  # no Dirichlet dof: A(p) is singular
        A = adjopt.ElementCoefficientMatrix(conn, n * np.array([[1.0, -1.0], [-1.0, 1.0]]), coefficient="exp",
                                            n=n + 1)
        b = np.zeros(n + 1)
        b[0], b[-1] = 1.0, -1.0
        J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(np.zeros(n + 1)))
        return adjopt.Problem(J, np.zeros(n))
"""
BUILD_NAN_START = """
    import numpy as np

    def build(n: int = 20):
        conn = np.stack([np.arange(n) - 1, np.arange(n)], axis=1)
        conn[-1, 1] = -1
        A = adjopt.ElementCoefficientMatrix(conn, n * np.array([[1.0, -1.0], [-1.0, 1.0]]), coefficient="exp",
                                            n=n - 1)
        J = adjopt.ReducedFunctional(A, np.ones(n - 1), adjopt.Norm())
        return adjopt.Problem(J, np.full(n, 800.0))  # exp(800) overflows: J(p0) is not finite
"""
BUILD_EXITS = """
    def build(n: int = 3):
        sys.exit(0)
"""


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("body, message", [(BUILD_SINGULAR, "SingularMatrixError: the system matrix A(p) is singular"),
                                           (BUILD_NAN_START, "NonFiniteError")])
def test_a_problem_that_fails_at_its_start_is_one_line_and_exit_2(tmp_path, command, body, message):
    path = write_problem(tmp_path, "fails", body)
    extra = ("--out", tmp_path / "out", "--solver", "amg") if command == "run" else ()
    proc = adjopt_cmd(command, path, *extra, check=2)
    assert message in one_line(proc.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (("run", "poisson_inversion", "--n", 8, "--method", "oc"), "method 'oc' needs exactly one inequality constraint"),
    (("run", "topology_compliance", "--nelx", 6, "--nely", 2, "--method", "newton-tr"),
     "method 'newton-tr' does not take bounds"),
    (("run", "poisson_inversion", "--max-iter", 1.5), "argument --max-iter: invalid int value: '1.5'"),
    (("run", "poisson_inversion", "--n", 8, "--n", 9), "option --n is given twice"),
    (("run", "{exits}"), "exits.build() called sys.exit(0) instead of returning an adjopt.Problem"),
])
def test_more_bad_input_gives_one_line_and_exit_2(tmp_path, args, message):
    exits = write_problem(tmp_path, "exits", BUILD_EXITS)
    out = tmp_path / "out"
    proc = adjopt_cmd(*(str(a).format(exits=exits) for a in args), "--out", out, check=2)
    assert message in one_line(proc.stderr)
    assert not out.exists()


def test_options_may_be_given_as_name_equals_value(tmp_path):
    out = tmp_path / "out"
    adjopt_cmd("run", "poisson_inversion", "--n=6", "--out", out, "-q", "--no-pictures", check=0)
    assert json.loads((out / "history.json").read_text())["options"]["n"] == 6


def test_ctrl_c_before_anything_was_written_says_so(tmp_path):
    started = tmp_path / "build_started"
    slow = write_problem(tmp_path, "slow_build", f"""
        def build(n: int = 8):
            open({str(started)!r}, "w").close()
            time.sleep(60)
    """)
    proc = start("run", slow, "--out", tmp_path / "out")
    deadline = time.time() + 120  # the imports take a few seconds, more on a loaded machine: wait for build()
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted before the first iteration finished; nothing was written" in one_line(err)
    assert "--resume" not in err and not (tmp_path / "out").exists()


def test_resuming_a_finished_run_returns_its_result(tmp_path):
    out = tmp_path / "out"
    adjopt_cmd("run", "topology_compliance", "--nelx", 12, "--nely", 4, "--out", out, "-q", "--no-pictures", check=0)
    first = json.loads((out / "history.json").read_text())
    adjopt_cmd("run", "topology_compliance", "--nelx", 12, "--nely", 4, "--out", out, "-q", "--no-pictures",
               "--resume", check=0)
    again = json.loads((out / "history.json").read_text())
    assert again["nit"] == first["nit"] and again["fun"] == first["fun"]  # no extra step


def test_force_removes_the_old_runs_files_first(tmp_path):
    """A --force run killed before it writes its results must not leave the old run's pictures beside its own
    checkpoint: the files an earlier run wrote go first (other files stay)."""
    from adjopt.cli import _prepare_out
    from adjopt.results import RESULT_FILES

    out = tmp_path / "run"
    out.mkdir()
    for name in RESULT_FILES + ("checkpoint.npz", "notes.txt"):
        (out / name).write_text("old")
    lock = _prepare_out(out, force=True, resume=False, clear=True)
    lock.release(failed=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --resume keeps them (it continues that run), and so does a folder that is not cleared (adjopt uq reads a
    # result.npz that may sit in its --out)
    (out / "result.npz").write_text("old")
    lock = _prepare_out(out, force=True, resume=True, clear=True)
    lock.release(failed=False)
    lock = _prepare_out(out, force=True, resume=False)
    lock.release(failed=False)
    assert (out / "result.npz").exists()
