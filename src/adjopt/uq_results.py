"""Write what ``adjopt uq`` computed (a Laplace posterior) to a folder: data files and pictures.

``uq.json``
    The problem and its options, where the MAP point came from, the eigensolver's settings, the eigenvalues
    and their residuals, the Hessian actions spent, the KL divergence, the Newton decrement at the MAP point,
    the number of eigenvalues above 1, the ranges of the prior and posterior variances and the times.
``uq.npz``
    ``map``, ``eigenvalues``, ``residuals``, ``prior_variance``, ``posterior_variance`` and ``samples``
    (m x k), and ``eigenvectors`` (m x r) when asked for; readable with ``np.load`` without pickle.
``fields.vtu``
    The MAP point, the prior and posterior variances and standard deviations, the samples and the leading
    eigenvectors on the mesh (nodal parameters as point data, per-cell parameters as cell data).
``eigenvalues.png``, ``variance.png``, ``samples.png``
    The eigenvalues on a log scale with the line lambda = 1 (above it the data inform a direction more than
    the prior does); the prior and posterior standard deviations; the MAP point and the samples.

Every file is written under a temporary name and moved into place (``os.replace``), as ``write_results`` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .results import (
    UQ_FILES,
    _atomic_write,
    _json_safe,
    _label,
    _limits,
    _matplotlib,
    _mesh_of,
    _panels_png,
    _prepare,
    _save_png,
    _write_guarded,
    draw_pictures,
    remove_stale,
    write_fields_vtu,
)

logger = logging.getLogger(__name__)

#: eigenvectors drawn into fields.vtu
VTU_EIGENVECTORS = 4


def _where(mesh, n: int) -> str | None:
    if n == mesh.n_nodes:
        return "point"
    if n == mesh.n_cells:
        return "cell"
    return None


def _eigenvalues_png(mpl, path: Path, values, title: str) -> Path:
    Figure, Canvas = mpl
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    idx = np.arange(1, values.size + 1)
    pos = values > 0
    ax.semilogy(idx[pos], values[pos], "o-", ms=3, label="eigenvalues of H_misfit v = lambda R v")
    if np.any(~pos):
        ax.semilogy(idx[~pos], np.abs(values[~pos]), "x", color="C3", label="|lambda| of negative ones")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="lambda = 1")
    above = int(np.sum(values > 1.0))
    ax.set_xlabel("index i")
    ax.set_ylabel("lambda_i")
    ax.set_title(f"{title}\n{above} of {values.size} above 1: the data inform those directions more than the prior",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save_png(fig, Canvas, path)


def write_uq(folder, problem, posterior, samples, prior_variance, posterior_variance, info: dict,
             force: bool = False, pictures: bool = True, save_vectors: bool = False) -> dict:
    """Write the files listed in the module docstring; ``{name: Path}`` of those written.

    ``info`` is merged into ``uq.json`` (where the MAP point came from, options, times).
    """
    folder = Path(folder)
    _prepare(folder, force)
    written: dict[str, Path] = {}
    m = posterior.m

    def put(name, writer):
        path = folder / name
        written[name] = _write_guarded(path, folder, lambda: _atomic_write(path, writer))
        logger.info("wrote '%s'", path)

    summary = posterior.summary()

    def stats(v):
        return None if v is None else dict(min=float(v.min()), max=float(v.max()), mean=float(v.mean()))

    have_var = prior_variance is not None and posterior_variance is not None
    data = dict(problem=getattr(problem, "name", None), options=(problem.meta or {}).get("options"), **info,
                **summary, n_params=int(m.size), prior_variance=stats(prior_variance),
                posterior_variance=stats(posterior_variance),
                variance_reduction=float(1.0 - posterior_variance.sum() / prior_variance.sum()) if have_var else None,
                samples=int(samples.shape[1]))
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False).encode()
    put("uq.json", lambda fh: fh.write(text))
    arrays = dict(map=m, eigenvalues=posterior.values, residuals=posterior.eig.residuals, samples=samples)
    if have_var:
        arrays.update(prior_variance=prior_variance, posterior_variance=posterior_variance)
    if save_vectors:
        arrays["eigenvectors"] = posterior.vectors
    put("uq.npz", lambda fh: np.savez(fh, **arrays))

    mesh, why = _mesh_of(problem)
    where = None if mesh is None else _where(mesh, m.size)
    if mesh is not None and where is not None:
        fields = {"map": m}
        if have_var:
            fields.update(prior_variance=prior_variance, posterior_variance=posterior_variance,
                          prior_std=np.sqrt(np.maximum(prior_variance, 0.0)),
                          posterior_std=np.sqrt(np.maximum(posterior_variance, 0.0)))
        for j in range(samples.shape[1]):
            fields[f"sample_{j + 1}"] = samples[:, j]
        for j in range(min(VTU_EIGENVECTORS, posterior.rank)):
            fields[f"eigenvector_{j + 1}"] = posterior.vectors[:, j]
        write_fields_vtu(folder, mesh, written, "uq.json", **{"point_data" if where == "point" else "cell_data": fields})
    else:
        logger.info("fields.vtu not written: %s", why or f"the {m.size} parameters are neither nodal nor per cell")

    mpl = _matplotlib() if pictures else None
    if pictures and mpl is None:
        logger.warning("pictures skipped: matplotlib is not installed (pip install matplotlib)")
    if mpl is not None:
        name = getattr(problem, "name", "") or "problem"
        jobs = [("eigenvalues.png", lambda p: _eigenvalues_png(mpl, p, posterior.values, f"{name}: Laplace posterior"))]
        if mesh is not None and where is not None and mesh.dim in (2, 3) and have_var:
            param = _label(problem, "parameter", "parameter")
            sd_prior, sd_post = np.sqrt(np.maximum(prior_variance, 0)), np.sqrt(np.maximum(posterior_variance, 0))
            _, lo, hi = _limits([sd_prior, sd_post], diverging=False)
            jobs.append(("variance.png", lambda p: _panels_png(mpl, p, mesh, [
                dict(values=sd_prior, where=where, title="prior standard deviation", label="std", cmap="viridis",
                     vmin=lo, vmax=hi),
                dict(values=sd_post, where=where, title="posterior standard deviation (Laplace)", label="std",
                     cmap="viridis", vmin=lo, vmax=hi)], f"{name}: pointwise standard deviation of {param}")))
            shown = [m] + [samples[:, j] for j in range(min(3, samples.shape[1]))]
            cmap, lo2, hi2 = _limits(shown, diverging=True)
            titles = ["MAP point"] + [f"posterior sample {j + 1}" for j in range(len(shown) - 1)]
            jobs.append(("samples.png", lambda p: _panels_png(mpl, p, mesh, [
                dict(values=v, where=where, title=t, label=param, cmap=cmap, vmin=lo2, vmax=hi2)
                for v, t in zip(shown, titles)], f"{name}: {param}")))
        draw_pictures(folder, jobs, written)
    if force:  # files of an earlier uq run that this one did not write (pictures off, no variance)
        remove_stale(folder, UQ_FILES + ("fields.vtu",), written)
    return written
