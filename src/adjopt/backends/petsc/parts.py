"""One rank's part of a distributed problem, built without the global problem.

A :class:`LocalSystem` is what :meth:`DistributedReducedFunctional.from_parts
<adjopt.backends.petsc.DistributedReducedFunctional.from_parts>` needs from
each rank: its elements (connectivity in global dof numbers, local matrices,
coefficient), the right-hand side on the dofs it owns, the rows of the
parameter map for its elements, and its part of every objective term. The
global numbering is one in which every rank owns a contiguous range of dofs,
of parameters, of elements and of observations, in rank order: rank r owns
``[start_r, start_r + n_owned_r)`` with ``start_r`` the sum of the counts of
the ranks before it. The slabs of :mod:`adjopt.mesh.parts` number nodes and
cells that way, so the serial numbering of a structured mesh is this one.

Nothing in a :class:`LocalSystem` has the global length: a rank holds its
elements, its owned dofs and parameters and the ghost values its elements
touch. The objective terms:

* :class:`LocalMisfit`: c/2 sum_i w_i ((B u)_i - d_i)^2 over this rank's observations;
* :class:`LocalCompliance`: c load^T u on the owned dofs;
* :class:`LocalQuadratic`: c/2 (p - p_ref)^T Q (p - p_ref), this rank's rows of Q.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ...errors import NonFiniteError, ShapeError


def agree(comm, ok: bool, message: str, exc=ValueError) -> None:
    """Raise ``exc`` on every rank when ``ok`` is False on any rank (the first failing rank's message).

    The ranks exchange one flag each, so a check that fails on one rank only
    (a NaN in its part of p, a vector of another length) stops all of them
    instead of leaving the others waiting in the next collective call.
    """
    flags = comm.allgather(None if ok else str(message))
    bad = [(r, m) for r, m in enumerate(flags) if m is not None]
    if bad:
        r, m = bad[0]
        raise exc(m if comm.size == 1 else f"{m} (on rank {r} of {comm.size})")


def _fingerprint(value) -> str:
    """What :func:`same_options` compares of one option: the value of a plain one (numbers and booleans as the
    Python ones they equal, numpy's too; strings and paths as str; None; tuples and lists alike, element by
    element), the shape, dtype and a digest of a numeric array's bytes, else only the type (an object's repr
    may hold its address, which differs between processes). Never raises: a value it cannot read compares by
    its type."""
    try:
        return _fingerprint_of(value)
    except Exception:  # a fingerprint that fails on one rank only would leave the others waiting
        return f"<{type(value).__name__}>"


#: a sequence longer than this compares by a digest of its entries as an array (not entry by entry)
_SHORT = 16


def _fingerprint_of(value) -> str:
    import hashlib
    import os

    import scipy.sparse as sps

    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return repr(bool(value))
    if isinstance(value, (str, os.PathLike)):
        return repr(str(os.fspath(value)))
    if isinstance(value, bytes):
        return repr(bytes(value))
    if isinstance(value, numbers.Integral):  # numpy's integers and floats as the Python ones they equal
        return repr(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, numbers.Number):
        return repr(complex(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_fingerprint(k)}: {_fingerprint(v)}"
                               for k, v in sorted(value.items(), key=lambda kv: _fingerprint(kv[0]))) + "}"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_fingerprint(v) for v in value)) + "}"
    if sps.issparse(value):
        c = sps.csr_array(value)
        c.sum_duplicates()
        return f"sparse(shape={c.shape}, {_fingerprint(c.indptr)}, {_fingerprint(c.indices)}, {_fingerprint(c.data)})"
    if isinstance(value, (tuple, list)) and len(value) <= _SHORT:
        return "(" + ", ".join(_fingerprint(v) for v in value) + ")"
    if not isinstance(value, np.ndarray):
        # array-likes (long lists, range, array.array, memoryview): by their entries as an array
        if not isinstance(value, (tuple, list, range, memoryview)) and not hasattr(value, "__array__") \
                and not hasattr(value, "__buffer__") and type(value).__module__ != "array":
            return f"<{type(value).__name__}>"
        value = np.asarray(value)
    if isinstance(value, np.ma.MaskedArray):
        return f"masked({_fingerprint(np.ma.getdata(value))}, {_fingerprint(np.ma.getmaskarray(value))})"
    if value.ndim == 0:
        return _fingerprint(value.item())  # a 0-d array as the scalar it holds
    if value.dtype.hasobject:
        return "array(" + _fingerprint(value.tolist()) + ")"
    a = np.ascontiguousarray(value)
    return f"array(shape={value.shape}, dtype={a.dtype}, sha1={hashlib.sha1(a.view(np.uint8).ravel()).hexdigest()[:16]})"


def content_digest(*objects, depth: int = 5) -> str:
    """A digest of what the objects hold: their class and, ``depth`` levels down, their public attributes
    (arrays and sparse matrices by their entries, numbers and strings by value, lists and dicts entry by
    entry; names that start with an underscore, caches among them, are left out). Equal on every rank for the
    same serial problem built from the same options; different when a size, a seed or the data differ."""
    import hashlib

    h = hashlib.sha1()
    seen: set[int] = set()

    def walk(o, level):
        h.update(type(o).__name__.encode())
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, (list, tuple)) and len(o) <= _SHORT and level < depth:  # terms of a sum, say
            for v in o:
                walk(v, level + 1)
            return
        leaf = _fingerprint(o)
        if not leaf.startswith("<") or level >= depth:
            h.update(leaf.encode())
            return
        attrs = getattr(o, "__dict__", None)
        if isinstance(attrs, dict):
            for k in sorted(a for a in attrs if not a.startswith("_")):
                h.update(k.encode())
                walk(attrs[k], level + 1)

    for o in objects:
        walk(o, 0)
    return h.hexdigest()[:16]


def same_options(comm, where: str, **options) -> None:
    """Raise ValueError on every rank when an option of ``where`` differs between the ranks.

    A rank-by-rank build is a collective call: ranks called with different
    sizes, seeds or solver options would build parts of different problems, or
    wait for each other forever in the first exchange whose sizes disagree.
    The ranks exchange a fingerprint of each option (arrays by a digest of
    their bytes) and all stop with the names and values that differ; call it
    before any check that could fail on some ranks only.
    """
    mine = {k: _fingerprint(v) for k, v in options.items()}
    every = comm.allgather(mine)
    names = sorted(set().union(*every))
    differ = [k for k in names if len({o.get(k, "(not given)") for o in every}) > 1]
    if not differ:
        return
    def brief(text: str) -> str:  # a long option (a list of thousands of entries) is not printed whole
        return text if len(text) <= 80 else text[:60] + " ... " + text[-15:]

    shown = "; ".join(
        f"{k}: " + ", ".join(f"rank {r} {brief(o.get(k, '(not given)'))}" for r, o in enumerate(every))
        for k in differ[:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    raise ValueError(f"{where} was called with options that differ between the ranks ({shown}{more}): every rank "
                     "must pass the same options (it is a collective call)")


def raise_first(comm, error: Exception | None) -> None:
    """Raise on every rank the first failing rank's exception (its class and message), if any rank has one."""
    said = comm.allgather(None if error is None else (type(error), str(error)))
    first = next(((r, x) for r, x in enumerate(said) if x is not None), None)
    if first is None:
        return
    r, (kind, message) = first
    text = message if comm.size == 1 else f"{message} (on rank {r} of {comm.size})"
    try:
        exc = kind(text)
    except Exception:  # an exception class that wants other arguments
        exc = ValueError(f"{kind.__name__}: {text}")
    if error is not None and r == comm.rank:
        raise exc from error
    raise exc


def _collective(comm, build):
    """build() on every rank; if it raises on any rank, every rank raises (the first failing rank's error)."""
    error, out = None, None
    try:
        out = build()
    except (ValueError, TypeError, IndexError, ArithmeticError) as exc:
        error = exc
    raise_first(comm, error)
    return out


def _count(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _finite(a, name: str, shape=None) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)  # a copy: the caller may change its array afterwards
    if shape is not None and a.shape != shape:
        raise ShapeError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return a


def _rows(S, name: str, n_rows: int) -> sp.csr_array:
    """A copy of S as CSR with sorted, summed entries and ``n_rows`` rows (columns: global indices)."""
    if not sp.issparse(S):
        raise TypeError(f"{name} must be a scipy sparse matrix (this rank's rows, global columns), got {type(S).__name__}")
    S = sp.csr_array(S, dtype=np.float64, copy=True)
    if S.shape[0] != n_rows:
        raise ShapeError(f"{name} must have {n_rows} rows (this rank's), got {S.shape[0]}")
    S.sum_duplicates()
    S.sort_indices()
    if not np.all(np.isfinite(S.data)):
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return S


@dataclass
class LocalMisfit:
    """c/2 sum_i w_i ((B u)_i - d_i)^2 over this rank's observations i.

    ``B``: this rank's rows of the observation operator, columns in global
    dof numbers (``None``: every owned dof is observed, d has one value per
    owned dof). ``w``: weights (``None``: 1).
    """

    d: np.ndarray
    B: object = None
    w: np.ndarray | None = None
    c: float = 1.0

    def __post_init__(self):
        self.d = _finite(self.d, "LocalMisfit.d")
        if self.d.ndim != 1:
            raise ShapeError(f"LocalMisfit.d must be one-dimensional, got shape {self.d.shape}")
        if self.B is not None:
            self.B = _rows(self.B, "LocalMisfit.B", self.d.size)
        if self.w is not None:
            self.w = _finite(self.w, "LocalMisfit.w", self.d.shape)
        self.c = float(self.c)
        if not np.isfinite(self.c):
            raise NonFiniteError(f"LocalMisfit.c must be finite, got {self.c}")


@dataclass
class LocalCompliance:
    """c load^T u, ``load`` on this rank's owned dofs."""

    load: np.ndarray
    c: float = 1.0

    def __post_init__(self):
        self.load = _finite(self.load, "LocalCompliance.load")
        self.c = float(self.c)
        if not np.isfinite(self.c):
            raise NonFiniteError(f"LocalCompliance.c must be finite, got {self.c}")


@dataclass
class LocalQuadratic:
    """c/2 (p - p_ref)^T Q (p - p_ref) with Q this rank's rows (global columns), a weight per owned
    parameter (a vector), or the identity (``None``); ``p_ref`` on the owned parameters (or a scalar)."""

    Q: object = None
    p_ref: object = None
    c: float = 1.0

    def __post_init__(self):
        self.c = float(self.c)
        if not np.isfinite(self.c):
            raise NonFiniteError(f"LocalQuadratic.c must be finite, got {self.c}")
        if self.p_ref is not None:
            self.p_ref = _finite(self.p_ref, "LocalQuadratic.p_ref")
        #: the identity of the Q given: a Gram matrix that is the same object shares the copy
        self.given = id(self.Q)
        if sp.issparse(self.Q):
            self.Q = _rows(self.Q, "LocalQuadratic.Q", self.Q.shape[0])
        elif self.Q is not None:
            self.Q = _finite(self.Q, "LocalQuadratic.Q")


@dataclass
class LocalSystem:
    """This rank's part of A(rho) u = b, rho = L p, and J (see the module docstring).

    Parameters
    ----------
    conn
        (E_local, k) dof numbers of this rank's elements in the global
        numbering; negative entries are condensed (Dirichlet) dofs.
    local
        The element matrices: (k, k) shared by every element, or (E_local, k, k).
    coefficient
        phi(rho) of :class:`~adjopt.ElementCoefficientMatrix` (a name such as
        ``"exp"`` or a coefficient object such as :class:`~adjopt.SIMP`).
    n_owned_dofs
        How many dofs this rank owns; its elements may touch dofs of other ranks.
    rhs
        b on the owned dofs, shape (n_owned_dofs,).
    terms
        The objective: :class:`LocalMisfit`, :class:`LocalCompliance` and
        :class:`LocalQuadratic` terms (their sum).
    parameter_matrix, n_owned_params
        This rank's rows of L (one per element, global parameter columns) and
        how many parameters it owns; ``None``: one parameter per element (p = rho).
    near_nullspace
        (n_owned_dofs, k) rows of the near-nullspace of A (rigid body modes).
    gram
        Optional Gram matrices of the parameter space, ``{"mass": ..., "stiffness": ...}``:
        this rank's rows (sparse, global columns) or a weight per owned
        parameter (a lumped mass). The drivers' inner products (``"l2"``,
        ``"l2-lumped"``, ``"h1"``) and Newton-CG's preconditioner use them
        (:meth:`DistributedReducedFunctional.inner_product
        <adjopt.backends.petsc.DistributedReducedFunctional.inner_product>`),
        as the serial drivers use ``Problem(mass=, stiffness=)``.
    rhs_matrix
        Optional: b depends on p, b(p) = rhs + R p, with ``rhs_matrix`` this
        rank's rows of R (sparse, one row per owned dof, global parameter
        columns): a source to recover, say. The gradient gains R^T lam, the
        tangent's right-hand side R dp and the Hessian action R^T dl.
    """

    conn: np.ndarray
    local: np.ndarray
    coefficient: object
    n_owned_dofs: int
    rhs: np.ndarray
    terms: list = field(default_factory=list)
    parameter_matrix: object = None
    n_owned_params: int | None = None
    near_nullspace: np.ndarray | None = None
    gram: dict | None = None
    rhs_matrix: object = None

    def __post_init__(self):
        conn = np.asarray(self.conn)
        if conn.ndim != 2 or (conn.size and conn.dtype.kind not in "iu"):
            raise ShapeError(f"conn must be an integer array (elements, dofs per element), got {conn.dtype} {conn.shape}")
        self.conn = conn.astype(np.int64)
        self.local = _finite(self.local, "local (the element matrices)")
        self.n_owned_dofs = _count(self.n_owned_dofs, "n_owned_dofs")
        self.rhs = _finite(self.rhs, "rhs", (self.n_owned_dofs,))
        for t in self.terms:
            if not isinstance(t, (LocalMisfit, LocalCompliance, LocalQuadratic)):
                raise TypeError(f"terms are LocalMisfit, LocalCompliance or LocalQuadratic, got {type(t).__name__}")
            if isinstance(t, LocalCompliance) and t.load.shape != (self.n_owned_dofs,):
                raise ShapeError(f"LocalCompliance.load must have one value per owned dof ({self.n_owned_dofs}), "
                                 f"got shape {t.load.shape}")
            if isinstance(t, LocalMisfit) and t.B is None and t.d.shape != (self.n_owned_dofs,):
                raise ShapeError(f"a LocalMisfit without B observes the owned dofs: d must have length "
                                 f"{self.n_owned_dofs}, got {t.d.shape[0]}")
        if self.parameter_matrix is None:
            if self.n_owned_params is not None and self.n_owned_params != self.conn.shape[0]:
                raise ValueError("without a parameter_matrix every element is a parameter: n_owned_params must be "
                                 f"None or {self.conn.shape[0]}, got {self.n_owned_params!r}")
            self.n_owned_params = self.conn.shape[0]
        else:
            self.parameter_matrix = _rows(self.parameter_matrix, "parameter_matrix", self.conn.shape[0])
            if self.n_owned_params is None:
                raise ValueError("with a parameter_matrix, say how many parameters this rank owns (n_owned_params)")
            self.n_owned_params = _count(self.n_owned_params, "n_owned_params")
        if self.near_nullspace is not None:
            Z = _finite(self.near_nullspace, "near_nullspace")
            if Z.ndim != 2 or Z.shape[0] != self.n_owned_dofs:
                raise ShapeError(f"near_nullspace must be (n_owned_dofs={self.n_owned_dofs}, k), got {Z.shape}")
            self.near_nullspace = Z
        gram = {} if self.gram is None else dict(self.gram)
        unknown = sorted(set(gram) - {"mass", "stiffness"})
        if unknown:
            raise ValueError(f"gram takes 'mass' and 'stiffness', got {unknown}")
        shared = {t.given: t.Q for t in self.terms if isinstance(t, LocalQuadratic) and sp.issparse(t.Q)}
        for name, G in gram.items():
            if id(G) in shared and shared[id(G)].shape[0] == self.n_owned_params:
                gram[name] = shared[id(G)]  # the matrix of a regularization term too: one copy for both
            elif sp.issparse(G):
                gram[name] = _rows(G, f"gram[{name!r}]", self.n_owned_params)
            else:
                gram[name] = _finite(G, f"gram[{name!r}]", (self.n_owned_params,))
        if "stiffness" in gram and "mass" not in gram:
            raise ValueError("gram: a stiffness needs a mass as well (H1 = stiffness + mass)")
        self.gram = gram
        if self.rhs_matrix is not None:
            self.rhs_matrix = _rows(self.rhs_matrix, "rhs_matrix", self.n_owned_dofs)


# -- helpers of rank-local builds (collective: every rank calls them) --------------------------------------------
def ownership(comm, start: int, n_owned: int) -> np.ndarray:
    """The ownership ranges (size + 1,) from every rank's first owned global id and count (contiguous, in order)."""
    got = comm.allgather((int(start), int(n_owned)))
    starts = np.array([s for s, _ in got] + [got[-1][0] + got[-1][1]], dtype=np.int64)
    ends = np.array([s + n for s, n in got], dtype=np.int64)
    if starts[0] != 0 or np.any(ends != starts[1:]):
        raise ValueError(f"the owned ranges (start, count) {got} are not contiguous in rank order from 0")
    return starts


def _owner(ranges: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(ranges, ids, side="right") - 1


def free_numbering(comm, ids, fixed, n_owned: int):
    """Global numbers of the free (not fixed) entries of a condensed system.

    ``ids`` are the global ids of this rank's local entries (dofs), the
    first ``n_owned`` its own contiguous range, the rest ghosts owned by
    other ranks; ``fixed`` marks the Dirichlet ones. The free entries are
    numbered in global id order (the serial :func:`~adjopt.fem.condense`
    order). Returns (the free number of every local entry, -1 where fixed;
    how many free entries this rank owns). The ghosts' numbers come from
    their owners (one exchange).
    """
    ids = np.asarray(ids, dtype=np.int64)
    fixed = np.asarray(fixed, dtype=bool)
    agree(comm, fixed.shape == ids.shape and 0 <= n_owned <= ids.size, f"fixed must have one flag per local id "
          f"({ids.size}) and n_owned at most that many, got shape {fixed.shape} and n_owned={n_owned}", ShapeError)
    ranges = ownership(comm, ids[0] if n_owned else 0, n_owned) if comm.size > 1 or n_owned else None
    free_owned = ~fixed[:n_owned]
    count = int(free_owned.sum())
    offset = comm.exscan(count) if comm.size > 1 else 0
    offset = 0 if offset is None else int(offset)
    out = np.full(ids.size, -1, dtype=np.int64)
    out[:n_owned][free_owned] = offset + np.arange(count)
    ghosts = ids[n_owned:]
    if comm.size > 1:
        agree(comm, bool(np.all((ghosts >= 0) & (ghosts < ranges[-1]))) and not np.any(
            (ghosts >= ranges[comm.rank]) & (ghosts < ranges[comm.rank + 1])), "free_numbering: a ghost id is outside "
            f"[0, {ranges[-1]}) or owned by this rank itself: the ghosts are other ranks' ids", ValueError)
        who = _owner(ranges, ghosts)
        asked = comm.alltoall([ghosts[who == r] for r in range(comm.size)])
        start = ranges[comm.rank]
        answers = comm.alltoall([out[q - start] for q in asked])
        for r in range(comm.size):
            out[n_owned:][who == r] = answers[r]
    elif ghosts.size:
        raise ValueError("one rank owns everything: there can be no ghosts")
    return out, count


def sum_to_owners(comm, ids, values, ranges) -> np.ndarray:
    """This rank's owned entries of the global vector sum_k values[k] e_{ids[k]}, summed over all ranks.

    Each rank contributes values at any global ids (its elements' load at
    ghost nodes, say); the owners (``ranges``) receive and sum them.
    """
    ids, values = np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float64)
    ranges = np.asarray(ranges, dtype=np.int64)
    agree(comm, ids.shape == values.shape and bool(np.all((ids >= 0) & (ids < ranges[-1]))),
          f"sum_to_owners: ids ({ids.shape}) and values ({values.shape}) must have one entry each, ids in "
          f"[0, {ranges[-1]})", ValueError)
    lo, hi = ranges[comm.rank], ranges[comm.rank + 1]
    out = np.zeros(hi - lo)
    who = _owner(ranges, ids)
    got = comm.alltoall([(ids[who == r], values[who == r]) for r in range(comm.size)])
    for i, v in got:
        np.add.at(out, i - lo, v)
    return out


def rows_to_owners(comm, S, row_ids, ranges) -> sp.csr_array:
    """This rank's owned rows of sum_ranks P^T S: the rows of a local sparse S (global ids ``row_ids``, global
    columns) summed on the ranks that own them (``ranges``). A rank's elements add to rows of its ghost nodes:
    this completes the owners' rows (a stiffness or mass matrix of a nodal field, say)."""
    S = sp.coo_array(S)
    row_ids = np.asarray(row_ids, dtype=np.int64)
    ranges = np.asarray(ranges, dtype=np.int64)
    agree(comm, row_ids.shape == (S.shape[0],) and bool(np.all((row_ids >= 0) & (row_ids < ranges[-1]))),
          f"rows_to_owners: row_ids must give one row number in [0, {ranges[-1]}) per row of S ({S.shape[0]}), got "
          f"shape {row_ids.shape}", ValueError)
    rows = row_ids[S.row]
    who = _owner(ranges, rows)
    got = comm.alltoall([(rows[who == r], S.col[who == r], S.data[who == r]) for r in range(comm.size)])
    lo, hi = ranges[comm.rank], ranges[comm.rank + 1]
    r = np.concatenate([g[0] for g in got]) - lo
    c = np.concatenate([g[1] for g in got])
    v = np.concatenate([g[2] for g in got])
    out = sp.csr_array((v, (r, c)), shape=(hi - lo, S.shape[1]))
    out.sum_duplicates()
    out.sort_indices()
    return out


class DistributedVolume:
    """The volume fraction sum_e v_e rho_e / sum_e v_e of rho = L p, each rank holding its elements' rows.

    The interface of a constraint (``value``, ``gradient``, ``hessp``;
    collective) on the full p, the same on every rank (the serial interface),
    and, from :meth:`blocks`, on this rank's block of p. A rank computes its
    elements' part and one reduction sums them; the gradient (constant: the
    constraint is linear) is summed on the ranks that own the parameters
    (:func:`sum_to_owners`) and gathered only for the serial interface.

    Parameters
    ----------
    comm
        The communicator.
    volumes
        This rank's element volumes.
    parameter_matrix
        This rank's rows of L (global parameter columns); ``None``: p = rho,
        this rank's elements being the parameters it owns.
    n_params
        The global number of parameters.
    first
        The global number of this rank's first owned parameter.
    n_owned
        How many parameters this rank owns (default: one per element).
    """

    def __init__(self, comm, volumes, parameter_matrix=None, *, n_params: int, first: int = 0,
                 n_owned: int | None = None):
        self.comm = comm
        v = _collective(comm, lambda: _finite(volumes, "volumes"))
        total = comm.allreduce(float(v.sum()))
        if not total > 0:
            raise ValueError(f"the element volumes sum to {total}: they must be positive")
        self.n_params = _count(n_params, "n_params")
        n_owned = v.size if n_owned is None else _count(n_owned, "n_owned")
        self.range = (int(first), int(first) + n_owned)
        if parameter_matrix is None:
            if n_owned != v.size:
                raise ValueError(f"with p = rho a rank owns its {v.size} elements' parameters, got n_owned={n_owned}")
            self._block = v / total
        else:
            L = sp.coo_array(_rows(parameter_matrix, "parameter_matrix", v.size))
            self._block = sum_to_owners(comm, L.col, L.data * v[L.row] / total, ownership(comm, first, n_owned))
        self._full = None
        self.distributed = False

    def blocks(self) -> DistributedVolume:
        """The same constraint on this rank's block of p."""
        out = object.__new__(DistributedVolume)
        out.__dict__.update(self.__dict__)
        out.distributed = True
        return out

    @property
    def _grad(self) -> np.ndarray:
        if self.distributed:
            return self._block
        if self._full is None:
            self._full = np.concatenate(self.comm.allgather(self._block))
        return self._full

    def forget(self) -> None:
        """Nothing is cached per p (the constraint is linear)."""

    def _p(self, p) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        n = self.range[1] - self.range[0] if self.distributed else self.n_params
        what = f"p must have length {n}{' (this rank' + chr(39) + 's block)' if self.distributed else ''}"
        if self.distributed:
            agree(self.comm, p.shape == (n,), f"{what}, got shape {p.shape}", ShapeError)
        elif p.shape != (n,):
            raise ShapeError(f"{what}, got shape {p.shape}")
        return p

    def value(self, p) -> float:
        local = float(self._grad @ self._p(p))
        return float(self.comm.allreduce(local)) if self.distributed else local

    def gradient(self, p) -> np.ndarray:
        self._p(p)
        return self._grad.copy()

    def hessp(self, p, dp) -> np.ndarray:
        return np.zeros_like(self._p(p))
