"""The transient reduced functional: J(p) = sum of objective terms over the levels of M(p) du/dt + A(p) u = b(t, p).

With the steps F_n = sum_j (alpha_nj M + gamma_nj A) u_{n-j} - sum_j gamma_nj b_{n-j} = 0 (n = 1..N, see
:mod:`adjopt.transient.schemes`), u_0 = u0(p), S_n = alpha_n0 M + gamma_n0 A and E_nj = alpha_nj M + gamma_nj A,
the discrete adjoint of exactly the scheme that runs forward is, for m = N..1,

    S_m^T lam_m = dJ/du_m - sum_{j>=1} E_{m+j,j}^T lam_{m+j}                      adjoint, backwards
    mu          = dJ/du_0 - sum_{j>=1} E_{j,j}^T lam_j
    grad J      = dJ/dp + u0'^T mu
                  - sum_n [C_M(lam_n, sum_j alpha_nj u_{n-j}) + C_A(lam_n, sum_j gamma_nj u_{n-j})]
                  + sum_l (db(t_l)/dp)^T (sum_{n-j=l} gamma_nj lam_n)

with C_X(w, z)_k = w^T (dX/dp_k) z. A Hessian action in the direction dp marches the tangent forwards and
the second-order adjoint backwards on the same factorizations (dX = dX/dp . dp, dE_nj = alpha_nj dM +
gamma_nj dA):

    S_n du_n = sum_j gamma_nj db_{n-j}[dp] - sum_{j>=1} E_nj du_{n-j} - sum_{j>=0} dE_nj u_{n-j},  du_0 = u0' dp
    S_m^T dl_m = J_uu du_m + J_up dp - sum_{j>=1} E_{m+j,j}^T dl_{m+j} - sum_{j>=0} dE_{m+j,j}^T lam_{m+j}
    dmu = J_uu du_0 + J_up dp - sum_{j>=1} (E_jj^T dl_j + dE_jj^T lam_j)
    H dp = J_pp dp + J_pu du + u0'^T dmu + u0''[mu, dp]
           - sum_n [C_M(dl_n, sum alpha u) + C_M(lam_n, sum alpha du) + C2_M(lam_n, sum alpha u, dp)
                    + the same with A and gamma]
           + sum_l [(db(t_l)/dp)^T (sum gamma dl) + (d2b(t_l)/dp2 . dp)^T (sum gamma lam)]

The contractions of all steps are batched into multi-column kernel calls (``batch`` columns at a time).

States are kept for the reverse march when they fit in ``memory`` bytes; otherwise they are recomputed
from checkpoints placed by a ``checkpoint_schedules`` schedule (binomial, multistage: RAM first, then disk
when a ``checkpoint_dir`` is given).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .._validate import as_count, as_directions, as_parameter, check_finite, check_flag, check_tolerance, owned
from ..errors import NonFiniteError, ShapeError, SingularMatrixError
from ..operators import ParametricMatrix
from ..operators.residual import ParametricResidual
from ..solvers import make_solver
from ..solvers.base import SolverStats
from .objectives import split_terms
from .schemes import TimeStepping
from .sources import as_initial, as_source

logger = logging.getLogger(__name__)

#: default bound of the states kept for the reverse march (trajectories and checkpoints), bytes
DEFAULT_MEMORY = 2**30
#: checkpoint schedules: "multistage" (binomial, Revolve's step counts; RAM, then disk) and "mixed" (stores a
#: step's adjoint dependencies where that saves a recomputation; one storage kind)
SCHEDULES = ("multistage", "mixed")


@dataclass
class TransientStats(SolverStats):
    """The solver counters plus the time stepping's: ``time_steps`` forward steps of the state solved (the
    first march and every recomputation), ``recomputed_steps`` forward steps (of the state, or of the tangent
    in a Hessian action) solved again: from a checkpoint, or because the states of a march were not kept,
    ``stored_states`` the most state vectors held at once for the reverse march (trajectories, checkpoints
    in memory and the working levels), ``checkpoints`` snapshots written (``disk_checkpoints`` of them to
    disk)."""

    time_steps: int = 0
    recomputed_steps: int = 0
    stored_states: int = 0
    checkpoints: int = 0
    disk_checkpoints: int = 0

    def as_dict(self) -> dict:
        out = super().as_dict()
        out.update(time_steps=self.time_steps, recomputed_steps=self.recomputed_steps,
                   stored_states=self.stored_states, checkpoints=self.checkpoints,
                   disk_checkpoints=self.disk_checkpoints)
        return out


def _matrix(X, name: str):
    """(ParametricMatrix or None, constant CSR or None) of a matrix argument."""
    if isinstance(X, ParametricMatrix):
        if X.shape[0] != X.shape[1]:
            raise ShapeError(f"{name} must be square, got shape {X.shape}")
        return X, None
    if sp.issparse(X) or isinstance(X, np.ndarray):
        from .._validate import owned_operator

        C = sp.csr_array(owned_operator(sp.csr_array(X) if isinstance(X, np.ndarray) else X, name))
        if C.shape[0] != C.shape[1]:
            raise ShapeError(f"{name} must be square, got shape {C.shape}")
        C.sum_duplicates()
        return None, C
    raise TypeError(f"{name} must be a ParametricMatrix or a (sparse) matrix, got {type(X).__name__}")


class _Batch:
    """Contractions C(w, z) (or second-order C2(w, z, dp)) summed over many column pairs, ``size`` at a time,
    gathered into two preallocated (n, size) blocks."""

    def __init__(self, matrix: ParametricMatrix, p, size: int, dp=None):
        self.matrix, self.p, self.size, self.dp = matrix, p, size, dp
        n = matrix.shape[0]
        self.W = np.empty((n, size))
        self.Z = np.empty((n, size))
        self.k = 0
        self.out = np.zeros(matrix.n_params)

    def add(self, w, z):
        self.W[:, self.k] = w
        self.Z[:, self.k] = z
        self.k += 1
        if self.k == self.size:
            self.flush()

    def flush(self) -> np.ndarray:
        if self.k:
            W, Z, self.k = self.W[:, :self.k], self.Z[:, :self.k], 0
            if self.dp is None:
                self.out += self.matrix.contract(self.p, W, Z)
            else:
                self.out += self.matrix.second(self.p, W, Z, self.dp)
        return self.out


@dataclass
class _Context:
    """Everything kept for one parameter value."""

    p: np.ndarray
    A: sp.csr_array
    M: sp.csr_array
    mats: dict = field(default_factory=dict)  # (alpha, gamma) -> alpha M + gamma A
    facs: dict = field(default_factory=dict)  # (alpha, gamma) -> factorization of alpha M + gamma A
    value: float | None = None
    u: list | None = None  # every level's state, when kept
    lam: list | None = None  # every level's adjoint (index 0 unused), when kept
    mu: np.ndarray | None = None
    grad: np.ndarray | None = None
    levels: object = None  # what a nonlinear march caches of its latest levels (R, K)


class _Cache:
    """The ``cache`` of a :class:`TransientReducedFunctional`: ``clear()`` drops the context of the last p."""

    def __init__(self, J):
        self._J = J

    def clear(self) -> None:
        J = self._J
        if J._ctx is not None:
            for fac in J._ctx.facs.values():
                J.solver.recycle(fac)
        J._ctx = None
        J._fixed = {}


class TransientReducedFunctional:
    """J(p) for M(p) du/dt + A(p) u = b(t, p), u(t_0) = u0(p), with the gradient and Hessian actions of the
    discrete scheme (exact to round-off; the formulas are in this module's docstring).

    Parameters
    ----------
    stiffness
        A(p): a :class:`~adjopt.operators.ParametricMatrix`, or a sparse matrix that does not depend on p. A
        :class:`~adjopt.operators.ParametricResidual` R(u, p) instead makes the equation M du/dt + R(u, p) =
        b(t, p), solved by Newton's method at every step: the call then returns a
        :class:`~adjopt.transient.NonlinearTransientReducedFunctional` (which also takes ``newton=``).
    mass
        M(p), the same kinds; ``None`` is the identity (an ODE system u' + A u = b).
    objective
        A time term (:class:`~adjopt.transient.TimeSeriesMisfit`, :class:`~adjopt.transient.AtSteps`,
        :func:`~adjopt.transient.Final`), an :class:`~adjopt.objectives.Objective` of p alone (a
        regularization), or a list of them.
    time
        The :class:`~adjopt.transient.TimeStepping` (scheme and grid).
    rhs
        b(t, p): ``None`` (zero), an array or :class:`~adjopt.operators.ParametricVector` (constant in time),
        a :class:`~adjopt.transient.TimeDependentVector` (:class:`~adjopt.transient.SpaceTimeSource`,
        :class:`~adjopt.transient.Modulated`) or a callable f(t) -> (n,) that does not depend on p.
    u0
        The initial state: ``None`` (zero), an array, or a :class:`~adjopt.operators.ParametricVector` u0(p).
    solver
        A linear solver or its name, as for :class:`~adjopt.ReducedFunctional`; one factorization per
        distinct step matrix and parameter value serves every solve of every march.
    memory
        Bytes for the states kept for the reverse march (default 1 GiB): the whole trajectory when it fits
        (then also the adjoints, so that Hessian actions at the same p cost two solves per step),
        otherwise checkpoints, from which states are recomputed (``J.stats.recomputed_steps``). The few
        working levels of a step (s + 2 vectors for a scheme that reads s earlier levels) come on top.
    checkpoint_dir
        A folder for checkpoints on disk when memory does not hold enough of them; each march writes into a
        fresh subfolder (files written atomically) and removes it when it ends, also on an error.
    disk_snapshots
        How many checkpoints may go to disk (default: as many as there are steps).
    schedule
        ``"multistage"`` (default): the binomial schedule (Revolve's step counts: 4.64 forward steps per step at
        N = 1000 with 10 checkpoints), in RAM first and then on disk; ``"mixed"``: a checkpoint holds either
        restart data or the states one adjoint step needs, whichever saves more (3.92 at the same sizes); RAM
        only, or disk only with a ``checkpoint_dir`` and no room in memory.
    snapshots
        The number of checkpoints in memory, instead of what ``memory`` holds (the trajectory is then never
        stored whole).
    batch
        Columns per multi-column contraction call (memory: 2 x batch state vectors).
    progress
        Optional ``progress(phase, step, n_steps)``, called after every step of a march with phase
        ``"forward"`` or ``"reverse"`` (for a progress bar); the marches also log at DEBUG every tenth.
    """

    def __new__(cls, *args, **kwargs):
        first = args[0] if args else kwargs.get("stiffness", kwargs.get("residual"))
        if cls is TransientReducedFunctional and isinstance(first, ParametricResidual):
            from .nonlinear import NonlinearTransientReducedFunctional

            cls = NonlinearTransientReducedFunctional
        return super().__new__(cls)

    def __init__(self, stiffness, mass, objective, time: TimeStepping, rhs=None, u0=None, solver="auto",
                 memory: int = DEFAULT_MEMORY, checkpoint_dir=None, disk_snapshots=None, schedule: str = "multistage",
                 snapshots: int | None = None, batch: int = 16, progress=None):
        if not isinstance(time, TimeStepping):
            raise TypeError(f"time must be a TimeStepping (scheme and grid), got {type(time).__name__}")
        self.time = time
        if isinstance(stiffness, ParametricResidual):  # M du/dt + R(u, p) = b: see NonlinearTransientReducedFunctional
            if not getattr(self, "_nonlinear", False):
                raise TypeError("a ParametricResidual steps with NonlinearTransientReducedFunctional (which "
                                "TransientReducedFunctional(residual, ...) returns)")
            self.R, self.A_op, self._A_fixed = stiffness, None, None
            n = stiffness.n
        else:
            self.R = None
            self.A_op, self._A_fixed = _matrix(stiffness, "the stiffness A")
            n = (self.A_op.shape if self.A_op is not None else self._A_fixed.shape)[0]
        if mass is None:
            self.M_op, self._M_fixed = None, sp.identity(n, format="csr")
        else:
            self.M_op, self._M_fixed = _matrix(mass, "the mass M")
        nm = (self.M_op.shape if self.M_op is not None else self._M_fixed.shape)[0]
        if nm != n:
            raise ShapeError(f"the mass matrix is {nm} x {nm} but the stiffness is {n} x {n}")
        self.n = n
        self.rhs = as_source(rhs, n)
        if self.rhs is not None and self.rhs.n != n:
            raise ShapeError(f"the right-hand side has {self.rhs.n} entries but the state has {n}")
        self.u0 = as_initial(u0, n)
        sizes = {}
        for name, op in (("stiffness", self.A_op), ("residual", self.R), ("mass", self.M_op), ("rhs", self.rhs),
                         ("u0", self.u0)):
            if op is not None and getattr(op, "n_params", None) is not None:
                sizes[name] = int(op.n_params)
        if not sizes and objective is not None:
            raise ValueError("nothing depends on p: give a ParametricMatrix, a parametric right-hand side or a "
                             "parametric u0 (or objective=None for a forward simulation, with p = np.zeros(0))")
        if len(set(sizes.values())) > 1:
            raise ShapeError(f"the parts disagree on the number of parameters: {sizes}")
        self.n_params = next(iter(sizes.values())) if sizes else 0
        # a matrix that does not depend on p is handled as a fixed one (no contractions)
        for attr in ("A", "M"):
            op = getattr(self, f"{attr}_op")
            if op is not None and getattr(op, "constant", False):
                setattr(self, f"_{attr}_fixed", op.assemble(np.zeros(op.n_params)))
                setattr(self, f"{attr}_op", None)
        self.terms, self.param_terms = split_terms(objective)
        N = time.n_steps
        self._levels: dict[int, list] = {}
        for term in self.terms:
            term.check(n)
            for i, level in enumerate(term.resolve(N)):
                self._levels.setdefault(int(level), []).append((term, i))
        self.solver = solver
        if isinstance(memory, float) and memory.is_integer() and memory >= 0:
            memory = int(memory)  # memory=1e9
        self.memory = as_count(memory, "memory", minimum=0)
        if checkpoint_dir is not None:
            checkpoint_dir = os.fspath(checkpoint_dir)
            if not os.path.isdir(checkpoint_dir):
                raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir!r} is not a folder; create it first")
            try:  # a folder adjopt cannot write into is refused now, not after a forward march
                os.rmdir(tempfile.mkdtemp(prefix="adjopt-checkpoints-", dir=checkpoint_dir))
            except OSError as exc:
                raise PermissionError(f"checkpoint_dir {checkpoint_dir!r} is not writable ({exc.strerror}); "
                                      f"give a folder adjopt may create subfolders in") from exc
        elif disk_snapshots is not None:
            raise ValueError("disk_snapshots counts checkpoints on disk: give a checkpoint_dir too")
        self.checkpoint_dir = checkpoint_dir
        self.disk_snapshots = None if disk_snapshots is None else as_count(disk_snapshots, "disk_snapshots", 0)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self.snapshots = None if snapshots is None else as_count(snapshots, "snapshots")
        self.batch = as_count(batch, "batch")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable progress(phase, step, n_steps), got {type(progress).__name__}")
        self.progress = progress
        self.times = Counter()
        self._tol: float | None = None
        self._ctx: _Context | None = None
        self._fixed: dict = {}  # (alpha, gamma) -> (matrix, factorization) when neither A nor M depends on p

    # -- public API ---------------------------------------------------------------------------------------
    @property
    def solver(self):
        """The linear solver; setting it (an object or a name) drops what was cached for the old one."""
        return self._solver

    @solver.setter
    def solver(self, solver):
        self._solver = self._accept(make_solver(solver))
        self._solver.stats = TransientStats()
        self._ctx = None
        self._fixed = {}

    def _accept(self, solver):
        """The solver, or an error when this functional cannot use it."""
        return solver

    @property
    def cache(self):
        """What is cached (the context of the last p and the factorizations of matrices that do not depend on
        p); ``cache.clear()`` drops it."""
        return _Cache(self)

    @property
    def stats(self) -> TransientStats:
        """Solver counters plus time-stepping counters (:class:`TransientStats`)."""
        return self.solver.stats

    def reset_stats(self) -> None:
        """Zero the counters and the phase times."""
        self.solver.stats.reset()
        self.times.clear()

    def value(self, p) -> float:
        """J(p): one forward march (its states kept for the gradient when they fit in ``memory``)."""
        ctx = self._context(p)
        if ctx.value is None:
            keep = self.snapshots is None and self._fits(self.time.n_steps + 1)
            self._forward_only(ctx, keep)
        return ctx.value

    def gradient(self, p, tol: float | None = None) -> np.ndarray:
        """dJ/dp by the discrete adjoint march (exact to round-off with a direct solver; ``tol``: the relative
        tolerance of iterative solves)."""
        tol = check_tolerance(tol)  # checked also when the gradient at p is cached
        ctx = self._context(p)
        if ctx.grad is None:
            self._tol = tol
            self._gradient(ctx)
        return ctx.grad.copy()

    def hessp(self, p, dp, tol: float | None = None, gauss_newton: bool = False) -> np.ndarray:
        """The Hessian action H(p) dp: a tangent march forwards and a second-order adjoint march backwards.

        ``tol`` is the relative tolerance of those solves (iterative solvers). ``gauss_newton=True`` drops every
        term with the adjoint lam (the curvature of the constraint): no adjoint march is needed. ``dp`` of shape
        (m, k) gives the k actions as an (m, k) array (one pair of marches per column).
        """
        gauss_newton = check_flag(gauss_newton, "gauss_newton")
        ctx = self._context(p)
        dP, single = as_directions(dp, self.n_params)
        self._tol = check_tolerance(tol)
        N = self.time.n_steps
        # what fits is kept, so that further actions at this p cost two solves per step
        if ctx.u is None and self.snapshots is None and self._fits(N + 1):
            if ctx.value is not None:
                self.stats.recomputed_steps += N
            self._forward_only(ctx, True)
        if not gauss_newton and ctx.grad is None and ctx.u is not None and self._fits(2 * N + 1):
            self._gradient(ctx)
        H = np.column_stack([self._hessp(ctx, dP[:, i], bool(gauss_newton)) for i in range(dP.shape[1])])
        return H[:, 0] if single else H

    def adjoint(self, p) -> np.ndarray:
        """mu = dJ/du_0 through the march: the sensitivity of J to the initial state (the adjoint at level 0)."""
        ctx = self._context(p)
        if ctx.grad is None:
            self._gradient(ctx)
        return ctx.mu.copy()

    def state(self, p) -> np.ndarray:
        """The final state u_N (a forward march unless the trajectory is kept)."""
        ctx = self._context(p)
        if ctx.u is not None:
            return ctx.u[-1].copy()
        return self.states(p)[-1]

    def states(self, p) -> np.ndarray:
        """(N + 1, n): the state at every level (a forward march unless the trajectory is kept)."""
        ctx = self._context(p)
        if ctx.u is None:
            self._forward_only(ctx, True)
        return np.array(ctx.u)

    # -- the context of one p -----------------------------------------------------------------------------
    def _context(self, p) -> _Context:
        p = owned(as_parameter(p, self.n_params))
        ctx = self._ctx
        if ctx is not None and np.array_equal(ctx.p, p):
            return ctx
        if ctx is not None:
            for fac in ctx.facs.values():
                self.solver.recycle(fac)
        self._ctx = None
        t0 = time.perf_counter()
        A = None
        if self.R is None:  # a residual R(u, p) is evaluated at each state instead
            A = self._A_fixed if self.A_op is None else self.A_op.assemble(p)
            check_finite(A.data, "A(p)")
        M = self._M_fixed if self.M_op is None else self.M_op.assemble(p)
        check_finite(M.data, "M(p)")
        self.times["assembly"] += time.perf_counter() - t0
        self._ctx = _Context(p=p, A=A, M=M)
        return self._ctx

    def _mat(self, ctx, a, g):
        key = (float(a), float(g))
        fixed = self.A_op is None and self.M_op is None
        store = self._fixed if fixed else ctx.mats
        if key not in store:
            parts = [c * X for c, X in ((a, ctx.M), (g, ctx.A)) if c != 0.0]
            E = sp.csr_array(parts[0] if len(parts) == 1 else parts[0] + parts[1])
            store[key] = E if not fixed else (E, None)
        return store[key] if not fixed else store[key][0]

    def _fac(self, ctx, a, g):
        key = (float(a), float(g))
        fixed = self.A_op is None and self.M_op is None
        if fixed:
            E = self._mat(ctx, a, g)
            if self._fixed[key][1] is None:
                self._fixed[key] = (E, self._factorize(E, a, g))
            return self._fixed[key][1]
        if key not in ctx.facs:
            ctx.facs[key] = self._factorize(self._mat(ctx, a, g), a, g)
        return ctx.facs[key]

    def _factorize(self, S, a=None, g=None):
        t0 = time.perf_counter()
        try:
            fac = self.solver.factorize(S)
        except SingularMatrixError as exc:
            what = f"the step matrix S = {a:.6g} M + {g:.6g} A" if a is not None else "the step matrix"
            hint = (" With theta = 0 (explicit Euler) S is M: the mass matrix must be nonsingular."
                    if g == 0.0 else "")
            raise type(exc)(f"{what} cannot be factorized: {exc}{hint}") from exc
        self.times["factorize"] += time.perf_counter() - t0
        return fac

    def _solve(self, fac, rhs, kind, transpose=False):
        t0 = time.perf_counter()
        x = fac.solve(rhs, transpose=transpose, kind=kind, tol=None if kind == "forward" else self._tol)
        self.times["solve"] += time.perf_counter() - t0
        return x

    def _report(self, phase: str, step: int) -> None:
        N = self.time.n_steps
        if self.progress is not None:
            self.progress(phase, step, N)
        if N >= 10 and step % (N // 10) == 0:
            logger.debug("%s march: step %d of %d", phase, step, N)

    def _fits(self, vectors: int, held: int = 0) -> bool:
        return (vectors + held) * self.n * 8 <= self.memory

    # -- pieces of the marches ----------------------------------------------------------------------------
    def _b(self, ctx, cache, level):
        """b(t_level, p) (zero without a right-hand side), from a small cache of the latest levels."""
        if self.rhs is None:
            return None
        key = 0 if self.rhs.steady else level
        if key not in cache:
            if len(cache) > 4:
                cache.clear()
            b = self.rhs.value(self.time.times[level], ctx.p)
            check_finite(b, f"b(t, p) at level {level}")
            cache[key] = b
        return cache[key]

    def _db(self, ctx, cache, level, dp):
        if self.rhs is None or not self.rhs.depends_on_p:
            return None
        key = 0 if self.rhs.steady else level
        if key not in cache:
            if len(cache) > 4:
                cache.clear()
            cache[key] = self.rhs.jvp(self.time.times[level], ctx.p, dp)
        return cache[key]

    def _objective_at(self, ctx, level, u) -> float:
        return sum(term.value(i, u, ctx.p) for term, i in self._levels.get(level, ()))

    def _grad_u(self, ctx, level, u):
        out = None
        for term, i in self._levels.get(level, ()):
            g = term.grad_u(i, u, ctx.p)
            out = g.copy() if out is None else out + g
        return out

    def _add_grad_p(self, ctx, level, u, out):
        for term, i in self._levels.get(level, ()):
            g = term.grad_p(i, u, ctx.p)
            if g is not None:
                out += g

    def _second_objective(self, ctx, level, u, du, dp, H) -> np.ndarray:
        """J_uu du + J_up dp of the terms at ``level`` (the second adjoint's right-hand side there); adds their
        J_pu du + J_pp dp into H."""
        out = np.zeros(self.n)
        for term, i in self._levels.get(level, ()):
            out += term.hess_uu(i, u, ctx.p, du)
            for h, into in ((term.hess_up(i, u, ctx.p, dp), out), (term.hess_pu(i, u, ctx.p, du), H),
                            (term.hess_pp(i, u, ctx.p, dp), H)):
                if h is not None:
                    into += h
        return out

    def _step_rhs(self, ctx, k, prev, bcache):
        """sum_j gamma_kj b_{k-j} - sum_{j>=1} E_kj u_{k-j}, with prev(level) the earlier states."""
        a, g = self.time.coefficients(k)
        r = np.zeros(self.n)
        for j in range(len(a)):
            if g[j] != 0.0:
                b = self._b(ctx, bcache, k - j)
                if b is not None:
                    r += g[j] * b
            if j >= 1 and (a[j] != 0.0 or g[j] != 0.0):
                r -= self._mat(ctx, a[j], g[j]) @ prev(k - j)
        return r

    def _advance(self, ctx, k, prev, bcache):
        a, g = self.time.coefficients(k)
        fac, rhs = self._fac(ctx, a[0], g[0]), self._step_rhs(ctx, k, prev, bcache)
        try:
            check_finite(rhs, "the step's right-hand side")
            u = self._solve(fac, rhs, "forward")
        except NonFiniteError as exc:
            hint = " Check the sources and the scale of p."
            if self.time.theta is not None and self.time.theta < 0.5:
                hint = (f" theta = {self.time.theta} < 1/2 is only conditionally stable: use theta >= 1/2 or a "
                        f"smaller step.")
            raise NonFiniteError(f"the march blew up at step {k} of {self.time.n_steps} (t = "
                                 f"{float(self.time.times[k]):.6g}): the state overflowed.{hint}") from exc
        self.stats.time_steps += 1
        return u

    def _initial(self, ctx):
        u = np.array(self.u0.value(ctx.p), dtype=np.float64)
        check_finite(u, "u0(p)")
        return u

    def _forward_only(self, ctx, keep: bool):
        """The forward march: the value, and the trajectory when ``keep``."""
        bcache: dict = {}
        u = self._initial(ctx)
        traj = [u] if keep else None
        window = {0: u}
        total = self._objective_at(ctx, 0, u)
        s = self.time.history
        for k in range(1, self.time.n_steps + 1):
            u = self._advance(ctx, k, window.__getitem__, bcache)
            self._report("forward", k)
            window[k] = u
            window.pop(k - s - 1, None)
            total += self._objective_at(ctx, k, u)
            if keep:
                traj.append(u)
        total += sum(float(obj.value(None, ctx.p)) for obj in self.param_terms)
        if not np.isfinite(total):
            raise NonFiniteError(f"J(p) = {total}: the march produced a non-finite objective (is dt too large "
                                 f"for an explicit scheme, or p out of range?)")
        ctx.value = float(total)
        if keep:
            ctx.u = traj
            self.stats.stored_states = max(self.stats.stored_states, len(traj))

    # -- the driver of a forward-then-reverse march -------------------------------------------------------
    def _schedule(self, width: int, held: int = 0):
        """The actions of a march whose levels hold ``width`` vectors each, ``held`` vectors being kept
        already: store every level when they fit (and no ``snapshots`` count is set), else the schedule."""
        import checkpoint_schedules as cs

        N, s = self.time.n_steps, self.time.history
        W = cs.StorageType.WORK
        if self.snapshots is None and self._fits(width * (N + 1), held):
            return [cs.Forward(0, N, False, True, W), cs.EndForward(), cs.Reverse(N, 0, True), cs.EndReverse()]
        mixed = self.schedule == "mixed"
        unit = width * (s + 1 if mixed else s)  # a mixed unit may hold a step's adjoint dependencies: s + 1 levels
        if self.snapshots is not None:
            ram = self.snapshots
        else:
            ram = max(int((self.memory // (8 * self.n) - held) // unit), 0)
        disk = 0
        if self.checkpoint_dir is not None:
            disk = N if self.disk_snapshots is None else self.disk_snapshots
        if ram + disk < 1:
            need = (held + unit) * 8 * self.n
            if self.checkpoint_dir is not None:
                raise ValueError(f"disk_snapshots = 0 and memory = {self.memory} bytes hold no checkpoint of this "
                                 f"march: allow disk_snapshots >= 1, or give at least {need} bytes of memory")
            raise ValueError(
                f"memory = {self.memory} bytes holds no checkpoint of this march ({unit} state vector(s) of "
                f"{8 * self.n} bytes each{f', next to {held} kept' if held else ''}): give at least {need} bytes, "
                f"or a checkpoint_dir for checkpoints on disk")
        if N == 1:  # nothing to place: the one step's states stay in the working levels
            return [cs.Forward(0, 1, False, True, W), cs.EndForward(), cs.Reverse(1, 0, True), cs.EndReverse()]
        if mixed:
            if ram >= 1:
                return cs.MixedCheckpointSchedule(N, ram, storage=cs.StorageType.RAM)
            return cs.MixedCheckpointSchedule(N, disk, storage=cs.StorageType.DISK)
        return cs.MultistageCheckpointSchedule(N, ram, disk)

    def _march(self, ctx, width, start, advance, reverse, finish, held=0):
        """Run a forward-then-reverse march under a checkpoint schedule.

        ``start`` is level 0 (a tuple of ``width`` vectors), ``advance(k, prev, initial)`` returns level k from
        ``prev(level)`` (the earlier levels), ``reverse(k, get)`` runs the adjoint of step k with ``get(level)``
        the levels k, k-1, ..., and ``finish(get)`` the level-0 part.
        """
        from checkpoint_schedules import Copy, EndForward, EndReverse, Forward, Move, Reverse, StorageType

        schedule = self._schedule(width, held)
        N, s = self.time.n_steps, self.time.history
        work = {0: start}
        ram: dict = {}
        folder = None
        initial = True
        peak = 0

        def get(level):
            return work[level]

        def put(key, first, snap, storage):
            """Levels first.. of ``snap`` stored under ``key`` (restart data or a step's adjoint dependencies)."""
            nonlocal folder
            if storage == StorageType.DISK:
                if folder is None:
                    try:
                        folder = tempfile.mkdtemp(prefix="adjopt-checkpoints-", dir=self.checkpoint_dir)
                    except OSError as exc:
                        raise PermissionError(f"cannot create a checkpoint folder in {self.checkpoint_dir!r}: "
                                              f"{exc.strerror}") from exc
                self._write(folder, key, first, snap)
                self.stats.disk_checkpoints += 1
            else:
                ram[key] = (first, snap)
            self.stats.checkpoints += 1

        def held_now():
            return held + width * len(work) + sum(len(lv) for _, snap in ram.values() for lv in snap)

        try:
            for action in schedule:
                if isinstance(action, Forward):
                    n0, n1 = int(action.n0), min(int(action.n1), N)
                    if action.write_ics:
                        first = max(n0 - s + 1, 0)
                        put(n0, first, [work[lv] for lv in range(first, n0 + 1)], action.storage)
                    keep = action.write_adj_deps and action.storage == StorageType.WORK
                    for n in range(n0, n1):
                        work[n + 1] = advance(n + 1, get, initial)
                        self._report("forward", n + 1)
                        if not initial:
                            self.stats.recomputed_steps += 1
                        if action.write_adj_deps and not keep:  # step n's adjoint needs levels n+1-s..n+1
                            first = max(n + 1 - s, 0)
                            put(n, first, [work[lv] for lv in range(first, n + 2)], action.storage)
                        if not keep:
                            for lv in [lv for lv in work if lv < n + 2 - s]:
                                del work[lv]
                        peak = max(peak, held_now())
                elif isinstance(action, Reverse):
                    for n in range(int(action.n1) - 1, int(action.n0) - 1, -1):
                        reverse(n + 1, get)
                        self._report("reverse", N - n)
                        if action.clear_adj_deps:
                            for lv in [lv for lv in work if lv > n]:
                                del work[lv]
                elif isinstance(action, (Copy, Move)):
                    n = int(action.n)
                    if action.to_storage == StorageType.WORK:
                        if action.from_storage == StorageType.DISK:
                            first, snap = self._read(folder, n)
                        else:
                            first, snap = ram[n]
                        work = {first + i: v for i, v in enumerate(snap)}
                    if isinstance(action, Move):
                        if action.from_storage == StorageType.DISK:
                            os.remove(os.path.join(folder, f"level_{n}.npz"))
                        else:
                            ram.pop(n, None)
                elif isinstance(action, EndForward):
                    initial = False
                elif isinstance(action, EndReverse):
                    break
                else:  # pragma: no cover - a schedule action this driver does not know
                    raise RuntimeError(f"unexpected checkpoint action {action!r}")
            finish(get)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self.stats.stored_states = max(self.stats.stored_states, peak)

    @staticmethod
    def _write(folder, n, first, snap):
        """Level ``n``'s restart data to ``folder``, atomically (a temporary file, then a rename)."""
        path = os.path.join(folder, f"level_{n}.npz")
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, first=first, **{f"v{i}_{j}": x for i, lv in enumerate(snap) for j, x in enumerate(lv)})
        os.replace(tmp, path)

    @staticmethod
    def _read(folder, n):
        with np.load(os.path.join(folder, f"level_{n}.npz")) as data:
            first = int(data["first"])
            keys = sorted((k for k in data.files if k.startswith("v")), key=lambda k: tuple(map(int, k[1:].split("_"))))
            levels: dict = {}
            for k in keys:
                i, j = map(int, k[1:].split("_"))
                levels.setdefault(i, []).append(data[k])
        return first, [tuple(levels[i]) for i in sorted(levels)]

    # -- gradient -----------------------------------------------------------------------------------------
    def _gradient(self, ctx):
        p, N = ctx.p, self.time.n_steps
        if ctx.u is None and self.snapshots is None and self._fits(N + 1):
            if ctx.value is not None:
                self.stats.recomputed_steps += N  # value() marched without keeping the states
            self._forward_only(ctx, True)
        grad = np.zeros(self.n_params)
        carry: dict = {}  # level -> - sum E^T lam from later steps
        wb: dict = {}  # level -> sum gamma lam (for the right-hand side's vjp)
        steady_w = np.zeros(self.n)
        CA = None if self.A_op is None else _Batch(self.A_op, p, self.batch)
        CM = None if self.M_op is None else _Batch(self.M_op, p, self.batch)
        keep_lam = ctx.u is not None and self._fits(2 * N + 1)
        lams = [None] * (N + 1) if keep_lam else None
        bcache: dict = {}
        total = [0.0]  # the objective, summed by the first sweep of a checkpointed march

        def advance(k, prev, initial):  # a checkpointed march (the states are not kept)
            u = self._advance(ctx, k, lambda lv: prev(lv)[0], bcache)
            if initial:
                total[0] += self._objective_at(ctx, k, u)
            return (u,)

        def U(get, level):
            return ctx.u[level] if ctx.u is not None else get(level)[0]

        def reverse(k, get):
            a, g = self.time.coefficients(k)
            u_k = U(get, k)
            rhs = carry.pop(k, None)
            gu = self._grad_u(ctx, k, u_k)
            if gu is not None:
                rhs = gu if rhs is None else rhs + gu
            if rhs is None:
                rhs = np.zeros(self.n)
            lam = self._solve(self._fac(ctx, a[0], g[0]), rhs, "adjoint", transpose=True)
            if lams is not None:
                lams[k] = lam
            self._add_grad_p(ctx, k, u_k, grad)
            zM = np.zeros(self.n) if CM is not None else None
            zA = np.zeros(self.n) if CA is not None else None
            for j in range(len(a)):
                u_j = u_k if j == 0 else U(get, k - j)
                if zM is not None and a[j] != 0.0:
                    zM += a[j] * u_j
                if zA is not None and g[j] != 0.0:
                    zA += g[j] * u_j
                if j >= 1 and (a[j] != 0.0 or g[j] != 0.0):
                    t = self._mat(ctx, a[j], g[j]).T @ lam
                    carry[k - j] = -t if k - j not in carry else carry[k - j] - t
                if g[j] != 0.0 and self.rhs is not None and self.rhs.depends_on_p:
                    if self.rhs.steady:
                        steady_w[:] += g[j] * lam
                    else:
                        wb[k - j] = g[j] * lam if k - j not in wb else wb[k - j] + g[j] * lam
            if CM is not None:
                CM.add(lam, zM)
            if CA is not None:
                CA.add(lam, zA)
            if k in wb:
                self.rhs.vjp_add(self.time.times[k], p, wb.pop(k), grad)

        def finish(get):
            u_0 = U(get, 0)
            mu = carry.pop(0, np.zeros(self.n))
            gu = self._grad_u(ctx, 0, u_0)
            if gu is not None:
                mu = mu + gu
            ctx.mu = mu
            self._add_grad_p(ctx, 0, u_0, grad)
            if self.u0.depends_on_p:
                grad[:] += self.u0.vjp(p, mu)
            if self.rhs is not None and self.rhs.depends_on_p:
                if self.rhs.steady:
                    self.rhs.vjp_add(self.time.times[0], p, steady_w, grad)
                elif 0 in wb:
                    self.rhs.vjp_add(self.time.times[0], p, wb.pop(0), grad)
            for C in (CA, CM):
                if C is not None:
                    grad[:] -= C.flush()

        t0 = time.perf_counter()
        recompute = ctx.value is not None  # value() marched already without keeping the states
        if ctx.u is not None:
            # every level kept: the reverse march alone
            for k in range(N, 0, -1):
                reverse(k, None)
                self._report("reverse", N - k + 1)
            finish(None)
        else:
            u0 = self._initial(ctx)
            total[0] = self._objective_at(ctx, 0, u0)
            self._march(ctx, 1, (u0,), advance, reverse, finish)
            if recompute:
                self.stats.recomputed_steps += N
            else:
                ctx.value = float(total[0] + sum(float(o.value(None, p)) for o in self.param_terms))
        for obj in self.param_terms:
            grad += obj.grad_p(None, p)
        check_finite(grad, "the gradient")
        self.times["adjoint"] += time.perf_counter() - t0
        if lams is not None:
            ctx.lam = lams
            self.stats.stored_states = max(self.stats.stored_states, 2 * N + 1)
        ctx.grad = grad

    # -- Hessian action -----------------------------------------------------------------------------------
    def _hessp(self, ctx, dp, gauss_newton=False):
        p, N = ctx.p, self.time.n_steps
        t0 = time.perf_counter()
        H = np.zeros(self.n_params)
        dA = None if self.A_op is None else self.A_op._csr(self.A_op._tangent_values(p, dp))
        dM = None if self.M_op is None else self.M_op._csr(self.M_op._tangent_values(p, dp))
        dmats: dict = {}

        def dE(a, g):
            """alpha dM + gamma dA, or None when it vanishes."""
            key = (a, g)
            if key not in dmats:
                parts = [c * X for c, X in ((a, dM), (g, dA)) if c != 0.0 and X is not None]
                dmats[key] = None if not parts else sp.csr_array(parts[0] if len(parts) == 1 else parts[0] + parts[1])
            return dmats[key]

        carry: dict = {}
        carry2: dict = {}
        wb: dict = {}
        wb2: dict = {}
        steady = [np.zeros(self.n), np.zeros(self.n)]
        CA = None if self.A_op is None else _Batch(self.A_op, p, self.batch)
        CM = None if self.M_op is None else _Batch(self.M_op, p, self.batch)
        SA = None if self.A_op is None or self.A_op.affine else _Batch(self.A_op, p, self.batch, dp)
        SM = None if self.M_op is None or self.M_op.affine else _Batch(self.M_op, p, self.batch, dp)
        bcache: dict = {}
        dbcache: dict = {}
        kept_u = ctx.u is not None
        kept_lam = ctx.lam is not None or gauss_newton
        has_b = self.rhs is not None and self.rhs.depends_on_p

        du0 = self.u0.jvp(p, dp) if self.u0.depends_on_p else np.zeros(self.n)
        du0 = np.array(du0, dtype=np.float64).reshape(self.n)
        if kept_u:
            start = (du0,)
            held = len(ctx.u) + (len(ctx.lam) - 1 if ctx.lam is not None else 0)
        else:
            start = (self._initial(ctx), du0)
            held = 0
        width = len(start)

        def U(get, level):
            return ctx.u[level] if kept_u else get(level)[0]

        def dU(get, level):
            return get(level)[-1]

        def advance(k, prev, initial):
            a, g = self.time.coefficients(k)
            if kept_u:
                u_k = ctx.u[k]
            else:
                u_k = self._advance(ctx, k, lambda lv: prev(lv)[0], bcache)
            r = np.zeros(self.n)
            for j in range(len(a)):
                u_j = u_k if j == 0 else (ctx.u[k - j] if kept_u else prev(k - j)[0])
                if has_b and g[j] != 0.0:
                    r += g[j] * self._db(ctx, dbcache, k - j, dp)
                if j >= 1 and (a[j] != 0.0 or g[j] != 0.0):
                    r -= self._mat(ctx, a[j], g[j]) @ prev(k - j)[-1]
                d = dE(a[j], g[j])
                if d is not None:
                    r -= d @ u_j
            du = self._solve(self._fac(ctx, a[0], g[0]), r, "tangent")
            return (du,) if kept_u else (u_k, du)

        def add(store, level, v):
            store[level] = v.copy() if level not in store else store[level] + v

        def reverse(k, get):
            a, g = self.time.coefficients(k)
            fac = self._fac(ctx, a[0], g[0])
            u_k, du_k = U(get, k), dU(get, k)
            if gauss_newton:
                lam = None
            elif kept_lam:
                lam = ctx.lam[k]
            else:
                rhs = carry.pop(k, np.zeros(self.n))
                gu = self._grad_u(ctx, k, u_k)
                if gu is not None:
                    rhs = rhs + gu
                lam = self._solve(fac, rhs, "adjoint", transpose=True)
            rhs2 = carry2.pop(k, np.zeros(self.n)) + self._second_objective(ctx, k, u_k, du_k, dp, H)
            d0 = dE(a[0], g[0])
            if d0 is not None and lam is not None:
                rhs2 = rhs2 - d0.T @ lam
            dl = self._solve(fac, rhs2, "second_adjoint", transpose=True)
            zM = [np.zeros(self.n), np.zeros(self.n)] if CM is not None else None
            zA = [np.zeros(self.n), np.zeros(self.n)] if CA is not None else None
            for j in range(len(a)):
                u_j = u_k if j == 0 else U(get, k - j)
                du_j = du_k if j == 0 else dU(get, k - j)
                if zM is not None and a[j] != 0.0:
                    zM[0] += a[j] * u_j
                    zM[1] += a[j] * du_j
                if zA is not None and g[j] != 0.0:
                    zA[0] += g[j] * u_j
                    zA[1] += g[j] * du_j
                if j >= 1:
                    E = self._mat(ctx, a[j], g[j]) if (a[j] != 0.0 or g[j] != 0.0) else None
                    d = dE(a[j], g[j])
                    if E is not None:
                        add(carry2, k - j, -(E.T @ dl))
                        if not kept_lam:
                            add(carry, k - j, -(E.T @ lam))
                    if d is not None and lam is not None:
                        add(carry2, k - j, -(d.T @ lam))
                if has_b and g[j] != 0.0:
                    if self.rhs.steady:
                        steady[1] += g[j] * dl
                        if lam is not None:
                            steady[0] += g[j] * lam
                    else:
                        add(wb2, k - j, g[j] * dl)
                        if lam is not None:
                            add(wb, k - j, g[j] * lam)
            for C, S, z in ((CM, SM, zM), (CA, SA, zA)):
                if C is not None:
                    C.add(dl, z[0])
                    if lam is not None:
                        C.add(lam, z[1])
                if S is not None and lam is not None:
                    S.add(lam, z[0])
            if k in wb2:
                self.rhs.vjp_add(self.time.times[k], p, wb2.pop(k), H)
                w = wb.pop(k, None)
                if not self.rhs.affine and w is not None:
                    self.rhs.second_add(self.time.times[k], p, w, dp, H)

        def finish(get):
            u_0, du_0 = U(get, 0), dU(get, 0)
            if gauss_newton:
                mu = None
            elif kept_lam:
                mu = ctx.mu
            else:
                mu = carry.pop(0, np.zeros(self.n))
                gu = self._grad_u(ctx, 0, u_0)
                if gu is not None:
                    mu = mu + gu
            dmu = carry2.pop(0, np.zeros(self.n)) + self._second_objective(ctx, 0, u_0, du_0, dp, H)
            if self.u0.depends_on_p:
                H[:] += self.u0.vjp(p, dmu)
                if not self.u0.affine and mu is not None:
                    H[:] += self.u0.second(p, mu, dp)
            if has_b:
                t_0 = self.time.times[0]
                if self.rhs.steady:
                    self.rhs.vjp_add(t_0, p, steady[1], H)
                    if not self.rhs.affine and not gauss_newton:
                        self.rhs.second_add(t_0, p, steady[0], dp, H)
                elif 0 in wb2:
                    self.rhs.vjp_add(t_0, p, wb2.pop(0), H)
                    if not self.rhs.affine and 0 in wb:
                        self.rhs.second_add(t_0, p, wb.pop(0), dp, H)
            for C in (CA, CM, SA, SM):
                if C is not None:
                    H[:] -= C.flush()

        self._march(ctx, width, start, advance, reverse, finish, held=held)
        if not kept_u and ctx.value is not None:  # the march's first sweep solved the states again
            self.stats.recomputed_steps += N
        for obj in self.param_terms:
            H += obj.hess_pp(None, p, dp)
        check_finite(H, "the Hessian action")
        self.times["hessp"] += time.perf_counter() - t0
        return H

    def __repr__(self):
        return (f"TransientReducedFunctional(n={self.n}, n_params={self.n_params}, {self.time!r}, "
                f"solver={self.solver.name!r})")


__all__ = ["TransientReducedFunctional", "TransientStats", "DEFAULT_MEMORY"]
