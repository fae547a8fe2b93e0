"""Optimization drivers on reduced functionals: L-BFGS(-B), Newton-CG, OC and MMA.

All share one loop (:mod:`adjopt.optimize.base`): stopping tests, history,
a callback, checkpoints after every iteration and exact resume.
"""

from .base import CheckpointError, MethodSetupError, OptimizationError, OptimizeResult, Options, read_checkpoint
from .inner import Diagonal, Euclidean, InnerProduct, Matrix, make_inner_product
from .continuation import AdaptiveNormalization, BetaContinuation, BetaSchedule, ContinuationChain, grey_level
from .minimize import methods, minimize
from .minmax import minmax_problem

__all__ = [
    "minimize", "methods", "OptimizeResult", "Options", "CheckpointError", "MethodSetupError", "OptimizationError",
    "read_checkpoint", "AdaptiveNormalization", "BetaContinuation", "BetaSchedule", "ContinuationChain", "grey_level",
    "minmax_problem",
    "InnerProduct", "Euclidean", "Diagonal", "Matrix", "make_inner_product",
]
