"""Parameters in blocks over the ranks: adjopt's drivers with p, the gradient and their memory distributed.

Run under ``mpiexec -n 2`` (CI) and on one rank. Every rank checks what it
holds; the compared results are gathered.
"""

import os
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")

from problems import poisson_inversion, topology_compliance  # noqa: E402

import adjopt  # noqa: E402
from adjopt.backends.petsc import BlockFunctional, DistributedReducedFunctional, in_blocks  # noqa: E402
from adjopt.backends.petsc.parts import DistributedVolume  # noqa: E402
from adjopt.errors import ShapeError  # noqa: E402
from adjopt.optimize import CheckpointError  # noqa: E402
from adjopt.optimize.base import MethodSetupError  # noqa: E402
from adjopt.optimize.space import SERIAL, Blocks  # noqa: E402

COMM = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def mbb():
    return (topology_compliance.build_distributed(nelx=30, nely=10, rtol=1e-12),
            topology_compliance.build(nelx=30, nely=10, solver="superlu"))


@pytest.fixture(scope="module")
def poisson():
    return poisson_inversion.build_distributed(n=14, rtol=1e-12), poisson_inversion.build(n=14)


def _gather(x):
    return np.concatenate(COMM.allgather(np.asarray(x)))


@pytest.fixture
def no_full_vectors(monkeypatch):
    """Every path that forms the whole parameter vector on a rank raises inside the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a whole parameter vector was formed on a rank")

    monkeypatch.setattr(DistributedReducedFunctional, "to_numpy", refuse)
    monkeypatch.setattr(DistributedReducedFunctional, "to_vec", refuse)
    monkeypatch.setattr(DistributedVolume, "_full", property(refuse, lambda self, v: None), raising=False)


def _sizes_checked(problem):
    n = problem.functional.n_params
    seen = []

    def callback(entry):
        seen.append(entry["x"].size)
        assert entry["x"].size == n

    return callback, seen


def test_oc_on_blocks_follows_the_serial_run(mbb, no_full_vectors):
    dist, serial = mbb
    blocked = in_blocks(dist)
    assert isinstance(blocked.functional, BlockFunctional) and blocked.p0.size == blocked.functional.n_params
    assert COMM.allreduce(blocked.p0.size) == serial.p0.size
    callback, seen = _sizes_checked(blocked)
    r = adjopt.minimize(blocked, method="oc", maxiter=25, callback=callback)
    s = adjopt.minimize(serial, method="oc", maxiter=25)
    assert len(seen) == 25 and r.x.size == blocked.functional.n_params
    assert abs(r.fun - s.fun) <= 1e-9 * abs(s.fun)
    assert np.abs(_gather(r.x) - s.x).max() <= 1e-9
    for a, b in zip(r.history, s.history):
        assert abs(a["f"] - b["f"]) <= 1e-9 * abs(b["f"])
        assert a.get("volume") == pytest.approx(b.get("volume"), abs=1e-12)


@pytest.mark.parametrize("method, options", [("newton-cg", dict(preconditioner="h1", gtol=1e-7)),
                                             ("lbfgs", dict(gtol=1e-5))])
def test_newton_cg_and_lbfgs_on_blocks_end_where_the_serial_runs_end(poisson, method, options, no_full_vectors):
    dist, serial = poisson
    blocked = in_blocks(dist)
    callback, _ = _sizes_checked(blocked)
    r = adjopt.minimize(blocked, method=method, maxiter=300, callback=callback, **options)
    s = adjopt.minimize(serial, method=method, maxiter=300, **options)
    assert r.success and s.success
    assert abs(r.fun - s.fun) <= 1e-8 * abs(s.fun)
    assert np.linalg.norm(_gather(r.x) - s.x) <= 1e-4 * np.linalg.norm(s.x)


def test_block_functional_matches_the_replicated_interface(poisson):
    dist, _ = poisson
    F = dist.functional
    B = F.blocks()
    lo, hi = B.range
    rng = np.random.default_rng(4)
    p, dp = 0.2 * rng.standard_normal(F.n_params), rng.standard_normal(F.n_params)
    assert B.value(p[lo:hi]) == pytest.approx(F.value(p), rel=1e-13)
    assert np.allclose(B.gradient(p[lo:hi]), F.gradient(p)[lo:hi], rtol=1e-12, atol=0)
    assert np.allclose(B.hessp(p[lo:hi], dp[lo:hi]), F.hessp(p, dp)[lo:hi], rtol=1e-10, atol=1e-14)
    # the whole vectors come to rank 0 only
    state, whole = B.state(p[lo:hi]), F.state(p)  # both collective
    assert (state is None) == (COMM.rank != 0)
    if COMM.rank == 0:
        assert np.allclose(state, whole, rtol=1e-12, atol=0)
    # another rank's parameters at the ghost nodes come by a scatter
    ids = np.arange(F.n_params)[::7]
    assert np.array_equal(B.parameter_values(p[lo:hi], ids), p[ids])
    with pytest.raises(ShapeError, match="this rank's block"):
        B.value(np.append(p[lo:hi], 0.0))
    with pytest.raises(ShapeError, match="this rank's block"):  # one rank wrong: every rank stops
        B.gradient(p[lo:hi] if COMM.rank else np.append(p[lo:hi], 0.0))
    with pytest.raises(NotImplementedError, match="gauss_newton"):
        B.hessp(p[lo:hi], dp[lo:hi], gauss_newton=True)


def test_mma_on_blocks_follows_the_serial_run(mbb, no_full_vectors):
    dist, serial = mbb
    blocked = in_blocks(dist)
    callback, seen = _sizes_checked(blocked)
    r = adjopt.minimize(blocked, method="mma", maxiter=15, callback=callback)
    s = adjopt.minimize(serial, method="mma", maxiter=15)
    assert len(seen) == 15 and r.x.size == blocked.functional.n_params
    for a, b in zip(r.history, s.history):
        assert abs(a["f"] - b["f"]) <= 1e-7 * abs(b["f"])
    assert np.abs(_gather(r.x) - s.x).max() <= 1e-6
    assert r.history[-1]["max_violation"] == pytest.approx(s.history[-1]["max_violation"], abs=1e-9)


def test_the_mma_subproblem_in_blocks_is_the_whole_one():
    from adjopt.optimize.design import subsolv

    rng = np.random.default_rng(3)
    n, m = 60, 3
    x = rng.uniform(0.2, 0.8, n)
    low, upp = x - 0.5, x + 0.5
    alfa, beta = np.maximum(x - 0.2, 0.0), np.minimum(x + 0.2, 1.0)
    p0, q0 = rng.uniform(0.1, 1.0, n), rng.uniform(0.1, 1.0, n)
    P, Q = rng.uniform(0.0, 1.0, (m, n)), rng.uniform(0.0, 1.0, (m, n))
    b = rng.uniform(1.0, 10.0, m)
    a, c, d = np.zeros(m), np.full(m, 1000.0), np.ones(m)
    whole = subsolv(low, upp, alfa, beta, p0, q0, P, Q, 1.0, a, b, c, d)
    lo, hi = COMM.rank * n // COMM.size, (COMM.rank + 1) * n // COMM.size
    mine = subsolv(*(v[lo:hi] for v in (low, upp, alfa, beta, p0, q0)), P[:, lo:hi], Q[:, lo:hi], 1.0, a, b, c, d,
                   space=Blocks(COMM))
    np.testing.assert_allclose(_gather(mine[0]), whole[0], rtol=1e-10)
    for k in (1, 3, 6):  # y, lam, mu: the same on every rank
        np.testing.assert_allclose(mine[k], whole[k], rtol=1e-9, atol=1e-12)
    assert COMM.allgather(mine[3].tobytes()) == [mine[3].tobytes()] * COMM.size


def test_methods_that_need_the_whole_vector_refuse_blocks(mbb, poisson):
    with pytest.raises(MethodSetupError, match="'lbfgsb' runs on the whole parameter vector"):
        adjopt.minimize(in_blocks(poisson[0]), method="lbfgsb", maxiter=1)
    with pytest.raises(MethodSetupError, match="lowrank"):
        adjopt.minimize(in_blocks(poisson[0]), method="newton-cg", preconditioner="lowrank", maxiter=1)
    with pytest.raises(TypeError, match="in_blocks takes"):
        in_blocks(mbb[1])


def test_per_rank_checkpoints_resume_at_the_latest_iteration_every_rank_has(mbb, tmp_path):
    dist, _ = mbb
    folder = COMM.bcast(str(tmp_path) if COMM.rank == 0 else None)
    path = os.path.join(folder, "checkpoint.npz")
    blocked = in_blocks(dist)
    straight = adjopt.minimize(blocked, method="oc", maxiter=6)
    adjopt.minimize(blocked, method="oc", maxiter=4, checkpoint=path)
    assert os.path.exists(os.path.join(folder, f"checkpoint.rank{COMM.rank}.npz"))
    assert os.path.exists(os.path.join(folder, f"checkpoint.rank{COMM.rank}.prev.npz"))
    x = np.load(os.path.join(folder, f"checkpoint.rank{COMM.rank}.npz"))["state__x"]
    assert x.size == blocked.functional.n_params  # each file holds its rank's block only
    COMM.Barrier()
    # a kill while the ranks wrote iteration 4: the last rank's newest file never landed (it holds 3 only)
    if COMM.rank == COMM.size - 1:
        os.remove(os.path.join(folder, f"checkpoint.rank{COMM.rank}.npz"))
    COMM.Barrier()
    resumed = adjopt.minimize(blocked, method="oc", maxiter=6, resume=path)
    assert resumed.nit == 6 and len(resumed.history) == 7
    assert [h["f"] for h in resumed.history] == pytest.approx([h["f"] for h in straight.history], rel=1e-9)
    assert np.allclose(resumed.x, straight.x, rtol=0, atol=1e-9)
    # rank 0's file from a run on another number of ranks (another block size): every rank stops, none waits
    from adjopt.optimize.base import read_checkpoint, write_checkpoint

    COMM.Barrier()
    if COMM.rank == 0:
        for name in ("checkpoint.rank0.npz", "checkpoint.rank0.prev.npz"):
            if not os.path.exists(os.path.join(folder, name)):
                continue
            state, meta = read_checkpoint(os.path.join(folder, name))
            state = {k: (np.append(v, 0.5) if k in ("x", "g") else v) for k, v in state.items()}
            write_checkpoint(os.path.join(folder, name), state, meta)
    COMM.Barrier()
    with pytest.raises(CheckpointError, match="another number of ranks|rank 0"):
        adjopt.minimize(blocked, method="oc", maxiter=8, resume=path)
    # files of another run: no iteration in common
    COMM.Barrier()
    if COMM.rank == 0:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
    COMM.Barrier()
    with pytest.raises(CheckpointError, match="no iteration that every"):
        adjopt.minimize(blocked, method="oc", maxiter=6, resume=path)


def test_spaces_reduce_over_the_ranks():
    x = np.arange(3.0) + 3 * COMM.rank
    whole = np.arange(3.0 * COMM.size)
    b = Blocks(COMM)
    assert b.distributed and not SERIAL.distributed
    assert b.dot(x, x) == pytest.approx(whole @ whole)
    assert b.sum(x) == whole.sum() and b.max(x) == whole.max() and b.min(x) == whole.min()
    assert b.size(x) == whole.size and b.count(x > 1) == np.count_nonzero(whole > 1)
    assert b.all(x >= 0) and not b.any(x < 0) and b.any(x == 0)
    S, Y = np.vstack([x, 2 * x]), np.vstack([x, x])
    assert np.allclose(b.rows(S, Y), [whole @ whole, 2 * whole @ whole])
    assert b.max(np.zeros(0), initial=-1.0) >= -1.0


def test_taylor_test_of_the_block_functional_sums_over_the_ranks(poisson):
    from adjopt.verify import check_hessian_symmetry, taylor_test

    B = poisson[0].functional.blocks()
    p = 0.1 * np.ones(B.n_params)
    r2, r3 = taylor_test(B, p, order=2), taylor_test(B, p, order=3)
    assert r2.passed and abs(r2.rates[-1] - 2) < 0.1
    assert r3.passed and abs(r3.rates[-1] - 3) < 0.1 and r3.gradient_check.passed
    assert check_hessian_symmetry(B, p) < 1e-9


class _NaNOnLastRank:
    """A block functional whose gradient has a NaN on the last rank's block from the second call on."""

    def __init__(self, F):
        self._F, self.calls = F, 0

    def __getattr__(self, name):
        return getattr(self._F, name)

    def gradient(self, p, *args, **kwargs):
        g = np.array(self._F.gradient(p, *args, **kwargs))
        self.calls += 1
        if self.calls > 1 and COMM.rank == COMM.size - 1 and g.size:
            g[0] = np.nan
        return g


def test_a_nan_in_one_ranks_gradient_block_stops_mma_on_every_rank(mbb):
    from adjopt.optimize.base import OptimizationError

    blocked = in_blocks(mbb[0])
    broken = replace(blocked, functional=_NaNOnLastRank(blocked.functional))
    # every rank raises MMA's own error (none waits for the others), before the KKT measure's Riesz map sees the NaN
    where = "entry 0 of this rank" if COMM.rank == COMM.size - 1 else "on another rank"
    with pytest.raises(OptimizationError, match=f"MMA: the objective's gradient is .*{where}"):
        adjopt.minimize(broken, method="mma", maxiter=5)


class _FailsOnLastRank(_NaNOnLastRank):
    """A block functional whose gradient raises on the last rank only, at its third call."""

    def gradient(self, p, *args, **kwargs):
        g = self._F.gradient(p, *args, **kwargs)
        self.calls += 1
        if self.calls == 3 and COMM.rank == COMM.size - 1:
            raise FloatingPointError("overflow on this rank only")
        return g


@pytest.mark.parametrize("method", ["mma", "oc"])
def test_a_gradient_failing_on_one_rank_shortens_the_step_on_every_rank(mbb, method):
    blocked = in_blocks(mbb[0])
    flaky = replace(blocked, functional=_FailsOnLastRank(blocked.functional))
    res = adjopt.minimize(flaky, method=method, maxiter=4)  # a hang here would be the failure
    assert res.nit == 4 and np.isfinite(res.fun)


def test_mma_fixes_a_variable_whose_bounds_differ_by_round_off_on_one_rank(mbb):
    blocked = in_blocks(mbb[0])
    lo, hi = (np.array(b, dtype=float) for b in blocked.bounds)
    if COMM.rank == COMM.size - 1:
        lo[-1], hi[-1] = 0.5, np.nextafter(0.5, 1.0)
    res = adjopt.minimize(replace(blocked, bounds=(lo, hi)), method="mma", maxiter=3)
    assert res.nit == 3
    if COMM.rank == COMM.size - 1:
        assert res.x[-1] == pytest.approx(0.5, abs=1e-15)


def test_the_block_subproblem_refuses_nan_on_every_rank():
    from adjopt.optimize.design import subsolv

    n, m = 6, 2
    p0 = np.ones(n)
    if COMM.rank == COMM.size - 1:
        p0[0] = np.nan
    args = (np.zeros(n), np.full(n, 2.0), np.full(n, 0.5), np.full(n, 1.5), p0, np.ones(n), np.ones((m, n)),
            np.ones((m, n)), 1.0, np.zeros(m), np.ones(m), np.full(m, 1000.0), np.ones(m))
    with pytest.raises(ValueError, match="NaN or Inf in the subproblem"):
        subsolv(*args, space=Blocks(COMM))
