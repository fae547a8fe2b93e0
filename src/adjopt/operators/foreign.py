"""Bring your own assembly: A(p) and b(p) from element dof tables and local matrices, or from COO triplets.

Other FEM libraries hand out an element dof table (E x k global dof numbers) and local matrices (E x k x k),
or COO triplets whose values depend on p, rather than CSR slot orders. These classes take them as they come:
duplicates are summed, the order is handled inside, the pattern is fixed once (the same contraction kernels as
:class:`~adjopt.operators.CallbackMatrix` run on it). A dof number < 0 in the table drops that row and column
(a Dirichlet dof condensed out), so a table of global numbers mapped to free numbers with -1 for the fixed
ones is used as it is.

With a_s(p) the entries (element e, local row a, local column b, flattened in C order: s = (e k + a) k + b)
and J[s, j] = d a_s / d p_j (``local_jacobian``), adjopt needs:

    A(p)                    = sum_s a_s(p) E_{row_s, col_s}
    w^T (dA/dp_j) z         = sum_s J[s, j] w[row_s] z[col_s]                     (contract)
    (dA . dp) values        = J dp                                               (tangent)
    C2(w, z, dp)_j          = sum_s D[s, j] w[row_s] z[col_s],
                              D[s, j] = sum_i (d^2 a_s / dp_j dp_i) dp_i            (second order)

``local_second(p, dp)`` returns D (the derivative of J(p) dp with respect to p); without it, ``affine=True``
says D = 0, and otherwise Hessian actions raise :class:`~adjopt.errors.MissingDerivativeError`. For several
right-hand sides w and z are (n, k) and the products are summed over the k columns. Right-hand sides are the
same with vectors: b(p) = sum_s b_s(p) e_{row_s}, b_s the (E x k) local entries.

``local_jacobian(p)`` is called once per p: the last Jacobian is kept (with a copy of its p, so an in-place change
of the caller's array is seen), and a value, gradient and Hessian action at one p share it. ``symmetric=True``
declares A(p) = A(p)^T for every p (see :class:`ElementMatrix`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from .._validate import as_count, as_state_like, check_finite, check_flag, refuse_complex
from ..errors import MissingDerivativeError, NonFiniteError, PatternError
from .callback import CallbackMatrix, _LastJacobian
from .vectors import CallbackVector

logger = logging.getLogger(__name__)


def _dof_table(dofs, name: str = "dofs") -> np.ndarray:
    """An (E, k) integer copy of the dof table, checked."""
    refuse_complex(dofs, name)
    arr = np.asarray(dofs)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PatternError(f"{name} must be an (E, k) table of dof numbers (E elements, k dofs each), got shape "
                           f"{arr.shape}")
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise PatternError(f"{name} must hold integers (dof numbers; < 0 for dropped dofs), got {arr.dtype}")
    if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise PatternError(f"{name} must hold integers (dof numbers; < 0 for dropped dofs), got {arr.dtype} with "
                           "fractions or NaN")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) == np.iinfo(arr.dtype).max:
        raise PatternError(f"{name} holds {int(arr.max())}, the largest {arr.dtype}: a -1 (dropped dof) cast to an "
                           "unsigned type? Give a signed integer table")
    return arr.astype(np.int64, copy=True)


def _no_empty_rows(rows: np.ndarray, n: int, what: str) -> None:
    """PatternError naming the first row of A without an entry (A would be singular)."""
    have = np.zeros(n, dtype=bool)
    have[rows] = True
    if not have.all():
        first = int(np.flatnonzero(~have)[0])
        raise PatternError(f"{what} gives no entry in row {first} ({int(np.count_nonzero(~have))} empty rows of {n}): "
                           f"A would be singular. Number the dofs 0..n-1 without gaps, or give n = the number of "
                           f"dofs the table uses")


def _check_callbacks(local, local_jacobian, local_second, affine) -> None:
    check_flag(affine, "affine")
    for name, cb in (("local", local), ("local_jacobian", local_jacobian), ("local_second", local_second)):
        if cb is not None and not callable(cb):
            raise TypeError(f"{name} must be a callable, got {type(cb).__name__}")
    if affine and local_second is not None:
        raise ValueError("give local_second or affine=True, not both: affine=True says the second-order term is zero")


def _size(dofs: np.ndarray, n, name: str) -> int:
    top = int(dofs.max()) + 1
    if n is None:
        if top <= 0:
            raise PatternError(f"{name} holds no dof >= 0: every entry is dropped")
        return top
    n = as_count(n, "n")
    if top > n:
        raise PatternError(f"{name} holds dof {top - 1}, but n = {n}: dof numbers must be < n (or < 0 to drop one)")
    return n


def _local_values(A, shape: tuple, keep, what: str) -> np.ndarray:
    """The callback's local arrays, checked (shape, real, finite), flattened and restricted to the kept entries."""
    if sp.issparse(A):
        raise PatternError(f"local(p) must return the dense {shape} array of {what}, got a sparse {type(A).__name__}")
    refuse_complex(A, "local(p)")
    A = np.asarray(A)
    if A.dtype == np.float32 and not getattr(_local_values, "warned", False):
        _local_values.warned = True
        logger.warning("local(p) returns float32: derivatives are then exact to single precision only (Taylor tests "
                       "of order 3 fail at about 1e-7); return float64")
    A = A.astype(np.float64, copy=False)
    if A.shape != shape:
        hint = ""
        if A.shape[:1] == (shape[1],) and A.shape[1:2] == (shape[0],):
            hint = f"; the dof table looks transposed (it has {shape[0]} rows of {shape[1]}): pass dofs.T"
        raise PatternError(f"local(p) must return the {shape} {what} (E = {shape[0]} elements of the dof table, k = "
                           f"{shape[1]} dofs each), got shape {A.shape}{hint}")
    if not np.all(np.isfinite(A)):
        bad = np.argwhere(~np.isfinite(A))[0]
        raise NonFiniteError(f"local(p) has {int(np.count_nonzero(~np.isfinite(A)))} NaN or Inf entries, the first at "
                             f"{tuple(int(i) for i in bad)} (element {int(bad[0])})")
    A = A.reshape(-1)
    return A if keep is None else A[keep]


def _rows_jacobian(J, n_rows: int, keep, m: int, what: str) -> sp.csr_array:
    """The callback's (n_rows, m) Jacobian as CSR, checked, restricted to the kept rows."""
    if not (sp.issparse(J) or np.ndim(J) == 2):
        raise PatternError(f"{what} must be an ({n_rows}, {m}) sparse or dense array, got {type(J).__name__}")
    if sp.issparse(J):
        J = sp.csr_array(J)  # any format (DOK, LIL, ...) has .data then
        refuse_complex(J.data, what)
    else:
        refuse_complex(J, what)
    J = sp.csr_array(J, dtype=np.float64)
    if J.shape != (n_rows, m):
        raise PatternError(f"{what} must have shape (E k{'' if 'vector' in what else ' k'}, m) = ({n_rows}, {m}), "
                           f"got {J.shape}")
    check_finite(J.data, what)
    return J if keep is None else J[keep]


class ElementMatrix(CallbackMatrix):
    """A(p) = sum_e P_e^T A_e(p) P_e from an element dof table and a callback for the local matrices.

    Parameters
    ----------
    dofs
        (E, k) global dof numbers of each element; a number < 0 drops that row and column (a condensed
        Dirichlet dof). Copied.
    n_params
        Number of parameters m.
    local
        ``local(p) -> (E, k, k)``: A_e(p), entry [e, a, b] at (dofs[e, a], dofs[e, b]).
    local_jacobian
        ``local_jacobian(p) -> (E k k, m)`` sparse or dense: J[s, j] = d A_e[a, b] / d p_j with
        s = (e k + a) k + b (the C order of ``local(p)``). A parameter per element gives one nonzero per row.
        Rows are test functions and columns trial functions: entry [e, a, b] goes to row ``dofs[e, a]`` and
        column ``dofs[e, b]`` (scikit-fem's ``coo_data(basis).tolocal()`` is ordered [e, trial, test]: pass
        its ``.transpose(0, 2, 1)`` for a nonsymmetric form).
    local_second
        Optional ``local_second(p, dp) -> (E k k, m)``: D = d/dp (J(p) dp), i.e. D[s, j] = sum_i
        (d^2 A_e[a, b] / dp_j dp_i) dp_i (the module docstring has the formula it enters).
    affine
        Declare A affine in p (D = 0). Without ``local_second`` and without it, Hessian actions raise.
    n
        The number of dofs (default: the largest dof number + 1).
    symmetric
        Declare A(p) = A(p)^T for every p (every local matrix symmetric in a, b, say): sets :attr:`symmetric`,
        which is never guessed. A :class:`~adjopt.ReducedFunctional` then takes the self-adjoint shortcut for a
        compliance objective f = b^T u with a constant b (lam = u: no adjoint solve, and one solve per Hessian
        action instead of two), and (dA . dp) u and (dA . dp)^T lam come from one two-column tangent pass. The
        solver choice does not depend on it (``"auto"`` and ``"cholmod"`` look at the assembled A: CHOLMOD for a
        symmetric positive definite A, whose transposed solve is the solve). The promise is checked in O(nnz):
        at every assembly (max|A - A^T| <= 1e-12 max|A|) and on one tangent at the first ``local_jacobian``
        call; a broken promise raises ``ValueError``.

    Notes
    -----
    Every derivative runs on the fixed pattern built once from the table (duplicates summed), with the same
    contraction kernels as :class:`~adjopt.operators.CallbackMatrix`. ``local_jacobian(p)`` is called once per p
    (the last Jacobian is kept, one at a time): a value, a gradient and a Hessian action at one p call it once.
    """

    def __init__(self, dofs, n_params: int, local: Callable, local_jacobian: Callable,
                 local_second: Callable | None = None, affine: bool = False, n: int | None = None,
                 symmetric: bool = False):
        _check_callbacks(local, local_jacobian, local_second, affine)
        table = _dof_table(dofs)
        E, k = table.shape
        n = _size(table, n, "dofs")
        rows = np.repeat(table, k, axis=1).reshape(-1)  # s = (e k + a) k + b -> dofs[e, a]
        cols = np.tile(table, (1, k)).reshape(-1)  # -> dofs[e, b]
        keep = (rows >= 0) & (cols >= 0)
        _no_empty_rows(rows[keep], n, "the dof table")
        self._keep = None if keep.all() else np.flatnonzero(keep)
        self.n_elements, self.dofs_per_element = E, k
        self._local, self._local_jacobian, self._local_second = local, local_jacobian, local_second
        total, m = E * k * k, as_count(n_params, "n_params")

        def values(p):
            return _local_values(local(p), (E, k, k), self._keep, "local matrices")

        def jacobian(p):
            return _rows_jacobian(local_jacobian(p), total, self._keep, m, "local_jacobian(p)")

        super().__init__(sp.coo_array((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(n, n)), m, values,
                         jacobian, affine=affine and local_second is None, symmetric=symmetric)
        if local_second is not None:
            self._second_jacobian = lambda p, dp: _rows_jacobian(local_second(p, dp), total, self._keep, m,
                                                                 "local_second(p, dp)")

    def _second(self, p, w, z, dp):
        if getattr(self, "_second_jacobian", None) is None:
            raise MissingDerivativeError(
                "this ElementMatrix has no second-order term: pass local_second=(p, dp) -> (E k k, m), the "
                "derivative of local_jacobian(p) dp, or affine=True if the local matrices are affine in p")
        return self._slot_contract(self._second_jacobian(p, dp), w, z)


def element_matrix_from_triplets(rows, cols, n: int, n_params: int, values: Callable, jacobian: Callable,
                                 second_jacobian: Callable | None = None, affine: bool = False,
                                 symmetric: bool = False) -> CallbackMatrix:
    """A(p) from COO triplets (rows, cols) whose values depend on p: ``values(p) -> (T,)`` in the triplets'
    order, ``jacobian(p) -> (T, m)``, optional ``second_jacobian(p, dp) -> (T, m)`` = d/dp (jacobian(p) dp).
    Duplicates are summed and the order is handled inside (a :class:`CallbackMatrix` on the COO pattern).
    ``symmetric=True`` declares A(p) = A(p)^T for every p (the self-adjoint shortcut and the paired tangent of
    :class:`~adjopt.ReducedFunctional`; checked at every assembly, see :class:`CallbackMatrix`). ``jacobian(p)`` is called
    once per p (the last one is kept)."""
    r, c = np.asarray(rows), np.asarray(cols)
    if r.ndim != 1 or r.shape != c.shape or r.size == 0:
        raise PatternError(f"rows and cols must be 1-D arrays of the same nonzero length, got {r.shape} and {c.shape}")
    for name, a in (("rows", r), ("cols", c)):
        if a.dtype.kind not in "iu":
            raise PatternError(f"{name} must be integers, got {a.dtype}")
    n = as_count(n, "n")
    if r.min() < 0 or c.min() < 0 or r.max() >= n or c.max() >= n:
        raise PatternError(f"the triplets hold indices outside [0, {n})")
    _no_empty_rows(r, n, "the triplets")
    check_flag(affine, "affine")
    check_flag(symmetric, "symmetric")
    if affine and second_jacobian is not None:
        raise ValueError("give second_jacobian or affine=True, not both: affine=True says the second-order term is zero")
    m = as_count(n_params, "n_params")
    T = r.size
    A = CallbackMatrix(sp.coo_array((np.ones(T), (r, c)), shape=(n, n)), m, values, jacobian,
                       affine=affine and second_jacobian is None, symmetric=symmetric)
    if second_jacobian is not None:
        A._second_jacobian = lambda p, dp: _rows_jacobian(second_jacobian(p, dp), T, None, m, "second_jacobian(p, dp)")
    return A


class ElementVector(CallbackVector):
    """b(p) = sum_e P_e^T b_e(p) from an element dof table and a callback for the local vectors.

    ``local(p) -> (E, k)``; ``local_jacobian(p) -> (E k, m)`` with rows s = e k + a; optional
    ``local_second(p, dp) -> (E k, m)`` = d/dp (J(p) dp) (else ``affine=True`` or no Hessian actions). A dof
    number < 0 drops the entry; ``n`` defaults to the largest dof number + 1. ``local_jacobian(p)`` is called once
    per p (the last Jacobian is kept, with a copy of its p).
    """

    def __init__(self, dofs, n_params: int, local: Callable, local_jacobian: Callable,
                 local_second: Callable | None = None, affine: bool = False, n: int | None = None):
        _check_callbacks(local, local_jacobian, local_second, affine)
        table = _dof_table(dofs)
        E, k = table.shape
        n = _size(table, n, "dofs")
        flat = table.reshape(-1)
        keep = np.flatnonzero(flat >= 0)
        m = as_count(n_params, "n_params")
        # S: (n, E k) scatter of the local entries (0/1; duplicates summed by the product)
        S = sp.csr_array((np.ones(keep.size), (flat[keep], keep)), shape=(n, E * k))

        def value(p):
            return S @ _local_values(local(p), (E, k), None, "local vectors")

        def evaluate(p):
            return sp.csr_array(S @ _rows_jacobian(local_jacobian(p), E * k, None, m, "local_jacobian(p) (vector)"))

        self._last_jacobian = last = _LastJacobian()

        def jacobian(p):  # b.vjp and b.jvp at one p (gradient, Hessian actions) share one evaluation
            return last.get(p, evaluate)

        second = None
        if local_second is not None:
            def second(p, lam, dp):
                D = _rows_jacobian(local_second(p, dp), E * k, None, m, "local_second(p, dp) (vector)")
                lam = as_state_like(lam, n, "lam").reshape(n, -1).sum(axis=1)
                return D.T @ (S.T @ lam)

        super().__init__(n, m, value, jacobian, second=second, affine=affine and local_second is None)
        self.n_elements, self.dofs_per_element = E, k

    def second(self, p, lam, dp):
        if not self.affine and self._second is None:
            raise MissingDerivativeError(
                "this ElementVector has no second-order term: pass local_second=(p, dp) -> (E k, m), the derivative "
                "of local_jacobian(p) dp, or affine=True if the local vectors are affine in p")
        return super().second(p, lam, dp)
