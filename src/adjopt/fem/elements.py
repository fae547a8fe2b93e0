"""Element matrices for all cells at once (numba kernels, ``prange`` over cells).

Every function returns local matrices of shape (E, k, k) (scalar problems,
dofs = node indices ``mesh.cells``) or (E, k*dim, k*dim) (elasticity, dofs
``vector_dofs(mesh.cells, dim)``, node-major ``[n0x, n0y, n1x, n1y, ...]``).
Assemble them with :func:`adjopt.fem.assemble` or hand them to the operators
of the core together with the connectivity.
"""

from __future__ import annotations

import logging

import numpy as np

from ..mesh import InvalidElementError, Mesh
from ..mesh._reference import CELLS, shape_functions
from . import _kernels
from ._errors import FemError
from .quadrature import cell_rule

logger = logging.getLogger(__name__)

_SIMPLEX = ("triangle", "tetra")
_TENSOR = ("quad", "hexahedron")


def _require(mesh, allowed, func: str, alternative: str) -> None:
    if not isinstance(mesh, Mesh):
        raise FemError(f"{func} needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
    if mesh.cell_type not in allowed:
        raise FemError(
            f"{func} works on {' and '.join(allowed)} cells, but the mesh has {mesh.cell_type!r} cells; "
            f"use {alternative}"
        )


def _per_cell(value, mesh: Mesh, name: str, allow_zero: bool = True) -> np.ndarray:
    """Scalar or (E,) coefficient -> (E,) float64, finite and >= 0 (> 0 if not allow_zero)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(mesh.n_cells, float(arr))
    elif arr.shape != (mesh.n_cells,):
        raise FemError(f"{name} must be a scalar or have one value per cell, shape ({mesh.n_cells},); "
                       f"got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr < 0 if allow_zero else arr <= 0)
    if bad.any():
        e = int(np.flatnonzero(bad)[0])
        need = ">= 0" if allow_zero else "> 0"
        raise FemError(f"{name} must be finite and {need}; cell {e} has {name} = {float(arr[e])!r}")
    return np.ascontiguousarray(arr)


def check_jacobians(mesh: Mesh, detj: np.ndarray) -> None:
    """Reject cells whose ``det J`` at the quadrature points vanishes or changes sign.

    ``detj`` is (E, q). A cell is degenerate if ``max_q |det J| <= 1e-14 *
    median_e max_q |det J|`` and tangled if its ``det J`` takes both signs.
    Consistently negative ``det J`` (clockwise cells) is accepted, the
    kernels integrate with ``|det J|``.

    Raises
    ------
    InvalidElementError
        Naming the first bad cell and its vertices.
    """
    amax = np.abs(detj).max(axis=1)
    typical = float(np.median(amax))
    if typical == 0.0:
        typical = float(amax.max())
    degenerate = amax <= 1e-14 * typical
    tangled = (detj.min(axis=1) < 0) & (detj.max(axis=1) > 0)
    bad = np.flatnonzero(degenerate | tangled)
    if bad.size:
        e = int(bad[0])
        kind = ("degenerate (zero volume: coinciding or collinear/coplanar vertices)" if degenerate[e]
                else "tangled (det J changes sign inside it)")
        raise InvalidElementError(
            f"cell {e} (vertices {mesh.cells[e].tolist()}) is {kind}; fix or re-mesh it "
            f"(mesh.check() lists such problems) [{bad.size} bad cell(s)]", e)
    neg = int(np.sum(detj[:, 0] < 0))
    if neg:
        logger.info("%d of %d cells are negatively oriented; integrating with |det J|", neg, mesh.n_cells)


def _rule(mesh: Mesh, degree: int):
    xq, wq = cell_rule(mesh.cell_type, degree)
    N, dn = shape_functions(mesh.cell_type, xq)
    return np.ascontiguousarray(N), np.ascontiguousarray(dn), np.ascontiguousarray(wq)


def _laplace(mesh: Mesh, kappa, degree: int) -> np.ndarray:
    _, dn, w = _rule(mesh, degree)
    k = mesh.nodes_per_cell
    out = np.empty((mesh.n_cells, k, k))
    detj = np.empty((mesh.n_cells, w.size))
    _kernels.laplace_kernel(mesh.points, mesh.cells, dn, w, _per_cell(kappa, mesh, "kappa"), out, detj)
    check_jacobians(mesh, detj)
    return out


def _mass(mesh: Mesh, rho, degree: int) -> np.ndarray:
    N, dn, w = _rule(mesh, degree)
    k = mesh.nodes_per_cell
    out = np.empty((mesh.n_cells, k, k))
    detj = np.empty((mesh.n_cells, w.size))
    _kernels.mass_kernel(mesh.points, mesh.cells, N, dn, w, _per_cell(rho, mesh, "rho"), out, detj)
    check_jacobians(mesh, detj)
    return out


def p1_stiffness(mesh: Mesh, kappa=1.0) -> np.ndarray:
    """P1 stiffness matrices of ``-div(kappa grad u)`` on triangles / tetrahedra.

    ``K_e[a, b] = kappa_e |T_e| grad(lambda_a) . grad(lambda_b)`` with the
    constant barycentric gradients ``grad(lambda) = J^{-T} grad_ref``.

    Parameters
    ----------
    mesh
        Triangle or tetra mesh.
    kappa
        Scalar or (E,) per-cell conductivity (>= 0).

    Returns
    -------
    (E, d+1, d+1) ndarray
        Symmetric, rows summing to zero.
    """
    _require(mesh, _SIMPLEX, "p1_stiffness", "q1_laplace for quad/hexahedron meshes")
    return _laplace(mesh, kappa, 0)


def p1_mass(mesh: Mesh, rho=1.0) -> np.ndarray:
    """Consistent P1 mass matrices ``M_e[a, b] = rho_e int_T lambda_a lambda_b``.

    Equal to ``rho_e |T| (1 + delta_ab) / ((d + 1)(d + 2))``: ``|T|/12 (1 + delta_ab)``
    on triangles, ``|T|/20 (1 + delta_ab)`` on tetrahedra (degree-2 rule, exact).
    """
    _require(mesh, _SIMPLEX, "p1_mass", "q1_mass for quad/hexahedron meshes")
    return _mass(mesh, rho, 2)


def q1_laplace(mesh: Mesh, kappa=1.0) -> np.ndarray:
    """Q1 stiffness matrices of ``-div(kappa grad u)`` on quads / hexahedra.

    ``K_e[a, b] = kappa_e sum_q w_q |det J(xi_q)| grad N_a . grad N_b`` with
    the 2x2 (2x2x2) Gauss rule, exact for affine (parallelogram) cells.
    """
    _require(mesh, _TENSOR, "q1_laplace", "p1_stiffness for triangle/tetra meshes")
    return _laplace(mesh, kappa, 3)


def q1_mass(mesh: Mesh, rho=1.0) -> np.ndarray:
    """Consistent Q1 mass matrices ``rho_e sum_q w_q |det J| N_a N_b`` (2x2 / 2x2x2 Gauss)."""
    _require(mesh, _TENSOR, "q1_mass", "p1_mass for triangle/tetra meshes")
    return _mass(mesh, rho, 3)


def mass_matrices(mesh: Mesh, rho=1.0) -> np.ndarray:
    """Consistent mass matrices for any supported cell type (P1 or Q1)."""
    if not isinstance(mesh, Mesh):
        raise FemError(f"mass_matrices needs an adjopt.mesh.Mesh, got {type(mesh).__name__}")
    return p1_mass(mesh, rho) if mesh.cell_type in _SIMPLEX else q1_mass(mesh, rho)


def lumped_mass(mesh: Mesh, rho=1.0) -> np.ndarray:
    """Row-sum lumped mass vector ``m_i = sum_e sum_b M_e[a, b]`` (node ``i = cells[e, a]``).

    Since ``sum_b N_b = 1`` this is ``m_i = int rho N_i``; entries are positive
    for P1 and Q1 and sum to the total area / volume (times rho).

    Returns
    -------
    (N,) ndarray
    """
    local = mass_matrices(mesh, rho).sum(axis=2)
    return np.bincount(mesh.cells.ravel(), weights=local.ravel(), minlength=mesh.n_nodes)


def elasticity_matrix(dim: int, E: float = 1.0, nu: float = 0.3, plane: str = "stress") -> np.ndarray:
    """Isotropic Voigt stiffness ``D`` (engineering shear strains).

    2D plane stress: ``E / (1 - nu^2) [[1, nu, 0], [nu, 1, 0], [0, 0, (1 - nu)/2]]``;
    2D plane strain: ``[[l + 2m, l, 0], [l, l + 2m, 0], [0, 0, m]]``;
    3D (order xx, yy, zz, yz, xz, xy): ``l`` off-diagonal in the normal block,
    ``l + 2m`` on its diagonal, ``m`` for the shears, with
    ``l = E nu / ((1 + nu)(1 - 2 nu))``, ``m = E / (2 (1 + nu))``.

    Raises
    ------
    FemError
        ``nu`` outside (-1, 0.5), ``E`` not positive, unknown ``plane``.
    """
    E = float(E)
    nu = float(nu)
    if not (np.isfinite(E) and E > 0):
        raise FemError(f"Young's modulus E must be positive and finite, got {E!r}")
    if not (-1.0 < nu < 0.5):
        raise FemError(f"Poisson's ratio nu must lie in (-1, 0.5), got {nu!r}")
    lam = E * nu / ((1 + nu) * (1 - 2 * nu))
    mu = E / (2 * (1 + nu))
    if dim == 2:
        if plane == "stress":
            return E / (1 - nu**2) * np.array([[1, nu, 0], [nu, 1, 0], [0, 0, (1 - nu) / 2]])
        if plane == "strain":
            return np.array([[lam + 2 * mu, lam, 0], [lam, lam + 2 * mu, 0], [0, 0, mu]])
        raise FemError(f"plane must be 'stress' or 'strain', got {plane!r}")
    if dim == 3:
        dmat = np.zeros((6, 6))
        dmat[:3, :3] = lam
        dmat[np.arange(3), np.arange(3)] = lam + 2 * mu
        dmat[np.arange(3, 6), np.arange(3, 6)] = mu
        return dmat
    raise FemError(f"dim must be 2 or 3, got {dim!r}")


def _elasticity(mesh: Mesh, E, nu, plane: str, degree: int) -> np.ndarray:
    # split E into a unit-modulus D and a per-cell scale (E may vary per cell, e.g. SIMP)
    scale = _per_cell(E, mesh, "E")
    dmat = elasticity_matrix(mesh.dim, 1.0, nu, plane)
    _, dn, w = _rule(mesh, degree)
    kd = mesh.nodes_per_cell * mesh.dim
    out = np.empty((mesh.n_cells, kd, kd))
    detj = np.empty((mesh.n_cells, w.size))
    _kernels.elasticity_kernel(mesh.points, mesh.cells, dn, w, np.ascontiguousarray(dmat), scale, out, detj)
    check_jacobians(mesh, detj)
    return out


def q1_elasticity(mesh: Mesh, E=1.0, nu: float = 0.3, plane: str = "stress") -> np.ndarray:
    """Q1 linear-elasticity matrices ``K_e = E_e sum_q w_q |det J| B^T D(nu) B``.

    Plane stress (or ``plane="strain"``) on quads, 3D elasticity on hexahedra,
    2x2 / 2x2x2 Gauss, unit thickness. ``D(nu)`` is
    :func:`elasticity_matrix` with ``E = 1``; ``E`` is a scalar or (E,) per
    cell. Dofs node-major, see :func:`adjopt.fem.vector_dofs`.

    Returns
    -------
    (E, 4*2, 4*2) or (E, 8*3, 8*3) ndarray
    """
    _require(mesh, _TENSOR, "q1_elasticity", "p1_elasticity for triangle/tetra meshes")
    return _elasticity(mesh, E, nu, plane, 3)


def p1_elasticity(mesh: Mesh, E=1.0, nu: float = 0.3, plane: str = "stress") -> np.ndarray:
    """P1 (constant strain) elasticity matrices ``K_e = E_e |T| B^T D(nu) B``.

    Plane stress (or ``plane="strain"``) on triangles, 3D on tetrahedra.

    Returns
    -------
    (E, 3*2, 3*2) or (E, 4*3, 4*3) ndarray
    """
    _require(mesh, _SIMPLEX, "p1_elasticity", "q1_elasticity for quad/hexahedron meshes")
    return _elasticity(mesh, E, nu, plane, 0)


def advection_diffusion(mesh: Mesh, velocity, diffusion, stabilization: str = "supg",
                        return_tau: bool = False):
    """P1 local matrices of ``-div(kappa grad u) + b . grad u`` (nonsymmetric).

    Row ``a`` is the test function, column ``b`` the trial function:

    ``K_e[a, b] = |T| (kappa G_a . G_b + (b . G_b) / (d + 1) + tau (b . G_a)(b . G_b))``

    where ``G_a = grad(lambda_a)`` and ``int_T lambda_a = |T| / (d + 1)``. The
    last term is the SUPG streamline diffusion (the P1 residual has no second
    derivatives); with the standard element Peclet formula

    ``h = 2 |b| / sum_a |b . G_a|`` (element length along the flow),
    ``Pe = |b| h / (2 kappa)``, ``tau = h / (2 |b|) (coth(Pe) - 1/Pe)``

    (``tau = h / (2|b|)`` if ``kappa = 0``, ``tau = 0`` if ``b = 0``).
    In 1D on a uniform grid this gives nodally exact solutions.

    Parameters
    ----------
    mesh
        Triangle or tetra mesh.
    velocity
        (dim,) constant or (E, dim) per-cell velocity ``b``.
    diffusion
        Scalar or (E,) per-cell ``kappa >= 0``.
    stabilization
        ``"supg"`` or ``"none"`` (plain Galerkin).
    return_tau
        Also return the (E,) stabilization parameters.

    Returns
    -------
    K : (E, d+1, d+1) ndarray
    tau : (E,) ndarray, only if ``return_tau``.
    """
    _require(mesh, _SIMPLEX, "advection_diffusion", "a triangle/tetra mesh (P1 only)")
    if stabilization not in ("supg", "none"):
        raise FemError(f"stabilization must be 'supg' or 'none', got {stabilization!r}")
    vel = np.asarray(velocity, dtype=np.float64)
    if vel.shape == (mesh.dim,):
        vel = np.broadcast_to(vel, (mesh.n_cells, mesh.dim))
    elif vel.shape != (mesh.n_cells, mesh.dim):
        raise FemError(f"velocity must have shape ({mesh.dim},) or ({mesh.n_cells}, {mesh.dim}) "
                       f"(constant or one vector per cell), got {vel.shape}")
    if not np.all(np.isfinite(vel)):
        raise FemError("velocity contains NaN or Inf")
    vel = np.ascontiguousarray(vel)
    kappa = _per_cell(diffusion, mesh, "diffusion")
    _, dn, _w = _rule(mesh, 0)
    k = mesh.nodes_per_cell
    out = np.empty((mesh.n_cells, k, k))
    detj = np.empty((mesh.n_cells, 1))
    tau = np.empty(mesh.n_cells)
    _kernels.advection_diffusion_kernel(mesh.points, mesh.cells, dn, CELLS[mesh.cell_type].ref_volume,
                                        vel, kappa, stabilization == "supg", out, detj, tau)
    check_jacobians(mesh, detj)
    return (out, tau) if return_tau else out


def _p1_gradients(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric gradients (E, d+1, d) and |T| (E,) of a simplex mesh (vectorised numpy)."""
    xe = mesh.points[mesh.cells]
    J = np.swapaxes(xe[:, 1:, :] - xe[:, :1, :], 1, 2)  # columns x_i - x_0
    d = mesh.dim
    ref = np.hstack([-np.ones((d, 1)), np.eye(d)])  # (d, d+1) reference gradients
    grad = np.linalg.solve(np.swapaxes(J, 1, 2), np.broadcast_to(ref, (mesh.n_cells, d, d + 1)))
    vol = np.abs(np.linalg.det(J)) * CELLS[mesh.cell_type].ref_volume
    return np.swapaxes(grad, 1, 2), vol


def advection_diffusion_load(mesh: Mesh, velocity, diffusion, f, stabilization: str = "supg") -> np.ndarray:
    """Load vector matching :func:`advection_diffusion`: ``b_i = int f (N_i + tau b . grad N_i)``.

    The SUPG test function makes the right-hand side carry the streamline
    term too (without it SUPG is inconsistent and loses accuracy). With ``f``
    a scalar or (N,) nodal values (P1 interpolant):
    ``int_T f N_a = (M_T f)_a`` and ``int_T f tau (b . G_a) = tau (b . G_a) |T| mean_T(f)``.

    Returns
    -------
    (N,) ndarray
    """
    _require(mesh, _SIMPLEX, "advection_diffusion_load", "a triangle/tetra mesh (P1 only)")
    _, tau = advection_diffusion(mesh, velocity, diffusion, stabilization, return_tau=True)
    fv = np.asarray(f, dtype=np.float64)
    if fv.ndim == 0:
        fv = np.full(mesh.n_nodes, float(fv))
    if fv.shape != (mesh.n_nodes,):
        raise FemError(f"f must be a scalar or ({mesh.n_nodes},) nodal values, got shape {fv.shape}")
    if not np.all(np.isfinite(fv)):
        raise FemError("f contains NaN or Inf")
    fe = fv[mesh.cells]
    local = np.einsum("eab,eb->ea", _mass(mesh, 1.0, 2), fe)
    if np.any(tau):
        grad, vol = _p1_gradients(mesh)
        vel = np.broadcast_to(np.asarray(velocity, dtype=np.float64), (mesh.n_cells, mesh.dim))
        bg = np.einsum("ead,ed->ea", grad, vel)
        local += (tau * vol * fe.mean(axis=1))[:, None] * bg
    return np.bincount(mesh.cells.ravel(), weights=local.ravel(), minlength=mesh.n_nodes)
