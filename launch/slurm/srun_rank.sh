#!/usr/bin/env bash
# One SLURM task per rank: map SLURM's task ids to the env:// variables torch.distributed reads, then exec.
#   srun launch/slurm/srun_rank.sh SCRIPT.py [args ...]       (MASTER_ADDR / MASTER_PORT must be set)
# Exit codes and signals reach the ranks unchanged (srun relays them), which torchrun cannot offer.
set -euo pipefail
: "${MASTER_ADDR:?MASTER_ADDR must be set (train.sbatch does it)}"
: "${MASTER_PORT:?MASTER_PORT must be set (train.sbatch does it)}"
export RANK=${SLURM_PROCID:?not inside a SLURM step} WORLD_SIZE=${SLURM_NTASKS:?not inside a SLURM step}
export LOCAL_RANK=${SLURM_LOCALID:?}
export NODE_RANK=${SLURM_NODEID:?}
echo "[srun_rank] rank $RANK of $WORLD_SIZE (local rank $LOCAL_RANK) on node ${SLURMD_NODENAME:-?}," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT"
exec "${PYTHON:-python3}" -u "$@"
