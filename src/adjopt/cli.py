"""The ``adjopt`` command: demo, list, run, check and bench on gallery problems or your own problem file.

    adjopt demo                                   # poisson_inversion, results in ./adjopt-results/demo
    adjopt list                                   # the gallery problems, their options and defaults
    adjopt run poisson_inversion --n 128 --alpha 3 --method newton-cg --out results/pi
    adjopt run my_problem.py --method lbfgs       # any file with a build(**options) -> adjopt.Problem
    adjopt check topology_compliance --nelx 30    # Taylor tests and Hessian symmetry; exit 1 if a rate is off
    adjopt bench poisson_inversion --sizes 32 64 128
    adjopt uq poisson_inversion --regularization bilaplacian --rank 80   # Laplace posterior at the MAP point

Exit status: 0 success, 1 a check failed or the run did not converge, 2 bad
input (unknown problem, option, solver or method, a bad --gtol/--max-iter, a
problem file that fails to import or to build, an output folder that exists,
cannot be written or is in use by another run, a damaged checkpoint or one
of another run, a full disk): one line on stderr (--debug adds the
traceback); 130 interrupted (Ctrl-C; continue with --resume).

A run locks its output folder (``<out>/.adjopt.lock``) so that a second run
into it stops at once, removes the temporary files a killed run left there,
and removes the folder again when it created it and fails before writing
anything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import AdjoptError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs do not lock their folder
    fcntl = None

logger = logging.getLogger("adjopt.cli")

#: the lock file of a run's output folder (not a result; does not make the folder "not empty")
LOCK_FILE = ".adjopt.lock"

DEMO = dict(problem="poisson_inversion", options=dict(n=96), out=os.path.join("adjopt-results", "demo"))


class UsageError(Exception):
    """Bad command-line input: reported without a traceback, exit status 2."""


# -- the gallery ----------------------------------------------------------------------------
def gallery_dir() -> Path:
    """The folder of gallery problems: $ADJOPT_GALLERY, else problems/ of the checkout adjopt runs from, else
    the installed ``problems`` package."""
    env = os.environ.get("ADJOPT_GALLERY")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "problems"
    if checkout.is_dir():
        return checkout
    spec = importlib.util.find_spec("problems")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "poisson_inversion.py").is_file():
            return Path(loc)
    return checkout


def gallery() -> dict[str, Path]:
    """{name: file} of the gallery problems (modules with a build() function)."""
    folder = gallery_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_") and "def build(" in p.read_text()}


def load_module(spec: str):
    """The module of a gallery name or a path to a .py file; UsageError if unknown, exit 2 on import errors."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise UsageError(f"no problem file {spec!r}")
        name = f"adjopt_user_problem_{path.stem}"
    else:
        known = gallery()
        if spec not in known:
            raise UsageError(f"unknown problem {spec!r}; the gallery has: {', '.join(known) or '(none found)'} "
                             "(or give a path to a .py file with a build() function)")
        path, name = known[spec], spec
    sys.path.insert(0, str(path.parent))  # gallery modules import their siblings
    try:
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
    except Exception:
        sys.stderr.write(f"adjopt: the problem file {path} raised while it was imported:\n{traceback.format_exc()}")
        raise SystemExit(2) from None
    if not callable(getattr(module, "build", None)):
        raise UsageError(f"{path} has no build() function; a problem file defines build(**options) -> adjopt.Problem")
    return module


def build_options(module) -> dict:
    """{name: default} of build()'s keyword options."""
    return {k: p.default for k, p in inspect.signature(module.build).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def distributed_options(module) -> dict:
    """{name: default} of the keyword options that only ``build_distributed`` takes (``--backend petsc``), such as
    ``partition``; not the communicator or the solver options."""
    build = getattr(module, "build_distributed", None)
    if build is None:
        return {}
    serial = build_options(module)
    return {k: p.default for k, p in inspect.signature(build).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in serial and k != "comm"}


def _convert(name: str, text: str, default):
    """The value of --name text, typed like the default."""
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (tuple, list)):
            return type(default)(float(v) for v in text.split(","))
        if default is None:
            for cast in (int, float):
                try:
                    return cast(text)
                except ValueError:
                    pass
            return None if text.lower() == "none" else text
        return text
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        raise UsageError(f"option --{name} takes a {kind} (default {default!r}), got {text!r}") from None


def split_options(tokens: list[str], problem_opts: dict, method_opts: dict) -> tuple[dict, dict]:
    """--name value pairs into (problem options, method options), typed and validated."""
    prob, meth = {}, {}
    pairs, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and "=" in tok:  # --name=value
            pairs.append(tuple(tok.split("=", 1)))
            i += 1
            continue
        if not tok.startswith("--") or i + 1 >= len(tokens):
            raise UsageError(f"expected --option value pairs after the problem, got {' '.join(tokens[i:])!r}")
        if tokens[i + 1].startswith("--"):
            raise UsageError(f"option {tok} has no value (the next word, {tokens[i + 1]}, is another option); give it "
                             f"one: {tok} VALUE or {tok}=VALUE")
        pairs.append((tok, tokens[i + 1]))
        i += 2
    seen = set()
    for tok, value in pairs:
        name = tok[2:].replace("-", "_")
        if name in seen:
            raise UsageError(f"option --{tok[2:]} is given twice; give it once")
        seen.add(name)
        if name in problem_opts:
            prob[name] = _convert(name, value, problem_opts[name])
        elif name in method_opts:
            meth[name] = _convert(name, value, method_opts[name])
        else:
            raise UsageError(f"unknown option --{tok[2:]}; the problem's options are "
                             f"{', '.join('--' + k for k in problem_opts) or '(none)'}; the method's are "
                             f"{', '.join('--' + k for k in method_opts) or '(none)'}")
    return prob, meth


def make_problem(module, options: dict):
    """module.build(**options); UsageError when it raises or returns something other than an adjopt.Problem."""
    import adjopt

    stem = Path(module.__file__).stem
    call = f"{stem}.build({', '.join(f'{k}={v!r}' for k, v in options.items())})"
    try:
        problem = module.build(**options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{call} rejected the options: {exc}") from exc
    except OSError as exc:  # a missing or unreadable mesh file, say
        raise UsageError(f"{call} could not read a file ({type(exc).__name__}: {exc}); check the path") from exc
    except Exception as exc:
        raise UsageError(f"{call} raised {type(exc).__name__}: {exc}; fix the problem file {module.__file__} or its "
                         "options (--debug shows the traceback)") from exc
    except SystemExit as exc:
        raise UsageError(f"{call} called sys.exit({exc.code!r}) instead of returning an adjopt.Problem; fix the "
                         f"problem file {module.__file__}") from exc
    if not isinstance(problem, adjopt.Problem):
        raise UsageError(f"{stem}.build returned a {type(problem).__name__}, not an adjopt.Problem; build(**options) "
                         "must return adjopt.Problem(functional, p0, ...)")
    return problem


# -- progress --------------------------------------------------------------------------------
class Progress:
    """The per-iteration callback: a rich line per iteration and a bar, or JSON lines, or nothing."""

    #: the stationarity column's name per method (what ``stationarity`` measures there)
    MEASURES = {"oc": "change", "mma": "KKT"}
    #: the first iterations always printed; later ones every ``every``-th (long runs)
    FIRST_LINES = 10

    def __init__(self, maxiter: int, quiet: bool = False, log_json=None, title: str = "", method: str = "",
                 extras=()):
        self.quiet = quiet
        #: what the problem's monitor and continuation record (grey level, beta): a column each
        self.extras = list(extras)
        self.measure = self.MEASURES.get(method, "|g|")
        self.show_step = method != "oc"  # OC's step is its change: one column
        self.show_cg = method not in ("oc", "mma")  # no Krylov inner iterations there
        self.every = max(1, maxiter // 200)
        self.log_json = log_json
        self.t0 = time.perf_counter()
        self.maxiter = maxiter
        self.last = None
        self.bar = None
        self.march_task = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.console = Console(stderr=False)
            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=self.console, transient=True)
            self.task = self.bar.add_task(title, total=maxiter)
            step = f" {'step':>9}" if self.show_step else ""
            extra = "".join(f" {k:>{self._width(k)}}" for k in self.extras)
            cg = f" {'CG':>5}" if self.show_cg else ""
            # soft_wrap: a row wider than the terminal runs on instead of breaking its columns over two lines
            self.console.print(f"{'it':>5} {'J':>16} {self.measure:>10}{step}{cg} {'solves':>7} "
                               f"{'total s':>8}{extra}", soft_wrap=True)
            if self.every > 1:
                self.console.print(f"(iterations 0-{self.FIRST_LINES}, then one line per {self.every} iterations)")

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def march(self, phase: str, step: int, n_steps: int) -> None:
        """A time-dependent functional's ``progress``: a second bar for the running march (forward, reverse),
        redrawn about 200 times per march."""
        if self.bar is None:
            return
        if step != n_steps and step % max(n_steps // 200, 1):
            return
        if self.march_task is None:
            self.march_task = self.bar.add_task(f"{phase} march", total=n_steps)
        self.bar.update(self.march_task, description=f"{phase} march", completed=step, total=n_steps)

    @contextlib.contextmanager
    def marches(self, functional):
        """Show the marches of ``functional`` (a time-dependent one without a progress callback of its own)."""
        from .transient import TransientReducedFunctional

        hook = isinstance(functional, TransientReducedFunctional) and functional.progress is None \
            and self.bar is not None
        if hook:
            functional.progress = self.march
        try:
            yield
        finally:
            if hook:
                functional.progress = None

    @staticmethod
    def _width(name: str) -> int:
        """An extra column's width: its name's, at least 6."""
        return max(6, len(name))

    def __call__(self, info: dict, solves: int | None = None):
        line = dict(nit=info["nit"], f=info["f"], stationarity=info["stationarity"], step=info.get("step", math.nan),
                    cg=info.get("cg_iterations"), solves=solves, time=time.perf_counter() - self.t0,
                    **{k: info.get(k) for k in self.extras})
        self.last = line
        if self.log_json is not None:
            self.log_json.write(json.dumps(line) + "\n")
            self.log_json.flush()
        if self.bar is not None:
            cg = "" if line["cg"] is None else str(line["cg"])
            cg = f" {cg:>5}" if self.show_cg else ""
            solves = "" if line["solves"] is None else str(line["solves"])
            step = f" {line['step']:>9.3g}" if self.show_step else ""
            if line["nit"] <= self.FIRST_LINES or line["nit"] % self.every == 0:
                extra = "".join(f" {line[k]:>{self._width(k)}.3g}" if isinstance(line[k], (int, float))
                                else f" {'':>{self._width(k)}}" for k in self.extras)
                self.bar.console.print(f"{line['nit']:>5} {line['f']:>16.10g} {line['stationarity']:>10.3g}{step}"
                                       f"{cg} {solves:>7} {line['time']:>8.2f}{extra}", soft_wrap=True)
            self.bar.update(self.task, completed=min(line["nit"], self.maxiter))


# -- subcommands --------------------------------------------------------------------------------
def _method_defaults(method: str) -> dict:
    from .optimize import methods

    known = methods()
    if method not in known:
        raise UsageError(f"unknown method {method!r}; the methods are {', '.join(sorted(known))}")
    return dict(known[method].defaults)


class _FolderLock:
    """An exclusive lock on ``<out>/.adjopt.lock`` for one run (released when the process ends, even by SIGKILL).

    ``release(failed=True)`` also removes the folders this run created, when they are still empty.
    """

    def __init__(self, out: Path, created: list[Path]):
        self.path, self.created, self.fd = out / LOCK_FILE, created, None
        while fcntl is not None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UsageError(f"cannot create {self.path} ({exc.strerror}); choose another --out") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UsageError(f"another adjopt run is writing to {out} (it holds {self.path}); wait for it to finish "
                                 "or choose another --out") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)  # the run that held it removed the file meanwhile: lock the new one

    def release(self, failed: bool = False) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # before the unlock: whoever opened this file sees that it is gone
            os.close(self.fd)
            self.fd = None
        if failed:
            _remove_empty(self.created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders (innermost first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _prepare_out(out: Path, force: bool, resume: bool, resumable: bool = True, clear: bool = False) -> _FolderLock:
    """Create and lock the output folder; remove a killed run's temporaries; refuse a non-empty folder (unless
    --force or --resume); with ``clear`` and --force (a new run), remove the files an earlier run wrote."""
    from .results import remove_temporaries

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    created = list(itertools.takewhile(lambda p: not p.exists(), (out, *out.parents)))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {out} ({exc.strerror}); choose another --out") from exc
    lock = None
    try:
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"the output folder {out} is not writable; choose another --out or fix its permissions")
        lock = _FolderLock(out, created)
        remove_temporaries(out)
        if any(p.name != LOCK_FILE for p in out.iterdir()) and not (force or resume):
            raise UsageError(f"the output folder {out} exists and is not empty; pass --force to overwrite it, "
                             + ("--resume to continue its run, " if resumable else "") + "or choose another --out")
        if clear and force and not resume:
            # an overwritten folder must not mix the old run's files with the new one's if the new run is killed
            from .results import RESULT_FILES, UQ_FILES

            parallel = [p.name for p in out.glob("checkpoint.rank*.npz")] + [p.name for p in out.glob("fields_*.vtu")]
            for name in RESULT_FILES + UQ_FILES + ("checkpoint.npz", "fields.pvtu", *parallel):
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
    except BaseException:
        if lock is not None:
            lock.release(failed=True)
        else:
            _remove_empty(created)
        raise
    return lock


def _solver_name(text: str) -> str:
    """argparse type of --solver: a name, not an empty string (which would silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("needs a solver name (leave --solver out for the default, auto)")
    return text.strip()


def _check_solver(name: str) -> None:
    """UsageError for a --solver name that no backend has."""
    from .solvers import ALIASES, backends

    names = sorted({"auto", *backends(), *ALIASES})
    if name.lower() == "gmg":
        raise UsageError("--solver gmg needs the grid: only problems whose build() takes a solver option "
                         "(topology_compliance) can use it")
    if name.lower() not in names:
        raise UsageError(f"unknown solver {name!r}; the solvers are {', '.join(names)} (and gmg for "
                         "topology_compliance, whose build() makes it on its grid)")


def _stopping_tests(args, stop: dict) -> None:
    """UsageError for a stopping test out of range: --max-iter -3, --gtol -1, or a bad RUN_DEFAULTS."""
    from .optimize import Options

    if args.max_iter is not None and args.max_iter < 0:
        raise UsageError(f"--max-iter must be a whole number >= 0, got {args.max_iter}")
    for key in ("gtol", "xtol"):
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{key} must be a finite number >= 0, got {value}")
    try:
        Options(**stop)
    except ValueError as exc:
        raise UsageError(f"the problem file's RUN_DEFAULTS: {exc}; fix them, or override them with --max-iter, --gtol "
                         "or --xtol") from exc


def _compile_notice(args) -> None:
    """Say so on stderr when numba starts compiling (a kernel not in its cache yet), unless -q."""
    from ._compile import announce_compiles

    if getattr(args, "backend", "serial") == "petsc":
        try:
            from mpi4py import MPI

            if MPI.COMM_WORLD.rank != 0:
                return  # rank 0 says it for every rank
        except ImportError:
            pass
    if not getattr(args, "quiet", False) and not getattr(_compile_notice, "registered", False):
        _compile_notice.registered = announce_compiles(lambda text: print(text, file=sys.stderr, flush=True))


def cmd_run(args, extra: list[str], name: str | None = None, preset: dict | None = None) -> int:
    from .solvers import make_solver

    petsc = getattr(args, "backend", "serial") == "petsc"
    if petsc and args.solver:
        raise UsageError("--solver picks a serial solver; with --backend petsc choose the Krylov method and "
                         "preconditioner with PETSc options, e.g. PETSC_OPTIONS='-adjopt_ksp_type gmres -adjopt_pc_type bjacobi'")
    module = load_module(name or args.problem)
    run_defaults = dict(getattr(module, "RUN_DEFAULTS", {}))
    method = args.method or run_defaults.pop("method", None)
    run_defaults.pop("method", None)
    popts = build_options(module)
    only_distributed = distributed_options(module) if petsc else {}
    if not petsc:
        asked = sorted({t[2:].split("=", 1)[0].replace("-", "_") for t in extra if t.startswith("--")}
                       & set(distributed_options(module)))
        if asked:
            raise UsageError(f"{', '.join('--' + k for k in asked)} is an option of the rank-by-rank build: add "
                             "--backend petsc (and run under mpiexec)")
    popts = {**popts, **only_distributed}
    prob_opts, meth_opts = split_options(extra, popts, _method_defaults(method) if method else {})
    prob_opts = {**(preset or {}), **prob_opts}
    stop = {k: run_defaults.pop(k) for k in list(run_defaults) if k in ("gtol", "gatol", "xtol", "ftol", "maxiter")}
    if args.max_iter is not None:
        stop["maxiter"] = args.max_iter
    for key in ("gtol", "xtol"):
        if getattr(args, key) is not None:
            stop[key] = getattr(args, key)
    stop.setdefault("maxiter", 200)
    _stopping_tests(args, stop)
    # a build(solver=...) makes its own solver (geometric multigrid needs the grid); else it is replaced below
    solver_by_build = bool(args.solver) and "solver" in popts
    if solver_by_build:
        prob_opts["solver"] = args.solver
    elif args.solver:
        _check_solver(args.solver)
    _compile_notice(args)
    problem = None
    if petsc:
        _quiet_other_ranks()
        problem = _build_distributed(module, prob_opts)
        given = sorted(k for k in prob_opts if k in only_distributed)
        if problem is None and given:
            raise UsageError(f"{', '.join('--' + k for k in given)} applies to a rank-by-rank build, which these options "
                             "do not allow (the reason is logged above); leave it out")
    if problem is None:
        problem = make_problem(module, prob_opts)
    if method is None:
        method = "oc" if len(problem.constraints) == 1 else ("mma" if problem.constraints else "lbfgs")
        _, meth_opts = split_options(extra, popts, _method_defaults(method))
    method_defaults = _method_defaults(method)
    meth_opts = {**{k: v for k, v in run_defaults.items() if k in method_defaults}, **meth_opts}
    if args.solver and not solver_by_build:
        try:
            problem.functional.solver = make_solver(args.solver)
        except ImportError as exc:  # MissingBackendError: its message says what to install
            raise UsageError(str(exc)) from exc
        problem.functional.cache.clear()
    comm = None
    if petsc:
        problem, comm = _distribute(problem, args)
        problem = _blocks_if_possible(problem, method)
    out = Path(args.out or os.path.join("adjopt-results", problem.name))
    args.out_used = out  # for the --resume hint after Ctrl-C
    lock = None
    if comm is None:
        lock = _prepare_out(out, args.force, args.resume, clear=True)
    else:
        err = None
        if comm.rank == 0:  # under MPI only rank 0 writes files and prints
            try:
                lock = _prepare_out(out, args.force, args.resume, clear=True)
            except UsageError as exc:
                err = str(exc)
        err = comm.bcast(err)
        if err:
            raise UsageError(err)
    finished = False
    try:
        code = _run_in(out, args, problem, method, stop, meth_opts, comm)
        finished = True
        return code
    finally:
        if lock is not None:
            lock.release(failed=not finished)


def _run_in(out: Path, args, problem, method: str, stop: dict, meth_opts: dict, comm) -> int:
    """Optimize into the locked folder ``out``, write the results and print the summary; exit status."""
    import adjopt

    from .optimize import CheckpointError
    from .results import ResultsWriteError, write_results

    rank0 = comm is None or comm.rank == 0
    checkpoint = out / "checkpoint.npz"
    blocks = getattr(getattr(problem.functional, "space", None), "distributed", False)
    # parameters in blocks: every rank writes its own checkpoint (<stem>.rank<r>.npz beside checkpoint.npz)
    from .optimize.base import _RankCheckpoint

    # a rank killed while it rotated its files may have only its .prev.npz: that counts (the resume takes the
    # latest iteration every rank has)
    ranks_written = _RankCheckpoint.ranks_written(checkpoint)
    exists = ranks_written > 0 if blocks else checkpoint.exists()
    if comm is not None:  # what the ranks see of one folder, decided together
        exists = bool(comm.allreduce(bool(exists), op=_mpi_max()))
    if args.resume and not blocks and not exists and ranks_written:
        raise UsageError(f"{out} holds the checkpoints of a run with its parameters in blocks over {ranks_written} "
                         f"MPI ranks (checkpoint.rank<r>.npz): resume it as it ran, under mpiexec -n {ranks_written} "
                         "with --backend petsc and the same method")
    resume = checkpoint if args.resume and exists else None
    if args.resume and resume is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", out)
    log_json = None
    if args.log_json and rank0:
        try:
            log_json = open(args.log_json, "a")
        except OSError as exc:
            raise UsageError(f"cannot open the --log-json file {args.log_json} ({exc.strerror}); create its folder or "
                             "choose another file") from exc
    try:
        from .optimize.base import monitored

        extras = list(monitored(problem, problem.p0)) if rank0 else []
        with Progress(stop["maxiter"], quiet=args.quiet or not rank0, log_json=log_json,
                      title=f"{problem.name} / {method}", method=method, extras=extras) as prog, \
                prog.marches(problem.functional):
            stats = getattr(problem.functional, "stats", None)

            def callback(info):
                prog(info, solves=None if stats is None else stats.total_solves)

            callback.wants_start = True  # the table starts with iteration 0 (the starting point)

            result = adjopt.minimize(problem, method=method, checkpoint=checkpoint if rank0 or blocks else None, resume=resume,
                                     callback=callback, **stop, **meth_opts)
    except CheckpointError as exc:
        raise UsageError(f"{exc}; to start afresh instead, run without --resume and with --force (or choose another "
                         "--out)") from exc
    except OSError as exc:
        if exc.filename != os.fspath(checkpoint):  # not the checkpoint writer's: a crash of the problem's code
            raise
        raise UsageError(f"cannot write the checkpoint {checkpoint} ({exc.strerror or exc}); free some disk space, "
                         "then continue with --resume") from exc
    finally:
        if log_json is not None:
            log_json.close()
    pieces = None
    if comm is not None:
        pieces = _write_pieces(out, problem, result.x, comm)
        # state and adjoint at the result are collective: every rank computes them, then rank 0 writes
        fields = _Fields(problem.functional, result.x)
        order = _file_order(problem, comm)
        fields.reorder(_free_order(problem, comm))
        if blocks:  # the result's vectors on rank 0 only, for result.npz (bounds and constraints are not written)
            F = problem.functional
            x_full, g_full, p0 = F.gather(result.x), F.gather(result.jac), F.gather(problem.p0)
            if not rank0:
                return 0 if result.success else 1
            result = replace(result, x=x_full, jac=g_full)
            problem = replace(problem, functional=fields, p0=p0, bounds=None, constraints=[])
        else:
            problem = replace(problem, functional=fields)
        if not rank0:
            return 0 if result.success else 1
        if order is not None:  # a mesh file's parts: result.npz in the file's node order, as a serial run writes it
            result = replace(result, x=_to_file(result.x, order), jac=_to_file(result.jac, order))
            problem = replace(problem, p0=_to_file(problem.p0, order), bounds=None)
    try:
        written = write_results(out, problem, result, force=True, pictures=not args.no_pictures)
    except ResultsWriteError as exc:
        raise UsageError(f"{exc}; the checkpoint is kept: once that is fixed, run again with --resume to write the "
                         "results") from exc
    if pieces is not None:
        written[pieces.name] = pieces
    summary = str(result)
    if args.quiet:
        print(summary.splitlines()[0])
    else:
        print(summary)
        print(f"results in {out}/: " + ", ".join(sorted(Path(p).name for p in written.values())))
    return 0 if result.success else 1


def _free_order(problem, comm):
    """For a problem built on a mesh file's parts whose meta has ``free_source_nodes`` (the file's node of each
    free dof a rank owns, in those dofs' order): the serial position of every global free dof (the file's free
    nodes in ascending order, the numbering of the serial build's state), on rank 0; None elsewhere and for
    other problems. Collective."""
    meta = problem.meta if isinstance(problem.meta, dict) else {}
    mine = meta.get("free_source_nodes")
    if not comm.allreduce(mine is not None, op=_mpi_min()):
        return None
    got = comm.gather(np.asarray(mine), root=0)
    if comm.rank:
        return None
    src = np.concatenate(got)
    order = np.empty(src.size, dtype=np.int64)
    order[np.argsort(src, kind="stable")] = np.arange(src.size)
    return order


def _file_order(problem, comm):
    """For a problem built on a mesh file's parts (adjopt.mesh.read_part) with one parameter per node: the file's
    node number of every global parameter, on rank 0 (None elsewhere and for other problems). Collective."""
    meta = problem.meta if isinstance(problem.meta, dict) else {}
    part = meta.get("part")
    source = getattr(part, "source_nodes", None)
    nodal = source is not None and getattr(problem.functional, "n_global",
                                           getattr(problem.functional, "n_params", -1)) == part.n_global_nodes
    if not comm.allreduce(bool(nodal), op=_mpi_min()):
        return None
    got = comm.gather(np.asarray(source[:part.n_owned]), root=0)
    return None if comm.rank else np.concatenate(got)


def _mpi_min():
    from mpi4py import MPI

    return MPI.MIN


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX


def _to_file(v, order):
    """A vector in the distributed numbering, in the file's order (v[i] at order[i])."""
    if v is None or np.shape(v) != order.shape:
        return v
    out = np.empty_like(np.asarray(v))
    out[order] = v
    return out


class _Fields:
    """What the results writer asks of a functional, evaluated at x by every rank of a distributed one."""

    def __init__(self, F, x):
        self.n_params, self.stats = getattr(F, "n_global", F.n_params), F.stats
        self._fields = {}
        for what in ("state", "adjoint"):
            try:
                self._fields[what] = (getattr(F, what)(x), None)
            except Exception as exc:  # the same failure on every rank; the writer records it
                self._fields[what] = (None, exc)

    def reorder(self, order) -> None:
        """The state and adjoint in the serial numbering (entry i goes to order[i]); None leaves them."""
        if order is None:
            return
        for what, (value, exc) in self._fields.items():
            if value is not None:
                self._fields[what] = (_to_file(value, order), exc)

    def _get(self, what):
        value, exc = self._fields[what]
        if exc is not None:
            raise exc
        return value

    def state(self, p):
        return self._get("state")

    def adjoint(self, p):
        return self._get("adjoint")


def _build_distributed(module, options: dict):
    """module.build_distributed(**options) under --backend petsc: every rank builds only its part.

    ``None`` (the caller builds the whole problem on every rank, then
    distributes it) when the module has no ``build_distributed``, when an
    option is one it does not take, or when it raises NotImplementedError for
    these options (a case or regularization it does not build rank by rank);
    the reason is logged.
    """
    import inspect

    import adjopt

    stem = Path(module.__file__).stem
    build = getattr(module, "build_distributed", None)
    if build is None:
        logger.info("%s has no build_distributed: every rank builds the whole problem", stem)
        return None
    accepted = inspect.signature(build).parameters
    others = sorted(k for k in options if k not in accepted)
    if others:
        logger.warning("%s: every rank builds the whole problem (build_distributed does not take %s)", stem,
                       ", ".join(f"--{k.replace('_', '-')}" for k in others))
        return None
    call = f"{stem}.build_distributed({', '.join(f'{k}={v!r}' for k, v in options.items())})"
    try:
        from .backends.petsc import PetscOptionsError  # a clear error when PETSc is missing
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    from .errors import AdjoptError

    try:
        problem = build(**options)
    except NotImplementedError as exc:
        logger.warning("%s: every rank builds the whole problem (%s)", stem, exc)
        return None
    except PetscOptionsError as exc:  # PETSC_OPTIONS, not the problem's options
        raise UsageError(f"the PETSc solver options were refused: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{call} rejected the options: {exc}") from exc
    except AdjoptError as exc:  # a solve of the build (the synthetic data) failed: the solver, not the problem file
        raise UsageError(f"{call} failed in a solve: {exc}") from exc
    except OSError as exc:  # a missing mesh file, say: one line on every rank, as the serial build gives
        raise UsageError(f"{call} could not read a file ({type(exc).__name__}: {exc}); check the path") from exc
    except Exception as exc:
        raise UsageError(f"{call} raised {type(exc).__name__}: {exc}; fix the problem file {module.__file__} or its "
                         "options (--debug shows the traceback)") from exc
    if not isinstance(problem, adjopt.Problem):
        raise UsageError(f"{stem}.build_distributed returned a {type(problem).__name__}, not an adjopt.Problem")
    logger.info("%s built rank by rank (no rank holds the whole mesh or operator)", stem)
    return problem


def _blocks_if_possible(problem, method: str):
    """A problem built rank by rank with its parameters in blocks over the ranks when ``method`` runs on blocks
    (OC, MMA, L-BFGS, Newton-CG); else unchanged (p replicated on every rank)."""
    from .backends.petsc import in_blocks
    from .optimize.minimize import methods

    meta = problem.meta if isinstance(problem.meta, dict) else {}
    if not meta.get("distributed") or not getattr(methods().get(method), "takes_blocks", False):
        return problem
    try:
        problem = in_blocks(problem)
    except NotImplementedError as exc:
        logger.info("parameters replicated on every rank: %s", exc)
        return problem
    logger.info("parameters in blocks over the ranks (no rank holds the whole p)")
    return problem


def _write_pieces(out: Path, problem, x, comm):
    """fields.pvtu and one fields_<rank>.vtu per rank, for a problem built rank by rank (collective); else None."""
    from .mesh import write_pvtu

    meta = problem.meta if isinstance(problem.meta, dict) else {}
    local, part = meta.get("local_fields"), meta.get("part")
    if local is None or part is None:
        return None
    point_data, cell_data = local(problem.functional, x)
    try:
        return write_pvtu(out / "fields.pvtu", part.mesh, point_data, cell_data, comm=comm)
    except OSError as exc:
        raise UsageError(f"{exc}; the checkpoint is kept: once that is fixed, run again with --resume to write the "
                         "results") from exc


def _distribute(problem, args):
    """(problem on PETSc, its communicator) for --backend petsc; a UsageError names what is missing."""
    try:
        from .backends.petsc import DistributedReducedFunctional, PetscOptionsError, distribute
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    if isinstance(problem.functional, DistributedReducedFunctional):  # built rank by rank already
        return _quiet_ranks(problem, problem.functional.comm)
    try:
        distributed = distribute(problem)
    except (NotImplementedError, TypeError) as exc:  # what the backend does not distribute (a nonlinear residual,
        raise UsageError(str(exc)) from exc           # a ConstantMatrix, ...)
    except PetscOptionsError as exc:
        raise UsageError(f"the PETSc solver options were refused: {exc}") from exc
    return _quiet_ranks(distributed, distributed.functional.comm)


def _quiet_ranks(problem, comm):
    _quiet_other_ranks(comm)
    return problem, comm


def _quiet_other_ranks(comm=None) -> None:
    """Rank 0 says what every rank would say; the others speak of errors only (a higher level set by the user
    stays)."""
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            return
        comm = MPI.COMM_WORLD
    lib = logging.getLogger("adjopt")
    if comm.rank != 0 and lib.getEffectiveLevel() < logging.ERROR:
        lib.setLevel(logging.ERROR)


def cmd_demo(args, extra) -> int:
    args.problem = DEMO["problem"]
    args.out = args.out or DEMO["out"]
    return cmd_run(args, extra, name=DEMO["problem"], preset=DEMO["options"])


def _as_typed(value) -> str:
    """A default as it is typed on the command line (what _convert reads back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def cmd_list(args, extra) -> int:
    known = gallery()
    if not known:
        print(f"no gallery problems found in {gallery_dir()} (set ADJOPT_GALLERY)")
        return 2
    for name in known:
        module = load_module(name)
        doc = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        opts = ", ".join(f"--{k} {_as_typed(v)}" for k, v in build_options(module).items())
        print(f"{name}: {doc}\n    options: {opts or '(none)'}")
        dist = ", ".join(f"--{k} {_as_typed(v)}" for k, v in distributed_options(module).items())
        if dist:
            print(f"    with --backend petsc also: {dist}")
    return 0


def _check_item(what: str, r) -> tuple[str, bool]:
    """The ``check -q`` words for one Taylor test and whether it passed: the rate it judged on (for the Hessian the
    central-difference test of grad J, when it has one); when it failed, the failing series and the rate wanted."""
    judged = r.gradient_check or r
    if r.passed:
        return f"{what} rate {judged.verdict}", True
    s = r.gradient_check if r.gradient_check is not None and not r.gradient_check.passed else r
    where = "" if s is judged else f" on {s.quantity}"
    return f"{what} rate {s.verdict}{where}, want >= {s.expected - s.tol:g}", False


def _has_hessian(J, p) -> bool:
    """False when J says it has no Hessian actions (an eigenvalue functional raises NotImplementedError)."""
    if not callable(getattr(J, "hessp", None)):
        return False
    try:
        J.hessp(p, np.zeros_like(p))
    except NotImplementedError:
        return False
    return True


def cmd_check(args, extra) -> int:
    from .verify import check_hessian_symmetry, taylor_test

    if args.seed < 0:
        raise UsageError(f"--seed must be a whole number >= 0, got {args.seed}")
    module = load_module(args.problem)
    prob_opts, _ = split_options(extra, build_options(module), {})
    _compile_notice(args)
    problem = make_problem(module, prob_opts)
    J = problem.functional
    rng = np.random.default_rng(args.seed)
    p = problem.p0.copy()
    if problem.bounds is not None:  # an interior point, so that every direction is admissible
        lo, hi = problem.bounds
        width = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
        p = np.clip(p, lo + 0.1 * width, hi - 0.1 * width)
    rows, ok, tables, summary = [], True, [], []
    has_hessian = _has_hessian(J, p)
    for order in ((2, 3) if has_hessian else (2,)):
        r = taylor_test(J, p, rng.standard_normal(p.size), order=order, seed=args.seed)
        ok &= r.passed
        summary.append(_check_item("gradient" if order == 2 else "Hessian", r))
        what = "gradient" if order == 2 else "Hessian action"
        # the rate the test judged on (the smallest in its window), not a rate of the table
        rows.append((f"Taylor order {order} ({what}), J", r.verdict, f">= {r.expected - r.tol:g}", r.own_passed))
        if r.gradient_check is not None:
            g = r.gradient_check
            rows.append((f"Taylor order {order} ({what}), grad J", g.verdict, f">= {g.expected - g.tol:g}", g.own_passed))
        if not r.passed:
            tables.append(r.table())
    if has_hessian:
        asym = check_hessian_symmetry(J, p)
        rows.append(("Hessian symmetry |<Hv,w>-<v,Hw>|/scale", f"{asym:.2e}", "<= 1e-8", asym <= 1e-8))
        ok &= asym <= 1e-8
        summary.append((f"symmetry {asym:.1e}" + ("" if asym <= 1e-8 else ", want <= 1e-8"), asym <= 1e-8))
    else:
        rows.append(("Hessian actions", "none", "(skipped)", True))
        summary.append(("no Hessian actions", True))
    # the constraints' gradients drive the design methods as much as J's (a min-max's J = z checks nothing)
    for i, (con, _) in enumerate(problem.constraints or []):
        r = taylor_test(con, p, rng.standard_normal(p.size), order=2, seed=args.seed)
        ok &= r.passed
        summary.append((f"constraint {i} " + _check_item("gradient", r)[0], r.passed))
        rows.append((f"Taylor order 2 (gradient), constraint {i}", r.verdict, f">= {r.expected - r.tol:g}", r.passed))
        if not r.passed:
            tables.append(r.table())
    if args.quiet:  # one line: the verdict, what failed (and what it should have been), what passed
        failed = [text for text, good in summary if not good]
        passed = [text for text, good in summary if good]
        if not failed:
            print(f"{problem.name}: check PASS ({', '.join(passed)})")
        else:
            print(f"{problem.name}: check FAIL ({'; '.join(failed)}" + (f"; passed: {', '.join(passed)}" if passed else "")
                  + ")")
        return 0 if ok else 1
    print(f"{problem.name}: {J.n_params} parameters")
    width = max(len(r[0]) for r in rows)
    for name, got, want, good in rows:
        print(f"  {name:<{width}}  {got:>10}  {want:<8}  {'PASS' if good else 'FAIL'}")
    for table in tables:  # what a failed test saw, step by step
        print("\n" + table)
    return 0 if ok else 1


def cmd_bench(args, extra) -> int:
    module = load_module(args.problem)
    popts = build_options(module)
    prob_opts, _ = split_options(extra, popts, {})
    size_opt = args.size_option or next((k for k in ("n", "nelx") if k in popts), None)
    if size_opt not in popts:
        raise UsageError(f"--size-option {size_opt!r} is not an option of {args.problem}; its options are "
                         f"{', '.join(popts) or '(none: give --size-option the name build() takes)'}")
    rows = []
    _compile_notice(args)
    for size in args.sizes:
        problem = make_problem(module, {**prob_opts, size_opt: size})
        J, p = problem.functional, problem.p0
        v = np.random.default_rng(0).standard_normal(p.size)
        t0 = time.perf_counter()
        J.value(p)
        t1 = time.perf_counter()
        J.gradient(p)
        t2 = time.perf_counter()
        J.hessp(p, v)
        t3 = time.perf_counter()
        n_state = J.matrix.shape[0] if hasattr(J, "matrix") else getattr(J, "n", None)  # transient: J.n
        rows.append(dict(size=size, n_params=int(p.size), n_state=None if n_state is None else int(n_state),
                         value_s=t1 - t0, gradient_s=t2 - t1, hessp_s=t3 - t2, solver=getattr(J.solver, "name", "?")))
        r = rows[-1]
        print(f"{size_opt}={size:<6} params {r['n_params']:>9} state {str(r['n_state']):>9}  value {r['value_s']:8.3f} s  "
              f"gradient {r['gradient_s']:8.3f} s  hessp {r['hessp_s']:8.3f} s  ({r['solver']})", flush=True)
    out = Path(args.json or f"bench_{Path(args.problem).stem}.json")
    data = dict(problem=args.problem, options=prob_opts, size_option=size_opt, results=rows)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, out)
    except OSError as exc:
        raise UsageError(f"cannot write {out} ({exc.strerror}); choose another --json") from exc
    print(f"wrote {out}")
    return 0


def _read_map(path: Path, n: int, problem) -> np.ndarray:
    """x of a finished run's result.npz (or of the result.npz in a folder), checked against this problem (and
    against the run's options, when its history.json lies beside it)."""
    if path.is_dir():
        path = path / "result.npz"
    if not path.is_file():
        raise UsageError(f"--result {path}: no such file; give the result.npz of a finished 'adjopt run' (or its "
                         "folder), or leave --result out to compute the MAP point")
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.array(data["x"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # TypeError/AttributeError: an .npy array, which np.load returns without a file of named arrays
        raise UsageError(f"--result {path} is not the result.npz of an 'adjopt run' (an .npz with an array x): "
                         f"{type(exc).__name__}: {exc}") from exc
    if x.dtype.kind not in "fiu":
        raise UsageError(f"--result {path}: x holds {x.dtype} numbers, not real ones")
    x = x.astype(np.float64)
    if x.shape != (n,):
        raise UsageError(f"--result {path} holds x of shape {x.shape}, but this problem has {n} parameters: build it "
                         "with the options of that run")
    if not np.all(np.isfinite(x)):
        raise UsageError(f"--result {path}: x has NaN or Inf entries")
    history = path.parent / "history.json"
    mine = (getattr(problem, "meta", None) or {}).get("options")
    if history.is_file() and isinstance(mine, dict):
        try:
            theirs = json.loads(history.read_text()).get("options")
        except (OSError, ValueError):
            theirs = None
        if isinstance(theirs, dict):
            from .results import _json_safe

            mine_json = json.loads(json.dumps(_json_safe(mine)))
            differ = sorted(k for k in set(mine_json) | set(theirs) if mine_json.get(k) != theirs.get(k))
            if differ:
                shown = ", ".join(f"{k}: run {theirs.get(k)!r}, now {mine_json.get(k)!r}" for k in differ)
                raise UsageError(f"--result {path} comes from a run of other options ({shown}): give the same "
                                 "problem options as that run")
    return x


def cmd_uq(args, extra) -> int:
    import adjopt

    from .results import ResultsWriteError
    from .uq import EXACT_VARIANCE_LIMIT, GaussianPrior, LaplacePosterior
    from .uq_results import write_uq

    for name, low in (("rank", 1), ("oversampling", 0), ("samples", 0), ("sample_seed", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {value}")
    if args.result is not None and not args.result.strip():
        raise UsageError("--result needs a path (the result.npz of a finished run, or its folder)")
    if args.solver:
        _check_solver(args.solver)
    module = load_module(args.problem)
    run_defaults = dict(getattr(module, "RUN_DEFAULTS", {}))
    method = args.method or run_defaults.pop("method", None) or "newton-cg"
    run_defaults.pop("method", None)
    prob_opts, meth_opts = split_options(extra, build_options(module), _method_defaults(method))
    _compile_notice(args)
    problem = make_problem(module, prob_opts)
    J = problem.functional
    if args.solver:
        from .solvers import make_solver

        try:
            J.solver = make_solver(args.solver)
        except ImportError as exc:
            raise UsageError(str(exc)) from exc
    n = J.n_params
    try:
        prior = GaussianPrior.of(J, n)
    except ValueError as exc:
        hint = " (poisson_inversion: --regularization bilaplacian)" if "regularization" in build_options(module) else ""
        raise UsageError(f"{problem.name}: {exc}{hint}") from exc
    rank = min(80, n) if args.rank is None else args.rank
    if rank > n:
        raise UsageError(f"--rank {rank} exceeds the {n} parameters of {problem.name}; ask for at most {n}")
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    out = Path(args.out or os.path.join("adjopt-results", f"{problem.name}-uq"))
    lock = _prepare_out(out, args.force, resume=False, resumable=False)
    finished = False
    try:
        times, info = {}, {}
        t0 = time.perf_counter()
        map_ok = True
        if args.result:
            m = _read_map(Path(args.result), n, problem)
            info["map_source"] = str(args.result)
            say(f"{problem.name}: {n} parameters; MAP point read from {args.result}")
        else:
            stop = {k: run_defaults.pop(k) for k in list(run_defaults) if k in ("gtol", "gatol", "xtol", "ftol",
                                                                                "maxiter")}
            if args.max_iter is not None:
                stop["maxiter"] = args.max_iter
            if args.gtol is not None:
                stop["gtol"] = args.gtol
            stop.setdefault("maxiter", 200)
            _stopping_tests(argparse.Namespace(max_iter=args.max_iter, gtol=args.gtol, xtol=None), stop)
            opts = {**{k: v for k, v in run_defaults.items() if k in _method_defaults(method)}, **meth_opts}
            say(f"{problem.name}: {n} parameters; the MAP point by {method} ...")
            res = adjopt.minimize(problem, method=method, **stop, **opts)
            m = res.x
            info.update(map_source=f"adjopt.minimize(method={method!r})", map_success=bool(res.success),
                        map_iterations=int(res.nit), map_message=str(res.message), map_hessian_actions=int(res.nhessp))
            say(f"  {res.message} after {res.nit} iterations (J = {res.fun:.6g})")
            if not res.success:
                map_ok = False
                logger.warning("the optimization did not converge: the posterior is centred at its last point "
                               "(exit status 1); raise --max-iter or give a finished run's --result")
        times["map_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        say(f"eigenpairs: rank {rank}, oversampling {args.oversampling}, "
            f"{'double' if args.passes == 2 else 'single'} pass ...")
        try:
            post = LaplacePosterior(J, m, prior=prior, rank=rank, oversampling=args.oversampling, passes=args.passes,
                                    rng=args.sample_seed, gauss_newton=args.gauss_newton)
        except ValueError as exc:  # not positive definite at m: say it in the command's words
            raise UsageError(str(exc).replace("gauss_newton=True", "--gauss-newton")) from exc
        times["eigensolver_s"] = time.perf_counter() - t0
        lam = post.values
        say(f"  {post.rank} eigenvalues from {lam[0]:.4g} down to {lam[-1]:.4g} ({int(np.sum(lam > 1))} above 1), "
            f"{post.eig.actions} Hessian actions, {times['eigensolver_s']:.2f} s; largest residual "
            f"{np.nanmax(post.eig.residuals):.2e}")
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.sample_seed + 1)
        exact = n <= EXACT_VARIANCE_LIMIT
        try:
            prior_var = prior.variance(rng=rng)
            post_var = post.variance(rng=rng)
            info["variance"] = "exact" if exact else "Monte Carlo, 500 samples (relative standard error 6 %)"
        except NotImplementedError as exc:  # a prior that cannot be sampled, beyond the exact limit
            logger.warning("no variances written: %s", exc)
            prior_var = post_var = None
            info["variance"] = f"not computed: {exc}"
        times["variance_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = np.zeros((n, 0))
        rng = np.random.default_rng(args.sample_seed + 2)
        if args.samples:
            try:
                samples = post.sample(args.samples, rng=rng)
            except NotImplementedError as exc:  # a prior without a square root of its precision at this size
                logger.warning("no samples written: %s", exc)
        times["samples_s"] = time.perf_counter() - t0
        info.update(rank_requested=rank, oversampling=args.oversampling, passes=args.passes,
                    gauss_newton=bool(args.gauss_newton), sample_seed=args.sample_seed, times=times,
                    variance_exact=bool(exact and post_var is not None))
        say(f"  KL divergence {post.kl_divergence():.4g} nats" + ("" if post_var is None else
            f"; posterior variance {post_var.min():.3g} .. {post_var.max():.3g} (prior {prior_var.min():.3g} .. "
            f"{prior_var.max():.3g}, {info['variance']})"))
        try:
            written = write_uq(out, problem, post, samples, prior_var, post_var, info, force=True,
                               pictures=not args.no_pictures, save_vectors=args.save_vectors)
        except ResultsWriteError as exc:
            raise UsageError(str(exc)) from exc
        print(f"results in {out}/: " + ", ".join(sorted(Path(p).name for p in written.values())))
        finished = True
        return 0 if map_ok else 1
    finally:
        lock.release(failed=not finished)


# -- entry point ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one ``adjopt: ...`` line (exit 2), like every other bad input."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    # no abbreviations: --n must reach build(), not match --no-pictures
    ap = _Parser(prog="adjopt", description="adjoint-based optimization of discretised PDEs", allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def run_flags(p, with_problem=True):
        if with_problem:
            p.add_argument("problem", help="a gallery name (adjopt list) or a path to a .py file with build()")
        p.add_argument("--method", help="lbfgs, lbfgsb, newton-cg, newton-tr, oc, mma (default: the problem's)")
        p.add_argument("--solver", type=_solver_name, help="auto, superlu, cholmod, pardiso, amg, or gmg for problems on structured "
                                        "grids (topology_compliance) (default: auto)")
        p.add_argument("--backend", choices=("serial", "petsc"), default="serial",
                       help="petsc: distributed over the MPI ranks of mpiexec (optional extra mpi)")
        p.add_argument("--max-iter", type=int, dest="max_iter")
        p.add_argument("--gtol", type=float)
        p.add_argument("--xtol", type=float)
        p.add_argument("--out", help="results folder (default adjopt-results/<problem>)")
        p.add_argument("--force", action="store_true", help="overwrite an existing results folder")
        p.add_argument("--resume", action="store_true", help="continue from the folder's checkpoint")
        p.add_argument("--no-pictures", action="store_true", dest="no_pictures")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress, one summary line")
        p.add_argument("--log-json", dest="log_json", help="append one JSON line per iteration to this file")
        debug_flag(p)

    def debug_flag(p):
        p.add_argument("--debug", action="store_true", help="print the traceback of an error, too")

    run_flags(sub.add_parser("run", allow_abbrev=False, help="optimize a problem; --option value pairs go to build() or the method"))
    run_flags(sub.add_parser("demo", allow_abbrev=False, help=f"run {DEMO['problem']} and write {DEMO['out']}"), with_problem=False)
    sub.add_parser("list", help="the gallery problems and their options")
    p = sub.add_parser("check", allow_abbrev=False, help="Taylor tests and Hessian symmetry (exit 1 if a rate is off)")
    p.add_argument("problem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no table, one summary line (PASS or FAIL and why)")
    debug_flag(p)
    p = sub.add_parser("bench", allow_abbrev=False, help="time value, gradient and hessp per size")
    p.add_argument("problem")
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--size-option", dest="size_option", help="the build() option the sizes set (default n or nelx)")
    p.add_argument("--json", help="output JSON file (default bench_<problem>.json)")
    debug_flag(p)
    p = sub.add_parser("uq", allow_abbrev=False,
                       help="the Laplace posterior at the MAP point: eigenvalues, variance, samples")
    p.add_argument("problem")
    p.add_argument("--rank", type=int, default=None, help="eigenpairs kept (default 80, at most the parameters)")
    p.add_argument("--oversampling", type=int, default=10, help="extra sketch columns (default 10)")
    p.add_argument("--passes", type=int, choices=(1, 2), default=2, help="randomized eigensolver passes (default 2)")
    p.add_argument("--samples", type=int, default=3, help="posterior samples written (default 3)")
    p.add_argument("--sample-seed", type=int, default=0, dest="sample_seed",
                   help="seed of the sketch and of the samples (--seed, if the problem has it, goes to build())")
    p.add_argument("--gauss-newton", action="store_true", dest="gauss_newton",
                   help="use the Gauss-Newton Hessian (default: the full Hessian)")
    p.add_argument("--result", help="result.npz (or its folder) of a finished run: its x is the MAP point")
    p.add_argument("--method", help="the optimizer for the MAP point (default: the problem's, else newton-cg)")
    p.add_argument("--solver", type=_solver_name)
    p.add_argument("--max-iter", type=int, dest="max_iter")
    p.add_argument("--gtol", type=float)
    p.add_argument("--out", help="results folder (default adjopt-results/<problem>-uq)")
    p.add_argument("--force", action="store_true", help="overwrite an existing results folder")
    p.add_argument("--no-pictures", action="store_true", dest="no_pictures")
    p.add_argument("--save-vectors", action="store_true", dest="save_vectors",
                   help="also write the eigenvectors into uq.npz (m x rank numbers)")
    p.add_argument("-q", "--quiet", action="store_true")
    debug_flag(p)
    return ap


@contextlib.contextmanager
def _library_logs(quiet: bool):
    """``run -q``/``demo -q``: the library's warnings are not shown but counted, and one line at the end says how
    many were hidden and what the first said (a driver's warnings also stay in history.json's "warnings"; the
    solvers' and the problem's do not); errors and the command's own warnings (adjopt.cli, e.g. --resume without
    a checkpoint) still show. The handlers are restored afterwards (main() may run in-process, several times)."""
    if not quiet:
        yield
        return
    hidden = []

    class _Hide(logging.Filter):
        def filter(self, record):
            if record.levelno >= logging.ERROR or not record.name.startswith("adjopt") or record.name == logger.name:
                return True
            if record.levelno >= logging.WARNING:
                hidden.append(record.getMessage())
            return False

    hide = _Hide()
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(hide)
    import warnings

    from .errors import ConvergenceWarning

    package = os.path.dirname(os.path.abspath(__file__))
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        """Python warnings of the library (a solver that did not converge warns and logs): hidden and counted once."""
        if issubclass(category, ConvergenceWarning) or os.path.abspath(filename).startswith(package):
            text = str(message)
            if text not in hidden[-1:]:
                hidden.append(text)
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
        for h in handlers:
            h.removeFilter(hide)
        if hidden:
            first = hidden[0] if len(hidden[0]) <= 160 else hidden[0][:157] + "..."
            print(f"adjopt: {len(hidden)} warning(s) hidden by -q (run without -q to see them); the first: {first}",
                  file=sys.stderr)


def _resume_command(argv: list[str], out) -> str:
    """The command line that continues an interrupted run: the same, with --out and --resume, without --force."""
    words = [w for w in argv if w not in ("--force", "--resume")]
    if out is not None and not any(w == "--out" or w.startswith("--out=") for w in words):
        words += ["--out", str(out)]
    return "adjopt " + shlex.join([*words, "--resume"])


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        args, extra = parser().parse_known_args(argv)
    except UsageError as exc:
        print(f"adjopt: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = dict(run=cmd_run, demo=cmd_demo, list=cmd_list, check=cmd_check, bench=cmd_bench, uq=cmd_uq)
    if args.command == "list" and extra:
        print(f"adjopt: list takes no options, got {' '.join(extra)}", file=sys.stderr)
        return 2
    try:
        with _library_logs(args.command in ("run", "demo") and args.quiet):
            return handlers[args.command](args, extra)
    except UsageError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"adjopt: {exc}", file=sys.stderr)
        return 2
    except AdjoptError as exc:
        # the problem itself fails (a singular A(p0), J(p0) not finite, a solve that does not converge at the
        # start): bad input, said in one line; a failure at a trial point never gets here (the drivers back off)
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"adjopt: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output went to a pipe that closed (adjopt list | head): not an error here
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            traceback.print_exc()
        hint = ""
        if args.command in ("run", "demo"):
            out = getattr(args, "out_used", None)
            from .optimize.base import _RankCheckpoint

            if out is not None and ((Path(out) / "checkpoint.npz").exists()
                                    or _RankCheckpoint.ranks_written(Path(out) / "checkpoint.npz") > 0):
                hint = "; continue with --resume: " + _resume_command(argv, out)
            else:
                hint = " before the first iteration finished; nothing was written"
        print(f"adjopt: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
