"""Mesh files through meshio (optional dependency: ``pip install 'adjopt[mesh]'``).

:func:`read` loads any format meshio reads (.msh, .vtu, .xdmf, ...);
:func:`write_vtu` writes a VTU file atomically (temporary file in the same
folder, then ``os.replace``), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ShapeError
from ._errors import MeshError
from ._mesh import Mesh
from ._reference import CELLS

logger = logging.getLogger(__name__)

_BLOCK_DIM = {"vertex": 0, "line": 1, "triangle": 2, "quad": 2, "tetra": 3, "hexahedron": 3}
_PHYSICAL = "gmsh:physical"


def _meshio():
    try:
        import meshio
    except ImportError as exc:
        raise ImportError(
            "reading and writing mesh files needs the optional dependency meshio: "
            "pip install 'adjopt[mesh]'"
        ) from exc
    return meshio


def read(path) -> Mesh:
    """Read a mesh file with meshio.

    The cell block type of highest dimension among ``triangle``, ``quad``,
    ``tetra``, ``hexahedron`` is used (all blocks of that type are
    concatenated); lower-dimensional blocks only feed named boundaries.
    A 2D mesh stored with a zero z column gets it dropped. Nodes used by no
    cell of the chosen type are removed (and point data / boundaries
    renumbered).

    Boundaries: ``"all"`` = nodes of the boundary facets; gmsh physical groups
    of lower dimension (``field_data`` name -> (tag, dim) with the
    ``gmsh:physical`` cell data) and meshio ``point_sets`` become named node
    sets.

    Parameters
    ----------
    path
        File name; the format is deduced by meshio from the extension.

    Returns
    -------
    Mesh
        With ``point_data`` / ``cell_data`` holding the file's fields.

    Raises
    ------
    FileNotFoundError
        The file does not exist (message names the path).
    MeshError
        meshio cannot read it, no supported cell type, mixed cell types of
        the same dimension, or 2D cells with non-zero z coordinates.
    ImportError
        meshio is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"mesh file not found: '{path}' (check the path and working "
                                f"directory {os.getcwd()})", str(path))
    meshio = _meshio()
    try:
        m = meshio.read(str(path))
    except (Exception, SystemExit) as exc:  # meshio raises ReadError, ValueError, ... and calls sys.exit on some
        raise MeshError(
            f"meshio could not read '{path}' ({type(exc).__name__}: {exc}); check that the file is "
            f"complete and in a format meshio knows (by its extension)"
        ) from exc

    found = [b.type for b in m.cells]
    usable = [t for t in dict.fromkeys(found) if t in CELLS]
    if not usable:
        raise MeshError(
            f"'{path}' has no supported cells: found cell blocks {sorted(set(found)) or 'none'}, "
            f"supported are {list(CELLS)} (linear elements only; re-export with order 1)"
        )
    top = max(CELLS[t].dim for t in usable)
    chosen = [t for t in usable if CELLS[t].dim == top]
    if len(chosen) > 1:
        raise MeshError(
            f"'{path}' mixes cell types {chosen} of dimension {top}; adjopt meshes hold one cell type, "
            f"split or re-mesh the file"
        )
    cell_type = chosen[0]
    blocks = [i for i, b in enumerate(m.cells) if b.type == cell_type]
    cells = np.concatenate([np.asarray(m.cells[i].data, dtype=np.int64) for i in blocks])
    cell_data = {}
    for key, per_block in m.cell_data.items():  # meshio keeps one array per block
        cell_data[key] = np.concatenate([np.asarray(per_block[i]) for i in blocks])

    points = np.asarray(m.points, dtype=np.float64)
    dim = CELLS[cell_type].dim
    if points.shape[1] > dim:
        extra = points[:, dim:]
        if np.any(extra != 0.0):
            raise MeshError(
                f"'{path}' has {cell_type} cells but non-zero z coordinates (max |z| = "
                f"{np.abs(extra).max():.3g}); surface meshes in 3D are not supported, project to the plane"
            )
        points = np.ascontiguousarray(points[:, :dim])
    point_data = {k: np.asarray(v) for k, v in m.point_data.items()}

    boundaries = _named_node_sets(m, top)

    # drop nodes that no cell uses (e.g. gmsh geometry points)
    used = np.zeros(points.shape[0], dtype=bool)
    used[cells.ravel()] = True
    if not used.all():
        new = np.cumsum(used) - 1
        logger.info("read '%s': removing %d node(s) used by no %s cell", path, int((~used).sum()), cell_type)
        points = points[used]
        cells = new[cells]
        point_data = {k: v[used] for k, v in point_data.items()}
        boundaries = {k: new[v[used[v]]] for k, v in boundaries.items()}
    if "all" in boundaries:
        logger.warning("read '%s': the file's node set 'all' is replaced by the boundary facets' nodes", path)
        del boundaries["all"]
    boundaries = {k: v for k, v in boundaries.items() if v.size}
    mesh = Mesh(points, cells, cell_type, boundaries, point_data=point_data, cell_data=cell_data)
    logger.info("read '%s': %d nodes, %d %s cells, boundaries %s", path, mesh.n_nodes, mesh.n_cells,
                cell_type, mesh.boundary_names)
    return mesh


def _named_node_sets(m, top: int) -> dict[str, np.ndarray]:
    """Node sets from gmsh physical groups of dimension < ``top`` and meshio point_sets."""
    out: dict[str, list[np.ndarray]] = {}
    groups = {}
    for name, val in (m.field_data or {}).items():
        val = np.asarray(val).ravel()
        if val.size == 2 and val.dtype.kind in "iu":
            groups[name] = (int(val[0]), int(val[1]))
    phys = m.cell_data.get(_PHYSICAL)
    if groups and phys is not None:
        for block, tags in zip(m.cells, phys, strict=True):
            bdim = _BLOCK_DIM.get(block.type)
            if bdim is None or bdim >= top:
                continue
            tags = np.asarray(tags).ravel()
            for name, (tag, gdim) in groups.items():
                if gdim == bdim:
                    sel = np.asarray(block.data)[tags == tag]
                    if sel.size:
                        out.setdefault(name, []).append(sel.ravel())
    for name, nodes in (getattr(m, "point_sets", None) or {}).items():
        out.setdefault(name, []).append(np.asarray(nodes).ravel())
    return {k: np.unique(np.concatenate(v)).astype(np.int64) for k, v in out.items()}


def _replace_atomically(path: Path, suffix: str, write) -> None:
    """write(temporary path) beside ``path``, then os.replace it there: an existing file is replaced whole or not
    at all, and a failed write leaves no temporary file. The file gets the permissions of an ordinary new file
    (0666 less the umask; mkstemp's are private)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_fields(fields, rows: int, kind: str, what: str) -> dict[str, np.ndarray]:
    out = {}
    for name, val in dict(fields or {}).items():
        arr = np.asarray(val)
        if arr.dtype.kind not in "biuf":
            raise MeshError(f"{kind} {name!r} must be numeric, got dtype {arr.dtype}")
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise ShapeError(
                f"{kind} {name!r} has shape {arr.shape} but needs {rows} rows (one per {what})"
            )
        out[str(name)] = arr
    return out


def write_vtu(path, mesh: Mesh, point_data=None, cell_data=None) -> Path:
    """Write ``mesh`` and fields to a VTU file, atomically.

    The file is written to a temporary file in the destination folder and
    moved into place with ``os.replace``; on any error the temporary file is
    removed and an existing ``path`` is left untouched. 2D points are padded
    with z = 0 (VTK needs 3 coordinates).

    Parameters
    ----------
    path
        Destination, must end in ``.vtu``.
    mesh
        The mesh.
    point_data
        ``{name: array}`` with ``mesh.n_nodes`` rows each.
    cell_data
        ``{name: array}`` with ``mesh.n_cells`` rows each.

    Returns
    -------
    Path
        The written path.

    Raises
    ------
    ShapeError
        A field has the wrong number of rows (message names it).
    MeshError
        Wrong suffix, non-numeric field.
    FileNotFoundError
        The destination folder does not exist.
    """
    path = Path(path)
    if path.suffix.lower() != ".vtu":
        raise MeshError(f"write_vtu writes VTU files; give a path ending in '.vtu', got '{path}'")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"output folder does not exist: '{folder}' (create it first)",
                                str(folder))
    pdata = _check_fields(point_data, mesh.n_nodes, "point_data", "node")
    cdata = _check_fields(cell_data, mesh.n_cells, "cell_data", "cell")
    meshio = _meshio()
    pts = mesh.points
    if pts.shape[1] == 2:
        pts = np.column_stack([pts, np.zeros(pts.shape[0])])
    m = meshio.Mesh(pts, [(mesh.cell_type, mesh.cells)], point_data=pdata,
                    cell_data={k: [v] for k, v in cdata.items()})
    _replace_atomically(path, ".tmp.vtu", lambda tmp: meshio.write(tmp, m, file_format="vtu"))
    logger.info("wrote '%s' (%d nodes, %d cells, point data %s, cell data %s)", path, mesh.n_nodes,
                mesh.n_cells, sorted(pdata), sorted(cdata))
    return path


_VTK_TYPES = {"f8": "Float64", "f4": "Float32", "i8": "Int64", "i4": "Int32", "u8": "UInt64", "u4": "UInt32",
              "i2": "Int16", "u2": "UInt16", "i1": "Int8", "u1": "UInt8"}


def _pdata(tag: str, fields: dict) -> str:
    lines = []
    for name, v in fields.items():
        kind = _VTK_TYPES.get(v.dtype.str[1:])
        if kind is None:
            raise MeshError(f"field {name!r} has dtype {v.dtype}, which VTK files do not hold; convert it to float64")
        comps = 1 if v.ndim == 1 else int(np.prod(v.shape[1:]))
        lines.append(f'      <PDataArray type="{kind}" Name="{name}" NumberOfComponents="{comps}"/>')
    return f"    <{tag}>\n" + "\n".join(lines) + ("\n" if lines else "") + f"    </{tag}>\n"


def write_pvtu(path, mesh: Mesh, point_data=None, cell_data=None, *, comm) -> Path:
    """Write a distributed mesh and its fields as a parallel VTU: one piece per rank and an index (collective).

    Every rank writes its part (``mesh``: its local mesh, ghost nodes
    included; its fields on it) to ``<stem>_<rank>.vtu`` beside ``path``
    (with :func:`write_vtu`, atomically), and rank 0 then writes the index
    ``path`` (``.pvtu``), which ParaView opens as one dataset. Nothing of
    global length is formed. The fields must have the same names, types and
    components on every rank. If any rank fails, every rank raises (the
    index is not written, so a half-written result is never announced);
    pieces of an earlier run with more ranks are removed.

    Returns the index path on every rank.
    """
    path = Path(path)
    # this rank's checks: a failure stops every rank with its reason (none is left waiting for the others)
    error, kind, pdata, cdata = None, MeshError, {}, {}
    try:
        if path.suffix.lower() != ".pvtu":
            raise MeshError(f"write_pvtu writes a '.pvtu' index; give a path ending in '.pvtu', got '{path}'")
        pdata = _check_fields(point_data, mesh.n_nodes, "point_data", "node")
        cdata = _check_fields(cell_data, mesh.n_cells, "cell_data", "cell")
    except (MeshError, ShapeError, ValueError, TypeError) as exc:
        error, kind = f"{exc}", type(exc) if isinstance(exc, (MeshError, ShapeError)) else MeshError
    said = comm.allgather(error)
    first = next(((r, e) for r, e in enumerate(said) if e is not None), None)
    if first is not None:
        raise (kind if error is not None else MeshError)(
            first[1] if comm.size == 1 else f"write_pvtu: {first[1]} (on rank {first[0]} of {comm.size})")
    piece = path.with_name(f"{path.stem}_{comm.rank}.vtu")
    if comm.rank == 0 and path.exists():
        path.unlink()  # an index of an earlier run must not announce this run's pieces mixed with the old ones
    comm.Barrier()
    try:
        write_vtu(piece, mesh, pdata, cdata)
    except Exception as exc:  # reported on every rank below
        error = f"{type(exc).__name__}: {exc}"
    signature = (sorted((k, v.dtype.str, v.shape[1:]) for k, v in pdata.items()),
                 sorted((k, v.dtype.str, v.shape[1:]) for k, v in cdata.items()))
    got = comm.allgather((error, signature))
    bad = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
    if bad:
        raise OSError(f"write_pvtu: rank {bad[0][0]} could not write its piece ({bad[0][1]}); nothing announced in "
                      f"'{path}'")
    if any(s != got[0][1] for _, s in got):
        raise MeshError("write_pvtu: the ranks' fields differ in names, types or components; give every rank the same")
    error = None
    if comm.rank == 0:
        try:
            _write_index(path, comm.size, pdata, cdata)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    error = comm.bcast(error)
    if error is not None:
        raise OSError(f"write_pvtu: rank 0 could not write the index '{path}' ({error})")
    return path


def _write_index(path: Path, size: int, pdata: dict, cdata: dict) -> None:
    """The .pvtu index of ``size`` pieces, atomically; stale pieces of a larger earlier run removed."""
    pieces = "".join(f'    <Piece Source="{path.stem}_{r}.vtu"/>\n' for r in range(size))
    text = ('<?xml version="1.0"?>\n'
            '<VTKFile type="PUnstructuredGrid" version="0.1" byte_order="LittleEndian">\n'
            '  <PUnstructuredGrid GhostLevel="0">\n'
            + _pdata("PPointData", pdata) + _pdata("PCellData", cdata)
            + '    <PPoints>\n      <PDataArray type="Float64" NumberOfComponents="3"/>\n    </PPoints>\n'
            + pieces + "  </PUnstructuredGrid>\n</VTKFile>\n")
    _replace_atomically(path, ".tmp", lambda tmp: Path(tmp).write_text(text))
    k = size
    while (stale := path.with_name(f"{path.stem}_{k}.vtu")).exists():
        stale.unlink()
        k += 1
    logger.info("wrote '%s' (%d pieces)", path, size)
