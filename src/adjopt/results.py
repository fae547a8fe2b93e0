"""Write the outcome of an optimization run to a folder: data files and pictures.

:func:`write_results` takes a :class:`~adjopt.Problem` and the
:class:`~adjopt.optimize.OptimizeResult` of ``adjopt.minimize`` and writes

``history.json``
    The result's summary (``as_dict()`` without ``x`` and ``jac``), the
    problem name and ``problem.meta["options"``], the per-iteration history.
    Non-finite numbers are written as ``null`` (strict JSON).
``history.csv``
    One row per history entry (iteration 0 is the start); the columns are the
    union of the entries' keys, nested values are JSON-encoded.
``result.npz``
    ``x``, ``jac``, ``state`` and ``adjoint`` (on the system's dofs, as
    ``problem.functional`` returns them) and the scalar counters
    (``fun``, ``nit``, ``nfev``, ...), readable with ``np.load`` without pickle.
``fields.vtu``
    Parameter, state and adjoint on the mesh (see :func:`fields`), when
    ``problem.meta["mesh"]`` is an :class:`adjopt.mesh.Mesh`; open it in ParaView.
``convergence.png``, ``parameter.png``, ``state.png``
    Matplotlib (Agg) pictures: J and the stationarity measure per iteration;
    the parameter (and the reference ``meta["m_true"]`` / ``meta["z_exact"]``
    when the problem has one) and the state on the mesh. 3D meshes are shown
    on the slice nearest the mid-plane of z. Skipped with a logged warning when
    matplotlib is not installed.

Every file is written under a temporary name in the folder and moved into
place with ``os.replace``, so a crash never leaves a half-written file; a
kill can leave the temporary file itself, which :func:`remove_temporaries`
removes (the ``adjopt`` command does so when it locks the folder).

Meta keys read (all optional): ``mesh``, ``dofs`` / ``dofmap`` (a Dirichlet
:class:`~adjopt.fem.dirichlet.DofMap` to expand states from the free dofs),
``filter`` (a parameter map whose ``forward`` gives the physical density),
``parameter_cells`` (the cells of the parameters when there are fewer than cells, NaN on the others; or a
callable p -> the parameters on every cell),
``parameter_view`` (a callable: the part of the parameters that is a field, e.g. without a min-max's bound),
``designs`` (``{name: callable p -> density per cell}``: several designs, drawn side by side),
``options``, ``m_true`` / ``z_exact`` (reference parameter),
``observation_points`` (drawn on the state picture), ``labels`` (``{field: text}``
overriding the description of "parameter", "density", "state", "displacement")
and ``units`` (``{field: unit}``, shown on the colorbars).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import logging
import math
import os
import re
import secrets
import stat
import textwrap
from pathlib import Path

import numpy as np

from .errors import AdjoptError

logger = logging.getLogger(__name__)

__all__ = ["ResultsExistError", "ResultsWriteError", "fields", "remove_temporaries", "write_results"]

#: names of the files write_results may write (a forced rewrite removes stale ones among these only)
RESULT_FILES = ("history.json", "history.csv", "result.npz", "fields.vtu", "convergence.png", "parameter.png",
                "state.png")

#: the files ``adjopt uq`` writes (adjopt.uq_results)
UQ_FILES = ("uq.json", "uq.npz", "eigenvalues.png", "variance.png", "samples.png")

#: the temporary names adjopt writes under before os.replace: _atomic_write (.NAME.PID.HEX8.tmp), write_vtu and
#: write_checkpoint (tempfile.mkstemp: 8 characters of [a-z0-9_])
_TEMPORARY = re.compile(r"\.(?:%s)\.\d+\.[0-9a-f]{8}\.tmp|\.fields\.vtu\.[a-z0-9_]{8}\.tmp\.vtu|\.checkpoint-[a-z0-9_]{8}\.tmp"
                        % "|".join(map(re.escape, RESULT_FILES + UQ_FILES)))

#: what the fields of the gallery problems mean (by problem-name prefix); meta["labels"] overrides
_GALLERY_LABELS = {
    "poisson_inversion": {"parameter": "log-conductivity m (conductivity = exp(m))", "state": "potential u"},
    "multi_experiment": {"parameter": "log-conductivity m (conductivity = exp(m))", "state": "potential u"},
    "optimal_control": {"parameter": "control z", "state": "state u"},
    "advection_diffusion_source": {"parameter": "source m", "state": "concentration u"},
    "topology_compliance": {"parameter": "design variables p (unfiltered)",
                            "density": "physical density rho (filtered, projected; 1 solid, 0 void)",
                            "state": "displacement", "displacement": "displacement"},
    "topology_stress": {"parameter": "design variables p (unfiltered)",
                        "density": "physical density rho (filtered; 1 solid, 0 void)",
                        "state": "displacement", "displacement": "displacement"},
    "topology_eigen": {"parameter": "design variables p (unfiltered)",
                       "density": "physical density rho (filtered; the mass block 1)",
                       "state": "fundamental mode", "displacement": "fundamental mode"},
    "topology_mechanism": {"parameter": "design variables p (unfiltered)",
                           "density": "physical density rho (filtered; 1 solid, 0 void)",
                           "state": "displacement", "displacement": "displacement"},
}
#: meta keys holding a reference value of the parameter, and how to call it
_REFERENCES = (("m_true", "true parameter (used to make the data)"), ("z_exact", "exact optimum"),
               ("p_true", "true parameter"))
_DPI = 110
#: what each method's stationarity measure is (history["stationarity"])
_STATIONARITY = {
    "": "norm of the (projected) gradient in the dual inner product",
    "oc": "max-norm change of the design in the last step (oc)",
    "mma": "KKT residual: projected Lagrangian gradient, complementarity, violation (mma)",
}


class ResultsExistError(AdjoptError, FileExistsError):
    """The output folder exists and is not empty (and ``force`` was not given)."""


class ResultsWriteError(AdjoptError, OSError):
    """The output folder cannot be created or a result file cannot be written there."""


# -- fields on the mesh ------------------------------------------------------------------------------
def _mesh_of(problem):
    meta = getattr(problem, "meta", None) or {}
    mesh = meta.get("mesh")
    if mesh is None:
        return None, "the problem has no mesh in meta['mesh']"
    if not all(hasattr(mesh, a) for a in ("points", "cells", "cell_type", "n_nodes", "n_cells", "dim")):
        return None, f"meta['mesh'] is a {type(mesh).__name__}, not an adjopt.mesh.Mesh"
    return mesh, ""


def _dofmap_of(meta):
    for key in ("dofs", "dofmap"):
        d = meta.get(key)
        if d is not None and hasattr(d, "expand") and hasattr(d, "n_free") and hasattr(d, "n_dofs"):
            return d
    return None


def _solve(problem, x):
    """(state, adjoint, reasons) at x; a failing evaluation gives None and a reason."""
    J = problem.functional
    out, reasons = {}, []
    for what in ("state", "adjoint"):
        fn = getattr(J, what, None)
        if fn is None:  # not every functional has one (an eigenvalue functional has no adjoint): not a warning
            out[what] = None
            logger.debug("fields: the functional has no %s()", what)
            continue
        try:
            out[what] = np.array(fn(x), dtype=np.float64, copy=True)
        except Exception as exc:  # a failing solve must not lose the other results
            out[what] = None
            reasons.append(f"{what}(x) failed: {type(exc).__name__}: {exc}")
    return out["state"], out["adjoint"], reasons


def _place_dofs(arr, base, mesh, dofmap, point, cell, skipped, vector_name):
    """Put a state-like array (system dofs, one column per experiment) on the mesh."""
    if arr is None:
        return
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim not in (1, 2) or a.size == 0:
        skipped.append(f"{base}: unexpected shape {a.shape}")
        return
    rows = a.shape[0]
    N, E, dim = mesh.n_nodes, mesh.n_cells, mesh.dim
    if dofmap is not None and rows == dofmap.n_free and rows != dofmap.n_dofs:
        try:
            a = dofmap.expand(a)
        except Exception as exc:
            skipped.append(f"{base}: DofMap.expand failed ({type(exc).__name__}: {exc})")
            return
        rows = a.shape[0]
    cols = [a] if a.ndim == 1 else [a[:, j] for j in range(a.shape[1])]
    many = len(cols) > 1

    def name(stem, j):
        return f"{stem}_{j + 1}" if many else stem

    if rows == N:
        for j, c in enumerate(cols):
            point[name(base, j)] = c
    elif dim > 1 and rows == N * dim:
        for j, c in enumerate(cols):  # dof = node * dim + component
            point[name(vector_name, j)] = c.reshape(N, dim)
    elif rows == E:
        for j, c in enumerate(cols):
            cell[name(base, j)] = c
    else:
        hint = "" if dofmap is not None else " and meta has no DofMap under 'dofs' or 'dofmap' to expand the free dofs"
        skipped.append(f"{base}: {rows} rows fit neither the {N} nodes, {N} x {dim} nodal vector dofs nor the {E} "
                       f"cells{hint}")


def _fields(problem, x, u, lam, reasons):
    point, cell, skipped = {}, {}, list(reasons)
    mesh, why = _mesh_of(problem)
    if mesh is None:
        if isinstance(problem.meta, dict) and "local_fields" in problem.meta:
            logger.info("fields: a problem built rank by rank; its ranks write fields.pvtu")
        else:
            logger.warning("fields: nothing placed on a mesh: %s", why)
        return {"point_data": point, "cell_data": cell}
    meta = problem.meta or {}
    x = np.asarray(x, dtype=np.float64).ravel()
    N, E = mesh.n_nodes, mesh.n_cells
    view = meta.get("parameter_view")
    if callable(view):  # the design part of a longer parameter vector (the bound z of a min-max)
        x = np.asarray(view(x), dtype=np.float64).ravel()
    p = x  # what the parameter maps take
    on_cells = meta.get("parameter_cells")
    if callable(on_cells):  # the parameters as a field on every cell (a symmetric design, passive elements NaN)
        try:
            x = np.asarray(on_cells(p), dtype=np.float64).ravel()
        except Exception as exc:
            logger.warning("fields: meta['parameter_cells'] failed (%s: %s)", type(exc).__name__, exc)
    elif on_cells is not None and np.shape(on_cells) == x.shape and x.size < E:
        # parameters on some cells only (passive elements are not parameters): NaN on the others
        full = np.full(E, np.nan)
        full[np.asarray(on_cells)] = x
        x = full
    if x.size == N:
        point["parameter"] = x.copy()
        target = point
    elif x.size == E:
        cell["parameter"] = x.copy()
        target = cell
    else:
        target = None
        dofmap = _dofmap_of(meta)
        block = dofmap.n_free if dofmap is not None else N
        if x.size > block and x.size % block == 0:
            # K blocks of nodal values (a space-time source: one block per time node): parameter_1..K
            _place_dofs(x.reshape(-1, block).T, "parameter", mesh, dofmap, point, cell, skipped, "parameter")
        else:
            skipped.append(f"parameter: {x.size} values fit neither the {N} nodes, the {E} cells nor blocks of "
                           f"{block} {'free dofs' if dofmap is not None else 'nodes'}")
    if target is not None:
        for key, _label in _REFERENCES:
            ref = meta.get(key)
            if isinstance(ref, np.ndarray) and ref.shape == x.shape:
                target["parameter_reference"] = np.asarray(ref, dtype=np.float64).copy()
                break
    filt = meta.get("filter")
    if filt is not None:
        try:
            rho = np.asarray(filt.forward(p), dtype=np.float64).ravel()
        except Exception as exc:
            skipped.append(f"density: meta['filter'].forward failed ({type(exc).__name__}: {exc})")
        else:
            if rho.size == E:
                cell["density"] = rho
            elif rho.size == N:
                point["density"] = rho
            else:
                skipped.append(f"density: the filter gives {rho.size} values, the mesh has {N} nodes and {E} cells")
    for key, design in (meta.get("designs") or {}).items():  # several physical designs (a robust formulation)
        try:
            rho = np.asarray(design(p), dtype=np.float64).ravel()
        except Exception as exc:
            skipped.append(f"density_{key}: meta['designs'][{key!r}] failed ({type(exc).__name__}: {exc})")
            continue
        if rho.size == E:
            cell[f"density_{key}"] = rho
        else:
            skipped.append(f"density_{key}: {rho.size} values for {E} cells")
    dofmap = _dofmap_of(meta)
    _place_dofs(u, "state", mesh, dofmap, point, cell, skipped, "displacement")
    _place_dofs(lam, "adjoint", mesh, dofmap, point, cell, skipped, "adjoint")
    for reason in skipped:
        logger.warning("fields: skipped %s", reason)
    return {"point_data": point, "cell_data": cell}


def fields(problem, x) -> dict:
    """The parameter, state and adjoint at ``x`` placed on the problem's mesh.

    Parameters
    ----------
    problem
        An :class:`adjopt.Problem`; its mesh is ``problem.meta["mesh"]``.
    x
        Parameter vector (e.g. ``result.x``).

    Returns
    -------
    dict
        ``{"point_data": {...}, "cell_data": {...}}`` ready for
        :func:`adjopt.mesh.write_vtu`:

        - ``"parameter"``: x on the nodes (len == n_nodes) or cells (len == n_cells); K blocks of nodal values
          (len == K times the free dofs, or K n_nodes: a space-time parameter, one block per time node) give
          ``"parameter_1"`` ... ``"parameter_K"``;
          ``"parameter_reference"``: ``meta["m_true"]`` / ``meta["z_exact"]`` alongside;
        - ``"density"``: ``meta["filter"].forward(x)`` when meta has a filter (topology);
        - ``"state"``, ``"adjoint"``: scalar nodal fields (expanded from the free
          dofs with ``meta["dofs"]`` or ``meta["dofmap"]``, prescribed values
          included); several columns (experiments) give ``"state_1"``, ``"state_2"``, ...
          (1-based); vector states with ``dim`` dofs per node (``dof = node*dim + c``)
          give ``"displacement"`` and ``"adjoint"`` of shape (N, dim).

        Anything that cannot be placed (no mesh, sizes that fit nothing, a
        failing solve) is left out with a logged warning; this function does
        not raise for those.
    """
    u, lam, reasons = _solve(problem, x)
    return _fields(problem, x, u, lam, reasons)


# -- small file helpers ------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> Path:
    """Write via ``write(binary file)`` to a temporary file next to ``path``, then ``os.replace`` it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _json_safe(v):
    """Plain JSON types; non-finite floats become None, unknown objects their repr."""
    if isinstance(v, dict):
        return {str(k): _json_safe(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(w) for w in v]
    if isinstance(v, np.ndarray):
        return _json_safe(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return repr(v)


def _history_json(problem, result) -> bytes:
    d = result.as_dict() if hasattr(result, "as_dict") else dict(vars(result))
    d.pop("x", None)
    d.pop("jac", None)
    meta = getattr(problem, "meta", None) or {}
    scalars = {k: v for k, v in meta.items() if isinstance(v, (bool, int, float, str, np.integer, np.floating))}
    from . import __version__

    doc = {
        "problem": getattr(problem, "name", None),
        "options": meta.get("options"),
        "problem_meta": scalars,  # the scalar entries of meta (sizes, weights), for problems without "options"
        "n_params": int(np.size(result.x)),
        "adjopt_version": __version__,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **d,
    }
    return (json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n").encode()


def _flat(entry: dict) -> dict:
    """Nested dicts (the per-iteration ``phases``) as columns ``phases.assembly``, ..."""
    out = {}
    for k, v in entry.items():
        if isinstance(v, dict):
            out.update({f"{k}.{sub}": x for sub, x in v.items()})
        else:
            out[k] = v
    return out


def _history_csv(history) -> bytes:
    history = [_flat(e) for e in history]
    columns: list[str] = []
    for entry in history:
        for k in entry:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for entry in history:
        row = []
        for k in columns:
            v = entry.get(k, "")
            if isinstance(v, (dict, list, tuple, np.ndarray)):
                v = json.dumps(_json_safe(v))
            elif isinstance(v, (float, np.floating)):
                v = repr(float(v))
            row.append(v)
        w.writerow(row)
    return buf.getvalue().encode()


def _npz(result, u, lam):
    arrays = {"x": np.asarray(result.x, dtype=np.float64), "jac": np.asarray(result.jac, dtype=np.float64)}
    if u is not None:
        arrays["state"] = u
    if lam is not None:
        arrays["adjoint"] = lam
    for k in ("fun", "nit", "nfev", "njev", "nhessp", "factorizations", "solves", "time", "stationarity", "success"):
        if hasattr(result, k):
            arrays[k] = np.asarray(getattr(result, k))
    for k in ("method", "message"):
        if hasattr(result, k):
            arrays[k] = np.asarray(str(getattr(result, k)))

    def write(fh):
        np.savez(fh, **arrays)

    return write


# -- pictures ------------------------------------------------------------------------------------------
def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _label(problem, field: str, default: str) -> str:
    meta = getattr(problem, "meta", None) or {}
    labels = meta.get("labels") or {}
    if field in labels:
        return str(labels[field])
    name = getattr(problem, "name", "") or ""
    for prefix, table in _GALLERY_LABELS.items():
        if name.startswith(prefix) and field in table:
            return table[field]
    return default


def _unit(problem, field: str) -> str:
    units = (getattr(problem, "meta", None) or {}).get("units") or {}
    u = units.get(field)
    return f" [{u}]" if u else ""


def _save_png(fig, canvas_cls, path: Path) -> Path:
    canvas_cls(fig)
    return _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=_DPI))


def _convergence_png(mpl, path: Path, problem, result) -> Path:
    from matplotlib.ticker import MaxNLocator

    Figure, Canvas = mpl
    hist = list(getattr(result, "history", None) or [])
    it = np.array([h.get("nit", i) for i, h in enumerate(hist)], dtype=float)
    f = np.array([np.nan if h.get("f") is None else h["f"] for h in hist], dtype=float)
    s = np.array([np.nan if h.get("stationarity") is None else h["stationarity"] for h in hist], dtype=float)
    vol = [h.get("volume") for h in hist]
    has_vol = any(v is not None for v in vol)
    n = 3 if has_vol else 2
    fig = Figure(figsize=(7.5, 2.6 * n + 1.0), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True)
    ax = axes[0]
    ax.plot(it, f, "o-", color="C0", ms=4)
    fin = f[np.isfinite(f)]
    if fin.size and fin.min() > 0 and fin.max() > 100 * fin.min():  # J spans decades: a log scale shows them
        ax.set_yscale("log")
        ax.set_ylabel("objective J (log scale)")
    else:
        ax.set_ylabel("objective J")
    ax.set_title("objective J per iteration (iteration 0 = start)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    ok = np.isfinite(s) & (s > 0)
    if ok.any():
        ax.semilogy(it[ok], s[ok], "o-", color="C3", ms=4)
    else:
        ax.text(0.5, 0.5, "no positive stationarity values recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("stationarity (log scale)")
    ax.set_title(f"stationarity measure: {_STATIONARITY.get(getattr(result, 'method', ''), _STATIONARITY[''])}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if has_vol:
        ax = axes[2]
        v = np.array([np.nan if x is None else x for x in vol], dtype=float)
        ax.plot(it, v, "o-", color="C2", ms=4, label="volume")
        cons = getattr(problem, "constraints", None) or []
        if cons:
            with contextlib.suppress(TypeError, ValueError):
                ax.axhline(float(cons[0][1]), color="k", ls="--", lw=1, label=f"bound {float(cons[0][1]):g}")
        ax.set_ylabel("volume")
        ax.set_title("volume constraint", fontsize=10)
        ax.legend(loc="best", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("iteration")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    status = "converged" if getattr(result, "success", False) else "stopped"
    head = f"{getattr(problem, 'name', 'problem')} - method {getattr(result, 'method', '?')}: {status} after " \
           f"{getattr(result, 'nit', len(hist) - 1)} iterations, J = {getattr(result, 'fun', float('nan')):.6g}"
    why = textwrap.fill(f"why it stopped: {getattr(result, 'message', '')}", 90)
    fig.suptitle(f"{head}\n{why}", fontsize=10)
    return _save_png(fig, Canvas, path)


def _triangles(mesh) -> np.ndarray:
    """Triangles for plotting a 2D mesh (each quad split along its 0-2 diagonal)."""
    c = mesh.cells
    if c.shape[1] == 3:
        return c
    return np.concatenate([c[:, [0, 1, 2]], c[:, [0, 2, 3]]])


def _typical_size(mesh) -> float:
    ext = np.ptp(mesh.points, axis=0)
    vol = float(np.prod(ext[ext > 0])) if np.any(ext > 0) else 1.0
    return (vol / max(mesh.n_cells, 1)) ** (1.0 / mesh.dim)


def _slice_level(mesh):
    """z of the mid-plane of the bounding box and the tolerance of the slice."""
    z = mesh.points[:, 2]
    return 0.5 * (z.min() + z.max()), 0.25 * _typical_size(mesh)


def _draw(fig, ax, mesh, values, where: str, *, cmap, vmin, vmax, label: str, points=None):
    """Draw one field: 2D nodal (tripcolor), 2D per cell (polygons), 3D on the mid-plane slice."""
    from matplotlib.collections import PolyCollection
    from matplotlib.tri import Triangulation

    pts = mesh.points if points is None else points
    note = ""
    if mesh.dim == 2:
        if where == "point":
            tri = Triangulation(pts[:, 0], pts[:, 1], _triangles(mesh))
            art = ax.tripcolor(tri, values, shading="gouraud", cmap=cmap, vmin=vmin, vmax=vmax)
        else:
            art = PolyCollection(pts[mesh.cells][:, :, :2], array=values, cmap=cmap, edgecolors="face", linewidths=0.2)
            art.set_clim(vmin, vmax)
            ax.add_collection(art)
            ax.autoscale_view()
    else:
        zmid, tol = _slice_level(mesh)
        if where == "point":
            z = pts[:, 2]
            level = z[np.argmin(np.abs(z - zmid))]
            sel = np.flatnonzero(np.abs(z - level) <= tol)
            xy, first = np.unique(np.round(pts[sel, :2], 12), axis=0, return_index=True)
            if len(xy) < 3:
                raise ValueError(f"fewer than 3 nodes near the plane z = {level:.3g}")
            tri = Triangulation(xy[:, 0], xy[:, 1])
            art = ax.tripcolor(tri, values[sel[first]], shading="gouraud", cmap=cmap, vmin=vmin, vmax=vmax)
            note = f"slice: nodes at z = {level:.3g}" if np.ptp(z[sel]) < 1e-12 else \
                f"slice: nodes with |z - {level:.3g}| <= {tol:.2g}"
        else:
            from scipy.spatial import ConvexHull

            zc = mesh.points[mesh.cells][:, :, 2].mean(axis=1)
            level = zc[np.argmin(np.abs(zc - zmid))]
            sel = np.flatnonzero(np.abs(zc - level) <= tol)
            polys, vals = [], []
            for e in sel:
                xy = np.unique(np.round(mesh.points[mesh.cells[e], :2], 12), axis=0)
                if len(xy) < 3:
                    continue
                with contextlib.suppress(Exception):  # degenerate (collinear) projections are left out
                    polys.append(xy[ConvexHull(xy).vertices])
                    vals.append(values[e])
            if not polys:
                raise ValueError(f"no cells with centres near z = {level:.3g}")
            art = PolyCollection(polys, array=np.asarray(vals), cmap=cmap, edgecolors="face", linewidths=0.2)
            art.set_clim(vmin, vmax)
            ax.add_collection(art)
            ax.autoscale_view()
            note = f"slice: cells with centres at z = {level:.3g} (seen from +z)"
    if mesh.dim == 2:  # the domain outline, so that white (void, zero) regions still show the shape
        from matplotlib.collections import LineCollection

        with contextlib.suppress(Exception):
            ax.add_collection(LineCollection(pts[mesh.boundary_facets()][:, :, :2], colors="0.45", linewidths=0.6))
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    cb = fig.colorbar(art, ax=ax, shrink=0.85, aspect=25)
    cb.set_label(label, fontsize=9)
    return note


def _limits(arrays, diverging: bool):
    vals = np.concatenate([np.ravel(a)[np.isfinite(np.ravel(a))] for a in arrays]) if arrays else np.zeros(1)
    if vals.size == 0:
        return "viridis", 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    if diverging and lo < 0 < hi and min(-lo, hi) > 0.05 * max(-lo, hi):
        m = max(-lo, hi)
        return "RdBu_r", -m, m
    if lo == hi:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    return "viridis", lo, hi


def _panels_png(mpl, path: Path, mesh, panels, suptitle: str, overlay=None) -> Path:
    """panels: list of dicts (values, where, title, label, cmap, vmin, vmax, points)."""
    Figure, Canvas = mpl
    ext = np.ptp(mesh.points[:, :2], axis=0)
    aspect = float(ext[0] / ext[1]) if ext[1] > 0 else 1.0
    n = len(panels)
    ncols = 1 if aspect > 1.6 else min(n, 2)
    nrows = math.ceil(n / ncols)
    pw = 7.0 if ncols == 1 else 5.2
    ph = min(max(pw / aspect * 0.85, 2.0), 6.0) + 0.9
    fig = Figure(figsize=(pw * ncols + 0.6, ph * nrows + 0.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, p in zip(axes, panels):
        note = _draw(fig, ax, mesh, p["values"], p["where"], cmap=p["cmap"], vmin=p["vmin"], vmax=p["vmax"],
                     label=p["label"], points=p.get("points"))
        width = 95 if ncols == 1 else 55
        title = "\n".join(textwrap.fill(line, width) for line in (p["title"] + (f"\n{note}" if note else "")).split("\n"))
        ax.set_title(title, fontsize=10)
        if overlay is not None and mesh.dim == 2:
            overlay(ax)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=11)
    return _save_png(fig, Canvas, path)


def _range_text(a) -> str:
    a = np.asarray(a)
    return f"min {np.nanmin(a):.3g}, max {np.nanmax(a):.3g}"


def _parameter_png(mpl, path: Path, problem, mesh, fd, result) -> Path | None:
    pd, cd = fd["point_data"], fd["cell_data"]
    panels = []
    designs = [k for k in cd if k.startswith("density_")]
    if designs:  # the designs side by side (eroded, intermediate, dilated), one gray scale
        for k in designs:
            rho = cd[k]
            panels.append(dict(values=rho, where="cell", title=f"{k[len('density_'):]} design\n{_range_text(rho)}",
                               label="density", cmap="gray_r", vmin=0.0, vmax=1.0))
        sup = (f"{problem.name}: designs after {getattr(result, 'nit', '?')} iterations of "
               f"{getattr(result, 'method', '?')}")
        return _panels_png(mpl, path, mesh, panels, sup)
    if "density" in cd or "density" in pd:
        where = "cell" if "density" in cd else "point"
        rho = (cd if where == "cell" else pd)["density"]
        label = _label(problem, "density", "density (filtered parameter)")
        lo, hi = min(0.0, float(np.min(rho))), max(1.0, float(np.max(rho)))
        panels.append(dict(values=rho, where=where, title=f"{label}\n{_range_text(rho)}",
                           label="density" + _unit(problem, "density"), cmap="gray_r", vmin=lo, vmax=hi))
    where = "point" if "parameter" in pd else "cell" if "parameter" in cd else None
    if where is None and not panels:
        return None
    if where is not None:
        src = pd if where == "point" else cd
        x, ref = src["parameter"], src.get("parameter_reference")
        label = _label(problem, "parameter", "parameter p")
        unit = _unit(problem, "parameter")
        if panels:  # topology: the raw design variables in the same gray scale as the density
            cmap, lo, hi = "gray_r", panels[0]["vmin"], panels[0]["vmax"]
        else:
            cmap, lo, hi = _limits([x] + ([ref] if ref is not None else []), diverging=True)
        kind = "nodal values" if where == "point" else "one value per cell"
        panels.append(dict(values=x, where=where, title=f"{label}\nafter the optimization ({kind}); {_range_text(x)}",
                           label=label.split(" (")[0] + unit, cmap=cmap, vmin=lo, vmax=hi))
        if ref is not None:
            meta = problem.meta or {}
            ref_label = next((t for k, t in _REFERENCES if isinstance(meta.get(k), np.ndarray)), "reference")
            panels.append(dict(values=ref, where=where, title=f"{ref_label}\nsame color scale; {_range_text(ref)}",
                               label=label.split(" (")[0] + unit, cmap=cmap, vmin=lo, vmax=hi))
    sup = f"{problem.name}: parameter after {getattr(result, 'nit', '?')} iterations of {getattr(result, 'method', '?')}"
    return _panels_png(mpl, path, mesh, panels, sup)


def _state_png(mpl, path: Path, problem, mesh, fd, result) -> Path | None:
    pd, cd = fd["point_data"], fd["cell_data"]
    meta = problem.meta or {}
    panels = []
    overlay = None
    disp = sorted((k for k in pd if k == "displacement" or k.startswith("displacement_")), key=_column_key)
    states = sorted((k for k in list(pd) + list(cd) if k == "state" or k.startswith("state_")), key=_column_key)
    max_panels = 4
    if disp:
        shown = disp[:max_panels]
        mags = [np.linalg.norm(pd[k], axis=1) for k in shown]
        lo, hi = 0.0, max(float(max(m.max() for m in mags)), 1e-300)
        for k, mag in zip(shown, mags):
            u = pd[k]
            points, deform = None, ""
            if mesh.dim == 2 and float(np.abs(u).max()) > 0:
                scale = 0.1 * float(np.max(np.ptp(mesh.points, axis=0))) / float(np.abs(u).max())
                points = mesh.points + scale * u
                deform = f"; drawn on the deformed mesh, displacements x {scale:.3g}"
            label = _label(problem, "displacement", "displacement")
            col = f" (column {k.rsplit('_', 1)[1]})" if "_" in k else ""
            panels.append(dict(values=mag, where="point", title=f"{label} magnitude |u|{col}{deform}\nmax |u| = "
                               f"{mag.max():.3g}", label="|u|" + _unit(problem, "displacement"), cmap="viridis",
                               vmin=lo, vmax=hi, points=points))
        extra = len(disp) - len(shown)
    else:
        if not states:
            return None
        shown = states[:max_panels]
        arrays = [(pd if k in pd else cd)[k] for k in shown]
        cmap, lo, hi = _limits(arrays, diverging=True)
        label = _label(problem, "state", "state u")
        for k, a in zip(shown, arrays):
            where = "point" if k in pd else "cell"
            col = f", experiment {k.rsplit('_', 1)[1]} of {len(states)}" if "_" in k else ""
            panels.append(dict(values=a, where=where, title=f"{label}{col}\n{_range_text(a)}",
                               label=label.split(" (")[0] + _unit(problem, "state"), cmap=cmap, vmin=lo, vmax=hi))
        extra = len(states) - len(shown)
        obs = meta.get("observation_points")
        if obs is None and meta.get("observed") is not None:
            with contextlib.suppress(Exception):
                obs = mesh.points[np.asarray(meta["observed"], dtype=int)]
        obs = None if obs is None else np.asarray(obs, dtype=float)
        if obs is not None and obs.ndim == 2 and obs.shape[1] >= 2 and mesh.dim == 2:
            def overlay(ax, obs=obs):
                ax.plot(obs[:, 0], obs[:, 1], "o", ms=3.5, mfc="none", mec="k", mew=0.8, label="observation points")
                ax.legend(loc="upper right", fontsize=8, framealpha=0.7)
    sup = f"{problem.name}: state at the final parameter"
    if extra > 0:
        sup += f" (first {len(panels)} of {len(panels) + extra} columns shown; all are in fields.vtu)"
    return _panels_png(mpl, path, mesh, panels, sup, overlay=overlay)


def _column_key(name: str):
    tail = name.rsplit("_", 1)[-1]
    return (int(tail) if tail.isdigit() else 0, name)


# -- the folder ----------------------------------------------------------------------------------------
def _prepare(folder: Path, force: bool) -> None:
    what_to_do = "choose another folder (--out) or fix the permissions"
    if folder.exists() and not folder.is_dir():
        raise ResultsWriteError(f"cannot write results to '{folder}': it exists and is not a folder; {what_to_do}")
    if folder.is_dir():
        try:
            entries = os.listdir(folder)
        except PermissionError as exc:
            raise ResultsWriteError(f"cannot read the folder '{folder}' ({exc.strerror}); {what_to_do}") from exc
        if entries and not force:
            shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise ResultsExistError(
                f"the results folder '{folder}' exists and is not empty ({shown}); pass --force "
                f"(force=True) to overwrite it, or choose another --out folder")
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise ResultsWriteError(f"cannot create the results folder '{folder}': permission denied "
                                    f"({exc.filename or folder}); {what_to_do}") from exc
        except OSError as exc:
            raise ResultsWriteError(f"cannot create the results folder '{folder}': {exc.strerror or exc} "
                                    f"({exc.filename or folder}); a parent may be a file; {what_to_do}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ResultsWriteError(f"cannot write to the results folder '{folder}': no write permission; {what_to_do}")


def remove_temporaries(folder) -> list[Path]:
    """Remove the temporary files that a killed :func:`write_results` or checkpoint write left in ``folder``.

    Only adjopt's own temporary names are touched (``.history.json.<pid>.<hex>.tmp``,
    ``.fields.vtu.<random>.tmp.vtu``, ``.checkpoint-<random>.tmp``, ...), never other files. Call it only
    while no other process writes to ``folder`` (the ``adjopt`` command holds the folder's lock): the
    temporary file of a running write looks the same. Returns the paths removed.
    """
    with os.scandir(folder) as entries:
        stale = [e.path for e in entries if _TEMPORARY.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            logger.info("removed '%s', a temporary file of an interrupted write", path)
    return [Path(p) for p in stale]


def _write_guarded(path: Path, folder: Path, fn):
    try:
        return fn()
    except PermissionError as exc:
        raise ResultsWriteError(f"cannot write '{path}': permission denied; fix the permissions of '{folder}' or "
                                f"choose another --out folder") from exc
    except OSError as exc:
        if isinstance(exc, AdjoptError):
            raise
        raise ResultsWriteError(f"cannot write '{path}': {exc.strerror or exc}; check the free disk space and "
                                f"permissions of '{folder}' or choose another --out folder") from exc


def write_results(folder, problem, result, force: bool = False, pictures: bool = True) -> dict:
    """Write the data files and pictures of a run to ``folder`` (see the module docstring).

    Parameters
    ----------
    folder
        Output folder; created (with its parents) when missing.
    problem
        The :class:`adjopt.Problem` that was optimized.
    result
        The :class:`~adjopt.optimize.OptimizeResult` of :func:`adjopt.minimize`.
    force
        Write into an existing non-empty folder (files of the same names are
        replaced; result files of an earlier run that this run does not write
        are removed; other files are left alone).
    pictures
        Draw the PNGs (needs matplotlib; skipped with a warning when missing).

    Returns
    -------
    dict
        ``{file name: Path}`` of the files written.

    Raises
    ------
    ResultsExistError
        ``folder`` exists, is not empty and ``force`` is False.
    ResultsWriteError
        ``folder`` cannot be created or written (no permission, a parent is a
        file, disk full): the message names the path and what to do.
    """
    folder = Path(folder)
    _prepare(folder, force)
    written: dict[str, Path] = {}

    def put(name, data_or_writer):
        path = folder / name
        writer = data_or_writer if callable(data_or_writer) else (lambda fh: fh.write(data_or_writer))
        written[name] = _write_guarded(path, folder, lambda: _atomic_write(path, writer))
        logger.info("wrote '%s'", path)

    put("history.json", _history_json(problem, result))
    put("history.csv", _history_csv(getattr(result, "history", None) or []))
    u, lam, reasons = _solve(problem, result.x)
    put("result.npz", _npz(result, u, lam))

    fd = _fields(problem, result.x, u, lam, reasons)
    mesh, why = _mesh_of(problem)
    if mesh is not None and (fd["point_data"] or fd["cell_data"]):
        write_fields_vtu(folder, mesh, written, "history.json", point_data=fd["point_data"],
                         cell_data=fd["cell_data"])
    elif mesh is None:
        logger.info("fields.vtu not written: %s", why)

    if pictures:
        mpl = _matplotlib()
        if mpl is None:
            logger.warning("pictures skipped: matplotlib is not installed (pip install matplotlib)")
        else:
            jobs = [("convergence.png", lambda p: _convergence_png(mpl, p, problem, result))]
            if mesh is not None and mesh.dim in (2, 3):
                jobs.append(("parameter.png", lambda p: _parameter_png(mpl, p, problem, mesh, fd, result)))
                jobs.append(("state.png", lambda p: _state_png(mpl, p, problem, mesh, fd, result)))
            draw_pictures(folder, jobs, written)

    if force:
        remove_stale(folder, RESULT_FILES, written)
    return written


def write_fields_vtu(folder: Path, mesh, written: dict, mode_of: str, **data) -> None:
    """``folder/fields.vtu`` from ``write_vtu(path, mesh, **data)``, with the mode of ``written[mode_of]``; a
    missing meshio or a field the format refuses is logged (the other files stay), a folder that cannot be
    written raises :class:`ResultsWriteError`."""
    from .mesh import write_vtu

    path = folder / "fields.vtu"
    try:
        _write_guarded(path, folder, lambda: write_vtu(path, mesh, **data))
    except ImportError as exc:
        logger.warning("fields.vtu not written: %s", exc)
    except AdjoptError as exc:
        if isinstance(exc, ResultsWriteError):
            raise
        logger.warning("fields.vtu not written: %s", exc)
    else:
        with contextlib.suppress(OSError):  # write_vtu's temporary file is 0600; give it the mode of the others
            os.chmod(path, stat.S_IMODE(os.stat(written[mode_of]).st_mode))
        written["fields.vtu"] = path


def draw_pictures(folder: Path, jobs, written: dict) -> None:
    """Run the ``(file name, job(path) -> Path | None)`` picture jobs into ``folder``, recording what they wrote
    in ``written``; a picture that cannot be drawn is logged and skipped (the data files are kept), a folder
    that cannot be written raises :class:`ResultsWriteError`."""
    for name, job in jobs:
        path = folder / name
        try:
            out = _write_guarded(path, folder, lambda job=job, path=path: job(path))
        except ResultsWriteError:
            raise
        except Exception as exc:  # a picture that cannot be drawn must not lose the data files
            logger.warning("%s not drawn: %s: %s", name, type(exc).__name__, exc)
            continue
        if out is None:
            logger.info("%s not drawn: no such field on the mesh", name)
        else:
            written[name] = out
            logger.info("wrote '%s'", out)


def remove_stale(folder: Path, names, written: dict) -> None:
    """Remove the files among ``names`` that an earlier run wrote into ``folder`` and this one did not."""
    for name in names:
        stale = folder / name
        if name not in written and stale.is_file():
            with contextlib.suppress(OSError):
                stale.unlink()
                logger.info("removed '%s' of an earlier run (this run does not write it)", stale)
