"""A distributed :class:`~adjopt.ReducedFunctional`: A(p) u = b on PETSc, derivatives by adjoints.

The formulas are the serial ones (DESIGN.md), evaluated on distributed vectors:

    A u = b                                   forward      (KSP solve)
    A^T lam = df/du                           adjoint      (KSP solveTranspose, same KSP and PC)
    grad J = df/dp + L^T ( -C(lam, u) )       C(w, z)_e = w_e^T (dA/drho_e) z_e

    A du   = -(dA/drho . drho) u                               tangent
    A^T dl = f_uu du - (dA/drho . drho)^T lam                  second adjoint
    H dp   = f_pp dp + L^T ( -C(dl, u) - C(lam, du) - C2(lam, u, drho) )

with rho = L p the (linear) parameter map and drho = L dp. C, C2 and the
tangent are the serial numba kernels of an
:class:`~adjopt.ElementCoefficientMatrix` built on each rank's own elements,
applied to ghosted copies of w and z gathered by one PETSc scatter built at
construction (the tangent adds its element contributions back through the same
scatter in reverse).

Two interfaces, both collective (every rank calls them):

* PETSc vectors in the distributed numbering (:meth:`value_vec`,
  :meth:`gradient_vec`, :meth:`hessp_vec`; :meth:`create_parameter_vec`,
  :meth:`to_vec`, :meth:`to_numpy`): parameters, gradients and Hessian
  actions stay distributed. TAO uses these (:func:`~adjopt.backends.petsc.minimize_tao`).
* numpy arrays in the serial numbering, the same full vector on every rank
  (:meth:`value`, :meth:`gradient`, :meth:`hessp`): the serial interface, so
  adjopt's own drivers, Taylor tests and the CLI run unchanged under mpiexec.
  The parameter vector is then replicated (m doubles per rank, and one
  allgather per gradient or Hessian action).
"""

from __future__ import annotations

import logging
import numbers
import os
import time
from collections import Counter
from dataclasses import dataclass, replace

import numba
import numpy as np
import scipy.sparse as sp
from mpi4py import MPI
from petsc4py import PETSc

from ..._memory import return_freed_memory
from ...errors import NonFiniteError, PatternError, ShapeError, SingularMatrixError, SolverDidNotConverge
from ...fem.nullspace import rigid_body_modes
from ...objectives.base import Objective, Scaled, Sum
from ...objectives.regularization import _Quadratic
from ...objectives.state import Compliance, SquaredMisfit
from ...operators.element import ElementCoefficientMatrix
from ...operators.residual import ParametricResidual
from ...operators.vectors import as_vector
from ...optimize.inner import INNER_PRODUCTS, Euclidean, InnerProduct
from ...optimize.space import Blocks
from ...solvers.base import SolverStats
from ..partition import ContiguousNumbering, Layout, Numbering, make_layout, partition_elements
from .parts import (
    LocalCompliance,
    LocalMisfit,
    LocalQuadratic,
    LocalSystem,
    agree,
    content_digest,
    raise_first,
    same_options,
)

logger = logging.getLogger(__name__)

_INT = PETSc.IntType
_REASONS = {v: k for k, v in vars(PETSc.KSP.ConvergedReason).items() if isinstance(v, int)}
_PC_FAILURES = {v: k for k, v in vars(PETSc.PC.FailedReason).items() if isinstance(v, int)}
#: PETSC_ERR_MISSING_FACTOR: no package for the factorization asked for (LU of an MPIAIJ matrix without MUMPS)
_ERR_MISSING_FACTOR = 92
#: PETSC_ERR_UNKNOWN_TYPE: a KSP or PC type this PETSc does not have (misspelt, or its package not built in)
_ERR_UNKNOWN_TYPE = 86
#: PETSC_ERR_SUP: an operation the object does not support (SOR applied transposed, say)
_ERR_SUPPORT = 56
#: Krylov methods that apply the preconditioner transposed in an ordinary solve
TRANSPOSED_PC_KSPS = ("bicg", "cgne", "lsqr")
#: preconditioners without a transposed application (PCApplyTranspose)
NO_TRANSPOSE_PCS = {"sor", "eisenstat"}
#: a converged solve must leave |b - A x| <= RESIDUAL_SLACK rtol |b| (round-off and CG's recurrence drift allowed)
RESIDUAL_SLACK = 100.0
#: solve kinds that start from the previous solution of the same kind (tangents change direction every call)
WARM_KINDS = ("forward", "adjoint")
#: options of the default preconditioner (prefix adjopt_; set by the user first, PETSC_OPTIONS, they win)
GAMG_DEFAULTS = {"mg_levels_ksp_type": "richardson", "mg_levels_pc_type": "sor"}
SUPPORTED_TERMS = "SquaredMisfit (weights a vector), Compliance, TikhonovL2 and TikhonovH1, scaled and summed"


def _pc_failure(pc) -> str:
    """Why PETSc says ``pc`` failed (``FACTOR_NUMERIC_ZEROPIVOT``, ...), looking into the first block of a block
    Jacobi or additive Schwarz preconditioner when the failure is there (``SUBPC_ERROR``); this rank's view."""
    reason = int(pc.getFailedReason())
    if _PC_FAILURES.get(reason) == "SUBPC_ERROR":
        try:
            subs = pc.getBJacobiSubKSP() if pc.getType() == "bjacobi" else pc.getASMSubKSP()
            inner = [int(k.getPC().getFailedReason()) for k in subs]
            reason = next((r for r in inner if r > 0), reason)
        except PETSc.Error:  # another kind of preconditioner: its own reason stands
            pass
    return _PC_FAILURES.get(reason, f"failed reason {reason}")


def _same_on_every_rank(comm, p: np.ndarray, name: str) -> None:
    """Refuse (on every rank) a full vector that differs between the ranks, which each rank would otherwise cut
    its own part from, silently mixing them. Compared: 1024 evenly spaced entries, the sum and the sum of
    squares, to 1e-10 relative (round-off in a rank's own computation of p passes)."""
    idx = np.linspace(0, p.size - 1, min(p.size, 1024)).astype(np.int64) if p.size else np.zeros(0, np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        probe = np.concatenate([p[idx], [np.sum(p), np.sum(np.square(p))]])
    probes = comm.allgather(probe)
    ref = probes[0]
    scale = 1e-10 * (1.0 + float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)))
    differ = [r for r, q in enumerate(probes) if not np.allclose(q, ref, rtol=1e-10, atol=scale, equal_nan=True)]
    if differ:
        raise ValueError(f"{name} differs between the ranks (ranks {differ} hold another vector than rank 0): the "
                         "full-vector interface takes the same p on every rank; give each rank its own block "
                         "through F.blocks() (or in_blocks(problem)) instead")


def _return_freed_memory(comm) -> None:
    """adjopt._memory.return_freed_memory on every rank: a rank's arrays of a few MiB go back to the system when
    freed; an ADJOPT_MALLOC that one rank refuses stops every rank."""
    error = None
    try:
        return_freed_memory()
    except ValueError as exc:
        error = exc
    raise_first(comm, error)


def _share_cores(comm) -> None:
    """Split the numba threads among the ranks of a node (unless NUMBA_NUM_THREADS says otherwise).

    numba starts as many threads as the node has cores in every rank; with
    several ranks per node they would compete for the same cores.
    """
    if "NUMBA_NUM_THREADS" in os.environ:
        return
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    per_rank = max(1, numba.config.NUMBA_NUM_THREADS // node.size)
    node.Free()
    if per_rank < numba.get_num_threads():
        numba.set_num_threads(per_rank)
        logger.debug("numba threads per rank: %d", per_rank)


def _block_numbering(n: int, n_ranks: int) -> Numbering:
    """Rank r owns rows [r n / R, (r + 1) n / R) (some ranks may own none)."""
    bounds = (np.arange(n_ranks + 1, dtype=np.int64) * n) // n_ranks
    return Numbering(np.arange(n), np.arange(n), bounds)


def _vec(comm, numbering: Numbering, rank: int, full=None) -> PETSc.Vec:
    """A distributed Vec in ``numbering``; filled with the owned entries of ``full`` (serial order)."""
    v = PETSc.Vec().createMPI((numbering.local_size(rank), numbering.size), comm=comm)
    if full is None:
        v.set(0.0)
    else:
        v.setArray(np.asarray(full, dtype=np.float64)[numbering.owned(rank)])
    return v


def _local_problems(system: LocalSystem, lay: Layout, rank: int):
    """(ok, message, exception class) of this rank's pieces against the global sizes (no communication)."""
    n_dofs, n_params = lay.dofs.size, lay.params.size
    mine = lay.params.local_size(rank)
    try:
        k = system.conn.shape[1]
        local = np.asarray(system.local)
        if local.shape not in ((k, k), (system.conn.shape[0], k, k)):
            return False, (f"local must be ({k}, {k}) or (elements, {k}, {k}) for elements of {k} dofs, got "
                           f"{local.shape}"), ShapeError
        if not np.all(np.isfinite(local)):
            return False, "local (the element matrices) holds NaN or Inf", NonFiniteError
        for t in system.terms:
            if isinstance(t, LocalMisfit) and t.B is not None and t.B.shape[1] != n_dofs:
                return False, (f"LocalMisfit.B has {t.B.shape[1]} columns but the ranks own {n_dofs} dofs in all "
                               "(one column per global dof)"), ShapeError
            if isinstance(t, LocalQuadratic):
                Q = t.Q
                if sp.issparse(Q) and Q.shape != (mine, n_params):
                    return False, (f"LocalQuadratic.Q must have shape ({mine}, {n_params}) (this rank's rows of the "
                                   f"parameters' matrix), got {Q.shape}"), ShapeError
                if Q is not None and not sp.issparse(Q) and np.shape(Q) not in ((), (mine,)):
                    return False, (f"LocalQuadratic.Q as weights must have one per owned parameter ({mine}), got "
                                   f"shape {np.shape(Q)}"), ShapeError
                if t.p_ref is not None and np.shape(t.p_ref) not in ((), (mine,)):
                    return False, (f"LocalQuadratic.p_ref must be a scalar or have one value per owned parameter "
                                   f"({mine}), got shape {np.shape(t.p_ref)}"), ShapeError
        for name, G in system.gram.items():
            if sp.issparse(G) and G.shape != (mine, n_params):
                return False, (f"gram[{name!r}] must have shape ({mine}, {n_params}) (this rank's rows), got "
                               f"{G.shape}"), ShapeError
    except Exception as exc:  # anything else that this rank alone would raise
        return False, f"{type(exc).__name__}: {exc}", ValueError
    return True, "", ValueError


def _check_solver_options(rtol, max_it) -> None:
    ok_rtol = isinstance(rtol, numbers.Real) and not isinstance(rtol, (bool, np.bool_)) and 0 < rtol < 1
    ok_max_it = isinstance(max_it, numbers.Integral) and not isinstance(max_it, (bool, np.bool_)) and max_it >= 1
    if not (ok_rtol and ok_max_it):
        raise ValueError(f"rtol must be a float in (0, 1) and max_it an integer >= 1, got rtol={rtol!r}, max_it={max_it!r}")


class PetscOptionsError(ValueError):
    """PETSc refused the Krylov method, the preconditioner or one of their options (arguments or
    ``PETSC_OPTIONS``), on every rank."""


def _petsc_message(exc) -> str:
    """The last line of a petsc4py error: PETSc's own words (``Unable to find requested PC type hypre``)."""
    lines = [ln.split("] ", 1)[-1].strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else f"error code {getattr(exc, 'ierr', '?')}"


def _options_message(exc, ksp_type, pc_type) -> str:
    """What to tell a user whose solver options PETSc refused while the KSP was made."""
    opts = PETSc.Options()
    asked = ", ".join(f"{k}={v!r}" for k, v in (("ksp_type", opts.getString("adjopt_ksp_type", "") or ksp_type),
                                                ("pc_type", opts.getString("adjopt_pc_type", "") or pc_type)) if v)
    said = _petsc_message(exc)
    if exc.ierr == _ERR_UNKNOWN_TYPE:
        return (f"PETSc does not know a Krylov method or preconditioner asked for ({asked or 'the defaults'}, from the "
                f"arguments or -adjopt_... in PETSC_OPTIONS; PETSc says: {said}): a misspelling, or a package this "
                "PETSc was built without (the PyPI build has neither hypre nor MUMPS). Use pc_type='gamg' (the "
                "default), 'bjacobi' or 'jacobi', or a PETSc configured with --download-hypre")
    return (f"PETSc refused the solver options ({asked or 'the defaults'} and -adjopt_... in PETSC_OPTIONS) with error "
            f"{exc.ierr}: {said}. Check PETSC_OPTIONS and the values given to -adjopt_ksp_* and -adjopt_pc_*")


def _orthonormal(comm, Z: np.ndarray) -> np.ndarray:
    """This rank's rows of an orthonormal basis of the distributed columns of Z (Cholesky QR, twice)."""
    for _ in range(2):
        G = comm.allreduce(Z.T @ Z)
        R = np.linalg.cholesky(G).T
        Z = np.linalg.solve(R.T, Z.T).T
    return Z


def _vec_local(comm, numbering: Numbering, mine) -> PETSc.Vec:
    """A distributed Vec in ``numbering`` holding this rank's entries ``mine`` (copied)."""
    v = PETSc.Vec().createMPI((numbering.local_size(comm.rank), numbering.size), comm=comm)
    v.setArray(np.asarray(mine, dtype=np.float64))
    return v


def _mat_rows(comm, S: sp.csr_array, cols: Numbering, rows_global: int) -> PETSc.Mat:
    """A distributed AIJ Mat from this rank's rows ``S`` (CSR, sorted, columns already global)."""
    rank = comm.rank
    M = PETSc.Mat().createAIJ(
        size=((S.shape[0], rows_global), (cols.local_size(rank), cols.size)),
        csr=(S.indptr.astype(_INT), S.indices.astype(_INT), S.data.astype(np.float64)), comm=comm,
    )
    M.assemble()
    return M


def _local_rows(S, rows: np.ndarray, cols: Numbering) -> sp.csr_array:
    """Rows ``rows`` of a replicated sparse S, columns renumbered by ``cols.perm``, sorted."""
    mine = sp.csr_array(S)[rows]
    mine = sp.csr_array((mine.data, cols.perm[mine.indices], mine.indptr), shape=(mine.shape[0], cols.size))
    mine.sort_indices()
    return mine


def _mat(comm, S, rows: Numbering, cols: Numbering, rank: int) -> PETSc.Mat:
    """A distributed AIJ Mat from a (replicated) scipy sparse S: this rank's rows, columns renumbered."""
    return _mat_rows(comm, _local_rows(S, rows.owned(rank), cols), cols, rows.size)


def _ranges(comm, n_local: int) -> ContiguousNumbering:
    """The contiguous numbering in which rank r owns ``n_local`` of rank r entries after those of ranks < r."""
    counts = comm.allgather(int(n_local))
    return ContiguousNumbering(np.concatenate([[0], np.cumsum(counts)]))


def _flatten(objective: Objective, c: float = 1.0):
    """[(c, term)] of a sum of scaled terms."""
    if isinstance(objective, Sum):
        return [ct for t in objective.terms for ct in _flatten(t, c)]
    if isinstance(objective, Scaled):
        return _flatten(objective.term, c * objective.c)
    return [(c, objective)]


def _local_terms(objective: Objective, comm, lay: Layout, n: int, n_params: int) -> list:
    """The serial objective's terms as this rank's :mod:`~adjopt.backends.petsc.parts` terms (layout numbering)."""
    rank, dofs = comm.rank, lay.dofs.owned(comm.rank)
    out = []
    for c, term in _flatten(objective):
        if isinstance(term, Compliance):
            if term.load.shape != (n,):
                raise ShapeError(f"the PETSc backend takes one load case: Compliance load must have shape ({n},), "
                                 f"got {term.load.shape}")
            out.append(LocalCompliance(term.load[dofs], c))
        elif isinstance(term, SquaredMisfit):
            d = term.d
            if d.ndim != 1:
                raise ShapeError(f"the PETSc backend takes one experiment: the data must be (n_obs,), got {d.shape}")
            if term.W is not None and not isinstance(term.W, np.ndarray):
                raise NotImplementedError("the PETSc backend takes SquaredMisfit weights as a vector, not a matrix")
            if (term.B is None and d.shape != (n,)) or (term.B is not None and term.B.shape[1] != n):
                raise ShapeError(f"the misfit observes a state of length "
                                 f"{term.B.shape[1] if term.B is not None else d.shape[0]} but A(p) has {n} rows")
            if term.B is None:
                rows, B = dofs, None
            else:
                rows = _block_numbering(d.shape[0], comm.size).owned(rank)
                B = _local_rows(term.B, rows, lay.dofs)
            out.append(LocalMisfit(d[rows], B, None if term.W is None else term.W[rows], c))
        elif isinstance(term, _Quadratic):
            mine, M = lay.params.owned(rank), term.M
            Q = (None if M is None else M[mine] if isinstance(M, np.ndarray) else _local_rows(M, mine, lay.params))
            p_ref = None if term.p_ref is None else np.broadcast_to(term.p_ref, (n_params,))[mine]
            out.append(LocalQuadratic(Q, p_ref, c))
        else:
            raise NotImplementedError(f"the PETSc backend supports objectives made of {SUPPORTED_TERMS}; "
                                      f"got a {type(term).__name__} term; run it serially (drop --backend petsc)")
    return out


class _StateTerm:
    """A :class:`LocalMisfit` or :class:`LocalCompliance` on distributed state vectors."""

    def __init__(self, term, comm, dofs: Numbering):
        self.c = float(term.c)
        self.linear = None
        if isinstance(term, LocalCompliance):
            self.linear = _vec_local(comm, dofs, term.load)
            return
        if term.B is None:
            obs = dofs
            self.B = None
        else:
            if term.B.shape[1] != dofs.size:
                raise ShapeError(f"the misfit observes a state of length {term.B.shape[1]} but A(p) has {dofs.size} rows")
            obs = _ranges(comm, term.d.size)
            self.B = _mat_rows(comm, term.B, dofs, obs.size)
        self.d = _vec_local(comm, obs, term.d)
        self.w = None if term.w is None else _vec_local(comm, obs, term.w)
        self.r, self.wr = self.d.duplicate(), self.d.duplicate()
        self.t = None if self.B is None else self.B.createVecRight()

    def _weighted_residual(self, u):
        r, wr = self.r, self.wr
        if self.B is None:
            u.copy(r)
        else:
            self.B.mult(u, r)
        r.axpy(-1.0, self.d)
        r.copy(wr)
        if self.w is not None:
            wr.pointwiseMult(wr, self.w)
        return r, wr

    def value(self, u) -> float:
        if self.linear is not None:
            return self.c * self.linear.dot(u)
        r, wr = self._weighted_residual(u)
        return 0.5 * self.c * r.dot(wr)

    def add_grad_u(self, u, out) -> None:
        if self.linear is not None:
            out.axpy(self.c, self.linear)
            return
        _, wr = self._weighted_residual(u)
        self._add_transposed(wr, out)

    def add_hess_uu(self, du, out) -> None:
        if self.linear is not None:
            return
        r = self.r
        if self.B is None:
            du.copy(r)
        else:
            self.B.mult(du, r)
        if self.w is not None:
            r.pointwiseMult(r, self.w)
        self._add_transposed(r, out)

    def _add_transposed(self, v, out):
        if self.B is None:
            out.axpy(self.c, v)
        else:
            self.B.multTranspose(v, self.t)
            out.axpy(self.c, self.t)


def _diagonal_mat(comm, params: Numbering, values) -> PETSc.Mat:
    """The distributed diagonal matrix of this rank's ``values``."""
    n = params.local_size(comm.rank)
    d = np.broadcast_to(np.asarray(values, dtype=np.float64), (n,))
    S = sp.csr_array((d, params.ranges[comm.rank] + np.arange(n), np.arange(n + 1)), shape=(n, params.size))
    return _mat_rows(comm, S, params, params.size)


class _Mats:
    """PETSc Mats of this rank's sparse rows, made once per scipy object (a term's Q and a Gram matrix that are
    the same object share one Mat)."""

    def __init__(self, comm, params: Numbering):
        self.comm, self.params, self._made = comm, params, {}

    def __call__(self, G) -> PETSc.Mat:
        key = id(G)
        if key not in self._made:
            if sp.issparse(G):
                S = sp.csr_array(G)
                n = self.params.local_size(self.comm.rank)
                if S.shape != (n, self.params.size):
                    raise ShapeError(f"a matrix of the parameters must have shape ({n}, {self.params.size}) (this "
                                     f"rank's rows), got {S.shape}")
                self._made[key] = (G, _mat_rows(self.comm, S, self.params, self.params.size))
            else:
                self._made[key] = (G, _diagonal_mat(self.comm, self.params, 1.0 if G is None else G))
        return self._made[key][1]

    def release(self) -> None:
        """Forget the scipy objects (the Mats made stay with whoever holds them): the construction is over, and
        the rows of the regularization and Gram matrices need not live twice for the run."""
        self._made.clear()


class _ParameterTerm:
    """A :class:`LocalQuadratic`, c 0.5 (p - p_ref)^T Q (p - p_ref), on distributed parameter vectors."""

    def __init__(self, term: LocalQuadratic, comm, params: Numbering, mats: _Mats):
        self.c = float(term.c)
        n_mine = params.local_size(comm.rank)
        Q = term.Q
        self.Q = self.q = None
        self._mats, self._given = mats, Q
        if isinstance(Q, np.ndarray) or np.isscalar(Q):
            try:
                q = np.broadcast_to(np.asarray(Q, dtype=np.float64), (n_mine,))
            except ValueError:
                raise ShapeError(f"LocalQuadratic.Q as weights must have one per owned parameter ({n_mine}), got "
                                 f"shape {np.shape(Q)}") from None
            self.q = _vec_local(comm, params, q)
        elif Q is not None:
            self.Q = mats(Q)
            self._given = None  # the Mat is all that is needed from here on
        if term.p_ref is None:
            self.p_ref = None
        else:
            self.p_ref = _vec_local(comm, params, np.broadcast_to(np.asarray(term.p_ref, dtype=np.float64), (n_mine,)))

    def matrix(self) -> PETSc.Mat:
        """Q as a distributed Mat (a diagonal one for weights or the identity; shared, do not change it)."""
        return self.Q if self.Q is not None else self._mats(self._given)

    def _apply(self, v, out) -> None:
        if self.Q is not None:
            self.Q.mult(v, out)
        elif self.q is not None:
            out.pointwiseMult(v, self.q)
        else:
            v.copy(out)

    def _d(self, p):
        d = p.copy()
        if self.p_ref is not None:
            d.axpy(-1.0, self.p_ref)
        return d

    def value(self, p) -> float:
        d = self._d(p)
        Qd = d.duplicate()
        self._apply(d, Qd)
        return 0.5 * self.c * d.dot(Qd)

    def add_grad_p(self, p, out) -> None:
        d = self._d(p)
        Qd = d.duplicate()
        self._apply(d, Qd)
        out.axpy(self.c, Qd)

    def add_hess_pp(self, dp, out) -> None:
        Qd = dp.duplicate()
        self._apply(dp, Qd)
        out.axpy(self.c, Qd)


@dataclass
class _State:
    p: np.ndarray  # this rank's part of p (the cache key)
    rho: np.ndarray  # this rank's elements' rho
    u: PETSc.Vec
    u_ghost: np.ndarray
    lam: PETSc.Vec | None = None
    lam_ghost: np.ndarray | None = None
    lam_tol: float = np.inf


class _SolverInfo:
    """What the CLI and the drivers read of a serial solver: a name and counters."""

    def __init__(self, name: str, stats: SolverStats):
        self.name, self.stats = name, stats


class DistributedReducedFunctional:
    """J(p) = f(u(p), p) subject to A(p) u = b, distributed over the ranks of ``comm`` with PETSc.

    Parameters
    ----------
    matrix
        An :class:`~adjopt.ElementCoefficientMatrix` (A(rho) = A0 + sum_e phi(rho_e) K_e),
        the same on every rank.
    rhs
        The constant right-hand side b, shape (n,).
    objective
        A sum of scaled terms of the kinds listed in :data:`SUPPORTED_TERMS`.
    parameter_map
        ``None`` (p = rho, one parameter per element) or a linear map with a
        sparse matrix ``L`` (rho = L p: :class:`~adjopt.maps.NodalToElement`,
        :class:`~adjopt.maps.DensityFilter`).
    comm
        An mpi4py communicator; default ``MPI.COMM_WORLD``.
    partition, coordinates, parts
        How the elements are split (see
        :func:`~adjopt.backends.partition.partition_elements`): ``"block"``
        (default, contiguous element ranges), ``"slab"`` (equal-count slabs
        across the longest extent of ``coordinates``, the element centres),
        ``"graph"`` (METIS through pymetis on the element graph, for
        unstructured meshes), or an explicit array ``parts`` (one rank per element).
    ksp_type, pc_type
        The Krylov method (default ``"cg"`` when A is symmetric, else
        ``"gmres"``) and preconditioner (default ``"gamg"``; ``"hypre"`` or
        ``"lu"`` with ``pc_factor_mat_solver_type`` mumps where the PETSc build
        has them). GAMG on a symmetric A smooths with symmetric SOR
        (:data:`GAMG_DEFAULTS`); on a nonsymmetric A with PETSc's defaults
        (Chebyshev/Jacobi, which apply transposed).
        PETSc options with the prefix ``adjopt_`` (in ``PETSC_OPTIONS`` or
        ``petsc4py.PETSc.Options()``) override all of these
        (``-adjopt_ksp_type``, ``-adjopt_pc_type``, ``-adjopt_ksp_monitor``).
    rtol, max_it
        Relative tolerance of every solve (in the unpreconditioned residual
        norm) and the iteration limit; a solve that stops short raises
        :class:`~adjopt.errors.SolverDidNotConverge` on every rank.
    self_adjoint
        As in the serial functional: ``None`` detects f = b^T u with A
        symmetric, when lam = u and dl = du (no adjoint solves).
    near_nullspace
        Optional (n, k) near-nullspace of A in the serial dof order, for the
        algebraic multigrid (``MatSetNearNullSpace``): the rigid body modes of
        elasticity (:func:`adjopt.fem.rigid_body_modes`), which
        :func:`distribute` passes for vector problems. Orthonormalized here.
    warm_start
        Start the forward and adjoint solves from the previous p's solution
        (when it is better than zero): consecutive iterates of an optimizer
        are close. The stopping test stays relative to |b|, so the accuracy
        is unchanged, but J(p) then depends on the history at the level of
        ``rtol``: a line search near the optimum can stall on that (TAO's
        Newton line search did), so it is off by default. 40 OC iterations on
        the 192x64 MBB beam took 13% fewer CG iterations with it.

    Notes
    -----
    A symmetric A (``matrix.symmetric``) solves its adjoint equations with
    ``KSPSolve`` (A^T = A); otherwise with ``KSPSolveTranspose`` on the same
    KSP and preconditioner. Every setup, solve and Krylov iteration is counted
    in :attr:`stats` by kind, as in the serial solvers; :attr:`times` holds
    the phase seconds (filter, assembly, factorize = preconditioner setup,
    solve, sensitivity).

    Memory: each call starts with a collective ``PETSc.garbage_cleanup`` (petsc4py
    queues the parallel objects Python drops until one), GAMG frees the
    intermediate data of its Galerkin products as it makes them (unless
    ``-adjopt_pc_gamg_reuse_interpolation`` is set), and building one fixes
    glibc's mmap threshold so that freed arrays return to the system
    (:mod:`adjopt._memory`; ``ADJOPT_MALLOC=keep`` leaves it alone).
    """

    def __init__(self, matrix, rhs, objective, parameter_map=None, *, comm=None, partition: str = "block",
                 coordinates=None, parts=None, ksp_type: str | None = None, pc_type: str = "gamg",
                 rtol: float = 1e-10, max_it: int = 10000, self_adjoint: bool | None = None, near_nullspace=None,
                 warm_start: bool = False):
        comm = MPI.COMM_WORLD if comm is None else comm
        same_options(comm, "DistributedReducedFunctional", partition=partition, coordinates=coordinates, parts=parts,
                     ksp_type=ksp_type, pc_type=pc_type, rtol=rtol, max_it=max_it, self_adjoint=self_adjoint,
                     near_nullspace=near_nullspace, warm_start=warm_start)
        # every rank holds the whole serial problem here: the same one (a rank built with another size crashed
        # in the exchanges below, one with another seed gave a J that is neither's)
        digests = comm.allgather(content_digest(matrix, rhs, objective, parameter_map))
        agree(comm, len(set(digests)) == 1, "the ranks hold different serial problems (the arrays or sizes of the "
              f"matrix, right-hand side, objective or parameter map differ: digests {digests}); build the same "
              "problem on every rank (the same options and seed) before distributing it")
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        _share_cores(comm)
        _return_freed_memory(comm)
        if isinstance(matrix, ParametricResidual):
            raise NotImplementedError(
                "the PETSc backend distributes linear state equations A(p) u = b(p); a nonlinear residual R(u, p) "
                "(NonlinearReducedFunctional) runs with the serial functional: drop --backend petsc")
        if not isinstance(matrix, ElementCoefficientMatrix):
            raise TypeError(f"the PETSc backend distributes an ElementCoefficientMatrix (A = A0 + sum_e phi(rho_e) K_e), "
                            f"got {type(matrix).__name__}; run other ParametricMatrix kinds with the serial functional")
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an Objective, got {type(objective).__name__}")
        _check_solver_options(rtol, max_it)
        n = matrix.shape[0]
        b = as_vector(rhs)
        if b.depends_on_p:
            raise NotImplementedError("the PETSc backend takes a constant right-hand side b; b(p) runs serially")
        b = np.asarray(b.value(None), dtype=np.float64)
        if b.shape != (n,):
            raise ShapeError(f"the PETSc backend takes one right-hand side of shape ({n},), got {b.shape}")
        L = None
        if parameter_map is not None:
            L = getattr(parameter_map, "L", None)
            if L is None:
                raise NotImplementedError(f"the PETSc backend takes a linear parameter map with a sparse matrix L "
                                          f"(NodalToElement, DensityFilter), got {parameter_map!r}")
            if L.shape[0] != matrix.n_params:
                raise PatternError(f"the parameter map produces {L.shape[0]} values but A(rho) takes {matrix.n_params}")
        self.matrix, self.objective, self.map = matrix, objective, parameter_map
        self.n_params = matrix.n_params if L is None else int(L.shape[1])

        # -- the layout: the same on every rank (computed from the same replicated inputs) --
        part = partition_elements(matrix.n_params, self.size, partition, coordinates, parts, conn=matrix.conn)
        lay = make_layout(matrix.conn, n, part, self.size, L)
        if L is None:
            # one parameter per element: the parameter and element numberings coincide
            lay.params = lay.elements
        rank = self.rank
        mine = lay.dofs.owned(rank)

        # -- this rank's part of the problem, in the layout's numbering --
        own = lay.elements.owned(rank)
        conn = matrix.conn[own].astype(np.int64)
        conn = np.where(conn >= 0, lay.dofs.perm[np.maximum(conn, 0)], -1)
        k = matrix.k
        local = matrix.local.reshape(-1, k, k)
        local = local[0] if local.shape[0] == 1 and matrix._estride == 0 else local[own]
        a0 = None
        if matrix._base.size:
            A0 = sp.csr_array((matrix._base, matrix.indices, matrix.indptr), shape=matrix.shape)[mine].tocoo()
            a0 = (lay.dofs.ranges[rank] + A0.row, lay.dofs.perm[A0.col], A0.data)
        Z = None
        if near_nullspace is not None:
            Z = np.asarray(near_nullspace, dtype=np.float64)
            if Z.ndim != 2 or Z.shape[0] != n or not np.all(np.isfinite(Z)):
                raise ShapeError(f"near_nullspace must be a finite ({n}, k) array (one row per dof), got shape {Z.shape}")
            Z = Z[mine]
        system = LocalSystem(conn, local, matrix.coefficient, lay.dofs.local_size(rank), b[mine],
                             _local_terms(objective, comm, lay, n, self.n_params),
                             None if L is None else _local_rows(L, own, lay.params),
                             None if L is None else lay.params.local_size(rank), Z)
        self._build(system, lay, a0, ksp_type=ksp_type, pc_type=pc_type, rtol=rtol, max_it=max_it,
                    self_adjoint=self_adjoint, warm_start=warm_start)

    @classmethod
    def from_parts(cls, system: LocalSystem, *, comm=None, ksp_type: str | None = None, pc_type: str = "gamg",
                   rtol: float = 1e-10, max_it: int = 10000, self_adjoint: bool | None = None,
                   warm_start: bool = False) -> DistributedReducedFunctional:
        """The functional from every rank's own part (a rank-local build; collective).

        ``system`` is this rank's :class:`~adjopt.backends.petsc.parts.LocalSystem`:
        its elements, owned dofs and parameters, and its part of the objective,
        numbered so that the ranks own contiguous ranges in rank order (see
        :mod:`adjopt.backends.petsc.parts`). No rank holds anything of global
        length; :meth:`to_numpy`, :meth:`state` and the serial interface
        gather on demand. The solver options are those of the constructor.
        """
        comm = MPI.COMM_WORLD if comm is None else comm
        same_options(comm, "DistributedReducedFunctional.from_parts", ksp_type=ksp_type, pc_type=pc_type, rtol=rtol,
                     max_it=max_it, self_adjoint=self_adjoint, warm_start=warm_start)
        agree(comm, isinstance(system, LocalSystem), f"system must be a LocalSystem, got {type(system).__name__}",
              TypeError)
        self = cls.__new__(cls)
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        _share_cores(comm)
        _return_freed_memory(comm)
        _check_solver_options(rtol, max_it)
        agree(comm, system.conn.shape[0] > 0, "this rank's LocalSystem has no elements: give every rank at least one "
              "(use fewer ranks than element layers)", PatternError)
        # the same kinds of pieces on every rank, and this rank's pieces of the right sizes: checked here, where a
        # rank can still stop every rank, before the collective construction (where it would leave them waiting)
        kinds = [(type(t).__name__, getattr(t, "B", None) is not None, getattr(t, "w", None) is not None,
                  type(getattr(t, "Q", None)).__name__ if isinstance(t, LocalQuadratic) else None) for t in system.terms]
        kinds.append(("parameter_matrix", system.parameter_matrix is not None, system.near_nullspace is not None,
                      tuple(sorted(system.gram)), system.rhs_matrix is not None))
        got = comm.allgather(kinds)
        agree(comm, all(k == got[0] for k in got), "the ranks' LocalSystems differ in their terms or optional pieces "
              f"(rank 0: {got[0]}; this rank: {kinds}): every rank gives the same kinds, each with its own part",
              ValueError)
        elements = _ranges(comm, system.conn.shape[0])
        params = elements if system.parameter_matrix is None else _ranges(comm, system.n_owned_params)
        lay = Layout(comm.size, None, elements, _ranges(comm, system.n_owned_dofs), params)
        top = int(system.conn.max(initial=-1))
        agree(comm, top < lay.dofs.size, f"conn names dof {top}, but the ranks own {lay.dofs.size} dofs in all",
              PatternError)
        if system.parameter_matrix is not None:
            agree(comm, system.parameter_matrix.shape[1] == params.size,
                  f"parameter_matrix has {system.parameter_matrix.shape[1]} columns but the ranks own {params.size} "
                  "parameters in all (n_owned_params summed): one column per global parameter", PatternError)
        if system.rhs_matrix is not None:
            agree(comm, system.rhs_matrix.shape[1] == params.size,
                  f"rhs_matrix has {system.rhs_matrix.shape[1]} columns but the ranks own {params.size} parameters in "
                  "all: one column per global parameter", PatternError)
        ok, message, kind = _local_problems(system, lay, comm.rank)
        raise_first(comm, None if ok else kind(message))
        self.matrix = self.objective = self.map = None
        self.n_params = params.size
        self._build(system, lay, None, ksp_type=ksp_type, pc_type=pc_type, rtol=rtol, max_it=max_it,
                    self_adjoint=self_adjoint, warm_start=warm_start)
        return self

    def _build(self, system: LocalSystem, lay: Layout, a0, *, ksp_type, pc_type, rtol, max_it, self_adjoint,
               warm_start) -> None:
        """Everything from this rank's part: A's pattern, the vectors, the scatter, the terms, the KSP."""
        comm, rank = self.comm, self.rank
        self.layout = lay

        # -- this rank's elements as a serial operator on its local (owned + ghost) dofs --
        conn = system.conn
        self._ghosts = np.unique(conn[conn >= 0])
        conn_loc = np.where(conn >= 0, np.searchsorted(self._ghosts, np.maximum(conn, 0)), -1)
        error = None
        try:
            self._ecm = ElementCoefficientMatrix(conn_loc, system.local, system.coefficient, n=self._ghosts.size)
        except Exception as exc:  # this rank's element matrices or coefficient: every rank stops with the reason
            error = exc
        raise_first(comm, error)
        self.symmetric = bool(comm.allreduce(bool(self._ecm.symmetric), op=MPI.LAND))

        # -- A(p): COO pattern of this rank's element entries (+ its rows of A0), preallocated once --
        ecm = self._ecm
        rows = self._ghosts[np.repeat(np.arange(ecm.shape[0]), np.diff(ecm.indptr))]
        cols = self._ghosts[ecm.indices]
        self._a0 = np.zeros(0)
        if a0 is not None:
            rows, cols = np.concatenate([rows, a0[0]]), np.concatenate([cols, a0[1]])
            self._a0 = a0[2]
        nloc, N = lay.dofs.local_size(rank), lay.dofs.size
        A = PETSc.Mat().create(comm=comm)
        A.setSizes(((nloc, N), (nloc, N)))
        A.setType(PETSc.Mat.Type.AIJ)
        A.setPreallocationCOO(rows.astype(_INT), cols.astype(_INT))
        del rows, cols
        if self.symmetric:
            A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        self.A = A
        self.b = _vec_local(comm, lay.dofs, system.rhs)
        # b(p) = b + R p (LocalSystem.rhs_matrix): R's rows as a Mat, and the Vec that _rhs makes b(p) in
        R = system.rhs_matrix
        self.R = None if R is None else _mat_rows(comm, R, lay.params, lay.dofs.size)
        self._bp = None if R is None else self.b.duplicate()
        if system.near_nullspace is not None:
            k = comm.allgather(system.near_nullspace.shape[1])
            agree(comm, len(set(k)) == 1, f"near_nullspace has {k} columns on the ranks: the same on every rank", ShapeError)
            Q = _orthonormal(comm, system.near_nullspace)
            A.setNearNullSpace(PETSc.NullSpace().create(vectors=[_vec_local(comm, lay.dofs, q) for q in Q.T], comm=comm))

        # -- the ghost scatter (global state -> this rank's element dofs), built once --
        self._wloc = PETSc.Vec().createSeq(self._ghosts.size, comm=PETSc.COMM_SELF)
        gis = PETSc.IS().createGeneral(self._ghosts.astype(_INT), comm=PETSc.COMM_SELF)
        self._scatter = PETSc.Scatter().create(self.b, gis, self._wloc, None)

        # -- parameter map, objective terms --
        # the parameters' matrices as PETSc Mats, one per distinct scipy object (terms and Gram matrices share)
        mats = _Mats(comm, lay.params)
        #: the parameter space's Gram matrices (LocalSystem.gram) as distributed Mats
        self._gram = {name: mats(G) for name, G in (system.gram or {}).items()}
        self.grams = tuple(sorted(self._gram))
        Lr = system.parameter_matrix
        self.L = None if Lr is None else _mat_rows(comm, Lr, lay.params, lay.elements.size)
        self._rho = _vec(comm, lay.elements, rank)
        self._state_terms, self._param_terms = [], []
        for term in system.terms:
            if isinstance(term, LocalQuadratic):
                self._param_terms.append(_ParameterTerm(term, comm, lay.params, mats))
            else:
                self._state_terms.append((term, _StateTerm(term, comm, lay.dofs)))
        mats.release()
        single = len(self._state_terms) == 1 and not self._param_terms
        mine = single and isinstance(self._state_terms[0][0], LocalCompliance)
        mine = mine and self.R is None and np.array_equal(self._state_terms[0][0].load, system.rhs)
        detected = self.symmetric and bool(comm.allreduce(bool(mine), op=MPI.LAND))
        if self_adjoint is True and not detected:
            raise ValueError("self_adjoint=True needs f = b^T u (Compliance with the right-hand side) and a symmetric A")
        self.self_adjoint = detected if self_adjoint is None else bool(self_adjoint)

        # -- the Krylov solver --
        # symmetric A: GAMG smooths with symmetric SOR, not its default Chebyshev/Jacobi: on SIMP elasticity
        # (contrast 1e-9) the Chebyshev eigenvalue estimates made the preconditioner indefinite (CG stopped with
        # DIVERGED_INDEFINITE_PC). A nonsymmetric A keeps PETSc's defaults: SOR has no transpose application,
        # which KSPSolveTranspose needs.
        self._pc_defaults = dict(GAMG_DEFAULTS) if pc_type == "gamg" and self.symmetric else {}
        self._set_up = False
        self._broken: str | None = None  # why the KSP cannot be used again (a PETSc error inside a solve)
        for name, value, optional in (("ksp_type", ksp_type, True), ("pc_type", pc_type, False)):
            if not (isinstance(value, str) or (optional and value is None)):
                raise ValueError(f"{name} must be the name of a PETSc {name[:-5].upper()} type (a str), got {value!r}")
        ksp = PETSc.KSP().create(comm=comm)
        ksp.setOptionsPrefix("adjopt_")
        refused = None
        try:
            ksp.setType(ksp_type or ("cg" if self.symmetric else "gmres"))
            ksp.getPC().setType(pc_type)
            ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
            ksp.setTolerances(rtol=rtol, atol=0.0, max_it=max_it)
            ksp.setFromOptions()
        except PETSc.Error as exc:
            refused = _options_message(exc, ksp_type, pc_type)
        # an option may fail on one rank only (a monitor file that rank 0 cannot open): all ranks stop together,
        # and the half-configured KSP goes now (left to PETSc's finalization, it crashed the process at exit)
        try:
            agree(comm, refused is None, refused or "", PetscOptionsError)
        except PetscOptionsError:
            ksp.destroy()
            raise
        rtol = ksp.getTolerances()[0]  # -adjopt_ksp_rtol in PETSC_OPTIONS overrides the argument
        agree(comm, 0.0 < rtol < 1.0, f"-adjopt_ksp_rtol must be in (0, 1), got {rtol!r}", PetscOptionsError)
        # a preconditioner without a transposed application under a solve that applies it transposed fails inside
        # PETSc's solve, after which the process cannot go on (it crashes at the next call or at exit): refused here
        transposed = ksp.getType() in TRANSPOSED_PC_KSPS or not self.symmetric
        used = {ksp.getPC().getType(), PETSc.Options().getString("adjopt_mg_levels_pc_type", ""),
                PETSc.Options().getString("adjopt_sub_pc_type", "")}
        bad = sorted(t for t in used & NO_TRANSPOSE_PCS)
        agree(comm, not (transposed and bad),
              f"the preconditioner {' and '.join(map(repr, bad))} has no transposed application, which "
              + (f"ksp_type={ksp.getType()!r} needs" if ksp.getType() in TRANSPOSED_PC_KSPS else
                 "the adjoint and second-adjoint solves with A^T of a nonsymmetric A need")
              + ": use pc_type='gamg', 'jacobi' or 'bjacobi' (or ksp_type='cg'/'gmres')", PetscOptionsError)
        agree(comm, not (comm.size > 1 and "eisenstat" in used),
              "pc_type 'eisenstat' needs the matrix on one rank (PETSc has no Eisenstat for a distributed matrix): "
              "use pc_type='gamg', 'jacobi' or 'bjacobi'", PetscOptionsError)
        if ksp.getType() in TRANSPOSED_PC_KSPS:
            self._pc_defaults = {}  # GAMG's own smoothers (Chebyshev/Jacobi), which apply transposed, not SOR
        self.ksp, self.rtol = ksp, rtol
        self.stats = SolverStats()
        self.times = Counter()
        self.solver = _SolverInfo(f"petsc:{ksp.getType()}+{ksp.getPC().getType()}", self.stats)
        self._st: _State | None = None
        if not isinstance(warm_start, (bool, np.bool_)):
            raise ValueError(f"warm_start must be True or False, got {warm_start!r}")
        self.warm_start, self._last = bool(warm_start), {}
        logger.info("DistributedReducedFunctional on %d rank(s): %d elements, %d dofs, %d parameters; %s",
                    self.size, lay.elements.size, N, self.n_params, self.solver.name)

    # -- bookkeeping ----------------------------------------------------------------
    @classmethod
    def from_functional(cls, J, **options) -> DistributedReducedFunctional:
        """The distributed twin of a serial :class:`~adjopt.ReducedFunctional` (same matrix, rhs, objective, map)."""
        return cls(J.matrix, J.rhs, J.objective, J.map, **options)

    def reset_stats(self) -> None:
        """Zero the solver counters and the phase times."""
        self.stats.reset()
        self.times.clear()

    def set_misfit(self, d, w=None, which: int = 0) -> None:
        """Replace this rank's data ``d`` (and weights ``w``, if given) of the ``which``-th misfit term.

        For a rank-local build that computes its synthetic data with this
        functional (the state at the true parameters), then sets it: the
        operator, the preconditioner and a cached state stay valid.
        """
        misfits = [t for _, t in self._state_terms if t.linear is None]
        if not 0 <= which < len(misfits):
            raise IndexError(f"the objective has {len(misfits)} misfit term(s), asked for number {which}")
        t = misfits[which]
        n = t.d.getLocalSize()
        for name, v, target in (("d", d, t.d), ("w", w, t.w)):
            if v is None:
                continue
            if target is None:
                raise ValueError("this misfit has no weights to replace: build it with weights (w=) to set them")
            v = np.asarray(v, dtype=np.float64)
            agree(self.comm, v.shape == (n,), f"{name} must have this rank's {n} values, got shape {v.shape}", ShapeError)
            agree(self.comm, bool(np.all(np.isfinite(v))), f"{name} holds NaN or Inf", NonFiniteError)
            target.setArray(v)

    def create_parameter_vec(self) -> PETSc.Vec:
        """A zero parameter Vec in the distributed numbering."""
        return _vec(self.comm, self.layout.params, self.rank)

    def to_vec(self, p, name: str = "p") -> PETSc.Vec:
        """The full serial-order vector p (the same on every rank) as a distributed parameter Vec."""
        PETSc.garbage_cleanup(self.comm)  # the Vecs of earlier conversions (see _state)
        p = np.asarray(p, dtype=np.float64)
        shapes = self.comm.allgather(p.shape)
        if len(set(shapes)) > 1:
            raise ShapeError(f"{name} has shapes {shapes} on ranks 0 .. {self.size - 1}: every rank must pass the same "
                             f"full vector of length {self.n_params}")
        if shapes[0] != (self.n_params,):
            raise ShapeError(f"{name} must have length {self.n_params} (one value per parameter), got shape {shapes[0]}")
        if self.size > 1:
            agree(self.comm, bool(np.all(np.isfinite(p))), f"{name} holds NaN or Inf", NonFiniteError)
            _same_on_every_rank(self.comm, p, name)
        v = self.create_parameter_vec()
        v.setArray(p[self.layout.params.owned(self.rank)])
        return v

    def to_numpy(self, v: PETSc.Vec, numbering: Numbering | None = None) -> np.ndarray:
        """The full serial-order array of a distributed Vec, on every rank (one allgather)."""
        numbering = self.layout.params if numbering is None else numbering
        counts = np.diff(numbering.ranges)
        full = np.empty(numbering.size)
        self.comm.Allgatherv(np.ascontiguousarray(v.getArray(readonly=True)), [full, counts])
        out = np.empty(numbering.size)
        out[numbering.order] = full
        return out

    def _ghosted(self, v: PETSc.Vec) -> np.ndarray:
        self._scatter.scatter(v, self._wloc, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
        return self._wloc.getArray(readonly=True).copy()

    def _accumulate(self, values: np.ndarray, out: PETSc.Vec) -> PETSc.Vec:
        """out += the element contributions ``values`` (one per local dof), summed over ranks."""
        self._wloc.setArray(values)
        self._scatter.scatter(self._wloc, out, PETSc.InsertMode.ADD_VALUES, PETSc.ScatterMode.REVERSE)
        return out

    def _rtol(self, tol) -> float:
        """The relative tolerance of a solve: ``rtol`` unless the caller asks for another (inexact Newton)."""
        if tol is None:
            return self.rtol
        tol = float(tol)
        if not 0.0 < tol < 1.0:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        return tol

    def _solve(self, rhs: PETSc.Vec, kind: str, transpose: bool = False, tol: float | None = None) -> PETSc.Vec:
        if self._broken is not None:
            raise SolverDidNotConverge(f"an earlier solve of this functional failed inside PETSc ({self._broken}); "
                                       "build it again with other solver options")
        x = rhs.duplicate()
        last = self._last.get(kind) if self.warm_start else None
        if last is not None:
            # the previous p's solution (consecutive iterates are close), unless it is worse than zero:
            # |b - A x0| >= |b| after a far jump (a rejected line-search trial) would even trip KSP's divergence test
            if not self._residual_norm(last, rhs, transpose) < rhs.norm():  # also when NaN
                last = None
        if last is not None:
            last.copy(x)
        else:
            x.set(0.0)
        self.ksp.setInitialGuessNonzero(last is not None)
        rtol = self._rtol(tol)
        self.ksp.setTolerances(rtol=rtol)
        t0 = time.perf_counter()
        failed = None
        try:
            if transpose and not self.symmetric:
                self.ksp.solveTranspose(rhs, x)
            else:
                self.ksp.solve(rhs, x)
        except PETSc.Error as exc:  # an option PETSc accepted but cannot apply (SOR transposed, say)
            failed = self._solve_error(exc, kind)
        try:
            agree(self.comm, failed is None, failed or "", SolverDidNotConverge)
        except SolverDidNotConverge as exc:
            self._last.pop(kind, None)
            # PETSc left this KSP half-way through a solve, where another call on it crashes the process: it is
            # not touched again; every later solve of this functional raises this error
            self._broken = str(exc)
            raise
        dt = time.perf_counter() - t0
        reason, its = self.ksp.getConvergedReason(), self.ksp.getIterationNumber()
        s = self.stats
        s.solves[kind] += 1
        s.rhs[kind] += 1
        s.iterations[kind] += its
        s.solve_time[kind] += dt
        self.times["solve"] += dt
        if reason < 0:
            self._last.pop(kind, None)
            name = _REASONS.get(reason, reason)
            # a residual that grows, a breakdown or an indefinite matrix: most often a singular A (a body free to
            # move, a region without Dirichlet condition), which no iteration limit cures
            singular = name in ("DIVERGED_DTOL", "DIVERGED_BREAKDOWN", "DIVERGED_INDEFINITE_MAT", "DIVERGED_NANORINF")
            if name == "DIVERGED_PCSETUP_FAILED":
                # no iteration was made: more iterations or a looser tolerance cannot help
                advice = (f"The preconditioner could not be built at this p ({_pc_failure(self.ksp.getPC())}): a zero "
                          "pivot in a factorization or in a smoother's diagonal block, where A(p) is singular or "
                          "nearly so (a part of the domain without a Dirichlet condition, a coefficient that "
                          "vanishes) or the preconditioner does not suit A. Check the boundary conditions; else pick "
                          "another preconditioner")
            elif name == "DIVERGED_INDEFINITE_PC":
                advice = ("The preconditioner is not symmetric positive definite, which CG (and ksp_type 'cr' or "
                          "'minres') needs: use a symmetric one (gamg, jacobi, bjacobi with icc) or ksp_type='gmres'")
            elif singular:
                advice = ("Is A(p) singular (a part of the domain without a Dirichlet condition, a rigid body mode "
                          "left free)? Check the boundary conditions; else pick another preconditioner")
            else:
                advice = "Raise max_it, loosen rtol or pick another preconditioner"
            raise SolverDidNotConverge(
                f"the {kind} solve ({self.solver.name}) did not converge: {name} after {its} "
                f"iterations at relative tolerance {rtol:g}. {advice} "
                "(pc_type=, or PETSC_OPTIONS='-adjopt_pc_type ...')"
            )
        self._check_residual(x, rhs, kind, transpose, rtol, _REASONS.get(reason, reason), its)
        if self.warm_start and kind in WARM_KINDS:
            self._last[kind] = x
        return x

    # -- the state at p, cached for the last p ------------------------------------------
    def _state(self, p: PETSc.Vec) -> _State:
        # petsc4py defers the destruction of parallel objects that Python drops (the temporaries of the last calls)
        # to a collective cleanup: without one the memory of every rank grows with each call
        PETSc.garbage_cleanup(self.comm)
        if p.getSize() != self.n_params:
            raise ShapeError(f"p must be a Vec of global size {self.n_params}, got {p.getSize()}")
        mine = p.getArray(readonly=True)
        agree(self.comm, bool(np.all(np.isfinite(mine))), "p holds NaN or Inf", NonFiniteError)
        st = self._st
        hit = st is not None and st.p.shape == mine.shape and np.array_equal(st.p, mine)
        if self.comm.allreduce(hit, op=MPI.LAND):
            return st
        self._st = None  # A is about to change: the cached state no longer belongs to it
        clock, times = time.perf_counter, self.times
        t0 = clock()
        if self.L is None:
            p.copy(self._rho)
        else:
            self.L.mult(p, self._rho)
        rho = self._rho.getArray(readonly=True).copy()
        t1 = clock()
        vals = self._ecm.values(rho)
        if self._a0.size:
            vals = np.concatenate([vals, self._a0])
        self.A.setValuesCOO(vals, PETSc.InsertMode.INSERT_VALUES)
        self.A.assemble()
        self._check_matrix(vals)
        t2 = clock()
        self.ksp.setOperators(self.A)
        self._setup()
        t3 = clock()
        self.stats.factorizations += 1
        self.stats.factorization_time += t3 - t2
        times["filter"] += t1 - t0
        times["assembly"] += t2 - t1
        times["factorize"] += t3 - t2
        u = self._solve(self._rhs(p, self._bp), "forward")
        self._st = st = _State(p=mine.copy(), rho=rho, u=u, u_ghost=self._ghosted(u))
        return st

    def _residual_norm(self, x, rhs, transpose: bool) -> float:
        """|rhs - A x| (A^T for a transposed solve of a nonsymmetric A): one product with A."""
        r = rhs.duplicate()
        (self.A.multTranspose if transpose and not self.symmetric else self.A.mult)(x, r)
        r.aypx(-1.0, rhs)
        out = r.norm()
        r.destroy()
        return out

    def _check_residual(self, x, rhs, kind, transpose, rtol, reason, its) -> None:
        """|b - A x| <= RESIDUAL_SLACK rtol |b| after a solve that says it converged: a stopping test other than
        the relative residual (ksp_type preonly applies the preconditioner once; -adjopt_ksp_atol stops at an
        absolute residual) would otherwise hand back a solution that is not one. One product with A."""
        res, scale = self._residual_norm(x, rhs, transpose), rhs.norm()
        if scale == 0.0 or res <= RESIDUAL_SLACK * rtol * scale:
            return
        self._last.pop(kind, None)
        rel = res / scale
        ksp_type = self.ksp.getType()
        why = ("ksp_type='preonly' applies the preconditioner once, which solves A x = b only when it is an exact "
               "factorization" if ksp_type == "preonly" else
               f"its stopping test is not the relative residual (atol {self.ksp.getTolerances()[1]:g}, "
               "-adjopt_ksp_atol, -adjopt_ksp_norm_type or a convergence test set in PETSC_OPTIONS?)")
        raise SolverDidNotConverge(
            f"the {kind} solve ({self.solver.name}) stopped with {reason} after {its} iterations but left a relative "
            f"residual |b - A x| / |b| = {rel:.2g}, above its tolerance {rtol:g}: {why}. Use a Krylov method "
            "(ksp_type='cg' for a symmetric A, 'gmres' otherwise) and leave the stopping test to rtol")

    def _solve_error(self, exc, kind: str) -> str:
        """The message for a PETSc error raised inside a solve (options PETSc accepted but cannot apply)."""
        said = _petsc_message(exc)
        hint = ("a preconditioner without a transposed application under a solve that applies it transposed: use "
                "ksp_type='cg' or 'gmres', pc_type='gamg' with -adjopt_mg_levels_pc_type jacobi, or "
                "pc_type='jacobi'/'bjacobi'" if exc.ierr == _ERR_SUPPORT and "transpose" in said.lower() else
                "PETSc does not support this combination of solver, preconditioner and matrix: pick another "
                "preconditioner (pc_type='gamg', 'bjacobi' or 'jacobi')" if exc.ierr == _ERR_SUPPORT else
                "check the PETSc options (PETSC_OPTIONS, -adjopt_...) or pick another preconditioner")
        return (f"the {kind} solve ({self.solver.name}) failed with PETSc error {exc.ierr} ({said}): {hint}")

    def _setup(self) -> None:
        """KSPSetUp; the first one (which creates the multigrid smoothers from the options) with this
        functional's preconditioner defaults in the options database, wherever the user has not set them."""
        added = []
        opts = PETSc.Options()
        if not self._set_up and self._pc_defaults:
            added = ["adjopt_" + k for k in self._pc_defaults if not opts.hasName("adjopt_" + k)]
            for k in added:
                opts[k] = self._pc_defaults[k[len("adjopt_"):]]
        # GAMG keeps the intermediate products of every Galerkin product P^T A P for a numeric redo that it does
        # not do (each new A gets a fresh hierarchy): free them as they are made (0.2 GiB per rank at 1M dofs on
        # 2 ranks), unless the user reuses the interpolation (whose redo needs them) or decides it
        clear = (self.ksp.getPC().getType() == "gamg" and not opts.hasName("mat_product_clear")
                 and not opts.getBool("adjopt_pc_gamg_reuse_interpolation", False))
        if clear:  # read while the products are made, in this setup: no prefix reaches them
            opts["mat_product_clear"] = None
            added.append("mat_product_clear")
        try:
            self.ksp.setUp()
            self._set_up = True
        except PETSc.Error as exc:
            self.ksp.reset()  # the half-made preconditioner goes; the next p sets it up afresh
            self._set_up = False
            pc_type = self.ksp.getPC().getType()
            if exc.ierr == _ERR_MISSING_FACTOR:
                where = ("PETSc's own LU, Cholesky, ILU and ICC factor a matrix on one rank only; on "
                         f"{self.comm.size} ranks they need an external package such as MUMPS or SuperLU_dist, which "
                         "PETSc builds when configured with --download-mumps or --download-superlu_dist"
                         if self.comm.size > 1 else "the package asked for is not in this PETSc")
                raise SolverDidNotConverge(
                    f"the solver setup ({self.solver.name}) failed: this PETSc cannot make a factorization that "
                    f"pc_type={pc_type!r} or a preconditioner inside it (-adjopt_sub_pc_type, -adjopt_mg_levels_pc_type, "
                    f"-adjopt_pc_factor_mat_solver_type) asks for ({_petsc_message(exc)}; {where}). Use "
                    "pc_type='gamg' (the default) or 'bjacobi' (a factorization of each rank's block)") from exc
            raise SolverDidNotConverge(
                f"the solver setup ({self.solver.name}) failed with PETSc error {exc.ierr} (its message is above); "
                "check the PETSc options (PETSC_OPTIONS, -adjopt_...) or pick another preconditioner") from exc
        finally:
            for k in added:
                opts.delValue(k)

    def _check_matrix(self, vals: np.ndarray) -> None:
        """NaN/Inf entries or a zero diagonal stop every rank here, before a solve (where PETSc would
        raise on one rank only and leave the others waiting)."""
        agree(self.comm, bool(np.all(np.isfinite(vals))),
              "A(p) has NaN or Inf entries at this p (the coefficient overflowed: is p far outside its range?)",
              NonFiniteError)
        diag = self.A.getDiagonal().getArray(readonly=True)
        zero = np.flatnonzero(diag == 0)
        agree(self.comm, zero.size == 0,
              f"A(p) is singular: {zero.size} zero(s) on its diagonal (first at global row "
              f"{int(self.layout.dofs.ranges[self.rank] + zero[0]) if zero.size else -1}); a dof without a Dirichlet "
              "condition and without stiffness (coefficient 0 or underflowed)?", SingularMatrixError)

    def _adjoint(self, st: _State, tol: float | None = None) -> PETSc.Vec:
        """lam, solved again only when ``tol`` asks for more accuracy than the cached one has."""
        if st.lam is None and self.self_adjoint:
            st.lam, st.lam_ghost, st.lam_tol = st.u, st.u_ghost, self.rtol
        want = self._rtol(tol)
        if st.lam is None or want < st.lam_tol:
            rhs = st.u.duplicate()
            rhs.set(0.0)
            for _, t in self._state_terms:
                t.add_grad_u(st.u, rhs)
            st.lam = self._solve(rhs, "adjoint", transpose=True, tol=want)
            st.lam_ghost, st.lam_tol = self._ghosted(st.lam), want
        return st.lam

    def inner_product(self, spec: str):
        """The parameter space's inner product ``spec`` from the Gram matrices this rank was built with.

        ``"l2"`` (the mass), ``"l2-lumped"`` (its row sums), ``"h1"``
        (stiffness + mass) or ``"euclidean"``: an
        :class:`~adjopt.optimize.InnerProduct` on full parameter vectors
        (the serial interface) whose matrix stays distributed; its Riesz map
        is a CG solve (GAMG for ``"h1"``, Jacobi for the mass) to 1e-12.
        What :func:`adjopt.optimize.make_inner_product` uses for a problem
        without ``Problem(mass=)`` whose functional has Gram matrices.
        """
        if not isinstance(spec, str) or spec.lower() not in INNER_PRODUCTS:
            raise ValueError(f"unknown inner product {spec!r}; use one of {INNER_PRODUCTS}")
        spec = spec.lower()
        if spec == "euclidean":
            return Euclidean(self.n_params)
        need = ("mass", "stiffness") if spec == "h1" else ("mass",)
        missing = [k for k in need if k not in self._gram]
        agree(self.comm, not missing, f"inner product {spec!r} needs the Gram matrices {need}; this functional was "
              f"built with {self.grams or 'none'} (LocalSystem(gram=...))", ValueError)
        return _DistributedGram(self, spec)

    def blocks(self) -> BlockFunctional:
        """This functional on this rank's block of p (the parameters never replicated): see :class:`BlockFunctional`."""
        return BlockFunctional(self)

    def regularization_hessian(self) -> PETSc.Mat | None:
        """f_pp, the Hessian of the objective's quadratic parameter terms (sum c M), as a distributed Mat.

        ``None`` when the objective has no such term. Newton methods use it
        as the preconditioner of their Hessian solves (it is the Hessian of
        the regularization, which dominates the reduced Hessian's high
        frequencies).
        """
        if not self._param_terms:
            return None
        H = None
        for t in self._param_terms:
            if H is None:
                H = t.matrix().copy()
                H.scale(t.c)
            else:
                H.axpy(t.c, t.matrix(), structure=PETSc.Mat.Structure.DIFFERENT_NONZERO_PATTERN)
        return H

    def _to_parameters(self, h_rho: np.ndarray, out: PETSc.Vec) -> None:
        """out = L^T h_rho (h_rho: this rank's element values)."""
        self._rho.setArray(h_rho)
        if self.L is None:
            self._rho.copy(out)
        else:
            self.L.multTranspose(self._rho, out)

    # -- the Vec interface ------------------------------------------------------------------
    def value_vec(self, p: PETSc.Vec) -> float:
        """J(p) for a distributed parameter Vec (collective)."""
        st = self._state(p)
        t0 = time.perf_counter()
        J = sum(t.value(st.u) for _, t in self._state_terms) + sum(t.value(p) for t in self._param_terms)
        self.times["sensitivity"] += time.perf_counter() - t0
        return float(J)

    def gradient_vec(self, p: PETSc.Vec, out: PETSc.Vec | None = None, tol: float | None = None) -> PETSc.Vec:
        """grad J(p) into ``out`` (a new Vec when None), collective; ``tol``: the adjoint solve's relative tolerance."""
        st = self._state(p)
        self._adjoint(st, tol)
        out = self.create_parameter_vec() if out is None else out
        t0 = time.perf_counter()
        q = -self._ecm.contract(st.rho, st.lam_ghost, st.u_ghost)
        self._to_parameters(q, out)
        if self.R is not None:  # + R^T lam
            self.R.multTransposeAdd(st.lam, out, out)
        for t in self._param_terms:
            t.add_grad_p(p, out)
        self.times["sensitivity"] += time.perf_counter() - t0
        return out

    def hessp_vec(self, p: PETSc.Vec, dp: PETSc.Vec, out: PETSc.Vec | None = None,
                  tol: float | None = None) -> PETSc.Vec:
        """H(p) dp into ``out`` by a tangent and a second-adjoint solve, collective.

        ``tol`` is the relative tolerance of those two solves, as an inexact
        Newton method chooses it (``None``: ``rtol``); lam keeps ``rtol``.
        """
        st = self._state(p)
        self._adjoint(st)
        if dp.getSize() != self.n_params:
            raise ShapeError(f"dp must be a Vec of global size {self.n_params}, got {dp.getSize()}")
        agree(self.comm, bool(np.all(np.isfinite(dp.getArray(readonly=True)))), "dp holds NaN or Inf", NonFiniteError)
        clock = time.perf_counter
        t_start, solve0 = clock(), self.times["solve"]
        ecm, rho = self._ecm, st.rho
        if self.L is None:
            dp.copy(self._rho)
        else:
            self.L.mult(dp, self._rho)
        drho = self._rho.getArray(readonly=True).copy()
        rhs = st.u.duplicate()
        rhs.set(0.0)
        self._accumulate(-ecm.tangent(rho, drho, st.u_ghost), rhs)
        if self.R is not None:  # + R dp
            self.R.multAdd(dp, rhs, rhs)
        du = self._solve(rhs, "tangent", tol=tol)
        du_ghost = self._ghosted(du)
        dl = du
        if self.self_adjoint:
            dl_ghost = du_ghost
        else:
            rhs.set(0.0)
            for _, t in self._state_terms:
                t.add_hess_uu(du, rhs)
            self._accumulate(-ecm.tangent_transpose(rho, drho, st.lam_ghost), rhs)
            dl = self._solve(rhs, "second_adjoint", transpose=True, tol=tol)
            dl_ghost = self._ghosted(dl)
        h = -ecm.contract(rho, dl_ghost, st.u_ghost) - ecm.contract(rho, st.lam_ghost, du_ghost)
        if not ecm.affine:
            h -= ecm.second(rho, st.lam_ghost, st.u_ghost, drho)
        out = self.create_parameter_vec() if out is None else out
        self._to_parameters(h, out)
        if self.R is not None:  # + R^T dl
            self.R.multTransposeAdd(dl, out, out)
        for t in self._param_terms:
            t.add_hess_pp(dp, out)
        self.times["sensitivity"] += clock() - t_start - (self.times["solve"] - solve0)
        return out

    # -- the serial (numpy, replicated) interface -----------------------------------------
    def value(self, p) -> float:
        """J(p) for the full parameter vector p (serial order, the same on every rank)."""
        return self.value_vec(self.to_vec(p))

    def gradient(self, p, tol: float | None = None) -> np.ndarray:
        """grad J(p) as a full array on every rank; ``tol``: the adjoint solve's relative tolerance (default ``rtol``)."""
        return self.to_numpy(self.gradient_vec(self.to_vec(p), tol=tol))

    def value_and_gradient(self, p, tol: float | None = None):
        v = self.to_vec(p)
        return self.value_vec(v), self.to_numpy(self.gradient_vec(v, tol=tol))

    def hessp(self, p, dp, tol: float | None = None, gauss_newton: bool = False) -> np.ndarray:
        """H(p) dp as a full array on every rank; ``tol``: the tangent and second-adjoint solves' tolerance."""
        if gauss_newton:
            raise NotImplementedError("the PETSc backend computes the full Hessian action; gauss_newton runs serially")
        return self.to_numpy(self.hessp_vec(self.to_vec(p), self.to_vec(dp, "dp"), tol=tol))

    def _rhs(self, p: PETSc.Vec, out: PETSc.Vec | None) -> PETSc.Vec:
        """b(p): b itself, or b + R p into ``out`` with a ``rhs_matrix`` R."""
        if self.R is None:
            return self.b
        self.R.mult(p, out)
        out.axpy(1.0, self.b)
        return out

    def value_error(self, p) -> float:
        """An estimate of |value(p) - J(p)| from the Krylov forward solve: the dual-weighted residual
        |lam^T (b(p) - A u)| (see ``ReducedFunctional.value_error``; collective)."""
        pv = self.to_vec(p)
        st = self._state(pv)
        lam = self._adjoint(st)
        r = self.b.duplicate()
        b = self._rhs(pv, r.duplicate())
        self.A.mult(st.u, r)
        r.aypx(-1.0, b)  # r = b(p) - A u
        return abs(float(lam.dot(r)))

    def state(self, p) -> np.ndarray:
        """u(p) on the free dofs, serial order, on every rank."""
        return self.to_numpy(self._state(self.to_vec(p)).u, self.layout.dofs)

    def adjoint(self, p) -> np.ndarray:
        """lam(p), the solution of A^T lam = df/du, on the free dofs, serial order, on every rank."""
        st = self._state(self.to_vec(p))
        return self.to_numpy(self._adjoint(st), self.layout.dofs)

    def _block_vec(self, p, name: str = "p") -> PETSc.Vec:
        """A parameter Vec holding this rank's block ``p`` (a wrong shape on any rank stops every rank)."""
        PETSc.garbage_cleanup(self.comm)  # the Vecs of earlier conversions (see _state)
        n = self.layout.params.local_size(self.rank)
        p = np.asarray(p, dtype=np.float64)
        agree(self.comm, p.shape == (n,), f"{name} must be this rank's block of {n} parameters, got shape {p.shape}",
              ShapeError)
        v = self.create_parameter_vec()
        v.setArray(p)
        return v

    def parameter_values(self, p, ids, block: bool = False) -> np.ndarray:
        """The parameters with global numbers ``ids`` at p (full vector, or this rank's block with ``block=True``;
        collective: the values other ranks own come by one scatter)."""
        ids = np.asarray(ids, dtype=np.int64)
        agree(self.comm, bool(np.all((ids >= 0) & (ids < self.n_params))),
              f"ids must be parameter numbers in [0, {self.n_params})", ValueError)
        if not block:
            return np.asarray(p, dtype=np.float64)[ids]
        v = self._block_vec(p)
        out = PETSc.Vec().createSeq(ids.size, comm=PETSc.COMM_SELF)
        sc = PETSc.Scatter().create(v, PETSc.IS().createGeneral(ids.astype(_INT), comm=PETSc.COMM_SELF), out, None)
        sc.scatter(v, out, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
        return out.getArray(readonly=True).copy()

    def local_values(self, p, what: str = "state", dofs=None, block: bool = False) -> np.ndarray:
        """The state (``what="state"``), adjoint (``"adjoint"``) or element values rho (``"rho"``) at p, this
        rank's part only (collective): at the global dof numbers ``dofs`` (any that this rank's elements touch,
        owned or ghost; negative = a condensed dof, value 0), or rho of this rank's elements (``dofs`` unused).
        What a rank-local build writes into its piece of a parallel VTU; nothing of global length is gathered.
        """
        if what not in ("state", "adjoint", "rho"):
            raise ValueError(f"what must be 'state', 'adjoint' or 'rho', got {what!r}")
        if block:
            v = self._block_vec(p)
        else:
            v = self.to_vec(p)
        st = self._state(v)
        if what == "rho":
            return st.rho.copy()
        if what == "adjoint":
            self._adjoint(st)
        values = st.u_ghost if what == "state" else st.lam_ghost
        dofs = np.asarray(dofs, dtype=np.int64)
        where = np.searchsorted(self._ghosts, np.maximum(dofs, 0))
        where = np.minimum(where, max(self._ghosts.size - 1, 0))
        known = (dofs < 0) | ((self._ghosts.size > 0) & (self._ghosts[where] == dofs))
        agree(self.comm, bool(np.all(known)), f"dof {int(dofs[~known][0]) if not np.all(known) else -1} is not "
              "touched by this rank's elements: ask for the dofs of this rank's elements (owned or ghost)", ValueError)
        return np.where(dofs < 0, 0.0, values[where] if values.size else 0.0)

    def __call__(self, p) -> float:
        return self.value(p)

    def __repr__(self):
        return (f"DistributedReducedFunctional({self.matrix!r}, ranks={self.size}, solver={self.solver.name}, "
                f"objective={self.objective!r})")


class _DistributedGram(InnerProduct):
    """An inner product a^T M b on full parameter vectors with M a distributed Mat (see ``inner_product``)."""

    def __init__(self, F: DistributedReducedFunctional, spec: str, blocks: bool = False):
        params = F.layout.params
        super().__init__(params.local_size(F.rank) if blocks else F.n_params, Blocks(F.comm) if blocks else None)
        self.name, self.F, self.blocks = spec, F, blocks
        comm, params = F.comm, F.layout.params
        n_mine = params.local_size(F.rank)

        G = F._gram["mass"].copy()
        if spec == "h1":
            G.axpy(1.0, F._gram["stiffness"], structure=PETSc.Mat.Structure.DIFFERENT_NONZERO_PATTERN)
        indptr, _, values = G.getValuesCSR()
        lumped = np.bincount(np.repeat(np.arange(n_mine), np.diff(indptr)), weights=np.abs(values), minlength=n_mine)
        if spec == "l2-lumped":
            G = _diagonal_mat(comm, params, lumped)
        self._mine_diag = lumped
        agree(comm, bool(np.all(self._mine_diag > 0)), f"the Gram matrix of the {spec} inner product has an empty row: "
              "it is not positive definite", ValueError)
        diagonal = G.getDiagonal().getArray(readonly=True)
        agree(comm, bool(np.all(diagonal > 0)), f"the Gram matrix of the {spec} inner product has a diagonal entry <= 0: "
              "it is not positive definite; give a mass (and stiffness) that is symmetric positive definite", ValueError)
        if not G.isSymmetric(tol=1e-10 * comm.allreduce(float(np.max(np.abs(diagonal), initial=1.0)), op=MPI.MAX)):
            raise ValueError(f"the Gram matrix of the {spec} inner product is not symmetric: an inner product is "
                             "symmetric; give a symmetric mass (and stiffness)")
        self.M = G
        self.M.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        self.ksp = PETSc.KSP().create(comm=comm)
        self.ksp.setOperators(self.M)
        self.ksp.setType("cg")
        self.ksp.getPC().setType("gamg" if spec == "h1" else "jacobi")
        self.ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
        self.ksp.setTolerances(rtol=1e-12, atol=0.0, max_it=10000)
        self._x, self._y = self.M.createVecs()
        self._diag = None

    def _load(self, v, name):
        if self.blocks:
            self.F._block_vec(v, name).copy(self._x)
        else:
            self.F.to_vec(v, name).copy(self._x)

    def _out(self, v):
        return v.getArray(readonly=True).copy() if self.blocks else self.F.to_numpy(v)

    def apply(self, v):
        self._load(v, "v")
        self.M.mult(self._x, self._y)
        return self._out(self._y)

    def riesz(self, g):
        self._load(g, "g")
        self._y.set(0.0)
        self.ksp.solve(self._x, self._y)
        reason = self.ksp.getConvergedReason()
        if reason < 0:
            raise SolverDidNotConverge(f"the Riesz map of the {self.name} inner product did not converge "
                                       f"({_REASONS.get(reason, reason)} after {self.ksp.getIterationNumber()} iterations)")
        return self._out(self._y)

    def diagonal(self):
        if self._diag is None:
            v = _vec_local(self.F.comm, self.F.layout.params, self._mine_diag)
            self._diag = self._out(v)
        return self._diag


class BlockFunctional:
    """A :class:`DistributedReducedFunctional` on this rank's block of p (see :meth:`DistributedReducedFunctional.blocks`).

    ``value(p)``, ``gradient(p)`` and ``hessp(p, dp)`` take and return this
    rank's contiguous block of the parameter vector (``n_params`` entries; the
    global vector is never formed), collectively. ``space`` tells the drivers
    to sum their reductions over the ranks (:class:`adjopt.optimize.space.Blocks`).
    """

    def __init__(self, F: DistributedReducedFunctional):
        self.F = F
        self.comm = F.comm
        self.space = Blocks(F.comm)
        self.range = (int(F.layout.params.ranges[F.rank]), int(F.layout.params.ranges[F.rank + 1]))
        self.n_params = self.range[1] - self.range[0]
        self.n_global = F.n_params
        self.grams = F.grams
        self.stats, self.times, self.solver = F.stats, F.times, F.solver
        self._p, self._dp = F.create_parameter_vec(), F.create_parameter_vec()

    def _vec(self, v, name, target):
        v = np.asarray(v, dtype=np.float64)
        agree(self.comm, v.shape == (self.n_params,), f"{name} must be this rank's block of {self.n_params} "
              f"parameters, got shape {v.shape}", ShapeError)
        target.setArray(v)
        return target

    def value(self, p) -> float:
        return self.F.value_vec(self._vec(p, "p", self._p))

    def gradient(self, p, tol: float | None = None) -> np.ndarray:
        return self.F.gradient_vec(self._vec(p, "p", self._p), tol=tol).getArray(readonly=True).copy()

    def value_and_gradient(self, p, tol: float | None = None):
        return self.value(p), self.gradient(p, tol=tol)

    def hessp(self, p, dp, tol: float | None = None, gauss_newton: bool = False) -> np.ndarray:
        if gauss_newton:
            raise NotImplementedError("the PETSc backend computes the full Hessian action; gauss_newton runs serially")
        out = self.F.hessp_vec(self._vec(p, "p", self._p), self._vec(dp, "dp", self._dp), tol=tol)
        return out.getArray(readonly=True).copy()

    def inner_product(self, spec: str):
        """The inner product ``spec`` on blocks (see :meth:`DistributedReducedFunctional.inner_product`)."""
        if isinstance(spec, str) and spec.lower() == "euclidean":
            return Euclidean(self.n_params, self.space)
        self.F.inner_product(spec)  # the checks
        return _DistributedGram(self.F, spec.lower(), blocks=True)

    def forget(self) -> None:
        """Nothing to drop: the parameter map is fixed."""

    def _gathered(self, v: PETSc.Vec, root: int):
        parts = self.comm.gather(v.getArray(readonly=True).copy(), root=root)
        return None if parts is None else np.concatenate(parts)

    def state(self, p, root: int = 0):
        """u(p) on the free dofs, the whole vector on rank ``root`` only (None elsewhere; collective)."""
        return self._gathered(self.F._state(self._vec(p, "p", self._p)).u, root)

    def adjoint(self, p, root: int = 0):
        """lam(p), the whole vector on rank ``root`` only (None elsewhere; collective)."""
        st = self.F._state(self._vec(p, "p", self._p))
        return self._gathered(self.F._adjoint(st), root)

    def local_values(self, p, what: str = "state", dofs=None) -> np.ndarray:
        """As :meth:`DistributedReducedFunctional.local_values`, p this rank's block."""
        return self.F.local_values(p, what, dofs, block=True)

    def parameter_values(self, p, ids) -> np.ndarray:
        """The parameters with global numbers ``ids`` (owned or not) from the ranks' blocks p (collective)."""
        return self.F.parameter_values(p, ids, block=True)

    def gather(self, p, root: int = 0):
        """The whole vector on rank ``root`` (None elsewhere), for writing results."""
        parts = self.comm.gather(np.asarray(p, dtype=np.float64), root=root)
        return None if parts is None else np.concatenate(parts)

    def __repr__(self):
        return f"BlockFunctional({self.F!r}, block {self.range})"


def in_blocks(problem):
    """A copy of a problem built rank by rank whose parameters stay in blocks over the ranks.

    The functional becomes its :class:`BlockFunctional`, p0 and the bounds
    this rank's block, and each constraint its block form (``blocks()``).
    adjopt's OC, MMA, L-BFGS and Newton-CG then run with p, the gradient and their
    memory distributed (each rank its block; reductions by allreduce).
    """
    F = problem.functional
    if not isinstance(F, DistributedReducedFunctional):
        raise TypeError(f"in_blocks takes a problem whose functional is a DistributedReducedFunctional, got "
                        f"{type(F).__name__}")
    view = BlockFunctional(F)
    lo, hi = view.range

    def mine(a):
        a = np.asarray(a)
        return a if a.ndim == 0 else a[lo:hi]

    cons = []
    for c, upper in problem.constraints or []:
        if not callable(getattr(c, "blocks", None)):
            raise NotImplementedError(f"the constraint {c!r} has no block form (blocks()): run on the replicated "
                                      "parameter vector")
        cons.append((c.blocks(), upper))
    bounds = None if problem.bounds is None else tuple(mine(b) for b in problem.bounds)
    if problem.continuation is not None or problem.monitor is not None:
        raise NotImplementedError("a continuation or monitor works on the whole parameter vector")
    return replace(problem, functional=view, p0=mine(problem.p0), bounds=bounds, constraints=cons, mass=None,
                   stiffness=None)


def distribute(problem, comm=None, partition: str | None = None, **options):
    """A copy of a gallery :class:`~adjopt.Problem` whose functional runs on PETSc over ``comm``.

    When ``problem.meta`` has the mesh and a ``dofmap`` with ``dim`` dofs per
    node (elasticity), the rigid body modes on the free dofs become the
    near-nullspace of the multigrid preconditioner.

    ``partition=None`` takes ``"slab"`` when ``problem.meta`` has the mesh
    (element centres as coordinates) and ``"block"`` otherwise. Bounds,
    constraints, mass and stiffness are kept: they act on the full parameter
    vector, which the serial interface replicates.
    """
    same_options(MPI.COMM_WORLD if comm is None else comm, "distribute", partition=partition, **options)
    meta = problem.meta if isinstance(problem.meta, dict) else {}
    mesh, dofmap = meta.get("mesh"), meta.get("dofmap")
    J = problem.functional
    if not all(hasattr(J, a) for a in ("matrix", "rhs", "objective", "map")):
        # a time-dependent or eigenvalue functional, or a user's own: nothing the backend's A(p) u = b(p) describes
        raise NotImplementedError(
            f"the PETSc backend distributes stationary state equations A(p) u = b(p) (an adjopt.ReducedFunctional); "
            f"{type(J).__name__} runs with the serial functional: drop --backend petsc")
    if (mesh is not None and dofmap is not None and "near_nullspace" not in options and mesh.dim > 1
            and getattr(dofmap, "n_dofs", None) == mesh.dim * mesh.n_nodes and dofmap.n_free == J.matrix.shape[0]):
        # a vector problem (elasticity) on the mesh: the rigid body modes let GAMG coarsen it well
        options["near_nullspace"] = rigid_body_modes(mesh.points, dofmap.free)
    if partition is None:
        partition = "slab" if mesh is not None and len(mesh.cells) == J.matrix.n_params else "block"
    if partition == "slab" and "coordinates" not in options and mesh is not None:
        options["coordinates"] = mesh.cell_centers()
    F = DistributedReducedFunctional.from_functional(J, comm=comm, partition=partition, **options)
    return replace(problem, functional=F)
