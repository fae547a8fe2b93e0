"""Shared helpers of the benchmark scripts: machine facts, timing, memory, bandwidth, JSON and plots.

Imported by the ``scripts/bench_*.py`` files (``from _bench_common import ...``
works because Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import resource
import subprocess
import tempfile
import time
from contextlib import contextmanager

import numba
import numpy as np
import scipy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2.0**30


def version(module: str) -> str | None:
    """``module.__version__``, or None when it is not installed."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes skew timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def total_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        return None


def git_state() -> dict | None:
    """Commit and locally modified library files of the repository."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        st = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "problems"], capture_output=True,
                            text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return dict(commit=head.stdout.strip(), modified=[ln[3:] for ln in st.stdout.splitlines()])


def machine_info(**extra) -> dict:
    """Machine, versions, threads, load and git state, for the ``info`` block of a benchmark's JSON."""
    return dict(machine=platform.machine(), processor=platform.processor(), python=platform.python_version(),
                numpy=np.__version__, scipy=scipy.__version__, numba=numba.__version__, pyamg=version("pyamg"),
                threads=numba.get_num_threads(), cpus=os.cpu_count(), loadavg=loadavg(),
                memory_GiB=total_memory_gib(), git=git_state(), **extra)


def finite(v):
    """A JSON-safe copy: NaN/Inf -> None, numpy scalars -> Python numbers."""
    if isinstance(v, dict):
        return {str(k): finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as JSON atomically (temporary file + rename): never a half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as fh:
        json.dump(finite(data), fh, indent=1)
    os.replace(fh.name, path)


def best_time(f, repeat: int = 5, warmup: bool = True) -> float:
    """Minimum wall time of ``repeat`` calls of ``f`` (after one untimed call when ``warmup``)."""
    if warmup:
        f()
    best = math.inf
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def median_time(f, repeat: int = 5) -> float:
    """Median wall time of ``repeat`` calls of ``f``."""
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def median(xs) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def copy_bandwidth(nbytes: int = 2**28, repeat: int = 5) -> float:
    """The machine's copy bandwidth in bytes/s: ``np.copyto`` of a large array, counting read + write.

    The ceiling for kernels that stream through memory (assembly, contraction).
    """
    n = max(1, nbytes // 8)
    a = np.ones(n)
    b = np.empty(n)
    t = best_time(lambda: np.copyto(b, a), repeat)
    return 2 * a.nbytes / t


def release_memory() -> None:
    """Collect garbage and return the freed heap to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the peak resident memory (VmHWM) where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """Peak resident memory since the last :func:`reset_peak` (VmHWM), else of the whole process."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 2.0**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2.0**20


def rss_gib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 2.0**20


class Meter:
    """Sequential phases: wall time and peak resident memory of each (VmHWM reset per phase)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.can_reset = reset_peak()
        self.peak = peak_rss_gib()

    @contextmanager
    def phase(self, name: str, **extra):
        self.peak = max(self.peak, peak_rss_gib())
        if self.can_reset:
            reset_peak()
        row = dict(phase=name, seconds=0.0, **extra)
        self.rows.append(row)
        t0 = time.perf_counter()
        try:
            yield row
        finally:
            row["seconds"] = time.perf_counter() - t0
            p = peak_rss_gib()
            self.peak = max(self.peak, p)
            row["peak_GiB"] = p if self.can_reset else None

    def overall_peak_gib(self) -> float:
        self.peak = max(self.peak, peak_rss_gib())
        return self.peak


def loglog_plot(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = "") -> bool:
    """Write a log-log PNG of ``{label: (x, y)}``; False (and nothing written) without matplotlib or a path."""
    if not path:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (x, y) in series.items():
        pts = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and a > 0 and b > 0]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    return True


def save_png(fig, path: str) -> None:
    """Write a pyplot figure to ``path`` atomically (a temporary file beside it, then os.replace) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=d, delete=False, suffix=".png") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    os.replace(fh.name, path)


def table(rows: list[list], header: list[str]) -> str:
    """A plain text table, columns right-aligned."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def blas_kind(path: str | None) -> str:
    """'openblas', 'mkl', 'blis', 'reference' (netlib: Debian's /usr/lib/.../blas/libblas.so.3) or 'unknown'."""
    if not path:
        return "unknown"
    low = path.lower()
    for kind in ("openblas", "mkl", "blis", "atlas"):
        if kind in low:
            return kind
    if "/blas/libblas" in low or os.path.basename(low).startswith("libblas.so"):
        return "reference"
    return "unknown"


def blas_info() -> dict:
    """The BLAS and OpenMP libraries of this process (threadpoolctl) and the one CHOLMOD runs on.

    ``cholmod_blas`` is the libblas that scikit-sparse's module links (``ldd``, followed through Debian's
    alternatives); ``cholmod_pools`` are threadpoolctl's entries of the libraries in its folder (Debian's
    OpenBLAS: libblas.so.3 is a front for libopenblasp-*.so beside it). Informational: None or empty where
    scikit-sparse, ldd or threadpoolctl are missing. ``cholmod_blas_kind``: :func:`blas_kind` of it.
    """
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                          "OMP_WAIT_POLICY", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    blas = None
    try:
        from sksparse import cholmod

        out = subprocess.run(["ldd", cholmod.__file__], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if ("libblas" in line or "openblas" in line or "mkl" in line) and "=>" in line:
                blas = os.path.realpath(line.split("=>")[1].split("(")[0].strip())
                break
    except Exception:  # noqa: BLE001 - informational only (no scikit-sparse, no ldd)
        pass
    pools = []
    try:
        import threadpoolctl

        pools = [{k: d.get(k) for k in ("prefix", "user_api", "internal_api", "filepath", "version", "num_threads",
                                        "threading_layer", "architecture")} for d in threadpoolctl.threadpool_info()]
    except Exception:  # noqa: BLE001
        pass
    folder = os.path.dirname(blas) if blas else None
    mine = [d for d in pools if folder and d["filepath"] and os.path.dirname(os.path.realpath(d["filepath"])) == folder]
    return dict(thread_env=env, cholmod_blas=blas, cholmod_blas_kind=blas_kind(blas), cholmod_pools=mine,
                threadpools=pools)


def fmt(x, spec=".3g") -> str:
    """A table cell: "-" for None or a non-finite float, yes/NO for a bool, else ``format(x, spec)``."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, spec)


def gallery():
    """The ``poisson_inversion`` module of problems/ (imported without leaving problems/ on sys.path)."""
    import sys

    folder = os.path.join(ROOT, "problems")
    sys.path.insert(0, folder)
    try:
        import poisson_inversion
    finally:
        sys.path.remove(folder)
    return poisson_inversion


# -- MPI drivers (scripts/bench_mpi.py, scripts/bench_mpi_memory.py) -------------------------------------------
#: set to 1 in every launched rank: one thread per rank
MPI_THREAD_VARS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def launch_mpi(mpiexec: str, ranks: int, script: str, worker_args: list[str], out_json: str, timeout: float,
               cwd: str) -> dict:
    """``mpiexec -n ranks python script worker_args --json out_json``, its output streamed with an ``[R=n]``
    prefix; killed (with its ranks) after ``timeout`` seconds. A record of the launch (command, returncode,
    seconds, the last 40 lines, error)."""
    import sys
    import threading

    cmd = [mpiexec, "-n", str(ranks), sys.executable, script, *worker_args, "--json", out_json]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_"))}  # no handshake of this process
    env.update({v: "1" for v in MPI_THREAD_VARS})
    rec = dict(ranks=ranks, command=cmd, returncode=None, seconds=None, tail=[])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)

    def pump():
        for line in proc.stdout:
            rec["tail"] = (rec["tail"] + [line.rstrip()])[-40:]
            print(f"[R={ranks}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rec["returncode"] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the session this launch created: mpiexec and its ranks
        rec["returncode"] = proc.wait()
        rec["error"] = f"timed out after {timeout:g} s"
    reader.join(timeout=10)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def run_rank_counts(rank_counts, launch, prefix: str) -> tuple[list, list]:
    """``launch(R, json_path)`` for each R in turn; (the runs their JSON holds, one record per launch)."""
    runs, launches = [], []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for R in rank_counts:
            print(f"== mpiexec -n {R} (load average {loadavg()})", flush=True)
            path = os.path.join(tmp, f"ranks{R}.json")
            rec = launch(R, path)
            if rec["returncode"] == 0 and os.path.isfile(path):
                with open(path) as fh:
                    part = json.load(fh)
                run = part["runs"][0]
                run["info"] = part["info"]
                runs.append(run)
            else:
                rec.setdefault("error", f"exit status {rec['returncode']}" + ("" if os.path.isfile(path) else ", no JSON"))
                print(f"== R={R} failed: {rec['error']}", flush=True)
            launches.append({k: v for k, v in rec.items() if k != "tail" or "error" in rec})
    return runs, launches
