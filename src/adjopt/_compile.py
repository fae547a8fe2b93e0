"""Whether numba's on-disk cache already holds adjopt's kernels (so that a command can say, before the first
compile of an installation, that it is compiling instead of waiting in silence).

Kernels are compiled with ``cache=True``: the first process of an installation compiles them (a minute or so
on 2 cores) and writes them next to the sources (or into ``NUMBA_CACHE_DIR``); later processes load them.
The check looks for cache index files in the folder of adjopt.operators' kernels (which every problem uses);
it reads numba's cache objects, so an unknown numba version gives ``None`` (no notice) rather than an error.
"""

from __future__ import annotations

import os

#: printed by the adjopt command before it compiles (a cold cache)
NOTICE = ("adjopt: compiling the numba kernels, first run only (a minute or so; later runs load them from "
          "numba's cache)")


def kernels_cached() -> bool | None:
    """False when numba's cache holds none of adjopt's compiled kernels (the first run of an installation),
    True when it holds some, None when that cannot be told (a numba whose cache objects differ)."""
    try:
        from .operators import _kernels

        folder = _kernels.slot_products._cache._cache_path  # where the kernels of adjopt.operators go
    except (AttributeError, ImportError):
        return None
    try:
        return any(name.endswith(".nbi") for name in os.listdir(folder))
    except OSError:  # not created yet
        return False
