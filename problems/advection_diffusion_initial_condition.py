"""Recover the initial condition of an advection-diffusion equation from later sensor readings.

The classic test problem of hIPPYlib's uncertainty-quantification tutorial
(the initial-condition inversion for advection-diffusion): a concentration
released at t = 0 is carried by a flow and diffuses; a grid of sensors
records it at a few later times, and the release u(0) = p is to be found:

    du/dt - kappa Laplace u + v . grad u = 0   in Omega = (0, 1)^2,  0 < t <= T,
    u = 0 on the boundary,      u(0) = p  (unknown).

Discretisation
--------------
* P1 triangles (``unit_square(n)``); the state lives on the free (interior)
  nodes, the boundary dofs are condensed out (u = 0 there).
* A: the SUPG advection-diffusion operator of :func:`adjopt.fem.advection_diffusion`
  (the same kernels as :mod:`advection_diffusion_source`), restricted to the
  free dofs,

      A_ij = sum_T int_T kappa grad N_j . grad N_i + (v . grad N_j) N_i + tau_T (v . grad N_j)(v . grad N_i),

  nonsymmetric, so every adjoint and second-adjoint step is a real
  transposed solve. A does not depend on p.
* M: the plain P1 mass matrix (free dofs). SUPG is *not* fully consistent
  here: consistent SUPG would test du/dt with N_i + tau v . grad N_i as well
  (a nonsymmetric mass M_ij + tau int N_j v . grad N_i). With the plain mass
  the streamline term of A acts as an extra streamline diffusion tau |v|^2
  (an O(h) consistency error; tau |v|^2 is at most 0.74 kappa at the default
  n = 64, kappa = 0.005, speed 1). The data are made with the same discrete
  model.
* Velocity: a single closed vortex, v = speed * curl psi_h with psi_h the P1
  interpolant of psi = sin(pi x) sin(pi y) / pi, i.e. one constant vector
  per cell, v_T = speed * (d psi_h/dy, -d psi_h/dx). It is exactly
  divergence-free (the normal component is continuous across edges) and
  tangential on the boundary (psi_h = 0 there), so sum_T |T| v_T . grad N_a = 0
  for every node a: the Galerkin advection term neither creates nor
  destroys mass. |v| <= speed (the maximum is at the middle of the sides);
  near the centre the flow turns at pi * speed radians per unit time.
* Time: Crank-Nicolson (default; ``"bdf2"`` or ``"implicit_euler"`` too)
  with ``n_steps`` steps of dt = t_end / n_steps; A and M are constant, so
  one factorization of M + dt/2 A serves every forward, adjoint, tangent and
  second-adjoint solve.
* Parameters p: the nodal initial condition, u_0 = P p with P the rows of
  the identity at the free nodes (``AffineVector(None, P)``). p holds a
  value for *all* N mesh nodes, like the source of
  :mod:`advection_diffusion_source`, so that ``adjopt run`` draws the
  recovered field and the truth on the mesh (its results writer places a
  parameter only when it has one value per node or per cell). The boundary
  values of p do not enter the state (u = 0 there); a decoupled penalty in R
  holds them at 0, so the problem is the one on the free dofs alone (u(0)
  in H^1_0).

Data and objective
------------------
* True initial condition (hIPPYlib's): p_true = min(0.5, exp(-100 |x - (0.35, 0.7)|^2)),
  a blob with a flat top.
* ``sensors`` x ``sensors`` sensors at x_i, y_j = i / (sensors + 1) observe
  the P1 field (B = :func:`adjopt.fem.observation_operator`) at the times
  ``obs_times`` (each must be a time level). Data: d_i = B u(t_i; p_true) +
  sigma eps_i, sigma = noise * max |B u(t_i; p_true)|, eps ~ N(0, 1) from
  ``np.random.default_rng(seed)``.
* The negative log-posterior of a bi-Laplacian prior (mean 0; hIPPYlib's
  gamma = 1, delta = 8 are the defaults):

      J(p) = sum_i 0.5 / sigma^2 |B u(t_i) - d_i|^2  +  0.5 p^T R p,
      R = P^T A_0 M_L^{-1} A_0 P + D_b,     A_0 = gamma K + delta M  (free dofs),

  with K, M the P1 stiffness and mass, M_L the lumped mass: 0.5 p^T R p =
  0.5 |A_0 p|^2_{M_L^{-1}}, the squared L2 norm of (-gamma Laplace + delta)
  p with homogeneous Dirichlet conditions (hIPPYlib's prior has Robin
  conditions and mean 0.25). D_b is diagonal on the boundary nodes (the
  diagonal there of the same operator with natural boundary conditions).

J is quadratic in p: u is linear in p, and the Hessian H = sum_i (B S_i P)^T
(B S_i P) / sigma^2 + R (S_i the march to t_i) is the posterior precision;
it does not depend on p (A and M do not either, so the Gauss-Newton Hessian
is the Hessian). Newton-CG solves it: CG on H is exact. :func:`solve` takes
one Newton step whose CG, preconditioned by R (prior-preconditioned CG, as
hIPPYlib does), runs to a relative residual of 1e-10; ``adjopt run`` uses
the named ``"h1"`` preconditioner (K + M, ``RUN_DEFAULTS``), which needs
about twice the Hessian actions.

Measured at the defaults (n = 64: 4225 parameters, 3969 free dofs; 100 CN
steps, 7 x 7 sensors at t = 0.25, 0.5, 1, 1 % noise) on 2 cores shared with
other jobs: value 0.07-0.15 s, gradient 0.06-0.11 s, a Hessian action
0.12-0.2 s (100 tangent and 100 second-adjoint solves; the adjoints of the
gradient are kept), one factorization for everything. :func:`solve`: 97
Hessian actions, 11-20 s; ``adjopt run``: 5 Newton steps, 226 Hessian
actions, 26-46 s. The minimizer has J = 216.38 and a relative L2 error of
0.182 against p_true: the blob is found where it was released, with its
size; the flat top comes out as a peak (max 0.57) and the flank smoothed,
with ripples of +-0.06 around it. J(0), |grad J(0)| and the errors at
smaller sizes are pinned in
tests/gallery/test_advection_diffusion_initial_condition.py.

Run ``python problems/advection_diffusion_initial_condition.py --help``:
derivative checks, the reconstruction, and a picture of the truth, the
recovered initial condition and the states at the observation times.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.fem.elements import _p1_gradients
from adjopt.optimize import OptimizationError
from adjopt.transient import TimeSeriesMisfit, TimeStepping, TransientReducedFunctional
from adjopt.verify import derivative_report

#: how ``adjopt run advection_diffusion_initial_condition`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", preconditioner="h1", eta_max=0.1, gtol=1e-6)
#: centre, sharpness and cap of the true initial condition min(CAP, exp(-SHARPNESS |x - CENTER|^2))
CENTER = (0.35, 0.7)
SHARPNESS = 100.0
CAP = 0.5
#: the time-stepping schemes offered (those of adjopt.transient that need no extra option)
SCHEMES = ("crank_nicolson", "bdf2", "implicit_euler")


def true_initial_condition(points: np.ndarray) -> np.ndarray:
    """p_true = min(0.5, exp(-100 |x - (0.35, 0.7)|^2)) at ``points`` (N, 2) (hIPPYlib's)."""
    x = np.asarray(points, dtype=np.float64)
    r2 = (x[:, 0] - CENTER[0]) ** 2 + (x[:, 1] - CENTER[1]) ** 2
    return np.minimum(CAP, np.exp(-SHARPNESS * r2))


def velocity_field(msh, speed: float = 1.0) -> np.ndarray:
    """(E, 2) per-cell velocity speed * curl psi_h, psi_h the P1 interpolant of sin(pi x) sin(pi y) / pi.

    Exactly divergence-free and tangential on the boundary of the unit square (module docstring)."""
    pts = msh.points
    psi = np.sin(np.pi * pts[:, 0]) * np.sin(np.pi * pts[:, 1]) / np.pi
    grad, _ = _p1_gradients(msh)
    g = np.einsum("ead,ea->ed", grad, psi[msh.cells])  # grad psi_h, constant per cell
    return float(speed) * np.column_stack([g[:, 1], -g[:, 0]])


def sensor_grid(k: int) -> np.ndarray:
    """(k^2, 2) sensor positions i / (k + 1), i, j = 1..k."""
    x = np.arange(1, k + 1) / (k + 1)
    X, Y = np.meshgrid(x, x, indexing="xy")
    return np.column_stack([X.ravel(), Y.ravel()])


def regularization_matrix(msh, dofs, gamma: float, delta: float) -> sp.csr_array:
    """R on all N nodes: P^T A_0 M_L^{-1} A_0 P (A_0 = gamma K + delta M on the free nodes, homogeneous Dirichlet
    conditions: the bi-Laplacian prior's precision) plus a diagonal penalty D_b on the boundary nodes (the
    diagonal there of the same operator with natural boundary conditions), which holds them at 0."""
    N, free, fixed = msh.n_nodes, dofs.free, dofs.fixed
    K = fem.assemble(msh.cells, fem.p1_stiffness(msh), N)
    M = fem.assemble(msh.cells, fem.p1_mass(msh), N)
    AR = sp.csr_array(gamma * K + delta * M)
    inv_lumped = sp.diags_array(1.0 / np.asarray(M.sum(axis=1)).ravel())
    A0 = AR[free][:, free]
    R0 = A0 @ inv_lumped.tocsr()[free][:, free] @ A0
    P = sp.csr_array((np.ones(free.size), (np.arange(free.size), free)), shape=(free.size, N))
    Db = sp.csr_array((sp.csr_array(AR @ inv_lumped @ AR).diagonal()[fixed], (fixed, fixed)), shape=(N, N))
    R = sp.csr_array(P.T @ R0 @ P + Db)
    return sp.csr_array(0.5 * (R + R.T))  # symmetric to the last bit


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(value, name: str, positive: bool = True) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and np.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return float(value)


def build(n: int = 64, kappa: float = 0.005, speed: float = 1.0, t_end: float = 1.0, n_steps: int = 100,
          scheme: str = "crank_nicolson", obs_times=(0.25, 0.5, 1.0), sensors: int = 7, noise: float = 0.01,
          gamma: float = 1.0, delta: float = 8.0, seed: int = 0, solver: str = "auto") -> adjopt.Problem:
    """The initial-condition inversion on an n x n triangle mesh (see the module docstring).

    Parameters
    ----------
    n
        Cells per side (>= 2).
    kappa
        Diffusion (> 0).
    speed
        Maximum speed of the vortex (>= 0).
    t_end, n_steps, scheme
        Final time, number of (constant) time steps, and the scheme (``SCHEMES``).
    obs_times
        The observation times (each in (0, t_end] and a time level of the grid).
    sensors
        k: a k x k grid of sensors.
    noise
        Noise level relative to max |clean data| (>= 0; 0 gives sigma = 1 and no noise).
    gamma, delta
        The bi-Laplacian regularization A_R = gamma K + delta M (> 0 both).
    seed
        Seed of the noise.
    solver
        The linear solver of the time steps (``"auto"``, ``"superlu"``, ...).

    Raises
    ------
    ValueError
        An option out of range (the message names it), an observation time that is not a time level.
    """
    n = _count(n, "n", 2)
    kappa = _number(kappa, "kappa")
    speed = _number(speed, "speed", positive=False)
    t_end = _number(t_end, "t_end")
    n_steps = _count(n_steps, "n_steps", 1)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    sensors = _count(sensors, "sensors", 1)
    noise = _number(noise, "noise", positive=False)
    gamma, delta = _number(gamma, "gamma"), _number(delta, "delta")
    seed = _count(seed, "seed", 0)
    times = np.atleast_1d(np.asarray(obs_times, dtype=np.float64))
    if times.ndim != 1 or times.size == 0 or not np.all(np.isfinite(times)):
        raise ValueError(f"obs_times must be one or more finite times, got {obs_times!r}")
    if np.any(times <= 0) or np.any(times > t_end * (1 + 1e-12)):
        raise ValueError(f"obs_times must lie in (0, t_end = {t_end:g}], got {times.tolist()}")

    msh = meshes.unit_square(n, cell="triangle")
    N = msh.n_nodes
    dofs = fem.condense(N, msh.boundary("all"))
    free = dofs.free
    velocity = velocity_field(msh, speed)
    A = sp.csr_array(fem.assemble(msh.cells, fem.advection_diffusion(msh, velocity, kappa), N)[free][:, free])
    mass = fem.assemble(msh.cells, fem.p1_mass(msh), N)
    stiffness = fem.assemble(msh.cells, fem.p1_stiffness(msh), N)
    M = sp.csr_array(mass[free][:, free])
    time = TimeStepping(scheme, dt=t_end / n_steps, n_steps=n_steps)
    try:
        steps = np.array([time.level(float(t)) for t in times], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"obs_times: {exc} (dt = t_end / n_steps = {t_end / n_steps:g})") from None
    if np.unique(steps).size != steps.size:
        raise ValueError(f"obs_times must be distinct, got {times.tolist()}")
    P = sp.csr_array((np.ones(free.size), (np.arange(free.size), free)), shape=(free.size, N))
    u0 = adjopt.AffineVector(None, P)  # u_0 = p at the free nodes
    pts = sensor_grid(sensors)
    B = fem.observation_operator(msh, pts)[:, free]

    p_true = true_initial_condition(msh.points)
    truth = TransientReducedFunctional(A, M, None, time, u0=u0, solver=solver)
    U = truth.states(p_true)[steps]
    clean = np.asarray((B @ U.T).T)
    rng = np.random.default_rng(seed)
    sigma = noise * float(np.abs(clean).max())
    if not sigma > 0:
        sigma = 1.0
    data = clean + noise * float(np.abs(clean).max()) * rng.standard_normal(clean.shape)

    misfit = TimeSeriesMisfit(data, steps, B=B, W=np.full(B.shape[0], sigma**-2))
    R = regularization_matrix(msh, dofs, gamma, delta)
    J = TransientReducedFunctional(A, M, [misfit, adjopt.TikhonovL2(R)], time, u0=u0, solver=solver)
    options = dict(n=n, kappa=kappa, speed=speed, t_end=t_end, n_steps=n_steps, scheme=scheme,
                   obs_times=tuple(times.tolist()), sensors=sensors, noise=noise, gamma=gamma, delta=delta, seed=seed,
                   solver=solver)
    meta = dict(mesh=msh, dofs=dofs, p_true=p_true, velocity=velocity, kappa=kappa, time=time, steps=steps,
                observation_points=pts, observation_operator=B, data=data, data_clean=clean, sigma=sigma,
                regularization=R, initial_map=P,
                labels={"parameter": "initial condition p = u(0)", "state": f"concentration u at t = {t_end:g}"},
                options=options)
    return adjopt.Problem(J, np.zeros(N), name="advection_diffusion_initial_condition", mass=mass,
                          stiffness=stiffness, meta=meta)


def solve(problem: adjopt.Problem, method: str = "newton-cg", gtol: float = 1e-8, **options) -> np.ndarray:
    """The minimizer of J from p0, to ``gtol`` (relative stationarity); further ``options`` go to
    ``adjopt.minimize``.

    J is quadratic, so the default is one Newton step whose CG is preconditioned by the regularization R
    (prior-preconditioned CG) and solved to ``eta_max = 1e-10``: at the defaults 97 CG iterations (Hessian
    actions), against 226 for ``adjopt run``'s ``preconditioner="h1"`` with Eisenstat-Walker forcing.

    Raises :class:`adjopt.optimize.OptimizationError` when the method stops without meeting the tolerance.
    """
    if method in ("newton-cg", "newton-tr"):
        options.setdefault("preconditioner", problem.meta["regularization"])
        options.setdefault("eta_max", 1e-10)
        options.setdefault("cg_maxiter", 1000)
    result = adjopt.minimize(problem, method=method, gtol=gtol, **options)
    if not result.success:
        raise OptimizationError(f"{method} did not reach gtol = {gtol:g}: {result.message}")
    return result.x


def relative_error(problem: adjopt.Problem, p) -> float:
    """||p - p_true||_M / ||p_true||_M (L2 on the whole square; 1 for p = 0)."""
    M, e = problem.mass, np.asarray(p, dtype=np.float64) - problem.meta["p_true"]
    pt = problem.meta["p_true"]
    return float(np.sqrt(e @ (M @ e) / (pt @ (M @ pt))))


def plot(problem: adjopt.Problem, p, path) -> None:
    """One PNG: the true initial condition and its states at the observation times (top row, sensors marked),
    the recovered initial condition ``p`` and its states (bottom row), on a common color scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.tri import Triangulation

    meta = problem.meta
    msh, dofs, steps, time = meta["mesh"], meta["dofs"], meta["steps"], meta["time"]
    J = problem.functional
    rows = []
    for q in (meta["p_true"], np.asarray(p, dtype=np.float64)):
        rows.append([q] + [dofs.expand(u) for u in J.states(q)[steps]])
    lo = min(float(np.min(f)) for r in rows for f in r)
    hi = max(float(np.max(f)) for r in rows for f in r)
    tri = Triangulation(msh.points[:, 0], msh.points[:, 1], msh.cells)
    cols = len(rows[0])
    fig = Figure(figsize=(3.0 * cols + 0.8, 6.4), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    titles = [["true initial condition"], ["recovered initial condition"]]
    for t in time.times[steps]:
        titles[0].append(f"true state, t = {t:g}")
        titles[1].append(f"from the recovered p, t = {t:g}")
    obs = meta["observation_points"]
    art = None
    for i in range(2):
        for j in range(cols):
            ax = axes[i, j]
            art = ax.tripcolor(tri, rows[i][j], shading="gouraud", cmap="viridis", vmin=lo, vmax=hi)
            if j > 0:
                ax.plot(obs[:, 0], obs[:, 1], "o", ms=2.5, mfc="none", mec="w", mew=0.6)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(titles[i][j], fontsize=9)
    fig.colorbar(art, ax=axes, shrink=0.8, aspect=30, label="u")
    opts = meta["options"]
    fig.suptitle(f"advection_diffusion_initial_condition (n = {opts['n']}, {opts['n_steps']} {opts['scheme']} steps, "
                 f"kappa = {opts['kappa']:g}; relative L2 error {relative_error(problem, p):.3f}; o: sensors)",
                 fontsize=10)
    FigureCanvasAgg(fig).print_png(str(path))


def main(argv=None) -> None:
    import argparse
    import time as clock

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="cells per side (default 64)")
    ap.add_argument("--n-steps", type=int, default=100, help="time steps (default 100)")
    ap.add_argument("--scheme", choices=SCHEMES, default="crank_nicolson")
    ap.add_argument("--check", action="store_true", help="Taylor tables of J at p0 (derivative_report)")
    ap.add_argument("--no-solve", action="store_true", help="skip the reconstruction")
    ap.add_argument("--plot", metavar="PNG", help="write the truth / reconstruction / snapshots picture here")
    args = ap.parse_args(argv)
    problem = build(n=args.n, n_steps=args.n_steps, scheme=args.scheme)
    J, p0 = problem.functional, problem.p0
    print(f"{problem.name}: {p0.size} parameters, {J.n} free dofs, {J.time.n_steps} steps, "
          f"{problem.meta['observation_points'].shape[0]} sensors x {problem.meta['steps'].size} times")
    v = np.random.default_rng(0).standard_normal(p0.size)
    for what, call in (("value", lambda: J.value(p0)), ("gradient", lambda: J.gradient(p0)),
                       ("hessp", lambda: J.hessp(p0, v))):
        t0 = clock.perf_counter()
        call()
        print(f"{what:9s} {clock.perf_counter() - t0:7.3f} s")
    print(f"J(0) = {J.value(p0):.12g}, J(p_true) = {J.value(problem.meta['p_true']):.12g}")
    if args.check:
        print(derivative_report(J, p0))
    if args.no_solve:
        return
    t0 = clock.perf_counter()
    p = solve(problem)
    print(f"solve: {clock.perf_counter() - t0:.1f} s, J = {J.value(p):.10g}, relative L2 error "
          f"{relative_error(problem, p):.4f}")
    if args.plot:
        plot(problem, p, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
