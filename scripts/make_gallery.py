"""Run every gallery problem through ``adjopt run`` and keep its pictures for the README.

Usage: python scripts/make_gallery.py [--out problems/gallery] [--work adjopt-results/gallery]

Each problem runs at a size that shows its result clearly and finishes in
seconds to a minute on 2 cores; its ``parameter.png`` is copied to ``--out``
as ``<problem>.png`` (the README's gallery shows them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from adjopt.cli import main as adjopt

RUNS = {
    "poisson_inversion": ["--n", "96"],
    "optimal_control": ["--n", "64", "--upper", "19.7392088", "--amplitude", "1.5"],
    "topology_compliance": ["--nelx", "120", "--nely", "40"],
    "advection_diffusion_source": ["--n", "64"],
    "multi_experiment": ["--n", "48"],
}


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("problems", "gallery"))
    ap.add_argument("--work", default=os.path.join("adjopt-results", "gallery"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, opts in RUNS.items():
        work = os.path.join(args.work, name)
        t0 = time.perf_counter()
        status = adjopt(["run", name, *opts, "--out", work, "--force", "-q"])
        print(f"{name}: exit {status}, {time.perf_counter() - t0:.1f} s")
        shutil.copyfile(os.path.join(work, "parameter.png"), os.path.join(args.out, f"{name}.png"))
    print(f"pictures in {args.out}")


if __name__ == "__main__":
    run()
