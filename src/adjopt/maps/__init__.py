"""Parameter maps p -> rho, chained in front of A(rho) and b(rho).

Each map gives forward, vjp, jvp and its second-order term, so that gradients
and Hessian actions compose (see :class:`ParameterMap`).
"""

from .base import Compose, IdentityMap, ParameterMap, compose
from .maps import (DensityFilter, ExpMap, FixedEntries, HeavisideProjection, NodalToElement, SIMPMap,
                   TiedEntries, element_indices)

__all__ = [
    "ParameterMap", "IdentityMap", "Compose", "compose",
    "ExpMap", "SIMPMap", "DensityFilter", "HeavisideProjection", "NodalToElement", "FixedEntries",
    "TiedEntries", "element_indices",
]
