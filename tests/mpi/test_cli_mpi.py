"""``adjopt run --backend petsc`` under mpiexec: the same run as the serial one, files written once by rank 0."""

import json

import numpy as np
import pytest

pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")

from adjopt import cli  # noqa: E402

COMM = MPI.COMM_WORLD


def test_run_with_the_petsc_backend_matches_the_serial_run(tmp_path, capsys):
    out = COMM.bcast(str(tmp_path / "mpi") if COMM.rank == 0 else None)  # one folder for all ranks
    args = ["run", "poisson_inversion", "--n", "10", "--no-pictures", "-q"]
    assert cli.main([*args, "--backend", "petsc", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert ("newton-cg: converged" in printed) == (COMM.rank == 0)  # only rank 0 prints
    assert cli.main([*args, "--out", str(tmp_path / f"serial{COMM.rank}")]) == 0
    COMM.Barrier()
    with open(f"{out}/history.json") as fh:
        dist = json.load(fh)
    ser = json.loads((tmp_path / f"serial{COMM.rank}" / "history.json").read_text())
    f_dist, f_ser = dist["history"][-1]["f"], ser["history"][-1]["f"]
    assert abs(f_dist - f_ser) <= 1e-8 * abs(f_ser)
    x_dist, x_ser = np.load(f"{out}/result.npz")["x"], np.load(tmp_path / f"serial{COMM.rank}" / "result.npz")["x"]
    assert np.linalg.norm(x_dist - x_ser) <= 1e-6 * np.linalg.norm(x_ser)
    # the state and adjoint fields were computed collectively and written
    res = np.load(f"{out}/result.npz")
    assert res["state"].shape == res["adjoint"].shape == (81,) and np.abs(res["adjoint"]).max() > 0


def test_the_petsc_backend_refuses_a_serial_solver_and_a_non_empty_folder(tmp_path, capsys):
    out = COMM.bcast(str(tmp_path / "busy") if COMM.rank == 0 else None)
    if COMM.rank == 0:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x.txt").write_text("taken")
    COMM.Barrier()
    base = ["run", "poisson_inversion", "--n", "6", "--backend", "petsc", "-q", "--no-pictures"]
    assert cli.main([*base, "--solver", "amg", "--out", out + "2"]) == 2
    assert "PETSC_OPTIONS" in capsys.readouterr().err
    # rank 0 finds the folder taken; every rank stops with the same message (none waits for the others)
    assert cli.main([*base, "--out", out]) == 2
    assert "not empty" in capsys.readouterr().err


def test_petsc_options_that_do_not_solve_or_that_petsc_refuses_stop_the_run_with_exit_2(tmp_path, capsys):
    from petsc4py import PETSc

    out = COMM.bcast(str(tmp_path / "opts") if COMM.rank == 0 else None)
    base = ["run", "poisson_inversion", "--n", "6", "--backend", "petsc", "-q", "--no-pictures", "--max-iter", "2"]
    opts = PETSc.Options()
    for key, value, said in (("adjopt_ksp_type", "preonly", "failed in a solve: the forward solve (petsc:preonly+gamg) "
                                                            "stopped with CONVERGED_ITS"),
                             ("adjopt_pc_type", "hypree", "the PETSc solver options were refused: PETSc does not know")):
        opts[key] = value  # as PETSC_OPTIONS='-adjopt_ksp_type preonly' sets it
        try:
            assert cli.main([*base, "--out", f"{out}-{value}"]) == 2
        finally:
            opts.delValue(key)
        err = capsys.readouterr().err
        assert said in err and "fix the problem file" not in err  # the solver options, not the problem, are at fault


def test_petsc_options_refused_when_a_serially_built_problem_is_distributed(tmp_path, capsys):
    from petsc4py import PETSc

    out = COMM.bcast(str(tmp_path / "heat") if COMM.rank == 0 else None)
    opts = PETSc.Options()
    opts["adjopt_pc_type"] = "hypree"
    try:  # the cantilever3d case is not built rank by rank: built whole, then distributed
        code = cli.main(["run", "topology_compliance", "--case", "cantilever3d", "--nelx", "4", "--nely", "2", "--nelz", "2",
                         "--backend", "petsc", "-q", "--no-pictures", "--max-iter", "1", "--out", out])
    finally:
        opts.delValue("adjopt_pc_type")
    assert code == 2
    assert "the PETSc solver options were refused: PETSc does not know" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["optimal_control", "heat_source_inversion", "topology_eigen"])
def test_a_problem_the_backend_does_not_distribute_stops_with_exit_2(name, tmp_path, capsys):
    # a ConstantMatrix (TypeError), a time-dependent and an eigenvalue functional (AttributeError tracebacks before)
    out = COMM.bcast(str(tmp_path / name) if COMM.rank == 0 else None)
    code = cli.main(["run", name, "--backend", "petsc", "-q", "--no-pictures", "--max-iter", "1", "--out", out])
    assert code == 2
    err = capsys.readouterr().err
    assert "the PETSc backend" in err and "serial functional" in err and "Traceback" not in err
