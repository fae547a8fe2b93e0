"""Where the parameter vector lives: in one process, or in blocks over the ranks of an MPI communicator.

The drivers do elementwise work on arrays and a few reductions (inner
products, norms, maxima, counts). They take the reductions from a
:class:`Space`, which every :class:`~adjopt.optimize.InnerProduct` carries:

* :data:`SERIAL` (the default): the arrays are the whole vector;
* :class:`Blocks`: each rank holds its own contiguous block of the vector,
  and every reduction ends in one ``allreduce``, so p, the gradient and the
  optimizer's memory (L-BFGS pairs, CG vectors) are never replicated. A
  distributed functional's :meth:`~adjopt.backends.petsc.DistributedReducedFunctional.blocks`
  view gives it.
"""

from __future__ import annotations

import numpy as np

from .._threads import dot as _dot


class Space:
    """The whole vector in this process; reductions are numpy's."""

    distributed = False
    comm = None

    def dot(self, a, b) -> float:
        """sum(a * b)."""
        return _dot(a, b)

    def sum(self, a) -> float:
        return float(np.sum(a))

    def max(self, a, initial: float = -np.inf) -> float:
        return float(np.max(a, initial=initial))

    def min(self, a, initial: float = np.inf) -> float:
        return float(np.min(a, initial=initial))

    def count(self, mask) -> int:
        return int(np.count_nonzero(mask))

    def any(self, mask) -> bool:
        return self.count(mask) > 0

    def all(self, mask) -> bool:
        mask = np.asarray(mask)
        return self.count(mask) == self.size(mask)

    def size(self, a) -> int:
        """The length of the whole vector of which ``a`` is this process's part."""
        return int(np.size(a))

    def rows(self, S, Y) -> np.ndarray:
        """The inner products of the rows of two (k, n) arrays, shape (k,)."""
        return np.einsum("ij,ij->i", S, Y)

    def sum_array(self, a) -> np.ndarray:
        """A small array of partial sums (one per entry) summed over the processes: here, the array itself."""
        return np.asarray(a, dtype=np.float64)

    def __repr__(self):
        return "Space()"


#: the default: everything in one process
SERIAL = Space()


class Blocks(Space):
    """Each rank of ``comm`` holds a contiguous block; reductions are summed over the ranks (collective)."""

    distributed = True

    def __init__(self, comm):
        self.comm = comm

    def _sum(self, v):
        return self.comm.allreduce(v)

    def dot(self, a, b) -> float:
        return float(self._sum(_dot(a, b)))

    def sum(self, a) -> float:
        return float(self._sum(float(np.sum(a))))

    def max(self, a, initial: float = -np.inf) -> float:
        from mpi4py import MPI

        return float(self.comm.allreduce(float(np.max(a, initial=initial)), op=MPI.MAX))

    def min(self, a, initial: float = np.inf) -> float:
        from mpi4py import MPI

        return float(self.comm.allreduce(float(np.min(a, initial=initial)), op=MPI.MIN))

    def count(self, mask) -> int:
        return int(self._sum(int(np.count_nonzero(mask))))

    def size(self, a) -> int:
        return int(self._sum(int(np.size(a))))

    def rows(self, S, Y) -> np.ndarray:
        out = np.empty(S.shape[0])
        self.comm.Allreduce(np.ascontiguousarray(np.einsum("ij,ij->i", S, Y)), out)
        return out

    def sum_array(self, a) -> np.ndarray:
        out = np.empty(np.shape(a))
        self.comm.Allreduce(np.ascontiguousarray(a, dtype=np.float64), out)
        return out

    def __repr__(self):
        return f"Blocks(ranks={self.comm.size})"
