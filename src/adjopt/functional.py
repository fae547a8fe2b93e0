"""The reduced functional J(p) = f(u(p), p) with A(p) u = b(p).

Formulas (DESIGN.md); all solves of one p share one factorization of A(p):

    A u = b                                          forward
    A^T lam = df/du                                  adjoint
    grad J = df/dp - C(lam, u) + (db/dp)^T lam

    A du = -(dA/dp . dp) u + (db/dp) dp              tangent
    A^T dl = f_uu du + f_up dp - (dA/dp . dp)^T lam  second adjoint
    H dp = f_pp dp + f_pu du - C(dl, u) - C(lam, du) - C2(lam, u, dp)
           + (db/dp)^T dl + lam^T (d2b/dp2 . dp)

with C(w, z)_k = w^T (dA/dp_k) z. For k right-hand sides (b of shape (n, k))
the same formulas hold column by column, with one multi-column solve.

With a parameter map rho = M(p) in front of A and b (the objective keeps
seeing p), the PDE terms are pulled back through M: with
q = -C(lam, u) + (db/drho)^T lam, the rho-gradient of the PDE part,

    grad J = df/dp + M'^T q
    H dp   = f_pp dp + f_pu du + M'^T [-C(dl, u) - C(lam, du) - C2(lam, u, drho)
             + (db/drho)^T dl + lam^T (d2b/drho2 . drho)] + M''[q, dp]

where drho = M' dp drives the tangent and second-adjoint solves.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse.linalg as sla

from ._threads import dot
from ._validate import as_count, as_directions, as_parameter, check_finite, check_flag, check_tolerance, owned
from .cache import DEFAULT_CACHE_BYTES, StateCache
from .errors import NonFiniteError, PatternError
from .objectives import Objective
from .operators import ParametricMatrix, ParametricResidual, as_vector
from .solvers import SOLVE_KINDS, make_solver

logger = logging.getLogger(__name__)


def _power_of_two_scales(D: np.ndarray) -> np.ndarray:
    """(k,): 2^round(log2 max|D[:, i]|) for each column (1 for a zero column): dividing by it is exact, and the
    largest entry (not the norm, whose square may overflow) is what decides the scale."""
    big = np.maximum(D.max(axis=0), -D.min(axis=0))  # max |D[:, i]| without a temporary |D|
    out = np.ones(D.shape[1])
    nz = big > 0
    out[nz] = np.exp2(np.round(np.log2(big[nz])))
    return out


def _columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a and b side by side as one (n, k_a + k_b) array: the operators sum a contraction over columns and act
    column by column in a tangent, so two actions of one operator become one pass (one coefficient derivative,
    one read of the element matrices)."""
    return np.concatenate([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], axis=1)


def _frozen(x: np.ndarray) -> np.ndarray:
    """x as an array on an immutable buffer: neither it nor a view of it (nor its base) can be made writable."""
    return np.frombuffer(np.ascontiguousarray(x).tobytes(), dtype=x.dtype).reshape(x.shape)


@dataclass
class _State:
    """Everything cached for one parameter value."""

    A: object
    factorization: object
    b: np.ndarray
    u: np.ndarray
    rho: np.ndarray
    lam: np.ndarray | None = None
    lam_tol: float = np.inf  # relative residual the cached lam was solved to (0: direct, exact)
    q: np.ndarray | None = None  # rho-gradient of the PDE part, kept for hessp with a nonlinear map
    shared: bool = False  # the factorization serves every p (A does not depend on p): held once, not per entry
    tolerances: dict | None = None  # {kind: default relative tolerance}; None for a direct factorization (exact)
    #: the adjoints of functionals that share this state (:meth:`ReducedFunctional.with_objective`), by their key
    adjoints: dict = field(default_factory=dict)

    def tolerance(self, kind: str, tol: float | None = None) -> float:
        """The relative residual a ``kind`` solve with ``tol`` reaches (0: direct), without the factorization."""
        if self.tolerances is None:
            return 0.0
        return self.tolerances[kind] if tol is None else float(tol)

    @property
    def nbytes(self) -> int:
        A = self.A
        a_bytes = 0 if self.shared else A.data.nbytes + A.indices.nbytes + A.indptr.nbytes
        fac_bytes = 0 if self.shared or self.factorization is None else self.factorization.nbytes
        # u, b and room for lam
        return a_bytes + fac_bytes + 3 * self.u.nbytes


class _SharedView:
    """A state of another functional as a sibling sees it: that functional's A, factorization, b and u (read
    through), and the sibling's own adjoint lam, its tolerance and q (kept in the state's ``adjoints``)."""

    __slots__ = ("base", "key")

    def __init__(self, base: _State, key: int):
        self.base = base
        self.key = key

    def __getattr__(self, name):
        return getattr(self.base, name)

    def _slot(self) -> dict:
        return self.base.adjoints.setdefault(self.key, {"lam": None, "lam_tol": np.inf, "q": None})

    @property
    def lam(self):
        return self._slot()["lam"]

    @lam.setter
    def lam(self, value):
        self._slot()["lam"] = value

    @property
    def lam_tol(self):
        return self._slot()["lam_tol"]

    @lam_tol.setter
    def lam_tol(self, value):
        self._slot()["lam_tol"] = value

    @property
    def q(self):
        return self._slot()["q"]

    @q.setter
    def q(self, value):
        self._slot()["q"] = value


_SIBLING_KEYS = itertools.count(1)


class ReducedFunctional:
    """J(p) = f(u(p), p) subject to A(p) u = b(p), with gradient and Hessian actions.

    Parameters
    ----------
    matrix
        The :class:`~adjopt.operators.ParametricMatrix` A(p); a nonlinear
        :class:`~adjopt.operators.ParametricResidual` R(u, p) gives a
        :class:`~adjopt.functional_nonlinear.NonlinearReducedFunctional` (Newton; ``rhs=None``).
    rhs
        b: an array (n,) or (n, k) (constant), or a :class:`~adjopt.operators.ParametricVector`.
    objective
        An :class:`~adjopt.objectives.Objective` f(u, p).
    solver
        A :class:`~adjopt.solvers.LinearSolver` or its name (``"auto"``, ``"superlu"``, ``"amg"``,
        ``"cholmod"``, ``"pardiso"``); default ``"auto"``: the fastest installed for the size and
        symmetry of A, logged.
    cache_bytes
        Bound of the state cache (factorizations, states, adjoints), LRU.
    keep_factorizations
        How many points keep their factorization (the most recently used; default 2: the current iterate
        and a trial point). Older cached points keep u, lam and A(p) and are factorized again if a solve
        needs them; the factorization they give up is recycled (CHOLMOD refactorizes in its memory).
    parameter_map
        Optional :class:`~adjopt.maps.ParameterMap` rho = M(p) applied before A
        and b (filters, projections, nodal -> element); the objective sees p.
    self_adjoint
        ``None`` (default): detected. When the objective is f = l^T u
        (``objective.linear_load``, e.g. :class:`~adjopt.Compliance`), b = l
        is constant and A(p) is symmetric (``matrix.symmetric``), the adjoint
        equation A^T lam = l is the state equation, so lam = u and no adjoint
        solve is made; in a Hessian action the second adjoint equals the
        tangent (dl = du), so it costs one solve instead of two. ``False``
        turns the shortcut off (the general path); ``True`` insists (error if
        the conditions do not hold).

    Notes
    -----
    Every method takes p: nothing depends on "the last point evaluated". The
    state cache makes value -> gradient -> hessp at one p cost one
    factorization, one forward solve, one adjoint solve and two solves per
    Hessian action.
    """

    _source = None  # see with_objective
    _key = None

    def __new__(cls, matrix=None, *args, **kwargs):
        # a nonlinear residual R(u, p) gets the Newton-based functional (same API)
        if cls is ReducedFunctional and isinstance(matrix, ParametricResidual):
            from .functional_nonlinear import NonlinearReducedFunctional

            return super().__new__(NonlinearReducedFunctional)
        return super().__new__(cls)

    def __init__(self, matrix: ParametricMatrix, rhs, objective: Objective, solver=None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, parameter_map=None, self_adjoint: bool | None = None,
                 keep_factorizations: int = 2):
        if not isinstance(matrix, ParametricMatrix):
            raise TypeError(f"matrix must be a ParametricMatrix, got {type(matrix).__name__}")
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an Objective, got {type(objective).__name__}")
        self._matrix = matrix
        self._rhs = as_vector(rhs)
        if self.rhs.n != matrix.shape[0]:
            raise PatternError(f"b has {self.rhs.n} rows but A(p) is {matrix.shape[0]} x {matrix.shape[1]}")
        if self.rhs.n_params is not None and self.rhs.n_params != matrix.n_params:
            raise PatternError(f"b(p) takes {self.rhs.n_params} parameters but A(p) takes {matrix.n_params}")
        self._objective = objective
        self._map = parameter_map
        if parameter_map is not None and parameter_map.n_out != matrix.n_params:
            raise PatternError(
                f"the parameter map produces {parameter_map.n_out} values but A(rho) takes {matrix.n_params} parameters"
            )
        self._solver = self._accept(make_solver(solver))
        #: the functional whose states this one shares (:meth:`with_objective`), and its key in their adjoints
        self._source, self._key = None, None
        self.cache = StateCache(cache_bytes)
        self._map_version = None  # the parameter map's version the cached states were computed with
        #: (solver, factorization) of a matrix that does not depend on p (``matrix.constant``): one for every p
        self._fixed = None
        self.keep_factorizations = as_count(keep_factorizations, "keep_factorizations")
        #: the states that hold a factorization, least recently used first
        self._live: OrderedDict[int, _State] = OrderedDict()
        #: wall seconds spent by phase since construction (or reset_stats): "filter" (the parameter map),
        #: "assembly", "factorize", "solve" (every kind), "sensitivity" (contractions, objective derivatives)
        self.times = Counter()
        if self_adjoint not in (None, True, False):
            raise ValueError(f"self_adjoint must be None (detect), True or False, got {self_adjoint!r}")
        self._self_adjoint_request = self_adjoint
        self._set_self_adjoint()

    def _set_self_adjoint(self) -> None:
        detected = self._detect_self_adjoint()
        request = self._self_adjoint_request
        if request is True and not detected:
            raise ValueError(
                "self_adjoint=True needs an objective f = l^T u (objective.linear_load, e.g. Compliance(b)) with the "
                "constant right-hand side b = l and a symmetric A(p) (matrix.symmetric); this problem is not"
            )
        self.self_adjoint = detected if request is None else bool(request)
        if self.self_adjoint:
            logger.debug("ReducedFunctional: self-adjoint (lam = u), no adjoint solves")

    # -- what the functional is made of: A, b and the map are fixed; the objective and the solver may change
    @property
    def matrix(self) -> ParametricMatrix:
        """A(p) (fixed: build a new functional for another one)."""
        return self._matrix

    @property
    def rhs(self):
        """b(p), a :class:`~adjopt.operators.ParametricVector` (fixed)."""
        return self._rhs

    @property
    def map(self):
        """The parameter map rho = M(p), or None (fixed)."""
        return self._map

    @matrix.setter
    def matrix(self, value):
        raise AttributeError("the matrix of a ReducedFunctional cannot be replaced: its cached states were solved "
                             "with it; build a new ReducedFunctional")

    @rhs.setter
    def rhs(self, value):
        raise AttributeError("the right-hand side of a ReducedFunctional cannot be replaced: its cached states were "
                             "solved with it; build a new ReducedFunctional")

    @map.setter
    def map(self, value):
        raise AttributeError("the parameter map of a ReducedFunctional cannot be replaced: its cached states were "
                             "computed with it; build a new ReducedFunctional")

    @property
    def objective(self) -> Objective:
        """f(u, p). Setting another one keeps the cached states and factorizations and forgets the adjoints."""
        return self._objective

    @objective.setter
    def objective(self, value: Objective):
        if not isinstance(value, Objective):
            raise TypeError(f"objective must be an Objective, got {type(value).__name__}")
        self._objective = value
        if self._source is not None:
            for st in self._source.cache.entries():
                st.adjoints.pop(self._key, None)
        for st in self.cache.entries():
            st.lam, st.lam_tol, st.q = None, np.inf, None
        self._set_self_adjoint()

    def with_objective(self, objective: Objective, self_adjoint: bool | None = None) -> ReducedFunctional:
        """Another reduced functional of the same A(p), b(p), parameter map and solver, for ``objective``,
        that shares this one's states.

        A state u(p) and its factorization are made once, by whichever of
        the two asks first, and serve both: two constraints of one design
        (a stress aggregate and the compliance) cost one factorization and
        one forward solve per design, plus one adjoint solve each (none for
        a self-adjoint objective such as the compliance). Each keeps its own
        adjoint, gradient and Hessian data. The states live in this
        functional's cache (its size, its ``keep_factorizations``);
        ``forget()`` on either drops them for both.
        """
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an Objective, got {type(objective).__name__}")
        source = self if self._source is None else self._source
        other = ReducedFunctional(source.matrix, source.rhs, objective, solver=source.solver,
                                  parameter_map=source.map, self_adjoint=self_adjoint)
        other._source, other._key = source, next(_SIBLING_KEYS)
        return other

    def forget(self) -> None:
        """Drop every cached state, adjoint and factorization of a p-dependent matrix.

        For a change the cache cannot see: a parameter map changed in place
        (the beta of a :class:`~adjopt.maps.HeavisideProjection` in a
        continuation), so that the same p now gives another rho. A functional
        that shares another's states (:meth:`with_objective`) drops that one's.
        """
        if self._source is not None:
            self._source.forget()
        self.cache.clear()
        self._live.clear()

    @property
    def solver(self):
        """The :class:`~adjopt.solvers.LinearSolver`. Setting another one (or a name) empties the state cache."""
        return self._solver if self._source is None else self._source.solver

    @solver.setter
    def solver(self, value):
        if self._source is not None:
            raise AttributeError("this functional shares the states of another (with_objective): set the solver of "
                                 "that one")
        self._solver = self._accept(make_solver(value))
        self.cache.clear()
        self._live.clear()
        self._fixed = None

    def _accept(self, solver):
        """The solver, or an error when this functional cannot use it."""
        return solver

    def _detect_self_adjoint(self) -> bool:
        """f = l^T u, b = l constant and A(p) symmetric: then A^T lam = l is A u = b, so lam = u."""
        load = getattr(self.objective, "linear_load", None)
        if load is None or self.rhs.depends_on_p or not getattr(self.matrix, "symmetric", False):
            return False
        b = self.rhs.value(None)
        return b.shape == np.shape(load) and bool(np.array_equal(b, load))

    # -- bookkeeping -------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Length of p (the map's input when there is a map)."""
        return self.matrix.n_params if self.map is None else self.map.n_in

    @property
    def stats(self):
        """Solver counters: factorizations, solves by kind, right-hand sides, times."""
        return self.solver.stats

    def reset_stats(self) -> None:
        """Zero the solver counters and the phase times."""
        self.solver.stats.reset()
        self.times.clear()

    def _p(self, p) -> np.ndarray:
        """p checked, as a read-only copy: nothing cached or handed on aliases the caller's array."""
        return owned(as_parameter(p, self.n_params))

    def _factorize(self, A, rho):
        """(factorization, shared): a matrix that does not depend on p is factorized once per solver."""
        constant = getattr(self.matrix, "constant", False)
        if constant and self._fixed is not None and self._fixed[0] is self.solver:
            return self._fixed[1], True
        if not constant:
            self._make_room()
        if getattr(self.solver, "uses_operator", False):
            # solvers that know the discretisation (geometric multigrid) also see A(.) and rho
            fac = self.solver.factorize(A, operator=self.matrix, rho=rho)
        else:
            fac = self.solver.factorize(A)
        if constant:
            self._fixed = (self.solver, fac)
        return fac, constant

    def _make_room(self) -> None:
        """Release the factorizations of the least recently used points beyond ``keep_factorizations - 1``,
        before a new one is made (so that the solver can refactorize in the memory of a released one)."""
        while len(self._live) >= self.keep_factorizations:
            _, old = self._live.popitem(last=False)
            fac, old.factorization = old.factorization, None
            if fac is not None:
                self.solver.recycle(fac)

    def _use(self, st: _State):
        """The factorization of a cached point, made again if it was released; marks it recently used."""
        if isinstance(st, _SharedView):
            return self._source._use(st.base)
        if st.factorization is None:
            logger.debug("ReducedFunctional: factorizing a cached point again (its factorization was released)")
            st.factorization, _ = self._factorize(st.A, st.rho)
        if not st.shared:
            self._live[id(st)] = st
            self._live.move_to_end(id(st))
        return st.factorization

    def _check_map_version(self) -> None:
        """Drop the cached states when the parameter map changed in place (its ``version`` moved)."""
        v = getattr(self.map, "version", 0)
        if v != self._map_version:
            if self._map_version is not None:
                logger.debug("ReducedFunctional: the parameter map changed (version %s -> %s); cached states dropped",
                             self._map_version, v)
                self.forget()
            self._map_version = v

    def _state(self, p: np.ndarray) -> _State:
        if self._source is not None:
            return _SharedView(self._source._state(p), self._key)
        self._check_map_version()
        st = self.cache.get(p)
        if st is not None:
            return st
        times, clock = self.times, time.perf_counter
        t0 = clock()
        # p is owned (see _p); whatever is computed from it and kept is owned too (a map or a callback may
        # hand back a buffer it reuses)
        rho = p if self.map is None else owned(self.map.forward(p), "the parameter map's output rho = M(p)")
        t1 = clock()
        A = self.matrix.assemble(rho)
        b = self.rhs.value(rho)
        if self.rhs.depends_on_p:
            b = owned(b, "the right-hand side b(p)")
        t2 = clock()
        fac, shared = self._factorize(A, rho)
        t3 = clock()
        u = _frozen(fac.solve(b, kind="forward"))  # cached: state() hands out views that cannot be made writable
        times["filter"] += t1 - t0
        times["assembly"] += t2 - t1
        times["factorize"] += t3 - t2
        times["solve"] += clock() - t3
        tolerances = None if fac.exact else {kind: fac.tolerance(kind) for kind in SOLVE_KINDS}
        st = _State(A=A, factorization=fac, b=b, u=u, rho=rho, shared=shared, tolerances=tolerances)
        self._use(st)
        self.cache.put(p, st)
        return st

    def _adjoint(self, p: np.ndarray, st: _State, tol: float | None = None) -> np.ndarray:
        """lam, solved again only when ``tol`` asks for more accuracy than the cached one has."""
        want = st.tolerance("adjoint", tol)
        if st.lam is None and self.self_adjoint:
            st.lam, st.lam_tol = st.u, st.tolerance("forward")
            st.q = None
        if st.lam is None or want < st.lam_tol:
            rhs = self.objective.grad_u(st.u, p)
            t0 = time.perf_counter()
            st.lam = _frozen(self._use(st).solve(rhs, transpose=True, kind="adjoint", tol=tol))
            self.times["solve"] += time.perf_counter() - t0
            st.lam_tol = want
            st.q = None
        return st.lam

    def _pde_gradient(self, p: np.ndarray, st: _State, tol: float | None = None) -> np.ndarray:
        """q = -C(lam, u) + (db/drho)^T lam, the gradient of the PDE part with respect to rho."""
        lam = self._adjoint(p, st, tol)
        if st.q is None:
            t0 = time.perf_counter()
            q = -self.matrix.contract(st.rho, lam, st.u)
            if self.rhs.depends_on_p:
                q = q + self.rhs.vjp(st.rho, lam)
            st.q = q
            self.times["sensitivity"] += time.perf_counter() - t0
        return st.q

    # -- public API ----------------------------------------------------------------
    def state(self, p) -> np.ndarray:
        """u(p), the solution of A(p) u = b(p) (read-only view of the cached array)."""
        u = self._state(self._p(p)).u.view()
        u.flags.writeable = False
        return u

    def adjoint(self, p) -> np.ndarray:
        """lam(p), the solution of A(p)^T lam = df/du (read-only view)."""
        p = self._p(p)
        lam = self._adjoint(p, self._state(p)).view()
        lam.flags.writeable = False
        return lam

    def value(self, p) -> float:
        """J(p) = f(u(p), p).

        Raises :class:`~adjopt.errors.NonFiniteError` when J(p) is NaN or Inf (data, weights or a reference
        holding NaN/Inf, or an objective that overflows), rather than handing an optimizer a value it
        cannot compare.
        """
        p = self._p(p)
        v = float(self.objective.value(self._state(p).u, p))
        if not math.isfinite(v):
            raise NonFiniteError(
                f"J(p) = {v}: the objective is not finite at this p. Its data, weights or reference values may "
                "hold NaN or Inf, or it overflows (check the scale of p, b and the data)")
        return v

    def value_error(self, p) -> float:
        """An estimate of ``|value(p) - J(p)|`` from an inexact (iterative) forward solve; 0 with a factorization.

        With u_h the computed state, r = b - A u_h its residual and lam the
        adjoint at u_h, J(u) - J(u_h) = lam^T r + 0.5 e^T f_uu e (e = u - u_h):
        the dual-weighted residual ``|lam^T r|`` is the error up to a term of
        second order in e. It costs an adjoint solve when none is cached.
        Round-off is not included. The Taylor test uses it as a noise floor.
        """
        p = self._p(p)
        st = self._state(p)
        if st.tolerance("forward") == 0.0:
            return 0.0
        lam = self._adjoint(p, st)
        return abs(dot(lam, st.b - st.A @ st.u))

    def gradient(self, p, tol: float | None = None) -> np.ndarray:
        """grad J(p) = df/dp - C(lam, u) + (db/dp)^T lam.

        ``tol`` is the relative tolerance of the adjoint solve (iterative
        solvers; direct ones are exact): an optimizer that needs the gradient
        only roughly can pass a loose one. ``None`` takes the solver's default.
        """
        tol = check_tolerance(tol)
        p = self._p(p)
        st = self._state(p)
        q = self._pde_gradient(p, st, tol)
        t0 = time.perf_counter()
        g = self.objective.grad_p(st.u, p)
        t1 = time.perf_counter()
        g = g + (q if self.map is None else self.map.vjp(p, q))
        self.times["sensitivity"] += t1 - t0
        self.times["filter"] += time.perf_counter() - t1
        check_finite(g, "the gradient")
        return g

    def value_and_gradient(self, p, tol: float | None = None) -> tuple[float, np.ndarray]:
        """(J(p), grad J(p)) from one factorization."""
        return self.value(p), self.gradient(p, tol)

    def hessp(self, p, dp, tol: float | None = None, gauss_newton: bool = False) -> np.ndarray:
        """H(p) dp by forward-over-reverse: a tangent and a second-adjoint solve.

        ``dp`` of shape (m,) gives (m,); of shape (m, k), k directions at once give (m, k) from one multi-column
        tangent solve and one multi-column second-adjoint solve on the same factorization (a direct solver
        solves the k columns together; an iterative one column by column), equal to k single actions.

        ``tol`` is the relative tolerance of those two solves (iterative
        solvers), as an inexact Newton method chooses it; ``None`` takes the
        solver's defaults. ``gauss_newton=True`` drops every term with the
        adjoint lam (the curvature of the PDE constraint), leaving the
        Gauss-Newton Hessian J'^T f_uu J' + f_up/f_pu + f_pp: positive
        semidefinite for least-squares misfits plus convex regularization, and
        no adjoint solve is needed.
        """
        tol = check_tolerance(tol)
        gauss_newton = check_flag(gauss_newton, "gauss_newton")
        p = self._p(p)
        dP, single = as_directions(dp, self.n_params)
        st = self._state(p)
        lam = None if gauss_newton else self._adjoint(p, st)
        # H is linear in dp: each direction is scaled by a power of two near its largest entry (exact in floating point)
        # so that the solves see right-hand sides of order one, not 1e-160 (under an iterative solver's absolute
        # floor) or 1e+160 (overflow in its inner products)
        scale = _power_of_two_scales(dP)
        H = self._hessp_block(p, dP / scale, st, lam, tol) * scale
        return H[:, 0] if single else H

    def _solve_block(self, st, R, kind, tol, transpose=False):
        """Solve for the k right-hand sides R[..., i] (each of the state's shape) in one multi-column solve."""
        k = R.shape[-1]
        rhs = R[..., 0] if k == 1 else R.reshape(R.shape[0], -1)
        X = self._use(st).solve(rhs, transpose=transpose, kind=kind, tol=tol)
        return X.reshape(R.shape)

    def _hessp_block(self, p, dP, st, lam, tol):
        if dP.shape[1] > 1 and st.u.ndim == 1:
            return self._hessp_blocked(p, dP, st, lam, tol)
        clock = time.perf_counter
        t_start = clock()
        u, rho, M, f, b, pmap = st.u, st.rho, self.matrix, self.objective, self.rhs, self.map
        k = dP.shape[1]
        dR = [dP[:, i] if pmap is None else pmap.jvp(p, dP[:, i]) for i in range(k)]
        self_adjoint = self.self_adjoint and lam is not None and lam is u
        # A(p) symmetric for every p: so is dA/dp . drho, whose transpose action on lam is then its action;
        # (dA . drho) u and (dA . drho) lam come from one two-column pass of the tangent kernel
        paired = lam is not None and not self_adjoint and getattr(M, "symmetric", False)
        RT = np.empty(u.shape + (k,))
        t_lams = [None] * k
        for i, drho in enumerate(dR):
            if paired:
                c = u.size // u.shape[0]
                both = M.tangent(rho, drho, _columns(u, lam))
                RT[..., i], t_lams[i] = -both[:, :c].reshape(u.shape), both[:, c:].reshape(u.shape)
            else:
                RT[..., i] = -M.tangent(rho, drho, u)
            if b.depends_on_p:
                RT[..., i] += b.jvp(rho, drho)
        t0 = clock()
        DU = self._solve_block(st, RT, "tangent", tol)
        t_solves = clock() - t0
        if self_adjoint:
            # f_uu = f_up = 0 and A = A^T, lam = u: the second-adjoint equation is the tangent equation
            DL = DU
        else:
            RA = np.empty_like(RT)
            for i, drho in enumerate(dR):
                RA[..., i] = f.hess_uu(u, p, np.ascontiguousarray(DU[..., i])) + f.hess_up(u, p, dP[:, i])
                if lam is not None:
                    RA[..., i] -= t_lams[i] if paired else M.tangent_transpose(rho, drho, lam)
            t0 = clock()
            DL = self._solve_block(st, RA, "second_adjoint", tol, transpose=True)
            t_solves += clock() - t0
        H = np.empty(dP.shape)
        for i, drho in enumerate(dR):
            du, dl = np.ascontiguousarray(DU[..., i]), np.ascontiguousarray(DL[..., i])
            if lam is None:
                h_rho = -M.contract(rho, dl, u)
            elif self_adjoint:
                # dl = du and lam = u: C(dl, u) = C(lam, du) = du^T (dA/drho_k) u, as dA/drho_k is symmetric
                h_rho = -2.0 * M.contract(rho, du, u)
            else:
                # C(dl, u) + C(lam, du) in one contraction of two columns (summed over columns)
                h_rho = -M.contract(rho, _columns(dl, lam), _columns(u, du))
            if lam is not None and not M.affine:
                h_rho = h_rho - M.second(rho, lam, u, drho)
            if b.depends_on_p:
                h_rho = h_rho + b.vjp(rho, dl)
                if lam is not None:
                    h_rho = h_rho + b.second(rho, lam, drho)
            H[:, i] = self._finish_hessp(p, dP[:, i], st, du, h_rho, lam is not None, t_start,
                                         t_solves if i == 0 else 0.0)
            t_start = clock()
        return H

    def _hessp_blocked(self, p, dP, st, lam, tol):
        """k > 1 directions of a single-column state: the tangents, contractions and map products of all k
        in one call each (one pass over the rows or elements), the two multi-column solves, and the objective's
        terms column by column (the same formulas as the column loop of :meth:`_hessp_block`)."""
        clock = time.perf_counter
        t_start = clock()
        u, rho, M, f, b, pmap = st.u, st.rho, self.matrix, self.objective, self.rhs, self.map
        k = dP.shape[1]
        dR = dP if pmap is None else pmap.jvp_block(p, dP)
        self_adjoint = self.self_adjoint and lam is not None and lam is u
        paired = lam is not None and not self_adjoint and getattr(M, "symmetric", False)
        if paired:  # (dA . drho) u and (dA . drho) lam = (dA . drho)^T lam in one pass
            T = M.tangent_block(rho, dR, _columns(u, lam))
            RT, TL = np.negative(T[0], out=T[0]), T[1]
        else:
            RT = -M.tangent_block(rho, dR, u)
            TL = None
        if b.depends_on_p:
            for i in range(k):
                RT[:, i] += b.jvp(rho, np.ascontiguousarray(dR[:, i]))
        t0 = clock()
        DU = self._solve_block(st, RT, "tangent", tol)
        t_solves = clock() - t0
        del RT
        if self_adjoint:
            DL = DU
        else:
            RA = np.empty_like(DU)
            for i in range(k):
                RA[:, i] = f.hess_uu(u, p, np.ascontiguousarray(DU[:, i]))
                if not f.zero_derivative("hess_up"):
                    RA[:, i] += f.hess_up(u, p, dP[:, i])
            if lam is not None:
                if TL is None:
                    TL = np.column_stack([M.tangent_transpose(rho, np.ascontiguousarray(dR[:, i]), lam)
                                          for i in range(k)])
                RA -= TL
            del TL
            t0 = clock()
            DL = self._solve_block(st, RA, "second_adjoint", tol, transpose=True)
            t_solves += clock() - t0
            del RA
        if lam is None:
            H_rho = -M.contract_block(rho, [(DL, u)])
        elif self_adjoint:  # dl = du, lam = u: C(dl, u) + C(lam, du) = 2 C(du, u)
            H_rho = -2.0 * M.contract_block(rho, [(DU, u)])
        else:
            H_rho = -M.contract_block(rho, [(DL, u), (lam, DU)])
        if lam is not None and not M.affine:
            H_rho -= M.second_block(rho, lam, u, dR)
        if b.depends_on_p:
            for i in range(k):
                dl = np.ascontiguousarray(DL[:, i])
                H_rho[:, i] += b.vjp(rho, dl)
                if lam is not None:
                    H_rho[:, i] += b.second(rho, lam, np.ascontiguousarray(dR[:, i]))
        # our own array either way (H_rho or the map's new product), Fortran-ordered for the column updates below
        H = np.asfortranarray(H_rho if pmap is None else pmap.vjp_block(p, H_rho), dtype=np.float64)
        if not f.zero_derivative("hess_pp"):
            H += f.hess_pp_block(u, p, dP)
        q = self._pde_gradient(p, st) if lam is not None and pmap is not None and not pmap.affine else None
        for i in range(k):
            h = H[:, i]
            if not f.zero_derivative("hess_pu"):
                h += f.hess_pu(u, p, np.ascontiguousarray(DU[:, i]))
            if q is not None:
                h += pmap.second(p, q, dP[:, i])
        check_finite(H, "the Hessian action")
        self.times["solve"] += t_solves
        self.times["sensitivity"] += clock() - t_start - t_solves
        return H

    def _finish_hessp(self, p, dp, st, du, h_rho, curvature: bool, t_start: float, t_solves: float) -> np.ndarray:
        """f_pp dp + f_pu du + M'^T h_rho (+ M''[q, dp] with the PDE's curvature), checked and timed: the part
        of a Hessian action after its solves, shared by the linear and the nonlinear functional."""
        pmap = self.map
        h = self.objective.hess_pp(st.u, p, dp) + self.objective.hess_pu(st.u, p, du)
        if pmap is None:
            h = h + h_rho
        else:
            h = h + pmap.vjp(p, h_rho)
            if curvature and not pmap.affine:
                h = h + pmap.second(p, self._pde_gradient(p, st), dp)
        check_finite(h, "the Hessian action")
        self.times["solve"] += t_solves
        self.times["sensitivity"] += time.perf_counter() - t_start - t_solves  # tangent, contractions, maps
        return h

    def hessian(self, p, tol: float | None = None, gauss_newton: bool = False) -> sla.LinearOperator:
        """H(p) (or its Gauss-Newton part) as a symmetric ``scipy.sparse.linalg.LinearOperator`` (matrix-free)."""
        gauss_newton = check_flag(gauss_newton, "gauss_newton")
        p = self._p(p).copy()
        m = self.n_params

        def mv(v):
            return self.hessp(p, np.asarray(v).reshape(-1), tol, gauss_newton)

        return sla.LinearOperator((m, m), matvec=mv, rmatvec=mv, dtype=np.float64)

    def scipy(self):
        """(fun, jac, hessp) for ``scipy.optimize.minimize(fun, p0, jac=jac, hessp=hessp)``."""
        return self.value, self.gradient, self.hessp

    def __call__(self, p) -> float:
        return self.value(p)

    def __repr__(self):
        return f"ReducedFunctional({self.matrix!r}, objective={self.objective!r}, solver={self.solver.name})"
