#!/bin/bash
# MPI scaling of adjopt's PETSc backend on a SLURM cluster: an example job script (adapt it to the site).
#
#   sbatch --nodes=4 scripts/slurm_bench_mpi.sh        # strong and weak scaling at 1, 2, 4, ... 4 x 32 ranks
#
# One job allocates the largest node count and runs scripts/bench_mpi.py once per rank count (srun -n R inside
# the allocation), each run writing its own JSON; the last step merges them (--combine) into one file with the
# speedups and parallel efficiencies (base: the smallest rank count) and prints the tables.
# Submit from the repository root (the working directory of the job is where sbatch was called).
#
#SBATCH --job-name=adjopt-bench-mpi
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=32
#SBATCH --cpus-per-task=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --output=bench_mpi_%j.out

set -euo pipefail

# -- software: a site PETSc with petsc4py built against the site MPI (names differ between sites) --
# module purge
# module load gcc/13 openmpi/4.1 petsc/3.24 python/3.11
# module load py-petsc4py/3.24 py-mpi4py/4.0
# source "$HOME/venvs/adjopt/bin/activate"          # pip install -e .  (numpy, scipy, numba, ...)
# export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"      # when adjopt is not installed

# -- one thread per rank: numba, OpenMP and the BLAS must not compete with the MPI ranks for the cores --
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
# numba compiles the kernels on first use; a shared cache spares every rank the compilation
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.numba_cache}"

OUT="scripts/results/slurm_${SLURM_JOB_ID:-local}"
mkdir -p "$OUT"
PER_NODE="${SLURM_NTASKS_PER_NODE:-32}"
NODES="${SLURM_JOB_NUM_NODES:-1}"
MAX_RANKS=$((PER_NODE * NODES))

# rank counts: 1, 2, 4, ... up to a full node, then whole nodes
RANKS=()
r=1
while [ "$r" -lt "$PER_NODE" ]; do
    RANKS+=("$r")
    r=$((r * 2))
done
n=1
while [ "$n" -le "$NODES" ]; do
    RANKS+=($((n * PER_NODE)))
    n=$((n * 2))
done
echo "rank counts: ${RANKS[*]} (at most $MAX_RANKS)"

# Memory: every rank builds the whole problem (the backend distributes a replicated Problem), so a node needs
# about (ranks per node) x (the serial build's peak). Measured on one rank: Poisson 2D n = 512 (261k dofs)
# 1.1 GiB, n = 1024 (1.0M dofs) 4.2 GiB; MBB 768x256 (395k dofs) 1.2 GiB. With 32 ranks per node the strong
# Poisson series below needs about 135 GiB per node (--mem=0: all of it); take --size 512 on smaller nodes.
# The 3D gallery problem solves its synthetic data with SuperLU while it is built: keep 3D sizes small.

# -- strong scaling: one fixed problem; the serial comparison is off at these sizes (--check-max-dofs 0) --
for R in "${RANKS[@]}"; do
    srun --ntasks="$R" --mem=0 --cpu-bind=cores python scripts/bench_mpi.py --strong --problem poisson_inversion \
        --size 1024 --repeat 5 --check-max-dofs 0 --json "$OUT/strong_poisson_R$R.json"
    srun --ntasks="$R" --mem=0 --cpu-bind=cores python scripts/bench_mpi.py --strong --problem topology_compliance \
        --size 384x128 --repeat 3 --check-max-dofs 0 --json "$OUT/strong_mbb_R$R.json"
done

# -- weak scaling: fixed work per rank, the size grows with R (Poisson n = 64 sqrt(R): about 4,000 dofs per
#    rank, 523k dofs at 128 ranks; larger per-rank sizes run out of memory at high R, see above) --
for R in "${RANKS[@]}"; do
    srun --ntasks="$R" --mem=0 --cpu-bind=cores python scripts/bench_mpi.py --weak --problem poisson_inversion \
        --weak-size 64 --repeat 5 --json "$OUT/weak_poisson_R$R.json"
done

# -- the optimizers on one full node: TAO ntr against adjopt's newton-cg, 261k dofs --
srun --ntasks="$PER_NODE" --mem=0 --cpu-bind=cores python scripts/bench_mpi.py --strong --size 512 --tao \
    --tao-maxiter 30 --json "$OUT/tao_R$PER_NODE.json"

# -- merge each series (one process on the batch node, no srun): speedups and efficiencies against the
#    smallest rank count --
python scripts/bench_mpi.py --combine "$OUT"/strong_poisson_R*.json --json "$OUT/strong_poisson.json"
python scripts/bench_mpi.py --combine "$OUT"/strong_mbb_R*.json --json "$OUT/strong_mbb.json"
python scripts/bench_mpi.py --combine "$OUT"/weak_poisson_R*.json --json "$OUT/weak_poisson.json"
