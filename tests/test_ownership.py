"""Ownership: whatever adjopt keeps past a call, it owns.

adjopt must never keep a reference to an array the caller can still change:
p and dp, the data of an objective, right-hand sides, local matrices,
connectivities, sparsity patterns, or a buffer that a user callback reuses.
Every test here builds a functional from the caller's arrays, calls it,
mutates in place every array the caller handed over (and every buffer a
callback returned), calls it again at the ORIGINAL point (a copy kept aside)
and compares with a fresh functional built from pristine copies of all inputs.

The problems are tiny (n <= 12 dofs, a handful of parameters) and cover every
operator kind, right-hand side, objective, parameter map and installed solver.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numba
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import adjopt
from adjopt.maps import DensityFilter, ExpMap, IdentityMap, NodalToElement
from adjopt.solvers import AMGSolver, installed

INSTALLED = installed()
SOLVERS = [s for s in ("superlu", "amg", "cholmod", "pardiso") if s in INSTALLED]
#: solvers for a nonsymmetric A (CHOLMOD needs A symmetric positive definite)
NONSYMMETRIC_SOLVERS = [s for s in SOLVERS if s != "cholmod"]
METHODS = ("value", "gradient", "hessp", "state", "adjoint", "value_and_gradient")

#: reproducible (derandomized, no example database); no shrinking: with several ownership bugs at once it took
#: 5 minutes per test, and a failure message names the calls and mutations that led to it anyway
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _one_numba_thread():
    """On these tiny problems numba's thread pool costs more than it saves (8x slower on a busy 2-core runner);
    ownership does not depend on the thread count."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def make_solver(name: str):
    """A fresh solver; AMG at a tight tolerance so that it can be compared with a direct solve."""
    return AMGSolver(tol=1e-12) if name == "amg" else adjopt.solvers.make_solver(name)


def rtol_of(solver: str) -> float:
    return 1e-7 if solver == "amg" else 1e-10


# -- the problem description ------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One small problem: which operator, right-hand side, objective, map and solver, and its sizes."""

    seed: int = 0
    matrix: str = "element"  # "element", "callback", "constant"
    callback: str = "canonical"  # CallbackMatrix: "canonical", "reused" (buffers), "unsorted" (pattern)
    n: int = 6  # dofs
    m: int = 3  # parameters of A(rho) (elements for an element matrix)
    k: int = 2  # dofs per element
    shared: bool = False  # one local matrix for all elements
    with_A0: bool = True
    coefficient: str = "exp"  # "identity", "exp", "simp"
    symmetric: bool = True
    rhs: str = "array"  # "array" (ConstantVector), "affine", "element", "callback"
    ncols: int = 1  # right-hand sides (array rhs only)
    objective: str = "misfit"  # "misfit", "norm", "compliance"
    reg: str = "none"  # "none", "l2", "h1", "l2+h1"
    map: str = "none"  # "none", "identity", "exp", "filter", "nodal"
    sparse: bool = False  # sparse B, W of the misfit and B of an affine rhs (else dense B, weight vector W)
    conn_int32: bool = False
    load_is_b: bool = False  # Compliance(b) with the very array b that is the right-hand side
    solver: str = "superlu"

    @property
    def n_nodes(self) -> int:
        """Parameters of the nodal -> element map (its input)."""
        return self.m + 2

    @property
    def n_in(self) -> int:
        return self.n_nodes if self.map == "nodal" else self.m


def _spd_on(mask: np.ndarray, rng, diag: float) -> np.ndarray:
    """A symmetric, strictly diagonally dominant (so SPD) matrix with the sparsity of ``mask``."""
    S = rng.standard_normal(mask.shape) * mask
    S = 0.5 * (S + S.T)
    np.fill_diagonal(S, 0.0)
    S[np.diag_indices_from(S)] = np.abs(S).sum(axis=1) + diag
    return S


def _skew_on(mask: np.ndarray, rng, scale: float) -> np.ndarray:
    N = rng.standard_normal(mask.shape) * mask
    return scale * (N - N.T)


def _covering_conn(rng, n: int, n_elem: int, k: int) -> np.ndarray:
    """(n_elem, k) connectivity, distinct dofs per element, every dof in some element (when n_elem * k >= n)."""
    perm = rng.permutation(n)
    conn = np.array([perm[(e * k + np.arange(k)) % n] for e in range(n_elem)])
    return conn[rng.permutation(n_elem)]


def _unsorted_pattern(rng, mask: np.ndarray, duplicates: bool = True) -> sp.csr_array:
    """The pattern of ``mask`` as a CSR matrix with shuffled column indices (and duplicate entries).

    Its data are the fractions in which a value is split between the duplicates of one entry (they sum to
    one per entry), so that the callback can give its values in this very order.
    """
    n = mask.shape[0]
    indptr, indices, data = [0], [], []
    for i in range(n):
        cols = np.flatnonzero(mask[i])
        dup = rng.choice(cols, size=max(1, cols.size // 2), replace=False) if duplicates else cols[:0]
        row_cols = np.concatenate([cols, dup])
        frac = np.ones(row_cols.size)
        for j in dup:
            at = np.flatnonzero(row_cols == j)
            w = rng.uniform(0.2, 0.8)
            frac[at] = [w, 1.0 - w]
        order = rng.permutation(row_cols.size)
        if np.all(np.diff(row_cols[order]) > 0):  # sorted by chance (or a single entry): reverse
            order = order[::-1]
        indices.extend(row_cols[order])
        data.extend(frac[order])
        indptr.append(len(indices))
    P = sp.csr_array((np.array(data), np.array(indices, dtype=np.int32), np.array(indptr, dtype=np.int32)),
                     shape=(n, n))
    P.has_sorted_indices = False
    assert not P.has_canonical_format
    return P


def make_inputs(spec: Spec) -> dict:
    """Every array the caller hands to adjopt's constructors, plus the evaluation points.

    Keys starting with "_" are the test's own (points, dp) and are never given to a constructor.
    """
    rng = np.random.default_rng(spec.seed)
    n, m, k = spec.n, spec.m, spec.k
    inp: dict = {}
    # -- A(rho)
    if spec.matrix == "element":
        conn = _covering_conn(rng, n, m, k).astype(np.int32 if spec.conn_int32 else np.int64)
        inp["conn"] = conn
        shape = (k, k) if spec.shared else (m, k, k)
        G = rng.standard_normal(shape)
        GGt = G @ np.swapaxes(G, -1, -2)
        local = 0.5 * (GGt + np.swapaxes(GGt, -1, -2)) + k * np.eye(k)  # SPD, symmetric to the last bit
        if not spec.symmetric:
            N = rng.standard_normal(shape)
            local = local + 0.5 * (N - np.swapaxes(N, -1, -2))
        inp["local"] = local
        if spec.with_A0:
            mask = (rng.random((n, n)) < 0.3) | np.eye(n, dtype=bool)
            mask = mask | mask.T
            A0 = _spd_on(mask, rng, 1.0)
            if not spec.symmetric:
                A0 = A0 + _skew_on(mask, rng, 0.3)
            inp["A0"] = sp.csr_array(A0)
    elif spec.matrix == "callback":
        mask = (rng.random((n, n)) < 0.35) | np.eye(n, dtype=bool)
        mask = mask | mask.T
        inp["pattern"] = _unsorted_pattern(rng, mask) if spec.callback == "unsorted" else sp.csr_array(mask * 1.0)
    elif spec.matrix == "constant":
        mask = (rng.random((n, n)) < 0.4) | np.eye(n, dtype=bool)
        mask = mask | mask.T
        A = _spd_on(mask, rng, 1.0)
        if not spec.symmetric:
            A = A + _skew_on(mask, rng, 0.3)
        inp["A"] = sp.csr_array(A)
    else:
        raise ValueError(spec.matrix)
    # -- b(rho)
    bshape = (n, spec.ncols) if spec.ncols > 1 else (n,)
    if spec.rhs == "array":
        inp["b"] = rng.standard_normal(bshape)
    elif spec.rhs == "affine":
        inp["b0"] = rng.standard_normal(n)
        Bm = rng.standard_normal((n, m)) * (rng.random((n, m)) < 0.6)
        inp["B"] = sp.csr_array(Bm) if spec.sparse else Bm
    elif spec.rhs == "element":
        if "conn" not in inp:  # the element matrix's conn is handed to the vector too, as a caller would
            inp["conn_b"] = _covering_conn(rng, n, m, k).astype(np.int32 if spec.conn_int32 else np.int64)
        inp["local_b"] = rng.standard_normal((k,) if spec.shared else (m, k))
        inp["b0"] = rng.standard_normal(n)
    elif spec.rhs != "callback":  # the callback's coefficients are its own (made in build)
        raise ValueError(spec.rhs)
    # -- f(u, p)
    if spec.objective == "misfit":
        n_obs = int(rng.integers(2, n + 1))
        Bobs = rng.standard_normal((n_obs, n))
        inp["data"] = rng.standard_normal((n_obs, spec.ncols) if spec.ncols > 1 else (n_obs,))
        if spec.sparse:
            Bobs[rng.random(Bobs.shape) < 0.5] = 0.0
            Bobs[np.arange(n_obs), rng.integers(0, n, n_obs)] = 1.0
            inp["B_obs"] = sp.csr_array(Bobs)
            Wm = _spd_on(np.ones((n_obs, n_obs), dtype=bool), rng, 1.0)
            inp["W"] = sp.csr_array(Wm)
        else:
            inp["B_obs"] = Bobs
            inp["W"] = rng.uniform(0.5, 2.0, n_obs)
    elif spec.objective == "compliance":
        inp["load"] = inp["b"] if (spec.load_is_b and "b" in inp) else rng.standard_normal(bshape)
    n_in = spec.n_in
    if "l2" in spec.reg:
        inp["l2_weights"] = rng.uniform(0.5, 2.0, n_in)
        inp["l2_p_ref"] = rng.standard_normal(n_in)
    if "h1" in spec.reg:
        K = sp.diags_array([-np.ones(n_in - 1), 2.0 * np.ones(n_in) + 0.1, -np.ones(n_in - 1)], offsets=[-1, 0, 1])
        inp["h1_K"] = sp.csr_array(K)
        inp["h1_p_ref"] = rng.standard_normal(n_in)
    # -- rho = M(p)
    if spec.map == "filter":
        inp["centers"] = rng.random((m, 2))
        inp["volumes"] = rng.uniform(0.5, 1.5, m)
    elif spec.map == "nodal":
        inp["cells"] = np.array([rng.choice(spec.n_nodes, size=3, replace=False) for _ in range(m)])
    # -- points: p0 (the original), two others, a direction per point
    if spec.map == "exp":
        lo, hi = -1.0, 0.0  # rho = exp(p) in (0.37, 1)
    elif spec.matrix == "element" and spec.coefficient == "identity":
        lo, hi = 0.5, 1.5
    elif spec.matrix == "element" and spec.coefficient == "simp":
        lo, hi = 0.3, 1.0
    else:
        lo, hi = -0.5, 0.5
    p0 = rng.uniform(lo, hi, n_in)
    inp["_points"] = [p0] + [p0 + rng.uniform(-0.1, 0.1, n_in) for _ in range(2)]
    inp["_dps"] = [rng.standard_normal(n_in) for _ in range(3)]
    return inp


def _coefficient(name: str):
    return {"identity": adjopt.Identity(), "exp": adjopt.Exp(), "simp": adjopt.SIMP(q=3.0, emin=1e-3)}[name]


def _callback_matrix(spec: Spec, pattern, reuse: bool, buffers: dict):
    """A(rho) = A0 + sum_k exp(rho_k) M_k on the caller's pattern, values given in the pattern's own order.

    The callbacks read the pattern once, here, so that they keep describing the pristine pattern whatever
    the caller does to it later. With ``reuse`` they return the same buffer on every call.
    """
    rng = np.random.default_rng(spec.seed + 1)
    n, m = pattern.shape[0], spec.m
    indptr, cols = np.array(pattern.indptr), np.array(pattern.indices)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    frac = np.array(pattern.data, dtype=np.float64)
    mask = np.zeros((n, n), dtype=bool)
    mask[rows, cols] = True
    A0 = _spd_on(mask, rng, 1.0)
    Ms = np.stack([_spd_on(mask, rng, 0.5) for _ in range(m)])
    if not spec.symmetric:
        A0 = A0 + _skew_on(mask, rng, 0.3)
        Ms = Ms + np.stack([_skew_on(mask, rng, 0.2) for _ in range(m)])
    slot_A0 = A0[rows, cols] * frac
    slot_M = Ms[:, rows, cols].T * frac[:, None]  # (nnz, m)
    vbuf, jbuf = np.empty(cols.size), np.empty((cols.size, m))
    if reuse:
        buffers["values_buffer"], buffers["jacobian_buffer"] = vbuf, jbuf

    def values(rho):
        out = vbuf if reuse else np.empty(cols.size)
        out[:] = slot_A0 + slot_M @ np.exp(rho)
        return out

    def jacobian(rho):
        out = jbuf if reuse else np.empty((cols.size, m))
        out[:] = slot_M * np.exp(rho)
        return out

    def second(rho, w, z, drho):
        return np.exp(rho) * drho * np.einsum("ic,kij,jc->k", w, Ms, z)

    return adjopt.CallbackMatrix(pattern, m, values=values, jacobian=jacobian, second=second)


def _callback_vector(spec: Spec, reuse: bool, buffers: dict):
    """b(rho) = c0 + C rho + 0.5 Q[rho, rho]; with ``reuse`` value and jacobian return one buffer each."""
    rng = np.random.default_rng(spec.seed + 2)
    n, m = spec.n, spec.m
    c0, C, Q = rng.standard_normal(n), rng.standard_normal((n, m)), rng.standard_normal((n, m, m))
    Q = 0.5 * (Q + Q.transpose(0, 2, 1))
    vbuf, jbuf = np.empty(n), np.empty((n, m))
    if reuse:
        buffers["rhs_value_buffer"], buffers["rhs_jacobian_buffer"] = vbuf, jbuf

    def value(rho):
        out = vbuf if reuse else np.empty(n)
        out[:] = c0 + C @ rho + 0.5 * np.einsum("ikl,k,l->i", Q, rho, rho)
        return out

    def jacobian(rho):
        out = jbuf if reuse else np.empty((n, m))
        out[:] = C + np.einsum("ikl,l->ik", Q, rho)
        return out

    def second(rho, lam, drho):
        return np.einsum("i,ikl,l->k", lam, Q, drho)

    return adjopt.CallbackVector(n, m, value=value, jacobian=jacobian, second=second)


def build(spec: Spec, inp: dict, solver: str, reuse: bool):
    """The functional of ``spec`` made from the arrays of ``inp`` (no copies: the caller's arrays).

    ``reuse`` makes callbacks return reused buffers (the variant under test); the reference never does.
    Returns the functional and the {name: buffer} the callbacks return.
    """
    buffers: dict = {}
    if spec.matrix == "element":
        A = adjopt.ElementCoefficientMatrix(inp["conn"], inp["local"], coefficient=_coefficient(spec.coefficient),
                                            n=spec.n, A0=inp.get("A0"))
    elif spec.matrix == "callback":
        A = _callback_matrix(spec, inp["pattern"], reuse and spec.callback == "reused", buffers)
    else:
        A = adjopt.ConstantMatrix(inp["A"], spec.m)
    if spec.rhs == "array":
        b = inp["b"]
    elif spec.rhs == "affine":
        b = adjopt.AffineVector(inp["b0"], inp["B"])
    elif spec.rhs == "element":
        coef = spec.coefficient if spec.matrix == "element" else "exp"
        b = adjopt.ElementCoefficientVector(inp.get("conn", inp.get("conn_b")), inp["local_b"],
                                            coefficient=_coefficient(coef), n=spec.n, b0=inp["b0"])
    else:
        b = _callback_vector(spec, reuse, buffers)
    if spec.objective == "misfit":
        f = adjopt.SquaredMisfit(inp["data"], B=inp["B_obs"], W=inp["W"])
    elif spec.objective == "norm":
        f = adjopt.Norm()
    else:
        f = adjopt.Compliance(inp["load"])
    if "l2" in spec.reg:
        f = f + 0.3 * adjopt.TikhonovL2(inp["l2_weights"], p_ref=inp["l2_p_ref"])
    if "h1" in spec.reg:
        f = f + 0.2 * adjopt.TikhonovH1(inp["h1_K"], p_ref=inp["h1_p_ref"])
    pmap = {
        "none": lambda: None,
        "identity": lambda: IdentityMap(spec.m),
        "exp": lambda: ExpMap(spec.m),
        "filter": lambda: DensityFilter(inp["centers"], radius=0.5, volumes=inp["volumes"]),
        "nodal": lambda: NodalToElement(inp["cells"], n_nodes=spec.n_nodes),
    }[spec.map]()
    J = adjopt.ReducedFunctional(A, b, f, solver=make_solver(solver), parameter_map=pmap)
    return J, buffers


# -- mutations ----------------------------------------------------------------------------------------
def scramble(x, rng) -> None:
    """Change a caller-owned array in place (a sparse matrix: its data), keeping it a valid input."""
    if sp.issparse(x):
        scramble(x.data, rng)
    elif np.issubdtype(x.dtype, np.integer):  # a connectivity: relabel its dofs (distinct, in range)
        top = int(x.max()) + 1
        perm = rng.permutation(top)
        if np.array_equal(perm, np.arange(top)):
            perm = np.roll(perm, 1)
        x[...] = perm[x]
    else:
        how = rng.integers(3)
        if how == 0:
            x += rng.uniform(0.1, 0.5)  # p += ...
        elif how == 1:
            x *= rng.uniform(-2.0, -0.5)
        else:
            x[...] = rng.standard_normal(x.shape)  # p[:] = ...


def reverse_rows(M) -> None:
    """Store every row's entries in reverse order: the same matrix, other ``indices``/``data`` arrays' contents."""
    for i in range(M.shape[0]):
        s = slice(M.indptr[i], M.indptr[i + 1])
        M.indices[s] = M.indices[s][::-1].copy()
        M.data[s] = M.data[s][::-1].copy()


def assert_close(actual, expected, rtol: float, what: str) -> None:
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-3) if expected.size else 1.0
    err = float(np.abs(actual - expected).max()) / scale if expected.size else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3g} against a fresh functional (tolerance {rtol:g})"


class Harness:
    """A functional built from the caller's arrays, its pristine twin, and the caller's side of the story.

    ``call`` evaluates one method at one of the spec's points, always passing a new copy of the point that
    the caller then keeps (and later mutates); ``mutate`` changes caller-owned arrays in place.
    """

    def __init__(self, spec: Spec, mutation_seed: int = 0):
        self.spec = spec
        inp = make_inputs(spec)
        self.points, self.dps = inp.pop("_points"), inp.pop("_dps")
        self.pristine = copy.deepcopy(inp)  # deepcopy keeps aliasing (Compliance(b) with the rhs b)
        self.live = inp
        self.pattern_before = self._pattern_arrays()
        self.J, self.buffers = build(spec, self.live, spec.solver, reuse=True)
        self.ref, _ = build(spec, copy.deepcopy(self.pristine), "superlu", reuse=False)
        self.rtol = rtol_of(spec.solver)
        self.rng = np.random.default_rng(mutation_seed)
        self.handed_p: list[np.ndarray] = []
        self.handed_dp: list[np.ndarray] = []
        self.returned: list[np.ndarray] = []  # writable arrays adjopt returned (gradients, Hessian actions)
        self.views: list[tuple[str, np.ndarray, np.ndarray]] = []  # read-only arrays returned, with their values
        self.history: list[str] = []  # the calls and mutations so far, for failure messages

    def _pattern_arrays(self):
        P = self.live.get("pattern")
        return None if P is None else (P.indptr.copy(), P.indices.copy(), P.data.copy())

    def mutables(self) -> list[str]:
        """Names of the things ``mutate`` can change for this problem."""
        names = sorted(k for k in self.live if not (k == "pattern" or k.startswith("_")))
        if "pattern" in self.live:
            names += ["pattern.data", "pattern.indices"]
        return names + ["p", "dp", "returned", "buffers"]

    def call(self, method: str, point: int) -> None:
        self.history.append(f"{method}(point {point})")
        try:
            self._call(method, point)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n  {self.spec}\n  sequence: {'; '.join(self.history)}") from None

    def _call(self, method: str, point: int) -> None:
        J, ref, x = self.J, self.ref, self.points[point]
        p = x.copy()
        self.handed_p.append(p)
        what = f"{method} at point {point}"
        if method == "value":
            assert_close(J.value(p), ref.value(x.copy()), self.rtol, what)
        elif method == "gradient":
            g = J.gradient(p)
            assert_close(g, ref.gradient(x.copy()), self.rtol, what)
            self.returned.append(g)
        elif method == "value_and_gradient":
            v, g = J.value_and_gradient(p)
            v_ref, g_ref = ref.value_and_gradient(x.copy())
            assert_close(v, v_ref, self.rtol, what + " (value)")
            assert_close(g, g_ref, self.rtol, what + " (gradient)")
            self.returned.append(g)
        elif method == "hessp":
            dp = self.dps[point].copy()
            self.handed_dp.append(dp)
            h = J.hessp(p, dp)
            assert_close(h, ref.hessp(x.copy(), self.dps[point].copy()), self.rtol, what)
            self.returned.append(h)
        elif method in ("state", "adjoint"):
            arr = getattr(J, method)(p)
            expected = getattr(ref, method)(x.copy())
            assert_close(arr, expected, self.rtol, what)
            assert not arr.flags.writeable, f"{method}(p) returned a writable array"
            with pytest.raises(ValueError, match="read-only"):
                arr.flat[0] = arr.flat[0] + 1.0
            self.views.append((what, arr, np.array(expected)))
        else:
            raise ValueError(method)

    def mutate(self, names) -> None:
        rng = self.rng
        self.history.append(f"mutate {sorted(names)}")
        for name in sorted(names):
            if name == "p":
                for p in self.handed_p:
                    scramble(p, rng)
            elif name == "dp":
                for dp in self.handed_dp:
                    scramble(dp, rng)
            elif name == "returned":
                for r in self.returned:
                    r[...] = rng.standard_normal(r.shape)
            elif name == "buffers":
                for buf in self.buffers.values():
                    buf[...] = rng.standard_normal(buf.shape)
            elif name == "pattern.data":
                scramble(self.live["pattern"].data, rng)
            elif name == "pattern.indices":
                reverse_rows(self.live["pattern"])
            else:
                scramble(self.live[name], rng)

    def finish(self) -> None:
        """Arrays adjopt returned earlier still hold their values."""
        for what, arr, expected in self.views:
            assert_close(arr, expected, self.rtol, f"the array returned by {what}, read again at the end")

    def check_pattern_untouched(self) -> None:
        """The constructor of CallbackMatrix did not reorder or sum the caller's pattern in place."""
        before, P = self.pattern_before, self.live["pattern"]
        assert np.array_equal(P.indptr, before[0]) and np.array_equal(P.indices, before[1]), (
            "CallbackMatrix changed the caller's pattern in place (indices reordered or duplicates summed)")
        assert np.array_equal(P.data, before[2]), "CallbackMatrix changed the caller's pattern data in place"


def run_sequence(spec: Spec, steps, mutation_seed: int) -> None:
    h = Harness(spec, mutation_seed)
    if "pattern" in h.live:
        h.check_pattern_untouched()
    names = h.mutables()
    for method, point, mutate in steps:
        h.call(method, point)
        h.mutate(names if mutate == "all" else [x for x in mutate if x in names])
    h.finish()


# -- strategies -----------------------------------------------------------------------------------------
@st.composite
def common(draw, spec: Spec, rhs_kinds) -> Spec:
    """Draw the choices shared by every operator kind on top of ``spec``."""
    symmetric = draw(st.booleans())
    solver = draw(st.sampled_from(SOLVERS if symmetric else NONSYMMETRIC_SOLVERS))
    rhs = draw(st.sampled_from(rhs_kinds))
    ncols = draw(st.integers(1, 2)) if rhs == "array" else 1
    objective = draw(st.sampled_from(["misfit", "norm", "compliance"]))
    return dataclasses.replace(
        spec, seed=draw(st.integers(0, 2**31 - 1)), symmetric=symmetric, solver=solver, rhs=rhs, ncols=ncols,
        objective=objective, reg=draw(st.sampled_from(["none", "l2", "h1", "l2+h1"])),
        map=draw(st.sampled_from(["none", "identity", "exp", "filter", "nodal"])),
        sparse=draw(st.booleans()), conn_int32=draw(st.booleans()), load_is_b=draw(st.booleans()),
    )


@st.composite
def element_specs(draw) -> Spec:
    n = draw(st.integers(3, 12))
    k = draw(st.integers(2, min(4, n)))
    covering = -(-n // k)  # elements needed to touch every dof (no A0: A must still be nonsingular)
    base = Spec(matrix="element", n=n, k=k, m=draw(st.integers(covering, covering + 2)),
                shared=draw(st.booleans()), with_A0=draw(st.booleans()),
                coefficient=draw(st.sampled_from(["identity", "exp", "simp"])))
    return draw(common(base, ["array", "affine", "element", "callback"]))


@st.composite
def callback_specs(draw) -> Spec:
    n = draw(st.integers(3, 10))
    base = Spec(matrix="callback", n=n, m=draw(st.integers(1, 4)), k=draw(st.integers(2, min(3, n))),
                callback=draw(st.sampled_from(["canonical", "reused", "unsorted"])))
    return draw(common(base, ["array", "affine", "element", "callback"]))


@st.composite
def constant_specs(draw) -> Spec:
    n = draw(st.integers(3, 10))
    base = Spec(matrix="constant", n=n, m=draw(st.integers(1, 4)), k=draw(st.integers(2, min(3, n))))
    return draw(common(base, ["affine", "element", "callback"]))  # p enters through b(p) only


MUTATION_NAMES = ["p", "dp", "returned", "buffers", "data", "B_obs", "W", "b", "b0", "B", "local", "local_b",
                  "conn", "conn_b", "A0", "A", "load", "l2_weights", "l2_p_ref", "h1_K", "h1_p_ref", "centers",
                  "volumes", "cells", "pattern.data", "pattern.indices"]

#: one step: (method, point: 0 = the original p or 1, 2 = other points, what to mutate after the call)
steps_strategy = st.lists(
    st.tuples(
        st.sampled_from(METHODS),
        st.sampled_from([0, 0, 0, 1, 2]),
        st.one_of(st.just("all"), st.frozensets(st.sampled_from(MUTATION_NAMES), min_size=1)),
    ),
    min_size=2, max_size=7,
).map(lambda s: [(m, pt, mut) for m, pt, mut in s] + [(m, 0, "all") for m in METHODS if m != "value_and_gradient"])


# -- property tests ------------------------------------------------------------------------------------
@PROPERTY_SETTINGS
@given(spec=element_specs(), steps=steps_strategy, mutation_seed=st.integers(0, 2**16))
def test_element_matrix_owns_its_inputs(spec, steps, mutation_seed):
    """ElementCoefficientMatrix (shared / per-element locals, with / without A0, identity / exp / SIMP)."""
    run_sequence(spec, steps, mutation_seed)


@PROPERTY_SETTINGS
@given(spec=callback_specs(), steps=steps_strategy, mutation_seed=st.integers(0, 2**16))
def test_callback_matrix_owns_its_inputs(spec, steps, mutation_seed):
    """CallbackMatrix: canonical pattern, callbacks returning reused buffers, unsorted pattern with duplicates."""
    run_sequence(spec, steps, mutation_seed)


@PROPERTY_SETTINGS
@given(spec=constant_specs(), steps=steps_strategy, mutation_seed=st.integers(0, 2**16))
def test_constant_matrix_owns_its_inputs(spec, steps, mutation_seed):
    """ConstantMatrix: p enters only through b(p)."""
    run_sequence(spec, steps, mutation_seed)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.one_of(element_specs(), callback_specs(), constant_specs()),
       methods=st.lists(st.tuples(st.sampled_from(METHODS), st.sampled_from([0, 1, 2])), min_size=1, max_size=6))
def test_harness_agrees_without_mutations(spec, methods):
    """Control: with nothing mutated every backend agrees with the fresh SuperLU functional (so a failure of
    the tests above is the mutation's doing, not the harness's or a solver's)."""
    h = Harness(spec)
    for method, point in methods:
        h.call(method, point)
    h.finish()


# -- one input at a time: which arrays adjopt keeps ----------------------------------------------------------
#: (mutated input, problem that uses it); each problem is otherwise plain (SuperLU, no map)
ONE_INPUT = [
    ("p", Spec(coefficient="exp")),
    ("p", Spec(coefficient="exp", map="identity")),
    ("p", Spec(coefficient="exp", map="exp")),
    ("dp", Spec(coefficient="exp")),
    ("returned", Spec(coefficient="exp")),
    ("data", Spec(objective="misfit")),
    ("B_obs", Spec(objective="misfit")),
    ("B_obs", Spec(objective="misfit", sparse=True)),
    ("W", Spec(objective="misfit")),
    ("W", Spec(objective="misfit", sparse=True)),
    ("b", Spec(rhs="array")),
    ("b", Spec(rhs="array", ncols=2)),
    ("load", Spec(objective="compliance", rhs="array", symmetric=True)),
    ("b", Spec(objective="compliance", rhs="array", symmetric=True, load_is_b=True)),
    ("b0", Spec(rhs="affine")),
    ("B", Spec(rhs="affine")),
    ("B", Spec(rhs="affine", sparse=True)),
    ("b0", Spec(rhs="element")),
    ("local_b", Spec(rhs="element")),
    ("conn", Spec(rhs="element", conn_int32=False)),
    ("conn", Spec(rhs="array", conn_int32=False)),
    ("conn", Spec(rhs="array", conn_int32=True)),
    ("local", Spec(shared=False)),
    ("local", Spec(shared=True)),
    ("A0", Spec()),
    ("A", Spec(matrix="constant", rhs="affine")),
    ("l2_weights", Spec(reg="l2")),
    ("l2_p_ref", Spec(reg="l2")),
    ("h1_K", Spec(reg="h1")),
    ("h1_p_ref", Spec(reg="h1")),
    ("centers", Spec(map="filter")),
    ("volumes", Spec(map="filter")),
    ("cells", Spec(map="nodal")),
    ("pattern.data", Spec(matrix="callback")),
    ("pattern.indices", Spec(matrix="callback")),
] + [("buffers", Spec(matrix="callback", callback="reused", rhs="callback", solver=s)) for s in SOLVERS]


def _case_id(name: str, spec: Spec) -> str:
    """'local[shared=True]': the mutated input and how the problem differs from the default Spec."""
    changed = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(Spec)
               if getattr(spec, f.name) != f.default]
    return f"{name}[{','.join(changed)}]" if changed else name


@pytest.mark.parametrize("name,spec", ONE_INPUT, ids=[_case_id(n, s) for n, s in ONE_INPUT])
def test_mutating_one_input_changes_nothing(name, spec):
    """Evaluate at p0, mutate one caller array in place, evaluate everything again at p0 and at a new point."""
    spec = dataclasses.replace(spec, seed=7, n=7, m=4, k=2)
    h = Harness(spec, mutation_seed=3)
    h.call("value", 0)
    h.call("gradient", 0)
    h.call("hessp", 0)
    h.mutate([name])
    for point in (0, 1):
        for method in ("value", "gradient", "hessp", "state", "adjoint"):
            h.call(method, point)
            h.mutate([name])
    h.finish()


# -- the reproduced bugs, pinned ----------------------------------------------------------------------------
def _exp_element_problem(seed=11, n=7, n_elem=4):
    rng = np.random.default_rng(seed)
    conn = _covering_conn(rng, n, n_elem, 2)
    G = rng.standard_normal((n_elem, 2, 2))
    local = G @ G.transpose(0, 2, 1) + 2 * np.eye(2)
    b = rng.standard_normal(n)
    data = rng.standard_normal(n)
    p = rng.uniform(-0.5, 0.5, n_elem)
    return conn, local, b, data, p


@pytest.mark.parametrize("pmap", [None, "identity"])
def test_pinned_cache_does_not_keep_the_callers_p(pmap):
    """J.value(p); p += 0.5; J.gradient(p_old): the cache must not have kept the caller's p as rho."""
    conn, local, b, data, p = _exp_element_problem()

    def make():
        A = adjopt.ElementCoefficientMatrix(conn, local, coefficient="exp", A0=sp.eye_array(7))
        return adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(data), solver="superlu",
                                        parameter_map=None if pmap is None else IdentityMap(p.size))

    J, fresh = make(), make()
    p_old = p.copy()
    J.value(p)
    p += 0.5
    np.testing.assert_allclose(J.gradient(p_old), fresh.gradient(p_old.copy()), rtol=1e-10)
    dp = np.linspace(-1.0, 1.0, p.size)
    np.testing.assert_allclose(J.hessp(p_old, dp), fresh.hessp(p_old.copy(), dp), rtol=1e-10)


def test_pinned_squared_misfit_copies_its_data():
    """SquaredMisfit(data); data[:] = ...: value and gradient both stay those of the data given."""
    conn, local, b, data, p = _exp_element_problem()
    pristine = data.copy()
    A = adjopt.ElementCoefficientMatrix(conn, local, coefficient="exp", A0=sp.eye_array(7))
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(data), solver="superlu")
    fresh = adjopt.ReducedFunctional(A, b.copy(), adjopt.SquaredMisfit(pristine), solver="superlu")
    J.gradient(p)  # caches u and lam
    data[:] = np.arange(data.size, dtype=float)
    assert J.value(p) == pytest.approx(fresh.value(p), rel=1e-12)
    np.testing.assert_allclose(J.gradient(p), fresh.gradient(p), rtol=1e-10)


def test_pinned_constant_vector_copies_b():
    """ReducedFunctional(A, b, ...); b *= 2: J is still the functional of the b given, at cached and new points."""
    conn, local, b, data, p = _exp_element_problem()
    A = adjopt.ElementCoefficientMatrix(conn, local, coefficient="exp", A0=sp.eye_array(7))
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(data.copy()), solver="superlu")
    fresh = adjopt.ReducedFunctional(A, b.copy(), adjopt.SquaredMisfit(data.copy()), solver="superlu")
    J.value(p)
    b *= 2
    assert J.value(p) == pytest.approx(fresh.value(p), rel=1e-12)  # cached point
    p2 = p + 0.1
    assert J.value(p2) == pytest.approx(fresh.value(p2), rel=1e-12)  # new point: assembled after b *= 2
    np.testing.assert_allclose(J.gradient(p2), fresh.gradient(p2), rtol=1e-10)


def _spd_callback_pieces(seed=5, n=8, m=3):
    rng = np.random.default_rng(seed)
    mask = (rng.random((n, n)) < 0.4) | np.eye(n, dtype=bool)
    mask = mask | mask.T
    A0 = _spd_on(mask, rng, 1.0)
    Ms = np.stack([_spd_on(mask, rng, 0.5) for _ in range(m)])
    return mask, A0, Ms, rng


def _dense_callback_functional(A0, Ms, mask, b, data, solver):
    """The same A(p) = A0 + sum_k exp(p_k) M_k through a canonical pattern and callbacks returning new arrays."""
    rows, cols = np.nonzero(mask)
    m = Ms.shape[0]
    A = adjopt.CallbackMatrix(
        sp.csr_array(mask * 1.0), m,
        values=lambda p: A0[rows, cols] + Ms[:, rows, cols].T @ np.exp(p),
        jacobian=lambda p: Ms[:, rows, cols].T * np.exp(p),
        second=lambda p, w, z, dp: np.exp(p) * dp * np.einsum("ic,kij,jc->k", w, Ms, z),
    )
    return adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(data), solver=solver)


@pytest.mark.parametrize("solver", SOLVERS)
def test_pinned_callback_matrix_values_in_a_reused_buffer(solver):
    """values(p) and jacobian(p) fill and return the same buffers on every call (a common C-extension idiom)."""
    mask, A0, Ms, rng = _spd_callback_pieces()
    n, m = A0.shape[0], Ms.shape[0]
    rows, cols = np.nonzero(mask)
    vbuf, jbuf = np.empty(rows.size), np.empty((rows.size, m))

    def values(p):
        vbuf[:] = A0[rows, cols] + Ms[:, rows, cols].T @ np.exp(p)
        return vbuf

    def jacobian(p):
        jbuf[:] = Ms[:, rows, cols].T * np.exp(p)
        return jbuf

    def second(p, w, z, dp):
        return np.exp(p) * dp * np.einsum("ic,kij,jc->k", w, Ms, z)

    b, data = rng.standard_normal(n), rng.standard_normal(n)
    A = adjopt.CallbackMatrix(sp.csr_array(mask * 1.0), m, values=values, jacobian=jacobian, second=second)
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(data), solver=make_solver(solver))
    fresh = _dense_callback_functional(A0, Ms, mask, b.copy(), data.copy(), "superlu")
    p1, p2 = rng.uniform(-0.5, 0.5, m), rng.uniform(1.0, 2.0, m)
    J.value(p1)
    J.value(p2)  # refills the buffer with A(p2) while A(p1) is still cached
    rtol = rtol_of(solver)
    np.testing.assert_allclose(J.gradient(p1), fresh.gradient(p1), rtol=rtol)
    dp = np.ones(m)
    np.testing.assert_allclose(J.hessp(p1, dp), fresh.hessp(p1, dp), rtol=rtol)


@pytest.mark.parametrize("duplicates", [False, True])
def test_pinned_callback_matrix_unsorted_pattern(duplicates):
    """A pattern with unsorted column indices (and duplicates), values given in the caller's CSR data order."""
    mask, A0, Ms, rng = _spd_callback_pieces(seed=9)
    n, m = A0.shape[0], Ms.shape[0]
    pattern = _unsorted_pattern(rng, mask, duplicates)
    before = (pattern.indptr.copy(), pattern.indices.copy(), pattern.data.copy())
    rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
    cols, frac = pattern.indices.copy(), pattern.data.copy()  # data: how each entry is split among duplicates
    A = adjopt.CallbackMatrix(
        pattern, m,
        values=lambda p: (A0[rows, cols] + Ms[:, rows, cols].T @ np.exp(p)) * frac,
        jacobian=lambda p: Ms[:, rows, cols].T * np.exp(p) * frac[:, None],
        second=lambda p, w, z, dp: np.exp(p) * dp * np.einsum("ic,kij,jc->k", w, Ms, z),
    )
    p = rng.uniform(-0.5, 0.5, m)
    dense = A0 + np.einsum("kij,k->ij", Ms, np.exp(p))
    np.testing.assert_allclose(A.assemble(p).toarray(), dense, rtol=1e-13, atol=1e-13)
    assert np.array_equal(pattern.indptr, before[0]) and np.array_equal(pattern.indices, before[1]), (
        "CallbackMatrix sorted / summed the caller's pattern in place")
    assert np.array_equal(pattern.data, before[2]), "CallbackMatrix changed the caller's pattern data"
    b, data = rng.standard_normal(n), rng.standard_normal(n)
    J = adjopt.ReducedFunctional(A, b, adjopt.SquaredMisfit(data), solver="superlu")
    fresh = _dense_callback_functional(A0, Ms, mask, b.copy(), data.copy(), "superlu")
    assert J.value(p) == pytest.approx(fresh.value(p), rel=1e-12)
    np.testing.assert_allclose(J.gradient(p), fresh.gradient(p), rtol=1e-10)
    np.testing.assert_allclose(J.hessp(p, np.ones(m)), fresh.hessp(p, np.ones(m)), rtol=1e-10)
