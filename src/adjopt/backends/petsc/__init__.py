"""The reduced functional on PETSc, under MPI (optional extra ``mpi``).

    mpiexec -n 4 adjopt run poisson_inversion --backend petsc --n 1024

The problem description (mesh, connectivity, local matrices, objective) is
built on every rank as in a serial run; :class:`DistributedReducedFunctional`
then splits the elements over the ranks, gives each rank a contiguous block
of dofs and parameters, and keeps everything whose size grows with the work
distributed: the matrix A(p) (PETSc AIJ, filled through the COO interface),
its KSP solver and preconditioner, the state, adjoint, tangent and
second-adjoint vectors, and the contractions (the serial numba kernels on
each rank's own elements, with ghost values gathered by one scatter).

Needs petsc4py and mpi4py: ``pip install "adjopt[mpi]"`` after the steps of
the README's "Distributed runs" section (PETSc builds from source here; on a
cluster, petsc4py is built against the site's PETSc).
"""

from __future__ import annotations

from ...errors import MissingBackendError

try:
    from mpi4py import MPI  # noqa: F401  (imported first: petsc4py then shares its MPI)
    from petsc4py import PETSc  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the modules
    raise MissingBackendError(
        f"adjopt.backends.petsc needs petsc4py and mpi4py, which could not be imported ({exc}). "
        "Install the optional extra: pip install \"adjopt[mpi]\" (the README's 'Distributed runs' section gives the "
        "steps that build PETSc from PyPI, and how to use a cluster's own PETSc instead)"
    ) from exc

from .functional import (  # noqa: E402
    BlockFunctional,
    DistributedReducedFunctional,
    PetscOptionsError,
    distribute,
    in_blocks,
)
from .tao import TAO_METHODS, minimize_tao  # noqa: E402

__all__ = ["BlockFunctional", "DistributedReducedFunctional", "PetscOptionsError", "distribute", "in_blocks",
           "minimize_tao", "TAO_METHODS"]
