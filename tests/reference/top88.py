"""Plain numpy/scipy reference port of the 88-line MATLAB topology optimizer.

Source
------
E. Andreassen, A. Clausen, M. Schevenels, B. S. Lazarov and O. Sigmund,
"Efficient topology optimization in MATLAB using 88 lines of code",
Struct. Multidisc. Optim. 43 (2011) 1-16, doi:10.1007/s00158-010-0594-7.
The code listing is the paper's Appendix ("top88.m"); the docstrings below
name the listing's ``%%`` sections and quote the MATLAB statements ported.

This module is an independent reference used only by the test-suite; it
deliberately does not import anything from ``adjopt``.

Conventions (identical to the paper)
------------------------------------
* Elements and nodes are numbered column-major (MATLAB ``(:)`` order): the
  element in row ``j`` (``y``, counted from the top) and column ``i`` (``x``)
  has 0-based index ``e = i*nely + j``; node ``(j, i)`` of the
  ``(nely+1) x (nelx+1)`` node grid has index ``n = i*(nely+1) + j``.
  Node ``n`` owns dofs ``2n`` (x) and ``2n+1`` (y) (0-based; the paper's
  ``2n-1``, ``2n`` in 1-based numbering).
* Density arrays returned to the caller have shape ``(nely, nelx)``, i.e.
  the paper's layout; internally flat vectors are column-major
  (``x.ravel(order="F")``).
* Half MBB beam (section "DEFINE LOADS AND SUPPORTS (HALF MBB-BEAM)"): ``F(2) = -1`` (downward load at the
  top-left node, 0-based dof 1), fixed dofs are the x-dofs of the left edge
  (``1:2:2*(nely+1)``) and the y-dof of the bottom-right node
  (``2*(nelx+1)*(nely+1)``).
* Material (section "MATERIAL PROPERTIES"): ``E0 = 1``, ``Emin = 1e-9``, ``nu = 0.3``,
  modified SIMP ``E(x) = Emin + x**penal * (E0 - Emin)``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = ["element_stiffness", "density_filter", "top88"]

E0 = 1.0
EMIN = 1e-9


def element_stiffness(nu: float = 0.3) -> np.ndarray:
    """8x8 bilinear (Q1) plane-stress element stiffness for unit E, unit size.

    Section "PREPARE FINITE ELEMENT ANALYSIS" of the listing::

        A11 = [12  3 -6 -3;  3 12  3  0; -6  3 12 -3; -3  0 -3 12];
        A12 = [-6 -3  0  3; -3 -6 -3 -6;  0 -3 -6  3;  3 -6  3 -6];
        B11 = [-4  3 -2  9;  3 -4 -9  4; -2 -9 -4 -3;  9  4 -3 -4];
        B12 = [ 2 -3  4 -9; -3  2  9 -2;  4  9  2  3; -9 -2  3  2];
        KE = 1/(1-nu^2)/24*([A11 A12;A12' A11]+nu*[B11 B12;B12' B11]);

    Local dof order is that of ``edofMat``: lower-left,
    lower-right, upper-right, upper-left node, (x, y) for each.
    """
    A11 = np.array([[12, 3, -6, -3], [3, 12, 3, 0], [-6, 3, 12, -3], [-3, 0, -3, 12]], float)
    A12 = np.array([[-6, -3, 0, 3], [-3, -6, -3, -6], [0, -3, -6, 3], [3, -6, 3, -6]], float)
    B11 = np.array([[-4, 3, -2, 9], [3, -4, -9, 4], [-2, -9, -4, -3], [9, 4, -3, -4]], float)
    B12 = np.array([[2, -3, 4, -9], [-3, 2, 9, -2], [4, 9, 2, 3], [-9, -2, 3, 2]], float)
    A = np.block([[A11, A12], [A12.T, A11]])
    B = np.block([[B11, B12], [B12.T, B11]])
    return 1.0 / (1.0 - nu**2) / 24.0 * (A + nu * B)


def _edof_mat(nelx: int, nely: int) -> np.ndarray:
    """0-based element-to-dof map (section "PREPARE FINITE ELEMENT ANALYSIS").

    ``nodenrs = reshape(1:(1+nelx)*(1+nely),1+nely,1+nelx)``,
    ``edofVec = reshape(2*nodenrs(1:end-1,1:end-1)+1,nelx*nely,1)`` and
    ``edofMat = edofVec + [0 1 2*nely+[2 3 0 1] -2 -1]``.
    In 0-based numbering ``edofVec`` becomes ``2*nodenrs0 + 2`` (the x-dof of
    the element's lower-left node).
    """
    nodenrs = np.arange((nelx + 1) * (nely + 1)).reshape(nely + 1, nelx + 1, order="F")
    edofvec = (2 * nodenrs[:-1, :-1] + 2).ravel(order="F")
    offs = np.array([0, 1, 2 * nely + 2, 2 * nely + 3, 2 * nely + 0, 2 * nely + 1, -2, -1])
    return edofvec[:, None] + offs[None, :]


def density_filter(nelx: int, nely: int, rmin: float):
    """Cone-weight filter matrix ``H`` and its row sums ``Hs``.

    Section "PREPARE FILTER" of the listing:
    ``H(e1, e2) = max(0, rmin - dist(e1, e2))`` for elements whose column and
    row indices differ by at most ``ceil(rmin)-1``; ``Hs = sum(H, 2)``.
    The paper's four nested loops are replaced by one vectorised pass per
    neighbour offset (zero weights are dropped, as MATLAB's ``sparse`` does).

    Returns ``(H, Hs)`` with ``H`` an ``(n, n)`` CSR matrix, ``n = nelx*nely``
    in column-major element order, and ``Hs`` a 1-D array of length ``n``.
    The normalised filter is ``diag(1/Hs) @ H`` (rows sum to one).
    """
    r = int(math.ceil(rmin)) - 1
    ii, jj = np.meshgrid(np.arange(nelx), np.arange(nely), indexing="ij")  # column, row
    ii = ii.ravel()
    jj = jj.ravel()
    rows, cols, vals = [], [], []
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            w = max(0.0, rmin - math.sqrt(di * di + dj * dj))
            if w <= 0.0:
                continue
            i2 = ii + di
            j2 = jj + dj
            ok = (i2 >= 0) & (i2 < nelx) & (j2 >= 0) & (j2 < nely)
            rows.append(ii[ok] * nely + jj[ok])
            cols.append(i2[ok] * nely + j2[ok])
            vals.append(np.full(int(ok.sum()), w))
    n = nelx * nely
    H = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    Hs = np.asarray(H.sum(axis=1)).ravel()
    return H, Hs


def top88(
    nelx: int = 60,
    nely: int = 20,
    volfrac: float = 0.5,
    penal: float = 3.0,
    rmin: float = 1.5,
    ft: int = 2,
    maxiter: int = 2000,
    tolx: float = 0.01,
) -> dict:
    """Minimum-compliance half MBB beam, a line-by-line port of top88.m.

    Parameters follow the paper's call ``top88(nelx,nely,volfrac,penal,rmin,ft)``;
    ``ft=1`` is the sensitivity filter, ``ft=2`` the density filter (paper
    eq. 9 for ``xPhys`` and the chain rule eq. 10 for ``dc``/``dv``).  ``maxiter`` and
    ``tolx`` are additions: the loop runs ``while change > tolx`` (the paper
    has ``while change > 0.01``) and at most ``maxiter`` times.

    Per iteration (section "START ITERATION"):

    * ``sK = KE(:) * (Emin + xPhys(:)'.^penal*(E0-Emin))``; ``K = sparse(iK,jK,sK)``;
      ``K = (K+K')/2``; ``U(free) = K(free,free) \\ F(free)`` (here SuperLU via
      ``spsolve``).
    * ``ce = sum((U(edofMat)*KE).*U(edofMat), 2)``;
      ``c = sum((Emin + xPhys.^penal*(E0-Emin)).*ce)``;
      ``dc = -penal*(E0-Emin)*xPhys.^(penal-1).*ce``; ``dv = 1``.
    * filtering of ``dc`` (and ``dv`` for ``ft=2``), then the optimality
      criteria update ``xnew = max(0,max(x-move,min(1,min(x+move,
      x.*sqrt(-dc./dv/lmid)))))`` with ``move = 0.2`` and bisection on the
      Lagrange multiplier from ``l1 = 0``, ``l2 = 1e9`` while
      ``(l2-l1)/(l1+l2) > 1e-3``.

    Returns
    -------
    dict with
      ``x``       final physical densities ``xPhys``, shape ``(nely, nelx)``
                  (the design after the last OC update);
      ``c``       compliance of the last finite-element analysis, i.e. the
                  value the paper prints on its last iteration line (it is
                  evaluated on the design *before* the final OC update, as in
                  the paper);
      ``nit``     number of iterations (the paper's ``loop``);
      ``history`` list of the compliance of every iteration (``history[-1] == c``).
    """
    if ft not in (1, 2):
        raise ValueError("ft must be 1 (sensitivity filter) or 2 (density filter)")
    nel = nelx * nely
    ndof = 2 * (nelx + 1) * (nely + 1)

    # MATERIAL PROPERTIES / element stiffness.
    KE = element_stiffness(0.3)
    KE_col = KE.ravel(order="F")  # KE(:)

    # Connectivity and COO indices (PREPARE FINITE ELEMENT ANALYSIS).  For element e and local
    # entry k = 8*b + a (column-major KE(:) index) the paper's iK/jK give
    # iK = edofMat(e, a), jK = edofMat(e, b).
    edofMat = _edof_mat(nelx, nely)
    iK = np.tile(edofMat, (1, 8)).ravel()
    jK = np.repeat(edofMat, 8, axis=1).ravel()

    # DEFINE LOADS AND SUPPORTS (HALF MBB-BEAM), 0-based.
    F = np.zeros(ndof)
    F[1] = -1.0
    fixeddofs = np.union1d(np.arange(0, 2 * (nely + 1), 2), [ndof - 1])
    freedofs = np.setdiff1d(np.arange(ndof), fixeddofs)
    U = np.zeros(ndof)

    # PREPARE FILTER.
    H, Hs = density_filter(nelx, nely, rmin)

    # INITIALIZE ITERATION; flat column-major vectors.
    x = np.full(nel, float(volfrac))
    xPhys = x.copy()
    loop = 0
    change = 1.0
    move = 0.2
    history: list[float] = []
    c = float("nan")

    while change > tolx and loop < maxiter:
        loop += 1
        # FE-ANALYSIS.
        Ee = EMIN + xPhys**penal * (E0 - EMIN)
        sK = (KE_col[None, :] * Ee[:, None]).ravel()
        K = sp.coo_matrix((sK, (iK, jK)), shape=(ndof, ndof)).tocsc()
        K = (K + K.T) / 2
        Kff = K[freedofs, :][:, freedofs]
        U[:] = 0.0
        U[freedofs] = spla.spsolve(Kff.tocsc(), F[freedofs])

        # OBJECTIVE FUNCTION AND SENSITIVITY ANALYSIS.
        Ue = U[edofMat]
        ce = np.sum((Ue @ KE) * Ue, axis=1)
        c = float(np.sum(Ee * ce))
        dc = -penal * (E0 - EMIN) * xPhys ** (penal - 1) * ce
        dv = np.ones(nel)
        history.append(c)

        # FILTERING/MODIFICATION OF SENSITIVITIES.
        if ft == 1:
            dc = (H @ (x * dc)) / Hs / np.maximum(1e-3, x)
        else:
            dc = H @ (dc / Hs)
            dv = H @ (dv / Hs)

        # OPTIMALITY CRITERIA UPDATE (bisection on the Lagrange multiplier).
        l1, l2 = 0.0, 1e9
        while (l2 - l1) / (l1 + l2) > 1e-3:
            lmid = 0.5 * (l2 + l1)
            # -dc/dv >= 0 analytically; the clip only guards against a
            # round-off negative ce in a (near) rigid void element.
            B = np.sqrt(np.maximum(-dc / dv / lmid, 0.0))
            xnew = np.maximum(0.0, np.maximum(x - move, np.minimum(1.0, np.minimum(x + move, x * B))))
            if ft == 1:
                xPhys = xnew
            else:
                xPhys = (H @ xnew) / Hs
            if xPhys.sum() > volfrac * nel:
                l1 = lmid
            else:
                l2 = lmid
        change = float(np.max(np.abs(xnew - x)))
        x = xnew

    return {
        "x": xPhys.reshape(nely, nelx, order="F"),
        "c": c,
        "nit": loop,
        "history": history,
    }


if __name__ == "__main__":  # pragma: no cover
    import time

    for _ft in (1, 2):
        _t0 = time.perf_counter()
        _res = top88(60, 20, 0.5, 3.0, 1.5, ft=_ft)
        _dt = time.perf_counter() - _t0
        print(
            f"ft={_ft}: c={_res['c']!r} nit={_res['nit']} "
            f"vol={_res['x'].mean():.6f} time={_dt:.2f}s"
        )


def top88_extended(
    case: str = "cantilever_two_loads",
    nelx: int = 30,
    nely: int = 15,
    volfrac: float = 0.4,
    penal: float = 3.0,
    rmin: float = 1.5,
    projection: bool = False,
    beta: float = 1.0,
    eta: float = 0.5,
    beta_max: float = 32.0,
    beta_every: int = 50,
    maxiter: int = 2000,
    tolx: float = 0.01,
) -> dict:
    """The 88-line loop (density filter) with the extensions of the paper's section 5 and a projection.

    Cases (the paper's conventions: column-major elements from the top, y-dofs positive upwards):

    * ``"cantilever_two_loads"`` (section 5.2, multiple load cases): left edge clamped
      (``fixeddofs = 1:2*(nely+1)``), ``F(:,1)`` = +1 on the y-dof of the bottom-right node,
      ``F(:,2)`` = -1 on the y-dof of the top-right node; ``c`` and ``dc`` summed over the two
      solutions.
    * ``"cantilever_hole"`` (section 5.3, passive elements): left edge clamped, -1 on the y-dof of
      the right-edge node ``nely // 2`` elements above the bottom, passive void elements whose
      centre lies strictly within ``nely/3`` of ``(nelx/3, nely/2)``. (The paper measures from the
      1-based element indices, half an element off the centres.) ``x = 0`` there, ``xPhys = 0``
      after the filter (and the projection), ``xnew = 0`` there in the update.

    ``projection=True`` adds the smoothed Heaviside projection of Wang, Lazarov and Sigmund (2011),
    ``xPhys = (tanh(beta eta) + tanh(beta (xTilde - eta))) / (tanh(beta eta) + tanh(beta (1 - eta)))``,
    with the continuation of the paper's Heaviside variant: after an update, if ``beta < beta_max``
    and (``loopbeta >= beta_every`` or ``change <= tolx``), then ``beta = min(2 beta, beta_max)``,
    ``loopbeta = 0``, ``change = 1``. Two deliberate departures from the listing, so that the loop
    states the problem as a reduced functional of x does: ``xPhys`` is the filtered (and projected)
    ``x`` from the start and again right after ``beta`` changes (the listing keeps the previous
    ``xPhys``), and the OC update divides ``dv`` by its mean (a rescaled multiplier; the bisection
    then visits the same multipliers whatever the scale of ``dv``).

    Returns ``x`` (final xPhys, shape (nely, nelx)), ``history`` (compliance of every FE analysis),
    ``betas`` (the beta of every FE analysis), ``nit``.
    """
    if case not in ("cantilever_two_loads", "cantilever_hole"):
        raise ValueError(f"unknown case {case!r}")
    nel = nelx * nely
    ndof = 2 * (nelx + 1) * (nely + 1)
    KE = element_stiffness(0.3)
    KE_col = KE.ravel(order="F")
    edofMat = _edof_mat(nelx, nely)
    iK = np.tile(edofMat, (1, 8)).ravel()
    jK = np.repeat(edofMat, 8, axis=1).ravel()

    def ydof(i, j):  # column i (x), row j from the top
        return 2 * (i * (nely + 1) + j) + 1

    passive = np.zeros(nel, dtype=bool)
    if case == "cantilever_two_loads":
        F = np.zeros((ndof, 2))
        F[ydof(nelx, nely), 0] = 1.0
        F[ydof(nelx, 0), 1] = -1.0
    else:
        F = np.zeros((ndof, 1))
        F[ydof(nelx, nely - nely // 2), 0] = -1.0
        ii, jj = np.meshgrid(np.arange(nelx), np.arange(nely), indexing="ij")  # column-major element order
        cx, cy = ii.ravel() + 0.5, (nely - 1 - jj.ravel()) + 0.5  # centres, y up
        passive = np.hypot(cx - nelx / 3.0, cy - nely / 2.0) < nely / 3.0
    fixeddofs = np.arange(2 * (nely + 1))
    freedofs = np.setdiff1d(np.arange(ndof), fixeddofs)
    H, Hs = density_filter(nelx, nely, rmin)

    def physical(x, beta):
        xt = (H @ x) / Hs
        if projection:
            den = math.tanh(beta * eta) + math.tanh(beta * (1 - eta))
            xp = (math.tanh(beta * eta) + np.tanh(beta * (xt - eta))) / den
            dxp = beta * (1 - np.tanh(beta * (xt - eta)) ** 2) / den
        else:
            xp, dxp = xt, np.ones(nel)
        xp = np.where(passive, 0.0, xp)
        dxp = np.where(passive, 0.0, dxp)
        return xp, dxp

    x = np.where(passive, 0.0, float(volfrac))
    xPhys, dx = physical(x, beta)
    loop, loopbeta, change, move = 0, 0, 1.0, 0.2
    history, betas = [], []
    while change > tolx and loop < maxiter:
        loop += 1
        loopbeta += 1
        Ee = EMIN + xPhys**penal * (E0 - EMIN)
        K = sp.coo_matrix(((KE_col[None, :] * Ee[:, None]).ravel(), (iK, jK)), shape=(ndof, ndof)).tocsc()
        K = (K + K.T) / 2
        U = np.zeros_like(F)
        U[freedofs] = spla.splu(K[freedofs, :][:, freedofs].tocsc()).solve(F[freedofs])
        ce = np.zeros(nel)
        for k in range(F.shape[1]):
            Ue = U[edofMat, k]
            ce += np.sum((Ue @ KE) * Ue, axis=1)
        history.append(float(np.sum(Ee * ce)))
        betas.append(beta)
        dc = -penal * (E0 - EMIN) * xPhys ** (penal - 1) * ce
        # chain rule through the passive override, the projection and the filter
        dc = H @ (dx * dc / Hs)
        dv = H @ (dx / Hs)
        active = ~passive
        dv_n = dv / np.mean(dv[active])
        l1, l2 = 0.0, 1e9
        while (l2 - l1) / (l1 + l2) > 1e-3:
            lmid = 0.5 * (l2 + l1)
            B = np.sqrt(np.maximum(-dc[active] / dv_n[active] / lmid, 0.0))
            xa = x[active]
            xnew = x.copy()
            xnew[active] = np.maximum(0.0, np.maximum(xa - move, np.minimum(1.0, np.minimum(xa + move, xa * B))))
            xPhys, dx = physical(xnew, beta)
            if xPhys.sum() > volfrac * nel:
                l1 = lmid
            else:
                l2 = lmid
        change = float(np.max(np.abs(xnew - x)))
        x = xnew
        if projection and beta < beta_max and (loopbeta >= beta_every or change <= tolx):
            beta = min(2.0 * beta, beta_max)
            loopbeta = 0
            change = 1.0
            xPhys, dx = physical(x, beta)
    return {"x": xPhys.reshape(nely, nelx, order="F"), "history": history, "betas": betas, "nit": loop}
