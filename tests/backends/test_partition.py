"""Element partitions and contiguous numberings (numpy only: these run without PETSc)."""

import importlib
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from adjopt.backends.partition import make_layout, partition_elements
from adjopt.errors import MissingBackendError, PartitionError
from adjopt.fem import condense
from adjopt.maps import NodalToElement
from adjopt.mesh import unit_square


def test_block_partition_is_balanced_and_contiguous():
    parts = partition_elements(10, 3)
    assert parts.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_slab_partition_cuts_across_the_longest_extent():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, 2)) * [4.0, 1.0]  # longest along x
    parts = partition_elements(200, 4, "slab", coordinates=x)
    assert np.bincount(parts).tolist() == [50, 50, 50, 50]
    # every element of rank r lies left of every element of rank r + 1
    for r in range(3):
        assert x[parts == r, 0].max() <= x[parts == r + 1, 0].min()


def test_explicit_parts_are_checked():
    assert partition_elements(4, 2, parts=[1, 0, 1, 0]).tolist() == [1, 0, 1, 0]
    with pytest.raises(PartitionError, match="no element to rank"):
        partition_elements(4, 3, parts=[0, 0, 1, 1])
    with pytest.raises(PartitionError, match="holds ranks"):
        partition_elements(4, 2, parts=[0, 1, 2, 1])
    with pytest.raises(PartitionError, match="one rank per element"):
        partition_elements(4, 2, parts=[0, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_elements=3, n_ranks=4), "cannot split 3 element"),
    (dict(n_elements=3, n_ranks=0), "integer >= 1"),
    (dict(n_elements=8, n_ranks=2, method="metis"), "unknown partition method"),
    (dict(n_elements=8, n_ranks=2, method="slab"), "needs the element centres"),
    (dict(n_elements=8, n_ranks=2, method="slab", coordinates=np.zeros((7, 2))), "shape"),
    (dict(n_elements=2, n_ranks=2, method="slab", coordinates=[[0.0, np.nan], [1.0, 0.0]]), "NaN"),
])
def test_bad_partitions_are_refused(kwargs, match):
    with pytest.raises(PartitionError, match=match):
        partition_elements(**kwargs)


def test_layout_gives_each_rank_a_contiguous_block_of_dofs_and_parameters():
    mesh = unit_square(8)
    dofs = condense(mesh.n_nodes, mesh.boundary("all"))
    conn = dofs.restrict(mesh.cells)
    L = NodalToElement(mesh.cells, n_nodes=mesh.n_nodes).L
    parts = partition_elements(len(conn), 3, "slab", coordinates=mesh.cell_centers())
    lay = make_layout(conn, dofs.n_free, parts, 3, parameter_matrix=L)
    for num, n in ((lay.elements, len(conn)), (lay.dofs, dofs.n_free), (lay.params, mesh.n_nodes)):
        assert np.array_equal(np.sort(num.order), np.arange(n))  # a permutation
        assert np.array_equal(num.perm[num.order], np.arange(n))
        assert num.ranges[0] == 0 and num.ranges[-1] == n and np.all(np.diff(num.ranges) > 0)
    # a dof belongs to the lowest rank among its elements; every rank's elements only touch dofs of ranks >= ...
    for r in range(3):
        owned = lay.dofs.owned(r)
        touching = parts[np.flatnonzero((np.isin(conn, owned)).any(axis=1))]
        assert touching.min() == r
    # element parameters: the element numbering itself
    lay2 = make_layout(conn, dofs.n_free, parts, 3)
    assert np.array_equal(lay2.params.order, lay2.elements.order)


def test_layout_refuses_a_dof_that_no_element_touches():
    conn = np.array([[0, 1], [1, 2]])
    with pytest.raises(PartitionError, match="belong to no element"):
        make_layout(conn, 4, np.array([0, 1]), 2)
    with pytest.raises(PartitionError, match="produces 3 values"):
        make_layout(conn, 3, np.array([0, 1]), 2, parameter_matrix=sp.eye(3))


def test_the_petsc_backend_without_petsc4py_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name.startswith("adjopt.backends.petsc"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "petsc4py", None)
    monkeypatch.setitem(sys.modules, "petsc4py.PETSc", None)
    with pytest.raises(MissingBackendError, match=r"pip install \"adjopt\[mpi\]\""):
        importlib.import_module("adjopt.backends.petsc")


def test_graph_partition_cuts_fewer_dofs_than_blocks_on_a_shuffled_mesh():
    pytest.importorskip("pymetis")
    mesh = unit_square(16)
    rng = np.random.default_rng(0)
    conn = mesh.cells[rng.permutation(len(mesh.cells))]  # an unordered numbering: blocks are scattered
    shared = {}
    for method in ("block", "graph"):
        parts = partition_elements(len(conn), 4, method, conn=conn)
        assert np.bincount(parts, minlength=4).min() > 0.8 * len(conn) / 4  # balanced
        owner_sets = [set(conn[parts == r].ravel()) for r in range(4)]
        shared[method] = sum(len(a & b) for i, a in enumerate(owner_sets) for b in owner_sets[i + 1:])
    assert shared["graph"] < 0.25 * shared["block"]
    assert partition_elements(len(conn), 1, "graph", conn=conn).tolist() == [0] * len(conn)


def test_graph_partition_errors(monkeypatch):
    with pytest.raises(PartitionError, match="needs the connectivity"):
        partition_elements(8, 2, "graph")
    monkeypatch.setitem(sys.modules, "pymetis", None)
    with pytest.raises(PartitionError, match="needs pymetis"):
        partition_elements(2, 2, "graph", conn=np.array([[0, 1], [1, 2]]))
