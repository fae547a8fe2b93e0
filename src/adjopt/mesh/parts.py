"""Rank-local slabs of the structured meshes, for distributed runs.

Each function here builds one rank's part of the mesh that the matching
generator of :mod:`adjopt.mesh.generators` would build, without ever forming
the global mesh: :func:`rectangle_part` / :func:`unit_square_part` match
:func:`~adjopt.mesh.generators.rectangle` / ``unit_square`` and
:func:`box_part` / :func:`unit_cube_part` match ``box`` / ``unit_cube``.
Work and memory are proportional to the part (plus the 1D coordinate
vectors of the generator).

Partition rule
--------------
The mesh is cut into slabs along its **last axis** (y in 2D, z in 3D). With
``N`` cell layers along that axis (``ny`` resp. ``nz``), rank ``r`` of
``size`` holds the cell layers ``[k0, k1)`` with::

    k0 = r * N // size,    k1 = (r + 1) * N // size

It *owns* the node layers ``k0 .. k1-1`` (the last rank also node layer
``N``); for ``r < size - 1`` node layer ``k1`` is its layer of *ghost* nodes,
owned by rank ``r + 1``. Every rank therefore needs ``size <= N``.

Because the generators number nodes x fastest, then y, then z, and order the
cells the same way, a node layer (and a cell layer) is a contiguous block of
global ids. Hence this is exactly a slab partition of the serial numbering:

* the local nodes, ordered by global id, are the owned nodes followed by the
  ghosts, and ``nodes == node_start + arange(n_local)``;
* the owned node ranges of the ranks are contiguous, in rank order, and cover
  ``0 .. n_global_nodes - 1`` exactly once; the cell ranges likewise cover
  ``0 .. n_global_cells - 1``;
* so the distributed numbering of nodes, degrees of freedom and cells equals
  the serial one, and results can be compared with a serial run entry by
  entry.

Local points are bit-identical to the global generator's (the same
``np.linspace`` values), and the local cells list the same vertices in the
same order, in local node indices (global id minus ``node_start``).

>>> from adjopt.mesh.parts import unit_square_part
>>> p = unit_square_part(4, rank=0, size=2)
>>> p.layers, p.n_owned, p.nodes.tolist()[-5:], p.mesh.n_cells
((0, 2), 10, [10, 11, 12, 13, 14], 16)
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import numpy as np

from ._errors import MeshError
from ._mesh import Mesh
from .generators import _KUHN, _count, _length

logger = logging.getLogger(__name__)

__all__ = ["MeshPart", "box_part", "read_part", "rectangle_part", "unit_cube_part", "unit_square_part"]


@dataclass(frozen=True, eq=False)
class MeshPart:
    """One rank's slab of a structured mesh: its cells and its nodes, with one layer of ghost nodes.

    Attributes
    ----------
    mesh : Mesh
        The local mesh. ``points`` are in global coordinates, bit-identical to
        the global generator's; ``cells`` are in local node indices.
        ``boundaries`` has every boundary name of the global mesh, as the local
        node indices of the global boundary nodes this part holds (owned or
        ghost; possibly an empty array).
    nodes : (n_local,) int64 ndarray
        Global node id of each local node, strictly increasing.
    n_owned : int
        Local nodes ``[0, n_owned)`` are owned by this rank; the rest are
        ghosts, owned by other ranks (``rank + 1`` for the structured slabs;
        any lower or higher rank for a mesh file's part, :func:`read_part`,
        where ``nodes`` is increasing on the owned nodes and on the ghosts
        separately).
    cell_start : int
        The local cells are the global cells ``cell_start + arange(mesh.n_cells)``,
        in this order.
    node_start : int
        ``nodes[0]``; the owned global node ids are ``node_start + arange(n_owned)``.
    n_global_nodes, n_global_cells : int
        Sizes of the global mesh.
    rank, size : int
        This rank and the number of ranks.
    layers : tuple of int or None
        The cell layers ``[k0, k1)`` of this slab along the last axis (None for
        a mesh file's part).
    source_nodes, source_cells : int64 ndarray or None
        For a mesh file's part (:func:`read_part`): the file's node number of
        each local node and the file's cell number of each local cell (the
        global numbering is a renumbering of the file's). None for the slabs,
        whose numbering is the generator's.
    """

    mesh: Mesh
    nodes: np.ndarray
    n_owned: int
    cell_start: int
    node_start: int
    n_global_nodes: int
    n_global_cells: int
    rank: int
    size: int
    layers: tuple[int, int] | None
    source_nodes: np.ndarray | None = None
    source_cells: np.ndarray | None = None

    @property
    def owned_nodes(self) -> np.ndarray:
        """Global ids of the owned nodes, ``node_start + arange(n_owned)``."""
        return self.nodes[: self.n_owned]

    @property
    def n_ghosts(self) -> int:
        """Number of ghost nodes (0 on the last rank of a slab partition)."""
        return int(self.nodes.shape[0]) - self.n_owned

    def global_cells(self) -> np.ndarray:
        """The local cells in global node ids, shape ``(mesh.n_cells, k)``.

        Equal to ``global_mesh.cells[cell_start:cell_start + mesh.n_cells]``.
        """
        return self.nodes[self.mesh.cells]

    def __repr__(self) -> str:
        return (f"MeshPart(rank={self.rank}, size={self.size}, layers={self.layers}, "
                f"cell_type={self.mesh.cell_type!r}, n_owned={self.n_owned}, n_ghosts={self.n_ghosts}, "
                f"n_cells={self.mesh.n_cells}, cell_start={self.cell_start})")


# ---------------------------------------------------------------- helpers
def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MeshError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _rank_size(rank, size, comm) -> tuple[int, int]:
    """Resolve ``(rank, size)`` from either ``comm`` or ``rank`` and ``size``."""
    if comm is not None:
        if rank is not None or size is not None:
            raise MeshError("give either comm= or rank= and size=, not both")
        try:
            rank, size = comm.rank, comm.size
        except AttributeError:
            raise MeshError(
                f"comm must have .rank and .size attributes (e.g. an mpi4py communicator), got {comm!r}"
            ) from None
    elif rank is None or size is None:
        raise MeshError("give the part to build: either comm= (with .rank and .size) or both rank= and size=")
    size = _int(size, "size")
    rank = _int(rank, "rank")
    if size < 1:
        raise MeshError(f"size must be >= 1 (the number of ranks), got {size}")
    if not 0 <= rank < size:
        raise MeshError(f"rank must be in [0, {size}) for size={size}, got {rank}")
    return rank, size


def _layers(n_layers: int, rank: int, size: int, axis: str, count: str) -> tuple[int, int]:
    if size > n_layers:
        raise MeshError(
            f"{size} ranks but only {count}={n_layers}: more ranks than cell layers along {axis}: "
            f"use at most {n_layers} ranks or a finer mesh"
        )
    return rank * n_layers // size, (rank + 1) * n_layers // size


def _empty() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


# ------------------------------------------------------------------- 2D
def rectangle_part(nx: int, ny: int, lx: float = 1.0, ly: float = 1.0, cell: str = "triangle", *,
                   rank: int | None = None, size: int | None = None, comm=None) -> MeshPart:
    """One rank's slab (along y) of ``rectangle(nx, ny, lx, ly, cell)``.

    Parameters
    ----------
    nx, ny, lx, ly, cell
        As for :func:`~adjopt.mesh.generators.rectangle`.
    rank, size
        This rank and the number of ranks (``0 <= rank < size <= ny``).
    comm
        Instead of ``rank`` and ``size``: any object with ``.rank`` and
        ``.size`` (e.g. an mpi4py communicator).

    Returns
    -------
    MeshPart
        Cell layers ``[k0, k1)`` with ``k0 = rank*ny//size``,
        ``k1 = (rank+1)*ny//size``; node layers ``k0..k1`` (``k1`` are ghosts
        unless this is the last rank).

    Raises
    ------
    MeshError
        Invalid mesh arguments (as the generator), invalid ``rank`` /
        ``size`` / ``comm``, or ``size > ny``.
    """
    nx, ny = _count(nx, "nx"), _count(ny, "ny")
    lx, ly = _length(lx, "lx"), _length(ly, "ly")
    if cell not in ("triangle", "quad"):
        raise MeshError(f"rectangle_part: unknown cell {cell!r}; use 'triangle' or 'quad'")
    rank, size = _rank_size(rank, size, comm)
    k0, k1 = _layers(ny, rank, size, "y", "ny")
    last = rank == size - 1
    nl = k1 - k0  # local cell layers; node layers k0..k1 -> nl + 1
    sy = nx + 1
    # same values as the generator: the full linspace, sliced
    x = np.linspace(0.0, lx, nx + 1)
    y = np.linspace(0.0, ly, ny + 1)[k0:k1 + 1]
    gx, gy = np.meshgrid(x, y)
    points = np.column_stack([gx.ravel(), gy.ravel()])
    i, j = np.meshgrid(np.arange(nx), np.arange(nl))
    n00 = (j * sy + i).ravel()
    n10, n01 = n00 + 1, n00 + sy
    n11 = n01 + 1
    if cell == "quad":
        cells = np.column_stack([n00, n10, n11, n01])
        per = 1
    else:
        cells = np.stack([np.column_stack([n00, n10, n11]), np.column_stack([n00, n11, n01])], axis=1)
        cells = cells.reshape(-1, 3)
        per = 2
    ids = np.arange((nl + 1) * sy, dtype=np.int64).reshape(nl + 1, sy)
    boundaries = {
        "left": ids[:, 0], "right": ids[:, -1],
        "bottom": ids[0, :] if k0 == 0 else _empty(),
        "top": ids[-1, :] if k1 == ny else _empty(),
    }
    boundaries["all"] = np.concatenate(list(boundaries.values()))
    mesh = Mesh(points, cells, cell, boundaries)
    node_start = k0 * sy
    n_owned = (nl + (1 if last else 0)) * sy
    logger.debug("rectangle_part %d/%d: layers [%d, %d), %d nodes (%d owned), %d cells",
                 rank, size, k0, k1, mesh.n_nodes, n_owned, mesh.n_cells)
    return MeshPart(
        mesh=mesh,
        nodes=node_start + np.arange(mesh.n_nodes, dtype=np.int64),
        n_owned=n_owned,
        cell_start=k0 * nx * per,
        node_start=node_start,
        n_global_nodes=(ny + 1) * sy,
        n_global_cells=ny * nx * per,
        rank=rank,
        size=size,
        layers=(k0, k1),
    )


def unit_square_part(n: int, cell: str = "triangle", *,
                     rank: int | None = None, size: int | None = None, comm=None) -> MeshPart:
    """``rectangle_part(n, n, 1, 1, cell, ...)``: one rank's slab of ``unit_square(n, cell)``."""
    return rectangle_part(n, n, 1.0, 1.0, cell, rank=rank, size=size, comm=comm)


# ------------------------------------------------------------------- 3D
def box_part(nx: int, ny: int, nz: int, lx: float = 1.0, ly: float = 1.0, lz: float = 1.0,
             cell: str = "tetra", *, rank: int | None = None, size: int | None = None, comm=None) -> MeshPart:
    """One rank's slab (along z) of ``box(nx, ny, nz, lx, ly, lz, cell)``.

    Parameters
    ----------
    nx, ny, nz, lx, ly, lz, cell
        As for :func:`~adjopt.mesh.generators.box`.
    rank, size
        This rank and the number of ranks (``0 <= rank < size <= nz``).
    comm
        Instead of ``rank`` and ``size``: any object with ``.rank`` and
        ``.size`` (e.g. an mpi4py communicator).

    Returns
    -------
    MeshPart
        Cell layers ``[k0, k1)`` with ``k0 = rank*nz//size``,
        ``k1 = (rank+1)*nz//size``; node layers ``k0..k1`` (``k1`` are ghosts
        unless this is the last rank).

    Raises
    ------
    MeshError
        Invalid mesh arguments (as the generator), invalid ``rank`` /
        ``size`` / ``comm``, or ``size > nz``.
    """
    nx, ny, nz = _count(nx, "nx"), _count(ny, "ny"), _count(nz, "nz")
    lx, ly, lz = _length(lx, "lx"), _length(ly, "ly"), _length(lz, "lz")
    if cell not in ("tetra", "hexahedron"):
        raise MeshError(f"box_part: unknown cell {cell!r}; use 'tetra' or 'hexahedron'")
    rank, size = _rank_size(rank, size, comm)
    k0, k1 = _layers(nz, rank, size, "z", "nz")
    last = rank == size - 1
    nl = k1 - k0
    x = np.linspace(0.0, lx, nx + 1)
    y = np.linspace(0.0, ly, ny + 1)
    z = np.linspace(0.0, lz, nz + 1)[k0:k1 + 1]
    gz, gy, gx = np.meshgrid(z, y, x, indexing="ij")
    points = np.column_stack([gx.ravel(), gy.ravel(), gz.ravel()])
    sx, sy = 1, nx + 1
    sz = (nx + 1) * (ny + 1)
    cl, cj, ci = np.meshgrid(np.arange(nl), np.arange(ny), np.arange(nx), indexing="ij")
    base = (cl * sz + cj * sy + ci * sx).ravel()
    bits = np.arange(8)
    offs = (bits & 1) * sx + ((bits >> 1) & 1) * sy + ((bits >> 2) & 1) * sz
    corners = base[:, None] + offs[None, :]
    if cell == "hexahedron":
        cells = corners[:, [0, 1, 3, 2, 4, 5, 7, 6]]
        per = 1
    else:
        cells = corners[:, _KUHN].reshape(-1, 4)
        per = _KUHN.shape[0]
    ids = np.arange((nl + 1) * sz, dtype=np.int64).reshape(nl + 1, ny + 1, nx + 1)
    boundaries = {
        "left": ids[:, :, 0], "right": ids[:, :, -1],
        "bottom": ids[:, 0, :], "top": ids[:, -1, :],
        "front": ids[0, :, :] if k0 == 0 else _empty(),
        "back": ids[-1, :, :] if k1 == nz else _empty(),
    }
    boundaries["all"] = np.concatenate([v.ravel() for v in boundaries.values()])
    mesh = Mesh(points, cells, cell, boundaries)
    node_start = k0 * sz
    n_owned = (nl + (1 if last else 0)) * sz
    logger.debug("box_part %d/%d: layers [%d, %d), %d nodes (%d owned), %d cells",
                 rank, size, k0, k1, mesh.n_nodes, n_owned, mesh.n_cells)
    return MeshPart(
        mesh=mesh,
        nodes=node_start + np.arange(mesh.n_nodes, dtype=np.int64),
        n_owned=n_owned,
        cell_start=k0 * nx * ny * per,
        node_start=node_start,
        n_global_nodes=(nz + 1) * sz,
        n_global_cells=nz * ny * nx * per,
        rank=rank,
        size=size,
        layers=(k0, k1),
    )


def unit_cube_part(n: int, cell: str = "tetra", *,
                   rank: int | None = None, size: int | None = None, comm=None) -> MeshPart:
    """``box_part(n, n, n, 1, 1, 1, cell, ...)``: one rank's slab of ``unit_cube(n, cell)``."""
    return box_part(n, n, n, 1.0, 1.0, 1.0, cell, rank=rank, size=size, comm=comm)


# ------------------------------------------------------------- mesh files
PARTITIONS = ("slab", "graph")


def read_part(path, *, comm=None, partition: str = "slab", parts=None, root: int = 0) -> MeshPart:
    """This rank's part of a mesh file: read on one rank, partitioned there, and scattered (collective).

    Rank ``root`` reads the file (:func:`adjopt.mesh.read`: meshio's
    formats are read whole, so no rank reads in parallel), splits its cells
    over the ranks, renumbers, and sends each rank its part; the other ranks
    never hold the whole mesh (``root`` holds it while it splits).

    Numbering (the global one of the distributed run): cells are ordered by
    rank, keeping the file's order within a rank; a node belongs to the
    lowest rank among its cells, and nodes are ordered by that owner, keeping
    the file's order within an owner. So each rank owns a contiguous range of
    nodes (``node_start + arange(n_owned)``) and of cells, as
    :class:`MeshPart` promises, and its ghosts are the nodes of its cells that
    other ranks own. ``source_nodes`` and ``source_cells`` map back to the
    file's numbers (to compare with a serial run, or to write results in the
    file's order).

    Parameters
    ----------
    path
        The mesh file (any format meshio reads; read on ``root`` only).
    comm
        An mpi4py communicator (default ``MPI.COMM_WORLD``).
    partition
        ``"slab"`` (default): equal-count slabs across the longest extent of
        the cell centres; ``"graph"``: METIS (pymetis, the ``mpi`` extra) on
        the graph of cells that share a node, for unstructured meshes (fewer
        shared nodes). The partition is computed on ``root``.
    parts
        An explicit partition instead: one rank per cell of the file (on
        ``root``; ignored elsewhere).
    root
        The rank that reads.

    Returns
    -------
    MeshPart
        The local mesh (points in the file's coordinates, cells in local node
        indices, every boundary of the file as the local indices of its nodes
        this rank holds, point and cell data of the file restricted to the
        part) and the numbering above.

    Raises
    ------
    FileNotFoundError, MeshError, PartitionError
        On every rank, with the reading rank's message (a missing file, a
        file meshio cannot read, more ranks than cells, an unknown
        ``partition``, pymetis missing for ``"graph"``).
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.rank, comm.size
    if isinstance(root, bool) or not (isinstance(root, numbers.Integral) and 0 <= root < size):
        raise MeshError(f"root must be a rank in [0, {size}), got {root!r}")
    pieces, error = None, None
    if rank == root:
        try:
            if partition not in PARTITIONS:
                raise MeshError(f"unknown partition {partition!r}; use one of {PARTITIONS} or parts=")
            from .io import read

            pieces = _split(read(path), size, partition, parts)
        except (Exception, SystemExit) as exc:  # every rank raises the reading rank's error, none waits for a part
            error = exc if isinstance(exc, Exception) else MeshError(f"reading {path!r} exited ({exc!r})")
    said = comm.bcast(None if error is None else (type(error), str(error)), root=root)
    if said is not None:
        if error is not None:
            raise error
        kind, message = said
        try:
            exc = kind(f"{message} (on rank {root}, which reads the mesh)")
        except Exception:  # an exception class that wants other arguments
            exc = MeshError(f"{kind.__name__}: {message} (on rank {root}, which reads the mesh)")
        raise exc
    if rank == root:
        for r in range(size):
            if r != root:
                comm.send(pieces[r], dest=r, tag=7101)
        mine = pieces[root]
        del pieces
    else:
        mine = comm.recv(source=root, tag=7101)
    mesh = Mesh(mine["points"], mine["cells"], mine["cell_type"], mine["boundaries"],
                point_data=mine["point_data"], cell_data=mine["cell_data"])
    logger.debug("read_part %d/%d: %d nodes (%d owned), %d cells", rank, size, mesh.n_nodes, mine["n_owned"],
                 mesh.n_cells)
    return MeshPart(mesh=mesh, nodes=mine["nodes"], n_owned=mine["n_owned"], cell_start=mine["cell_start"],
                    node_start=mine["node_start"], n_global_nodes=mine["n_global_nodes"],
                    n_global_cells=mine["n_global_cells"], rank=rank, size=size, layers=None,
                    source_nodes=mine["source_nodes"], source_cells=mine["source_cells"])


def _split(mesh: Mesh, size: int, partition: str, parts) -> list[dict]:
    """Every rank's piece of ``mesh`` (on the reading rank): the renumbering of :func:`read_part`."""
    from ..backends.partition import partition_elements

    conn = mesh.cells
    n_cells, k = conn.shape
    n_nodes = mesh.n_nodes
    if parts is not None:
        rank_of = partition_elements(n_cells, size, parts=parts)
    elif partition == "graph":
        rank_of = partition_elements(n_cells, size, "graph", conn=conn)
    else:
        rank_of = partition_elements(n_cells, size, "slab", coordinates=mesh.cell_centers())
    rank_of = np.asarray(rank_of, dtype=np.int64)
    cell_order = np.argsort(rank_of, kind="stable")
    cell_starts = np.concatenate([[0], np.cumsum(np.bincount(rank_of, minlength=size))])
    owner = np.full(n_nodes, size, dtype=np.int64)
    np.minimum.at(owner, conn.ravel(), np.repeat(rank_of, k))
    owner[owner == size] = 0  # a node of no cell (read() removes them): rank 0 keeps it
    node_order = np.lexsort((np.arange(n_nodes), owner))  # new number -> file number
    new_of_old = np.empty(n_nodes, dtype=np.int64)
    new_of_old[node_order] = np.arange(n_nodes)
    node_starts = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=size))])
    cells = new_of_old[conn[cell_order]]
    marks = {}
    for name in mesh.boundary_names:
        m = np.zeros(n_nodes, dtype=bool)
        m[mesh.boundary(name)] = True
        marks[name] = m
    out = []
    for r in range(size):
        c = cells[cell_starts[r]:cell_starts[r + 1]]
        lo, hi = int(node_starts[r]), int(node_starts[r + 1])
        used = np.unique(c)
        ghosts = used[(used < lo) | (used >= hi)]
        nodes = np.concatenate([np.arange(lo, hi, dtype=np.int64), ghosts])
        local = np.where((c >= lo) & (c < hi), c - lo, (hi - lo) + np.searchsorted(ghosts, c))
        old = node_order[nodes]
        src_cells = cell_order[cell_starts[r]:cell_starts[r + 1]]
        out.append(dict(
            points=mesh.points[old], cells=local, cell_type=mesh.cell_type,
            boundaries={name: np.flatnonzero(m[old]) for name, m in marks.items()},
            point_data={name: np.asarray(v)[old] for name, v in (mesh.point_data or {}).items()},
            cell_data={name: np.asarray(v)[src_cells] for name, v in (mesh.cell_data or {}).items()},
            nodes=nodes, n_owned=hi - lo, node_start=lo, cell_start=int(cell_starts[r]), n_global_nodes=n_nodes,
            n_global_cells=n_cells, source_nodes=old, source_cells=src_cells))
    return out
