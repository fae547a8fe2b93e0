"""Quadrature rules and the error-norm helper."""

from math import factorial

import numpy as np
import pytest

import adjopt.fem as F
from adjopt.errors import ShapeError
from adjopt.mesh import box, unit_square


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 5, 8])
def test_triangle_rule_exact_for_monomials(degree):
    x, w = F.triangle_rule(degree)
    assert w.sum() == pytest.approx(0.5)
    for a in range(degree + 1):
        for b in range(degree + 1 - a):
            exact = factorial(a) * factorial(b) / factorial(a + b + 2)
            assert w @ (x[:, 0] ** a * x[:, 1] ** b) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4, 6])
def test_tetra_rule_exact_for_monomials(degree):
    x, w = F.tetra_rule(degree)
    assert w.sum() == pytest.approx(1 / 6)
    for a in range(degree + 1):
        for b in range(degree + 1 - a):
            for c in range(degree + 1 - a - b):
                exact = factorial(a) * factorial(b) * factorial(c) / factorial(a + b + c + 3)
                got = w @ (x[:, 0] ** a * x[:, 1] ** b * x[:, 2] ** c)
                assert got == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("cell, dim", [("quad", 2), ("hexahedron", 3)])
def test_tensor_rule_exact(cell, dim):
    x, w = F.cell_rule(cell, 3)
    assert x.shape == (2**dim, dim)
    assert w.sum() == pytest.approx(2.0**dim)
    # int_{-1}^{1} t^2 dt = 2/3; int t^3 = 0
    assert w @ (x[:, 0] ** 2 * x[:, 1] ** 2) == pytest.approx((2 / 3) ** 2 * 2.0 ** (dim - 2))
    assert w @ (x[:, 0] ** 3) == pytest.approx(0.0, abs=1e-15)


def test_rule_errors():
    with pytest.raises(F.FemError, match="degree must be an integer >= 0"):
        F.triangle_rule(-1)
    with pytest.raises(F.FemError, match="degree must be an integer"):
        F.tetra_rule(1.5)
    with pytest.raises(F.FemError, match="no quadrature for cell type 'prism'"):
        F.cell_rule("prism", 2)


@pytest.mark.parametrize("mesh", [unit_square(3), unit_square(3, "quad"), box(2, 1, 1, 2.0, 1.0, 1.0),
                                  box(1, 1, 2, cell="hexahedron")], ids=["tri", "quad", "tet", "hex"])
def test_error_norms_exact_values(mesh):
    d = mesh.dim
    g = np.arange(1.0, d + 1)
    lin = mesh.points @ g
    l2, h1 = F.error_norms(mesh, lin, lambda x: x @ g, lambda x: np.tile(g, (x.shape[0], 1)))
    assert l2 < 1e-13 and h1 < 1e-12  # P1 / Q1 reproduce linear fields
    vol = mesh.cell_volumes().sum()
    l2, h1 = F.error_norms(mesh, np.zeros(mesh.n_nodes), lambda x: np.ones(x.shape[0]))
    assert l2 == pytest.approx(np.sqrt(vol)) and h1 is None
    # u_h = 0 against u = x0: ||x||_0^2 = int x^2, |x|_1^2 = vol
    lx = mesh.points[:, 0].max()
    l2, h1 = F.error_norms(mesh, np.zeros(mesh.n_nodes), lambda x: x[:, 0],
                           lambda x: np.column_stack([np.ones(len(x))] + [np.zeros(len(x))] * (d - 1)))
    assert l2 == pytest.approx(np.sqrt(vol / lx * lx**3 / 3)) and h1 == pytest.approx(np.sqrt(vol))


def test_error_norms_errors():
    m = unit_square(2)
    with pytest.raises(ShapeError, match=r"one value per node, shape \(9,\)"):
        F.error_norms(m, np.zeros(4), lambda x: x[:, 0])
    with pytest.raises(F.FemError, match="needs an adjopt.mesh.Mesh"):
        F.error_norms("m", np.zeros(9), lambda x: x[:, 0])
