"""Element partitions and the contiguous numberings a distributed backend needs.

Everything here is plain numpy and deterministic: every MPI rank computes the
same :class:`Layout` from the same (replicated) problem description, so no
communication is needed to agree on it and a bad input fails identically on
every rank (no rank waits for another that has already raised).

Ownership rules
---------------
* elements: the partition (``parts[e]`` is the rank of element e);
* dofs: a dof belongs to the lowest rank among the elements that touch it;
* parameters: element parameters go with their element; parameters that
  reach the elements through a linear map rho = L p (nodal -> element, a
  density filter) belong to the lowest rank among the elements whose rho they
  enter.

Each kind is then renumbered so that rank r owns the contiguous block
``ranges[r]:ranges[r + 1]`` (stable within a rank: the serial order is kept).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import PartitionError

logger = logging.getLogger(__name__)

PARTITION_METHODS = ("block", "slab", "graph")


def partition_elements(n_elements: int, n_ranks: int, method: str = "block", coordinates=None, parts=None,
                       conn=None) -> np.ndarray:
    """The rank of every element, shape (n_elements,), int32.

    Parameters
    ----------
    n_elements, n_ranks
        Number of elements and of MPI ranks.
    method
        ``"block"``: contiguous ranges of the element numbering (for the
        structured generators, which number x fastest, these are slabs across
        the slowest direction); ``"slab"``: equal-count slabs across the
        longest extent of ``coordinates`` (element centres, (n_elements, dim)),
        for any mesh whose numbering is not ordered; ``"graph"``: METIS
        (pymetis) on the graph of elements that share a dof (``conn``, (E, k),
        negative entries ignored), for unstructured meshes: fewer shared dofs
        between ranks than slabs give.
    parts
        An explicit partition instead (an integer array with one rank per
        element), e.g. from a graph partitioner such as ``pymetis.part_graph``.

    Raises
    ------
    PartitionError
        More ranks than elements, an unknown method, missing or non-finite
        coordinates, ``"graph"`` without pymetis or without ``conn``, a graph
        partition that leaves a rank empty, or an explicit partition of the wrong length, with ranks
        outside ``0 .. n_ranks - 1`` or with a rank that receives no element.
    """
    if isinstance(n_ranks, bool) or not isinstance(n_ranks, numbers.Integral) or n_ranks < 1:
        raise PartitionError(f"the number of ranks must be an integer >= 1, got {n_ranks!r}")
    n_elements, n_ranks = int(n_elements), int(n_ranks)
    if n_ranks > n_elements:
        raise PartitionError(
            f"cannot split {n_elements} element(s) over {n_ranks} MPI ranks: every rank needs at least one element; "
            f"run with at most {n_elements} ranks (mpiexec -n {n_elements}) or refine the mesh"
        )
    if parts is not None:
        return _check_parts(parts, n_elements, n_ranks)
    if method == "block":
        bounds = (np.arange(n_ranks + 1, dtype=np.int64) * n_elements) // n_ranks
        return np.repeat(np.arange(n_ranks, dtype=np.int32), np.diff(bounds))
    if method == "slab":
        if coordinates is None:
            raise PartitionError("partition method 'slab' needs the element centres (coordinates=, shape (n_elements, dim))")
        x = np.asarray(coordinates, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != n_elements:
            raise PartitionError(f"coordinates must have shape ({n_elements}, dim), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise PartitionError("the element coordinates contain NaN or Inf: the mesh cannot be partitioned into slabs")
        axis = int(np.argmax(x.max(axis=0) - x.min(axis=0)))
        order = np.argsort(x[:, axis], kind="stable")
        out = np.empty(n_elements, dtype=np.int32)
        out[order] = partition_elements(n_elements, n_ranks, "block")
        return out
    if method == "graph":
        return _graph_parts(conn, n_elements, n_ranks)
    raise PartitionError(f"unknown partition method {method!r}; known: {', '.join(PARTITION_METHODS)} (or pass parts=)")


def _graph_parts(conn, n_elements: int, n_ranks: int) -> np.ndarray:
    """METIS k-way partition of the element graph (elements adjacent when they share a dof)."""
    if conn is None:
        raise PartitionError("partition method 'graph' needs the connectivity (conn=, shape (n_elements, k))")
    conn = np.asarray(conn)
    if conn.ndim != 2 or conn.shape[0] != n_elements:
        raise PartitionError(f"conn must have shape ({n_elements}, k), got {conn.shape}")
    try:
        import pymetis
    except ImportError:
        raise PartitionError("partition method 'graph' needs pymetis (pip install pymetis; it is in the extra mpi), "
                             "or pass parts= from another partitioner, or use 'slab'") from None
    if n_ranks == 1:
        return np.zeros(n_elements, dtype=np.int32)
    valid = conn >= 0
    rows = np.broadcast_to(np.arange(n_elements)[:, None], conn.shape)[valid]
    incidence = sp.csr_array((np.ones(rows.size), (rows, conn[valid])), shape=(n_elements, int(conn.max()) + 1))
    graph = sp.csr_array(incidence @ incidence.T)
    graph.setdiag(0)
    graph.eliminate_zeros()
    xadj, adjncy = graph.indptr.astype(np.int64), graph.indices.astype(np.int64)
    if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2; xadj=/adjncy= are deprecated there
        _, part = pymetis.part_graph(n_ranks, adjacency=pymetis.CSRAdjacency(xadj, adjncy))
    else:
        _, part = pymetis.part_graph(n_ranks, xadj=xadj, adjncy=adjncy)
    part = np.asarray(part, dtype=np.int32)
    empty = np.flatnonzero(np.bincount(part, minlength=n_ranks) == 0)
    if empty.size:
        raise PartitionError(f"the graph partitioner left rank(s) {empty.tolist()} without elements (is the mesh "
                             "disconnected or too small?); use fewer ranks, 'slab', or parts=")
    return part


def _check_parts(parts, n_elements: int, n_ranks: int) -> np.ndarray:
    p = np.asarray(parts)
    if p.shape != (n_elements,) or not np.issubdtype(p.dtype, np.integer):
        raise PartitionError(f"parts must be an integer array with one rank per element, shape ({n_elements},); "
                             f"got dtype {p.dtype} shape {p.shape}")
    if p.min() < 0 or p.max() >= n_ranks:
        raise PartitionError(f"parts holds ranks {int(p.min())} .. {int(p.max())} but there are {n_ranks} ranks "
                             f"(0 .. {n_ranks - 1})")
    empty = np.flatnonzero(np.bincount(p, minlength=n_ranks) == 0)
    if empty.size:
        raise PartitionError(f"the partition gives no element to rank(s) {empty.tolist()}: every rank needs at least one; "
                             "use fewer ranks or another partition")
    return p.astype(np.int32)


def _contiguous(owner: np.ndarray, n_ranks: int):
    """(order, perm, ranges): order[new] = old, perm[old] = new, rank r owns new indices ranges[r]:ranges[r+1]."""
    order = np.argsort(owner, kind="stable")
    perm = np.empty_like(order)
    perm[order] = np.arange(order.size, dtype=order.dtype)
    ranges = np.zeros(n_ranks + 1, dtype=np.int64)
    ranges[1:] = np.cumsum(np.bincount(owner, minlength=n_ranks))
    return order, perm, ranges


@dataclass
class Numbering:
    """A renumbering in which rank r owns the contiguous block ``ranges[r]:ranges[r+1]``."""

    #: order[new] = old index
    order: np.ndarray
    #: perm[old] = new index
    perm: np.ndarray
    #: ranges[r]:ranges[r+1] are rank r's new indices
    ranges: np.ndarray

    @property
    def size(self) -> int:
        return int(self.order.size)

    def owned(self, rank: int) -> np.ndarray:
        """Old indices owned by ``rank``, in the new order."""
        return self.order[self.ranges[rank]:self.ranges[rank + 1]]

    def local_size(self, rank: int) -> int:
        return int(self.ranges[rank + 1] - self.ranges[rank])

    @classmethod
    def from_owner(cls, owner: np.ndarray, n_ranks: int) -> Numbering:
        return cls(*_contiguous(np.asarray(owner), n_ranks))

    @classmethod
    def contiguous(cls, ranges) -> ContiguousNumbering:
        """The numbering in which rank r already owns ``ranges[r]:ranges[r+1]`` of the serial order."""
        return ContiguousNumbering(ranges)


class ContiguousNumbering(Numbering):
    """The identity numbering over contiguous ownership ranges (a rank-local build's): no global arrays.

    ``order`` and ``perm`` are made on demand (they are the identity), so a
    rank holds nothing of global length until it gathers a whole vector.
    """

    def __init__(self, ranges):
        r = np.asarray(ranges, dtype=np.int64)
        if r.ndim != 1 or r.size < 2 or r[0] != 0 or np.any(np.diff(r) < 0):
            raise PartitionError(f"ownership ranges must start at 0 and not decrease, got {r.tolist()}")
        self.ranges = r

    @property
    def order(self) -> np.ndarray:
        return np.arange(self.size)

    @property
    def perm(self) -> np.ndarray:
        return np.arange(self.size)

    @property
    def size(self) -> int:
        return int(self.ranges[-1])

    def owned(self, rank: int) -> np.ndarray:
        return np.arange(self.ranges[rank], self.ranges[rank + 1])


@dataclass
class Layout:
    """Elements, state dofs and parameters of one problem split over ``n_ranks``."""

    n_ranks: int
    parts: np.ndarray
    elements: Numbering
    dofs: Numbering
    params: Numbering


def make_layout(conn: np.ndarray, n_dofs: int, parts: np.ndarray, n_ranks: int, parameter_matrix=None) -> Layout:
    """The :class:`Layout` for connectivity ``conn`` ((E, k), negative = condensed dof) and a partition.

    ``parameter_matrix`` is the sparse L of a linear map rho = L p (E rows);
    ``None`` means one parameter per element (p = rho).
    """
    conn = np.asarray(conn)
    parts = np.asarray(parts, dtype=np.int32)
    n_el = conn.shape[0]
    if parts.shape != (n_el,):
        raise PartitionError(f"the partition has {parts.shape[0]} entries but the matrix has {n_el} elements")
    valid = conn >= 0
    owner = np.full(n_dofs, n_ranks, dtype=np.int32)
    np.minimum.at(owner, conn[valid], np.broadcast_to(parts[:, None], conn.shape)[valid])
    untouched = owner == n_ranks
    if untouched.any():
        raise PartitionError(f"{int(untouched.sum())} dof(s) belong to no element (first: {int(np.argmax(untouched))}); "
                             "the matrix would be singular there, so the mesh cannot be partitioned this way")
    if parameter_matrix is None:
        p_owner = parts
    else:
        L = sp.coo_array(parameter_matrix)
        if L.shape[0] != n_el:
            raise PartitionError(f"the parameter map produces {L.shape[0]} values but the matrix has {n_el} elements")
        nz = L.data != 0
        p_owner = np.full(L.shape[1], n_ranks, dtype=np.int32)
        np.minimum.at(p_owner, L.col[nz], parts[L.row[nz]])
        p_owner[p_owner == n_ranks] = 0  # a parameter no element sees: rank 0 keeps it
    layout = Layout(n_ranks, parts, Numbering.from_owner(parts, n_ranks), Numbering.from_owner(owner, n_ranks),
                    Numbering.from_owner(p_owner, n_ranks))
    logger.debug("layout over %d ranks: elements %s, dofs %s, parameters %s", n_ranks, np.diff(layout.elements.ranges),
                 np.diff(layout.dofs.ranges), np.diff(layout.params.ranges))
    return layout
