"""Gaussian priors on nodal fields: the bi-Laplacian (Matérn) prior N(m0, C).

On a P1 (triangles, tetrahedra) or Q1 (quads, hexahedra) mesh with the consistent mass matrix M, the stiffness
matrix K (of -Laplace) and the lumped masses M_L = diag(m_i), m_i = int N_i:

    A = delta M + gamma K + beta B                          SPD, sparse
    R = A M_L^{-1} A                                        precision
    C = R^{-1} = A^{-1} M_L A^{-1}                          covariance
    m = m0 + A^{-1} M_L^{1/2} xi,   xi ~ N(0, I)            samples: Cov(m) = A^{-1} M_L A^{-1} = C exactly

B is the lumped boundary mass: every boundary facet (``mesh.boundary_facets()``) hands its measure (edge length
in 2D, facet area in 3D) in equal shares to its vertices, B = diag(b_i). It is the Robin condition
gamma dm/dn + beta m = 0 on the boundary, with beta = sqrt(gamma delta) / 1.42 by default (Daon & Stadler 2018,
"Mitigating the influence of the boundary on PDE-based covariance operators"), which brings the pointwise variance
near the boundary closer to the interior one; the Neumann condition of ``robin=False`` inflates it there.

As an objective of the parameter p (add it to a data misfit, ``misfit + prior``):

    value      g(p) = 1/2 (p - m0)^T R (p - m0) = 1/2 (A d)^T M_L^{-1} (A d),   d = p - m0
    gradient   R d = A w,   w = M_L^{-1} A d   (w is kept from a value for the gradient at the same p)
    Hessian    R,   hessp(p, dp) = A M_L^{-1} A dp

R is never formed to apply it (two products with A and a division by M_L); C V costs two solves with one
factorization of A, made on first use and kept (A does not change).

Matérn parameters (:meth:`BiLaplacianPrior.from_correlation`). The samples discretize (delta - gamma Laplace) m =
W, W white noise (M_L^{1/2} xi has the covariance M_L, the lumped mass of the white-noise load), that is
gamma (kappa^2 - Laplace) m = W with kappa^2 = delta / gamma. On R^d, x solving (kappa^2 - Laplace)^{alpha/2} x = W
is a Matérn field of smoothness nu = alpha - d/2 and variance (Whittle; Lindgren, Rue & Lindström 2011)

    sigma_x^2 = Gamma(nu) / (Gamma(nu + d/2) (4 pi)^{d/2} kappa^{2 nu}).

Here alpha = 2, so nu = 2 - d/2 (1 in 2D, 1/2 in 3D), and x = gamma m gives the marginal variance of m

    sigma^2 = Gamma(nu) / (Gamma(nu + d/2) (4 pi)^{d/2} kappa^{2 nu} gamma^2)
            = 1 / (4 pi kappa^2 gamma^2)     (d = 2)
            = 1 / (8 pi kappa gamma^2)       (d = 3),

with correlation c(r) = 2^{1-nu} / Gamma(nu) (kappa r)^nu K_nu(kappa r). The correlation length
rho = sqrt(8 nu) / kappa is where c has fallen to about 0.14 (nu = 1: c(rho) = sqrt(8) K_1(sqrt(8)) = 0.139; nu =
1/2: exp(-2) = 0.135). For given rho and sigma:

    kappa = sqrt(8 nu) / rho,   gamma = sqrt(Gamma(nu) / (Gamma(nu + d/2) (4 pi)^{d/2} kappa^{2 nu})) / sigma,
    delta = kappa^2 gamma.

These hold in the interior of a mesh fine against rho; the boundary changes the variance within about rho of it.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np
import scipy.sparse as sp

from . import fem
from ._threads import dot
from ._validate import as_count, as_state_like, check_finite, owned, refuse_complex
from .errors import ShapeError
from .mesh import Mesh
from .objectives.regularization import ParameterObjective
from .solvers import make_solver

logger = logging.getLogger(__name__)

#: columns of the identity solved at once by the exact variance (and samples drawn at once by the estimate)
VARIANCE_BLOCK = 256
#: nodes up to which ``variance()`` computes diag(C) exactly by default
EXACT_VARIANCE_LIMIT = 20000
#: the default Robin coefficient is sqrt(gamma delta) / ROBIN_DIVISOR (Daon & Stadler 2018)
ROBIN_DIVISOR = 1.42
#: from_correlation warns when the correlation length spans fewer cells than this
COARSE_CELLS = 4.0


def _positive(value, name: str, what: str) -> float:
    """A finite real number > 0 as a float, or ValueError (``what`` says what the number is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a positive finite number ({what}), got {value!r}")
    return float(value)


def _read_only(M: sp.csr_array) -> sp.csr_array:
    for a in (M.data, M.indices, M.indptr):
        a.flags.writeable = False
    return M


def facet_measures(mesh: Mesh, facets: np.ndarray) -> np.ndarray:
    """Measures of facets given by their vertices: edge lengths (2 vertices), triangle areas (3) or quad areas (4).

    A quad's area is 1/2 |(x_2 - x_0) x (x_3 - x_1)| (vertices in cyclic order), exact for a planar quad.
    """
    x = mesh.points[facets]  # (F, nv, dim)
    nv = facets.shape[1]
    if nv == 2:
        return np.linalg.norm(x[:, 1] - x[:, 0], axis=1)
    if nv == 3:
        return 0.5 * np.linalg.norm(np.cross(x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]), axis=1)
    if nv == 4:
        return 0.5 * np.linalg.norm(np.cross(x[:, 2] - x[:, 0], x[:, 3] - x[:, 1]), axis=1)
    raise ShapeError(f"facets with {nv} vertices are not supported (2: edges, 3: triangles, 4: quads)")


def boundary_lumped_mass(mesh: Mesh) -> np.ndarray:
    """b_i = sum over the boundary facets F holding node i of |F| / (vertices of F): the lumped boundary mass."""
    facets = mesh.boundary_facets()
    share = facet_measures(mesh, facets) / facets.shape[1]
    return np.bincount(facets.ravel(), weights=np.repeat(share, facets.shape[1]), minlength=mesh.n_nodes)


class BiLaplacianPrior(ParameterObjective):
    """Gaussian prior N(m0, C) on a nodal field, C^{-1} = R = A M_L^{-1} A, A = delta M + gamma K + beta B.

    The formulas are in the module docstring (:mod:`adjopt.priors`). As an objective it is
    g(p) = 1/2 ||p - m0||_R^2 (gradient R (p - m0), Hessian R): ``J = ReducedFunctional(A, b, misfit + prior)``
    makes ``J`` the negative log-posterior up to a constant.

    Parameters
    ----------
    mesh
        The mesh of the field (triangles, tetrahedra: P1; quads, hexahedra: Q1); one parameter per node.
    gamma, delta
        Coefficients of the stiffness and the mass in A, > 0; delta / gamma = kappa^2 sets the correlation length
        (see :meth:`from_correlation` to choose them from a length and a standard deviation).
    mean
        m0: None (zero), a scalar or a nodal array (copied).
    robin
        Add beta B with beta = sqrt(gamma delta) / 1.42 (True), no boundary term (False) or beta itself (a
        number >= 0).
    solver
        For the factorization of A (``adjopt.solvers.make_solver``); A is SPD, so "auto" picks Cholesky when
        CHOLMOD is installed.

    Attributes
    ----------
    A : scipy.sparse.csr_array
        The operator delta M + gamma K + beta B (read-only arrays).
    lumped_mass : ndarray
        M_L's diagonal, (m,) read-only.
    mean : ndarray
        m0, (m,) read-only.
    n_params : int
        The number of nodes m.
    """

    #: found by code that looks for the Gaussian prior term in a sum of objectives (adjopt.uq)
    gaussian = True

    def __init__(self, mesh: Mesh, gamma: float, delta: float, mean=None, robin=True, solver="auto"):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"BiLaplacianPrior needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
        self.gamma = _positive(gamma, "gamma", "the coefficient of the stiffness matrix in A")
        self.delta = _positive(delta, "delta", "the coefficient of the mass matrix in A")
        if isinstance(robin, bool):
            self.beta = math.sqrt(self.gamma * self.delta) / ROBIN_DIVISOR if robin else 0.0
        elif isinstance(robin, numbers.Real) and math.isfinite(robin) and robin >= 0:
            self.beta = float(robin)
        else:
            raise ValueError(f"robin must be True, False or a Robin coefficient beta >= 0, got {robin!r}")
        self.robin = self.beta > 0
        self.dim = mesh.dim
        self.n = self.n_params = mesh.n_nodes
        self.mean = self._mean(mean)
        self.solver = make_solver(solver)

        stiffness = fem.p1_stiffness(mesh) if mesh.cell_type in ("triangle", "tetra") else fem.q1_laplace(mesh)
        M = fem.assemble(mesh.cells, fem.mass_matrices(mesh), self.n)
        K = fem.assemble(mesh.cells, stiffness, self.n)
        A = self.delta * M + self.gamma * K
        if self.beta > 0:
            A = A + sp.diags_array(self.beta * boundary_lumped_mass(mesh))
        self.A = _read_only(sp.csr_array(A))
        self.lumped_mass = owned(fem.lumped_mass(mesh), "lumped_mass")
        self._sqrt_ml = np.sqrt(self.lumped_mass)
        self._fac = None
        self._R = None
        #: (copy of p, M_L^{-1} A (p - m0)) of the last value_p, for a gradient at the same p
        self._kept = None

    @classmethod
    def from_correlation(cls, mesh: Mesh, length: float, std: float, mean=None, robin=True,
                         solver="auto") -> BiLaplacianPrior:
        """The prior of a Matérn field with correlation length ``length`` (rho) and marginal standard deviation
        ``std`` (sigma), nu = 2 - d/2:

            kappa = sqrt(8 nu) / rho,   delta / gamma = kappa^2,
            sigma^2 = Gamma(nu) / (Gamma(nu + d/2) (4 pi)^{d/2} kappa^{2 nu} gamma^2)

        solved for gamma (derivation in the module docstring). sigma is the variance away from the boundary
        (farther than about rho) on a mesh fine against rho; the correlation at distance rho is about 0.14.
        Measured at the centre of the unit square / cube: triangles 1.04 sigma at rho = 8 cells, tetrahedra
        1.03-1.08 sigma at 2-16 cells, but Q1 hexahedra 1.83 / 1.33 / 1.18 sigma at 2 / 8 / 16 cells (their
        lumped mass and stiffness converge more slowly); a warning says when rho spans fewer than 4 cells.
        """
        rho = _positive(length, "length", "the correlation length")
        sigma = _positive(std, "std", "the marginal standard deviation")
        if not isinstance(mesh, Mesh):
            raise TypeError(f"BiLaplacianPrior needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
        d = mesh.dim
        h = (float(np.sum(mesh.cell_volumes())) / mesh.n_nodes) ** (1.0 / d)  # the typical node spacing
        if rho < COARSE_CELLS * h:
            logger.warning("BiLaplacianPrior.from_correlation: the correlation length %.3g is only %.1f cells "
                           "(cells of about %.3g): the marginal standard deviation will differ from %.3g (measured "
                           "on hexahedra: 1.8x at 2 cells, 1.3x at 8); refine the mesh or lengthen the correlation",
                           rho, rho / h, h, sigma)
        nu = 2.0 - d / 2.0
        kappa = math.sqrt(8.0 * nu) / rho
        gamma = math.sqrt(_matern_factor(nu, d) / kappa ** (2.0 * nu)) / sigma
        return cls(mesh, gamma, kappa**2 * gamma, mean=mean, robin=robin, solver=solver)

    # -- Matérn view of (gamma, delta) -------------------------------------------------------------------------
    @property
    def nu(self) -> float:
        """Smoothness nu = 2 - d/2."""
        return 2.0 - self.dim / 2.0

    @property
    def correlation_length(self) -> float:
        """rho = sqrt(8 nu) / kappa, kappa = sqrt(delta / gamma)."""
        return math.sqrt(8.0 * self.nu) / math.sqrt(self.delta / self.gamma)

    @property
    def marginal_std(self) -> float:
        """sigma = sqrt(Gamma(nu) / (Gamma(nu + d/2) (4 pi)^{d/2} kappa^{2 nu})) / gamma (interior, fine mesh)."""
        kappa = math.sqrt(self.delta / self.gamma)
        return math.sqrt(_matern_factor(self.nu, self.dim) / kappa ** (2.0 * self.nu)) / self.gamma

    # -- input ---------------------------------------------------------------------------------------------------
    def _mean(self, mean) -> np.ndarray:
        if mean is None:
            out = np.zeros(self.n)
        else:
            m0 = owned(mean, "mean")
            if m0.shape not in ((), (self.n,)):
                raise ShapeError(f"mean must be a scalar or a nodal array of length {self.n} (one value per node), "
                                 f"got shape {m0.shape}")
            out = np.full(self.n, float(m0)) if m0.ndim == 0 else m0.copy()
        out.flags.writeable = False
        return out

    def _vector(self, p, name: str = "p") -> np.ndarray:
        refuse_complex(p, name)
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (self.n,):
            raise ShapeError(f"{name} must be a nodal vector of length {self.n}, got shape {p.shape}")
        check_finite(p, name)
        return p

    def _block(self, V, name: str = "V") -> np.ndarray:
        V = as_state_like(V, self.n, name)
        check_finite(V, name)
        return V

    def _factorization(self):
        if self._fac is None:
            self._fac = self.solver.factorize(self.A)
        return self._fac

    def _solve(self, rhs) -> np.ndarray:
        return self._factorization().solve(rhs, kind="other")

    def _scale(self, V, s) -> np.ndarray:
        """diag(s) V for V of shape (m,) or (m, k)."""
        return V * (s if V.ndim == 1 else s[:, None])

    # -- objective -----------------------------------------------------------------------------------------------
    def value_p(self, p) -> float:
        """g(p) = 1/2 (A d)^T M_L^{-1} (A d), d = p - m0."""
        p = self._vector(p)
        Ad = self.A @ (p - self.mean)
        w = Ad / self.lumped_mass
        self._kept = (p.copy(), w)
        return 0.5 * dot(Ad, w)

    def gradient_p(self, p) -> np.ndarray:
        """R (p - m0) = A M_L^{-1} A (p - m0) (reuses M_L^{-1} A (p - m0) of a value at the same p)."""
        p = self._vector(p)
        kept, self._kept = self._kept, None
        if kept is not None and np.array_equal(kept[0], p):
            return self.A @ kept[1]
        return self.precision(p - self.mean)

    def hessp_p(self, p, dp) -> np.ndarray:
        """R dp for dp of shape (m,) or (m, k)."""
        self._vector(p)
        return self.precision(self._block(dp, "dp"))

    def hess_pp_block(self, u, p, dP) -> np.ndarray:
        """R dP for the (m, k) block dP in one pass (the sparse products on the whole block)."""
        self._vector(p)
        return self.precision(self._block(dP, "dP"))

    # -- Gaussian ------------------------------------------------------------------------------------------------
    def precision(self, V) -> np.ndarray:
        """R V = A M_L^{-1} A V for V of shape (m,) or (m, k)."""
        V = self._block(V)
        return self.A @ self._scale(self.A @ V, 1.0 / self.lumped_mass)

    def covariance(self, V) -> np.ndarray:
        """C V = A^{-1} M_L A^{-1} V (two solves with the factorization of A) for V of shape (m,) or (m, k).

        A block is best Fortran-ordered (columns contiguous): CHOLMOD solves in that order, and a C-ordered
        block is copied into it first (a transposing copy: 101 against 54 ms per column at 1M nodes)."""
        V = self._block(V)
        if V.size == 0:
            return np.zeros_like(V)
        X = self._solve(V)
        if X.flags.writeable and not np.may_share_memory(X, V):  # the solve's own array: scaled in place
            X *= self.lumped_mass if X.ndim == 1 else self.lumped_mass[:, None]
        else:
            X = self._scale(X, self.lumped_mass)
        return self._solve(X)

    def covariance_norms(self, V):
        """||v||_C = sqrt(v^T C v) of each column of V: a float for V of shape (m,), (k,) for (m, k).

        One solve per column, half of :meth:`covariance`'s two: with X = A^{-1} V, v^T C v = x^T M_L x."""
        V = self._block(V)
        if V.size == 0:
            return np.zeros(V.shape[1:]) if V.ndim == 2 else 0.0
        X = self._solve(V)
        if X.ndim == 1:
            return math.sqrt(float(np.einsum("i,i,i->", X, X, self.lumped_mass)))
        return np.sqrt(np.einsum("ij,ij,i->j", X, X, self.lumped_mass))

    def precision_matrix(self) -> sp.csr_array:
        """R = A M_L^{-1} A as a sparse CSR matrix (a copy of the one formed on the first call)."""
        if self._R is None:
            self._R = _read_only(sp.csr_array(self.A @ sp.diags_array(1.0 / self.lumped_mass) @ self.A))
        return self._R.copy()

    def sample(self, n: int = 1, rng=None) -> np.ndarray:
        """``n`` draws m = m0 + A^{-1} M_L^{1/2} xi, xi ~ N(0, I), as the columns of an (m, n) array (also for
        n = 1). ``rng``: a seed or a numpy Generator."""
        n = as_count(n, "n")
        rng = np.random.default_rng(rng)
        xi = rng.standard_normal((self.n, n))
        return self.mean[:, None] + self._solve(self._sqrt_ml[:, None] * xi)

    def variance(self, exact: bool | None = None, n_samples: int = 500, rng=None) -> np.ndarray:
        """The pointwise prior variance diag(C), (m,).

        Exact (``exact=True``, or ``exact=None`` and m <= 20000): with X = A^{-1} M_L^{1/2}, C = X X^T and
        diag(C)_i = sum_j X_ij^2, accumulated over blocks of 256 columns X E_j (solves of A X E_j = M_L^{1/2} E_j);
        m solves in all, never an m x m array. Otherwise the Monte Carlo estimate
        mean_s (m_s - m0)^2 over ``n_samples`` samples, of relative standard error sqrt(2 / n_samples).
        """
        if exact is None:
            exact = self.n <= EXACT_VARIANCE_LIMIT
        out = np.zeros(self.n)
        if exact:
            logger.info("prior variance: exact, %d solves in blocks of %d", self.n, VARIANCE_BLOCK)
            for i0 in range(0, self.n, VARIANCE_BLOCK):
                i1 = min(i0 + VARIANCE_BLOCK, self.n)
                rhs = np.zeros((self.n, i1 - i0))
                rhs[np.arange(i0, i1), np.arange(i1 - i0)] = self._sqrt_ml[i0:i1]
                X = self._solve(rhs)
                out += np.einsum("ij,ij->i", X, X)
            return out
        n_samples = as_count(n_samples, "n_samples")
        logger.info("prior variance: Monte Carlo estimate from %d samples (relative standard error %.1f %%)",
                    n_samples, 100 * math.sqrt(2.0 / n_samples))
        rng = np.random.default_rng(rng)
        for s0 in range(0, n_samples, VARIANCE_BLOCK):
            k = min(VARIANCE_BLOCK, n_samples - s0)
            X = self._solve(self._sqrt_ml[:, None] * rng.standard_normal((self.n, k)))
            out += np.einsum("ij,ij->i", X, X)
        return out / n_samples

    def __repr__(self):
        return (f"BiLaplacianPrior(gamma={self.gamma:g}, delta={self.delta:g}, beta={self.beta:g}, "
                f"n_params={self.n}, dim={self.dim})")


def _matern_factor(nu: float, d: int) -> float:
    """Gamma(nu) / (Gamma(nu + d/2) (4 pi)^{d/2}): sigma^2 kappa^{2 nu} gamma^2 of the field."""
    return math.gamma(nu) / (math.gamma(nu + d / 2.0) * (4.0 * math.pi) ** (d / 2.0))
