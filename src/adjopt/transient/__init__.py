"""Time-dependent problems M(p) du/dt + A(p) u = b(t, p) (or + R(u, p), nonlinear): schemes, sources, objectives of a trajectory and
the transient reduced functional (discrete adjoints, Hessian actions, checkpointing)."""

from .functional import DEFAULT_MEMORY, SCHEDULES as CHECKPOINT_SCHEDULES, TransientReducedFunctional, TransientStats
from .nonlinear import NonlinearTransientReducedFunctional
from .objectives import AtSteps, Final, TimeSeriesMisfit, TimeTerm
from .schemes import SCHEMES, TimeStepping
from .sources import Modulated, SpaceTimeSource, Steady, TimeDependentVector, TimeFunction

__all__ = [
    "TransientReducedFunctional", "NonlinearTransientReducedFunctional", "TransientStats", "DEFAULT_MEMORY", "TimeStepping", "SCHEMES",
    "TimeTerm", "TimeSeriesMisfit", "AtSteps", "Final",
    "TimeDependentVector", "Steady", "Modulated", "TimeFunction", "SpaceTimeSource",
]
