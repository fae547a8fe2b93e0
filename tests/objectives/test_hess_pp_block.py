"""hess_pp_block: the objectives' f_pp applied to a block of k directions equals k single products (one sparse
product for a quadratic penalty, the column loop otherwise), through sums and scalings; zero where f_pp is."""

import numpy as np
import pytest
import scipy.sparse as sp

import adjopt
from adjopt import fem, mesh
from adjopt.fem.observation import p1_gradient_operator
from adjopt.objectives import TikhonovH1, TikhonovL2, TotalVariation


def _terms():
    m = mesh.unit_square(5)
    N = m.n_nodes
    K = fem.assemble(m.cells, fem.p1_stiffness(m), N)
    M = fem.assemble(m.cells, fem.p1_mass(m), N)
    rng = np.random.default_rng(0)
    misfit = adjopt.SquaredMisfit(rng.standard_normal(4), B=sp.csr_array(rng.standard_normal((4, N))))
    return N, {
        "H1 + L2 (matrices)": 3.0 * TikhonovH1(K) + 0.1 * TikhonovL2(M),
        "L2 weights": TikhonovL2(rng.random(N) + 0.5),
        "L2 identity, p_ref": TikhonovL2(p_ref=np.ones(N), n=N),
        "TV (column loop)": TotalVariation(p1_gradient_operator(m), m.cell_volumes(), eps=1e-2),
        "misfit + H1": misfit + TikhonovH1(K),
        "misfit alone (zero)": misfit,
        "bi-Laplacian prior (one block product)": 2.0 * adjopt.BiLaplacianPrior.from_correlation(m, 1.0, 1.0),
    }


@pytest.mark.parametrize("name", ["H1 + L2 (matrices)", "L2 weights", "L2 identity, p_ref", "TV (column loop)",
                                  "misfit + H1", "misfit alone (zero)",
                                  "bi-Laplacian prior (one block product)"])
def test_a_block_equals_its_columns(name):
    N, terms = _terms()
    f = terms[name]
    rng = np.random.default_rng(1)
    p, dP = rng.standard_normal(N), rng.standard_normal((N, 4))
    u = np.zeros(N)  # the parameter terms do not read u; the misfit's f_pp is zero whatever u is
    block = f.hess_pp_block(u, p, dP)
    cols = np.column_stack([f.hess_pp(u, p, dP[:, i]) for i in range(4)])
    assert block.shape == (N, 4)
    np.testing.assert_allclose(block, cols, rtol=1e-13, atol=1e-14 * max(np.abs(cols).max(), 1.0))
    if name == "misfit alone (zero)":
        assert f.zero_derivative("hess_pp") and not np.any(block)
    else:
        assert np.abs(block).max() > 0
