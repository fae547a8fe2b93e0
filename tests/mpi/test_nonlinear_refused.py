"""The PETSc backend distributes linear state equations only: a nonlinear residual gets a clear refusal."""

import numpy as np
import pytest

pytest.importorskip("petsc4py")
pytest.importorskip("mpi4py.MPI")

import adjopt  # noqa: E402
from adjopt import cli, fem  # noqa: E402
from adjopt import mesh as meshes  # noqa: E402
from adjopt.backends.petsc import DistributedReducedFunctional  # noqa: E402


def test_the_backend_refuses_a_nonlinear_functional():
    msh = meshes.unit_square(4)
    dm = fem.condense(msh.n_nodes, msh.boundary("all"))
    R = fem.diffusion_reaction_residual(msh, dm, diffusion="exp", beta=1.0, source=np.ones(dm.n_free))
    J = adjopt.ReducedFunctional(R, objective=adjopt.SquaredMisfit(np.zeros(R.n)))
    with pytest.raises(NotImplementedError, match="serial functional"):
        DistributedReducedFunctional.from_functional(J)


def test_the_cli_says_so_and_exits_2(tmp_path, capsys):
    code = cli.main(["run", "semilinear_control", "--n", "4", "--backend", "petsc", "--out", str(tmp_path / "r"),
                     "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nonlinear residual" in err and "drop --backend petsc" in err and "Traceback" not in err
