"""Say so when numba compiles (so that a command does not wait in silence on the first run of an installation).

Kernels are compiled with ``cache=True``: the first process that needs one compiles it (all of a gallery
problem's kernels take a minute or so on 2 cores) and writes it next to the sources (or into
``NUMBA_CACHE_DIR``); later processes load it. numba reports a compile (not a load from its cache) as a
``numba:compile`` event: :func:`announce_compiles` hands a notice to its caller at the first one of the
process.
"""

from __future__ import annotations

import os

#: printed by the adjopt command before the first compile of a process
NOTICE = ("adjopt: compiling numba kernels (first use in this installation; this can take a minute, and later "
          "runs load them from numba's cache)")


def announce_compiles(say) -> bool:
    """Call ``say(NOTICE)`` when numba starts its first compile in this process (the caller decides where it
    goes: the adjopt command prints it on stderr).

    Returns False when numba's event API is not available (nothing is announced then)."""
    try:
        from numba.core import event
    except ImportError:  # pragma: no cover - a numba without the event API
        return False

    class _FirstCompile(event.Listener):
        done = False

        def on_start(self, ev):
            if not self.done:
                self.done = True
                say(NOTICE)

        def on_end(self, ev):
            pass

    event.register("numba:compile", _FirstCompile())
    return True


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
