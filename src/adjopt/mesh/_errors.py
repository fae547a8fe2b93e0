"""Exceptions of :mod:`adjopt.mesh`.

They derive from :class:`adjopt.errors.AdjoptError` and from the built-in
exception a user would expect, so ``except ValueError`` / ``except KeyError``
keep working.
"""

from __future__ import annotations

from ..errors import AdjoptError


class MeshError(AdjoptError, ValueError):
    """A mesh (or an option of a mesh generator / reader) is invalid."""


class InvalidElementError(MeshError):
    """An element is inverted (negative signed volume) or degenerate.

    Attributes
    ----------
    element : int
        Index of the first offending element.
    """

    def __init__(self, message: str, element: int):
        super().__init__(message)
        self.element = int(element)


class UnknownBoundaryError(MeshError, KeyError):
    """A boundary name is not one of the mesh's named boundaries.

    Subclasses both :class:`ValueError` and :class:`KeyError`; ``str()`` gives
    the plain message (``KeyError`` would otherwise quote it).
    """

    def __str__(self) -> str:  # KeyError.__str__ returns repr(message)
        return str(self.args[0]) if self.args else ""
