"""Meshes from files in distributed runs: read on one rank, partitioned there, scattered (adjopt.mesh.read_part).

Run under ``mpiexec -n 2`` (CI) and on one rank.
"""

import json

import numpy as np
import pytest

pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")
pytest.importorskip("meshio")

from problems import poisson_inversion  # noqa: E402

from adjopt.backends.petsc.parts import ownership  # noqa: E402
from adjopt.mesh import Mesh, MeshError, read, read_part, unit_square, write_vtu  # noqa: E402

COMM = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def mesh_file(tmp_path_factory):
    """An unordered mesh of the unit square: nodes and cells shuffled, interior nodes moved a little."""
    path = None
    if COMM.rank == 0:
        m = unit_square(14)
        rng = np.random.default_rng(5)
        pts = m.points.copy()
        inner = np.ones(m.n_nodes, dtype=bool)
        inner[m.boundary("all")] = False
        pts[inner] += rng.uniform(-0.015, 0.015, (int(inner.sum()), 2))
        perm = rng.permutation(m.n_nodes)  # file node perm[i] is node i
        inv = np.empty_like(perm)
        inv[perm] = np.arange(m.n_nodes)
        cells = inv[m.cells][rng.permutation(m.n_cells)]
        shuffled = Mesh(pts[perm], cells, "triangle")
        path = str(tmp_path_factory.mktemp("meshes") / "square.vtu")
        write_vtu(path, shuffled, point_data={"x": pts[perm][:, 0]})
    return COMM.bcast(path)


def _gathered(a):
    return np.concatenate(COMM.allgather(np.asarray(a)))


@pytest.mark.parametrize("partition", ["slab", "graph"])
def test_the_parts_make_up_the_file(mesh_file, partition):
    if partition == "graph":
        pytest.importorskip("pymetis")
    whole = read(mesh_file)
    part = read_part(mesh_file, comm=COMM, partition=partition)
    m = part.mesh
    # every node of the file is owned once, in contiguous ranges in rank order; cells likewise
    owned = _gathered(part.source_nodes[:part.n_owned])
    assert np.array_equal(np.sort(owned), np.arange(whole.n_nodes))
    ranges = ownership(COMM, part.node_start, part.n_owned)
    assert np.array_equal(part.nodes[:part.n_owned], part.node_start + np.arange(part.n_owned))
    ghosts = part.nodes[part.n_owned:]
    assert not np.any((ghosts >= ranges[COMM.rank]) & (ghosts < ranges[COMM.rank + 1]))
    assert np.array_equal(np.sort(_gathered(part.source_cells)), np.arange(whole.n_cells))
    assert part.cell_start == sum(COMM.allgather(m.n_cells)[:COMM.rank])
    # the same points, cells, boundary and data as the file, through the maps back
    assert np.array_equal(m.points, whole.points[part.source_nodes])
    assert np.array_equal(part.source_nodes[m.cells], whole.cells[part.source_cells])
    on_boundary = np.isin(part.source_nodes, whole.boundary("all"))
    assert np.array_equal(m.boundary("all"), np.flatnonzero(on_boundary))
    assert np.array_equal(m.point_data["x"], whole.point_data["x"][part.source_nodes])
    # a node is owned by the lowest rank among its cells: every rank's cells use all its owned nodes
    assert np.array_equal(np.unique(m.cells[m.cells < part.n_owned]), np.arange(part.n_owned))
    assert part.layers is None and part.n_global_nodes == whole.n_nodes and part.n_global_cells == whole.n_cells


def test_errors_of_the_reading_rank_stop_every_rank(mesh_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="mesh file not found"):
        read_part(str(tmp_path / "missing.msh"), comm=COMM)
    with pytest.raises(MeshError, match="unknown partition 'metis'"):
        read_part(mesh_file, comm=COMM, partition="metis")
    with pytest.raises(MeshError, match="root must be a rank"):
        read_part(mesh_file, comm=COMM, root=COMM.size)
    with pytest.raises(MeshError, match="root must be a rank"):
        read_part(mesh_file, comm=COMM, root=True)
    corrupt = COMM.bcast(str(tmp_path / "corrupt.vtu") if COMM.rank == 0 else None)
    if COMM.rank == 0:
        with open(corrupt, "w") as fh:
            fh.write("<VTKFile type='Unstr")  # meshio exits the process on it: every rank must still raise
    COMM.Barrier()
    with pytest.raises(MeshError, match="meshio could not read"):
        read_part(corrupt, comm=COMM)


def test_poisson_on_a_mesh_file_is_the_serial_problem(mesh_file):
    dist = poisson_inversion.build_distributed(mesh_file=mesh_file, n_obs=30, rtol=1e-12)
    serial = poisson_inversion.build(mesh_file=mesh_file, n_obs=30)
    part = dist.meta["part"]
    order = _gathered(part.source_nodes[:part.n_owned])  # global (distributed) number -> the file's
    F, S = dist.functional, serial.functional
    x = read(mesh_file).points
    p = 0.3 * np.sin(3 * x[:, 0]) * np.cos(2 * x[:, 1])
    dp = np.cos(5 * x[:, 0] + x[:, 1])
    assert F.n_params == S.n_params == x.shape[0]
    assert F.value(p[order]) == pytest.approx(S.value(p), rel=1e-9)
    np.testing.assert_allclose(F.gradient(p[order]), S.gradient(p)[order], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(F.hessp(p[order], dp[order]), S.hessp(p, dp)[order], rtol=1e-7, atol=1e-9)
    assert COMM.allreduce(len(dist.meta["observation_index"])) == 30  # each point on one rank
    assert np.array_equal(np.sort(_gathered(dist.meta["observation_index"])), np.arange(30))


def test_a_mesh_file_of_quads_is_refused_on_every_rank(tmp_path):
    from adjopt.mesh import rectangle

    path = COMM.bcast(str(tmp_path / "quads.vtu") if COMM.rank == 0 else None)
    if COMM.rank == 0:
        write_vtu(path, rectangle(4, 4, cell="quad"))
    COMM.Barrier()
    with pytest.raises(ValueError, match="needs triangles"):
        poisson_inversion.build_distributed(mesh_file=path)


@pytest.mark.parametrize("partition", ["slab", "graph"])
def test_adjopt_run_on_a_mesh_file_writes_x_in_the_files_order(mesh_file, tmp_path, partition):
    from adjopt import cli

    if partition == "graph":
        pytest.importorskip("pymetis")
    out = COMM.bcast(str(tmp_path / "dist") if COMM.rank == 0 else None)
    args = ["run", "poisson_inversion", "--mesh-file", mesh_file, "--n-obs", "30", "--method", "newton-cg",
            "--max-iter", "60", "--gtol", "1e-7", "--no-pictures", "-q"]
    assert cli.main([*args, "--backend", "petsc", "--partition", partition, "--out", out]) in (0, 1)
    serial = str(tmp_path / f"serial{COMM.rank}")
    assert cli.main([*args, "--out", serial]) in (0, 1)
    COMM.Barrier()
    x, xs = np.load(f"{out}/result.npz")["x"], np.load(f"{serial}/result.npz")["x"]
    assert x.shape == xs.shape == (read(mesh_file).n_nodes,)
    # both converged (the distributed solves are iterative, the serial ones direct): the same minimiser
    assert np.linalg.norm(x - xs) <= 1e-4 * np.linalg.norm(xs)
    assert np.linalg.norm(np.roll(x, 1) - xs) > 1e-2 * np.linalg.norm(xs)  # the order matters
    # the state and the adjoint in the serial free-dof numbering too (they were in the parts' numbering)
    for name in ("state", "adjoint"):
        v, vs = np.load(f"{out}/result.npz")[name], np.load(f"{serial}/result.npz")[name]
        assert v.shape == vs.shape
        assert np.linalg.norm(v - vs) <= 1e-4 * np.linalg.norm(vs), name


def test_partition_is_an_option_of_the_rank_by_rank_build_only(mesh_file, tmp_path, capsys):
    from adjopt import cli

    out = COMM.bcast(str(tmp_path / "p") if COMM.rank == 0 else None)
    # serial: the option is refused with what to add
    assert cli.main(["run", "poisson_inversion", "--mesh-file", mesh_file, "--partition", "graph", "--out",
                     str(tmp_path / f"s{COMM.rank}")]) == 2
    assert "--partition is an option of the rank-by-rank build: add --backend petsc" in capsys.readouterr().err
    # a value build_distributed refuses
    assert cli.main(["run", "poisson_inversion", "--mesh-file", mesh_file, "--partition", "metis", "--backend",
                     "petsc", "--no-pictures", "-q", "--out", out]) == 2
    if COMM.rank == 0:
        assert "partition" in capsys.readouterr().err
    # a missing mesh file: one line and exit 2 on every rank (a traceback and exit 1 before)
    assert cli.main(["run", "poisson_inversion", "--mesh-file", out + "-missing.vtu", "--backend", "petsc",
                     "--no-pictures", "-q", "--out", out + "m"]) == 2
    err = capsys.readouterr().err
    assert "could not read a file (FileNotFoundError" in err and "missing.vtu" in err and "check the path" in err
    assert "Traceback" not in err and "fix the problem file" not in err
    # options that build serially on every rank cannot honour a partition
    assert cli.main(["run", "poisson_inversion", "--n", "6", "--grading", "1.5", "--partition", "graph", "--backend",
                     "petsc", "--no-pictures", "-q", "--out", out + "g"]) == 2
    if COMM.rank == 0:
        assert "--partition applies to a rank-by-rank build" in capsys.readouterr().err
    COMM.Barrier()


def test_resume_with_another_partition_of_a_mesh_file_is_refused(mesh_file, tmp_path, capsys):
    """The partition decides which nodes each rank's checkpoint block holds: a resume with another one read the
    blocks into other nodes (a scrambled x when the ranks' counts happened to agree)."""
    from adjopt import cli

    pytest.importorskip("pymetis")
    out = COMM.bcast(str(tmp_path / "r") if COMM.rank == 0 else None)
    args = ["run", "poisson_inversion", "--mesh-file", mesh_file, "--n-obs", "30", "--method", "lbfgs",
            "--no-pictures", "-q", "--backend", "petsc", "--out", out]
    assert cli.main([*args, "--partition", "graph", "--max-iter", "3"]) in (0, 1)
    capsys.readouterr()
    for other in (["--partition", "slab"], []):  # slab, also as the default
        assert cli.main([*args, *other, "--max-iter", "6", "--resume"]) == 2
        if COMM.rank == 0:
            err = capsys.readouterr().err
            assert "partition" in err and "graph" in err and "slab" in err, err
    assert cli.main([*args, "--partition", "graph", "--max-iter", "6", "--resume"]) in (0, 1)
    COMM.Barrier()
    with open(f"{out}/history.json") as fh:
        assert len(json.load(fh)["history"]) == 7


def test_observation_points_outside_a_mesh_file_are_named_on_every_rank(tmp_path):
    from adjopt.mesh import rectangle

    path = COMM.bcast(str(tmp_path / "small.vtu") if COMM.rank == 0 else None)
    if COMM.rank == 0:
        write_vtu(path, rectangle(6, 6, 0.5, 0.5))  # [0, 0.5]^2: most of the points in [0.1, 0.9]^2 are outside
    COMM.Barrier()
    with pytest.raises(ValueError, match=r"observation points \[.*\] are outside the mesh"):
        poisson_inversion.build_distributed(mesh_file=path, n_obs=20)
