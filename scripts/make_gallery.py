"""Run every gallery problem through ``adjopt run`` and keep its pictures for the README.

Usage: python scripts/make_gallery.py [problem ...] [--out problems/gallery] [--work adjopt-results/gallery]

Each problem runs at a size that shows its result clearly and finishes in
seconds to a minute on 2 cores; its ``parameter.png`` is copied to ``--out``
as ``<problem>.png`` (the README's gallery shows them). Name problems to
run only those (default: all of ``RUNS``).

A parameter that is no field on the mesh (heat_source_inversion's source at
K time nodes) gets no ``parameter.png`` from the results writer: for those
the module's ``plot(problem, x, path)`` draws the picture instead, from the
problem rebuilt with the same options and ``x`` of the run's ``result.npz``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

from adjopt.cli import build_options, load_module, split_options
from adjopt.cli import main as adjopt

RUNS = {
    "poisson_inversion": ["--n", "96"],
    "optimal_control": ["--n", "64", "--upper", "19.7392088", "--amplitude", "1.5"],
    "topology_compliance": ["--nelx", "120", "--nely", "40"],
    "topology_mechanism": [],
    "topology_robust": [],
    "topology_eigen": [],
    "topology_stress": ["--case", "lbracket", "--nelx", "60", "--nely", "60",
                        "--max-iter", "200"],
    "advection_diffusion_source": ["--n", "64"],
    "multi_experiment": ["--n", "48"],
    "nonlinear_inversion": ["--n", "96"],
    "semilinear_control": ["--n", "64"],
    "advection_diffusion_initial_condition": ["--n", "64"],
    "heat_source_inversion": ["--n", "64", "--n_steps", "100"],
}


def picture(name: str, opts: list[str], work: str, out: str) -> None:
    """``out``: the run's parameter.png, or else the module's own plot() of the run's result (see above)."""
    png = os.path.join(work, "parameter.png")
    if os.path.isfile(png):
        shutil.copyfile(png, out)
        return
    module = load_module(name)
    if not callable(getattr(module, "plot", None)):
        raise SystemExit(f"{name}: the run drew no parameter.png and the module has no plot(problem, x, path)")
    options, _ = split_options(opts, build_options(module), {})
    with np.load(os.path.join(work, "result.npz")) as result:
        x = result["x"]
    module.plot(module.build(**options), x, out)


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("problems", "gallery"))
    ap.add_argument("--work", default=os.path.join("adjopt-results", "gallery"))
    ap.add_argument("problems", nargs="*", metavar="problem", help=f"only these (default all: {', '.join(RUNS)})")
    args = ap.parse_args()
    unknown = sorted(set(args.problems) - set(RUNS))
    if unknown:
        ap.error(f"unknown problem(s) {', '.join(unknown)}; the gallery runs are {', '.join(RUNS)}")
    os.makedirs(args.out, exist_ok=True)
    for name, opts in RUNS.items():
        if args.problems and name not in args.problems:
            continue
        work = os.path.join(args.work, name)
        t0 = time.perf_counter()
        status = adjopt(["run", name, *opts, "--out", work, "--force", "-q"])
        print(f"{name}: exit {status}, {time.perf_counter() - t0:.1f} s")
        picture(name, opts, work, os.path.join(args.out, f"{name}.png"))
    print(f"pictures in {args.out}")


if __name__ == "__main__":
    run()
