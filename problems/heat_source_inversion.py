"""Recover a moving heat source f(x, t) in 2D from the time series of a few point sensors.

    u_t - kappa Laplace u = f(x, t)  in the unit square,  u = 0 on the boundary,  u(0) = 0,

discretised with P1 triangles (``unit_square(n)``, the boundary dofs condensed out) and
Crank-Nicolson (``scheme``: also ``"implicit_euler"`` or ``"bdf2"``) with ``n_steps`` steps of
dt = t_end / n_steps:

    M du/dt + kappa K u = M s(t)            (M, K: P1 mass and stiffness on the free dofs)

* Parameters p: the source as a nodal field on the free dofs at ``time_nodes`` equispaced times
  t_0 = 0, ..., t_{K-1} = t_end, linear in time in between (:class:`~adjopt.transient.SpaceTimeSource`
  with B = M: b(t) = M s(t), s(t) = sum_k phi_k(t) p_k); K x (n - 1)^2 parameters (21 x 16129 =
  338709 at the defaults).
* True source (:func:`true_source`): a Gaussian blob of width 0.08 whose centre goes round the circle
  of radius 0.25 about (0.5, 0.5) once per unit of time, switched on smoothly over t in [0, 0.2]
  (sin^2). The data are made with the truth at *every* time level (a source with one node per level),
  not with its interpolant on the K nodes that the inversion uses.
* Observations: a ``sensors`` x ``sensors`` grid of points (i / (sensors + 1), j / (sensors + 1))
  (P1 interpolation, :func:`adjopt.fem.observation_operator`), read at every ``observe_every``-th step;
  data = clean + sigma N(0, 1) with sigma = noise * max|clean| (``np.random.default_rng(seed)``).
* Objective (:class:`~adjopt.transient.TimeSeriesMisfit` with time-quadrature weights dt * observe_every
  and noise weights 1 / sigma^2, plus a regularization of p):

      J(p) = sum_i dt_i 0.5 |B u_i - d_i|^2 / sigma^2 + alpha/2 sum_k w_k (p_k^T K p_k + p_k^T M p_k),

  w_k the trapezoid weights of the time nodes: alpha/2 int_0^T ||s(t)||^2_{H1} dt with the trapezoid
  rule in time, as TikhonovH1 + TikhonovL2 of the block-diagonal kron(diag(w), K) and kron(diag(w), M).
  At the truth the misfit is about n_sensors t_end / 2 (12.5; measured 14 at n = 24: the data
  see the truth at every level, p only its interpolant at the nodes).
* J is quadratic in p (A and M do not depend on p, b is linear in p): :func:`solve` runs Newton-CG
  preconditioned by the regularization (``preconditioner="h1"``: Problem.stiffness + Problem.mass =
  kron(diag(w), K + M), exactly R / alpha). Its CG count is what the data resolve: 170 Hessian
  actions at alpha = 30 at n = 24, 80 steps; 276 (7 Newton steps, 41 s) at n = 64, 100 steps; each a
  tangent and a second-order adjoint march on the single Crank-Nicolson factorization. At the defaults
  (n = 128, 200 steps, 2 cores, CHOLMOD) a value takes 0.5 s, a gradient after it 0.4 s, a Hessian
  action 0.8 s, and :func:`solve` about 4 minutes.
* alpha = 30 by default: at n = 24, 80 steps the relative L2(0, T; L2) error of the recovered source
  is 0.415 / 0.400 / 0.397 / 0.410 for alpha = 3 / 10 / 30 / 100 (misfit 8.8 / 9.3 / 10.6 / 17.4 against
  14.0 at the truth); 0.41 at n = 64, 100 steps and at the defaults. The blob is found at the right
  place and time; it comes out wider and weaker (25 sensors 1/6 apart, heat spreading sqrt(kappa t) =
  0.1 in the whole run).

``adjopt run heat_source_inversion`` optimizes it (see ``RUN_DEFAULTS``); its results folder has no
parameter.png (p is no field on the mesh; the state saved is the final one, u(t_end)). :func:`plot`
draws the recovered source next to the truth at a few times instead (scripts/make_gallery.py uses it;
``python problems/heat_source_inversion.py --solve --plot out.png``).
"""

from __future__ import annotations

import argparse
import numbers
import os
import time

import numpy as np
import scipy.sparse as sp

import adjopt
from adjopt import fem
from adjopt import mesh as meshes
from adjopt.optimize import OptimizationError
from adjopt.transient import (DEFAULT_MEMORY, SCHEMES, SpaceTimeSource, TimeSeriesMisfit, TimeStepping,
                              TransientReducedFunctional)
from adjopt.verify import derivative_report

#: how ``adjopt run heat_source_inversion`` optimizes it unless told otherwise
RUN_DEFAULTS = dict(method="newton-cg", preconditioner="h1", gtol=1e-6)
#: the true source: amplitude, width of the Gaussian, radius and period of the circle, switch-on time
AMPLITUDE = 1.0
WIDTH = 0.08
RADIUS = 0.25
PERIOD = 1.0
T_ON = 0.2
#: weight of the L2 term next to the H1 seminorm in the regularization (1: the full H1 norm)
L2_WEIGHT = 1.0


# -- the truth, the sensors, the time nodes ---------------------------------------------------------------
def switch_on(t) -> np.ndarray:
    """g(t) = sin^2(pi t / (2 T_ON)) for t < T_ON, 1 after: the truth's smooth switch-on (g(0) = g'(0) = 0)."""
    t = np.asarray(t, dtype=np.float64)
    return np.where(t < T_ON, np.sin(0.5 * np.pi * np.clip(t, 0.0, None) / T_ON) ** 2, 1.0)


def source_center(t) -> np.ndarray:
    """The centre of the true blob at time t: once round the circle of radius RADIUS about (0.5, 0.5)."""
    a = 2 * np.pi * float(t) / PERIOD
    return np.array([0.5 + RADIUS * np.cos(a), 0.5 + RADIUS * np.sin(a)])


def true_source(points: np.ndarray, t: float) -> np.ndarray:
    """f(x, t) = AMPLITUDE g(t) exp(-|x - c(t)|^2 / (2 WIDTH^2)) at ``points`` (N, 2)."""
    r2 = np.sum((np.asarray(points, dtype=np.float64)[:, :2] - source_center(t)) ** 2, axis=1)
    return AMPLITUDE * switch_on(t) * np.exp(-r2 / (2 * WIDTH**2))


def sensor_grid(k: int) -> np.ndarray:
    """(k^2, 2) sensor positions: the points (i, j) / (k + 1), i, j = 1..k."""
    x = np.arange(1, k + 1) / (k + 1)
    X, Y = np.meshgrid(x, x, indexing="xy")
    return np.column_stack([X.ravel(), Y.ravel()])


def trapezoid_weights(nodes: np.ndarray) -> np.ndarray:
    """w_k = int phi_k dt: the trapezoid weights of the time nodes (the lumped P1 mass in time)."""
    d = np.diff(nodes)
    w = np.zeros(nodes.size)
    w[:-1] += d / 2
    w[1:] += d / 2
    return w


# -- option checks --------------------------------------------------------------------------------------
def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive(value, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be a {'finite number >= 0' if allow_zero else 'positive finite number'}, "
                         f"got {value!r}")
    return float(value)


# -- the problem ----------------------------------------------------------------------------------------
def build(n: int = 128, kappa: float = 0.01, t_end: float = 1.0, n_steps: int = 200, scheme: str = "crank_nicolson",
          time_nodes: int = 21, sensors: int = 5, observe_every: int = 1, noise: float = 0.01, alpha: float = 30.0,
          seed: int = 0, solver: str = "auto", memory: int = DEFAULT_MEMORY, checkpoint_dir=None) -> adjopt.Problem:
    """The heat-source inversion as an :class:`adjopt.Problem` (see the module docstring).

    Parameters
    ----------
    n
        Cells per side of the unit square (>= 2); (n - 1)^2 free dofs.
    kappa
        Diffusivity (> 0).
    t_end, n_steps, scheme
        The time grid: ``n_steps`` steps of t_end / n_steps with ``scheme`` (default Crank-Nicolson).
    time_nodes
        K >= 2 equispaced time nodes of the source in [0, t_end]; n_params = K (n - 1)^2.
    sensors
        A ``sensors`` x ``sensors`` grid of point sensors.
    observe_every
        Read the sensors at every k-th step (k, 2k, ..., <= n_steps), with time weights k dt.
    noise
        Noise level relative to max |clean data| (0: exact data, no noise weighting).
    alpha
        Regularization weight (> 0).
    seed
        Seed of the noise.
    solver
        The linear solver of the step matrix M + dt/2 kappa K (``"auto"``, ``"cholmod"``, ``"superlu"``, ...).
    memory, checkpoint_dir
        Bytes for the states kept for the reverse marches, and a folder for checkpoints on disk
        (:class:`~adjopt.transient.TransientReducedFunctional`); a small ``memory`` recomputes states
        from checkpoints.

    Raises
    ------
    ValueError
        An option out of range (the message names it), an unknown ``scheme`` or ``solver``.
    """
    n = _int(n, "n", 2)
    kappa = _positive(kappa, "kappa")
    t_end = _positive(t_end, "t_end")
    n_steps = _int(n_steps, "n_steps", 1)
    if scheme not in SCHEMES or scheme == "theta":
        raise ValueError(f"unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(s for s in SCHEMES if s != 'theta')}")
    time_nodes = _int(time_nodes, "time_nodes", 2)
    sensors = _int(sensors, "sensors", 1)
    observe_every = _int(observe_every, "observe_every", 1)
    if observe_every > n_steps:
        raise ValueError(f"observe_every must be at most n_steps = {n_steps}, got {observe_every}")
    noise = _positive(noise, "noise", allow_zero=True)
    alpha = _positive(alpha, "alpha")
    memory = _int(memory, "memory", 0)

    msh = meshes.unit_square(n, cell="triangle")
    N = msh.n_nodes
    dofs = fem.condense(N, msh.boundary("all"))
    free = dofs.free
    K = sp.csr_array(fem.assemble(msh.cells, fem.p1_stiffness(msh), N)[free][:, free])
    M = sp.csr_array(fem.assemble(msh.cells, fem.p1_mass(msh), N)[free][:, free])
    A = kappa * K
    grid = TimeStepping(scheme, dt=t_end / n_steps, n_steps=n_steps)
    nodes = np.linspace(0.0, t_end, time_nodes)
    pts = sensor_grid(sensors)
    B = fem.observation_operator(msh, pts)[:, free]  # u = 0 on the boundary
    steps = np.arange(observe_every, n_steps + 1, observe_every)

    # synthetic data: the truth at every time level (one source node per level), marched by the same scheme
    truth = TransientReducedFunctional(A, M, None, grid, rhs=SpaceTimeSource(M, grid.times), solver=solver)
    q = np.concatenate([true_source(msh.points, t)[free] for t in grid.times])
    clean = truth.states(q)[steps] @ B.T
    rng = np.random.default_rng(seed)
    sigma = noise * float(np.abs(clean).max())
    data = clean + sigma * rng.standard_normal(clean.shape)
    sigma = sigma if sigma > 0 else 1.0

    misfit = TimeSeriesMisfit(data, steps, B=B, weights=np.full(steps.size, observe_every * t_end / n_steps),
                              W=np.full(B.shape[0], sigma**-2))
    W = sp.diags_array(trapezoid_weights(nodes))
    mass, stiffness = sp.kron(W, M, format="csr"), sp.kron(W, K, format="csr")
    reg = alpha * (adjopt.TikhonovH1(stiffness) + L2_WEIGHT * adjopt.TikhonovL2(mass))
    J = TransientReducedFunctional(A, M, [misfit, reg], grid, rhs=SpaceTimeSource(M, nodes), solver=solver,
                                   memory=memory, checkpoint_dir=checkpoint_dir)
    p_true = np.concatenate([true_source(msh.points, t)[free] for t in nodes])
    meta = dict(mesh=msh, dofs=dofs, p_true=p_true, nodes=nodes, time=grid, observation_points=pts,
                observation_operator=B, steps=steps, data=data, data_clean=clean, sigma=sigma, mass_free=M,
                stiffness_free=K, misfit=misfit, regularization=reg,
                labels={"parameter": "heat source f", "state": "temperature u at t_end"},
                options=dict(n=n, kappa=kappa, t_end=t_end, n_steps=n_steps, scheme=scheme, time_nodes=time_nodes,
                             sensors=sensors, observe_every=observe_every, noise=noise, alpha=alpha, seed=seed))
    return adjopt.Problem(J, np.zeros(J.n_params), name="heat_source_inversion", mass=mass, stiffness=stiffness,
                          meta=meta)


# -- solving and judging --------------------------------------------------------------------------------
def solve(problem: adjopt.Problem, method: str = "newton-cg", gtol: float = 1e-6, **options) -> np.ndarray:
    """The optimum by ``adjopt.minimize`` (Newton-CG preconditioned by the regularization by default; further
    ``options`` go to ``adjopt.minimize``). Raises :class:`adjopt.optimize.OptimizationError` when the method
    stops without meeting ``gtol``."""
    if method in ("newton-cg", "newton-tr"):
        options.setdefault("preconditioner", "h1")
    result = adjopt.minimize(problem, method=method, gtol=gtol, **options)
    if not result.success:
        raise OptimizationError(f"{method} did not reach gtol = {gtol:g}: {result.message}")
    return result.x


def source_error(problem: adjopt.Problem, p) -> float:
    """||s - s_true|| / ||s_true|| in L2(0, T; L2) (trapezoid in time, P1 mass in space)."""
    d = np.asarray(p, dtype=np.float64) - problem.meta["p_true"]
    t = problem.meta["p_true"]
    M = problem.mass
    return float(np.sqrt((d @ (M @ d)) / (t @ (M @ t))))


def snapshot(problem: adjopt.Problem, p, t: float) -> np.ndarray:
    """s(t) of the parameter p as a nodal field on the whole mesh (zero on the boundary)."""
    meta = problem.meta
    src = SpaceTimeSource(sp.identity(meta["dofs"].n_free, format="csr"), meta["nodes"])
    return meta["dofs"].expand(src.value(t, p))


def plot(problem: adjopt.Problem, p, path, times=None) -> str:
    """The recovered source (bottom row) and the truth (top row, on the same colour scale) at ``times``
    (default t_end / 4, t_end / 2, 3 t_end / 4, t_end), the sensors as circles, the truth's path as a
    dashed circle; a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.tri import Triangulation

    meta = problem.meta
    t_end = float(meta["nodes"][-1])
    times = [t_end * k / 4 for k in (1, 2, 3, 4)] if times is None else list(times)
    msh = meta["mesh"]
    tri = Triangulation(msh.points[:, 0], msh.points[:, 1], msh.cells)
    rows = [("truth", [snapshot(problem, meta["p_true"], t) for t in times]),
            ("recovered", [snapshot(problem, p, t) for t in times])]
    vmax = max(float(np.abs(f).max()) for _, fs in rows for f in fs) or 1.0
    fig = Figure(figsize=(3.0 * len(times) + 0.8, 6.4), layout="constrained")
    axes = fig.subplots(2, len(times), squeeze=False)
    angle = np.linspace(0, 2 * np.pi, 200)
    sensors = meta["observation_points"]
    for r, (what, fields) in enumerate(rows):
        for c, (t, f) in enumerate(zip(times, fields)):
            ax = axes[r, c]
            art = ax.tripcolor(tri, f, shading="gouraud", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.plot(0.5 + RADIUS * np.cos(angle), 0.5 + RADIUS * np.sin(angle), "k--", lw=0.5)
            ax.plot(sensors[:, 0], sensors[:, 1], "o", ms=3, mfc="none", mec="k", mew=0.7)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{what}, t = {t:.2f}", fontsize=10)
    fig.colorbar(art, ax=axes, shrink=0.8, label="source f")
    o = meta["options"]
    fig.suptitle(f"heat_source_inversion: n = {o['n']}, {o['n_steps']} steps, {sensors.shape[0]} sensors; "
                 f"relative L2 error {source_error(problem, p):.2f}", fontsize=11)
    path = os.fspath(path)
    FigureCanvasAgg(fig).print_png(path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--n-steps", type=int, default=100, dest="n_steps")
    ap.add_argument("--scheme", default="crank_nicolson")
    ap.add_argument("--alpha", type=float, default=30.0)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--solve", action="store_true", help="run Newton-CG and print the error of the recovered source")
    ap.add_argument("--plot", help="with --solve: draw the recovered source and the truth to this PNG")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    problem = build(n=args.n, n_steps=args.n_steps, scheme=args.scheme, alpha=args.alpha, noise=args.noise)
    J, p = problem.functional, problem.p0
    print(f"{problem.name}: {J.n} free dofs, {J.time.n_steps} steps ({J.time.scheme}), {J.n_params} parameters, "
          f"{problem.meta['observation_points'].shape[0]} sensors; built in {time.perf_counter() - t0:.2f} s")
    print(derivative_report(J, p))
    print(f"J(p_true)    = {J.value(problem.meta['p_true']):.10g}")
    if args.solve:
        t0 = time.perf_counter()
        x = solve(problem)
        print(f"optimum in {time.perf_counter() - t0:.1f} s: J = {J.value(x):.10e}, relative L2(0,T;L2) error of "
              f"the source {source_error(problem, x):.3f} (p = 0: 1)")
        if args.plot:
            print(f"wrote {plot(problem, x, args.plot)}")


if __name__ == "__main__":
    main()
