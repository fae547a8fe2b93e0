"""The iteration loop every driver shares: stopping tests, history, callback, checkpoints, resume.

A driver (:class:`Driver`) knows how to start (evaluate f and its gradient at
x0) and how to take one iteration; everything else is here. Its whole state
is a dict of numpy arrays and numbers, so that the loop can write it to an
``.npz`` checkpoint after every iteration (atomically: a temporary file, then
``os.replace``) and ``resume=`` can reload it and continue exactly where the
run stopped: a resumed run ends with the same x as an uninterrupted one (with a
nonlinear state equation, to Newton's tolerance: Newton starts from the states
cached during the run, which a resumed run has not seen). The
checkpoint records the problem's name, its build options
(``problem.meta["options"]``), the number of parameters and the method; a
resume refuses a checkpoint that differs in any of these.

Stopping tests (``Options``), checked after every iteration:

- ``gtol``, ``gatol``: the stationarity measure (the norm of the gradient in
  the dual of the chosen inner product, ``sqrt(g^T M^{-1} g)``, projected on
  the bounds) at most ``max(gatol, gtol * its value at x0)``;
- ``ftol``: ``|f_k - f_{k-1}| <= ftol * max(1, |f_k|)``;
- ``xtol``: the step ``||x_k - x_{k-1}||_inf <= xtol`` (the test of the
  88-line topology code uses 0.01);
- ``maxiter``, ``max_time`` (seconds of wall time, summed over resumes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..errors import AdjoptError, NonFiniteError
from .continuation import LOOP_NAMES
from .continuation import _record as _continuation_record

logger = logging.getLogger(__name__)

#: format version of the checkpoint files (2 added the problem's name, options and size to the meta)
CHECKPOINT_VERSION = 2
#: versions read_checkpoint accepts (a version 1 checkpoint is checked by method and size only)
READABLE_VERSIONS = (1, 2)
#: what a checkpoint records about its run, and how a mismatch is said ("is of ...")
IDENTITY = {"problem": "problem {!r}, not {!r}", "options": "problem options {}, not {}",
            "n_params": "{} parameters, not {}", "method": "method {!r}, not {!r}"}


class OptimizationError(AdjoptError, RuntimeError):
    """A driver cannot continue (e.g. the line search found no acceptable step)."""


class MethodSetupError(AdjoptError, ValueError):
    """The method cannot run on this problem with these options (bounds or constraints it does not take,
    an unknown option, a start of the wrong shape)."""


class CheckpointError(AdjoptError, ValueError):
    """A checkpoint file is missing, unreadable or belongs to another run (another problem, options, size or method)."""


class Stop(Exception):
    """Raised by a driver's ``iterate`` to end the run: ``success`` and a message saying why."""

    def __init__(self, message: str, success: bool = False):
        super().__init__(message)
        self.message = message
        self.success = success


@dataclass
class Options:
    """Stopping tests shared by all drivers (see the module docstring)."""

    maxiter: int = 200
    gtol: float = 1e-6
    gatol: float = 0.0
    ftol: float = 0.0
    xtol: float = 0.0
    max_time: float | None = None

    def __post_init__(self):
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, (int, np.integer)) or self.maxiter < 0:
            raise ValueError(f"maxiter must be a non-negative integer, got {self.maxiter!r}")
        for name in ("gtol", "gatol", "ftol", "xtol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time must be positive seconds or None, got {self.max_time!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class OptimizeResult:
    """What a driver returns (the fields of ``scipy.optimize.OptimizeResult`` and more).

    ``history`` has one dict per iteration (iteration 0 is the start): f, the
    stationarity measure, step length, evaluation counts and what the method
    adds (CG iterations per Newton step, trust radius, volume, ...). Every
    iteration after the start also has ``time`` (its wall seconds) and
    ``phases``: seconds by phase of the functional (``filter``, ``assembly``,
    ``factorize``, ``solve``, ``sensitivity``; see ``ReducedFunctional.times``)
    and ``update``, the rest (the driver's own work: line search logic, OC
    bisection, MMA subproblem, the previous iteration's checkpoint).
    """

    x: np.ndarray
    fun: float
    jac: np.ndarray
    nit: int
    success: bool
    message: str
    method: str
    nfev: int = 0
    njev: int = 0
    nhessp: int = 0
    factorizations: int = 0
    solves: int = 0
    time: float = 0.0
    stationarity: float = math.nan
    history: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def __str__(self):
        status = "converged" if self.success else "stopped"
        return (f"{self.method}: {status} after {self.nit} iterations: {self.message}\n"
                f"  f = {self.fun:.10g}, stationarity = {self.stationarity:.3g}, {self.nfev} values, {self.njev} "
                f"gradients, {self.nhessp} Hessian actions, {self.factorizations} factorizations, {self.solves} solves, "
                f"{self.time:.3g} s")

    def as_dict(self) -> dict:
        """JSON-ready dict (arrays as lists)."""
        d = asdict(self)
        d["x"] = self.x.tolist()
        d["jac"] = self.jac.tolist()
        return d


class Counted:
    """A functional wrapper that counts values, gradients and Hessian actions."""

    def __init__(self, functional, counts: dict):
        self.f = functional
        self.counts = counts

    @property
    def n_params(self) -> int:
        return self.f.n_params

    def value(self, x) -> float:
        self.counts["nfev"] += 1
        return float(self.f.value(x))

    def gradient(self, x, tol=None) -> np.ndarray:
        self.counts["njev"] += 1
        return self.f.gradient(x, tol=tol) if tol is not None else self.f.gradient(x)

    def hessp(self, x, v, tol=None, **kw) -> np.ndarray:
        self.counts["nhessp"] += v.shape[1] if np.ndim(v) == 2 else 1  # a block of k directions: k actions
        return self.f.hessp(x, v, tol=tol, **kw) if (tol is not None or kw) else self.f.hessp(x, v)


class Driver:
    """One optimization method. Subclasses set ``name`` and implement :meth:`start` and :meth:`iterate`.

    ``start(x0) -> state`` evaluates the objective at x0; ``iterate(state) ->
    dict`` takes one iteration, updates ``state`` in place (``x``, ``f``, ``g``
    at least) and returns what the history should record about it. Raising
    :class:`Stop` ends the run. ``stationarity(state)`` is the measure the
    ``gtol`` test reads. ``options`` is the method's own option dict.
    """

    name = "abstract"
    #: method options and their defaults
    defaults: dict = {}
    #: whether the method handles bounds / inequality constraints
    takes_bounds = False
    takes_constraints = False
    needs_constraints = False

    def __init__(self, problem, inner, options: dict, counts: dict):
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for method {self.name!r}; its options are {sorted(self.defaults)} "
                f"and the stopping tests {Options.names()}"
            )
        self.problem = problem
        self.inner = inner
        self.opts = {**self.defaults, **options}
        self.J = Counted(problem.functional, counts)
        #: where x lives (one process, or blocks over MPI ranks): the reductions of the method
        self.space = inner.space
        if self.space.distributed and not getattr(self, "takes_blocks", False):
            raise ValueError(f"method {self.name!r} runs on the whole parameter vector; with the parameters in blocks "
                             "over the ranks use 'oc', 'mma', 'lbfgs' or 'newton-cg' (or the replicated interface)")
        self.bounds = problem.bounds
        self.warnings: list[str] = []

    # -- to implement -------------------------------------------------------------
    def start(self, x0: np.ndarray) -> dict:
        raise NotImplementedError

    def iterate(self, state: dict) -> dict:
        raise NotImplementedError

    def refresh(self, state: dict) -> None:
        """The objective changed at the same x (a continuation raised beta): evaluate it again there. This
        default starts the method afresh at ``state["x"]`` (its memory was of the old objective)."""
        fresh = self.start(state["x"])
        state.clear()
        state.update(fresh)

    # -- shared helpers -------------------------------------------------------------
    def first_point(self, x0) -> tuple[np.ndarray, float, np.ndarray]:
        """(x, f, g) at the projected start; a ValueError when f is not finite there."""
        x = self.project(np.array(x0, dtype=np.float64))
        f = self.J.value(x)
        if not math.isfinite(f):
            raise NonFiniteError(f"the objective is not finite at the starting point (f = {f})")
        return x, f, self.J.gradient(x)

    def project(self, x: np.ndarray) -> np.ndarray:
        if self.bounds is None:
            return x
        return np.clip(x, self.bounds[0], self.bounds[1])

    def stationarity(self, state: dict) -> float:
        """||g||_{M^{-1}}; with bounds ||x - P(x - D^{-1} g)||_D with D the lumped M.

        The bound-constrained measure uses the diagonal D because the KKT
        conditions are sign conditions on the entries of g: a positive
        diagonal keeps the signs, so the measure is zero exactly at a KKT point.
        """
        x, g = state["x"], state["g"]
        if self.bounds is None:
            return self.inner.dual_norm(g)
        d = self.inner.diagonal()
        v = x - self.project(x - g / d)
        return math.sqrt(max(self.space.dot(v, d * v), 0.0))


# -- checkpoints ---------------------------------------------------------------------
def write_checkpoint(path, state: dict, meta: dict) -> None:
    """Write ``state`` (arrays and numbers) and ``meta`` (JSON) to ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    arrays = {f"state__{k}": np.asarray(v) for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the mode of every other file written (mkstemp's is 0600)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            exc.filename = path  # name the checkpoint (disk full, ...), not its temporary file
        raise


def read_checkpoint(path) -> tuple[dict, dict]:
    """(state, meta) from a checkpoint written by :func:`write_checkpoint`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}: give the file a run wrote with checkpoint=...")

    def unreadable(why):
        return CheckpointError(f"cannot read the checkpoint {path!r} ({why}); it is damaged or not a checkpoint: give "
                               "the checkpoint file a run wrote with checkpoint=...")

    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise unreadable("not an .npz archive")
        with data:
            meta = json.loads(str(data["meta"]))
            state = {}
            for k in data.files:
                if k.startswith("state__"):
                    v = data[k]
                    state[k[len("state__"):]] = v.item() if v.ndim == 0 else v.copy()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, CheckpointError):
            raise
        first = str(exc).split(". ")[0]  # numpy's pickle message goes on about allow_pickle
        raise unreadable(f"{type(exc).__name__}: {first}") from exc
    if not isinstance(meta, dict):
        raise unreadable("its meta is not a JSON object")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path!r} is a version {meta.get('version')} checkpoint; this adjopt reads versions "
                              f"{' and '.join(map(str, READABLE_VERSIONS))}: resume it with the adjopt that wrote it")
    missing = sorted({"method", "nit", "history", "elapsed", "g0", "counts"} - set(meta)) + (["x"] if "x" not in state else [])
    if missing:
        raise unreadable(f"it has no {', '.join(missing)}")
    return state, meta


def identity(problem, method: str, n_params: int) -> dict:
    """What a checkpoint records about its run: problem name, build options (JSON), size, method."""
    meta = getattr(problem, "meta", None) or {}
    options = json.loads(json.dumps(_plain(meta.get("options"))))
    return dict(problem=getattr(problem, "name", None), options=options, n_params=int(n_params), method=method)


def check_identity(path, meta: dict, expected: dict) -> None:
    """CheckpointError naming both values when the checkpoint ``meta`` is of another run than ``expected``."""
    keys = list(IDENTITY)
    if "problem" not in meta:  # written before the problem was recorded (version 1)
        logger.warning("the checkpoint %r was written by an older adjopt without the problem's name and options: only "
                       "the method and the number of parameters are checked; make sure it is of this problem",
                       os.fspath(path))
        keys = ["n_params", "method"]
    wrong = []
    for key in keys:
        old, new = meta.get(key), expected[key]
        if old == new:
            continue
        if key == "options":
            if isinstance(old, dict) and isinstance(new, dict):  # only the options that differ
                differ = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
                old, new = ({k: d[k] for k in differ if k in d} for d in (old, new))
            old, new = json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True)
        wrong.append(IDENTITY[key].format(old, new))
    if wrong:
        raise CheckpointError(f"the checkpoint {os.fspath(path)!r} is of {' and of '.join(wrong)}; resume with the "
                              "problem, options and method of the run that wrote it")


#: a constraint value - upper above this times max(1, |upper|) makes a converged run unsuccessful
FEASIBILITY_TOL = 1e-3


def _violation(problem, x) -> str:
    """'' when every constraint holds at x to :data:`FEASIBILITY_TOL`, else what is violated."""
    worst, text = 0.0, ""
    for i, (fn, upper) in enumerate(problem.constraints or []):
        try:
            v = float(fn.value(x))
        except Exception as exc:  # noqa: BLE001 - a failing constraint is reported, not raised, at the end
            return f"constraint {i} could not be evaluated at the result ({type(exc).__name__}: {exc})"
        excess = (v - float(upper)) / max(1.0, abs(float(upper)))
        if not excess <= FEASIBILITY_TOL and (excess > worst or not math.isfinite(excess)):
            worst = excess if math.isfinite(excess) else math.inf
            text = (f"constraint {i} is violated at the result: value {v:.6g} > upper {float(upper):.6g} (the "
                    "constraints cannot all hold, or the method stopped too early; a min-max's bound z may be "
                    "too small: z_bounds)")
    return text


def forget(fn) -> None:
    """fn.forget() when fn caches states (a reduced functional); nothing otherwise."""
    drop = getattr(fn, "forget", None)
    if callable(drop):
        drop()


def _forget_states(problem) -> None:
    """Drop the cached states of the problem's functionals (a continuation changed their parameter map)."""
    for fn in [problem.functional] + [c for c, _ in (problem.constraints or [])]:
        forget(fn)


def monitored(problem, x) -> dict:
    """What the problem's monitor and continuation add to a history entry."""
    out = {}
    cont = getattr(problem, "continuation", None)
    if cont is not None:
        out.update(_continuation_record(cont))
    monitor = getattr(problem, "monitor", None)
    if monitor is not None:
        extra = monitor(np.array(x, copy=True))
        if not isinstance(extra, dict):
            raise TypeError(f"the problem's monitor must return a dict of numbers, got {type(extra).__name__}")
        for k, v in extra.items():
            k = str(k)
            reserved = _RESERVED | set(out) | {f"{n}_next" for n in out}
            if k in reserved:
                raise ValueError(f"the problem's monitor returned {k!r}, a name the history uses itself "
                                 f"({', '.join(sorted(reserved))}); rename it")
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"the problem's monitor returned {k!r} = {v!r}; its values must be numbers")
            out[k] = float(v)
    return out


#: history names a monitor may not use
_RESERVED = LOOP_NAMES | {"beta", "beta_next"}


def _plain(v):
    """JSON types: tuples and arrays as lists, numpy scalars as numbers, other objects by type (no addresses)."""
    if isinstance(v, dict):
        return {str(k): _plain(w) for k, w in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(w) for w in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else repr(float(v))
    if v is None or isinstance(v, str):
        return v
    return f"<{type(v).__name__}>"


def _json_safe(v):
    if isinstance(v, np.ndarray):
        return [_json_safe(x) for x in v.tolist()]
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    return v


class _Totals:
    """The solver counts of several functionals added up (what a run reports as factorizations and solves)."""

    def __init__(self, stats):
        unique = {id(s): s for s in stats}  # functionals that share a solver share its counts: once each
        self._stats = list(unique.values())

    def _sum(self, name: str) -> int:
        return sum(int(getattr(s, name, 0)) for s in self._stats)

    @property
    def factorizations(self) -> int:
        return self._sum("factorizations")

    @property
    def total_solves(self) -> int:
        return self._sum("total_solves")

    @property
    def newton_iterations(self) -> int:
        return self._sum("newton_iterations")

    @property
    def newton_solves(self) -> int:
        return self._sum("newton_solves")


class _SumTimes(Mapping):
    """The phase seconds of several functionals added up, live (what a run's history splits by phase)."""

    def __init__(self, counters):
        unique = {id(c): c for c in counters}
        self._counters = list(unique.values())

    def _total(self) -> dict:
        out: dict = {}
        for c in self._counters:
            for k, v in c.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def __getitem__(self, key):
        return self._total()[key]

    def __iter__(self):
        return iter(self._total())

    def __len__(self):
        return len(self._total())


def _counted(problem) -> tuple:
    """(stats, times) a run reports: the solver counts and phase seconds of the objective and of the
    constraints (an :class:`~adjopt.optimize.AdaptiveNormalization`'s wrapped functional), each solver and each
    functional once; None where none has them (a volume objective alone)."""
    fns = [problem.functional] + [getattr(c, "functional", c) for c, _ in (problem.constraints or [])]
    stats = [f.stats for f in fns if getattr(f, "stats", None) is not None]
    times = [f.times for f in fns if getattr(f, "times", None) is not None]
    return (None if not stats else stats[0] if len(stats) == 1 else _Totals(stats),
            None if not times else times[0] if len(times) == 1 else _SumTimes(times))


# -- the loop ----------------------------------------------------------------------------
def _write(checkpoint, state: dict, meta: dict) -> None:
    if isinstance(checkpoint, _RankCheckpoint):
        checkpoint.write(state, meta)
    else:
        write_checkpoint(checkpoint, state, meta)


def _stem(path) -> str:
    """A checkpoint path without its ``.npz``: the stem of the per-rank files ``<stem>.rank<r>.npz``."""
    path = os.fspath(path)
    return path[:-4] if path.endswith(".npz") else path


class _RankCheckpoint:
    """The checkpoint of a run whose parameters are in blocks over MPI ranks: one file per rank.

    Rank r writes ``<stem>.rank<r>.npz``, after moving its previous one to
    ``<stem>.rank<r>.prev.npz``. A run killed while the ranks write leaves
    some ranks one iteration ahead; a resume takes the latest iteration that
    every rank has (its current file or the previous one).
    """

    def __init__(self, path, comm):
        path = os.fspath(path)
        stem = _stem(path)
        self.comm = comm
        self.current = f"{stem}.rank{comm.rank}.npz"
        self.previous = f"{stem}.rank{comm.rank}.prev.npz"
        self.path = path

    def write(self, state: dict, meta: dict) -> None:
        if os.path.exists(self.current):
            os.replace(self.current, self.previous)
        write_checkpoint(self.current, state, meta)

    @staticmethod
    def ranks_written(path) -> int:
        """How many ranks wrote checkpoints beside ``path`` (its ``.rank<r>.npz`` or ``.rank<r>.prev.npz``): one
        more than the largest r found, 0 if none."""
        import glob
        import re

        stem = _stem(path)
        found = [re.fullmatch(r"\.rank(\d+)(\.prev)?\.npz", name[len(stem):])
                 for name in glob.glob(glob.escape(stem) + ".rank*.npz")]
        return max((int(m.group(1)) + 1 for m in found if m), default=0)

    @staticmethod
    def _nit(path):
        try:
            return int(read_checkpoint(path)[1]["nit"])
        except (OSError, CheckpointError, KeyError, TypeError, ValueError):
            return None

    def latest_common(self) -> str:
        """The file of this rank at the latest iteration every rank has (collective); CheckpointError if none."""
        mine = {self._nit(p): p for p in (self.previous, self.current) if os.path.exists(p)}
        mine.pop(None, None)
        everyone = self.comm.allgather(sorted(mine))
        common = set(everyone[0]).intersection(*everyone[1:]) if everyone else set()
        if not common:
            written = self.ranks_written(self.path)
            hint = (f"they were written by a run on {written} ranks: resume on {written} ranks (mpiexec -n {written})"
                    if written and written != self.comm.size else "were they written by a run on as many ranks?")
            raise CheckpointError(f"the ranks' checkpoints {self.path!r} (.rank<r>.npz) hold no iteration that every "
                                  f"one of the {self.comm.size} ranks has (iterations {everyone}): {hint}")
        return mine[max(common)]


def run(driver: Driver, x0: np.ndarray, options: Options, counts: dict, callback=None, checkpoint=None,
        resume=None) -> OptimizeResult:
    """Run ``driver`` from ``x0`` (or from the checkpoint ``resume``) until a stopping test holds."""
    stats, times = _counted(driver.problem)
    cont = getattr(driver.problem, "continuation", None)
    if cont is not None and getattr(cont, "may_drop_states", getattr(cont, "drops_states", True)) and \
            not callable(getattr(driver.problem.functional, "forget", None)):
        raise MethodSetupError(f"the problem has a continuation that changes the parameter map, but its functional "
                               f"({type(driver.problem.functional).__name__}) cannot drop its cached states when it "
                               "does (it has no forget()); give it a forget() or run it without the continuation")
    if cont is not None and getattr(driver, "external_loop", False):
        raise MethodSetupError(f"method {driver.name!r} runs scipy's own loop, which cannot restart when the "
                               "continuation changes the problem (beta, a normalization); use 'mma', 'oc', 'lbfgs' "
                               "or 'newton-cg'")
    base_fact = stats.factorizations if stats else 0
    base_solves = stats.total_solves if stats else 0
    t_start = time.perf_counter()
    space = driver.space
    ident = identity(driver.problem, driver.name, space.size(x0))
    if space.distributed:
        # every rank its own block in its own file, the previous iteration's kept beside it (see _rank_files)
        checkpoint = None if checkpoint is None else _RankCheckpoint(checkpoint, space.comm)
        resume = None if resume is None else _RankCheckpoint(resume, space.comm).latest_common()
    if resume is not None:
        error, state, meta = None, None, None
        try:
            state, meta = read_checkpoint(resume)
            meta.setdefault("n_params", int(state["x"].size) if not space.distributed else ident["n_params"])
            check_identity(resume, meta, ident)
            if state["x"].shape != x0.shape:
                raise CheckpointError(f"the checkpoint holds {state['x'].size} parameters, the problem has "
                                      f"{x0.size}" + (" on this rank: was it written by a run on another number of "
                                                      "ranks? Resume with that many" if space.distributed else ""))
        except CheckpointError as exc:
            error = exc
        if space.distributed:  # every rank stops when one cannot resume (else the others would wait for it)
            said = space.comm.allgather(None if error is None else str(error))
            first = next(((r, e) for r, e in enumerate(said) if e is not None), None)
            if first is not None and error is None:
                error = CheckpointError(f"rank {first[0]}: {first[1]}")
        if error is not None:
            raise error
        nit, history, elapsed0, g0 = meta["nit"], meta["history"], meta["elapsed"], meta["g0"]
        prev = meta["counts"]
        for k in counts:
            counts[k] += prev.get(k, 0)
        driver.warnings = list(meta.get("warnings", []))
        if (cont is None) != ("continuation" not in meta):
            raise CheckpointError(
                f"the checkpoint {os.fspath(resume)!r} was written by a run "
                f"{'with' if cont is None else 'without'} a continuation (beta, normalization) and this problem has "
                f"{'none' if cont is None else 'one'}: build the problem with the same options as that run")
        if cont is not None:
            cont.restore(meta["continuation"])
        finished = meta.get("finished")
        logger.info("%s: resumed from %s at iteration %d (f = %.10g)%s", driver.name, os.fspath(resume), nit,
                    state["f"], ": that run had finished" if finished else "")
    else:
        finished = None
        if cont is not None:
            cont.reset()
            _forget_states(driver.problem)
        state = driver.start(x0)
        nit, elapsed0 = 0, 0.0
        g0 = driver.stationarity(state)
        history = [dict(nit=0, f=float(state["f"]), stationarity=g0, step=0.0, **dict(counts),
                        **monitored(driver.problem, state["x"]))]
        prev = {}
        logger.info("%s: start, f = %.10g, stationarity %.3g", driver.name, state["f"], g0)
        if callback is not None and getattr(callback, "wants_start", False):  # the CLI's table shows iteration 0
            callback(dict(history[0], x=state["x"].copy()))

    def elapsed():
        return elapsed0 + time.perf_counter() - t_start

    def totals():
        fact = prev.get("factorizations", 0) + ((stats.factorizations - base_fact) if stats else 0)
        solves = prev.get("solves", 0) + ((stats.total_solves - base_solves) if stats else 0)
        return fact, solves

    gtarget = max(options.gatol, options.gtol * g0)
    nit_box = [nit]
    clock = [time.perf_counter(), dict(times) if times is not None else {}]
    newton = [getattr(stats, "newton_iterations", 0)]

    def phases() -> dict:
        """Seconds of the iteration that just ended, by phase; "update" is the driver's own work. For a
        nonlinear state equation also the Newton steps the iteration's state solves took."""
        now = time.perf_counter()
        total = now - clock[0]
        out = {}
        if times is not None:
            out = {k: v - clock[1].get(k, 0.0) for k, v in times.items() if v - clock[1].get(k, 0.0) > 0}
            clock[1] = dict(times)
        out["update"] = max(total - sum(out.values()), 0.0)
        clock[0] = now
        record = dict(time=total, phases=out)
        if getattr(stats, "newton_solves", 0):
            record["newton_iterations"] = stats.newton_iterations - newton[0]
            newton[0] = stats.newton_iterations
        return record

    budget = [False]  # the run stopped at maxiter or max_time: a resume with a larger budget goes on

    def before_iteration():
        """(stop, success, message) from the tests that need no new iterate."""
        gnorm = driver.stationarity(state)
        # with a continuation that can still go on, a stationary point raises beta (after_iteration), never stops
        if gnorm <= gtarget and (cont is None or getattr(cont, "at_max", True)):
            return True, True, f"stationarity {gnorm:.3g} <= {gtarget:.3g} (gtol {options.gtol:g}, gatol {options.gatol:g})"
        if nit_box[0] >= options.maxiter:
            budget[0] = True
            return True, False, f"maximum number of iterations ({options.maxiter}) reached"
        if options.max_time is not None and elapsed() >= options.max_time:
            budget[0] = True
            return True, False, f"wall-time limit ({options.max_time:g} s) reached"
        return False, False, ""

    def checkpoint_meta(**extra) -> dict:
        fact, solves = totals()
        if cont is not None:
            extra["continuation"] = cont.state()
        return dict(version=CHECKPOINT_VERSION, **ident, nit=nit_box[0], history=history, elapsed=elapsed(), g0=g0,
                    counts=dict(counts, factorizations=fact, solves=solves), warnings=driver.warnings, **extra)

    def after_iteration(x_old, f_old, record):
        """Book-keeping of one finished iteration: history, log, continuation, checkpoint, callback, step tests."""
        nit_box[0] += 1
        nit = nit_box[0]
        step = space.max(np.abs(state["x"] - x_old), initial=0.0)
        gnorm = driver.stationarity(state)
        entry = dict(nit=nit, f=float(state["f"]), stationarity=gnorm, step=step, **dict(counts))
        entry.update({k: _json_safe(v) for k, v in (record or {}).items()})
        entry.update(monitored(driver.problem, state["x"]))
        entry.update(phases())
        history.append(entry)
        logger.info("%s: iteration %d, f = %.10g, stationarity %.3g, step %.3g", driver.name, nit, state["f"], gnorm, step)
        if options.ftol > 0 and abs(f_old - float(state["f"])) <= options.ftol * max(1.0, abs(float(state["f"]))):
            outcome = True, True, f"relative change of f below ftol {options.ftol:g}"
        elif options.xtol > 0 and step <= options.xtol:
            outcome = True, True, f"step {step:.3g} <= xtol {options.xtol:g} (max-norm)"
        else:
            outcome = None
        if cont is not None:
            converged = outcome is not None or gnorm <= gtarget
            if cont.step(converged, x=np.array(state["x"], copy=True)):
                # the same x is another design (or another constraint) now: evaluate the method again there;
                # the entry says so (its f is at the old beta, the state's from now on at the new one)
                if getattr(cont, "drops_states", True):
                    _forget_states(driver.problem)
                driver.refresh(state)
                entry.update({f"{k}_next": v for k, v in _continuation_record(cont).items()})
                entry.update(f_next=float(state["f"]))
                outcome = None
        if checkpoint is not None:
            _write(checkpoint, state, checkpoint_meta())
        if callback is not None:
            callback(dict(entry, x=state["x"].copy()))
        return outcome if outcome is not None else before_iteration()

    if finished:
        # a checkpoint of a run that had ended: resuming it is asking for its result, not for one more step
        success, message = bool(finished["success"]), str(finished["message"])
    elif getattr(driver, "external_loop", False):
        # the driver runs a loop of its own (scipy) and reports each iteration through `report`
        outcome = {}

        def report(x_old, f_old, record=None) -> bool:
            stop, ok, msg = after_iteration(x_old, f_old, record)
            if stop:
                outcome.update(success=ok, message=msg)
            return stop

        stop, success, message = before_iteration()
        if not stop:
            try:
                driver.solve(state, options.maxiter - nit_box[0], report)
                success, message = outcome.get("success", False), outcome.get("message", "")
            except Stop as st:
                success, message = outcome.get("success", st.success), outcome.get("message", st.message)
    else:
        while True:
            stop, success, message = before_iteration()
            if stop:
                break
            f_old, x_old = float(state["f"]), np.array(state["x"], copy=True)
            try:
                record = driver.iterate(state)
            except Stop as st:
                success, message = st.success, st.message
                break
            stop, success, message = after_iteration(x_old, f_old, record)
            if stop:
                break
    if success and not finished:
        violated = _violation(driver.problem, state["x"])
        if violated:
            success = False
            message = f"{message}; but {violated}"
            driver.warnings.append(f"{driver.name}: {violated}")
    if checkpoint is not None and not finished and not budget[0]:
        # the end of a run that stopped by itself (converged, or could not go on) goes into the checkpoint
        # too, so that a resume of it returns this result instead of taking another step
        _write(checkpoint, state, checkpoint_meta(finished=dict(success=bool(success), message=message)))
    nit = nit_box[0]
    fact, solves = totals()
    result = OptimizeResult(
        x=np.array(state["x"], copy=True), fun=float(state["f"]), jac=np.array(state["g"], copy=True), nit=nit,
        success=success, message=message, method=driver.name, nfev=counts["nfev"], njev=counts["njev"],
        nhessp=counts["nhessp"], factorizations=fact, solves=solves, time=elapsed(),
        stationarity=driver.stationarity(state), history=history, warnings=list(driver.warnings),
    )
    (logger.info if success else logger.warning)("%s: %s", driver.name, message)
    return result
