"""Meshes for adjopt: the :class:`Mesh` container, structured generators, file I/O.

>>> from adjopt.mesh import unit_square
>>> m = unit_square(4)
>>> m.n_nodes, m.n_cells, m.boundary("left").tolist()
(25, 32, [0, 5, 10, 15, 20])
"""

from ._errors import InvalidElementError, MeshError, UnknownBoundaryError
from ._mesh import Mesh
from ._reference import SUPPORTED as CELL_TYPES
from .generators import box, rectangle, unit_cube, unit_square
from .io import read, write_pvtu, write_vtu
from .parts import MeshPart, box_part, read_part, rectangle_part, unit_cube_part, unit_square_part

__all__ = [
    "CELL_TYPES",
    "InvalidElementError",
    "Mesh",
    "MeshError",
    "MeshPart",
    "UnknownBoundaryError",
    "box",
    "box_part",
    "read_part",
    "read",
    "rectangle",
    "rectangle_part",
    "unit_cube",
    "unit_cube_part",
    "unit_square",
    "unit_square_part",
    "write_pvtu",
    "write_vtu",
]
