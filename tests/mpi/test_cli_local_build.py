"""``adjopt run --backend petsc`` on problems built rank by rank: same runs as serial, fields.pvtu, --resume."""

import json
import logging
import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("petsc4py")
MPI = pytest.importorskip("mpi4py.MPI")
meshio = pytest.importorskip("meshio")

from adjopt import cli  # noqa: E402
from adjopt.mesh import MeshError, rectangle, write_pvtu  # noqa: E402

COMM = MPI.COMM_WORLD


def _shared(tmp_path, name):
    return COMM.bcast(str(tmp_path / name) if COMM.rank == 0 else None)  # one folder for all ranks


def _history(folder):
    with open(f"{folder}/history.json") as fh:
        return json.load(fh)["history"]


def _pieces(folder, name="fields.pvtu"):
    root = ET.parse(f"{folder}/{name}").getroot()
    return [folder + "/" + p.attrib["Source"] for p in root.iter("Piece")]


def test_oc_run_built_rank_by_rank_follows_the_serial_run(tmp_path, caplog):
    out = _shared(tmp_path, "mbb")
    args = ["run", "topology_compliance", "--nelx", "30", "--nely", "10", "--max-iter", "15", "--no-pictures", "-q"]
    with caplog.at_level(logging.INFO, logger="adjopt.cli"):
        assert cli.main([*args, "--backend", "petsc", "--out", out]) in (0, 1)
    if COMM.rank == 0:
        assert "built rank by rank" in caplog.text
    serial = str(tmp_path / f"serial{COMM.rank}")
    assert cli.main([*args, "--out", serial]) in (0, 1)
    COMM.Barrier()
    dist, ser = _history(out), _history(serial)
    assert len(dist) == len(ser) == 16  # iteration 0 and 15 OC steps
    for a, b in zip(dist, ser):
        assert abs(a["f"] - b["f"]) <= 1e-8 * abs(b["f"])
    x = np.load(f"{out}/result.npz")["x"]
    assert np.abs(x - np.load(f"{serial}/result.npz")["x"]).max() <= 1e-8
    # p stayed in blocks: every rank checkpointed its own block, and the blocks make up x
    blocks = [np.load(f"{out}/checkpoint.rank{r}.npz")["state__x"] for r in range(COMM.size)]
    assert all(b.size < 300 for b in blocks) or COMM.size == 1
    assert np.array_equal(np.concatenate(blocks), x)
    # one piece per rank; together they hold every cell's physical density once per owning rank
    pieces = _pieces(out)
    assert len(pieces) == COMM.size
    density = np.concatenate([meshio.read(p).cell_data["density"][0] for p in pieces])
    assert density.size == 300 and np.all((density >= 0) & (density <= 1 + 1e-12))
    disp = [meshio.read(p).point_data["displacement"] for p in pieces]
    assert all(d.shape[1] == 3 for d in disp) and max(np.abs(d).max() for d in disp) > 0


def test_mma_run_built_rank_by_rank_keeps_p_in_blocks_and_follows_the_serial_run(tmp_path, caplog):
    out = _shared(tmp_path, "mma")
    args = ["run", "topology_compliance", "--nelx", "30", "--nely", "10", "--method", "mma", "--max-iter", "10",
            "--no-pictures", "-q"]
    with caplog.at_level(logging.INFO, logger="adjopt.cli"):
        assert cli.main([*args, "--backend", "petsc", "--out", out]) in (0, 1)
    if COMM.rank == 0 and COMM.size > 1:
        assert "parameters in blocks" in caplog.text
    serial = str(tmp_path / f"serial{COMM.rank}")
    assert cli.main([*args, "--out", serial]) in (0, 1)
    COMM.Barrier()
    dist, ser = _history(out), _history(serial)
    assert len(dist) == len(ser) == 11
    for a, b in zip(dist, ser):
        assert abs(a["f"] - b["f"]) <= 1e-7 * abs(b["f"])
    x = np.load(f"{out}/result.npz")["x"]
    assert np.abs(x - np.load(f"{serial}/result.npz")["x"]).max() <= 1e-6
    blocks = [np.load(f"{out}/checkpoint.rank{r}.npz")["state__x"] for r in range(COMM.size)]
    assert np.array_equal(np.concatenate(blocks), x)


def test_advection_source_run_built_rank_by_rank_ends_where_the_serial_run_ends(tmp_path, caplog):
    out = _shared(tmp_path, "adv")
    args = ["run", "advection_diffusion_source", "--n", "16", "--no-pictures", "-q"]  # newton-cg to gtol 1e-8
    with caplog.at_level(logging.INFO, logger="adjopt.cli"):
        assert cli.main([*args, "--backend", "petsc", "--out", out]) == 0
    if COMM.rank == 0:
        assert "built rank by rank" in caplog.text
    serial = str(tmp_path / f"serial{COMM.rank}")
    assert cli.main([*args, "--out", serial]) == 0
    COMM.Barrier()
    x, xs = np.load(f"{out}/result.npz")["x"], np.load(f"{serial}/result.npz")["x"]
    assert np.linalg.norm(x - xs) <= 1e-6 * np.linalg.norm(xs)
    assert len(_pieces(out)) == COMM.size


def test_newton_cg_run_built_rank_by_rank_ends_where_the_serial_run_ends(tmp_path):
    out = _shared(tmp_path, "poisson")
    args = ["run", "poisson_inversion", "--n", "12", "--no-pictures", "-q"]
    assert cli.main([*args, "--backend", "petsc", "--out", out]) == 0
    serial = str(tmp_path / f"serial{COMM.rank}")
    assert cli.main([*args, "--out", serial]) == 0
    COMM.Barrier()
    f_dist, f_ser = _history(out)[-1]["f"], _history(serial)[-1]["f"]
    assert abs(f_dist - f_ser) <= 1e-8 * abs(f_ser)
    x = np.load(f"{out}/result.npz")["x"]
    assert np.linalg.norm(x - np.load(f"{serial}/result.npz")["x"]) <= 1e-6 * np.linalg.norm(x)
    assert sum(np.load(f"{out}/checkpoint.rank{r}.npz")["state__x"].size for r in range(COMM.size)) == x.size
    # the pieces' parameter field is the result at their nodes (points of the 13 x 13 grid)
    for piece in _pieces(out):
        m = meshio.read(piece)
        i = np.rint(m.points[:, 0] * 12).astype(int) + 13 * np.rint(m.points[:, 1] * 12).astype(int)
        assert np.allclose(m.point_data["parameter"], x[i], rtol=0, atol=1e-14)


def test_options_not_built_rank_by_rank_fall_back_to_the_replicated_build(tmp_path, caplog):
    out = _shared(tmp_path, "fallback")
    args = ["run", "topology_compliance", "--case", "cantilever3d", "--nelx", "6", "--nely", "3", "--nelz", "3",
            "--max-iter", "2", "--no-pictures", "-q", "--backend", "petsc", "--out", out]
    with caplog.at_level(logging.WARNING, logger="adjopt.cli"):
        assert cli.main(args) in (0, 1)
    if COMM.rank == 0:
        assert "every rank builds the whole problem" in caplog.text and "cantilever3d" in caplog.text
    COMM.Barrier()
    assert len(_history(out)) == 3
    out2 = _shared(tmp_path, "graded")
    with caplog.at_level(logging.WARNING, logger="adjopt.cli"):
        assert cli.main(["run", "poisson_inversion", "--n", "6", "--grading", "1.5", "--max-iter", "2", "-q",
                         "--no-pictures", "--backend", "petsc", "--out", out2]) in (0, 1)
    if COMM.rank == 0:
        assert "grading" in caplog.text


def _ends_as_a_straight_run(tmp_path, base, out, name):
    """The resumed run in ``out`` has the history of 8 iterations made in one go (``base`` ends in --out)."""
    straight = _shared(tmp_path, name)
    assert cli.main([*base[:-1], straight, "--max-iter", "8"]) in (0, 1)
    COMM.Barrier()
    a, b = _history(out), _history(straight)
    assert len(a) == len(b) == 9
    assert abs(a[-1]["f"] - b[-1]["f"]) <= 1e-10 * abs(b[-1]["f"])


def test_resume_under_mpiexec_continues_a_run_built_rank_by_rank(tmp_path):
    out = _shared(tmp_path, "resume")
    base = ["run", "topology_compliance", "--nelx", "24", "--nely", "8", "--no-pictures", "-q", "--backend", "petsc",
            "--out", out]
    assert cli.main([*base, "--max-iter", "4"]) in (0, 1)
    assert cli.main([*base, "--max-iter", "8", "--resume"]) in (0, 1)
    _ends_as_a_straight_run(tmp_path, base, out, "straight")


def test_resume_after_a_kill_while_rank_0_rotated_its_checkpoint(tmp_path, capsys):
    """Rank 0 moved its newest file to .prev and was killed before it wrote the next one: it has no
    checkpoint.rank0.npz, yet every rank has iteration 4 (the command said "no checkpoint" and started afresh)."""
    import os

    out = _shared(tmp_path, "rotated")
    base = ["run", "topology_compliance", "--nelx", "24", "--nely", "8", "--no-pictures", "-q", "--backend", "petsc",
            "--out", out]
    assert cli.main([*base, "--max-iter", "4"]) in (0, 1)
    COMM.Barrier()
    if COMM.rank == 0:
        os.replace(f"{out}/checkpoint.rank0.npz", f"{out}/checkpoint.rank0.prev.npz")
    COMM.Barrier()
    log = out + ".jsonl"
    assert cli.main([*base, "--max-iter", "8", "--resume", "--log-json", log]) in (0, 1)
    COMM.Barrier()
    with open(log) as fh:  # rank 0 logs the iterations this invocation made: from the checkpoint's on
        assert [json.loads(line)["nit"] for line in fh][0] >= 4
    _ends_as_a_straight_run(tmp_path, base, out, "straight8")
    if COMM.rank == 0:
        assert "no checkpoint" not in capsys.readouterr().err
    # the per-rank checkpoints are not resumed by a run with p on every rank (the serial command): it says how
    COMM.Barrier()
    if COMM.rank == 0:
        capsys.readouterr()
        assert cli.main(["run", "topology_compliance", "--nelx", "24", "--nely", "8", "--no-pictures", "-q", "--out",
                         out, "--max-iter", "10", "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"mpiexec -n {COMM.size} with --backend petsc" in err, err
        assert not os.path.exists(f"{out}/checkpoint.npz")
    COMM.Barrier()


def test_write_pvtu_checks_its_input(tmp_path):
    folder = _shared(tmp_path, "pv")
    if COMM.rank == 0:
        import os

        os.makedirs(folder)
    COMM.Barrier()
    mesh = rectangle(2, 1)
    with pytest.raises(MeshError, match="ending in '.pvtu'"):
        write_pvtu(f"{folder}/f.vtu", mesh, comm=COMM)
    if COMM.size > 1:
        with pytest.raises(MeshError, match="differ in names"):
            write_pvtu(f"{folder}/f.pvtu", mesh, {f"u{COMM.rank}": np.zeros(mesh.n_nodes)}, comm=COMM)
    with pytest.raises(OSError, match="could not write its piece"):
        write_pvtu(f"{folder}/missing/f.pvtu", mesh, comm=COMM)
    path = write_pvtu(f"{folder}/f.pvtu", mesh, {"u": np.arange(mesh.n_nodes, dtype=float)}, comm=COMM)
    assert len(_pieces(folder, "f.pvtu")) == COMM.size and path.name == "f.pvtu"
    assert np.array_equal(meshio.read(f"{folder}/f_{COMM.rank}.vtu").point_data["u"], np.arange(mesh.n_nodes))
