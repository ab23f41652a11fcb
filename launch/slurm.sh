#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all of its GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh \
#       --config=configs/synthetic.py --workdir=/shared/runs/semflow
#
# srun starts the same command on every node; semflow_jax.main sees SLURM's variables and calls
# jax.distributed.initialize(), which takes the coordinator (the first node), the process count
# and each process's index from them. The workdir must be on storage every node sees.
# Preemption: SLURM sends SIGTERM (--signal below asks for it 120 s before the time limit); the
# run saves a checkpoint at the current step and exits 0, and requeueing the job (or running
# this script again) continues from it.
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# Activate the environment every node shares (built with the README's install command).
. "${VENV:-.venv}/bin/activate"
srun --kill-on-bad-exit=1 python -m semflow_jax.main "$@"
