"""``adjopt run --backend petsc`` without petsc4py: a usage error that names the extra."""

import sys

import pytest

from adjopt import cli


def test_backend_petsc_without_petsc4py_exits_2_naming_the_extra(monkeypatch, tmp_path, capsys):
    for name in list(sys.modules):
        if name.startswith("adjopt.backends.petsc"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "petsc4py", None)
    monkeypatch.setitem(sys.modules, "petsc4py.PETSc", None)
    code = cli.main(["run", "seed_toy", "--backend", "petsc", "--out", str(tmp_path / "r"), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert 'pip install "adjopt[mpi]"' in err and "petsc4py" in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_unknown_backend_is_refused(capsys):
    assert cli.main(["run", "seed_toy", "--backend", "dask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adjopt: ") and "invalid choice: 'dask'" in err[0]


def test_fields_of_a_distributed_run_keep_a_failed_evaluation_for_the_writer():
    class Functional:
        n_params, stats = 3, None

        def state(self, x):
            return x * 2.0

        def adjoint(self, x):
            raise RuntimeError("adjoint solve did not converge")

    import numpy as np

    fields = cli._Fields(Functional(), np.ones(3))
    assert fields.state(None).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(RuntimeError, match="did not converge"):
        fields.adjoint(None)
