#!/usr/bin/env bash
# One SLURM task per node: start torchrun for this node's ranks with a static rendezvous (node rank from SLURM).
#   srun launch/slurm/torchrun_node.sh SCRIPT.py [args ...]
# Needs MASTER_ADDR and MASTER_PORT (train.sbatch sets them). Ranks per node: NPROC_PER_NODE, else the GPUs
# SLURM gave this node, else the visible CUDA devices, else 1.
# Static rendezvous rather than c10d: no extra store round-trips, and a stuck node shows up as a clear timeout.
set -euo pipefail
: "${MASTER_ADDR:?MASTER_ADDR must be set (train.sbatch does it)}"
: "${MASTER_PORT:?MASTER_PORT must be set (train.sbatch does it)}"

gpus_on_node() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . ; return; fi
  echo 1
}
NPROC=${NPROC_PER_NODE:-$(gpus_on_node)}
echo "[torchrun_node] node ${SLURMD_NODENAME:-?} (node rank ${SLURM_NODEID:-?} of ${SLURM_NNODES:-?}):" \
  "$NPROC rank(s)," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT"

# torchrun only relays SIGTERM/SIGINT/SIGHUP/SIGQUIT by default; USR1 would kill it and orphan the ranks.
exec "${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes "${SLURM_NNODES:?not inside a SLURM step}" --node_rank "${SLURM_NODEID:?not inside a SLURM step}" \
  --nproc_per_node "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}" \
  "$@"
