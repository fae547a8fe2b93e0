"""Time values-only assembly and the contraction of an ElementCoefficientMatrix (P1 Laplace, 2D).

Usage: python scripts/bench_assembly.py [--n 708] [--repeat 5] [--out bench_assembly.json]

n x n squares split in two triangles: 2 n^2 elements (n = 708 gives 1.0M). The
pattern and slot map are built once (reported separately); each assembly
writes only the CSR values. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _bench_common import machine_info, write_json  # noqa: E402  (the script's own folder)

import adjopt
from adjopt import fem, mesh


def _best(f, repeat):
    f()  # warm-up (compilation happens here)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(n: int, repeat: int) -> dict:
    msh = mesh.unit_square(n)
    t0 = time.perf_counter()
    local = fem.p1_stiffness(msh)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    A = adjopt.ElementCoefficientMatrix(msh.cells, local, coefficient="exp", n=msh.n_nodes)
    t_pattern = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    p = rng.standard_normal(msh.n_cells)
    w, z = rng.standard_normal((2, msh.n_nodes))
    t_values = _best(lambda: A.values(p), repeat)
    t_contract = _best(lambda: A.contract(p, w, z), repeat)
    t_tangent = _best(lambda: A.tangent(p, p, z), repeat)
    # bytes a values-only assembly must move: slot map (elem + loc), local entries, output values
    nbytes = A._slot_elem.nbytes + A._slot_loc.nbytes + A._slot_ptr.nbytes + A.local.nbytes + 8 * A.nnz + 8 * msh.n_cells
    return dict(n_elements=int(msh.n_cells), n_nodes=int(msh.n_nodes), nnz=int(A.nnz),
                local_matrices_s=t_local, pattern_s=t_pattern, values_s=t_values,
                contract_s=t_contract, tangent_s=t_tangent, values_GBps=nbytes / t_values / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 316, 708])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="bench_assembly.json")
    args = ap.parse_args()
    rows = [run(n, args.repeat) for n in args.n]
    print(f"{'elements':>10} {'nnz':>10} {'pattern s':>10} {'values s':>9} {'GB/s':>6} {'contract s':>10} {'tangent s':>9}")
    for r in rows:
        print(f"{r['n_elements']:>10} {r['nnz']:>10} {r['pattern_s']:>10.3f} {r['values_s']:>9.4f} "
              f"{r['values_GBps']:>6.2f} {r['contract_s']:>10.4f} {r['tangent_s']:>9.4f}")
    write_json(args.out, dict(info=machine_info(), results=rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
