"""Optional execution backends.

``adjopt.backends.partition`` (numpy only) splits elements over ranks and
numbers dofs and parameters so that each rank owns a contiguous block;
``adjopt.backends.petsc`` runs the reduced functional on PETSc under MPI
(optional extra ``mpi``).
"""
