"""Optional direct backends: CHOLMOD (scikit-sparse) and PARDISO (pypardiso).

Each backend's tests skip when its package is missing; the "not installed"
tests run everywhere (they hide the package from the import system).
"""

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

import adjopt
from adjopt.errors import MissingBackendError, NotPositiveDefiniteError, SingularMatrixError
from adjopt.solvers import DirectSolver
from adjopt.solvers import cholmod as cholmod_backend
from adjopt.solvers import pardiso as pardiso_backend
from adjopt.solvers.cholmod import CholmodSolver
from adjopt.solvers.pardiso import PardisoError, PardisoSolver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "problems"))
import advection_diffusion_source  # noqa: E402
import poisson_inversion  # noqa: E402


# -- matrices -----------------------------------------------------------------------
def tridiag(n, lower=-1.0, diag=2.0, upper=-1.0):
    return sp.diags_array([np.full(n - 1, lower), np.full(n, diag), np.full(n - 1, upper)], offsets=[-1, 0, 1])


def laplacian(n=12):
    """The 5-point 2D Dirichlet Laplacian on an n x n grid (SPD, n^2 unknowns)."""
    T, eye = tridiag(n), sp.eye_array(n)
    return sp.csr_array(sp.kron(T, eye) + sp.kron(eye, T))


def advection(n=12, c=0.7):
    """Laplacian plus a skew-symmetric (central difference) advection term: nonsymmetric, nonsingular."""
    D = tridiag(n, -1.0, 0.0, 1.0)
    return sp.csr_array(laplacian(n) + c * sp.kron(sp.eye_array(n), D))


def neumann_laplacian(n=8):
    """The pure-Neumann 2D Laplacian: singular, constants in the null space."""
    diag = np.full(n, 2.0)
    diag[[0, -1]] = 1.0
    T = sp.diags_array([-np.ones(n - 1), diag, -np.ones(n - 1)], offsets=[-1, 0, 1])
    eye = sp.eye_array(n)
    return sp.csr_array(sp.kron(T, eye) + sp.kron(eye, T))


def rhs(n, k=None, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n) if k is None else rng.standard_normal((n, k))


def check_solves(solver, A):
    """Forward and transposed solves, vector and (n, 3) right-hand sides, against spsolve."""
    fac = solver.factorize(A)
    n = A.shape[0]
    b, B = rhs(n), rhs(n, 3, seed=1)
    Ac, Atc = sp.csc_array(A), sp.csc_array(A.T)
    np.testing.assert_allclose(fac.solve(b, kind="forward"), sla.spsolve(Ac, b), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fac.solve(b, transpose=True, kind="adjoint"), sla.spsolve(Atc, b), rtol=1e-10, atol=1e-12)
    x = fac.solve(B, kind="tangent")
    assert x.shape == (n, 3)
    np.testing.assert_allclose(x, sla.spsolve(Ac, B), rtol=1e-10, atol=1e-12)
    xt = fac.solve(B, transpose=True, kind="second_adjoint")
    assert xt.shape == (n, 3)
    np.testing.assert_allclose(xt, sla.spsolve(Atc, B), rtol=1e-10, atol=1e-12)
    return fac


def check_counters(solver, fac):
    s = solver.stats
    assert s.factorizations == 1 and s.transpose_factorizations == 0
    assert dict(s.solves) == {"forward": 1, "adjoint": 1, "tangent": 1, "second_adjoint": 1}
    assert dict(s.rhs) == {"forward": 1, "adjoint": 1, "tangent": 3, "second_adjoint": 3}
    assert s.factor_nnz == fac.factor_nnz > 0
    assert fac.nbytes > 0


def relative_gap(x, y):
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def poisson_functional(solver):
    J = poisson_inversion.build(n=8).functional
    return adjopt.ReducedFunctional(J.matrix, J.rhs, J.objective, solver=solver, parameter_map=J.map)


def advection_functional(solver):
    J = advection_diffusion_source.build(n=8, n_obs=20).functional
    return adjopt.ReducedFunctional(J.matrix, J.rhs, J.objective, solver=solver, parameter_map=J.map)


def smooth_nodal(J, seed=3):
    return 0.3 * np.random.default_rng(seed).standard_normal(J.n_params)


@pytest.fixture
def cholmod():
    pytest.importorskip("sksparse.cholmod")
    return CholmodSolver


@pytest.fixture
def pardiso():
    pytest.importorskip("pypardiso")
    return PardisoSolver


# -- CHOLMOD --------------------------------------------------------------------------
def test_cholmod_solves_and_counters(cholmod):
    s = cholmod()
    A = laplacian()
    fac = check_solves(s, A)
    check_counters(s, fac)
    # the factor holds at least the lower triangle of A and at most a dense triangle
    n = A.shape[0]
    assert sp.tril(A).nnz <= fac.factor_nnz < n * (n + 1) // 2
    assert fac.nbytes == 12 * fac.factor_nnz + 16 * n
    assert s.name == "cholmod" and s.requires == "sksparse" and s.extra == "cholmod"


@pytest.mark.parametrize("mode", ["simplicial", "supernodal"])
def test_cholmod_analyses_a_pattern_once(cholmod, mode):
    s = cholmod(mode=mode)
    A = laplacian()
    rng = np.random.default_rng(0)
    b = rng.standard_normal(A.shape[0])
    facs = []
    for scale in (1.0, 3.0, 0.5):  # same pattern, new values: one analysis, three numeric factorizations
        B = sp.csr_array((A.data * scale, A.indices, A.indptr), shape=A.shape)
        fac = s.factorize(B)
        facs.append((fac, B))
    assert s.analyses == 1 and s.stats.factorizations == 3
    for fac, B in facs:  # every factor stays valid (no in-place reuse of one factor)
        np.testing.assert_allclose(B @ fac.solve(b), b, rtol=0, atol=1e-10 * np.abs(b).max())
    assert facs[0][0].factor_nnz == facs[2][0].factor_nnz > 0
    s.factorize(tridiag(A.shape[0]))  # another pattern: analysed again
    assert s.analyses == 2


def test_cholmod_factor_nnz_exact_for_a_tridiagonal_matrix(cholmod):
    # natural ordering: L of a tridiagonal SPD matrix is bidiagonal, 2n - 1 entries, no fill
    fac = cholmod(mode="simplicial", ordering_method="natural").factorize(tridiag(50))
    assert fac.factor_nnz == 99
    assert cholmod().factorize(sp.diags_array([np.arange(1.0, 11.0)], offsets=[0])).factor_nnz == 10


@pytest.mark.parametrize("mode", cholmod_backend.MODES)
@pytest.mark.parametrize("ordering", ["default", "amd", "natural"])
def test_cholmod_modes_and_orderings(cholmod, mode, ordering):
    A = laplacian(10)
    b = rhs(100)
    x = cholmod(mode=mode, ordering_method=ordering).factorize(A).solve(b)
    np.testing.assert_allclose(x, sla.spsolve(sp.csc_array(A), b), rtol=1e-10)


def test_cholmod_supernodal_stores_at_least_the_simplicial_factor(cholmod):
    A = laplacian(20)
    simplicial = cholmod(mode="simplicial").factorize(A).factor_nnz
    supernodal = cholmod(mode="supernodal").factorize(A).factor_nnz
    assert sp.tril(A).nnz < simplicial <= supernodal  # supernodes store dense blocks, explicit zeros included


def test_cholmod_bad_options(cholmod):
    with pytest.raises(ValueError, match="unknown CHOLMOD mode 'llt'"):
        cholmod(mode="llt")
    with pytest.raises(ValueError, match="unknown CHOLMOD ordering_method 'rcm'"):
        cholmod(ordering_method="rcm")


def test_cholmod_rejects_a_nonsymmetric_matrix(cholmod):
    s = cholmod()
    with pytest.raises(NotPositiveDefiniteError, match="symmetric positive definite") as info:
        s.factorize(advection())
    assert 'solver="pardiso"' in str(info.value) and 'solver="superlu"' in str(info.value)
    assert "not symmetric" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert s.stats.factorizations == 0


@pytest.mark.parametrize("mode", ["auto", "simplicial"])
def test_cholmod_rejects_a_symmetric_indefinite_matrix_in_ldlt_mode(cholmod, mode):
    # the simplicial L D L^T factorization itself succeeds on an indefinite matrix: D must be checked
    A = laplacian(10) - 1.0 * sp.eye_array(100)  # eigenvalues 4 - 2cos - 2cos - 1 straddle 0
    assert np.linalg.eigvalsh(A.toarray()).min() < 0 < np.linalg.eigvalsh(A.toarray()).max()
    with pytest.raises(NotPositiveDefiniteError, match=r"L D L\^T factorization has \d+ non-positive pivot") as info:
        cholmod(mode=mode).factorize(A)
    assert 'solver="pardiso"' in str(info.value)


def test_cholmod_rejects_a_symmetric_indefinite_matrix_in_supernodal_mode(cholmod):
    # the supernodal L L^T factorization stops: CholmodNotPositiveDefiniteError becomes ours
    A = laplacian(10) - 1.0 * sp.eye_array(100)
    with pytest.raises(NotPositiveDefiniteError, match="non-positive pivot in column") as info:
        cholmod(mode="supernodal").factorize(A)
    assert 'solver="superlu"' in str(info.value)
    assert type(info.value.__cause__).__name__ == "CholmodNotPositiveDefiniteError"


def test_cholmod_rejects_a_negative_definite_matrix(cholmod):
    with pytest.raises(NotPositiveDefiniteError, match="100 non-positive pivot"):
        cholmod().factorize(-laplacian(10))


def test_cholmod_gradient_and_hessian_match_superlu(cholmod):
    ref, J = poisson_functional(DirectSolver()), poisson_functional(cholmod())
    p = smooth_nodal(J)
    assert relative_gap(J.gradient(p), ref.gradient(p)) < 1e-10
    assert abs(J.value(p) - ref.value(p)) <= 1e-10 * abs(ref.value(p))
    dp = smooth_nodal(J, seed=4)
    assert relative_gap(J.hessp(p, dp), ref.hessp(p, dp)) < 1e-10
    assert J.stats.factorizations == 1
    assert J.stats.solves["forward"] == 1 and J.stats.solves["adjoint"] == 1
    assert J.stats.solves["tangent"] == 1 and J.stats.solves["second_adjoint"] == 1
    assert J.stats.factor_nnz > 0


def test_cholmod_in_a_functional_with_a_nonsymmetric_operator(cholmod):
    J = advection_functional(cholmod())
    with pytest.raises(NotPositiveDefiniteError, match="not symmetric"):
        J.gradient(np.zeros(J.n_params))


# -- PARDISO --------------------------------------------------------------------------
@pytest.mark.parametrize("matrix", [laplacian, advection])
def test_pardiso_solves_and_counters(pardiso, matrix):
    s = pardiso()
    A = matrix()
    fac = check_solves(s, A)
    check_counters(s, fac)
    assert fac.factor_nnz == int(fac._pardiso.get_iparm(18)) >= A.nnz
    assert fac.perturbed_pivots == 0
    assert fac.nbytes == 1024 * int(fac._pardiso.get_iparm(16) + fac._pardiso.get_iparm(17))
    # the factor values alone (8 bytes each) fit in the reported memory
    assert fac.nbytes >= 8 * fac.factor_nnz
    assert s.name == "pardiso" and s.requires == "pypardiso" and s.extra == "pardiso"


@pytest.fixture
def phases(pardiso, monkeypatch):
    """The phase of every PARDISO call made through handles copied from the shared template."""
    pardiso()  # builds the template
    template = pardiso_backend._template
    calls = []
    real = template._mkl_pardiso

    def recording(*args):
        calls.append(args[4]._obj.value)  # the 5th argument is byref(phase)
        return real(*args)

    monkeypatch.setattr(template, "_mkl_pardiso", recording)
    return calls


def test_pardiso_solves_never_refactorize(pardiso, phases):
    A = advection()
    fac = pardiso().factorize(A)
    b = rhs(A.shape[0])
    for transpose in (False, True, False, True):
        fac.solve(b, transpose=transpose)
    fac.solve(rhs(A.shape[0], 2), transpose=True)
    assert phases == [12, 33, 33, 33, 33, 33, 33]  # the first 33: the singularity probe, a solve of its own
    assert fac._pardiso.get_iparm(12) == 2  # the last solve was transposed


def test_pardiso_releases_its_memory_when_collected(pardiso, phases):
    fac = pardiso().factorize(laplacian(6))
    finalizer = fac._finalizer
    assert finalizer.alive
    del fac
    gc.collect()
    assert not finalizer.alive
    assert phases == [12, -1]


def test_pardiso_two_live_factorizations_interleaved(pardiso):
    s = pardiso()
    A1, A2 = advection(10, c=0.7), laplacian(10) + sp.diags_array([np.linspace(0.0, 3.0, 100)], offsets=[0])
    f1, f2 = s.factorize(A1), s.factorize(A2)
    b = rhs(100)
    for _ in range(2):
        for A, f in ((A1, f1), (A2, f2)):
            np.testing.assert_allclose(A @ f.solve(b), b, atol=1e-11)
            np.testing.assert_allclose(A.T @ f.solve(b, transpose=True), b, atol=1e-11)
    assert f1._pardiso.pt is not f2._pardiso.pt and f1._pardiso.pt.any() and f2._pardiso.pt.any()
    assert s.stats.factorizations == 2 and s.stats.total_solves == 8


def test_pardiso_does_not_sort_the_callers_matrix(pardiso):
    A = advection(6)
    indices = np.concatenate([A.indices[a:b][::-1] for a, b in zip(A.indptr[:-1], A.indptr[1:])])
    data = np.concatenate([A.data[a:b][::-1] for a, b in zip(A.indptr[:-1], A.indptr[1:])])
    U = sp.csr_array((data, indices, A.indptr), shape=A.shape)
    assert not U.has_sorted_indices
    b = rhs(36)
    fac = pardiso().factorize(U)
    np.testing.assert_allclose(fac.solve(b), sla.spsolve(sp.csc_array(A), b), rtol=1e-10)
    np.testing.assert_array_equal(U.indices, indices)


@pytest.mark.parametrize("matrix", [neumann_laplacian, lambda: sp.csr_array(np.ones((2, 2)))])
def test_pardiso_singular_matrix(pardiso, phases, matrix):
    # PARDISO perturbs the zero pivot and factors; the probe solve with a random b exposes the singularity
    s = pardiso()
    with pytest.raises(SingularMatrixError, match=r"PARDISO perturbed \d+ tiny pivot\(s\) and a solve with a random") as info:
        s.factorize(matrix())
    assert "Dirichlet" in str(info.value)
    assert phases == [12, 33, -1]  # factorize, probe, release the handle at once
    assert s.stats.factorizations == 0 and s.stats.total_solves == 0


def test_pardiso_probe_passes_a_nonsingular_matrix(pardiso):
    fac = pardiso().factorize(advection())
    assert fac.perturbed_pivots == 0
    fac._probe_singular()  # no raise: the random right-hand side solves to round-off
    assert fac.stats.total_solves == 0  # the probe is not counted


def test_pardiso_singular_matrix_in_a_functional(pardiso):
    A = adjopt.ElementCoefficientMatrix(np.array([[0, 1]]), np.ones((2, 2)))
    J = adjopt.ReducedFunctional(A, np.ones(2), adjopt.Norm(), solver=pardiso())
    with pytest.raises(SingularMatrixError, match="perturbed 1 tiny pivot"):
        J.value(np.array([1.0]))


@pytest.mark.parametrize("where", ["row", "column"])
def test_pardiso_empty_row_or_column(pardiso, where):
    M = np.diag([1.0, 2.0, 0.0, 4.0])
    if where == "row":
        M[0, 2] = 1.0  # column 2 has an entry, row 2 none
    else:
        M[2, 0] = 1.0
    with pytest.raises(SingularMatrixError, match=rf"1 {where}\(s\) of A hold no entries, the first {where} 2"):
        pardiso().factorize(sp.csr_array(M))


def _failing(real, code, phase, calls):
    """A _mkl_pardiso replacement: records each phase, reports PARDISO error ``code`` in ``phase``, else calls ``real``."""

    def call(*args):
        calls.append(args[4]._obj.value)
        if calls[-1] == phase:
            args[15]._obj.value = code  # byref(error)
            return None
        return real(*args)

    return call


@pytest.mark.parametrize(
    "code, error, match",
    [
        (-4, SingularMatrixError, "PARDISO error -4 in the factorization: zero pivot"),
        (-7, SingularMatrixError, "diagonal matrix is singular"),
        (-2, PardisoError, r"error -2 \(not enough memory\) in the factorization of a 36 x 36 matrix.*do not fit in memory"),
        (-3, PardisoError, r"error -3 \(reordering problem\).*try solver=\"superlu\""),
        (-99, PardisoError, r"error -99 \(unknown error\)"),
    ],
)
def test_pardiso_error_codes_in_the_factorization(pardiso, monkeypatch, code, error, match):
    s = pardiso()
    template = pardiso_backend._template
    calls = []
    monkeypatch.setattr(template, "_mkl_pardiso", _failing(template._mkl_pardiso, code, 12, calls))
    with pytest.raises(error, match=match) as info:
        s.factorize(advection(6))
    if error is PardisoError:
        assert info.value.code == code and isinstance(info.value, RuntimeError)
    assert type(info.value.__cause__).__name__ == "PyPardisoError"
    assert calls == [12, -1]  # the failed handle was released
    assert s.stats.factorizations == 0


@pytest.mark.parametrize("transpose, stage", [(False, "solve"), (True, "transposed solve")])
def test_pardiso_error_code_in_a_solve(pardiso, monkeypatch, transpose, stage):
    fac = pardiso().factorize(advection(6))
    fac.probe()  # the singularity probe's own solve first: the failing one below is the user's
    calls = []
    monkeypatch.setattr(fac._pardiso, "_mkl_pardiso", _failing(fac._pardiso._mkl_pardiso, -4, 33, calls))
    with pytest.raises(SingularMatrixError, match=f"PARDISO error -4 in the {stage}: zero pivot"):
        fac.solve(rhs(36), transpose=transpose)
    assert calls == [33]


@pytest.mark.parametrize("build", [poisson_functional, advection_functional])
def test_pardiso_gradient_and_hessian_match_superlu(pardiso, build):
    ref, J = build(DirectSolver()), build(pardiso())
    p = smooth_nodal(J)
    assert relative_gap(J.gradient(p), ref.gradient(p)) < 1e-10
    assert abs(J.value(p) - ref.value(p)) <= 1e-10 * abs(ref.value(p))
    dp = smooth_nodal(J, seed=4)
    assert relative_gap(J.hessp(p, dp), ref.hessp(p, dp)) < 1e-10
    assert J.stats.factorizations == 1 and J.stats.transpose_factorizations == 0
    assert J.stats.solves["adjoint"] == 1 and J.stats.solves["second_adjoint"] == 1


def test_backends_agree_on_an_spd_matrix(cholmod, pardiso):
    A = laplacian(15)
    b = rhs(225)
    chol, lu = cholmod().factorize(A), pardiso().factorize(A)
    np.testing.assert_allclose(chol.solve(b), lu.solve(b, transpose=True), rtol=1e-10)
    # the Cholesky factor L stores about half of PARDISO's L and U
    assert chol.factor_nnz < lu.factor_nnz


# -- not installed ------------------------------------------------------------------
def _hide(monkeypatch, package):
    """Make importlib.util.find_spec report ``package`` (and its submodules) as not installed."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == package else real(name, *a))


def test_cholmod_not_installed(monkeypatch):
    _hide(monkeypatch, "sksparse")
    assert not CholmodSolver.available()
    with pytest.raises(MissingBackendError, match="scikit-sparse \\(CHOLMOD\\), which is not installed") as info:
        CholmodSolver()
    msg = str(info.value)
    assert 'pip install "adjopt[cholmod]"' in msg
    assert "apt-get install libsuitesparse-dev" in msg and "scikit-sparse<0.5" in msg
    assert 'solver="superlu"' in msg
    assert isinstance(info.value, ImportError)


def test_cholmod_installed_but_broken(monkeypatch):
    monkeypatch.setattr(CholmodSolver, "available", classmethod(lambda cls: True))
    monkeypatch.setitem(sys.modules, "sksparse.cholmod", None)  # importing it raises ImportError
    with pytest.raises(MissingBackendError, match="which cannot be imported \\(import of sksparse.cholmod halted") as info:
        CholmodSolver()
    assert 'pip install "adjopt[cholmod]"' in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_pardiso_not_installed(monkeypatch):
    _hide(monkeypatch, "pypardiso")
    assert not PardisoSolver.available()
    with pytest.raises(MissingBackendError, match="pypardiso \\(Intel MKL PARDISO\\), which is not installed") as info:
        PardisoSolver()
    msg = str(info.value)
    assert 'pip install "adjopt[pardiso]"' in msg and 'solver="superlu"' in msg
    assert isinstance(info.value, ImportError)


def test_pardiso_installed_but_broken(monkeypatch):
    monkeypatch.setattr(PardisoSolver, "available", classmethod(lambda cls: True))
    monkeypatch.setitem(sys.modules, "pypardiso", None)
    with pytest.raises(MissingBackendError, match="which cannot be imported") as info:
        PardisoSolver()
    assert 'pip install "adjopt[pardiso]"' in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_pardiso_without_the_mkl_library(pardiso, monkeypatch):
    import pypardiso

    def no_mkl(*args, **kwargs):
        raise ImportError("Shared library mkl_rt not found. Use environment variable PYPARDISO_MKL_RT to provide a custom path.")

    monkeypatch.setattr(pardiso_backend, "_template", None)
    monkeypatch.setattr(pypardiso, "PyPardisoSolver", no_mkl)
    with pytest.raises(MissingBackendError, match="cannot load MKL's mkl_rt library") as info:
        pardiso()
    assert "PYPARDISO_MKL_RT" in str(info.value) and "adjopt[pardiso]" in str(info.value)


def test_importing_the_backend_modules_does_not_import_the_packages():
    code = (
        "import sys, adjopt, adjopt.solvers.cholmod, adjopt.solvers.pardiso; "
        "print('sksparse' in sys.modules, 'pypardiso' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
