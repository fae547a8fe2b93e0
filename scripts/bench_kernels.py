"""Element kernels of ElementCoefficientMatrix against the memory bandwidth, numpy and 1 vs 2 threads.

Usage: python scripts/bench_kernels.py [--elements 1e4 1e5 1e6 4e6]
       [--families p1-2d p1-3d q1-elasticity] [--repeat 5] [--coefficient auto|exp|simp]
       [--max-elements 4e6] [--seed 0] [--out bench_kernels.json] [--plot bench_kernels.png]

Supersedes ``scripts/bench_assembly.py`` (P1 2D only, no baselines).

Families (the mesh size parameter n is the one whose element count is closest
to each ``--elements`` target):

* ``p1-2d``          P1 Laplace on ``unit_square(n)`` (2 n^2 triangles), one local
                     matrix per element from ``fem.p1_stiffness`` (k = 3), phi = exp;
* ``p1-3d``          P1 Laplace on ``unit_cube(n)`` (6 n^3 Kuhn tetrahedra), per-element
                     local matrices (k = 4), phi = exp;
* ``q1-elasticity``  Q1 plane-stress elasticity on ``rectangle(n, n, n, n, cell="quad")``
                     (n^2 unit squares), dofs ``fem.vector_dofs(cells, 2)``, ONE shared
                     8 x 8 local matrix (congruent elements, as problems/topology_compliance.py
                     builds it; no Dirichlet condensation here), phi = SIMP(q=3, emin=1e-9).

``--coefficient exp|simp`` forces one coefficient for every family (``auto``:
the above). p is 0.5 N(0, 1) for exp and U(0.05, 1) for SIMP; w, z, dp are
N(0, 1).

What is timed (wall time, best of ``--repeat`` after one timed first call, at
numba's default thread count):

* ``values``         ``A.values(p)``: phi(p) (``_kernels.coefficient_values``, one parallel pass),
                     then the values-only assembly of sum_e phi(p_e) K_e into the fixed CSR
                     pattern, row by row (``_kernels.gather_rows``; ``gather_templates`` when one
                     shared matrix meets rows that repeat a few patterns: ``values_path``);
* ``contract``       ``A.contract(p, w, z)``: phi'(p_e) w_e^T K_e z_e for all e, phi' evaluated in
                     the same kernel (``_kernels.element_forms``);
* ``tangent``        ``A.tangent(p, dp, z)``, the public API: dp_e phi'(p_e), then
                     (sum_e dp_e phi'(p_e) K_e) z row by row without forming the matrix
                     (``_kernels.rows_matvec``);
* ``tangent_values`` ``A._tangent_values(p, dp)``: the values of sum_e dp_e phi'(p_e) K_e;
* ``pattern``        the constructor ``ElementCoefficientMatrix(conn, local, ...)``: validation,
                     CSR pattern, the row maps of the kernels (once per mesh); the mesh and the
                     local matrices are timed apart (``mesh_s``, ``local_s``);
* ``first_call``     the first call of each of values/contract/tangent: in the first row of
                     the run this includes numba's compilation or cache load (the numba cache
                     hits/misses of the kernels are in ``info.numba_cache``).

Baselines in the same run, verified against adjopt before they are timed
(``max_rel_diff`` = max |adjopt - numpy| / max |adjopt|, must be <= 1e-12,
recorded per row; the tangent is verified too but not timed):

* numpy assembly: ``coef[:, None, None] * K_e`` raveled into
  ``scipy.sparse.coo_array((data, (rows, cols))).tocsr()`` (which sums the
  duplicates); the rows/cols arrays are built once and timed apart
  (``numpy.pattern_s``), like adjopt's pattern; speedup = t(numpy) / t(numba);
* numpy contraction: ``phi'(p) * np.einsum("ea,eab,eb->e", w[conn], K, z[conn], optimize=True)``
  (``"ea,ab,eb->e"`` for the shared matrix);
* scikit-fem: ``asm`` of its own Laplace / linear-elasticity form on the same mesh, only
  when ``skfem`` is importable (else null; it is never installed by this script). It is
  a full assembly (quadrature, local matrices, COO -> CSR), not values-only: an outside
  reference, not a like-for-like comparison.

Thread scaling: ``numba.set_num_threads(1)`` and ``(2)`` around the same
public calls and around the bare kernels (``gather_kernel``: the values path
with phi(p) precomputed; ``bilinear_kernel``: ``element_forms`` as contract
calls it): speedup = t(1 thread) / t(2 threads). The numpy parts of the public
calls (dp * phi') stay single-threaded, so the bare-kernel speedups show what
the kernels scale. ``cpu_per_wall`` (CPU seconds of the process per wall
second of each thread block) tells whether 2 threads really got 2 cores: ~1 at
2 threads means the machine was busy and the scaling figure is meaningless.

Bandwidth = bytes / best time, as a fraction of the machine's copy bandwidth
measured in the same run by ``_bench_common.copy_bandwidth`` (read + write of a
256 MiB array; the better of the measurements at the start and the end). Two
byte counts, both the bytes that must move at minimum, each array counted ONCE
(read or written) at its real dtype, write-allocate traffic not counted (the
same convention as the copy bandwidth), cache-line over-fetch not counted:

1. ``bytes`` -> ``GBps``, ``copy_fraction`` (the targets' measure): every array the
   implementation reads or writes; temporaries it materialises are counted once
   written and once read. So a leaner data structure lowers the count with the
   time. E elements, k dofs per element, n dofs, nnz the pattern size, I = the
   incidences (E k minus condensed dofs), T = I k ("slot_entries").

   * values:   p (8E) + phi(p) (written 8E, read 8E: ``coef_write``, ``coef``) + indptr +
               inc_ptr ((n+1) x 4 or 8 each) + inc_elem (I x 4 or 8) + out (written, 8 nnz)
               + A0's values (``base``, 8 nnz, only with A0), and for the row path: rpos (T x 1,
               2 or 4: the place of each element entry in its row) + the local matrices in
               incidence order (``local``: 8T per element; 8 k^2 and inc_loc (I) when shared),
               or for the template path: the row groups and their templates ((4 or 8) per
               group each: the first row, the template) + the templates.
               The gather walks the rows; an element's coefficient is read once per node
               of the element (k rows apart), counted once, which holds while that reuse
               distance fits in cache (a few mesh rows in 2D, a plane in 3D).
   * contract: p (8E) + conn (E k x 4 or 8) + local (8 E k^2, or 8 k^2 shared) + w (8n) +
               z (8n) + result (8E); phi' is evaluated in the kernel (no temporaries). w and z
               are counted once: after an entry's first touch the other elements sharing it
               find it in cache (reuse distance a few mesh rows / planes on these numberings;
               a random numbering would need up to 8 E k per vector).
   * tangent:  p, dp (16E) + phi'(p) (written and read, 16E) + dp phi' (written 8E, read 8E)
               + inc_ptr, inc_elem (+ inc_loc and the shared K, or the local matrices in
               incidence order) + conn (read through the incidences, counted once) + z (8n)
               + result (8n).
   * tangent_values: p, dp (16E) + phi' (16E) + dp phi' (written 8E, read twice: 16E, the
               finiteness check and the gather) + the values gather without A0.
   * bare kernels: gather = the values gather with phi(p) given; bilinear = contract.

2. ``bytes_data`` -> ``copy_fraction_data``: the operation's own inputs and outputs,
   whatever the implementation: p (and dp), the local matrices, conn (the least data
   that says which dofs an element touches), A0's values, w, z and the result. No
   index structure, no temporaries: a floor that no implementation can go below.

The components of both counts are in each row's ``bytes`` / ``bytes_data``, so other
models can be recomputed from the JSON. At sizes whose working set fits in the
caches (1e4 elements: a few MB) the "bandwidth" can exceed the copy bandwidth.

Targets of the issue, assessed in the JSON's ``summary`` (and printed):
values and contract at >= 1M elements (target size) reach >= 50 % of the copy
bandwidth (``bandwidth``: count 1; ``bandwidth_data``: count 2, reported alongside); numba >= 5x faster than the numpy baseline (values and contract, every
size); per-element time flat within 2x across the measured sizes (values,
contract, tangent, per family); 2 threads >= 1.6x faster than 1 (public calls,
every size; the bare kernels are reported alongside). ``met`` is null when a
target had nothing to assess (e.g. no size >= 1M).

Memory: every row runs in phases measured with ``_bench_common.Meter`` (peak
resident memory per phase, VmHWM reset per phase where the kernel allows it;
else the process peak so far); everything of a row is freed before the next
(``release_memory``). Measured at 2e5 elements: the pattern build peaks at
~47 B per slot entry, the numpy phase at ~55-58 B per slot entry (adjopt's
matrix, its per-element local matrices and the COO/CSR copies alive at once),
on top of ~0.2 GiB for the interpreter. So Q1 elasticity at 4M elements (64
entries per element: 256M slot entries) needs ~15 GiB, P1 3D at 4M (64M entries)
~4 GiB, P1 2D at 4M (36M entries) ~2.5 GiB (measured with the row maps of the kernels, which
replaced the stored slot map: peaks 9.9 GiB, 4.0 GiB and 2.75 GiB at 4M, all in the numpy phase).
Before each row the script
estimates 64 B per slot entry + 0.25 GiB and skips the row (listed under
``skipped`` in the JSON, not in ``results``) when that exceeds the memory
available (``MemAvailable``); ``--max-elements`` (default 4e6) refuses larger
targets outright.

Output: two tables (times and bandwidths; per-element times, speedups and
memory), the summary, JSON ``--out`` (rewritten atomically after every row,
``"complete": false`` until the end; ``info`` = ``machine_info(copy_GBps=...)``)
and a log-log PNG ``--plot`` of time per element against elements.
Develop at small sizes: the default sizes need several GB and minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager

import numba
import numpy as np
import scipy.sparse as sp
from _bench_common import (
    Meter,
    best_time,
    copy_bandwidth,
    loadavg,
    loglog_plot,
    machine_info,
    release_memory,
    rss_gib,
    table,
    write_json,
)

import adjopt
from adjopt import fem, mesh
from adjopt.operators import _kernels

DEFAULT_ELEMENTS = [1e4, 1e5, 1e6, 4e6]
KERNELS = ("values", "contract", "tangent")  # timed public calls, in the tables and targets
BANDWIDTH_TARGET, BANDWIDTH_AT = 0.5, 1e6
NUMPY_TARGET, FLAT_TARGET, THREAD_TARGET = 5.0, 2.0, 1.6
VERIFY_TOL = 1e-12
THREADS = (1, 2)


# -- the three families ---------------------------------------------------------------------------
def _p1_2d(n):
    msh = mesh.unit_square(n)
    return msh, msh.cells, msh.n_nodes


def _p1_3d(n):
    msh = mesh.unit_cube(n)
    return msh, msh.cells, msh.n_nodes


def _q1_mesh(n):
    msh = mesh.rectangle(n, n, float(n), float(n), cell="quad")
    return msh, fem.vector_dofs(msh.cells, 2), 2 * msh.n_nodes


def _q1_local(msh):
    # every element is a translate of the unit square: one shared 8 x 8 matrix
    return fem.q1_elasticity(mesh.rectangle(1, 1, 1.0, 1.0, cell="quad"), E=1.0, nu=0.3)[0]


FAMILIES = {
    "p1-2d": dict(label="P1 Laplace 2D (unit_square, per-element K_e)", count=lambda n: 2 * n * n,
                  estimate=lambda e: math.sqrt(e / 2), build=_p1_2d, local=fem.p1_stiffness, coefficient="exp"),
    "p1-3d": dict(label="P1 Laplace 3D (unit_cube tets, per-element K_e)", count=lambda n: 6 * n**3,
                  estimate=lambda e: (e / 6) ** (1 / 3), build=_p1_3d, local=fem.p1_stiffness, coefficient="exp"),
    "q1-elasticity": dict(label="Q1 plane-stress elasticity (n x n unit quads, shared 8x8 K_e)",
                          count=lambda n: n * n, estimate=math.sqrt, build=_q1_mesh, local=_q1_local,
                          coefficient="simp"),
}


def size_parameter(family: str, target: float) -> int:
    """The mesh size parameter n >= 1 whose element count is closest to ``target`` (ties: the smaller n)."""
    fam = FAMILIES[family]
    n0 = max(1, int(round(fam["estimate"](target))))
    cands = range(max(1, n0 - 2), n0 + 3)
    return min(cands, key=lambda n: (abs(fam["count"](n) - target), n))


BYTES_PER_SLOT_ENTRY, BASE_GIB = 64, 0.25
LOCAL_SIZE = {"p1-2d": 3, "p1-3d": 4, "q1-elasticity": 8}


def estimate_gib(family: str, n: int) -> float:
    """Rough peak resident memory of one row (see the module docstring): 64 B per slot entry + 0.25 GiB."""
    k = LOCAL_SIZE[family]
    return BASE_GIB + BYTES_PER_SLOT_ENTRY * FAMILIES[family]["count"](n) * k * k / 2.0**30


def available_gib() -> float | None:
    """``MemAvailable`` of /proc/meminfo in GiB (None where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2.0**20
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- timing helpers -------------------------------------------------------------------------------
def first_and_best(f, repeat: int) -> tuple[float, float]:
    """Wall time of the first call of ``f`` (the warm-up) and the best of ``repeat`` further calls."""
    t0 = time.perf_counter()
    f()
    first = time.perf_counter() - t0
    return first, best_time(f, repeat, warmup=False)


@contextmanager
def numba_threads(nt: int):
    """Run the block with ``nt`` numba threads, restoring the previous count afterwards."""
    old = numba.get_num_threads()
    numba.set_num_threads(nt)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def max_threads() -> int:
    """Threads numba can use in this process (``NUMBA_NUM_THREADS``)."""
    return int(numba.config.NUMBA_NUM_THREADS)


# -- byte models (see the module docstring) ------------------------------------------------------
def byte_model(A: adjopt.ElementCoefficientMatrix) -> dict[str, dict[str, int]]:
    """Bytes each timed operation's implementation must move at least, per component, with a ``total``:
    every array it reads or writes counted once at its dtype (the module docstring)."""
    E, n, nnz, k = A.n_params, A.shape[0], A.nnz, A.k
    f8 = 8
    shared = A._estride == 0
    rows = dict(indptr=A.indptr.nbytes, inc_ptr=A._inc_ptr.nbytes, inc_elem=A._inc_elem.nbytes)
    if A._templates is not None:  # shared matrix, rows repeating a few patterns (the bench's p is finite)
        gather = dict(**rows, groups=A._templates[0].nbytes, group_template=A._templates[1].nbytes,
                      templates=A._templates[2].nbytes)
    else:
        gather = dict(**rows, **(dict(inc_loc=A._inc_loc.nbytes) if shared else {}), rpos=A._rpos.nbytes,
                      local=A.local.nbytes if shared else A._row_vals.nbytes)
    base = dict(base=A._base.nbytes) if A._base.size else {}
    gather = dict(**gather, coef=f8 * E, **base, out=f8 * nnz)
    local = dict(local=A.local.nbytes)
    bilinear = dict(p=f8 * E, conn=A.conn.nbytes, **local, w=f8 * n, z=f8 * n, out=f8 * E)
    values = dict(p=f8 * E, coef_write=f8 * E, **gather)
    tangent_values = dict(p=f8 * E, dp=f8 * E, dphi=2 * f8 * E, coef_write=f8 * E, finite_check=f8 * E,
                          **{key: v for key, v in gather.items() if key != "base"})
    matvec = dict(inc_ptr=A._inc_ptr.nbytes, inc_elem=A._inc_elem.nbytes,
                  **(dict(inc_loc=A._inc_loc.nbytes, local=A.local.nbytes) if shared
                     else dict(row_vals=A._row_vals.nbytes)), conn=A.conn.nbytes, coef=f8 * E, z=f8 * n, y=f8 * n)
    tangent = dict(p=f8 * E, dp=f8 * E, dphi=2 * f8 * E, coef_write=f8 * E, **matvec)
    out = dict(values=values, contract=dict(bilinear), tangent=tangent, tangent_values=tangent_values,
               gather_kernel=dict(gather), bilinear_kernel=dict(bilinear))
    for d in out.values():
        d["total"] = int(sum(d.values()))
    return out


def data_model(A: adjopt.ElementCoefficientMatrix) -> dict[str, dict[str, int]]:
    """Bytes of the operation's own inputs and outputs, whatever the implementation: p (and dp), the local
    matrices, conn (the least that says which dofs an element touches), A0's values, w, z, the result."""
    E, n, nnz = A.n_params, A.shape[0], A.nnz
    f8 = 8
    common = dict(p=f8 * E, local=A.local.nbytes, conn=A.conn.nbytes)
    base = dict(base=A._base.nbytes) if A._base.size else {}
    out = dict(values=dict(**common, **base, out=f8 * nnz), contract=dict(**common, w=f8 * n, z=f8 * n, out=f8 * E),
               tangent=dict(**common, dp=f8 * E, z=f8 * n, out=f8 * n),
               tangent_values=dict(**common, dp=f8 * E, out=f8 * nnz))
    for d in out.values():
        d["total"] = int(sum(d.values()))
    return out


# -- numpy and scikit-fem baselines -------------------------------------------------------------
class NumpyBaseline:
    """The same operations in vectorised numpy + scipy.sparse (COO -> CSR sums the duplicates)."""

    def __init__(self, conn: np.ndarray, local: np.ndarray, coefficient, n: int):
        conn = np.asarray(conn)
        if conn.min() < 0:
            raise ValueError("the numpy baseline does not handle condensed (negative) dofs")
        E, k = conn.shape
        idx = np.int32 if n < np.iinfo(np.int32).max else np.int64
        self.conn = conn.astype(idx, copy=False)
        self.rows = np.repeat(self.conn, k, axis=1).ravel()  # local entry a*k+b -> row conn[e, a]
        self.cols = np.tile(self.conn, (1, k)).ravel()  # -> column conn[e, b]
        self.shared = local.ndim == 2
        self.K = local if self.shared else local.reshape(E, k, k)
        self.phi = coefficient
        self.shape = (n, n)

    def assemble(self, coef: np.ndarray) -> sp.csr_array:
        """sum_e coef[e] K_e as CSR."""
        data = (coef[:, None, None] * self.K).ravel()
        return sp.coo_array((data, (self.rows, self.cols)), shape=self.shape).tocsr()

    def values(self, p):
        return self.assemble(self.phi(p))

    def contract(self, p, w, z):
        spec = "ea,ab,eb->e" if self.shared else "ea,eab,eb->e"
        return self.phi.d1(p) * np.einsum(spec, w[self.conn], self.K, z[self.conn], optimize=True)

    def tangent(self, p, dp, z):
        return self.assemble(dp * self.phi.d1(p)) @ z


def rel_diff(ref: np.ndarray, other: np.ndarray) -> float:
    """max |ref - other| / max |ref|."""
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(ref - other))) / (scale if scale > 0 else 1.0)


def matrix_rel_diff(A: sp.csr_array, B: sp.csr_array) -> tuple[float, bool]:
    """max |A - B| / max |A| and whether the two CSR patterns are identical."""
    B = B.copy()
    B.sort_indices()
    same = A.indptr.shape == B.indptr.shape and np.array_equal(A.indptr, B.indptr) and np.array_equal(
        A.indices, B.indices)
    if same:
        return rel_diff(A.data, B.data), True
    d = (A - B).tocsr()
    scale = float(np.max(np.abs(A.data)))
    return (float(np.max(np.abs(d.data))) if d.nnz else 0.0) / (scale if scale > 0 else 1.0), False


def skfem_time(family: str, msh, repeat: int) -> dict | None:
    """scikit-fem's full assembly of the family's constant-coefficient form, or None without skfem."""
    try:
        import skfem
    except ImportError:
        return None
    try:
        from skfem.models.elasticity import lame_parameters, linear_elasticity
        from skfem.models.poisson import laplace

        t0 = time.perf_counter()
        if family == "p1-2d":
            basis = skfem.Basis(skfem.MeshTri(msh.points.T, msh.cells.T), skfem.ElementTriP1())
            form = laplace
        elif family == "p1-3d":
            basis = skfem.Basis(skfem.MeshTet(msh.points.T, msh.cells.T), skfem.ElementTetP1())
            form = laplace
        else:
            basis = skfem.Basis(skfem.MeshQuad(msh.points.T, msh.cells.T), skfem.ElementVector(skfem.ElementQuad1()))
            form = linear_elasticity(*lame_parameters(1.0, 0.3))
        basis_s = time.perf_counter() - t0
        nnz = skfem.asm(form, basis).nnz
        return dict(version=skfem.__version__, basis_s=basis_s, assemble_s=best_time(lambda: skfem.asm(form, basis),
                                                                                     repeat, warmup=False), nnz=nnz)
    except Exception as exc:  # an outside library: record its failure, do not lose the run
        return dict(version=getattr(skfem, "__version__", None), error=f"{type(exc).__name__}: {exc}")


# -- one (family, size) row ------------------------------------------------------------------------
def run_row(family: str, target: float, repeat: int, coefficient: str, seed: int, copy_Bps: float) -> dict:
    """Build, verify and time one family at one size; everything it allocates is freed on return."""
    fam = FAMILIES[family]
    coef_name = fam["coefficient"] if coefficient == "auto" else coefficient
    nsize = size_parameter(family, target)
    meter = Meter()
    row = dict(family=family, target=int(target), size_parameter=nsize, coefficient=coef_name,
               loadavg_before=loadavg(), rss_before_GiB=rss_gib())
    with meter.phase("mesh"):
        t0 = time.perf_counter()
        msh, conn, n_dofs = fam["build"](nsize)
        row["mesh_s"] = time.perf_counter() - t0
    with meter.phase("local"):
        t0 = time.perf_counter()
        local = fam["local"](msh)
        row["local_s"] = time.perf_counter() - t0
    with meter.phase("pattern"):
        t0 = time.perf_counter()
        A = adjopt.ElementCoefficientMatrix(conn, local, coefficient=coef_name, n=n_dofs)
        row["pattern_s"] = time.perf_counter() - t0
    E = A.n_params
    row.update(elements=E, n_dofs=n_dofs, nnz=A.nnz, k=A.k, slot_entries=int(A._rpos.shape[0]),
               shared_local=A._estride == 0, per_element_entries=A.k * A.k,
               values_path="templates" if A._templates is not None else "rows",
               row_templates=None if A._templates is None else int(A._templates[2].shape[0]))
    rng = np.random.default_rng(seed)
    p = 0.5 * rng.standard_normal(E) if coef_name == "exp" else rng.uniform(0.05, 1.0, E)
    dp = rng.standard_normal(E)
    w, z = rng.standard_normal((2, n_dofs))
    calls = dict(values=lambda: A.values(p), contract=lambda: A.contract(p, w, z),
                 tangent=lambda: A.tangent(p, dp, z), tangent_values=lambda: A._tangent_values(p, dp))
    # bare kernels on precomputed inputs (for the thread scaling): the values path with phi(p) given, the
    # fused one-column contraction
    coef = np.ascontiguousarray(A.coefficient(p))
    bout = np.empty(E)
    spec = A.coefficient.kernel_spec()
    bare = dict(
        gather_kernel=lambda: A._assemble(coef, None, True),
        bilinear_kernel=lambda: _kernels.element_forms(A.conn, A.local, A._estride, w, z, *spec, 1, p, A._zero,
                                                       4 * numba.get_num_threads(), bout),
    )

    with meter.phase("numba"):
        times, first = {}, {}
        for name, f in calls.items():
            first[name], times[name] = first_and_best(f, repeat)
        row["first_call_s"] = first
        row["times_s"] = times

    nbytes, dbytes = byte_model(A), data_model(A)
    row["bytes"] = nbytes
    row["bytes_data"] = dbytes
    row["per_element_ns"] = {k: 1e9 * t / E for k, t in times.items()}
    row["GBps"] = {k: nbytes[k]["total"] / t / 1e9 for k, t in times.items()}
    row["GBps_copy_ceiling"] = copy_Bps / 1e9  # replaced at the end by the better of two measurements
    set_fractions(row, copy_Bps)

    with meter.phase("threads"):
        thr: dict = {}
        for nt in THREADS:
            if nt > max_threads():
                thr[str(nt)] = None
                continue
            c0, t0 = os.times(), time.perf_counter()
            with numba_threads(nt):
                thr[str(nt)] = {name: best_time(f, repeat) for name, f in {**calls, **bare}.items()
                                if name != "tangent_values"}
            c1, wall = os.times(), time.perf_counter() - t0
            # CPU seconds per wall second of the block: ~1 with 2 threads means the cores were busy elsewhere
            # (os.times ticks are 10 ms: no figure for blocks shorter than 0.2 s)
            cpu = c1.user - c0.user + c1.system - c0.system
            thr[str(nt)]["cpu_per_wall"] = cpu / wall if wall >= 0.2 else None
        t1, t2 = thr.get("1"), thr.get("2")
        thr["speedup_2_over_1"] = None if not (t1 and t2) else {k: t1[k] / t2[k] for k in t1 if k != "cpu_per_wall"}
        thr["bare_GBps"] = None if not t2 else {k: nbytes[k]["total"] / t2[k] / 1e9 for k in bare}
        row["threads"] = thr

    with meter.phase("numpy"):
        t0 = time.perf_counter()
        base = NumpyBaseline(A.conn, local, A.coefficient, n_dofs)
        npres = dict(pattern_s=time.perf_counter() - t0)
        # verify first (untimed), then time
        mat_diff, same_pattern = matrix_rel_diff(A.assemble(p), base.values(p))
        tan_diff = rel_diff(A.tangent(p, dp, z), base.tangent(p, dp, z))
        con_diff = rel_diff(A.contract(p, w, z), base.contract(p, w, z))
        npres["max_rel_diff"] = dict(values=mat_diff, contract=con_diff, tangent=tan_diff,
                                     max=max(mat_diff, con_diff, tan_diff))
        npres["same_pattern"] = same_pattern
        npres["verified"] = npres["max_rel_diff"]["max"] <= VERIFY_TOL and same_pattern
        npres["values_s"] = best_time(lambda: base.values(p), repeat)
        npres["contract_s"] = best_time(lambda: base.contract(p, w, z), repeat)
        npres["speedup"] = dict(values=npres["values_s"] / times["values"],
                                contract=npres["contract_s"] / times["contract"])
        row["numpy"] = npres

    with meter.phase("skfem"):
        row["skfem"] = skfem_time(family, msh, repeat)
        if row["skfem"] and row["skfem"].get("assemble_s"):
            row["skfem"]["numba_values_speedup"] = row["skfem"]["assemble_s"] / times["values"]

    row["memory"] = dict(peak_GiB=max((r["peak_GiB"] or 0.0) for r in meter.rows) if meter.can_reset
                         else meter.overall_peak_gib(), per_phase_reset=meter.can_reset,
                         phases=[dict(phase=r["phase"], seconds=r["seconds"], peak_GiB=r["peak_GiB"])
                                 for r in meter.rows])
    row["loadavg_after"] = loadavg()
    return row


def set_fractions(row: dict, copy_Bps: float) -> None:
    """copy_fraction (implementation bytes) and copy_fraction_data (the operation's own bytes) of every kernel."""
    t = row["times_s"]
    row["copy_fraction"] = {k: row["bytes"][k]["total"] / t[k] / copy_Bps for k in t}
    row["copy_fraction_data"] = {k: row["bytes_data"][k]["total"] / t[k] / copy_Bps for k in t}


# -- summary against the targets ---------------------------------------------------------
def _verdict(values: list[dict], key: str, bound: float, at_least: bool) -> dict:
    """``met`` (None when nothing was assessed): every ``v[key]`` >= bound (``at_least``) or <= bound; the worst entry."""
    if not values:
        return dict(met=None, worst=None, values=[])
    worst = (min if at_least else max)(values, key=lambda v: v[key])
    met = all((v[key] >= bound) if at_least else (v[key] <= bound) for v in values)
    return dict(met=met, worst=worst, values=values)


def summarize(rows: list[dict]) -> dict:
    """Each target of the issue, the rows it was assessed on and whether it was met."""
    summ = {}
    bw = [dict(family=r["family"], elements=r["elements"], kernel=k, copy_fraction=r["copy_fraction"][k])
          for r in rows if r["target"] >= BANDWIDTH_AT for k in ("values", "contract")]
    summ["bandwidth"] = dict(
        target=f"values and contract at >= {BANDWIDTH_AT:.0e} elements reach >= {BANDWIDTH_TARGET:.0%} of the "
               f"copy bandwidth", scope=f"rows with target >= {BANDWIDTH_AT:.0e} elements",
        bytes="the arrays the implementation must read or write, each once (results[i].bytes)",
        **_verdict(bw, "copy_fraction", BANDWIDTH_TARGET, True))
    bwd = [dict(family=r["family"], elements=r["elements"], kernel=k, copy_fraction=r["copy_fraction_data"][k])
           for r in rows if r["target"] >= BANDWIDTH_AT for k in ("values", "contract")]
    summ["bandwidth_data"] = dict(
        target=f"the same, counting only the operation's inputs and outputs (p, local, conn, w, z, result)",
        scope=f"rows with target >= {BANDWIDTH_AT:.0e} elements",
        bytes="p, dp, local matrices, conn, A0 values, w, z and the result, each once (results[i].bytes_data)",
        **_verdict(bwd, "copy_fraction", BANDWIDTH_TARGET, True))
    sp_ = [dict(family=r["family"], elements=r["elements"], kernel=k, speedup=r["numpy"]["speedup"][k])
           for r in rows for k in ("values", "contract")]
    summ["numpy_speedup"] = dict(
        target=f"numba >= {NUMPY_TARGET:g}x faster than the vectorised numpy baseline (values and contract)",
        scope="every measured size", **_verdict(sp_, "speedup", NUMPY_TARGET, True))
    flat = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        fr = [r for r in rows if r["family"] == fam]
        if len(fr) < 2:
            continue
        for k in KERNELS:
            pe = [r["per_element_ns"][k] for r in fr]
            flat.append(dict(family=fam, kernel=k, elements=[r["elements"] for r in fr], per_element_ns=pe,
                             ratio=max(pe) / min(pe)))
    summ["flatness"] = dict(
        target=f"per-element time flat within {FLAT_TARGET:g}x (max/min) from the smallest to the largest size",
        scope="per family and kernel, all measured sizes (needs >= 2 sizes)",
        **_verdict(flat, "ratio", FLAT_TARGET, False))
    th = [dict(family=r["family"], elements=r["elements"], kernel=k, speedup=r["threads"]["speedup_2_over_1"][k])
          for r in rows if r["threads"].get("speedup_2_over_1") for k in KERNELS]
    bare = [dict(family=r["family"], elements=r["elements"], kernel=k, speedup=r["threads"]["speedup_2_over_1"][k])
            for r in rows if r["threads"].get("speedup_2_over_1") for k in ("gather_kernel", "bilinear_kernel")]
    summ["threads"] = dict(
        target=f"2 threads >= {THREAD_TARGET:g}x faster than 1 (public values, contract, tangent)",
        scope="every measured size (null when numba has fewer than 2 threads)",
        **_verdict(th, "speedup", THREAD_TARGET, True),
        bare_kernels=_verdict(bare, "speedup", THREAD_TARGET, True))
    summ["verified"] = dict(target=f"numpy baseline equals adjopt to {VERIFY_TOL:g} relative, same CSR pattern",
                            met=all(r["numpy"]["verified"] for r in rows) if rows else None,
                            max_rel_diff=max((r["numpy"]["max_rel_diff"]["max"] for r in rows), default=None))
    return summ


def summary_lines(summ: dict) -> list[str]:
    """One line per target: MET / NOT MET / NOT ASSESSED, the target and its worst value."""
    out = []
    for key in ("bandwidth", "bandwidth_data", "numpy_speedup", "flatness", "threads", "verified"):
        s = summ[key]
        mark = {True: "MET", False: "NOT MET", None: "NOT ASSESSED"}[s["met"]]
        worst = s.get("worst")
        detail = ""
        if key == "verified":
            detail = f"max_rel_diff {s['max_rel_diff']:.2e}" if s["max_rel_diff"] is not None else ""
        elif worst:
            val = {k: v for k, v in worst.items() if k in ("copy_fraction", "speedup", "ratio")}
            where = f"{worst['family']} {worst['kernel']}" + (f" at {worst['elements']:,}" if key != "flatness" else "")
            detail = "worst: " + where + " " + ", ".join(f"{k} {v:.2f}" for k, v in val.items())
            if key == "threads" and s["bare_kernels"]["worst"]:
                b = s["bare_kernels"]["worst"]
                detail += f"; bare kernels worst {b['kernel']} {b['speedup']:.2f}"
        out.append(f"[{mark:>12}] {s['target']}" + (f" -- {detail}" if detail else ""))
    return out


# -- output ----------------------------------------------------------------------------------------
def _ms(t):
    return f"{1e3 * t:.3g}"


def print_tables(rows: list[dict]) -> None:
    """The times/bandwidth table and the per-element/speedup/memory table."""
    t1 = []
    for r in rows:
        line = [r["family"], f"{r['elements']:,}", f"{r['nnz']:,}", f"{r['pattern_s']:.3g}",
                f"{max(r['first_call_s'][k] for k in KERNELS):.3g}"]
        for k in KERNELS:
            line += [_ms(r["times_s"][k]), f"{r['GBps'][k]:.1f}", f"{100 * r['copy_fraction'][k]:.0f}%",
                     f"{100 * r['copy_fraction_data'][k]:.0f}%"]
        t1.append(line)
    print(table(t1, ["family", "elements", "nnz", "pattern s", "1st call s", "values ms", "GB/s", "copy", "data",
                     "contract ms", "GB/s", "copy", "data", "tangent ms", "GB/s", "copy", "data"]))
    print()
    t2 = []
    for r in rows:
        s2 = r["threads"].get("speedup_2_over_1") or {}
        line = [r["family"], f"{r['elements']:,}"] + [f"{r['per_element_ns'][k]:.3g}" for k in KERNELS]
        line += [f"{r['numpy']['speedup'][k]:.1f}x" for k in ("values", "contract")]
        line += [f"{s2[k]:.2f}x" if k in s2 else "-" for k in (*KERNELS, "gather_kernel", "bilinear_kernel")]
        cpu = (r["threads"].get("2") or {}).get("cpu_per_wall")
        line += ["-" if cpu is None else f"{cpu:.2f}", f"{r['memory']['peak_GiB']:.2f}",
                 f"{r['numpy']['max_rel_diff']['max']:.1e}"]
        t2.append(line)
    print(table(t2, ["family", "elements", "ns/el values", "ns/el contract", "ns/el tangent", "np/numba values",
                     "np/numba contract", "2thr values", "2thr contract", "2thr tangent", "2thr gather", "2thr bilin",
                     "2thr cpu/wall", "peak GiB", "max_rel_diff"]))


def write_plot(path: str, rows: list[dict]) -> bool:
    """Log-log time per element against elements, one line per family and kernel (numba, default threads)."""
    series = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        fr = [r for r in rows if r["family"] == fam]
        for k in KERNELS:
            series[f"{fam} {k}"] = ([r["elements"] for r in fr], [r["per_element_ns"][k] for r in fr])
    # 3 families x 3 kernels = 9 lines, within matplotlib's 10 default colours (the numpy times are in the JSON)
    return loglog_plot(path, series, "elements", "time per element [ns]",
                       "ElementCoefficientMatrix kernels (numba, default threads)")


def numba_cache_stats() -> dict:
    """Numba on-disk cache hits/misses of the operator kernels in this process."""
    out = {}
    for name in ("coefficient_values", "gather_rows", "gather_templates", "element_forms", "rows_matvec"):
        st = getattr(getattr(_kernels, name), "stats", None)
        out[name] = None if st is None else dict(hits=int(sum(st.cache_hits.values())),
                                                 misses=int(sum(st.cache_misses.values())))
    return out


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=float, nargs="+", default=DEFAULT_ELEMENTS,
                    help="target element counts (default 1e4 1e5 1e6 4e6)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--repeat", type=int, default=5, help="timed calls after the warm-up; the best is kept")
    ap.add_argument("--coefficient", default="auto", choices=["auto", "exp", "simp"])
    ap.add_argument("--max-elements", type=float, default=4e6,
                    help="refuse targets above this (a guard: 4e6 elements of Q1 elasticity need ~10 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_kernels.json")
    ap.add_argument("--plot", default="bench_kernels.png")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if not (math.isfinite(args.max_elements) and args.max_elements >= 10):
        ap.error(f"--max-elements must be a finite number >= 10, got {args.max_elements:g}")
    for e in args.elements:
        if not math.isfinite(e) or e < 10:
            ap.error(f"--elements must be finite numbers >= 10, got {e:g}")
        if e != round(e):
            ap.error(f"--elements must be whole numbers, got {e:g}")
        if e > args.max_elements:
            ap.error(f"--elements {e:g} is above --max-elements {args.max_elements:g} (raise it if you mean it)")
    args.elements = sorted({int(e) for e in args.elements})
    args.families = list(dict.fromkeys(args.families))
    for opt in ("out", "plot"):
        d = os.path.dirname(os.path.abspath(getattr(args, opt)))
        if not os.path.isdir(d):
            ap.error(f"--{opt}: folder {d} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load = loadavg()
    print(f"numba threads {numba.get_num_threads()} (max {max_threads()}), cpus {os.cpu_count()}, load {load}",
          flush=True)
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load[0]} on {os.cpu_count()} cpus: other processes skew the timings, "
              "above all the thread scaling", flush=True)
    copy_start = copy_bandwidth()
    release_memory()
    print(f"copy bandwidth {copy_start / 1e9:.1f} GB/s", flush=True)
    config = dict(elements=args.elements, families=args.families, repeat=args.repeat, coefficient=args.coefficient,
                  max_elements=args.max_elements, seed=args.seed, threads=list(THREADS),
                  byte_model="every array the implementation must read or write counted once at its dtype "
                             "(results[i].bytes, copy_fraction); the operation's own inputs and outputs only "
                             "(results[i].bytes_data, copy_fraction_data); module docstring of "
                             "scripts/bench_kernels.py")
    rows: list[dict] = []
    skipped: list[dict] = []

    def dump(complete: bool, copy_Bps: float, extra: dict) -> None:
        info = machine_info(copy_GBps=copy_Bps / 1e9, numba_cache=numba_cache_stats(), **extra)
        write_json(args.out, dict(info=info, config=config, families={k: v["label"] for k, v in FAMILIES.items()},
                                  complete=complete, results=rows, skipped=skipped, summary=summarize(rows)))

    for family in args.families:
        for target in args.elements:
            need, avail = estimate_gib(family, size_parameter(family, target)), available_gib()
            if avail is not None and need > avail:
                skipped.append(dict(family=family, target=target, estimated_GiB=need, available_GiB=avail))
                print(f"{family:>14} {target:>10,} elements: SKIPPED, needs ~{need:.1f} GiB, {avail:.1f} GiB available",
                      flush=True)
                continue
            row = run_row(family, target, args.repeat, args.coefficient, args.seed, copy_start)
            rows.append(row)
            release_memory()
            print(f"{family:>14} {row['elements']:>10,} elements: values {_ms(row['times_s']['values'])} ms "
                  f"({100 * row['copy_fraction']['values']:.0f}% copy), contract {_ms(row['times_s']['contract'])} ms, "
                  f"tangent {_ms(row['times_s']['tangent'])} ms, peak {row['memory']['peak_GiB']:.2f} GiB"
                  + ("" if row["numpy"]["verified"] else "  NUMPY BASELINE DIFFERS"), flush=True)
            dump(False, copy_start, dict(copy_GBps_start=copy_start / 1e9))
    copy_end = copy_bandwidth()
    release_memory()
    # the ceiling is the better of the two measurements (others may have loaded the machine during one)
    copy_Bps = max(copy_start, copy_end)
    for r in rows:
        r["GBps_copy_ceiling"] = copy_Bps / 1e9
        set_fractions(r, copy_Bps)
    extra = dict(copy_GBps_start=copy_start / 1e9, copy_GBps_end=copy_end / 1e9,
                 first_call_s=rows[0]["first_call_s"] if rows else None)
    print()
    print(f"copy bandwidth {copy_Bps / 1e9:.1f} GB/s (start {copy_start / 1e9:.1f}, end {copy_end / 1e9:.1f})")
    print_tables(rows)
    summ = summarize(rows)
    print()
    print("\n".join(summary_lines(summ)))
    for sk in skipped:
        print(f"skipped {sk['family']} at {sk['target']:,} elements: needs ~{sk['estimated_GiB']:.1f} GiB, "
              f"{sk['available_GiB']:.1f} GiB available")
    plotted = bool(rows) and write_plot(args.plot, rows)
    extra["plot"] = args.plot if plotted else None
    dump(True, copy_Bps, extra)
    print(f"wrote {args.out}" + (f" and {args.plot}" if plotted else " (no plot: no rows or no matplotlib)"))
    return 0 if summ["verified"]["met"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
